//! Helpers for the collector's end-to-end tests (`tests/collect.rs`):
//!
//! * [`Collector`] starts the real `qanat collect` binary on an ephemeral port against a
//!   broker, learns its addresses from the `qanat collect listening on ...` and `qanat metrics
//!   listening on ...` stdout lines (no sleeps) and kills it when dropped.
//! * [`http`] is a tiny HTTP/1.1 client over a plain TCP stream (one request per connection).
//! * [`chromium`] runs headless Debian `chromium` on a URL and returns the DOM it dumped.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use tempfile::TempDir;

use crate::support::{DEADLINE, POLL_PAUSE, QANAT_BIN};

const LISTENING: &str = "qanat collect listening on ";
const METRICS: &str = "qanat metrics listening on ";

pub struct Collector {
    child: Option<Child>,
    pub addr: String,
    pub metrics_addr: String,
    dir: TempDir,
}

impl Collector {
    /// `qanat collect --config <toml> --bootstrap <bootstrap> --listen 127.0.0.1:0
    /// --metrics-listen 127.0.0.1:0`.
    pub fn start(bootstrap: &str, toml: &str) -> Collector {
        let dir = tempfile::Builder::new()
            .prefix("qanat-collect-it-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("collect.toml");
        fs::write(&config, toml).expect("write collect.toml");
        let stderr = fs::File::create(dir.path().join("collect.stderr.log")).expect("stderr log");
        let mut cmd = Command::new(QANAT_BIN);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("QANAT_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args(["collect", "--config"])
            .arg(&config)
            .args(["--bootstrap", bootstrap, "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("QANAT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn qanat collect");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut c = Collector {
            child: Some(child),
            addr: String::new(),
            metrics_addr: String::new(),
            dir,
        };
        let deadline = Instant::now() + DEADLINE;
        while c.addr.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix(LISTENING) {
                        c.addr = a.trim().to_string();
                    } else if let Some(a) = line.strip_prefix(METRICS) {
                        c.metrics_addr = a.trim().to_string();
                    }
                }
                Err(e) => panic!(
                    "collector did not print '{LISTENING}ADDR' ({e}); stderr:\n{}",
                    c.stderr()
                ),
            }
        }
        c
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("collect.toml")
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("collect.stderr.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("collector is running").id()
    }

    pub fn is_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} {} failed", self.pid());
    }

    /// SIGTERM, then wait for the exit (hang guard: [`DEADLINE`]).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("-TERM");
        let mut child = self.child.take().expect("collector is running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            match child.try_wait().expect("wait for collector") {
                Some(status) => return status,
                None if Instant::now() < deadline => thread::sleep(POLL_PAUSE),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "collector did not exit after SIGTERM; stderr:\n{}",
                        self.stderr()
                    );
                }
            }
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        http(&self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        http(&self.addr, "POST", path, headers, body)
    }

    /// The Prometheus text of the collector's metrics endpoint.
    pub fn metrics(&self) -> String {
        http(&self.metrics_addr, "GET", "/metrics", &[], b"").text()
    }

    /// Value of the metric line starting with `prefix` (name and labels), 0 when absent.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- qanat collect stderr -----\n{}\n----- end -----",
                self.stderr()
            );
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {self:?} {}", self.text()))
    }
}

/// One request on a fresh connection (`Connection: close`), read to EOF.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut wire = req.into_bytes();
    wire.extend_from_slice(body);
    // The server may answer (413) and stop reading before the whole body is sent.
    let _ = s.write_all(&wire);
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    if raw.is_empty() {
        panic!("no response from {addr} to {method} {path}: {read:?}");
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of response headers");
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
}

/// Poll until `cond` holds (hang guard: [`DEADLINE`]).
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(POLL_PAUSE);
    }
}

/// Headless Debian `chromium` loads `url` with a fresh profile and returns the DOM it dumps
/// after the page settles (`--virtual-time-budget`). Fails, never skips, without chromium.
pub fn chromium(url: &str) -> String {
    let bin = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .unwrap_or_else(|| {
            panic!(
                "chromium is not installed: the browser test needs Debian's `chromium` package; \
                 run scripts/test.sh (it installs it) or `apt-get install -y chromium`"
            )
        });
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for chromium") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish loading {url} within {DEADLINE:?}");
        }
        thread::sleep(POLL_PAUSE);
    };
    let dom = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    assert!(
        status.success(),
        "chromium exited with {status}; stderr:\n{err}"
    );
    dom
}
