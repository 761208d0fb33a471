//! The bus (a Kafka-protocol broker such as Qanat's own) as a source and as a sink.
//!
//! Address: `kafka://host:9092[,host2:9092]/topic?from=…&to=…&columns=…&key=…`.
//! - As a source, a range of the topic: `from` is `earliest` (default), `offset:N` or
//!   `time:RFC3339` (the first record at or after that instant); `to` is `end` (default: the
//!   end as it is when the job is planned), `offset:N` (exclusive) or `time:RFC3339`
//!   (exclusive). Offsets apply to every partition. Without `columns`, each record is a row
//!   of `_partition, _offset, _timestamp, _key, _value` (key and value as UTF-8 text); with
//!   `columns=id:int64,name:utf8,amount:decimal(12,2)` each value is a JSON object whose
//!   fields are those columns (types by their canonical names; binary as hex), and `key=id`
//!   names the primary key. A record that does not parse is a dirty record.
//! - As a sink, one record per row: the value a JSON object of the row (integers, booleans
//!   and finite floats as JSON numbers and booleans, everything else in its canonical string
//!   form, NULL as null), the key the primary key's value (a JSON array for a composite key;
//!   no key without one).
//!
//! Security: `[sync.security]` of the job file (a `qanat_config::KafkaSecurity`, with the
//! command's flags over it) becomes [`ClientProperties`], set on every client of every
//! `kafka://` address of the job; without it the clients speak PLAINTEXT.
//!
//! Invariants: a source split is one partition's offset range `[start, end)`, fixed at
//! planning, so a retried or verified split reads the same records. A sink split's records
//! are all acknowledged (`acks=all`) before the split finishes; a retried split may produce
//! its records again (at least once), which a keyed, compacted topic absorbs.

use std::sync::Mutex;
use std::time::Duration;

use arrow_array::RecordBatch;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::dirty::DirtyLog;
use crate::plugin::{Reader, Rejected, SplitWriter, WriteMode, Writer};
use crate::split::{ShardRef, Split};
use crate::types::{cell, BatchBuilder, CanonicalType, CellRef, Column, TableSchema};
use crate::SyncError;

/// How long a metadata or offset request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Without a record for this long, a source split checks whether its range is exhausted.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// A source split fails when the broker delivers nothing for this long while records remain.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One end of a topic range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Earliest,
    End,
    Offset(i64),
    /// Milliseconds since the epoch.
    Time(i64),
}

/// librdkafka properties set on every client of a `kafka://` address (security settings,
/// password included: `Debug` leaves the values out).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientProperties(pub Vec<(String, String)>);

impl std::fmt::Debug for ClientProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

/// A topic and how its records map to rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusSpec {
    pub brokers: String,
    pub topic: String,
    pub from: Bound,
    pub to: Bound,
    /// Typed JSON fields; `None` is the raw record form.
    pub columns: Option<Vec<(String, CanonicalType)>>,
    pub key: Vec<String>,
    /// Set on every client; empty from [`BusSpec::from_parts`].
    pub client: ClientProperties,
}

fn bound(v: &str, key: &str) -> Result<Bound, String> {
    let bad = || {
        format!("{key}={v:?}: expected earliest, end, offset:N or time:RFC3339 (e.g. time:2026-11-29T00:00:00Z)")
    };
    match v {
        "earliest" | "beginning" => Ok(Bound::Earliest),
        "end" | "latest" => Ok(Bound::End),
        _ => {
            if let Some(n) = v.strip_prefix("offset:") {
                let n: i64 = n.parse().map_err(|_| bad())?;
                if n < 0 {
                    return Err(bad());
                }
                Ok(Bound::Offset(n))
            } else if let Some(t) = v.strip_prefix("time:") {
                let t = chrono::DateTime::parse_from_rfc3339(t).map_err(|_| bad())?;
                Ok(Bound::Time(t.timestamp_millis()))
            } else {
                Err(bad())
            }
        }
    }
}

