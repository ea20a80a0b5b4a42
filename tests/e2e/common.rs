//! Shared steps of the end-to-end tests: the claim helpers of the harness,
//! and what only tests sharing one control plane need.

pub use localship_tests::claims::*;

use anyhow::{bail, Result};
use kube::Client;
use localship_tests::{apply_yaml, wait_for};

/// Held by tests that make a default StorageClass: with two defaults the
/// apiserver picks the newest, so they take turns.
pub static DEFAULT_CLASS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Documents of a multi-document YAML stream, parsed.
pub fn yaml_documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The one object of `kind` (and `name`, if given) among `objects`.
pub fn object<'a>(
    objects: &'a [serde_json::Value],
    kind: &str,
    name: Option<&str>,
) -> Result<&'a serde_json::Value> {
    let found: Vec<_> = objects
        .iter()
        .filter(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!("{} {kind} objects named {name:?}", found.len()),
    }
}

/// A ClusterRole's rules in a canonical order, to compare two of them.
pub fn canonical_rules(role: &serde_json::Value) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let sorted = |v: &serde_json::Value| {
        let mut items: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        items.sort();
        items
    };
    let mut rules: Vec<_> = role["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    (
                        sorted(&r["apiGroups"]),
                        sorted(&r["resources"]),
                        sorted(&r["verbs"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    rules.sort();
    rules
}

/// The ServiceMonitor CRD stand-in, established, so ServiceMonitors can be
/// dry-run.
pub async fn servicemonitor_crd(client: &Client) -> Result<()> {
    let yaml = include_str!("fixtures/servicemonitor-crd.yaml");
    apply_yaml(client, None, yaml, false).await?;
    let gvk = kube::core::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor");
    wait_for(
        "the ServiceMonitor CRD to be served",
        BIND_TIMEOUT,
        || async {
            Ok(kube::discovery::pinned_kind(client, &gvk)
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await
}
