//! Claims, StorageClasses and PVs on the harness's control plane: a claim
//! with a pod that uses it, waits on binding and deletion, and what a PV
//! says about where its directory is. Shared by the e2e tests, the fault
//! suite and the benchmarks.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;

use serde_json::json;

use crate::{apply_yaml, wait_for};

pub const BIND_TIMEOUT: Duration = Duration::from_secs(90);

/// The directory under each base path where the provisioner records which
/// PV each volume directory belongs to: not a volume.
pub const OWNER_RECORDS: &str = ".localship-owners";

/// The volume directories directly under a base path (the owner records
/// left out).
pub fn volume_dirs(base: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    std::fs::read_dir(base)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name() != OWNER_RECORDS)
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

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

/// The taint a test puts on a node it registers for itself, so that no other test's pods
/// land there, and the toleration its own pinned pods carry.
pub const TEST_NODE_TAINT: &str = "localship.io/test";
pub const TOLERATE_TEST_NODES: &str =
    "tolerations: [{ key: localship.io/test, operator: Exists, effect: NoSchedule }]";

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
    // A pod pinned to a node also tolerates the taint that keeps other tests' pods off
    // nodes a test registers for itself.
    let selector = node
        .map(|n| {
            format!("nodeSelector: {{ kubernetes.io/hostname: {n} }}\n  {TOLERATE_TEST_NODES}")
        })
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

/// Like [`claim_with_pod`], built as typed objects and created directly
/// (no discovery round trip), for bursts; `annotations` go on the claim. An
/// object that already exists counts as created, so a burst interrupted by
/// an apiserver outage can simply be retried.
pub async fn create_claim_with_pod(
    client: &Client,
    ns: &str,
    claim: &str,
    class: &str,
    size: &str,
    node: Option<&str>,
    annotations: serde_json::Value,
) -> Result<()> {
    create_claim(client, ns, claim, class, size, annotations).await?;
    create_pod(client, ns, claim, node).await
}

/// The claim half of [`create_claim_with_pod`]: until a pod uses it, a
/// WaitForFirstConsumer claim has no node and nothing provisions it.
pub async fn create_claim(
    client: &Client,
    ns: &str,
    claim: &str,
    class: &str,
    size: &str,
    annotations: serde_json::Value,
) -> Result<PersistentVolumeClaim> {
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": claim, "annotations": annotations },
        "spec": {
            "storageClassName": class,
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": size } },
        }
    }))?;
    let api = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    match api.create(&PostParams::default(), &pvc).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(api.get(claim).await?),
        Err(e) => Err(e).with_context(|| format!("create claim {ns}/{claim}")),
    }
}

/// The pod half of [`create_claim_with_pod`], optionally pinned to `node`.
pub async fn create_pod(client: &Client, ns: &str, claim: &str, node: Option<&str>) -> Result<()> {
    let selector = node.map(|n| json!({ "kubernetes.io/hostname": n }));
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": pod_name(claim) },
        "spec": {
            "nodeSelector": selector,
            "containers": [{ "name": "main", "image": "busybox" }],
            "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": claim } }],
        }
    }))?;
    match Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("create the pod of {ns}/{claim}")),
    }
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

/// Waits until `ns` holds `count` claims, all Bound; on timeout the error
/// names the claims still pending.
pub async fn wait_all_bound(
    client: &Client,
    ns: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<PersistentVolumeClaim>> {
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    wait_for(
        &format!("{count} claims in {ns} to be Bound"),
        timeout,
        || async {
            let all = claims.list(&ListParams::default()).await?.items;
            let pending: Vec<String> = all
                .iter()
                .filter(|c| phase(c) != "Bound")
                .map(|c| c.metadata.name.clone().unwrap_or_default())
                .collect();
            if all.len() == count && pending.is_empty() {
                return Ok(Some(all));
            }
            let shown: Vec<&str> = pending.iter().take(5).map(String::as_str).collect();
            bail!(
                "{} claims, {} not Bound (e.g. {shown:?})",
                all.len(),
                pending.len()
            )
        },
    )
    .await
}

/// A claim's phase, empty when it has none yet.
pub fn phase(claim: &PersistentVolumeClaim) -> &str {
    claim
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
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
