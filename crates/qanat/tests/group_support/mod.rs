//! Helpers for the consumer-group, idempotence and push-subscription tests (beside
//! `support`, which they use read-only):
//!
//! * [`HttpBroker`]: the real `qanat` binary with `--http-listen` (the push endpoint), whose
//!   address it learns from the `qanat http listening on ...` line.
//! * [`http_get`] and [`SseStream`]: a minimal HTTP/1.1 client over a `TcpStream`
//!   (Content-Length and chunked bodies), enough for the Prometheus text and Server-Sent Events.
//! * [`PyConsumer`]: a `tests/py/group_consumers.py` process whose JSON-lines stdout is
//!   collected on a thread.
//! * [`metric_values`]: samples of one Prometheus metric, by labels.
//!
//! Every wait is a poll on an observable condition with a deadline, as in `support`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const QANAT_BIN: &str = env!("CARGO_BIN_EXE_qanat");
pub const DEADLINE: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------------------------------
// A broker with the HTTP API

/// `qanat broker --http-listen 127.0.0.1:0` with its own temporary data dir; killed on drop
/// (its stderr tail is printed when the test is panicking).
pub struct HttpBroker {
    child: Option<Child>,
    pub addr: String,
    pub http_addr: String,
    dir: TempDir,
}

impl HttpBroker {
    pub fn start(config: &str) -> HttpBroker {
        let dir = tempfile::Builder::new()
            .prefix("qanat-http-it-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        fs::create_dir_all(&data).expect("data dir");
        let config_path = dir.path().join("qanat.toml");
        fs::write(&config_path, config).expect("config");
        let stderr = File::create(dir.path().join("broker.stderr.log")).expect("stderr log");
        let mut cmd = Command::new(QANAT_BIN);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("QANAT_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args([
                "broker",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn qanat broker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut broker = HttpBroker {
            child: Some(child),
            addr: String::new(),
            http_addr: String::new(),
            dir,
        };
        let deadline = Instant::now() + DEADLINE;
        while broker.addr.is_empty() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("qanat http listening on ") {
                        broker.http_addr = a.trim().to_string();
                    } else if let Some(a) = line.strip_prefix("qanat broker listening on ") {
                        broker.addr = a.trim().to_string();
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "broker did not print its listening line; stderr:\n{}",
                    broker.stderr()
                ),
            }
        }
        assert!(
            !broker.http_addr.is_empty(),
            "broker printed no 'qanat http listening on' line before the broker line"
        );
        broker
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("broker.stderr.log")).unwrap_or_default()
    }
}

impl Drop for HttpBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            let all = self.stderr();
            let lines: Vec<&str> = all.lines().collect();
            eprintln!(
                "----- broker stderr (last 100 lines) -----\n{}\n-----",
                lines[lines.len().saturating_sub(100)..].join("\n")
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client

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
pub struct Body {
    reader: BufReader<TcpStream>,
    chunked: bool,
    /// Bytes left in the current chunk (chunked) or the body (Content-Length).
    left: Option<usize>,
    done: bool,
}

impl Body {
    /// Up to `buf.len()` body bytes; `Ok(0)` at the end of the body. Honors the socket's read
    /// timeout (an `Err` of kind WouldBlock/TimedOut then).
    pub fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
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
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
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
}

/// Send `GET path` and read the status line and headers. Returns (status, lower-cased
/// headers, body reader).
pub fn http_request(addr: &str, path: &str) -> (u16, BTreeMap<String, String>, Body) {
    let mut stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to HTTP {addr}: {e}"));
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP status line {status_line:?}"));
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let left = if chunked {
        None
    } else {
        headers.get("content-length").and_then(|v| v.parse().ok())
    };
    (
        status,
        headers,
        Body {
            reader,
            chunked,
            left,
            done: false,
        },
    )
}

/// `GET path` and the whole body as text.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, mut body) = http_request(addr, path);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = body.read_some(&mut buf).expect("read body");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: String,
}

/// A Server-Sent Events stream over [`http_request`].
pub struct SseStream {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    body: Body,
    pending: Vec<u8>,
}

impl SseStream {
    pub fn open(addr: &str, path: &str) -> SseStream {
        let (status, headers, body) = http_request(addr, path);
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
                .reader
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
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
// Prometheus text

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

// ------------------------------------------------------------------------------------------
// Python group consumers

pub fn py_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("py")
        .join(name)
}

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
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(s) = c.try_wait().expect("wait consumer") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "consumer {} did not stop within {DEADLINE:?}; stderr:\n{}",
                    self.id,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(25));
        };
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
            let s = self.stderr();
            let lines: Vec<&str> = s.lines().collect();
            eprintln!(
                "----- consumer {} stderr (last 40 lines) -----\n{}",
                self.id,
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// Run `python3 -c 'import MODULE'` and panic with an install hint if it fails.
pub fn require_python_module(m: &str) {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {m}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "python3 cannot import {m}: run scripts/test.sh, which installs the test dependencies"
    );
}

pub fn require_kcat() {
    let ok = Command::new("kcat")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "kcat is not installed: run scripts/test.sh, which installs it"
    );
}
