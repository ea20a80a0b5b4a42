//! A recursive inotify watch over one source root: one watch per directory, remembered as
//! descriptor → (parent, name), so a directory costs a few dozen bytes and a path is built
//! only when an event needs it: well under half of what a path-keyed watcher holds
//! (BENCHMARKS.md, P3). Directories are watched by the scan's walk as it reaches
//! them, so the tree is listed once, not once for the walk and once for the watch.
//!
//! Watches come from a budget the kubelet and every pod on the node share
//! (`fs.inotify.max_user_watches`), so one source holds at most `--max-watches-per-source`.
//! A directory beyond that, or beyond the node's budget, is left to the periodic rescan,
//! which walks the whole root: a log there is found, only later.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// What the watch saw, for the scan to look at.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) enum Change {
    Path(PathBuf),
    /// A directory appeared (made, or moved in): walk it, watching what is below.
    Dir {
        path: PathBuf,
        parent: WatchDescriptor,
    },
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

/// Watches held by every source of this process.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// The node ran out of inotify watches: said once per process, not once per directory.
static EXHAUSTED: AtomicBool = AtomicBool::new(false);

/// Inotify watches held by every source of this process.
pub fn held() -> usize {
    HELD.load(Ordering::Relaxed)
}

struct Dir {
    parent: Option<WatchDescriptor>,
    /// The full root path for the root, a single component below it.
    name: Box<OsStr>,
}

/// The watched directories, placed one at a time by the scan's walks: a directory is
/// watched before it is listed, so a file made in it after the listing is reported.
/// The map is locked while a watch is placed, so walking threads never pass `max` together.
pub(super) struct Watches {
    inotify: Inotify,
    dirs: Mutex<HashMap<WatchDescriptor, Dir>>,
    /// Every directory asked for so far is watched.
    complete: AtomicBool,
    /// Watches held at most.
    max: usize,
}

impl Watches {
    pub(super) fn new(max: usize) -> io::Result<Self> {
        Ok(Self {
            inotify: Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?,
            dirs: Mutex::default(),
            complete: AtomicBool::new(true),
            max,
        })
    }

    /// Watches `dir`, found as `name` in the directory watched as `parent` (the root has
    /// none, and its full path as name). Watching a directory again keeps its descriptor.
    /// `None` if it cannot be watched: if it is still there, [`Watches::complete`] turns
    /// false and the periodic rescan covers it.
    pub(super) fn watch(
        &self,
        dir: &Path,
        parent: Option<WatchDescriptor>,
        name: &OsStr,
    ) -> Option<WatchDescriptor> {
        let mut dirs = self.dirs.lock().expect("not poisoned");
        if dirs.len() >= self.max {
            if self.complete.swap(false, Ordering::Relaxed) {
                tracing::warn!(dir = %dir.display(), watches = self.max, "more directories than --max-watches-per-source; those beyond it are found by the periodic rescan");
            }
            return None;
        }
        match self.inotify.add_watch(dir, mask()) {
            Ok(wd) => {
                let name = name.into();
                if dirs.insert(wd, Dir { parent, name }).is_none() {
                    HELD.fetch_add(1, Ordering::Relaxed);
                }
                Some(wd)
            }
            // Gone or replaced since it was listed.
            Err(Errno::ENOENT | Errno::ENOTDIR) => None,
            Err(e) => {
                self.complete.store(false, Ordering::Relaxed);
                if e == Errno::ENOSPC && !EXHAUSTED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %dir.display(), held = held(), "out of inotify watches on this node (raise fs.inotify.max_user_watches, or lower --max-watches-per-source); directories without one are found by the periodic rescan");
                }
                None
            }
        }
    }

    /// Whether every directory asked for is watched.
    pub(super) fn complete(&self) -> bool {
        self.complete.load(Ordering::Relaxed)
    }

    /// Directories watched.
    pub(super) fn len(&self) -> usize {
        self.dirs.lock().expect("not poisoned").len()
    }

    /// Hands the watches to the runtime; must be called inside it.
    pub(super) fn into_async(self) -> io::Result<Watch> {
        let raw = self.inotify.as_fd().as_raw_fd();
        Ok(Watch {
            // SAFETY: `watches` owns the descriptor and is dropped after `fd`, so the
            // descriptor stays open exactly as long as it is registered.
            fd: unsafe { AsyncFd::register(raw) }.map_err(|e| e.into_parts().1)?,
            watches: self,
        })
    }

    fn path_of(&mut self, wd: WatchDescriptor) -> Option<PathBuf> {
        let dirs = self.dirs.get_mut().expect("not poisoned");
        let mut names = Vec::new();
        let mut at = Some(wd);
        while let Some(wd) = at {
            let dir = dirs.get(&wd)?;
            names.push(&*dir.name);
            at = dir.parent;
        }
        Some(names.iter().rev().collect())
    }

    /// Stops watching the directory `name` in `parent` and everything below it.
    fn forget(&mut self, parent: WatchDescriptor, name: &OsStr) {
        let dirs = self.dirs.get_mut().expect("not poisoned");
        let Some(top) = dirs
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
            match dirs.get(&wd).and_then(|d| d.parent) {
                Some(parent) => wd = parent,
                None => return false,
            }
        };
        let gone: Vec<WatchDescriptor> = dirs.keys().copied().filter(|wd| below(*wd)).collect();
        for wd in gone {
            dirs.remove(&wd);
            HELD.fetch_sub(1, Ordering::Relaxed);
            let _ = self.inotify.rm_watch(wd);
        }
    }

    /// What a batch of events means for the scan.
    fn changes(&mut self, events: Vec<InotifyEvent>) -> Vec<Change> {
        let mut changes = Vec::with_capacity(events.len());
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                changes.push(Change::Rescan);
                continue;
            }
            if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                if self
                    .dirs
                    .get_mut()
                    .expect("not poisoned")
                    .remove(&event.wd)
                    .is_some()
                {
                    HELD.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            let (Some(name), Some(dir)) = (event.name, self.path_of(event.wd)) else {
                continue;
            };
            let path = dir.join(&name);
            if event.mask.contains(AddWatchFlags::IN_ISDIR) {
                let made = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO;
                if event.mask.intersects(made) {
                    changes.push(Change::Dir {
                        path,
                        parent: event.wd,
                    });
                    continue;
                }
                if event.mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                    self.forget(event.wd, &name);
                }
            }
            changes.push(Change::Path(path));
        }
        changes
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        let held = self.dirs.get_mut().map_or(0, |dirs| dirs.len());
        HELD.fetch_sub(held, Ordering::Relaxed);
    }
}

