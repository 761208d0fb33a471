//! `qanat-bench`: load generator for the Qanat broker and for NATS JetStream as the peer.
//!
//! What it measures (one JSON line per run on stdout, diagnostics on stderr):
//!
//! - `kafka-produce`: produce throughput (records/s, MB/s of record *values*, MB = 10^6 bytes)
//!   of librdkafka against a Kafka-wire broker (Qanat, spec A1–A5), and per-record latency
//!   from `send` to the delivery report (hdrhistogram, p50/p99/p99.9). Without `--rate` it
//!   runs open-loop as fast as the client queue allows (max throughput, latency then includes
//!   queueing); with `--rate` sends are paced by a token bucket so latency reflects a
//!   sustainable load. `--partitioner` spreads the keyless records sticky, the default and
//!   the clients' own for keyless records (a batch's worth to one partition, then the next),
//!   or round-robin, record by record (the worst case: the smallest batches).
//! - `kafka-consume`: read throughput of a partition-assigned consumer (no consumer group)
//!   from offset 0 until N records arrived (or `--max-secs` passed); with `--group G` a real
//!   group member instead (subscribe, earliest, auto-commit), timed from its first record (to
//!   its last with `--stop-file`, which ends a reader tailing a topic once it has read what
//!   its writer wrote) — `bench/fanout.sh` runs many groups at once.
//! - `nats-produce` / `nats-consume`: the same workloads against NATS JetStream with a
//!   file-storage stream (partitions = subjects `S.0 … S.{P-1}`); latency is publish → ack,
//!   with a bounded window of pending acks (async) or one at a time (sync).
//!
//! Throughput windows run from the first send (or the consumer's assignment) to the last
//! delivery report (or the N-th record received). All traffic goes to addresses given on the
//! command line; `bench/broker.sh` only ever passes 127.0.0.1.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "qanat-bench",
    about = "Benchmark Qanat (Kafka wire) and NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Produce records to a Kafka-wire broker and report throughput and latency.
    KafkaProduce(KafkaProduceArgs),
    /// Read records back from offset 0 of every partition and report throughput.
    KafkaConsume(KafkaConsumeArgs),
    /// Publish to a JetStream file stream (created or replaced) and report throughput/latency.
    NatsProduce(NatsProduceArgs),
    /// Read a JetStream stream from the start and report throughput.
    NatsConsume(NatsConsumeArgs),
    /// Delete a JetStream stream (no error if it does not exist).
    NatsDeleteStream(NatsDeleteArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Acks {
    #[value(name = "1")]
    One,
    #[value(name = "all")]
    All,
}

/// Which producer `kafka-produce` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProduceClient {
    /// The agent's native producer (`qanat_agent::sink::native`).
    Native,
    Librdkafka,
}

/// How `kafka-produce` spreads its keyless records over the partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Partitioner {
    /// What the clients do with keyless records (Kafka's producer since KIP-480, librdkafka's
    /// `sticky.partitioning.linger.ms`): fill one partition's batch, then move on. librdkafka
    /// is given no partition and no key and chooses itself; the native producer moves to the
    /// next partition after every `--batch-bytes` of records.
    Sticky,
    /// Every record to the next partition: the smallest batches, the worst case.
    RoundRobin,
}

#[derive(Debug, clap::Args)]
struct KafkaProduceArgs {
    #[arg(long)]
    bootstrap: String,
    /// The producer: librdkafka, or the agent's native one.
    #[arg(long, value_enum, default_value = "librdkafka")]
    client: ProduceClient,
    #[arg(long)]
    topic: String,
    /// Number of partitions of the topic (0..P).
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// How records are spread over the partitions; by default as the clients do.
    #[arg(long, value_enum, default_value = "sticky")]
    partitioner: Partitioner,
    /// Value size of each record in bytes (records have no key).
    #[arg(long)]
    record_size: usize,
    /// Records to send (upper bound when --max-secs stops earlier).
    #[arg(long)]
    count: u64,
    #[arg(long, value_enum, default_value = "1")]
    acks: Acks,
    /// Target send rate in records/s (token bucket); unlimited when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop sending after this many seconds even if --count is not reached.
    #[arg(long)]
    max_secs: Option<f64>,
    #[arg(long, default_value_t = 5)]
    linger_ms: u32,
    #[arg(long, default_value_t = 1 << 20)]
    batch_bytes: u32,
    /// librdkafka compression.type (none, gzip, snappy, lz4, zstd).
    #[arg(long, default_value = "none")]
    compression: String,
    /// librdkafka queue.buffering.max.kbytes: client-side buffer. Bounds queueing latency
    /// and the flush time after --max-secs in saturation runs.
    #[arg(long, default_value_t = 32_768)]
    queue_kbytes: u32,
    /// librdkafka message.timeout.ms: a record not acknowledged by then fails.
    #[arg(long, default_value_t = 60_000)]
    message_timeout_ms: u32,
    /// Extra librdkafka property KEY=VALUE (repeatable), e.g. security settings.
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Also print latency per window of this many ms of send time on stderr.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    latency_timeline_ms: Option<u64>,
}

fn parse_property(text: &str) -> std::result::Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

