//! Waiting for a condition, with a clear message when it never comes.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `probe` until it returns `Some`, failing after `timeout` with
/// `what` and the last error or state the probe reported.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last;
    let mut delay = Duration::from_millis(20);
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => last = String::from("condition not met"),
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}
