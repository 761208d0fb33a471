//! Manifest records: each agent's `ls` view of its sources (docs/trajectory.md).

use serde::Deserialize;

use crate::AuditError;

/// One manifest record's value.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub host: String,
    pub ts_ms: i64,
    pub files: Vec<ManifestFile>,
}

/// One file of a manifest.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: String,
    pub file: String,
    pub size: u64,
    #[serde(default)]
    pub mtime_ms: i64,
}

impl Manifest {
    /// Parse a manifest value. The record key (the host id) is only a fallback check: the
    /// value's `host` is authoritative.
    pub fn parse(value: &[u8]) -> Result<Manifest, AuditError> {
        let m: Manifest =
            serde_json::from_slice(value).map_err(|e| AuditError::Manifest(e.to_string()))?;
        if m.host.is_empty() {
            return Err(AuditError::Manifest("empty host".into()));
        }
        if let Some(f) = m.files.iter().find(|f| f.file.is_empty()) {
            return Err(AuditError::Manifest(format!(
                "empty file id for {:?}",
                f.path
            )));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let m = Manifest::parse(br#"{"host":"web7","ts_ms":1700000000000,"files":[{"path":"/var/log/app.log","file":"web7:2049:131075:9a1b2c3d-1024","size":52311,"mtime_ms":1700000000000}]}"#).unwrap();
        assert_eq!(m.files[0].size, 52311);
        assert!(Manifest::parse(b"{").is_err());
        assert!(Manifest::parse(
            br#"{"host":"h","ts_ms":1,"files":[{"path":"p","file":"f","size":-1}]}"#
        )
        .is_err());
        assert!(Manifest::parse(&[0xff, 0x00]).is_err());
    }
}
