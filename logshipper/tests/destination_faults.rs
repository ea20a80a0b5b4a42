//! Failures a real server does not produce on demand, injected around the `file://`
//! destination, through the real start-up path (`run_with`).

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use localship_logshipper::cli::Args;
use localship_logshipper::destination::file::FileDestination;
use localship_logshipper::destination::{
    Destination, DestinationError, Fetched, LocalContent, ObjectInfo, Precondition,
};
use localship_logshipper::run_with;
use support::{files_under, Tree, MANUAL};
use tokio::sync::watch;

/// Refuses every upload to a key containing `always`, the first two to a key containing
/// `twice`, and is unreachable for its first `down` calls of any kind.
struct Flaky {
    inner: FileDestination,
    /// Uploads refused so far to keys containing `twice`.
    twice: Arc<AtomicU32>,
    /// Unreachable answers still to give.
    down: Arc<AtomicU32>,
}

impl Flaky {
    fn new(tree: &Tree, down: u32) -> Self {
        Self {
            inner: FileDestination::new(&tree.out()).unwrap(),
            twice: Arc::new(AtomicU32::new(0)),
            down: Arc::new(AtomicU32::new(down)),
        }
    }

    fn away(&self) -> Result<(), DestinationError> {
        let left = self.down.load(Ordering::SeqCst);
        if left > 0 {
            self.down.store(left - 1, Ordering::SeqCst);
            return Err(DestinationError::Unreachable {
                endpoint: "http://127.0.0.1:9".into(),
                detail: "connection refused".into(),
            });
        }
        Ok(())
    }
}

fn refused(key: &str) -> DestinationError {
    DestinationError::Refused {
        endpoint: "http://127.0.0.1:9".into(),
        operation: "PutObject",
        key: key.into(),
        code: "InternalError".into(),
        status: 500,
        message: "injected".into(),
    }
}

impl Destination for Flaky {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn prefix(&self) -> &str {
        self.inner.prefix()
    }

    async fn check(&self) -> Result<(), DestinationError> {
        self.away()?;
        self.inner.check().await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, DestinationError> {
        self.away()?;
        self.inner.head(key).await
    }

    async fn sha256_prefix(&self, key: &str, len: u64) -> Result<String, DestinationError> {
        self.away()?;
        self.inner.sha256_prefix(key, len).await
    }

    async fn put(&self, key: &str, content: &LocalContent) -> Result<ObjectInfo, DestinationError> {
        self.away()?;
        if key.contains("always") {
            return Err(refused(key));
        }
        if key.contains("twice") && self.twice.fetch_add(1, Ordering::SeqCst) < 2 {
            return Err(refused(key));
        }
        self.inner.put(key, content).await
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Option<Fetched>, DestinationError> {
        self.away()?;
        self.inner.get(key, limit).await
    }

    async fn put_bytes(
        &self,
        key: &str,
        data: bytes::Bytes,
        when: Precondition,
    ) -> Result<Option<ObjectInfo>, DestinationError> {
        self.away()?;
        self.inner.put_bytes(key, data, when).await
    }

    async fn delete(&self, key: &str) -> Result<(), DestinationError> {
        self.away()?;
        self.inner.delete(key).await
    }
}

fn args(tree: &Tree, extra: &[&str]) -> Args {
    let mut argv = vec![
        "localship-logshipper".to_string(),
        "--source".into(),
        tree.logs().display().to_string(),
        "--ledger".into(),
        tree.ledger().display().to_string(),
        "--settle".into(),
        "0s".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    Args::try_parse_from(argv).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_retries_a_failing_file_then_gives_up_on_it_alone() {
    let tree = Tree::new();
    let good = format!("{MANUAL}/task_id=twice/attempt=1.log");
    let bad = format!("{MANUAL}/task_id=always/attempt=1.log");
    tree.write(&good, b"eventually\n");
    tree.write(&bad, b"never\n");
    let (_stop_tx, stop) = watch::channel(false);

    let flaky = Flaky::new(&tree, 0);
    let refused = flaky.twice.clone();
    let summary = run_with(args(&tree, &["--once"]), flaky, stop)
        .await
        .unwrap();

    assert_eq!((summary.shipped, summary.failed), (1, 1), "{summary}");
    // The faults happened: `twice` was refused twice before it went through.
    assert!(
        refused.load(Ordering::SeqCst) >= 3,
        "the refusals were not injected"
    );
    let shipped: Vec<String> = files_under(&tree.out()).into_keys().collect();
    assert_eq!(shipped, vec![good]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_waits_out_an_unreachable_destination() {
    let tree = Tree::new();
    let log = format!("{MANUAL}/task_id=t/attempt=1.log");
    tree.write(&log, b"kept until it can be shipped\n");
    let (stop_tx, stop) = watch::channel(false);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let daemon = args(&tree, &["--metrics-addr", &port.to_string()]);

    let flaky = Flaky::new(&tree, 3);
    let down = flaky.down.clone();
    let running = tokio::spawn(run_with(daemon, flaky, stop));
    let target = tree.out().join(&log);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !target.exists() {
        assert!(tokio::time::Instant::now() < deadline, "never shipped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(true).unwrap();
    let summary = running.await.unwrap().unwrap();

    assert_eq!((summary.shipped, summary.failed), (1, 0), "{summary}");
    assert_eq!(
        std::fs::read(target).unwrap(),
        b"kept until it can be shipped\n"
    );
    // The outage happened: every unreachable answer was given.
    assert_eq!(
        down.load(Ordering::SeqCst),
        0,
        "the outage was not injected"
    );
}
