//! Shipping one settled file: open it safely, hash it, compare with the ledger and with what
//! the destination holds (see `coexist` for the rule), upload, verify, record durably.

use std::fs::File;
use std::sync::Arc;

use crate::coexist::{self, prefix_check, Content, Plan, PrefixCheck, Relation};
use crate::destination::{Destination, DestinationError, LocalContent, ObjectInfo, WhileHashing};
use crate::discover::{SkipReason, Source};
use crate::key::object_key;
use crate::ledger::{now_ms, Ledger, Record, Recorder};
use crate::local_file::{hash_for_upload, open_beneath, sha256_prefix, FileStat, OpenError};
use crate::{Error, Result};

/// What shipping needs, shared by all shipments.
pub struct Context<D> {
    pub destination: D,
    pub ledger: Ledger,
    pub recorder: Recorder,
}

/// A file to ship, as it looked when it settled.
#[derive(Clone, Debug)]
pub struct Job {
    pub source: Arc<Source>,
    pub relative: String,
    pub expected: FileStat,
}

/// How a shipment ended, short of an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Shipped(Shipped),
    /// The file is not as it was when it settled; it must settle again.
    Changed(FileStat),
    Gone,
    Skipped(SkipReason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shipped {
    pub stat: FileStat,
    pub key: String,
    pub how: How,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// Written to a key that held nothing.
    Uploaded,
    /// Written over an object that was a prefix of the file.
    Replaced,
    /// The destination already held the bytes; only the ledger was written.
    AlreadyThere,
    /// Written beside a different object under the conflict key.
    Conflict,
    /// Same bytes as the ledger's record (only the mtime moved); nothing asked of the destination.
    Unchanged,
}

impl How {
    /// Whether bytes went over the wire.
    pub fn uploaded(self) -> bool {
        matches!(self, How::Uploaded | How::Replaced | How::Conflict)
    }
}

pub async fn ship<D: Destination>(ctx: &Context<D>, job: &Job) -> Result<Outcome> {
    let path = job.source.root.join(&job.relative);
    let (root, relative) = (job.source.root.clone(), job.relative.clone());
    let opened = blocking(move || open_beneath(&root, &relative)).await;
    let (file, stat) = match opened {
        Ok(opened) => opened,
        Err(OpenError::Gone) => return Ok(Outcome::Gone),
        Err(OpenError::Symlink) => return Ok(Outcome::Skipped(SkipReason::Symlink)),
        Err(OpenError::NotRegular) => return Ok(Outcome::Skipped(SkipReason::NotRegular)),
        Err(OpenError::Unreadable) => return Ok(Outcome::Skipped(SkipReason::Unreadable)),
        Err(OpenError::Io(source)) => return Err(Error::Read { path, source }),
    };
    if stat != job.expected {
        return Ok(Outcome::Changed(stat));
    }
    let file = Arc::new(file);
    let dest = &ctx.destination;
    let previous = ctx
        .ledger
        .get(&job.source.id, &job.relative)?
        .filter(|r| r.destination == dest.id());
    let key = object_key(dest.prefix(), &job.relative);
    // A large log never shipped before goes while it is hashed, where the store can.
    // `found` is what stood under the key if the store already looked.
    let mut found = None;
    if previous.is_none() {
        match dest
            .create_hashing(&key, file.clone(), path.clone(), stat.size)
            .await?
        {
            WhileHashing::Sent(content, put) => {
                let info = verified(dest, &key, &content, put).await?;
                return record(ctx, job, &content, stat, key, How::Uploaded, info).await;
            }
            WhileHashing::Taken(object) => found = Some(object),
            WhileHashing::NotHere => {}
        }
    }
    let limit = dest.in_memory_limit();
    let part_size = dest.part_size(stat.size);
    let hashed = {
        let file = file.clone();
        blocking(move || hash_for_upload(&file, stat.size, limit, part_size)).await
    };
    let (sha256, extra) = match hashed {
        Ok(sha) => sha,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Ok(Outcome::Changed(current_stat(&file).unwrap_or(stat)));
        }
        Err(source) => return Err(Error::Read { path, source }),
    };
    let content = LocalContent::new(file, path, stat.size, sha256, extra);
    if let Some(previous) = previous
        .clone()
        .filter(|r| r.sha256 == content.sha256 && r.stat.size == stat.size)
    {
        let record = Record {
            stat,
            shipped_at_ms: now_ms(),
            ..previous
        };
        let key = record.key.clone();
        ctx.recorder
            .record(&job.source.id, &job.relative, record)
            .await?;
        return Ok(Outcome::Shipped(Shipped {
            stat,
            key,
            how: How::Unchanged,
        }));
    }

    // A log never shipped before most likely has no object yet: try to create it in one
    // request, and fall back to comparing only if something is there.
    if previous.is_none() && found.is_none() {
        if let Some(put) = dest.create(&key, &content).await? {
            let info = verified(dest, &key, &content, put).await?;
            return record(ctx, job, &content, stat, key, How::Uploaded, info).await;
        }
    }
    let mut object = match found {
        Some(object) => Some(object),
        None => dest.head(&key).await?,
    };
    if let (Some(object), Some(previous)) = (object.as_mut(), previous.as_ref()) {
        object.sha256 = object
            .sha256
            .take()
            .or_else(|| recorded_sha(previous, &key, object));
    }
    let relation = relate(dest, &key, &content, object.as_ref()).await?;
    let (key, how, info) = match coexist::plan(relation, &key, &content.sha256) {
        Plan::Keep { key } => {
            let info = object.expect("kept objects exist");
            (key, How::AlreadyThere, info)
        }
        Plan::Upload { key, replaces } => {
            let info = upload_verified(dest, &key, &content).await?;
            (
                key,
                if replaces {
                    How::Replaced
                } else {
                    How::Uploaded
                },
                info,
            )
        }
        Plan::Beside { key } => {
            tracing::warn!(
                file = %content.path.display(), existing = %object_key(dest.prefix(), &job.relative), copy = %key,
                "the destination holds a different version of this log; keeping it and shipping the file beside it"
            );
            let info = match dest.head(&key).await? {
                None => upload_verified(dest, &key, &content).await?,
                Some(info) => {
                    let copy = relate(dest, &key, &content, Some(&info)).await?;
                    if copy != Relation::Same {
                        return Err(DestinationError::ConflictTaken { key }.into());
                    }
                    info
                }
            };
            (key, How::Conflict, info)
        }
    };
    record(ctx, job, &content, stat, key, how, info).await
}

