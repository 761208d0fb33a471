//! The lake end to end: a private MariaDB (binlog on) → `qanat cdc` (a first snapshot, then
//! the binlog) → the broker → `qanat lake land --once` → `qanat lake merge` → the day's
//! partition, read by DuckDB with the README's query, equals `SELECT` on the source table.
//! `qanat lake audit` then finds nothing missing; with change events taken out of the landed
//! change log (and the day merged again from it) it names exactly their keys and offsets and
//! exits 1. The audit reads the bus from the day's start (less a slack) by record time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mariadb_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use rdkafka::Offset;
use serde_json::{json, Value};

use mariadb_support::{wait_caught_up, MariaDb};
use support::{
    consume, produce, py_script, qanat, qanat_command, qanat_ok, require_python_modules,
    watermarks, Broker, Proc, Rec,
};

const TOPIC: &str = "cdc.shop.orders";
const TX_TOPIC: &str = "cdc.transaction";
const TABLE: &str = "shop.orders";

/// Rows of one DuckDB query.
fn duckdb(sql: &str) -> Vec<Value> {
    require_python_modules(&["duckdb"]);
    let out = Command::new("python3")
        .arg(py_script("duckdb_query.py"))
        .arg(sql)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "DuckDB failed on {sql}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("JSON rows") {
        Value::Array(rows) => rows,
        other => panic!("not a list of rows: {other}"),
    }
}

fn row(id: i64, name: &Value, amount: &Value, qty: &Value) -> Value {
    json!({"id": id, "name": name, "amount": amount, "qty": qty})
}

/// `SELECT` on the source, as the lake holds the values (DECIMAL as its text).
fn source_rows(db: &MariaDb) -> BTreeMap<i64, Value> {
    let text = |s: &str| if s == "NULL" { Value::Null } else { json!(s) };
    db.sql("SELECT id, name, amount, qty FROM shop.orders ORDER BY id")
        .into_iter()
        .map(|r| {
            let id: i64 = r[0].parse().unwrap();
            let qty = match r[3].as_str() {
                "NULL" => Value::Null,
                n => json!(n.parse::<i64>().unwrap()),
            };
            (id, row(id, &text(&r[1]), &text(&r[2]), &qty))
        })
        .collect()
}

/// The live rows of a day's snapshot partition, read with the README's DuckDB query.
fn snapshot_rows(root: &Path, ds: &str) -> BTreeMap<i64, Value> {
    let sql = format!(
        "SELECT * FROM read_parquet('{}/shop/orders/ds=*/part-*.parquet', \
         hive_partitioning = true) WHERE ds = '{ds}' AND NOT _deleted",
        root.display()
    );
    duckdb(&sql)
        .into_iter()
        .map(|r| {
            let id = r["id"].as_i64().unwrap();
            (id, row(id, &r["name"], &r["amount"], &r["qty"]))
        })
        .collect()
}

/// Rows of every kind (deleted too) in a day's snapshot partition.
fn snapshot_count(root: &Path, ds: &str) -> u64 {
    let sql = format!(
        "SELECT count(*) AS n FROM read_parquet('{}/shop/orders/ds={ds}/*.parquet')",
        root.display()
    );
    duckdb(&sql)[0]["n"].as_u64().unwrap()
}

/// A change-log row: (id, op, partition, offset).
type Change = (i64, String, i32, i64);

fn change_log(root: &Path, ds: &str) -> Vec<Change> {
    let sql = format!(
        "SELECT id, _op, _partition, _offset FROM \
         read_parquet('{}/shop/orders_changes/ds=*/part-*.parquet', hive_partitioning = true) \
         WHERE ds = {ds} ORDER BY _partition, _offset",
        root.display()
    );
    duckdb(&sql)
        .into_iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                r["_op"].as_str().unwrap().to_owned(),
                r["_partition"].as_i64().unwrap() as i32,
                r["_offset"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The days of the change log, in order.
fn change_days(root: &Path) -> Vec<String> {
    let mut days: Vec<String> = std::fs::read_dir(root.join("shop/orders_changes"))
        .expect("a landed change log")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_prefix("ds=").map(str::to_owned))
        .collect();
    days.sort();
    days
}

fn parquet_files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".parquet") && !name.starts_with('.')
        })
        .count()
}

