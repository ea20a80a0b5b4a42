//! Whether the destination is usable: checked at start and again whenever a shipment could
//! not reach it, retried with backoff rather than exiting, so a daemon outlives a MinIO
//! restart or a bucket created late. And the ledger's health, mirrored into the metrics.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::destination::Destination;
use crate::ledger::Health;
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// Destination checks, retried with backoff until one passes.
const CHECK_BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(60),
};

/// Keeps `ok` true while the destination answers its check: checks at start and whenever
/// `recheck` is notified. A new error is logged once; repeats are warnings.
pub async fn watch_destination<D: Destination>(
    destination: Arc<D>,
    ok: watch::Sender<bool>,
    recheck: Arc<Notify>,
    metrics: Arc<Metrics>,
) {
    let id = destination.id().to_owned();
    let mut first = true;
    loop {
        let mut attempt = 0;
        let mut reported = None;
        loop {
            match destination.check().await {
                Ok(()) => {
                    if first || reported.is_some() {
                        tracing::info!(destination = %id, "destination is usable");
                    }
                    first = false;
                    break;
                }
                Err(e) => {
                    ok.send_replace(false);
                    metrics.destination_up.set(0);
                    attempt += 1;
                    let delay = CHECK_BACKOFF.next(attempt);
                    let message = e.to_string();
                    if reported.as_ref() != Some(&message) {
                        tracing::error!(destination = %id, error = %message, "destination not usable; shipping waits and the check is retried");
                        reported = Some(message);
                    } else {
                        tracing::warn!(destination = %id, error = %message, retry_in = ?delay, "destination still not usable");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
        ok.send_replace(true);
        metrics.destination_up.set(1);
        recheck.notified().await;
        ok.send_replace(false);
    }
}

/// Keeps `ledger_writable` and `ledger_commit_failures_total` as the ledger reports them.
pub async fn mirror_ledger(mut ledger: watch::Receiver<Health>, metrics: Arc<Metrics>) {
    let mut counted = 0;
    loop {
        let health = ledger.borrow_and_update().clone();
        metrics
            .ledger_writable
            .set(i64::from(health.unwritable.is_none()));
        metrics
            .ledger_commit_failures
            .inc_by(health.failed_commits.saturating_sub(counted));
        counted = health.failed_commits;
        if ledger.changed().await.is_err() {
            return;
        }
    }
}
