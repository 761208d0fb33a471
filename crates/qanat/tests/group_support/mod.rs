//! Helpers for the consumer-group and push-subscription tests, on top of `support` (the
//! broker, the HTTP client, Prometheus parsing):
//!
//! * [`SseStream`]: Server-Sent Events over [`http_stream`].
//! * [`PyConsumer`]: a `tests/py/group_consumers.py` process whose JSON-lines stdout is
//!   collected on a thread.
//!
//! Every wait is a poll on an observable condition with a deadline, as in `support`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{http_stream, py_script, tail, wait_with_deadline, Body, DEADLINE};

// ------------------------------------------------------------------------------------------
// Server-Sent Events

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: String,
}

/// A Server-Sent Events stream over [`http_stream`].
pub struct SseStream {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    body: Body<BufReader<TcpStream>>,
    pending: Vec<u8>,
}

impl SseStream {
    pub fn open(addr: &str, path: &str) -> SseStream {
        let (status, headers, body) = http_stream(addr, path);
        SseStream {
            status,
            headers,
            body,
            pending: Vec::new(),
        }
    }

    /// The next event (comments and keep-alives skipped), or `None` if the stream ended or
    /// `deadline` passed.
    pub fn next_event(&mut self, deadline: Instant) -> Option<SseEvent> {
        loop {
            // A complete event is terminated by a blank line.
            if let Some(end) = find_blank_line(&self.pending) {
                let raw: Vec<u8> = self.pending.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&raw[..end.0]).into_owned();
                let mut ev = SseEvent::default();
                let mut data_lines = Vec::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim_start().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = v.trim_start().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data_lines.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                    }
                }
                if data_lines.is_empty() && ev.event.is_empty() {
                    continue; // comment / keep-alive
                }
                ev.data = data_lines.join("\n");
                return Some(ev);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.body
                .set_read_timeout(left.max(Duration::from_millis(1)))
                .expect("set timeout");
            let mut buf = [0u8; 16384];
            match self.body.read_some(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("reading the SSE stream: {e}"),
            }
        }
    }
}

/// (end of the event text, end including the blank line) of the first complete event.
fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    let norm = |i: usize| -> Option<(usize, usize)> {
        if b[i..].starts_with(b"\r\n\r\n") {
            Some((i, i + 4))
        } else if b[i..].starts_with(b"\n\n") {
            Some((i, i + 2))
        } else {
            None
        }
    };
    (0..b.len()).find_map(norm)
}

// ------------------------------------------------------------------------------------------
// Python group consumers

/// A running `group_consumers.py`; its stdout JSON lines are collected as they arrive.
pub struct PyConsumer {
    pub id: String,
    child: Option<Child>,
    events: Arc<Mutex<Vec<Value>>>,
    stderr_path: PathBuf,
    pub stop_file: PathBuf,
}

pub struct PyConsumerOpts<'a> {
    pub bootstrap: &'a str,
    pub topic: &'a str,
    pub group: &'a str,
    pub id: &'a str,
    pub dir: &'a Path,
    pub park_after: usize,
    pub session_timeout_ms: u32,
    pub heartbeat_ms: u32,
}

impl PyConsumer {
    pub fn spawn(o: &PyConsumerOpts<'_>) -> PyConsumer {
        let stderr_path = o.dir.join(format!("{}.stderr", o.id));
        let stop_file = o.dir.join(format!("{}.stop", o.id));
        let _ = fs::remove_file(&stop_file);
        let stderr = File::create(&stderr_path).expect("consumer stderr file");
        let mut child = Command::new("python3")
            .arg(py_script("group_consumers.py"))
            .args(["--bootstrap", o.bootstrap])
            .args(["--topic", o.topic])
            .args(["--group", o.group])
            .args(["--client-id", o.id])
            .arg("--stop-file")
            .arg(&stop_file)
            .args(["--park-after", &o.park_after.to_string()])
            .args(["--session-timeout-ms", &o.session_timeout_ms.to_string()])
            .args(["--heartbeat-ms", &o.heartbeat_ms.to_string()])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3 group_consumers.py: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let id = o.id.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => sink.lock().expect("events lock").push(v),
                    Err(_) => eprintln!("[{id} stdout] {line}"),
                }
            }
        });
        PyConsumer {
            id: o.id.to_string(),
            child: Some(child),
            events,
            stderr_path,
            stop_file,
        }
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().expect("events lock").clone()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The partitions currently assigned (last `assigned` unless a later `revoked`).
    pub fn assignment(&self) -> Vec<i64> {
        let mut current = Vec::new();
        for e in self.events() {
            match e["ev"].as_str() {
                Some("assigned") => {
                    current = e["parts"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_i64).collect())
                        .unwrap_or_default();
                }
                Some("revoked") => current.clear(),
                _ => {}
            }
        }
        current
    }

    /// `(partition, offset, value)` of every record reported processed.
    pub fn processed(&self) -> Vec<(i32, i64, String)> {
        self.events()
            .iter()
            .filter(|e| e["ev"] == "processed")
            .map(|e| {
                (
                    e["p"].as_i64().expect("p") as i32,
                    e["o"].as_i64().expect("o"),
                    e["v"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    pub fn has_event(&self, ev: &str) -> bool {
        self.events().iter().any(|e| e["ev"] == ev)
    }

    pub fn count_event(&self, ev: &str) -> usize {
        self.events().iter().filter(|e| e["ev"] == ev).count()
    }

    /// Panic (with its stderr) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                panic!(
                    "consumer {} exited early ({status}); stderr:\n{}",
                    self.id,
                    self.stderr()
                );
            }
        }
    }

    /// SIGKILL: no LeaveGroup, no commit; the broker learns only from the missed heartbeats.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("consumer running");
        c.kill().expect("SIGKILL consumer");
        c.wait().expect("reap consumer");
    }

    /// Create the stop file and wait for a clean exit (LeaveGroup, exit 0).
    pub fn stop(&mut self) {
        fs::write(&self.stop_file, b"stop").expect("write stop file");
        let mut c = self.child.take().expect("consumer running");
        let status = wait_with_deadline(&mut c, DEADLINE).unwrap_or_else(|| {
            let _ = c.kill();
            panic!(
                "consumer {} did not stop within {DEADLINE:?}; stderr:\n{}",
                self.id,
                self.stderr()
            )
        });
        assert!(
            status.success(),
            "consumer {} exited with {status}; stderr:\n{}",
            self.id,
            self.stderr()
        );
        // The reader thread may still be catching up with the last lines.
        let deadline = Instant::now() + DEADLINE;
        while !self.has_event("done") {
            assert!(
                Instant::now() < deadline,
                "consumer {} exited 0 without a done line",
                self.id
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PyConsumer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- consumer {} stderr (last 40 lines) -----\n{}",
                self.id,
                tail(&self.stderr(), 40)
            );
        }
    }
}
