//! Kafka RecordBatch v2 header: parsing, validation, offset assignment.
//!
//! Everything here parses untrusted network bytes: every access is bounds-checked and
//! failures are reported as [`LogError::CorruptBatch`] with the byte position, never a panic.
//!
//! Layout (big-endian): baseOffset i64 @0, batchLength i32 @8, partitionLeaderEpoch i32 @12,
//! magic i8 @16, crc u32 @17 (CRC-32C over `[21..end)`), attributes i16 @21,
//! lastOffsetDelta i32 @23, baseTimestamp i64 @27, maxTimestamp i64 @35, producerId i64 @43,
//! producerEpoch i16 @51, baseSequence i32 @53, recordCount i32 @57, records @61.

use crate::error::LogError;

/// Bytes before `batchLength` counts: baseOffset + batchLength.
pub const LOG_OVERHEAD: usize = 12;
/// Size of the fixed v2 header.
pub const HEADER_LEN: usize = 61;
/// Smallest legal `batchLength` (a header with no records).
pub const MIN_BATCH_LENGTH: i32 = (HEADER_LEN - LOG_OVERHEAD) as i32;
/// The only supported format version.
pub const MAGIC_V2: i8 = 2;

const OFF_LENGTH: usize = 8;
const OFF_MAGIC: usize = 16;
const OFF_CRC: usize = 17;
const OFF_ATTRIBUTES: usize = 21;
const OFF_LAST_DELTA: usize = 23;
const OFF_BASE_TS: usize = 27;
const OFF_MAX_TS: usize = 35;
const OFF_PRODUCER_ID: usize = 43;
const OFF_PRODUCER_EPOCH: usize = 51;
const OFF_BASE_SEQ: usize = 53;
const OFF_COUNT: usize = 57;

/// Attribute bit 3: timestamps are the broker's append time.
pub const ATTR_LOG_APPEND_TIME: i16 = 1 << 3;
/// Attribute bit 4: transactional batch.
pub const ATTR_TRANSACTIONAL: i16 = 1 << 4;
/// Attribute bit 5: control batch.
pub const ATTR_CONTROL: i16 = 1 << 5;

/// The fixed 61-byte header of a RecordBatch v2, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn corrupt(position: usize, reason: impl Into<String>) -> LogError {
    LogError::CorruptBatch {
        position,
        reason: reason.into(),
    }
}

impl BatchHeader {
    /// Decode the header fields from the first [`HEADER_LEN`] bytes; `None` if `buf` is shorter.
    /// Performs no validation.
    pub fn parse(buf: &[u8]) -> Option<BatchHeader> {
        let b = buf.get(..HEADER_LEN)?;
        Some(BatchHeader {
            base_offset: be_i64(b, 0),
            batch_length: be_i32(b, OFF_LENGTH),
            partition_leader_epoch: be_i32(b, 12),
            magic: b[OFF_MAGIC] as i8,
            crc: u32::from_be_bytes([b[17], b[18], b[19], b[20]]),
            attributes: be_i16(b, OFF_ATTRIBUTES),
            last_offset_delta: be_i32(b, OFF_LAST_DELTA),
            base_timestamp: be_i64(b, OFF_BASE_TS),
            max_timestamp: be_i64(b, OFF_MAX_TS),
            producer_id: be_i64(b, OFF_PRODUCER_ID),
            producer_epoch: be_i16(b, OFF_PRODUCER_EPOCH),
            base_sequence: be_i32(b, OFF_BASE_SEQ),
            record_count: be_i32(b, OFF_COUNT),
        })
    }

