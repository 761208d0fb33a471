//! A private MariaDB server per test: its own data directory and port, the binlog on in ROW
//! format with full row metadata (the machine's own server, if any, is never touched). Started
//! with `mariadb-install-db` + `mariadbd`, ready once it accepts a query (polled), killed and
//! removed on drop. Statements run through the `mariadb` client over the server's socket.
//! Also: waiting until a `qanat cdc` connector has put everything the server logged on the
//! bus (its stored position equals the binlog end).

#![allow(dead_code)]

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::Offset;
use serde_json::Value as Json;
use tempfile::TempDir;

use crate::support::{consume, consumer, poll_until, Broker, DEADLINE};

pub const USER: &str = "cdc";
pub const PASSWORD: &str = "cdc-pass";

pub struct MariaDb {
    dir: TempDir,
    pub port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl MariaDb {
    pub fn start() -> MariaDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // Temporary tables in a directory of its own: nothing else on the machine can touch them.
        let out = Command::new("mariadb-install-db")
            .env("TMPDIR", dir.path())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--user=root")
            .arg("--skip-test-db")
            .output()
            .expect("run mariadb-install-db (Debian package mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = MariaDb {
            dir,
            port: free_port(),
            child: None,
        };
        db.spawn();
        db.sql(&format!(
            "CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; \
             GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'%'; FLUSH PRIVILEGES;"
        ));
        db
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    fn spawn(&mut self) {
        let data = self.dir.path().join("data");
        let log = std::fs::File::create(self.dir.path().join("mariadbd.log")).expect("log file");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--tmpdir={}", self.dir.path().display()))
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--log-bin={}", data.join("binlog").display()))
            .arg("--binlog-format=ROW")
            .arg("--binlog-row-metadata=FULL")
            .arg("--server-id=1")
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("mariadbd.pid").display()
            ))
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--skip-name-resolve")
            .arg("--user=root")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mariadbd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.try_sql("SELECT 1").is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("mariadbd exited ({status}): {}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd not ready: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("mariadbd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn url(&self) -> String {
        format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// Run statements as root over the socket; rows as tab-separated fields (NULL as `NULL`).
    pub fn try_sql(&self, sql: &str) -> Result<Vec<Vec<String>>, String> {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args([
                "-uroot",
                // 4-byte characters (emoji) reach the server as they are.
                "--default-character-set=utf8mb4",
                "--batch",
                "--skip-column-names",
                "--raw",
                "-e",
                sql,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect())
    }

    pub fn sql(&self, sql: &str) -> Vec<Vec<String>> {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
    }

    /// A session that runs `lock` (e.g. `LOCK TABLES t WRITE`) and holds it until the
    /// returned session is dropped.
    pub fn hold(&self, lock: &str) -> HeldSession {
        let mut child = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-uroot", "--batch", "--skip-column-names", "--unbuffered"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mariadb");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{lock}; SELECT 'held';").expect("write to mariadb");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read from mariadb");
        assert_eq!(line.trim(), "held", "{lock}");
        HeldSession {
            child,
            stdin: Some(stdin),
        }
    }

    /// Stop the server (SIGKILL; the tests never need its data after a stop).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A client session holding what [`MariaDb::hold`] took; ending it releases that.
pub struct HeldSession {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The end offset of partition 0 of `topic`; 0 when the topic does not exist. A slow or
/// failed query is retried, never read as "empty": on a loaded machine a watermark query can
/// outlast its timeout, and an empty answer would fail (or vacuously pass) the assertions.
pub fn end_offset(bootstrap: &str, topic: &str) -> i64 {
    poll_until(
        &format!("the end offset of {topic}"),
        DEADLINE,
        || match consumer(bootstrap).fetch_watermarks(topic, 0, Duration::from_secs(5)) {
            Ok((_, high)) => Ok(high),
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::UnknownTopic
                            | RDKafkaErrorCode::UnknownPartition
                    )
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e.to_string()),
        },
    )
}

/// The stored position of `connector` equals the server's binlog end: everything written
/// so far is on the bus.
pub fn wait_caught_up(broker: &Broker, db: &MariaDb, connector: &str) {
    poll_until(
        "the stored position to reach the binlog end",
        DEADLINE * 3,
        || {
            let status = db.sql("SHOW MASTER STATUS");
            let (file, pos) = (status[0][0].clone(), status[0][1].clone());
            // Keys are plain names, not JSON: read them raw.
            let raw = raw_offsets(&broker.bootstrap(), connector);
            match raw {
                Some(p)
                    if p["file"] == file.as_str()
                        && p["pos"].as_u64() == pos.parse().ok()
                        && p.get("snapshot").is_none() =>
                {
                    Ok(())
                }
                other => Err(format!("stored {other:?}, server at {file}:{pos}")),
            }
        },
    )
}

/// The latest stored position of `connector` in the offsets topic.
pub fn raw_offsets(bootstrap: &str, connector: &str) -> Option<Json> {
    let high = end_offset(bootstrap, "qanat-cdc-offsets");
    if high <= 0 {
        return None;
    }
    consume(
        bootstrap,
        "qanat-cdc-offsets",
        0,
        Offset::Offset(0),
        high as usize,
    )
    .iter()
    .rev()
    .find(|m| m.key.as_deref() == Some(connector.as_bytes()))
    .and_then(|m| m.value.as_ref())
    .and_then(|v| serde_json::from_slice::<Json>(v).ok())
    .map(|v| v["position"].clone())
}
