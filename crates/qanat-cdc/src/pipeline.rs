//! The delivery loop: one connector's [`Source`] into the bus.
//!
//! Every row change is produced (idempotent producer, `acks=all`) to its table's topic; the
//! delivery reports are awaited in emission order by a second task. When every event before a
//! resume point ([`Change::Commit`], [`Change::Heartbeat`]) is acknowledged, that point becomes
//! the connector's acked position; it is written to the offsets topic (key = connector name,
//! latest record wins) at most every `store_interval` or every `store_every_commits` commits,
//! and at shutdown, and only once that record itself is acknowledged is it handed to
//! [`Source::acknowledge`]. Schema changes go to the connector's schema-history topic and are
//! acknowledged before the next change is even read, so the history is never behind a stored
//! position.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, ThreadedProducer};
use rdkafka::TopicPartitionList;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use self::delivery::{AckContext, Deliveries};

use crate::event::{ChangeEvent, Op, Row, SnapshotMark, TransactionRef, Value};
use crate::source::{Change, Position, SchemaChange, Source};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("source: {0}")]
    Source(Box<dyn std::error::Error + Send + Sync>),
    #[error("kafka client setup: {0}")]
    Client(KafkaError),
    #[error("kafka security: {0}")]
    Security(#[from] qanat_config::SecurityError),
    #[error("delivery to topic {topic} failed: {error}")]
    Delivery { topic: String, error: KafkaError },
    #[error("storing the position in topic {topic} failed: {error}")]
    Store { topic: String, error: KafkaError },
    #[error("creating topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("reading back topic {topic}: {reason}")]
    LoadState { topic: String, reason: String },
    #[error("encoding a record: {0}")]
    Encode(serde_json::Error),
    #[error("the delivery task stopped unexpectedly")]
    AckerGone,
}

/// Where events of the collections matching `pattern` (`db.table`, anchored) go.
#[derive(Debug, Clone)]
pub struct Route {
    pub pattern: Regex,
    pub topic: String,
}

/// How a masked column's value is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mask {
    /// `hex(sha256(salt || value as JSON text))`: stable, so equal values stay joinable.
    Hash { salt: String },
    /// A fixed text in place of any non-NULL value.
    Fixed(String),
}

#[derive(Debug, Clone)]
pub struct MaskRule {
    /// Anchored over `db.table.column`.
    pub column: Regex,
    pub mask: Mask,
}

/// Compile `pattern` to match whole names only.
pub fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// One connector's delivery settings (source-neutral).
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// The connector's name: key in the offsets topic, `source.name` of its events.
    pub name: String,
    pub bootstrap: String,
    /// Default topic `<prefix>.<db>.<table>` (PostgreSQL: `<prefix>.<schema>.<table>`).
    pub topic_prefix: String,
    /// First match wins; unmatched collections take the default topic.
    pub routes: Vec<Route>,
    /// Empty = every table.
    pub include: Vec<Regex>,
    pub exclude: Vec<Regex>,
    /// Anchored over `db.table.column`; the column is left out of `before`/`after`.
    pub exclude_columns: Vec<Regex>,
    pub masks: Vec<MaskRule>,
    /// A record with the key and no value after each delete, for compacted topics.
    pub tombstones: bool,
    /// BEGIN/END markers with per-table counts; also fills each event's `transaction`.
    pub transaction_topic: Option<String>,
    pub offsets_topic: String,
    pub schema_history_topic: String,
    pub store_interval: Duration,
    pub store_every_commits: u64,
    /// Extra librdkafka producer properties.
    pub producer_properties: BTreeMap<String, String>,
    /// How to reach a secured bus (the config's `[security]`).
    pub security: qanat_config::KafkaSecurity,
}

impl PipelineConfig {
    /// Defaults for a connector: prefix `cdc`, offsets topic `qanat-cdc-offsets`, schema
    /// history `qanat-cdc-schema.<name>`, store every 200 ms or 1000 commits.
    pub fn new(name: &str, bootstrap: &str) -> Self {
        PipelineConfig {
            name: name.to_string(),
            bootstrap: bootstrap.to_string(),
            topic_prefix: "cdc".into(),
            routes: Vec::new(),
            include: Vec::new(),
            exclude: Vec::new(),
            exclude_columns: Vec::new(),
            masks: Vec::new(),
            tombstones: false,
            transaction_topic: None,
            offsets_topic: "qanat-cdc-offsets".into(),
            schema_history_topic: format!("qanat-cdc-schema.{name}"),
            store_interval: Duration::from_millis(200),
            store_every_commits: 1000,
            producer_properties: BTreeMap::new(),
            security: qanat_config::KafkaSecurity::default(),
        }
    }

