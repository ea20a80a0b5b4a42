//! Shipping installed as the README and docs/airflow.md say (the s3-shipping
//! overlay, then the Helm chart): a pod writes Airflow task logs into a claim
//! that opts in, and the `logshipper` container ships them byte for byte; a
//! claim deleted while MinIO is down keeps its PV and directory until every
//! log is shipped.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;
use localship_tests::claims::{host_path, wait_bound, wait_pv_gone};
use localship_tests::minio::{ACCESS_KEY, SECRET_KEY};
use localship_tests::wait_for;
use serde_json::json;

use crate::install::*;
use crate::pods::{create_claim, create_pod, delete_pod, wait_phase};
use crate::volumes::check_default_class;
use crate::Env;

/// The bucket `DEST` names, made when the node starts (docs/airflow.md's step 2).
pub const BUCKET: &str = "airflow";
/// The default of the overlay and the chart: each claim's logs under its namespace.
const DEST: &str = "s3://airflow/logs/{namespace}";
const SHIP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longer than the shipper's settle period (5 s) and a few of its retries.
const OUTAGE: Duration = Duration::from_secs(15);

/// A task log's path under the log folder, as Airflow names it.
fn log_path(attempt: u32) -> String {
    format!("dag_id=node_e2e/run_id=manual__2026-11-30T00:00:00+00:00/task_id=write/attempt={attempt}.log")
}

/// The lines the pod writes for `attempt`; [`expected_log`] is the same text.
fn write_log_script(attempt: u32) -> String {
    let path = log_path(attempt);
    let dir = Path::new(&path).parent().unwrap().display().to_string();
    format!(
        "set -e; mkdir -p '/data/{dir}'; i=0; while [ $i -lt 3000 ]; do \
         echo \"[2026-11-30T00:00:00.000+0000] {{taskinstance.py:1}} INFO - attempt {attempt} line $i\"; \
         i=$((i+1)); done > '/data/{path}'"
    )
}

fn expected_log(attempt: u32) -> Vec<u8> {
    let mut text = String::new();
    for i in 0..3000 {
        text.push_str(&format!(
            "[2026-11-30T00:00:00.000+0000] {{taskinstance.py:1}} INFO - attempt {attempt} line {i}\n"
        ));
    }
    text.into_bytes()
}

/// Waits until Airflow's reader, with `remote_base_log_folder` at `ns`'s prefix, finds
/// exactly what the pod wrote under the log's key.
async fn wait_shipped(env: &Env, ns: &str, attempt: u32) -> Result<()> {
    let key = format!("logs/{ns}/{}", log_path(attempt));
    let want = expected_log(attempt);
    wait_for(&format!("{key} to be shipped"), SHIP_TIMEOUT, || async {
        Ok(match env.minio.log_view(BUCKET, &key).await? {
            Some(got) if got == want => Some(()),
            Some(got) => anyhow::bail!(
                "{key} holds {} bytes, not the {} written",
                got.len(),
                want.len()
            ),
            None => None,
        })
    })
    .await
}

/// The docs' kustomize path, literally: the namespace, the Secret in it,
/// then the overlay (with the destination's endpoint set, as the docs ask).
pub async fn kustomize_shipping(env: &mut Env) -> Result<()> {
    let namespace = repo_path("deploy/base/namespace.yaml")
        .display()
        .to_string();
    kubectl(&env.node, &["apply", "-f", &namespace])?;
    create_secret(env)?;
    let patch = format!(
        "patches:\n  - target: {{ kind: ConfigMap, name: localship-shipping }}\n    patch: |-\n      - op: replace\n        path: /data/LOCALSHIP_S3_ENDPOINT\n        value: {}\n",
        env.minio.endpoint()
    );
    let overlay = user_overlay(
        &env.node.dir().join("overlays/s3-shipping"),
        "deploy/overlays/s3-shipping",
        &patch,
    )?;
    let overlay = overlay.display().to_string();
    kubectl(&env.node, &["apply", "-k", &overlay])?;
    check_shipping_agents(env, &kubectl(&env.node, &["kustomize", &overlay])?).await?;
    ships_and_holds_through_outage(env).await
}

/// Both agents' pods Ready on the node, each running as its DaemonSet in `rendered` says.
async fn check_shipping_agents(env: &Env, rendered: &str) -> Result<()> {
    let client = env.node.control_plane().client().await?;
    for (container, caps) in [
        ("provisioner", CAP_DAC_OVERRIDE | CAP_FOWNER),
        ("logshipper", CAP_DAC_READ_SEARCH),
    ] {
        let manifest = rendered_daemonset(rendered, container)?;
        let pod = wait_agent_ready(&client, &[container]).await?;
        check_agent(&env.node, &client, &pod, &manifest, &[(container, caps)]).await?;
    }
    Ok(())
}

fn create_secret(env: &Env) -> Result<()> {
    kubectl(
        &env.node,
        &[
            "-n",
            NAMESPACE,
            "create",
            "secret",
            "generic",
            "localship-s3",
            &format!("--from-literal=AWS_ACCESS_KEY_ID={ACCESS_KEY}"),
            &format!("--from-literal=AWS_SECRET_ACCESS_KEY={SECRET_KEY}"),
        ],
    )?;
    Ok(())
}

