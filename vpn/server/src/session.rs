//! One client's session: handshake, then a reader (this task) and a writer
//! (a spawned task) until either side ends it.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sallyport_core::message::{
    offers_lz4, AuthResponse, Control, Ping, Pong, Token, COMPRESSION_LZ4,
};
use sallyport_core::offload::{self, OFFLOAD_GSO};
use sallyport_core::{Frame, PacketBatch, MAX_BATCH};
use sallyport_middleware::{Counters, Direction, DropReason, MiddlewareError, Rate, StatsHandle};
use sallyport_transports::listener::PerSource;
use sallyport_transports::{recv_ready, FrameSink, Tunnel};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::config::Credential;
use crate::hub::{Hub, SessionHandle, SessionMeta};
use crate::limits::{AuthThrottle, LimitCounters};
use crate::pipeline::{HubRouter, NewPipeline, SessionTarget};
use crate::pool::{Owner, Reuse};

/// What every session needs to know, shared.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Accepted tokens (their digests), by credential index.
    pub credentials: Arc<[Credential]>,
    /// Time allowed for the first message.
    pub auth_timeout: Duration,
    /// Ping interval; silence for 3 intervals ends the session.
    pub keepalive: Duration,
    /// Tunnel MTU announced to clients; larger packets are dropped.
    pub mtu: u16,
    /// Packets queued towards a client before drops.
    pub queue_len: usize,
    /// Builds each session's packet pipeline.
    pub pipeline: NewPipeline,
    /// Whether a client's offer of lz4 is accepted.
    pub compression: bool,
    /// Whether a client's offer of segmentation offload is accepted.
    pub offload: bool,
    /// The rate limit of each token's sessions, by token index.
    pub rate_limits: Arc<[Option<Rate>]>,
    /// Connection limits before and after authentication.
    pub limits: SessionLimits,
}

/// `[limits]` that apply to a session (the per-token session limit is the
/// hub's, see [`Hub::with_max_sessions_per_token`]).
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Close a session after this long without a packet either way (pings
    /// do not count); `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Failed authentications per source address.
    pub auth_throttle: Arc<AuthThrottle>,
    /// Tunnels waiting for their `auth` message (`limits.max_unauthenticated`).
    pub authenticating: Arc<Semaphore>,
    /// The same per source address (`limits.max_unauthenticated_per_source`).
    pub authenticating_per_source: Arc<PerSource>,
}

impl Default for SessionLimits {
    /// No limits (for tests).
    fn default() -> Self {
        Self {
            idle_timeout: None,
            auth_throttle: Arc::new(AuthThrottle::new(0)),
            authenticating: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            authenticating_per_source: PerSource::new(0),
        }
    }
}

impl SessionLimits {
    /// From the `[limits]` values.
    pub fn new(
        idle_timeout: Option<Duration>,
        auth_failures_per_minute: u32,
        max_unauthenticated: usize,
        max_unauthenticated_per_source: usize,
    ) -> Self {
        Self {
            idle_timeout,
            auth_throttle: Arc::new(AuthThrottle::new(auth_failures_per_minute)),
            authenticating: Arc::new(Semaphore::new(
                max_unauthenticated.min(Semaphore::MAX_PERMITS),
            )),
            authenticating_per_source: PerSource::new(max_unauthenticated_per_source),
        }
    }
}

/// Runs a session on `tunnel` until it ends. Never panics on peer input;
/// every way it ends is logged once.
pub async fn run(
    hub: Arc<Hub>,
    cfg: Arc<SessionConfig>,
    tunnel: Tunnel,
    id: u64,
    shutdown: CancellationToken,
) {
    let peer = tunnel
        .info
        .peer
        .map(|p| p.to_string())
        .unwrap_or_else(|| "-".into());
    let span = tracing::info_span!(
        "session",
        id,
        peer = %peer,
        transport = %tunnel.info.transport,
        client = tracing::field::Empty,
        ip = tracing::field::Empty
    );
    run_inner(hub, cfg, tunnel, id, shutdown)
        .instrument(span)
        .await
}

