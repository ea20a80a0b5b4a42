//! Finding log files under source roots: a walk at start, inotify for what changes after, and
//! a periodic rescan as a safety net (inotify drops events when its queue overflows, and a
//! directory created between two events may be missed). Never follows a symlink, never leaves
//! a root's filesystem. Reports [`Event`]s on a channel and knows nothing of what follows.

mod gate;
mod outbox;
mod scan;
mod skipped;
mod walk_stack;
mod watch;

pub use skipped::REMEMBERED as SKIPPED_REMEMBERED;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::destination::Place;
use crate::filter::Filter;
use crate::local_file::FileStat;
pub use gate::Gate;
use scan::Scan;

/// Inotify watches one source holds at most, by default: a source with fewer directories
/// (a few thousand task runs) is watched whole, for a few MiB of kernel memory.
pub const MAX_WATCHES_PER_SOURCE: usize = 10_000;

/// Inotify watches held by every source of this process.
pub fn watches_held() -> usize {
    watch::held()
}

/// A directory whose logs are shipped; its path relative to the root is the object key.
#[derive(Debug)]
pub struct Source {
    /// Names the source in the ledger: the canonical root path.
    pub id: String,
    pub root: PathBuf,
    /// Walked once to ship everything in it now, settled or not: its volume is going away.
    pub draining: bool,
    /// Closed by the pipeline while it follows as many of this source's files as it will.
    pub gate: Gate,
    /// Where its logs go, when not where the destination itself points (a volume's place
    /// under its claim's namespace).
    pub place: Option<Place>,
    dev: u64,
    removed: AtomicBool,
}

impl Source {
    /// A source at `root`, which must be a directory; symlinks in `root` itself are resolved
    /// once, here (the operator chose them), never below it.
    pub fn new(root: &Path) -> io::Result<Self> {
        let root = root.canonicalize()?;
        let meta = std::fs::metadata(&root)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        Ok(Self {
            id: root.to_string_lossy().into_owned(),
            root,
            draining: false,
            gate: Gate::default(),
            place: None,
            dev: meta.dev(),
            removed: AtomicBool::new(false),
        })
    }
}

/// What discovery saw.
#[derive(Debug)]
pub enum Event {
    /// A log file, as it looks now.
    Found {
        source: Arc<Source>,
        relative: String,
        stat: FileStat,
    },
    Gone {
        source: Arc<Source>,
        relative: String,
    },
    /// A path that matches the globs but will not be shipped; reported once per path.
    Skipped {
        source: Arc<Source>,
        path: PathBuf,
        reason: SkipReason,
    },
    /// The first walk of the source begins; what it finds follows.
    WalkStarted { source: Arc<Source> },
    /// The first walk of the source is complete.
    WalkDone { source: Arc<Source> },
    /// The source was removed; nothing more comes from it.
    SourceRemoved {
        source: Arc<Source>,
        /// Gone for good, not replaced by a walk of the same root (another drain).
        gone: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    Symlink,
    NonUtf8,
    InvalidName,
    NotRegular,
    Unreadable,
    /// Larger than `--max-file-size`.
    TooLarge,
    /// More than a little of it is holes: bytes the pod never wrote (`truncate -s 4T`).
    Sparse,
    /// Its object key would pass the destination's limit (1,024 bytes on S3).
    KeyTooLong,
    /// The destination refused the object for good (an invalid object name).
    Refused,
}

impl SkipReason {
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::Symlink => "symlink",
            SkipReason::NonUtf8 => "non_utf8",
            SkipReason::InvalidName => "invalid_name",
            SkipReason::NotRegular => "not_regular",
            SkipReason::Unreadable => "unreadable",
            SkipReason::TooLarge => "too_large",
            SkipReason::Sparse => "sparse",
            SkipReason::KeyTooLong => "key_too_long",
            SkipReason::Refused => "refused",
        }
    }
}

/// The set of source roots being watched; roots can come and go while running.
pub struct Sources {
    filter: Arc<Filter>,
    events: mpsc::Sender<Event>,
    rescan: Option<Duration>,
    max_watches: usize,
    running: HashMap<PathBuf, (Arc<Source>, JoinHandle<()>)>,
}

impl Sources {
    /// With `rescan: None` each source is walked once and not watched (for `--once`).
    pub fn new(filter: Filter, events: mpsc::Sender<Event>, rescan: Option<Duration>) -> Self {
        Self {
            filter: Arc::new(filter),
            events,
            rescan,
            max_watches: MAX_WATCHES_PER_SOURCE,
            running: HashMap::new(),
        }
    }

