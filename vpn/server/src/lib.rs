//! The Sallyport server: accepts tunnels, authenticates clients, leases them
//! addresses and routes packets between them and the server's TUN device.
//!
//! Depends on the transports, the device and the core; never on the client.

pub mod admin;
pub mod config;
pub mod hub;
pub mod leases;
pub mod limits;
pub mod pipeline;
pub mod pool;
pub mod session;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use sallyport_core::PacketBatch;
use sallyport_transports::listener::{Listener, ListenerConfig};
use sallyport_transports::TransportError;
use sallyport_tun::{TunConfig, TunDevice, TunError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::hub::Hub;
use crate::leases::LeaseFile;
use crate::pipeline::NewPipeline;
use crate::pool::IpPool;
use crate::session::{SessionConfig, SessionLimits};
use sallyport_middleware::{Direction, DropReason};
use sallyport_transports::tls::CertStore;

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Certificate or key unusable.
    #[error(transparent)]
    Tls(#[from] sallyport_transports::tls::TlsConfigError),
    /// Could not listen.
    #[error("listen: {0}")]
    Listen(#[source] TransportError),
    /// The static page could not be read.
    #[error("read server.static_page {path}: {source}")]
    StaticPage {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Could not create or use the TUN device.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// Could not listen for the admin endpoint.
    #[error("admin listen_addr {addr}: {source}")]
    AdminListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TUN device failed while running.
    #[error("TUN device {name} failed: {source}")]
    TunIo {
        /// Interface.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Builds the parts that need no privileges and checks the certificate: what
/// `--check-config` verifies beyond parsing.
pub fn check(cfg: &ServerConfig) -> Result<(), ServerError> {
    sallyport_transports::tls::server_config(&cfg.server.tls_cert, &cfg.server.tls_key, &[])?;
    Ok(())
}

/// The pin (base64 SHA-256 of the public key) of the configured certificate,
/// for clients' `server.pin_sha256`.
pub fn print_pin(cfg: &ServerConfig) -> Result<String, ServerError> {
    let store = CertStore::load(&cfg.server.tls_cert, &cfg.server.tls_key)?;
    let pin = store
        .pin()
        .map_err(sallyport_transports::tls::TlsConfigError::Rustls)?;
    Ok(sallyport_transports::tls::format_pin(&pin))
}

/// Raises the soft limit on open files to the hard limit: every session is
/// a socket, and the usual soft limit of 1024 would cap the server at about
/// a thousand clients. Returns the soft limit before and after.
pub fn raise_nofile_limit() -> std::io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        )?;
    }
    Ok((before.current, getrlimit(Resource::Nofile).current))
}

/// Runs the server until `shutdown` is cancelled, then stops accepting, closes
/// every session and removes the TUN device.
pub async fn run(cfg: ServerConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let certs = CertStore::load(&cfg.server.tls_cert, &cfg.server.tls_key)?;
    let tls = sallyport_transports::tls::server_config_with(certs.clone(), &[])?;
    let static_page = match &cfg.server.static_page {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|source| ServerError::StaticPage {
                    path: p.clone(),
                    source,
                })?
                .into(),
        ),
        None => None,
    };
    let mut listener = Listener::bind(ListenerConfig {
        listen_addr: cfg.server.listen_addr,
        plain_addr: cfg.server.plain_listen_addr,
        trusted_proxies: cfg.server.trusted_proxies.clone(),
        static_page,
        tls: Arc::new(tls),
        path: cfg.server.path.clone(),
        max_frame: cfg.limits.max_frame_size,
        handshake_timeout: cfg.limits.auth_timeout,
        max_pending: cfg.limits.max_unauthenticated,
        max_pending_per_source: cfg.limits.max_unauthenticated_per_source,
    })
    .await
    .map_err(ServerError::Listen)?;
    tracing::info!(
        addr = %listener.local_addr(),
        path = %cfg.server.path,
        "listening (TLS: raw sallyport/1, h2, http/1.1)"
    );
    if let Some(plain) = listener.plain_addr() {
        tracing::info!(addr = %plain, "listening (cleartext: http/1.1 websocket, h2c)");
    }

    let tun = TunDevice::create(&TunConfig {
        name: cfg.vpn.interface_name.clone(),
        address: cfg.vpn.server_ip,
        prefix: cfg.vpn.subnet.prefix_len(),
        mtu: cfg.vpn.mtu,
        offload: cfg.vpn.offload,
    })?;
    let offload =
        cfg.vpn.offload && cfg.limits.max_frame_size >= sallyport_core::offload::MAX_ENVELOPE;
    if cfg.vpn.offload && !offload {
        tracing::warn!(
            max_frame_size = cfg.limits.max_frame_size,
            "vpn.offload needs limits.max_frame_size of at least {}: not offered to clients",
            sallyport_core::offload::MAX_ENVELOPE
        );
    }

    let (to_tun, from_hub) = mpsc::channel::<PacketBatch>(256);
    let mut pool = IpPool::new(cfg.vpn.subnet, cfg.vpn.server_ip, cfg.vpn.lease_grace)
        .with_lease_time(cfg.vpn.lease_time);
    for c in &cfg.credentials {
        if let (Some(name), Some(ip)) = (&c.name, c.ip) {
            pool = pool.with_fixed(format!("name:{name}"), ip);
        }
    }
    let hub = Arc::new(
        Hub::new(pool, cfg.vpn.subnet, cfg.vpn.server_ip, to_tun)
            .with_device(tun.clone())
            .with_max_sessions_per_token(cfg.limits.max_sessions_per_token),
    );
    hub.limits()
        .set_listener_refused(listener.refused_counter());
    let lease_file = lease_file(&cfg);
    if let Some(f) = &lease_file {
        let saved = f.load();
        let n = hub.restore_leases(&saved);
        tracing::info!(file = %f.path().display(), restored = n, in_file = saved.len(), "leases restored");
    }
    let session_cfg = Arc::new(SessionConfig {
        credentials: cfg.credentials.clone().into(),
        auth_timeout: cfg.limits.auth_timeout,
        keepalive: cfg.vpn.keepalive_interval,
        mtu: cfg.vpn.mtu,
        queue_len: cfg.limits.session_queue,
        pipeline: NewPipeline {
            anti_spoof: cfg.pipeline.anti_spoof,
            stats: cfg.pipeline.stats,
            compression_threshold: cfg.compression.threshold_bytes,
            mtu: cfg.vpn.mtu,
        },
        compression: cfg.compression.enabled,
        offload,
        rate_limits: cfg.rate_limits.clone().into(),
        limits: SessionLimits::new(
            cfg.limits.idle_timeout,
            cfg.limits.auth_failures_per_minute,
            cfg.limits.max_unauthenticated,
            cfg.limits.max_unauthenticated_per_source,
        ),
    });
    if !cfg.pipeline.anti_spoof {
        tracing::warn!("[pipeline] anti_spoof = false: clients may send from any source address");
    }
    let admin = match cfg.admin.listen_addr {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::AdminListen { addr, source })?;
            tracing::info!(%addr, "admin endpoint: /metrics, /status, /healthz");
            let per_session = cfg.admin.per_session_metrics;
            Some(tokio::spawn(admin::serve(l, hub.clone(), per_session)))
        }
    };

    let tun_writer = tokio::spawn(tun_writer(tun.clone(), from_hub, hub.clone()));
    let mut tun_reader = tokio::spawn(tun_reader(tun.clone(), hub.clone()));
    let stats = tokio::spawn(stats_logger(hub.clone(), cfg.vpn.stats_interval));
    let persist = lease_file
        .clone()
        .map(|f| tokio::spawn(persist_leases(hub.clone(), f)));
    let reloader = tokio::spawn(reload_on_sighup(certs));
    let sessions = TaskTracker::new();
    let ids = AtomicU64::new(1);

    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            r = &mut tun_reader => {
                break match r {
                    Ok(Err(source)) => Err(ServerError::TunIo { name: tun.name().into(), source }),
                    _ => Ok(()),
                };
            }
            t = listener.accept() => {
                let Some(tunnel) = t else { break Ok(()) };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                sessions.spawn(session::run(hub.clone(), session_cfg.clone(), tunnel, id, shutdown.child_token()));
            }
        }
    };

    tracing::info!(sessions = hub.sessions(), "shutting down");
    drop(listener);
    hub.cancel_all();
    shutdown.cancel();
    sessions.close();
    if tokio::time::timeout(Duration::from_secs(3), sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sessions did not close within 3s");
    }
    tun_reader.abort();
    tun_writer.abort();
    stats.abort();
    reloader.abort();
    if let Some(p) = persist {
        p.abort();
    }
    if let Some(f) = lease_file {
        // Live sessions' leases last `lease_time` from now: their clients
        // have that long to come back to a restarted server.
        save_leases(&hub, f).await;
    }
    if let Some(a) = admin {
        a.abort();
    }
    let _ = tun_reader.await;
    let _ = tun_writer.await;
    tracing::info!(interface = tun.name(), "removing TUN device");
    drop(tun);
    tracing::info!("stopped");
    result
}

