//! Column types of landed data and how JSON values become Arrow values.
//!
//! A column's type is either configured (`int64`, `float64`, `bool`, `string`, `timestamp`,
//! `date`, `decimal(p,s)`) or inferred from the first non-null value seen: JSON integer →
//! Int64, other number → Float64, bool → Boolean, string → Utf8, object or array → Utf8
//! holding the JSON text. A column seen only as null so far is held as an all-null Utf8
//! column of unknown type; its first non-null value fixes the type (a schema change).
//!
//! An inferred type is held until a value of another JSON kind arrives; that is a schema
//! change (the caller starts a new file), except that a Float64 column takes integers. So is
//! a column the held ones do not have; a held column missing from a row is null in it. A
//! configured type is never changed: a value that does not convert is an error naming the
//! column, the expected type and the value.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Builder, Int64Builder,
    StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::ArrayRef;
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::columns;

/// The type of a data column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Int64,
    Float64,
    Bool,
    String,
    /// UTC instant, milliseconds: from ISO-8601 text (no zone means UTC) or epoch milliseconds.
    Timestamp,
    /// From `YYYY-MM-DD` text or days since the epoch.
    Date,
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// Inferred columns seen only as null so far (written as an all-null Utf8 column).
    Unknown,
}

/// A configured type name that is not one of the supported ones.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("type {0:?}: expected int64, float64, bool, string, timestamp, date or decimal(p,s) with 1 <= p <= 38 and 0 <= s <= p")]
pub struct BadTypeName(pub String);

impl FromStr for ColumnType {
    type Err = BadTypeName;

    fn from_str(text: &str) -> Result<Self, BadTypeName> {
        let bad = || BadTypeName(text.to_owned());
        let t = text.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "int64" | "bigint" | "long" => ColumnType::Int64,
            "float64" | "double" => ColumnType::Float64,
            "bool" | "boolean" => ColumnType::Bool,
            "string" | "utf8" | "text" => ColumnType::String,
            "timestamp" => ColumnType::Timestamp,
            "date" => ColumnType::Date,
            _ => {
                let inner = t
                    .strip_prefix("decimal(")
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(bad)?;
                let (p, s) = inner.split_once(',').ok_or_else(bad)?;
                let precision: u8 = p.trim().parse().map_err(|_| bad())?;
                let scale: i8 = s.trim().parse().map_err(|_| bad())?;
                if !(1..=38).contains(&precision) || scale < 0 || scale as u8 > precision {
                    return Err(bad());
                }
                ColumnType::Decimal { precision, scale }
            }
        })
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Int64 => f.write_str("int64"),
            ColumnType::Float64 => f.write_str("float64"),
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::String => f.write_str("string"),
            ColumnType::Timestamp => f.write_str("timestamp"),
            ColumnType::Date => f.write_str("date"),
            ColumnType::Decimal { precision, scale } => write!(f, "decimal({precision},{scale})"),
            ColumnType::Unknown => f.write_str("unknown (only nulls so far)"),
        }
    }
}

impl ColumnType {
    pub fn arrow_type(self) -> DataType {
        match self {
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::String | ColumnType::Unknown => DataType::Utf8,
            ColumnType::Timestamp => utc_millis(),
            ColumnType::Date => DataType::Date32,
            ColumnType::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
        }
    }

    /// The inferred type of a value; `Unknown` for null.
    pub fn infer(value: &Scalar<'_>) -> ColumnType {
        match value {
            Scalar::Null => ColumnType::Unknown,
            Scalar::Bool(_) => ColumnType::Bool,
            Scalar::Int(_) => ColumnType::Int64,
            Scalar::Float(_) => ColumnType::Float64,
            Scalar::Str(_) | Scalar::Json(_) => ColumnType::String,
        }
    }
}

/// `Timestamp(Millisecond, "UTC")`, the type of every time column of the lake.
pub fn utc_millis() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// One JSON value of a row image, borrowed from the record where possible.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    /// An object or array, as compact JSON text.
    Json(String),
}

impl Scalar<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "bool",
            Scalar::Int(_) => "integer",
            Scalar::Float(_) => "number",
            Scalar::Str(_) => "string",
            Scalar::Json(_) => "object/array",
        }
    }
}