    /// Caps the inotify watches of each source added later; beyond it the rescan finds files.
    pub fn max_watches_per_source(mut self, max: usize) -> Self {
        self.max_watches = max;
        self
    }

    /// Starts walking and watching `root`; adding a root twice is a no-op.
    pub fn add(&mut self, root: &Path) -> io::Result<Arc<Source>> {
        self.add_to(root, None)
    }

    /// As [`Self::add`], its logs going to `place`.
    pub fn add_to(&mut self, root: &Path, place: Option<Place>) -> io::Result<Arc<Source>> {
        let mut source = Source::new(root)?;
        source.place = place;
        let source = Arc::new(source);
        if let Some((running, _)) = self.running.get(&source.root) {
            return Ok(running.clone());
        }
        self.start(source.clone(), self.rescan);
        Ok(source)
    }

    /// Stops watching `root` and walks it once more as a draining source, whose files are
    /// due at once; `WalkDone` follows the last of them. Called again, it walks again.
    pub async fn drain(&mut self, root: &Path) -> io::Result<Arc<Source>> {
        self.drain_to(root, None).await
    }

    /// As [`Self::drain`], its logs going to `place`.
    pub async fn drain_to(&mut self, root: &Path, place: Option<Place>) -> io::Result<Arc<Source>> {
        let mut source = Source::new(root)?;
        source.draining = true;
        source.place = place;
        self.stop(&source.root, false).await;
        let source = Arc::new(source);
        self.start(source.clone(), None);
        Ok(source)
    }

    fn start(&mut self, source: Arc<Source>, rescan: Option<Duration>) {
        let scan = Scan {
            source: source.clone(),
            filter: self.filter.clone(),
            events: self.events.clone(),
            skipped: Arc::default(),
            max_watches: self.max_watches,
        };
        let task = tokio::spawn(scan.run(rescan));
        self.running.insert(source.root.clone(), (source, task));
    }

    /// Stops watching `root`; what was found there and not shipped yet is dropped downstream.
    pub async fn remove(&mut self, root: &Path) -> Option<Arc<Source>> {
        self.stop(root, true).await
    }