/// What an accepted first message says. Public only for the fuzz targets.
#[doc(hidden)]
#[derive(Debug)]
pub struct Hello {
    /// Index of the matching token.
    pub token: usize,
    /// The address asked back (`reconnect`).
    pub previous: Option<Ipv4Addr>,
    /// The client's stable id, if given and 1..=128 bytes long.
    pub client_id: Option<String>,
    /// Whether the client offers lz4.
    pub offers_lz4: bool,
    /// Whether the client offers segmentation offload.
    pub offers_gso: bool,
}

async fn run_inner(
    hub: Arc<Hub>,
    cfg: Arc<SessionConfig>,
    mut tunnel: Tunnel,
    id: u64,
    shutdown: CancellationToken,
) {
    let (transport, peer) = (tunnel.info.transport, tunnel.info.peer);
    let limits = hub.limits().clone();
    // Held until the handshake ends, so tunnels waiting for `auth` are bounded.
    let Ok(authenticating) = cfg.limits.authenticating.clone().try_acquire_owned() else {
        LimitCounters::hit(&limits.unauthenticated_refused);
        tracing::warn!("refused: limits.max_unauthenticated tunnels already waiting for auth");
        return;
    };
    let source = peer.map(|p| p.ip());
    let per_source = cfg.limits.authenticating_per_source.clone();
    let source_slot = match source.map(|ip| per_source.try_take(ip)) {
        Some(None) => {
            LimitCounters::hit(&limits.unauthenticated_refused);
            tracing::warn!(
                "refused: limits.max_unauthenticated_per_source tunnels from this address \
                 already waiting for auth"
            );
            return;
        }
        Some(Some(slot)) => Some(slot),
        None => None,
    };
    if let Some(ip) = source {
        if !cfg.limits.auth_throttle.allows(ip, Instant::now()) {
            LimitCounters::hit(&limits.auth_throttled);
            tracing::warn!(
                "refused unread: too many failed authentications from this address \
                 (limits.auth_failures_per_minute)"
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), tunnel.tx.close()).await;
            return;
        }
    }
    let hello = match handshake(&cfg, &mut tunnel).await {
        Ok(h) => h,
        Err(refusal) => {
            match refusal {
                Refusal::Timeout => LimitCounters::hit(&limits.auth_timeouts),
                Refusal::TooLarge(_) => LimitCounters::hit(&limits.frame_too_large),
                Refusal::BadToken => {
                    LimitCounters::hit(&limits.auth_failures);
                    if let Some(ip) = source {
                        cfg.limits.auth_throttle.failed(ip, Instant::now());
                    }
                }
                _ => {}
            }
            refusal.log();
            if let Some(error) = refusal.reply() {
                let _ = send_and_close(&mut tunnel.tx, failure(error)).await;
            }
            return;
        }
    };
    drop((authenticating, source_slot));

    let cancel = shutdown.child_token();
    let (pkt_tx, pkt_rx) = mpsc::channel::<Bytes>(cfg.queue_len);
    let handle = SessionHandle {
        id,
        tx: pkt_tx,
        cancel: cancel.clone(),
    };
    let token_index = hello.token;
    let owner = Owner {
        token: hello.token,
        identity: identity(&cfg.credentials, hello.token, hello.client_id.as_deref()),
    };
    if let Some(name) = cfg
        .credentials
        .get(token_index)
        .and_then(|c| c.name.as_ref())
    {
        tracing::Span::current().record("client", tracing::field::display(name));
    }
    let grant = match hub.register(owner, hello.previous, handle) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "refused: {e}");
            let _ = send_and_close(&mut tunnel.tx, failure(e.reason())).await;
            return;
        }
    };
    let addr = grant.addr;
    tracing::Span::current().record("ip", tracing::field::display(addr));
    match (hello.previous, grant.reuse) {
        (None, _) if grant.from_lease => {
            tracing::info!(%addr, "authenticated, its leased address given back")
        }
        (None, _) => tracing::info!(%addr, "authenticated, address assigned"),
        (Some(prev), Reuse::Granted) => {
            tracing::info!(%addr, previous = %prev, "reconnected with its previous address")
        }
        (Some(prev), Reuse::Refused(why)) => {
            tracing::info!(%addr, previous = %prev, reason = why, "reconnected with a new address")
        }
        (Some(_), Reuse::NotAsked) => {}
    }
    if let Some(old) = grant.replaces {
        tracing::info!(replaced = old, "replaced this client's stale session");
    }

    let compression = cfg.compression && hello.offers_lz4;
    let counters = Counters::new_shared();
    let target = SessionTarget {
        addr,
        rate: cfg.rate_limits.get(token_index).copied().flatten(),
        compression,
        stats: StatsHandle::with_session(hub.stats().clone(), counters.clone()),
    };
    if compression {
        tracing::info!("lz4 compression negotiated");
    }
    // Policing drops whole packets: a dropped super-packet would be dozens of
    // segments lost at once, so rate-limited sessions keep to plain packets.
    // Compressed sessions too: a compressed frame never states more than the
    // MTU (PROTOCOL.md §9, §11 [G5]).
    let gso = cfg.offload && hello.offers_gso && target.rate.is_none() && !compression;
    if gso {
        tracing::debug!("segmentation offload negotiated");
    }
    if let Some(r) = target.rate {
        tracing::debug!(
            bytes_per_sec = r.bytes_per_sec(),
            burst_bytes = r.burst_bytes(),
            "rate limited"
        );
    }
    let (decap, encap) = cfg
        .pipeline
        .new_session(&target, HubRouter::new(hub.clone()));
    hub.attach_meta(Arc::new(SessionMeta {
        id,
        addr,
        token_index,
        transport: transport.as_str(),
        peer,
        since: SystemTime::now(),
        compression,
        counters,
    }));

    let welcome = Control::AuthResponse(AuthResponse {
        success: true,
        assigned_ip: Some(addr),
        subnet: Some(hub.subnet().to_string()),
        server_ip: Some(hub.server_ip()),
        mtu: Some(cfg.mtu),
        keepalive_secs: Some(cfg.keepalive.as_secs().max(1)),
        session_id: Some(id.to_string()),
        compression: compression.then(|| COMPRESSION_LZ4.into()),
        offload: gso.then(|| OFFLOAD_GSO.into()),
        ..Default::default()
    });
    let started = Instant::now();
    let reason = match tunnel.tx.send(welcome.into()).await {
        Err(e) => format!("send auth_response: {e}"),
        Ok(()) => {
            let (ctrl_tx, ctrl_rx) = mpsc::channel::<Control>(8);
            let activity = Arc::new(Traffic::new(gso));
            let writer = tokio::spawn(
                writer(
                    tunnel.tx,
                    pkt_rx,
                    ctrl_rx,
                    cfg.keepalive,
                    cancel.clone(),
                    encap,
                    activity.clone(),
                )
                .in_current_span(),
            );
            let reason = reader(
                &cfg,
                &target.stats,
                decap,
                tunnel.rx,
                ctrl_tx,
                &cancel,
                &activity,
            )
            .await;
            match reason {
                Ended::Idle(_) => LimitCounters::hit(&limits.idle_closed),
                Ended::TooLarge(_) => LimitCounters::hit(&limits.frame_too_large),
                Ended::Other(_) => {}
            }
            let reason = reason.to_string();
            cancel.cancel();
            let _ = writer.await;
            reason
        }
    };
    hub.unregister(addr, id);
    tracing::info!(
        %addr,
        reason = %reason,
        duration_s = started.elapsed().as_secs(),
        "session ended"
    );
}

