//! End-to-end tests with real TUN devices in network namespaces: the real
//! server and client binaries, real kernel routing, real ping and iperf3.
//!
//! Needs root; `.ci/run` provides it and installs iproute2, ping and iperf3.
//! The tests share one lock: on a 2-core machine they run one at a time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sallyport_conformance::lab::{ConfigExtra, Lab, ProcId, SERVER_TUNNEL_IP, TOKENS};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const UP: Duration = Duration::from_secs(10);

/// Starts a server and `n` clients on the default config; returns their
/// handles and tunnel addresses.
fn lab_with_clients(tag: &str, n: usize) -> (Lab, ProcId, Vec<ProcId>, Vec<std::net::Ipv4Addr>) {
    let mut lab = Lab::new(tag, n).expect("lab");
    let scfg = lab
        .server_config("server.toml", &ConfigExtra::default())
        .expect("cfg");
    let server = lab.start_server(&scfg).expect("server");
    let mut clients = Vec::new();
    for i in 0..n {
        let ccfg = lab
            .client_config(
                &format!("client{i}.toml"),
                TOKENS[i % 2],
                &ConfigExtra::default(),
            )
            .expect("cfg");
        clients.push(lab.start_client(i, &ccfg).expect("client"));
    }
    let addrs: Vec<_> = (0..n)
        .map(|i| lab.wait_client_addr(i, UP).expect("client up"))
        .collect();
    (lab, server, clients, addrs)
}

/// `(packets, bytes)` of the client's last `stats:` line, decap side.
fn decap_stats(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("stats: "))?;
    let rest = &line[line.find("decap ")? + "decap ".len()..];
    let mut words = rest.split_whitespace();
    let pkts = words.next()?.parse().ok()?;
    let bytes = words.nth(2)?.parse().ok()?;
    Some((pkts, bytes))
}

/// A client with offload and one without share the LAN: the server cuts
/// super-packets for the one without [G4], and a server without offload cuts
/// them for its own TUN.
#[test]
fn clients_with_and_without_offload_interoperate() {
    let _g = serial();
    for server_offload in [true, false] {
        let mut lab = Lab::new("o", 2).expect("lab");
        let scfg = lab
            .server_config(
                "server.toml",
                &ConfigExtra {
                    vpn: format!("offload = {server_offload}\n"),
                    ..Default::default()
                },
            )
            .expect("cfg");
        lab.start_server(&scfg).expect("server");
        for (i, offload) in [(0, true), (1, false)] {
            let ccfg = lab
                .client_config(
                    &format!("client{i}.toml"),
                    TOKENS[0],
                    &ConfigExtra {
                        vpn: format!("offload = {offload}\n"),
                        ..Default::default()
                    },
                )
                .expect("cfg");
            lab.start_client(i, &ccfg).expect("client");
        }
        let addrs: Vec<_> = (0..2)
            .map(|i| lab.wait_client_addr(i, UP).expect("client up"))
            .collect();
        let (a, b) = (lab.client_ns(0), lab.client_ns(1));
        for (from, to, dst, what) in [
            (&a, &b, addrs[1], "offload client -> plain client"),
            (&b, &a, addrs[0], "plain client -> offload client"),
            (
                &a,
                &lab.server_ns(),
                SERVER_TUNNEL_IP,
                "offload client -> server",
            ),
        ] {
            let bps = lab.iperf3(from, to, dst, 2, 1).expect("iperf3");
            println!(
                "server offload {server_offload}: {what}: {:.0} Mbit/s",
                bps / 1e6
            );
            assert!(
                bps > 1e6,
                "{what} (server offload {server_offload}): {bps} bit/s"
            );
        }
    }
}

#[test]
fn two_clients_ping_each_other_and_the_server_and_iperf3_flows() {
    let _g = serial();
    let (mut lab, server, clients, addrs) = lab_with_clients("p", 2);
    let (a, b) = (lab.client_ns(0), lab.client_ns(1));
    assert_ne!(addrs[0], addrs[1], "distinct addresses");
    assert!(lab.ping(&a, addrs[1], 3), "client 0 -> client 1");
    assert!(lab.ping(&b, addrs[0], 3), "client 1 -> client 0");
    assert!(lab.ping(&a, SERVER_TUNNEL_IP, 3), "client 0 -> server");
    assert!(lab.ping(&b, SERVER_TUNNEL_IP, 3), "client 1 -> server");

    let bps = lab.iperf3(&a, &b, addrs[1], 3, 1).expect("iperf3");
    println!(
        "iperf3 client -> client through the hub: {:.1} Mbit/s",
        bps / 1e6
    );
    assert!(bps > 0.0, "non-zero throughput");

    // SIGTERM: each exits 0 and removes its TUN device.
    lab.signal(clients[0], "TERM");
    let st = lab
        .wait_exit(clients[0], Duration::from_secs(5))
        .expect("client exits");
    assert!(st.success(), "client exit status {st}");
    assert!(
        lab.if_addr(&a, "sallyport0").is_none(),
        "client TUN removed"
    );

    lab.signal(server, "TERM");
    let st = lab
        .wait_exit(server, Duration::from_secs(5))
        .expect("server exits");
    assert!(st.success(), "server exit status {st}");
    let srv_ns = lab.server_ns();
    let tun_gone = lab
        .exec(&srv_ns, &["ip", "link", "show", "tun0"])
        .map(|o| !o.status.success())
        .unwrap_or(false);
    assert!(tun_gone, "server TUN removed");
    // Segmentation offload is on by default: iperf3's data reached client 1
    // as super-packets, far larger than the MTU on average (its session
    // ended with the server, and it logged its counters).
    let (pkts, bytes) = sallyport_conformance::lab::wait_for(Duration::from_secs(5), || {
        decap_stats(&lab.log(clients[1]))
    })
    .expect("client 1 stats line");
    assert!(
        bytes / pkts.max(1) > 1420,
        "iperf3 should cross as super-packets: {bytes} B in {pkts} packets"
    );
    let log = lab.log(server);
    assert!(
        log.contains("session ended"),
        "server logged the sessions' end:\n{log}"
    );
}

