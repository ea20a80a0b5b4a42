//! Wiring: caches, the two controllers, config reload, disk gauges and the
//! HTTP endpoints, all stopped together on SIGTERM/SIGINT.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use localship_heap as heap;

use crate::annotations::NODE_LABEL;
use crate::cli::Args;
use crate::config::{Config, Placement};
use crate::context::{watch_config, Context, SharedConfig};
use crate::metrics::Metrics;
use crate::provision::ClaimMeta;
use crate::{claim, disk, http, provision, reclaim, sweep, Error, Result};

pub async fn run(args: Args, client: Client) -> Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::single(&args.base_path),
    };
    let names = args.names();
    match config.placement(&args.node_name, "") {
        Placement::Paths(p) if p.is_empty() => tracing::warn!(
            node = %args.node_name,
            "no base path is configured for this node: it will not provision volumes \
             (claims placed here are handed back to the scheduler)"
        ),
        Placement::Paths(p) => {
            tracing::info!(node = %args.node_name, paths = ?p, provisioners = ?names, "serving")
        }
        Placement::SharedFileSystem(_) => {}
    }
    let shared = SharedConfig::new(config);
    let metrics = Metrics::default();

    let (classes, writer) = reflector::store::<StorageClass>();
    let class_stream = reflector(
        writer,
        watcher(
            Api::<StorageClass>::all(client.clone()),
            localship_api::watcher_config(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| futures::future::ready(()));

    let ctx = Arc::new(Context::new(
        client.clone(),
        &args,
        shared.clone(),
        classes.clone(),
        metrics.clone(),
    ));

    // Claim metadata only (the spec is fetched for a claim that may be ours), and of that
    // only our provisioner's claims kept: memory follows our claims, not the cluster's.
    // No field or label selector can say "ours" to the apiserver, so that part is here.
    // The initial list is paged (kube's default, 500 a page); see localship_api for why
    // watches end every 45 s.
    let names = ctx.names.clone();
    let claims = slim_controller(
        watcher(
            Api::<ClaimMeta>::all(client.clone()),
            localship_api::watcher_config(),
        )
        .try_filter_map(move |event| futures::future::ready(Ok(only_ours(event, &names)))),
    );
    let claims_store = claims.store();
    let claims = claims
        .run(provision::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let selector = format!("{NODE_LABEL}={}", args.node_name);
    let volumes = slim_controller(watcher(
        Api::<PersistentVolume>::all(client.clone()),
        localship_api::watcher_config().labels(&selector),
    ));
    let volumes_store = volumes.store();
    let volumes = volumes
        .run(reclaim::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let ready = Arc::new(AtomicBool::new(false));
    let startup = {
        let (ready, ctx) = (ready.clone(), ctx.clone());
        async move {
            let _ = classes.wait_until_ready().await;
            let _ = claims_store.wait_until_ready().await;
            let _ = volumes_store.wait_until_ready().await;
            match sweep::sweep(&ctx, &claims_store).await {
                Ok(s) => tracing::info!(removed = s.removed, kept = s.kept, "start-up sweep done"),
                Err(e) => tracing::warn!(error = %e, "start-up sweep failed; continuing"),
            }
            ready.store(true, Ordering::Relaxed);
            heap::give_back();
            tracing::info!("caches synced; ready");
        }
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = http::serve(args.listen, metrics.registry.clone(), ready, async {
        let _ = stop_rx.await;
    });
    let server = tokio::spawn(server);
    let background = {
        let config_task = args.config.clone().map(|path| {
            tokio::spawn(watch_config(
                path,
                args.config_poll,
                shared.clone(),
                metrics.clone(),
            ))
        });
        let gauges = tokio::spawn(disk_gauges(ctx.clone()));
        let classes = tokio::spawn(class_stream);
        let heap = tokio::spawn(heap::give_back_every(Duration::from_secs(15)));
        (config_task, gauges, classes, heap)
    };

    tokio::join!(claims, volumes, startup);
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    if let Some(t) = background.0 {
        t.abort();
    }
    background.1.abort();
    background.2.abort();
    background.3.abort();
    match server.await {
        Ok(Err(e)) => Err(Error::Invalid(format!(
            "cannot serve on {}: {e}",
            args.listen
        ))),
        _ => Ok(()),
    }
}

fn error_policy<K>(_obj: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Keeps the free/used gauges of every base path current. Base paths are
/// made here first (as rancher makes them on first use) so a fresh node
/// reports its space before its first volume.
async fn disk_gauges(ctx: Arc<Context>) {
    loop {
        for path in ctx.config.get().all_paths(&ctx.node) {
            if let Err(e) = std::fs::create_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot create base path");
            }
            let label = path.to_string_lossy().into_owned();
            if let Ok(space) = disk::space(&path) {
                ctx.metrics
                    .free_bytes
                    .with_label_values(&[&label])
                    .set(space.free as i64);
                ctx.metrics
                    .used_bytes
                    .with_label_values(&[&label])
                    .set(space.total.saturating_sub(space.free) as i64);
            }
        }
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
}

/// A controller whose cache keeps objects without their managedFields and last-applied
/// copies, which nothing here reads and which make up much of an object's size.
fn slim_controller<K>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
) -> Controller<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, events.modify(slim)).applied_objects();
    Controller::for_stream(stream, reader).shutdown_on_signal()
}

/// Passes on only our provisioner's claims. One that stops being ours is passed
/// on as deleted, so that it leaves the cache.
fn only_ours(
    event: watcher::Event<ClaimMeta>,
    names: &[String],
) -> Option<watcher::Event<ClaimMeta>> {
    use watcher::Event::{Apply, Delete, InitApply};
    match event {
        Apply(c) if !claim::is_ours(&c.metadata, names) => Some(Delete(c)),
        InitApply(c) if !claim::is_ours(&c.metadata, names) => None,
        other => Some(other),
    }
}

fn slim<K: Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
    object
        .annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;

    #[test]
    fn slim_drops_only_what_nothing_reads() {
        let mut claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "data",
                "annotations": {
                    "volume.kubernetes.io/selected-node": "node-a",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}"
                },
                "managedFields": [{ "manager": "kubectl", "operation": "Apply" }]
            },
            "spec": { "storageClassName": "local-path" }
        }))
        .unwrap();
        slim(&mut claim);
        assert!(claim.managed_fields().is_empty());
        assert_eq!(
            claim.annotations().keys().collect::<Vec<_>>(),
            ["volume.kubernetes.io/selected-node"]
        );
        assert_eq!(
            claim.spec.unwrap().storage_class_name.as_deref(),
            Some("local-path")
        );
    }

    #[test]
    fn only_our_claims_reach_the_cache() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let names = vec!["localship.io/local-path".to_string()];
        let meta = |provisioner: &str| -> ClaimMeta {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": {
                    "name": "data",
                    "namespace": "n",
                    "annotations": { "volume.kubernetes.io/storage-provisioner": provisioner }
                }
            }))
            .unwrap()
        };
        let (ours, theirs) = (meta("localship.io/local-path"), meta("example.com/other"));
        assert!(matches!(
            only_ours(InitApply(ours.clone()), &names),
            Some(InitApply(_))
        ));
        assert!(only_ours(InitApply(theirs.clone()), &names).is_none());
        assert!(matches!(
            only_ours(Apply(ours.clone()), &names),
            Some(Apply(_))
        ));
        assert!(matches!(
            only_ours(Apply(theirs.clone()), &names),
            Some(Delete(_))
        ));
        assert!(matches!(only_ours(Delete(theirs), &names), Some(Delete(_))));
        assert!(matches!(only_ours(Init, &names), Some(Init)));
        assert!(matches!(only_ours(InitDone, &names), Some(InitDone)));
    }
}
