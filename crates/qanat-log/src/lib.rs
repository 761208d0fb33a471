//! Partition storage for the Qanat bus (SYSTEM.md A2–A5): an append-only log of Kafka
//! RecordBatch v2 batches per partition, split into segments, with sparse offset and time
//! indexes, crash recovery, group-commit fsync and retention.
//!
//! # What it owns
//! One [`Partition`] owns one directory. The broker hands it produce buffers (`append`),
//! asks for durability (`sync_append` / `sync`), and serves fetches from the returned
//! [`FileSlice`]s (zero-copy via [`LogFile::raw_fd`]). All file access goes through
//! [`Storage`], so tests run the same code on [`SimStorage`], which models crashes.
//!
//! # On-disk format
//! - `<base>.log` (base = first offset, 20 digits): batches stored verbatim as the producer
//!   sent them, except the base offset (assigned densely) and, with LogAppendTime, the
//!   attributes/maxTimestamp/CRC. Segments are written strictly sequentially.
//! - `<base>.index`: 8-byte entries (offset − base u32 BE, file position u32 BE) of a batch
//!   start, one after every `index_interval_bytes` of log.
//! - `<base>.timeindex`: 12-byte entries (largest maxTimestamp so far i64 BE, offset − base
//!   u32 BE of the batch that reached it), added with offset entries when the max grew, plus
//!   a final one when the segment rolls.
//! - `<base>.producers`: idempotent-producer state as of offset `base` (every batch below it),
//!   written when the segment is rolled in and on open: version u16, count u32, per producer
//!   (id i64, epoch i16, n u8, n × (baseSeq i32, lastSeq i32, baseOffset i64, lastOffset i64,
//!   maxTimestamp i64)), CRC-32C u32. Fsynced on open, before retention deletes segments and
//!   on close; a torn or missing one only makes open replay more headers.
//! - `recovery-point`: i64 BE offset + CRC-32C; every segment that ends at or below it was
//!   fsynced, so recovery only walks its headers instead of checking every CRC.
//! - `clean-shutdown`: written by `close` after everything is fsynced (like `recovery-point`,
//!   through a temp file and a rename): active segment base i64 BE, its length u64 BE, next
//!   offset i64 BE, CRC-32C u32. Open removes it (durably,
//!   before any append) and, when it matches the active segment, walks that segment's headers
//!   instead of checking every CRC; after a crash there is no marker and every batch past
//!   the recovery point is checked.
//!
//! - `next-segment.spare`: always empty; the next segment's file with disk blocks reserved
//!   ahead, made off the append path near a segment's end and renamed to `<base>.log` at the
//!   roll. Open removes a leftover one.
//!
//! Indexes are derived data: written lazily (on roll/close), checked on open, rebuilt from the
//! log if missing or inconsistent.
//!
//! # Idempotent producers
//! Batches with producerId ≥ 0 are checked under the append lock against per-producer state
//! (epoch + metadata of the last [`MAX_CACHED_BATCHES`] batches), O(1) per batch, no I/O:
//! an older epoch is [`LogError::InvalidProducerEpoch`]; a new epoch must start at sequence 0
//! and the same epoch must continue at lastSeq + 1 (wrapping past `i32::MAX` to 0), else
//! [`LogError::OutOfOrderSequence`]; an unknown producer may start anywhere. A buffer made
//! only of batches equal (epoch, baseSeq, lastSeq) to cached ones is a retry: nothing is
//! written and [`AppendOutcome::duplicate`] is set with the original offsets; retries mixed
//! with new batches are out of order. Transactional and control batches are refused
//! ([`LogError::Unsupported`]). On open the state is the newest readable snapshot at a segment
//! start plus the headers of the segments from there, replayed by the recovery walk itself
//! (normally only the active segment, which recovery walks anyway). Retention keeps the state
//! of deleted segments; producers idle for more than [`PRODUCER_EXPIRATION_MS`] (by batch
//! maxTimestamp) are forgotten by `enforce_retention`.
//!
//! # Invariants
//! - Offsets are dense: each batch's base offset is the previous batch's last offset + 1,
//!   within and across segments; a segment's name is its first offset.
//! - A segment holds at most `u32::MAX` bytes and offsets, so index entries fit in u32.
//! - Readers only see data below the published end (size and next offset, one atomic per
//!   segment), which moves only after the write returned: never a half-written batch.
//! - Appends are serialized by one mutex; reads take no append lock.
//! - Everything appended below `durable_offset()` has been fdatasynced, including the
//!   directory entries of new segments.
//! - With [`LogConfig::serve_durable_only`], readers see nothing at or past
//!   `durable_offset()`: `high_watermark()`, `read` and `offset_for_timestamp` stop there, so
//!   no consumer reads a record that a crash could still take back.
//! - A failed fdatasync never leaves the unsynced tail in place: the partition truncates back
//!   to `durable_offset()` and reopens itself (recovery and producer state included), so
//!   whatever was not acknowledged as durable is gone and a retry is stored once. An append
//!   that the cut removed fails `sync_append` (its generation is stale), never succeeds later.
//! - Recovery truncates at the first torn/corrupt batch and drops any later segments, so the
//!   log is always a prefix of what was appended.
//! - A producer's sequence numbers are gapless per partition (within an epoch); a retried
//!   batch is acknowledged with its original offsets and stored once. The check and the write
//!   happen under the append lock, so concurrent retries cannot both be written.
//! - Producer state after open equals the state after appending the recovered log (plus the
//!   state of segments removed by retention): every closed segment is covered by a durable
//!   snapshot at or after it before retention deletes it.

