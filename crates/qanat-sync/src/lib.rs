//! Qanat batch sync: a DataX-style framework that moves tables between stores.
//!
//! The framework owns everything but data access. A [`job::TableJob`] is planned into
//! [`split::Split`]s (key ranges from sampled quantiles of the split column); each split is a
//! task, run by a bounded pool of channels: a [`plugin::Reader`] streams the split's rows as
//! Arrow `RecordBatch`es into a bounded channel, a [`plugin::SplitWriter`] drains it. The
//! batch columns use the canonical type system of [`types`], so every reader works with
//! every writer, and every value has one string form.
//!
//! Plugins: `mysql` (streaming `SELECT`; `LOAD DATA LOCAL INFILE` or multi-row `INSERT`),
//! `postgres` (`COPY … TO STDOUT`; binary `COPY … FROM STDIN` through [`pgbinary`], or the
//! text form through [`pgcopy`]), [`files`] (CSV/TSV, plain/gzip/zstd, each data file with a
//! verification file of rows, bytes and SHA-256) and `parquet_sink`. [`shard`] reads one
//! logical table from many physical tables (E5). [`bus`] reads a topic range and writes a
//! topic (JSON rows keyed by primary key).
//!
//! Invariants:
//! - Bounded memory: readers stream (a server-side cursor per split), channels hold at most
//!   a few batches of at most `batch_rows` rows, the Parquet writer flushes row groups.
//! - Splits partition the key space: every row is read by exactly one split.
//! - A split is written in one target transaction (or one staged file), so a failed task
//!   leaves nothing behind and is retried from its split with backoff.
//! - A data file's verification file is written after the data file is in place; a reader
//!   refuses a data file whose size, SHA-256 or row count differs from it.
//! - Rows a reader cannot convert or a writer rejects go to the dirty-record file with their
//!   reason; a table fails past `max_dirty_records` / `max_dirty_ratio`.
//! - Job-wide token buckets cap records/s and bytes/s.
//! - `--verify` compares, per split, the row count and an order-independent checksum of the
//!   canonical renderings on both sides.
//!
//! Metrics: `qanat_sync_rows_read_total`, `qanat_sync_rows_written_total`,
//! `qanat_sync_bytes_total`, `qanat_sync_dirty_records_total`, `qanat_sync_retries_total`,
//! `qanat_sync_splits_done_total`, `qanat_sync_tasks_running` (label `table`).

pub mod bus;
pub mod catalog;
pub mod config;
pub mod datax;
pub mod dirty;
pub mod dsn;
pub mod files;
pub mod job;
pub mod mysql;
pub mod parquet_sink;
pub mod pgbinary;
pub mod pgcopy;
pub mod plugin;
pub mod postgres;
pub mod schedule;
pub mod shard;
pub mod split;
pub mod throttle;
pub mod types;

use std::path::Path;

/// Everything that can go wrong in a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("bad DSN {dsn:?}: {reason}")]
    Dsn { dsn: String, reason: String },
    #[error("unknown table {table}")]
    UnknownTable { table: String },
    #[error("unknown column {column} in table {table}")]
    UnknownColumn { table: String, column: String },
    #[error("unsupported type {native} of column {column} in table {table}")]
    UnsupportedType {
        table: String,
        column: String,
        native: String,
    },
    #[error("{context}: {source}")]
    Mysql {
        context: String,
        #[source]
        source: mysql_async::Error,
    },
    #[error("{context}: {}", pg_message(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parquet {context}: {source}")]
    Parquet {
        context: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{context}: {source}")]
    Bus {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("verification of {file} failed: {reason}")]
    Verification { file: String, reason: String },
    #[error("table {table}: too many dirty records: {reason}")]
    TooDirty { table: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("internal: {0}")]
    Internal(String),
}

fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl SyncError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        SyncError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    pub fn mysql(context: impl Into<String>, source: mysql_async::Error) -> Self {
        SyncError::Mysql {
            context: context.into(),
            source,
        }
    }

    pub fn pg(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        SyncError::Postgres {
            context: context.into(),
            source,
        }
    }

    /// Whether running the split again may succeed (a lost connection, a deadlock), as
    /// opposed to a fault in the job itself.
    pub fn retriable(&self) -> bool {
        match self {
            SyncError::Mysql { source, .. } => match source {
                mysql_async::Error::Server(s) => matches!(s.code, 1205 | 1213 | 1927 | 1053),
                mysql_async::Error::Driver(_) | mysql_async::Error::Io(_) => true,
                _ => false,
            },
            SyncError::Postgres { source, .. } => match source.as_db_error() {
                // Connection exceptions, serialization failures, deadlocks, shutdowns.
                Some(db) => {
                    let c = db.code().code();
                    c.starts_with("08") || c.starts_with("40") || c.starts_with("57")
                }
                None => true,
            },
            SyncError::Io { .. } => true,
            SyncError::Bus { source, .. } => !matches!(
                source,
                rdkafka::error::KafkaError::ClientCreation(_)
                    | rdkafka::error::KafkaError::ClientConfig(..)
            ),
            _ => false,
        }
    }
}

use std::sync::Arc;

/// The reader for a table address; `bus` is set on the clients of a `kafka://` address.
pub fn reader_for(
    endpoint: &dsn::Endpoint,
    bus: &bus::ClientProperties,
) -> Result<Arc<dyn plugin::Reader>, SyncError> {
    match endpoint {
        dsn::Endpoint::Mysql { server, table } => Ok(Arc::new(mysql::MysqlTable::new(
            server.clone(),
            table.clone(),
        ))),
        dsn::Endpoint::Postgres {
            server,
            schema,
            table,
        } => Ok(Arc::new(postgres::PgTable::new(
            server.clone(),
            schema.clone(),
            table.clone(),
        ))),
        dsn::Endpoint::Parquet { .. } => Err(SyncError::Invalid(format!(
            "{} cannot be a source: Parquet is a target only",
            endpoint.describe()
        ))),
        dsn::Endpoint::File(spec) => Ok(Arc::new(files::FileTable::new(spec.clone()))),
        dsn::Endpoint::Bus(spec) => {
            Ok(Arc::new(bus::BusSource::new(spec.clone().with_client(bus))))
        }
    }
}

/// The source of a table: one address, or a sharded logical table when the addresses expand
/// (`{0000..1023}` ranges) to several physical tables or a shard column is asked for.
/// `filter` (SQL in the source's dialect) restricts the rows read; `bus` is set on the
/// clients of a `kafka://` address.
pub fn source_for(
    dsns: &[String],
    shard_column: Option<&str>,
    filter: Option<&str>,
    bus: &bus::ClientProperties,
) -> Result<Arc<dyn plugin::Reader>, SyncError> {
    let mut endpoints = Vec::new();
    for dsn in dsns {
        let expanded = shard::expand_braces(dsn).map_err(|reason| SyncError::Dsn {
            dsn: dsn::redact(dsn),
            reason,
        })?;
        for one in expanded {
            endpoints.push(dsn::Endpoint::parse(&one)?);
        }
    }
    if endpoints.len() > shard::MAX_SHARDS {
        return Err(SyncError::Invalid(format!(
            "{} shards: at most {} are supported",
            endpoints.len(),
            shard::MAX_SHARDS
        )));
    }
    match (endpoints.as_slice(), shard_column) {
        ([one], None) => filtered_reader_for(one, filter, bus),
        ([], _) => Err(SyncError::Invalid("no source table".into())),
        _ => {
            let mut shards = Vec::with_capacity(endpoints.len());
            for e in &endpoints {
                let name = match e {
                    dsn::Endpoint::Mysql { server, table } => {
                        format!("{}.{table}", server.database)
                    }
                    dsn::Endpoint::Postgres {
                        server,
                        schema,
                        table,
                    } => format!("{}.{schema}.{table}", server.database),
                    other => {
                        return Err(SyncError::Invalid(format!(
                            "{} cannot be a shard: shards are MariaDB/MySQL or PostgreSQL tables",
                            other.describe()
                        )))
                    }
                };
                shards.push(shard::Shard {
                    name,
                    reader: filtered_reader_for(e, filter, bus)?,
                });
            }
            Ok(Arc::new(shard::ShardedTable::new(
                shards,
                shard_column.map(str::to_string),
            )?))
        }
    }
}