impl BusSpec {
    /// From the parts of a `kafka://` address (`brokers`, `topic` and the query).
    pub fn from_parts(brokers: &str, topic: &str, query: Option<&str>) -> Result<Self, String> {
        if brokers.is_empty() {
            return Err("missing broker host:port".into());
        }
        let topic_ok = !topic.is_empty()
            && topic.len() <= 249
            && topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !topic_ok {
            return Err(format!(
                "topic {topic:?}: expected 1–249 characters of [A-Za-z0-9._-]"
            ));
        }
        let mut spec = BusSpec {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            from: Bound::Earliest,
            to: Bound::End,
            columns: None,
            key: Vec::new(),
            client: ClientProperties::default(),
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: expected key=value"))?;
            match k {
                "from" => spec.from = bound(v, k)?,
                "to" => spec.to = bound(v, k)?,
                "columns" => {
                    let mut cols = Vec::new();
                    // `decimal(12,2)` holds a comma: split on commas outside parentheses.
                    let mut depth = 0;
                    let mut start = 0;
                    let mut parts = Vec::new();
                    for (i, c) in v.char_indices() {
                        match c {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            ',' if depth == 0 => {
                                parts.push(&v[start..i]);
                                start = i + 1;
                            }
                            _ => {}
                        }
                    }
                    parts.push(&v[start..]);
                    for p in parts {
                        let (name, ty) = p
                            .split_once(':')
                            .ok_or_else(|| format!("columns: {p:?} is not name:type"))?;
                        let ty = crate::files::canonical_from_name(ty).ok_or_else(|| {
                            format!(
                                "columns: unknown type {ty:?} of {name} (expected bool, int64, \
                                 float64, decimal(P,S), utf8, binary, date, time, timestamp, \
                                 timestamptz)"
                            )
                        })?;
                        if name.is_empty() || cols.iter().any(|(n, _)| n == name) {
                            return Err(format!("columns: empty or repeated name {name:?}"));
                        }
                        cols.push((name.to_string(), ty));
                    }
                    spec.columns = Some(cols);
                }
                "key" => {
                    spec.key = v.split(',').map(str::to_string).collect();
                }
                _ => {
                    return Err(format!(
                        "unknown key {k:?} (expected from, to, columns or key)"
                    ))
                }
            }
        }
        if let Some(cols) = &spec.columns {
            if let Some(k) = spec.key.iter().find(|k| !cols.iter().any(|(n, _)| n == *k)) {
                return Err(format!("key {k:?} is not one of the columns"));
            }
        } else if !spec.key.is_empty() {
            return Err("key needs columns".into());
        }
        if matches!(spec.from, Bound::End) {
            return Err("from=end reads nothing".into());
        }
        Ok(spec)
    }

    pub fn describe(&self) -> String {
        format!("kafka {}/{}", self.brokers, self.topic)
    }

    fn schema(&self) -> TableSchema {
        let col = |name: &str, ty, nullable| Column {
            name: name.to_string(),
            ty,
            nullable,
            native: "record".into(),
        };
        match &self.columns {
            None => TableSchema {
                columns: vec![
                    col("_partition", CanonicalType::Int64, false),
                    col("_offset", CanonicalType::Int64, false),
                    col("_timestamp", CanonicalType::TimestampTz, true),
                    col("_key", CanonicalType::Utf8, true),
                    col("_value", CanonicalType::Utf8, true),
                ],
                primary_key: vec!["_partition".into(), "_offset".into()],
            },
            Some(cols) => TableSchema {
                columns: cols
                    .iter()
                    .map(|(n, t)| Column {
                        name: n.clone(),
                        ty: *t,
                        nullable: !self.key.contains(n),
                        native: "json".into(),
                    })
                    .collect(),
                primary_key: self.key.clone(),
            },
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("socket.timeout.ms", "30000");
        for (k, v) in &self.client.0 {
            c.set(k, v);
        }
        c
    }

    /// This spec with `client` set on its clients.
    pub fn with_client(mut self, client: &ClientProperties) -> Self {
        self.client = client.clone();
        self
    }
}

fn bus_err(context: impl Into<String>, source: KafkaError) -> SyncError {
    SyncError::Bus {
        context: context.into(),
        source,
    }
}

/// One partition's planned range.
#[derive(Debug, Clone, Copy)]
struct Range {
    partition: i32,
    start: i64,
    end: i64,
}

/// A topic range read as a table.
pub struct BusSource {
    spec: BusSpec,
    ranges: Mutex<Vec<Range>>,
}

impl BusSource {
    pub fn new(spec: BusSpec) -> Self {
        BusSource {
            spec,
            ranges: Mutex::default(),
        }
    }

