//! Shared helpers for Qanat's integration tests.
//!
//! * [`Broker`] starts the real `qanat` binary on an ephemeral port with its own temporary data
//!   directory, learns its address from the `qanat broker listening on ...` line it prints on
//!   stdout (the readiness signal: no sleeps), and kills it when dropped.
//! * [`produce`] / [`consume`] talk to it with librdkafka (the `rdkafka` crate).
//!
//! Every wait in here is a poll loop on an observable condition with a deadline; a deadline
//! that passes is a test failure with a message saying what was being waited for.

// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tempfile::TempDir;

/// The binary under test, built by cargo for integration tests.
pub const QANAT_BIN: &str = env!("CARGO_BIN_EXE_qanat");

/// Upper bound for anything that should happen "soon" (readiness, delivery, consumption).
/// Generous on purpose: the machine is small and shared; this is a hang guard, not a timing
/// assertion.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Short pause between two observations in a poll loop.
pub const POLL_PAUSE: Duration = Duration::from_millis(25);

const LISTENING_PREFIX: &str = "qanat broker listening on ";
const METRICS_PREFIX: &str = "qanat metrics listening on ";

/// A `qanat broker` child process with its own temporary directory:
/// `<tmp>/data` (data dir), `<tmp>/qanat.toml` (optional config), `<tmp>/broker.stderr.log`.
pub struct Broker {
    child: Option<Child>,
    addr: String,
    metrics_addr: Option<String>,
    dir: TempDir,
    config_path: Option<PathBuf>,
    env: Vec<(String, String)>,
    metrics: bool,
    starts: usize,
}

/// Options for starting a [`Broker`].
#[derive(Default)]
pub struct BrokerBuilder {
    config: Option<String>,
    env: Vec<(String, String)>,
    metrics: bool,
}

impl BrokerBuilder {
    /// Extra configuration, written to a TOML file passed with `--config`.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// An environment variable for the broker process (e.g. `QANAT_STORAGE_FSYNC`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Also pass `--metrics-listen 127.0.0.1:0`.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    pub fn start(self) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("qanat-it-")
            .tempdir()
            .expect("create temp dir");
        fs::create_dir_all(dir.path().join("data")).expect("create data dir");
        let config_path = self.config.map(|toml| {
            let path = dir.path().join("qanat.toml");
            fs::write(&path, toml).expect("write config file");
            path
        });
        let mut broker = Broker {
            child: None,
            addr: String::new(),
            metrics_addr: None,
            dir,
            config_path,
            env: self.env,
            metrics: self.metrics,
            starts: 0,
        };
        broker
            .spawn("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("broker did not start: {e}"));
        broker
    }
}

impl Broker {
    /// A broker with the default configuration.
    pub fn start() -> Broker {
        BrokerBuilder::default().start()
    }

    /// A broker with `toml` as its `--config` file.
    pub fn with_config(toml: &str) -> Broker {
        BrokerBuilder::default().config(toml).start()
    }

    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// `HOST:PORT` the broker printed on its listening line.
    pub fn bootstrap(&self) -> String {
        self.addr.clone()
    }

    pub fn port(&self) -> u16 {
        port_of(&self.addr)
    }

    /// `HOST:PORT` of the metrics listener, when started with [`BrokerBuilder::metrics`].
    pub fn metrics_addr(&self) -> Option<String> {
        self.metrics_addr.clone()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `DATA_DIR/<topic>-<partition>`.
    pub fn partition_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.data_dir().join(format!("{topic}-{partition}"))
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("broker.stderr.log")
    }

