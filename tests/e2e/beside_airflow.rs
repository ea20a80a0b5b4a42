//! localship beside Airflow's own remote logging: Airflow's upload code (the amazon
//! provider's, from the pinned venv) writes as a worker does, localship ships the same log
//! folders, and Airflow's reader must return every line the task wrote exactly once, with
//! the log's own key holding the whole log in the end. Every scenario runs with Airflow 2.10
//! and with Airflow 3.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use localship_tests::airflow::{read_with, upload_with_airflow, Airflow};
use localship_tests::{scratch_dir, wait_for, Minio, ShipperAgent};

const BUCKET: &str = "airflow";
const REMOTE_BASE: &str = "s3://airflow/logs";
const RUN: &str = "dag_id=etl/run_id=scheduled__2026-12-01T00:00:00+00:00";
const WAIT: Duration = Duration::from_secs(60);

/// One shipper beside one Airflow version over two workers' log folders.
struct Beside {
    airflow: Airflow,
    minio: Minio,
    shipper: ShipperAgent,
    workers: [PathBuf; 2],
}

impl Beside {
    async fn start(airflow: Airflow, final_after: &str) -> Result<Self> {
        Self::start_with(airflow, final_after, "--settle=1s").await
    }

    async fn start_with(airflow: Airflow, final_after: &str, settle: &str) -> Result<Self> {
        let minio = Minio::start().await?;
        minio.create_bucket(BUCKET).await?;
        let workers = [scratch_dir("worker-1")?, scratch_dir("worker-2")?];
        let second = format!("--source={}", workers[1].display());
        let final_after = format!("--final-after={final_after}");
        let extra = [
            second.as_str(),
            "--airflow-remote-logging=on",
            &final_after,
            settle,
        ];
        let mut shipper = ShipperAgent::standalone(&minio, &workers[0], REMOTE_BASE, &extra)?;
        shipper.start().await?;
        Ok(Self {
            airflow,
            minio,
            shipper,
            workers,
        })
    }

    fn append(&self, worker: usize, relative: &str, text: &str) -> Result<()> {
        use std::io::Write;
        let path = self.workers[worker].join(relative);
        std::fs::create_dir_all(path.parent().unwrap())?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        file.write_all(text.as_bytes())?;
        Ok(())
    }

    /// Airflow's upload of the log from `worker`, as at the end (or deferral) of a try.
    fn airflow_upload(&self, worker: usize, relative: &str, delete_local: bool) -> Result<()> {
        let folder = &self.workers[worker];
        let endpoint = self.minio.endpoint();
        tokio::task::block_in_place(|| {
            let minio = &self.minio;
            upload_with_airflow(
                self.airflow,
                minio,
                &endpoint,
                REMOTE_BASE,
                folder,
                relative,
                delete_local,
            )
        })
    }

    /// Every object Airflow's reader lists for `relative`: (key, bytes), in key order.
    async fn objects(&self, relative: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = format!("logs/{relative}");
        let mut objects = Vec::new();
        for key in self.minio.list_keys(BUCKET).await? {
            if key.starts_with(&prefix) {
                let bytes = self.minio.get_object(BUCKET, &key).await?;
                objects.push((key, bytes.unwrap_or_default()));
            }
        }
        Ok(objects)
    }

    /// Waits until the objects under `relative` hold `want`'s lines, each once; with
    /// `only_own_key`, all in the log's own key.
    async fn wait_view(&self, relative: &str, want: &str, only_own_key: bool) -> Result<()> {
        let own = format!("logs/{relative}");
        let what = format!("{relative} to show each line once (own key only: {only_own_key})");
        wait_for(&what, WAIT, || async {
            let objects = self.objects(relative).await?;
            let all: Vec<u8> = objects.iter().flat_map(|(_, b)| b.clone()).collect();
            let keys_ok = !only_own_key || (objects.len() == 1 && objects[0].0 == own);
            Ok((keys_ok && lines(&all) == lines(want.as_bytes())).then_some(()))
        })
        .await
    }