    fn consumer<C: rdkafka::config::FromClientConfig>(&self) -> Result<C, SyncError> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut config = self.spec.client_config();
        qanat_config::backlog_reader(&mut config)
            .set(
                "group.id",
                format!("qanat-sync-{}-{nonce}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .map_err(|e| {
                bus_err(
                    format!("creating a consumer for {}", self.spec.describe()),
                    e,
                )
            })
    }

    /// Each partition's `[start, end)` for the spec's bounds, as the broker holds it now.
    fn plan(&self) -> Result<Vec<Range>, SyncError> {
        let topic = &self.spec.topic;
        let consumer: BaseConsumer = self.consumer()?;
        let md = consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(|e| {
                bus_err(
                    format!("fetching the metadata of {}", self.spec.describe()),
                    e,
                )
            })?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| SyncError::UnknownTable {
                table: format!("{} (no such topic)", self.spec.describe()),
            })?;
        let mut ranges = Vec::new();
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), REQUEST_TIMEOUT)
                .map_err(|e| bus_err(format!("offsets of {topic}/{}", p.id()), e))?;
            ranges.push(Range {
                partition: p.id(),
                start: low,
                end: high,
            });
        }
        let by_time = |ms: i64| -> Result<Vec<i64>, SyncError> {
            let mut tpl = TopicPartitionList::new();
            for r in &ranges {
                tpl.add_partition_offset(topic, r.partition, Offset::Offset(ms))
                    .map_err(|e| bus_err("building a time lookup", e))?;
            }
            let found = consumer
                .offsets_for_times(tpl, REQUEST_TIMEOUT)
                .map_err(|e| bus_err(format!("looking up {topic} offsets by time"), e))?;
            Ok(ranges
                .iter()
                .map(|r| {
                    match found.find_partition(topic, r.partition).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        // No record at or after the instant.
                        _ => r.end,
                    }
                })
                .collect())
        };
        let starts = match self.spec.from {
            Bound::Earliest | Bound::End => None,
            Bound::Offset(o) => Some(vec![o; ranges.len()]),
            Bound::Time(ms) => Some(by_time(ms)?),
        };
        let ends = match self.spec.to {
            Bound::End | Bound::Earliest => None,
            Bound::Offset(o) => Some(vec![o; ranges.len()]),
            Bound::Time(ms) => Some(by_time(ms)?),
        };
        for (i, r) in ranges.iter_mut().enumerate() {
            let (low, high) = (r.start, r.end);
            if let Some(s) = &starts {
                r.start = s[i].clamp(low, high);
            }
            if let Some(e) = &ends {
                r.end = e[i].clamp(low, high);
            }
            r.end = r.end.max(r.start);
        }
        Ok(ranges)
    }

    fn range(&self, split: &Split) -> Result<Range, SyncError> {
        let index = split.shard.as_ref().map(|s| s.index);
        self.ranges
            .lock()
            .map_err(|_| SyncError::Internal("bus ranges poisoned".into()))?
            .get(index.unwrap_or(usize::MAX))
            .copied()
            .ok_or_else(|| SyncError::Internal(format!("split {} has no range", split.describe())))
    }

    /// The text cells of one record, or why it is not a row.
    fn cells<M: Message>(&self, m: &M) -> Result<Vec<Option<Vec<u8>>>, String> {
        let Some(cols) = &self.spec.columns else {
            let text = |b: Option<&[u8]>| -> Result<Option<Vec<u8>>, String> {
                match b {
                    None => Ok(None),
                    Some(b) => std::str::from_utf8(b)
                        .map(|_| Some(b.to_vec()))
                        .map_err(|_| "key or value is not UTF-8".to_string()),
                }
            };
            let ts = m.timestamp().to_millis().map(|ms| {
                crate::types::CellRef::TimestampTz(ms * 1000)
                    .render()
                    .unwrap_or_default()
                    .into_bytes()
            });
            return Ok(vec![
                Some(m.partition().to_string().into_bytes()),
                Some(m.offset().to_string().into_bytes()),
                ts,
                text(m.key())?,
                text(m.payload())?,
            ]);
        };
        let payload = m.payload().ok_or("a record without a value")?;
        let v: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| format!("value is not JSON: {e}"))?;
        let obj = v.as_object().ok_or("value is not a JSON object")?;
        cols.iter()
            .map(|(name, ty)| {
                Ok(match obj.get(name) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) if *ty == CanonicalType::Binary => {
                        Some(unhex(s).ok_or_else(|| format!("column {name}: {s:?} is not hex"))?)
                    }
                    Some(serde_json::Value::String(s)) => Some(s.clone().into_bytes()),
                    Some(other) => Some(other.to_string().into_bytes()),
                })
            })
            .collect()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            Some((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

#[async_trait::async_trait]
impl Reader for BusSource {
    fn name(&self) -> String {
        self.spec.describe()
    }

    fn server(&self) -> String {
        self.spec.brokers.clone()
    }

    async fn schema(&self) -> Result<TableSchema, SyncError> {
        Ok(self.spec.schema())
    }

    async fn estimate_rows(&self) -> Option<u64> {
        let ranges = self.ranges.lock().ok()?;
        Some(ranges.iter().map(|r| (r.end - r.start).max(0) as u64).sum())
    }

    async fn splits(
        &self,
        _schema: &TableSchema,
        split_pk: Option<&str>,
        _max_splits: usize,
    ) -> Result<Vec<Split>, SyncError> {
        if let Some(c) = split_pk {
            return Err(SyncError::Invalid(format!(
                "{}: a topic splits by partition, not by {c}",
                self.name()
            )));
        }
        let ranges = tokio::task::block_in_place(|| self.plan())?;
        let splits = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| Split {
                shard: Some(ShardRef {
                    index: i,
                    name: format!("{}/{}", self.spec.topic, r.partition),
                    column: None,
                }),
                ..Split::whole(i)
            })
            .collect();
        tracing::info!(
            topic = %self.spec.topic,
            records = ranges.iter().map(|r| r.end - r.start).sum::<i64>(),
            "planned topic range"
        );
        *self
            .ranges
            .lock()
            .map_err(|_| SyncError::Internal("bus ranges poisoned".into()))? = ranges;
        Ok(splits)
    }

    async fn read(
        &self,
        schema: &TableSchema,
        split: &Split,
        batch_rows: usize,
        out: mpsc::Sender<RecordBatch>,
        dirty: &DirtyLog,
    ) -> Result<(), SyncError> {
        let r = self.range(split)?;
        if r.start >= r.end {
            return Ok(());
        }
        let topic = &self.spec.topic;
        let context = || format!("reading {topic}/{} [{}, {})", r.partition, r.start, r.end);
        let consumer: StreamConsumer = self.consumer()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.start))
            .map_err(|e| bus_err(context(), e))?;
        consumer.assign(&tpl).map_err(|e| bus_err(context(), e))?;
        let mut builder = BatchBuilder::new(schema);
        let mut last_progress = std::time::Instant::now();
        loop {
            // The message borrows the consumer and is not `Send`: it is used up inside the
            // match, before the next await.
            let offset = match tokio::time::timeout(IDLE_CHECK, consumer.recv()).await {
                Ok(Ok(m)) => {
                    last_progress = std::time::Instant::now();
                    if m.offset() >= r.end {
                        break;
                    }
                    match self.cells(&m) {
                        Ok(cells) => {
                            let refs: Vec<Option<&[u8]>> =
                                cells.iter().map(|c| c.as_deref()).collect();
                            if let Err(e) = builder.push_text_row(&refs) {
                                dirty.record(split.index, &e.to_string(), raw(&m))?;
                            }
                        }
                        Err(reason) => dirty.record(split.index, &reason, raw(&m))?,
                    }
                    m.offset()
                }
                Ok(Err(KafkaError::PartitionEOF(_))) | Err(_) => {
                    // Compaction or transaction markers can leave the range's last offsets
                    // without records: the position says whether the range is done.
                    let position = consumer
                        .position()
                        .ok()
                        .and_then(|p| p.find_partition(topic, r.partition).map(|e| e.offset()));
                    if matches!(position, Some(Offset::Offset(o)) if o >= r.end) {
                        break;
                    }
                    if last_progress.elapsed() > STALL_TIMEOUT {
                        return Err(SyncError::Invalid(format!(
                            "{}: no record for {STALL_TIMEOUT:?} before offset {}",
                            context(),
                            r.end
                        )));
                    }
                    continue;
                }
                Ok(Err(e)) => return Err(bus_err(context(), e)),
            };
            if (builder.rows() >= batch_rows || builder.bytes() >= crate::job::BATCH_BYTES)
                && out.send(builder.finish()).await.is_err()
            {
                return Ok(());
            }
            if offset + 1 >= r.end {
                break;
            }
        }
        if builder.rows() > 0 {
            let _ = out.send(builder.finish()).await;
        }
        Ok(())
    }
}

