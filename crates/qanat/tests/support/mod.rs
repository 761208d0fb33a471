//! Shared helpers for Qanat's integration tests.
//!
//! * [`Broker`] starts the real `qanat` binary on an ephemeral port with its own temporary data
//!   directory, learns its address from the `qanat broker listening on ...` line it prints on
//!   stdout (the readiness signal: no sleeps), and kills it when dropped.
//!   [`BrokerBuilder::metrics`] and [`BrokerBuilder::http`] add the metrics and HTTP listeners,
//!   whose addresses it learns from the lines printed before that one.
//! * [`Proc`]: any child process whose stdout lines are read on a thread, to wait for a
//!   readiness line such as `qanat metrics listening on ADDR`; killed when dropped.
//! * [`produce`] / [`consume`] talk to it with librdkafka (the `rdkafka` crate).
//! * [`http`], [`http_stream`]: a minimal HTTP/1.1 client (one request per connection,
//!   Content-Length and chunked bodies); [`scrape`] and [`metric_values`] for Prometheus text.
//! * [`raw_connect`], [`kafka_request`], [`read_kafka_response`] (and its `_within` and
//!   `expect_` forms), [`api_versions_roundtrip`], [`wait_closed_by_peer`]: raw frames, for
//!   connection handling below any client library; [`RawClient`] sends requests encoded with
//!   `kafka-protocol` and decodes the answers.
//! * [`BrokerBuilder::open_files_limit`] and [`Broker::proc_status_bytes`] (peak RSS) for
//!   resource-limit tests.
//! * [`require_kcat`], [`require_python_modules`], [`py_script`] for the third-party clients.
//!
//! Every wait in here is a poll loop on an observable condition with a deadline; a deadline
//! that passes is a test failure with a message saying what was being waited for.

// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
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
const HTTP_PREFIX: &str = "qanat http listening on ";

/// A `qanat broker` child process with its own temporary directory:
/// `<tmp>/data` (data dir), `<tmp>/qanat.toml` (optional config), `<tmp>/broker.stderr.log`.
pub struct Broker {
    proc: Option<Proc>,
    addr: String,
    metrics_addr: Option<String>,
    http_addr: Option<String>,
    dir: TempDir,
    config_path: Option<PathBuf>,
    env: Vec<(String, String)>,
    metrics: bool,
    http: bool,
    open_files: Option<u64>,
    /// Set by [`BrokerBuilder::data_dir`]; else `<tmp>/data`.
    data_dir: Option<PathBuf>,
    starts: usize,
}

/// Options for starting a [`Broker`].
#[derive(Default)]
pub struct BrokerBuilder {
    config: Option<String>,
    env: Vec<(String, String)>,
    metrics: bool,
    http: bool,
    open_files: Option<u64>,
    data_dir: Option<PathBuf>,
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

    /// Also pass `--http-listen 127.0.0.1:0` (the HTTP API: push subscriptions).
    pub fn http(mut self) -> Self {
        self.http = true;
        self
    }

    /// Start the broker with RLIMIT_NOFILE soft and hard set to `n` (the broker raises its
    /// soft limit to the hard one, so both are set).
    pub fn open_files_limit(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    /// Keep the data in `dir` (e.g. on a small filesystem) instead of the temp directory.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
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
            proc: None,
            addr: String::new(),
            metrics_addr: None,
            http_addr: None,
            dir,
            config_path,
            env: self.env,
            metrics: self.metrics,
            http: self.http,
            open_files: self.open_files,
            data_dir: self.data_dir,
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

    /// `HOST:PORT` of the `[[broker.listener]]` named `name`, from the
    /// `qanat listener NAME (PROTOCOL) listening on ADDR` line printed before the broker's.
    pub fn listener_addr(&self, name: &str) -> String {
        let proc = self.proc.as_ref().expect("broker is not running");
        let rest = proc
            .seen_line(&format!("qanat listener {name} ("))
            .unwrap_or_else(|| panic!("the broker printed no line for listener {name}"));
        rest.rsplit("listening on ")
            .next()
            .map(|a| a.trim().to_string())
            .unwrap_or_else(|| panic!("bad listener line {rest:?}"))
    }

    /// `HOST:PORT` of the metrics listener, when started with [`BrokerBuilder::metrics`].
    pub fn metrics_addr(&self) -> Option<String> {
        self.metrics_addr.clone()
    }

    /// `HOST:PORT` of the HTTP API, when started with [`BrokerBuilder::http`].
    pub fn http_addr(&self) -> Option<String> {
        self.http_addr.clone()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
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
        tail(&self.stderr(), n)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// A `kB` field of `/proc/<pid>/status`, e.g. `VmHWM` (peak RSS) or `VmRSS`, in bytes.
    pub fn proc_status_bytes(&self, field: &str) -> u64 {
        let pid = self.pid().expect("broker is not running");
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
        let prefix = format!("{field}:");
        status
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_alive)
    }

    /// Exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.proc.as_mut().and_then(Proc::try_exit_status)
    }

