//! Landing: bus records of one table into its change log, exactly once.
//!
//! A [`Lander`] takes the records of its table's topic partitions in offset order and keeps,
//! per topic partition, one open *group*: one [`ChangeFile`] per day (or hour) directory
//! the rows' `_log_time` falls in, all covering the same offset range `first..=last`. The
//! group is rolled when its estimated size passes `roll_bytes`, when it is `roll_age` old,
//! on a schema change, and on shutdown: every file is completed and fsynced under a
//! temporary name, then all are renamed into place. Only then does the caller commit
//! `last + 1` to the consumer group ([`Landed`]).
//!
//! # Exactly once
//!
//! On assignment of a partition the caller runs [`Lander::recover`]: temporary files are
//! removed, an incomplete newest group (a crash between its renames) is removed, and the
//! landed position is the newest complete group's `last + 1` ([`crate::offsets`]). The
//! caller starts consuming at the larger of that and the committed offset, and the lander
//! skips any record below the landed position. So the next group starts after the last
//! complete one and no two files of a partition overlap; a range that was landed in part
//! (removed as incomplete) is landed again under the same names.
//!
//! # Input kinds
//!
//! * `cdc`: Debezium's envelope (schemas disabled). The row image is `after`, or `before`
//!   for a delete; `_op` is `op` (c, u, d, r); `_log_pos` is `file:pos:row` (binlog), else
//!   `gtid`, else `lsn`, from `source`; `_log_time` is `source.ts_ms`, `_commit_ts` is
//!   `source.commit_ts_ms` when present else `source.ts_ms`, `_extract_time` is `ts_ms`.
//!   A record without a value (the tombstone after a delete) is skipped. The primary key
//!   is the field names of the record key (a JSON object), in `qanat.primary_key`.
//! * `json`: the value is one JSON object whose fields are the data columns (the
//!   collector's events); `_op` is `c`; `_log_pos` is null; the three times are the
//!   record's timestamp.
//! * `log`: the value is log text (the agent's records); columns `message` (the text),
//!   `host`, `path`, `file_id`, `file_offset`, `lines` from the `qanat.*` headers and
//!   `headers` (every other header as a JSON object); `_op` is `c`, `_log_pos` is
//!   `file_id:file_offset`, the times are the record's timestamp.
//!
//! A record that is not of its kind, or a value that does not fit a configured type, is an
//! error naming topic, partition, offset and the reason, and appends nothing; the caller
//! then flushes (lands everything before it) and stops.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike};
use serde::Deserialize;

use crate::columns;
use crate::fs::{LakeFs, OsFs};
use crate::layout::{Ds, LayoutError, TableLayout, TableName};
use crate::offsets::{self, RecoverError};
use crate::schema::{ColumnType, DataColumn, Fit, LogPos, RowImage, RowMeta, Scalar, ValueError};
use crate::sink::{self, AppendError, ChangeFile, Completed, FileFacts, SinkError};

/// What kind of records a table's topics carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    #[default]
    Cdc,
    Json,
    Log,
}

impl std::str::FromStr for InputKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cdc" => Ok(InputKind::Cdc),
            "json" => Ok(InputKind::Json),
            "log" => Ok(InputKind::Log),
            _ => Err(format!("input {s:?}: expected cdc, json or log")),
        }
    }
}

/// One table to land.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub table: TableName,
    pub input: InputKind,
    /// Configured column types; other columns are inferred.
    pub columns: Vec<(String, ColumnType)>,
    pub roll_bytes: u64,
    pub roll_age: Duration,
    /// `ds=YYYYMMDD/hh=HH/` instead of `ds=YYYYMMDD/`.
    pub hourly: bool,
}

pub const DEFAULT_ROLL_BYTES: u64 = 128 << 20;
pub const DEFAULT_ROLL_AGE: Duration = Duration::from_secs(300);

impl TableSpec {
    pub fn new(table: TableName, input: InputKind) -> TableSpec {
        TableSpec {
            table,
            input,
            columns: Vec::new(),
            roll_bytes: DEFAULT_ROLL_BYTES,
            roll_age: DEFAULT_ROLL_AGE,
            hourly: false,
        }
    }
}

/// One bus record, borrowed from the consumer's message.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Only read for `log` input.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

/// A group of files made durable and visible: commit `next_offset` for the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landed {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    pub files: Vec<PathBuf>,
    pub rows: u64,
    pub bytes: u64,
}

