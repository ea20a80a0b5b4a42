//! The ledger: what was shipped, where, as which bytes, in an embedded store on local disk.
//!
//! A file whose size and mtime match its record was shipped and needs no call to the
//! destination, which is what lets a restart over many thousands of shipped logs stay quiet.
//! A record is written only after the object was verified. Records are committed in groups
//! a few milliseconds apart, so thousands of small logs do not cost thousands of fsyncs; a
//! crash before a commit costs one look at the destination per file after the restart, never
//! a lost or doubled object. Retention reads committed records only.
//!
//! After one failed write (a full disk) redb refuses every later one until the database is
//! closed and opened again: the store does that itself, and the `recorder` keeps the records
//! it could not write and tries again. A ledger that cannot be read at start is set aside and a
//! new one begun, for the same reason a lost record is safe: each file is compared with the
//! destination once more, and nothing already there is uploaded again.

mod recorder;

#[cfg(test)]
mod full_disk;

pub use recorder::{Health, Recorder};

use std::fs::TryLockError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadTransaction, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::local_file::FileStat;

/// (source id, path relative to the source root) → JSON [`Record`].
const SHIPPED: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("shipped");

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
    #[error("ledger `{path}` cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("cannot set the unreadable ledger `{path}` aside: {source} — move or remove it")]
    SetAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger `{path}` holds an unreadable record for `{relative}`: {source}")]
    Corrupt {
        path: PathBuf,
        relative: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write to the ledger `{path}`: {reason}; the records are kept and written once it works again")]
    Unwritable { path: PathBuf, reason: String },
    #[error("the ledger's writer has stopped")]
    Stopped,
}

impl LedgerError {
    /// The cause in a few words, e.g. `No space left on device (os error 28)`.
    fn cause(&self) -> String {
        match self {
            LedgerError::Store { source, .. } => match &**source {
                redb::Error::Io(e) => e.to_string(),
                other => other.to_string(),
            },
            LedgerError::Unwritable { reason, .. } | LedgerError::Unreadable { reason, .. } => {
                reason.clone()
            }
            other => other.to_string(),
        }
    }
}

/// How a ledger file becomes a database: redb's own file, or in tests a disk that fills up.
type Opener = dyn Fn(&Path) -> Result<Database, redb::DatabaseError> + Send + Sync;

/// The ledger store. Reads run anywhere; writes go through [`Ledger::recorder`] or the
/// blocking methods.
#[derive(Clone)]
pub struct Ledger {
    store: Arc<Store>,
}

struct Store {
    path: PathBuf,
    open: Box<Opener>,
    /// The database, `None` while it could not be opened again; with the number of reopens,
    /// so threads that saw the same failure reopen it once. Transactions hold the lock for
    /// reading, so a reopen never closes the file under one that is being written.
    db: RwLock<(u64, Option<Database>)>,
    health: watch::Sender<Health>,
}

