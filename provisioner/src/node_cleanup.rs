//! Volumes of a node that left the cluster for good. No agent runs there any more, and the
//! cleanup finalizer would hold its PVs for ever: once the Node object has been gone for a
//! grace period, released PVs are let go (their finalizers removed; there is no disk left
//! to clean) and claims that opted in are deleted, so their StatefulSet makes them anew on
//! a live node. Runs as its own identity (`localship-node-cleanup`), which the admission
//! policy lets do nothing but that.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use localship_api::{EventType, Events};
use serde_json::json;

use crate::annotations::{CLEANUP_FINALIZER, NODE_LABEL, SHIP_LOGS_FINALIZER};
use crate::Result;

/// Claim annotation or StorageClass parameter: what to do with a bound claim whose node is
/// gone. `delete-claim` deletes it; anything else (the default) keeps it bound.
pub const NODE_LOSS: &str = "localship.io/node-loss";
/// The value of [`NODE_LOSS`] that deletes the claim.
pub const DELETE_CLAIM: &str = "delete-claim";

/// What to do with one PV of a node that is gone.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The node is there, or the grace period has not passed.
    Wait,
    /// Released, failed or being deleted: delete it and remove localship's finalizers.
    LetGo,
    /// Still bound: delete the claim if it (or its class) opted in, else report it.
    Claim { namespace: String, name: String },
}

/// The decision for `pv`, whose node has been missing since `missing` (None: it exists).
pub fn step(
    pv: &PersistentVolume,
    missing: Option<Instant>,
    now: Instant,
    grace: Duration,
) -> Step {
    match missing {
        Some(since) if now.duration_since(since) >= grace => {}
        _ => return Step::Wait,
    }
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    if pv.meta().deletion_timestamp.is_some() || !matches!(phase, Some("Bound")) {
        return Step::LetGo;
    }
    match claim.and_then(|c| Some((c.namespace.clone()?, c.name.clone()?))) {
        Some((namespace, name)) => Step::Claim { namespace, name },
        None => Step::LetGo,
    }
}

/// Whether a bound claim is deleted when its node is gone: the claim's annotation, else its
/// class's parameter.
pub fn deletes_claim(
    claim: Option<&BTreeMap<String, String>>,
    class_parameters: Option<&BTreeMap<String, String>>,
) -> bool {
    [claim, class_parameters]
        .into_iter()
        .find_map(|m| m?.get(NODE_LOSS))
        .is_some_and(|v| v.trim() == DELETE_CLAIM)
}

/// localship's finalizers removed from `finalizers`, or None if it holds none of them.
pub fn without_ours(finalizers: &[String]) -> Option<Vec<String>> {
    let ours = |f: &String| f == CLEANUP_FINALIZER || f == SHIP_LOGS_FINALIZER;
    finalizers
        .iter()
        .any(ours)
        .then(|| finalizers.iter().filter(|f| !ours(f)).cloned().collect())
}

pub struct Cleanup {
    client: Client,
    events: Events,
    grace: Duration,
    /// When each missing node was first seen missing by this process.
    missing: HashMap<String, Instant>,
    /// PVs already reported as kept bound, so the Event is sent once.
    reported: HashSet<String>,
}

