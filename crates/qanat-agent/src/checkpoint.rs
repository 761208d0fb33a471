//! Durable read positions (B3). The whole state is one small file, replaced atomically:
//! write `checkpoint.tmp`, fsync it, rename it over `checkpoint`, fsync the directory. The
//! file starts with a header line carrying the body's length and CRC-32C, so a torn, truncated
//! or bit-flipped checkpoint is detected rather than trusted (see the crate docs for the
//! format).

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const MAGIC: &str = "qanat-agent-checkpoint";
const VERSION: &str = "v1";
pub const FILE_NAME: &str = "checkpoint";
const TMP_NAME: &str = "checkpoint.tmp";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One file's acknowledged position and how to recognize the file again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub id: String,
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub sig_len: u64,
    pub sig_crc: u32,
    /// Every byte below this was acknowledged by the broker.
    pub offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub host: String,
    pub files: Vec<FileEntry>,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and integers cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = format!(
            "{MAGIC} {VERSION} {} {:08x}\n",
            body.len(),
            crc32c::crc32c(&body)
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Decode and verify; the error says what failed (for the operator).
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        let nl = memchr::memchr(b'\n', bytes).ok_or("no header line")?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not UTF-8")?;
        let body = &bytes[nl + 1..];
        let mut parts = header.split(' ');
        if parts.next() != Some(MAGIC) {
            return Err("bad magic".into());
        }
        match parts.next() {
            Some(VERSION) => {}
            v => return Err(format!("unsupported version {v:?}")),
        }
        // Only the canonical spelling is accepted, so a flipped bit in the header (say, the
        // case of a hex digit) is caught like one in the body.
        let len_field = parts.next().ok_or("no length field")?;
        let len: usize = len_field.parse().map_err(|_| "bad length field")?;
        if len.to_string() != len_field {
            return Err("bad length field".into());
        }
        let crc_field = parts.next().ok_or("no checksum field")?;
        let crc = u32::from_str_radix(crc_field, 16).map_err(|_| "bad checksum field")?;
        if format!("{crc:08x}") != crc_field {
            return Err("bad checksum field".into());
        }
        if parts.next().is_some() {
            return Err("extra header fields".into());
        }
        if body.len() != len {
            return Err(format!(
                "body is {} bytes, header says {len} (truncated or extended)",
                body.len()
            ));
        }
        let actual = crc32c::crc32c(body);
        if actual != crc {
            return Err(format!(
                "checksum mismatch: header {crc:08x}, body {actual:08x}"
            ));
        }
        serde_json::from_slice(body).map_err(|e| format!("body does not parse: {e}"))
    }
}

/// The few filesystem steps the atomic replace needs, so tests can crash between them.
pub trait CheckpointFs: Send {
    /// The file's bytes, `None` if it does not exist.
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Create or truncate `path`, write `bytes`, fsync.
    fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsCheckpointFs;

impl CheckpointFs for OsCheckpointFs {
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The checkpoint file of one agent.
pub struct CheckpointStore<F: CheckpointFs> {
    fs: F,
    dir: PathBuf,
}

impl<F: CheckpointFs> CheckpointStore<F> {
    pub fn new(fs: F, dir: PathBuf) -> Self {
        CheckpointStore { fs, dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The last saved checkpoint; `Ok(None)` when there is none (first start).
    pub fn load(&self) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = self.path();
        let bytes = self.fs.read(&path).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        match bytes {
            None => Ok(None),
            Some(b) => Checkpoint::decode(&b)
                .map(Some)
                .map_err(|reason| CheckpointError::Corrupt { path, reason }),
        }
    }

    /// Replace the checkpoint atomically and durably.
    pub fn save(&self, cp: &Checkpoint) -> Result<(), CheckpointError> {
        let tmp = self.dir.join(TMP_NAME);
        let path = self.path();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { path, source }
        };
        self.fs.write_synced(&tmp, &cp.encode()).map_err(io(&tmp))?;
        self.fs.rename(&tmp, &path).map_err(io(&path))?;
        self.fs.sync_dir(&self.dir).map_err(io(&self.dir))?;
        metrics::counter!("qanat_agent_checkpoint_writes_total").increment(1);
        Ok(())
    }