fn succeeded(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn merge(root: &str, ds: &str, first: bool) {
    let mut args = vec![
        "lake", "merge", "--root", root, "--table", TABLE, "--ds", ds,
    ];
    if first {
        args.push("--initial");
    }
    succeeded(&format!("merge of {ds}"), qanat(&args));
}

/// Runs `qanat lake audit`: (exit code, stdout).
fn audit(root: &str, ds: &str, bootstrap: &str, json: bool) -> (i32, String) {
    let mut args = vec![
        "lake",
        "audit",
        "--root",
        root,
        "--table",
        TABLE,
        "--ds",
        ds,
        "--bootstrap",
        bootstrap,
        "--topic",
        TOPIC,
        "--transaction-topic",
        TX_TOPIC,
    ];
    if json {
        args.push("--json");
    }
    let out = qanat(&args);
    assert_ne!(
        out.status.code(),
        Some(2),
        "audit error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Consecutive values as (first, last) runs.
fn runs(mut values: Vec<i64>) -> Vec<(i64, i64)> {
    values.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for v in values {
        match out.last_mut() {
            Some(r) if r.1 + 1 == v => r.1 = v,
            _ => out.push((v, v)),
        }
    }
    out
}

fn key_text((a, b): (i64, i64)) -> String {
    if a == b {
        format!("id={a}")
    } else {
        format!("id={a}..={b}")
    }
}

/// What the audit prints before its differences.
fn audit_head(ds: &str, bus: usize, txs: usize, rows: usize, files: usize, keys: usize) -> String {
    format!(
        "lake audit {TABLE} ds={ds}\n  bus events in the day:   {bus}\n  \
         transactions checked:    {txs}\n  change-log rows:         {rows} in {files} files, \
         {keys} keys\n"
    )
}

/// Transaction id of every change event on the bus, by (partition, offset).
fn bus_transactions(bootstrap: &str) -> BTreeMap<(i32, i64), Option<String>> {
    let mut out = BTreeMap::new();
    for partition in 0..2 {
        let (low, high) = watermarks(bootstrap, TOPIC, partition);
        let n = usize::try_from(high - low).unwrap();
        for m in consume(bootstrap, TOPIC, partition, Offset::Offset(low), n) {
            let v: Value = serde_json::from_slice(m.value.as_deref().unwrap()).unwrap();
            let tx = v["transaction"]["id"].as_str().map(str::to_owned);
            out.insert((partition, m.offset), tx);
        }
    }
    out
}

/// Rewrite the day's change-log files without the rows at these (partition, offset)s,
/// keeping each file's metadata: change events lost between the bus and the lake.
fn remove_landed(day: &Path, positions: &[(i32, i64)]) {
    let script = r#"
import json, os, sys, pyarrow.parquet as pq, pyarrow.compute as pc, pyarrow as pa
day, drop = sys.argv[1], {tuple(p) for p in json.loads(sys.argv[2])}
removed = 0
for name in sorted(os.listdir(day)):
    if not name.endswith(".parquet") or name.startswith("."):
        continue
    path = os.path.join(day, name)
    pf = pq.ParquetFile(path)
    meta = pf.metadata.metadata
    t = pf.read()
    keep = pa.array([(p, o) not in drop for p, o in zip(t["_partition"].to_pylist(), t["_offset"].to_pylist())])
    kept = t.filter(keep)
    if kept.num_rows != t.num_rows:
        removed += t.num_rows - kept.num_rows
        pq.write_table(kept.replace_schema_metadata(meta), path)
print(removed)
"#;
    let out = Command::new("python3")
        .args(["-c", script, day.to_str().unwrap()])
        .arg(serde_json::to_string(positions).unwrap())
        .output()
        .unwrap();
    let removed = succeeded("removing landed rows", out);
    assert_eq!(removed.trim(), positions.len().to_string());
}

#[test]
fn mariadb_to_the_merged_partition_equals_the_source_and_the_audit_names_lost_changes() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let b = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        TOPIC,
        "--partitions",
        "2",
        "--bootstrap",
        &b,
    ]);
    // 30 rows before capture starts: they reach the bus as the first snapshot (`r`).
    let initial: Vec<String> = (1..=30)
        .map(|id| {
            let qty = if id % 10 == 0 {
                "NULL".to_string()
            } else {
                (id % 7).to_string()
            };
            format!("({id}, 'n{id}', {id}.25, {qty})")
        })
        .collect();
    db.sql(&format!(
        "CREATE DATABASE shop; CREATE TABLE shop.orders (id INT PRIMARY KEY, \
         name VARCHAR(40) NOT NULL, amount DECIMAL(10,2), qty INT); \
         INSERT INTO shop.orders VALUES {};",
        initial.join(",")
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "bootstrap = \"{b}\"\n[[connector]]\nname = \"shop\"\nsource = \"{}\"\n\
             snapshot = \"initial\"\ntables = ['shop\\..*']\ntransaction_topic = \"{TX_TOPIC}\"\n",
            db.url()
        ),
    )
    .unwrap();
    let mut cmd = qanat_command();
    cmd.args(["cdc", "--config", config.to_str().unwrap()]);
    let mut cdc = Proc::spawn(cmd, "cdc").expect("spawn qanat cdc");
    cdc.wait_line("qanat cdc connector ");
    wait_caught_up(&broker, &db, "shop");

    // The day's changes, one transaction per statement unless grouped.
    for sql in [
        "INSERT INTO shop.orders VALUES (31, 'n31', 1.50, 1), (32, 'n32', 2.50, 2), \
         (33, 'n33', NULL, 3), (34, 'n34', 4.50, NULL), (35, 'n35', 5.50, 5)",
        "UPDATE shop.orders SET amount = amount + 1, qty = id * 2 WHERE id BETWEEN 5 AND 9",
        "UPDATE shop.orders SET name = 'renamed', qty = NULL WHERE id = 7",
        "DELETE FROM shop.orders WHERE id IN (2, 3, 35)",
        "START TRANSACTION; INSERT INTO shop.orders VALUES (41, 'n41', 41.00, 41), \
         (42, 'n42', 42.00, 42), (43, 'n43', 43.00, 43); \
         UPDATE shop.orders SET name = 'n31b' WHERE id = 31; \
         DELETE FROM shop.orders WHERE id = 32; COMMIT",
        "INSERT INTO shop.orders VALUES (50, 'brief', 0.01, 1)",
        "DELETE FROM shop.orders WHERE id = 50",
        "DELETE FROM shop.orders WHERE id = 4",
        "INSERT INTO shop.orders VALUES (4, 'reborn', 4.00, NULL)",
    ] {
        db.sql(sql);
    }
    wait_caught_up(&broker, &db, "shop");
    drop(cdc);
    let source = source_rows(&db);
    assert_eq!(source.len(), 30 + 5 - 3 + 3 - 1);

    // Land, then merge every day in order: the first onto nothing, the others onto the
    // day before.
    let root = dir.path().join("lake");
    let root_s = root.to_str().unwrap().to_owned();
    succeeded(
        "landing",
        qanat(&[
            "lake",
            "land",
            "--bootstrap",
            &b,
            "--topic",
            TOPIC,
            "--table",
            TABLE,
            "--root",
            &root_s,
            "--once",
        ]),
    );
    let days = change_days(&root);
    for (i, ds) in days.iter().enumerate() {
        merge(&root_s, ds, i == 0);
    }
    let bus = bus_transactions(&b);
    let landed: Vec<Change> = days.iter().flat_map(|d| change_log(&root, d)).collect();
    let positions: BTreeSet<(i32, i64)> = landed.iter().map(|c| (c.2, c.3)).collect();
    assert_eq!(positions.len(), landed.len(), "no change landed twice");
    assert_eq!(
        positions,
        bus.keys().copied().collect(),
        "every change on the bus landed"
    );
    let ops: BTreeSet<&str> = landed.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(ops, BTreeSet::from(["c", "d", "r", "u"]));
    assert_eq!(landed.iter().filter(|c| c.1 == "r").count(), 30);

    let ds = days.last().unwrap().clone();
    assert_eq!(
        snapshot_rows(&root, &ds),
        source,
        "the merged day equals the source"
    );

    // The audit of the day: bus = change log = snapshot.
    let day_log = change_log(&root, &ds);
    let day_dir = root.join(format!("shop/orders_changes/ds={ds}"));
    let files = parquet_files_in(&day_dir);
    let keys: BTreeSet<i64> = day_log.iter().map(|c| c.0).collect();
    let txs: BTreeSet<&String> = day_log
        .iter()
        .filter_map(|c| bus[&(c.2, c.3)].as_ref())
        .collect();
    assert!(txs.len() >= 9, "each statement is a transaction: {txs:?}");
    let rows = snapshot_count(&root, &ds);
    let (code, text) = audit(&root_s, &ds, &b, false);
    assert_eq!(
        text,
        format!(
            "{}  snapshot rows:           {rows} (delete mode keep)\nOK\n",
            audit_head(
                &ds,
                day_log.len(),
                txs.len(),
                day_log.len(),
                files,
                keys.len()
            )
        )
    );
    assert_eq!(code, 0, "{text}");

    // Lost between the bus and the lake: the last change of id 7 and the inserts of
    // 41..=43. The day merged again from what is left is wrong exactly there, and the
    // audit says which keys and offsets are missing.
    let last_of_7 = day_log.iter().rfind(|c| c.0 == 7).unwrap().clone();
    assert_eq!(last_of_7.1, "u");
    let lost: Vec<Change> = day_log
        .iter()
        .filter(|c| *c == &last_of_7 || (41..=43).contains(&c.0))
        .cloned()
        .collect();
    assert_eq!(lost.len(), 4, "{lost:?}");
    let lost_at: Vec<(i32, i64)> = lost.iter().map(|c| (c.2, c.3)).collect();
    remove_landed(&day_dir, &lost_at);
    merge(&root_s, &ds, days.len() == 1);
    let merged = snapshot_rows(&root, &ds);
    let wrong: BTreeSet<i64> = source
        .iter()
        .filter(|(id, want)| merged.get(id) != Some(want))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(wrong, BTreeSet::from([7, 41, 42, 43]));

    let mut expected = audit_head(
        &ds,
        day_log.len(),
        txs.len(),
        day_log.len() - 4,
        files,
        keys.len() - 3,
    );
    expected += &format!(
        "  snapshot rows:           {} (delete mode keep)\n",
        rows - 3
    );
    expected += "missing_in_change_log: 4 change events of the day are on the bus, not in the \
                 change log\n";
    for run in runs(lost.iter().map(|c| c.0).collect()) {
        expected += &format!("  key {}\n", key_text(run));
    }
    let mut offset_runs = Vec::new();
    for partition in 0..2 {
        for (first, last) in runs(
            lost_at
                .iter()
                .filter(|p| p.0 == partition)
                .map(|p| p.1)
                .collect(),
        ) {
            offset_runs.push(
                json!({"topic": TOPIC, "partition": partition, "first": first, "last": last}),
            );
            expected += &format!("  {TOPIC}/{partition} offsets {first}-{last}\n");
        }
    }
    expected += "LOSS\n";
    let (code, text) = audit(&root_s, &ds, &b, false);
    assert_eq!(text, expected);
    assert_eq!(code, 1, "{text}");

    let (code, text) = audit(&root_s, &ds, &b, true);
    assert_eq!(code, 1, "{text}");
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["ok"], json!(false));
    let differences = report["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 1, "{text}");
    assert_eq!(differences[0]["kind"], "missing_in_change_log");
    assert_eq!(differences[0]["keys"], json!(["id=7", "id=41..=43"]));
    assert_eq!(differences[0]["offsets"], Value::Array(offset_runs));
}

