//! The shipper's path to the apiserver goes silent without closing, as the provisioner's
//! does in `provisioner/blackhole.rs`. Volumes it already serves keep shipping (that needs
//! no API); once the path is back it must notice by itself that a volume came during the
//! cut, ship it, and let go of deleted volumes, so their PVs and directories go.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use kube::{Client, ResourceExt};
use localship_tests::authority::{node_kubeconfig, SHIPPER};
use localship_tests::claims::{
    create_claim_with_pod, delete_claim_and_pod, host_path, provisioner_name, storage_class,
    wait_bound, wait_pv_gone,
};
use localship_tests::relay::{apiserver_addr, Relay};
use localship_tests::{
    control_plane, scratch_dir, wait_for, Minio, ProvisionerAgent, ShipperAgent,
};

use super::{dest, key, write_log, BUCKET};
use crate::jitter::Jitter;
use crate::report::Tally;

const NODE: &str = "node-b";
/// A claim's opt-in to shipping, naming its destination.
const SHIP_TO: &str = "localship.io/ship-to";
const RUN: &str = "dag_id=cut/run_id=manual__2024-06-01T00:00:00+00:00";
/// A watch ends every 45 s and a connection without a byte for 60 s is dropped.
const RECOVERED_WITHIN: Duration = Duration::from_secs(150);

pub async fn run() -> Result<Tally> {
    let cp = control_plane()?;
    // The test and the provisioner go straight to the apiserver; only the shipper is cut off.
    let client = cp.client().await?;
    let ns = cp.namespace("faults-ship-blackhole").await?;
    let prov = provisioner_name(&ns);
    let minio = Minio::start().await?;
    minio.create_bucket(BUCKET).await?;
    let _provisioner = ProvisionerAgent::start(cp, NODE, &prov, &[]).await?;
    let class = format!("{ns}-logs");
    storage_class(&client, &class, &prov, "Delete", "").await?;

    let relay = Relay::start(apiserver_addr(cp)?).await?;
    let direct = node_kubeconfig(cp, SHIPPER, NODE).await?;
    let relayed = relay.kubeconfig(cp, &direct, &scratch_dir("faults-ship-blackhole")?)?;
    let extra = ["--settle=1s", "--airflow-remote-logging=off"];
    let mut shipper = ShipperAgent::kubernetes(cp, NODE, &minio, &dest(), &extra)
        .await?
        .env("KUBECONFIG", &relayed.display().to_string());
    shipper.start().await?;
    let mut jitter = Jitter::new("shipper's apiserver path blackholed");
    let mut tally = Tally {
        rounds: 1,
        faults: 1,
        ..Tally::default()
    };
    let mut check = |what: &str, ok: bool| {
        if ok {
            tally.checked += 1;
        } else {
            tally.lost += 1;
            eprintln!("  LOST: {what}");
        }
    };

    // A volume served, and shipping, before the cut.
    let steady = opted_in_volume(&client, &ns, &class, "steady").await?;
    let first = format!("{RUN}/task_id=before/attempt=1.log");
    write_log(&steady, &first, b"before the cut\n")?;
    check(
        "a log before the cut",
        shipped(&minio, &first, b"before the cut\n", RECOVERED_WITHIN).await?,
    );

    let cut = Instant::now();
    relay.blackhole();
    let during = format!("{RUN}/task_id=during/attempt=1.log");
    write_log(&steady, &during, b"during the cut\n")?;
    let late = opted_in_volume(&client, &ns, &class, "late").await?;
    let new = format!("{RUN}/task_id=new_volume/attempt=1.log");
    write_log(&late, &new, b"in a volume made during the cut\n")?;
    tokio::time::sleep(jitter.millis(3000, 8000)).await;
    relay.heal();
    let healed = cut.elapsed();

    check(
        "a log of a served volume, written during the cut",
        shipped(&minio, &during, b"during the cut\n", RECOVERED_WITHIN).await?,
    );
    let left = RECOVERED_WITHIN.saturating_sub(cut.elapsed());
    check(
        "a log in a volume made during the cut",
        shipped(&minio, &new, b"in a volume made during the cut\n", left).await?,
    );
    eprintln!(
        "faults: shipper's path cut for {:.1}s; the new volume's log shipped {:.1}s after the cut",
        healed.as_secs_f64(),
        cut.elapsed().as_secs_f64()
    );

    // Deleted volumes are let go of by the shipper, so the provisioner removes them.
    for claim in ["steady", "late"] {
        let pv = wait_bound(&client, &ns, claim).await?;
        delete_claim_and_pod(&client, &ns, claim).await?;
        let gone = wait_pv_gone(&client, &pv.name_any()).await;
        if let Err(e) = &gone {
            eprintln!("  {e:#}\n  shipper log tail:\n{}", shipper.log_tail(30));
        }
        check(
            &format!("PV of {claim} let go of and deleted"),
            gone.is_ok(),
        );
    }
    check("shipper still running", shipper.check_running().is_ok());
    Ok(tally)
}

/// A claim of `class` opted in to shipping to [`dest`], with its pod on [`NODE`], bound; its
/// directory on the node.
async fn opted_in_volume(client: &Client, ns: &str, class: &str, claim: &str) -> Result<PathBuf> {
    let mut annotations = serde_json::Map::new();
    annotations.insert(SHIP_TO.into(), dest().into());
    let annotations = serde_json::Value::Object(annotations);
    create_claim_with_pod(client, ns, claim, class, "64Mi", Some(NODE), annotations).await?;
    let pv = wait_bound(client, ns, claim).await?;
    Ok(PathBuf::from(host_path(&pv)))
}

/// Whether the object of `relative` holds `want` within `within`.
async fn shipped(minio: &Minio, relative: &str, want: &[u8], within: Duration) -> Result<bool> {
    let found = wait_for(&format!("{relative} to ship"), within, || async {
        Ok(minio
            .get_object(BUCKET, &key(relative))
            .await?
            .filter(|got| got == want)
            .map(|_| ()))
    })
    .await;
    if let Err(e) = &found {
        eprintln!("  {e:#}");
    }
    Ok(found.is_ok())
}
