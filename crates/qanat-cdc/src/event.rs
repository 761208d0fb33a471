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

/// The envelope of one event as serde sees it (see [`ChangeEvent::write_envelope`]).
struct Envelope<'a> {
    event: &'a ChangeEvent,
    now_ms: i64,
}

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

#[derive(serde::Serialize)]
struct TransactionBlock<'a> {
    id: &'a str,
    total_order: u64,
    data_collection_order: u64,
}

impl ChangeEvent {
    /// Append the record value (the JSON text of [`ChangeEvent::envelope`]) to `out`.
    pub fn write_envelope(&self, now_ms: i64, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        serde_json::to_writer(
            out,
            &Envelope {
                event: self,
                now_ms,
            },
        )
    }

    /// Append the record key (the JSON text of [`ChangeEvent::key_json`]) to `out`; false,
    /// writing nothing, when the table has no primary key.
    pub fn write_key(&self, out: &mut Vec<u8>) -> Result<bool, serde_json::Error> {
        if self.key.columns.is_empty() {
            return Ok(false);
        }
        serde_json::to_writer(out, &self.key)?;
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

    /// The bytes written directly parse to exactly the tree `envelope`/`key_json` build.
    fn assert_written_as_tree(event: &ChangeEvent) {
        let mut value = Vec::new();
        event.write_envelope(9, &mut value).expect("write envelope");
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
}
