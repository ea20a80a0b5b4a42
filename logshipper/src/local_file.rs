//! A log file under a source root: its stat, opened without following symlinks, hashed.

use std::cell::Cell;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc::sync_channel;

use bytes::Bytes;
use crc_fast::CrcAlgorithm;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::fstatat;
use nix::unistd::{unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};

/// Read size when hashing or copying.
const CHUNK: usize = 1 << 20;

/// What a file looks like from outside: enough to tell that it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileStat {
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl FileStat {
    pub fn of(meta: &Metadata) -> Self {
        Self::new(meta.len(), meta.mtime(), meta.mtime_nsec())
    }

    /// The same from a raw `fstatat`.
    pub fn of_raw(raw: &nix::sys::stat::FileStat) -> Self {
        Self::new(raw.st_size as u64, raw.st_mtime, raw.st_mtime_nsec)
    }

    fn new(size: u64, mtime_s: i64, mtime_nsec: i64) -> Self {
        Self {
            size,
            mtime_ns: mtime_s.saturating_mul(1_000_000_000) + mtime_nsec,
        }
    }
}

/// Why a file could not be opened for shipping.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("gone")]
    Gone,
    #[error("a symlink is on the way; symlinks are never followed")]
    Symlink,
    #[error("not a regular file")]
    NotRegular,
    #[error("permission denied; give the shipper read access")]
    Unreadable,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Opens `relative` under `root` for reading: no symlink is followed on the way and the
/// resolution never leaves the root, so a log directory cannot point the shipper at
/// `/etc/passwd` even by swapping a directory for a link between walk and open.
pub fn open_beneath(root: &Path, relative: &str) -> Result<(File, FileStat), OpenError> {
    // O_NONBLOCK: opening a FIFO someone swapped in must not hang the shipper.
    let file = open_at(root, relative, OFlag::O_NONBLOCK)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(OpenError::NotRegular);
    }
    Ok((file, FileStat::of(&meta)))
}

/// Removes `relative` under `root` if the name still refers to `expected` (same device and
/// inode), so what is removed is exactly what was checked. Returns whether it was removed.
pub fn remove_beneath(root: &Path, relative: &str, expected: &File) -> Result<bool, OpenError> {
    let (dir, name) = relative.rsplit_once('/').unwrap_or((".", relative));
    let dir = open_at(root, dir, OFlag::O_DIRECTORY)?;
    let expected = expected.metadata()?;
    let now = match fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(now) => now,
        Err(errno) => return Err(open_error(io::Error::from(errno), errno)),
    };
    if now.st_dev != expected.dev() || now.st_ino != expected.ino() {
        return Ok(false);
    }
    unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir)
        .map_err(|errno| open_error(io::Error::from(errno), errno))?;
    Ok(true)
}

fn open_at(root: &Path, relative: &str, extra: OFlag) -> Result<File, OpenError> {
    let dir = File::open(root).map_err(|e| open_error(e, Errno::UnknownErrno))?;
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | extra;
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(dir.as_fd(), relative, how) {
        Ok(fd) => Ok(File::from(fd)),
        // Kernels before 5.6 (or a seccomp profile without openat2).
        Err(Errno::ENOSYS) => open_by_components(dir, relative, flags),
        Err(errno) => Err(open_error(io::Error::from(errno), errno)),
    }
}

/// What `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` does, one directory at a time:
/// every component is opened with `O_NOFOLLOW` relative to the one before, so no symlink is
/// followed anywhere on the path, and `..` is refused.
fn open_by_components(root: File, relative: &str, flags: OFlag) -> Result<File, OpenError> {
    let parts: Vec<&str> = relative
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Ok(root);
    };
    let step = |dir: &File, name: &str, flags: OFlag| -> Result<File, OpenError> {
        if name == ".." {
            return Err(OpenError::Symlink);
        }
        match nix::fcntl::openat(dir.as_fd(), name, flags, nix::sys::stat::Mode::empty()) {
            Ok(fd) => Ok(File::from(fd)),
            // A link where a directory must be fails as "not a directory": say what it is.
            Err(Errno::ENOTDIR) if is_symlink_at(dir, name) => Err(OpenError::Symlink),
            Err(errno) => Err(open_error(io::Error::from(errno), errno)),
        }
    };
    let dir_flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY;
    let mut dir = root;
    for name in dirs {
        dir = step(&dir, name, dir_flags)?;
    }
    step(&dir, last, flags)
}

