//! Applying YAML manifests the way `kubectl apply --server-side` does.

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{pinned_kind, Scope};
use kube::Client;
use serde::Deserialize;

/// Server-side applies every document of `yaml`. Namespaced objects without a
/// namespace go to `namespace`. With `dry_run`, the apiserver validates and
/// admits each object but stores nothing.
pub async fn apply_yaml(
    client: &Client,
    namespace: Option<&str>,
    yaml: &str,
    dry_run: bool,
) -> Result<Vec<DynamicObject>> {
    let mut applied = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_value(value).context("parse manifest")?;
        let types = obj
            .types
            .clone()
            .context("manifest without apiVersion/kind")?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let name = obj
            .metadata
            .name
            .clone()
            .context("manifest without metadata.name")?;
        let (resource, caps) = pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("discover {}/{}", types.api_version, types.kind))?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => {
                let ns = obj
                    .metadata
                    .namespace
                    .as_deref()
                    .or(namespace)
                    .unwrap_or("default");
                Api::namespaced_with(client.clone(), ns, &resource)
            }
        };
        let mut params = PatchParams::apply("localship-tests").force();
        params.dry_run = dry_run;
        let result = api
            .patch(&name, &params, &Patch::Apply(&obj))
            .await
            .with_context(|| format!("apply {} {name}", types.kind))?;
        applied.push(result);
    }
    Ok(applied)
}
