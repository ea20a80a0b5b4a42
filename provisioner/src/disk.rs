//! The node's disks: free space, and making and removing volume directories
//! without ever following a symlink out of the base path.
//!
//! The base path is the administrator's and is opened as configured; every
//! component below it is opened with `O_NOFOLLOW`, and removal works on
//! directory descriptors (`openat`/`unlinkat`), so a symlink planted inside a
//! volume is unlinked, never followed, and a mount point inside a volume
//! stops the removal instead of emptying someone else's filesystem.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use thiserror::Error;

/// Deeper trees than this are refused rather than risk exhausting descriptors.
const MAX_DEPTH: usize = 256;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{path}: {op} failed: {errno}")]
    Io {
        path: PathBuf,
        op: &'static str,
        errno: Errno,
    },
    #[error("{path} is a symlink or not a directory; refusing to follow it")]
    NotADirectory { path: PathBuf },
    #[error("{path} is a mount point inside a volume; unmount it, then the volume is removed")]
    MountPoint { path: PathBuf },
    #[error("{path} is nested more than {MAX_DEPTH} levels deep; remove it by hand")]
    TooDeep { path: PathBuf },
}

/// Space on the filesystem holding a base path, as unprivileged users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub free: u64,
    pub total: u64,
}

pub fn space(path: &Path) -> Result<Space, DiskError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|errno| DiskError::Io {
        path: path.to_path_buf(),
        op: "statvfs",
        errno,
    })?;
    let unit = st.fragment_size() as u64;
    Ok(Space {
        free: st.blocks_available() as u64 * unit,
        total: st.blocks() as u64 * unit,
    })
}

