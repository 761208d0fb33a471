//! `merge`: a day's change log onto the previous snapshot, written as the day's partition.
//!
//! # Delta (F1)
//!
//! The day's changes are grouped by primary key and ordered by (`_partition`, `_offset`).
//! [`choose`] picks one outcome per key according to the [`DeleteMode`]:
//!
//! - `keep` (default): the latest change, whatever it is; a delete becomes a row with
//!   `_deleted = true` holding the deleted row's last image, and stays in the snapshot
//!   (later days carry it forward until the key is inserted again).
//! - `drop-final`: the latest change that is not a delete. A key whose changes are all
//!   deletes has no delta row, so yesterday's row for it is carried forward unchanged:
//!   deletes never reach the snapshot (archiving, manual bulk deletes).
//! - `drop-all`: the delete and every change before it are discarded; the latest change
//!   after the last delete is the key's row. A key whose latest change is a delete is
//!   removed from today's snapshot, yesterday's row included (a hard delete).
//!
//! # Full (F2)
//!
//! Today's partition is the full outer join on the primary key of the base (yesterday's
//! partition, another day's, or any directory of Parquet such as a `qanat sync` extract)
//! with the delta, the delta winning. Base rows keep their order, a replaced row takes its
//! place; new keys follow in change order. The delta is the build side of a hash join and
//! the base streams past it, so memory holds the delta, not the table. When the day's
//! changes exceed the memory budget both sides are first hash-partitioned by key into
//! bucket files (Arrow IPC) beside the output and joined bucket by bucket (a grace hash
//! join).
//!
//! # Snapshot columns
//!
//! The data columns — the base's in its order, then columns only the change log has —
//! followed by `_op` (Utf8), `_deleted` (Boolean, never null), `_log_time` (Timestamp ms
//! UTC), `_log_pos` (Utf8), `_partition` (Int32) and `_offset` (Int64) of the change each row
//! came from. Rows from a plain baseline have null `_op`/`_log_time`/`_log_pos`/
//! `_partition`/`_offset` and `_deleted = false`. A column present on one side only is null
//! on the other; a column whose type differs between the two sides is an error. Files carry
//! the primary key as the Parquet metadata `qanat.primary_key`.
//!
//! # Writing
//!
//! The partition is written to `.tmp-ds=YYYYMMDD-<pid>` beside the target: data files
//! (zstd, statistics, row groups of 1M rows), then `_SUCCESS`; then it is swapped in
//! with one `renameat2(RENAME_EXCHANGE)` (or two renames where the filesystem lacks it),
//! and only then is the old partition removed. A failed merge leaves the previous
//! partition as it was. The same inputs give byte-identical data files.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::hash::BuildHasher;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::{new_null_array, Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow_row::{RowConverter, Rows, SortField};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow_select::concat::concat_batches;
use arrow_select::interleave::interleave_record_batch;
use arrow_select::take::take_record_batch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::columns;
use crate::drift::{DriftConfig, DriftWindow};
use crate::error::LakeError;
use crate::layout::{snapshot_file_name, Ds, TableLayout, TableName};
use crate::manifest::{self, Manifest, SourceRange};
use crate::read::{parquet_files, ParquetInput, SchemaUnion};

/// Rows per Parquet row group of a snapshot file.
pub const ROW_GROUP_ROWS: usize = 1 << 20;
/// At most this many buckets (open files per side) in a partitioned join.
const MAX_BUCKETS: usize = 256;
/// Row groups per snapshot file before the next file starts.
const ROW_GROUPS_PER_FILE: usize = 8;

/// What a delete in the change log does to the snapshot; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeleteMode {
    #[default]
    Keep,
    DropFinal,
    DropAll,
}

impl FromStr for DeleteMode {
    type Err = LakeError;

    fn from_str(text: &str) -> Result<Self, LakeError> {
        match text {
            "keep" => Ok(DeleteMode::Keep),
            "drop-final" => Ok(DeleteMode::DropFinal),
            "drop-all" => Ok(DeleteMode::DropAll),
            _ => Err(LakeError::Invalid(format!(
                "delete mode {text:?}: expected keep, drop-final or drop-all"
            ))),
        }
    }
}

impl fmt::Display for DeleteMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeleteMode::Keep => "keep",
            DeleteMode::DropFinal => "drop-final",
            DeleteMode::DropAll => "drop-all",
        })
    }
}

/// One change of a key, as [`choose`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// In the drift window's tail (the next day's first minutes).
    pub next_day: bool,
    pub partition: i32,
    pub offset: i64,
    pub delete: bool,
    /// Where the change's row is; opaque to [`choose`].
    pub row: u32,
}

/// What the delta says about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The key's row is this change's row.
    Row { row: u32, deleted: bool },
    /// The key is gone from the snapshot.
    Remove,
    /// The delta has nothing for the key: the base row, if any, stays.
    Absent,
}

