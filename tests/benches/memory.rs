//! P5: an agent's memory as the cluster fills with claims that are not its own.
//! - One agent started beside N claims of another provisioner (each already placed on the
//!   agent's node) and our own claims placed on a node without an agent: its peak and idle
//!   resident memory, and the bytes the apiserver sent it in its first minute (counted by a
//!   TCP relay in front of the apiserver: TLS records as they crossed the wire). Each
//!   size is measured for this build and, when LOCALSHIP_BENCH_BEFORE names another
//!   build of the agent, for that one too, on the same servers in the same run.
//! - Then P1 with all of those claims in the cluster: a burst of our own claims with pods,
//!   created -> Bound, beside the same burst binding static PVs.
//!
//! `cargo bench -p localship-tests --bench memory` (sizes from
//! LOCALSHIP_BENCH_OTHER_CLAIMS, default `1000,10000,100000`; our claims from
//! LOCALSHIP_BENCH_OURS, default 1000; the burst from LOCALSHIP_BENCH_BURST, default 200).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use kube::Client;
use localship_tests::bench::{env_or, mib, proc_kib};
use localship_tests::burst::{burst, burst_classes, failed_provisions, static_pvs, table};
use localship_tests::claims::{create_claim, storage_class};
use localship_tests::relay::{apiserver_addr, Relay};
use localship_tests::servers::localship_bin;
use localship_tests::{control_plane, ControlPlane, ProvisionerAgent, NODES};
use serde_json::json;

/// How long bytes received are counted from the agent's start.
const WINDOW: Duration = Duration::from_secs(60);
/// Claims created at once: enough to keep the apiserver busy on two cores.
const CREATE_CONCURRENCY: usize = 32;
/// Where our own claims are placed: a node without an agent here, so every agent
/// caches them and none serves them.
const ELSEWHERE: &str = "node-elsewhere";

#[tokio::main]
async fn main() -> Result<()> {
    let sizes: Vec<usize> =
        env_or::<String>("LOCALSHIP_BENCH_OTHER_CLAIMS", "1000,10000,100000".into())
            .split(',')
            .map(|n| n.trim().parse())
            .collect::<Result<_, _>>()?;
    let ours: usize = env_or("LOCALSHIP_BENCH_OURS", 1000);
    let burst_size: usize = env_or("LOCALSHIP_BENCH_BURST", 200);
    let mut builds = Vec::new();
    if let Some(before) = std::env::var_os("LOCALSHIP_BENCH_BEFORE") {
        builds.push(("before", PathBuf::from(before)));
    }
    builds.push(("this", localship_bin("localship-provisioner")?));

    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("memory").await?;
    let provisioner = format!("{ns}.bench.localship.io/local-path");
    burst_classes(&client, &ns, &provisioner).await?;
    storage_class(
        &client,
        &format!("{ns}-other"),
        "example.com/other",
        "Delete",
        "",
    )
    .await?;
    let placed = |provisioner: &str, node: &str| {
        json!({
            "volume.kubernetes.io/storage-provisioner": provisioner,
            "volume.kubernetes.io/selected-node": node,
        })
    };
    let started = Instant::now();
    create_many(
        &client,
        &ns,
        "ours",
        0..ours,
        &format!("{ns}-localship"),
        placed(&provisioner, ELSEWHERE),
    )
    .await?;
    eprintln!("{ours} claims of ours in {:.0?}", started.elapsed());

    let dir = localship_tests::scratch_dir("memory")?;
    let mut rows = Vec::new();
    let mut others = 0;
    for &n in &sizes {
        let started = Instant::now();
        create_many(
            &client,
            &ns,
            "other",
            others..n,
            &format!("{ns}-other"),
            placed("example.com/other", NODES[0]),
        )
        .await?;
        eprintln!(
            "{n} claims of another provisioner, topped up in {:.0?}",
            started.elapsed()
        );
        others = n;
        for (build, bin) in &builds {
            let sample = start_agent(cp, bin, &provisioner, &dir)
                .await
                .with_context(|| format!("{build} agent with {n} other claims"))?;
            rows.push(sample.row(n, build));
            eprintln!("{}", rows.last().unwrap());
        }
    }
    println!("\nP5: one agent started with N claims of another provisioner and {ours} of ours in the cluster");
    println!("| other claims | build  | ready s | peak MiB | idle MiB | received 1st min MiB |");
    println!("|--------------|--------|---------|----------|----------|----------------------|");
    for row in &rows {
        println!("{row}");
    }

    // P1 with every claim above still in the cluster.
    let a = ProvisionerAgent::start(cp, NODES[0], &provisioner, &[]).await?;
    let b = ProvisionerAgent::start(cp, NODES[1], &provisioner, &[]).await?;
    let scratch = localship_tests::scratch_dir("static-pvs")?;
    static_pvs(&client, &format!("{ns}-static"), &ns, burst_size, &scratch).await?;
    let failed_before = failed_provisions(&[&a, &b])?;
    let anchor = burst(&client, &ns, "static", &format!("{ns}-static"), burst_size).await?;
    let dynamic = burst(&client, &ns, "dyn", &format!("{ns}-localship"), burst_size).await?;
    let failed = failed_provisions(&[&a, &b])? - failed_before;
    println!("\nwith {others} claims of another provisioner and {ours} of ours in the cluster:");
    println!("{}", table(burst_size, &anchor, &dynamic, failed));
    Ok(())
}

