//! The ledger on a disk that fills up, and a ledger that cannot be read at start. A full disk
//! is real: a small tmpfs under the ledger, filled with a ballast file. Shipping must go on
//! while records cannot be written, /healthz must say so, and once space is back everything
//! shipped meanwhile must be recorded. An unreadable ledger is set aside and the daemon keeps
//! shipping without uploading again what the bucket already holds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use localship_tests::{scratch_dir, wait_for, Minio, ShipperAgent};

use super::hostile::Rows;
use super::{write_log, Logs, BUCKET};
use crate::report::Tally;

const RUN: &str = "dag_id=full_disk/run_id=manual__2024-06-01T10:00:00+00:00";

pub async fn run() -> Result<Tally> {
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let mut rows = Rows::new();
    full_disk(&minio, &mut rows).await?;
    unreadable(&minio, &mut rows).await?;
    Ok(rows.tally())
}

/// A tmpfs mounted for the test, unmounted when dropped, whatever happened.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self> {
        use nix::mount::{mount, MsFlags};
        let options = format!("size={size}");
        mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .with_context(|| format!("mount a {size} tmpfs on {}", dir.display()))?;
        Ok(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Detached: a process that has not let go yet does not leave the mount behind.
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Writes zeros to `path` until the filesystem is full; the bytes written.
fn fill(path: &Path) -> Result<u64> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(written)
}

/// Logs `first..first + count`, with long names so their records take room.
fn more_logs(source: &Path, logs: &mut Logs, first: usize, count: usize) -> Result<()> {
    for i in first..first + count {
        let relative = format!(
            "{RUN}/task_id=task_with_a_long_name_{i:05}_{}/attempt=1.log",
            "x".repeat(120)
        );
        let bytes = format!("log {i}\n").into_bytes();
        write_log(source, &relative, &bytes)?;
        logs.insert(relative, bytes);
    }
    Ok(())
}

/// Whether every log is in the bucket under `prefix` with its bytes.
async fn all_shipped(minio: &Minio, prefix: &str, logs: &Logs) -> Result<Option<()>> {
    for (relative, bytes) in logs {
        let got = minio
            .get_object(BUCKET, &format!("{prefix}/{relative}"))
            .await?;
        if got.as_ref() != Some(bytes) {
            return Ok(None);
        }
    }
    Ok(Some(()))
}

