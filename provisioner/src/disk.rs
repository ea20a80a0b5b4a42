//! The node's disks: free space, and making and removing volume directories
//! without ever following a symlink out of the base path.
//!
//! The base path is the administrator's and is opened as configured; every
//! component below it is opened with `O_NOFOLLOW`, and removal works on
//! directory descriptors (`openat`/`unlinkat`), so a symlink planted inside a
//! volume is unlinked, never followed, and a mount point inside a volume
//! stops the removal instead of emptying someone else's filesystem.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use thiserror::Error;

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
    #[error(
        "{path} changed while it was being removed (moved or replaced); the removal is retried"
    )]
    Changed { path: PathBuf },
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

/// Beside the volumes, under each base path: one record per volume
/// directory naming the PV it belongs to. No pod reaches the base path, so
/// no tenant can rewrite whose a directory is.
const OWNERS: &str = ".localship-owners";

/// The record's file name: a stable hash of the relative path (FNV-1a), as
/// paths may be longer than a file name; the record holds the path too.
fn owner_key(rel: &Path) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in rel.as_os_str().as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn owners_dir(base: &Path, create: bool) -> Result<Option<OwnedFd>, DiskError> {
    let path = base.join(OWNERS);
    let fd = open_base(base)?;
    if create {
        match mkdirat(fd.as_fd(), OWNERS, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(errno) => return Err(io(&path, "mkdir")(errno)),
        }
    }
    match openat(fd.as_fd(), OWNERS, dir_flags(), Mode::empty()) {
        Ok(dir) => Ok(Some(dir)),
        Err(Errno::ENOENT) => Ok(None),
        Err(errno) => Err(io(&path, "open")(errno)),
    }
}

/// The PV that `base/rel` belongs to, if a record says so.
pub fn owner(base: &Path, rel: &Path) -> Result<Option<String>, DiskError> {
    let Some(dir) = owners_dir(base, false)? else {
        return Ok(None);
    };
    let key = owner_key(rel);
    let path = base.join(OWNERS).join(&key);
    let file = match openat(
        dir.as_fd(),
        key.as_str(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => std::fs::File::from(fd),
        Err(Errno::ENOENT) => return Ok(None),
        Err(errno) => return Err(io(&path, "open")(errno)),
    };
    let text = std::io::read_to_string(file).map_err(|e| DiskError::Io {
        path: path.clone(),
        op: "read",
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let mut lines = text.lines();
    let (pv, recorded) = (lines.next(), lines.next());
    // Another path with the same hash is another directory's record.
    if recorded != rel.to_str() {
        return Ok(None);
    }
    Ok(pv.filter(|p| !p.is_empty()).map(str::to_owned))
}

/// Records that `base/rel` belongs to `pv`, replacing any record (written
/// aside, then renamed over it).
pub fn set_owner(base: &Path, rel: &Path, pv: &str) -> Result<(), DiskError> {
    let dir = owners_dir(base, true)?.ok_or_else(|| DiskError::NotADirectory {
        path: base.join(OWNERS),
    })?;
    let key = owner_key(rel);
    let tmp = format!("{key}.new");
    let path = base.join(OWNERS).join(&tmp);
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(
        dir.as_fd(),
        tmp.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(io(&path, "open"))?;
    let text = format!("{pv}\n{}\n", rel.display());
    nix::unistd::write(&fd, text.as_bytes()).map_err(io(&path, "write"))?;
    nix::unistd::fsync(&fd).map_err(io(&path, "fsync"))?;
    nix::fcntl::renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), key.as_str())
        .map_err(io(&path, "rename"))?;
    Ok(())
}

/// Drops the record of `base/rel`, if any.
pub fn clear_owner(base: &Path, rel: &Path) -> Result<(), DiskError> {
    let Some(dir) = owners_dir(base, false)? else {
        return Ok(());
    };
    let key = owner_key(rel);
    match unlinkat(dir.as_fd(), key.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(errno) => Err(io(&base.join(OWNERS).join(key), "unlink")(errno)),
    }
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
    let mut removed = Removed::default();
    remove_contents(dir, &path, &mut removed)?;
    unlinkat(parent.as_fd(), *last, UnlinkatFlags::RemoveDir).map_err(io(&path, "rmdir"))?;
    removed.dirs += 1;
    Ok(removed)
}

/// A directory on the way down: who it is, its name in its parent, and the
/// subdirectories still to remove.
struct Level {
    id: Identity,
    name: CString,
    path: PathBuf,
    subdirs: Vec<CString>,
}

/// Empties `root`, depth first, holding only the root's descriptor and the
/// current directory's. Going back up is `..`, checked against the inode
/// recorded on the way down, so a directory moved meanwhile stops the
/// removal instead of leading it elsewhere.
fn remove_contents(
    root: OwnedFd,
    root_path: &Path,
    removed: &mut Removed,
) -> Result<(), DiskError> {
    let root_id = identity(root.as_fd()).map_err(io(root_path, "statx"))?;
    let mut current = nix::unistd::dup(root.as_fd()).map_err(io(root_path, "dup"))?;
    let mut stack = vec![Level {
        id: root_id,
        name: CString::default(),
        path: root_path.to_path_buf(),
        subdirs: empty_files(current.as_fd(), root_path, removed)?,
    }];
    while let Some(top) = stack.last_mut() {
        if let Some(name) = top.subdirs.pop() {
            let path = top.path.join(OsStr::from_bytes(name.as_bytes()));
            let child = match openat(current.as_fd(), name.as_c_str(), dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => continue,
                Err(errno) => return Err(io(&path, "open")(errno)),
            };
            let id = identity(child.as_fd()).map_err(io(&path, "statx"))?;
            if id.mount != root_id.mount {
                return Err(DiskError::MountPoint { path });
            }
            let subdirs = empty_files(child.as_fd(), &path, removed)?;
            current = child;
            stack.push(Level {
                id,
                name,
                path,
                subdirs,
            });
            continue;
        }
        let done = stack.pop().expect("the loop holds a level");
        let Some(parent) = stack.last() else {
            break;
        };
        current = if stack.len() == 1 {
            nix::unistd::dup(root.as_fd()).map_err(io(root_path, "dup"))?
        } else {
            let up = openat(current.as_fd(), "..", dir_flags(), Mode::empty())
                .map_err(io(&parent.path, "open"))?;
            if identity(up.as_fd()).map_err(io(&parent.path, "statx"))? != parent.id {
                return Err(DiskError::Changed {
                    path: parent.path.clone(),
                });
            }
            up
        };
        unlinkat(
            current.as_fd(),
            done.name.as_c_str(),
            UnlinkatFlags::RemoveDir,
        )
        .map_err(io(&done.path, "rmdir"))?;
        removed.dirs += 1;
    }
    Ok(())
}

/// Unlinks every entry of `dir` that is not a directory (symlinks, sockets
/// and files alike: the entry goes, any target stays) and returns the names
/// of its subdirectories.
fn empty_files(
    dir: BorrowedFd,
    path: &Path,
    removed: &mut Removed,
) -> Result<Vec<CString>, DiskError> {
    let names: Vec<CString> = {
        let listing = nix::unistd::dup(dir).map_err(io(path, "dup"))?;
        let mut listing = Dir::from_fd(listing).map_err(io(path, "opendir"))?;
        listing
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect()
    };
    let mut subdirs = Vec::new();
    for name in names {
        let child = || path.join(OsStr::from_bytes(name.as_bytes()));
        let st = match fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(errno) => return Err(io(&child(), "stat")(errno)),
        };
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            subdirs.push(name);
            continue;
        }
        match unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) => removed.files += 1,
            Err(Errno::ENOENT) => {}
            // A file bind-mounted onto an entry is busy: a mount point too.
            Err(Errno::EBUSY) => return Err(DiskError::MountPoint { path: child() }),
            Err(errno) => return Err(io(&child(), "unlink")(errno)),
        }
    }
    Ok(subdirs)
}

