//! `qanat lake land`: consume topics with a consumer group and land them into the lake's
//! change logs, exactly once (see `qanat_lake::land`). Offsets are committed only after the
//! files covering them are renamed into place; on assignment the landed position is
//! recovered from the files and consuming starts at the larger of it and the committed one.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use qanat_lake::land::{
    InputKind, Landed, Lander, Record, TableSpec, DEFAULT_ROLL_AGE, DEFAULT_ROLL_BYTES,
};
use qanat_lake::layout::TableName;
use qanat_lake::schema::ColumnType;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;

#[derive(Args)]
pub struct LandArgs {
    /// TOML configuration with `bootstrap`, `root`, `group` and one or more [[table]]s.
    #[arg(long, env = "QANAT_LAKE_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka-protocol bootstrap servers; overrides `bootstrap` of the file.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Override [security] of the file key by key.
    #[command(flatten)]
    security: crate::kafka_security::SecurityArgs,
    /// Lake root directory; overrides `root` of the file.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Consumer group; overrides `group` of the file (default `qanat-lake`).
    #[arg(long)]
    group: Option<String>,
    /// One table from flags: its topic (repeatable).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// One table from flags: `db.table`.
    #[arg(long)]
    table: Option<String>,
    /// One table from flags: cdc | json | log (default cdc).
    #[arg(long)]
    input: Option<InputKind>,
    /// One table from flags: `ds=…/hh=…/` partitions.
    #[arg(long)]
    hourly: bool,
    /// One table from flags: roll a file past this many bytes.
    #[arg(long)]
    roll_bytes: Option<u64>,
    /// One table from flags: roll a file this many seconds after it was opened.
    #[arg(long)]
    roll_age_secs: Option<u64>,
    /// Land up to the end offsets seen at start, then exit.
    #[arg(long)]
    once: bool,
    /// Serve Prometheus metrics (qanat_lake_*) at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// The configuration file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LakeConfig {
    bootstrap: Option<String>,
    root: Option<PathBuf>,
    group: Option<String>,
    metrics_listen: Option<SocketAddr>,
    /// How to reach a secured bus (`[security]`, see `qanat_config::KafkaSecurity`).
    #[serde(default)]
    security: qanat_config::KafkaSecurity,
    #[serde(default)]
    table: Vec<TableConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableConfig {
    table: String,
    topics: Vec<String>,
    #[serde(default)]
    input: InputKind,
    #[serde(default)]
    hourly: bool,
    roll_bytes: Option<u64>,
    roll_age_secs: Option<u64>,
    /// Column name → type (int64, float64, bool, string, timestamp, date, decimal(p,s)).
    #[serde(default)]
    columns: BTreeMap<String, String>,
}

/// Everything `land` runs with.
struct Settings {
    bootstrap: String,
    root: PathBuf,
    group: String,
    metrics_listen: Option<SocketAddr>,
    tables: Vec<(TableSpec, Vec<String>)>,
}

fn load(args: &LandArgs) -> anyhow::Result<Settings> {
    let mut doc = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading configuration {}", path.display()))?;
            toml::from_str::<toml::Table>(&text)
                .with_context(|| format!("in configuration {}", path.display()))?
        }
        None => toml::Table::new(),
    };
    qanat_config::overlay_env(
        &mut doc,
        "QANAT_LAKE_",
        &[],
        true,
        std::env::vars(),
        |_, key, raw| {
            Ok(match key {
                "bootstrap" | "root" | "group" | "metrics_listen" => {
                    Some(toml::Value::String(raw.into()))
                }
                _ => None,
            })
        },
    )?;
    let origin = args
        .config
        .as_ref()
        .map_or("flags".to_string(), |p| p.display().to_string());
    let file: LakeConfig = doc
        .try_into()
        .with_context(|| format!("in configuration {origin} (or QANAT_LAKE_* overrides)"))?;
    let mut tables = Vec::new();
    for (i, t) in file.table.iter().enumerate() {
        let at = |key: &str| format!("table[{i}].{key}");
        let name: TableName = t.table.parse().with_context(|| at("table"))?;
        if t.topics.is_empty() {
            bail!("{}: at least one topic is needed", at("topics"));
        }
        let mut spec = TableSpec::new(name, t.input);
        spec.hourly = t.hourly;
        spec.roll_bytes = t.roll_bytes.unwrap_or(DEFAULT_ROLL_BYTES);
        spec.roll_age = t
            .roll_age_secs
            .map_or(DEFAULT_ROLL_AGE, Duration::from_secs);
        for (col, ty) in &t.columns {
            let ty: ColumnType = ty.parse().with_context(|| at(&format!("columns.{col}")))?;
            spec.columns.push((col.clone(), ty));
        }
        tables.push((spec, t.topics.clone()));
    }
    if let Some(table) = &args.table {
        if args.topics.is_empty() {
            bail!("--table needs --topic");
        }
        let mut spec = TableSpec::new(
            table.parse().context("--table")?,
            args.input.unwrap_or_default(),
        );
        spec.hourly = args.hourly;
        spec.roll_bytes = args.roll_bytes.unwrap_or(DEFAULT_ROLL_BYTES);
        spec.roll_age = args
            .roll_age_secs
            .map_or(DEFAULT_ROLL_AGE, Duration::from_secs);
        tables.push((spec, args.topics.clone()));
    } else if !args.topics.is_empty() {
        bail!("--topic needs --table");
    }
    if tables.is_empty() {
        bail!("nothing to land: give --config FILE with [[table]]s, or --table and --topic");
    }
    let mut seen: HashMap<&str, &TableName> = HashMap::new();
    for (spec, topics) in &tables {
        for t in topics {
            if let Some(other) = seen.insert(t, &spec.table) {
                bail!("topic {t} is landed into both {other} and {}", spec.table);
            }
        }
    }
    let mut security = file.security.clone();
    security.overlay(&args.security.overrides());
    crate::kafka_security::install_settings(&security, "security")?;
    let root = args
        .root
        .clone()
        .or(file.root)
        .context("root: no lake root (--root, `root` in the file, or QANAT_LAKE_ROOT)")?;
    Ok(Settings {
        bootstrap: args
            .bootstrap
            .clone()
            .or(file.bootstrap)
            .unwrap_or_else(|| "127.0.0.1:9092".into()),
        root,
        group: args
            .group
            .clone()
            .or(file.group)
            .unwrap_or_else(|| "qanat-lake".into()),
        metrics_listen: args.metrics_listen.or(file.metrics_listen),
        tables,
    })
}

