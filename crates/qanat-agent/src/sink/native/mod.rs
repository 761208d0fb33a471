//! The native producer: the loop's records encoded straight into Kafka RecordBatches, sent
//! by one sender thread over kafka-protocol. librdkafka allocates per record and per header,
//! copies every payload and looks the topic up per send; here a record costs a partition
//! choice and a copy into its partition's open batch.
//!
//! Shape: the loop (`send`) appends to the open batch of the record's partition (CRC-32 of
//! the key modulo the partition count, librdkafka's default partitioner, so a file keeps its
//! partition whichever sink ships it). A batch closes at `batch_bytes`, or after
//! `batch_age_ms` once its partition has nothing in flight or queued (until then it keeps
//! filling, so batches grow with the round trip), and queues for its partition. The sender
//! thread asks metadata (leaders, across brokers), an idempotent producer id
//! (InitProducerId), compresses and stamps the head batch of each partition and sends one
//! Produce request per leader (`acks=all`), then applies the answers.
//!
//! Invariants:
//! * At most one batch per partition is in flight; a batch that failed retriably goes back to
//!   the head of its queue and is re-sent with the same bytes, so the order of a partition is
//!   the order of `send`, and the broker drops a repeat by its sequence (at-least-once without
//!   duplicates from retries).
//! * Sequences of a partition follow each other from 0 per producer id; a gap the broker
//!   reports (out of order, unknown producer, fenced epoch), a refusal that is not retriable,
//!   or a batch older than `delivery_timeout_ms` breaks the sink: `restart_if_broken` then
//!   forgets everything not reported and starts over with a new producer id (the loop re-reads
//!   from acknowledged positions), as with librdkafka's fatal errors.
//! * Every record taken is reported exactly once per generation; answers to requests of an
//!   older generation are dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, InitProducerIdResponse, MetadataRequest, MetadataResponse,
    ProduceRequest, ProduceResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::{Delivery, Record, SendError, Sink, Waker, FILE_KEY_MASK};
use crate::config::OutputConfig;

pub mod batch;
pub mod conn;

use batch::{Codec, OpenBatch, SealedBatch};
use conn::{Conn, ConnError, Security};

/// The manifest's key: never given to a file, never reported.
const MANIFEST_KEY: u64 = FILE_KEY_MASK;
/// Pause before retrying a failed request, metadata or producer id.
const RETRY_BACKOFF_MS: u64 = 100;
/// Metadata is asked again this often even without errors (leaders move).
const METADATA_MAX_AGE_MS: u64 = 300_000;
/// Connect, read and write timeout of a broker connection.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Versions used, within kafka-protocol's ranges: Produce by topic name (v13 names topics by
/// id), Metadata up to v12, InitProducerId up to v4.
const PRODUCE_VERSIONS: std::ops::RangeInclusive<i16> = 3..=12;
const METADATA_VERSIONS: std::ops::RangeInclusive<i16> = 4..=12;
const INIT_PRODUCER_ID_VERSIONS: std::ops::RangeInclusive<i16> = 0..=4;

