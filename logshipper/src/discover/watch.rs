//! A recursive inotify watch over one source root: one watch per directory, remembered as
//! descriptor → (parent, name), so a directory costs a few dozen bytes and a path is built
//! only when an event needs it. At 101,000 directories this holds about 7 MiB where a
//! path-keyed watcher held 18, and setting it up reads directories without a `stat` per
//! file.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// What the watch saw, for the scan to look at.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    Path(PathBuf),
    /// Events were lost (the kernel queue overflowed, or a directory could not be watched):
    /// walk everything again.
    Rescan,
}

/// Everything that can make a log appear, grow, settle or go.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

/// Changes taken at once after the first; the rest wait in the kernel's queue.
const MORE: usize = 4096;

struct Dir {
    parent: Option<WatchDescriptor>,
    /// The full root path for the root, a single component below it.
    name: Box<OsStr>,
}

/// The watched directories.
#[derive(Default)]
struct Dirs(HashMap<WatchDescriptor, Dir>);

/// The watches, before they are handed to the runtime.
pub(super) struct Tree {
    inotify: Inotify,
    dirs: Dirs,
}

impl Tree {
    /// Watches every directory under `root` on its filesystem, never following a symlink.
    /// Blocking: a large tree takes as long as listing its directories. Fails only if the
    /// root cannot be watched; `false` says some directory below it could not be.
    pub(super) fn build(root: &Path) -> io::Result<(Self, bool)> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        let mut dirs = Dirs::default();
        let complete = dirs.add(&inotify, root, None, root.as_os_str())?;
        Ok((Self { inotify, dirs }, complete))
    }

    /// Directories watched.
    pub(super) fn len(&self) -> usize {
        self.dirs.0.len()
    }

    /// Hands the watches to the runtime; must be called inside it.
    pub(super) fn into_async(self) -> io::Result<Watch> {
        Ok(Watch {
            // SAFETY: `Owned` owns the descriptor, and the AsyncFd owns `Owned`, so the
            // descriptor stays open exactly as long as it is registered.
            fd: unsafe { AsyncFd::register(Owned(self.inotify)) }.map_err(|e| e.into_parts().1)?,
            dirs: self.dirs,
        })
    }
}

/// The inotify descriptor, as tokio wants it.
struct Owned(Inotify);

impl AsRawFd for Owned {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The watches, reporting changes as the runtime sees them.
pub(super) struct Watch {
    fd: AsyncFd<Owned>,
    dirs: Dirs,
}

impl Watch {
    /// Waits for events, then returns what they mean.
    pub(super) async fn next(&mut self) -> io::Result<Vec<Change>> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(events) => return Ok(self.dirs.changes(&self.fd.get_ref().0, events)),
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whatever else has arrived, without waiting; at most about [`MORE`] changes, so
    /// files written without pause cannot keep the scan here.
    pub(super) fn more(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        while changes.len() < MORE {
            let Ok(events) = self.fd.get_ref().0.read_events() else {
                break;
            };
            changes.extend(self.dirs.changes(&self.fd.get_ref().0, events));
        }
        changes
    }

    /// Directories watched.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.dirs.0.len()
    }
}

