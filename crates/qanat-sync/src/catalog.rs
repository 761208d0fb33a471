//! `qanat sync init`: read a source's catalog (`information_schema` on MariaDB/MySQL,
//! `pg_catalog` on PostgreSQL), map each matched table's columns to the target's types
//! (`docs/sync-types.md`, "Target DDL"), render or run the target DDL, and write one job
//! file for all of them. Each table's size is estimated from the catalog's statistics
//! (`TABLE_ROWS`/`DATA_LENGTH`, `reltuples`/`relpages`) and sets its channel count.

use globset::{Glob, GlobMatcher};
use mysql_async::prelude::Queryable;

use crate::dsn::Server;
use crate::mysql::{self, MysqlTable};
use crate::plugin::Reader;
use crate::postgres::{self, PgTable};
use crate::types::{CanonicalType, Column, TableSchema};
use crate::SyncError;

/// Bytes of table data one channel is given; more channels above it, up to
/// [`MAX_CHANNELS`].
pub const BYTES_PER_CHANNEL: u64 = 64 << 20;
pub const MAX_CHANNELS: u64 = 8;

/// A database server with, for a target, where the tables go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// `mysql://u:p@host:3306[/db]`; the database is the namespace.
    Mysql(Server),
    /// `postgres://u:p@host:5432/db[/schema]`.
    Postgres {
        server: Server,
        schema: Option<String>,
    },
}

fn bad(dsn: &str, reason: &str) -> SyncError {
    SyncError::Dsn {
        dsn: crate::dsn::redact(dsn),
        reason: reason.into(),
    }
}

impl Store {
    /// Parse a server DSN (no table). Reuses the table-address parser with a placeholder
    /// table so both accept the same authority syntax.
    pub fn parse(dsn: &str) -> Result<Store, SyncError> {
        let trimmed = dsn.trim_end_matches('/');
        let (scheme, rest) = trimmed
            .split_once("://")
            .ok_or_else(|| bad(dsn, "expected mysql://… or postgres://…"))?;
        match scheme {
            "mysql" | "mariadb" => {
                let (authority, db) = rest.split_once('/').unwrap_or((rest, ""));
                if db.contains('/') || db.contains('.') {
                    return Err(bad(dsn, "expected mysql://user@host:port[/database]"));
                }
                let probe = format!(
                    "mysql://{authority}/{}.t",
                    if db.is_empty() { "x" } else { db }
                );
                match crate::dsn::Endpoint::parse(&probe)
                    .map_err(|_| bad(dsn, "bad host, port or user"))?
                {
                    crate::dsn::Endpoint::Mysql { mut server, .. } => {
                        if db.is_empty() {
                            server.database.clear();
                        }
                        Ok(Store::Mysql(server))
                    }
                    _ => Err(bad(dsn, "expected mysql://user@host:port[/database]")),
                }
            }
            "postgres" | "postgresql" => {
                let (authority, path) = rest.split_once('/').ok_or_else(|| {
                    bad(dsn, "expected postgres://user@host:port/database[/schema]")
                })?;
                let (db, schema) = match path.split_once('/') {
                    Some((d, s)) => (d, Some(s)),
                    None => (path, None),
                };
                if db.is_empty()
                    || schema.is_some_and(|s| s.is_empty() || s.contains('/') || s.contains('.'))
                {
                    return Err(bad(
                        dsn,
                        "expected postgres://user@host:port/database[/schema]",
                    ));
                }
                let probe = format!("postgres://{authority}/{db}/public.t");
                match crate::dsn::Endpoint::parse(&probe)
                    .map_err(|_| bad(dsn, "bad host, port or user"))?
                {
                    crate::dsn::Endpoint::Postgres { server, .. } => Ok(Store::Postgres {
                        server,
                        schema: schema.map(str::to_string),
                    }),
                    _ => Err(bad(
                        dsn,
                        "expected postgres://user@host:port/database[/schema]",
                    )),
                }
            }
            other => Err(bad(
                dsn,
                &format!("sync init reads and writes mysql or postgres, not {other:?}"),
            )),
        }
    }

