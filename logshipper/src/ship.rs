//! Shipping one settled file: open it safely, hash it, compare with the ledger and with what
//! the destination holds, upload, verify, record durably. Beside Airflow's own uploads the
//! rule is `alongside`'s; as the only writer, `coexist`'s.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;

use crate::alongside::{self, Decision, COMPARE_LIMIT};
use crate::coexist::{self, prefix_check, Content, Plan, PrefixCheck, Relation};
use crate::destination::{
    Destination, DestinationError, Fetched, LocalContent, ObjectInfo, Precondition, WhileHashing,
};
use crate::discover::{SkipReason, Source};
use crate::key::{fits, is_side_key, object_key, side_key, writer_id};
use crate::ledger::{now_ms, Ledger, Record, Recorder};
use crate::local_file::{
    hash_for_upload, open_beneath, read_at, sha256_prefix, FileStat, OpenError,
};
use crate::{Error, Result};

/// What shipping needs, shared by all shipments.
pub struct Context<D> {
    pub destination: D,
    pub ledger: Ledger,
    pub recorder: Recorder,
    /// Airflow's remote logging uploads these logs too: ship by `alongside`'s rule.
    pub alongside: Option<Alongside>,
    /// Larger files are not shipped (`--max-file-size`).
    pub max_file_size: u64,
}

impl<D: Destination> Context<D> {
    /// Names where `source`'s logs go, in the ledger: its own place, else the destination.
    pub fn destination_id<'a>(&'a self, source: &'a Source) -> &'a str {
        source
            .place
            .as_ref()
            .map_or_else(|| self.destination.id(), |place| &place.id)
    }

    /// The key prefix of `source`'s logs.
    pub fn prefix<'a>(&'a self, source: &'a Source) -> &'a str {
        source
            .place
            .as_ref()
            .map_or_else(|| self.destination.prefix(), |place| &place.prefix)
    }
}

/// Holes a log may have before it counts as sparse: a log is written, never seeked past.
const MAX_HOLES: u64 = 1 << 20;

/// Shipping beside Airflow's own uploads.
#[derive(Clone, Debug)]
pub struct Alongside {
    /// This host (the node, in Kubernetes), part of every side key's writer id.
    pub host: String,
}

/// How often a write that lost a race with Airflow's own upload looks again.
const RACE_ATTEMPTS: u32 = 4;

