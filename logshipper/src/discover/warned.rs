//! Paths that will not ship, told once each and within bounds. A volume can hold millions of
//! symlinks or badly named files: each is remembered as a 64-bit hash of its path, up to
//! [`REMEMBERED`] of them (beyond that, rescans report them again), and warnings are limited
//! to [`WARNINGS_PER_MINUTE`] per source, the rest counted and summed up once a minute.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hash};
use std::path::Path;
use std::time::{Duration, Instant};

use super::SkipReason;

/// Paths remembered per source; about 2 MiB at the cap.
pub const REMEMBERED: usize = 100_000;

pub const WARNINGS_PER_MINUTE: u32 = 20;

const WINDOW: Duration = Duration::from_secs(60);

pub struct Warned {
    seen: HashSet<u64>,
    hasher: std::collections::hash_map::RandomState,
    window_start: Instant,
    warned_in_window: u32,
    /// Paths not warned about in this window, by reason.
    quiet: BTreeMap<&'static str, u64>,
}

impl Default for Warned {
    fn default() -> Self {
        Self {
            seen: HashSet::new(),
            hasher: Default::default(),
            window_start: Instant::now(),
            warned_in_window: 0,
            quiet: BTreeMap::new(),
        }
    }
}

impl Warned {
    /// Whether `path` is new: not seen before, or no longer remembered. Warns about it
    /// within the rate, counts it otherwise.
    pub fn first_time(&mut self, path: &Path, reason: SkipReason, now: Instant) -> bool {
        let hash = {
            let mut state = self.hasher.build_hasher();
            path.hash(&mut state);
            std::hash::Hasher::finish(&state)
        };
        if self.seen.contains(&hash) {
            return false;
        }
        if self.seen.len() < REMEMBERED {
            self.seen.insert(hash);
        }
        self.roll(now);
        if self.warned_in_window < WARNINGS_PER_MINUTE {
            self.warned_in_window += 1;
            tracing::warn!(path = %path.display(), reason = reason.label(), "not shipping this file");
        } else {
            *self.quiet.entry(reason.label()).or_default() += 1;
        }
        true
    }

    /// Starts a new window once a minute has passed, summing up the one before.
    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.window_start) < WINDOW {
            return;
        }
        if !self.quiet.is_empty() {
            let total: u64 = self.quiet.values().sum();
            let reasons = format!("{:?}", self.quiet);
            tracing::warn!(
                files = total,
                reasons,
                "not shipping more files (not listed one by one)"
            );
            self.quiet.clear();
        }
        self.window_start = now;
        self.warned_in_window = 0;
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// Paths not warned about one by one in the current window.
    #[cfg(test)]
    fn untold(&self) -> u64 {
        self.quiet.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_told_once_and_memory_stays_bounded() {
        let mut warned = Warned::default();
        let now = Instant::now();
        assert!(warned.first_time(Path::new("/v/a"), SkipReason::Symlink, now));
        assert!(!warned.first_time(Path::new("/v/a"), SkipReason::Symlink, now));
        for i in 0..REMEMBERED + 50_000 {
            let path = format!("/v/link-{i}");
            warned.first_time(Path::new(&path), SkipReason::Symlink, now);
        }
        assert_eq!(warned.remembered(), REMEMBERED);
        // Beyond the cap a path is not remembered: a rescan reports it again.
        let late = format!("/v/link-{}", REMEMBERED + 49_999);
        assert!(warned.first_time(Path::new(&late), SkipReason::Symlink, now));
    }

    #[test]
    fn warnings_are_limited_per_minute_and_the_rest_counted() {
        let mut warned = Warned::default();
        let start = Instant::now();
        for i in 0..100 {
            let path = format!("/v/bad-{i}");
            warned.first_time(Path::new(&path), SkipReason::NonUtf8, start);
        }
        assert_eq!(warned.untold(), 100 - u64::from(WARNINGS_PER_MINUTE));
        // A minute later the count is told and a new window begins.
        let later = start + WINDOW;
        warned.first_time(Path::new("/v/next"), SkipReason::NonUtf8, later);
        assert_eq!(warned.untold(), 0);
    }
}
