//! Shipping one settled file: open it safely, hash it, compare with the ledger and with what
//! the destination holds, upload, verify, record durably. Beside Airflow's own uploads the
//! rule is `alongside`'s; as the only writer, `existing_object`'s.

mod beside_airflow;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::sync::Arc;

use crate::destination::{Destination, DestinationError, LocalContent, ObjectInfo, WhileHashing};
use crate::discover::{SkipReason, Source};
use crate::existing_object::{self, prefix_check, Content, Plan, PrefixCheck, Relation};
use crate::file_hash::{hash_for_upload, sha256_prefix};
use crate::key::{fits, is_side_key, object_key};
use crate::ledger::{now_ms, Ledger, Record, Recorder};
use crate::local_file::{open_beneath, FileStat, OpenError};
use crate::{Error, Result};

/// What shipping needs, shared by all shipments.
pub struct Context<D> {
    pub destination: Arc<D>,
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
        Err(OpenError::Gone) => return beside_airflow::gone(ctx, job).await,
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
    let dest = &*ctx.destination;
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
            beside_airflow::ship_alongside(ctx, how, job, &content, stat, previous.as_ref()).await?
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
    let (key, how, info) = match existing_object::plan(relation, &key, &content.sha256) {
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
    Ok(existing_object::relation(
        file,
        Some(object),
        prefix_sha.as_deref(),
    ))
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
