//! `qanat lake land`: consume topics with a consumer group and land them into the lake's
//! change logs, exactly once (see `qanat_lake::land`). Offsets are committed only after the
//! files covering them are renamed into place; on assignment the landed position is
//! recovered from the files and consuming starts at the larger of it and the committed one.
//!
//! Two threads: the consuming thread polls records and copies them into batches; the
//! landing thread decodes them into the landers' builders and commits what they land
//! (each open file encodes Parquet on a thread of its own). The batch queue is bounded, so
//! a slow lake holds consuming back. A rebalance (inside `poll`, on the consuming thread)
//! takes the landers' lock and bumps a generation; batches polled before it are dropped,
//! since their partitions are recovered and consumed again from the recovered position.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
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
use rdkafka::message::{BorrowedMessage, Headers, Message};
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

/// State shared between the landing thread and the rebalance callback (which runs inside
/// `poll`, on the consuming thread).
struct State {
    landers: Vec<Lander>,
    /// Topic → index in `landers`.
    by_topic: HashMap<String, usize>,
    /// Where consuming starts per assigned partition (None: the group's reset policy).
    assigned: HashMap<(String, i32), Option<i64>>,
}

struct LandContext {
    state: Mutex<State>,
    /// Bumped, under the `state` lock, by every assignment change. Records polled before a
    /// change are dropped by the landing thread: their partitions were recovered anew and
    /// are consumed again from the recovered position.
    generation: AtomicU64,
    /// An error in the rebalance callback, raised by the consuming loop.
    error: Mutex<Option<anyhow::Error>>,
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
                self.generation.fetch_add(1, Ordering::SeqCst);
                let result = assign_positions(&mut state, &parts, committed.ok().as_ref(), tpl);
                drop(state);
                if let Err(e) = result {
                    lock(&self.error).get_or_insert(e);
                }
                if let Err(e) = base.assign(tpl) {
                    lock(&self.error).get_or_insert(anyhow::anyhow!("assigning partitions: {e}"));
                }
            }
            _ => {
                let mut state = lock(&self.state);
                self.generation.fetch_add(1, Ordering::SeqCst);
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
    qanat_config::backlog_reader(&mut config);
    crate::kafka_security::apply(&mut config)
        .create_with_context(LandContext {
            state: Mutex::new(state),
            generation: AtomicU64::new(0),
            error: Mutex::new(None),
        })
        .context("creating the consumer")
}

/// Records handed from the consuming thread to the landing thread: copied out of
/// librdkafka's messages into one buffer, so a batch costs a few allocations, reused.
#[derive(Default)]
struct Batch {
    /// The assignment generation the records were polled in.
    generation: u64,
    data: Vec<u8>,
    records: Vec<BatchRecord>,
    /// Headers of `log` input records: name and value ranges in `data`.
    headers: Vec<(Range<usize>, Option<Range<usize>>)>,
}

struct BatchRecord {
    /// Index in the subscribed topics.
    topic: usize,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Range<usize>>,
    value: Option<Range<usize>>,
    headers: Range<usize>,
}

/// Records per batch, and bytes of keys and values per batch, before it is handed over.
const BATCH_RECORDS: usize = 4096;
const BATCH_BYTES: usize = 2 << 20;
/// Batches queued for the landing thread before the consuming thread waits.
const BATCH_QUEUE: usize = 4;

impl Batch {
    fn clear(&mut self) {
        self.data.clear();
        self.records.clear();
        self.headers.clear();
    }

    fn put(&mut self, bytes: Option<&[u8]>) -> Option<Range<usize>> {
        bytes.map(|b| {
            let start = self.data.len();
            self.data.extend_from_slice(b);
            start..self.data.len()
        })
    }

    fn push(&mut self, topic: usize, msg: &BorrowedMessage<'_>, with_headers: bool) {
        let key = self.put(msg.key());
        let value = self.put(msg.payload());
        let first_header = self.headers.len();
        if with_headers {
            if let Some(h) = msg.headers() {
                for header in h.iter() {
                    let name = self.put(Some(header.key.as_bytes())).unwrap_or_default();
                    let value = self.put(header.value);
                    self.headers.push((name, value));
                }
            }
        }
        self.records.push(BatchRecord {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
            key,
            value,
            headers: first_header..self.headers.len(),
        });
    }

    fn full(&self) -> bool {
        self.records.len() >= BATCH_RECORDS || self.data.len() >= BATCH_BYTES
    }

    fn bytes(&self, r: &Option<Range<usize>>) -> Option<&[u8]> {
        r.as_ref().and_then(|r| self.data.get(r.clone()))
    }
}

