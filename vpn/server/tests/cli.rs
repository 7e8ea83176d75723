//! The command line: `--check-config` and `--version`.

use std::process::Command;

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sallyport-server"))
}

fn temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sallyport-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn check_config_reports_the_file_and_key_of_an_invalid_value() {
    let p = temp(
        "bad-server.toml",
        "[server]\ntls_cert = \"/x.crt\"\ntls_key = \"/x.key\"\n[vpn]\nserver_ip = \"10.1.1.1\"\n[auth]\ntokens = [\"t\"]\n",
    );
    let out = server()
        .arg("--config")
        .arg(&p)
        .arg("--check-config")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad-server.toml") && err.contains("vpn.server_ip"),
        "{err}"
    );
}

#[test]
fn check_config_reports_an_unreadable_certificate() {
    let p = temp(
        "nocert-server.toml",
        "[server]\ntls_cert = \"/nonexistent/s.crt\"\ntls_key = \"/nonexistent/s.key\"\n[vpn]\n[auth]\ntokens = [\"t\"]\n",
    );
    let out = server()
        .arg("--config")
        .arg(&p)
        .arg("--check-config")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/s.crt"), "{err}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = server()
        .args(["--config", "/nonexistent/server.toml", "--check-config"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("read config /nonexistent/server.toml"),
        "{err}"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let out = server().arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_takes_the_file_as_its_value() {
    let p = temp(
        "value-server.toml",
        "[server]\ntls_cert = \"/x.crt\"\ntls_key = \"/x.key\"\n[vpn]\nserver_ip = \"10.1.1.1\"\n[auth]\ntokens = [\"t\"]\n",
    );
    let out = server()
        .arg("--check-config")
        .arg(&p)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("value-server.toml") && err.contains("vpn.server_ip"),
        "{err}"
    );
}