    /// Everything the broker (all its incarnations) wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// The last `n` lines of [`Broker::stderr`].
    pub fn stderr_tail(&self, n: usize) -> String {
        let all = self.stderr();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// Exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM and wait for a graceful exit; panics if it does not exit within the deadline
    /// or exits unsuccessfully (the contract is: SIGTERM -> flush -> exit 0).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("broker is not running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "broker had already exited ({status}) before SIGTERM; stderr:\n{}",
                self.stderr_tail(50)
            );
        }
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", child.id());
        let status = wait_with_deadline(&mut child, DEADLINE).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "broker did not exit within {DEADLINE:?} after SIGTERM; stderr:\n{}",
                self.stderr_tail(50)
            )
        });
        assert!(
            status.success(),
            "broker exited with {status} after SIGTERM (expected graceful exit 0); stderr:\n{}",
            self.stderr_tail(50)
        );
        status
    }

    /// SIGKILL the broker and reap it. No flush, no graceful anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("broker is not running");
        // std's Child::kill sends SIGKILL on Unix.
        child.kill().expect("SIGKILL broker");
        child.wait().expect("reap killed broker");
    }

    /// Gracefully stop (SIGTERM) the broker if it is running, then start it again on the SAME
    /// port and data dir.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.start_again();
    }

    /// Start the broker again on the same port and data dir after [`Broker::kill9`] or
    /// [`Broker::stop`]. Retries while the port is briefly unavailable (the old listener or
    /// another test's connection can hold it for a moment), up to the deadline.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "broker is still running");
        let listen = format!("127.0.0.1:{}", self.port());
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.spawn(&listen) {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart on {listen} failed, retrying: {e}");
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("broker did not restart on {listen}: {e}"),
            }
        }
    }

    fn spawn(&mut self, listen: &str) -> Result<(), String> {
        self.starts += 1;
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .map_err(|e| format!("open stderr log: {e}"))?;
        {
            use std::io::Write;
            let mut marker = &stderr;
            let _ = writeln!(
                marker,
                "===== test harness: start #{} on {listen} =====",
                self.starts
            );
        }
        let mut cmd = Command::new(QANAT_BIN);
        cmd.arg("broker")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(listen);
        if let Some(path) = &self.config_path {
            cmd.arg("--config").arg(path);
        }
        if self.metrics {
            cmd.arg("--metrics-listen").arg("127.0.0.1:0");
        }
        scrub_qanat_env(&mut cmd);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().map_err(|e| format!("spawn {QANAT_BIN}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");

        // Read stdout on a thread until EOF (so the broker never blocks on a full pipe) and
        // report the listening line(s) back.
        let (tx, rx) = mpsc::channel::<(bool, String)>();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix(METRICS_PREFIX) {
                    let _ = tx.send((false, addr.trim().to_string()));
                } else if let Some(addr) = line.strip_prefix(LISTENING_PREFIX) {
                    let _ = tx.send((true, addr.trim().to_string()));
                } else {
                    eprintln!("[qanat stdout] {line}");
                }
            }
        });

        let deadline = Instant::now() + DEADLINE;
        let mut metrics_addr = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((false, addr)) => metrics_addr = Some(addr),
                Ok((true, addr)) => {
                    if port_of(&addr) == 0 {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!("broker printed a bad listening address {addr:?}"));
                    }
                    self.addr = addr;
                    self.metrics_addr = metrics_addr;
                    self.child = Some(child);
                    return Ok(());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_with_deadline(&mut child, DEADLINE);
                    return Err(format!(
                        "broker closed stdout without printing '{LISTENING_PREFIX}HOST:PORT' \
                         (exit status {status:?}); stderr:\n{}",
                        self.stderr_tail(40)
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "broker did not print '{LISTENING_PREFIX}HOST:PORT' within {DEADLINE:?}; \
                         stderr:\n{}",
                        self.stderr_tail(40)
                    ));
                }
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- qanat broker stderr ({}), last 200 lines -----\n{}\n----- end of broker stderr -----",
                self.stderr_path().display(),
                self.stderr_tail(200)
            );
        }
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a HOST:PORT address: {addr:?}"))
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL_PAUSE),
            Ok(None) => return None,
            Err(e) => panic!("waiting for child: {e}"),
        }
    }
}

/// Poll `cond` until it returns `Some` or the deadline passes; on timeout, panic with `what`
/// and the last observation (`describe`).
pub fn poll_until<T>(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match cond() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {limit:?} waiting for {what}; last observation: {last}")
            }
            Err(_) => thread::sleep(POLL_PAUSE),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The qanat CLI

/// Keep the developer's own `QANAT_*` settings (env overrides of the config) out of the
/// processes under test, so every test sees exactly the configuration it wrote.
fn scrub_qanat_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("QANAT_") {
            cmd.env_remove(k);
        }
    }
}

/// Run `qanat ARGS...` to completion.
pub fn qanat(args: &[&str]) -> Output {
    let mut cmd = Command::new(QANAT_BIN);
    scrub_qanat_env(&mut cmd);
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run qanat {args:?}: {e}"))
}

