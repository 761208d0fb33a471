//! Change data capture (SYSTEM.md E3, E5): reads a database's own change log as a replica
//! would — MariaDB/MySQL binlog in ROW format, PostgreSQL logical replication with `pgoutput`
//! — and turns it into Debezium-compatible change events on the bus.
//!
//! # What it owns
//! - [`event`]: the canonical change event ([`event::ChangeEvent`]), its values
//!   ([`event::Value`]) and their JSON rendering (the Debezium envelope, schemas disabled).
//! - [`source`]: the contract between a database source and the loop that delivers its
//!   changes ([`source::Source`], [`source::Change`], [`source::Position`]).
//! - [`postgres`]: the PostgreSQL source (logical replication, `pgoutput`): slot and
//!   publication, exported-snapshot reads, pgoutput decoding, text values to [`event::Value`].
//! - [`pipeline`]: the delivery loop, generic over the source: routing (`<prefix>.<db>.<table>`
//!   or regex routes for sharded tables), include/exclude, column exclusion and masking,
//!   tombstones, transaction markers, the offsets topic (key = connector name, latest wins)
//!   and the per-connector schema-history topic, both read back by [`pipeline::load_state`].
//! - [`config`]: `cdc.toml` (`[[connector]]`s), `QANAT_CDC_*` overrides, validation that
//!   names the key.
//! - [`mysql`]: the MariaDB/MySQL binlog source (with the small MariaDB shim for its own
//!   events), value decoding per `docs/cdc-types.md`, DDL following, the lock-free
//!   chunked snapshot, and incremental snapshots of single tables while streaming, signalled
//!   through a signal table in the source database.
//! - [`progress`]: snapshot progress per table (rows read of the estimate), for metrics and
//!   the terminal.
//!
//! # Invariants
//! - A source emits changes in commit order. A [`source::Change::Commit`] (or
//!   [`source::Change::Heartbeat`]) carries the position from which a restarted source loses
//!   nothing once everything emitted before it is acknowledged; rows carry their own log
//!   position for consumers but are never resume points, so a crash repeats at most the
//!   changes after the last stored position.
//! - A position is stored, and handed back to the source with
//!   [`source::Source::acknowledge`], only after the bus acknowledged every event before it.
//! - Values are exact: DECIMAL/NUMERIC as their decimal text, never floats; NULL is distinct
//!   from the empty string and the empty byte string.

pub mod config;
pub mod event;
pub mod mysql;
pub mod pipeline;
pub mod postgres;
pub mod progress;
pub mod source;
