//! MariaDB/MySQL reader and writer (mysql_async).
//!
//! Reader: one streaming text-protocol query per split (`SELECT … WHERE <range>`), rows
//! parsed into canonical batches as they arrive. Writer: one transaction per split. In insert
//! and truncate modes each batch is one `LOAD DATA LOCAL INFILE` streamed from memory (tab
//! separated, backslash escapes, binary as hex through `UNHEX`) under a savepoint; a batch
//! the server refuses or takes with warnings is rolled back to the savepoint and written
//! again as multi-row `INSERT` statements (about 1 MiB each; `ON DUPLICATE KEY UPDATE` for
//! upsert, which always uses them); a statement the server refuses for its data is retried
//! row by row so only the offending rows become dirty. Sessions run with
//! `time_zone = '+00:00'` and utf8mb4.

use std::sync::Arc;

use arrow_array::RecordBatch;
use mysql_async::prelude::Queryable;
use tokio::sync::mpsc;

use crate::dirty::DirtyLog;
use crate::dsn::Server;
use crate::plugin::{Reader, Rejected, SplitWriter, WriteMode, Writer};
use crate::split::{ranges_from_sample, KeyValue, Split};
use crate::types::{cell, BatchBuilder, CanonicalType, CellRef, Column, TableSchema};
use crate::SyncError;

/// Rows sampled to find split boundaries.
const SAMPLE_ROWS: u64 = 20_000;
/// Target size of one INSERT statement.
const STATEMENT_BYTES: usize = 1 << 20;

pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A string literal; escapes what the server's default (backslash-escaping) mode needs.
pub fn quote_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{1a}' => out.push_str("\\Z"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn literal(out: &mut String, c: CellRef<'_>) {
    match c {
        CellRef::Null => out.push_str("NULL"),
        CellRef::Bool(v) => out.push(if v { '1' } else { '0' }),
        CellRef::Int(v) => out.push_str(&v.to_string()),
        CellRef::Bytes(b) => {
            out.push_str("X'");
            out.push_str(&crate::types::hex(b));
            out.push('\'');
        }
        CellRef::Text(s) => out.push_str(&quote_text(s)),
        CellRef::Float(v) if v.is_finite() => out.push_str(&crate::types::render_float(v)),
        CellRef::Decimal(..) => out.push_str(&c.render().unwrap_or_default()),
        other => out.push_str(&quote_text(&other.render_naive().unwrap_or_default())),
    }
}

/// One MariaDB/MySQL table.
#[derive(Debug, Clone)]
pub struct MysqlTable {
    server: Server,
    table: String,
    /// A row filter (SQL, the source's dialect) ANDed to every read of the table.
    filter: Option<String>,
}

impl MysqlTable {
    pub fn new(server: Server, table: String) -> Self {
        MysqlTable {
            server,
            table,
            filter: None,
        }
    }

    /// Read only the rows matching `filter` (a MariaDB/MySQL boolean expression).
    pub fn with_filter(mut self, filter: Option<String>) -> Self {
        self.filter = filter;
        self
    }

    /// ` AND (filter)` or nothing.
    fn and_filter(&self) -> String {
        self.filter
            .as_ref()
            .map(|f| format!(" AND ({f})"))
            .unwrap_or_default()
    }

