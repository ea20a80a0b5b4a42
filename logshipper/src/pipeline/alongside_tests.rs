//! The loop beside Airflow's uploads: a log under its side key is looked at again until
//! Airflow's own object covers it, or until it is final and its key is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use crate::destination::file::FileDestination;
use crate::discover::{Source, Sources};
use crate::filter::{Filter, DEFAULT_INCLUDE};
use crate::key::{side_key, writer_id};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Settings};
use crate::ship::{Alongside, Context};

const TASK: &str = "dag_id=a/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";
const HOUR: Duration = Duration::from_secs(3600);

struct Running {
    _dir: tempfile::TempDir,
    logs: PathBuf,
    out: PathBuf,
    side: String,
    stop: watch::Sender<bool>,
    _destination_ok: watch::Sender<bool>,
    _sources: Sources,
}

async fn start(final_after: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (logs, out) = (dir.path().join("logs"), dir.path().join("out"));
    std::fs::create_dir_all(&logs).unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
    let ctx = Arc::new(Context {
        destination: Arc::new(FileDestination::new(&out).unwrap()),
        recorder: ledger.recorder(),
        ledger,
        alongside: Some(Alongside {
            host: "node-a".into(),
        }),
        max_file_size: u64::MAX,
    });
    let settings = Settings {
        settle: Duration::from_millis(200),
        once: false,
        workers: 2,
        delete_after: None,
        sweep_every: HOUR,
        final_after,
        initial_sources: 1,
        max_tracked: 100,
    };
    let (ok_tx, ok_rx) = watch::channel(true);
    let (ready_tx, _ready) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new().unwrap());
    let notify = Arc::new(Notify::new());
    let pipeline = Pipeline::new(ctx, metrics, settings, ok_rx, notify, ready_tx);
    let (events_tx, events) = mpsc::channel(64);
    tokio::spawn(pipeline.run(events, stop_rx));
    let include: Vec<String> = DEFAULT_INCLUDE.iter().map(|g| g.to_string()).collect();
    let mut sources = Sources::new(Filter::new(&include, &[]).unwrap(), events_tx, Some(HOUR));
    sources.add(&logs).unwrap();
    let source_id = Source::new(&logs).unwrap().id;
    Running {
        side: side_key(TASK, &writer_id("node-a", &source_id)),
        _dir: dir,
        logs,
        out,
        stop,
        _destination_ok: ok_tx,
        _sources: sources,
    }
}

fn write(root: &Path, relative: &str, bytes: &[u8]) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Waits until `key` under `out` holds `want` (`None`: no object).
async fn until(out: &Path, key: &str, want: Option<&[u8]>) {
    let path = out.join(key);
    for _ in 0..200 {
        if std::fs::read(&path).ok().as_deref() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key} never became {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airflows_upload_after_the_log_settled_is_noticed_and_the_side_key_goes() {
    let r = start(HOUR).await;
    write(&r.logs, TASK, b"a1\n");
    until(&r.out, &r.side, Some(b"a1\n")).await;
    // Airflow's upload comes with no change to the file: only a revisit can see it.
    write(&r.out, TASK, b"a1\n");
    until(&r.out, &r.side, None).await;
    assert_eq!(std::fs::read(r.out.join(TASK)).unwrap(), b"a1\n");
    r.stop.send_replace(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_quiet_for_the_final_period_gets_its_own_key() {
    let r = start(Duration::from_secs(2)).await;
    write(&r.logs, TASK, b"a1\n");
    until(&r.out, &r.side, Some(b"a1\n")).await;
    until(&r.out, TASK, Some(b"a1\n")).await;
    until(&r.out, &r.side, None).await;
    r.stop.send_replace(true);
}
