//! The canonical type system: every reader maps its columns onto these types, every writer
//! maps them back, so any reader works with any writer. Values travel as Arrow arrays; each
//! value also has one canonical string form (used for CSV, dirty-record reports and the
//! `--verify` checksum). The mapping to and from each store is in `docs/sync-types.md`.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int64Builder,
    StringBuilder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float64Array,
    Int64Array, RecordBatch, RecordBatchOptions, StringArray, Time64MicrosecondArray,
    TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Timelike};

/// A canonical column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanonicalType {
    Bool,
    Int64,
    Float64,
    /// Exact decimal with precision ≤ 38 and scale ≤ precision.
    Decimal {
        precision: u8,
        scale: i8,
    },
    Utf8,
    Binary,
    Date,
    /// Time of day, microseconds.
    Time,
    /// Date and time without zone, microseconds.
    Timestamp,
    /// An instant, microseconds since the epoch, rendered in UTC.
    TimestampTz,
}

impl CanonicalType {
    pub fn arrow(self) -> DataType {
        match self {
            CanonicalType::Bool => DataType::Boolean,
            CanonicalType::Int64 => DataType::Int64,
            CanonicalType::Float64 => DataType::Float64,
            CanonicalType::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
            CanonicalType::Utf8 => DataType::Utf8,
            CanonicalType::Binary => DataType::Binary,
            CanonicalType::Date => DataType::Date32,
            CanonicalType::Time => DataType::Time64(TimeUnit::Microsecond),
            CanonicalType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            CanonicalType::TimestampTz => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
        }
    }

    pub fn name(self) -> String {
        match self {
            CanonicalType::Bool => "bool".into(),
            CanonicalType::Int64 => "int64".into(),
            CanonicalType::Float64 => "float64".into(),
            CanonicalType::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            CanonicalType::Utf8 => "utf8".into(),
            CanonicalType::Binary => "binary".into(),
            CanonicalType::Date => "date".into(),
            CanonicalType::Time => "time".into(),
            CanonicalType::Timestamp => "timestamp".into(),
            CanonicalType::TimestampTz => "timestamptz".into(),
        }
    }
}

/// One column of a table as the framework sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: CanonicalType,
    pub nullable: bool,
    /// The store's own type name, for messages.
    pub native: String,
}

/// A table's columns and primary key, in the store's column order.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSchema {
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
}

impl TableSchema {
    pub fn arrow(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.ty.arrow(), true))
                .collect::<Vec<_>>(),
        ))
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A value that does not fit its column's canonical type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: cannot read {value:?} as {ty}")]
pub struct ConvertError {
    pub column: String,
    pub ty: String,
    pub value: String,
}

const EPOCH_DAYS_FROM_CE: i32 = 719_163;

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// Parse an exact decimal string ("-12.5", "3", "1e3" is refused) into a scaled i128.
pub fn parse_decimal(s: &str, scale: i8) -> Option<i128> {
    let s = s.trim();
    let (neg, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int_part, frac_part) = match digits.split_once('.') {
        Some((i, f)) => (i, f),
        None => (digits, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let scale = usize::try_from(scale).ok()?;
    // Digits past the scale must be zeros: rounding would silently change the value.
    if frac_part.len() > scale && frac_part[scale..].bytes().any(|b| b != b'0') {
        return None;
    }
    let mut v: i128 = 0;
    for b in int_part.bytes() {
        v = v.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    for i in 0..scale {
        let d = frac_part.as_bytes().get(i).map_or(0, |b| b - b'0');
        v = v.checked_mul(10)?.checked_add(i128::from(d))?;
    }
    Some(if neg { -v } else { v })
}

pub fn render_decimal(v: i128, scale: i8) -> String {
    let neg = v < 0;
    let digits = v.unsigned_abs().to_string();
    let scale = usize::try_from(scale).unwrap_or(0);
    let s = if scale == 0 {
        digits
    } else if digits.len() > scale {
        format!(
            "{}.{}",
            &digits[..digits.len() - scale],
            &digits[digits.len() - scale..]
        )
    } else {
        format!("0.{}{}", "0".repeat(scale - digits.len()), digits)
    };
    if neg {
        format!("-{s}")
    } else {
        s
    }
}

fn parse_date(s: &str) -> Option<i32> {
    let d = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok()?;
    Some(d.num_days_from_ce() - EPOCH_DAYS_FROM_CE)
}

use chrono::Datelike;

fn parse_time(s: &str) -> Option<i64> {
    let t = NaiveTime::parse_from_str(s.trim(), "%H:%M:%S%.f").ok()?;
    Some(i64::from(t.num_seconds_from_midnight()) * 1_000_000 + i64::from(t.nanosecond() / 1000))
}

fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let t = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f"))
        .ok()?;
    Some(t.and_utc().timestamp_micros())
}

fn parse_timestamptz(s: &str) -> Option<i64> {
    let s = s.trim();
    // PostgreSQL prints "+00" for UTC; chrono wants "+00:00" or "+0000".
    let normalized;
    let s = if s.len() > 3
        && (s.as_bytes()[s.len() - 3] == b'+' || s.as_bytes()[s.len() - 3] == b'-')
        && s[s.len() - 2..].bytes().all(|b| b.is_ascii_digit())
    {
        normalized = format!("{s}:00");
        normalized.as_str()
    } else {
        s
    };
    if let Ok(t) = DateTime::<chrono::FixedOffset>::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%:z") {
        return Some(t.timestamp_micros());
    }
    // No zone: the session runs in UTC.
    parse_timestamp(s)
}

fn render_micros_of_day(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if frac == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{frac:06}")
    }
}