    fn qualified(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.server.database),
            quote_ident(&self.table)
        )
    }

    fn display(&self) -> String {
        format!("{}.{}", self.server.database, self.table)
    }

    pub(crate) async fn connect(&self) -> Result<mysql_async::Conn, SyncError> {
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(self.server.host.clone())
            .tcp_port(self.server.port.unwrap_or(3306))
            .user(self.server.user.clone())
            .pass(self.server.password.clone())
            .db_name(Some(self.server.database.clone()))
            .prefer_socket(false)
            .init(vec!["SET NAMES utf8mb4", "SET time_zone = '+00:00'"]);
        mysql_async::Conn::new(opts).await.map_err(|e| {
            SyncError::mysql(
                format!(
                    "connecting to MariaDB/MySQL at {}:{} database {}",
                    self.server.host,
                    self.server.port.unwrap_or(3306),
                    self.server.database
                ),
                e,
            )
        })
    }

    async fn load_schema(&self, conn: &mut mysql_async::Conn) -> Result<TableSchema, SyncError> {
        type ColRow = (String, String, String, Option<u64>, Option<u64>, String);
        let rows: Vec<ColRow> = conn
            .exec(
                "SELECT CAST(column_name AS CHAR), CAST(LOWER(data_type) AS CHAR), \
                 CAST(LOWER(column_type) AS CHAR), numeric_precision, numeric_scale, \
                 CAST(is_nullable AS CHAR) \
                 FROM information_schema.columns WHERE table_schema = ? AND table_name = ? \
                 ORDER BY ordinal_position",
                (self.server.database.as_str(), self.table.as_str()),
            )
            .await
            .map_err(|e| {
                SyncError::mysql(format!("reading the columns of {}", self.display()), e)
            })?;
        if rows.is_empty() {
            return Err(SyncError::UnknownTable {
                table: format!("{} (MariaDB/MySQL)", self.display()),
            });
        }
        let mut columns = Vec::with_capacity(rows.len());
        for (name, data_type, column_type, precision, scale, nullable) in rows {
            let unsupported = || SyncError::UnsupportedType {
                table: self.display(),
                column: name.clone(),
                native: column_type.clone(),
            };
            let unsigned = column_type.contains("unsigned");
            let ty = match data_type.as_str() {
                "tinyint" if column_type.starts_with("tinyint(1)") && !unsigned => {
                    CanonicalType::Bool
                }
                "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "year" => {
                    CanonicalType::Int64
                }
                "bigint" if unsigned => CanonicalType::Decimal {
                    precision: 20,
                    scale: 0,
                },
                "bigint" => CanonicalType::Int64,
                "float" | "double" | "real" => CanonicalType::Float64,
                "decimal" | "numeric" => {
                    let p = precision.unwrap_or(10);
                    let s = scale.unwrap_or(0);
                    if p > 38 {
                        return Err(unsupported());
                    }
                    CanonicalType::Decimal {
                        precision: p as u8,
                        scale: s as i8,
                    }
                }
                "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "enum"
                | "set" | "json" | "uuid" | "inet4" | "inet6" => CanonicalType::Utf8,
                "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                    CanonicalType::Binary
                }
                "date" => CanonicalType::Date,
                "time" => CanonicalType::Time,
                "datetime" => CanonicalType::Timestamp,
                "timestamp" => CanonicalType::TimestampTz,
                _ => return Err(unsupported()),
            };
            columns.push(Column {
                name,
                ty,
                nullable: nullable == "YES",
                native: column_type,
            });
        }
        let primary_key: Vec<String> = conn
            .exec(
                "SELECT CAST(column_name AS CHAR) FROM information_schema.statistics \
                 WHERE table_schema = ? AND table_name = ? AND index_name = 'PRIMARY' \
                 ORDER BY seq_in_index",
                (self.server.database.as_str(), self.table.as_str()),
            )
            .await
            .map_err(|e| SyncError::mysql(format!("reading the key of {}", self.display()), e))?;
        Ok(TableSchema {
            columns,
            primary_key,
        })
    }
}

/// The split column: `split_pk`, else a single-column primary key.
pub(crate) fn split_column<'a>(
    table: &str,
    schema: &'a TableSchema,
    split_pk: Option<&str>,
) -> Result<Option<&'a Column>, SyncError> {
    match split_pk {
        Some(name) => schema
            .column(name)
            .map(Some)
            .ok_or_else(|| SyncError::UnknownColumn {
                table: table.to_string(),
                column: name.to_string(),
            }),
        None if schema.primary_key.len() == 1 => Ok(schema.column(&schema.primary_key[0])),
        None => Ok(None),
    }
}

pub(crate) fn key_value(ty: CanonicalType, raw: &[u8]) -> KeyValue {
    let text = String::from_utf8_lossy(raw).into_owned();
    match (ty, text.parse::<i64>()) {
        (CanonicalType::Int64, Ok(i)) => KeyValue::Int(i),
        _ => KeyValue::Text(text),
    }
}

#[async_trait::async_trait]
impl Reader for MysqlTable {
    fn name(&self) -> String {
        self.display()
    }

