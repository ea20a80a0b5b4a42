//! The PersistentVolume for a claim: a pure function of the claim, its class
//! and where the directory was made.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, LocalVolumeSource, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::ResourceExt;

use crate::annotations::{
    BASE_PATH, CLEANUP_FINALIZER, HOST_PATH, NODE, NODE_LABEL, PROVISIONED_BY, SHIP_LOGS_FINALIZER,
};
use crate::claim::{Request, VolumeType};

/// Deterministic, so a retry or a restart finds the PV it already made
/// instead of making a second one.
pub fn pv_name(claim: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", claim.uid().unwrap_or_default())
}

/// Everything decided before the PV is written.
#[derive(Debug, Clone)]
pub struct Plan {
    pub node: String,
    /// The provisioner name the claim asked for (ours or rancher's).
    pub provisioner: String,
    pub base_path: PathBuf,
    pub host_path: PathBuf,
    pub volume_type: VolumeType,
    pub request: Request,
    /// The log shipper's opt-in: the annotation it reads, and the value the claim (or
    /// class) gave it. The PV is then made with the shipper's finalizer already on it, so a
    /// claim deleted before the shipper saw its volume still has its logs shipped, and
    /// records the value for when the claim is gone.
    pub ship_to: Option<(String, String)>,
}

/// The value of the shipper's opt-in `key` for this claim: the claim's annotation, else
/// the class's parameter, else the class's annotation (the shipper's own order).
pub fn ship_to(claim: &PersistentVolumeClaim, class: &StorageClass, key: &str) -> Option<String> {
    if key.is_empty() {
        return None;
    }
    [
        claim.metadata.annotations.as_ref(),
        class.parameters.as_ref(),
        class.metadata.annotations.as_ref(),
    ]
    .into_iter()
    .find_map(|m| m?.get(key))
    .cloned()
}

pub fn build(claim: &PersistentVolumeClaim, class: &StorageClass, plan: &Plan) -> PersistentVolume {
    let path = plan.host_path.to_string_lossy().into_owned();
    let (host_path, local) = match plan.volume_type {
        VolumeType::HostPath => (
            Some(HostPathVolumeSource {
                path,
                type_: Some("DirectoryOrCreate".into()),
            }),
            None,
        ),
        VolumeType::Local => (
            None,
            Some(LocalVolumeSource {
                path,
                fs_type: None,
            }),
        ),
    };
    let mut annotations = BTreeMap::from([
        (PROVISIONED_BY.to_string(), plan.provisioner.clone()),
        (NODE.to_string(), plan.node.clone()),
        (
            HOST_PATH.to_string(),
            plan.host_path.to_string_lossy().into_owned(),
        ),
        (
            BASE_PATH.to_string(),
            plan.base_path.to_string_lossy().into_owned(),
        ),
    ]);
    let mut finalizers = vec![CLEANUP_FINALIZER.to_string()];
    if let Some((key, value)) = &plan.ship_to {
        annotations.insert(key.clone(), value.clone());
        finalizers.push(SHIP_LOGS_FINALIZER.to_string());
    }
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name(claim)),
            labels: Some(BTreeMap::from([(
                NODE_LABEL.to_string(),
                plan.node.clone(),
            )])),
            annotations: Some(annotations),
            finalizers: Some(finalizers),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(plan.request.size.clone()),
            )])),
            access_modes: Some(plan.request.access_modes.clone()),
            volume_mode: Some(plan.request.volume_mode.clone()),
            persistent_volume_reclaim_policy: Some(
                class
                    .reclaim_policy
                    .clone()
                    .unwrap_or_else(|| "Delete".into()),
            ),
            storage_class_name: Some(class.name_any()),
            mount_options: class.mount_options.clone(),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: claim.namespace(),
                name: Some(claim.name_any()),
                uid: claim.uid(),
                resource_version: claim.resource_version(),
                ..ObjectReference::default()
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec![plan.node.clone()]),
                        }]),
                        match_fields: None,
                    }],
                }),
            }),
            host_path,
            local,
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    }
}

