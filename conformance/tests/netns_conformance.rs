//! The conformance suite against the real `sallyport-server` binary with its
//! TUN device, in a network namespace; the `sallyport-conformance` binary runs
//! from a client namespace over the veth underlay, on every transport this
//! build speaks.
//!
//! Needs root, like tests/netns.rs. The tests here share one lock and run
//! one at a time.

use std::process::Output;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sallyport_conformance::lab::{wait_for, ConfigExtra, Lab, SERVER_UNDERLAY, TOKENS};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const SUITE: &str = env!("CARGO_BIN_EXE_sallyport-conformance");

/// The server's auth timeout in these labs: short, so the suite's check of it
/// is quick, yet long enough for 32 TLS handshakes at once on a debug build.
const AUTH_TIMEOUT: &str = "3s";

/// Starts the server with `vpn` and `[limits]` lines added to the lab's
/// config, and waits for its TUN device.
fn start_server(lab: &mut Lab, name: &str, vpn: &str) {
    let cfg = lab
        .server_config(
            name,
            &ConfigExtra {
                vpn: vpn.into(),
                rest: format!("[limits]\nauth_timeout = \"{AUTH_TIMEOUT}\"\n"),
                ..ConfigExtra::default()
            },
        )
        .expect("config");
    lab.start_server(&cfg).expect("server");
    let ns = lab.server_ns();
    wait_for(Duration::from_secs(10), || lab.if_addr(&ns, "tun0")).expect("server TUN up");
}

/// Runs the suite from client namespace 0 with `extra` arguments.
fn run_suite(lab: &Lab, extra: &[&str]) -> (Output, String) {
    let url = format!("wss://{SERVER_UNDERLAY}:443/tunnel");
    let ca = lab.certs.ca.to_string_lossy().into_owned();
    let mut argv = vec![
        "timeout",
        "300",
        SUITE,
        "--url",
        &url,
        "--token",
        TOKENS[0],
        "--token2",
        TOKENS[1],
        "--ca",
        &ca,
        "--auth-timeout",
        AUTH_TIMEOUT,
    ];
    argv.extend_from_slice(extra);
    let t0 = Instant::now();
    let out = lab.exec(&lab.client_ns(0), &argv).expect("run the suite");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    println!(
        "stderr: {}\nsuite took {:.1}s",
        String::from_utf8_lossy(&out.stderr),
        t0.elapsed().as_secs_f64()
    );
    (out, stdout)
}

#[test]
fn the_real_server_passes_the_conformance_suite_on_every_transport() {
    let _g = serial();
    let mut lab = Lab::new("cf", 1).expect("lab");
    // A /16: the suite holds a few hundred addresses for the lease grace.
    // A 1 s keepalive lets the keepalive checks run within --max-wait.
    start_server(
        &mut lab,
        "server.toml",
        "subnet = \"10.100.0.0/16\"\nkeepalive_interval = \"1s\"",
    );
    let junit = lab.dir().join("junit.xml");
    let junit_arg = junit.to_string_lossy().into_owned();
    let (out, stdout) = run_suite(&lab, &["--transport", "all", "--junit", &junit_arg]);

    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.contains(" passed, 0 failed"),
        "summary line: {last:?}\n{stdout}"
    );
    assert!(out.status.success(), "exit status {}", out.status);
    // Nothing is skipped but what this server does not offer (compression)
    // and what is a test of its own (pool exhaustion).
    let skipped: Vec<&str> = stdout.lines().filter(|l| l.starts_with("skip")).collect();
    assert!(
        skipped.iter().all(|l| l.contains("extensions.compression")
            || l.contains("handshake.pool_exhausted")),
        "unexpected skips: {skipped:#?}"
    );
    let xml = std::fs::read_to_string(&junit).expect("junit report written");
    assert!(xml.contains("failures=\"0\""), "{xml}");
}

#[test]
fn the_real_server_answers_pool_exhausted_when_its_pool_is_empty() {
    let _g = serial();
    let mut lab = Lab::new("cx", 1).expect("lab");
    // 13 assignable addresses.
    start_server(&mut lab, "small.toml", "subnet = \"10.100.0.0/28\"");
    let (out, stdout) = run_suite(
        &lab,
        &[
            "--only",
            "handshake.pool_exhausted",
            "--exhaust-pool",
            "--exhaust-limit",
            "64",
        ],
    );
    assert_eq!(
        stdout.lines().last(),
        Some("1 passed, 0 failed"),
        "{stdout}"
    );
    assert!(out.status.success(), "exit status {}", out.status);
}
