//! The vendored `kafka-protocol` decoders (`third_party/PATCHES.md`) must answer a count that
//! the bytes present cannot hold with an error, never with an allocation sized from it: the
//! published crate reserves the claimed capacity first, and for a count near 2^31 the process
//! aborts on allocation failure. A test here that regresses aborts its test binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use kafka_protocol::messages::MetadataRequest;
use kafka_protocol::protocol::Decodable;

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
