//! `--once` runs of the real binary into a `file://` archive.

mod support;

use std::collections::BTreeMap;
use std::time::SystemTime;

use support::{airflow_logs, files_under, non_utf8_name, Run, Tree, MANUAL, SCHEDULED};

fn expected(logs: &[(String, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    logs.iter().cloned().collect()
}

fn mtimes(tree: &Tree) -> BTreeMap<String, SystemTime> {
    files_under(&tree.out())
        .into_keys()
        .map(|rel| {
            let mtime = std::fs::metadata(tree.out().join(&rel))
                .unwrap()
                .modified()
                .unwrap();
            (rel, mtime)
        })
        .collect()
}

#[test]
fn an_airflow_tree_ships_byte_identical_under_its_own_paths() {
    let tree = Tree::new();
    let logs = airflow_logs();
    for (relative, bytes) in &logs {
        tree.write(relative, bytes);
    }
    // Not task logs: scheduler logs are opt-in, other files are not logs.
    tree.write("scheduler/2024-01-01/etl.py.log", b"scheduler\n");
    tree.write(format!("{MANUAL}/task_id=extract/notes.txt"), b"notes\n");
    // A link out of the tree, named like a log: must not ship /etc/passwd.
    std::os::unix::fs::symlink(
        "/etc/passwd",
        tree.logs()
            .join(format!("{MANUAL}/task_id=extract/attempt=3.log")),
    )
    .unwrap();
    // A name that cannot be a key: skipped with a warning, the rest ships.
    tree.write(
        std::path::Path::new(&format!("{SCHEDULED}/task_id=load")).join(non_utf8_name()),
        b"odd\n",
    );

    let run = tree.once(&[]);
    run.assert_ok();

    assert_eq!(files_under(&tree.out()), expected(&logs));
    let bytes: usize = logs.iter().map(|(_, b)| b.len()).sum();
    assert!(
        run.summary().starts_with(&format!(
            "shipped {} files ({bytes} bytes), skipped 0 unchanged",
            logs.len()
        )),
        "{}",
        run.summary()
    );
    assert!(
        run.summary()
            .contains("2 not shippable (non_utf8 1, symlink 1)"),
        "{}",
        run.summary()
    );
    // The first skip is warned of by name, the other in the summary at the end.
    for reason in ["symlink", "non_utf8"] {
        let by_name = format!("reason=\"{reason}\"");
        let summed = format!("\"{reason}\": 1");
        assert!(
            run.stderr.contains(&by_name) || run.stderr.contains(&summed),
            "{reason}: {}",
            run.stderr
        );
    }
    let passwd = std::fs::read("/etc/passwd").unwrap();
    assert!(files_under(&tree.out()).values().all(|b| b != &passwd));
}

#[test]
fn scheduler_logs_ship_when_included() {
    let tree = Tree::new();
    tree.write("scheduler/2024-01-01/etl.py.log", b"scheduler\n");
    tree.write(format!("{MANUAL}/task_id=t/attempt=1.log"), b"task\n");
    tree.once(&["--include", "scheduler/**/*.log"]).assert_ok();
    let shipped: Vec<String> = files_under(&tree.out()).into_keys().collect();
    assert_eq!(shipped, vec!["scheduler/2024-01-01/etl.py.log".to_string()]);
}

#[test]
fn a_second_run_ships_nothing_and_an_appended_file_ships_again() {
    let tree = Tree::new();
    let logs = airflow_logs();
    for (relative, bytes) in &logs {
        tree.write(relative, bytes);
    }
    tree.once(&[]).assert_ok();
    let before = mtimes(&tree);

    let again = tree.once(&[]);
    again.assert_ok();
    assert!(
        again.summary().starts_with(&format!(
            "shipped 0 files (0 bytes), skipped {} unchanged",
            logs.len()
        )),
        "{}",
        again.summary()
    );
    assert_eq!(
        mtimes(&tree),
        before,
        "nothing in the archive was rewritten"
    );

    // A resumed attempt appends to its log.
    let resumed = &logs[0].0;
    tree.append(resumed, b"[2024-01-02] resumed\n");
    let third = tree.once(&[]);
    third.assert_ok();
    assert!(
        third.summary().starts_with("shipped 1 files ("),
        "{}",
        third.summary()
    );
    let mut want = logs[0].1.clone();
    want.extend_from_slice(b"[2024-01-02] resumed\n");
    assert_eq!(std::fs::read(tree.out().join(resumed)).unwrap(), want);
    let after = mtimes(&tree);
    let rewritten: Vec<&String> = after.keys().filter(|k| after[*k] != before[*k]).collect();
    assert_eq!(rewritten, vec![resumed]);

    // The ledger's records are for that destination only: another one gets everything.
    let other = tree.dir.path().join("other-archive");
    let elsewhere = Run::from(
        tree.command_to(
            &format!("file://{}", other.display()),
            &["--once", "--settle", "0s"],
        )
        .output()
        .unwrap(),
    );
    elsewhere.assert_ok();
    assert!(
        elsewhere
            .summary()
            .starts_with(&format!("shipped {} files (", logs.len())),
        "{}",
        elsewhere.summary()
    );
}

#[test]
fn retention_removes_only_shipped_unchanged_files() {
    let tree = Tree::new();
    let shipped = format!("{MANUAL}/task_id=a/attempt=1.log");
    let grown = format!("{MANUAL}/task_id=b/attempt=1.log");
    let fresh = format!("{MANUAL}/task_id=c/attempt=1.log");
    tree.write(&shipped, b"a\n");
    tree.write(&grown, b"b\n");
    tree.once(&[]).assert_ok();

    tree.append(&grown, b"more\n");
    tree.write(&fresh, b"c\n");
    // Keep the changed and the new file from being shipped in this run: only the ledger's
    // verdict on what is already shipped may remove anything.
    let run = tree.once(&[
        "--delete-after",
        "0s",
        "--exclude",
        "**/task_id=b/**",
        "--exclude",
        "**/task_id=c/**",
    ]);
    run.assert_ok();
    assert!(
        run.summary().ends_with("deleted 1 local files"),
        "{}",
        run.summary()
    );

    assert!(!tree.logs().join(&shipped).exists());
    assert_eq!(std::fs::read(tree.out().join(&shipped)).unwrap(), b"a\n");
    assert_eq!(
        std::fs::read(tree.logs().join(&grown)).unwrap(),
        b"b\nmore\n"
    );
    assert_eq!(std::fs::read(tree.logs().join(&fresh)).unwrap(), b"c\n");

    // Shipped in a later run, the changed file goes too; a long retention keeps the new one.
    let run = tree.once(&["--delete-after", "0s", "--exclude", "**/task_id=c/**"]);
    run.assert_ok();
    assert!(!tree.logs().join(&grown).exists());
    assert_eq!(
        std::fs::read(tree.out().join(&grown)).unwrap(),
        b"b\nmore\n"
    );
    tree.once(&["--delete-after", "30d"]).assert_ok();
    assert!(tree.logs().join(&fresh).exists());
}

#[test]
fn an_unreachable_bucket_fails_the_run_with_what_to_fix() {
    let tree = Tree::new();
    tree.write(format!("{MANUAL}/task_id=t/attempt=1.log"), b"x\n");
    let output = tree
        .command_to(
            "s3://airflow/logs",
            &[
                "--once",
                "--s3-endpoint",
                "http://127.0.0.1:1",
                "--s3-path-style",
            ],
        )
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let run = support::Run::from(output);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot reach http://127.0.0.1:1"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--s3-endpoint"), "{}", run.stderr);
}

#[test]
fn a_missing_source_is_a_start_up_error() {
    let tree = Tree::new();
    std::fs::remove_dir(tree.logs()).unwrap();
    let run = tree.once(&[]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("--source"), "{}", run.stderr);
}

#[test]
fn a_fresh_log_waits_for_the_settle_period_with_progress_shown() {
    let tree = Tree::new();
    let relative = format!("{MANUAL}/task_id=t/attempt=1.log");
    tree.write(&relative, b"just written\n");
    let started = std::time::Instant::now();
    let output = tree
        .command(&["--once", "--settle", "6s"])
        .output()
        .unwrap();
    let run = support::Run::from(output);
    run.assert_ok();
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(run.stderr.contains("progress: 0/1 files"), "{}", run.stderr);
    assert!(
        run.summary().starts_with("shipped 1 files (13 bytes)"),
        "{}",
        run.summary()
    );
    assert_eq!(
        std::fs::read(tree.out().join(&relative)).unwrap(),
        b"just written\n"
    );
}
