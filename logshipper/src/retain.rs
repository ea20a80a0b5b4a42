//! `--delete-after`: removing local logs once they are safely at the destination, in place of
//! Airflow's log-groomer.
//!
//! A file is removed only if its ledger record, which is written after the object was
//! verified (size and SHA-256), was for this destination, still matches the file's size and
//! mtime, and its SHA-256 still matches the bytes on disk when read again just before removal;
//! and only if it has not been modified for the retention age. Nothing else is ever removed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::discover::Source;
use crate::file_hash::sha256_prefix;
use crate::key::is_side_key;
use crate::ledger::{Ledger, Record};
use crate::local_file::{open_beneath, remove_beneath, FileStat, OpenError};
use crate::{Error, Result};

/// Whether the ledger says a file that looks like `stat` may go: shipped as these very bytes
/// to `destination`, and unmodified for `delete_after`.
pub fn expired(
    record: &Record,
    stat: FileStat,
    destination: &str,
    wall_now: SystemTime,
    delete_after: Duration,
) -> bool {
    let now_ns = wall_now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let age = Duration::from_nanos(now_ns.saturating_sub(stat.mtime_ns).max(0) as u64);
    // A log under its side key is not final yet: only a final one may go.
    record.covers(stat, destination) && !is_side_key(&record.key) && age >= delete_after
}

/// What one sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub files: u64,
    pub bytes: u64,
}

/// Removes the expired files of one source and forgets ledger records of files that are gone.
/// Blocking: reads files and the ledger.
pub fn sweep(
    ledger: &Ledger,
    source: &Source,
    destination: &str,
    delete_after: Duration,
) -> Result<Swept> {
    let mut swept = Swept::default();
    let wall_now = SystemTime::now();
    for (relative, record) in ledger.records(&source.id)? {
        let path = source.root.join(&relative);
        let stat = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => FileStat::of(&meta),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ledger.remove(&source.id, &relative)?;
                continue;
            }
            Err(_) => continue,
        };
        if !expired(&record, stat, destination, wall_now, delete_after) {
            continue;
        }
        if remove_verified(&source.root, &relative, &record)? {
            ledger.remove(&source.id, &relative)?;
            tracing::info!(file = %path.display(), key = %record.key, "removed after shipping");
            swept.files += 1;
            swept.bytes += stat.size;
        }
    }
    Ok(swept)
}

/// [`sweep`] over several sources, each with the destination its logs go to; a failing
/// source is logged and the others still swept. Returns the files removed.
pub fn sweep_all(
    ledger: &Ledger,
    sources: &[(Arc<Source>, String)],
    delete_after: Duration,
) -> u64 {
    let mut files = 0;
    for (source, destination) in sources {
        match sweep(ledger, source, destination, delete_after) {
            Ok(swept) => files += swept.files,
            Err(e) => {
                tracing::warn!(source = %source.root.display(), error = %e, "retention sweep failed")
            }
        }
    }
    files
}

/// Reads the file once more and removes it only if it still is the recorded bytes.
fn remove_verified(root: &Path, relative: &str, record: &Record) -> Result<bool> {
    let path = root.join(relative);
    let read_error = |source| Error::Read {
        path: path.clone(),
        source,
    };
    let (file, stat) = match open_beneath(root, relative) {
        Ok(opened) => opened,
        Err(OpenError::Io(source)) => return Err(read_error(source)),
        Err(_) => return Ok(false),
    };
    if stat != record.stat || sha256_prefix(&file, stat.size).map_err(read_error)? != record.sha256
    {
        tracing::warn!(file = %path.display(), "differs from what was shipped; keeping it");
        return Ok(false);
    }
    match remove_beneath(root, relative, &file) {
        Ok(removed) => Ok(removed),
        Err(OpenError::Io(source)) => Err(Error::Delete { path, source }),
        Err(e) => Err(Error::Delete {
            path,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const DEST: &str = "file:///archive";
    const DAY: Duration = Duration::from_secs(86_400);

    fn record(stat: FileStat, sha256: String) -> Record {
        Record {
            stat,
            sha256,
            destination: DEST.into(),
            key: "k".into(),
            etag: None,
            version_id: None,
            shipped_at_ms: 0,
            part_sha256: None,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn expiry_needs_the_same_file_and_the_age() {
        let stat = FileStat {
            size: 3,
            mtime_ns: 1_000 * 1_000_000_000,
        };
        let r = record(stat, "x".into());
        assert!(expired(&r, stat, DEST, at(1_000) + DAY, DAY));
        assert!(!expired(
            &r,
            stat,
            DEST,
            at(1_000) + DAY - Duration::from_secs(1),
            DAY
        ));
        assert!(!expired(
            &r,
            FileStat { size: 4, ..stat },
            DEST,
            at(1_000) + DAY,
            DAY
        ));
        assert!(!expired(&r, stat, "s3://other", at(1_000) + DAY, DAY));
    }

    #[test]
    fn sweeps_only_verified_expired_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("logs");
        std::fs::create_dir_all(&root).unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        let source = Source::new(&root).unwrap();
        let put = |name: &str, bytes: &[u8], recorded: &[u8]| {
            std::fs::write(root.join(name), bytes).unwrap();
            let stat = FileStat::of(&std::fs::metadata(root.join(name)).unwrap());
            let rec = record(stat, hex::encode(Sha256::digest(recorded)));
            ledger.put_all(&[(&source.id, name, &rec)]).unwrap();
        };
        put("shipped.log", b"abc", b"abc");
        put("tampered.log", b"abd", b"abc");
        std::fs::write(root.join("unshipped.log"), b"zzz").unwrap();
        put("vanished.log", b"v", b"v");
        std::fs::remove_file(root.join("vanished.log")).unwrap();

        let swept = sweep(&ledger, &source, DEST, Duration::ZERO).unwrap();
        assert_eq!(swept, Swept { files: 1, bytes: 3 });
        assert!(!root.join("shipped.log").exists());
        assert!(root.join("tampered.log").exists());
        assert!(root.join("unshipped.log").exists());
        let left: Vec<String> = ledger
            .records(&source.id)
            .unwrap()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert_eq!(left, vec!["tampered.log".to_string()]);

        // Young files stay whatever the ledger says.
        put("young.log", b"y", b"y");
        let swept = sweep(&ledger, &source, DEST, DAY).unwrap();
        assert_eq!(swept.files, 0);
        assert!(root.join("young.log").exists());
        // Another destination's record never removes anything.
        let swept = sweep(&ledger, &source, "s3://elsewhere", Duration::ZERO).unwrap();
        assert_eq!(swept.files, 0);
    }
}
