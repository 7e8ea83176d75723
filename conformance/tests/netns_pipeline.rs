//! End-to-end tests of the packet pipeline in network namespaces: the real
//! binaries, real TUN devices, real ping and iperf3, and the server's admin
//! endpoint read with curl from inside its namespace.
//!
//! Needs root; `.ci/run` provides it and `.ci/deps.sh` installs iproute2,
//! ping, iperf3 and curl. The tests share one lock: one lab at a time.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use sallyport_conformance::lab::{
    wait_for, ConfigExtra, Iperf3Run, Lab, ProcId, SERVER_TUNNEL_IP, TOKENS,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const UP: Duration = Duration::from_secs(10);
const ADMIN: &str = "127.0.0.1:9100";

fn admin() -> SocketAddr {
    ADMIN.parse().expect("addr")
}

fn admin_section(per_session: bool) -> String {
    format!("[admin]\nlisten_addr = \"{ADMIN}\"\nper_session_metrics = {per_session}\n")
}

/// Starts a server with `server_rest` appended and one client per entry of
/// `clients` (token, `[vpn]` lines, further sections); waits for all to be up.
fn lab(
    tag: &str,
    server_rest: &str,
    clients: &[(&str, &str, &str)],
) -> (Lab, ProcId, Vec<Ipv4Addr>) {
    let mut lab = Lab::new(tag, clients.len()).expect("lab");
    let scfg = lab
        .server_config(
            "server.toml",
            &ConfigExtra {
                rest: server_rest.into(),
                ..Default::default()
            },
        )
        .expect("cfg");
    let server = lab.start_server(&scfg).expect("server");
    for (i, (token, vpn, rest)) in clients.iter().enumerate() {
        let ccfg = lab
            .client_config(
                &format!("client{i}.toml"),
                token,
                &ConfigExtra {
                    vpn: (*vpn).into(),
                    rest: (*rest).into(),
                    ..Default::default()
                },
            )
            .expect("cfg");
        lab.start_client(i, &ccfg).expect("client");
    }
    let addrs = (0..clients.len())
        .map(|i| lab.wait_client_addr(i, UP).expect("client up"))
        .collect();
    let srv = lab.server_ns();
    wait_for(UP, || lab.http_get(&srv, admin(), "/healthz").ok()).expect("admin endpoint up");
    (lab, server, addrs)
}

fn metrics(lab: &Lab) -> String {
    lab.http_get(&lab.server_ns(), admin(), "/metrics")
        .expect("GET /metrics")
}

/// The value of the series `name{labels}` (labels exactly as rendered).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

const SPOOFED: &str = "sallyport_dropped_packets_total{direction=\"decap\",reason=\"spoofed\"}";