#[derive(Debug, clap::Args)]
struct KafkaConsumeArgs {
    #[arg(long)]
    bootstrap: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Stop after this many records.
    #[arg(long)]
    count: u64,
    /// Give up when no record arrived for this many seconds.
    #[arg(long, default_value_t = 30)]
    idle_timeout_secs: u64,
    /// Join this consumer group and subscribe (broker-side group coordination, committed
    /// offsets, auto.offset.reset=earliest) instead of assigning partitions from offset 0.
    /// Rebalances are reported on stderr as `qanat-bench: assigned [..] at_ms=EPOCH_MS`.
    #[arg(long)]
    group: Option<String>,
    /// Stop reading after this many seconds (measured from the first record) even if --count
    /// is not reached; the result then covers that window.
    #[arg(long)]
    max_secs: Option<f64>,
    /// Stop, successfully, once this file holds `RECORDS DEADLINE_EPOCH_MS` and RECORDS were
    /// read or the deadline passed: a reader tailing a topic ends when it has read what its
    /// writer wrote (checked every 100 ms). The window then ends at the last record, and the
    /// result carries `first_record_ms` and `last_record_ms` (epoch).
    #[arg(long)]
    stop_file: Option<std::path::PathBuf>,
    /// session.timeout.ms with --group.
    #[arg(long, default_value_t = 6000)]
    session_timeout_ms: u32,
    /// Extra librdkafka property KEY=VALUE (repeatable), e.g. security settings or fetch
    /// sizes; it overrides the reader's own throughput settings (10 MiB per partition per
    /// fetch, 256 MiB queued).
    #[arg(long = "property", value_parser = parse_property)]
    properties: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AckMode {
    Sync,
    Async,
}

#[derive(Debug, clap::Args)]
struct NatsProduceArgs {
    #[arg(long, default_value = "127.0.0.1:4222")]
    server: String,
    /// Stream name; it captures subjects `S.>` and is deleted and recreated first.
    #[arg(long)]
    stream: String,
    /// Number of subjects (the JetStream analogue of partitions), round-robin.
    #[arg(long, default_value_t = 1)]
    subjects: u32,
    #[arg(long)]
    record_size: usize,
    #[arg(long)]
    count: u64,
    #[arg(long, value_enum, default_value = "async")]
    ack_mode: AckMode,
    /// Maximum pending (unacknowledged) publishes in async mode.
    #[arg(long, default_value_t = 4096)]
    window: usize,
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long)]
    max_secs: Option<f64>,
}

#[derive(Debug, clap::Args)]
struct NatsConsumeArgs {
    #[arg(long, default_value = "127.0.0.1:4222")]
    server: String,
    #[arg(long)]
    stream: String,
    #[arg(long)]
    count: u64,
    #[arg(long, default_value_t = 30)]
    idle_timeout_secs: u64,
    /// Delete the stream after reading it.
    #[arg(long)]
    delete: bool,
}

#[derive(Debug, clap::Args)]
struct NatsDeleteArgs {
    #[arg(long, default_value = "127.0.0.1:4222")]
    server: String,
    #[arg(long)]
    stream: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::KafkaProduce(a) => kafka_produce(&a),
        Cmd::KafkaConsume(a) => kafka_consume(&a),
        Cmd::NatsProduce(a) => runtime()?.block_on(nats_produce(&a)),
        Cmd::NatsConsume(a) => runtime()?.block_on(nats_consume(&a)),
        Cmd::NatsDeleteStream(a) => runtime()?.block_on(nats_delete(&a)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building tokio runtime")
}

// ------------------------------------------------------------------------------------------
// Shared helpers

/// Latency histogram in microseconds, 1 µs .. 10 min, 3 significant digits.
fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("creating histogram")
}

/// Per-record latencies: the run's histogram and, with `--latency-timeline-ms`, the same
/// split by send time into windows, so a tail can be placed in time (a stall at the start,
/// one per segment roll, a steady spread).
struct Latencies {
    hist: Histogram<u64>,
    window_us: u64,
    /// Send times count from here (µs on the caller's clock): the first send, not set-up.
    origin_us: u64,
    windows: Vec<Histogram<u64>>,
}

impl Latencies {
    fn new(timeline_ms: Option<u64>) -> Result<Self> {
        Ok(Self {
            hist: new_histogram()?,
            window_us: timeline_ms.unwrap_or(0).saturating_mul(1000),
            origin_us: 0,
            windows: Vec::new(),
        })
    }

    /// One record sent `sent_us` after the start that took `latency_us`.
    fn record(&mut self, sent_us: u64, latency_us: u64) {
        let latency_us = latency_us.max(1);
        self.hist.saturating_record(latency_us);
        if self.window_us == 0 {
            return;
        }
        let since = sent_us.saturating_sub(self.origin_us);
        let w = usize::try_from(since / self.window_us).unwrap_or(usize::MAX);
        while self.windows.len() <= w && self.windows.len() < 1 << 20 {
            let Ok(h) = new_histogram() else { return };
            self.windows.push(h);
        }
        if let Some(h) = self.windows.get_mut(w) {
            h.saturating_record(latency_us);
        }
    }