/// Landing failed.
#[derive(Debug, thiserror::Error)]
pub enum LandError {
    #[error("{topic}/{partition}@{offset}: {reason}")]
    BadRecord {
        topic: String,
        partition: i32,
        offset: i64,
        reason: String,
    },
    #[error("{topic}/{partition}@{offset}: {source}")]
    Decode {
        topic: String,
        partition: i32,
        offset: i64,
        source: DecodeError,
    },
    #[error("{topic}/{partition}@{offset}: {source}")]
    Value {
        topic: String,
        partition: i32,
        offset: i64,
        source: ValueError,
    },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Recover(#[from] RecoverError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// A record that is not of its table's input kind.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a change event envelope: {0}")]
    NotAnEnvelope(serde_json::Error),
    #[error("no op: not a change event envelope")]
    NoOp,
    #[error("op {0:?}: expected c, u, d or r")]
    BadOp(String),
    /// Debezium's truncate event: it names no rows, so the change log cannot hold it and a
    /// merge could not apply it.
    #[error("a TRUNCATE of the table (op \"t\", source position {0}): the lake does not apply truncates; the table's changes before it would come back in the next merge. Land the table again from a fresh snapshot (or stop capturing truncates at the source)")]
    Truncate(String),
    #[error("a delete without `before`")]
    DeleteWithoutBefore,
    #[error("op {0} without `after`")]
    NoAfter(&'static str),
    #[error("no `source` block")]
    NoSource,
    #[error("no `source.ts_ms`")]
    NoSourceTime,
    #[error("not a JSON object: {0}")]
    NotAnObject(serde_json::Error),
    #[error("record without a timestamp")]
    NoTimestamp,
    #[error("header {0} is not an integer")]
    HeaderNotInteger(String),
}

/// A record decoded: its row image and metadata.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub image: RowImage<'a>,
    pub op: &'static str,
    pub log_pos: LogPos<'a>,
    pub log_time_ms: i64,
    pub commit_ts_ms: i64,
    pub extract_time_ms: i64,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    before: Option<RowImage<'a>>,
    #[serde(borrow)]
    after: Option<RowImage<'a>>,
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    ts_ms: Option<i64>,
    #[serde(borrow)]
    source: Option<SourceBlock<'a>>,
}

#[derive(Deserialize)]
struct SourceBlock<'a> {
    ts_ms: Option<i64>,
    commit_ts_ms: Option<i64>,
    #[serde(borrow)]
    file: Option<Cow<'a, str>>,
    pos: Option<u64>,
    row: Option<u64>,
    #[serde(borrow)]
    gtid: Option<Cow<'a, str>>,
    lsn: Option<u64>,
}

/// The record's bytes as text, checked once: parsing `&str` then skips the per-string UTF-8
/// check that parsing bytes does.
fn utf8(value: &[u8]) -> Result<&str, serde_json::Error> {
    std::str::from_utf8(value).map_err(|e| serde::de::Error::custom(format!("not UTF-8: {e}")))
}

/// Decode a CDC record's value (Debezium's envelope, see the module doc).
pub fn decode_cdc(value: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    let env: Envelope<'_> = utf8(value)
        .and_then(serde_json::from_str)
        .map_err(DecodeError::NotAnEnvelope)?;
    let op = match env.op.as_deref() {
        Some("c") => "c",
        Some("u") => "u",
        Some("d") => "d",
        Some("r") => "r",
        Some("t") => {
            let at = env.source.as_ref().map_or_else(String::new, |s| {
                match (&s.file, s.pos, &s.gtid, s.lsn) {
                    (Some(file), Some(pos), _, _) => format!("{file}:{pos}"),
                    (_, _, Some(gtid), _) => gtid.to_string(),
                    (_, _, _, Some(lsn)) => format!("lsn {lsn}"),
                    _ => "unknown".to_string(),
                }
            });
            return Err(DecodeError::Truncate(at));
        }
        Some(other) => return Err(DecodeError::BadOp(other.to_owned())),
        None => return Err(DecodeError::NoOp),
    };
    let image = if op == "d" {
        env.before.ok_or(DecodeError::DeleteWithoutBefore)?
    } else {
        env.after.ok_or(DecodeError::NoAfter(op))?
    };
    let source = env.source.ok_or(DecodeError::NoSource)?;
    let log_time_ms = source.ts_ms.ok_or(DecodeError::NoSourceTime)?;
    let log_pos = match (source.file, source.pos, source.gtid, source.lsn) {
        (Some(file), Some(pos), _, _) => LogPos::Binlog {
            file,
            pos,
            row: source.row.unwrap_or(0),
        },
        (_, _, Some(gtid), _) => LogPos::Text(gtid),
        (_, _, _, Some(lsn)) => LogPos::Lsn(lsn),
        _ => LogPos::None,
    };
    Ok(Decoded {
        image,
        op,
        log_pos,
        log_time_ms,
        commit_ts_ms: source.commit_ts_ms.unwrap_or(log_time_ms),
        extract_time_ms: env.ts_ms.unwrap_or(log_time_ms),
    })
}

