//! What the loop counts: the summary `--once` prints and the metrics, each in one place.

use std::time::{Duration, SystemTime};

use super::Pipeline;
use crate::destination::Destination;
use crate::discover::SkipReason;
use crate::key::log_kind;
use crate::report::progress_line;
use crate::ship::How;

impl<D: Destination> Pipeline<D> {
    /// A file not shipped, and why.
    pub(super) fn count_skipped(&mut self, reason: SkipReason) {
        self.metrics
            .skipped
            .with_label_values(&[reason.label()])
            .inc();
        *self.summary.skipped.entry(reason.label()).or_default() += 1;
    }

    /// A file found as it was shipped: nothing to do.
    pub(super) fn count_unchanged(&mut self) {
        self.summary.unchanged += 1;
        self.metrics.skipped.with_label_values(&["unchanged"]).inc();
    }

    pub(super) fn count_shipped(&mut self, relative: &str, how: How, size: u64, elapsed: Duration) {
        let kind = log_kind(relative).label();
        match how {
            How::Unchanged | How::SideKept => return self.count_unchanged(),
            How::AlreadyThere => self.summary.already_there += 1,
            How::Uploaded | How::Replaced | How::Conflict | How::Side | How::Repaired => {
                self.summary.shipped += 1;
                self.summary.bytes += size;
                self.metrics.bytes_shipped.inc_by(size);
                self.metrics.upload_seconds.observe(elapsed.as_secs_f64());
            }
        }
        if how == How::Conflict {
            self.summary.conflicts += 1;
            self.metrics.conflicts.inc();
        }
        self.metrics.files_shipped.with_label_values(&[kind]).inc();
    }

    pub(super) fn update_backlog(&self) {
        let now_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let bytes: u64 = self.entries.values().map(|e| e.obs.stat.size).sum();
        let oldest = self.entries.values().map(|e| e.obs.stat.mtime_ns).min();
        let age = oldest.map_or(0.0, |mtime| (now_ns - mtime).max(0) as f64 / 1e9);
        self.metrics.backlog_files.set(self.entries.len() as i64);
        self.metrics.backlog_bytes.set(bytes as i64);
        self.metrics.oldest_unshipped_age.set(age);
    }

    pub(super) fn print_progress(&self) {
        let done = self.summary.done();
        let total = done + self.entries.len() as u64;
        eprintln!(
            "{}",
            progress_line(done, total, self.summary.bytes, self.started.elapsed())
        );
    }
}
