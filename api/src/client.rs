//! An API client and watches that give up on a dead connection.
//!
//! A connection to the apiserver can go silent without closing: a load balancer or VIP fails
//! over, a node's network is cut and comes back. kube's client waits on such a connection for
//! ever (it sets no read timeout, so as not to break exec sessions, which we never open), and
//! a watcher on it waits 295 s. Meanwhile an agent sees no claim and finishes no reconcile.
//! Here a watch asks the apiserver to end it every [`WATCH_TIMEOUT`] and is resumed from its
//! resource version (no new list), so a healthy connection never idles as long as
//! [`READ_TIMEOUT`], and one that does is dropped.

use std::time::Duration;

use kube::runtime::watcher;
use kube::{Client, Config};

/// How long the apiserver keeps one watch request open; resumed at once after.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(45);
/// No byte for this long on a connection: it is dead, and its request fails and is retried.
/// Longer than a watch (plus kube's 5 s margin) and than any list page takes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The client from the pod's ServiceAccount, or KUBECONFIG, with [`READ_TIMEOUT`].
pub async fn client() -> Result<Client, kube::Error> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    client_with(config)
}

/// A client from `config`, with [`READ_TIMEOUT`].
pub fn client_with(mut config: Config) -> Result<Client, kube::Error> {
    config.read_timeout = Some(READ_TIMEOUT);
    Client::try_from(config)
}

/// Watch settings every watch of ours starts from.
pub fn watcher_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT.as_secs() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_watch_ends_before_its_connection_would_be_taken_for_dead() {
        // kube's watcher waits its timeout plus 5 s for the next event.
        let idle = WATCH_TIMEOUT + Duration::from_secs(5);
        assert!(idle < READ_TIMEOUT, "{idle:?} against {READ_TIMEOUT:?}");
        assert_eq!(watcher_config().timeout, Some(45));
    }
}
