//! Walking and watching one source root, reporting what is there as events.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::inotify::WatchDescriptor;
use nix::sys::stat::{fstat, fstatat, Mode};

use super::outbox::Outbox;
use super::skipped::Skipped;
use super::walk_stack::{Dir, Kind, Shared, Stack};
use super::watch::{Change, Watch, Watches};
use super::{Event, SkipReason, Source};
use crate::filter::Filter;
use crate::key::{relative_key, KeyError};
use crate::local_file::FileStat;

/// Changes are gathered this long before being looked at: a log being written reports every
/// line, and one look per burst is enough.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Threads for a first walk, more than most nodes' cores: a thread whose directory block is
/// not in memory waits for the disk, and the others keep the cores busy meanwhile.
const WALKERS: usize = 8;

/// What a walk covers.
enum Walk {
    Plain(PathBuf),
    /// The whole root, placing watches (if there are any) on the way.
    Watching(Option<Watches>),
}

/// Walking and watching one source.
#[derive(Clone)]
pub(super) struct Scan {
    pub(super) source: Arc<Source>,
    pub(super) filter: Arc<Filter>,
    pub(super) events: mpsc::Sender<Event>,
    /// Paths already told about, so a rescan does not repeat them.
    pub(super) skipped: Arc<Mutex<Skipped>>,
    /// Inotify watches this source holds at most.
    pub(super) max_watches: usize,
}