/// Why the native sink cannot ship with this configuration.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("output.compression = {0:?}: the native producer writes none, gzip, lz4 or zstd (set output.producer = \"librdkafka\" for others)")]
    Compression(String),
    #[error("output.bootstrap is empty")]
    NoBootstrap,
    #[error(transparent)]
    Security(#[from] conn::SecurityError),
    #[error("starting the sender thread: {0}")]
    Thread(#[from] std::io::Error),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Settings {
    bootstrap: Vec<String>,
    client_id: String,
    codec: Codec,
    level: i32,
    batch_bytes: usize,
    linger_ms: u64,
    delivery_timeout_ms: u64,
    max_queued_bytes: usize,
    security: Security,
}

/// A batch waiting for its partition's turn: closed, then (once sent) compressed and stamped.
enum Queued {
    Closed(OpenBatch),
    Sealed(SealedBatch),
}

impl Queued {
    fn opened_ms(&self) -> u64 {
        match self {
            Queued::Closed(b) => b.opened_ms,
            Queued::Sealed(b) => b.opened_ms,
        }
    }
}

#[derive(Default)]
struct Partition {
    /// Node id of the leader; -1 while unknown.
    leader: i32,
    open: Option<OpenBatch>,
    ready: VecDeque<Queued>,
    in_flight: bool,
    next_sequence: i32,
    retry_at_ms: u64,
}

enum TopicStatus {
    /// Metadata asked for, not answered (or the topic is being created).
    Pending,
    Known,
    /// The broker refused the topic for good (invalid name, not authorized).
    Failed(String),
}

struct Topic {
    status: TopicStatus,
    partitions: Vec<Partition>,
}

#[derive(Default)]
struct State {
    generation: u64,
    topics: HashMap<String, Topic>,
    brokers: HashMap<i32, String>,
    /// Metadata is due at this time (ms); 0: now.
    metadata_at_ms: u64,
    metadata_due: bool,
    producer: Option<(i64, i16)>,
    /// Bytes of records in open, queued and in-flight batches (uncompressed).
    queued_bytes: usize,
    /// Batches queued or in flight, open ones not counted.
    batches: usize,
    reports: Vec<Delivery>,
    broken: Option<String>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The sender waits here for work.
    work: Condvar,
    /// `flush` waits here for batches to be answered.
    answered: Condvar,
    waiting: AtomicBool,
    wake: Waker,
    settings: Settings,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct NativeSink {
    shared: Arc<Shared>,
}

impl NativeSink {
    /// A producer to `output.bootstrap`; nothing is connected until the first record.
    pub fn new(
        output: &OutputConfig,
        host: &str,
        max_inflight: u64,
        wake: Waker,
    ) -> Result<NativeSink, NativeError> {
        let codec = Codec::parse(&output.compression)
            .ok_or_else(|| NativeError::Compression(output.compression.clone()))?;
        let bootstrap: Vec<String> = output
            .bootstrap
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if bootstrap.is_empty() {
            return Err(NativeError::NoBootstrap);
        }
        let batch_bytes = output.batch_bytes.clamp(1024, 64 << 20) as usize;
        let settings = Settings {
            bootstrap,
            client_id: format!("qanat-agent-{host}"),
            codec,
            level: output.compression_level,
            batch_bytes,
            linger_ms: output.batch_age_ms,
            delivery_timeout_ms: output.delivery_timeout_ms,
            max_queued_bytes: (max_inflight.saturating_mul(2) as usize).max(2 * batch_bytes),
            security: Security::from_settings(&output.security, "output.security")?,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            answered: Condvar::new(),
            waiting: AtomicBool::new(false),
            wake,
            settings,
        });
        let for_sender = shared.clone();
        thread::Builder::new()
            .name("qanat-agent-sender".into())
            .spawn(move || Sender::new(for_sender).run())?;
        Ok(NativeSink { shared })
    }

    fn push(
        &mut self,
        topic: &str,
        file_key: u64,
        seq: u64,
        key: &[u8],
        payload: &[u8],
        record: Option<&Record<'_>>,
    ) -> Result<(), SendError> {
        let settings = &self.shared.settings;
        let now = now_ms();
        let mut st = self.shared.lock();
        if st.broken.is_some() || st.queued_bytes >= settings.max_queued_bytes {
            return Err(SendError::Full);
        }
        let st = &mut *st;
        let Some(t) = st.topics.get_mut(topic) else {
            st.topics.insert(
                topic.to_string(),
                Topic {
                    status: TopicStatus::Pending,
                    partitions: Vec::new(),
                },
            );
            st.metadata_due = true;
            st.metadata_at_ms = 0;
            self.shared.work.notify_one();
            return Err(SendError::Full);
        };
        match &t.status {
            TopicStatus::Known if !t.partitions.is_empty() => {}
            TopicStatus::Failed(why) => return Err(SendError::Refused(why.clone())),
            _ => return Err(SendError::Full),
        }
        let index = crc32fast::hash(key) as usize % t.partitions.len();
        let p = &mut t.partitions[index];
        let open = p
            .open
            .get_or_insert_with(|| OpenBatch::new(now, settings.batch_bytes + (64 << 10)));
        let before = open.len();
        open.push(
            now,
            file_key,
            seq,
            key,
            payload,
            record.map(|r| &r.trajectory),
        );
        st.queued_bytes += open.len() - before;
        if open.len() >= settings.batch_bytes {
            if let Some(b) = p.open.take() {
                p.ready.push_back(Queued::Closed(b));
                st.batches += 1;
                self.shared.work.notify_one();
            }
        }
        Ok(())
    }
}

impl Drop for NativeSink {
    fn drop(&mut self) {
        // The sender notices at its next turn and ends; it is not joined, so a broker that
        // does not answer cannot hold up shutdown (what is unreported is re-read next start).
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
    }
}

impl Sink for NativeSink {
    fn send(&mut self, r: &Record<'_>) -> Result<(), SendError> {
        self.push(
            r.topic,
            r.file_key,
            r.seq,
            r.trajectory.file_id.as_bytes(),
            r.payload,
            Some(r),
        )
    }

    fn send_manifest(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), SendError> {
        self.push(topic, MANIFEST_KEY, 0, key, payload, None)
    }

    fn drain(&mut self, out: &mut Vec<Delivery>) {
        out.append(&mut self.shared.lock().reports);
    }

    fn flush(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        let mut closed = 0;
        for t in st.topics.values_mut() {
            for p in &mut t.partitions {
                if let Some(b) = p.open.take() {
                    p.ready.push_back(Queued::Closed(b));
                    closed += 1;
                }
            }
        }
        st.batches += closed;
        self.shared.work.notify_one();
        // Broken, it waits out the timeout too: the caller's flush loop must not spin.
        while st.batches > 0 || st.broken.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .answered
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn restart_if_broken(&mut self) -> bool {
        let mut st = self.shared.lock();
        let Some(reason) = st.broken.take() else {
            return false;
        };
        tracing::error!(%reason, "producer broke: starting over with a new producer id and re-reading from acknowledged positions");
        st.generation += 1;
        st.producer = None;
        st.queued_bytes = 0;
        st.batches = 0;
        st.reports.clear();
        for t in st.topics.values_mut() {
            for p in &mut t.partitions {
                *p = Partition {
                    leader: p.leader,
                    ..Partition::default()
                };
            }
        }
        self.shared.work.notify_one();
        true
    }

    fn park(&self) -> bool {
        self.shared.waiting.store(true, Ordering::Release);
        !self.shared.lock().reports.is_empty()
    }

    fn unpark(&self) {
        self.shared.waiting.store(false, Ordering::Release);
    }
}

// ------------------------------------------------------------------------------------------
// The sender thread

/// A batch taken from its partition's queue for one request.
struct Taken {
    topic: String,
    partition: i32,
    leader: i32,
    batch: Queued,
    base_sequence: i32,
    /// Uncompressed record bytes, for `queued_bytes`.
    record_bytes: usize,
}

enum Outcome {
    Delivered,
    Retry(String),
    Fatal(String),
}

struct Sender {
    shared: Arc<Shared>,
    conns: HashMap<i32, Conn>,
    /// A connection made from the bootstrap list, for metadata and producer ids.
    any: Option<Conn>,
}

impl Sender {
    fn new(shared: Arc<Shared>) -> Sender {
        Sender {
            shared,
            conns: HashMap::new(),
            any: None,
        }
    }

    fn run(mut self) {
        loop {
            let Some(turn) = self.next_turn() else {
                return;
            };
            match turn {
                Turn::ProducerId(generation) => self.init_producer_id(generation),
                Turn::Metadata(topics) => self.metadata(topics),
                Turn::Produce(generation, taken, producer) => {
                    self.produce(generation, taken, producer)
                }
            }
        }
    }

    /// Wait for something to do; None at shutdown.
    fn next_turn(&mut self) -> Option<Turn> {
        let settings = &self.shared.settings;
        let mut st = self.shared.lock();
        loop {
            if st.shutdown {
                return None;
            }
            let now = now_ms();
            let mut wake_at = now + 1000;
            if st.broken.is_none() {
                if st.producer.is_none() {
                    return Some(Turn::ProducerId(st.generation));
                }
                let due = st.metadata_due || now >= st.metadata_at_ms;
                if due && now >= st.metadata_at_ms {
                    st.metadata_due = false;
                    st.metadata_at_ms = now + METADATA_MAX_AGE_MS;
                    return Some(Turn::Metadata(st.topics.keys().cloned().collect()));
                }
                if st.metadata_due {
                    wake_at = wake_at.min(st.metadata_at_ms);
                }
                let (taken, next) = take_work(&mut st, now, settings.linger_ms);
                wake_at = wake_at.min(next);
                if !taken.is_empty() {
                    let producer = st.producer.unwrap_or((-1, -1));
                    return Some(Turn::Produce(st.generation, taken, producer));
                }
            }
            let wait = Duration::from_millis(wake_at.saturating_sub(now).max(1));
            st = self
                .shared
                .work
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A connection for metadata and producer ids: any broker will do.
    fn any_conn(&mut self) -> Result<&mut Conn, ConnError> {
        if self.any.is_none() {
            let mut last = None;
            for addr in &self.shared.settings.bootstrap {
                match Conn::connect(
                    addr,
                    &self.shared.settings.client_id,
                    IO_TIMEOUT,
                    &self.shared.settings.security,
                ) {
                    Ok(c) => {
                        self.any = Some(c);
                        break;
                    }
                    Err(e) => {
                        log_refusal(&e);
                        last = Some(e);
                    }
                }
            }
            if let Some(e) = last.filter(|_| self.any.is_none()) {
                return Err(e);
            }
        }
        self.any.as_mut().ok_or_else(|| ConnError::Protocol {
            addr: String::new(),
            what: "bootstrap",
            reason: "no broker reachable".into(),
        })
    }

    fn backoff(&self) {
        let st = self.shared.lock();
        if !st.shutdown {
            let _ = self
                .shared
                .work
                .wait_timeout(st, Duration::from_millis(RETRY_BACKOFF_MS));
        }
    }

    fn init_producer_id(&mut self, generation: u64) {
        let result = (|| -> Result<(i64, i16), String> {
            let conn = self.any_conn().map_err(|e| e.to_string())?;
            let version = conn
                .version(ApiKey::InitProducerId, INIT_PRODUCER_ID_VERSIONS)
                .map_err(|e| e.to_string())?;
            // Not transactional: kafka-protocol's default is an empty id, not a null one.
            let req = InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_transaction_timeout_ms(-1)
                .with_producer_id((-1).into())
                .with_producer_epoch(-1);
            let resp: InitProducerIdResponse = conn
                .request(ApiKey::InitProducerId, version, &req)
                .map_err(|e| e.to_string())?;
            match resp.error_code.err() {
                None => Ok((resp.producer_id.0, resp.producer_epoch)),
                Some(e) => Err(format!("InitProducerId: {e:?}")),
            }
        })();
        match result {
            Ok(p) => {
                let mut st = self.shared.lock();
                if st.generation == generation {
                    tracing::debug!(producer_id = p.0, epoch = p.1, "idempotent producer id");
                    st.producer = Some(p);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no producer id yet; will retry");
                self.any = None;
                self.backoff();
            }
        }
    }

    fn metadata(&mut self, topics: Vec<String>) {
        let result = (|| -> Result<MetadataResponse, ConnError> {
            let conn = self.any_conn()?;
            let version = conn.version(ApiKey::Metadata, METADATA_VERSIONS)?;
            let req = MetadataRequest::default()
                .with_topics(Some(
                    topics
                        .iter()
                        .map(|t| {
                            MetadataRequestTopic::default()
                                .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                        })
                        .collect(),
                ))
                .with_allow_auto_topic_creation(true);
            conn.request(ApiKey::Metadata, version, &req)
        })();
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "metadata failed; will retry");
                self.any = None;
                let mut st = self.shared.lock();
                st.metadata_due = true;
                st.metadata_at_ms = now_ms() + RETRY_BACKOFF_MS;
                return;
            }
        };
        let mut st = self.shared.lock();
        let st = &mut *st;
        for b in &resp.brokers {
            let addr = format!("{}:{}", b.host, b.port);
            if st.brokers.get(&b.node_id.0) != Some(&addr) {
                self.conns.remove(&b.node_id.0);
                st.brokers.insert(b.node_id.0, addr);
            }
        }
        let mut again = false;
        for t in &resp.topics {
            let Some(name) = &t.name else { continue };
            let Some(topic) = st.topics.get_mut(name.0.as_str()) else {
                continue;
            };
            match t.error_code.err() {
                None => {
                    let count = t
                        .partitions
                        .iter()
                        .map(|p| p.partition_index + 1)
                        .max()
                        .unwrap_or(0)
                        .max(0) as usize;
                    if count < topic.partitions.len() {
                        tracing::warn!(topic = %name.0, count, had = topic.partitions.len(), "metadata lists fewer partitions than before; keeping the known ones");
                    }
                    while topic.partitions.len() < count {
                        topic.partitions.push(Partition {
                            leader: -1,
                            ..Partition::default()
                        });
                    }
                    for p in &t.partitions {
                        if let Some(q) = usize::try_from(p.partition_index)
                            .ok()
                            .and_then(|i| topic.partitions.get_mut(i))
                        {
                            q.leader = if p.error_code == 0 { p.leader_id.0 } else { -1 };
                            again |= q.leader < 0;
                        }
                    }
                    topic.status = if topic.partitions.is_empty() {
                        again = true;
                        TopicStatus::Pending
                    } else {
                        TopicStatus::Known
                    };
                }
                Some(e) if e.is_retriable() => {
                    tracing::debug!(topic = %name.0, error = ?e, "topic not ready");
                    again = true;
                }
                Some(e) => {
                    tracing::error!(topic = %name.0, error = ?e, "the broker refuses the topic");
                    topic.status = TopicStatus::Failed(format!("topic {}: {e:?}", name.0));
                }
            }
        }
        if again {
            st.metadata_due = true;
            st.metadata_at_ms = now_ms() + RETRY_BACKOFF_MS;
        }
        self.shared.work.notify_one();
    }

    fn produce(&mut self, generation: u64, mut taken: Vec<Taken>, producer: (i64, i16)) {
        let settings = &self.shared.settings;
        // Compress and stamp outside the lock: the loop keeps encoding meanwhile.
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(taken.len());
        let mut wire = Vec::with_capacity(taken.len());
        for t in &mut taken {
            let sealed = match std::mem::replace(&mut t.batch, Queued::Closed(OpenBatch::new(0, 0)))
            {
                Queued::Sealed(s) => Ok(s),
                Queued::Closed(b) => b.seal(settings.codec, settings.level),
            };
            match sealed {
                Ok(mut s) => {
                    wire.push(Some(s.stamp(producer.0, producer.1, t.base_sequence)));
                    t.batch = Queued::Sealed(s);
                    outcomes.push(None);
                }
                Err(e) => {
                    wire.push(None);
                    outcomes.push(Some(Outcome::Fatal(format!("compressing a batch: {e}"))));
                }
            }
        }
        let brokers = self.shared.lock().brokers.clone();
        let mut leaders: Vec<i32> = taken.iter().map(|t| t.leader).collect();
        leaders.sort_unstable();
        leaders.dedup();
        // Send to every leader, then read every answer.
        let mut sent: Vec<(i32, i16, i32)> = Vec::new();
        for &leader in &leaders {
            let mine: Vec<usize> = (0..taken.len())
                .filter(|&i| taken[i].leader == leader && outcomes[i].is_none())
                .collect();
            if mine.is_empty() {
                continue;
            }
            let fail = |outcomes: &mut Vec<Option<Outcome>>, why: String| {
                for &i in &mine {
                    outcomes[i] = Some(Outcome::Retry(why.clone()));
                }
            };
            if let std::collections::hash_map::Entry::Vacant(slot) = self.conns.entry(leader) {
                let Some(addr) = brokers.get(&leader) else {
                    fail(&mut outcomes, format!("no address for broker {leader}"));
                    continue;
                };
                match Conn::connect(addr, &settings.client_id, IO_TIMEOUT, &settings.security) {
                    Ok(c) => {
                        slot.insert(c);
                    }
                    Err(e) => {
                        log_refusal(&e);
                        fail(&mut outcomes, e.to_string());
                        continue;
                    }
                }
            }
            let Some(conn) = self.conns.get_mut(&leader) else {
                continue;
            };
            let version = match conn.version(ApiKey::Produce, PRODUCE_VERSIONS) {
                Ok(v) => v,
                Err(e) => {
                    fail(&mut outcomes, e.to_string());
                    continue;
                }
            };
            let mut topic_data: Vec<TopicProduceData> = Vec::new();
            for &i in &mine {
                let t = &taken[i];
                let data = PartitionProduceData::default()
                    .with_index(t.partition)
                    .with_records(wire[i].clone());
                match topic_data.iter_mut().find(|d| d.name.0.as_str() == t.topic) {
                    Some(d) => d.partition_data.push(data),
                    None => topic_data.push(
                        TopicProduceData::default()
                            .with_name(TopicName(StrBytes::from_string(t.topic.clone())))
                            .with_partition_data(vec![data]),
                    ),
                }
            }
            let req = ProduceRequest::default()
                .with_transactional_id(None)
                .with_acks(-1)
                .with_timeout_ms(settings.delivery_timeout_ms.min(i32::MAX as u64) as i32)
                .with_topic_data(topic_data);
            match conn.send(ApiKey::Produce, version, &req) {
                Ok(correlation) => sent.push((leader, version, correlation)),
                Err(e) => {
                    self.conns.remove(&leader);
                    fail(&mut outcomes, e.to_string());
                }
            }
        }
        for (leader, version, correlation) in sent {
            let Some(conn) = self.conns.get_mut(&leader) else {
                continue;
            };
            let answer: Result<ProduceResponse, ConnError> = conn.receive(version, correlation);
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    self.conns.remove(&leader);
                    for (i, t) in taken.iter().enumerate() {
                        if t.leader == leader && outcomes[i].is_none() {
                            outcomes[i] = Some(Outcome::Retry(e.to_string()));
                        }
                    }
                    continue;
                }
            };
            for tr in &answer.responses {
                for pr in &tr.partition_responses {
                    let Some(i) = (0..taken.len()).find(|&i| {
                        taken[i].leader == leader
                            && taken[i].partition == pr.index
                            && taken[i].topic == tr.name.0.as_str()
                            && outcomes[i].is_none()
                    }) else {
                        continue;
                    };
                    outcomes[i] = Some(classify(pr.error_code, pr.error_message.as_ref()));
                }
            }
        }
        self.apply(generation, taken, outcomes);
    }

    /// Settle each taken batch under the lock.
    fn apply(&mut self, generation: u64, taken: Vec<Taken>, outcomes: Vec<Option<Outcome>>) {
        let settings = &self.shared.settings;
        let now = now_ms();
        let mut guard = self.shared.lock();
        if guard.generation != generation {
            // Forgotten by a restart: whatever happened, it is re-read.
            return;
        }
        let st = &mut *guard;
        let mut reported = false;
        for (t, outcome) in taken.into_iter().zip(outcomes) {
            let outcome =
                outcome.unwrap_or_else(|| Outcome::Retry("no answer for the partition".into()));
            let Some(p) = st
                .topics
                .get_mut(&t.topic)
                .and_then(|topic| topic.partitions.get_mut(t.partition as usize))
            else {
                continue;
            };
            p.in_flight = false;
            match outcome {
                Outcome::Delivered => {
                    let runs = match &t.batch {
                        Queued::Sealed(s) => &s.runs,
                        Queued::Closed(b) => &b.runs,
                    };
                    for r in runs.iter().filter(|r| r.file_key != MANIFEST_KEY) {
                        st.reports.extend((0..u64::from(r.count)).map(|k| Delivery {
                            file_key: r.file_key,
                            seq: r.first_seq + k,
                            ok: true,
                        }));
                    }
                    reported = true;
                    st.queued_bytes = st.queued_bytes.saturating_sub(t.record_bytes);
                    st.batches = st.batches.saturating_sub(1);
                }
                Outcome::Retry(why) => {
                    if now.saturating_sub(t.batch.opened_ms()) > settings.delivery_timeout_ms {
                        st.broken = Some(format!(
                            "a batch of {} [{}] was not acknowledged within {} ms: {why}",
                            t.topic, t.partition, settings.delivery_timeout_ms
                        ));
                    } else {
                        tracing::debug!(topic = %t.topic, partition = t.partition, %why, "retrying a batch");
                        p.retry_at_ms = now + RETRY_BACKOFF_MS;
                        p.ready.push_front(t.batch);
                        st.metadata_due = true;
                    }
                }
                Outcome::Fatal(why) => {
                    st.broken = Some(format!("{} [{}]: {why}", t.topic, t.partition));
                }
            }
        }
        let wake = reported || st.broken.is_some();
        drop(guard);
        self.shared.answered.notify_all();
        if wake
            && self.shared.waiting.load(Ordering::Acquire)
            && self.shared.waiting.swap(false, Ordering::AcqRel)
        {
            (self.shared.wake)();
        }
    }
}

