//! localship's node-local provisioner. Read top-down: [`claim`] decides
//! whether a claim is this node's, [`paths`] and [`volume`] plan the
//! directory and the PV (pure), [`disk`] makes and removes directories,
//! [`owner`] says which PV a directory belongs to,
//! [`provision`] and [`reclaim`] are the two controllers, [`run`] wires them.
//! [`node_cleanup`] (its own binary and identity) lets go of volumes of nodes that left.

pub mod annotations;
pub mod claim;
pub mod cli;
pub mod config;
pub mod context;
pub mod disk;
pub mod http;
pub mod metrics;
pub mod node_cleanup;
pub mod owner;
pub mod paths;
pub mod provision;
pub mod quantity;
pub mod reclaim;
pub mod run;
pub mod startup;
pub mod sweep;
pub mod volume;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("StorageClass `{0}` not found")]
    MissingClass(String),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Label for the operations metric: failures counted by kind.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "api_error",
            Error::Disk(_) => "disk_error",
            Error::Config(_) => "config_error",
            Error::MissingClass(_) => "missing_class",
            Error::Invalid(_) => "invalid",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