/// State shared between the consume loop and the rebalance callback (which runs inside
/// `poll`, on the same thread).
struct State {
    landers: Vec<Lander>,
    /// Topic → index in `landers`.
    by_topic: HashMap<String, usize>,
    /// Where consuming starts per assigned partition (None: the group's reset policy).
    assigned: HashMap<(String, i32), Option<i64>>,
    /// An error in the rebalance callback, raised by the loop.
    error: Option<anyhow::Error>,
}

struct LandContext {
    state: Mutex<State>,
}

impl ClientContext for LandContext {}

impl ConsumerContext for LandContext {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let committed = base.committed_offsets(tpl.clone(), Duration::from_secs(30));
                let mut state = lock(&self.state);
                let result = assign_positions(&mut state, &parts, committed.ok().as_ref(), tpl);
                if let Err(e) = result {
                    state.error.get_or_insert(e);
                }
                drop(state);
                if let Err(e) = base.assign(tpl) {
                    lock(&self.state)
                        .error
                        .get_or_insert(anyhow::anyhow!("assigning partitions: {e}"));
                }
            }
            _ => {
                let mut state = lock(&self.state);
                for (t, p) in &parts {
                    if let Some(&i) = state.by_topic.get(t) {
                        state.landers[i].revoke(t, *p);
                    }
                    state.assigned.remove(&(t.clone(), *p));
                }
                drop(state);
                let _ = base.unassign();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Recover the landed positions of newly assigned partitions and start each at the larger
/// of it and the committed offset.
fn assign_positions(
    state: &mut State,
    parts: &[(String, i32)],
    committed: Option<&TopicPartitionList>,
    tpl: &mut TopicPartitionList,
) -> anyhow::Result<()> {
    let mut recovered: HashMap<(String, i32), i64> = HashMap::new();
    for (i, lander) in state.landers.iter_mut().enumerate() {
        let mine: Vec<(String, i32)> = parts
            .iter()
            .filter(|(t, _)| state.by_topic.get(t) == Some(&i))
            .cloned()
            .collect();
        if mine.is_empty() {
            continue;
        }
        recovered.extend(
            lander
                .recover(&mine)
                .with_context(|| format!("recovering table {}", lander.spec().table))?,
        );
    }
    for (t, p) in parts {
        let from_commit = committed
            .and_then(|c| c.find_partition(t, *p))
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let from_files = recovered.get(&(t.clone(), *p)).copied();
        let start = from_commit.max(from_files);
        if let Some(o) = start {
            tpl.set_partition_offset(t, *p, Offset::Offset(o))
                .with_context(|| format!("seeking {t}/{p} to {o}"))?;
        }
        tracing::info!(topic = %t, partition = p, committed = ?from_commit, files = ?from_files,
            start = ?start, "partition assigned");
        state.assigned.insert((t.clone(), *p), start);
    }
    Ok(())
}

pub async fn run(args: LandArgs) -> anyhow::Result<()> {
    let settings = load(&args)?;
    if args.once {
        crate::kafka_security::check_login(&settings.bootstrap).await?;
    }
    if let Some(addr) = settings.metrics_listen {
        let bound = crate::telemetry::serve_metrics(addr, None).await?;
        let mut out = std::io::stdout();
        writeln!(out, "qanat metrics listening on {bound}")?;
        out.flush()?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_signal = stop.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: landing what is open");
        stop_signal.store(true, Ordering::SeqCst);
    });
    let once = args.once;
    tokio::task::spawn_blocking(move || land(settings, once, &stop))
        .await
        .context("landing thread")?
}

