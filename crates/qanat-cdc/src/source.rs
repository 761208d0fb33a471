//! The contract between a database source and the delivery loop.
//!
//! A source turns the database's change log into [`Change`]s, in commit order. The loop
//! publishes them, and once the bus has acknowledged every event emitted before a resume
//! point it stores that point's [`Position`] and hands it back with
//! [`Source::acknowledge`] (PostgreSQL then confirms the LSN to its slot; the binlog needs
//! nothing). A restarted source is opened at the last stored position.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::ChangeEvent;

/// Where a restarted source resumes. Opaque to the loop: each source defines and parses its
/// own JSON (binlog file + pos and GTID state; PostgreSQL LSN; snapshot progress).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(pub serde_json::Value);

/// One step of a source's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A transaction starts.
    Begin {
        tx_id: String,
        /// Commit time, milliseconds since the epoch (the binlog's BEGIN timestamp is the
        /// transaction's start; sources use the best time they have).
        ts_ms: i64,
    },
    /// A row change. Never a resume point.
    Row(Box<ChangeEvent>),
    /// A table's columns changed (DDL) at this log position; recorded in the schema history
    /// before any row that uses the new columns is emitted.
    Schema(SchemaChange),
    /// The transaction that began last is committed. Resuming at `resume` loses nothing once
    /// everything before this commit is acknowledged.
    Commit {
        tx_id: String,
        /// Row events per `db.table` (or `schema.table`) in this transaction.
        counts: BTreeMap<String, u64>,
        /// `None` when the source saves building a position for this commit (a busy stream of
        /// small transactions); it then names a later resume point soon, at the latest when
        /// its log pauses.
        resume: Option<Position>,
    },
    /// Nothing to publish, but the log moved (or time passed): a resume point that keeps the
    /// stored position and the lag current on a quiet source.
    Heartbeat { resume: Position, ts_ms: i64 },
}

/// A table definition as of a log position, for the schema history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaChange {
    pub db: String,
    pub schema: Option<String>,
    pub table: String,
    /// The statement as the source logged it, when there is one.
    pub ddl: Option<String>,
    /// `None` when the table was dropped.
    pub columns: Option<Vec<Column>>,
    pub primary_key: Vec<String>,
    /// The log position of the DDL, so a restart before it decodes with the old columns.
    pub position: Position,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The source's own type name with its modifiers, e.g. `decimal(20,4) unsigned`.
    pub type_name: String,
    pub nullable: bool,
}

/// A source of changes. The loop drives one source per connector.
#[allow(async_fn_in_trait)]
pub trait Source {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The next change, waiting for the database when there is none yet. A source that has
    /// nothing for a while returns a [`Change::Heartbeat`] now and then (about every second):
    /// the loop hands stored positions back through [`Source::acknowledge`] between changes,
    /// never by cancelling a pending `next()` (dropped only at shutdown).
    async fn next(&mut self) -> Result<Change, Self::Error>;

    /// A change already decoded and waiting, without awaiting anything: the loop takes these
    /// before it builds a `next()` future (most of a busy source's changes come from one
    /// decoded log record, and setting up the future for each costs more than the change).
    fn ready(&mut self) -> Option<Change> {
        None
    }

    /// Everything up to `position` is durable on the bus.
    async fn acknowledge(&mut self, position: &Position) -> Result<(), Self::Error>;
}

/// When a connector reads the tables whole before streaming (`snapshot` in its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Snapshot when there is no stored position, then stream.
    #[default]
    Initial,
    /// Never snapshot: stream from the log's current end (or the stored position).
    Never,
    /// Like `initial`, and also when the stored position is gone from the server (binlog
    /// purged, replication slot dropped).
    WhenNeeded,
}

impl std::str::FromStr for SnapshotMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "initial" => Ok(SnapshotMode::Initial),
            "never" => Ok(SnapshotMode::Never),
            "when_needed" => Ok(SnapshotMode::WhenNeeded),
            other => Err(format!(
                "{other:?} is not one of initial, never, when_needed"
            )),
        }
    }
}
