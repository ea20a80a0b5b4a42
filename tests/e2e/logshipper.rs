//! The standalone log shipper against a real MinIO, read back through
//! Airflow's own S3 log reader.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use localship_tests::airflow::read_with_airflow;
use localship_tests::{scratch_dir, wait_for, Minio, ShipperAgent};

const BUCKET: &str = "airflow";

/// Airflow's task-log layout: mapped tasks, retries, a triggerer sibling and
/// run ids with `:` and `+`, as Airflow writes them.
fn airflow_tree(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let files = [
        ("dag_id=etl/run_id=manual__2024-05-01T10:00:00+00:00/task_id=extract/attempt=1.log", "extract ran\n".repeat(50)),
        ("dag_id=etl/run_id=manual__2024-05-01T10:00:00+00:00/task_id=extract/attempt=2.log", "retry ok\n".to_string()),
        ("dag_id=etl/run_id=manual__2024-05-01T10:00:00+00:00/task_id=load/map_index=0/attempt=1.log", "map 0 ✓\n".to_string()),
        ("dag_id=etl/run_id=manual__2024-05-01T10:00:00+00:00/task_id=load/map_index=17/attempt=1.log", "map 17 — Grüße\n".to_string()),
        ("dag_id=sensors/run_id=scheduled__2024-05-02T00:00:00+00:00/task_id=wait/attempt=1.log", "deferring\n".to_string()),
        ("dag_id=sensors/run_id=scheduled__2024-05-02T00:00:00+00:00/task_id=wait/attempt=1.log.trigger.42.log", "trigger fired\n".to_string()),
    ];
    let mut tree = BTreeMap::new();
    for (rel, text) in files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, &text)?;
        tree.insert(rel.to_string(), text.into_bytes());
    }
    Ok(tree)
}

/// A standalone shipper of `source` to `s3://airflow/logs`.
fn shipper(minio: &Minio, source: &Path, extra: &[&str]) -> Result<ShipperAgent> {
    ShipperAgent::standalone(minio, source, &format!("s3://{BUCKET}/logs"), extra)
}

