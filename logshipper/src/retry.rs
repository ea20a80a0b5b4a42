//! Exponential backoff with jitter, for files that failed to ship and destination checks.

use std::time::Duration;

/// Delays double from `base` up to `cap`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// Delay before retry number `attempt` (1 for the first retry). `jitter` in `[0, 1)` picks
    /// a point in the upper half of the window, so retries of many files spread out without
    /// ever coming back sooner than half the nominal delay.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let doubling = attempt.saturating_sub(1).min(32);
        let nominal = self
            .base
            .saturating_mul(1 << doubling.min(31))
            .min(self.cap);
        let half = nominal / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// [`Backoff::delay`] with a random jitter.
    pub fn next(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(60),
    };

    #[test]
    fn doubles_up_to_the_cap() {
        assert_eq!(B.delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(B.delay(2, 1.0), Duration::from_secs(2));
        assert_eq!(B.delay(4, 1.0), Duration::from_secs(8));
        assert_eq!(B.delay(7, 1.0), Duration::from_secs(60));
        assert_eq!(B.delay(1_000, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        assert_eq!(B.delay(3, 0.0), Duration::from_secs(2));
        for _ in 0..100 {
            let d = B.next(3);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
    }

    #[test]
    fn attempt_zero_is_the_base() {
        assert_eq!(B.delay(0, 1.0), Duration::from_secs(1));
    }
}
