//! `pgoutput` logical replication messages (protocol version 1), decoded from the bytes of
//! one XLogData payload. Pure: no I/O, no allocation beyond what the message holds, and
//! every length is checked against the bytes present, so untrusted input yields an error,
//! never a panic (proptest below, fuzz target `fuzz/fuzz_targets/pgoutput.rs`).
//!
//! Format: PostgreSQL documentation, "Logical Replication Message Formats". Integers are
//! big-endian; strings are NUL-terminated; LSNs are u64; timestamps are microseconds since
//! 2000-01-01 UTC.

use bytes::Bytes;

/// Microseconds from the Unix epoch to PostgreSQL's epoch (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error(
        "pgoutput message '{tag}' ends early: {what} needs {needed} more bytes at offset {offset}"
    )]
    Truncated {
        tag: char,
        what: &'static str,
        offset: usize,
        needed: usize,
    },
    #[error("pgoutput message '{tag}': {what} at offset {offset} is not NUL-terminated")]
    Unterminated {
        tag: char,
        what: &'static str,
        offset: usize,
    },
    #[error("pgoutput message '{tag}': {what} is not UTF-8")]
    NotUtf8 { tag: char, what: &'static str },
    #[error("pgoutput message '{tag}': unexpected {what} byte {byte:#04x}")]
    Unexpected {
        tag: char,
        what: &'static str,
        byte: u8,
    },
    #[error("pgoutput message '{tag}': negative {what} {value}")]
    Negative {
        tag: char,
        what: &'static str,
        value: i64,
    },
    #[error("pgoutput message '{tag}' has {extra} trailing bytes")]
    Trailing { tag: char, extra: usize },
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownTag(u8),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin { commit_lsn: u64, name: String },
    Relation(Relation),
    Type(TypeInfo),
    Insert { relation: u32, new: Tuple },
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: u64,
    /// End of the commit record: streaming resumed here skips this transaction.
    pub end_lsn: u64,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

/// One column of a tuple as pgoutput sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value: the server did not send it.
    UnchangedToast,
    /// Text output of the type (what we request).
    Text(Bytes),
    /// Binary send format (only with `binary 'true'`, which we do not request).
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Datum>);

/// The old row an update or delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity key columns (others are NULL).
    Key(Tuple),
    /// The whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation: u32,
    /// Absent when the key did not change and the identity is not FULL.
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
    pub options: u8,
    pub relations: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: u64,
    pub prefix: String,
    pub content: Bytes,
}

