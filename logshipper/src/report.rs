//! What a run tells the operator: the progress line of a long `--once` run and its summary.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Counts over one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Files whose bytes were uploaded (including conflict copies).
    pub shipped: u64,
    pub bytes: u64,
    /// Files the ledger already had as shipped; nothing asked of the destination.
    pub unchanged: u64,
    /// Files whose bytes the destination already held (Airflow uploaded them first).
    pub already_there: u64,
    /// Files shipped beside a different object under their key.
    pub conflicts: u64,
    /// Files shipped while still changing, at the end of a `--once` settle period.
    pub unsettled: u64,
    /// Files that will not be shipped, by reason.
    pub skipped: BTreeMap<&'static str, u64>,
    pub failed: u64,
    pub deleted: u64,
}

impl Summary {
    /// Files dealt with, one way or another.
    pub fn done(&self) -> u64 {
        self.shipped
            + self.unchanged
            + self.already_there
            + self.failed
            + self.skipped.values().sum::<u64>()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shipped {} files ({} bytes), skipped {} unchanged, {} already at the destination, \
             {} conflicts, {} failed",
            self.shipped,
            self.bytes,
            self.unchanged,
            self.already_there,
            self.conflicts,
            self.failed
        )?;
        if !self.skipped.is_empty() {
            let reasons: Vec<String> = self
                .skipped
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let total: u64 = self.skipped.values().sum();
            write!(f, ", {total} not shippable ({})", reasons.join(", "))?;
        }
        if self.unsettled > 0 {
            write!(f, ", {} shipped while still changing", self.unsettled)?;
        }
        if self.deleted > 0 {
            write!(f, ", deleted {} local files", self.deleted)?;
        }
        Ok(())
    }
}

/// `progress: 120/1000 files, 12.0 MiB shipped, 4.0 MiB/s`
pub fn progress_line(done: u64, total: u64, bytes: u64, elapsed: Duration) -> String {
    let rate = bytes as f64 / elapsed.as_secs_f64().max(0.001);
    format!(
        "progress: {done}/{total} files, {} shipped, {}/s",
        human_bytes(bytes as f64),
        human_bytes(rate)
    )
}

fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line() {
        let mut s = Summary {
            shipped: 3,
            bytes: 1234,
            unchanged: 2,
            ..Summary::default()
        };
        assert_eq!(
            s.to_string(),
            "shipped 3 files (1234 bytes), skipped 2 unchanged, 0 already at the destination, \
             0 conflicts, 0 failed"
        );
        s.skipped.insert("symlink", 1);
        s.skipped.insert("non_utf8", 2);
        s.deleted = 4;
        assert!(s
            .to_string()
            .ends_with(", 3 not shippable (non_utf8 2, symlink 1), deleted 4 local files"));
        assert_eq!(s.done(), 8);
    }

    #[test]
    fn progress() {
        let line = progress_line(120, 1000, 12 << 20, Duration::from_secs(3));
        assert_eq!(
            line,
            "progress: 120/1000 files, 12.0 MiB shipped, 4.0 MiB/s"
        );
        assert_eq!(
            progress_line(0, 5, 0, Duration::ZERO),
            "progress: 0/5 files, 0 B shipped, 0 B/s"
        );
    }
}
