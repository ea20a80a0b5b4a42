//! Random choices for fault injection (delays, sizes, which file), replayable from a
//! printed seed: `LOCALSHIP_FAULTS_SEED` replays every scenario. xorshift64* is plenty.

use std::time::Duration;

pub struct Jitter(u64);

impl Jitter {
    /// Seeded from `LOCALSHIP_FAULTS_SEED` if set, else from the clock; the
    /// seed is printed under `what` so a failing run can be replayed.
    pub fn new(what: &str) -> Self {
        let seed = std::env::var("LOCALSHIP_FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("faults: {what}: seed {seed} (LOCALSHIP_FAULTS_SEED={seed} replays it)");
        // Zero is xorshift's one fixed point.
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[low, high)`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low))
    }

    /// A delay between `lo` and `hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}
