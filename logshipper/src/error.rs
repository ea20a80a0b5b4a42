//! Everything that can go wrong, as data: what to fix is in each message, and each kind has
//! a label for `failures_total`.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{destination, filter, ledger};

/// Everything that can go wrong, as data: what to fix is in the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("source `{}`: {source} — create it or fix --source", path.display())]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Glob(#[from] filter::GlobError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Destination(#[from] destination::DestinationError),
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove `{}`: {source}", path.display())]
    Delete {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source} — pick another --metrics-addr")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Config(String),
    #[error(
        "no Kubernetes API client: {0} — set KUBECONFIG, or run in a pod with a service account"
    )]
    KubeClient(#[source] kube::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Volume(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Names the failure in the `failures_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Source { .. } => "source",
            Error::Glob(_) => "glob",
            Error::Ledger(_) => "ledger",
            Error::Destination(e) => e.metric_label(),
            Error::Read { .. } => "read",
            Error::Delete { .. } => "delete",
            Error::Listen { .. } => "listen",
            Error::Metrics(_) => "metrics",
            Error::Config(_) => "config",
            Error::KubeClient(_) => "kube_client",
            Error::Kube(_) => "kube",
            Error::Volume(_) => "volume",
        }
    }

    /// The destination refused this file's object for good; retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::Destination(e) if e.is_permanent())
    }

    /// The destination could not be asked; the file is not at fault.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Destination(e) if e.is_unreachable())
    }
}
