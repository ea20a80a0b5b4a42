//! Paths that will not ship, reported to the pipeline once each and within bounds. A volume
//! can hold millions of symlinks or badly named files: each is remembered as a 64-bit hash
//! of its path, up to [`REMEMBERED`] of them; beyond that, rescans report them again. The
//! pipeline tells of them (`pipeline/refusals.rs`): one warning and one Event per source a
//! minute, with counts.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::path::Path;

/// Paths remembered per source; about 2 MiB at the cap.
pub const REMEMBERED: usize = 100_000;

#[derive(Default)]
pub struct Skipped {
    seen: HashSet<u64>,
    hasher: RandomState,
}

impl Skipped {
    /// Whether `path` is new: not seen before, or no longer remembered.
    pub fn first_time(&mut self, path: &Path) -> bool {
        let hash = self.hasher.hash_one(path);
        if self.seen.contains(&hash) {
            return false;
        }
        if self.seen.len() < REMEMBERED {
            self.seen.insert(hash);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_reported_once_and_memory_stays_bounded() {
        let mut skipped = Skipped::default();
        assert!(skipped.first_time(Path::new("/v/a")));
        assert!(!skipped.first_time(Path::new("/v/a")));
        for i in 0..REMEMBERED + 50_000 {
            skipped.first_time(Path::new(&format!("/v/link-{i}")));
        }
        assert_eq!(skipped.seen.len(), REMEMBERED);
        // Beyond the cap a path is not remembered: a rescan reports it again.
        let late = format!("/v/link-{}", REMEMBERED + 49_999);
        assert!(skipped.first_time(Path::new(&late)));
        assert!(skipped.first_time(Path::new(&late)));
    }
}