/// The node a PV of ours belongs to, if everything on it that names a node
/// or a path agrees: the node label, the node annotation, a required node
/// affinity of exactly `kubernetes.io/hostname In [node]`, and a hostPath or
/// local path equal to the host-path annotation. Anyone who may write PVs
/// can write these fields, so removal acts only when they are consistent
/// and name this agent's node (and then checks the path against its own
/// config).
pub fn pinned_node(pv: &PersistentVolume) -> Result<&str, String> {
    let node = pv
        .annotations()
        .get(NODE)
        .ok_or_else(|| format!("no {NODE} annotation"))?;
    if pv.labels().get(NODE_LABEL) != Some(node) {
        return Err(format!("its {NODE_LABEL} label does not name node {node}"));
    }
    let spec = pv.spec.as_ref().ok_or("no spec")?;
    let terms = spec
        .node_affinity
        .as_ref()
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    let pinned = match terms {
        [term] if term.match_fields.as_ref().is_none_or(Vec::is_empty) => {
            match term.match_expressions.as_deref() {
                Some([req]) => {
                    req.key == "kubernetes.io/hostname"
                        && req.operator == "In"
                        && req.values.as_deref() == Some(std::slice::from_ref(node))
                }
                _ => false,
            }
        }
        _ => false,
    };
    if !pinned {
        return Err(format!(
            "its node affinity does not pin it to node {node} alone"
        ));
    }
    let path = spec
        .host_path
        .as_ref()
        .map(|h| &h.path)
        .or(spec.local.as_ref().map(|l| &l.path));
    if path.is_none() || path != pv.annotations().get(HOST_PATH) {
        return Err(format!("its volume path is not its {HOST_PATH} annotation"));
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixtures() -> (PersistentVolumeClaim, StorageClass, Plan) {
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": { "name": "logs-airflow-worker-0", "namespace": "airflow", "uid": "1234", "resourceVersion": "7" },
            "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "5Gi" } } }
        }))
        .unwrap();
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": { "name": "local-path" },
            "provisioner": "localship.io/local-path",
            "reclaimPolicy": "Retain",
            "mountOptions": ["noatime"],
            "volumeBindingMode": "WaitForFirstConsumer"
        }))
        .unwrap();
        let plan = Plan {
            node: "node-a".into(),
            provisioner: "localship.io/local-path".into(),
            base_path: "/opt/local-path-provisioner".into(),
            host_path: "/opt/local-path-provisioner/pvc-1234_airflow_logs-airflow-worker-0".into(),
            volume_type: VolumeType::HostPath,
            request: crate::claim::request(&claim).unwrap(),
            ship_to: None,
        };
        (claim, class, plan)
    }

    #[test]
    fn a_volume_that_ships_logs_is_held_for_the_shipper_from_the_start() {
        let (mut claim, mut class, mut plan) = fixtures();
        let key = "localship.io/ship-to";
        assert_eq!(ship_to(&claim, &class, key), None);
        class.parameters = Some(BTreeMap::from([(key.into(), "s3://a/logs".into())]));
        assert_eq!(ship_to(&claim, &class, key).as_deref(), Some("s3://a/logs"));
        claim.metadata.annotations = Some(BTreeMap::from([(key.into(), "s3://b/logs".into())]));
        assert_eq!(
            ship_to(&claim, &class, key).as_deref(),
            Some("s3://b/logs"),
            "the claim wins"
        );
        assert_eq!(ship_to(&claim, &class, ""), None, "opt-in off");

        plan.ship_to = Some((key.into(), "s3://b/logs".into()));
        let pv = build(&claim, &class, &plan);
        assert_eq!(
            pv.metadata.finalizers,
            Some(vec![
                CLEANUP_FINALIZER.to_string(),
                SHIP_LOGS_FINALIZER.to_string()
            ])
        );
        assert_eq!(pv.annotations()[key], "s3://b/logs");
    }

    #[test]
    fn hostpath_volume_pinned_to_the_node() {
        let (claim, class, plan) = fixtures();
        let pv = build(&claim, &class, &plan);
        assert_eq!(pv.metadata.name.as_deref(), Some("pvc-1234"));
        assert_eq!(
            pv.metadata.finalizers,
            Some(vec![CLEANUP_FINALIZER.to_string()])
        );
        assert_eq!(pv.annotations()[PROVISIONED_BY], "localship.io/local-path");
        assert_eq!(
            pv.annotations()[HOST_PATH],
            plan.host_path.to_str().unwrap()
        );
        assert_eq!(pv.labels()[NODE_LABEL], "node-a");
        let spec = pv.spec.unwrap();
        assert_eq!(spec.capacity.unwrap()["storage"], Quantity("5Gi".into()));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.storage_class_name.as_deref(), Some("local-path"));
        assert_eq!(spec.mount_options, Some(vec!["noatime".to_string()]));
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        let claim_ref = spec.claim_ref.unwrap();
        assert_eq!(
            (
                claim_ref.namespace.as_deref(),
                claim_ref.name.as_deref(),
                claim_ref.uid.as_deref()
            ),
            (Some("airflow"), Some("logs-airflow-worker-0"), Some("1234"))
        );
        let term = &spec
            .node_affinity
            .unwrap()
            .required
            .unwrap()
            .node_selector_terms[0];
        let req = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!(
            (req.key.as_str(), req.operator.as_str(), req.values.clone()),
            (
                "kubernetes.io/hostname",
                "In",
                Some(vec!["node-a".to_string()])
            )
        );
        let hp = spec.host_path.unwrap();
        assert_eq!(hp.type_.as_deref(), Some("DirectoryOrCreate"));
        assert!(spec.local.is_none());
    }

    #[test]
    fn a_built_volume_is_pinned_to_its_node() {
        let (claim, class, plan) = fixtures();
        for volume_type in [VolumeType::HostPath, VolumeType::Local] {
            let plan = Plan {
                volume_type,
                ..plan.clone()
            };
            assert_eq!(pinned_node(&build(&claim, &class, &plan)), Ok("node-a"));
        }
    }

    #[test]
    fn a_volume_whose_fields_disagree_is_nobody_s() {
        let (claim, class, plan) = fixtures();
        let pv = build(&claim, &class, &plan);
        type Edit = fn(&mut PersistentVolume);
        let edits: [(&str, Edit); 5] = [
            ("label", |pv| {
                pv.labels_mut().insert(NODE_LABEL.into(), "node-b".into());
            }),
            ("annotation", |pv| {
                pv.annotations_mut().remove(NODE);
            }),
            ("affinity", |pv| {
                let spec = pv.spec.as_mut().unwrap();
                let term = &mut spec
                    .node_affinity
                    .as_mut()
                    .unwrap()
                    .required
                    .as_mut()
                    .unwrap()
                    .node_selector_terms[0];
                term.match_expressions.as_mut().unwrap()[0].values =
                    Some(vec!["node-a".into(), "node-b".into()]);
            }),
            ("second term", |pv| {
                let spec = pv.spec.as_mut().unwrap();
                let terms = &mut spec
                    .node_affinity
                    .as_mut()
                    .unwrap()
                    .required
                    .as_mut()
                    .unwrap()
                    .node_selector_terms;
                terms.push(terms[0].clone());
            }),
            ("path", |pv| {
                pv.spec.as_mut().unwrap().host_path.as_mut().unwrap().path = "/".into();
            }),
        ];
        for (what, edit) in edits {
            let mut forged = pv.clone();
            edit(&mut forged);
            assert!(pinned_node(&forged).is_err(), "{what}");
        }
    }

    #[test]
    fn local_volume_and_default_reclaim() {
        let (claim, mut class, mut plan) = fixtures();
        class.reclaim_policy = None;
        plan.volume_type = VolumeType::Local;
        let spec = build(&claim, &class, &plan).spec.unwrap();
        assert!(spec.host_path.is_none());
        assert_eq!(spec.local.unwrap().path, plan.host_path.to_str().unwrap());
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
    }
}