/// Why a connection was refused before it became a session. Public only for
/// the fuzz targets.
#[doc(hidden)]
#[derive(Debug)]
pub enum Refusal {
    Closed,
    Timeout,
    BadToken,
    PacketBeforeAuth,
    NotAuth(String),
    Malformed(String),
    Transport(String),
    /// A first message over `limits.max_frame_size`.
    TooLarge(String),
}

impl Refusal {
    fn log(&self) {
        match self {
            Refusal::Closed => tracing::debug!("closed before authenticating"),
            Refusal::Timeout => tracing::info!("no auth message in time, closing"),
            Refusal::BadToken => tracing::warn!("authentication failed: invalid token"),
            Refusal::PacketBeforeAuth => {
                tracing::warn!("refused: packet sent before authenticating")
            }
            Refusal::NotAuth(kind) => {
                tracing::warn!(%kind, "refused: first message was not auth or reconnect")
            }
            Refusal::Malformed(e) => tracing::warn!(error = %e, "refused: malformed first message"),
            Refusal::Transport(e) => tracing::debug!(error = %e, "transport failed before auth"),
            Refusal::TooLarge(e) => {
                tracing::warn!(error = %e, "refused: first message over limits.max_frame_size")
            }
        }
    }

    /// The `error` sent back, if anything is sent at all.
    pub fn reply(&self) -> Option<&'static str> {
        match self {
            // After an oversized message the stream cannot be read on.
            Refusal::Closed | Refusal::Transport(_) | Refusal::TooLarge(_) => None,
            Refusal::Timeout => Some("auth_timeout"),
            Refusal::BadToken => Some("auth_failed"),
            Refusal::PacketBeforeAuth | Refusal::NotAuth(_) => Some("auth_required"),
            Refusal::Malformed(_) => Some("invalid_message"),
        }
    }
}

