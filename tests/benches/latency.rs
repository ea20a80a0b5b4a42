//! S4: how long after a task log is finished (its last write) its object is visible in a
//! real MinIO, against the settle period the shipper must wait by design (the anchor).
//!
//! Logs are written in three bursts each and finished one after another at random
//! intervals while a daemon runs; the bucket is listed every 25 ms, so a measured latency
//! is at most 25 ms late.
//!
//! `cargo bench -p localship-tests --bench latency` (LOCALSHIP_BENCH_LOGS, default 300;
//! LOCALSHIP_BENCH_SETTLE, default 2s).

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use localship_tests::bench::{env_or, pct};
use localship_tests::{scratch_dir, Minio, ShipperAgent};

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = env_or("LOCALSHIP_BENCH_LOGS", 300);
    let settle_arg: String = env_or("LOCALSHIP_BENCH_SETTLE", "2s".to_string());
    let settle = humantime::parse_duration(&settle_arg)?;
    let minio = Minio::start().await?;
    minio.create_bucket("latency").await?;
    let source = scratch_dir("bench-latency")?;
    let mut shipper = ShipperAgent::standalone(
        &minio,
        &source,
        "s3://latency/logs",
        &[&format!("--settle={settle_arg}")],
    )?;
    shipper.start().await?;

    // Lists the bucket every 25 ms and notes when each key first appears.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let lister = {
        let (seen, client) = (seen.clone(), minio.client());
        tokio::spawn(async move {
            loop {
                let mut pages = client
                    .list_objects_v2()
                    .bucket("latency")
                    .into_paginator()
                    .send();
                let now = Instant::now();
                while let Some(Ok(page)) = pages.next().await {
                    let mut seen = seen.lock().unwrap();
                    for key in page.contents().iter().filter_map(|o| o.key()) {
                        seen.entry(key.to_string()).or_insert(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    let mut finished: HashMap<String, Instant> = HashMap::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..n {
        let rel = format!(
            "dag_id=latency/run_id=manual__2026-11-25T00:00:00+00:00/task_id=t{i}/attempt=1.log"
        );
        let path = source.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap())?;
        let mut f = std::fs::File::create(&path)?;
        for burst in 0..3 {
            writeln!(f, "[2026-11-25, 09:00:0{burst} UTC] {{taskinstance.py:1234}} INFO - step {burst} of task {i}")?;
            tokio::time::sleep(Duration::from_millis(next() % 40)).await;
        }
        drop(f);
        finished.insert(format!("logs/{rel}"), Instant::now());
        tokio::time::sleep(Duration::from_millis(next() % 30)).await;
    }
    let deadline = Instant::now() + settle + Duration::from_secs(60);
    while seen.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lister.abort();
    shipper.check_running()?;
    let seen = seen.lock().unwrap().clone();
    ensure!(
        seen.len() == n,
        "{} of {n} objects visible a minute after the last log finished",
        seen.len()
    );
    let mut latencies: Vec<Duration> = finished
        .iter()
        .map(|(key, done)| seen[key].saturating_duration_since(*done))
        .collect();
    latencies.sort();

    println!("\nS4: {n} logs finished one after another, last write -> object listed in MinIO");
    println!("| measure | latency s | settle s (anchor) | ratio  | over settle ms |");
    println!("|---------|-----------|-------------------|--------|----------------|");
    for (name, d) in [
        ("p50", pct(&latencies, 50.0)),
        ("p99", pct(&latencies, 99.0)),
        ("max", *latencies.last().unwrap()),
    ] {
        println!(
            "| {name:<7} | {:>9.3} | {:>17.3} | {:>5.2}x | {:>14.0} |",
            d.as_secs_f64(),
            settle.as_secs_f64(),
            d.as_secs_f64() / settle.as_secs_f64(),
            (d.as_secs_f64() - settle.as_secs_f64()) * 1000.0
        );
    }
    Ok(())
}