/// Decode a `json` record's value, with the record's timestamp.
pub fn decode_json(value: &[u8], ts: Option<i64>) -> Result<Decoded<'_>, DecodeError> {
    let image: RowImage<'_> = utf8(value)
        .and_then(serde_json::from_str)
        .map_err(DecodeError::NotAnObject)?;
    let ts = ts.ok_or(DecodeError::NoTimestamp)?;
    Ok(Decoded {
        image,
        op: "c",
        log_pos: LogPos::None,
        log_time_ms: ts,
        commit_ts_ms: ts,
        extract_time_ms: ts,
    })
}

/// Columns of `log` input, in file order, with their fixed types.
pub const LOG_COLUMNS: [(&str, ColumnType); 7] = [
    ("message", ColumnType::String),
    ("host", ColumnType::String),
    ("path", ColumnType::String),
    ("file_id", ColumnType::String),
    ("file_offset", ColumnType::Int64),
    ("lines", ColumnType::Int64),
    ("headers", ColumnType::String),
];

/// Decode a `log` record: its text and headers.
pub fn decode_log<'a>(rec: &Record<'a>) -> Result<Decoded<'a>, DecodeError> {
    let ts = rec.timestamp_ms.ok_or(DecodeError::NoTimestamp)?;
    let text = |v: Option<&'a [u8]>| match v {
        Some(b) => Scalar::Str(String::from_utf8_lossy(b)),
        None => Scalar::Null,
    };
    let mut named: [Scalar<'a>; 5] = [
        Scalar::Null,
        Scalar::Null,
        Scalar::Null,
        Scalar::Null,
        Scalar::Null,
    ];
    let mut other = serde_json::Map::new();
    for (name, value) in rec.headers {
        let slot = match *name {
            "qanat.host" => 0,
            "qanat.path" => 1,
            "qanat.file" => 2,
            "qanat.offset" => 3,
            "qanat.lines" => 4,
            _ => {
                let v = value.map_or(serde_json::Value::Null, |b| {
                    serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                });
                other.insert((*name).to_owned(), v);
                continue;
            }
        };
        named[slot] = if slot >= 3 {
            match value.map(|b| {
                std::str::from_utf8(b)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
            }) {
                Some(Some(n)) => Scalar::Int(n),
                Some(None) => return Err(DecodeError::HeaderNotInteger((*name).to_owned())),
                None => Scalar::Null,
            }
        } else {
            text(*value)
        };
    }
    let log_pos = match (&named[2], &named[3]) {
        (Scalar::Str(f), Scalar::Int(o)) => LogPos::Text(Cow::Owned(format!("{f}:{o}"))),
        _ => LogPos::None,
    };
    let [host, path, file, offset, lines] = named;
    let image = RowImage(vec![
        (Cow::Borrowed("message"), text(rec.value)),
        (Cow::Borrowed("host"), host),
        (Cow::Borrowed("path"), path),
        (Cow::Borrowed("file_id"), file),
        (Cow::Borrowed("file_offset"), offset),
        (Cow::Borrowed("lines"), lines),
        (
            Cow::Borrowed("headers"),
            Scalar::Json(serde_json::Value::Object(other).to_string()),
        ),
    ]);
    Ok(Decoded {
        image,
        op: "c",
        log_pos,
        log_time_ms: ts,
        commit_ts_ms: ts,
        extract_time_ms: ts,
    })
}