#[test]
fn a_forged_source_never_reaches_the_other_client_and_metrics_show_the_drop() {
    let _g = serial();
    // Client 0 plays a modified client: its own anti-spoof layer is off, so
    // the forged packets reach the server, which must drop them.
    let (lab, _server, addrs) = lab(
        "f",
        &admin_section(true),
        &[
            (TOKENS[0], "", "[pipeline]\nanti_spoof = false\n"),
            (TOKENS[1], "", ""),
        ],
    );
    let (a, b) = (lab.client_ns(0), lab.client_ns(1));
    assert_eq!(metric(&metrics(&lab), SPOOFED), 0.0);
    let b_rx_before = lab.if_stat(&b, "sallyport0", "rx_packets").expect("rx");

    // A second address on client 0's TUN: the kernel then sends packets
    // with that source into the tunnel.
    let forged_src = Ipv4Addr::new(10, 100, 0, 250);
    let out = lab
        .exec(
            &a,
            &[
                "ip",
                "addr",
                "add",
                &format!("{forged_src}/32"),
                "dev",
                "sallyport0",
            ],
        )
        .expect("ip addr add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (src, dst) = (forged_src.to_string(), addrs[1].to_string());
    let ping = lab
        .exec(
            &a,
            &[
                "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", "-I", &src, &dst,
            ],
        )
        .expect("ping");
    assert!(!ping.status.success(), "no answer to a forged source");

    let dropped = wait_for(Duration::from_secs(5), || {
        let v = metric(&metrics(&lab), SPOOFED);
        (v >= 3.0).then_some(v)
    })
    .expect("the server counts the forged packets as spoofed");
    let b_rx_after = lab.if_stat(&b, "sallyport0", "rx_packets").expect("rx");
    assert_eq!(
        b_rx_after, b_rx_before,
        "no forged packet reached client 1's TUN"
    );
    println!("forged pings: {dropped} dropped as spoofed by the server, none delivered");

    // The path itself works: a genuine ping arrives.
    assert!(lab.ping(&a, addrs[1], 2), "genuine ping from client 0");
    assert!(lab.if_stat(&b, "sallyport0", "rx_packets").expect("rx") > b_rx_after);

    // Per-session series and /status name the culprit.
    let m = metrics(&lab);
    let per_session = m
        .lines()
        .find(|l| {
            l.starts_with("sallyport_session_dropped_packets_total{")
                && l.contains(&format!("addr=\"{}\"", addrs[0]))
                && l.contains("reason=\"spoofed\"")
                && l.contains("direction=\"decap\"")
        })
        .expect("per-session spoofed series for client 0");
    assert!(!per_session.ends_with(" 0"), "{per_session}");
    let status: serde_json::Value = serde_json::from_str(
        &lab.http_get(&lab.server_ns(), admin(), "/status")
            .expect("GET /status"),
    )
    .expect("status is JSON");
    let sessions = status["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 2, "{status}");
    for (i, addr) in addrs.iter().enumerate() {
        let s = sessions
            .iter()
            .find(|s| s["assigned_ip"] == addr.to_string())
            .unwrap_or_else(|| panic!("{addr} in {status}"));
        assert_eq!(s["token_index"], i, "{s}");
        let transport = s["transport"].as_str().expect("transport");
        assert!(["wss", "h2", "tls"].contains(&transport), "{s}");
        let peer = s["peer"].as_str().expect("peer");
        assert!(
            peer.starts_with(&format!("{}:", lab.client_underlay(i))),
            "{s}"
        );
        assert!(s["bytes_from_client"].as_u64().expect("bytes") > 0, "{s}");
    }
}

#[test]
fn with_lz4_negotiated_iperf3_puts_fewer_bytes_on_the_wire_than_in_the_tunnel() {
    let _g = serial();
    let server_rest = format!("[compression]\nenabled = true\n{}", admin_section(false));
    let (mut lab, server, _addrs) =
        lab("z", &server_rest, &[(TOKENS[0], "compression = true", "")]);
    let a = lab.client_ns(0);
    let srv = lab.server_ns();
    let bps = lab
        .iperf3_many(
            &[Iperf3Run {
                from_ns: a,
                to_ns: srv,
                to_addr: SERVER_TUNNEL_IP,
                streams: 1,
                extra: vec!["--repeating-payload".into()],
            }],
            3,
        )
        .expect("iperf3")[0];
    let m = metrics(&lab);
    let wire = metric(
        &m,
        "sallyport_compression_in_bytes_total{direction=\"decap\"}",
    );
    let tunnel = metric(
        &m,
        "sallyport_compression_out_bytes_total{direction=\"decap\"}",
    );
    let counted = metric(&m, "sallyport_bytes_total{direction=\"decap\"}");
    println!(
        "iperf3 --repeating-payload with lz4: {:.1} Mbit/s; client -> server {:.1} MB on the wire, \
         {:.1} MB in the tunnel (ratio {:.3})",
        bps / 1e6,
        wire / 1e6,
        tunnel / 1e6,
        wire / tunnel
    );
    assert!(
        tunnel > 1e6,
        "iperf3 data passed the decompressor: {tunnel}"
    );
    assert!(
        wire < tunnel,
        "fewer bytes on the wire ({wire}) than in the tunnel ({tunnel})"
    );
    assert_eq!(counted, wire, "the stats layer counts wire bytes");
    assert_eq!(
        metric(
            &m,
            "sallyport_dropped_packets_total{direction=\"decap\",reason=\"decompress_failed\"}"
        ),
        0.0
    );
    let log = lab.log(server);
    assert!(log.contains("lz4 compression negotiated"), "{log}");
}

#[test]
fn a_rate_limited_session_gets_its_rate_while_an_unlimited_one_beside_it_is_not_slowed() {
    let _g = serial();
    // Token 0: 20 Mbit/s = 2,500,000 bytes/s each way; token 1: unlimited.
    let server_rest = format!(
        "[limits]\n[[limits.per_token]]\ntoken_index = 0\nrate_limit_bytes_per_sec = 2500000\n{}",
        admin_section(false)
    );
    let (mut lab, _server, _addrs) = lab(
        "r",
        &server_rest,
        &[(TOKENS[0], "", ""), (TOKENS[1], "", "")],
    );
    let srv = lab.server_ns();
    let run = |i: usize| Iperf3Run {
        from_ns: lab.client_ns(i),
        to_ns: srv.clone(),
        to_addr: SERVER_TUNNEL_IP,
        streams: 1,
        // Leave the first second (slow start, the initial burst) out.
        extra: vec!["-O".into(), "1".into()],
    };
    let runs = [run(0), run(1)];
    let bps = lab.iperf3_many(&runs, 5).expect("iperf3");
    let (limited, unlimited) = (bps[0] / 1e6, bps[1] / 1e6);
    let m = metrics(&lab);
    let policed = metric(
        &m,
        "sallyport_dropped_packets_total{direction=\"decap\",reason=\"rate_limited\"}",
    );
    println!(
        "side by side: limited session {limited:.1} Mbit/s (limit 20), unlimited session \
         {unlimited:.1} Mbit/s; {policed} packets policed"
    );
    assert!(
        (14.0..=21.0).contains(&limited),
        "the limited session gets 14..21 Mbit/s, got {limited:.1}"
    );
    assert!(policed > 0.0, "over the limit, packets are dropped");
    assert!(
        unlimited > 21.0,
        "the unlimited session is not held to the limit: {unlimited:.1} Mbit/s"
    );
}
