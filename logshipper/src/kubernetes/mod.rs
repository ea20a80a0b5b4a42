//! Kubernetes mode (`--node-name`): the sources are this node's localship volumes that opt
//! in, found by watching PVs; a deleted volume is held by our finalizer until every log in
//! it is shipped. `volume`, `opt_in` and `step` decide (pure), `finalizer` edits the
//! PV, `controller` reconciles, and this module wires them beside the pipeline.

pub mod controller;
pub mod finalizer;
pub mod opt_in;
pub mod step;
pub mod volume;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::Api;
use kube::runtime::controller::{self as runtime, Controller};
use localship_names::NODE_LABEL;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::destination::DestinationUrl;
use crate::discover::{Source, Sources};
use crate::metrics::Metrics;
use crate::pipeline::Refused;
use crate::{Error, Result};
use controller::Context;

/// How often volumes whose PV vanished behind our back are looked for.
const VANISHED_EVERY: Duration = Duration::from_secs(60);

/// What the pipeline tells the volume watch.
pub struct FromPipeline {
    /// Each drain done.
    pub drained: mpsc::UnboundedReceiver<Arc<Source>>,
    /// Files of a volume that will not ship, for an Event on its claim.
    pub refused: mpsc::UnboundedReceiver<Refused>,
}

/// What Kubernetes mode is told at start.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node: only its volumes are shipped.
    pub node: String,
    /// The annotation a claim, PV or class opts in with (`--opt-in-annotation`).
    pub annotation: String,
    /// Where logs go (`--dest`), `{namespace}` filled in per volume.
    pub dest: DestinationUrl,
}

/// Starts watching `node`'s PVs until `stop`, adding and draining `sources` as volumes come
/// and go. `told` hears from the pipeline; `synced` turns true once every PV of the node is
/// known.
pub async fn watch_volumes(
    settings: &Settings,
    sources: Sources,
    told: FromPipeline,
    metrics: Arc<Metrics>,
    synced: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let client = localship_api::client().await.map_err(Error::KubeClient)?;
    let node = settings.node.as_str();
    let selector = format!("{NODE_LABEL}={node}");
    let stopping = {
        let mut stop = stop.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            stopped(&mut stop).await;
            let _ = tx.send(());
        });
        async move {
            let _ = rx.await;
        }
    };
    let volumes = Controller::new(
        Api::<PersistentVolume>::all(client.clone()),
        localship_api::watcher_config().labels(&selector),
    )
    .graceful_shutdown_on(stopping);
    let store = volumes.store();
    let ctx = Arc::new(Context::new(
        client,
        settings,
        sources,
        store.clone(),
        metrics,
    ));
    tracing::info!(node, annotation = %settings.annotation, dest = %settings.dest, "Kubernetes mode: shipping this node's opted-in volumes");

    let run = volumes
        .run(controller::reconcile, controller::error_policy, ctx.clone())
        .for_each(|result| {
            match result {
                Err(runtime::Error::ReconcilerFailed(..))
                | Err(runtime::Error::ObjectNotFound(_)) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot watch PersistentVolumes — check the API server and that RBAC grants \
                     get, list, watch and patch on persistentvolumes"
                ),
                Ok(_) => {}
            }
            futures::future::ready(())
        });
    let sync = async move {
        if store.wait_until_ready().await.is_ok() {
            tracing::info!("this node's volumes are known");
            synced.send_replace(true);
        }
    };
    let housekeeping = async move {
        let mut stop = stop;
        let FromPipeline {
            mut drained,
            mut refused,
        } = told;
        let mut vanished = tokio::time::interval(VANISHED_EVERY);
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                Some(source) = drained.recv() => ctx.drained(source),
                Some(refused) = refused.recv() => ctx.refused_files(refused).await,
                _ = vanished.tick() => ctx.forget_vanished().await,
            }
        }
    };
    Ok(tokio::spawn(async move {
        tokio::join!(run, sync, housekeeping);
    }))
}

/// Completes once `stop` turns true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