/// Commits the shipment to the ledger; it counts as shipped once this returns.
async fn record<D: Destination>(
    ctx: &Context<D>,
    job: &Job,
    content: &LocalContent,
    stat: FileStat,
    key: String,
    how: How,
    info: ObjectInfo,
) -> Result<Outcome> {
    let record = Record {
        stat,
        sha256: content.sha256.clone(),
        destination: ctx.destination.id().to_owned(),
        key: key.clone(),
        etag: info.etag,
        version_id: info.version_id,
        shipped_at_ms: now_ms(),
    };
    ctx.recorder
        .record(&job.source.id, &job.relative, record)
        .await?;
    Ok(Outcome::Shipped(Shipped { stat, key, how }))
}

/// The SHA-256 of an object stored without one (sent while it was hashed), from the ledger
/// record of that very object: same key, size and ETag.
fn recorded_sha(previous: &Record, key: &str, object: &ObjectInfo) -> Option<String> {
    let same = previous.key == key
        && previous.stat.size == object.size
        && object.etag.is_some()
        && previous.etag == object.etag;
    same.then(|| previous.sha256.clone())
}

/// Compares the file with the object under `key`, hashing only the prefix that matters.
async fn relate<D: Destination>(
    dest: &D,
    key: &str,
    content: &LocalContent,
    object: Option<&ObjectInfo>,
) -> Result<Relation> {
    let Some(object) = object else {
        return Ok(Relation::Absent);
    };
    let check = prefix_check(content.size, object.size);
    let object_sha = match (&object.sha256, check) {
        (Some(sha), _) => sha.clone(),
        (None, PrefixCheck::ObjectFirst(_)) => String::new(),
        (None, _) => dest.sha256_prefix(key, object.size).await?,
    };
    let prefix_sha = match check {
        PrefixCheck::None => None,
        PrefixCheck::FileFirst(n) => {
            let file = content.file.clone();
            let hashed = blocking(move || sha256_prefix(&file, n)).await;
            Some(hashed.map_err(|source| Error::Read {
                path: content.path.clone(),
                source,
            })?)
        }
        PrefixCheck::ObjectFirst(n) => Some(dest.sha256_prefix(key, n).await?),
    };
    let file = Content {
        size: content.size,
        sha256: &content.sha256,
    };
    let object = Content {
        size: object.size,
        sha256: &object_sha,
    };
    Ok(coexist::relation(file, Some(object), prefix_sha.as_deref()))
}