fn consumer(settings: &Settings, state: State) -> anyhow::Result<BaseConsumer<LandContext>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap)
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("partition.assignment.strategy", "range,roundrobin")
        // Large fetches, few round trips; at most 64 MiB of records prefetched (memory held
        // whenever landing falls behind the bus).
        .set("fetch.min.bytes", "1048576")
        .set("fetch.max.bytes", "67108864")
        .set("max.partition.fetch.bytes", "16777216")
        .set("queued.max.messages.kbytes", "65536")
        .set("fetch.wait.max.ms", "100");
    crate::kafka_security::apply(&mut config)
        .create_with_context(LandContext {
            state: Mutex::new(state),
        })
        .context("creating the consumer")
}

fn land(settings: Settings, once: bool, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut by_topic = HashMap::new();
    let mut landers = Vec::new();
    let mut topics = Vec::new();
    for (i, (spec, ts)) in settings.tables.iter().enumerate() {
        for t in ts {
            by_topic.insert(t.clone(), i);
            topics.push(t.clone());
        }
        landers.push(Lander::new(&settings.root, spec.clone()));
    }
    let consumer = consumer(
        &settings,
        State {
            landers,
            by_topic,
            assigned: HashMap::new(),
            error: None,
        },
    )?;
    // `--once`: the end offsets now are where this run stops.
    let mut targets: Positions<(i64, i64)> = HashMap::new();
    if once {
        let meta = consumer
            .fetch_metadata(None, Duration::from_secs(30))
            .context("reading topic metadata")?;
        for t in &topics {
            let Some(tm) = meta.topics().iter().find(|m| m.name() == t) else {
                bail!("topic {t} does not exist");
            };
            for p in tm.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(t, p.id(), Duration::from_secs(30))
                    .with_context(|| format!("end offset of {t}/{}", p.id()))?;
                targets
                    .entry(t.clone())
                    .or_default()
                    .insert(p.id(), (low, high));
            }
        }
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).context("subscribing")?;
    {
        let mut out = std::io::stdout();
        writeln!(
            out,
            "qanat lake land running: {} table(s) from {} topic(s) into {}",
            settings.tables.len(),
            topics.len(),
            settings.root.display()
        )?;
        out.flush()?;
    }
    let tables: Vec<String> = settings
        .tables
        .iter()
        .map(|(s, _)| s.table.to_string())
        .collect();
    let events: Vec<metrics::Counter> = tables
        .iter()
        .map(|t| metrics::counter!("qanat_lake_events_total", "table" => t.clone()))
        .collect();
    // Next offset per partition: topic → partition → offset, looked up without allocating.
    let mut consumed: Positions<i64> = HashMap::new();
    // `--once` checks whether it is done when a record reaches its partition's end, and
    // when a poll comes back empty.
    let mut check_done = true;
    let lag_positions = Arc::new(Mutex::new(HashMap::new()));
    let lag_done = Arc::new(AtomicBool::new(false));
    spawn_lag_reporter(&settings, lag_positions.clone(), lag_done.clone())?;
    // Stops the reporter however this function returns.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop_lag = StopOnDrop(lag_done);
    let mut total_events = 0u64;
    let mut total_files = 0u64;
    let mut last_tick = Instant::now();
    let mut last_lag = Instant::now();
    loop {
        if let Some(e) = lock(&consumer.context().state).error.take() {
            return Err(e);
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if once && check_done && once_done(&consumer, &targets, &consumed) {
            break;
        }
        check_done = false;
        let now = Instant::now();
        if now.duration_since(last_tick) >= Duration::from_secs(1) {
            last_tick = now;
            let landed = {
                let mut state = lock(&consumer.context().state);
                let mut out = Vec::new();
                for l in &mut state.landers {
                    out.extend(l.tick(now)?);
                }
                out
            };
            total_files += commit(&consumer, &tables, &landed)?;
        }
        if now.duration_since(last_lag) >= Duration::from_secs(1) {
            last_lag = now;
            let mut lag = lock(&lag_positions);
            lag.clear();
            for (t, parts) in &consumed {
                for (p, o) in parts {
                    lag.insert((t.clone(), *p), *o);
                }
            }
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            check_done = true;
            continue;
        };
        let msg = msg.with_context(|| "consuming")?;
        let topic = msg.topic();
        // Only `log` input reads headers; an empty Vec does not allocate.
        let mut headers_buf: Vec<(&str, Option<&[u8]>)> = Vec::new();
        let mut state = lock(&consumer.context().state);
        let Some(&i) = state.by_topic.get(topic) else {
            continue;
        };
        if i >= state.landers.len() {
            continue;
        }
        let lander = &mut state.landers[i];
        if lander.spec().input == InputKind::Log {
            if let Some(h) = msg.headers() {
                for header in h.iter() {
                    headers_buf.push((header.key, header.value));
                }
            }
        }
        let rec = Record {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
            key: msg.key(),
            value: msg.payload(),
            headers: &headers_buf,
        };
        let landed = match lander.push(&rec, now) {
            Ok(landed) => landed,
            Err(e) => {
                // Land everything before the bad record, so a fixed rerun starts at it.
                let error =
                    anyhow::Error::new(e).context(format!("landing table {}", lander.spec().table));
                let mut flushed = Vec::new();
                for l in &mut state.landers {
                    flushed.extend(l.flush()?);
                }
                drop(state);
                commit(&consumer, &tables, &flushed)?;
                return Err(error);
            }
        };
        drop(state);
        events[i].increment(1);
        total_events += 1;
        let next = msg.offset() + 1;
        match consumed.get_mut(topic) {
            Some(parts) => {
                parts.insert(msg.partition(), next);
            }
            None => {
                consumed.insert(topic.to_owned(), HashMap::from([(msg.partition(), next)]));
            }
        }
        if once {
            check_done = targets
                .get(topic)
                .and_then(|t| t.get(&msg.partition()))
                .is_some_and(|&(_, high)| next >= high);
        }
        if !landed.is_empty() {
            total_files += commit(&consumer, &tables, &landed)?;
        }
    }
    let landed = {
        let mut state = lock(&consumer.context().state);
        let mut out = Vec::new();
        for l in &mut state.landers {
            out.extend(l.flush()?);
        }
        out
    };
    total_files += commit(&consumer, &tables, &landed)?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "qanat lake land: {total_events} events consumed, {total_files} files landed"
    )?;
    out.flush()?;
    Ok(())
}

