//! One protocol session as the suite drives it.
//!
//! A background task reads the transport, answers the server's pings (unless
//! told not to) and queues everything else for the check. The queue is
//! bounded: a check that stops reading makes the session stop reading its
//! socket, which is how the suite plays a slow client.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use ipnet::Ipv4Net;
use sallyport_core::ip::{build_ipv4, checksum};
use sallyport_core::message::{Auth, Control, Pong, Reconnect, Token};
use sallyport_core::Frame;
use sallyport_transports::FrameSink;
use serde_json::Value;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use super::lz4;
use super::raw::RawSender;
use super::{fail, Ctx, Verdict};

/// What the background reader saw.
#[derive(Debug)]
pub(crate) enum Event {
    /// A text message (a control message, or what the server claims is one).
    Control(Bytes),
    /// A binary message.
    Packet(Bytes),
    /// The transport ended; with the error, if it ended with one.
    Closed(Option<String>),
}

/// Events queued per session before the reader stops reading the socket.
const EVENT_QUEUE: usize = 1024;

/// A connection to the server, before or after the handshake.
pub(crate) struct Session {
    tx: Arc<Mutex<FrameSink>>,
    events: mpsc::Receiver<Event>,
    closed: Option<Option<String>>,
    pings: Arc<AtomicU64>,
    reader: JoinHandle<()>,
    /// Raw bytes onto the stream, for a session opened with `dial_raw`.
    raw: Option<RawSender>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What a successful `auth_response` says.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub server_ip: Ipv4Addr,
    pub mtu: u64,
    /// The `keepalive_secs` extension, when sent.
    pub keepalive_secs: Option<u64>,
    /// The `compression` extension, when sent (§9).
    pub compression: Option<String>,
    /// The `offload` extension, when sent (§11).
    pub offload: Option<String>,
}

impl Grant {
    /// The [H1]/[A1] rules for an assigned address.
    pub fn check_address(&self) -> Result<(), String> {
        let net = self.subnet;
        let ip = self.ip;
        if !net.contains(&ip) {
            return Err(format!("assigned_ip {ip} is outside subnet {net}"));
        }
        if ip == net.network() {
            return Err(format!("assigned_ip {ip} is the network address of {net}"));
        }
        if ip == net.broadcast() {
            return Err(format!(
                "assigned_ip {ip} is the broadcast address of {net}"
            ));
        }
        if ip == self.server_ip {
            return Err(format!("assigned_ip {ip} is the server_ip"));
        }
        Ok(())
    }

    /// The [H1] rule for the MTU.
    pub fn check_mtu(&self) -> Result<(), String> {
        if (576..=65_535).contains(&self.mtu) {
            Ok(())
        } else {
            Err(format!("mtu {} is outside 576..=65535", self.mtu))
        }
    }

    /// The server's keepalive interval: announced, else the documented 15 s.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_secs.unwrap_or(15).max(1))
    }
}

/// An `auth_response` as received, parsed strictly against the table in §2.
#[derive(Debug, Clone)]
pub(crate) struct AuthReply {
    pub success: bool,
    pub error: Option<String>,
    pub grant: Option<Grant>,
    pub raw: Value,
}