/// Uploads, and reads back size and SHA-256 unless the destination confirmed them already,
/// before anything relies on the object.
async fn upload_verified<D: Destination>(
    dest: &D,
    key: &str,
    content: &LocalContent,
) -> Result<ObjectInfo> {
    let put = dest.put(key, content).await?;
    verified(dest, key, content, put).await
}

/// Checks what a write stored, reading back size and SHA-256 unless the destination
/// confirmed them already.
async fn verified<D: Destination>(
    dest: &D,
    key: &str,
    content: &LocalContent,
    put: ObjectInfo,
) -> Result<ObjectInfo> {
    if put.confirmed && put.size == content.size && put.sha256.as_ref() == Some(&content.sha256) {
        return Ok(put);
    }
    let head = dest.head(key).await?;
    let found = match head {
        None => "no object".to_owned(),
        Some(head) => {
            let sha = match &head.sha256 {
                Some(sha) => sha.clone(),
                None => dest.sha256_prefix(key, head.size).await?,
            };
            if head.size == content.size && sha == content.sha256 {
                return Ok(ObjectInfo {
                    etag: put.etag.or(head.etag),
                    version_id: put.version_id.or(head.version_id),
                    ..head
                });
            }
            format!("{} bytes with SHA-256 {sha}", head.size)
        }
    };
    Err(DestinationError::Unverified {
        key: key.to_owned(),
        expected: format!("{} bytes with SHA-256 {}", content.size, content.sha256),
        found,
    }
    .into())
}

