//! MariaDB 10.6+ / MySQL 8 as a replica: the binlog in ROW format with full row images, read
//! with `mysql_async` (feature `binlog`), plus the small MariaDB shim in [`mariadb`].
//!
//! # Position
//! `{"file", "pos", "gtid"?, "gtid_state"?, "snapshot"?}`: the binlog coordinates from which a
//! restart loses nothing (always the end of a committed transaction or a standalone statement), the
//! last GTID seen, and while a snapshot runs the tables done and the last primary key read.
//!
//! # Snapshot and stream, one history
//! The snapshot reads inside `START TRANSACTION WITH CONSISTENT SNAPSHOT`, whose binlog
//! coordinates MariaDB reports as `binlog_snapshot_file`/`binlog_snapshot_position` without
//! any lock, in chunks ordered by primary key (`WHERE pk > last ORDER BY pk LIMIT n`). Streaming
//! then starts at those coordinates. After a crash mid-snapshot a new consistent snapshot
//! continues after the stored last key while the stream still starts at the original
//! coordinates: rows read later are newer than the stream's start, and replaying the binlog
//! from the older start in order converges every key to its final state (each row event
//! carries the full image). A table without a primary key is read in one ordered-by-nothing
//! pass (streamed in chunks of `snapshot_chunk` rows), restarted from its beginning after a
//! crash. A table truncated or altered after the read view began (MariaDB's error 1412 when
//! the snapshot reaches it) is continued the same way, in a new consistent snapshot after the
//! last key handed over (at most [`SNAPSHOT_RENEWALS`] times per table).
//!
//! The chunks are read and decoded by a task of their own ([`SnapshotReader`]) while the
//! delivery loop encodes and produces the rows before them; it hands rows over in batches of
//! [`SNAPSHOT_BATCH`] and runs at most [`SNAPSHOT_AHEAD`] batches ahead, which bounds the
//! snapshot's memory whatever the chunk size. The stored progress (last key) is that of the
//! batches handed to the loop, never of the ones read ahead.
//!
//! # Schema
//! Column names, signedness, ENUM/SET labels, charsets and the primary key come from the
//! TABLE_MAP event's `binlog_row_metadata=FULL` metadata, so each row is decoded with the
//! columns it was written with. ALTER/CREATE/DROP/RENAME TABLE re-read the table from
//! `information_schema` and emit [`Change::Schema`]; that definition is the fallback for
//! names when the server logs only minimal metadata. `TRUNCATE [TABLE] t` (a QUERY event)
//! becomes one `op: "t"` event for the table.

pub mod charset;
pub mod decode;
pub mod mariadb;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mysql_async::binlog::events::{EventData, OptionalMetaExtractor, RowsEventData, TableMapEvent};
use mysql_async::binlog::value::BinlogValue;
use mysql_async::binlog::EventType;
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Opts, Value as My};
use mysql_common::io::ParseBuf;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use self::decode::{ColumnShape, DecodeError};
use crate::event::{ChangeEvent, Op, Row, SnapshotMark, SourceInfo, Value};
use crate::pipeline::{now_ms, PipelineConfig, StoredState};
use crate::source::{Change, Column, Position, SchemaChange, Source};

pub use crate::source::SnapshotMode;

#[derive(Debug, Clone)]
pub struct MysqlConfig {
    /// `mysql://user:pass@host:port` (or `mariadb://`).
    pub url: String,
    /// This replica's server id; must differ from every other replica of the server.
    pub server_id: u32,
    pub snapshot: SnapshotMode,
    /// `MASTER_HEARTBEAT_PERIOD`: the server sends a heartbeat when idle this long.
    pub heartbeat: Duration,
    pub snapshot_chunk: usize,
    /// MariaDB: resume with `@slave_connect_state` (the GTID state) instead of file + pos, so
    /// a connector can follow a failover to another server of the same replication topology.
    pub gtid_resume: bool,
    /// `db.table` of the signal table (Debezium's `signal.data.collection`): a row inserted
    /// there asks for an incremental snapshot; the connector writes its chunk watermarks
    /// there too. See [`SIGNAL_TABLE_DDL`].
    pub signal_table: Option<String>,
}

/// The signal table's definition (Debezium's): `id`, `type` and `data` (JSON) columns.
pub const SIGNAL_TABLE_DDL: &str =
    "(id VARCHAR(64) PRIMARY KEY, type VARCHAR(32) NOT NULL, data VARCHAR(2048) NULL)";

