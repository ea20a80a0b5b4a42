//! Airflow's own S3 log reader (the code its UI runs, from a pinned venv)
//! finds the logs localship ships at the keys it writes them to, and returns
//! their text as written:
//! mapped tasks, retries, run ids with `:` and `+`, triggerer siblings, UTF-8.

use anyhow::Result;
use localship_tests::airflow::read_with_airflow;
use localship_tests::{scratch_dir, Minio, ShipperAgent};

const BUCKET: &str = "airflow";
const REMOTE_BASE: &str = "s3://airflow/logs";

const MANUAL: &str = "dag_id=etl/run_id=manual__2024-05-01T10:00:00+00:00";
const SCHEDULED: &str = "dag_id=etl/run_id=scheduled__2024-05-02T00:00:00+00:00";

fn url(relative: &str) -> String {
    format!("{REMOTE_BASE}/{relative}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airflow_s3_reader_finds_every_key_localship_writes() -> Result<()> {
    let plain = format!("{MANUAL}/task_id=extract/attempt=1.log");
    let retry = format!("{MANUAL}/task_id=extract/attempt=2.log");
    let mapped = format!("{MANUAL}/task_id=load/map_index=3/attempt=1.log");
    let deferred = format!("{SCHEDULED}/task_id=wait/attempt=1.log");
    let trigger = format!("{deferred}.trigger.42.log");
    let missing = format!("{MANUAL}/task_id=extract/attempt=3.log");
    // Each object with text of its own, so a mix-up shows.
    let objects = [
        (
            &plain,
            "{\"event\":\"extract started\",\"level\":\"info\"}\nplain line, attempt 1\n",
        ),
        (&retry, "retry: attempt 2 of extract\n"),
        (
            &mapped,
            "mapped load, map_index 3 — Grüße aus Köln, 日本語のログ ✓\n",
        ),
        (&deferred, "wait deferred to the triggerer\n"),
        (&trigger, "trigger 42 fired\n"),
    ];
    // Each path Airflow asks for, and the objects it must find, in its order.
    let expected = [
        (&plain, vec![&plain]),
        (&retry, vec![&retry]),
        (&mapped, vec![&mapped]),
        (&deferred, vec![&deferred, &trigger]),
    ];

    // Written as a worker writes them, shipped by localship.
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let source = scratch_dir("reader-logs")?;
    for (relative, text) in &objects {
        let path = source.join(relative);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(path, text)?;
    }
    let shipper = ShipperAgent::standalone(&minio, &source, REMOTE_BASE, &["--settle=0s"])?;
    shipper.once(&[])?;
    let text_of = |relative: &String| -> String {
        let (_, text) = objects.iter().find(|(r, _)| *r == relative).unwrap();
        text.to_string()
    };

    let mut asked: Vec<&str> = expected.iter().map(|(p, _)| p.as_str()).collect();
    asked.push(&missing);
    let reads = tokio::task::block_in_place(|| read_with_airflow(&minio, REMOTE_BASE, &asked))?;

    for (relative, found) in &expected {
        let read = &reads[relative.as_str()];
        let keys: Vec<String> = found.iter().map(|r| url(r)).collect();
        assert_eq!(read.keys, keys, "keys Airflow found for {relative}");
        let texts: Vec<String> = found.iter().map(|r| text_of(r)).collect();
        assert_eq!(
            read.content.as_ref(),
            Some(&texts),
            "text Airflow read for {relative}"
        );
    }
    assert!(
        reads[&deferred].keys.contains(&url(&trigger)),
        "the triggerer's log is not among {:?}",
        reads[&deferred].keys
    );
    let none = &reads[&missing];
    assert!(
        none.keys.is_empty() && none.content.is_none(),
        "Airflow found a log for {missing}, which has no object: {none:?}"
    );
    Ok(())
}
