#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::Arc;

use bytes::BytesMut;
use kafka_protocol::records::{Compression, RecordBatchEncoder, RecordEncodeOptions};
use proptest::prelude::*;
use qanat_log::batch::{compute_crc, encode_batch, SimpleRecord};
use qanat_log::{LogConfig, ManualClock, OsStorage};

use super::*;

const GZIP: u8 = 1;
const SNAPPY: u8 = 2;
const LZ4: u8 = 3;
const ZSTD: u8 = 4;
const CODECS: [u8; 4] = [GZIP, SNAPPY, LZ4, ZSTD];

fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// The head of one record (everything before its value bytes) with a value of `value_len`
/// bytes, no key and no headers; the value bytes and the trailing header count (0) follow.
fn record_head(offset_delta: i64, value_len: i64) -> Vec<u8> {
    let mut body = vec![0u8]; // attributes
    put_varint(&mut body, offset_delta); // timestamp delta
    put_varint(&mut body, offset_delta);
    put_varint(&mut body, -1); // key
    put_varint(&mut body, value_len);
    let mut out = Vec::new();
    put_varint(&mut out, body.len() as i64 + value_len + 1);
    out.extend_from_slice(&body);
    out
}

/// A streaming compressor for `codec`; snappy uses xerial framing in 32 KiB blocks.
enum Enc {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Snappy(Vec<u8>, Vec<u8>),
    Lz4(lz4::Encoder<Vec<u8>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Enc {
    fn new(codec: u8) -> Enc {
        match codec {
            GZIP => Enc::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::fast(),
            )),
            SNAPPY => Enc::Snappy(
                b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01".to_vec(),
                Vec::new(),
            ),
            LZ4 => Enc::Lz4(lz4::EncoderBuilder::new().build(Vec::new()).unwrap()),
            _ => Enc::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap()),
        }
    }

    fn snappy_block(out: &mut Vec<u8>, block: &[u8]) {
        let c = snap::raw::Encoder::new().compress_vec(block).unwrap();
        out.extend_from_slice(&(c.len() as u32).to_be_bytes());
        out.extend_from_slice(&c);
    }

    fn write(&mut self, data: &[u8]) {
        match self {
            Enc::Gzip(e) => e.write_all(data).unwrap(),
            Enc::Lz4(e) => e.write_all(data).unwrap(),
            Enc::Zstd(e) => e.write_all(data).unwrap(),
            Enc::Snappy(out, pending) => {
                pending.extend_from_slice(data);
                while pending.len() >= 32 * 1024 {
                    let rest = pending.split_off(32 * 1024);
                    Self::snappy_block(out, pending);
                    *pending = rest;
                }
            }
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Enc::Gzip(e) => e.finish().unwrap(),
            Enc::Lz4(e) => {
                let (out, r) = e.finish();
                r.unwrap();
                out
            }
            Enc::Zstd(e) => e.finish().unwrap(),
            Enc::Snappy(mut out, pending) => {
                if !pending.is_empty() {
                    Self::snappy_block(&mut out, &pending);
                }
                out
            }
        }
    }
}

/// A RecordBatch v2 around an already encoded (and compressed) records section.
fn batch(codec: u8, record_count: i32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&((HEADER_LEN - 12 + payload.len()) as i32).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.push(2);
    b.extend_from_slice(&0u32.to_be_bytes()); // crc, set below
    b.extend_from_slice(&i16::from(codec).to_be_bytes());
    b.extend_from_slice(&(record_count - 1).to_be_bytes());
    b.extend_from_slice(&1_000i64.to_be_bytes());
    b.extend_from_slice(&(1_000i64 + i64::from(record_count)).to_be_bytes());
    b.extend_from_slice(&(-1i64).to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&record_count.to_be_bytes());
    b.extend_from_slice(payload);
    let crc = compute_crc(&b).unwrap();
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

/// A bomb: `records` well-formed records of `value_len` zero bytes each, streamed through the
/// codec's encoder a chunk at a time (never materialized whole).
fn bomb(codec: u8, records: i32, value_len: usize) -> Vec<u8> {
    let mut enc = Enc::new(codec);
    let zeros = vec![0u8; 64 * 1024];
    for i in 0..records {
        enc.write(&record_head(i64::from(i), value_len as i64));
        let mut left = value_len;
        while left > 0 {
            let n = left.min(zeros.len());
            enc.write(&zeros[..n]);
            left -= n;
        }
        enc.write(&[0]); // no headers
    }
    batch(codec, records, &enc.finish())
}

/// Records with keys, values and headers, encoded by kafka-protocol with `compression`.
fn encoded(compression: Compression, n: usize) -> (Vec<u8>, Vec<Record>) {
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let mut headers = IndexMap::new();
            headers.insert(StrBytes::from_static_str("app"), Some(Bytes::from("shop")));
            headers.insert(StrBytes::from_static_str("none"), None);
            Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                sequence: -1,
                timestamp: 1_700_000_000_000 + i as i64,
                key: (i % 2 == 0).then(|| Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(format!("value {i} ").repeat(20))),
                headers,
            }
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    (buf.to_vec(), records)
}

