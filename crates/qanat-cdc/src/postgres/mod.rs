//! PostgreSQL source: logical replication with the `pgoutput` plugin (PostgreSQL 13+).
//!
//! # Pieces
//! - [`pgoutput`]: a pure decoder of pgoutput messages (protocol version 1).
//! - [`transport`]: the replication connection behind [`transport::ReplicationStream`]
//!   (implemented with `pgwire-replication`; the module says why).
//! - [`types`]: column text → [`Value`]; the table is `docs/cdc-types-postgres.md`.
//! - this module: publication and slot management, the snapshot, and the translation of the
//!   stream into [`Change`]s. Regular SQL (catalog, snapshot reads) goes through
//!   `tokio-postgres`.
//!
//! # Position
//! `{"lsn": "0/16B3748"}`, plus `"incremental"` while an incremental snapshot runs: the end
//! LSN of the last commit (or the server's WAL end at a heartbeat). Streaming restarts there; transactions that committed before it are not
//! sent again. The slot's `confirmed_flush_lsn` only moves through
//! [`Source::acknowledge`], so the server keeps everything after the stored position.
//!
//! # Snapshot
//! The slot is created on the replication connection with an exported snapshot; a second
//! session imports it (`SET TRANSACTION SNAPSHOT`, REPEATABLE READ, read only) and reads each
//! table through a cursor, `snapshot_fetch_rows` rows at a time, so memory stays bounded.
//! The rows (`op = r`) are exactly the state at the slot's consistent point, and streaming
//! starts at that point: nothing is missing or doubled across the handover. Snapshot rows
//! are not inside Begin/Commit; one [`Change::Heartbeat`] at the consistent point follows
//! the last of them, and it is the first resume point. A crash before it leaves no stored
//! position, and the next start drops the slot and snapshots again (an exported snapshot
//! does not outlive its session, so a PostgreSQL snapshot cannot resume mid-table).
//!
//! # Incremental snapshot
//! With a signal table (`signal_table`), a row `('id', 'execute-snapshot',
//! '{"data-collections": ["schema.t"]}')` inserted there reaches the source through the
//! stream (the table is in the publication, never captured) and queues those tables. Between
//! transactions the source reads the first table in primary-key chunks, DBLog style: it
//! commits a low watermark row to the signal table, reads the chunk (`snapshot_fetch_rows`
//! rows after the last key), commits a high watermark row. When the stream reaches the low
//! watermark, every key the stream changes is dropped from the chunk; at the high watermark's
//! commit the rest is emitted as `op = r` with `source.snapshot = "incremental"`, followed by
//! a heartbeat whose position carries the progress past the chunk. The progress (tables
//! left, last key) is part of every position, so a restart reads the chunk after the stored
//! key again; the slot's confirmed LSN is untouched by all this. Tables without a primary
//! key are skipped with a warning. A signalled table missing from a `FOR TABLE` publication
//! is added to it first, so its changes stream from the low watermark on.
//!
//! # Retries
//! Connecting retries with exponential backoff (logged) while the server is unreachable, up
//! to `connect_attempts`; a refused login or a server error is not retried. Once running, a
//! broken connection is returned as [`PostgresError::Stream`]: the caller reopens the source
//! from its stored position (a restart repeats only changes after that position).

pub mod pgoutput;
pub mod transport;
pub mod types;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgwire_replication::{Lsn, ReplicationConfig, TlsConfig};
use regex::Regex;
use serde_json::json;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::event::{ChangeEvent, Op, Row, SnapshotMark, SourceInfo, Value};
use crate::source::{Change, Column, Position, SchemaChange, Source};
use pgoutput::{Datum, Message, OldTuple, Tuple};
use transport::{format_lsn, parse_lsn, PgwireStream, ReplicationStream, StreamMessage};
use types::{decode_text, PgType, SESSION_OPTIONS};

/// Debezium's `unavailable.value.placeholder`: an unchanged TOASTed value the server did
/// not send and no old row image holds.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