    /// Decode and check the structural fields (length, magic, lastOffsetDelta); no CRC.
    /// `position` is only used for the error.
    pub fn parse_checked(buf: &[u8], position: usize) -> Result<BatchHeader, LogError> {
        let h = Self::parse(buf).ok_or_else(|| {
            corrupt(
                position,
                format!(
                    "truncated header: {} bytes left, need {HEADER_LEN}",
                    buf.len()
                ),
            )
        })?;
        if h.batch_length < MIN_BATCH_LENGTH {
            return Err(corrupt(
                position,
                format!(
                    "batch length {} below minimum {MIN_BATCH_LENGTH}",
                    h.batch_length
                ),
            ));
        }
        if h.magic != MAGIC_V2 {
            return Err(corrupt(
                position,
                format!("unsupported magic {} (need 2)", h.magic),
            ));
        }
        if h.last_offset_delta < 0 {
            return Err(corrupt(
                position,
                format!("negative lastOffsetDelta {}", h.last_offset_delta),
            ));
        }
        Ok(h)
    }

    /// Total bytes of the batch on the wire (`12 + batchLength`); 0 if the length is negative.
    pub fn total_len(&self) -> usize {
        usize::try_from(self.batch_length).map_or(0, |l| l + LOG_OVERHEAD)
    }
    /// Offset of the last record (`baseOffset + lastOffsetDelta`).
    pub fn last_offset(&self) -> i64 {
        self.base_offset
            .saturating_add(i64::from(self.last_offset_delta))
    }
    /// Compression codec (attributes bits 0–2): 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd.
    pub fn compression(&self) -> u8 {
        (self.attributes & 0x7) as u8
    }
    /// Whether attribute bit 3 (LogAppendTime) is set.
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & ATTR_LOG_APPEND_TIME != 0
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }
}

/// CRC-32C (Castagnoli) of `bytes`. Every produced byte passes through it: the folding
/// implementation of `crc-fast` is used rather than `crc32c`'s CRC32-instruction loop.
fn batch_crc(bytes: &[u8]) -> u32 {
    // CRC-32/ISCSI is CRC-32C; a 32-bit CRC always fits.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// CRC-32C of a whole batch as stored in its `crc` field (over bytes `[21..)`).
/// `None` if `batch` is shorter than the header.
pub fn compute_crc(batch: &[u8]) -> Option<u32> {
    if batch.len() < HEADER_LEN {
        return None;
    }
    Some(batch_crc(&batch[OFF_ATTRIBUTES..]))
}

/// Validate the batch starting at `buf[0]`: structure, that it fits in `buf`, and its CRC.
/// Returns the header; the batch occupies `buf[..header.total_len()]`.
pub fn check_batch(buf: &[u8], position: usize) -> Result<BatchHeader, LogError> {
    let h = BatchHeader::parse_checked(buf, position)?;
    let total = h.total_len();
    let Some(batch) = buf.get(..total) else {
        return Err(corrupt(
            position,
            format!(
                "batch of {total} bytes exceeds the {} bytes remaining",
                buf.len()
            ),
        ));
    };
    let crc = batch_crc(&batch[OFF_ATTRIBUTES..]);
    if crc != h.crc {
        return Err(corrupt(
            position,
            format!("crc mismatch: stored {:#010x}, computed {crc:#010x}", h.crc),
        ));
    }
    Ok(h)
}

/// Walks a buffer of concatenated batches, validating each one (see [`check_batch`]).
/// Yields `(position, header)`; after the first error it yields nothing more.
#[derive(Debug, Clone)]
pub struct BatchIter<'a> {
    buf: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> BatchIter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            done: false,
        }
    }
}

