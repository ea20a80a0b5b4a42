//! A node that leaves the cluster for good: `localship-node-cleanup`, under its own
//! ServiceAccount and the admission policy, lets go of its released volumes and deletes the
//! claims that opted in, once the grace period has passed; a claim that did not opt in keeps
//! its volume.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use localship_tests::authority::{self, NODE_CLEANUP};
use localship_tests::servers::localship_bin;
use localship_tests::{control_plane, wait_for, Process, ProvisionerAgent};
use serde_json::json;

use crate::common::*;

const GRACE: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_of_a_deleted_node_are_let_go_after_the_grace_period() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("node-gone").await?;
    let node = cp.register_own_node(&ns).await?;
    let prov = provisioner_name(&ns);
    let mut agent = ProvisionerAgent::start(cp, &node, &prov, &[]).await?;
    let class = format!("{ns}-local");
    storage_class(&client, &class, &prov, "Delete", "").await?;
    let claims = ["kept", "moved", "released"];
    for claim in claims {
        claim_with_pod(&client, &ns, claim, Some(&class), "1Gi", Some(&node)).await?;
    }
    let mut pvs = Vec::new();
    for claim in claims {
        pvs.push(wait_bound(&client, &ns, claim).await?.name_any());
    }
    let claim_api = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let opt_in =
        json!({ "metadata": { "annotations": { "localship.io/node-loss": "delete-claim" } } });
    claim_api
        .patch("moved", &PatchParams::default(), &Patch::Merge(opt_in))
        .await?;

    // The node goes with its agent; one claim was deleted while nothing could clean up.
    agent.kill();
    delete_claim_and_pod(&client, &ns, "released").await?;
    Api::<Node>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await?;
    // What the pod garbage collector does for pods of a node that is gone.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    for pod in pods.list(&ListParams::default()).await? {
        pods.delete(&pod.name_any(), &now).await?;
    }
    let gone_at = Instant::now();

    let kubeconfig = authority::unbound_kubeconfig(cp, NODE_CLEANUP).await?;
    let dir = localship_tests::scratch_dir("node-cleanup")?;
    let mut cleanup = Process::spawn(
        "node-cleanup",
        &localship_bin("localship-node-cleanup")?,
        &[
            format!("--grace={}s", GRACE.as_secs()),
            "--period=500ms".into(),
        ],
        &[("KUBECONFIG".into(), kubeconfig.display().to_string())],
        &dir,
    )?;

    let pv_api = Api::<PersistentVolume>::all(client.clone());
    for (claim, pv) in claims.iter().zip(&pvs) {
        if *claim == "kept" {
            continue;
        }
        wait_pv_gone(&client, pv)
            .await
            .with_context(|| format!("{claim}: {}", cleanup.log_tail(20)))?;
    }
    ensure!(
        gone_at.elapsed() >= GRACE,
        "volumes were let go before the grace period passed"
    );
    ensure!(
        claim_api.get_opt("moved").await?.is_none(),
        "the claim that opted in is still there"
    );
    // The claim that did not opt in keeps its volume, and says why on it.
    let kept = claim_api.get("kept").await?;
    ensure!(phase(&kept) == "Bound", "kept: {}", phase(&kept));
    let kept_pv = pv_api.get(&pvs[0]).await?;
    ensure!(kept_pv.metadata.deletion_timestamp.is_none());
    wait_for(
        "a NodeGone Event on the kept volume",
        Duration::from_secs(30),
        || async {
            let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone())
                .list(&ListParams::default().fields(&format!("regarding.name={}", pvs[0])))
                .await?;
            Ok(events
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("NodeGone"))
                .then_some(()))
        },
    )
    .await?;
    // Deleted later, it is let go too.
    claim_api.delete("kept", &DeleteParams::default()).await?;
    wait_pv_gone(&client, &pvs[0]).await?;
    cleanup.check_running()?;
    Ok(())
}
