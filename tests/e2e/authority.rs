//! The admission policies of deploy/base/policy.yaml on the real apiserver, with tokens
//! bound to pods on different nodes: each agent may act only on its own node's volumes and
//! claims, only in the ways it needs; node cleanup may only let go.

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use localship_tests::authority::{self, NODE_CLEANUP, PROVISIONER, SHIPPER};
use localship_tests::cluster::client_from;
use localship_tests::control_plane;
use serde_json::{json, Value};

use crate::common::*;

/// A PV as the provisioner of `node` makes it, under `base`.
fn pv(name: &str, node: &str, base: &str, path: &str) -> Result<PersistentVolume> {
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": { "localship.io/node": node },
            "annotations": {
                "localship.io/node": node,
                "localship.io/base-path": base,
                "localship.io/host-path": path,
            },
            "finalizers": ["localship.io/cleanup"],
        },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "authority-none",
            "hostPath": { "path": path, "type": "DirectoryOrCreate" },
            "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                { "key": "kubernetes.io/hostname", "operator": "In", "values": [node] }
            ] }] } },
        }
    }))?)
}

/// Refusals seen, for the summary line.
#[derive(Default)]
struct Tally {
    refused: usize,
    allowed: usize,
}

impl Tally {
    /// `result` must be a refusal by the apiserver (403: RBAC or a policy).
    fn refused<T>(&mut self, what: &str, result: kube::Result<T>) -> Result<()> {
        match result {
            Err(kube::Error::Api(s)) if s.code == 403 => {
                println!("refused: {what}: {}", s.message);
                self.refused += 1;
                Ok(())
            }
            Err(e) => bail!("{what}: expected a refusal, got {e}"),
            Ok(_) => bail!("{what}: expected a refusal, it was allowed"),
        }
    }

    fn allowed<T>(&mut self, what: &str, result: kube::Result<T>) -> Result<T> {
        match result {
            Ok(v) => {
                self.allowed += 1;
                Ok(v)
            }
            Err(e) => bail!("{what}: expected it to be allowed, got {e}"),
        }
    }
}

