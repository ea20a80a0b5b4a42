//! Claims and busybox pods on the real node, and waits on what the kubelet
//! reports about them.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::Client;
use localship_tests::wait_for;
use serde_json::json;

/// Airflow's uid in its official image; its gid is 0.
pub const AIRFLOW_UID: i64 = 50000;

pub const POD_TIMEOUT: Duration = Duration::from_secs(180);

/// A claim on the default class (no `storageClassName`), with `annotations`.
pub async fn create_claim(
    client: &Client,
    ns: &str,
    name: &str,
    annotations: serde_json::Value,
) -> Result<()> {
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": name, "annotations": annotations },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": "1Gi" } },
        }
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &claim)
        .await
        .with_context(|| format!("create claim {ns}/{name}"))?;
    Ok(())
}

/// A busybox pod running `script` as Airflow's uid with `claim` at /data.
/// `restart` is the pod's restartPolicy.
pub async fn create_pod(
    client: &Client,
    ns: &str,
    name: &str,
    image: &str,
    claim: &str,
    script: &str,
    restart: &str,
) -> Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": false,
            "securityContext": { "runAsUser": AIRFLOW_UID, "runAsGroup": 0, "fsGroup": 0 },
            "containers": [{
                "name": "main",
                "image": image,
                "command": ["sh", "-c", script],
                "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
            }],
            "volumes": [{ "name": "data", "persistentVolumeClaim": { "claimName": claim } }],
        }
    }))?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {ns}/{name}"))?;
    Ok(())
}

/// The pod's phase once it is `phase` (Succeeded, Running); a pod that
/// failed, or whose container keeps failing, ends the wait with its state.
pub async fn wait_phase(client: &Client, ns: &str, name: &str, phase: &str) -> Result<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let what = format!("pod {ns}/{name} to be {phase}");
    // A probe error is the state the timeout reports; a failed pod ends the
    // wait at once.
    let outcome = wait_for(&what, POD_TIMEOUT, || async {
        let pod = pods.get(name).await?;
        let now = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if now == phase {
            return Ok(Some(Ok(pod)));
        }
        if now == "Failed" {
            return Ok(Some(Err(anyhow::anyhow!(
                "pod {ns}/{name} failed: {}",
                describe(&pod)
            ))));
        }
        bail!("{}", describe(&pod))
    })
    .await?;
    outcome
}

/// Waits for the pod's container to have exited 0.
pub async fn wait_succeeded(client: &Client, ns: &str, name: &str) -> Result<Pod> {
    wait_phase(client, ns, name, "Succeeded").await
}

/// Ready condition, restarts and container states, for failure messages.
pub fn describe(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let containers: Vec<String> = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            format!(
                "{}: restarts {} state {}",
                c.name,
                c.restart_count,
                serde_json::to_string(&c.state).unwrap_or_default()
            )
        })
        .collect();
    format!(
        "phase {:?}, conditions {}, containers [{}]",
        status.phase,
        serde_json::to_string(&status.conditions).unwrap_or_default(),
        containers.join("; ")
    )
}

/// Deletes a pod and waits until the kubelet has torn it down (the object is
/// gone only once its containers and volumes are).
pub async fn delete_pod(client: &Client, ns: &str, name: &str) -> Result<()> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.delete(name, &DeleteParams::default()).await?;
    wait_for(
        &format!("pod {ns}/{name} to be gone"),
        POD_TIMEOUT,
        || async { Ok(pods.get_opt(name).await?.is_none().then_some(())) },
    )
    .await
}

/// `kubectl logs` of a pod, through the apiserver and the kubelet.
pub async fn logs(client: &Client, ns: &str, name: &str) -> Result<String> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .logs(name, &Default::default())
        .await?)
}