fn render_timestamp(us: i64) -> String {
    match DateTime::from_timestamp_micros(us) {
        Some(t) => {
            let t = t.naive_utc();
            let frac = t.nanosecond() / 1000;
            if frac == 0 {
                t.format("%Y-%m-%d %H:%M:%S").to_string()
            } else {
                format!("{}.{frac:06}", t.format("%Y-%m-%d %H:%M:%S"))
            }
        }
        None => us.to_string(),
    }
}

fn render_date(days: i32) -> String {
    match NaiveDate::from_num_days_from_ce_opt(days + EPOCH_DAYS_FROM_CE) {
        Some(d) => d.format("%Y-%m-%d").to_string(),
        None => days.to_string(),
    }
}

pub fn render_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else if v != 0.0 && (v.abs() >= 1e16 || v.abs() < 1e-5) {
        // Shortest round-trip digits with an exponent: a plain 309-digit literal would be
        // read as a DECIMAL (and clipped) by MariaDB.
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

enum ColumnBuilder {
    Bool(BooleanBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Utf8(StringBuilder),
    Binary(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder, bool),
}

/// A parsed cell, held until the whole row has parsed so a bad cell never leaves a
/// half-appended row in the builders.
enum Cell<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Decimal(i128),
    Text(&'a str),
    Bytes(&'a [u8]),
    Date(i32),
    Micros(i64),
}

/// Builds `RecordBatch`es from rows of text cells (the wire form of both MariaDB's text
/// protocol and PostgreSQL's text COPY).
pub struct BatchBuilder {
    schema: SchemaRef,
    types: Vec<CanonicalType>,
    names: Vec<String>,
    builders: Vec<ColumnBuilder>,
    rows: usize,
    bytes: usize,
}

impl BatchBuilder {
    pub fn new(table: &TableSchema) -> Self {
        let mut b = BatchBuilder {
            schema: table.arrow(),
            types: table.columns.iter().map(|c| c.ty).collect(),
            names: table.columns.iter().map(|c| c.name.clone()).collect(),
            builders: Vec::new(),
            rows: 0,
            bytes: 0,
        };
        b.reset();
        b
    }

    fn reset(&mut self) {
        self.builders = self
            .types
            .iter()
            .map(|t| match *t {
                CanonicalType::Bool => ColumnBuilder::Bool(BooleanBuilder::new()),
                CanonicalType::Int64 => ColumnBuilder::Int(Int64Builder::new()),
                CanonicalType::Float64 => ColumnBuilder::Float(Float64Builder::new()),
                CanonicalType::Decimal { precision, scale } => {
                    ColumnBuilder::Decimal(Decimal128Builder::new(), precision, scale)
                }
                CanonicalType::Utf8 => ColumnBuilder::Utf8(StringBuilder::new()),
                CanonicalType::Binary => ColumnBuilder::Binary(BinaryBuilder::new()),
                CanonicalType::Date => ColumnBuilder::Date(Date32Builder::new()),
                CanonicalType::Time => ColumnBuilder::Time(Time64MicrosecondBuilder::new()),
                CanonicalType::Timestamp => {
                    ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new(), false)
                }
                CanonicalType::TimestampTz => {
                    ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new(), true)
                }
            })
            .collect();
        self.rows = 0;
        self.bytes = 0;
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of cell text appended since the last batch.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Append one row of text cells (`None` is NULL). On a cell that does not convert, nothing
    /// is appended and the error names the column.
    pub fn push_text_row(&mut self, cells: &[Option<&[u8]>]) -> Result<(), ConvertError> {
        let mut parsed = Vec::with_capacity(cells.len());
        let mut bytes = 0;
        for (i, cell) in cells.iter().enumerate() {
            let ty = self.types[i];
            let Some(raw) = cell else {
                parsed.push(Cell::Null);
                continue;
            };
            bytes += raw.len();
            let bad = || ConvertError {
                column: self.names[i].clone(),
                ty: ty.name(),
                value: String::from_utf8_lossy(raw).chars().take(200).collect(),
            };
            let cell = match ty {
                CanonicalType::Binary => Cell::Bytes(raw),
                CanonicalType::Utf8 => Cell::Text(text(raw).ok_or_else(bad)?),
                _ => {
                    let s = text(raw).ok_or_else(bad)?;
                    match ty {
                        CanonicalType::Bool => Cell::Bool(match s {
                            "1" | "t" | "true" | "TRUE" => true,
                            "0" | "f" | "false" | "FALSE" => false,
                            _ => return Err(bad()),
                        }),
                        CanonicalType::Int64 => Cell::Int(s.trim().parse().map_err(|_| bad())?),
                        CanonicalType::Float64 => Cell::Float(match s {
                            "Infinity" | "inf" => f64::INFINITY,
                            "-Infinity" | "-inf" => f64::NEG_INFINITY,
                            _ => s.trim().parse().map_err(|_| bad())?,
                        }),
                        CanonicalType::Decimal { precision, scale } => {
                            let v = parse_decimal(s, scale).ok_or_else(bad)?;
                            if v.unsigned_abs() >= 10u128.pow(u32::from(precision)) {
                                return Err(bad());
                            }
                            Cell::Decimal(v)
                        }
                        CanonicalType::Date => Cell::Date(parse_date(s).ok_or_else(bad)?),
                        CanonicalType::Time => Cell::Micros(parse_time(s).ok_or_else(bad)?),
                        CanonicalType::Timestamp => {
                            Cell::Micros(parse_timestamp(s).ok_or_else(bad)?)
                        }
                        CanonicalType::TimestampTz => {
                            Cell::Micros(parse_timestamptz(s).ok_or_else(bad)?)
                        }
                        CanonicalType::Binary | CanonicalType::Utf8 => return Err(bad()),
                    }
                }
            };
            parsed.push(cell);
        }
        for (b, cell) in self.builders.iter_mut().zip(parsed) {
            match (b, cell) {
                (ColumnBuilder::Bool(b), Cell::Bool(v)) => b.append_value(v),
                (ColumnBuilder::Bool(b), _) => b.append_null(),
                (ColumnBuilder::Int(b), Cell::Int(v)) => b.append_value(v),
                (ColumnBuilder::Int(b), _) => b.append_null(),
                (ColumnBuilder::Float(b), Cell::Float(v)) => b.append_value(v),
                (ColumnBuilder::Float(b), _) => b.append_null(),
                (ColumnBuilder::Decimal(b, ..), Cell::Decimal(v)) => b.append_value(v),
                (ColumnBuilder::Decimal(b, ..), _) => b.append_null(),
                (ColumnBuilder::Utf8(b), Cell::Text(v)) => b.append_value(v),
                (ColumnBuilder::Utf8(b), _) => b.append_null(),
                (ColumnBuilder::Binary(b), Cell::Bytes(v)) => b.append_value(v),
                (ColumnBuilder::Binary(b), _) => b.append_null(),
                (ColumnBuilder::Date(b), Cell::Date(v)) => b.append_value(v),
                (ColumnBuilder::Date(b), _) => b.append_null(),
                (ColumnBuilder::Time(b), Cell::Micros(v)) => b.append_value(v),
                (ColumnBuilder::Time(b), _) => b.append_null(),
                (ColumnBuilder::Timestamp(b, _), Cell::Micros(v)) => b.append_value(v),
                (ColumnBuilder::Timestamp(b, _), _) => b.append_null(),
            }
        }
        self.rows += 1;
        self.bytes += bytes;
        Ok(())
    }

    /// The rows appended so far as one batch; the builder starts empty again.
    pub fn finish(&mut self) -> RecordBatch {
        let arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .map(|b| -> ArrayRef {
                match b {
                    ColumnBuilder::Bool(b) => Arc::new(b.finish()),
                    ColumnBuilder::Int(b) => Arc::new(b.finish()),
                    ColumnBuilder::Float(b) => Arc::new(b.finish()),
                    ColumnBuilder::Decimal(b, p, s) => Arc::new(
                        b.finish()
                            .with_precision_and_scale(*p, *s)
                            .unwrap_or_else(|_| Decimal128Array::from(Vec::<i128>::new())),
                    ),
                    ColumnBuilder::Utf8(b) => Arc::new(b.finish()),
                    ColumnBuilder::Binary(b) => Arc::new(b.finish()),
                    ColumnBuilder::Date(b) => Arc::new(b.finish()),
                    ColumnBuilder::Time(b) => Arc::new(b.finish()),
                    ColumnBuilder::Timestamp(b, tz) => {
                        let a = b.finish();
                        if *tz {
                            Arc::new(a.with_timezone("UTC"))
                        } else {
                            Arc::new(a)
                        }
                    }
                }
            })
            .collect();
        self.reset();
        let options =
            RecordBatchOptions::new().with_row_count(Some(arrays.first().map_or(0, |a| a.len())));
        RecordBatch::try_new_with_options(self.schema.clone(), arrays, &options)
            .unwrap_or_else(|_| RecordBatch::new_empty(self.schema.clone()))
    }
}

/// One cell of a batch as a typed reference, for writers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CellRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Decimal(i128, i8),
    Text(&'a str),
    Bytes(&'a [u8]),
    Date(i32),
    Time(i64),
    Timestamp(i64),
    TimestampTz(i64),
}

impl CellRef<'_> {
    /// The canonical string form; `None` for NULL.
    pub fn render(&self) -> Option<String> {
        Some(match *self {
            CellRef::Null => return None,
            CellRef::Bool(v) => v.to_string(),
            CellRef::Int(v) => v.to_string(),
            CellRef::Float(v) => render_float(v),
            CellRef::Decimal(v, s) => render_decimal(v, s),
            CellRef::Text(v) => v.to_string(),
            CellRef::Bytes(v) => hex(v),
            CellRef::Date(v) => render_date(v),
            CellRef::Time(v) => render_micros_of_day(v),
            CellRef::Timestamp(v) => render_timestamp(v),
            CellRef::TimestampTz(v) => format!("{}+00:00", render_timestamp(v)),
        })
    }

    /// The string form without a zone suffix (for stores whose session runs in UTC and whose
    /// literals take no offset, such as MariaDB's).
    pub fn render_naive(&self) -> Option<String> {
        match *self {
            CellRef::TimestampTz(v) => Some(render_timestamp(v)),
            _ => self.render(),
        }
    }
}

/// Typed access to the cells of a batch.
pub fn cell(array: &dyn Array, row: usize) -> CellRef<'_> {
    if array.is_null(row) {
        return CellRef::Null;
    }
    let any = array.as_any();
    if let Some(a) = any.downcast_ref::<Int64Array>() {
        CellRef::Int(a.value(row))
    } else if let Some(a) = any.downcast_ref::<StringArray>() {
        CellRef::Text(a.value(row))
    } else if let Some(a) = any.downcast_ref::<Float64Array>() {
        CellRef::Float(a.value(row))
    } else if let Some(a) = any.downcast_ref::<Decimal128Array>() {
        CellRef::Decimal(a.value(row), a.scale())
    } else if let Some(a) = any.downcast_ref::<BooleanArray>() {
        CellRef::Bool(a.value(row))
    } else if let Some(a) = any.downcast_ref::<BinaryArray>() {
        CellRef::Bytes(a.value(row))
    } else if let Some(a) = any.downcast_ref::<Date32Array>() {
        CellRef::Date(a.value(row))
    } else if let Some(a) = any.downcast_ref::<Time64MicrosecondArray>() {
        CellRef::Time(a.value(row))
    } else if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
        if a.timezone().is_some() {
            CellRef::TimestampTz(a.value(row))
        } else {
            CellRef::Timestamp(a.value(row))
        }
    } else {
        CellRef::Null
    }
}

