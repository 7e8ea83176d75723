//! Servers for the suite's own tests: the real hub in-process (its sessions,
//! pool and routing over a real TLS/WebSocket listener, with a stand-in for
//! the TUN device), and `mini`, a small purpose-built server into which the
//! tests inject one fault at a time.

#![allow(dead_code)]

pub mod mini;

use std::net::Ipv4Addr;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sallyport_conformance::certs::{self, CertFiles};
use sallyport_conformance::suite::{self, Filter, Report, Target, Timeouts, Transport};
use sallyport_core::ip::{checksum, Ipv4Header};
use sallyport_core::PacketBatch;
use sallyport_middleware::Rate;
use sallyport_server::config::Credential;
use sallyport_server::hub::Hub;
use sallyport_server::pool::IpPool;
use sallyport_server::session::{self, SessionConfig};
use sallyport_transports::listener::{Listener, ListenerConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "conformance-token-1";
pub const TOKEN2: &str = "conformance-token-2";
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const KEEPALIVE: Duration = Duration::from_secs(1);
pub const MTU: u16 = 1420;
pub const MAX_FRAME: usize = 65_535;
/// The real hub's rate limit for the sessions of TOKEN2: bytes per second and
/// burst.
pub const TOKEN2_RATE: (u64, u64) = (200_000, 20_000);

/// What the suite is told about that limit.
pub fn token2_rate_limit() -> suite::RateLimit {
    suite::RateLimit {
        bytes_per_sec: TOKEN2_RATE.0,
        burst_bytes: TOKEN2_RATE.1,
        token: Some(TOKEN2.into()),
    }
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A throwaway certificate for 127.0.0.1, removed on drop.
pub struct Certs {
    dir: PathBuf,
    pub files: CertFiles,
}

impl Certs {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sallyport-conformance-test-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let files = certs::generate(&dir, &["127.0.0.1", "localhost"]).expect("certs");
        Self { dir, files }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS/WebSocket listener on 127.0.0.1, the way the real server makes it.
pub async fn listener(certs: &Certs) -> Listener {
    let tls = sallyport_transports::tls::server_config(
        &certs.files.cert,
        &certs.files.key,
        &[b"http/1.1"],
    )
    .expect("tls config");
    Listener::bind(ListenerConfig {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        plain_addr: None,
        trusted_proxies: vec![],
        static_page: None,
        tls: Arc::new(tls),
        path: "/tunnel".into(),
        max_frame: MAX_FRAME,
        handshake_timeout: Duration::from_secs(5),
        max_pending: 1024,
        max_pending_per_source: 0,
    })
    .await
    .expect("bind")
}

/// What the suite is told about the test servers.
pub fn target(url: &str, certs: &Certs, sessions: usize) -> Target {
    let mut t = Target::new(url, TOKEN);
    t.token2 = Some(TOKEN2.into());
    t.trust.ca_file = Some(certs.files.ca.clone());
    t.timeouts = Timeouts {
        reply: Duration::from_secs(3),
        // Longer than the default: a faulty server's wrong delivery must
        // land inside the window even on a busy 2-core machine.
        quiet: Duration::from_millis(500),
        auth_timeout: AUTH_TIMEOUT,
        margin: Duration::from_secs(1),
        settle: Duration::from_millis(200),
        max_wait: Duration::from_secs(10),
    };
    t.max_frame = MAX_FRAME;
    t.sessions = sessions;
    t
}

/// Runs the suite over WebSocket and prints its lines (shown when a test
/// fails).
pub async fn run_suite(target: Target, filter: &Filter) -> Report {
    run_suite_over(target, &[Transport::Wss], filter).await
}

/// Runs the suite over `transports` and prints its lines.
pub async fn run_suite_over(target: Target, transports: &[Transport], filter: &Filter) -> Report {
    let report = suite::run(target, transports, filter, |o| {
        println!("{}  ({:.2?})", o.line(), o.elapsed)
    })
    .await;
    println!("{}  ({:.1?})", report.summary(), report.elapsed);
    report
}

/// The answer the server's kernel gives to an ICMP echo request for
/// `server_ip`, if `packet` is one.
pub fn kernel_echo_reply(packet: &[u8], server_ip: Ipv4Addr) -> Option<Vec<u8>> {
    let h = Ipv4Header::parse(packet).ok()?;
    let icmp = packet.get(h.header_len..h.total_len)?;
    if h.protocol != 1 || h.dst != server_ip || icmp.len() < 8 || icmp[0] != 8 {
        return None;
    }
    let mut reply = icmp.to_vec();
    reply[0] = 0;
    reply[2..4].copy_from_slice(&[0, 0]);
    let sum = checksum(&reply);
    reply[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(sallyport_core::ip::build_ipv4(h.dst, h.src, 1, &reply))
}

/// The real hub, sessions and pool over a real listener (every transport;
/// compression on; TOKEN2's sessions rate limited to [`TOKEN2_RATE`]); the
/// TUN device is replaced by a task that answers ICMP echo requests to the
/// server address, as the kernel would.
pub struct RealServer {
    pub url: String,
    pub certs: Certs,
    /// The hub, for its counters.
    pub hub: Arc<Hub>,
    shutdown: CancellationToken,
    _listener_task: tokio::task::JoinHandle<()>,
}

impl Drop for RealServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self._listener_task.abort();
    }
}

impl RealServer {
    pub async fn start(subnet: &str) -> Self {
        let certs = Certs::new();
        let mut listener = listener(&certs).await;
        let url = format!("wss://127.0.0.1:{}/tunnel", listener.local_addr().port());
        let subnet: ipnet::Ipv4Net = subnet.parse().expect("subnet");
        let server_ip = subnet.hosts().next().expect("a host");
        let (to_tun, mut from_hub) = mpsc::channel::<PacketBatch>(256);
        let pool = IpPool::new(subnet, server_ip, Duration::from_secs(300));
        let hub = Arc::new(Hub::new(pool, subnet, server_ip, to_tun));
        let cfg = Arc::new(SessionConfig {
            credentials: vec![Credential::plain(TOKEN), Credential::plain(TOKEN2)].into(),
            auth_timeout: AUTH_TIMEOUT,
            keepalive: KEEPALIVE,
            mtu: MTU,
            queue_len: 1024,
            pipeline: sallyport_server::pipeline::NewPipeline {
                anti_spoof: true,
                stats: true,
                compression_threshold: 128,
                mtu: MTU,
            },
            compression: true,
            offload: true,
            rate_limits: vec![
                None,
                Some(Rate::new(
                    NonZeroU64::new(TOKEN2_RATE.0).expect("rate"),
                    NonZeroU64::new(TOKEN2_RATE.1).expect("burst"),
                )),
            ]
            .into(),
            limits: Default::default(),
        });
        let shutdown = CancellationToken::new();
        let tun_hub = hub.clone();
        let own_hub = hub.clone();
        tokio::spawn(async move {
            while let Some(batch) = from_hub.recv().await {
                let mut replies = PacketBatch::new();
                for p in batch {
                    if let Some(r) = kernel_echo_reply(&p, server_ip) {
                        replies.push(Bytes::from(r));
                    }
                }
                if !replies.is_empty() {
                    tun_hub.route_from_tun(&mut replies);
                }
            }
        });
        let ids = AtomicU64::new(1);
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            while let Some(tunnel) = listener.accept().await {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(session::run(
                    hub.clone(),
                    cfg.clone(),
                    tunnel,
                    id,
                    stop.child_token(),
                ));
            }
        });
        Self {
            hub: own_hub,
            url,
            certs,
            shutdown,
            _listener_task: task,
        }
    }
}