    fn scheme_authority(server: &Server, scheme: &str) -> String {
        let mut s = format!("{scheme}://");
        if let Some(u) = &server.user {
            s.push_str(&escape(u));
            if let Some(p) = &server.password {
                s.push(':');
                s.push_str(&escape(p));
            }
            s.push('@');
        }
        if server.host.contains(':') {
            s.push_str(&format!("[{}]", server.host));
        } else {
            s.push_str(&server.host);
        }
        if let Some(p) = server.port {
            s.push_str(&format!(":{p}"));
        }
        s
    }
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A matched source table with its catalog size estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceTable {
    /// The database (MariaDB/MySQL) or schema (PostgreSQL) it is in.
    pub namespace: String,
    pub name: String,
    pub schema: TableSchema,
    /// From the catalog's statistics; 0 when never analyzed.
    pub est_rows: u64,
    pub est_bytes: u64,
}

impl SourceTable {
    /// Channels for this table: one per [`BYTES_PER_CHANNEL`] of data, 1..=[`MAX_CHANNELS`].
    pub fn channels(&self) -> usize {
        let n = self
            .est_bytes
            .div_ceil(BYTES_PER_CHANNEL)
            .clamp(1, MAX_CHANNELS);
        usize::try_from(n).unwrap_or(1)
    }
}

fn matcher(pattern: &str, what: &str) -> Result<GlobMatcher, SyncError> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| SyncError::Invalid(format!("--tables: bad {what} pattern {pattern:?}: {e}")))
}

/// Split `ns.glob` (or `glob`, in the DSN's database / `public`).
fn split_pattern(tables: &str, default_ns: Option<&str>) -> Result<(String, String), SyncError> {
    match tables.split_once('.') {
        Some((ns, glob)) if !ns.is_empty() && !glob.is_empty() => {
            Ok((ns.to_string(), glob.to_string()))
        }
        None if !tables.is_empty() => match default_ns {
            Some(ns) => Ok((ns.to_string(), tables.to_string())),
            None => Err(SyncError::Invalid(format!(
                "--tables {tables:?}: name the database too, as database.pattern (e.g. shop.*)"
            ))),
        },
        _ => Err(SyncError::Invalid(format!(
            "--tables {tables:?}: expected namespace.pattern (e.g. shop.* or public.order_*)"
        ))),
    }
}

