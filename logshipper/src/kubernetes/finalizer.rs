//! The shipper's finalizer on a PV: held while the volume's logs may still need shipping.
//!
//! The list is written whole, guarded by resourceVersion, so a concurrent change (the
//! provisioner adding or dropping its own finalizer) is never overwritten: on a conflict the
//! PV is read again and the edit redone.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use localship_names::SHIP_LOGS_FINALIZER;
use serde_json::json;

use crate::{Error, Result};

/// Conflicts in a row before giving up until the next reconcile.
const CONFLICT_RETRIES: usize = 5;

/// The list with `name` added, or `None` if it is there already.
pub fn with(finalizers: &[String], name: &str) -> Option<Vec<String>> {
    if finalizers.iter().any(|f| f == name) {
        return None;
    }
    let mut list = finalizers.to_vec();
    list.push(name.to_owned());
    Some(list)
}

/// The list without `name`, or `None` if it is not there.
pub fn without(finalizers: &[String], name: &str) -> Option<Vec<String>> {
    if !finalizers.iter().any(|f| f == name) {
        return None;
    }
    Some(finalizers.iter().filter(|f| *f != name).cloned().collect())
}

pub fn holds(pv: &PersistentVolume) -> bool {
    pv.finalizers().iter().any(|f| f == SHIP_LOGS_FINALIZER)
}

/// Adds our finalizer. False if it could not be: the PV is gone, or is being deleted already
/// (the API refuses new finalizers then) without it.
pub async fn hold(api: &Api<PersistentVolume>, pv: &PersistentVolume) -> Result<bool> {
    edit(api, pv, |pv| {
        if pv.meta().deletion_timestamp.is_some() {
            return Edit::Done(holds(pv));
        }
        with(pv.finalizers(), SHIP_LOGS_FINALIZER).map_or(Edit::Done(true), Edit::Write)
    })
    .await
}

/// Removes our finalizer; a PV already gone is fine.
pub async fn release(api: &Api<PersistentVolume>, pv: &PersistentVolume) -> Result<()> {
    edit(api, pv, |pv| {
        without(pv.finalizers(), SHIP_LOGS_FINALIZER).map_or(Edit::Done(false), Edit::Write)
    })
    .await?;
    Ok(())
}

enum Edit {
    /// Nothing to write; whether we hold the PV.
    Done(bool),
    Write(Vec<String>),
}

/// Applies `plan` to the PV as last read until a write succeeds; returns whether we hold it.
async fn edit(
    api: &Api<PersistentVolume>,
    pv: &PersistentVolume,
    plan: impl Fn(&PersistentVolume) -> Edit,
) -> Result<bool> {
    let name = pv.name_any();
    let mut current = pv.clone();
    for _ in 0..CONFLICT_RETRIES {
        let finalizers = match plan(&current) {
            Edit::Done(held) => return Ok(held),
            Edit::Write(list) => list,
        };
        let held = finalizers.iter().any(|f| f == SHIP_LOGS_FINALIZER);
        let patch = json!({
            "metadata": { "resourceVersion": current.resource_version(), "finalizers": finalizers }
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(held),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            Err(kube::Error::Api(s)) if s.code == 409 => match api.get_opt(&name).await? {
                Some(pv) => current = pv,
                None => return Ok(false),
            },
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Volume(format!(
        "PV {name} changed {CONFLICT_RETRIES} times while its finalizers were being edited; \
         trying again later"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn adding_keeps_the_others_and_is_idempotent() {
        let cleanup = list(&["localship.io/cleanup"]);
        assert_eq!(
            with(&cleanup, SHIP_LOGS_FINALIZER),
            Some(list(&["localship.io/cleanup", SHIP_LOGS_FINALIZER]))
        );
        assert_eq!(
            with(&[], SHIP_LOGS_FINALIZER),
            Some(list(&[SHIP_LOGS_FINALIZER]))
        );
        let held = list(&[SHIP_LOGS_FINALIZER, "localship.io/cleanup"]);
        assert_eq!(with(&held, SHIP_LOGS_FINALIZER), None);
    }

    #[test]
    fn removing_keeps_the_others_in_order_and_is_idempotent() {
        let held = list(&[
            "kubernetes.io/pv-protection",
            SHIP_LOGS_FINALIZER,
            "localship.io/cleanup",
        ]);
        assert_eq!(
            without(&held, SHIP_LOGS_FINALIZER),
            Some(list(&[
                "kubernetes.io/pv-protection",
                "localship.io/cleanup"
            ]))
        );
        assert_eq!(
            without(&list(&["localship.io/cleanup"]), SHIP_LOGS_FINALIZER),
            None
        );
        assert_eq!(
            without(&list(&[SHIP_LOGS_FINALIZER]), SHIP_LOGS_FINALIZER),
            Some(vec![])
        );
    }
}
