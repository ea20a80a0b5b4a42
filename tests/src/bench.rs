//! What the benchmarks (and the fault suite) share: knobs from the environment, percentiles,
//! memory from /proc, and wall/CPU/peak-memory accounting of a command run to completion.

use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::resource::{getrusage, UsageWho};

/// `name` from the environment, or `default` when unset or unparsable.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p`th percentile (nearest rank) of `sorted`, which must not be empty.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// A field in KiB of /proc/<pid>/status: `VmRSS` (resident now) or `VmHWM` (peak).
pub fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// KiB as MiB, for tables.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One command run to completion.
pub struct Run {
    pub wall: Duration,
    /// User + system seconds, from the kernel's accounting of reaped children.
    pub cpu: Duration,
    /// Peak resident memory (VmHWM, sampled every 50 ms).
    pub peak_rss_mib: f64,
}

/// Runs `cmd` to completion (it must succeed), measuring wall time, CPU time and peak RSS.
pub fn measure(cmd: &mut Command) -> Result<Run> {
    let cpu_before = children_cpu()?;
    let start = Instant::now();
    let mut child = cmd.stdout(std::process::Stdio::null()).spawn()?;
    let mut peak = 0u64;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Ok(kib) = proc_kib(child.id(), "VmHWM") {
            peak = peak.max(kib);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall = start.elapsed();
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(Run {
        wall,
        cpu: children_cpu()? - cpu_before,
        peak_rss_mib: mib(peak),
    })
}

/// CPU time of this process's reaped children so far.
fn children_cpu() -> Result<Duration> {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let d =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Ok(d(u.user_time()) + d(u.system_time()))
}

/// CPU time of a running process, from /proc/<pid>/stat (user + system ticks).
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // USER_HZ, in which /proc reports times, is 100 on every Linux architecture.
    Ok(Duration::from_millis(ticks * 10))
}

/// When each key was first listed.
pub type FirstListed =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>;

/// Notes when each key under `prefix` in `bucket` is first listed, listing every 25 ms: a
/// latency read from it is at most 25 ms late.
pub async fn list_every_25ms(
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    seen: FirstListed,
) {
    loop {
        let mut pages = client
            .list_objects_v2()
            .bucket(&bucket)
            .prefix(&prefix)
            .into_paginator()
            .send();
        let now = std::time::Instant::now();
        while let Some(Ok(page)) = pages.next().await {
            let mut seen = seen.lock().expect("not poisoned");
            for key in page.contents().iter().filter_map(|o| o.key()) {
                seen.entry(key.to_string()).or_insert(now);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Writes `n` task logs under `dag_id=<dag>` in `source`, one after another, each in three
/// bursts at pseudo-random intervals (the same every run); when each was finished (its last
/// write), by its object key under `key_prefix`.
pub async fn finish_logs(
    source: &std::path::Path,
    dag: &str,
    key_prefix: &str,
    n: usize,
) -> Result<std::collections::HashMap<String, Instant>> {
    use std::io::Write;
    let mut finished = std::collections::HashMap::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..n {
        let rel = format!(
            "dag_id={dag}/run_id=manual__2026-11-25T00:00:00+00:00/task_id=t{i}/attempt=1.log"
        );
        let path = source.join(&rel);
        std::fs::create_dir_all(path.parent().context("a parent")?)?;
        let mut f = std::fs::File::create(&path)?;
        for burst in 0..3 {
            writeln!(f, "[2026-11-25, 09:00:0{burst} UTC] {{taskinstance.py:1234}} INFO - step {burst} of task {i}")?;
            tokio::time::sleep(Duration::from_millis(next() % 40)).await;
        }
        drop(f);
        finished.insert(format!("{key_prefix}/{rel}"), Instant::now());
        tokio::time::sleep(Duration::from_millis(next() % 30)).await;
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(pct(&d, 50.0), Duration::from_millis(51));
        assert_eq!(pct(&d, 99.0), Duration::from_millis(99));
        assert_eq!(pct(&d, 100.0), Duration::from_millis(100));
        assert_eq!(pct(&d[..1], 99.0), Duration::from_millis(1));
    }

    #[test]
    fn reads_own_memory() {
        let rss = proc_kib(std::process::id(), "VmRSS").unwrap();
        let peak = proc_kib(std::process::id(), "VmHWM").unwrap();
        assert!(rss > 0 && peak >= rss, "rss {rss} peak {peak}");
        assert!(proc_kib(std::process::id(), "NoSuchField").is_err());
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(100) {}
        assert!(process_cpu(std::process::id()).unwrap() >= Duration::from_millis(50));
    }
}
