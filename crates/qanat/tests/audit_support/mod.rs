//! Helpers for the audit tests, on top of `support` (the broker, `qanat`, producing,
//! Prometheus): records exactly as the agent produces them (docs/trajectory.md) and the
//! manifests it publishes.

#![allow(dead_code)]

use crate::support::Rec;

/// Producer settings for [`crate::support::produce`] that keep records in the order given
/// (acks=all, one request in flight): the audit tells reordering from loss.
pub const IN_ORDER: &[(&str, &str)] = &[
    ("acks", "all"),
    ("max.in.flight.requests.per.connection", "1"),
];

/// A source file as the agent sees it: content split into newline-terminated lines.
pub struct SimFile {
    pub host: String,
    pub id: String,
    pub path: String,
    pub content: Vec<u8>,
}

impl SimFile {
    /// `n` lines of varying length.
    pub fn new(host: &str, name: &str, n: usize) -> SimFile {
        let mut content = Vec::new();
        for i in 0..n {
            content.extend_from_slice(
                format!("{name} line {i:04} {}\n", "x".repeat(i * 7 % 50)).as_bytes(),
            );
        }
        let sig = content.len().min(1024);
        SimFile {
            host: host.into(),
            // HOST:DEV:INODE:SIG as in the contract; the audit treats it as opaque.
            id: format!(
                "{host}:2049:{}:{:08x}-{sig}",
                1000 + name.len(),
                fnv(name) as u32
            ),
            path: format!("/var/log/{name}.log"),
            content,
        }
    }

    pub fn size(&self) -> u64 {
        self.content.len() as u64
    }

    /// `(offset, size)` of every line.
    pub fn lines(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut start = 0usize;
        for (i, b) in self.content.iter().enumerate() {
            if *b == b'\n' {
                out.push((start as u64, (i + 1 - start) as u64));
                start = i + 1;
            }
        }
        out
    }

    /// The record the agent produces for bytes `[offset, offset + size)` (one event).
    pub fn record(&self, (offset, size): (u64, u64)) -> Rec {
        let bytes = &self.content[offset as usize..(offset + size) as usize];
        let value = bytes.strip_suffix(b"\n").unwrap_or(bytes).to_vec();
        let lines = bytes.iter().filter(|b| **b == b'\n').count().max(1);
        Rec::value(value)
            .key(self.id.as_bytes())
            .header("qanat.host", Some(self.host.as_bytes()))
            .header("qanat.file", Some(self.id.as_bytes()))
            .header("qanat.path", Some(self.path.as_bytes()))
            .header("qanat.offset", Some(offset.to_string().as_bytes()))
            .header("qanat.size", Some(size.to_string().as_bytes()))
            .header("qanat.lines", Some(lines.to_string().as_bytes()))
            .header("service", Some(b"checkout".as_slice()))
    }

    /// Records for lines `range` of the file.
    pub fn records(&self, range: std::ops::Range<usize>) -> Vec<Rec> {
        self.lines()[range]
            .iter()
            .map(|&l| self.record(l))
            .collect()
    }

    /// This file's entry in a manifest, with its size.
    pub fn manifest_entry(&self, size: u64, mtime_ms: i64) -> String {
        format!(
            r#"{{"path":"{}","file":"{}","size":{size},"mtime_ms":{mtime_ms}}}"#,
            self.path, self.id
        )
    }
}

/// A stand-in signature: distinct per file name (the audit treats ids as opaque).
fn fnv(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A manifest record as the agent publishes it (key: host id, value: JSON).
pub fn manifest(host: &str, ts_ms: i64, entries: &[String]) -> Rec {
    Rec::value(format!(
        r#"{{"host":"{host}","ts_ms":{ts_ms},"files":[{}]}}"#,
        entries.join(",")
    ))
    .key(host)
}
