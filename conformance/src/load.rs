//! A load generator: opens many sessions to a server without TUN devices
//! (the transports' dialers and the core's messages, as the suite does), at a
//! bounded concurrency, holds them, optionally sends packets between them,
//! and reports handshakes per second, sessions established, failed and lost,
//! and the server's memory and CPU from `/proc` when given its PID.
//!
//! Every TLS handshake is a full one (resumption off): the figure is for new
//! clients, not returning ones.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sallyport_core::ip::build_ipv4;
use sallyport_core::message::{Auth, Control, Pong, Token};
use sallyport_core::Frame;
use sallyport_transports::connect::Connector;
use sallyport_transports::tls::ClientTrust;
use sallyport_transports::ws::Endpoint;
use sallyport_transports::{Dial, TransportKind, Tunnel};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// What to do.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `wss://host:port/path`.
    pub url: String,
    /// How to verify the server.
    pub trust: ClientTrust,
    /// A token the server accepts.
    pub token: String,
    /// Which transport.
    pub transport: TransportKind,
    /// Sessions to open.
    pub sessions: usize,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// How long to hold the sessions idle after all are open.
    pub hold: Duration,
    /// Then how long to send packets (zero: no traffic phase).
    pub traffic: Duration,
    /// Packets per second each session sends in the traffic phase.
    pub pps: u32,
    /// Payload bytes of each packet (UDP-sized, inside an IPv4 header).
    pub packet_size: usize,
    /// The server's PID, for its RSS and CPU time.
    pub server_pid: Option<u32>,
    /// Time allowed for one session's connect and handshake.
    pub timeout: Duration,
}

/// A process's resident memory and CPU time, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// User + system CPU, seconds.
    pub cpu_s: f64,
}

impl ProcSample {
    /// Reads `/proc/PID/status` and `/proc/PID/stat`.
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) start at 3.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are fields 14 and 15, i.e. 11 and 12 after ')'.
        let hz = rustix::param::clock_ticks_per_second() as f64;
        Ok(Self {
            rss_kib,
            cpu_s: (ticks(11) + ticks(12)) as f64 / hz,
        })
    }
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Sessions asked for.
    pub sessions: usize,
    /// Sessions that got `auth_response` with success.
    pub established: usize,
    /// Sessions that failed to connect or were refused, by first error.
    pub failed: usize,
    /// One failure's message, as an example.
    pub first_error: Option<String>,
    /// Established sessions the server closed before the end.
    pub lost: usize,
    /// Time to open all sessions.
    pub connect_time: Duration,
    /// Established sessions per second of `connect_time`.
    pub handshakes_per_s: f64,
    /// Server before the first connection.
    pub server_before: Option<ProcSample>,
    /// Server with every session open, after the hold.
    pub server_after: Option<ProcSample>,
    /// Server CPU seconds spent while the sessions were being opened.
    pub server_cpu_connect_s: f64,
    /// Server CPU seconds spent while the sessions were held idle.
    pub server_cpu_idle_s: f64,
    /// Server CPU seconds spent in the traffic phase.
    pub server_cpu_traffic_s: f64,
    /// Packets sent in the traffic phase.
    pub packets_sent: u64,
    /// Packets received in the traffic phase.
    pub packets_received: u64,
    /// This process's own RSS at the end, KiB.
    pub generator_rss_kib: u64,
}

impl LoadReport {
    /// Server RSS growth per established session, KiB.
    pub fn rss_per_session_kib(&self) -> Option<f64> {
        let (b, a) = (self.server_before?, self.server_after?);
        (self.established > 0)
            .then(|| (a.rss_kib as f64 - b.rss_kib as f64) / self.established as f64)
    }

    /// The report as `key: value` lines (stable keys, for scripts).
    pub fn lines(&self) -> String {
        let mut s = String::new();
        let mut put = |k: &str, v: String| s.push_str(&format!("{k}: {v}\n"));
        put("sessions", self.sessions.to_string());
        put("established", self.established.to_string());
        put("failed", self.failed.to_string());
        if let Some(e) = &self.first_error {
            put("first_error", e.clone());
        }
        put("lost", self.lost.to_string());
        put(
            "connect_time_s",
            format!("{:.2}", self.connect_time.as_secs_f64()),
        );
        put("handshakes_per_s", format!("{:.0}", self.handshakes_per_s));
        if let (Some(b), Some(a)) = (self.server_before, self.server_after) {
            put("server_rss_before_kib", b.rss_kib.to_string());
            put("server_rss_after_kib", a.rss_kib.to_string());
            if let Some(r) = self.rss_per_session_kib() {
                put("server_rss_per_session_kib", format!("{r:.1}"));
            }
            put(
                "server_cpu_connect_s",
                format!("{:.2}", self.server_cpu_connect_s),
            );
            if self.established > 0 {
                put(
                    "server_cpu_ms_per_handshake",
                    format!(
                        "{:.3}",
                        1000.0 * self.server_cpu_connect_s / self.established as f64
                    ),
                );
            }
            put(
                "server_cpu_idle_s",
                format!("{:.2}", self.server_cpu_idle_s),
            );
            put(
                "server_cpu_traffic_s",
                format!("{:.2}", self.server_cpu_traffic_s),
            );
        }
        put("packets_sent", self.packets_sent.to_string());
        put("packets_received", self.packets_received.to_string());
        if self.packets_sent > 0 {
            put(
                "packets_lost_pct",
                format!(
                    "{:.2}",
                    100.0 * (1.0 - self.packets_received as f64 / self.packets_sent as f64)
                ),
            );
        }
        put("generator_rss_kib", self.generator_rss_kib.to_string());
        s
    }
}