/// The lease file, unless `vpn.lease_file = ""`.
fn lease_file(cfg: &ServerConfig) -> Option<LeaseFile> {
    let path = &cfg.vpn.lease_file;
    if path.as_os_str().is_empty() {
        tracing::info!("vpn.lease_file = \"\": leases are not kept across restarts");
        return None;
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => {
            tracing::warn!(file = %path.display(), "the lease file's directory does not exist: leases are not kept across restarts");
            None
        }
        _ => Some(LeaseFile::new(path.clone())),
    }
}

/// Writes the lease file after changes, at most every 100 ms.
async fn persist_leases(hub: Arc<Hub>, file: LeaseFile) {
    loop {
        hub.leases_changed().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        save_leases(&hub, file.clone()).await;
    }
}

async fn save_leases(hub: &Hub, file: LeaseFile) {
    let leases = hub.lease_snapshot();
    let r = tokio::task::spawn_blocking(move || file.save(&leases).map_err(|e| (file, e))).await;
    if let Ok(Err((file, e))) = r {
        tracing::warn!(file = %file.path().display(), error = %e, "cannot write the lease file");
    }
}

/// SIGHUP: reload the certificate and key; on any error keep the old ones.
async fn reload_on_sighup(certs: Arc<CertStore>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("no SIGHUP handler: the certificate cannot be reloaded");
        return;
    };
    while hup.recv().await.is_some() {
        match certs.reload() {
            Ok(()) => tracing::info!("SIGHUP: certificate and key reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: certificate reload failed, keeping the old one")
            }
        }
    }
}

