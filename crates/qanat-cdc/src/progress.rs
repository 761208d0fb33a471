//! Snapshot progress per connector and table: rows read of the estimated total.
//!
//! Sources report here as they read; the figures go to the `qanat_cdc_snapshot_rows_done` and
//! `qanat_cdc_snapshot_rows_estimated` gauges and to a process-wide table that a terminal
//! display (`qanat cdc`'s progress bars) reads with [`tables`]. A table's entry stays after
//! it finished, marked so, until the connector reports a new read of it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// One table's snapshot progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableProgress {
    pub connector: String,
    /// `db.table` or `schema.table`.
    pub table: String,
    pub rows_done: u64,
    /// The server's estimate (`information_schema.TABLES.TABLE_ROWS`, `pg_class.reltuples`);
    /// 0 when it has none.
    pub rows_estimated: u64,
    pub finished: bool,
}

type Registry = parking_lot::Mutex<BTreeMap<(String, String), TableProgress>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Record that `rows_done` rows of `table` are read (of about `rows_estimated`).
pub fn report(connector: &str, table: &str, rows_done: u64, rows_estimated: u64, finished: bool) {
    metrics::gauge!("qanat_cdc_snapshot_rows_estimated", "connector" => connector.to_string(),
        "table" => table.to_string())
    .set(rows_estimated as f64);
    metrics::gauge!("qanat_cdc_snapshot_rows_done", "connector" => connector.to_string(),
        "table" => table.to_string())
    .set(rows_done as f64);
    registry().lock().insert(
        (connector.to_string(), table.to_string()),
        TableProgress {
            connector: connector.to_string(),
            table: table.to_string(),
            rows_done,
            rows_estimated,
            finished,
        },
    );
}

/// Every table reported so far, by connector and table.
pub fn tables() -> Vec<TableProgress> {
    registry().lock().values().cloned().collect()
}
