//! The volume controller: this node's PVs keep our finalizer until their
//! directory is dealt with. A released `Delete` volume is deleted; once the
//! log shipper (if it holds the volume) lets go, the directory is removed
//! without following symlinks, and only then the finalizer. `Retain` keeps both.
//!
//! Not kube-runtime's `finalizer()` helper: cleanup here must wait on
//! another owner's finalizer, which that helper cannot express.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::annotations::{
    BASE_PATH, CLEANUP_FINALIZER, HOST_PATH, NODE, PROVISIONED_BY, SHIP_LOGS_FINALIZER,
};
use crate::context::Context;
use crate::{disk, owner, paths, volume, Error, Result};

pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action> {
    let ours = pv
        .annotations()
        .get(PROVISIONED_BY)
        .is_some_and(|p| ctx.names.contains(p));
    if !ours || pv.annotations().get(NODE) != Some(&ctx.node) {
        return Ok(Action::await_change());
    }
    if let Err(why) = volume::pinned_node(&pv) {
        // Says this node's, yet is not consistently so: nothing is touched.
        let note = format!(
            "not managing PV {}: it claims node {} but {why}; its directory is left alone",
            pv.name_any(),
            ctx.node
        );
        tracing::warn!(pv = %pv.name_any(), "{note}");
        ctx.event(&pv.object_ref(&()), true, "VolumeNotOwned", "Delete", note)
            .await;
        return Ok(Action::await_change());
    }
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let has_ours = pv.finalizers().iter().any(|f| f == CLEANUP_FINALIZER);
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default();
    let reclaim = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Delete");

    if pv.meta().deletion_timestamp.is_none() {
        if !has_ours {
            let mut finalizers = pv.finalizers().to_vec();
            finalizers.push(CLEANUP_FINALIZER.into());
            set_finalizers(&api, &pv, finalizers).await?;
        }
        if reclaim == "Delete" && matches!(phase, "Released" | "Failed") {
            tracing::info!(pv = %pv.name_any(), "released with reclaim policy Delete; deleting");
            match api.delete(&pv.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(Action::await_change());
    }

    if !has_ours {
        return Ok(Action::await_change());
    }
    if pv.finalizers().iter().any(|f| f == SHIP_LOGS_FINALIZER) {
        tracing::info!(pv = %pv.name_any(), "waiting for the log shipper before removing the directory");
        return Ok(Action::await_change());
    }
    if phase == "Bound" {
        // kubernetes.io/pv-protection holds it too; nothing to do until released.
        return Ok(Action::await_change());
    }
    if reclaim == "Delete" {
        let start = Instant::now();
        match remove_directory(&pv, &ctx).await {
            Ok(removed) => {
                tracing::info!(pv = %pv.name_any(), files = removed.files, dirs = removed.dirs, "directory removed");
                ctx.metrics
                    .operations
                    .with_label_values(&["delete", "success"])
                    .inc();
                ctx.metrics
                    .duration
                    .with_label_values(&["delete"])
                    .observe(start.elapsed().as_secs_f64());
            }
            Err(e) => {
                ctx.metrics
                    .operations
                    .with_label_values(&["delete", e.metric_label()])
                    .inc();
                let note = format!(
                    "cannot remove the volume directory: {e}; the PV is kept until it can be"
                );
                tracing::error!(pv = %pv.name_any(), "{note}");
                ctx.event(
                    &pv.object_ref(&()),
                    true,
                    "VolumeFailedDelete",
                    "Delete",
                    note,
                )
                .await;
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
        }
    } else {
        tracing::info!(pv = %pv.name_any(), reclaim, "PV deleted; keeping its directory");
    }
    let finalizers = pv
        .finalizers()
        .iter()
        .filter(|f| *f != CLEANUP_FINALIZER)
        .cloned()
        .collect();
    set_finalizers(&api, &pv, finalizers).await?;
    Ok(Action::await_change())
}

async fn remove_directory(pv: &PersistentVolume, ctx: &Context) -> Result<disk::Removed> {
    let ann = pv.annotations();
    let (Some(base), Some(host)) = (ann.get(BASE_PATH), ann.get(HOST_PATH)) else {
        return Err(Error::Invalid(format!(
            "PV {} lacks the {BASE_PATH}/{HOST_PATH} annotations",
            pv.name_any()
        )));
    };
    let base = PathBuf::from(base);
    // Only a base path this node's own config names: the annotation is
    // anyone's who may write PVs.
    let configured = ctx.config.get().all_paths(&ctx.node);
    if !configured.contains(&base) {
        return Err(Error::Invalid(format!(
            "{} is not one of this node's base paths ({}); nothing is removed. \
             If it was, add it back to the config, or remove {host} and this PV's \
             {CLEANUP_FINALIZER} finalizer by hand",
            base.display(),
            configured
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // The annotations are re-checked: whoever can edit a PV must not be able
    // to point the removal outside the base path.
    let rel = PathBuf::from(host)
        .strip_prefix(&base)
        .ok()
        .and_then(|r| r.to_str().map(paths::safe_relative))
        .ok_or_else(|| Error::Invalid(format!("{host} is not under {}", base.display())))?
        .map_err(|e| Error::Invalid(e.to_string()))?;
    // Only the directory's own PV removes it; a record naming another PV
    // that still exists means the directory is that volume's now.
    if let Some(other) = owner::held_by_other(ctx, &base, &rel, &pv.name_any()).await? {
        return Err(Error::Invalid(format!(
            "{host} belongs to PV {other}, not to this one; nothing is removed. \
             Remove this PV's {CLEANUP_FINALIZER} finalizer to let it go"
        )));
    }
    let removed = tokio::task::spawn_blocking(move || {
        let removed = disk::remove_volume_dir(&base, &rel)?;
        disk::clear_owner(&base, &rel)?;
        Ok::<_, disk::DiskError>(removed)
    })
    .await
    .expect("remove_volume_dir does not panic")?;
    Ok(removed)
}

/// Writes the finalizer list, guarded by resourceVersion so a concurrent
/// change (the shipper removing its own finalizer) is never overwritten.
async fn set_finalizers(
    api: &Api<PersistentVolume>,
    pv: &PersistentVolume,
    finalizers: Vec<String>,
) -> Result<()> {
    let patch = json!({
        "metadata": { "resourceVersion": pv.resource_version(), "finalizers": finalizers }
    });
    match api
        .patch(
            &pv.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