    /// The timeline on stderr, one line per window: start, records, p50, p99, max (ms).
    fn print_timeline(&self) {
        if self.window_us == 0 {
            return;
        }
        eprintln!(
            "qanat-bench: latency by send time: window_start_ms records p50_ms p99_ms max_ms"
        );
        for (i, h) in self.windows.iter().enumerate() {
            eprintln!(
                "{} {} {} {} {}",
                i as u64 * self.window_us / 1000,
                h.len(),
                quantile_ms(h, 0.5),
                quantile_ms(h, 0.99),
                h.max() as f64 / 1000.0
            );
        }
    }
}

/// A record value of `size` bytes with a non-trivial pattern (compression is off by default).
fn payload(size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// Token-bucket pacing: record `i` is due at `start + i / rate`. The caller sends everything
/// that is due and sleeps (coarsely, ≥1 ms at a time) only when it is ahead of schedule.
#[derive(Debug)]
struct Pacer {
    start: Instant,
    rate: Option<f64>,
}

impl Pacer {
    fn new(start: Instant, rate: Option<f64>) -> Result<Self> {
        if let Some(r) = rate {
            if !(r.is_finite() && r > 0.0) {
                bail!("--rate must be a positive number, got {r}");
            }
        }
        Ok(Self { start, rate })
    }

    /// How long, from `now`, to wait before record `i` may be sent (None: send now). The
    /// caller reads the clock once per record and passes it here and to `out_of_time` (and
    /// uses it as the send stamp where that is taken before the send): at a few hundred
    /// thousand records a second each read is CPU the measuring client takes from the broker
    /// it measures.
    fn wait_for(&self, i: u64, now: Instant) -> Option<Duration> {
        let rate = self.rate?;
        let due = self.start + Duration::from_secs_f64(i as f64 / rate);
        if due > now + Duration::from_millis(1) {
            Some(due - now)
        } else {
            None
        }
    }
}

fn out_of_time(start: Instant, max_secs: Option<f64>, now: Instant) -> bool {
    max_secs.is_some_and(|m| now.duration_since(start).as_secs_f64() >= m)
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// CPU time (user + system) of this process so far, every thread included, from
/// `/proc/self/stat` (in USER_HZ = 100 ticks a second on Linux); `None` elsewhere.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields after it are space-separated.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn print_result(
    records: u64,
    bytes: u64,
    secs: f64,
    hist: Option<&Histogram<u64>>,
    errors: u64,
    first_error: Option<String>,
) {
    println!(
        "{}",
        result_json(records, bytes, secs, hist, errors, first_error)
    );
}

fn result_json(
    records: u64,
    bytes: u64,
    secs: f64,
    hist: Option<&Histogram<u64>>,
    errors: u64,
    first_error: Option<String>,
) -> serde_json::Value {
    let secs = secs.max(1e-9);
    let mut v = json!({
        "records": records,
        "bytes": bytes,
        "secs": round(secs, 3),
        "mb_per_s": round(bytes as f64 / secs / 1e6, 2),
        "records_per_s": round(records as f64 / secs, 0),
    });
    if let Some(h) = hist {
        v["lat_p50_ms"] = json!(round(quantile_ms(h, 0.50), 3));
        v["lat_p99_ms"] = json!(round(quantile_ms(h, 0.99), 3));
        v["lat_p999_ms"] = json!(round(quantile_ms(h, 0.999), 3));
        v["lat_max_ms"] = json!(round(h.max() as f64 / 1000.0, 3));
    }
    v["errors"] = json!(errors);
    if let Some(cpu) = process_cpu_secs() {
        v["cpu_secs"] = json!(round(cpu, 2));
    }
    if let Some(e) = first_error {
        v["first_error"] = json!(e);
    }
    v
}

/// `RECORDS DEADLINE_EPOCH_MS` from a stop file; None while it is absent or incomplete.
fn read_stop_file(path: &std::path::Path) -> Option<(u64, u128)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace();
    let records = fields.next()?.parse().ok()?;
    let deadline = fields.next()?.parse().ok()?;
    Some((records, deadline))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

// ------------------------------------------------------------------------------------------
// Kafka

/// Client context that surfaces librdkafka warnings/errors on stderr (no logger is installed)
/// and collects delivery reports.
struct BenchContext {
    start: Instant,
    latencies: Mutex<Latencies>,
    delivered: AtomicU64,
    delivered_bytes: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    last_delivery_nanos: AtomicU64,
    /// librdkafka log/error lines seen; only the first few are printed.
    client_messages: AtomicU64,
}

/// How many librdkafka log/error lines are printed before the rest are only counted.
const MAX_CLIENT_MESSAGES: u64 = 20;

impl BenchContext {
    fn new(start: Instant, timeline_ms: Option<u64>) -> Result<Self> {
        Ok(Self {
            start,
            latencies: Mutex::new(Latencies::new(timeline_ms)?),
            delivered: AtomicU64::new(0),
            delivered_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            last_delivery_nanos: AtomicU64::new(0),
            client_messages: AtomicU64::new(0),
        })
    }

    fn client_message(&self, line: &str) {
        let n = self.client_messages.fetch_add(1, Ordering::Relaxed);
        if n < MAX_CLIENT_MESSAGES {
            eprintln!("{line}");
        } else if n == MAX_CLIENT_MESSAGES {
            eprintln!("librdkafka: further client messages suppressed");
        }
    }

    fn note_error(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut g) = self.first_error.lock() {
            if g.is_none() {
                eprintln!("qanat-bench: first error: {msg}");
                *g = Some(msg);
            }
        }
    }
}

