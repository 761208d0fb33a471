//! Parquet writer: Hive-style partitions `table/ds=YYYYMMDD/part-NNNNN.parquet`, one file per
//! split, written from the Arrow batches directly. Files go to a hidden staging directory
//! beside the partition (`table/.staging-ds=…-<pid>`; Hive-style readers skip names starting
//! with `.`), and `commit` swaps it into place, so a reader never sees half a partition and a
//! re-run replaces the partition whole. Every mode overwrites the partition.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use tokio::sync::mpsc;

use crate::dirty::DirtyLog;
use crate::plugin::{Reader, Rejected, SplitWriter, WriteMode, Writer};
use crate::split::Split;
use crate::types::{CanonicalType, Column, TableSchema};
use crate::SyncError;

/// Rows per row group: bounds the writer's buffer.
const ROW_GROUP_ROWS: usize = 64 * 1024;

fn perr(context: impl Into<String>) -> impl FnOnce(parquet::errors::ParquetError) -> SyncError {
    let context = context.into();
    move |source| SyncError::Parquet { context, source }
}

#[derive(Debug)]
pub struct ParquetWriter {
    dir: PathBuf,
    partition: Option<(String, String)>,
    staging: PathBuf,
    schema: std::sync::Mutex<Option<TableSchema>>,
}

impl ParquetWriter {
    pub fn new(dir: PathBuf, partition: Option<(String, String)>) -> Self {
        let leaf = partition
            .as_ref()
            .map_or_else(|| "data".to_string(), |(k, v)| format!("{k}={v}"));
        let staging = dir.join(format!(".staging-{leaf}-{}", std::process::id()));
        ParquetWriter {
            dir,
            partition,
            staging,
            schema: std::sync::Mutex::new(None),
        }
    }

    /// Where the partition's files live once committed.
    pub fn final_dir(&self) -> PathBuf {
        match &self.partition {
            Some((k, v)) => self.dir.join(format!("{k}={v}")),
            None => self.dir.clone(),
        }
    }

    fn part_name(split: &Split) -> String {
        format!("part-{:05}.parquet", split.index)
    }
}

#[async_trait::async_trait]
impl Writer for ParquetWriter {
    fn name(&self) -> String {
        self.final_dir().display().to_string()
    }

