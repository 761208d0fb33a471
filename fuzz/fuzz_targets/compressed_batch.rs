//! Feed arbitrary bytes to the produce-time check of compressed batches, both as a produce
//! buffer and as the records section of a batch of every codec: it must never panic, and
//! never decode more than one byte past its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qanat_broker::records::{validate_batch_records, validate_produce};
use qanat_log::batch::{compute_crc, HEADER_LEN};

const LIMIT: u64 = 64 * 1024;

/// A RecordBatch v2 with a valid CRC around `payload`.
fn batch(codec: u8, record_count: i32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + payload.len());
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&((HEADER_LEN - 12 + payload.len()) as i32).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.push(2);
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&i16::from(codec & 7).to_be_bytes());
    b.extend_from_slice(&record_count.wrapping_sub(1).to_be_bytes());
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&0i64.to_be_bytes());
    b.extend_from_slice(&(-1i64).to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&record_count.to_be_bytes());
    b.extend_from_slice(payload);
    if let Some(crc) = compute_crc(&b) {
        b[17..21].copy_from_slice(&crc.to_be_bytes());
    }
    b
}

fuzz_target!(|data: &[u8]| {
    let _ = validate_produce(data, LIMIT);
    if let [codec, count, payload @ ..] = data {
        let b = batch(*codec, i32::from(*count), payload);
        match validate_batch_records(&b, LIMIT) {
            Ok(size) => assert!(size <= LIMIT),
            Err((decoded, _)) => assert!(decoded <= LIMIT + 1),
        }
    }
});
