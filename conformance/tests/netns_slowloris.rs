//! Slowloris, end to end: 2000 connections that never authenticate (silent
//! after TCP, one byte a second, silent after TLS) from one namespace, while
//! a real client with a real TUN device in another connects and pings.
//!
//! Asserts that the real client comes up and pings during the flood, that
//! the server closes every flood connection at `limits.auth_timeout` (or
//! refuses it at once over `max_unauthenticated_per_source`), and that its
//! open sockets stay bounded by the limits. Prints the server's RSS.
//!
//! Needs root, like the other netns tests.

use std::time::{Duration, Instant};

use sallyport_conformance::lab::{ConfigExtra, Lab, SERVER_TUNNEL_IP, SERVER_UNDERLAY, TOKENS};
use sallyport_conformance::load::ProcSample;

const FLOOD: usize = 2000;
const AUTH_TIMEOUT_S: u64 = 3;
const MAX_UNAUTH: usize = 1024;
const PER_SOURCE: usize = 400;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_slowloris_flood_is_bounded_and_timed_out_while_a_real_client_connects_and_pings() {
    let t0 = Instant::now();
    let mut lab = Lab::new("sl", 2).expect("lab");
    let extra = ConfigExtra {
        rest: format!(
            "[limits]\nauth_timeout = \"{AUTH_TIMEOUT_S}s\"\nmax_unauthenticated = {MAX_UNAUTH}\n\
             max_unauthenticated_per_source = {PER_SOURCE}\n"
        ),
        ..Default::default()
    };
    let scfg = lab.server_config("server.toml", &extra).expect("cfg");
    let server = lab.start_server(&scfg).expect("server");
    let pid = lab.pid(server);
    let ns_flood = lab.client_ns(0);
    if let Err(e) = lab.wait_server_listening(&ns_flood, Duration::from_secs(10)) {
        panic!("{e:#}\n{}", lab.log(server));
    }
    let before = ProcSample::read(pid).expect("server /proc");

    // The flood waits up to 3 auth timeouts for the server to close it all.
    let load = lab.bin("sallyport-load");
    let url = format!("wss://{SERVER_UNDERLAY}:443/tunnel");
    let ca = lab.certs.ca.display().to_string();
    let (n, wait) = (FLOOD.to_string(), (3 * AUTH_TIMEOUT_S).to_string());
    let flood = lab
        .spawn_in(
            &ns_flood,
            "flood",
            &[
                load.to_string_lossy().as_ref(),
                "--url",
                &url,
                "--ca",
                &ca,
                "--token",
                "unused",
                "--slowloris",
                &n,
                "--hold-secs",
                &wait,
            ],
        )
        .expect("flood");

    // While the flood holds its connections: the real client.
    let mut peak_fds = 0;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        peak_fds = peak_fds.max(open_fds(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = ProcSample::read(pid).expect("server /proc");
    let ccfg = lab
        .client_config("client.toml", TOKENS[0], &ConfigExtra::default())
        .expect("cfg");
    let started = Instant::now();
    lab.start_client(1, &ccfg).expect("client");
    let addr = lab.wait_client_addr(1, Duration::from_secs(10));
    let up_after = started.elapsed();
    peak_fds = peak_fds.max(open_fds(pid));
    let flood_running = lab.wait_exit(flood, Duration::ZERO).is_none();
    let addr = addr.unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", lab.log(server)));
    let ns_client = lab.client_ns(1);
    assert!(
        lab.ping(&ns_client, SERVER_TUNNEL_IP, 3),
        "the real client ({addr}) pings the server during the flood"
    );
    peak_fds = peak_fds.max(open_fds(pid));

    let st = lab
        .wait_exit(flood, Duration::from_secs(3 * AUTH_TIMEOUT_S + 15))
        .expect("flood ends");
    let report = lab.log(flood);
    let after = ProcSample::read(pid).expect("server /proc");
    println!("{report}");
    println!(
        "server RSS: {} KiB before, {} KiB during the flood, {} KiB after; peak open fds {peak_fds}; \
         the real client was up {up_after:.1?} after starting (flood still running: {flood_running}); \
         test took {:.1?}",
        before.rss_kib,
        during.rss_kib,
        after.rss_kib,
        t0.elapsed()
    );
    let value = |k: &str| -> usize {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in the flood report:\n{report}"))
    };
    assert!(
        st.success(),
        "every flood connection closed by the server:\n{report}"
    );
    assert_eq!(value("flood_still_open"), 0, "{report}");
    let log = lab.log(server);
    let refused = log
        .matches("not yet authenticated from this address, dropping")
        .count();
    println!("refused by the server over max_unauthenticated_per_source: {refused}");
    assert!(
        refused > 0,
        "over max_unauthenticated_per_source, connections are refused at once"
    );
    assert!(
        value("flood_timed_out") > 0,
        "the admitted ones are closed at the auth timeout:\n{report}"
    );
    let longest: f64 = report
        .lines()
        .find_map(|l| l.strip_prefix("flood_longest_held_s: "))
        .and_then(|v| v.parse().ok())
        .expect("longest");
    assert!(
        longest <= AUTH_TIMEOUT_S as f64 * 2.0 + 1.0,
        "no connection held much past the auth timeout (TLS, then auth): {longest} s"
    );
    // One source holds at most PER_SOURCE in TLS/HTTP set-up and as many
    // waiting for auth; the rest are sockets of the real client, the TUN,
    // the listener and the runtime.
    assert!(
        peak_fds <= 2 * PER_SOURCE + 64,
        "server open files bounded by the limits: peak {peak_fds}"
    );
    let fds = open_fds(pid);
    assert!(
        fds <= 64,
        "after the flood the server is back to a handful of files: {fds}"
    );
}
