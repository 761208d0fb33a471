//! The vendored `kafka-protocol` decoders (`third_party/PATCHES.md`) must answer a count that
//! the bytes present cannot hold with an error, never with an allocation sized from it: the
//! published crate reserves the claimed capacity first, and for a count near 2^31 the process
//! aborts on allocation failure. A test here that regresses aborts its test binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use kafka_protocol::messages::MetadataRequest;
use kafka_protocol::protocol::Decodable;
use kafka_protocol::records::RecordBatchDecoder;
use qanat_log::batch::{compute_crc, encode_batch, SimpleRecord};

/// A valid uncompressed batch of one record (no key, no value, no header) whose header then
/// claims `record_count` records and, with `forge_header_count`, whose record claims 2^31-1
/// headers; the CRC is fixed, so only the counts are wrong.
fn forged_batch(record_count: i32, forge_header_count: bool) -> Vec<u8> {
    let mut b = encode_batch(&[SimpleRecord {
        timestamp: 1,
        key: None,
        value: None,
    }]);
    b[57..61].copy_from_slice(&record_count.to_be_bytes());
    if forge_header_count {
        // The record ends with its header count, varint 0. Write i32::MAX instead (zigzag
        // varint, 5 bytes) and grow the record's one-byte length varint (zigzag: +8 is +4)
        // and the batch length by the 4 bytes added.
        assert_eq!(b.pop(), Some(0), "the record's header count");
        b.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0x0f]);
        assert!(b[61] < 0x78, "the record's length fits one varint byte");
        b[61] += 8;
        let batch_length = i32::from_be_bytes(b[8..12].try_into().unwrap()) + 4;
        b[8..12].copy_from_slice(&batch_length.to_be_bytes());
    }
    let crc = compute_crc(&b).expect("a whole batch header");
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

#[test]
fn the_forged_batch_is_otherwise_valid() {
    // Without this, the tests below could pass on a batch refused for another reason.
    let mut b = Bytes::from(forged_batch(1, false));
    let set = RecordBatchDecoder::decode(&mut b).expect("a well-formed batch decodes");
    assert_eq!(set.records.len(), 1);
    assert!(set.records[0].headers.is_empty());
}

#[test]
fn array_length_beyond_the_bytes_is_an_error() {
    // Metadata v1 (Int32 array length): topics claiming 2^31-1 entries, none present.
    let mut body = Bytes::from(i32::MAX.to_be_bytes().to_vec());
    assert!(MetadataRequest::decode(&mut body, 1).is_err());
}

#[test]
fn compact_array_length_beyond_the_bytes_is_an_error() {
    // Metadata v9 (compact array, unsigned varint length + 1): 2^32-2 topics, none present.
    let mut body = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(MetadataRequest::decode(&mut body, 9).is_err());
}

#[test]
fn record_count_beyond_the_bytes_is_an_error() {
    let mut b = Bytes::from(forged_batch(i32::MAX, false));
    assert!(RecordBatchDecoder::decode(&mut b).is_err());
}

#[test]
fn header_count_beyond_the_bytes_is_an_error() {
    let mut b = Bytes::from(forged_batch(1, true));
    assert!(RecordBatchDecoder::decode(&mut b).is_err());
}
