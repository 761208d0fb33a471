//! PostgreSQL's binary COPY format (`COPY … FROM STDIN (FORMAT binary)`), writing side.
//!
//! Layout: the 11-byte signature `PGCOPY\n\xff\r\n\0`, an i32 flags word and an i32 header
//! extension length (both 0); per row an i16 field count, then per field an i32 length (-1
//! for NULL) and the value in the type's binary send form; the trailer is an i16 -1.
//!
//! tokio-postgres' `BinaryCopyInWriter` frames rows the same way, but it encodes a row cell by
//! cell straight into its buffer: a value that does not fit its column (an `int8` too big for
//! an `integer`) fails half-way through a row and leaves the stream unusable. Here a row is
//! encoded whole into a scratch buffer first, so such a row becomes one dirty record with its
//! reason and the rest of the batch goes on.
//!
//! Only pairs of canonical type and target column type in [`BinaryPlan::new`] are encoded;
//! any other target column makes the writer use the text COPY form, where the server parses
//! each value with the column type's own input function.

use arrow_array::RecordBatch;
use tokio_postgres::types::Type;

use crate::types::{cell, CanonicalType, CellRef};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// 2000-01-01 (PostgreSQL's epoch) in days and microseconds since 1970-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// How each column of a batch goes into its target column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Text,
    Jsonb,
    Bytea,
    Date,
    Time,
    Timestamp,
}

/// The per-column encoders of one table, when every column has one.
#[derive(Debug, Clone)]
pub struct BinaryPlan {
    fields: Vec<Field>,
}

impl BinaryPlan {
    /// A plan for writing columns of these canonical types into target columns of these
    /// types; `None` when some pair has no binary encoder here.
    pub fn new(source: &[CanonicalType], target: &[Type]) -> Option<BinaryPlan> {
        if source.len() != target.len() {
            return None;
        }
        let fields = source
            .iter()
            .zip(target)
            .map(|(s, t)| field_for(*s, t))
            .collect::<Option<Vec<_>>>()?;
        Some(BinaryPlan { fields })
    }

    /// The stream header.
    pub fn header(out: &mut Vec<u8>) {
        out.extend_from_slice(SIGNATURE);
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
    }

    /// The stream trailer.
    pub fn trailer(out: &mut Vec<u8>) {
        out.extend_from_slice(&(-1i16).to_be_bytes());
    }

