//! The Sallyport client: dials the server, authenticates, sets up the TUN
//! device with the assigned address and pumps packets both ways; reconnects
//! forever with exponential backoff.
//!
//! Depends on the transports, the device and the core; never on the server.

pub mod backoff;
pub mod config;
pub mod pipeline;
pub mod state;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use sallyport_core::message::{
    Auth, AuthResponse, Control, Ping, Pong, Reconnect, COMPRESSION_LZ4,
};
use sallyport_core::offload::{self, OFFLOAD_GSO};
use sallyport_core::{Frame, PacketBatch, MAX_BATCH};
use sallyport_middleware::{Counters, StatsHandle};
use sallyport_transports::dial::{self, ClientSettings};
use sallyport_transports::tls::ClientTrust;
use sallyport_transports::{
    recv_ready, Dial, FrameSink, FrameStream, TransportError, TransportKind, Tunnel,
};
use sallyport_tun::{TunConfig, TunDevice, TunError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::pipeline::{PacketStack, SessionTarget};
use crate::state::ClientState;

/// Why the client stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport could not be set up from the config.
    #[error("transport setup: {0}")]
    Setup(#[source] TransportError),
    /// The TUN device could not be created or configured.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// The server refused the token; retrying cannot help.
    #[error("the server refused authentication ({0}): check [auth] token")]
    AuthRejected(String),
}

/// How one connection attempt ended.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("server refused the session: {0}")]
    Refused(String),
    #[error(transparent)]
    Fatal(#[from] ClientError),
}

impl From<TunError> for AttemptError {
    fn from(e: TunError) -> Self {
        AttemptError::Fatal(ClientError::Tun(e))
    }
}

/// The transport settings shared by every dialer.
pub fn settings(cfg: &ClientConfig) -> ClientSettings {
    ClientSettings {
        url: cfg.server.url.clone(),
        trust: ClientTrust {
            insecure: !cfg.server.verify_tls,
            ca_file: cfg.server.ca_file.clone(),
            pins: cfg.pins.clone(),
        },
        proxy: cfg.transport.proxy.clone(),
        sni: cfg.server.sni.clone(),
        host_header: cfg.server.host_header.clone(),
        // Frames from the server are at most one packet of our MTU, or a
        // control message; leave generous room.
        max_frame: usize::from(cfg.vpn.mtu).max(offload::MAX_ENVELOPE),
        timeout: cfg.server.connect_timeout,
    }
}

/// The dialers to try, in order: one for a fixed mode, the configured order
/// for `auto` (raw TLS left out when the URL is cleartext).
pub fn dialers(cfg: &ClientConfig) -> Result<Vec<Box<dyn Dial>>, TransportError> {
    let s = settings(cfg);
    let kinds: Vec<TransportKind> = match cfg.transport.mode {
        config::Mode::Wss => vec![TransportKind::WebSocket],
        config::Mode::H2 => vec![TransportKind::Http2],
        config::Mode::Tls => vec![TransportKind::RawTls],
        config::Mode::Auto => {
            let tls = sallyport_transports::ws::Endpoint::parse(&cfg.server.url)?.tls;
            let mut kinds: Vec<TransportKind> = Vec::new();
            for t in &cfg.transport.order {
                let k = t.kind();
                if (tls || k != TransportKind::RawTls) && !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
            kinds
        }
    };
    kinds.into_iter().map(|k| dial::dialer(k, &s)).collect()
}

/// Checks what `--check-config` can check beyond parsing: the TLS setup and
/// the proxy.
pub fn check(cfg: &ClientConfig) -> Result<(), TransportError> {
    dialers(cfg).map(|_| ())
}

/// Runs the client until `shutdown` is cancelled or a permanent error.
pub async fn run(cfg: ClientConfig, shutdown: CancellationToken) -> Result<(), ClientError> {
    if !cfg.server.verify_tls {
        tracing::warn!(
            "verify_tls = false: the server's certificate is NOT checked (testing only)"
        );
    }
    if !cfg.pins.is_empty() {
        tracing::info!(
            pins = cfg.pins.len(),
            "trusting the server by its pinned public key (names and CAs not checked)"
        );
    }
    let dialers = dialers(&cfg).map_err(ClientError::Setup)?;
    let state_file = cfg.transport.state_file.as_deref();
    let mut stored = state_file.map(ClientState::load).unwrap_or_default();
    let client_id = stored.client_id(state_file);
    let mut state = State {
        device: None,
        previous: None,
        preferred: read_preferred(&cfg, &stored),
        stored,
        counters: Counters::new_shared(),
    };
    let mut backoff = Backoff::new(cfg.reconnect.min_backoff, cfg.reconnect.max_backoff);
    let mut attempt: u64 = 0;
    let result = loop {
        attempt += 1;
        let span = tracing::info_span!("attempt", n = attempt);
        let started = Instant::now();
        let r = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            r = connect_and_run(&cfg, &dialers, &client_id, &mut state, &shutdown).instrument(span) => r,
        };
        match r {
            Ok(reason) => tracing::warn!(%reason, "session ended"),
            Err(AttemptError::Fatal(e)) => break Err(e),
            Err(AttemptError::Refused(reason)) if reason == "auth_failed" => {
                break Err(ClientError::AuthRejected(reason))
            }
            Err(e) => tracing::warn!(error = %e, "connection attempt failed"),
        }
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if started.elapsed() >= cfg.reconnect.stable_after {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    };
    if let Some(dev) = state.device.take() {
        tracing::info!(interface = dev.name(), "removing TUN device");
    }
    result
}

struct State {
    device: Option<TunDevice>,
    previous: Option<Ipv4Addr>,
    /// The transport that worked last (tried first by `auto`).
    preferred: Option<TransportKind>,
    /// What the state file holds.
    stored: ClientState,
    /// Since the client started, over all sessions.
    counters: Arc<Counters>,
}

fn read_preferred(cfg: &ClientConfig, stored: &ClientState) -> Option<TransportKind> {
    if cfg.transport.mode != config::Mode::Auto {
        return None;
    }
    let kind = stored.transport_kind();
    if let (Some(k), Some(path)) = (kind, &cfg.transport.state_file) {
        tracing::info!(transport = %k, file = %path.display(), "trying the last transport that worked first");
    }
    kind
}

fn write_preferred(cfg: &ClientConfig, stored: &mut ClientState, kind: TransportKind) {
    let Some(path) = cfg.transport.state_file.as_ref() else {
        return;
    };
    stored.transport = Some(kind.to_string());
    if let Err(e) = stored.save(path) {
        tracing::warn!(file = %path.display(), error = %e, "cannot remember the transport that worked");
    }
}

#[derive(Debug)]
struct Assigned {
    addr: Ipv4Addr,
    prefix: u8,
    mtu: u16,
    keepalive: Duration,
    compression: bool,
    gso: bool,
}

/// Whether this client offers segmentation offload: Linux only, where the
/// TUN device can take super-packets.
fn offers_offload(cfg: &ClientConfig) -> bool {
    cfg.vpn.offload && cfg!(target_os = "linux")
}

async fn connect_and_run(
    cfg: &ClientConfig,
    dialers: &[Box<dyn Dial>],
    client_id: &str,
    state: &mut State,
    shutdown: &CancellationToken,
) -> Result<String, AttemptError> {
    let auto = cfg.transport.mode == config::Mode::Auto;
    let mut order: Vec<&dyn Dial> = dialers.iter().map(|d| d.as_ref()).collect();
    if let Some(p) = state.preferred {
        order.sort_by_key(|d| d.kind() != p);
    }
    let limit = if auto {
        cfg.transport.attempt_timeout
    } else {
        cfg.server.connect_timeout * 2
    };
    let mut failures = Vec::new();
    let mut established = None;
    for dialer in order {
        let kind = dialer.kind();
        tracing::info!(url = %cfg.server.url, transport = %kind, "connecting");
        let r = tokio::time::timeout(limit, establish(cfg, dialer, client_id, state.previous))
            .await
            .unwrap_or_else(|_| {
                Err(AttemptError::Handshake(format!(
                    "no session within {limit:?}"
                )))
            });
        match r {
            Ok(ok) => {
                established = Some((kind, ok));
                break;
            }
            Err(AttemptError::Refused(reason)) if reason == "auth_failed" => {
                return Err(AttemptError::Refused(reason))
            }
            Err(e) => {
                if auto {
                    tracing::warn!(transport = %kind, error = %e, "transport failed, trying the next");
                }
                failures.push(format!("{kind}: {e}"));
            }
        }
    }
    let Some((kind, (tunnel, assigned))) = established else {
        return Err(AttemptError::Handshake(failures.join("; ")));
    };
    if auto {
        tracing::info!(transport = %kind, "transport selected: {kind}");
        if state.preferred != Some(kind) {
            write_preferred(cfg, &mut state.stored, kind);
            state.preferred = Some(kind);
        }
    }
    match &state.device {
        None => {
            let dev = TunDevice::create(&TunConfig {
                name: cfg.vpn.interface_name.clone(),
                address: assigned.addr,
                prefix: assigned.prefix,
                mtu: assigned.mtu,
                offload: offers_offload(cfg),
            })?;
            state.device = Some(dev);
        }
        Some(dev) if state.previous != Some(assigned.addr) => {
            tracing::warn!(previous = ?state.previous, new = %assigned.addr, "server assigned a different address");
            dev.set_address(assigned.addr, assigned.prefix)?;
        }
        Some(_) => {}
    }
    match state.previous {
        Some(p) if p == assigned.addr => {
            tracing::info!(address = %assigned.addr, "reconnected with the same address")
        }
        _ => {
            tracing::info!(address = %assigned.addr, prefix = assigned.prefix, mtu = assigned.mtu, "connected")
        }
    }
    state.previous = Some(assigned.addr);
    let Some(dev) = state.device.clone() else {
        return Err(AttemptError::Handshake("no device".into()));
    };

    if assigned.compression {
        tracing::info!("lz4 compression negotiated");
    }
    // Super-packets cross the tunnel only when both ends agreed; the device
    // may still lack offload (an old kernel), and then they are cut here.
    let gso = Gso {
        session: assigned.gso,
        device: dev.offload(),
    };
    tracing::debug!(
        session = gso.session,
        device = gso.device,
        "segmentation offload"
    );
    let target = SessionTarget {
        addr: assigned.addr,
        mtu: assigned.mtu,
        compression: assigned.compression,
        stats: StatsHandle::global(state.counters.clone()),
    };
    let (encap_stack, decap_stack) = pipeline::new_session(&cfg.pipeline, &target);

    let session = shutdown.child_token();
    let (ctrl_tx, ctrl_rx) = mpsc::channel::<Control>(8);
    let up = tokio::spawn(
        encap(
            dev.clone(),
            tunnel.tx,
            ctrl_rx,
            assigned.keepalive,
            session.clone(),
            encap_stack,
            gso,
        )
        .in_current_span(),
    );
    let reason = decap(
        dev,
        tunnel.rx,
        ctrl_tx,
        assigned.keepalive,
        &session,
        decap_stack,
        gso,
    )
    .await;
    session.cancel();
    let up_reason = up.await.ok().flatten();
    tracing::info!("stats: {}", state.counters.summary());
    Ok(up_reason.unwrap_or(reason))
}

/// Dials one transport and completes the VPN handshake on it.
async fn establish(
    cfg: &ClientConfig,
    dialer: &dyn Dial,
    client_id: &str,
    previous: Option<Ipv4Addr>,
) -> Result<(Tunnel, Assigned), AttemptError> {
    let mut tunnel = dialer.dial().await?;
    let compression = cfg.vpn.compression.then(|| vec![COMPRESSION_LZ4.into()]);
    let offload = offers_offload(cfg).then(|| vec![OFFLOAD_GSO.into()]);
    let hello = match previous {
        Some(previous_ip) => Control::Reconnect(Reconnect {
            token: cfg.auth.token.clone(),
            previous_ip,
            client_id: Some(client_id.into()),
            compression,
            offload,
        }),
        None => Control::Auth(Auth {
            token: cfg.auth.token.clone(),
            client_id: Some(client_id.into()),
            compression,
            offload,
        }),
    };
    tunnel.tx.send(hello.into()).await?;
    let resp = tokio::time::timeout(
        cfg.server.connect_timeout,
        await_auth_response(&mut tunnel.rx),
    )
    .await
    .map_err(|_| AttemptError::Handshake("no auth_response in time".into()))??;
    let assigned = accept_response(cfg, resp)?;
    Ok((tunnel, assigned))
}

async fn await_auth_response(rx: &mut FrameStream) -> Result<AuthResponse, AttemptError> {
    loop {
        match rx.next().await {
            None => {
                return Err(AttemptError::Handshake(
                    "server closed the connection".into(),
                ))
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Frame::Packet(_))) => {
                return Err(AttemptError::Handshake(
                    "packet before auth_response".into(),
                ))
            }
            Some(Ok(Frame::Control(b))) => match Control::decode(&b) {
                Ok(Control::AuthResponse(r)) => return Ok(r),
                Ok(Control::Ping(_) | Control::Pong(_)) => continue,
                Ok(other) => {
                    return Err(AttemptError::Handshake(format!(
                        "expected auth_response, got {}",
                        other.kind()
                    )))
                }
                Err(e) => return Err(AttemptError::Handshake(e.to_string())),
            },
        }
    }
}

fn accept_response(cfg: &ClientConfig, r: AuthResponse) -> Result<Assigned, AttemptError> {
    if !r.success {
        let reason = r.error.unwrap_or_else(|| "no reason given".into());
        return Err(AttemptError::Refused(reason));
    }
    let bad = |what: &str| AttemptError::Handshake(format!("auth_response: {what}"));
    let addr = r.assigned_ip.ok_or_else(|| bad("no assigned_ip"))?;
    let subnet: ipnet::Ipv4Net = r
        .subnet
        .as_deref()
        .ok_or_else(|| bad("no subnet"))?
        .parse()
        .map_err(|_| bad("subnet is not CIDR"))?;
    if !subnet.contains(&addr) {
        return Err(bad("assigned_ip is outside subnet"));
    }
    let mtu = r.mtu.map_or(cfg.vpn.mtu, |m| m.min(cfg.vpn.mtu));
    if mtu < 576 {
        return Err(bad("mtu below 576"));
    }
    let keepalive = r
        .keepalive_secs
        .filter(|s| *s > 0)
        .map_or(cfg.vpn.keepalive_interval, Duration::from_secs);
    let compression = match r.compression.as_deref() {
        None => false,
        Some(COMPRESSION_LZ4) if cfg.vpn.compression => true,
        Some(other) => {
            return Err(bad(&format!(
                "server chose compression {other:?}, which this client did not offer"
            )))
        }
    };
    let gso = match r.offload.as_deref() {
        None => false,
        Some(OFFLOAD_GSO) if offers_offload(cfg) => true,
        Some(other) => {
            return Err(bad(&format!(
                "server chose offload {other:?}, which this client did not offer"
            )))
        }
    };
    Ok(Assigned {
        addr,
        prefix: subnet.prefix_len(),
        mtu,
        keepalive,
        compression,
        gso,
    })
}

/// Where super-packets may go in this session.
#[derive(Debug, Clone, Copy)]
struct Gso {
    /// Agreed with the server: they may cross the tunnel.
    session: bool,
    /// The device reads and takes them.
    device: bool,
}

/// Inside → outside: TUN packets, pongs and pings into the tunnel. Returns a
/// reason when it ends on its own.
async fn encap(
    dev: TunDevice,
    mut tx: FrameSink,
    mut ctrl: mpsc::Receiver<Control>,
    keepalive: Duration,
    session: CancellationToken,
    mut stack: impl PacketStack,
    gso: Gso,
) -> Option<String> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = BytesMut::new();
    let mut batch = PacketBatch::new();
    let mut plain = Vec::new();
    let r: Result<(), String> = async {
        loop {
            tokio::select! {
                biased;
                _ = session.cancelled() => return Ok(()),
                Some(c) = ctrl.recv() => tx.feed(c.into()).await.map_err(|e| format!("send: {e}"))?,
                _ = tick.tick() => tx.feed(Control::Ping(Ping::default()).into()).await.map_err(|e| format!("send: {e}"))?,
                r = dev.recv_batch(&mut buf, &mut batch) => {
                    r.map_err(|e| format!("TUN read: {e}"))?;
                    if gso.device && !gso.session {
                        // The server takes super-packets as their segments.
                        for p in batch.drain() {
                            if let Err(e) = sallyport_tun::segment(p, &mut plain) {
                                tracing::debug!(error = %e, "cannot segment a super-packet");
                            }
                        }
                        batch = PacketBatch::from(std::mem::take(&mut plain));
                    }
                    let input = std::mem::take(&mut batch);
                    let mut out = stack
                        .ready()
                        .await
                        .map_err(|e| format!("pipeline: {e}"))?
                        .call(input)
                        .await
                        .map_err(|e| format!("pipeline: {e}"))?;
                    for p in out.drain() {
                        tx.feed(Frame::Packet(p)).await.map_err(|e| format!("send: {e}"))?;
                    }
                    // Reuse the allocation for the next read.
                    batch = out;
                }
            }
            tx.flush().await.map_err(|e| format!("send: {e}"))?;
        }
    }
    .await;
    session.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.close()).await;
    r.err()
}