const COMPRESSIONS: [Compression; 5] = [
    Compression::None,
    Compression::Gzip,
    Compression::Snappy,
    Compression::Lz4,
    Compression::Zstd,
];

fn partition(dir: &std::path::Path) -> Partition {
    Partition::open(
        Arc::new(OsStorage),
        Arc::new(ManualClock::new(1)),
        dir.join("t-0"),
        LogConfig::default(),
    )
    .unwrap()
    .0
}

fn too_large(r: Result<(), BatchRefused>) -> BatchRefused {
    let e = r.unwrap_err();
    assert!(matches!(e.source, RecordsError::TooLarge { .. }), "{e}");
    e
}

fn corrupt(r: Result<(), BatchRefused>) -> BatchRefused {
    let e = r.unwrap_err();
    assert!(matches!(e.source, RecordsError::Corrupt { .. }), "{e}");
    e
}

#[test]
fn real_batches_pass_and_read_back_for_every_codec() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path());
    let mut want = Vec::new();
    for compression in COMPRESSIONS {
        let (b, records) = encoded(compression, 50);
        validate_produce(&b, 1 << 20).unwrap_or_else(|e| panic!("{compression:?}: {e}"));
        let base = p.append(&b).unwrap().base_offset;
        want.extend(records.into_iter().map(|mut r| {
            r.offset += base;
            r
        }));
    }
    let got = read_records(&p, 0, u64::MAX, 1 << 20).unwrap();
    assert_eq!(got, want);
    // From the middle of a compressed batch.
    let got = read_records(&p, 75, u64::MAX, 1 << 20).unwrap();
    assert_eq!(got, want[75..]);
}

#[test]
fn bombs_stop_at_the_limit_for_every_codec() {
    for codec in CODECS {
        // 64 records of 256 KiB: 16 MiB of zeros against a 1 MiB limit.
        let b = bomb(codec, 64, 256 << 10);
        assert!(
            b.len() < 1 << 20,
            "codec {codec}: bomb is {} bytes",
            b.len()
        );
        let e = too_large(validate_produce(&b, 1 << 20));
        assert_eq!(e.position, 0);
        assert_eq!(e.batch_bytes, b.len());
        assert!(
            e.uncompressed_bytes <= (1 << 20) + STREAM_BUF as u64,
            "codec {codec}: decoded {} bytes",
            e.uncompressed_bytes
        );
        // Under a limit that holds it, the same batch is valid.
        validate_produce(&b, 32 << 20).unwrap_or_else(|e| panic!("codec {codec}: {e}"));
    }
}

#[test]
fn a_record_declaring_more_than_the_limit_is_refused_before_decoding_it() {
    for codec in CODECS {
        let mut enc = Enc::new(codec);
        enc.write(&record_head(0, i64::from(i32::MAX) - 100));
        enc.write(&[0u8; 4096]);
        let b = batch(codec, 1, &enc.finish());
        let e = too_large(validate_produce(&b, 64 << 20));
        assert!(e.uncompressed_bytes < 64 << 10, "{e}");
    }
}

#[test]
fn the_limit_is_inclusive() {
    let b = bomb(ZSTD, 4, 1000);
    let size = validate_batch_records(&b, 1 << 20).unwrap();
    assert!(validate_produce(&b, size).is_ok());
    too_large(validate_produce(&b, size - 1));
}

#[test]
fn a_zero_bomb_is_corrupt_at_its_first_record() {
    for codec in CODECS {
        let mut enc = Enc::new(codec);
        for _ in 0..256 {
            enc.write(&[0u8; 64 << 10]);
        }
        let b = batch(codec, 1000, &enc.finish());
        let e = corrupt(validate_produce(&b, 64 << 20));
        assert!(e.uncompressed_bytes <= 64 << 10, "{e}");
    }
}

#[test]
fn a_raw_snappy_block_declaring_too_much_is_refused_unallocated() {
    let mut payload = Vec::new();
    put_varint(&mut payload, 0); // placeholder, replaced by a plain varint below
    payload.clear();
    let mut n: u64 = 1 << 31; // declared uncompressed length (plain varint, not zigzag)
    while n >= 0x80 {
        payload.push((n as u8) | 0x80);
        n >>= 7;
    }
    payload.push(n as u8);
    payload.extend_from_slice(&[0u8; 32]);
    let e = too_large(validate_produce(&batch(SNAPPY, 1, &payload), 64 << 20));
    assert_eq!(e.uncompressed_bytes, 0);
}