/// Types for a new group: configured ones, else kept from the previous group when this row
/// has null there, else inferred from the row. Columns of the previous group that the row
/// does not have are kept after the row's own (null in it), so a field that is only
/// sometimes present does not start a file each time it comes back.
fn columns_for(
    row: &RowImage<'_>,
    configured: &[(String, ColumnType)],
    previous: Option<&[DataColumn]>,
) -> Result<Vec<DataColumn>, String> {
    let mut out = crate::schema::infer_columns(row, configured);
    for col in &mut out {
        if columns::is_reserved(&col.name) {
            return Err(format!(
                "column {} has a name the lake reserves for its own columns",
                col.name
            ));
        }
        if col.configured {
            continue;
        }
        let was = previous.and_then(|p| p.iter().find(|c| c.name == col.name));
        let value = row.0.iter().find(|(n, _)| *n == col.name).map(|(_, v)| v);
        match (was, value) {
            (Some(was), Some(Scalar::Null)) => col.ty = was.ty,
            // A float column keeps being one when an integral value comes.
            (Some(was), Some(Scalar::Int(_))) if was.ty == ColumnType::Float64 => {
                col.ty = ColumnType::Float64
            }
            _ => {}
        }
    }
    for was in previous.into_iter().flatten() {
        if !out.iter().any(|c| c.name == was.name) {
            out.push(was.clone());
        }
    }
    Ok(out)
}

/// Hashing of the per-record lookups: fast, and the keys (topic names, partition numbers)
/// are not chosen by an adversary.
type FastHash = foldhash::fast::RandomState;

/// The open group of one topic partition.
struct Group {
    first: i64,
    last: i64,
    opened: Instant,
    files: BTreeMap<(Ds, Option<u32>), ChangeFile>,
}

struct Partition {
    /// Next offset to land: records below it are already in complete files.
    landed: i64,
    columns: Option<Vec<DataColumn>>,
    primary_key: Option<Vec<String>>,
    group: Option<Group>,
}

/// Lands the records of one table.
pub struct Lander {
    fs: Arc<dyn LakeFs>,
    spec: TableSpec,
    layout: TableLayout,
    configured: Vec<(String, ColumnType)>,
    /// Topic → partition → state; looked up by `&str`, so a record costs no allocation.
    parts: HashMap<String, HashMap<i32, Partition, FastHash>, FastHash>,
}

impl Lander {
    pub fn new(root: impl Into<PathBuf>, spec: TableSpec) -> Lander {
        Lander::with_fs(Arc::new(OsFs), root, spec)
    }

    /// A lander over another filesystem (a simulated one, in tests).
    pub fn with_fs(fs: Arc<dyn LakeFs>, root: impl Into<PathBuf>, spec: TableSpec) -> Lander {
        let mut configured = spec.columns.clone();
        if spec.input == InputKind::Log {
            for (name, ty) in LOG_COLUMNS {
                if !configured.iter().any(|(n, _)| n == name) {
                    configured.push((name.to_owned(), ty));
                }
            }
        }
        Lander {
            fs,
            layout: TableLayout::new(root, spec.table.clone()),
            spec,
            configured,
            parts: HashMap::default(),
        }
    }

    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    pub fn layout(&self) -> &TableLayout {
        &self.layout
    }

    /// Recover the landed positions of these partitions from the files (see the module doc),
    /// dropping any open group of theirs. Returns the next offset to land per partition that
    /// has files.
    pub fn recover(
        &mut self,
        partitions: &[(String, i32)],
    ) -> Result<HashMap<(String, i32), i64>, LandError> {
        for tp in partitions {
            self.revoke(&tp.0, tp.1);
        }
        let found = offsets::recover_partitions(&*self.fs, &self.layout.changes_dir(), |t, p| {
            partitions.iter().any(|(tt, pp)| tt == t && *pp == p)
        })?;
        for (path, why) in found.removed() {
            tracing::info!(table = %self.spec.table, path = %path.display(), why, "removed");
        }
        for ((t, p), next) in &found.positions {
            self.parts.entry(t.clone()).or_default().insert(
                *p,
                Partition {
                    landed: *next,
                    columns: None,
                    primary_key: None,
                    group: None,
                },
            );
        }
        Ok(found.positions)
    }

    /// Forget a partition (revoked from this consumer): its open group is abandoned.
    pub fn revoke(&mut self, topic: &str, partition: i32) {
        let part = self.parts.get_mut(topic).and_then(|t| t.remove(&partition));
        if let Some(part) = part {
            if let Some(group) = part.group {
                for (_, f) in group.files {
                    f.abandon();
                }
            }
        }
    }