    /// SIGTERM and wait for a graceful exit; panics if it does not exit within the deadline
    /// or exits unsuccessfully (the contract is: SIGTERM -> flush -> exit 0).
    pub fn stop(&mut self) -> ExitStatus {
        let mut proc = self.proc.take().expect("broker is not running");
        if let Some(status) = proc.try_exit_status() {
            panic!(
                "broker had already exited ({status}) before SIGTERM; stderr:\n{}",
                self.stderr_tail(50)
            );
        }
        // On a timeout, dropping `proc` kills it.
        let status = proc.terminate(DEADLINE).unwrap_or_else(|| {
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
        let mut proc = self.proc.take().expect("broker is not running");
        proc.kill9();
    }

    /// Gracefully stop (SIGTERM) the broker if it is running, then start it again on the SAME
    /// port and data dir.
    pub fn restart(&mut self) {
        if self.proc.is_some() {
            self.stop();
        }
        self.start_again();
    }

    /// Start the broker again on the same port and data dir after [`Broker::kill9`] or
    /// [`Broker::stop`]. Retries while the port is briefly unavailable (the old listener or
    /// another test's connection can hold it for a moment), up to the deadline.
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "broker is still running");
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
            let mut marker = &stderr;
            let _ = writeln!(
                marker,
                "===== test harness: start #{} on {listen} =====",
                self.starts
            );
        }
        let mut cmd = qanat_command();
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
        if self.http {
            cmd.arg("--http-listen").arg("127.0.0.1:0");
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(n) = self.open_files {
            limit_open_files(&mut cmd, n);
        }
        cmd.stderr(Stdio::from(stderr));
        let mut proc = Proc::spawn(cmd, "qanat")?;
        // The metrics and HTTP lines come before the broker's listening line.
        let addr = proc
            .try_wait_line(LISTENING_PREFIX, DEADLINE)
            .map_err(|e| format!("broker {e}; stderr:\n{}", self.stderr_tail(40)))?;
        if port_of(&addr) == 0 {
            return Err(format!("broker printed a bad listening address {addr:?}"));
        }
        let http_addr = proc.seen_line(HTTP_PREFIX);
        if self.http && http_addr.is_none() {
            return Err(format!(
                "broker printed no '{HTTP_PREFIX}HOST:PORT' line before its listening line"
            ));
        }
        self.addr = addr;
        self.metrics_addr = proc.seen_line(METRICS_PREFIX);
        self.http_addr = http_addr;
        self.proc = Some(proc);
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        drop(self.proc.take());
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

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Wait for `child` to exit, at most `limit`; `None` if it is still running then.
pub fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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
// Child processes

/// A child process whose stdout is read line by line on a thread (so the child never blocks on
/// a full pipe); every line is kept, so a test can wait for a readiness line and then look up
/// the lines printed before it. Killed and reaped when dropped.
pub struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    /// Spawn `cmd` with stdin closed and stdout piped (stderr as `cmd` says). `label` prefixes
    /// the stdout lines echoed to the test's stderr.
    pub fn spawn(mut cmd: Command, label: &str) -> Result<Proc, String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let label = label.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{label} stdout] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// The rest (trimmed) of the first stdout line starting with `prefix`, waiting up to
    /// `limit` for it. An error says why it did not come (stdout closed, with the exit status,
    /// or time out).
    pub fn try_wait_line(&mut self, prefix: &str, limit: Duration) -> Result<String, String> {
        if let Some(rest) = self.seen_line(prefix) {
            return Ok(rest);
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let rest = line.strip_prefix(prefix).map(|r| r.trim().to_string());
                    self.seen.push(line);
                    if let Some(rest) = rest {
                        return Ok(rest);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_with_deadline(&mut self.child, DEADLINE);
                    return Err(format!(
                        "closed stdout without printing '{prefix}...' (exit status {status:?})"
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("did not print '{prefix}...' within {limit:?}"));
                }
            }
        }
    }

