//! The row audit of one table and day: bus → change log → snapshot.
//!
//! 1. **Transactions** (when the CDC transaction topic is read): every transaction with an
//!    event of the table in the day must have on the bus as many of the table's events as
//!    its END marker counts for the table.
//! 2. **Bus → change log**: every change event on the bus whose `source.ts_ms` falls in the
//!    day must be a row of the day's change log (same topic, partition and offset), once.
//! 3. **Change log → snapshot**: per primary key, the latest change of the day (by
//!    `_partition`, `_offset`) decides what the day's snapshot partition (complete: with
//!    `_SUCCESS`) must hold. A `c`/`u`/`r` must be there with the same values, from the same
//!    change (`_partition`, `_offset`), not flagged deleted. A `d`, by the manifest's delete
//!    mode: `keep` — there, `_deleted = true`; `drop-final` — the latest non-delete change
//!    of the day if there is one; `drop-all` — absent.
//!
//! Differences are reported by offset range (consecutive offsets coalesced) and by key range
//! (consecutive integer keys coalesced, other keys listed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    Int8Type, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use serde::Serialize;

use crate::columns;
use crate::error::LakeError;
use crate::layout::{Ds, TableLayout};
use crate::manifest::{Manifest, ManifestError};
use crate::read::{parquet_files, ParquetInput};

/// The audit could not read what it checks.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Read(#[from] LakeError),
    #[error("{path}: {reason}")]
    Shape { path: PathBuf, reason: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// One change event of the table on the bus, in the day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEvent {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Primary-key values as text, in key order (JSON strings unquoted).
    pub key: Vec<String>,
    pub transaction: Option<String>,
}

/// A transaction's END marker: how many events of this table it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionCount {
    pub id: String,
    pub events: u64,
}

/// A run of offsets of one topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OffsetRange {
    pub topic: String,
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

/// One kind of difference, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// `missing_in_change_log`, `duplicate_in_change_log`, `missing_in_snapshot`,
    /// `stale_in_snapshot`, `value_differs`, `deleted_flag_wrong`, `present_after_delete`,
    /// `transaction_incomplete`.
    pub kind: String,
    pub keys: Vec<String>,
    pub offsets: Vec<OffsetRange>,
    pub detail: String,
}

/// The audit's findings.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub table: String,
    pub ds: String,
    pub primary_key: Vec<String>,
    pub bus_events: Option<u64>,
    pub transactions: Option<u64>,
    pub change_log_rows: u64,
    pub change_log_files: u64,
    pub changed_keys: u64,
    /// `None` when the day has no complete snapshot partition.
    pub snapshot_rows: Option<u64>,
    pub delete_mode: Option<String>,
    pub differences: Vec<Difference>,
    /// No difference found.
    pub ok: bool,
}

/// A snapshot row of a key changed in the day: deleted flag, `_partition`, `_offset` and
/// data values.
type SnapshotRow = (
    bool,
    Option<i64>,
    Option<i64>,
    Vec<(String, Option<String>)>,
);

/// A key's latest change of the day, and the latest non-delete change before it.
#[derive(Debug, Clone)]
struct Change {
    op: String,
    topic: String,
    partition: i32,
    offset: i64,
    values: Vec<(String, Option<String>)>,
}

#[derive(Debug, Default)]
struct KeyChanges {
    latest: Option<Change>,
    latest_kept: Option<Change>,
}

/// Every batch of a Parquet file, with the file's key-value metadata.
fn read_batches(path: &Path) -> Result<(Vec<RecordBatch>, HashMap<String, String>), AuditError> {
    let input = ParquetInput::open(path)?;
    let batches = input.batches()?.collect::<Result<Vec<_>, _>>()?;
    Ok((batches, input.metadata))
}