    fn server(&self) -> String {
        format!("{}:{}", self.server.host, self.server.port.unwrap_or(3306))
    }

    async fn estimate_rows(&self) -> Option<u64> {
        let mut conn = self.connect().await.ok()?;
        let rows: Option<Option<u64>> = conn
            .exec_first(
                "SELECT table_rows FROM information_schema.tables \
                 WHERE table_schema = ? AND table_name = ?",
                (self.server.database.as_str(), self.table.as_str()),
            )
            .await
            .ok()?;
        let _ = conn.disconnect().await;
        rows.flatten()
    }

    async fn schema(&self) -> Result<TableSchema, SyncError> {
        let mut conn = self.connect().await?;
        let schema = self.load_schema(&mut conn).await;
        let _ = conn.disconnect().await;
        schema
    }

    async fn splits(
        &self,
        schema: &TableSchema,
        split_pk: Option<&str>,
        max_splits: usize,
    ) -> Result<Vec<Split>, SyncError> {
        let Some(col) = split_column(&self.display(), schema, split_pk)? else {
            return Ok(vec![Split::whole(0)]);
        };
        if max_splits <= 1 {
            return Ok(vec![Split::whole(0)]);
        }
        let mut conn = self.connect().await?;
        let count: Option<u64> = conn
            .query_first(format!(
                "SELECT COUNT(*) FROM {} WHERE 1=1{}",
                self.qualified(),
                self.and_filter()
            ))
            .await
            .map_err(|e| SyncError::mysql(format!("counting {}", self.display()), e))?;
        let count = count.unwrap_or(0);
        let fraction = if count <= SAMPLE_ROWS {
            1.0
        } else {
            SAMPLE_ROWS as f64 / count as f64
        };
        let key = quote_ident(&col.name);
        let sql = format!(
            "SELECT {key} FROM {} WHERE {key} IS NOT NULL AND RAND() < {fraction}{} ORDER BY {key}",
            self.qualified(),
            self.and_filter()
        );
        let mut sample = Vec::new();
        let mut result = conn
            .query_iter(sql)
            .await
            .map_err(|e| SyncError::mysql(format!("sampling {}", self.display()), e))?;
        while let Some(row) = result
            .next()
            .await
            .map_err(|e| SyncError::mysql(format!("sampling {}", self.display()), e))?
        {
            if let Some(mysql_async::Value::Bytes(b)) = row.as_ref(0) {
                sample.push(key_value(col.ty, b));
            }
        }
        drop(result);
        let _ = conn.disconnect().await;
        Ok(ranges_from_sample(
            &col.name,
            &sample,
            max_splits,
            col.nullable,
        ))
    }

    async fn read(
        &self,
        schema: &TableSchema,
        split: &Split,
        batch_rows: usize,
        out: mpsc::Sender<RecordBatch>,
        dirty: &DirtyLog,
    ) -> Result<(), SyncError> {
        let mut conn = self.connect().await?;
        let cols: Vec<String> = schema
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {}{}",
            cols.join(", "),
            self.qualified(),
            split.predicate(quote_ident, quote_text),
            self.and_filter()
        );
        let context = || format!("reading {} split {}", self.display(), split.describe());
        let mut builder = BatchBuilder::new(schema);
        let mut result = conn
            .query_iter(sql)
            .await
            .map_err(|e| SyncError::mysql(context(), e))?;
        while let Some(row) = result
            .next()
            .await
            .map_err(|e| SyncError::mysql(context(), e))?
        {
            let values = row.unwrap();
            // The text protocol sends every value as bytes; anything else is rendered.
            let rendered: Vec<Option<Vec<u8>>>;
            let cells: Vec<Option<&[u8]>> = if values
                .iter()
                .all(|v| matches!(v, mysql_async::Value::Bytes(_) | mysql_async::Value::NULL))
            {
                values
                    .iter()
                    .map(|v| match v {
                        mysql_async::Value::Bytes(b) => Some(b.as_slice()),
                        _ => None,
                    })
                    .collect()
            } else {
                rendered = values
                    .iter()
                    .map(|v| match v {
                        mysql_async::Value::NULL => None,
                        mysql_async::Value::Bytes(b) => Some(b.clone()),
                        other => Some(other.as_sql(true).trim_matches('\'').as_bytes().to_vec()),
                    })
                    .collect();
                rendered.iter().map(|c| c.as_deref()).collect()
            };
            if let Err(e) = builder.push_text_row(&cells) {
                dirty_row(dirty, split, &schema.columns, &cells, &e.to_string())?;
            }
            if (builder.rows() >= batch_rows || builder.bytes() >= crate::job::BATCH_BYTES)
                && out.send(builder.finish()).await.is_err()
            {
                return Ok(());
            }
        }
        drop(result);
        if builder.rows() > 0 {
            let _ = out.send(builder.finish()).await;
        }
        let _ = conn.disconnect().await;
        Ok(())
    }
}

