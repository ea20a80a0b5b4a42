//! The base install, and volumes the kubelet mounts for a pod running as
//! Airflow's uid: data outlives the pod, and the directory goes with the
//! claim, whatever the pod made in it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use localship_tests::claims::{affinity_node, host_path, wait_bound, wait_pv_gone};
use localship_tests::node::NODE_NAME;
use serde_json::json;

use crate::install::*;
use crate::pods::{create_claim, create_pod, delete_pod, logs, wait_succeeded, AIRFLOW_UID};
use crate::Env;

/// The base path `deploy/` and the chart configure.
const BASE_PATH: &str = "/opt/local-path-provisioner";

/// `kubectl apply -k` of the base with only the image swapped.
pub async fn kustomize_install(env: &mut Env) -> Result<()> {
    let overlay = base_overlay(env)?;
    let overlay = overlay.display().to_string();
    kubectl(&env.node, &["apply", "-k", &overlay])?;
    let manifest = rendered_daemonset(
        &kubectl(&env.node, &["kustomize", &overlay])?,
        "provisioner",
    )?;
    let client = env.node.control_plane().client().await?;
    let pod = wait_agent_ready(&client, &["provisioner"]).await?;
    check_agent(
        &env.node,
        &client,
        &pod,
        &manifest,
        &[("provisioner", CAP_DAC_OVERRIDE | CAP_FOWNER)],
    )
    .await?;
    check_default_class(&client).await
}

fn base_overlay(env: &Env) -> Result<std::path::PathBuf> {
    user_overlay(&env.node.dir().join("overlays/base"), "deploy", "")
}

/// `kubectl delete -k` of the shipping overlay (everything the base installs,
/// and the shipper's cluster-wide RBAC), so the next install starts from a
/// bare cluster whichever of the two was installed.
pub async fn kustomize_uninstall(env: &mut Env) -> Result<()> {
    let overlay = user_overlay(
        &env.node.dir().join("overlays/s3-shipping"),
        "deploy/overlays/s3-shipping",
        "",
    )?
    .display()
    .to_string();
    kubectl(
        &env.node,
        &[
            "delete",
            "-k",
            &overlay,
            "--ignore-not-found",
            "--wait=false",
        ],
    )?;
    let client = env.node.control_plane().client().await?;
    wait_namespace_gone(&client).await?;
    let class = Api::<StorageClass>::all(client)
        .get_opt("local-path")
        .await?;
    ensure!(class.is_none(), "the default class outlived the uninstall");
    Ok(())
}

pub async fn check_default_class(client: &kube::Client) -> Result<()> {
    let class = Api::<StorageClass>::all(client.clone())
        .get("local-path")
        .await?;
    let default = class
        .metadata
        .annotations
        .unwrap_or_default()
        .get("storageclass.kubernetes.io/is-default-class")
        .cloned();
    ensure!(
        default.as_deref() == Some("true"),
        "local-path is not the default class"
    );
    Ok(())
}

pub async fn host_path_volume(env: &mut Env) -> Result<()> {
    volume_kept_and_removed(env, "hostPath").await
}

pub async fn local_volume(env: &mut Env) -> Result<()> {
    volume_kept_and_removed(env, "local").await
}

const WRITE: &str = "set -e
id -u > /data/uid
echo written-by-airflow > /data/file
mkdir -m 0700 /data/private
echo secret > /data/private/secret
chmod 0600 /data/private/secret
mkdir -p /data/deep/a/b && echo x > /data/deep/a/b/c";

const READ: &str = "set -e
test \"$(cat /data/file)\" = written-by-airflow
test \"$(cat /data/private/secret)\" = secret
test \"$(cat /data/uid)\" = 50000
echo read-back-ok";

