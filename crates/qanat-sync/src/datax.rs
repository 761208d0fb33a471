//! DataX job files (`qanat sync run --datax job.json`): the JSON a DataX user already has,
//! translated into the same [`JobFile`] a TOML job is, for the reader/writer pairs we carry.
//!
//! Supported: `job.setting.speed.{channel, byte, record}`, `job.setting.errorLimit.{record,
//! percentage}`, and in `job.content[]` the readers `mysqlreader`, `postgresqlreader`,
//! `txtfilereader` and the writers `mysqlwriter`, `postgresqlwriter`, `txtfilewriter`.
//! Database plugins take `username`, `password`, `column`, `connection[].jdbcUrl`,
//! `connection[].table`; readers also `splitPk`, `where`, `fetchSize` (ignored: reads
//! stream); writers also `writeMode`, `preSql`, `postSql` (`@table` is the table's name) and
//! `batchSize` (ignored). Several tables or connections in a reader are one sharded source
//! (`tbl_[0-31]` ranges expand as in DataX). Anything else — `querySql`, `session`,
//! alternative `jdbcUrl`s, a writer `column` that renames — is an error naming its JSON path,
//! never silently dropped.

use serde_json::{Map, Value};

use crate::config::{JobFile, Settings, Sources, TableSpec};
use crate::plugin::WriteMode;
use crate::SyncError;

/// A DataX job in our terms: the job, and SQL to run on each table's target around it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataxJob {
    pub job: JobFile,
    /// Per `job.table` entry: statements to run on the target before any table is written.
    pub pre_sql: Vec<Vec<String>>,
    /// Per `job.table` entry: statements to run on the target after that table succeeded.
    pub post_sql: Vec<Vec<String>>,
}

fn err(path: &str, reason: impl std::fmt::Display) -> SyncError {
    SyncError::Invalid(format!("DataX job {path}: {reason}"))
}

/// An object's keys, each checked against `known`; unknown keys are errors naming them.
fn object<'a>(
    v: &'a Value,
    path: &str,
    known: &[&str],
    unsupported: &[(&str, &str)],
) -> Result<&'a Map<String, Value>, SyncError> {
    let map = v
        .as_object()
        .ok_or_else(|| err(path, "expected an object"))?;
    for key in map.keys() {
        if let Some((_, why)) = unsupported.iter().find(|(k, _)| k == key) {
            return Err(err(
                &format!("{path}.{key}"),
                format!("not supported: {why}"),
            ));
        }
        if !known.contains(&key.as_str()) {
            return Err(err(
                &format!("{path}.{key}"),
                format!(
                    "unknown or unsupported parameter (supported: {})",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(map)
}

fn string(map: &Map<String, Value>, path: &str, key: &str) -> Result<Option<String>, SyncError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err(&format!("{path}.{key}"), "expected a string")),
    }
}

fn number(map: &Map<String, Value>, path: &str, key: &str) -> Result<Option<f64>, SyncError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| err(&format!("{path}.{key}"), "not a number")),
        // DataX accepts numbers written as strings.
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| err(&format!("{path}.{key}"), format!("{s:?} is not a number"))),
        Some(_) => Err(err(&format!("{path}.{key}"), "expected a number")),
    }
}

fn count(map: &Map<String, Value>, path: &str, key: &str) -> Result<Option<u64>, SyncError> {
    match number(map, path, key)? {
        None => Ok(None),
        Some(n) if n >= 0.0 && n.fract() == 0.0 && n <= u64::MAX as f64 => Ok(Some(n as u64)),
        Some(n) => Err(err(
            &format!("{path}.{key}"),
            format!("{n} is not a whole number ≥ 0"),
        )),
    }
}

/// A string or a list of strings (DataX writes both for `jdbcUrl`, `table`, `path`).
fn strings(v: &Value, path: &str) -> Result<Vec<String>, SyncError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| err(&format!("{path}[{i}]"), "expected a string"))
            })
            .collect(),
        _ => Err(err(path, "expected a string or a list of strings")),
    }
}

