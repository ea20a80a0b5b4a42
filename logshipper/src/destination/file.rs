//! `file:///dir`: the same layout as in a bucket, under a local or mounted directory.
//!
//! Each object is written to a hidden temporary file beside its final name, synced, renamed
//! into place and its directory synced, so a crash leaves either the old object or the new
//! one under the key, never half a file.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use bytes::Bytes;

use super::{Destination, DestinationError, Fetched, LocalContent, ObjectInfo, Precondition};
use crate::file_hash::{copy_prefix, sha256_prefix};

/// Mode of shipped files: readable by whoever reads the archive.
const OBJECT_MODE: u32 = 0o644;

pub struct FileDestination {
    root: PathBuf,
    id: String,
}

impl FileDestination {
    /// A relative `dir` is taken from the working directory.
    pub fn new(dir: &Path) -> Result<Self, DestinationError> {
        let root = if dir.is_absolute() {
            dir.to_owned()
        } else {
            let cwd = std::env::current_dir().map_err(|source| DestinationError::Io {
                path: dir.to_owned(),
                source,
            })?;
            cwd.join(dir)
        };
        let root: PathBuf = root.components().collect();
        let id = format!("file://{}", root.display());
        Ok(Self { root, id })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

impl Destination for FileDestination {
    fn id(&self) -> &str {
        &self.id
    }

    fn prefix(&self) -> &str {
        ""
    }

    async fn check(&self) -> Result<(), DestinationError> {
        let root = self.root.clone();
        blocking(&self.root, move || {
            std::fs::create_dir_all(&root)?;
            // Proves we may write here before the first log waits on it.
            tempfile::Builder::new()
                .prefix(".localship-check.")
                .tempfile_in(&root)?;
            Ok(())
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, DestinationError> {
        let path = self.path_of(key);
        blocking(&path.clone(), move || {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if !meta.is_file() {
                return Err(io::Error::other(
                    "not a regular file; move it out of the way",
                ));
            }
            let sha256 = sha256_prefix(&File::open(&path)?, meta.len())?;
            Ok(Some(ObjectInfo {
                size: meta.len(),
                sha256: Some(sha256),
                etag: None,
                version_id: None,
                confirmed: false,
            }))
        })
        .await
    }

    async fn sha256_prefix(&self, key: &str, len: u64) -> Result<String, DestinationError> {
        let path = self.path_of(key);
        blocking(&path.clone(), move || {
            sha256_prefix(&File::open(&path)?, len)
        })
        .await
    }

    async fn put(&self, key: &str, content: &LocalContent) -> Result<ObjectInfo, DestinationError> {
        let target = self.path_of(key);
        let content = content.clone();
        let written =
            blocking(&target.clone(), move || write_atomically(&target, &content)).await?;
        written.ok_or_else(|| DestinationError::FileChanged {
            path: self.path_of(key),
        })
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Option<Fetched>, DestinationError> {
        let Some(info) = self.head(key).await? else {
            return Ok(None);
        };
        let data = if info.size <= limit {
            let path = self.path_of(key);
            let data = blocking(&path.clone(), move || std::fs::read(&path)).await?;
            // Changed since `head`: what was read is what the next check compares.
            Some(Bytes::from(data))
        } else {
            None
        };
        let info = match &data {
            Some(data) => ObjectInfo {
                size: data.len() as u64,
                sha256: Some(hex::encode(Sha256::digest(data))),
                ..info
            },
            None => info,
        };
        Ok(Some(Fetched { info, data }))
    }

    async fn put_bytes(
        &self,
        key: &str,
        data: Bytes,
        when: Precondition,
    ) -> Result<Option<ObjectInfo>, DestinationError> {
        // One writer per directory archive: the check and the write are not one step here.
        let current = self.head(key).await?;
        let holds = match (&when, &current) {
            (Precondition::Always, _) | (Precondition::Absent, None) => true,
            (Precondition::Unchanged(read), Some(now)) => {
                read.size == now.size && read.sha256 == now.sha256
            }
            _ => false,
        };
        if !holds {
            return Ok(None);
        }
        let target = self.path_of(key);
        let info = object_info(data.len() as u64, hex::encode(Sha256::digest(&data)));
        blocking(&target.clone(), move || {
            persist(&target, |tmp| tmp.write_all(&data).map(|()| true))
        })
        .await?;
        Ok(Some(info))
    }

    async fn delete(&self, key: &str) -> Result<(), DestinationError> {
        let path = self.path_of(key);
        blocking(&path.clone(), move || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
    }
}

/// Copies the content to `target` through a temporary file; `None` if the bytes read did not
/// hash to the expected SHA-256 (the file changed under us).
fn write_atomically(target: &Path, content: &LocalContent) -> io::Result<Option<ObjectInfo>> {
    let written = persist(target, |tmp| match &content.data {
        // These are the bytes that were hashed.
        Some(data) => tmp.write_all(data).map(|()| true),
        None => {
            let mut hasher = Sha256::new();
            copy_prefix(&content.file, content.size, |chunk| {
                hasher.update(chunk);
                tmp.write_all(chunk)
            })?;
            Ok(hex::encode(hasher.finalize()) == content.sha256)
        }
    })?;
    Ok(written.then(|| object_info(content.size, content.sha256.clone())))
}

/// Writes a temporary file beside `target` with `fill`, then, if `fill` says the bytes are
/// right, syncs it and renames it into place. Whether it did.
fn persist(target: &Path, fill: impl FnOnce(&mut File) -> io::Result<bool>) -> io::Result<bool> {
    let dir = target.parent().expect("an object path has a parent");
    std::fs::create_dir_all(dir)?;
    // A name of its own, not the object's: any name the filesystem allows (255 bytes) must fit.
    let mut tmp = tempfile::Builder::new()
        .prefix(".localship-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    if !fill(tmp.as_file_mut())? {
        return Ok(false);
    }
    tmp.as_file()
        .set_permissions(Permissions::from_mode(OBJECT_MODE))?;
    tmp.as_file().sync_all()?;
    tmp.persist(target).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()?;
    Ok(true)
}

fn object_info(size: u64, sha256: String) -> ObjectInfo {
    ObjectInfo {
        size,
        sha256: Some(sha256),
        etag: None,
        version_id: None,
        confirmed: false,
    }
}

async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, DestinationError> {
    let result = tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
    result.map_err(|source| DestinationError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn content(dir: &Path, bytes: &[u8]) -> LocalContent {
        let path = dir.join("source.log");
        std::fs::write(&path, bytes).unwrap();
        LocalContent {
            file: Arc::new(File::open(&path).unwrap()),
            path,
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
            data: None,
            parts: None,
        }
    }

    #[tokio::test]
    async fn an_object_named_as_long_as_the_filesystem_allows_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let dest = FileDestination::new(&dir.path().join("out")).unwrap();
        let name = format!("attempt=1.log.{}", "x".repeat(255 - 14));
        let key = format!("dag_id=a/{name}");
        let written = dest
            .put_bytes(&key, Bytes::from_static(b"long\n"), Precondition::Absent)
            .await
            .unwrap();
        assert!(written.is_some());
        assert_eq!(
            std::fs::read(dir.path().join("out").join(&key)).unwrap(),
            b"long\n"
        );
        let content = content(dir.path(), b"longer\n");
        dest.put(&key, &content).await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("out").join(&key)).unwrap(),
            b"longer\n"
        );
    }

    #[tokio::test]
    async fn put_then_head_round_trips() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = FileDestination::new(&out.path().join("archive")).unwrap();
        dest.check().await.unwrap();
        let key = "dag_id=a/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";
        assert_eq!(dest.head(key).await.unwrap(), None);
        let c = content(src.path(), b"line 1\nline 2\n");
        let put = dest.put(key, &c).await.unwrap();
        let head = dest.head(key).await.unwrap().unwrap();
        assert_eq!(put, head);
        assert_eq!(head.sha256.as_deref(), Some(c.sha256.as_str()));
        assert_eq!(
            std::fs::read(dest.root().join(key)).unwrap(),
            b"line 1\nline 2\n"
        );
        let prefix = dest.sha256_prefix(key, 7).await.unwrap();
        assert_eq!(prefix, hex::encode(Sha256::digest(b"line 1\n")));
        let leftovers: Vec<_> = std::fs::read_dir(dest.root().join(key).parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[tokio::test]
    async fn content_that_changed_is_not_written() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = FileDestination::new(out.path()).unwrap();
        let mut c = content(src.path(), b"abc");
        c.sha256 = hex::encode(Sha256::digest(b"abd"));
        let err = dest.put("k/attempt=1.log", &c).await.unwrap_err();
        assert!(matches!(err, DestinationError::FileChanged { .. }), "{err}");
        assert!(!out.path().join("k/attempt=1.log").exists());
        assert_eq!(std::fs::read_dir(out.path().join("k")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn unwritable_root_fails_the_check() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let dest = FileDestination::new(&file.path().join("below-a-file")).unwrap();
        assert!(matches!(
            dest.check().await,
            Err(DestinationError::Io { .. })
        ));
    }

    #[test]
    fn relative_dirs_are_made_absolute() {
        let dest = FileDestination::new(Path::new("./shipped-logs")).unwrap();
        assert!(dest.root().is_absolute());
        assert!(dest.id().starts_with("file:///"));
        assert!(dest.id().ends_with("/shipped-logs"), "{}", dest.id());
        assert!(!dest.id().contains("/./"));
    }
}
