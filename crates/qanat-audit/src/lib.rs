//! The gatekeeper audit (SYSTEM.md C1–C3): proves, byte range by byte range, that every byte
//! of every source file reached the bus — or says exactly what is missing, duplicated or
//! reordered.
//!
//! # What it owns
//! The pure core of `qanat audit`: no Kafka here. The binary consumes the topics and feeds an
//! [`Auditor`] each data record's headers with its position ([`Auditor::observe_record`]) and
//! each manifest value ([`Auditor::observe_manifest`]); [`Auditor::report`] evaluates the state
//! at any time into a [`Report`], which renders as text ([`Report::render_text`]), as JSON
//! (serde, schema [`SCHEMA`]) and as gauges ([`Summary::record_metrics`]).
//!
//! # Formats
//! Input follows `docs/trajectory.md`: data records carry `qanat.host`, `qanat.file`,
//! `qanat.path`, `qanat.offset`, `qanat.size`, `qanat.lines` headers; manifest records are
//! JSON `{"host","ts_ms","files":[{"path","file","size","mtime_ms"}]}`. Host, file, offset
//! and size are required; path and lines are informational. `--since` accepts RFC 3339 or
//! epoch milliseconds ([`parse_time`]).
//!
//! # Model and invariants
//! - Per file id, a [`ranges::CoverMap`] counts how many times each byte was delivered.
//!   Gaps are the bytes with count 0 in `[window start, max(highest delivered end, manifest
//!   size))`; duplicates are the ranges with count ≥ 2 (exact ranges and counts).
//! - A record is *reordered* when it brings bytes never delivered before that lie below the
//!   highest end its own partition already delivered for that file (a redelivery is a
//!   duplicate, not a reorder; order across partitions is not defined).
//! - Ground truth: every file any manifest listed is expected up to the largest size any
//!   manifest reported, even when the host's latest manifest (by `ts_ms`) no longer lists it
//!   (rotated away or deleted after collection). Partial: the contiguous delivered run from
//!   the window start stops before that size (so a listed file with a gap in the middle is
//!   partial too). Never collected: listed with a non-zero size, no record at all.
//! - Loss (`Report::ok == false`) means a gap, a partial file or a never-collected file.
//!   Duplicates and reordering are reported but are not loss: the agent is at-least-once.
//!   Unattributable records (missing or garbled trajectory headers) and unreadable manifests
//!   are counted and sampled, never a panic, and not loss by themselves.
//! - Memory is one small map per file (an undamaged chain is a single segment) plus capped
//!   samples ([`MAX_SAMPLES`]).

mod audit;
mod manifest;
pub mod ranges;
mod report;
mod time;
pub mod trajectory;

pub use audit::{Auditor, Options, Position, MAX_SAMPLES};
pub use manifest::{Manifest, ManifestFile};
pub use report::{
    Duplicate, FileReport, FileStatus, Gap, NeverCollected, Partial, Reordered, Report, Summary,
    Unattributable, SCHEMA,
};
pub use time::parse_time;
pub use trajectory::{RawHeader, Trajectory};

/// Why an input could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    #[error("header {name}: {reason}")]
    Header { name: &'static str, reason: String },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("time: {0}")]
    Time(String),
    #[error("json: {0}")]
    Json(String),
}

#[cfg(test)]
mod tests;