impl ClientContext for BenchContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.client_message(&format!("librdkafka {level:?} {fac}: {log_message}"));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.client_message(&format!("librdkafka error: {error}: {reason}"));
    }
}

impl ConsumerContext for BenchContext {
    fn post_rebalance(
        &self,
        _consumer: &BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        let now_ms = epoch_ms();
        match rebalance {
            rdkafka::consumer::Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                eprintln!("qanat-bench: assigned {parts:?} at_ms={now_ms}");
            }
            rdkafka::consumer::Rebalance::Revoke(_) => {
                eprintln!("qanat-bench: revoked at_ms={now_ms}");
            }
            rdkafka::consumer::Rebalance::Error(e) => {
                eprintln!("qanat-bench: rebalance error {e} at_ms={now_ms}");
            }
        }
    }
}

impl ProducerContext for BenchContext {
    /// Send time in nanoseconds since `start`.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_nanos: usize) {
        let now = self.start.elapsed().as_nanos() as u64;
        match result {
            Ok(m) => {
                let lat_us = now.saturating_sub(sent_nanos as u64) / 1000;
                if let Ok(mut l) = self.latencies.lock() {
                    l.record(sent_nanos as u64 / 1000, lat_us);
                }
                self.delivered.fetch_add(1, Ordering::Relaxed);
                self.delivered_bytes
                    .fetch_add(m.payload_len() as u64, Ordering::Relaxed);
                self.last_delivery_nanos.fetch_max(now, Ordering::Relaxed);
            }
            Err((e, m)) => self.note_error(format!(
                "delivery failed (partition {}): {e}",
                m.partition()
            )),
        }
    }
}

fn kafka_produce(a: &KafkaProduceArgs) -> Result<()> {
    if a.partitions == 0 {
        bail!("--partitions must be at least 1");
    }
    if a.client == ProduceClient::Native {
        return native_produce(a);
    }
    let partitions = i32::try_from(a.partitions).context("--partitions too large")?;
    let acks = match a.acks {
        Acks::One => "1",
        Acks::All => "all",
    };
    let batch_msgs = (a.batch_bytes as usize / a.record_size.max(1)).clamp(10_000, 1_000_000);
    let start = Instant::now();
    let ctx = BenchContext::new(start, a.latency_timeline_ms)?;
    let mut config = ClientConfig::new();
    for (k, v) in &a.properties {
        config.set(k, v);
    }
    let producer: ThreadedProducer<BenchContext> = config
        .set("bootstrap.servers", &a.bootstrap)
        .set("client.id", "qanat-bench")
        .set("acks", acks)
        .set("linger.ms", a.linger_ms.to_string())
        .set("batch.size", a.batch_bytes.to_string())
        .set("batch.num.messages", batch_msgs.to_string())
        .set("compression.type", &a.compression)
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", a.queue_kbytes.to_string())
        .set("message.max.bytes", (16u32 << 20).to_string())
        .set("message.timeout.ms", a.message_timeout_ms.to_string())
        .set("socket.nagle.disable", "true")
        .set("enable.idempotence", "false")
        .create_with_context(ctx)
        .context("creating Kafka producer")?;

    // Warm up the connection and metadata so the measured window starts with a ready client.
    producer
        .client()
        .fetch_metadata(Some(&a.topic), Duration::from_secs(10))
        .with_context(|| format!("fetching metadata for topic {}", a.topic))?;

    let value = payload(a.record_size);
    let start_send = Instant::now();
    if let Ok(mut l) = producer.context().latencies.lock() {
        l.origin_us = start_send.duration_since(start).as_micros() as u64;
    }
    let pacer = Pacer::new(start_send, a.rate)?;
    let mut sent: u64 = 0;
    let mut queue_full_waits: u64 = 0;
    while sent < a.count {
        let now = Instant::now();
        if out_of_time(start_send, a.max_secs, now) {
            break;
        }
        if let Some(w) = pacer.wait_for(sent, now) {
            std::thread::sleep(w);
            continue;
        }
        let sent_nanos = now.duration_since(start).as_nanos() as usize;
        let mut record =
            BaseRecord::<(), [u8], usize>::with_opaque_to(&a.topic, sent_nanos).payload(&value[..]);
        if a.partitioner == Partitioner::RoundRobin {
            record = record.partition((sent % u64::from(a.partitions)) as i32 % partitions);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    queue_full_waits += 1;
                    std::thread::sleep(Duration::from_millis(1));
                    // Re-stamp: latency is measured from the moment librdkafka took the record.
                    let mut r = r;
                    r.delivery_opaque = start.elapsed().as_nanos() as usize;
                    record = r;
                }
                Err((e, _)) => bail!("send failed after {sent} records: {e}"),
            }
        }
        sent += 1;
    }
    let send_secs = start_send.elapsed().as_secs_f64();
    eprintln!(
        "qanat-bench: enqueued {sent} records in {send_secs:.2}s ({queue_full_waits} queue-full waits), flushing"
    );
    let flushed = producer.flush(Duration::from_secs(
        u64::from(a.message_timeout_ms) / 1000 + 30,
    ));
    let ctx = producer.context();
    if let Err(e) = flushed {
        ctx.note_error(format!(
            "flush: {e} ({} records still in flight)",
            producer.in_flight_count()
        ));
    }
    let delivered = ctx.delivered.load(Ordering::Relaxed);
    let bytes = ctx.delivered_bytes.load(Ordering::Relaxed);
    let errors = ctx.errors.load(Ordering::Relaxed);
    let end_nanos = ctx.last_delivery_nanos.load(Ordering::Relaxed);
    let secs = Duration::from_nanos(end_nanos)
        .saturating_sub(start_send.duration_since(start))
        .as_secs_f64();
    let first_error = ctx.first_error.lock().ok().and_then(|g| g.clone());
    let latencies = ctx
        .latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?;
    latencies.print_timeline();
    print_result(
        delivered,
        bytes,
        secs,
        Some(&latencies.hist),
        errors,
        first_error,
    );
    if delivered < sent {
        bail!("only {delivered} of {sent} records were acknowledged ({errors} delivery errors)");
    }
    Ok(())
}