impl Ledger {
    /// Opens the ledger at `path`, creating it and its directory if need be. An unreadable
    /// ledger is set aside as `<path>.corrupt-<unix seconds>` and a new one created.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        Self::open_with(
            path,
            Box::new(|path| {
                redb::Builder::new()
                    .set_cache_size(CACHE_BYTES)
                    .create(path)
            }),
        )
    }

    fn open_with(path: &Path, open: Box<Opener>) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LedgerError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let db = match open_db(path, &*open) {
            Err(LedgerError::Unreadable { reason, .. }) => {
                let aside = set_aside(path)?;
                tracing::error!(
                    ledger = %path.display(), set_aside = %aside.display(), error = %reason,
                    "the ledger cannot be read; it is kept aside and a new one started. Every log is compared with the destination once more: nothing already there is uploaded again, and --delete-after removes a log only once it is recorded anew"
                );
                open_db(path, &*open)?
            }
            opened => opened?,
        };
        let ledger = Self {
            store: Arc::new(Store {
                path: path.to_owned(),
                open,
                db: RwLock::new((0, Some(db))),
                health: watch::channel(Health::default()).0,
            }),
        };
        ledger.with_db(|db| {
            let txn = db.begin_write()?;
            txn.open_table(SHIPPED)?;
            Ok(txn.commit()?)
        })?;
        Ok(ledger)
    }

    /// Whether records can be written, as the recorder last found.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.store.health.subscribe()
    }

    pub fn get(&self, source: &str, relative: &str) -> Result<Option<Record>, LedgerError> {
        let txn = self.begin_read()?;
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
        let txn = self.begin_read()?;
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
        self.with_db(|db| {
            let txn = db.begin_write()?;
            let removed = {
                let mut table = txn.open_table(SHIPPED)?;
                let drained = table.extract_from_if::<(&str, &str), _>(
                    (source, "")..(after.as_str(), ""),
                    |_, _| true,
                )?;
                let mut removed = 0;
                for item in drained {
                    item?;
                    removed += 1;
                }
                removed
            };
            txn.commit()?;
            Ok(removed)
        })
    }

    /// Writes records in one durable commit.
    pub fn put_all(&self, records: &[(&str, &str, &Record)]) -> Result<(), LedgerError> {
        self.with_db(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(SHIPPED)?;
                for (source, relative, record) in records {
                    let value = serde_json::to_vec(record).expect("a record always serialises");
                    table.insert((*source, *relative), value.as_slice())?;
                }
            }
            Ok(txn.commit()?)
        })
    }

    pub fn remove(&self, source: &str, relative: &str) -> Result<(), LedgerError> {
        self.with_db(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(SHIPPED)?;
                table.remove((source, relative))?;
            }
            Ok(txn.commit()?)
        })
    }

    /// A read transaction; it outlives the lock, as redb's do.
    fn begin_read(&self) -> Result<ReadTransaction, LedgerError> {
        self.with_db(|db| Ok(db.begin_read()?))
    }

    /// Runs `f` on the database. redb refuses everything after one failed write ("Previous
    /// I/O error") until it is closed and opened again: after a failed write the database is
    /// reopened at once, so reads go on and the next write starts clean, and `f` refused
    /// for an earlier failure runs again on the reopened one.
    fn with_db<T>(
        &self,
        f: impl Fn(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, LedgerError> {
        let mut again = true;
        loop {
            let (generation, result) = {
                let db = self.db();
                let result = db.1.as_ref().map_or(Err(redb::Error::DatabaseClosed), &f);
                (db.0, result)
            };
            let error = match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let refused = matches!(error, redb::Error::PreviousIo | redb::Error::DatabaseClosed);
            if refused && again {
                again = false;
                self.reopen(generation)?;
                continue;
            }
            if refused || matches!(error, redb::Error::Io(_)) {
                // The cause is what the caller needs; a reopen that fails now is tried again
                // by the next call.
                let _ = self.reopen(generation);
            }
            return Err(self.error(error));
        }
    }

    fn db(&self) -> RwLockReadGuard<'_, (u64, Option<Database>)> {
        self.store.db.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the database and opens it again, unless another thread did since `seen`.
    fn reopen(&self, seen: u64) -> Result<(), LedgerError> {
        let mut db = self
            .store
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if db.0 != seen {
            return Ok(());
        }
        db.0 += 1;
        // Dropped first: redb lets go of the file (and its lock) only then.
        db.1 = None;
        db.1 = Some(open_db(&self.store.path, &*self.store.open)?);
        tracing::debug!(ledger = %self.store.path.display(), "reopened the ledger");
        Ok(())
    }

    fn decode(&self, relative: &str, bytes: &[u8]) -> Result<Record, LedgerError> {
        serde_json::from_slice(bytes).map_err(|source| LedgerError::Corrupt {
            path: self.store.path.clone(),
            relative: relative.to_owned(),
            source,
        })
    }

    fn error(&self, e: impl Into<redb::Error>) -> LedgerError {
        store_error(&self.store.path, e)
    }
}

/// Opens the database at `path`, telling a file another process holds and one that is not a
/// readable ledger from other failures.
fn open_db(path: &Path, open: &Opener) -> Result<Database, LedgerError> {
    let unreadable = |reason: String| LedgerError::Unreadable {
        path: path.to_owned(),
        reason,
    };
    // redb asserts on some malformed headers rather than returning an error.
    match catch_unwind(AssertUnwindSafe(|| open(path))) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            Err(LedgerError::InUse(path.to_owned()))
        }
        Ok(Err(e)) if is_unreadable(&e) => Err(unreadable(e.to_string())),
        Ok(Err(e)) => Err(store_error(path, e)),
        Err(_) => Err(unreadable("the store rejected its header".into())),
    }
}

/// Whether redb found the file is not a ledger it can read, as opposed to not reaching it.
fn is_unreadable(e: &redb::DatabaseError) -> bool {
    use std::io::ErrorKind;
    match e {
        redb::DatabaseError::UpgradeRequired(_) => true,
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => true,
        // A wrong magic number, or a file cut short.
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
            matches!(io.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof)
        }
        _ => false,
    }
}

/// Renames the ledger to `<path>.corrupt-<unix seconds>`, under its lock: a file another
/// process holds as its ledger stays where it is.
fn set_aside(path: &Path) -> Result<PathBuf, LedgerError> {
    let failed = |source| LedgerError::SetAside {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(failed)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(LedgerError::InUse(path.to_owned())),
        Err(TryLockError::Error(e)) => return Err(failed(e)),
    }
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".corrupt-{seconds}"));
    let aside = path.with_file_name(name);
    std::fs::rename(path, &aside).map_err(failed)?;
    Ok(aside)
}

