//! Helpers for the collector's end-to-end tests (`tests/collect.rs`), on top of `support`
//! (its [`Proc`], HTTP client and Prometheus parsing):
//!
//! * [`Collector`] starts the real `qanat collect` binary on an ephemeral port against a
//!   broker, learns its addresses from the `qanat collect listening on ...` and `qanat metrics
//!   listening on ...` stdout lines (no sleeps) and kills it when dropped.
//! * [`chromium`] runs headless Debian `chromium` on a URL and returns the DOM it dumped.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;

use tempfile::TempDir;

use crate::support::{
    http, http_get, metric, qanat_command, wait_with_deadline, Proc, Resp, DEADLINE,
};

const LISTENING: &str = "qanat collect listening on ";
const METRICS: &str = "qanat metrics listening on ";

pub struct Collector {
    proc: Option<Proc>,
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
        let mut cmd = qanat_command();
        cmd.args(["collect", "--config"])
            .arg(&config)
            .args(["--bootstrap", bootstrap, "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("QANAT_LOG", "info")
            .stderr(stderr);
        let mut proc =
            Proc::spawn(cmd, "qanat collect").unwrap_or_else(|e| panic!("qanat collect: {e}"));
        let mut c = Collector {
            proc: None,
            addr: String::new(),
            metrics_addr: String::new(),
            dir,
        };
        // The metrics line comes before the collector's listening line.
        c.addr = proc
            .try_wait_line(LISTENING, DEADLINE)
            .unwrap_or_else(|e| panic!("collector {e}; stderr:\n{}", c.stderr()));
        c.metrics_addr = proc.seen_line(METRICS).unwrap_or_default();
        c.proc = Some(proc);
        c
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("collect.toml")
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("collect.stderr.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("collector is running").pid()
    }

    pub fn is_alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_alive)
    }

    pub fn signal(&self, sig: &str) {
        self.proc
            .as_ref()
            .expect("collector is running")
            .signal(sig);
    }

    /// SIGTERM, then wait for the exit (hang guard: [`DEADLINE`]).
    pub fn stop(&mut self) -> ExitStatus {
        let mut proc = self.proc.take().expect("collector is running");
        // On a timeout, dropping `proc` kills it.
        proc.terminate(DEADLINE).unwrap_or_else(|| {
            panic!(
                "collector did not exit after SIGTERM; stderr:\n{}",
                self.stderr()
            )
        })
    }

    pub fn get(&self, path: &str) -> Resp {
        http(&self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        http(&self.addr, "POST", path, headers, body)
    }

    /// Lower the running collector's RLIMIT_NOFILE (soft and hard) to the descriptors it has
    /// open now plus `spare`, with `prlimit`; returns the new limit.
    pub fn limit_open_files(&self, spare: usize) -> usize {
        let open = fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("list the collector's descriptors")
            .count();
        let limit = open + spare;
        let out = Command::new("prlimit")
            .arg(format!("--pid={}", self.pid()))
            .arg(format!("--nofile={limit}:{limit}"))
            .output()
            .unwrap_or_else(|e| panic!("run prlimit: {e}"));
        assert!(
            out.status.success(),
            "prlimit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        limit
    }

    /// The Prometheus text of the collector's metrics endpoint.
    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr, "/metrics").1
    }

    /// Value of the sample of `name` with exactly `labels`, 0 when absent.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics(), name, labels).unwrap_or(0.0)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        drop(self.proc.take());
        if thread::panicking() {
            eprintln!(
                "----- qanat collect stderr -----\n{}\n----- end -----",
                self.stderr()
            );
        }
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
    let status = wait_with_deadline(&mut child, DEADLINE).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("chromium did not finish loading {url} within {DEADLINE:?}")
    });
    let dom = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    assert!(
        status.success(),
        "chromium exited with {status}; stderr:\n{err}"
    );
    dom
}
