//! S5: a hostile volume on the node delays no other volume. One daemon ships two sources;
//! in one of them a tenant keeps 100,000 files that never ship: half are touched over and
//! over so they never settle, half have object keys over S3's 1,024 bytes, so every upload
//! of them would fail. Meanwhile logs finish one after another in the other source; the
//! measure is when each is visible in the bucket after its last write. The anchor is the
//! same daemon and logs in the same run, with the hostile source empty.
//!
//! Then the memory it takes to skip: a volume holding 1,000,000 symlinks named like logs,
//! each skipped and counted, against the same daemon's with the volume empty.
//!
//! `cargo bench -p localship-tests --bench hostile` (LOCALSHIP_BENCH_LOGS, default 100;
//! LOCALSHIP_BENCH_HOSTILE_FILES, default 100000; LOCALSHIP_BENCH_SKIPPED, default
//! 1000000; LOCALSHIP_BENCH_SETTLE, default 2s).
//! `LOCALSHIP_PROFILE=<dir under target/>` runs another build of the shipper.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Result};
use localship_logshipper::discover::SKIPPED_REMEMBERED;
use localship_tests::bench::{env_or, finish_logs, list_every_25ms, mib, pct, FirstListed};
use localship_tests::shipper::{folder_over_the_key_limit, metric_value};
use localship_tests::{scratch_dir, Minio, ShipperAgent};

const BUCKET: &str = "hostile";

struct Measured {
    latencies: Vec<Duration>,
    peak_rss: u64,
    refused: u64,
    touches: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = env_or("LOCALSHIP_BENCH_LOGS", 100);
    let hostile_files: usize = env_or("LOCALSHIP_BENCH_HOSTILE_FILES", 100_000);
    let settle_arg: String = env_or("LOCALSHIP_BENCH_SETTLE", "2s".to_string());
    let settle = humantime::parse_duration(&settle_arg)?;
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;

    let skipped: usize = env_or("LOCALSHIP_BENCH_SKIPPED", 1_000_000);
    let alone = run(&minio, "alone", 0, n, &settle_arg).await?;
    let beside = run(&minio, "beside", hostile_files, n, &settle_arg).await?;
    let (links, rss, counted) = skipping(&minio, skipped).await?;

    println!(
        "\nS5: {n} logs finished one after another in one volume, --settle={settle_arg}: last write -> visible"
    );
    println!("| measure | alone s (anchor) | beside {hostile_files} hostile files s | ratio  | over settle ms |");
    println!(
        "|---------|------------------|-------------------------------|--------|----------------|"
    );
    for (row, a, b) in [
        (
            "p50",
            pct(&alone.latencies, 50.0),
            pct(&beside.latencies, 50.0),
        ),
        (
            "p99",
            pct(&alone.latencies, 99.0),
            pct(&beside.latencies, 99.0),
        ),
        (
            "max",
            *alone.latencies.last().unwrap(),
            *beside.latencies.last().unwrap(),
        ),
    ] {
        println!(
            "| {row:<7} | {:>16.3} | {:>29.3} | {:>5.2}x | {:>14.0} |",
            a.as_secs_f64(),
            b.as_secs_f64(),
            b.as_secs_f64() / a.as_secs_f64(),
            (b.as_secs_f64() - settle.as_secs_f64()) * 1000.0,
        );
    }
    println!(
        "\npeak RSS: {:.1} MiB alone, {:.1} MiB beside the hostile volume ({:.2}x); \
         {} hostile files refused for good, {} touches of never-settling files",
        mib(alone.peak_rss / 1024),
        mib(beside.peak_rss / 1024),
        beside.peak_rss as f64 / alone.peak_rss as f64,
        beside.refused,
        beside.touches,
    );
    println!(
        "\nS5: {links} symlinks in one volume, each skipped: peak RSS {:.1} MiB vs {:.1} MiB with \
         the volume empty ({:.2}x; the DaemonSet's limit is 256 MiB); skipped_total{{reason=\"symlink\"}} {counted}",
        mib(rss / 1024),
        mib(alone.peak_rss / 1024),
        rss as f64 / alone.peak_rss as f64,
    );
    Ok(())
}

