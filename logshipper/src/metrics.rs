//! Prometheus metrics, all prefixed `localship_logshipper_`.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

const NAMESPACE: &str = "localship_logshipper";

/// Upload latency buckets, seconds: small logs on a LAN up to multi-GiB files.
const UPLOAD_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    /// Files written to or found at the destination, by log kind.
    pub files_shipped: IntCounterVec,
    pub bytes_shipped: IntCounter,
    /// Failed shipments, by reason (`Error::metric_label`).
    pub failures: IntCounterVec,
    /// Files not shipped, by reason: `symlink`, `non_utf8`, `unreadable`, … and `unchanged`.
    pub skipped: IntCounterVec,
    /// Files shipped beside a different object already under their key.
    pub conflicts: IntCounter,
    pub backlog_files: IntGauge,
    pub backlog_bytes: IntGauge,
    pub oldest_unshipped_age: Gauge,
    pub upload_seconds: Histogram,
    /// Local files removed by `--delete-after`.
    pub deleted: IntCounter,
    /// 1 while the destination's last check passed.
    pub destination_up: IntGauge,
    /// 1 while shipped files can be recorded in the ledger.
    pub ledger_writable: IntGauge,
    /// Ledger commits that failed; their records are kept and tried again.
    pub ledger_commit_failures: IntCounter,
    /// Inotify watches held on source directories.
    pub watches: IntGauge,
    /// Kubernetes mode: opted-in volumes of this node whose logs are shipped.
    pub volumes_watched: IntGauge,
    /// Kubernetes mode: deleted volumes held until their logs are shipped.
    pub volumes_draining: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE);
        let metrics = Self {
            files_shipped: IntCounterVec::new(
                opts(
                    "files_shipped_total",
                    "Files shipped (uploaded or found already there), by log kind.",
                ),
                &["kind"],
            )?,
            bytes_shipped: IntCounter::with_opts(opts("bytes_shipped_total", "Bytes uploaded."))?,
            failures: IntCounterVec::new(
                opts(
                    "failures_total",
                    "Failed attempts to ship a file, by reason.",
                ),
                &["reason"],
            )?,
            skipped: IntCounterVec::new(
                opts("skipped_total", "Files not shipped, by reason."),
                &["reason"],
            )?,
            conflicts: IntCounter::with_opts(opts(
                "conflicts_total",
                "Files shipped beside a different object already under their key.",
            ))?,
            backlog_files: IntGauge::with_opts(opts(
                "backlog_files",
                "Log files found and not shipped yet.",
            ))?,
            backlog_bytes: IntGauge::with_opts(opts(
                "backlog_bytes",
                "Bytes in log files found and not shipped yet.",
            ))?,
            oldest_unshipped_age: Gauge::with_opts(opts(
                "oldest_unshipped_age_seconds",
                "Age (since last modification) of the oldest log not shipped yet.",
            ))?,
            upload_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "upload_duration_seconds",
                    "Time to upload and verify one file.",
                )
                .namespace(NAMESPACE)
                .buckets(UPLOAD_BUCKETS.to_vec()),
            )?,
            deleted: IntCounter::with_opts(opts(
                "deleted_total",
                "Local files removed by --delete-after after their upload was verified.",
            ))?,
            destination_up: IntGauge::with_opts(opts(
                "destination_up",
                "1 while the destination's last check passed.",
            ))?,
            ledger_writable: IntGauge::with_opts(opts(
                "ledger_writable",
                "1 while shipped files can be recorded in the ledger; 0 while its commits fail.",
            ))?,
            ledger_commit_failures: IntCounter::with_opts(opts(
                "ledger_commit_failures_total",
                "Ledger commits that failed (a full disk); their records are kept and tried again.",
            ))?,
            watches: IntGauge::with_opts(opts(
                "inotify_watches",
                "Inotify watches held on source directories, from the node's fs.inotify.max_user_watches.",
            ))?,
            volumes_watched: IntGauge::with_opts(opts(
                "volumes_watched",
                "Opted-in volumes of this node whose logs are shipped (Kubernetes mode).",
            ))?,
            volumes_draining: IntGauge::with_opts(opts(
                "volumes_draining",
                "Deleted volumes held until every log in them is shipped (Kubernetes mode).",
            ))?,
            registry,
        };
        metrics.register()?;
        Ok(metrics)
    }

    fn register(&self) -> Result<(), prometheus::Error> {
        let r = &self.registry;
        r.register(Box::new(self.files_shipped.clone()))?;
        r.register(Box::new(self.bytes_shipped.clone()))?;
        r.register(Box::new(self.failures.clone()))?;
        r.register(Box::new(self.skipped.clone()))?;
        r.register(Box::new(self.conflicts.clone()))?;
        r.register(Box::new(self.backlog_files.clone()))?;
        r.register(Box::new(self.backlog_bytes.clone()))?;
        r.register(Box::new(self.oldest_unshipped_age.clone()))?;
        r.register(Box::new(self.upload_seconds.clone()))?;
        r.register(Box::new(self.deleted.clone()))?;
        r.register(Box::new(self.destination_up.clone()))?;
        r.register(Box::new(self.ledger_writable.clone()))?;
        r.register(Box::new(self.ledger_commit_failures.clone()))?;
        r.register(Box::new(self.watches.clone()))?;
        r.register(Box::new(self.volumes_watched.clone()))?;
        r.register(Box::new(self.volumes_draining.clone()))?;
        Ok(())
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into memory does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new().unwrap();
        m.files_shipped.with_label_values(&["task"]).inc();
        m.skipped.with_label_values(&["symlink"]).inc_by(2);
        m.upload_seconds.observe(0.2);
        let text = m.render();
        assert!(
            text.contains("localship_logshipper_files_shipped_total{kind=\"task\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("localship_logshipper_skipped_total{reason=\"symlink\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("localship_logshipper_upload_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("localship_logshipper_backlog_files 0"),
            "{text}"
        );
    }
}
