//! One of this node's PVs as the shipper sees it: where its directory is and whose it is.
//! Pure, from the PV.

use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::ResourceExt;
use localship_names::{BASE_PATH, HOST_PATH, NODE};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    /// The volume's directory: an Airflow log folder, shipped as a source.
    pub host_path: PathBuf,
    /// The directory it was made under. If this is missing too, the base path is not mounted
    /// in this container, which is not the same as the volume's directory being gone.
    pub base_path: PathBuf,
    /// Its claim's namespace (from `claimRef`): whose logs these are.
    pub namespace: Option<String>,
}

impl Volume {
    /// The volume behind `pv`, if it is a localship volume of `node` whose annotations hold up.
    /// Whoever can edit a PV's annotations must not be able to point the shipper at other
    /// directories, so the host path must be plainly under the base path and match the spec.
    pub fn of(pv: &PersistentVolume, node: &str) -> Result<Self, String> {
        let name = pv.name_any();
        let ann = pv.annotations();
        match ann.get(NODE) {
            Some(n) if n == node => {}
            other => {
                return Err(format!(
                    "PV {name} is labelled for node {node} but its {NODE} annotation is {other:?}"
                ))
            }
        }
        let host = ann
            .get(HOST_PATH)
            .ok_or_else(|| format!("PV {name} lacks the {HOST_PATH} annotation"))?;
        let host_path = PathBuf::from(host);
        if !plain_absolute(&host_path) {
            return Err(format!(
                "PV {name}: {HOST_PATH} `{host}` is not a plain absolute path"
            ));
        }
        let base_path = match ann.get(BASE_PATH) {
            Some(base) => {
                let base_path = PathBuf::from(base);
                if !plain_absolute(&base_path)
                    || base_path == host_path
                    || !host_path.starts_with(&base_path)
                {
                    return Err(format!(
                        "PV {name}: {HOST_PATH} `{host}` is not under {BASE_PATH} `{base}`"
                    ));
                }
                base_path
            }
            None => host_path
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| format!("PV {name}: {HOST_PATH} `{host}` is the root"))?,
        };
        let spec = pv.spec.as_ref();
        let spec_path = spec
            .and_then(|s| s.host_path.as_ref().map(|h| h.path.as_str()))
            .or_else(|| spec.and_then(|s| s.local.as_ref().map(|l| l.path.as_str())));
        if let Some(path) = spec_path.filter(|p| Path::new(p) != host_path) {
            return Err(format!(
                "PV {name}: {HOST_PATH} `{host}` differs from the volume's path `{path}`"
            ));
        }
        let namespace = spec
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.namespace.clone());
        Ok(Self {
            name,
            host_path,
            base_path,
            namespace,
        })
    }
}

/// Absolute, without `.` or `..`: what it says is where it is (symlinks aside, which the
/// walk never follows below the root).
fn plain_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pv(annotations: serde_json::Value, path: Option<&str>) -> PersistentVolume {
        let claim = json!({ "namespace": "team-a", "name": "logs" });
        let spec = match path {
            Some(path) => json!({ "hostPath": { "path": path }, "claimRef": claim }),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "metadata": { "name": "pvc-1", "annotations": annotations },
            "spec": spec,
        }))
        .unwrap()
    }

    fn ann(host: &str, base: &str) -> serde_json::Value {
        json!({ NODE: "node-a", HOST_PATH: host, BASE_PATH: base })
    }

    #[test]
    fn a_provisioned_volume() {
        let host = "/var/localship/pvc-1_ns_logs";
        let v = Volume::of(&pv(ann(host, "/var/localship"), Some(host)), "node-a").unwrap();
        assert_eq!(v.host_path, PathBuf::from(host));
        assert_eq!(v.base_path, PathBuf::from("/var/localship"));
        assert_eq!(v.name, "pvc-1");
        assert_eq!(v.namespace.as_deref(), Some("team-a"));
        let no_base = json!({ NODE: "node-a", HOST_PATH: host });
        let v = Volume::of(&pv(no_base, None), "node-a").unwrap();
        assert_eq!(v.base_path, PathBuf::from("/var/localship"));
        assert_eq!(v.namespace, None);
    }

    #[test]
    fn annotations_that_point_elsewhere_are_refused() {
        let cases = [
            (
                ann("/var/localship/a", "/var/localship"),
                Some("/var/localship/b"),
            ),
            (ann("/var/localship/../../etc", "/var/localship"), None),
            (ann("/etc", "/var/localship"), None),
            (ann("/var/localship", "/var/localship"), None),
            (ann("relative/dir", "relative"), None),
            (json!({ NODE: "node-a" }), None),
            (
                json!({ NODE: "node-b", HOST_PATH: "/var/localship/a" }),
                None,
            ),
        ];
        for (annotations, path) in cases {
            let shown = annotations.to_string();
            let err = Volume::of(&pv(annotations, path), "node-a").unwrap_err();
            assert!(err.starts_with("PV pvc-1"), "{shown}: {err}");
        }
    }
}
