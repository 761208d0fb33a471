//! `qanat cdc`: run change-data-capture connectors (database change log → bus) until
//! SIGTERM/SIGINT, and `qanat cdc status` for their positions, lag and rates.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use qanat_cdc::config::{CdcConfig, ConnectorConfig};
use qanat_cdc::mysql::{MysqlConfig, MysqlSource, SnapshotMode};
use qanat_cdc::pipeline::{self, now_ms, PipelineConfig};
use qanat_cdc::postgres::{PostgresConfig, PostgresSource};
use qanat_config::KafkaSecurity;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CdcArgs {
    #[command(subcommand)]
    action: Option<CdcAction>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    security: crate::kafka_security::SecurityArgs,
}

#[derive(Subcommand)]
enum CdcAction {
    /// Per connector and table: stored position, lag, events/s, snapshot rows.
    Status(StatusArgs),
    /// Snapshot tables of a connector. With `--config` and a connector that has a
    /// `signal_table`: the running connector reads them while it streams (incremental
    /// snapshot). Otherwise (MariaDB/MySQL): a stopped connector reads them at its next start.
    Snapshot(SnapshotArgs),
}

#[derive(Args)]
struct SnapshotArgs {
    #[arg(long, env = "QANAT_CDC_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long, default_value = "qanat-cdc-offsets")]
    offsets_topic: String,
    /// The connectors' configuration: the named connector's source and `signal_table` carry
    /// the request to the running connector.
    #[arg(long, env = "QANAT_CDC_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    connector: String,
    /// `db.table` (PostgreSQL: `schema.table`); repeat for several.
    #[arg(long = "table", required = true)]
    tables: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    /// TOML configuration with one or more [[connector]]s.
    #[arg(long, env = "QANAT_CDC_CONFIG", conflicts_with = "source")]
    config: Option<PathBuf>,
    /// One connector from flags: the source database URL (mysql://, mariadb://, postgres://).
    #[arg(long, env = "QANAT_CDC_SOURCE")]
    source: Option<String>,
    /// Kafka-protocol bootstrap servers; overrides `bootstrap` of the file.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Connector name (flags form); default `cdc`.
    #[arg(long)]
    name: Option<String>,
    /// Include regex over `db.table` (flags form).
    #[arg(long)]
    tables: Option<String>,
    #[arg(long)]
    topic_prefix: Option<String>,
    /// initial | never | when_needed (flags form; overrides every connector of a file).
    #[arg(long)]
    snapshot: Option<String>,
    /// PostgreSQL replication slot (flags form).
    #[arg(long)]
    slot: Option<String>,
    /// PostgreSQL publication (flags form).
    #[arg(long)]
    publication: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "QANAT_CDC_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Args)]
struct StatusArgs {
    #[arg(long, env = "QANAT_CDC_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long, default_value = "qanat-cdc-offsets")]
    offsets_topic: String,
    /// Only this connector.
    #[arg(long)]
    connector: Option<String>,
    /// Seconds between the two reads that events/s is computed from.
    #[arg(long, default_value_t = 1.0)]
    sample_secs: f64,
}

pub async fn run(args: CdcArgs) -> anyhow::Result<()> {
    match args.action {
        Some(CdcAction::Status(s)) => {
            let security = args.security.resolve()?;
            check_login(&s.bootstrap, &security).await?;
            status(s, &security).await
        }
        Some(CdcAction::Snapshot(s)) => {
            let security = args.security.resolve()?;
            if s.config.is_none() {
                check_login(&s.bootstrap, &security).await?;
            }
            snapshot(s, &security).await
        }
        None => run_connectors(args.run, &args.security).await,
    }
}

fn load(
    args: &RunArgs,
    security: &crate::kafka_security::SecurityArgs,
) -> anyhow::Result<CdcConfig> {
    let mut config = match (&args.config, &args.source) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading configuration {}", path.display()))?;
            CdcConfig::from_toml_with_env(&text, std::env::vars()).with_context(|| {
                format!(
                    "in configuration {} (or QANAT_CDC_* overrides)",
                    path.display()
                )
            })?
        }
        (None, Some(source)) => {
            let name = args.name.clone().unwrap_or_else(|| "cdc".into());
            let mut c = ConnectorConfig::from_source(&name, source);
            if let Some(t) = &args.tables {
                c.tables = vec![t.clone()];
            }
            if let Some(p) = &args.topic_prefix {
                c.topic_prefix = p.clone();
            }
            c.slot = args.slot.clone();
            c.publication = args.publication.clone();
            let mut doc = toml::Table::new();
            qanat_config::overlay_env(
                &mut doc,
                "QANAT_CDC_",
                &[],
                true,
                std::env::vars(),
                |_, key, raw| {
                    Ok(match key {
                        "bootstrap" | "offsets_topic" => Some(toml::Value::String(raw.into())),
                        _ => None,
                    })
                },
            )?;
            let get =
                |k: &str, d: &str| doc.get(k).and_then(|v| v.as_str()).unwrap_or(d).to_string();
            CdcConfig {
                bootstrap: get("bootstrap", "127.0.0.1:9092"),
                offsets_topic: get("offsets_topic", "qanat-cdc-offsets"),
                connectors: vec![c],
                security: Default::default(),
            }
        }
        (None, None) => anyhow::bail!("either --config FILE or --source URL is needed"),
    };
    if let Some(b) = &args.bootstrap {
        config.bootstrap = b.clone();
    }
    config.security.overlay(&security.overrides());
    if let Some(s) = &args.snapshot {
        for c in &mut config.connectors {
            c.snapshot = s.clone();
        }
    }
    config.validate().context("configuration")?;
    // Read the password now, so a missing one fails the start with its key.
    config.security.properties("security")?;
    Ok(config)
}