/// A file to ship, as it looked when it settled.
#[derive(Clone, Debug)]
pub struct Job {
    pub source: Arc<Source>,
    pub relative: String,
    pub expected: FileStat,
    /// The log will not grow any more (quiet for `--final-after`, or its volume is going):
    /// beside Airflow, its canonical key gets what it lacks.
    pub finished: bool,
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

impl Shipped {
    /// Written under a side key: visible, but to be finished once the log is final.
    pub fn provisional(&self) -> bool {
        matches!(self.how, How::Side | How::SideKept)
    }
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
    /// What Airflow's object lacks, written under this writer's side key until the log is final.
    Side,
    /// As `Side`, the side key already holding that part: nothing written.
    SideKept,
    /// Airflow's object held a repeated copy of the file's beginning, now written without it.
    Repaired,
}

impl How {
    /// Whether bytes went over the wire.
    pub fn uploaded(self) -> bool {
        matches!(
            self,
            How::Uploaded | How::Replaced | How::Conflict | How::Side | How::Repaired
        )
    }
}

pub async fn ship<D: Destination>(ctx: &Context<D>, job: &Job) -> Result<Outcome> {
    let path = job.source.root.join(&job.relative);
    let (root, relative) = (job.source.root.clone(), job.relative.clone());
    let opened = blocking(move || open_beneath(&root, &relative)).await;
    let (file, stat) = match opened {
        Ok(opened) => opened,
        Err(OpenError::Gone) => return gone(ctx, job).await,
        Err(OpenError::Symlink) => return Ok(Outcome::Skipped(SkipReason::Symlink)),
        Err(OpenError::NotRegular) => return Ok(Outcome::Skipped(SkipReason::NotRegular)),
        Err(OpenError::Unreadable) => return Ok(Outcome::Skipped(SkipReason::Unreadable)),
        Err(OpenError::Io(source)) => return Err(Error::Read { path, source }),
    };
    if stat != job.expected {
        return Ok(Outcome::Changed(stat));
    }
    // Refused before a byte is read: a runaway log, or terabytes of holes it costs the pod
    // nothing to make.
    if hole_bytes(&file, stat.size).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })? > MAX_HOLES
    {
        return Ok(Outcome::Skipped(SkipReason::Sparse));
    }
    if stat.size > ctx.max_file_size {
        return Ok(Outcome::Skipped(SkipReason::TooLarge));
    }
    let dest = &ctx.destination;
    let key = object_key(ctx.prefix(&job.source), &job.relative);
    if dest.max_key_bytes().is_some_and(|max| !fits(&key, max)) {
        return Ok(Outcome::Skipped(SkipReason::KeyTooLong));
    }
    let file = Arc::new(file);
    let previous = ctx
        .ledger
        .get(&job.source.id, &job.relative)?
        .filter(|r| r.destination == ctx.destination_id(&job.source));
    // A large log never shipped before goes while it is hashed, where the store can.
    // `found` is what stood under the key if the store already looked.
    let mut found = None;
    if previous.is_none() && ctx.alongside.is_none() {
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
    // A log under its side key is not final: it is looked at again, not taken as shipped.
    if let Some(previous) = previous
        .clone()
        .filter(|r| r.sha256 == content.sha256 && r.stat.size == stat.size && !is_side_key(&r.key))
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

    if let Some(how) = &ctx.alongside {
        if let Some(outcome) =
            ship_alongside(ctx, how, job, &content, stat, previous.as_ref()).await?
        {
            return Ok(outcome);
        }
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
                file = %content.path.display(), existing = %object_key(ctx.prefix(&job.source), &job.relative), copy = %key,
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

/// Ships by `alongside`'s rule; `None` when the log or the object is too large to compare,
/// and the sole-writer rule applies.
async fn ship_alongside<D: Destination>(
    ctx: &Context<D>,
    alongside: &Alongside,
    job: &Job,
    content: &LocalContent,
    stat: FileStat,
    previous: Option<&Record>,
) -> Result<Option<Outcome>> {
    if content.size > COMPARE_LIMIT {
        return Ok(None);
    }
    let dest = &ctx.destination;
    let key = object_key(ctx.prefix(&job.source), &job.relative);
    let side = side_key(&key, &writer_id(&alongside.host, &job.source.id));
    let file = match &content.data {
        Some(data) => data.clone(),
        None => match whole(content).await? {
            Some(data) => data,
            None => {
                return Ok(Some(Outcome::Changed(
                    current_stat(&content.file).unwrap_or(stat),
                )))
            }
        },
    };
    // Only a side key we may have written needs removing: none for a log already final.
    let side_written = previous.is_none_or(|r| r.key == side);
    for _ in 0..RACE_ATTEMPTS {
        let (info, object) = match dest.get(&key, COMPARE_LIMIT).await? {
            None => (None, None),
            Some(Fetched { data: None, .. }) => return Ok(None),
            Some(Fetched {
                info,
                data: Some(data),
            }) => (Some(info), Some(data)),
        };
        let when = info
            .clone()
            .map_or(Precondition::Absent, Precondition::Unchanged);
        let (how, written) = match alongside::decide(object.as_deref(), &file) {
            // An empty log: Airflow 3 creates the file before its first line. Once final (a
            // task killed before it logged), an empty object shows an empty log rather than
            // none; Airflow's append to an empty object adds no separator.
            Decision::Covered if info.is_none() && job.finished => (
                How::Uploaded,
                dest.put_bytes(&key, Bytes::new(), when).await?,
            ),
            // Until then there is nothing to show: looked at again like a side key's part.
            Decision::Covered if info.is_none() => {
                let outcome = record(ctx, job, content, stat, side, How::SideKept, nothing());
                return Ok(Some(outcome.await?));
            }
            Decision::Covered => (How::AlreadyThere, info),
            Decision::Repair(fixed) => {
                tracing::info!(
                    key,
                    "the object repeats the log's beginning; writing it once"
                );
                let written = dest.put_bytes(&key, fixed.into(), when).await?;
                (How::Repaired, written)
            }
            Decision::Remainder { covered, base } if job.finished => {
                let done = alongside::finished(object.as_deref(), &file, covered, base.as_deref());
                let how = if info.is_some() {
                    How::Replaced
                } else {
                    How::Uploaded
                };
                (how, dest.put_bytes(&key, done.into(), when).await?)
            }
            Decision::Remainder { covered, .. } => {
                let part = file.slice(covered..);
                let part_sha = sha256_hex(&part);
                let there = previous.filter(|r| {
                    r.key == side && r.part_sha256.as_deref() == Some(part_sha.as_str())
                });
                let (how, info) = match there {
                    // Looked at again, nothing new: the side key already holds the part.
                    Some(r) => {
                        let info = ObjectInfo {
                            size: part.len() as u64,
                            sha256: Some(part_sha),
                            etag: r.etag.clone(),
                            version_id: r.version_id.clone(),
                            confirmed: false,
                        };
                        (How::SideKept, info)
                    }
                    None => {
                        let info = dest.put_bytes(&side, part, Precondition::Always).await?;
                        (How::Side, info.expect("an unconditional write writes"))
                    }
                };
                let outcome = record(ctx, job, content, stat, side, how, info).await?;
                return Ok(Some(outcome));
            }
        };
        // `None`: Airflow wrote the key since it was read; look again.
        let Some(info) = written else { continue };
        if side_written {
            dest.delete(&side).await?;
        }
        return record(ctx, job, content, stat, key, how, info)
            .await
            .map(Some);
    }
    Err(DestinationError::Raced { key }.into())
}

/// A shipped file that is gone before it was final (Airflow's `delete_local_logs` removes a
/// log's folder right after its own upload): its side key goes once Airflow's object holds
/// what it held, and stays as the log's only copy otherwise.
async fn gone<D: Destination>(ctx: &Context<D>, job: &Job) -> Result<Outcome> {
    let dest = &ctx.destination;
    let previous = ctx.ledger.get(&job.source.id, &job.relative)?;
    let Some(side) = previous
        .map(|r| r.key)
        .filter(|key| ctx.alongside.is_some() && is_side_key(key))
    else {
        return Ok(Outcome::Gone);
    };
    let key = object_key(ctx.prefix(&job.source), &job.relative);
    let (Some(object), Some(part)) = (
        dest.get(&key, COMPARE_LIMIT).await?,
        dest.get(&side, COMPARE_LIMIT).await?,
    ) else {
        return Ok(Outcome::Gone);
    };
    if let (Some(object), Some(part)) = (object.data, part.data) {
        if alongside::holds(&object, &part) {
            dest.delete(&side).await?;
            ctx.ledger.remove(&job.source.id, &job.relative)?;
            tracing::info!(
                key,
                "the log is gone and Airflow's object holds it; its side key is removed"
            );
        }
    }
    Ok(Outcome::Gone)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// What an empty log is recorded as shipped with: no bytes, no object.
fn nothing() -> ObjectInfo {
    ObjectInfo {
        size: 0,
        sha256: Some(sha256_hex(b"")),
        etag: None,
        version_id: None,
        confirmed: false,
    }
}

/// The content's bytes, read whole; `None` if they no longer hash as they did.
async fn whole(content: &LocalContent) -> Result<Option<Bytes>> {
    let (file, size) = (content.file.clone(), content.size as usize);
    let read = blocking(move || read_at(&file, 0, size)).await;
    let data = read.map_err(|source| Error::Read {
        path: content.path.clone(),
        source,
    })?;
    let same = sha256_hex(&data) == content.sha256;
    Ok(same.then(|| Bytes::from(data)))
}

/// How many of the first `size` bytes of `file` are holes (never written, not stored).
fn hole_bytes(file: &File, size: u64) -> std::io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    let (mut at, mut holes) = (0i64, 0u64);
    let size = size as i64;
    while at < size {
        let hole = match lseek(file, at, Whence::SeekHole) {
            Ok(hole) => hole,
            // A filesystem without hole reporting: nothing to count.
            Err(nix::errno::Errno::EINVAL) => return Ok(holes),
            Err(errno) => return Err(errno.into()),
        };
        if hole >= size {
            break;
        }
        let data = match lseek(file, hole, Whence::SeekData) {
            Ok(data) => data.min(size),
            Err(nix::errno::Errno::ENXIO) => size,
            Err(errno) => return Err(errno.into()),
        };
        holes += (data - hole) as u64;
        at = data;
    }
    Ok(holes)
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
        destination: ctx.destination_id(&job.source).to_owned(),
        key: key.clone(),
        etag: info.etag,
        part_sha256: matches!(how, How::Side | How::SideKept)
            .then_some(info.sha256)
            .flatten(),
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
    use crate::destination::Place;

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
                alongside: None,
                max_file_size: u64::MAX,
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

        /// Beside Airflow's uploads, as `--airflow-remote-logging on` ships.
        fn alongside() -> Self {
            let mut s = Self::new();
            s.ctx.alongside = Some(Alongside {
                host: "node-a".into(),
            });
            s
        }

        fn side(&self) -> String {
            side_key(REL, &writer_id("node-a", &self.source.id))
        }

        async fn ship(&self, expected: FileStat) -> Outcome {
            self.ship_as(expected, false).await
        }

        fn path(&self) -> std::path::PathBuf {
            self.source.root.join(REL)
        }

        async fn ship_final(&self, expected: FileStat) -> Shipped {
            match self.ship_as(expected, true).await {
                Outcome::Shipped(shipped) => shipped,
                other => panic!("not shipped: {other:?}"),
            }
        }

        async fn ship_as(&self, expected: FileStat, finished: bool) -> Outcome {
            let job = Job {
                source: self.source.clone(),
                relative: REL.into(),
                expected,
                finished,
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
    async fn a_source_with_a_place_of_its_own_ships_there_and_records_it() {
        let mut s = Setup::new();
        let stat = s.write_local(b"team a\n");
        let place = |namespace: &str| Place {
            id: format!("s3://airflow/logs/{namespace}"),
            prefix: format!("logs/{namespace}"),
        };
        let mut source = Source::new(&s.source.root).unwrap();
        source.place = Some(place("team-a"));
        s.source = Arc::new(source);
        let shipped = s.shipped(stat).await;
        let key = format!("logs/team-a/{REL}");
        assert_eq!((shipped.how, &shipped.key), (How::Uploaded, &key));
        assert_eq!(s.object(&key).unwrap(), b"team a\n");
        assert_eq!(
            s.object(REL),
            None,
            "nothing under the destination's own prefix"
        );
        let record = s.ctx.ledger.get(&s.source.id, REL).unwrap().unwrap();
        assert!(record.covers(stat, "s3://airflow/logs/team-a"));
        assert!(!record.covers(stat, s.ctx.destination.id()));
        // Its place changed: what was shipped elsewhere does not count, it ships anew.
        let mut source = Source::new(&s.source.root).unwrap();
        source.place = Some(place("team-b"));
        s.source = Arc::new(source);
        let shipped = s.shipped(stat).await;
        assert_eq!(shipped.key, format!("logs/team-b/{REL}"));
        assert_eq!(shipped.how, How::Uploaded);
    }

    #[tokio::test]
    async fn beside_airflow_a_place_of_its_own_holds_the_side_key_too() {
        let mut s = Setup::alongside();
        let mut source = Source::new(&s.source.root).unwrap();
        source.place = Some(Place {
            id: "s3://airflow/logs/team-a".into(),
            prefix: "logs/team-a".into(),
        });
        s.source = Arc::new(source);
        let stat = s.write_local(b"a1\n");
        let shipped = s.shipped(stat).await;
        let key = format!("logs/team-a/{REL}");
        let side = side_key(&key, &writer_id("node-a", &s.source.id));
        assert_eq!((shipped.how, &shipped.key), (How::Side, &side));
        assert_eq!(s.object(&side).unwrap(), b"a1\n");
        let shipped = s.ship_final(stat).await;
        assert_eq!((shipped.how, &shipped.key), (How::Uploaded, &key));
        assert_eq!(s.object(&side), None);
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
    async fn sparse_and_oversized_files_are_refused_before_they_are_read() {
        let mut s = Setup::new();
        s.write_local(b"");
        let file = std::fs::File::options().write(true).open(s.path()).unwrap();
        file.set_len(4 << 40).unwrap();
        let stat = FileStat::of(&file.metadata().unwrap());
        assert_eq!(s.ship(stat).await, Outcome::Skipped(SkipReason::Sparse));
        assert_eq!(s.object(REL), None);
        // A small hole is not refused; a file over the limit is.
        s.write_local(b"x");
        let file = std::fs::File::options().write(true).open(s.path()).unwrap();
        file.set_len(64 << 10).unwrap();
        let stat = FileStat {
            size: 64 << 10,
            ..FileStat::of(&file.metadata().unwrap())
        };
        assert!(matches!(s.ship(stat).await, Outcome::Shipped(_)));
        s.ctx.max_file_size = 1024;
        let stat = s.write_local(&[b'a'; 2048]);
        assert_eq!(s.ship(stat).await, Outcome::Skipped(SkipReason::TooLarge));
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

    #[tokio::test]
    async fn beside_airflow_a_growing_log_goes_to_its_side_key_and_the_key_is_left_alone() {
        let s = Setup::alongside();
        let stat = s.write_local(b"a1\n");
        let shipped = s.shipped(stat).await;
        assert_eq!((shipped.how, &shipped.key), (How::Side, &s.side()));
        assert!(shipped.provisional());
        assert_eq!(s.object(&s.side()).unwrap(), b"a1\n");
        assert_eq!(
            s.object(REL),
            None,
            "the log's key is Airflow's until the log is final"
        );
        // Looked at again with nothing new: the side key is not written again.
        std::fs::remove_file(s.ctx.destination.root().join(s.side())).unwrap();
        assert_eq!(s.shipped(stat).await.how, How::SideKept);
        assert_eq!(s.object(&s.side()), None);
        std::fs::write(s.ctx.destination.root().join(s.side()), b"a1\n").unwrap();
        // Airflow uploaded the first part at a deferral; only the rest goes beside it.
        s.write_object(REL, b"a1\n");
        let stat = s.write_local(b"a1\nb1\n");
        assert_eq!(s.shipped(stat).await.how, How::Side);
        assert_eq!(s.object(&s.side()).unwrap(), b"b1\n");
        assert_eq!(s.object(REL).unwrap(), b"a1\n");
    }

    #[tokio::test]
    async fn beside_airflow_an_empty_log_needs_no_object_until_final() {
        let s = Setup::alongside();
        let stat = s.write_local(b"");
        let shipped = s.shipped(stat).await;
        assert_eq!((shipped.how, &shipped.key), (How::SideKept, &s.side()));
        assert!(shipped.provisional(), "looked at again until final");
        assert_eq!((s.object(REL), s.object(&s.side())), (None, None));
        // Final and still empty (killed before its first line): an empty log, not none.
        let shipped = s.ship_final(stat).await;
        assert_eq!((shipped.how, shipped.key.as_str()), (How::Uploaded, REL));
        assert_eq!(s.object(REL).unwrap(), b"");
    }

    #[tokio::test]
    async fn beside_airflow_its_upload_of_the_whole_log_removes_the_side_key() {
        let s = Setup::alongside();
        let stat = s.write_local(b"a1\n");
        s.shipped(stat).await;
        let stat = s.write_local(b"a1\nb1\n");
        // Airflow's upload at the end: nothing was under the key, so the file alone.
        s.write_object(REL, b"a1\nb1\n");
        let shipped = s.shipped(stat).await;
        assert_eq!(
            (shipped.how, shipped.key.as_str()),
            (How::AlreadyThere, REL)
        );
        assert!(!shipped.provisional());
        assert_eq!(s.object(&s.side()), None);
        assert_eq!(s.object(REL).unwrap(), b"a1\nb1\n");
    }

    #[tokio::test]
    async fn beside_airflow_a_final_log_completes_its_key_and_drops_the_side_key() {
        let s = Setup::alongside();
        // Another worker's part is there (Airflow uploaded it at a deferral).
        s.write_object(REL, b"w1\n");
        let stat = s.write_local(b"w2\n");
        assert_eq!(s.shipped(stat).await.how, How::Side);
        let shipped = s.ship_final(stat).await;
        assert_eq!((shipped.how, shipped.key.as_str()), (How::Replaced, REL));
        assert_eq!(s.object(REL).unwrap(), b"w1\nw2\n");
        assert_eq!(s.object(&s.side()), None);
        // Seen again, final and unchanged: nothing more to do.
        assert_eq!(s.ship_final(stat).await.how, How::Unchanged);
    }

    #[tokio::test]
    async fn beside_airflow_a_repeat_of_the_logs_beginning_is_written_away() {
        let s = Setup::alongside();
        let stat = s.write_local(b"a1\n");
        s.ship_final(stat).await;
        assert_eq!(s.object(REL).unwrap(), b"a1\n");
        // The task was only quiet: it went on, and Airflow appended the whole file.
        let stat = s.write_local(b"a1\nb1\n");
        s.write_object(REL, b"a1\n\na1\nb1\n");
        assert_eq!(s.shipped(stat).await.how, How::Repaired);
        assert_eq!(s.object(REL).unwrap(), b"a1\nb1\n");
    }

    #[tokio::test]
    async fn beside_airflow_a_log_removed_after_airflows_upload_leaves_no_side_key() {
        let s = Setup::alongside();
        let stat = s.write_local(b"a1\n");
        s.shipped(stat).await;
        // `delete_local_logs`: Airflow uploads, then removes the folder.
        s.write_object(REL, b"a1\nb1\n");
        std::fs::remove_file(s.source.root.join(REL)).unwrap();
        assert_eq!(s.ship(stat).await, Outcome::Gone);
        assert_eq!(s.object(&s.side()), None);
        // Removed before Airflow's upload held it: the side key is the log's copy, kept.
        let s = Setup::alongside();
        let stat = s.write_local(b"a1\n");
        s.shipped(stat).await;
        std::fs::remove_file(s.source.root.join(REL)).unwrap();
        assert_eq!(s.ship(stat).await, Outcome::Gone);
        assert_eq!(s.object(&s.side()).unwrap(), b"a1\n");
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
            part_sha256: None,
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
