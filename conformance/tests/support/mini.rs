//! A small Sallyport server written for these tests only, into which a test
//! injects faults. With no fault it follows docs/PROTOCOL.md (the suite must
//! find nothing wrong with it); each fault breaks one statement, and the
//! tests assert that exactly the checks of that statement fail.
//!
//! It shares nothing with the real server but the listener (TLS, WebSocket
//! upgrade, 404s and the frame limit) and the core's message types.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use ipnet::Ipv4Net;
use sallyport_core::ip::IpHeader;
use sallyport_core::Frame;
use sallyport_transports::{FrameSink, Tunnel};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{kernel_echo_reply, Certs, AUTH_TIMEOUT, KEEPALIVE, MTU, TOKEN, TOKEN2};

/// One deliberate deviation from docs/PROTOCOL.md each.
#[derive(Debug, Default, Clone, Copy)]
pub struct Faults {
    /// [R1]: packets are routed whatever their source address.
    pub no_source_check: bool,
    /// [H1]/[A1]: `server_ip` is in the pool, and is the first address given.
    pub hands_out_server_ip: bool,
    /// [K1]: `ping` is never answered.
    pub never_pongs: bool,
    /// [H3]: a connection that never authenticates is kept forever.
    pub no_auth_timeout: bool,
    /// [R4]: a packet for an address nobody holds goes to every other session.
    pub floods_unknown_destination: bool,
    /// [A3]: a closed session's address is free at once.
    pub no_address_hold: bool,
    /// [R7]: packets for a slow client wait for room in its queue.
    pub blocking_queue: bool,
    /// [E2]: an unknown message type ends the session.
    pub closes_on_unknown_type: bool,
    /// [H4]: an unknown type as the first message is `invalid_message`.
    pub unknown_first_is_invalid: bool,
    /// [K1]/[K2]: no pings sent, silence never ends a session.
    pub no_keepalive: bool,
    /// [C1]/[C2]: every successful auth_response says `"compression":"lz4"`,
    /// offered or not (packets are compressed only for those that offered).
    pub answers_unoffered_compression: bool,
    /// [C1]/[C3]: a packet that came as an lz4 frame is routed by what is
    /// inside, but the frame itself is forwarded, also to clients that did
    /// not negotiate compression.
    pub forwards_lz4_frames: bool,
    /// [C4]: lz4 frames are decompressed whatever their tag and stated
    /// length say.
    pub lax_lz4_lengths: bool,
    /// [C5]: the source check is made on the frame, before decompressing, so
    /// a packet that came compressed is never checked.
    pub spoof_check_before_decompress: bool,
}

/// Packets shorter than this are sent raw to clients with lz4.
const COMPRESS_FROM: usize = 128;

/// A packet towards a client with lz4: as a frame when that is smaller.
fn compress(p: Bytes) -> Bytes {
    if p.len() < COMPRESS_FROM || p.first().is_some_and(|b| b >> 4 == 0) {
        return p;
    }
    let Ok(len) = u16::try_from(p.len()) else {
        return p;
    };
    let mut f = vec![0x01];
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&lz4_flex::block::compress(&p));
    if f.len() < p.len() {
        f.into()
    } else {
        p
    }
}

/// The packet inside an lz4 frame, by the rules of [C4] unless `lax`.
fn decompress(f: &[u8], lax: bool) -> Option<Bytes> {
    let (&tag, rest) = f.split_first()?;
    let (hi_lo, block) = (rest.get(..2)?, rest.get(2..)?);
    let stated = usize::from(u16::from_be_bytes([hi_lo[0], hi_lo[1]]));
    if lax {
        let mut out = vec![0u8; 65_536];
        let n = lz4_flex::block::decompress_into(block, &mut out).ok()?;
        out.truncate(n);
        return Some(out.into());
    }
    if tag != 0x01 || stated == 0 || stated > usize::from(MTU) {
        return None;
    }
    let mut out = vec![0u8; stated];
    match lz4_flex::block::decompress_into(block, &mut out) {
        Ok(n) if n == stated => Some(out.into()),
        _ => None,
    }
}

#[derive(Debug)]
enum LeaseState {
    Active {
        session: u64,
        tx: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
    },
    Held,
}

#[derive(Debug)]
struct Lease {
    token: usize,
    client_id: Option<String>,
    state: LeaseState,
}

struct State {
    faults: Faults,
    subnet: Ipv4Net,
    server_ip: Ipv4Addr,
    leases: Mutex<HashMap<Ipv4Addr, Lease>>,
}

