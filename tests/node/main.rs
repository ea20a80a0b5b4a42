//! localship on a real node, installed as a user installs it: the kubelet
//! mounts its volumes, containerd runs its image, and its shipper ships
//! from a real pod's claim. One node, so the scenarios run in order, each
//! on the install the one before left; the node is put back at the end.
//! A plain binary (no libtest) so the node is torn down after the last
//! scenario, whatever happened; `cargo test --release -p localship-tests
//! --test node -- <word>` runs the scenarios whose name contains <word>
//! (and the installs they need).

mod burst;
mod install;
mod pods;
mod shipping;
mod volumes;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use localship_tests::node::{RealNode, NODE_IP};
use localship_tests::Minio;

/// What the scenarios share: the node, and the MinIO its pods ship to.
pub struct Env {
    pub node: RealNode,
    pub minio: Minio,
}

type Body = for<'a> fn(&'a mut Env) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// In order: each install is used by the scenarios after it. Installs and
/// the uninstall between them run whatever the filter says.
fn scenarios() -> Vec<(&'static str, bool, Body)> {
    vec![
        (
            "kustomize: the DaemonSet runs as its manifest says",
            true,
            |e| Box::pin(volumes::kustomize_install(e)),
        ),
        (
            "kustomize: hostPath volume kept across pods, removed with its claim",
            false,
            |e| Box::pin(volumes::host_path_volume(e)),
        ),
        (
            "kustomize: local volume kept across pods, removed with its claim",
            false,
            |e| Box::pin(volumes::local_volume(e)),
        ),
        (
            "kustomize: a disk mounted at the base path after start is used",
            false,
            |e| Box::pin(volumes::disk_mounted_after_start(e)),
        ),
        (
            "kustomize: provisioner killed mid-burst of 50 claims",
            false,
            |e| Box::pin(burst::killed_mid_burst(e)),
        ),
        (
            "kustomize s3-shipping: logs shipped, held through an outage",
            false,
            |e| Box::pin(shipping::kustomize_shipping(e)),
        ),
        ("kustomize: uninstalled with kubectl delete -k", true, |e| {
            Box::pin(volumes::kustomize_uninstall(e))
        }),
        (
            "helm: installed with shipping, the DaemonSet runs as its manifest says",
            true,
            |e| Box::pin(shipping::helm_install(e)),
        ),
        (
            "helm: hostPath volume kept across pods, removed with its claim",
            false,
            |e| Box::pin(volumes::host_path_volume(e)),
        ),
        (
            "helm: local volume kept across pods, removed with its claim",
            false,
            |e| Box::pin(volumes::local_volume(e)),
        ),
        ("helm: logs shipped from a claim", false, |e| {
            Box::pin(shipping::helm_ships(e))
        }),
    ]
}

fn main() -> ExitCode {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let started = Instant::now();
    let env = runtime.block_on(async {
        let node = RealNode::start().await?;
        let minio = Minio::start_on(NODE_IP).await?;
        minio.create_bucket(shipping::BUCKET).await?;
        anyhow::Ok(Env { node, minio })
    });
    let mut env = match env {
        Ok(env) => env,
        Err(e) => {
            eprintln!("node: could not start: {e:#}");
            println!("node result: 0 scenarios, 1 failed; the node did not start");
            return ExitCode::FAILURE;
        }
    };
    let mut rows: Vec<(&str, Duration, Option<String>)> = Vec::new();
    for (name, always, body) in scenarios() {
        let selected = filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
        if !selected && !always {
            continue;
        }
        eprintln!("node: {name} ...");
        let start = Instant::now();
        let error = runtime
            .block_on(body(&mut env))
            .err()
            .map(|e| format!("{e:#}"));
        if let Some(e) = &error {
            eprintln!("node: {name} FAILED: {e}");
        }
        rows.push((name, start.elapsed(), error));
    }
    let Env { node, minio } = env;
    drop(minio);
    let teardown = node.stop();
    let failed = rows.iter().filter(|r| r.2.is_some()).count() + usize::from(teardown.is_err());
    println!("\n{:<75} {:>8}  result", "scenario", "seconds");
    for (name, took, error) in &rows {
        let result = error.as_deref().map_or("ok", |_| "FAILED");
        println!("{name:<75} {:>8.1}  {result}", took.as_secs_f64());
    }
    if let Err(e) = &teardown {
        println!("teardown FAILED: {e:#}");
    }
    println!(
        "node result: {} scenarios, {failed} failed; {:.0}s with the node's start and teardown",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