#[test]
fn ten_clients_each_ping_every_other() {
    let _g = serial();
    let (lab, _server, _clients, addrs) = lab_with_clients("m", 10);
    let mut unique = addrs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 10, "ten distinct addresses: {addrs:?}");
    let mut failures = Vec::new();
    for i in 0..10 {
        let ns = lab.client_ns(i);
        for (j, dst) in addrs.iter().enumerate() {
            if i != j && !lab.ping(&ns, *dst, 1) {
                failures.push((i, j));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "pings that failed (from, to): {failures:?}"
    );
}

#[test]
fn clients_return_with_the_same_addresses_after_server_sigkill_and_restart() {
    let _g = serial();
    let (mut lab, server, _clients, addrs) = lab_with_clients("k", 2);
    let a = lab.client_ns(0);
    assert!(lab.ping(&a, addrs[1], 1));

    lab.kill(server);
    let scfg = lab.dir().join("server.toml");
    let restarted = Instant::now();
    let server2 = lab.start_server(&scfg).expect("restart");
    let back = sallyport_conformance::lab::wait_for(Duration::from_secs(15), || {
        lab.ping(&a, addrs[1], 1).then(Instant::now)
    })
    .expect("ping works again after restart");
    let took = back.duration_since(restarted);
    println!("clients back {:.2}s after the restart", took.as_secs_f64());
    for (i, addr) in addrs.iter().enumerate() {
        assert_eq!(
            lab.if_addr(&lab.client_ns(i), "sallyport0"),
            Some(*addr),
            "client {i} kept its address"
        );
    }
    let log = lab.log(server2);
    assert_eq!(
        log.matches("reconnected with its previous address").count(),
        2,
        "both clients reconnected with their previous address:\n{log}"
    );
    assert!(
        took <= Duration::from_secs(5),
        "back within 5 s of the restart, took {took:?}"
    );
}

#[test]
fn a_client_with_a_wrong_token_is_refused_and_says_why() {
    let _g = serial();
    let mut lab = Lab::new("t", 1).expect("lab");
    let scfg = lab
        .server_config("server.toml", &ConfigExtra::default())
        .expect("cfg");
    let server = lab.start_server(&scfg).expect("server");
    let ccfg = lab
        .client_config("client.toml", "not-a-valid-token", &ConfigExtra::default())
        .expect("cfg");
    let client = lab.start_client(0, &ccfg).expect("client");
    let st = lab
        .wait_exit(client, Duration::from_secs(10))
        .expect("client gives up on a refused token");
    assert!(!st.success(), "non-zero exit on a refused token");
    let clog = lab.log(client);
    assert!(
        clog.contains("refused authentication (auth_failed)"),
        "client log:\n{clog}"
    );
    assert!(
        lab.if_addr(&lab.client_ns(0), "sallyport0").is_none(),
        "no TUN for a refused client"
    );
    let slog = lab.log(server);
    assert!(
        slog.contains("authentication failed"),
        "server log:\n{slog}"
    );
    assert!(
        !slog.contains("not-a-valid-token"),
        "the token is never logged"
    );
}

#[test]
fn the_server_fails_clearly_on_a_port_in_use_and_without_cap_net_admin() {
    let _g = serial();
    let mut lab = Lab::new("e", 0).expect("lab");
    let scfg = lab
        .server_config("server.toml", &ConfigExtra::default())
        .expect("cfg");
    let first = lab.start_server(&scfg).expect("server");
    let srv = lab.server_ns();
    sallyport_conformance::lab::wait_for(UP, || lab.if_addr(&srv, "tun0"))
        .expect("first server up");

    let second_cfg = lab
        .server_config(
            "second.toml",
            &ConfigExtra {
                vpn: "interface_name = \"tun1\"".into(),
                ..Default::default()
            },
        )
        .expect("cfg");
    let bin = lab.bin("sallyport-server");
    let out = lab
        .exec(
            &srv,
            &[bin.as_os_str(), "--config".as_ref(), second_cfg.as_os_str()],
        )
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second server must fail");
    assert!(
        err.contains("198.18.0.1:443") && err.contains("already in use"),
        "clear port-in-use message: {err}"
    );
    lab.kill(first);

    let cmd = format!("exec {} --config {}", bin.display(), scfg.display());
    let out = lab
        .exec(&srv, &["capsh", "--drop=cap_net_admin", "--", "-c", &cmd])
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "server without CAP_NET_ADMIN must fail"
    );
    assert!(
        err.contains("CAP_NET_ADMIN"),
        "message names the capability: {err}"
    );
}
