//! A shipper daemon at scale, against a real MinIO:
//! - P3: resident memory while it ships 100k logs (peak, sampled, and the kernel's VmHWM);
//! - S3: the daemon restarted over those 100k shipped logs: time to /readyz, S3 requests
//!   it makes (MinIO's own counters), memory idle afterwards.
//!
//! `cargo bench -p localship-tests --bench scale` (LOCALSHIP_BENCH_MANY, default 100000).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use localship_tests::agents::http_get;
use localship_tests::bench::{env_or, mib, proc_kib, process_cpu};
use localship_tests::{scratch_dir, Minio, ShipperAgent};

/// `n` small task logs (200 B–2 KiB) in Airflow's layout: 1000 runs of up to 100 tasks.
fn many_logs(root: &Path, n: usize) -> Result<u64> {
    let line =
        b"[2026-11-25, 09:00:00 UTC] {taskinstance.py:1234} INFO - Marking task as SUCCESS\n";
    let mut total = 0;
    for i in 0..n {
        let dir = root.join(format!(
            "dag_id=scale/run_id=scheduled__{:04}/task_id=t{:02}",
            i / 100,
            i % 100
        ));
        std::fs::create_dir_all(&dir)?;
        let size = 200 + (i * 7919) % 1848;
        let body: Vec<u8> = line.iter().copied().cycle().take(size).collect();
        std::fs::write(dir.join("attempt=1.log"), body)?;
        total += size as u64;
    }
    Ok(total)
}

const SHIPPED: &str = r#"localship_logshipper_files_shipped_total{kind="task"}"#;
const UNCHANGED: &str = r#"localship_logshipper_skipped_total{reason="unchanged"}"#;

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = env_or("LOCALSHIP_BENCH_MANY", 100_000);
    let minio = Minio::start().await?;
    minio.create_bucket("scale").await?;
    let source = scratch_dir("bench-scale")?;
    let made = Instant::now();
    let bytes = many_logs(&source, n)?;
    eprintln!("{n} logs written in {:.1} s", made.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(1500));

    // P3: the daemon ships them all; memory sampled every 100 ms.
    let mut shipper =
        ShipperAgent::standalone(&minio, &source, "s3://scale/logs", &[])?.env("RUST_LOG", "warn");
    let started = Instant::now();
    shipper.start_alive().await?;
    let pid = shipper.pid().unwrap_or_default();
    let mut peak_sampled = 0;
    loop {
        shipper.check_running()?;
        peak_sampled = peak_sampled.max(proc_kib(pid, "VmRSS")?);
        if shipper.metric(SHIPPED)?.unwrap_or(0.0) as usize >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!(
                "not all {n} logs shipped in 30 min:\n{}",
                shipper.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ship_wall = started.elapsed();
    let hwm = proc_kib(pid, "VmHWM")?;
    let cpu = process_cpu(pid)?;
    let keys = minio.list_keys("scale").await?.len();
    anyhow::ensure!(keys == n, "{keys} objects in the bucket, expected {n}");
    shipper.stop(Duration::from_secs(10));

    // S3: restart over the shipped tree; count every S3 request MinIO answers meanwhile.
    let requests_before = minio.s3_requests()?;
    let restarted = Instant::now();
    shipper.spawn()?;
    let port = shipper.port();
    loop {
        if http_get(port, "/readyz").is_ok_and(|(code, _)| code == 200) {
            break;
        }
        if restarted.elapsed() > Duration::from_secs(120) {
            shipper.check_running()?;
            bail!("not ready in 120 s:\n{}", shipper.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready = restarted.elapsed();
    let unchanged_at_ready = shipper.metric(UNCHANGED)?.unwrap_or(0.0) as usize;
    // Past one settle period (1 s) and then some: anything it meant to upload, it would have.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let unchanged = shipper.metric(UNCHANGED)?.unwrap_or(0.0) as usize;
    let requests = minio.s3_requests()? - requests_before;
    let idle_rss = proc_kib(shipper.pid().unwrap_or_default(), "VmRSS")?;
    let restart_cpu = process_cpu(shipper.pid().unwrap_or_default())?;
    anyhow::ensure!(
        unchanged == n,
        "the restarted shipper recognised {unchanged} of {n} logs as shipped"
    );

    println!(
        "\nP3: a shipper daemon shipping {n} logs ({:.0} MiB) to MinIO",
        bytes as f64 / 1048576.0
    );
    println!("| measure                        | value    |");
    println!("|--------------------------------|----------|");
    println!(
        "| wall s (files/s)               | {:>6.1} ({:.0}) |",
        ship_wall.as_secs_f64(),
        n as f64 / ship_wall.as_secs_f64()
    );
    println!(
        "| CPU s                          | {:>8.1} |",
        cpu.as_secs_f64()
    );
    println!("| peak RSS MiB (VmHWM)           | {:>8.1} |", mib(hwm));
    println!(
        "| peak RSS MiB (sampled)         | {:>8.1} |",
        mib(peak_sampled)
    );
    println!("\nS3: the daemon restarted over the {n} shipped logs");
    println!("| measure                        | value    |");
    println!("|--------------------------------|----------|");
    println!(
        "| start -> /readyz s             | {:>8.2} |",
        ready.as_secs_f64()
    );
    println!("| logs known unchanged at ready  | {unchanged_at_ready:>8} |");
    println!("| S3 requests in 5 s after ready | {requests:>8} |");
    println!(
        "| CPU s                          | {:>8.2} |",
        restart_cpu.as_secs_f64()
    );
    println!(
        "| RSS MiB idle                   | {:>8.1} |",
        mib(idle_rss)
    );
    Ok(())
}