async fn assert_shipped(minio: &Minio, tree: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    for (rel, bytes) in tree {
        let key = format!("logs/{rel}");
        let got = minio.get_object(BUCKET, &key).await?;
        assert!(
            got.as_ref() == Some(bytes),
            "{key}: object differs from the file"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ships_airflow_logs_that_airflows_reader_reads_and_a_restart_asks_nothing_per_file(
) -> Result<()> {
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let source = scratch_dir("airflow-logs")?;
    let mut tree = airflow_tree(&source)?;
    // Not shipped: a symlink out of the tree, and scheduler logs (opt-in).
    std::os::unix::fs::symlink(
        "/etc/passwd",
        source.join(
            "dag_id=etl/run_id=manual__2024-05-01T10:00:00+00:00/task_id=extract/attempt=9.log",
        ),
    )?;
    std::fs::create_dir_all(source.join("scheduler/2024-05-01"))?;
    std::fs::write(source.join("scheduler/2024-05-01/etl.py.log"), b"scheduler")?;
    let shipper = shipper(&minio, &source, &[])?;

    let before = minio.s3_requests()?;
    shipper.once(&[])?;
    let first_run = minio.s3_requests()? - before;
    assert_shipped(&minio, &tree).await?;
    let expected: Vec<String> = tree.keys().map(|r| format!("logs/{r}")).collect();
    assert_eq!(
        minio.list_keys(BUCKET).await?,
        expected,
        "extra or missing keys"
    );
    // Each new file costs requests, so the counter is live.
    assert!(
        first_run >= tree.len() as u64,
        "only {first_run} requests for {} files",
        tree.len()
    );

    // Airflow's own reader finds each attempt's log, the trigger sibling included.
    let attempts: Vec<&str> = tree
        .keys()
        .map(String::as_str)
        .filter(|r| !r.contains(".trigger."))
        .collect();
    let read = {
        let attempts: Vec<String> = attempts.iter().map(|s| s.to_string()).collect();
        let minio_ref = &minio;
        let refs: Vec<&str> = attempts.iter().map(String::as_str).collect();
        read_with_airflow(minio_ref, &format!("s3://{BUCKET}/logs"), &refs)?
    };
    for rel in &attempts {
        let got = &read[*rel];
        let texts = got.content.clone().unwrap_or_default();
        let mut want = vec![String::from_utf8(tree[*rel].clone())?];
        let trigger = format!("{rel}.trigger.42.log");
        if let Some(t) = tree.get(&trigger) {
            want.push(String::from_utf8(t.clone())?);
        }
        assert_eq!(texts, want, "Airflow read {rel} differently");
    }

    // A restart over shipped files: no request per file.
    let before = minio.s3_requests()?;
    shipper.once(&[])?;
    let restart = minio.s3_requests()? - before;
    assert!(restart <= 1, "restart made {restart} S3 requests");

    // Airflow appends on retry/resume: the object follows the file.
    let rel = attempts[0].to_string();
    let mut grown = tree[&rel].clone();
    grown.extend_from_slice(b"resumed after deferral\n");
    std::fs::write(source.join(&rel), &grown)?;
    tree.insert(rel, grown);
    shipper.once(&[])?;
    assert_shipped(&minio, &tree).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_multipart_then_restart_leaves_the_whole_object() -> Result<()> {
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let source = scratch_dir("big-log")?;
    let rel = "dag_id=big/run_id=manual__2024-06-01T00:00:00+00:00/task_id=dump/attempt=1.log";
    let path = source.join(rel);
    std::fs::create_dir_all(path.parent().unwrap())?;
    // 96 MiB of varied lines, so a wrong part order or a missing part shows.
    let mut data = Vec::with_capacity(96 << 20);
    let mut i = 0u64;
    while data.len() < 96 << 20 {
        data.extend_from_slice(
            format!("{i:012} the quick brown fox jumps over the lazy dog\n").as_bytes(),
        );
        i += 1;
    }
    std::fs::write(&path, &data)?;
    let shipper = shipper(
        &minio,
        &source,
        &[
            "--multipart-threshold=5MiB",
            "--part-size=5MiB",
            "--upload-concurrency=1",
            "--settle=10ms",
        ],
    )?;
    let mut first = shipper.spawn_once(&[])?;
    let client = minio.client();
    let key = format!("logs/{rel}");
    // Poll by hand: the shipper must still be running while we look.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        first.check_running()?;
        // MinIO lists multipart uploads only for an exact object key.
        let uploads = client
            .list_multipart_uploads()
            .bucket(BUCKET)
            .prefix(&key)
            .send()
            .await?;
        if !uploads.uploads().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no multipart upload seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill();
    assert_eq!(
        minio.get_object(BUCKET, &key).await?,
        None,
        "a half object is visible"
    );

    shipper.once(&[])?;
    let got = minio
        .get_object(BUCKET, &key)
        .await?
        .expect("object after restart");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "object differs from the file");
    assert_eq!(minio.list_keys(BUCKET).await?, vec![key]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minio_outage_backs_up_logs_and_they_all_ship_after_it() -> Result<()> {
    let mut minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let source = scratch_dir("outage")?;
    let mut daemon = shipper(&minio, &source, &[])?;
    daemon.start().await?;

    minio.stop();
    let mut tree = BTreeMap::new();
    for i in 0..20 {
        let rel =
            format!("dag_id=d/run_id=manual__2024-07-01T00:00:00+00:00/task_id=t{i}/attempt=1.log");
        let path = source.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap())?;
        let text = format!("task {i} finished during the outage\n").repeat(i + 1);
        std::fs::write(&path, &text)?;
        tree.insert(rel, text.into_bytes());
    }
    // Every log settles while MinIO is down; the daemon must hold them, not drop them.
    wait_for(
        "the daemon to hold the 20 logs",
        Duration::from_secs(30),
        || async {
            let held = daemon.metric("localship_logshipper_backlog_files")?;
            let up = daemon.metric("localship_logshipper_destination_up")?;
            Ok((held == Some(20.0) && up == Some(0.0)).then_some(()))
        },
    )
    .await?;
    daemon.check_running()?;
    minio.resume().await?;
    wait_for("the backlog to drain", Duration::from_secs(120), || async {
        Ok((minio.list_keys(BUCKET).await?.len() == tree.len()).then_some(()))
    })
    .await?;
    assert_shipped(&minio, &tree).await?;
    daemon.stop(Duration::from_secs(10));
    Ok(())
}
