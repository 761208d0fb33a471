//! `qanat cdc` against a private MariaDB (binlog ROW, full metadata) and the real broker:
//! exact type mapping, sharded routing, snapshot + stream handover, replay under crashes,
//! and the refusals for bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mariadb_support;
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rdkafka::Offset;
use serde_json::{json, Value as Json};

use mariadb_support::{end_offset, raw_offsets, wait_caught_up, MariaDb};
use support::{consume, qanat_command, Broker, Proc, DEADLINE};

const READY: &str = "qanat cdc connector ";

fn write_config(dir: &tempfile::TempDir, broker: &Broker, body: &str) -> String {
    let path = dir.path().join("cdc.toml");
    let text = format!("bootstrap = \"{}\"\n{body}", broker.bootstrap());
    std::fs::write(&path, text).expect("write cdc.toml");
    path.display().to_string()
}

fn start_cdc(config: &str) -> Proc {
    let mut cmd = qanat_command();
    cmd.args(["cdc", "--config", config]);
    let mut p = Proc::spawn(cmd, "cdc").expect("spawn qanat cdc");
    p.wait_line(READY);
    p
}

/// Every record of partition 0 of `topic` up to its current end: (key, value) as JSON.
fn records(bootstrap: &str, topic: &str) -> Vec<(Option<Json>, Option<Json>)> {
    let high = end_offset(bootstrap, topic);
    if high <= 0 {
        return Vec::new();
    }
    // Offsets-topic keys are plain connector names, not JSON.
    let parse = |b: &Option<Vec<u8>>| {
        b.as_ref().map(|b| {
            serde_json::from_slice::<Json>(b)
                .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(b).into_owned()))
        })
    };
    consume(bootstrap, topic, 0, Offset::Offset(0), high as usize)
        .iter()
        .map(|m| (parse(&m.key), parse(&m.value)))
        .collect()
}

fn wait_records(
    bootstrap: &str,
    topic: &str,
    what: &str,
    done: impl Fn(&[(Option<Json>, Option<Json>)]) -> bool,
) -> Vec<(Option<Json>, Option<Json>)> {
    support::poll_until(what, DEADLINE, || {
        let r = records(bootstrap, topic);
        if done(&r) {
            Ok(r)
        } else {
            Err(format!("{} records in {topic}", r.len()))
        }
    })
}

const TYPES_DDL: &str = "CREATE DATABASE ty; CREATE TABLE ty.types (
    id INT PRIMARY KEY,
    ti TINYINT, tu TINYINT UNSIGNED, si SMALLINT, mi MEDIUMINT, mu MEDIUMINT UNSIGNED,
    i INT, iu INT UNSIGNED, bi BIGINT, bu BIGINT UNSIGNED,
    de DECIMAL(30,4), fl FLOAT, do DOUBLE,
    da DATE, tm TIME(6), dt DATETIME(6), ts TIMESTAMP(6) NULL DEFAULT NULL, dt0 DATETIME, yr YEAR,
    ch CHAR(5), vc VARCHAR(20), tx TEXT, l1 VARCHAR(10) CHARACTER SET latin1,
    gk VARCHAR(10) CHARACTER SET gbk, sj VARCHAR(10) CHARACTER SET sjis,
    kr VARCHAR(10) CHARACTER SET euckr, cy VARCHAR(10) CHARACTER SET cp1251,
    u2 VARCHAR(10) CHARACTER SET ucs2, u16 VARCHAR(10) CHARACTER SET utf16,
    bn BINARY(3), vb VARBINARY(8), bl BLOB,
    en ENUM('small','medium','large'), st SET('a','b','c'),
    js JSON, b1 BIT(1), b12 BIT(12))";

const TYPES_ROWS: &str = "SET time_zone = '+02:00';
    INSERT INTO ty.types VALUES (1, -128, 255, -32768, -8388608, 16777215, -2147483648,
      4294967295, -9223372036854775808, 18446744073709551615,
      '-12345678901234567890123456.0100', 1.1, 1234.5678,
      '2026-11-29', '123:45:56.123456', '2026-11-29 12:34:56.123456',
      '2026-11-29 14:00:00.500000', '1999-12-31 23:59:59', 2026,
      'ab', 'héllo wörld', 'x', 'café€', '中文', '日本', '한국', 'Привет', 'A中', 'x😀',
      X'000102', X'FF', X'DEADBEEF',
      'medium', 'a,c', '{\"k\": [1, 2]}', b'1', b'101010101010');
    INSERT INTO ty.types (id, vc, tx, vb, bl, st) VALUES (2, '', '', X'', X'', '');";