/// Run `qanat ARGS...`, panic unless it exits 0, return stdout.
pub fn qanat_ok(args: &[&str]) -> String {
    let out = qanat(args);
    assert!(
        out.status.success(),
        "qanat {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ------------------------------------------------------------------------------------------
// Records

/// A record to produce. `partition: None` lets the producer's partitioner choose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rec {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp: Option<i64>,
    pub partition: Option<i32>,
}

impl Rec {
    pub fn value(v: impl Into<Vec<u8>>) -> Rec {
        Rec {
            value: Some(v.into()),
            ..Rec::default()
        }
    }

    pub fn key(mut self, k: impl Into<Vec<u8>>) -> Rec {
        self.key = Some(k.into());
        self
    }

    pub fn header(mut self, name: &str, value: Option<&[u8]>) -> Rec {
        self.headers
            .push((name.to_string(), value.map(<[u8]>::to_vec)));
        self
    }

    pub fn timestamp(mut self, ts: i64) -> Rec {
        self.timestamp = Some(ts);
        self
    }

    pub fn partition(mut self, p: i32) -> Rec {
        self.partition = Some(p);
        self
    }
}

/// A consumed record, detached from the consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// `Some(ms)` for a create-time or log-append-time timestamp.
    pub timestamp: Option<i64>,
    pub timestamp_is_log_append: bool,
}

impl Msg {
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(self.value.as_deref().unwrap_or_default()).into_owned()
    }
}

/// `n` records with keys `key-i`, values `PREFIX-i-...` (some padding so codecs have something
/// to compress) and two headers.
pub fn keyed_records(prefix: &str, n: usize) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            Rec::value(format!("{prefix}-{i:06}-{}", "abcdefgh".repeat(i % 16)))
                .key(format!("key-{i}"))
                .header("idx", Some(i.to_string().as_bytes()))
                .header("src", Some(prefix.as_bytes()))
        })
        .collect()
}

/// Assert that `got` is exactly `want` read back from one partition starting at offset
/// `first_offset`: same order, dense offsets, same keys, values, headers and (when the
/// record set one explicitly) create-time timestamps.
pub fn assert_records_eq(want: &[Rec], got: &[Msg], first_offset: i64) {
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let ctx = || format!("record #{i} (offset {})", g.offset);
        assert_eq!(
            g.offset,
            first_offset + i as i64,
            "{}: offset not dense",
            ctx()
        );
        assert_eq!(g.key, w.key, "{}: key", ctx());
        assert_eq!(g.value, w.value, "{}: value", ctx());
        assert_eq!(g.headers, w.headers, "{}: headers", ctx());
        if let Some(ts) = w.timestamp {
            assert_eq!(g.timestamp, Some(ts), "{}: timestamp", ctx());
        }
    }
    assert_eq!(
        got.len(),
        want.len(),
        "read back {} records, produced {}",
        got.len(),
        want.len()
    );
}

// ------------------------------------------------------------------------------------------
// Producing

/// Producer config: `bootstrap.servers`, bounded timeouts, no idempotence (Qanat has no
/// InitProducerId yet), then `extra` (e.g. `("compression.type", "zstd")`, `("acks", "0")`).
pub fn producer_config(bootstrap: &str, extra: &[(&str, &str)]) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "false")
        .set("message.timeout.ms", "60000")
        .set("reconnect.backoff.max.ms", "1000")
        .set("linger.ms", "5");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg
}

/// Delivery outcome of one produced record: `(partition, offset)`; offset is -1 when the
/// producer does not learn it (acks=0).
pub type Delivered = (i32, i64);

struct CollectCtx {
    results: Mutex<Vec<Option<Result<Delivered, String>>>>,
}

impl ClientContext for CollectCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("[rdkafka producer] error: {error}: {reason}");
    }
}

impl ProducerContext for CollectCtx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, idx: usize) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, m)) => Err(format!("{e} (partition {})", m.partition())),
        };
        self.results.lock().expect("results lock")[idx] = Some(outcome);
    }
}

fn headers_of(rec: &Rec) -> Option<OwnedHeaders> {
    if rec.headers.is_empty() {
        return None;
    }
    let mut h = OwnedHeaders::new_with_capacity(rec.headers.len());
    for (name, value) in &rec.headers {
        h = h.insert(Header {
            key: name.as_str(),
            value: value.as_deref(),
        });
    }
    Some(h)
}

/// Produce `recs` to `topic` in order and wait for every delivery report. Panics if any
/// record fails. Returns the delivery report of each record, in input order.
pub fn produce(
    bootstrap: &str,
    topic: &str,
    recs: &[Rec],
    extra: &[(&str, &str)],
) -> Vec<Delivered> {
    try_produce(bootstrap, topic, recs, extra)
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("record #{i} to {topic} was not delivered: {e}")))
        .collect()
}

