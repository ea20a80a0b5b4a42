//! The log shipper in Kubernetes mode beside the provisioner, on the real control plane with
//! a real MinIO: an opted-in volume that is deleted keeps its directory until every log in
//! it is in the bucket, even across a MinIO outage; a volume that did not opt in is never
//! touched.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use localship_tests::shipper::folder_over_the_key_limit;
use localship_tests::{apply_yaml, control_plane, wait_for, Minio, ProvisionerAgent, ShipperAgent};

use crate::common::*;

pub(crate) const SHIP_LOGS: &str = "localship.io/ship-logs";
pub(crate) const OPT_IN: &str = "localship.io/ship-to";
const DEST: &str = "s3://airflow/logs";
const RUN: &str = "dag_id=etl/run_id=manual__2024-01-01T00:00:00+00:00";

/// A claim with `annotations` (a YAML flow mapping) and a pod on `node` that uses it.
pub(crate) async fn claim_with_pod_annotated(
    client: &Client,
    ns: &str,
    claim: &str,
    class: &str,
    node: &str,
    annotations: &str,
) -> Result<()> {
    let pod = pod_name(claim);
    let yaml = format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{ name: {claim}, annotations: {annotations} }}
spec:
  storageClassName: {class}
  accessModes: [ReadWriteOnce]
  resources: {{ requests: {{ storage: 1Gi }} }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: {pod} }}
spec:
  nodeSelector: {{ kubernetes.io/hostname: {node} }}
  {TOLERATE_TEST_NODES}
  containers: [{{ name: main, image: busybox }}]
  volumes: [{{ name: logs, persistentVolumeClaim: {{ claimName: {claim} }} }}]
"#
    );
    apply_yaml(client, Some(ns), &yaml, false).await?;
    Ok(())
}

/// Names of the PVs on `node` that carried the shipper's finalizer at any time from now on.
fn ever_held(client: &Client, node: &str) -> Arc<Mutex<HashSet<String>>> {
    let held = Arc::new(Mutex::new(HashSet::new()));
    let seen = held.clone();
    let config = watcher::Config::default().labels(&format!("localship.io/node={node}"));
    let pvs = Api::<PersistentVolume>::all(client.clone());
    tokio::spawn(async move {
        let mut stream = watcher(pvs, config).applied_objects().boxed();
        while let Some(pv) = stream.next().await {
            if let Ok(pv) = pv {
                if pv.finalizers().iter().any(|f| f == SHIP_LOGS) {
                    seen.lock().unwrap().insert(pv.name_any());
                }
            }
        }
    });
    held
}

pub(crate) fn write(root: &Path, relative: &str, bytes: &[u8]) -> Result<()> {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().context("a parent")?)?;
    std::fs::write(path, bytes)?;
    Ok(())
}

