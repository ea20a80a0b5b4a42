//! Draining sources: their volume is going away, so every file in them ships at once,
//! settled or not, and whoever asked hears when nothing of the final walk is left to ship.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::discover::Source;

/// Told the source of each finished drain, once per drain.
pub type DrainReport = mpsc::UnboundedSender<Arc<Source>>;

#[derive(Default)]
pub(super) struct Drains {
    report: Option<DrainReport>,
    /// Draining sources whose final walk is done, by id, and whether that drain was reported.
    walked: HashMap<String, (Arc<Source>, bool)>,
}

impl Drains {
    pub(super) fn new(report: Option<DrainReport>) -> Self {
        Self {
            report,
            walked: HashMap::new(),
        }
    }

    /// The final walk of a draining source is done: what it found is in the backlog.
    pub(super) fn walked(&mut self, source: Arc<Source>) {
        self.walked.insert(source.id.clone(), (source, false));
    }

    /// The source was removed (or is about to be walked again): forget its drain.
    pub(super) fn removed(&mut self, id: &str) {
        self.walked.remove(id);
    }

    /// Reports every walked drain that `has_pending` says has no file left to ship.
    pub(super) fn report_finished(&mut self, has_pending: impl Fn(&str) -> bool) {
        for (id, (source, reported)) in &mut self.walked {
            if *reported || has_pending(id) {
                continue;
            }
            *reported = true;
            tracing::info!(source = %source.root.display(), "drained: every file is shipped");
            if let Some(report) = &self.report {
                let _ = report.send(source.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tokio::sync::{watch, Notify};

    use crate::destination::file::FileDestination;
    use crate::discover::Sources;
    use crate::filter::{Filter, DEFAULT_INCLUDE};
    use crate::ledger::Ledger;
    use crate::metrics::Metrics;
    use crate::pipeline::{Pipeline, Settings};
    use crate::ship::Context;

    const TASK: &str = "dag_id=a/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";
    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn a_drain_ships_unsettled_files_at_once_and_waits_for_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let (logs, out) = (dir.path().join("logs"), dir.path().join("out"));
        let write = |relative: &str, bytes: &[u8]| {
            let path = logs.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        };
        write(TASK, b"running\n");
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        let recorder = ledger.recorder();
        let records = ledger.clone();
        let ctx = Arc::new(Context {
            destination: Arc::new(FileDestination::new(&out).unwrap()),
            recorder: recorder.clone(),
            ledger,
            alongside: None,
            max_file_size: u64::MAX,
        });
        let settings = Settings {
            settle: HOUR,
            once: false,
            workers: 2,
            delete_after: None,
            sweep_every: HOUR,
            final_after: Duration::from_secs(600),
            initial_sources: 1,
            max_tracked: 100,
        };
        let (ok_tx, ok_rx) = watch::channel(true);
        let (ready_tx, _ready) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::new().unwrap());
        let pipeline = Pipeline::new(
            ctx,
            metrics,
            settings,
            ok_rx,
            Arc::new(Notify::new()),
            ready_tx,
        )
        .report_drains(report_tx);
        let (events_tx, events) = mpsc::channel(64);
        let running = tokio::spawn(pipeline.run(events, stop));
        let include: Vec<String> = DEFAULT_INCLUDE.iter().map(|g| g.to_string()).collect();
        let mut sources = Sources::new(Filter::new(&include, &[]).unwrap(), events_tx, Some(HOUR));
        sources.add(&logs).unwrap();

        // The destination goes away; the drain finds a new file and a link it never ships.
        ok_tx.send_replace(false);
        write(TASK, b"running\nfinished\n");
        write("dag_id=a/run_id=r/task_id=u/attempt=1.log", b"other\n");
        std::os::unix::fs::symlink("/etc/passwd", logs.join("dag_id=a/attempt=9.log")).unwrap();
        let drained = sources.drain(&logs).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(500), reports.recv()).await;
        assert!(early.is_err(), "reported while the destination was away");
        assert!(!out.join(TASK).exists());

        ok_tx.send_replace(true);
        let reported = tokio::time::timeout(Duration::from_secs(10), reports.recv())
            .await
            .expect("a report in time")
            .unwrap();
        assert!(Arc::ptr_eq(&reported, &drained));
        assert_eq!(
            std::fs::read(out.join(TASK)).unwrap(),
            b"running\nfinished\n"
        );
        let other = out.join("dag_id=a/run_id=r/task_id=u/attempt=1.log");
        assert_eq!(std::fs::read(other).unwrap(), b"other\n");

        // Drained again, everything is in the ledger: reported without shipping anything.
        recorder.flush().await.unwrap();
        std::fs::remove_dir_all(&out).unwrap();
        let again = sources.drain(&logs).await.unwrap();
        let reported = tokio::time::timeout(Duration::from_secs(10), reports.recv())
            .await
            .expect("a report in time")
            .unwrap();
        assert!(Arc::ptr_eq(&reported, &again));
        assert!(!out.join(TASK).exists());

        // The volume goes for good: its records go with it.
        assert!(!records.records(&again.id).unwrap().is_empty());
        sources.remove(&logs).await.unwrap();
        let mut left = usize::MAX;
        for _ in 0..100 {
            left = records.records(&again.id).unwrap().len();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(left, 0, "the drained volume's records stayed");
        stop_tx.send_replace(true);
        running.await.unwrap();
    }

    #[test]
    fn a_drain_is_reported_once_when_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(Source::new(dir.path()).unwrap());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut drains = Drains::new(Some(tx));
        drains.report_finished(|_| false);
        assert!(rx.try_recv().is_err(), "not walked yet");

        drains.walked(source.clone());
        drains.report_finished(|_| true);
        assert!(rx.try_recv().is_err(), "files are left");
        drains.report_finished(|_| false);
        assert!(Arc::ptr_eq(&rx.try_recv().unwrap(), &source));
        drains.report_finished(|_| false);
        assert!(rx.try_recv().is_err(), "reported once");

        drains.removed(&source.id);
        drains.walked(source.clone());
        drains.report_finished(|_| false);
        assert!(rx.try_recv().is_ok(), "a new walk is a new drain");
    }
}