impl Scan {
    pub(super) async fn run(self, rescan: Option<Duration>) {
        let root = self.source.root.clone();
        let watches = rescan.and_then(|_| match Watches::new(self.max_watches) {
            Ok(watches) => Some(watches),
            Err(e) => {
                tracing::warn!(root = %root.display(), error = %e, "cannot watch for changes (raise fs.inotify.max_user_instances?); relying on the periodic rescan");
                None
            }
        });
        let started = std::time::Instant::now();
        let source = self.source.clone();
        let _ = self.events.send(Event::WalkStarted { source }).await;
        let watches = self.walk_blocking(Walk::Watching(watches)).await;
        if !self.source.removed.load(Ordering::SeqCst) {
            let done = Event::WalkDone {
                source: self.source.clone(),
            };
            let _ = self.events.send(done).await;
        }
        let Some(every) = rescan else {
            return;
        };
        let mut watch = watches.and_then(|watches| self.started(watches, started.elapsed()));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    // Only walks the watch asked for add watches: they are where it lost track.
                    self.walk_blocking(Walk::Plain(root.clone())).await;
                }
                changes = next_changes(&mut watch) => {
                    let Ok(mut batch) = changes else {
                        tracing::warn!(root = %root.display(), "file watch failed; relying on the periodic rescan");
                        watch = None;
                        continue;
                    };
                    tokio::time::sleep(DEBOUNCE).await;
                    if let Some(watch) = watch.as_mut() {
                        batch.extend(watch.more());
                    }
                    watch = self.look_at(batch, watch).await;
                }
            }
        }
    }

    /// The watches placed by the first walk, handed to the runtime.
    fn started(&self, watches: Watches, took: Duration) -> Option<Watch> {
        let root = self.source.root.display();
        tracing::info!(%root, directories = watches.len(), took_ms = took.as_millis() as u64, "watching for changes");
        if !watches.complete() {
            tracing::warn!(%root, "some directories cannot be watched; the periodic rescan covers them");
        }
        match watches.into_async() {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::warn!(%root, error = %e, "cannot watch for changes; relying on the periodic rescan");
                None
            }
        }
    }

    /// Looks at what the watch reported, off the runtime, and gives the watch back: walks
    /// of new directories place watches in it.
    async fn look_at(&self, batch: Vec<Change>, watch: Option<Watch>) -> Option<Watch> {
        let scan = self.clone();
        let root = self.source.root.clone();
        let looked = tokio::task::spawn_blocking(move || {
            let mut out = Outbox::new(&scan);
            if batch.contains(&Change::Rescan) {
                scan.walk(&root, watch.as_ref().map(|w| (w.watches(), None)));
            } else {
                for change in batch.into_iter().collect::<HashSet<_>>() {
                    match change {
                        Change::Path(path) => scan.inspect(&mut out, &path),
                        Change::Dir { path, parent } => {
                            scan.walk(&path, watch.as_ref().map(|w| (w.watches(), Some(parent))))
                        }
                        Change::Rescan => {}
                    }
                }
            }
            drop(out);
            watch
        })
        .await;
        looked.ok().flatten()
    }

    /// Runs a walk off the runtime; gives back the watches it placed, if any.
    async fn walk_blocking(&self, walk: Walk) -> Option<Watches> {
        let scan = self.clone();
        let root = self.source.root.clone();
        let walked = tokio::task::spawn_blocking(move || {
            let watches = match walk {
                Walk::Plain(from) => {
                    scan.walk(&from, None);
                    None
                }
                Walk::Watching(watches) => {
                    scan.walk_in(&root, watches.as_ref().map(|w| (w, None)), WALKERS);
                    watches
                }
            };
            watches
        })
        .await;
        walked.ok().flatten()
    }

    /// Walks `from` depth-first, never following a symlink or leaving the root's filesystem.
    /// With `watching` (the watches, and the watch of the directory `from` is in) each
    /// directory is watched before it is listed, so nothing made after its listing is missed.
    fn walk(&self, from: &Path, watching: Option<(&Watches, Option<WatchDescriptor>)>) {
        self.walk_in(from, watching, 1);
    }

    /// [`Scan::walk`] on `threads` threads sharing one stack of directories: a first walk
    /// of a large tree is bound by the kernel's directory reads.
    fn walk_in(
        &self,
        from: &Path,
        watching: Option<(&Watches, Option<WatchDescriptor>)>,
        threads: usize,
    ) {
        let (watches, parent_wd) = match watching {
            Some((watches, parent)) => (Some(watches), parent),
            None => (None, None),
        };
        let top = Dir {
            path: from.to_path_buf(),
            parent: None,
            parent_wd,
        };
        self.walk_from(top, watches, threads);
    }

    fn walk_from(&self, top: Dir, watches: Option<&Watches>, threads: usize) {
        let shared = Shared {
            stack: Mutex::new(Stack {
                dirs: vec![top],
                busy: threads,
            }),
            more: Condvar::new(),
            idle: AtomicUsize::new(0),
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(|| self.take_from(&shared, watches));
            }
            self.take_from(&shared, watches);
        });
    }

    /// Lists directories until every thread has run out. Each thread keeps its own stack
    /// and hands half of it over only when another thread is waiting for work.
    fn take_from(&self, shared: &Shared, watches: Option<&Watches>) {
        let mut out = Outbox::new(self);
        let mut local = Vec::new();
        loop {
            if self.source.removed.load(Ordering::SeqCst) {
                local.clear();
                shared.stack.lock().expect("not poisoned").dirs.clear();
            }
            let Some(dir) = local.pop().or_else(|| shared.wait_for_work()) else {
                return;
            };
            self.list(&mut out, dir, watches, &mut local);
            if shared.idle.load(Ordering::Relaxed) > 0 && local.len() > 1 {
                let half = local.split_off(local.len() / 2);
                shared.stack.lock().expect("not poisoned").dirs.extend(half);
                shared.more.notify_all();
            }
        }
    }

    /// Reports the files in `dir` and adds the directories in it to `below`. The directory
    /// is watched before it is listed, so nothing made in it after the listing is missed.
    /// Each directory is opened by its one name in its already open parent, never by path:
    /// a directory swapped for a symlink mid-walk cannot lead the walk out of the root.
    /// The kind comes with the listing, so only files are stat'ed.
    fn list(&self, out: &mut Outbox, dir: Dir, watches: Option<&Watches>, below: &mut Vec<Dir>) {
        let fd = match self.open_dir(&dir) {
            Ok(Some(fd)) => fd,
            Ok(None) => return,
            Err(e) => return self.unreadable(out, dir.path, &e),
        };
        // The root is watched under its full path; below it, a directory only if its parent is.
        let wd = match (watches, dir.parent.is_some(), dir.parent_wd) {
            (Some(watches), false, None) => watches.watch(&dir.path, None, dir.path.as_os_str()),
            (Some(watches), _, Some(parent)) => {
                let name = dir.path.file_name().unwrap_or(dir.path.as_os_str());
                watches.watch(&dir.path, Some(parent), name)
            }
            _ => None,
        };
        let mut listing = match nix::dir::Dir::from_fd(fd) {
            Ok(listing) => listing,
            Err(errno) => return self.unreadable(out, dir.path, &errno.into()),
        };
        // SAFETY: `listing` owns this descriptor and outlives every use of it below.
        let at = unsafe { BorrowedFd::borrow_raw(listing.as_raw_fd()) };
        let mut open: Option<Arc<OwnedFd>> = None;
        for entry in listing.iter() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(errno) => {
                    self.unreadable(out, dir.path.clone(), &errno.into());
                    break;
                }
            };
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let path = dir.path.join(OsStr::from_bytes(name.to_bytes()));
            let stat = || fstatat(at, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok();
            let (kind, known) = match Kind::listed(entry.file_type()) {
                Some(kind) => (kind, None),
                None => match stat() {
                    Some(raw) => (Kind::of_mode(raw.st_mode), Some(raw)),
                    None => continue,
                },
            };
            if kind != Kind::Dir {
                self.consider(out, &path, kind, || {
                    known.or_else(stat).map(|r| FileStat::of_raw(&r))
                });
                continue;
            }
            let parent = match &open {
                Some(parent) => parent.clone(),
                None => match at.try_clone_to_owned() {
                    Ok(fd) => open.insert(Arc::new(fd)).clone(),
                    Err(e) => {
                        self.unreadable(out, dir.path.clone(), &e);
                        break;
                    }
                },
            };
            below.push(Dir {
                path,
                parent: Some(parent),
                parent_wd: wd,
            });
        }
    }

    /// Opens a directory to list: by its name in its parent, or by path where a walk starts.
    /// `None` if it went away, turned into something else, or is on another filesystem.
    fn open_dir(&self, dir: &Dir) -> io::Result<Option<OwnedFd>> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let opened = match &dir.parent {
            Some(parent) => {
                let name = dir.path.file_name().unwrap_or(dir.path.as_os_str());
                openat(parent.as_fd(), name, flags, Mode::empty())
            }
            None => open(&dir.path, flags, Mode::empty()),
        };
        let fd = match opened {
            Ok(fd) => fd,
            Err(
                nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP,
            ) => return Ok(None),
            Err(errno) => return Err(errno.into()),
        };
        let same_filesystem = fstat(fd.as_fd())?.st_dev == self.source.dev;
        Ok(same_filesystem.then_some(fd))
    }

    /// A directory that cannot be listed; one that went away meanwhile is not worth a word.
    fn unreadable(&self, out: &mut Outbox, path: PathBuf, err: &io::Error) {
        if err.kind() != io::ErrorKind::NotFound {
            self.skip(out, path, SkipReason::Unreadable);
        }
    }

    /// A path the watcher reported: a new directory is walked, a file considered.
    fn inspect(&self, out: &mut Outbox, path: &Path) {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.dev() != self.source.dev => {}
            Ok(meta) if meta.is_dir() => self.walk(path, None),
            Ok(meta) => {
                let kind = Kind::of_type(meta.file_type());
                self.consider(out, path, kind, || Some(FileStat::of(&meta)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let relative = path
                    .strip_prefix(&self.source.root)
                    .ok()
                    .and_then(|rel| relative_key(rel).ok())
                    .filter(|rel| self.filter.matches(rel));
                if let Some(relative) = relative {
                    out.send(Event::Gone {
                        source: self.source.clone(),
                        relative,
                    });
                }
            }
            Err(_) => {}
        }
    }

    /// A file found at `path`: reported if it is a log, or as skipped if it cannot ship.
    /// `stat` is asked for only for a log.
    fn consider(
        &self,
        out: &mut Outbox,
        path: &Path,
        kind: Kind,
        stat: impl FnOnce() -> Option<FileStat>,
    ) {
        let Ok(relative) = path.strip_prefix(&self.source.root) else {
            return;
        };
        let shown = relative.to_string_lossy();
        if !self.filter.matches(&shown) {
            // A linked directory is not followed: say so where logs could be beneath it.
            if kind == Kind::Symlink && self.filter.may_hold(&shown) {
                self.skip(out, path.to_owned(), SkipReason::Symlink);
            }
            return;
        }
        let reason = match kind {
            Kind::Symlink => SkipReason::Symlink,
            Kind::File => match relative_key(relative) {
                Ok(relative) => match stat() {
                    Some(stat) => {
                        return out.send(Event::Found {
                            source: self.source.clone(),
                            relative,
                            stat,
                        });
                    }
                    None => SkipReason::Unreadable,
                },
                Err(KeyError::NotUtf8(_)) => SkipReason::NonUtf8,
                Err(_) => SkipReason::InvalidName,
            },
            Kind::Dir | Kind::Other => SkipReason::NotRegular,
        };
        self.skip(out, path.to_owned(), reason);
    }

    /// Reports a path the first time only, so rescans do not repeat it (see `skipped`).
    fn skip(&self, out: &mut Outbox, path: PathBuf, reason: SkipReason) {
        let first_time = self.skipped.lock().expect("not poisoned").first_time(&path);
        if first_time {
            out.send(Event::Skipped {
                source: self.source.clone(),
                path,
                reason,
            });
        }
    }
}

