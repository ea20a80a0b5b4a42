//! Files already shipped or skipped, as they looked then, so that seeing one again on a
//! rescan costs a hash lookup instead of a ledger read. A node keeps hundreds of thousands of
//! task logs: each is remembered as 24 bytes (a 64-bit hash of its path and its stat), not as
//! its path: a fifth of the memory (BENCHMARKS.md, P3).
//!
//! A hash collision can only make a file look unchanged if its size and modification time
//! (in nanoseconds) are also equal to the other file's; the ledger is still the record of
//! what was shipped.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;

use crate::local_file::FileStat;

pub(super) struct Seen {
    hasher: RandomState,
    /// By source id, then by hash of the path relative to the source.
    sources: HashMap<String, HashMap<u64, FileStat>>,
}

impl Seen {
    pub(super) fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            sources: HashMap::new(),
        }
    }

    /// Whether `relative` in `source` was last seen settled with exactly `stat`.
    pub(super) fn is(&self, source: &str, relative: &str, stat: FileStat) -> bool {
        self.sources
            .get(source)
            .and_then(|files| files.get(&self.hasher.hash_one(relative)))
            == Some(&stat)
    }

    pub(super) fn insert(&mut self, source: &str, relative: &str, stat: FileStat) {
        let hash = self.hasher.hash_one(relative);
        match self.sources.get_mut(source) {
            Some(files) => {
                files.insert(hash, stat);
            }
            None => {
                self.sources
                    .insert(source.to_owned(), HashMap::from([(hash, stat)]));
            }
        }
    }

    pub(super) fn remove(&mut self, source: &str, relative: &str) {
        if let Some(files) = self.sources.get_mut(source) {
            files.remove(&self.hasher.hash_one(relative));
        }
    }

    /// Forgets a whole source (its volume is gone).
    pub(super) fn remove_source(&mut self, source: &str) {
        self.sources.remove(source);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sources.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(size: u64) -> FileStat {
        FileStat { size, mtime_ns: 7 }
    }

    #[test]
    fn remembers_a_file_as_it_looked() {
        let mut seen = Seen::new();
        seen.insert("a", "x/attempt=1.log", stat(10));
        assert!(seen.is("a", "x/attempt=1.log", stat(10)));
        assert!(!seen.is("a", "x/attempt=1.log", stat(11)), "grew since");
        assert!(!seen.is("b", "x/attempt=1.log", stat(10)), "other source");
        assert!(!seen.is("a", "x/attempt=2.log", stat(10)), "other file");
        seen.insert("a", "x/attempt=1.log", stat(11));
        assert!(seen.is("a", "x/attempt=1.log", stat(11)));
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn forgets_files_and_sources() {
        let mut seen = Seen::new();
        seen.insert("a", "1.log", stat(1));
        seen.insert("a", "2.log", stat(2));
        seen.insert("b", "1.log", stat(1));
        seen.remove("a", "1.log");
        assert!(!seen.is("a", "1.log", stat(1)));
        assert!(seen.is("a", "2.log", stat(2)));
        seen.remove_source("a");
        assert!(!seen.is("a", "2.log", stat(2)));
        assert!(seen.is("b", "1.log", stat(1)));
        assert_eq!(seen.len(), 1);
    }
}
