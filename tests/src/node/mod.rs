//! One real Kubernetes node on this machine: containerd with runc and a CNI
//! bridge, the kubelet and kube-proxy of the same v1.32 build as the control
//! plane, and locally built images. Everything listens on loopback or on
//! the bridge addresses made here; pods get no route off the machine.
//!
//! The node changes host state (sysctls, iptables, cgroups, mounts, links):
//! [`host`] records it before the start and [`RealNode::stop`] puts it back.
//! A run killed before that is undone when the next one starts.

mod cleanup;
mod configs;
mod dockerfile;
pub mod host;
pub mod images;
pub mod install;

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;

use crate::cluster::ControlPlane;
use crate::process::{free_port, Process};
use crate::servers::server_bin;
use crate::wait::wait_for;
use cleanup::{
    keep_logs, lock_machine, recover_previous_run, remove_node_dir, state_file, stop_node_processes,
};
use configs::Layout;
use host::HostState;
pub use images::Images;

/// The node's name, as it registers itself.
pub const NODE_NAME: &str = "localship-node";
/// The node's InternalIP, on a bridge of its own with no ports: the
/// apiserver, the kubelet and MinIO listen here, where pods reach them.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NODE_BRIDGE: &str = "lsnode0";
const POD_BRIDGE: &str = "lspods0";
const POD_CIDR: &str = "10.244.0.0/24";
const SERVICE_CIDR: &str = "10.96.0.0/16";

const START_TIMEOUT: Duration = Duration::from_secs(120);

pub struct RealNode {
    dir: PathBuf,
    plane: ControlPlane,
    images: Option<Images>,
    containerd: Option<Process>,
    kubelet: Option<Process>,
    kube_proxy: Option<Process>,
    host: Option<HostState>,
    _lock: nix::fcntl::Flock<File>,
}

impl RealNode {
    /// Starts a control plane and the node, and waits until the node is
    /// Ready, untainted and kube-proxy serves the `kubernetes` Service.
    pub async fn start() -> Result<Self> {
        let started = Instant::now();
        let dir = std::env::temp_dir().join("localship-node");
        let lock = lock_machine(&dir)?;
        recover_previous_run(&dir)?;
        std::fs::create_dir_all(&dir)?;
        let host = HostState::record(&[NODE_BRIDGE, POD_BRIDGE])?;
        host.save(&state_file(&dir))?;
        host.share_mounts()?;
        let mut node = Self {
            plane: {
                add_node_bridge()?;
                ControlPlane::start_for_real_nodes(NODE_IP).await?
            },
            dir,
            images: None,
            containerd: None,
            kubelet: None,
            kube_proxy: None,
            host: Some(host),
            _lock: lock,
        };
        node.start_parts().await?;
        eprintln!(
            "node: {NODE_NAME} Ready at {NODE_IP} in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(node)
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.plane
    }

    /// The images in the node's containerd.
    pub fn images(&self) -> &Images {
        self.images.as_ref().expect("a started node has its images")
    }

    /// The node's own scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn layout(&self) -> Layout<'_> {
        layout(&self.dir)
    }