    /// Keep a damaged checkpoint for inspection (policy `reread`): `checkpoint.corrupt-<ms>`.
    pub fn set_aside(&self, now_ms: u64) -> Result<PathBuf, CheckpointError> {
        let to = self.dir.join(format!("{FILE_NAME}.corrupt-{now_ms}"));
        let path = self.path();
        self.fs
            .rename(&path, &to)
            .map_err(|source| CheckpointError::Io { path, source })?;
        let _ = self.fs.sync_dir(&self.dir);
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    fn sample(offset: u64) -> Checkpoint {
        Checkpoint {
            host: "web7".into(),
            files: vec![FileEntry {
                id: "web7:1:2:0000abcd-10".into(),
                path: "/var/log/a.log".into(),
                dev: 1,
                ino: 2,
                sig_len: 10,
                sig_crc: 0xabcd,
                offset,
            }],
        }
    }

    #[test]
    fn roundtrip() {
        let cp = sample(52311);
        let bytes = cp.encode();
        assert!(bytes.starts_with(b"qanat-agent-checkpoint v1 "));
        assert_eq!(Checkpoint::decode(&bytes).unwrap(), cp);
    }

    #[test]
    fn every_single_byte_flip_or_truncation_is_detected() {
        let bytes = sample(7).encode();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x20, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                assert!(
                    Checkpoint::decode(&b).is_err(),
                    "flip {bit:#x} at {i} accepted"
                );
            }
        }
        for len in 0..bytes.len() {
            assert!(
                Checkpoint::decode(&bytes[..len]).is_err(),
                "truncation to {len} accepted"
            );
        }
        let mut longer = bytes.clone();
        longer.push(b' ');
        assert!(Checkpoint::decode(&longer).is_err());
    }

    #[test]
    fn store_on_the_real_fs() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(OsCheckpointFs, dir.path().to_path_buf());
        assert_eq!(store.load().unwrap(), None);
        store.save(&sample(1)).unwrap();
        store.save(&sample(2)).unwrap();
        assert_eq!(store.load().unwrap(), Some(sample(2)));
        std::fs::write(store.path(), b"garbage").unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        let aside = store.set_aside(5).unwrap();
        assert!(aside.exists());
        assert_eq!(store.load().unwrap(), None);
    }

    /// A disk that loses what was not made durable when it crashes: file contents not
    /// fsynced (possibly torn) and directory entries (renames) not followed by a dir fsync.
    #[derive(Default)]
    struct SimDisk {
        /// What a reader sees now.
        live: HashMap<PathBuf, Vec<u8>>,
        /// What survives a crash (name -> contents).
        durable: HashMap<PathBuf, Vec<u8>>,
        /// Remaining operations before the crash; `None`: never.
        budget: Option<usize>,
        crashed: bool,
    }

    #[derive(Clone, Default)]
    struct SimFs(Arc<Mutex<SimDisk>>);

    impl SimFs {
        fn step(&self) -> io::Result<std::sync::MutexGuard<'_, SimDisk>> {
            let mut d = self.0.lock().unwrap();
            if d.crashed {
                return Err(io::Error::other("crashed"));
            }
            if let Some(b) = d.budget.as_mut() {
                if *b == 0 {
                    d.crashed = true;
                    return Err(io::Error::other("crash"));
                }
                *b -= 1;
            }
            Ok(d)
        }

        fn reboot(&self, torn: Option<usize>) {
            let mut d = self.0.lock().unwrap();
            // A crash in the middle of a tmp write may leave a torn tmp file durable: harmless,
            // since only a rename makes it the checkpoint.
            let mut live = d.durable.clone();
            if let (Some(n), Some(tmp)) = (torn, d.live.get(Path::new("/d/checkpoint.tmp"))) {
                live.insert(
                    PathBuf::from("/d/checkpoint.tmp"),
                    tmp[..n.min(tmp.len())].to_vec(),
                );
            }
            d.live = live;
            d.budget = None;
            d.crashed = false;
        }
    }

    impl CheckpointFs for SimFs {
        fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
            Ok(self.step()?.live.get(path).cloned())
        }
        fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
            let mut d = self.step()?;
            d.live.insert(path.to_path_buf(), bytes.to_vec());
            // fsync makes the contents durable under the name the directory durably has; the
            // tmp name itself becomes durable too (simplification: the tmp is never read).
            d.durable.insert(path.to_path_buf(), bytes.to_vec());
            Ok(())
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            let mut d = self.step()?;
            let v = d
                .live
                .remove(from)
                .ok_or_else(|| io::Error::other("no such file"))?;
            d.live.insert(to.to_path_buf(), v);
            Ok(())
        }
        fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
            let mut d = self.step()?;
            d.durable = d.live.clone();
            Ok(())
        }
    }

    proptest! {
        // Whatever step a crash interrupts, the checkpoint that loads afterwards is a complete
        // one: the last fully saved, or the one being saved; never damaged, never older.
        #[test]
        fn crash_at_any_step_leaves_old_or_new(
            saves in 1usize..6,
            crash_after in 0usize..20,
            torn in proptest::option::of(0usize..200),
        ) {
            let fs = SimFs::default();
            let store = CheckpointStore::new(fs.clone(), PathBuf::from("/d"));
            fs.0.lock().unwrap().budget = Some(crash_after);
            let mut last_ok = None;
            let mut attempted = None;
            for i in 0..saves {
                attempted = Some(sample(i as u64));
                match store.save(&sample(i as u64)) {
                    Ok(()) => last_ok = Some(sample(i as u64)),
                    Err(_) => break,
                }
            }
            fs.reboot(torn);
            let loaded = store.load().unwrap();
            prop_assert!(loaded == last_ok || loaded == attempted,
                "loaded {:?}, last saved {:?}, attempted {:?}", loaded, last_ok, attempted);
        }
    }
}