/// The plain column names of `column` (`None` for `["*"]`); quoted names lose their quotes;
/// an expression or constant is an error naming it.
fn columns(map: &Map<String, Value>, path: &str) -> Result<Option<Vec<String>>, SyncError> {
    let Some(v) = map.get("column") else {
        return Ok(None);
    };
    let path = format!("{path}.column");
    let names = strings(v, &path)?;
    if names.is_empty() {
        return Err(err(&path, "an empty list"));
    }
    if names.len() == 1 && names[0].trim() == "*" {
        return Ok(None);
    }
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let t = n.trim();
            let t = t
                .strip_prefix('`')
                .and_then(|x| x.strip_suffix('`'))
                .or_else(|| t.strip_prefix('"').and_then(|x| x.strip_suffix('"')))
                .unwrap_or(t);
            let plain = !t.is_empty()
                && t.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
            if plain {
                Ok(t.to_string())
            } else {
                Err(err(
                    &format!("{path}[{i}]"),
                    format!("{n:?}: only plain column names are supported, not expressions or constants"),
                ))
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Db {
    Mysql,
    Postgres,
}

/// `jdbc:mysql://host:port/db?…` → (host:port, db). Driver properties after `?` are the
/// JDBC driver's business and are left out.
fn jdbc(url: &str, db: Db, path: &str) -> Result<(String, String), SyncError> {
    let prefixes: &[&str] = match db {
        Db::Mysql => &["jdbc:mysql://", "jdbc:mariadb://"],
        Db::Postgres => &["jdbc:postgresql://"],
    };
    let rest = prefixes
        .iter()
        .find_map(|p| url.strip_prefix(p))
        .ok_or_else(|| {
            err(
                path,
                format!(
                    "{url:?}: expected a URL starting with {}",
                    prefixes.join(" or ")
                ),
            )
        })?;
    let rest = rest.split(['?', ';']).next().unwrap_or(rest);
    let (hostport, database) = rest
        .split_once('/')
        .ok_or_else(|| err(path, format!("{url:?}: no database after the host")))?;
    if hostport.contains(',') {
        return Err(err(
            path,
            format!("{url:?}: several hosts are not supported"),
        ));
    }
    if hostport.is_empty() || database.is_empty() || database.contains('/') {
        return Err(err(
            path,
            format!("{url:?}: expected jdbc:…://host:port/database"),
        ));
    }
    Ok((hostport.to_string(), database.to_string()))
}

/// DataX's `name_[0-31]` table ranges, in our `{0..31}` form.
fn datax_ranges(table: &str) -> String {
    let mut out = String::new();
    let mut rest = table;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']').map(|c| open + c) else {
            break;
        };
        let inner = &rest[open + 1..close];
        out.push_str(&rest[..open]);
        match inner.split_once('-') {
            Some((a, b))
                if !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit()) =>
            {
                out.push_str(&format!("{{{a}..{b}}}"));
            }
            _ => out.push_str(&rest[open..=close]),
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

fn userinfo(map: &Map<String, Value>, path: &str) -> Result<String, SyncError> {
    let user = string(map, path, "username")?;
    let password = string(map, path, "password")?;
    Ok(match (user, password) {
        (Some(u), Some(p)) if !p.is_empty() => {
            format!("{}:{}@", percent_encode(&u), percent_encode(&p))
        }
        (Some(u), _) => format!("{}@", percent_encode(&u)),
        (None, Some(_)) => return Err(err(&format!("{path}.password"), "without a username")),
        (None, None) => String::new(),
    })
}

fn table_dsn(db: Db, auth: &str, hostport: &str, database: &str, table: &str) -> String {
    match db {
        Db::Mysql => format!("mysql://{auth}{hostport}/{database}.{table}"),
        Db::Postgres => format!("postgres://{auth}{hostport}/{database}/{table}"),
    }
}

struct Source {
    dsns: Vec<String>,
    columns: Option<Vec<String>>,
    split_pk: Option<String>,
    filter: Option<String>,
}

fn db_reader(db: Db, p: &Value, path: &str) -> Result<Source, SyncError> {
    let map = object(
        p,
        path,
        &[
            "username",
            "password",
            "column",
            "splitPk",
            "where",
            "connection",
            "fetchSize",
        ],
        &[
            ("querySql", "give table, column and where instead"),
            ("session", "session statements are not run"),
        ],
    )?;
    let auth = userinfo(map, path)?;
    let conns = map
        .get("connection")
        .and_then(Value::as_array)
        .ok_or_else(|| err(&format!("{path}.connection"), "expected a list"))?;
    if conns.is_empty() {
        return Err(err(&format!("{path}.connection"), "an empty list"));
    }
    let mut dsns = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        let cpath = format!("{path}.connection[{i}]");
        let cmap = object(
            c,
            &cpath,
            &["jdbcUrl", "table"],
            &[("querySql", "give table, column and where instead")],
        )?;
        let urls = strings(
            cmap.get("jdbcUrl")
                .ok_or_else(|| err(&format!("{cpath}.jdbcUrl"), "missing"))?,
            &format!("{cpath}.jdbcUrl"),
        )?;
        let [url] = urls.as_slice() else {
            return Err(err(
                &format!("{cpath}.jdbcUrl"),
                "give exactly one address: alternative addresses are not supported",
            ));
        };
        let (hostport, database) = jdbc(url, db, &format!("{cpath}.jdbcUrl[0]"))?;
        let tables = strings(
            cmap.get("table")
                .ok_or_else(|| err(&format!("{cpath}.table"), "missing"))?,
            &format!("{cpath}.table"),
        )?;
        if tables.is_empty() {
            return Err(err(&format!("{cpath}.table"), "an empty list"));
        }
        for t in tables {
            dsns.push(table_dsn(
                db,
                &auth,
                &hostport,
                &database,
                &datax_ranges(&t),
            ));
        }
    }
    Ok(Source {
        dsns,
        columns: columns(map, path)?,
        split_pk: string(map, path, "splitPk")?.filter(|s| !s.is_empty()),
        filter: string(map, path, "where")?.filter(|s| !s.trim().is_empty()),
    })
}

fn file_query(
    map: &Map<String, Value>,
    path: &str,
) -> Result<(String, &'static str, Option<&'static str>), SyncError> {
    let format = match string(map, path, "fieldDelimiter")?.as_deref() {
        None | Some(",") => "csv",
        Some("\t") => "tsv",
        Some(d) => {
            return Err(err(
                &format!("{path}.fieldDelimiter"),
                format!("{d:?}: only \",\" (CSV) and \"\\t\" (TSV) are supported"),
            ))
        }
    };
    let compression = match string(map, path, "compress")?.as_deref() {
        None | Some("") => None,
        Some("gzip") => Some("gzip"),
        Some("zstd") => Some("zstd"),
        Some(c) => {
            return Err(err(
                &format!("{path}.compress"),
                format!("{c:?}: only gzip and zstd are supported"),
            ))
        }
    };
    if let Some(e) = string(map, path, "encoding")? {
        if !e.eq_ignore_ascii_case("utf-8") && !e.eq_ignore_ascii_case("utf8") {
            return Err(err(
                &format!("{path}.encoding"),
                format!("{e:?}: only UTF-8 is supported"),
            ));
        }
    }
    let mut query = format!("format={format}");
    if let Some(c) = compression {
        query.push_str(&format!("&compression={c}"));
    }
    Ok((query, format, compression))
}

fn file_reader(p: &Value, path: &str) -> Result<Source, SyncError> {
    let map = object(
        p,
        path,
        &[
            "path",
            "column",
            "fieldDelimiter",
            "compress",
            "encoding",
            "skipHeader",
        ],
        &[
            (
                "nullFormat",
                "NULL is the empty unquoted CSV field or \\N in TSV",
            ),
            ("csvReaderConfig", "the CSV dialect is RFC 4180"),
        ],
    )?;
    let paths = strings(
        map.get("path")
            .ok_or_else(|| err(&format!("{path}.path"), "missing"))?,
        &format!("{path}.path"),
    )?;
    let [file] = paths.as_slice() else {
        return Err(err(&format!("{path}.path"), "give exactly one file"));
    };
    if !file.starts_with('/') || file.contains(['*', '?', '[']) {
        return Err(err(
            &format!("{path}.path[0]"),
            format!("{file:?}: an absolute file path without wildcards"),
        ));
    }
    if map.get("skipHeader").and_then(Value::as_bool) != Some(true) {
        return Err(err(
            &format!("{path}.skipHeader"),
            "must be true: the columns are named by the file's header line",
        ));
    }
    if let Some(v) = map.get("column") {
        if strings(v, &format!("{path}.column")).ok().as_deref() != Some(&["*".to_string()][..]) {
            return Err(err(
                &format!("{path}.column"),
                "only [\"*\"] is supported: columns come from the header",
            ));
        }
    }
    let (query, _, _) = file_query(map, path)?;
    // A DataX file has no verification file; one that does is still checked.
    Ok(Source {
        dsns: vec![format!("file://{file}?{query}&check=false")],
        columns: None,
        split_pk: None,
        filter: None,
    })
}

struct Target {
    dsn: String,
    mode: Option<WriteMode>,
    columns: Option<Vec<String>>,
    pre_sql: Vec<String>,
    post_sql: Vec<String>,
}

fn db_writer(db: Db, p: &Value, path: &str) -> Result<Target, SyncError> {
    let map = object(
        p,
        path,
        &[
            "username",
            "password",
            "column",
            "connection",
            "writeMode",
            "preSql",
            "postSql",
            "batchSize",
        ],
        &[("session", "session statements are not run")],
    )?;
    let auth = userinfo(map, path)?;
    let conns = map
        .get("connection")
        .and_then(Value::as_array)
        .ok_or_else(|| err(&format!("{path}.connection"), "expected a list"))?;
    let [c] = conns.as_slice() else {
        return Err(err(
            &format!("{path}.connection"),
            "give exactly one connection",
        ));
    };
    let cpath = format!("{path}.connection[0]");
    let cmap = object(c, &cpath, &["jdbcUrl", "table"], &[])?;
    let urls = strings(
        cmap.get("jdbcUrl")
            .ok_or_else(|| err(&format!("{cpath}.jdbcUrl"), "missing"))?,
        &format!("{cpath}.jdbcUrl"),
    )?;
    let [url] = urls.as_slice() else {
        return Err(err(&format!("{cpath}.jdbcUrl"), "give exactly one address"));
    };
    let (hostport, database) = jdbc(url, db, &format!("{cpath}.jdbcUrl"))?;
    let tables = strings(
        cmap.get("table")
            .ok_or_else(|| err(&format!("{cpath}.table"), "missing"))?,
        &format!("{cpath}.table"),
    )?;
    let [table] = tables.as_slice() else {
        return Err(err(&format!("{cpath}.table"), "give exactly one table"));
    };
    let mode = match string(map, path, "writeMode")?.as_deref() {
        None | Some("insert") => None,
        Some("replace") | Some("update") => Some(WriteMode::Upsert),
        Some(m) => {
            return Err(err(
                &format!("{path}.writeMode"),
                format!("{m:?}: expected insert, replace or update"),
            ))
        }
    };
    let sql = |key: &str| -> Result<Vec<String>, SyncError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => Ok(strings(v, &format!("{path}.{key}"))?
                .into_iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.replace("@table", table))
                .collect()),
        }
    };
    Ok(Target {
        dsn: table_dsn(db, &auth, &hostport, &database, table),
        mode,
        columns: columns(map, path)?,
        pre_sql: sql("preSql")?,
        post_sql: sql("postSql")?,
    })
}

