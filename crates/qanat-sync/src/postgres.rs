//! PostgreSQL reader and writer (tokio-postgres).
//!
//! Reader: `COPY (SELECT … WHERE <range>) TO STDOUT` per split, text format, parsed as it
//! streams. Writer: one transaction per split; each batch is one `COPY … FROM STDIN` under a
//! savepoint, in binary form (`pgbinary`) when every column pair has a binary encoder, else
//! in text form; a batch the server refuses for its data is replayed row by row so only the
//! offending rows become dirty. Upsert copies into a temporary staging table and merges with
//! `INSERT … ON CONFLICT (pk) DO UPDATE`. Sessions run in UTC with ISO dates.

use std::pin::pin;
use std::sync::Arc;

use arrow_array::RecordBatch;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::dirty::DirtyLog;
use crate::dsn::Server;
use crate::mysql::{dirty_row, key_value, split_column};
use crate::pgbinary::BinaryPlan;
use crate::pgcopy::{encode_cell, LineSplitter};
use crate::plugin::{Reader, Rejected, SplitWriter, WriteMode, Writer};
use crate::split::{ranges_from_sample, Split};
use crate::types::{cell, BatchBuilder, CanonicalType, Column, TableSchema};
use crate::SyncError;

const SAMPLE_ROWS: f64 = 20_000.0;

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn quote_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One PostgreSQL table.
#[derive(Debug, Clone)]
pub struct PgTable {
    server: Server,
    schema: String,
    table: String,
    /// A row filter (SQL, the source's dialect) ANDed to every read of the table.
    filter: Option<String>,
}

/// The canonical type of a `format_type()` name; `None` when unsupported.
pub fn canonical_of(native: &str) -> Option<CanonicalType> {
    let base = native.split('(').next().unwrap_or(native).trim();
    Some(match base {
        "boolean" => CanonicalType::Bool,
        "smallint" | "integer" | "bigint" => CanonicalType::Int64,
        "real" | "double precision" => CanonicalType::Float64,
        "numeric" => {
            let args = native.strip_prefix("numeric(")?.strip_suffix(')');
            match args {
                Some(args) => {
                    let (p, s) = args.split_once(',').unwrap_or((args, "0"));
                    let precision: u8 = p.trim().parse().ok()?;
                    let scale: i8 = s.trim().parse().ok()?;
                    if precision > 38 || scale < 0 {
                        return None;
                    }
                    CanonicalType::Decimal { precision, scale }
                }
                None => return None,
            }
        }
        "text" | "character varying" | "character" | "json" | "jsonb" | "uuid" | "citext"
        | "inet" | "cidr" | "xml" => CanonicalType::Utf8,
        "bytea" => CanonicalType::Binary,
        "date" => CanonicalType::Date,
        _ if base.starts_with("time") && native.ends_with("without time zone") => {
            if base.starts_with("timestamp") {
                CanonicalType::Timestamp
            } else {
                CanonicalType::Time
            }
        }
        _ if base.starts_with("timestamp") && native.ends_with("with time zone") => {
            CanonicalType::TimestampTz
        }
        _ => return None,
    })
}

impl PgTable {
    pub fn new(server: Server, schema: String, table: String) -> Self {
        PgTable {
            server,
            schema,
            table,
            filter: None,
        }
    }

    /// Read only the rows matching `filter` (a PostgreSQL boolean expression).
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
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    fn display(&self) -> String {
        format!("{}/{}.{}", self.server.database, self.schema, self.table)
    }

    pub(crate) async fn connect(&self) -> Result<tokio_postgres::Client, SyncError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.server.host)
            .port(self.server.port.unwrap_or(5432))
            .dbname(&self.server.database)
            .application_name("qanat-sync");
        config.user(self.server.user.as_deref().unwrap_or("postgres"));
        if let Some(p) = &self.server.password {
            config.password(p);
        }
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
            SyncError::pg(
                format!(
                    "connecting to PostgreSQL at {}:{} database {}",
                    self.server.host,
                    self.server.port.unwrap_or(5432),
                    self.server.database
                ),
                e,
            )
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        client
            .batch_execute(
                "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3; \
                 SET bytea_output = 'hex'; SET client_encoding = 'UTF8'; \
                 SET IntervalStyle = 'iso_8601'",
            )
            .await
            .map_err(|e| SyncError::pg("setting up the session", e))?;
        Ok(client)
    }

    async fn load_schema(&self, client: &tokio_postgres::Client) -> Result<TableSchema, SyncError> {
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 \
                 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
                 ORDER BY a.attnum",
                &[&self.schema, &self.table],
            )
            .await
            .map_err(|e| SyncError::pg(format!("reading the columns of {}", self.display()), e))?;
        if rows.is_empty() {
            return Err(SyncError::UnknownTable {
                table: format!("{} (PostgreSQL)", self.display()),
            });
        }
        let mut columns = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.get(0);
            let native: String = row.get(1);
            let nullable: bool = row.get(2);
            let ty = canonical_of(&native).ok_or_else(|| SyncError::UnsupportedType {
                table: self.display(),
                column: name.clone(),
                native: native.clone(),
            })?;
            columns.push(Column {
                name,
                ty,
                nullable,
                native,
            });
        }
        let key_rows = client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 JOIN pg_class c ON c.oid = i.indrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&self.schema, &self.table],
            )
            .await
            .map_err(|e| SyncError::pg(format!("reading the key of {}", self.display()), e))?;
        Ok(TableSchema {
            columns,
            primary_key: key_rows.iter().map(|r| r.get(0)).collect(),
        })
    }
}

