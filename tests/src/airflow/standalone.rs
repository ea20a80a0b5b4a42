//! A real Airflow (`airflow standalone`: scheduler, triggerer, dag processor, web or API
//! server and a local executor on SQLite) from a pinned venv, with remote logging to a MinIO
//! of the test's, running the DAGs in `tests/airflow/dags/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use super::{airflow_dir, python_of, Airflow};
use crate::process::{free_port, Process};
use crate::{scratch_dir, Minio};

/// A run's outcome as the REST API tells it, and each task's log as the UI shows it.
#[derive(Debug, Deserialize)]
pub struct DagRun {
    pub state: String,
    pub tasks: BTreeMap<String, TaskRun>,
}

#[derive(Debug, Deserialize)]
pub struct TaskRun {
    pub state: Option<String>,
    pub try_number: u32,
    /// The log view's timestamped records, as text (present when read).
    #[serde(default)]
    pub lines: Vec<String>,
}

pub struct Standalone {
    airflow: Airflow,
    process: Process,
    home: PathBuf,
    port: u16,
}

impl Standalone {
    /// Starts `airflow standalone` of `version` with remote logging to `remote_base` on
    /// `minio`; returns at once (the REST calls wait until it is up).
    pub fn start(airflow: Airflow, minio: &Minio, remote_base: &str) -> Result<Self> {
        let python = python_of(airflow)?;
        let bin = python.parent().context("venv bin")?;
        let home = scratch_dir(&format!("airflow-{airflow:?}"))?;
        let port = free_port();
        let envs = environment(airflow, bin, &home, port, minio, remote_base);
        // Its own process group, so everything it starts goes with it (see Drop).
        let args = vec![
            bin.join("airflow").display().to_string(),
            "standalone".into(),
        ];
        let process = Process::spawn(
            "airflow-standalone",
            Path::new("/usr/bin/setsid"),
            &args,
            &envs,
            &home,
        )?;
        Ok(Self {
            airflow,
            process,
            home,
            port,
        })
    }

    /// The folder the workers and the triggerer write task logs into.
    pub fn logs_dir(&self) -> PathBuf {
        self.home.join("logs")
    }

    /// Triggers `dag` as `run_id` and waits until the run has finished.
    pub fn run_dag(&mut self, dag: &str, run_id: &str) -> Result<DagRun> {
        self.driver(dag, run_id, false)
    }

    /// The finished run's tasks, with their logs read through the HTTP endpoint the UI uses.
    pub fn read_run(&mut self, dag: &str, run_id: &str) -> Result<DagRun> {
        self.driver(dag, run_id, true)
    }

    fn driver(&mut self, dag: &str, run_id: &str, read: bool) -> Result<DagRun> {
        let script = airflow_dir().join("run_dag.py");
        let major = match self.airflow {
            Airflow::V2 => "2",
            Airflow::V3 => "3",
        };
        let mut command = Command::new(python_of(self.airflow)?);
        command.arg(&script).args([
            "--major",
            major,
            "--port",
            &self.port.to_string(),
            "--home",
            &self.home.display().to_string(),
            "--dag",
            dag,
            "--run-id",
            run_id,
        ]);
        if read {
            command.arg("--read");
        }
        let out = command.output().context("run run_dag.py")?;
        if !out.status.success() {
            self.process.check_running()?;
            bail!(
                "run_dag.py failed ({}):\n{}\nairflow standalone's last lines:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.process.log_tail(40)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "run_dag.py printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for Standalone {
    /// Airflow stops its components on SIGINT; whatever is left of the group is killed.
    fn drop(&mut self) {
        let group = Pid::from_raw(self.process.pid() as i32);
        let _ = killpg(group, Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && killpg(group, None).is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = killpg(group, Signal::SIGKILL);
    }
}

fn environment(
    airflow: Airflow,
    bin: &Path,
    home: &Path,
    port: u16,
    minio: &Minio,
    remote_base: &str,
) -> Vec<(String, String)> {
    let env = |k: &str, v: String| (k.to_owned(), v);
    let credentials: BTreeMap<String, String> = minio.aws_env().into_iter().collect();
    let connection = serde_json::json!({
        "conn_type": "aws",
        "login": credentials["AWS_ACCESS_KEY_ID"],
        "password": credentials["AWS_SECRET_ACCESS_KEY"],
        "extra": {
            "endpoint_url": minio.endpoint(),
            "region_name": credentials["AWS_REGION"],
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        },
    });
    // standalone starts its components as `airflow …` from PATH.
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut envs = vec![
        env("PATH", path),
        env("AIRFLOW_HOME", home.display().to_string()),
        env(
            "AIRFLOW__CORE__DAGS_FOLDER",
            airflow_dir().join("dags").display().to_string(),
        ),
        env("AIRFLOW__CORE__LOAD_EXAMPLES", "False".into()),
        env("AIRFLOW__LOGGING__REMOTE_LOGGING", "True".into()),
        env(
            "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER",
            remote_base.into(),
        ),
        env("AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID", "minio".into()),
        env("AIRFLOW_CONN_MINIO", connection.to_string()),
        env(
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
            free_port().to_string(),
        ),
        env(
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT",
            free_port().to_string(),
        ),
        env("AWS_EC2_METADATA_DISABLED", "true".into()),
    ];
    match airflow {
        Airflow::V2 => envs.extend([
            env("AIRFLOW__WEBSERVER__WEB_SERVER_PORT", port.to_string()),
            env(
                "AIRFLOW__API__AUTH_BACKENDS",
                "airflow.api.auth.backend.basic_auth".into(),
            ),
        ]),
        Airflow::V3 => envs.extend([
            env("AIRFLOW__API__PORT", port.to_string()),
            env(
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                format!("http://127.0.0.1:{port}/execution/"),
            ),
            env(
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS",
                "True".into(),
            ),
        ]),
    }
    envs
}
