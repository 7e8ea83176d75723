//! The hub: which session owns which address, and where each packet goes.
//!
//! Routing (docs/PROTOCOL.md, "Routing"): a packet from a client to another
//! client goes straight to that client's queue; to the server address or
//! outside the subnet it goes to the TUN device; from the TUN it goes to the
//! client owning the destination, else it is dropped and counted. Packets
//! from a client whose source is not its assigned address never get here:
//! the session's anti-spoof layer (see [`crate::pipeline`]) drops them.
//!
//! The hub counts its own drops (no route, full queue, TUN gone) into the
//! same global [`Counters`] as the pipeline layers.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use ipnet::Ipv4Net;
use sallyport_core::ip::IpHeader;
use sallyport_core::offload;
use sallyport_core::PacketBatch;
use sallyport_middleware::{Counters, Direction, DropReason};
use sallyport_tun::TunDevice;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits::{LimitCounters, TokenSessions};
use crate::pool::{Exhausted, Grant, IpPool, Owner};

/// Why a session could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// No free address.
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    /// The token already has as many sessions as it may.
    #[error("token already has {live} sessions (limits.max_sessions_per_token = {max})")]
    TokenLimit {
        /// Its sessions now.
        live: usize,
        /// The limit.
        max: usize,
    },
}

impl RegisterError {
    /// The `error` reason sent to the client.
    pub fn reason(&self) -> &'static str {
        match self {
            RegisterError::Exhausted(_) => "pool_exhausted",
            RegisterError::TokenLimit { .. } => "too_many_sessions",
        }
    }
}

/// How the hub reaches a session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// Server-wide unique id.
    pub id: u64,
    /// Packets towards the client.
    pub tx: mpsc::Sender<Bytes>,
    /// Ends the session (used when a reconnect replaces it).
    pub cancel: CancellationToken,
}

/// Sessions, addresses and the routing between them.
#[derive(Debug)]
pub struct Hub {
    subnet: Ipv4Net,
    server_ip: Ipv4Addr,
    routes: RwLock<HashMap<Ipv4Addr, SessionHandle>>,
    pool: Mutex<IpPool>,
    to_tun: mpsc::Sender<PacketBatch>,
    /// The device, for writing to it from the session's own task.
    device: Option<TunDevice>,
    /// Batches in the TUN writer's queue or being written by it.
    tun_backlog: AtomicUsize,
    stats: Arc<Counters>,
    meta: RwLock<BTreeMap<u64, Arc<SessionMeta>>>,
    /// Signalled whenever a lease may have changed (for the lease file).
    leases_changed: tokio::sync::Notify,
    token_sessions: TokenSessions,
    limits: Arc<LimitCounters>,
}

/// What the status endpoint shows about a session.
#[derive(Debug)]
pub struct SessionMeta {
    /// Server-wide unique id.
    pub id: u64,
    /// Assigned tunnel address.
    pub addr: Ipv4Addr,
    /// Which of `auth.tokens` it authenticated with.
    pub token_index: usize,
    /// Transport name (`wss`, ...).
    pub transport: &'static str,
    /// The peer's socket address, if known.
    pub peer: Option<SocketAddr>,
    /// When the session was established.
    pub since: SystemTime,
    /// Whether lz4 compression was negotiated.
    pub compression: bool,
    /// The session's own counters.
    pub counters: Arc<Counters>,
}

impl Hub {
    /// A hub for `subnet`; packets for the server or beyond go to `to_tun`.
    pub fn new(
        pool: IpPool,
        subnet: Ipv4Net,
        server_ip: Ipv4Addr,
        to_tun: mpsc::Sender<PacketBatch>,
    ) -> Self {
        Self {
            subnet,
            server_ip,
            routes: RwLock::new(HashMap::new()),
            pool: Mutex::new(pool),
            to_tun,
            device: None,
            tun_backlog: AtomicUsize::new(0),
            stats: Counters::new_shared(),
            meta: RwLock::new(BTreeMap::new()),
            leases_changed: tokio::sync::Notify::new(),
            token_sessions: TokenSessions::new(0),
            limits: Arc::default(),
        }
    }

