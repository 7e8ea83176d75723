//! End-to-end tests of the transports with real parts in network namespaces:
//! each transport direct, through a real HTTP CONNECT proxy (tinyproxy) with
//! and without Basic auth, through a real nginx that terminates TLS (the
//! documented recipe, docs/deploy-nginx.conf), `auto` fallback when the
//! preferred transport is blocked, probes of the TLS port, and idle sessions
//! outliving nginx's read timeout.
//!
//! Needs root, nginx, tinyproxy and curl (`.ci/deps.sh` installs them).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use sallyport_conformance::lab::{
    wait_for, ConfigExtra, Lab, ProcId, BEHIND_NGINX, PROXY_UNDERLAY, SERVER_TUNNEL_IP,
    SERVER_UNDERLAY, TOKENS,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const UP: Duration = Duration::from_secs(15);

fn mode(m: &str) -> ConfigExtra {
    ConfigExtra {
        transport: format!("mode = \"{m}\""),
        ..Default::default()
    }
}

fn start_clients(lab: &mut Lab, extras: &[ConfigExtra]) -> Vec<(ProcId, Ipv4Addr)> {
    let ids: Vec<ProcId> = extras
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let c = lab
                .client_config(&format!("client{i}.toml"), TOKENS[0], extra)
                .expect("cfg");
            lab.start_client(i, &c).expect("client")
        })
        .collect();
    ids.into_iter()
        .enumerate()
        .map(|(i, id)| (id, lab.wait_client_addr(i, UP).expect("client up")))
        .collect()
}

#[test]
fn each_transport_carries_ping_and_iperf3_between_two_clients() {
    let _g = serial();
    for m in ["wss", "h2", "tls"] {
        let mut lab = Lab::new("x", 2).expect("lab");
        let scfg = lab
            .server_config("server.toml", &ConfigExtra::default())
            .expect("cfg");
        let server = lab.start_server(&scfg).expect("server");
        let clients = start_clients(&mut lab, &[mode(m), mode(m)]);
        let (a, b) = (lab.client_ns(0), lab.client_ns(1));
        assert!(lab.ping(&a, clients[1].1, 2), "{m}: client 0 -> client 1");
        assert!(lab.ping(&b, clients[0].1, 2), "{m}: client 1 -> client 0");
        assert!(lab.ping(&a, SERVER_TUNNEL_IP, 2), "{m}: client 0 -> server");
        let bps = lab.iperf3(&a, &b, clients[1].1, 2, 1).expect("iperf3");
        println!("{m}: iperf3 client -> client {:.0} Mbit/s", bps / 1e6);
        assert!(bps > 0.0);
        let slog = lab.log(server);
        assert!(
            slog.matches(&format!("transport={m}")).count() >= 2,
            "{m}: server log names the transport:\n{slog}"
        );
    }
}

fn start_tinyproxy(lab: &mut Lab, auth: Option<(&str, &str)>) -> ProcId {
    let ns = lab.proxy_ns().expect("proxy ns");
    let mut conf = String::from(
        "Port 8888\nTimeout 600\nAllow 198.19.0.0/16\nConnectPort 443\nMaxClients 64\nLogLevel Info\n",
    );
    if let Some((u, p)) = auth {
        conf.push_str(&format!("BasicAuth {u} {p}\n"));
    }
    let path = lab.write("tinyproxy.conf", &conf).expect("write");
    let id = lab
        .spawn_in(
            &ns,
            "tinyproxy",
            &["tinyproxy", "-d", "-c", path.to_str().expect("utf-8")],
        )
        .expect("tinyproxy");
    wait_for(Duration::from_secs(5), || {
        let o = lab.exec(&ns, &["ss", "-Hltn", "sport = :8888"]).ok()?;
        (!o.stdout.is_empty()).then_some(())
    })
    .expect("tinyproxy listening");
    id
}

