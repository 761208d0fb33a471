//! PostgreSQL column values, from their text output to [`Value`]s.
//!
//! pgoutput (without `binary 'true'`) and the snapshot's simple-query reads both carry each
//! value as its type's text output, and both sessions pin the settings that shape it
//! ([`SESSION_OPTIONS`]), so one decoder serves both and a snapshot row equals the streamed
//! row. The mapping is documented in `docs/cdc-types-postgres.md`.

use crate::event::Value;

/// Startup options for every session the source opens: ISO dates, UTC, ISO 8601 intervals,
/// hex bytea and shortest-exact floats, whatever the server's or the role's defaults are.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 \
     -c bytea_output=hex -c extra_float_digits=1";

/// How a column's text is decoded. Built-in types are known by OID; others (enums,
/// domains, arrays of those) are resolved from `pg_type` by the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    Bool,
    Int,
    /// `oid`, `xid`: unsigned 32-bit.
    UInt,
    Float,
    Numeric,
    Text,
    Bytea,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Json,
    /// Element type and the element delimiter (`,`; `;` for `box`).
    Array(Box<PgType>, u8),
}

impl PgType {
    /// The type of a built-in OID; `None` for OIDs to resolve from the catalog.
    pub fn builtin(oid: u32) -> Option<PgType> {
        use PgType::*;
        let scalar = match oid {
            16 => Bool,
            17 => Bytea,
            20 | 21 | 23 => Int,
            26 | 28 | 29 => UInt,
            700 | 701 => Float,
            1700 => Numeric,
            1082 => Date,
            1083 => Time,
            1266 => TimeTz,
            1114 => Timestamp,
            1184 => TimestampTz,
            114 | 3802 => Json,
            // char, name, text, bpchar, varchar, uuid, interval, bit, varbit, xml, money,
            // inet, cidr, macaddr(8), tsvector, geometric types, ranges: their text.
            18 | 19 | 25 | 1042 | 1043 | 2950 | 1186 | 1560 | 1562 | 142 | 790 | 869 | 650
            | 829 | 774 | 3614 | 600 | 601 | 602 | 603 | 604 | 628 | 718 | 3904 | 3906 | 3908
            | 3910 | 3912 | 3926 => Text,
            _ => return Self::builtin_array(oid),
        };
        Some(scalar)
    }

    fn builtin_array(oid: u32) -> Option<PgType> {
        let element = match oid {
            1000 => 16,
            1001 => 17,
            1005 => 21,
            1007 => 23,
            1016 => 20,
            1028 => 26,
            1021 => 700,
            1022 => 701,
            1231 => 1700,
            1182 => 1082,
            1183 => 1083,
            1270 => 1266,
            1115 => 1114,
            1185 => 1184,
            199 => 114,
            3807 => 3802,
            1002 => 18,
            1003 => 19,
            1009 => 25,
            1014 => 1042,
            1015 => 1043,
            2951 => 2950,
            1187 => 1186,
            1561 => 1560,
            1563 => 1562,
            1041 => 869,
            651 => 650,
            1040 => 829,
            1020 => return Some(PgType::Array(Box::new(PgType::Text), b';')),
            _ => return None,
        };
        Some(PgType::Array(Box::new(Self::builtin(element)?), b','))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot decode {text:?} as {ty:?}: {reason}")]
pub struct TypeError {
    pub ty: PgType,
    pub text: String,
    pub reason: &'static str,
}

fn bad(ty: &PgType, text: &str, reason: &'static str) -> TypeError {
    TypeError {
        ty: ty.clone(),
        text: text.chars().take(200).collect(),
        reason,
    }
}

/// Decodes the text output of a value of type `ty`.
pub fn decode_text(ty: &PgType, text: &str) -> Result<Value, TypeError> {
    Ok(match ty {
        PgType::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(bad(ty, text, "not t or f")),
        },
        PgType::Int => Value::Int(text.parse().map_err(|_| bad(ty, text, "not an integer"))?),
        PgType::UInt => Value::UInt(text.parse().map_err(|_| bad(ty, text, "not an integer"))?),
        PgType::Float => {
            Value::Float(parse_float(text).ok_or_else(|| bad(ty, text, "not a float"))?)
        }
        PgType::Numeric => Value::Decimal(text.to_owned()),
        PgType::Text => Value::Text(text.to_owned()),
        PgType::Json => Value::Json(text.to_owned()),
        PgType::Bytea => {
            Value::Bytes(parse_bytea(text).ok_or_else(|| bad(ty, text, "not hex bytea"))?)
        }
        PgType::Date => Value::Date(text.to_owned()),
        PgType::Time => Value::Time(text.to_owned()),
        PgType::TimeTz => {
            Value::Time(timetz_to_utc(text).ok_or_else(|| bad(ty, text, "not a time with zone"))?)
        }
        PgType::Timestamp => Value::DateTime(text.replacen(' ', "T", 1)),
        PgType::TimestampTz => Value::Timestamp(
            timestamptz_to_utc(text).ok_or_else(|| bad(ty, text, "not a timestamp with zone"))?,
        ),
        PgType::Array(element, delimiter) => {
            let mut parser = ArrayParser {
                text,
                pos: 0,
                element,
                delimiter: *delimiter,
                ty,
            };
            parser.parse()?
        }
    })
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        // float4 text is the shortest decimal that reads back as the same float4; read as a
        // double it stays that decimal (1.1, not 1.100000023841858).
        _ => text.parse().ok().filter(|f: &f64| f.is_finite()),
    }
}

fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    hex.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Splits `HH:MM:SS[.ffffff]` off a zone suffix `±HH[:MM[:SS]]`, returning the time's
/// seconds of day, its fraction text (with the dot) and the offset in seconds.
fn split_zone(text: &str) -> Option<(i64, &str, i64)> {
    let zone_at = text.rfind(['+', '-'])?;
    let (time, zone) = text.split_at(zone_at);
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let mut offset = 0i64;
    for (i, part) in zone[1..].split(':').enumerate() {
        if i > 2 || part.len() != 2 {
            return None;
        }
        offset += part.parse::<i64>().ok()? * [3600, 60, 1][i];
    }
    let (hms, fraction) = match time.find('.') {
        Some(dot) => time.split_at(dot),
        None => (time, ""),
    };
    let mut fields = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (fields.next()??, fields.next()??, fields.next()??);
    if fields.next().is_some()
        || !fraction[1.min(fraction.len())..]
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((h * 3600 + m * 60 + s, fraction, sign * offset))
}

fn hms(seconds: i64) -> String {
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `12:34:56.5+02` → `10:34:56.5Z` (Debezium's ZonedTime is in UTC too).
fn timetz_to_utc(text: &str) -> Option<String> {
    let (seconds, fraction, offset) = split_zone(text)?;
    Some(format!(
        "{}{fraction}Z",
        hms((seconds - offset).rem_euclid(86_400))
    ))
}

/// `2026-11-29 12:34:56.123456+00` → `2026-11-29T12:34:56.123456Z`. Sessions run with
/// `timezone=UTC`, so the offset is normally zero; any other offset is applied. `infinity`,
/// `-infinity` and BC dates stay as PostgreSQL writes them.
fn timestamptz_to_utc(text: &str) -> Option<String> {
    if text.ends_with("infinity") || text.ends_with(" BC") {
        return Some(text.to_owned());
    }
    let (date, time) = text.split_once(' ')?;
    let (seconds, fraction, offset) = split_zone(time)?;
    let mut parts = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let total = days_from_civil(y, m, d) * 86_400 + seconds - offset;
    let (y, m, d) = civil_from_days(total.div_euclid(86_400));
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{}{fraction}Z",
        hms(total.rem_euclid(86_400))
    ))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// An array literal: `{1,NULL,"a \"b\""}`, nested `{{1,2},{3,4}}`, with an optional
/// `[lo:hi]=` bounds prefix (dropped: the event carries the elements in order).
struct ArrayParser<'a> {
    text: &'a str,
    pos: usize,
    element: &'a PgType,
    delimiter: u8,
    ty: &'a PgType,
}