/// Outside → inside: tunnel packets to the TUN, answering pings.
async fn decap(
    dev: TunDevice,
    mut rx: FrameStream,
    ctrl: mpsc::Sender<Control>,
    keepalive: Duration,
    session: &CancellationToken,
    mut stack: impl PacketStack,
    gso: Gso,
) -> String {
    let silence = keepalive * 3;
    let mut frames = Vec::with_capacity(MAX_BATCH);
    let mut batch = PacketBatch::new();
    let mut plain = Vec::new();
    loop {
        frames.clear();
        let r = tokio::select! {
            _ = session.cancelled() => return "closed locally".into(),
            r = tokio::time::timeout(silence, recv_ready(&mut rx, &mut frames, MAX_BATCH)) => r,
        };
        let open = match r {
            Err(_) => return format!("keepalive timeout: server silent for {silence:?}"),
            Ok(Err(e)) => return format!("transport error: {e}"),
            Ok(Ok(open)) => open,
        };
        for f in frames.drain(..) {
            match f {
                Frame::Packet(p) if offload::is_envelope(&p) => {
                    // Only when agreed, and only well-formed: the device
                    // trusts what its virtio header says.
                    match offload::carried(&p) {
                        Ok(_) if gso.session => batch.push(p),
                        Ok(_) => tracing::debug!("dropping a super-packet: offload not agreed"),
                        Err(e) => tracing::debug!(error = %e, "dropping a malformed super-packet"),
                    }
                }
                Frame::Packet(p) => batch.push(p),
                Frame::Control(b) => match Control::decode(&b) {
                    Ok(Control::Ping(Ping { seq })) => {
                        let _ = ctrl.try_send(Control::Pong(Pong { seq }));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "ignoring control message"),
                },
            }
        }
        if !batch.is_empty() {
            let input = std::mem::take(&mut batch);
            let r = async { stack.ready().await?.call(input).await }.await;
            let mut out = match r {
                Ok(out) => out,
                Err(e) => return format!("pipeline: {e}"),
            };
            for p in out.drain() {
                if gso.device {
                    plain.push(p);
                } else if let Err(e) = sallyport_tun::segment(p, &mut plain) {
                    tracing::debug!(error = %e, "cannot segment a super-packet");
                }
                for p in plain.drain(..) {
                    if let Err(e) = dev.send(&p).await {
                        tracing::debug!(error = %e, "TUN write failed");
                    }
                }
            }
            batch = out;
        }
        if !open {
            return "server closed the connection".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(offer: bool) -> ClientConfig {
        let text = format!(
            "[server]\nurl = \"wss://vpn.example.com/tunnel\"\n[auth]\ntoken = \"t\"\n\
             [vpn]\ncompression = {offer}\n"
        );
        ClientConfig::from_toml_str(&text, Path::new("client.toml")).expect("valid")
    }

    fn welcome(compression: Option<&str>) -> AuthResponse {
        AuthResponse {
            success: true,
            assigned_ip: Some(Ipv4Addr::new(10, 100, 0, 2)),
            subnet: Some("10.100.0.0/24".into()),
            server_ip: Some(Ipv4Addr::new(10, 100, 0, 1)),
            mtu: Some(1420),
            compression: compression.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn compression_is_on_only_when_offered_and_accepted() {
        let on = accept_response(&cfg(true), welcome(Some("lz4"))).expect("ok");
        assert!(on.compression);
        let declined = accept_response(&cfg(true), welcome(None)).expect("ok");
        assert!(
            !declined.compression,
            "a server without it answers without it"
        );
        let old = accept_response(&cfg(false), welcome(None)).expect("ok");
        assert!(!old.compression);
    }

    #[test]
    fn compression_the_client_did_not_offer_is_a_handshake_error() {
        for (offer, answer) in [(false, "lz4"), (true, "zstd")] {
            let e = accept_response(&cfg(offer), welcome(Some(answer))).expect_err("refused");
            assert!(
                matches!(e, AttemptError::Handshake(ref m) if m.contains("did not offer")),
                "{e}"
            );
        }
    }
}
