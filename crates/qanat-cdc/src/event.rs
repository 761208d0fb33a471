//! The canonical change event and its JSON form.
//!
//! The value of a change record is Debezium's envelope with schemas disabled
//! (`value.converter.schemas.enable=false`): `{"before","after","source","op","ts_ms",
//! "transaction"}`. The key is the primary-key columns as a JSON object, so one row's changes
//! land in one partition in order. The mapping of every column type to a [`Value`] is in
//! `docs/cdc-types.md`.

use std::sync::Arc;

use base64::Engine as _;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{json, Map, Value as Json};

/// One column value, source-independent.
///
/// Temporal values are carried as ISO-8601 text: `Date` `2026-11-29`, `Time`
/// `12:34:56.123456`, `DateTime` a wall-clock time without zone `2026-11-29T12:34:56.123456`,
/// `Timestamp` an instant in UTC `2026-11-29T12:34:56.123456Z`. Fractional seconds are
/// written only as far as the column's precision.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Exact decimal text, e.g. `-12.3400`; never a float.
    Decimal(String),
    Text(String),
    /// Rendered as base64, as Debezium does with `binary.handling.mode=base64`.
    Bytes(Vec<u8>),
    Date(String),
    Time(String),
    DateTime(String),
    Timestamp(String),
    /// JSON/jsonb as its text, as Debezium's `io.debezium.data.Json`.
    Json(String),
    Array(Vec<Value>),
}

impl Value {
    /// The JSON this value is rendered as inside `before`/`after`.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => json!(i),
            Value::UInt(u) => json!(u),
            // NaN and infinities have no JSON number; Debezium writes them as strings too.
            Value::Float(f) if f.is_finite() => json!(f),
            Value::Float(f) => Json::String(f.to_string()),
            Value::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
            Value::Decimal(s)
            | Value::Text(s)
            | Value::Date(s)
            | Value::Time(s)
            | Value::DateTime(s)
            | Value::Timestamp(s)
            | Value::Json(s) => Json::String(s.clone()),
            Value::Array(items) => Json::Array(items.iter().map(Value::to_json).collect()),
        }
    }
}

/// A row image: column names in table order with their values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    pub columns: Vec<(Arc<str>, Value)>,
}

impl Row {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.columns
            .iter()
            .find(|(name, _)| &**name == column)
            .map(|(_, v)| v)
    }

    pub fn to_json(&self) -> Json {
        let mut map = Map::with_capacity(self.columns.len());
        for (name, value) in &self.columns {
            map.insert(name.to_string(), value.to_json());
        }
        Json::Object(map)
    }
}

/// Debezium's `op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    /// A row read by a snapshot.
    Read,
    /// Every row of the table was removed (`TRUNCATE`): no `before`, no `after`, no key.
    Truncate,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// Debezium's `source.snapshot`: `"false"` when streaming, `"true"` inside a snapshot,
/// `"last"` on the last row of a snapshot, `"incremental"` for rows of an incremental snapshot
/// (a table read while streaming goes on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotMark {
    #[default]
    No,
    Yes,
    Last,
    Incremental,
}

impl SnapshotMark {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMark::No => "false",
            SnapshotMark::Yes => "true",
            SnapshotMark::Last => "last",
            SnapshotMark::Incremental => "incremental",
        }
    }
}

/// Where a change came from. Fields a source does not have stay `None`. The texts are shared
/// (`Arc<str>`): a source hands the same database, table, file and transaction names to every
/// row of a run without copying them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceInfo {
    /// `"mysql"` (MariaDB too) or `"postgresql"`, as Debezium's `source.connector`.
    pub connector: &'static str,
    /// The connector's configured name (Debezium's logical server name).
    pub name: Arc<str>,
    pub db: Arc<str>,
    /// PostgreSQL schema.
    pub schema: Option<Arc<str>>,
    /// The physical table, also when the event is routed to a logical table's topic (E5).
    pub table: Arc<str>,
    /// Commit time of the transaction in the source, milliseconds since the epoch.
    pub ts_ms: i64,
    pub snapshot: SnapshotMark,
    pub server_id: Option<u32>,
    pub file: Option<Arc<str>>,
    pub pos: Option<u64>,
    /// Index of the row inside its rows event (binlog).
    pub row: Option<u32>,
    pub gtid: Option<Arc<str>>,
    pub lsn: Option<u64>,
    pub tx_id: Option<Arc<str>>,
}

