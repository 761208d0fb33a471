//! Binlog column values to canonical [`Value`]s (the table in `docs/cdc-types.md`).

use std::collections::HashMap;
use std::sync::Arc;

use mysql_async::binlog::jsonb;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::Value as My;

use crate::event::Value;

/// Collation id of the binary "charset" (BINARY, VARBINARY, BLOB).
pub const BINARY_COLLATION: u16 = 63;

/// What decoding a column needs beyond the value itself.
#[derive(Debug, Clone, Default)]
pub struct ColumnShape {
    pub name: String,
    /// `name`, shared by every row image of the table.
    pub name_arc: Arc<str>,
    pub kind: Option<ColumnType>,
    /// Fractional-second digits of TIME/DATETIME/TIMESTAMP; BIT length in bits.
    pub precision: u32,
    pub charset: u16,
    pub enum_labels: Vec<String>,
    pub set_labels: Vec<String>,
    pub primary_key: bool,
    pub unsigned: bool,
    /// The column's TABLE_MAP metadata bytes (what the value decoder needs).
    pub meta: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("column {column}: {reason}")]
    Column { column: String, reason: String },
}

fn bad(column: &ColumnShape, reason: impl Into<String>) -> DecodeError {
    DecodeError::Column {
        column: column.name.clone(),
        reason: reason.into(),
    }
}

/// Fractional seconds to `digits` places (0 = none).
fn fraction(micros: u32, digits: u32) -> String {
    if digits == 0 {
        return String::new();
    }
    let text = format!("{micros:06}");
    format!(".{}", &text[..(digits.min(6) as usize)])
}

/// Text of a character column in its charset. `charsets` maps collation id → charset name.
pub fn text(
    column: &ColumnShape,
    collation: u16,
    bytes: Vec<u8>,
    charsets: &HashMap<u16, String>,
) -> Result<Value, DecodeError> {
    let charset = charsets
        .get(&collation)
        .map(String::as_str)
        .unwrap_or("utf8mb4");
    if charset == "binary" {
        return Ok(Value::Bytes(bytes));
    }
    super::charset::decode(charset, bytes)
        .map(Value::Text)
        .map_err(|e| bad(column, e.to_string()))
}