async fn run_connectors(
    args: RunArgs,
    security: &crate::kafka_security::SecurityArgs,
) -> anyhow::Result<()> {
    let config = load(&args, security)?;
    let mut stdout = std::io::stdout();
    if let Some(addr) = args.metrics_listen {
        let bound = crate::telemetry::serve_metrics(addr, None).await?;
        writeln!(stdout, "qanat metrics listening on {bound}")?;
    }
    // A refused login stops the command now, not after every connector's first timeout.
    check_login(&config.bootstrap, &config.security).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, connector) in config.connectors.iter().enumerate() {
        let mut pipeline = connector.pipeline(
            &format!("connector[{i}]"),
            &config.bootstrap,
            &config.offsets_topic,
        )?;
        pipeline.security = config.security.clone();
        let connector = connector.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let name = connector.name.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            run_one(connector, pipeline, shutdown)
                .await
                .with_context(|| format!("connector {name}"))
        });
    }
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(show_snapshot_progress()));
    let mut term = signal(SignalKind::terminate())?;
    let mut failed: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                let _ = stop_tx.send(true);
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: shutting down");
                let _ = stop_tx.send(true);
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %format!("{e:#}"), "connector stopped");
                    let _ = stop_tx.send(true);
                    failed.get_or_insert(e);
                }
                Some(Err(e)) => {
                    let _ = stop_tx.send(true);
                    failed.get_or_insert(anyhow::anyhow!("connector task: {e}"));
                }
            }
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    match failed {
        Some(e) => Err(e),
        None => {
            tracing::info!("every connector stopped with its position stored");
            Ok(())
        }
    }
}

/// Until aborted: a progress bar per table being snapshotted (rows read of the server's
/// estimate), on a terminal.
async fn show_snapshot_progress() {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:24.cyan/blue}] {pos}/{len} rows {per_sec} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut shown: BTreeMap<(String, String), ProgressBar> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        for t in qanat_cdc::progress::tables() {
            let key = (t.connector.clone(), t.table.clone());
            let bar = shown.entry(key).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{:<12.12} {:<32.32}", t.connector, t.table));
                bar
            });
            if bar.is_finished() {
                if t.finished {
                    continue;
                }
                // A new snapshot of the table: start the bar again.
                bar.reset();
            }
            bar.set_length(t.rows_estimated.max(t.rows_done));
            bar.set_position(t.rows_done);
            if t.finished {
                bar.set_length(t.rows_done);
                bar.finish_with_message("done");
            }
        }
    }
}

