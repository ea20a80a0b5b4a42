//! The kube-apiserver restarted while a burst of claims is in flight: the
//! agents' watches, the controller-manager and the scheduler must all
//! reconnect on their own, and the burst must end as if nothing happened.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use localship_tests::claims::{
    affinity_node, create_claim_with_pod, provisioner_name, storage_class, wait_bound,
};
use localship_tests::{control_plane, wait_for};

use super::audit::{audit_then_delete_all, burst, start_agents, wait_settled};
use crate::jitter::Jitter;
use crate::report::Tally;

const CLAIMS: usize = 60;
/// Spreads the burst over 6 s, so the outage lands in the middle of it.
const PACE: Duration = Duration::from_millis(100);

pub async fn apiserver_restart_mid_burst() -> Result<Tally> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("faults-apiserver").await?;
    let prov = provisioner_name(&ns);
    let mut agents = start_agents(cp, &prov).await?;
    let class = format!("{ns}-local");
    storage_class(&client, &class, &prov, "Delete", "").await?;
    let mut jitter = Jitter::new("apiserver restart");
    let names: Vec<String> = (0..CLAIMS).map(|i| format!("burst-{i:02}")).collect();

    let start = Instant::now();
    let create = async {
        let retries = burst(
            &client,
            &ns,
            &class,
            &names,
            PACE,
            Some(Duration::from_secs(60)),
        )
        .await?;
        eprintln!(
            "faults: {CLAIMS} claims and pods created in {:.1}s ({retries} creates retried)",
            start.elapsed().as_secs_f64()
        );
        anyhow::Ok(())
    };
    let restart = async {
        tokio::time::sleep(jitter.millis(1500, 3000)).await;
        let stopped = Instant::now();
        cp.stop_apiserver();
        tokio::time::sleep(jitter.millis(2000, 5000)).await;
        cp.start_apiserver().await?;
        eprintln!(
            "faults: apiserver stopped at {:.1}s, serving again after {:.1}s",
            (stopped - start).as_secs_f64(),
            stopped.elapsed().as_secs_f64()
        );
        anyhow::Ok(())
    };
    let (created, restarted) = tokio::join!(create, restart);
    restarted?;
    created?;
    wait_settled(&client, &ns, CLAIMS, Duration::from_secs(90)).await;
    eprintln!("faults: settled at {:.1}s", start.elapsed().as_secs_f64());

    // A claim made after the restart goes through the scheduler, the PV
    // binder and an agent: proof that all three came back.
    create_claim_with_pod(
        &client,
        &ns,
        "after-restart",
        &class,
        "64Mi",
        None,
        serde_json::json!({}),
    )
    .await?;
    let pv = wait_bound(&client, &ns, "after-restart")
        .await
        .context("a claim made after the apiserver restart")?;
    let node = affinity_node(&pv)?;
    let pods = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns);
    let placed = wait_for(
        "the after-restart pod to be placed",
        Duration::from_secs(30),
        || async {
            Ok(pods
                .get(&localship_tests::claims::pod_name("after-restart"))
                .await?
                .spec
                .and_then(|s| s.node_name))
        },
    )
    .await?;
    anyhow::ensure!(placed == node, "pod on {placed}, PV on {node}");
    cp.check_health()?;
    audit_then_delete_all(
        &client,
        &ns,
        &mut agents,
        "after the burst",
        Duration::from_secs(60),
    )
    .await
}