pub(crate) fn dirty_row(
    dirty: &DirtyLog,
    split: &Split,
    columns: &[Column],
    cells: &[Option<&[u8]>],
    reason: &str,
) -> Result<(), SyncError> {
    let row: serde_json::Map<String, serde_json::Value> = columns
        .iter()
        .zip(cells)
        .map(|(c, v)| {
            (
                c.name.clone(),
                v.map_or(serde_json::Value::Null, |b| {
                    serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                }),
            )
        })
        .collect();
    dirty.record(split.index, reason, serde_json::Value::Object(row))
}

/// Writes into one MariaDB/MySQL table.
#[derive(Debug)]
pub struct MysqlWriter {
    table: MysqlTable,
    state: std::sync::Mutex<Option<(TableSchema, WriteMode)>>,
}

impl MysqlWriter {
    pub fn new(table: MysqlTable) -> Self {
        MysqlWriter {
            table,
            state: std::sync::Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl Writer for MysqlWriter {
    fn name(&self) -> String {
        self.table.display()
    }

    async fn prepare(&self, schema: &TableSchema, mode: WriteMode) -> Result<(), SyncError> {
        let mut conn = self.table.connect().await?;
        let target = self.table.load_schema(&mut conn).await?;
        for c in &schema.columns {
            if target.column(&c.name).is_none() {
                return Err(SyncError::UnknownColumn {
                    table: self.table.display(),
                    column: c.name.clone(),
                });
            }
        }
        if mode == WriteMode::Upsert && target.primary_key.is_empty() {
            return Err(SyncError::Invalid(format!(
                "mode upsert needs a primary key on {}",
                self.table.display()
            )));
        }
        if mode == WriteMode::Truncate {
            conn.query_drop(format!("TRUNCATE TABLE {}", self.table.qualified()))
                .await
                .map_err(|e| SyncError::mysql(format!("truncating {}", self.table.display()), e))?;
        }
        let _ = conn.disconnect().await;
        *self
            .state
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))? =
            Some((schema.clone(), mode));
        Ok(())
    }

    async fn open(&self, _split: &Split, _attempt: u32) -> Result<Box<dyn SplitWriter>, SyncError> {
        let (schema, mode) = self
            .state
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))?
            .clone()
            .ok_or_else(|| SyncError::Internal("open before prepare".into()))?;
        let mut conn = self.table.connect().await?;
        conn.query_drop("START TRANSACTION")
            .await
            .map_err(|e| SyncError::mysql("starting a transaction", e))?;
        let cols: Vec<String> = schema
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let head = format!(
            "INSERT INTO {} ({}) VALUES ",
            self.table.qualified(),
            cols.join(", ")
        );
        let tail = if mode == WriteMode::Upsert {
            let updates: Vec<String> = cols.iter().map(|c| format!("{c} = VALUES({c})")).collect();
            format!(" ON DUPLICATE KEY UPDATE {}", updates.join(", "))
        } else {
            String::new()
        };
        // Insert and truncate stream each batch with LOAD DATA LOCAL INFILE; upsert keeps
        // `INSERT … ON DUPLICATE KEY UPDATE`, which updates in place (LOAD DATA's REPLACE
        // deletes and re-inserts, firing delete cascades and resetting unlisted columns).
        let load = (mode != WriteMode::Upsert).then(|| {
            let mut targets = Vec::with_capacity(schema.columns.len());
            let mut sets = Vec::new();
            for (i, c) in schema.columns.iter().enumerate() {
                if c.ty == CanonicalType::Binary {
                    targets.push(format!("@b{i}"));
                    sets.push(format!("{} = UNHEX(@b{i})", quote_ident(&c.name)));
                } else {
                    targets.push(quote_ident(&c.name));
                }
            }
            let set = if sets.is_empty() {
                String::new()
            } else {
                format!(" SET {}", sets.join(", "))
            };
            format!(
                "LOAD DATA LOCAL INFILE 'qanat-batch' INTO TABLE {} CHARACTER SET utf8mb4 \
                 FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' LINES TERMINATED BY '\\n' ({}){set}",
                self.table.qualified(),
                targets.join(", ")
            )
        });
        tracing::debug!(table = %self.table.display(),
            statement = %load.as_deref().unwrap_or(&head), "split writer");
        Ok(Box::new(MysqlSplitWriter {
            conn: Some(conn),
            head,
            tail,
            load,
            table: self.table.display(),
        }))
    }

    async fn commit(&self) -> Result<(), SyncError> {
        Ok(())
    }

    async fn abort(&self) -> Option<String> {
        match self
            .state
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|(_, m)| *m))
        {
            Some(WriteMode::Truncate) => Some(format!(
                "{} was truncated and holds only the splits that completed",
                self.table.display()
            )),
            _ => None,
        }
    }

    fn verifier(&self) -> Option<Arc<dyn Reader>> {
        Some(Arc::new(self.table.clone()))
    }
}

