//! Start-up reconciliation of directories against PVs. A crash between
//! making a directory and writing its PV leaves a directory nobody owns; if
//! its claim is still pending, provisioning reuses it, otherwise an empty one
//! is removed. One that holds data is reported and kept: nothing is deleted
//! that we were not told to delete.

use std::collections::HashSet;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::Store;
use kube::ResourceExt;

use crate::annotations::{HOST_PATH, NODE_LABEL};
use crate::context::Context;
use crate::provision::ClaimMeta;
use crate::Result;

/// Counts of what the sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub removed: usize,
    pub kept: usize,
}

/// `claims` is the synced claim cache: reading it rather than listing every claim in the
/// cluster keeps the start-up peak to our own claims.
pub async fn sweep(ctx: &Context, claims: &Store<ClaimMeta>) -> Result<Swept> {
    // Directories first, then PVs and claims: a directory made while the sweep runs is
    // then either not seen or has a claim that the later read includes (a claim is in
    // the cache before it is reconciled). The other order
    // could take a volume being provisioned right now for an orphan.
    let mut candidates = Vec::new();
    for base in ctx.config.get().all_paths(&ctx.node) {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only names we make by default: `pvc-<uid>_<namespace>_<claim>`.
            let Some(pv_name) = name
                .split('_')
                .next()
                .filter(|p| p.starts_with("pvc-") && p.len() == 40)
            else {
                continue;
            };
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                candidates.push((entry.path(), pv_name.to_owned()));
            }
        }
    }
    if candidates.is_empty() {
        return Ok(Swept::default());
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let owned: HashSet<PathBuf> = pvs
        .list(&ListParams::default().labels(&format!("{NODE_LABEL}={}", ctx.node)))
        .await?
        .into_iter()
        .filter_map(|pv| pv.annotations().get(HOST_PATH).map(PathBuf::from))
        .collect();
    // Only our provisioner's claims are cached, and only those can have a directory here.
    let pending: HashSet<String> = claims
        .state()
        .iter()
        .filter_map(|c| c.uid().map(|u| format!("pvc-{u}")))
        .collect();
    let mut swept = Swept::default();
    for (path, pv_name) in candidates {
        if owned.contains(&path) || pending.contains(&pv_name) {
            continue;
        }
        if std::fs::remove_dir(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed empty directory left without a PV");
            ctx.metrics.orphans.with_label_values(&["removed"]).inc();
            swept.removed += 1;
        } else {
            tracing::warn!(path = %path.display(), "directory has no PV and no claim but holds data; keeping it");
            ctx.metrics.orphans.with_label_values(&["kept"]).inc();
            swept.kept += 1;
        }
    }
    Ok(swept)
}