impl Dirs {
    /// Watches `dir` and every directory below it on the same filesystem; `Ok(false)` if
    /// some could not be. Lists directories itself, like the scan's walk, so that only
    /// directories are stat'ed, relative to their open parent.
    fn add(
        &mut self,
        inotify: &Inotify,
        dir: &Path,
        parent: Option<WatchDescriptor>,
        name: &OsStr,
    ) -> io::Result<bool> {
        let dev = std::fs::symlink_metadata(dir)?.dev();
        let top = inotify.add_watch(dir, mask())?;
        self.0.insert(
            top,
            Dir {
                parent,
                name: name.into(),
            },
        );
        let mut complete = true;
        let mut pending = vec![(dir.to_path_buf(), top)];
        while let Some((dir, wd)) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                complete = false;
                continue;
            };
            for entry in entries.flatten() {
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if !is_dir || entry.metadata().map_or(true, |m| m.dev() != dev) {
                    continue;
                }
                let path = entry.path();
                match inotify.add_watch(&path, mask()) {
                    Ok(child) => {
                        let name = entry.file_name().into_boxed_os_str();
                        self.0.insert(
                            child,
                            Dir {
                                parent: Some(wd),
                                name,
                            },
                        );
                        pending.push((path, child));
                    }
                    // Gone or replaced since it was listed.
                    Err(Errno::ENOENT | Errno::ENOTDIR) => {}
                    Err(e) => {
                        complete = false;
                        if e == Errno::ENOSPC {
                            tracing::warn!(dir = %path.display(), "out of inotify watches (raise fs.inotify.max_user_watches); relying on the periodic rescan below here");
                        }
                    }
                }
            }
        }
        Ok(complete)
    }

    fn path_of(&self, wd: WatchDescriptor) -> Option<PathBuf> {
        let mut names = Vec::new();
        let mut at = Some(wd);
        while let Some(wd) = at {
            let dir = self.0.get(&wd)?;
            names.push(&*dir.name);
            at = dir.parent;
        }
        Some(names.iter().rev().collect())
    }

    /// Stops watching the directory `name` in `parent` and everything below it.
    fn forget(&mut self, inotify: &Inotify, parent: WatchDescriptor, name: &OsStr) {
        let Some(top) = self
            .0
            .iter()
            .find(|(_, d)| d.parent == Some(parent) && &*d.name == name)
            .map(|(wd, _)| *wd)
        else {
            return;
        };
        let below = |mut wd: WatchDescriptor| loop {
            if wd == top {
                return true;
            }
            match self.0.get(&wd).and_then(|d| d.parent) {
                Some(parent) => wd = parent,
                None => return false,
            }
        };
        let gone: Vec<WatchDescriptor> = self.0.keys().copied().filter(|wd| below(*wd)).collect();
        for wd in gone {
            self.0.remove(&wd);
            let _ = inotify.rm_watch(wd);
        }
    }

    /// What a batch of events means for the scan. New directories are watched here, and
    /// reported, so the scan walks them for files made before their watch.
    fn changes(&mut self, inotify: &Inotify, events: Vec<InotifyEvent>) -> Vec<Change> {
        let mut changes = Vec::with_capacity(events.len());
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                changes.push(Change::Rescan);
                continue;
            }
            if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                self.0.remove(&event.wd);
                continue;
            }
            let (Some(name), Some(dir)) = (event.name, self.path_of(event.wd)) else {
                continue;
            };
            let path = dir.join(&name);
            if event.mask.contains(AddWatchFlags::IN_ISDIR) {
                let made = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO;
                if event.mask.intersects(made) {
                    // Usually a task's new, nearly empty directory: cheap to do in place.
                    match self.add(inotify, &path, Some(event.wd), &name) {
                        Ok(true) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        _ => changes.push(Change::Rescan),
                    }
                } else if event.mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                    self.forget(inotify, event.wd, &name);
                }
            }
            changes.push(Change::Path(path));
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn changes(watch: &mut Watch) -> Vec<Change> {
        let mut got = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("events within 5s")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        got.extend(watch.more());
        got
    }

    #[tokio::test]
    async fn reports_paths_below_the_root_and_follows_new_and_moved_directories() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("dag_id=a/run_id=r/task_id=t")).unwrap();
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("dag_id=a/link")).unwrap();
        let (tree, complete) = Tree::build(&root).unwrap();
        assert!(complete);
        let mut watch = tree.into_async().unwrap();
        // root, dag_id=a, run_id=r, task_id=t, elsewhere; never the symlinked directory.
        assert_eq!(watch.len(), 5);

        let log = root.join("dag_id=a/run_id=r/task_id=t/attempt=1.log");
        std::fs::write(&log, b"line\n").unwrap();
        assert!(changes(&mut watch)
            .await
            .contains(&Change::Path(log.clone())));
        std::fs::write(outside.path().join("x.log"), b"not ours\n").unwrap();

        // A new directory is watched at once: a file made in it later is seen.
        let new_dir = root.join("dag_id=a/run_id=r/task_id=u");
        std::fs::create_dir(&new_dir).unwrap();
        let got = changes(&mut watch).await;
        assert!(got.contains(&Change::Path(new_dir.clone())), "{got:?}");
        assert!(got
            .iter()
            .all(|c| matches!(c, Change::Path(p) if p.starts_with(&root))));
        assert_eq!(watch.len(), 6);
        std::fs::write(new_dir.join("attempt=1.log"), b"line\n").unwrap();
        let got = changes(&mut watch).await;
        assert!(got.contains(&Change::Path(new_dir.join("attempt=1.log"))));

        // Moved within the root: the old name is forgotten, the new one watched.
        let moved = root.join("elsewhere/task_id=u");
        std::fs::rename(&new_dir, &moved).unwrap();
        let got = changes(&mut watch).await;
        assert!(got.contains(&Change::Path(new_dir.clone())), "{got:?}");
        assert!(got.contains(&Change::Path(moved.clone())), "{got:?}");
        assert_eq!(watch.len(), 6);
        std::fs::write(moved.join("attempt=2.log"), b"line\n").unwrap();
        let got = changes(&mut watch).await;
        assert!(
            got.contains(&Change::Path(moved.join("attempt=2.log"))),
            "{got:?}"
        );

        // Removed: its watch goes.
        std::fs::remove_dir_all(&moved).unwrap();
        let got = changes(&mut watch).await;
        assert!(got.contains(&Change::Path(moved.clone())), "{got:?}");
        assert_eq!(watch.len(), 5);
    }

    #[test]
    fn a_root_that_is_not_a_directory_cannot_be_watched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(Tree::build(&dir.path().join("file")).is_err());
        assert!(Tree::build(&dir.path().join("missing")).is_err());
    }
}
