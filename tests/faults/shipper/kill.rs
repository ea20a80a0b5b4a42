//! kill -9 at random moments while logs finish, ship and are removed by retention; every
//! round brings a log large enough for a multipart upload, so kills land mid-multipart. Then
//! every object must equal its file's last bytes, no file may be gone unshipped, and no key
//! may appear that no file explains.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use localship_tests::{scratch_dir, Minio, ShipperAgent};

use super::{compare_hashes, dest, hashes, key, sha256, write_log, Logs, BUCKET};
use crate::jitter::Jitter;
use crate::report::Tally;

const ROUNDS: u64 = 20;
const RUN: &str = "run_id=scheduled__2024-03-01T00:00:00+00:00";
/// Large logs are above the shipper's default 16 MiB multipart threshold.
const LARGE_MIB: (u64, u64) = (17, 33);
const FINISH_TIMEOUT: Duration = Duration::from_secs(180);

pub async fn run() -> Result<Tally> {
    let mut rng = Jitter::new("shipper kill -9");
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let source = scratch_dir("kill9-logs")?;
    // Small logs in full, so appends can extend them; large ones by SHA-256 only.
    let mut small = Logs::new();
    let mut large = BTreeMap::new();
    for i in 0..40 {
        let relative = format!("dag_id=etl/{RUN}/task_id=t{i}/attempt=1.log");
        new_small(&source, &mut small, &mut rng, &relative)?;
    }
    let mut shipper = ShipperAgent::standalone(
        &minio,
        &source,
        &dest(),
        &["--settle=300ms", "--delete-after=1s", "--rescan=1s"],
    )?;
    let client = minio.client();
    let mut tally = Tally::default();
    let mut verified_gone = BTreeSet::new();
    let mut mid_multipart = 0;
    for round in 1..=ROUNDS {
        let mib = rng.range(LARGE_MIB.0, LARGE_MIB.1) as usize;
        let relative = format!("dag_id=dump/{RUN}/task_id=big{round}/attempt=1.log");
        let bytes = lines(&relative, mib << 20);
        write_log(&source, &relative, &bytes)?;
        large.insert(relative, sha256(&bytes));
        drop(bytes);

        shipper.spawn()?;
        let spawned = Instant::now();
        // Odd rounds kill at a random moment; even rounds as soon as this round's large log
        // is being uploaded in parts, plus up to 200ms.
        let run = Duration::from_millis(rng.range(200, 3000));
        let aimed = round % 2 == 0;
        let jitter = Duration::from_millis(rng.range(0, 200));
        let write_at = if aimed { Duration::ZERO } else { run / 2 };
        let mut wrote = false;
        let mut in_flight;
        let spawned_ms = now_ms();
        loop {
            if !wrote && spawned.elapsed() >= write_at {
                // Tasks keep finishing while the shipper runs.
                for task in 0..2 {
                    let relative =
                        format!("dag_id=live/{RUN}/task_id=r{round}_{task}/attempt=1.log");
                    new_small(&source, &mut small, &mut rng, &relative)?;
                }
                wrote = true;
            }
            in_flight = false;
            for relative in large.keys().filter(|r| source.join(r).exists()) {
                // Only this run's: a killed run's upload stays listed.
                in_flight |= open_uploads(&client, relative).await?.iter().any(|u| {
                    u.initiated()
                        .and_then(|t| t.to_millis().ok())
                        .is_some_and(|t| t >= spawned_ms)
                });
            }
            if (aimed && in_flight && wrote) || spawned.elapsed() >= run {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if aimed && in_flight {
            tokio::time::sleep(jitter).await;
        }
        let ran = spawned.elapsed();
        shipper.kill();
        tally.rounds += 1;
        tally.faults += 1;
        mid_multipart += u64::from(in_flight);

        // Whatever retention removed so far must be in the bucket as its last bytes.
        let all = hashes(&small).into_iter().chain(large.clone());
        for (relative, want) in all {
            if source.join(&relative).exists() || verified_gone.contains(&relative) {
                continue;
            }
            let got = minio.get_object(BUCKET, &key(&relative)).await?;
            if got.as_deref().map(sha256) != Some(want) {
                tally.lost += 1;
                eprintln!("  LOST: {relative} was removed locally but not shipped as written");
            }
            verified_gone.insert(relative);
        }
        // With the shipper down, tasks still running append (a retry, a resumed deferral).
        // Appending only while it is down keeps retention's 1s age honest: a real
        // --delete-after is days, not a second.
        for _ in 0..2 {
            let pick = rng.range(0, small.len() as u64) as usize;
            let (relative, bytes) = small.iter_mut().nth(pick).expect("in range");
            let path = source.join(relative.as_str());
            if path.exists() {
                let more = format!("round {round}: resumed\n").into_bytes();
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)?
                    .write_all(&more)?;
                bytes.extend_from_slice(&more);
            }
        }
        eprintln!(
            "  round {round}: ran {:.1}s, killed {} a multipart upload; {} of {} logs shipped and removed",
            ran.as_secs_f64(),
            if in_flight { "during" } else { "outside" },
            verified_gone.len(),
            small.len() + large.len()
        );
    }

    // Left alone, it finishes: every log shipped, then removed by retention.
    let finishing = Instant::now();
    shipper.start().await?;
    let everything: BTreeMap<String, String> = hashes(&small).into_iter().chain(large).collect();
    loop {
        let left = everything
            .keys()
            .filter(|r| source.join(r).exists())
            .count();
        if left == 0 {
            break;
        }
        if finishing.elapsed() > FINISH_TIMEOUT {
            eprintln!(
                "  {left} logs still on disk after {FINISH_TIMEOUT:?}:\n{}",
                shipper.log_tail(20)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "  {mid_multipart} of {ROUNDS} kills landed mid-multipart; all shipped and removed {:.1}s after the last restart",
        finishing.elapsed().as_secs_f64()
    );
    shipper.check_running()?;
    // Half the rounds aim at a multipart upload; the scenario proves nothing if few land.
    anyhow::ensure!(
        mid_multipart >= ROUNDS / 4,
        "only {mid_multipart} of {ROUNDS} kills landed mid-multipart: the fault this scenario is about was not injected"
    );
    let (same, lost) = compare_hashes(&minio, &everything).await?;
    tally.checked = same;
    tally.lost += lost;
    // kill -9 cannot abort a multipart upload; its parts wait for a lifecycle rule.
    let mut dangling = 0;
    for relative in everything.keys().filter(|r| r.contains("task_id=big")) {
        dangling += open_uploads(&client, relative).await?.len();
    }
    eprintln!("  {dangling} multipart uploads left by killed shippers (never visible as objects)");
    shipper.stop(Duration::from_secs(10));
    Ok(tally)
}

/// Multipart uploads begun and not completed or aborted under a log's key (MinIO lists
/// them per exact key).
async fn open_uploads(
    client: &aws_sdk_s3::Client,
    relative: &str,
) -> Result<Vec<aws_sdk_s3::types::MultipartUpload>> {
    let listed = client
        .list_multipart_uploads()
        .bucket(BUCKET)
        .prefix(key(relative))
        .send()
        .await?;
    Ok(listed.uploads().to_vec())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A small finished task log of a few hundred bytes to a few hundred KiB.
fn new_small(root: &Path, logs: &mut Logs, rng: &mut Jitter, relative: &str) -> Result<()> {
    let size = rng.range(200, 300 << 10) as usize;
    let bytes = lines(relative, size);
    write_log(root, relative, &bytes)?;
    logs.insert(relative.to_string(), bytes);
    Ok(())
}

/// `size` bytes of numbered lines, so a reordered or missing part shows.
fn lines(tag: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 256);
    let mut i = 0u64;
    while out.len() < size {
        out.extend_from_slice(
            format!("{i:010} {tag} [2024-03-01T00:00:00+00:00] INFO task ran\n").as_bytes(),
        );
        i += 1;
    }
    out.truncate(size);
    out
}
