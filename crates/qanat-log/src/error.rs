use std::path::PathBuf;

/// Errors of the partition log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An incoming batch failed validation (bad CRC, bad magic, truncated, …). Nothing was appended.
    #[error("corrupt record batch at byte {position}: {reason}")]
    CorruptBatch { position: usize, reason: String },
    /// The requested offset is outside [log_start_offset, next_offset].
    #[error("offset {requested} out of range [{log_start}, {next}]")]
    OffsetOutOfRange {
        requested: i64,
        log_start: i64,
        next: i64,
    },
    /// The batch is larger than a segment may hold.
    #[error("record batch of {size} bytes is too large")]
    BatchTooLarge { size: usize },
    /// An I/O error on a named file.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An idempotent producer sent a batch with an epoch older than the one the partition has
    /// seen for it (a fenced zombie producer). Nothing was appended.
    #[error("producer {producer_id} is fenced: epoch {got} is older than current epoch {current}")]
    InvalidProducerEpoch {
        producer_id: i64,
        current: i16,
        got: i16,
    },
    /// An idempotent producer's batch does not continue its sequence (a gap, a reorder, a
    /// non-zero start after an epoch bump, or a retry mixed with new batches). Nothing was
    /// appended.
    #[error("out-of-order sequence for producer {producer_id}: expected {expected}, got {got}")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    /// A feature the log does not implement (transactional and control batches).
    #[error("unsupported: {reason}")]
    Unsupported { reason: String },
    /// The partition was closed or deleted.
    #[error("partition is closed")]
    Closed,
    /// A failed fdatasync cut the log back below this append: it is not stored.
    #[error("append at offset {offset} in {} was cut off after a failed fdatasync", dir.display())]
    CutBySyncFailure { dir: PathBuf, offset: i64 },
}
