//! When a file is finished: quiet (same size and mtime) for the settle period.
//!
//! Airflow appends to a task's log until the attempt ends, and may append again on resume, so
//! "finished" can only mean "has not changed for a while". A file that changes after it was
//! shipped settles again and ships again: the object always ends up equal to the file.

use std::time::{Duration, Instant, SystemTime};

use crate::local_file::FileStat;

/// A file as last seen, and how long it had been quiet by then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub stat: FileStat,
    /// When this `stat` was first seen.
    pub seen_at: Instant,
    /// How long the file had already been quiet when `stat` was first seen.
    pub quiet_before: Duration,
}

impl Observation {
    /// The first sighting: the mtime says how long the file has been quiet, so old files that
    /// a restart finds are settled at once.
    pub fn first(stat: FileStat, now: Instant, wall_now: SystemTime) -> Self {
        Self {
            stat,
            seen_at: now,
            quiet_before: age_of_mtime(stat, wall_now),
        }
    }

    /// The same file seen again. A changed stat restarts the quiet period; its mtime is
    /// trusted only as far as our own observations allow, because tools that copy files
    /// keep old mtimes on fresh writes.
    pub fn observe(self, stat: FileStat, now: Instant, wall_now: SystemTime) -> Self {
        if stat == self.stat {
            return self;
        }
        let since_last_seen = now.saturating_duration_since(self.seen_at);
        Self {
            stat,
            seen_at: now,
            quiet_before: age_of_mtime(stat, wall_now).min(since_last_seen),
        }
    }

    /// How long the file has been quiet at `now`.
    pub fn quiet_for(&self, now: Instant) -> Duration {
        self.quiet_before + now.saturating_duration_since(self.seen_at)
    }

    /// When the file will have been quiet for `settle`, if it stays as it is.
    pub fn settles_at(&self, settle: Duration) -> Instant {
        self.seen_at + settle.saturating_sub(self.quiet_before)
    }

    pub fn is_settled(&self, now: Instant, settle: Duration) -> bool {
        self.quiet_for(now) >= settle
    }
}

/// Wall-clock age of the mtime; zero for an mtime in the future (clock skew).
fn age_of_mtime(stat: FileStat, wall_now: SystemTime) -> Duration {
    let now_ns = wall_now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    Duration::from_nanos(now_ns.saturating_sub(stat.mtime_ns).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(5);

    fn wall(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn stat(size: u64, mtime_secs: i64) -> FileStat {
        FileStat {
            size,
            mtime_ns: mtime_secs * 1_000_000_000,
        }
    }

    #[test]
    fn an_old_file_is_settled_on_first_sight() {
        let now = Instant::now();
        let obs = Observation::first(stat(10, 1_000), now, wall(2_000));
        assert!(obs.is_settled(now, SETTLE));
        assert!(obs.settles_at(SETTLE) <= now);
    }

    #[test]
    fn a_fresh_file_waits_for_the_settle_period() {
        let now = Instant::now();
        let obs = Observation::first(stat(10, 1_000), now, wall(1_002));
        assert!(!obs.is_settled(now, SETTLE));
        assert_eq!(obs.settles_at(SETTLE), now + Duration::from_secs(3));
        assert!(!obs.is_settled(now + Duration::from_secs(2), SETTLE));
        assert!(obs.is_settled(now + Duration::from_secs(3), SETTLE));
    }

    #[test]
    fn a_change_restarts_the_quiet_period() {
        let t0 = Instant::now();
        let obs = Observation::first(stat(10, 1_000), t0, wall(1_004));
        let t1 = t0 + Duration::from_secs(4);
        let obs = obs.observe(stat(20, 1_008), t1, wall(1_008));
        assert!(!obs.is_settled(t1 + Duration::from_secs(4), SETTLE));
        assert!(obs.is_settled(t1 + SETTLE, SETTLE));
    }

    #[test]
    fn seeing_the_same_stat_keeps_the_age() {
        let t0 = Instant::now();
        let obs = Observation::first(stat(10, 1_000), t0, wall(1_001));
        let again = obs.observe(stat(10, 1_000), t0 + Duration::from_secs(3), wall(1_004));
        assert_eq!(again, obs);
        assert!(again.is_settled(t0 + Duration::from_secs(4), SETTLE));
    }

    #[test]
    fn an_old_mtime_on_a_changed_file_is_not_trusted() {
        let t0 = Instant::now();
        let obs = Observation::first(stat(10, 1_000), t0, wall(1_001));
        // Rewritten with an mtime kept from long ago, one second after we last looked.
        let t1 = t0 + Duration::from_secs(1);
        let obs = obs.observe(stat(30, 10), t1, wall(1_002));
        assert_eq!(obs.quiet_before, Duration::from_secs(1));
        assert!(!obs.is_settled(t1, SETTLE));
    }

    #[test]
    fn an_mtime_in_the_future_counts_as_now() {
        let now = Instant::now();
        let obs = Observation::first(stat(10, 5_000), now, wall(1_000));
        assert_eq!(obs.quiet_before, Duration::ZERO);
        assert!(!obs.is_settled(now, SETTLE));
        assert!(obs.is_settled(now + SETTLE, SETTLE));
    }

    #[test]
    fn zero_settle_ships_at_once() {
        let now = Instant::now();
        let obs = Observation::first(stat(1, 5_000), now, wall(1_000));
        assert!(obs.is_settled(now, Duration::ZERO));
    }
}
