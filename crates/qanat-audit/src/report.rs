//! The audit report: JSON schema (`qanat.audit/1`), human rendering and metrics.

use std::fmt::Write as _;

use serde::Serialize;

/// Value of the report's `schema` field; bumped on any incompatible change.
pub const SCHEMA: &str = "qanat.audit/1";

/// Everything the audit found. Serialized as the `--json` output.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub schema: String,
    /// No gap, no never-collected file, no partial file (the exit status is 0 iff `ok`).
    pub ok: bool,
    pub summary: Summary,
    pub gaps: Vec<Gap>,
    pub duplicates: Vec<Duplicate>,
    /// Sample: at most [`crate::MAX_SAMPLES`] per file; the count is in the summary.
    pub reordered: Vec<Reordered>,
    pub never_collected: Vec<NeverCollected>,
    pub partial: Vec<Partial>,
    /// Sample: at most [`crate::MAX_SAMPLES`]; the count is in the summary.
    pub unattributable: Vec<Unattributable>,
    /// Sample: at most [`crate::MAX_SAMPLES`]; the count is in the summary.
    pub bad_manifests: Vec<Unattributable>,
    pub files: Vec<FileReport>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub attributed_records: u64,
    pub unattributable_records: u64,
    pub partitions: u64,
    pub manifests: u64,
    pub bad_manifests: u64,
    pub hosts: u64,
    pub files: u64,
    pub complete_files: u64,
    pub files_with_gaps: u64,
    pub partial_files: u64,
    pub never_collected_files: u64,
    pub gaps: u64,
    pub gap_bytes: u64,
    pub never_collected_bytes: u64,
    /// `gap_bytes + never_collected_bytes`.
    pub missing_bytes: u64,
    pub duplicate_ranges: u64,
    /// Extra deliveries in bytes: a range of n bytes delivered k times counts n × (k − 1).
    pub duplicate_bytes: u64,
    pub reordered_records: u64,
    pub reordered_bytes: u64,
    pub since_ms: Option<i64>,
}

/// Bytes `[start, end)` of a file never delivered.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gap {
    pub file: String,
    pub host: String,
    pub path: String,
    pub start: u64,
    pub end: u64,
    pub bytes: u64,
}

/// Bytes `[start, end)` delivered `deliveries` (≥ 2) times.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duplicate {
    pub file: String,
    pub host: String,
    pub path: String,
    pub start: u64,
    pub end: u64,
    pub deliveries: u32,
    pub extra_bytes: u64,
}

/// A record bringing new bytes `[start, end)` after its partition had already delivered bytes
/// up to `after_end`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reordered {
    pub file: String,
    pub host: String,
    pub path: String,
    pub topic: String,
    pub partition: i32,
    pub kafka_offset: i64,
    pub start: u64,
    pub end: u64,
    pub after_end: u64,
}

/// A file some manifest listed with bytes, of which no record arrived.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NeverCollected {
    pub file: String,
    pub host: String,
    pub path: String,
    pub size: u64,
    pub mtime_ms: i64,
    pub in_latest_manifest: bool,
}

/// A file whose delivered bytes stop (contiguously from its start) before the largest size a
/// manifest reported.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Partial {
    pub file: String,
    pub host: String,
    pub path: String,
    pub expected_size: u64,
    pub delivered_end: u64,
    pub missing_bytes: u64,
}

/// A record (or manifest) that could not be attributed, and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Unattributable {
    pub topic: String,
    pub partition: i32,
    pub kafka_offset: i64,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Complete,
    Gaps,
    Partial,
    NeverCollected,
}

/// One file, collected or expected.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FileReport {
    pub file: String,
    pub host: String,
    /// Last path seen in a record (else the newest manifest's).
    pub path: String,
    pub records: u64,
    /// Σ record sizes, duplicates included.
    pub bytes_delivered: u64,
    /// Bytes delivered at least once.
    pub unique_bytes: u64,
    pub duplicate_bytes: u64,
    /// First byte the chain is checked from: 0, or with `--since` the lowest offset seen.
    pub window_start: u64,
    pub contiguous_end: u64,
    pub highest_end: u64,
    /// Largest size a manifest reported; `null` when no manifest listed the file.
    pub expected_size: Option<u64>,
    pub in_latest_manifest: Option<bool>,
    pub status: FileStatus,
}