    /// `db.table`, or `schema.table` where the source has schemas.
    pub fn collection(db: &str, schema: Option<&str>, table: &str) -> String {
        format!("{}.{table}", schema.unwrap_or(db))
    }

    /// Whether changes of this collection are captured.
    pub fn captures(&self, collection: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|r| r.is_match(collection)))
            && !self.exclude.iter().any(|r| r.is_match(collection))
    }

    pub fn topic_for(&self, collection: &str) -> String {
        self.routes
            .iter()
            .find(|r| r.pattern.is_match(collection))
            .map(|r| r.topic.clone())
            .unwrap_or_else(|| format!("{}.{collection}", self.topic_prefix))
    }

    fn client_config(&self) -> Result<ClientConfig, PipelineError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        self.security.apply("security", &mut c)?;
        Ok(c)
    }

    /// Apply column exclusion and masks to a row image of `collection`.
    pub fn shape_row(&self, collection: &str, row: &mut Row) {
        if self.exclude_columns.is_empty() && self.masks.is_empty() {
            return;
        }
        row.columns.retain(|(name, _)| {
            let full = format!("{collection}.{name}");
            !self.exclude_columns.iter().any(|r| r.is_match(&full))
        });
        self.mask_row(collection, row);
    }

    fn mask_row(&self, collection: &str, row: &mut Row) {
        for (name, value) in &mut row.columns {
            if matches!(value, Value::Null) {
                continue;
            }
            let full = format!("{collection}.{name}");
            if let Some(rule) = self.masks.iter().find(|m| m.column.is_match(&full)) {
                *value = match &rule.mask {
                    Mask::Fixed(text) => Value::Text(text.clone()),
                    Mask::Hash { salt } => {
                        let mut h = Sha256::new();
                        h.update(salt.as_bytes());
                        h.update(value.to_json().to_string().as_bytes());
                        Value::Text(hex::encode(h.finalize()))
                    }
                };
            }
        }
    }
}

/// Per-table figures kept in the offsets record for `qanat cdc status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableStats {
    pub events: u64,
    /// Commit time of the last event of this table written, ms since the epoch.
    pub last_ts_ms: i64,
    pub snapshot_rows: u64,
}

/// The offsets-topic record of a connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredOffsets {
    pub position: Position,
    /// When the record was written, ms since the epoch.
    pub stored_ms: i64,
    /// Commit time of the last transaction before `position`.
    pub commit_ts_ms: i64,
    #[serde(default)]
    pub tables: BTreeMap<String, TableStats>,
}

/// What a connector starts from: the last stored position and the schema history.
#[derive(Debug, Clone, Default)]
pub struct StoredState {
    pub offsets: Option<StoredOffsets>,
    /// In the order written; a source keeps the entries at or before its start position.
    pub schema_history: Vec<SchemaChange>,
}