#[derive(Debug, thiserror::Error)]
pub enum MysqlError {
    #[error("bad source URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        source: mysql_async::Error,
    },
    #[error("the server has {variable}={found}; change data capture needs {variable}={want} (SET GLOBAL {variable}='{want}' or set it in the server configuration, then restart the writers' sessions)")]
    ServerSetting {
        variable: &'static str,
        found: String,
        want: &'static str,
    },
    #[error("the stored position {stored} is no longer on the server (oldest binlog still there: {oldest}); the binlog was purged past it. Re-snapshot: run the connector with --snapshot when_needed (or snapshot = \"when_needed\"), or delete its record in the offsets topic and start with snapshot = \"initial\"")]
    Purged { stored: String, oldest: String },
    #[error("cannot follow DDL at {position}: {statement:?}: {reason}")]
    Ddl {
        statement: String,
        position: String,
        reason: String,
    },
    #[error("decoding {table} at {position}: {error}")]
    Decode {
        table: String,
        position: String,
        error: DecodeError,
    },
    #[error("query {what}: {source}")]
    Query {
        what: String,
        source: mysql_async::Error,
    },
    #[error("binlog stream at {position}: {source}")]
    Stream {
        position: String,
        source: mysql_async::Error,
    },
    #[error("binlog event at {position}: {reason}")]
    Unsupported { position: String, reason: String },
    #[error("stored position is not a binlog position: {0}")]
    BadPosition(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// How often a streaming commit's position is built at most (see `MysqlSource::commit`).
const NAME_COMMITS_EVERY: Duration = Duration::from_millis(5);

fn q(what: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> MysqlError {
    let what = what.into();
    move |source| MysqlError::Query { what, source }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct BinlogPosition {
    file: String,
    pos: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gtid: Option<String>,
    /// MariaDB: the last GTID of each replication domain, what `@slave_connect_state` takes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    gtid_state: BTreeMap<u32, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<SnapshotProgress>,
    /// An incremental snapshot (tables signalled while streaming) in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incremental: Option<IncrementalProgress>,
}

/// What an incremental snapshot has left: the tables to read, the first being read, and the
/// last key of it emitted. A restart redoes the chunk after `last_key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct IncrementalProgress {
    tables: Vec<String>,
    #[serde(default)]
    last_key: Option<Vec<Json>>,
    #[serde(default)]
    rows_done: u64,
    #[serde(default)]
    rows_estimated: u64,
}

/// One chunk of an incremental snapshot between its watermarks (DBLog): read after the low
/// watermark was written and before the high one; a row the stream changes between the two
/// watermarks is dropped from the chunk (the stream's event is as new or newer); at the high
/// watermark what is left is emitted as reads.
struct ChunkWindow {
    /// `db.table`.
    table: String,
    low: String,
    high: String,
    /// The low watermark was seen in the stream.
    open: bool,
    /// The chunk's rows in key order; `None` once the stream changed that key.
    rows: Vec<Option<ChangeEvent>>,
    /// Index in `rows` by the key's JSON text.
    by_key: HashMap<String, usize>,
    /// The chunk's last key (also when that row was dropped), where the next chunk starts.
    last_key: Option<Vec<Json>>,
    /// Fewer rows than a chunk: the table is read to its end.
    last_chunk: bool,
}

impl BinlogPosition {
    fn show(&self) -> String {
        format!("{}:{}", self.file, self.pos)
    }
    fn position(&self) -> Position {
        Position(serde_json::to_value(self).unwrap_or(Json::Null))
    }
    /// Binlog order: file names sort by their sequence suffix.
    fn at_or_before(&self, other: &BinlogPosition) -> bool {
        (self.file.as_str(), self.pos) <= (other.file.as_str(), other.pos)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct SnapshotProgress {
    /// `db.table` of every table finished.
    done: Vec<String>,
    /// When set, only these tables (`qanat cdc snapshot --table`); else every captured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    only: Option<Vec<String>>,
    /// The table being read and the last key read in it.
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    last_key: Option<Vec<Json>>,
}

#[derive(Debug, Clone)]
struct TableDef {
    db: String,
    table: String,
    primary_key: Vec<String>,
    estimated_rows: u64,
}

/// A table as its TABLE_MAP describes it, with what every row of it needs worked out once.
struct TableShape {
    /// The TABLE_MAP body it was worked out from.
    body: Vec<u8>,
    columns: Vec<ColumnShape>,
    db: Arc<str>,
    table: Arc<str>,
    /// `db.table`.
    coll: String,
    captured: bool,
    /// Primary-key columns by the TABLE_MAP's metadata; all false when it names none.
    pk_flags: Vec<bool>,
}

/// Rows the snapshot reader hands over at a time: a chunk (`snapshot_chunk` rows, one query)
/// is handed over in batches of this many rows as they are decoded, so that the delivery
/// starts on a chunk while the rest of it is still read.
const SNAPSHOT_BATCH: usize = 1024;

/// Batches the snapshot reader may have read ahead of the delivery (besides the one being
/// read and the one being delivered): with [`SNAPSHOT_BATCH`], what bounds the snapshot's
/// memory, whatever the chunk size.
const SNAPSHOT_AHEAD: usize = 4;

struct SnapshotRun {
    /// Batches of rows from the reader task ([`SnapshotReader`]), in table and key order.
    chunks: tokio::sync::mpsc::Receiver<Result<SnapshotBatch, MysqlError>>,
    /// Aborted when the run is dropped (shutdown): the reader stops at its next batch anyway,
    /// this also stops a query in flight.
    _reader: AbortOnDrop,
    progress: SnapshotProgress,
    /// Rows read of the current table, and when progress was last logged.
    rows_done: u64,
    logged: Instant,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the snapshot reader hands to the source.
enum SnapshotBatch {
    /// Rows of one table (`op: "r"` events, ready to deliver), in key order.
    Chunk {
        /// `db.table`.
        coll: String,
        estimated_rows: u64,
        rows: Vec<Change>,
        /// The last key read; `None` for a table without a primary key.
        last_key: Option<Vec<Json>>,
        /// The table is read to its end.
        finished: bool,
    },
    /// Every table is read and the snapshot's transaction committed.
    Done,
}

/// Reads the snapshot's chunks on its own task, so that the next chunk is read and decoded
/// while the current one is encoded and produced (two cores instead of one), at most
/// [`SNAPSHOT_AHEAD`] batches ahead. Progress is the source's: what the reader read ahead is
/// read again after a crash.
struct SnapshotReader {
    /// Inside the snapshot's transaction.
    conn: Conn,
    tables: VecDeque<TableDef>,
    /// The table being read when the snapshot was resumed, and its last key read.
    resume: Option<(String, Vec<Json>)>,
    chunk: usize,
    rows: SnapshotRows,
}

/// What turns a snapshot chunk's rows into events.
struct SnapshotRows {
    charsets: HashMap<u16, String>,
    name: Arc<str>,
    /// The snapshot's binlog coordinates, in every row's `source`.
    file: Arc<str>,
    pos: u64,
}

/// Redact the password of a URL for messages.
pub fn redact(url: &str) -> String {
    match Regex::new(r"^([a-z]+://[^:/@]*):[^@]*@") {
        Ok(re) => re.replace(url, "$1:***@").into_owned(),
        Err(_) => "<url>".into(),
    }
}

fn opts(url: &str) -> Result<Opts, MysqlError> {
    let normalized = url
        .strip_prefix("mariadb://")
        .map_or_else(|| url.to_string(), |rest| format!("mysql://{rest}"));
    Opts::from_url(&normalized).map_err(|e| MysqlError::Url {
        url: redact(url),
        reason: e.to_string(),
    })
}

/// Connect, retrying with backoff while the server is unreachable (logged); refused
/// credentials and other server errors are returned at once.
async fn connect(url: &str) -> Result<Conn, MysqlError> {
    let opts = opts(url)?;
    let mut delay = Duration::from_millis(200);
    let mut attempts = 0u32;
    loop {
        match Conn::new(opts.clone()).await {
            Ok(c) => return Ok(c),
            Err(e @ (mysql_async::Error::Io(_) | mysql_async::Error::Driver(_)))
                if attempts < 8 =>
            {
                attempts += 1;
                tracing::warn!(url = %redact(url), error = %e, retry_in_ms = delay.as_millis() as u64, "source unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(source) => {
                return Err(MysqlError::Connect {
                    url: redact(url),
                    source,
                })
            }
        }
    }
}

/// The MariaDB/MySQL source.
pub struct MysqlSource {
    cfg: MysqlConfig,
    name: Arc<str>,
    include: Vec<Regex>,
    exclude: Vec<Regex>,
    /// Queries (`information_schema`) beside the binlog connection.
    meta: Conn,
    mariadb: bool,
    charsets: HashMap<u16, String>,
    /// Table definitions as of the stream position, from the schema history and DDL.
    schemas: HashMap<(String, String), SchemaChange>,
    /// Per table id: what its TABLE_MAP says. The server repeats the TABLE_MAP before every
    /// transaction's rows; an identical one reuses it.
    shapes: HashMap<u64, TableShape>,
    stream: Option<BinlogStream>,
    pending: VecDeque<Change>,
    /// Committed position (end of the last whole transaction or statement).
    at: BinlogPosition,
    /// Position after the last event read.
    next_pos: u64,
    snapshot: Option<SnapshotRun>,
    /// The open transaction's id (its GTID where there is one).
    in_tx: Option<Arc<str>>,
    /// `at.gtid`, shared by the events of its transaction.
    gtid: Option<Arc<str>>,
    /// `at.file`, shared by the events read from it.
    file: Arc<str>,
    /// A commit was passed without naming its position (see `commit`): the next pause of the
    /// stream names it.
    unnamed_commit: bool,
    /// When a commit's position was last named.
    named_at: Instant,
    tx_ts_ms: i64,
    tx_counts: BTreeMap<String, u64>,
    standalone: bool,
    last_heartbeat: Instant,
    /// `binlog_checksum` is not NONE.
    checksums: bool,
    /// `(db, table)` of the signal table.
    signal: Option<(String, String)>,
    /// The incremental snapshot's chunk between its watermarks, and its connection.
    window: Option<ChunkWindow>,
    chunk_conn: Option<Conn>,
    watermarks: u64,
}

impl MysqlSource {
    /// Connect, check the server settings, and pick the start: the stored position, a
    /// snapshot, or the binlog's current end.
    pub async fn open(
        cfg: MysqlConfig,
        pipeline: &PipelineConfig,
        state: &StoredState,
    ) -> Result<Self, MysqlError> {
        let mut meta = connect(&cfg.url).await?;
        let version: String = meta
            .query_first("SELECT VERSION()")
            .await
            .map_err(q("SELECT VERSION()"))?
            .unwrap_or_default();
        let mariadb = version.contains("MariaDB");
        check_settings(&mut meta).await?;
        let checksum: Option<String> = meta
            .query_first("SELECT @@GLOBAL.binlog_checksum")
            .await
            .map_err(q("@@binlog_checksum"))?;
        let checksums = checksum.is_some_and(|c| !c.eq_ignore_ascii_case("NONE"));
        let charsets: Vec<(Option<u16>, Option<String>)> = meta
            .query("SELECT ID, CHARACTER_SET_NAME FROM information_schema.COLLATIONS")
            .await
            .map_err(q("information_schema.COLLATIONS"))?;
        let logs: Vec<(String, u64)> = meta
            .query("SHOW BINARY LOGS")
            .await
            .map_err(q("SHOW BINARY LOGS"))?
            .into_iter()
            .map(|row: mysql_async::Row| {
                let name: String = row.get(0).unwrap_or_default();
                let size: u64 = row.get(1).unwrap_or_default();
                (name, size)
            })
            .collect();
        let stored: Option<BinlogPosition> = match state.position() {
            Some(p) => Some(
                serde_json::from_value(p.0.clone())
                    .map_err(|e| MysqlError::BadPosition(format!("{}: {e}", p.0)))?,
            ),
            None => None,
        };
        let mut source = MysqlSource {
            name: Arc::from(pipeline.name.as_str()),
            include: pipeline.include.clone(),
            exclude: pipeline.exclude.clone(),
            meta,
            mariadb,
            charsets: charsets
                .into_iter()
                .filter_map(|(id, name)| Some((id?, name?)))
                .collect(),
            schemas: HashMap::new(),
            shapes: HashMap::new(),
            stream: None,
            pending: VecDeque::new(),
            at: BinlogPosition::default(),
            next_pos: 0,
            snapshot: None,
            in_tx: None,
            gtid: None,
            file: Arc::from(""),
            unnamed_commit: false,
            named_at: Instant::now(),
            tx_ts_ms: 0,
            tx_counts: BTreeMap::new(),
            standalone: false,
            last_heartbeat: Instant::now(),
            checksums,
            signal: cfg
                .signal_table
                .as_deref()
                .and_then(|t| t.split_once('.'))
                .map(|(d, t)| (d.to_string(), t.to_string())),
            window: None,
            chunk_conn: None,
            watermarks: 0,
            cfg,
        };
        if let Some((db, table)) = &source.signal {
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS `{}`.`{}` {SIGNAL_TABLE_DDL}",
                db.replace('`', "``"),
                table.replace('`', "``")
            );
            source
                .meta
                .query_drop(ddl.as_str())
                .await
                .map_err(q(format!("creating the signal table {db}.{table}")))?;
        }
        let available = |p: &BinlogPosition| logs.iter().any(|(name, _)| *name == p.file);
        match stored {
            Some(p) if available(&p) => {
                tracing::info!(position = %p.show(), "resuming from the stored position");
                for s in &state.schema_history {
                    let at: Option<BinlogPosition> =
                        serde_json::from_value(s.position.0.clone()).ok();
                    if at.is_some_and(|at| at.at_or_before(&p)) {
                        source
                            .schemas
                            .insert((s.db.clone(), s.table.clone()), s.clone());
                    }
                }
                source.at = p.clone();
                if let Some(progress) = p.snapshot.clone() {
                    source.start_snapshot(Some(progress)).await?;
                }
            }
            Some(p) => {
                let oldest = logs
                    .first()
                    .map_or_else(|| "none".to_string(), |(f, _)| format!("{f}:4"));
                if source.cfg.snapshot != SnapshotMode::WhenNeeded {
                    return Err(MysqlError::Purged {
                        stored: p.show(),
                        oldest,
                    });
                }
                tracing::warn!(stored = %p.show(), %oldest, "stored position purged; snapshot anew (when_needed)");
                source.start_snapshot(None).await?;
            }
            None if source.cfg.snapshot == SnapshotMode::Never => {
                source.at = master_position(&mut source.meta).await?;
                tracing::info!(position = %source.at.show(), "no stored position; streaming from the binlog's end");
            }
            None => source.start_snapshot(None).await?,
        }
        Ok(source)
    }

    fn captures(&self, db: &str, table: &str) -> bool {
        if self
            .signal
            .as_ref()
            .is_some_and(|(d, t)| d == db && t == table)
        {
            return false;
        }
        let coll = format!("{db}.{table}");
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(&coll)))
            && !self.exclude.iter().any(|r| r.is_match(&coll))
    }

    async fn start_snapshot(&mut self, resume: Option<SnapshotProgress>) -> Result<(), MysqlError> {
        let mut conn = connect(&self.cfg.url).await?;
        conn.query_drop("SET SESSION time_zone = '+00:00'")
            .await
            .map_err(q("SET time_zone"))?;
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .map_err(q("isolation level"))?;
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .map_err(q("START TRANSACTION WITH CONSISTENT SNAPSHOT"))?;
        if resume.is_none() {
            if !self.mariadb {
                return Err(MysqlError::Snapshot(
                    "a lock-free consistent snapshot needs MariaDB's binlog_snapshot_file/position; on MySQL start with snapshot = \"never\"".into(),
                ));
            }
            let status: Vec<(String, String)> = conn
                .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
                .await
                .map_err(q("SHOW STATUS LIKE 'binlog_snapshot_%'"))?;
            let get = |k: &str| {
                status
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            let file = get("binlog_snapshot_file").unwrap_or_default();
            let pos = get("binlog_snapshot_position")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if file.is_empty() {
                return Err(MysqlError::Snapshot(
                    "the server reports no binlog_snapshot_file; is log_bin on?".into(),
                ));
            }
            self.at = BinlogPosition {
                file,
                pos,
                gtid: None,
                gtid_state: BTreeMap::new(),
                snapshot: None,
                incremental: None,
            };
        }
        let progress = resume.unwrap_or_default();
        let rows: Vec<(String, String, Option<u64>)> = conn
            .query(
                "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_ROWS FROM information_schema.TABLES \
                 WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN \
                 ('mysql','information_schema','performance_schema','sys') \
                 ORDER BY TABLE_SCHEMA, TABLE_NAME",
            )
            .await
            .map_err(q("information_schema.TABLES"))?;
        let mut tables = VecDeque::new();
        for (db, table, estimate) in rows {
            let coll = format!("{db}.{table}");
            let wanted = progress
                .only
                .as_ref()
                .is_none_or(|only| only.contains(&coll));
            if !self.captures(&db, &table) || !wanted || progress.done.contains(&coll) {
                continue;
            }
            let primary_key = primary_key(&mut conn, &db, &table).await?;
            tables.push_back(TableDef {
                db,
                table,
                primary_key,
                estimated_rows: estimate.unwrap_or(0),
            });
        }
        tracing::info!(tables = tables.len(), position = %self.at.show(), "snapshot starting");
        let reader = SnapshotReader {
            conn,
            tables,
            resume: progress.table.clone().zip(progress.last_key.clone()),
            chunk: self.cfg.snapshot_chunk.max(1),
            rows: SnapshotRows {
                charsets: self.charsets.clone(),
                name: self.name.clone(),
                file: Arc::from(self.at.file.as_str()),
                pos: self.at.pos,
            },
        };
        let (tx, chunks) = tokio::sync::mpsc::channel(SNAPSHOT_AHEAD);
        self.snapshot = Some(SnapshotRun {
            chunks,
            _reader: AbortOnDrop(tokio::spawn(reader.run(tx))),
            progress,
            rows_done: 0,
            logged: Instant::now(),
        });
        Ok(())
    }

    /// The next batch of the snapshot (from the reader) into `pending`, or its end.
    async fn snapshot_step(&mut self) -> Result<(), MysqlError> {
        let Some(run) = self.snapshot.as_mut() else {
            return Ok(());
        };
        let batch = run.chunks.recv().await.unwrap_or_else(|| {
            Err(MysqlError::Snapshot(
                "the snapshot reader stopped without an error".into(),
            ))
        })?;
        let SnapshotBatch::Chunk {
            coll,
            estimated_rows,
            rows,
            last_key,
            finished,
        } = batch
        else {
            self.snapshot = None;
            self.at.snapshot = None;
            tracing::info!(position = %self.at.show(), "snapshot done; streaming");
            self.pending.push_back(Change::Heartbeat {
                resume: self.at.position(),
                ts_ms: now_ms(),
            });
            return Ok(());
        };
        if run.progress.table.as_deref() != Some(coll.as_str()) {
            run.progress.table = Some(coll.clone());
            run.progress.last_key = None;
            run.rows_done = 0;
        }
        if last_key.is_some() {
            run.progress.last_key = last_key;
        }
        run.rows_done += rows.len() as u64;
        self.pending.extend(rows);
        crate::progress::report(&self.name, &coll, run.rows_done, estimated_rows, finished);
        if finished || run.logged.elapsed() >= Duration::from_secs(2) {
            tracing::info!(table = %coll, rows_done = run.rows_done, rows_estimated = estimated_rows, finished, "snapshot progress");
            run.logged = Instant::now();
        }
        if finished {
            run.progress.done.push(coll);
            run.progress.table = None;
            run.progress.last_key = None;
        }
        let mut at = self.at.clone();
        at.snapshot = Some(run.progress.clone());
        self.pending.push_back(Change::Heartbeat {
            resume: at.position(),
            ts_ms: now_ms(),
        });
        Ok(())
    }

    async fn open_stream(&mut self) -> Result<(), MysqlError> {
        let mut conn = connect(&self.cfg.url).await?;
        if self.mariadb {
            // MariaDB sends its own GTID events only to a replica that declares capability 4.
            conn.query_drop("SET @mariadb_slave_capability=4")
                .await
                .map_err(q("SET @mariadb_slave_capability"))?;
        }
        let period_ns = self.cfg.heartbeat.as_nanos().max(1_000_000);
        conn.query_drop(format!("SET @master_heartbeat_period={period_ns}"))
            .await
            .map_err(q("SET @master_heartbeat_period"))?;
        let by_gtid = self.mariadb && self.cfg.gtid_resume && !self.at.gtid_state.is_empty();
        let (file, pos) = if by_gtid {
            let state: Vec<&str> = self.at.gtid_state.values().map(String::as_str).collect();
            let state = state.join(",");
            conn.query_drop(format!("SET @slave_connect_state='{state}'"))
                .await
                .map_err(q("SET @slave_connect_state"))?;
            tracing::info!(gtid_state = %state, "resuming by GTID");
            // With a connect state the server ignores the coordinates.
            (Vec::new(), 4)
        } else {
            (self.at.file.as_bytes().to_vec(), self.at.pos)
        };
        let request = BinlogStreamRequest::new(self.cfg.server_id)
            .with_filename(&file)
            .with_pos(pos);
        let stream =
            conn.get_binlog_stream(request)
                .await
                .map_err(|source| MysqlError::Stream {
                    position: self.at.show(),
                    source,
                })?;
        self.next_pos = self.at.pos;
        tracing::info!(position = %self.at.show(), "binlog stream open");
        self.stream = Some(stream);
        Ok(())
    }

    fn here(&self) -> String {
        self.at_pos(self.next_pos)
    }

    fn at_pos(&self, pos: u64) -> String {
        format!("{}:{pos}", self.at.file)
    }

    /// Read one binlog event and turn it into zero or more changes.
    async fn stream_step(&mut self) -> Result<(), MysqlError> {
        if self.stream.is_none() {
            // Boxed, as the other rare steps below: the future of every event stays small.
            Box::pin(self.open_stream()).await?;
        }
        let period = self.cfg.heartbeat;
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        // Between transactions only: inside one, `at` already carries its GTID.
        let between = self.in_tx.is_none() && !self.standalone;
        use futures_util::FutureExt as _;
        let next = if self.unnamed_commit && between {
            // A pause of the stream (no event buffered) names the last commit's position.
            match stream.next().now_or_never() {
                Some(next) => next,
                None => {
                    self.unnamed_commit = false;
                    self.named_at = Instant::now();
                    self.pending.push_back(Change::Heartbeat {
                        resume: self.at.position(),
                        ts_ms: self.tx_ts_ms,
                    });
                    return Ok(());
                }
            }
        } else if let Some(next) = stream.next().now_or_never() {
            // An event already buffered: no timer to arm (and disarm) for it.
            next
        } else {
            match tokio::time::timeout(period * 3, stream.next()).await {
                Err(_) => {
                    // The server sent not even a heartbeat: keep lag measurable all the same.
                    if self.in_tx.is_none() {
                        self.pending.push_back(Change::Heartbeat {
                            resume: self.at.position(),
                            ts_ms: now_ms(),
                        });
                    }
                    return Ok(());
                }
                Ok(next) => next,
            }
        };
        let event = match next {
            None => {
                return Err(MysqlError::Unsupported {
                    position: self.here(),
                    reason: "the server closed the binlog stream".into(),
                })
            }
            Some(Err(source)) => {
                let position = self.here();
                if let mysql_async::Error::Server(ref e) = source {
                    if e.code == 1236 {
                        return Err(MysqlError::Purged {
                            stored: position,
                            oldest: e.message.clone(),
                        });
                    }
                }
                return Err(MysqlError::Stream { position, source });
            }
            Some(Ok(event)) => event,
        };
        let header = event.header();
        let raw_type = header.event_type_raw();
        let event_start =
            u64::from(header.log_pos()).saturating_sub(u64::from(header.event_size()));
        let end = u64::from(header.log_pos());
        // Formatted only when an error needs it: this runs for every binlog event.
        let read_at = self.next_pos;
        match raw_type {
            mariadb::GTID => {
                let gtid =
                    mariadb::parse_gtid(event.data(), header.server_id()).ok_or_else(|| {
                        MysqlError::Unsupported {
                            position: self.at_pos(read_at),
                            reason: "short MariaDB GTID event".into(),
                        }
                    })?;
                let text = gtid.text();
                self.gtid = Some(Arc::from(text.as_str()));
                match self.at.gtid_state.get_mut(&gtid.domain) {
                    Some(last) => last.clone_from(&text),
                    None => {
                        self.at.gtid_state.insert(gtid.domain, text.clone());
                    }
                }
                self.at.gtid = Some(text);
                self.tx_ts_ms = i64::from(header.timestamp()) * 1000;
                if gtid.standalone {
                    self.standalone = true;
                } else {
                    self.begin(self.gtid.clone());
                }
            }
            mariadb::ANNOTATE_ROWS | mariadb::BINLOG_CHECKPOINT | mariadb::GTID_LIST => {}
            t if (mariadb::FIRST_UNSUPPORTED..=mariadb::LAST_UNSUPPORTED).contains(&t) => {
                return Err(MysqlError::Unsupported {
                    position: self.at_pos(read_at),
                    reason: format!("MariaDB event type {t} (encrypted or compressed binlog); set log_bin_compress=OFF and encrypt_binlog=OFF"),
                });
            }
            t if t == EventType::HEARTBEAT_EVENT as u8 => {
                if self.in_tx.is_none() && self.snapshot.is_none() {
                    // An idle server's heartbeat carries its position in the current file.
                    // After a GTID resume the artificial rotate left `pos` at 4, and without
                    // this it would stay there until the next commit.
                    if end > self.at.pos {
                        self.at.pos = end;
                        self.next_pos = end;
                    }
                    self.pending.push_back(Change::Heartbeat {
                        resume: self.at.position(),
                        ts_ms: now_ms(),
                    });
                    self.last_heartbeat = Instant::now();
                }
                return Ok(());
            }
            _ => {
                let data = event.read_data().map_err(|e| MysqlError::Unsupported {
                    position: self.at_pos(read_at),
                    reason: e.to_string(),
                })?;
                match data {
                    Some(EventData::RotateEvent(r)) => {
                        let mut name = r.name_raw().to_vec();
                        // The first (artificial) rotate comes before the format description
                        // tells the reader about checksums, so its CRC32 trails the name.
                        if end == 0 && self.checksums && name.len() > 4 {
                            name.truncate(name.len() - 4);
                        }
                        self.at.file = String::from_utf8_lossy(&name).into_owned();
                        self.file = Arc::from(self.at.file.as_str());
                        self.at.pos = r.position();
                        self.next_pos = r.position();
                        return Ok(());
                    }
                    Some(EventData::GtidEvent(g)) => {
                        let sid = g.sid();
                        let uuid = format!(
                            "{}-{}-{}-{}-{}",
                            hex::encode(&sid[0..4]),
                            hex::encode(&sid[4..6]),
                            hex::encode(&sid[6..8]),
                            hex::encode(&sid[8..10]),
                            hex::encode(&sid[10..16])
                        );
                        let text = format!("{uuid}:{}", g.gno());
                        self.gtid = Some(Arc::from(text.as_str()));
                        self.at.gtid = Some(text);
                        self.tx_ts_ms = i64::from(header.timestamp()) * 1000;
                    }
                    Some(EventData::QueryEvent(qe)) => {
                        let statement = qe.query().into_owned();
                        let schema = qe.schema().into_owned();
                        let trimmed = statement.trim();
                        if trimmed.eq_ignore_ascii_case("BEGIN") {
                            if self.in_tx.is_none() {
                                self.tx_ts_ms = i64::from(header.timestamp()) * 1000;
                                let id = self.gtid.clone().unwrap_or_else(|| {
                                    Arc::from(format!("{}:{}", self.at.file, event_start))
                                });
                                self.begin(Some(id));
                            }
                        } else if trimmed.eq_ignore_ascii_case("COMMIT") {
                            self.next_pos = end;
                            self.commit();
                            return Ok(());
                        } else {
                            self.next_pos = end;
                            if let Some((db, table)) = truncate_target(&schema, &statement) {
                                self.truncate(db, table, header.server_id(), event_start);
                            } else {
                                Box::pin(self.ddl(&schema, &statement, end)).await?;
                            }
                            if self.in_tx.is_none() {
                                self.standalone = false;
                                self.at.pos = end;
                                self.pending.push_back(Change::Heartbeat {
                                    resume: self.at.position(),
                                    ts_ms: i64::from(header.timestamp()) * 1000,
                                });
                            }
                            return Ok(());
                        }
                    }
                    Some(EventData::TableMapEvent(tme)) => {
                        let body = event.data();
                        let known = self
                            .shapes
                            .get(&tme.table_id())
                            .is_some_and(|seen| seen.body.as_slice() == body);
                        if !known {
                            let columns = Box::pin(self.table_shape(&tme)).await?;
                            let db = tme.database_name();
                            let table = tme.table_name();
                            let pk_flags = columns.iter().map(|c| c.primary_key).collect();
                            let shape = TableShape {
                                body: body.to_vec(),
                                columns,
                                coll: format!("{db}.{table}"),
                                captured: self.captures(&db, &table),
                                db: Arc::from(&*db),
                                table: Arc::from(&*table),
                                pk_flags,
                            };
                            self.shapes.insert(tme.table_id(), shape);
                        }
                    }
                    Some(EventData::RowsEvent(rows)) => {
                        self.rows(&rows, header.server_id(), event_start, read_at)?;
                    }
                    Some(EventData::XidEvent(_)) => {
                        self.next_pos = end;
                        self.commit();
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
        if end > 0 {
            self.next_pos = end;
        }
        Ok(())
    }

    fn begin(&mut self, tx_id: Option<Arc<str>>) {
        let tx_id = tx_id.unwrap_or_else(|| Arc::from(""));
        self.pending.push_back(Change::Begin {
            tx_id: tx_id.to_string(),
            ts_ms: self.tx_ts_ms,
        });
        self.in_tx = Some(tx_id);
        self.tx_counts.clear();
    }

    /// The transaction is committed. Its position is named (a `Position` built) at most every
    /// few milliseconds while the binlog streams in: the pipeline stores one every 200 ms,
    /// and building one for every small transaction costs more than its row events. The
    /// stream's next pause names the last one (see `stream_step`).
    fn commit(&mut self) {
        self.at.pos = self.next_pos;
        let tx_id = match self.in_tx.take() {
            Some(id) => id.to_string(),
            None => self.at.gtid.clone().unwrap_or_default(),
        };
        let resume = if self.named_at.elapsed() >= NAME_COMMITS_EVERY {
            self.named_at = Instant::now();
            self.unnamed_commit = false;
            Some(self.at.position())
        } else {
            self.unnamed_commit = true;
            None
        };
        self.pending.push_back(Change::Commit {
            tx_id,
            counts: std::mem::take(&mut self.tx_counts),
            resume,
        });
    }

    async fn table_shape(
        &mut self,
        tme: &TableMapEvent<'_>,
    ) -> Result<Vec<ColumnShape>, MysqlError> {
        use mysql_async::binlog::events::OptionalMetadataField as F;
        let n = usize::try_from(tme.columns_count()).unwrap_or(0);
        let mut shape: Vec<ColumnShape> = (0..n)
            .map(|i| {
                let kind = tme.get_column_type(i).ok().flatten();
                let meta = tme.get_column_metadata(i).unwrap_or(&[]);
                let precision = match kind {
                    Some(ColumnType::MYSQL_TYPE_BIT) => {
                        u32::from(meta.get(1).copied().unwrap_or(0)) * 8
                            + u32::from(meta.first().copied().unwrap_or(0))
                    }
                    Some(
                        ColumnType::MYSQL_TYPE_TIME2
                        | ColumnType::MYSQL_TYPE_DATETIME2
                        | ColumnType::MYSQL_TYPE_TIMESTAMP2,
                    ) => u32::from(meta.first().copied().unwrap_or(0)),
                    _ => 0,
                };
                ColumnShape {
                    name: format!("@{i}"),
                    kind,
                    precision,
                    meta: meta.to_vec(),
                    ..ColumnShape::default()
                }
            })
            .collect();
        // Signedness, charsets and the primary key once per TABLE_MAP, the way mysql_common
        // assigns them to a row's columns (each list covers only the columns of its kind).
        if let Ok(extract) = OptionalMetaExtractor::new(tme.iter_optional_meta()) {
            let mut signedness = extract.iter_signedness();
            let mut charsets = extract.iter_charset();
            let mut enum_set_charsets = extract.iter_enum_and_set_charset();
            let mut keys = extract.iter_primary_key();
            for (i, c) in shape.iter_mut().enumerate() {
                let Some(kind) = c.kind else { continue };
                if kind.is_numeric_type() {
                    c.unsigned = signedness.next().unwrap_or(false);
                }
                if kind.is_character_type() {
                    c.charset = charsets.next().and_then(Result::ok).unwrap_or(0);
                } else if kind.is_enum_or_set_type() {
                    c.charset = enum_set_charsets.next().and_then(Result::ok).unwrap_or(0);
                }
                c.primary_key = keys
                    .next_if(|k| k.as_ref().ok() == Some(&(i as u64)))
                    .is_some();
            }
        }
        let mut names = Vec::new();
        let mut enums = Vec::new();
        let mut sets = Vec::new();
        for field in tme.iter_optional_meta() {
            let Ok(field) = field else { continue };
            match field {
                F::ColumnName(cn) => {
                    for name in cn.iter_names().flatten() {
                        names.push(name.name().into_owned());
                    }
                }
                F::EnumStrValue(v) => {
                    for values in v.iter_values().flatten() {
                        enums.push(
                            values
                                .values()
                                .iter()
                                .map(|l| l.value().into_owned())
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                F::SetStrValue(v) => {
                    for values in v.iter_values().flatten() {
                        sets.push(
                            values
                                .values()
                                .iter()
                                .map(|l| l.value().into_owned())
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                _ => {}
            }
        }
        let (mut enums, mut sets) = (enums.into_iter(), sets.into_iter());
        for c in &mut shape {
            match c.kind {
                Some(ColumnType::MYSQL_TYPE_ENUM) => {
                    c.enum_labels = enums.next().unwrap_or_default()
                }
                Some(ColumnType::MYSQL_TYPE_SET) => c.set_labels = sets.next().unwrap_or_default(),
                _ => {}
            }
        }
        if names.len() == n {
            for (c, name) in shape.iter_mut().zip(names) {
                c.name = name;
            }
        } else {
            // Minimal metadata: names from the definition as of this position.
            let db = tme.database_name().into_owned();
            let table = tme.table_name().into_owned();
            let key = (db.clone(), table.clone());
            if !self.schemas.contains_key(&key) {
                let def =
                    read_definition(&mut self.meta, &db, &table, None, self.at.position()).await?;
                self.pending.push_back(Change::Schema(def.clone()));
                self.schemas.insert(key.clone(), def);
            }
            let columns = self
                .schemas
                .get(&key)
                .and_then(|s| s.columns.clone())
                .unwrap_or_default();
            if columns.len() != n {
                return Err(MysqlError::Unsupported {
                    position: self.here(),
                    reason: format!("{db}.{table} has {n} columns in the binlog but {} in its definition, and the server logs no column names; set binlog_row_metadata=FULL", columns.len()),
                });
            }
            for (c, col) in shape.iter_mut().zip(columns) {
                c.name = col.name;
            }
        }
        for c in &mut shape {
            c.name_arc = Arc::from(c.name.as_str());
        }
        Ok(shape)
    }

    fn rows(
        &mut self,
        rows: &RowsEventData<'_>,
        server_id: u32,
        event_start: u64,
        read_at: u64,
    ) -> Result<(), MysqlError> {
        if *self.file != *self.at.file {
            self.file = Arc::from(self.at.file.as_str());
        }
        let Some(shape) = self.shapes.get(&rows.table_id()) else {
            return Err(MysqlError::Unsupported {
                position: self.at_pos(read_at),
                reason: "rows event without its TABLE_MAP".into(),
            });
        };
        let is_signal = self
            .signal
            .as_ref()
            .is_some_and(|(d, t)| **d == *shape.db && **t == *shape.table);
        if !shape.captured && !is_signal {
            return Ok(());
        }
        let op = match rows {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => Op::Create,
            RowsEventData::UpdateRowsEventV1(_)
            | RowsEventData::UpdateRowsEvent(_)
            | RowsEventData::PartialUpdateRowsEvent(_) => Op::Update,
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => Op::Delete,
        };
        // Key columns by name from the definition, when the TABLE_MAP names none.
        let schema_pk = if shape.pk_flags.iter().any(|f| *f) {
            None
        } else {
            self.schemas
                .get(&(shape.db.to_string(), shape.table.to_string()))
                .map(|s| s.primary_key.clone())
        };
        let position = || format!("{}:{read_at}", self.at.file);
        let coll = &shape.coll;
        let decode_err = |error| MysqlError::Decode {
            table: coll.clone(),
            position: position(),
            error,
        };
        let columns = &shape.columns;
        // The event's column bitmaps and row bytes, read with the shape worked out once per
        // TABLE_MAP. (mysql_common's row iterator re-parses the TABLE_MAP's optional metadata
        // and builds a named `Column` for every column of every row: most of a row's cost.)
        // A bitmap is only checked to cover every column (a FULL row image).
        macro_rules! bits {
            ($b:expr) => {
                $b.len() == columns.len() && $b.iter().by_vals().all(|b| b)
            };
        }
        let (before_cols, after_cols, data, partial) = match rows {
            RowsEventData::WriteRowsEventV1(e) => (
                None,
                Some(bits!(e.columns_after_image())),
                e.rows_data(),
                false,
            ),
            RowsEventData::WriteRowsEvent(e) => (
                None,
                Some(bits!(e.columns_after_image())),
                e.rows_data(),
                false,
            ),
            RowsEventData::DeleteRowsEventV1(e) => (
                Some(bits!(e.columns_before_image())),
                None,
                e.rows_data(),
                false,
            ),
            RowsEventData::DeleteRowsEvent(e) => (
                Some(bits!(e.columns_before_image())),
                None,
                e.rows_data(),
                false,
            ),
            RowsEventData::UpdateRowsEventV1(e) => (
                Some(bits!(e.columns_before_image())),
                Some(bits!(e.columns_after_image())),
                e.rows_data(),
                false,
            ),
            RowsEventData::UpdateRowsEvent(e) => (
                Some(bits!(e.columns_before_image())),
                Some(bits!(e.columns_after_image())),
                e.rows_data(),
                false,
            ),
            RowsEventData::PartialUpdateRowsEvent(e) => (
                Some(bits!(e.columns_before_image())),
                Some(bits!(e.columns_after_image())),
                e.rows_data(),
                true,
            ),
        };
        let mut buf = ParseBuf(data);
        let mut index = 0usize;
        let key_len = shape.pk_flags.iter().filter(|f| **f).count();
        let mut signals = Vec::new();
        while !buf.is_empty() {
            let to_error = |e: ImageError| match e {
                ImageError::Io(e) => MysqlError::Unsupported {
                    position: position(),
                    reason: e.to_string(),
                },
                ImageError::NotFull => MysqlError::ServerSetting {
                    variable: "binlog_row_image",
                    found: "not FULL for this event".into(),
                    want: "FULL",
                },
                ImageError::Decode(error) => decode_err(error),
            };
            let before = match before_cols {
                Some(full) => Some(
                    read_image(&mut buf, columns, full, false, &self.charsets).map_err(to_error)?,
                ),
                None => None,
            };
            let after = match after_cols {
                Some(full) => Some(
                    read_image(&mut buf, columns, full, partial, &self.charsets)
                        .map_err(to_error)?,
                ),
                None => None,
            };
            let row_index = index;
            index += 1;
            let key_src = match (&after, &before) {
                (_, Some(b)) if op == Op::Delete => b,
                (Some(a), _) => a,
                (None, Some(b)) => b,
                (None, None) => continue,
            };
            let key_of = |image: &Row| -> Row {
                let mut key = Vec::with_capacity(key_len);
                match &schema_pk {
                    None => {
                        for (c, _) in image
                            .columns
                            .iter()
                            .zip(&shape.pk_flags)
                            .filter(|(_, f)| **f)
                        {
                            key.push(c.clone());
                        }
                    }
                    Some(pk) => {
                        for c in &image.columns {
                            if pk.iter().any(|k| k.as_str() == &*c.0) {
                                key.push(c.clone());
                            }
                        }
                    }
                }
                Row { columns: key }
            };
            let key = key_of(key_src);
            // An update that changes the primary key: Debezium's delete of the old key,
            // then a create of the new one, so per-key consumers stay right.
            let before_key: Option<Row> = match (&before, op) {
                (Some(b), Op::Update) => Some(key_of(b)),
                _ => None,
            };
            let source = SourceInfo {
                connector: "mysql",
                name: self.name.clone(),
                db: shape.db.clone(),
                table: shape.table.clone(),
                ts_ms: self.tx_ts_ms,
                server_id: Some(server_id),
                file: Some(self.file.clone()),
                pos: Some(event_start),
                row: u32::try_from(row_index).ok(),
                gtid: self.gtid.clone(),
                tx_id: self.in_tx.clone(),
                ..SourceInfo::default()
            };
            if is_signal {
                if let (Op::Create, Some(after)) = (op, after) {
                    signals.push(after);
                }
                continue;
            }
            // Inside an incremental snapshot's window the stream wins over the chunk.
            if let Some(w) = self.window.as_mut().filter(|w| w.open && w.table == *coll) {
                for k in [Some(&key), before_key.as_ref()].into_iter().flatten() {
                    if let Some(&i) = serde_json::to_string(k).ok().and_then(|t| w.by_key.get(&t)) {
                        w.rows[i] = None;
                    }
                }
            }
            let mut emit = |event: ChangeEvent| {
                match self.tx_counts.get_mut(coll.as_str()) {
                    Some(n) => *n += 1,
                    None => {
                        self.tx_counts.insert(coll.clone(), 1);
                    }
                }
                self.pending.push_back(Change::Row(Box::new(event)));
            };
            if op == Op::Update && !key.columns.is_empty() && before_key.as_ref() != Some(&key) {
                emit(ChangeEvent {
                    op: Op::Delete,
                    before,
                    after: None,
                    key: before_key.unwrap_or_default(),
                    source: source.clone(),
                    transaction: None,
                });
                emit(ChangeEvent {
                    op: Op::Create,
                    before: None,
                    after,
                    key,
                    source,
                    transaction: None,
                });
            } else {
                emit(ChangeEvent {
                    op,
                    before,
                    after,
                    key,
                    source,
                    transaction: None,
                });
            }
        }
        for signal in signals {
            self.on_signal(&signal);
        }
        Ok(())
    }

    /// A row inserted into the signal table: a request (`execute-snapshot`) or one of this
    /// connector's chunk watermarks coming back through the binlog.
    fn on_signal(&mut self, row: &Row) {
        let text = |name: &str| match row.get(name) {
            Some(Value::Text(t)) => Some(t.clone()),
            Some(Value::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        let (Some(id), Some(kind)) = (text("id"), text("type")) else {
            tracing::warn!("a signal row without id or type: ignored");
            return;
        };
        match kind.as_str() {
            "execute-snapshot" => {
                let data: Json = text("data")
                    .and_then(|d| serde_json::from_str(&d).ok())
                    .unwrap_or(Json::Null);
                let wanted: Vec<String> = data["data-collections"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                if wanted.is_empty() {
                    tracing::warn!(signal = %id, "execute-snapshot without data-collections: ignored");
                    return;
                }
                let mut accepted = Vec::new();
                for table in wanted {
                    let captured = table
                        .split_once('.')
                        .is_some_and(|(d, t)| self.captures(d, t));
                    if captured {
                        accepted.push(table);
                    } else {
                        tracing::warn!(signal = %id, %table, "incremental snapshot of a table the connector does not capture: ignored");
                    }
                }
                let progress = self
                    .at
                    .incremental
                    .get_or_insert_with(IncrementalProgress::default);
                for table in accepted {
                    if !progress.tables.contains(&table) {
                        tracing::info!(signal = %id, %table, "incremental snapshot requested");
                        progress.tables.push(table);
                    }
                }
                if progress.tables.is_empty() {
                    self.at.incremental = None;
                }
            }
            "snapshot-window-open" => {
                if let Some(w) = self.window.as_mut().filter(|w| w.low == id) {
                    w.open = true;
                }
            }
            "snapshot-window-close" => {
                if self.window.as_ref().is_some_and(|w| w.high == id && w.open) {
                    self.close_window();
                }
            }
            other => tracing::warn!(signal = %id, kind = other, "unknown signal type: ignored"),
        }
    }

    /// The high watermark came back: what is left of the chunk is emitted as reads, and the
    /// progress (in `at`, so in the next stored position) moves past the chunk.
    fn close_window(&mut self) {
        let Some(w) = self.window.take() else { return };
        let Some(progress) = self.at.incremental.as_mut() else {
            return;
        };
        let mut emitted = 0u64;
        for mut event in w.rows.into_iter().flatten() {
            event.source.ts_ms = now_ms();
            self.pending.push_back(Change::Row(Box::new(event)));
            emitted += 1;
        }
        progress.rows_done += emitted;
        progress.last_key = w.last_key;
        let table = w.table;
        let finished = w.last_chunk;
        crate::progress::report(
            &self.name,
            &table,
            progress.rows_done,
            progress.rows_estimated,
            finished,
        );
        if finished {
            tracing::info!(%table, rows = progress.rows_done, "incremental snapshot of the table done");
            progress.tables.retain(|t| *t != table);
            progress.last_key = None;
            progress.rows_done = 0;
            progress.rows_estimated = 0;
            if progress.tables.is_empty() {
                self.at.incremental = None;
            }
        }
    }

    /// The next chunk of the incremental snapshot: low watermark, the chunk's `SELECT`, high
    /// watermark (each committed on its own), then the stream takes it from there.
    async fn incremental_step(&mut self) -> Result<(), MysqlError> {
        let Some(progress) = self.at.incremental.clone() else {
            return Ok(());
        };
        let Some(coll) = progress.tables.first().cloned() else {
            self.at.incremental = None;
            return Ok(());
        };
        let Some((signal_db, signal_table)) = self.signal.clone() else {
            return Err(MysqlError::Snapshot(
                "an incremental snapshot is pending but the connector has no signal_table".into(),
            ));
        };
        let (db, table) = coll.split_once('.').unwrap_or(("", coll.as_str()));
        let (db, table) = (db.to_string(), table.to_string());
        if self.chunk_conn.is_none() {
            let mut conn = connect(&self.cfg.url).await?;
            conn.query_drop("SET SESSION time_zone = '+00:00'")
                .await
                .map_err(q("SET time_zone"))?;
            self.chunk_conn = Some(conn);
        }
        let primary_key = primary_key(&mut self.meta, &db, &table).await?;
        if primary_key.is_empty() {
            tracing::warn!(table = %coll, "incremental snapshot needs a primary key: table skipped");
            if let Some(p) = self.at.incremental.as_mut() {
                p.tables.retain(|t| *t != coll);
                p.last_key = None;
            }
            return Ok(());
        }
        if progress.last_key.is_none() {
            let estimate: Option<Option<u64>> = self
                .meta
                .exec_first(
                    "SELECT TABLE_ROWS FROM information_schema.TABLES \
                     WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                    (&db, &table),
                )
                .await
                .map_err(q(format!("row estimate of {coll}")))?;
            let rows_estimated = estimate.flatten().unwrap_or(0);
            if let Some(p) = self.at.incremental.as_mut() {
                p.rows_estimated = rows_estimated;
            }
            crate::progress::report(&self.name, &coll, 0, rows_estimated, false);
        }
        let Some(conn) = self.chunk_conn.as_mut() else {
            return Ok(());
        };
        let signal = format!(
            "`{}`.`{}`",
            signal_db.replace('`', "``"),
            signal_table.replace('`', "``")
        );
        let mut watermark = |kind: &str| {
            self.watermarks += 1;
            let id = format!("qanat-{}-{}-{}", self.name, now_ms(), self.watermarks);
            let data = serde_json::json!({ "table": coll, "kind": kind }).to_string();
            (id, data)
        };
        let (low, low_data) = watermark("low");
        let (high, high_data) = watermark("high");
        let insert = format!("INSERT INTO {signal} (id, type, data) VALUES (?, ?, ?)");
        conn.exec_drop(insert.as_str(), (&low, "snapshot-window-open", &low_data))
            .await
            .map_err(q(format!("writing the low watermark to {signal}")))?;
        let chunk = self.cfg.snapshot_chunk.max(1);
        let (sql, params) = chunk_query(
            &db,
            &table,
            &primary_key,
            progress.last_key.as_deref(),
            chunk,
        );
        let result: Vec<mysql_async::Row> = conn
            .exec(sql.as_str(), params)
            .await
            .map_err(q(format!("incremental snapshot of {coll}")))?;
        conn.exec_drop(
            insert.as_str(),
            (&high, "snapshot-window-close", &high_data),
        )
        .await
        .map_err(q(format!("writing the high watermark to {signal}")))?;
        let last_chunk = result.len() < chunk;
        let decoded = decode_chunk(result, &primary_key, &self.charsets, &coll)?;
        let last_key = decoded
            .last()
            .map(|(_, key)| key.columns.iter().map(|(_, v)| v.to_json()).collect());
        let db: Arc<str> = Arc::from(db.as_str());
        let table_name: Arc<str> = Arc::from(table.as_str());
        let mut rows = Vec::with_capacity(decoded.len());
        let mut by_key = HashMap::with_capacity(decoded.len());
        for (image, key) in decoded {
            if let Ok(text) = serde_json::to_string(&key) {
                by_key.insert(text, rows.len());
            }
            rows.push(Some(ChangeEvent::snapshot_read(
                image,
                key,
                SourceInfo {
                    connector: "mysql",
                    name: self.name.clone(),
                    db: db.clone(),
                    table: table_name.clone(),
                    snapshot: SnapshotMark::Incremental,
                    ..SourceInfo::default()
                },
            )));
        }
        self.window = Some(ChunkWindow {
            table: coll,
            low,
            high,
            open: false,
            rows,
            by_key,
            last_key: last_key.or(progress.last_key),
            last_chunk,
        });
        Ok(())
    }

    /// `TRUNCATE [TABLE] db.table`: Debezium's truncate event (`op: "t"`, no images, no key).
    /// The columns stay as they were, so no schema change.
    fn truncate(&mut self, db: String, table: String, server_id: u32, event_start: u64) {
        if !self.captures(&db, &table) {
            return;
        }
        let coll = format!("{db}.{table}");
        if self.in_tx.is_some() {
            *self.tx_counts.entry(coll).or_default() += 1;
        }
        self.pending.push_back(Change::Row(Box::new(ChangeEvent {
            op: Op::Truncate,
            before: None,
            after: None,
            key: Row::default(),
            source: SourceInfo {
                connector: "mysql",
                name: self.name.clone(),
                db: Arc::from(db),
                table: Arc::from(table),
                ts_ms: self.tx_ts_ms,
                server_id: Some(server_id),
                file: Some(Arc::from(self.at.file.as_str())),
                pos: Some(event_start),
                gtid: self.gtid.clone(),
                tx_id: self.in_tx.clone(),
                ..SourceInfo::default()
            },
            transaction: None,
        })));
    }

    /// Follow a QUERY event: table DDL re-reads the definition; other statements pass.
    async fn ddl(&mut self, default_db: &str, statement: &str, end: u64) -> Result<(), MysqlError> {
        let Some(targets) =
            ddl_targets(default_db, statement).map_err(|reason| MysqlError::Ddl {
                statement: statement.to_string(),
                position: format!("{}:{end}", self.at.file),
                reason,
            })?
        else {
            return Ok(());
        };
        // Column names may come from the definition (minimal metadata): shapes are redone.
        self.shapes.clear();
        let mut at = self.at.clone();
        at.pos = end;
        at.snapshot = None;
        for (db, table) in targets {
            if !self.captures(&db, &table) {
                continue;
            }
            let def = read_definition(&mut self.meta, &db, &table, Some(statement), at.position())
                .await?;
            self.schemas.insert((db, table), def.clone());
            self.pending.push_back(Change::Schema(def));
        }
        Ok(())
    }
}

#[derive(Debug)]
enum ImageError {
    Io(std::io::Error),
    NotFull,
    Decode(DecodeError),
}

/// One row image of a rows event: (for the after image of a PARTIAL_UPDATE_ROWS event, its
/// value options first) the NULL bitmap over the columns present, then each present non-NULL
/// value in column order, decoded by mysql_common's binlog value decoder.
fn read_image<'a>(
    buf: &mut ParseBuf<'a>,
    shape: &'a [ColumnShape],
    full: bool,
    shared: bool,
    charsets: &HashMap<u16, String>,
) -> Result<Row, ImageError> {
    let short = || ImageError::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    if !full {
        return Err(ImageError::NotFull);
    }
    if shared {
        let options = buf.checked_eat_lenenc_int().ok_or_else(short)?;
        // Bit 1: PARTIAL_JSON_UPDATES, whose diffs this decoder refuses (see decode.rs).
        if options & 1 != 0 {
            return Err(ImageError::Decode(DecodeError::Column {
                column: "(json)".into(),
                reason: "partial JSON update; set binlog_row_value_options='' on the server".into(),
            }));
        }
    }
    let nulls = buf.checked_eat(shape.len().div_ceil(8)).ok_or_else(short)?;
    let mut row = Row {
        columns: Vec::with_capacity(shape.len()),
    };
    for (i, column) in shape.iter().enumerate() {
        let is_null = nulls.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
        let value = if is_null {
            Value::Null
        } else {
            let kind = column.kind.ok_or_else(|| {
                ImageError::Decode(DecodeError::Column {
                    column: column.name.clone(),
                    reason: "no column type in the TABLE_MAP".into(),
                })
            })?;
            let raw: BinlogValue<'a> = buf
                .parse((kind, column.meta.as_slice(), column.unsigned, false))
                .map_err(ImageError::Io)?;
            decode::value(column, column.charset, column.unsigned, raw, charsets)
                .map_err(ImageError::Decode)?
        };
        row.columns.push((column.name_arc.clone(), value));
    }
    Ok(row)
}

/// Ask the running connector reading `url` for an incremental snapshot of `tables`
/// (`db.table`): a row in its signal table, which it sees in the binlog (Debezium's
/// `execute-snapshot` signal). Returns the signal's id.
pub async fn signal_snapshot(
    url: &str,
    signal_table: &str,
    tables: &[String],
) -> Result<String, MysqlError> {
    let (db, table) = signal_table.split_once('.').ok_or_else(|| {
        MysqlError::Snapshot(format!("signal table {signal_table:?} is not db.table"))
    })?;
    let mut conn = connect(url).await?;
    let id = format!("snapshot-{}", now_ms());
    let data = serde_json::json!({ "data-collections": tables, "type": "incremental" }).to_string();
    let sql = format!(
        "INSERT INTO `{}`.`{}` (id, type, data) VALUES (?, 'execute-snapshot', ?)",
        db.replace('`', "``"),
        table.replace('`', "``")
    );
    conn.exec_drop(sql.as_str(), (&id, &data))
        .await
        .map_err(q(format!("writing the signal to {signal_table}")))?;
    let _ = conn.disconnect().await;
    Ok(id)
}

/// `position` with a snapshot of `tables` (`db.table`) requested: the next start of the
/// connector reads just those tables inside a consistent snapshot, then streams on from
/// `position` itself, so nothing of the stream is skipped (`qanat cdc snapshot`).
pub fn request_table_snapshot(
    position: &Position,
    tables: &[String],
) -> Result<Position, MysqlError> {
    let mut at: BinlogPosition = serde_json::from_value(position.0.clone())
        .map_err(|e| MysqlError::BadPosition(format!("{}: {e}", position.0)))?;
    if at.snapshot.as_ref().is_some_and(|p| p.only.is_none()) {
        // A snapshot of every table is already due: it covers these.
        return Ok(at.position());
    }
    let progress = at.snapshot.get_or_insert_with(SnapshotProgress::default);
    let only = progress.only.get_or_insert_with(Vec::new);
    for t in tables {
        if !only.contains(t) {
            only.push(t.clone());
        }
    }
    Ok(at.position())
}

/// The table of a `TRUNCATE [TABLE] name` statement (MySQL also takes it without `TABLE`).
fn truncate_target(default_db: &str, statement: &str) -> Option<(String, String)> {
    use std::sync::OnceLock;
    static TRUNCATE: OnceLock<Option<Regex>> = OnceLock::new();
    let re = TRUNCATE
        .get_or_init(|| {
            Regex::new(
                r"(?is)^\s*truncate\s+(?:table\s+)?(`(?:[^`]|``)+`|[\w$]+)(?:\s*\.\s*(`(?:[^`]|``)+`|[\w$]+))?\s*;?\s*$",
            )
            .ok()
        })
        .as_ref()?;
    let text = strip_comments(statement);
    let caps = re.captures(&text)?;
    let a = unquote(caps.get(1)?.as_str());
    Some(match caps.get(2) {
        Some(b) => (a, unquote(b.as_str())),
        None => (default_db.to_string(), a),
    })
}

/// The tables a DDL statement changes; `Ok(None)` when it changes no table's columns.
fn ddl_targets(default_db: &str, statement: &str) -> Result<Option<Vec<(String, String)>>, String> {
    static_regexes(|head, ident| {
        let text = strip_comments(statement);
        let Some(caps) = head.captures(&text) else {
            return Ok(None);
        };
        let verb = caps.get(1).map_or("", |m| m.as_str()).to_ascii_lowercase();
        let rest = caps.get(2).map_or("", |m| m.as_str());
        let names: Vec<(String, String)> = ident
            .captures_iter(rest)
            .filter(|c| {
                // Keywords between the names (RENAME a TO b; DROP … RESTRICT), unquoted.
                let raw = c.get(0).map_or("", |m| m.as_str());
                !["to", "as", "restrict", "cascade", "wait", "nowait"]
                    .iter()
                    .any(|k| raw.eq_ignore_ascii_case(k))
            })
            .map(|c| {
                let a = unquote(c.get(1).map_or("", |m| m.as_str()));
                match c.get(2) {
                    Some(b) => (a, unquote(b.as_str())),
                    None => (default_db.to_string(), a),
                }
            })
            .collect();
        let first = names.first().cloned().ok_or("no table name found")?;
        Ok(Some(match verb.as_str() {
            // RENAME TABLE a TO b, c TO d: every name, old ones come back dropped.
            "rename" | "drop" => names,
            // ALTER TABLE t RENAME TO u: both.
            "alter" => {
                let lower = rest.to_ascii_lowercase();
                if let Some(idx) = lower
                    .find(" rename to ")
                    .or_else(|| lower.find(" rename as "))
                {
                    let mut out = vec![first];
                    if let Some(c) = ident.captures(&rest[idx + 11..]) {
                        let a = unquote(c.get(1).map_or("", |m| m.as_str()));
                        out.push(match c.get(2) {
                            Some(b) => (a, unquote(b.as_str())),
                            None => (default_db.to_string(), a),
                        });
                    }
                    out
                } else {
                    vec![first]
                }
            }
            _ => vec![first],
        }))
    })
}

fn static_regexes<T>(f: impl FnOnce(&Regex, &Regex) -> T) -> T {
    use std::sync::OnceLock;
    static HEAD: OnceLock<(Regex, Regex)> = OnceLock::new();
    let (head, ident) = HEAD.get_or_init(|| {
        let head = Regex::new(
            r"(?is)^\s*(alter|create|drop|rename|truncate)\s+(?:(?:online|offline|ignore|temporary|or\s+replace)\s+)*table\s+(?:if\s+(?:not\s+)?exists\s+)?(.*)$",
        );
        let ident = Regex::new(r"(`(?:[^`]|``)+`|[\w$]+)(?:\s*\.\s*(`(?:[^`]|``)+`|[\w$]+))?");
        match (head, ident) {
            (Ok(h), Ok(i)) => (h, i),
            // The patterns are constants; an error here is a programming error caught by tests.
            _ => (Regex::new("$^").unwrap_or_else(|_| unreachable!()), Regex::new("$^").unwrap_or_else(|_| unreachable!())),
        }
    });
    f(head, ident)
}

fn unquote(s: &str) -> String {
    s.strip_prefix('`')
        .and_then(|s| s.strip_suffix('`'))
        .map_or_else(|| s.to_string(), |s| s.replace("``", "`"))
}

fn strip_comments(statement: &str) -> String {
    // `/* … */` anywhere (the server appends `/* generated by server */` to DROP TABLE).
    let mut out = String::with_capacity(statement.len());
    let mut rest = statement;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        match rest[start + 2..].find("*/") {
            Some(end) => {
                out.push(' ');
                rest = &rest[start + 2 + end + 2..];
            }
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// The columns of `db.table` now, from `information_schema`; `columns: None` if it is gone.
async fn read_definition(
    conn: &mut Conn,
    db: &str,
    table: &str,
    ddl: Option<&str>,
    position: Position,
) -> Result<SchemaChange, MysqlError> {
    let cols: Vec<(String, String, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(q(format!("columns of {db}.{table}")))?;
    let primary_key = primary_key(conn, db, table).await?;
    Ok(SchemaChange {
        db: db.to_string(),
        schema: None,
        table: table.to_string(),
        ddl: ddl.map(str::to_string),
        columns: (!cols.is_empty()).then(|| {
            cols.into_iter()
                .map(|(name, type_name, nullable)| Column {
                    name,
                    type_name,
                    nullable: nullable == "YES",
                })
                .collect()
        }),
        primary_key,
        position,
    })
}

async fn primary_key(conn: &mut Conn, db: &str, table: &str) -> Result<Vec<String>, MysqlError> {
    conn.exec(
        "SELECT COLUMN_NAME FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? \
         AND TABLE_NAME = ? AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
        (db, table),
    )
    .await
    .map_err(q(format!("primary key of {db}.{table}")))
}

async fn master_position(conn: &mut Conn) -> Result<BinlogPosition, MysqlError> {
    let row: Option<mysql_async::Row> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(q("SHOW MASTER STATUS"))?;
    let row = row.ok_or(MysqlError::ServerSetting {
        variable: "log_bin",
        found: "OFF".into(),
        want: "ON",
    })?;
    Ok(BinlogPosition {
        file: row.get(0).unwrap_or_default(),
        pos: row.get(1).unwrap_or(4),
        gtid: None,
        gtid_state: BTreeMap::new(),
        snapshot: None,
        incremental: None,
    })
}

async fn check_settings(conn: &mut Conn) -> Result<(), MysqlError> {
    let log_bin: Option<My> = conn
        .query_first("SELECT @@log_bin")
        .await
        .map_err(q("@@log_bin"))?;
    let on = match &log_bin {
        Some(My::Int(1)) | Some(My::UInt(1)) => true,
        Some(My::Bytes(b)) => b == b"1" || b.eq_ignore_ascii_case(b"ON"),
        _ => false,
    };
    if !on {
        return Err(MysqlError::ServerSetting {
            variable: "log_bin",
            found: "OFF".into(),
            want: "ON",
        });
    }
    for (variable, want) in [("binlog_format", "ROW"), ("binlog_row_image", "FULL")] {
        let found: Option<String> = conn
            .query_first(format!("SELECT @@GLOBAL.{variable}"))
            .await
            .map_err(q(format!("@@{variable}")))?;
        let found = found.unwrap_or_default();
        if !found.eq_ignore_ascii_case(want) {
            return Err(MysqlError::ServerSetting {
                variable,
                found,
                want,
            });
        }
    }
    Ok(())
}

fn json_param(v: &Json) -> My {
    match v {
        Json::Number(n) => n
            .as_i64()
            .map(My::Int)
            .or_else(|| n.as_u64().map(My::UInt))
            .unwrap_or_else(|| My::Double(n.as_f64().unwrap_or(0.0))),
        Json::String(s) => My::Bytes(s.clone().into_bytes()),
        Json::Bool(b) => My::Int(i64::from(*b)),
        Json::Null => My::NULL,
        other => My::Bytes(other.to_string().into_bytes()),
    }
}

fn snapshot_shape(col: &mysql_async::Column) -> ColumnShape {
    let flags = col.flags();
    let kind = if flags.contains(ColumnFlags::ENUM_FLAG) {
        ColumnType::MYSQL_TYPE_ENUM
    } else if flags.contains(ColumnFlags::SET_FLAG) {
        ColumnType::MYSQL_TYPE_SET
    } else {
        col.column_type()
    };
    ColumnShape {
        name: col.name_str().into_owned(),
        kind: Some(kind),
        precision: if kind == ColumnType::MYSQL_TYPE_BIT {
            col.column_length()
        } else {
            u32::from(col.decimals())
        },
        charset: col.character_set(),
        primary_key: flags.contains(ColumnFlags::PRI_KEY_FLAG),
        ..ColumnShape::default()
    }
}

/// A value read by the snapshot (binary protocol, session time zone UTC) as the same
/// canonical value the binlog gives for it.
fn snapshot_value(
    shape: &ColumnShape,
    v: My,
    charsets: &HashMap<u16, String>,
) -> Result<Value, DecodeError> {
    use ColumnType::*;
    let kind = shape.kind.unwrap_or(MYSQL_TYPE_NULL);
    let bad = |reason: String| DecodeError::Column {
        column: shape.name.clone(),
        reason,
    };
    let frac = |us: u32| -> String {
        if shape.precision == 0 || shape.precision > 6 {
            String::new()
        } else {
            format!(".{}", &format!("{us:06}")[..shape.precision as usize])
        }
    };
    Ok(match (kind, v) {
        (_, My::NULL) => Value::Null,
        (MYSQL_TYPE_ENUM | MYSQL_TYPE_SET, My::Bytes(b)) => {
            Value::Text(String::from_utf8(b).map_err(|e| bad(e.to_string()))?)
        }
        (MYSQL_TYPE_TIMESTAMP, My::Date(y, mo, d, h, mi, s, us)) => Value::Timestamp(format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{}Z",
            frac(us)
        )),
        (MYSQL_TYPE_DATETIME, My::Date(y, mo, d, h, mi, s, us)) => Value::DateTime(format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{}",
            frac(us)
        )),
        (MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE, My::Date(y, mo, d, ..)) => {
            Value::Date(format!("{y:04}-{mo:02}-{d:02}"))
        }
        (MYSQL_TYPE_TIME, My::Time(neg, days, h, mi, s, us)) => Value::Time(format!(
            "{}{:02}:{mi:02}:{s:02}{}",
            if neg { "-" } else { "" },
            u64::from(days) * 24 + u64::from(h),
            frac(us)
        )),
        (MYSQL_TYPE_YEAR, My::Int(y)) => Value::Int(y),
        (MYSQL_TYPE_YEAR, My::UInt(y)) => Value::Int(i64::try_from(y).unwrap_or(0)),
        (MYSQL_TYPE_FLOAT, My::Float(f)) => {
            Value::Float(f.to_string().parse::<f64>().unwrap_or(f64::from(f)))
        }
        (MYSQL_TYPE_FLOAT, My::Double(f)) | (MYSQL_TYPE_DOUBLE, My::Double(f)) => Value::Float(f),
        (MYSQL_TYPE_BIT, My::Bytes(b)) => {
            if shape.precision == 1 {
                Value::Bool(b.iter().any(|x| *x != 0))
            } else {
                Value::UInt(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
            }
        }
        (MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL, My::Bytes(b)) => {
            Value::Decimal(String::from_utf8(b).map_err(|e| bad(e.to_string()))?)
        }
        (MYSQL_TYPE_JSON, My::Bytes(b)) => {
            Value::Json(String::from_utf8(b).map_err(|e| bad(e.to_string()))?)
        }
        (MYSQL_TYPE_GEOMETRY, My::Bytes(b)) => Value::Bytes(b),
        (_, My::Bytes(b)) => {
            if shape.charset == decode::BINARY_COLLATION {
                Value::Bytes(b)
            } else {
                decode::text(shape, shape.charset, b, charsets)?
            }
        }
        (_, My::Int(i)) => Value::Int(i),
        (_, My::UInt(u)) => Value::UInt(u),
        (_, other) => return Err(bad(format!("{kind:?} as {other:?}"))),
    })
}

/// The `SELECT` of one primary-key chunk of `db.table` after `last_key` (all of a table
/// without a key).
fn chunk_query(
    db: &str,
    table: &str,
    primary_key: &[String],
    last_key: Option<&[Json]>,
    chunk: usize,
) -> (String, Vec<My>) {
    let quote = |s: &str| format!("`{}`", s.replace('`', "``"));
    if primary_key.is_empty() {
        // No key: one pass; a crash restarts this table (documented fallback).
        return (
            format!("SELECT * FROM {}.{}", quote(db), quote(table)),
            Vec::new(),
        );
    }
    let cols: Vec<String> = primary_key.iter().map(|c| quote(c)).collect();
    let order = cols.join(",");
    match last_key {
        Some(last) => (
            format!(
                "SELECT * FROM {}.{} WHERE ({order}) > ({}) ORDER BY {order} LIMIT {chunk}",
                quote(db),
                quote(table),
                vec!["?"; cols.len()].join(",")
            ),
            last.iter().map(json_param).collect(),
        ),
        None => (
            format!(
                "SELECT * FROM {}.{} ORDER BY {order} LIMIT {chunk}",
                quote(db),
                quote(table)
            ),
            Vec::new(),
        ),
    }
}

/// What decoding the rows of one result needs, worked out once from its columns: every row
/// of a result has the same columns.
struct ChunkColumns {
    shapes: Vec<ColumnShape>,
    names: Vec<Arc<str>>,
    key_flags: Vec<bool>,
    key_len: usize,
}

impl ChunkColumns {
    fn new(columns: &[mysql_async::Column], primary_key: &[String]) -> Self {
        let key_flags: Vec<bool> = columns
            .iter()
            .map(|c| primary_key.iter().any(|k| *k == c.name_str()))
            .collect();
        ChunkColumns {
            shapes: columns.iter().map(snapshot_shape).collect(),
            names: columns
                .iter()
                .map(|c| Arc::from(c.name_str().as_ref()))
                .collect(),
            key_len: key_flags.iter().filter(|k| **k).count(),
            key_flags,
        }
    }

    /// One row as (image, key).
    fn decode(
        &self,
        row: mysql_async::Row,
        charsets: &HashMap<u16, String>,
        coll: &str,
    ) -> Result<(Row, Row), MysqlError> {
        let values = row.unwrap();
        let mut image = Vec::with_capacity(values.len());
        let mut key = Vec::with_capacity(self.key_len);
        for (((v, shape), name), is_key) in values
            .into_iter()
            .zip(&self.shapes)
            .zip(&self.names)
            .zip(&self.key_flags)
        {
            let value = snapshot_value(shape, v, charsets).map_err(|error| MysqlError::Decode {
                table: coll.to_string(),
                position: "snapshot".into(),
                error,
            })?;
            if *is_key {
                key.push((name.clone(), value.clone()));
            }
            image.push((name.clone(), value));
        }
        Ok((Row { columns: image }, Row { columns: key }))
    }
}

/// The rows of a chunk as (image, key).
fn decode_chunk(
    result: Vec<mysql_async::Row>,
    primary_key: &[String],
    charsets: &HashMap<u16, String>,
    coll: &str,
) -> Result<Vec<(Row, Row)>, MysqlError> {
    let Some(first) = result.first() else {
        return Ok(Vec::new());
    };
    let columns = ChunkColumns::new(first.columns_ref(), primary_key);
    result
        .into_iter()
        .map(|row| columns.decode(row, charsets, coll))
        .collect()
}

impl SnapshotReader {
    /// Read every table, chunk by chunk, into `tx`; then commit and send
    /// [`SnapshotBatch::Done`]. An error is sent as the last item. Stops quietly when the
    /// source is gone.
    async fn run(mut self, tx: tokio::sync::mpsc::Sender<Result<SnapshotBatch, MysqlError>>) {
        let last = match self.read(&tx).await {
            Ok(true) => Ok(SnapshotBatch::Done),
            Ok(false) => return,
            Err(e) => Err(e),
        };
        let _ = tx.send(last).await;
    }

    /// False when the receiver is gone. Rows are decoded as they arrive: a chunk is held as
    /// events only, never also as protocol rows.
    async fn read(
        &mut self,
        tx: &tokio::sync::mpsc::Sender<Result<SnapshotBatch, MysqlError>>,
    ) -> Result<bool, MysqlError> {
        let chunk = self.chunk;
        while let Some(def) = self.tables.pop_front() {
            let coll = format!("{}.{}", def.db, def.table);
            let last_table = self.tables.is_empty();
            let keyed = !def.primary_key.is_empty();
            let table = SnapshotTable {
                db: Arc::from(def.db.as_str()),
                table: Arc::from(def.table.as_str()),
            };
            let mut last_key = match self.resume.take() {
                Some((t, key)) if t == coll && keyed => Some(key),
                _ => None,
            };
            let mut renewed = 0;
            // A keyed table is a query per chunk of `chunk` rows, after the last key; one
            // without a key is one query (a crash restarts it). Either way the rows go to the
            // source in batches of SNAPSHOT_BATCH as they are decoded.
            let mut finished = false;
            while !finished {
                let (sql, params) = chunk_query(
                    &def.db,
                    &def.table,
                    &def.primary_key,
                    last_key.as_deref(),
                    chunk,
                );
                let mut result = match self.conn.exec_iter(sql.as_str(), params).await {
                    Ok(result) => result,
                    Err(e) if table_changed(&e) && renewed < SNAPSHOT_RENEWALS => {
                        renewed += 1;
                        self.renew(&coll).await?;
                        continue;
                    }
                    Err(e) => return Err(q(format!("snapshot of {coll}"))(e)),
                };
                let mut columns: Option<ChunkColumns> = None;
                let mut read = 0usize;
                let mut rows = Vec::with_capacity(SNAPSHOT_BATCH);
                let mut ts = now_ms();
                let mut changed = false;
                loop {
                    let row = match result.next().await {
                        Ok(row) => row,
                        Err(e) if table_changed(&e) && renewed < SNAPSHOT_RENEWALS => {
                            changed = true;
                            break;
                        }
                        Err(e) => return Err(q(format!("snapshot of {coll}"))(e)),
                    };
                    let end = row.is_none();
                    if let Some(row) = row {
                        let cols = columns.get_or_insert_with(|| {
                            ChunkColumns::new(row.columns_ref(), &def.primary_key)
                        });
                        let (image, key) = cols.decode(row, &self.rows.charsets, &coll)?;
                        rows.push(self.rows.event(&table, image, key, ts));
                        read += 1;
                    }
                    if end {
                        finished = !keyed || read < chunk;
                    }
                    if rows.len() < SNAPSHOT_BATCH && !end {
                        continue;
                    }
                    if rows.is_empty() && !finished {
                        break;
                    }
                    if finished && last_table {
                        if let Some(Change::Row(event)) = rows.last_mut() {
                            event.source.snapshot = SnapshotMark::Last;
                        }
                    }
                    if let (true, Some(Change::Row(event))) = (keyed, rows.last()) {
                        last_key =
                            Some(event.key.columns.iter().map(|(_, v)| v.to_json()).collect());
                    }
                    let batch = SnapshotBatch::Chunk {
                        coll: coll.clone(),
                        estimated_rows: def.estimated_rows,
                        rows: std::mem::replace(&mut rows, Vec::with_capacity(SNAPSHOT_BATCH)),
                        last_key: last_key.clone(),
                        finished,
                    };
                    if tx.send(Ok(batch)).await.is_err() {
                        return Ok(false);
                    }
                    if end {
                        break;
                    }
                    ts = now_ms();
                }
                if changed {
                    // Rows not handed over are read again after `last_key`.
                    drop(result);
                    renewed += 1;
                    self.renew(&coll).await?;
                }
            }
        }
        self.conn
            .query_drop("COMMIT")
            .await
            .map_err(q("COMMIT snapshot"))?;
        Ok(true)
    }

    /// `coll` was truncated or altered after the snapshot's transaction began (MariaDB refuses
    /// to read it in that read view: error 1412). A new consistent snapshot continues the
    /// table after the last key handed over, as a resumed snapshot does after a crash: the
    /// rows it reads are newer than the stream's start, and the stream replays the TRUNCATE or
    /// ALTER and everything after it, so each key still converges to its final state.
    async fn renew(&mut self, coll: &str) -> Result<(), MysqlError> {
        tracing::warn!(table = %coll, "table changed during the snapshot (TRUNCATE or ALTER); continuing it in a new consistent snapshot");
        self.conn
            .query_drop("ROLLBACK")
            .await
            .map_err(q("ROLLBACK snapshot"))?;
        self.conn
            .query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .map_err(q("START TRANSACTION WITH CONSISTENT SNAPSHOT"))?;
        metrics::counter!("qanat_cdc_snapshot_renewals_total", "connector" => self.rows.name.to_string())
            .increment(1);
        Ok(())
    }
}

/// How often one table's snapshot may start over in a new read view before the error stops
/// the connector (a table altered again and again).
const SNAPSHOT_RENEWALS: u32 = 3;

/// MariaDB's ER_TABLE_DEF_CHANGED: "Table definition has changed, please retry transaction".
fn table_changed(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Server(server) if server.code == 1412)
}

/// The table a snapshot chunk is read from.
struct SnapshotTable {
    db: Arc<str>,
    table: Arc<str>,
}

impl SnapshotRows {
    /// A row read by the snapshot as its `op: "r"` change.
    fn event(&self, table: &SnapshotTable, image: Row, key: Row, ts: i64) -> Change {
        Change::Row(Box::new(ChangeEvent::snapshot_read(
            image,
            key,
            SourceInfo {
                connector: "mysql",
                name: self.name.clone(),
                db: table.db.clone(),
                table: table.table.clone(),
                ts_ms: ts,
                snapshot: SnapshotMark::Yes,
                file: Some(self.file.clone()),
                pos: Some(self.pos),
                ..SourceInfo::default()
            },
        )))
    }
}

impl Source for MysqlSource {
    type Error = MysqlError;

    async fn next(&mut self) -> Result<Change, MysqlError> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(change);
            }
            if self.snapshot.is_some() {
                Box::pin(self.snapshot_step()).await?;
            } else if self.at.incremental.is_some()
                && self.window.is_none()
                && self.in_tx.is_none()
                && !self.standalone
            {
                Box::pin(self.incremental_step()).await?;
                self.stream_step().await?;
            } else {
                self.stream_step().await?;
            }
        }
    }

    fn ready(&mut self) -> Option<Change> {
        self.pending.pop_front()
    }

    async fn acknowledge(&mut self, _position: &Position) -> Result<(), MysqlError> {
        // The binlog keeps no replica state: the stored position is all there is.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_targets_found() {
        let t = |s| truncate_target("shop", s);
        let pair = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
        assert_eq!(t("TRUNCATE TABLE orders"), pair("shop", "orders"));
        assert_eq!(t("truncate orders"), pair("shop", "orders"));
        assert_eq!(
            t("TRUNCATE `other`.`we``ird` /* c */"),
            pair("other", "we`ird")
        );
        assert_eq!(t(" Truncate table other . t ;"), pair("other", "t"));
        assert_eq!(t("TRUNCATE TABLE a, b"), None);
        assert_eq!(t("ALTER TABLE orders ADD c INT"), None);
        assert_eq!(t("TRUNCATED"), None);
    }

    #[test]
    fn ddl_targets_found() {
        let t = |s| ddl_targets("shop", s).ok().flatten();
        assert_eq!(
            t("ALTER TABLE orders ADD COLUMN x int"),
            Some(vec![("shop".into(), "orders".into())])
        );
        assert_eq!(
            t("/* c */ alter online table `a b`.`t``x` drop y"),
            Some(vec![("a b".into(), "t`x".into())])
        );
        assert_eq!(
            t("RENAME TABLE a TO b, other.c TO d"),
            Some(vec![
                ("shop".into(), "a".into()),
                ("shop".into(), "b".into()),
                ("other".into(), "c".into()),
                ("shop".into(), "d".into())
            ])
        );
        assert_eq!(
            t("CREATE TABLE IF NOT EXISTS x.y (id int)"),
            Some(vec![("x".into(), "y".into())])
        );
        assert_eq!(
            t("DROP TABLE IF EXISTS a, b"),
            Some(vec![
                ("shop".into(), "a".into()),
                ("shop".into(), "b".into())
            ])
        );
        assert_eq!(
            t("DROP TABLE `a` /* generated by server */"),
            Some(vec![("shop".into(), "a".into())])
        );
        assert_eq!(t("CREATE DATABASE z"), None);
        assert_eq!(t("GRANT ALL ON *.* TO x"), None);
        assert!(ddl_targets("shop", "ALTER TABLE ---").is_err());
    }

    proptest::proptest! {
        /// Statements are logged text from the server: any of them is parsed without a panic.
        #[test]
        fn ddl_parsing_never_panics(statement in "(?s)(ALTER|alter|RENAME|DROP|CREATE) (TABLE|table) .{0,60}") {
            let _ = ddl_targets("db", &statement);
        }

        #[test]
        fn any_text_never_panics(statement in "\\PC{0,80}") {
            let _ = ddl_targets("db", &statement);
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("mysql://root:secret@127.0.0.1:3306"),
            "mysql://root:***@127.0.0.1:3306"
        );
    }
}
