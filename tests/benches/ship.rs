//! Shipping throughput against a real MinIO, beside `mc` in the same run:
//! S1 many small logs (`mc mirror` as the anchor), S2 one large file
//! (`mc cp`). Prints a table of wall time, files/s or MB/s, CPU seconds and
//! peak RSS, with ratios, and the CPU MinIO spent serving each run (on a small
//! machine the server, not the client, sets the pace).
//!
//! `cargo bench -p localship-tests --bench ship` (LOCALSHIP_BENCH_FILES,
//! default 10000; LOCALSHIP_BENCH_BIG_MIB, default 2048).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use localship_tests::bench::{env_or, measure, process_cpu, Run};
use localship_tests::minio::{ACCESS_KEY, SECRET_KEY};
use localship_tests::servers::{localship_bin, server_bin};
use localship_tests::{scratch_dir, Minio};

/// Sizes spread evenly on a log scale from 1 KiB to 1 MiB, as task logs are:
/// most small, some large. Deterministic, so every run ships the same tree.
fn small_logs(root: &Path, n: usize) -> Result<u64> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut total = 0;
    let line = b"[2026-11-25, 09:00:00 UTC] {taskinstance.py:1234} INFO - Extracted rows from the warehouse\n";
    for i in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let exp = 10.0 + (state % 10_000) as f64 / 10_000.0 * 10.0;
        let size = 2f64.powf(exp) as usize;
        let rel = format!("dag_id=bench/run_id=manual__2026-11-25T00:00:00+00:00/task_id=t{}/map_index={}/attempt=1.log", i / 100, i % 100);
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap())?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut written = 0;
        while written < size {
            let take = line.len().min(size - written);
            f.write_all(&line[..take])?;
            written += take;
        }
        total += size as u64;
    }
    Ok(total)
}

fn shipper(minio: &Minio, source: &Path, bucket: &str, ledger: &Path) -> Result<Command> {
    let mut cmd = Command::new(localship_bin("localship-logshipper")?);
    cmd.args([
        format!("--source={}", source.display()),
        format!("--dest=s3://{bucket}/logs"),
        format!("--s3-endpoint={}", minio.endpoint()),
        "--s3-path-style".into(),
        format!("--ledger={}", ledger.display()),
        "--settle=1s".into(),
        "--once".into(),
        // The sole-writer rule: the log's own key from the first upload.
        "--airflow-remote-logging=off".into(),
    ])
    .envs(minio.aws_env())
    .env("RUST_LOG", "warn");
    Ok(cmd)
}

/// Runs `cmd` like [`measure`], also returning the CPU time MinIO spent meanwhile.
fn served(minio: &Minio, cmd: &mut Command) -> Result<(Run, Duration)> {
    let pid = minio.pid().context("MinIO is not running")?;
    let before = process_cpu(pid)?;
    let run = measure(cmd)?;
    Ok((run, process_cpu(pid)? - before))
}

fn mc(minio: &Minio, args: &[String]) -> Result<Command> {
    let mut cmd = Command::new(server_bin("mc")?);
    let host = minio
        .endpoint()
        .replace("http://", &format!("http://{ACCESS_KEY}:{SECRET_KEY}@"));
    cmd.args(["--quiet", "--no-color"])
        .args(args)
        .env("MC_HOST_bench", host);
    Ok(cmd)
}

#[tokio::main]
async fn main() -> Result<()> {
    let files: usize = env_or("LOCALSHIP_BENCH_FILES", 10_000);
    let big_mib: usize = env_or("LOCALSHIP_BENCH_BIG_MIB", 2048);
    let minio = Minio::start().await?;
    for b in ["ours-small", "mc-small", "ours-big", "mc-big"] {
        minio.create_bucket(b).await?;
    }
    let work = scratch_dir("bench-ship")?;
    let small = work.join("small");
    let bytes = small_logs(&small, files)?;
    std::thread::sleep(Duration::from_millis(1500)); // all settled at start
    let ours = served(
        &minio,
        &mut shipper(
            &minio,
            &small,
            "ours-small",
            &work.join("ledger-small.redb"),
        )?,
    )?;
    let anchor = served(
        &minio,
        &mut mc(
            &minio,
            &[
                "mirror".into(),
                small.display().to_string(),
                "bench/mc-small/logs".into(),
            ],
        )?,
    )?;
    ensure!(
        minio.list_keys("ours-small").await?.len() == files,
        "not every small log shipped"
    );

    let big = work.join("big");
    let big_file = big
        .join("dag_id=bench/run_id=manual__2026-11-25T00:00:00+00:00/task_id=dump/attempt=1.log");
    std::fs::create_dir_all(big_file.parent().unwrap())?;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big_file)?);
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..big_mib {
            f.write_all(&chunk)?;
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let ours_big = served(
        &minio,
        &mut shipper(&minio, &big, "ours-big", &work.join("ledger-big.redb"))?,
    )?;
    let anchor_big = served(
        &minio,
        &mut mc(
            &minio,
            &[
                "cp".into(),
                big_file.display().to_string(),
                "bench/mc-big/dump.log".into(),
            ],
        )?,
    )?;

    let rate = |n: f64, r: &(Run, Duration)| n / r.0.wall.as_secs_f64();
    println!(
        "\nS1: {files} logs, {:.0} MiB total, 1 KiB–1 MiB (log-uniform)",
        bytes as f64 / 1048576.0
    );
    println!("| tool                  | wall s | files/s | CPU s  | peak RSS MiB | MinIO CPU s |");
    println!("|-----------------------|--------|---------|--------|--------------|-------------|");
    for (name, r) in [("localship --once", &ours), ("mc mirror (anchor)", &anchor)] {
        println!(
            "| {name:<21} | {:>6.1} | {:>7.0} | {:>6.1} | {:>12.1} | {:>11.1} |",
            r.0.wall.as_secs_f64(),
            rate(files as f64, r),
            r.0.cpu.as_secs_f64(),
            r.0.peak_rss_mib,
            r.1.as_secs_f64()
        );
    }
    println!(
        "ratio: files/s {:.2}x, CPU {:.2}x",
        rate(files as f64, &ours) / rate(files as f64, &anchor),
        ours.0.cpu.as_secs_f64() / anchor.0.cpu.as_secs_f64().max(1e-9)
    );
    println!("\nS2: one {big_mib} MiB file");
    println!("| tool                  | wall s | MB/s    | CPU s  | peak RSS MiB | MinIO CPU s |");
    println!("|-----------------------|--------|---------|--------|--------------|-------------|");
    let mb = big_mib as f64 * 1.048576;
    for (name, r) in [
        ("localship --once", &ours_big),
        ("mc cp (anchor)", &anchor_big),
    ] {
        println!(
            "| {name:<21} | {:>6.1} | {:>7.1} | {:>6.1} | {:>12.1} | {:>11.1} |",
            r.0.wall.as_secs_f64(),
            rate(mb, r),
            r.0.cpu.as_secs_f64(),
            r.0.peak_rss_mib,
            r.1.as_secs_f64()
        );
    }
    println!(
        "ratio: MB/s {:.2}x",
        rate(mb, &ours_big) / rate(mb, &anchor_big)
    );
    Ok(())
}