/// Parses the text of what should be an `auth_response`.
pub(crate) fn parse_auth_reply(text: &[u8]) -> Result<AuthReply, String> {
    let shown = String::from_utf8_lossy(text);
    let raw: Value = serde_json::from_slice(text)
        .map_err(|e| format!("reply is not JSON ({e}): {}", clip(&shown)))?;
    let obj = raw
        .as_object()
        .ok_or_else(|| format!("reply is not a JSON object: {}", clip(&shown)))?;
    if obj.get("type").and_then(Value::as_str) != Some("auth_response") {
        return Err(format!("expected an auth_response, got {}", clip(&shown)));
    }
    let success = obj.get("success").and_then(Value::as_bool).ok_or_else(|| {
        format!(
            "auth_response without a boolean `success`: {}",
            clip(&shown)
        )
    })?;
    let error = obj.get("error").and_then(Value::as_str).map(String::from);
    if !success {
        return Ok(AuthReply {
            success,
            error,
            grant: None,
            raw,
        });
    }
    let field = |name: &str| -> Result<&str, String> {
        obj.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("successful auth_response without a string `{name}`"))
    };
    let ip: Ipv4Addr = field("assigned_ip")?
        .parse()
        .map_err(|e| format!("assigned_ip is not an IPv4 address: {e}"))?;
    let subnet_text = field("subnet")?;
    let subnet: Ipv4Net = subnet_text
        .parse()
        .map_err(|e| format!("subnet {subnet_text:?} is not CIDR: {e}"))?;
    let server_ip: Ipv4Addr = field("server_ip")?
        .parse()
        .map_err(|e| format!("server_ip is not an IPv4 address: {e}"))?;
    let mtu = obj
        .get("mtu")
        .and_then(Value::as_u64)
        .ok_or("successful auth_response without an integer `mtu`")?;
    let keepalive_secs = match obj.get("keepalive_secs") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| format!("keepalive_secs is not an integer: {v}"))?,
        ),
    };
    let compression = match obj.get("compression") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| format!("compression is not a string: {v}"))?
                .to_string(),
        ),
    };
    let offload = match obj.get("offload") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| format!("offload is not a string: {v}"))?
                .to_string(),
        ),
    };
    Ok(AuthReply {
        success,
        error,
        grant: Some(Grant {
            ip,
            subnet: subnet.trunc(),
            server_ip,
            mtu,
            keepalive_secs,
            compression,
            offload,
        }),
        raw,
    })
}

/// At most 200 characters of `s`, for reasons.
pub(crate) fn clip(s: &str) -> String {
    if s.chars().count() <= 200 {
        s.to_string()
    } else {
        let head: String = s.chars().take(200).collect();
        format!("{head}...")
    }
}

/// How a session treats the server's pings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pings {
    /// Answer each with a `pong` carrying its `seq` ([K1]).
    Answer,
    /// Count them, answer nothing (to play a dead peer).
    Ignore,
}

impl Session {
    /// Opens the transport; no protocol message is sent yet.
    pub async fn dial(cx: &Ctx, pings: Pings) -> Result<Session, Verdict> {
        Session::dial_queue(cx, pings, EVENT_QUEUE).await
    }

    async fn dial_queue(cx: &Ctx, pings: Pings, queue: usize) -> Result<Session, Verdict> {
        let tunnel = cx
            .dialer
            .dial()
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        Ok(Session::over(tunnel, pings, queue, None))
    }

    /// Opens the transport (HTTP/2 or raw TLS) so that [`Session::send_raw`]
    /// can also write bytes that are not well-formed framed messages.
    pub async fn dial_raw(cx: &Ctx) -> Result<Session, Verdict> {
        let t = super::raw::dial(cx.target(), cx.transport())
            .await
            .map_err(fail)?;
        Ok(Session::over(
            t.tunnel,
            Pings::Answer,
            EVENT_QUEUE,
            Some(t.raw),
        ))
    }

    fn over(
        tunnel: sallyport_transports::Tunnel,
        pings: Pings,
        queue: usize,
        raw: Option<RawSender>,
    ) -> Session {
        let tx = Arc::new(Mutex::new(tunnel.tx));
        let (ev_tx, events) = mpsc::channel(queue);
        let pings_seen = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn(read_loop(
            tunnel.rx,
            tx.clone(),
            ev_tx,
            pings,
            pings_seen.clone(),
        ));
        Session {
            tx,
            events,
            closed: None,
            pings: pings_seen,
            reader,
            raw,
        }
    }

