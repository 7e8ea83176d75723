//! The whole packet pipeline in memory: the client's stacks on each end, the
//! real server sessions and hub in the middle, in-memory tunnels between. No
//! TUN, no sockets: "inside" is a batch handed to a stack.

use std::net::Ipv4Addr;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sallyport_client::config::PipelineSection;
use sallyport_client::pipeline::{self, SessionTarget};
use sallyport_core::ip::build_ipv4;
use sallyport_core::message::{Auth, AuthResponse, Control, Token};
use sallyport_core::{Frame, PacketBatch};
use sallyport_middleware::compress::is_extension;
use sallyport_middleware::{Counters, Direction, DropReason, Rate, StatsHandle};
use sallyport_server::config::Credential;
use sallyport_server::hub::Hub;
use sallyport_server::pipeline::NewPipeline;
use sallyport_server::pool::IpPool;
use sallyport_server::session::{self, SessionConfig};
use sallyport_transports::{memory, Tunnel};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const MTU: u16 = 1420;

struct Server {
    hub: Arc<Hub>,
    cfg: Arc<SessionConfig>,
    _to_tun: mpsc::Receiver<PacketBatch>,
    shutdown: CancellationToken,
    ids: u64,
}

impl Server {
    /// Token "free" is unlimited; token "slow" is limited to `slow`.
    fn new(slow: Option<Rate>) -> Self {
        let subnet = "10.100.0.0/24".parse().expect("net");
        let (to_tun, rx) = mpsc::channel(16);
        let pool = IpPool::new(subnet, SERVER, Duration::from_secs(300));
        Self {
            hub: Arc::new(Hub::new(pool, subnet, SERVER, to_tun)),
            cfg: Arc::new(SessionConfig {
                credentials: vec![Credential::plain("free"), Credential::plain("slow")].into(),
                auth_timeout: Duration::from_secs(2),
                keepalive: Duration::from_secs(15),
                mtu: MTU,
                queue_len: 256,
                pipeline: NewPipeline {
                    anti_spoof: true,
                    stats: true,
                    compression_threshold: 128,
                    mtu: MTU,
                },
                compression: true,
                offload: true,
                rate_limits: vec![None, slow].into(),
                limits: Default::default(),
            }),
            _to_tun: rx,
            shutdown: CancellationToken::new(),
            ids: 0,
        }
    }

    fn counters(&self) -> &Counters {
        self.hub.stats()
    }
}

/// A client: its tunnel end, its assigned address and its two stacks.
struct Client<E, D> {
    tunnel: Tunnel,
    addr: Ipv4Addr,
    compression: bool,
    stats: StatsHandle,
    encap: E,
    decap: D,
}

async fn connect(
    srv: &mut Server,
    token: &str,
    offer_lz4: bool,
) -> Client<impl pipeline::PacketStack, impl pipeline::PacketStack> {
    let (mut tunnel, server_end) = memory::pair(256);
    srv.ids += 1;
    tokio::spawn(session::run(
        srv.hub.clone(),
        srv.cfg.clone(),
        server_end,
        srv.ids,
        srv.shutdown.clone(),
    ));
    let hello = Control::Auth(Auth {
        token: Token::new(token),
        client_id: None,
        compression: offer_lz4.then(|| vec!["lz4".into()]),
        offload: None,
    });
    tunnel.tx.send(hello.into()).await.expect("send auth");
    let resp: AuthResponse = match next_frame(&mut tunnel).await {
        Some(Frame::Control(b)) => match Control::decode(&b).expect("valid") {
            Control::AuthResponse(r) if r.success => r,
            other => panic!("refused: {other:?}"),
        },
        other => panic!("expected auth_response, got {other:?}"),
    };
    let compression = resp.compression.as_deref() == Some("lz4");
    assert_eq!(
        compression, offer_lz4,
        "the server accepts exactly what is offered"
    );
    let addr = resp.assigned_ip.expect("address");
    let stats = StatsHandle::global(Counters::new_shared());
    let (encap, decap) = pipeline::new_session(
        &PipelineSection::default(),
        &SessionTarget {
            addr,
            mtu: MTU,
            compression,
            stats: stats.clone(),
        },
    );
    Client {
        tunnel,
        addr,
        compression,
        stats,
        encap,
        decap,
    }
}

async fn next_frame(t: &mut Tunnel) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(2), t.rx.next())
        .await
        .expect("a frame within 2s")
        .map(|f| f.expect("ok frame"))
}

