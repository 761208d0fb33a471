//! Qanat's lake: the ODS layer of the warehouse, as Hive-partitioned Parquet under one root.
//!
//! This crate owns the on-disk layout of landed tables and the three jobs over it: landing
//! topics into change-log files, merging a day's changes into the daily snapshot (with the
//! three delete modes and the drift correction), and the row audit that proves nothing was
//! lost between the bus and the snapshot.
//!
//! # Layout
//!
//! A table `db.name` lives in two directories under the root (see [`layout`]):
//!
//! ```text
//! ROOT/db/name_changes/ds=YYYYMMDD/[hh=HH/]part-<topic>-<partition>-<first>-<last>.parquet
//! ROOT/db/name/ds=YYYYMMDD/part-NNNNN.parquet + _SUCCESS
//! ```
//!
//! The change log (`name_changes`) holds every change event as landed, partitioned by the day
//! of its `_log_time`; the snapshot table (`name`) holds one merged, deduplicated partition
//! per day. Both are plain Hive-style directories that DuckDB, pyarrow, Spark and Trino read.
//!
//! # Change-log rows
//!
//! One row per change event: the row image (`after`, or `before` for a delete) as data
//! columns, followed by the metadata columns named in [`columns`]. Per primary key, the
//! order of changes is the bus order (`_partition`, `_offset`): the CDC pipeline keys every
//! event by its primary key, so one key's changes sit in one partition in commit order.
//!
//! # Invariants
//!
//! - A file becomes visible only by a rename of a complete file; nothing reads a `.tmp-*`.
//! - A change-log file's name and metadata name the exact offset range it covers; landing
//!   the same range again replaces the file instead of adding a second copy.
//! - A snapshot partition is replaced whole (written beside, then swapped in) and carries a
//!   `_SUCCESS` manifest ([`manifest`]) written last; a partition without one is not done.
//! - A failed merge leaves the previous partition untouched.

pub mod audit;
pub mod columns;
pub mod drift;
pub mod error;
pub mod fs;
pub mod land;
pub mod layout;
pub mod ls;
pub mod manifest;
pub mod merge;
pub mod offsets;
pub mod read;
pub mod schema;
pub mod sink;

pub use error::LakeError;