    /// What Airflow's own reader returns for `relative` holds `want`'s lines, each once.
    fn airflow_reads_once(&self, relative: &str, want: &str) -> Result<()> {
        let reads = tokio::task::block_in_place(|| {
            read_with(self.airflow, &self.minio, REMOTE_BASE, &[relative])
        })?;
        let content = reads[relative].content.clone().unwrap_or_default();
        let got = lines(content.concat().as_bytes());
        ensure!(
            got == lines(want.as_bytes()),
            "Airflow read {:?} for {relative}: {got:#?}",
            reads[relative].keys
        );
        Ok(())
    }
}

/// The non-empty lines, sorted: a line shown twice shows up twice here.
fn lines(bytes: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

fn part(task: &str, name: &str, n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[2026-12-01T00:00:{i:02}.000+0000] {{{task}.py:1}} INFO - {name} {i}\n"
        ));
    }
    // A line without a timestamp, which Airflow 2's view shows twice if stored twice.
    text.push_str(&format!("  {name} continued without a timestamp\n"));
    text
}

/// Each scenario as a test per Airflow major.
macro_rules! for_each_airflow {
    ($($scenario:ident),* $(,)?) => {
        mod airflow_2 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario(super::Airflow::V2).await
                }
            )*
        }
        mod airflow_3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario(super::Airflow::V3).await
                }
            )*
        }
    };
}

for_each_airflow!(
    a_quiet_task_then_airflows_upload_shows_every_line_once,
    a_quick_task_uploaded_by_airflow_first_gets_nothing_more,
    a_killed_workers_log_becomes_final_under_its_own_key,
    a_task_deferred_on_one_worker_and_resumed_on_another_shows_each_part_once,
    delete_local_logs_after_airflows_upload_leaves_one_copy,
    a_failed_airflow_upload_leaves_localships_copy_complete,
);

fn log(task: &str, attempt: u32) -> String {
    format!("{RUN}/task_id={task}/attempt={attempt}.log")
}

async fn a_quiet_task_then_airflows_upload_shows_every_line_once(airflow: Airflow) -> Result<()> {
    let b = Beside::start(airflow, "10m").await?;
    let rel = format!("{RUN}/task_id=load/map_index=2/attempt=2.log");
    let (first, rest) = (part("load", "first", 5), part("load", "rest", 5));
    b.append(0, &rel, &first)?;
    // Quiet longer than --settle: shipped, and shown, though Airflow has not uploaded.
    b.wait_view(&rel, &first, false).await?;
    b.append(0, &rel, &rest)?;
    b.airflow_upload(0, &rel, false)?;
    let whole = format!("{first}{rest}");
    b.wait_view(&rel, &whole, true).await?;
    b.airflow_reads_once(&rel, &whole)
}

async fn a_quick_task_uploaded_by_airflow_first_gets_nothing_more(airflow: Airflow) -> Result<()> {
    // Airflow uploads well within the settle period.
    let b = Beside::start_with(airflow, "10m", "--settle=15s").await?;
    let rel = log("quick", 1);
    let text = part("quick", "quick", 3);
    b.append(0, &rel, &text)?;
    b.airflow_upload(0, &rel, false)?;
    wait_for("the shipper to look at the log", WAIT, || async {
        let seen = b
            .shipper
            .metric("localship_logshipper_files_shipped_total{kind=\"task\"}")?;
        Ok(seen.filter(|n| *n >= 1.0).map(|_| ()))
    })
    .await?;
    let sent = b
        .shipper
        .metric("localship_logshipper_bytes_shipped_total")?;
    ensure!(
        sent == Some(0.0),
        "localship uploaded {sent:?} bytes of a log Airflow had"
    );
    b.wait_view(&rel, &text, true).await?;
    b.airflow_reads_once(&rel, &text)
}