/// The day's change-log files; none when the day has no directory (a day with no landed
/// change is not an error: the bus side then shows what is missing).
fn change_log_files(day_dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    match std::fs::metadata(day_dir) {
        Ok(_) => Ok(parquet_files(day_dir)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(AuditError::Io {
            path: day_dir.to_owned(),
            source,
        }),
    }
}

/// The data columns of a batch (every column but the lake's own), by name.
fn data_columns(batch: &RecordBatch) -> Vec<(String, &dyn Array)> {
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| !columns::is_reserved(f.name()))
        .map(|(f, c)| (f.name().clone(), c.as_ref()))
        .collect()
}

/// A row's primary key as text, one string per key column.
fn key_text(pk_cols: &[&dyn Array], row: usize) -> Vec<String> {
    pk_cols
        .iter()
        .map(|c| cell_text(*c, row).unwrap_or_default())
        .collect()
}

/// A cell as comparable text; `None` for null. Timestamps and dates as their raw numbers
/// (both sides carry the same types), decimals as unscaled/scale.
pub fn cell_text(array: &dyn Array, row: usize) -> Option<String> {
    if array.is_null(row) {
        return None;
    }
    macro_rules! prim {
        ($t:ty) => {
            array.as_primitive::<$t>().value(row).to_string()
        };
    }
    Some(match array.data_type() {
        DataType::Boolean => array.as_boolean().value(row).to_string(),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => prim!(Float32Type),
        DataType::Float64 => prim!(Float64Type),
        DataType::Utf8 => array.as_string::<i32>().value(row).to_owned(),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row).to_owned(),
        DataType::Date32 => prim!(Date32Type),
        DataType::Timestamp(TimeUnit::Second, _) => prim!(TimestampSecondType),
        DataType::Timestamp(TimeUnit::Millisecond, _) => prim!(TimestampMillisecondType),
        DataType::Timestamp(TimeUnit::Microsecond, _) => prim!(TimestampMicrosecondType),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => prim!(TimestampNanosecondType),
        DataType::Decimal128(_, s) => {
            format!("{}e-{s}", array.as_primitive::<Decimal128Type>().value(row))
        }
        other => format!("<{other}>"),
    })
}

fn column<'b>(
    batch: &'b RecordBatch,
    name: &str,
    path: &Path,
) -> Result<&'b dyn Array, AuditError> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| AuditError::Shape {
            path: path.to_owned(),
            reason: format!("no column {name}"),
        })
}

fn int_cell(array: &dyn Array, row: usize) -> Option<i64> {
    cell_text(array, row).and_then(|t| t.parse().ok())
}

/// Coalesce offsets of each topic partition into runs.
fn offset_ranges(mut at: Vec<(String, i32, i64)>) -> Vec<OffsetRange> {
    at.sort();
    at.dedup();
    let mut out: Vec<OffsetRange> = Vec::new();
    for (topic, partition, offset) in at {
        match out.last_mut() {
            Some(r) if r.topic == topic && r.partition == partition && r.last + 1 == offset => {
                r.last = offset
            }
            _ => out.push(OffsetRange {
                topic,
                partition,
                first: offset,
                last: offset,
            }),
        }
    }
    out
}