/// The sum of every series of `name`, e.g. over its labels.
fn metric_sum(shipper: &ShipperAgent, name: &str) -> Result<f64> {
    Ok(shipper
        .metrics()?
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

async fn full_disk(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let prefix = "full-disk";
    let disk = scratch_dir("ledger-disk")?;
    let _tmpfs = Tmpfs::mount(&disk, "4m")?;
    let source = scratch_dir("full-disk-logs")?;
    let mut logs = Logs::new();
    more_logs(&source, &mut logs, 0, 20)?;
    let mut shipper = ShipperAgent::standalone(
        minio,
        &source,
        &format!("s3://{BUCKET}/{prefix}"),
        &["--settle=0s", "--rescan=1s"],
    )?
    .ledger(&disk.join("ledger.redb"));
    shipper.start().await?;
    wait_for("the first logs to ship", Duration::from_secs(60), || {
        all_shipped(minio, prefix, &logs)
    })
    .await?;

    let ballast = disk.join("ballast");
    let filled = fill(&ballast)?;
    // New records need new pages; keep shipping logs until a commit finds no room.
    let mut written = logs.len();
    let refused = Instant::now();
    let health = loop {
        let (code, body) = shipper.get("/healthz")?;
        if code != 200 || refused.elapsed() > Duration::from_secs(120) {
            break (code, body);
        }
        more_logs(&source, &mut logs, written, 20)?;
        written += 20;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "    ballast {filled} bytes; /healthz {} after {written} logs: {}",
        health.0,
        health.1.trim()
    );
    rows.row(
        "ledger on a full disk: /healthz",
        health.0 == 503
            && health
                .1
                .contains("ledger: cannot write records: No space left"),
        &format!("{} `{}`", health.0, health.1.trim()),
    );
    let writable = shipper.metric("localship_logshipper_ledger_writable")?;
    let failures = shipper.metric("localship_logshipper_ledger_commit_failures_total")?;
    rows.row(
        "ledger on a full disk: metrics",
        writable == Some(0.0) && failures.is_some_and(|f| f >= 1.0),
        &format!("ledger_writable {writable:?}, ledger_commit_failures_total {failures:?}"),
    );
    // Logs finishing now still ship, while commits keep failing and are tried again.
    let full_since = Instant::now();
    let mut retried = 0.0;
    while retried < 3.0 && full_since.elapsed() < Duration::from_secs(60) {
        more_logs(&source, &mut logs, written, 5)?;
        written += 5;
        tokio::time::sleep(Duration::from_secs(1)).await;
        retried = shipper
            .metric("localship_logshipper_ledger_commit_failures_total")?
            .unwrap_or(0.0);
    }
    eprintln!("    {retried} failed commits while {written} logs were written");
    let shipped = wait_for(
        "logs to ship while the ledger is full",
        Duration::from_secs(60),
        || all_shipped(minio, prefix, &logs),
    )
    .await;
    let still_full = shipper.get("/healthz")?.0 == 503;
    rows.row(
        "ledger on a full disk: logs still ship",
        shipped.is_ok() && still_full,
        &format!(
            "{} logs in the bucket while /healthz is 503: {shipped:?}",
            logs.len()
        ),
    );

    std::fs::remove_file(&ballast)?;
    let freed = Instant::now();
    let recovered = wait_for("/healthz ok again", Duration::from_secs(60), || async {
        Ok((shipper.get("/healthz")?.0 == 200).then_some(()))
    })
    .await;
    let took = freed.elapsed();
    let writable = shipper.metric("localship_logshipper_ledger_writable")?;
    rows.row(
        "ledger on a full disk: recovers once space is back",
        recovered.is_ok() && writable == Some(1.0),
        &format!(
            "/healthz 200 {:.1}s after the ballast went; ledger_writable {writable:?}",
            took.as_secs_f64()
        ),
    );
    let log = shipper.log();
    let failed_lines = log
        .matches("cannot record shipped files in the ledger")
        .count();
    let recovered_lines = log.matches("the ledger is writable again").count();
    rows.row(
        "ledger on a full disk: said once each way",
        failed_lines == 1 && recovered_lines == 1,
        &format!(
            "{failed_lines} failure line(s), {recovered_lines} recovery line(s), not one per retry"
        ),
    );

    // Every log shipped meanwhile is recorded: a --once run on the ledger asks nothing.
    shipper.stop(Duration::from_secs(10));
    let mut once = shipper.spawn_once(&[])?;
    let status = once.wait(Duration::from_secs(120))?;
    let summary = once
        .log_tail(20)
        .lines()
        .rev()
        .find(|l| l.starts_with("shipped "))
        .unwrap_or_default()
        .to_string();
    let expected = format!(
        "shipped 0 files (0 bytes), skipped {} unchanged, 0 already",
        logs.len()
    );
    rows.row(
        "ledger on a full disk: every record written after",
        status.success() && summary.starts_with(&expected),
        &format!("--once after: `{summary}`"),
    );
    Ok(())
}

/// Garbage where the ledger was: set aside, a new ledger, nothing uploaded twice.
async fn unreadable(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let prefix = "unreadable-ledger";
    let source = scratch_dir("unreadable-ledger-logs")?;
    let mut logs = Logs::new();
    for i in 0..3 {
        let relative = format!("{RUN}/task_id=t{i}/attempt=1.log");
        let bytes = format!("log {i} of an unreadable ledger\n").into_bytes();
        write_log(&source, &relative, &bytes)?;
        logs.insert(relative, bytes);
    }
    let mut shipper = ShipperAgent::standalone(
        minio,
        &source,
        &format!("s3://{BUCKET}/{prefix}"),
        &["--settle=0s"],
    )?;
    shipper.once(&[])?;
    let ledger = shipper.dir().join("ledger.redb");
    std::fs::write(&ledger, b"\x00garbage, not a ledger\n".repeat(500))?;

    shipper.start().await?;
    let found = wait_for(
        "the logs to be found at the destination",
        Duration::from_secs(30),
        || async {
            let n = metric_sum(&shipper, "localship_logshipper_files_shipped_total")?;
            Ok((n >= logs.len() as f64).then_some(n))
        },
    )
    .await;
    shipper.check_running()?;
    let uploaded = shipper.metric("localship_logshipper_bytes_shipped_total")?;
    let aside: Vec<String> = std::fs::read_dir(shipper.dir())?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("ledger.redb.corrupt-"))
        .collect();
    let said = shipper.log().contains("the ledger cannot be read");
    rows.row(
        "unreadable ledger at start",
        found.is_ok() && uploaded == Some(0.0) && aside.len() == 1 && said,
        &format!(
            "running, set aside as {aside:?}, {} files found at the destination, bytes uploaded {uploaded:?}",
            found.unwrap_or(0.0)
        ),
    );
    // A ledger another shipper holds stays an error, and stays where it is.
    let mut second = shipper.spawn_once(&[])?;
    let status = second.wait(Duration::from_secs(60))?;
    let in_use = second.log_tail(5).contains("is in use by another");
    let aside_after = std::fs::read_dir(shipper.dir())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .count();
    rows.row(
        "a ledger in use by another shipper",
        status.code() == Some(2) && in_use && aside_after == 1 && ledger.exists(),
        &format!("second shipper: exit {status}, says in use: {in_use}; not set aside"),
    );
    shipper.stop(Duration::from_secs(10));
    Ok(())
}