fn raw<M: Message>(m: &M) -> serde_json::Value {
    let text = |b: Option<&[u8]>| {
        b.map_or(serde_json::Value::Null, |b| {
            serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
        })
    };
    serde_json::json!({
        "partition": m.partition(),
        "offset": m.offset(),
        "key": text(m.key()),
        "value": text(m.payload()),
    })
}

/// A topic written as JSON rows keyed by primary key.
pub struct BusSink {
    spec: BusSpec,
    key: Mutex<Vec<usize>>,
    producer: Mutex<Option<FutureProducer>>,
}

impl BusSink {
    pub fn new(spec: BusSpec) -> Self {
        BusSink {
            spec,
            key: Mutex::default(),
            producer: Mutex::default(),
        }
    }
}

/// A row as a JSON object.
pub fn row_json(batch: &RecordBatch, row: usize) -> serde_json::Value {
    let schema = batch.schema();
    let mut obj = serde_json::Map::with_capacity(batch.num_columns());
    for (f, a) in schema.fields().iter().zip(batch.columns()) {
        obj.insert(f.name().clone(), cell_json(cell(a.as_ref(), row)));
    }
    serde_json::Value::Object(obj)
}

fn cell_json(c: CellRef<'_>) -> serde_json::Value {
    match c {
        CellRef::Null => serde_json::Value::Null,
        CellRef::Bool(b) => serde_json::Value::Bool(b),
        CellRef::Int(i) => serde_json::Value::from(i),
        CellRef::Float(f) if f.is_finite() => serde_json::Value::from(f),
        other => other
            .render()
            .map_or(serde_json::Value::Null, serde_json::Value::String),
    }
}

