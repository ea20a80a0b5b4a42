//! What both controllers share: the client, this node's identity, the live
//! config, the StorageClass cache, Events and metrics.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::reflector::Store;
use kube::Client;
use localship_api::{EventType, Events};

use crate::cli::Args;
use crate::config::Config;
use crate::metrics::Metrics;

pub struct Context {
    pub client: Client,
    pub node: String,
    pub names: Vec<String>,
    pub config: SharedConfig,
    pub classes: Store<StorageClass>,
    pub events: Events,
    pub metrics: Metrics,
    pub dir_mode: u32,
    pub reserve: u64,
    pub opt_in_annotation: String,
}

impl Context {
    pub fn new(
        client: Client,
        args: &Args,
        config: SharedConfig,
        classes: Store<StorageClass>,
        metrics: Metrics,
    ) -> Self {
        let events = Events::new(
            client.clone(),
            "localship-provisioner",
            Some(args.node_name.clone()),
        );
        Self {
            client,
            node: args.node_name.clone(),
            names: args.names(),
            config,
            classes,
            events,
            metrics,
            dir_mode: args.dir_mode,
            reserve: args.reserve,
            opt_in_annotation: args.opt_in_annotation.clone(),
        }
    }

    /// Publishes an Event; failing to is logged, never fatal.
    pub async fn event(
        &self,
        on: &ObjectReference,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.events.publish(on, type_, reason, action, note).await;
    }
}

/// The config in force, swapped whole on reload.
#[derive(Clone)]
pub struct SharedConfig(Arc<RwLock<Arc<Config>>>);

impl SharedConfig {
    pub fn new(config: Config) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(config))))
    }

    pub fn get(&self) -> Arc<Config> {
        self.0.read().expect("config lock").clone()
    }

    fn set(&self, config: Config) {
        *self.0.write().expect("config lock") = Arc::new(config);
    }
}

/// Re-reads `path` every `poll` and swaps the config in when its text
/// changes. A broken file is reported and the previous config kept, so a bad
/// ConfigMap edit never stops an agent. Polling, rather than inotify, because
/// kubelet updates ConfigMap volumes by swapping a symlinked directory.
pub async fn watch_config(path: PathBuf, poll: Duration, shared: SharedConfig, metrics: Metrics) {
    let mut last = std::fs::read_to_string(&path).ok();
    loop {
        tokio::time::sleep(poll).await;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read config; keeping the previous one");
                continue;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            continue;
        }
        last = Some(text.clone());
        match Config::parse(&path, &text) {
            Ok(config) => {
                tracing::info!(path = %path.display(), "config reloaded");
                shared.set(config);
                metrics.config_reloads.with_label_values(&["success"]).inc();
            }
            Err(e) => {
                tracing::error!(error = %e, "config change rejected; keeping the previous config");
                metrics.config_reloads.with_label_values(&["error"]).inc();
            }
        }
    }
}
