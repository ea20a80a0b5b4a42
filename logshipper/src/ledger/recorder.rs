//! The writer that commits records in groups, and keeps them while commits fail.
//!
//! A commit that fails (a full disk) keeps its records, up to [`MAX_HELD`], and is tried
//! again with backoff; records that arrive meanwhile join them, and all are committed once a
//! commit works. A flush is answered after the first attempt that covers it: `Ok` once
//! committed, an error with the cause if that attempt failed. So a caller neither waits on a
//! disk that stays full nor hears that a record is durable when it is not; a flush that
//! arrives while commits fail brings the next attempt forward. Beyond [`MAX_HELD`] records are
//! let go: each costs one look at the destination after a restart, and retention keeps its
//! file until it is recorded.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::{Ledger, LedgerError, Record};
use crate::retry::Backoff;

/// Records committed together at most, when uploads finish faster than commits.
const MAX_BATCH: usize = 512;

/// How long the writer gathers records before a commit: at hundreds of small logs a second
/// this turns one fsync per log into one per dozens.
const LINGER: Duration = Duration::from_millis(25);

/// Records kept while commits fail: about 6 MiB at the few hundred bytes a record takes.
pub const MAX_HELD: usize = 10_000;

/// Commits tried again while they fail.
const RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(30),
};

/// While commits fail, how often the writer takes in what arrived.
const TICK: Duration = Duration::from_millis(100);

/// Whether shipped files can be recorded, for `/healthz` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Why the last commit failed, while records wait to be written.
    pub unwritable: Option<String>,
    /// Commits that failed since start.
    pub failed_commits: u64,
}

// Nearly every message is a record; boxing it would only add an allocation to each.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Record {
        source: String,
        relative: String,
        record: Record,
    },
    /// Answered once everything queued before it is committed, or failed to be.
    Flush(oneshot::Sender<Result<(), LedgerError>>),
}

/// Hands records to the ledger's writer; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
}

impl Ledger {
    /// Starts the writer that commits records in batches: whatever arrived while the last
    /// commit was being synced, or within [`LINGER`] of the first, goes into the next one.
    pub fn recorder(&self) -> Recorder {
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let writer = Writer {
            ledger: self.clone(),
            held: BTreeMap::new(),
            flushes: Vec::new(),
            failing: None,
            let_go: 0,
        };
        std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || writer.run(rx))
            .expect("spawning the ledger writer");
        Recorder { tx }
    }
}

impl Recorder {
    /// Queues the record for the next commit (see [`Recorder::flush`]).
    pub async fn record(
        &self,
        source: &str,
        relative: &str,
        record: Record,
    ) -> Result<(), LedgerError> {
        let pending = Pending::Record {
            source: source.to_owned(),
            relative: relative.to_owned(),
            record,
        };
        self.tx
            .send(pending)
            .await
            .map_err(|_| LedgerError::Stopped)
    }

    /// Returns once every record queued so far is durably committed, or with the cause
    /// when the attempt to commit them failed (they are kept and tried again).
    pub async fn flush(&self) -> Result<(), LedgerError> {
        let (done, committed) = oneshot::channel();
        self.tx
            .send(Pending::Flush(done))
            .await
            .map_err(|_| LedgerError::Stopped)?;
        committed.await.map_err(|_| LedgerError::Stopped)?
    }
}

struct Writer {
    ledger: Ledger,
    /// Records not committed yet, the latest per file.
    held: BTreeMap<(String, String), Record>,
    flushes: Vec<oneshot::Sender<Result<(), LedgerError>>>,
    failing: Option<Failing>,
    /// Records let go beyond [`MAX_HELD`] while commits failed.
    let_go: u64,
}