    /// Writes packets for the TUN straight to `device` from the task that
    /// routed them ([`Hub::write_to_tun`]).
    pub fn with_device(mut self, device: TunDevice) -> Self {
        self.device = Some(device);
        self
    }

    /// Limits every token to `max` concurrent sessions (0: unlimited).
    pub fn with_max_sessions_per_token(mut self, max: usize) -> Self {
        self.token_sessions = TokenSessions::new(max);
        self
    }

    /// The counters of limits hit.
    pub fn limits(&self) -> &Arc<LimitCounters> {
        &self.limits
    }

    /// The global counters.
    pub fn stats(&self) -> &Arc<Counters> {
        &self.stats
    }

    /// The queue towards the TUN writer.
    pub fn tun_sender(&self) -> mpsc::Sender<PacketBatch> {
        self.to_tun.clone()
    }

    /// Writes a batch bound for the TUN device from the calling task: a TUN
    /// write does not wait on Linux, and skipping the hop to the TUN writer
    /// task takes a thread wake-up off every packet's way (round-trip time).
    /// Returns what is left for the writer: everything while it still has a
    /// backlog (so that packets stay in order), the rest once the device
    /// would block, and super-packets a device without offload cannot take.
    pub fn write_to_tun(&self, mut batch: PacketBatch) -> PacketBatch {
        let Some(device) = &self.device else {
            return batch;
        };
        if self.tun_backlog.load(Ordering::Acquire) != 0 {
            return batch;
        }
        let mut left = PacketBatch::new();
        for p in batch.drain() {
            if !left.is_empty() || (!device.offload() && offload::is_envelope(&p)) {
                left.push(p);
                continue;
            }
            match device.try_send(&p) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => left.push(p),
                Err(e) => {
                    tracing::debug!(error = %e, "TUN write failed");
                    self.drop_packet(Direction::Decap, DropReason::TunUnavailable);
                }
            }
        }
        left
    }

    /// Counts a batch handed to the TUN writer (until [`Hub::tun_written`]).
    pub fn tun_queued(&self) {
        self.tun_backlog.fetch_add(1, Ordering::AcqRel);
    }

    /// The TUN writer has written a batch.
    pub fn tun_written(&self) {
        self.tun_backlog.fetch_sub(1, Ordering::AcqRel);
    }

    /// Lists a session for the status endpoint (until it unregisters).
    pub fn attach_meta(&self, meta: Arc<SessionMeta>) {
        let mut m = self.meta.write().unwrap_or_else(|p| p.into_inner());
        m.insert(meta.id, meta);
    }

    /// The sessions listed, by id.
    pub fn session_meta(&self) -> Vec<Arc<SessionMeta>> {
        let m = self.meta.read().unwrap_or_else(|p| p.into_inner());
        m.values().cloned().collect()
    }

    /// The tunnel subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The server's address.
    pub fn server_ip(&self) -> Ipv4Addr {
        self.server_ip
    }

    /// Number of registered sessions.
    pub fn sessions(&self) -> usize {
        self.routes.read().map(|r| r.len()).unwrap_or(0)
    }

    /// Leases an address and registers the session under it. A session of the
    /// same client that this one replaces is cancelled. A token at its
    /// session limit gets no new session, unless the new one replaces one of
    /// its own (a client coming back before its stale session timed out).
    pub fn register(
        &self,
        owner: Owner,
        previous: Option<Ipv4Addr>,
        handle: SessionHandle,
    ) -> Result<Grant, RegisterError> {
        let grant = {
            let token = owner.token;
            let now = Instant::now();
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let grant = pool.acquire(owner, handle.id, previous, now)?;
            if grant.replaces.is_none() && !self.token_sessions.has_room(token) {
                pool.undo(grant.addr, handle.id);
                LimitCounters::hit(&self.limits.token_sessions_refused);
                return Err(RegisterError::TokenLimit {
                    live: self.token_sessions.live(token),
                    max: self.token_sessions.max(),
                });
            }
            self.token_sessions.add(handle.id, token);
            grant
        };
        let old = {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            routes.insert(grant.addr, handle)
        };
        if let Some(old) = old {
            old.cancel.cancel();
        }
        self.leases_changed.notify_one();
        Ok(grant)
    }

    /// Resolves after a lease may have changed since the last call.
    pub async fn leases_changed(&self) {
        self.leases_changed.notified().await
    }

    /// The identified clients' leases, for the lease file.
    pub fn lease_snapshot(&self) -> Vec<crate::pool::SavedLease> {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.snapshot(Instant::now(), SystemTime::now())
    }

    /// Takes back leases from the lease file; returns how many.
    pub fn restore_leases(&self, saved: &[crate::pool::SavedLease]) -> usize {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.restore(saved, Instant::now(), SystemTime::now())
    }

    /// The session ended: forget its route and hold its address.
    pub fn unregister(&self, addr: Ipv4Addr, session: u64) {
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            if routes.get(&addr).is_some_and(|h| h.id == session) {
                routes.remove(&addr);
            }
        }
        {
            let mut m = self.meta.write().unwrap_or_else(|p| p.into_inner());
            m.remove(&session);
        }
        self.token_sessions.remove(session);
        {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.release(addr, session, Instant::now());
        }
        self.leases_changed.notify_one();
    }

    /// Routes a batch that arrived from a client (after its pipeline). Packets
    /// for the TUN are returned as one batch for the caller to send, so that
    /// no lock is held across an await.
    pub fn route_from_client(&self, batch: &mut PacketBatch) -> PacketBatch {
        let mut to_tun = PacketBatch::new();
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for packet in batch.drain() {
            let dst = match IpHeader::parse(offload::ip_bytes(&packet)) {
                Ok(IpHeader::V4(h)) => h.dst,
                Ok(IpHeader::V6(_)) => {
                    self.drop_packet(Direction::Decap, DropReason::Ipv6);
                    continue;
                }
                Err(e) => {
                    tracing::trace!(error = %e, "malformed packet from client");
                    self.drop_packet(Direction::Decap, DropReason::Malformed);
                    continue;
                }
            };
            if dst == self.server_ip || !self.subnet.contains(&dst) {
                to_tun.push(packet);
                continue;
            }
            match routes.get(&dst) {
                Some(peer) => self.enqueue(peer, packet),
                None => self.drop_packet(Direction::Decap, DropReason::NoRoute),
            }
        }
        to_tun
    }

    /// Routes a batch read from the TUN device to the owning clients.
    pub fn route_from_tun(&self, batch: &mut PacketBatch) {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for packet in batch.drain() {
            let dst = match IpHeader::parse(offload::ip_bytes(&packet)).map(|h| h.dst()) {
                Ok(IpAddr::V4(d)) => d,
                Ok(IpAddr::V6(_)) => {
                    self.drop_packet(Direction::Encap, DropReason::Ipv6);
                    continue;
                }
                Err(_) => {
                    self.drop_packet(Direction::Encap, DropReason::Malformed);
                    continue;
                }
            };
            match routes.get(&dst) {
                Some(peer) => self.enqueue(peer, packet),
                None => self.drop_packet(Direction::Encap, DropReason::NoRoute),
            }
        }
    }

    fn enqueue(&self, peer: &SessionHandle, packet: Bytes) {
        // A slow client fills only its own queue; never wait on it.
        if peer.tx.try_send(packet).is_err() {
            self.drop_packet(Direction::Encap, DropReason::QueueFull);
        }
    }

    /// Counts a packet the hub dropped.
    pub fn drop_packet(&self, dir: Direction, reason: DropReason) {
        self.stats.record_drops(dir, reason, 1);
    }

    /// Cancels every session (shutdown).
    pub fn cancel_all(&self) {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for h in routes.values() {
            h.cancel.cancel();
        }
    }
}

/// A shared hub.
pub type SharedHub = Arc<Hub>;