impl<E: pipeline::PacketStack, D: pipeline::PacketStack> Client<E, D> {
    /// Inside → outside: the packets through the encap stack onto the wire.
    /// Returns what was put on the wire.
    async fn send(&mut self, packets: &[Bytes]) -> Vec<Bytes> {
        let batch: PacketBatch = packets.iter().cloned().collect();
        let out = self
            .encap
            .ready()
            .await
            .expect("ready")
            .call(batch)
            .await
            .expect("encap");
        let wire: Vec<Bytes> = out.into_iter().collect();
        for p in &wire {
            self.tunnel
                .tx
                .feed(Frame::Packet(p.clone()))
                .await
                .expect("feed");
        }
        self.tunnel.tx.flush().await.expect("flush");
        wire
    }

    /// Outside → inside: the next `n` packet frames (control skipped), raw
    /// as on the wire, and what the decap stack makes of them.
    async fn recv(&mut self, n: usize) -> (Vec<Bytes>, Vec<Bytes>) {
        let mut wire = Vec::new();
        while wire.len() < n {
            match next_frame(&mut self.tunnel).await {
                Some(Frame::Packet(p)) => wire.push(p),
                Some(Frame::Control(_)) => continue,
                None => panic!("tunnel closed"),
            }
        }
        let batch: PacketBatch = wire.iter().cloned().collect();
        let inside = self
            .decap
            .ready()
            .await
            .expect("ready")
            .call(batch)
            .await
            .expect("decap");
        (wire, inside.into_iter().collect())
    }

    /// Whether any packet frame arrives within 300 ms.
    async fn nothing_arrives(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_millis(300), self.tunnel.rx.next()).await {
                Err(_) | Ok(None) => return true,
                Ok(Some(Ok(Frame::Control(_)))) => continue,
                Ok(Some(Ok(Frame::Packet(_)))) => return false,
                Ok(Some(Err(e))) => panic!("{e}"),
            }
        }
    }
}

fn compressible(src: Ipv4Addr, dst: Ipv4Addr) -> Bytes {
    let payload: Vec<u8> = b"all work and no play "
        .iter()
        .copied()
        .cycle()
        .take(1200)
        .collect();
    Bytes::from(build_ipv4(src, dst, 17, &payload))
}

fn incompressible(src: Ipv4Addr, dst: Ipv4Addr, seed: u32) -> Bytes {
    let mut x = 0x2545_f491u32 ^ seed;
    let payload: Vec<u8> = (0..1200)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    Bytes::from(build_ipv4(src, dst, 17, &payload))
}

#[tokio::test]
async fn compressible_and_incompressible_packets_round_trip_unchanged_with_lz4() {
    let mut srv = Server::new(None);
    let mut a = connect(&mut srv, "free", true).await;
    let mut b = connect(&mut srv, "free", true).await;
    let (ab, ba) = (a.addr, b.addr);
    let sent = vec![
        compressible(ab, ba),
        incompressible(ab, ba, 1),
        Bytes::from(build_ipv4(ab, ba, 17, b"tiny")),
        compressible(ab, ba),
    ];
    let wire = a.send(&sent).await;
    assert!(is_extension(&wire[0]) && wire[0].len() < sent[0].len() / 4);
    assert_eq!(wire[1], sent[1], "incompressible: sent raw");
    assert_eq!(wire[2], sent[2], "below the threshold: sent raw");
    let (b_wire, got) = b.recv(sent.len()).await;
    assert_eq!(got, sent, "every packet arrives unchanged, in order");
    assert!(
        is_extension(&b_wire[0]),
        "the server compresses towards b too"
    );

    // The server counted the wire bytes and the tunnel bytes both ways.
    let c = srv.counters();
    let tunnel: u64 = sent.iter().map(|p| p.len() as u64).sum();
    let from_a: u64 = wire.iter().map(|p| p.len() as u64).sum();
    assert_eq!(c.compress_in(Direction::Decap), from_a);
    assert_eq!(c.compress_out(Direction::Decap), tunnel);
    assert_eq!(c.bytes(Direction::Decap), from_a, "stats count wire bytes");
    assert!(c.compress_out(Direction::Encap) < c.compress_in(Direction::Encap));
    assert_eq!(c.packets(Direction::Encap), 4);
    assert!(a.compression && b.compression);
}

