//! A real Kubernetes control plane on loopback: etcd, kube-apiserver (client
//! certificates, service-account tokens, Node+RBAC authorization, the default
//! admission plugins), kube-controller-manager and kube-scheduler, plus two
//! registered Nodes. There is no kubelet: pods are scheduled but never run.
//! [`ControlPlane::start_for_real_nodes`] starts one for the kubelets of
//! [`crate::node`] instead: served on an address pods can reach, with no
//! registered nodes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

use crate::certs::{service_account_key, CertPair, Pki};
use crate::kubeconfig::write_cert_kubeconfig;
use crate::process::{free_port, Process};
use crate::scratch_dir;
use crate::servers::server_bin;
use crate::wait::wait_for;

/// The nodes every control plane registers.
pub const NODES: [&str; 2] = ["node-a", "node-b"];

/// Controllers the tests rely on; the node-lifecycle controller stays off
/// because no kubelet heartbeats and it would taint every node unreachable.
const CONTROLLERS: &str = "serviceaccount,serviceaccount-token,namespace,garbagecollector,\
persistentvolume-binder,pv-protection,pvc-protection,persistentvolume-expander,statefulset,\
replicaset,deployment,daemonset,root-ca-cert-publisher,clusterrole-aggregation";

/// What a real node needs on top: Services answered by kube-proxy, and a
/// node that goes NotReady when its kubelet stops heartbeating.
const REAL_NODE_CONTROLLERS: &str = "endpoint,endpointslice,nodelifecycle,podgc,ttl";

/// The ClusterIP of the `kubernetes` Service (first of the service range):
/// pods reach the apiserver there and check its certificate against it.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Where the nodes of a control plane come from.
#[derive(Debug, Clone, Copy)]
enum Nodes {
    /// [`NODES`], registered Ready by the harness; nothing runs pods.
    Registered,
    /// Kubelets register themselves; the apiserver serves on `address`.
    Real { address: Ipv4Addr },
}

pub struct ControlPlane {
    dir: PathBuf,
    server: String,
    admin_kubeconfig: PathBuf,
    pki: Pki,
    apiserver_args: Vec<String>,
    processes: Mutex<Vec<Process>>,
}

/// The control plane shared by the tests of this process, started on first use.
pub fn control_plane() -> Result<&'static ControlPlane> {
    static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            // Start-up blocks on async readiness checks; a thread of its own
            // keeps that legal when the caller is already inside a runtime.
            std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(ControlPlane::start(Nodes::Registered))
                    .map_err(|e| format!("{e:#}"))
            })
            .join()
            .unwrap_or_else(|_| Err("control-plane start-up panicked".into()))
        })
        .as_ref()
        .map_err(|e| anyhow!("the test control plane could not start: {e}"))
}

impl ControlPlane {
    /// A control plane of its own for real kubelets: the apiserver listens on
    /// `address` (a bridge address the node's pods reach) and publishes it
    /// as the `kubernetes` Service's endpoint, and reaches kubelets by their
    /// InternalIP (never through a DNS lookup of the node's name).
    pub async fn start_for_real_nodes(address: Ipv4Addr) -> Result<Self> {
        Self::start(Nodes::Real { address }).await
    }

    async fn start(nodes: Nodes) -> Result<Self> {
        let dir = scratch_dir("cluster")?;
        let pki = Pki::new()?;
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, &pki.ca.cert_pem)?;
        let address = match nodes {
            Nodes::Registered => Ipv4Addr::LOCALHOST,
            Nodes::Real { address } => address,
        };
        let serving = pki.server("kube-apiserver", &[address, KUBERNETES_SERVICE_IP])?;
        let (tls_cert, tls_key) = write_pair(&dir, "apiserver", &serving)?;
        let (sa_private, sa_public) = service_account_key()?;
        let sa_key = dir.join("service-account.key");
        let sa_pub = dir.join("service-account.pub");
        std::fs::write(&sa_key, sa_private)?;
        std::fs::write(&sa_pub, sa_public)?;

        let mut processes = Vec::new();
        let etcd_url = start_etcd(&dir, &mut processes)?;

