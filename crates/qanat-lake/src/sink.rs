//! One change-log file being written: Arrow builders flushed in batches into a Parquet
//! writer on a `.tmp-*` file beside its final place, then completed (footer with the
//! `qanat.*` metadata, fsync) and published by rename (then fsync of the directory).
//!
//! Parquet encoding and compression run on a thread of the file's own ([`Encoder`]): the
//! caller only fills builders and hands each finished batch over a bounded channel, so it
//! goes on decoding while the previous batches are encoded, and waits only when
//! [`ENCODE_QUEUE`] batches are already queued. [`ChangeFile::complete`] drains the queue
//! and joins the thread before the footer is written, so completing, publishing and the
//! caller's commit keep their order.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use arrow_array::RecordBatch;
use arrow_schema::Schema;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::columns;
use crate::fs::{LakeFile, LakeFs};
use crate::schema::{
    change_log_schema, DataBuilders, DataColumn, Fit, MetaBuilders, RowImage, RowMeta, ValueError,
};

/// Rows buffered in builders before they are handed to the encoder.
const BATCH_ROWS: usize = 16_384;

/// Metadata columns whose values are (nearly) all distinct.
const UNIQUE_COLUMNS: [&str; 5] = [
    columns::LOG_POS,
    columns::LOG_TIME,
    columns::COMMIT_TS,
    columns::EXTRACT_TIME,
    columns::OFFSET,
];

/// Batches waiting for a file's encoder before the caller waits: enough to ride out a slow
/// compression of one batch, few enough to bound memory (a batch is a few MiB).
const ENCODE_QUEUE: usize = 2;

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
    #[error("{path}: the Parquet encoder thread {what}")]
    Encoder { path: PathBuf, what: &'static str },
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
    fs: Arc<dyn LakeFs>,
    dir: PathBuf,
    tmp: PathBuf,
    data: DataBuilders,
    meta: MetaBuilders,
    schema: Arc<Schema>,
    encoder: Option<Encoder>,
    buffered: usize,
    rows: u64,
    /// Bytes of input appended since the last batch, a stand-in for its encoded size.
    buffered_input: usize,
}

/// What the encoder thread reports for the size estimate.
#[derive(Default)]
struct Progress {
    /// Bytes written plus the encoded size of the open row group, after the last batch.
    encoded: AtomicU64,
    /// Input bytes of the batches handed over and not yet encoded.
    queued_input: AtomicU64,
}

/// The thread encoding one file's batches, in the order they were sent.
struct Encoder {
    batches: SyncSender<(RecordBatch, u64)>,
    thread: JoinHandle<Result<ArrowWriter<Box<dyn LakeFile>>, SinkError>>,
    progress: Arc<Progress>,
}

impl Encoder {
    fn start(fs: &dyn LakeFs, tmp: &Path, schema: Arc<Schema>) -> Result<Encoder, SinkError> {
        let file = fs.create(tmp).map_err(io_err(tmp))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_size(1 << 20);
        // Nearly every value of these is distinct: a dictionary would only be hashed into
        // and then abandoned for plain encoding once it outgrows its page.
        for name in UNIQUE_COLUMNS {
            props = props.set_column_dictionary_enabled(ColumnPath::from(name), false);
        }
        let props = props.build();
        let mut writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(|source| {
            SinkError::Parquet {
                path: tmp.to_owned(),
                source,
            }
        })?;
        let (batches, queue) = sync_channel::<(RecordBatch, u64)>(ENCODE_QUEUE);
        let progress = Arc::new(Progress::default());
        let report = progress.clone();
        let path = tmp.to_owned();
        let thread = std::thread::Builder::new()
            .name("lake-encode".into())
            .spawn(move || {
                // Ends when the sender is dropped (complete or abandon), or at the first
                // error, which drops the receiver so the next send fails.
                for (batch, input) in queue {
                    writer.write(&batch).map_err(|source| SinkError::Parquet {
                        path: path.clone(),
                        source,
                    })?;
                    let encoded = writer.bytes_written() + writer.in_progress_size();
                    report.encoded.store(encoded as u64, Ordering::Relaxed);
                    report.queued_input.fetch_sub(input, Ordering::Relaxed);
                }
                Ok(writer)
            })
            .map_err(io_err(tmp))?;
        Ok(Encoder {
            batches,
            thread,
            progress,
        })
    }

