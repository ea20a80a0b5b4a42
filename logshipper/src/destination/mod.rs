//! Where logs go: an S3 bucket (AWS or MinIO) or a directory, behind one trait.

pub mod file;
pub mod s3;
mod url;

use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::file_hash::{Extra, Parts};

pub use url::{DestinationUrl, Place, UrlError};

/// Metadata key holding the SHA-256 (hex) of an object we wrote, so `head` can compare
/// contents without downloading (sent as `x-amz-meta-localship-sha256`).
pub const SHA256_METADATA: &str = "localship-sha256";

/// What the destination holds under a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// Known when we wrote the object, or when reading it back is cheap.
    pub sha256: Option<String>,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    /// The destination itself confirmed that it stored bytes of this size and SHA-256 (it
    /// checked the checksum sent with them), so reading them back adds nothing.
    pub confirmed: bool,
}

/// An object read back whole, or only described when it is larger than asked for.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub info: ObjectInfo,
    /// `None` when the object is larger than the limit it was read with.
    pub data: Option<Bytes>,
}

/// When a write of bytes may go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    Always,
    /// Nothing is stored under the key.
    Absent,
    /// The key still holds the object read before (same ETag, or same SHA-256 where the
    /// store has no ETags).
    Unchanged(ObjectInfo),
}

/// Bytes to write: the first `size` bytes of an already opened file (never reopened by path,
/// so a symlink swapped in meanwhile is not followed) and their SHA-256.
#[derive(Clone, Debug)]
pub struct LocalContent {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// The same bytes, when the file was small enough to be read into memory once; they are
    /// the bytes `sha256` was computed from, so writing them needs no second read or hash.
    pub data: Option<Bytes>,
    /// Part checksums from the same read, when the file goes in parts.
    pub parts: Option<Parts>,
}

impl LocalContent {
    /// The content of `size` bytes of `file`, with what the read that hashed them yielded.
    pub fn new(file: Arc<File>, path: PathBuf, size: u64, sha256: String, extra: Extra) -> Self {
        let (data, parts) = match extra {
            Extra::Nothing => (None, None),
            Extra::Data(data) => (Some(data), None),
            Extra::Parts(parts) => (None, Some(parts)),
        };
        Self {
            file,
            path,
            size,
            sha256,
            data,
            parts,
        }
    }
}

/// An object store. Objects appear whole under their key or not at all.
pub trait Destination: Send + Sync + 'static {
    /// Names the destination in the ledger and in logs, e.g. `s3://airflow/logs`.
    fn id(&self) -> &str;

    /// Key prefix every object goes under, normalised (may be empty).
    fn prefix(&self) -> &str;

    /// Start-up check that objects can be listed and written.
    fn check(&self) -> impl Future<Output = Result<(), DestinationError>> + Send;

    fn head(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObjectInfo>, DestinationError>> + Send;

    /// SHA-256 (hex) of the object's first `len` bytes, read back from the destination.
    fn sha256_prefix(
        &self,
        key: &str,
        len: u64,
    ) -> impl Future<Output = Result<String, DestinationError>> + Send;

    fn put(
        &self,
        key: &str,
        content: &LocalContent,
    ) -> impl Future<Output = Result<ObjectInfo, DestinationError>> + Send;

    /// Writes the content only if nothing is stored under `key`; `None` when something is,
    /// and then nothing was written. Stores with conditional writes do this in one request;
    /// the default asks first.
    fn create(
        &self,
        key: &str,
        content: &LocalContent,
    ) -> impl Future<Output = Result<Option<ObjectInfo>, DestinationError>> + Send {
        async move {
            if self.head(key).await?.is_some() {
                return Ok(None);
            }
            self.put(key, content).await.map(Some)
        }
    }

    /// Writes a file not hashed yet, hashing it on the way, if nothing is stored under
    /// `key` and this destination does so for a file of `size` bytes (the S3 store, for one
    /// sent in parts). Otherwise the caller hashes the file first and goes the usual way.
    fn create_hashing(
        &self,
        _key: &str,
        _file: Arc<File>,
        _path: PathBuf,
        _size: u64,
    ) -> impl Future<Output = Result<WhileHashing, DestinationError>> + Send {
        async { Ok(WhileHashing::NotHere) }
    }

    /// The object under `key`, its bytes included when it has at most `limit` of them.
    fn get(
        &self,
        key: &str,
        limit: u64,
    ) -> impl Future<Output = Result<Option<Fetched>, DestinationError>> + Send;

    /// Writes `data` under `key` if `when` holds; `None` when it did not, and then nothing
    /// was written.
    fn put_bytes(
        &self,
        key: &str,
        data: Bytes,
        when: Precondition,
    ) -> impl Future<Output = Result<Option<ObjectInfo>, DestinationError>> + Send;

    /// Removes the object under `key`; nothing there is no error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), DestinationError>> + Send;

    /// The longest object key the store takes, in bytes, if it has a limit.
    fn max_key_bytes(&self) -> Option<usize> {
        None
    }

    /// Files smaller than this are read into memory once, hashed and written from there.
    fn in_memory_limit(&self) -> u64 {
        0
    }

    /// Size of the parts a file of `size` bytes is sent in, if it is sent in parts; their
    /// checksums are then computed in the read that hashes the file.
    fn part_size(&self, _size: u64) -> Option<u64> {
        None
    }
}