/// Decodes one pgoutput message. `data` is the whole XLogData payload.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let (&tag, _) = data.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        data,
        pos: 1,
        tag: tag as char,
    };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time: r.i64("commit time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("end LSN")?,
            commit_time: r.i64("commit time")?,
        }),
        b'O' => Message::Origin {
            commit_lsn: r.u64("origin commit LSN")?,
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let count = r.count("column count")?;
            // Each column takes at least 10 bytes: never reserve more than the input holds.
            let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
            for _ in 0..count {
                let flags = r.u8("column flags")?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type(TypeInfo {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => {
            let relation = r.u32("relation oid")?;
            r.expect(b'N', "new tuple marker")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let old = match r.u8("tuple marker")? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                b'N' => None,
                byte => {
                    return Err(DecodeError::Unexpected {
                        tag: r.tag,
                        what: "tuple marker",
                        byte,
                    })
                }
            };
            if old.is_some() {
                r.expect(b'N', "new tuple marker")?;
            }
            Message::Update(Update {
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let old = match r.u8("tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                byte => {
                    return Err(DecodeError::Unexpected {
                        tag: r.tag,
                        what: "tuple marker",
                        byte,
                    })
                }
            };
            Message::Delete(Delete { relation, old })
        }
        b'T' => {
            let count = r.u32("relation count")? as usize;
            let options = r.u8("options")?;
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate(Truncate { options, relations })
        }
        b'M' => {
            let transactional = r.u8("flags")? & 1 == 1;
            let lsn = r.u64("message LSN")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("content length")? as usize;
            let content = r.bytes(len, "content")?;
            Message::Message(LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            })
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    if r.remaining() != 0 {
        return Err(DecodeError::Trailing {
            tag: r.tag,
            extra: r.remaining(),
        });
    }
    Ok(message)
}

/// Encodes the messages the replication transport hands over already decoded (it parses
/// Begin, Commit and logical messages itself) back into their pgoutput bytes, so that this
/// module stays the one decoder. Also used by tests.
pub fn encode_begin(b: &Begin) -> Bytes {
    let mut out = Vec::with_capacity(21);
    out.push(b'B');
    out.extend_from_slice(&b.final_lsn.to_be_bytes());
    out.extend_from_slice(&b.commit_time.to_be_bytes());
    out.extend_from_slice(&b.xid.to_be_bytes());
    out.into()
}

pub fn encode_commit(c: &Commit) -> Bytes {
    let mut out = Vec::with_capacity(26);
    out.push(b'C');
    out.push(c.flags);
    out.extend_from_slice(&c.commit_lsn.to_be_bytes());
    out.extend_from_slice(&c.end_lsn.to_be_bytes());
    out.extend_from_slice(&c.commit_time.to_be_bytes());
    out.into()
}

pub fn encode_message(m: &LogicalMessage) -> Bytes {
    let mut out = Vec::with_capacity(15 + m.prefix.len() + m.content.len());
    out.push(b'M');
    out.push(u8::from(m.transactional));
    out.extend_from_slice(&m.lsn.to_be_bytes());
    out.extend_from_slice(m.prefix.as_bytes());
    out.push(0);
    out.extend_from_slice(&(m.content.len() as u32).to_be_bytes());
    out.extend_from_slice(&m.content);
    out.into()
}

struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    tag: char,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                what,
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.data[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// An Int16 count that must not be negative.
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = i16::from_be_bytes(self.array(what)?);
        usize::try_from(n).map_err(|_| DecodeError::Negative {
            tag: self.tag,
            what,
            value: n.into(),
        })
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), DecodeError> {
        match self.u8(what)? {
            b if b == byte => Ok(()),
            b => Err(DecodeError::Unexpected {
                tag: self.tag,
                what,
                byte: b,
            }),
        }
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Unterminated {
                tag: self.tag,
                what,
                offset: self.pos,
            })?;
        let text = std::str::from_utf8(&rest[..end])
            .map_err(|_| DecodeError::NotUtf8 {
                tag: self.tag,
                what,
            })?
            .to_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.take(n, what)?;
        Ok(self.data.slice(self.pos - n..self.pos))
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.count("tuple column count")?;
        // Each column takes at least one byte.
        let mut datums = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            let datum = match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.u32("value length")? as usize;
                    Datum::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.u32("value length")? as usize;
                    Datum::Binary(self.bytes(len, "binary value")?)
                }
                byte => {
                    return Err(DecodeError::Unexpected {
                        tag: self.tag,
                        what: "column kind",
                        byte,
                    })
                }
            };
            datums.push(datum);
        }
        Ok(Tuple(datums))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn text(out: &mut Vec<u8>, s: &str) {
        out.push(b't');
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn relation_and_update_with_full_old_tuple() {
        let mut rel = vec![b'R'];
        rel.extend_from_slice(&16384u32.to_be_bytes());
        cstr(&mut rel, "public");
        cstr(&mut rel, "t");
        rel.push(b'f');
        rel.extend_from_slice(&2i16.to_be_bytes());
        rel.push(1);
        cstr(&mut rel, "id");
        rel.extend_from_slice(&23u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        rel.push(0);
        cstr(&mut rel, "v");
        rel.extend_from_slice(&25u32.to_be_bytes());
        rel.extend_from_slice(&(-1i32).to_be_bytes());
        let Message::Relation(r) = decode(&rel.into()).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(r.name, "t");
        assert_eq!(r.replica_identity, b'f');
        assert!(r.columns[0].key && !r.columns[1].key);
        assert_eq!(r.columns[1].type_oid, 25);

        let mut upd = vec![b'U'];
        upd.extend_from_slice(&16384u32.to_be_bytes());
        upd.push(b'O');
        upd.extend_from_slice(&2i16.to_be_bytes());
        text(&mut upd, "1");
        upd.push(b'n');
        upd.push(b'N');
        upd.extend_from_slice(&2i16.to_be_bytes());
        text(&mut upd, "1");
        upd.push(b'u');
        let Message::Update(u) = decode(&upd.into()).unwrap() else {
            panic!("not an update")
        };
        assert_eq!(
            u.old,
            Some(OldTuple::Full(Tuple(vec![
                Datum::Text(Bytes::from_static(b"1")),
                Datum::Null
            ])))
        );
        assert_eq!(u.new.0[1], Datum::UnchangedToast);
    }

    #[test]
    fn encoded_boundaries_decode_back() {
        let b = Begin {
            final_lsn: 0x16B3748,
            commit_time: 12,
            xid: 7,
        };
        assert_eq!(decode(&encode_begin(&b)), Ok(Message::Begin(b)));
        let c = Commit {
            flags: 0,
            commit_lsn: 1,
            end_lsn: 2,
            commit_time: 3,
        };
        assert_eq!(decode(&encode_commit(&c)), Ok(Message::Commit(c)));
        let m = LogicalMessage {
            transactional: true,
            lsn: 5,
            prefix: "p".into(),
            content: Bytes::from_static(b"xyz"),
        };
        assert_eq!(decode(&encode_message(&m)), Ok(Message::Message(m)));
    }

    #[test]
    fn truncated_and_trailing_input_are_errors() {
        let full = encode_commit(&Commit {
            flags: 0,
            commit_lsn: 1,
            end_lsn: 2,
            commit_time: 3,
        });
        for len in 0..full.len() {
            assert!(decode(&full.slice(..len)).is_err(), "prefix of {len} bytes");
        }
        let mut longer = full.to_vec();
        longer.push(0);
        assert_eq!(
            decode(&longer.into()),
            Err(DecodeError::Trailing { tag: 'C', extra: 1 })
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&Bytes::from(data));
        }

        #[test]
        fn garbage_after_a_valid_tag_never_panics(
            tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
            rest in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut data = vec![tag];
            data.extend(rest);
            let _ = decode(&Bytes::from(data));
        }
    }
}
