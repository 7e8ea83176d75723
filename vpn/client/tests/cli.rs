//! The command line: `--check-config` and `--version`.

use std::process::Command;

fn client() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sallyport-client"))
}

fn temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sallyport-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn check_config_accepts_a_valid_config() {
    let p = temp(
        "good-client.toml",
        "[server]\nurl = \"wss://vpn.example.com/tunnel\"\n[auth]\ntoken = \"t\"\n",
    );
    let out = client()
        .arg("--config")
        .arg(&p)
        .arg("--check-config")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));
}

#[test]
fn check_config_names_the_key_of_an_invalid_value() {
    let p = temp(
        "bad-client.toml",
        "[server]\nurl = \"wss://vpn.example.com/tunnel\"\n[auth]\ntoken = \"t\"\n[vpn]\nmtu = 20\n",
    );
    let out = client()
        .arg("--config")
        .arg(&p)
        .arg("--check-config")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad-client.toml") && err.contains("vpn.mtu"),
        "{err}"
    );
}

#[test]
fn check_config_refuses_unknown_keys() {
    let p = temp(
        "typo-client.toml",
        "[server]\nurl = \"wss://vpn.example.com/tunnel\"\nverify_tsl = false\n[auth]\ntoken = \"t\"\n",
    );
    let out = client()
        .arg("--config")
        .arg(&p)
        .arg("--check-config")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("verify_tsl"), "{err}");
}

#[test]
fn check_config_takes_the_file_as_its_value() {
    let p = temp(
        "value-client.toml",
        "[server]\nurl = \"wss://vpn.example.com/tunnel\"\n[auth]\ntoken = \"t\"\n",
    );
    let out = client()
        .arg("--check-config")
        .arg(&p)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("value-client.toml: configuration ok"));
}

#[test]
fn check_config_refuses_the_sample_placeholder_token() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../../packaging/client.toml");
    let out = client()
        .arg("--check-config")
        .arg(sample)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("auth.token") && err.contains("placeholder"),
        "{err}"
    );
}
