//! Helpers for the `qanat sync` tests: a private database per test on the machine's MariaDB
//! (127.0.0.1:3306, root) and PostgreSQL (127.0.0.1:5432, postgres), driven through their own
//! command-line clients, dropped at the end; and the `qanat` binary.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};

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
            "-P3306",
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
                "-P3306",
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
        format!("mysql://root@127.0.0.1:3306/{}.{table}", self.name)
    }
}

impl Drop for MyDb {
    fn drop(&mut self) {
        let _ = Command::new("mariadb")
            .args(["-h127.0.0.1", "-P3306", "-uroot", "-e"])
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
            "5432",
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
            "postgres://postgres@127.0.0.1:5432/{}/public.{table}",
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