struct MysqlSplitWriter {
    conn: Option<mysql_async::Conn>,
    head: String,
    tail: String,
    /// The LOAD DATA statement, while the server accepts LOCAL INFILE.
    load: Option<String>,
    table: String,
}

/// One cell in the LOAD DATA text form the writer declares (tab-separated, backslash
/// escapes, `\N` for NULL); binary values go as hex through `UNHEX()`.
fn load_cell(out: &mut Vec<u8>, c: CellRef<'_>) {
    match c {
        CellRef::Null => out.extend_from_slice(b"\\N"),
        CellRef::Bool(v) => out.push(if v { b'1' } else { b'0' }),
        CellRef::Int(v) => out.extend_from_slice(v.to_string().as_bytes()),
        CellRef::Bytes(b) => out.extend_from_slice(crate::types::hex(b).as_bytes()),
        CellRef::Text(s) => crate::pgcopy::escape_into(out, s.as_bytes()),
        other => {
            if let Some(s) = other.render_naive() {
                crate::pgcopy::escape_into(out, s.as_bytes());
            }
        }
    }
}

fn load_rows(batch: &RecordBatch) -> Vec<u8> {
    let mut buf = Vec::with_capacity(batch.num_rows() * 64);
    for row in 0..batch.num_rows() {
        for (i, col) in batch.columns().iter().enumerate() {
            if i > 0 {
                buf.push(b'\t');
            }
            load_cell(&mut buf, cell(col.as_ref(), row));
        }
        buf.push(b'\n');
    }
    buf
}