    /// [`Proc::try_wait_line`] with the [`DEADLINE`]; panics if the line does not come.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        self.try_wait_line(prefix, DEADLINE)
            .unwrap_or_else(|e| panic!("child process {e}"))
    }

    /// The rest (trimmed) of a line starting with `prefix` among those already waited past.
    pub fn seen_line(&self, prefix: &str) -> Option<String> {
        self.seen
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|r| r.trim().to_string())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Send a signal with `kill SIG PID` (`sig` like `-HUP`); panics if that fails.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("run kill {sig}: {e}"))
            .success();
        assert!(ok, "kill {sig} {} failed", self.pid());
    }

    /// SIGTERM, then wait up to `limit` for the exit; `None` if it is still running then.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.signal("-TERM");
        wait_with_deadline(&mut self.child, limit)
    }

    /// SIGKILL and reap. No flush, no graceful anything.
    pub fn kill9(&mut self) {
        // std's Child::kill sends SIGKILL on Unix.
        self.child.kill().expect("SIGKILL child process");
        self.child.wait().expect("reap killed child process");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Run `cmd` with RLIMIT_NOFILE soft and hard limits of `n`.
pub fn limit_open_files(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// `qanat` without the developer's `QANAT_*` environment (set the test's own after this).
pub fn qanat_command() -> Command {
    let mut cmd = Command::new(QANAT_BIN);
    scrub_qanat_env(&mut cmd);
    cmd
}

/// Start `qanat ARGS...` in the background (stderr inherited).
pub fn qanat_spawn(args: &[&str]) -> Proc {
    let mut cmd = qanat_command();
    cmd.args(args);
    Proc::spawn(cmd, "qanat").unwrap_or_else(|e| panic!("qanat {args:?}: {e}"))
}

/// Run `qanat ARGS...` to completion.
pub fn qanat(args: &[&str]) -> Output {
    qanat_command()
        .args(args)
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

// ------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one request per connection (`Connection: close`)

/// Response headers, names lower-cased (the first of repeated headers wins).
pub type HttpHeaders = BTreeMap<String, String>;

/// Percent-encode everything but RFC 3986 unreserved characters (for query values).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response body reader that undoes chunked transfer encoding when the response uses it.
pub struct Body<R> {
    reader: R,
    chunked: bool,
    /// Bytes left in the current chunk (chunked) or the body (Content-Length).
    left: Option<usize>,
    done: bool,
}

impl<R: BufRead> Body<R> {
    fn new(reader: R, headers: &HttpHeaders) -> Body<R> {
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let left = if chunked {
            None
        } else {
            headers.get("content-length").and_then(|v| v.parse().ok())
        };
        Body {
            reader,
            chunked,
            left,
            done: false,
        }
    }

    /// Up to `buf.len()` body bytes; `Ok(0)` at the end of the body. Honors the socket's read
    /// timeout (an `Err` of kind WouldBlock/TimedOut then).
    pub fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if !self.chunked {
            let want = match self.left {
                Some(0) => {
                    self.done = true;
                    return Ok(0);
                }
                Some(n) => n.min(buf.len()),
                None => buf.len(),
            };
            let n = self.reader.read(&mut buf[..want])?;
            if n == 0 {
                self.done = true;
            }
            if let Some(l) = self.left.as_mut() {
                *l -= n;
            }
            return Ok(n);
        }
        if self.left.unwrap_or(0) == 0 {
            if self.left == Some(0) {
                // CRLF after the previous chunk's data.
                let mut crlf = String::new();
                self.reader.read_line(&mut crlf)?;
                self.left = None;
            }
            let mut size_line = String::new();
            if self.reader.read_line(&mut size_line)? == 0 {
                self.done = true;
                return Ok(0);
            }
            let hex = size_line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(hex, 16).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size line {size_line:?}: {e}"),
                )
            })?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = Some(size);
        }
        let want = self.left.unwrap_or(0).min(buf.len());
        let n = self.reader.read(&mut buf[..want])?;
        if n == 0 {
            self.done = true;
            return Ok(0);
        }
        self.left = Some(self.left.unwrap_or(0) - n);
        Ok(n)
    }

    /// The rest of the body.
    pub fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = self.read_some(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }
}