/// Builds the dialer for `cfg` with TLS resumption off.
fn dialer(cfg: &LoadConfig) -> anyhow::Result<Box<dyn Dial>> {
    let ep = Endpoint::parse(&cfg.url)?;
    let connector = if ep.tls {
        let mut tls = sallyport_transports::tls::client_config(&cfg.trust, &[])?;
        tls.resumption = rustls::client::Resumption::disabled();
        Connector::new(
            ep.host.clone(),
            ep.port,
            None,
            Some((Arc::new(tls), ep.host.clone())),
        )?
    } else {
        Connector::new(ep.host.clone(), ep.port, None, None)?
    };
    let max_frame = 65_535;
    Ok(match cfg.transport {
        TransportKind::RawTls => Box::new(sallyport_transports::raw::RawDialer::new(
            connector,
            max_frame,
            cfg.timeout,
        )?),
        TransportKind::WebSocket => Box::new(sallyport_transports::ws::WsDialer::new(
            connector,
            &ep.url,
            None,
            max_frame,
            cfg.timeout,
        )?),
        TransportKind::Http2 => Box::new(sallyport_transports::h2::H2Dialer::new(
            connector,
            &format!("{}:{}", ep.host, ep.port),
            ep.url.path(),
            max_frame,
            cfg.timeout,
        )?),
        TransportKind::Memory => anyhow::bail!("the in-memory transport cannot be dialed"),
    })
}

/// Shared counters of the running sessions.
#[derive(Default)]
struct Live {
    lost: AtomicUsize,
    sent: AtomicU64,
    received: AtomicU64,
}

/// The phase the sessions are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Hold,
    Traffic,
    Stop,
}

async fn open(dialer: &dyn Dial, token: &str, id: usize) -> Result<(Tunnel, Ipv4Addr), String> {
    let mut t = dialer.dial().await.map_err(|e| format!("connect: {e}"))?;
    let hello = Control::Auth(Auth {
        token: Token::new(token),
        client_id: Some(format!("load-{id}")),
        compression: None,
        offload: None,
    });
    t.tx.send(hello.into())
        .await
        .map_err(|e| format!("send auth: {e}"))?;
    loop {
        match t.rx.next().await {
            None => return Err("closed before auth_response".into()),
            Some(Err(e)) => return Err(format!("read auth_response: {e}")),
            Some(Ok(Frame::Control(b))) => match Control::decode(&b) {
                Ok(Control::AuthResponse(r)) if r.success => {
                    let ip = r.assigned_ip.ok_or("no assigned_ip")?;
                    return Ok((t, ip));
                }
                Ok(Control::AuthResponse(r)) => {
                    return Err(format!("refused: {}", r.error.unwrap_or_default()))
                }
                _ => continue,
            },
            Some(Ok(Frame::Packet(_))) => continue,
        }
    }
}

