//! The ledger: what was shipped, where, as which bytes, in an embedded store on local disk.
//!
//! A file whose size and mtime match its record was shipped and needs no call to the
//! destination, which is what lets a restart over many thousands of shipped logs stay quiet.
//! A record is written only after the object was verified. Records are committed in groups
//! a few milliseconds apart, so thousands of small logs do not cost thousands of fsyncs; a
//! crash before a commit costs one look at the destination per file after the restart, never
//! a lost or doubled object. Retention reads committed records only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::local_file::FileStat;

/// (source id, path relative to the source root) → JSON [`Record`].
const SHIPPED: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("shipped");

/// Records committed together at most, when uploads finish faster than commits.
const MAX_BATCH: usize = 512;

/// How long the writer gathers records before a commit: at hundreds of small logs a second
/// this turns one fsync per log into one per dozens.
const LINGER: std::time::Duration = std::time::Duration::from_millis(25);

/// Memory for cached ledger pages. redb's default (1 GiB) would let the cache grow with the
/// ledger, to over 100 MiB at 100k records; lookups are by key and the kernel's page cache
/// is there anyway.
const CACHE_BYTES: usize = 8 << 20;

/// One shipped file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub stat: FileStat,
    /// SHA-256 of the shipped bytes, lowercase hex.
    pub sha256: String,
    /// The destination it went to, e.g. `s3://airflow/logs`; another destination ships anew.
    pub destination: String,
    /// The object key that holds the bytes.
    pub key: String,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub shipped_at_ms: u64,
    /// Under a side key (see `alongside`): SHA-256 of what the side key holds, the part of
    /// the file Airflow's object lacked, so an unchanged part is not written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_sha256: Option<String>,
}

