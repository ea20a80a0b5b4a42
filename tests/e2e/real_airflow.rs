//! A real Airflow beside localship: `airflow standalone` (scheduler, triggerer, a local
//! executor on SQLite) runs a DAG with a deferrable sensor and a task that goes quiet for
//! longer than `--settle`, with its own remote logging to MinIO, while localship ships its log
//! folder. Read back through Airflow's own HTTP log endpoint (what the UI calls), and from
//! the bucket, every line is there once, the lines Airflow 2 writes into a log during its own
//! upload included. Once with Airflow 2.10, once with Airflow 3.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use localship_tests::airflow::{Airflow, Standalone};
use localship_tests::{wait_for, Minio, ShipperAgent};

const BUCKET: &str = "airflow";
const REMOTE_BASE: &str = "s3://airflow/logs";
const DAG: &str = "beside";
const RUN: &str = "beside_1";
const SIDE_MARK: &str = ".localship-part-";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airflow_2_standalone_with_localship_shows_every_line_once() -> Result<()> {
    standalone_beside_localship(Airflow::V2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airflow_3_standalone_with_localship_shows_every_line_once() -> Result<()> {
    standalone_beside_localship(Airflow::V3).await
}

async fn standalone_beside_localship(version: Airflow) -> Result<()> {
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let mut airflow = Standalone::start(version, &minio, REMOTE_BASE)?;
    std::fs::create_dir_all(airflow.logs_dir())?;
    // Longer than any quiet spell of the DAG's tasks; Airflow 2 logs lines into the task's
    // file during its own upload, which only localship ships, finished after this.
    let extra = ["--airflow-remote-logging=on", "--final-after=20s"];
    let mut shipper = ShipperAgent::standalone(&minio, &airflow.logs_dir(), REMOTE_BASE, &extra)?;
    shipper.start().await?;

    // Every side key localship writes while the DAG runs.
    let sides = Arc::new(Mutex::new(BTreeSet::new()));
    let watcher = {
        let (client, sides) = (minio.client(), sides.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(listed) = client.list_objects_v2().bucket(BUCKET).send().await {
                    let keys = listed.contents().iter().filter_map(|o| o.key());
                    let found = keys.filter(|k| k.contains(SIDE_MARK)).map(str::to_owned);
                    sides.lock().unwrap().extend(found);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let run = tokio::task::block_in_place(|| airflow.run_dag(DAG, RUN))?;
    ensure!(
        run.state == "success",
        "the run ended {}: {run:?}",
        run.state
    );

    // Airflow uploaded each log at its end; localship's side keys go once they are covered,
    // or once the log is final.
    let task_prefix = format!("logs/dag_id={DAG}/run_id={RUN}/");
    wait_for("no side key left", Duration::from_secs(90), || async {
        let keys = minio.list_keys(BUCKET).await?;
        let left = keys
            .iter()
            .any(|k| k.starts_with(&task_prefix) && k.contains(SIDE_MARK));
        Ok((!left).then_some(()))
    })
    .await?;
    watcher.abort();
    let quiet_side = sides
        .lock()
        .unwrap()
        .iter()
        .any(|k| k.contains("task_id=quiet"));
    ensure!(
        quiet_side,
        "localship never shipped the quiet task while it ran: {:?}",
        sides.lock().unwrap()
    );

    // What Airflow's reader returns: each stored line once, and every line still in a local
    // file among them (Airflow 3 empties a file it uploaded; Airflow 2 keeps it).
    for key in minio.list_keys(BUCKET).await? {
        if !key.starts_with(&task_prefix) {
            continue;
        }
        let bytes = minio.get_object(BUCKET, &key).await?.unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let stored: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let repeated = repeated(stored.iter().copied());
        ensure!(
            repeated.is_empty(),
            "{key} holds these lines more than once: {repeated:#?}"
        );
        let local = airflow.logs_dir().join(key.trim_start_matches("logs/"));
        let local = std::fs::read_to_string(&local).unwrap_or_default();
        let missing: Vec<&str> = local
            .lines()
            .filter(|l| !l.trim().is_empty() && !stored.contains(l))
            .collect();
        ensure!(
            missing.is_empty(),
            "{key} lacks lines of the local log: {missing:#?}"
        );
    }

    // What the UI shows: each record once, both parts of the quiet task's log.
    let read = tokio::task::block_in_place(|| airflow.read_run(DAG, RUN))?;
    for (task, ti) in &read.tasks {
        ensure!(
            !ti.lines.is_empty(),
            "the UI shows no log for {task}: {ti:?}"
        );
        let repeated = repeated(ti.lines.iter().map(String::as_str));
        ensure!(
            repeated.is_empty(),
            "the UI shows {task}'s records more than once: {repeated:#?}"
        );
    }
    let quiet = read.tasks["quiet"].lines.join("\n");
    for part in ["quiet task: first part", "quiet task: second part"] {
        ensure!(
            quiet.contains(part),
            "the UI's log of `quiet` lacks {part:?}:\n{quiet}"
        );
    }
    shipper.check_running()?;
    Ok(())
}

/// The lines that occur more than once, with their counts.
fn repeated<'a>(lines: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, usize> {
    let mut counts = BTreeMap::new();
    for line in lines {
        *counts.entry(line).or_insert(0) += 1;
    }
    counts.retain(|_, n| *n > 1);
    counts
}
