//! The framework: a table job is planned into splits, each split is a task (Reader →
//! bounded channel → Writer) run on a pool of `channels`; failed tasks are retried from their
//! split with exponential backoff; tables run `concurrency` at a time under one job-wide
//! throttle; `--verify` digests each split on both sides.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Array, BinaryArray, RecordBatch, StringArray};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::dirty::DirtyLog;
use crate::plugin::{Reader, WriteMode, Writer};
use crate::schedule::ServerSlots;
use crate::split::Split;
use crate::throttle::Throttle;
use crate::types::{render_row, Digest, TableSchema};
use crate::SyncError;

/// A batch is cut at this many bytes of cell data even before `batch_rows` rows.
pub const BATCH_BYTES: usize = 8 << 20;
/// Batches in flight between one reader and its writer.
const CHANNEL_BATCHES: usize = 2;

/// One table to move, with its settings.
pub struct TableJob {
    pub reader: Arc<dyn Reader>,
    pub writer: Arc<dyn Writer>,
    pub mode: WriteMode,
    pub split_pk: Option<String>,
    /// Copy only these source columns, in this order (default: all).
    pub columns: Option<Vec<String>>,
    /// Tasks of this table running at once.
    pub channels: usize,
    /// Cap on the number of key-range splits.
    pub max_splits: usize,
    pub batch_rows: usize,
    /// Retries of a failed split.
    pub retries: u32,
    pub retry_backoff: Duration,
    pub max_dirty_records: Option<u64>,
    pub max_dirty_ratio: Option<f64>,
    pub dirty_file: Option<PathBuf>,
    pub verify: bool,
    /// Tables with a higher priority start first.
    pub priority: i32,
}

/// One split whose digests differ.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SplitDiff {
    pub split: usize,
    pub range: String,
    pub source: Digest,
    pub target: Digest,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub source_rows: u64,
    pub target_rows: u64,
    pub splits_checked: usize,
    pub mismatched: Vec<SplitDiff>,
}

/// What happened to one table.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableReport {
    pub source: String,
    pub target: String,
    pub mode: String,
    pub splits: usize,
    pub rows_read: u64,
    pub rows_written: u64,
    pub dirty: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// From the first task's start to the last task's end (no planning, no verify).
    pub transfer_seconds: f64,
    pub retries: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl TableReport {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.verify.as_ref().is_none_or(|v| v.ok)
    }
}

/// Live counters of one table, read by the progress reporter.
#[derive(Debug, Default)]
pub struct Live {
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    pub dirty: AtomicU64,
    /// The source's estimate of its rows (0: unknown), for an ETA.
    pub rows_estimate: AtomicU64,
    pub splits_done: AtomicU64,
    pub splits_total: AtomicU64,
}

struct Ctx {
    job: TableJob,
    /// Job-wide task slots per source server.
    servers: Arc<ServerSlots>,
    schema: TableSchema,
    throttle: Arc<Throttle>,
    dirty: DirtyLog,
    live: Arc<Live>,
    label: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct SplitStats {
    rows_read: u64,
    rows_written: u64,
    writer_dirty: u64,
    bytes: u64,
}

/// Bytes of cell data in a batch (variable-width values by length, others by width).
pub fn batch_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|a| {
            if let Some(s) = a.as_any().downcast_ref::<StringArray>() {
                s.value_data().len()
            } else if let Some(b) = a.as_any().downcast_ref::<BinaryArray>() {
                b.value_data().len()
            } else {
                a.data_type().primitive_width().unwrap_or(1) * a.len()
            }
        })
        .sum()
}