/// The variable the SASL password is handed over in to the native producer, which reads
/// passwords from a file or the environment only.
const NATIVE_PASSWORD_ENV: &str = "QANAT_BENCH_SASL_PASSWORD";

/// The native producer's security settings from the librdkafka properties of the command line.
fn native_security(properties: &[(String, String)]) -> Result<qanat_config::KafkaSecurity> {
    let mut s = qanat_config::KafkaSecurity::default();
    for (k, v) in properties {
        match k.as_str() {
            "security.protocol" => s.protocol = Some(v.clone()),
            "sasl.mechanism" | "sasl.mechanisms" => s.mechanism = Some(v.clone()),
            "sasl.username" => s.username = Some(v.clone()),
            "sasl.password" => {
                // Before any thread of this process starts.
                std::env::set_var(NATIVE_PASSWORD_ENV, v);
                s.password_env = Some(NATIVE_PASSWORD_ENV.to_string());
            }
            "ssl.ca.location" => s.ca_file = Some(v.into()),
            "ssl.certificate.location" => s.cert_file = Some(v.into()),
            "ssl.key.location" => s.key_file = Some(v.into()),
            other => bail!("--property {other}: not taken by --client native"),
        }
    }
    Ok(s)
}

/// A key that the native producer's partitioner (CRC-32 of the key modulo the partition
/// count) sends to each partition, so the bench chooses each record's partition.
fn native_partition_keys(partitions: u32) -> Vec<String> {
    (0..partitions)
        .map(|p| {
            (0u64..)
                .map(|n| format!("bench-{n}"))
                .find(|k| crc32fast::hash(k.as_bytes()) % partitions == p)
                .unwrap_or_default()
        })
        .collect()
}

/// Delivery reports of the native producer, counted.
struct NativeTally {
    start: Instant,
    delivered: u64,
    errors: u64,
    last_delivery: Instant,
}

impl NativeTally {
    /// Count `reports` (emptied); latency from each record's send time in `sent_at`
    /// (microseconds since `start`, by sequence from 1).
    fn settle(
        &mut self,
        reports: &mut Vec<qanat_agent::sink::Delivery>,
        sent_at: &[u32],
        latencies: &mut Latencies,
    ) {
        if reports.is_empty() {
            return;
        }
        let now = Instant::now();
        let now_us = now.duration_since(self.start).as_micros() as u64;
        for r in reports.drain(..) {
            if r.ok {
                self.delivered += 1;
                let at = (r.seq as usize)
                    .checked_sub(1)
                    .and_then(|i| sent_at.get(i))
                    .copied()
                    .unwrap_or(0);
                latencies.record(u64::from(at), now_us.saturating_sub(u64::from(at)));
            } else {
                self.errors += 1;
            }
        }
        self.last_delivery = now;
    }
}