fn file_writer(p: &Value, path: &str) -> Result<Target, SyncError> {
    let map = object(
        p,
        path,
        &[
            "path",
            "fileName",
            "writeMode",
            "fieldDelimiter",
            "compress",
            "encoding",
            "fileFormat",
        ],
        &[
            (
                "nullFormat",
                "NULL is the empty unquoted CSV field or \\N in TSV",
            ),
            ("dateFormat", "dates are written in their ISO 8601 form"),
            ("header", "the header holds the source's column names"),
        ],
    )?;
    let dir = string(map, path, "path")?.ok_or_else(|| err(&format!("{path}.path"), "missing"))?;
    if !dir.starts_with('/') {
        return Err(err(
            &format!("{path}.path"),
            "must be an absolute directory",
        ));
    }
    let name = string(map, path, "fileName")?
        .ok_or_else(|| err(&format!("{path}.fileName"), "missing"))?;
    if name.is_empty() || name.contains('/') {
        return Err(err(&format!("{path}.fileName"), "a file name without '/'"));
    }
    match string(map, path, "writeMode")?.as_deref() {
        None | Some("truncate") => {}
        Some(m) => {
            return Err(err(
                &format!("{path}.writeMode"),
                format!("{m:?}: only truncate is supported (the file is replaced whole)"),
            ))
        }
    }
    match string(map, path, "fileFormat")?.as_deref() {
        None | Some("csv") | Some("text") => {}
        Some(f) => {
            return Err(err(
                &format!("{path}.fileFormat"),
                format!("{f:?}: expected csv or text"),
            ))
        }
    }
    let (query, format, compression) = file_query(map, path)?;
    let ext = match compression {
        Some("gzip") => ".gz",
        Some(_) => ".zst",
        None => "",
    };
    Ok(Target {
        dsn: format!(
            "file://{}/{name}.{format}{ext}?{query}",
            dir.trim_end_matches('/')
        ),
        mode: None,
        columns: None,
        pre_sql: Vec::new(),
        post_sql: Vec::new(),
    })
}

