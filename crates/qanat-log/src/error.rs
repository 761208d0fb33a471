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
    /// The partition was closed or deleted.
    #[error("partition is closed")]
    Closed,
}