    /// Append row `row` of `batch`; a value that does not fit its column appends nothing and
    /// is the error, naming the column.
    pub fn encode_row(
        &self,
        batch: &RecordBatch,
        row: usize,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        scratch.clear();
        let count = i16::try_from(self.fields.len()).map_err(|_| "too many columns")?;
        scratch.extend_from_slice(&count.to_be_bytes());
        let schema = batch.schema();
        for (i, (field, column)) in self.fields.iter().zip(batch.columns()).enumerate() {
            let value = cell(column.as_ref(), row);
            if value == CellRef::Null {
                scratch.extend_from_slice(&(-1i32).to_be_bytes());
                continue;
            }
            let len_at = scratch.len();
            scratch.extend_from_slice(&0i32.to_be_bytes());
            encode_value(*field, value, scratch)
                .map_err(|reason| format!("column {}: {reason}", schema.field(i).name()))?;
            let len = i32::try_from(scratch.len() - len_at - 4).map_err(|_| "value over 2 GiB")?;
            scratch[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        }
        out.extend_from_slice(scratch);
        Ok(())
    }
}

fn field_for(source: CanonicalType, target: &Type) -> Option<Field> {
    use CanonicalType as C;
    Some(match (source, target) {
        (C::Bool, t) if *t == Type::BOOL => Field::Bool,
        (C::Int64, t) if *t == Type::INT2 => Field::Int2,
        (C::Int64, t) if *t == Type::INT4 => Field::Int4,
        (C::Int64, t) if *t == Type::INT8 => Field::Int8,
        (C::Int64 | C::Decimal { .. }, t) if *t == Type::NUMERIC => Field::Numeric,
        (C::Float64, t) if *t == Type::FLOAT4 => Field::Float4,
        (C::Float64, t) if *t == Type::FLOAT8 => Field::Float8,
        (C::Utf8, t)
            if *t == Type::TEXT
                || *t == Type::VARCHAR
                || *t == Type::BPCHAR
                || *t == Type::NAME
                || *t == Type::JSON =>
        {
            Field::Text
        }
        (C::Utf8, t) if *t == Type::JSONB => Field::Jsonb,
        (C::Binary, t) if *t == Type::BYTEA => Field::Bytea,
        (C::Date, t) if *t == Type::DATE => Field::Date,
        (C::Time, t) if *t == Type::TIME => Field::Time,
        (C::Timestamp, t) if *t == Type::TIMESTAMP => Field::Timestamp,
        (C::TimestampTz, t) if *t == Type::TIMESTAMPTZ => Field::Timestamp,
        _ => return None,
    })
}

fn encode_value(field: Field, value: CellRef<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    let mismatch = || format!("unexpected value {value:?} for {field:?}");
    match (field, value) {
        (Field::Bool, CellRef::Bool(v)) => out.push(u8::from(v)),
        (Field::Int2, CellRef::Int(v)) => out.extend_from_slice(
            &i16::try_from(v)
                .map_err(|_| format!("{v} is out of range for type smallint"))?
                .to_be_bytes(),
        ),
        (Field::Int4, CellRef::Int(v)) => out.extend_from_slice(
            &i32::try_from(v)
                .map_err(|_| format!("{v} is out of range for type integer"))?
                .to_be_bytes(),
        ),
        (Field::Int8, CellRef::Int(v)) => out.extend_from_slice(&v.to_be_bytes()),
        (Field::Numeric, CellRef::Int(v)) => encode_numeric(i128::from(v), 0, out),
        (Field::Numeric, CellRef::Decimal(v, scale)) => encode_numeric(v, scale, out),
        // A float4 column holds the nearest single-precision value, as its text input would.
        (Field::Float4, CellRef::Float(v)) => out.extend_from_slice(&(v as f32).to_be_bytes()),
        (Field::Float8, CellRef::Float(v)) => out.extend_from_slice(&v.to_be_bytes()),
        (Field::Text, CellRef::Text(s)) => out.extend_from_slice(s.as_bytes()),
        (Field::Jsonb, CellRef::Text(s)) => {
            out.push(1); // jsonb's binary format version
            out.extend_from_slice(s.as_bytes());
        }
        (Field::Bytea, CellRef::Bytes(b)) => out.extend_from_slice(b),
        (Field::Date, CellRef::Date(days)) => out.extend_from_slice(
            &days
                .checked_sub(PG_EPOCH_DAYS)
                .ok_or("date out of range")?
                .to_be_bytes(),
        ),
        (Field::Time, CellRef::Time(us)) => out.extend_from_slice(&us.to_be_bytes()),
        (Field::Timestamp, CellRef::Timestamp(us) | CellRef::TimestampTz(us)) => out
            .extend_from_slice(
                &us.checked_sub(PG_EPOCH_MICROS)
                    .ok_or("timestamp out of range")?
                    .to_be_bytes(),
            ),
        _ => return Err(mismatch()),
    }
    Ok(())
}

/// `numeric`'s binary form of `v × 10^-scale`: i16 digit count, i16 weight (of the first
/// base-10000 digit), u16 sign, u16 display scale, then the base-10000 digits.
pub fn encode_numeric(v: i128, scale: i8, out: &mut Vec<u8>) {
    let scale = usize::try_from(scale).unwrap_or(0);
    let decimal = v.unsigned_abs().to_string();
    // Integer and fraction digit strings, the fraction exactly `scale` digits long.
    let (int_digits, frac_digits) = if decimal.len() > scale {
        decimal.split_at(decimal.len() - scale)
    } else {
        ("", decimal.as_str())
    };
    let frac = format!("{}{frac_digits}", "0".repeat(scale - frac_digits.len()));
    // Group into base-10000 digits aligned on the decimal point.
    let int_pad = (4 - int_digits.len() % 4) % 4;
    let int_aligned = format!("{}{int_digits}", "0".repeat(int_pad));
    let frac_pad = (4 - frac.len() % 4) % 4;
    let frac_aligned = format!("{frac}{}", "0".repeat(frac_pad));
    let group = |s: &str| -> Vec<i16> {
        s.as_bytes()
            .chunks(4)
            .map(|c| {
                c.iter()
                    .fold(0i16, |acc, d| acc * 10 + i16::from(d.saturating_sub(b'0')))
            })
            .collect()
    };
    let int_groups = group(&int_aligned);
    let frac_groups = group(&frac_aligned);
    let mut weight = i16::try_from(int_groups.len()).unwrap_or(0) - 1;
    let mut digits: Vec<i16> = int_groups.into_iter().chain(frac_groups).collect();
    // Leading zero groups shift the weight down; trailing zero groups are implied.
    let leading = digits.iter().take_while(|d| **d == 0).count();
    digits.drain(..leading);
    weight -= i16::try_from(leading).unwrap_or(0);
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    let sign: u16 = if v < 0 && !digits.is_empty() {
        0x4000
    } else {
        0
    };
    out.extend_from_slice(&i16::try_from(digits.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&u16::try_from(scale).unwrap_or(0).to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decode numeric's binary form back to its decimal string (the server's own rule).
    fn decode_numeric(b: &[u8]) -> String {
        let rd = |i: usize| i16::from_be_bytes([b[i], b[i + 1]]);
        let (n, weight, sign, dscale) = (rd(0), rd(2), rd(4) as u16, rd(6) as usize);
        let digits: Vec<i16> = (0..n as usize).map(|k| rd(8 + 2 * k)).collect();
        let mut int = String::new();
        for w in 0..=weight.max(-1) {
            let d = digits.get(w as usize).copied().unwrap_or(0);
            if int.is_empty() {
                int = d.to_string();
            } else {
                int.push_str(&format!("{d:04}"));
            }
        }
        if int.is_empty() {
            int.push('0');
        }
        let mut frac = String::new();
        let mut k = weight + 1;
        while frac.len() < dscale {
            let d = if k < 0 {
                0
            } else {
                digits.get(k as usize).copied().unwrap_or(0)
            };
            frac.push_str(&format!("{d:04}"));
            k += 1;
        }
        frac.truncate(dscale);
        let sign = if sign == 0x4000 { "-" } else { "" };
        if dscale == 0 {
            format!("{sign}{int}")
        } else {
            format!("{sign}{int}.{frac}")
        }
    }

    #[test]
    fn numeric_examples() {
        for (v, s, text) in [
            (0i128, 0i8, "0"),
            (12345678, 2, "123456.78"),
            (-5, 3, "-0.005"),
            (10000, 0, "10000"),
            (1, 8, "0.00000001"),
            (-99999999999999999999i128, 6, "-99999999999999.999999"),
        ] {
            let mut out = Vec::new();
            encode_numeric(v, s, &mut out);
            assert_eq!(decode_numeric(&out), text, "{v} scale {s}");
        }
    }

    proptest! {
        #[test]
        fn numeric_round_trips(v in -(10i128.pow(38) - 1)..10i128.pow(38), scale in 0i8..=20) {
            let mut out = Vec::new();
            encode_numeric(v, scale, &mut out);
            prop_assert_eq!(decode_numeric(&out), crate::types::render_decimal(v, scale));
        }
    }
}
