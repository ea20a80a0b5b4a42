//! Node-scoped authority as `deploy/` installs it: the agents' ServiceAccounts, their RBAC
//! and the admission policies; and pod-bound tokens that name a node, so a test agent acts
//! with exactly what a DaemonSet pod on that node would have.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use serde::Deserialize;

use crate::cluster::ControlPlane;
use crate::kubeconfig::write_token_kubeconfig;

pub const NAMESPACE: &str = "localship";
pub const PROVISIONER: &str = "localship";
pub const SHIPPER: &str = "localship-logshipper";
pub const NODE_CLEANUP: &str = "localship-node-cleanup";

/// Requested lifetime of test tokens: longer than any suite runs.
const TOKEN_SECONDS: i64 = 6 * 3600;

fn repo_file(relative: &str) -> Result<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

/// The identities and policies `deploy/` installs (with the shipper's from the s3-shipping
/// component), with the policy's base paths set to `bases`; no workloads.
pub fn manifests(bases: &str) -> Result<String> {
    let mut docs = Vec::new();
    for file in [
        "deploy/base/namespace.yaml",
        "deploy/base/rbac.yaml",
        "deploy/base/policy.yaml",
        "deploy/components/s3-shipping/logshipper.yaml",
    ] {
        for doc in serde_yaml::Deserializer::from_str(&repo_file(file)?) {
            let value = serde_yaml::Value::deserialize(doc)?;
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            if !matches!(kind.as_str(), "DaemonSet" | "Deployment" | "") {
                docs.push(serde_yaml::to_string(&value)?);
            }
        }
    }
    with_bases(&docs.join("---\n"), bases)
}

/// `yaml` with every admission policy's `bases` (the directories agents may make
/// volumes under) set to `bases` alone.
pub fn with_bases(yaml: &str, bases: &str) -> Result<String> {
    let mut docs = Vec::new();
    let mut set = false;
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let mut value = serde_yaml::Value::deserialize(doc)?;
        if value["kind"] == "ValidatingAdmissionPolicy" {
            if let Some(variables) = value["spec"]["variables"].as_sequence_mut() {
                for variable in variables.iter_mut().filter(|v| v["name"] == "bases") {
                    variable["expression"] = serde_json::json!([bases]).to_string().into();
                    set = true;
                }
            }
        }
        if !value.is_null() {
            docs.push(serde_yaml::to_string(&value)?);
        }
    }
    anyhow::ensure!(set, "no policy with base paths in the manifests");
    Ok(docs.join("---\n"))
}

/// What [`install`] allows agents to make volumes under: every scratch directory.
pub fn allowed_bases() -> Result<String> {
    let scratch = crate::scratch_dir("authority")?;
    let root = scratch.parent().context("scratch root")?;
    Ok(root.display().to_string())
}

static INSTALLED: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// (apiserver, ServiceAccount, node) → kubeconfig.
type Issued = HashMap<(String, String, String), PathBuf>;
static KUBECONFIGS: Mutex<Option<Issued>> = Mutex::new(None);

/// Installs the identities and policies into `cp` once.
pub async fn install(cp: &ControlPlane) -> Result<()> {
    if INSTALLED.lock().unwrap().contains(&cp.server().to_string()) {
        return Ok(());
    }
    let client = cp.client().await?;
    crate::apply_yaml(&client, None, &manifests(&allowed_bases()?)?, false).await?;
    INSTALLED.lock().unwrap().push(cp.server().to_string());
    enforced(cp).await
}

/// Waits until the apiserver enforces the policies it was just given (it loads them
/// asynchronously): a dry-run PV from a token naming no node is refused.
async fn enforced(cp: &ControlPlane) -> Result<()> {
    let request: TokenRequest =
        serde_json::from_value(serde_json::json!({ "spec": { "expirationSeconds": 600 } }))?;
    let probe = token_kubeconfig(cp, NAMESPACE, PROVISIONER, "policy-probe", request).await?;
    let client = crate::cluster::client_from(&probe).await?;
    let pv: k8s_openapi::api::core::v1::PersistentVolume =
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "localship-policy-probe" },
            "spec": { "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                      "hostPath": { "path": "/" } }
        }))?;
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let pvs = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client);
    crate::wait_for(
        "the admission policies to be enforced",
        Duration::from_secs(60),
        || async {
            let refused =
                matches!(pvs.create(&params, &pv).await, Err(kube::Error::Api(s)) if s.code == 403);
            Ok(refused.then_some(()))
        },
    )
    .await
}

/// A kubeconfig for ServiceAccount `account` with a token bound to a pod on `node`, as the
/// kubelet gives the DaemonSet's pod there: the apiserver adds the node's name to the
/// request's user, and the policies scope the agent to it. Cached per node.
pub async fn node_kubeconfig(cp: &ControlPlane, account: &str, node: &str) -> Result<PathBuf> {
    install(cp).await?;
    node_kubeconfig_in(cp, NAMESPACE, account, node).await
}

/// Like [`node_kubeconfig`], for ServiceAccount `account` of namespace `namespace`, which
/// the caller installed.
pub async fn node_kubeconfig_in(
    cp: &ControlPlane,
    namespace: &str,
    account: &str,
    node: &str,
) -> Result<PathBuf> {
    let key = (
        cp.server().to_string(),
        format!("{namespace}/{account}"),
        node.to_string(),
    );
    if let Some(path) = KUBECONFIGS
        .lock()
        .unwrap()
        .get_or_insert_default()
        .get(&key)
    {
        return Ok(path.clone());
    }
    let client = cp.client().await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "generateName": format!("{account}-{node}-") },
        "spec": {
            "nodeName": node,
            "serviceAccountName": account,
            "containers": [{ "name": "agent", "image": "localhost/pause:3.10" }]
        }
    }))?;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create a pod of {account} on {node}"))?;
    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "spec": {
            "expirationSeconds": TOKEN_SECONDS,
            "boundObjectRef": { "apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.uid() }
        }
    }))?;
    let path = token_kubeconfig(
        cp,
        namespace,
        account,
        &format!("{account}-{node}"),
        request,
    )
    .await?;
    KUBECONFIGS
        .lock()
        .unwrap()
        .get_or_insert_default()
        .insert(key, path.clone());
    Ok(path)
}

/// A kubeconfig for `account` with a token bound to no pod: it names no node.
pub async fn unbound_kubeconfig(cp: &ControlPlane, account: &str) -> Result<PathBuf> {
    install(cp).await?;
    let request: TokenRequest = serde_json::from_value(
        serde_json::json!({ "spec": { "expirationSeconds": TOKEN_SECONDS } }),
    )?;
    token_kubeconfig(
        cp,
        NAMESPACE,
        account,
        &format!("{account}-unbound"),
        request,
    )
    .await
}

async fn token_kubeconfig(
    cp: &ControlPlane,
    namespace: &str,
    account: &str,
    name: &str,
    request: TokenRequest,
) -> Result<PathBuf> {
    let client = cp.client().await?;
    let token: TokenRequest = Api::<ServiceAccount>::namespaced(client, namespace)
        .create_subresource("token", account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("issue a token for {account}"))?;
    let token = token.status.context("no token issued")?.token;
    let path = crate::scratch_dir("tokens")?.join(format!("{name}.kubeconfig"));
    write_token_kubeconfig(&path, cp.server(), cp.ca_pem(), name, &token)?;
    Ok(path)
}
