//! Installing localship on the real node the way the README and
//! docs/airflow.md tell a user to: `kubectl apply -k` of an overlay of the
//! user's own that only names the image (and, for shipping, the endpoint),
//! or `helm install`; and the checks every install must pass.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{Api, ListParams};
use kube::Client;
pub use localship_tests::node::install::{helm, kubectl, repo_path, user_overlay};
use localship_tests::node::{RealNode, NODE_NAME};
use localship_tests::wait_for;
use serde_json::Value;

use crate::pods::{describe, POD_TIMEOUT};

pub const NAMESPACE: &str = "localship";

/// The DaemonSet's pod on the real node once every container is Ready, with
/// `containers` as its container names.
pub async fn wait_agent_ready(client: &Client, containers: &[&str]) -> Result<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let mut want: Vec<&str> = containers.to_vec();
    want.sort();
    // A probe error is not fatal to the wait: it is the state reported on timeout.
    let ready = wait_for(
        "the localship pod on the node to be Ready",
        POD_TIMEOUT,
        || {
            let pods = pods.clone();
            let want = want.clone();
            async move {
                let list = pods.list(&ListParams::default()).await?;
                let mut seen = String::from("no pod of the DaemonSet on the node");
                for pod in list.items {
                    let spec = pod.spec.clone().unwrap_or_default();
                    let mut names: Vec<&str> =
                        spec.containers.iter().map(|c| c.name.as_str()).collect();
                    names.sort();
                    let deleting = pod.metadata.deletion_timestamp.is_some();
                    if spec.node_name.as_deref() != Some(NODE_NAME) || names != want || deleting {
                        continue;
                    }
                    let ready = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    if ready {
                        return Ok(Some(pod));
                    }
                    seen = describe(&pod);
                }
                bail!("{seen}")
            }
        },
    )
    .await;
    match ready {
        Ok(pod) => Ok(pod),
        Err(e) => Err(e.context(container_logs(&pods, containers).await)),
    }
}

/// The last lines of each container of the node's localship pods.
async fn container_logs(pods: &Api<Pod>, containers: &[&str]) -> String {
    let mut text = String::new();
    let Ok(list) = pods.list(&ListParams::default()).await else {
        return text;
    };
    for pod in list.items {
        let name = pod.metadata.name.unwrap_or_default();
        for container in containers {
            let params = kube::api::LogParams {
                container: Some(container.to_string()),
                tail_lines: Some(20),
                ..Default::default()
            };
            let logs = pods
                .logs(&name, &params)
                .await
                .unwrap_or_else(|e| e.to_string());
            text.push_str(&format!("--- {name}/{container}:\n{logs}\n"));
        }
    }
    text
}

/// The last lines each container wrote before its last restart.
async fn previous_logs(client: &Client, pod: &str, containers: &[&str]) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let mut text = String::new();
    for container in containers {
        let params = kube::api::LogParams {
            container: Some(container.to_string()),
            previous: true,
            tail_lines: Some(30),
            ..Default::default()
        };
        let logs = pods
            .logs(pod, &params)
            .await
            .unwrap_or_else(|e| e.to_string());
        text.push_str(&format!(
            "--- {pod}/{container}, before its restart:\n{logs}\n"
        ));
    }
    text
}

