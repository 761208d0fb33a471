//! A [`Storage`] over another one that calls hooks before every operation, so tests of the log
//! and of the broker can inject failed, slow or observed file operations on a real or
//! simulated filesystem. [`SyncFaults`] is the ready-made hook for failed and held fdatasyncs.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{LogFile, Storage};

/// One storage operation, as a [`StorageHooks`] sees it before it runs.
#[derive(Debug, Clone, Copy)]
pub enum StorageOp<'a> {
    Open(&'a Path),
    RemoveFile(&'a Path),
    Rename(&'a Path, &'a Path),
    CreateDirAll(&'a Path),
    RemoveDirAll(&'a Path),
    ListDir(&'a Path),
    SyncDir(&'a Path),
    Read,
    Append,
    SyncData,
    Len,
    SetLen(u64),
    Preallocate(u64),
    /// Write-back started of bytes `from..to` (`LogFile::start_writeback`).
    StartWriteback(u64, u64),
}

impl StorageOp<'_> {
    /// Whether the operation changes what is stored.
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            StorageOp::ListDir(_)
                | StorageOp::Read
                | StorageOp::Len
                | StorageOp::StartWriteback(..)
        )
    }
}

/// Called before each operation of a [`HookedStorage`]; an error is returned in its place.
pub trait StorageHooks: Send + Sync + 'static {
    fn before(&self, op: StorageOp<'_>) -> io::Result<()>;
}

/// `inner`, with `hooks` called before every operation (`exists` excepted: it cannot fail).
pub struct HookedStorage<H> {
    inner: Arc<dyn Storage>,
    hooks: Arc<H>,
}

impl<H: StorageHooks> HookedStorage<H> {
    pub fn with_hooks(inner: Arc<dyn Storage>, hooks: Arc<H>) -> Self {
        Self { inner, hooks }
    }

    /// The hooks shared by every file this storage opens.
    pub fn hooks(&self) -> Arc<H> {
        self.hooks.clone()
    }
}

/// A storage whose fdatasyncs fail or wait on demand.
pub type FaultyStorage = HookedStorage<SyncFaults>;

impl HookedStorage<SyncFaults> {
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self::with_hooks(inner, Arc::default())
    }

    /// The control shared by every file this storage opens.
    pub fn faults(&self) -> Arc<SyncFaults> {
        self.hooks()
    }
}

#[derive(Debug, Default)]
struct State {
    /// `sync_data` calls still to fail.
    failures: u32,
    /// While set, `sync_data` calls wait.
    holding: bool,
    /// Calls waiting now.
    held: u32,
}

/// Hooks that make file syncs fail or wait: the control of a [`FaultyStorage`].
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
}

impl StorageHooks for SyncFaults {
    fn before(&self, op: StorageOp<'_>) -> io::Result<()> {
        if !matches!(op, StorageOp::SyncData) {
            return Ok(());
        }
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

struct HookedFile<H> {
    inner: Arc<dyn LogFile>,
    hooks: Arc<H>,
}

impl<H: StorageHooks> LogFile for HookedFile<H> {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.hooks.before(StorageOp::Read)?;
        self.inner.read_exact_at(buf, pos)
    }
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        self.hooks.before(StorageOp::Append)?;
        self.inner.append(buf)
    }
    fn append_vectored(&self, bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
        self.hooks.before(StorageOp::Append)?;
        self.inner.append_vectored(bufs)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.hooks.before(StorageOp::SyncData)?;
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.hooks.before(StorageOp::Len)?;
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.hooks.before(StorageOp::SetLen(len))?;
        self.inner.set_len(len)
    }
    fn preallocate(&self, from: u64, to: u64) -> io::Result<()> {
        self.hooks.before(StorageOp::Preallocate(to))?;
        self.inner.preallocate(from, to)
    }
    fn start_writeback(&self, from: u64, to: u64) -> io::Result<()> {
        self.hooks.before(StorageOp::StartWriteback(from, to))?;
        self.inner.start_writeback(from, to)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }
}

impl<H: StorageHooks> Storage for HookedStorage<H> {
    fn open(&self, path: &Path) -> io::Result<Arc<dyn LogFile>> {
        self.hooks.before(StorageOp::Open(path))?;
        Ok(Arc::new(HookedFile {
            inner: self.inner.open(path)?,
            hooks: self.hooks.clone(),
        }))
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.hooks.before(StorageOp::RemoveFile(path))?;
        self.inner.remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.hooks.before(StorageOp::Rename(from, to))?;
        self.inner.rename(from, to)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.hooks.before(StorageOp::CreateDirAll(path))?;
        self.inner.create_dir_all(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.hooks.before(StorageOp::RemoveDirAll(path))?;
        self.inner.remove_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.hooks.before(StorageOp::ListDir(path))?;
        self.inner.list_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.hooks.before(StorageOp::SyncDir(path))?;
        self.inner.sync_dir(path)
    }
}