impl Iterator for BatchIter<'_> {
    type Item = Result<(usize, BatchHeader), LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos >= self.buf.len() {
            return None;
        }
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        match check_batch(rest, self.pos) {
            Ok(h) => {
                let at = self.pos;
                self.pos += h.total_len();
                Some(Ok((at, h)))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// One validated batch of a produce buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    /// Byte position in the buffer.
    pub position: usize,
    /// Total length in bytes.
    pub len: usize,
    pub last_offset_delta: i32,
    pub record_count: i32,
    pub max_timestamp: i64,
    pub attributes: i16,
    /// -1 for a non-idempotent batch.
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

/// Summary of a validated produce buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchesSummary {
    pub batches: Vec<BatchInfo>,
    /// Offsets the buffer occupies: sum of `lastOffsetDelta + 1`.
    pub offset_count: i64,
    pub records: u64,
    pub bytes: usize,
    /// Largest single batch, in bytes.
    pub max_batch_len: usize,
}

/// A produce buffer that passed [`validate_batches`], with its summary: the broker validates
/// once, checks the records of each batch, and appends the same bytes with
/// `Partition::append_validated`, so no batch's CRC is computed twice.
#[derive(Debug, Clone)]
pub struct Validated<'a> {
    bytes: &'a [u8],
    summary: BatchesSummary,
}