/// `records` raw record sections, compressed with zstd into one batch claiming `count`.
fn zstd_batch(count: i32, records: &[u8]) -> Vec<u8> {
    let mut enc = Enc::new(ZSTD);
    enc.write(records);
    batch(ZSTD, count, &enc.finish())
}

fn one_record(offset_delta: i64, value: &[u8]) -> Vec<u8> {
    let mut r = record_head(offset_delta, value.len() as i64);
    r.extend_from_slice(value);
    r.push(0);
    r
}

#[test]
fn records_must_agree_with_the_header() {
    let two = [one_record(0, b"a"), one_record(1, b"b")].concat();
    assert!(validate_produce(&zstd_batch(2, &two), 1 << 20).is_ok());
    let e = corrupt(validate_produce(&zstd_batch(3, &two), 1 << 20));
    assert!(e.to_string().contains("end early"), "{e}");
    let e = corrupt(validate_produce(&zstd_batch(1, &two), 1 << 20));
    assert!(e.to_string().contains("continue past"), "{e}");
    let skipped = [one_record(0, b"a"), one_record(2, b"b")].concat();
    let e = corrupt(validate_produce(&zstd_batch(2, &skipped), 1 << 20));
    assert!(e.to_string().contains("offset delta"), "{e}");
}

#[test]
fn malformed_records_are_corrupt() {
    // Record length that disagrees with its fields.
    let mut r = one_record(0, b"abc");
    r[0] += 2;
    r.extend_from_slice(&[0, 0]);
    corrupt(validate_produce(&zstd_batch(1, &r), 1 << 20));
    // Key length -2.
    let mut r = Vec::new();
    put_varint(&mut r, 6);
    r.extend_from_slice(&[0, 0, 0]);
    put_varint(&mut r, -2);
    r.extend_from_slice(&[0, 0]);
    corrupt(validate_produce(&zstd_batch(1, &r), 1 << 20));
    // A null header name.
    let mut body = vec![0u8, 0, 0];
    put_varint(&mut body, -1);
    put_varint(&mut body, -1);
    put_varint(&mut body, 1);
    put_varint(&mut body, -1);
    put_varint(&mut body, -1);
    let mut r = Vec::new();
    put_varint(&mut r, body.len() as i64);
    r.extend_from_slice(&body);
    corrupt(validate_produce(&zstd_batch(1, &r), 1 << 20));
    // An over-long varint.
    corrupt(validate_produce(&zstd_batch(1, &[0xff; 12]), 1 << 20));
    // An unknown codec.
    let mut b = batch(5, 1, b"xx");
    b[21..23].copy_from_slice(&5i16.to_be_bytes());
    let crc = compute_crc(&b).unwrap();
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    corrupt(validate_produce(&b, 1 << 20));
}

#[test]
fn garbage_payloads_are_corrupt_for_every_codec() {
    for codec in CODECS {
        for garbage in [&b""[..], b"\x00", b"garbage that is not compressed at all"] {
            corrupt(validate_produce(&batch(codec, 1, garbage), 1 << 20));
        }
    }
}

#[test]
fn the_refused_batch_is_located_in_the_request() {
    let (good, _) = encoded(Compression::Zstd, 3);
    let bad = bomb(ZSTD, 16, 128 << 10);
    let buf = [good.clone(), bad.clone()].concat();
    let e = too_large(validate_produce(&buf, 1 << 20));
    assert_eq!((e.position, e.batch_bytes), (good.len(), bad.len()));
    // A bad CRC or a broken header is left to the log's own checks.
    let mut crc_broken = bad.clone();
    crc_broken[70] ^= 1;
    assert!(validate_produce(&crc_broken, 1 << 20).is_ok());
    assert!(validate_produce(&bad[..40], 1 << 20).is_ok());
}

#[test]
fn stored_bombs_cost_their_reader_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path());
    let before = encode_batch(&[SimpleRecord {
        timestamp: 10,
        key: None,
        value: Some(b"before"),
    }]);
    p.append(&before).unwrap();
    // Stored as if accepted before the produce-time check existed.
    let b = bomb(LZ4, 64, 256 << 10);
    let base = p.append(&b).unwrap().base_offset;
    p.append(&before).unwrap();

    match read_records(&p, base, 1 << 20, 1 << 20) {
        Err(ReadError::Batch {
            base_offset,
            source,
        }) => {
            assert_eq!(base_offset, base);
            assert!(matches!(source, RecordsError::TooLarge { .. }), "{source}");
        }
        other => panic!("expected a batch error, got {other:?}"),
    }
    // What comes before it reads fine, and seek by time answers the batch's base offset.
    let first = read_records(&p, 0, 1, 1 << 20).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        offset_for_timestamp(&p, 1_010, 1 << 20).unwrap(),
        Some((base, 1_064))
    );
}