#[async_trait::async_trait]
impl Reader for PgTable {
    fn name(&self) -> String {
        self.display()
    }

    fn server(&self) -> String {
        format!("{}:{}", self.server.host, self.server.port.unwrap_or(5432))
    }

    async fn estimate_rows(&self) -> Option<u64> {
        let client = self.connect().await.ok()?;
        let row = client
            .query_opt(
                "SELECT GREATEST(c.reltuples, 0)::float8 FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&self.schema, &self.table],
            )
            .await
            .ok()??;
        let n: f64 = row.get(0);
        Some(n as u64)
    }

    async fn schema(&self) -> Result<TableSchema, SyncError> {
        let client = self.connect().await?;
        self.load_schema(&client).await
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
        let client = self.connect().await?;
        let count: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE 1=1{}",
                    self.qualified(),
                    self.and_filter()
                ),
                &[],
            )
            .await
            .map_err(|e| SyncError::pg(format!("counting {}", self.display()), e))?
            .get(0);
        let percent = if count as f64 <= SAMPLE_ROWS {
            100.0
        } else {
            100.0 * SAMPLE_ROWS / count as f64
        };
        let key = quote_ident(&col.name);
        // The store sorts the sample, so text keys follow the column's collation.
        let sql = format!(
            "COPY (SELECT {key} FROM {} TABLESAMPLE BERNOULLI ({percent}) \
             WHERE {key} IS NOT NULL{} ORDER BY {key}) TO STDOUT",
            self.qualified(),
            self.and_filter()
        );
        let stream = client
            .copy_out(sql.as_str())
            .await
            .map_err(|e| SyncError::pg(format!("sampling {}", self.display()), e))?;
        let mut stream = pin!(stream);
        let mut splitter = LineSplitter::default();
        let mut sample = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| SyncError::pg(format!("sampling {}", self.display()), e))?;
            splitter
                .feed::<()>(&chunk, |cells| {
                    if let Some(Some(v)) = cells.first() {
                        sample.push(key_value(col.ty, v));
                    }
                    Ok(())
                })
                .ok();
        }
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
        let client = self.connect().await?;
        let cols: Vec<String> = schema
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let sql = format!(
            "COPY (SELECT {} FROM {} WHERE {}{}) TO STDOUT",
            cols.join(", "),
            self.qualified(),
            split.predicate(quote_ident, quote_text),
            self.and_filter()
        );
        let context = || format!("reading {} split {}", self.display(), split.describe());
        let stream = client
            .copy_out(sql.as_str())
            .await
            .map_err(|e| SyncError::pg(context(), e))?;
        let mut stream = pin!(stream);
        let mut splitter = LineSplitter::default();
        let mut builder = BatchBuilder::new(schema);
        let mut ready: Vec<RecordBatch> = Vec::new();
        let binary: Vec<bool> = schema
            .columns
            .iter()
            .map(|c| c.ty == CanonicalType::Binary)
            .collect();
        let any_binary = binary.iter().any(|b| *b);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| SyncError::pg(context(), e))?;
            splitter.feed(&chunk, |cells| -> Result<(), SyncError> {
                let decoded_cells: Vec<Option<&[u8]>>;
                if cells.len() != schema.columns.len() {
                    return Err(SyncError::Internal(format!(
                        "COPY row with {} fields, expected {}",
                        cells.len(),
                        schema.columns.len()
                    )));
                }
                // bytea arrives in its hex output form `\x…`.
                let decoded: Vec<Option<Vec<u8>>>;
                let cells: &[Option<&[u8]>] = if any_binary {
                    decoded = cells
                        .iter()
                        .zip(&binary)
                        .map(|(c, is_bin)| match (c, is_bin) {
                            (Some(v), true) => Some(decode_bytea(v)),
                            (Some(v), false) => Some(v.to_vec()),
                            (None, _) => None,
                        })
                        .collect();
                    decoded_cells = decoded.iter().map(|c| c.as_deref()).collect();
                    &decoded_cells
                } else {
                    cells
                };
                if let Err(e) = builder.push_text_row(cells) {
                    dirty_row(dirty, split, &schema.columns, cells, &e.to_string())?;
                }
                if builder.rows() >= batch_rows || builder.bytes() >= crate::job::BATCH_BYTES {
                    ready.push(builder.finish());
                }
                Ok(())
            })?;
            for batch in ready.drain(..) {
                if out.send(batch).await.is_err() {
                    return Ok(());
                }
            }
        }
        if builder.rows() > 0 {
            let _ = out.send(builder.finish()).await;
        }
        Ok(())
    }
}