    /// Writes `bytes` as they are onto a session opened with `dial_raw`.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), Verdict> {
        let Some(raw) = &self.raw else {
            return Err(fail("this session cannot send raw bytes"));
        };
        // Behind the frames sent before it: the sink does not buffer.
        let _lock = self.tx.lock().await;
        raw.clone()
            .send(Bytes::copy_from_slice(bytes))
            .await
            .map_err(|e| fail(format!("send: {e}")))
    }

    /// Dials and sends `hello`, returns the parsed reply.
    pub async fn hello(cx: &Ctx, hello: &Control) -> Result<(Session, AuthReply), Verdict> {
        let mut s = Session::dial(cx, Pings::Answer).await?;
        s.send_control(hello).await?;
        let reply = s.next_control(cx.t().reply).await?;
        let reply = parse_auth_reply(&reply).map_err(fail)?;
        Ok((s, reply))
    }

    /// Dials and authenticates with `token`; fails unless the server accepts.
    pub async fn auth(cx: &Ctx, token: &str) -> Result<(Session, Grant), Verdict> {
        Session::auth_with(cx, auth(token, None), Pings::Answer).await
    }

    /// Dials and sends `hello`; fails unless the server accepts.
    pub async fn auth_with(
        cx: &Ctx,
        hello: Control,
        pings: Pings,
    ) -> Result<(Session, Grant), Verdict> {
        let mut s = Session::dial(cx, pings).await?;
        s.send_control(&hello).await?;
        let text = s.next_control(cx.t().reply).await?;
        let reply = parse_auth_reply(&text).map_err(fail)?;
        match reply.grant {
            Some(g) => Ok((s, g)),
            None => Err(fail(format!(
                "{} refused with a valid token: {}",
                hello.kind(),
                clip(&reply.raw.to_string())
            ))),
        }
    }

    /// Authenticates a session that will read next to nothing: its queue
    /// holds one event, so once the check stops reading, the session stops
    /// reading its socket (a client that does not keep up).
    pub async fn auth_stalled(cx: &Ctx, token: &str) -> Result<(Session, Grant), Verdict> {
        let mut s = Session::dial_queue(cx, Pings::Answer, 1).await?;
        s.send_control(&auth(token, None)).await?;
        let text = s.next_control(cx.t().reply).await?;
        match parse_auth_reply(&text).map_err(fail)?.grant {
            Some(g) => Ok((s, g)),
            None => Err(fail("auth refused with a valid token")),
        }
    }

    /// Sends a `ping` every `period` from a task of its own, so that the
    /// server hears from this client even while nobody reads it.
    pub fn keep_talking(&self, period: Duration) -> JoinHandle<()> {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let ping = Frame::Control(Bytes::from_static(br#"{"type":"ping"}"#));
                if tx.lock().await.send(ping).await.is_err() {
                    return;
                }
            }
        })
    }

    /// Sends one frame and flushes.
    pub async fn send(&self, frame: Frame) -> Result<(), Verdict> {
        let mut tx = self.tx.lock().await;
        tx.send(frame).await.map_err(|e| fail(format!("send: {e}")))
    }

    /// Sends `frames` in writes of 64, failing when the server takes none
    /// of a write for `stall` (it stopped reading this session).
    pub async fn send_flood(&self, frames: Vec<Frame>, stall: Duration) -> Result<(), Verdict> {
        let n = frames.len();
        let mut tx = self.tx.lock().await;
        let mut sent = 0;
        let mut it = frames.into_iter().peekable();
        while it.peek().is_some() {
            let chunk: Vec<Frame> = it.by_ref().take(64).collect();
            let k = chunk.len();
            let write = async {
                for f in chunk {
                    tx.feed(f).await?;
                }
                tx.flush().await
            };
            match tokio::time::timeout(stall, write).await {
                Err(_) => {
                    return Err(fail(format!(
                        "the server stopped reading for {stall:?} after {sent} of {n} packets"
                    )))
                }
                Ok(Err(e)) => return Err(fail(format!("send: {e}"))),
                Ok(Ok(())) => sent += k,
            }
        }
        Ok(())
    }

    /// Sends a control message.
    pub async fn send_control(&self, c: &Control) -> Result<(), Verdict> {
        self.send(Frame::Control(c.encode())).await
    }

    /// Sends text as a control message, whatever it contains.
    pub async fn send_text(&self, text: &str) -> Result<(), Verdict> {
        self.send(Frame::Control(Bytes::copy_from_slice(text.as_bytes())))
            .await
    }

    /// Closes the transport cleanly (a WebSocket close frame).
    pub async fn close(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            let mut tx = self.tx.lock().await;
            tx.close().await
        })
        .await;
    }

    /// Closes the transport and waits until the server has hung up too.
    pub async fn close_and_wait(mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let _ = tokio::time::timeout(limit, async {
            let mut tx = self.tx.lock().await;
            tx.close().await
        })
        .await;
        while self.next_event_until(deadline).await.is_some() {
            if self.closed.is_some() {
                break;
            }
        }
    }

    /// The number of server pings seen so far.
    pub fn pings_seen(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }

    /// The next event before `deadline`; `None` on timeout. After the
    /// transport closed, keeps returning `Closed`.
    pub async fn next_event_until(&mut self, deadline: Instant) -> Option<Event> {
        if let Some(e) = &self.closed {
            return Some(Event::Closed(e.clone()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.events.recv()).await {
            Err(_) => None,
            Ok(None) => {
                self.closed = Some(None);
                Some(Event::Closed(None))
            }
            Ok(Some(Event::Closed(e))) => {
                self.closed = Some(e.clone());
                Some(Event::Closed(e))
            }
            Ok(Some(ev)) => Some(ev),
        }
    }

    /// The next control message within `within`, skipping packets.
    pub async fn next_control(&mut self, within: Duration) -> Result<Bytes, Verdict> {
        let deadline = Instant::now() + within;
        loop {
            match self.next_event_until(deadline).await {
                None => return Err(fail(format!("no reply within {within:?}"))),
                Some(Event::Closed(e)) => return Err(fail(closed_reason("before replying", e))),
                Some(Event::Control(b)) => return Ok(b),
                Some(Event::Packet(_)) => continue,
            }
        }
    }

    /// Waits until the server has closed the connection. Returns the control
    /// messages received meanwhile.
    pub async fn expect_closed(&mut self, within: Duration) -> Result<Vec<Bytes>, Verdict> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match self.next_event_until(deadline).await {
                None => {
                    return Err(fail(format!(
                        "the connection is still open after {within:?}"
                    )))
                }
                Some(Event::Closed(_)) => return Ok(seen),
                Some(Event::Control(b)) => seen.push(b),
                Some(Event::Packet(_)) => continue,
            }
        }
    }

    /// Waits for a packet equal to `want`. Unrelated packets are ignored; one
    /// carrying the same probe but different bytes is a failure.
    pub async fn expect_packet(&mut self, want: &Probe, within: Duration) -> Result<(), Verdict> {
        let deadline = Instant::now() + within;
        loop {
            match self.next_event_until(deadline).await {
                None => return Err(fail(format!("the packet did not arrive within {within:?}"))),
                Some(Event::Closed(e)) => {
                    return Err(fail(closed_reason("while waiting for a packet", e)))
                }
                Some(Event::Packet(p)) if p[..] == want.bytes[..] => return Ok(()),
                Some(Event::Packet(p)) if want.is_in(&p) => {
                    return Err(fail(format!(
                        "the packet arrived altered: {} bytes, sent {}",
                        p.len(),
                        want.bytes.len()
                    )))
                }
                Some(_) => continue,
            }
        }
    }

    /// Waits for an ICMP echo reply from `from` matching `request`.
    pub async fn expect_echo_reply(
        &mut self,
        request: &Probe,
        from: Ipv4Addr,
        within: Duration,
    ) -> Result<(), Verdict> {
        let deadline = Instant::now() + within;
        loop {
            match self.next_event_until(deadline).await {
                None => {
                    return Err(fail(format!(
                        "no ICMP echo reply from {from} within {within:?}"
                    )))
                }
                Some(Event::Closed(e)) => {
                    return Err(fail(closed_reason("while waiting for the echo reply", e)))
                }
                Some(Event::Packet(p)) if is_echo_reply_to(&unwrap_lz4(&p), request, from) => {
                    return Ok(())
                }
                Some(_) => continue,
            }
        }
    }

    /// Waits for `want` on a session that negotiated lz4: it may come raw or
    /// as an lz4 frame ([C3]), which must then decode to exactly `want` and
    /// be smaller than it.
    pub async fn expect_packet_lz4(
        &mut self,
        want: &Probe,
        mtu: usize,
        within: Duration,
    ) -> Result<(), Verdict> {
        let deadline = Instant::now() + within;
        loop {
            match self.next_event_until(deadline).await {
                None => return Err(fail(format!("the packet did not arrive within {within:?}"))),
                Some(Event::Closed(e)) => {
                    return Err(fail(closed_reason("while waiting for a packet", e)))
                }
                Some(Event::Packet(p)) if p[..] == want.bytes[..] => return Ok(()),
                Some(Event::Packet(p)) if lz4::is_extension(&p) => match lz4::decode(&p, mtu) {
                    Ok(inner) if inner == want.bytes => {
                        if p.len() >= want.bytes.len() {
                            return Err(fail(format!(
                                "a {}-byte packet came as a {}-byte lz4 frame: a frame is sent only when smaller",
                                want.bytes.len(),
                                p.len()
                            )));
                        }
                        return Ok(());
                    }
                    Ok(inner) if want.is_in(&inner) => {
                        return Err(fail(format!(
                            "the packet arrived altered inside an lz4 frame: {} bytes, sent {}",
                            inner.len(),
                            want.bytes.len()
                        )))
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        return Err(fail(format!(
                            "received an lz4 frame that does not decode ({e}): {} bytes",
                            p.len()
                        )))
                    }
                },
                Some(Event::Packet(p)) if want.is_in(&p) => {
                    return Err(fail(format!(
                        "the packet arrived altered: {} bytes, sent {}",
                        p.len(),
                        want.bytes.len()
                    )))
                }
                Some(_) => continue,
            }
        }
    }

    /// Sends `ping` with `seq` and waits for the matching `pong`.
    pub async fn ping(&mut self, seq: Option<u64>, within: Duration) -> Result<Duration, Verdict> {
        let t0 = Instant::now();
        let ping = match seq {
            Some(n) => format!(r#"{{"type":"ping","seq":{n}}}"#),
            None => r#"{"type":"ping"}"#.to_string(),
        };
        self.send_text(&ping).await?;
        let deadline = t0 + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let text = self
                .next_control(left)
                .await
                .map_err(|v| prefix(v, "ping"))?;
            let v: Value = match serde_json::from_slice(&text) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v.get("type").and_then(Value::as_str) != Some("pong") {
                continue;
            }
            let got = v.get("seq").and_then(Value::as_u64);
            if seq.is_some() && got != seq {
                return Err(fail(format!(
                    "pong carries seq {got:?}, the ping had {seq:?}"
                )));
            }
            return Ok(t0.elapsed());
        }
    }
}

