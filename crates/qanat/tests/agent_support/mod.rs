//! Helpers for the log agent's end-to-end tests: the real `qanat broker` and `qanat agent`
//! binaries as child processes, reading a topic back, and a trajectory checker that is
//! independent of both the agent's code and `qanat audit`.
//!
//! The broker start logic is a minimal copy of `support/mod.rs` (owned elsewhere): readiness
//! is the line the process prints on stdout, never a sleep.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tempfile::TempDir;

pub const QANAT_BIN: &str = env!("CARGO_BIN_EXE_qanat");
pub const DEADLINE: Duration = Duration::from_secs(60);
pub const POLL_PAUSE: Duration = Duration::from_millis(25);

fn scrub(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("QANAT_") {
            cmd.env_remove(k);
        }
    }
}

/// Spawn `cmd` with stdout piped and stderr appended to `stderr_log`; wait until it prints a
/// line starting with `prefix` and return the rest of that line.
fn spawn_ready(
    mut cmd: Command,
    stderr_log: &Path,
    prefix: &'static str,
) -> Result<(Child, String), String> {
    let stderr = OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_log)
        .map_err(|e| e.to_string())?;
    scrub(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr));
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(rest) => Ok((child, rest)),
        Err(RecvTimeoutError::Disconnected) => {
            let status = child.wait().ok();
            Err(format!(
                "exited ({status:?}) before printing {prefix:?}; stderr:\n{}",
                tail(stderr_log, 30)
            ))
        }
        Err(RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("no {prefix:?} line within {DEADLINE:?}"))
        }
    }
}

pub fn tail(path: &Path, n: usize) -> String {
    let all = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = all.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn wait_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL_PAUSE),
            _ => return None,
        }
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM {}", child.id());
}

// ------------------------------------------------------------------------------------------
// Broker

pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    pub dir: TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("qanat-agent-it-")
            .tempdir()
            .unwrap();
        let mut b = Broker {
            child: None,
            addr: String::new(),
            dir,
        };
        b.spawn("127.0.0.1:0").unwrap();
        b
    }

    fn spawn(&mut self, listen: &str) -> Result<(), String> {
        let mut cmd = Command::new(QANAT_BIN);
        cmd.arg("broker")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen")
            .arg(listen);
        let (child, addr) = spawn_ready(
            cmd,
            &self.dir.path().join("broker.stderr.log"),
            "qanat broker listening on ",
        )?;
        self.child = Some(child);
        self.addr = addr;
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("broker running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Start again on the same port and data dir (retrying while the port is busy).
    pub fn start_again(&mut self) {
        let listen = self.addr.clone();
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.spawn(&listen) {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("broker restart failed, retrying: {e}");
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("broker did not restart: {e}"),
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- broker stderr -----\n{}",
                tail(&self.dir.path().join("broker.stderr.log"), 60)
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Agent

pub struct Agent {
    child: Option<Child>,
    pub config: PathBuf,
    pub stderr: PathBuf,
}

impl Agent {
    /// Write `toml` to `dir/agent.toml`; the process is started with [`Agent::start`].
    pub fn new(dir: &Path, toml: &str) -> Agent {
        let config = dir.join("agent.toml");
        fs::write(&config, toml).unwrap();
        Agent {
            child: None,
            config,
            stderr: dir.join("agent.stderr.log"),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(QANAT_BIN);
        cmd.arg("agent").arg("--config").arg(&self.config);
        cmd
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let (child, _) = spawn_ready(self.command(), &self.stderr, "qanat agent running")
            .unwrap_or_else(|e| panic!("agent did not start: {e}"));
        self.child = Some(child);
    }

    /// Run the agent expecting it to exit by itself; returns (status, stderr of this run).
    pub fn run_to_exit(&self) -> (ExitStatus, String) {
        let mut cmd = self.command();
        scrub(&mut cmd);
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("agent running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM: the agent flushes, writes its final checkpoint and exits 0.
    pub fn stop(&mut self) {
        let mut c = self.child.take().expect("agent running");
        sigterm(&c);
        let status = wait_deadline(&mut c, DEADLINE).unwrap_or_else(|| {
            let _ = c.kill();
            panic!(
                "agent did not exit after SIGTERM; stderr:\n{}",
                tail(&self.stderr, 40)
            )
        });
        assert!(
            status.success(),
            "agent exited {status}; stderr:\n{}",
            tail(&self.stderr, 40)
        );
    }

    /// Whether the agent process has `path` open (observable through /proc).
    pub fn has_open(&self, path: &Path) -> bool {
        let Some(pid) = self.pid() else { return false };
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        rd.flatten().any(|e| {
            fs::read_link(e.path()).is_ok_and(|l| {
                l == path || l.as_os_str() == format!("{} (deleted)", path.display()).as_str()
            })
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!("----- agent stderr -----\n{}", tail(&self.stderr, 80));
        }
    }
}

// ------------------------------------------------------------------------------------------
// Reading records back

#[derive(Debug, Clone)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    pub fn h(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
    pub fn num(&self, name: &str) -> u64 {
        self.h(name)
            .parse()
            .unwrap_or_else(|_| panic!("header {name} not a number in {self:?}"))
    }
}

/// Every record of partition 0 of `topic` from the start to the high watermark (empty if the
/// topic does not exist yet).
pub fn read_topic(bootstrap: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "qanat-agent-it")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "100")
        .create()
        .unwrap();
    let Ok((low, high)) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)) else {
        return Vec::new();
    };
    if high <= low {
        return Vec::new();
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let mut next = low;
    while next < high {
        assert!(
            Instant::now() < deadline,
            "reading {topic}: stuck at {next} of {high}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                next = m.offset() + 1;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|hd| {
                                (
                                    hd.key.to_string(),
                                    String::from_utf8_lossy(hd.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => eprintln!("consumer: {e}"),
        }
    }
    out
}

pub fn poll_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {limit:?} waiting for {what}; last: {last}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ------------------------------------------------------------------------------------------
// The checker (independent of the agent and of `qanat audit`)

/// CRC-32C (Castagnoli), bitwise: slow and obviously right.
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

/// One file content as the test wrote it: the bytes ever written to one inode between its
/// creation (or truncation) and its deletion (or truncation).
#[derive(Debug, Clone)]
pub struct Content {
    pub name: String,
    pub dev: u64,
    pub ino: u64,
    pub bytes: Vec<u8>,
    /// Bytes `[0, required)` must all have been delivered.
    pub required: u64,
}

/// `HOST:DEV:INODE:CRC-LEN` -> (dev, ino, crc, len).
fn parse_id(id: &str) -> Option<(u64, u64, u32, u64)> {
    let mut it = id.rsplitn(4, ':');
    let sig = it.next()?;
    let ino = it.next()?.parse().ok()?;
    let dev = it.next()?.parse().ok()?;
    let (crc, len) = sig.split_once('-')?;
    Some((
        dev,
        ino,
        u32::from_str_radix(crc, 16).ok()?,
        len.parse().ok()?,
    ))
}

/// The trajectory contract on the records read back:
/// 1. every record maps to the content it claims (dev, inode, signature) and its value is
///    exactly that content's bytes `[offset, offset+size)` less the final newline;
/// 2. within one file id, overlapping records are whole repeats (same offset and size);
/// 3. every content's required bytes are covered by the union of its records.
///
/// Returns Err(description) on the first violation; `coverage_only` tells a caller whether
/// waiting longer could help.
pub fn check(contents: &[Content], records: &[Record]) -> Result<(), (bool, String)> {
    let mut by_content: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
    let mut by_id: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for r in records {
        let id = r.h("qanat.file");
        if r.key != id.as_bytes() {
            return Err((false, format!("key {:?} is not the file id {id}", r.key)));
        }
        let (dev, ino, crc, len) = parse_id(id).ok_or((false, format!("bad file id {id:?}")))?;
        let (offset, size) = (r.num("qanat.offset"), r.num("qanat.size"));
        let lines = r.num("qanat.lines");
        let newlines = r.value.iter().filter(|&&b| b == b'\n').count() as u64;
        let ci = contents
            .iter()
            .position(|c| {
                c.dev == dev
                    && c.ino == ino
                    && (c.bytes.len() as u64) >= len
                    && crc32c(&c.bytes[..len as usize]) == crc
                    && (c.bytes.len() as u64) >= offset + size
                    && {
                        let got = &c.bytes[offset as usize..(offset + size) as usize];
                        got == r.value.as_slice()
                            || (got.last() == Some(&b'\n')
                                && &got[..got.len() - 1] == r.value.as_slice())
                    }
            })
            .ok_or_else(|| {
                (
                    false,
                    format!(
                        "record of {id} at {offset}+{size} ({:?}) matches no content written \
                         to that inode",
                        String::from_utf8_lossy(&r.value)
                    ),
                )
            })?;
        // Plain lines in these tests: one line per record.
        if lines != newlines + 1 {
            return Err((
                false,
                format!(
                    "record of {id} at {offset}: lines={lines}, expected {}",
                    newlines + 1
                ),
            ));
        }
        by_content.entry(ci).or_default().push((offset, size));
        by_id.entry(id).or_default().push((offset, size));
    }
    for (id, ranges) in &mut by_id {
        ranges.sort_unstable();
        ranges.dedup();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].0 + w[0].1 {
                return Err((
                    false,
                    format!(
                        "{id}: ranges {:?} and {:?} overlap without being the same record",
                        w[0], w[1]
                    ),
                ));
            }
        }
    }
    for (ci, c) in contents.iter().enumerate() {
        let mut ranges = by_content.remove(&ci).unwrap_or_default();
        ranges.sort_unstable();
        let mut covered = 0u64;
        for (o, s) in ranges {
            if o > covered {
                break;
            }
            covered = covered.max(o + s);
        }
        if covered < c.required {
            return Err((
                true,
                format!(
                    "{} (dev {} ino {}): bytes {covered}..{} of {} never delivered",
                    c.name,
                    c.dev,
                    c.ino,
                    c.required,
                    c.bytes.len()
                ),
            ));
        }
    }
    Ok(())
}