/// `kafka-produce --client native`: the agent's producer driven as the agent's loop drives
/// it (send until full, then wait for reports).
fn native_produce(a: &KafkaProduceArgs) -> Result<()> {
    use qanat_agent::config::{OutputConfig, ProducerKind};
    use qanat_agent::sink::native::batch::OpenBatch;
    use qanat_agent::sink::native::NativeSink;
    use qanat_agent::sink::{Delivery, Record, SendError, Sink, Trajectory};
    use std::sync::{Arc, Condvar};

    let output = OutputConfig {
        producer: ProducerKind::Native,
        bootstrap: a.bootstrap.clone(),
        batch_bytes: u64::from(a.batch_bytes),
        batch_age_ms: u64::from(a.linger_ms),
        compression: a.compression.clone(),
        compression_level: -1,
        delivery_timeout_ms: u64::from(a.message_timeout_ms),
        librdkafka: Default::default(),
        security: native_security(&a.properties)?,
    };
    if a.acks == Acks::One {
        eprintln!("qanat-bench: the native producer always asks acks=all (the same on one broker)");
    }
    let reported = Arc::new((Mutex::new(false), Condvar::new()));
    let waker = reported.clone();
    let mut sink = NativeSink::new(
        &output,
        "qanat-bench",
        u64::from(a.queue_kbytes) * 1024 / 2,
        Arc::new(move || {
            let (flag, cv) = &*waker;
            if let Ok(mut f) = flag.lock() {
                *f = true;
            }
            cv.notify_one();
        }),
    )
    .context("creating the native producer")?;
    // Wait up to `most` for delivery reports (woken as soon as one comes).
    let wait_for_reports_at_most = |sink: &NativeSink, most: Duration| {
        if sink.park() {
            sink.unpark();
            return;
        }
        let (flag, cv) = &*reported;
        if let Ok(mut f) = flag.lock() {
            if !*f {
                f = cv
                    .wait_timeout(f, most)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            *f = false;
        }
        sink.unpark();
    };
    let wait_for_reports = |sink: &NativeSink| {
        wait_for_reports_at_most(sink, Duration::from_millis(10));
    };
    let keys = native_partition_keys(a.partitions);
    let value = payload(a.record_size);
    let record_to = |index: u64, seq: u64| Record {
        topic: &a.topic,
        file_key: index,
        seq,
        payload: &value,
        trajectory: Trajectory {
            host: "qanat-bench",
            file_id: &keys[index as usize],
            path: "",
            offset: 0,
            size: value.len() as u64,
            lines: 1,
            attributes: &[],
        },
    };
    // Records in a row to one partition: one, or when sticky as many as fill a batch as the
    // producer encodes them (trajectory headers included), so the last of a run closes it.
    let run = match a.partitioner {
        Partitioner::RoundRobin => 1,
        Partitioner::Sticky => {
            let r = record_to(0, 1);
            let mut probe = OpenBatch::new(0, 0);
            probe.push(
                0,
                r.file_key,
                r.seq,
                r.trajectory.file_id.as_bytes(),
                r.payload,
                Some(&r.trajectory),
            );
            u64::from(a.batch_bytes)
                .div_ceil(probe.len().max(1) as u64)
                .max(1)
        }
    };
    let record = |seq: u64| record_to(seq / run % u64::from(a.partitions), seq);

    // Warm up (metadata, producer id, connections) with one record outside the window.
    let warm_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sink.send(&record(0)) {
            Ok(()) => break,
            Err(SendError::Full) if Instant::now() < warm_deadline => wait_for_reports(&sink),
            Err(e) => bail!("warm-up record: {e}"),
        }
    }
    sink.flush(Duration::from_secs(30));
    let mut reports: Vec<Delivery> = Vec::new();
    sink.drain(&mut reports);
    if !reports.iter().any(|r| r.ok) {
        bail!("the warm-up record was not acknowledged within 30 s");
    }
    reports.clear();

    let start = Instant::now();
    let mut latencies = Latencies::new(a.latency_timeline_ms)?;
    let mut sent_at: Vec<u32> = Vec::new();
    let mut tally = NativeTally {
        start,
        delivered: 0,
        errors: 0,
        last_delivery: start,
    };
    let pacer = Pacer::new(start, a.rate)?;
    let mut sent: u64 = 0;
    let mut full_waits: u64 = 0;
    while sent < a.count {
        let now = Instant::now();
        if out_of_time(start, a.max_secs, now) {
            break;
        }
        if let Some(w) = pacer.wait_for(sent, now) {
            // Ahead of the pace: take the reports as they come meanwhile, so their latency
            // is not stretched by the pause.
            wait_for_reports_at_most(&sink, w);
            sink.drain(&mut reports);
            tally.settle(&mut reports, &sent_at, &mut latencies);
            continue;
        }
        // Sequences from 1: 0 was the warm-up record.
        match sink.send(&record(sent + 1)) {
            Ok(()) => {
                sent_at.push(start.elapsed().as_micros() as u32);
                sent += 1;
                if sent.is_multiple_of(256) {
                    sink.drain(&mut reports);
                    tally.settle(&mut reports, &sent_at, &mut latencies);
                }
            }
            Err(SendError::Full) => {
                full_waits += 1;
                if sink.restart_if_broken() {
                    bail!("the native producer broke after {sent} records");
                }
                wait_for_reports(&sink);
                sink.drain(&mut reports);
                tally.settle(&mut reports, &sent_at, &mut latencies);
            }
            Err(e) => bail!("send failed after {sent} records: {e}"),
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "qanat-bench: native producer took {sent} records in {send_secs:.2}s ({full_waits} queue-full waits), flushing"
    );
    let flush_deadline =
        Instant::now() + Duration::from_secs(u64::from(a.message_timeout_ms) / 1000 + 30);
    while tally.delivered + tally.errors < sent && Instant::now() < flush_deadline {
        sink.flush(Duration::from_millis(100));
        sink.drain(&mut reports);
        tally.settle(&mut reports, &sent_at, &mut latencies);
        if sink.restart_if_broken() {
            bail!("the native producer broke while flushing");
        }
    }
    let NativeTally {
        delivered,
        errors,
        last_delivery,
        ..
    } = tally;
    let secs = last_delivery.duration_since(start).as_secs_f64();
    let first_error = (errors > 0).then(|| format!("{errors} records failed"));
    latencies.print_timeline();
    print_result(
        delivered,
        delivered * a.record_size as u64,
        secs,
        Some(&latencies.hist),
        errors,
        first_error,
    );
    if delivered < sent {
        bail!("only {delivered} of {sent} records were acknowledged");
    }
    Ok(())
}

fn kafka_consume(a: &KafkaConsumeArgs) -> Result<()> {
    let start = Instant::now();
    let ctx = BenchContext::new(start, None)?;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &a.bootstrap)
        .set("client.id", "qanat-bench")
        .set("enable.partition.eof", "false");
    match &a.group {
        Some(g) => config
            .set("group.id", g)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            .set("session.timeout.ms", a.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (a.session_timeout_ms / 10).max(100).to_string(),
            ),
        // librdkafka refuses assign() without a group.id; nothing is joined or committed.
        None => config
            .set("group.id", format!("qanat-bench-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false"),
    };
    config
        .set("fetch.max.bytes", (50u32 << 20).to_string())
        .set("max.partition.fetch.bytes", (10u32 << 20).to_string())
        .set("receive.message.max.bytes", (51u32 << 20).to_string())
        .set("queued.max.messages.kbytes", "262144")
        .set("queued.min.messages", "1000000")
        // Default is 1000 ms: a full local queue would otherwise idle the fetcher for a second.
        .set("fetch.queue.backoff.ms", "1")
        .set("fetch.wait.max.ms", "100");
    // Last, so that the command line overrides the settings above.
    for (k, v) in &a.properties {
        config.set(k, v);
    }
    let consumer: BaseConsumer<BenchContext> = config
        .create_with_context(ctx)
        .context("creating Kafka consumer")?;
    let mut t0 = Instant::now();
    if a.group.is_some() {
        consumer
            .subscribe(&[&a.topic])
            .context("subscribing to the topic")?;
    } else {
        let mut tpl = TopicPartitionList::new();
        for p in 0..a.partitions {
            let p = i32::try_from(p).context("--partitions too large")?;
            tpl.add_partition_offset(&a.topic, p, Offset::Offset(0))
                .with_context(|| format!("adding partition {p}"))?;
        }
        consumer.assign(&tpl).context("assigning partitions")?;
    }
    let mut first_record = true;
    let mut records: u64 = 0;
    let mut bytes: u64 = 0;
    let mut errors: u64 = 0;
    let mut first_error: Option<String> = None;
    let mut last_progress = Instant::now();
    let (mut first_record_ms, mut last_record_ms) = (0u128, 0u128);
    let idle = Duration::from_secs(a.idle_timeout_secs);
    let mut secs = None;
    let mut stop_checked = Instant::now();
    while records < a.count {
        if !first_record && out_of_time(t0, a.max_secs, Instant::now()) {
            break;
        }
        if let Some(path) = &a.stop_file {
            if stop_checked.elapsed() >= Duration::from_millis(100) {
                stop_checked = Instant::now();
                if let Some((target, deadline_ms)) = read_stop_file(path) {
                    if records >= target || epoch_ms() >= deadline_ms {
                        secs = Some(last_progress.duration_since(t0).as_secs_f64());
                        break;
                    }
                }
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if first_record {
                    first_record_ms = epoch_ms();
                    if a.group.is_some() {
                        // With a group the window starts at the first record, after the join.
                        t0 = Instant::now();
                    }
                }
                first_record = false;
                records += 1;
                bytes += m.payload_len() as u64;
                last_progress = Instant::now();
                last_record_ms = epoch_ms();
            }
            Some(Err(e)) => {
                errors += 1;
                if first_error.is_none() {
                    eprintln!("qanat-bench: consume error: {e}");
                    first_error = Some(e.to_string());
                }
            }
            None => {
                if last_progress.elapsed() >= idle {
                    let secs = t0.elapsed().as_secs_f64();
                    print_result(records, bytes, secs, None, errors, first_error);
                    bail!(
                        "stalled: no record for {}s after {records} of {} records",
                        a.idle_timeout_secs,
                        a.count
                    );
                }
            }
        }
    }
    let secs = secs.unwrap_or_else(|| t0.elapsed().as_secs_f64());
    let mut v = result_json(records, bytes, secs, None, errors, first_error);
    v["first_record_ms"] = json!(first_record_ms);
    v["last_record_ms"] = json!(last_record_ms);
    println!("{v}");
    Ok(())
}

// ------------------------------------------------------------------------------------------
// NATS JetStream

async fn nats_connect(server: &str) -> Result<async_nats::jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .name("qanat-bench")
        .connect(server)
        .await
        .with_context(|| format!("connecting to NATS at {server}"))?;
    Ok(async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .max_ack_inflight(1 << 16)
        .backpressure_on_inflight(true)
        .build(client))
}

