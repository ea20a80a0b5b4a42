//! Shared steps of the end-to-end tests: classes, claims with a pod that
//! uses them, and waits on the results.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;
use localship_tests::kubeconfig::write_token_kubeconfig;
use localship_tests::{apply_yaml, wait_for, ControlPlane};

pub const BIND_TIMEOUT: Duration = Duration::from_secs(90);

/// Held by tests that make a default StorageClass: with two defaults the
/// apiserver picks the newest, so they take turns.
pub static DEFAULT_CLASS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A provisioner name of this test's own, so agents of tests running at the
/// same time never act on each other's claims.
pub fn provisioner_name(ns: &str) -> String {
    format!("{ns}.test.localship.io/local-path")
}

/// A WaitForFirstConsumer StorageClass for `provisioner`.
pub async fn storage_class(
    client: &Client,
    name: &str,
    provisioner: &str,
    reclaim: &str,
    parameters: &str,
) -> Result<()> {
    let yaml = format!(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{ name: {name} }}
provisioner: {provisioner}
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: {reclaim}
parameters: {{ {parameters} }}
"#
    );
    apply_yaml(client, None, &yaml, false).await?;
    Ok(())
}

/// A claim and a pod that mounts it, optionally pinned to `node`.
pub async fn claim_with_pod(
    client: &Client,
    ns: &str,
    claim: &str,
    class: Option<&str>,
    size: &str,
    node: Option<&str>,
) -> Result<()> {
    let class_line = class
        .map(|c| format!("storageClassName: {c}"))
        .unwrap_or_default();
    let selector = node
        .map(|n| format!("nodeSelector: {{ kubernetes.io/hostname: {n} }}"))
        .unwrap_or_default();
    let pod = pod_name(claim);
    let yaml = format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{ name: {claim} }}
spec:
  {class_line}
  accessModes: [ReadWriteOnce]
  resources: {{ requests: {{ storage: {size} }} }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: {pod} }}
spec:
  {selector}
  containers: [{{ name: main, image: busybox }}]
  volumes: [{{ name: data, persistentVolumeClaim: {{ claimName: {claim} }} }}]
"#
    );
    apply_yaml(client, Some(ns), &yaml, false).await?;
    Ok(())
}

/// Pod names are limited to 63 characters in places; claims may be longer.
pub fn pod_name(claim: &str) -> String {
    let mut name: String = format!("use-{claim}").chars().take(60).collect();
    while name.ends_with('-') {
        name.pop();
    }
    name
}

/// Waits for the claim to be Bound and returns its PV.
pub async fn wait_bound(client: &Client, ns: &str, claim: &str) -> Result<PersistentVolume> {
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    let volume = wait_for(
        &format!("claim {ns}/{claim} to be Bound"),
        BIND_TIMEOUT,
        || async {
            let c = claims.get(claim).await?;
            let phase = c.status.as_ref().and_then(|s| s.phase.clone());
            let volume = c.spec.as_ref().and_then(|s| s.volume_name.clone());
            Ok(match (phase.as_deref(), volume) {
                (Some("Bound"), Some(v)) => Some(v),
                _ => None,
            })
        },
    )
    .await?;
    Ok(Api::<PersistentVolume>::all(client.clone())
        .get(&volume)
        .await?)
}

/// The node a PV is pinned to by its required node affinity.
pub fn affinity_node(pv: &PersistentVolume) -> Result<String> {
    let terms = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .context("PV has no required node affinity")?;
    let expr = terms.node_selector_terms[0]
        .match_expressions
        .as_ref()
        .and_then(|e| e.first())
        .context("PV affinity has no expression")?;
    if expr.key != "kubernetes.io/hostname" || expr.operator != "In" {
        bail!("unexpected affinity {expr:?}");
    }
    Ok(expr.values.clone().unwrap_or_default().join(","))
}

/// The host path a hostPath or local PV points at.
pub fn host_path(pv: &PersistentVolume) -> String {
    let spec = pv.spec.as_ref().unwrap();
    spec.host_path
        .as_ref()
        .map(|h| h.path.clone())
        .or_else(|| spec.local.as_ref().map(|l| l.path.clone()))
        .unwrap_or_default()
}

/// Reasons of the Events recorded for the claim (both Event APIs show up
/// as core/v1 Events).
pub async fn claim_events(client: &Client, ns: &str, claim: &str) -> Result<Vec<(String, String)>> {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(events
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(claim))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect())
}

/// Deletes the pod (at once: there is no kubelet to wait for) and the claim.
pub async fn delete_claim_and_pod(client: &Client, ns: &str, claim: &str) -> Result<()> {
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .delete(&pod_name(claim), &now)
        .await?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .delete(claim, &DeleteParams::default())
        .await?;
    Ok(())
}

/// Waits until the PV is gone from the API.
pub async fn wait_pv_gone(client: &Client, name: &str) -> Result<()> {
    let pvs = Api::<PersistentVolume>::all(client.clone());
    wait_for(
        &format!("PV {name} to be deleted"),
        BIND_TIMEOUT,
        || async { Ok(pvs.get_opt(name).await?.is_none().then_some(())) },
    )
    .await
}

/// PVs whose claimRef points into `ns`.
pub async fn pvs_in(client: &Client, ns: &str) -> Result<Vec<PersistentVolume>> {
    Ok(Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.namespace.as_deref())
                == Some(ns)
        })
        .collect())
}

/// A kubeconfig with a token of ServiceAccount `ns/name`: the agents run as
/// the DaemonSet's pods would.
pub async fn service_account_kubeconfig(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
) -> Result<std::path::PathBuf> {
    let client = cp.client().await?;
    let request: TokenRequest =
        serde_json::from_value(serde_json::json!({ "spec": { "expirationSeconds": 3600 } }))?;
    let token: TokenRequest = Api::<ServiceAccount>::namespaced(client, ns)
        .create_subresource("token", name, &PostParams::default(), &request)
        .await?;
    let token = token.status.context("no token issued")?.token;
    let kubeconfig = localship_tests::scratch_dir("sa")?.join(format!("{name}.kubeconfig"));
    write_token_kubeconfig(&kubeconfig, cp.server(), cp.ca_pem(), name, &token)?;
    Ok(kubeconfig)
}

/// Documents of a multi-document YAML stream, parsed.
pub fn yaml_documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The one object of `kind` (and `name`, if given) among `objects`.
pub fn object<'a>(
    objects: &'a [serde_json::Value],
    kind: &str,
    name: Option<&str>,
) -> Result<&'a serde_json::Value> {
    let found: Vec<_> = objects
        .iter()
        .filter(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!("{} {kind} objects named {name:?}", found.len()),
    }
}

/// A ClusterRole's rules in a canonical order, to compare two of them.
pub fn canonical_rules(role: &serde_json::Value) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let sorted = |v: &serde_json::Value| {
        let mut items: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        items.sort();
        items
    };
    let mut rules: Vec<_> = role["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    (
                        sorted(&r["apiGroups"]),
                        sorted(&r["resources"]),
                        sorted(&r["verbs"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    rules.sort();
    rules
}

/// The ServiceMonitor CRD stand-in, established, so ServiceMonitors can be
/// dry-run.
pub async fn servicemonitor_crd(client: &Client) -> Result<()> {
    let yaml = include_str!("fixtures/servicemonitor-crd.yaml");
    apply_yaml(client, None, yaml, false).await?;
    let gvk = kube::core::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor");
    wait_for(
        "the ServiceMonitor CRD to be served",
        BIND_TIMEOUT,
        || async {
            Ok(kube::discovery::pinned_kind(client, &gvk)
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await
}