/// Which directory a descriptor is: the mount it lies on and its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    mount: u64,
    inode: u64,
}

/// One statx for both. The mount id (`STATX_MNT_ID`, Linux 5.8+), unlike
/// the device number, tells a bind mount of the same filesystem apart.
fn identity(fd: BorrowedFd) -> Result<Identity, Errno> {
    let want = libc::STATX_MNT_ID | libc::STATX_INO;
    // SAFETY: statx writes at most size_of::<statx>() bytes into `stx`, and
    // the empty path is a valid NUL-terminated string.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            want,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(Errno::last());
    }
    if stx.stx_mask & want != want {
        // Without mount ids a bind mount cannot be told apart: refuse.
        return Err(Errno::ENOSYS);
    }
    Ok(Identity {
        mount: stx.stx_mnt_id,
        inode: stx.stx_ino,
    })
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
    fn a_directory_has_one_recorded_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        std::fs::create_dir_all(&base).unwrap();
        let rel = Path::new("airflow/logs-worker-0");
        assert_eq!(owner(&base, rel).unwrap(), None);
        set_owner(&base, rel, "pvc-1").unwrap();
        assert_eq!(owner(&base, rel).unwrap().as_deref(), Some("pvc-1"));
        assert_eq!(owner(&base, Path::new("airflow/other")).unwrap(), None);
        set_owner(&base, rel, "pvc-2").unwrap();
        assert_eq!(owner(&base, rel).unwrap().as_deref(), Some("pvc-2"));
        clear_owner(&base, rel).unwrap();
        assert_eq!(owner(&base, rel).unwrap(), None);
        clear_owner(&base, rel).unwrap();
        // Records live beside the volumes, not in them.
        let vol = create_volume_dir(&base, rel, 0o777).unwrap();
        set_owner(&base, rel, "pvc-3").unwrap();
        assert_eq!(std::fs::read_dir(&vol).unwrap().count(), 0);
    }

    #[test]
    fn removal_finishes_at_any_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let vol = create_volume_dir(&base, Path::new("vol"), 0o777).unwrap();
        // Deeper than PATH_MAX allows by name: built one level at a time.
        let mut dir = std::fs::File::open(&vol).unwrap();
        let levels = 3000;
        for i in 0..levels {
            mkdirat(dir.as_fd(), "d", Mode::from_bits_truncate(0o700)).unwrap();
            let fd = openat(dir.as_fd(), "d", dir_flags(), Mode::empty()).unwrap();
            if i % 100 == 0 {
                let f = openat(
                    fd.as_fd(),
                    "log",
                    OFlag::O_CREAT | OFlag::O_WRONLY,
                    Mode::from_bits_truncate(0o600),
                )
                .unwrap();
                drop(f);
            }
            dir = std::fs::File::from(fd);
        }
        drop(dir);
        let removed = remove_volume_dir(&base, Path::new("vol")).unwrap();
        assert_eq!(
            removed,
            Removed {
                files: 30,
                dirs: levels + 1
            }
        );
        assert!(!vol.exists());
    }

    #[test]
    fn space_reports_the_filesystem() {
        let s = space(Path::new("/")).unwrap();
        assert!(s.total > 0 && s.free <= s.total);
    }
}