impl SourceInfo {
    pub fn to_json(&self) -> Json {
        let mut map = Map::new();
        map.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        map.insert("connector".into(), json!(self.connector));
        map.insert("name".into(), json!(&*self.name));
        map.insert("ts_ms".into(), json!(self.ts_ms));
        map.insert("snapshot".into(), json!(self.snapshot.as_str()));
        map.insert("db".into(), json!(&*self.db));
        if let Some(schema) = &self.schema {
            map.insert("schema".into(), json!(&**schema));
        }
        map.insert("table".into(), json!(&*self.table));
        let optional = [
            ("server_id", self.server_id.map(|v| json!(v))),
            ("file", self.file.as_ref().map(|v| json!(&**v))),
            ("pos", self.pos.map(|v| json!(v))),
            ("row", self.row.map(|v| json!(v))),
            ("gtid", self.gtid.as_ref().map(|v| json!(&**v))),
            ("lsn", self.lsn.map(|v| json!(v))),
            ("txId", self.tx_id.as_ref().map(|v| json!(&**v))),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                map.insert(key.into(), value);
            }
        }
        Json::Object(map)
    }
}

/// One row change.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub op: Op,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// The primary-key columns (of `after`, or of `before` for a delete). Empty for a table
    /// without a primary key: the record then has no key.
    pub key: Row,
    pub source: SourceInfo,
    /// `transaction` block: id and this event's order in the transaction (1-based), overall
    /// and for its table. `None` when transaction metadata is off.
    pub transaction: Option<TransactionRef>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TransactionRef {
    pub id: String,
    pub total_order: u64,
    pub data_collection_order: u64,
}

impl ChangeEvent {
    /// A row read by a snapshot (initial or incremental): Debezium's `op: "r"`, the row as
    /// `after`, no `before`, no transaction.
    pub fn snapshot_read(after: Row, key: Row, source: SourceInfo) -> ChangeEvent {
        ChangeEvent {
            op: Op::Read,
            before: None,
            after: Some(after),
            key,
            source,
            transaction: None,
        }
    }

    /// The record value: Debezium's envelope. `now_ms` is when the event was produced.
    pub fn envelope(&self, now_ms: i64) -> Json {
        let row = |r: &Option<Row>| r.as_ref().map_or(Json::Null, Row::to_json);
        let transaction = self.transaction.as_ref().map_or(Json::Null, |t| {
            json!({
                "id": t.id,
                "total_order": t.total_order,
                "data_collection_order": t.data_collection_order,
            })
        });
        json!({
            "before": row(&self.before),
            "after": row(&self.after),
            "source": self.source.to_json(),
            "op": self.op.code(),
            "ts_ms": now_ms,
            "transaction": transaction,
        })
    }

    /// The record key, `None` when the table has no primary key.
    pub fn key_json(&self) -> Option<Json> {
        (!self.key.columns.is_empty()).then(|| self.key.to_json())
    }
}

// The record key and value are written straight from the event with serde's serializer: the
// same JSON as `key_json()`/`envelope()` render, without building a `serde_json::Value` tree
// (one allocation per column name and value) for every event on the hot path.

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(f) => s.serialize_str(&f.to_string()),
            Value::Bytes(b) => {
                s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
            Value::Decimal(t)
            | Value::Text(t)
            | Value::Date(t)
            | Value::Time(t)
            | Value::DateTime(t)
            | Value::Timestamp(t)
            | Value::Json(t) => s.serialize_str(t),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
        }
    }
}

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.columns.len()))?;
        for (name, value) in &self.columns {
            map.serialize_entry(&**name, value)?;
        }
        map.end()
    }
}

impl Serialize for SourceInfo {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("version", env!("CARGO_PKG_VERSION"))?;
        map.serialize_entry("connector", self.connector)?;
        map.serialize_entry("name", &*self.name)?;
        map.serialize_entry("ts_ms", &self.ts_ms)?;
        map.serialize_entry("snapshot", self.snapshot.as_str())?;
        map.serialize_entry("db", &*self.db)?;
        if let Some(schema) = &self.schema {
            map.serialize_entry("schema", &**schema)?;
        }
        map.serialize_entry("table", &*self.table)?;
        if let Some(v) = self.server_id {
            map.serialize_entry("server_id", &v)?;
        }
        if let Some(v) = &self.file {
            map.serialize_entry("file", &**v)?;
        }
        if let Some(v) = self.pos {
            map.serialize_entry("pos", &v)?;
        }
        if let Some(v) = self.row {
            map.serialize_entry("row", &v)?;
        }
        if let Some(v) = &self.gtid {
            map.serialize_entry("gtid", &**v)?;
        }
        if let Some(v) = self.lsn {
            map.serialize_entry("lsn", &v)?;
        }
        if let Some(v) = &self.tx_id {
            map.serialize_entry("txId", &**v)?;
        }
        map.end()
    }
}

