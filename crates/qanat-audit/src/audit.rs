//! The auditor: state fed record by record, evaluated into a [`Report`] at any time.

use std::collections::{BTreeMap, BTreeSet};

use crate::manifest::Manifest;
use crate::ranges::CoverMap;
use crate::report::{
    Duplicate, FileReport, FileStatus, Gap, NeverCollected, Partial, Reordered, Report, Summary,
    Unattributable, SCHEMA,
};
use crate::trajectory::{RawHeader, Trajectory};

/// Per-file and global caps on stored samples, so memory stays bounded on a pathological bus.
pub const MAX_SAMPLES: usize = 1000;

/// How the audit window is chosen.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--since` in epoch ms: the window starts there instead of at the beginning of the
    /// topics. Then a file's chain is checked from the lowest offset seen in the window (the
    /// bytes before it are assumed delivered before the window), and a manifest file with no
    /// record in the window counts as never collected only if it was modified at or after
    /// `since` (its newer bytes must have been shipped inside the window).
    pub since_ms: Option<i64>,
}

/// Where a record came from on the bus.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Default)]
struct FileState {
    host: String,
    path: Option<String>,
    cover: CoverMap,
    records: u64,
    bytes_delivered: u64,
    /// Highest end delivered so far per (topic, partition): reordering is judged against it.
    max_end: BTreeMap<(String, i32), u64>,
    reordered_records: u64,
    reordered_bytes: u64,
    reorders: Vec<Reordered>,
}

#[derive(Debug, Default)]
struct Expected {
    host: String,
    /// Path in the newest manifest (by ts_ms) that listed the file.
    path: String,
    path_ts: i64,
    /// Largest size any manifest reported.
    size: u64,
    mtime_ms: i64,
}

/// Chains, manifests and counters. Pure: feed it with [`Auditor::observe_record`] and
/// [`Auditor::observe_manifest`] in consumption order; [`Auditor::report`] at any time.
#[derive(Debug, Default)]
pub struct Auditor {
    opts: Options,
    files: BTreeMap<String, FileState>,
    expected: BTreeMap<String, Expected>,
    /// Per host: ts_ms of its latest manifest and the file ids it listed.
    latest: BTreeMap<String, (i64, BTreeSet<String>)>,
    records: u64,
    unattributable: u64,
    unattributable_samples: Vec<Unattributable>,
    manifests: u64,
    bad_manifests: u64,
    bad_manifest_samples: Vec<Unattributable>,
    partitions: BTreeSet<(String, i32)>,
}

impl Auditor {
    pub fn new(opts: Options) -> Self {
        Auditor {
            opts,
            ..Self::default()
        }
    }

