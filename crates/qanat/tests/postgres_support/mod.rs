//! A private PostgreSQL server for tests: `initdb` into a temporary directory and
//! `postgres` on a free port with the settings the test asks for (`wal_level=logical` for
//! CDC), from the Debian packages' `/usr/lib/postgresql/<version>/bin`.
//!
//! The machine's own server (port 5432, `wal_level=replica`) is never touched. As root the
//! server runs as the `postgres` OS user (`setpriv`), which owns the temporary directory.
//! The postmaster gets SIGQUIT (immediate shutdown) when the thread that started it ends —
//! a parked thread that lives as long as the test process — and from [`PgServer`]'s `Drop`;
//! [`shared`] instances are stopped and removed by an `atexit` hook.
//!
//! `pg_hba.conf`: the `postgres` superuser connects without a password (normal and
//! replication connections); every other role must log in with SCRAM, so a wrong password is
//! refused as it would be on a real server.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const DEADLINE: Duration = Duration::from_secs(60);

/// The newest installed server version's `bin` directory.
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server packages are missing (scripts/test.sh installs them)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("no /usr/lib/postgresql/<version>/bin/postgres")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program args…`, as the `postgres` user when we are root.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--pdeathsig=SIGQUIT",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    pid: u32,
    stopped: bool,
}

impl PgServer {
    /// initdb + start with `settings` (`name=value`), then wait until it accepts logins.
    pub fn start(settings: &[&str]) -> PgServer {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("qanat-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let data = dir.join("data");
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown of {}", dir.display());
        }
        let out = as_postgres(&bin.join("initdb"))
            .current_dir(&dir)
            .args(["-D"])
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host replication postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host replication all 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        let port = free_port();
        let log = dir.join("server.log");
        let mut cmd = as_postgres(&bin.join("postgres"));
        cmd.current_dir(&dir)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_replication_slots=10",
                "-c",
                "max_wal_senders=10",
                "-c",
                "fsync=off",
            ]);
        for setting in settings {
            cmd.args(["-c", setting]);
        }
        let log_file = std::fs::File::create(&log).expect("server log");
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file);
        // PR_SET_PDEATHSIG fires when the spawning *thread* ends: spawn from a thread that
        // stays parked for the life of the test process.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cmd.spawn().map(|c| c.id()));
            loop {
                std::thread::park();
            }
        });
        let pid = rx.recv().expect("spawner thread").expect("start postgres");
        let server = PgServer {
            port,
            dir,
            pid,
            stopped: false,
        };
        let started = Instant::now();
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-q",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "postgres on port {port} not ready; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Immediate shutdown and removal of the directory.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        stop_pid(self.pid, &self.dir);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop_pid(pid: u32, dir: &Path) {
    // SAFETY: signalling a process we started; harmless if it is gone.
    unsafe {
        libc::kill(pid as i32, libc::SIGQUIT);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: reaping our own child; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if r != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(dir);
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static SHARED_STOP: Mutex<Option<(u32, PathBuf)>> = Mutex::new(None);

extern "C" fn stop_shared() {
    if let Ok(mut guard) = SHARED_STOP.lock() {
        if let Some((pid, dir)) = guard.take() {
            stop_pid(pid, &dir);
        }
    }
}

/// One `wal_level=logical` server for the whole test binary; stopped at exit.
pub fn shared() -> &'static PgServer {
    SHARED.get_or_init(|| {
        let server = PgServer::start(&["wal_level=logical", "wal_sender_timeout=20s"]);
        if let Ok(mut guard) = SHARED_STOP.lock() {
            *guard = Some((server.pid, server.dir.clone()));
        }
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(stop_shared);
        }
        server
    })
}

/// A fresh database on the shared server, for one test.
pub async fn fresh_database(name: &str) -> (String, tokio_postgres::Client) {
    let server = shared();
    let admin = connect(&server.url("postgres")).await;
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        admin.batch_execute(&sql).await.expect("create database");
    }
    let url = server.url(name);
    let client = connect(&url).await;
    (url, client)
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}