/// Claims `<prefix>-<i>` for each `i` of `range`, of `class`, with `annotations`,
/// `CREATE_CONCURRENCY` at a time.
async fn create_many(
    client: &Client,
    ns: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    class: &str,
    annotations: serde_json::Value,
) -> Result<()> {
    futures::stream::iter(range)
        .map(|i| {
            let (name, annotations) = (format!("{prefix}-{i}"), annotations.clone());
            async move { create_claim(client, ns, &name, class, "1Gi", annotations).await }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_for_each(|_| futures::future::ready(Ok(())))
        .await
}

/// What one agent start cost.
struct Sample {
    ready: Duration,
    peak_kib: u64,
    idle_kib: u64,
    received: u64,
}

impl Sample {
    fn row(&self, others: usize, build: &str) -> String {
        format!(
            "| {others:>12} | {build:<6} | {:>7.2} | {:>8.1} | {:>8.1} | {:>20.2} |",
            self.ready.as_secs_f64(),
            mib(self.peak_kib),
            mib(self.idle_kib),
            self.received as f64 / (1024.0 * 1024.0)
        )
    }
}

/// Starts an agent of `bin` on the first node through a counting relay, and reads what
/// it received in its first minute, its time to ready, and its memory once idle: ready,
/// past the first minute, and past its periodic return of freed heap (every 15 s).
async fn start_agent(
    cp: &ControlPlane,
    bin: &Path,
    provisioner: &str,
    dir: &Path,
) -> Result<Sample> {
    let relay = Relay::start(apiserver_addr(cp)?).await?;
    let kubeconfig = relay.admin_kubeconfig(cp, dir)?;
    let started = Instant::now();
    let mut agent = ProvisionerAgent::launch(NODES[0], provisioner, &[], &kubeconfig, bin)?;
    let mut ready = None;
    let mut received = None;
    while ready.is_none() || received.is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        agent.check_running()?;
        if ready.is_none() && agent.is_ready() {
            ready = Some(started.elapsed());
        }
        if received.is_none() && started.elapsed() >= WINDOW {
            received = Some(relay.received());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "agent not ready in 15 minutes:\n{}",
            agent.log_tail(20)
        );
    }
    let ready = ready.unwrap_or_default();
    let idle_at = (ready + Duration::from_secs(20)).max(WINDOW);
    tokio::time::sleep(idle_at.saturating_sub(started.elapsed())).await;
    let pid = agent.pid().unwrap_or_default();
    let sample = Sample {
        ready,
        peak_kib: proc_kib(pid, "VmHWM")?,
        idle_kib: proc_kib(pid, "VmRSS")?,
        received: received.unwrap_or_default(),
    };
    agent.kill();
    Ok(sample)
}
