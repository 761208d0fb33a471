//! Kafka RecordBatch v2, encoded straight from the loop's records.
//!
//! kafka-protocol's `RecordBatchEncoder` takes owned `Record`s (a `Bytes` per key and value
//! and a map of headers per record), which is the per-record allocation this producer exists
//! to avoid; so records are written here, field by field, into one growing buffer per batch.
//! The format is Kafka's (KIP-98): a 61-byte header, then the records, compressed as a whole.
//!
//! Invariants:
//! * An [`OpenBatch`] holds records of one partition, in the order they were pushed; its
//!   `runs` name every record's (file key, sequence) in that order.
//! * [`SealedBatch::stamp`] fixes producer id, epoch and base sequence once; a retry sends the
//!   very same bytes (the broker recognises a repeat by its sequence).

use std::io::Write;

use bytes::Bytes;

use crate::sink::Trajectory;

/// Size of the v2 batch header, up to and including the record count.
pub const HEADER_BYTES: usize = 61;
/// Size of what a record adds beyond key, value and headers, at most (length, attributes,
/// timestamp delta, offset delta, key and value lengths, header count).
const RECORD_OVERHEAD_MAX: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;

/// Kafka's codec ids (attributes bits 0–2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
    Lz4,
    Zstd,
}

impl Codec {
    /// The codec named by `compression` (librdkafka's names); snappy is not offered here.
    pub fn parse(compression: &str) -> Option<Codec> {
        match compression {
            "none" | "" => Some(Codec::None),
            "gzip" => Some(Codec::Gzip),
            "lz4" => Some(Codec::Lz4),
            "zstd" => Some(Codec::Zstd),
            _ => None,
        }
    }

    fn id(self) -> i16 {
        match self {
            Codec::None => 0,
            Codec::Gzip => 1,
            Codec::Lz4 => 3,
            Codec::Zstd => 4,
        }
    }
}

/// Records of one file with consecutive sequence numbers, in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub file_key: u64,
    pub first_seq: u64,
    pub count: u32,
}