impl MysqlSplitWriter {
    fn row_values(batch: &RecordBatch, row: usize, out: &mut String) {
        out.push('(');
        for (i, col) in batch.columns().iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            literal(out, cell(col.as_ref(), row));
        }
        out.push(')');
    }

    async fn run(&mut self, sql: &str) -> Result<Result<(), String>, SyncError> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| SyncError::Internal("split writer used after finish".into()))?;
        match conn.query_drop(sql).await {
            Ok(()) => Ok(Ok(())),
            // Refused for its data (and the transaction lives on): the caller decides.
            Err(mysql_async::Error::Server(e)) if !matches!(e.code, 1205 | 1213 | 1927 | 1053) => {
                Ok(Err(format!("{} ({})", e.message, e.code)))
            }
            Err(e) => Err(SyncError::mysql(format!("writing {}", self.table), e)),
        }
    }

    /// Run one multi-row statement; when the server refuses it for its data, find the
    /// offending rows one by one.
    async fn write_chunk(
        &mut self,
        sql: &str,
        batch: &RecordBatch,
        rows: std::ops::Range<usize>,
        rejected: &mut Vec<Rejected>,
    ) -> Result<(), SyncError> {
        if self.run(sql).await?.is_err() {
            for row in rows {
                let mut one = self.head.clone();
                Self::row_values(batch, row, &mut one);
                one.push_str(&self.tail);
                if let Err(reason) = self.run(&one).await? {
                    rejected.push((row, reason));
                }
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl SplitWriter for MysqlSplitWriter {
    async fn write(&mut self, batch: &RecordBatch) -> Result<Vec<Rejected>, SyncError> {
        if batch.num_rows() == 0 {
            return Ok(Vec::new());
        }
        if self.load_batch(batch).await? {
            return Ok(Vec::new());
        }
        self.insert_batch(batch).await
    }

    async fn finish(mut self: Box<Self>) -> Result<(), SyncError> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| SyncError::Internal("split writer finished twice".into()))?;
        conn.query_drop("COMMIT")
            .await
            .map_err(|e| SyncError::mysql(format!("committing into {}", self.table), e))?;
        let _ = conn.disconnect().await;
        Ok(())
    }
}

impl MysqlSplitWriter {
    /// Write the batch with one LOAD DATA LOCAL INFILE under a savepoint. `false` when it was
    /// not written: the server refused it, or took it with warnings (LOCAL turns duplicate
    /// keys and bad values into warnings), so the caller writes it with INSERTs, which name
    /// the offending rows.
    async fn load_batch(&mut self, batch: &RecordBatch) -> Result<bool, SyncError> {
        let Some(load) = self.load.clone() else {
            return Ok(false);
        };
        let table = self.table.clone();
        let fail = |e| SyncError::mysql(format!("writing {table}"), e);
        let data = bytes::Bytes::from(load_rows(batch));
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| SyncError::Internal("split writer used after finish".into()))?;
        conn.query_drop("SAVEPOINT qanat_batch")
            .await
            .map_err(fail)?;
        conn.set_infile_handler(async move {
            use futures_util::StreamExt;
            let chunks: Vec<std::io::Result<bytes::Bytes>> = (0..data.len())
                .step_by(1 << 20)
                .map(|at| Ok(data.slice(at..(at + (1 << 20)).min(data.len()))))
                .collect();
            Ok(futures_util::stream::iter(chunks).boxed())
        });
        let clean = match conn.query_drop(load.as_str()).await {
            Ok(()) => conn.affected_rows() == batch.num_rows() as u64 && conn.get_warnings() == 0,
            // LOCAL INFILE is disabled on the server or the client side: INSERTs from now on.
            Err(mysql_async::Error::Server(e)) if matches!(e.code, 1148 | 3948 | 4166) => {
                tracing::info!(table = %self.table, reason = %e.message,
                    "LOAD DATA LOCAL INFILE refused; writing with INSERT");
                self.load = None;
                false
            }
            Err(mysql_async::Error::Server(e)) if !matches!(e.code, 1205 | 1213 | 1927 | 1053) => {
                false
            }
            Err(e) => return Err(fail(e)),
        };
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| SyncError::Internal("split writer used after finish".into()))?;
        let end = if clean {
            "RELEASE SAVEPOINT qanat_batch"
        } else {
            "ROLLBACK TO SAVEPOINT qanat_batch"
        };
        conn.query_drop(end).await.map_err(fail)?;
        Ok(clean)
    }

    async fn insert_batch(&mut self, batch: &RecordBatch) -> Result<Vec<Rejected>, SyncError> {
        let mut rejected = Vec::new();
        let rows = batch.num_rows();
        let mut sql = String::with_capacity(STATEMENT_BYTES + 64 * 1024);
        let mut start = 0;
        for row in 0..rows {
            if sql.is_empty() {
                sql.push_str(&self.head);
            } else {
                sql.push_str(", ");
            }
            Self::row_values(batch, row, &mut sql);
            if sql.len() >= STATEMENT_BYTES || row + 1 == rows {
                sql.push_str(&self.tail);
                self.write_chunk(&sql, batch, start..row + 1, &mut rejected)
                    .await?;
                sql.clear();
                start = row + 1;
            }
        }
        Ok(rejected)
    }
}