impl Summary {
    /// Publish the counts as gauges (`qanat_audit_*`) through the `metrics` facade.
    pub fn record_metrics(&self) {
        let g = |name: &'static str, v: u64| metrics::gauge!(name).set(v as f64);
        g("qanat_audit_records", self.records);
        g(
            "qanat_audit_unattributable_records",
            self.unattributable_records,
        );
        g("qanat_audit_files", self.files);
        g("qanat_audit_complete_files", self.complete_files);
        g("qanat_audit_gaps", self.gaps);
        g("qanat_audit_missing_bytes", self.missing_bytes);
        g("qanat_audit_duplicate_bytes", self.duplicate_bytes);
        g("qanat_audit_reordered_records", self.reordered_records);
        g(
            "qanat_audit_never_collected_files",
            self.never_collected_files,
        );
        g("qanat_audit_partial_files", self.partial_files);
        g("qanat_audit_manifests", self.manifests);
        g("qanat_audit_bad_manifests", self.bad_manifests);
    }
}

impl Report {
    /// The `--json` output (pretty-printed, schema [`SCHEMA`]).
    pub fn to_json(&self) -> Result<String, crate::AuditError> {
        serde_json::to_string_pretty(self).map_err(|e| crate::AuditError::Json(e.to_string()))
    }

    /// Stable keys of every problem in the report (for `--follow` to log only new ones).
    pub fn problem_keys(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for g in &self.gaps {
            out.push((
                format!("gap {} [{}, {})", g.file, g.start, g.end),
                format!(
                    "gap: {} ({}) bytes [{}, {}) never delivered ({} bytes)",
                    g.file, g.path, g.start, g.end, g.bytes
                ),
            ));
        }
        for d in &self.duplicates {
            out.push((
                format!("dup {} [{}, {}) {}", d.file, d.start, d.end, d.deliveries),
                format!(
                    "duplicate: {} ({}) bytes [{}, {}) delivered {} times",
                    d.file, d.path, d.start, d.end, d.deliveries
                ),
            ));
        }
        for o in &self.reordered {
            out.push((
                format!("reorder {} {}/{}@{}", o.file, o.topic, o.partition, o.kafka_offset),
                format!("reordered: {} ({}) bytes [{}, {}) arrived after bytes up to {} ({}/{} offset {})", o.file, o.path, o.start, o.end, o.after_end, o.topic, o.partition, o.kafka_offset),
            ));
        }
        for n in &self.never_collected {
            out.push((
                format!("never {}", n.file),
                format!(
                    "never collected: {} ({}) {} bytes on {}",
                    n.file, n.path, n.size, n.host
                ),
            ));
        }
        for p in &self.partial {
            out.push((
                format!("partial {} {}", p.file, p.expected_size),
                format!(
                    "partial: {} ({}) delivered up to {} of {} bytes",
                    p.file, p.path, p.delivered_end, p.expected_size
                ),
            ));
        }
        out
    }

