//! Limits that are not packet policy: how many sessions a token may hold, how
//! often one source address may fail to authenticate, and the counters of
//! every limit that was hit (exported on `/metrics`).
//!
//! Pure bookkeeping, no I/O: time is passed in, so every rule is unit-tested.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Counts of limits hit, server-wide.
#[derive(Debug, Default)]
pub struct LimitCounters {
    /// Sessions refused because their token already had
    /// `limits.max_sessions_per_token` sessions.
    pub token_sessions_refused: AtomicU64,
    /// Connections closed unread because their source address had used up
    /// `limits.auth_failures_per_minute`.
    pub auth_throttled: AtomicU64,
    /// Authentication attempts with a token the server does not accept.
    pub auth_failures: AtomicU64,
    /// Connections closed because no `auth` arrived within `limits.auth_timeout`.
    pub auth_timeouts: AtomicU64,
    /// Tunnels closed unread because `limits.max_unauthenticated` tunnels
    /// were already waiting for their `auth` message.
    pub unauthenticated_refused: AtomicU64,
    /// Sessions closed by `limits.idle_timeout`.
    pub idle_closed: AtomicU64,
    /// Connections closed because a message exceeded `limits.max_frame_size`.
    pub frame_too_large: AtomicU64,
    /// The listener's own count of connections dropped at accept because
    /// `limits.max_unauthenticated` connections were in TLS or HTTP set-up.
    listener_refused: OnceLock<Arc<AtomicU64>>,
}

impl LimitCounters {
    /// Adds one to `c`.
    pub fn hit(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Exports the listener's counter of connections dropped at accept.
    pub fn set_listener_refused(&self, c: Arc<AtomicU64>) {
        let _ = self.listener_refused.set(c);
    }

    /// Connections dropped at accept (TLS or HTTP set-up phase full).
    pub fn listener_refused(&self) -> u64 {
        self.listener_refused
            .get()
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// `(metric name without prefix, help, value)` of every counter.
    pub fn series(&self) -> [(&'static str, &'static str, u64); 8] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "limit_token_sessions_refused_total",
                "Sessions refused: the token already had limits.max_sessions_per_token sessions.",
                v(&self.token_sessions_refused),
            ),
            (
                "limit_auth_throttled_total",
                "Connections closed unread: their source used up limits.auth_failures_per_minute.",
                v(&self.auth_throttled),
            ),
            (
                "auth_failures_total",
                "Authentication attempts with a token the server does not accept.",
                v(&self.auth_failures),
            ),
            (
                "limit_auth_timeouts_total",
                "Connections closed: no auth message within limits.auth_timeout.",
                v(&self.auth_timeouts),
            ),
            (
                "limit_unauthenticated_refused_total",
                "Tunnels closed unread: limits.max_unauthenticated were already waiting for auth.",
                v(&self.unauthenticated_refused),
            ),
            (
                "limit_unauthenticated_dropped_at_accept_total",
                "Connections dropped at accept: limits.max_unauthenticated were in TLS or HTTP set-up.",
                self.listener_refused(),
            ),
            (
                "limit_idle_closed_total",
                "Sessions closed: no packet either way for limits.idle_timeout.",
                v(&self.idle_closed),
            ),
            (
                "limit_frame_too_large_total",
                "Connections closed: a message exceeded limits.max_frame_size.",
                v(&self.frame_too_large),
            ),
        ]
    }
}

/// Per-source token buckets of failed authentications: each source may fail
/// `per_minute` times in a burst, then once every `60 s / per_minute`.
#[derive(Debug)]
pub struct AuthThrottle {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Sources tracked at most; beyond it, full buckets are forgotten first and
/// a new source is not tracked until there is room (so memory stays bounded
/// even under a flood from many addresses).
const MAX_TRACKED: usize = 65_536;

impl AuthThrottle {
    /// A throttle allowing `per_minute` failures per source (0: no throttle).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let cap = f64::from(self.per_minute);
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + dt * cap / 60.0).min(cap);
        b.at = now;
    }

    /// Whether `ip` may try to authenticate now (it has failures left).
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(&ip) {
            None => true,
            Some(b) => {
                self.refill(b, now);
                b.tokens >= 1.0
            }
        }
    }

    /// Records a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        let cap = f64::from(self.per_minute);
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !m.contains_key(&ip) && m.len() >= MAX_TRACKED {
            let full = Duration::from_secs(60);
            m.retain(|_, b| now.saturating_duration_since(b.at) < full);
            if m.len() >= MAX_TRACKED {
                return;
            }
        }
        let b = m.entry(ip).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }
}

/// Live sessions per token, against `limits.max_sessions_per_token`.
#[derive(Debug, Default)]
pub struct TokenSessions {
    max: usize,
    inner: Mutex<Live>,
}

#[derive(Debug, Default)]
struct Live {
    per_token: HashMap<usize, usize>,
    token_of: HashMap<u64, usize>,
}

impl TokenSessions {
    /// At most `max` sessions per token (0: unlimited).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            inner: Mutex::default(),
        }
    }

    /// The limit (0: unlimited).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether `token` is below its limit now.
    pub fn has_room(&self, token: usize) -> bool {
        self.max == 0 || self.live(token) < self.max
    }

    /// Sessions of `token` now.
    pub fn live(&self, token: usize) -> usize {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.per_token.get(&token).copied().unwrap_or(0)
    }

    /// Session `id` of `token` started.
    pub fn add(&self, id: u64, token: usize) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if m.token_of.insert(id, token).is_none() {
            *m.per_token.entry(token).or_insert(0) += 1;
        }
    }

    /// Session `id` ended (nothing if it was never added).
    pub fn remove(&self, id: u64) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(token) = m.token_of.remove(&id) else {
            return;
        };
        if let Some(n) = m.per_token.get_mut(&token) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.per_token.remove(&token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_source_is_throttled_after_its_burst_of_failures_and_recovers_with_time() {
        let t = AuthThrottle::new(3);
        let now = Instant::now();
        let a = ip("198.18.0.10");
        for _ in 0..3 {
            assert!(t.allows(a, now));
            t.failed(a, now);
        }
        assert!(!t.allows(a, now), "burst used up");
        assert!(t.allows(ip("198.18.0.11"), now), "other sources unaffected");
        assert!(!t.allows(a, now + Duration::from_secs(19)));
        assert!(t.allows(a, now + Duration::from_secs(20)), "one per 20 s");
    }

    #[test]
    fn zero_failures_per_minute_never_throttles() {
        let t = AuthThrottle::new(0);
        let now = Instant::now();
        let a = ip("198.18.0.10");
        for _ in 0..100 {
            t.failed(a, now);
        }
        assert!(t.allows(a, now));
    }

    #[test]
    fn token_sessions_count_per_token_and_free_room_when_sessions_end() {
        let s = TokenSessions::new(2);
        s.add(10, 0);
        assert!(s.has_room(0));
        s.add(11, 0);
        assert!(!s.has_room(0));
        assert!(s.has_room(1), "limits are per token");
        s.remove(10);
        s.remove(10);
        assert_eq!(s.live(0), 1, "a session ends once");
        assert!(s.has_room(0));
        assert!(TokenSessions::new(0).has_room(0), "0: unlimited");
    }
}
