//! Records inside batches, read as streams: the produce-time check of compressed batches, and
//! stored batches decoded back into records for the broker's own readers (push subscriptions,
//! exact seek by time, the coordinator journal). The Kafka fetch path never decodes; it sends
//! the stored bytes.
//!
//! Invariants:
//! - Memory does not follow sizes declared by the data. A batch's records are decompressed
//!   through a fixed buffer and parsed one record at a time; nothing holds a whole
//!   uncompressed batch. Uncompressed output past `limit` (`max_uncompressed_batch_bytes`)
//!   is an error, so a decompression bomb costs at most `limit` bytes of decoding work.
//! - The produce check ([`validate_produce`]) allocates nothing per record: it skips keys,
//!   values and headers, checking only lengths, the record count and the offset deltas.
//! - A reader holds the stored (compressed) bytes of one read, about `max_bytes` but at least
//!   one batch, plus one record at a time ([`for_each_record`]) or a bounded number of record
//!   bytes ([`read_records`]); decoder state is fixed-size, except a snappy block (up to
//!   `limit`) and the zstd window (`limit` rounded up to a power of two, within 8–128 MiB).
//! - A stored batch that fails to decode is an error for the reader that met it
//!   ([`ReadError::Batch`]); the batches around it stay readable.

mod inflate;

use bytes::Bytes;
use indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Record, TimestampType};
use qanat_log::batch::{compute_crc, BatchHeader, BatchIter, Validated, HEADER_LEN};
use qanat_log::{LogError, Partition};

use inflate::{codec_name, Inflate};

/// Why the records of one batch were refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// The records inflate past the configured limit (or declare that they would).
    #[error("{codec} records exceed the limit of uncompressed bytes: {reason}")]
    TooLarge { codec: &'static str, reason: String },
    /// The records do not parse or disagree with the batch header.
    #[error("{codec} records are malformed: {reason}")]
    Corrupt { codec: &'static str, reason: String },
}

impl RecordsError {
    fn corrupt(codec: u8, reason: String) -> Self {
        RecordsError::Corrupt {
            codec: codec_name(codec),
            reason,
        }
    }
}

/// A compressed batch of a produce request refused by [`validate_produce`].
#[derive(Debug, thiserror::Error)]
#[error("batch at byte {position} ({batch_bytes} bytes, {uncompressed_bytes} bytes decompressed, limit {limit}): {source}")]
pub struct BatchRefused {
    /// Position of the batch in the partition's record data.
    pub position: usize,
    pub batch_bytes: usize,
    /// Uncompressed bytes decoded before the batch was refused.
    pub uncompressed_bytes: u64,
    pub limit: u64,
    #[source]
    pub source: RecordsError,
}

/// Errors reading records back from a partition.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Log(#[from] LogError),
    /// One stored batch does not decode; the batches before and after it may be fine.
    #[error("stored batch at offset {base_offset} does not decode: {source}")]
    Batch {
        base_offset: i64,
        #[source]
        source: RecordsError,
    },
}

/// Size of the buffer uncompressed bytes pass through (on the stack).
const STREAM_BUF: usize = 8 * 1024;

/// Uncompressed record bytes of one batch, read through a fixed buffer, with a hard limit.
struct RecordBytes<'a> {
    source: Inflate<'a>,
    codec: u8,
    buf: [u8; STREAM_BUF],
    at: usize,
    end: usize,
    /// Bytes taken from `source` so far.
    produced: u64,
    limit: u64,
}

impl<'a> RecordBytes<'a> {
    fn new(codec: u8, payload: &'a [u8], limit: u64) -> Result<Self, RecordsError> {
        // Uncompressed records are already in memory: their own length is the limit.
        let limit = if codec == inflate::NONE {
            payload.len() as u64
        } else {
            limit
        };
        Ok(Self {
            source: Inflate::open(codec, payload, limit)?,
            codec,
            buf: [0; STREAM_BUF],
            at: 0,
            end: 0,
            produced: 0,
            limit,
        })
    }

    /// Uncompressed bytes consumed so far.
    fn position(&self) -> u64 {
        self.produced - (self.end - self.at) as u64
    }

    fn corrupt(&self, reason: impl Into<String>) -> RecordsError {
        RecordsError::corrupt(self.codec, reason.into())
    }

    fn too_large(&self, reason: String) -> RecordsError {
        if self.codec == inflate::NONE {
            // Uncompressed bytes are what they are: more than the batch holds is garbage.
            return self.corrupt(reason);
        }
        RecordsError::TooLarge {
            codec: codec_name(self.codec),
            reason,
        }
    }