impl Cleanup {
    pub fn new(client: Client, grace: Duration) -> Self {
        Self {
            events: Events::new(client.clone(), "localship-node-cleanup", None),
            client,
            grace,
            missing: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    /// Watches nodes (metadata only) and localship's PVs, and acts every `period`.
    pub async fn run(mut self, period: Duration) -> Result<()> {
        let (nodes, node_writer) = reflector::store();
        let node_stream = reflector(
            node_writer,
            watcher(
                Api::<PartialObjectMeta<Node>>::all(self.client.clone()),
                localship_api::watcher_config(),
            ),
        )
        .default_backoff()
        .touched_objects()
        .for_each(|_| futures::future::ready(()));
        let (volumes, volume_writer) = reflector::store();
        let volume_stream = reflector(
            volume_writer,
            watcher(
                Api::<PersistentVolume>::all(self.client.clone()),
                localship_api::watcher_config().labels(NODE_LABEL),
            ),
        )
        .default_backoff()
        .touched_objects()
        .for_each(|_| futures::future::ready(()));
        tokio::spawn(node_stream);
        tokio::spawn(volume_stream);
        let _ = nodes.wait_until_ready().await;
        let _ = volumes.wait_until_ready().await;
        tracing::info!(grace = ?self.grace, "watching for nodes that left the cluster");
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let present: HashSet<String> = nodes.state().iter().map(|n| n.name_any()).collect();
            let pvs = volumes.state();
            self.pass(&present, pvs.iter().map(|pv| pv.as_ref())).await;
        }
    }

    async fn pass<'a>(
        &mut self,
        present: &HashSet<String>,
        pvs: impl Iterator<Item = &'a PersistentVolume>,
    ) {
        let now = Instant::now();
        self.missing.retain(|node, _| !present.contains(node));
        for pv in pvs {
            let Some(node) = pv.labels().get(NODE_LABEL) else {
                continue;
            };
            let missing = if present.contains(node) {
                None
            } else {
                Some(*self.missing.entry(node.clone()).or_insert(now))
            };
            let result = match step(pv, missing, now, self.grace) {
                Step::Wait => Ok(()),
                Step::LetGo => self.let_go(pv, node).await,
                Step::Claim { namespace, name } => self.claim(pv, node, &namespace, &name).await,
            };
            if let Err(e) = result {
                tracing::warn!(pv = %pv.name_any(), node, error = %e, "cannot clean up after a node that left; retrying");
            }
        }
    }

    async fn let_go(&self, pv: &PersistentVolume, node: &str) -> Result<()> {
        let api = Api::<PersistentVolume>::all(self.client.clone());
        let name = pv.name_any();
        if pv.meta().deletion_timestamp.is_none() {
            let uid = Preconditions {
                uid: pv.uid(),
                resource_version: None,
            };
            let params = DeleteParams {
                preconditions: Some(uid),
                ..DeleteParams::default()
            };
            ignore_gone(api.delete(&name, &params).await.map(|_| ()))?;
        }
        let Some(finalizers) = without_ours(pv.finalizers()) else {
            return Ok(());
        };
        let patch = json!({
            "metadata": { "resourceVersion": pv.resource_version(), "finalizers": finalizers }
        });
        ignore_gone(
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(|_| ()),
        )?;
        tracing::info!(pv = %name, node, "node left the cluster; let its volume go");
        self.event(
            pv,
            "NodeGone",
            format!(
                "node {node} left the cluster over {:?} ago; this volume's data went with it, \
                 the PV is removed",
                self.grace
            ),
        )
        .await;
        Ok(())
    }

