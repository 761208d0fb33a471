//! `qanat lake merge`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use qanat_lake::drift::DriftConfig;
use qanat_lake::layout::{Ds, TableName};
use qanat_lake::merge::{merge, BaseChoice, DeleteMode, MergeOptions};

#[derive(Args)]
pub struct MergeArgs {
    /// Lake root directory.
    #[arg(long)]
    root: PathBuf,
    /// Table, `db.table`.
    #[arg(long)]
    table: String,
    /// Day to merge, YYYYMMDD.
    #[arg(long)]
    ds: String,
    /// keep (deletes flagged `_deleted`), drop-final or drop-all.
    #[arg(long, default_value = "keep")]
    delete_mode: String,
    /// Primary-key columns; default: the change log's `qanat.primary_key` metadata.
    #[arg(long, value_delimiter = ',')]
    pk: Option<Vec<String>>,
    /// Merge onto this day's snapshot instead of the day before's.
    #[arg(long, conflicts_with_all = ["base", "initial"])]
    base_ds: Option<String>,
    /// Merge onto this directory (or file) of Parquet, e.g. a `qanat sync` extract.
    #[arg(long, conflicts_with = "initial")]
    base: Option<PathBuf>,
    /// The table's first merge: no base.
    #[arg(long)]
    initial: bool,
    /// Keep this many newest snapshot partitions, removing older ones.
    #[arg(long)]
    keep: Option<usize>,
    /// Correct data drift (changes logged across midnight), see the lake docs.
    #[arg(long)]
    drift: bool,
    /// Drift: the row-update time column.
    #[arg(long, default_value = "modified_time")]
    modified_time_column: String,
    /// Drift: the change-log time column.
    #[arg(long, default_value = "_log_time")]
    log_time_column: String,
    /// Drift: a business event time column that tail changes must also have in the day.
    #[arg(long)]
    proc_time_column: Option<String>,
    /// Drift: the extraction time column (recorded, not used by the rule).
    #[arg(long, default_value = "_extract_time")]
    extract_time_column: String,
    /// Drift: minutes of overlap on each side of the day.
    #[arg(long, default_value_t = 15)]
    drift_overlap_minutes: i64,
    /// Decoded changes beyond this many MiB are joined in hash buckets on disk.
    #[arg(long, default_value_t = 1024)]
    memory_mb: u64,
}

pub async fn run(args: MergeArgs) -> anyhow::Result<()> {
    let table: TableName = args.table.parse()?;
    let ds: Ds = args.ds.parse()?;
    let mut opts = MergeOptions::new(&args.root, table, ds);
    opts.delete_mode = args.delete_mode.parse::<DeleteMode>()?;
    opts.primary_key = args.pk;
    opts.base = match (args.base_ds, args.base, args.initial) {
        (Some(day), _, _) => BaseChoice::Day(day.parse()?),
        (None, Some(path), _) => BaseChoice::Path(path),
        (None, None, true) => BaseChoice::Initial,
        (None, None, false) => BaseChoice::Previous,
    };
    opts.keep = args.keep;
    opts.memory_budget = args.memory_mb.saturating_mul(1 << 20);
    if args.drift {
        opts.drift = Some(DriftConfig {
            modified_time: args.modified_time_column,
            log_time: args.log_time_column,
            proc_time: args.proc_time_column,
            extract_time: args.extract_time_column,
            overlap_ms: args.drift_overlap_minutes.saturating_mul(60_000),
        });
    }
    let report = tokio::task::spawn_blocking(move || merge(&opts))
        .await
        .context("merge task")??;
    println!(
        "{}: {} rows in {} file(s) from {} base rows and {} changes{}{}",
        report.partition.display(),
        report.rows,
        report.files,
        report.base_rows,
        report.changes,
        report
            .base
            .map(|b| format!(", base {b}"))
            .unwrap_or_default(),
        if report.removed_partitions.is_empty() {
            String::new()
        } else {
            format!(", removed {}", report.removed_partitions.join(" "))
        }
    );
    Ok(())
}
