//! When each followed file is due, kept per source and taken in turns: a source with
//! thousands of due files (a busy or hostile volume) delays another source's next file by
//! one upload, not by its whole backlog.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

/// (due, generation, path relative to the source root)
type Due = Reverse<(Instant, u64, String)>;

#[derive(Default)]
pub(super) struct Turns {
    per_source: HashMap<String, BinaryHeap<Due>>,
    /// Sources with something queued, the next to take a turn first.
    order: VecDeque<String>,
}

impl Turns {
    pub(super) fn push(&mut self, source: &str, due: Instant, generation: u64, relative: String) {
        let queue = match self.per_source.get_mut(source) {
            Some(queue) => queue,
            None => {
                self.order.push_back(source.to_owned());
                self.per_source.entry(source.to_owned()).or_default()
            }
        };
        queue.push(Reverse((due, generation, relative)));
    }

    /// The earliest time anything queued is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.per_source
            .values()
            .filter_map(|queue| queue.peek().map(|Reverse((due, ..))| *due))
            .min()
    }

    /// The next due file, from the next source in turn that has one, skipping at first the
    /// sources `busy` says have uploads enough under way; `(source, relative, generation)`.
    /// What it yields may be stale: the caller checks the generation.
    pub(super) fn take(
        &mut self,
        now: Instant,
        busy: impl Fn(&str) -> bool,
    ) -> Option<(String, String, u64)> {
        for respect_busy in [true, false] {
            for _ in 0..self.order.len() {
                let source = self.order.pop_front()?;
                let Some(queue) = self.per_source.get_mut(&source) else {
                    continue;
                };
                let due_now = queue.peek().is_some_and(|Reverse((due, ..))| *due <= now);
                if !due_now || (respect_busy && busy(&source)) {
                    self.order.push_back(source);
                    continue;
                }
                let Some(Reverse((_, generation, relative))) = queue.pop() else {
                    continue;
                };
                if queue.is_empty() {
                    self.per_source.remove(&source);
                } else {
                    self.order.push_back(source.clone());
                }
                return Some((source, relative, generation));
            }
        }
        None
    }

    /// Everything queued for `source` goes (the source was removed).
    pub(super) fn remove_source(&mut self, source: &str) {
        if self.per_source.remove(source).is_some() {
            self.order.retain(|s| s != source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn drain(turns: &mut Turns, now: Instant, busy: impl Fn(&str) -> bool) -> Vec<String> {
        std::iter::from_fn(|| turns.take(now, &busy))
            .map(|(source, relative, _)| format!("{source}/{relative}"))
            .collect()
    }

    #[test]
    fn sources_take_turns_whatever_their_backlog() {
        let now = Instant::now();
        let mut turns = Turns::default();
        for i in 0..1000 {
            turns.push("hostile", now - Duration::from_secs(60), i, format!("{i}"));
        }
        turns.push("quiet", now, 1000, "log".into());
        let first: Vec<String> = drain(&mut turns, now, |_| false)
            .into_iter()
            .take(2)
            .collect();
        assert_eq!(first, ["hostile/0", "quiet/log"]);
    }

    #[test]
    fn nothing_before_it_is_due() {
        let now = Instant::now();
        let mut turns = Turns::default();
        turns.push("a", now + Duration::from_secs(1), 1, "later".into());
        turns.push("a", now, 2, "now".into());
        assert_eq!(drain(&mut turns, now, |_| false), ["a/now"]);
        assert_eq!(turns.next_due(), Some(now + Duration::from_secs(1)));
    }

    #[test]
    fn a_busy_source_waits_for_others_but_not_for_nothing() {
        let now = Instant::now();
        let mut turns = Turns::default();
        turns.push("busy", now, 1, "1".into());
        turns.push("busy", now, 2, "2".into());
        turns.push("other", now, 3, "1".into());
        let busy = |s: &str| s == "busy";
        assert_eq!(
            drain(&mut turns, now, busy),
            ["other/1", "busy/1", "busy/2"]
        );
    }

    #[test]
    fn a_removed_source_leaves_nothing_queued() {
        let now = Instant::now();
        let mut turns = Turns::default();
        turns.push("gone", now, 1, "1".into());
        turns.push("kept", now, 2, "1".into());
        turns.remove_source("gone");
        assert_eq!(drain(&mut turns, now, |_| false), ["kept/1"]);
        assert_eq!(turns.next_due(), None);
    }
}
