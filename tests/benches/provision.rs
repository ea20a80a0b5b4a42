//! Provisioning latency on the real control plane: a burst of N claims (each
//! with a pod) bound by localship's agents, beside the same cluster binding
//! N claims to N pre-created static PVs (the anchor). Prints a table.
//!
//! `cargo bench -p localship-tests --bench provision` (N from
//! LOCALSHIP_BENCH_CLAIMS, default 100).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use localship_tests::claims::create_claim_with_pod;
use localship_tests::{apply_yaml, control_plane, ProvisionerAgent, NODES};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::var("LOCALSHIP_BENCH_CLAIMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("bench").await?;
    let provisioner = format!("{ns}.bench.localship.io/local-path");
    let a = ProvisionerAgent::start(cp, NODES[0], &provisioner, &[]).await?;
    let b = ProvisionerAgent::start(cp, NODES[1], &provisioner, &[]).await?;
    let classes = format!(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{ name: {ns}-static }}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{ name: {ns}-localship }}
provisioner: {provisioner}
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
"#
    );
    apply_yaml(&client, None, &classes, false).await?;

    // Anchor: N static PVs, half per node, then the same burst of claims.
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let scratch = localship_tests::scratch_dir("static-pvs")?;
    for i in 0..n {
        let node = NODES[i % 2];
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": { "name": format!("{ns}-static-{i}") },
            "spec": {
                "capacity": { "storage": "1Gi" },
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": format!("{ns}-static"),
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": { "path": scratch.join(i.to_string()).display().to_string(), "type": "DirectoryOrCreate" },
                "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                    { "key": "kubernetes.io/hostname", "operator": "In", "values": [node] }
                ] }] } }
            }
        }))?;
        pvs.create(&PostParams::default(), &pv).await?;
    }
    let anchor = burst(&client, &ns, "static", &format!("{ns}-static"), n).await?;
    let ours = burst(&client, &ns, "dyn", &format!("{ns}-localship"), n).await?;

    let row = |name: &str, f: fn(&[Duration]) -> Duration| {
        let (x, y) = (f(&anchor), f(&ours));
        println!(
            "| {name:<22} | {:>10.1} | {:>10.1} | {:>6.2}x |",
            ms(x),
            ms(y),
            y.as_secs_f64() / x.as_secs_f64().max(1e-9)
        );
    };
    println!("\nprovision latency, {n} claims with pods in one burst, created -> Bound (ms)");
    println!("| measure                | static PVs | localship  | ratio   |");
    println!("|------------------------|------------|------------|---------|");
    row("p50", |d| pct(d, 50.0));
    row("p99", |d| pct(d, 99.0));
    row("max", |d| *d.iter().max().unwrap());
    for agent in [&a, &b] {
        let rss = rss_kib(agent.pid().unwrap_or_default())?;
        println!(
            "agent {} RSS after the burst: {:.1} MiB",
            agent.node,
            rss as f64 / 1024.0
        );
    }
    Ok(())
}

/// Creates `n` claims of `class` with a pod each, as fast as the API takes
/// them, and returns each claim's time from its create call to Bound.
async fn burst(
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
    let deadline = Instant::now() + Duration::from_secs(300);
    while latencies.len() < n {
        let next = tokio::time::timeout_at(deadline.into(), bound.try_next()).await;
        let Ok(Ok(Some(claim))) = next else {
            bail!(
                "only {} of {n} `{prefix}` claims bound within 300 s",
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

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: 0 kB");
    Ok(line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}