/// A running mini server.
pub struct MiniServer {
    pub url: String,
    pub certs: Certs,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Drop for MiniServer {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

impl MiniServer {
    pub async fn start(subnet: &str, faults: Faults) -> Self {
        let certs = Certs::new();
        let mut listener = super::listener(&certs).await;
        let url = format!("wss://127.0.0.1:{}/tunnel", listener.local_addr().port());
        let subnet: Ipv4Net = subnet.parse().expect("subnet");
        let state = Arc::new(State {
            faults,
            subnet,
            server_ip: subnet.hosts().next().expect("host"),
            leases: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let ids = AtomicU64::new(1);
        let task = tokio::spawn(async move {
            while let Some(t) = listener.accept().await {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(session(state.clone(), t, id, stop2.child_token()));
            }
        });
        Self {
            url,
            certs,
            task,
            stop,
        }
    }
}

impl MiniServer {
    /// A mini server without faults, but for raw TLS only and with a framing
    /// decoder that breaks [F4]: it ignores the compressed flag, and skips
    /// messages of length 0 or of an unknown kind instead of ending the
    /// session.
    pub async fn start_lenient_framing(subnet: &str) -> Self {
        let certs = Certs::new();
        let alpn = sallyport_transports::raw::ALPN;
        let tls =
            sallyport_transports::tls::server_config(&certs.files.cert, &certs.files.key, &[alpn])
                .expect("tls config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        let url = format!("wss://127.0.0.1:{port}/tunnel");
        let subnet: Ipv4Net = subnet.parse().expect("subnet");
        let state = Arc::new(State {
            faults: Faults::default(),
            subnet,
            server_ip: subnet.hosts().next().expect("host"),
            leases: Mutex::new(HashMap::new()),
        });
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let ids = AtomicU64::new(1);
        let task = tokio::spawn(async move {
            while let Ok((conn, peer)) = tcp.accept().await {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let (acceptor, state, stop) =
                    (acceptor.clone(), state.clone(), stop2.child_token());
                tokio::spawn(async move {
                    let Ok(io) = acceptor.accept(conn).await else {
                        return;
                    };
                    let (r, w) = tokio::io::split(io);
                    let tunnel = Tunnel {
                        tx: Box::pin(tokio_util::codec::FramedWrite::new(
                            w,
                            sallyport_transports::framing::FrameCodec::new(super::MAX_FRAME),
                        )),
                        rx: Box::pin(lenient_frames(r)),
                        info: sallyport_transports::TunnelInfo {
                            transport: sallyport_transports::TransportKind::RawTls,
                            peer: Some(peer),
                        },
                    };
                    session(state, tunnel, id, stop).await;
                });
            }
        });
        Self {
            url,
            certs,
            task,
            stop,
        }
    }
}

/// Framed messages as a lenient (non-conforming) decoder reads them.
fn lenient_frames<R>(
    r: R,
) -> impl futures::Stream<Item = Result<Frame, sallyport_transports::TransportError>> + Send
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    futures::stream::unfold((r, bytes::BytesMut::new()), |(mut r, mut buf)| async move {
        loop {
            if buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() >= 5 + len {
                    let msg = buf.split_to(5 + len).split_off(5).freeze();
                    match msg.first() {
                        Some(0x01) => return Some((Ok(Frame::Control(msg.slice(1..))), (r, buf))),
                        Some(0x02) => return Some((Ok(Frame::Packet(msg.slice(1..))), (r, buf))),
                        _ => continue,
                    }
                }
            }
            match r.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
}

fn failure(error: &str) -> Frame {
    Frame::Control(
        json!({"type":"auth_response","success":false,"error":error})
            .to_string()
            .into(),
    )
}

async fn refuse(tx: &mut FrameSink, error: &str) {
    let _ = tx.send(failure(error)).await;
    let _ = tx.close().await;
}

fn control(v: Value) -> Frame {
    Frame::Control(v.to_string().into())
}

async fn session(state: Arc<State>, tunnel: Tunnel, id: u64, stop: CancellationToken) {
    let Tunnel { mut tx, mut rx, .. } = tunnel;
    let f = state.faults;

    // Handshake.
    let first = if f.no_auth_timeout {
        rx.next().await
    } else {
        match tokio::time::timeout(AUTH_TIMEOUT, rx.next()).await {
            Ok(x) => x,
            Err(_) => return refuse(&mut tx, "auth_timeout").await,
        }
    };
    let text = match first {
        None | Some(Err(_)) => return,
        Some(Ok(Frame::Packet(_))) => return refuse(&mut tx, "auth_required").await,
        Some(Ok(Frame::Control(b))) => b,
    };
    let Ok(hello) = serde_json::from_slice::<Value>(&text) else {
        return refuse(&mut tx, "invalid_message").await;
    };
    if text.len() > 4096 {
        return refuse(&mut tx, "invalid_message").await;
    }
    let kind = hello.get("type").and_then(Value::as_str).unwrap_or("");
    let previous = match kind {
        "auth" => None,
        "reconnect" => match hello
            .get("previous_ip")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            Some(ip) => Some(ip),
            None => return refuse(&mut tx, "invalid_message").await,
        },
        "" => return refuse(&mut tx, "invalid_message").await,
        "ping" | "pong" | "auth_response" => return refuse(&mut tx, "auth_required").await,
        _ if f.unknown_first_is_invalid => return refuse(&mut tx, "invalid_message").await,
        _ => return refuse(&mut tx, "auth_required").await,
    };
    let token = match hello.get("token").and_then(Value::as_str) {
        Some(t) if t == TOKEN => 0,
        Some(t) if t == TOKEN2 => 1,
        Some(_) => return refuse(&mut tx, "auth_failed").await,
        None => return refuse(&mut tx, "invalid_message").await,
    };
    let client_id = hello
        .get("client_id")
        .and_then(Value::as_str)
        .map(String::from);
    let lz4 = hello
        .get("compression")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|c| c.as_str() == Some("lz4")));

    let cancel = stop.child_token();
    let (pkt_tx, mut pkt_rx) = mpsc::channel::<Bytes>(1024);
    let Some(addr) = state.acquire(token, client_id, previous, id, pkt_tx.clone(), &cancel) else {
        return refuse(&mut tx, "pool_exhausted").await;
    };
    let mut welcome = json!({
        "type": "auth_response", "success": true,
        "assigned_ip": addr.to_string(), "subnet": state.subnet.to_string(),
        "server_ip": state.server_ip.to_string(), "mtu": MTU,
        "keepalive_secs": KEEPALIVE.as_secs(),
    });
    if lz4 || f.answers_unoffered_compression {
        welcome["compression"] = json!("lz4");
    }
    if tx.send(control(welcome)).await.is_err() {
        state.release(addr, id);
        return;
    }

    // Writer: packets, pongs, pings.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Frame>(8);
    let wcancel = cancel.clone();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        loop {
            let frame = tokio::select! {
                _ = wcancel.cancelled() => break,
                Some(c) = ctl_rx.recv() => c,
                Some(p) = pkt_rx.recv() => Frame::Packet(if lz4 { compress(p) } else { p }),
                _ = tick.tick(), if !f.no_keepalive => control(json!({"type":"ping"})),
            };
            if tx.send(frame).await.is_err() {
                break;
            }
        }
        wcancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tx.close()).await;
    });