#[async_trait::async_trait]
impl Writer for BusSink {
    fn name(&self) -> String {
        self.spec.describe()
    }

    async fn prepare(&self, schema: &TableSchema, mode: WriteMode) -> Result<(), SyncError> {
        if mode == WriteMode::Truncate {
            return Err(SyncError::Invalid(format!(
                "{}: a topic cannot be truncated (use insert or upsert)",
                self.name()
            )));
        }
        let key = schema
            .primary_key
            .iter()
            .map(|k| {
                schema
                    .columns
                    .iter()
                    .position(|c| &c.name == k)
                    .ok_or_else(|| SyncError::UnknownColumn {
                        table: self.name(),
                        column: k.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let producer: FutureProducer = self
            .spec
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("compression.type", "zstd")
            .create()
            .map_err(|e| bus_err(format!("creating a producer for {}", self.name()), e))?;
        let topic = self.spec.topic.clone();
        let md = tokio::task::block_in_place(|| {
            producer
                .client()
                .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
        })
        .map_err(|e| bus_err(format!("fetching the metadata of {}", self.name()), e))?;
        let known = md
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !known {
            return Err(SyncError::UnknownTable {
                table: format!("{} (no such topic)", self.name()),
            });
        }
        *self
            .key
            .lock()
            .map_err(|_| SyncError::Internal("bus sink poisoned".into()))? = key;
        *self
            .producer
            .lock()
            .map_err(|_| SyncError::Internal("bus sink poisoned".into()))? = Some(producer);
        Ok(())
    }

    async fn open(&self, _split: &Split, _attempt: u32) -> Result<Box<dyn SplitWriter>, SyncError> {
        let producer = self
            .producer
            .lock()
            .map_err(|_| SyncError::Internal("bus sink poisoned".into()))?
            .clone()
            .ok_or_else(|| SyncError::Internal("open before prepare".into()))?;
        let key = self
            .key
            .lock()
            .map_err(|_| SyncError::Internal("bus sink poisoned".into()))?
            .clone();
        Ok(Box::new(BusSplitWriter {
            producer,
            topic: self.spec.topic.clone(),
            key,
        }))
    }

    async fn commit(&self) -> Result<(), SyncError> {
        Ok(())
    }

    async fn abort(&self) -> Option<String> {
        Some(format!(
            "{}: records already acknowledged stay in the topic",
            self.name()
        ))
    }

    fn verifier(&self) -> Option<std::sync::Arc<dyn Reader>> {
        None
    }
}

struct BusSplitWriter {
    producer: FutureProducer,
    topic: String,
    key: Vec<usize>,
}

#[async_trait::async_trait]
impl SplitWriter for BusSplitWriter {
    async fn write(&mut self, batch: &RecordBatch) -> Result<Vec<Rejected>, SyncError> {
        let mut pending: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            let value = row_json(batch, row).to_string();
            let key = match self.key.as_slice() {
                [] => None,
                [k] => cell(batch.column(*k).as_ref(), row).render(),
                keys => Some(
                    serde_json::Value::Array(
                        keys.iter()
                            .map(|k| cell_json(cell(batch.column(*k).as_ref(), row)))
                            .collect(),
                    )
                    .to_string(),
                ),
            };
            loop {
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&self.topic).payload(value.as_bytes());
                if let Some(k) = &key {
                    record = record.key(k.as_bytes());
                }
                match self.producer.send_result(record) {
                    Ok(f) => {
                        pending.push((row, f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => return Err(bus_err(format!("producing to {}", self.topic), e)),
                }
            }
        }
        // Each batch is acknowledged before the next is read: bounded memory, and a failed
        // split has nothing in flight.
        let mut rejected = Vec::new();
        for (row, f) in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    _,
                ))) => {
                    rejected.push((row, "record larger than the broker accepts".to_string()));
                }
                Ok(Err((e, _))) => return Err(bus_err(format!("producing to {}", self.topic), e)),
                Err(_) => {
                    return Err(bus_err(
                        format!("producing to {}", self.topic),
                        KafkaError::Canceled,
                    ))
                }
            }
        }
        Ok(rejected)
    }