fn current_stat(file: &File) -> Option<FileStat> {
    file.metadata().ok().map(|m| FileStat::of(&m))
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking file work does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::file::FileDestination;

    const REL: &str = "dag_id=a/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";

    struct Setup {
        _dir: tempfile::TempDir,
        ctx: Context<FileDestination>,
        source: Arc<Source>,
    }

    impl Setup {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("logs")).unwrap();
            let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
            let ctx = Context {
                destination: FileDestination::new(&dir.path().join("out")).unwrap(),
                recorder: ledger.recorder(),
                ledger,
            };
            let source = Arc::new(Source::new(&dir.path().join("logs")).unwrap());
            Self {
                _dir: dir,
                ctx,
                source,
            }
        }

        fn write_local(&self, bytes: &[u8]) -> FileStat {
            let path = self.source.root.join(REL);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            FileStat::of(&std::fs::metadata(&path).unwrap())
        }

        fn write_object(&self, key: &str, bytes: &[u8]) {
            let path = self.ctx.destination.root().join(key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }

        fn object(&self, key: &str) -> Option<Vec<u8>> {
            std::fs::read(self.ctx.destination.root().join(key)).ok()
        }

        async fn ship(&self, expected: FileStat) -> Outcome {
            let job = Job {
                source: self.source.clone(),
                relative: REL.into(),
                expected,
            };
            let outcome = ship(&self.ctx, &job).await.unwrap();
            self.ctx.recorder.flush().await.unwrap();
            outcome
        }

        async fn shipped(&self, expected: FileStat) -> Shipped {
            match self.ship(expected).await {
                Outcome::Shipped(shipped) => shipped,
                other => panic!("not shipped: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_new_file_is_uploaded_and_recorded() {
        let s = Setup::new();
        let stat = s.write_local(b"hello\n");
        let shipped = s.shipped(stat).await;
        assert_eq!(shipped.how, How::Uploaded);
        assert_eq!(shipped.key, REL);
        assert_eq!(s.object(REL).unwrap(), b"hello\n");
        let record = s.ctx.ledger.get(&s.source.id, REL).unwrap().unwrap();
        assert!(record.covers(stat, s.ctx.destination.id()));
        assert_eq!(record.key, REL);
    }

    #[tokio::test]
    async fn a_touched_file_is_recorded_without_asking_the_destination() {
        let s = Setup::new();
        let stat = s.write_local(b"hello\n");
        s.shipped(stat).await;
        std::fs::remove_file(s.ctx.destination.root().join(REL)).unwrap();
        let touched = s.write_local(b"hello\n");
        let touched = FileStat {
            mtime_ns: touched.mtime_ns + 1,
            ..touched
        };
        let file = std::fs::File::options()
            .write(true)
            .open(s.source.root.join(REL))
            .unwrap();
        let mtime =
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(touched.mtime_ns as u64);
        file.set_modified(mtime).unwrap();
        assert_eq!(s.shipped(touched).await.how, How::Unchanged);
        assert_eq!(s.object(REL), None, "the destination was not written");
    }

    #[tokio::test]
    async fn the_same_bytes_already_there_are_kept() {
        let s = Setup::new();
        s.write_object(REL, b"hello\n");
        let stat = s.write_local(b"hello\n");
        assert_eq!(s.shipped(stat).await.how, How::AlreadyThere);
        assert!(s.ctx.ledger.get(&s.source.id, REL).unwrap().is_some());
    }

    #[tokio::test]
    async fn an_object_that_is_a_prefix_is_replaced() {
        let s = Setup::new();
        s.write_object(REL, b"line 1\n");
        let stat = s.write_local(b"line 1\nline 2\n");
        assert_eq!(s.shipped(stat).await.how, How::Replaced);
        assert_eq!(s.object(REL).unwrap(), b"line 1\nline 2\n");
    }

    #[tokio::test]
    async fn an_object_holding_more_than_the_file_is_kept() {
        let s = Setup::new();
        s.write_object(REL, b"line 1\nline 2\n");
        let stat = s.write_local(b"line 1\n");
        let shipped = s.shipped(stat).await;
        assert_eq!(shipped.how, How::AlreadyThere);
        assert_eq!(s.object(REL).unwrap(), b"line 1\nline 2\n");
    }

    #[tokio::test]
    async fn a_different_object_is_kept_and_the_file_goes_beside_it() {
        let s = Setup::new();
        s.write_object(REL, b"theirs\n");
        let stat = s.write_local(b"mine\n");
        let shipped = s.shipped(stat).await;
        assert_eq!(shipped.how, How::Conflict);
        assert!(
            shipped
                .key
                .starts_with(&format!("{REL}.localship-conflict-")),
            "{}",
            shipped.key
        );
        assert_eq!(s.object(REL).unwrap(), b"theirs\n");
        assert_eq!(s.object(&shipped.key).unwrap(), b"mine\n");
        // Shipping the same version again finds its copy in place.
        s.ctx.ledger.remove(&s.source.id, REL).unwrap();
        let again = s.shipped(stat).await;
        assert_eq!((again.how, again.key), (How::Conflict, shipped.key));
    }

    #[tokio::test]
    async fn a_file_that_changed_since_it_settled_is_not_shipped() {
        let s = Setup::new();
        let stat = s.write_local(b"one\n");
        let now = s.write_local(b"one\ntwo\n");
        assert_eq!(s.ship(stat).await, Outcome::Changed(now));
        assert_eq!(s.object(REL), None);
    }

    #[tokio::test]
    async fn symlinks_and_vanished_files_are_not_shipped() {
        let s = Setup::new();
        let stat = s.write_local(b"x");
        std::fs::remove_file(s.source.root.join(REL)).unwrap();
        assert_eq!(s.ship(stat).await, Outcome::Gone);
        std::os::unix::fs::symlink("/etc/passwd", s.source.root.join(REL)).unwrap();
        assert_eq!(s.ship(stat).await, Outcome::Skipped(SkipReason::Symlink));
        assert_eq!(s.object(REL), None);
    }

    #[test]
    fn an_object_without_a_hash_takes_the_ledgers_only_if_it_is_that_object() {
        let previous = Record {
            stat: FileStat {
                size: 10,
                mtime_ns: 1,
            },
            sha256: "ab".repeat(32),
            destination: "s3://b/p".into(),
            key: "p/x.log".into(),
            etag: Some("\"e-3\"".into()),
            version_id: None,
            shipped_at_ms: 1,
        };
        let object = ObjectInfo {
            size: 10,
            sha256: None,
            etag: Some("\"e-3\"".into()),
            version_id: None,
            confirmed: false,
        };
        assert_eq!(
            recorded_sha(&previous, "p/x.log", &object),
            Some(previous.sha256.clone())
        );
        assert_eq!(recorded_sha(&previous, "p/y.log", &object), None);
        let rewritten = ObjectInfo {
            etag: Some("\"f-3\"".into()),
            ..object.clone()
        };
        assert_eq!(recorded_sha(&previous, "p/x.log", &rewritten), None);
        let grown = ObjectInfo {
            size: 11,
            ..object.clone()
        };
        assert_eq!(recorded_sha(&previous, "p/x.log", &grown), None);
        let no_etag = ObjectInfo {
            etag: None,
            ..object
        };
        let previous = Record {
            etag: None,
            ..previous
        };
        assert_eq!(recorded_sha(&previous, "p/x.log", &no_etag), None);
    }
}
