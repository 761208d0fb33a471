//! The plugin contract: a reader reads one kind of store, a writer writes one; the
//! framework (`job`) does the rest.

use std::sync::Arc;

use arrow_array::RecordBatch;
use tokio::sync::mpsc;

use crate::dirty::DirtyLog;
use crate::split::Split;
use crate::types::TableSchema;
use crate::SyncError;

/// How a writer treats rows already in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Append; a duplicate key is a rejected (dirty) row.
    Insert,
    /// Insert or replace by primary key.
    Upsert,
    /// Empty the target first, then insert.
    Truncate,
}

impl std::str::FromStr for WriteMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "insert" => Ok(WriteMode::Insert),
            "upsert" | "replace" => Ok(WriteMode::Upsert),
            "truncate" => Ok(WriteMode::Truncate),
            other => Err(format!(
                "unknown mode {other:?} (expected insert, upsert or truncate)"
            )),
        }
    }
}

/// Reads one table of one store.
#[async_trait::async_trait]
pub trait Reader: Send + Sync {
    /// The table as a user names it, for messages and reports.
    fn name(&self) -> String;

    /// The server the reader loads (`host:port`), for the per-server task cap.
    fn server(&self) -> String {
        self.name()
    }

    /// The server `split` reads from (a sharded source spans several).
    fn server_for(&self, _split: &Split) -> String {
        self.server()
    }

    /// About how many rows the table holds (catalog statistics), for progress; `None` when
    /// unknown. Called after `splits`.
    async fn estimate_rows(&self) -> Option<u64> {
        None
    }

    /// Columns (canonical types) and primary key; an unknown table or an unsupported column
    /// type is an error naming it.
    async fn schema(&self) -> Result<TableSchema, SyncError>;

    /// At most about `max_splits` splits over `split_pk` (or the primary key when it is a
    /// single column), else one split for the whole table.
    async fn splits(
        &self,
        schema: &TableSchema,
        split_pk: Option<&str>,
        max_splits: usize,
    ) -> Result<Vec<Split>, SyncError>;

    /// Stream the rows of `split`, the columns of `schema` in its order, as batches of at
    /// most `batch_rows` rows into `out`. Rows that do not convert go to `dirty`.
    async fn read(
        &self,
        schema: &TableSchema,
        split: &Split,
        batch_rows: usize,
        out: mpsc::Sender<RecordBatch>,
        dirty: &DirtyLog,
    ) -> Result<(), SyncError>;
}

/// Writes one table of one store.
#[async_trait::async_trait]
pub trait Writer: Send + Sync {
    fn name(&self) -> String;

    /// Check the target against the source's columns and apply the mode's preparation
    /// (truncate, a staging directory) once per job.
    async fn prepare(&self, schema: &TableSchema, mode: WriteMode) -> Result<(), SyncError>;

    /// A writer for one split, attempt `attempt` (1 first). Everything it writes becomes
    /// visible at `finish` or not at all.
    async fn open(&self, split: &Split, attempt: u32) -> Result<Box<dyn SplitWriter>, SyncError>;

    /// Make the job's writes visible where that is job-wide (a Parquet partition).
    async fn commit(&self) -> Result<(), SyncError>;

    /// Undo what `prepare` staged; say what cannot be undone.
    async fn abort(&self) -> Option<String>;

    /// A reader over what was written, for `--verify`.
    fn verifier(&self) -> Option<Arc<dyn Reader>>;
}

/// A row the target refused: its index in the batch and the store's reason.
pub type Rejected = (usize, String);

#[async_trait::async_trait]
pub trait SplitWriter: Send {
    /// Write a batch; rows the store refused are returned, not written.
    async fn write(&mut self, batch: &RecordBatch) -> Result<Vec<Rejected>, SyncError>;

    /// Make the split's rows durable and visible.
    async fn finish(self: Box<Self>) -> Result<(), SyncError>;
}