#[test]
fn every_transport_passes_an_http_connect_proxy_with_and_without_basic_auth() {
    let _g = serial();
    for auth in [None, Some(("alice", "s3cret"))] {
        let mut lab = Lab::new("y", 0).expect("lab");
        let scfg = lab
            .server_config("server.toml", &ConfigExtra::default())
            .expect("cfg");
        lab.start_server(&scfg).expect("server");
        let proxy = start_tinyproxy(&mut lab, auth);
        let mut addrs = Vec::new();
        for m in ["wss", "h2", "tls"] {
            let (i, proxy_ip) = lab.add_client_behind_proxy().expect("isolated client");
            let ns = lab.client_ns(i);
            // Really isolated: no route to the server but through the proxy.
            assert!(
                !lab.ping(&ns, SERVER_UNDERLAY, 1),
                "client {i} must not reach the server directly"
            );
            let url = match auth {
                None => format!("http://{proxy_ip}:8888"),
                Some((u, p)) => format!("http://{u}:{p}@{proxy_ip}:8888"),
            };
            let extra = ConfigExtra {
                transport: format!("mode = \"{m}\"\nproxy = \"{url}\""),
                ..Default::default()
            };
            let c = lab
                .client_config(&format!("client{i}.toml"), TOKENS[0], &extra)
                .expect("cfg");
            lab.start_client(i, &c).expect("client");
            addrs.push((
                i,
                lab.wait_client_addr(i, UP)
                    .unwrap_or_else(|e| panic!("{m} via proxy (auth {}): {e}", auth.is_some())),
            ));
        }
        let (i0, a0) = addrs[0];
        for &(i, a) in &addrs[1..] {
            assert!(
                lab.ping(&lab.client_ns(i), a0, 2),
                "client {i} -> client {i0} through the proxy"
            );
            assert!(
                lab.ping(&lab.client_ns(i0), a, 2),
                "client {i0} -> client {i}"
            );
        }
        let plog = lab.log(proxy);
        assert!(
            plog.contains("CONNECT"),
            "tinyproxy carried the tunnels:\n{plog}"
        );
    }
}

#[test]
fn a_wrong_proxy_password_is_a_clear_log_line_naming_the_proxy() {
    let _g = serial();
    let mut lab = Lab::new("z", 0).expect("lab");
    let scfg = lab
        .server_config("server.toml", &ConfigExtra::default())
        .expect("cfg");
    lab.start_server(&scfg).expect("server");
    start_tinyproxy(&mut lab, Some(("alice", "s3cret")));
    let (i, proxy_ip) = lab.add_client_behind_proxy().expect("client");
    let extra = ConfigExtra {
        transport: format!("mode = \"wss\"\nproxy = \"http://alice:wrong@{proxy_ip}:8888\""),
        ..Default::default()
    };
    let c = lab
        .client_config("client.toml", TOKENS[0], &extra)
        .expect("cfg");
    let client = lab.start_client(i, &c).expect("client");
    let line = wait_for(Duration::from_secs(10), || {
        lab.log(client)
            .lines()
            .find(|l| l.contains("rejected the credentials"))
            .map(str::to_string)
    })
    .expect("a log line about the rejected proxy credentials");
    assert!(
        line.contains(&format!("http://alice@{proxy_ip}:8888")),
        "names the proxy: {line}"
    );
    assert!(!line.contains("wrong"), "never logs the password: {line}");
}

fn start_nginx(lab: &mut Lab, grpc: bool, timeout: &str) -> ProcId {
    lab.start_nginx(&repo_file("docs/deploy-nginx.conf"), grpc, timeout)
        .expect("nginx")
}

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn behind_nginx_server(lab: &mut Lab, keepalive: Option<&str>) -> ProcId {
    let extra = ConfigExtra {
        server: BEHIND_NGINX.into(),
        vpn: keepalive
            .map(|k| format!("keepalive_interval = \"{k}\""))
            .unwrap_or_default(),
        ..Default::default()
    };
    let scfg = lab.server_config("server.toml", &extra).expect("cfg");
    lab.start_server(&scfg).expect("server")
}