    /// The human-readable report: summary first, then each kind of problem, at most `cap`
    /// lines per section.
    pub fn render_text(&self, cap: usize) -> String {
        let s = &self.summary;
        let mut o = String::new();
        let verdict = if self.ok {
            "OK: every expected byte arrived"
        } else {
            "LOSS: bytes are missing"
        };
        let _ = writeln!(o, "qanat audit: {verdict}");
        let _ = writeln!(
            o,
            "  records {} ({} attributed, {} unattributable) from {} partition(s); manifests {} from {} host(s), {} unreadable",
            s.records, s.attributed_records, s.unattributable_records, s.partitions, s.manifests, s.hosts, s.bad_manifests
        );
        let _ = writeln!(
            o,
            "  files {}: {} complete, {} partial, {} never collected; {} with gaps",
            s.files, s.complete_files, s.partial_files, s.never_collected_files, s.files_with_gaps
        );
        let _ = writeln!(
            o,
            "  missing {} bytes ({} gap(s), {} bytes; never collected {} bytes)",
            s.missing_bytes, s.gaps, s.gap_bytes, s.never_collected_bytes
        );
        let _ = writeln!(
            o,
            "  duplicated {} bytes in {} range(s); {} reordered record(s), {} bytes (not loss: at-least-once allows both)",
            s.duplicate_bytes, s.duplicate_ranges, s.reordered_records, s.reordered_bytes
        );
        if let Some(since) = s.since_ms {
            let _ = writeln!(
                o,
                "  window: since {since} ms (chains checked from their first byte in the window)"
            );
        }
        section(
            &mut o,
            "never collected",
            s.never_collected_files,
            &self.never_collected,
            cap,
            |n| {
                format!(
                    "{}  {}  host {}  {} bytes{}",
                    n.file,
                    n.path,
                    n.host,
                    n.size,
                    if n.in_latest_manifest {
                        ""
                    } else {
                        "  (gone from the latest manifest)"
                    }
                )
            },
        );
        section(
            &mut o,
            "partial",
            s.partial_files,
            &self.partial,
            cap,
            |p| {
                format!(
                    "{}  {}  delivered [0, {}) of {} bytes: {} missing",
                    p.file, p.path, p.delivered_end, p.expected_size, p.missing_bytes
                )
            },
        );
        section(&mut o, "gaps", s.gaps, &self.gaps, cap, |g| {
            format!(
                "{}  {}  [{}, {})  {} bytes",
                g.file, g.path, g.start, g.end, g.bytes
            )
        });
        section(
            &mut o,
            "duplicates",
            s.duplicate_ranges,
            &self.duplicates,
            cap,
            |d| {
                format!(
                    "{}  {}  [{}, {})  delivered {}×  (+{} bytes)",
                    d.file, d.path, d.start, d.end, d.deliveries, d.extra_bytes
                )
            },
        );
        section(
            &mut o,
            "reordered",
            s.reordered_records,
            &self.reordered,
            cap,
            |r| {
                format!(
                    "{}  {}  [{}, {}) after bytes up to {}  ({}/{} offset {})",
                    r.file,
                    r.path,
                    r.start,
                    r.end,
                    r.after_end,
                    r.topic,
                    r.partition,
                    r.kafka_offset
                )
            },
        );
        section(
            &mut o,
            "unattributable records",
            s.unattributable_records,
            &self.unattributable,
            cap,
            |u| {
                format!(
                    "{}/{} offset {}: {}",
                    u.topic, u.partition, u.kafka_offset, u.reason
                )
            },
        );
        section(
            &mut o,
            "unreadable manifests",
            s.bad_manifests,
            &self.bad_manifests,
            cap,
            |u| {
                format!(
                    "{}/{} offset {}: {}",
                    u.topic, u.partition, u.kafka_offset, u.reason
                )
            },
        );
        section(&mut o, "files", s.files, &self.files, cap, |f| {
            format!(
                "{}  host {}  {}  records {}  delivered {} bytes  duplicates {} bytes  {}",
                f.file,
                f.host,
                f.path,
                f.records,
                f.bytes_delivered,
                f.duplicate_bytes,
                match f.status {
                    FileStatus::Complete => "complete",
                    FileStatus::Gaps => "GAPS",
                    FileStatus::Partial => "PARTIAL",
                    FileStatus::NeverCollected => "NEVER COLLECTED",
                }
            )
        });
        o
    }
}

/// One titled section, at most `cap` items, then "… and N more" (`total` may exceed the
/// items held when they are a capped sample).
fn section<T>(
    o: &mut String,
    title: &str,
    total: u64,
    items: &[T],
    cap: usize,
    line: impl Fn(&T) -> String,
) {
    if total == 0 {
        return;
    }
    let _ = writeln!(o, "\n{title} ({total}):");
    for item in items.iter().take(cap) {
        let _ = writeln!(o, "  {}", line(item));
    }
    let shown = items.len().min(cap) as u64;
    if total > shown {
        let _ = writeln!(o, "  … and {} more", total - shown);
    }
}
