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

/// The rate limit of the second token in the main lab, bytes per second and
/// burst: small enough that the suite's flood exceeds it many times over.
const RATE_BPS: &str = "200000";
const RATE_BURST: &str = "20000";

/// Starts the server with `vpn` lines, `[limits]` lines and further
/// sections added to the lab's config, and waits for its TUN device.
fn start_server(lab: &mut Lab, name: &str, vpn: &str, limits: &str, rest: &str) {
    let cfg = lab
        .server_config(
            name,
            &ConfigExtra {
                vpn: vpn.into(),
                rest: format!("[limits]\nauth_timeout = \"{AUTH_TIMEOUT}\"\n{limits}\n{rest}"),
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
    // Compression on, so that the compression checks run; the second token
    // rate limited, for policy.rate_limit (the other checks use it only to
    // authenticate).
    start_server(
        &mut lab,
        "server.toml",
        "subnet = \"10.100.0.0/16\"\nkeepalive_interval = \"1s\"",
        &format!(
            "[[limits.per_token]]\ntoken_index = 1\n\
             rate_limit_bytes_per_sec = {RATE_BPS}\nrate_limit_burst_bytes = {RATE_BURST}"
        ),
        "[compression]\nenabled = true\n",
    );
    let junit = lab.dir().join("junit.xml");
    let junit_arg = junit.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let (out, stdout) = run_suite(
        &lab,
        &[
            "--transport",
            "all",
            "--junit",
            &junit_arg,
            "--rate-limit-bps",
            RATE_BPS,
            "--rate-limit-burst",
            RATE_BURST,
            "--rate-limit-token",
            TOKENS[1],
            // Fewer sessions than the default 200 for the concurrency check,
            // on each of three transports: the load is not the point here.
            "--sessions",
            "64",
        ],
    );
    let took = t0.elapsed();

    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.contains(" passed, 0 failed"),
        "summary line: {last:?}\n{stdout}"
    );
    assert!(out.status.success(), "exit status {}", out.status);
    // Every transport really ran.
    for t in ["wss", "h2", "tls"] {
        let ok = format!("ok    {t}/routing.client_to_client ");
        assert!(stdout.contains(&ok), "no {t} run:\n{stdout}");
    }
    // Nothing is skipped but what is a test of its own (pool exhaustion) and
    // what belongs to other transports.
    let skipped: Vec<&str> = stdout.lines().filter(|l| l.starts_with("skip")).collect();
    let expected = |l: &str| {
        l.contains("/handshake.pool_exhausted ")
            || l.contains("wss/transport.bad_framing ")
            || l.contains("h2/transport.not_found ")
            || l.contains("tls/transport.not_found ")
    };
    assert!(
        skipped.iter().all(|l| expected(l)),
        "unexpected skips: {skipped:#?}"
    );
    assert_eq!(skipped.len(), 6, "skips: {skipped:#?}");
    println!("the suite took {took:.1?} over three transports");
    let xml = std::fs::read_to_string(&junit).expect("junit report written");
    assert!(xml.contains("failures=\"0\""), "{xml}");
}

#[test]
fn the_real_server_answers_pool_exhausted_when_its_pool_is_empty() {
    let _g = serial();
    let mut lab = Lab::new("cx", 1).expect("lab");
    // 13 assignable addresses.
    start_server(&mut lab, "small.toml", "subnet = \"10.100.0.0/28\"", "", "");
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