async fn volume_kept_and_removed(env: &mut Env, volume_type: &str) -> Result<()> {
    let cp = env.node.control_plane();
    let client = cp.client().await?;
    let ns = cp.namespace("volume").await?;
    let busybox = env.node.images().busybox.clone();
    create_claim(&client, &ns, "data", json!({ "volumeType": volume_type })).await?;
    create_pod(&client, &ns, "writer", &busybox, "data", WRITE, "Never").await?;
    wait_succeeded(&client, &ns, "writer").await?;

    let pv = wait_bound(&client, &ns, "data").await?;
    let spec = pv.spec.as_ref().context("PV without a spec")?;
    match volume_type {
        "local" => ensure!(spec.local.is_some(), "not a local PV: {spec:?}"),
        _ => ensure!(spec.host_path.is_some(), "not a hostPath PV: {spec:?}"),
    }
    ensure!(affinity_node(&pv)? == NODE_NAME, "PV pinned elsewhere");
    let dir = host_path(&pv);
    let dir = Path::new(&dir);
    let file = std::fs::metadata(dir.join("file")).context("the pod's file on the host")?;
    ensure!(
        file.uid() == AIRFLOW_UID as u32,
        "file owned by {}",
        file.uid()
    );
    let private = std::fs::metadata(dir.join("private"))?;
    ensure!(
        private.uid() == AIRFLOW_UID as u32 && private.permissions().mode() & 0o777 == 0o700,
        "private dir {:o} owned by {}",
        private.permissions().mode(),
        private.uid()
    );

    delete_pod(&client, &ns, "writer").await?;
    create_pod(&client, &ns, "reader", &busybox, "data", READ, "Never").await?;
    wait_succeeded(&client, &ns, "reader").await?;
    let said = logs(&client, &ns, "reader").await?;
    ensure!(said.trim() == "read-back-ok", "reader said {said:?}");
    delete_pod(&client, &ns, "reader").await?;

    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .delete("data", &Default::default())
        .await?;
    wait_pv_gone(&client, pv.metadata.name.as_deref().unwrap_or_default()).await?;
    ensure!(!dir.exists(), "{} left on the host", dir.display());
    Ok(())
}

/// A disk the administrator mounts at the base path after the agent started
/// (a tmpfs here, as large as a claim needs): the agent's view follows the host's (`mountPropagation:
/// HostToContainer`), so the volume lands on the disk, not on the root
/// filesystem beneath it, and is removed from there.
pub async fn disk_mounted_after_start(env: &mut Env) -> Result<()> {
    let base = Path::new(BASE_PATH);
    nix::mount::mount(
        Some("tmpfs"),
        base,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4g"),
    )
    .context("mount a tmpfs at the base path")?;
    let result = on_the_new_disk(env, base).await;
    let unmounted = nix::mount::umount2(base, nix::mount::MntFlags::MNT_DETACH);
    result?;
    unmounted.context("unmount the tmpfs")?;
    Ok(())
}

async fn on_the_new_disk(env: &mut Env, base: &Path) -> Result<()> {
    let cp = env.node.control_plane();
    let client = cp.client().await?;
    let ns = cp.namespace("disk").await?;
    let busybox = env.node.images().busybox.clone();
    create_claim(&client, &ns, "data", json!({})).await?;
    create_pod(&client, &ns, "writer", &busybox, "data", WRITE, "Never").await?;
    wait_succeeded(&client, &ns, "writer").await?;
    let pv = wait_bound(&client, &ns, "data").await?;
    let dir = host_path(&pv);
    let dir = Path::new(&dir);
    let disk = std::fs::metadata(base)?.dev();
    let meta = std::fs::metadata(dir).context("the volume is not on the new disk")?;
    ensure!(
        meta.dev() == disk,
        "{} is not on the disk mounted at the base path",
        dir.display()
    );
    ensure!(
        meta.permissions().mode() & 0o777 == 0o777,
        "{} has mode {:o}: made by the kubelet, not the agent",
        dir.display(),
        meta.permissions().mode() & 0o777
    );
    ensure!(
        dir.join("file").is_file(),
        "the pod's file is not on the disk"
    );
    delete_pod(&client, &ns, "writer").await?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .delete("data", &Default::default())
        .await?;
    wait_pv_gone(&client, pv.metadata.name.as_deref().unwrap_or_default()).await?;
    ensure!(!dir.exists(), "{} left on the disk", dir.display());
    Ok(())
}