impl<'a> Validated<'a> {
    /// Validate `bytes` (see [`validate_batches`]).
    pub fn new(bytes: &'a [u8]) -> Result<Self, LogError> {
        let summary = validate_batches(bytes)?;
        Ok(Self { bytes, summary })
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn summary(&self) -> &BatchesSummary {
        &self.summary
    }

    /// Each batch's bytes with its position in the buffer.
    pub fn batches(&self) -> impl Iterator<Item = (usize, &'a [u8])> + '_ {
        let bytes = self.bytes;
        self.summary
            .batches
            .iter()
            .map(move |b| (b.position, &bytes[b.position..b.position + b.len]))
    }
}

/// Smallest encoded record: length, attributes, timestamp delta, offset delta, key length,
/// value length and header count, one byte each.
const MIN_RECORD_BYTES: u64 = 7;

/// Validate a produce buffer: one or more whole v2 batches with correct CRCs, exactly filling
/// `buf`, each with at least one record, as many records as its offsets say, and no more than
/// its bytes can hold. Nothing is modified.
pub fn validate_batches(buf: &[u8]) -> Result<BatchesSummary, LogError> {
    if buf.is_empty() {
        return Err(corrupt(0, "empty record set"));
    }
    let mut s = BatchesSummary {
        bytes: buf.len(),
        ..Default::default()
    };
    for item in BatchIter::new(buf) {
        let (position, h) = item?;
        if h.record_count <= 0 {
            return Err(corrupt(
                position,
                format!("batch has no records (recordCount {})", h.record_count),
            ));
        }
        // Producers write dense batches; a count that disagrees with the offsets, or more
        // records than the bytes could hold, would make every later decoder of this batch
        // trust a forged number.
        if i64::from(h.record_count) != i64::from(h.last_offset_delta) + 1 {
            return Err(corrupt(
                position,
                format!(
                    "recordCount {} does not match lastOffsetDelta {} + 1",
                    h.record_count, h.last_offset_delta
                ),
            ));
        }
        if h.compression() == 0
            && (h.record_count as u64) * MIN_RECORD_BYTES > (h.total_len() - HEADER_LEN) as u64
        {
            return Err(corrupt(
                position,
                format!(
                    "recordCount {} is more than {} uncompressed bytes can hold",
                    h.record_count,
                    h.total_len() - HEADER_LEN
                ),
            ));
        }
        s.offset_count += i64::from(h.last_offset_delta) + 1;
        s.records += h.record_count as u64;
        s.max_batch_len = s.max_batch_len.max(h.total_len());
        s.batches.push(BatchInfo {
            position,
            len: h.total_len(),
            last_offset_delta: h.last_offset_delta,
            record_count: h.record_count,
            max_timestamp: h.max_timestamp,
            attributes: h.attributes,
            producer_id: h.producer_id,
            producer_epoch: h.producer_epoch,
            base_sequence: h.base_sequence,
        });
    }
    Ok(s)
}

fn require_header(batch: &[u8]) -> Result<(), LogError> {
    if batch.len() < HEADER_LEN {
        return Err(corrupt(
            0,
            format!("truncated header: {} bytes, need {HEADER_LEN}", batch.len()),
        ));
    }
    Ok(())
}

/// Overwrite the base offset (not covered by the CRC, so no recompute).
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) -> Result<(), LogError> {
    require_header(batch)?;
    batch[..8].copy_from_slice(&base_offset.to_be_bytes());
    Ok(())
}

/// Apply LogAppendTime like Kafka: set attribute bit 3 and `maxTimestamp = now_ms`, then
/// recompute the CRC over the whole batch (`batch` must be exactly one batch).
pub fn set_log_append_time(batch: &mut [u8], now_ms: i64) -> Result<(), LogError> {
    require_header(batch)?;
    let attrs = be_i16(batch, OFF_ATTRIBUTES) | ATTR_LOG_APPEND_TIME;
    batch[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attrs.to_be_bytes());
    batch[OFF_MAX_TS..OFF_MAX_TS + 8].copy_from_slice(&now_ms.to_be_bytes());
    let crc = batch_crc(&batch[OFF_ATTRIBUTES..]);
    batch[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// A record for [`encode_batch`] (no headers).
#[derive(Debug, Clone, Copy)]
pub struct SimpleRecord<'a> {
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

fn put_varlong(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => put_varlong(out, -1),
        Some(b) => {
            put_varlong(out, b.len() as i64);
            out.extend_from_slice(b);
        }
    }
}

/// Encode an uncompressed RecordBatch v2 with base offset 0 and no producer id — for tests and
/// tools. Base timestamp is the first record's, max timestamp the largest.
pub fn encode_batch(records: &[SimpleRecord<'_>]) -> Vec<u8> {
    encode_batch_with(None, records)
}

/// Like [`encode_batch`], with `producer = Some((producerId, producerEpoch, baseSequence))`
/// for an idempotent batch (`None`: -1/-1/-1). The CRC covers the producer fields.
pub fn encode_batch_with(
    producer: Option<(i64, i16, i32)>,
    records: &[SimpleRecord<'_>],
) -> Vec<u8> {
    let (pid, epoch, seq) = producer.unwrap_or((-1, -1, -1));
    let base_ts = records.first().map_or(-1, |r| r.timestamp);
    let max_ts = records.iter().map(|r| r.timestamp).max().unwrap_or(-1);
    let mut out = vec![0u8; HEADER_LEN];
    let mut body = Vec::new();
    for (i, r) in records.iter().enumerate() {
        body.clear();
        body.push(0); // record attributes
        put_varlong(&mut body, r.timestamp.wrapping_sub(base_ts));
        put_varlong(&mut body, i as i64);
        put_bytes(&mut body, r.key);
        put_bytes(&mut body, r.value);
        put_varlong(&mut body, 0); // headers
        put_varlong(&mut out, body.len() as i64);
        out.extend_from_slice(&body);
    }
    let batch_length = (out.len() - LOG_OVERHEAD) as i32;
    out[OFF_LENGTH..OFF_LENGTH + 4].copy_from_slice(&batch_length.to_be_bytes());
    out[12..16].copy_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    out[OFF_MAGIC] = MAGIC_V2 as u8;
    let last_delta = records.len().saturating_sub(1) as i32;
    out[OFF_LAST_DELTA..OFF_LAST_DELTA + 4].copy_from_slice(&last_delta.to_be_bytes());
    out[OFF_BASE_TS..OFF_BASE_TS + 8].copy_from_slice(&base_ts.to_be_bytes());
    out[OFF_MAX_TS..OFF_MAX_TS + 8].copy_from_slice(&max_ts.to_be_bytes());
    out[OFF_PRODUCER_ID..OFF_PRODUCER_ID + 8].copy_from_slice(&pid.to_be_bytes());
    out[OFF_PRODUCER_EPOCH..OFF_PRODUCER_EPOCH + 2].copy_from_slice(&epoch.to_be_bytes());
    out[OFF_BASE_SEQ..OFF_BASE_SEQ + 4].copy_from_slice(&seq.to_be_bytes());
    out[OFF_COUNT..OFF_COUNT + 4].copy_from_slice(&(records.len() as i32).to_be_bytes());
    let crc = batch_crc(&out[OFF_ATTRIBUTES..]);
    out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn batch(n: usize, ts: i64, vlen: usize) -> Vec<u8> {
        let v = vec![7u8; vlen];
        let recs: Vec<_> = (0..n)
            .map(|i| SimpleRecord {
                timestamp: ts + i as i64,
                key: Some(b"k"),
                value: Some(&v),
            })
            .collect();
        encode_batch(&recs)
    }

    proptest! {
        /// The batch CRC is CRC-32C, byte for byte what every other CRC-32C in the project
        /// and every Kafka client computes, at every length and alignment (the folding code
        /// has separate paths for short inputs, tails and unaligned starts).
        #[test]
        fn batch_crc_is_crc32c(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            skip in 0usize..64,
        ) {
            let bytes = &bytes[skip.min(bytes.len())..];
            prop_assert_eq!(batch_crc(bytes), crc32c::crc32c(bytes));
        }
    }

    #[test]
    fn batch_crc_matches_crc32c_on_a_large_batch() {
        let bytes: Vec<u8> = (0..(1usize << 20) + 77)
            .map(|i| (i * 31 + i / 997) as u8)
            .collect();
        assert_eq!(batch_crc(&bytes[21..]), crc32c::crc32c(&bytes[21..]));
        // The check value of CRC-32C.
        assert_eq!(batch_crc(b"123456789"), 0xe306_9283);
    }

    fn reason(e: LogError) -> (usize, String) {
        match e {
            LogError::CorruptBatch { position, reason } => (position, reason),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Overwrite a big-endian i32 at `at` and fix the CRC, as a forging client would.
    fn forge_i32(b: &mut [u8], at: usize, v: i32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let crc = compute_crc(b).unwrap();
        b[17..21].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn forged_record_counts_are_refused() {
        // One real record claiming 2^31-1: the count disagrees with lastOffsetDelta.
        let mut b = batch(1, 1000, 10);
        forge_i32(&mut b, 57, i32::MAX);
        let (_, why) = reason(validate_batches(&b).unwrap_err());
        assert!(why.contains("does not match"), "{why}");
        // Count and delta agree but the uncompressed bytes cannot hold that many records.
        forge_i32(&mut b, 23, i32::MAX - 1);
        let (_, why) = reason(validate_batches(&b).unwrap_err());
        assert!(why.contains("can hold"), "{why}");
        // An honest batch still passes.
        assert!(validate_batches(&batch(5, 1000, 10)).is_ok());
    }

    #[test]
    fn roundtrip_header() {
        let b = batch(3, 1000, 10);
        let h = check_batch(&b, 0).unwrap();
        assert_eq!(h.total_len(), b.len());
        assert_eq!(h.magic, 2);
        assert_eq!(h.record_count, 3);
        assert_eq!(h.last_offset_delta, 2);
        assert_eq!(h.base_timestamp, 1000);
        assert_eq!(h.max_timestamp, 1002);
        assert_eq!(h.producer_id, -1);
        assert_eq!(h.compression(), 0);
        assert!(!h.is_log_append_time());
        let p = encode_batch_with(
            Some((42, 3, i32::MAX)),
            &[SimpleRecord {
                timestamp: 1,
                key: None,
                value: Some(b"v"),
            }],
        );
        let h = check_batch(&p, 0).unwrap();
        assert_eq!(
            (h.producer_id, h.producer_epoch, h.base_sequence),
            (42, 3, i32::MAX)
        );
        let s = validate_batches(&p).unwrap();
        assert_eq!(s.batches[0].producer_id, 42);
        assert_eq!(s.batches[0].producer_epoch, 3);
        assert_eq!(s.batches[0].base_sequence, i32::MAX);
    }

    #[test]
    fn walks_concatenated() {
        let mut buf = batch(1, 5, 3);
        let second = buf.len();
        buf.extend(batch(4, 9, 100));
        let s = validate_batches(&buf).unwrap();
        assert_eq!(s.batches.len(), 2);
        assert_eq!(s.batches[1].position, second);
        assert_eq!(s.offset_count, 5);
        assert_eq!(s.records, 5);
        assert_eq!(s.bytes, buf.len());
    }

    #[test]
    fn crc_mismatch() {
        let mut buf = batch(2, 5, 3);
        let first = buf.len();
        buf.extend(batch(2, 5, 3));
        let last = buf.len() - 1;
        buf[last] ^= 1;
        let (pos, why) = reason(validate_batches(&buf).unwrap_err());
        assert_eq!(pos, first);
        assert!(why.contains("crc mismatch"), "{why}");
    }

    #[test]
    fn truncated_and_trailing() {
        let b = batch(2, 5, 3);
        let (pos, why) = reason(validate_batches(&b[..b.len() - 1]).unwrap_err());
        assert_eq!(pos, 0);
        assert!(why.contains("exceeds"), "{why}");
        let (_, why) = reason(validate_batches(&b[..30]).unwrap_err());
        assert!(why.contains("truncated header"), "{why}");
        let mut t = b.clone();
        t.extend_from_slice(&[0; 5]);
        let (pos, _) = reason(validate_batches(&t).unwrap_err());
        assert_eq!(pos, b.len());
        assert!(validate_batches(&[]).is_err());
    }

    #[test]
    fn bad_magic_length_delta_count() {
        let b = batch(2, 5, 3);
        let mut m = b.clone();
        m[OFF_MAGIC] = 1;
        assert!(reason(validate_batches(&m).unwrap_err())
            .1
            .contains("magic"));
        let mut l = b.clone();
        l[8..12].copy_from_slice(&10i32.to_be_bytes());
        assert!(reason(validate_batches(&l).unwrap_err())
            .1
            .contains("minimum"));
        let mut d = b.clone();
        d[OFF_LAST_DELTA..OFF_LAST_DELTA + 4].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(reason(validate_batches(&d).unwrap_err())
            .1
            .contains("lastOffsetDelta"));
        let empty = encode_batch(&[]);
        assert!(check_batch(&empty, 0).is_ok());
        assert!(reason(validate_batches(&empty).unwrap_err())
            .1
            .contains("no records"));
    }

    #[test]
    fn patching() {
        let mut b = batch(3, 5, 3);
        set_base_offset(&mut b, 42).unwrap();
        let h = check_batch(&b, 0).unwrap();
        assert_eq!(h.base_offset, 42);
        assert_eq!(h.last_offset(), 44);
        set_log_append_time(&mut b, 777).unwrap();
        let h = check_batch(&b, 0).unwrap();
        assert!(h.is_log_append_time());
        assert_eq!(h.max_timestamp, 777);
        assert_eq!(h.base_timestamp, 5);
        assert!(set_base_offset(&mut [0u8; 10], 1).is_err());
        assert!(set_log_append_time(&mut [0u8; 60], 1).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = validate_batches(&bytes);
            for item in BatchIter::new(&bytes) { let _ = item; }
            let _ = BatchHeader::parse_checked(&bytes, 0);
        }

        #[test]
        fn mutated_valid_batch_never_panics(
            n in 1usize..5, idx in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()
        ) {
            let mut b = batch(n, 1, 20);
            let i = idx.index(b.len());
            b[i] = val;
            let c = cut.index(b.len() + 1);
            let r = validate_batches(&b[..c]);
            if c < b.len() { prop_assert!(r.is_err()); }
        }
    }
}