async fn handshake(cfg: &SessionConfig, tunnel: &mut Tunnel) -> Result<Hello, Refusal> {
    let first = match tokio::time::timeout(cfg.auth_timeout, tunnel.rx.next()).await {
        Err(_) => return Err(Refusal::Timeout),
        Ok(None) => return Err(Refusal::Closed),
        Ok(Some(Err(e))) if e.is_frame_too_large() => return Err(Refusal::TooLarge(e.to_string())),
        Ok(Some(Err(e))) => return Err(Refusal::Transport(e.to_string())),
        Ok(Some(Ok(f))) => f,
    };
    parse_hello(&cfg.credentials, first)
}

/// Checks the first frame of a connection: an `auth` or `reconnect` with a
/// known token. Pure, so the fuzz target drives exactly this code.
#[doc(hidden)]
pub fn parse_hello(credentials: &[Credential], first: Frame) -> Result<Hello, Refusal> {
    let bytes = match first {
        Frame::Packet(_) => return Err(Refusal::PacketBeforeAuth),
        Frame::Control(b) => b,
    };
    let (token, previous, client_id, offer, offload) = match Control::decode(&bytes) {
        // A control message of a type this server does not know is still "a
        // first control message of another type" (PROTOCOL.md [H4]).
        Err(sallyport_core::message::MessageError::UnknownType(t)) => {
            return Err(Refusal::NotAuth(t))
        }
        Err(e) => return Err(Refusal::Malformed(e.to_string())),
        Ok(Control::Auth(a)) => (a.token, None, a.client_id, a.compression, a.offload),
        Ok(Control::Reconnect(r)) => (
            r.token,
            Some(r.previous_ip),
            r.client_id,
            r.compression,
            r.offload,
        ),
        Ok(other) => return Err(Refusal::NotAuth(other.kind().into())),
    };
    let token = check_token(credentials, &token).ok_or(Refusal::BadToken)?;
    Ok(Hello {
        token,
        previous,
        client_id: client_id.filter(|c| !c.is_empty() && c.len() <= 128),
        offers_lz4: offers_lz4(&offer),
        offers_gso: offload::offers_gso(&offload),
    })
}

/// The index of the matching credential. The given token is hashed and its
/// digest compared with every credential's in constant time, so timing
/// reveals neither which token matched nor how much of one did.
fn check_token(credentials: &[Credential], given: &Token) -> Option<usize> {
    let digest = sallyport_transports::tls::sha256(given.expose().as_bytes());
    let mut found = None;
    for (i, c) in credentials.iter().enumerate() {
        if bool::from(c.digest.ct_eq(&digest)) {
            found = Some(i);
        }
    }
    found
}

/// The identity a lease is bound to: the client's configured name, else a
/// hash of its token's digest and its client id (so the lease file never
/// holds a token), else none.
pub fn identity(
    credentials: &[Credential],
    index: usize,
    client_id: Option<&str>,
) -> Option<String> {
    let cred = credentials.get(index)?;
    if let Some(name) = &cred.name {
        return Some(format!("name:{name}"));
    }
    let id = client_id?;
    let mut input = cred.digest.to_vec();
    input.push(0);
    input.extend_from_slice(id.as_bytes());
    let h = sallyport_transports::tls::sha256(&input);
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("id:{hex}"))
}

fn failure(error: &str) -> Frame {
    Control::AuthResponse(AuthResponse {
        success: false,
        error: Some(error.into()),
        ..Default::default()
    })
    .into()
}

async fn send_and_close(
    tx: &mut FrameSink,
    frame: Frame,
) -> Result<(), sallyport_transports::TransportError> {
    let r = tokio::time::timeout(Duration::from_secs(2), async {
        tx.send(frame).await?;
        tx.close().await
    })
    .await;
    r.unwrap_or(Ok(()))
}