fn is_symlink_at(dir: &File, name: &str) -> bool {
    use nix::sys::stat::SFlag;
    fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits())
}

fn open_error(err: io::Error, errno: Errno) -> OpenError {
    let raw = err.raw_os_error().map(Errno::from_raw).unwrap_or(errno);
    match raw {
        Errno::ENOENT | Errno::ENOTDIR => OpenError::Gone,
        Errno::ELOOP | Errno::EXDEV => OpenError::Symlink,
        Errno::EACCES | Errno::EPERM => OpenError::Unreadable,
        _ => OpenError::Io(err),
    }
}

/// Lowercase hex SHA-256 of the first `len` bytes of `file`; fails if it is shorter.
pub fn sha256_prefix(file: &File, len: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    copy_prefix(file, len, |chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    Ok(hex::encode(hasher.finalize()))
}

/// What one read of a file to be shipped yields besides its SHA-256 (hex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Extra {
    Nothing,
    /// The bytes themselves, for a file small enough to send from memory.
    Data(Bytes),
    /// The CRC-64/NVME of each part, for a file sent in parts.
    Parts(Parts),
}

/// A file cut into parts of `size` bytes (the last may be shorter) and each part's
/// CRC-64/NVME, the checksum S3 verifies per part; computed in the read that hashes the
/// file, so sending the parts later needs a read but no hashing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    pub size: u64,
    pub crc64: Vec<u64>,
}

/// SHA-256 (hex) of the first `len` bytes, and in the same read either those bytes (when
/// `len` is below `limit`) or their part checksums (when `part_size` is given).
pub fn hash_for_upload(
    file: &File,
    len: u64,
    limit: u64,
    part_size: Option<u64>,
) -> io::Result<(String, Extra)> {
    if len < limit {
        let data = read_at(file, 0, len as usize)?;
        return Ok((
            hex::encode(Sha256::digest(&data)),
            Extra::Data(Bytes::from(data)),
        ));
    }
    let Some(part_size) = part_size.filter(|&size| size > 0) else {
        return Ok((sha256_prefix(file, len)?, Extra::Nothing));
    };
    let (sha, parts) = hash_in_parts(file, len, part_size, |_| {})?;
    Ok((sha, Extra::Parts(parts)))
}

/// SHA-256 (hex) of the first `len` bytes and, in the same read, the CRC-64/NVME of each
/// part of `part_size` bytes, handed to `on_part` as soon as the part is read, so the part
/// can be sent while the rest is still being hashed.
pub fn hash_in_parts(
    file: &File,
    len: u64,
    part_size: u64,
    mut on_part: impl FnMut(u64),
) -> io::Result<(String, Parts)> {
    let mut sha = Sha256::new();
    let mut crc = crc_fast::Digest::new(CrcAlgorithm::Crc64Nvme);
    let mut crc64 = Vec::with_capacity(len.div_ceil(part_size) as usize);
    let mut left = part_size;
    copy_prefix(file, len, |mut chunk| {
        sha.update(chunk);
        while !chunk.is_empty() {
            let n = chunk.len().min(left as usize);
            crc.update(&chunk[..n]);
            chunk = &chunk[n..];
            left -= n as u64;
            if left == 0 {
                crc64.push(crc.finalize_reset());
                on_part(crc64[crc64.len() - 1]);
                left = part_size;
            }
        }
        Ok(())
    })?;
    if left != part_size || crc64.is_empty() {
        crc64.push(crc.finalize());
        on_part(crc64[crc64.len() - 1]);
    }
    let parts = Parts {
        size: part_size,
        crc64,
    };
    Ok((hex::encode(sha.finalize()), parts))
}