impl Record {
    /// Whether a file that looks like `stat` needs nothing more for `destination`.
    pub fn covers(&self, stat: FileStat, destination: &str) -> bool {
        self.stat == stat && self.destination == destination
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger `{0}` is in use by another localship-logshipper; give each its own --ledger")]
    InUse(PathBuf),
    #[error("cannot create the ledger's directory `{path}`: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger `{path}`: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("ledger `{path}` holds an unreadable record for `{relative}`: {source}")]
    Corrupt {
        path: PathBuf,
        relative: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Commit(String),
    #[error("the ledger's writer has stopped")]
    Stopped,
}

/// The ledger store. Reads run anywhere; writes go through [`Ledger::recorder`] or the
/// blocking methods.
#[derive(Clone)]
pub struct Ledger {
    db: Arc<Database>,
    path: PathBuf,
}

impl Ledger {
    /// Opens the ledger at `path`, creating it and its directory if need be.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LedgerError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let db = match redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(LedgerError::InUse(path.to_owned()))
            }
            Err(e) => return Err(store_error(path, e)),
        };
        let ledger = Self {
            db: Arc::new(db),
            path: path.to_owned(),
        };
        let txn = ledger.db.begin_write().map_err(|e| ledger.error(e))?;
        txn.open_table(SHIPPED).map_err(|e| ledger.error(e))?;
        txn.commit().map_err(|e| ledger.error(e))?;
        Ok(ledger)
    }

    pub fn get(&self, source: &str, relative: &str) -> Result<Option<Record>, LedgerError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(SHIPPED).map_err(|e| self.error(e))?;
        let Some(value) = table.get((source, relative)).map_err(|e| self.error(e))? else {
            return Ok(None);
        };
        self.decode(relative, value.value()).map(Some)
    }

    /// Every record of one source, in path order.
    pub fn records(&self, source: &str) -> Result<Vec<(String, Record)>, LedgerError> {
        let mut out = Vec::new();
        self.each(source, |relative, record| {
            out.push((relative.to_owned(), record))
        })?;
        Ok(out)
    }

    /// Hands every record of one source to `f`, in path order: one sequential read of the
    /// ledger, where a lookup per file reads pages in no order.
    pub fn each(&self, source: &str, mut f: impl FnMut(&str, Record)) -> Result<(), LedgerError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(SHIPPED).map_err(|e| self.error(e))?;
        for item in table
            .range::<(&str, &str)>((source, "")..)
            .map_err(|e| self.error(e))?
        {
            let (key, value) = item.map_err(|e| self.error(e))?;
            let (key_source, relative) = key.value();
            if key_source != source {
                break;
            }
            f(relative, self.decode(relative, value.value())?);
        }
        Ok(())
    }

    /// Removes every record of one source (a volume that is gone); how many there were.
    pub fn remove_source(&self, source: &str) -> Result<usize, LedgerError> {
        // Exactly this source's keys: `source` + NUL is the least string sorting after it.
        let after = format!("{source}\0");
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        let removed = {
            let mut table = txn.open_table(SHIPPED).map_err(|e| self.error(e))?;
            let drained = table
                .extract_from_if::<(&str, &str), _>((source, "")..(after.as_str(), ""), |_, _| true)
                .map_err(|e| self.error(e))?;
            let mut removed = 0;
            for item in drained {
                item.map_err(|e| self.error(e))?;
                removed += 1;
            }
            removed
        };
        txn.commit().map_err(|e| self.error(e))?;
        Ok(removed)
    }

    /// Writes records in one durable commit.
    pub fn put_all(&self, records: &[(&str, &str, &Record)]) -> Result<(), LedgerError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = txn.open_table(SHIPPED).map_err(|e| self.error(e))?;
            for (source, relative, record) in records {
                let value = serde_json::to_vec(record).expect("a record always serialises");
                table
                    .insert((*source, *relative), value.as_slice())
                    .map_err(|e| self.error(e))?;
            }
        }
        txn.commit().map_err(|e| self.error(e))
    }

    pub fn remove(&self, source: &str, relative: &str) -> Result<(), LedgerError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = txn.open_table(SHIPPED).map_err(|e| self.error(e))?;
            table
                .remove((source, relative))
                .map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))
    }

    /// Starts the writer that commits records in batches: whatever arrived while the last
    /// commit was being synced, or within [`LINGER`] of the first, goes into the next one.
    pub fn recorder(&self) -> Recorder {
        let (tx, rx) = mpsc::channel(MAX_BATCH);
        let ledger = self.clone();
        std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || ledger.write_batches(rx))
            .expect("spawning the ledger writer");
        Recorder { tx }
    }

    fn write_batches(&self, mut rx: mpsc::Receiver<Pending>) {
        while let Some(first) = rx.blocking_recv() {
            // A flush commits what is queued now; records wait a little for company.
            if matches!(first, Pending::Record { .. }) {
                std::thread::sleep(LINGER);
            }
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let rows: Vec<_> = batch
                .iter()
                .filter_map(|p| match p {
                    Pending::Record {
                        source,
                        relative,
                        record,
                    } => Some((source.as_str(), relative.as_str(), record)),
                    Pending::Flush(_) => None,
                })
                .collect();
            let result = if rows.is_empty() {
                Ok(())
            } else {
                self.put_all(&rows)
            };
            if let Err(e) = &result {
                tracing::error!(error = %e, files = rows.len(), "cannot record shipped files in the ledger; they are checked against the destination again after a restart");
            }
            for pending in batch {
                if let Pending::Flush(done) = pending {
                    let _ = done.send(
                        result
                            .as_ref()
                            .map_err(|e| LedgerError::Commit(e.to_string()))
                            .copied(),
                    );
                }
            }
        }
    }

    fn decode(&self, relative: &str, bytes: &[u8]) -> Result<Record, LedgerError> {
        serde_json::from_slice(bytes).map_err(|source| LedgerError::Corrupt {
            path: self.path.clone(),
            relative: relative.to_owned(),
            source,
        })
    }

    fn error(&self, e: impl Into<redb::Error>) -> LedgerError {
        store_error(&self.path, e)
    }
}

fn store_error(path: &Path, e: impl Into<redb::Error>) -> LedgerError {
    LedgerError::Store {
        path: path.to_owned(),
        source: Box::new(e.into()),
    }
}

