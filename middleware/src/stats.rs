//! Counters for the packet path, and the layer that counts what passes it.
//!
//! [`Counters`] are plain atomics (relaxed: each is an independent total, no
//! ordering between them is promised), so counting takes no lock. A
//! [`StatsHandle`] writes to the server-wide (global) counters and, when it
//! has one, to the session's own; it is bound when the session's pipeline is
//! built, so the packet path does no lookups.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use sallyport_core::PacketBatch;
use tower_layer::Layer;
use tower_service::Service;

/// Which way a packet travels.
///
/// **Encap** is inside → outside (TUN or hub → wire), **decap** is
/// outside → inside (wire → TUN or hub). On the server, decap is "from the
/// client" and encap is "to the client".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Inside → outside.
    Encap = 0,
    /// Outside → inside.
    Decap = 1,
}

impl Direction {
    /// Both directions, in counter order.
    pub const ALL: [Direction; 2] = [Direction::Encap, Direction::Decap];

    /// Name for logs and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Direction::Encap => "encap",
            Direction::Decap => "decap",
        }
    }
}

/// Why a packet was dropped. A drop is policy, never an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The source (or, towards the TUN on a client, the destination) is not
    /// the session's assigned address.
    Spoofed,
    /// IPv6, and the session has no IPv6 address (or the hub routes none).
    Ipv6,
    /// Not a valid IP packet, or larger than the MTU.
    Malformed,
    /// Over the session's rate limit.
    RateLimited,
    /// A compressed frame that does not decompress to a valid size within the
    /// MTU, or an unknown extension tag.
    DecompressFailed,
    /// No session owns the destination (hub).
    NoRoute,
    /// The destination session's queue was full, a slow client (hub).
    QueueFull,
    /// The TUN device refused the packet or is gone (hub).
    TunUnavailable,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 8;

    /// Every reason, in counter order.
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Spoofed,
        DropReason::Ipv6,
        DropReason::Malformed,
        DropReason::RateLimited,
        DropReason::DecompressFailed,
        DropReason::NoRoute,
        DropReason::QueueFull,
        DropReason::TunUnavailable,
    ];

    /// Name for logs and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::Spoofed => "spoofed",
            DropReason::Ipv6 => "ipv6",
            DropReason::Malformed => "malformed",
            DropReason::RateLimited => "rate_limited",
            DropReason::DecompressFailed => "decompress_failed",
            DropReason::NoRoute => "no_route",
            DropReason::QueueFull => "queue_full",
            DropReason::TunUnavailable => "tun_unavailable",
        }
    }
}

type PerDirection = [AtomicU64; 2];

/// One set of counters: the whole server's, or one session's.
#[derive(Debug, Default)]
pub struct Counters {
    packets: PerDirection,
    bytes: PerDirection,
    drops: [[AtomicU64; DropReason::COUNT]; 2],
    compress_in: PerDirection,
    compress_out: PerDirection,
}

fn add(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

impl Counters {
    /// Fresh, shareable counters.
    pub fn new_shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Packets that passed the [`Stats`] layer in `dir`.
    pub fn packets(&self, dir: Direction) -> u64 {
        self.packets[dir as usize].load(Ordering::Relaxed)
    }

    /// Bytes that passed the [`Stats`] layer in `dir`.
    pub fn bytes(&self, dir: Direction) -> u64 {
        self.bytes[dir as usize].load(Ordering::Relaxed)
    }

    /// Packets dropped in `dir` for `reason`.
    pub fn dropped(&self, dir: Direction, reason: DropReason) -> u64 {
        self.drops[dir as usize][reason as usize].load(Ordering::Relaxed)
    }

    /// Packets dropped for `reason`, both directions.
    pub fn dropped_total(&self, reason: DropReason) -> u64 {
        Direction::ALL
            .iter()
            .map(|d| self.dropped(*d, reason))
            .sum()
    }

    /// Bytes that went into the compressor (encap) or decompressor (decap).
    pub fn compress_in(&self, dir: Direction) -> u64 {
        self.compress_in[dir as usize].load(Ordering::Relaxed)
    }

    /// Bytes that came out of the compressor (encap) or decompressor (decap).
    pub fn compress_out(&self, dir: Direction) -> u64 {
        self.compress_out[dir as usize].load(Ordering::Relaxed)
    }

    /// Counts `packets` packets of `bytes` bytes in total.
    pub fn record_packets(&self, dir: Direction, packets: u64, bytes: u64) {
        add(&self.packets[dir as usize], packets);
        add(&self.bytes[dir as usize], bytes);
    }

    /// Counts `n` dropped packets.
    pub fn record_drops(&self, dir: Direction, reason: DropReason, n: u64) {
        add(&self.drops[dir as usize][reason as usize], n);
    }

    /// Counts bytes into and out of the (de)compressor.
    pub fn record_compression(&self, dir: Direction, bytes_in: u64, bytes_out: u64) {
        add(&self.compress_in[dir as usize], bytes_in);
        add(&self.compress_out[dir as usize], bytes_out);
    }

    /// One line for the periodic log.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let (e, d) = (Direction::Encap, Direction::Decap);
        let mut s = format!(
            "decap {} pkts / {} B, encap {} pkts / {} B, lz4 decap {}->{} B encap {}->{} B, drops:",
            self.packets(d),
            self.bytes(d),
            self.packets(e),
            self.bytes(e),
            self.compress_in(d),
            self.compress_out(d),
            self.compress_in(e),
            self.compress_out(e),
        );
        for r in DropReason::ALL {
            let _ = write!(s, " {}={}", r.as_str(), self.dropped_total(r));
        }
        s
    }
}