/// Feeds the first `len` bytes of `file` to `sink` in chunks, reading by offset so several
/// readers can share one open file. A large file is read one chunk ahead on a second
/// thread, so copying from the page cache and hashing overlap (BENCHMARKS.md, S2).
pub fn copy_prefix(
    file: &File,
    len: u64,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    if len <= 2 * CHUNK as u64 {
        let spare = Cell::new(Some(vec![0; CHUNK.min(len as usize).max(1)]));
        return read_chunks(
            file,
            len,
            || spare.take(),
            |chunk, n| {
                sink(&chunk[..n])?;
                spare.set(Some(chunk));
                Ok(true)
            },
        );
    }
    std::thread::scope(|scope| {
        let (full, filled) = sync_channel::<io::Result<(Vec<u8>, usize)>>(READ_AHEAD);
        let (free, empty) = sync_channel::<Vec<u8>>(READ_AHEAD + 1);
        for _ in 0..=READ_AHEAD {
            free.send(vec![0; CHUNK]).expect("room for every buffer");
        }
        scope.spawn(move || {
            let done = read_chunks(
                file,
                len,
                || empty.recv().ok(),
                |chunk, n| Ok(full.send(Ok((chunk, n))).is_ok()),
            );
            if let Err(e) = done {
                let _ = full.send(Err(e));
            }
        });
        // Ends when the reader is done or failed; returning early drops both channels, which
        // stops the reader.
        while let Ok(read) = filled.recv() {
            let (chunk, n) = read?;
            sink(&chunk[..n])?;
            let _ = free.send(chunk);
        }
        Ok(())
    })
}

/// Chunks read ahead of the sink for a large file.
const READ_AHEAD: usize = 2;

/// Reads `len` bytes into buffers from `next` and hands each to `put` with its length,
/// stopping early when either gives up (no buffer, or `false`).
fn read_chunks(
    file: &File,
    len: u64,
    mut next: impl FnMut() -> Option<Vec<u8>>,
    mut put: impl FnMut(Vec<u8>, usize) -> io::Result<bool>,
) -> io::Result<()> {
    let mut offset = 0;
    while offset < len {
        let Some(mut buf) = next() else {
            return Ok(());
        };
        let want = buf.len().min((len - offset) as usize);
        let n = file.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(shorter(len, offset));
        }
        offset += n as u64;
        if !put(buf, n)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads exactly `len` bytes at `offset`.
pub fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => shorter(offset + len as u64, offset),
            _ => e,
        })?;
    Ok(buf)
}