/// What the landing thread did.
#[derive(Default)]
struct Totals {
    events: u64,
    files: u64,
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
    // Which topics carry `log` input, whose headers are read.
    let with_headers: Vec<bool> = {
        let state = lock(&consumer.context().state);
        topics
            .iter()
            .map(|t| {
                state
                    .by_topic
                    .get(t)
                    .and_then(|&i| state.landers.get(i))
                    .is_some_and(|l| l.spec().input == InputKind::Log)
            })
            .collect()
    };
    let (batches, queue) = sync_channel::<Batch>(BATCH_QUEUE);
    let (recycle, spare) = channel::<Batch>();
    let (consumed, totals) = std::thread::scope(|scope| {
        let landing = std::thread::Builder::new()
            .name("lake-land".into())
            .spawn_scoped(scope, || {
                land_batches(&consumer, &topics, &tables, queue, recycle)
            })
            .context("starting the landing thread")?;
        let consumed = consume(
            &consumer,
            ConsumeArgs {
                topics: &topics,
                with_headers: &with_headers,
                once,
                targets: &targets,
                stop,
                lag_positions: &lag_positions,
            },
            batches,
            spare,
        );
        let totals = match landing.join() {
            Ok(totals) => totals,
            Err(_) => Err(anyhow::anyhow!("the landing thread panicked")),
        };
        anyhow::Ok((consumed, totals))
    })?;
    // A landing error explains a consuming one (the queue closed under it).
    let totals = totals?;
    consumed?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "qanat lake land: {} events consumed, {} files landed",
        totals.events, totals.files
    )?;
    out.flush()?;
    Ok(())
}

struct ConsumeArgs<'a> {
    topics: &'a [String],
    with_headers: &'a [bool],
    once: bool,
    targets: &'a Positions<(i64, i64)>,
    stop: &'a AtomicBool,
    lag_positions: &'a Mutex<HashMap<(String, i32), i64>>,
}

/// The consuming thread: poll records into batches and hand them to the landing thread,
/// until stopped, done (`--once`), or the landing thread is gone. Dropping `batches` tells
/// the landing thread to land what it has and finish.
fn consume(
    consumer: &BaseConsumer<LandContext>,
    args: ConsumeArgs<'_>,
    batches: SyncSender<Batch>,
    spare: Receiver<Batch>,
) -> anyhow::Result<()> {
    let ctx = consumer.context();
    // Next offset per partition: topic index → partition number → offset. Indexed, not
    // hashed: this and the end offsets below are touched for every record.
    let mut consumed: Vec<Vec<Option<i64>>> = vec![Vec::new(); args.topics.len()];
    // `--once`: the end offset per topic index and partition number.
    let ends: Vec<Vec<Option<i64>>> = args
        .topics
        .iter()
        .map(|t| {
            let parts = args.targets.get(t);
            let len = parts.map_or(0, |p| {
                p.keys().filter_map(|&p| slot(p)).max().map_or(0, |m| m + 1)
            });
            (0..len)
                .map(|i| {
                    parts
                        .and_then(|p| p.get(&i32::try_from(i).ok()?))
                        .map(|&(_, high)| high)
                })
                .collect()
        })
        .collect();
    // `--once` checks whether it is done when a record reaches its partition's end, and
    // when a poll comes back empty.
    let mut check_done = true;
    let mut last_lag = Instant::now();
    let mut batch = Batch::default();
    let send = |batch: &mut Batch| -> bool {
        let next = spare.try_recv().unwrap_or_default();
        let full = std::mem::replace(batch, next);
        batch.clear();
        batches.send(full).is_ok()
    };
    loop {
        // Between batches: a batch is handed over when full, at a partition's end and when
        // a poll comes back empty, so these checks come often enough.
        if batch.records.is_empty() {
            if let Some(e) = lock(&ctx.error).take() {
                return Err(e);
            }
            if args.stop.load(Ordering::SeqCst) {
                break;
            }
            if args.once && check_done && once_done(consumer, args.topics, args.targets, &consumed)
            {
                break;
            }
            check_done = false;
            if last_lag.elapsed() >= Duration::from_secs(1) {
                last_lag = Instant::now();
                let mut lag = lock(args.lag_positions);
                lag.clear();
                for (t, parts) in consumed.iter().enumerate() {
                    for (p, o) in parts.iter().enumerate() {
                        if let (Some(o), Ok(p)) = (o, i32::try_from(p)) {
                            lag.insert((args.topics[t].clone(), p), *o);
                        }
                    }
                }
            }
        }
        // Wait for records only when there is nothing to hand over.
        let wait = if batch.records.is_empty() {
            Duration::from_millis(200)
        } else {
            Duration::ZERO
        };
        let polled = consumer.poll(wait);
        let generation = ctx.generation.load(Ordering::SeqCst);
        if generation != batch.generation {
            // Records of an earlier assignment go in a batch of their own (to be dropped).
            if !batch.records.is_empty() && !send(&mut batch) {
                return Ok(());
            }
            batch.generation = generation;
        }
        let Some(msg) = polled else {
            if !batch.records.is_empty() && !send(&mut batch) {
                return Ok(());
            }
            check_done = true;
            continue;
        };
        let msg = msg.context("consuming")?;
        let Some(t) = args.topics.iter().position(|t| t == msg.topic()) else {
            continue;
        };
        batch.push(t, &msg, args.with_headers.get(t).copied().unwrap_or(false));
        let next = msg.offset() + 1;
        let Some(p) = slot(msg.partition()) else {
            bail!("{}: a record of partition {}", msg.topic(), msg.partition());
        };
        if let Some(at) = consumed.get_mut(t) {
            if at.len() <= p {
                at.resize(p + 1, None);
            }
            at[p] = Some(next);
        }
        if args.once {
            check_done = ends
                .get(t)
                .and_then(|e| e.get(p).copied().flatten())
                .is_some_and(|high| next >= high);
        }
        if (batch.full() || check_done) && !send(&mut batch) {
            return Ok(());
        }
    }
    if !batch.records.is_empty() {
        let _ = send(&mut batch);
    }
    Ok(())
}