/// Runs one established session until told to stop: answers pings, sends
/// packets to `peer` in the traffic phase, counts what arrives.
async fn drive(
    mut t: Tunnel,
    me: Ipv4Addr,
    peer: watch::Receiver<Option<Ipv4Addr>>,
    mut phase: watch::Receiver<Phase>,
    cfg: Arc<LoadConfig>,
    live: Arc<Live>,
) {
    let every = Duration::from_secs_f64(1.0 / f64::from(cfg.pps.max(1)));
    // Spread the sessions' sends over the interval.
    let offset = every.mul_f64(f64::from(u32::from(me.octets()[3])) / 256.0);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let payload = vec![0x5a; cfg.packet_size];
    loop {
        let sending = *phase.borrow() == Phase::Traffic;
        tokio::select! {
            r = phase.changed() => {
                if r.is_err() || *phase.borrow() == Phase::Stop {
                    let _ = tokio::time::timeout(Duration::from_secs(1), t.tx.close()).await;
                    return;
                }
            }
            f = t.rx.next() => match f {
                None | Some(Err(_)) => {
                    live.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(Frame::Packet(_))) => {
                    live.received.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(Frame::Control(b))) => {
                    if let Ok(Control::Ping(p)) = Control::decode(&b) {
                        let _ = t.tx.send(Control::Pong(Pong { seq: p.seq }).into()).await;
                    }
                }
            },
            _ = tick.tick(), if sending => {
                let Some(dst) = *peer.borrow() else { continue };
                let pkt = build_ipv4(me, dst, 17, &payload);
                if t.tx.send(Frame::Packet(Bytes::from(pkt))).await.is_ok() {
                    live.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Opens `cfg.sessions` sessions and runs the phases; see the module docs.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    let cfg = Arc::new(cfg);
    let dialer: Arc<dyn Dial> = Arc::from(dialer(&cfg)?);
    let sample = |pid: Option<u32>| pid.and_then(|p| ProcSample::read(p).ok());
    let mut report = LoadReport {
        sessions: cfg.sessions,
        server_before: sample(cfg.server_pid),
        ..Default::default()
    };
    let live = Arc::new(Live::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Hold);
    let gate = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut running = JoinSet::new();
    let mut peers = Vec::with_capacity(cfg.sessions);
    let t0 = Instant::now();
    for id in 0..cfg.sessions {
        let permit = gate.clone().acquire_owned().await?;
        let (peer_tx, peer_rx) = watch::channel(None);
        peers.push(peer_tx);
        let (dialer, cfg, live) = (dialer.clone(), cfg.clone(), live.clone());
        let (done, phase) = (done_tx.clone(), phase_rx.clone());
        // Each session is driven (pings answered) from the moment it is
        // open, however long the others take.
        running.spawn(async move {
            let r = tokio::time::timeout(cfg.timeout, open(&*dialer, &cfg.token, id))
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            drop(permit);
            match r {
                Ok((t, ip)) => {
                    let _ = done.send((id, Ok(ip)));
                    drop(done);
                    drive(t, ip, peer_rx, phase, cfg, live).await;
                }
                Err(e) => {
                    let _ = done.send((id, Err(e)));
                }
            }
        });
    }
    drop(done_tx);
    let mut addrs = Vec::new();
    for _ in 0..cfg.sessions {
        let Some((id, r)) = done_rx.recv().await else {
            break;
        };
        match r {
            Ok(ip) => addrs.push((id, ip)),
            Err(e) => {
                report.failed += 1;
                report.first_error.get_or_insert(e);
            }
        }
    }
    report.connect_time = t0.elapsed();
    report.established = addrs.len();
    report.handshakes_per_s = addrs.len() as f64 / report.connect_time.as_secs_f64();
    let connected = sample(cfg.server_pid);
    // Each session sends to the next one's address.
    addrs.sort_unstable();
    for (k, (id, _)) in addrs.iter().enumerate() {
        let next = addrs[(k + 1) % addrs.len()].1;
        let _ = peers[*id].send(Some(next));
    }
    tokio::time::sleep(cfg.hold).await;
    let held = sample(cfg.server_pid);
    report.server_after = held;
    if !cfg.traffic.is_zero() && addrs.len() > 1 {
        let _ = phase_tx.send(Phase::Traffic);
        tokio::time::sleep(cfg.traffic).await;
        let _ = phase_tx.send(Phase::Hold);
        // Let what is in flight arrive.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let end = sample(cfg.server_pid);
    report.lost = live.lost.load(Ordering::Relaxed);
    report.packets_sent = live.sent.load(Ordering::Relaxed);
    report.packets_received = live.received.load(Ordering::Relaxed);
    let cpu = |s: Option<ProcSample>| s.map(|s| s.cpu_s).unwrap_or(0.0);
    report.server_cpu_connect_s = cpu(connected) - cpu(report.server_before);
    report.server_cpu_idle_s = cpu(held) - cpu(connected);
    report.server_cpu_traffic_s = cpu(end) - cpu(held);
    let _ = phase_tx.send(Phase::Stop);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while running.join_next().await.is_some() {}
    })
    .await;
    running.abort_all();
    report.generator_rss_kib = ProcSample::read(std::process::id())
        .map(|s| s.rss_kib)
        .unwrap_or(0);
    Ok(report)
}

/// Raises this process's soft limit on open files to its hard limit (every
/// session is a socket); returns the new soft limit.
pub fn raise_open_files() -> std::io::Result<Option<u64>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let hard = getrlimit(Resource::Nofile).maximum;
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: hard,
            maximum: hard,
        },
    )?;
    Ok(getrlimit(Resource::Nofile).current)
}

