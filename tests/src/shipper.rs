//! `localship-logshipper` run as it runs on a node: a daemon shipping `--source` (or, with
//! `--node-name`, this node's volumes) to a MinIO, `--once` runs, and the faults a node sees:
//! kill -9, restart on the same ledger, memory read from /proc.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agents::http_get;
use crate::cluster::ControlPlane;
use crate::minio::Minio;
use crate::process::{free_port, Process};
use crate::servers::localship_bin;
use crate::wait::wait_for;

/// One shipper's command line, ledger and metrics port; started, killed and restarted at will,
/// always on the same ledger.
pub struct ShipperAgent {
    name: String,
    dir: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    port: u16,
    process: Option<Process>,
}

impl ShipperAgent {
    /// A standalone shipper of `source` to `dest` (e.g. `s3://airflow/logs`) on `minio`, with
    /// `--settle=1s` and `--airflow-remote-logging=off` unless `extra` sets them. Not started
    /// yet.
    pub fn standalone(minio: &Minio, source: &Path, dest: &str, extra: &[&str]) -> Result<Self> {
        let mut args = vec![format!("--source={}", source.display())];
        args.extend(extra.iter().map(|s| s.to_string()));
        // The only writer unless a test says otherwise: these tests read the log's own key.
        if !args
            .iter()
            .any(|a| a.starts_with("--airflow-remote-logging"))
        {
            args.push("--airflow-remote-logging=off".into());
        }
        Self::new("logshipper", minio, dest, args)
    }

    /// A Kubernetes-mode shipper for `node`, shipping its opted-in volumes to `dest` on
    /// `minio`, as the shipper's DaemonSet pod on `node` would act (see
    /// [`crate::authority`]), beside Airflow's own uploads as deployed. Not started yet.
    pub async fn kubernetes(
        cp: &ControlPlane,
        node: &str,
        minio: &Minio,
        dest: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec![format!("--node-name={node}")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let shipper = Self::new(&format!("shipper-{node}"), minio, dest, args)?;
        let kubeconfig =
            crate::authority::node_kubeconfig(cp, crate::authority::SHIPPER, node).await?;
        Ok(shipper.env("KUBECONFIG", &kubeconfig.display().to_string()))
    }

    fn new(name: &str, minio: &Minio, dest: &str, mut args: Vec<String>) -> Result<Self> {
        let dir = crate::scratch_dir(name)?;
        args.extend([
            format!("--dest={dest}"),
            format!("--s3-endpoint={}", minio.endpoint()),
            "--s3-path-style".into(),
            format!("--ledger={}", dir.join("ledger.redb").display()),
        ]);
        if !args.iter().any(|a| a.starts_with("--settle")) {
            args.push("--settle=1s".into());
        }
        let mut envs = minio.aws_env();
        envs.push(("RUST_LOG".into(), "info".into()));
        Ok(Self {
            name: name.to_string(),
            dir,
            args,
            envs,
            port: free_port(),
            process: None,
        })
    }

    /// Sets (or replaces) an environment variable of later starts.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Points later starts at another S3 endpoint.
    pub fn endpoint(mut self, endpoint: &str) -> Self {
        self.args.retain(|a| !a.starts_with("--s3-endpoint="));
        self.args.push(format!("--s3-endpoint={endpoint}"));
        self
    }

    /// Keeps the ledger at `path` in later starts, e.g. on a disk a test fills up.
    pub fn ledger(mut self, path: &Path) -> Self {
        self.args.retain(|a| !a.starts_with("--ledger="));
        self.args.push(format!("--ledger={}", path.display()));
        self
    }

    /// A scratch directory of this shipper's: its ledger and log live here.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon's metrics port (`/metrics`, `/livez`, `/healthz`, `/readyz`).
    pub fn port(&self) -> u16 {
        self.port
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// Starts the daemon (again, on the same ledger) without waiting for anything.
    pub fn spawn(&mut self) -> Result<()> {
        self.kill();
        let mut args = self.args.clone();
        args.push(format!("--metrics-addr=127.0.0.1:{}", self.port));
        let bin = localship_bin("localship-logshipper")?;
        self.process = Some(Process::spawn(
            &self.name, &bin, &args, &self.envs, &self.dir,
        )?);
        Ok(())
    }

    /// Starts the daemon and waits until it is alive (/livez), ready or not.
    pub async fn start_alive(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_endpoint("/livez", "alive").await
    }

    /// Starts the daemon (again, on the same ledger) and waits for /readyz.
    pub async fn start(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_endpoint("/readyz", "ready").await
    }

    /// Alias of [`start`](Self::start) that reads better after a kill.
    pub async fn restart(&mut self) -> Result<()> {
        self.start().await
    }

    async fn wait_endpoint(&mut self, path: &str, what: &str) -> Result<()> {
        let port = self.port;
        let waited = wait_for(
            &format!("{} to be {what}", self.name),
            Duration::from_secs(30),
            || async move {
                Ok(http_get(port, path)
                    .ok()
                    .filter(|(code, _)| *code == 200)
                    .map(|_| ()))
            },
        )
        .await;
        if let Err(e) = waited {
            self.check_running()?;
            bail!("{e:#}\nshipper log tail:\n{}", self.log_tail(30));
        }
        Ok(())
    }

    /// One `--once` run with `extra` flags, which must exit 0.
    pub fn once(&self, extra: &[&str]) -> Result<()> {
        let mut p = self.spawn_once(extra)?;
        let status = p.wait(Duration::from_secs(120))?;
        anyhow::ensure!(
            status.success(),
            "--once failed ({status}):\n{}",
            p.log_tail(30)
        );
        Ok(())
    }

    /// Starts a `--once` run and returns it running.
    pub fn spawn_once(&self, extra: &[&str]) -> Result<Process> {
        let mut args = self.args.clone();
        args.push("--once".into());
        args.extend(extra.iter().map(|s| s.to_string()));
        Process::spawn(
            &self.name,
            &localship_bin("localship-logshipper")?,
            &args,
            &self.envs,
            &self.dir,
        )
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut p) = self.process.take() {
            p.stop(grace);
        }
    }

    /// Fails with the log tail if the daemon is not running.
    pub fn check_running(&mut self) -> Result<()> {
        self.process
            .as_mut()
            .context("the shipper was not started")?
            .check_running()
    }

    /// (status, body) of a GET on the daemon's port.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.port, path)
    }