async fn a_killed_workers_log_becomes_final_under_its_own_key(airflow: Airflow) -> Result<()> {
    // Longer than Airflow's upload takes to start here, so attempt 2 is not final before it.
    let b = Beside::start(airflow, "15s").await?;
    let (killed, retry) = (log("killed", 1), log("killed", 2));
    let text = part("killed", "before the kill", 4);
    b.append(0, &killed, &text)?;
    // The retry runs while the killed attempt is being shipped, and ends normally.
    let retried = part("killed", "retry", 3);
    b.append(0, &retry, &retried)?;
    b.airflow_upload(0, &retry, false)?;
    // No upload from Airflow ever comes for attempt 1; it is final once quiet for
    // --final-after.
    b.wait_view(&killed, &text, true).await?;
    b.wait_view(&retry, &retried, true).await?;
    b.airflow_reads_once(&killed, &text)?;
    b.airflow_reads_once(&retry, &retried)
}

async fn a_task_deferred_on_one_worker_and_resumed_on_another_shows_each_part_once(
    airflow: Airflow,
) -> Result<()> {
    let b = Beside::start(airflow, "10m").await?;
    let rel = log("wait", 1);
    let trigger = format!("{rel}.trigger.7.log");
    let (a, b1, b2) = (
        part("wait", "deferring", 3),
        part("wait", "resumed", 3),
        part("wait", "done", 2),
    );
    let t = part("trigger", "trigger fired", 2);
    // Worker 1 defers: Airflow uploads part A; the triggerer writes its own log.
    b.append(0, &rel, &a)?;
    b.airflow_upload(0, &rel, false)?;
    b.append(1, &trigger, &t)?;
    // Worker 2 resumes in a fresh file and goes quiet.
    b.append(1, &rel, &b1)?;
    b.wait_view(&rel, &format!("{a}{b1}{t}"), false).await?;
    // It ends: Airflow appends worker 2's whole file to part A.
    b.append(1, &rel, &b2)?;
    b.airflow_upload(1, &rel, false)?;
    let whole = format!("{a}{b1}{b2}");
    b.wait_view(&format!("{rel}.trigger"), &t, false).await?;
    wait_for(
        "part A then part B under the log's key, nothing beside",
        WAIT,
        || async {
            let objects = b.objects(&rel).await?;
            let keys: Vec<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
            let own = format!("logs/{rel}");
            let trig = format!("logs/{trigger}");
            let done = keys.len() == 2 && keys[0] == own && keys[1].starts_with(&trig);
            Ok((done && lines(&objects[0].1) == lines(whole.as_bytes())).then_some(()))
        },
    )
    .await?;
    b.airflow_reads_once(&rel, &format!("{whole}{t}"))
}

async fn delete_local_logs_after_airflows_upload_leaves_one_copy(airflow: Airflow) -> Result<()> {
    let b = Beside::start(airflow, "10m").await?;
    let rel = log("tidy", 1);
    let (first, rest) = (part("tidy", "first", 3), part("tidy", "rest", 3));
    b.append(0, &rel, &first)?;
    b.wait_view(&rel, &first, false).await?;
    b.append(0, &rel, &rest)?;
    b.airflow_upload(0, &rel, true)?;
    ensure!(
        !b.workers[0].join(&rel).exists(),
        "Airflow removed the folder"
    );
    let whole = format!("{first}{rest}");
    b.wait_view(&rel, &whole, true).await?;
    b.airflow_reads_once(&rel, &whole)
}

async fn a_failed_airflow_upload_leaves_localships_copy_complete(airflow: Airflow) -> Result<()> {
    let b = Beside::start(airflow, "20s").await?;
    let rel = log("unlucky", 1);
    let (first, rest) = (part("unlucky", "first", 3), part("unlucky", "rest", 3));
    b.append(0, &rel, &first)?;
    b.wait_view(&rel, &first, false).await?;
    b.append(0, &rel, &rest)?;
    // Airflow's upload to an endpoint that is away fails, and Airflow swallows it.
    tokio::task::block_in_place(|| {
        let away = "http://127.0.0.1:1";
        upload_with_airflow(
            b.airflow,
            &b.minio,
            away,
            REMOTE_BASE,
            &b.workers[0],
            &rel,
            false,
        )
    })?;
    ensure!(b
        .minio
        .get_object(BUCKET, &format!("logs/{rel}"))
        .await?
        .is_none());
    let whole = format!("{first}{rest}");
    b.wait_view(&rel, &whole, true).await?;
    b.airflow_reads_once(&rel, &whole)
}
