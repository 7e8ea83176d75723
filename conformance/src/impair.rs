//! A userspace network impairment in place of `tc netem` (which this kernel
//! lacks): IP packets routed into a TUN device are each held for a fixed
//! delay, or dropped with a given probability, then written back to the
//! kernel, which forwards them on.
//!
//! [`crate::lab::Lab::start_impairment`] runs it (the `sallyport-impair`
//! binary) in a router namespace between some clients and the server, with
//! policy routing that sends every packet crossing the router through the
//! device once. Loss therefore hits single IP packets of the underlay, so the
//! kernel's TCP under the VPN really sees delay and loss. The delay is the
//! same for every packet, so order is kept.
//!
//! [`Impairment`] is the decision alone, with time passed in; [`run`] is the
//! I/O around it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What to do to the packets.
#[derive(Debug, Clone)]
pub struct ImpairConfig {
    /// How long each packet is held (each direction).
    pub delay: Duration,
    /// Probability that a packet is dropped, 0.0..=1.0.
    pub loss: f64,
    /// Seed of the loss decisions, so that a run can be repeated.
    pub seed: u64,
    /// Packets held at once before further ones are dropped (counted apart).
    pub queue: usize,
}

/// Counters, readable while the impairment runs.
#[derive(Debug, Default)]
pub struct ImpairStats {
    /// Packets written back after their delay.
    pub forwarded: AtomicU64,
    /// Packets dropped on purpose.
    pub lost: AtomicU64,
    /// Packets dropped because `queue` packets were already held.
    pub overflow: AtomicU64,
}

impl ImpairStats {
    /// One line: forwarded, lost (with the share of all packets seen), overflow.
    pub fn summary(&self) -> String {
        let f = self.forwarded.load(Ordering::Relaxed);
        let l = self.lost.load(Ordering::Relaxed);
        let o = self.overflow.load(Ordering::Relaxed);
        let seen = f + l + o;
        let pct = if seen == 0 {
            0.0
        } else {
            100.0 * l as f64 / seen as f64
        };
        format!("forwarded {f}, lost {l} ({pct:.2}%), overflow {o}")
    }
}

/// The per-packet decision: drop it, or release it at a given time.
#[derive(Debug)]
pub struct Impairment {
    delay: Duration,
    loss: f64,
    rng: StdRng,
}

impl Impairment {
    /// A decision maker for `cfg`.
    pub fn new(cfg: &ImpairConfig) -> Self {
        Self {
            delay: cfg.delay,
            loss: cfg.loss.clamp(0.0, 1.0),
            rng: StdRng::seed_from_u64(cfg.seed),
        }
    }

    /// For a packet that arrived at `now`: `None` to drop it, else when to
    /// release it.
    pub fn admit<T>(&mut self, now: T) -> Option<T>
    where
        T: std::ops::Add<Duration, Output = T>,
    {
        if self.loss > 0.0 && self.rng.random::<f64>() < self.loss {
            return None;
        }
        Some(now + self.delay)
    }
}

/// Forwards packets from `dev` back into `dev` through the impairment until
/// reading or writing the device fails.
pub async fn run(
    dev: Arc<tun_rs::AsyncDevice>,
    cfg: ImpairConfig,
    stats: Arc<ImpairStats>,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>(cfg.queue.max(1));
    let imp = Impairment::new(&cfg);
    tokio::try_join!(admit(&dev, imp, tx, &stats), release(&dev, rx, &stats)).map(|_| ())
}

/// Reads packets and queues those that are not lost.
async fn admit(
    dev: &tun_rs::AsyncDevice,
    mut imp: Impairment,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
    stats: &ImpairStats,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = dev.recv(&mut buf).await?;
        let Some(at) = imp.admit(Instant::now()) else {
            stats.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if tx.try_send((at, buf[..n].to_vec())).is_err() {
            stats.overflow.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Writes each queued packet back when its time comes. The delay is
/// constant, so the queue is in release order.
async fn release(
    dev: &tun_rs::AsyncDevice,
    mut rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    stats: &ImpairStats,
) -> std::io::Result<()> {
    while let Some((at, packet)) = rx.recv().await {
        tokio::time::sleep_until(at).await;
        dev.send(&packet).await?;
        stats.forwarded.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(loss: f64) -> ImpairConfig {
        ImpairConfig {
            delay: Duration::from_millis(50),
            loss,
            seed: 7,
            queue: 16,
        }
    }

    #[test]
    fn every_packet_is_held_for_the_delay_without_loss() {
        let mut imp = Impairment::new(&cfg(0.0));
        let t0 = Instant::now();
        for i in 0..1000u64 {
            let now = t0 + Duration::from_micros(i);
            assert_eq!(imp.admit(now), Some(now + Duration::from_millis(50)));
        }
    }

    #[test]
    fn one_percent_loss_drops_about_one_percent() {
        let mut imp = Impairment::new(&cfg(0.01));
        let t0 = Instant::now();
        let lost = (0..100_000).filter(|_| imp.admit(t0).is_none()).count();
        assert!((800..1200).contains(&lost), "lost {lost} of 100000");
    }

    #[test]
    fn the_same_seed_drops_the_same_packets() {
        let t0 = Instant::now();
        let run = || {
            let mut imp = Impairment::new(&cfg(0.3));
            (0..200)
                .map(|_| imp.admit(t0).is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn summary_gives_the_loss_share() {
        let s = ImpairStats::default();
        s.forwarded.store(99, Ordering::Relaxed);
        s.lost.store(1, Ordering::Relaxed);
        assert_eq!(s.summary(), "forwarded 99, lost 1 (1.00%), overflow 0");
    }
}
