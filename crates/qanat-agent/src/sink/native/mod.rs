//! The native producer: the loop's records encoded straight into Kafka RecordBatches, sent
//! by one sender thread over kafka-protocol. librdkafka allocates per record and per header,
//! copies every payload and looks the topic up per send; here a record costs a partition
//! choice and a copy into its partition's open batch.
//!
//! Shape: the loop (`send`) appends to the open batch of the record's partition (CRC-32 of
//! the key modulo the partition count, librdkafka's default partitioner, so a file keeps its
//! partition whichever sink ships it). A batch closes at `batch_bytes`, or after
//! `batch_age_ms` once its partition has nothing in flight or queued (until then it keeps
//! filling, so batches grow with the round trip), or when the open batches together hold a
//! quarter of the queue's bound (with many partitions no batch reaches `batch_bytes` before
//! the queue is full, and waiting for them would leave nothing in flight while the loop
//! encodes), and queues for its partition. The sender thread asks metadata (leaders, across
//! brokers), an idempotent producer id (InitProducerId), compresses and stamps the head batch
//! of each partition and sends one Produce request per leader (`acks=all`, batches up to
//! [`MAX_REQUEST_BYTES`], the rest at the next turn); it sends again
//! without waiting for the answers, up to [`MAX_IN_FLIGHT`] requests per connection, and
//! reads each answer when it arrives (the broker answers a connection in request order).
//!
//! Invariants:
//! * At most [`MAX_IN_FLIGHT`] batches of a partition are in flight, all to one leader, with
//!   consecutive sequences. When one fails retriably, the partition stalls: nothing more is
//!   sent until every batch in flight has come back; the failed ones (and those after them,
//!   which the broker refuses as out of order) go back to the head of the queue in sequence
//!   order and are re-sent with the same bytes. So the order of a partition is the order of
//!   `send`, and the broker drops a repeat by its sequence (it remembers the last 5 batches
//!   of a producer: at-least-once without duplicates from retries).
//! * A later batch can be acknowledged while an earlier one waits for its retry (its first
//!   try was written, but the answer lost). So a new batch goes only while fewer than
//!   [`MAX_IN_FLIGHT`] were sent since the oldest not acknowledged: every batch the broker
//!   may have written after a retried one is among its last 5, and the retry is recognised.
//! * Sequences of a partition follow each other from 0 per producer id; a gap the broker
//!   reports (out of order with no earlier batch of the partition failed, unknown producer,
//!   fenced epoch), a refusal that is not retriable, or a batch older than
//!   `delivery_timeout_ms` breaks the sink: `restart_if_broken` then forgets everything not
//!   reported and starts over with a new producer id (the loop re-reads from acknowledged
//!   positions), as with librdkafka's fatal errors.
//! * Every record taken is reported exactly once per generation; answers to requests of an
//!   older generation are read and dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
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
/// Produce requests awaiting their answers on one connection, and batches of one partition
/// in flight: as Kafka's idempotent producer (`max.in.flight.requests.per.connection`), and
/// no more than the broker remembers per producer to recognise a retry.
pub const MAX_IN_FLIGHT: usize = 5;
/// A Produce request carries partitions' batches up to this many record bytes (at least one
/// batch), as Kafka's producer caps a request at `max.request.size` (1 MiB) and librdkafka at
/// `message.max.bytes`: the broker then reads, checks and appends each request while it is
/// still in its CPU caches, where one batch for each of many partitions would make requests
/// of tens of MB.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// What an open batch allocates at first.
const BATCH_START_CAPACITY: usize = 16 << 10;
/// Longest the sender waits on an answer before looking for batches closed meanwhile.
const ANSWER_POLL: Duration = Duration::from_millis(1);

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
    /// Oldest first: retried (sealed) batches, in sequence order, before the closed ones.
    ready: VecDeque<Queued>,
    /// Batches sent and not answered, all to `in_flight_leader`.
    in_flight: usize,
    /// Base sequences of the batches sent since the oldest one not acknowledged, in sequence
    /// order, each with whether it was acknowledged (a later batch can be, while an earlier
    /// one waits for its retry). The broker recognises a retry as a duplicate only among its
    /// last [`MAX_IN_FLIGHT`] batches of the partition, so a new batch goes only while this
    /// holds fewer: every batch written after one that is retried is then in this window.
    window: VecDeque<(i32, bool)>,
    in_flight_leader: i32,
    /// A batch failed retriably: nothing is sent until every batch in flight is back.
    stalled: bool,
    next_sequence: i32,
    retry_at_ms: u64,
}

impl Partition {
    fn new(leader: i32) -> Partition {
        Partition {
            leader,
            in_flight_leader: -1,
            ..Partition::default()
        }
    }

    /// The batch of base sequence `base` was acknowledged: the window starts at the oldest
    /// batch still not.
    fn acknowledge(&mut self, base: i32) {
        if let Some(sent) = self.window.iter_mut().find(|(b, _)| *b == base) {
            sent.1 = true;
        }
        while self.window.front().is_some_and(|&(_, acked)| acked) {
            self.window.pop_front();
        }
    }