    async fn prepare(&self, schema: &TableSchema, _mode: WriteMode) -> Result<(), SyncError> {
        if self.partition.is_none() {
            return Err(SyncError::Invalid(format!(
                "parquet target {} needs a partition, e.g. ?ds=20261129",
                self.dir.display()
            )));
        }
        // Leftovers of a run that died before its commit.
        if self.staging.exists() {
            std::fs::remove_dir_all(&self.staging).map_err(|e| SyncError::io(&self.staging, e))?;
        }
        std::fs::create_dir_all(&self.staging).map_err(|e| SyncError::io(&self.staging, e))?;
        *self
            .schema
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))? =
            Some(schema.clone());
        Ok(())
    }

    async fn open(&self, split: &Split, _attempt: u32) -> Result<Box<dyn SplitWriter>, SyncError> {
        let schema = self
            .schema
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))?
            .clone()
            .ok_or_else(|| SyncError::Internal("open before prepare".into()))?;
        let path = self.staging.join(Self::part_name(split));
        // Written under a temporary name; a retried split overwrites it.
        let tmp = path.with_extension("parquet.tmp");
        let file = File::create(&tmp).map_err(|e| SyncError::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_size(ROW_GROUP_ROWS)
            .build();
        let writer = ArrowWriter::try_new(file, schema.arrow(), Some(props))
            .map_err(perr(format!("creating {}", tmp.display())))?;
        Ok(Box::new(ParquetSplitWriter {
            writer: Some(writer),
            tmp,
            path,
        }))
    }

    async fn commit(&self) -> Result<(), SyncError> {
        let target = self.final_dir();
        let old = self.dir.join(format!(
            ".old-{}-{}",
            std::process::id(),
            target
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        let had_old = target.exists();
        if had_old {
            std::fs::rename(&target, &old).map_err(|e| SyncError::io(&target, e))?;
        }
        std::fs::rename(&self.staging, &target).map_err(|e| SyncError::io(&self.staging, e))?;
        if had_old {
            std::fs::remove_dir_all(&old).map_err(|e| SyncError::io(&old, e))?;
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    async fn abort(&self) -> Option<String> {
        let _ = std::fs::remove_dir_all(&self.staging);
        None
    }

    fn verifier(&self) -> Option<Arc<dyn Reader>> {
        Some(Arc::new(ParquetPartition {
            dir: self.final_dir(),
        }))
    }
}

struct ParquetSplitWriter {
    writer: Option<ArrowWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
}

#[async_trait::async_trait]
impl SplitWriter for ParquetSplitWriter {
    async fn write(&mut self, batch: &RecordBatch) -> Result<Vec<Rejected>, SyncError> {
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| SyncError::Internal("split writer used after finish".into()))?;
        tokio::task::block_in_place(|| w.write(batch))
            .map_err(perr(format!("writing {}", self.tmp.display())))?;
        Ok(Vec::new())
    }

    async fn finish(mut self: Box<Self>) -> Result<(), SyncError> {
        let w = self
            .writer
            .take()
            .ok_or_else(|| SyncError::Internal("split writer finished twice".into()))?;
        let file = tokio::task::block_in_place(|| w.into_inner())
            .map_err(perr(format!("closing {}", self.tmp.display())))?;
        file.sync_all().map_err(|e| SyncError::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| SyncError::io(&self.path, e))?;
        Ok(())
    }
}

/// The canonical type of an Arrow column type, as written by this module.
pub fn canonical_of_arrow(t: &DataType) -> Option<CanonicalType> {
    Some(match t {
        DataType::Boolean => CanonicalType::Bool,
        DataType::Int64 => CanonicalType::Int64,
        DataType::Float64 => CanonicalType::Float64,
        DataType::Decimal128(p, s) => CanonicalType::Decimal {
            precision: *p,
            scale: *s,
        },
        DataType::Utf8 => CanonicalType::Utf8,
        DataType::Binary => CanonicalType::Binary,
        DataType::Date32 => CanonicalType::Date,
        DataType::Time64(TimeUnit::Microsecond) => CanonicalType::Time,
        DataType::Timestamp(TimeUnit::Microsecond, None) => CanonicalType::Timestamp,
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => CanonicalType::TimestampTz,
        _ => return None,
    })
}

/// A committed partition read back per split file, for `--verify`.
#[derive(Debug)]
pub struct ParquetPartition {
    dir: PathBuf,
}

impl ParquetPartition {
    fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, SyncError> {
        let file = File::open(path).map_err(|e| SyncError::io(path, e))?;
        ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(perr(format!("opening {}", path.display())))
    }
}

#[async_trait::async_trait]
impl Reader for ParquetPartition {
    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    async fn schema(&self) -> Result<TableSchema, SyncError> {
        let first = self.dir.join("part-00000.parquet");
        let builder = Self::open(&first)?;
        let mut columns = Vec::new();
        for f in builder.schema().fields() {
            let ty =
                canonical_of_arrow(f.data_type()).ok_or_else(|| SyncError::UnsupportedType {
                    table: self.name(),
                    column: f.name().clone(),
                    native: f.data_type().to_string(),
                })?;
            columns.push(Column {
                name: f.name().clone(),
                ty,
                nullable: f.is_nullable(),
                native: f.data_type().to_string(),
            });
        }
        Ok(TableSchema {
            columns,
            primary_key: Vec::new(),
        })
    }

    async fn splits(
        &self,
        _schema: &TableSchema,
        _split_pk: Option<&str>,
        _max_splits: usize,
    ) -> Result<Vec<Split>, SyncError> {
        Ok(vec![Split::whole(0)])
    }

    async fn read(
        &self,
        schema: &TableSchema,
        split: &Split,
        batch_rows: usize,
        out: mpsc::Sender<RecordBatch>,
        _dirty: &DirtyLog,
    ) -> Result<(), SyncError> {
        let path = self.dir.join(ParquetWriter::part_name(split));
        let builder = Self::open(&path)?;
        let file_schema = builder.schema().clone();
        let indices: Vec<usize> = schema
            .columns
            .iter()
            .map(|c| {
                file_schema
                    .index_of(&c.name)
                    .map_err(|_| SyncError::UnknownColumn {
                        table: self.name(),
                        column: c.name.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let reader = builder
            .with_batch_size(batch_rows)
            .build()
            .map_err(perr(format!("reading {}", path.display())))?;
        for batch in reader {
            let batch = batch.map_err(|e| SyncError::Parquet {
                context: format!("reading {}", path.display()),
                source: parquet::errors::ParquetError::ArrowError(e.to_string()),
            })?;
            let batch = batch
                .project(&indices)
                .map_err(|e| SyncError::Internal(format!("projecting {}: {e}", path.display())))?;
            if out.send(batch).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}
