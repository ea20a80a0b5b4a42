//! The provisioner against the real control plane: one agent per node, each
//! test with its own provisioner name so tests never touch each other's claims.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use localship_tests::shipper::metric_value;
use localship_tests::{apply_yaml, control_plane, wait_for, ProvisionerAgent};
use serde_json::json;

use crate::common::*;

async fn two_agents(ns: &str, extra: &[String]) -> Result<(ProvisionerAgent, ProvisionerAgent)> {
    let cp = control_plane()?;
    let name = provisioner_name(ns);
    let a = ProvisionerAgent::start(cp, "node-a", &name, extra).await?;
    let b = ProvisionerAgent::start(cp, "node-b", &name, extra).await?;
    Ok((a, b))
}

/// Every volume directory under a base path, one level deep.
fn dirs(base: &Path) -> BTreeSet<PathBuf> {
    localship_tests::claims::volume_dirs(base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_on_each_node_bind_to_a_directory_on_that_node() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("prov-nodes").await?;
    let (a, b) = two_agents(&ns, &[]).await?;
    let class = format!("{ns}-local");
    storage_class(&client, &class, &provisioner_name(&ns), "Delete", "").await?;
    for node in ["node-a", "node-b"] {
        claim_with_pod(
            &client,
            &ns,
            &format!("data-{node}"),
            Some(&class),
            "1Gi",
            Some(node),
        )
        .await?;
    }
    for (node, agent) in [("node-a", &a), ("node-b", &b)] {
        let claim = format!("data-{node}");
        let pv = wait_bound(&client, &ns, &claim).await?;
        assert_eq!(affinity_node(&pv)?, node);
        let path = PathBuf::from(host_path(&pv));
        assert!(
            path.starts_with(agent.base_path()),
            "{} not under {}",
            path.display(),
            agent.base_path().display()
        );
        assert!(path.is_dir());
        let dir_name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(dir_name, format!("{}_{ns}_{claim}", pv.name_any()));
        let spec = pv.spec.clone().unwrap();
        assert_eq!(
            spec.host_path.unwrap().type_.as_deref(),
            Some("DirectoryOrCreate")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some(class.as_str()));
        assert_eq!(
            pv.annotations()["pv.kubernetes.io/provisioned-by"],
            provisioner_name(&ns)
        );
        assert!(pv.finalizers().iter().any(|f| f == "localship.io/cleanup"));
        let reasons: Vec<String> = claim_events(&client, &ns, &claim)
            .await?
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert!(
            reasons.contains(&"ProvisioningSucceeded".to_string()),
            "{reasons:?}"
        );
        // The scheduler finishes binding the pod to the node once the volume is bound.
        let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns);
        let pod = pod_name(&claim);
        let placed = wait_for("pod bound to its node", BIND_TIMEOUT, || async {
            Ok(pods.get(&pod).await?.spec.and_then(|s| s.node_name))
        })
        .await?;
        assert_eq!(placed, node);
    }
    // Each agent made exactly its own node's directory.
    assert_eq!(dirs(&a.base_path()).len(), 1);
    assert_eq!(dirs(&b.base_path()).len(), 1);
    let metrics = a.metrics()?;
    assert!(
        metrics.contains(
            r#"localship_provisioner_operations_total{operation="provision",result="success"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("localship_provisioner_base_path_free_bytes"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_directory_without_following_symlinks_and_retain_keeps_it() -> Result<()>
{
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("prov-reclaim").await?;
    let (a, _b) = two_agents(&ns, &[]).await?;
    let (delete, retain) = (format!("{ns}-delete"), format!("{ns}-retain"));
    storage_class(&client, &delete, &provisioner_name(&ns), "Delete", "").await?;
    storage_class(&client, &retain, &provisioner_name(&ns), "Retain", "").await?;
    claim_with_pod(&client, &ns, "gone", Some(&delete), "1Gi", Some("node-a")).await?;
    claim_with_pod(&client, &ns, "kept", Some(&retain), "1Gi", Some("node-a")).await?;
    let gone = wait_bound(&client, &ns, "gone").await?;
    let kept = wait_bound(&client, &ns, "kept").await?;

    // Data inside, and symlinks pointing outside the volume.
    let outside = a.dir().join("outside");
    std::fs::create_dir_all(outside.join("sub"))?;
    std::fs::write(outside.join("sub/precious"), b"must survive")?;
    let gone_dir = PathBuf::from(host_path(&gone));
    std::fs::create_dir_all(gone_dir.join("dag_id=x/run_id=y"))?;
    std::fs::write(gone_dir.join("dag_id=x/run_id=y/attempt=1.log"), b"log")?;
    std::os::unix::fs::symlink(&outside, gone_dir.join("escape"))?;
    std::os::unix::fs::symlink(
        outside.join("sub/precious"),
        gone_dir.join("dag_id=x/file-link"),
    )?;
    let kept_dir = PathBuf::from(host_path(&kept));
    std::fs::write(kept_dir.join("data"), b"keep me")?;

    delete_claim_and_pod(&client, &ns, "gone").await?;
    delete_claim_and_pod(&client, &ns, "kept").await?;
    wait_pv_gone(&client, &gone.name_any()).await?;
    assert!(!gone_dir.exists(), "{} still exists", gone_dir.display());
    assert_eq!(
        std::fs::read(outside.join("sub/precious"))?,
        b"must survive"
    );

    let pvs = Api::<PersistentVolume>::all(client.clone());
    let released = wait_for("the Retain PV to be Released", BIND_TIMEOUT, || async {
        let pv = pvs.get(&kept.name_any()).await?;
        Ok((pv.status.and_then(|s| s.phase).as_deref() == Some("Released")).then_some(()))
    })
    .await;
    released?;
    assert_eq!(std::fs::read(kept_dir.join("data"))?, b"keep me");
    // Deleting a Retain PV by hand keeps its directory too.
    pvs.delete(&kept.name_any(), &Default::default()).await?;
    wait_pv_gone(&client, &kept.name_any()).await?;
    assert_eq!(std::fs::read(kept_dir.join("data"))?, b"keep me");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_253_character_claim_name_binds() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("prov-long").await?;
    let (a, _b) = two_agents(&ns, &[]).await?;
    let class = format!("{ns}-local");
    storage_class(&client, &class, &provisioner_name(&ns), "Delete", "").await?;
    let claim: String = "l".repeat(253);
    claim_with_pod(&client, &ns, &claim, Some(&class), "1Gi", Some("node-a")).await?;
    let pv = wait_bound(&client, &ns, &claim).await?;
    let path = PathBuf::from(host_path(&pv));
    assert!(path.is_dir());
    assert_eq!(path.parent(), Some(a.base_path().as_path()));
    let name = path.file_name().unwrap().len();
    assert!(name <= 255, "component is {name} bytes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_too_big_for_the_node_is_handed_back_and_lands_on_another() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("prov-space").await?;
    // Two nodes of this test's own, tainted so no other test's pods land there.
    let (small, big) = (format!("{ns}-small"), format!("{ns}-big"));
    let taint = json!([{ "key": "localship.io/test", "value": ns, "effect": "NoSchedule" }]);
    for node in [&small, &big] {
        cp.register_node(node, json!({ "localship.io/test": ns }), taint.clone())
            .await?;
    }
    let nodes = Api::<Node>::all(client.clone());
    let cordon = |on: bool| json!({ "spec": { "unschedulable": on } });
    nodes
        .patch(&big, &PatchParams::default(), &Patch::Merge(cordon(true)))
        .await?;

    let name = provisioner_name(&ns);
    // The small node keeps all but 1 GiB of its disk free, so 2 GiB cannot fit.
    let free = nix::sys::statvfs::statvfs(std::env::temp_dir().as_path())?;
    let free = free.blocks_available() as u64 * free.fragment_size() as u64;
    let reserve = format!("--reserve={}", free.saturating_sub(1 << 30));
    let _small_agent = ProvisionerAgent::start(cp, &small, &name, &[reserve]).await?;
    let big_agent = ProvisionerAgent::start(cp, &big, &name, &[]).await?;
    let class = format!("{ns}-local");
    storage_class(&client, &class, &name, "Delete", "").await?;
    let yaml = format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{ name: big }}
spec:
  storageClassName: {class}
  accessModes: [ReadWriteOnce]
  resources: {{ requests: {{ storage: 2Gi }} }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: {pod} }}
spec:
  nodeSelector: {{ localship.io/test: {ns} }}
  tolerations: [{{ key: localship.io/test, operator: Equal, value: {ns}, effect: NoSchedule }}]
  containers: [{{ name: main, image: busybox }}]
  volumes: [{{ name: data, persistentVolumeClaim: {{ claimName: big }} }}]
"#,
        pod = pod_name("big")
    );
    apply_yaml(&client, Some(&ns), &yaml, false).await?;
    // Only the small node is schedulable: it must refuse and hand the claim back.
    let msg = wait_for(
        "a ProvisioningFailed Event from the small node",
        BIND_TIMEOUT,
        || async {
            Ok(claim_events(&client, &ns, "big")
                .await?
                .into_iter()
                .find(|(r, m)| r == "ProvisioningFailed" && m.contains("handing the claim back")))
        },
    )
    .await?;
    assert!(msg.1.contains("not enough space"), "{msg:?}");
    nodes
        .patch(&big, &PatchParams::default(), &Patch::Merge(cordon(false)))
        .await?;
    let pv = wait_bound(&client, &ns, "big").await?;
    assert_eq!(affinity_node(&pv)?, big);
    assert!(PathBuf::from(host_path(&pv)).starts_with(big_agent.base_path()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_burst_leaves_one_volume_per_claim_and_no_orphans() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("prov-crash").await?;
    let (mut a, mut b) = two_agents(&ns, &[]).await?;
    let class = format!("{ns}-local");
    storage_class(&client, &class, &provisioner_name(&ns), "Delete", "").await?;
    let claims: Vec<String> = (0..30).map(|i| format!("burst-{i}")).collect();
    for (i, claim) in claims.iter().enumerate() {
        let node = if i % 2 == 0 { "node-a" } else { "node-b" };
        claim_with_pod(&client, &ns, claim, Some(&class), "64Mi", Some(node)).await?;
        if i == 10 {
            a.kill();
        }
        if i == 20 {
            b.kill();
            a.restart().await?;
        }
    }
    b.restart().await?;
    let mut by_uid: HashMap<String, usize> = HashMap::new();
    let mut paths = BTreeSet::new();
    for claim in &claims {
        let pv = wait_bound(&client, &ns, claim).await?;
        paths.insert(PathBuf::from(host_path(&pv)));
    }
    for pv in pvs_in(&client, &ns).await? {
        let uid = pv.spec.unwrap().claim_ref.unwrap().uid.unwrap_or_default();
        *by_uid.entry(uid).or_default() += 1;
    }
    assert_eq!(by_uid.len(), claims.len(), "PVs per claim: {by_uid:?}");
    assert!(
        by_uid.values().all(|n| *n == 1),
        "duplicate PVs: {by_uid:?}"
    );
    let on_disk: BTreeSet<PathBuf> = dirs(&a.base_path())
        .union(&dirs(&b.base_path()))
        .cloned()
        .collect();
    assert_eq!(
        on_disk, paths,
        "directories without a PV, or PVs without a directory"
    );
    let claims_api = Api::<PersistentVolumeClaim>::namespaced(client, &ns);
    let pending = claims_api
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound"))
        .count();
    assert_eq!(pending, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_takes_effect_without_restart() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("prov-config").await?;
    let dir = localship_tests::scratch_dir("config")?;
    let (first, second) = (dir.join("first"), dir.join("second"));
    let config = dir.join("config.json");
    let write = |path: &Path| {
        std::fs::write(
            &config,
            json!({ "nodePathMap": [{ "node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [path] }] }).to_string(),
        )
    };
    write(&first)?;
    let args = [
        format!("--config={}", config.display()),
        "--config-poll=200ms".to_string(),
    ];
    let agent = ProvisionerAgent::start(cp, "node-a", &provisioner_name(&ns), &args).await?;
    let pid = agent.pid();
    let class = format!("{ns}-local");
    storage_class(&client, &class, &provisioner_name(&ns), "Delete", "").await?;
    claim_with_pod(&client, &ns, "before", Some(&class), "1Gi", Some("node-a")).await?;
    let pv = wait_bound(&client, &ns, "before").await?;
    assert!(PathBuf::from(host_path(&pv)).starts_with(&first));

    // A broken edit is refused and the old config stays in force.
    std::fs::write(&config, "{ not json")?;
    wait_for(
        "the agent to refuse the edit",
        Duration::from_secs(10),
        || async {
            let m = agent.metrics()?;
            Ok(m.contains(r#"config_reloads_total{result="error"} 1"#)
                .then_some(()))
        },
    )
    .await?;
    write(&second)?;
    wait_for(
        "the agent to count the reload",
        Duration::from_secs(10),
        || async {
            let m = agent.metrics()?;
            Ok((m.contains(r#"config_reloads_total{result="success"} 1"#)
                && m.contains(r#"config_reloads_total{result="error"} 1"#))
            .then_some(()))
        },
    )
    .await?;
    claim_with_pod(&client, &ns, "after", Some(&class), "1Gi", Some("node-a")).await?;
    let pv = wait_bound(&client, &ns, "after").await?;
    assert!(
        PathBuf::from(host_path(&pv)).starts_with(&second),
        "{}",
        host_path(&pv)
    );
    assert_eq!(agent.pid(), pid, "the agent restarted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_without_a_class_binds_through_the_default_class() -> Result<()> {
    let _default_class = DEFAULT_CLASS.lock().await;
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("prov-sts").await?;
    let (_a, _b) = two_agents(&ns, &[]).await?;
    let yaml = format!(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {ns}-default
  annotations: {{ storageclass.kubernetes.io/is-default-class: "true" }}
provisioner: {prov}
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: airflow-worker }}
spec:
  serviceName: airflow-worker
  replicas: 2
  podManagementPolicy: Parallel
  selector: {{ matchLabels: {{ app: worker }} }}
  template:
    metadata: {{ labels: {{ app: worker }} }}
    spec:
      containers: [{{ name: worker, image: apache/airflow, volumeMounts: [{{ name: logs, mountPath: /opt/airflow/logs }}] }}]
  volumeClaimTemplates:
  - metadata: {{ name: logs }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: 1Gi }} }}
"#,
        prov = provisioner_name(&ns)
    );
    apply_yaml(&client, Some(&ns), &yaml, false).await?;
    for i in 0..2 {
        let claim = format!("logs-airflow-worker-{i}");
        let pv = wait_bound(&client, &ns, &claim).await?;
        assert_eq!(
            pv.spec.unwrap().storage_class_name,
            Some(format!("{ns}-default"))
        );
    }
    // Not the default for other tests' claims once this one is done.
    Api::<k8s_openapi::api::storage::v1::StorageClass>::all(client)
        .delete(&format!("{ns}-default"), &Default::default())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_classes_get_one_clear_event_and_the_agent_serves_the_rest() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("prov-bad").await?;
    let (a, b) = two_agents(&ns, &[]).await?;
    let prov = provisioner_name(&ns);
    let hostile = format!("{ns}-hostile");
    storage_class(
        &client,
        &hostile,
        &prov,
        "Delete",
        r#"pathPattern: "../{{ .PVC.Name }}""#,
    )
    .await?;
    let immediate = format!(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{ name: {ns}-immediate }}
provisioner: {prov}
volumeBindingMode: Immediate
"#
    );
    apply_yaml(&client, None, &immediate, false).await?;
    let good = format!("{ns}-good");
    storage_class(&client, &good, &prov, "Delete", "").await?;

    claim_with_pod(
        &client,
        &ns,
        "escape",
        Some(&hostile),
        "1Gi",
        Some("node-a"),
    )
    .await?;
    claim_with_pod(
        &client,
        &ns,
        "now",
        Some(&format!("{ns}-immediate")),
        "1Gi",
        None,
    )
    .await?;
    claim_with_pod(&client, &ns, "fine", Some(&good), "1Gi", Some("node-a")).await?;
    wait_bound(&client, &ns, "fine").await?;

    let failed = wait_for(
        "ProvisioningFailed for the hostile pathPattern",
        BIND_TIMEOUT,
        || async {
            Ok(claim_events(&client, &ns, "escape")
                .await?
                .into_iter()
                .find(|(r, _)| r == "ProvisioningFailed"))
        },
    )
    .await?;
    assert!(failed.1.contains(".."), "{failed:?}");
    let wffc = wait_for("the WaitForFirstConsumer Event", BIND_TIMEOUT, || async {
        let events = claim_events(&client, &ns, "now").await?;
        Ok(events
            .iter()
            .any(|(r, _)| r == "WaitForFirstConsumerRequired")
            .then_some(events))
    })
    .await?;
    // Two agents saw the claim; the Event is there once. Each agent counts its try at the
    // Event once that try is over, so the Events are counted after both tried.
    let immediate = |agent: &ProvisionerAgent, result: &str| -> Result<f64> {
        let series =
            format!("localship_provisioner_immediate_binding_claims_total{{result=\"{result}\"}}");
        Ok(metric_value(&agent.metrics()?, &series).unwrap_or(0.0))
    };
    let tried = |agent: &ProvisionerAgent| -> Result<bool> {
        let results = ["published", "exists", "error"];
        Ok(results
            .iter()
            .map(|r| immediate(agent, r))
            .sum::<Result<f64>>()?
            > 0.0)
    };
    wait_for("both agents to try the Event", BIND_TIMEOUT, || async {
        Ok((tried(&a)? && tried(&b)?).then_some(()))
    })
    .await?;
    assert_eq!(
        immediate(&a, "published")? + immediate(&b, "published")?,
        1.0,
        "{wffc:?}"
    );
    let count = claim_events(&client, &ns, "now")
        .await?
        .iter()
        .filter(|(r, _)| r == "WaitForFirstConsumerRequired")
        .count();
    assert_eq!(count, 1, "{wffc:?}");
    // Nothing escaped the base path.
    let parent = a.base_path().parent().unwrap().to_path_buf();
    assert!(!parent.join("escape").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_sweep_removes_empty_orphans_and_keeps_data() -> Result<()> {
    let cp = control_plane()?;
    let ns = cp.namespace("prov-sweep").await?;
    let base = localship_tests::scratch_dir("sweep")?.join("base");
    // What a kill -9 between mkdir and PV creation leaves, for claims since deleted.
    let empty = base.join("pvc-00000000-0000-4000-8000-000000000001_gone_a");
    let full = base.join("pvc-00000000-0000-4000-8000-000000000002_gone_b");
    let foreign = base.join("someone-elses-dir");
    for d in [&empty, &full, &foreign] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(full.join("data"), b"not ours to delete")?;
    let args = [format!("--base-path={}", base.display())];
    let agent = ProvisionerAgent::start(cp, "node-a", &provisioner_name(&ns), &args).await?;
    assert!(!empty.exists(), "empty orphan kept");
    assert_eq!(std::fs::read(full.join("data"))?, b"not ours to delete");
    assert!(foreign.exists());
    let m = agent.metrics()?;
    assert!(
        m.contains(r#"orphan_directories_total{action="removed"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"orphan_directories_total{action="kept"} 1"#),
        "{m}"
    );
    Ok(())
}