async fn delete_stream_if_exists(js: &async_nats::jetstream::Context, name: &str) -> Result<()> {
    match js.delete_stream(name).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("not found") || msg.contains("10059") {
                Ok(())
            } else {
                Err(anyhow::Error::new(e).context(format!("deleting stream {name}")))
            }
        }
    }
}

async fn nats_delete(a: &NatsDeleteArgs) -> Result<()> {
    let js = nats_connect(&a.server).await?;
    delete_stream_if_exists(&js, &a.stream).await
}

type AckFuture = Pin<Box<dyn Future<Output = (Instant, Result<(), String>)> + Send>>;

async fn nats_produce(a: &NatsProduceArgs) -> Result<()> {
    use async_nats::jetstream::stream;
    if a.subjects == 0 {
        bail!("--subjects must be at least 1");
    }
    let js = nats_connect(&a.server).await?;
    delete_stream_if_exists(&js, &a.stream).await?;
    js.create_stream(stream::Config {
        name: a.stream.clone(),
        subjects: vec![format!("{}.>", a.stream)],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating stream {}", a.stream))?;

    let subjects: Vec<async_nats::Subject> = (0..a.subjects)
        .map(|i| async_nats::Subject::from(format!("{}.{i}", a.stream)))
        .collect();
    let value = bytes::Bytes::from(payload(a.record_size));
    let window = match a.ack_mode {
        AckMode::Sync => 1,
        AckMode::Async => a.window.max(1),
    };
    let mut hist = new_histogram()?;
    let mut pending: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    let mut acked: u64 = 0;
    let mut errors: u64 = 0;
    let mut first_error: Option<String> = None;
    let mut on_ack = |t0: Instant, r: Result<(), String>| match r {
        Ok(()) => {
            hist.saturating_record((t0.elapsed().as_micros() as u64).max(1));
            acked += 1;
        }
        Err(e) => {
            errors += 1;
            if first_error.is_none() {
                eprintln!("qanat-bench: publish failed: {e}");
                first_error = Some(e);
            }
        }
    };

    let start = Instant::now();
    let pacer = Pacer::new(start, a.rate)?;
    let mut sent: u64 = 0;
    while sent < a.count {
        let now = Instant::now();
        if out_of_time(start, a.max_secs, now) {
            break;
        }
        if let Some(w) = pacer.wait_for(sent, now) {
            // Collect acks while waiting so their latency is not inflated by the sleep.
            let sleep = tokio::time::sleep(w);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    Some((t0, r)) = pending.next(), if !pending.is_empty() => on_ack(t0, r),
                }
            }
            continue;
        }
        while pending.len() >= window {
            if let Some((t0, r)) = pending.next().await {
                on_ack(t0, r);
            }
        }
        let subject = subjects[(sent % u64::from(a.subjects)) as usize].clone();
        let t0 = Instant::now();
        match js.publish(subject, value.clone()).await {
            Ok(ack) => pending.push(Box::pin(async move {
                (t0, ack.await.map(|_| ()).map_err(|e| e.to_string()))
            })),
            Err(e) => on_ack(t0, Err(e.to_string())),
        }
        sent += 1;
    }
    while let Some((t0, r)) = pending.next().await {
        on_ack(t0, r);
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = acked * a.record_size as u64;
    print_result(acked, bytes, secs, Some(&hist), errors, first_error);
    if acked < sent {
        bail!("only {acked} of {sent} publishes were acknowledged");
    }
    Ok(())
}

async fn nats_consume(a: &NatsConsumeArgs) -> Result<()> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let js = nats_connect(&a.server).await?;
    let stream = js
        .get_stream(&a.stream)
        .await
        .with_context(|| format!("looking up stream {}", a.stream))?;
    let t0 = Instant::now();
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .context("creating pull consumer")?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(10_000)
        .max_bytes_per_batch(16 << 20)
        .messages()
        .await
        .context("starting pull stream")?;
    let idle = Duration::from_secs(a.idle_timeout_secs);
    let mut records: u64 = 0;
    let mut bytes: u64 = 0;
    let mut errors: u64 = 0;
    let mut first_error: Option<String> = None;
    let mut stalled = false;
    while records < a.count {
        match tokio::time::timeout(idle, messages.next()).await {
            Ok(Some(Ok(m))) => {
                records += 1;
                bytes += m.payload.len() as u64;
            }
            Ok(Some(Err(e))) => {
                errors += 1;
                if first_error.is_none() {
                    eprintln!("qanat-bench: fetch error: {e}");
                    first_error = Some(e.to_string());
                }
            }
            Ok(None) => {
                stalled = true;
                break;
            }
            Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(messages);
    print_result(records, bytes, secs, None, errors, first_error);
    if a.delete {
        delete_stream_if_exists(&js, &a.stream).await?;
    }
    if stalled {
        bail!("stalled after {records} of {} messages", a.count);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use super::{out_of_time, Pacer};

    #[test]
    fn the_pacer_holds_a_record_until_its_slot_and_lets_it_go_within_a_millisecond() {
        let start = Instant::now();
        let pacer = Pacer::new(start, Some(1000.0)).unwrap();
        // Record 100 is due 100 ms after the start.
        assert_eq!(pacer.wait_for(100, start), Some(Duration::from_millis(100)));
        assert_eq!(
            pacer.wait_for(100, start + Duration::from_millis(40)),
            Some(Duration::from_millis(60))
        );
        assert_eq!(
            pacer.wait_for(100, start + Duration::from_micros(99_500)),
            None
        );
        assert_eq!(
            pacer.wait_for(100, start + Duration::from_millis(150)),
            None
        );
        let unpaced = Pacer::new(start, None).unwrap();
        assert_eq!(unpaced.wait_for(1_000_000, start), None);
        assert!(Pacer::new(start, Some(0.0)).is_err());
        assert!(Pacer::new(start, Some(f64::NAN)).is_err());
    }

    #[test]
    fn a_run_is_out_of_time_from_its_limit_on() {
        let start = Instant::now();
        assert!(!out_of_time(
            start,
            Some(2.0),
            start + Duration::from_millis(1999)
        ));
        assert!(out_of_time(
            start,
            Some(2.0),
            start + Duration::from_secs(2)
        ));
        assert!(!out_of_time(start, None, start + Duration::from_secs(3600)));
    }
}