    /// Feed one data record: its headers and where it was read. Records whose trajectory
    /// headers are missing or garbled are counted as unattributable.
    pub fn observe_record(&mut self, at: &Position, headers: &[RawHeader<'_>]) {
        self.records += 1;
        self.partitions.insert((at.topic.clone(), at.partition));
        let t = match Trajectory::parse(headers) {
            Ok(t) => t,
            Err(e) => {
                self.unattributable += 1;
                tracing::debug!(topic = %at.topic, partition = at.partition, offset = at.offset, error = %e, "unattributable record");
                if self.unattributable_samples.len() < MAX_SAMPLES {
                    self.unattributable_samples.push(Unattributable {
                        topic: at.topic.clone(),
                        partition: at.partition,
                        kafka_offset: at.offset,
                        reason: e.to_string(),
                    });
                }
                return;
            }
        };
        self.observe(at, t);
    }

    /// Feed one already-parsed trajectory.
    pub fn observe(&mut self, at: &Position, t: Trajectory) {
        let f = self.files.entry(t.file.clone()).or_default();
        f.host = t.host;
        if t.path.is_some() {
            f.path = t.path;
        }
        f.records += 1;
        f.bytes_delivered = f.bytes_delivered.saturating_add(t.size);
        let (start, end) = (t.offset, t.offset + t.size);
        let added = f.cover.add(start, end);
        let key = (at.topic.clone(), at.partition);
        let max_end = f.max_end.entry(key).or_insert(0);
        // New bytes below what this partition already delivered: they arrived late.
        if added.new_bytes > 0 && start < *max_end {
            f.reordered_records += 1;
            f.reordered_bytes += added.new_bytes;
            if f.reorders.len() < MAX_SAMPLES {
                f.reorders.push(Reordered {
                    file: t.file,
                    host: f.host.clone(),
                    path: f.path.clone().unwrap_or_default(),
                    topic: at.topic.clone(),
                    partition: at.partition,
                    kafka_offset: at.offset,
                    start,
                    end,
                    after_end: *max_end,
                });
            }
        }
        *max_end = (*max_end).max(end);
    }

    /// Feed one manifest record (key: host id; value: JSON). Unreadable ones are counted.
    pub fn observe_manifest(&mut self, at: &Position, value: Option<&[u8]>) {
        let parsed = match value {
            Some(v) => Manifest::parse(v),
            None => Err(crate::AuditError::Manifest("null value".into())),
        };
        match parsed {
            Ok(m) => self.add_manifest(m),
            Err(e) => {
                self.bad_manifests += 1;
                tracing::warn!(topic = %at.topic, partition = at.partition, offset = at.offset, error = %e, "unreadable manifest");
                if self.bad_manifest_samples.len() < MAX_SAMPLES {
                    self.bad_manifest_samples.push(Unattributable {
                        topic: at.topic.clone(),
                        partition: at.partition,
                        kafka_offset: at.offset,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }

    /// Feed one parsed manifest.
    pub fn add_manifest(&mut self, m: Manifest) {
        self.manifests += 1;
        for f in &m.files {
            let e = self.expected.entry(f.file.clone()).or_default();
            e.host.clone_from(&m.host);
            e.size = e.size.max(f.size);
            e.mtime_ms = e.mtime_ms.max(f.mtime_ms);
            if e.path.is_empty() || m.ts_ms >= e.path_ts {
                e.path.clone_from(&f.path);
                e.path_ts = m.ts_ms;
            }
        }
        let newer = self
            .latest
            .get(&m.host)
            .is_none_or(|(ts, _)| m.ts_ms >= *ts);
        if newer {
            let ids = m.files.into_iter().map(|f| f.file).collect();
            self.latest.insert(m.host, (m.ts_ms, ids));
        }
    }

    /// Evaluate everything seen so far.
    pub fn report(&self) -> Report {
        let mut r = Report {
            schema: SCHEMA.to_string(),
            ok: true,
            summary: Summary {
                records: self.records,
                unattributable_records: self.unattributable,
                attributed_records: self.records - self.unattributable,
                partitions: self.partitions.len() as u64,
                manifests: self.manifests,
                bad_manifests: self.bad_manifests,
                hosts: self.latest.len() as u64,
                since_ms: self.opts.since_ms,
                ..Summary::default()
            },
            unattributable: self.unattributable_samples.clone(),
            bad_manifests: self.bad_manifest_samples.clone(),
            ..Report::default()
        };
        let s = &mut r.summary;
        for (id, f) in &self.files {
            let exp = self.expected.get(id);
            let path = f
                .path
                .clone()
                .or_else(|| exp.map(|e| e.path.clone()))
                .unwrap_or_default();
            // With --since the window starts at the first byte seen; otherwise at 0.
            let from = match self.opts.since_ms {
                Some(_) => f.cover.first_start().unwrap_or(0),
                None => 0,
            };
            let expected_size = exp.map(|e| e.size);
            let to = f.cover.highest_end().max(expected_size.unwrap_or(0));
            let gaps = f.cover.gaps(from, to);
            let contiguous_end = f.cover.contiguous_end(from);
            let mut missing = 0;
            for &(a, b) in &gaps {
                missing += b - a;
                r.gaps.push(Gap {
                    file: id.clone(),
                    host: f.host.clone(),
                    path: path.clone(),
                    start: a,
                    end: b,
                    bytes: b - a,
                });
            }
            for (a, b, c) in f.cover.duplicates() {
                s.duplicate_ranges += 1;
                r.duplicates.push(Duplicate {
                    file: id.clone(),
                    host: f.host.clone(),
                    path: path.clone(),
                    start: a,
                    end: b,
                    deliveries: c,
                    extra_bytes: (b - a).saturating_mul(u64::from(c - 1)),
                });
            }
            let partial = expected_size.filter(|&e| e > contiguous_end);
            if let Some(e) = partial {
                r.partial.push(Partial {
                    file: id.clone(),
                    host: f.host.clone(),
                    path: path.clone(),
                    expected_size: e,
                    delivered_end: contiguous_end,
                    missing_bytes: e - contiguous_end,
                });
            }
            r.reordered.extend(f.reorders.iter().cloned());
            s.reordered_records += f.reordered_records;
            s.reordered_bytes += f.reordered_bytes;
            let dup_bytes = f.cover.duplicate_bytes();
            s.duplicate_bytes += dup_bytes;
            s.gaps += gaps.len() as u64;
            s.gap_bytes += missing;
            let status = if partial.is_some() {
                s.partial_files += 1;
                FileStatus::Partial
            } else if !gaps.is_empty() {
                FileStatus::Gaps
            } else {
                s.complete_files += 1;
                FileStatus::Complete
            };
            if !gaps.is_empty() {
                s.files_with_gaps += 1;
            }
            r.files.push(FileReport {
                file: id.clone(),
                host: f.host.clone(),
                path,
                records: f.records,
                bytes_delivered: f.bytes_delivered,
                unique_bytes: f.cover.unique_bytes(),
                duplicate_bytes: dup_bytes,
                window_start: from,
                contiguous_end,
                highest_end: f.cover.highest_end(),
                expected_size,
                in_latest_manifest: exp.map(|e| self.in_latest(&e.host, id)),
                status,
            });
        }
        for (id, e) in &self.expected {
            if self.files.contains_key(id) || e.size == 0 {
                continue;
            }
            if self.opts.since_ms.is_some_and(|since| e.mtime_ms < since) {
                continue;
            }
            s.never_collected_bytes += e.size;
            r.never_collected.push(NeverCollected {
                file: id.clone(),
                host: e.host.clone(),
                path: e.path.clone(),
                size: e.size,
                mtime_ms: e.mtime_ms,
                in_latest_manifest: self.in_latest(&e.host, id),
            });
            r.files.push(FileReport {
                file: id.clone(),
                host: e.host.clone(),
                path: e.path.clone(),
                records: 0,
                bytes_delivered: 0,
                unique_bytes: 0,
                duplicate_bytes: 0,
                window_start: 0,
                contiguous_end: 0,
                highest_end: 0,
                expected_size: Some(e.size),
                in_latest_manifest: Some(self.in_latest(&e.host, id)),
                status: FileStatus::NeverCollected,
            });
        }
        s.files = r.files.len() as u64;
        s.never_collected_files = r.never_collected.len() as u64;
        s.missing_bytes = s.gap_bytes + s.never_collected_bytes;
        r.ok = s.gaps == 0 && s.never_collected_files == 0 && s.partial_files == 0;
        r
    }

    fn in_latest(&self, host: &str, file: &str) -> bool {
        self.latest
            .get(host)
            .is_some_and(|(_, ids)| ids.contains(file))
    }
}
