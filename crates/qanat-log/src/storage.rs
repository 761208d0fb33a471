//! Filesystem behind a trait, so model tests can inject crashes and torn writes.
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

mod faulty;
mod sim;
pub use faulty::{FaultyStorage, HookedStorage, StorageHooks, StorageOp, SyncFaults};
pub use sim::SimStorage;

/// An open file of the log.
#[allow(clippy::len_without_is_empty)] // `len` is a fallible syscall, not a container size
pub trait LogFile: Send + Sync + 'static {
    /// Read exactly `buf.len()` bytes at `pos` (error on short read).
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()>;
    /// Append at the end of the file.
    fn append(&self, buf: &[u8]) -> io::Result<()>;
    /// Append `bufs` at the end of the file, in order, as if they were one buffer; on error
    /// any prefix of them may have been written, as with [`append`](Self::append).
    fn append_vectored(&self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        for b in bufs.iter() {
            self.append(b)?;
        }
        Ok(())
    }
    /// fdatasync.
    fn sync_data(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend. On the real filesystem this also releases blocks reserved past the
    /// end by [`LogFile::preallocate`].
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserve disk blocks for bytes `from..to` without changing the file's length, so appends
    /// into them allocate nothing. A hint: where it is not supported it does nothing.
    fn preallocate(&self, _from: u64, _to: u64) -> io::Result<()> {
        Ok(())
    }
    /// Start writing bytes `from..to` to the device without waiting for it and without making
    /// them durable (no metadata, no cache flush): the next [`sync_data`](Self::sync_data)
    /// then has less to write. A hint: where it is not supported it does nothing.
    fn start_writeback(&self, _from: u64, _to: u64) -> io::Result<()> {
        Ok(())
    }
    /// The OS descriptor, for zero-copy `sendfile`; `None` for simulated files.
    fn raw_fd(&self) -> Option<RawFd>;
}

/// A filesystem.
pub trait Storage: Send + Sync + 'static {
    /// Open for read and append, creating it if absent.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn LogFile>>;
    fn exists(&self, path: &Path) -> bool;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// File names (not paths) in a directory.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// fsync a directory so renames, creations and deletions are durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsStorage;

/// A file opened with `O_APPEND`: appends always land at the end, reads use `pread`.
#[derive(Debug)]
struct OsFile {
    file: File,
}

impl LogFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, pos)
    }
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        // `&File` implements Write; O_APPEND makes each write go to the end.
        (&self.file).write_all(buf)
    }
    fn append_vectored(&self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        // `Write::write_all_vectored` is unstable; this is its loop. `write_vectored` passes
        // at most IOV_MAX slices per writev, and O_APPEND puts every writev at the end.
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match (&self.file).write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn preallocate(&self, from: u64, to: u64) -> io::Result<()> {
        let Some((start, len)) = file_range(from, to)? else {
            return Ok(());
        };
        // Only the new range: a range from 0 makes the kernel walk the whole file on every
        // call (on tmpfs page by page, which cost more than the appends themselves).
        // SAFETY: fallocate64 on a descriptor this value owns; no memory is passed.
        let rc = unsafe {
            libc::fallocate64(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, start, len)
        };
        // Unsupported on e.g. some network filesystems: appends still work.
        hint_result(rc, &[libc::EOPNOTSUPP])
    }
    fn start_writeback(&self, from: u64, to: u64) -> io::Result<()> {
        let Some((start, len)) = file_range(from, to)? else {
            return Ok(());
        };
        // SAFETY: sync_file_range on a descriptor this value owns; no memory is passed.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        hint_result(rc, &[libc::ENOSYS, libc::EOPNOTSUPP, libc::ESPIPE])
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

/// `from..to` as the (offset, length) the file syscalls take; `None` when it is empty.
fn file_range(from: u64, to: u64) -> io::Result<Option<(libc::off64_t, libc::off64_t)>> {
    let off = |v: u64| libc::off64_t::try_from(v).map_err(|_| io::Error::other("length too large"));
    let (start, len) = (off(from)?, off(to.saturating_sub(from))?);
    Ok((len > 0).then_some((start, len)))
}

/// The outcome of a hint's syscall returning `rc`: an error, unless it is one of `unsupported`
/// (the hint then does nothing).
fn hint_result(rc: libc::c_int, unsupported: &[libc::c_int]) -> io::Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(code) if unsupported.contains(&code) => Ok(()),
        _ => Err(e),
    }
}

impl Storage for OsStorage {
    fn open(&self, path: &Path) -> io::Result<Arc<dyn LogFile>> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        Ok(Arc::new(OsFile { file }))
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                out.push(name);
            }
        }
        Ok(out)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}