#[test]
fn websocket_and_http2_pass_the_documented_nginx_recipe() {
    let _g = serial();
    let mut lab = Lab::new("n", 3).expect("lab");
    let server = behind_nginx_server(&mut lab, None);
    start_nginx(&mut lab, true, "60s");
    let clients = start_clients(&mut lab, &[mode("wss"), mode("h2"), mode("auto")]);
    let (a, b) = (lab.client_ns(0), lab.client_ns(1));
    assert!(
        lab.ping(&a, clients[1].1, 2),
        "wss client -> h2 client via nginx"
    );
    assert!(
        lab.ping(&b, clients[0].1, 2),
        "h2 client -> wss client via nginx"
    );
    let bps = lab.iperf3(&a, &b, clients[1].1, 2, 1).expect("iperf3");
    println!("through nginx, wss -> h2 client: {:.0} Mbit/s", bps / 1e6);
    // auto: raw TLS cannot pass nginx, h2 can.
    let auto_log = lab.log(clients[2].0);
    assert!(
        auto_log.contains("transport selected: h2"),
        "auto picks h2 behind nginx:\n{auto_log}"
    );
    // The server sees the real client address from X-Forwarded-For.
    let slog = lab.log(server);
    assert!(
        slog.contains(&format!("peer={}", lab.client_underlay(0))),
        "real client address logged:\n{slog}"
    );
}

#[test]
fn auto_falls_back_to_websocket_when_the_front_forwards_only_websocket() {
    let _g = serial();
    let mut lab = Lab::new("f", 1).expect("lab");
    behind_nginx_server(&mut lab, None);
    start_nginx(&mut lab, false, "60s");
    let clients = start_clients(&mut lab, &[mode("auto")]);
    let log = lab.log(clients[0].0);
    assert!(
        log.contains("transport selected: wss"),
        "ends on wss:\n{log}"
    );
    assert!(
        log.contains("transport=tls") && log.contains("transport=h2"),
        "tried tls and h2 first and said why:\n{log}"
    );
    let state = std::fs::read_to_string(lab.dir().join("client0.toml.transport-state"))
        .expect("state file");
    assert!(
        state.contains("transport = \"wss\"") && state.contains("client_id = "),
        "remembers the winner and keeps its client id: {state}"
    );
    assert!(lab.ping(&lab.client_ns(0), SERVER_TUNNEL_IP, 2));
}

#[test]
fn an_idle_session_outlives_nginx_timeouts_through_keepalives() {
    let _g = serial();
    let mut lab = Lab::new("i", 2).expect("lab");
    behind_nginx_server(&mut lab, Some("1s"));
    start_nginx(&mut lab, true, "3s");
    let clients = start_clients(&mut lab, &[mode("wss"), mode("h2")]);
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        lab.ping(&lab.client_ns(0), clients[1].1, 2),
        "still connected after 8s idle"
    );
    for (i, (id, _)) in clients.iter().enumerate() {
        let log = lab.log(*id);
        assert_eq!(
            log.matches("session ended").count(),
            0,
            "client {i} never lost its session:\n{log}"
        );
    }
}

#[test]
fn probes_get_an_ordinary_404_and_garbage_closes_only_that_connection() {
    let _g = serial();
    let mut lab = Lab::new("q", 2).expect("lab");
    let scfg = lab
        .server_config("server.toml", &ConfigExtra::default())
        .expect("cfg");
    let server = lab.start_server(&scfg).expect("server");
    let clients = start_clients(&mut lab, &[mode("tls"), mode("wss")]);
    let ns = lab.client_ns(0);
    for path in ["/", "/wp-login.php", "/tunnel"] {
        let url = format!("https://{SERVER_UNDERLAY}{path}");
        let out = lab
            .exec(&ns, &["curl", "-sk", "-D", "-", "--max-time", "5", &url])
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(
            text.starts_with("http/") && text.contains(" 404"),
            "{path}: {text}"
        );
        assert!(
            !text.contains("sallyport") && !text.contains("vpn"),
            "{path}: no hint: {text}"
        );
    }
    // Raw garbage on the TLS port: that connection is closed, nothing else.
    let garbage = format!(
        "exec 3<>/dev/tcp/{SERVER_UNDERLAY}/443; head -c 4096 /dev/urandom >&3; timeout 5 cat <&3 >/dev/null; echo closed"
    );
    let out = lab.exec(&ns, &["bash", "-c", &garbage]).expect("garbage");
    assert!(String::from_utf8_lossy(&out.stdout).contains("closed"));
    assert!(lab.ping(&ns, clients[1].1, 2), "sessions unaffected");
    assert!(
        lab.wait_exit(server, Duration::from_millis(10)).is_none(),
        "server still running"
    );
    // PROXY_UNDERLAY is unused here but part of the lab's address plan.
    let _ = PROXY_UNDERLAY;
}