/// The bus side of the audit starts at the first record whose bus timestamp is at or after
/// the day's start less the slack: an event of the day whose record is stamped earlier than
/// that (a producer clock far behind) is outside what the audit reads, unless the slack
/// covers it or the whole topic is read.
#[test]
fn the_audit_reads_the_bus_from_the_day_start_less_the_slack() {
    /// 2026-11-29T00:00:00Z.
    const DAY_MS: i64 = 1_795_910_400_000;
    let broker = Broker::start();
    let b = broker.bootstrap();
    let topic = "cdc.shop.window";
    qanat_ok(&["topics", "create", topic, "--bootstrap", &b]);
    let event = |id: i64, record_ts: i64| {
        let value = json!({"op": "c", "after": {"id": id}, "ts_ms": DAY_MS + id,
            "source": {"ts_ms": DAY_MS + id, "file": "binlog.000001", "pos": id}});
        Rec::value(value.to_string())
            .key(json!({"id": id}).to_string())
            .timestamp(record_ts)
    };
    // The day before, stamped then; two events of the day, one stamped two hours early.
    let before = json!({"op": "c", "after": {"id": 0}, "ts_ms": DAY_MS - 86_400_000,
        "source": {"ts_ms": DAY_MS - 86_400_000, "file": "binlog.000001", "pos": 0}});
    produce(
        &b,
        topic,
        &[
            Rec::value(before.to_string())
                .key(json!({"id": 0}).to_string())
                .timestamp(DAY_MS - 86_400_000),
            event(1, DAY_MS - 2 * 3_600_000),
            event(2, DAY_MS + 2),
        ],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    succeeded(
        "landing",
        qanat(&[
            "lake",
            "land",
            "--bootstrap",
            &b,
            "--topic",
            topic,
            "--table",
            "shop.window",
            "--root",
            root,
            "--once",
        ]),
    );
    let bus_events = |extra: &[&str]| {
        let mut args = vec![
            "lake",
            "audit",
            "--root",
            root,
            "--table",
            "shop.window",
            "--ds",
            "20261129",
            "--bootstrap",
            &b,
            "--topic",
            topic,
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = qanat(&args);
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(out.status.code(), Some(0), "{report}");
        (
            report["bus_events"].as_u64().unwrap(),
            report["change_log_rows"].as_u64().unwrap(),
        )
    };
    assert_eq!(bus_events(&[]), (1, 2));
    assert_eq!(bus_events(&["--bus-slack-minutes", "180"]), (2, 2));
    assert_eq!(bus_events(&["--bus-from-start"]), (2, 2));
}
