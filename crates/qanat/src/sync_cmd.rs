//! `qanat sync`: batch copies of tables between MariaDB/MySQL, PostgreSQL, CSV/TSV files and
//! Parquet, from flags (`copy`) or job files (`run`). The framework is `qanat-sync`; this is
//! the command line, the progress lines, the summary and the exit status.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use qanat_sync::config::{JobFile, Settings, TableSpec};
use qanat_sync::dsn::Endpoint;
use qanat_sync::job::{run_tables, Live, TableJob, TableReport};
use qanat_sync::plugin::WriteMode;
use qanat_sync::throttle::Throttle;

/// Each running table's name and live counters, for the progress lines.
type LiveTables = Vec<(String, Arc<Live>)>;

#[derive(Args)]
pub struct SyncArgs {
    #[command(subcommand)]
    command: SyncCommand,
}

#[derive(Subcommand)]
enum SyncCommand {
    /// Copy one table: the job from flags alone.
    Copy(CopyArgs),
    /// Run job files (TOML: [sync] settings and [[table]] entries).
    Run(RunArgs),
    /// Read the source's catalog, print (or create) the target tables and write one job file.
    Init(InitArgs),
}

#[derive(Args)]
struct InitArgs {
    /// Source server: mysql://user:pass@host:3306[/db] or postgres://user:pass@host:5432/db
    #[arg(long)]
    source: String,
    /// Target server: mysql://user:pass@host:3306/db or postgres://user:pass@host:5432/db[/schema]
    #[arg(long)]
    target: String,
    /// Tables to copy: database.pattern (MariaDB/MySQL) or schema.pattern (PostgreSQL);
    /// the pattern is a glob (`*`, `?`, `[a-z]`).
    #[arg(long)]
    tables: String,
    /// Directory for the job file (named after the source database or schema).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Create the tables on the target instead of only printing the DDL.
    #[arg(long)]
    create_tables: bool,
}

async fn init(a: InitArgs) -> anyhow::Result<()> {
    use qanat_sync::catalog;
    let source = catalog::Store::parse(&a.source).context("--source")?;
    let target = catalog::Store::parse(&a.target).context("--target")?;
    if let catalog::Store::Mysql(s) = &target {
        if s.database.is_empty() {
            bail!("--target: name the MariaDB/MySQL database, as mysql://user@host:port/db");
        }
    }
    let tables = catalog::read_source(&source, &a.tables).await?;
    let mut ddl = Vec::with_capacity(tables.len());
    for t in &tables {
        ddl.push((
            format!("{}.{}", t.namespace, t.name),
            catalog::create_table(&target, t)?,
        ));
    }
    let mut out = std::io::stdout().lock();
    for (_, sql) in &ddl {
        writeln!(out, "{sql}\n")?;
    }
    if a.create_tables {
        catalog::create_tables(&target, &ddl).await?;
        eprintln!("created {} table(s) on the target", ddl.len());
    }
    let job = catalog::job_file(&source, &target, &tables);
    let name = tables
        .first()
        .map(|t| t.namespace.clone())
        .unwrap_or_else(|| "sync".into());
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let path = a.out.join(format!("{name}.toml"));
    std::fs::write(&path, job).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {} ({} table(s)); run it with: qanat sync run {}",
        path.display(),
        tables.len(),
        path.display()
    );
    Ok(())
}

