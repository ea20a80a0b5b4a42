//! Files a source holds that will not ship (refused by the destination for good, too large,
//! sparse, symlinks, bad names), summed per source and told at most once a minute each: in
//! the log, and to whoever owns the volume (an Event on its claim), without a flood.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::discover::Source;

/// How often one source's refusals are told at most.
pub const REFUSALS_EVERY: Duration = Duration::from_secs(60);

/// Files of one source not shipped since the last report, by reason.
#[derive(Clone, Debug)]
pub struct Refused {
    pub source: Arc<Source>,
    /// By reason label (`key_too_long`, `sparse`, …).
    pub files: BTreeMap<&'static str, u64>,
    /// One of the files, relative to the source root, for the message.
    pub example: String,
}

impl Refused {
    /// One line for the volume's owner: how many files, why, and one of them.
    pub fn note(&self) -> String {
        let total: u64 = self.files.values().sum();
        let why: Vec<String> = self
            .files
            .iter()
            .map(|(reason, n)| format!("{n} {}", explain(reason)))
            .collect();
        let mut example: String = self.example.chars().take(EXAMPLE_CHARS).collect();
        if example.len() < self.example.len() {
            example.push('…');
        }
        let files = if total == 1 { "file" } else { "files" };
        format!(
            "{total} {files} in this volume will not be shipped as they are: {}; e.g. `{example}`",
            why.join(", ")
        )
    }
}

/// A path shown in a note is cut to this many characters: an Event's note holds 1 KiB.
const EXAMPLE_CHARS: usize = 300;

fn explain(reason: &str) -> &'static str {
    match reason {
        "key_too_long" => {
            "with an object key over the store's limit (shorten the DAG, task or run ids)"
        }
        "refused" => "refused by the destination",
        "too_large" => "larger than --max-file-size",
        "sparse" => "sparse (mostly holes)",
        "symlink" => "symlinks (never followed)",
        "non_utf8" => "with names that are not UTF-8",
        "invalid_name" => "with names no object key can hold",
        "not_regular" => "not regular files",
        "unreadable" => "unreadable",
        _ => "not shippable",
    }
}

/// Told each source's refusals.
pub type RefusalReport = mpsc::UnboundedSender<Refused>;

#[derive(Clone, Copy)]
enum Due {
    /// Sources whose last report is a minute old; `one_warned` when the caller warns of the
    /// file just added.
    ByTime {
        one_warned: bool,
    },
    All,
}

struct Pending {
    refused: Option<Refused>,
    last_told: Option<Instant>,
}

pub(super) struct Refusals {
    report: Option<RefusalReport>,
    by_source: HashMap<String, Pending>,
}

impl Refusals {
    pub(super) fn new(report: Option<RefusalReport>) -> Self {
        Self {
            report,
            by_source: HashMap::new(),
        }
    }

    /// Counts a file that will not ship; the first of a source in a minute is told at once,
    /// and then `true` says so, for a warning of its own.
    pub(super) fn add(
        &mut self,
        source: &Arc<Source>,
        relative: &str,
        reason: &'static str,
    ) -> bool {
        let pending = self.by_source.entry(source.id.clone()).or_insert(Pending {
            refused: None,
            last_told: None,
        });
        let refused = pending.refused.get_or_insert_with(|| Refused {
            source: source.clone(),
            files: BTreeMap::new(),
            example: relative.to_owned(),
        });
        *refused.files.entry(reason).or_default() += 1;
        let first = pending
            .last_told
            .is_none_or(|at| at.elapsed() >= REFUSALS_EVERY);
        if first {
            self.tell(Instant::now(), Due::ByTime { one_warned: true });
        }
        first
    }

    /// Tells what each source gathered, where its last report is a minute old.
    pub(super) fn tell_due(&mut self, now: Instant) {
        self.tell(now, Due::ByTime { one_warned: false });
    }

    /// Tells whatever is gathered, due or not: the daemon is stopping.
    pub(super) fn tell_all(&mut self) {
        self.tell(Instant::now(), Due::All);
    }

    fn tell(&mut self, now: Instant, due: Due) {
        for pending in self.by_source.values_mut() {
            let one_warned = match due {
                Due::All => false,
                Due::ByTime { one_warned } => {
                    let due = pending
                        .last_told
                        .is_none_or(|at| now.duration_since(at) >= REFUSALS_EVERY);
                    if !due {
                        continue;
                    }
                    one_warned
                }
            };
            if let Some(refused) = pending.refused.take() {
                let files: u64 = refused.files.values().sum();
                // Each file gathered is logged here but the one the caller warns of itself.
                if files > u64::from(one_warned) {
                    tracing::warn!(source = %refused.source.root.display(), files, reasons = ?refused.files, example = %refused.example, "files not shipped since the last report");
                }
                if let Some(report) = &self.report {
                    let _ = report.send(refused);
                }
                pending.last_told = Some(now);
            }
        }
    }

    pub(super) fn removed(&mut self, source: &str) {
        self.by_source.remove(source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_told_at_once_and_the_rest_once_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Source::new(dir.path()).unwrap());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut refusals = Refusals::new(Some(tx));
        assert!(
            refusals.add(&source, "a.log", "sparse"),
            "the first is warned of"
        );
        let first = rx.try_recv().unwrap();
        assert_eq!(first.files, BTreeMap::from([("sparse", 1)]));
        assert_eq!(first.example, "a.log");
        for i in 0..1000 {
            assert!(!refusals.add(&source, &format!("{i}.log"), "key_too_long"));
        }
        refusals.add(&source, "b.log", "sparse");
        assert!(rx.try_recv().is_err(), "nothing more within the minute");
        refusals.tell_due(Instant::now() + REFUSALS_EVERY);
        let summed = rx.try_recv().unwrap();
        assert_eq!(
            summed.files,
            BTreeMap::from([("key_too_long", 1000), ("sparse", 1)])
        );
        assert_eq!(summed.example, "0.log");
        refusals.tell_due(Instant::now() + REFUSALS_EVERY * 3);
        assert!(rx.try_recv().is_err(), "nothing gathered, nothing told");
    }

    #[test]
    fn what_is_gathered_is_told_when_stopping_without_waiting_the_minute() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Source::new(dir.path()).unwrap());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut refusals = Refusals::new(Some(tx));
        refusals.add(&source, "a.log", "symlink");
        rx.try_recv().unwrap();
        refusals.add(&source, "b.log", "non_utf8");
        refusals.tell_due(Instant::now());
        assert!(rx.try_recv().is_err(), "not yet due");
        refusals.tell_all();
        let last = rx.try_recv().unwrap();
        assert_eq!(last.files, BTreeMap::from([("non_utf8", 1)]));
        assert_eq!(last.example, "b.log");
    }

    #[test]
    fn the_note_says_how_many_why_and_which() {
        let dir = tempfile::tempdir().unwrap();
        let refused = Refused {
            source: Arc::new(Source::new(dir.path()).unwrap()),
            files: BTreeMap::from([("key_too_long", 2), ("sparse", 1)]),
            example: "a".repeat(400),
        };
        let note = refused.note();
        assert!(note.starts_with(
            "3 files in this volume will not be shipped as they are: 2 with an object key over"
        ));
        assert!(note.contains(", 1 sparse (mostly holes); e.g. `"));
        assert!(note.len() < 1024 && note.ends_with("…`"), "{note}");
    }
}