    /// Refill the buffer; false at the end of the records.
    fn fill(&mut self) -> Result<bool, RecordsError> {
        let room = self.limit - self.produced;
        // Ask for one byte past the limit, so reaching it exactly is not an error.
        let want = STREAM_BUF.min(usize::try_from(room.saturating_add(1)).unwrap_or(STREAM_BUF));
        let n = self.source.read(&mut self.buf[..want], room)?;
        self.produced += n as u64;
        if self.produced > self.limit {
            return Err(self.too_large(format!("more than {} bytes", self.limit)));
        }
        self.at = 0;
        self.end = n;
        Ok(n > 0)
    }

    fn at_end(&mut self) -> Result<bool, RecordsError> {
        Ok(self.at == self.end && !self.fill()?)
    }

    fn byte(&mut self) -> Result<u8, RecordsError> {
        if self.at == self.end && !self.fill()? {
            return Err(self.corrupt(format!("records end early, at byte {}", self.position())));
        }
        let b = self.buf[self.at];
        self.at += 1;
        Ok(b)
    }

    /// A zigzag varint of at most `max_bytes` bytes (5 for int32, 10 for int64).
    fn varint(&mut self, max_bytes: u32) -> Result<i64, RecordsError> {
        let mut raw = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            raw |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        Err(self.corrupt(format!("varint longer than {max_bytes} bytes")))
    }

    fn varint32(&mut self) -> Result<i32, RecordsError> {
        let v = self.varint(5)?;
        i32::try_from(v).map_err(|_| self.corrupt(format!("varint {v} out of int32 range")))
    }

    fn skip(&mut self, mut n: u64) -> Result<(), RecordsError> {
        while n > 0 {
            if self.at == self.end && !self.fill()? {
                return Err(self.corrupt("records end inside a record"));
            }
            let step = ((self.end - self.at) as u64).min(n);
            self.at += step as usize;
            n -= step;
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<Bytes, RecordsError> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.at == self.end && !self.fill()? {
                return Err(self.corrupt("records end inside a record"));
            }
            let step = (self.end - self.at).min(n - out.len());
            out.extend_from_slice(&self.buf[self.at..self.at + step]);
            self.at += step;
        }
        Ok(Bytes::from(out))
    }
}

/// The fields of one record that readers keep.
#[derive(Debug, Default)]
struct Fields {
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: IndexMap<StrBytes, Option<Bytes>>,
}

/// What every record tells without being kept.
#[derive(Debug, Clone, Copy)]
struct RecordInfo {
    offset_delta: i32,
    timestamp_delta: i64,
}

/// Smallest record body: attributes, timestamp delta, offset delta, key length, value length
/// and header count, one byte each.
const MIN_RECORD_BODY: i32 = 6;

/// Parse the next record: its lengths are checked against the record's own length, and that
/// against the limit, before anything is read or allocated. When `keep(offset_delta)` says so,
/// key, value and headers are copied into `fields`; otherwise they are skipped (no allocation).
/// Returns whether `fields` was filled.
fn next_record(
    s: &mut RecordBytes<'_>,
    fields: &mut Fields,
    keep: impl FnOnce(i32) -> bool,
) -> Result<(RecordInfo, bool), RecordsError> {
    let len = s.varint32()?;
    if len < MIN_RECORD_BODY {
        return Err(s.corrupt(format!("record length {len} at byte {}", s.position())));
    }
    let start = s.position();
    let len = len as u64;
    if len > s.limit - start {
        return Err(s.too_large(format!("a record at byte {start} declares {len} bytes")));
    }
    let end = start + len;
    s.byte()?; // attributes: unused in v2
    let timestamp_delta = s.varint(10)?;
    let offset_delta = s.varint32()?;
    let keeping = keep(offset_delta);
    // A length-prefixed field; `null_ok` says whether length -1 (null) is allowed.
    let field = |s: &mut RecordBytes<'_>,
                 what: &str,
                 null_ok: bool|
     -> Result<Option<Bytes>, RecordsError> {
        let n = s.varint32()?;
        let left = end.saturating_sub(s.position());
        if n < if null_ok { -1 } else { 0 } || i64::from(n) > left as i64 {
            return Err(s.corrupt(format!(
                "{what} length {n} in a record with {left} bytes left"
            )));
        }
        if n < 0 {
            Ok(None)
        } else if keeping {
            s.take(n as usize).map(Some)
        } else {
            s.skip(n as u64).map(|()| None)
        }
    };
    let key = field(s, "key", true)?;
    let value = field(s, "value", true)?;
    let headers = s.varint32()?;
    let left = end.saturating_sub(s.position());
    // Each header takes at least two bytes (two length varints).
    if headers < 0 || headers as u64 > left / 2 {
        return Err(s.corrupt(format!(
            "header count {headers} in a record with {left} bytes left"
        )));
    }
    if keeping {
        fields.headers.clear();
    }
    for _ in 0..headers {
        let name = field(s, "header name", false)?;
        let header_value = field(s, "header value", true)?;
        if let (true, Some(name)) = (keeping, name) {
            let name = String::from_utf8_lossy(&name).into_owned();
            fields
                .headers
                .insert(StrBytes::from_string(name), header_value);
        }
    }
    if s.position() != end {
        return Err(s.corrupt(format!(
            "record at byte {start} declares {len} bytes but its fields take {}",
            s.position() - start
        )));
    }
    if keeping {
        fields.key = key;
        fields.value = value;
    }
    Ok((
        RecordInfo {
            offset_delta,
            timestamp_delta,
        },
        keeping,
    ))
}

