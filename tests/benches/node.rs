//! N1: claim created -> pod Running on the real node (kubelet, containerd),
//! for a burst of pods, each with its own volume: localship's default class,
//! beside pre-created static local PVs (the anchor) and emptyDir (no claim at
//! all), in the same run. p50/p99/max over every pod of every round.
//!
//! `cargo bench -p localship-tests --bench node` (pods per burst from
//! LOCALSHIP_BENCH_NODE_PODS, default 20; rounds from
//! LOCALSHIP_BENCH_NODE_ROUNDS, default 3).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;
use localship_tests::bench::{env_or, pct};
use localship_tests::claims::pvs_in;
use localship_tests::node::install::{kubectl, user_overlay};
use localship_tests::node::{RealNode, NODE_NAME};
use localship_tests::{apply_yaml, wait_for};
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq)]
enum Volume {
    EmptyDir,
    StaticLocal,
    Localship,
}

impl Volume {
    fn name(self) -> &'static str {
        match self {
            Volume::EmptyDir => "emptyDir (no claim)",
            Volume::StaticLocal => "static local PVs (anchor)",
            Volume::Localship => "localship",
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    let pods: usize = env_or("LOCALSHIP_BENCH_NODE_PODS", 20);
    let rounds: usize = env_or("LOCALSHIP_BENCH_NODE_ROUNDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let node = runtime.block_on(RealNode::start())?;
    let result = runtime.block_on(run(&node, pods, rounds));
    node.stop()?;
    result
}

async fn run(node: &RealNode, pods: usize, rounds: usize) -> Result<()> {
    let overlay = user_overlay(&node.dir().join("overlays/bench"), "deploy", "")?;
    kubectl(node, &["apply", "-k", &overlay.display().to_string()])?;
    let client = node.control_plane().client().await?;
    wait_agent(&client).await?;
    let class = r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: { name: bench-static }
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
"#;
    apply_yaml(&client, None, class, false).await?;
    let order = [Volume::EmptyDir, Volume::StaticLocal, Volume::Localship];
    let mut samples: HashMap<&str, Vec<Duration>> = HashMap::new();
    for round in 0..rounds {
        // Rotate the order so no kind always runs on a warmer node.
        for i in 0..order.len() {
            let kind = order[(i + round) % order.len()];
            let took = burst(node, &client, kind, pods, round).await?;
            samples.entry(kind.name()).or_default().extend(took);
        }
    }
    let anchor = {
        let mut s = samples[Volume::StaticLocal.name()].clone();
        s.sort();
        pct(&s, 50.0)
    };
    println!(
        "\nN1: claim created -> pod Running on the real node, {pods} pods at once, {rounds} rounds"
    );
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>8}  p50 vs anchor",
        "volumes", "pods", "p50 s", "p99 s", "max s"
    );
    for kind in order {
        let mut s = samples[kind.name()].clone();
        s.sort();
        let (p50, p99, max) = (pct(&s, 50.0), pct(&s, 99.0), *s.last().unwrap());
        println!(
            "{:<28} {:>8} {:>8.2} {:>8.2} {:>8.2}  {:.2}x",
            kind.name(),
            s.len(),
            p50.as_secs_f64(),
            p99.as_secs_f64(),
            max.as_secs_f64(),
            p50.as_secs_f64() / anchor.as_secs_f64()
        );
    }
    Ok(())
}

async fn wait_agent(client: &Client) -> Result<()> {
    let pods = Api::<Pod>::namespaced(client.clone(), "localship");
    wait_for("the localship pod to be Ready", TIMEOUT, || async {
        let list = pods.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .then_some(()))
    })
    .await
}

/// One burst: creates every claim (or none) and pod at once, then records
/// for each pod the time from its claim's creation to the kubelet reporting
/// it Running. Cleans up after itself.
async fn burst(
    node: &RealNode,
    client: &Client,
    kind: Volume,
    count: usize,
    round: usize,
) -> Result<Vec<Duration>> {
    let ns = node.control_plane().namespace("bench").await?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let pvs = Api::<PersistentVolume>::all(client.clone());
    let static_root = node.dir().join(format!("static-pvs/{ns}"));
    if kind == Volume::StaticLocal {
        for i in 0..count {
            let path = static_root.join(format!("pv-{i}"));
            std::fs::create_dir_all(&path)?;
            let pv: PersistentVolume = serde_json::from_value(json!({
                "metadata": { "name": format!("{ns}-{i}") },
                "spec": {
                    "capacity": { "storage": "1Gi" },
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "bench-static",
                    "local": { "path": path.display().to_string() },
                    "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [{
                        "key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]
                    }]}]}},
                }
            }))?;
            pvs.create(&PostParams::default(), &pv).await?;
        }
    }
    let busybox = node.images().busybox.clone();
    let mut created = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("p{i}");
        let volume = match kind {
            Volume::EmptyDir => json!({ "name": "data", "emptyDir": {} }),
            _ => {
                let class = match kind {
                    Volume::StaticLocal => json!("bench-static"),
                    _ => Value::Null,
                };
                let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                    "metadata": { "name": name },
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": class,
                        "resources": { "requests": { "storage": "1Gi" } },
                    }
                }))?;
                created.push(Instant::now());
                claims.create(&PostParams::default(), &claim).await?;
                json!({ "name": "data", "persistentVolumeClaim": { "claimName": name } })
            }
        };
        if kind == Volume::EmptyDir {
            created.push(Instant::now());
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "main", "image": busybox, "command": ["sleep", "3600"],
                    "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
                }],
                "volumes": [volume],
            }
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    let mut running: Vec<Option<Duration>> = vec![None; count];
    let deadline = Instant::now() + TIMEOUT;
    while running.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            let left = running.iter().filter(|r| r.is_none()).count();
            bail!("{} round {round}: {left} pods not Running", kind.name());
        }
        for pod in pods.list(&ListParams::default()).await?.items {
            let Some(i) = pod
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix('p'))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if running[i].is_none() && phase == Some("Running") {
                running[i] = Some(created[i].elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    pods.delete_collection(&now, &ListParams::default()).await?;
    claims
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    if kind == Volume::StaticLocal {
        // Nothing deletes a static PV but its owner; each goes once released.
        for i in 0..count {
            pvs.delete(&format!("{ns}-{i}"), &Default::default())
                .await?;
        }
    }
    wait_for(
        "the burst's pods and volumes to be gone",
        TIMEOUT,
        || async {
            let pods_left = pods.list(&ListParams::default()).await?.items.len();
            let pvs_left = pvs_in(client, &ns).await?.len();
            Ok((pods_left == 0 && pvs_left == 0).then_some(()))
        },
    )
    .await?;
    if kind == Volume::StaticLocal {
        std::fs::remove_dir_all(&static_root)?;
    }
    Ok(running.into_iter().map(|r| r.unwrap_or_default()).collect())
}
