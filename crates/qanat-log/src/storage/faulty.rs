//! A [`Storage`] over another one whose file syncs can be made to fail or to wait, so tests
//! of the log and of the broker can inject failed and slow fdatasyncs on a real filesystem.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{LogFile, Storage};

#[derive(Debug, Default)]
struct State {
    /// `sync_data` calls still to fail.
    failures: u32,
    /// While set, `sync_data` calls wait.
    holding: bool,
    /// Calls waiting now.
    held: u32,
}

/// Shared control of a [`FaultyStorage`]'s file syncs.
#[derive(Debug, Default)]
pub struct SyncFaults {
    state: Mutex<State>,
    changed: Condvar,
}

impl SyncFaults {
    /// Make the next `n` `sync_data` calls fail with EIO (0 clears).
    pub fn fail_next(&self, n: u32) {
        self.state.lock().failures = n;
    }

    /// Make `sync_data` calls wait until [`SyncFaults::release`].
    pub fn hold(&self) {
        self.state.lock().holding = true;
    }

    /// Let waiting and later `sync_data` calls through.
    pub fn release(&self) {
        self.state.lock().holding = false;
        self.changed.notify_all();
    }

    /// Block until at least one `sync_data` call is waiting.
    pub fn wait_until_held(&self) {
        let mut s = self.state.lock();
        while s.held == 0 {
            self.changed.wait(&mut s);
        }
    }

    fn before_sync(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.holding {
            s.held += 1;
            self.changed.notify_all();
            while s.holding {
                self.changed.wait(&mut s);
            }
            s.held -= 1;
        }
        if s.failures > 0 {
            s.failures -= 1;
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }
}

/// `inner`, except for what [`SyncFaults`] injects into `sync_data`.
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    faults: Arc<SyncFaults>,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self {
            inner,
            faults: Arc::default(),
        }
    }

    /// The control shared by every file this storage opens.
    pub fn faults(&self) -> Arc<SyncFaults> {
        self.faults.clone()
    }
}

struct FaultyFile {
    inner: Arc<dyn LogFile>,
    faults: Arc<SyncFaults>,
}

impl LogFile for FaultyFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, pos)
    }
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        self.inner.append(buf)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.faults.before_sync()?;
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn preallocate(&self, len: u64) -> io::Result<()> {
        self.inner.preallocate(len)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }
}

impl Storage for FaultyStorage {
    fn open(&self, path: &Path) -> io::Result<Arc<dyn LogFile>> {
        Ok(Arc::new(FaultyFile {
            inner: self.inner.open(path)?,
            faults: self.faults.clone(),
        }))
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.inner.list_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_dir(path)
    }
}