fn filtered_reader_for(
    endpoint: &dsn::Endpoint,
    filter: Option<&str>,
    bus: &bus::ClientProperties,
) -> Result<Arc<dyn plugin::Reader>, SyncError> {
    let filter = filter.map(str::to_string);
    match (endpoint, filter) {
        (_, None) => reader_for(endpoint, bus),
        (dsn::Endpoint::Mysql { server, table }, filter) => Ok(Arc::new(
            mysql::MysqlTable::new(server.clone(), table.clone()).with_filter(filter),
        )),
        (
            dsn::Endpoint::Postgres {
                server,
                schema,
                table,
            },
            filter,
        ) => Ok(Arc::new(
            postgres::PgTable::new(server.clone(), schema.clone(), table.clone())
                .with_filter(filter),
        )),
        (other, Some(_)) => Err(SyncError::Invalid(format!(
            "{}: a row filter (where) needs a MariaDB/MySQL or PostgreSQL source",
            other.describe()
        ))),
    }
}

/// The writer for a table address; `bus` is set on the clients of a `kafka://` address.
pub fn writer_for(
    endpoint: &dsn::Endpoint,
    bus: &bus::ClientProperties,
) -> Result<Arc<dyn plugin::Writer>, SyncError> {
    match endpoint {
        dsn::Endpoint::Mysql { server, table } => Ok(Arc::new(mysql::MysqlWriter::new(
            mysql::MysqlTable::new(server.clone(), table.clone()),
        ))),
        dsn::Endpoint::Postgres {
            server,
            schema,
            table,
        } => Ok(Arc::new(postgres::PgWriter::new(postgres::PgTable::new(
            server.clone(),
            schema.clone(),
            table.clone(),
        )))),
        dsn::Endpoint::Parquet { dir, partition } => Ok(Arc::new(
            parquet_sink::ParquetWriter::new(dir.clone(), partition.clone()),
        )),
        dsn::Endpoint::File(spec) => Ok(Arc::new(files::FileWriter::new(spec.clone()))),
        dsn::Endpoint::Bus(spec) => Ok(Arc::new(bus::BusSink::new(spec.clone().with_client(bus)))),
    }
}

/// Run `statements` in order on the database of a MariaDB/MySQL or PostgreSQL table address
/// (a DataX writer's `preSql` / `postSql`).
pub async fn execute(endpoint: &dsn::Endpoint, statements: &[String]) -> Result<(), SyncError> {
    if statements.is_empty() {
        return Ok(());
    }
    match endpoint {
        dsn::Endpoint::Mysql { server, table } => {
            use mysql_async::prelude::Queryable;
            let mut conn = mysql::MysqlTable::new(server.clone(), table.clone())
                .connect()
                .await?;
            for sql in statements {
                conn.query_drop(sql.as_str())
                    .await
                    .map_err(|e| SyncError::mysql(format!("running {sql:?}"), e))?;
            }
            let _ = conn.disconnect().await;
            Ok(())
        }
        dsn::Endpoint::Postgres {
            server,
            schema,
            table,
        } => {
            let client = postgres::PgTable::new(server.clone(), schema.clone(), table.clone())
                .connect()
                .await?;
            for sql in statements {
                client
                    .batch_execute(sql)
                    .await
                    .map_err(|e| SyncError::pg(format!("running {sql:?}"), e))?;
            }
            Ok(())
        }
        other => Err(SyncError::Invalid(format!(
            "{}: SQL statements need a MariaDB/MySQL or PostgreSQL target",
            other.describe()
        ))),
    }
}
