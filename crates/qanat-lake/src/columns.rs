//! Names of the metadata columns that the lake adds to data columns.
//!
//! Every name starts with `_` so it cannot collide with a source column in practice; a
//! source table that has a column of one of these names is refused when landed.

/// Change kind, Debezium's codes: `c` insert, `u` update, `d` delete, `r` snapshot read.
pub const OP: &str = "_op";
/// The source's own position of the change, as text (binlog `file:pos:row`, GTID, or LSN).
/// For people and for the audit; ordering uses [`PARTITION`] and [`OFFSET`].
pub const LOG_POS: &str = "_log_pos";
/// When the change was written to the source's log (`source.ts_ms`), UTC milliseconds.
pub const LOG_TIME: &str = "_log_time";
/// Commit time of the change's transaction where the source reports one, else `_log_time`.
pub const COMMIT_TS: &str = "_commit_ts";
/// When the connector extracted the change (the envelope's `ts_ms`), UTC milliseconds.
pub const EXTRACT_TIME: &str = "_extract_time";
/// Bus topic the change was landed from.
pub const TOPIC: &str = "_topic";
/// Bus partition the change was landed from.
pub const PARTITION: &str = "_partition";
/// Bus offset of the change: with [`PARTITION`], the order of one key's changes.
pub const OFFSET: &str = "_offset";
/// In a snapshot partition: the row's latest change was a delete (delete mode `keep`).
pub const DELETED: &str = "_deleted";

/// Every metadata column of a change-log row, in file order after the data columns.
pub const CHANGE_LOG: [&str; 8] = [
    OP,
    LOG_POS,
    LOG_TIME,
    COMMIT_TS,
    EXTRACT_TIME,
    TOPIC,
    PARTITION,
    OFFSET,
];

/// True for a name the lake reserves for its own columns.
pub fn is_reserved(name: &str) -> bool {
    CHANGE_LOG.contains(&name) || name == DELETED
}

/// Parquet key-value metadata naming the primary key, comma-separated (`id` or `a,b`).
pub const PRIMARY_KEY_METADATA: &str = "qanat.primary_key";