async fn run_one(
    connector: ConnectorConfig,
    pipeline: PipelineConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let scheme = connector.source.split("://").next().unwrap_or("");
    match scheme {
        "mysql" | "mariadb" => {
            pipeline::ensure_topics(&pipeline).await?;
            let state = pipeline::load_state(&pipeline).await?;
            let snapshot: SnapshotMode = connector
                .snapshot
                .parse()
                .map_err(|e: String| anyhow::anyhow!("snapshot: {e}"))?;
            let cfg = MysqlConfig {
                url: connector.source.clone(),
                server_id: connector.server_id(),
                snapshot,
                heartbeat: Duration::from_millis(connector.heartbeat_ms),
                snapshot_chunk: connector.snapshot_chunk,
                gtid_resume: connector.gtid_resume,
                signal_table: connector.signal_table.clone(),
            };
            let source = MysqlSource::open(cfg, &pipeline, &state).await?;
            let mut stdout = std::io::stdout();
            writeln!(stdout, "qanat cdc connector {} streaming", connector.name)?;
            stdout.flush()?;
            tracing::info!(connector = %connector.name, source = %qanat_cdc::mysql::redact(&connector.source), "connector ready");
            pipeline::run(source, &pipeline, &state, shutdown).await?;
            Ok(())
        }
        "postgres" | "postgresql" => {
            pipeline::ensure_topics(&pipeline).await?;
            let state = pipeline::load_state(&pipeline).await?;
            // The connector's include/exclude regexes are over `schema.table` here; the
            // source folds them into one, which also selects the publication's tables.
            let any_of = |patterns: &[String]| {
                (!patterns.is_empty()).then(|| {
                    patterns
                        .iter()
                        .map(|p| format!("(?:{p})"))
                        .collect::<Vec<_>>()
                        .join("|")
                })
            };
            let mut cfg = PostgresConfig::new(connector.source.clone(), connector.name.clone());
            cfg.slot = connector.slot.clone();
            cfg.publication = connector.publication.clone();
            cfg.include = any_of(&connector.tables);
            cfg.exclude = any_of(&connector.exclude_tables);
            cfg.snapshot = connector.snapshot.parse().map_err(|e: String| {
                anyhow::anyhow!("connector {}: snapshot: {e}", connector.name)
            })?;
            cfg.heartbeat_interval = Duration::from_millis(connector.heartbeat_ms.max(100));
            cfg.snapshot_fetch_rows = connector.snapshot_chunk.max(1);
            cfg.signal_table = connector.signal_table.clone();
            let source = PostgresSource::open(&cfg, state.position()).await?;
            let mut stdout = std::io::stdout();
            writeln!(stdout, "qanat cdc connector {} streaming", connector.name)?;
            stdout.flush()?;
            tracing::info!(connector = %connector.name, source = %qanat_cdc::mysql::redact(&connector.source),
                slot = %source.slot(), "connector ready");
            pipeline::run(source, &pipeline, &state, shutdown).await?;
            Ok(())
        }
        other => anyhow::bail!("source scheme {other:?} is not supported"),
    }
}

