//! A log file under a source root: its stat, and opening (or removing) it without ever
//! following a symlink. Reading it for upload is `file_hash`'s.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::fstatat;
use nix::unistd::{unlinkat, UnlinkatFlags};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file_hash::{read_at, sha256_prefix};
    use sha2::{Digest, Sha256};
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