    /// The daemon's /metrics text.
    pub fn metrics(&self) -> Result<String> {
        Ok(self.get("/metrics")?.1)
    }

    /// The value of one series, e.g. `localship_logshipper_backlog_files` or
    /// `localship_logshipper_skipped_total{reason="symlink"}`; `None` if not exported.
    pub fn metric(&self, series: &str) -> Result<Option<f64>> {
        Ok(metric_value(&self.metrics()?, series))
    }

    /// Waits until /metrics shows `line`.
    pub async fn wait_metric(&self, line: &str) -> Result<()> {
        wait_for(line, Duration::from_secs(30), || async {
            Ok(self.metrics()?.contains(line).then_some(()))
        })
        .await
        .with_context(|| format!("shipper log tail:\n{}", self.log_tail(30)))
    }

    /// Resident memory of the running daemon, in bytes, from /proc/<pid>/status.
    pub fn rss_bytes(&self) -> Result<u64> {
        let pid = self.pid().context("the shipper is not running")?;
        Ok(crate::bench::proc_kib(pid, "VmRSS")? * 1024)
    }

    /// The last `lines` lines of the shipper's log (every start appends to one file).
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.log_path(), lines)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// The value of `series` in Prometheus text: the line that is exactly `series value`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A task-log folder, as Airflow lays them out, whose logs' object keys pass S3's limit of
/// 1,024 bytes (five names of 240–250 bytes; each within the 255 a filesystem allows).
pub fn folder_over_the_key_limit() -> String {
    format!(
        "dag_id={}/run_id={}/task_id={}/{}/{}",
        "a".repeat(240),
        "b".repeat(240),
        "c".repeat(240),
        "d".repeat(250),
        "e".repeat(250)
    )
}