use std::path::PathBuf;
use std::sync::Arc;

pub mod batch;
pub mod clock;
pub mod error;
mod partition;
mod producer;
mod segment;
pub mod storage;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::LogError;
pub use partition::Partition;
pub use producer::{last_sequence, next_sequence, MAX_CACHED_BATCHES, PRODUCER_EXPIRATION_MS};
pub use storage::{
    FaultyStorage, HookedStorage, LogFile, OsStorage, SimStorage, Storage, StorageHooks, StorageOp,
    SyncFaults,
};

/// Which timestamp the log keeps in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampType {
    /// Keep the producer's timestamps.
    #[default]
    CreateTime,
    /// Overwrite with the broker's append time (attributes bit 3 set, CRC recomputed).
    LogAppendTime,
}

/// Per-partition storage settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Roll the active segment once it holds at least this many bytes.
    pub segment_bytes: u64,
    /// Roll the active segment once its first batch is older than this.
    pub segment_ms: u64,
    /// Delete closed segments whose newest timestamp is older than this (None: keep forever).
    pub retention_ms: Option<u64>,
    /// Delete the oldest closed segments while the partition is larger than this (None: no limit).
    pub retention_bytes: Option<u64>,
    /// Add a sparse index entry every this many bytes of log.
    pub index_interval_bytes: u32,
    /// Timestamp policy.
    pub timestamp_type: TimestampType,
    /// Serve readers only what has been fdatasynced (for `fsync = "always"`): the high
    /// watermark is the durable offset, not the append end.
    pub serve_durable_only: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            index_interval_bytes: 4096,
            timestamp_type: TimestampType::CreateTime,
            serve_durable_only: false,
        }
    }
}

/// What `Partition::open` found and repaired.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub truncated_bytes: u64,
    pub truncated_at: Option<(PathBuf, u64)>,
    pub rebuilt_indexes: Vec<PathBuf>,
    pub next_offset: i64,
    /// Idempotent producers whose state was restored.
    pub producers: usize,
    /// Log bytes whose CRC was checked (0 after a clean shutdown that left a valid marker).
    pub crc_checked_bytes: u64,
    /// A valid clean-shutdown marker matched the active segment.
    pub clean_shutdown: bool,
}

/// Result of one successful append.
#[derive(Debug, Clone, Copy)]
pub struct AppendOutcome {
    pub base_offset: i64,
    pub last_offset: i64,
    /// Set when the partition uses LogAppendTime.
    pub log_append_time: Option<i64>,
    pub bytes: u64,
    pub records: u64,
    /// The request was a retry of batches already in the log (same producer id, epoch and
    /// sequence range): nothing was written, and the offsets (and LogAppendTime) are the
    /// original ones. `bytes` and `records` are 0.
    pub duplicate: bool,
    /// The partition's generation at the append; it grows whenever a failed fdatasync cuts
    /// the log back, so [`Partition::sync_append`] can tell an append that was cut.
    pub generation: u64,
}

/// A byte range of a segment file holding whole batches.
#[derive(Clone)]
pub struct FileSlice {
    pub file: Arc<dyn LogFile>,
    pub position: u64,
    pub len: u64,
}

/// Result of a read.
#[derive(Clone, Default)]
pub struct ReadOutcome {
    pub slices: Vec<FileSlice>,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    /// Offset after the last record of the returned batches (`from_offset` when none).
    pub next_offset: i64,
}

/// What retention removed.
#[derive(Debug, Clone, Default)]
pub struct RetentionOutcome {
    pub deleted_segments: usize,
    pub deleted_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Partition>();
        check::<Arc<Partition>>();
        check::<FileSlice>();
    }
}
