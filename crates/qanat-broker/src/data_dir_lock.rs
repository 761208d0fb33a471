//! The data directory's lock: at most one process changes a data directory at a time.
//!
//! A running broker holds an exclusive advisory lock (`flock`) on `<data_dir>/.lock` for as
//! long as it runs; the commands that edit a stopped broker's files (`qanat users`, `acls`,
//! `quotas` with `--data-dir`) take the same lock for their edit. So a second broker on the
//! same directory refuses to start instead of interleaving its appends with the first one's,
//! and an offline edit never races a broker that would overwrite it. The lock is released by
//! the kernel when the process exits, however it exits: there is no stale lock to clean up.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir} is in use: another process (a running broker?) holds the lock {path}")]
    Held { dir: PathBuf, path: PathBuf },
}

/// The held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Take the lock of `data_dir` (created when missing), or fail at once if it is held.
    pub fn acquire(data_dir: &Path) -> Result<Self, LockError> {
        let path = data_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(LockError::Held {
                dir: data_dir.to_path_buf(),
                path,
            }),
            Err(TryLockError::Error(source)) => Err(io(source)),
        }
    }

    /// [`acquire`](Self::acquire) for an edit of an existing data directory: no lock (and
    /// nothing created) when the directory does not exist, since no broker can run there.
    pub fn acquire_if_exists(data_dir: &Path) -> Result<Option<Self>, LockError> {
        if !data_dir.exists() {
            return Ok(None);
        }
        Self::acquire(data_dir).map(Some)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, LockError::Held { .. }), "{err}");
        assert!(err.to_string().contains(".lock"), "{err}");
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_missing_directory_is_not_created_for_an_edit() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere");
        assert!(DataDirLock::acquire_if_exists(&missing).unwrap().is_none());
        assert!(!missing.exists());
    }
}
