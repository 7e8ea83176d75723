//! Two sessions through the hub over the in-memory transport: real session
//! and routing code, no sockets, no TUN.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sallyport_core::ip::build_ipv4;
use sallyport_core::message::{Auth, Control, Reconnect, Token};
use sallyport_core::{Frame, PacketBatch};
use sallyport_middleware::{Direction, DropReason};
use sallyport_server::config::Credential;
use sallyport_server::hub::Hub;
use sallyport_server::leases::LeaseFile;
use sallyport_server::pipeline::NewPipeline;
use sallyport_server::pool::IpPool;
use sallyport_server::session::{self, SessionConfig, SessionLimits};
use sallyport_transports::{memory, Tunnel};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);

struct Fixture {
    hub: Arc<Hub>,
    cfg: Arc<SessionConfig>,
    from_hub_to_tun: mpsc::Receiver<PacketBatch>,
    shutdown: CancellationToken,
    next_id: u64,
}

impl Fixture {
    fn new() -> Self {
        Self::with_all(vec![Credential::plain("good")], 0, SessionLimits::default())
    }

    /// A fixture accepting `credentials`, identified leases lasting a day.
    fn with(credentials: Vec<Credential>) -> Self {
        Self::with_all(credentials, 0, SessionLimits::default())
    }

    fn with_limits(max_sessions_per_token: usize, limits: SessionLimits) -> Self {
        Self::with_all(
            vec![Credential::plain("good")],
            max_sessions_per_token,
            limits,
        )
    }

    fn with_all(
        credentials: Vec<Credential>,
        max_sessions_per_token: usize,
        limits: SessionLimits,
    ) -> Self {
        let subnet = "10.100.0.0/24".parse().expect("net");
        let (to_tun, from_hub_to_tun) = mpsc::channel(16);
        let pool = IpPool::new(subnet, SERVER, Duration::from_secs(300))
            .with_lease_time(Duration::from_secs(86_400));
        let n = credentials.len();
        Self {
            hub: Arc::new(
                Hub::new(pool, subnet, SERVER, to_tun)
                    .with_max_sessions_per_token(max_sessions_per_token),
            ),
            cfg: Arc::new(SessionConfig {
                credentials: credentials.into(),
                auth_timeout: Duration::from_secs(2),
                keepalive: Duration::from_secs(15),
                mtu: 1420,
                queue_len: 64,
                pipeline: NewPipeline {
                    anti_spoof: true,
                    stats: true,
                    compression_threshold: 128,
                    mtu: 1420,
                },
                compression: true,
                offload: true,
                rate_limits: vec![None; n].into(),
                limits,
            }),
            from_hub_to_tun,
            shutdown: CancellationToken::new(),
            next_id: 1,
        }
    }

    /// Opens a session; returns the client end.
    fn open(&mut self) -> Tunnel {
        self.open_from(None)
    }

    /// Opens a session that seems to come from `peer`.
    fn open_from(&mut self, peer: Option<std::net::SocketAddr>) -> Tunnel {
        let (client, mut server) = memory::pair(64);
        server.info.peer = peer;
        self.next_id += 1;
        tokio::spawn(session::run(
            self.hub.clone(),
            self.cfg.clone(),
            server,
            self.next_id,
            self.shutdown.clone(),
        ));
        client
    }

    async fn connect(&mut self, hello: Control) -> (Tunnel, Control) {
        let mut t = self.open();
        t.tx.send(hello.into()).await.expect("send hello");
        let reply = next_control(&mut t).await;
        (t, reply)
    }

    async fn authed(&mut self) -> (Tunnel, Ipv4Addr) {
        let (t, reply) = self.connect(auth("good")).await;
        match reply {
            Control::AuthResponse(r) if r.success => (t, r.assigned_ip.expect("ip")),
            other => panic!("auth failed: {other:?}"),
        }
    }
}

fn auth(token: &str) -> Control {
    auth_as(token, None)
}