/// The CA file argument as trust.
pub fn trust(ca: Option<PathBuf>, insecure: bool) -> ClientTrust {
    ClientTrust {
        insecure,
        ca_file: ca,
        pins: Vec::new(),
    }
}

/// A slowloris flood: connections that never authenticate.
#[derive(Debug, Clone)]
pub struct FloodConfig {
    /// The server's TLS port.
    pub url: String,
    /// How to verify the server (for the connections that do TLS).
    pub trust: ClientTrust,
    /// Connections to open: a third send nothing after TCP, a third send one
    /// byte a second, a third complete TLS (raw ALPN) and then send nothing.
    pub connections: usize,
    /// How long to wait for the server to close them all.
    pub wait: Duration,
}

/// What the server did with the flood.
#[derive(Debug, Clone, Default)]
pub struct FloodReport {
    /// Connections attempted.
    pub connections: usize,
    /// Closed by the server within 200 ms of opening (refused at accept; a
    /// refusal after a wait in the server's accept backlog counts as timed out).
    pub refused: usize,
    /// Closed by the server later (timed out).
    pub timed_out: usize,
    /// Still open when the wait ended.
    pub still_open: usize,
    /// Could not connect at all.
    pub connect_failed: usize,
    /// The longest time a connection was held open by the server.
    pub longest_held: Duration,
}

impl FloodReport {
    /// The report as `key: value` lines.
    pub fn lines(&self) -> String {
        format!(
            "flood_connections: {}\nflood_refused: {}\nflood_timed_out: {}\nflood_still_open: {}\n\
             flood_connect_failed: {}\nflood_longest_held_s: {:.2}\n",
            self.connections,
            self.refused,
            self.timed_out,
            self.still_open,
            self.connect_failed,
            self.longest_held.as_secs_f64()
        )
    }
}

enum Held {
    Refused,
    TimedOut(Duration),
    StillOpen,
    ConnectFailed,
}

async fn hold_open(connector: Arc<Connector>, kind: usize, wait: Duration) -> Held {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t0 = Instant::now();
    let addr = format!("{}:{}", connector.host, connector.port);
    let mut io: sallyport_transports::connect::BoxIo = if kind == 2 {
        match connector.connect(sallyport_transports::raw::ALPN).await {
            Ok((io, _, _)) => io,
            // Dropped at accept shows up as a failed handshake.
            Err(_) if t0.elapsed() < Duration::from_millis(200) => return Held::Refused,
            Err(_) => return Held::TimedOut(t0.elapsed()),
        }
    } else {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(s) => Box::new(s),
            Err(_) => return Held::ConnectFailed,
        }
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut drip = tokio::time::interval(Duration::from_secs(1));
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Held::StillOpen,
            r = io.read(&mut buf) => match r {
                Ok(n) if n > 0 => continue,
                _ => break,
            },
            _ = drip.tick(), if kind == 1 => {
                // The first byte of a TLS record, one at a time.
                if io.write_all(&[0x16]).await.is_err() {
                    break;
                }
            }
        }
    }
    let held = t0.elapsed();
    if held < Duration::from_millis(200) {
        Held::Refused
    } else {
        Held::TimedOut(held)
    }
}

/// Opens the flood at once and waits until the server has closed every
/// connection or `wait` has passed.
pub async fn flood(cfg: FloodConfig) -> anyhow::Result<FloodReport> {
    let ep = Endpoint::parse(&cfg.url)?;
    let mut tls = sallyport_transports::tls::client_config(&cfg.trust, &[])?;
    tls.resumption = rustls::client::Resumption::disabled();
    let connector = Arc::new(Connector::new(
        ep.host.clone(),
        ep.port,
        None,
        Some((Arc::new(tls), ep.host.clone())),
    )?);
    let mut set = JoinSet::new();
    // Over about a second: all at once would overflow the server's accept
    // backlog, and the kernel would leave some connections half-open on this
    // side only, which tests nothing about the server.
    for i in 0..cfg.connections {
        set.spawn(hold_open(connector.clone(), i % 3, cfg.wait));
        if i % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut r = FloodReport {
        connections: cfg.connections,
        ..Default::default()
    };
    while let Some(h) = set.join_next().await {
        match h {
            Ok(Held::Refused) => r.refused += 1,
            Ok(Held::TimedOut(d)) => {
                r.timed_out += 1;
                r.longest_held = r.longest_held.max(d);
            }
            Ok(Held::StillOpen) => r.still_open += 1,
            Ok(Held::ConnectFailed) | Err(_) => r.connect_failed += 1,
        }
    }
    Ok(r)
}
