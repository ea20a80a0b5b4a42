//! Provisioning on the real control plane, beside the same cluster binding pre-created
//! static PVs (the anchor) in the same run:
//! - P1/P2: bursts of N claims (each with a pod) on 2 nodes, created -> Bound, p50/p99/max,
//!   and the provision operations that did not succeed (must be none);
//! - P3: each agent's resident memory idle with 1000 of its PVs in the cluster, and one
//!   agent restarted over them (time to ready, memory after its start-up sweep).
//!
//! `cargo bench -p localship-tests --bench provision` (burst sizes from
//! LOCALSHIP_BENCH_CLAIMS, default `200,500`; idle PVs from LOCALSHIP_BENCH_IDLE_PVS,
//! default 1000).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use localship_tests::bench::{env_or, mib, pct, proc_kib};
use localship_tests::claims::{create_claim_with_pod, pvs_in, wait_all_bound};
use localship_tests::{apply_yaml, control_plane, ProvisionerAgent, NODES};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<()> {
    let sizes: Vec<usize> = env_or::<String>("LOCALSHIP_BENCH_CLAIMS", "200,500".into())
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()?;
    let idle_pvs: usize = env_or("LOCALSHIP_BENCH_IDLE_PVS", 1000);
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("bench").await?;
    let provisioner = format!("{ns}.bench.localship.io/local-path");
    let mut a = ProvisionerAgent::start(cp, NODES[0], &provisioner, &[]).await?;
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
    let scratch = localship_tests::scratch_dir("static-pvs")?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());

    for (round, &n) in sizes.iter().enumerate() {
        // Anchor: N static PVs, half per node, then the same burst of claims.
        for i in 0..n {
            let node = NODES[i % 2];
            let path = scratch.join(format!("{round}-{i}"));
            let pv: PersistentVolume = serde_json::from_value(json!({
                "metadata": { "name": format!("{ns}-static-{round}-{i}") },
                "spec": {
                    "capacity": { "storage": "1Gi" },
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": format!("{ns}-static"),
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": { "path": path.display().to_string(), "type": "DirectoryOrCreate" },
                    "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                        { "key": "kubernetes.io/hostname", "operator": "In", "values": [node] }
                    ] }] } }
                }
            }))?;
            pvs.create(&PostParams::default(), &pv).await?;
        }
        let failed_before = failed_provisions(&[&a, &b])?;
        let anchor = burst(
            &client,
            &ns,
            &format!("static{round}"),
            &format!("{ns}-static"),
            n,
        )
        .await?;
        let ours = burst(
            &client,
            &ns,
            &format!("dyn{round}"),
            &format!("{ns}-localship"),
            n,
        )
        .await?;
        let failed = failed_provisions(&[&a, &b])? - failed_before;
        println!("{}", table(n, &anchor, &ours, failed));
    }

    // P3: top the cluster up to `idle_pvs` of our PVs, let the agents go idle, read memory.
    let ours_now = sizes.iter().sum::<usize>();
    for i in ours_now..idle_pvs {
        let class = format!("{ns}-localship");
        create_claim_with_pod(
            &client,
            &ns,
            &format!("idle-{i}"),
            &class,
            "1Gi",
            None,
            json!({}),
        )
        .await?;
    }
    let total_claims = sizes.iter().sum::<usize>() * 2 + idle_pvs.saturating_sub(ours_now);
    wait_all_bound(&client, &ns, total_claims, Duration::from_secs(900)).await?;
    let ours_pvs = pvs_in(&client, &ns)
        .await?
        .iter()
        .filter(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref())
                == Some(&format!("{ns}-localship"))
        })
        .count();
    ensure!(ours_pvs >= idle_pvs, "only {ours_pvs} localship PVs");
    // Idle: past the agents' periodic return of freed heap (every 15 s).
    tokio::time::sleep(Duration::from_secs(20)).await;
    let idle: Vec<(String, Rss)> = [&a, &b]
        .iter()
        .map(|agent| Ok((agent.node.to_string(), Rss::of(agent.pid())?)))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    a.restart().await?;
    let ready = started.elapsed();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let restarted = Rss::of(a.pid())?;

    let total_pvs = pvs.list(&Default::default()).await?.items.len();
    println!("\nP3: agents idle with {ours_pvs} localship PVs ({total_pvs} PVs in the cluster)");
    println!("| agent            | RSS MiB | heap and stacks | mapped files |");
    println!("|------------------|---------|-----------------|--------------|");
    for (node, rss) in idle {
        println!("{}", rss.row(&node));
    }
    println!("{}", restarted.row(&format!("{} restarted", a.node)));
    println!(
        "restarted agent ready (start-up sweep over {ours_pvs} PVs done) in {:.2} s",
        ready.as_secs_f64()
    );
    Ok(())
}

/// Resident memory of a process, and how much of it is anonymous (heap, stacks) and how
/// much mapped files (the binary's code and libraries, shared with any other process that
/// maps them).
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

impl Rss {
    fn of(pid: Option<u32>) -> Result<Self> {
        let pid = pid.unwrap_or_default();
        Ok(Self {
            total: proc_kib(pid, "VmRSS")?,
            anon: proc_kib(pid, "RssAnon")?,
            file: proc_kib(pid, "RssFile")?,
        })
    }

    fn row(&self, name: &str) -> String {
        format!(
            "| {name:<16} | {:>7.1} | {:>15.1} | {:>12.1} |",
            mib(self.total),
            mib(self.anon),
            mib(self.file)
        )
    }
}

/// One burst's table: latencies of the anchor and ours, with ratios.
fn table(n: usize, anchor: &[Duration], ours: &[Duration], failed: u64) -> String {
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
fn failed_provisions(agents: &[&ProvisionerAgent]) -> Result<u64> {
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