/// The columns `names` of `schema`, in that order; the primary key kept only when whole.
fn project(schema: &TableSchema, names: &[String], table: &str) -> Result<TableSchema, SyncError> {
    let columns = names
        .iter()
        .map(|n| {
            schema
                .column(n)
                .cloned()
                .ok_or_else(|| SyncError::UnknownColumn {
                    table: table.to_string(),
                    column: n.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let whole_key = schema.primary_key.iter().all(|k| names.contains(k));
    Ok(TableSchema {
        columns,
        primary_key: if whole_key {
            schema.primary_key.clone()
        } else {
            Vec::new()
        },
    })
}

async fn run_split_once(ctx: &Ctx, split: &Split, attempt: u32) -> Result<SplitStats, SyncError> {
    let (tx, mut rx) = mpsc::channel::<RecordBatch>(CHANNEL_BATCHES);
    let read = ctx
        .job
        .reader
        .read(&ctx.schema, split, ctx.job.batch_rows, tx, &ctx.dirty);
    let write = async move {
        let mut writer = ctx.job.writer.open(split, attempt).await?;
        let mut stats = SplitStats::default();
        while let Some(batch) = rx.recv().await {
            let rows = batch.num_rows();
            let bytes = batch_bytes(&batch);
            ctx.throttle.acquire(rows, bytes).await;
            let rejected = writer.write(&batch).await?;
            for (row, reason) in &rejected {
                ctx.dirty.record(
                    split.index,
                    reason,
                    serde_json::Value::Object(render_row(&batch, *row)),
                )?;
            }
            stats.rows_read += rows as u64;
            stats.rows_written += (rows - rejected.len()) as u64;
            stats.writer_dirty += rejected.len() as u64;
            stats.bytes += bytes as u64;
            ctx.live.rows.fetch_add(rows as u64, Ordering::Relaxed);
            ctx.live.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            ctx.live.dirty.store(ctx.dirty.count(), Ordering::Relaxed);
            metrics::counter!("qanat_sync_rows_read_total", "table" => ctx.label.clone())
                .increment(rows as u64);
            metrics::counter!("qanat_sync_rows_written_total", "table" => ctx.label.clone())
                .increment((rows - rejected.len()) as u64);
            metrics::counter!("qanat_sync_bytes_total", "table" => ctx.label.clone())
                .increment(bytes as u64);
        }
        Ok::<_, SyncError>((writer, stats))
    };
    let (read_result, write_result) = tokio::join!(read, write);
    // The writer is committed only when the reader delivered the whole split.
    let (writer, stats) = write_result?;
    read_result?;
    writer.finish().await?;
    Ok(stats)
}

async fn run_split(ctx: Arc<Ctx>, split: Split) -> Result<(SplitStats, u64), SyncError> {
    let mut retries = 0u64;
    let mut attempt = 1u32;
    loop {
        match run_split_once(&ctx, &split, attempt).await {
            Ok(stats) => {
                ctx.live.splits_done.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("qanat_sync_splits_done_total", "table" => ctx.label.clone())
                    .increment(1);
                return Ok((stats, retries));
            }
            Err(e) if e.retriable() && attempt <= ctx.job.retries => {
                let backoff = ctx.job.retry_backoff * 2u32.saturating_pow(attempt - 1);
                tracing::warn!(
                    table = %ctx.label, split = %split.describe(), attempt, error = %e,
                    backoff_ms = backoff.as_millis() as u64, "split failed; retrying from its start"
                );
                metrics::counter!("qanat_sync_retries_total", "table" => ctx.label.clone())
                    .increment(1);
                retries += 1;
                attempt += 1;
                tokio::time::sleep(backoff).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn digest(
    reader: &dyn Reader,
    schema: &TableSchema,
    split: &Split,
    batch_rows: usize,
) -> Result<Digest, SyncError> {
    let (tx, mut rx) = mpsc::channel::<RecordBatch>(CHANNEL_BATCHES);
    let scratch = DirtyLog::new("verify", None, None, None)?;
    let read = reader.read(schema, split, batch_rows, tx, &scratch);
    let sum = async {
        let mut d = Digest::default();
        while let Some(b) = rx.recv().await {
            d.add_batch(&b);
        }
        d
    };
    let (r, mut d) = tokio::join!(read, sum);
    r?;
    // Rows that did not convert still count, so a difference shows.
    d.rows += scratch.count();
    Ok(d)
}

async fn verify(ctx: &Ctx, splits: &[Split]) -> Result<VerifyReport, SyncError> {
    let target = ctx.job.writer.verifier().ok_or_else(|| {
        SyncError::Invalid(format!(
            "--verify is not available for {}",
            ctx.job.writer.name()
        ))
    })?;
    let found = target.schema().await?;
    let columns = ctx
        .schema
        .columns
        .iter()
        .map(|c| {
            found
                .column(&c.name)
                .cloned()
                .ok_or_else(|| SyncError::UnknownColumn {
                    table: target.name(),
                    column: c.name.clone(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let target_schema = TableSchema {
        columns,
        primary_key: found.primary_key,
    };
    let mut report = VerifyReport {
        ok: true,
        ..VerifyReport::default()
    };
    // Shards without a shard column cannot be told apart in the target: compare the sum of
    // the source's splits with the whole target (the digest is order-independent and adds).
    if splits
        .iter()
        .any(|s| s.shard.as_ref().is_some_and(|r| r.column.is_none()))
    {
        let mut source = Digest::default();
        for split in splits {
            let d = digest(
                ctx.job.reader.as_ref(),
                &ctx.schema,
                split,
                ctx.job.batch_rows,
            )
            .await?;
            source.rows += d.rows;
            source.sum = source.sum.wrapping_add(d.sum);
        }
        let whole = Split::whole(0);
        let target = digest(target.as_ref(), &target_schema, &whole, ctx.job.batch_rows).await?;
        report.source_rows = source.rows;
        report.target_rows = target.rows;
        report.splits_checked = splits.len();
        if source != target {
            report.ok = false;
            report.mismatched.push(SplitDiff {
                split: 0,
                range: "whole table (all shards)".into(),
                source,
                target,
            });
        }
        return Ok(report);
    }
    for split in splits {
        let (s, t) = tokio::join!(
            digest(
                ctx.job.reader.as_ref(),
                &ctx.schema,
                split,
                ctx.job.batch_rows
            ),
            digest(target.as_ref(), &target_schema, split, ctx.job.batch_rows)
        );
        let (s, t) = (s?, t?);
        report.source_rows += s.rows;
        report.target_rows += t.rows;
        report.splits_checked += 1;
        if s != t {
            report.ok = false;
            report.mismatched.push(SplitDiff {
                split: split.index,
                range: split.describe(),
                source: s,
                target: t,
            });
        }
    }
    Ok(report)
}

async fn run_table_inner(
    job: TableJob,
    servers: Arc<ServerSlots>,
    throttle: Arc<Throttle>,
    live: Arc<Live>,
    report: &mut TableReport,
) -> Result<(), (SyncError, Option<Arc<dyn Writer>>)> {
    let writer = job.writer.clone();
    let fail = |e: SyncError| (e, Some(writer.clone()));
    let mut schema = job.reader.schema().await.map_err(|e| (e, None))?;
    if let Some(names) = &job.columns {
        schema = project(&schema, names, &job.reader.name()).map_err(|e| (e, None))?;
    }
    job.writer
        .prepare(&schema, job.mode)
        .await
        .map_err(|e| (e, None))?;
    let splits = job
        .reader
        .splits(&schema, job.split_pk.as_deref(), job.max_splits)
        .await
        .map_err(fail)?;
    report.splits = splits.len();
    if let Some(n) = job.reader.estimate_rows().await {
        live.rows_estimate.store(n, Ordering::Relaxed);
    }
    live.splits_total
        .store(splits.len() as u64, Ordering::Relaxed);
    tracing::info!(
        table = %report.source, target = %report.target, splits = splits.len(),
        "planned"
    );
    let dirty = DirtyLog::new(
        &report.source,
        job.dirty_file.clone(),
        job.max_dirty_records,
        job.max_dirty_ratio,
    )
    .map_err(fail)?;
    let channels = job.channels.max(1);
    let ctx = Arc::new(Ctx {
        label: report.source.clone(),
        servers,
        job,
        schema,
        throttle,
        dirty,
        live,
    });
    let pool = Arc::new(Semaphore::new(channels));
    let transfer_started = Instant::now();
    let mut tasks = JoinSet::new();
    for split in splits.iter().cloned() {
        let ctx = ctx.clone();
        let pool = pool.clone();
        tasks.spawn(async move {
            let _permit = pool
                .acquire_owned()
                .await
                .map_err(|_| SyncError::Internal("task pool closed".into()))?;
            let _server_permit = match ctx.servers.slots(&ctx.job.reader.server_for(&split)) {
                Some(slots) => Some(
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| SyncError::Internal("server slots closed".into()))?,
                ),
                None => None,
            };
            metrics::gauge!("qanat_sync_tasks_running", "table" => ctx.label.clone())
                .increment(1.0);
            let r = run_split(ctx.clone(), split).await;
            metrics::gauge!("qanat_sync_tasks_running", "table" => ctx.label.clone())
                .decrement(1.0);
            r
        });
    }
    let mut first_error = None;
    let mut writer_dirty = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok((stats, retries))) => {
                report.rows_read += stats.rows_read;
                report.rows_written += stats.rows_written;
                report.bytes += stats.bytes;
                report.retries += retries;
                writer_dirty += stats.writer_dirty;
            }
            Ok(Err(e)) => {
                if first_error.is_none() {
                    first_error = Some(e);
                    tasks.abort_all();
                }
            }
            Err(join) if join.is_cancelled() => {}
            Err(join) => {
                if first_error.is_none() {
                    first_error = Some(SyncError::Internal(format!("task panicked: {join}")));
                    tasks.abort_all();
                }
            }
        }
    }
    report.transfer_seconds = transfer_started.elapsed().as_secs_f64();
    report.dirty = ctx.dirty.count();
    // Rows the reader could not convert were read too.
    report.rows_read += report.dirty.saturating_sub(writer_dirty);
    if let Some(e) = first_error {
        return Err(fail(e));
    }
    ctx.dirty.check_ratio(report.rows_read).map_err(fail)?;
    ctx.job.writer.commit().await.map_err(fail)?;
    if ctx.job.verify {
        let v = verify(&ctx, &splits).await.map_err(|e| (e, None))?;
        if !v.ok {
            for m in &v.mismatched {
                tracing::error!(
                    table = %report.source, split = m.split, range = %m.range,
                    source_rows = m.source.rows, target_rows = m.target.rows,
                    "verify: split differs"
                );
            }
        }
        report.verify = Some(v);
    }
    Ok(())
}

/// Run one table to the end; errors are in the report.
pub async fn run_table(
    job: TableJob,
    servers: Arc<ServerSlots>,
    throttle: Arc<Throttle>,
    live: Arc<Live>,
) -> TableReport {
    let started = Instant::now();
    let mut report = TableReport {
        source: job.reader.name(),
        target: job.writer.name(),
        mode: format!("{:?}", job.mode).to_lowercase(),
        ..TableReport::default()
    };
    if let Err((e, writer)) = run_table_inner(job, servers, throttle, live, &mut report).await {
        tracing::error!(table = %report.source, error = %e, "table failed");
        report.error = Some(e.to_string());
        if let Some(w) = writer {
            report.note = w.abort().await;
            if let Some(n) = &report.note {
                tracing::warn!(table = %report.source, "{n}");
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// Run tables, `concurrency` at a time, higher `priority` first (then in the jobs' order),
/// at most `max_tasks_per_server` tasks per source server at once (0: no cap), under one
/// throttle; reports in the jobs' order. `on_start` receives each table's live counters
/// (for progress display).
pub async fn run_tables(
    jobs: Vec<TableJob>,
    concurrency: usize,
    max_tasks_per_server: usize,
    throttle: Arc<Throttle>,
    on_start: impl Fn(String, Arc<Live>),
) -> Vec<TableReport> {
    let pool = Arc::new(Semaphore::new(concurrency.max(1)));
    let servers = Arc::new(ServerSlots::new(max_tasks_per_server));
    let mut set = JoinSet::new();
    let n = jobs.len();
    let order = crate::schedule::start_order(
        &jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.priority, i))
            .collect::<Vec<_>>(),
    );
    let mut slots: Vec<Option<TableJob>> = jobs.into_iter().map(Some).collect();
    for i in order {
        let Some(job) = slots.get_mut(i).and_then(Option::take) else {
            continue;
        };
        // Tables take the pool's permits one after another, in schedule order.
        let permit = pool.clone().acquire_owned().await;
        let live = Arc::new(Live::default());
        on_start(job.reader.name(), live.clone());
        let servers = servers.clone();
        let throttle = throttle.clone();
        set.spawn(async move {
            let _permit = permit;
            (i, run_table(job, servers, throttle, live).await)
        });
    }
    let mut reports: Vec<Option<TableReport>> = vec![None; n];
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, r)) => reports[i] = Some(r),
            Err(e) => tracing::error!(error = %e, "table task panicked"),
        }
    }
    reports
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| TableReport {
                error: Some("table task panicked".into()),
                ..TableReport::default()
            })
        })
        .collect()
}