#[test]
fn reads_are_bounded_by_record_bytes_not_by_batch() {
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path());
    // 16 MiB uncompressed in one small batch: each read returns about 1 MiB of it.
    let b = bomb(ZSTD, 64, 256 << 10);
    p.append(&b).unwrap();
    let mut from = 0;
    let mut calls = 0;
    while from < 64 {
        let got = read_records(&p, from, 1 << 20, 32 << 20).unwrap();
        let bytes: usize = got.iter().map(|r| r.value.as_ref().unwrap().len()).sum();
        assert!(
            bytes <= (1 << 20) + (256 << 10),
            "{bytes} bytes in one read"
        );
        assert_eq!(got[0].offset, from);
        from = got.last().unwrap().offset + 1;
        calls += 1;
    }
    assert!(calls >= 4, "{calls} reads");
    // Seek by time looks inside without keeping records.
    assert_eq!(
        offset_for_timestamp(&p, 1_040, 32 << 20).unwrap(),
        Some((40, 1_040))
    );
}

fn arb_codec() -> impl Strategy<Value = u8> {
    prop_oneof![Just(GZIP), Just(SNAPPY), Just(LZ4), Just(ZSTD), 0u8..8]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The in-place check of uncompressed records accepts nothing the streaming check refuses.
    #[test]
    fn the_in_place_check_accepts_only_what_the_stream_accepts(
        at in any::<prop::sample::Index>(), byte in any::<u8>(), count_delta in -1i32..=1,
    ) {
        let (b, _) = encoded(Compression::None, 4);
        let h = BatchHeader::parse(&b).unwrap();
        let mut payload = b[HEADER_LEN..].to_vec();
        let i = at.index(payload.len());
        payload[i] = byte;
        let count = h.record_count + count_delta;
        if super::uncompressed_records_ok(&payload, count) {
            let h = BatchHeader { record_count: count, ..h };
            prop_assert!(super::streamed_batch_records(&h, &payload, 1 << 20).is_ok());
        }
    }

    #[test]
    fn random_payloads_never_panic(codec in arb_codec(), count in -2i32..40,
                                    payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        let b = batch(codec, count, &payload);
        let _ = validate_produce(&b, 4096);
        let _ = validate_batch_records(&b, 4096);
    }

    #[test]
    fn random_records_compressed_never_panic(codec in arb_codec(), count in 0i32..40,
                                             records in proptest::collection::vec(any::<u8>(), 0..512)) {
        let codec = if codec == 0 || codec > 4 { ZSTD } else { codec };
        let mut enc = Enc::new(codec);
        enc.write(&records);
        let b = batch(codec, count, &enc.finish());
        let _ = validate_produce(&b, 4096);
    }

    #[test]
    fn flipped_bytes_in_real_batches_never_panic(which in 0usize..5, at in any::<prop::sample::Index>(),
                                                 xor in 1u8..=255) {
        let (mut b, _) = encoded(COMPRESSIONS[which], 5);
        let i = HEADER_LEN + at.index(b.len() - HEADER_LEN);
        b[i] ^= xor;
        let crc = compute_crc(&b).unwrap();
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        let _ = validate_produce(&b, 1 << 20);
        let _ = validate_batch_records(&b, 1 << 20);
    }

    #[test]
    fn random_buffers_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = validate_produce(&buf, 4096);
    }
}

#[test]
fn forged_record_count_is_an_error_not_an_allocation() {
    // A stored batch claiming 2^31-1 records must not size anything from that count.
    let dir = tempfile::tempdir().unwrap();
    let p = partition(dir.path());
    p.append(&encode_batch(&[SimpleRecord {
        timestamp: 1,
        key: None,
        value: Some(b"v"),
    }]))
    .unwrap();
    let stored = segment_bytes(dir.path());
    let mut b = stored.clone();
    b[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
    let crc = compute_crc(&b).unwrap();
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(dir.path().join("t-0").join("00000000000000000000.log"), &b).unwrap();
    drop(p);
    let p = partition(dir.path());
    assert!(matches!(
        read_records(&p, 0, 1 << 20, 1 << 20),
        Err(ReadError::Batch { base_offset: 0, .. })
    ));
}

fn segment_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("t-0").join("00000000000000000000.log")).unwrap()
}