#[derive(Args)]
struct CopyArgs {
    /// Source: mysql://user:pass@host:3306/db.table, postgres://user:pass@host:5432/db/schema.table
    /// or file:///dir/name.csv[.gz|.zst]
    #[arg(long)]
    from: String,
    /// Target: as --from, or parquet:///dir/table?ds=YYYYMMDD
    #[arg(long)]
    to: String,
    /// insert | upsert | truncate
    #[arg(long)]
    mode: Option<WriteMode>,
    /// Column to split on (default: a single-column primary key).
    #[arg(long)]
    split_pk: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct RunArgs {
    /// Job files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    common: Common,
}

/// Flags over `[sync]` keys (flag > QANAT_SYNC_* > file > default).
#[derive(Args)]
struct Common {
    /// Tasks per table at once.
    #[arg(long)]
    channels: Option<usize>,
    /// Tables at once.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Most key-range splits per table.
    #[arg(long)]
    max_splits: Option<usize>,
    /// Rows per batch.
    #[arg(long)]
    batch_rows: Option<usize>,
    /// Retries of a failed split.
    #[arg(long)]
    retries: Option<u32>,
    /// Job-wide cap on records per second.
    #[arg(long)]
    max_records_per_sec: Option<u64>,
    /// Job-wide cap on bytes per second.
    #[arg(long)]
    max_bytes_per_sec: Option<u64>,
    /// Fail a table past this many dirty records.
    #[arg(long)]
    max_dirty_records: Option<u64>,
    /// Fail a table when dirty records pass this share of the rows read.
    #[arg(long)]
    max_dirty_ratio: Option<f64>,
    /// Append dirty records (JSON lines with their reason) to this file.
    #[arg(long)]
    dirty_file: Option<PathBuf>,
    /// Job-wide cap on tasks reading from one source server (host:port); 0 = none.
    #[arg(long)]
    max_tasks_per_server: Option<usize>,
    /// After each table, compare row counts and checksums per split on both sides.
    #[arg(long)]
    verify: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5)]
    progress_secs: u64,
    /// Serve Prometheus metrics (qanat_sync_*) at http://ADDR/metrics while running.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

impl Common {
    fn apply(&self, s: &mut Settings) {
        if let Some(v) = self.channels {
            s.channels = v;
        }
        if let Some(v) = self.concurrency {
            s.concurrency = v;
        }
        if let Some(v) = self.max_splits {
            s.max_splits = v;
        }
        if let Some(v) = self.batch_rows {
            s.batch_rows = v;
        }
        if let Some(v) = self.retries {
            s.retries = v;
        }
        if let Some(v) = self.max_records_per_sec {
            s.max_records_per_sec = v;
        }
        if let Some(v) = self.max_bytes_per_sec {
            s.max_bytes_per_sec = v;
        }
        if let Some(v) = self.max_dirty_records {
            s.max_dirty_records = Some(v);
        }
        if let Some(v) = self.max_dirty_ratio {
            s.max_dirty_ratio = Some(v);
        }
        if let Some(v) = &self.dirty_file {
            s.dirty_file = Some(v.clone());
        }
        if let Some(v) = self.max_tasks_per_server {
            s.max_tasks_per_server = v;
        }
        if self.verify {
            s.verify = true;
        }
    }
}

fn table_job(spec: &TableSpec, s: &Settings) -> anyhow::Result<TableJob> {
    let from = Endpoint::parse(&spec.from)?;
    let to = Endpoint::parse(&spec.to)?;
    Ok(TableJob {
        reader: qanat_sync::reader_for(&from)?,
        writer: qanat_sync::writer_for(&to)?,
        mode: spec.mode.unwrap_or(s.mode),
        split_pk: spec.split_pk.clone(),
        channels: spec.channels.unwrap_or(s.channels),
        max_splits: s.max_splits,
        batch_rows: s.batch_rows,
        retries: s.retries,
        retry_backoff: Duration::from_millis(s.retry_backoff_ms),
        max_dirty_records: s.max_dirty_records,
        max_dirty_ratio: s.max_dirty_ratio,
        dirty_file: s.dirty_file.clone(),
        verify: s.verify,
        priority: spec.priority.unwrap_or(0),
    })
}

