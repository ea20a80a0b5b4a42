//! Which claims this agent serves, and what a claim asks for.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use thiserror::Error;

use crate::annotations::{
    BIND_COMPLETED, SELECTED_NODE, STORAGE_PROVISIONER, STORAGE_PROVISIONER_BETA, VOLUME_TYPE,
};
use crate::quantity::{parse_bytes, BadQuantity};

/// What an agent should do with a claim it sees.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Another provisioner's claim, or none at all.
    NotOurs,
    /// Already has a volume.
    Bound,
    /// Ours, but no node selected: an Immediate-binding class, or a claim
    /// whose pod is not scheduled yet.
    AwaitingNode,
    /// Ours, for another node's agent.
    OtherNode,
    /// Ours, on this node: provision it.
    Mine,
}

/// The provisioner a claim asks for, from either annotation spelling.
pub fn requested_provisioner(meta: &ObjectMeta) -> Option<&str> {
    let ann = meta.annotations.as_ref()?;
    ann.get(STORAGE_PROVISIONER)
        .or_else(|| ann.get(STORAGE_PROVISIONER_BETA))
        .map(String::as_str)
}

pub fn selected_node(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(SELECTED_NODE)
        .map(String::as_str)
}

/// Whether a claim asks for one of `names`. Only these are kept in an agent's
/// cache, so its memory follows its own claims, not the cluster's.
pub fn is_ours(meta: &ObjectMeta, names: &[String]) -> bool {
    requested_provisioner(meta).is_some_and(|p| names.iter().any(|n| n == p))
}

/// The `ShouldProvision` qualifier, from the metadata alone (all an agent
/// watches): only claims for one of `names` that the scheduler placed on
/// `node` are this agent's.
pub fn disposition(meta: &ObjectMeta, node: &str, names: &[String]) -> Disposition {
    let bound = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(BIND_COMPLETED));
    if bound {
        return Disposition::Bound;
    }
    if !is_ours(meta, names) {
        return Disposition::NotOurs;
    }
    match selected_node(meta) {
        None => Disposition::AwaitingNode,
        Some(n) if n == node => Disposition::Mine,
        Some(_) => Disposition::OtherNode,
    }
}

/// Whether the whole claim already names a volume: bound, or bound by its
/// author before the PV controller annotated it.
pub fn has_volume(claim: &PersistentVolumeClaim) -> bool {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
}

#[derive(Debug, Error, PartialEq)]
pub enum ClaimError {
    #[error("access mode {0} cannot be honoured by a node-local volume; use ReadWriteOnce or ReadWriteOncePod")]
    AccessMode(String),
    #[error("volumeMode Block is not supported: a local-path volume is a directory; use volumeMode Filesystem")]
    BlockMode,
    #[error("the claim requests no storage size; set spec.resources.requests.storage")]
    NoSize,
    #[error(transparent)]
    Size(#[from] BadQuantity),
    #[error("volumeType `{0}` is not known; use hostPath or local")]
    VolumeType(String),
}

/// The parts of a claim a volume is built from, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// As written in the claim, for the PV's capacity.
    pub size: String,
    pub bytes: u64,
    pub access_modes: Vec<String>,
    pub volume_mode: String,
}

pub fn request(claim: &PersistentVolumeClaim) -> Result<Request, ClaimError> {
    let spec = claim.spec.clone().unwrap_or_default();
    let mut access_modes = spec.access_modes.unwrap_or_default();
    if access_modes.is_empty() {
        access_modes.push("ReadWriteOnce".into());
    }
    if let Some(m) = access_modes
        .iter()
        .find(|m| !matches!(m.as_str(), "ReadWriteOnce" | "ReadWriteOncePod"))
    {
        return Err(ClaimError::AccessMode(m.clone()));
    }
    let volume_mode = spec.volume_mode.unwrap_or_else(|| "Filesystem".into());
    if volume_mode == "Block" {
        return Err(ClaimError::BlockMode);
    }
    let size = spec
        .resources
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").map(|q| q.0.clone()))
        .ok_or(ClaimError::NoSize)?;
    let bytes = parse_bytes(&size)?;
    Ok(Request {
        size,
        bytes,
        access_modes,
        volume_mode,
    })
}

/// `hostPath` or `local`, from the claim's annotation, else the class
/// parameter, else `hostPath` (rancher's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeType {
    HostPath,
    Local,
}

