//! Hostile inputs, one row each with the outcome decided for it. Files the shipper must not
//! ship sit in the same source as good logs, which must still ship; destinations that cannot
//! be used must leave the daemon alive, not ready, and saying what to fix.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use localship_tests::process::free_port;
use localship_tests::shipper::folder_over_the_key_limit;
use localship_tests::{scratch_dir, wait_for, Minio, ShipperAgent};

use super::{compare_bucket, dest, key, write_log, Logs, BUCKET};
use crate::report::Tally;

const RUN: &str = "dag_id=hostile/run_id=manual__2024-05-01T10:00:00+00:00";
const SECRET: &[u8] = b"root:x:0:0:root:/root:/bin/bash\n";

/// Counts the rows and says how each went.
pub(super) struct Rows(Tally);

impl Rows {
    pub(super) fn new() -> Self {
        Rows(Tally::default())
    }

    pub(super) fn tally(self) -> Tally {
        self.0
    }

    pub(super) fn row(&mut self, name: &str, ok: bool, detail: &str) {
        self.0.rounds += 1;
        self.0.faults += 1;
        if ok {
            self.0.checked += 1;
            eprintln!("  ok    {name}: {detail}");
        } else {
            self.0.lost += 1;
            eprintln!("  LOST  {name}: {detail}");
        }
    }
}

pub async fn run() -> Result<Tally> {
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let mut rows = Rows::new();
    files(&minio, &mut rows).await?;
    missing_bucket(&minio, &mut rows).await?;
    refused(&minio, &mut rows).await?;
    per_namespace_without_kubernetes(&minio, &mut rows).await?;
    long_name_to_a_folder(&minio, &mut rows).await?;
    beyond_the_watch_cap(&minio, &mut rows).await?;
    hostile_neighbour(&minio, &mut rows).await?;
    super::rewritten::run(&minio, &mut rows).await?;
    Ok(rows.0)
}

/// A volume whose 10,050 logs never settle (touched over and over) and 2,000 more that can
/// never ship (keys too long), beside a volume with one new log: that log ships while the
/// hostile volume still holds its share of the files followed. Before, they filled the one
/// shared backlog and the new log was not even found.
async fn hostile_neighbour(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let hostile = scratch_dir("hostile-neighbour")?;
    let good = scratch_dir("good-neighbour")?;
    let long_dir = hostile.join(folder_over_the_key_limit());
    std::fs::create_dir_all(&long_dir)?;
    for i in 0..2_000 {
        std::fs::write(long_dir.join(format!("attempt={i}.log")), b"x\n")?;
    }
    let hostile_arg = format!("--source={}", hostile.display());
    let mut shipper = ShipperAgent::standalone(
        minio,
        &good,
        &format!("s3://{BUCKET}/neighbour"),
        &["--settle=1s", &hostile_arg],
    )?;
    shipper.start().await?;
    let refused = |shipper: &ShipperAgent| -> Result<f64> {
        Ok(shipper
            .metric(r#"localship_logshipper_skipped_total{reason="key_too_long"}"#)?
            .unwrap_or(0.0))
    };
    // The unshippable ones first, each tried and refused; then the restless ones.
    let _ = wait_for("2,000 refusals", Duration::from_secs(60), || async {
        Ok((refused(&shipper)? >= 2_000.0).then_some(()))
    })
    .await;
    let restless_dir = hostile.join("dag_id=restless/run_id=r/task_id=t");
    std::fs::create_dir_all(&restless_dir)?;
    let restless: Vec<std::path::PathBuf> = (0..10_050)
        .map(|i| restless_dir.join(format!("attempt={i}.log")))
        .collect();
    for path in &restless {
        std::fs::write(path, b"x\n")?;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let toucher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for path in &restless {
                    if let Ok(file) = std::fs::File::options().write(true).open(path) {
                        let _ = file.set_modified(std::time::SystemTime::now());
                    }
                }
            }
        })
    };
    let followed = |shipper: &ShipperAgent| -> Result<f64> {
        Ok(shipper
            .metric("localship_logshipper_backlog_files")?
            .unwrap_or(0.0))
    };
    let full = wait_for(
        "the hostile volume to fill its share",
        Duration::from_secs(60),
        || async { Ok((followed(&shipper)? >= 5_000.0).then_some(())) },
    )
    .await;
    let relative = format!("{RUN}/task_id=neighbour/attempt=1.log");
    write_log(&good, &relative, b"a log beside a hostile volume\n")?;
    let key = format!("neighbour/{relative}");
    let shipped = wait_for("the neighbour's log", Duration::from_secs(30), || async {
        minio.get_object(BUCKET, &key).await
    })
    .await;
    let still_followed = followed(&shipper)?;
    let too_long = refused(&shipper)?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = toucher.join();
    shipper.check_running()?;
    shipper.stop(Duration::from_secs(10));
    rows.row(
        "a volume of 10,050 restless and 2,000 unshippable logs beside another",
        full.is_ok() && shipped.is_ok() && still_followed >= 5_000.0 && too_long == 2_000.0,
        &format!(
            "the other volume's log shipped: {}, while {still_followed} hostile files were followed; {too_long} refused for good, once each",
            shipped.is_ok()
        ),
    );
    Ok(())
}

