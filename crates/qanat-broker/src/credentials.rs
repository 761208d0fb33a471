//! SCRAM credentials of the broker's users, kept in `DATA_DIR/scram-credentials.json`.
//!
//! Format: `{"users": {"alice": {"SCRAM-SHA-256": {"salt": B64, "iterations": N,
//! "stored_key": B64, "server_key": B64}, ...}}}`. Only derived keys are stored, never a
//! password. Every change rewrites the file atomically (temporary file, fsync, rename, fsync
//! of the directory), so a crash leaves the old or the new set, never a mix. The same file is
//! read by `qanat users` against a stopped broker.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::scram::{ScramCredential, ScramMechanism};

pub const CREDENTIALS_FILE: &str = "scram-credentials.json";

/// Errors reading or writing a security file of the data directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Read a JSON file; a missing file is the default value.
pub(crate) fn read_json<T: DeserializeOwned + Default>(path: &Path) -> Result<T, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Format {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replace `path` with `value` as JSON: whole or not at all, durable when this returns.
pub(crate) fn write_json_atomically<T: Serialize>(
    path: &Path,
    value: &T,
) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("json.tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct CredentialsFile {
    users: BTreeMap<String, BTreeMap<ScramMechanism, ScramCredential>>,
}

/// The users and their SCRAM credentials.
#[derive(Debug)]
pub struct CredentialStore {
    path: PathBuf,
    file: RwLock<CredentialsFile>,
}

impl CredentialStore {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(CREDENTIALS_FILE);
        let file = read_json(&path)?;
        Ok(Self {
            path,
            file: RwLock::new(file),
        })
    }

    pub fn get(&self, user: &str, mechanism: ScramMechanism) -> Option<ScramCredential> {
        self.file.read().users.get(user)?.get(&mechanism).cloned()
    }

    /// Every credential of a user (for PLAIN: whichever exists checks the password).
    pub fn all_of(&self, user: &str) -> Vec<(ScramMechanism, ScramCredential)> {
        self.file
            .read()
            .users
            .get(user)
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    /// Users with the mechanisms and iteration counts of their credentials.
    pub fn list(&self) -> Vec<(String, Vec<(ScramMechanism, u32)>)> {
        self.file
            .read()
            .users
            .iter()
            .map(|(u, m)| {
                (
                    u.clone(),
                    m.iter().map(|(k, c)| (*k, c.iterations)).collect(),
                )
            })
            .collect()
    }

    /// Add or replace credentials; written durably before this returns.
    pub fn upsert(
        &self,
        changes: Vec<(String, ScramMechanism, ScramCredential)>,
    ) -> Result<(), StoreError> {
        let mut file = self.file.write();
        let mut next = file.clone();
        for (user, mechanism, credential) in changes {
            next.users
                .entry(user)
                .or_default()
                .insert(mechanism, credential);
        }
        write_json_atomically(&self.path, &next)?;
        *file = next;
        Ok(())
    }

    /// Remove credentials (a mechanism of `None`: all of the user's); returns which existed.
    pub fn delete(
        &self,
        removals: Vec<(String, Option<ScramMechanism>)>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut file = self.file.write();
        let mut next = file.clone();
        let mut existed = Vec::new();
        for (user, mechanism) in removals {
            let found = match (next.users.get_mut(&user), mechanism) {
                (None, _) => false,
                (Some(_), None) => next.users.remove(&user).is_some(),
                (Some(m), Some(mech)) => {
                    let found = m.remove(&mech).is_some();
                    if m.is_empty() {
                        next.users.remove(&user);
                    }
                    found
                }
            };
            existed.push(found);
        }
        write_json_atomically(&self.path, &next)?;
        *file = next;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::scram::MIN_ITERATIONS;

    #[test]
    fn credentials_survive_reopening_and_hold_no_password() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::open(dir.path()).unwrap();
        let c = ScramCredential::new(ScramMechanism::Sha512, b"hunter2-password", MIN_ITERATIONS)
            .unwrap();
        store
            .upsert(vec![("alice".into(), ScramMechanism::Sha512, c.clone())])
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join(CREDENTIALS_FILE)).unwrap();
        assert!(!text.contains("hunter2"));
        let reopened = CredentialStore::open(dir.path()).unwrap();
        assert_eq!(reopened.get("alice", ScramMechanism::Sha512), Some(c));
        assert_eq!(
            reopened
                .delete(vec![("alice".into(), None), ("bob".into(), None)])
                .unwrap(),
            vec![true, false]
        );
        assert!(CredentialStore::open(dir.path()).unwrap().list().is_empty());
        std::fs::write(dir.path().join(CREDENTIALS_FILE), "{").unwrap();
        assert!(CredentialStore::open(dir.path()).is_err());
    }
}
