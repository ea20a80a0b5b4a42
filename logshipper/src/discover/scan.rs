//! Walking and watching one source root, reporting what is there as events.

use std::collections::HashSet;
use std::fs::{FileType, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use walkdir::WalkDir;

use super::{Event, SkipReason, Source};
use crate::key::{relative_key, KeyError};
use crate::local_file::FileStat;
use crate::select::Filter;

/// Changes are gathered this long before being looked at: a log being written reports every
/// line, and one look per burst is enough.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Changed paths waiting to be looked at; beyond this the watcher thread waits.
const CHANGE_QUEUE: usize = 4096;

enum Change {
    Path(PathBuf),
    Rescan,
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
        let (changes_tx, mut changes) = mpsc::channel(CHANGE_QUEUE);
        // Watching a large tree takes as long as walking it, so both run at once. A file made
        // in a directory the walk has passed but the watch has not reached yet is found by
        // the next rescan.
        let watching = rescan.map(|_| {
            let scan = self.clone();
            tokio::task::spawn_blocking(move || scan.watch(changes_tx))
        });
        self.walk_blocking(self.source.root.clone()).await;
        // Kept alive for as long as this task runs; dropping it stops the watch.
        let _watcher = match watching {
            Some(watching) => watching.await.ok().flatten(),
            None => None,
        };
        if !self.source.removed.load(Ordering::SeqCst) {
            let done = Event::WalkDone {
                source: self.source.clone(),
            };
            let _ = self.events.send(done).await;
        }
        let Some(every) = rescan else {
            return;
        };
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.walk_blocking(self.source.root.clone()).await,
                Some(first) = changes.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    let mut batch = vec![first];
                    while let Ok(next) = changes.try_recv() {
                        batch.push(next);
                    }
                    self.look_at(batch).await;
                }
            }
        }
    }

    fn watch(&self, changes: mpsc::Sender<Change>) -> Option<notify::RecommendedWatcher> {
        let root = self.source.root.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "file watch error; the periodic rescan covers it");
                    let _ = changes.blocking_send(Change::Rescan);
                    return;
                }
            };
            if event.need_rescan() {
                let _ = changes.blocking_send(Change::Rescan);
            }
            let relevant = match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            };
            if relevant {
                for path in event.paths {
                    let _ = changes.blocking_send(Change::Path(path));
                }
            }
        };
        let config = notify::Config::default().with_follow_symlinks(false);
        let watched = notify::RecommendedWatcher::new(handler, config)
            .and_then(|mut w| w.watch(&root, RecursiveMode::Recursive).map(|()| w));
        match watched {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::warn!(
                    root = %root.display(), error = %e,
                    "cannot watch for changes (raise fs.inotify.max_user_watches?); relying on the periodic rescan"
                );
                None
            }
        }
    }

    async fn look_at(&self, batch: Vec<Change>) {
        if batch.iter().any(|c| matches!(c, Change::Rescan)) {
            return self.walk_blocking(self.source.root.clone()).await;
        }
        let paths: HashSet<PathBuf> = batch
            .into_iter()
            .filter_map(|c| match c {
                Change::Path(p) => Some(p),
                Change::Rescan => None,
            })
            .collect();
        let scan = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for path in paths {
                scan.inspect(&path);
            }
        })
        .await;
    }

    async fn walk_blocking(&self, from: PathBuf) {
        let scan = self.clone();
        let _ = tokio::task::spawn_blocking(move || scan.walk(&from)).await;
    }

    fn walk(&self, from: &Path) {
        let walker = WalkDir::new(from)
            .follow_links(false)
            .same_file_system(true);
        for entry in walker {
            if self.source.removed.load(Ordering::SeqCst) {
                return;
            }
            match entry {
                Ok(entry) if entry.file_type().is_dir() => {}
                Ok(entry) => self.consider(entry.path(), entry.file_type(), entry.metadata().ok()),
                Err(e) => {
                    let raced = e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound);
                    if !raced {
                        let path = e.path().unwrap_or(from).to_owned();
                        self.skip(path, SkipReason::Unreadable);
                    }
                }
            }
        }
    }

    /// A path the watcher reported: a new directory is walked, a file considered.
    fn inspect(&self, path: &Path) {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.dev() != self.source.dev => {}
            Ok(meta) if meta.is_dir() => self.walk(path),
            Ok(meta) => self.consider(path, meta.file_type(), Some(meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let relative = path
                    .strip_prefix(&self.source.root)
                    .ok()
                    .and_then(|rel| relative_key(rel).ok())
                    .filter(|rel| self.filter.matches(rel));
                if let Some(relative) = relative {
                    self.send(Event::Gone {
                        source: self.source.clone(),
                        relative,
                    });
                }
            }
            Err(_) => {}
        }
    }

    fn consider(&self, path: &Path, file_type: FileType, meta: Option<Metadata>) {
        let Ok(relative) = path.strip_prefix(&self.source.root) else {
            return;
        };
        let shown = relative.to_string_lossy();
        if !self.filter.matches(&shown) {
            // A linked directory is not followed: say so where logs could be beneath it.
            if file_type.is_symlink() && self.filter.may_hold(&shown) {
                self.skip(path.to_owned(), SkipReason::Symlink);
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
                    return self.send(Event::Found {
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
        self.skip(path.to_owned(), reason);
    }

    /// Warns about a path the first time only, so rescans do not repeat it.
    fn skip(&self, path: PathBuf, reason: SkipReason) {
        let first_time = self
            .warned
            .lock()
            .expect("not poisoned")
            .insert(path.clone());
        if first_time {
            tracing::warn!(path = %path.display(), reason = reason.label(), "not shipping this file");
            self.send(Event::Skipped {
                source: self.source.clone(),
                path,
                reason,
            });
        }
    }

    /// Called from blocking threads only.
    fn send(&self, event: Event) {
        if !self.source.removed.load(Ordering::SeqCst) {
            let _ = self.events.blocking_send(event);
        }
    }
}
