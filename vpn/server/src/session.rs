//! One client's session: handshake, then a reader (this task) and a writer
//! (a spawned task) until either side ends it.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sallyport_core::message::{
    offers_lz4, AuthResponse, Control, Ping, Pong, Token, COMPRESSION_LZ4,
};
use sallyport_core::{Frame, PacketBatch, MAX_BATCH};
use sallyport_middleware::{Counters, Direction, DropReason, MiddlewareError, Rate, StatsHandle};
use sallyport_transports::{recv_ready, FrameSink, Tunnel};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::hub::{Hub, SessionHandle, SessionMeta};
use crate::pipeline::{HubRouter, NewPipeline, SessionTarget};
use crate::pool::{Owner, Reuse};

/// What every session needs to know, shared.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Accepted tokens.
    pub tokens: Arc<[Token]>,
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
    /// The rate limit of each token's sessions, by token index.
    pub rate_limits: Arc<[Option<Rate>]>,
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
}

async fn run_inner(
    hub: Arc<Hub>,
    cfg: Arc<SessionConfig>,
    mut tunnel: Tunnel,
    id: u64,
    shutdown: CancellationToken,
) {
    let (transport, peer) = (tunnel.info.transport, tunnel.info.peer);
    let hello = match handshake(&cfg, &mut tunnel).await {
        Ok(h) => h,
        Err(refusal) => {
            refusal.log();
            if let Some(error) = refusal.reply() {
                let _ = send_and_close(&mut tunnel.tx, failure(error)).await;
            }
            return;
        }
    };

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
        client_id: hello.client_id,
    };
    let grant = match hub.register(owner, hello.previous, handle) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "refused: {e}");
            let _ = send_and_close(&mut tunnel.tx, failure("pool_exhausted")).await;
            return;
        }
    };
    let addr = grant.addr;
    tracing::Span::current().record("ip", tracing::field::display(addr));
    match (hello.previous, grant.reuse) {
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
        ..Default::default()
    });
    let started = Instant::now();
    let reason = match tunnel.tx.send(welcome.into()).await {
        Err(e) => format!("send auth_response: {e}"),
        Ok(()) => {
            let (ctrl_tx, ctrl_rx) = mpsc::channel::<Control>(8);
            let writer = tokio::spawn(
                writer(
                    tunnel.tx,
                    pkt_rx,
                    ctrl_rx,
                    cfg.keepalive,
                    cancel.clone(),
                    encap,
                )
                .in_current_span(),
            );
            let reason = reader(&cfg, &target.stats, decap, tunnel.rx, ctrl_tx, &cancel).await;
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
        }
    }

    /// The `error` sent back, if anything is sent at all.
    pub fn reply(&self) -> Option<&'static str> {
        match self {
            Refusal::Closed | Refusal::Transport(_) => None,
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
        Ok(Some(Err(e))) => return Err(Refusal::Transport(e.to_string())),
        Ok(Some(Ok(f))) => f,
    };
    parse_hello(&cfg.tokens, first)
}

/// Checks the first frame of a connection: an `auth` or `reconnect` with a
/// known token. Pure, so the fuzz target drives exactly this code.
#[doc(hidden)]
pub fn parse_hello(tokens: &[Token], first: Frame) -> Result<Hello, Refusal> {
    let bytes = match first {
        Frame::Packet(_) => return Err(Refusal::PacketBeforeAuth),
        Frame::Control(b) => b,
    };
    let (token, previous, client_id, offer) = match Control::decode(&bytes) {
        // A control message of a type this server does not know is still "a
        // first control message of another type" (PROTOCOL.md [H4]).
        Err(sallyport_core::message::MessageError::UnknownType(t)) => {
            return Err(Refusal::NotAuth(t))
        }
        Err(e) => return Err(Refusal::Malformed(e.to_string())),
        Ok(Control::Auth(a)) => (a.token, None, a.client_id, a.compression),
        Ok(Control::Reconnect(r)) => (r.token, Some(r.previous_ip), r.client_id, r.compression),
        Ok(other) => return Err(Refusal::NotAuth(other.kind().into())),
    };
    let token = check_token(tokens, &token).ok_or(Refusal::BadToken)?;
    Ok(Hello {
        token,
        previous,
        client_id: client_id.filter(|c| !c.is_empty() && c.len() <= 128),
        offers_lz4: offers_lz4(&offer),
    })
}

/// The index of the matching token. Compares against every token in constant
/// time per token, so timing does not reveal which prefix matched.
fn check_token(tokens: &[Token], given: &Token) -> Option<usize> {
    let mut found = None;
    for (i, t) in tokens.iter().enumerate() {
        if bool::from(t.expose().as_bytes().ct_eq(given.expose().as_bytes())) {
            found = Some(i);
        }
    }
    found
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

async fn reader<D>(
    cfg: &SessionConfig,
    stats: &StatsHandle,
    mut decap: D,
    mut rx: sallyport_transports::FrameStream,
    ctrl: mpsc::Sender<Control>,
    cancel: &CancellationToken,
) -> String
where
    D: Service<PacketBatch, Response = (), Error = MiddlewareError>,
{
    let silence = cfg.keepalive * 3;
    let mtu = usize::from(cfg.mtu);
    let mut frames = Vec::with_capacity(MAX_BATCH);
    loop {
        frames.clear();
        let r = tokio::select! {
            _ = cancel.cancelled() => return "closed by server (shutdown or replaced)".into(),
            r = tokio::time::timeout(silence, recv_ready(&mut rx, &mut frames, MAX_BATCH)) => r,
        };
        let open = match r {
            Err(_) => return format!("keepalive timeout: nothing received for {silence:?}"),
            Ok(Err(e)) => return format!("transport error: {e}"),
            Ok(Ok(open)) => open,
        };
        let mut batch = PacketBatch::new();
        for f in frames.drain(..) {
            match f {
                Frame::Packet(p) if p.len() > mtu => {
                    stats.record_drops(Direction::Decap, DropReason::Malformed, 1)
                }
                Frame::Packet(p) => batch.push(p),
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
                    Err(e) => return format!("protocol error: {e}"),
                },
            }
        }
        if !batch.is_empty() {
            // Ready waits for room towards the TUN: back-pressure, not loss.
            let r = tokio::select! {
                _ = cancel.cancelled() => return "closed by server (shutdown or replaced)".into(),
                r = async { decap.ready().await?.call(batch).await } => r,
            };
            if let Err(e) = r {
                return format!("pipeline: {e}");
            }
        }
        if !open {
            return "closed by client".into();
        }
    }
}

async fn writer<E>(
    mut tx: FrameSink,
    mut packets: mpsc::Receiver<Bytes>,
    mut ctrl: mpsc::Receiver<Control>,
    keepalive: Duration,
    cancel: CancellationToken,
    mut encap: E,
) where
    E: Service<PacketBatch, Response = PacketBatch, Error = MiddlewareError>,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = Vec::with_capacity(MAX_BATCH);
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
                    let batch = PacketBatch::from(std::mem::take(&mut buf));
                    let mut out = encap
                        .ready()
                        .await
                        .map_err(|e| format!("pipeline: {e}"))?
                        .call(batch)
                        .await
                        .map_err(|e| format!("pipeline: {e}"))?;
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
        let tokens = [Token::new("alpha"), Token::new("beta")];
        assert_eq!(check_token(&tokens, &Token::new("beta")), Some(1));
        assert_eq!(check_token(&tokens, &Token::new("bet")), None);
        assert_eq!(check_token(&tokens, &Token::new("")), None);
        assert_eq!(check_token(&tokens, &Token::new("alphax")), None);
    }
}
