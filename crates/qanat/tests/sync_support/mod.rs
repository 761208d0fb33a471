//! Helpers for the `qanat sync` tests: private MariaDB and PostgreSQL servers for the whole
//! test binary (from Debian's packages, on free ports and temporary data directories, stopped
//! and removed at exit; the machine's own servers are never touched), a fresh database per
//! test on each, driven through their own command-line clients and dropped at the end; and the
//! `qanat` binary.
#![allow(dead_code)]

#[path = "../postgres_support/mod.rs"]
mod postgres_support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const QANAT_BIN: &str = env!("CARGO_BIN_EXE_qanat");

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{nanos:09}_{:04}",
        std::process::id(),
        rand::random::<u16>() % 10000
    )
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The private MariaDB server of this test binary: `mariadb-install-db` into a temporary
/// directory, `mariadbd` on a free port with `local_infile` on; killed and removed at exit.
struct PrivateMariaDb {
    port: u16,
}

static MARIADB: OnceLock<PrivateMariaDb> = OnceLock::new();
static MARIADB_STOP: Mutex<Option<(u32, PathBuf)>> = Mutex::new(None);

extern "C" fn stop_mariadb() {
    if let Ok(mut guard) = MARIADB_STOP.lock() {
        if let Some((pid, dir)) = guard.take() {
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(pid as i32, &mut status, 0);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn mariadb_server() -> &'static PrivateMariaDb {
    MARIADB.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("qanat-sync-mariadb-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let data = dir.join("data");
        run(
            Command::new("mariadb-install-db")
                .env("TMPDIR", &dir)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg("--auth-root-authentication-method=normal")
                .arg("--user=root")
                .arg("--skip-test-db"),
            "mariadb-install-db (Debian package mariadb-server)",
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let log = std::fs::File::create(dir.join("mariadbd.log")).expect("log file");
        let mut child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--tmpdir={}", dir.display()))
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .arg("--local-infile=1")
            .arg("--character-set-server=utf8mb4")
            .arg("--collation-server=utf8mb4_general_ci")
            .arg("--innodb-buffer-pool-size=128M")
            .arg("--max-connections=500")
            .arg("--skip-name-resolve")
            .arg("--user=root")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mariadbd");
        if let Ok(mut guard) = MARIADB_STOP.lock() {
            *guard = Some((child.id(), dir.clone()));
        }
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(stop_mariadb);
        }
        let log_tail = || std::fs::read_to_string(dir.join("mariadbd.log")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new("mariadb")
                .args([
                    "-h127.0.0.1",
                    &format!("-P{port}"),
                    "-uroot",
                    "-e",
                    "SELECT 1",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mariadbd exited ({status}): {}", log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd not ready: {}",
                log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateMariaDb { port }
    })
}

/// `127.0.0.1:PORT` of this test binary's private MariaDB server.
pub fn mariadb_addr() -> String {
    format!("127.0.0.1:{}", mariadb_server().port)
}

/// `127.0.0.1:PORT` of this test binary's private PostgreSQL server.
pub fn postgres_addr() -> String {
    format!("127.0.0.1:{}", postgres_support::shared().port)
}

fn mariadb_port_arg() -> String {
    format!("-P{}", mariadb_server().port)
}

fn postgres_port() -> String {
    postgres_support::shared().port.to_string()
}

/// A private MariaDB database, dropped on drop.
pub struct MyDb {
    pub name: String,
}

impl MyDb {
    pub fn new() -> Self {
        let name = unique("qsync");
        let db = MyDb { name };
        db.sql_in(
            "",
            &format!("CREATE DATABASE `{}` CHARACTER SET utf8mb4", db.name),
        );
        db
    }

    fn sql_in(&self, database: &str, sql: &str) -> String {
        let mut cmd = Command::new("mariadb");
        cmd.args([
            "-h127.0.0.1",
            &mariadb_port_arg(),
            "-uroot",
            "-N",
            "-B",
            "--local-infile=1",
            "--default-character-set=utf8mb4",
        ]);
        if !database.is_empty() {
            cmd.arg(database);
        }
        cmd.arg("-e").arg(sql);
        run(
            &mut cmd,
            &format!("mariadb: {}", &sql[..sql.len().min(200)]),
        )
    }

    /// Run SQL in this database; the server's complaint on failure.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .args([
                "-h127.0.0.1",
                &mariadb_port_arg(),
                "-uroot",
                "-N",
                "-B",
                &self.name,
                "-e",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Run SQL in this database; the output as tab-separated lines.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in(&self.name, sql)
    }

    pub fn dsn(&self, table: &str) -> String {
        format!("mysql://root@{}/{}.{table}", mariadb_addr(), self.name)
    }
}

impl Drop for MyDb {
    fn drop(&mut self) {
        let _ = Command::new("mariadb")
            .args(["-h127.0.0.1", &mariadb_port_arg(), "-uroot", "-e"])
            .arg(format!("DROP DATABASE IF EXISTS `{}`", self.name))
            .stdin(Stdio::null())
            .output();
    }
}

/// A private PostgreSQL database, dropped on drop.
pub struct PgDb {
    pub name: String,
}

impl PgDb {
    pub fn new() -> Self {
        let name = unique("qsync");
        let db = PgDb { name };
        db.sql_in("postgres", &format!("CREATE DATABASE {}", db.name));
        db
    }

    fn sql_in(&self, database: &str, sql: &str) -> String {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &postgres_port(),
            "-U",
            "postgres",
            "-X",
            "-q",
            "-A",
            "-t",
        ])
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-F",
            "\t",
            "-d",
            database,
            "-c",
            sql,
        ]);
        run(&mut cmd, &format!("psql: {}", &sql[..sql.len().min(200)]))
    }

    pub fn sql(&self, sql: &str) -> String {
        self.sql_in(&self.name, sql)
    }

    pub fn dsn(&self, table: &str) -> String {
        format!(
            "postgres://postgres@{}/{}/public.{table}",
            postgres_addr(),
            self.name
        )
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &postgres_port(),
                "-U",
                "postgres",
                "-X",
                "-q",
                "-d",
                "postgres",
                "-c",
            ])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdin(Stdio::null())
            .output();
    }
}

/// `qanat ARGS` without the developer's `QANAT_*` environment.
pub fn qanat_command() -> Command {
    let mut cmd = Command::new(QANAT_BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("QANAT_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

pub fn qanat(args: &[&str]) -> Output {
    qanat_command()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qanat {args:?}: {e}"))
}

/// Run `qanat sync ARGS --json`, panic unless it succeeds, return the JSON summary.
pub fn sync_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["sync"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = qanat(&all);
    assert!(
        out.status.success(),
        "qanat {all:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_summary(&out)
}

pub fn parse_summary(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}"))
}

/// `qanat sync ARGS` that must fail; returns stderr.
pub fn sync_fails(args: &[&str]) -> String {
    let mut all = vec!["sync"];
    all.extend_from_slice(args);
    let out = qanat(&all);
    assert!(
        !out.status.success(),
        "qanat {all:?} should have failed\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}