#[tokio::test]
async fn without_negotiation_the_wire_carries_the_original_packets_byte_for_byte() {
    let mut srv = Server::new(None);
    let mut a = connect(&mut srv, "free", false).await;
    let mut b = connect(&mut srv, "free", true).await;
    let sent = vec![
        compressible(a.addr, b.addr),
        incompressible(a.addr, b.addr, 2),
    ];
    let wire = a.send(&sent).await;
    assert_eq!(wire, sent, "a did not offer: raw IP packets on the wire");
    let (_, got) = b.recv(2).await;
    assert_eq!(got, sent);
    // And back from a compressing client to one that did not negotiate.
    let back = vec![compressible(b.addr, a.addr)];
    let b_wire = b.send(&back).await;
    assert!(is_extension(&b_wire[0]));
    let (a_wire, a_got) = a.recv(1).await;
    assert_eq!(a_wire, back, "the server sends a the original bytes");
    assert_eq!(a_got, back);
    // Only b's session has a decompressor: a's packets never pass one.
    assert_eq!(
        srv.counters().compress_in(Direction::Decap),
        b_wire[0].len() as u64
    );
}

#[tokio::test]
async fn a_forged_source_is_dropped_and_counted_by_the_clients_own_pipeline() {
    let mut srv = Server::new(None);
    let mut a = connect(&mut srv, "free", true).await;
    let mut b = connect(&mut srv, "free", true).await;
    let forged = compressible(Ipv4Addr::new(10, 100, 0, 99), b.addr);
    let wire = a.send(std::slice::from_ref(&forged)).await;
    assert!(wire.is_empty(), "nothing leaves the client");
    let c = a.stats.global_counters();
    assert_eq!(c.dropped(Direction::Encap, DropReason::Spoofed), 1);
    assert!(b.nothing_arrives().await);
    assert_eq!(srv.counters().dropped_total(DropReason::Spoofed), 0);
}

#[tokio::test]
async fn a_forged_source_from_a_modified_client_is_dropped_and_counted_by_the_server() {
    let mut srv = Server::new(None);
    let mut a = connect(&mut srv, "free", true).await;
    let mut b = connect(&mut srv, "free", true).await;
    // A client without its pipeline: compresses a forged packet itself.
    let forged = compressible(Ipv4Addr::new(10, 100, 0, 99), b.addr);
    let frame = sallyport_middleware::compress::compress_packet(&forged, &mut Default::default())
        .expect("compresses");
    a.tunnel.tx.send(Frame::Packet(frame)).await.expect("send");
    assert!(
        b.nothing_arrives().await,
        "the forged packet never reaches b"
    );
    let c = srv.counters();
    assert_eq!(c.dropped(Direction::Decap, DropReason::Spoofed), 1);
    assert_eq!(c.dropped_total(DropReason::DecompressFailed), 0);
    // The session goes on: a genuine packet still gets through.
    let ok = vec![compressible(a.addr, b.addr)];
    a.send(&ok).await;
    assert_eq!(b.recv(1).await.1, ok);
}

#[tokio::test]
async fn a_packet_for_another_address_is_not_written_to_the_tun() {
    let mut srv = Server::new(None);
    let mut a = connect(&mut srv, "free", false).await;
    let stray = Bytes::from(build_ipv4(SERVER, Ipv4Addr::new(10, 100, 0, 77), 1, b"x"));
    let mine = Bytes::from(build_ipv4(SERVER, a.addr, 1, b"y"));
    let out = a
        .decap
        .ready()
        .await
        .expect("ready")
        .call(vec![stray, mine.clone()].into())
        .await
        .expect("decap");
    assert_eq!(out.into_iter().collect::<Vec<_>>(), vec![mine]);
    assert_eq!(
        a.stats
            .global_counters()
            .dropped(Direction::Decap, DropReason::Spoofed),
        1
    );
}

#[tokio::test]
async fn a_rate_limited_session_loses_what_is_over_its_burst_and_others_do_not() {
    let rate = Rate::new(
        NonZeroU64::new(1_000).expect("nonzero"),
        NonZeroU64::new(5_000).expect("nonzero"),
    );
    let mut srv = Server::new(Some(rate));
    let mut slow = connect(&mut srv, "slow", false).await;
    let mut free = connect(&mut srv, "free", false).await;
    let mut peer = connect(&mut srv, "free", false).await;
    // Ten 1220-byte packets each: the slow session's 5000-byte burst lets
    // four through (the refill over this short test is far below a packet).
    let from_slow: Vec<Bytes> = (0..10)
        .map(|i| incompressible(slow.addr, peer.addr, i))
        .collect();
    slow.send(&from_slow).await;
    let (_, got) = peer.recv(4).await;
    assert_eq!(got, from_slow[..4].to_vec());
    assert!(peer.nothing_arrives().await);
    assert_eq!(
        srv.counters()
            .dropped(Direction::Decap, DropReason::RateLimited),
        6
    );
    let from_free: Vec<Bytes> = (0..10)
        .map(|i| incompressible(free.addr, peer.addr, i))
        .collect();
    free.send(&from_free).await;
    assert_eq!(
        peer.recv(10).await.1,
        from_free,
        "the unlimited session loses nothing"
    );
}