    async fn claim(
        &mut self,
        pv: &PersistentVolume,
        node: &str,
        namespace: &str,
        name: &str,
    ) -> Result<()> {
        let claims = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace);
        let claim_uid = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.uid.clone());
        let Some(claim) = claims
            .get_opt(name)
            .await?
            .filter(|c| claim_uid.is_none() || c.metadata.uid == claim_uid)
        else {
            return Ok(());
        };
        if claim.meta().deletion_timestamp.is_some() {
            return Ok(());
        }
        let class = match claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.as_deref())
        {
            Some(class) if !class.is_empty() => {
                Api::<StorageClass>::all(self.client.clone())
                    .get_opt(class)
                    .await?
            }
            _ => None,
        };
        if !deletes_claim(
            claim.metadata.annotations.as_ref(),
            class.as_ref().and_then(|c| c.parameters.as_ref()),
        ) {
            if self.reported.insert(pv.name_any()) {
                self.event(
                    pv,
                    "NodeGone",
                    format!(
                        "node {node} left the cluster; claim {namespace}/{name} is still bound \
                         to this volume. Delete the claim to let it go, or set \
                         {NODE_LOSS}: {DELETE_CLAIM} on claims (or their StorageClass's \
                         parameters) to have that done"
                    ),
                )
                .await;
            }
            return Ok(());
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: claim.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        ignore_gone(claims.delete(name, &params).await.map(|_| ()))?;
        tracing::info!(claim = %format!("{namespace}/{name}"), node, "node left the cluster; deleted the claim");
        let note = format!(
            "node {node} left the cluster; deleted this claim ({NODE_LOSS}: {DELETE_CLAIM}) so \
             it is made anew on a live node"
        );
        self.warn(&claim.object_ref(&()), "NodeGone", note).await;
        Ok(())
    }

    async fn event(&self, pv: &PersistentVolume, reason: &str, note: String) {
        self.warn(&pv.object_ref(&()), reason, note).await;
    }

    async fn warn(&self, on: &ObjectReference, reason: &str, note: String) {
        let warning = EventType::Warning;
        self.events
            .publish(on, warning, reason, "NodeCleanup", note)
            .await;
    }
}

fn ignore_gone(result: kube::Result<()>) -> kube::Result<()> {
    match result {
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(phase: &str, deleting: bool) -> PersistentVolume {
        let mut pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": { "name": "pvc-1", "labels": { NODE_LABEL: "node-c" },
                          "finalizers": ["kubernetes.io/pv-protection", CLEANUP_FINALIZER] },
            "spec": { "claimRef": { "namespace": "ns", "name": "data", "uid": "u1" } },
            "status": { "phase": phase }
        }))
        .unwrap();
        if deleting {
            pv.metadata.deletion_timestamp =
                serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap();
        }
        pv
    }

    #[test]
    fn waits_while_the_node_exists_or_within_grace() {
        let now = Instant::now();
        let grace = Duration::from_secs(60);
        let released = pv("Released", false);
        assert_eq!(step(&released, None, now, grace), Step::Wait);
        assert_eq!(step(&released, Some(now), now, grace), Step::Wait);
        let later = now + Duration::from_secs(61);
        assert_eq!(step(&released, Some(now), later, grace), Step::LetGo);
    }

    #[test]
    fn bound_volumes_go_through_their_claim_others_are_let_go() {
        let since = Instant::now();
        let now = since + Duration::from_secs(10);
        let grace = Duration::from_secs(1);
        assert_eq!(
            step(&pv("Bound", false), Some(since), now, grace),
            Step::Claim {
                namespace: "ns".into(),
                name: "data".into()
            }
        );
        assert_eq!(
            step(&pv("Bound", true), Some(since), now, grace),
            Step::LetGo
        );
        assert_eq!(
            step(&pv("Failed", false), Some(since), now, grace),
            Step::LetGo
        );
        assert_eq!(
            step(&pv("Available", false), Some(since), now, grace),
            Step::LetGo
        );
    }

    #[test]
    fn claims_are_deleted_only_when_asked() {
        let asked = BTreeMap::from([(NODE_LOSS.to_string(), DELETE_CLAIM.to_string())]);
        let other = BTreeMap::from([(NODE_LOSS.to_string(), "keep".to_string())]);
        assert!(deletes_claim(Some(&asked), None));
        assert!(deletes_claim(None, Some(&asked)));
        assert!(
            !deletes_claim(Some(&other), Some(&asked)),
            "the claim's word wins"
        );
        assert!(!deletes_claim(None, None));
    }

    #[test]
    fn removes_only_localships_finalizers() {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            without_ours(&list(&[
                "kubernetes.io/pv-protection",
                CLEANUP_FINALIZER,
                SHIP_LOGS_FINALIZER
            ])),
            Some(list(&["kubernetes.io/pv-protection"]))
        );
        assert_eq!(without_ours(&list(&["kubernetes.io/pv-protection"])), None);
    }
}