    async fn start_parts(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        let layout = layout(&dir);
        let containerd_dir = self.dir.join("containerd");
        std::fs::create_dir_all(&containerd_dir)?;
        std::fs::create_dir_all(layout.cni_conf_dir())?;
        std::fs::write(
            layout.cni_conf_dir().join("10-localship-node.conflist"),
            configs::cni_conflist(&layout),
        )?;
        let config = containerd_dir.join("config.toml");
        std::fs::write(&config, configs::containerd_toml(&layout))?;
        let socket = layout.containerd_socket();
        let containerd = Process::spawn(
            "containerd",
            Path::new(&which("containerd")?),
            &[format!("--config={}", config.display())],
            &[],
            &self.dir,
        )?;
        self.containerd = Some(containerd);
        self.wait_containerd(&socket).await?;
        self.images = Some(images::build_and_import(&socket, &self.dir.join("images"))?);

        let ca = self.dir.join("ca.crt");
        std::fs::write(&ca, self.plane.ca_pem())?;
        let kubelet_config = self.dir.join("kubelet.yaml");
        let healthz = free_port();
        std::fs::write(
            &kubelet_config,
            configs::kubelet_yaml(&layout, &ca, free_port(), healthz),
        )?;
        let kubelet_kubeconfig = self.plane.kubeconfig_for(
            &format!("system:node:{NODE_NAME}"),
            Some("system:nodes"),
            "kubelet",
        )?;
        let kubelet_args = vec![
            format!("--config={}", kubelet_config.display()),
            format!("--kubeconfig={}", kubelet_kubeconfig.display()),
            format!("--root-dir={}", layout.kubelet_root().display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            "--v=1".into(),
        ];
        self.kubelet = Some(Process::spawn(
            "kubelet",
            &server_bin("kubelet")?,
            &kubelet_args,
            &[],
            &self.dir,
        )?);

        let proxy_kubeconfig =
            self.plane
                .kubeconfig_for("system:kube-proxy", None, "kube-proxy")?;
        let proxy_config = self.dir.join("kube-proxy.yaml");
        std::fs::write(
            &proxy_config,
            configs::kube_proxy_yaml(&layout, &proxy_kubeconfig, free_port(), free_port()),
        )?;
        self.kube_proxy = Some(Process::spawn(
            "kube-proxy",
            &server_bin("kube-proxy")?,
            &[format!("--config={}", proxy_config.display())],
            &[],
            &self.dir,
        )?);
        self.wait_ready().await?;
        self.wait_service_rules().await
    }

    async fn wait_containerd(&mut self, socket: &Path) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_parts()?;
            if socket.exists() && ctr(socket, &["version"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("containerd did not answer on {}", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let nodes = Api::<Node>::all(self.plane.client().await?);
        let result = wait_for(
            "the node to be Ready and untainted",
            START_TIMEOUT,
            || async {
                let Some(node) = nodes.get_opt(NODE_NAME).await? else {
                    return Ok(None);
                };
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let tainted = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| !t.is_empty());
                Ok((ready && !tainted).then_some(()))
            },
        )
        .await;
        result.map_err(|e| self.explain(e, "kubelet"))
    }

    /// kube-proxy has written the rules that carry pods to the apiserver.
    async fn wait_service_rules(&mut self) -> Result<()> {
        let result = wait_for(
            "kube-proxy's rules for the kubernetes Service",
            START_TIMEOUT,
            || async {
                let out = Command::new("iptables-save").args(["-t", "nat"]).output()?;
                let rules = String::from_utf8_lossy(&out.stdout);
                Ok(rules.contains("default/kubernetes:https").then_some(()))
            },
        )
        .await;
        result.map_err(|e| self.explain(e, "kube-proxy"))
    }

    fn explain(&mut self, e: anyhow::Error, part: &str) -> anyhow::Error {
        if let Err(dead) = self.check_parts() {
            return dead.context(e);
        }
        let tail = crate::process::log_tail(&self.dir.join(format!("{part}.log")), 40);
        anyhow::anyhow!("{e:#}\nlast lines of {part}.log:\n{tail}")
    }

    /// Fails with the log tail of any part of the node (or the control
    /// plane) that has died.
    pub fn check_parts(&mut self) -> Result<()> {
        for part in [
            &mut self.containerd,
            &mut self.kubelet,
            &mut self.kube_proxy,
        ]
        .into_iter()
        .flatten()
        {
            part.check_running()?;
        }
        self.plane.check_health()
    }

    /// `ctr` against the node's containerd, in the kubelet's namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        ctr(&self.layout().containerd_socket(), args)
    }

    /// The host pid of a running container of a pod, from its status and
    /// containerd's task list.
    pub async fn container_pid(&self, namespace: &str, pod: &str, container: &str) -> Result<u32> {
        let pods = Api::<Pod>::namespaced(self.plane.client().await?, namespace);
        let pod = pods.get(pod).await?;
        let id = pod
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.name == container)
            .and_then(|c| c.container_id)
            .context("container has no id yet")?;
        let id = id
            .strip_prefix("containerd://")
            .context("not a containerd container")?
            .to_string();
        let out = self.ctr(&["tasks", "ls"])?;
        let list = String::from_utf8_lossy(&out.stdout);
        list.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?, f.next()?, f.next()?))
            })
            .find(|(task, _, status)| *task == id && *status == "RUNNING")
            .and_then(|(_, pid, _)| pid.parse().ok())
            .with_context(|| format!("no running task {id}:\n{list}"))
    }

    /// Stops the node and puts the host back as it was.
    pub fn stop(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(host) = self.host.take() else {
            return Ok(());
        };
        for part in [&mut self.kube_proxy, &mut self.kubelet] {
            if let Some(mut p) = part.take() {
                p.stop(Duration::from_secs(10));
            }
        }
        keep_logs(&self.dir);
        stop_node_processes(&self.dir, self.containerd.take())?;
        host.restore(&self.dir)?;
        remove_node_dir(&self.dir)
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("node: teardown: {e:#}");
        }
    }
}

fn layout(dir: &Path) -> Layout<'_> {
    Layout {
        dir,
        node_name: NODE_NAME,
        node_ip: NODE_IP,
        pod_cidr: POD_CIDR,
        pod_bridge: POD_BRIDGE,
        service_cidr: SERVICE_CIDR,
        pause_image: images::PAUSE_IMAGE,
    }
}

fn add_node_bridge() -> Result<()> {
    let steps: [&[&str]; 3] = [
        &["link", "add", NODE_BRIDGE, "type", "bridge"],
        &["addr", "add", &format!("{NODE_IP}/32"), "dev", NODE_BRIDGE],
        &["link", "set", NODE_BRIDGE, "up"],
    ];
    for args in steps {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("run ip (apt-get install iproute2)")?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// `ctr` against the containerd at `socket`, in the kubelet's namespace.
fn ctr_command(socket: &Path) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(socket).args(["-n", "k8s.io"]);
    cmd
}

fn ctr(socket: &Path, args: &[&str]) -> Result<Output> {
    ctr_command(socket)
        .args(args)
        .output()
        .map_err(|e| missing_tool("ctr", e))
}

/// The Debian package that provides a tool the node uses.
fn package_of(tool: &str) -> &str {
    match tool {
        "containerd" | "ctr" => "containerd",
        "busybox" => "busybox-static",
        "cc" => "gcc",
        "ldd" => "libc-bin",
        "strip" => "binutils",
        other => other,
    }
}

/// Says which package to install when `tool` could not be started.
fn missing_tool(tool: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "{tool} is missing: `apt-get install {}` (`make servers` installs the node's packages)",
            package_of(tool)
        )
    } else {
        anyhow::Error::new(e).context(format!("run {tool}"))
    }
}

/// A Debian package's binary, with the package to install when it is missing.
pub fn which(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    Err(missing_tool(name, std::io::ErrorKind::NotFound.into()))
}