    // Reader.
    // Without keepalive, silence is allowed for as long as the test runs.
    let silence = if f.no_keepalive {
        Duration::from_secs(3600)
    } else {
        KEEPALIVE * 3
    };
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            n = tokio::time::timeout(silence, rx.next()) => match n {
                Ok(n) => n,
                Err(_) => break,
            },
        };
        match next {
            None | Some(Err(_)) => break,
            Some(Ok(Frame::Control(b))) => {
                if b.len() > 4096 {
                    break;
                }
                let Ok(v) = serde_json::from_slice::<Value>(&b) else {
                    break;
                };
                match v.get("type").and_then(Value::as_str) {
                    Some("ping") if !f.never_pongs => {
                        let mut pong = json!({"type":"pong"});
                        if let Some(seq) = v.get("seq") {
                            pong["seq"] = seq.clone();
                        }
                        let _ = ctl_tx.try_send(control(pong));
                    }
                    Some("ping" | "pong" | "auth" | "reconnect" | "auth_response") => {}
                    Some(_) if f.closes_on_unknown_type => break,
                    Some(_) => {}
                    None => break,
                }
            }
            Some(Ok(Frame::Packet(p))) if lz4 && p.first().is_some_and(|b| b >> 4 == 0) => {
                // Dropped when it does not decompress.
                if let Some(inner) = decompress(&p, f.lax_lz4_lengths) {
                    state.route(addr, inner, Some(p), &pkt_tx).await;
                }
            }
            Some(Ok(Frame::Packet(p))) => state.route(addr, p, None, &pkt_tx).await,
        }
    }
    cancel.cancel();
    let _ = writer.await;
    state.release(addr, id);
}

impl State {
    fn assignable(&self, a: Ipv4Addr) -> bool {
        self.subnet.contains(&a)
            && a != self.subnet.network()
            && a != self.subnet.broadcast()
            && (a != self.server_ip || self.faults.hands_out_server_ip)
    }

