//! `qanat sync`: batch copies of tables between MariaDB/MySQL, PostgreSQL, CSV/TSV files and
//! Parquet, from flags (`copy`) or job files (`run`). The framework is `qanat-sync`; this is
//! the command line, the progress lines, the summary and the exit status.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use qanat_sync::bus::ClientProperties;
use qanat_sync::config::{JobFile, Settings, TableSpec};
use qanat_sync::dsn::Endpoint;
use qanat_sync::job::{run_tables, Live, TableJob, TableReport};
use qanat_sync::plugin::WriteMode;
use qanat_sync::throttle::Throttle;

/// Each started table's name, live counters and start, for the progress display.
type LiveTables = Vec<(String, Arc<Live>, Instant)>;

/// How progress is shown while a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ProgressMode {
    /// Bars on a terminal, log lines otherwise.
    Auto,
    /// A live bar per table (drawn only when stderr is a terminal).
    Bar,
    /// A log line per table every --progress-secs.
    Log,
}

/// One table's progress figures.
struct Figures {
    rows: u64,
    bytes: u64,
    dirty: u64,
    rows_per_sec: f64,
    mb_per_sec: f64,
    splits_done: u64,
    splits_total: u64,
    /// Remaining time from the source's row estimate at the current rate.
    eta: Option<Duration>,
}

fn figures(live: &Live, started: Instant) -> Figures {
    let secs = started.elapsed().as_secs_f64().max(0.001);
    let rows = live.rows.load(Ordering::Relaxed);
    let bytes = live.bytes.load(Ordering::Relaxed);
    let estimate = live.rows_estimate.load(Ordering::Relaxed);
    let rows_per_sec = rows as f64 / secs;
    let splits_done = live.splits_done.load(Ordering::Relaxed);
    let splits_total = live.splits_total.load(Ordering::Relaxed);
    let eta = if splits_total > 0 && splits_done == splits_total {
        Some(Duration::ZERO)
    } else if estimate > rows && rows_per_sec > 0.0 {
        Some(Duration::from_secs_f64(
            (estimate - rows) as f64 / rows_per_sec,
        ))
    } else {
        None
    };
    Figures {
        rows,
        bytes,
        dirty: live.dirty.load(Ordering::Relaxed),
        rows_per_sec,
        mb_per_sec: bytes as f64 / 1e6 / secs,
        splits_done,
        splits_total,
        eta,
    }
}

fn show_eta(eta: Option<Duration>) -> String {
    match eta {
        None => "?".into(),
        Some(d) => {
            let s = d.as_secs();
            if s >= 3600 {
                format!("{}h{:02}m", s / 3600, s / 60 % 60)
            } else {
                format!("{}m{:02}s", s / 60, s % 60)
            }
        }
    }
}

