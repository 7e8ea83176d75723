//! Exponential backoff with jitter.

use std::time::Duration;

/// Delays that double from `min` up to `max`, each randomised to between half
/// and all of its nominal value so that many clients do not reconnect in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = nominal / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Back to `min` (after a stable connection).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_with_jitter_within_bounds() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let nominal = [1, 2, 4, 8, 8, 8];
        for n in nominal {
            let d = b.next_delay();
            let n = Duration::from_secs(n);
            assert!(d >= n / 2 && d <= n, "{d:?} not in [{:?}, {n:?}]", n / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