    async fn stop(&mut self, root: &Path, gone: bool) -> Option<Arc<Source>> {
        let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
        let (source, task) = self.running.remove(&root)?;
        source.removed.store(true, Ordering::SeqCst);
        // Walking threads held at the gate see the removal and stop.
        source.gate.open();
        task.abort();
        let _ = self
            .events
            .send(Event::SourceRemoved {
                source: source.clone(),
                gone,
            })
            .await;
        Some(source)
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::DEFAULT_INCLUDE;
    use std::os::unix::ffi::OsStrExt;

    const TASK: &str = "dag_id=a/run_id=manual__2024-01-01T00:00:00+00:00/task_id=t/attempt=1.log";

    fn filter() -> Filter {
        let include: Vec<String> = DEFAULT_INCLUDE.iter().map(|g| g.to_string()).collect();
        Filter::new(&include, &[]).unwrap()
    }

    fn write(root: &Path, relative: &str, bytes: &[u8]) {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    async fn next(rx: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event in time")
            .expect("channel open")
    }

    /// Events up to the end of the first walk.
    async fn first_walk(rx: &mut mpsc::Receiver<Event>) -> (Vec<String>, Vec<SkipReason>) {
        let (mut found, mut skipped) = (Vec::new(), Vec::new());
        loop {
            match next(rx).await {
                Event::Found { relative, .. } => found.push(relative),
                Event::Skipped { reason, .. } => skipped.push(reason),
                Event::WalkStarted { .. } => {}
                Event::WalkDone { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        found.sort();
        skipped.sort_by_key(|r| r.label());
        (found, skipped)
    }

    #[tokio::test]
    async fn the_walk_finds_logs_and_skips_what_is_unsafe() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, TASK, b"x");
        write(
            root,
            "dag_id=a/run_id=r/task_id=t/attempt=1.log.trigger.3.log",
            b"y",
        );
        write(root, "scheduler/2024-01-01/a.py.log", b"z");
        write(root, "dag_id=a/run_id=r/task_id=t/notes.txt", b"n");
        std::os::unix::fs::symlink(
            "/etc/passwd",
            root.join("dag_id=a/run_id=r/task_id=t/attempt=2.log"),
        )
        .unwrap();
        // A linked directory where logs could be is reported too; Airflow's own
        // `scheduler/latest` link is not.
        std::os::unix::fs::symlink("/etc", root.join("dag_id=etc")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("scheduler/latest")).unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"attempt=\xff.log");
        std::fs::write(root.join("dag_id=a/run_id=r/task_id=t").join(odd), b"w").unwrap();
        write(root, "dag_id=a/run_id=r/task_id=t/attempt=3\n.log", b"v");

        let (tx, mut rx) = mpsc::channel(64);
        let mut sources = Sources::new(filter(), tx, None);
        sources.add(root).unwrap();
        let (found, skipped) = first_walk(&mut rx).await;
        assert_eq!(
            found,
            vec![
                TASK.to_string(),
                "dag_id=a/run_id=r/task_id=t/attempt=1.log.trigger.3.log".to_string()
            ]
        );
        assert_eq!(
            skipped,
            vec![
                SkipReason::InvalidName,
                SkipReason::NonUtf8,
                SkipReason::Symlink,
                SkipReason::Symlink
            ]
        );
    }

    #[tokio::test]
    async fn changes_are_seen_without_waiting_for_a_rescan() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (tx, mut rx) = mpsc::channel(64);
        let mut sources = Sources::new(filter(), tx, Some(Duration::from_secs(3600)));
        let source = sources.add(root).unwrap();
        assert_eq!(first_walk(&mut rx).await, (vec![], vec![]));

        write(root, TASK, b"hello");
        loop {
            if let Event::Found { relative, stat, .. } = next(&mut rx).await {
                if stat.size == 5 {
                    assert_eq!(relative, TASK);
                    break;
                }
            }
        }
        std::fs::remove_file(root.join(TASK)).unwrap();
        loop {
            if let Event::Gone { relative, .. } = next(&mut rx).await {
                assert_eq!(relative, TASK);
                break;
            }
        }
        assert_eq!(sources.len(), 1);
        let removed = sources.remove(root).await.unwrap();
        assert_eq!(removed.id, source.id);
        assert!(sources.is_empty());
        loop {
            if let Event::SourceRemoved { source, gone: true } = next(&mut rx).await {
                assert_eq!(source.id, removed.id);
                break;
            }
        }
    }

    #[tokio::test]
    async fn a_drain_stops_the_watch_and_walks_once_more() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, TASK, b"x");
        let (tx, mut rx) = mpsc::channel(64);
        let mut sources = Sources::new(filter(), tx, Some(Duration::from_secs(3600)));
        sources.add(root).unwrap();
        assert_eq!(first_walk(&mut rx).await.0, vec![TASK.to_string()]);

        let drained = sources.drain(root).await.unwrap();
        assert!(drained.draining);
        assert_eq!(sources.len(), 1);
        assert!(
            matches!(next(&mut rx).await, Event::SourceRemoved { source, gone: false } if !source.draining)
        );
        assert!(matches!(next(&mut rx).await, Event::WalkStarted { source } if source.draining));
        match next(&mut rx).await {
            Event::Found {
                source, relative, ..
            } => {
                assert!(source.draining);
                assert_eq!(relative, TASK);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(next(&mut rx).await, Event::WalkDone { source } if source.draining));
    }

    #[tokio::test]
    async fn a_log_in_a_directory_beyond_the_watch_cap_is_found_by_the_rescan() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Four directories in a chain, watched from the top: the task's has no watch.
        let task_dir = root.join("dag_id=a/run_id=r/task_id=t");
        std::fs::create_dir_all(&task_dir).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let rescan = Duration::from_millis(300);
        let mut sources = Sources::new(filter(), tx, Some(rescan)).max_watches_per_source(3);
        sources.add(root).unwrap();
        assert_eq!(first_walk(&mut rx).await, (vec![], vec![]));

        let relative = "dag_id=a/run_id=r/task_id=t/attempt=1.log";
        write(root, relative, b"deep\n");
        loop {
            if let Event::Found {
                relative: found, ..
            } = next(&mut rx).await
            {
                if found == relative {
                    break;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_missing_root_is_an_error() {
        let (tx, _rx) = mpsc::channel(1);
        let mut sources = Sources::new(filter(), tx, None);
        assert!(sources
            .add(Path::new("/nonexistent/localship/logs"))
            .is_err());
    }
}
