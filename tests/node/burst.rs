//! The `provisioner` container killed (SIGKILL from the host, as an OOM kill
//! would) while 50 claims with pods arrive: the kubelet restarts it, and each
//! claim still gets exactly one PV and one directory.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use localship_tests::claims::{host_path, pvs_in, volume_dirs, wait_all_bound};
use localship_tests::wait_for;
use serde_json::json;

use crate::install::{wait_agent_ready, NAMESPACE};
use crate::pods::{create_claim, create_pod, describe, POD_TIMEOUT};
use crate::Env;

const CLAIMS: usize = 50;
const BASE_PATH: &str = "/opt/local-path-provisioner";

pub async fn killed_mid_burst(env: &mut Env) -> Result<()> {
    let cp = env.node.control_plane();
    let client = cp.client().await?;
    let ns = cp.namespace("burst").await?;
    let busybox = env.node.images().busybox.clone();
    let before = base_path_entries()?;
    let agent = wait_agent_ready(&client, &["provisioner"]).await?;
    let agent_name = agent.metadata.name.clone().context("agent pod name")?;
    let pid = env
        .node
        .container_pid(NAMESPACE, &agent_name, "provisioner")
        .await?;

    for i in 0..CLAIMS {
        let claim = format!("claim-{i:02}");
        create_claim(&client, &ns, &claim, json!({})).await?;
        create_pod(
            &client,
            &ns,
            &format!("pod-{i:02}"),
            &busybox,
            &claim,
            "sleep 3600",
            "Always",
        )
        .await?;
        if i == CLAIMS / 3 {
            // Some claims are bound by now, some are being provisioned.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )?;
        }
    }
    let claims = wait_all_bound(&client, &ns, CLAIMS, POD_TIMEOUT).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    wait_for(&format!("{CLAIMS} pods Running"), POD_TIMEOUT, || async {
        let list = pods.list(&ListParams::default()).await?;
        let running = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        if running == CLAIMS {
            return Ok(Some(()));
        }
        let waiting = list
            .items
            .iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running"));
        anyhow::bail!(
            "{running} Running; e.g. {}",
            waiting.map(describe).unwrap_or_default()
        )
    })
    .await?;

    // The kill landed: the container restarted.
    let agent = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .get(&agent_name)
        .await?;
    let restarts = agent
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .find(|c| c.name == "provisioner")
        .map(|c| c.restart_count)
        .unwrap_or_default();
    ensure!(
        restarts >= 1,
        "the provisioner was not restarted after the kill"
    );

    // One PV per claim, and each claim's PV is the one it is bound to.
    let pvs = pvs_in(&client, &ns).await?;
    ensure!(pvs.len() == CLAIMS, "{} PVs for {CLAIMS} claims", pvs.len());
    let bound: BTreeSet<String> = claims
        .iter()
        .filter_map(|c| c.spec.as_ref().and_then(|s| s.volume_name.clone()))
        .collect();
    let names: BTreeSet<String> = pvs.iter().filter_map(|p| p.metadata.name.clone()).collect();
    ensure!(bound == names, "claims bound to {bound:?}, PVs {names:?}");
    // No orphan: the directories new under the base path are the PVs'.
    let dirs: BTreeSet<String> = pvs.iter().map(host_path).collect();
    let new: BTreeSet<String> = base_path_entries()?.difference(&before).cloned().collect();
    ensure!(new == dirs, "directories {new:?}, PVs' {dirs:?}");

    // Everything goes with the namespace's claims.
    pods.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    let all = Api::<PersistentVolume>::all(client.clone());
    wait_for("the burst's PVs to be deleted", POD_TIMEOUT, || async {
        let left = all
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|p| names.contains(p.metadata.name.as_deref().unwrap_or_default()))
            .count();
        Ok((left == 0).then_some(()))
    })
    .await?;
    let left: Vec<&String> = dirs.iter().filter(|d| Path::new(d).exists()).collect();
    ensure!(left.is_empty(), "directories left: {left:?}");

    // The next scenarios check that nothing restarted: they get a pod without the
    // restart this one injected.
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .delete(&agent_name, &DeleteParams::default())
        .await?;
    wait_for("a fresh agent pod", POD_TIMEOUT, || async {
        let pod = wait_agent_ready(&client, &["provisioner"]).await?;
        Ok((pod.metadata.name.as_deref() != Some(agent_name.as_str())).then_some(()))
    })
    .await?;
    Ok(())
}

fn base_path_entries() -> Result<BTreeSet<String>> {
    Ok(volume_dirs(Path::new(BASE_PATH))
        .into_iter()
        .map(|p| p.display().to_string())
        .collect())
}
