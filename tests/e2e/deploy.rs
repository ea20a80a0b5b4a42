//! What an operator installs: `deploy/` passes server-side dry-run and a real
//! apply on the real apiserver, and the agents running under its
//! ServiceAccount's RBAC provision, bind and delete Airflow-shaped claims
//! through its default StorageClass.

use std::path::PathBuf;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use localship_tests::{apply_yaml, authority, control_plane, wait_for, ProvisionerAgent};

use crate::common::*;

fn kustomize() -> Result<String> {
    kustomize_dir("deploy")
}

/// `kubectl kustomize` of a directory relative to the workspace root.
pub fn kustomize_dir(dir: &str) -> Result<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir);
    let out = control_plane()?.kubectl(&["kustomize", root.to_str().unwrap()])?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The `localship` namespace, for real: namespaced objects cannot be dry-run
/// into a namespace that does not exist (kubectl --dry-run=server has the same
/// limit).
async fn localship_namespace(client: &kube::Client, manifests: &str) -> Result<()> {
    let namespace = manifests
        .split("\n---\n")
        .find(|d| d.contains("kind: Namespace"))
        .context("no Namespace")?;
    apply_yaml(client, None, namespace, false).await?;
    Ok(())
}

/// The containers of every DaemonSet among `objects`.
fn containers(objects: &[serde_json::Value]) -> Result<Vec<&serde_json::Value>> {
    let mut all = Vec::new();
    for daemonset in objects.iter().filter(|o| o["kind"] == "DaemonSet") {
        all.extend(
            daemonset["spec"]["template"]["spec"]["containers"]
                .as_array()
                .context("no containers")?,
        );
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kustomize_component_passes_server_side_dry_run() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    servicemonitor_crd(&client).await?;
    localship_namespace(&client, &kustomize()?).await?;
    let dry_run = |dir: &'static str| {
        let client = client.clone();
        async move {
            let objects = apply_yaml(&client, None, &kustomize_dir(dir)?, true)
                .await
                .with_context(|| format!("dry-run of {dir}"))?;
            objects
                .into_iter()
                .map(|o| Ok(serde_json::to_value(o)?))
                .collect::<Result<Vec<_>>>()
        }
    };

    // service-monitor: scrapes both metrics ports of the metrics Service.
    let objects = dry_run("tests/e2e/fixtures/kustomize/service-monitor").await?;
    let monitor = object(&objects, "ServiceMonitor", Some("localship"))?;
    let service = object(&objects, "Service", Some("localship-metrics"))?;
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        service["metadata"]["labels"]
    );
    let ports: Vec<&str> = monitor["spec"]["endpoints"]
        .as_array()
        .context("no endpoints")?
        .iter()
        .filter_map(|e| e["port"].as_str())
        .collect();
    assert_eq!(ports, ["prov-metrics", "ship-metrics"]);

    // rancher-migration: serves rancher.io/local-path and leaves rancher's
    // `local-path` class alone (a class's provisioner cannot change).
    let objects = dry_run("deploy/overlays/rancher-migration").await?;
    assert!(
        !objects.iter().any(|o| o["kind"] == "StorageClass"),
        "rancher-migration would replace rancher's class"
    );
    let provisioner = &containers(&objects)?[0];
    assert_eq!(provisioner["name"], "provisioner");
    assert!(
        provisioner["env"]
            .as_array()
            .context("no env")?
            .iter()
            .any(|e| e["name"] == "LOCALSHIP_SERVE_RANCHER" && e["value"] == "true"),
        "{provisioner}"
    );

    // All of them at once compose: both containers, both metrics ports,
    // the monitor, rancher served.
    let objects = dry_run("tests/e2e/fixtures/kustomize/every-component").await?;
    object(&objects, "ServiceMonitor", Some("localship"))?;
    let mut names: Vec<&str> = containers(&objects)?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["logshipper", "provisioner"]);
    let ports: Vec<&str> = object(&objects, "Service", Some("localship-metrics"))?["spec"]["ports"]
        .as_array()
        .context("no ports")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(ports, ["ship-metrics", "prov-metrics"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_applies_and_its_rbac_is_enough_for_the_agents() -> Result<()> {
    // This test installs a default StorageClass; others that rely on the
    // default class must not run at the same time.
    let _default_class = DEFAULT_CLASS.lock().await;
    let cp = control_plane()?;
    let client = cp.client().await?;
    let manifests = kustomize()?;
    localship_namespace(&client, &manifests).await?;
    let dry = apply_yaml(&client, None, &manifests, true).await?;
    assert!(dry.len() >= 8, "only {} objects in deploy/", dry.len());
    let kinds: Vec<String> = dry
        .iter()
        .filter_map(|o| o.types.as_ref().map(|t| t.kind.clone()))
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "StorageClass",
        "DaemonSet",
        "Service",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "deploy/ lacks a {kind}: {kinds:?}"
        );
    }
    // The overlay with the log shipper is valid too, and adds its container.
    let shipping = kustomize_dir("deploy/overlays/s3-shipping")?;
    let objects = apply_yaml(&client, None, &shipping, true).await?;
    // The shipper is a DaemonSet of its own, under its own ServiceAccount.
    let daemonsets: Vec<(String, String, Vec<String>)> = objects
        .iter()
        .filter(|o| o.types.as_ref().is_some_and(|t| t.kind == "DaemonSet"))
        .map(|o| {
            let spec = &o.data["spec"]["template"]["spec"];
            let names = spec["containers"].as_array().into_iter().flatten();
            (
                o.metadata.name.clone().unwrap_or_default(),
                spec["serviceAccountName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                names
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect(),
            )
        })
        .collect();
    let expected = |name: &str, account: &str, container: &str| {
        (
            name.to_string(),
            account.to_string(),
            vec![container.to_string()],
        )
    };
    assert_eq!(
        daemonsets,
        [
            expected("localship", "localship", "provisioner"),
            expected("localship-logshipper", "localship-logshipper", "logshipper"),
        ]
    );
    // Dry-run stored nothing.
    let classes = Api::<StorageClass>::all(client.clone());
    assert!(classes.get_opt("local-path").await?.is_none());

    // The policy's base paths are this machine's scratch directories, where the agents
    // make volumes, as every other test's agents do.
    let manifests = authority::with_bases(&manifests, &authority::allowed_bases()?)?;
    apply_yaml(&client, None, &manifests, false).await?;
    let class = classes.get("local-path").await?;
    assert_eq!(
        class.volume_binding_mode.as_deref(),
        Some("WaitForFirstConsumer")
    );
    assert_eq!(class.provisioner, "localship.io/local-path");

    // The agents run as the DaemonSet's pods would: the ServiceAccount's token, bound to
    // a pod on each one's node, under the admission policies.
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        let kubeconfig = authority::node_kubeconfig(cp, "localship", node).await?;
        agents.push(
            ProvisionerAgent::start_as(cp, node, "localship.io/local-path", &[], &kubeconfig)
                .await?,
        );
    }
    let kubeconfig = authority::node_kubeconfig(cp, "localship", "node-a").await?;

    // Claims shaped like the Airflow chart's, with no storageClassName.
    let ns = cp.namespace("airflow").await?;
    let claims = [
        "logs-airflow-worker-0",
        "logs-airflow-scheduler-0",
        "logs-airflow-triggerer-0",
        "redis-db-airflow-redis-0",
    ];
    for claim in claims {
        claim_with_pod(&client, &ns, claim, None, "1Gi", None).await?;
    }
    let mut dirs = Vec::new();
    for claim in claims {
        let pv = wait_bound(&client, &ns, claim).await?;
        assert_eq!(
            pv.spec.as_ref().unwrap().storage_class_name.as_deref(),
            Some("local-path")
        );
        let path = PathBuf::from(host_path(&pv));
        assert!(path.is_dir(), "{}", path.display());
        dirs.push((pv, path));
    }
    // Delete under the same RBAC: directory and PV go.
    for (claim, (pv, path)) in claims.iter().zip(&dirs) {
        delete_claim_and_pod(&client, &ns, claim).await?;
        wait_pv_gone(&client, pv.metadata.name.as_deref().unwrap()).await?;
        assert!(!path.exists(), "{} left behind", path.display());
    }

    // A verb the ClusterRole does not grant is refused.
    let sa_client = localship_tests::cluster::client_from(&kubeconfig).await?;
    let err = Api::<Secret>::all(sa_client.clone())
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "listing Secrets: {err}"
    );
    claim_with_pod(&client, &ns, "not-yours", None, "1Gi", None).await?;
    let err = Api::<PersistentVolumeClaim>::namespaced(sa_client, &ns)
        .delete("not-yours", &Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "deleting a claim: {err}"
    );
    wait_bound(&client, &ns, "not-yours").await?;

    // Leave no default class behind for other tests.
    classes.delete("local-path", &Default::default()).await?;
    wait_for("local-path to be gone", BIND_TIMEOUT, || async {
        Ok(classes.get_opt("local-path").await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}