/// Keys as text: consecutive integer keys (one-column keys) become `a..=b`.
fn key_ranges(pk: &[String], keys: &BTreeSet<Vec<String>>) -> Vec<String> {
    let show = |k: &Vec<String>| {
        pk.iter()
            .zip(k)
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let ints: Option<Vec<i64>> = (pk.len() == 1)
        .then(|| keys.iter().map(|k| k[0].parse::<i64>().ok()).collect())
        .flatten();
    match ints {
        Some(mut ints) => {
            ints.sort_unstable();
            let mut out: Vec<(i64, i64)> = Vec::new();
            for i in ints {
                match out.last_mut() {
                    Some(r) if r.1 + 1 == i => r.1 = i,
                    _ => out.push((i, i)),
                }
            }
            out.into_iter()
                .map(|(a, b)| {
                    if a == b {
                        format!("{}={a}", pk[0])
                    } else {
                        format!("{}={a}..={b}", pk[0])
                    }
                })
                .collect()
        }
        None => keys.iter().map(show).collect(),
    }
}

/// Audit `layout`'s table for day `ds`. `bus` are the table's change events of the day
/// read from the bus (`None`: not read); `transactions` the END counts of the transactions
/// of the day for the table (`None`: no transaction topic).
pub fn audit(
    layout: &TableLayout,
    ds: Ds,
    bus: Option<&[BusEvent]>,
    transactions: Option<&[TransactionCount]>,
) -> Result<AuditReport, AuditError> {
    let mut differences = Vec::new();
    let day_dir = layout
        .changes_partition(ds, None)
        .map_err(|e| AuditError::Shape {
            path: layout.changes_dir(),
            reason: e.to_string(),
        })?;
    let files = change_log_files(&day_dir)?;
    let mut primary_key: Vec<String> = Vec::new();
    let mut keys: HashMap<Vec<String>, KeyChanges> = HashMap::new();
    let mut landed: HashMap<(String, i32, i64), Vec<String>> = HashMap::new();
    let mut duplicates = Vec::new();
    let mut rows = 0u64;
    for path in &files {
        let (batches, kv) = read_batches(path)?;
        let pk: Vec<String> = kv
            .get(columns::PRIMARY_KEY_METADATA)
            .map(|s| {
                s.split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if primary_key.is_empty() {
            primary_key = pk.clone();
        }
        for batch in &batches {
            let op = column(batch, columns::OP, path)?;
            let topic = column(batch, columns::TOPIC, path)?;
            let part = column(batch, columns::PARTITION, path)?;
            let off = column(batch, columns::OFFSET, path)?;
            let pk_cols = pk
                .iter()
                .map(|c| column(batch, c, path))
                .collect::<Result<Vec<_>, _>>()?;
            let data = data_columns(batch);
            for row in 0..batch.num_rows() {
                rows += 1;
                let key = key_text(&pk_cols, row);
                let change = Change {
                    op: cell_text(op, row).unwrap_or_default(),
                    topic: cell_text(topic, row).unwrap_or_default(),
                    partition: int_cell(part, row).unwrap_or(-1) as i32,
                    offset: int_cell(off, row).unwrap_or(-1),
                    values: data
                        .iter()
                        .map(|(n, c)| (n.clone(), cell_text(*c, row)))
                        .collect(),
                };
                let at = (change.topic.clone(), change.partition, change.offset);
                if landed.insert(at.clone(), key.clone()).is_some() {
                    duplicates.push(at);
                }
                let entry = keys.entry(key).or_default();
                let newer = |c: &Option<Change>| {
                    c.as_ref()
                        .is_none_or(|c| (c.partition, c.offset) < (change.partition, change.offset))
                };
                if change.op != "d" && newer(&entry.latest_kept) {
                    entry.latest_kept = Some(change.clone());
                }
                if newer(&entry.latest) {
                    entry.latest = Some(change);
                }
            }
        }
    }
    if !duplicates.is_empty() {
        differences.push(Difference {
            kind: "duplicate_in_change_log".into(),
            keys: Vec::new(),
            detail: format!("{} events landed more than once", duplicates.len()),
            offsets: offset_ranges(duplicates),
        });
    }

    // 1. Transactions.
    let mut transactions_checked = None;
    if let (Some(bus), Some(txs)) = (bus, transactions) {
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for e in bus {
            if let Some(t) = &e.transaction {
                *seen.entry(t).or_default() += 1;
            }
        }
        let mut checked = 0u64;
        for tx in txs {
            let Some(&n) = seen.get(tx.id.as_str()) else {
                continue;
            };
            checked += 1;
            if n < tx.events {
                differences.push(Difference {
                    kind: "transaction_incomplete".into(),
                    keys: Vec::new(),
                    offsets: Vec::new(),
                    detail: format!(
                        "transaction {}: {n} of its {} events of the table are on the bus",
                        tx.id, tx.events
                    ),
                });
            }
        }
        transactions_checked = Some(checked);
    }

    // 2. Bus → change log.
    if let Some(bus) = bus {
        let missing: Vec<&BusEvent> = bus
            .iter()
            .filter(|e| !landed.contains_key(&(e.topic.clone(), e.partition, e.offset)))
            .collect();
        if !missing.is_empty() {
            let ks: BTreeSet<Vec<String>> = missing.iter().map(|e| e.key.clone()).collect();
            differences.push(Difference {
                kind: "missing_in_change_log".into(),
                keys: key_ranges(&primary_key, &ks),
                offsets: offset_ranges(
                    missing
                        .iter()
                        .map(|e| (e.topic.clone(), e.partition, e.offset))
                        .collect(),
                ),
                detail: format!(
                    "{} change events of the day are on the bus, not in the change log",
                    missing.len()
                ),
            });
        }
    }

    // 3. Change log → snapshot.
    let snap_dir = layout.snapshot_partition(ds);
    let manifest = Manifest::read(&snap_dir)?;
    let mut snapshot_rows = None;
    let delete_mode = manifest
        .as_ref()
        .map(|m| m.delete_mode.clone().unwrap_or_else(|| "keep".into()));
    if let Some(manifest) = &manifest {
        snapshot_rows = Some(manifest.rows);
        // Key → (deleted, partition, offset, values) for the keys changed in the day.
        let mut snap: HashMap<Vec<String>, SnapshotRow> = HashMap::new();
        for f in &manifest.files {
            let path = snap_dir.join(&f.name);
            let (batches, _) = read_batches(&path)?;
            for batch in &batches {
                let pk_cols = primary_key
                    .iter()
                    .map(|c| column(batch, c, &path))
                    .collect::<Result<Vec<_>, _>>()?;
                let deleted = batch.column_by_name(columns::DELETED);
                let part = batch.column_by_name(columns::PARTITION);
                let off = batch.column_by_name(columns::OFFSET);
                let data = data_columns(batch);
                for row in 0..batch.num_rows() {
                    let key = key_text(&pk_cols, row);
                    if !keys.contains_key(&key) {
                        continue;
                    }
                    let is_deleted = deleted
                        .and_then(|d| cell_text(d.as_ref(), row))
                        .is_some_and(|t| t == "true");
                    snap.insert(
                        key,
                        (
                            is_deleted,
                            part.and_then(|p| int_cell(p.as_ref(), row)),
                            off.and_then(|o| int_cell(o.as_ref(), row)),
                            data.iter()
                                .map(|(n, c)| (n.clone(), cell_text(*c, row)))
                                .collect(),
                        ),
                    );
                }
            }
        }
        let mode = delete_mode.as_deref().unwrap_or("keep");
        let mut missing = BTreeMap::<
            &'static str,
            (BTreeSet<Vec<String>>, Vec<(String, i32, i64)>, Vec<String>),
        >::new();
        for (key, changes) in &keys {
            let Some(latest) = &changes.latest else {
                continue;
            };
            // What the snapshot must hold for this key: Some((change, deleted)) or None.
            let expect: Option<(&Change, bool)> = match (latest.op.as_str(), mode) {
                ("d", "keep") => Some((latest, true)),
                ("d", "drop-final") => changes.latest_kept.as_ref().map(|c| (c, false)),
                ("d", _) => None,
                _ => Some((latest, false)),
            };
            let mut note = |kind: &'static str, c: &Change, detail: String| {
                let e = missing.entry(kind).or_default();
                e.0.insert(key.clone());
                e.1.push((c.topic.clone(), c.partition, c.offset));
                if e.2.len() < 20 {
                    e.2.push(detail);
                }
            };
            match (expect, snap.get(key)) {
                (None, Some(_)) => note("present_after_delete", latest, String::new()),
                (None, None) => {}
                (Some((c, _)), None) => note("missing_in_snapshot", c, String::new()),
                (Some((c, deleted)), Some((is_deleted, p, o, values))) => {
                    if (*p, *o) != (Some(i64::from(c.partition)), Some(c.offset)) {
                        note(
                            "stale_in_snapshot",
                            c,
                            format!(
                                "snapshot row from {p:?}/{o:?}, the day's change is {}/{}",
                                c.partition, c.offset
                            ),
                        );
                    } else if *is_deleted != deleted {
                        note("deleted_flag_wrong", c, format!("_deleted = {is_deleted}"));
                    } else if mode != "keep" || !deleted {
                        for (name, want) in &c.values {
                            let got = values.iter().find(|(n, _)| n == name).map(|(_, v)| v);
                            if got != Some(want) {
                                note(
                                    "value_differs",
                                    c,
                                    format!("column {name}: change log {want:?}, snapshot {got:?}"),
                                );
                                break;
                            }
                        }
                    }
                }
            }
        }
        for (kind, (ks, offsets, details)) in missing {
            differences.push(Difference {
                kind: kind.into(),
                keys: key_ranges(&primary_key, &ks),
                detail: format!(
                    "{} keys; {}",
                    ks.len(),
                    details
                        .iter()
                        .filter(|d| !d.is_empty())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                offsets: offset_ranges(offsets),
            });
        }
    }
    let ok = differences.is_empty();
    Ok(AuditReport {
        table: layout.table().to_string(),
        ds: ds.to_string(),
        primary_key,
        bus_events: bus.map(|b| b.len() as u64),
        transactions: transactions_checked,
        change_log_rows: rows,
        change_log_files: files.len() as u64,
        changed_keys: keys.len() as u64,
        snapshot_rows,
        delete_mode,
        differences,
        ok,
    })
}

impl AuditReport {
    /// The report as text, at most `limit` keys/ranges per difference.
    pub fn render_text(&self, limit: usize) -> String {
        let mut out = format!("lake audit {} ds={}\n", self.table, self.ds);
        let opt = |v: Option<u64>| v.map_or("not read".to_string(), |n| n.to_string());
        out += &format!("  bus events in the day:   {}\n", opt(self.bus_events));
        out += &format!("  transactions checked:    {}\n", opt(self.transactions));
        out += &format!(
            "  change-log rows:         {} in {} files, {} keys\n",
            self.change_log_rows, self.change_log_files, self.changed_keys
        );
        match self.snapshot_rows {
            Some(n) => {
                out += &format!(
                    "  snapshot rows:           {n} (delete mode {})\n",
                    self.delete_mode.as_deref().unwrap_or("keep")
                )
            }
            None => {
                out += "  snapshot:                no complete partition (_SUCCESS), not checked\n"
            }
        }
        for d in &self.differences {
            out += &format!("{}: {}\n", d.kind, d.detail);
            for k in d.keys.iter().take(limit) {
                out += &format!("  key {k}\n");
            }
            for r in d.offsets.iter().take(limit) {
                out += &format!(
                    "  {}/{} offsets {}-{}\n",
                    r.topic, r.partition, r.first, r.last
                );
            }
        }
        out += if self.ok { "OK\n" } else { "LOSS\n" };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_coalesce() {
        let r = offset_ranges(vec![
            ("t".into(), 0, 5),
            ("t".into(), 0, 3),
            ("t".into(), 0, 4),
            ("t".into(), 1, 6),
            ("t".into(), 0, 9),
        ]);
        let shown: Vec<_> = r.iter().map(|r| (r.partition, r.first, r.last)).collect();
        assert_eq!(shown, [(0, 3, 5), (0, 9, 9), (1, 6, 6)]);
        let keys: BTreeSet<Vec<String>> = ["1", "2", "3", "7"]
            .iter()
            .map(|k| vec![k.to_string()])
            .collect();
        assert_eq!(key_ranges(&["id".into()], &keys), ["id=1..=3", "id=7"]);
    }
}