    /// Wait for every batch sent to be encoded; the writer, or the encoder's error.
    fn finish(self, tmp: &Path) -> Result<ArrowWriter<Box<dyn LakeFile>>, SinkError> {
        drop(self.batches);
        match self.thread.join() {
            Ok(result) => result,
            Err(_) => Err(SinkError::Encoder {
                path: tmp.to_owned(),
                what: "panicked",
            }),
        }
    }
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
        fs: Arc<dyn LakeFs>,
        dir: &Path,
        tag: &str,
        columns: Vec<DataColumn>,
    ) -> Result<ChangeFile, SinkError> {
        fs.create_dir_all(dir).map_err(io_err(dir))?;
        let data = DataBuilders::new(columns);
        let schema = Arc::new(change_log_schema(&data));
        Ok(ChangeFile {
            fs,
            dir: dir.to_owned(),
            tmp: dir.join(format!("{TMP_PREFIX}{tag}.parquet")),
            data,
            meta: MetaBuilders::default(),
            schema,
            encoder: None,
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
    /// rows not encoded yet, in builders or queued (compressed change rows are rarely larger).
    pub fn estimated_bytes(&self) -> u64 {
        let (encoded, queued) = self.encoder.as_ref().map_or((0, 0), |e| {
            (
                e.progress.encoded.load(Ordering::Relaxed),
                e.progress.queued_input.load(Ordering::Relaxed),
            )
        });
        encoded + (queued + self.buffered_input as u64) / 3
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
        let encoder = match &mut self.encoder {
            Some(e) => e,
            None => self
                .encoder
                .insert(Encoder::start(&*self.fs, &self.tmp, self.schema.clone())?),
        };
        let input = self.buffered_input as u64;
        encoder
            .progress
            .queued_input
            .fetch_add(input, Ordering::Relaxed);
        if encoder.batches.send((batch, input)).is_err() {
            // The encoder stopped at an error: report it.
            return match self.encoder.take().map(|e| e.finish(&self.tmp)) {
                Some(Err(e)) => Err(e),
                _ => Err(SinkError::Encoder {
                    path: self.tmp.clone(),
                    what: "stopped",
                }),
            };
        }
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
        let Some(encoder) = self.encoder.take() else {
            return Err(SinkError::Io {
                path: self.tmp.clone(),
                source: io::Error::other("a change file without rows is never completed"),
            });
        };
        let mut writer = encoder.finish(&self.tmp)?;
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
        let mut file = writer.into_inner().map_err(parquet_err(&self.tmp))?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        let bytes = file.size().map_err(io_err(&self.tmp))?;
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

    /// Give up the file: its encoder is stopped and its temporary file removed.
    pub fn abandon(mut self) {
        if let Some(encoder) = self.encoder.take() {
            let _ = encoder.finish(&self.tmp);
        }
        let _ = self.fs.remove_file(&self.tmp);
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
pub fn publish(fs: &dyn LakeFs, files: &[Completed]) -> Result<(), SinkError> {
    let mut dirs: Vec<&Path> = Vec::new();
    for f in files {
        fs.rename(&f.tmp, &f.path).map_err(io_err(&f.path))?;
        if let Some(dir) = f.path.parent() {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    // The file's directory, and the directories above it up to the table's change log,
    // which may have been created for this file (a new day or hour).
    for dir in dirs {
        fs.sync_dir(dir).map_err(io_err(dir))?;
        for parent in dir.ancestors().skip(1).take(2) {
            fs.sync_dir(parent).map_err(io_err(parent))?;
        }
    }
    Ok(())
}
