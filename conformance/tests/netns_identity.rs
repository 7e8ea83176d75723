//! Identity, leases and certificates end to end, with the real binaries in
//! network namespaces: leases survive a server SIGKILL and fresh client
//! processes returning in reverse order; SIGHUP swaps the certificate without
//! dropping sessions; a pinned client is refused until the server serves
//! the pinned key.
//!
//! Needs root; `.ci/run` provides it.

use std::sync::Mutex;
use std::time::Duration;

use sallyport_conformance::lab::{wait_for, ConfigExtra, Lab, SERVER_TUNNEL_IP, TOKENS};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const UP: Duration = Duration::from_secs(10);

/// Fast reconnects, so waiting on a retry stays short.
fn quick_reconnect() -> ConfigExtra {
    ConfigExtra {
        rest: "[reconnect]\nmin_backoff = \"200ms\"\nmax_backoff = \"1s\"\n".into(),
        ..Default::default()
    }
}

#[test]
fn after_a_server_sigkill_fresh_clients_in_reverse_order_get_their_old_addresses() {
    let _g = serial();
    let mut lab = Lab::new("l", 3).expect("lab");
    // Client 0 is a named client whose token the server knows only hashed;
    // clients 1 and 2 share a plain token and are told apart by client id.
    let alice = sallyport_server::config::hash_token("alice-token");
    let scfg = lab
        .server_config(
            "server.toml",
            &ConfigExtra {
                rest: format!("[[auth.clients]]\nname = \"alice\"\ntoken = \"{alice}\"\n"),
                ..Default::default()
            },
        )
        .expect("cfg");
    let tokens = ["alice-token", TOKENS[0], TOKENS[0]];
    let ccfgs: Vec<_> = (0..3)
        .map(|i| {
            lab.client_config(&format!("client{i}.toml"), tokens[i], &quick_reconnect())
                .expect("cfg")
        })
        .collect();

    let server = lab.start_server(&scfg).expect("server");
    let mut old = Vec::new();
    let mut clients = Vec::new();
    for (i, cfg) in ccfgs.iter().enumerate() {
        clients.push(lab.start_client(i, cfg).expect("client"));
        old.push(lab.wait_client_addr(i, UP).expect("client up"));
    }
    println!("first run: {old:?}");
    let mut sorted = old.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "distinct addresses: {old:?}");
    // The lease file is written shortly after each change.
    let file = lab.lease_file();
    let text = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|t| t.matches("\"identity\"").count() == 3)
    })
    .unwrap_or_else(|| panic!("lease file with 3 leases at {}", file.display()));
    assert!(
        text.contains("name:alice") && !text.contains("alice-token") && !text.contains(TOKENS[0]),
        "identities, never tokens: {text}"
    );

    lab.kill(server);
    for c in clients {
        lab.kill(c);
    }
    let server = lab.start_server(&scfg).expect("server again");
    // Fresh processes, in reverse order: no previous_ip in memory, only the
    // client id in each one's state file.
    for i in (0..3).rev() {
        lab.start_client(i, &ccfgs[i]).expect("client again");
        let got = lab.wait_client_addr(i, UP).expect("client back");
        assert_eq!(got, old[i], "client {i} has its old address");
        assert!(
            lab.ping(&lab.client_ns(i), SERVER_TUNNEL_IP, 1),
            "client {i} pings the server"
        );
    }
    let log = lab.log(server);
    assert!(
        log.contains("leases restored") && log.contains("restored=3"),
        "{log}"
    );
}

#[test]
fn sighup_swaps_the_certificate_without_dropping_sessions_and_pins_follow_the_key() {
    let _g = serial();
    let mut lab = Lab::new("h", 2).expect("lab");
    let scfg = lab
        .server_config("server.toml", &ConfigExtra::default())
        .expect("cfg");
    let server = lab.start_server(&scfg).expect("server");
    let c0cfg = lab
        .client_config("client0.toml", TOKENS[0], &quick_reconnect())
        .expect("cfg");
    let c0 = lab.start_client(0, &c0cfg).expect("client0");
    let addr0 = lab.wait_client_addr(0, UP).expect("client0 up");

    // A new certificate with a new key, not installed yet; client 1 pins it.
    let newdir = lab.dir().join("renewed");
    std::fs::create_dir_all(&newdir).expect("dir");
    let renewed = sallyport_conformance::certs::generate(&newdir, &["sallyport-lab", "198.18.0.1"])
        .expect("certs");
    let cert = sallyport_transports::tls::load_certs(&renewed.cert).expect("cert");
    let pin = sallyport_transports::tls::spki_sha256(&cert[0]).expect("pin");
    let pin = sallyport_transports::tls::format_pin(&pin);
    let c1cfg = lab
        .client_config("client1.toml", TOKENS[1], &quick_reconnect())
        .expect("cfg");
    let text = std::fs::read_to_string(&c1cfg).expect("read");
    let ca_line = text
        .lines()
        .find(|l| l.starts_with("ca_file"))
        .expect("ca_file line")
        .to_string();
    let text = text.replace(&ca_line, &format!("pin_sha256 = \"{pin}\""));
    std::fs::write(&c1cfg, text).expect("write");
    let c1 = lab.start_client(1, &c1cfg).expect("client1");
    let refused = wait_for(Duration::from_secs(5), || {
        lab.log(c1)
            .contains("matches no server.pin_sha256")
            .then_some(())
    });
    assert!(refused.is_some(), "wrong key refused:\n{}", lab.log(c1));
    assert!(lab.if_addr(&lab.client_ns(1), "sallyport0").is_none());

    // A broken file first: the old certificate stays, and says why.
    std::fs::write(&lab.certs.cert, "not a certificate").expect("write");
    lab.signal(server, "HUP");
    let failed = wait_for(Duration::from_secs(5), || {
        lab.log(server)
            .contains("certificate reload failed")
            .then_some(())
    });
    assert!(failed.is_some(), "{}", lab.log(server));

    // Then the renewed pair.
    std::fs::copy(&renewed.cert, &lab.certs.cert).expect("copy cert");
    std::fs::copy(&renewed.key, &lab.certs.key).expect("copy key");
    lab.signal(server, "HUP");
    let addr1 = lab
        .wait_client_addr(1, UP)
        .expect("the pinned client connects once the new key is served");
    assert!(
        lab.ping(&lab.client_ns(1), addr0, 2),
        "client 1 -> client 0"
    );
    assert!(
        lab.ping(&lab.client_ns(0), addr1, 2),
        "client 0 -> client 1"
    );
    let log0 = lab.log(c0);
    assert_eq!(
        log0.matches("connected").count() - log0.matches("reconnected").count(),
        1,
        "client 0 kept its first session:\n{log0}"
    );
    let slog = lab.log(server);
    assert!(slog.contains("certificate and key reloaded"), "{slog}");
    assert!(!slog.contains("session ended"), "no session ended:\n{slog}");
}