/// The delta's outcome for one key's changes (any order; sorted here by bus order, the
/// changes of the drift tail after the day's). Of the drift tail only the earliest change
/// counts ([`crate::drift`]).
pub fn choose(changes: &mut [Change], mode: DeleteMode) -> Choice {
    changes.sort_unstable_by_key(|c| (c.next_day, c.partition, c.offset));
    let end = changes
        .iter()
        .position(|c| c.next_day)
        .map_or(changes.len(), |p| p + 1);
    let seq = &changes[..end];
    let row = |c: &Change, deleted| Choice::Row {
        row: c.row,
        deleted,
    };
    match mode {
        DeleteMode::Keep => seq.last().map_or(Choice::Absent, |c| row(c, c.delete)),
        DeleteMode::DropFinal => seq
            .iter()
            .rev()
            .find(|c| !c.delete)
            .map_or(Choice::Absent, |c| row(c, false)),
        DeleteMode::DropAll => match (seq.iter().rposition(|c| c.delete), seq.last()) {
            (_, None) => Choice::Absent,
            (Some(p), Some(_)) if p + 1 == seq.len() => Choice::Remove,
            (_, Some(last)) => row(last, false),
        },
    }
}

/// Which partition the day's changes are merged onto.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BaseChoice {
    /// The day before's snapshot partition, which must exist and be complete.
    #[default]
    Previous,
    /// Another day's snapshot partition.
    Day(Ds),
    /// Any directory (or file) of Parquet: a `qanat sync` extract, for example.
    Path(PathBuf),
    /// No base: the table's first merge.
    Initial,
}

/// Everything `merge` needs.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub root: PathBuf,
    pub table: TableName,
    pub ds: Ds,
    pub delete_mode: DeleteMode,
    /// The primary key; `None` reads it from the files' `qanat.primary_key` metadata.
    pub primary_key: Option<Vec<String>>,
    pub base: BaseChoice,
    /// Keep this many newest snapshot partitions; `None` keeps all.
    pub keep: Option<usize>,
    pub drift: Option<DriftConfig>,
    /// Decoded changes beyond this many bytes are joined in buckets on disk.
    pub memory_budget: u64,
}

