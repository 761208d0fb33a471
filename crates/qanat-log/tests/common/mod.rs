//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use qanat_log::batch::{encode_batch, BatchIter, SimpleRecord};
use qanat_log::ReadOutcome;

/// An uncompressed batch of `n` records with `vlen`-byte values, timestamps from `ts`.
pub fn make_batch(n: usize, vlen: usize, ts: i64, fill: u8) -> Vec<u8> {
    let value = vec![fill; vlen];
    let recs: Vec<_> = (0..n)
        .map(|i| SimpleRecord {
            timestamp: ts + i as i64,
            key: Some(b"key"),
            value: Some(&value),
        })
        .collect();
    encode_batch(&recs)
}

/// Concatenated bytes of all slices of a read.
pub fn read_bytes(out: &ReadOutcome) -> Vec<u8> {
    let mut v = Vec::new();
    for s in &out.slices {
        let mut b = vec![0u8; s.len as usize];
        s.file.read_exact_at(&mut b, s.position).unwrap();
        v.extend_from_slice(&b);
    }
    v
}

/// Split read bytes into batches, asserting each is valid (length, magic, CRC).
pub fn split_batches(bytes: &[u8]) -> Vec<(i64, i64, Vec<u8>)> {
    BatchIter::new(bytes)
        .map(|r| {
            let (pos, h) = r.expect("served batch must be valid");
            (
                h.base_offset,
                h.last_offset(),
                bytes[pos..pos + h.total_len()].to_vec(),
            )
        })
        .collect()
}