/// The next changes the watch saw; never, without a watch.
async fn next_changes(watch: &mut Option<Watch>) -> io::Result<Vec<Change>> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::DEFAULT_INCLUDE;

    /// A scan of `root` for Airflow's logs, and where its events go.
    fn scan_of(root: &Path) -> (Scan, mpsc::Receiver<Event>) {
        let include: Vec<String> = DEFAULT_INCLUDE.iter().map(|g| g.to_string()).collect();
        let (events, rx) = mpsc::channel(1000);
        let scan = Scan {
            source: Arc::new(Source::new(root).unwrap()),
            filter: Arc::new(Filter::new(&include, &[]).unwrap()),
            events,
            skipped: Arc::default(),
            max_watches: usize::MAX,
        };
        (scan, rx)
    }

    /// The logs the scan reported, with their sizes; anything else it sent fails the test.
    fn found(scan: Scan, mut rx: mpsc::Receiver<Event>) -> Vec<(String, u64)> {
        drop(scan);
        let mut found = Vec::new();
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Found { relative, stat, .. } => found.push((relative, stat.size)),
                other => panic!("unexpected {other:?}"),
            }
        }
        found
    }

    #[test]
    fn threads_sharing_a_walk_report_each_file_once_and_watch_each_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let mut want = Vec::new();
        for run in 0..20 {
            for task in 0..15 {
                let relative = format!("dag_id=d/run_id=r{run}/task_id=t{task}/attempt=1.log");
                std::fs::create_dir_all(root.join(&relative).parent().unwrap()).unwrap();
                std::fs::write(root.join(&relative), b"x").unwrap();
                want.push(relative);
            }
        }
        want.sort();
        let (scan, rx) = scan_of(&root);
        let watches = Watches::new(usize::MAX).unwrap();
        scan.walk_in(&root, Some((&watches, None)), 4);
        let mut found: Vec<String> = found(scan, rx).into_iter().map(|(r, _)| r).collect();
        found.sort();
        assert_eq!(found, want);
        // The root, dag_id=d, 20 runs and 300 tasks.
        assert_eq!(watches.len(), 1 + 1 + 20 + 300);
        assert!(watches.complete());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_mid_walk_does_not_lead_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap().join("logs");
        let inside = "dag_id=d/run_id=r/task_id=t/attempt=1.log";
        std::fs::create_dir_all(root.join(inside).parent().unwrap()).unwrap();
        std::fs::write(root.join(inside), b"in").unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("run_id=r/task_id=t")).unwrap();
        std::fs::write(outside.join("run_id=r/task_id=t/attempt=9.log"), b"out").unwrap();
        let (scan, rx) = scan_of(&root);
        // The walk has listed dag_id=d and holds it open; then it is swapped for a link.
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        let listed = open(&root.join("dag_id=d"), flags, Mode::empty()).unwrap();
        std::fs::rename(root.join("dag_id=d"), root.join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("dag_id=d")).unwrap();
        let next = Dir {
            path: root.join("dag_id=d/run_id=r"),
            parent: Some(Arc::new(listed)),
            parent_wd: None,
        };
        scan.walk_from(next, None, 1);
        // What was listed is the directory that was opened, now under `moved`.
        assert_eq!(found(scan, rx), vec![(inside.to_owned(), 2)]);
    }
}