fn closed_reason(when: &str, e: Option<String>) -> String {
    match e {
        Some(e) => format!("the connection failed {when}: {e}"),
        None => format!("the server closed the connection {when}"),
    }
}

/// Prefixes a failure's reason with context.
pub(crate) fn prefix(v: Verdict, what: &str) -> Verdict {
    match v {
        Verdict::Fail(r) => Verdict::Fail(format!("{what}: {r}")),
        s => s,
    }
}

async fn read_loop(
    mut rx: sallyport_transports::FrameStream,
    tx: Arc<Mutex<FrameSink>>,
    events: mpsc::Sender<Event>,
    pings: Pings,
    seen: Arc<AtomicU64>,
) {
    loop {
        let ev = match rx.next().await {
            None => Event::Closed(None),
            Some(Err(e)) => Event::Closed(Some(e.to_string())),
            Some(Ok(Frame::Packet(p))) => Event::Packet(p),
            Some(Ok(Frame::Control(b))) => match Control::decode(&b) {
                Ok(Control::Ping(p)) => {
                    seen.fetch_add(1, Ordering::Relaxed);
                    if pings == Pings::Answer {
                        let pong = Control::Pong(Pong { seq: p.seq }).encode();
                        let _ = tx.lock().await.send(Frame::Control(pong)).await;
                    }
                    continue;
                }
                _ => Event::Control(b),
            },
        };
        let end = matches!(ev, Event::Closed(_));
        if events.send(ev).await.is_err() || end {
            return;
        }
    }
}

