//! Rate limiting by policing: a token bucket on bytes per second with a burst.
//!
//! A packet that finds too few tokens is dropped and counted
//! ([`DropReason::RateLimited`]); nothing is delayed or queued, so TCP inside
//! the tunnel sees loss and backs off. Each direction of a session gets its own
//! [`RateLimit`] service and so its own bucket, owned by the session: no lock,
//! no sharing. (`tower::limit::RateLimit` is not used: it delays requests
//! instead of dropping packets.)
//!
//! Time is tokio's [`Instant`], so tests pause and advance it.

use std::num::NonZeroU64;
use std::task::{Context, Poll};
use std::time::Duration;

use sallyport_core::PacketBatch;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::stats::{Direction, DropReason, StatsHandle};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    bytes_per_sec: NonZeroU64,
    burst_bytes: NonZeroU64,
}

impl Rate {
    /// `bytes_per_sec` sustained, up to `burst_bytes` at once. A burst smaller
    /// than the largest packet means that packet can never pass.
    pub fn new(bytes_per_sec: NonZeroU64, burst_bytes: NonZeroU64) -> Self {
        Self {
            bytes_per_sec,
            burst_bytes,
        }
    }

    /// Bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec.get()
    }

    /// Burst in bytes.
    pub fn burst_bytes(&self) -> u64 {
        self.burst_bytes.get()
    }
}

/// A token bucket counting bytes. Starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst_bytes(),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let per_sec = u128::from(self.rate.bytes_per_sec());
        let burst = self.rate.burst_bytes();
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let earned = elapsed * per_sec / NANOS_PER_SEC;
        if earned == 0 {
            // Keep `last` so that the fractions add up over calls.
            return;
        }
        let tokens = u128::from(self.tokens) + earned;
        if tokens >= u128::from(burst) {
            self.tokens = burst;
            self.last = now;
        } else {
            self.tokens = tokens as u64;
            // Advance only by the time the whole tokens took (rounded up, so
            // that rounding never grants more than the rate); the remainder
            // carries over to the next refill.
            let used = (earned * NANOS_PER_SEC).div_ceil(per_sec);
            self.last += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        }
    }

    /// Takes `n` tokens if there are that many at `now`.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if n <= self.tokens {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Tokens available at the last refill.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

/// Drops packets over `rate`; each service made by this layer has its own
/// bucket.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    rate: Rate,
    stats: StatsHandle,
    dir: Direction,
}

impl RateLimitLayer {
    /// Polices at `rate`; drops are counted into `stats` as traffic in `dir`.
    pub fn new(rate: Rate, stats: StatsHandle, dir: Direction) -> Self {
        Self { rate, stats, dir }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            bucket: TokenBucket::new(self.rate, Instant::now()),
            stats: self.stats.clone(),
            dir: self.dir,
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Debug)]
pub struct RateLimit<S> {
    inner: S,
    bucket: TokenBucket,
    stats: StatsHandle,
    dir: Direction,
}

impl<S> Service<PacketBatch> for RateLimit<S>
where
    S: Service<PacketBatch>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never waits for tokens: over the limit means dropped, not delayed.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut batch: PacketBatch) -> Self::Future {
        let now = Instant::now();
        let mut dropped = 0u64;
        let bucket = &mut self.bucket;
        batch.retain(|p| {
            let ok = bucket.try_take(p.len() as u64, now);
            dropped += u64::from(!ok);
            ok
        });
        self.stats
            .record_drops(self.dir, DropReason::RateLimited, dropped);
        self.inner.call(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tower_test::mock;

    fn rate(per_sec: u64, burst: u64) -> Rate {
        Rate::new(
            NonZeroU64::new(per_sec).expect("nonzero"),
            NonZeroU64::new(burst).expect("nonzero"),
        )
    }

    fn packets(n: usize, size: usize) -> PacketBatch {
        (0..n)
            .map(|_| Bytes::from(vec![0x45; size]))
            .collect::<Vec<_>>()
            .into()
    }

    /// Sends one batch through and returns how many packets got past.
    async fn pass(
        svc: &mut tower_test::mock::Spawn<RateLimit<mock::Mock<PacketBatch, ()>>>,
        handle: &mut mock::Handle<PacketBatch, ()>,
        batch: PacketBatch,
    ) -> usize {
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(batch);
        let (got, send) = handle.next_request().await.expect("request");
        send.send_response(());
        fut.await.expect("ok");
        got.len()
    }

    #[tokio::test(start_paused = true)]
    async fn the_burst_passes_then_packets_over_it_are_dropped_and_counted() {
        let stats = StatsHandle::detached();
        let layer = RateLimitLayer::new(rate(10_000, 3_000), stats.clone(), Direction::Decap);
        let (mut svc, mut handle) = mock::spawn_layer(layer);
        assert_eq!(pass(&mut svc, &mut handle, packets(5, 1000)).await, 3);
        assert_eq!(
            stats
                .global_counters()
                .dropped(Direction::Decap, DropReason::RateLimited),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_come_back_at_the_configured_rate() {
        let stats = StatsHandle::detached();
        let layer = RateLimitLayer::new(rate(10_000, 1_000), stats, Direction::Encap);
        let (mut svc, mut handle) = mock::spawn_layer(layer);
        assert_eq!(pass(&mut svc, &mut handle, packets(2, 1000)).await, 1);
        tokio::time::advance(Duration::from_millis(50)).await; // 500 bytes
        assert_eq!(pass(&mut svc, &mut handle, packets(1, 1000)).await, 0);
        tokio::time::advance(Duration::from_millis(50)).await; // 1000 now
        assert_eq!(pass(&mut svc, &mut handle, packets(1, 1000)).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn over_a_long_run_the_rate_is_kept_exactly() {
        // 1 ms steps at 1,234,567 B/s: fractions of a byte per step must add
        // up, not be lost.
        let mut b = TokenBucket::new(rate(1_234_567, 1 << 40), Instant::now());
        let mut earned = 0u64;
        let start = Instant::now();
        assert!(b.try_take(1 << 40, start), "start empty");
        for _ in 0..10_000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            let now = Instant::now();
            b.refill(now);
            earned += b.tokens();
            b.tokens = 0;
        }
        // Rounding to whole nanoseconds may lose under 1 ns per step.
        let exact = 12_345_670u64;
        assert!(
            earned <= exact && exact - earned <= 20,
            "10 s at 1,234,567 B/s gave {earned} bytes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_never_holds_more_than_the_burst() {
        let mut b = TokenBucket::new(rate(1_000_000, 5_000), Instant::now());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(b.try_take(5_000, Instant::now()));
        assert!(!b.try_take(1, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_does_not_wait_for_tokens_but_for_the_inner_service() {
        let stats = StatsHandle::detached();
        let layer = RateLimitLayer::new(rate(1, 1), stats, Direction::Decap);
        let (mut svc, mut handle) = mock::spawn_layer::<PacketBatch, (), _>(layer);
        handle.allow(0);
        tokio_test::assert_pending!(svc.poll_ready());
        handle.allow(1);
        tokio_test::assert_ready_ok!(svc.poll_ready());
    }
}