async fn object(minio: &Minio, relative: &str) -> Result<Option<Vec<u8>>> {
    minio.log_view("airflow", &format!("logs/{relative}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_volume_keeps_its_directory_until_its_logs_are_shipped() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("ship-volumes").await?;
    let mut minio = Minio::start().await?;
    minio.create_bucket("airflow").await?;
    let _agent = ProvisionerAgent::start(cp, "node-a", &provisioner_name(&ns), &[]).await?;
    let mut shipper = ShipperAgent::kubernetes(cp, "node-a", &minio, DEST, &[]).await?;
    shipper.start().await?;
    let held = ever_held(&client, "node-a");
    let class = format!("{ns}-logs");
    storage_class(&client, &class, &provisioner_name(&ns), "Delete", "").await?;
    let opted = format!("{{ {OPT_IN}: \"{DEST}\" }}");
    claim_with_pod_annotated(&client, &ns, "logs", &class, "node-a", &opted).await?;
    claim_with_pod_annotated(&client, &ns, "scratch", &class, "node-a", "{}").await?;
    let logs_pv = wait_bound(&client, &ns, "logs").await?;
    let scratch_pv = wait_bound(&client, &ns, "scratch").await?;
    let pvs = Api::<PersistentVolume>::all(client.clone());
    wait_for("the shipper's finalizer", BIND_TIMEOUT, || async {
        let pv = pvs.get(&logs_pv.name_any()).await?;
        Ok(pv.finalizers().iter().any(|f| f == SHIP_LOGS).then_some(()))
    })
    .await?;
    shipper
        .wait_metric("localship_logshipper_volumes_watched 1")
        .await?;

    // A finished log ships while the volume is in use.
    let dir = PathBuf::from(host_path(&logs_pv));
    let first = format!("{RUN}/task_id=extract/attempt=1.log");
    write(&dir, &first, b"[2024-01-01] extract: failed\n")?;
    wait_for("the first log in MinIO", BIND_TIMEOUT, || async {
        Ok(object(&minio, &first).await?.map(|_| ()))
    })
    .await?;

    // MinIO goes away; more logs are written, one grows, and a link must never be shipped.
    minio.stop();
    let mut logs = vec![
        (
            first.clone(),
            b"[2024-01-01] extract: failed\nretrying\n".to_vec(),
        ),
        (
            format!("{RUN}/task_id=extract/attempt=2.log"),
            b"[2024-01-01] extract: ok\n".to_vec(),
        ),
        (
            format!("{RUN}/task_id=wait/attempt=1.log.trigger.17.log"),
            b"trigger fired\n".to_vec(),
        ),
        (
            format!("{RUN}/task_id=load/attempt=1.log"),
            (0..20_000)
                .flat_map(|i| format!("line {i}\n").into_bytes())
                .collect(),
        ),
    ];
    for index in 0..3 {
        logs.push((
            format!("{RUN}/task_id=fan_out/map_index={index}/attempt=1.log"),
            format!("mapped {index}\n").into_bytes(),
        ));
    }
    for (relative, bytes) in &logs {
        write(&dir, relative, bytes)?;
    }
    let link = format!("{RUN}/task_id=extract/attempt=3.log");
    std::os::unix::fs::symlink("/etc/hostname", dir.join(&link))?;

    delete_claim_and_pod(&client, &ns, "logs").await?;
    delete_claim_and_pod(&client, &ns, "scratch").await?;
    // The volume that did not opt in goes at once, MinIO or not.
    wait_pv_gone(&client, &scratch_pv.name_any()).await?;
    wait_for("the opted-in PV to be deleted", BIND_TIMEOUT, || async {
        let pv = pvs.get(&logs_pv.name_any()).await?;
        Ok(pv.metadata.deletion_timestamp.map(|_| ()))
    })
    .await?;
    // Held for a few seconds, and until the shipper itself gave up on MinIO for now (the
    // S3 client's own retries hide a short outage).
    let started = Instant::now();
    loop {
        let pv = pvs.get_opt(&logs_pv.name_any()).await?;
        ensure!(pv.is_some(), "the PV went while MinIO was down");
        ensure!(dir.is_dir(), "the directory went while MinIO was down");
        let metrics = shipper.metrics()?;
        ensure!(
            metrics.contains("localship_logshipper_volumes_draining 1"),
            "{metrics}"
        );
        let noticed = metrics.contains("localship_logshipper_destination_up 0");
        if noticed && started.elapsed() > Duration::from_secs(5) {
            break;
        }
        ensure!(
            started.elapsed() < BIND_TIMEOUT,
            "the shipper never found MinIO down:\n{}",
            shipper.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The shipper dies mid-drain; MinIO is back, but nobody releases the volume.
    shipper.kill();
    minio.resume().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(pvs.get_opt(&logs_pv.name_any()).await?.is_some() && dir.is_dir());
    // Restarted, it finds the deleted PV by its finalizer and drains it.
    shipper.restart().await?;
    wait_pv_gone(&client, &logs_pv.name_any())
        .await
        .with_context(|| format!("shipper log tail:\n{}", shipper.log_tail(30)))?;
    for (relative, bytes) in &logs {
        let shipped = object(&minio, relative).await?;
        assert_eq!(shipped.as_ref(), Some(bytes), "logs/{relative}");
    }
    assert_eq!(
        object(&minio, &link).await?,
        None,
        "the symlink was shipped"
    );
    wait_for("the directory to be removed", BIND_TIMEOUT, || async {
        Ok((!dir.exists()).then_some(()))
    })
    .await?;
    let held = held.lock().unwrap().clone();
    assert!(held.contains(&logs_pv.name_any()), "{held:?}");
    assert!(
        !held.contains(&scratch_pv.name_any()),
        "the volume that did not opt in got the finalizer"
    );
    shipper.check_running()?;
    shipper
        .wait_metric("localship_logshipper_volumes_draining 0")
        .await?;
    shipper
        .wait_metric("localship_logshipper_volumes_watched 0")
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_deleted_before_the_shipper_saw_it_is_still_shipped() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("ship-early").await?;
    let minio = Minio::start().await?;
    minio.create_bucket("airflow").await?;
    let _agent = ProvisionerAgent::start(cp, "node-b", &provisioner_name(&ns), &[]).await?;
    let class = format!("{ns}-logs");
    storage_class(&client, &class, &provisioner_name(&ns), "Delete", "").await?;
    let opted = format!("{{ {OPT_IN}: \"{DEST}\" }}");
    let elsewhere = format!("{{ {OPT_IN}: \"s3://another/place\" }}");
    claim_with_pod_annotated(&client, &ns, "early", &class, "node-b", &opted).await?;
    claim_with_pod_annotated(&client, &ns, "elsewhere", &class, "node-b", &elsewhere).await?;
    let early = wait_bound(&client, &ns, "early").await?;
    let other = wait_bound(&client, &ns, "elsewhere").await?;
    // No shipper runs on the node yet: the provisioner made both PVs held for it, with
    // what their claims asked recorded on them.
    for pv in [&early, &other] {
        ensure!(
            pv.finalizers().iter().any(|f| f == SHIP_LOGS),
            "{}: {:?}",
            pv.name_any(),
            pv.finalizers()
        );
        ensure!(
            pv.annotations().contains_key(OPT_IN),
            "{:?}",
            pv.annotations()
        );
    }
    let dir = PathBuf::from(host_path(&early));
    let log = format!("{RUN}/task_id=quick/attempt=1.log");
    write(&dir, &log, b"[2024-01-01] quick: done\n")?;

    // The claims go before any shipper saw them: the volumes wait.
    delete_claim_and_pod(&client, &ns, "early").await?;
    delete_claim_and_pod(&client, &ns, "elsewhere").await?;
    let pvs = Api::<PersistentVolume>::all(client.clone());
    wait_for("the held PV to be deleted", BIND_TIMEOUT, || async {
        let pv = pvs.get(&early.name_any()).await?;
        Ok(pv.metadata.deletion_timestamp.map(|_| ()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        dir.is_dir(),
        "the directory went before its logs were shipped"
    );

    // The shipper starts: it ships what the claim asked for, from the PV's record, and
    // lets go of the volume that asked for another destination.
    let mut shipper = ShipperAgent::kubernetes(cp, "node-b", &minio, DEST, &[]).await?;
    shipper.start().await?;
    for pv in [&early, &other] {
        wait_pv_gone(&client, &pv.name_any())
            .await
            .with_context(|| format!("shipper log tail:\n{}", shipper.log_tail(30)))?;
    }
    assert_eq!(
        object(&minio, &log).await?.as_deref(),
        Some(&b"[2024-01-01] quick: done\n"[..])
    );
    shipper.check_running()?;
    Ok(())
}

/// Logs that can never ship (an object key over S3's 1,024 bytes, a 4 TiB sparse file) are
/// told about on the claim, and do not hold the volume's deletion for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_that_cannot_ship_are_told_on_the_claim_and_do_not_hold_the_drain() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("ship-refused").await?;
    let minio = Minio::start().await?;
    minio.create_bucket("airflow").await?;
    // A node of this test's own: no other test's shipper drains its volume.
    let node = cp.register_own_node(&ns).await?;
    let _agent = ProvisionerAgent::start(cp, &node, &provisioner_name(&ns), &[]).await?;
    let mut shipper = ShipperAgent::kubernetes(cp, &node, &minio, DEST, &[]).await?;
    shipper.start().await?;
    let class = format!("{ns}-logs");
    storage_class(&client, &class, &provisioner_name(&ns), "Delete", "").await?;
    let opted = format!("{{ {OPT_IN}: \"{DEST}\" }}");
    claim_with_pod_annotated(&client, &ns, "refused", &class, &node, &opted).await?;
    let pv = wait_bound(&client, &ns, "refused").await?;
    shipper
        .wait_metric("localship_logshipper_volumes_watched 1")
        .await?;
    let dir = PathBuf::from(host_path(&pv));
    let long = format!("{}/attempt=1.log", folder_over_the_key_limit());
    write(&dir, &long, b"a log whose key is too long\n")?;
    let sparse = format!("{RUN}/task_id=holes/attempt=1.log");
    write(&dir, &sparse, b"")?;
    std::fs::File::options()
        .write(true)
        .open(dir.join(&sparse))?
        .set_len(4 << 40)?;
    let good = format!("{RUN}/task_id=fine/attempt=1.log");
    write(&dir, &good, b"[2024-01-01] fine\n")?;

    let told = wait_for("an Event on the claim", BIND_TIMEOUT, || async {
        let events = claim_events(&client, &ns, "refused").await?;
        Ok(events
            .into_iter()
            .find(|(reason, note)| reason == "LogsNotShipped" && note.contains("key over"))
            .map(|(_, note)| note))
    })
    .await
    .with_context(|| format!("shipper log tail:\n{}", shipper.log_tail(30)))?;
    ensure!(told.contains("1 with an object key over"), "{told}");
    shipper
        .wait_metric(r#"localship_logshipper_skipped_total{reason="key_too_long"} 1"#)
        .await?;
    shipper
        .wait_metric(r#"localship_logshipper_skipped_total{reason="sparse"} 1"#)
        .await?;

    // Deleted, the volume drains what can ship and is let go.
    delete_claim_and_pod(&client, &ns, "refused").await?;
    wait_pv_gone(&client, &pv.name_any())
        .await
        .with_context(|| format!("shipper log tail:\n{}", shipper.log_tail(30)))?;
    assert_eq!(
        object(&minio, &good).await?.as_deref(),
        Some(&b"[2024-01-01] fine\n"[..])
    );
    assert_eq!(
        object(&minio, &sparse).await?,
        None,
        "the sparse file shipped"
    );
    shipper.check_running()?;
    Ok(())
}

/// The README's commands that release volumes still held when shipping is turned off.
fn readme_release_command() -> Result<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let after = readme
        .split_once("<!-- release-held-volumes -->\n```sh\n")
        .context("README: no release-held-volumes block")?
        .1;
    Ok(after
        .split_once("```")
        .context("README: unterminated block")?
        .0
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_release_lets_go_of_volumes_held_when_shipping_is_off() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("ship-off").await?;
    // A node of this test's own, so the release touches no other test's volumes.
    let node = cp.register_own_node(&ns).await?;
    let _agent = ProvisionerAgent::start(cp, &node, &provisioner_name(&ns), &[]).await?;
    let class = format!("{ns}-logs");
    storage_class(&client, &class, &provisioner_name(&ns), "Delete", "").await?;
    let opted = format!("{{ {OPT_IN}: \"{DEST}\" }}");
    claim_with_pod_annotated(&client, &ns, "held", &class, &node, &opted).await?;
    let pv = wait_bound(&client, &ns, "held").await?;
    ensure!(
        pv.finalizers().iter().any(|f| f == SHIP_LOGS),
        "{:?}",
        pv.finalizers()
    );
    let dir = PathBuf::from(host_path(&pv));
    delete_claim_and_pod(&client, &ns, "held").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(dir.is_dir(), "removed while held");

    let command = readme_release_command()?.replace(
        "-l localship.io/node ",
        &format!("-l localship.io/node={node} "),
    );
    let kubectl = localship_tests::servers::server_bin("kubectl")?;
    let path = format!(
        "{}:{}",
        kubectl.parent().context("kubectl's directory")?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &command])
        .env("PATH", path)
        .env("KUBECONFIG", cp.admin_kubeconfig())
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_pv_gone(&client, &pv.name_any()).await?;
    wait_for("the directory to be removed", BIND_TIMEOUT, || async {
        Ok((!dir.exists()).then_some(()))
    })
    .await?;
    Ok(())
}