impl fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Null => f.write_str("null"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Str(s) => write!(f, "{s:?}"),
            Scalar::Json(s) => f.write_str(s),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar<'de>, E> {
                i64::try_from(v).map(Scalar::Int).map_err(|_| {
                    E::custom(format!(
                        "integer {v} does not fit int64 (configure the column as decimal(20,0) or string)"
                    ))
                })
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
                let v = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Scalar::Json(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
                let v = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Scalar::Json(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A column name, borrowed unless it had escapes (serde's `Cow` always copies).
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A row image: column names in the record's order with their values.
#[derive(Debug, Default, PartialEq)]
pub struct RowImage<'a>(pub Vec<(Cow<'a, str>, Scalar<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for RowImage<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RowImage<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of column values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RowImage<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((k, v)) = map.next_entry::<Name<'de>, Scalar<'de>>()? {
                    out.push((k.0, v));
                }
                Ok(RowImage(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A data column of a file: its name, type and whether the type is configured (fixed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataColumn {
    pub name: String,
    pub ty: ColumnType,
    pub configured: bool,
}

/// What appending a row found.
#[derive(Debug, PartialEq)]
pub enum Fit {
    /// The row was appended; a held column the row does not have is null in it.
    Appended,
    /// The row does not fit the held columns (a new column, or a value of another kind):
    /// nothing was appended; the caller starts a new file with [`infer_columns`].
    SchemaChange(String),
}

/// A value that does not convert to its column's configured type.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("column {column}: {value} does not fit type {ty}: {reason}")]
pub struct ValueError {
    pub column: String,
    pub ty: ColumnType,
    pub value: String,
    pub reason: String,
}

/// The columns for a row: configured types where given, else inferred from the row.
/// Reserved (`_`-prefixed metadata) names are refused by the caller.
pub fn infer_columns(row: &RowImage<'_>, configured: &[(String, ColumnType)]) -> Vec<DataColumn> {
    row.0
        .iter()
        .map(
            |(name, value)| match configured.iter().find(|(n, _)| n == name) {
                Some((_, ty)) => DataColumn {
                    name: name.to_string(),
                    ty: *ty,
                    configured: true,
                },
                None => DataColumn {
                    name: name.to_string(),
                    ty: ColumnType::infer(value),
                    configured: false,
                },
            },
        )
        .collect()
}

/// Builder of one data column.
enum Builder {
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
    Ts(TimestampMillisecondBuilder),
    Date(Date32Builder),
    Dec(Decimal128Builder),
}

impl Builder {
    fn new(ty: ColumnType) -> Builder {
        match ty {
            ColumnType::Int64 => Builder::Int(Int64Builder::new()),
            ColumnType::Float64 => Builder::Float(Float64Builder::new()),
            ColumnType::Bool => Builder::Bool(BooleanBuilder::new()),
            ColumnType::String | ColumnType::Unknown => Builder::Str(StringBuilder::new()),
            ColumnType::Timestamp => {
                Builder::Ts(TimestampMillisecondBuilder::new().with_timezone("UTC"))
            }
            ColumnType::Date => Builder::Date(Date32Builder::new()),
            ColumnType::Decimal { precision, scale } => Builder::Dec(
                Decimal128Builder::new().with_data_type(DataType::Decimal128(precision, scale)),
            ),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Int(b) => Arc::new(b.finish()),
            Builder::Float(b) => Arc::new(b.finish()),
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Str(b) => Arc::new(b.finish()),
            Builder::Ts(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Dec(b) => Arc::new(b.finish()),
        }
    }
}

/// The converted form of a value, checked before anything of the row is appended. Text is
/// taken from the row when appended, so a row's cells are kept in a reused buffer.
#[derive(Clone, Copy)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text,
    Ts(i64),
    Date(i32),
    Dec(i128),
}

/// Whether `value` is one an inferred column of type `ty` keeps (else: schema change).
fn inferred_fits(ty: ColumnType, value: &Scalar<'_>) -> bool {
    matches!(
        (ty, value),
        (_, Scalar::Null)
            | (ColumnType::Int64, Scalar::Int(_))
            | (ColumnType::Float64, Scalar::Int(_) | Scalar::Float(_))
            | (ColumnType::Bool, Scalar::Bool(_))
            | (ColumnType::String, Scalar::Str(_) | Scalar::Json(_))
    )
}

fn convert(col: &DataColumn, value: &Scalar<'_>) -> Result<Cell, ValueError> {
    let fail = |reason: &str| ValueError {
        column: col.name.clone(),
        ty: col.ty,
        value: value.to_string(),
        reason: reason.to_owned(),
    };
    Ok(match (col.ty, value) {
        (_, Scalar::Null) => Cell::Null,
        (ColumnType::Int64, Scalar::Int(i)) => Cell::Int(*i),
        (ColumnType::Int64, Scalar::Str(s)) if col.configured => {
            Cell::Int(s.trim().parse().map_err(|_| fail("not an integer"))?)
        }
        (ColumnType::Float64, Scalar::Int(i)) => Cell::Float(*i as f64),
        (ColumnType::Float64, Scalar::Float(x)) => Cell::Float(*x),
        (ColumnType::Float64, Scalar::Str(s)) if col.configured => {
            // NaN and infinities travel as text in Debezium's JSON.
            Cell::Float(s.trim().parse().map_err(|_| fail("not a number"))?)
        }
        (ColumnType::Bool, Scalar::Bool(b)) => Cell::Bool(*b),
        (ColumnType::String, Scalar::Str(_) | Scalar::Json(_)) => Cell::Text,
        (ColumnType::Timestamp, Scalar::Int(ms)) => Cell::Ts(*ms),
        (ColumnType::Timestamp, Scalar::Str(s)) => {
            Cell::Ts(parse_timestamp_ms(s).ok_or_else(|| fail("not an ISO-8601 date-time"))?)
        }
        (ColumnType::Date, Scalar::Int(days)) => {
            Cell::Date(i32::try_from(*days).map_err(|_| fail("days since the epoch out of range"))?)
        }
        (ColumnType::Date, Scalar::Str(s)) => {
            let d = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
                .map_err(|_| fail("not a YYYY-MM-DD date"))?;
            Cell::Date((d - NaiveDate::default()).num_days() as i32)
        }
        (ColumnType::Decimal { precision, scale }, Scalar::Str(s)) => {
            Cell::Dec(parse_decimal(s, precision, scale).map_err(|r| fail(&r))?)
        }
        (ColumnType::Decimal { precision, scale }, Scalar::Int(i)) => {
            Cell::Dec(parse_decimal(&i.to_string(), precision, scale).map_err(|r| fail(&r))?)
        }
        (ColumnType::Decimal { precision, scale }, Scalar::Float(x)) => {
            Cell::Dec(parse_decimal(&x.to_string(), precision, scale).map_err(|r| fail(&r))?)
        }
        (ColumnType::String, _) if col.configured => {
            return Err(fail("a string column takes strings, objects and arrays"))
        }
        _ => return Err(fail(&format!("a {} value", value.kind()))),
    })
}

/// Milliseconds since the epoch of ISO-8601 text; without a zone the time is UTC.
pub fn parse_timestamp_ms(text: &str) -> Option<i64> {
    let t = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Some(dt.timestamp_millis());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(t, fmt) {
            return Some(dt.and_utc().timestamp_millis());
        }
    }
    None
}

/// Exact decimal text to its unscaled i128 at `scale`; more fractional digits than `scale`
/// or more digits than `precision` is an error (never rounded).
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<i128, String> {
    let t = text.trim();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err("not a decimal number".into());
    }
    let scale = scale.max(0) as usize;
    let frac_trimmed = frac_part.trim_end_matches('0');
    if frac_trimmed.len() > scale {
        return Err(format!("more than {scale} fractional digits"));
    }
    let int_trimmed = int_part.trim_start_matches('0');
    if int_trimmed.len() + scale > precision as usize {
        return Err(format!("more than {precision} digits"));
    }
    let mut unscaled: i128 = 0;
    for b in int_trimmed
        .bytes()
        .chain(frac_trimmed.bytes())
        .chain(std::iter::repeat_n(b'0', scale - frac_trimmed.len()))
    {
        unscaled = unscaled * 10 + i128::from(b - b'0');
    }
    Ok(if neg { -unscaled } else { unscaled })
}

/// Builders of one file's data columns.
pub struct DataBuilders {
    columns: Vec<DataColumn>,
    builders: Vec<Builder>,
    /// Per column, its position in the row being appended.
    scratch: Vec<Option<usize>>,
    /// The row's converted values, per column.
    cells: Vec<Cell>,
}

impl DataBuilders {
    pub fn new(columns: Vec<DataColumn>) -> DataBuilders {
        let builders = columns.iter().map(|c| Builder::new(c.ty)).collect();
        DataBuilders {
            scratch: Vec::with_capacity(columns.len()),
            cells: Vec::with_capacity(columns.len()),
            columns,
            builders,
        }
    }

    pub fn fields(&self) -> Vec<Field> {
        self.columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), true))
            .collect()
    }

    /// Append `row`, or report that it needs other columns; on an error nothing is appended.
    pub fn append(&mut self, row: &RowImage<'_>) -> Result<Fit, ValueError> {
        // Map each column to its value in the row; same order is the common case.
        self.scratch.clear();
        self.scratch.resize(self.columns.len(), None);
        for (i, (name, _)) in row.0.iter().enumerate() {
            let at = if self.columns.get(i).is_some_and(|c| c.name == *name) {
                i
            } else {
                match self.columns.iter().position(|c| c.name == *name) {
                    Some(at) => at,
                    None => return Ok(Fit::SchemaChange(format!("new column {name}"))),
                }
            };
            if self.scratch[at].replace(i).is_some() {
                return Ok(Fit::SchemaChange(format!("column {name} twice")));
            }
        }
        self.cells.clear();
        for (at, col) in self.columns.iter().enumerate() {
            // A column the row does not have is null in it.
            let Some(i) = self.scratch[at] else {
                self.cells.push(Cell::Null);
                continue;
            };
            let value = &row.0[i].1;
            if !col.configured {
                if col.ty == ColumnType::Unknown && *value != Scalar::Null {
                    return Ok(Fit::SchemaChange(format!(
                        "column {} now has a type",
                        col.name
                    )));
                }
                if !inferred_fits(col.ty, value) && col.ty != ColumnType::Unknown {
                    return Ok(Fit::SchemaChange(format!(
                        "column {} changed from {} to a {} value",
                        col.name,
                        col.ty,
                        value.kind()
                    )));
                }
            }
            self.cells.push(convert(col, value)?);
        }
        for (at, (builder, cell)) in self.builders.iter_mut().zip(&self.cells).enumerate() {
            match (builder, *cell) {
                (Builder::Int(b), Cell::Int(v)) => b.append_value(v),
                (Builder::Float(b), Cell::Float(v)) => b.append_value(v),
                (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
                (Builder::Str(b), Cell::Text) => {
                    match self.scratch[at].and_then(|i| row.0.get(i)).map(|(_, v)| v) {
                        Some(Scalar::Str(s)) => b.append_value(s),
                        Some(Scalar::Json(s)) => b.append_value(s),
                        _ => b.append_null(),
                    }
                }
                (Builder::Ts(b), Cell::Ts(v)) => b.append_value(v),
                (Builder::Date(b), Cell::Date(v)) => b.append_value(v),
                (Builder::Dec(b), Cell::Dec(v)) => b.append_value(v),
                (Builder::Int(b), _) => b.append_null(),
                (Builder::Float(b), _) => b.append_null(),
                (Builder::Bool(b), _) => b.append_null(),
                (Builder::Str(b), _) => b.append_null(),
                (Builder::Ts(b), _) => b.append_null(),
                (Builder::Date(b), _) => b.append_null(),
                (Builder::Dec(b), _) => b.append_null(),
            }
        }
        Ok(Fit::Appended)
    }

    /// The arrays of the rows appended since the last call.
    pub fn finish(&mut self) -> Vec<ArrayRef> {
        self.builders.iter_mut().map(Builder::finish).collect()
    }
}

/// Builders of the metadata columns of change-log rows, in [`columns::CHANGE_LOG`] order.
pub struct MetaBuilders {
    op: StringBuilder,
    log_pos: StringBuilder,
    log_time: TimestampMillisecondBuilder,
    commit_ts: TimestampMillisecondBuilder,
    extract_time: TimestampMillisecondBuilder,
    topic: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
}

/// The source position of a change (`_log_pos`), kept in parts until it is written into
/// the column's builder, so no text is made per row.
#[derive(Debug, Clone, PartialEq)]
pub enum LogPos<'a> {
    None,
    Text(Cow<'a, str>),
    /// A binlog position, written `file:pos:row`.
    Binlog {
        file: Cow<'a, str>,
        pos: u64,
        row: u64,
    },
    /// A PostgreSQL LSN, written as its decimal number.
    Lsn(u64),
}

/// The metadata of one change-log row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMeta<'a> {
    pub op: &'a str,
    pub log_pos: LogPos<'a>,
    pub log_time_ms: i64,
    pub commit_ts_ms: i64,
    pub extract_time_ms: i64,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl Default for MetaBuilders {
    fn default() -> Self {
        let ts = || TimestampMillisecondBuilder::new().with_timezone("UTC");
        MetaBuilders {
            op: StringBuilder::new(),
            log_pos: StringBuilder::new(),
            log_time: ts(),
            commit_ts: ts(),
            extract_time: ts(),
            topic: StringBuilder::new(),
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
        }
    }
}

impl MetaBuilders {
    pub fn fields() -> Vec<Field> {
        vec![
            Field::new(columns::OP, DataType::Utf8, false),
            Field::new(columns::LOG_POS, DataType::Utf8, true),
            Field::new(columns::LOG_TIME, utc_millis(), false),
            Field::new(columns::COMMIT_TS, utc_millis(), false),
            Field::new(columns::EXTRACT_TIME, utc_millis(), false),
            Field::new(columns::TOPIC, DataType::Utf8, false),
            Field::new(columns::PARTITION, DataType::Int32, false),
            Field::new(columns::OFFSET, DataType::Int64, false),
        ]
    }

    pub fn append(&mut self, m: &RowMeta<'_>) {
        self.op.append_value(m.op);
        match &m.log_pos {
            LogPos::None => self.log_pos.append_null(),
            LogPos::Text(t) => self.log_pos.append_value(t),
            LogPos::Binlog { file, pos, row } => {
                // Written in pieces straight into the builder's buffer, the numbers with
                // `itoa` (`write!`'s formatting machinery cost more than the rest of the
                // row's metadata). Writing to the builder cannot fail.
                let mut digits = itoa::Buffer::new();
                for piece in [&**file, ":", digits.format(*pos), ":"] {
                    let _ = self.log_pos.write_str(piece);
                }
                self.log_pos.append_value(digits.format(*row));
            }
            LogPos::Lsn(lsn) => self.log_pos.append_value(itoa::Buffer::new().format(*lsn)),
        }
        self.log_time.append_value(m.log_time_ms);
        self.commit_ts.append_value(m.commit_ts_ms);
        self.extract_time.append_value(m.extract_time_ms);
        self.topic.append_value(m.topic);
        self.partition.append_value(m.partition);
        self.offset.append_value(m.offset);
    }

    pub fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.op.finish()),
            Arc::new(self.log_pos.finish()),
            Arc::new(self.log_time.finish()),
            Arc::new(self.commit_ts.finish()),
            Arc::new(self.extract_time.finish()),
            Arc::new(self.topic.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
        ]
    }
}

/// The Arrow schema of a change-log file with these data columns.
pub fn change_log_schema(data: &DataBuilders) -> Schema {
    let mut fields = data.fields();
    fields.extend(MetaBuilders::fields());
    Schema::new(fields)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use arrow_array::Array;

    use super::*;

    fn row(json: &str) -> RowImage<'_> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn type_names_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "decimal(10, 2)".parse::<ColumnType>().unwrap(),
            ColumnType::Decimal {
                precision: 10,
                scale: 2
            }
        );
        assert_eq!("INT64".parse::<ColumnType>().unwrap(), ColumnType::Int64);
        for bad in [
            "int",
            "decimal(0,0)",
            "decimal(3,4)",
            "decimal(39,0)",
            "decimal(1)",
        ] {
            assert!(bad.parse::<ColumnType>().is_err(), "{bad}");
        }
    }

    #[test]
    fn types_are_inferred_from_the_first_row_and_held() {
        let r = row(r#"{"id":1,"price":2.5,"ok":true,"name":"a","tags":[1,2],"note":null}"#);
        let cols = infer_columns(&r, &[]);
        let types: Vec<_> = cols.iter().map(|c| c.ty).collect();
        assert_eq!(
            types,
            [
                ColumnType::Int64,
                ColumnType::Float64,
                ColumnType::Bool,
                ColumnType::String,
                ColumnType::String,
                ColumnType::Unknown
            ]
        );
        let mut b = DataBuilders::new(cols);
        assert_eq!(b.append(&r).unwrap(), Fit::Appended);
        // Another order, integer into the float column: fits.
        let r2 = row(r#"{"price":3,"id":2,"ok":false,"name":"b","tags":{},"note":null}"#);
        assert_eq!(b.append(&r2).unwrap(), Fit::Appended);
        // A string id: another kind, a schema change, nothing appended.
        let r3 = row(r#"{"id":"x","price":3,"ok":false,"name":"b","tags":{},"note":null}"#);
        assert!(matches!(b.append(&r3).unwrap(), Fit::SchemaChange(_)));
        let r4 = row(r#"{"id":3,"price":3,"ok":false,"name":"b","tags":{},"note":"now"}"#);
        assert!(matches!(b.append(&r4).unwrap(), Fit::SchemaChange(_)));
        // A missing field is null in the same columns; a new one is a schema change.
        let r5 = row(r#"{"id":3,"price":3,"ok":false,"name":"b","tags":{}}"#);
        assert_eq!(b.append(&r5).unwrap(), Fit::Appended);
        let r6 = row(r#"{"id":4,"name":"c"}"#);
        assert_eq!(b.append(&r6).unwrap(), Fit::Appended);
        let r7 = row(r#"{"id":5,"price":3,"ok":false,"name":"b","tags":{},"more":1}"#);
        assert!(matches!(b.append(&r7).unwrap(), Fit::SchemaChange(_)));
        let arrays = b.finish();
        assert_eq!(arrays[0].len(), 4);
        assert_eq!(arrays[1].null_count(), 1, "price missing from one row");
        assert_eq!(arrays[5].null_count(), 4, "note never seen non-null");
        assert_eq!(arrays[2].null_count(), 1, "ok missing from one row");
    }

    #[test]
    fn configured_types_convert_or_fail_precisely() {
        let configured = vec![
            ("amount".to_string(), "decimal(10,2)".parse().unwrap()),
            ("at".to_string(), ColumnType::Timestamp),
            ("day".to_string(), ColumnType::Date),
        ];
        let r = row(r#"{"amount":"12.30","at":"2026-11-29T12:00:00.5Z","day":"2026-11-29"}"#);
        let mut b = DataBuilders::new(infer_columns(&r, &configured));
        assert_eq!(b.append(&r).unwrap(), Fit::Appended);
        let bad = row(r#"{"amount":"12.345","at":"2026-11-29T12:00:00Z","day":"2026-11-29"}"#);
        let err = b.append(&bad).unwrap_err();
        assert_eq!(err.column, "amount");
        assert!(err.to_string().contains("12.345"), "{err}");
        let bad = row(r#"{"amount":"1","at":"yesterday","day":"2026-11-29"}"#);
        assert_eq!(b.append(&bad).unwrap_err().column, "at");
        let arrays = b.finish();
        assert_eq!(arrays[0].len(), 1);
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_decimal("-12.3400", 10, 2), Ok(-1234));
        assert_eq!(parse_decimal("7", 3, 2), Ok(700));
        assert!(parse_decimal("100", 3, 2).is_err());
        assert!(parse_decimal("1.005", 10, 2).is_err());
        assert!(parse_decimal("1e5", 10, 2).is_err());
        assert!(parse_decimal("", 10, 2).is_err());
    }

    #[test]
    fn integers_beyond_int64_are_an_error_not_a_silent_float() {
        let err = serde_json::from_str::<RowImage<'_>>(r#"{"id":18446744073709551615}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit int64"), "{err}");
    }
}
