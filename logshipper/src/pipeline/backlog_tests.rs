//! The pipeline under a backlog larger than it follows at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use crate::destination::file::FileDestination;
use crate::discover::Sources;
use crate::filter::{Filter, DEFAULT_INCLUDE};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Settings};
use crate::ship::Context;

#[tokio::test]
async fn a_backlog_ten_times_the_cap_ships_whole_and_the_daemon_is_ready_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (logs, out) = (dir.path().join("logs"), dir.path().join("out"));
    let relative = |i: usize| format!("dag_id=a/run_id=r{i}/task_id=t/attempt=1.log");
    for i in 0..50 {
        let path = logs.join(relative(i));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("log {i}\n")).unwrap();
    }
    let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
    let ctx = Arc::new(Context {
        destination: Arc::new(FileDestination::new(&out).unwrap()),
        recorder: ledger.recorder(),
        ledger,
        alongside: None,
        max_file_size: u64::MAX,
    });
    let settings = Settings {
        settle: Duration::from_millis(300),
        once: false,
        workers: 2,
        delete_after: None,
        sweep_every: Duration::from_secs(3600),
        final_after: Duration::from_secs(600),
        initial_sources: 1,
        max_tracked: 5,
    };
    let (_ok_tx, ok_rx) = watch::channel(true);
    let (ready_tx, mut ready) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let metrics = Arc::new(Metrics::new().unwrap());
    let pipeline = Pipeline::new(
        ctx,
        metrics,
        settings,
        ok_rx,
        Arc::new(Notify::new()),
        ready_tx,
    );
    // A queue smaller than the backlog, so the walk itself has to wait.
    let (events_tx, events) = mpsc::channel(4);
    let running = tokio::spawn(pipeline.run(events, stop));
    let include: Vec<String> = DEFAULT_INCLUDE.iter().map(|g| g.to_string()).collect();
    let mut sources = Sources::new(Filter::new(&include, &[]).unwrap(), events_tx, None);
    sources.add(&logs).unwrap();

    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .expect("ready while the backlog ships")
        .unwrap();
    let shipped = |i: usize| std::fs::read(out.join(relative(i))).ok();
    let all = async {
        while (0..50).any(|i| shipped(i).is_none()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("every log shipped");
    for i in 0..50 {
        assert_eq!(shipped(i).unwrap(), format!("log {i}\n").into_bytes());
    }
    stop_tx.send_replace(true);
    running.await.unwrap();
}
