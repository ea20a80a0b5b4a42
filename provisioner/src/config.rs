//! The node → base-path map, in the format of rancher's local-path-provisioner
//! `config.json`, so an existing ConfigMap works unchanged.
//!
//! ```json
//! { "nodePathMap": [
//!     { "node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["/opt/local-path-provisioner"] },
//!     { "node": "big-node", "paths": ["/data1", "/data2"] },
//!     { "node": "no-disk", "paths": [] } ],
//!   "storageClassConfigs": { "fast": { "nodePathMap": [ ... ] } } }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// The `node` entry that applies to every node not listed by name.
pub const DEFAULT_NODE: &str = "DEFAULT_PATH_FOR_NON_LISTED_NODES";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// rancher's `config.json`. Unknown keys are refused so a typo is an error,
/// not a silently ignored setting.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Base paths per node; see [`DEFAULT_NODE`].
    #[serde(default)]
    pub node_path_map: Vec<NodePaths>,
    /// RWX volumes on a shared filesystem; accepted for compatibility, not served.
    #[serde(default)]
    pub shared_file_system_path: Option<String>,
    /// Per-StorageClass overrides of the two settings above.
    #[serde(default)]
    pub storage_class_configs: BTreeMap<String, ClassConfig>,
    /// rancher's helper-pod scripts. localship makes directories itself, so
    /// these are accepted (an existing ConfigMap keeps working) and ignored.
    #[serde(default)]
    pub setup_command: Option<String>,
    #[serde(default)]
    pub teardown_command: Option<String>,
    #[serde(default)]
    pub cmd_timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClassConfig {
    #[serde(default)]
    pub node_path_map: Vec<NodePaths>,
    #[serde(default)]
    pub shared_file_system_path: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodePaths {
    pub node: String,
    pub paths: Vec<PathBuf>,
}

/// Where a claim of some class may go on this node.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// Candidate base paths; empty means this node serves no volumes.
    Paths(Vec<PathBuf>),
    /// The class asks for a shared filesystem, which localship does not serve.
    SharedFileSystem(String),
}