pub fn volume_type(
    claim: &PersistentVolumeClaim,
    class_parameter: Option<&str>,
) -> Result<VolumeType, ClaimError> {
    let chosen = claim
        .annotations()
        .get(VOLUME_TYPE)
        .map(String::as_str)
        .or(class_parameter);
    match chosen.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("hostpath") => Ok(VolumeType::HostPath),
        Some("local") => Ok(VolumeType::Local),
        Some(_) => Err(ClaimError::VolumeType(
            chosen.unwrap_or_default().to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claim(ann: serde_json::Value, spec: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": { "name": "c", "namespace": "n", "uid": "u", "annotations": ann },
            "spec": spec,
        }))
        .unwrap()
    }

    fn names() -> Vec<String> {
        vec![
            "localship.io/local-path".into(),
            "rancher.io/local-path".into(),
        ]
    }

    #[test]
    fn qualifies_only_this_nodes_claims() {
        let spec = json!({});
        let mine = claim(
            json!({ STORAGE_PROVISIONER: "localship.io/local-path", SELECTED_NODE: "node-a" }),
            spec.clone(),
        );
        assert_eq!(
            disposition(&mine.metadata, "node-a", &names()),
            Disposition::Mine
        );
        assert_eq!(
            disposition(&mine.metadata, "node-b", &names()),
            Disposition::OtherNode
        );
        assert!(is_ours(&mine.metadata, &names()));
        let legacy = claim(
            json!({ STORAGE_PROVISIONER_BETA: "rancher.io/local-path", SELECTED_NODE: "node-a" }),
            spec.clone(),
        );
        assert_eq!(
            disposition(&legacy.metadata, "node-a", &names()),
            Disposition::Mine
        );
        assert_eq!(
            disposition(&legacy.metadata, "node-a", &names()[..1]),
            Disposition::NotOurs
        );
        let immediate = claim(
            json!({ STORAGE_PROVISIONER: "localship.io/local-path" }),
            spec.clone(),
        );
        assert_eq!(
            disposition(&immediate.metadata, "node-a", &names()),
            Disposition::AwaitingNode
        );
        let other = claim(
            json!({ STORAGE_PROVISIONER: "ebs.csi.aws.com", SELECTED_NODE: "node-a" }),
            spec,
        );
        assert_eq!(
            disposition(&other.metadata, "node-a", &names()),
            Disposition::NotOurs
        );
        assert!(!is_ours(&other.metadata, &names()));
        let unannotated = claim(json!({}), json!({}));
        assert!(!is_ours(&unannotated.metadata, &names()));
        let bound = claim(
            json!({
                STORAGE_PROVISIONER: "localship.io/local-path",
                SELECTED_NODE: "node-a",
                BIND_COMPLETED: "yes"
            }),
            json!({ "volumeName": "pvc-1" }),
        );
        assert_eq!(
            disposition(&bound.metadata, "node-a", &names()),
            Disposition::Bound
        );
        assert!(has_volume(&bound));
        // Named by its author, not yet annotated: only the whole claim says so.
        let prebound = claim(
            json!({ STORAGE_PROVISIONER: "localship.io/local-path", SELECTED_NODE: "node-a" }),
            json!({ "volumeName": "pvc-2" }),
        );
        assert_eq!(
            disposition(&prebound.metadata, "node-a", &names()),
            Disposition::Mine
        );
        assert!(has_volume(&prebound) && !has_volume(&mine));
    }

    #[test]
    fn checks_what_a_node_local_volume_can_honour() {
        let ok = claim(
            json!({}),
            json!({ "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "2Gi" } } }),
        );
        let r = request(&ok).unwrap();
        assert_eq!(
            (r.size.as_str(), r.bytes, r.volume_mode.as_str()),
            ("2Gi", 2 << 30, "Filesystem")
        );
        let rwx = claim(
            json!({}),
            json!({ "accessModes": ["ReadWriteMany"], "resources": { "requests": { "storage": "1Gi" } } }),
        );
        assert_eq!(
            request(&rwx),
            Err(ClaimError::AccessMode("ReadWriteMany".into()))
        );
        let block = claim(
            json!({}),
            json!({ "volumeMode": "Block", "resources": { "requests": { "storage": "1Gi" } } }),
        );
        assert_eq!(request(&block), Err(ClaimError::BlockMode));
        assert_eq!(
            request(&claim(json!({}), json!({}))),
            Err(ClaimError::NoSize)
        );
    }

    #[test]
    fn volume_type_claim_overrides_class() {
        let plain = claim(json!({}), json!({}));
        assert_eq!(volume_type(&plain, None), Ok(VolumeType::HostPath));
        assert_eq!(volume_type(&plain, Some("local")), Ok(VolumeType::Local));
        let annotated = claim(json!({ VOLUME_TYPE: "hostPath" }), json!({}));
        assert_eq!(
            volume_type(&annotated, Some("local")),
            Ok(VolumeType::HostPath)
        );
        assert!(volume_type(&plain, Some("nfs")).is_err());
    }
}
