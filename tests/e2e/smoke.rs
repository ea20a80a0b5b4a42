//! Proof that the harness runs the real thing: the scheduler places pods and
//! annotates WaitForFirstConsumer claims, the apiserver enforces RBAC, and
//! MinIO stores bytes as given.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::api::Api;
use localship_tests::{apply_yaml, control_plane, process::Process, wait_for, Minio, NODES};

const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_registered_ready() -> Result<()> {
    let client = control_plane()?.client().await?;
    let nodes = Api::<Node>::all(client);
    for name in NODES {
        let node = nodes.get(name).await?;
        let labels = node.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get("kubernetes.io/hostname").map(String::as_str),
            Some(name)
        );
        assert!(node
            .spec
            .unwrap_or_default()
            .taints
            .unwrap_or_default()
            .is_empty());
        let ready = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "{name} is not Ready");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_selects_a_node_for_a_wait_for_first_consumer_claim() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("smoke").await?;
    let class = format!("smoke-wffc-{ns}");
    let manifest = format!(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{ name: {class} }}
provisioner: smoke.localship.io/none
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{ name: data }}
spec:
  storageClassName: {class}
  accessModes: [ReadWriteOnce]
  resources: {{ requests: {{ storage: 1Gi }} }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: user }}
spec:
  containers: [{{ name: main, image: busybox }}]
  volumes: [{{ name: data, persistentVolumeClaim: {{ claimName: data }} }}]
"#
    );
    apply_yaml(&client, Some(&ns), &manifest, false).await?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let annotations = wait_for(
        "the claim to get selected-node and storage-provisioner",
        Duration::from_secs(60),
        || async {
            let claim = claims.get("data").await?;
            let ann = claim.metadata.annotations.unwrap_or_default();
            Ok(
                (ann.contains_key(SELECTED_NODE) && ann.contains_key(STORAGE_PROVISIONER))
                    .then_some(ann),
            )
        },
    )
    .await?;
    assert!(NODES.contains(&annotations[SELECTED_NODE].as_str()));
    assert_eq!(annotations[STORAGE_PROVISIONER], "smoke.localship.io/none");
    // Nothing provisions this class, so the pod must still wait for its volume.
    let pod = Api::<Pod>::namespaced(client, &ns).get("user").await?;
    assert_eq!(pod.spec.unwrap().node_name, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_refuses_an_unprivileged_user() -> Result<()> {
    let cp = control_plane()?;
    let kubeconfig = cp.kubeconfig_for("nobody", None, "nobody")?;
    let client = localship_tests::cluster::client_from(&kubeconfig).await?;
    let err = Api::<Node>::all(client)
        .list(&Default::default())
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minio_round_trips_bytes() -> Result<()> {
    let minio = Minio::start().await?;
    minio.create_bucket("smoke").await?;
    // Every byte value, and a key with the characters Airflow run ids carry.
    let body: Vec<u8> = (0..=255u8).cycle().take(3 * 1024 * 1024 + 17).collect();
    let key = "logs/dag_id=d/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";
    minio.put_object("smoke", key, body.clone()).await?;
    let got = minio
        .get_object("smoke", key)
        .await?
        .expect("object exists");
    assert_eq!(got.len(), body.len());
    assert!(got == body, "object differs from what was put");
    assert_eq!(minio.list_keys("smoke").await?, vec![key.to_string()]);
    assert_eq!(minio.get_object("smoke", "missing").await?, None);
    Ok(())
}

#[test]
fn a_server_that_fails_to_start_reports_its_log() -> Result<()> {
    let etcd = localship_tests::servers::server_bin("etcd")?;
    let dir = localship_tests::scratch_dir("broken-etcd")?;
    let mut p = Process::spawn("etcd", &etcd, &["--no-such-flag".into()], &[], &dir)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let err = loop {
        if let Err(e) = p.check_running() {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "etcd kept running with a bad flag"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let msg = format!("{err:#}");
    assert!(msg.contains("etcd exited"), "{msg}");
    assert!(msg.contains("no-such-flag"), "log tail missing from: {msg}");
    Ok(())
}