/// A row's canonical rendering, for dirty-record reports.
pub fn render_row(batch: &RecordBatch, row: usize) -> serde_json::Map<String, serde_json::Value> {
    let schema = batch.schema();
    schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, a)| {
            let v = cell(a.as_ref(), row)
                .render()
                .map_or(serde_json::Value::Null, serde_json::Value::String);
            (f.name().clone(), v)
        })
        .collect()
}

/// An order-independent digest of a multiset of rows: count and wrapping sum of each row's
/// 64-bit hash of its canonical rendering. Equal multisets give equal digests; the hash is
/// SipHash with fixed keys, the same on both sides within one process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Digest {
    pub rows: u64,
    pub sum: u64,
}

impl Digest {
    pub fn add_batch(&mut self, batch: &RecordBatch) {
        for row in 0..batch.num_rows() {
            #[allow(deprecated)]
            let mut h = std::hash::SipHasher::new();
            for col in batch.columns() {
                match cell(col.as_ref(), row).render() {
                    Some(s) => {
                        1u8.hash(&mut h);
                        s.hash(&mut h);
                    }
                    None => 0u8.hash(&mut h),
                }
            }
            self.rows += 1;
            self.sum = self.sum.wrapping_add(h.finish());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn every_type() -> TableSchema {
        let types = [
            CanonicalType::Bool,
            CanonicalType::Int64,
            CanonicalType::Float64,
            CanonicalType::Decimal {
                precision: 12,
                scale: 3,
            },
            CanonicalType::Utf8,
            CanonicalType::Binary,
            CanonicalType::Date,
            CanonicalType::Time,
            CanonicalType::Timestamp,
            CanonicalType::TimestampTz,
        ];
        TableSchema {
            columns: types
                .iter()
                .enumerate()
                .map(|(i, ty)| Column {
                    name: format!("c{i}"),
                    ty: *ty,
                    nullable: true,
                    native: ty.name(),
                })
                .collect(),
            primary_key: vec![],
        }
    }

    proptest! {
        // Cells come from servers and files: garbage is an error or a value, never a panic,
        // and a parsed value renders without panicking either.
        #[test]
        fn garbage_cells_never_panic(cells in prop::collection::vec(
            prop::option::of(prop::collection::vec(any::<u8>(), 0..24)), 10)) {
            let schema = every_type();
            let mut b = BatchBuilder::new(&schema);
            let refs: Vec<Option<&[u8]>> = cells.iter().map(|c| c.as_deref()).collect();
            let accepted = b.push_text_row(&refs).is_ok();
            let batch = b.finish();
            prop_assert_eq!(batch.num_rows(), usize::from(accepted));
            let mut d = Digest::default();
            d.add_batch(&batch);
            for col in batch.columns() {
                for row in 0..batch.num_rows() {
                    let _ = cell(col.as_ref(), row).render();
                }
            }
        }
    }

    #[test]
    fn decimals_parse_and_render_exactly() {
        assert_eq!(parse_decimal("-12.50", 3), Some(-12500));
        assert_eq!(parse_decimal("7", 2), Some(700));
        assert_eq!(parse_decimal("1.234", 2), None);
        assert_eq!(parse_decimal("1.230", 2), Some(123));
        assert_eq!(parse_decimal("abc", 2), None);
        assert_eq!(render_decimal(-12500, 3), "-12.500");
        assert_eq!(render_decimal(5, 3), "0.005");
        assert_eq!(render_decimal(42, 0), "42");
    }

    #[test]
    fn temporal_values_round_trip_through_their_string_form() {
        let us = parse_timestamp("2026-11-29 23:59:58.000123").unwrap_or_default();
        assert_eq!(render_timestamp(us), "2026-11-29 23:59:58.000123");
        let tz = parse_timestamptz("2026-11-29 23:59:58+00").unwrap_or_default();
        assert_eq!(render_timestamp(tz), "2026-11-29 23:59:58");
        let d = parse_date("1969-12-31").unwrap_or_default();
        assert_eq!(render_date(d), "1969-12-31");
        let t = parse_time("23:01:02.5").unwrap_or_default();
        assert_eq!(render_micros_of_day(t), "23:01:02.500000");
    }

    #[test]
    fn a_bad_cell_appends_nothing() {
        let schema = TableSchema {
            columns: vec![
                Column {
                    name: "a".into(),
                    ty: CanonicalType::Int64,
                    nullable: true,
                    native: "int".into(),
                },
                Column {
                    name: "b".into(),
                    ty: CanonicalType::Date,
                    nullable: true,
                    native: "date".into(),
                },
            ],
            primary_key: vec![],
        };
        let mut b = BatchBuilder::new(&schema);
        assert!(b
            .push_text_row(&[Some(b"1".as_slice()), Some(b"2020-01-01".as_slice())])
            .is_ok());
        let err = b.push_text_row(&[Some(b"2".as_slice()), Some(b"nope".as_slice())]);
        assert_eq!(err.map_err(|e| e.column), Err("b".to_string()));
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.column(0).len(), 1);
    }
}