/// A worker pod writes attempt 1, which ships; with MinIO down it writes
/// attempt 2 and its claim is deleted; the volume is held until MinIO is
/// back and attempt 2 is shipped, then removed.
async fn ships_and_holds_through_outage(env: &mut Env) -> Result<()> {
    let cp = env.node.control_plane();
    let client = cp.client().await?;
    let ns = cp.namespace("worker").await?;
    let busybox = env.node.images().busybox.clone();
    create_claim(
        &client,
        &ns,
        "logs",
        json!({ "localship.io/ship-to": DEST }),
    )
    .await?;
    let script = format!("{}; sleep 3600", write_log_script(1));
    create_pod(&client, &ns, "worker", &busybox, "logs", &script, "Never").await?;
    wait_phase(&client, &ns, "worker", "Running").await?;
    let pv = wait_bound(&client, &ns, "logs").await?;
    let pv_name = pv.metadata.name.clone().context("PV name")?;
    let dir = host_path(&pv);
    wait_shipped(env, &ns, 1).await?;
    ensure!(
        std::fs::read(Path::new(&dir).join(log_path(1)))? == expected_log(1),
        "the file on the host is not what the pod wrote"
    );

    env.minio.stop();
    kubectl(
        &env.node,
        &[
            "-n",
            &ns,
            "exec",
            "worker",
            "--",
            "sh",
            "-c",
            &write_log_script(2),
        ],
    )?;
    delete_pod(&client, &ns, "worker").await?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .delete("logs", &Default::default())
        .await?;
    tokio::time::sleep(OUTAGE).await;
    let held = Api::<PersistentVolume>::all(client.clone())
        .get_opt(&pv_name)
        .await?
        .context("the PV went while its logs could not be shipped")?;
    let finalizers = held.metadata.finalizers.unwrap_or_default();
    ensure!(
        finalizers.iter().any(|f| f == "localship.io/ship-logs"),
        "PV held without the shipper's finalizer: {finalizers:?}"
    );
    ensure!(
        Path::new(&dir).join(log_path(2)).is_file(),
        "the directory went while its logs could not be shipped"
    );

    env.minio.resume().await?;
    wait_shipped(env, &ns, 2).await?;
    wait_pv_gone(&client, &pv_name).await?;
    ensure!(!Path::new(&dir).exists(), "{dir} left on the host");
    wait_shipped(env, &ns, 1).await
}

/// The docs' Helm path: the namespace, its Pod Security label, the Secret,
/// then `helm install` with shipping on and only the image named.
pub async fn helm_install(env: &mut Env) -> Result<()> {
    kubectl(&env.node, &["create", "namespace", NAMESPACE])?;
    kubectl(
        &env.node,
        &[
            "label",
            "namespace",
            NAMESPACE,
            "pod-security.kubernetes.io/enforce=privileged",
        ],
    )?;
    create_secret(env)?;
    let chart = repo_path("deploy/helm/localship").display().to_string();
    let (repository, tag) = localship_tests::node::images::LOCALSHIP_IMAGE
        .rsplit_once(':')
        .context("image without a tag")?;
    let values = [
        "--set".to_string(),
        "shipping.enabled=true".into(),
        "--set".into(),
        format!("shipping.dest={DEST}"),
        "--set".into(),
        format!("shipping.endpoint={}", env.minio.endpoint()),
        "--set".into(),
        "shipping.pathStyle=true".into(),
        "--set".into(),
        "shipping.existingSecret=localship-s3".into(),
        "--set".into(),
        format!("image.repository={repository}"),
        "--set".into(),
        format!("image.tag={tag}"),
    ];
    let mut args = vec!["install", "localship", &chart, "-n", NAMESPACE];
    args.extend(values.iter().map(String::as_str));
    helm(&env.node, &args)?;
    let mut template = vec!["template", "localship", &chart, "-n", NAMESPACE];
    template.extend(values.iter().map(String::as_str));
    check_shipping_agents(env, &helm(&env.node, &template)?).await?;
    check_default_class(&env.node.control_plane().client().await?).await
}

/// Under the chart's install: a worker's log ships, and its volume goes once
/// it has.
pub async fn helm_ships(env: &mut Env) -> Result<()> {
    let cp = env.node.control_plane();
    let client = cp.client().await?;
    let ns = cp.namespace("worker").await?;
    let busybox = env.node.images().busybox.clone();
    create_claim(
        &client,
        &ns,
        "logs",
        json!({ "localship.io/ship-to": DEST }),
    )
    .await?;
    create_pod(
        &client,
        &ns,
        "worker",
        &busybox,
        "logs",
        &write_log_script(3),
        "Never",
    )
    .await?;
    wait_phase(&client, &ns, "worker", "Succeeded").await?;
    let pv = wait_bound(&client, &ns, "logs").await?;
    wait_shipped(env, &ns, 3).await?;
    delete_pod(&client, &ns, "worker").await?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .delete("logs", &Default::default())
        .await?;
    wait_pv_gone(&client, pv.metadata.name.as_deref().unwrap_or_default()).await?;
    ensure!(
        !Path::new(&host_path(&pv)).exists(),
        "directory left on the host"
    );
    Ok(())
}