/// A log whose name is as long as the filesystem allows, shipped to a `file://` archive,
/// where the object's temporary file used to be named after it, and too long.
async fn long_name_to_a_folder(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let source = scratch_dir("long-name-logs")?;
    let archive = scratch_dir("long-name-archive")?;
    let name = format!("attempt=1.log.trigger.{}.log", "7".repeat(229));
    let relative = format!("{RUN}/task_id=long/{name}");
    write_log(&source, &relative, b"a log with a long name\n")?;
    let dest = format!("file://{}", archive.display());
    let shipper = ShipperAgent::standalone(minio, &source, &dest, &["--settle=0s"])?;
    let ran = shipper.once(&[]);
    let got = std::fs::read(archive.join(&relative)).ok();
    rows.row(
        "a 255-byte log name to file://",
        ran.is_ok() && got.as_deref() == Some(b"a log with a long name\n".as_slice()),
        &format!(
            "{}-byte name: --once {ran:?}, archived {:?} bytes",
            name.len(),
            got.map(|g| g.len())
        ),
    );
    Ok(())
}

/// A source with more directories than its watches may cover: a log made deep in one
/// without a watch still ships, found by the rescan, and the cap holds.
async fn beyond_the_watch_cap(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let source = scratch_dir("watch-cap-logs")?;
    for i in 0..50 {
        std::fs::create_dir_all(source.join(format!("dag_id=d{i:02}/run_id=r/task_id=t")))?;
    }
    let mut shipper = ShipperAgent::standalone(
        minio,
        &source,
        &format!("s3://{BUCKET}/watch-cap"),
        &["--settle=0s", "--rescan=2s", "--max-watches-per-source=5"],
    )?;
    shipper.start().await?;
    let relative = "dag_id=d49/run_id=r/task_id=t/attempt=1.log";
    write_log(&source, relative, b"a log where no watch is\n")?;
    let written = Instant::now();
    let shipped = wait_for("the deep log to ship", Duration::from_secs(30), || async {
        Ok(minio
            .get_object(BUCKET, &format!("watch-cap/{relative}"))
            .await?
            .filter(|o| o.as_slice() == b"a log where no watch is\n"))
    })
    .await;
    let took = written.elapsed();
    let watches = shipper.metric("localship_logshipper_inotify_watches")?;
    rows.row(
        "151 directories, --max-watches-per-source=5",
        shipped.is_ok() && watches == Some(5.0),
        &format!(
            "a log deep in an unwatched directory shipped after {:.1}s (--rescan=2s); inotify_watches {watches:?}",
            took.as_secs_f64()
        ),
    );
    shipper.stop(Duration::from_secs(10));
    Ok(())
}