enum Turn {
    ProducerId(u64),
    Metadata(Vec<String>),
    Produce(u64, Vec<Taken>, (i64, i16)),
}

/// Close batches older than `linger_ms` on partitions with nothing in flight or queued, then
/// take the head batch of every partition that may send; returns them and when the next batch
/// closes by age.
fn take_work(st: &mut State, now: u64, linger_ms: u64) -> (Vec<Taken>, u64) {
    let mut taken = Vec::new();
    let mut next = u64::MAX;
    let mut closed = 0;
    let mut metadata = false;
    for (name, topic) in &mut st.topics {
        for (index, p) in topic.partitions.iter_mut().enumerate() {
            if let Some(open) = &p.open {
                let due = open.opened_ms.saturating_add(linger_ms);
                if due > now {
                    next = next.min(due);
                } else if !p.in_flight && p.ready.is_empty() {
                    // Closed by age only when it can go at once: while the partition waits
                    // for an answer its open batch keeps filling (up to `batch_bytes`), so
                    // the batches grow with the round trip instead of queueing up small
                    // (one per linger) behind the one in flight, as librdkafka does.
                    if let Some(b) = p.open.take() {
                        p.ready.push_back(Queued::Closed(b));
                        closed += 1;
                    }
                }
            }
            if p.in_flight || p.ready.is_empty() {
                continue;
            }
            if p.retry_at_ms > now {
                next = next.min(p.retry_at_ms);
                continue;
            }
            if p.leader < 0 {
                metadata = true;
                continue;
            }
            let Some(batch) = p.ready.pop_front() else {
                continue;
            };
            let (base_sequence, record_bytes) = match &batch {
                Queued::Sealed(s) => (s.base_sequence().unwrap_or(p.next_sequence), s.record_bytes),
                Queued::Closed(b) => {
                    let base = p.next_sequence;
                    // Sequences wrap from i32::MAX to 0, as Kafka's do.
                    p.next_sequence = ((i64::from(base) + i64::from(b.count()))
                        % (i64::from(i32::MAX) + 1)) as i32;
                    (base, b.len())
                }
            };
            p.in_flight = true;
            taken.push(Taken {
                topic: name.clone(),
                partition: index as i32,
                leader: p.leader,
                batch,
                base_sequence,
                record_bytes,
            });
        }
    }
    st.batches += closed;
    if metadata && !st.metadata_due {
        st.metadata_due = true;
        st.metadata_at_ms = now;
    }
    (taken, next)
}