/// `{"type":"auth",...}`.
pub(crate) fn auth(token: &str, client_id: Option<&str>) -> Control {
    Control::Auth(Auth {
        token: Token::new(token),
        client_id: client_id.map(String::from),
        compression: None,
        offload: None,
    })
}

/// `{"type":"auth",...,"compression":offer}`.
pub(crate) fn auth_offering(token: &str, offer: &[&str]) -> Control {
    Control::Auth(Auth {
        token: Token::new(token),
        client_id: None,
        compression: Some(offer.iter().map(|s| s.to_string()).collect()),
        offload: None,
    })
}

/// `{"type":"auth",...}` with `compression` and `offload` offers.
pub(crate) fn auth_extensions(token: &str, compression: &[&str], offload: &[&str]) -> Control {
    let list = |o: &[&str]| Some(o.iter().map(|s| s.to_string()).collect());
    Control::Auth(Auth {
        token: Token::new(token),
        client_id: None,
        compression: list(compression),
        offload: list(offload),
    })
}

/// `{"type":"reconnect",...}`.
pub(crate) fn reconnect(token: &str, previous: Ipv4Addr, client_id: Option<&str>) -> Control {
    Control::Reconnect(Reconnect {
        token: Token::new(token),
        previous_ip: previous,
        client_id: client_id.map(String::from),
        compression: None,
        offload: None,
    })
}

