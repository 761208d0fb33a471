//! In-memory filesystem that models what survives a crash, for model-based tests.
//!
//! Durability model:
//! - file data: bytes written since the last `sync_data` are *pending*; a crash keeps the
//!   durable content plus an arbitrary prefix of the pending bytes (a torn write, possibly
//!   mid-batch), sometimes followed by garbage. An unsynced truncation may be undone.
//! - directory entries: file creation, rename and removal become durable only when the parent
//!   directory is `sync_dir`ed; a crash reverts the namespace to the last synced one.
//! - directories themselves are created and removed durably at once (a simplification).
//! - failures: [`SimStorage::fail_next_syncs`] makes the next `sync_data` calls fail with EIO;
//!   a failed call makes nothing durable.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{LogFile, Storage};

#[derive(Debug, Default)]
struct SimData {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// `durable[..synced_prefix] == current[..synced_prefix]`.
    synced_prefix: usize,
}

#[derive(Debug, Default)]
struct SimFile {
    data: Mutex<SimData>,
    /// `sync_data` calls still to fail, shared by every file of one [`SimStorage`].
    sync_faults: Arc<AtomicU32>,
}

impl LogFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let d = self.data.lock();
        let start = usize::try_from(pos).map_err(|_| eof())?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| d.current.get(start..end))
            .ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        self.data.lock().current.extend_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let armed = self
            .sync_faults
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if armed.is_ok() {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        let mut d = self.data.lock();
        let d = &mut *d;
        d.durable.truncate(d.synced_prefix);
        d.durable.extend_from_slice(&d.current[d.synced_prefix..]);
        d.synced_prefix = d.current.len();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("too large"))?;
        let mut d = self.data.lock();
        d.current.resize(len, 0);
        d.synced_prefix = d.synced_prefix.min(len);
        Ok(())
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file")
}
fn not_found(p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", p.display()),
    )
}

/// SplitMix64: a tiny deterministic generator so crashes replay from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..=n`.
    fn upto(&mut self, n: usize) -> usize {
        (self.next() % (n as u64 + 1)) as usize
    }
}

#[derive(Debug, Default)]
struct Namespace {
    files: HashMap<PathBuf, Arc<SimFile>>,
    /// The namespace as of the last `sync_dir` of each directory.
    durable_files: HashMap<PathBuf, Arc<SimFile>>,
    dirs: BTreeSet<PathBuf>,
}

/// In-memory [`Storage`] with an explicit durability model and [`SimStorage::crash`].
#[derive(Debug, Default)]
pub struct SimStorage {
    ns: Mutex<Namespace>,
    sync_faults: Arc<AtomicU32>,
}

impl SimStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulate power loss. Each file keeps its durable bytes plus a random prefix of its
    /// pending bytes, sometimes with a garbage tail; the namespace reverts to the last
    /// `sync_dir`. Open handles from before the crash are detached from the new state.
    pub fn crash(&self, seed: u64) {
        let mut rng = Rng(seed);
        let mut ns = self.ns.lock();
        let mut survivors: HashMap<*const SimFile, Arc<SimFile>> = HashMap::new();
        let mut files = HashMap::new();
        let mut durable: Vec<_> = ns.durable_files.iter().collect();
        durable.sort_by(|a, b| a.0.cmp(b.0)); // deterministic per seed
        for (path, f) in durable {
            let key = Arc::as_ptr(f);
            let nf = survivors
                .entry(key)
                .or_insert_with(|| Arc::new(crashed_copy(f, &mut rng, &self.sync_faults)))
                .clone();
            files.insert(path.clone(), nf);
        }
        ns.durable_files = files.clone();
        ns.files = files;
    }

    /// Make the next `n` `sync_data` calls (on any file) fail with EIO.
    pub fn fail_next_syncs(&self, n: u32) {
        self.sync_faults.store(n, Ordering::Release);
    }

    /// Length of a file in the current namespace.
    pub fn file_len(&self, path: &Path) -> Option<u64> {
        let f = self.ns.lock().files.get(path).cloned()?;
        f.len().ok()
    }

    /// Every file path in the current namespace, sorted.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = self.ns.lock().files.keys().cloned().collect();
        v.sort();
        v
    }
}