fn plugin<'a>(v: &'a Value, path: &str) -> Result<(String, &'a Value), SyncError> {
    let map = object(v, path, &["name", "parameter"], &[])?;
    let name = string(map, path, "name")?.ok_or_else(|| err(&format!("{path}.name"), "missing"))?;
    let parameter = map
        .get("parameter")
        .ok_or_else(|| err(&format!("{path}.parameter"), "missing"))?;
    Ok((name, parameter))
}

/// Translate a DataX job file's text (`origin` names it in errors).
pub fn parse(text: &str, origin: &str) -> Result<DataxJob, SyncError> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| SyncError::Invalid(format!("{origin}: {e}")))?;
    let top = object(&root, "$", &["job", "core"], &[])?;
    if top.contains_key("core") {
        return Err(err(
            "core",
            "not supported: the engine's settings are qanat's own (see [sync])",
        ));
    }
    let job = top
        .get("job")
        .ok_or_else(|| err("job", "missing"))
        .and_then(|j| object(j, "job", &["setting", "content"], &[]))?;
    let mut settings = Settings::default();
    if let Some(setting) = job.get("setting") {
        let setting = object(setting, "job.setting", &["speed", "errorLimit"], &[])?;
        if let Some(speed) = setting.get("speed") {
            let speed = object(
                speed,
                "job.setting.speed",
                &["channel", "byte", "record"],
                &[],
            )?;
            if let Some(c) = count(speed, "job.setting.speed", "channel")? {
                if c == 0 {
                    return Err(err("job.setting.speed.channel", "must be at least 1"));
                }
                settings.channels = c as usize;
            }
            // DataX writes -1 for "no limit".
            let limit = |key: &str| -> Result<u64, SyncError> {
                match number(speed, "job.setting.speed", key)? {
                    None => Ok(0),
                    Some(n) if n < 0.0 => Ok(0),
                    Some(_) => Ok(count(speed, "job.setting.speed", key)?.unwrap_or(0)),
                }
            };
            settings.max_bytes_per_sec = limit("byte")?;
            settings.max_records_per_sec = limit("record")?;
        }
        if let Some(limit) = setting.get("errorLimit") {
            let limit = object(
                limit,
                "job.setting.errorLimit",
                &["record", "percentage"],
                &[],
            )?;
            settings.max_dirty_records = count(limit, "job.setting.errorLimit", "record")?;
            if let Some(p) = number(limit, "job.setting.errorLimit", "percentage")? {
                if !(0.0..=1.0).contains(&p) {
                    return Err(err(
                        "job.setting.errorLimit.percentage",
                        format!("{p} is outside 0.0–1.0"),
                    ));
                }
                settings.max_dirty_ratio = Some(p);
            }
        }
    }
    let content = job
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| err("job.content", "expected a list"))?;
    if content.is_empty() {
        return Err(err("job.content", "an empty list"));
    }
    let mut tables = Vec::new();
    let (mut pre_sql, mut post_sql) = (Vec::new(), Vec::new());
    for (i, item) in content.iter().enumerate() {
        let path = format!("job.content[{i}]");
        let item = object(item, &path, &["reader", "writer"], &[])?;
        let (rname, rparam) = plugin(
            item.get("reader")
                .ok_or_else(|| err(&format!("{path}.reader"), "missing"))?,
            &format!("{path}.reader"),
        )?;
        let (wname, wparam) = plugin(
            item.get("writer")
                .ok_or_else(|| err(&format!("{path}.writer"), "missing"))?,
            &format!("{path}.writer"),
        )?;
        let rpath = format!("{path}.reader.parameter");
        let source = match rname.as_str() {
            "mysqlreader" => db_reader(Db::Mysql, rparam, &rpath)?,
            "postgresqlreader" => db_reader(Db::Postgres, rparam, &rpath)?,
            "txtfilereader" => file_reader(rparam, &rpath)?,
            other => {
                return Err(err(
                    &format!("{path}.reader.name"),
                    format!(
                        "{other:?} is not supported (supported: mysqlreader, postgresqlreader, \
                         txtfilereader)"
                    ),
                ))
            }
        };
        let wpath = format!("{path}.writer.parameter");
        let target = match wname.as_str() {
            "mysqlwriter" => db_writer(Db::Mysql, wparam, &wpath)?,
            "postgresqlwriter" => db_writer(Db::Postgres, wparam, &wpath)?,
            "txtfilewriter" => file_writer(wparam, &wpath)?,
            other => {
                return Err(err(
                    &format!("{path}.writer.name"),
                    format!(
                        "{other:?} is not supported (supported: mysqlwriter, postgresqlwriter, \
                         txtfilewriter)"
                    ),
                ))
            }
        };
        // Columns travel by name: the writer's list may only repeat the reader's.
        if let Some(w) = &target.columns {
            if source.columns.as_ref() != Some(w) {
                return Err(err(
                    &format!("{wpath}.column"),
                    "must name the reader's columns in the same order (or be [\"*\"]): \
                     columns are matched by name, renaming is not supported",
                ));
            }
        }
        tables.push(TableSpec {
            from: match source.dsns.as_slice() {
                [one] => Sources::One(one.clone()),
                _ => Sources::Many(source.dsns),
            },
            shard_column: None,
            columns: source.columns,
            filter: source.filter,
            to: target.dsn,
            mode: target.mode,
            split_pk: source.split_pk,
            channels: None,
            priority: None,
        });
        pre_sql.push(target.pre_sql);
        post_sql.push(target.post_sql);
    }
    Ok(DataxJob {
        job: JobFile {
            sync: settings,
            table: tables,
        },
        pre_sql,
        post_sql,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"{
      "job": {
        "setting": {"speed": {"channel": 3, "byte": 1048576, "record": -1},
                    "errorLimit": {"record": 0, "percentage": 0.02}},
        "content": [{
          "reader": {"name": "mysqlreader", "parameter": {
            "username": "root", "password": "p@ss", "column": ["`id`", "name"],
            "splitPk": "id", "where": "id > 10",
            "connection": [
              {"jdbcUrl": ["jdbc:mysql://127.0.0.1:3306/shop_a?useSSL=false"], "table": ["order_[0-3]"]},
              {"jdbcUrl": ["jdbc:mysql://127.0.0.1:3306/shop_b"], "table": ["order_[4-7]"]}
            ]}},
          "writer": {"name": "postgresqlwriter", "parameter": {
            "username": "postgres", "password": "", "column": ["id", "name"],
            "preSql": ["delete from @table"], "postSql": [],
            "connection": [{"jdbcUrl": "jdbc:postgresql://127.0.0.1:5432/dw", "table": ["public.orders"]}]}}
        }]
      }
    }"#;

    #[test]
    fn a_datax_job_becomes_a_job_file() {
        let j = parse(JOB, "job.json");
        let Ok(j) = j else {
            panic!("{j:?}");
        };
        assert_eq!(j.job.sync.channels, 3);
        assert_eq!(j.job.sync.max_bytes_per_sec, 1_048_576);
        assert_eq!(j.job.sync.max_records_per_sec, 0);
        assert_eq!(j.job.sync.max_dirty_records, Some(0));
        assert_eq!(j.job.sync.max_dirty_ratio, Some(0.02));
        let t = &j.job.table[0];
        assert_eq!(
            t.from.dsns(),
            [
                "mysql://root:p%40ss@127.0.0.1:3306/shop_a.order_{0..3}",
                "mysql://root:p%40ss@127.0.0.1:3306/shop_b.order_{4..7}"
            ]
        );
        assert_eq!(t.to, "postgres://postgres@127.0.0.1:5432/dw/public.orders");
        assert_eq!(
            t.columns.as_deref(),
            Some(&["id".to_string(), "name".into()][..])
        );
        assert_eq!(t.filter.as_deref(), Some("id > 10"));
        assert_eq!(t.split_pk.as_deref(), Some("id"));
        assert_eq!(j.pre_sql, [vec!["delete from public.orders".to_string()]]);
        assert!(j.job.validate().is_ok());
    }

    #[test]
    fn unsupported_things_name_their_json_path() {
        for (from, to, path) in [
            (
                "\"mysqlreader\"",
                "\"oraclereader\"",
                "job.content[0].reader.name",
            ),
            (
                "\"splitPk\": \"id\"",
                "\"splitPk\": \"id\", \"session\": [\"set x=1\"]",
                "job.content[0].reader.parameter.session",
            ),
            (
                "\"table\": [\"order_[0-3]\"]",
                "\"querySql\": [\"select 1\"]",
                "job.content[0].reader.parameter.connection[0].querySql",
            ),
            (
                "\"column\": [\"id\", \"name\"],\n            \"preSql\"",
                "\"column\": [\"id\", \"title\"],\n            \"preSql\"",
                "job.content[0].writer.parameter.column",
            ),
            (
                "\"channel\": 3",
                "\"channel\": 3, \"turbo\": 1",
                "job.setting.speed.turbo",
            ),
            (
                "\"column\": [\"`id`\", \"name\"]",
                "\"column\": [\"`id`\", \"now()\"]",
                "job.content[0].reader.parameter.column[1]",
            ),
            (
                "jdbc:postgresql://127.0.0.1:5432/dw",
                "jdbc:oracle:thin:@h:1521:x",
                "job.content[0].writer.parameter.connection[0].jdbcUrl",
            ),
        ] {
            assert!(JOB.contains(from), "{from}");
            let bad = parse(&JOB.replacen(from, to, 1), "job.json");
            assert!(
                matches!(&bad, Err(e) if e.to_string().contains(path)),
                "{path}: {bad:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,200}") {
            let _ = parse(&s, "x");
        }
    }
}
