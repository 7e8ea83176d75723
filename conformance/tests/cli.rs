//! The `sallyport-conformance` command line: output shape and exit status.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sallyport-conformance");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Port 1 on loopback: nothing listens there, so every dial is refused at once.
const NOWHERE: &str = "wss://127.0.0.1:1/tunnel";

#[test]
fn list_names_every_check_with_its_statements() {
    let o = run(&["--list"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("handshake.auth_response"), "{out}");
    assert!(out.contains("[H1]"), "{out}");
    assert!(out.contains("[A5]") && out.contains("not checked"), "{out}");
}

#[test]
fn an_unreachable_server_fails_every_check_that_runs_and_exits_1() {
    let dir =
        std::env::temp_dir().join(format!("sallyport-conformance-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let junit = dir.join("report.xml");
    let o = run(&[
        "--url",
        NOWHERE,
        "--token",
        "t",
        "--only",
        "handshake,routing.forged_source",
        "--junit",
        junit.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.last().copied(),
        Some("0 passed, 8 failed, 1 skipped"),
        "{out}"
    );
    assert!(
        lines[0].starts_with("FAIL  handshake.auth_response [H1]: connect"),
        "{out}"
    );
    assert!(
        out.contains("skip  handshake.pool_exhausted [H5]: "),
        "skipped, not passed, without --exhaust-pool: {out}"
    );
    let xml = std::fs::read_to_string(&junit).expect("junit written");
    assert!(xml.contains("failures=\"8\""), "{xml}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn all_runs_every_transport_and_names_it() {
    let o = run(&[
        "--url",
        NOWHERE,
        "--token",
        "t",
        "--transport",
        "all",
        "--only",
        "handshake.auth_response",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for (line, t) in lines.iter().zip(["wss", "h2", "tls"]) {
        assert!(
            line.starts_with(&format!("FAIL  {t}/handshake.auth_response [H1]: connect")),
            "{out}"
        );
    }
    assert_eq!(lines[3], "0 passed, 3 failed", "{out}");
}

#[test]
fn the_rate_limit_flags_need_a_positive_rate() {
    let base = ["--url", NOWHERE, "--token", "t", "--only", "policy"];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        run(&a)
    };
    assert_eq!(with(&["--rate-limit-burst", "2000"]).status.code(), Some(2));
    assert_eq!(with(&["--rate-limit-token", "x"]).status.code(), Some(2));
    assert_eq!(with(&["--rate-limit-bps", "0"]).status.code(), Some(2));
    // Without the flag the check is skipped, not passed.
    let o = with(&[]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).starts_with("skip  policy.rate_limit [P3]: needs the server's rate limit"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn an_only_pattern_that_matches_nothing_is_a_usage_error() {
    let o = run(&["--url", NOWHERE, "--token", "t", "--only", "no.such.check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--list"));
}

#[test]
fn ca_and_insecure_are_exclusive_and_url_is_required() {
    assert_eq!(
        run(&["--url", NOWHERE, "--token", "t", "--ca", "x", "--insecure"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(run(&["--token", "t"]).status.code(), Some(2));
}