/// The envelope of one event as serde sees it: the reference [`ChangeEvent::write_envelope`]
/// is tested against.
#[cfg(test)]
struct Envelope<'a> {
    event: &'a ChangeEvent,
    now_ms: i64,
}

#[cfg(test)]
impl Serialize for Envelope<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.event;
        let mut map = s.serialize_map(Some(6))?;
        map.serialize_entry("before", &e.before)?;
        map.serialize_entry("after", &e.after)?;
        map.serialize_entry("source", &e.source)?;
        map.serialize_entry("op", e.op.code())?;
        map.serialize_entry("ts_ms", &self.now_ms)?;
        match &e.transaction {
            None => map.serialize_entry("transaction", &())?,
            Some(t) => map.serialize_entry(
                "transaction",
                &TransactionBlock {
                    id: &t.id,
                    total_order: t.total_order,
                    data_collection_order: t.data_collection_order,
                },
            )?,
        }
        map.end()
    }
}

#[cfg(test)]
#[derive(serde::Serialize)]
struct TransactionBlock<'a> {
    id: &'a str,
    total_order: u64,
    data_collection_order: u64,
}

// The key and value are written by hand, byte for byte what serde_json writes for the
// `Serialize` impls above: serde_json escapes a string byte by byte, which was the largest
// single cost of producing a snapshot row; strings go through `qanat_json::write_str`, which
// copies runs that need no escaping (nearly every string) whole.

fn write_value(out: &mut Vec<u8>, value: &Value) -> Result<(), serde_json::Error> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(i) => qanat_json::write_i64(out, *i),
        Value::UInt(u) => qanat_json::write_u64(out, *u),
        Value::Bytes(b) => {
            let engine = &base64::engine::general_purpose::STANDARD;
            let start = out.len() + 1;
            let len = base64::encoded_len(b.len(), true).unwrap_or(0);
            out.push(b'"');
            out.resize(start + len, 0);
            let written = engine.encode_slice(b, &mut out[start..]).unwrap_or(0);
            out.truncate(start + written);
            out.push(b'"');
        }
        Value::Decimal(t)
        | Value::Text(t)
        | Value::Date(t)
        | Value::Time(t)
        | Value::DateTime(t)
        | Value::Timestamp(t)
        | Value::Json(t) => qanat_json::write_str(out, t),
        // Rare: floats (their shortest form) and arrays take serde_json's path.
        Value::Float(_) | Value::Array(_) => serde_json::to_writer(&mut *out, value)?,
    }
    Ok(())
}

fn write_row(out: &mut Vec<u8>, row: &Row) -> Result<(), serde_json::Error> {
    out.push(b'{');
    for (i, (name, value)) in row.columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        qanat_json::write_str(out, name);
        out.push(b':');
        write_value(out, value)?;
    }
    out.push(b'}');
    Ok(())
}

