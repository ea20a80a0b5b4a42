//! Walking and watching one source root, reporting what is there as events.

use std::collections::HashSet;
use std::fs::{FileType, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use nix::sys::inotify::WatchDescriptor;

use super::watch::{Change, Watch, Watches};
use super::{Event, SkipReason, Source};
use crate::key::{relative_key, KeyError};
use crate::local_file::FileStat;
use crate::select::Filter;

/// Changes are gathered this long before being looked at: a log being written reports every
/// line, and one look per burst is enough.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Events sent together.
const BURST: usize = 64;

/// Threads at most for a first walk.
const MAX_WALKERS: usize = 4;

type Dir = (PathBuf, Option<WatchDescriptor>);

/// Directories handed over between walking threads, and how many threads still have work.
struct Shared {
    dirs: Mutex<(Vec<Dir>, usize)>,
    more: Condvar,
    /// Threads waiting for work.
    idle: AtomicUsize,
}

impl Shared {
    /// Takes a handed-over directory, waiting while other threads may still hand one over;
    /// `None` once every thread is out of work.
    fn wait_for_work(&self) -> Option<Dir> {
        let mut dirs = self.dirs.lock().expect("not poisoned");
        dirs.1 -= 1;
        loop {
            if let Some(dir) = dirs.0.pop() {
                dirs.1 += 1;
                return Some(dir);
            }
            if dirs.1 == 0 {
                self.more.notify_all();
                return None;
            }
            self.idle.fetch_add(1, Ordering::Relaxed);
            dirs = self.more.wait(dirs).expect("not poisoned");
            self.idle.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

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
    /// Paths already warned about, so a rescan does not repeat the warning.
    pub(super) warned: Arc<Mutex<HashSet<PathBuf>>>,
}

impl Scan {
    pub(super) async fn run(self, rescan: Option<Duration>) {
        let root = self.source.root.clone();
        let watches = rescan.and_then(|_| match Watches::new() {
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
                    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                    let threads = threads.min(MAX_WALKERS);
                    scan.walk_in(&root, watches.as_ref().map(|w| (w, None)), threads);
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
    /// of a large tree is bound by the kernel's directory reads, one core's worth per thread.
    fn walk_in(
        &self,
        from: &Path,
        watching: Option<(&Watches, Option<WatchDescriptor>)>,
        threads: usize,
    ) {
        let (watches, top) = match watching {
            Some((watches, parent)) => {
                let name = match parent {
                    None => Some(from.as_os_str()),
                    Some(_) => from.file_name(),
                };
                let top = name.and_then(|name| watches.watch(from, parent, name));
                (Some(watches), top)
            }
            None => (None, None),
        };
        let shared = Shared {
            dirs: Mutex::new((vec![(from.to_path_buf(), top)], threads)),
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
                shared.dirs.lock().expect("not poisoned").0.clear();
            }
            let Some((dir, wd)) = local.pop().or_else(|| shared.wait_for_work()) else {
                return;
            };
            local.extend(self.list(&mut out, &dir, wd, watches));
            if shared.idle.load(Ordering::Relaxed) > 0 && local.len() > 1 {
                let half = local.split_off(local.len() / 2);
                shared.dirs.lock().expect("not poisoned").0.extend(half);
                shared.more.notify_all();
            }
        }
    }

    /// Reports the files in `dir` and returns the directories in it, watching them first.
    /// Written out rather than through walkdir, which stats every entry by its full path:
    /// here the type comes from the listing and the stat is relative to the open directory,
    /// which makes a walk of 100,000 logs about a third faster.
    fn list(
        &self,
        out: &mut Outbox,
        dir: &Path,
        wd: Option<WatchDescriptor>,
        watches: Option<&Watches>,
    ) -> Vec<Dir> {
        let mut below = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                self.unreadable(out, dir.to_owned(), &e);
                return below;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.unreadable(out, dir.to_owned(), &e);
                    break;
                }
            };
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let meta = entry.metadata();
            if !file_type.is_dir() {
                self.consider(out, &entry.path(), file_type, meta.ok());
                continue;
            }
            match meta {
                Ok(meta) if meta.dev() == self.source.dev => {
                    let path = entry.path();
                    let child = match (watches, wd) {
                        (Some(watches), Some(wd)) => {
                            watches.watch(&path, Some(wd), &entry.file_name())
                        }
                        _ => None,
                    };
                    below.push((path, child));
                }
                Ok(_) => {}
                Err(e) => self.unreadable(out, entry.path(), &e),
            }
        }
        below
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
            Ok(meta) => self.consider(out, path, meta.file_type(), Some(meta)),
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

    fn consider(&self, out: &mut Outbox, path: &Path, file_type: FileType, meta: Option<Metadata>) {
        let Ok(relative) = path.strip_prefix(&self.source.root) else {
            return;
        };
        let shown = relative.to_string_lossy();
        if !self.filter.matches(&shown) {
            // A linked directory is not followed: say so where logs could be beneath it.
            if file_type.is_symlink() && self.filter.may_hold(&shown) {
                self.skip(out, path.to_owned(), SkipReason::Symlink);
            }
            return;
        }
        let reason = if file_type.is_symlink() {
            SkipReason::Symlink
        } else if !file_type.is_file() {
            SkipReason::NotRegular
        } else {
            match (relative_key(relative), meta) {
                (Ok(relative), Some(meta)) => {
                    return out.send(Event::Found {
                        source: self.source.clone(),
                        relative,
                        stat: FileStat::of(&meta),
                    });
                }
                (Err(KeyError::NotUtf8(_)), _) => SkipReason::NonUtf8,
                (Err(_), _) => SkipReason::InvalidName,
                (Ok(_), None) => SkipReason::Unreadable,
            }
        };
        self.skip(out, path.to_owned(), reason);
    }

    /// Warns about a path the first time only, so rescans do not repeat it.
    fn skip(&self, out: &mut Outbox, path: PathBuf, reason: SkipReason) {
        let first_time = self
            .warned
            .lock()
            .expect("not poisoned")
            .insert(path.clone());
        if first_time {
            tracing::warn!(path = %path.display(), reason = reason.label(), "not shipping this file");
            out.send(Event::Skipped {
                source: self.source.clone(),
                path,
                reason,
            });
        }
    }
}

/// Events from one thread on their way to the pipeline. They go in bursts, so the pipeline
/// is woken once per burst rather than once per file (a sixth of a walk's time went to
/// wake-ups); what is left goes when the outbox is dropped, at the end of a walk or look.
struct Outbox<'a> {
    scan: &'a Scan,
    queued: Vec<Event>,
}

impl<'a> Outbox<'a> {
    fn new(scan: &'a Scan) -> Self {
        Self {
            scan,
            queued: Vec::new(),
        }
    }

    fn send(&mut self, event: Event) {
        self.queued.push(event);
        if self.queued.len() >= BURST {
            self.flush();
        }
    }

    /// Called from blocking threads only.
    fn flush(&mut self) {
        for event in self.queued.drain(..) {
            if self.scan.source.removed.load(Ordering::SeqCst) {
                break;
            }
            let _ = self.scan.events.blocking_send(event);
        }
    }
}

impl Drop for Outbox<'_> {
    fn drop(&mut self) {
        self.flush();
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
    use crate::select::DEFAULT_INCLUDE;

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
        let include: Vec<String> = DEFAULT_INCLUDE.iter().map(|g| g.to_string()).collect();
        let (events, mut rx) = mpsc::channel(1000);
        let scan = Scan {
            source: Arc::new(Source::new(&root).unwrap()),
            filter: Arc::new(Filter::new(&include, &[]).unwrap()),
            events,
            warned: Arc::default(),
        };
        let watches = Watches::new().unwrap();
        scan.walk_in(&root, Some((&watches, None)), 4);
        drop(scan);
        let mut found = Vec::new();
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Found { relative, .. } => found.push(relative),
                other => panic!("unexpected {other:?}"),
            }
        }
        found.sort();
        assert_eq!(found, want);
        // The root, dag_id=d, 20 runs and 300 tasks.
        assert_eq!(watches.len(), 1 + 1 + 20 + 300);
        assert!(watches.complete());
    }
}
