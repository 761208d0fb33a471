//! The `_SUCCESS` manifest of a snapshot partition: what the partition holds and where it
//! came from. It is written last, by rename, so its presence means the partition is whole.
//!
//! Format: one JSON object (pretty-printed, UTF-8):
//!
//! ```json
//! { "table": "shop.orders", "ds": "20261129", "rows": 1000,
//!   "files": [ { "name": "part-00000.parquet", "bytes": 12345, "rows": 1000, "sha256": "…" } ],
//!   "sources": [ { "topic": "cdc.shop.orders", "partition": 0, "first_offset": 0, "last_offset": 99 } ],
//!   "base": "20261128", "delete_mode": "keep", "created_at": "2026-11-30T00:10:00Z" }
//! ```

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One data file of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub rows: u64,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// A range of a topic partition that went into the partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRange {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// The `_SUCCESS` manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub table: String,
    pub ds: String,
    pub rows: u64,
    pub files: Vec<FileEntry>,
    #[serde(default)]
    pub sources: Vec<SourceRange>,
    /// The snapshot day this partition was merged onto, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_mode: Option<String>,
    pub created_at: String,
}

/// Reading or writing a manifest failed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a manifest: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Manifest {
    /// Reads `dir/_SUCCESS`; `Ok(None)` when the partition has none (not complete).
    pub fn read(dir: &Path) -> Result<Option<Manifest>, ManifestError> {
        let path = dir.join(crate::layout::SUCCESS_FILE);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_error(&path)(err)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| ManifestError::Parse { path, source })
    }

    /// Writes `dir/_SUCCESS` durably: a temporary file, fsync, rename, fsync of `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(crate::layout::SUCCESS_FILE);
        let tmp = dir.join(".tmp-_SUCCESS");
        let text = serde_json::to_vec_pretty(self).map_err(|source| ManifestError::Parse {
            path: path.clone(),
            source,
        })?;
        let mut file = fs::File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(&text).map_err(io_error(&tmp))?;
        file.sync_all().map_err(io_error(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_error(&path))?;
        sync_dir(dir).map_err(io_error(dir))
    }
}

/// Describes a finished data file: size, and SHA-256 of its bytes.
pub fn file_entry(path: &Path, rows: u64) -> Result<FileEntry, ManifestError> {
    let mut file = fs::File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buffer[..n]);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileEntry {
        name,
        bytes,
        rows,
        sha256,
    })
}

/// Makes a directory's entries (renames, creations) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_manifest_round_trips_and_absence_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), None);
        let data = dir.path().join("part-00000.parquet");
        fs::write(&data, b"abc").unwrap();
        let manifest = Manifest {
            table: "shop.orders".into(),
            ds: "20261129".into(),
            rows: 3,
            files: vec![file_entry(&data, 3).unwrap()],
            sources: vec![SourceRange {
                topic: "cdc.shop.orders".into(),
                partition: 0,
                first_offset: 0,
                last_offset: 2,
            }],
            base: Some("20261128".into()),
            delete_mode: Some("keep".into()),
            created_at: "2026-11-30T00:00:00Z".into(),
        };
        assert_eq!(
            manifest.files[0].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        manifest.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(manifest));
    }

    #[test]
    fn a_garbled_manifest_is_a_parse_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("_SUCCESS"), b"{not json").unwrap();
        let err = Manifest::read(dir.path()).unwrap_err();
        assert!(err.to_string().contains("_SUCCESS"), "{err}");
    }
}