fn shorter(expected: u64, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("file shrank while being read: expected {expected} bytes, found about {got}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/attempt=1.log"), b"hello\n").unwrap();
        dir
    }

    #[test]
    fn opens_a_regular_file_beneath_the_root() {
        let dir = tree();
        let (file, stat) = open_beneath(dir.path(), "a/b/attempt=1.log").unwrap();
        assert_eq!(stat.size, 6);
        assert_eq!(
            sha256_prefix(&file, 6).unwrap(),
            hex::encode(Sha256::digest(b"hello\n"))
        );
        assert_eq!(
            sha256_prefix(&file, 0).unwrap(),
            hex::encode(Sha256::digest(b""))
        );
        assert_eq!(read_at(&file, 1, 3).unwrap(), b"ell");
    }

    #[test]
    fn refuses_symlinks_anywhere_on_the_way() {
        let dir = tree();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("a/b/attempt=2.log")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a/b"), dir.path().join("a/link")).unwrap();
        assert!(matches!(
            open_beneath(dir.path(), "a/b/attempt=2.log"),
            Err(OpenError::Symlink)
        ));
        assert!(matches!(
            open_beneath(dir.path(), "a/link/attempt=1.log"),
            Err(OpenError::Symlink)
        ));
    }

    #[test]
    fn without_openat2_each_component_is_opened_without_following_links() {
        let dir = tree();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("a/b/attempt=2.log")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a/b"), dir.path().join("a/link")).unwrap();
        let open = |relative: &str| {
            let root = File::open(dir.path()).unwrap();
            open_by_components(root, relative, OFlag::O_RDONLY | OFlag::O_NOFOLLOW)
        };
        let mut file = open("a/b/attempt=1.log").unwrap();
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text).unwrap();
        assert_eq!(text, "hello\n");
        assert!(matches!(open("a/b/attempt=2.log"), Err(OpenError::Symlink)));
        assert!(matches!(
            open("a/link/attempt=1.log"),
            Err(OpenError::Symlink)
        ));
        assert!(matches!(
            open("a/../a/b/attempt=1.log"),
            Err(OpenError::Symlink)
        ));
        assert!(matches!(open("a/b/attempt=9.log"), Err(OpenError::Gone)));
    }

    #[test]
    fn never_leaves_the_root() {
        let dir = tree();
        assert!(open_beneath(&dir.path().join("a"), "../a/b/attempt=1.log").is_err());
        assert!(open_beneath(dir.path(), "/etc/passwd").is_err());
    }

    #[test]
    fn reports_missing_and_special_files() {
        let dir = tree();
        assert!(matches!(
            open_beneath(dir.path(), "a/b/attempt=9.log"),
            Err(OpenError::Gone)
        ));
        assert!(matches!(
            open_beneath(dir.path(), "a/b"),
            Err(OpenError::NotRegular)
        ));
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(
            open_beneath(dir.path(), "fifo"),
            Err(OpenError::NotRegular)
        ));
    }

    #[test]
    fn removes_only_the_file_that_was_checked() {
        let dir = tree();
        let (checked, _) = open_beneath(dir.path(), "a/b/attempt=1.log").unwrap();
        // Replaced under the same name after the check: left alone.
        std::fs::remove_file(dir.path().join("a/b/attempt=1.log")).unwrap();
        std::fs::write(dir.path().join("a/b/attempt=1.log"), b"new").unwrap();
        assert!(!remove_beneath(dir.path(), "a/b/attempt=1.log", &checked).unwrap());
        assert!(dir.path().join("a/b/attempt=1.log").exists());
        let (checked, _) = open_beneath(dir.path(), "a/b/attempt=1.log").unwrap();
        assert!(remove_beneath(dir.path(), "a/b/attempt=1.log", &checked).unwrap());
        assert!(!dir.path().join("a/b/attempt=1.log").exists());
        std::fs::write(dir.path().join("top.log"), b"t").unwrap();
        let (top, _) = open_beneath(dir.path(), "top.log").unwrap();
        assert!(remove_beneath(dir.path(), "top.log", &top).unwrap());
    }

    #[test]
    fn one_read_gives_the_hash_and_either_the_bytes_or_the_part_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..2500u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("log"), &bytes).unwrap();
        let (file, _) = open_beneath(dir.path(), "log").unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let crc = |b: &[u8]| crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b);

        let small = hash_for_upload(&file, 2500, 4096, None).unwrap();
        assert_eq!(
            small,
            (sha.clone(), Extra::Data(Bytes::from(bytes.clone())))
        );
        let whole = hash_for_upload(&file, 2500, 1000, None).unwrap();
        assert_eq!(whole, (sha.clone(), Extra::Nothing));

        // 1000-byte parts: two whole ones and a short last one, cut across read chunks.
        let (hashed, extra) = hash_for_upload(&file, 2500, 1000, Some(1000)).unwrap();
        assert_eq!(hashed, sha);
        let expected = vec![
            crc(&bytes[..1000]),
            crc(&bytes[1000..2000]),
            crc(&bytes[2000..]),
        ];
        assert_eq!(
            extra,
            Extra::Parts(Parts {
                size: 1000,
                crc64: expected
            })
        );
        // An exact multiple has no empty last part; an empty file has one empty part.
        let (_, extra) = hash_for_upload(&file, 2000, 1000, Some(1000)).unwrap();
        assert!(matches!(extra, Extra::Parts(p) if p.crc64.len() == 2));
        let (_, extra) = hash_for_upload(&file, 0, 0, Some(1000)).unwrap();
        assert_eq!(
            extra,
            Extra::Parts(Parts {
                size: 1000,
                crc64: vec![crc(b"")]
            })
        );
    }

    #[test]
    fn large_files_are_read_ahead_in_order_and_errors_stop_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(5 * CHUNK + 3) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::write(dir.path().join("big"), &bytes).unwrap();
        let (file, _) = open_beneath(dir.path(), "big").unwrap();
        let len = bytes.len() as u64;
        assert_eq!(
            sha256_prefix(&file, len).unwrap(),
            hex::encode(Sha256::digest(&bytes))
        );
        let mut seen = 0;
        let stopped = copy_prefix(&file, len, |chunk| {
            seen += chunk.len();
            Err(io::Error::other("sink full"))
        });
        assert_eq!(stopped.unwrap_err().to_string(), "sink full");
        assert_eq!(seen, CHUNK);
        let short = sha256_prefix(&file, len + 1).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn hashing_more_than_the_file_holds_fails() {
        let dir = tree();
        let (file, _) = open_beneath(dir.path(), "a/b/attempt=1.log").unwrap();
        assert!(sha256_prefix(&file, 7).is_err());
        assert!(read_at(&file, 4, 3).is_err());
    }

    #[test]
    fn stat_tracks_appends() {
        let dir = tree();
        let path = dir.path().join("a/b/attempt=1.log");
        let before = FileStat::of(&std::fs::metadata(&path).unwrap());
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        let after = FileStat::of(&std::fs::metadata(&path).unwrap());
        assert_eq!(after.size, 10);
        assert_ne!(before, after);
    }
}
