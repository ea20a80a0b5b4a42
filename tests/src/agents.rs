//! localship's own release binaries run as they run on a node: one
//! provisioner agent per (fake) node, talking to the harness's apiserver.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cluster::ControlPlane;
use crate::process::{free_port, Process};
use crate::servers::localship_bin;
use crate::wait::wait_for;

/// One `localship-provisioner` serving `node`.
pub struct ProvisionerAgent {
    pub node: String,
    dir: PathBuf,
    kubeconfig: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    port: u16,
    process: Option<Process>,
}

impl ProvisionerAgent {
    /// Starts an agent for `node` that answers to `provisioner` with
    /// `extra` flags appended, and waits until it reports ready. It acts as
    /// the DaemonSet's pod on `node` would: its ServiceAccount, with a token
    /// bound to a pod there, under deploy/'s admission policies.
    pub async fn start(
        cp: &ControlPlane,
        node: &str,
        provisioner: &str,
        extra: &[String],
    ) -> Result<Self> {
        let kubeconfig =
            crate::authority::node_kubeconfig(cp, crate::authority::PROVISIONER, node).await?;
        Self::start_as(cp, node, provisioner, extra, &kubeconfig).await
    }

    /// Like [`start`](Self::start), with another identity's kubeconfig.
    pub async fn start_as(
        cp: &ControlPlane,
        node: &str,
        provisioner: &str,
        extra: &[String],
        kubeconfig: &Path,
    ) -> Result<Self> {
        let _ = cp;
        let bin = localship_bin("localship-provisioner")?;
        let agent = Self::launch(node, provisioner, extra, kubeconfig, &bin)?;
        agent.wait_ready().await?;
        Ok(agent)
    }

    /// An agent running `bin` (another build of it, for a before/after bench),
    /// started without waiting until it is ready: see [`is_ready`](Self::is_ready).
    pub fn launch(
        node: &str,
        provisioner: &str,
        extra: &[String],
        kubeconfig: &Path,
        bin: &Path,
    ) -> Result<Self> {
        let dir = crate::scratch_dir(&format!("agent-{node}"))?;
        let port = free_port();
        let mut args = vec![
            format!("--node-name={node}"),
            format!("--provisioner-name={provisioner}"),
            format!("--listen=127.0.0.1:{port}"),
        ];
        if !extra
            .iter()
            .any(|a| a.starts_with("--config") || a.starts_with("--base-path"))
        {
            args.push(format!("--base-path={}", dir.join("base").display()));
        }
        args.extend(extra.iter().cloned());
        let mut agent = Self {
            node: node.to_string(),
            dir,
            kubeconfig: kubeconfig.to_path_buf(),
            bin: bin.to_path_buf(),
            args,
            port,
            process: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// The base path used when no --config/--base-path was passed.
    pub fn base_path(&self) -> PathBuf {
        self.dir.join("base")
    }

    /// A scratch directory of this agent's, for configs and extra base paths.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Fails with the log tail if the agent has exited or is not started.
    pub fn check_running(&mut self) -> Result<()> {
        match self.process.as_mut() {
            Some(p) => p.check_running(),
            None => anyhow::bail!("provisioner on {} is not running", self.node),
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Whether /readyz answers 200.
    pub fn is_ready(&self) -> bool {
        http_get(self.port, "/readyz").is_ok_and(|(code, _)| code == 200)
    }

    /// Starts the agent (again) and waits for /readyz.
    pub async fn restart(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> Result<()> {
        let log = self.dir.join(format!("provisioner-{}.log", self.node));
        wait_for(
            &format!("provisioner on {} to be ready", self.node),
            Duration::from_secs(30),
            || async { Ok(self.is_ready().then_some(())) },
        )
        .await
        .with_context(|| format!("agent log tail:\n{}", crate::process::log_tail(&log, 30)))
    }

    /// Starts the agent (again), killing a running one first.
    fn spawn(&mut self) -> Result<()> {
        self.kill();
        let envs = vec![
            (
                "KUBECONFIG".to_string(),
                self.kubeconfig.display().to_string(),
            ),
            ("RUST_LOG".to_string(), "info".to_string()),
        ];
        let process = Process::spawn(
            &format!("provisioner-{}", self.node),
            &self.bin,
            &self.args,
            &envs,
            &self.dir,
        )?;
        self.process = Some(process);
        Ok(())
    }

    /// The agent's /metrics text.
    pub fn metrics(&self) -> Result<String> {
        Ok(http_get(self.port, "/metrics")?.1)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(
            &self.dir.join(format!("provisioner-{}.log", self.node)),
            lines,
        )
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1: (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_get_at(std::net::Ipv4Addr::LOCALHOST, port, path)
}

/// A plain HTTP/1.0 GET on `address`: (status, body).
pub fn http_get_at(address: std::net::Ipv4Addr, port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect((address, port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}