/// The base path with the most free space that still leaves `reserve` bytes
/// after `need`; `None` if none fits.
pub fn choose(candidates: &[(PathBuf, Space)], need: u64, reserve: u64) -> Option<PathBuf> {
    candidates
        .iter()
        .filter(|(_, s)| s.free >= need.saturating_add(reserve))
        .max_by_key(|(_, s)| s.free)
        .map(|(p, _)| p.clone())
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(Errno) -> DiskError + 'a {
    move |errno| match errno {
        Errno::ELOOP | Errno::ENOTDIR => DiskError::NotADirectory {
            path: path.to_path_buf(),
        },
        errno => DiskError::Io {
            path: path.to_path_buf(),
            op,
            errno,
        },
    }
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn open_base(base: &Path) -> Result<OwnedFd, DiskError> {
    open(
        base,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io(base, "open base path"))
}

fn components(rel: &Path) -> impl Iterator<Item = &OsStr> {
    // paths::safe_relative only produces normal components; anything else
    // here is skipped rather than trusted.
    rel.components().filter_map(|c| match c {
        Component::Normal(s) => Some(s),
        _ => None,
    })
}

/// Creates `base/rel` (and `base` itself if missing) with `mode`, whatever
/// the umask, and returns its absolute path.
pub fn create_volume_dir(base: &Path, rel: &Path, mode: u32) -> Result<PathBuf, DiskError> {
    std::fs::create_dir_all(base).map_err(|e| DiskError::Io {
        path: base.to_path_buf(),
        op: "create base path",
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let mode = Mode::from_bits_truncate(mode);
    let mut fd = open_base(base)?;
    let mut path = base.to_path_buf();
    for name in components(rel) {
        path.push(name);
        match mkdirat(fd.as_fd(), name, mode) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(errno) => return Err(io(&path, "mkdir")(errno)),
        }
        fd = openat(fd.as_fd(), name, dir_flags(), Mode::empty()).map_err(io(&path, "open"))?;
    }
    fchmod(fd.as_fd(), mode).map_err(io(&path, "chmod"))?;
    Ok(path)
}

/// Whether `base/rel` exists as a real directory (no symlink on the way).
pub fn volume_dir_exists(base: &Path, rel: &Path) -> bool {
    let Ok(mut fd) = open_base(base) else {
        return false;
    };
    for name in components(rel) {
        match openat(fd.as_fd(), name, dir_flags(), Mode::empty()) {
            Ok(next) => fd = next,
            Err(_) => return false,
        }
    }
    true
}

/// What a removal deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub files: u64,
    pub dirs: u64,
}

/// Removes `base/rel` and everything in it without following symlinks.
/// A directory that is already gone is success (idempotent after a crash).
pub fn remove_volume_dir(base: &Path, rel: &Path) -> Result<Removed, DiskError> {
    let names: Vec<&OsStr> = components(rel).collect();
    let Some((last, parents)) = names.split_last() else {
        return Err(DiskError::NotADirectory {
            path: base.to_path_buf(),
        });
    };
    let mut path = base.to_path_buf();
    let mut parent = match open_base(base) {
        Ok(fd) => fd,
        Err(DiskError::Io {
            errno: Errno::ENOENT,
            ..
        }) => return Ok(Removed::default()),
        Err(e) => return Err(e),
    };
    for name in parents {
        path.push(name);
        parent = match openat(parent.as_fd(), *name, dir_flags(), Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(Removed::default()),
            Err(errno) => return Err(io(&path, "open")(errno)),
        };
    }
    path.push(last);
    let dir = match openat(parent.as_fd(), *last, dir_flags(), Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(Removed::default()),
        Err(errno) => return Err(io(&path, "open")(errno)),
    };
    let dev = fstat(dir.as_fd()).map_err(io(&path, "stat"))?.st_dev;
    let mut removed = Removed::default();
    remove_contents(dir, dev, &path, 0, &mut removed)?;
    unlinkat(parent.as_fd(), *last, UnlinkatFlags::RemoveDir).map_err(io(&path, "rmdir"))?;
    removed.dirs += 1;
    Ok(removed)
}

fn remove_contents(
    dir: OwnedFd,
    dev: u64,
    path: &Path,
    depth: usize,
    removed: &mut Removed,
) -> Result<(), DiskError> {
    if depth > MAX_DEPTH {
        return Err(DiskError::TooDeep {
            path: path.to_path_buf(),
        });
    }
    let names: Vec<CString> = {
        let listing = nix::unistd::dup(dir.as_fd()).map_err(io(path, "dup"))?;
        let mut listing = Dir::from_fd(listing).map_err(io(path, "opendir"))?;
        listing
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect()
    };
    for name in names {
        let child = path.join(OsStr::from_bytes(name.as_bytes()));
        let st = match fstatat(dir.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(errno) => return Err(io(&child, "stat")(errno)),
        };
        let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
        if is_dir {
            if st.st_dev != dev {
                return Err(DiskError::MountPoint { path: child });
            }
            let sub = openat(dir.as_fd(), name.as_c_str(), dir_flags(), Mode::empty())
                .map_err(io(&child, "open"))?;
            remove_contents(sub, dev, &child, depth + 1, removed)?;
            unlinkat(dir.as_fd(), name.as_c_str(), UnlinkatFlags::RemoveDir)
                .map_err(io(&child, "rmdir"))?;
            removed.dirs += 1;
        } else {
            // Symlinks, sockets and files alike: the entry goes, its target stays.
            unlinkat(dir.as_fd(), name.as_c_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(io(&child, "unlink"))?;
            removed.files += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn choose_prefers_most_free_that_fits() {
        let s = |free| Space { free, total: 1000 };
        let c = vec![
            ("/a".into(), s(100)),
            ("/b".into(), s(500)),
            ("/c".into(), s(300)),
        ];
        assert_eq!(choose(&c, 200, 0), Some(PathBuf::from("/b")));
        assert_eq!(choose(&c, 450, 100), None);
        assert_eq!(choose(&c, 250, 200), Some(PathBuf::from("/b")));
        assert_eq!(choose(&[], 1, 0), None);
    }

    #[test]
    fn creates_with_mode_despite_umask() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let path = create_volume_dir(&base, Path::new("ns/claim"), 0o777).unwrap();
        assert_eq!(path, base.join("ns/claim"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777);
        // Idempotent.
        create_volume_dir(&base, Path::new("ns/claim"), 0o777).unwrap();
        assert!(volume_dir_exists(&base, Path::new("ns/claim")));
    }

    #[test]
    fn refuses_to_create_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        symlink(&outside, base.join("ns")).unwrap();
        let err = create_volume_dir(&base, Path::new("ns/claim"), 0o777).unwrap_err();
        assert!(matches!(err, DiskError::NotADirectory { .. }), "{err}");
        assert!(!outside.join("claim").exists());
        assert!(!volume_dir_exists(&base, Path::new("ns/claim")));
    }

    #[test]
    fn refuses_a_symlink_planted_at_the_volume_path() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o700)).unwrap();
        symlink(&outside, base.join("vol")).unwrap();
        let err = create_volume_dir(&base, Path::new("vol"), 0o777).unwrap_err();
        assert!(matches!(err, DiskError::NotADirectory { .. }), "{err}");
        assert!(err.to_string().contains("symlink"), "{err}");
        // Neither reused nor chmod-ed through the link.
        assert!(!volume_dir_exists(&base, Path::new("vol")));
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn removal_unlinks_symlinks_without_following_them() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("keep")).unwrap();
        std::fs::write(outside.join("keep/precious"), b"x").unwrap();
        let vol = create_volume_dir(&base, Path::new("vol"), 0o777).unwrap();
        std::fs::create_dir_all(vol.join("a/b/c")).unwrap();
        std::fs::write(vol.join("a/b/c/log"), b"data").unwrap();
        symlink(&outside, vol.join("escape")).unwrap();
        symlink(outside.join("keep/precious"), vol.join("a/file-link")).unwrap();
        let removed = remove_volume_dir(&base, Path::new("vol")).unwrap();
        assert_eq!(removed, Removed { files: 3, dirs: 4 });
        assert!(!vol.exists());
        assert_eq!(std::fs::read(outside.join("keep/precious")).unwrap(), b"x");
        // Already gone: success.
        assert_eq!(
            remove_volume_dir(&base, Path::new("vol")).unwrap(),
            Removed::default()
        );
    }

    #[test]
    fn removal_refuses_a_symlinked_volume_root() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"x").unwrap();
        symlink(&outside, base.join("vol")).unwrap();
        assert!(remove_volume_dir(&base, Path::new("vol")).is_err());
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn space_reports_the_filesystem() {
        let s = space(Path::new("/")).unwrap();
        assert!(s.total > 0 && s.free <= s.total);
    }
}