    async fn finish(self: Box<Self>) -> Result<(), SyncError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_say_why() {
        let s = BusSpec::from_parts(
            "h:9092",
            "orders",
            Some("from=offset:10&to=time:2026-11-29T00:00:00Z&columns=id:int64,amt:decimal(12,2)&key=id"),
        );
        assert!(
            matches!(&s, Ok(s) if s.from == Bound::Offset(10)
                && s.to == Bound::Time(1_795_910_400_000)
                && s.columns.as_ref().is_some_and(|c| c.len() == 2
                    && c[1].1 == CanonicalType::Decimal { precision: 12, scale: 2 })
                && s.key == ["id"]),
            "{s:?}"
        );
        for (q, needle) in [
            ("from=yesterday", "from="),
            ("columns=id:integer", "unknown type"),
            ("columns=id:int64&key=x", "key \"x\""),
            ("key=id", "key needs columns"),
            ("nope=1", "unknown key"),
            ("from=end", "reads nothing"),
        ] {
            let e = BusSpec::from_parts("h:9092", "t", Some(q));
            assert!(matches!(&e, Err(e) if e.contains(needle)), "{q}: {e:?}");
        }
        assert!(BusSpec::from_parts("h:9092", "bad/topic", None).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsing_garbage_never_panics(q in ".{0,80}") {
            let _ = BusSpec::from_parts("h:1", "t", Some(&q));
        }
    }
}
