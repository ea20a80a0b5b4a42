//! S4: how long after a task log is finished (its last write) it is visible in Airflow's view
//! of a real MinIO (its own key, or any key that starts with it), against the settle period
//! the shipper must wait by design (the anchor); once with localship the only writer
//! (`--airflow-remote-logging off`) and once beside Airflow's uploads (`on`, the default).
//! Beside Airflow, when Airflow's upload never comes (a killed worker), also how long until
//! the log's own key holds it, against `--final-after` (the anchor there).
//!
//! Logs are written in three bursts each and finished one after another at random
//! intervals while a daemon runs; the bucket is listed every 25 ms, so a measured latency
//! is at most 25 ms late.
//!
//! `cargo bench -p localship-tests --bench latency` (LOCALSHIP_BENCH_LOGS, default 300;
//! LOCALSHIP_BENCH_SETTLE, default 2s; LOCALSHIP_BENCH_FINAL_AFTER, default 10s).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use localship_tests::bench::{env_or, finish_logs, list_every_25ms, pct, FirstListed};
use localship_tests::{scratch_dir, Minio, ShipperAgent};

const SIDE_MARK: &str = ".localship-part-";

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = env_or("LOCALSHIP_BENCH_LOGS", 300);
    let settle_arg: String = env_or("LOCALSHIP_BENCH_SETTLE", "2s".to_string());
    let final_arg: String = env_or("LOCALSHIP_BENCH_FINAL_AFTER", "10s".to_string());
    let settle = humantime::parse_duration(&settle_arg)?;
    let final_after = humantime::parse_duration(&final_arg)?;
    let minio = Minio::start().await?;

    let mut tables = Vec::new();
    for (bucket, mode) in [("alone", "off"), ("beside", "on")] {
        minio.create_bucket(bucket).await?;
        let source = scratch_dir(&format!("bench-latency-{mode}"))?;
        let args = [
            format!("--settle={settle_arg}"),
            format!("--airflow-remote-logging={mode}"),
            format!("--final-after={final_arg}"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dest = format!("s3://{bucket}/logs");
        let mut shipper = ShipperAgent::standalone(&minio, &source, &dest, &args)?;
        shipper.start().await?;
        let seen: FirstListed = Arc::default();
        let lister = tokio::spawn(list_every_25ms(
            minio.client(),
            bucket.into(),
            String::new(),
            seen.clone(),
        ));
        let finished = finish_logs(&source, "latency", "logs", n).await?;

        // Visible: any key that starts with the log's; final: the log's own key.
        let wait_for = if mode == "on" { final_after } else { settle };
        let deadline = Instant::now() + wait_for + Duration::from_secs(60);
        let own_keys = |seen: &HashMap<String, Instant>| {
            finished.keys().filter(|k| seen.contains_key(*k)).count()
        };
        while own_keys(&seen.lock().unwrap()) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lister.abort();
        shipper.check_running()?;
        let seen = seen.lock().unwrap().clone();
        let mut visible: HashMap<&str, Instant> = HashMap::new();
        for (key, at) in &seen {
            let log = key.split(SIDE_MARK).next().unwrap_or(key);
            let first = visible.entry(log).or_insert(*at);
            *first = (*first).min(*at);
        }
        ensure!(
            own_keys(&seen) == n,
            "{} of {n} logs under their own keys a minute after they were due ({mode})",
            own_keys(&seen)
        );
        let latencies = |at: &dyn Fn(&str) -> Instant| -> Vec<Duration> {
            let mut l: Vec<Duration> = finished
                .iter()
                .map(|(key, done)| at(key).saturating_duration_since(*done))
                .collect();
            l.sort();
            l
        };
        let shown = latencies(&|key| visible[key]);
        tables.push((
            format!("--airflow-remote-logging {mode}: last write -> visible in Airflow's view"),
            shown,
            settle,
            "settle",
        ));
        if mode == "on" {
            let own = latencies(&|key| seen[key]);
            tables.push((
                "--airflow-remote-logging on, no upload from Airflow: last write -> the log's own key".to_string(),
                own,
                final_after,
                "final-after",
            ));
        }
    }

    for (title, latencies, anchor, name) in tables {
        println!("\nS4: {n} logs finished one after another, {title}");
        println!("| measure | latency s | {name} s (anchor) | ratio  | over anchor ms |");
        println!(
            "|---------|-----------|{}|--------|----------------|",
            "-".repeat(name.len() + 13)
        );
        for (row, d) in [
            ("p50", pct(&latencies, 50.0)),
            ("p99", pct(&latencies, 99.0)),
            ("max", *latencies.last().unwrap()),
        ] {
            println!(
                "| {row:<7} | {:>9.3} | {:>w$.3} | {:>5.2}x | {:>14.0} |",
                d.as_secs_f64(),
                anchor.as_secs_f64(),
                d.as_secs_f64() / anchor.as_secs_f64(),
                (d.as_secs_f64() - anchor.as_secs_f64()) * 1000.0,
                w = name.len() + 11,
            );
        }
    }
    Ok(())
}