pub use crate::source::SnapshotMode;

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database` (or a key=value string).
    pub url: String,
    /// The connector's name (Debezium's logical server name).
    pub name: String,
    /// Default `qanat_<name>`.
    pub slot: Option<String>,
    /// Default `qanat_<name>`.
    pub publication: Option<String>,
    /// Tables to capture: a regex matching the whole `schema.table`. `None`: every table
    /// (the publication is created FOR ALL TABLES).
    pub include: Option<String>,
    pub exclude: Option<String>,
    pub snapshot: SnapshotMode,
    /// A heartbeat after this long without a change.
    pub heartbeat_interval: Duration,
    /// How often acknowledged positions reach the server.
    pub status_interval: Duration,
    /// Rows per snapshot fetch.
    pub snapshot_fetch_rows: usize,
    /// Connection attempts while the server is unreachable (at least 1).
    pub connect_attempts: u32,
    /// `schema.table` of the signal table (Debezium's `signal.data.collection`): a row
    /// inserted there asks the running connector for an incremental snapshot, and the
    /// connector writes its chunk watermarks there. Created if missing (see
    /// [`SIGNAL_TABLE_DDL`]) and added to the publication; never captured itself. Chunks
    /// are `snapshot_fetch_rows` rows.
    pub signal_table: Option<String>,
}

/// The signal table's definition (Debezium's): `id`, `type` and `data` (JSON text) columns.
pub const SIGNAL_TABLE_DDL: &str =
    "(id varchar(64) PRIMARY KEY, type varchar(32) NOT NULL, data varchar(2048))";

/// `schema.table` split in two; `None` when it is not of that form.
fn split_table_name(name: &str) -> Option<(String, String)> {
    let (schema, table) = name.split_once('.')?;
    (!schema.is_empty() && !table.is_empty() && !table.contains('.'))
        .then(|| (schema.to_owned(), table.to_owned()))
}

impl PostgresConfig {
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            slot: None,
            publication: None,
            include: None,
            exclude: None,
            snapshot: SnapshotMode::Initial,
            heartbeat_interval: Duration::from_secs(1),
            status_interval: Duration::from_secs(1),
            snapshot_fetch_rows: 2000,
            connect_attempts: 8,
            signal_table: None,
        }
    }

    fn default_object_name(&self) -> String {
        let name: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let mut full = format!("qanat_{name}");
        full.truncate(63);
        full
    }

    pub fn slot_name(&self) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| self.default_object_name())
    }

    pub fn publication_name(&self) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| self.default_object_name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("bad config `{key}`: {reason}")]
    Config { key: &'static str, reason: String },
    #[error("cannot reach PostgreSQL at {addr} after {attempts} attempts: {detail}")]
    Unreachable {
        addr: String,
        attempts: u32,
        detail: String,
    },
    #[error("PostgreSQL at {addr} refused user \"{user}\": {detail}")]
    Login {
        addr: String,
        user: String,
        detail: String,
    },
    #[error(
        "wal_level is '{actual}' on {addr}; logical replication needs wal_level = logical \
         (set it in postgresql.conf or with ALTER SYSTEM SET wal_level = logical, then restart \
         the server)"
    )]
    WalLevel { addr: String, actual: String },
    #[error(
        "replication slot \"{slot}\" does not exist, but the stored position is LSN {stored}: \
         the changes after it can no longer be read. Re-snapshot: restart with \
         --snapshot when_needed (or remove the connector's stored position), which recreates \
         the slot and reads the tables again"
    )]
    SlotGone { slot: String, stored: String },
    #[error(
        "replication slot \"{slot}\" has confirmed LSN {confirmed}, past the stored position \
         {stored}: the changes between them would be skipped. Something else consumed the \
         slot; re-snapshot with a new slot (--slot) or after dropping this one"
    )]
    SlotAhead {
        slot: String,
        confirmed: String,
        stored: String,
    },
    #[error("replication slot \"{slot}\" {reason}")]
    SlotUnusable { slot: String, reason: String },
    #[error("publication \"{publication}\" lacks tables {missing:?}; run ALTER PUBLICATION {publication} ADD TABLE … or change the table filter")]
    PublicationMissingTables {
        publication: String,
        missing: Vec<String>,
    },
    #[error("no table matches the table filter {0:?}")]
    NoTables(String),
    #[error("{context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("replication connection: {0}")]
    Stream(#[from] transport::TransportError),
    #[error("the server ended the replication stream")]
    StreamEnded,
    #[error("at LSN {lsn}: {source}")]
    Decode {
        lsn: String,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error("{table}.{column}: {source}")]
    Value {
        table: String,
        column: String,
        #[source]
        source: types::TypeError,
    },
    #[error("a change of relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("relation {table}: the row has {got} columns, the Relation message {expected}")]
    ColumnCount {
        table: String,
        got: usize,
        expected: usize,
    },
    #[error("stored position {0} is not a PostgreSQL position {{\"lsn\": \"X/Y\"}}")]
    BadPosition(String),
    #[error("PostgreSQL returned no {0}")]
    MissingRow(&'static str),
}

type Result<T> = std::result::Result<T, PostgresError>;

fn sql_err(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PostgresError {
    let context = context.into();
    move |source| PostgresError::Sql { context, source }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn pg_time_to_ms(micros: i64) -> i64 {
    micros.saturating_add(pgoutput::PG_EPOCH_OFFSET_MICROS) / 1000
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The position JSON for an LSN.
pub fn position_at(lsn: u64) -> Position {
    Position(json!({ "lsn": format_lsn(lsn) }))
}

/// The LSN of a stored position.
pub fn position_lsn(position: &Position) -> Result<u64> {
    position
        .0
        .get("lsn")
        .and_then(|v| v.as_str())
        .and_then(parse_lsn)
        .ok_or_else(|| PostgresError::BadPosition(position.0.to_string()))
}

/// Asks the running connector reading `url` for an incremental snapshot of `tables`
/// (`schema.table`): an `execute-snapshot` row in its signal table, which it sees in the
/// replication stream (Debezium's signal). Returns the signal's id.
pub async fn signal_snapshot(url: &str, signal_table: &str, tables: &[String]) -> Result<String> {
    let (schema, table) = split_table_name(signal_table).ok_or_else(|| PostgresError::Config {
        key: "signal_table",
        reason: format!("{signal_table:?} is not schema.table"),
    })?;
    let endpoint = Endpoint::parse(url)?;
    let sql = endpoint.connect_sql(1).await?;
    let id = format!("snapshot-{}", now_ms());
    let data = json!({ "data-collections": tables, "type": "incremental" }).to_string();
    sql.execute(
        &format!(
            "INSERT INTO {}.{} (id, type, data) VALUES ($1, 'execute-snapshot', $2)",
            quote_ident(&schema),
            quote_ident(&table)
        ),
        &[&id, &data],
    )
    .await
    .map_err(sql_err(format!("writing the signal to {signal_table}")))?;
    Ok(id)
}

/// Where the connection goes, parsed once.
struct Endpoint {
    pg: tokio_postgres::Config,
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self> {
        let bad = |reason: String| PostgresError::Config {
            key: "source",
            reason,
        };
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e| bad(format!("{e}")))?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => return Err(bad("no host".into())),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg
            .get_user()
            .ok_or_else(|| bad("no user name".into()))?
            .to_owned();
        let password = match pg.get_password() {
            Some(p) => String::from_utf8(p.to_vec())
                .map_err(|_| bad("the password is not UTF-8".into()))?,
            None => String::new(),
        };
        let database = pg.get_dbname().unwrap_or(&user).to_owned();
        pg.options(SESSION_OPTIONS).application_name("qanat-cdc");
        Ok(Self {
            pg,
            host,
            port,
            user,
            password,
            database,
        })
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// A regular SQL session; retried with backoff while the server is unreachable.
    async fn connect_sql(&self, attempts: u32) -> Result<tokio_postgres::Client> {
        let mut delay = Duration::from_millis(200);
        let attempts = attempts.max(1);
        for attempt in 1..=attempts {
            match self.pg.connect(NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!("PostgreSQL connection ended: {e}");
                        }
                    });
                    return Ok(client);
                }
                Err(e) => {
                    if let Some(db) = e.as_db_error() {
                        return Err(PostgresError::Login {
                            addr: self.addr(),
                            user: self.user.clone(),
                            detail: format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                        });
                    }
                    if attempt == attempts {
                        return Err(PostgresError::Unreachable {
                            addr: self.addr(),
                            attempts,
                            detail: e.to_string(),
                        });
                    }
                    tracing::warn!(
                        "PostgreSQL at {} unreachable (attempt {attempt} of {attempts}): {e}; retrying in {delay:?}",
                        self.addr()
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
        Err(PostgresError::Unreachable {
            addr: self.addr(),
            attempts,
            detail: "no attempt made".into(),
        })
    }
}

/// Table filter: full matches on `schema.table`.
struct TableFilter {
    include: Option<Regex>,
    exclude: Option<Regex>,
    /// The signal table, never captured.
    signal: Option<(String, String)>,
}

impl TableFilter {
    fn new(config: &PostgresConfig) -> Result<Self> {
        let compile = |key: &'static str, pattern: &Option<String>| {
            pattern
                .as_ref()
                .map(|p| {
                    Regex::new(&format!("^(?:{p})$")).map_err(|e| PostgresError::Config {
                        key,
                        reason: e.to_string(),
                    })
                })
                .transpose()
        };
        let signal = config
            .signal_table
            .as_deref()
            .map(|name| {
                split_table_name(name).ok_or_else(|| PostgresError::Config {
                    key: "signal_table",
                    reason: format!("{name:?} is not schema.table"),
                })
            })
            .transpose()?;
        Ok(Self {
            include: compile("tables", &config.include)?,
            exclude: compile("exclude_tables", &config.exclude)?,
            signal,
        })
    }

    fn is_signal(&self, schema: &str, table: &str) -> bool {
        self.signal
            .as_ref()
            .is_some_and(|(s, t)| s == schema && t == table)
    }

    fn accepts(&self, schema: &str, table: &str) -> bool {
        if self.is_signal(schema, table) {
            return false;
        }
        let full = format!("{schema}.{table}");
        self.include.as_ref().is_none_or(|r| r.is_match(&full))
            && !self.exclude.as_ref().is_some_and(|r| r.is_match(&full))
    }
}

/// A table as the stream (or the snapshot) currently describes it.
struct RelationState {
    schema: String,
    table: String,
    included: bool,
    columns: Vec<Arc<str>>,
    types: Vec<PgType>,
    /// Replica identity key flags from the Relation message.
    identity: Vec<bool>,
    /// Primary-key column indexes, in key order.
    primary_key: Vec<usize>,
    /// (name, type oid, type modifier) per column: a change here is a schema change.
    signature: Vec<(String, u32, i32)>,
    toast_warned: bool,
}

struct Tx {
    xid: String,
    final_lsn: u64,
    ts_ms: i64,
    counts: BTreeMap<String, u64>,
}

struct SnapshotTable {
    oid: u32,
    schema: String,
    table: String,
    estimate: f64,
}

struct SnapshotReader {
    client: tokio_postgres::Client,
    tables: VecDeque<SnapshotTable>,
    /// The table being read, with the rows read so far.
    current: Option<(u32, u64, f64)>,
    rows: VecDeque<ChangeEvent>,
    /// One row kept back, so the last row of the snapshot can be marked `last`.
    held: Option<ChangeEvent>,
    lsn: u64,
    ts_ms: i64,
    fetch_rows: usize,
}

/// What an incremental snapshot has left: the tables to read (`schema.table`), the first
/// being read, and the primary key of its last row emitted (each column's text output). It
/// rides in the stored position; a restart reads the chunk after `last_key` again.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
struct IncrementalProgress {
    tables: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_key: Option<Vec<String>>,
    #[serde(default)]
    rows_done: u64,
    #[serde(default)]
    rows_estimated: u64,
}

/// One chunk of an incremental snapshot between its watermarks (DBLog): read after the low
/// watermark row was committed and before the high one. While the stream is between the two,
/// a key it changes is dropped from the chunk (the streamed change is as new or newer); what
/// is left is emitted as reads right after the high watermark's commit.
struct ChunkWindow {
    oid: u32,
    /// `schema.table`.
    table: String,
    low: String,
    high: String,
    /// The low watermark came through the stream.
    open: bool,
    /// The chunk's rows in key order; `None` once the stream changed that key.
    rows: Vec<Option<ChangeEvent>>,
    /// Index in `rows` by the key's JSON text.
    by_key: HashMap<String, usize>,
    /// The chunk's last key (kept when that row was dropped): the next chunk starts after it.
    last_key: Option<Vec<String>>,
    /// Fewer rows than a chunk: the table is read to its end.
    last_chunk: bool,
}

impl ChunkWindow {
    /// The stream changed (or deleted) the row with `key`.
    fn drop_key(&mut self, key: &Row) {
        if let Some(&i) = serde_json::to_string(key)
            .ok()
            .and_then(|text| self.by_key.get(&text))
        {
            self.rows[i] = None;
        }
    }
}

/// The PostgreSQL source. See the module doc.
pub struct PostgresSource<S: ReplicationStream = PgwireStream> {
    name: Arc<str>,
    db: String,
    slot: String,
    sql: tokio_postgres::Client,
    stream: S,
    filter: TableFilter,
    heartbeat_interval: Duration,
    relations: HashMap<u32, RelationState>,
    types: HashMap<u32, PgType>,
    snapshot: Option<SnapshotReader>,
    pending: VecDeque<Change>,
    tx: Option<Tx>,
    /// The last resume point handed out.
    resume_lsn: u64,
    publication: String,
    /// Rows per incremental snapshot chunk.
    chunk_rows: usize,
    /// The incremental snapshot in progress (part of every resume position).
    incremental: Option<IncrementalProgress>,
    /// The chunk whose watermarks are on their way through the stream.
    window: Option<ChunkWindow>,
    /// A chunk whose high watermark arrived in the transaction being read: emitted right
    /// after that transaction's commit.
    closed: Option<ChunkWindow>,
    watermarks: u64,
    /// This connector's last watermark row still in the signal table.
    last_watermark: Option<String>,
}

impl PostgresSource<PgwireStream> {
    /// Connects, checks the server, creates or validates the publication and the slot,
    /// and prepares the snapshot or the stream from `stored`.
    pub async fn open(config: &PostgresConfig, stored: Option<&Position>) -> Result<Self> {
        let endpoint = Endpoint::parse(&config.url)?;
        let slot = config.slot_name();
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(PostgresError::Config {
                key: "slot",
                reason: format!("{slot:?}: a slot name is 1 to 63 characters of a-z, 0-9 and _"),
            });
        }
        let publication = config.publication_name();
        let filter = TableFilter::new(config)?;
        let stored_lsn = stored.map(position_lsn).transpose()?;
        let stored_incremental: Option<IncrementalProgress> = stored
            .and_then(|p| p.0.get("incremental"))
            .map(|v| {
                serde_json::from_value(v.clone())
                    .map_err(|e| PostgresError::BadPosition(format!("{v}: {e}")))
            })
            .transpose()?;

        let sql = endpoint.connect_sql(config.connect_attempts).await?;
        let wal_level = simple_value(&sql, "SHOW wal_level").await?;
        if wal_level != "logical" {
            return Err(PostgresError::WalLevel {
                addr: endpoint.addr(),
                actual: wal_level,
            });
        }
        if let Some((schema, table)) = &filter.signal {
            sql.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {}.{} {SIGNAL_TABLE_DDL}",
                quote_ident(schema),
                quote_ident(table)
            ))
            .await
            .map_err(sql_err(format!(
                "creating the signal table {schema}.{table}"
            )))?;
        }
        ensure_publication(&sql, &publication, config, &filter).await?;
        if let Some((schema, table)) = &filter.signal {
            ensure_in_publication(&sql, &publication, schema, table).await?;
        }

        let existing = slot_state(&sql, &slot).await?;
        if let Some(state) = &existing {
            if state.plugin != "pgoutput" || state.database != endpoint.database {
                return Err(PostgresError::SlotUnusable {
                    slot,
                    reason: format!(
                        "uses plugin {} on database {}; the connector needs pgoutput on {}",
                        state.plugin, state.database, endpoint.database
                    ),
                });
            }
        }

        // What to do: stream from an LSN, or (re)create the slot, with or without snapshot.
        enum Plan {
            Stream { from: u64 },
            Create { snapshot: bool, drop_first: bool },
        }
        let plan = match (stored_lsn, &existing, config.snapshot) {
            (Some(lsn), Some(state), _) => {
                if state.confirmed > lsn {
                    return Err(PostgresError::SlotAhead {
                        slot,
                        confirmed: format_lsn(state.confirmed),
                        stored: format_lsn(lsn),
                    });
                }
                Plan::Stream { from: lsn }
            }
            (Some(lsn), None, SnapshotMode::WhenNeeded) => {
                tracing::warn!(
                    "replication slot {slot} is gone (stored position {}): snapshotting again",
                    format_lsn(lsn)
                );
                Plan::Create {
                    snapshot: true,
                    drop_first: false,
                }
            }
            (Some(lsn), None, _) => {
                return Err(PostgresError::SlotGone {
                    slot,
                    stored: format_lsn(lsn),
                })
            }
            (None, Some(state), SnapshotMode::Never) => Plan::Stream {
                from: state.confirmed,
            },
            (None, None, SnapshotMode::Never) => Plan::Create {
                snapshot: false,
                drop_first: false,
            },
            (None, existing, _) => {
                if existing.is_some() {
                    tracing::warn!(
                        "replication slot {slot} exists but no position is stored (an earlier \
                         snapshot did not finish): dropping it and snapshotting again"
                    );
                }
                Plan::Create {
                    snapshot: true,
                    drop_first: existing.is_some(),
                }
            }
        };

        if existing.is_some() {
            wait_slot_inactive(&sql, &slot).await?;
        }
        if let Plan::Create {
            drop_first: true, ..
        } = plan
        {
            sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(sql_err(format!("dropping replication slot {slot}")))?;
        }

        let start_lsn = match plan {
            Plan::Stream { from } => from,
            // Zero: the new slot's consistent point, which is also its confirmed LSN.
            Plan::Create { .. } => 0,
        };
        let mut replication = ReplicationConfig::new(
            endpoint.host.clone(),
            endpoint.user.clone(),
            endpoint.password.clone(),
            endpoint.database.clone(),
            slot.clone(),
            publication.as_str(),
        )
        .with_port(endpoint.port)
        .with_tls(TlsConfig::disabled())
        .with_start_lsn(Lsn::from_u64(start_lsn))
        .with_ack_lsn(Lsn::from_u64(start_lsn))
        .with_status_interval(config.status_interval)
        .with_wakeup_interval(config.status_interval.max(Duration::from_secs(1)))
        .with_options(SESSION_OPTIONS)
        .with_application_name("qanat-cdc");
        replication.buffer_events = 4096;
        let stream = PgwireStream::connect_gated(replication).await?;

        let mut source = Self {
            name: Arc::from(config.name.as_str()),
            db: endpoint.database.clone(),
            slot: slot.clone(),
            sql,
            stream,
            filter,
            heartbeat_interval: config.heartbeat_interval,
            relations: HashMap::new(),
            types: HashMap::new(),
            snapshot: None,
            pending: VecDeque::new(),
            tx: None,
            resume_lsn: start_lsn,
            publication: publication.clone(),
            chunk_rows: config.snapshot_fetch_rows.max(1),
            incremental: None,
            window: None,
            closed: None,
            watermarks: 0,
            last_watermark: None,
        };
        match plan {
            Plan::Stream { from } => {
                tracing::info!("streaming slot {slot} from {}", format_lsn(from));
                // A new slot (Plan::Create) snapshots every table anyway.
                source.incremental = stored_incremental;
                if let Some(progress) = &source.incremental {
                    tracing::info!(tables = ?progress.tables, "incremental snapshot resumes");
                }
                source.stream.start_streaming().await?;
                if stored_lsn.is_none() {
                    source.pending.push_back(Change::Heartbeat {
                        resume: position_at(from),
                        ts_ms: now_ms(),
                    });
                }
            }
            Plan::Create { snapshot, .. } => {
                let command = format!(
                    "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput {}",
                    if snapshot {
                        "EXPORT_SNAPSHOT"
                    } else {
                        "NOEXPORT_SNAPSHOT"
                    }
                );
                let rows = source.stream.command(&command).await?;
                let row = rows
                    .into_iter()
                    .next()
                    .ok_or(PostgresError::MissingRow("CREATE_REPLICATION_SLOT result"))?;
                let field = |i: usize| row.get(i).cloned().flatten();
                let consistent = field(1)
                    .as_deref()
                    .and_then(parse_lsn)
                    .ok_or(PostgresError::MissingRow("consistent point"))?;
                source.resume_lsn = consistent;
                tracing::info!(
                    "created replication slot {slot} at {}",
                    format_lsn(consistent)
                );
                if snapshot {
                    let name = field(2).ok_or(PostgresError::MissingRow("snapshot name"))?;
                    let reader = source
                        .begin_snapshot(&endpoint, config, &publication, &name, consistent)
                        .await?;
                    source.snapshot = Some(reader);
                } else {
                    source.stream.start_streaming().await?;
                    source.pending.push_back(Change::Heartbeat {
                        resume: position_at(consistent),
                        ts_ms: now_ms(),
                    });
                }
            }
        }
        Ok(source)
    }

    async fn begin_snapshot(
        &mut self,
        endpoint: &Endpoint,
        config: &PostgresConfig,
        publication: &str,
        snapshot_name: &str,
        lsn: u64,
    ) -> Result<SnapshotReader> {
        let client = endpoint.connect_sql(config.connect_attempts).await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(snapshot_name)
            ))
            .await
            .map_err(sql_err("importing the slot's snapshot"))?;
        let rows = client
            .query(
                "SELECT c.oid, n.nspname::text, c.relname::text, c.reltuples::float8 \
                 FROM pg_publication_tables p \
                 JOIN pg_namespace n ON n.nspname = p.schemaname \
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
                 WHERE p.pubname = $1 ORDER BY 2, 3",
                &[&publication],
            )
            .await
            .map_err(sql_err("listing the publication's tables"))?;
        let mut tables = VecDeque::new();
        for row in rows {
            let oid: u32 = row.get(0);
            let schema: String = row.get(1);
            let table: String = row.get(2);
            if self.filter.accepts(&schema, &table) {
                tables.push_back(SnapshotTable {
                    oid,
                    schema,
                    table,
                    estimate: row.get(3),
                });
            }
        }
        tracing::info!(
            "snapshot of {} tables at {} starts",
            tables.len(),
            format_lsn(lsn)
        );
        Ok(SnapshotReader {
            client,
            tables,
            current: None,
            rows: VecDeque::new(),
            held: None,
            lsn,
            ts_ms: now_ms(),
            fetch_rows: config.snapshot_fetch_rows.max(1),
        })
    }
}

struct SlotState {
    plugin: String,
    database: String,
    confirmed: u64,
}

async fn simple_value(sql: &tokio_postgres::Client, query: &str) -> Result<String> {
    for message in sql
        .simple_query(query)
        .await
        .map_err(sql_err(query.to_owned()))?
    {
        if let SimpleQueryMessage::Row(row) = message {
            if let Some(v) = row.get(0) {
                return Ok(v.to_owned());
            }
        }
    }
    Err(PostgresError::MissingRow("value"))
}

async fn slot_state(sql: &tokio_postgres::Client, slot: &str) -> Result<Option<SlotState>> {
    let row = sql
        .query_opt(
            "SELECT coalesce(plugin::text, ''), coalesce(database::text, ''), \
             coalesce(confirmed_flush_lsn::text, '0/0') \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql_err(format!("looking up replication slot {slot}")))?;
    Ok(row.map(|row| SlotState {
        plugin: row.get(0),
        database: row.get(1),
        confirmed: parse_lsn(row.get(2)).unwrap_or(0),
    }))
}

/// A process killed a moment ago may still hold the slot until the server notices.
async fn wait_slot_inactive(sql: &tokio_postgres::Client, slot: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pid: Option<i32> = sql
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(sql_err(format!("looking up replication slot {slot}")))?
            .and_then(|row| row.get(0));
        let Some(pid) = pid else { return Ok(()) };
        if tokio::time::Instant::now() >= deadline {
            return Err(PostgresError::SlotUnusable {
                slot: slot.to_owned(),
                reason: format!("is in use by server process {pid}"),
            });
        }
        tracing::info!("replication slot {slot} is still in use by process {pid}; waiting");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn ensure_publication(
    sql: &tokio_postgres::Client,
    publication: &str,
    config: &PostgresConfig,
    filter: &TableFilter,
) -> Result<()> {
    let all_tables: Option<bool> = sql
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(sql_err(format!("looking up publication {publication}")))?
        .map(|row| row.get(0));
    if config.include.is_none() {
        if all_tables.is_none() {
            sql.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR ALL TABLES",
                quote_ident(publication)
            ))
            .await
            .map_err(sql_err(format!("creating publication {publication}")))?;
            tracing::info!("created publication {publication} FOR ALL TABLES");
        }
        return Ok(());
    }
    let candidates = sql
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(sql_err("listing tables"))?;
    let wanted: Vec<(String, String)> = candidates
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .filter(|(s, t)| filter.accepts(s, t))
        .collect();
    if wanted.is_empty() {
        return Err(PostgresError::NoTables(
            config.include.clone().unwrap_or_default(),
        ));
    }
    let list = |tables: &[&(String, String)]| {
        tables
            .iter()
            .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match all_tables {
        None => {
            let all: Vec<&(String, String)> = wanted.iter().collect();
            sql.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(publication),
                list(&all)
            ))
            .await
            .map_err(sql_err(format!("creating publication {publication}")))?;
            tracing::info!(
                "created publication {publication} for {} tables",
                wanted.len()
            );
        }
        Some(true) => {}
        Some(false) => {
            let present: HashSet<(String, String)> = sql
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&publication],
                )
                .await
                .map_err(sql_err(format!("listing tables of publication {publication}")))?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            let missing: Vec<String> = wanted
                .iter()
                .filter(|t| !present.contains(*t))
                .map(|(s, t)| format!("{s}.{t}"))
                .collect();
            if !missing.is_empty() {
                return Err(PostgresError::PublicationMissingTables {
                    publication: publication.to_owned(),
                    missing,
                });
            }
        }
    }
    Ok(())
}

/// Adds `schema.table` to the publication unless the publication already publishes it
/// (FOR ALL TABLES, or listed).
async fn ensure_in_publication(
    sql: &tokio_postgres::Client,
    publication: &str,
    schema: &str,
    table: &str,
) -> Result<()> {
    let published: bool = sql
        .query_opt(
            "SELECT p.puballtables OR EXISTS (SELECT 1 FROM pg_publication_tables t \
             WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[&publication, &schema, &table],
        )
        .await
        .map_err(sql_err(format!("looking up publication {publication}")))?
        .ok_or(PostgresError::MissingRow("publication"))?
        .get(0);
    if !published {
        sql.batch_execute(&format!(
            "ALTER PUBLICATION {} ADD TABLE {}.{}",
            quote_ident(publication),
            quote_ident(schema),
            quote_ident(table)
        ))
        .await
        .map_err(sql_err(format!(
            "adding {schema}.{table} to publication {publication}"
        )))?;
        tracing::info!("added {schema}.{table} to publication {publication}");
    }
    Ok(())
}

impl<S: ReplicationStream> PostgresSource<S> {
    /// The slot this source reads.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    async fn resolve_type(&mut self, oid: u32) -> Result<PgType> {
        if let Some(ty) = PgType::builtin(oid).or_else(|| self.types.get(&oid).cloned()) {
            return Ok(ty);
        }
        // Enums, domains, composite and range types, arrays of them: from the catalog.
        let mut current = oid;
        let mut depth = 0;
        let ty = loop {
            let row = self
                .sql
                .query_opt(
                    "SELECT typtype::text, typcategory::text, typelem, typbasetype, typdelim::text \
                     FROM pg_type WHERE oid = $1",
                    &[&current],
                )
                .await
                .map_err(sql_err(format!("looking up type {current}")))?;
            let Some(row) = row else { break PgType::Text };
            let (typtype, category, elem, base, delim): (String, String, u32, u32, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            depth += 1;
            if depth > 8 {
                break PgType::Text;
            }
            if typtype == "d" {
                if let Some(ty) = PgType::builtin(base) {
                    break ty;
                }
                current = base;
                continue;
            }
            if category == "A" && elem != 0 {
                let element = Box::pin(self.resolve_type(elem)).await?;
                break PgType::Array(Box::new(element), delim.bytes().next().unwrap_or(b','));
            }
            break PgType::Text;
        };
        self.types.insert(oid, ty.clone());
        Ok(ty)
    }

    async fn primary_key(&self, oid: u32) -> Result<Vec<String>> {
        let rows = self
            .sql
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
                &[&oid],
            )
            .await
            .map_err(sql_err(format!(
                "reading the primary key of relation {oid}"
            )))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Builds the state of a relation and says whether its columns differ from the last
    /// ones seen (or it is new to this session): then a schema change is due.
    async fn define_relation(
        &mut self,
        oid: u32,
        schema: String,
        table: String,
        columns: Vec<(String, u32, i32, bool)>,
        lsn: u64,
    ) -> Result<()> {
        let mut state = self.relation_state(oid, schema, table, &columns).await?;
        let changed = self.relations.get(&oid).is_none_or(|r| {
            r.signature != state.signature || r.table != state.table || r.schema != state.schema
        });
        if changed && state.included {
            let schema_change = self
                .schema_change(
                    oid,
                    &state.schema,
                    &state.table,
                    &state.signature,
                    &state.primary_key,
                    &state.columns,
                    lsn,
                )
                .await?;
            self.pending.push_back(Change::Schema(schema_change));
        }
        state.toast_warned = self.relations.get(&oid).is_some_and(|r| r.toast_warned);
        self.relations.insert(oid, state);
        Ok(())
    }

    /// A relation's state from its columns `(name, type oid, type modifier, identity key)`.
    async fn relation_state(
        &mut self,
        oid: u32,
        schema: String,
        table: String,
        columns: &[(String, u32, i32, bool)],
    ) -> Result<RelationState> {
        let mut types = Vec::with_capacity(columns.len());
        for (_, type_oid, _, _) in columns {
            types.push(self.resolve_type(*type_oid).await?);
        }
        let pk_names = self.primary_key(oid).await?;
        let names: Vec<Arc<str>> = columns.iter().map(|c| Arc::from(c.0.as_str())).collect();
        let primary_key: Vec<usize> = pk_names
            .iter()
            .filter_map(|pk| names.iter().position(|n| &**n == pk))
            .collect();
        let primary_key = if primary_key.len() == pk_names.len() {
            primary_key
        } else {
            Vec::new()
        };
        let signature: Vec<(String, u32, i32)> =
            columns.iter().map(|c| (c.0.clone(), c.1, c.2)).collect();
        let included = self.filter.accepts(&schema, &table);
        Ok(RelationState {
            schema,
            table,
            included,
            columns: names,
            types,
            identity: columns.iter().map(|c| c.3).collect(),
            primary_key,
            signature,
            toast_warned: false,
        })
    }

    /// The resume position at `lsn`, with the incremental snapshot's progress.
    fn position(&self, lsn: u64) -> Position {
        let mut position = position_at(lsn);
        if let (Some(progress), Some(map)) = (&self.incremental, position.0.as_object_mut()) {
            map.insert(
                "incremental".into(),
                serde_json::to_value(progress).unwrap_or(serde_json::Value::Null),
            );
        }
        position
    }

    #[allow(clippy::too_many_arguments)]
    async fn schema_change(
        &self,
        oid: u32,
        schema: &str,
        table: &str,
        signature: &[(String, u32, i32)],
        primary_key: &[usize],
        names: &[Arc<str>],
        lsn: u64,
    ) -> Result<SchemaChange> {
        let type_oids: Vec<u32> = signature.iter().map(|c| c.1).collect();
        let modifiers: Vec<i32> = signature.iter().map(|c| c.2).collect();
        let type_names: Vec<String> = self
            .sql
            .query(
                "SELECT format_type(t, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(t, m, n) ORDER BY n",
                &[&type_oids, &modifiers],
            )
            .await
            .map_err(sql_err("naming column types"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let nullable: HashMap<String, bool> = self
            .sql
            .query(
                "SELECT attname::text, NOT attnotnull FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await
            .map_err(sql_err(format!("reading the columns of {schema}.{table}")))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(SchemaChange {
            db: self.db.clone(),
            schema: Some(schema.to_owned()),
            table: table.to_owned(),
            ddl: None,
            columns: Some(
                signature
                    .iter()
                    .zip(type_names)
                    .map(|((name, _, _), type_name)| Column {
                        nullable: nullable.get(name).copied().unwrap_or(true),
                        name: name.clone(),
                        type_name,
                    })
                    .collect(),
            ),
            primary_key: primary_key.iter().map(|&i| names[i].to_string()).collect(),
            position: position_at(lsn),
        })
    }

    fn source_info(&self, rel: &RelationState, lsn: u64) -> SourceInfo {
        let (ts_ms, tx_id) = match &self.tx {
            Some(tx) => (tx.ts_ms, Some(Arc::from(tx.xid.as_str()))),
            None => (now_ms(), None),
        };
        SourceInfo {
            connector: "postgresql",
            name: self.name.clone(),
            db: Arc::from(self.db.as_str()),
            schema: Some(Arc::from(rel.schema.as_str())),
            table: Arc::from(rel.table.as_str()),
            ts_ms,
            snapshot: SnapshotMark::No,
            lsn: Some(lsn),
            tx_id,
            ..SourceInfo::default()
        }
    }

    /// Decodes a tuple into a row. `only_identity` keeps just the replica identity columns
    /// (an old key image); `fill` supplies unchanged TOASTed values.
    fn decode_tuple(
        rel: &mut RelationState,
        tuple: &Tuple,
        only_identity: bool,
        fill: Option<&Row>,
    ) -> Result<Row> {
        if tuple.0.len() != rel.columns.len() {
            return Err(PostgresError::ColumnCount {
                table: format!("{}.{}", rel.schema, rel.table),
                got: tuple.0.len(),
                expected: rel.columns.len(),
            });
        }
        let mut columns = Vec::with_capacity(tuple.0.len());
        for (i, datum) in tuple.0.iter().enumerate() {
            if only_identity && !rel.identity[i] {
                continue;
            }
            let name = &rel.columns[i];
            let value = match datum {
                Datum::Null => Value::Null,
                Datum::Text(bytes) | Datum::Binary(bytes) => {
                    let text = std::str::from_utf8(bytes).map_err(|_| PostgresError::Value {
                        table: format!("{}.{}", rel.schema, rel.table),
                        column: name.to_string(),
                        source: types::TypeError {
                            ty: rel.types[i].clone(),
                            text: String::from_utf8_lossy(bytes).into_owned(),
                            reason: "not UTF-8 text",
                        },
                    })?;
                    decode_text(&rel.types[i], text).map_err(|source| PostgresError::Value {
                        table: format!("{}.{}", rel.schema, rel.table),
                        column: name.to_string(),
                        source,
                    })?
                }
                Datum::UnchangedToast => match fill.and_then(|row| row.get(name)) {
                    Some(value) => value.clone(),
                    None => {
                        if !rel.toast_warned {
                            rel.toast_warned = true;
                            tracing::warn!(
                                "{}.{}: an update left a large (TOASTed) value unchanged and \
                                 the server did not send it; the event carries {UNAVAILABLE_VALUE:?} \
                                 for it. ALTER TABLE … REPLICA IDENTITY FULL makes the old row carry it",
                                rel.schema,
                                rel.table
                            );
                        }
                        Value::Text(UNAVAILABLE_VALUE.to_owned())
                    }
                },
            };
            columns.push((name.clone(), value));
        }
        Ok(Row { columns })
    }

    fn key_of(rel: &RelationState, row: &Row) -> Row {
        Row {
            columns: rel
                .primary_key
                .iter()
                .filter_map(|&i| {
                    let name = &rel.columns[i];
                    row.get(name).map(|v| (name.clone(), v.clone()))
                })
                .collect(),
        }
    }

    fn row_event(
        &mut self,
        relation: u32,
        wal_start: u64,
        op: Op,
        old: Option<&OldTuple>,
        new: Option<&Tuple>,
    ) -> Result<Option<Change>> {
        let lsn = if wal_start != 0 {
            wal_start
        } else {
            self.tx.as_ref().map_or(0, |tx| tx.final_lsn)
        };
        let mut rel = self
            .relations
            .remove(&relation)
            .ok_or(PostgresError::UnknownRelation(relation))?;
        if self.filter.is_signal(&rel.schema, &rel.table) {
            let signal = match (op, new) {
                (Op::Create, Some(tuple)) => Some(Self::decode_tuple(&mut rel, tuple, false, None)),
                _ => None,
            };
            self.relations.insert(relation, rel);
            match signal {
                Some(Ok(row)) => self.on_signal(&row),
                Some(Err(e)) => tracing::warn!("a signal row that does not decode: {e}; ignored"),
                None => {}
            }
            return Ok(None);
        }
        // (before, after, key, the before image's key when it differs from `key`)
        type Images = (Option<Row>, Option<Row>, Row, Option<Row>);
        let result: Result<Option<Images>> = (|| {
            if !rel.included {
                return Ok(None);
            }
            let before = match old {
                Some(OldTuple::Full(t)) => Some(Self::decode_tuple(&mut rel, t, false, None)?),
                Some(OldTuple::Key(t)) => Some(Self::decode_tuple(&mut rel, t, true, None)?),
                None => None,
            };
            let after = new
                .map(|t| Self::decode_tuple(&mut rel, t, false, before.as_ref()))
                .transpose()?;
            let key = match (&after, &before) {
                (Some(row), _) | (None, Some(row)) => Self::key_of(&rel, row),
                (None, None) => Row::default(),
            };
            let old_key = before
                .as_ref()
                .map(|row| Self::key_of(&rel, row))
                .filter(|old| *old != key);
            Ok(Some((before, after, key, old_key)))
        })();
        let info = self.source_info(&rel, lsn);
        let full_name = format!("{}.{}", rel.schema, rel.table);
        self.relations.insert(relation, rel);
        let Some((before, after, key, old_key)) = result? else {
            return Ok(None);
        };
        // Inside an incremental snapshot's window the stream wins over the chunk.
        if let Some(w) = self.window.as_mut().filter(|w| w.open && w.oid == relation) {
            w.drop_key(&key);
            if let Some(old) = &old_key {
                w.drop_key(old);
            }
        }
        if let Some(tx) = &mut self.tx {
            *tx.counts.entry(full_name).or_default() += 1;
        }
        Ok(Some(Change::Row(Box::new(ChangeEvent {
            op,
            before,
            after,
            key,
            source: info,
            transaction: None,
        }))))
    }

    /// Translates one stream message; `None` when it yields nothing by itself (a Relation
    /// message may queue a schema change in `pending`).
    async fn handle(&mut self, wal_start: u64, payload: &bytes::Bytes) -> Result<Option<Change>> {
        let message = pgoutput::decode(payload).map_err(|source| PostgresError::Decode {
            lsn: format_lsn(wal_start),
            source,
        })?;
        Ok(match message {
            Message::Begin(b) => {
                let ts_ms = pg_time_to_ms(b.commit_time);
                let xid = b.xid.to_string();
                self.tx = Some(Tx {
                    xid: xid.clone(),
                    final_lsn: b.final_lsn,
                    ts_ms,
                    counts: BTreeMap::new(),
                });
                Some(Change::Begin { tx_id: xid, ts_ms })
            }
            Message::Commit(c) => {
                let tx = self.tx.take();
                self.resume_lsn = self.resume_lsn.max(c.end_lsn);
                let commit = Change::Commit {
                    tx_id: tx.as_ref().map_or_else(String::new, |t| t.xid.clone()),
                    counts: tx.map(|t| t.counts).unwrap_or_default(),
                    resume: Some(self.position(c.end_lsn)),
                };
                if let Some(window) = self.closed.take() {
                    self.emit_chunk(window, c.end_lsn);
                }
                Some(commit)
            }
            Message::Relation(r) => {
                let lsn = self.tx.as_ref().map_or(self.resume_lsn, |t| t.final_lsn);
                let columns = r
                    .columns
                    .into_iter()
                    .map(|c| (c.name, c.type_oid, c.type_modifier, c.key))
                    .collect();
                self.define_relation(r.oid, r.namespace, r.name, columns, lsn)
                    .await?;
                None
            }
            Message::Type(t) => {
                tracing::debug!("type {} is {}.{}", t.oid, t.namespace, t.name);
                None
            }
            Message::Insert { relation, new } => {
                self.row_event(relation, wal_start, Op::Create, None, Some(&new))?
            }
            Message::Update(u) => self.row_event(
                u.relation,
                wal_start,
                Op::Update,
                u.old.as_ref(),
                Some(&u.new),
            )?,
            Message::Delete(d) => {
                self.row_event(d.relation, wal_start, Op::Delete, Some(&d.old), None)?
            }
            Message::Truncate(t) => {
                // One `op: "t"` event per captured table, in the message's order; the rows'
                // keys are unknown, so the events have no record key.
                let lsn = if wal_start != 0 {
                    wal_start
                } else {
                    self.tx.as_ref().map_or(0, |tx| tx.final_lsn)
                };
                let mut events = Vec::new();
                for oid in &t.relations {
                    let rel = self
                        .relations
                        .get(oid)
                        .ok_or(PostgresError::UnknownRelation(*oid))?;
                    if !rel.included {
                        continue;
                    }
                    if let Some(w) = self.window.as_mut().filter(|w| w.open && w.oid == *oid) {
                        w.rows.iter_mut().for_each(|row| *row = None);
                    }
                    let full_name = format!("{}.{}", rel.schema, rel.table);
                    events.push((full_name, self.source_info(rel, lsn)));
                }
                for (full_name, info) in events {
                    if let Some(tx) = &mut self.tx {
                        *tx.counts.entry(full_name).or_default() += 1;
                    }
                    self.pending.push_back(Change::Row(Box::new(ChangeEvent {
                        op: Op::Truncate,
                        before: None,
                        after: None,
                        key: Row::default(),
                        source: info,
                        transaction: None,
                    })));
                }
                self.pending.pop_front()
            }
            Message::Origin { .. } | Message::Message(_) => None,
        })
    }

    /// A row inserted into the signal table: a request (`execute-snapshot`) or one of this
    /// connector's chunk watermarks coming back through the stream.
    fn on_signal(&mut self, row: &Row) {
        let text = |name: &str| match row.get(name) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        };
        let (Some(id), Some(kind)) = (text("id"), text("type")) else {
            tracing::warn!("a signal row without id or type: ignored");
            return;
        };
        match kind.as_str() {
            "execute-snapshot" => {
                let data: serde_json::Value = text("data")
                    .and_then(|d| serde_json::from_str(&d).ok())
                    .unwrap_or(serde_json::Value::Null);
                let wanted: Vec<String> = data["data-collections"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if wanted.is_empty() {
                    tracing::warn!(signal = %id, "execute-snapshot without data-collections: ignored");
                    return;
                }
                let mut accepted = Vec::new();
                for table in wanted {
                    let captured =
                        split_table_name(&table).is_some_and(|(s, t)| self.filter.accepts(&s, &t));
                    if captured {
                        accepted.push(table);
                    } else {
                        tracing::warn!(signal = %id, %table, "incremental snapshot of a table the connector does not capture: ignored");
                    }
                }
                if accepted.is_empty() {
                    return;
                }
                let progress = self
                    .incremental
                    .get_or_insert_with(IncrementalProgress::default);
                for table in accepted {
                    if !progress.tables.contains(&table) {
                        tracing::info!(signal = %id, %table, "incremental snapshot requested");
                        progress.tables.push(table);
                    }
                }
            }
            "snapshot-window-open" => {
                if let Some(w) = self.window.as_mut().filter(|w| w.low == id) {
                    w.open = true;
                }
            }
            "snapshot-window-close" => {
                if self.window.as_ref().is_some_and(|w| w.high == id && w.open) {
                    self.closed = self.window.take();
                }
            }
            other => tracing::warn!(signal = %id, kind = other, "unknown signal type: ignored"),
        }
    }

    /// After the high watermark's commit (at `lsn`): what is left of the chunk goes out as
    /// reads, then a heartbeat at the same LSN whose position has the progress past the chunk.
    /// The commit's own position still has the progress before it, so a crash before the
    /// reads are acknowledged reads the chunk again.
    fn emit_chunk(&mut self, window: ChunkWindow, lsn: u64) {
        let Some(progress) = self.incremental.as_mut() else {
            return;
        };
        let mut emitted = 0u64;
        for mut event in window.rows.into_iter().flatten() {
            event.source.ts_ms = now_ms();
            event.source.lsn = Some(lsn);
            self.pending.push_back(Change::Row(Box::new(event)));
            emitted += 1;
        }
        progress.rows_done += emitted;
        progress.last_key = window.last_key;
        crate::progress::report(
            &self.name,
            &window.table,
            progress.rows_done,
            progress.rows_estimated,
            window.last_chunk,
        );
        if window.last_chunk {
            tracing::info!(table = %window.table, rows = progress.rows_done, "incremental snapshot of the table done");
            progress.tables.retain(|t| *t != window.table);
            progress.last_key = None;
            progress.rows_done = 0;
            progress.rows_estimated = 0;
            if progress.tables.is_empty() {
                self.incremental = None;
            }
        }
        self.pending.push_back(Change::Heartbeat {
            resume: self.position(lsn),
            ts_ms: now_ms(),
        });
    }

    /// Drops the first table of the incremental snapshot, with a warning.
    fn skip_incremental_table(&mut self, table: &str, reason: &str) {
        tracing::warn!(%table, "incremental snapshot: {reason}; table skipped");
        if let Some(progress) = self.incremental.as_mut() {
            progress.tables.retain(|t| t != table);
            progress.last_key = None;
            progress.rows_done = 0;
            progress.rows_estimated = 0;
            if progress.tables.is_empty() {
                self.incremental = None;
            }
        }
    }

    /// The next chunk of the incremental snapshot: the low watermark, the chunk's `SELECT`
    /// (primary-key order, after the last key), the high watermark, each committed on its
    /// own; the stream then opens and closes the window (see [`ChunkWindow`]).
    async fn incremental_step(&mut self) -> Result<()> {
        let Some(progress) = self.incremental.clone() else {
            return Ok(());
        };
        let Some(coll) = progress.tables.first().cloned() else {
            self.incremental = None;
            return Ok(());
        };
        let Some((signal_schema, signal_table)) = self.filter.signal.clone() else {
            return Err(PostgresError::Config {
                key: "signal_table",
                reason: format!(
                    "the stored position has an incremental snapshot of {coll} in progress, \
                     which needs the signal table it was started with"
                ),
            });
        };
        let Some((schema, table)) = split_table_name(&coll) else {
            self.skip_incremental_table(&coll, "not schema.table");
            return Ok(());
        };
        let found = self
            .sql
            .query_opt(
                "SELECT c.oid, c.reltuples::float8 FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &table],
            )
            .await
            .map_err(sql_err(format!("looking up {coll}")))?;
        let Some(found) = found else {
            self.skip_incremental_table(&coll, "no such table");
            return Ok(());
        };
        let (oid, estimate): (u32, f64) = (found.get(0), found.get(1));
        let columns: Vec<(String, u32, i32, bool, String)> = self
            .sql
            .query(
                "SELECT attname::text, atttypid, atttypmod, format_type(atttypid, atttypmod) \
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped \
                 ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(sql_err(format!("reading the columns of {coll}")))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), false, r.get(3)))
            .collect();
        let shape: Vec<(String, u32, i32, bool)> = columns
            .iter()
            .map(|c| (c.0.clone(), c.1, c.2, c.3))
            .collect();
        // The chunk is decoded with the catalog's columns of now, apart from the stream's
        // relation state, which follows the stream's own (possibly older) Relation messages.
        let mut rel = self
            .relation_state(oid, schema.clone(), table.clone(), &shape)
            .await?;
        if rel.primary_key.is_empty() {
            self.skip_incremental_table(&coll, "it needs a primary key");
            return Ok(());
        }
        ensure_in_publication(&self.sql, &self.publication, &schema, &table).await?;
        if progress.last_key.is_none() {
            let rows_estimated = estimate.max(0.0) as u64;
            if let Some(p) = self.incremental.as_mut() {
                p.rows_estimated = rows_estimated;
            }
            crate::progress::report(&self.name, &coll, 0, rows_estimated, false);
        }

        let key_columns: Vec<String> = rel
            .primary_key
            .iter()
            .map(|&i| quote_ident(&columns[i].0))
            .collect();
        let after = match &progress.last_key {
            Some(last) if last.len() == key_columns.len() => {
                let values: Vec<String> = rel
                    .primary_key
                    .iter()
                    .zip(last)
                    .map(|(&i, text)| format!("{}::{}", quote_literal(text), columns[i].4))
                    .collect();
                format!(
                    " WHERE ({}) > ({})",
                    key_columns.join(", "),
                    values.join(", ")
                )
            }
            _ => String::new(),
        };
        let select = format!(
            "SELECT {} FROM {}.{}{after} ORDER BY {} LIMIT {}",
            columns
                .iter()
                .map(|c| quote_ident(&c.0))
                .collect::<Vec<_>>()
                .join(", "),
            quote_ident(&schema),
            quote_ident(&table),
            key_columns.join(", "),
            self.chunk_rows
        );
        // Each watermark statement also deletes this connector's previous watermark row, so
        // the signal table does not grow with every chunk (the stream ignores deletes there).
        let signal = format!(
            "{}.{}",
            quote_ident(&signal_schema),
            quote_ident(&signal_table)
        );
        let insert = format!(
            "WITH gone AS (DELETE FROM {signal} WHERE id = $4) \
             INSERT INTO {signal} (id, type, data) VALUES ($1, $2, $3)"
        );
        let data = json!({ "table": coll }).to_string();
        // Unique across restarts (the time) and connectors sharing the table (the name),
        // within the id column's 64 characters.
        self.watermarks += 1;
        let stem: String = self.name.chars().take(32).collect();
        let stem = format!("{stem}-{}-{}", now_ms(), self.watermarks);
        let (low, high) = (format!("{stem}-low"), format!("{stem}-high"));
        let previous = self.last_watermark.take().unwrap_or_default();
        self.sql
            .execute(&insert, &[&low, &"snapshot-window-open", &data, &previous])
            .await
            .map_err(sql_err(format!(
                "writing the low watermark to {signal_schema}.{signal_table}"
            )))?;
        let messages = self
            .sql
            .simple_query(&select)
            .await
            .map_err(sql_err(format!("incremental snapshot of {coll}")))?;
        self.sql
            .execute(&insert, &[&high, &"snapshot-window-close", &data, &low])
            .await
            .map_err(sql_err(format!(
                "writing the high watermark to {signal_schema}.{signal_table}"
            )))?;
        self.last_watermark = Some(high.clone());

        let mut rows = Vec::new();
        let mut by_key = HashMap::new();
        let mut last_key = None;
        for message in &messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let texts: Vec<Option<&str>> = (0..row.len()).map(|i| row.get(i)).collect();
            last_key = Some(
                rel.primary_key
                    .iter()
                    .map(|&i| texts.get(i).copied().flatten().unwrap_or("").to_owned())
                    .collect::<Vec<_>>(),
            );
            let tuple = Tuple(
                texts
                    .iter()
                    .map(|v| match v {
                        Some(t) => Datum::Text(bytes::Bytes::copy_from_slice(t.as_bytes())),
                        None => Datum::Null,
                    })
                    .collect(),
            );
            let after = Self::decode_tuple(&mut rel, &tuple, false, None)?;
            let key = Self::key_of(&rel, &after);
            if let Ok(text) = serde_json::to_string(&key) {
                by_key.insert(text, rows.len());
            }
            let mut source = self.source_info(&rel, 0);
            source.snapshot = SnapshotMark::Incremental;
            source.tx_id = None;
            rows.push(Some(ChangeEvent::snapshot_read(after, key, source)));
        }
        let last_chunk = rows.len() < self.chunk_rows;
        self.window = Some(ChunkWindow {
            oid,
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

    /// The next snapshot step; `None` once the snapshot is complete.
    async fn snapshot_step(&mut self) -> Result<Option<Change>> {
        loop {
            let Some(snap) = self.snapshot.as_mut() else {
                return Ok(None);
            };
            if let Some(row) = snap.rows.pop_front() {
                if let Some(mut previous) = snap.held.replace(row) {
                    previous.source.snapshot = SnapshotMark::Yes;
                    return Ok(Some(Change::Row(Box::new(previous))));
                }
                continue;
            }
            if let Some((oid, done, estimate)) = snap.current {
                let messages = snap
                    .client
                    .simple_query(&format!("FETCH {} FROM qanat_snapshot", snap.fetch_rows))
                    .await
                    .map_err(sql_err("reading the snapshot"))?;
                let texts: Vec<Vec<Option<String>>> = messages
                    .iter()
                    .filter_map(|m| match m {
                        SimpleQueryMessage::Row(row) => Some(
                            (0..row.len())
                                .map(|i| row.get(i).map(str::to_owned))
                                .collect(),
                        ),
                        _ => None,
                    })
                    .collect();
                let (lsn, ts_ms) = (snap.lsn, snap.ts_ms);
                let fetched = texts.len() as u64;
                let mut events = Vec::with_capacity(texts.len());
                let mut rel = self
                    .relations
                    .remove(&oid)
                    .ok_or(PostgresError::UnknownRelation(oid))?;
                let decoded: Result<()> = (|| {
                    for values in &texts {
                        let tuple = Tuple(
                            values
                                .iter()
                                .map(|v| match v {
                                    Some(t) => {
                                        Datum::Text(bytes::Bytes::copy_from_slice(t.as_bytes()))
                                    }
                                    None => Datum::Null,
                                })
                                .collect(),
                        );
                        let after = Self::decode_tuple(&mut rel, &tuple, false, None)?;
                        let key = Self::key_of(&rel, &after);
                        let mut source = self.source_info(&rel, lsn);
                        source.ts_ms = ts_ms;
                        source.snapshot = SnapshotMark::Yes;
                        events.push(ChangeEvent::snapshot_read(after, key, source));
                    }
                    Ok(())
                })();
                let table = format!("{}.{}", rel.schema, rel.table);
                self.relations.insert(oid, rel);
                decoded?;
                let Some(snap) = self.snapshot.as_mut() else {
                    return Ok(None);
                };
                snap.rows.extend(events);
                let done = done + fetched;
                crate::progress::report(
                    &self.name,
                    &table,
                    done,
                    estimate.max(0.0) as u64,
                    fetched == 0,
                );
                if fetched == 0 {
                    snap.client
                        .batch_execute("CLOSE qanat_snapshot")
                        .await
                        .map_err(sql_err("closing the snapshot cursor"))?;
                    snap.current = None;
                    tracing::info!("snapshot of {table}: done, {done} rows");
                } else {
                    snap.current = Some((oid, done, estimate));
                    if estimate > 0.0 {
                        tracing::info!("snapshot of {table}: {done} of about {estimate:.0} rows");
                    } else {
                        tracing::info!("snapshot of {table}: {done} rows (no estimate)");
                    }
                }
                continue;
            }
            if let Some(table) = snap.tables.pop_front() {
                let columns = snap
                    .client
                    .query(
                        "SELECT attname::text, atttypid, atttypmod FROM pg_attribute \
                         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                        &[&table.oid],
                    )
                    .await
                    .map_err(sql_err(format!(
                        "reading the columns of {}.{}",
                        table.schema, table.table
                    )))?;
                let columns: Vec<(String, u32, i32, bool)> = columns
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2), false))
                    .collect();
                let select = columns
                    .iter()
                    .map(|c| quote_ident(&c.0))
                    .collect::<Vec<_>>()
                    .join(", ");
                snap.client
                    .batch_execute(&format!(
                        "DECLARE qanat_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}.{}",
                        if select.is_empty() {
                            "NULL".into()
                        } else {
                            select
                        },
                        quote_ident(&table.schema),
                        quote_ident(&table.table)
                    ))
                    .await
                    .map_err(sql_err(format!(
                        "reading {}.{} in the snapshot",
                        table.schema, table.table
                    )))?;
                snap.current = Some((table.oid, 0, table.estimate));
                let lsn = snap.lsn;
                self.define_relation(table.oid, table.schema, table.table, columns, lsn)
                    .await?;
                if let Some(schema) = self.pending.pop_front() {
                    return Ok(Some(schema));
                }
                continue;
            }
            // Every table read: end the snapshot transaction, then hand over to the stream.
            snap.client
                .batch_execute("COMMIT")
                .await
                .map_err(sql_err("ending the snapshot"))?;
            let last = snap.held.take();
            let lsn = snap.lsn;
            self.snapshot = None;
            tracing::info!("snapshot complete; streaming from {}", format_lsn(lsn));
            self.stream.start_streaming().await?;
            self.pending.push_back(Change::Heartbeat {
                resume: position_at(lsn),
                ts_ms: now_ms(),
            });
            if let Some(mut last) = last {
                last.source.snapshot = SnapshotMark::Last;
                return Ok(Some(Change::Row(Box::new(last))));
            }
            return Ok(None);
        }
    }
}

impl<S: ReplicationStream> Source for PostgresSource<S> {
    type Error = PostgresError;

    async fn next(&mut self) -> Result<Change> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(change);
            }
            if self.snapshot.is_some() {
                if let Some(change) = self.snapshot_step().await? {
                    return Ok(change);
                }
                continue;
            }
            if self.incremental.is_some()
                && self.window.is_none()
                && self.closed.is_none()
                && self.tx.is_none()
            {
                self.incremental_step().await?;
                if self.window.is_none() {
                    // A table was skipped or finished without a chunk: look again.
                    continue;
                }
            }
            let message =
                match tokio::time::timeout(self.heartbeat_interval, self.stream.recv()).await {
                    Ok(message) => message?,
                    Err(_idle) => {
                        if self.tx.is_none() {
                            return Ok(Change::Heartbeat {
                                resume: self.position(self.resume_lsn),
                                ts_ms: now_ms(),
                            });
                        }
                        continue;
                    }
                };
            match message {
                None => return Err(PostgresError::StreamEnded),
                Some(StreamMessage::Keepalive { wal_end }) => {
                    // Between transactions everything up to the server's WAL end was sent:
                    // a resume point there lets the slot advance on a quiet database.
                    if self.tx.is_none() && wal_end > self.resume_lsn {
                        self.resume_lsn = wal_end;
                        return Ok(Change::Heartbeat {
                            resume: self.position(wal_end),
                            ts_ms: now_ms(),
                        });
                    }
                }
                Some(StreamMessage::Data { wal_start, payload }) => {
                    if let Some(change) = self.handle(wal_start, &payload).await? {
                        return Ok(change);
                    }
                }
            }
        }
    }

    async fn acknowledge(&mut self, position: &Position) -> Result<()> {
        let lsn = position_lsn(position)?;
        self.stream.confirm_flushed(lsn);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(id: i64) -> Row {
        Row {
            columns: vec![(Arc::from("id"), Value::Int(id))],
        }
    }

    fn read(id: i64) -> Option<ChangeEvent> {
        Some(ChangeEvent::snapshot_read(
            key(id),
            key(id),
            SourceInfo::default(),
        ))
    }

    #[test]
    fn a_key_the_stream_changes_leaves_the_chunk_and_no_other() {
        let mut window = ChunkWindow {
            oid: 1,
            table: "public.t".into(),
            low: "l".into(),
            high: "h".into(),
            open: true,
            rows: vec![read(1), read(2), read(3)],
            by_key: (1..=3)
                .map(|id| (serde_json::to_string(&key(id)).unwrap(), (id - 1) as usize))
                .collect(),
            last_key: Some(vec!["3".into()]),
            last_chunk: false,
        };
        window.drop_key(&key(2));
        window.drop_key(&key(9));
        let left: Vec<i64> = window
            .rows
            .iter()
            .flatten()
            .map(|e| match e.key.columns[0].1 {
                Value::Int(id) => id,
                _ => -1,
            })
            .collect();
        assert_eq!(left, [1, 3]);
    }

    #[test]
    fn incremental_progress_round_trips_through_the_position() {
        let progress = IncrementalProgress {
            tables: vec!["public.a".into(), "public.b".into()],
            last_key: Some(vec!["42".into(), "x'y".into()]),
            rows_done: 80,
            rows_estimated: 3000,
        };
        let mut position = position_at(0x16B3748);
        position.0.as_object_mut().unwrap().insert(
            "incremental".into(),
            serde_json::to_value(&progress).unwrap(),
        );
        assert_eq!(position_lsn(&position).unwrap(), 0x16B3748);
        let back: IncrementalProgress =
            serde_json::from_value(position.0["incremental"].clone()).unwrap();
        assert_eq!(back, progress);
        let fresh: IncrementalProgress =
            serde_json::from_value(json!({"tables": ["public.a"]})).unwrap();
        assert_eq!(fresh.last_key, None);
    }

    #[test]
    fn the_signal_table_is_never_captured() {
        let mut config = PostgresConfig::new("postgres://u@h/db", "n");
        config.signal_table = Some("public.qanat_signal".into());
        let filter = TableFilter::new(&config).unwrap();
        assert!(!filter.accepts("public", "qanat_signal"));
        assert!(filter.accepts("public", "orders"));
        config.signal_table = Some("no_schema".into());
        assert!(matches!(
            TableFilter::new(&config),
            Err(PostgresError::Config {
                key: "signal_table",
                ..
            })
        ));
        assert_eq!(split_table_name("a.b.c"), None);
        assert_eq!(split_table_name("s.t"), Some(("s".into(), "t".into())));
    }
}