    /// The next offset to land of a partition, as far as this lander knows.
    pub fn landed(&self, topic: &str, partition: i32) -> Option<i64> {
        self.parts
            .get(topic)
            .and_then(|t| t.get(&partition))
            .map(|p| p.landed)
    }

    /// Land one record. Returns the groups that became durable (roll by size, age of this
    /// partition's group, or schema change).
    pub fn push(&mut self, rec: &Record<'_>, now: Instant) -> Result<Vec<Landed>, LandError> {
        let bad = |reason: String| LandError::BadRecord {
            topic: rec.topic.to_owned(),
            partition: rec.partition,
            offset: rec.offset,
            reason,
        };
        let known = self
            .parts
            .get(rec.topic)
            .and_then(|t| t.get(&rec.partition));
        if known.is_some_and(|part| rec.offset < part.landed) {
            return Ok(Vec::new());
        }
        let decoded = match self.spec.input {
            InputKind::Cdc => rec.value.map(decode_cdc),
            InputKind::Json => rec.value.map(|v| decode_json(v, rec.timestamp_ms)),
            InputKind::Log => Some(decode_log(rec)),
        };
        let decoded = match decoded {
            // A record without a value: the tombstone after a delete.
            None => return Ok(Vec::new()),
            Some(Ok(d)) => d,
            Some(Err(source)) => {
                return Err(LandError::Decode {
                    topic: rec.topic.to_owned(),
                    partition: rec.partition,
                    offset: rec.offset,
                    source,
                })
            }
        };
        let when = DateTime::from_timestamp_millis(decoded.log_time_ms).ok_or_else(|| {
            bad(format!(
                "log time {} ms is out of range",
                decoded.log_time_ms
            ))
        })?;
        let ds = Ds::new(when.date_naive());
        let hour = self.spec.hourly.then(|| when.hour());
        let meta = RowMeta {
            op: decoded.op,
            log_pos: decoded.log_pos,
            log_time_ms: decoded.log_time_ms,
            commit_ts_ms: decoded.commit_ts_ms,
            extract_time_ms: decoded.extract_time_ms,
            topic: rec.topic,
            partition: rec.partition,
            offset: rec.offset,
        };
        let input_bytes = rec.value.map_or(0, <[u8]>::len);
        let mut landed = Vec::new();
        if !self.parts.contains_key(rec.topic) {
            self.parts.insert(rec.topic.to_owned(), HashMap::default());
        }
        let part = self
            .parts
            .get_mut(rec.topic)
            .map(|t| {
                t.entry(rec.partition).or_insert(Partition {
                    landed: 0,
                    columns: None,
                    primary_key: None,
                    group: None,
                })
            })
            .ok_or_else(|| bad("topic state missing".into()))?;
        let key = (rec.topic, rec.partition);
        if part.primary_key.is_none() {
            if let (InputKind::Cdc, Some(k)) = (self.spec.input, rec.key) {
                if let Ok(k) = serde_json::from_slice::<RowImage<'_>>(k) {
                    part.primary_key = Some(k.0.into_iter().map(|(n, _)| n.into_owned()).collect());
                }
            }
        }
        for attempt in 0..2 {
            if part.columns.is_none() {
                part.columns =
                    Some(columns_for(&decoded.image, &self.configured, None).map_err(bad)?);
            }
            let group = part.group.get_or_insert_with(|| Group {
                first: rec.offset,
                last: rec.offset,
                opened: now,
                files: BTreeMap::new(),
            });
            let file = match group.files.entry((ds, hour)) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let dir = self.layout.changes_partition(ds, hour)?;
                    let tag = format!("part-{}-{}-{}", rec.topic, rec.partition, group.first);
                    // Cloned only for a new file, not per record.
                    let columns = part.columns.clone().unwrap_or_default();
                    e.insert(ChangeFile::create(self.fs.clone(), &dir, &tag, columns)?)
                }
            };
            match file.append(&decoded.image, &meta, input_bytes) {
                Ok(Fit::Appended) => {
                    group.last = rec.offset;
                    break;
                }
                Ok(Fit::SchemaChange(why)) if attempt == 0 => {
                    tracing::info!(table = %self.spec.table, topic = rec.topic,
                        partition = rec.partition, offset = rec.offset, why, "schema change: new file");
                    landed.extend(finish_group(&*self.fs, &self.spec.table, key, part)?);
                    let next =
                        columns_for(&decoded.image, &self.configured, part.columns.as_deref())
                            .map_err(bad)?;
                    part.columns = Some(next);
                }
                Ok(Fit::SchemaChange(why)) => {
                    return Err(bad(format!(
                        "row does not fit its own inferred columns: {why}"
                    )))
                }
                Err(AppendError::Value(source)) => {
                    return Err(LandError::Value {
                        topic: rec.topic.to_owned(),
                        partition: rec.partition,
                        offset: rec.offset,
                        source,
                    })
                }
                Err(AppendError::Sink(e)) => return Err(e.into()),
            }
        }
        let roll = part.group.as_ref().is_some_and(|g| {
            now.duration_since(g.opened) >= self.spec.roll_age
                || g.files
                    .values()
                    .map(ChangeFile::estimated_bytes)
                    .sum::<u64>()
                    >= self.spec.roll_bytes
        });
        if roll {
            landed.extend(finish_group(&*self.fs, &self.spec.table, key, part)?);
        }
        Ok(landed)
    }

    /// Roll every group older than the roll age.
    pub fn tick(&mut self, now: Instant) -> Result<Vec<Landed>, LandError> {
        let roll_age = self.spec.roll_age;
        self.finish_groups(|g| now.duration_since(g.opened) >= roll_age)
    }

    /// Roll every open group (shutdown, end of `--once`).
    pub fn flush(&mut self) -> Result<Vec<Landed>, LandError> {
        self.finish_groups(|_| true)
    }

    fn finish_groups(&mut self, due: impl Fn(&Group) -> bool) -> Result<Vec<Landed>, LandError> {
        let mut out = Vec::new();
        for (topic, parts) in &mut self.parts {
            for (partition, part) in parts {
                if part.group.as_ref().is_some_and(&due) {
                    out.extend(finish_group(
                        &*self.fs,
                        &self.spec.table,
                        (topic, *partition),
                        part,
                    )?);
                }
            }
        }
        Ok(out)
    }
}

