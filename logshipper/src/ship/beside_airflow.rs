//! Shipping beside Airflow's own uploads, by `alongside`'s rule: what Airflow's object
//! lacks goes under this writer's side key until the log is final, and a log gone after
//! Airflow's upload takes its side key with it.

use bytes::Bytes;

use super::{blocking, current_stat, record, Alongside, Context, How, Job, Outcome};
use crate::alongside::{self, Decision, COMPARE_LIMIT};
use crate::destination::{
    Destination, DestinationError, Fetched, LocalContent, ObjectInfo, Precondition,
};
use crate::file_hash::read_at;
use crate::key::{is_side_key, object_key, side_key, writer_id};
use crate::ledger::Record;
use crate::local_file::FileStat;
use crate::{Error, Result};

/// How often a write that lost a race with Airflow's own upload looks again.
const RACE_ATTEMPTS: u32 = 4;

/// Ships by `alongside`'s rule; `None` when the log or the object is too large to compare,
/// and the sole-writer rule applies.
pub(super) async fn ship_alongside<D: Destination>(
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
    let dest = &*ctx.destination;
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
pub(super) async fn gone<D: Destination>(ctx: &Context<D>, job: &Job) -> Result<Outcome> {
    let dest = &*ctx.destination;
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
pub(super) fn nothing() -> ObjectInfo {
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