/// bytea's hex output form `\x0aff` as bytes; anything else is kept as it is.
fn decode_bytea(v: &[u8]) -> Vec<u8> {
    let Some(hex) = v.strip_prefix(b"\\x") else {
        return v.to_vec();
    };
    let digit = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks(2) {
        match (
            pair.first().and_then(|b| digit(*b)),
            pair.get(1).and_then(|b| digit(*b)),
        ) {
            (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
            _ => return v.to_vec(),
        }
    }
    out
}

/// Writes into one PostgreSQL table.
#[derive(Debug)]
pub struct PgWriter {
    table: PgTable,
    state: std::sync::Mutex<Option<(TableSchema, WriteMode, Vec<String>)>>,
}

impl PgWriter {
    pub fn new(table: PgTable) -> Self {
        PgWriter {
            table,
            state: std::sync::Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl Writer for PgWriter {
    fn name(&self) -> String {
        self.table.display()
    }

    async fn prepare(&self, schema: &TableSchema, mode: WriteMode) -> Result<(), SyncError> {
        let client = self.table.connect().await?;
        let target = self.table.load_schema(&client).await?;
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
            client
                .batch_execute(&format!("TRUNCATE TABLE {}", self.table.qualified()))
                .await
                .map_err(|e| SyncError::pg(format!("truncating {}", self.table.display()), e))?;
        }
        *self
            .state
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))? =
            Some((schema.clone(), mode, target.primary_key));
        Ok(())
    }

    async fn open(&self, _split: &Split, _attempt: u32) -> Result<Box<dyn SplitWriter>, SyncError> {
        let (schema, mode, pk) = self
            .state
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))?
            .clone()
            .ok_or_else(|| SyncError::Internal("open before prepare".into()))?;
        let client = self.table.connect().await?;
        let ctx = |e| {
            SyncError::pg(
                format!("opening a transaction on {}", self.table.display()),
                e,
            )
        };
        client.batch_execute("BEGIN").await.map_err(ctx)?;
        let cols: Vec<String> = schema
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let col_list = cols.join(", ");
        let (copy_target, merge) = if mode == WriteMode::Upsert {
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE qanat_stage (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
                    self.table.qualified()
                ))
                .await
                .map_err(ctx)?;
            let key: Vec<String> = pk.iter().map(|k| quote_ident(k)).collect();
            let updates: Vec<String> = cols
                .iter()
                .filter(|c| !key.contains(c))
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            let action = if updates.is_empty() {
                "NOTHING".to_string()
            } else {
                format!("UPDATE SET {}", updates.join(", "))
            };
            (
                "qanat_stage".to_string(),
                Some(format!(
                    "INSERT INTO {} ({col_list}) SELECT {col_list} FROM qanat_stage \
                     ON CONFLICT ({}) DO {action}; TRUNCATE qanat_stage",
                    self.table.qualified(),
                    key.join(", ")
                )),
            )
        } else {
            (self.table.qualified(), None)
        };
        // The target's column types decide between binary COPY and the text form.
        let probe = client
            .prepare(&format!("SELECT {col_list} FROM {copy_target} LIMIT 0"))
            .await
            .map_err(ctx)?;
        let target_types: Vec<tokio_postgres::types::Type> =
            probe.columns().iter().map(|c| c.type_().clone()).collect();
        let source_types: Vec<CanonicalType> = schema.columns.iter().map(|c| c.ty).collect();
        let binary = BinaryPlan::new(&source_types, &target_types);
        let copy = match binary {
            Some(_) => format!("COPY {copy_target} ({col_list}) FROM STDIN (FORMAT binary)"),
            None => format!("COPY {copy_target} ({col_list}) FROM STDIN"),
        };
        tracing::debug!(table = %self.table.display(), statement = %copy, "split writer");
        Ok(Box::new(PgSplitWriter {
            client,
            copy,
            binary,
            merge,
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
            .and_then(|s| s.as_ref().map(|(_, m, _)| *m))
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

struct PgSplitWriter {
    client: tokio_postgres::Client,
    copy: String,
    /// Binary COPY when every column has a binary encoder, else the text form.
    binary: Option<BinaryPlan>,
    merge: Option<String>,
    table: String,
}

fn encode_text_rows(batch: &RecordBatch, rows: std::ops::Range<usize>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(rows.len() * 64);
    for row in rows {
        for (i, col) in batch.columns().iter().enumerate() {
            if i > 0 {
                buf.push(b'\t');
            }
            encode_cell(&mut buf, cell(col.as_ref(), row));
        }
        buf.push(b'\n');
    }
    buf
}

impl PgSplitWriter {
    /// COPY data for `rows` of `batch`; rows whose values do not fit their columns are left
    /// out and returned with the reason.
    fn encode(
        &self,
        batch: &RecordBatch,
        rows: std::ops::Range<usize>,
    ) -> (Vec<u8>, Vec<usize>, Vec<Rejected>) {
        let Some(plan) = &self.binary else {
            let included = rows.clone().collect();
            return (encode_text_rows(batch, rows), included, Vec::new());
        };
        let mut data = Vec::with_capacity(rows.len() * 64 + 32);
        let mut scratch = Vec::new();
        let mut included = Vec::with_capacity(rows.len());
        let mut rejected = Vec::new();
        BinaryPlan::header(&mut data);
        for row in rows {
            match plan.encode_row(batch, row, &mut scratch, &mut data) {
                Ok(()) => included.push(row),
                Err(reason) => rejected.push((row, reason)),
            }
        }
        BinaryPlan::trailer(&mut data);
        (data, included, rejected)
    }

    fn err(&self, e: tokio_postgres::Error) -> SyncError {
        SyncError::pg(format!("writing {}", self.table), e)
    }

    /// COPY `data` under a savepoint: `Ok(Err(reason))` when the server refused the data
    /// (the savepoint is rolled back and the transaction lives on).
    async fn copy_guarded(&self, data: Vec<u8>) -> Result<Result<(), String>, SyncError> {
        self.client
            .batch_execute("SAVEPOINT qanat_batch")
            .await
            .map_err(|e| self.err(e))?;
        let attempt = async {
            let sink = self.client.copy_in::<_, Bytes>(self.copy.as_str()).await?;
            let mut sink = pin!(sink);
            for piece in data.chunks(1 << 20) {
                sink.feed(Bytes::copy_from_slice(piece)).await?;
            }
            sink.as_mut().finish().await?;
            if let Some(merge) = &self.merge {
                self.client.batch_execute(merge).await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        }
        .await;
        match attempt {
            Ok(()) => {
                self.client
                    .batch_execute("RELEASE SAVEPOINT qanat_batch")
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(Ok(()))
            }
            Err(e) => {
                let data_error = e.as_db_error().is_some_and(|db| {
                    let c = db.code().code();
                    // Data exceptions and integrity constraint violations.
                    c.starts_with("22") || c.starts_with("23")
                });
                if !data_error {
                    return Err(self.err(e));
                }
                let reason = e
                    .as_db_error()
                    .map(|db| format!("{} ({})", db.message(), db.code().code()))
                    .unwrap_or_else(|| e.to_string());
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT qanat_batch")
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(Err(reason))
            }
        }
    }
}

#[async_trait::async_trait]
impl SplitWriter for PgSplitWriter {
    async fn write(&mut self, batch: &RecordBatch) -> Result<Vec<Rejected>, SyncError> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let (data, included, mut rejected) = self.encode(batch, 0..rows);
        if included.is_empty() {
            return Ok(rejected);
        }
        if self.copy_guarded(data).await?.is_err() {
            for row in included {
                let (one, _, _) = self.encode(batch, row..row + 1);
                if let Err(reason) = self.copy_guarded(one).await? {
                    rejected.push((row, reason));
                }
            }
            rejected.sort_by_key(|(row, _)| *row);
        }
        Ok(rejected)
    }

    async fn finish(self: Box<Self>) -> Result<(), SyncError> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SyncError::pg(format!("committing into {}", self.table), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_type_names_map_to_canonical_types() {
        assert_eq!(
            canonical_of("numeric(12,3)"),
            Some(CanonicalType::Decimal {
                precision: 12,
                scale: 3
            })
        );
        assert_eq!(
            canonical_of("timestamp(3) without time zone"),
            Some(CanonicalType::Timestamp)
        );
        assert_eq!(
            canonical_of("timestamp with time zone"),
            Some(CanonicalType::TimestampTz)
        );
        assert_eq!(
            canonical_of("time without time zone"),
            Some(CanonicalType::Time)
        );
        assert_eq!(
            canonical_of("character varying(20)"),
            Some(CanonicalType::Utf8)
        );
        assert_eq!(canonical_of("numeric"), None);
        assert_eq!(canonical_of("point"), None);
        assert_eq!(canonical_of("integer[]"), None);
    }
}