/// `--once` is done when every partition's position reached the end seen at start.
fn once_done(
    consumer: &BaseConsumer<LandContext>,
    targets: &Positions<(i64, i64)>,
    consumed: &Positions<i64>,
) -> bool {
    let state = lock(&consumer.context().state);
    targets.iter().all(|(topic, parts)| {
        parts.iter().all(|(p, &(low, high))| {
            let tp = (topic.clone(), *p);
            let start = state.assigned.get(&tp).copied().flatten().unwrap_or(low);
            let at = consumed.get(topic).and_then(|c| c.get(p)).copied();
            let pos = at.unwrap_or(start).max(start);
            (state.assigned.contains_key(&tp) && pos >= high) || high <= low
        })
    })
}

/// Topic → partition → a position.
type Positions<T> = HashMap<String, HashMap<i32, T>>;

/// Commit the landed positions (the files are already in place) and count them.
fn commit(
    consumer: &BaseConsumer<LandContext>,
    tables: &[String],
    landed: &[Landed],
) -> anyhow::Result<u64> {
    if landed.is_empty() {
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    let mut files = 0u64;
    for l in landed {
        tpl.add_partition_offset(&l.topic, l.partition, Offset::Offset(l.next_offset))
            .context("building the commit")?;
        files += l.files.len() as u64;
        let table = {
            let state = lock(&consumer.context().state);
            state
                .by_topic
                .get(&l.topic)
                .and_then(|&i| tables.get(i))
                .cloned()
                .unwrap_or_default()
        };
        metrics::counter!("qanat_lake_files_total", "table" => table.clone())
            .increment(l.files.len() as u64);
        metrics::counter!("qanat_lake_rows_total", "table" => table.clone()).increment(l.rows);
        metrics::counter!("qanat_lake_bytes_total", "table" => table.clone()).increment(l.bytes);
        tracing::info!(table, topic = %l.topic, partition = l.partition, next = l.next_offset,
            files = l.files.len(), rows = l.rows, bytes = l.bytes, "landed");
    }
    // A failed commit loses nothing: the files are the truth and the next start recovers
    // from them. It is logged, not fatal.
    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
        tracing::warn!(error = %e, "committing landed offsets failed; files stay authoritative");
    }
    Ok(files)
}

/// Lag per partition (end offset − consumed position) every 10 s, from a client of its own:
/// a blocking watermark request on the landing consumer would stall consuming.
fn spawn_lag_reporter(
    settings: &Settings,
    positions: Arc<Mutex<HashMap<(String, i32), i64>>>,
    done: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap)
        .set("group.id", format!("{}-lag", settings.group));
    let client: BaseConsumer = crate::kafka_security::apply(&mut config)
        .create()
        .context("creating the lag client")?;
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            std::thread::park_timeout(Duration::from_secs(10));
            let now: Vec<((String, i32), i64)> = lock(&positions)
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            for ((t, p), pos) in now {
                if let Ok((_, high)) = client.fetch_watermarks(&t, p, Duration::from_secs(5)) {
                    metrics::gauge!("qanat_lake_lag", "topic" => t.clone(), "partition" => p.to_string())
                        .set((high - pos).max(0) as f64);
                }
            }
        }
    });
    Ok(())
}