struct Failing {
    since: Instant,
    attempts: u32,
    retry_at: Instant,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        loop {
            let open = match &self.failing {
                None => self.gather(&mut rx),
                Some(failing) => self.wait(&mut rx, failing.retry_at),
            };
            if self.held.is_empty() && self.flushes.is_empty() && !open {
                return;
            }
            self.commit();
            if !open && self.failing.is_none() {
                return;
            }
            if !open {
                // Nobody records any more (the shipper is stopping): what is held is checked
                // against the destination after the restart.
                tracing::warn!(
                    files = self.held.len(),
                    "stopping with shipped files not recorded in the ledger"
                );
                return;
            }
        }
    }

    /// Waits for the first message, lets records gather company, then takes what else is
    /// queued. False once every [`Recorder`] is gone.
    fn gather(&mut self, rx: &mut mpsc::Receiver<Pending>) -> bool {
        let Some(first) = rx.blocking_recv() else {
            return false;
        };
        // A flush commits what is queued now; records wait a little for company.
        if matches!(first, Pending::Record { .. }) {
            std::thread::sleep(LINGER);
        }
        self.take(first);
        for _ in 1..MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => self.take(next),
                Err(_) => break,
            }
        }
        true
    }

    /// While commits fail: takes in what arrives until `retry_at`, or until a flush asks
    /// for an attempt now. False once every [`Recorder`] is gone.
    fn wait(&mut self, rx: &mut mpsc::Receiver<Pending>, retry_at: Instant) -> bool {
        loop {
            match rx.try_recv() {
                Ok(next) => {
                    let flush = matches!(next, Pending::Flush(_));
                    self.take(next);
                    if flush {
                        return true;
                    }
                }
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= retry_at {
                        return true;
                    }
                    std::thread::sleep(TICK.min(retry_at - now));
                }
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn take(&mut self, pending: Pending) {
        match pending {
            Pending::Flush(done) => self.flushes.push(done),
            Pending::Record {
                source,
                relative,
                record,
            } => {
                let file = (source, relative);
                if self.held.len() >= MAX_HELD && !self.held.contains_key(&file) {
                    if self.let_go == 0 {
                        tracing::warn!(
                            held = MAX_HELD,
                            "more shipped files wait to be recorded than are kept; the rest are compared with the destination again after a restart"
                        );
                    }
                    self.let_go += 1;
                    return;
                }
                self.held.insert(file, record);
            }
        }
    }

    /// Commits what is held and answers the flushes waiting for it, after the health says
    /// how it went, so whoever is told of a flush sees the same state on `/healthz`.
    fn commit(&mut self) {
        let result = if self.held.is_empty() {
            Ok(())
        } else {
            let rows: Vec<_> = self
                .held
                .iter()
                .map(|((source, relative), record)| (source.as_str(), relative.as_str(), record))
                .collect();
            self.ledger.put_all(&rows)
        };
        match result {
            Ok(()) => {
                let files = self.held.len();
                self.held.clear();
                if let Some(failing) = self.failing.take() {
                    tracing::info!(
                        files,
                        let_go = self.let_go,
                        unwritable_for = ?failing.since.elapsed(),
                        "the ledger is writable again; the shipped files held meanwhile are recorded"
                    );
                    self.let_go = 0;
                    self.ledger
                        .store
                        .health
                        .send_modify(|health| health.unwritable = None);
                }
                self.answer(|| Ok(()));
            }
            Err(e) => {
                let reason = e.cause();
                let path = self.ledger.store.path.clone();
                self.ledger.store.health.send_modify(|health| {
                    health.failed_commits += 1;
                    health.unwritable = Some(reason.clone());
                });
                self.answer(|| {
                    Err(LedgerError::Unwritable {
                        path: path.clone(),
                        reason: reason.clone(),
                    })
                });
                let now = Instant::now();
                let (since, attempts) = match &self.failing {
                    Some(failing) => (failing.since, failing.attempts + 1),
                    None => {
                        tracing::error!(
                            error = %e, files = self.held.len(), kept_up_to = MAX_HELD,
                            "cannot record shipped files in the ledger; shipping goes on, and they are kept and recorded once the ledger can be written (tried again with backoff)"
                        );
                        (now, 1)
                    }
                };
                let delay = RETRY.next(attempts);
                tracing::debug!(error = %e, retry_in = ?delay, "ledger commit failed again");
                self.failing = Some(Failing {
                    since,
                    attempts,
                    retry_at: now + delay,
                });
            }
        }
    }

    fn answer(&mut self, result: impl Fn() -> Result<(), LedgerError>) {
        for done in self.flushes.drain(..) {
            let _ = done.send(result());
        }
    }
}
