//! The volume controller: this node's PVs keep our finalizer until their
//! directory is dealt with. A released `Delete` volume is deleted; once the
//! log shipper (if it holds the volume) lets go, the directory is removed
//! without following symlinks, and only then the finalizer. `Retain` keeps both.
//!
//! Not kube-runtime's `finalizer()` helper: cleanup here must wait on
//! another owner's finalizer, which that helper cannot express.

use std::collections::BTreeSet;
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
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let remove = match step(&pv, &ctx.node, &ctx.names) {
        Step::Ignore => return Ok(Action::await_change()),
        Step::NotOwned(note) => {
            tracing::warn!(pv = %pv.name_any(), "{note}");
            ctx.event(&pv.object_ref(&()), true, "VolumeNotOwned", "Delete", note)
                .await;
            return Ok(Action::await_change());
        }
        Step::Live { hold, delete } => {
            if hold {
                let mut finalizers = pv.finalizers().to_vec();
                finalizers.push(CLEANUP_FINALIZER.into());
                set_finalizers(&api, &pv, finalizers).await?;
            }
            if delete {
                tracing::info!(pv = %pv.name_any(), "released with reclaim policy Delete; deleting");
                match api.delete(&pv.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(Action::await_change());
        }
        Step::AwaitShipper => {
            tracing::info!(pv = %pv.name_any(), "waiting for the log shipper before removing the directory");
            return Ok(Action::await_change());
        }
        Step::Release { remove_directory } => remove_directory,
    };
    if remove {
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
        let reclaim = reclaim_policy(&pv);
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

/// What an agent does with one of the PVs it watches.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Not this node's volume, or nothing to do until it changes.
    Ignore,
    /// Says this node's, yet is not consistently so: nothing is touched, and the note says
    /// why on the PV.
    NotOwned(String),
    /// Not deleted: `hold` adds our finalizer, `delete` deletes a released `Delete` volume.
    Live { hold: bool, delete: bool },
    /// Deleted, but the log shipper still holds it: the directory stays until it lets go.
    AwaitShipper,
    /// Deleted and released: remove the directory (`Delete`) or keep it (`Retain`), then
    /// drop our finalizer.
    Release { remove_directory: bool },
}

/// Decides from the PV alone, as watched: pure.
fn step(pv: &PersistentVolume, node: &str, names: &[String]) -> Step {
    let ours = pv
        .annotations()
        .get(PROVISIONED_BY)
        .is_some_and(|p| names.contains(p));
    if !ours || pv.annotations().get(NODE).map(String::as_str) != Some(node) {
        return Step::Ignore;
    }
    if let Err(why) = volume::pinned_node(pv) {
        return Step::NotOwned(format!(
            "not managing PV {}: it claims node {node} but {why}; its directory is left alone",
            pv.name_any(),
        ));
    }
    let has_ours = pv.finalizers().iter().any(|f| f == CLEANUP_FINALIZER);
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default();
    let delete = reclaim_policy(pv) == "Delete";

    if pv.meta().deletion_timestamp.is_none() {
        return Step::Live {
            hold: !has_ours,
            delete: delete && matches!(phase, "Released" | "Failed"),
        };
    }
    if !has_ours {
        return Step::Ignore;
    }
    if pv.finalizers().iter().any(|f| f == SHIP_LOGS_FINALIZER) {
        return Step::AwaitShipper;
    }
    if phase == "Bound" {
        // kubernetes.io/pv-protection holds it too; nothing to do until released.
        return Step::Ignore;
    }
    Step::Release {
        remove_directory: delete,
    }
}

/// The PV's reclaim policy; unset is the API's default, `Delete`.
fn reclaim_policy(pv: &PersistentVolume) -> &str {
    pv.spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Delete")
}

async fn remove_directory(pv: &PersistentVolume, ctx: &Context) -> Result<disk::Removed> {
    let (base, rel) = directory(pv, &ctx.config.get().all_paths(&ctx.node))?;
    // Only the directory's own PV removes it; a record naming another PV
    // that still exists means the directory is that volume's now.
    if let Some(other) = owner::held_by_other(ctx, &base, &rel, &pv.name_any()).await? {
        return Err(Error::Invalid(format!(
            "{} belongs to PV {other}, not to this one; nothing is removed. \
             Remove this PV's {CLEANUP_FINALIZER} finalizer to let it go",
            base.join(&rel).display()
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

/// The PV's directory as (base path, path under it), from its annotations, if it is under
/// one of this node's `configured` base paths: pure.
fn directory(pv: &PersistentVolume, configured: &BTreeSet<PathBuf>) -> Result<(PathBuf, PathBuf)> {
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
    Ok((base, rel))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::NODE_LABEL;
    use serde_json::json;

    const HOST: &str = "/data/pvc-1_ns_logs";

    fn names() -> Vec<String> {
        vec!["localship.io/local-path".into()]
    }

    /// A PV of ours on node-a, as the provisioner writes it.
    fn pv(reclaim: &str, phase: &str, finalizers: &[&str]) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {
                "name": "pvc-1",
                "labels": { NODE_LABEL: "node-a" },
                "annotations": {
                    PROVISIONED_BY: "localship.io/local-path",
                    NODE: "node-a",
                    HOST_PATH: HOST,
                    BASE_PATH: "/data",
                },
                "finalizers": finalizers,
            },
            "spec": {
                "persistentVolumeReclaimPolicy": reclaim,
                "hostPath": { "path": HOST },
                "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                    { "key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"] }
                ] }] } },
            },
            "status": { "phase": phase },
        }))
        .unwrap()
    }

    fn deleted(mut pv: PersistentVolume) -> PersistentVolume {
        pv.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        pv
    }

    fn step_of(pv: &PersistentVolume) -> Step {
        step(pv, "node-a", &names())
    }

    #[test]
    fn a_new_volume_gets_our_finalizer_once() {
        assert_eq!(
            step_of(&pv("Delete", "Bound", &[])),
            Step::Live {
                hold: true,
                delete: false
            }
        );
        assert_eq!(
            step_of(&pv("Delete", "Bound", &[CLEANUP_FINALIZER])),
            Step::Live {
                hold: false,
                delete: false
            }
        );
    }

    #[test]
    fn a_released_volume_is_deleted_only_with_reclaim_policy_delete() {
        for phase in ["Released", "Failed"] {
            assert_eq!(
                step_of(&pv("Delete", phase, &[CLEANUP_FINALIZER])),
                Step::Live {
                    hold: false,
                    delete: true
                },
                "{phase}"
            );
        }
        assert_eq!(
            step_of(&pv("Retain", "Released", &[CLEANUP_FINALIZER])),
            Step::Live {
                hold: false,
                delete: false
            }
        );
        // No policy is the API's default, Delete.
        let mut unset = pv("Delete", "Released", &[CLEANUP_FINALIZER]);
        unset
            .spec
            .as_mut()
            .unwrap()
            .persistent_volume_reclaim_policy = None;
        assert_eq!(reclaim_policy(&unset), "Delete");
        assert!(matches!(step_of(&unset), Step::Live { delete: true, .. }));
    }

    #[test]
    fn a_deleted_volume_loses_its_directory_with_delete_and_keeps_it_with_retain() {
        assert_eq!(
            step_of(&deleted(pv("Delete", "Released", &[CLEANUP_FINALIZER]))),
            Step::Release {
                remove_directory: true
            }
        );
        assert_eq!(
            step_of(&deleted(pv("Retain", "Released", &[CLEANUP_FINALIZER]))),
            Step::Release {
                remove_directory: false
            }
        );
    }

    #[test]
    fn a_deleted_volume_waits_for_the_shipper_then_for_release() {
        let held = deleted(pv(
            "Delete",
            "Released",
            &[CLEANUP_FINALIZER, SHIP_LOGS_FINALIZER],
        ));
        assert_eq!(step_of(&held), Step::AwaitShipper);
        // Still bound: pv-protection holds it until the claim lets go.
        let bound = deleted(pv("Delete", "Bound", &[CLEANUP_FINALIZER]));
        assert_eq!(step_of(&bound), Step::Ignore);
    }

    #[test]
    fn a_deleted_volume_without_our_finalizer_is_left_alone() {
        let let_go = deleted(pv("Delete", "Released", &["kubernetes.io/pv-protection"]));
        assert_eq!(step_of(&let_go), Step::Ignore);
    }

    #[test]
    fn another_provisioners_or_another_nodes_volume_is_ignored() {
        let mut foreign = pv("Delete", "Released", &[CLEANUP_FINALIZER]);
        foreign
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(PROVISIONED_BY.into(), "rancher.io/local-path".into());
        assert_eq!(step_of(&foreign), Step::Ignore);
        let mut unmarked = pv("Delete", "Released", &[]);
        unmarked
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(PROVISIONED_BY);
        assert_eq!(step_of(&unmarked), Step::Ignore);
        let theirs = deleted(pv("Delete", "Released", &[CLEANUP_FINALIZER]));
        assert_eq!(step(&theirs, "node-b", &names()), Step::Ignore);
    }

    #[test]
    fn a_volume_naming_this_node_but_pinned_elsewhere_is_not_touched() {
        let mut moved = deleted(pv("Delete", "Released", &[CLEANUP_FINALIZER]));
        moved
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(NODE_LABEL.into(), "node-b".into());
        let Step::NotOwned(note) = step_of(&moved) else {
            panic!("an inconsistent PV is managed");
        };
        assert!(note.starts_with("not managing PV pvc-1"), "{note}");
    }

    #[test]
    fn only_a_directory_under_a_configured_base_path_is_removed() {
        let configured = BTreeSet::from([PathBuf::from("/data")]);
        let ours = pv("Delete", "Released", &[CLEANUP_FINALIZER]);
        assert_eq!(
            directory(&ours, &configured).unwrap(),
            (PathBuf::from("/data"), PathBuf::from("pvc-1_ns_logs"))
        );
        let err = directory(&ours, &BTreeSet::from([PathBuf::from("/other")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("not one of this node's base paths"),
            "{err}"
        );
        for host in ["/data/../etc", "/etc", "/data", "/data/a//b"] {
            let mut edited = ours.clone();
            edited
                .metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(HOST_PATH.into(), host.into());
            assert!(directory(&edited, &configured).is_err(), "{host}");
        }
        let mut bare = ours;
        bare.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(BASE_PATH);
        assert!(directory(&bare, &configured).is_err());
    }
}
