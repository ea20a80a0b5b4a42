//! A disk that fills up when a test says so: redb's own file backend, whose writes fail with
//! ENOSPC while `full` is set, as a real full disk's do.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{Database, DatabaseError, StorageBackend};

use super::{Ledger, LedgerError};

#[derive(Debug)]
struct FullDisk {
    file: FileBackend,
    full: Arc<AtomicBool>,
}

impl FullDisk {
    fn check(&self) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(nix::errno::Errno::ENOSPC.into());
        }
        Ok(())
    }
}

impl StorageBackend for FullDisk {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.file.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }
}

/// A ledger at `path` on a disk that is full while `full` is set.
pub fn open(path: &Path, full: Arc<AtomicBool>) -> Result<Ledger, LedgerError> {
    Ledger::open_with(
        path,
        Box::new(move |path| -> Result<Database, DatabaseError> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            let disk = FullDisk {
                file: FileBackend::new(file)?,
                full: full.clone(),
            };
            redb::Builder::new().create_with_backend(disk)
        }),
    )
}
