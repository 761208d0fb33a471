//! One change-log file being written: Arrow builders flushed in batches into a Parquet
//! writer on a `.tmp-*` file beside its final place, then completed (footer with the
//! `qanat.*` metadata, fsync) and published by rename (then fsync of the directory).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::Schema;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::columns;
use crate::schema::{
    change_log_schema, DataBuilders, DataColumn, Fit, MetaBuilders, RowImage, RowMeta, ValueError,
};

/// Rows buffered in builders before they are encoded into the Parquet writer.
const BATCH_ROWS: usize = 16_384;

/// Prefix of files not yet complete; they are never read and are removed at start.
pub const TMP_PREFIX: &str = ".tmp-";

/// Writing a change-log file failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: writing Parquet: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: building a batch: {source}")]
    Arrow {
        path: PathBuf,
        source: arrow_schema::ArrowError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_owned(),
        source,
    }
}

/// File-level facts written into the footer's key-value metadata.
#[derive(Debug, Clone)]
pub struct FileFacts {
    pub table: String,
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub primary_key: Vec<String>,
    /// How many files (one per day/hour directory) cover this same offset range.
    pub group_files: usize,
}

/// A change-log file being written.
pub struct ChangeFile {
    dir: PathBuf,
    tmp: PathBuf,
    data: DataBuilders,
    meta: MetaBuilders,
    schema: Arc<Schema>,
    writer: Option<ArrowWriter<File>>,
    buffered: usize,
    rows: u64,
    /// Bytes of input appended since the last batch, a stand-in for its encoded size.
    buffered_input: usize,
}

/// A complete file, fsynced under its temporary name, waiting for [`publish`].
#[derive(Debug)]
pub struct Completed {
    pub tmp: PathBuf,
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

impl ChangeFile {
    /// A new file in `dir` (created if missing) with these data columns. `tag` makes the
    /// temporary name unique among the open files of the directory.
    pub fn create(
        dir: &Path,
        tag: &str,
        columns: Vec<DataColumn>,
    ) -> Result<ChangeFile, SinkError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let data = DataBuilders::new(columns);
        let schema = Arc::new(change_log_schema(&data));
        Ok(ChangeFile {
            dir: dir.to_owned(),
            tmp: dir.join(format!("{TMP_PREFIX}{tag}.parquet")),
            data,
            meta: MetaBuilders::default(),
            schema,
            writer: None,
            buffered: 0,
            rows: 0,
            buffered_input: 0,
        })
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Append a row; `input_bytes` is the record's size, for the size estimate.
    pub fn append(
        &mut self,
        row: &RowImage<'_>,
        meta: &RowMeta<'_>,
        input_bytes: usize,
    ) -> Result<Fit, AppendError> {
        match self.data.append(row).map_err(AppendError::Value)? {
            Fit::Appended => {}
            change => return Ok(change),
        }
        self.meta.append(meta);
        self.buffered += 1;
        self.rows += 1;
        self.buffered_input += input_bytes;
        if self.buffered >= BATCH_ROWS {
            self.flush_batch().map_err(AppendError::Sink)?;
        }
        Ok(Fit::Appended)
    }

    /// Estimated size of the file so far: encoded bytes, plus a third of the input of the
    /// rows still in builders (compressed change rows are rarely larger).
    pub fn estimated_bytes(&self) -> u64 {
        let written = self
            .writer
            .as_ref()
            .map_or(0, |w| w.bytes_written() + w.in_progress_size());
        (written + self.buffered_input / 3) as u64
    }

    fn flush_batch(&mut self) -> Result<(), SinkError> {
        if self.buffered == 0 {
            return Ok(());
        }
        let mut arrays = self.data.finish();
        arrays.extend(self.meta.finish());
        let batch = RecordBatch::try_new(self.schema.clone(), arrays).map_err(|source| {
            SinkError::Arrow {
                path: self.tmp.clone(),
                source,
            }
        })?;
        let writer = match &mut self.writer {
            Some(w) => w,
            None => {
                let file = File::create(&self.tmp).map_err(io_err(&self.tmp))?;
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .set_max_row_group_size(1 << 20)
                    .build();
                let w = ArrowWriter::try_new(file, self.schema.clone(), Some(props)).map_err(
                    |source| SinkError::Parquet {
                        path: self.tmp.clone(),
                        source,
                    },
                )?;
                self.writer.insert(w)
            }
        };
        writer.write(&batch).map_err(|source| SinkError::Parquet {
            path: self.tmp.clone(),
            source,
        })?;
        self.buffered = 0;
        self.buffered_input = 0;
        Ok(())
    }

    /// Write the footer with `facts`, fsync, and return where the file goes on [`publish`].
    pub fn complete(mut self, facts: &FileFacts) -> Result<Completed, SinkError> {
        self.flush_batch()?;
        let parquet_err = |path: &Path| {
            let path = path.to_owned();
            move |source| SinkError::Parquet { path, source }
        };
        let Some(mut writer) = self.writer.take() else {
            return Err(SinkError::Io {
                path: self.tmp.clone(),
                source: io::Error::other("a change file without rows is never completed"),
            });
        };
        let kv = [
            ("qanat.table", facts.table.clone()),
            ("qanat.topic", facts.topic.clone()),
            ("qanat.partition", facts.partition.to_string()),
            ("qanat.first_offset", facts.first_offset.to_string()),
            ("qanat.last_offset", facts.last_offset.to_string()),
            (columns::PRIMARY_KEY_METADATA, facts.primary_key.join(",")),
            ("qanat.group_files", facts.group_files.to_string()),
        ];
        for (k, v) in kv {
            writer.append_key_value_metadata(KeyValue::new(k.to_owned(), v));
        }
        let file = writer.into_inner().map_err(parquet_err(&self.tmp))?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        let bytes = file.metadata().map_err(io_err(&self.tmp))?.len();
        let name = crate::layout::change_file_name(
            &facts.topic,
            facts.partition,
            facts.first_offset,
            facts.last_offset,
        );
        Ok(Completed {
            path: self.dir.join(name),
            tmp: self.tmp,
            rows: self.rows,
            bytes,
        })
    }

    /// Give up the file: its temporary file is removed.
    pub fn abandon(self) {
        drop(self.writer);
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Appending a row failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error(transparent)]
    Value(ValueError),
    #[error(transparent)]
    Sink(SinkError),
}

/// Rename every completed file into place (replacing a file of the same name: the same
/// range landed again), then fsync each directory once.
pub fn publish(files: &[Completed]) -> Result<(), SinkError> {
    let mut dirs: Vec<&Path> = Vec::new();
    for f in files {
        fs::rename(&f.tmp, &f.path).map_err(io_err(&f.path))?;
        if let Some(dir) = f.path.parent() {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    // The file's directory, and the directories above it up to the table's change log,
    // which may have been created for this file (a new day or hour).
    for dir in dirs {
        crate::manifest::sync_dir(dir).map_err(io_err(dir))?;
        for parent in dir.ancestors().skip(1).take(2) {
            crate::manifest::sync_dir(parent).map_err(io_err(parent))?;
        }
    }
    Ok(())
}
