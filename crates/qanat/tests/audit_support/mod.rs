//! Helpers for the audit tests: a broker child process, an agent-like producer of trajectory
//! records (docs/trajectory.md), and runners for `qanat audit`. Minimal copies of
//! `support/mod.rs` logic, kept separate so the two can evolve independently.
//!
//! Every wait is a poll on an observable condition with a deadline, never a sleep.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tempfile::TempDir;

pub const QANAT_BIN: &str = env!("CARGO_BIN_EXE_qanat");
pub const DEADLINE: Duration = Duration::from_secs(60);
const POLL_PAUSE: Duration = Duration::from_millis(25);

fn scrub_qanat_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("QANAT_") {
            cmd.env_remove(k);
        }
    }
}

/// A child process whose stdout lines arrive on a channel; killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: Receiver<String>,
    _dir: Option<TempDir>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(mut cmd: Command, dir: Option<TempDir>) -> Proc {
        scrub_qanat_env(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn qanat");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            _dir: dir,
        }
    }

    /// The rest of the first stdout line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(e) => panic!("no stdout line starting with {prefix:?}: {e}"),
            }
        }
    }
}

/// `qanat broker` on an ephemeral port with a temporary data directory.
pub fn start_broker() -> (Proc, String) {
    let dir = tempfile::Builder::new()
        .prefix("qanat-audit-it-")
        .tempdir()
        .expect("temp dir");
    let mut cmd = Command::new(QANAT_BIN);
    cmd.arg("broker")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg("127.0.0.1:0");
    let p = Proc::spawn(cmd, Some(dir));
    let addr = p.wait_line("qanat broker listening on ");
    (p, addr)
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

/// Start `qanat ARGS...` in the background.
pub fn qanat_spawn(args: &[&str]) -> Proc {
    let mut cmd = Command::new(QANAT_BIN);
    cmd.args(args);
    Proc::spawn(cmd, None)
}

// ------------------------------------------------------------------------------------------
// Agent-like records

/// A record to produce.
#[derive(Clone, Debug)]
pub struct Rec {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Option<i64>,
}

/// A source file as the agent sees it: content split into newline-terminated lines.
pub struct SimFile {
    pub host: String,
    pub id: String,
    pub path: String,
    pub content: Vec<u8>,
}

impl SimFile {
    /// `n` lines of varying length.
    pub fn new(host: &str, name: &str, n: usize) -> SimFile {
        let mut content = Vec::new();
        for i in 0..n {
            content.extend_from_slice(
                format!("{name} line {i:04} {}\n", "x".repeat(i * 7 % 50)).as_bytes(),
            );
        }
        let sig = content.len().min(1024);
        SimFile {
            host: host.into(),
            // HOST:DEV:INODE:SIG as in the contract; the audit treats it as opaque.
            id: format!(
                "{host}:2049:{}:{:08x}-{sig}",
                1000 + name.len(),
                fnv(name) as u32
            ),
            path: format!("/var/log/{name}.log"),
            content,
        }
    }

    pub fn size(&self) -> u64 {
        self.content.len() as u64
    }

    /// `(offset, size)` of every line.
    pub fn lines(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut start = 0usize;
        for (i, b) in self.content.iter().enumerate() {
            if *b == b'\n' {
                out.push((start as u64, (i + 1 - start) as u64));
                start = i + 1;
            }
        }
        out
    }

    /// The record the agent produces for bytes `[offset, offset + size)` (one event).
    pub fn record(&self, (offset, size): (u64, u64)) -> Rec {
        let bytes = &self.content[offset as usize..(offset + size) as usize];
        let value = bytes.strip_suffix(b"\n").unwrap_or(bytes).to_vec();
        let lines = bytes.iter().filter(|b| **b == b'\n').count().max(1);
        Rec {
            key: Some(self.id.clone().into_bytes()),
            value,
            headers: vec![
                ("qanat.host".into(), self.host.clone().into_bytes()),
                ("qanat.file".into(), self.id.clone().into_bytes()),
                ("qanat.path".into(), self.path.clone().into_bytes()),
                ("qanat.offset".into(), offset.to_string().into_bytes()),
                ("qanat.size".into(), size.to_string().into_bytes()),
                ("qanat.lines".into(), lines.to_string().into_bytes()),
                ("service".into(), b"checkout".to_vec()),
            ],
            timestamp: None,
        }
    }

    /// Records for lines `range` of the file.
    pub fn records(&self, range: std::ops::Range<usize>) -> Vec<Rec> {
        self.lines()[range]
            .iter()
            .map(|&l| self.record(l))
            .collect()
    }

    /// This file's entry in a manifest, with its size.
    pub fn manifest_entry(&self, size: u64, mtime_ms: i64) -> String {
        format!(
            r#"{{"path":"{}","file":"{}","size":{size},"mtime_ms":{mtime_ms}}}"#,
            self.path, self.id
        )
    }
}

/// A stand-in signature: distinct per file name (the audit treats ids as opaque).
fn fnv(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A manifest record as the agent publishes it (key: host id, value: JSON).
pub fn manifest(host: &str, ts_ms: i64, entries: &[String]) -> Rec {
    Rec {
        key: Some(host.as_bytes().to_vec()),
        value: format!(
            r#"{{"host":"{host}","ts_ms":{ts_ms},"files":[{}]}}"#,
            entries.join(",")
        )
        .into_bytes(),
        headers: Vec::new(),
        timestamp: None,
    }
}

/// Produce `recs` to `topic` in order (acks=all, one in flight so order holds) and wait
/// until every one was acknowledged.
pub fn produce(bootstrap: &str, topic: &str, recs: &[Rec]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .set("linger.ms", "5")
        .create()
        .expect("create producer");
    for rec in recs {
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k.as_str(),
                value: Some(v.as_slice()),
            });
        }
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(rec.value.as_slice());
        r.key = rec.key.as_deref();
        r.timestamp = rec.timestamp;
        if !rec.headers.is_empty() {
            r.headers = Some(headers);
        }
        let deadline = Instant::now() + DEADLINE;
        let mut pending = r;
        loop {
            match producer.send(pending) {
                Ok(()) => break,
                Err((e, back)) if Instant::now() < deadline => {
                    eprintln!("send to {topic} retried: {e}");
                    pending = back;
                    producer.poll(POLL_PAUSE);
                }
                Err((e, _)) => panic!("send to {topic}: {e}"),
            }
        }
    }
    producer
        .flush(DEADLINE)
        .expect("flush: every record acknowledged");
    assert_eq!(producer.in_flight_count(), 0, "records left in flight");
}

// ------------------------------------------------------------------------------------------
// Metrics

/// `GET /metrics` over a plain TCP connection.
pub fn scrape(addr: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

/// Value of an unlabelled gauge in a Prometheus text body.
pub fn gauge(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Poll `cond` until it returns `Ok`, or panic after the deadline with the last observation.
pub fn poll_until<T>(what: &str, mut cond: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match cond() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out waiting for {what}; last observation: {last}")
            }
            Err(_) => thread::sleep(POLL_PAUSE),
        }
    }
}