/// What the reader and writer share about the session's packets: whether
/// super-packets may cross (PROTOCOL.md §11), and when the session last
/// carried a packet, for `limits.idle_timeout`.
#[derive(Debug)]
struct Traffic {
    gso: bool,
    start: tokio::time::Instant,
    /// Milliseconds after `start` of the last packet sent to the client.
    last_encap_ms: AtomicU64,
}

impl Traffic {
    fn new(gso: bool) -> Self {
        Self {
            gso,
            start: tokio::time::Instant::now(),
            last_encap_ms: AtomicU64::new(0),
        }
    }

    fn encap(&self) {
        let ms = self.start.elapsed().as_millis();
        self.last_encap_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn last_encap(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_encap_ms.load(Ordering::Relaxed))
    }
}

/// Why the reader stopped (the text is logged).
enum Ended {
    Idle(String),
    /// The client sent a message over `limits.max_frame_size`.
    TooLarge(String),
    Other(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Idle(s) | Ended::TooLarge(s) | Ended::Other(s) => f.write_str(s),
        }
    }
}

async fn reader<D>(
    cfg: &SessionConfig,
    stats: &StatsHandle,
    mut decap: D,
    mut rx: sallyport_transports::FrameStream,
    ctrl: mpsc::Sender<Control>,
    cancel: &CancellationToken,
    activity: &Traffic,
) -> Ended
where
    D: Service<PacketBatch, Response = (), Error = MiddlewareError>,
{
    let closed = || Ended::Other("closed by server (shutdown or replaced)".into());
    // The idle clock restarts at every packet either way: the reader's own
    // for packets from the client, the writer's (shared) for packets to it.
    let idle = cfg.limits.idle_timeout;
    let mut last_decap = activity.start;
    let idle_check = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86_400)));
    tokio::pin!(idle_check);
    let silence = cfg.keepalive * 3;
    let mtu = usize::from(cfg.mtu);
    let mut frames = Vec::with_capacity(MAX_BATCH);
    loop {
        frames.clear();
        let r = tokio::select! {
            _ = cancel.cancelled() => return closed(),
            _ = &mut idle_check, if idle.is_some() => {
                let idle = idle.unwrap_or_default();
                let deadline = last_decap.max(activity.last_encap()) + idle;
                if deadline <= tokio::time::Instant::now() {
                    return Ended::Idle(format!("idle timeout: no packet either way for {idle:?}"));
                }
                idle_check.as_mut().reset(deadline);
                continue;
            }
            r = tokio::time::timeout(silence, recv_ready(&mut rx, &mut frames, MAX_BATCH)) => r,
        };
        let open = match r {
            Err(_) => {
                return Ended::Other(format!(
                    "keepalive timeout: nothing received for {silence:?}"
                ))
            }
            Ok(Err(e)) if e.is_frame_too_large() => {
                return Ended::TooLarge(format!("transport error: {e} (limits.max_frame_size)"))
            }
            Ok(Err(e)) => return Ended::Other(format!("transport error: {e}")),
            Ok(Ok(open)) => open,
        };
        let mut batch = PacketBatch::new();
        for f in frames.drain(..) {
            match f {
                Frame::Packet(p) if admissible(&p, mtu, activity.gso) => batch.push(p),
                Frame::Packet(_) => stats.record_drops(Direction::Decap, DropReason::Malformed, 1),
                Frame::Control(b) => match Control::decode(&b) {
                    Ok(Control::Ping(Ping { seq })) => {
                        let _ = ctrl.try_send(Control::Pong(Pong { seq }));
                    }
                    Ok(Control::Pong(_)) => {}
                    Ok(other) => {
                        tracing::debug!(kind = other.kind(), "ignoring unexpected message")
                    }
                    Err(sallyport_core::message::MessageError::UnknownType(t)) => {
                        tracing::debug!(kind = %t, "ignoring unknown message type")
                    }
                    Err(e) => return Ended::Other(format!("protocol error: {e}")),
                },
            }
        }
        if !batch.is_empty() {
            last_decap = tokio::time::Instant::now();
            // Ready waits for room towards the TUN: back-pressure, not loss.
            let r = tokio::select! {
                _ = cancel.cancelled() => return closed(),
                r = async { decap.ready().await?.call(batch).await } => r,
            };
            if let Err(e) = r {
                return Ended::Other(format!("pipeline: {e}"));
            }
        }
        if !open {
            return Ended::Other("closed by client".into());
        }
    }
}