fn crashed_copy(f: &SimFile, rng: &mut Rng, sync_faults: &Arc<AtomicU32>) -> SimFile {
    let d = f.data.lock();
    let p = d.synced_prefix;
    let mut content = if d.durable.len() > p && rng.next() & 1 == 0 {
        // An unsynced truncation (and whatever followed it) is lost.
        d.durable.clone()
    } else {
        let keep = p + rng.upto(d.current.len() - p);
        d.current[..keep].to_vec()
    };
    if d.current.len() > p && rng.next() & 3 == 0 {
        // The file grew but its data did not all reach the disk.
        let n = 1 + rng.upto(80);
        content.extend((0..n).map(|_| rng.next() as u8));
    }
    SimFile {
        data: Mutex::new(SimData {
            synced_prefix: content.len(),
            durable: content.clone(),
            current: content,
        }),
        sync_faults: sync_faults.clone(),
    }
}

impl Storage for SimStorage {
    fn open(&self, path: &Path) -> io::Result<Arc<dyn LogFile>> {
        let mut ns = self.ns.lock();
        if let Some(f) = ns.files.get(path) {
            return Ok(f.clone());
        }
        let parent = path.parent().ok_or_else(|| not_found(path))?;
        if !ns.dirs.contains(parent) {
            return Err(not_found(parent));
        }
        let f = Arc::new(SimFile {
            sync_faults: self.sync_faults.clone(),
            ..SimFile::default()
        });
        ns.files.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }
    fn exists(&self, path: &Path) -> bool {
        let ns = self.ns.lock();
        ns.files.contains_key(path) || ns.dirs.contains(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.ns
            .lock()
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut ns = self.ns.lock();
        let f = ns.files.remove(from).ok_or_else(|| not_found(from))?;
        ns.files.insert(to.to_path_buf(), f);
        Ok(())
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut ns = self.ns.lock();
        for a in path.ancestors() {
            if !a.as_os_str().is_empty() {
                ns.dirs.insert(a.to_path_buf());
            }
        }
        Ok(())
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut ns = self.ns.lock();
        if !ns.dirs.contains(path) {
            return Err(not_found(path));
        }
        ns.files.retain(|p, _| !p.starts_with(path));
        ns.durable_files.retain(|p, _| !p.starts_with(path));
        ns.dirs.retain(|p| !p.starts_with(path));
        Ok(())
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let ns = self.ns.lock();
        if !ns.dirs.contains(path) {
            return Err(not_found(path));
        }
        let files = ns.files.keys();
        let dirs = ns.dirs.iter();
        Ok(files
            .chain(dirs)
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut ns = self.ns.lock();
        if !ns.dirs.contains(path) {
            return Err(not_found(path));
        }
        ns.durable_files.retain(|p, _| p.parent() != Some(path));
        let now: Vec<_> = ns
            .files
            .iter()
            .filter(|(p, _)| p.parent() == Some(path))
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect();
        ns.durable_files.extend(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn synced_data_and_entries_survive() {
        let s = SimStorage::new();
        let dir = Path::new("/d");
        s.create_dir_all(dir).unwrap();
        let a = s.open(&dir.join("a")).unwrap();
        a.append(b"hello").unwrap();
        a.sync_data().unwrap();
        s.sync_dir(dir).unwrap();
        a.append(b" world").unwrap();
        let b = s.open(&dir.join("b")).unwrap();
        b.append(b"lost").unwrap();
        b.sync_data().unwrap();
        for seed in 0..50 {
            let s2 = SimStorage::new();
            s2.create_dir_all(dir).unwrap();
            let f = s2.open(&dir.join("a")).unwrap();
            f.append(b"hello").unwrap();
            f.sync_data().unwrap();
            s2.sync_dir(dir).unwrap();
            f.append(b" world").unwrap();
            f.set_len(3).unwrap();
            s2.crash(seed);
            let f = s2.open(&dir.join("a")).unwrap();
            let n = f.len().unwrap() as usize;
            let mut buf = vec![0; n];
            f.read_exact_at(&mut buf, 0).unwrap();
            assert!(buf.starts_with(b"hel"), "{buf:?}");
        }
        s.crash(1);
        assert!(!s.exists(&dir.join("b")));
        let a = s.open(&dir.join("a")).unwrap();
        let mut buf = [0u8; 5];
        a.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
    }
}