impl ArrayParser<'_> {
    fn parse(&mut self) -> Result<Value, TypeError> {
        if self.text.starts_with('[') {
            let eq = self
                .text
                .find('=')
                .ok_or_else(|| bad(self.ty, self.text, "array bounds without '='"))?;
            self.pos = eq + 1;
        }
        let value = self.level()?;
        if self.pos != self.text.len() {
            return Err(bad(self.ty, self.text, "text after the array"));
        }
        Ok(value)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn level(&mut self) -> Result<Value, TypeError> {
        if self.peek() != Some(b'{') {
            return Err(bad(self.ty, self.text, "array does not start with '{'"));
        }
        self.pos += 1;
        let mut items = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            let item = match self.peek() {
                Some(b'{') => self.level()?,
                Some(b'"') => {
                    let text = self.quoted()?;
                    decode_text(self.element, &text)?
                }
                Some(_) => {
                    let start = self.pos;
                    while let Some(b) = self.peek() {
                        if b == self.delimiter || b == b'}' {
                            break;
                        }
                        self.pos += 1;
                    }
                    let raw = self.text[start..self.pos].trim();
                    if raw.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        decode_text(self.element, raw)?
                    }
                }
                None => return Err(bad(self.ty, self.text, "array ends early")),
            };
            items.push(item);
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                Some(b) if b == self.delimiter => self.pos += 1,
                _ => return Err(bad(self.ty, self.text, "expected a delimiter or '}'")),
            }
        }
    }

    fn quoted(&mut self) -> Result<String, TypeError> {
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.text[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, escaped)) => out.push(escaped),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(bad(self.ty, self.text, "unterminated quoted array element"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn d(oid: u32, text: &str) -> Value {
        decode_text(&PgType::builtin(oid).unwrap(), text).unwrap()
    }

    #[test]
    fn scalars() {
        assert_eq!(d(20, "-9223372036854775808"), Value::Int(i64::MIN));
        assert_eq!(d(1700, "NaN"), Value::Decimal("NaN".into()));
        assert_eq!(d(700, "1.1"), Value::Float(1.1));
        assert!(matches!(d(701, "NaN"), Value::Float(f) if f.is_nan()));
        assert_eq!(d(701, "-Infinity"), Value::Float(f64::NEG_INFINITY));
        assert_eq!(d(17, "\\x00ff"), Value::Bytes(vec![0, 255]));
        assert_eq!(d(17, "\\x"), Value::Bytes(vec![]));
        assert_eq!(d(16, "t"), Value::Bool(true));
    }

    #[test]
    fn zones_are_applied() {
        assert_eq!(
            d(1184, "2026-11-29 12:34:56.123456+00"),
            Value::Timestamp("2026-11-29T12:34:56.123456Z".into())
        );
        assert_eq!(
            d(1184, "2026-01-01 01:00:00+05:30"),
            Value::Timestamp("2025-12-31T19:30:00Z".into())
        );
        assert_eq!(
            d(1184, "2000-02-28 23:00:00-02"),
            Value::Timestamp("2000-02-29T01:00:00Z".into())
        );
        assert_eq!(d(1266, "01:02:03.5+02"), Value::Time("23:02:03.5Z".into()));
        assert_eq!(
            d(1114, "2026-11-29 12:34:56"),
            Value::DateTime("2026-11-29T12:34:56".into())
        );
    }

    #[test]
    fn arrays() {
        assert_eq!(
            d(1007, "{{1,2},{NULL,4}}"),
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Null, Value::Int(4)]),
            ])
        );
        assert_eq!(
            d(1009, r#"{"a,b","NULL",NULL,"x\"y\\",""}"#),
            Value::Array(vec![
                Value::Text("a,b".into()),
                Value::Text("NULL".into()),
                Value::Null,
                Value::Text("x\"y\\".into()),
                Value::Text(String::new()),
            ])
        );
        assert_eq!(
            d(1007, "[0:1]={5,6}"),
            Value::Array(vec![Value::Int(5), Value::Int(6)])
        );
        assert_eq!(d(1007, "{}"), Value::Array(vec![]));
        assert!(decode_text(&PgType::builtin(1007).unwrap(), "{1,2").is_err());
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(oid in proptest::sample::select(vec![16u32, 17, 20, 700, 1082, 1184, 1266, 1007, 1009, 1020]), text in ".{0,40}") {
            let _ = decode_text(&PgType::builtin(oid).unwrap(), &text);
        }
    }
}