/// A refused login or certificate is logged as an error (the retries go on: the password file
/// or the broker's users may be fixed meanwhile); other connection failures are retried as
/// they come.
fn log_refusal(e: &ConnError) {
    if matches!(e, ConnError::Authentication { .. } | ConnError::Tls { .. }) {
        tracing::error!(error = %e, "the broker refused the connection's credentials or certificate");
    }
}

/// What a partition's error code in a Produce answer means for its batch.
fn classify(code: i16, message: Option<&StrBytes>) -> Outcome {
    let Some(e) = code.err() else {
        return Outcome::Delivered;
    };
    let why = match message {
        Some(m) => format!("{e:?}: {}", m.as_str()),
        None => format!("{e:?}"),
    };
    match e {
        // Already written by an earlier attempt of this very batch.
        ResponseError::DuplicateSequenceNumber => Outcome::Delivered,
        ResponseError::OutOfOrderSequenceNumber
        | ResponseError::UnknownProducerId
        | ResponseError::InvalidProducerEpoch => Outcome::Fatal(why),
        e if e.is_retriable() => Outcome::Retry(why),
        _ => Outcome::Fatal(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_partition(open_at_ms: u64) -> State {
        let mut batch = OpenBatch::new(open_at_ms, 1024);
        batch.push(open_at_ms, 1, 0, b"k", b"v", None);
        let partition = Partition {
            leader: 1,
            open: Some(batch),
            ..Partition::default()
        };
        let mut st = State::default();
        st.topics.insert(
            "t".into(),
            Topic {
                status: TopicStatus::Known,
                partitions: vec![partition],
            },
        );
        st
    }

    fn partition(st: &mut State) -> &mut Partition {
        match st
            .topics
            .get_mut("t")
            .and_then(|t| t.partitions.first_mut())
        {
            Some(p) => p,
            None => unreachable!("one partition"),
        }
    }

    #[test]
    fn a_batch_is_not_closed_by_age_before_it_is_due() {
        let mut st = one_partition(100);
        let (taken, next) = take_work(&mut st, 104, 5);
        assert!(taken.is_empty());
        assert_eq!(next, 105);
        assert!(partition(&mut st).open.is_some());
    }

    #[test]
    fn a_due_batch_keeps_filling_while_its_partition_waits_for_an_answer() {
        let mut st = one_partition(100);
        partition(&mut st).in_flight = true;
        let (taken, _) = take_work(&mut st, 200, 5);
        assert!(
            taken.is_empty(),
            "nothing goes while one batch is in flight"
        );
        let p = partition(&mut st);
        assert!(
            p.ready.is_empty(),
            "no small batch queued behind the one in flight"
        );
        assert!(
            p.open.is_some(),
            "the open batch stays open for more records"
        );

        // Answered: the grown batch closes and goes at the next turn.
        p.in_flight = false;
        let (taken, _) = take_work(&mut st, 201, 5);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].base_sequence, 0);
        assert!(partition(&mut st).open.is_none());
        assert!(partition(&mut st).in_flight);
    }
}