impl Config {
    /// One base path for every node: the built-in default without a config file.
    pub fn single(base_path: &Path) -> Self {
        Self {
            node_path_map: vec![NodePaths {
                node: DEFAULT_NODE.to_string(),
                paths: vec![base_path.to_path_buf()],
            }],
            ..Self::default()
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate().map_err(|reason| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        validate_map(&self.node_path_map, "nodePathMap")?;
        for (class, c) in &self.storage_class_configs {
            validate_map(
                &c.node_path_map,
                &format!("storageClassConfigs.{class}.nodePathMap"),
            )?;
        }
        Ok(())
    }

    /// Where claims of `class` may go on `node`.
    pub fn placement(&self, node: &str, class: &str) -> Placement {
        let (map, shared) = match self.storage_class_configs.get(class) {
            Some(c) => (&c.node_path_map, &c.shared_file_system_path),
            None => (&self.node_path_map, &self.shared_file_system_path),
        };
        if let Some(shared) = shared {
            return Placement::SharedFileSystem(shared.clone());
        }
        Placement::Paths(paths_for(map, node))
    }

    /// Every base path this node may use, for any class (start-up sweep, metrics).
    pub fn all_paths(&self, node: &str) -> BTreeSet<PathBuf> {
        let mut all: BTreeSet<PathBuf> = paths_for(&self.node_path_map, node).into_iter().collect();
        for c in self.storage_class_configs.values() {
            all.extend(paths_for(&c.node_path_map, node));
        }
        all
    }
}

fn paths_for(map: &[NodePaths], node: &str) -> Vec<PathBuf> {
    map.iter()
        .find(|n| n.node == node)
        .or_else(|| map.iter().find(|n| n.node == DEFAULT_NODE))
        .map(|n| n.paths.clone())
        .unwrap_or_default()
}

fn validate_map(map: &[NodePaths], what: &str) -> Result<(), String> {
    let mut nodes = BTreeSet::new();
    for entry in map {
        if !nodes.insert(entry.node.as_str()) {
            return Err(format!("{what}: node `{}` is listed twice", entry.node));
        }
        let mut seen = BTreeSet::new();
        for p in &entry.paths {
            if !p.is_absolute() {
                return Err(format!(
                    "{what}: `{}` for node `{}` is not absolute",
                    p.display(),
                    entry.node
                ));
            }
            if p == Path::new("/") {
                return Err(format!(
                    "{what}: `/` cannot be a base path (node `{}`)",
                    entry.node
                ));
            }
            if p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(format!("{what}: `{}` contains `..`", p.display()));
            }
            if !seen.insert(p) {
                return Err(format!(
                    "{what}: `{}` is listed twice for node `{}`",
                    p.display(),
                    entry.node
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example shipped with rancher's local-path-provisioner, plus the
    /// helper-pod fields its default ConfigMap carries.
    const RANCHER_CONFIG: &str = r#"{
        "nodePathMap":[
        {
                "node":"DEFAULT_PATH_FOR_NON_LISTED_NODES",
                "paths":["/opt/local-path-provisioner"]
        },
        {
                "node":"yasker-lp-dev1",
                "paths":["/opt/local-path-provisioner", "/data1"]
        },
        {
                "node":"yasker-lp-dev3",
                "paths":[]
        }
        ],
        "storageClassConfigs": {
            "ssd": { "nodePathMap": [ { "node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["/mnt/ssd"] } ] },
            "nfs": { "sharedFileSystemPath": "/mnt/nfs" }
        },
        "setupCommand": "/manager",
        "teardownCommand": "/manager",
        "cmdTimeoutSeconds": 120
    }"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("config.json"), text)
    }

    #[test]
    fn reads_rancher_config() {
        let c = parse(RANCHER_CONFIG).unwrap();
        let paths = |node, class| c.placement(node, class);
        assert_eq!(
            paths("yasker-lp-dev1", "local-path"),
            Placement::Paths(vec!["/opt/local-path-provisioner".into(), "/data1".into()])
        );
        assert_eq!(
            paths("other", "local-path"),
            Placement::Paths(vec!["/opt/local-path-provisioner".into()])
        );
        assert_eq!(
            paths("yasker-lp-dev3", "local-path"),
            Placement::Paths(vec![])
        );
        assert_eq!(
            paths("yasker-lp-dev3", "ssd"),
            Placement::Paths(vec!["/mnt/ssd".into()])
        );
        assert_eq!(
            paths("x", "nfs"),
            Placement::SharedFileSystem("/mnt/nfs".into())
        );
        assert_eq!(c.all_paths("yasker-lp-dev1").len(), 3);
    }

    #[test]
    fn no_default_means_unlisted_nodes_serve_nothing() {
        let c = parse(r#"{"nodePathMap":[{"node":"a","paths":["/d"]}]}"#).unwrap();
        assert_eq!(c.placement("b", "any"), Placement::Paths(vec![]));
    }

    #[test]
    fn refuses_broken_configs() {
        for bad in [
            "{",
            r#"{"nodePathMap": "x"}"#,
            r#"{"nodePathMapp": []}"#,
            r#"{"nodePathMap":[{"node":"a","paths":["relative"]}]}"#,
            r#"{"nodePathMap":[{"node":"a","paths":["/"]}]}"#,
            r#"{"nodePathMap":[{"node":"a","paths":["/x/../etc"]}]}"#,
            r#"{"nodePathMap":[{"node":"a","paths":["/d","/d"]}]}"#,
            r#"{"nodePathMap":[{"node":"a","paths":[]},{"node":"a","paths":[]}]}"#,
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("config.json is not valid"), "{bad}: {err}");
        }
    }
}