/// Whether a packet frame from the client may enter the pipeline: a plain
/// packet within the MTU, or, only with offload agreed, a well-formed
/// super-packet.
fn admissible(frame: &[u8], mtu: usize, gso: bool) -> bool {
    if offload::is_envelope(frame) {
        gso && offload::carried(frame).is_ok()
    } else {
        frame.len() <= mtu
    }
}

async fn writer<E>(
    mut tx: FrameSink,
    mut packets: mpsc::Receiver<Bytes>,
    mut ctrl: mpsc::Receiver<Control>,
    keepalive: Duration,
    cancel: CancellationToken,
    mut encap: E,
    activity: Arc<Traffic>,
) where
    E: Service<PacketBatch, Response = PacketBatch, Error = MiddlewareError>,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = Vec::with_capacity(MAX_BATCH);
    let mut plain = Vec::with_capacity(MAX_BATCH);
    let result: Result<(), String> = async {
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(c) = ctrl.recv() => tx.feed(c.into()).await.map_err(|e| e.to_string())?,
                n = packets.recv_many(&mut buf, MAX_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    if !activity.gso {
                        // This client takes super-packets as their segments.
                        for p in buf.drain(..) {
                            if let Err(e) = sallyport_tun::segment(p, &mut plain) {
                                tracing::debug!(error = %e, "cannot segment a super-packet");
                            }
                        }
                        std::mem::swap(&mut buf, &mut plain);
                    }
                    let batch = PacketBatch::from(std::mem::take(&mut buf));
                    let mut out = encap
                        .ready()
                        .await
                        .map_err(|e| format!("pipeline: {e}"))?
                        .call(batch)
                        .await
                        .map_err(|e| format!("pipeline: {e}"))?;
                    if !out.is_empty() {
                        activity.encap();
                    }
                    for p in out.drain() {
                        tx.feed(Frame::Packet(p)).await.map_err(|e| e.to_string())?;
                    }
                    // Reuse the allocation for the next batch.
                    buf = Vec::from(out);
                }
                _ = tick.tick() => tx
                    .feed(Control::Ping(Ping::default()).into())
                    .await
                    .map_err(|e| e.to_string())?,
            }
            tx.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "writer stopped");
    }
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check_finds_the_matching_index_only() {
        let tokens = [Credential::plain("alpha"), Credential::plain("beta")];
        assert_eq!(check_token(&tokens, &Token::new("beta")), Some(1));
        assert_eq!(check_token(&tokens, &Token::new("bet")), None);
        assert_eq!(check_token(&tokens, &Token::new("")), None);
        assert_eq!(check_token(&tokens, &Token::new("alphax")), None);
        let hashed = Credential {
            name: Some("alice".into()),
            digest: sallyport_transports::tls::sha256(b"gamma"),
            ip: None,
        };
        let tokens = [Credential::plain("alpha"), hashed];
        assert_eq!(check_token(&tokens, &Token::new("gamma")), Some(1));
        assert_eq!(
            check_token(&tokens, &Token::new(crate::config::hash_token("gamma"))),
            None,
            "the hash itself is not a token"
        );
    }

    #[test]
    fn identity_is_the_name_else_a_hash_of_token_and_client_id() {
        let creds = [
            Credential::plain("secret-a"),
            Credential::plain("secret-b"),
            Credential {
                name: Some("alice".into()),
                ..Credential::plain("secret-c")
            },
        ];
        assert_eq!(identity(&creds, 2, Some("x")), Some("name:alice".into()));
        assert_eq!(identity(&creds, 2, None), Some("name:alice".into()));
        assert_eq!(identity(&creds, 0, None), None);
        let a = identity(&creds, 0, Some("laptop")).expect("id");
        assert_eq!(identity(&creds, 0, Some("laptop")), Some(a.clone()));
        assert_ne!(identity(&creds, 1, Some("laptop")), Some(a.clone()));
        assert_ne!(identity(&creds, 0, Some("phone")), Some(a.clone()));
        assert!(a.starts_with("id:") && !a.contains("secret") && !a.contains("laptop"));
    }
}