/// A daemon over a volume of `links` symlinks named like logs, until each was skipped once;
/// its peak RSS meanwhile and the count it reports.
async fn skipping(minio: &Minio, links: usize) -> Result<(usize, u64, u64)> {
    let source = scratch_dir("bench-hostile-symlinks")?;
    for dir in 0..links.div_ceil(1000) {
        let dir = source.join(format!("dag_id=links/run_id=r/task_id=t{dir}"));
        std::fs::create_dir_all(&dir)?;
        for i in 0..1000 {
            std::os::unix::fs::symlink("/etc/hostname", dir.join(format!("attempt={i}.log")))?;
        }
    }
    let links = links.div_ceil(1000) * 1000;
    let dest = format!("s3://{BUCKET}/links");
    let mut shipper = ShipperAgent::standalone(minio, &source, &dest, &["--rescan=15s"])?;
    shipper.start().await?;
    let series = r#"localship_logshipper_skipped_total{reason="symlink"}"#;
    let mut peak = 0;
    // The first walk and one rescan after it: paths past the remembered cap come again, so
    // the count passes the links; below the cap, each is counted once.
    let past_cap = links > SKIPPED_REMEMBERED;
    let enough = |counted: u64| match past_cap {
        true => counted > links as u64,
        false => counted == links as u64,
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut counted = 0;
    while Instant::now() < deadline {
        peak = peak.max(shipper.rss_bytes()?);
        counted = shipper.metric(series)?.unwrap_or(0.0) as u64;
        if enough(counted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !past_cap {
        // A rescan (every 15 s) must not count them again.
        tokio::time::sleep(Duration::from_secs(20)).await;
        peak = peak.max(shipper.rss_bytes()?);
        counted = shipper.metric(series)?.unwrap_or(0.0) as u64;
    }
    shipper.check_running()?;
    ensure!(
        enough(counted),
        "{counted} symlinks counted for {links} in five minutes (a rescan recounts only those past the cap of {SKIPPED_REMEMBERED})"
    );
    Ok((links, peak, counted))
}

async fn run(
    minio: &Minio,
    name: &str,
    hostile_files: usize,
    n: usize,
    settle: &str,
) -> Result<Measured> {
    let quiet = scratch_dir(&format!("bench-hostile-{name}-quiet"))?;
    let hostile = scratch_dir(&format!("bench-hostile-{name}-hostile"))?;
    let too_long = hostile_files / 2;
    write_too_long(&hostile, too_long)?;
    let args = [
        format!("--source={}", hostile.display()),
        format!("--settle={settle}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dest = format!("s3://{BUCKET}/{name}");
    let mut shipper = ShipperAgent::standalone(minio, &quiet, &dest, &args)?;
    shipper.start().await?;
    // The failing files first, each tried and refused; then the restless ones, which take
    // the hostile volume's whole share of followed files and keep it.
    let refused_series = r#"localship_logshipper_skipped_total{reason="key_too_long"}"#;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && (shipper.metric(refused_series)?.unwrap_or(0.0) as usize) < too_long
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restless = write_restless(&hostile, hostile_files - too_long)?;
    let stop = Arc::new(AtomicBool::new(false));
    let touches = Arc::new(AtomicU64::new(0));
    let toucher = {
        let (stop, touches) = (stop.clone(), touches.clone());
        std::thread::spawn(move || keep_touching(&restless, &stop, &touches))
    };
    // The restless files found and followed, touched all along.
    tokio::time::sleep(Duration::from_secs(10)).await;

    let seen: FirstListed = Arc::default();
    let lister = tokio::spawn(list_every_25ms(
        minio.client(),
        BUCKET.into(),
        format!("{name}/dag_id=quiet/"),
        seen.clone(),
    ));
    let mut peak_rss = shipper.rss_bytes()?;
    let finished = finish_logs(&quiet, "quiet", name, n).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.lock().unwrap().len() < n && Instant::now() < deadline {
        peak_rss = peak_rss.max(shipper.rss_bytes()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lister.abort();
    stop.store(true, Ordering::SeqCst);
    let _ = toucher.join();
    shipper.check_running()?;
    let seen = seen.lock().unwrap().clone();
    if seen.len() < n {
        eprintln!(
            "{name}: {} of {n} logs not visible two minutes after they finished; counted as 120 s",
            n - seen.len()
        );
    }
    let metrics = shipper.metrics()?;
    let metric = |series: &str| metric_value(&metrics, series).unwrap_or(0.0) as u64;
    let refused = metric(r#"localship_logshipper_skipped_total{reason="key_too_long"}"#);
    let followed = metric("localship_logshipper_backlog_files");
    if hostile_files > 0 {
        eprintln!("{name}: {refused} of {too_long} too-long files refused; {followed} files followed at the end");
    }
    let mut latencies: Vec<Duration> = finished
        .iter()
        .map(|(key, done)| {
            seen.get(key).map_or(Duration::from_secs(120), |at| {
                at.saturating_duration_since(*done)
            })
        })
        .collect();
    latencies.sort();
    Ok(Measured {
        latencies,
        peak_rss,
        refused,
        touches: touches.load(Ordering::SeqCst),
    })
}

/// `files` logs whose keys are too long for S3.
fn write_too_long(root: &Path, files: usize) -> Result<()> {
    let dir = root.join(folder_over_the_key_limit());
    std::fs::create_dir_all(&dir)?;
    for i in 0..files {
        std::fs::write(dir.join(format!("attempt={i}.log")), b"x\n")?;
    }
    Ok(())
}

/// `files` logs to be touched for ever; their paths.
fn write_restless(root: &Path, files: usize) -> Result<Vec<PathBuf>> {
    let dir = root.join("dag_id=restless/run_id=r/task_id=t");
    std::fs::create_dir_all(&dir)?;
    let mut paths = Vec::new();
    for i in 0..files {
        let path = dir.join(format!("attempt={i}.log"));
        std::fs::write(&path, b"x\n")?;
        paths.push(path);
    }
    Ok(paths)
}

/// Sets each file's mtime to now, round and round, until told to stop.
fn keep_touching(paths: &[PathBuf], stop: &AtomicBool, touches: &AtomicU64) {
    while !stop.load(Ordering::SeqCst) && !paths.is_empty() {
        for path in paths {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if let Ok(file) = std::fs::File::options().write(true).open(path) {
                let _ = file.set_modified(SystemTime::now());
                touches.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