/// One binlog value of `column` as a canonical value; `collation` and `unsigned` as the row
/// event's column metadata says.
pub fn value(
    column: &ColumnShape,
    collation: u16,
    unsigned: bool,
    raw: BinlogValue<'_>,
    charsets: &HashMap<u16, String>,
) -> Result<Value, DecodeError> {
    use ColumnType::*;
    let my = match raw {
        BinlogValue::Value(v) => v,
        BinlogValue::Jsonb(j) => {
            let json: serde_json::Value = jsonb_to_json(j).map_err(|e| bad(column, e))?;
            return Ok(Value::Json(json.to_string()));
        }
        BinlogValue::JsonDiff(_) => {
            return Err(bad(
                column,
                "partial JSON update; set binlog_row_value_options='' on the server",
            ))
        }
    };
    if my == My::NULL {
        return Ok(Value::Null);
    }
    let Some(kind) = column.kind else {
        return Err(bad(column, "unknown column type"));
    };
    let v = match (kind, my) {
        (MYSQL_TYPE_FLOAT, My::Float(f)) => {
            // The float's shortest decimal text, so 1.1 stays 1.1 and not 1.100000023841858.
            Value::Float(f.to_string().parse::<f64>().unwrap_or(f64::from(f)))
        }
        (MYSQL_TYPE_DOUBLE, My::Double(d)) => Value::Float(d),
        (MYSQL_TYPE_YEAR, My::Bytes(b)) => {
            let year: i64 = std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(column, "YEAR"))?;
            // The row format stores 0000 as 0, which the decoder renders as 1900 (no YEAR
            // value can be 1900 otherwise).
            Value::Int(if year == 1900 { 0 } else { year })
        }
        (_, My::Int(i)) if kind == MYSQL_TYPE_ENUM => enum_label(column, i)?,
        // mysql_common reads a signed MEDIUMINT without sign extension.
        (MYSQL_TYPE_INT24, My::Int(i)) if !unsigned && i > 0x7F_FFFF => Value::Int(i - 0x100_0000),
        (MYSQL_TYPE_SET, My::Bytes(b)) => {
            let mut bits = 0u64;
            for (i, byte) in b.iter().enumerate() {
                bits |= u64::from(*byte) << (8 * i);
            }
            let labels: Vec<&str> = column
                .set_labels
                .iter()
                .enumerate()
                .filter(|(i, _)| bits & (1u64 << i) != 0)
                .map(|(_, l)| l.as_str())
                .collect();
            if column.set_labels.is_empty() && bits != 0 {
                return Err(bad(
                    column,
                    "SET labels missing: set binlog_row_metadata=FULL",
                ));
            }
            Value::Text(labels.join(","))
        }
        (MYSQL_TYPE_BIT, My::Bytes(b)) => {
            if column.precision == 1 {
                Value::Bool(b.iter().any(|x| *x != 0))
            } else {
                Value::UInt(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
            }
        }
        (MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL, My::Bytes(b)) => {
            Value::Decimal(String::from_utf8(b).map_err(|_| bad(column, "DECIMAL text"))?)
        }
        (MYSQL_TYPE_TIMESTAMP2 | MYSQL_TYPE_TIMESTAMP, v) => {
            let (secs, micros) = match v {
                My::Int(s) => (s, 0),
                My::Bytes(b) => {
                    let text = String::from_utf8(b).map_err(|_| bad(column, "TIMESTAMP"))?;
                    let (s, f) = text.split_once('.').unwrap_or((&text, "0"));
                    let s: i64 = s.parse().map_err(|_| bad(column, "TIMESTAMP seconds"))?;
                    let f: u32 = format!("{f:0<6}")[..6]
                        .parse()
                        .map_err(|_| bad(column, "TIMESTAMP fraction"))?;
                    (s, f)
                }
                other => return Err(bad(column, format!("TIMESTAMP as {other:?}"))),
            };
            if secs == 0 && micros == 0 {
                // 0000-00-00 00:00:00 is not an instant.
                return Ok(Value::Timestamp("0000-00-00T00:00:00Z".into()));
            }
            let (y, mo, d, h, mi, s) = civil_from_unix(secs);
            Value::Timestamp(format!(
                "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{}Z",
                fraction(micros, column.precision)
            ))
        }
        (MYSQL_TYPE_DATETIME2 | MYSQL_TYPE_DATETIME, My::Date(y, mo, d, h, mi, s, us)) => {
            Value::DateTime(format!(
                "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{}",
                fraction(us, column.precision)
            ))
        }
        (MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE, My::Date(y, mo, d, ..)) => {
            Value::Date(format!("{y:04}-{mo:02}-{d:02}"))
        }
        (MYSQL_TYPE_TIME2 | MYSQL_TYPE_TIME, My::Time(neg, days, h, mi, s, us)) => {
            let hours = u64::from(days) * 24 + u64::from(h);
            Value::Time(format!(
                "{}{hours:02}:{mi:02}:{s:02}{}",
                if neg { "-" } else { "" },
                fraction(us, column.precision)
            ))
        }
        (MYSQL_TYPE_JSON, My::Bytes(b)) => {
            Value::Json(String::from_utf8(b).map_err(|_| bad(column, "JSON text"))?)
        }
        (
            MYSQL_TYPE_STRING
            | MYSQL_TYPE_VAR_STRING
            | MYSQL_TYPE_VARCHAR
            | MYSQL_TYPE_BLOB
            | MYSQL_TYPE_TINY_BLOB
            | MYSQL_TYPE_MEDIUM_BLOB
            | MYSQL_TYPE_LONG_BLOB,
            My::Bytes(b),
        ) => {
            if collation == BINARY_COLLATION {
                Value::Bytes(b)
            } else {
                text(column, collation, b, charsets)?
            }
        }
        (MYSQL_TYPE_GEOMETRY, My::Bytes(b)) => Value::Bytes(b),
        (_, My::Int(i)) => Value::Int(i),
        (_, My::UInt(u)) => Value::UInt(u),
        (_, other) => return Err(bad(column, format!("type {kind:?} as {other:?}"))),
    };
    Ok(v)
}

fn enum_label(column: &ColumnShape, index: i64) -> Result<Value, DecodeError> {
    if index == 0 {
        // The "error" member MySQL stores for an invalid value in non-strict mode.
        return Ok(Value::Text(String::new()));
    }
    usize::try_from(index - 1)
        .ok()
        .and_then(|i| column.enum_labels.get(i))
        .map(|l| Value::Text(l.clone()))
        .ok_or_else(|| {
            bad(
                column,
                format!("ENUM index {index} without a label: set binlog_row_metadata=FULL"),
            )
        })
}

fn jsonb_to_json(j: jsonb::Value<'_>) -> Result<serde_json::Value, String> {
    serde_json::Value::try_from(j).map_err(|e| e.to_string())
}

/// Proleptic Gregorian date and time of a Unix time in UTC (Howard Hinnant's algorithm).
pub fn civil_from_unix(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let as_u32 = |v: i64| u32::try_from(v).unwrap_or(0);
    (
        y,
        as_u32(m),
        as_u32(d),
        as_u32(rem / 3600),
        as_u32(rem % 3600 / 60),
        as_u32(rem % 60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil_from_unix(1_795_000_000), (2026, 11, 18, 11, 6, 40));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    #[test]
    fn fractions_follow_precision() {
        assert_eq!(fraction(120_000, 2), ".12");
        assert_eq!(fraction(5, 6), ".000005");
        assert_eq!(fraction(5, 0), "");
    }
}
