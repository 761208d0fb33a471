//! Writing change-log files and reading partitions back, for the merge tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMillisecondType};
use arrow_array::{
    Array, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use qanat_lake::layout::{change_file_name, Ds, TableLayout};
use qanat_lake::merge::read_partition;

pub const TOPIC: &str = "cdc.shop.orders";

/// One change of the test table `shop.orders (id Int64, value Utf8, modified_time)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ch {
    pub id: i64,
    pub op: &'static str,
    pub value: String,
    pub log_time: i64,
    pub modified_time: Option<i64>,
    pub proc_time: Option<i64>,
    pub partition: i32,
    pub offset: i64,
}

pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Milliseconds of `ds` at `hh:mm:ss`.
pub fn at(ds: &str, hh: u32, mm: u32, ss: u32) -> i64 {
    let ds: Ds = ds.parse().unwrap();
    ds.date()
        .and_hms_opt(hh, mm, ss)
        .unwrap()
        .and_utc()
        .timestamp_millis()
}

pub fn change_batch(changes: &[Ch], with_pk: bool) -> RecordBatch {
    let ts = |v: Vec<Option<i64>>| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC"))
    };
    let fields = vec![
        Field::new("id", DataType::Int64, false),
        Field::new("value", DataType::Utf8, true),
        Field::new("modified_time", ts_type(), true),
        Field::new("proc_time", ts_type(), true),
        Field::new("_op", DataType::Utf8, false),
        Field::new("_log_pos", DataType::Utf8, true),
        Field::new("_log_time", ts_type(), true),
        Field::new("_commit_ts", ts_type(), true),
        Field::new("_extract_time", ts_type(), true),
        Field::new("_topic", DataType::Utf8, false),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
    ];
    let metadata = if with_pk {
        HashMap::from([("qanat.primary_key".to_owned(), "id".to_owned())])
    } else {
        HashMap::new()
    };
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.id))),
        Arc::new(StringArray::from_iter_values(
            changes.iter().map(|c| c.value.clone()),
        )),
        ts(changes.iter().map(|c| c.modified_time).collect()),
        ts(changes.iter().map(|c| c.proc_time).collect()),
        Arc::new(StringArray::from_iter_values(changes.iter().map(|c| c.op))),
        Arc::new(StringArray::from_iter_values(
            changes.iter().map(|c| format!("bin.000001:{}", c.offset)),
        )),
        ts(changes.iter().map(|c| Some(c.log_time)).collect()),
        ts(changes.iter().map(|c| Some(c.log_time)).collect()),
        ts(changes.iter().map(|c| Some(c.log_time + 5)).collect()),
        Arc::new(StringArray::from_iter_values(changes.iter().map(|_| TOPIC))),
        Arc::new(Int32Array::from_iter_values(
            changes.iter().map(|c| c.partition),
        )),
        Arc::new(Int64Array::from_iter_values(
            changes.iter().map(|c| c.offset),
        )),
    ];
    RecordBatch::try_new(schema, columns).unwrap()
}

pub fn write_parquet(path: &Path, batch: &RecordBatch) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut writer =
        ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

/// Lands `changes` as the change log, one file per (day of log time, partition).
pub fn land(layout: &TableLayout, changes: &[Ch]) {
    let mut groups: std::collections::BTreeMap<(String, i32), Vec<Ch>> = Default::default();
    for c in changes {
        let day = chrono::DateTime::from_timestamp_millis(c.log_time)
            .unwrap()
            .format("%Y%m%d")
            .to_string();
        groups
            .entry((day, c.partition))
            .or_default()
            .push(c.clone());
    }
    for ((day, partition), group) in groups {
        let first = group.iter().map(|c| c.offset).min().unwrap();
        let last = group.iter().map(|c| c.offset).max().unwrap();
        let dir = layout
            .changes_partition(day.parse().unwrap(), None)
            .unwrap();
        let path = dir.join(change_file_name(TOPIC, partition, first, last));
        write_parquet(&path, &change_batch(&group, true));
    }
}

/// (id, value, _op, _deleted) of every row of a partition, sorted by id.
pub fn rows(dir: &Path) -> Vec<(i64, Option<String>, Option<String>, bool)> {
    let mut out = Vec::new();
    for batch in read_partition(dir).unwrap() {
        let id = batch
            .column_by_name("id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let value = batch.column_by_name("value").unwrap().as_string::<i32>();
        let op = batch.column_by_name("_op").unwrap().as_string::<i32>();
        let deleted = batch.column_by_name("_deleted").unwrap().as_boolean();
        for i in 0..batch.num_rows() {
            out.push((
                id.value(i),
                value.is_valid(i).then(|| value.value(i).to_owned()),
                op.is_valid(i).then(|| op.value(i).to_owned()),
                deleted.value(i),
            ));
        }
    }
    out.sort_by_key(|r| r.0);
    out
}

/// `_log_time` of every row, by id.
pub fn log_times(dir: &Path) -> Vec<(i64, Option<i64>)> {
    let mut out = Vec::new();
    for batch in read_partition(dir).unwrap() {
        let id = batch
            .column_by_name("id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let t = batch
            .column_by_name("_log_time")
            .unwrap()
            .as_primitive::<TimestampMillisecondType>();
        for i in 0..batch.num_rows() {
            out.push((id.value(i), t.is_valid(i).then(|| t.value(i))));
        }
    }
    out.sort();
    out
}

/// Every file of a directory with its bytes, for "left untouched" checks.
pub fn snapshot_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}