async fn tun_reader(tun: TunDevice, hub: Arc<Hub>) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    let mut batch = PacketBatch::new();
    loop {
        tun.recv_batch(&mut buf, &mut batch).await?;
        hub.route_from_tun(&mut batch);
    }
}

async fn tun_writer(tun: TunDevice, mut rx: mpsc::Receiver<PacketBatch>, hub: Arc<Hub>) {
    let mut plain = Vec::new();
    while let Some(batch) = rx.recv().await {
        for p in batch {
            // A device without offload takes super-packets as their segments.
            if tun.offload() {
                plain.push(p);
            } else if let Err(e) = sallyport_tun::segment(p, &mut plain) {
                tracing::debug!(error = %e, "cannot segment a super-packet");
                hub.drop_packet(Direction::Decap, DropReason::Malformed);
            }
            for p in plain.drain(..) {
                if let Err(e) = tun.send(&p).await {
                    tracing::debug!(error = %e, "TUN write failed");
                    hub.drop_packet(Direction::Decap, DropReason::TunUnavailable);
                }
            }
        }
        hub.tun_written();
    }
}

async fn stats_logger(hub: Arc<Hub>, every: Duration) {
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        tracing::info!(
            sessions = hub.sessions(),
            "stats: {}",
            hub.stats().summary()
        );
    }
}