pub async fn run(args: SyncArgs) -> anyhow::Result<()> {
    let env = || std::env::vars().collect::<Vec<_>>();
    let (files, common) = match args.command {
        SyncCommand::Copy(c) => {
            let job = JobFile {
                sync: Settings::default(),
                table: vec![TableSpec {
                    from: c.from,
                    to: c.to,
                    mode: c.mode,
                    split_pk: c.split_pk,
                    channels: None,
                    priority: None,
                }],
            };
            // The same overlay as a file: env over defaults, then flags.
            let text = toml::to_string(&job).context("encoding the job")?;
            (vec![("flags".to_string(), text)], c.common)
        }
        SyncCommand::Init(a) => return init(a).await,
        SyncCommand::Run(r) => {
            let mut files = Vec::new();
            for f in &r.files {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading job file {}", f.display()))?;
                files.push((f.display().to_string(), text));
            }
            (files, r.common)
        }
    };
    let mut jobs = Vec::new();
    let mut first: Option<Settings> = None;
    for (origin, text) in &files {
        let mut job = JobFile::parse(text, origin, env())?;
        common.apply(&mut job.sync);
        job.validate().with_context(|| format!("in {origin}"))?;
        for spec in &job.table {
            jobs.push(table_job(spec, &job.sync)?);
        }
        first.get_or_insert(job.sync);
    }
    let settings = first.unwrap_or_default();
    if let Some(addr) = common.metrics_listen {
        let bound = crate::telemetry::serve_metrics(addr, None).await?;
        eprintln!("qanat metrics listening on {bound}");
    }
    let throttle = Arc::new(Throttle::new(
        Some(settings.max_records_per_sec),
        Some(settings.max_bytes_per_sec),
    ));
    let lives: Arc<Mutex<LiveTables>> = Arc::default();
    let progress = {
        let lives = lives.clone();
        let every = Duration::from_secs(common.progress_secs.max(1));
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let snapshot = lives.lock().map(|l| l.clone()).unwrap_or_default();
                for (name, live) in snapshot {
                    let rows = live.rows.load(Ordering::Relaxed);
                    let bytes = live.bytes.load(Ordering::Relaxed);
                    tracing::info!(
                        table = %name,
                        rows,
                        mb = format!("{:.1}", bytes as f64 / 1e6),
                        rows_per_sec = (rows as f64 / secs) as u64,
                        mb_per_sec = format!("{:.1}", bytes as f64 / 1e6 / secs),
                        splits = format!(
                            "{}/{}",
                            live.splits_done.load(Ordering::Relaxed),
                            live.splits_total.load(Ordering::Relaxed)
                        ),
                        "progress"
                    );
                }
            }
        })
    };
    let reports = run_tables(
        jobs,
        settings.concurrency,
        settings.max_tasks_per_server,
        throttle,
        |name, live| {
            if let Ok(mut l) = lives.lock() {
                l.push((name, live));
            }
        },
    )
    .await;
    progress.abort();
    print_reports(&reports, common.json)?;
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| match (&r.error, &r.verify) {
            (Some(e), _) => format!("{}: {e}", r.source),
            (None, Some(v)) => format!(
                "{}: verify found {} split(s) that differ",
                r.source,
                v.mismatched.len()
            ),
            (None, None) => r.source.clone(),
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "sync failed for {} table(s): {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

fn print_reports(reports: &[TableReport], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let total_rows: u64 = reports.iter().map(|r| r.rows_written).sum();
        let v = serde_json::json!({
            "ok": reports.iter().all(TableReport::ok),
            "rows_written": total_rows,
            "tables": reports,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<40} {:>10} {:>10} {:>7} {:>9} {:>8} {:>10} {:>7}  status",
        "table", "read", "written", "dirty", "MB", "seconds", "rows/s", "retries"
    )?;
    for r in reports {
        let status = match (&r.error, &r.verify) {
            (Some(e), _) => format!("FAILED: {e}"),
            (None, Some(v)) if v.ok => "ok, verified".to_string(),
            (None, Some(v)) => format!("VERIFY: {} split(s) differ", v.mismatched.len()),
            (None, None) => "ok".to_string(),
        };
        writeln!(
            out,
            "{:<40} {:>10} {:>10} {:>7} {:>9.1} {:>8.2} {:>10.0} {:>7}  {status}",
            r.source,
            r.rows_read,
            r.rows_written,
            r.dirty,
            r.bytes as f64 / 1e6,
            r.seconds,
            r.rows_written as f64 / r.seconds.max(0.001),
            r.retries
        )?;
        if let Some(n) = &r.note {
            writeln!(out, "  note: {n}")?;
        }
    }
    Ok(())
}