impl Body<BufReader<TcpStream>> {
    pub fn set_read_timeout(&self, limit: Duration) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(Some(limit))
    }
}

/// Connect to `addr` and send one request (`Content-Length` unless a GET without a body).
/// The server may answer (413) and stop reading before the whole body is sent: write errors
/// are left for the read of the response to show.
fn send_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect to HTTP {addr}: {e}"))?;
    s.set_read_timeout(Some(DEADLINE))
        .map_err(|e| format!("read timeout: {e}"))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n");
    if method != "GET" || !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut wire = req.into_bytes();
    wire.extend_from_slice(body);
    let _ = s.write_all(&wire);
    Ok(s)
}

/// The status line and headers of a response.
fn read_head(reader: &mut impl BufRead) -> Result<(u16, HttpHeaders), String> {
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(|e| format!("status line: {e}"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP status line {status_line:?}"))?;
    let mut headers = HttpHeaders::new();
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("header line: {e}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers
                .entry(k.trim().to_ascii_lowercase())
                .or_insert_with(|| v.trim().to_string());
        }
    }
    Ok((status, headers))
}

/// A whole response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HttpHeaders,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {self:?} {}", self.text()))
    }
}

/// One request on a fresh connection, the response read to EOF; an error when nothing
/// answers.
pub fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let mut s = send_request(addr, method, path, headers, body)?;
    // Read to EOF first: a server that closes early may reset the connection after its answer.
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    if raw.is_empty() {
        return Err(format!(
            "no response from {addr} to {method} {path}: {read:?}"
        ));
    }
    let mut reader = Cursor::new(raw);
    let (status, headers) = read_head(&mut reader)?;
    let body = Body::new(reader, &headers)
        .read_all()
        .map_err(|e| format!("body of {method} {path}: {e}"))?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// Every response in `raw` (what one connection received), in order.
pub fn responses(raw: &[u8]) -> Result<Vec<Resp>, String> {
    let mut reader = Cursor::new(raw);
    let mut out = Vec::new();
    while (reader.position() as usize) < raw.len() {
        let (status, headers) = read_head(&mut reader)?;
        let body = Body::new(&mut reader, &headers)
            .read_all()
            .map_err(|e| format!("body of response {}: {e}", out.len() + 1))?;
        out.push(Resp {
            status,
            headers,
            body,
        });
    }
    Ok(out)
}

/// [`try_http`], panicking when nothing answers.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    try_http(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{e}"))
}

/// `GET path`: the status and the body as text.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let r = http(addr, "GET", path, &[], b"");
    (r.status, r.text())
}

/// `GET path` with the body left to stream (e.g. Server-Sent Events): status, headers, body.
/// The status of a GET with `headers`, read before any body (for endless streams).
pub fn http_status_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    let s = send_request(addr, "GET", path, headers, b"").unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(s);
    read_head(&mut reader)
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .0
}

pub fn http_stream(addr: &str, path: &str) -> (u16, HttpHeaders, Body<BufReader<TcpStream>>) {
    let s = send_request(addr, "GET", path, &[], b"").unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(s);
    let (status, headers) = read_head(&mut reader).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let body = Body::new(reader, &headers);
    (status, headers, body)
}

// ------------------------------------------------------------------------------------------
// Prometheus text

/// The Prometheus text of `http://ADDR/metrics`; an error unless it answers 200.
pub fn scrape(addr: &str) -> Result<String, String> {
    let r = try_http(addr, "GET", "/metrics", &[], b"")?;
    if r.status != 200 {
        return Err(format!("GET http://{addr}/metrics: HTTP {}", r.status));
    }
    Ok(r.text())
}

/// Samples of `name` whose labels include every `(label, value)` in `want`: (all labels,
/// value).
pub fn metric_values(
    text: &str,
    name: &str,
    want: &[(&str, &str)],
) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels_text, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some((l, v)) = r.split_once('}') else {
                continue;
            };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // another metric with this name as a prefix
        };
        let mut labels = BTreeMap::new();
        for part in labels_text.split("\",") {
            if let Some((k, v)) = part.split_once("=\"") {
                labels.insert(k.trim().to_string(), v.trim_end_matches('"').to_string());
            }
        }
        if !want
            .iter()
            .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            out.push((labels, v));
        }
    }
    out
}