fn types_expected() -> (Json, Json) {
    let one = json!({
        "id": 1, "ti": -128, "tu": 255, "si": -32768, "mi": -8388608, "mu": 16777215,
        "i": -2147483648i64, "iu": 4294967295u64, "bi": i64::MIN, "bu": u64::MAX,
        "de": "-12345678901234567890123456.0100", "fl": 1.1, "do": 1234.5678,
        "da": "2026-11-29", "tm": "123:45:56.123456", "dt": "2026-11-29T12:34:56.123456",
        // TIMESTAMP is an instant: written at +02:00, carried in UTC.
        "ts": "2026-11-29T12:00:00.500000Z", "dt0": "1999-12-31T23:59:59", "yr": 2026,
        "ch": "ab", "vc": "héllo wörld", "tx": "x", "l1": "café€",
        "gk": "中文", "sj": "日本", "kr": "한국", "cy": "Привет", "u2": "A中", "u16": "x😀",
        "bn": "AAEC", "vb": "/w==", "bl": "3q2+7w==",
        "en": "medium", "st": "a,c", "js": "{\"k\": [1, 2]}", "b1": true, "b12": 2730
    });
    let mut two = serde_json::Map::new();
    for (k, _) in one.as_object().expect("object") {
        two.insert(k.clone(), Json::Null);
    }
    two.insert("id".into(), json!(2));
    two.insert("vc".into(), json!(""));
    two.insert("tx".into(), json!(""));
    two.insert("vb".into(), json!(""));
    two.insert("bl".into(), json!(""));
    two.insert("st".into(), json!(""));
    (one, Json::Object(two))
}

#[test]
fn types_round_trip_from_binlog_and_snapshot() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    db.sql(TYPES_DDL);
    let config = write_config(
        &dir,
        &broker,
        &format!(
            "[[connector]]\nname = \"types\"\nsource = \"{}\"\nsnapshot = \"never\"\ntables = ['ty\\..*']\n",
            db.url()
        ),
    );
    let _cdc = start_cdc(&config);
    db.sql(TYPES_ROWS);
    let (one, two) = types_expected();
    let got = wait_records(&broker.bootstrap(), "cdc.ty.types", "2 type rows", |r| {
        r.len() >= 2
    });
    let after = |i: usize| got[i].1.as_ref().expect("value")["after"].clone();
    assert_eq!(after(0), one, "row 1 from the binlog");
    assert_eq!(after(1), two, "row 2 (NULL vs empty) from the binlog");
    assert_eq!(got[0].0, Some(json!({"id": 1})));
    let source = &got[0].1.as_ref().expect("value")["source"];
    assert_eq!(source["connector"], "mysql");
    assert_eq!(source["db"], "ty");
    assert!(source["file"]
        .as_str()
        .is_some_and(|f| f.starts_with("binlog.")));
    assert!(
        source["gtid"]
            .as_str()
            .is_some_and(|g| g.starts_with("0-1-")),
        "{source}"
    );

    // The snapshot reads the same values the binlog carried.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let config2 = write_config(
        &dir2,
        &broker,
        &format!(
            "[[connector]]\nname = \"types-snap\"\nsource = \"{}\"\nsnapshot = \"initial\"\ntables = ['ty\\..*']\ntopic_prefix = \"snap\"\n",
            db.url()
        ),
    );
    let _snap = start_cdc(&config2);
    let got = wait_records(
        &broker.bootstrap(),
        "snap.ty.types",
        "2 snapshot rows",
        |r| r.len() >= 2,
    );
    let value = |i: usize| got[i].1.clone().expect("value");
    assert_eq!(value(0)["op"], "r");
    assert_eq!(value(0)["after"], one, "row 1 from the snapshot");
    assert_eq!(value(1)["after"], two, "row 2 from the snapshot");
    assert_eq!(value(1)["source"]["snapshot"], "last");
}

