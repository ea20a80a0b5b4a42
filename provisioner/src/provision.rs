//! The claim controller: a claim placed on this node gets a directory and a
//! PV. Every step is idempotent (deterministic PV name, existing directory
//! reused), so a retry or a restart after kill -9 converges on one volume.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event as CoreEvent, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::annotations::{NODE_PATH, PATH_PATTERN, SELECTED_NODE, VOLUME_TYPE};
use crate::claim::{self, Disposition, Request, VolumeType};
use crate::config::{Config, Placement};
use crate::context::Context;
use crate::paths::{self, ClaimNames};
use crate::volume::{self, Plan};
use crate::{disk, owner, Error, Result};

/// What an agent watches of a claim: its metadata, which holds the provisioner and the
/// selected node. The spec is fetched only for a claim that may need this agent.
pub type ClaimMeta = PartialObjectMeta<PersistentVolumeClaim>;

pub async fn reconcile(meta: Arc<ClaimMeta>, ctx: Arc<Context>) -> Result<Action> {
    if step(&meta.metadata, false, &ctx.node, &ctx.names) == Step::Ignore {
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
    match step(
        &claim.metadata,
        claim::has_volume(&claim),
        &ctx.node,
        &ctx.names,
    ) {
        Step::Provision => {}
        Step::AwaitNode => {
            warn_if_immediate(&claim, &ctx).await?;
            return Ok(Action::await_change());
        }
        Step::Ignore => return Ok(Action::await_change()),
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

/// What an agent does with a claim it sees.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Not this agent's, or it has a volume already.
    Ignore,
    /// Ours, with no node picked yet: an Immediate class is warned about.
    AwaitNode,
    /// Ours, placed on this node.
    Provision,
}

/// The `ShouldProvision` decision. An agent watches only metadata, so it is taken first on
/// that (`names_volume` false), then again on the whole claim once read.
fn step(meta: &ObjectMeta, names_volume: bool, node: &str, names: &[String]) -> Step {
    if names_volume {
        return Step::Ignore;
    }
    match claim::disposition(meta, node, names) {
        Disposition::Mine => Step::Provision,
        Disposition::AwaitingNode => Step::AwaitNode,
        Disposition::NotOurs | Disposition::Bound | Disposition::OtherNode => Step::Ignore,
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
    let draft = match draft(
        claim,
        &pv_name,
        &class_name,
        &class,
        &ctx.config.get(),
        &ctx.node,
    ) {
        Ok(d) => d,
        Err(Refusal::Invalid(note)) => {
            fail(note).await;
            return Ok(Outcome::Refused);
        }
        Err(Refusal::NoPath(note)) => {
            fail(note).await;
            unselect_node(claim, ctx).await?;
            return Ok(Outcome::HandedBack("no_path"));
        }
    };
    let Draft {
        request,
        volume_type,
        rel,
        candidates,
    } = draft;

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

/// What a claim asks of this node, checked before anything is made.
#[derive(Debug)]
struct Draft {
    request: Request,
    volume_type: VolumeType,
    /// The volume's directory, relative to the base path it goes under.
    rel: PathBuf,
    /// The base paths it may go under, before free space is looked at.
    candidates: Vec<PathBuf>,
}

/// Why a claim is not provisioned on this node; the note is said on the claim.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// It asks for something we cannot make.
    Invalid(String),
    /// This node has no base path for it: the claim goes back to the scheduler.
    NoPath(String),
}

/// Checks a claim against its class and this node's config: pure.
fn draft(
    claim: &PersistentVolumeClaim,
    pv_name: &str,
    class_name: &str,
    class: &StorageClass,
    config: &Config,
    node: &str,
) -> Result<Draft, Refusal> {
    let params = class.parameters.clone().unwrap_or_default();
    let request = claim::request(claim).map_err(|e| Refusal::Invalid(e.to_string()))?;
    let volume_type = claim::volume_type(claim, params.get(VOLUME_TYPE).map(String::as_str))
        .map_err(|e| Refusal::Invalid(e.to_string()))?;
    let names = ClaimNames {
        pv_name,
        namespace: claim.metadata.namespace.as_deref().unwrap_or_default(),
        name: claim.metadata.name.as_deref().unwrap_or_default(),
        annotations: claim.metadata.annotations.as_ref(),
        labels: claim.metadata.labels.as_ref(),
    };
    let rel = paths::volume_dir(&names, params.get(PATH_PATTERN).map(String::as_str))
        .map_err(|e| Refusal::Invalid(format!("{e}; fix the StorageClass `{class_name}`")))?;
    let mut candidates = match config.placement(node, class_name) {
        Placement::SharedFileSystem(_) => {
            return Err(Refusal::Invalid(format!(
                "StorageClass `{class_name}` uses sharedFileSystemPath, which localship does not serve yet"
            )))
        }
        Placement::Paths(p) => p,
    };
    if let Some(only) = params.get(NODE_PATH) {
        candidates.retain(|p| p.as_os_str() == only.as_str());
    }
    if candidates.is_empty() {
        return Err(Refusal::NoPath(format!(
            "node {node} has no base path for StorageClass `{class_name}` in the config; \
             handing the claim back to the scheduler to pick another node"
        )));
    }
    Ok(Draft {
        request,
        volume_type,
        rel,
        candidates,
    })
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
    if !binds_immediately(&class) {
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
    let result = match Api::<CoreEvent>::namespaced(ctx.client.clone(), &namespace)
        .create(&PostParams::default(), &event)
        .await
    {
        Ok(_) => {
            tracing::warn!(claim = %claim_id(claim), "{note}");
            "published"
        }
        Err(kube::Error::Api(s)) if s.code == 409 => "exists",
        Err(e) => {
            tracing::warn!(error = %e, "could not publish the WaitForFirstConsumer Event");
            "error"
        }
    };
    ctx.metrics
        .immediate_binding
        .with_label_values(&[result])
        .inc();
    Ok(())
}

/// Whether a class binds a claim before the scheduler picks a node: anything but
/// WaitForFirstConsumer, Immediate being the default.
fn binds_immediately(class: &StorageClass) -> bool {
    class.volume_binding_mode.as_deref() != Some("WaitForFirstConsumer")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{BIND_COMPLETED, STORAGE_PROVISIONER};
    use serde_json::json;
    use std::path::Path;

    const NODE: &str = "node-a";

    fn names() -> Vec<String> {
        vec!["localship.io/local-path".into()]
    }

    fn claim(annotations: serde_json::Value, spec: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": { "name": "data", "namespace": "ns", "uid": "u1", "annotations": annotations },
            "spec": spec,
        }))
        .unwrap()
    }

    /// A claim for this agent placed on `node`, asking for 1Gi.
    fn placed_on(node: &str) -> PersistentVolumeClaim {
        claim(
            json!({ STORAGE_PROVISIONER: "localship.io/local-path", SELECTED_NODE: node }),
            json!({ "storageClassName": "local", "resources": { "requests": { "storage": "1Gi" } } }),
        )
    }

    fn class(parameters: serde_json::Value) -> StorageClass {
        serde_json::from_value(json!({
            "metadata": { "name": "local" },
            "provisioner": "localship.io/local-path",
            "volumeBindingMode": "WaitForFirstConsumer",
            "parameters": parameters,
        }))
        .unwrap()
    }

    fn config(json: serde_json::Value) -> Config {
        Config::parse(Path::new("config.json"), &json.to_string()).unwrap()
    }

    fn draft_of(
        claim: &PersistentVolumeClaim,
        class: &StorageClass,
        config: &Config,
    ) -> Result<Draft, Refusal> {
        draft(claim, "pvc-u1", "local", class, config, NODE)
    }

    fn step_of(claim: &PersistentVolumeClaim) -> Step {
        step(&claim.metadata, claim::has_volume(claim), NODE, &names())
    }

    #[test]
    fn a_claim_placed_on_this_node_is_provisioned() {
        assert_eq!(step_of(&placed_on(NODE)), Step::Provision);
    }

    #[test]
    fn another_provisioners_claim_is_ignored() {
        let other = claim(
            json!({ STORAGE_PROVISIONER: "ebs.csi.aws.com", SELECTED_NODE: NODE }),
            json!({}),
        );
        assert_eq!(step_of(&other), Step::Ignore);
        assert_eq!(step_of(&claim(json!({}), json!({}))), Step::Ignore);
    }

    #[test]
    fn a_claim_placed_on_another_node_is_left_to_its_agent() {
        assert_eq!(step_of(&placed_on("node-b")), Step::Ignore);
    }

    #[test]
    fn a_claim_with_no_node_yet_waits_for_the_scheduler() {
        let unplaced = claim(
            json!({ STORAGE_PROVISIONER: "localship.io/local-path" }),
            json!({}),
        );
        assert_eq!(step_of(&unplaced), Step::AwaitNode);
    }

    #[test]
    fn a_claim_that_has_a_volume_is_ignored() {
        let bound = claim(
            json!({
                STORAGE_PROVISIONER: "localship.io/local-path",
                SELECTED_NODE: NODE,
                BIND_COMPLETED: "yes"
            }),
            json!({}),
        );
        assert_eq!(step_of(&bound), Step::Ignore);
        // Named by its author before the PV controller annotated it: the metadata the
        // watch sees lets it through, the whole claim read after does not.
        let prebound = claim(
            json!({ STORAGE_PROVISIONER: "localship.io/local-path", SELECTED_NODE: NODE }),
            json!({ "volumeName": "pvc-other" }),
        );
        assert_eq!(
            step(&prebound.metadata, false, NODE, &names()),
            Step::Provision
        );
        assert_eq!(step_of(&prebound), Step::Ignore);
    }

    #[test]
    fn only_a_class_that_waits_for_the_consumer_is_not_warned_about() {
        assert!(!binds_immediately(&class(json!({}))));
        let mut immediate = class(json!({}));
        immediate.volume_binding_mode = Some("Immediate".into());
        assert!(binds_immediately(&immediate));
        immediate.volume_binding_mode = None;
        assert!(binds_immediately(&immediate));
    }

    #[test]
    fn a_valid_claim_gets_its_directory_name_and_the_nodes_base_paths() {
        let config = config(json!({ "nodePathMap": [
            { "node": NODE, "paths": ["/data1", "/data2"] },
        ] }));
        let d = draft_of(&placed_on(NODE), &class(json!({})), &config).unwrap();
        assert_eq!(d.rel, PathBuf::from("pvc-u1_ns_data"));
        assert_eq!(
            d.candidates,
            [PathBuf::from("/data1"), PathBuf::from("/data2")]
        );
        assert_eq!(
            (d.request.bytes, d.volume_type),
            (1 << 30, VolumeType::HostPath)
        );
        // nodePath narrows the choice to one base path.
        let d = draft_of(
            &placed_on(NODE),
            &class(json!({ NODE_PATH: "/data2", VOLUME_TYPE: "local" })),
            &config,
        )
        .unwrap();
        assert_eq!(d.candidates, [PathBuf::from("/data2")]);
        assert_eq!(d.volume_type, VolumeType::Local);
    }

    #[test]
    fn a_claim_asking_for_what_a_local_volume_cannot_be_is_refused() {
        let config = Config::single(Path::new("/data"));
        let rwx = claim(
            json!({ STORAGE_PROVISIONER: "localship.io/local-path", SELECTED_NODE: NODE }),
            json!({ "accessModes": ["ReadWriteMany"], "resources": { "requests": { "storage": "1Gi" } } }),
        );
        let Err(Refusal::Invalid(note)) = draft_of(&rwx, &class(json!({})), &config) else {
            panic!("a ReadWriteMany claim is provisioned");
        };
        assert!(note.contains("ReadWriteMany"), "{note}");
        let no_size = claim(
            json!({ STORAGE_PROVISIONER: "localship.io/local-path", SELECTED_NODE: NODE }),
            json!({}),
        );
        assert!(matches!(
            draft_of(&no_size, &class(json!({})), &config),
            Err(Refusal::Invalid(_))
        ));
        let nfs = class(json!({ VOLUME_TYPE: "nfs" }));
        let Err(Refusal::Invalid(note)) = draft_of(&placed_on(NODE), &nfs, &config) else {
            panic!("an unknown volumeType is provisioned");
        };
        assert!(note.contains("nfs"), "{note}");
    }

    #[test]
    fn a_claim_whose_names_make_an_unsafe_path_is_refused_with_the_class_to_fix() {
        let config = Config::single(Path::new("/data"));
        let pattern = class(json!({ PATH_PATTERN: "{{ .PVC.Annotations.dir }}" }));
        let mut escaping = placed_on(NODE);
        escaping
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("dir".into(), "..".into());
        let Err(Refusal::Invalid(note)) = draft_of(&escaping, &pattern, &config) else {
            panic!("a path out of the base path is provisioned");
        };
        assert!(note.ends_with("fix the StorageClass `local`"), "{note}");
    }

    #[test]
    fn a_class_on_a_shared_filesystem_is_refused() {
        let config = config(json!({ "sharedFileSystemPath": "/mnt/nfs" }));
        let Err(Refusal::Invalid(note)) = draft_of(&placed_on(NODE), &class(json!({})), &config)
        else {
            panic!("a shared-filesystem class is provisioned");
        };
        assert!(note.contains("sharedFileSystemPath"), "{note}");
    }

    #[test]
    fn a_node_with_no_base_path_for_the_class_hands_the_claim_back() {
        let none = config(json!({ "nodePathMap": [
            { "node": NODE, "paths": [] },
            { "node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["/data"] },
        ] }));
        let Err(Refusal::NoPath(note)) = draft_of(&placed_on(NODE), &class(json!({})), &none)
        else {
            panic!("a node without base paths provisions");
        };
        assert!(note.contains("node node-a"), "{note}");
        // A nodePath this node does not have leaves nowhere either.
        let elsewhere = class(json!({ NODE_PATH: "/other" }));
        assert!(matches!(
            draft_of(
                &placed_on(NODE),
                &elsewhere,
                &Config::single(Path::new("/data"))
            ),
            Err(Refusal::NoPath(_))
        ));
    }
}