/// What `create_hashing` did.
#[derive(Debug)]
pub enum WhileHashing {
    /// Written: the content as hashed on the way, and what was stored.
    Sent(LocalContent, ObjectInfo),
    /// Nothing written: the key already holds this object.
    Taken(ObjectInfo),
    /// Nothing written: this destination does not write this file while hashing it.
    NotHere,
}

/// Why shipping to the destination failed.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("bucket `{bucket}` does not exist at {endpoint} — create it or pass --create-bucket")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error(
        "{endpoint} does not accept the credentials ({code}) — check AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the web identity role"
    )]
    BadCredentials { endpoint: String, code: String },
    #[error(
        "access denied to bucket `{bucket}` at {endpoint} ({operation}) — grant s3:ListBucket \
         on the bucket and s3:GetObject, s3:PutObject and s3:DeleteObject under the prefix"
    )]
    AccessDenied {
        bucket: String,
        endpoint: String,
        operation: &'static str,
    },
    #[error("{endpoint} refused {operation} of `{key}`: {code} (HTTP {status}): {message}")]
    Refused {
        endpoint: String,
        operation: &'static str,
        key: String,
        code: String,
        status: u16,
        message: String,
    },
    #[error(
        "no AWS credentials found — set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
         AWS_PROFILE, or a web identity token ({detail})"
    )]
    NoCredentials { detail: String },
    #[error("cannot reach {endpoint}: {detail} — check --s3-endpoint and that the service is up")]
    Unreachable { endpoint: String, detail: String },
    #[error("`{}` changed while being shipped; it ships again once it settles", path.display())]
    FileChanged { path: PathBuf },
    #[error("`{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{key}` does not hold the file after upload: expected {expected}, found {found}")]
    Unverified {
        key: String,
        expected: String,
        found: String,
    },
    #[error("`{key}` already holds other bytes than the file with the same SHA-256 prefix")]
    ConflictTaken { key: String },
    #[error("`{key}` kept changing while we wrote it (Airflow's own upload at the same time); trying again")]
    Raced { key: String },
}

impl DestinationError {
    /// We could not ask: nothing is wrong with this file, the destination is away.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, DestinationError::Unreachable { .. })
    }

    /// The store refused this object for good: asking again cannot succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            DestinationError::Refused { code, .. } => PERMANENT_CODES.contains(&code.as_str()),
            DestinationError::Io { source, .. } => {
                source.raw_os_error() == Some(nix::libc::ENAMETOOLONG)
            }
            _ => false,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            DestinationError::NoSuchBucket { .. } => "no_such_bucket",
            DestinationError::BadCredentials { .. } | DestinationError::NoCredentials { .. } => {
                "credentials"
            }
            DestinationError::AccessDenied { .. } => "access_denied",
            DestinationError::Refused { .. } => "refused",
            DestinationError::Unreachable { .. } => "unreachable",
            DestinationError::FileChanged { .. } => "file_changed",
            DestinationError::Io { .. } => "io",
            DestinationError::Unverified { .. } => "unverified",
            DestinationError::ConflictTaken { .. } => "conflict_taken",
            DestinationError::Raced { .. } => "raced",
        }
    }
}

/// Error codes with which a store refuses an object whatever is tried again: S3's, and
/// MinIO's for a path segment over 255 bytes or a name it cannot store.
const PERMANENT_CODES: &[&str] = &[
    "KeyTooLongError",
    "InvalidObjectName",
    "XMinioInvalidObjectName",
    "XMinioObjectNameTooLong",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_fix() {
        let err = DestinationError::NoSuchBucket {
            bucket: "airflow".into(),
            endpoint: "http://127.0.0.1:9000".into(),
        };
        assert_eq!(
            err.to_string(),
            "bucket `airflow` does not exist at http://127.0.0.1:9000 — create it or pass --create-bucket"
        );
        assert!(!err.is_unreachable());
        let err = DestinationError::Unreachable {
            endpoint: "http://127.0.0.1:1".into(),
            detail: "connection refused".into(),
        };
        assert!(err.is_unreachable());
        assert!(err.to_string().contains("--s3-endpoint"));
    }
}