    /// A batch back from a failed request (`base`: its base sequence), in sequence order:
    /// before the retried ones of later sequences still queued, and the never sent.
    fn requeue(&mut self, batch: Queued, base: i32) {
        let at = self
            .ready
            .iter()
            .position(|q| match q {
                Queued::Closed(_) => true,
                Queued::Sealed(s) => s.base_sequence().is_none_or(|b| sequence_after(b, base)),
            })
            .unwrap_or(self.ready.len());
        self.ready.insert(at, batch);
    }
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
    /// Bytes of records in open batches (uncompressed).
    open_bytes: usize,
    /// Batches queued or in flight, open ones not counted.
    batches: usize,
    reports: Vec<Delivery>,
    broken: Option<String>,
    shutdown: bool,
    /// Where `take_work` starts among a topic's partitions; moves on each time, so that
    /// when requests fill up, every partition has its turn first.
    take_from: usize,
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
        if p.open.is_none() {
            // The sender sleeps until the next batch is due by age: this one may be first.
            self.shared.work.notify_one();
        }
        // Grown as it fills: a batch of a few records (a slow file, a short linger) does not
        // map and unmap a whole `batch_bytes`.
        let open = p.open.get_or_insert_with(|| {
            OpenBatch::new(now, settings.batch_bytes.min(BATCH_START_CAPACITY))
        });
        let before = open.len();
        open.push(
            now,
            file_key,
            seq,
            key,
            payload,
            record.map(|r| &r.trajectory),
        );
        let added = open.len() - before;
        st.queued_bytes += added;
        st.open_bytes += added;
        if open.len() >= settings.batch_bytes {
            if let Some(b) = p.open.take() {
                st.open_bytes = st.open_bytes.saturating_sub(b.len());
                p.ready.push_back(Queued::Closed(b));
                st.batches += 1;
                self.shared.work.notify_one();
            }
        }
        if st.open_bytes >= settings.max_queued_bytes / 4 {
            close_open_batches(st);
            self.shared.work.notify_one();
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
        close_open_batches(&mut st);
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
        st.open_bytes = 0;
        st.batches = 0;
        st.reports.clear();
        for t in st.topics.values_mut() {
            for p in &mut t.partitions {
                *p = Partition::new(p.leader);
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Retry(String),
    /// Not the sequence the broker expects: a gap if no earlier batch of the partition
    /// failed, else the consequence of that failure.
    OutOfOrder(String),
    Fatal(String),
}

/// A Produce request awaiting its answer.
struct Pending {
    generation: u64,
    version: i16,
    correlation: i32,
    taken: Vec<Taken>,
}

/// A connection to a leader and its requests in flight, oldest first.
struct Link {
    conn: Conn,
    pending: VecDeque<Pending>,
}

struct Sender {
    shared: Arc<Shared>,
    links: HashMap<i32, Link>,
    /// A connection made from the bootstrap list, for metadata and producer ids.
    any: Option<Conn>,
}

impl Sender {
    fn new(shared: Arc<Shared>) -> Sender {
        Sender {
            shared,
            links: HashMap::new(),
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
                Turn::Answer(wait) => self.await_answer(wait),
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
                let full: Vec<i32> = self
                    .links
                    .iter()
                    .filter(|(_, l)| l.pending.len() >= MAX_IN_FLIGHT)
                    .map(|(&id, _)| id)
                    .collect();
                let (taken, next) = take_work(&mut st, now, settings.linger_ms, &full);
                wake_at = wake_at.min(next);
                if !taken.is_empty() {
                    let producer = st.producer.unwrap_or((-1, -1));
                    return Some(Turn::Produce(st.generation, taken, producer));
                }
            }
            let wait = Duration::from_millis(wake_at.saturating_sub(now).max(1));
            if self.links.values().any(|l| !l.pending.is_empty()) {
                // Answers are read even while broken: a restart drops them, but the
                // connection must be read past them.
                return Some(Turn::Answer(wait.min(ANSWER_POLL)));
            }
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
        let mut moved: Vec<Link> = Vec::new();
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        for b in &resp.brokers {
            let addr = format!("{}:{}", b.host, b.port);
            if st.brokers.get(&b.node_id.0) != Some(&addr) {
                moved.extend(self.links.remove(&b.node_id.0));
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
                        topic.partitions.push(Partition::new(-1));
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
        drop(guard);
        for link in moved {
            self.fail_pending(link, "the broker's address changed");
        }
        self.shared.work.notify_one();
    }

    /// Compress and stamp the taken batches, and send one Produce request per leader; the
    /// answers are read by `await_answer`.
    fn produce(&mut self, generation: u64, mut taken: Vec<Taken>, producer: (i64, i16)) {
        let shared = self.shared.clone();
        let settings = &shared.settings;
        // Compress and stamp outside the lock: the loop keeps encoding meanwhile.
        let mut failed: Vec<(Taken, Outcome)> = Vec::new();
        let mut wire: Vec<(Taken, Bytes)> = Vec::with_capacity(taken.len());
        for mut t in taken.drain(..) {
            let sealed = match std::mem::replace(&mut t.batch, Queued::Closed(OpenBatch::new(0, 0)))
            {
                Queued::Sealed(s) => Ok(s),
                Queued::Closed(b) => b.seal(settings.codec, settings.level),
            };
            match sealed {
                Ok(mut s) => {
                    let bytes = s.stamp(producer.0, producer.1, t.base_sequence);
                    t.batch = Queued::Sealed(s);
                    wire.push((t, bytes));
                }
                Err(e) => failed.push((t, Outcome::Fatal(format!("compressing a batch: {e}")))),
            }
        }
        let brokers = self.shared.lock().brokers.clone();
        let mut leaders: Vec<i32> = wire.iter().map(|(t, _)| t.leader).collect();
        leaders.sort_unstable();
        leaders.dedup();
        for leader in leaders {
            let (mine, rest): (Vec<_>, Vec<_>) =
                wire.into_iter().partition(|(t, _)| t.leader == leader);
            wire = rest;
            let fail =
                |failed: &mut Vec<(Taken, Outcome)>, mine: Vec<(Taken, Bytes)>, why: &str| {
                    failed.extend(
                        mine.into_iter()
                            .map(|(t, _)| (t, Outcome::Retry(why.to_string()))),
                    );
                };
            if let std::collections::hash_map::Entry::Vacant(slot) = self.links.entry(leader) {
                let Some(addr) = brokers.get(&leader) else {
                    fail(
                        &mut failed,
                        mine,
                        &format!("no address for broker {leader}"),
                    );
                    continue;
                };
                match Conn::connect(addr, &settings.client_id, IO_TIMEOUT, &settings.security) {
                    Ok(conn) => {
                        slot.insert(Link {
                            conn,
                            pending: VecDeque::new(),
                        });
                    }
                    Err(e) => {
                        log_refusal(&e);
                        fail(&mut failed, mine, &e.to_string());
                        continue;
                    }
                }
            }
            let Some(link) = self.links.get_mut(&leader) else {
                continue;
            };
            let version = match link.conn.version(ApiKey::Produce, PRODUCE_VERSIONS) {
                Ok(v) => v,
                Err(e) => {
                    fail(&mut failed, mine, &e.to_string());
                    continue;
                }
            };
            let mut topic_data: Vec<TopicProduceData> = Vec::new();
            let mut size = 0;
            for (t, bytes) in &mine {
                size += bytes.len() + 64;
                let data = PartitionProduceData::default()
                    .with_index(t.partition)
                    .with_records(Some(bytes.clone()));
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
            match link.conn.send(ApiKey::Produce, version, &req, size) {
                Ok(correlation) => link.pending.push_back(Pending {
                    generation,
                    version,
                    correlation,
                    taken: mine.into_iter().map(|(t, _)| t).collect(),
                }),
                Err(e) => {
                    let why = e.to_string();
                    fail(&mut failed, mine, &why);
                    self.drop_link(leader, &why);
                }
            }
        }
        if !failed.is_empty() {
            self.settle(generation, failed);
        }
    }

    /// Read one answer if one arrives within `wait`, and settle its batches.
    fn await_answer(&mut self, wait: Duration) {
        // Links with the most requests out are looked at first, without waiting; only the
        // last one looked at is waited on, for at most `wait`.
        let mut order: Vec<(i32, i32)> = self
            .links
            .iter()
            .filter_map(|(&id, l)| l.pending.front().map(|_| (id, l.pending.len() as i32)))
            .collect();
        order.sort_unstable_by_key(|&(_, n)| std::cmp::Reverse(n));
        let mut ready = None;
        for (i, &(id, _)) in order.iter().enumerate() {
            let Some(link) = self.links.get_mut(&id) else {
                continue;
            };
            let look = if i + 1 == order.len() {
                wait
            } else {
                Duration::ZERO
            };
            match link.conn.answer_ready(look) {
                Ok(false) => continue,
                // An error shows in the read.
                Ok(true) | Err(_) => {
                    ready = Some(id);
                    break;
                }
            }
        }
        let Some(leader) = ready else {
            return;
        };
        let Some(link) = self.links.get_mut(&leader) else {
            return;
        };
        let Some(pending) = link.pending.pop_front() else {
            return;
        };
        let answer: Result<ProduceResponse, ConnError> =
            link.conn.receive(pending.version, pending.correlation);
        match answer {
            Ok(answer) => {
                let outcomes = match_answer(pending.taken, &answer);
                self.settle(pending.generation, outcomes);
            }
            Err(e) => {
                let why = e.to_string();
                self.retry_pending(pending, &why);
                self.drop_link(leader, &why);
            }
        }
    }

    /// Close the connection to `leader`: its requests in flight failed (their batches are
    /// retried, in the order they were sent).
    fn drop_link(&mut self, leader: i32, why: &str) {
        if let Some(link) = self.links.remove(&leader) {
            self.fail_pending(link, why);
        }
    }

    fn fail_pending(&mut self, link: Link, why: &str) {
        for p in link.pending {
            self.retry_pending(p, why);
        }
    }

    /// A request whose answer will never come: every batch in it is retried.
    fn retry_pending(&mut self, p: Pending, why: &str) {
        let outcomes = p
            .taken
            .into_iter()
            .map(|t| (t, Outcome::Retry(why.to_string())))
            .collect();
        self.settle(p.generation, outcomes);
    }

    /// Settle answered batches under the lock and wake whoever waits for it.
    fn settle(&self, generation: u64, outcomes: Vec<(Taken, Outcome)>) {
        let settings = &self.shared.settings;
        let mut guard = self.shared.lock();
        if guard.generation != generation {
            // Forgotten by a restart: whatever happened, it is re-read.
            return;
        }
        let reported = settle(&mut guard, outcomes, now_ms(), settings.delivery_timeout_ms);
        let wake = reported || guard.broken.is_some();
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

/// Each taken batch with the outcome the answer gives its partition (a partition the answer
/// does not name is retried).
fn match_answer(taken: Vec<Taken>, answer: &ProduceResponse) -> Vec<(Taken, Outcome)> {
    let mut outcomes: Vec<Option<Outcome>> = taken.iter().map(|_| None).collect();
    for tr in &answer.responses {
        for pr in &tr.partition_responses {
            if let Some(i) = (0..taken.len()).find(|&i| {
                outcomes[i].is_none()
                    && taken[i].partition == pr.index
                    && taken[i].topic == tr.name.0.as_str()
            }) {
                outcomes[i] = Some(classify(pr.error_code, pr.error_message.as_ref()));
            }
        }
    }
    taken
        .into_iter()
        .zip(outcomes)
        .map(|(t, o)| {
            let o = o.unwrap_or_else(|| Outcome::Retry("no answer for the partition".into()));
            (t, o)
        })
        .collect()
}

/// Apply the outcomes of one request's batches, in the order they were taken; returns
/// whether records were reported.
fn settle(
    st: &mut State,
    outcomes: Vec<(Taken, Outcome)>,
    now: u64,
    delivery_timeout_ms: u64,
) -> bool {
    let mut reported = false;
    for (t, outcome) in outcomes {
        let Some(p) = st
            .topics
            .get_mut(&t.topic)
            .and_then(|topic| topic.partitions.get_mut(t.partition as usize))
        else {
            continue;
        };
        p.in_flight = p.in_flight.saturating_sub(1);
        let outcome = match outcome {
            // An earlier batch of the partition failed, so the broker misses its records.
            Outcome::OutOfOrder(why) if p.stalled => Outcome::Retry(why),
            Outcome::OutOfOrder(why) => Outcome::Fatal(why),
            o => o,
        };
        match outcome {
            Outcome::Delivered => {
                p.acknowledge(t.base_sequence);
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
                if now.saturating_sub(t.batch.opened_ms()) > delivery_timeout_ms {
                    st.broken = Some(format!(
                        "a batch of {} [{}] was not acknowledged within {} ms: {why}",
                        t.topic, t.partition, delivery_timeout_ms
                    ));
                } else {
                    tracing::debug!(topic = %t.topic, partition = t.partition, %why, "retrying a batch");
                    p.stalled = true;
                    p.retry_at_ms = now + RETRY_BACKOFF_MS;
                    p.requeue(t.batch, t.base_sequence);
                    st.metadata_due = true;
                }
            }
            Outcome::OutOfOrder(why) | Outcome::Fatal(why) => {
                st.broken = Some(format!("{} [{}]: {why}", t.topic, t.partition));
            }
        }
    }
    reported
}

enum Turn {
    ProducerId(u64),
    Metadata(Vec<String>),
    Produce(u64, Vec<Taken>, (i64, i16)),
    /// Requests are in flight and nothing is to be sent: read an answer, waiting this long.
    Answer(Duration),
}

/// Whether sequence `a` comes after `b`. Sequences wrap from `i32::MAX` to 0, and those of
/// one partition in the queue lie far closer than half the range.
fn sequence_after(a: i32, b: i32) -> bool {
    let distance = (i64::from(a) - i64::from(b)).rem_euclid(i64::from(i32::MAX) + 1);
    distance != 0 && distance < (1 << 30)
}

/// Queue every open batch (the queue's bound is near, or a flush).
fn close_open_batches(st: &mut State) {
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
    st.open_bytes = 0;
}

/// Close batches older than `linger_ms` on partitions with nothing in flight or queued, then
/// take the head batch of every partition that may send (fewer than [`MAX_IN_FLIGHT`] in
/// flight, all to its leader, not stalled, its leader not in `full`; a new batch only while
/// fewer than [`MAX_IN_FLIGHT`] were sent since the oldest not acknowledged), as long as its
/// leader's request stays within [`MAX_REQUEST_BYTES`]; returns them and when the next batch
/// closes by age. Batches left out go at the next call, which starts one partition further on.
fn take_work(st: &mut State, now: u64, linger_ms: u64, full: &[i32]) -> (Vec<Taken>, u64) {
    let mut taken = Vec::new();
    let mut next = u64::MAX;
    let mut closed = 0;
    let mut closed_bytes = 0;
    let mut metadata = false;
    // Record bytes taken per leader so far.
    let mut request_bytes: HashMap<i32, usize> = HashMap::new();
    let start = st.take_from;
    st.take_from = st.take_from.wrapping_add(1);
    for (name, topic) in &mut st.topics {
        let count = topic.partitions.len();
        let offset = if count == 0 { 0 } else { start % count };
        let order = (offset..count).chain(0..offset);
        for index in order {
            let Some(p) = topic.partitions.get_mut(index) else {
                continue;
            };
            if let Some(open) = &p.open {
                let due = open.opened_ms.saturating_add(linger_ms);
                if due > now {
                    next = next.min(due);
                } else if p.in_flight == 0 && p.ready.is_empty() {
                    // Closed by age only when it can go at once: while the partition waits
                    // for an answer its open batch keeps filling (up to `batch_bytes`), so
                    // the batches grow with the round trip instead of queueing up small
                    // (one per linger) behind the one in flight, as librdkafka does.
                    if let Some(b) = p.open.take() {
                        closed_bytes += b.len();
                        p.ready.push_back(Queued::Closed(b));
                        closed += 1;
                    }
                }
            }
            if p.ready.is_empty() || p.in_flight >= MAX_IN_FLIGHT {
                continue;
            }
            if p.stalled {
                // Resume once every batch in flight is back, from the failed one.
                if p.in_flight > 0 {
                    continue;
                }
                p.stalled = false;
            }
            if p.retry_at_ms > now {
                next = next.min(p.retry_at_ms);
                continue;
            }
            if p.leader < 0 {
                metadata = true;
                continue;
            }
            // A new leader gets the partition's batches once the old one has answered.
            if (p.in_flight > 0 && p.in_flight_leader != p.leader) || full.contains(&p.leader) {
                continue;
            }
            let size = match p.ready.front() {
                Some(Queued::Sealed(s)) => s.record_bytes,
                Some(Queued::Closed(b)) if p.window.len() < MAX_IN_FLIGHT => b.len(),
                _ => continue,
            };
            let so_far = request_bytes.entry(p.leader).or_insert(0);
            if *so_far > 0 && *so_far + size > MAX_REQUEST_BYTES {
                continue;
            }
            *so_far += size;
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
                    p.window.push_back((base, false));
                    (base, b.len())
                }
            };
            p.in_flight += 1;
            p.in_flight_leader = p.leader;
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
    st.open_bytes = st.open_bytes.saturating_sub(closed_bytes);
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
        ResponseError::OutOfOrderSequenceNumber => Outcome::OutOfOrder(why),
        ResponseError::UnknownProducerId | ResponseError::InvalidProducerEpoch => {
            Outcome::Fatal(why)
        }
        e if e.is_retriable() => Outcome::Retry(why),
        _ => Outcome::Fatal(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEADER: i32 = 1;

    fn with_partitions(count: usize) -> State {
        let mut st = State::default();
        st.topics.insert(
            "t".into(),
            Topic {
                status: TopicStatus::Known,
                partitions: (0..count).map(|_| Partition::new(LEADER)).collect(),
            },
        );
        st
    }

    fn one_partition(open_at_ms: u64) -> State {
        let mut st = with_partitions(1);
        let mut batch = OpenBatch::new(open_at_ms, 1024);
        batch.push(open_at_ms, 1, 0, b"k", b"v", None);
        st.open_bytes = batch.len();
        st.queued_bytes = batch.len();
        partition(&mut st, 0).open = Some(batch);
        st
    }

    fn partition(st: &mut State, index: usize) -> &mut Partition {
        match st
            .topics
            .get_mut("t")
            .and_then(|t| t.partitions.get_mut(index))
        {
            Some(p) => p,
            None => unreachable!("no partition {index}"),
        }
    }

    /// Queue a closed batch of `count` records of file `partition`, sequences from `first`.
    fn queue_batch(st: &mut State, index: usize, first: u64, count: u64) {
        let mut b = OpenBatch::new(0, 256);
        for seq in first..first + count {
            b.push(0, index as u64, seq, b"k", b"v", None);
        }
        st.queued_bytes += b.len();
        st.batches += 1;
        partition(st, index).ready.push_back(Queued::Closed(b));
    }

    /// What the sender does with taken batches before sending them: seal and stamp.
    fn seal(taken: &mut [Taken]) {
        for t in taken {
            let sealed = match std::mem::replace(&mut t.batch, Queued::Closed(OpenBatch::new(0, 0)))
            {
                Queued::Sealed(s) => s,
                Queued::Closed(b) => match b.seal(Codec::None, -1) {
                    Ok(s) => s,
                    Err(e) => unreachable!("sealing without compression: {e}"),
                },
            };
            let mut sealed = sealed;
            let _ = sealed.stamp(7, 0, t.base_sequence);
            t.batch = Queued::Sealed(sealed);
        }
    }

    fn count_of(t: &Taken) -> i32 {
        match &t.batch {
            Queued::Sealed(s) => s.count,
            Queued::Closed(b) => b.count(),
        }
    }

    #[test]
    fn a_batch_is_not_closed_by_age_before_it_is_due() {
        let mut st = one_partition(100);
        let (taken, next) = take_work(&mut st, 104, 5, &[]);
        assert!(taken.is_empty());
        assert_eq!(next, 105);
        assert!(partition(&mut st, 0).open.is_some());
    }

    #[test]
    fn a_due_batch_keeps_filling_while_its_partition_waits_for_an_answer() {
        let mut st = one_partition(100);
        partition(&mut st, 0).in_flight = 1;
        partition(&mut st, 0).in_flight_leader = LEADER;
        let (taken, _) = take_work(&mut st, 200, 5, &[]);
        assert!(taken.is_empty(), "nothing queued to go");
        let p = partition(&mut st, 0);
        assert!(
            p.ready.is_empty(),
            "no small batch queued behind the one in flight"
        );
        assert!(
            p.open.is_some(),
            "the open batch stays open for more records"
        );

        // Answered: the grown batch closes and goes at the next turn.
        p.in_flight = 0;
        let (taken, _) = take_work(&mut st, 201, 5, &[]);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].base_sequence, 0);
        assert!(partition(&mut st, 0).open.is_none());
        assert_eq!(partition(&mut st, 0).in_flight, 1);
        assert_eq!(st.open_bytes, 0);
    }

    #[test]
    fn queued_batches_go_without_waiting_for_answers_up_to_the_limit() {
        let mut st = with_partitions(1);
        for k in 0..(MAX_IN_FLIGHT as u64 + 2) {
            queue_batch(&mut st, 0, k * 3, 3);
        }
        let mut bases = Vec::new();
        for _ in 0..MAX_IN_FLIGHT {
            let (taken, _) = take_work(&mut st, 0, 5, &[]);
            assert_eq!(taken.len(), 1, "one batch of the partition per request");
            bases.push(taken[0].base_sequence);
        }
        assert_eq!(bases, vec![0, 3, 6, 9, 12]);
        let (taken, _) = take_work(&mut st, 0, 5, &[]);
        assert!(
            taken.is_empty(),
            "{MAX_IN_FLIGHT} batches in flight at most"
        );
        assert_eq!(partition(&mut st, 0).ready.len(), 2);
    }

    #[test]
    fn a_request_holds_batches_up_to_its_cap_and_every_partition_gets_its_turn() {
        let partitions = 10;
        let mut st = with_partitions(partitions);
        for index in 0..partitions {
            let mut b = OpenBatch::new(0, 1024);
            while b.len() < MAX_REQUEST_BYTES * 3 / 10 {
                b.push(0, index as u64, 0, b"k", &[b'v'; 1000], None);
            }
            partition(&mut st, index).ready.push_back(Queued::Closed(b));
        }
        let mut order = Vec::new();
        let mut firsts = Vec::new();
        loop {
            let (taken, _) = take_work(&mut st, 0, 5, &[]);
            if taken.is_empty() {
                break;
            }
            let bytes: usize = taken.iter().map(|t| t.record_bytes).sum();
            assert!(bytes <= MAX_REQUEST_BYTES, "{bytes} bytes in one request");
            // Three batches of 30% fit in one request; the last takes what is left.
            assert!(
                taken.len() == 3 || order.len() + taken.len() == partitions,
                "{} batches taken",
                taken.len()
            );
            firsts.push(taken[0].partition);
            order.extend(taken.iter().map(|t| t.partition));
        }
        order.sort_unstable();
        assert_eq!(
            order,
            (0..partitions as i32).collect::<Vec<_>>(),
            "each batch taken once"
        );
        firsts.dedup();
        assert!(firsts.len() > 1, "the start moves on: {firsts:?}");
        // One batch larger than the cap still goes, alone.
        let mut st = with_partitions(2);
        for index in 0..2 {
            let mut b = OpenBatch::new(0, 1024);
            while b.len() <= MAX_REQUEST_BYTES {
                b.push(0, index as u64, 0, b"k", &[b'v'; 1000], None);
            }
            partition(&mut st, index).ready.push_back(Queued::Closed(b));
        }
        assert_eq!(take_work(&mut st, 0, 5, &[]).0.len(), 1);
        assert_eq!(take_work(&mut st, 0, 5, &[]).0.len(), 1);
    }

    #[test]
    fn a_connection_with_its_requests_in_flight_full_gets_nothing() {
        let mut st = with_partitions(2);
        queue_batch(&mut st, 0, 0, 1);
        queue_batch(&mut st, 1, 0, 1);
        let (taken, _) = take_work(&mut st, 0, 5, &[LEADER]);
        assert!(taken.is_empty());
        let (taken, _) = take_work(&mut st, 0, 5, &[]);
        assert_eq!(taken.len(), 2);
    }

    #[test]
    fn a_failed_batch_and_those_after_it_go_again_in_order_once_all_are_back() {
        let mut st = with_partitions(1);
        for k in 0..4 {
            queue_batch(&mut st, 0, k * 2, 2);
        }
        let mut requests = Vec::new();
        for _ in 0..3 {
            let (mut taken, _) = take_work(&mut st, 0, 5, &[]);
            seal(&mut taken);
            requests.push(taken);
        }
        // The first fails retriably; the second is refused as out of order (the broker
        // misses the first); nothing more goes while the third is out.
        let mut requests = requests.into_iter();
        let first = requests.next().into_iter().flatten();
        settle(
            &mut st,
            first
                .map(|t| (t, Outcome::Retry("NotLeaderOrFollower".into())))
                .collect(),
            0,
            60_000,
        );
        let second = requests.next().into_iter().flatten();
        settle(
            &mut st,
            second
                .map(|t| (t, Outcome::OutOfOrder("gap".into())))
                .collect(),
            0,
            60_000,
        );
        assert!(st.broken.is_none(), "{:?}", st.broken);
        let (taken, _) = take_work(&mut st, 1_000, 5, &[]);
        assert!(taken.is_empty(), "stalled while a batch is in flight");
        let third = requests.next().into_iter().flatten();
        settle(
            &mut st,
            third
                .map(|t| (t, Outcome::OutOfOrder("gap".into())))
                .collect(),
            0,
            60_000,
        );
        let mut bases = Vec::new();
        for _ in 0..4 {
            let (taken, _) = take_work(&mut st, 1_000, 5, &[]);
            assert_eq!(taken.len(), 1);
            bases.push(taken[0].base_sequence);
        }
        assert_eq!(
            bases,
            vec![0, 2, 4, 6],
            "re-sent in sequence order, then the new one"
        );
        assert!(st.broken.is_none());
        assert!(st.reports.is_empty());
    }

    #[test]
    fn out_of_order_with_no_earlier_failure_breaks_the_sink() {
        let mut st = with_partitions(1);
        queue_batch(&mut st, 0, 0, 1);
        let (taken, _) = take_work(&mut st, 0, 5, &[]);
        settle(
            &mut st,
            taken
                .into_iter()
                .map(|t| (t, Outcome::OutOfOrder("gap".into())))
                .collect(),
            0,
            60_000,
        );
        assert!(st.broken.is_some());
    }

    #[test]
    fn a_new_leader_gets_batches_once_the_old_one_answered() {
        let mut st = with_partitions(1);
        queue_batch(&mut st, 0, 0, 1);
        queue_batch(&mut st, 0, 1, 1);
        let (first, _) = take_work(&mut st, 0, 5, &[]);
        assert_eq!(first.len(), 1);
        partition(&mut st, 0).leader = 2;
        let (taken, _) = take_work(&mut st, 0, 5, &[]);
        assert!(
            taken.is_empty(),
            "the old leader has a batch of the partition"
        );
        settle(
            &mut st,
            first.into_iter().map(|t| (t, Outcome::Delivered)).collect(),
            0,
            60_000,
        );
        let (taken, _) = take_work(&mut st, 0, 5, &[]);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].leader, 2);
        assert_eq!(taken[0].base_sequence, 1);
    }

    #[test]
    fn new_batches_wait_while_five_were_sent_since_the_oldest_unacknowledged() {
        let mut st = with_partitions(1);
        for seq in 0..7 {
            queue_batch(&mut st, 0, seq, 1);
        }
        let (mut first, _) = take_work(&mut st, 0, 5, &[]);
        let (mut second, _) = take_work(&mut st, 0, 5, &[]);
        seal(&mut first);
        seal(&mut second);
        // Sequence 0 is refused (its first try may be written, the answer lost); 1 is
        // acknowledged while 0 waits for its retry.
        let retry = |t| (t, Outcome::Retry("NotLeaderOrFollower".into()));
        settle(&mut st, first.into_iter().map(retry).collect(), 0, 60_000);
        let delivered = |t| (t, Outcome::Delivered);
        settle(
            &mut st,
            second.into_iter().map(delivered).collect(),
            0,
            60_000,
        );
        let mut sent = Vec::new();
        loop {
            let (taken, _) = take_work(&mut st, RETRY_BACKOFF_MS, 5, &[]);
            if taken.is_empty() {
                break;
            }
            sent.extend(taken.iter().map(|t| t.base_sequence));
        }
        // The retry and three new batches: a broker that wrote 0 and 1 then still remembers
        // 0 among its last five when the retry of 0 arrives after 2, 3 and 4.
        assert_eq!(sent, [0, 2, 3, 4]);
    }

    #[test]
    fn sequences_compare_across_the_wrap() {
        assert!(sequence_after(5, 3));
        assert!(!sequence_after(3, 5));
        assert!(!sequence_after(3, 3));
        assert!(sequence_after(2, i32::MAX - 1));
        assert!(!sequence_after(i32::MAX - 1, 2));
    }

    #[test]
    fn flushing_queues_every_open_batch() {
        let mut st = one_partition(100);
        close_open_batches(&mut st);
        assert_eq!(st.open_bytes, 0);
        assert_eq!(st.batches, 1);
        assert!(partition(&mut st, 0).open.is_none());
    }

    /// A broker partition as Kafka's log keeps an idempotent producer's batches: the next
    /// sequence is appended, a repeat of one of the last 5 batches is acknowledged without
    /// writing, anything else is out of order.
    #[derive(Default)]
    struct ModelPartition {
        next: i32,
        recent: VecDeque<(i32, i32)>,
        /// (file, seq) of every record written, in log order.
        log: Vec<(u64, u64)>,
    }

    impl ModelPartition {
        fn append(&mut self, t: &Taken) -> Outcome {
            let last = t.base_sequence + count_of(t) - 1;
            if self.recent.contains(&(t.base_sequence, last)) {
                return Outcome::Delivered;
            }
            if t.base_sequence != self.next {
                return Outcome::OutOfOrder(format!(
                    "{} where {} was due",
                    t.base_sequence, self.next
                ));
            }
            let Queued::Sealed(s) = &t.batch else {
                unreachable!("sent batches are sealed")
            };
            for r in &s.runs {
                self.log
                    .extend((0..u64::from(r.count)).map(|k| (r.file_key, r.first_seq + k)));
            }
            self.next = last + 1;
            self.recent.push_back((t.base_sequence, last));
            if self.recent.len() > 5 {
                self.recent.pop_front();
            }
            Outcome::Delivered
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Queue a batch of this many records on this partition.
        Queue(usize, u64),
        /// Take what may go and send it as one request.
        Send,
        /// The oldest request's answer: written and answered; or the partition at this index
        /// refused retriably (not written); or written but the answer lost with the
        /// connection; or not even received (the connection dropped first). A lost
        /// connection fails every request in flight after it too, of which the broker
        /// received this many.
        Answer(Fault),
    }

    #[derive(Debug, Clone)]
    enum Fault {
        None,
        Refused(usize),
        AnswerLost(usize),
        NotReceived(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0usize..3, 1u64..4).prop_map(|(p, n)| Step::Queue(p, n)),
            3 => Just(Step::Send),
            3 => Just(Step::Answer(Fault::None)),
            1 => (0usize..3).prop_map(|i| Step::Answer(Fault::Refused(i))),
            1 => (0usize..5).prop_map(|k| Step::Answer(Fault::AnswerLost(k))),
            1 => (0usize..5).prop_map(|k| Step::Answer(Fault::NotReceived(k))),
        ]
    }

    /// The broker's side of one request: each batch appended (or not) and its outcome.
    fn answer(
        broker: &mut [ModelPartition],
        request: Vec<Taken>,
        fault: &Fault,
        received: bool,
    ) -> Vec<(Taken, Outcome)> {
        request
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let written = match fault {
                    _ if !received => None,
                    Fault::Refused(bad) if *bad == i => None,
                    _ => Some(broker[t.partition as usize].append(&t)),
                };
                let outcome = match (fault, written) {
                    (Fault::None | Fault::Refused(_), Some(o)) => o,
                    (Fault::Refused(_), None) => Outcome::Retry("NotLeaderOrFollower".into()),
                    _ => Outcome::Retry("connection reset".into()),
                };
                (t, outcome)
            })
            .collect()
    }

    proptest! {
        /// Whatever requests fail, however, every record is written once, in the order it was
        /// queued, and reported once, with no gap breaking the sink.
        #[test]
        fn pipelined_batches_are_written_once_in_order_through_failures(
            steps in proptest::collection::vec(step(), 1..120)
        ) {
            const PARTITIONS: usize = 3;
            let mut st = with_partitions(PARTITIONS);
            let mut broker: Vec<ModelPartition> =
                (0..PARTITIONS).map(|_| ModelPartition::default()).collect();
            let mut in_flight: VecDeque<Vec<Taken>> = VecDeque::new();
            let mut queued = [0u64; PARTITIONS];
            let mut now = 0;
            let mut run = |st: &mut State,
                           broker: &mut Vec<ModelPartition>,
                           in_flight: &mut VecDeque<Vec<Taken>>,
                           step: &Step| {
                now += RETRY_BACKOFF_MS / 2;
                match step {
                    Step::Queue(p, n) => {
                        queue_batch(st, *p, queued[*p], *n);
                        queued[*p] += n;
                    }
                    Step::Send => {
                        let full = if in_flight.len() >= MAX_IN_FLIGHT { vec![LEADER] } else { vec![] };
                        let (mut taken, _) = take_work(st, now, 5, &full);
                        if !taken.is_empty() {
                            seal(&mut taken);
                            in_flight.push_back(taken);
                        }
                    }
                    Step::Answer(fault) => {
                        let Some(request) = in_flight.pop_front() else { return };
                        let received = !matches!(fault, Fault::NotReceived(_));
                        let outcomes = answer(broker, request, fault, received);
                        settle(st, outcomes, now, u64::MAX);
                        let lost = match fault {
                            Fault::AnswerLost(k) | Fault::NotReceived(k) => Some(*k),
                            _ => None,
                        };
                        // The connection is gone: every later request fails too, the first
                        // `k` of them received and written by the broker.
                        if let Some(k) = lost {
                            for (j, request) in in_flight.drain(..).enumerate() {
                                let outcomes = answer(broker, request, &Fault::AnswerLost(0), j < k)
                                    .into_iter()
                                    .map(|(t, _)| (t, Outcome::Retry("connection reset".into())))
                                    .collect();
                                settle(st, outcomes, now, u64::MAX);
                            }
                        }
                    }
                }
            };
            for s in &steps {
                run(&mut st, &mut broker, &mut in_flight, s);
                prop_assert!(st.broken.is_none(), "broken: {:?}", st.broken);
            }
            // Then no more failures until everything is answered.
            for _ in 0..10_000 {
                if st.batches == 0 && in_flight.is_empty() {
                    break;
                }
                run(&mut st, &mut broker, &mut in_flight, &Step::Send);
                run(&mut st, &mut broker, &mut in_flight, &Step::Answer(Fault::None));
                prop_assert!(st.broken.is_none(), "broken: {:?}", st.broken);
            }
            prop_assert_eq!(st.batches, 0);
            prop_assert_eq!(st.queued_bytes, 0);
            for (p, model) in broker.iter().enumerate() {
                let expected: Vec<(u64, u64)> = (0..queued[p]).map(|s| (p as u64, s)).collect();
                prop_assert_eq!(&model.log, &expected, "partition {}", p);
            }
            let mut reported: Vec<(u64, u64)> =
                st.reports.iter().map(|d| (d.file_key, d.seq)).collect();
            reported.sort_unstable();
            let mut expected: Vec<(u64, u64)> = (0..PARTITIONS)
                .flat_map(|p| (0..queued[p]).map(move |s| (p as u64, s)))
                .collect();
            expected.sort_unstable();
            prop_assert_eq!(reported, expected);
        }
    }
}