/// The watches, reporting changes as the runtime sees them.
pub(super) struct Watch {
    // Declared first so that it is deregistered before `watches` closes the descriptor.
    fd: AsyncFd<RawFd>,
    watches: Watches,
}

impl Watch {
    /// Waits for events, then returns what they mean.
    pub(super) async fn next(&mut self) -> io::Result<Vec<Change>> {
        loop {
            let mut ready = self.fd.readable().await?;
            match self.watches.inotify.read_events() {
                Ok(events) => return Ok(self.watches.changes(events)),
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
            let Ok(events) = self.watches.inotify.read_events() else {
                break;
            };
            changes.extend(self.watches.changes(events));
        }
        changes
    }

    /// The watches, for a walk to add to.
    pub(super) fn watches(&self) -> &Watches {
        &self.watches
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

    /// Watches `dir` and what is below it, as a walk would.
    fn watch_all(watches: &Watches, dir: &Path, parent: Option<WatchDescriptor>, name: &OsStr) {
        let wd = watches.watch(dir, parent, name).expect("watchable");
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                watch_all(watches, &entry.path(), Some(wd), &entry.file_name());
            }
        }
    }

    #[tokio::test]
    async fn reports_paths_below_the_root_and_new_and_moved_directories() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("dag_id=a/run_id=r/task_id=t")).unwrap();
        std::fs::create_dir_all(root.join("elsewhere")).unwrap();
        let watches = Watches::new(usize::MAX).unwrap();
        watch_all(&watches, &root, None, root.as_os_str());
        assert!(watches.complete());
        assert_eq!(watches.len(), 5);
        let mut watch = watches.into_async().unwrap();

        let log = root.join("dag_id=a/run_id=r/task_id=t/attempt=1.log");
        std::fs::write(&log, b"line\n").unwrap();
        assert!(changes(&mut watch)
            .await
            .contains(&Change::Path(log.clone())));

        // A new directory is reported for a walk, with the watch it appeared in.
        let new_dir = root.join("dag_id=a/run_id=r/task_id=u");
        std::fs::create_dir(&new_dir).unwrap();
        let got = changes(&mut watch).await;
        let Some(Change::Dir { parent, .. }) = got
            .iter()
            .find(|c| matches!(c, Change::Dir { path, .. } if *path == new_dir))
        else {
            panic!("{got:?}");
        };
        watch_all(
            watch.watches(),
            &new_dir,
            Some(*parent),
            OsStr::new("task_id=u"),
        );
        assert_eq!(watch.watches().len(), 6);
        std::fs::write(new_dir.join("attempt=1.log"), b"line\n").unwrap();
        let got = changes(&mut watch).await;
        assert!(got.contains(&Change::Path(new_dir.join("attempt=1.log"))));

        // Moved within the root: the old name is forgotten, the new one is to be walked.
        let moved = root.join("elsewhere/task_id=u");
        std::fs::rename(&new_dir, &moved).unwrap();
        let got = changes(&mut watch).await;
        assert!(got.contains(&Change::Path(new_dir.clone())), "{got:?}");
        assert!(
            got.iter()
                .any(|c| matches!(c, Change::Dir { path, .. } if *path == moved)),
            "{got:?}"
        );
        assert_eq!(watch.watches().len(), 5);

        // Removed: its watch goes.
        std::fs::remove_dir_all(root.join("dag_id=a/run_id=r/task_id=t")).unwrap();
        let got = changes(&mut watch).await;
        assert!(got.contains(&Change::Path(root.join("dag_id=a/run_id=r/task_id=t"))));
        assert_eq!(watch.watches().len(), 4);
    }

    #[test]
    fn watches_stop_at_the_cap() {
        let root = tempfile::tempdir().unwrap();
        let mut dirs = vec![root.path().to_owned()];
        for i in 0..5 {
            let dir = root.path().join(format!("dag_id={i}"));
            std::fs::create_dir(&dir).unwrap();
            dirs.push(dir);
        }
        let watches = Watches::new(3).unwrap();
        let root_wd = watches.watch(&dirs[0], None, dirs[0].as_os_str());
        assert!(root_wd.is_some());
        let placed = dirs[1..]
            .iter()
            .filter_map(|d| watches.watch(d, root_wd, d.file_name().unwrap()))
            .count();
        assert_eq!(placed, 2);
        assert_eq!(watches.len(), 3);
        // What has no watch is left to the rescan.
        assert!(!watches.complete());
    }

    #[test]
    fn a_directory_that_is_gone_or_not_a_directory_is_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let watches = Watches::new(usize::MAX).unwrap();
        let file = dir.path().join("file");
        assert_eq!(watches.watch(&file, None, file.as_os_str()), None);
        let missing = dir.path().join("missing");
        assert_eq!(watches.watch(&missing, None, missing.as_os_str()), None);
        assert_eq!(watches.len(), 0);
        // Neither means a directory could not be watched.
        assert!(watches.complete());
    }
}