/// Check the records of one batch (`batch` is the whole batch, header included) without
/// keeping them: they must decompress (when compressed) to at most `limit` bytes, parse, number exactly
/// the header's record count, carry offset deltas 0, 1, 2, … and end with the last one.
/// Returns the uncompressed size.
pub fn validate_batch_records(batch: &[u8], limit: u64) -> Result<u64, (u64, RecordsError)> {
    let at_start = |e| (0, e);
    let h = BatchHeader::parse(batch)
        .ok_or_else(|| at_start(RecordsError::corrupt(0, "truncated batch header".into())))?;
    let payload = batch
        .get(HEADER_LEN..h.total_len())
        .ok_or_else(|| at_start(RecordsError::corrupt(0, "truncated batch".into())))?;
    if h.compression() == inflate::NONE && uncompressed_records_ok(payload, h.record_count) {
        return Ok(payload.len() as u64);
    }
    streamed_batch_records(&h, payload, limit)
}

/// [`validate_batch_records`] through the decode stream: every codec, and the precise error.
fn streamed_batch_records(
    h: &BatchHeader,
    payload: &[u8],
    limit: u64,
) -> Result<u64, (u64, RecordsError)> {
    let at_start = |e| (0, e);
    let mut s = RecordBytes::new(h.compression(), payload, limit).map_err(at_start)?;
    let mut unused = Fields::default();
    let checked = (|| {
        for i in 0..h.record_count.max(0) {
            let (r, _) = next_record(&mut s, &mut unused, |_| false)?;
            if r.offset_delta != i {
                return Err(s.corrupt(format!("record {i} has offset delta {}", r.offset_delta)));
            }
        }
        if !s.at_end()? {
            return Err(s.corrupt(format!(
                "records continue past the {} the header declares",
                h.record_count
            )));
        }
        Ok(())
    })();
    match checked {
        Ok(()) => Ok(s.position()),
        Err(e) => Err((s.produced, e)),
    }
}

