//! Helpers for the log agent's end-to-end tests, on top of `support` (its `Broker`, [`Proc`]
//! and consumer): the real `qanat agent` binary as a child process, reading a topic back with
//! string headers, and a trajectory checker that is independent of both the agent's code and
//! `qanat audit`.
//!
//! Readiness is the line the agent prints on stdout, never a sleep.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::Offset;

use crate::support::{
    consume, consumer, crc32c, poll_until, qanat_command, tail, Msg, Proc, DEADLINE,
};

const RUNNING: &str = "qanat agent running";

// ------------------------------------------------------------------------------------------
// Agent

pub struct Agent {
    proc: Option<Proc>,
    pub config: PathBuf,
    pub stderr: PathBuf,
}

impl Agent {
    /// Write `toml` to `dir/agent.toml`; the process is started with [`Agent::start`].
    pub fn new(dir: &Path, toml: &str) -> Agent {
        let config = dir.join("agent.toml");
        fs::write(&config, toml).unwrap();
        Agent {
            proc: None,
            config,
            stderr: dir.join("agent.stderr.log"),
        }
    }

    /// `qanat agent --config <config>` without the developer's `QANAT_*` environment.
    pub fn command(&self) -> Command {
        let mut cmd = qanat_command();
        cmd.arg("agent").arg("--config").arg(&self.config);
        cmd
    }

    /// The last `n` lines the agent (all its runs) wrote to its stderr log.
    pub fn stderr_tail(&self, n: usize) -> String {
        tail(&fs::read_to_string(&self.stderr).unwrap_or_default(), n)
    }

    /// Start the agent (stderr appended to [`Agent::stderr`]) and wait for its
    /// `qanat agent running` line.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "agent already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap();
        let mut cmd = self.command();
        cmd.stderr(Stdio::from(log));
        let mut proc =
            Proc::spawn(cmd, "qanat agent").unwrap_or_else(|e| panic!("agent did not start: {e}"));
        if let Err(e) = proc.try_wait_line(RUNNING, DEADLINE) {
            panic!(
                "agent did not start: {e}; stderr:\n{}",
                self.stderr_tail(30)
            );
        }
        self.proc = Some(proc);
    }

    /// Run the agent expecting it to exit by itself; returns (status, stderr of this run).
    pub fn run_to_exit(&self) -> (ExitStatus, String) {
        let out = self.command().stdin(Stdio::null()).output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    pub fn kill9(&mut self) {
        self.proc.take().expect("agent running").kill9();
    }

    /// SIGTERM and wait for the exit; returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut proc = self.proc.take().expect("agent running");
        // On a timeout, dropping `proc` kills it.
        proc.terminate(DEADLINE).unwrap_or_else(|| {
            panic!(
                "agent did not exit after SIGTERM; stderr:\n{}",
                self.stderr_tail(40)
            )
        })
    }

    /// SIGTERM: the agent flushes, writes its final checkpoint and exits 0.
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "agent exited {status}; stderr:\n{}",
            self.stderr_tail(40)
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
        drop(self.proc.take());
        if thread::panicking() {
            eprintln!("----- agent stderr -----\n{}", self.stderr_tail(80));
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

impl From<Msg> for Record {
    fn from(m: Msg) -> Record {
        Record {
            key: m.key.unwrap_or_default(),
            value: m.value.unwrap_or_default(),
            headers: m
                .headers
                .into_iter()
                .map(|(k, v)| {
                    let v = String::from_utf8_lossy(&v.unwrap_or_default()).into_owned();
                    (k, v)
                })
                .collect(),
        }
    }
}

/// Every record of partition 0 of `topic` from the start to the high watermark (empty if the
/// topic does not exist yet, or the broker does not answer).
pub fn read_topic(bootstrap: &str, topic: &str) -> Vec<Record> {
    let Ok((low, high)) = consumer(bootstrap).fetch_watermarks(topic, 0, Duration::from_secs(10))
    else {
        return Vec::new();
    };
    if high <= low {
        return Vec::new();
    }
    let expected = usize::try_from(high - low).unwrap();
    consume(bootstrap, topic, 0, Offset::Offset(low), expected)
        .into_iter()
        .map(Record::from)
        .collect()
}

/// Poll `topic` until [`check`] passes (returning the records), for at most `limit`; a
/// violation that waiting cannot mend fails at once.
pub fn wait_checked(
    bootstrap: &str,
    topic: &str,
    contents: &[Content],
    what: &str,
    limit: Duration,
) -> Vec<Record> {
    poll_until(what, limit, || {
        let recs = read_topic(bootstrap, topic);
        match check(contents, &recs) {
            Ok(()) => Ok(recs),
            Err((true, why)) => Err(why),
            Err((false, why)) => panic!("trajectory violation: {why}"),
        }
    })
}

/// The acknowledged offset the checkpoint in `checkpoint_dir` holds for `path` (`None`
/// without a checkpoint or an entry for that path).
pub fn checkpointed_offset(checkpoint_dir: &Path, path: &Path) -> Option<u64> {
    let bytes = fs::read(checkpoint_dir.join("checkpoint")).ok()?;
    qanat_agent::checkpoint::Checkpoint::decode(&bytes)
        .ok()?
        .files
        .into_iter()
        .find(|f| f.path == path)
        .map(|f| f.offset)
}

/// Wait until the checkpoint holds at least `offset` for `path`; returns what it holds.
pub fn wait_checkpointed(checkpoint_dir: &Path, path: &Path, offset: u64) -> u64 {
    poll_until(
        &format!("checkpoint of {} to reach {offset}", path.display()),
        DEADLINE * 3,
        || match checkpointed_offset(checkpoint_dir, path) {
            Some(o) if o >= offset => Ok(o),
            other => Err(format!("checkpointed {other:?}")),
        },
    )
}

// ------------------------------------------------------------------------------------------
// The checker (independent of the agent and of `qanat audit`)

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
        let mut terminated = false;
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
                        terminated = got.last() == Some(&b'\n');
                        got == r.value.as_slice()
                            || (terminated && &got[..got.len() - 1] == r.value.as_slice())
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
        // Plain lines in these tests: one line per record, except the pieces of a line cut at
        // max_line_bytes (unterminated, no line ends in them) and an unterminated last line
        // flushed when its file is dropped (one line).
        let line_ok = if terminated {
            lines == newlines + 1
        } else {
            lines <= 1
        };
        if !line_ok {
            return Err((
                false,
                format!(
                    "record of {id} at {offset} (terminated: {terminated}): lines={lines}, \
                     {newlines} newline(s) in the value"
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
