//! The agents' path to the apiserver goes silent without closing, as when a load balancer
//! in front of it fails over or a node's network is cut: their watches and requests on it
//! hear nothing more, and no error comes. Once the path is back the agents must notice by
//! themselves, well before kube's own limit (a watch waits 295 s, a request for ever):
//! claims made before, during and after the cut bind, and deleting them cleans up.

use std::time::{Duration, Instant};

use anyhow::Result;
use localship_tests::authority::{node_kubeconfig, PROVISIONER};
use localship_tests::claims::{create_claim_with_pod, provisioner_name, storage_class};
use localship_tests::relay::{apiserver_addr, Relay};
use localship_tests::{control_plane, scratch_dir, ProvisionerAgent, NODES};

use super::audit::{audit_then_delete_all, burst, wait_settled};
use crate::jitter::Jitter;
use crate::report::Tally;

const BEFORE: usize = 10;
const DURING: usize = 10;
const PACE: Duration = Duration::from_millis(100);
/// Every claim bound this soon after the cut began: a watch ends every 45 s and a
/// connection without a byte for 60 s is dropped, then a failed reconcile is retried.
const RECOVERED_WITHIN: Duration = Duration::from_secs(150);

pub async fn apiserver_path_blackholed() -> Result<Tally> {
    let cp = control_plane()?;
    // The test's own client goes straight to the apiserver; only the agents are cut off.
    let client = cp.client().await?;
    let ns = cp.namespace("faults-blackhole").await?;
    let prov = provisioner_name(&ns);
    let relay = Relay::start(apiserver_addr(cp)?).await?;
    let dir = scratch_dir("faults-blackhole")?;
    let mut agents = Vec::new();
    for node in NODES {
        let direct = node_kubeconfig(cp, PROVISIONER, node).await?;
        let relayed = relay.kubeconfig(cp, &direct, &dir)?;
        agents.push(ProvisionerAgent::start_as(cp, node, &prov, &[], &relayed).await?);
    }
    let class = format!("{ns}-local");
    storage_class(&client, &class, &prov, "Delete", "").await?;
    let mut jitter = Jitter::new("apiserver path blackholed");

    // Watches in use and connections pooled, as in a cluster at work.
    let names = |what: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{what}-{i:02}")).collect()
    };
    burst(&client, &ns, &class, &names("before", BEFORE), PACE, None).await?;
    wait_settled(&client, &ns, BEFORE, Duration::from_secs(60)).await;

    let cut = Instant::now();
    relay.blackhole();
    burst(&client, &ns, &class, &names("during", DURING), PACE, None).await?;
    tokio::time::sleep(jitter.millis(3000, 8000)).await;
    relay.heal();
    let healed = cut.elapsed();
    create_claim_with_pod(
        &client,
        &ns,
        "after",
        &class,
        "64Mi",
        None,
        serde_json::json!({}),
    )
    .await?;
    let all = BEFORE + DURING + 1;
    wait_settled(
        &client,
        &ns,
        all,
        RECOVERED_WITHIN.saturating_sub(cut.elapsed()),
    )
    .await;
    eprintln!(
        "faults: path cut for {:.1}s; all {all} claims bound {:.1}s after the cut (limit {}s)",
        healed.as_secs_f64(),
        cut.elapsed().as_secs_f64(),
        RECOVERED_WITHIN.as_secs()
    );
    audit_then_delete_all(
        &client,
        &ns,
        &mut agents,
        "after the cut",
        Duration::from_secs(90),
    )
    .await
}
