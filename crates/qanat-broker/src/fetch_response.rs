//! FetchResponse v4–v12 encoded by hand so that record batches stay in the segment files and
//! go out by `sendfile` (A5). Everything else in the broker uses `kafka-protocol`'s encoders;
//! this one response is the exception because `kafka-protocol` needs the records in memory.
//! A unit test checks the bytes against `kafka-protocol`'s own encoder for every version.

use bytes::{BufMut, Bytes, BytesMut};

use crate::wire::{Chunk, Response};

/// One partition of a fetch response.
pub struct PartitionOut {
    pub index: i32,
    pub error_code: i16,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// Whole record batches: file ranges, or bytes already read.
    pub records: Vec<Chunk>,
}

impl PartitionOut {
    pub fn records_len(&self) -> u64 {
        self.records.iter().map(Chunk::len).sum()
    }
}

/// One topic of a fetch response.
pub struct TopicOut {
    pub name: String,
    pub partitions: Vec<PartitionOut>,
}

/// Lowest and highest FetchResponse version this encoder writes.
pub const VERSIONS: std::ops::RangeInclusive<i16> = 4..=12;

struct Encoder {
    flexible: bool,
    cur: BytesMut,
    chunks: Vec<Chunk>,
    /// Some partition has records.
    records: bool,
}

impl Encoder {
    fn len(&mut self, n: usize) {
        if self.flexible {
            put_uvarint(&mut self.cur, n as u64 + 1);
        } else {
            self.cur.put_i32(n as i32);
        }
    }

    fn string(&mut self, s: &str) {
        if self.flexible {
            put_uvarint(&mut self.cur, s.len() as u64 + 1);
        } else {
            self.cur.put_i16(s.len() as i16);
        }
        self.cur.put_slice(s.as_bytes());
    }

    fn no_tags(&mut self) {
        if self.flexible {
            self.cur.put_u8(0);
        }
    }

    fn records(&mut self, records: Vec<Chunk>) {
        let total: u64 = records.iter().map(Chunk::len).sum();
        self.len(total as usize);
        if total > 0 {
            self.records = true;
            let head = self.cur.split().freeze();
            self.chunks.push(Chunk::Bytes(head));
            self.chunks.extend(records);
        }
    }

    fn finish(mut self) -> Response {
        if !self.cur.is_empty() {
            self.chunks.push(Chunk::Bytes(self.cur.freeze()));
        }
        Response {
            chunks: self.chunks,
            records: self.records,
        }
    }
}

fn put_uvarint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// Encode header and body of a FetchResponse of `version` (within [`VERSIONS`]).
pub fn encode(
    version: i16,
    correlation_id: i32,
    error_code: i16,
    topics: Vec<TopicOut>,
) -> Response {
    let flexible = version >= 12;
    let mut e = Encoder {
        flexible,
        cur: BytesMut::with_capacity(256),
        chunks: Vec::new(),
        records: false,
    };
    // Response header v0, or v1 (with tagged fields) for flexible versions.
    e.cur.put_i32(correlation_id);
    e.no_tags();
    e.cur.put_i32(0); // throttle_time_ms
    if version >= 7 {
        e.cur.put_i16(error_code);
        e.cur.put_i32(0); // session_id: fetch sessions are not kept
    }
    e.len(topics.len());
    for topic in topics {
        e.string(&topic.name);
        e.len(topic.partitions.len());
        for p in topic.partitions {
            e.cur.put_i32(p.index);
            e.cur.put_i16(p.error_code);
            e.cur.put_i64(p.high_watermark);
            e.cur.put_i64(p.high_watermark); // last_stable_offset: no transactions
            if version >= 5 {
                e.cur.put_i64(p.log_start_offset);
            }
            e.len(0); // aborted_transactions: none
            if version >= 11 {
                e.cur.put_i32(-1); // preferred_read_replica
            }
            e.records(p.records);
            e.no_tags();
        }
        e.no_tags();
    }
    e.no_tags();
    e.finish()
}

/// Set `throttle_time_ms` of an encoded response (known only once its size is, as Kafka sets
/// it after the fetch quota has seen the bytes). It sits right after the response header, in
/// the first chunk, which [`encode`] always starts with header bytes.
pub fn set_throttle_time(response: &mut Response, version: i16, throttle: std::time::Duration) {
    let at = if version >= 12 { 5 } else { 4 };
    let ms = i32::try_from(throttle.as_millis()).unwrap_or(i32::MAX);
    if ms == 0 {
        return;
    }
    if let Some(Chunk::Bytes(first)) = response.chunks.first_mut() {
        if first.len() >= at + 4 {
            let mut head = std::mem::take(first)
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            head[at..at + 4].copy_from_slice(&ms.to_be_bytes());
            *first = head.freeze();
        }
    }
}