/// Hostile files among good logs in one source, under one daemon.
async fn files(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let source = scratch_dir("hostile-logs")?;
    let outside = scratch_dir("outside-the-source")?;
    let mut shipped = Logs::new();
    for i in 0..5 {
        let relative = format!("{RUN}/task_id=good{i}/attempt=1.log");
        let bytes = format!("good log {i}\n").repeat(100).into_bytes();
        write_log(&source, &relative, &bytes)?;
        shipped.insert(relative, bytes);
    }
    // A task that wrote nothing (killed before its first line) ships as an empty object:
    // Airflow's reader then shows an empty log rather than "log not found".
    let empty = format!("{RUN}/task_id=empty/attempt=1.log");
    write_log(&source, &empty, b"")?;
    shipped.insert(empty.clone(), Vec::new());
    // A hard link is a regular file to the kernel: it ships under its own name in the source,
    // with the linked bytes; the shipper opens it beneath the source and no path outside.
    std::fs::write(outside.join("hard.log"), b"hard-linked log\n")?;
    let hard = format!("{RUN}/task_id=hard/attempt=1.log");
    std::fs::create_dir_all(source.join(&hard).parent().context("parent")?)?;
    std::fs::hard_link(outside.join("hard.log"), source.join(&hard))?;
    shipped.insert(hard.clone(), b"hard-linked log\n".to_vec());
    // Never shipped.
    let odd_dir = source.join(format!("{RUN}/task_id=odd"));
    std::fs::create_dir_all(&odd_dir)?;
    std::fs::write(
        odd_dir.join(OsStr::from_bytes(b"attempt=\xff.log")),
        b"latin-1 name\n",
    )?;
    std::fs::write(odd_dir.join("attempt=2\n.log"), b"newline in the name\n")?;
    std::fs::write(outside.join("passwd"), SECRET)?;
    let link = format!("{RUN}/task_id=link/attempt=1.log");
    std::fs::create_dir_all(source.join(&link).parent().context("parent")?)?;
    std::os::unix::fs::symlink(outside.join("passwd"), source.join(&link))?;
    write_log(&outside, "run_id=r/task_id=t/attempt=1.log", SECRET)?;
    std::os::unix::fs::symlink(&outside, source.join("dag_id=linked"))?;
    let fifo = source.join(format!("{RUN}/task_id=fifo/attempt=1.log"));
    std::fs::create_dir_all(fifo.parent().context("parent")?)?;
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU)?;
    // 4 TiB of holes: costs the pod no disk, and must cost the shipper no reading.
    let sparse = format!("{RUN}/task_id=sparse/attempt=1.log");
    write_log(&source, &sparse, b"")?;
    std::fs::File::options()
        .write(true)
        .open(source.join(&sparse))?
        .set_len(4 << 40)?;
    // An object key over S3's 1,024 bytes: refused before any upload, never retried.
    let long = format!("{}/attempt=1.log", folder_over_the_key_limit());
    write_log(&source, &long, b"a log with a key too long\n")?;
    // Still being written: appended every 200ms for 4s, with --settle=1s.
    let growing = format!("{RUN}/task_id=growing/attempt=1.log");
    write_log(&source, &growing, b"started\n")?;

    let mut shipper =
        ShipperAgent::standalone(minio, &source, &dest(), &["--settle=1s", "--rescan=2s"])?;
    shipper.start().await?;
    let mut grown = b"started\n".to_vec();
    let mut early = None;
    let writing = Instant::now();
    while writing.elapsed() < Duration::from_secs(4) {
        let line = format!("line at {}ms\n", writing.elapsed().as_millis()).into_bytes();
        std::fs::OpenOptions::new()
            .append(true)
            .open(source.join(&growing))?
            .write_all(&line)?;
        grown.extend_from_slice(&line);
        if early.is_none() {
            early = minio.get_object(BUCKET, &key(&growing)).await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shipped.insert(growing.clone(), grown.clone());
    let final_object = wait_for("the grown log to ship", Duration::from_secs(30), || async {
        Ok(minio
            .get_object(BUCKET, &key(&growing))
            .await?
            .filter(|o| *o == grown))
    })
    .await;
    // Two rescans more, for anything that would ship late.
    tokio::time::sleep(Duration::from_secs(5)).await;
    shipper.check_running()?;

    let object = |relative: &str| {
        let relative = relative.to_string();
        async move { minio.get_object(BUCKET, &key(&relative)).await }
    };
    let keys = minio.list_keys(BUCKET).await?;
    let skipped = |reason: &str| {
        shipper
            .metric(&format!(
                r#"localship_logshipper_skipped_total{{reason="{reason}"}}"#
            ))
            .map(|v| v.unwrap_or(0.0))
    };
    for (relative, bytes) in shipped.iter().filter(|(r, _)| r.contains("task_id=good")) {
        let ok = object(relative).await?.as_ref() == Some(bytes);
        rows.row("good log beside hostile ones", ok, relative);
    }
    let got = object(&empty).await?;
    rows.row(
        "0-byte log",
        got.as_ref().is_some_and(Vec::is_empty),
        &format!("ships as an empty object: {:?}", got.map(|o| o.len())),
    );
    rows.row(
        "hard link to a file outside the source",
        object(&hard).await?.as_deref() == Some(b"hard-linked log\n".as_slice()),
        "ships as the regular file it is, under its name in the source",
    );
    let sparse_skipped = skipped("sparse")?;
    rows.row(
        "a 4 TiB sparse log",
        sparse_skipped >= 1.0 && !keys.iter().any(|k| k.contains("task_id=sparse")),
        &format!("refused unread: skipped_total{{reason=\"sparse\"}} {sparse_skipped}, no key"),
    );
    let too_long = skipped("key_too_long")?;
    let failures = shipper
        .metric(r#"localship_logshipper_failures_total{reason="refused"}"#)?
        .unwrap_or(0.0);
    rows.row(
        "a 1,270-byte object key",
        too_long == 1.0 && failures == 0.0 && !keys.iter().any(|k| k.contains("task_id=ccc")),
        &format!(
            "refused once, before any upload, and not retried: skipped_total{{reason=\"key_too_long\"}} {too_long}, failures_total{{reason=\"refused\"}} {failures}, no key"
        ),
    );
    let non_utf8 = skipped("non_utf8")?;
    rows.row(
        "non-UTF-8 file name",
        non_utf8 >= 1.0
            && !keys
                .iter()
                .any(|k| k.contains("task_id=odd/attempt=\u{fffd}")),
        &format!("skipped_total{{reason=\"non_utf8\"}} {non_utf8}, no key"),
    );
    let invalid = skipped("invalid_name")?;
    rows.row(
        "newline in a file name",
        invalid >= 1.0 && !keys.iter().any(|k| k.contains('\n')),
        &format!("skipped_total{{reason=\"invalid_name\"}} {invalid}, no key"),
    );
    let symlinks = skipped("symlink")?;
    rows.row(
        "symlink to a file outside the source",
        object(&link).await?.is_none() && symlinks >= 1.0,
        &format!("not followed; skipped_total{{reason=\"symlink\"}} {symlinks}"),
    );
    // Two links: the file above and the directory; each is counted.
    rows.row(
        "symlinked directory in the source",
        !keys.iter().any(|k| k.contains("dag_id=linked")) && symlinks >= 2.0,
        &format!("not followed, nothing beneath it shipped; skipped_total{{reason=\"symlink\"}} {symlinks}"),
    );
    let not_regular = skipped("not_regular")?;
    rows.row(
        "FIFO named like a log",
        object(&fifo.strip_prefix(&source)?.to_string_lossy())
            .await?
            .is_none()
            && not_regular >= 1.0,
        &format!("not opened for reading; skipped_total{{reason=\"not_regular\"}} {not_regular}"),
    );
    rows.row(
        "log still being written",
        early.is_none() && final_object.is_ok(),
        &format!(
            "nothing shipped while appends came every 200ms; final object equals the final {} bytes: {}",
            grown.len(),
            final_object.is_ok()
        ),
    );
    let (_, extra) = compare_bucket(minio, &shipped).await?;
    rows.row(
        "nothing else in the bucket",
        extra == 0 && !keys.is_empty(),
        &format!("{} keys, all from logs that should ship", keys.len()),
    );
    let secret_shipped = futures_any_secret(minio, &keys).await?;
    rows.row(
        "no byte from outside the source via a path",
        !secret_shipped,
        "no object holds the outside file's content",
    );
    shipper.stop(Duration::from_secs(10));
    Ok(())
}

async fn futures_any_secret(minio: &Minio, keys: &[String]) -> Result<bool> {
    for k in keys {
        if minio.get_object(BUCKET, k).await?.as_deref() == Some(SECRET) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A source of three good logs.
fn good_source(name: &str) -> Result<(std::path::PathBuf, Logs)> {
    let source = scratch_dir(name)?;
    let mut logs = Logs::new();
    for i in 0..3 {
        let relative = format!("{RUN}/task_id=t{i}/attempt=1.log");
        let bytes = format!("{name} log {i}\n").into_bytes();
        write_log(&source, &relative, &bytes)?;
        logs.insert(relative, bytes);
    }
    Ok((source, logs))
}

/// The last line of the shipper's log that holds `needle`, waited for.
async fn said(shipper: &ShipperAgent, needle: &str) -> Result<String> {
    wait_for(
        &format!("the shipper to say `{needle}`"),
        Duration::from_secs(30),
        || async {
            Ok(shipper
                .log()
                .lines()
                .rev()
                .find(|l| l.contains(needle))
                .map(String::from))
        },
    )
    .await
    .with_context(|| format!("shipper log tail:\n{}", shipper.log_tail(20)))
}

/// Alive, not ready, still running after `seconds`: a daemon that waits, not one that loops.
async fn waits_unready(shipper: &mut ShipperAgent, seconds: u64) -> Result<bool> {
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    shipper.check_running()?;
    Ok(shipper.get("/healthz")?.0 == 200 && shipper.get("/readyz")?.0 == 503)
}

/// The bucket does not exist: the daemon waits, says what to fix, and ships once it exists;
/// `--once` exits 2 with the same words.
async fn missing_bucket(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let bucket = "not-created-yet";
    let (source, logs) = good_source("no-bucket")?;
    let mut shipper =
        ShipperAgent::standalone(minio, &source, &format!("s3://{bucket}/logs"), &[])?;
    let mut once = shipper.spawn_once(&[])?;
    let status = once.wait(Duration::from_secs(60))?;
    let line = said(&shipper, "error:").await?;
    eprintln!("    --once said: {line}");
    rows.row(
        "missing bucket, --once",
        status.code() == Some(2) && line.contains(bucket) && line.contains("--create-bucket"),
        &format!("exit {status}, names the bucket and --create-bucket"),
    );

    shipper.start_alive().await?;
    let line = said(&shipper, "does not exist").await?;
    eprintln!("    daemon said: {line}");
    let waiting = waits_unready(&mut shipper, 3).await?;
    rows.row(
        "missing bucket, daemon",
        waiting && line.contains(bucket) && line.contains("--create-bucket"),
        "alive (/healthz 200), not ready (/readyz 503), not restarting, says what to fix",
    );
    minio.create_bucket(bucket).await?;
    let created = Instant::now();
    let shipped = wait_for(
        "logs in the new bucket",
        Duration::from_secs(90),
        || async {
            for (relative, bytes) in &logs {
                let got = minio
                    .get_object(bucket, &format!("logs/{relative}"))
                    .await?;
                if got.as_ref() != Some(bytes) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await;
    rows.row(
        "missing bucket created later",
        shipped.is_ok(),
        &format!(
            "the waiting daemon shipped its logs {:.1}s after the bucket appeared",
            created.elapsed().as_secs_f64()
        ),
    );
    shipper.stop(Duration::from_secs(10));
    Ok(())
}

/// Credentials refused, or nothing listening: alive, not ready, nothing shipped, and the
/// log says which.
async fn refused(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let cases = [
        (
            "wrong credentials",
            "does not accept the credentials",
            "wrong-credentials",
        ),
        ("unreachable endpoint", "cannot reach", "unreachable"),
    ];
    for (name, needle, prefix) in cases {
        let (source, _) = good_source(prefix)?;
        let shipper =
            ShipperAgent::standalone(minio, &source, &format!("s3://{BUCKET}/{prefix}"), &[])?;
        let mut shipper = match prefix {
            "wrong-credentials" => shipper.env("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
            _ => shipper.endpoint(&format!("http://127.0.0.1:{}", free_port())),
        };
        shipper.start_alive().await?;
        let line = said(&shipper, needle).await?;
        eprintln!("    daemon said: {line}");
        let waiting = waits_unready(&mut shipper, 3).await?;
        let leaked = minio
            .list_keys(BUCKET)
            .await?
            .iter()
            .any(|k| k.starts_with(&format!("{prefix}/")));
        rows.row(
            name,
            waiting && !leaked,
            "alive, not ready, nothing shipped, the log says what is wrong",
        );
        shipper.stop(Duration::from_secs(10));
    }
    Ok(())
}

/// A `--dest` whose prefix names a namespace, which only Kubernetes mode knows, or a misspelt
/// placeholder, which would be one literal prefix shared by every tenant: refused at start,
/// saying what to fix, before anything is written.
async fn per_namespace_without_kubernetes(minio: &Minio, rows: &mut Rows) -> Result<()> {
    let cases = [
        (
            "{namespace} in --dest, standalone",
            "{namespace}",
            "--node-name",
        ),
        (
            "a misspelt {namespace} in --dest",
            "{namepsace}",
            "only placeholder",
        ),
    ];
    for (name, placeholder, needle) in cases {
        let (source, _) = good_source("per-namespace")?;
        let dest = format!("s3://{BUCKET}/tenants/{placeholder}");
        let shipper = ShipperAgent::standalone(minio, &source, &dest, &[])?;
        let mut once = shipper.spawn_once(&[])?;
        let status = once.wait(Duration::from_secs(60))?;
        let said = once.log_tail(5);
        let leaked = minio
            .list_keys(BUCKET)
            .await?
            .iter()
            .any(|k| k.starts_with("tenants/"));
        eprintln!("    --once said: {}", said.trim());
        rows.row(
            name,
            status.code() == Some(2) && said.contains(needle) && !leaked,
            &format!("exit {status}, says `{needle}`, nothing shipped"),
        );
    }
    Ok(())
}
