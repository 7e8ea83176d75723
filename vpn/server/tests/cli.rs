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

#[test]
fn hash_token_prints_the_sha256_form_of_standard_input() {
    use std::io::Write;
    let mut child = server()
        .arg("--hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"alice-secret\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        printed,
        sallyport_server::config::hash_token("alice-secret")
    );
    // The form the config accepts: a config with it passes validation.
    let text = format!(
        "[server]\ntls_cert = \"/x.crt\"\ntls_key = \"/x.key\"\n[vpn]\n[auth]\n\
         [[auth.clients]]\nname = \"alice\"\ntoken = \"{printed}\"\n"
    );
    sallyport_server::config::ServerConfig::from_toml_str(&text, std::path::Path::new("s.toml"))
        .expect("valid");
}

#[test]
fn print_pin_prints_the_base64_sha256_of_the_public_key() {
    use rcgen::{CertificateParams, KeyPair, PublicKeyData};
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["vpn.example".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let crt = temp("pin.crt", &cert.pem());
    let keyfile = temp("pin.key", &key.serialize_pem());
    let cfg = temp(
        "pin-server.toml",
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[vpn]\n[auth]\ntokens = [\"t\"]\n",
            crt.display(),
            keyfile.display()
        ),
    );
    let out = server()
        .arg("--config")
        .arg(&cfg)
        .arg("--print-pin")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = sallyport_transports::tls::format_pin(&sallyport_transports::tls::sha256(
        &key.subject_public_key_info(),
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
}
