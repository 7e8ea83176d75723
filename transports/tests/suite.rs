//! One suite every transport must pass, over real TLS on loopback through
//! the real one-port listener: single packet, full batch, MTU-sized packet,
//! order, control messages, close, and a transfer far larger than any
//! flow-control window in both directions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sallyport_core::{Frame, MAX_BATCH};
use sallyport_transports::dial::{dialer, ClientSettings};
use sallyport_transports::listener::{Listener, ListenerConfig};
use sallyport_transports::tls::ClientTrust;
use sallyport_transports::{TransportKind, Tunnel};

const KINDS: [TransportKind; 3] = [
    TransportKind::WebSocket,
    TransportKind::Http2,
    TransportKind::RawTls,
];

struct Setup {
    listener: Listener,
    ca: tempfile_path::Path,
    _dir: tempfile_path::Dir,
}

mod tempfile_path {
    pub type Path = std::path::PathBuf;
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn certs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("sign");
    let paths = (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("write");
    std::fs::write(&paths.1, cert.pem()).expect("write");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write");
    paths
}

async fn setup(plain: bool) -> Setup {
    setup_with(plain, None).await
}

async fn setup_with(plain: bool, static_page: Option<&'static str>) -> Setup {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sallyport-suite-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let (ca, cert, key) = certs(&dir);
    let tls = sallyport_transports::tls::server_config(&cert, &key, &[]).expect("tls");
    let listener = Listener::bind(ListenerConfig {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        plain_addr: plain.then(|| "127.0.0.1:0".parse().expect("addr")),
        tls: Arc::new(tls),
        path: "/tunnel".into(),
        max_frame: 65_535,
        handshake_timeout: Duration::from_secs(5),
        max_pending: 16,
        max_pending_per_source: 0,
        trusted_proxies: vec![],
        static_page: static_page.map(|p| Bytes::from_static(p.as_bytes())),
    })
    .await
    .expect("bind");
    Setup {
        listener,
        ca,
        _dir: tempfile_path::Dir(dir),
    }
}

fn settings(url: String, ca: &std::path::Path) -> ClientSettings {
    ClientSettings {
        url,
        trust: ClientTrust {
            ca_file: Some(ca.to_path_buf()),
            ..Default::default()
        },
        proxy: Some("none".into()),
        sni: Some("localhost".into()),
        host_header: None,
        max_frame: 65_535,
        timeout: Duration::from_secs(5),
    }
}

async fn connect(s: &mut Setup, kind: TransportKind) -> (Tunnel, Tunnel) {
    let addr: SocketAddr = s.listener.local_addr();
    let d = dialer(
        kind,
        &settings(format!("wss://127.0.0.1:{}/tunnel", addr.port()), &s.ca),
    )
    .expect("dialer");
    let (client, server) = tokio::join!(d.dial(), s.listener.accept());
    let client = client.unwrap_or_else(|e| panic!("{kind}: dial: {e}"));
    let server = server.expect("accepted");
    assert_eq!(server.info.transport, kind);
    (client, server)
}

fn packet(i: u32, len: usize) -> Frame {
    let mut v = vec![(i % 251) as u8; len.max(4)];
    v[..4].copy_from_slice(&i.to_be_bytes());
    Frame::Packet(Bytes::from(v))
}

async fn next(t: &mut Tunnel) -> Frame {
    tokio::time::timeout(Duration::from_secs(10), t.rx.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok")
}

#[tokio::test]
async fn single_packet_and_control_messages_cross_both_ways() {
    let mut s = setup(false).await;
    for kind in KINDS {
        let (mut c, mut sv) = connect(&mut s, kind).await;
        let ctl = Frame::Control(Bytes::from_static(br#"{"type":"ping"}"#));
        c.tx.send(ctl.clone()).await.expect("send");
        assert_eq!(next(&mut sv).await, ctl, "{kind}");
        sv.tx.send(packet(7, 60)).await.expect("send");
        assert_eq!(next(&mut c).await, packet(7, 60), "{kind}");
    }
}

#[tokio::test]
async fn a_full_batch_of_mtu_sized_packets_arrives_in_order() {
    let mut s = setup(false).await;
    for kind in KINDS {
        let (mut c, mut sv) = connect(&mut s, kind).await;
        for i in 0..MAX_BATCH as u32 {
            c.tx.feed(packet(i, 1420)).await.expect("feed");
        }
        c.tx.flush().await.expect("flush");
        for i in 0..MAX_BATCH as u32 {
            assert_eq!(next(&mut sv).await, packet(i, 1420), "{kind} #{i}");
        }
        // A packet as large as the frame limit allows.
        sv.tx.send(packet(1, 65_535)).await.expect("send");
        assert_eq!(next(&mut c).await, packet(1, 65_535), "{kind}");
    }
}

#[tokio::test]
async fn closing_one_end_ends_the_other_ends_stream() {
    let mut s = setup(false).await;
    for kind in KINDS {
        let (mut c, mut sv) = connect(&mut s, kind).await;
        c.tx.send(packet(1, 100)).await.expect("send");
        c.tx.close().await.expect("close");
        assert_eq!(next(&mut sv).await, packet(1, 100));
        let end = tokio::time::timeout(Duration::from_secs(5), sv.rx.next())
            .await
            .expect("in time");
        assert!(
            end.is_none() || end.is_some_and(|r| r.is_err()),
            "{kind}: stream ends"
        );
    }
}

#[tokio::test]
async fn transfers_far_larger_than_the_flow_control_window_complete_both_ways() {
    let mut s = setup(false).await;
    // 32 MiB each way: 8 times the HTTP/2 stream window.
    const N: u32 = 32 * 1024 * 1024 / 1400;
    for kind in KINDS {
        let (c, sv) = connect(&mut s, kind).await;
        let (mut ctx, crx) = (c.tx, c.rx);
        let (mut stx, srx) = (sv.tx, sv.rx);
        let up = tokio::spawn(async move {
            for i in 0..N {
                ctx.feed(packet(i, 1400)).await.expect("feed");
                if i % 32 == 31 {
                    ctx.flush().await.expect("flush");
                }
            }
            ctx.flush().await.expect("flush");
        });
        let down = tokio::spawn(async move {
            for i in 0..N {
                stx.feed(packet(i, 1400)).await.expect("feed");
                if i % 32 == 31 {
                    stx.flush().await.expect("flush");
                }
            }
            stx.flush().await.expect("flush");
        });
        let recv = |mut rx: sallyport_transports::FrameStream| async move {
            for i in 0..N {
                let f = tokio::time::timeout(Duration::from_secs(20), rx.next())
                    .await
                    .expect("in time")
                    .expect("open")
                    .expect("ok");
                assert_eq!(f, packet(i, 1400));
            }
        };
        tokio::join!(recv(srx), recv(crx));
        up.await.expect("up");
        down.await.expect("down");
        eprintln!("{kind}: 2 x {} MiB ok", N as usize * 1400 / (1024 * 1024));
    }
}

#[tokio::test]
async fn websocket_and_h2c_work_on_the_plain_port() {
    let mut s = setup(true).await;
    let plain = s.listener.plain_addr().expect("plain");
    for kind in [TransportKind::WebSocket, TransportKind::Http2] {
        let d = dialer(
            kind,
            &settings(format!("ws://127.0.0.1:{}/tunnel", plain.port()), &s.ca),
        )
        .expect("dialer");
        let (c, sv) = tokio::join!(d.dial(), s.listener.accept());
        let (mut c, mut sv) = (
            c.unwrap_or_else(|e| panic!("{kind}: {e}")),
            sv.expect("accepted"),
        );
        c.tx.send(packet(3, 500)).await.expect("send");
        assert_eq!(next(&mut sv).await, packet(3, 500), "{kind}");
        sv.tx.send(packet(4, 500)).await.expect("send");
        assert_eq!(next(&mut c).await, packet(4, 500), "{kind}");
    }
}

#[tokio::test]
async fn the_wrong_path_is_an_ordinary_404_for_every_transport() {
    let s = setup(false).await;
    let addr = s.listener.local_addr();
    for kind in [TransportKind::WebSocket, TransportKind::Http2] {
        let d = dialer(
            kind,
            &settings(format!("wss://127.0.0.1:{}/elsewhere", addr.port()), &s.ca),
        )
        .expect("dialer");
        // HTTP/2 learns the answer when it first reads (fronts may hold the
        // response headers back until there is data).
        let e = match d.dial().await {
            Err(e) => e.to_string(),
            Ok(mut t) => match tokio::time::timeout(Duration::from_secs(5), t.rx.next()).await {
                Ok(Some(Err(e))) => e.to_string(),
                other => panic!("{kind}: a tunnel at the wrong path: {other:?}"),
            },
        };
        assert!(e.contains("404"), "{kind}: {e}");
    }
}

/// GET `path` over TLS (ALPN http/1.1); status and body.
async fn https_get(s: &Setup, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let cfg = sallyport_transports::tls::client_config(
        &ClientTrust {
            ca_file: Some(s.ca.clone()),
            ..Default::default()
        },
        &[],
    )
    .expect("tls");
    let port = s.listener.local_addr().port();
    let connector = sallyport_transports::connect::Connector::new(
        "127.0.0.1".into(),
        port,
        None,
        Some((Arc::new(cfg), "localhost".into())),
    )
    .expect("connector");
    let (io, _, _) = connector.connect(b"http/1.1").await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .expect("http1");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("req");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn probes_get_the_static_page_when_one_is_configured_else_404() {
    let page = "<html><body>Welcome to nginx!</body></html>";
    let with_page = setup_with(false, Some(page)).await;
    for path in ["/", "/index.html", "/tunnel"] {
        assert_eq!(
            https_get(&with_page, path).await,
            (200, page.to_string()),
            "{path}"
        );
    }
    let without = setup(false).await;
    for path in ["/", "/tunnel"] {
        let (status, body) = https_get(&without, path).await;
        assert_eq!(status, 404, "{path}");
        assert!(!body.to_lowercase().contains("sallyport") && !body.to_lowercase().contains("vpn"));
    }
}

/// A minimal HTTP CONNECT proxy on loopback: one tunnel per connection.
async fn connect_proxy() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
                    if c.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let Some(target) = text.split_whitespace().nth(1) else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                if c.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_pinned_key_is_trusted_by_every_transport_direct_and_through_a_proxy() {
    let mut s = setup(false).await;
    let cert_file = s.ca.with_file_name("server.crt");
    let cert = sallyport_transports::tls::load_certs(&cert_file).expect("cert");
    let pin = sallyport_transports::tls::spki_sha256(&cert[0]).expect("pin");
    let (proxy, proxy_task) = connect_proxy().await;
    let port = s.listener.local_addr().port();
    for via in [None, Some(format!("http://{proxy}"))] {
        for kind in KINDS {
            let mut st = settings(format!("wss://127.0.0.1:{port}/tunnel"), &s.ca);
            // No CA and a name the certificate does not have: only the pin.
            st.trust = ClientTrust {
                pins: vec![[9u8; 32], pin],
                ..Default::default()
            };
            st.sni = Some("not-the-cert-name.example".into());
            st.proxy = via.clone().or(Some("none".into()));
            let d = dialer(kind, &st).expect("dialer");
            let (client, server) = tokio::join!(d.dial(), s.listener.accept());
            let (mut client, mut server) = (
                client.unwrap_or_else(|e| panic!("{kind} via {via:?}: {e}")),
                server.expect("accepted"),
            );
            client.tx.send(packet(1, 100)).await.expect("send");
            assert_eq!(
                next(&mut server).await,
                packet(1, 100),
                "{kind} via {via:?}"
            );

            st.trust.pins = vec![[9u8; 32]];
            let d = dialer(kind, &st).expect("dialer");
            let e = match d.dial().await {
                Ok(_) => panic!("{kind} via {via:?}: a wrong pin was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains("matches no server.pin_sha256"),
                "{kind} via {via:?}: {e}"
            );
        }
    }
    proxy_task.abort();
}
