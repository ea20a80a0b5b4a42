//! What walking threads share: the directories waiting to be listed, handed from busy
//! threads to idle ones, and the kinds of entry a listing reports.

use std::fs::FileType;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use nix::dir::Type;
use nix::sys::inotify::WatchDescriptor;
use nix::sys::stat::SFlag;

/// A directory waiting to be listed.
pub(super) struct Dir {
    pub(super) path: PathBuf,
    /// The directory it was found in, still open, so that it is opened by its one name
    /// there rather than by its whole path. `None` where a walk starts.
    pub(super) parent: Option<Arc<OwnedFd>>,
    /// The watch of the directory it is in; `None` at the root or if that one is unwatched.
    pub(super) parent_wd: Option<WatchDescriptor>,
}

/// A file's kind, as the listing (or a stat, where the listing does not say) gives it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Kind {
    pub(super) fn of_mode(mode: u32) -> Self {
        match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFDIR => Kind::Dir,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }
    }

    pub(super) fn of_type(file_type: FileType) -> Self {
        if file_type.is_file() {
            Kind::File
        } else if file_type.is_dir() {
            Kind::Dir
        } else if file_type.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Other
        }
    }

    pub(super) fn listed(file_type: Option<Type>) -> Option<Self> {
        Some(match file_type? {
            Type::File => Kind::File,
            Type::Directory => Kind::Dir,
            Type::Symlink => Kind::Symlink,
            _ => Kind::Other,
        })
    }
}

/// Directories handed over between walking threads.
pub(super) struct Stack {
    pub(super) dirs: Vec<Dir>,
    /// Threads that have work, or may hand some over.
    pub(super) busy: usize,
}

/// The stack walking threads share, and a way to wait for it.
pub(super) struct Shared {
    pub(super) stack: Mutex<Stack>,
    pub(super) more: Condvar,
    /// Threads waiting for work.
    pub(super) idle: AtomicUsize,
}

impl Shared {
    /// Takes a handed-over directory, waiting while other threads may still hand one over;
    /// `None` once every thread is out of work.
    pub(super) fn wait_for_work(&self) -> Option<Dir> {
        let mut stack = self.stack.lock().expect("not poisoned");
        stack.busy -= 1;
        loop {
            if let Some(dir) = stack.dirs.pop() {
                stack.busy += 1;
                return Some(dir);
            }
            if stack.busy == 0 {
                self.more.notify_all();
                return None;
            }
            self.idle.fetch_add(1, Ordering::Relaxed);
            stack = self.more.wait(stack).expect("not poisoned");
            self.idle.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
