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

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::Api;
use localship_tests::bench::{env_or, mib, proc_kib};
use localship_tests::burst::{burst, burst_classes, failed_provisions, static_pvs, table};
use localship_tests::claims::{create_claim_with_pod, pvs_in, wait_all_bound};
use localship_tests::{control_plane, ProvisionerAgent, NODES};
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
    burst_classes(&client, &ns, &provisioner).await?;
    let scratch = localship_tests::scratch_dir("static-pvs")?;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());

    for (round, &n) in sizes.iter().enumerate() {
        static_pvs(
            &client,
            &format!("{ns}-static"),
            &format!("{ns}-{round}"),
            n,
            &scratch,
        )
        .await?;
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
