//! PostgreSQL's text COPY format (tab-separated fields, `\N` for NULL, backslash escapes),
//! both directions. tokio-postgres moves COPY data as raw bytes and ships no codec for the
//! text format; the format is small and fully specified in the COPY documentation, and it
//! takes every type's own input/output syntax (numeric, json, uuid…), which the binary format
//! would need a codec per type for.

use crate::types::CellRef;

/// Splits COPY data, arriving in arbitrary chunks, into rows of unescaped fields.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feed a chunk; `on_row` gets each complete row's fields (`None` for NULL).
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        mut on_row: impl FnMut(&[Option<&[u8]>]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut start = 0;
        let mut fields_buf: Vec<Vec<u8>> = Vec::new();
        let mut take_line = |line: &[u8], fields_buf: &mut Vec<Vec<u8>>| -> Result<(), E> {
            fields_buf.clear();
            let mut nulls = Vec::new();
            for raw in line.split(|b| *b == b'\t') {
                if raw == b"\\N" {
                    nulls.push(true);
                    fields_buf.push(Vec::new());
                } else {
                    nulls.push(false);
                    fields_buf.push(unescape(raw));
                }
            }
            let cells: Vec<Option<&[u8]>> = fields_buf
                .iter()
                .zip(&nulls)
                .map(|(f, n)| if *n { None } else { Some(f.as_slice()) })
                .collect();
            on_row(&cells)
        };
        while let Some(pos) = memchr_newline(&chunk[start..]) {
            let end = start + pos;
            if self.pending.is_empty() {
                take_line(&chunk[start..end], &mut fields_buf)?;
            } else {
                self.pending.extend_from_slice(&chunk[start..end]);
                let line = std::mem::take(&mut self.pending);
                take_line(&line, &mut fields_buf)?;
            }
            start = end + 1;
        }
        self.pending.extend_from_slice(&chunk[start..]);
        Ok(())
    }

    /// Bytes of an unfinished last line (none after a complete COPY).
    pub fn leftover(&self) -> usize {
        self.pending.len()
    }
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|c| *c == b'\n')
}

/// Undo COPY's backslash escapes in one field.
pub fn unescape(raw: &[u8]) -> Vec<u8> {
    if !raw.contains(&b'\\') {
        return raw.to_vec();
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' || i + 1 == raw.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let n = raw[i + 1];
        i += 2;
        match n {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(n - b'0');
                let mut k = 0;
                while k < 2 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    v = v * 8 + u32::from(raw[i] - b'0');
                    i += 1;
                    k += 1;
                }
                out.push((v & 0xff) as u8);
            }
            b'x' if i < raw.len() && raw[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut k = 0;
                while k < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    v = v * 16 + (raw[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    out
}

pub(crate) fn escape_into(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

/// Append one cell in COPY text form.
pub fn encode_cell(out: &mut Vec<u8>, cell: CellRef<'_>) {
    match cell {
        CellRef::Null => out.extend_from_slice(b"\\N"),
        CellRef::Bool(v) => out.push(if v { b't' } else { b'f' }),
        CellRef::Text(s) => escape_into(out, s.as_bytes()),
        // bytea's hex input form `\x…`, its backslash escaped for COPY.
        CellRef::Bytes(b) => {
            out.extend_from_slice(b"\\\\x");
            out.extend_from_slice(crate::types::hex(b).as_bytes());
        }
        other => {
            if let Some(s) = other.render() {
                escape_into(out, s.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rows_split_across_chunks_come_out_whole() {
        let mut s = LineSplitter::default();
        let mut rows: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
        for chunk in [b"1\ta\\tb\t\\N\n2".as_slice(), b"\tx\\\\y\tz\n"] {
            s.feed::<()>(chunk, |cells| {
                rows.push(cells.iter().map(|c| c.map(<[u8]>::to_vec)).collect());
                Ok(())
            })
            .ok();
        }
        assert_eq!(s.leftover(), 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][1].as_deref(), Some(b"a\tb".as_slice()));
        assert_eq!(rows[0][2], None);
        assert_eq!(rows[1][1].as_deref(), Some(b"x\\y".as_slice()));
    }

    proptest! {
        #[test]
        fn text_survives_encode_then_split(texts in prop::collection::vec(".{0,20}", 1..6)) {
            let mut buf = Vec::new();
            for (i, t) in texts.iter().enumerate() {
                if i > 0 { buf.push(b'\t'); }
                encode_cell(&mut buf, CellRef::Text(t));
            }
            buf.push(b'\n');
            let mut got = Vec::new();
            LineSplitter::default().feed::<()>(&buf, |cells| {
                got = cells.iter().map(|c| String::from_utf8_lossy(c.unwrap_or_default()).into_owned()).collect();
                Ok(())
            }).ok();
            prop_assert_eq!(got, texts);
        }

        #[test]
        fn garbage_never_panics(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut s = LineSplitter::default();
            for c in &chunks {
                s.feed::<()>(c, |_| Ok(())).ok();
            }
        }
    }
}