fn auth_as(token: &str, client_id: Option<&str>) -> Control {
    Control::Auth(Auth {
        token: Token::new(token),
        client_id: client_id.map(Into::into),
        compression: None,
        offload: None,
    })
}

fn assigned(reply: Control) -> Ipv4Addr {
    match reply {
        Control::AuthResponse(r) if r.success => r.assigned_ip.expect("ip"),
        other => panic!("auth failed: {other:?}"),
    }
}

fn named(name: &str, token: &str) -> Credential {
    Credential {
        name: Some(name.into()),
        ..Credential::plain(token)
    }
}

#[tokio::test]
async fn identities_get_their_old_addresses_after_a_restart_in_any_order() {
    let dir = std::env::temp_dir().join(format!("sallyport-hub-leases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = LeaseFile::new(dir.join("leases.json"));
    let creds = || vec![Credential::plain("good"), named("alice", "alice-token")];
    // alice by name; two machines sharing the token "good", by client id.
    let hellos = [
        ("alice-token", None),
        ("good", Some("machine-one")),
        ("good", Some("machine-two")),
    ];
    let mut before = Fixture::with(creds());
    let mut old = Vec::new();
    let mut tunnels = Vec::new();
    for (token, id) in hellos {
        let (t, reply) = before.connect(auth_as(token, id)).await;
        old.push(assigned(reply));
        tunnels.push(t);
    }
    file.save(&before.hub.lease_snapshot()).expect("save");
    let text = std::fs::read_to_string(file.path()).expect("read");
    assert!(
        !text.contains("good") && !text.contains("alice-token") && !text.contains("machine-"),
        "no token or raw client id in the file: {text}"
    );
    before.shutdown.cancel();
    drop(tunnels);

    // The restarted server: a stranger first, asking for machine-one's
    // address, then the three in reverse order, none asking for anything.
    let mut after = Fixture::with(creds());
    assert_eq!(after.hub.restore_leases(&file.load()), 3);
    let (_s, reply) = after
        .connect(Control::Reconnect(Reconnect {
            token: Token::new("good"),
            previous_ip: old[1],
            client_id: Some("someone-else".into()),
            compression: None,
            offload: None,
        }))
        .await;
    let stranger = assigned(reply);
    assert!(!old.contains(&stranger), "{stranger} is someone's lease");
    let mut keep = Vec::new();
    for (i, (token, id)) in hellos.iter().enumerate().rev() {
        let (t, reply) = after.connect(auth_as(token, *id)).await;
        assert_eq!(assigned(reply), old[i], "client {i} ({token}, {id:?})");
        keep.push(t);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_new_session_of_a_named_client_replaces_its_live_one_at_once() {
    let mut f = Fixture::with(vec![named("alice", "alice-token")]);
    let (mut first, ip) = {
        let (t, r) = f.connect(auth("alice-token")).await;
        (t, assigned(r))
    };
    // A fresh process of the same client: no previous_ip, no client id.
    let (_second, reply) = f.connect(auth("alice-token")).await;
    assert_eq!(assigned(reply), ip);
    // The old session is closed now, not after a keepalive timeout.
    let closed = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match first.rx.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the replaced session is closed at once");
    assert_eq!(f.hub.sessions(), 1);
}

async fn next_frame(t: &mut Tunnel) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(2), t.rx.next())
        .await
        .expect("frame within 2s")
        .map(|f| f.expect("ok frame"))
}

async fn next_control(t: &mut Tunnel) -> Control {
    match next_frame(t).await {
        Some(Frame::Control(b)) => Control::decode(&b).expect("valid control"),
        other => panic!("expected control, got {other:?}"),
    }
}

/// The next packet, skipping control messages (pings).
async fn next_packet(t: &mut Tunnel) -> Option<Bytes> {
    loop {
        match tokio::time::timeout(Duration::from_millis(300), t.rx.next()).await {
            Err(_) | Ok(None) => return None,
            Ok(Some(Ok(Frame::Packet(p)))) => return Some(p),
            Ok(Some(Ok(Frame::Control(_)))) => continue,
            Ok(Some(Err(e))) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn a_packet_from_a_to_b_arrives_unchanged() {
    let mut f = Fixture::new();
    let (mut a, ip_a) = f.authed().await;
    let (mut b, ip_b) = f.authed().await;
    assert_eq!(
        (ip_a, ip_b),
        (
            "10.100.0.2".parse().expect("ip"),
            "10.100.0.3".parse().expect("ip")
        )
    );
    let pkt = build_ipv4(ip_a, ip_b, 17, b"hello b");
    a.tx.send(Frame::Packet(Bytes::from(pkt.clone())))
        .await
        .expect("send");
    assert_eq!(next_packet(&mut b).await.as_deref(), Some(&pkt[..]));
    assert!(
        f.from_hub_to_tun.try_recv().is_err(),
        "client-to-client never touches the TUN"
    );
}

#[tokio::test]
async fn a_spoofed_packet_is_dropped_and_counted() {
    let mut f = Fixture::new();
    let (mut a, _ip_a) = f.authed().await;
    let (mut b, ip_b) = f.authed().await;
    let forged = build_ipv4(Ipv4Addr::new(10, 100, 0, 99), ip_b, 17, b"forged");
    a.tx.send(Frame::Packet(Bytes::from(forged)))
        .await
        .expect("send");
    assert_eq!(
        next_packet(&mut b).await,
        None,
        "forged packet not delivered"
    );
    assert_eq!(
        f.hub.stats().dropped(Direction::Decap, DropReason::Spoofed),
        1
    );
}

#[tokio::test]
async fn packets_for_the_server_or_outside_go_to_the_tun_and_unknown_peers_are_dropped() {
    let mut f = Fixture::new();
    let (mut a, ip_a) = f.authed().await;
    let to_server = build_ipv4(ip_a, SERVER, 1, b"ping server");
    let to_internet = build_ipv4(ip_a, Ipv4Addr::new(198, 18, 1, 1), 6, b"out");
    let to_nobody = build_ipv4(ip_a, Ipv4Addr::new(10, 100, 0, 200), 17, b"nobody");
    for p in [&to_server, &to_internet, &to_nobody] {
        a.tx.feed(Frame::Packet(Bytes::from(p.clone())))
            .await
            .expect("feed");
    }
    a.tx.flush().await.expect("flush");
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(2), f.from_hub_to_tun.recv())
            .await
            .expect("to tun")
            .expect("open");
        got.extend(batch.into_iter().map(|p| p.to_vec()));
    }
    assert_eq!(got, vec![to_server, to_internet]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        f.hub.stats().dropped(Direction::Decap, DropReason::NoRoute),
        1
    );
}

#[tokio::test]
async fn a_packet_from_the_tun_reaches_the_owning_client() {
    let mut f = Fixture::new();
    let (mut a, ip_a) = f.authed().await;
    let pkt = build_ipv4(SERVER, ip_a, 1, b"from server");
    let mut batch = PacketBatch::new();
    batch.push(Bytes::from(pkt.clone()));
    f.hub.route_from_tun(&mut batch);
    assert_eq!(next_packet(&mut a).await.as_deref(), Some(&pkt[..]));
}

#[tokio::test]
async fn a_bad_token_is_refused_and_the_connection_closed() {
    let mut f = Fixture::new();
    let (mut t, reply) = f.connect(auth("bad")).await;
    match reply {
        Control::AuthResponse(r) => {
            assert!(!r.success);
            assert_eq!(r.error.as_deref(), Some("auth_failed"));
            assert_eq!(r.assigned_ip, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(next_frame(&mut t).await, None, "closed after refusal");
}

#[tokio::test]
async fn a_packet_before_auth_is_refused() {
    let mut f = Fixture::new();
    let mut t = f.open();
    t.tx.send(Frame::Packet(Bytes::from_static(b"\x45")))
        .await
        .expect("send");
    match next_control(&mut t).await {
        Control::AuthResponse(r) => assert_eq!(
            (r.success, r.error.as_deref()),
            (false, Some("auth_required"))
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(next_frame(&mut t).await, None);
}

#[tokio::test]
async fn a_first_message_of_an_unknown_type_is_auth_required() {
    let mut f = Fixture::new();
    let mut t = f.open();
    t.tx.send(Frame::Control(Bytes::from_static(br#"{"type":"hello"}"#)))
        .await
        .expect("send");
    match next_control(&mut t).await {
        Control::AuthResponse(r) => assert_eq!(
            (r.success, r.error.as_deref()),
            (false, Some("auth_required"))
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(next_frame(&mut t).await, None);
}

#[tokio::test]
async fn reconnect_gets_the_previous_address_back() {
    let mut f = Fixture::new();
    let (a, ip_a) = f.authed().await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_b, _ip_b) = f.authed().await;
    let (_a2, reply) = f
        .connect(Control::Reconnect(Reconnect {
            token: Token::new("good"),
            previous_ip: ip_a,
            client_id: None,
            compression: None,
            offload: None,
        }))
        .await;
    match reply {
        Control::AuthResponse(r) => assert_eq!(r.assigned_ip, Some(ip_a)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let mut f = Fixture::new();
    let (mut a, _) = f.authed().await;
    a.tx.send(Control::Ping(sallyport_core::message::Ping { seq: Some(7) }).into())
        .await
        .expect("send");
    match next_control(&mut a).await {
        Control::Pong(p) => assert_eq!(p.seq, Some(7)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn invalid_json_ends_only_that_session() {
    let mut f = Fixture::new();
    let (mut a, ip_a) = f.authed().await;
    let (mut b, ip_b) = f.authed().await;
    a.tx.send(Frame::Control(Bytes::from_static(b"{not json")))
        .await
        .expect("send");
    assert_eq!(next_packet(&mut a).await, None);
    // b still works with a fresh session c.
    let (mut c, ip_c) = f.authed().await;
    assert_ne!(ip_c, ip_a, "a's address is held for it");
    let pkt = build_ipv4(ip_c, ip_b, 17, b"still here");
    c.tx.send(Frame::Packet(Bytes::from(pkt.clone())))
        .await
        .expect("send");
    assert_eq!(next_packet(&mut b).await.as_deref(), Some(&pkt[..]));
}

fn reconnect(previous_ip: Ipv4Addr, client_id: &str) -> Control {
    Control::Reconnect(Reconnect {
        token: Token::new("good"),
        previous_ip,
        client_id: Some(client_id.into()),
        compression: None,
        offload: None,
    })
}

fn refusal(reply: &Control) -> Option<&str> {
    match reply {
        Control::AuthResponse(r) if !r.success => r.error.as_deref(),
        _ => None,
    }
}

#[tokio::test]
async fn a_token_at_its_session_limit_is_refused_but_its_client_may_replace_its_own_session() {
    let mut f = Fixture::with_limits(2, SessionLimits::default());
    let ip = Ipv4Addr::new(10, 100, 0, 2);
    let (mut a, r) = f.connect(reconnect(ip, "laptop")).await;
    assert!(
        matches!(&r, Control::AuthResponse(r) if r.assigned_ip == Some(ip)),
        "{r:?}"
    );
    let (_b, _) = f.authed().await;
    let (mut c, r) = f.connect(auth("good")).await;
    assert_eq!(refusal(&r), Some("too_many_sessions"), "{r:?}");
    assert_eq!(next_frame(&mut c).await, None, "refused connection closed");
    assert_eq!(
        f.hub
            .limits()
            .token_sessions_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The laptop comes back before its stale session timed out: it replaces it.
    let (_a2, r) = f.connect(reconnect(ip, "laptop")).await;
    assert!(
        matches!(&r, Control::AuthResponse(r) if r.success && r.assigned_ip == Some(ip)),
        "{r:?}"
    );
    assert_eq!(
        next_packet(&mut a).await,
        None,
        "the stale session is closed"
    );
    // Still two sessions: no room for a third client.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_d, r) = f.connect(auth("good")).await;
    assert_eq!(refusal(&r), Some("too_many_sessions"), "{r:?}");
    assert_eq!(f.hub.sessions(), 2);
}

#[tokio::test]
async fn a_source_that_keeps_failing_auth_is_closed_unread_and_others_are_not() {
    let limits = SessionLimits::new(None, 2, 64, 0);
    let mut f = Fixture::with_limits(0, limits);
    let bad: std::net::SocketAddr = "198.18.0.10:40000".parse().expect("addr");
    let good: std::net::SocketAddr = "198.18.0.11:40000".parse().expect("addr");
    for _ in 0..2 {
        let mut t = f.open_from(Some(bad));
        t.tx.send(auth("wrong").into()).await.expect("send");
        assert_eq!(refusal(&next_control(&mut t).await), Some("auth_failed"));
    }
    // Throttled: closed before anything is read, even with the right token.
    let mut t = f.open_from(Some(bad));
    let _ = t.tx.send(auth("good").into()).await;
    assert_eq!(next_frame(&mut t).await, None);
    let limits = f.hub.limits();
    assert_eq!(
        limits
            .auth_throttled
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        limits
            .auth_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let mut t = f.open_from(Some(good));
    t.tx.send(auth("good").into()).await.expect("send");
    assert!(matches!(next_control(&mut t).await, Control::AuthResponse(r) if r.success));
}

#[tokio::test]
async fn tunnels_waiting_for_auth_are_bounded_by_max_unauthenticated() {
    let mut f = Fixture::with_limits(0, SessionLimits::new(None, 0, 2, 0));
    let _silent1 = f.open();
    let _silent2 = f.open();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = f.open();
    assert_eq!(next_frame(&mut third).await, None, "closed unread");
    assert_eq!(
        f.hub
            .limits()
            .unauthenticated_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn an_idle_session_is_closed_while_pings_alone_do_not_keep_it_and_packets_do() {
    let idle = Duration::from_millis(400);
    let mut f = Fixture::with_limits(0, SessionLimits::new(Some(idle), 0, 64, 0));
    let (mut quiet, _) = f.authed().await;
    let (mut busy, ip_busy) = f.authed().await;
    let started = std::time::Instant::now();
    // `busy` sends a packet to the server every 100 ms; `quiet` only pings.
    let mut closed_at = None;
    while started.elapsed() < Duration::from_millis(1200) {
        let p = build_ipv4(ip_busy, SERVER, 17, b"tick");
        busy.tx
            .send(Frame::Packet(Bytes::from(p)))
            .await
            .expect("busy sends");
        if closed_at.is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if quiet
            .tx
            .send(Control::Ping(sallyport_core::message::Ping { seq: None }).into())
            .await
            .is_err()
        {
            closed_at.get_or_insert(started.elapsed());
            continue;
        }
        if let Ok(None) = tokio::time::timeout(Duration::from_millis(100), quiet.rx.next()).await {
            closed_at.get_or_insert(started.elapsed());
        }
        while f.from_hub_to_tun.try_recv().is_ok() {}
    }
    let closed_at = closed_at.expect("quiet session closed by idle_timeout");
    assert!(closed_at >= idle, "not before the timeout: {closed_at:?}");
    assert_eq!(
        f.hub
            .limits()
            .idle_closed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(f.hub.sessions(), 1, "the busy session is still there");
}

#[tokio::test]
async fn one_source_cannot_take_every_slot_waiting_for_auth() {
    let mut f = Fixture::with_limits(0, SessionLimits::new(None, 0, 64, 2));
    let greedy: std::net::SocketAddr = "198.18.0.10:40000".parse().expect("addr");
    let other: std::net::SocketAddr = "198.18.0.11:40000".parse().expect("addr");
    let _silent1 = f.open_from(Some(greedy));
    let _silent2 = f.open_from(Some(greedy));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = f.open_from(Some(greedy));
    assert_eq!(next_frame(&mut third).await, None, "closed unread");
    let mut t = f.open_from(Some(other));
    t.tx.send(auth("good").into()).await.expect("send");
    assert!(matches!(next_control(&mut t).await, Control::AuthResponse(r) if r.success));
}