#[test]
fn sharded_tables_land_in_one_topic() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sql = String::new();
    for shard in 0..8 {
        let d = shard / 4;
        if shard % 4 == 0 {
            sql.push_str(&format!("CREATE DATABASE shop_{d};"));
        }
        sql.push_str(&format!(
            "CREATE TABLE shop_{d}.order_{shard:04} (id BIGINT PRIMARY KEY, amount DECIMAL(10,2));"
        ));
    }
    db.sql(&sql);
    let config = write_config(
        &dir,
        &broker,
        &format!(
            "[[connector]]\nname = \"shards\"\nsource = \"{}\"\nsnapshot = \"never\"\n\
             routes = [{{match = 'shop_\\d+\\.order_\\d{{4}}', topic = \"cdc.shop.orders\"}}]\n",
            db.url()
        ),
    );
    let mut cmd = qanat_command();
    cmd.args([
        "cdc",
        "--config",
        &config,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let mut cdc = Proc::spawn(cmd, "cdc").expect("spawn qanat cdc");
    cdc.wait_line(READY);
    let metrics = cdc
        .seen_line("qanat metrics listening on ")
        .expect("metrics address line");
    let mut sql = String::new();
    for shard in 0..8 {
        sql.push_str(&format!(
            "INSERT INTO shop_{}.order_{shard:04} VALUES ({shard}, {shard}.25);",
            shard / 4
        ));
    }
    db.sql(&sql);
    let got = wait_records(
        &broker.bootstrap(),
        "cdc.shop.orders",
        "8 shard rows",
        |r| r.len() >= 8,
    );
    let mut seen: Vec<(String, String, i64)> = got
        .iter()
        .map(|(_, v)| {
            let v = v.as_ref().expect("value");
            (
                v["source"]["db"].as_str().unwrap_or("").to_string(),
                v["source"]["table"].as_str().unwrap_or("").to_string(),
                v["after"]["id"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    seen.sort();
    let want: Vec<(String, String, i64)> = (0..8)
        .map(|s| (format!("shop_{}", s / 4), format!("order_{s:04}"), s))
        .collect();
    assert_eq!(seen, want);
    assert_eq!(
        records(&broker.bootstrap(), "cdc.shop_0.order_0000").len(),
        0
    );

    // The same figures in Prometheus and in `qanat cdc status`.
    wait_caught_up(&broker, &db, "shards");
    let text = support::scrape(&metrics).expect("scrape");
    let events: f64 =
        support::metric_values(&text, "qanat_cdc_events_total", &[("connector", "shards")])
            .iter()
            .map(|(_, v)| v)
            .sum();
    assert_eq!(events, 8.0, "{text}");
    assert!(text.contains("qanat_cdc_lag_seconds"), "{text}");
    let out = support::qanat(&[
        "cdc",
        "status",
        "--bootstrap",
        &broker.bootstrap(),
        "--sample-secs",
        "0",
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("shards") && stdout.contains("shop_1.order_0007"),
        "{stdout}"
    );
}

fn run_to_failure(args: &[&str]) -> (bool, String) {
    let out = qanat_command().args(args).output().expect("run qanat");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_refused_precisely() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();

    // Bad credentials.
    let bad_url = format!("mysql://cdc:wrong@127.0.0.1:{}", db.port);
    let (ok, err) = run_to_failure(&[
        "cdc",
        "--source",
        &bad_url,
        "--bootstrap",
        &bootstrap,
        "--name",
        "bad-creds",
        "--snapshot",
        "never",
    ]);
    assert!(!ok, "bad credentials accepted");
    assert!(err.contains("Access denied"), "{err}");
    assert!(!err.contains("wrong"), "password in the message: {err}");

    // Statement-based binlog.
    db.sql("SET GLOBAL binlog_format = 'STATEMENT'");
    let (ok, err) = run_to_failure(&[
        "cdc",
        "--source",
        &db.url(),
        "--bootstrap",
        &bootstrap,
        "--name",
        "stmt",
        "--snapshot",
        "never",
    ]);
    assert!(!ok, "STATEMENT binlog accepted");
    assert!(
        err.contains("binlog_format=STATEMENT") && err.contains("binlog_format=ROW"),
        "{err}"
    );
    db.sql("SET GLOBAL binlog_format = 'ROW'");

    // Purged position: store one, stop, purge past it, start again.
    db.sql("CREATE DATABASE p; CREATE TABLE p.t (id INT PRIMARY KEY)");
    let mut cmd = qanat_command();
    cmd.args([
        "cdc",
        "--source",
        &db.url(),
        "--bootstrap",
        &bootstrap,
        "--name",
        "purged",
        "--snapshot",
        "never",
    ]);
    let mut cdc = Proc::spawn(cmd, "cdc").expect("spawn");
    cdc.wait_line(READY);
    db.sql("INSERT INTO p.t VALUES (1)");
    wait_caught_up(&broker, &db, "purged");
    let stored = raw_offsets(&bootstrap, "purged").expect("stored position");
    let stored_file = stored["file"].as_str().expect("file").to_string();
    assert_eq!(cdc.terminate(DEADLINE).map(|s| s.success()), Some(true));
    db.sql("FLUSH BINARY LOGS; INSERT INTO p.t VALUES (2); FLUSH BINARY LOGS;");
    let newest = db.sql("SHOW MASTER STATUS")[0][0].clone();
    db.sql(&format!("PURGE BINARY LOGS TO '{newest}'"));
    // The server may keep a file it still needs; the message names the oldest one it kept.
    let oldest = db.sql("SHOW BINARY LOGS")[0][0].clone();
    assert_ne!(oldest, stored_file, "nothing was purged");
    let (ok, err) = run_to_failure(&[
        "cdc",
        "--source",
        &db.url(),
        "--bootstrap",
        &bootstrap,
        "--name",
        "purged",
        "--snapshot",
        "never",
    ]);
    assert!(!ok, "purged position accepted");
    assert!(
        err.contains(&stored_file) && err.contains(&oldest) && err.contains("when_needed"),
        "{err}"
    );
}

/// Apply change events in order by key: creates/updates/reads set the row, deletes remove it,
/// a truncate (`op: "t"`, no key) empties the table.
fn apply(state: &mut BTreeMap<String, Json>, recs: &[(Option<Json>, Option<Json>)]) {
    for (key, value) in recs {
        if value.as_ref().is_some_and(|v| v["op"] == "t") {
            state.clear();
            continue;
        }
        let (Some(key), Some(value)) = (key, value) else {
            continue;
        };
        let key = key.to_string();
        match value["op"].as_str() {
            Some("d") => {
                state.remove(&key);
            }
            _ => {
                state.insert(key, value["after"].clone());
            }
        }
    }
}

/// `SELECT id, a, b` of a table as the JSON rows the events carry.
fn source_rows(db: &MariaDb, table: &str) -> BTreeMap<String, Json> {
    db.sql(&format!("SELECT id, a, b FROM crash.{table} ORDER BY id"))
        .into_iter()
        .map(|r| {
            let id: i64 = r[0].parse().expect("id");
            let a = if r[1] == "NULL" {
                Json::Null
            } else {
                json!(r[1].parse::<i64>().expect("a"))
            };
            (
                json!({"id": id}).to_string(),
                json!({"id": id, "a": a, "b": r[2]}),
            )
        })
        .collect()
}

fn workload(db: &MariaDb, seed: u64, transactions: usize, stop: &AtomicBool) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for n in 0..transactions {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut sql = String::from("START TRANSACTION;");
        for _ in 0..rng.random_range(1..6) {
            let t = rng.random_range(0..3);
            let id = rng.random_range(1..120);
            match rng.random_range(0..10) {
                0..=3 => sql.push_str(&format!(
                    "INSERT IGNORE INTO crash.w{t} (id, a, b) VALUES ({id}, {}, 'v{n}');",
                    rng.random_range(0..1000)
                )),
                4..=6 => sql.push_str(&format!(
                    "UPDATE crash.w{t} SET a = {}, b = 'u{n}' WHERE id = {id};",
                    rng.random_range(0..1000)
                )),
                7 => sql.push_str(&format!(
                    "UPDATE IGNORE crash.w{t} SET id = {} WHERE id = {id};",
                    rng.random_range(1..120)
                )),
                _ => sql.push_str(&format!("DELETE FROM crash.w{t} WHERE id = {id};")),
            }
        }
        sql.push_str("COMMIT;");
        if n == transactions / 3 {
            sql.push_str("ALTER TABLE crash.w1 ADD COLUMN c INT DEFAULT 7;");
        }
        if n == 2 * transactions / 3 {
            sql.push_str("ALTER TABLE crash.w1 DROP COLUMN c;");
        }
        db.sql(&sql);
    }
}

#[test]
fn replay_equals_source_under_crashes() {
    let seed: u64 = std::env::var("CDC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("replay_equals_source_under_crashes: seed {seed} (CDC_SEED={seed} to replay)");
    let db = Arc::new(MariaDb::start());
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sql = String::from("CREATE DATABASE crash;");
    for t in 0..3 {
        sql.push_str(&format!(
            "CREATE TABLE crash.w{t} (id INT PRIMARY KEY, a INT, b VARCHAR(40));"
        ));
        for id in 1..60 {
            sql.push_str(&format!(
                "INSERT INTO crash.w{t} VALUES ({id}, {id}, 'seed');"
            ));
        }
    }
    db.sql(&sql);
    let config = write_config(
        &dir,
        &broker,
        &format!(
            "[[connector]]\nname = \"crash\"\nsource = \"{}\"\nsnapshot = \"initial\"\nsnapshot_chunk = 16\ntables = ['crash\\..*']\ngtid_resume = true\n",
            db.url()
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || workload(&db, seed, 400, &stop))
    };
    let mut cdc = start_cdc(&config);
    for round in 0..4 {
        // Let some changes through, then crash the connector (and once the broker).
        let before = records(&broker.bootstrap(), "qanat-cdc-offsets").len();
        support::poll_until("a stored position after a restart", DEADLINE, || {
            let n = records(&broker.bootstrap(), "qanat-cdc-offsets").len();
            if n > before {
                Ok(())
            } else {
                Err(format!("{n} offsets records"))
            }
        });
        cdc.kill9();
        if round == 1 {
            broker.kill9();
            broker.start_again();
        }
        cdc = start_cdc(&config);
    }
    writer.join().expect("workload thread");
    wait_caught_up(&broker, &db, "crash");
    // A restart with nothing new to read still reaches the binlog end: a GTID resume starts
    // at an artificial rotate to position 4, and only the idle server's heartbeats say where
    // the end is.
    cdc.kill9();
    let before = records(&broker.bootstrap(), "qanat-cdc-offsets").len();
    cdc = start_cdc(&config);
    support::poll_until("a stored position after an idle restart", DEADLINE, || {
        let n = records(&broker.bootstrap(), "qanat-cdc-offsets").len();
        if n > before {
            Ok(())
        } else {
            Err(format!("{n} offsets records"))
        }
    });
    wait_caught_up(&broker, &db, "crash");
    drop(cdc);
    for t in 0..3 {
        let table = format!("w{t}");
        let mut replayed = BTreeMap::new();
        apply(
            &mut replayed,
            &records(&broker.bootstrap(), &format!("cdc.crash.{table}")),
        );
        // Compare the columns of the final table (the added column was dropped again).
        let replayed: BTreeMap<String, Json> = replayed
            .into_iter()
            .map(|(k, v)| (k, json!({"id": v["id"], "a": v["a"], "b": v["b"]})))
            .collect();
        let source = source_rows(&db, &table);
        assert_eq!(
            replayed.len(),
            source.len(),
            "seed {seed}: row count of {table}"
        );
        for (k, want) in &source {
            assert_eq!(replayed.get(k), Some(want), "seed {seed}: {table} row {k}");
        }
    }
    // Columns as of each event's position: w1 events between the ALTERs carry `c`.
    let w1 = records(&broker.bootstrap(), "cdc.crash.w1");
    assert!(
        w1.iter()
            .any(|(_, v)| v.as_ref().is_some_and(|v| v["after"].get("c").is_some())),
        "no event with the added column"
    );
}

#[test]
fn snapshot_and_stream_hand_over_under_concurrent_writes() {
    let seed: u64 = rand::rng().random();
    eprintln!("snapshot_and_stream_hand_over_under_concurrent_writes: seed {seed}");
    let db = Arc::new(MariaDb::start());
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sql = String::from("CREATE DATABASE crash;");
    for t in 0..3 {
        sql.push_str(&format!(
            "CREATE TABLE crash.w{t} (id INT PRIMARY KEY, a INT, b VARCHAR(40));"
        ));
        let values: Vec<String> = (1..1500)
            .map(|id| format!("({id}, {id}, 'seed')"))
            .collect();
        sql.push_str(&format!(
            "INSERT INTO crash.w{t} VALUES {};",
            values.join(",")
        ));
    }
    db.sql(&sql);
    let config = write_config(
        &dir,
        &broker,
        &format!(
            "[[connector]]\nname = \"handover\"\nsource = \"{}\"\nsnapshot = \"initial\"\nsnapshot_chunk = 10\ntables = ['crash\\..*']\n",
            db.url()
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || workload(&db, seed, 300, &stop))
    };
    let mut cdc = start_cdc(&config);
    // Crash once while the snapshot is (most likely) still running; it resumes after the
    // stored key with a new snapshot while the stream starts where the first one began.
    let mid = support::poll_until("a stored position", DEADLINE, || {
        raw_offsets(&broker.bootstrap(), "handover").ok_or_else(|| "none".to_string())
    });
    cdc.kill9();
    eprintln!("killed at stored position {mid}");
    let _cdc = start_cdc(&config);
    writer.join().expect("workload thread");
    wait_caught_up(&broker, &db, "handover");
    for t in 0..3 {
        let table = format!("w{t}");
        let recs = records(&broker.bootstrap(), &format!("cdc.crash.{table}"));
        assert!(
            recs.iter()
                .any(|(_, v)| v.as_ref().is_some_and(|v| v["op"] == "r")),
            "no snapshot reads"
        );
        let mut replayed = BTreeMap::new();
        apply(&mut replayed, &recs);
        let replayed: BTreeMap<String, Json> = replayed
            .into_iter()
            .map(|(k, v)| (k, json!({"id": v["id"], "a": v["a"], "b": v["b"]})))
            .collect();
        let source = source_rows(&db, &table);
        assert_eq!(
            replayed.len(),
            source.len(),
            "seed {seed}: row count of {table}"
        );
        for (k, want) in &source {
            assert_eq!(replayed.get(k), Some(want), "seed {seed}: {table} row {k}");
        }
    }
}

#[test]
fn truncate_is_one_truncate_event_and_replay_empties_the_table() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    db.sql(
        "CREATE DATABASE tr; CREATE TABLE tr.t (id INT PRIMARY KEY, v INT);
         CREATE TABLE tr.skip (id INT PRIMARY KEY);
         INSERT INTO tr.t VALUES (1, 1), (2, 2); INSERT INTO tr.skip VALUES (1);",
    );
    let config = write_config(
        &dir,
        &broker,
        &format!(
            "[[connector]]\nname = \"tr\"\nsource = \"{}\"\nsnapshot = \"initial\"\ntables = ['tr\\.t']\n",
            db.url()
        ),
    );
    let _cdc = start_cdc(&config);
    // (A TRUNCATE during the snapshot is the next test's; here the snapshot finishes first.)
    wait_caught_up(&broker, &db, "tr");
    db.sql(
        "INSERT INTO tr.t VALUES (3, 3); TRUNCATE TABLE tr.t; TRUNCATE tr.skip;
         USE tr; INSERT INTO t VALUES (4, 4); TRUNCATE t; INSERT INTO t VALUES (5, 5);
         UPDATE t SET v = 50 WHERE id = 5;",
    );
    wait_caught_up(&broker, &db, "tr");

    let recs = records(&broker.bootstrap(), "cdc.tr.t");
    let ops: Vec<&str> = recs
        .iter()
        .filter_map(|(_, v)| v.as_ref()?["op"].as_str())
        .collect();
    assert_eq!(ops, ["r", "r", "c", "t", "c", "t", "c", "u"], "{recs:?}");
    let (key, truncate) = recs
        .iter()
        .find(|(_, v)| v.as_ref().is_some_and(|v| v["op"] == "t"))
        .expect("a truncate event");
    assert_eq!(*key, None, "a truncate has no record key");
    let truncate = truncate.as_ref().expect("value");
    assert_eq!(truncate["before"], Json::Null);
    assert_eq!(truncate["after"], Json::Null);
    assert_eq!(truncate["source"]["db"], "tr");
    assert_eq!(truncate["source"]["table"], "t");
    assert!(truncate["source"]["pos"].as_u64().is_some_and(|p| p > 4));
    assert!(
        records(&broker.bootstrap(), "cdc.tr.skip").is_empty(),
        "an excluded table's truncate is not captured"
    );
    let mut state = BTreeMap::new();
    apply(&mut state, &recs);
    let want: BTreeMap<String, Json> = [(json!({"id": 5}).to_string(), json!({"id": 5, "v": 50}))]
        .into_iter()
        .collect();
    assert_eq!(state, want, "the replayed table equals the source");
    assert_eq!(db.sql("SELECT id, v FROM tr.t"), [["5", "50"]]);
}

#[test]
fn a_truncate_during_the_snapshot_continues_it_in_a_new_read_view() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let values: Vec<String> = (1..=3000).map(|id| format!("({id}, {id})")).collect();
    let small: Vec<String> = (1..=50).map(|id| format!("({id}, {id})")).collect();
    db.sql(&format!(
        "CREATE DATABASE ts; CREATE TABLE ts.a (id INT PRIMARY KEY, v INT);
         CREATE TABLE ts.z (id INT PRIMARY KEY, v INT);
         INSERT INTO ts.a VALUES {}; INSERT INTO ts.z VALUES {};",
        values.join(","),
        small.join(",")
    ));
    // `ts.a` is locked, so the snapshot opens its read view and then waits to read `a`;
    // meanwhile `z` (read after `a`) is truncated. MariaDB refuses that read view for `z`
    // (error 1412), which used to stop the connector.
    let lock = db.hold("LOCK TABLES ts.a WRITE");
    let config = write_config(
        &dir,
        &broker,
        &format!(
            "[[connector]]\nname = \"ts\"\nsource = \"{}\"\nsnapshot = \"initial\"\nsnapshot_chunk = 100\ntables = ['ts\\..*']\n",
            db.url()
        ),
    );
    let mut cdc = start_cdc(&config);
    support::poll_until("the snapshot waiting for ts.a", DEADLINE, || {
        let waiting = db.sql(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE STATE LIKE 'Waiting for table metadata lock%' AND INFO LIKE '%`a`%'",
        );
        match waiting.first().and_then(|r| r.first()).map(String::as_str) {
            Some("0") | None => Err("not yet".to_string()),
            Some(_) => Ok(()),
        }
    });
    db.sql("TRUNCATE TABLE ts.z; INSERT INTO ts.z VALUES (7, 70), (60, 600);");
    drop(lock);
    db.sql("UPDATE ts.a SET v = 0 WHERE id = 2999;");
    wait_caught_up(&broker, &db, "ts");
    assert!(cdc.is_alive(), "the connector still runs");
    for table in ["a", "z"] {
        let recs = records(&broker.bootstrap(), &format!("cdc.ts.{table}"));
        let mut replayed = BTreeMap::new();
        apply(&mut replayed, &recs);
        let replayed: BTreeMap<String, Json> = replayed
            .into_iter()
            .map(|(k, v)| (k, json!({"id": v["id"], "v": v["v"]})))
            .collect();
        let source: BTreeMap<String, Json> = db
            .sql(&format!("SELECT id, v FROM ts.{table}"))
            .into_iter()
            .map(|r| {
                let id: i64 = r[0].parse().expect("id");
                let v: i64 = r[1].parse().expect("v");
                (json!({"id": id}).to_string(), json!({"id": id, "v": v}))
            })
            .collect();
        assert_eq!(
            replayed, source,
            "the replayed ts.{table} equals the source"
        );
    }
}

#[test]
fn a_running_connector_snapshots_signalled_tables_under_concurrent_writes() {
    let seed: u64 = std::env::var("CDC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("incremental snapshot test: seed {seed} (CDC_SEED={seed} to replay)");
    let db = Arc::new(MariaDb::start());
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sql = String::from("CREATE DATABASE crash;");
    for t in 0..3 {
        sql.push_str(&format!(
            "CREATE TABLE crash.w{t} (id INT PRIMARY KEY, a INT, b VARCHAR(40));"
        ));
        let values: Vec<String> = (1..1500)
            .map(|id| format!("({id}, {id}, 'seed')"))
            .collect();
        sql.push_str(&format!(
            "INSERT INTO crash.w{t} VALUES {};",
            values.join(",")
        ));
    }
    db.sql(&sql);
    // Streaming only: the rows already there reach the topics through the signalled snapshot.
    let config = write_config(
        &dir,
        &broker,
        &format!(
            "[[connector]]\nname = \"incr\"\nsource = \"{}\"\nsnapshot = \"never\"\nsnapshot_chunk = 20\ntables = ['crash\\..*']\nsignal_table = \"crash.qanat_signal\"\n",
            db.url()
        ),
    );
    let mut cdc = start_cdc(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || workload(&db, seed, 300, &stop))
    };
    let out = support::qanat(&[
        "cdc",
        "snapshot",
        "--config",
        &config,
        "--connector",
        "incr",
        "--table",
        "crash.w0",
        "--table",
        "crash.w1",
        "--table",
        "crash.w2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Crash once while the snapshot runs, when a stored position shows it running; the
    // restarted connector redoes the chunk after the stored key.
    let mut killed = false;
    for _ in 0..200 {
        let stored = raw_offsets(&broker.bootstrap(), "incr");
        if stored
            .as_ref()
            .is_some_and(|p| p.get("incremental").is_some())
        {
            eprintln!("kill -9 at {stored:?}");
            cdc.kill9();
            killed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _cdc = if killed { start_cdc(&config) } else { cdc };
    writer.join().expect("workload thread");
    support::poll_until(
        "the snapshot done and the binlog end stored",
        DEADLINE * 3,
        || {
            let status = db.sql("SHOW MASTER STATUS");
            let (file, pos) = (status[0][0].clone(), status[0][1].clone());
            match raw_offsets(&broker.bootstrap(), "incr") {
                Some(p)
                    if p["file"] == file.as_str()
                        && p["pos"].as_u64() == pos.parse().ok()
                        && p.get("incremental").is_none() =>
                {
                    Ok(())
                }
                other => Err(format!("stored {other:?}, server at {file}:{pos}")),
            }
        },
    );
    for t in 0..3 {
        let table = format!("w{t}");
        let recs = records(&broker.bootstrap(), &format!("cdc.crash.{table}"));
        assert!(
            recs.iter().any(|(_, v)| v
                .as_ref()
                .is_some_and(|v| v["op"] == "r" && v["source"]["snapshot"] == "incremental")),
            "no incremental snapshot reads of {table}"
        );
        let mut replayed = BTreeMap::new();
        apply(&mut replayed, &recs);
        let replayed: BTreeMap<String, Json> = replayed
            .into_iter()
            .map(|(k, v)| (k, json!({"id": v["id"], "a": v["a"], "b": v["b"]})))
            .collect();
        let source = source_rows(&db, &table);
        assert_eq!(
            replayed.len(),
            source.len(),
            "seed {seed}: row count of {table}"
        );
        for (k, want) in &source {
            assert_eq!(replayed.get(k), Some(want), "seed {seed}: {table} row {k}");
        }
    }
    assert!(
        records(&broker.bootstrap(), "cdc.crash.qanat_signal").is_empty(),
        "the signal table is not captured"
    );
}

#[test]
fn a_table_added_later_is_snapshotted_alone() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    db.sql(
        "CREATE DATABASE a; CREATE TABLE a.t (id INT PRIMARY KEY, v INT);
         CREATE DATABASE b; CREATE TABLE b.t (id INT PRIMARY KEY, v INT);
         INSERT INTO b.t VALUES (1, 1), (2, 2), (3, 3);",
    );
    let body = |tables: &str| {
        format!(
            "[[connector]]\nname = \"grow\"\nsource = \"{}\"\nsnapshot = \"initial\"\ntables = [{tables}]\n",
            db.url()
        )
    };
    let config = write_config(&dir, &broker, &body(r"'a\..*'"));
    let mut cdc = start_cdc(&config);
    db.sql("INSERT INTO a.t VALUES (1, 1)");
    wait_caught_up(&broker, &db, "grow");
    assert_eq!(cdc.terminate(DEADLINE).map(|s| s.success()), Some(true));
    assert!(
        records(&broker.bootstrap(), "cdc.b.t").is_empty(),
        "b.t captured before it was added"
    );

    // While stopped: b.t changes; then it is added to the tables and a snapshot requested.
    db.sql("UPDATE b.t SET v = 20 WHERE id = 2; INSERT INTO a.t VALUES (2, 2);");
    let config = write_config(&dir, &broker, &body(r"'a\..*', 'b\..*'"));
    let out = support::qanat(&[
        "cdc",
        "snapshot",
        "--bootstrap",
        &broker.bootstrap(),
        "--connector",
        "grow",
        "--table",
        "b.t",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _cdc = start_cdc(&config);
    db.sql("INSERT INTO b.t VALUES (4, 4); DELETE FROM b.t WHERE id = 1;");
    wait_caught_up(&broker, &db, "grow");

    let b = records(&broker.bootstrap(), "cdc.b.t");
    assert!(
        b.iter()
            .any(|(_, v)| v.as_ref().is_some_and(|v| v["op"] == "r")),
        "no snapshot reads of b.t"
    );
    let mut state = BTreeMap::new();
    apply(&mut state, &b);
    let want: BTreeMap<String, Json> = [(2, 20), (3, 3), (4, 4)]
        .iter()
        .map(|(id, v)| (json!({"id": id}).to_string(), json!({"id": id, "v": v})))
        .collect();
    assert_eq!(state, want);
    // a.t was not read again: its two inserts, each once.
    let a = records(&broker.bootstrap(), "cdc.a.t");
    let ops: Vec<&str> = a
        .iter()
        .filter_map(|(_, v)| v.as_ref()?["op"].as_str())
        .collect();
    assert_eq!(ops, ["c", "c"], "{a:?}");
}

#[test]
fn the_snapshot_reads_keyed_tables_in_chunks_and_keyless_ones_whole() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // 4096 keyed rows: two full chunks of 2048 (each handed over in batches of 1024), then an
    // empty one. 2500 keyless rows: one query handed over in batches, the last one short; that
    // table comes last, so its last row is "last".
    db.sql(
        "CREATE DATABASE nk; CREATE TABLE nk.keyed (id INT PRIMARY KEY, v VARCHAR(20));
         CREATE TABLE nk.keyless (a INT, b VARCHAR(20));
         INSERT INTO nk.keyed SELECT seq, CONCAT('v', seq) FROM nk.seq_1_to_4096;
         INSERT INTO nk.keyless SELECT seq % 7, CONCAT('b', seq) FROM nk.seq_1_to_2500;",
    );
    let config = write_config(
        &dir,
        &broker,
        &format!(
            "[[connector]]\nname = \"nk\"\nsource = \"{}\"\nsnapshot = \"initial\"\nsnapshot_chunk = 2048\ntables = ['nk\\..*']\n",
            db.url()
        ),
    );
    let _cdc = start_cdc(&config);
    wait_caught_up(&broker, &db, "nk");

    let keyed = records(&broker.bootstrap(), "cdc.nk.keyed");
    let ids: Vec<i64> = keyed
        .iter()
        .map(|(_, v)| {
            v.as_ref().expect("value")["after"]["id"]
                .as_i64()
                .expect("id")
        })
        .collect();
    assert_eq!(
        ids,
        (1..=4096).collect::<Vec<_>>(),
        "every keyed row once, in key order"
    );
    assert!(keyed.iter().all(|(k, v)| {
        let v = v.as_ref().expect("value");
        v["op"] == "r"
            && v["source"]["snapshot"] == "true"
            && *k == Some(json!({"id": v["after"]["id"]}))
    }));

    let keyless = records(&broker.bootstrap(), "cdc.nk.keyless");
    let mut got: Vec<String> = keyless
        .iter()
        .map(|(k, v)| {
            assert_eq!(*k, None, "a keyless table's records have no key");
            v.as_ref().expect("value")["after"].to_string()
        })
        .collect();
    got.sort();
    let mut want: Vec<String> = (1..=2500)
        .map(|i| json!({"a": i % 7, "b": format!("b{i}")}).to_string())
        .collect();
    want.sort();
    assert_eq!(got, want, "every keyless row once");
    let marks: Vec<&str> = keyless
        .iter()
        .filter_map(|(_, v)| v.as_ref()?["source"]["snapshot"].as_str())
        .collect();
    assert_eq!(
        marks.last(),
        Some(&"last"),
        "the snapshot's last row is marked"
    );
    assert!(marks[..marks.len() - 1].iter().all(|m| *m == "true"));
}