/// Where a pipeline counts: the global counters and, optionally, a session's.
#[derive(Debug, Clone)]
pub struct StatsHandle {
    global: Arc<Counters>,
    session: Option<Arc<Counters>>,
}

impl StatsHandle {
    /// Counts into `global` only.
    pub fn global(global: Arc<Counters>) -> Self {
        Self {
            global,
            session: None,
        }
    }

    /// Counts into `global` and `session`.
    pub fn with_session(global: Arc<Counters>, session: Arc<Counters>) -> Self {
        Self {
            global,
            session: Some(session),
        }
    }

    /// A handle with fresh counters of its own, for tests and tools.
    pub fn detached() -> Self {
        Self::global(Counters::new_shared())
    }

    /// The global counters.
    pub fn global_counters(&self) -> &Arc<Counters> {
        &self.global
    }

    /// The session's counters, if bound.
    pub fn session_counters(&self) -> Option<&Arc<Counters>> {
        self.session.as_ref()
    }

    fn each(&self, f: impl Fn(&Counters)) {
        f(&self.global);
        if let Some(s) = &self.session {
            f(s);
        }
    }

    /// See [`Counters::record_packets`].
    pub fn record_packets(&self, dir: Direction, packets: u64, bytes: u64) {
        self.each(|c| c.record_packets(dir, packets, bytes));
    }

    /// See [`Counters::record_drops`].
    pub fn record_drops(&self, dir: Direction, reason: DropReason, n: u64) {
        if n != 0 {
            self.each(|c| c.record_drops(dir, reason, n));
        }
    }

    /// See [`Counters::record_compression`].
    pub fn record_compression(&self, dir: Direction, bytes_in: u64, bytes_out: u64) {
        self.each(|c| c.record_compression(dir, bytes_in, bytes_out));
    }
}

/// Counts the packets and bytes of every batch passing it.
#[derive(Debug, Clone)]
pub struct StatsLayer {
    handle: StatsHandle,
    dir: Direction,
}

impl StatsLayer {
    /// Counts into `handle` as traffic in `dir`.
    pub fn new(handle: StatsHandle, dir: Direction) -> Self {
        Self { handle, dir }
    }
}

impl<S> Layer<S> for StatsLayer {
    type Service = Stats<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Stats {
            inner,
            handle: self.handle.clone(),
            dir: self.dir,
        }
    }
}

/// See [`StatsLayer`].
#[derive(Debug, Clone)]
pub struct Stats<S> {
    inner: S,
    handle: StatsHandle,
    dir: Direction,
}

impl<S> Service<PacketBatch> for Stats<S>
where
    S: Service<PacketBatch>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, batch: PacketBatch) -> Self::Future {
        self.handle
            .record_packets(self.dir, batch.len() as u64, batch.bytes() as u64);
        self.inner.call(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tower_test::{assert_request_eq, mock};

    fn batch(sizes: &[usize]) -> PacketBatch {
        sizes
            .iter()
            .map(|n| Bytes::from(vec![0x45; *n]))
            .collect::<Vec<_>>()
            .into()
    }

    #[tokio::test(start_paused = true)]
    async fn counts_packets_and_bytes_into_global_and_session() {
        let global = Counters::new_shared();
        let session = Counters::new_shared();
        let layer = StatsLayer::new(
            StatsHandle::with_session(global.clone(), session.clone()),
            Direction::Decap,
        );
        let (mut svc, mut handle) = mock::spawn_layer::<PacketBatch, (), _>(layer);
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(batch(&[10, 20, 30]));
        assert_request_eq!(handle, batch(&[10, 20, 30])).send_response(());
        fut.await.expect("passes through");
        for c in [&global, &session] {
            assert_eq!(c.packets(Direction::Decap), 3);
            assert_eq!(c.bytes(Direction::Decap), 60);
            assert_eq!(c.packets(Direction::Encap), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_is_the_inner_services() {
        let layer = StatsLayer::new(StatsHandle::detached(), Direction::Encap);
        let (mut svc, mut handle) = mock::spawn_layer::<PacketBatch, (), _>(layer);
        handle.allow(0);
        tokio_test::assert_pending!(svc.poll_ready());
        handle.allow(1);
        tokio_test::assert_ready_ok!(svc.poll_ready());
    }

    #[test]
    fn drops_are_counted_per_direction_and_reason() {
        let h = StatsHandle::detached();
        h.record_drops(Direction::Decap, DropReason::Spoofed, 2);
        h.record_drops(Direction::Encap, DropReason::Spoofed, 1);
        h.record_drops(Direction::Encap, DropReason::NoRoute, 0);
        let c = h.global_counters();
        assert_eq!(c.dropped(Direction::Decap, DropReason::Spoofed), 2);
        assert_eq!(c.dropped_total(DropReason::Spoofed), 3);
        assert_eq!(c.dropped_total(DropReason::NoRoute), 0);
        assert!(c.summary().contains("spoofed=3"), "{}", c.summary());
    }

    #[test]
    fn reasons_are_in_counter_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