/// The usual case of [`validate_batch_records`], walked where the bytes lie: an uncompressed
/// batch whose records are all well formed. It accepts only what the streaming check accepts
/// (the same varints, lengths, offset deltas and header counts, each read within its own
/// record), and anything else goes to that check for its precise error, so the two cannot
/// disagree. Streaming every record of every produce through the decode buffer was the
/// broker's largest user-space cost per produced byte.
fn uncompressed_records_ok(payload: &[u8], record_count: i32) -> bool {
    /// A zigzag varint of at most `max_bytes` bytes of `b` from `*at` (as `RecordBytes::varint`).
    fn varint(b: &[u8], at: &mut usize, max_bytes: u32) -> Option<i64> {
        let mut raw = 0u64;
        for i in 0..max_bytes {
            let byte = *b.get(*at)?;
            *at += 1;
            raw |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        None
    }
    /// A length-prefixed field that ends within `record`; -1 (null) only when `null_ok`.
    fn field(record: &[u8], at: &mut usize, null_ok: bool) -> Option<()> {
        let n = varint(record, at, 5)?;
        if n < if null_ok { -1 } else { 0 } {
            return None;
        }
        if n > 0 {
            let n = usize::try_from(n).ok()?;
            *at = at.checked_add(n).filter(|&end| end <= record.len())?;
        }
        Some(())
    }
    let walk = || -> Option<usize> {
        let mut at = 0usize;
        for i in 0..record_count.max(0) {
            let len = varint(payload, &mut at, 5)?;
            if len < i64::from(MIN_RECORD_BODY) || len > i64::from(i32::MAX) {
                return None;
            }
            let end = at.checked_add(usize::try_from(len).ok()?)?;
            let record = payload.get(..end)?;
            at += 1; // attributes
            varint(record, &mut at, 10)?; // timestamp delta
            if varint(record, &mut at, 5)? != i64::from(i) {
                return None; // offset delta
            }
            field(record, &mut at, true)?; // key
            field(record, &mut at, true)?; // value
            let headers = varint(record, &mut at, 5)?;
            if headers < 0 || headers as u64 > (end.checked_sub(at)? / 2) as u64 {
                return None;
            }
            for _ in 0..headers {
                field(record, &mut at, false)?;
                field(record, &mut at, true)?;
            }
            if at != end {
                return None;
            }
        }
        Some(at)
    };
    walk() == Some(payload.len())
}

/// The produce-time check of one partition's record data: the records of every batch with a
/// valid CRC are checked by [`validate_batch_records`] — compressed or not, since a stored
/// batch whose records do not parse would fail every later reader. Anything structurally
/// wrong (header, length, CRC) is left to `Partition::append`, which reports it precisely.
pub fn validate_produce(records: &[u8], limit: u64) -> Result<(), BatchRefused> {
    let mut position = 0;
    while let Some(rest) = records.get(position..).filter(|r| !r.is_empty()) {
        let Ok(h) = BatchHeader::parse_checked(rest, position) else {
            return Ok(());
        };
        let Some(batch) = rest.get(..h.total_len()) else {
            return Ok(());
        };
        if compute_crc(batch) == Some(h.crc) {
            check_records(position, batch, limit)?;
        }
        position += batch.len();
    }
    Ok(())
}

/// [`validate_produce`] of a buffer whose batches passed the log's validation (structure and
/// CRC), so only the records are left to check.
pub fn validate_records(validated: &Validated<'_>, limit: u64) -> Result<(), BatchRefused> {
    validated
        .batches()
        .try_for_each(|(position, batch)| check_records(position, batch, limit))
}

fn check_records(position: usize, batch: &[u8], limit: u64) -> Result<(), BatchRefused> {
    validate_batch_records(batch, limit)
        .map(|_| ())
        .map_err(|(uncompressed_bytes, source)| BatchRefused {
            position,
            batch_bytes: batch.len(),
            uncompressed_bytes,
            limit,
            source,
        })
}

/// Fixed cost charged per kept record, on top of its bytes, when bounding a read.
const RECORD_OVERHEAD: u64 = 128;

fn slice_bytes(partition: &Partition, s: &qanat_log::FileSlice) -> Result<Vec<u8>, LogError> {
    let mut buf = vec![0u8; s.len as usize];
    s.file
        .read_exact_at(&mut buf, s.position)
        .map_err(|source| LogError::Io {
            path: partition.dir().to_path_buf(),
            source,
        })?;
    Ok(buf)
}

/// Walk the records of the stored batches from `from` on, in order, calling `visit` with each
/// record's offset, timestamp and, when `want(offset)`, its fields; `visit` returns false to
/// stop. Batches are read about `max_bytes` at a time; each is decoded as a stream capped at
/// `limit` uncompressed bytes.
fn walk(
    partition: &Partition,
    from: i64,
    max_bytes: u64,
    limit: u64,
    want: impl Fn(i64) -> bool,
    mut visit: impl FnMut(&BatchHeader, Visit) -> bool,
) -> Result<(), ReadError> {
    if from >= partition.high_watermark() {
        return Ok(());
    }
    let read = partition.read(from, max_bytes)?;
    let mut expected = from;
    for slice in &read.slices {
        let bytes = slice_bytes(partition, slice)?;
        for item in BatchIter::new(&bytes) {
            let (position, h) = item.map_err(|e| ReadError::Batch {
                base_offset: expected,
                source: RecordsError::Corrupt {
                    codec: "stored",
                    reason: e.to_string(),
                },
            })?;
            expected = h.last_offset() + 1;
            if h.last_offset() < from {
                continue;
            }
            let bad = |source| ReadError::Batch {
                base_offset: h.base_offset,
                source,
            };
            let batch = &bytes[position..position + h.total_len()];
            let mut s =
                RecordBytes::new(h.compression(), &batch[HEADER_LEN..], limit).map_err(bad)?;
            for _ in 0..h.record_count.max(0) {
                let mut fields = Fields::default();
                let (info, kept) = next_record(&mut s, &mut fields, |delta| {
                    want(h.base_offset + i64::from(delta))
                })
                .map_err(bad)?;
                let timestamp = if h.is_log_append_time() {
                    h.max_timestamp
                } else {
                    h.base_timestamp.saturating_add(info.timestamp_delta)
                };
                let v = Visit {
                    offset: h.base_offset + i64::from(info.offset_delta),
                    timestamp,
                    fields: kept.then_some(fields),
                };
                if !visit(&h, v) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// One record met by [`walk`].
struct Visit {
    offset: i64,
    timestamp: i64,
    /// Present when the walk's `want` asked for it.
    fields: Option<Fields>,
}

/// Call `f` with each record at or after `from`, in order, from whole batches of about
/// `max_bytes` of stored bytes, until `f` returns false. Compressed batches are decompressed as
/// streams capped at `limit` bytes; one record at a time is held, so memory does not depend on
/// what a batch inflates to.
pub fn for_each_record(
    partition: &Partition,
    from: i64,
    max_bytes: u64,
    limit: u64,
    mut f: impl FnMut(Record) -> bool,
) -> Result<(), ReadError> {
    walk(
        partition,
        from,
        max_bytes,
        limit,
        |offset| offset >= from,
        |h, v| {
            let Some(fields) = v.fields else { return true };
            let offset = v.offset;
            f(Record {
                transactional: h.is_transactional(),
                control: h.is_control(),
                delete_horizon: false,
                partition_leader_epoch: h.partition_leader_epoch,
                producer_id: h.producer_id,
                producer_epoch: h.producer_epoch,
                timestamp_type: if h.is_log_append_time() {
                    TimestampType::LogAppend
                } else {
                    TimestampType::Creation
                },
                offset,
                sequence: if h.base_sequence < 0 {
                    -1
                } else {
                    h.base_sequence
                        .wrapping_add((offset - h.base_offset) as i32)
                },
                timestamp: v.timestamp,
                key: fields.key,
                value: fields.value,
                headers: fields.headers,
            })
        },
    )
}

/// Records at or after `from` (see [`for_each_record`]), stopping once the kept records'
/// bytes reach `max_bytes` (at least one record when there is one). A batch that inflates to
/// much more is returned over several calls, each decoding it again from its start: meant for
/// small batches (the journal's); large readers use [`for_each_record`].
pub fn read_records(
    partition: &Partition,
    from: i64,
    max_bytes: u64,
    limit: u64,
) -> Result<Vec<Record>, ReadError> {
    let mut out = Vec::new();
    let mut kept = 0u64;
    for_each_record(partition, from, max_bytes, limit, |r| {
        kept += RECORD_OVERHEAD
            + r.key.as_ref().map_or(0, |k| k.len() as u64)
            + r.value.as_ref().map_or(0, |v| v.len() as u64)
            + r.headers
                .iter()
                .map(|(k, v)| (k.len() + v.as_ref().map_or(0, Bytes::len)) as u64)
                .sum::<u64>();
        out.push(r);
        kept < max_bytes
    })?;
    Ok(out)
}

/// The first record whose timestamp is at or after `ts`, as (offset, timestamp): Kafka's
/// ListOffsets by time. The log finds the batch; this looks inside it, keeping nothing.
///
/// A batch that does not decode (stored before the produce-time check, or damaged on disk
/// under a valid CRC) answers its base offset and maximum timestamp, with a warning: never
/// later than the true answer, so a consumer seeking by time skips nothing.
pub fn offset_for_timestamp(
    partition: &Partition,
    ts: i64,
    limit: u64,
) -> Result<Option<(i64, i64)>, LogError> {
    let Some((base, batch_max)) = partition.offset_for_timestamp(ts)? else {
        return Ok(None);
    };
    let mut found = None;
    let walked = walk(
        partition,
        base,
        1,
        limit,
        |_| false,
        |h, v| {
            if h.base_offset != base {
                return false;
            }
            if v.timestamp >= ts {
                found = Some((v.offset, v.timestamp));
                return false;
            }
            true
        },
    );
    match walked {
        Ok(()) => Ok(Some(found.unwrap_or((base, batch_max)))),
        Err(ReadError::Log(e)) => Err(e),
        Err(ReadError::Batch {
            base_offset,
            source,
        }) => {
            tracing::warn!(
                partition = %partition.dir().display(),
                base_offset,
                error = %source,
                "seek by time: stored batch does not decode; answering its base offset"
            );
            Ok(Some((base, batch_max)))
        }
    }
}

#[cfg(test)]
mod tests;