async fn snapshot(args: SnapshotArgs, security: &KafkaSecurity) -> anyhow::Result<()> {
    for t in &args.tables {
        anyhow::ensure!(
            t.split('.').count() == 2 && !t.starts_with('.') && !t.ends_with('.'),
            "--table {t:?}: expected db.table"
        );
    }
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading configuration {}", path.display()))?;
        let config = CdcConfig::from_toml_with_env(&text, std::env::vars())
            .with_context(|| format!("in configuration {}", path.display()))?;
        let connector = config
            .connectors
            .iter()
            .find(|c| c.name == args.connector)
            .with_context(|| {
                format!(
                    "{} has no connector named {}",
                    path.display(),
                    args.connector
                )
            })?;
        let signal_table = connector.signal_table.as_deref().with_context(|| {
            format!(
                "connector {} has no signal_table: set one to snapshot tables while it runs, \
                 or stop it and run this without --config",
                args.connector
            )
        })?;
        let id = if connector.source.starts_with("postgres") {
            qanat_cdc::postgres::signal_snapshot(&connector.source, signal_table, &args.tables)
                .await?
        } else {
            qanat_cdc::mysql::signal_snapshot(&connector.source, signal_table, &args.tables).await?
        };
        println!(
            "connector {}: incremental snapshot of {} signalled through {signal_table} (signal {id})",
            args.connector,
            args.tables.join(", ")
        );
        return Ok(());
    }
    let all = pipeline::read_all_offsets(&args.bootstrap, security, &args.offsets_topic).await?;
    let Some(mut record) = all.get(&args.connector).cloned() else {
        anyhow::bail!(
            "connector {} has no stored position in {}; a first start snapshots every table anyway",
            args.connector,
            args.offsets_topic
        );
    };
    anyhow::ensure!(
        record.position.0.get("file").is_some(),
        "connector {}: a stopped PostgreSQL connector cannot take a table snapshot; give it a \
         signal_table and run this with --config while it runs",
        args.connector
    );
    record.position = qanat_cdc::mysql::request_table_snapshot(&record.position, &args.tables)?;
    record.stored_ms = now_ms();
    pipeline::store_offsets(
        &args.bootstrap,
        security,
        &args.offsets_topic,
        &args.connector,
        &record,
    )
    .await?;
    println!(
        "connector {}: snapshot of {} requested; it runs at the connector's next start",
        args.connector,
        args.tables.join(", ")
    );
    Ok(())
}

async fn status(args: StatusArgs, security: &KafkaSecurity) -> anyhow::Result<()> {
    let first = pipeline::read_all_offsets(&args.bootstrap, security, &args.offsets_topic).await?;
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.sample_secs.max(0.0))).await;
    let second = pipeline::read_all_offsets(&args.bootstrap, security, &args.offsets_topic).await?;
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    let now = now_ms();
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{:<16} {:<36} {:>10} {:>10} {:>12} {:>10} {:>14}",
        "CONNECTOR", "TABLE / POSITION", "LAG_S", "STORED_S", "EVENTS", "EVENTS/S", "SNAPSHOT_ROWS"
    )?;
    let secs = |ms: i64| format!("{:.1}", (now - ms).max(0) as f64 / 1000.0);
    for (name, rec) in &second {
        if args.connector.as_ref().is_some_and(|c| c != name) {
            continue;
        }
        writeln!(
            out,
            "{:<16} {:<36} {:>10} {:>10}",
            name,
            rec.position.0.to_string(),
            secs(rec.commit_ts_ms),
            secs(rec.stored_ms)
        )?;
        let before: BTreeMap<_, _> = first
            .get(name)
            .map(|r| r.tables.clone())
            .unwrap_or_default();
        for (table, t) in &rec.tables {
            let rate = t
                .events
                .saturating_sub(before.get(table).map_or(t.events, |b| b.events))
                as f64
                / elapsed;
            writeln!(
                out,
                "{:<16} {:<36} {:>10} {:>10} {:>12} {:>10.1} {:>14}",
                "",
                table,
                secs(t.last_ts_ms),
                "",
                t.events,
                rate,
                t.snapshot_rows
            )?;
        }
    }
    if second.is_empty() {
        writeln!(
            out,
            "no connector has stored a position in {}",
            args.offsets_topic
        )?;
    }
    Ok(())
}

/// Log in to the bus with `security` before the real work (see
/// [`crate::kafka_security::check_login`]).
async fn check_login(bootstrap: &str, security: &KafkaSecurity) -> anyhow::Result<()> {
    let properties = security.properties("security")?;
    crate::kafka_security::check_login_with(bootstrap, properties).await
}