/// Read the source tables matching `tables` (`db.glob` for MariaDB/MySQL, `schema.glob` for
/// PostgreSQL), in name order. No match is an error naming the pattern.
pub async fn read_source(source: &Store, tables: &str) -> Result<Vec<SourceTable>, SyncError> {
    let mut out = Vec::new();
    match source {
        Store::Mysql(server) => {
            let default = (!server.database.is_empty()).then_some(server.database.as_str());
            let (db, glob) = split_pattern(tables, default)?;
            let m = matcher(&glob, "table")?;
            let server = Server {
                database: db.clone(),
                ..server.clone()
            };
            let probe = MysqlTable::new(server.clone(), String::new());
            let mut conn = probe.connect().await?;
            type Row = (String, Option<u64>, Option<u64>);
            let rows: Vec<Row> = conn
                .exec(
                    "SELECT CAST(table_name AS CHAR), table_rows, data_length \
                     FROM information_schema.tables WHERE table_schema = ? \
                     AND table_type = 'BASE TABLE' ORDER BY table_name",
                    (db.as_str(),),
                )
                .await
                .map_err(|e| SyncError::mysql(format!("listing the tables of {db}"), e))?;
            let _ = conn.disconnect().await;
            for (name, rows, bytes) in rows {
                if !m.is_match(&name) {
                    continue;
                }
                let schema = MysqlTable::new(server.clone(), name.clone())
                    .schema()
                    .await?;
                out.push(SourceTable {
                    namespace: db.clone(),
                    name,
                    schema,
                    est_rows: rows.unwrap_or(0),
                    est_bytes: bytes.unwrap_or(0),
                });
            }
            if out.is_empty() {
                return Err(SyncError::UnknownTable {
                    table: format!("{db}.{glob} (no table in MariaDB/MySQL database {db} matches)"),
                });
            }
        }
        Store::Postgres { server, schema } => {
            let (ns, glob) = split_pattern(tables, Some(schema.as_deref().unwrap_or("public")))?;
            let m = matcher(&glob, "table")?;
            let probe = PgTable::new(server.clone(), ns.clone(), String::new());
            let client = probe.connect().await?;
            let rows = client
                .query(
                    "SELECT c.relname::text, GREATEST(c.reltuples, 0)::float8, \
                     c.relpages::int8 * current_setting('block_size')::int8 \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
                     ORDER BY c.relname",
                    &[&ns],
                )
                .await
                .map_err(|e| SyncError::pg(format!("listing the tables of schema {ns}"), e))?;
            for row in rows {
                let name: String = row.get(0);
                if !m.is_match(&name) {
                    continue;
                }
                let est_rows: f64 = row.get(1);
                let est_bytes: i64 = row.get(2);
                let schema = PgTable::new(server.clone(), ns.clone(), name.clone())
                    .schema()
                    .await?;
                out.push(SourceTable {
                    namespace: ns.clone(),
                    name,
                    schema,
                    est_rows: est_rows as u64,
                    est_bytes: u64::try_from(est_bytes).unwrap_or(0),
                });
            }
            if out.is_empty() {
                return Err(SyncError::UnknownTable {
                    table: format!(
                        "{ns}.{glob} (no table in PostgreSQL database {} schema {ns} matches)",
                        server.database
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// `(n)` of a native type like `varchar(40)` or `time(6)`.
fn type_arg(native: &str) -> Option<u32> {
    let (_, rest) = native.split_once('(')?;
    rest.split([')', ',']).next()?.trim().parse().ok()
}

/// The PostgreSQL column type for a column read from MariaDB/MySQL or PostgreSQL; the
/// same canonical type on both sides, so `--verify` compares like with like.
pub fn postgres_type(c: &Column) -> Result<String, SyncError> {
    let native = c.native.to_ascii_lowercase();
    let base = native.split(['(', ' ']).next().unwrap_or("");
    let unsigned = native.contains("unsigned");
    let frac = |default: u32| type_arg(&native).unwrap_or(default).min(6);
    Ok(match c.ty {
        CanonicalType::Bool => "boolean".into(),
        CanonicalType::Int64 => match base {
            "tinyint" | "year" => "smallint".into(),
            "smallint" if !unsigned => "smallint".into(),
            "smallint" | "mediumint" => "integer".into(),
            "int" | "integer" if !unsigned => "integer".into(),
            _ => "bigint".into(),
        },
        CanonicalType::Decimal { precision, scale } => format!("numeric({precision},{scale})"),
        // FLOAT and real widen to double precision: no value changes on the way.
        CanonicalType::Float64 => "double precision".into(),
        CanonicalType::Utf8 => match base {
            // varchar, not char: char(n) would pad on output and the text would differ.
            "char" | "varchar" | "character" => match type_arg(&native) {
                Some(n) => format!("varchar({n})"),
                None => "text".into(),
            },
            "json" => "json".into(),
            "uuid" => "uuid".into(),
            "inet4" | "inet6" | "inet" => "inet".into(),
            "cidr" => "cidr".into(),
            "jsonb" => "jsonb".into(),
            _ => "text".into(),
        },
        CanonicalType::Binary => "bytea".into(),
        CanonicalType::Date => "date".into(),
        CanonicalType::Time => format!("time({})", frac(6)),
        CanonicalType::Timestamp => format!("timestamp({})", frac(6)),
        CanonicalType::TimestampTz => format!("timestamptz({})", frac(6)),
    })
}

/// The MariaDB/MySQL column type for a column read from PostgreSQL or MariaDB/MySQL.
pub fn mysql_type(table: &SourceTable, c: &Column) -> Result<String, SyncError> {
    let native = c.native.to_ascii_lowercase();
    let in_key = table.schema.primary_key.iter().any(|k| k == &c.name);
    let base = native.split(['(', ' ']).next().unwrap_or("");
    let frac = |default: u32| type_arg(&native).unwrap_or(default).min(6);
    Ok(match c.ty {
        CanonicalType::Bool => "tinyint(1)".into(),
        CanonicalType::Int64 => match base {
            "smallint" | "tinyint" | "mediumint" | "year" => native.clone(),
            "integer" | "int" => "int".into(),
            _ => "bigint".into(),
        },
        CanonicalType::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
        CanonicalType::Float64 => "double".into(),
        CanonicalType::Utf8 => match (base, type_arg(&native)) {
            ("varchar" | "character", Some(n))
                if native.contains("varying") || base == "varchar" =>
            {
                format!("varchar({n})")
            }
            ("character" | "char", Some(n)) => format!("char({n})"),
            ("json" | "jsonb", _) => "json".into(),
            ("uuid", _) => "char(36)".into(),
            ("inet" | "cidr", _) => "varchar(43)".into(),
            // A key column needs a length; 255 characters of utf8mb4 fit an InnoDB key.
            _ if in_key => "varchar(255)".into(),
            ("tinytext" | "mediumtext" | "longtext" | "enum" | "set", _) => native.clone(),
            _ => "longtext".into(),
        },
        CanonicalType::Binary if in_key => "varbinary(255)".into(),
        CanonicalType::Binary => match base {
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" => native.clone(),
            _ => "longblob".into(),
        },
        CanonicalType::Date => "date".into(),
        CanonicalType::Time => format!("time({})", frac(6)),
        CanonicalType::Timestamp => format!("datetime({})", frac(6)),
        // MariaDB TIMESTAMP ends in 2038; it is the type that holds an instant.
        CanonicalType::TimestampTz => format!("timestamp({}) NULL DEFAULT NULL", frac(6)),
    })
}

/// Where a source table goes on the target: `(namespace, table)`.
fn target_name(target: &Store, t: &SourceTable) -> (String, String) {
    match target {
        Store::Mysql(server) => (
            if server.database.is_empty() {
                t.namespace.clone()
            } else {
                server.database.clone()
            },
            t.name.clone(),
        ),
        Store::Postgres { schema, .. } => (
            schema.clone().unwrap_or_else(|| "public".into()),
            t.name.clone(),
        ),
    }
}

/// `CREATE TABLE` for one source table on the target.
pub fn create_table(target: &Store, t: &SourceTable) -> Result<String, SyncError> {
    let (ns, name) = target_name(target, t);
    let mut cols = Vec::with_capacity(t.schema.columns.len() + 1);
    for c in &t.schema.columns {
        let null = if c.nullable { "" } else { " NOT NULL" };
        cols.push(match target {
            Store::Mysql(_) => {
                let ty = mysql_type(t, c)?;
                // The TIMESTAMP type already says NULL DEFAULT NULL.
                let null = if ty.ends_with("DEFAULT NULL") && !c.nullable {
                    String::new()
                } else {
                    null.to_string()
                };
                let ty = if !c.nullable {
                    ty.replace(" NULL DEFAULT NULL", " NOT NULL")
                } else {
                    ty
                };
                format!("  {} {ty}{null}", mysql::quote_ident(&c.name))
            }
            Store::Postgres { .. } => {
                format!(
                    "  {} {}{null}",
                    postgres::quote_ident(&c.name),
                    postgres_type(c)?
                )
            }
        });
    }
    let quote = |s: &str| match target {
        Store::Mysql(_) => mysql::quote_ident(s),
        Store::Postgres { .. } => postgres::quote_ident(s),
    };
    if !t.schema.primary_key.is_empty() {
        let key: Vec<String> = t.schema.primary_key.iter().map(|k| quote(k)).collect();
        cols.push(format!("  PRIMARY KEY ({})", key.join(", ")));
    }
    let tail = match target {
        Store::Mysql(_) => " DEFAULT CHARSET=utf8mb4",
        Store::Postgres { .. } => "",
    };
    Ok(format!(
        "CREATE TABLE {}.{} (\n{}\n){tail};",
        quote(&ns),
        quote(&name),
        cols.join(",\n")
    ))
}

/// Run the DDL on the target, all tables in one transaction on PostgreSQL (MariaDB commits
/// each `CREATE TABLE` itself; an error names the table).
pub async fn create_tables(target: &Store, ddl: &[(String, String)]) -> Result<(), SyncError> {
    match target {
        Store::Mysql(server) => {
            let db = if server.database.is_empty() {
                "mysql".to_string()
            } else {
                server.database.clone()
            };
            let probe = MysqlTable::new(
                Server {
                    database: db,
                    ..server.clone()
                },
                String::new(),
            );
            let mut conn = probe.connect().await?;
            for (table, sql) in ddl {
                conn.query_drop(sql.as_str())
                    .await
                    .map_err(|e| SyncError::mysql(format!("creating table {table}"), e))?;
            }
            let _ = conn.disconnect().await;
        }
        Store::Postgres { server, schema } => {
            let probe = PgTable::new(
                server.clone(),
                schema.clone().unwrap_or_else(|| "public".into()),
                String::new(),
            );
            let mut client = probe.connect().await?;
            let tx = client
                .transaction()
                .await
                .map_err(|e| SyncError::pg("starting the DDL transaction", e))?;
            for (table, sql) in ddl {
                tx.batch_execute(sql)
                    .await
                    .map_err(|e| SyncError::pg(format!("creating table {table}"), e))?;
            }
            tx.commit()
                .await
                .map_err(|e| SyncError::pg("committing the DDL", e))?;
        }
    }
    Ok(())
}

/// Table addresses for the job file.
pub fn addresses(source: &Store, target: &Store, t: &SourceTable) -> (String, String) {
    let from = match source {
        Store::Mysql(s) => format!(
            "{}/{}.{}",
            Store::scheme_authority(s, "mysql"),
            t.namespace,
            t.name
        ),
        Store::Postgres { server, .. } => format!(
            "{}/{}/{}.{}",
            Store::scheme_authority(server, "postgres"),
            server.database,
            t.namespace,
            t.name
        ),
    };
    let (ns, name) = target_name(target, t);
    let to = match target {
        Store::Mysql(s) => format!("{}/{ns}.{name}", Store::scheme_authority(s, "mysql")),
        Store::Postgres { server, .. } => format!(
            "{}/{}/{ns}.{name}",
            Store::scheme_authority(server, "postgres"),
            server.database
        ),
    };
    (from, to)
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// One job file (the format `qanat sync run` reads) for all tables: `[sync]` defaults and
/// one `[[table]]` each, with its size estimate as a comment and its channel count. Tables
/// without a primary key get one channel (they cannot be split on a key).
pub fn job_file(source: &Store, target: &Store, tables: &[SourceTable]) -> String {
    let mut out = String::from(
        "# Written by `qanat sync init`; sizes are the catalog's estimates.\n\
         [sync]\nconcurrency = 2\nmode = \"insert\"\n",
    );
    for t in tables {
        let (from, to) = addresses(source, target, t);
        let channels = if t.schema.primary_key.is_empty() {
            1
        } else {
            t.channels()
        };
        out.push_str(&format!(
            "\n# {}.{}: ~{} rows, ~{:.1} MB\n[[table]]\nfrom = {}\nto = {}\nchannels = {channels}\n",
            t.namespace,
            t.name,
            t.est_rows,
            t.est_bytes as f64 / 1e6,
            toml_str(&from),
            toml_str(&to),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cols: &[(&str, CanonicalType, &str)], bytes: u64) -> SourceTable {
        SourceTable {
            namespace: "shop".into(),
            name: "t".into(),
            schema: TableSchema {
                columns: cols
                    .iter()
                    .map(|(n, ty, native)| Column {
                        name: (*n).into(),
                        ty: *ty,
                        nullable: true,
                        native: (*native).into(),
                    })
                    .collect(),
                primary_key: vec!["id".into()],
            },
            est_rows: 10,
            est_bytes: bytes,
        }
    }

    #[test]
    fn server_dsns_parse_and_job_file_parses_back() {
        let src = Store::parse("mysql://root:p%40ss@127.0.0.1:3306");
        let dst = Store::parse("postgres://postgres@127.0.0.1:5432/dw/stage");
        assert!(matches!(&src, Ok(Store::Mysql(s)) if s.password.as_deref() == Some("p@ss")));
        assert!(matches!(&dst, Ok(Store::Postgres { schema: Some(s), .. }) if s == "stage"));
        assert!(Store::parse("postgres://h").is_err());
        assert!(Store::parse("file:///x").is_err());
        let (Ok(src), Ok(dst)) = (src, dst) else {
            return;
        };
        let t = table(&[("id", CanonicalType::Int64, "int(11)")], 200 << 20);
        assert_eq!(t.channels(), 4);
        let text = job_file(&src, &dst, &[t]);
        let job = crate::config::JobFile::parse(&text, "init", vec![]).and_then(|j| {
            j.validate()?;
            Ok(j)
        });
        assert!(
            matches!(&job, Ok(j) if j.table[0].to == "postgres://postgres@127.0.0.1:5432/dw/stage.t"
                && j.table[0].from.dsns() == ["mysql://root:p%40ss@127.0.0.1:3306/shop.t"]
                && j.table[0].channels == Some(4)),
            "{job:?}\n{text}"
        );
    }

    #[test]
    fn ddl_maps_types_both_ways() {
        let t = table(
            &[
                ("id", CanonicalType::Int64, "int(10) unsigned"),
                ("c", CanonicalType::Utf8, "char(3)"),
                ("ts", CanonicalType::TimestampTz, "timestamp(3)"),
                ("b", CanonicalType::Bool, "tinyint(1)"),
            ],
            0,
        );
        let pg = Store::Postgres {
            server: Server {
                host: "h".into(),
                port: None,
                user: None,
                password: None,
                database: "dw".into(),
            },
            schema: None,
        };
        let ddl = create_table(&pg, &t);
        assert!(
            matches!(&ddl, Ok(s) if s.contains("\"id\" bigint") && s.contains("\"c\" varchar(3)")
                && s.contains("timestamptz(3)") && s.contains("\"b\" boolean")
                && s.contains("PRIMARY KEY (\"id\")")),
            "{ddl:?}"
        );
        let t = table(
            &[
                ("id", CanonicalType::Utf8, "text"),
                ("x", CanonicalType::Bool, "boolean"),
            ],
            0,
        );
        let my = Store::Mysql(Server {
            host: "h".into(),
            port: None,
            user: None,
            password: None,
            database: "dst".into(),
        });
        let ddl = create_table(&my, &t);
        assert!(
            matches!(&ddl, Ok(s) if s.contains("`id` varchar(255)") && s.contains("`x` tinyint(1)")
                && s.starts_with("CREATE TABLE `dst`.`t`")),
            "{ddl:?}"
        );
    }
}
