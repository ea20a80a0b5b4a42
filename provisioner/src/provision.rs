//! The claim controller: a claim placed on this node gets a directory and a
//! PV. Every step is idempotent (deterministic PV name, existing directory
//! reused), so a retry or a restart after kill -9 converges on one volume.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event as CoreEvent, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::annotations::{NODE_PATH, PATH_PATTERN, SELECTED_NODE, VOLUME_TYPE};
use crate::claim::{self, Disposition};
use crate::config::Placement;
use crate::context::Context;
use crate::paths::{self, ClaimNames};
use crate::volume::{self, Plan};
use crate::{disk, owner, Error, Result};

/// What an agent watches of a claim: its metadata, which holds the provisioner and the
/// selected node. The spec is fetched only for a claim that may need this agent.
pub type ClaimMeta = PartialObjectMeta<PersistentVolumeClaim>;

pub async fn reconcile(meta: Arc<ClaimMeta>, ctx: Arc<Context>) -> Result<Action> {
    if !matches!(
        claim::disposition(&meta.metadata, &ctx.node, &ctx.names),
        Disposition::Mine | Disposition::AwaitingNode
    ) {
        return Ok(Action::await_change());
    }
    let api: Api<PersistentVolumeClaim> = Api::namespaced(
        ctx.client.clone(),
        meta.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let Some(claim) = api.get_opt(&meta.name_any()).await? else {
        return Ok(Action::await_change());
    };
    // Decided again on what was just read: the claim may have moved on since the event.
    if claim::has_volume(&claim) {
        return Ok(Action::await_change());
    }
    match claim::disposition(&claim.metadata, &ctx.node, &ctx.names) {
        Disposition::Mine => {}
        Disposition::AwaitingNode => {
            warn_if_immediate(&claim, &ctx).await?;
            return Ok(Action::await_change());
        }
        _ => return Ok(Action::await_change()),
    }
    let start = Instant::now();
    let result = provision(&claim, &ctx).await;
    let label = match &result {
        Ok(Outcome::Provisioned) => "success",
        Ok(Outcome::AlreadyDone) => return Ok(Action::await_change()),
        Ok(Outcome::Refused) => "invalid",
        Ok(Outcome::HandedBack(reason)) => reason,
        Err(e) => e.metric_label(),
    };
    ctx.metrics
        .operations
        .with_label_values(&["provision", label])
        .inc();
    ctx.metrics
        .duration
        .with_label_values(&["provision"])
        .observe(start.elapsed().as_secs_f64());
    match result {
        Err(Error::MissingClass(_)) => Ok(Action::requeue(Duration::from_secs(10))),
        Err(e) => Err(e),
        Ok(_) => Ok(Action::await_change()),
    }
}

enum Outcome {
    Provisioned,
    AlreadyDone,
    /// The claim asks for something we cannot make; an Event says what.
    Refused,
    /// Given back to the scheduler (metric label says why).
    HandedBack(&'static str),
}

async fn provision(claim: &PersistentVolumeClaim, ctx: &Context) -> Result<Outcome> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv_name = volume::pv_name(claim);
    if pvs.get_opt(&pv_name).await?.is_some() {
        return Ok(Outcome::AlreadyDone);
    }
    let reference = claim.object_ref(&());
    let fail = |note: String| {
        let reference = &reference;
        async move {
            tracing::warn!(claim = %claim_id(claim), "{note}");
            ctx.event(reference, true, "ProvisioningFailed", "Provision", note)
                .await;
        }
    };

    let (class_name, class) = class_of(claim, ctx);
    let Some(class) = class else {
        fail(format!(
            "StorageClass `{class_name}` not found; create it or fix spec.storageClassName"
        ))
        .await;
        return Err(Error::MissingClass(class_name));
    };
    let params = class.parameters.clone().unwrap_or_default();
    let request = match claim::request(claim) {
        Ok(r) => r,
        Err(e) => {
            fail(e.to_string()).await;
            return Ok(Outcome::Refused);
        }
    };
    let volume_type = match claim::volume_type(claim, params.get(VOLUME_TYPE).map(String::as_str)) {
        Ok(t) => t,
        Err(e) => {
            fail(e.to_string()).await;
            return Ok(Outcome::Refused);
        }
    };
    let names = ClaimNames {
        pv_name: &pv_name,
        namespace: claim.metadata.namespace.as_deref().unwrap_or_default(),
        name: claim.metadata.name.as_deref().unwrap_or_default(),
        annotations: claim.metadata.annotations.as_ref(),
        labels: claim.metadata.labels.as_ref(),
    };
    let rel = match paths::volume_dir(&names, params.get(PATH_PATTERN).map(String::as_str)) {
        Ok(r) => r,
        Err(e) => {
            fail(format!("{e}; fix the StorageClass `{class_name}`")).await;
            return Ok(Outcome::Refused);
        }
    };

    let config = ctx.config.get();
    let mut candidates = match config.placement(&ctx.node, &class_name) {
        Placement::SharedFileSystem(_) => {
            fail(format!(
                "StorageClass `{class_name}` uses sharedFileSystemPath, which localship does not serve yet"
            ))
            .await;
            return Ok(Outcome::Refused);
        }
        Placement::Paths(p) => p,
    };
    if let Some(only) = params.get(NODE_PATH) {
        candidates.retain(|p| p.as_os_str() == only.as_str());
    }
    if candidates.is_empty() {
        fail(format!(
            "node {} has no base path for StorageClass `{class_name}` in the config; \
             handing the claim back to the scheduler to pick another node",
            ctx.node
        ))
        .await;
        unselect_node(claim, ctx).await?;
        return Ok(Outcome::HandedBack("no_path"));
    }

    // A directory left by an attempt that crashed before writing the PV is
    // reused, wherever it is, so no orphan is left behind.
    let existing = candidates
        .iter()
        .find(|b| disk::volume_dir_exists(b, &rel))
        .cloned();
    let base = match existing {
        Some(b) => b,
        None => {
            let mut spaces = Vec::new();
            let mut report = Vec::new();
            for path in &candidates {
                let _ = std::fs::create_dir_all(path);
                match disk::space(path) {
                    Ok(s) => {
                        report.push(format!("{} has {} free", path.display(), human(s.free)));
                        spaces.push((path.clone(), s));
                    }
                    Err(e) => report.push(e.to_string()),
                }
            }
            match disk::choose(&spaces, request.bytes, ctx.reserve) {
                Some(b) => b,
                None => {
                    fail(format!(
                        "not enough space on node {} for {} (keeping {} free): {}; \
                         handing the claim back to the scheduler to pick another node",
                        ctx.node,
                        request.size,
                        human(ctx.reserve),
                        report.join(", ")
                    ))
                    .await;
                    unselect_node(claim, ctx).await?;
                    return Ok(Outcome::HandedBack("no_space"));
                }
            }
        }
    };

    // A directory belongs to one PV. Another PV that still exists keeps
    // it (a claim recreated under the same pathPattern while the old volume
    // drains must not share, then lose, its data); a record naming a PV that
    // is gone is stale. Recorded before the directory is made, so a crash in
    // between leaves the directory ours.
    if let Some(other) = owner::held_by_other(ctx, &base, &rel, &pv_name).await? {
        let note = format!(
            "{} belongs to PV {other}, which still exists; the claim waits until that \
             volume is gone and its directory removed (or use a pathPattern that gives \
             each claim its own directory)",
            base.join(&rel).display()
        );
        fail(note.clone()).await;
        return Err(Error::Invalid(note));
    }
    let (b, r, owner) = (base.clone(), rel.clone(), pv_name.clone());
    tokio::task::spawn_blocking(move || disk::set_owner(&b, &r, &owner))
        .await
        .expect("set_owner does not panic")?;
    ctx.event(
        &reference,
        false,
        "Provisioning",
        "Provision",
        format!("making {} on node {}", base.join(&rel).display(), ctx.node),
    )
    .await;
    let (b, r, mode) = (base.clone(), rel.clone(), ctx.dir_mode);
    let made = tokio::task::spawn_blocking(move || disk::create_volume_dir(&b, &r, mode))
        .await
        .expect("create_volume_dir does not panic");
    let host_path: PathBuf = match made {
        Ok(path) => path,
        Err(e) => {
            // Said on the claim too: a symlink planted at the volume path or
            // a read-only disk is for the claim's owner to see, not only the log.
            fail(format!("cannot create the volume directory: {e}; retrying")).await;
            return Err(e.into());
        }
    };
    let plan = Plan {
        node: ctx.node.clone(),
        provisioner: claim::requested_provisioner(&claim.metadata)
            .unwrap_or_default()
            .to_string(),
        base_path: base,
        host_path,
        volume_type,
        request,
        ship_to: volume::ship_to(claim, &class, &ctx.opt_in_annotation)
            .map(|value| (ctx.opt_in_annotation.clone(), value)),
    };
    let pv = volume::build(claim, &class, &plan);
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(claim = %claim_id(claim), pv = %pv_name, path = %plan.host_path.display(), "provisioned");
    ctx.event(
        &reference,
        false,
        "ProvisioningSucceeded",
        "Provision",
        format!(
            "Successfully provisioned volume {pv_name} at {} on node {}",
            plan.host_path.display(),
            ctx.node
        ),
    )
    .await;
    Ok(Outcome::Provisioned)
}

/// Removes `selected-node` so the scheduler places the pod again, as the
/// external-provisioner library does when a node cannot serve a claim. The
/// resourceVersion makes it a no-op if the claim changed meanwhile.
async fn unselect_node(claim: &PersistentVolumeClaim, ctx: &Context) -> Result<()> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(
        ctx.client.clone(),
        claim.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let patch = json!({
        "metadata": {
            "resourceVersion": claim.resource_version(),
            "annotations": { SELECTED_NODE: null }
        }
    });
    match api
        .patch(
            &claim.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// An Immediate-binding class cannot work for node-local volumes: the claim
/// would be bound before anyone knows which node it belongs to. One Event per
/// claim, whatever the number of agents: its name is derived from the claim,
/// so every agent but the first gets AlreadyExists.
async fn warn_if_immediate(claim: &PersistentVolumeClaim, ctx: &Context) -> Result<()> {
    let (class_name, class) = class_of(claim, ctx);
    let Some(class) = class else {
        return Ok(());
    };
    if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
        return Ok(());
    }
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let note = format!(
        "StorageClass `{class_name}` uses volumeBindingMode Immediate, but a node-local volume can only be \
         made once the scheduler has picked a node: set volumeBindingMode: WaitForFirstConsumer on the class"
    );
    let event: CoreEvent = serde_json::from_value(json!({
        "metadata": { "name": format!("localship-wffc-{}", claim.uid().unwrap_or_default()), "namespace": namespace },
        "involvedObject": claim.object_ref(&()),
        "reason": "WaitForFirstConsumerRequired",
        "message": note,
        "type": "Warning",
        "source": { "component": "localship-provisioner" },
        "reportingComponent": "localship.io/provisioner",
        "reportingInstance": ctx.node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }))
    .map_err(|e| Error::Invalid(e.to_string()))?;
    match Api::<CoreEvent>::namespaced(ctx.client.clone(), &namespace)
        .create(&PostParams::default(), &event)
        .await
    {
        Ok(_) => tracing::warn!(claim = %claim_id(claim), "{note}"),
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => tracing::warn!(error = %e, "could not publish the WaitForFirstConsumer Event"),
    }
    Ok(())
}

/// The claim's class name and, if it exists, the class from the cache.
fn class_of(claim: &PersistentVolumeClaim, ctx: &Context) -> (String, Option<Arc<StorageClass>>) {
    let name = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    let class = ctx.classes.get(&ObjectRef::<StorageClass>::new(&name));
    (name, class)
}

fn claim_id(claim: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim.name_any()
    )
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