/// Until aborted: a bar per table (`bars`) or a log line per table every `every`.
async fn show_progress(lives: Arc<Mutex<LiveTables>>, bars: bool, every: Duration) {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{prefix} [{bar:24.cyan/blue}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut shown: Vec<ProgressBar> = Vec::new();
    let mut tick = tokio::time::interval(if bars {
        Duration::from_millis(250)
    } else {
        every
    });
    tick.tick().await;
    loop {
        tick.tick().await;
        let snapshot = lives.lock().map(|l| l.clone()).unwrap_or_default();
        for (i, (name, live, started)) in snapshot.iter().enumerate() {
            let f = figures(live, *started);
            if !bars {
                tracing::info!(
                    table = %name,
                    rows = f.rows,
                    mb = format!("{:.1}", f.bytes as f64 / 1e6),
                    rows_per_sec = f.rows_per_sec as u64,
                    mb_per_sec = format!("{:.1}", f.mb_per_sec),
                    dirty = f.dirty,
                    splits = format!("{}/{}", f.splits_done, f.splits_total),
                    eta = %show_eta(f.eta),
                    "progress"
                );
                continue;
            }
            if shown.len() <= i {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{name:<32.32}"));
                shown.push(bar);
            }
            let bar = &shown[i];
            if bar.is_finished() {
                continue;
            }
            let estimate = live.rows_estimate.load(Ordering::Relaxed);
            bar.set_length(estimate.max(f.rows));
            bar.set_position(f.rows);
            let done = f.splits_total > 0 && f.splits_done == f.splits_total;
            let msg = format!(
                "{} rows {:.1} MB {:.0} rows/s {:.1} MB/s dirty {} splits {}/{} ETA {}",
                f.rows,
                f.bytes as f64 / 1e6,
                f.rows_per_sec,
                f.mb_per_sec,
                f.dirty,
                f.splits_done,
                f.splits_total,
                show_eta(f.eta)
            );
            if done {
                bar.set_length(f.rows);
                bar.finish_with_message(msg);
            } else {
                bar.set_message(msg);
            }
        }
    }
}

#[derive(Args)]
pub struct SyncArgs {
    #[command(subcommand)]
    command: SyncCommand,
    /// Override [sync.security] (for kafka:// addresses) key by key.
    #[command(flatten)]
    security: crate::kafka_security::SecurityArgs,
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
    /// For a sharded source (`--from …/db.order_{0000..0007}`): a text column added to each
    /// row, naming its physical table.
    #[arg(long)]
    shard_column: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct RunArgs {
    /// Job files.
    #[arg(required_unless_present = "datax")]
    files: Vec<PathBuf>,
    /// A DataX job file (JSON) to run, for the reader/writer pairs qanat carries.
    #[arg(long, value_name = "JOB_JSON")]
    datax: Vec<PathBuf>,
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
    /// Seconds between progress log lines.
    #[arg(long, default_value_t = 5)]
    progress_secs: u64,
    /// Progress display: bars on a terminal (auto), bars, or log lines.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
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

fn table_job(spec: &TableSpec, s: &Settings, bus: &ClientProperties) -> anyhow::Result<TableJob> {
    let to = Endpoint::parse(&spec.to)?;
    Ok(TableJob {
        reader: qanat_sync::source_for(
            &spec.from.dsns(),
            spec.shard_column.as_deref(),
            spec.filter.as_deref(),
            bus,
        )?,
        writer: qanat_sync::writer_for(&to, bus)?,
        mode: spec.mode.unwrap_or(s.mode),
        split_pk: spec.split_pk.clone(),
        columns: spec.columns.clone(),
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

/// A DataX writer's statements around its table.
struct Hook {
    target: String,
    pre: Vec<String>,
    post: Vec<String>,
}

pub async fn run(args: SyncArgs) -> anyhow::Result<()> {
    let env = || std::env::vars().collect::<Vec<_>>();
    let mut hooks: Vec<Hook> = Vec::new();
    let security = args.security.overrides();
    let (files, common) = match args.command {
        SyncCommand::Copy(c) => {
            let job = JobFile {
                sync: Settings::default(),
                table: vec![TableSpec {
                    from: c.from.into(),
                    shard_column: c.shard_column,
                    columns: None,
                    filter: None,
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
            for f in &r.datax {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading DataX job file {}", f.display()))?;
                let origin = f.display().to_string();
                let datax = qanat_sync::datax::parse(&text, &origin)?;
                // The translated job goes through the same overlay as a TOML file.
                let text = toml::to_string(&datax.job).context("encoding the DataX job")?;
                files.push((origin, text));
                hooks.extend(
                    datax
                        .job
                        .table
                        .iter()
                        .zip(datax.pre_sql.into_iter().zip(datax.post_sql))
                        .map(|(t, (pre, post))| Hook {
                            target: t.to.clone(),
                            pre,
                            post,
                        }),
                );
            }
            (files, r.common)
        }
    };
    let mut jobs = Vec::new();
    let mut first: Option<Settings> = None;
    let mut logins = std::collections::BTreeMap::new();
    for (origin, text) in &files {
        let mut job = JobFile::parse(text, origin, env())?;
        common.apply(&mut job.sync);
        job.sync.security.overlay(&security);
        job.validate().with_context(|| format!("in {origin}"))?;
        // The password is read here, so a missing one stops the job before any work.
        let bus = ClientProperties(
            job.sync
                .security
                .properties("sync.security")
                .with_context(|| format!("in {origin} (or the security flags)"))?,
        );
        for spec in &job.table {
            jobs.push(table_job(spec, &job.sync, &bus)?);
            for dsn in spec.from.dsns().iter().chain([&spec.to]) {
                if let Ok(Endpoint::Bus(b)) = Endpoint::parse(dsn) {
                    logins.insert(b.brokers, bus.0.clone());
                }
            }
        }
        first.get_or_insert(job.sync);
    }
    // A refused login stops the job now, not after the first request's timeout.
    for (brokers, properties) in logins {
        crate::kafka_security::check_login_with(&brokers, properties).await?;
    }
    // Hooks belong to the DataX tables, which come after every TOML file's tables.
    let hooked_from = jobs.len() - hooks.len();
    for h in &hooks {
        if !h.pre.is_empty() {
            tracing::info!(
                table = %qanat_sync::dsn::redact(&h.target),
                statements = h.pre.len(),
                "running preSql"
            );
            qanat_sync::execute(&Endpoint::parse(&h.target)?, &h.pre)
                .await
                .with_context(|| format!("preSql on {}", qanat_sync::dsn::redact(&h.target)))?;
        }
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
    let bars = match common.progress {
        ProgressMode::Bar => true,
        ProgressMode::Log => false,
        ProgressMode::Auto => std::io::stderr().is_terminal(),
    };
    let progress = tokio::spawn(show_progress(
        lives.clone(),
        bars,
        Duration::from_secs(common.progress_secs.max(1)),
    ));
    let reports = run_tables(
        jobs,
        settings.concurrency,
        settings.max_tasks_per_server,
        throttle,
        |name, live| {
            if let Ok(mut l) = lives.lock() {
                l.push((name, live, Instant::now()));
            }
        },
    )
    .await;
    progress.abort();
    // The bars' last state stays on screen; the summary follows.
    let _ = progress.await;
    for (h, r) in hooks.iter().zip(&reports[hooked_from..]) {
        if r.ok() && !h.post.is_empty() {
            qanat_sync::execute(&Endpoint::parse(&h.target)?, &h.post)
                .await
                .with_context(|| format!("postSql on {}", qanat_sync::dsn::redact(&h.target)))?;
        }
    }
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