/// The sample of `name` whose labels are exactly `labels` (none: the unlabelled sample).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_values(text, name, labels)
        .into_iter()
        .find(|(l, _)| l.len() == labels.len())
        .map(|(_, v)| v)
}

// ------------------------------------------------------------------------------------------
// Raw Kafka frames (for tests of connection handling below any client library)

/// A TCP connection to `addr` for raw frames: no Nagle delay, reads time out after
/// [`DEADLINE`].
pub fn raw_connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE))
        .expect("set read timeout");
    s.set_nodelay(true).expect("set TCP_NODELAY");
    s
}

/// `payload` behind its 4-byte big-endian length.
fn length_prefixed(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A request frame: length prefix, header v1 (api key, version, correlation id, client id)
/// and `body`.
pub fn kafka_request(api_key: i16, version: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    let client_id = b"qanat-it-raw";
    let mut payload = Vec::new();
    payload.extend_from_slice(&api_key.to_be_bytes());
    payload.extend_from_slice(&version.to_be_bytes());
    payload.extend_from_slice(&correlation_id.to_be_bytes());
    payload.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    payload.extend_from_slice(client_id);
    payload.extend_from_slice(body);
    length_prefixed(&payload)
}

/// Read one response frame (without its length prefix); `Ok(None)` when the peer closed the
/// connection (end of stream or reset) first. Uses the stream's read timeout: when nothing
/// came within it, an error of kind `WouldBlock` or `TimedOut`.
pub fn read_kafka_response(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if is_closed(&e) => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = i32::from_be_bytes(len);
    let mut body = vec![0u8; len.max(0) as usize];
    match s.read_exact(&mut body) {
        Ok(()) => Ok(Some(body)),
        Err(e) if is_closed(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`read_kafka_response`] waiting at most about `limit` for each read; the stream keeps
/// that read timeout.
pub fn read_kafka_response_within(
    s: &mut TcpStream,
    limit: Duration,
) -> io::Result<Option<Vec<u8>>> {
    s.set_read_timeout(Some(limit))?;
    read_kafka_response(s)
}

/// The next response frame on `s`; panics, saying `what` was expected, when the broker
/// closed the connection or sent nothing.
pub fn expect_kafka_response(s: &mut TcpStream, what: &str) -> Vec<u8> {
    match read_kafka_response(s) {
        Ok(Some(f)) => f,
        Ok(None) => panic!("broker closed the connection; expected {what}"),
        Err(e) => panic!("no response ({e}); expected {what}"),
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// ApiVersions v0 on `s`: `Ok` with the advertised (api key, min version, max version)
/// triples when answered with our correlation id and error 0, `Err` with what happened
/// instead (closed, other answer, short answer, I/O error).
pub fn api_versions_roundtrip(
    s: &mut TcpStream,
    correlation_id: i32,
) -> Result<Vec<(i16, i16, i16)>, String> {
    s.write_all(&kafka_request(18, 0, correlation_id, &[]))
        .map_err(|e| format!("write ApiVersions: {e}"))?;
    let f = match read_kafka_response(s) {
        Ok(Some(f)) if f.len() >= 10 => f,
        Ok(Some(f)) => return Err(format!("short ApiVersions response {f:?}")),
        Ok(None) => return Err("connection closed by the broker".to_string()),
        Err(e) => return Err(format!("read ApiVersions response: {e}")),
    };
    let i16_at = |at: usize| i16::from_be_bytes([f[at], f[at + 1]]);
    let corr = i32::from_be_bytes([f[0], f[1], f[2], f[3]]);
    let error = i16_at(4);
    if corr != correlation_id || error != 0 {
        return Err(format!(
            "ApiVersions answered correlation id {corr}, error {error}"
        ));
    }
    let n = i32::from_be_bytes([f[6], f[7], f[8], f[9]]);
    if n < 0 || f.len() < 10 + n as usize * 6 {
        return Err(format!(
            "ApiVersions v0 response too short for {n} entries: {f:?}"
        ));
    }
    Ok((0..n as usize)
        .map(|i| {
            let at = 10 + i * 6;
            (i16_at(at), i16_at(at + 2), i16_at(at + 4))
        })
        .collect())
}

/// Wait until the broker closes `s` (end of stream or reset), reading and discarding
/// anything it sends; panics after [`DEADLINE`].
pub fn wait_closed_by_peer(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(POLL_PAUSE * 4))
        .expect("set read timeout");
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_closed(&e) => return,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{what}: read failed: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the broker did not close the connection within {DEADLINE:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Third-party clients (these tests FAIL, never skip, when one is missing)

pub const INSTALL_HINT: &str = "run scripts/test.sh, which installs the test dependencies \
                                (kcat via apt-get; confluent-kafka, kafka-python, lz4, \
                                zstandard, python-snappy via pip)";

pub fn require_kcat() {
    let ok = Command::new("kcat")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kcat is not installed: {INSTALL_HINT}");
}

pub fn require_python_modules(modules: &[&str]) {
    for m in modules {
        let out = Command::new("python3")
            .args(["-c", &format!("import {m}")])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "python3 cannot import {m}: {INSTALL_HINT}\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("python3 is not runnable ({e}): {INSTALL_HINT}"),
        }
    }
}

/// `tests/py/NAME`.
pub fn py_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("py")
        .join(name)
}

/// CRC-32C (Castagnoli), bitwise and independent of the code under test: slow and obviously
/// right.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ------------------------------------------------------------------------------------------
// Hand-crafted requests

/// One connection sending requests encoded with `kafka-protocol`, for what the librdkafka API
/// does not show (topic ids, error messages).
pub struct RawClient {
    stream: TcpStream,
    correlation: i32,
    client_id: String,
}

impl RawClient {
    pub fn connect(addr: &str) -> RawClient {
        Self::connect_as(addr, "qanat-it-raw")
    }

    /// A connection whose requests carry `client_id`.
    pub fn connect_as(addr: &str, client_id: &str) -> RawClient {
        RawClient {
            stream: raw_connect(addr),
            correlation: 0,
            client_id: client_id.to_string(),
        }
    }

    /// Send `req` as API `key` version `version` and decode the answer.
    pub fn call<Req, Resp>(
        &mut self,
        key: kafka_protocol::messages::ApiKey,
        version: i16,
        req: &Req,
    ) -> Resp
    where
        Req: kafka_protocol::protocol::Encodable + kafka_protocol::protocol::HeaderVersion,
        Resp: kafka_protocol::protocol::Decodable + kafka_protocol::protocol::HeaderVersion,
    {
        use kafka_protocol::messages::{RequestHeader, ResponseHeader};
        use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_string(self.client_id.clone())));
        let mut body = bytes::BytesMut::new();
        header
            .encode(&mut body, Req::header_version(version))
            .expect("encode request header");
        req.encode(&mut body, version).expect("encode request");
        self.stream
            .write_all(&length_prefixed(&body))
            .expect("send request");
        let what = format!("the answer to API {key:?} v{version}");
        let mut buf = bytes::Bytes::from(expect_kafka_response(&mut self.stream, &what));
        let rh = ResponseHeader::decode(&mut buf, Resp::header_version(version))
            .expect("decode response header");
        assert_eq!(rh.correlation_id, self.correlation, "correlation id");
        Resp::decode(&mut buf, version).expect("decode response")
    }
}

// ------------------------------------------------------------------------------------------
// A small disk

/// A tmpfs of a fixed size mounted on a fresh temporary directory (needs root, as the tests
/// run): a disk that is full when the test says so. Unmounted (lazily, should a process still
/// hold a file in it) and removed on drop.
pub struct Tmpfs {
    dir: Option<TempDir>,
}

impl Tmpfs {
    /// Mount a tmpfs of `bytes` (rounded up to whole pages by the kernel).
    pub fn mount(bytes: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("qanat-tmpfs-")
            .tempdir()
            .expect("temp dir for a tmpfs");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0755"),
                "qanat-test",
            ])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("run mount: {e}"));
        assert!(
            out.status.success(),
            "mounting a {bytes}-byte tmpfs on {} failed (the tests need root): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), TempDir::path)
    }

    /// Write zeros to `name` until the filesystem refuses (ENOSPC); returns the bytes written.
    /// Removing the file frees the space again.
    pub fn fill(&self, name: &str) -> u64 {
        let mut f = fs::File::create(self.path().join(name)).expect("create the filler file");
        let block = [0u8; 4096];
        let mut written = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.path().display()),
            }
        }
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
            drop(dir);
        }
    }
}