    fn acquire(
        &self,
        token: usize,
        client_id: Option<String>,
        previous: Option<Ipv4Addr>,
        session: u64,
        tx: mpsc::Sender<Bytes>,
        cancel: &CancellationToken,
    ) -> Option<Ipv4Addr> {
        let mut leases = self.leases.lock().expect("lock");
        let mut pick = None;
        // [A6]: the lease of this token and client id, live or held.
        if client_id.is_some() {
            pick = leases
                .iter()
                .find_map(|(a, l)| (l.token == token && l.client_id == client_id).then_some(*a));
            if let Some(Lease {
                state: LeaseState::Active { cancel, .. },
                ..
            }) = pick.and_then(|a| leases.get(&a))
            {
                cancel.cancel();
            }
        }
        if let Some(prev) = previous.filter(|p| self.assignable(*p) && pick.is_none()) {
            let ok = match leases.get(&prev) {
                None => true,
                Some(Lease {
                    state: LeaseState::Held,
                    token: t,
                    ..
                }) => *t == token,
                Some(Lease {
                    state: LeaseState::Active { cancel, .. },
                    token: t,
                    client_id: c,
                }) => {
                    let same = *t == token && c.is_some() && *c == client_id;
                    if same {
                        cancel.cancel();
                    }
                    same
                }
            };
            if ok {
                pick = Some(prev);
            }
        }
        if pick.is_none() {
            // Lowest free first; server_ip (the first host) is skipped unless
            // the fault puts it in the pool.
            let first = u32::from(self.subnet.network()) + 1;
            pick = (first..u32::from(self.subnet.broadcast()))
                .map(Ipv4Addr::from)
                .find(|a| self.assignable(*a) && !leases.contains_key(a));
        }
        let addr = pick?;
        leases.insert(
            addr,
            Lease {
                token,
                client_id,
                state: LeaseState::Active {
                    session,
                    tx,
                    cancel: cancel.clone(),
                },
            },
        );
        Some(addr)
    }

    fn release(&self, addr: Ipv4Addr, session: u64) {
        let mut leases = self.leases.lock().expect("lock");
        let mine = matches!(
            leases.get(&addr),
            Some(Lease { state: LeaseState::Active { session: s, .. }, .. }) if *s == session
        );
        if !mine {
            return;
        }
        if self.faults.no_address_hold {
            leases.remove(&addr);
        } else if let Some(l) = leases.get_mut(&addr) {
            l.state = LeaseState::Held;
        }
    }

    fn route_to(&self, dst: Ipv4Addr) -> Option<mpsc::Sender<Bytes>> {
        match self.leases.lock().expect("lock").get(&dst) {
            Some(Lease {
                state: LeaseState::Active { tx, .. },
                ..
            }) => Some(tx.clone()),
            _ => None,
        }
    }

    /// Routes packet `p` from the session at `from`; `wire` is the lz4 frame
    /// it came in, if it came compressed.
    async fn route(
        &self,
        from: Ipv4Addr,
        p: Bytes,
        wire: Option<Bytes>,
        own: &mpsc::Sender<Bytes>,
    ) {
        if p.len() > usize::from(MTU) {
            return;
        }
        let Ok(IpHeader::V4(h)) = IpHeader::parse(&p) else {
            return;
        };
        let unchecked = self.faults.no_source_check
            || (self.faults.spoof_check_before_decompress && wire.is_some());
        if h.src != from && !unchecked {
            return;
        }
        if h.dst == self.server_ip || !self.subnet.contains(&h.dst) {
            // The "TUN": the kernel answers pings to its own address.
            if let Some(r) = kernel_echo_reply(&p, self.server_ip) {
                if let Some(back) = self.route_to(h.src) {
                    let _ = back.try_send(r.into());
                }
            }
            return;
        }
        let p = match wire {
            Some(frame) if self.faults.forwards_lz4_frames => frame,
            _ => p,
        };
        match self.route_to(h.dst) {
            Some(tx) if self.faults.blocking_queue => {
                let _ = tx.send(p).await;
            }
            Some(tx) => {
                let _ = tx.try_send(p);
            }
            None if self.faults.floods_unknown_destination => {
                let all: Vec<_> = self
                    .leases
                    .lock()
                    .expect("lock")
                    .values()
                    .filter_map(|l| match &l.state {
                        LeaseState::Active { tx, .. } if !tx.same_channel(own) => Some(tx.clone()),
                        _ => None,
                    })
                    .collect();
                for tx in all {
                    let _ = tx.try_send(p.clone());
                }
            }
            None => {}
        }
    }
}