impl MergeOptions {
    pub fn new(root: impl Into<PathBuf>, table: TableName, ds: Ds) -> Self {
        MergeOptions {
            root: root.into(),
            table,
            ds,
            delete_mode: DeleteMode::Keep,
            primary_key: None,
            base: BaseChoice::Previous,
            keep: None,
            drift: None,
            memory_budget: 1 << 30,
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub partition: PathBuf,
    pub rows: u64,
    pub files: usize,
    /// Change rows read (after the drift window's filter).
    pub changes: u64,
    /// Base rows read.
    pub base_rows: u64,
    pub base: Option<String>,
    /// Hash buckets of the join; 1 when everything fit the memory budget.
    pub buckets: usize,
    pub removed_partitions: Vec<String>,
}

/// The output schema and how to find the key and metadata in it.
struct Plan {
    schema: SchemaRef,
    primary_key: Vec<String>,
    key_columns: Vec<usize>,
    converter: RowConverter,
    op: usize,
    deleted: usize,
    partition: usize,
    offset: usize,
}

fn log_time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn snapshot_metadata_fields() -> Vec<Field> {
    vec![
        Field::new(columns::OP, DataType::Utf8, true),
        Field::new(columns::DELETED, DataType::Boolean, false),
        Field::new(columns::LOG_TIME, log_time_type(), true),
        Field::new(columns::LOG_POS, DataType::Utf8, true),
        Field::new(columns::PARTITION, DataType::Int32, true),
        Field::new(columns::OFFSET, DataType::Int64, true),
    ]
}

fn check_metadata_types(union: &SchemaUnion, required: &[&str]) -> Result<(), LakeError> {
    for field in snapshot_metadata_fields() {
        match union.get(field.name()) {
            Some((found, path)) if found != field.data_type() => {
                return Err(LakeError::BadMetadataColumn {
                    path: path.to_owned(),
                    column: field.name().clone(),
                    expected: field.data_type().clone(),
                    found: found.clone(),
                });
            }
            None if required.contains(&field.name().as_str()) => {
                return Err(LakeError::Invalid(format!(
                    "change log: column `{}` is missing",
                    field.name()
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

fn primary_key_of(
    opts: &MergeOptions,
    changes: &[ParquetInput],
    base: &[ParquetInput],
) -> Result<Vec<String>, LakeError> {
    if let Some(pk) = &opts.primary_key {
        return Ok(pk.clone());
    }
    let mut found: Option<(&str, &Path)> = None;
    for input in changes
        .iter()
        .chain(if changes.is_empty() { base } else { &[] })
    {
        if let Some(pk) = input.metadata.get(columns::PRIMARY_KEY_METADATA) {
            match found {
                Some((first, first_file)) if first != pk => {
                    return Err(LakeError::PrimaryKeyConflict {
                        first: first.to_owned(),
                        first_file: first_file.to_owned(),
                        second: pk.clone(),
                        second_file: input.path.clone(),
                    });
                }
                Some(_) => {}
                None => found = Some((pk, &input.path)),
            }
        }
    }
    let pk: Vec<String> = found
        .map(|(pk, _)| {
            pk.split(',')
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if pk.is_empty() {
        return Err(LakeError::MissingPrimaryKey {
            table: opts.table.to_string(),
        });
    }
    Ok(pk)
}

impl Plan {
    fn new(
        opts: &MergeOptions,
        changes: &[ParquetInput],
        base: &[ParquetInput],
    ) -> Result<Plan, LakeError> {
        let mut change_union = SchemaUnion::default();
        for input in changes {
            change_union.add(&input.path, &input.schema)?;
        }
        let mut base_union = SchemaUnion::default();
        for input in base {
            base_union.add(&input.path, &input.schema)?;
        }
        if !changes.is_empty() {
            check_metadata_types(
                &change_union,
                &[columns::OP, columns::PARTITION, columns::OFFSET],
            )?;
        }
        check_metadata_types(&base_union, &[])?;
        if let Some((found, path)) = base_union.get(columns::DELETED) {
            if found != &DataType::Boolean {
                return Err(LakeError::BadMetadataColumn {
                    path: path.to_owned(),
                    column: columns::DELETED.into(),
                    expected: DataType::Boolean,
                    found: found.clone(),
                });
            }
        }
        // Data columns: the base's, then the change log's new ones; one type per name.
        let mut data = SchemaUnion::default();
        for field in base_union.fields() {
            if !columns::is_reserved(field.name()) {
                data.add_field(
                    base_union.get(field.name()).map_or(Path::new(""), |p| p.1),
                    field,
                )?;
            }
        }
        for field in change_union.fields() {
            if !columns::is_reserved(field.name()) {
                let path = change_union
                    .get(field.name())
                    .map_or(Path::new(""), |p| p.1);
                data.add_field(path, field)?;
            }
        }
        let mut fields: Vec<Field> = data
            .fields()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect();
        let data_columns = fields.len();
        fields.extend(snapshot_metadata_fields());
        let primary_key = primary_key_of(opts, changes, base)?;
        for column in &primary_key {
            // Every file with rows must have the key (an empty file may have no columns).
            for input in changes.iter().chain(base) {
                if input.rows > 0 && input.schema.field_with_name(column).is_err() {
                    return Err(LakeError::MissingKeyColumn {
                        path: input.path.clone(),
                        column: column.clone(),
                    });
                }
            }
            if !fields[..data_columns].iter().any(|f| f.name() == column) {
                return Err(LakeError::Invalid(format!(
                    "table {}: primary-key column `{column}` is in neither the base nor the change log",
                    opts.table
                )));
            }
        }
        let index = |name: &str| fields.iter().position(|f| f.name() == name).unwrap_or(0);
        let key_columns: Vec<usize> = primary_key.iter().map(|c| index(c)).collect();
        let converter = RowConverter::new(
            key_columns
                .iter()
                .map(|&i| SortField::new(fields[i].data_type().clone()))
                .collect(),
        )
        .map_err(LakeError::arrow("primary key"))?;
        let (op, deleted, partition, offset) = (
            index(columns::OP),
            index(columns::DELETED),
            index(columns::PARTITION),
            index(columns::OFFSET),
        );
        let metadata = HashMap::from([(
            columns::PRIMARY_KEY_METADATA.to_owned(),
            primary_key.join(","),
        )]);
        Ok(Plan {
            schema: Arc::new(Schema::new_with_metadata(fields, metadata)),
            primary_key,
            key_columns,
            converter,
            op,
            deleted,
            partition,
            offset,
        })
    }

    /// A batch of either side in the output schema.
    fn conform(&self, batch: &RecordBatch, is_change: bool) -> Result<RecordBatch, LakeError> {
        let rows = batch.num_rows();
        let mut out: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (i, field) in self.schema.fields().iter().enumerate() {
            let column = if i == self.deleted && is_change {
                let op = batch.column_by_name(columns::OP);
                let deleted: BooleanArray = match op.and_then(|a| a.as_string_opt::<i32>()) {
                    Some(op) => op.iter().map(|o| Some(o == Some("d"))).collect(),
                    None => BooleanArray::from(vec![false; rows]),
                };
                Arc::new(deleted)
            } else {
                match batch.column_by_name(field.name()) {
                    Some(column) if column.null_count() == 0 || i != self.deleted => column.clone(),
                    Some(column) => Arc::new(BooleanArray::from_iter(
                        column.as_boolean().iter().map(|v| Some(v.unwrap_or(false))),
                    )),
                    None if i == self.deleted => Arc::new(BooleanArray::from(vec![false; rows])),
                    None => new_null_array(field.data_type(), rows),
                }
            };
            out.push(column);
        }
        RecordBatch::try_new(self.schema.clone(), out)
            .map_err(LakeError::arrow("conforming a batch"))
    }

    fn keys(&self, batch: &RecordBatch) -> Result<Rows, LakeError> {
        let columns: Vec<ArrayRef> = self
            .key_columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        self.converter
            .convert_columns(&columns)
            .map_err(LakeError::arrow("encoding primary keys"))
    }
}

/// The delta of one bucket: the build side of the join.
struct Delta {
    batch: RecordBatch,
    map: HashMap<Box<[u8]>, u32, foldhash::fast::FixedState>,
    choices: Vec<Choice>,
    emitted: Vec<bool>,
}

impl Delta {
    /// `day` holds the changes of the day (and the window's head), `next_day` the drift
    /// window's tail.
    fn build(
        plan: &Plan,
        day: Vec<RecordBatch>,
        next_day: Vec<RecordBatch>,
        mode: DeleteMode,
    ) -> Result<Delta, LakeError> {
        let day_rows: usize = day.iter().map(|b| b.num_rows()).sum();
        let batch = concat_batches(&plan.schema, day.iter().chain(next_day.iter()))
            .map_err(LakeError::arrow("collecting changes"))?;
        drop((day, next_day));
        let rows = plan.keys(&batch)?;
        let partition = batch.column(plan.partition).as_primitive::<Int32Type>();
        let offset = batch.column(plan.offset).as_primitive::<Int64Type>();
        let op = batch.column(plan.op).as_string::<i32>();
        let mut map: HashMap<Box<[u8]>, u32, _> =
            HashMap::with_capacity_and_hasher(batch.num_rows(), Default::default());
        let mut entries: Vec<(u32, Change)> = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let key = rows.row(i);
            let id = match map.get(key.as_ref()) {
                Some(&id) => id,
                None => {
                    let id = map.len() as u32;
                    map.insert(Box::from(key.as_ref()), id);
                    id
                }
            };
            entries.push((
                id,
                Change {
                    next_day: i >= day_rows,
                    partition: partition.value(i),
                    offset: offset.value(i),
                    delete: op.is_valid(i) && op.value(i) == "d",
                    row: i as u32,
                },
            ));
        }
        entries.sort_unstable_by_key(|(id, c)| (*id, c.next_day, c.partition, c.offset));
        let mut choices = vec![Choice::Absent; map.len()];
        let mut changes: Vec<Change> = Vec::new();
        for group in entries.chunk_by(|a, b| a.0 == b.0) {
            changes.clear();
            changes.extend(group.iter().map(|(_, c)| *c));
            choices[group[0].0 as usize] = choose(&mut changes, mode);
        }
        let emitted = vec![false; choices.len()];
        Ok(Delta {
            batch,
            map,
            choices,
            emitted,
        })
    }

    /// A base batch with the delta applied to the keys it holds.
    fn probe(&mut self, plan: &Plan, base: &RecordBatch) -> Result<RecordBatch, LakeError> {
        if self.map.is_empty() {
            return Ok(base.clone());
        }
        let rows = plan.keys(base)?;
        let mut indices: Vec<(usize, usize)> = Vec::with_capacity(base.num_rows());
        let mut touched = false;
        for i in 0..base.num_rows() {
            let Some(&id) = self.map.get(rows.row(i).as_ref()) else {
                indices.push((0, i));
                continue;
            };
            touched = true;
            match self.choices[id as usize] {
                Choice::Row { row, .. } => {
                    if !self.emitted[id as usize] {
                        self.emitted[id as usize] = true;
                        indices.push((1, row as usize));
                    }
                }
                Choice::Remove => {}
                Choice::Absent => indices.push((0, i)),
            }
        }
        if !touched {
            return Ok(base.clone());
        }
        interleave_record_batch(&[base, &self.batch], &indices)
            .map_err(LakeError::arrow("applying changes"))
    }

    /// The delta's rows for keys the base did not have, in change order.
    fn inserts(&self) -> Result<Option<RecordBatch>, LakeError> {
        let mut rows: Vec<u32> = self
            .choices
            .iter()
            .zip(&self.emitted)
            .filter_map(|(choice, &emitted)| match choice {
                Choice::Row { row, .. } if !emitted => Some(*row),
                _ => None,
            })
            .collect();
        if rows.is_empty() {
            return Ok(None);
        }
        rows.sort_unstable();
        take_record_batch(&self.batch, &UInt32Array::from(rows))
            .map(Some)
            .map_err(LakeError::arrow("collecting new rows"))
    }
}

/// Data files written, with their rows.
type WrittenFiles = Vec<(PathBuf, u64)>;

/// Writes the partition's data files, rolling to a new file every few row groups.
struct PartitionWriter {
    dir: PathBuf,
    schema: SchemaRef,
    props: WriterProperties,
    writer: Option<(ArrowWriter<File>, PathBuf, u64)>,
    files: WrittenFiles,
}

impl PartitionWriter {
    fn new(dir: &Path, schema: SchemaRef, primary_key: &[String]) -> Self {
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_size(ROW_GROUP_ROWS)
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_key_value_metadata(Some(vec![KeyValue::new(
                columns::PRIMARY_KEY_METADATA.to_owned(),
                primary_key.join(","),
            )]))
            .build();
        PartitionWriter {
            dir: dir.to_owned(),
            schema,
            props,
            writer: None,
            files: Vec::new(),
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), LakeError> {
        let mut start = 0;
        while start < batch.num_rows() || (batch.num_rows() == 0 && self.writer.is_none()) {
            if self.writer.is_none() {
                let path = self.dir.join(snapshot_file_name(self.files.len()));
                let file = File::create(&path).map_err(LakeError::io(&path))?;
                let writer =
                    ArrowWriter::try_new(file, self.schema.clone(), Some(self.props.clone()))
                        .map_err(LakeError::parquet(&path))?;
                self.writer = Some((writer, path, 0));
            }
            let Some((writer, path, rows)) = self.writer.as_mut() else {
                break;
            };
            let room = (ROW_GROUP_ROWS * ROW_GROUPS_PER_FILE) as u64 - *rows;
            let len = ((batch.num_rows() - start) as u64).min(room) as usize;
            writer
                .write(&batch.slice(start, len))
                .map_err(LakeError::parquet(path.clone()))?;
            *rows += len as u64;
            start += len;
            if *rows >= (ROW_GROUP_ROWS * ROW_GROUPS_PER_FILE) as u64 {
                self.close()?;
            }
            if batch.num_rows() == 0 {
                break;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), LakeError> {
        if let Some((writer, path, rows)) = self.writer.take() {
            let file = writer.into_inner().map_err(LakeError::parquet(&path))?;
            file.sync_all().map_err(LakeError::io(&path))?;
            self.files.push((path, rows));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<WrittenFiles, LakeError> {
        if self.files.is_empty() && self.writer.is_none() {
            // An empty partition still has one file, so readers see its columns.
            self.write(&RecordBatch::new_empty(self.schema.clone()))?;
        }
        self.close()?;
        Ok(self.files)
    }
}

/// Offsets seen per topic partition, for the manifest.
#[derive(Default)]
struct Sources(BTreeMap<(String, i32), (i64, i64)>);

impl Sources {
    fn add(&mut self, batch: &RecordBatch) {
        let (Some(partition), Some(offset)) = (
            batch
                .column_by_name(columns::PARTITION)
                .and_then(|a| a.as_primitive_opt::<Int32Type>()),
            batch
                .column_by_name(columns::OFFSET)
                .and_then(|a| a.as_primitive_opt::<Int64Type>()),
        ) else {
            return;
        };
        let topic = batch
            .column_by_name(columns::TOPIC)
            .and_then(|a| a.as_string_opt::<i32>());
        for i in 0..batch.num_rows() {
            let name = topic.filter(|t| t.is_valid(i)).map_or("", |t| t.value(i));
            let key = (name.to_owned(), partition.value(i));
            let o = offset.value(i);
            let range = self.0.entry(key).or_insert((o, o));
            range.0 = range.0.min(o);
            range.1 = range.1.max(o);
        }
    }

    fn ranges(&self) -> Vec<SourceRange> {
        self.0
            .iter()
            .map(|((topic, partition), (first, last))| SourceRange {
                topic: topic.clone(),
                partition: *partition,
                first_offset: *first,
                last_offset: *last,
            })
            .collect()
    }
}

/// The change files of the merge, each with the part of the drift window it feeds.
struct ChangeInput {
    input: ParquetInput,
}

fn change_inputs(layout: &TableLayout, opts: &MergeOptions) -> Result<Vec<ChangeInput>, LakeError> {
    let mut days = Vec::new();
    if let (Some(_), Some(previous)) = (&opts.drift, opts.ds.previous()) {
        let dir = layout.changes_partition(previous, None)?;
        if dir.is_dir() {
            days.push(dir);
        }
    }
    let dir = layout.changes_partition(opts.ds, None)?;
    // With the drift window, the next day's partition proves landing went past this day,
    // so a day without a directory had no changes of its own.
    if dir.is_dir() {
        days.push(dir);
    } else if opts.drift.is_none() {
        return Err(LakeError::MissingPartition {
            what: "change-log partition",
            path: dir,
            hint: " (nothing landed for this day)".into(),
        });
    }
    if opts.drift.is_some() {
        let next = opts
            .ds
            .next()
            .ok_or_else(|| LakeError::Invalid("no day after the last day".into()))?;
        let dir = layout.changes_partition(next, None)?;
        if !dir.is_dir() {
            return Err(LakeError::MissingPartition {
                what: "change-log partition",
                path: dir,
                hint: " (the drift correction needs the next day's first minutes landed)".into(),
            });
        }
        days.push(dir);
    }
    let mut inputs = Vec::new();
    for dir in days {
        for path in parquet_files(&dir)? {
            inputs.push(ChangeInput {
                input: ParquetInput::open(&path)?,
            });
        }
    }
    Ok(inputs)
}

fn complete_partition(layout: &TableLayout, ds: Ds) -> Result<PathBuf, LakeError> {
    let dir = layout.snapshot_partition(ds);
    let hint = " (pass --initial for a table's first merge, or --base-ds DAY / --base DIR)";
    if !dir.is_dir() {
        return Err(LakeError::MissingPartition {
            what: "snapshot partition",
            path: dir,
            hint: hint.into(),
        });
    }
    if Manifest::read(&dir)?.is_none() {
        return Err(LakeError::MissingPartition {
            what: "the _SUCCESS of snapshot partition",
            path: dir,
            hint: " (the partition is incomplete; pass --base DIR to use it anyway)".into(),
        });
    }
    Ok(dir)
}

fn base_inputs(
    layout: &TableLayout,
    opts: &MergeOptions,
) -> Result<(Vec<ParquetInput>, Option<String>), LakeError> {
    let (dir, label) = match &opts.base {
        BaseChoice::Initial => return Ok((Vec::new(), None)),
        BaseChoice::Previous => {
            let day = opts
                .ds
                .previous()
                .ok_or_else(|| LakeError::Invalid("no day before the first day".into()))?;
            (complete_partition(layout, day)?, day.to_string())
        }
        BaseChoice::Day(day) => (complete_partition(layout, *day)?, day.to_string()),
        BaseChoice::Path(path) => {
            if !path.exists() {
                return Err(LakeError::MissingPartition {
                    what: "base",
                    path: path.clone(),
                    hint: String::new(),
                });
            }
            (path.clone(), path.display().to_string())
        }
    };
    let files = if dir.is_file() {
        vec![dir.clone()]
    } else {
        parquet_files(&dir)?
    };
    let inputs = files
        .iter()
        .map(|p| ParquetInput::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((inputs, Some(label)))
}

/// The change batches, conformed, split into the day (with the window's head) and the
/// drift window's tail.
fn read_changes(
    plan: &Plan,
    inputs: &[ChangeInput],
    window: Option<(&DriftConfig, DriftWindow)>,
    sources: &mut Sources,
    mut sink: impl FnMut(RecordBatch, bool) -> Result<(), LakeError>,
) -> Result<u64, LakeError> {
    let mut rows = 0u64;
    for change in inputs {
        for batch in change.input.batches()? {
            let batch = batch?;
            let parts = match window {
                None => vec![(batch, false)],
                Some((config, window)) => window.split(config, &batch, &change.input.path)?,
            };
            for (batch, next_day) in parts {
                if batch.num_rows() == 0 {
                    continue;
                }
                sources.add(&batch);
                rows += batch.num_rows() as u64;
                sink(plan.conform(&batch, true)?, next_day)?;
            }
        }
    }
    Ok(rows)
}

/// Base batches, conformed, from a thread so decoding overlaps the join.
fn spawn_base_reader<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    plan: &'scope Plan,
    inputs: &'scope [ParquetInput],
) -> Receiver<Result<RecordBatch, LakeError>> {
    let (tx, rx) = sync_channel(4);
    scope.spawn(move || {
        for input in inputs {
            let batches = match input.batches() {
                Ok(batches) => batches,
                Err(err) => {
                    let _ = tx.send(Err(err));
                    return;
                }
            };
            for batch in batches {
                let batch = batch.and_then(|b| plan.conform(&b, false));
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        }
    });
    rx
}

/// The writer runs in its own thread so encoding overlaps the join.
fn spawn_writer<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    mut writer: PartitionWriter,
) -> (
    SyncSender<RecordBatch>,
    std::thread::ScopedJoinHandle<'scope, Result<WrittenFiles, LakeError>>,
) {
    let (tx, rx) = sync_channel::<RecordBatch>(4);
    let handle = scope.spawn(move || {
        for batch in rx {
            writer.write(&batch)?;
        }
        writer.finish()
    });
    (tx, handle)
}

/// Hash-partitions batches by key into `k` Arrow IPC files.
struct Buckets {
    paths: Vec<PathBuf>,
    writers: Vec<arrow_ipc::writer::FileWriter<BufWriter<File>>>,
}

const BUCKET_SEED: u64 = 0x5157_414e_4154_4c4b;

impl Buckets {
    fn create(dir: &Path, name: &str, k: usize, schema: &SchemaRef) -> Result<Buckets, LakeError> {
        let mut paths = Vec::with_capacity(k);
        let mut writers = Vec::with_capacity(k);
        for i in 0..k {
            let path = dir.join(format!("{name}-{i:04}.arrow"));
            let file = File::create(&path).map_err(LakeError::io(&path))?;
            writers.push(
                arrow_ipc::writer::FileWriter::try_new(BufWriter::new(file), schema)
                    .map_err(LakeError::arrow(path.display().to_string()))?,
            );
            paths.push(path);
        }
        Ok(Buckets { paths, writers })
    }

    fn add(&mut self, plan: &Plan, batch: &RecordBatch) -> Result<(), LakeError> {
        let k = self.writers.len();
        let keys = plan.keys(batch)?;
        let hasher = foldhash::fast::FixedState::with_seed(BUCKET_SEED);
        let mut indices: Vec<Vec<u32>> = vec![Vec::new(); k];
        for i in 0..batch.num_rows() {
            let bucket = (hasher.hash_one(keys.row(i).as_ref()) % k as u64) as usize;
            indices[bucket].push(i as u32);
        }
        for (bucket, rows) in indices.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let part = take_record_batch(batch, &UInt32Array::from(rows))
                .map_err(LakeError::arrow("partitioning by key"))?;
            self.writers[bucket]
                .write(&part)
                .map_err(LakeError::arrow(self.paths[bucket].display().to_string()))?;
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<PathBuf>, LakeError> {
        for (mut writer, path) in self.writers.into_iter().zip(&self.paths) {
            writer
                .finish()
                .map_err(LakeError::arrow(path.display().to_string()))?;
        }
        Ok(self.paths)
    }
}

/// The batches of one bucket file, streamed.
fn read_bucket(
    path: &Path,
) -> Result<impl Iterator<Item = Result<RecordBatch, LakeError>>, LakeError> {
    let file = File::open(path).map_err(LakeError::io(path))?;
    let reader = arrow_ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)
        .map_err(LakeError::arrow(path.display().to_string()))?;
    let name = path.display().to_string();
    Ok(reader.map(move |b| b.map_err(LakeError::arrow(name.clone()))))
}

/// Streams base batches past the delta into the writer, then the delta's new keys; returns
/// the base rows seen. A closed writer channel means the writer failed: joining it reports
/// why.
fn stream_join(
    plan: &Plan,
    delta: &mut Delta,
    base: impl Iterator<Item = Result<RecordBatch, LakeError>>,
    out: &SyncSender<RecordBatch>,
) -> Result<u64, LakeError> {
    let mut rows = 0u64;
    for batch in base {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        if out.send(delta.probe(plan, &batch)?).is_err() {
            return Ok(rows);
        }
    }
    if let Some(batch) = delta.inserts()? {
        let _ = out.send(batch);
    }
    Ok(rows)
}

/// Runs the join; returns (data files with rows, change rows, base rows, buckets).
fn join(
    plan: &Plan,
    opts: &MergeOptions,
    changes: &[ChangeInput],
    base: &[ParquetInput],
    staging: &Path,
    sources: &mut Sources,
) -> Result<(WrittenFiles, u64, u64, usize), LakeError> {
    let window = match &opts.drift {
        Some(config) => Some((config, DriftWindow::new(opts.ds, config)?)),
        None => None,
    };
    // Decoded changes plus their keys and bookkeeping take about twice the decoded size.
    let estimate: u64 = changes.iter().map(|c| c.input.uncompressed).sum::<u64>() * 2;
    let k = estimate
        .div_ceil(opts.memory_budget.max(1))
        .clamp(1, MAX_BUCKETS as u64) as usize;
    let writer = PartitionWriter::new(staging, plan.schema.clone(), &plan.primary_key);
    if k == 1 {
        let (mut day, mut next) = (Vec::new(), Vec::new());
        let change_rows = read_changes(plan, changes, window, sources, |batch, next_day| {
            if next_day {
                next.push(batch)
            } else {
                day.push(batch)
            }
            Ok(())
        })?;
        let mut delta = Delta::build(plan, day, next, opts.delete_mode)?;
        let (files, base_rows) = std::thread::scope(|scope| {
            let base_rx = spawn_base_reader(scope, plan, base);
            let (out, handle) = spawn_writer(scope, writer);
            let run = stream_join(plan, &mut delta, base_rx.iter(), &out);
            drop(out);
            drop(base_rx);
            let files = handle
                .join()
                .map_err(|_| LakeError::Invalid("the Parquet writer panicked".into()))?;
            let base_rows = run?;
            Ok::<_, LakeError>((files?, base_rows))
        })?;
        return Ok((files, change_rows, base_rows, 1));
    }
    tracing::info!(
        buckets = k,
        estimate,
        "changes exceed the memory budget: joining in buckets"
    );
    let spill = staging.join(".spill");
    fs::create_dir_all(&spill).map_err(LakeError::io(&spill))?;
    let mut day_buckets = Buckets::create(&spill, "day", k, &plan.schema)?;
    let mut next_buckets = Buckets::create(&spill, "next", k, &plan.schema)?;
    let change_rows = read_changes(plan, changes, window, sources, |batch, next_day| {
        if next_day {
            next_buckets.add(plan, &batch)
        } else {
            day_buckets.add(plan, &batch)
        }
    })?;
    let day_paths = day_buckets.finish()?;
    let next_paths = next_buckets.finish()?;
    let mut base_buckets = Buckets::create(&spill, "base", k, &plan.schema)?;
    let mut base_rows = 0u64;
    std::thread::scope(|scope| {
        for batch in spawn_base_reader(scope, plan, base).iter() {
            let batch = batch?;
            base_rows += batch.num_rows() as u64;
            base_buckets.add(plan, &batch)?;
        }
        Ok::<_, LakeError>(())
    })?;
    let base_paths = base_buckets.finish()?;
    let files = std::thread::scope(|scope| {
        let (out, handle) = spawn_writer(scope, writer);
        let run = (0..k).try_for_each(|i| {
            let mut delta = Delta::build(
                plan,
                read_bucket(&day_paths[i])?.collect::<Result<_, _>>()?,
                read_bucket(&next_paths[i])?.collect::<Result<_, _>>()?,
                opts.delete_mode,
            )?;
            stream_join(plan, &mut delta, read_bucket(&base_paths[i])?, &out).map(|_| ())
        });
        drop(out);
        let files = handle
            .join()
            .map_err(|_| LakeError::Invalid("the Parquet writer panicked".into()))?;
        run?;
        files
    })?;
    fs::remove_dir_all(&spill).map_err(LakeError::io(&spill))?;
    Ok((files, change_rows, base_rows, k))
}

/// Merges one day; see the module docs.
pub fn merge(opts: &MergeOptions) -> Result<MergeReport, LakeError> {
    let layout = TableLayout::new(&opts.root, opts.table.clone());
    let changes = change_inputs(&layout, opts)?;
    let (base, base_label) = base_inputs(&layout, opts)?;
    let change_files: Vec<ParquetInput> = changes.iter().map(|c| c.input.clone()).collect();
    let plan = Plan::new(opts, &change_files, &base)?;
    if let Some(drift) = &opts.drift {
        drift.check_columns(&change_files)?;
    }

    let parent = layout.snapshot_dir();
    fs::create_dir_all(&parent).map_err(LakeError::io(&parent))?;
    let target = layout.snapshot_partition(opts.ds);
    let staging_prefix = format!(".tmp-{}-", opts.ds.dir_name());
    remove_stale(&parent, &staging_prefix)?;
    let staging = parent.join(format!("{staging_prefix}{}", std::process::id()));
    fs::create_dir(&staging).map_err(LakeError::io(&staging))?;

    let mut sources = Sources::default();
    let result = join(&plan, opts, &changes, &base, &staging, &mut sources);
    let (files, change_rows, base_rows, buckets) = match result {
        Ok(done) => done,
        Err(err) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    let finish = || -> Result<u64, LakeError> {
        let mut entries = Vec::with_capacity(files.len());
        for (path, rows) in &files {
            entries.push(manifest::file_entry(path, *rows)?);
        }
        let rows = files.iter().map(|(_, r)| r).sum();
        Manifest {
            table: opts.table.to_string(),
            ds: opts.ds.to_string(),
            rows,
            files: entries,
            sources: sources.ranges(),
            base: base_label.clone(),
            delete_mode: Some(opts.delete_mode.to_string()),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
        .write(&staging)?;
        swap_in(&staging, &target)?;
        Ok(rows)
    };
    let rows = match finish() {
        Ok(rows) => rows,
        Err(err) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    let removed_partitions = match opts.keep {
        Some(n) => retain(&parent, n)?,
        None => Vec::new(),
    };
    tracing::info!(table = %opts.table, ds = %opts.ds, rows, change_rows, base_rows, buckets, "merged");
    Ok(MergeReport {
        partition: target,
        rows,
        files: files.len(),
        changes: change_rows,
        base_rows,
        base: base_label,
        buckets,
        removed_partitions,
    })
}

/// Removes what an interrupted merge of the same day left behind.
fn remove_stale(parent: &Path, prefix: &str) -> Result<(), LakeError> {
    for entry in fs::read_dir(parent).map_err(LakeError::io(parent))? {
        let entry = entry.map_err(LakeError::io(parent))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) || name.starts_with(&prefix.replacen(".tmp-", ".old-", 1)) {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(LakeError::io(&path))?;
        }
    }
    Ok(())
}

/// Swaps the complete `staging` directory in as `target`, then removes the old partition.
fn swap_in(staging: &Path, target: &Path) -> Result<(), LakeError> {
    let parent = target.parent().unwrap_or(Path::new("."));
    if target.exists() {
        if exchange(staging, target).is_ok() {
            manifest::sync_dir(parent).map_err(LakeError::io(parent))?;
            // `staging` now holds the old partition.
            fs::remove_dir_all(staging).map_err(LakeError::io(staging))?;
            return Ok(());
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = parent.join(format!(".old-{name}-{}", std::process::id()));
        fs::rename(target, &old).map_err(LakeError::io(target))?;
        fs::rename(staging, target).map_err(LakeError::io(staging))?;
        manifest::sync_dir(parent).map_err(LakeError::io(parent))?;
        fs::remove_dir_all(&old).map_err(LakeError::io(&old))?;
        return Ok(());
    }
    fs::rename(staging, target).map_err(LakeError::io(staging))?;
    manifest::sync_dir(parent).map_err(LakeError::io(parent))
}

/// Atomically exchanges two directories (Linux `renameat2(RENAME_EXCHANGE)`): readers see
/// either the old partition or the new one, never neither.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Keeps the `n` newest `ds=` partitions of `parent`; returns the days removed.
fn retain(parent: &Path, n: usize) -> Result<Vec<String>, LakeError> {
    let mut days: Vec<Ds> = Vec::new();
    for entry in fs::read_dir(parent).map_err(LakeError::io(parent))? {
        let entry = entry.map_err(LakeError::io(parent))?;
        let name = entry.file_name();
        if let Some(ds) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ds="))
            .and_then(|d| d.parse::<Ds>().ok())
        {
            days.push(ds);
        }
    }
    days.sort_unstable_by(|a, b| b.cmp(a));
    let mut removed = Vec::new();
    for ds in days.into_iter().skip(n) {
        let dir = parent.join(ds.dir_name());
        fs::remove_dir_all(&dir).map_err(LakeError::io(&dir))?;
        removed.push(ds.to_string());
    }
    Ok(removed)
}

/// Reads a whole partition (or directory of Parquet) into one batch; for tests and tools.
pub fn read_partition(dir: &Path) -> Result<Vec<RecordBatch>, LakeError> {
    let mut out = Vec::new();
    for path in parquet_files(dir)? {
        for batch in ParquetInput::open(&path)?.batches()? {
            out.push(batch?);
        }
    }
    Ok(out)
}
