//! The hub: which session owns which address, and where each packet goes.
//!
//! Routing (docs/PROTOCOL.md, "Routing"): a packet from a client whose source
//! is not its assigned address is dropped and counted; to another client it
//! goes straight to that client's queue; to the server address or outside the
//! subnet it goes to the TUN device; from the TUN it goes to the client owning
//! the destination, else it is dropped and counted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use ipnet::Ipv4Net;
use sallyport_core::ip::IpHeader;
use sallyport_core::PacketBatch;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pool::{Exhausted, Grant, IpPool, Owner};

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Source address is not the session's.
    Spoofed,
    /// No session owns the destination.
    NoRoute,
    /// The destination session's queue was full (a slow client).
    QueueFull,
    /// Not a valid IP packet.
    Malformed,
    /// IPv6, which this server does not route.
    Ipv6,
    /// The TUN device's queue was full or it is gone.
    TunUnavailable,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 6] = [
        DropReason::Spoofed,
        DropReason::NoRoute,
        DropReason::QueueFull,
        DropReason::Malformed,
        DropReason::Ipv6,
        DropReason::TunUnavailable,
    ];

    /// Name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::Spoofed => "spoofed",
            DropReason::NoRoute => "no_route",
            DropReason::QueueFull => "queue_full",
            DropReason::Malformed => "malformed",
            DropReason::Ipv6 => "ipv6",
            DropReason::TunUnavailable => "tun_unavailable",
        }
    }
}

/// Global counters; atomics, no lock on the packet path.
#[derive(Debug, Default)]
pub struct Stats {
    /// Packets received from clients.
    pub rx_packets: AtomicU64,
    /// Bytes received from clients.
    pub rx_bytes: AtomicU64,
    /// Packets sent to clients.
    pub tx_packets: AtomicU64,
    /// Bytes sent to clients.
    pub tx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl Stats {
    /// Counts a dropped packet.
    pub fn drop_packet(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Packets dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }

    /// One line for the periodic log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "rx {} pkts / {} B, tx {} pkts / {} B, drops:",
            self.rx_packets.load(Ordering::Relaxed),
            self.rx_bytes.load(Ordering::Relaxed),
            self.tx_packets.load(Ordering::Relaxed),
            self.tx_bytes.load(Ordering::Relaxed),
        );
        for r in DropReason::ALL {
            s.push_str(&format!(" {}={}", r.as_str(), self.dropped(r)));
        }
        s
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
    stats: Stats,
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
            stats: Stats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
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
    /// same client that this one replaces is cancelled.
    pub fn register(
        &self,
        owner: Owner,
        previous: Option<Ipv4Addr>,
        handle: SessionHandle,
    ) -> Result<Grant, Exhausted> {
        let grant = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.acquire(owner, handle.id, previous, Instant::now())?
        };
        let old = {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            routes.insert(grant.addr, handle)
        };
        if let Some(old) = old {
            old.cancel.cancel();
        }
        Ok(grant)
    }

    /// The session ended: forget its route and hold its address.
    pub fn unregister(&self, addr: Ipv4Addr, session: u64) {
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            if routes.get(&addr).is_some_and(|h| h.id == session) {
                routes.remove(&addr);
            }
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.release(addr, session, Instant::now());
    }

    /// Routes a batch that arrived from the client at `from`. Packets for the
    /// TUN are returned as one batch for the caller to send, so that no lock is
    /// held across an await.
    pub fn route_from_client(&self, from: Ipv4Addr, batch: &mut PacketBatch) -> PacketBatch {
        let mut to_tun = PacketBatch::new();
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for packet in batch.drain() {
            self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
            self.stats
                .rx_bytes
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
            let hdr = match IpHeader::parse(&packet) {
                Ok(IpHeader::V4(h)) => h,
                Ok(IpHeader::V6(_)) => {
                    self.stats.drop_packet(DropReason::Ipv6);
                    continue;
                }
                Err(e) => {
                    tracing::trace!(error = %e, "malformed packet from client");
                    self.stats.drop_packet(DropReason::Malformed);
                    continue;
                }
            };
            if hdr.src != from {
                tracing::trace!(src = %hdr.src, expected = %from, "spoofed source");
                self.stats.drop_packet(DropReason::Spoofed);
                continue;
            }
            let dst = hdr.dst;
            if dst == self.server_ip || !self.subnet.contains(&dst) {
                to_tun.push(packet);
                continue;
            }
            match routes.get(&dst) {
                Some(peer) => self.enqueue(peer, packet),
                None => self.stats.drop_packet(DropReason::NoRoute),
            }
        }
        to_tun
    }

    /// Routes a batch read from the TUN device to the owning clients.
    pub fn route_from_tun(&self, batch: &mut PacketBatch) {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for packet in batch.drain() {
            let dst = match IpHeader::parse(&packet).map(|h| h.dst()) {
                Ok(IpAddr::V4(d)) => d,
                Ok(IpAddr::V6(_)) => {
                    self.stats.drop_packet(DropReason::Ipv6);
                    continue;
                }
                Err(_) => {
                    self.stats.drop_packet(DropReason::Malformed);
                    continue;
                }
            };
            match routes.get(&dst) {
                Some(peer) => self.enqueue(peer, packet),
                None => self.stats.drop_packet(DropReason::NoRoute),
            }
        }
    }

    fn enqueue(&self, peer: &SessionHandle, packet: Bytes) {
        // A slow client fills only its own queue; never wait on it.
        if peer.tx.try_send(packet).is_err() {
            self.stats.drop_packet(DropReason::QueueFull);
        }
    }

    /// Hands packets to the TUN writer, waiting while its queue is full (the
    /// sender's TCP then slows down, which is the right back-pressure).
    pub async fn send_to_tun(&self, batch: PacketBatch) {
        let n = batch.len() as u64;
        if self.to_tun.send(batch).await.is_err() {
            for _ in 0..n {
                self.stats.drop_packet(DropReason::TunUnavailable);
            }
        }
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
