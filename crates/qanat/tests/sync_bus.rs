//! The bus in `qanat sync`, against a Qanat broker: a table into a topic as JSON rows keyed
//! by primary key (read back with kcat), a topic range into a table (typed JSON fields or the
//! raw record form), offset and time bounds, and precise errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use std::process::{Command, Stdio};

use serde_json::Value;
use support::{qanat_ok, Broker};
use sync_support::{sync_fails, sync_json, MyDb, PgDb};

fn kcat_lines(b: &str, topic: &str) -> Vec<String> {
    let out = Command::new("kcat")
        .args(["-C", "-b", b, "-t", topic, "-e", "-q", "-f", "%k\t%s\n"])
        .stdin(Stdio::null())
        .output()
        .expect("kcat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_table_goes_to_a_topic_keyed_by_primary_key_and_comes_back_typed() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        "orders",
        "--partitions",
        "3",
        "--bootstrap",
        &b,
    ]);
    let my = MyDb::new();
    let pg = PgDb::new();
    my.sql(
        "CREATE TABLE orders (id INT PRIMARY KEY, customer VARCHAR(40), amount DECIMAL(10,2), \
         paid TINYINT(1), at DATETIME(6), tag VARBINARY(8))",
    );
    my.sql(
        "INSERT INTO orders SELECT seq, IF(seq % 50 = 0, NULL, CONCAT('c \"', seq, '\"')), \
         seq * 1.01, seq % 2, TIMESTAMP('2026-11-29 10:00:00') + INTERVAL seq SECOND, \
         CAST(seq AS BINARY) FROM seq_1_to_500",
    );
    let to_bus = sync_json(&[
        "copy",
        "--from",
        &my.dsn("orders"),
        "--to",
        &format!("kafka://{b}/orders"),
    ]);
    assert_eq!(to_bus["tables"][0]["rows_written"], 500, "{to_bus}");

    let lines = kcat_lines(&b, "orders");
    assert_eq!(lines.len(), 500);
    let mut ids = Vec::new();
    for line in &lines {
        let (key, value) = line.split_once('\t').expect("key\tvalue");
        let v: Value = serde_json::from_str(value).expect("JSON row");
        assert_eq!(v["id"].to_string(), key, "{line}");
        ids.push(v["id"].as_i64().expect("id"));
        if v["id"] == 7 {
            assert_eq!(
                v,
                serde_json::json!({"id": 7, "customer": "c \"7\"", "amount": "7.07",
                    "paid": true, "at": "2026-11-29 10:00:07", "tag": "37"})
            );
        }
        if v["id"] == 50 {
            assert!(v["customer"].is_null(), "{line}");
        }
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=500).collect::<Vec<_>>());

    pg.sql(
        "CREATE TABLE orders (id integer PRIMARY KEY, customer varchar(40), amount numeric(10,2), \
         paid boolean, at timestamp(6), tag bytea)",
    );
    let source = format!(
        "kafka://{b}/orders?columns=id:int64,customer:utf8,amount:decimal(10,2),paid:bool,\
         at:timestamp,tag:binary&key=id"
    );
    let from_bus = sync_json(&[
        "copy",
        "--from",
        &source,
        "--to",
        &pg.dsn("orders"),
        "--verify",
    ]);
    let t = &from_bus["tables"][0];
    assert_eq!(t["rows_written"], 500, "{from_bus}");
    assert_eq!(t["splits"], 3, "{from_bus}");
    assert_eq!(t["verify"]["ok"], true, "{from_bus}");
    assert_eq!(
        pg.sql("SELECT customer, amount, paid, at, encode(tag, 'hex') FROM orders WHERE id = 499")
            .trim(),
        "c \"499\"\t503.99\tt\t2026-11-29 10:08:19\t343939"
    );

    // A record that is not a JSON row is a dirty record, not a failure or a lost row.
    let mut kcat = Command::new("kcat")
        .args(["-P", "-b", &b, "-t", "orders", "-p", "0", "-K", ":"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat -P");
    use std::io::Write;
    kcat.stdin
        .take()
        .expect("stdin")
        .write_all(b"x:not json\n")
        .expect("write");
    assert!(kcat.wait().expect("kcat").success());
    pg.sql("CREATE TABLE orders2 (LIKE orders INCLUDING ALL)");
    let dirty = sync_json(&["copy", "--from", &source, "--to", &pg.dsn("orders2")]);
    let t = &dirty["tables"][0];
    assert_eq!(t["rows_read"], 501, "{dirty}");
    assert_eq!(t["rows_written"], 500, "{dirty}");
    assert_eq!(t["dirty"], 1, "{dirty}");
}

#[test]
fn offset_and_time_ranges_select_records_in_the_raw_form() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        "events",
        "--partitions",
        "1",
        "--bootstrap",
        &b,
    ]);
    // Ten records one second apart from 2026-11-29T00:00:00Z, stamped by the producer.
    let script = r#"
import sys
from confluent_kafka import Producer
p = Producer({"bootstrap.servers": sys.argv[1]})
for i in range(10):
    p.produce("events", key=f"k{i}", value=f"v{i}", timestamp=1795910400000 + i * 1000)
assert p.flush(30) == 0
"#;
    let out = Command::new("python3")
        .args(["-c", script, &b])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pg = PgDb::new();
    let ddl =
        "(_partition bigint, _offset bigint, _timestamp timestamptz, _key text, _value text, \
               PRIMARY KEY (_partition, _offset))";
    pg.sql(&format!("CREATE TABLE by_offset {ddl}"));
    pg.sql(&format!("CREATE TABLE by_time {ddl}"));

    let s = sync_json(&[
        "copy",
        "--from",
        &format!("kafka://{b}/events?from=offset:2&to=offset:5"),
        "--to",
        &pg.dsn("by_offset"),
        "--verify",
    ]);
    assert_eq!(s["tables"][0]["rows_written"], 3, "{s}");
    assert_eq!(s["tables"][0]["verify"]["ok"], true, "{s}");
    assert_eq!(
        pg.sql("SELECT _offset, _key, _value, _timestamp FROM by_offset ORDER BY _offset"),
        "2\tk2\tv2\t2026-11-29 00:00:02+00\n3\tk3\tv3\t2026-11-29 00:00:03+00\n\
         4\tk4\tv4\t2026-11-29 00:00:04+00\n"
    );

    let s = sync_json(&[
        "copy",
        "--from",
        &format!("kafka://{b}/events?from=time:2026-11-29T00:00:06Z&to=time:2026-11-29T00:00:09Z"),
        "--to",
        &pg.dsn("by_time"),
    ]);
    assert_eq!(s["tables"][0]["rows_written"], 3, "{s}");
    assert_eq!(
        pg.sql("SELECT string_agg(_value, ',' ORDER BY _offset) FROM by_time")
            .trim(),
        "v6,v7,v8"
    );

    let err = sync_fails(&[
        "copy",
        "--from",
        &format!("kafka://{b}/no_such_topic"),
        "--to",
        &pg.dsn("by_time"),
    ]);
    assert!(
        err.contains("no_such_topic") && err.contains("no such topic"),
        "{err}"
    );
    let err = sync_fails(&[
        "copy",
        "--from",
        &format!("kafka://{b}/events?from=yesterday"),
        "--to",
        &pg.dsn("by_time"),
    ]);
    assert!(err.contains("from=\"yesterday\""), "{err}");
}