/// Like [`produce`], but returns each record's outcome instead of panicking on a failed
/// delivery (set a short `message.timeout.ms` in `extra` when failure is expected).
pub fn try_produce(
    bootstrap: &str,
    topic: &str,
    recs: &[Rec],
    extra: &[(&str, &str)],
) -> Vec<Result<Delivered, String>> {
    let ctx = CollectCtx {
        results: Mutex::new(vec![None; recs.len()]),
    };
    let producer: BaseProducer<CollectCtx> = producer_config(bootstrap, extra)
        .create_with_context(ctx)
        .expect("create producer");
    let deadline = Instant::now() + DEADLINE;
    for (idx, rec) in recs.iter().enumerate() {
        let mut record: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(topic, idx);
        record.key = rec.key.as_deref();
        record.payload = rec.value.as_deref();
        record.timestamp = rec.timestamp;
        record.partition = rec.partition;
        record.headers = headers_of(rec);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    r,
                )) if Instant::now() < deadline => {
                    record = r;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => panic!("send record #{idx} to {topic}: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    if let Err(e) = producer.flush(DEADLINE) {
        panic!("flush of {} records to {topic} failed: {e}", recs.len());
    }
    let results = std::mem::take(&mut *producer.context().results.lock().expect("results lock"));
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| panic!("no delivery report for record #{i} to {topic}")))
        .collect()
}

// ------------------------------------------------------------------------------------------
// Consuming

/// Consumer config for manual assignment: no commits, no subscribe, errors (not silent
/// resets) on out-of-range offsets.
pub fn consumer_config(bootstrap: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("group.id", "qanat-it")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("reconnect.backoff.max.ms", "1000")
        .set("fetch.wait.max.ms", "200");
    cfg
}

pub fn consumer(bootstrap: &str) -> BaseConsumer {
    consumer_config(bootstrap)
        .create()
        .expect("create consumer")
}

/// (low, high) watermarks of a partition (ListOffsets earliest/latest).
pub fn watermarks(bootstrap: &str, topic: &str, partition: i32) -> (i64, i64) {
    consumer(bootstrap)
        .fetch_watermarks(topic, partition, DEADLINE)
        .unwrap_or_else(|e| panic!("fetch_watermarks({topic}, {partition}): {e}"))
}

fn detach(m: &rdkafka::message::BorrowedMessage<'_>) -> Msg {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|hd| (hd.key.to_string(), hd.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    let ts = m.timestamp();
    Msg {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
        timestamp: ts.to_millis(),
        timestamp_is_log_append: matches!(ts, rdkafka::Timestamp::LogAppendTime(_)),
    }
}

/// Assign `topic`/`partition` at `start`, poll until `expected` records arrived (or the
/// deadline passes: panic with what was seen). Returns the records in the order received.
pub fn consume(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    start: Offset,
    expected: usize,
) -> Vec<Msg> {
    consume_with(bootstrap, topic, partition, start, expected, &[])
}

/// [`consume`] with extra consumer settings (e.g. small `fetch.max.bytes`).
pub fn consume_with(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    start: Offset,
    expected: usize,
    extra: &[(&str, &str)],
) -> Vec<Msg> {
    let mut cfg = consumer_config(bootstrap);
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    let consumer: BaseConsumer = cfg.create().expect("create consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, start)
        .expect("build assignment");
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::with_capacity(expected);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + DEADLINE;
    while out.len() < expected {
        if Instant::now() >= deadline {
            panic!(
                "consumed only {} of {expected} records from {topic}/{partition} (start {start:?}) \
                 within {DEADLINE:?}; last offset {:?}; consumer errors: {errors:?}",
                out.len(),
                out.last().map(|m: &Msg| m.offset)
            );
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => out.push(detach(&m)),
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => {
                let e = e.to_string();
                if !errors.contains_key(&e) {
                    eprintln!("[rdkafka consumer] {topic}/{partition}: {e}");
                }
                *errors.entry(e).or_default() += 1;
            }
        }
    }
    out
}

/// [`consume`] from offset 0 of a partition.
pub fn consume_all(bootstrap: &str, topic: &str, partition: i32, expected: usize) -> Vec<Msg> {
    consume(bootstrap, topic, partition, Offset::Offset(0), expected)
}

/// Everything from `low` to the current high watermark of a partition.
pub fn consume_to_end(bootstrap: &str, topic: &str, partition: i32) -> Vec<Msg> {
    let (low, high) = watermarks(bootstrap, topic, partition);
    let expected = usize::try_from(high - low).expect("high >= low");
    consume(bootstrap, topic, partition, Offset::Offset(low), expected)
}

/// Names of the `*.log` segment files of a partition directory, sorted.
pub fn segment_files(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let len = e.metadata().ok()?.len();
                name.ends_with(".log").then_some((name, len))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}
