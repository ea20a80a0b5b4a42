//! `/metrics`, `/livez`, `/healthz` and `/readyz`. Liveness is only that the process
//! answers: a full disk fails `/healthz`, and a restart would not make room.
//!
//! Healthy means shipped files can be recorded in the ledger: while its commits fail (a full
//! disk) the files still ship, but retention stops and a restart checks them all again, which
//! an operator should hear about.
//!
//! Ready means the first walk of every source is done and the destination answered its
//! check (and, in Kubernetes mode, this node's volumes are known): until then a rollout
//! should not count the pod as shipping.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::ledger::Health;
use crate::metrics::Metrics;
use crate::{Error, Result};

#[derive(Clone)]
struct Served {
    metrics: Arc<Metrics>,
    ready: Vec<watch::Receiver<bool>>,
    ledger: watch::Receiver<Health>,
}

/// Serves readiness as ready once every one of `ready` is true, and health as failing while
/// `ledger` says records cannot be written.
pub fn router(
    metrics: Arc<Metrics>,
    ready: Vec<watch::Receiver<bool>>,
    ledger: watch::Receiver<Health>,
) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/healthz", get(health))
        .route("/readyz", get(readiness))
        .with_state(Served {
            metrics,
            ready,
            ledger,
        })
}

/// Binds now (so a taken port fails start-up) and serves until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    tracing::info!(%addr, "serving /metrics, /livez, /healthz and /readyz");
    Ok(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    })
}

async fn render_metrics(State(s): State<Served>) -> impl IntoResponse {
    // Discovery counts its watches; it knows nothing of the metrics.
    s.metrics
        .watches
        .set(crate::discover::watches_held() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn health(State(s): State<Served>) -> impl IntoResponse {
    match &s.ledger.borrow().unwritable {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ledger: cannot write records: {reason}\n"),
        ),
    }
}

async fn readiness(State(s): State<Served>) -> impl IntoResponse {
    if s.ready.iter().all(|r| *r.borrow()) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let metrics = Arc::new(Metrics::new().unwrap());
        metrics.bytes_shipped.inc_by(42);
        let (ready_tx, ready) = watch::channel(false);
        let (ledger_tx, ledger) = watch::channel(Health::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = serve(addr, router(metrics, vec![ready], ledger), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        let server = tokio::spawn(server);

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready_tx.send(true).unwrap();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        ledger_tx
            .send_modify(|h| h.unwritable = Some("No space left on device (os error 28)".into()));
        let unhealthy = get(addr, "/healthz").await;
        assert!(unhealthy.starts_with("HTTP/1.1 503"), "{unhealthy}");
        assert!(get(addr, "/livez").await.starts_with("HTTP/1.1 200"));
        assert!(
            unhealthy.ends_with(
                "\r\n\r\nledger: cannot write records: No space left on device (os error 28)\n"
            ),
            "{unhealthy}"
        );
        ledger_tx.send_modify(|h| h.unwritable = None);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let body = get(addr, "/metrics").await;
        assert!(
            body.contains("localship_logshipper_bytes_shipped_total 42"),
            "{body}"
        );

        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_taken_port_fails_start_up() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let (_tx, ready) = watch::channel(false);
        let metrics = Arc::new(Metrics::new().unwrap());
        let (_ledger_tx, ledger) = watch::channel(Health::default());
        let err = serve(addr, router(metrics, vec![ready], ledger), async {})
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("--metrics-addr"), "{err}");
    }
}