fn write_optional_row(out: &mut Vec<u8>, row: &Option<Row>) -> Result<(), serde_json::Error> {
    match row {
        Some(row) => write_row(out, row),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn write_source(out: &mut Vec<u8>, s: &SourceInfo) -> Result<(), serde_json::Error> {
    out.extend_from_slice(
        concat!(
            "{\"version\":\"",
            env!("CARGO_PKG_VERSION"),
            "\",\"connector\":"
        )
        .as_bytes(),
    );
    qanat_json::write_str(out, s.connector);
    out.extend_from_slice(b",\"name\":");
    qanat_json::write_str(out, &s.name);
    out.extend_from_slice(b",\"ts_ms\":");
    qanat_json::write_i64(out, s.ts_ms);
    out.extend_from_slice(b",\"snapshot\":\"");
    out.extend_from_slice(s.snapshot.as_str().as_bytes());
    out.extend_from_slice(b"\",\"db\":");
    qanat_json::write_str(out, &s.db);
    if let Some(schema) = &s.schema {
        out.extend_from_slice(b",\"schema\":");
        qanat_json::write_str(out, schema);
    }
    out.extend_from_slice(b",\"table\":");
    qanat_json::write_str(out, &s.table);
    if let Some(v) = s.server_id {
        out.extend_from_slice(b",\"server_id\":");
        qanat_json::write_u64(out, u64::from(v));
    }
    if let Some(v) = &s.file {
        out.extend_from_slice(b",\"file\":");
        qanat_json::write_str(out, v);
    }
    if let Some(v) = s.pos {
        out.extend_from_slice(b",\"pos\":");
        qanat_json::write_u64(out, v);
    }
    if let Some(v) = s.row {
        out.extend_from_slice(b",\"row\":");
        qanat_json::write_u64(out, u64::from(v));
    }
    if let Some(v) = &s.gtid {
        out.extend_from_slice(b",\"gtid\":");
        qanat_json::write_str(out, v);
    }
    if let Some(v) = s.lsn {
        out.extend_from_slice(b",\"lsn\":");
        qanat_json::write_u64(out, v);
    }
    if let Some(v) = &s.tx_id {
        out.extend_from_slice(b",\"txId\":");
        qanat_json::write_str(out, v);
    }
    out.push(b'}');
    Ok(())
}

impl ChangeEvent {
    /// Append the record value (the JSON text of [`ChangeEvent::envelope`]) to `out`.
    pub fn write_envelope(&self, now_ms: i64, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.extend_from_slice(b"{\"before\":");
        write_optional_row(out, &self.before)?;
        out.extend_from_slice(b",\"after\":");
        write_optional_row(out, &self.after)?;
        out.extend_from_slice(b",\"source\":");
        write_source(out, &self.source)?;
        out.extend_from_slice(b",\"op\":\"");
        out.extend_from_slice(self.op.code().as_bytes());
        out.extend_from_slice(b"\",\"ts_ms\":");
        qanat_json::write_i64(out, now_ms);
        out.extend_from_slice(b",\"transaction\":");
        match &self.transaction {
            None => out.extend_from_slice(b"null"),
            Some(t) => {
                out.extend_from_slice(b"{\"id\":");
                qanat_json::write_str(out, &t.id);
                out.extend_from_slice(b",\"total_order\":");
                qanat_json::write_u64(out, t.total_order);
                out.extend_from_slice(b",\"data_collection_order\":");
                qanat_json::write_u64(out, t.data_collection_order);
                out.push(b'}');
            }
        }
        out.push(b'}');
        Ok(())
    }

    /// Append the record key (the JSON text of [`ChangeEvent::key_json`]) to `out`; false,
    /// writing nothing, when the table has no primary key.
    pub fn write_key(&self, out: &mut Vec<u8>) -> Result<bool, serde_json::Error> {
        if self.key.columns.is_empty() {
            return Ok(false);
        }
        write_row(out, &self.key)?;
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn row(cols: &[(&str, Value)]) -> Row {
        Row {
            columns: cols
                .iter()
                .map(|(n, v)| (Arc::from(*n), v.clone()))
                .collect(),
        }
    }

    #[test]
    fn envelope_has_debezium_fields_and_exact_values() {
        let event = ChangeEvent {
            op: Op::Update,
            before: Some(row(&[("id", Value::UInt(u64::MAX)), ("note", Value::Null)])),
            after: Some(row(&[
                ("id", Value::UInt(u64::MAX)),
                ("note", Value::Text(String::new())),
                ("price", Value::Decimal("12345678901234567890.0100".into())),
                ("blob", Value::Bytes(vec![0, 255])),
            ])),
            key: row(&[("id", Value::UInt(u64::MAX))]),
            source: SourceInfo {
                connector: "mysql",
                name: "shop".into(),
                db: "shop".into(),
                table: "orders".into(),
                ts_ms: 5,
                file: Some("bin.000001".into()),
                pos: Some(4),
                ..SourceInfo::default()
            },
            transaction: None,
        };
        let v = event.envelope(9);
        assert_eq!(v["op"], "u");
        assert_eq!(v["ts_ms"], 9);
        assert_eq!(v["before"]["note"], Json::Null);
        assert_eq!(v["after"]["note"], "");
        assert_eq!(v["after"]["id"], json!(u64::MAX));
        assert_eq!(v["after"]["price"], "12345678901234567890.0100");
        assert_eq!(v["after"]["blob"], "AP8=");
        assert_eq!(v["source"]["snapshot"], "false");
        assert_eq!(v["source"]["file"], "bin.000001");
        assert!(v["source"].get("lsn").is_none());
        assert_eq!(event.key_json(), Some(json!({"id": u64::MAX})));
        assert_written_as_tree(&event);
    }

    /// The bytes written directly parse to exactly the tree `envelope`/`key_json` build, and
    /// are byte for byte what serde_json writes for the `Serialize` impls.
    fn assert_written_as_tree(event: &ChangeEvent) {
        let mut value = Vec::new();
        event.write_envelope(9, &mut value).expect("write envelope");
        let reference = serde_json::to_vec(&Envelope { event, now_ms: 9 }).expect("serde");
        assert_eq!(
            String::from_utf8_lossy(&value),
            String::from_utf8_lossy(&reference)
        );
        if !event.key.columns.is_empty() {
            let mut key = Vec::new();
            event.write_key(&mut key).expect("write key");
            assert_eq!(key, serde_json::to_vec(&event.key).expect("serde key"));
        }
        let parsed: Json = serde_json::from_slice(&value).expect("envelope is JSON");
        assert_eq!(parsed, event.envelope(9));
        let mut key = Vec::new();
        let has_key = event.write_key(&mut key).expect("write key");
        assert_eq!(has_key, event.key_json().is_some());
        if has_key {
            let parsed: Json = serde_json::from_slice(&key).expect("key is JSON");
            assert_eq!(Some(parsed), event.key_json());
        } else {
            assert!(key.is_empty());
        }
    }

    #[test]
    fn every_value_kind_is_written_as_its_tree() {
        let event = ChangeEvent {
            op: Op::Create,
            before: None,
            after: Some(row(&[
                ("n", Value::Null),
                ("b", Value::Bool(true)),
                ("i", Value::Int(i64::MIN)),
                ("u", Value::UInt(u64::MAX)),
                ("f", Value::Float(0.1)),
                ("inf", Value::Float(f64::INFINITY)),
                ("dec", Value::Decimal("-0.0100".into())),
                (
                    "t",
                    Value::Text("quote \" backslash \\ nl \n é \u{1}".into()),
                ),
                ("bytes", Value::Bytes(vec![0, 1, 254, 255])),
                ("d", Value::Date("2026-11-29".into())),
                ("tm", Value::Time("-838:59:59.000000".into())),
                ("dt", Value::DateTime("2026-11-29T12:00:00".into())),
                ("ts", Value::Timestamp("2026-11-29T12:00:00Z".into())),
                ("j", Value::Json("{\"k\":[1]}".into())),
                (
                    "a",
                    Value::Array(vec![Value::Int(1), Value::Null, Value::Text("x".into())]),
                ),
            ])),
            key: row(&[("i", Value::Int(i64::MIN)), ("t", Value::Text("k".into()))]),
            source: SourceInfo {
                connector: "postgresql",
                name: "n".into(),
                db: "d".into(),
                schema: Some("public".into()),
                table: "t".into(),
                snapshot: SnapshotMark::Last,
                lsn: Some(42),
                tx_id: Some("7".into()),
                ..SourceInfo::default()
            },
            transaction: Some(TransactionRef {
                id: "7".into(),
                total_order: 3,
                data_collection_order: 2,
            }),
        };
        assert_written_as_tree(&event);
    }

    #[test]
    fn keyless_table_has_no_record_key() {
        let event = ChangeEvent {
            op: Op::Create,
            before: None,
            after: Some(row(&[("v", Value::Float(f64::NAN))])),
            key: Row::default(),
            source: SourceInfo::default(),
            transaction: None,
        };
        assert_eq!(event.key_json(), None);
        assert_eq!(event.envelope(0)["after"]["v"], "NaN");
        assert_written_as_tree(&event);
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_written_as_serde_json_writes_it(
            text in "\\PC{0,40}|[\\x00-\\x7f]{0,40}",
            name in "[a-z\"\\\\]{1,20}",
        ) {
            let event = ChangeEvent {
                op: Op::Create,
                before: None,
                after: Some(row(&[(name.as_str(), Value::Text(text.clone())), ("id", Value::Int(1))])),
                key: row(&[("id", Value::Int(1))]),
                source: SourceInfo { table: text.as_str().into(), ..SourceInfo::default() },
                transaction: None,
            };
            let mut value = Vec::new();
            event.write_envelope(9, &mut value).expect("write envelope");
            let reference = serde_json::to_vec(&Envelope { event: &event, now_ms: 9 }).expect("serde");
            proptest::prop_assert_eq!(value, reference);
        }
    }
}
