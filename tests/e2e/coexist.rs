//! What the shipper does to a bucket that already holds objects, against a
//! real MinIO: a new log is one conditional PUT; an object that is there is
//! compared and never overwritten unless it is a prefix of the file.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use localship_tests::servers::localship_bin;
use localship_tests::{scratch_dir, Minio, Process};

const BUCKET: &str = "airflow";
const RUN: &str = "dag_id=etl/run_id=manual__2026-11-25T10:00:00+00:00";

fn write(root: &Path, relative: &str, bytes: &[u8]) -> Result<()> {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// One `--once` run over `source`, which must succeed.
fn ship_once(minio: &Minio, source: &Path, state: &Path) -> Result<()> {
    let args = [
        format!("--source={}", source.display()),
        format!("--dest=s3://{BUCKET}/logs"),
        format!("--s3-endpoint={}", minio.endpoint()),
        "--s3-path-style".into(),
        format!("--ledger={}", state.join("ledger.redb").display()),
        "--settle=0s".into(),
        "--once".into(),
        // The sole-writer rule: the log's own key from the first upload.
        "--airflow-remote-logging=off".into(),
    ];
    let bin = localship_bin("localship-logshipper")?;
    let mut p = Process::spawn("logshipper", &bin, &args, &minio.aws_env(), state)?;
    let status = p.wait(Duration::from_secs(120))?;
    ensure!(
        status.success(),
        "--once failed ({status}):\n{}",
        p.log_tail(30)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_logs_cost_one_request_each_and_existing_objects_are_not_overwritten() -> Result<()> {
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let source = scratch_dir("coexist-src")?;
    let state = scratch_dir("coexist-state")?;

    // New logs only: one PUT each, plus the start-up listing.
    let new = 25;
    for i in 0..new {
        write(
            &source,
            &format!("{RUN}/task_id=t{i}/attempt=1.log"),
            format!("task {i}\n").as_bytes(),
        )?;
    }
    let before = minio.s3_requests()?;
    ship_once(&minio, &source, &state)?;
    let requests = minio.s3_requests()? - before;
    ensure!(
        (new..=new + 2).contains(&requests),
        "{new} new logs took {requests} S3 requests; expected one each and the start-up check"
    );
    for i in 0..new {
        let key = format!("logs/{RUN}/task_id=t{i}/attempt=1.log");
        ensure!(
            minio.get_object(BUCKET, &key).await?.as_deref()
                == Some(format!("task {i}\n").as_bytes()),
            "{key} does not hold its file"
        );
    }

    // Objects already there, from Airflow's own upload or another shipper.
    let cases: [(&str, &[u8], &[u8]); 4] = [
        ("same", b"line 1\n", b"line 1\n"),
        ("appended", b"line 1\n", b"line 1\nline 2\n"),
        ("longer", b"line 1\nline 2\n", b"line 1\n"),
        ("different", b"theirs\n", b"mine\n"),
    ];
    for (task, object, file) in cases {
        let relative = format!("{RUN}/task_id={task}/attempt=1.log");
        minio
            .put_object(BUCKET, &format!("logs/{relative}"), object.to_vec())
            .await?;
        write(&source, &relative, file)?;
    }
    ship_once(&minio, &source, &state)?;
    let keys = minio.list_keys(BUCKET).await?;
    for (task, object, file) in cases {
        let key = format!("logs/{RUN}/task_id={task}/attempt=1.log");
        let held = minio.get_object(BUCKET, &key).await?.unwrap_or_default();
        let beside: Vec<&String> = keys
            .iter()
            .filter(|k| k.starts_with(&format!("{key}.localship-conflict-")))
            .collect();
        match task {
            "appended" => ensure!(
                held == file,
                "{key}: the prefix was not replaced by the file"
            ),
            _ => ensure!(held == object, "{key}: the object there was overwritten"),
        }
        if task == "different" {
            ensure!(
                beside.len() == 1,
                "{key}: expected one conflict copy, found {beside:?}"
            );
            let copy = minio.get_object(BUCKET, beside[0]).await?;
            ensure!(
                copy.as_deref() == Some(file),
                "{}: does not hold the file",
                beside[0]
            );
        } else {
            ensure!(beside.is_empty(), "{key}: unexpected copies {beside:?}");
        }
    }
    ensure!(
        keys.len() == new as usize + cases.len() + 1,
        "unexpected keys in the bucket: {keys:?}"
    );
    Ok(())
}