/// Complete and publish a partition's open group (see the module doc).
fn finish_group(
    fs: &dyn LakeFs,
    table: &TableName,
    (topic, partition): (&str, i32),
    part: &mut Partition,
) -> Result<Option<Landed>, LandError> {
    let Some(group) = part.group.take() else {
        return Ok(None);
    };
    let (files, empty): (Vec<_>, Vec<_>) = group.files.into_values().partition(|f| f.rows() > 0);
    for f in empty {
        f.abandon();
    }
    if files.is_empty() {
        return Ok(None);
    }
    let facts = FileFacts {
        table: table.to_string(),
        topic: topic.to_owned(),
        partition,
        first_offset: group.first,
        last_offset: group.last,
        primary_key: part.primary_key.clone().unwrap_or_default(),
        group_files: files.len(),
    };
    let mut completed: Vec<Completed> = Vec::with_capacity(files.len());
    for f in files {
        completed.push(f.complete(&facts)?);
    }
    sink::publish(fs, &completed)?;
    part.landed = group.last + 1;
    Ok(Some(Landed {
        topic: topic.to_owned(),
        partition,
        next_offset: group.last + 1,
        rows: completed.iter().map(|c| c.rows).sum(),
        bytes: completed.iter().map(|c| c.bytes).sum(),
        files: completed.into_iter().map(|c| c.path).collect(),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DAY2_MS: i64 = 1_795_910_400_000;

    fn cdc(id: i64, ts: i64) -> String {
        serde_json::json!({"op": "c", "after": {"id": id, "v": format!("x{id}")},
            "source": {"ts_ms": ts, "file": "b.1", "pos": 4 + id}, "ts_ms": ts + 1})
        .to_string()
    }

    fn push_all(lander: &mut Lander, from: i64, to: i64) -> Vec<Landed> {
        let now = Instant::now();
        let mut out = Vec::new();
        for i in from..to {
            let value = cdc(i, DAY2_MS - 5 + i);
            let key = format!("{{\"id\":{i}}}");
            let rec = Record {
                topic: "t",
                partition: 0,
                offset: i,
                timestamp_ms: None,
                key: Some(key.as_bytes()),
                value: Some(value.as_bytes()),
                headers: &[],
            };
            out.extend(lander.push(&rec, now).unwrap());
        }
        out
    }

    fn spec() -> TableSpec {
        TableSpec::new("db.t".parse().unwrap(), InputKind::Cdc)
    }

    #[test]
    fn a_group_spanning_two_days_is_one_range_in_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut lander = Lander::new(dir.path(), spec());
        assert!(lander.recover(&[("t".into(), 0)]).unwrap().is_empty());
        assert!(push_all(&mut lander, 0, 10).is_empty());
        let landed = lander.flush().unwrap();
        assert_eq!(landed.len(), 1);
        assert_eq!(landed[0].next_offset, 10);
        assert_eq!(landed[0].rows, 10);
        let names: Vec<String> = landed[0]
            .files
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        let name = crate::layout::change_file_name("t", 0, 0, 9);
        assert_eq!(
            names,
            [
                format!("db/t_changes/ds=20261128/{name}"),
                format!("db/t_changes/ds=20261129/{name}")
            ]
        );
        let meta = offsets::file_metadata(&landed[0].files[0]).unwrap();
        assert_eq!(meta["qanat.group_files"], "2");
        assert_eq!(meta["qanat.primary_key"], "id");
        // A restart recovers the position; records below it are skipped.
        let mut again = Lander::new(dir.path(), spec());
        let pos = again.recover(&[("t".into(), 0)]).unwrap();
        assert_eq!(pos[&("t".to_string(), 0)], 10);
        assert!(push_all(&mut again, 0, 10).is_empty());
        assert!(again.flush().unwrap().is_empty());
    }

    #[test]
    fn a_partly_renamed_group_and_temporary_files_are_removed_and_landed_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut lander = Lander::new(dir.path(), spec());
        lander.recover(&[("t".into(), 0)]).unwrap();
        push_all(&mut lander, 0, 3);
        let first = lander.flush().unwrap();
        push_all(&mut lander, 3, 10);
        let second = lander.flush().unwrap();
        assert_eq!(second[0].files.len(), 2);
        // A crash after renaming one file of the second group, with a stray temporary file.
        std::fs::remove_file(&second[0].files[1]).unwrap();
        let stray = second[0].files[0].with_file_name(".tmp-part-t-0-10.parquet");
        std::fs::write(&stray, b"partial").unwrap();
        let mut again = Lander::new(dir.path(), spec());
        let pos = again.recover(&[("t".into(), 0)]).unwrap();
        assert_eq!(pos[&("t".to_string(), 0)], first[0].next_offset);
        assert!(
            !second[0].files[0].exists(),
            "the incomplete group is removed"
        );
        assert!(!stray.exists());
        assert!(first[0].files.iter().all(|f| f.exists()));
        push_all(&mut again, 0, 10);
        let relanded = again.flush().unwrap();
        assert_eq!(
            relanded[0].files, second[0].files,
            "landed again under the same names"
        );
    }

    #[test]
    fn a_missing_field_is_null_and_a_new_one_starts_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut lander = Lander::new(dir.path(), spec());
        lander.recover(&[("t".into(), 0)]).unwrap();
        let rows = [
            r#"{"id":1,"v":"a","w":1}"#,
            r#"{"id":2,"w":2}"#,
            r#"{"id":3,"v":"c"}"#,
            r#"{"id":4,"v":"d","w":4,"x":true}"#,
            r#"{"id":5,"v":"e","w":5}"#,
        ];
        let mut landed = Vec::new();
        for (i, after) in rows.iter().enumerate() {
            let value = format!(
                r#"{{"op":"c","after":{after},"source":{{"ts_ms":{DAY2_MS},"file":"b.1","pos":{i}}}}}"#
            );
            let rec = Record {
                topic: "t",
                partition: 0,
                offset: i as i64,
                timestamp_ms: None,
                key: Some(b"{\"id\":1}"),
                value: Some(value.as_bytes()),
                headers: &[],
            };
            landed.extend(lander.push(&rec, Instant::now()).unwrap());
        }
        landed.extend(lander.flush().unwrap());
        let ranges: Vec<(i64, u64)> = landed.iter().map(|l| (l.next_offset, l.rows)).collect();
        assert_eq!(
            ranges,
            [(3, 3), (5, 2)],
            "only the new column x started a file"
        );
        // The second file keeps v and w, and row 5 (without x) fits it.
        let file = std::fs::File::open(&landed[1].files[0]).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let names: Vec<String> = reader
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| !n.starts_with('_'))
            .collect();
        assert_eq!(names, ["id", "v", "w", "x"]);
    }

    #[test]
    fn garbage_records_are_precise_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut lander = Lander::new(dir.path(), spec());
        let cases: [(&[u8], &str); 7] = [
            (b"\xff\xfe", "not a change event envelope"),
            (
                br#"{"op":"t","before":null,"after":null,"source":{"ts_ms":1,"file":"b.1","pos":9}}"#,
                "TRUNCATE of the table (op \"t\", source position b.1:9)",
            ),
            (b"[]", "not a change event envelope"),
            (br#"{"op":"x","after":{}}"#, "op \"x\""),
            (
                br#"{"op":"d","after":{"a":1},"source":{"ts_ms":1}}"#,
                "without `before`",
            ),
            (br#"{"op":"c","after":{"a":1}}"#, "no `source` block"),
            (
                br#"{"op":"c","after":{"_op":1},"source":{"ts_ms":1}}"#,
                "reserves",
            ),
        ];
        for (i, (value, want)) in cases.iter().enumerate() {
            let rec = Record {
                topic: "t",
                partition: 0,
                offset: i as i64,
                timestamp_ms: None,
                key: None,
                value: Some(value),
                headers: &[],
            };
            let err = lander.push(&rec, Instant::now()).unwrap_err().to_string();
            assert!(
                err.contains(&format!("t/0@{i}")) && err.contains(want),
                "{err}"
            );
        }
    }
    /// A valid envelope to cut, splice and flip bytes of.
    const GOOD: &str = r#"{"before":null,"after":{"id":7,"v":"x7","amount":"1.50","at":"2026-11-29T10:00:00Z","tags":[1,{"a":null}]},"source":{"ts_ms":1795910400000,"file":"b.1","pos":4,"row":0,"gtid":"g"},"op":"u","ts_ms":1795910400005}"#;

    fn mutations() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            (0..GOOD.len()).prop_map(|cut| GOOD.as_bytes()[..cut].to_vec()),
            (0..GOOD.len(), any::<u8>()).prop_map(|(at, b)| {
                let mut v = GOOD.as_bytes().to_vec();
                v[at] = b;
                v
            }),
            (0..GOOD.len(), proptest::collection::vec(any::<u8>(), 1..8)).prop_map(|(at, ins)| {
                let mut v = GOOD.as_bytes().to_vec();
                v.splice(at..at, ins);
                v
            }),
        ]
    }

    #[test]
    fn the_good_envelope_decodes() {
        let d = decode_cdc(GOOD.as_bytes()).unwrap();
        assert_eq!(d.op, "u");
        assert_eq!(d.image.0.len(), 5);
        assert_eq!(
            d.log_pos,
            LogPos::Binlog {
                file: Cow::Borrowed("b.1"),
                pos: 4,
                row: 0
            }
        );
        assert_eq!(d.extract_time_ms, 1_795_910_400_005);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Garbage and damaged envelopes decode or give a typed error, never a panic; what
        /// decodes lands or is refused as a typed error.
        #[test]
        fn garbage_envelopes_give_typed_errors_not_panics(value in mutations()) {
            match decode_cdc(&value) {
                Ok(_) | Err(DecodeError::NotAnEnvelope(_) | DecodeError::NoOp
                    | DecodeError::BadOp(_) | DecodeError::Truncate(_) | DecodeError::DeleteWithoutBefore
                    | DecodeError::NoAfter(_) | DecodeError::NoSource
                    | DecodeError::NoSourceTime) => {}
                Err(other) => panic!("unexpected error kind for an envelope: {other}"),
            }
            let _ = decode_json(&value, Some(0));
            let dir = tempfile::tempdir().unwrap();
            let mut lander = Lander::new(dir.path(), spec());
            let rec = Record {
                topic: "t",
                partition: 0,
                offset: 0,
                timestamp_ms: None,
                key: Some(&value),
                value: Some(&value),
                headers: &[],
            };
            match lander.push(&rec, Instant::now()) {
                Ok(_) | Err(LandError::Decode { .. } | LandError::Value { .. }
                    | LandError::BadRecord { .. }) => {}
                Err(other) => panic!("unexpected error for a bad record: {other}"),
            }
            lander.flush().unwrap();
        }
    }
}