/// A packet the suite sent, recognisable wherever it turns up by a marker
/// unique to this run and this packet.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub bytes: Vec<u8>,
    marker: Vec<u8>,
    what: String,
}

static NEXT_PROBE: AtomicU64 = AtomicU64::new(0);

fn marker() -> [u8; 16] {
    let n = NEXT_PROBE.fetch_add(1, Ordering::Relaxed);
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()) << 32;
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(b"SPCF");
    m[4..8].copy_from_slice(&(n as u32).to_be_bytes());
    m[8..].copy_from_slice(&run.to_be_bytes());
    m
}

impl Probe {
    /// An IPv4 packet `src` → `dst`, protocol 253 (experimental), `len`
    /// bytes in all (at least 36).
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, len: usize, what: impl Into<String>) -> Probe {
        let m = marker();
        let mut payload = m.to_vec();
        let fill = len.saturating_sub(20 + m.len());
        payload.extend((0..fill).map(|i| (i % 251) as u8));
        Probe {
            bytes: build_ipv4(src, dst, 253, &payload),
            marker: m.to_vec(),
            what: what.into(),
        }
    }

    /// An ICMP echo request `src` → `dst`.
    pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr) -> Probe {
        Probe::echo_request_padded(src, dst, 0)
    }

    /// An ICMP echo request `src` → `dst` with `pad` zero bytes after the
    /// marker (which makes it compressible).
    pub fn echo_request_padded(src: Ipv4Addr, dst: Ipv4Addr, pad: usize) -> Probe {
        let m = marker();
        let mut icmp = vec![8, 0, 0, 0, 0x53, 0x50, 0, 1];
        icmp.extend_from_slice(&m);
        icmp.resize(icmp.len() + pad, 0);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        Probe {
            bytes: build_ipv4(src, dst, 1, &icmp),
            marker: m.to_vec(),
            what: "an ICMP echo request".into(),
        }
    }

    /// Arbitrary (non-empty) bytes, e.g. a malformed packet; recognised by
    /// the whole of them.
    pub fn raw(bytes: Vec<u8>, what: impl Into<String>) -> Probe {
        Probe {
            marker: bytes.clone(),
            bytes,
            what: what.into(),
        }
    }

    /// What the probe is, for reasons.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Whether `packet` carries this probe's marker.
    pub fn is_in(&self, packet: &[u8]) -> bool {
        !self.marker.is_empty()
            && packet
                .windows(self.marker.len())
                .any(|w| *w == self.marker[..])
    }

    /// This probe's frame.
    pub fn frame(&self) -> Frame {
        Frame::Packet(Bytes::copy_from_slice(&self.bytes))
    }
}

/// A binary message as a packet: an lz4 frame that decodes is replaced by
/// the packet inside it, anything else is left as it is.
pub(crate) fn unwrap_lz4(p: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if lz4::is_extension(p) {
        if let Ok(inner) = lz4::decode(p, 65_535) {
            return inner.into();
        }
    }
    p.into()
}

fn is_echo_reply_to(p: &[u8], request: &Probe, from: Ipv4Addr) -> bool {
    let Ok(h) = sallyport_core::ip::Ipv4Header::parse(p) else {
        return false;
    };
    let icmp = &p[h.header_len..h.total_len];
    h.protocol == 1 && h.src == from && icmp.first() == Some(&0) && request.is_in(icmp)
}

/// `ip` plus `n` (wrapping), for picking addresses in a subnet.
pub(crate) fn add(ip: Ipv4Addr, n: i64) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(ip) as i64 + n) as u32)
}

/// The highest assignable addresses of the grant's subnet, top first,
/// skipping the server's and `avoid`.
pub(crate) fn top_addresses(g: &Grant, avoid: &[Ipv4Addr], n: usize) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut a = add(g.subnet.broadcast(), -1);
    while out.len() < n && a > g.subnet.network() {
        if a != g.server_ip && !avoid.contains(&a) {
            out.push(a);
        }
        a = add(a, -1);
    }
    out
}