/// The response as one buffer (tests, and transports without sendfile).
pub fn to_bytes(response: &Response) -> std::io::Result<Bytes> {
    let mut out = BytesMut::new();
    for chunk in &response.chunks {
        match chunk {
            Chunk::Bytes(b) => out.extend_from_slice(b),
            Chunk::File(f) => {
                let start = out.len();
                out.resize(start + f.len as usize, 0);
                f.file.read_exact_at(&mut out[start..], f.position)?;
            }
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kafka_protocol::messages::fetch_response::{
        FetchResponse, FetchableTopicResponse, PartitionData,
    };
    use kafka_protocol::messages::{ResponseHeader, TopicName};
    use kafka_protocol::protocol::{Encodable, StrBytes};
    use qanat_log::{FileSlice, LogFile};
    use std::sync::Arc;

    /// A file of fixed bytes.
    struct MemFile(Vec<u8>);
    impl LogFile for MemFile {
        fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
            let pos = pos as usize;
            buf.copy_from_slice(&self.0[pos..pos + buf.len()]);
            Ok(())
        }
        fn append(&self, _: &[u8]) -> std::io::Result<()> {
            unreachable!()
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.0.len() as u64)
        }
        fn set_len(&self, _: u64) -> std::io::Result<()> {
            unreachable!()
        }
        fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
    }

    #[test]
    fn matches_kafka_protocol_encoder_for_every_version() {
        let file: Arc<dyn LogFile> = Arc::new(MemFile((0..200u8).collect()));
        for version in VERSIONS {
            let ours = encode(
                version,
                77,
                0,
                vec![
                    TopicOut {
                        name: "orders".into(),
                        partitions: vec![
                            PartitionOut {
                                index: 0,
                                error_code: 0,
                                high_watermark: 42,
                                log_start_offset: 3,
                                records: vec![
                                    Chunk::File(FileSlice {
                                        file: file.clone(),
                                        position: 10,
                                        len: 50,
                                    }),
                                    Chunk::Bytes(Bytes::from_static(&[
                                        100, 101, 102, 103, 104, 105, 106,
                                    ])),
                                ],
                            },
                            PartitionOut {
                                index: 1,
                                error_code: 1,
                                high_watermark: 9,
                                log_start_offset: 0,
                                records: vec![],
                            },
                        ],
                    },
                    TopicOut {
                        name: "x".into(),
                        partitions: vec![],
                    },
                ],
            );
            let mut ours = ours;
            set_throttle_time(&mut ours, version, std::time::Duration::from_millis(250));
            let ours = to_bytes(&ours).unwrap();

            let mut records = Vec::new();
            records.extend_from_slice(&(10..60u8).collect::<Vec<_>>());
            records.extend_from_slice(&(100..107u8).collect::<Vec<_>>());
            let p0 = PartitionData::default()
                .with_partition_index(0)
                .with_high_watermark(42)
                .with_last_stable_offset(42)
                .with_log_start_offset(3)
                .with_aborted_transactions(Some(vec![]))
                .with_preferred_read_replica((-1).into())
                .with_records(Some(Bytes::from(records)));
            let p1 = PartitionData::default()
                .with_partition_index(1)
                .with_error_code(1)
                .with_high_watermark(9)
                .with_last_stable_offset(9)
                .with_log_start_offset(0)
                .with_aborted_transactions(Some(vec![]))
                .with_preferred_read_replica((-1).into())
                .with_records(Some(Bytes::new()));
            let theirs = FetchResponse::default()
                .with_throttle_time_ms(250)
                .with_responses(vec![
                    FetchableTopicResponse::default()
                        .with_topic(TopicName(StrBytes::from_static_str("orders")))
                        .with_partitions(vec![p0, p1]),
                    FetchableTopicResponse::default()
                        .with_topic(TopicName(StrBytes::from_static_str("x"))),
                ]);
            let mut expected = BytesMut::new();
            let header_version = if version >= 12 { 1 } else { 0 };
            ResponseHeader::default()
                .with_correlation_id(77)
                .encode(&mut expected, header_version)
                .unwrap();
            theirs.encode(&mut expected, version).unwrap();
            assert_eq!(&ours[..], &expected[..], "version {version}");
        }
    }
}
