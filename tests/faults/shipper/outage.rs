//! MinIO goes away while tasks keep finishing: the shipper must hold every log in its backlog
//! with bounded memory, say it is not ready, and ship everything once MinIO is back.

use std::time::{Duration, Instant};

use anyhow::Result;
use localship_tests::{scratch_dir, wait_for, Minio, ShipperAgent};

use super::{compare_bucket, dest, write_log, Logs, BUCKET};
use crate::report::Tally;

/// The default outage is a CI-sized minute; `LOCALSHIP_FAULT_OUTAGE_SECS` lengthens it.
const DEFAULT_OUTAGE_SECS: u64 = 60;
const FILES_DURING_OUTAGE: usize = 2000;
/// The shipper's resident memory must stay below this while the backlog grows.
const RSS_LIMIT: u64 = 60 << 20;
/// After MinIO returns, the destination check may be sleeping its backoff (at most 60s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);
const RUN: &str = "run_id=scheduled__2024-04-01T00:00:00+00:00";

pub async fn run() -> Result<Tally> {
    let outage = Duration::from_secs(
        std::env::var("LOCALSHIP_FAULT_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_OUTAGE_SECS),
    );
    let mut minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let source = scratch_dir("outage-logs")?;
    let mut logs = Logs::new();
    for i in 0..20 {
        let relative = format!("dag_id=before/{RUN}/task_id=t{i}/attempt=1.log");
        let bytes = format!("task {i} finished before the outage\n")
            .repeat(20)
            .into_bytes();
        write_log(&source, &relative, &bytes)?;
        logs.insert(relative, bytes);
    }
    let mut shipper = ShipperAgent::standalone(
        &minio,
        &source,
        &dest(),
        &["--settle=500ms", "--rescan=10s"],
    )?;
    shipper.start().await?;
    wait_for(
        "the first logs to ship",
        Duration::from_secs(60),
        || async { Ok((minio.list_keys(BUCKET).await?.len() == logs.len()).then_some(())) },
    )
    .await?;
    let baseline = shipper.rss_bytes()?;
    let mut tally = Tally {
        rounds: 1,
        faults: 1,
        ..Tally::default()
    };

    eprintln!(
        "  MinIO down for {}s; {FILES_DURING_OUTAGE} logs finish meanwhile",
        outage.as_secs()
    );
    minio.stop();
    let (mut peak, mut backlog_peak, mut written) = (baseline, 0f64, 0usize);
    let (mut unready_seen, mut down_seen, mut unhealthy) = (false, false, 0u32);
    let started = Instant::now();
    let mut next_sample = started;
    while started.elapsed() < outage || written < FILES_DURING_OUTAGE {
        // Writes spread over the first 90% of the outage.
        let due = ((started.elapsed().as_secs_f64() / (outage.as_secs_f64() * 0.9))
            * FILES_DURING_OUTAGE as f64) as usize;
        while written < due.min(FILES_DURING_OUTAGE) {
            let relative = format!(
                "dag_id=during/{RUN}/task_id=t{}/map_index={written}/attempt=1.log",
                written % 50
            );
            let bytes = format!("mapped task {written} finished while MinIO was down\n")
                .repeat(1 + written % 40)
                .into_bytes();
            write_log(&source, &relative, &bytes)?;
            logs.insert(relative, bytes);
            written += 1;
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_millis(500);
            shipper.check_running()?;
            peak = peak.max(shipper.rss_bytes()?);
            let metrics = shipper.metrics()?;
            let backlog = localship_tests::shipper::metric_value(
                &metrics,
                "localship_logshipper_backlog_files",
            );
            backlog_peak = backlog_peak.max(backlog.unwrap_or(0.0));
            down_seen |= localship_tests::shipper::metric_value(
                &metrics,
                "localship_logshipper_destination_up",
            ) == Some(0.0);
            unready_seen |= shipper.get("/readyz")?.0 == 503;
            if shipper.get("/healthz")?.0 != 200 {
                unhealthy += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "  during the outage: RSS {:.1} MiB at start, peak {:.1} MiB; backlog peak {backlog_peak} files; readyz 503 seen: {unready_seen}; destination_up 0 seen: {down_seen}",
        baseline as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    let mut violation = |what: String| {
        tally.lost += 1;
        eprintln!("  LOST: {what}");
    };
    if peak > RSS_LIMIT {
        violation(format!("RSS peaked at {peak} bytes, above {RSS_LIMIT}"));
    }
    if backlog_peak < FILES_DURING_OUTAGE as f64 * 0.9 {
        violation(format!(
            "backlog_files peaked at {backlog_peak}, not near {FILES_DURING_OUTAGE}"
        ));
    }
    if !unready_seen || !down_seen {
        violation("the shipper never reported MinIO down on /readyz and destination_up".into());
    }
    if unhealthy > 0 {
        violation(format!(
            "/healthz failed {unhealthy} times; a waiting daemon is healthy"
        ));
    }

    minio.resume().await?;
    let resumed = Instant::now();
    let drained = wait_for("the backlog to ship", DRAIN_TIMEOUT, || async {
        Ok((minio.list_keys(BUCKET).await?.len() >= logs.len()).then_some(()))
    })
    .await;
    eprintln!(
        "  after MinIO returned: {} in {:.1}s",
        if drained.is_ok() {
            "backlog shipped"
        } else {
            "backlog NOT shipped"
        },
        resumed.elapsed().as_secs_f64()
    );
    shipper.check_running()?;
    let (same, lost) = compare_bucket(&minio, &logs).await?;
    tally.checked = same;
    tally.lost += lost;
    shipper.stop(Duration::from_secs(10));
    Ok(tally)
}