fn merge(value: Value) -> Patch<Value> {
    Patch::Merge(value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_acts_only_on_its_own_nodes_volumes_and_claims() -> Result<()> {
    let cp = control_plane()?;
    let admin = cp.client().await?;
    let ns = cp.namespace("authority").await?;
    let as_client = |path: std::path::PathBuf| async move { client_from(&path).await };
    let prov_a = as_client(authority::node_kubeconfig(cp, PROVISIONER, "node-a").await?).await?;
    let prov_b = as_client(authority::node_kubeconfig(cp, PROVISIONER, "node-b").await?).await?;
    let ship_a = as_client(authority::node_kubeconfig(cp, SHIPPER, "node-a").await?).await?;
    let ship_b = as_client(authority::node_kubeconfig(cp, SHIPPER, "node-b").await?).await?;
    let unbound = as_client(authority::unbound_kubeconfig(cp, PROVISIONER).await?).await?;
    let cleanup = as_client(authority::unbound_kubeconfig(cp, NODE_CLEANUP).await?).await?;
    let pvs = |c: &Client| Api::<PersistentVolume>::all(c.clone());
    let claims = |c: &Client| Api::<PersistentVolumeClaim>::namespaced(c.clone(), &ns);
    let base = authority::allowed_bases()?;
    let (base, mine) = (format!("{base}/{ns}"), format!("{ns}-a"));
    let path = format!("{base}/{mine}");
    let mut t = Tally::default();
    let create = PostParams::default();

    // Creating: only for its own node, only under an allowed base, only the provisioner.
    let node_a_pv = pv(&mine, "node-a", &base, &path)?;
    t.refused(
        "node-b's agent creates a PV for node-a",
        pvs(&prov_b).create(&create, &node_a_pv).await,
    )?;
    t.refused(
        "a token naming no node creates a PV",
        pvs(&unbound).create(&create, &node_a_pv).await,
    )?;
    t.refused(
        "node-a's shipper creates a PV",
        pvs(&ship_a).create(&create, &node_a_pv).await,
    )?;
    t.refused(
        "node-a's agent creates a hostPath PV for /",
        pvs(&prov_a)
            .create(&create, &pv(&format!("{ns}-root"), "node-a", "/", "/")?)
            .await,
    )?;
    t.refused(
        "node-a's agent creates a PV outside the allowed base paths",
        pvs(&prov_a)
            .create(
                &create,
                &pv(&format!("{ns}-opt"), "node-a", "/opt", "/opt/x")?,
            )
            .await,
    )?;
    let mut split = pv(
        &format!("{ns}-split"),
        "node-a",
        &base,
        &format!("{base}/split"),
    )?;
    split
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("localship.io/node".into(), "node-b".into());
    t.refused(
        "node-a's agent creates a PV whose label names node-b",
        pvs(&prov_a).create(&create, &split).await,
    )?;
    t.allowed(
        "node-a's agent creates its PV",
        pvs(&prov_a).create(&create, &node_a_pv).await,
    )?;

    // Updating: each may change only its own finalizer, only on its own node's PVs. The
    // apiserver added kubernetes.io/pv-protection after ours on creation.
    let params = PatchParams::default();
    let finalizers = |list: &[&str]| merge(json!({ "metadata": { "finalizers": list } }));
    t.refused(
        "node-b's agent removes node-a's cleanup finalizer",
        pvs(&prov_b)
            .patch(
                &mine,
                &params,
                &finalizers(&["kubernetes.io/pv-protection"]),
            )
            .await,
    )?;
    t.refused(
        "node-b's shipper holds node-a's PV",
        pvs(&ship_b)
            .patch(
                &mine,
                &params,
                &finalizers(&[
                    "localship.io/cleanup",
                    "kubernetes.io/pv-protection",
                    "localship.io/ship-logs",
                ]),
            )
            .await,
    )?;
    t.refused(
        "node-a's agent adds the shipper's finalizer",
        pvs(&prov_a)
            .patch(
                &mine,
                &params,
                &finalizers(&[
                    "localship.io/cleanup",
                    "kubernetes.io/pv-protection",
                    "localship.io/ship-logs",
                ]),
            )
            .await,
    )?;
    t.refused(
        "node-a's agent relabels its PV for node-b",
        pvs(&prov_a)
            .patch(
                &mine,
                &params,
                &merge(json!({ "metadata": { "labels": { "localship.io/node": "node-b" } } })),
            )
            .await,
    )?;
    t.refused(
        "node-a's shipper changes the PV's reclaim policy",
        pvs(&ship_a)
            .patch(
                &mine,
                &params,
                &merge(json!({ "spec": { "persistentVolumeReclaimPolicy": "Retain" } })),
            )
            .await,
    )?;
    t.allowed(
        "node-a's shipper holds node-a's PV",
        pvs(&ship_a)
            .patch(
                &mine,
                &params,
                &finalizers(&[
                    "localship.io/cleanup",
                    "kubernetes.io/pv-protection",
                    "localship.io/ship-logs",
                ]),
            )
            .await,
    )?;
    t.refused(
        "node-a's shipper removes the provisioner's finalizer",
        pvs(&ship_a)
            .patch(
                &mine,
                &params,
                &finalizers(&["kubernetes.io/pv-protection", "localship.io/ship-logs"]),
            )
            .await,
    )?;
    t.allowed(
        "node-a's shipper releases node-a's PV",
        pvs(&ship_a)
            .patch(
                &mine,
                &params,
                &finalizers(&["localship.io/cleanup", "kubernetes.io/pv-protection"]),
            )
            .await,
    )?;

    // Claims: only the provisioner, only handing a claim on its node back.
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": "data", "annotations": {
            "volume.kubernetes.io/selected-node": "node-a",
            "volume.kubernetes.io/storage-provisioner": "localship.io/local-path" } },
        "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": "authority-claims",
                  "resources": { "requests": { "storage": "1Gi" } } }
    }))?;
    claims(&admin).create(&create, &claim).await?;
    let unselect = merge(
        json!({ "metadata": { "annotations": { "volume.kubernetes.io/selected-node": null } } }),
    );
    t.refused(
        "node-b's agent hands node-a's claim back",
        claims(&prov_b).patch("data", &params, &unselect).await,
    )?;
    t.refused(
        "node-a's shipper hands the claim back",
        claims(&ship_a).patch("data", &params, &unselect).await,
    )?;
    t.refused(
        "node-a's agent moves the claim to node-b",
        claims(&prov_a)
            .patch("data", &params, &merge(json!({ "metadata": { "annotations": { "volume.kubernetes.io/selected-node": "node-b" } } })))
            .await,
    )?;
    t.refused(
        "node-a's agent annotates the claim",
        claims(&prov_a)
            .patch("data", &params, &merge(json!({ "metadata": { "annotations": { "localship.io/ship-to": "s3://elsewhere" } } })))
            .await,
    )?;
    t.refused(
        "node-a's agent deletes the claim",
        claims(&prov_a)
            .delete("data", &DeleteParams::default())
            .await,
    )?;
    t.allowed(
        "node-a's agent hands its claim back",
        claims(&prov_a).patch("data", &params, &unselect).await,
    )?;

    // Node cleanup: may only let go of localship's volumes.
    t.refused(
        "node cleanup creates a PV",
        pvs(&cleanup)
            .create(
                &create,
                &pv(&format!("{ns}-c"), "node-a", &base, &format!("{base}/c"))?,
            )
            .await,
    )?;
    t.refused(
        "node cleanup removes the PV's protection finalizer",
        pvs(&cleanup)
            .patch(&mine, &params, &finalizers(&["localship.io/cleanup"]))
            .await,
    )?;
    let foreign: PersistentVolume = serde_json::from_value(json!({
        "metadata": { "name": format!("{ns}-foreign") },
        "spec": { "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                  "hostPath": { "path": "/srv/foreign" } }
    }))?;
    pvs(&admin).create(&create, &foreign).await?;
    t.refused(
        "node cleanup deletes a PV localship did not make",
        pvs(&cleanup)
            .delete(&format!("{ns}-foreign"), &DeleteParams::default())
            .await,
    )?;
    pvs(&admin)
        .delete(&format!("{ns}-foreign"), &DeleteParams::default())
        .await?;

    // Deleting: only its own node's PVs, only the provisioner.
    t.refused(
        "node-b's agent deletes node-a's PV",
        pvs(&prov_b).delete(&mine, &DeleteParams::default()).await,
    )?;
    t.refused(
        "node-a's shipper deletes the PV",
        pvs(&ship_a).delete(&mine, &DeleteParams::default()).await,
    )?;
    t.allowed(
        "node-a's agent deletes its PV",
        pvs(&prov_a).delete(&mine, &DeleteParams::default()).await,
    )?;
    // The pv-protection controller lets go at the same time: remove ours from what is
    // there, guarded by resourceVersion, as the real node cleanup does.
    let mut outcome = None;
    for _ in 0..5 {
        let current = pvs(&cleanup).get(&mine).await?;
        let left: Vec<String> = current.metadata.finalizers.clone().unwrap_or_default();
        let left: Vec<&String> = left
            .iter()
            .filter(|f| *f != "localship.io/cleanup")
            .collect();
        let patch = merge(json!({ "metadata": {
            "resourceVersion": current.metadata.resource_version, "finalizers": left } }));
        match pvs(&cleanup).patch(&mine, &params, &patch).await {
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            other => {
                outcome = Some(other);
                break;
            }
        }
    }
    t.allowed(
        "node cleanup removes localship's finalizer",
        outcome.expect("no five conflicts in a row"),
    )?;
    wait_pv_gone(&admin, &mine).await?;

    println!(
        "policy: {} requests refused, {} allowed, as expected",
        t.refused, t.allowed
    );
    Ok(())
}