fn store_error(path: &Path, e: impl Into<redb::Error>) -> LedgerError {
    LedgerError::Store {
        path: path.to_owned(),
        source: Box::new(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        // Held by another: an error, never set aside.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ledger.redb")]);
    }

    #[test]
    fn an_unreadable_ledger_is_set_aside_and_a_new_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let garbage = b"not a ledger at all\n".repeat(1000);
        std::fs::write(&path, &garbage).unwrap();
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.get("/logs", "a.log").unwrap(), None);
        ledger
            .put_all(&[("/logs", "a.log", &record(1, "k"))])
            .unwrap();
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("ledger.redb.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(&aside[0]).unwrap(), garbage);
        drop(ledger);
        // The new ledger is an ordinary one.
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.get("/logs", "a.log").unwrap(), Some(record(1, "k")));
    }

    #[test]
    fn a_ledger_cut_short_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        {
            let ledger = Ledger::open(&path).unwrap();
            ledger
                .put_all(&[("/logs", "a.log", &record(1, "k"))])
                .unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..100]).unwrap();
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.get("/logs", "a.log").unwrap(), None);
    }

    #[tokio::test]
    async fn a_full_disk_keeps_records_until_they_can_be_written() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let full = Arc::new(AtomicBool::new(false));
        let ledger = full_disk::open(&path, full.clone()).unwrap();
        let mut health = ledger.health();
        let recorder = ledger.recorder();
        recorder
            .record("/v", "before", record(1, "k"))
            .await
            .unwrap();
        recorder.flush().await.unwrap();

        full.store(true, Ordering::SeqCst);
        recorder
            .record("/v", "during", record(2, "k"))
            .await
            .unwrap();
        // Told, not left waiting and not told "ok".
        let err = recorder.flush().await.unwrap_err();
        assert!(err.to_string().contains("No space left on device"), "{err}");
        let failed = health.borrow_and_update().clone();
        assert!(failed.failed_commits >= 1, "{failed:?}");
        let reason = failed
            .unwritable
            .expect("unwritable while the disk is full");
        assert!(reason.starts_with("No space left on device"), "{reason}");
        // Still failing: a second flush fails too, and more records are kept meanwhile.
        recorder
            .record("/v", "later", record(3, "k"))
            .await
            .unwrap();
        assert!(recorder.flush().await.is_err());

        full.store(false, Ordering::SeqCst);
        let recovered = tokio::time::timeout(
            Duration::from_secs(40),
            health.wait_for(|h| h.unwritable.is_none()),
        )
        .await
        .expect("the ledger recovers once space is back")
        .unwrap()
        .clone();
        assert!(recovered.failed_commits >= 2, "{recovered:?}");
        recorder.flush().await.unwrap();
        let names: Vec<_> = ledger
            .records("/v")
            .unwrap()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert_eq!(names, vec!["before", "during", "later"]);
        // And the next commit is an ordinary one.
        recorder
            .record("/v", "after", record(4, "k"))
            .await
            .unwrap();
        recorder.flush().await.unwrap();
        // Readable by a plain open once the writer has let go of it.
        drop((ledger, recorder));
        let mut reopened = Ledger::open(&path);
        for _ in 0..100 {
            if !matches!(reopened, Err(LedgerError::InUse(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            reopened = Ledger::open(&path);
        }
        assert_eq!(reopened.unwrap().records("/v").unwrap().len(), 4);
    }

    #[tokio::test]
    async fn records_kept_while_the_disk_is_full_are_bounded() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let ledger = full_disk::open(&dir.path().join("l.redb"), full.clone()).unwrap();
        full.store(true, Ordering::SeqCst);
        let recorder = ledger.recorder();
        let extra = 50;
        for i in 0..recorder::MAX_HELD + extra {
            recorder
                .record("/v", &format!("f{i:06}"), record(1, "k"))
                .await
                .unwrap();
        }
        assert!(recorder.flush().await.is_err());
        full.store(false, Ordering::SeqCst);
        let mut health = ledger.health();
        tokio::time::timeout(
            Duration::from_secs(40),
            health.wait_for(|h| h.unwritable.is_none()),
        )
        .await
        .unwrap()
        .unwrap();
        recorder.flush().await.unwrap();
        let kept = ledger.records("/v").unwrap();
        assert_eq!(kept.len(), recorder::MAX_HELD);
        // The first ones are kept, those beyond the bound let go.
        assert_eq!(kept[0].0, "f000000");
    }

    #[test]
    fn a_write_refused_for_an_earlier_failure_reopens_the_store() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let ledger = full_disk::open(&dir.path().join("l.redb"), full.clone()).unwrap();
        ledger.put_all(&[("/v", "a", &record(1, "k"))]).unwrap();
        full.store(true, Ordering::SeqCst);
        let err = ledger.put_all(&[("/v", "b", &record(2, "k"))]).unwrap_err();
        assert!(err.cause().contains("No space left on device"), "{err}");
        full.store(false, Ordering::SeqCst);
        // Without a reopen redb would answer "Previous I/O error" from here on.
        ledger.put_all(&[("/v", "c", &record(3, "k"))]).unwrap();
        ledger.remove("/v", "a").unwrap();
        let names: Vec<_> = ledger
            .records("/v")
            .unwrap()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert_eq!(names, vec!["c"]);
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
