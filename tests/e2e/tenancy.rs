//! One shipper, many Airflow installs: with `--dest s3://airflow/logs/{namespace}` each
//! namespace's volumes ship under that namespace's own prefix, on the real control plane
//! with a real MinIO. Two namespaces write a log at the same path and each keeps its own;
//! a volume asking for another namespace's prefix is refused on its claim and writes nothing.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::Api;
use kube::ResourceExt;
use localship_tests::{control_plane, wait_for, Minio, ProvisionerAgent, ShipperAgent};

use crate::common::*;
use crate::shipper_volumes::{claim_with_pod_annotated, write, OPT_IN, SHIP_LOGS};

const PER_NAMESPACE: &str = "s3://airflow/logs/{namespace}";
/// The same path in every namespace: one tenant's dag_id may be another's.
const SHARED: &str =
    "dag_id=shared/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_namespace_ships_under_its_own_prefix_and_no_other() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let team_a = cp.namespace("tenant-a").await?;
    let team_b = cp.namespace("tenant-b").await?;
    // A node of this test's own: no other test's shipper sees these volumes.
    let node = cp.register_own_node(&team_a).await?;
    let minio = Minio::start().await?;
    minio.create_bucket("airflow").await?;
    let prov = provisioner_name(&team_a);
    let _agent = ProvisionerAgent::start(cp, &node, &prov, &[]).await?;
    let mut shipper = ShipperAgent::kubernetes(cp, &node, &minio, PER_NAMESPACE, &[]).await?;
    shipper.start().await?;
    let class = format!("{team_a}-logs");
    storage_class(&client, &class, &prov, "Delete", "").await?;

    // A names its own prefix, B the template; B's rogue volume names A's prefix.
    let a_prefix = format!("s3://airflow/logs/{team_a}");
    let claims = [
        (&team_a, "logs", a_prefix.as_str()),
        (&team_b, "logs", PER_NAMESPACE),
        (&team_b, "rogue", a_prefix.as_str()),
    ];
    for (ns, claim, asked) in claims {
        let annotations = format!("{{ {OPT_IN}: \"{asked}\" }}");
        claim_with_pod_annotated(&client, ns, claim, &class, &node, &annotations).await?;
    }
    let a_pv = wait_bound(&client, &team_a, "logs").await?;
    let b_pv = wait_bound(&client, &team_b, "logs").await?;
    let rogue_pv = wait_bound(&client, &team_b, "rogue").await?;

    // B's log extends A's bytes: shipped to one prefix it would replace A's object.
    let a_log = b"[2024-01-01] team a's task\n".to_vec();
    let b_log = [&a_log[..], b"[2024-01-01] team b was here\n"].concat();
    let rogue_log = b"[2024-01-01] rogue: written over team a's log\n".to_vec();
    let rogue_own =
        "dag_id=shared/run_id=manual__2024-01-01T00:00:00+00:00/task_id=rogue/attempt=1.log";
    write(&PathBuf::from(host_path(&a_pv)), SHARED, &a_log)?;
    write(&PathBuf::from(host_path(&b_pv)), SHARED, &b_log)?;
    let rogue_dir = PathBuf::from(host_path(&rogue_pv));
    write(&rogue_dir, SHARED, &rogue_log)?;
    write(&rogue_dir, rogue_own, &rogue_log)?;

    // The rogue volume is refused on its claim, where its owner looks, and let go.
    let refused = wait_for("the rogue claim's refusal", BIND_TIMEOUT, || async {
        let events = claim_events(&client, &team_b, "rogue").await?;
        Ok(events
            .into_iter()
            .find(|(reason, _)| reason == "LogShippingRefused")
            .map(|(_, message)| message))
    })
    .await
    .with_context(|| format!("shipper log tail:\n{}", shipper.log_tail(30)))?;
    let b_prefix = format!("s3://airflow/logs/{team_b}");
    ensure!(
        refused.contains(&format!("set it to {b_prefix} or {PER_NAMESPACE}")),
        "{refused}"
    );
    let pvs = Api::<PersistentVolume>::all(client.clone());
    wait_for("the rogue PV to be let go", BIND_TIMEOUT, || async {
        let pv = pvs.get(&rogue_pv.name_any()).await?;
        Ok((!pv.finalizers().iter().any(|f| f == SHIP_LOGS)).then_some(()))
    })
    .await?;

    // Each log lands under its own namespace's prefix, as Airflow's reader there sees it.
    let views = [(&team_a, &a_log), (&team_b, &b_log)];
    for (ns, bytes) in views {
        let key = format!("logs/{ns}/{SHARED}");
        wait_for(&format!("{key} in MinIO"), BIND_TIMEOUT, || async {
            let view = minio.log_view("airflow", &key).await?;
            Ok((view.as_ref() == Some(bytes)).then_some(()))
        })
        .await
        .with_context(|| format!("shipper log tail:\n{}", shipper.log_tail(30)))?;
    }
    shipper
        .wait_metric("localship_logshipper_volumes_watched 2")
        .await?;

    // Deleted, each volume is drained to its own prefix: the logs' own keys, final.
    for (ns, claim) in [(&team_a, "logs"), (&team_b, "logs"), (&team_b, "rogue")] {
        delete_claim_and_pod(&client, ns, claim).await?;
    }
    for pv in [&a_pv, &b_pv, &rogue_pv] {
        wait_pv_gone(&client, &pv.name_any())
            .await
            .with_context(|| format!("shipper log tail:\n{}", shipper.log_tail(30)))?;
    }
    for (ns, bytes) in views {
        let key = format!("logs/{ns}/{SHARED}");
        let object = minio.get_object("airflow", &key).await?;
        assert_eq!(object.as_ref(), Some(bytes), "{key}");
    }
    // Nothing else anywhere: no byte of the rogue volume, nothing outside the two prefixes.
    let keys = minio.list_keys("airflow").await?;
    let expected = views.map(|(ns, _)| format!("logs/{ns}/{SHARED}"));
    assert_eq!(keys, expected, "the bucket holds only the two logs");
    shipper.check_running()?;
    Ok(())
}