        let port = free_port();
        let server = format!("https://{address}:{port}");
        let mut apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", tls_cert.display()),
            format!("--tls-private-key-file={}", tls_key.display()),
            format!("--client-ca-file={}", ca_path.display()),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ];
        match nodes {
            // The `kubernetes` Service cannot point at a loopback address.
            Nodes::Registered => apiserver_args.push("--endpoint-reconciler-type=none".into()),
            Nodes::Real { .. } => {
                let kubelet_client =
                    pki.client("kube-apiserver-kubelet-client", Some("system:masters"))?;
                let (cert, key) = write_pair(&dir, "kubelet-client", &kubelet_client)?;
                apiserver_args.extend([
                    // `kubectl logs`/`exec` would otherwise resolve the node's
                    // name through the machine's resolver: traffic off the machine.
                    "--kubelet-preferred-address-types=InternalIP".into(),
                    format!("--kubelet-client-certificate={}", cert.display()),
                    format!("--kubelet-client-key={}", key.display()),
                ]);
            }
        }
        processes.push(spawn_apiserver(&apiserver_args, &dir)?);

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        let admin = pki.client("localship-admin", Some("system:masters"))?;
        write_cert_kubeconfig(
            &admin_kubeconfig,
            &server,
            &pki.ca.cert_pem,
            "localship-admin",
            &admin,
        )?;
        let plane = Self {
            dir,
            server,
            admin_kubeconfig,
            pki,
            apiserver_args,
            processes: Mutex::new(processes),
        };
        plane.wait_apiserver_ready().await?;
        plane.start_controllers(&ca_path, &sa_key, nodes)?;
        if let Nodes::Registered = nodes {
            plane.register_nodes().await?;
        }
        // The serviceaccount controller making `default` proves the
        // controller-manager is up and authorised.
        plane.wait_default_service_account("default").await?;
        Ok(plane)
    }

    fn start_controllers(&self, ca_path: &Path, sa_key: &Path, nodes: Nodes) -> Result<()> {
        let cm =
            self.kubeconfig_for("system:kube-controller-manager", None, "controller-manager")?;
        let controllers = match nodes {
            Nodes::Registered => CONTROLLERS.to_string(),
            Nodes::Real { .. } => format!("{CONTROLLERS},{REAL_NODE_CONTROLLERS}"),
        };
        let cm_args = vec![
            format!("--kubeconfig={}", cm.display()),
            format!("--authentication-kubeconfig={}", cm.display()),
            format!("--authorization-kubeconfig={}", cm.display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()),
            "--use-service-account-credentials=true".into(),
            format!("--service-account-private-key-file={}", sa_key.display()),
            format!("--root-ca-file={}", ca_path.display()),
            format!("--controllers={controllers}"),
            "--pvclaimbinder-sync-period=1s".into(),
            "--profiling=false".into(),
        ];
        let scheduler = self.kubeconfig_for("system:kube-scheduler", None, "scheduler")?;
        let scheduler_args = vec![
            format!("--kubeconfig={}", scheduler.display()),
            format!("--authentication-kubeconfig={}", scheduler.display()),
            format!("--authorization-kubeconfig={}", scheduler.display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()),
            "--profiling=false".into(),
        ];
        let mut processes = self.processes.lock().unwrap();
        processes.push(Process::spawn(
            "kube-controller-manager",
            &server_bin("kube-controller-manager")?,
            &cm_args,
            &[],
            &self.dir,
        )?);
        processes.push(Process::spawn(
            "kube-scheduler",
            &server_bin("kube-scheduler")?,
            &scheduler_args,
            &[],
            &self.dir,
        )?);
        Ok(())
    }

    /// `https://<address>:<port>` of the apiserver (127.0.0.1 unless it
    /// serves real nodes).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Kubeconfig of a `system:masters` user.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// PEM of the cluster CA.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca.cert_pem
    }

    /// A client acting as cluster admin, bound to the caller's runtime.
    pub async fn client(&self) -> Result<Client> {
        client_from(&self.admin_kubeconfig).await
    }

    /// Writes a kubeconfig for a client-certificate identity.
    pub fn kubeconfig_for(&self, user: &str, group: Option<&str>, file: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{file}.kubeconfig"));
        let cert = self.pki.client(user, group)?;
        write_cert_kubeconfig(&path, &self.server, &self.pki.ca.cert_pem, user, &cert)?;
        Ok(path)
    }

    /// Runs the real kubectl as admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        let out = std::process::Command::new(server_bin("kubectl")?)
            .args(args)
            .env("KUBECONFIG", &self.admin_kubeconfig)
            .output()?;
        Ok(out)
    }

    /// A fresh namespace whose `default` ServiceAccount exists, so pods can
    /// be created in it at once.
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        let client = self.client().await?;
        let suffix: String = format!("{:08x}", rand_u32());
        let name = format!("{prefix}-{suffix}");
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": { "name": name }
        }))?;
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("create namespace {name}"))?;
        self.wait_default_service_account(&name).await?;
        Ok(name)
    }

    /// Fails with the tails of the server logs if any server has died.
    pub fn check_health(&self) -> Result<()> {
        for p in self.processes.lock().unwrap().iter_mut() {
            p.check_running()?;
        }
        Ok(())
    }

    /// Log file of one of the control-plane servers, for failure messages.
    pub fn log_path(&self, server: &str) -> PathBuf {
        self.dir.join(format!("{server}.log"))
    }

    /// Stops the kube-apiserver (SIGTERM, as a restart would; SIGKILL after
    /// 10 s). etcd, the controllers and every client stay up and retry.
    ///
    /// The control plane is shared by every test of a binary, so only a
    /// binary that runs one test at a time (the fault suite) may call this;
    /// the e2e tests run in parallel and must not.
    pub fn stop_apiserver(&self) {
        let mut processes = self.processes.lock().unwrap();
        if let Some(i) = processes.iter().position(|p| p.name() == "kube-apiserver") {
            let mut apiserver = processes.remove(i);
            apiserver.stop(Duration::from_secs(10));
        }
    }

    /// Starts the kube-apiserver again on the same port, with the same etcd,
    /// certificates and flags, and waits for /readyz. See
    /// [`stop_apiserver`](Self::stop_apiserver) for who may call it.
    pub async fn start_apiserver(&self) -> Result<()> {
        {
            let mut processes = self.processes.lock().unwrap();
            if processes.iter().any(|p| p.name() == "kube-apiserver") {
                bail!("kube-apiserver is already running");
            }
            processes.push(spawn_apiserver(&self.apiserver_args, &self.dir)?);
        }
        self.wait_apiserver_ready().await
    }

    async fn wait_apiserver_ready(&self) -> Result<()> {
        let result = wait_for("kube-apiserver /readyz", START_TIMEOUT, || async {
            self.check_health()?;
            let client = self.client().await?;
            let req = http::Request::get("/readyz").body(Vec::new())?;
            Ok(client.request_text(req).await.ok().filter(|t| t == "ok"))
        })
        .await;
        result.map_err(|e| self.with_log_tail(e, "kube-apiserver"))?;
        Ok(())
    }

    async fn wait_default_service_account(&self, namespace: &str) -> Result<()> {
        let client = self.client().await?;
        let api = Api::<ServiceAccount>::namespaced(client, namespace);
        let what = format!("ServiceAccount {namespace}/default");
        let result = wait_for(&what, START_TIMEOUT, || async {
            self.check_health()?;
            Ok(api.get_opt("default").await?)
        })
        .await;
        result.map_err(|e| self.with_log_tail(e, "kube-controller-manager"))?;
        Ok(())
    }

    async fn register_nodes(&self) -> Result<()> {
        for name in NODES {
            self.register_node(name, json!({}), json!(null)).await?;
        }
        Ok(())
    }

    /// Registers `<owner>-node`, tainted so only `owner`'s pods go there, and returns its
    /// name: a node of one test's own, whose agents see no other test's volumes.
    pub async fn register_own_node(&self, owner: &str) -> Result<String> {
        let node = format!("{owner}-node");
        let taint = json!([{ "key": crate::claims::TEST_NODE_TAINT, "value": owner, "effect": "NoSchedule" }]);
        self.register_node(&node, json!({}), taint).await?;
        Ok(node)
    }

    /// Registers a Ready Node the scheduler can place pods on, with extra
    /// `labels` (a JSON object) and `taints` (a JSON list, or null for none).
    pub async fn register_node(
        &self,
        name: &str,
        labels: serde_json::Value,
        taints: serde_json::Value,
    ) -> Result<()> {
        let client = self.client().await?;
        let nodes = Api::<Node>::all(client);
        {
            let mut all_labels = json!({
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            });
            if let (Some(all), Some(extra)) = (all_labels.as_object_mut(), labels.as_object()) {
                all.extend(extra.clone());
            }
            let node: Node = serde_json::from_value(json!({
                "metadata": { "name": name, "labels": all_labels }
            }))?;
            nodes.create(&PostParams::default(), &node).await?;
            let now = chrono_now();
            let resources = json!({
                "cpu": "8", "memory": "32Gi", "pods": "1000", "ephemeral-storage": "100Gi"
            });
            let status = json!({
                "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "conditions": [{
                        "type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "registered by the localship test harness",
                        "lastHeartbeatTime": now, "lastTransitionTime": now,
                    }],
                    "addresses": [{ "type": "Hostname", "address": name }],
                }
            });
            nodes
                .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
                .await?;
            // TaintNodesByCondition admission marks new nodes not-ready; the
            // node-lifecycle controller would clear that once Ready, but it is off.
            nodes
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": { "taints": taints } })),
                )
                .await?;
        }
        Ok(())
    }

    fn with_log_tail(&self, e: anyhow::Error, server: &str) -> anyhow::Error {
        let tail = crate::process::log_tail(&self.log_path(server), 30);
        anyhow!("{e:#}\nlast lines of {server}.log:\n{tail}")
    }
}

fn spawn_apiserver(args: &[String], dir: &Path) -> Result<Process> {
    Process::spawn(
        "kube-apiserver",
        &server_bin("kube-apiserver")?,
        args,
        &[],
        dir,
    )
}

fn start_etcd(dir: &Path, processes: &mut Vec<Process>) -> Result<String> {
    let client_port = free_port();
    let peer_port = free_port();
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let args = vec![
        "--name=default".into(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=default={peer_url}"),
        // Test data is thrown away; fsync only slows the suite.
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ];
    let mut etcd = Process::spawn("etcd", &server_bin("etcd")?, &args, &[], dir)?;
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", client_port)).is_err() {
        etcd.check_running()?;
        if std::time::Instant::now() > deadline {
            bail!(
                "etcd did not listen on {client_url}:\n{}",
                etcd.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    processes.push(etcd);
    Ok(client_url)
}

fn write_pair(dir: &Path, name: &str, pair: &CertPair) -> Result<(PathBuf, PathBuf)> {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pair.cert_pem)?;
    std::fs::write(&key, &pair.key_pem)?;
    Ok((cert, key))
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn chrono_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}