/// The landing thread: push the batches' records through the landers and commit what they
/// land; at the end (the queue closed) land everything open. On a bad record, land
/// everything before it and stop.
fn land_batches(
    consumer: &BaseConsumer<LandContext>,
    topics: &[String],
    tables: &[String],
    queue: Receiver<Batch>,
    recycle: Sender<Batch>,
) -> anyhow::Result<Totals> {
    let ctx = consumer.context();
    let events: Vec<metrics::Counter> = tables
        .iter()
        .map(|t| metrics::counter!("qanat_lake_events_total", "table" => t.clone()))
        .collect();
    let mut totals = Totals::default();
    let mut last_tick = Instant::now();
    loop {
        let batch = match queue.recv_timeout(Duration::from_secs(1)) {
            Ok(batch) => Some(batch),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let now = Instant::now();
        let mut landed = Vec::new();
        if let Some(batch) = &batch {
            let mut state = lock(&ctx.state);
            if batch.generation == ctx.generation.load(Ordering::SeqCst) {
                let mut headers: Vec<(&str, Option<&[u8]>)> = Vec::new();
                let mut counts = vec![0u64; tables.len()];
                let lander_of: Vec<Option<usize>> = topics
                    .iter()
                    .map(|t| state.by_topic.get(t).copied())
                    .collect();
                for r in &batch.records {
                    let (Some(topic), Some(Some(i))) =
                        (topics.get(r.topic), lander_of.get(r.topic))
                    else {
                        continue;
                    };
                    let i = *i;
                    let Some(lander) = state.landers.get_mut(i) else {
                        continue;
                    };
                    headers.clear();
                    for (name, value) in batch.headers.get(r.headers.clone()).unwrap_or_default() {
                        let name = batch
                            .data
                            .get(name.clone())
                            .and_then(|n| std::str::from_utf8(n).ok())
                            .unwrap_or_default();
                        headers.push((name, batch.bytes(value)));
                    }
                    let rec = Record {
                        topic,
                        partition: r.partition,
                        offset: r.offset,
                        timestamp_ms: r.timestamp_ms,
                        key: batch.bytes(&r.key),
                        value: batch.bytes(&r.value),
                        headers: &headers,
                    };
                    match lander.push(&rec, now) {
                        Ok(l) => landed.extend(l),
                        Err(e) => {
                            // Land everything before the bad record, so a fixed rerun
                            // starts at it.
                            let error = anyhow::Error::new(e)
                                .context(format!("landing table {}", lander.spec().table));
                            for l in &mut state.landers {
                                landed.extend(l.flush()?);
                            }
                            drop(state);
                            commit(consumer, tables, &landed)?;
                            return Err(error);
                        }
                    }
                    if let Some(c) = counts.get_mut(i) {
                        *c += 1;
                    }
                }
                for (i, n) in counts.into_iter().enumerate() {
                    events[i].increment(n);
                    totals.events += n;
                }
            }
        }
        if now.duration_since(last_tick) >= Duration::from_secs(1) {
            last_tick = now;
            let mut state = lock(&ctx.state);
            for l in &mut state.landers {
                landed.extend(l.tick(now)?);
            }
        }
        totals.files += commit(consumer, tables, &landed)?;
        if let Some(batch) = batch {
            let _ = recycle.send(batch);
        }
    }
    let landed = {
        let mut state = lock(&ctx.state);
        let mut out = Vec::new();
        for l in &mut state.landers {
            out.extend(l.flush()?);
        }
        out
    };
    totals.files += commit(consumer, tables, &landed)?;
    Ok(totals)
}

/// `--once` is done when every partition's position reached the end seen at start.
fn once_done(
    consumer: &BaseConsumer<LandContext>,
    topics: &[String],
    targets: &Positions<(i64, i64)>,
    consumed: &[Vec<Option<i64>>],
) -> bool {
    let state = lock(&consumer.context().state);
    targets.iter().all(|(topic, parts)| {
        let at_topic = topics
            .iter()
            .position(|t| t == topic)
            .and_then(|i| consumed.get(i));
        parts.iter().all(|(p, &(low, high))| {
            let tp = (topic.clone(), *p);
            let start = state.assigned.get(&tp).copied().flatten().unwrap_or(low);
            let at = slot(*p).and_then(|p| at_topic.and_then(|c| c.get(p)).copied().flatten());
            let pos = at.unwrap_or(start).max(start);
            (state.assigned.contains_key(&tp) && pos >= high) || high <= low
        })
    })
}

/// A partition number as an index; None for a negative one (never a real partition).
fn slot(partition: i32) -> Option<usize> {
    usize::try_from(partition).ok()
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