/// What the manifest asks of each container holds for the process the
/// runtime started, read from the host: its uid, its capability sets, no
/// new privileges, and a read-only root. `caps` is the CapEff mask the
/// manifest's `add` list makes. Both probes pass: the pod is Ready, no
/// container restarted, and no probe failed once the pod was Ready.
pub async fn check_agent(
    node: &RealNode,
    client: &Client,
    pod: &Pod,
    manifest: &DaemonSet,
    caps: &[(&str, u64)],
) -> Result<()> {
    let name = pod.metadata.name.as_deref().context("pod without a name")?;
    let template = manifest
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("DaemonSet without a pod template")?;
    let running = pod.spec.as_ref().context("pod without a spec")?;
    for (container, mask) in caps {
        let want = template
            .containers
            .iter()
            .find(|c| c.name == *container)
            .with_context(|| format!("no {container} in the manifest"))?;
        let got = running
            .containers
            .iter()
            .find(|c| c.name == *container)
            .with_context(|| format!("no {container} in the pod"))?;
        ensure!(
            want.security_context == got.security_context,
            "{container}: the pod's securityContext differs from the manifest's"
        );
        for probe in [&got.liveness_probe, &got.readiness_probe] {
            ensure!(probe.is_some(), "{container} runs without its probes");
        }
        let pid = node.container_pid(NAMESPACE, name, container).await?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |key: &str| -> Result<String> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .with_context(|| format!("no {key} in /proc/{pid}/status"))
        };
        let uid = want
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .context("the manifest sets no runAsUser")?;
        let uids: Vec<String> = field("Uid:")?
            .split_whitespace()
            .map(String::from)
            .collect();
        ensure!(
            uids.iter().all(|u| *u == uid.to_string()),
            "{container} runs as uids {uids:?}, the manifest says {uid}"
        );
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let got = u64::from_str_radix(&field(set)?, 16)?;
            ensure!(
                got == *mask,
                "{container} {set} {got:#x}, the manifest's capabilities make {mask:#x}"
            );
        }
        ensure!(
            field("NoNewPrivs:")? == "1",
            "{container} may gain privileges"
        );
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        let root = mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .context("no root mount")?;
        let options = root.split(' ').nth(5).unwrap_or_default();
        ensure!(
            options.split(',').any(|o| o == "ro"),
            "{container}'s root is not read-only: {root}"
        );
    }
    // A liveness probe that failed would have raised an Event and restarted
    // the container; a readiness probe that fails keeps the pod not Ready.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pod = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .get(name)
        .await?;
    let restarts: i32 = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or_default();
    if restarts != 0 {
        let containers: Vec<&str> = caps.iter().map(|(c, _)| *c).collect();
        let previous = previous_logs(client, name, &containers).await;
        bail!("containers restarted: {}\n{previous}", describe(&pod));
    }
    // A readiness probe may fail while a container starts (it is not ready
    // yet); once the pod is Ready, no probe of either kind may fail.
    let ready_since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .and_then(|c| c.last_transition_time.clone())
        .context("the pod is no longer Ready")?
        .0;
    let events = Api::<Event>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await?;
    let unhealthy: Vec<String> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Unhealthy"))
        .filter(|e| {
            let message = e.message.as_deref().unwrap_or_default();
            let last = e.last_timestamp.as_ref().map(|t| t.0);
            !message.starts_with("Readiness") || last.is_none_or(|t| t > ready_since)
        })
        .filter_map(|e| e.message.clone())
        .collect();
    ensure!(unhealthy.is_empty(), "probes failed: {unhealthy:?}");
    Ok(())
}

/// The DaemonSet as rendered (`kubectl kustomize` or `helm template`).
pub fn rendered_daemonset(yaml: &str, container: &str) -> Result<DaemonSet> {
    for doc in yaml.split("\n---\n") {
        let value: Value = serde_yaml::from_str(doc)?;
        let containers = &value["spec"]["template"]["spec"]["containers"];
        let has = |c: &Value| c["name"] == container;
        if value["kind"] == "DaemonSet" && containers.as_array().is_some_and(|l| l.iter().any(has))
        {
            return Ok(serde_json::from_value(value)?);
        }
    }
    bail!("no DaemonSet with a {container} container rendered")
}

/// Removes an install and waits for its namespace to be gone, so the next
/// one starts clean.
pub async fn wait_namespace_gone(client: &Client) -> Result<()> {
    let namespaces = Api::<Namespace>::all(client.clone());
    wait_for(
        "namespace localship to be gone",
        Duration::from_secs(120),
        || async { Ok(namespaces.get_opt(NAMESPACE).await?.is_none().then_some(())) },
    )
    .await
}

/// CapEff bits of the capabilities the manifests add.
pub const CAP_DAC_OVERRIDE: u64 = 1 << 1;
pub const CAP_DAC_READ_SEARCH: u64 = 1 << 2;
pub const CAP_FOWNER: u64 = 1 << 3;
