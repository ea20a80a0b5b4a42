//! A temporary Airflow log folder, an archive directory and the real binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_localship-logshipper");

pub const MANUAL: &str = "dag_id=etl/run_id=manual__2024-01-01T00:00:00+00:00";
pub const SCHEDULED: &str = "dag_id=etl/run_id=scheduled__2024-03-05T06:00:00+00:00";

/// Task logs as Airflow writes them: retries, mapped tasks, a triggerer file.
pub fn airflow_logs() -> Vec<(String, Vec<u8>)> {
    let mut logs = vec![
        (
            format!("{MANUAL}/task_id=extract/attempt=1.log"),
            b"[2024-01-01] extract: failed\n".to_vec(),
        ),
        (
            format!("{MANUAL}/task_id=extract/attempt=2.log"),
            b"[2024-01-01] extract: ok\n".to_vec(),
        ),
        (
            format!("{MANUAL}/task_id=wait/attempt=1.log"),
            b"deferring\n".to_vec(),
        ),
        (
            format!("{MANUAL}/task_id=wait/attempt=1.log.trigger.17.log"),
            b"trigger fired\n".to_vec(),
        ),
        (
            format!("{SCHEDULED}/task_id=load/attempt=1.log"),
            (0..5000)
                .flat_map(|i| format!("line {i}\n").into_bytes())
                .collect(),
        ),
        (
            format!("{SCHEDULED}/task_id=empty/attempt=1.log"),
            Vec::new(),
        ),
    ];
    for index in 0..3 {
        logs.push((
            format!("{SCHEDULED}/task_id=fan_out/map_index={index}/attempt=1.log"),
            format!("mapped {index}\n").into_bytes(),
        ));
    }
    logs
}

pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    pub fn new() -> Self {
        let tree = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(tree.logs()).unwrap();
        tree
    }

    pub fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    pub fn out(&self) -> PathBuf {
        self.dir.path().join("archive")
    }

    pub fn ledger(&self) -> PathBuf {
        self.dir.path().join("state/ledger.redb")
    }

    pub fn write(&self, relative: impl AsRef<Path>, bytes: &[u8]) {
        let path = self.logs().join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    pub fn append(&self, relative: &str, bytes: &[u8]) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.logs().join(relative))
            .unwrap();
        file.write_all(bytes).unwrap();
    }

    /// `--source logs --dest file://archive --ledger state/ledger.redb`, then `extra`.
    pub fn command(&self, extra: &[&str]) -> Command {
        self.command_to(&format!("file://{}", self.out().display()), extra)
    }

    /// [`Tree::command`] with another `--dest`.
    pub fn command_to(&self, dest: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .current_dir(self.dir.path())
            .arg("--source")
            .arg(self.logs())
            .arg("--dest")
            .arg(dest)
            .arg("--ledger")
            .arg(self.ledger())
            .args(extra)
            .env("RUST_LOG", "info");
        for (key, _) in std::env::vars_os() {
            if key.as_bytes().starts_with(b"LOCALSHIP_") || key.as_bytes().starts_with(b"AWS_") {
                command.env_remove(key);
            }
        }
        // NODE_NAME would turn on Kubernetes mode.
        command.env_remove("NODE_NAME");
        command
    }

    /// A `--once` run with the settle period off.
    pub fn once(&self, extra: &[&str]) -> Run {
        let mut args = vec!["--once", "--settle", "0s"];
        args.extend_from_slice(extra);
        Run::from(self.command(&args).output().unwrap())
    }
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Self {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// The `shipped N files (M bytes), skipped K unchanged, …` line.
    pub fn summary(&self) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with("shipped "))
            .unwrap_or_else(|| panic!("no summary in:\n{}\n{}", self.stdout, self.stderr))
    }
}

/// Every file under `dir`, by `/`-joined relative path.
pub fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else {
                let relative = entry
                    .path()
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.insert(relative, std::fs::read(entry.path()).unwrap_or_default());
            }
        }
    }
    files
}

pub fn non_utf8_name() -> &'static OsStr {
    OsStr::from_bytes(b"attempt=\xff\xfe.log")
}
