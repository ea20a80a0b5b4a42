//! What every binary of this crate does first: structured logs and an API client.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Logs at `RUST_LOG` (default `info`), as text for people or JSON for collectors.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
}

/// The API client from the pod's ServiceAccount or KUBECONFIG, with an error that says so.
pub async fn client() -> anyhow::Result<kube::Client> {
    localship_api::client().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the Kubernetes API ({e}); run in a pod with a ServiceAccount or set KUBECONFIG")
    })
}
