//! P1's measure, shared by the benches that report it: a burst of claims, each with a
//! pod, timed from its create call to Bound, beside the same cluster binding
//! pre-created static PVs (the anchor) in the same run.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;

use crate::bench::pct;
use crate::claims::{create_claim_with_pod, storage_class};
use crate::{ProvisionerAgent, NODES};

/// The classes a burst binds through, both WaitForFirstConsumer: `<ns>-static`
/// (the anchor's, no provisioner) and `<ns>-localship` (`provisioner`'s).
pub async fn burst_classes(client: &Client, ns: &str, provisioner: &str) -> Result<()> {
    let static_class = format!("{ns}-static");
    storage_class(
        client,
        &static_class,
        "kubernetes.io/no-provisioner",
        "Delete",
        "",
    )
    .await?;
    storage_class(
        client,
        &format!("{ns}-localship"),
        provisioner,
        "Delete",
        "",
    )
    .await
}

/// The anchor's volumes: `n` static hostPath PVs of `class` named `<prefix>-<i>`, half
/// per node, their directories under `scratch`.
pub async fn static_pvs(
    client: &Client,
    class: &str,
    prefix: &str,
    n: usize,
    scratch: &Path,
) -> Result<()> {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for i in 0..n {
        let node = NODES[i % 2];
        let path = scratch.join(format!("{prefix}-{i}"));
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": { "name": format!("{prefix}-static-{i}") },
            "spec": {
                "capacity": { "storage": "1Gi" },
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": class,
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": { "path": path.display().to_string(), "type": "DirectoryOrCreate" },
                "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                    { "key": "kubernetes.io/hostname", "operator": "In", "values": [node] }
                ] }] } }
            }
        }))?;
        pvs.create(&PostParams::default(), &pv).await?;
    }
    Ok(())
}

/// Creates `n` claims of `class` with a pod each, as fast as the API takes
/// them, and returns each claim's time from its create call to Bound.
pub async fn burst(
    client: &Client,
    ns: &str,
    prefix: &str,
    class: &str,
    n: usize,
) -> Result<Vec<Duration>> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let mut bound = watcher(claims.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let mut created: HashMap<String, Instant> = HashMap::new();
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        created.insert(name.clone(), Instant::now());
        create_claim_with_pod(client, ns, &name, class, "1Gi", None, json!({})).await?;
    }
    let mut latencies = HashMap::new();
    let wait = Duration::from_secs(300.max(2 * n as u64));
    let deadline = Instant::now() + wait;
    while latencies.len() < n {
        let next = tokio::time::timeout_at(deadline.into(), bound.try_next()).await;
        let Ok(Ok(Some(claim))) = next else {
            bail!(
                "only {} of {n} `{prefix}` claims bound within {wait:?}",
                latencies.len()
            );
        };
        let name = claim.metadata.name.clone().unwrap_or_default();
        let is_bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        if let (true, Some(start)) = (is_bound, created.get(&name)) {
            latencies.entry(name).or_insert_with(|| start.elapsed());
        }
    }
    let mut all: Vec<Duration> = latencies.into_values().collect();
    all.sort();
    Ok(all)
}

/// One burst's table: latencies of the anchor and ours, with ratios.
pub fn table(n: usize, anchor: &[Duration], ours: &[Duration], failed: u64) -> String {
    let row = |name: &str, f: &dyn Fn(&[Duration]) -> Duration| {
        let (x, y) = (f(anchor), f(ours));
        format!(
            "| {name:<22} | {:>10.1} | {:>10.1} | {:>6.2}x |\n",
            ms(x),
            ms(y),
            y.as_secs_f64() / x.as_secs_f64().max(1e-9)
        )
    };
    let mut t =
        format!("\nprovision latency, {n} claims with pods in one burst, created -> Bound (ms)\n");
    t += "| measure                | static PVs | localship  | ratio   |\n";
    t += "|------------------------|------------|------------|---------|\n";
    t += &row("p50", &|d| pct(d, 50.0));
    t += &row("p99", &|d| pct(d, 99.0));
    t += &row("max", &|d| *d.iter().max().unwrap());
    t += &format!("provision operations that did not succeed: {failed}");
    t
}

/// Provision operations, over all `agents`, whose result was not `success`.
pub fn failed_provisions(agents: &[&ProvisionerAgent]) -> Result<u64> {
    let mut failed = 0.0;
    for agent in agents {
        failed += agent
            .metrics()?
            .lines()
            .filter(|l| {
                l.starts_with(
                    r#"localship_provisioner_operations_total{operation="provision",result=""#,
                )
            })
            .filter(|l| !l.contains(r#"result="success""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(failed as u64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