impl StoredState {
    pub fn position(&self) -> Option<&Position> {
        self.offsets.as_ref().map(|o| &o.position)
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Create the offsets topic (compacted) and the schema-history topic (kept forever) unless
/// they exist. A broker that refuses the topic configs gets the topics without them.
pub async fn ensure_topics(cfg: &PipelineConfig) -> Result<(), PipelineError> {
    let admin: AdminClient<DefaultClientContext> = cfg
        .client_config()?
        .create()
        .map_err(PipelineError::Client)?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for (topic, configs) in [
        (&cfg.offsets_topic, [("cleanup.policy", "compact")]),
        (&cfg.schema_history_topic, [("retention.ms", "-1")]),
    ] {
        let with =
            NewTopic::new(topic, 1, TopicReplication::Fixed(1)).set(configs[0].0, configs[0].1);
        let plain = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
        let mut last = String::new();
        let mut done = false;
        for attempt in [with, plain] {
            let results = admin.create_topics([&attempt], &opts).await.map_err(|e| {
                PipelineError::CreateTopic {
                    topic: topic.clone(),
                    reason: e.to_string(),
                }
            })?;
            match results.into_iter().next() {
                Some(Ok(_)) | None => {
                    done = true;
                    break;
                }
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {
                    done = true;
                    break;
                }
                Some(Err((_, code))) => last = code.to_string(),
            }
        }
        if !done {
            return Err(PipelineError::CreateTopic {
                topic: topic.clone(),
                reason: last,
            });
        }
    }
    Ok(())
}

/// A record's key and value.
type KeyValue = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Every record of `topic` from the beginning to its current end, as (key, value).
/// Pause before asking again for metadata after a transport failure.
const METADATA_RETRY_PAUSE: Duration = Duration::from_millis(250);

fn read_topic(
    cfg: &PipelineConfig,
    topic: &str,
    deadline: Duration,
) -> Result<Vec<KeyValue>, PipelineError> {
    let err = |reason: String| PipelineError::LoadState {
        topic: topic.to_string(),
        reason,
    };
    let consumer: BaseConsumer = cfg
        .client_config()?
        .set("group.id", format!("qanat-cdc-load-{}", cfg.name))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(PipelineError::Client)?;
    // A connection that fails while the first request is out (a broker restarting, a busy
    // TLS handshake) is retried within the same ten seconds before the load gives up.
    let metadata_by = Instant::now() + Duration::from_secs(10);
    let metadata = loop {
        let left = metadata_by.saturating_duration_since(Instant::now());
        match consumer.fetch_metadata(Some(topic), left.max(Duration::from_millis(100))) {
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown,
            )) if Instant::now() + METADATA_RETRY_PAUSE < metadata_by => {
                std::thread::sleep(METADATA_RETRY_PAUSE);
            }
            other => break other.map_err(|e| err(e.to_string()))?,
        }
    };
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    if meta.error().is_some() || meta.partitions().is_empty() {
        return Ok(Vec::new());
    }
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in meta.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .map_err(|e| err(e.to_string()))?;
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(low))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl).map_err(|e| err(e.to_string()))?;
    let started = Instant::now();
    while !ends.is_empty() {
        if started.elapsed() > deadline {
            return Err(err(format!(
                "not read to its end within {}s",
                deadline.as_secs()
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => return Err(err(e.to_string())),
            Some(Ok(m)) => {
                out.push((m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)));
                if let Some(&end) = ends.get(&m.partition()) {
                    if m.offset() + 1 >= end {
                        ends.remove(&m.partition());
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The connector's stored position (latest record of its name in the offsets topic) and its
/// schema history. Blocking reads run off the async threads.
pub async fn load_state(cfg: &PipelineConfig) -> Result<StoredState, PipelineError> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Duration::from_secs(60);
        let mut state = StoredState::default();
        for (key, value) in read_topic(&cfg, &cfg.offsets_topic, deadline)? {
            if key.as_deref() != Some(cfg.name.as_bytes()) {
                continue;
            }
            state.offsets = match value {
                None => None,
                Some(v) => {
                    Some(
                        serde_json::from_slice(&v).map_err(|e| PipelineError::LoadState {
                            topic: cfg.offsets_topic.clone(),
                            reason: format!("record of {}: {e}", cfg.name),
                        })?,
                    )
                }
            };
        }
        for (_, value) in read_topic(&cfg, &cfg.schema_history_topic, deadline)? {
            let Some(v) = value else { continue };
            let change: SchemaChange =
                serde_json::from_slice(&v).map_err(|e| PipelineError::LoadState {
                    topic: cfg.schema_history_topic.clone(),
                    reason: e.to_string(),
                })?;
            state.schema_history.push(change);
        }
        Ok(state)
    })
    .await
    .map_err(|e| PipelineError::LoadState {
        topic: "offsets".into(),
        reason: e.to_string(),
    })?
}

/// The latest offsets record of every connector in `offsets_topic` (for `qanat cdc status`).
pub async fn read_all_offsets(
    bootstrap: &str,
    security: &qanat_config::KafkaSecurity,
    offsets_topic: &str,
) -> Result<BTreeMap<String, StoredOffsets>, PipelineError> {
    let mut cfg = PipelineConfig::new("status", bootstrap);
    cfg.security = security.clone();
    cfg.offsets_topic = offsets_topic.to_string();
    tokio::task::spawn_blocking(move || {
        let mut out = BTreeMap::new();
        for (key, value) in read_topic(&cfg, &cfg.offsets_topic, Duration::from_secs(60))? {
            let Some(key) = key.and_then(|k| String::from_utf8(k).ok()) else {
                continue;
            };
            match value.map(|v| serde_json::from_slice::<StoredOffsets>(&v)) {
                Some(Ok(record)) => {
                    out.insert(key, record);
                }
                Some(Err(e)) => {
                    return Err(PipelineError::LoadState {
                        topic: cfg.offsets_topic.clone(),
                        reason: format!("record of {key}: {e}"),
                    })
                }
                None => {
                    out.remove(&key);
                }
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| PipelineError::LoadState {
        topic: offsets_topic.to_string(),
        reason: e.to_string(),
    })?
}

/// Write `record` as the latest offsets record of connector `name` and wait for the bus to
/// acknowledge it (for tools that change a stopped connector's position).
pub async fn store_offsets(
    bootstrap: &str,
    security: &qanat_config::KafkaSecurity,
    offsets_topic: &str,
    name: &str,
    record: &StoredOffsets,
) -> Result<(), PipelineError> {
    let mut cfg = PipelineConfig::new(name, bootstrap);
    cfg.security = security.clone();
    cfg.offsets_topic = offsets_topic.to_string();
    ensure_topics(&cfg).await?;
    let bus = Bus::new(&cfg)?;
    let value = serde_json::to_vec(record).map_err(PipelineError::Encode)?;
    bus.send_acked(offsets_topic, Some(name.as_bytes()), Some(&value))
        .await
}

/// A resume point waiting for the records before it to be acknowledged.
struct Resume {
    /// Sequence number of the first record produced after it: everything below is before it.
    before: u64,
    position: Position,
    commit_ts_ms: i64,
    commit: bool,
}

/// Resume points in emission order, from the delivery loop to the acker.
#[derive(Default)]
struct ResumeQueue {
    queue: VecDeque<Resume>,
    /// The loop has ended: store the last acknowledged point and stop.
    closing: bool,
}

/// Shared with the acker for the offsets record.
type Stats = Arc<parking_lot::Mutex<BTreeMap<String, TableStats>>>;

/// The idempotent producer and what it has had acknowledged.
#[derive(Clone)]
struct Bus {
    producer: Arc<ThreadedProducer<AckContext>>,
    deliveries: Arc<Deliveries>,
}

impl Bus {
    fn new(cfg: &PipelineConfig) -> Result<Self, PipelineError> {
        let mut c = cfg.client_config()?;
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            // The source outruns the bus while catching up: a 16 MiB send queue keeps batches
            // full and the process small (librdkafka's default lets it grow to 1 GiB).
            .set("queue.buffering.max.kbytes", "16384");
        for (k, v) in &cfg.producer_properties {
            c.set(k, v);
        }
        let deliveries = Deliveries::new();
        let producer = c
            .create_with_context(AckContext(deliveries.clone()))
            .map_err(PipelineError::Client)?;
        Ok(Bus {
            producer: Arc::new(producer),
            deliveries,
        })
    }

    /// Hand a record to librdkafka, waiting while its queue is full; its sequence number.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Result<u64, PipelineError> {
        let seq = self.deliveries.take_seq();
        loop {
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(topic, seq as usize);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(seq),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Full because deliveries fail: stop rather than wait for ever.
                    if let Some(e) = self.failed() {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((error, _)) => {
                    // The number was taken: fail it, or whoever waits past it waits for ever.
                    self.deliveries.not_sent(seq, topic, error.clone());
                    return Err(PipelineError::Delivery {
                        topic: topic.to_string(),
                        error,
                    });
                }
            }
        }
    }

    /// Send a record and wait until it and everything before it is acknowledged.
    async fn send_acked(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Result<(), PipelineError> {
        let seq = self.send(topic, key, payload).await?;
        self.wait_acked(seq + 1).await
    }

    async fn wait_acked(&self, seq: u64) -> Result<(), PipelineError> {
        self.deliveries
            .wait_acked(seq)
            .await
            .map_err(|(topic, error)| PipelineError::Delivery { topic, error })
    }

    fn failed(&self) -> Option<PipelineError> {
        self.deliveries.with(|st| {
            st.failed
                .as_ref()
                .map(|(topic, error)| PipelineError::Delivery {
                    topic: topic.clone(),
                    error: error.clone(),
                })
        })
    }
}

struct Acker {
    bus: Bus,
    resumes: Arc<parking_lot::Mutex<ResumeQueue>>,
    name: String,
    offsets_topic: String,
    stats: Stats,
    stored: watch::Sender<Option<Position>>,
    store_interval: Duration,
    store_every_commits: u64,
}

impl Acker {
    async fn store(&self, position: &Position, commit_ts_ms: i64) -> Result<(), PipelineError> {
        let record = StoredOffsets {
            position: position.clone(),
            stored_ms: now_ms(),
            commit_ts_ms,
            tables: self.stats.lock().clone(),
        };
        let value = serde_json::to_vec(&record).map_err(PipelineError::Encode)?;
        self.bus
            .send_acked(
                &self.offsets_topic,
                Some(self.name.as_bytes()),
                Some(&value),
            )
            .await
            .map_err(|e| match e {
                PipelineError::Delivery { topic, error } => PipelineError::Store { topic, error },
                other => other,
            })?;
        metrics::counter!("qanat_cdc_positions_stored_total", "connector" => self.name.clone())
            .increment(1);
        metrics::gauge!("qanat_cdc_position_commit_ts_seconds", "connector" => self.name.clone())
            .set(commit_ts_ms as f64 / 1000.0);
        self.stored.send_replace(Some(position.clone()));
        Ok(())
    }

    /// Move acknowledged resume points out of the queue and store the latest one now and then.
    /// Wakes up when a store is due, when the resume point a due store waits for is
    /// acknowledged, and at shutdown; not per record.
    async fn run(self) -> Result<(), PipelineError> {
        let deliveries = self.bus.deliveries.clone();
        let lag = metrics::gauge!("qanat_cdc_lag_seconds", "connector" => self.name.clone());
        let mut unstored: Option<(Position, i64)> = None;
        let mut commits_since = 0u64;
        let mut last_store = Instant::now();
        loop {
            let notified = deliveries.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self.bus.failed() {
                return Err(e);
            }
            let acked = deliveries.with(|st| st.acked);
            let (closing, front, queued_commits) = {
                let mut q = self.resumes.lock();
                while q.queue.front().is_some_and(|r| r.before <= acked) {
                    if let Some(r) = q.queue.pop_front() {
                        commits_since += u64::from(r.commit);
                        unstored = Some((r.position, r.commit_ts_ms));
                    }
                }
                let queued = q.queue.iter().filter(|r| r.commit).count() as u64;
                (
                    q.closing && q.queue.is_empty(),
                    q.queue.front().map(|r| r.before),
                    queued,
                )
            };
            if let Some((_, ts)) = &unstored {
                lag.set((now_ms() - ts).max(0) as f64 / 1000.0);
            }
            let due_by_time = last_store.elapsed() >= self.store_interval;
            let due = closing || due_by_time || commits_since >= self.store_every_commits;
            if due && unstored.is_some() {
                if let Some((p, ts)) = unstored.take() {
                    self.store(&p, ts).await?;
                }
                last_store = Instant::now();
                commits_since = 0;
                continue;
            }
            if closing {
                return Ok(());
            }
            // Waiting: for the front point to be acknowledged when a store waits on it, else
            // until the next store is due (or something new to look at).
            let wants_front = due_by_time
                || commits_since + queued_commits >= self.store_every_commits
                || self.resumes.lock().closing;
            if let Some(seq) = front.filter(|_| wants_front) {
                let ready = deliveries.with(|st| {
                    deliveries.wake_at(st, seq);
                    st.acked >= seq
                });
                if ready {
                    continue;
                }
            }
            let wait = if unstored.is_some() || front.is_some() {
                self.store_interval
                    .saturating_sub(last_store.elapsed())
                    .max(Duration::from_millis(1))
            } else {
                Duration::from_secs(1)
            };
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }
}

/// What the delivery loop needs of one table, worked out on its first event: its collection
/// name, whether it is captured, its topic and its counters (a registry lookup with labels
/// costs more than the rest of an event's bookkeeping).
struct TableRoute {
    coll: String,
    captured: bool,
    topic: String,
    /// `qanat_cdc_events_total` by op (c, u, d, r, t).
    events: [Option<metrics::Counter>; 5],
    snapshot_rows: Option<metrics::Counter>,
    /// This table's figures for the offsets record, copied there by `flush_stats`.
    stats: TableStats,
    dirty: bool,
}

impl TableRoute {
    fn count(&mut self, connector: &str, op: Op, snapshot: bool) {
        let index = match op {
            Op::Create => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Read => 3,
            Op::Truncate => 4,
        };
        let coll = &self.coll;
        self.events[index]
            .get_or_insert_with(|| {
                metrics::counter!("qanat_cdc_events_total", "connector" => connector.to_string(),
                    "table" => coll.clone(), "op" => op.code())
            })
            .increment(1);
        if snapshot {
            self.snapshot_rows
                .get_or_insert_with(|| {
                    metrics::counter!("qanat_cdc_snapshot_rows_total",
                        "connector" => connector.to_string(), "table" => coll.clone())
                })
                .increment(1);
        }
    }
}

/// The [`TableRoute`] of every table seen, with the last one looked up kept aside: events of
/// one table come in runs, and a hit costs three string comparisons, no allocation.
/// A source's (db, schema, table) and the collection name they make.
type LastTable = (Arc<str>, Option<Arc<str>>, Arc<str>, String);

#[derive(Default)]
struct TableRoutes {
    by_coll: HashMap<String, TableRoute>,
    last: Option<LastTable>,
}

impl TableRoutes {
    fn get(
        &mut self,
        cfg: &PipelineConfig,
        source: &crate::event::SourceInfo,
    ) -> Option<&mut TableRoute> {
        let hit = matches!(&self.last, Some((db, schema, table, _))
            if *db == source.db && *schema == source.schema && *table == source.table);
        if !hit {
            let coll =
                PipelineConfig::collection(&source.db, source.schema.as_deref(), &source.table);
            if !self.by_coll.contains_key(&coll) {
                let route = TableRoute {
                    coll: coll.clone(),
                    captured: cfg.captures(&coll),
                    topic: cfg.topic_for(&coll),
                    events: Default::default(),
                    snapshot_rows: None,
                    stats: TableStats::default(),
                    dirty: false,
                };
                self.by_coll.insert(coll.clone(), route);
            }
            self.last = Some((
                source.db.clone(),
                source.schema.clone(),
                source.table.clone(),
                coll,
            ));
        }
        let (_, _, _, coll) = self.last.as_ref()?;
        self.by_coll.get_mut(coll)
    }

    /// Add the figures counted since the last flush to the shared copy.
    fn flush_stats(&mut self, stats: &Stats) {
        let mut shared = stats.lock();
        for route in self.by_coll.values_mut().filter(|r| r.dirty) {
            let t = shared.entry(route.coll.clone()).or_default();
            t.events += route.stats.events;
            t.snapshot_rows += route.stats.snapshot_rows;
            t.last_ts_ms = route.stats.last_ts_ms;
            route.stats = TableStats::default();
            route.dirty = false;
        }
    }
}

/// Per-transaction counters for the metadata topic and the events' `transaction` block.
#[derive(Default)]
struct OpenTransaction {
    id: String,
    total: u64,
    per_table: BTreeMap<String, u64>,
}

/// Run one connector until `shutdown` resolves (then every produced event is awaited and the
/// last acked position stored) or an error. The caller creates `source` at the position from
/// [`load_state`].
pub async fn run<S: Source>(
    mut source: S,
    cfg: &PipelineConfig,
    initial: &StoredState,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    ensure_topics(cfg).await?;
    let bus = Bus::new(cfg)?;
    let stats: Stats = Arc::new(parking_lot::Mutex::new(
        initial
            .offsets
            .as_ref()
            .map(|o| o.tables.clone())
            .unwrap_or_default(),
    ));
    let (stored_tx, mut stored_rx) = watch::channel(None);
    let resumes = Arc::new(parking_lot::Mutex::new(ResumeQueue::default()));
    let acker = Acker {
        bus: bus.clone(),
        resumes: resumes.clone(),
        name: cfg.name.clone(),
        offsets_topic: cfg.offsets_topic.clone(),
        stats: stats.clone(),
        stored: stored_tx,
        store_interval: cfg.store_interval,
        store_every_commits: cfg.store_every_commits.max(1),
    };
    let mut acker = tokio::spawn(acker.run());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut routes = TableRoutes::default();
    let mut buffers = RecordBuffers::default();
    let mut tx_open: Option<OpenTransaction> = None;
    let mut tx_ts = 0i64;
    let mut stats_flushed = Instant::now();
    let name_metric = cfg.name.clone();
    tracing::info!(connector = %cfg.name, "connector streaming");

    let outcome: Result<(), PipelineError> = loop {
        // Changes already decoded first; shutdown and the acker are looked at whenever the
        // source has to wait (at the latest after one log record's changes).
        let change = match source.ready() {
            Some(change) => Ok(change),
            None => tokio::select! {
                change = source.next() => change,
                () = &mut shutdown => break Ok(()),
                joined = &mut acker => {
                    return match joined {
                        Ok(Err(e)) => Err(e),
                        _ => Err(PipelineError::AckerGone),
                    };
                }
            },
        };
        let change = match change {
            Ok(c) => c,
            Err(e) => break Err(PipelineError::Source(Box::new(e))),
        };
        let mut resume = None;
        let step = async {
            match change {
                Change::Begin { tx_id, ts_ms } => {
                    tx_ts = ts_ms;
                    if let Some(topic) = &cfg.transaction_topic {
                        let value = json!({"status": "BEGIN", "id": tx_id, "event_count": null,
                            "data_collections": null, "ts_ms": ts_ms});
                        publish_marker(&bus, topic, &tx_id, &value).await?;
                    }
                    if cfg.transaction_topic.is_some() {
                        tx_open = Some(OpenTransaction {
                            id: tx_id,
                            ..OpenTransaction::default()
                        });
                    }
                }
                Change::Row(mut event) => {
                    let Some(route) = routes.get(cfg, &event.source) else {
                        return Ok(());
                    };
                    if !route.captured {
                        return Ok(());
                    }
                    let coll = route.coll.as_str();
                    if let Some(b) = &mut event.before {
                        cfg.shape_row(coll, b);
                    }
                    if let Some(a) = &mut event.after {
                        cfg.shape_row(coll, a);
                    }
                    if !cfg.masks.is_empty() {
                        cfg.mask_row(coll, &mut event.key);
                    }
                    // Snapshot reads emitted inside a transaction (an incremental snapshot's
                    // chunk, at its high watermark) are not the transaction's changes: counted
                    // in its END marker they would make a consumer wait for events it never
                    // gets from that transaction.
                    let snapshot_read = event.source.snapshot != SnapshotMark::No;
                    if cfg.transaction_topic.is_some() && !snapshot_read {
                        if let Some(open) = &mut tx_open {
                            open.total += 1;
                            let n = open.per_table.entry(coll.to_string()).or_default();
                            *n += 1;
                            event.transaction = Some(TransactionRef {
                                id: open.id.clone(),
                                total_order: open.total,
                                data_collection_order: *n,
                            });
                        }
                    }
                    produce_event(&bus, &route.topic, &event, cfg.tombstones, &mut buffers).await?;
                    route.stats.events += 1;
                    route.stats.last_ts_ms = event.source.ts_ms;
                    route.stats.snapshot_rows += u64::from(snapshot_read);
                    route.dirty = true;
                    route.count(&name_metric, event.op, snapshot_read);
                }
                Change::Schema(schema) => {
                    let coll = PipelineConfig::collection(
                        &schema.db,
                        schema.schema.as_deref(),
                        &schema.table,
                    );
                    let value = serde_json::to_vec(&schema).map_err(PipelineError::Encode)?;
                    // Acknowledged before anything after it is read (see the module doc).
                    bus.send_acked(
                        &cfg.schema_history_topic,
                        Some(coll.as_bytes()),
                        Some(&value),
                    )
                    .await?;
                    tracing::info!(connector = %cfg.name, table = %coll,
                        ddl = schema.ddl.as_deref().unwrap_or(""), "schema change recorded");
                }
                Change::Commit {
                    tx_id, resume: at, ..
                } => {
                    let open = tx_open.take();
                    if let Some(topic) = &cfg.transaction_topic {
                        let open = open.unwrap_or_default();
                        let collections: Vec<Json> = open
                            .per_table
                            .iter()
                            .map(|(c, n)| json!({"data_collection": c, "event_count": n}))
                            .collect();
                        let value = json!({"status": "END", "id": tx_id, "event_count": open.total,
                            "data_collections": collections, "ts_ms": tx_ts});
                        publish_marker(&bus, topic, &tx_id, &value).await?;
                    }
                    resume = at.map(|at| (at, tx_ts, true));
                }
                Change::Heartbeat { resume: at, ts_ms } => {
                    resume = Some((at, ts_ms, false));
                }
            }
            Ok::<(), PipelineError>(())
        };
        if let Err(e) = step.await {
            break Err(e);
        }
        if let Some((position, commit_ts_ms, commit)) = resume {
            // Table figures go to the offsets record's copy now and then, not per event.
            if !commit || stats_flushed.elapsed() >= Duration::from_millis(50) {
                routes.flush_stats(&stats);
                stats_flushed = Instant::now();
            }
            let before = bus.deliveries.next_seq();
            let mut q = resumes.lock();
            let was_empty = q.queue.is_empty();
            q.queue.push_back(Resume {
                before,
                position,
                commit_ts_ms,
                commit,
            });
            drop(q);
            if was_empty {
                bus.deliveries.wake();
            }
        }
        if stored_rx.has_changed().unwrap_or(false) {
            let stored = stored_rx.borrow_and_update().clone();
            if let Some(position) = stored {
                if let Err(e) = source.acknowledge(&position).await {
                    break Err(PipelineError::Source(Box::new(e)));
                }
            }
        }
    };
    // Drain: everything produced is awaited and the last acked position stored, also when the
    // source failed (what was produced before the failure is not lost or repeated needlessly).
    routes.flush_stats(&stats);
    resumes.lock().closing = true;
    bus.deliveries.wake();
    let mut drained = match acker.await {
        Ok(r) => r,
        Err(_) => Err(PipelineError::AckerGone),
    };
    if outcome.is_ok() && drained.is_ok() {
        // Also the records after the last resume point (a transaction cut by the shutdown):
        // not needed for the position, but sent rather than purged with the producer.
        let all = bus.deliveries.next_seq();
        drained = match tokio::time::timeout(Duration::from_secs(30), bus.wait_acked(all)).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        };
    }
    let last_stored = stored_rx.borrow_and_update().clone();
    if let Some(position) = last_stored {
        if outcome.is_ok() {
            source
                .acknowledge(&position)
                .await
                .map_err(|e| PipelineError::Source(Box::new(e)))?;
        }
    }
    outcome.and(drained)
}

/// Publish a transaction marker (BEGIN or END), keyed by the transaction id; its delivery is
/// tracked like any event's.
async fn publish_marker(
    bus: &Bus,
    topic: &str,
    tx_id: &str,
    value: &Json,
) -> Result<(), PipelineError> {
    let key = json!({ "id": tx_id }).to_string();
    bus.send(
        topic,
        Some(key.as_bytes()),
        Some(value.to_string().as_bytes()),
    )
    .await?;
    Ok(())
}

/// Reused buffers for one record's key and value (librdkafka copies them on enqueue).
#[derive(Default)]
struct RecordBuffers {
    key: Vec<u8>,
    value: Vec<u8>,
}

async fn produce_event(
    bus: &Bus,
    topic: &str,
    event: &ChangeEvent,
    tombstones: bool,
    buffers: &mut RecordBuffers,
) -> Result<(), PipelineError> {
    buffers.key.clear();
    buffers.value.clear();
    let has_key = event
        .write_key(&mut buffers.key)
        .map_err(PipelineError::Encode)?;
    event
        .write_envelope(now_ms(), &mut buffers.value)
        .map_err(PipelineError::Encode)?;
    let key = has_key.then_some(buffers.key.as_slice());
    bus.send(topic, key, Some(&buffers.value)).await?;
    if tombstones && event.op == Op::Delete && key.is_some() {
        bus.send(topic, key, None).await?;
    }
    Ok(())
}

mod delivery;
#[cfg(test)]
mod tests;