/// A batch still taking records: the uncompressed records section.
#[derive(Debug)]
pub struct OpenBatch {
    /// Room for the header, then the records: uncompressed, the buffer is sent as it is.
    records: Vec<u8>,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    pub runs: Vec<Run>,
    /// When the first record came (ms since the Unix epoch), for `linger`.
    pub opened_ms: u64,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn varint_len(v: i64) -> usize {
    let mut z = zigzag(v);
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut Vec<u8>, v: i64) {
    let mut z = zigzag(v);
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

impl OpenBatch {
    pub fn new(now_ms: u64, capacity: usize) -> OpenBatch {
        OpenBatch {
            records: {
                let mut b = Vec::with_capacity(HEADER_BYTES + capacity);
                b.resize(HEADER_BYTES, 0);
                b
            },
            count: 0,
            base_timestamp: now_ms as i64,
            max_timestamp: now_ms as i64,
            runs: Vec::new(),
            opened_ms: now_ms,
        }
    }

    /// Bytes of records so far (uncompressed).
    pub fn len(&self) -> usize {
        self.records.len() - HEADER_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn count(&self) -> i32 {
        self.count
    }

    /// Append one record; `trajectory` gives its headers (none without one).
    pub fn push(
        &mut self,
        timestamp_ms: u64,
        file_key: u64,
        seq: u64,
        key: &[u8],
        value: &[u8],
        trajectory: Option<&Trajectory<'_>>,
    ) {
        let ts_delta = (timestamp_ms as i64).saturating_sub(self.base_timestamp);
        self.max_timestamp = self.max_timestamp.max(timestamp_ms as i64);
        let offset_delta = i64::from(self.count);
        let (header_count, header_bytes) = trajectory.map_or((0, 0), |t| {
            t.fold_headers((0usize, 0usize), |(n, size), k, v| {
                (
                    n + 1,
                    size + varint_len(k.len() as i64)
                        + k.len()
                        + varint_len(v.len() as i64)
                        + v.len(),
                )
            })
        });
        let body = 1
            + varint_len(ts_delta)
            + varint_len(offset_delta)
            + varint_len(key.len() as i64)
            + key.len()
            + varint_len(value.len() as i64)
            + value.len()
            + varint_len(header_count as i64)
            + header_bytes;
        let buf = &mut self.records;
        buf.reserve(body + RECORD_OVERHEAD_MAX);
        put_varint(buf, body as i64);
        buf.push(0); // attributes
        put_varint(buf, ts_delta);
        put_varint(buf, offset_delta);
        put_varint(buf, key.len() as i64);
        buf.extend_from_slice(key);
        put_varint(buf, value.len() as i64);
        buf.extend_from_slice(value);
        put_varint(buf, header_count as i64);
        if let Some(t) = trajectory {
            t.fold_headers((), |(), k, v| {
                put_varint(buf, k.len() as i64);
                buf.extend_from_slice(k.as_bytes());
                put_varint(buf, v.len() as i64);
                buf.extend_from_slice(v);
            });
        }
        self.count += 1;
        match self.runs.last_mut() {
            Some(r) if r.file_key == file_key && r.first_seq + u64::from(r.count) == seq => {
                r.count += 1
            }
            _ => self.runs.push(Run {
                file_key,
                first_seq: seq,
                count: 1,
            }),
        }
    }

    /// Close the batch: compress its records behind room for the header.
    pub fn seal(self, codec: Codec, level: i32) -> std::io::Result<SealedBatch> {
        let record_bytes = self.len();
        let records = &self.records[HEADER_BYTES..];
        let mut wire = if codec == Codec::None {
            Vec::new()
        } else {
            let mut w = Vec::with_capacity(HEADER_BYTES + records.len() / 2 + 64);
            w.resize(HEADER_BYTES, 0);
            w
        };
        match codec {
            // Already behind room for the header: no copy.
            Codec::None => {}
            Codec::Gzip => {
                let level = if level < 0 { 6 } else { level.min(9) as u32 };
                let mut e = flate2::write::GzEncoder::new(wire, flate2::Compression::new(level));
                e.write_all(records)?;
                wire = e.finish()?;
            }
            Codec::Lz4 => {
                // Kafka's LZ4 framing is the standard frame with independent 64 KiB blocks
                // and no checksums, as Kafka's own producer writes it (its reader cannot
                // follow linked blocks).
                let mut e = lz4::EncoderBuilder::new()
                    .block_size(lz4::BlockSize::Max64KB)
                    .block_mode(lz4::BlockMode::Independent)
                    .checksum(lz4::ContentChecksum::NoChecksum)
                    .level(level.max(0) as u32)
                    .build(wire)?;
                e.write_all(records)?;
                let (w, r) = e.finish();
                r?;
                wire = w;
            }
            Codec::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(wire, level.max(0))?;
                e.write_all(records)?;
                wire = e.finish()?;
            }
        }
        if codec == Codec::None {
            wire = self.records;
        }
        Ok(SealedBatch {
            wire,
            codec,
            count: self.count,
            base_timestamp: self.base_timestamp,
            max_timestamp: self.max_timestamp,
            record_bytes,
            runs: self.runs,
            opened_ms: self.opened_ms,
            stamped: None,
        })
    }
}

/// A closed batch: compressed records behind an unfilled header until stamped.
#[derive(Debug)]
pub struct SealedBatch {
    wire: Vec<u8>,
    codec: Codec,
    pub count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    /// Uncompressed size of its records.
    pub record_bytes: usize,
    pub runs: Vec<Run>,
    pub opened_ms: u64,
    stamped: Option<(Bytes, i32)>,
}

impl SealedBatch {
    /// The batch's bytes with the producer's id, epoch and the base sequence; the first call
    /// fixes them, later calls (retries) return the same bytes.
    pub fn stamp(&mut self, producer_id: i64, epoch: i16, base_sequence: i32) -> Bytes {
        if let Some((bytes, _)) = &self.stamped {
            return bytes.clone();
        }
        let mut w = std::mem::take(&mut self.wire);
        let batch_length = (w.len() - 12) as i32;
        w[0..8].copy_from_slice(&0i64.to_be_bytes());
        w[8..12].copy_from_slice(&batch_length.to_be_bytes());
        w[12..16].copy_from_slice(&(-1i32).to_be_bytes());
        w[16] = 2;
        w[21..23].copy_from_slice(&self.codec.id().to_be_bytes());
        w[23..27].copy_from_slice(&(self.count - 1).to_be_bytes());
        w[27..35].copy_from_slice(&self.base_timestamp.to_be_bytes());
        w[35..43].copy_from_slice(&self.max_timestamp.to_be_bytes());
        w[43..51].copy_from_slice(&producer_id.to_be_bytes());
        w[51..53].copy_from_slice(&epoch.to_be_bytes());
        w[53..57].copy_from_slice(&base_sequence.to_be_bytes());
        w[57..61].copy_from_slice(&self.count.to_be_bytes());
        let crc = crc32c::crc32c(&w[21..]);
        w[17..21].copy_from_slice(&crc.to_be_bytes());
        let bytes = Bytes::from(w);
        self.stamped = Some((bytes.clone(), base_sequence));
        bytes
    }

    /// The base sequence it was stamped with.
    pub fn base_sequence(&self) -> Option<i32> {
        self.stamped.as_ref().map(|(_, s)| *s)
    }

    /// Bytes it holds (compressed), for the queue's bound.
    pub fn wire_len(&self) -> usize {
        self.stamped
            .as_ref()
            .map_or(self.wire.len(), |(b, _)| b.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use kafka_protocol::records::{Compression, RecordBatchDecoder};

    fn trajectory<'a>(attrs: &'a [(String, String)], offset: u64) -> Trajectory<'a> {
        Trajectory {
            host: "h1",
            file_id: "h1:1:2:abcd-10",
            path: "/var/log/a.log",
            offset,
            size: 6,
            lines: 1,
            attributes: attrs,
        }
    }

    /// What the batch decodes to through kafka-protocol's own decoder (a second
    /// implementation of the format), for every codec.
    #[test]
    fn batches_decode_with_kafka_protocol() {
        let attrs = vec![("env".to_string(), "prod".to_string())];
        for codec in [Codec::None, Codec::Gzip, Codec::Lz4, Codec::Zstd] {
            let mut b = OpenBatch::new(1_700_000_000_000, 1024);
            let values: Vec<Vec<u8>> = (0..300)
                .map(|i| format!("line {i} {}", "x".repeat(i % 97)).into_bytes())
                .collect();
            for (i, v) in values.iter().enumerate() {
                let t = trajectory(&attrs, i as u64 * 6);
                b.push(
                    1_700_000_000_000 + i as u64,
                    7,
                    100 + i as u64,
                    b"k1",
                    v,
                    Some(&t),
                );
            }
            b.push(1_700_000_000_500, 9, 0, b"manifest", b"{}", None);
            assert_eq!(
                b.runs,
                [
                    Run {
                        file_key: 7,
                        first_seq: 100,
                        count: 300
                    },
                    Run {
                        file_key: 9,
                        first_seq: 0,
                        count: 1
                    }
                ]
            );
            let mut sealed = b.seal(codec, -1).unwrap();
            let wire = sealed.stamp(4242, 3, 17);
            assert_eq!(sealed.stamp(1, 1, 1), wire, "a retry sends the same bytes");
            let mut buf = wire.clone();
            let set = RecordBatchDecoder::decode(&mut buf).unwrap();
            let want = match codec {
                Codec::None => Compression::None,
                Codec::Gzip => Compression::Gzip,
                Codec::Lz4 => Compression::Lz4,
                Codec::Zstd => Compression::Zstd,
            };
            assert_eq!(set.compression, want);
            let recs = set.records;
            assert_eq!(recs.len(), 301);
            for (i, r) in recs.iter().take(300).enumerate() {
                assert_eq!(r.producer_id, 4242);
                assert_eq!(r.producer_epoch, 3);
                assert_eq!(r.sequence, 17 + i as i32);
                assert_eq!(r.offset, i as i64);
                assert_eq!(r.timestamp, 1_700_000_000_000 + i as i64);
                assert_eq!(r.key.as_deref(), Some(&b"k1"[..]));
                assert_eq!(r.value.as_deref(), Some(&values[i][..]));
                let h: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            String::from_utf8(v.as_deref().unwrap().to_vec()).unwrap(),
                        )
                    })
                    .collect();
                let offset = (i * 6).to_string();
                let want = [
                    ("qanat.host", "h1"),
                    ("qanat.file", "h1:1:2:abcd-10"),
                    ("qanat.path", "/var/log/a.log"),
                    ("qanat.offset", offset.as_str()),
                    ("qanat.size", "6"),
                    ("qanat.lines", "1"),
                    ("env", "prod"),
                ];
                let want: Vec<(String, String)> = want
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                assert_eq!(h, want, "{codec:?}");
            }
            assert!(recs[300].headers.is_empty());
            assert_eq!(recs[300].value.as_deref(), Some(&b"{}"[..]));
        }
    }

    #[test]
    fn varints_are_zigzag() {
        for (v, want) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (63, vec![126]),
            (64, vec![128, 1]),
            (-65, vec![129, 1]),
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b, want, "{v}");
            assert_eq!(varint_len(v), want.len());
        }
    }
}