// Nearly every message is a record; boxing it would only add an allocation to each.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Record {
        source: String,
        relative: String,
        record: Record,
    },
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<Result<(), LedgerError>>),
}

/// Hands records to the ledger's writer; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Pending>,
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

    /// Returns once every record queued so far is durably committed.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        let (done, committed) = oneshot::channel();
        self.tx
            .send(Pending::Flush(done))
            .await
            .map_err(|_| LedgerError::Stopped)?;
        committed.await.map_err(|_| LedgerError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(size: u64, key: &str) -> Record {
        Record {
            stat: FileStat {
                size,
                mtime_ns: 1_700_000_000_123_456_789,
            },
            sha256: "ab".repeat(32),
            destination: "s3://airflow/logs".into(),
            key: key.into(),
            etag: Some("\"etag\"".into()),
            version_id: None,
            shipped_at_ms: 1,
            part_sha256: None,
        }
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/ledger.redb");
        let rel = "dag_id=a/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";
        {
            let ledger = Ledger::open(&path).unwrap();
            assert_eq!(ledger.get("/logs", rel).unwrap(), None);
            ledger.put_all(&[("/logs", rel, &record(10, "k"))]).unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.get("/logs", rel).unwrap(), Some(record(10, "k")));
        assert_eq!(ledger.get("/other", rel).unwrap(), None);
    }

    #[test]
    fn a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let _first = Ledger::open(&path).unwrap();
        let err = Ledger::open(&path).err().expect("second open must fail");
        assert!(matches!(err, LedgerError::InUse(_)), "{err}");
        assert!(err.to_string().contains("--ledger"));
    }

    #[test]
    fn covers_needs_same_stat_and_destination() {
        let r = record(10, "k");
        assert!(r.covers(r.stat, "s3://airflow/logs"));
        let grown = FileStat { size: 11, ..r.stat };
        assert!(!r.covers(grown, "s3://airflow/logs"));
        let touched = FileStat {
            mtime_ns: r.stat.mtime_ns + 1,
            ..r.stat
        };
        assert!(!r.covers(touched, "s3://airflow/logs"));
        assert!(!r.covers(r.stat, "file:///archive"));
    }

    #[test]
    fn records_are_listed_per_source_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.redb")).unwrap();
        let (a, b, c) = (record(1, "a"), record(2, "b"), record(3, "c"));
        ledger
            .put_all(&[
                ("/v1", "x/b", &b),
                ("/v1", "x/a", &a),
                ("/v10", "x/c", &c),
                ("/v0", "z", &c),
            ])
            .unwrap();
        let listed = ledger.records("/v1").unwrap();
        assert_eq!(
            listed,
            vec![("x/a".to_string(), a.clone()), ("x/b".to_string(), b)]
        );
        ledger.remove("/v1", "x/b").unwrap();
        assert_eq!(ledger.records("/v1").unwrap(), vec![("x/a".to_string(), a)]);
        assert_eq!(ledger.records("/v10").unwrap().len(), 1);
        // A whole source goes, and only it.
        assert_eq!(ledger.remove_source("/v1").unwrap(), 1);
        assert!(ledger.records("/v1").unwrap().is_empty());
        assert_eq!(ledger.records("/v10").unwrap().len(), 1);
        assert_eq!(ledger.records("/v0").unwrap().len(), 1);
    }

    #[tokio::test]
    async fn recorder_commits_everything_queued_before_a_flush_answers() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.redb")).unwrap();
        let recorder = ledger.recorder();
        let mut tasks = Vec::new();
        for i in 0..50u64 {
            let recorder = recorder.clone();
            tasks.push(tokio::spawn(async move {
                recorder
                    .record("/v", &format!("f{i}"), record(i, "k"))
                    .await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        recorder.flush().await.unwrap();
        assert_eq!(ledger.records("/v").unwrap().len(), 50);
        assert_eq!(ledger.get("/v", "f7").unwrap().unwrap().stat.size, 7);
    }
}
