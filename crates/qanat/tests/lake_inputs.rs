//! `qanat lake land` of the two non-CDC inputs as they are really produced: the collector's
//! JSON events (`--input json`, from the running `qanat collect`) and the agent's log records
//! (`--input log`, from the running `qanat agent`). The landed files, read back with pyarrow,
//! hold every record once with the documented columns and values; a change of the JSON
//! events' shape starts a new file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;
mod collect_support;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use serde_json::{json, Value};

use agent_support::Agent;
use collect_support::Collector;
use support::{
    consume_all, consumer, poll_until, py_script, qanat, require_python_modules, watermarks,
    Broker, Msg, DEADLINE,
};

/// Every landed file and row under `dir` (`tests/py/lake_read.py`).
fn read_lake(dir: &Path) -> Value {
    require_python_modules(&["pyarrow"]);
    let out = Command::new("python3")
        .arg(py_script("lake_read.py"))
        .arg(dir)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "lake_read.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lake_read.py prints JSON")
}

fn land(bootstrap: &str, topic: &str, table: &str, input: &str, root: &Path) {
    let out = qanat(&[
        "lake",
        "land",
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--table",
        table,
        "--input",
        input,
        "--root",
        root.to_str().unwrap(),
        "--once",
    ]);
    assert!(
        out.status.success(),
        "qanat lake land failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metadata columns after the data columns, with their Arrow types as pyarrow names them.
const META: [(&str, &str); 8] = [
    ("_op", "string"),
    ("_log_pos", "string"),
    ("_log_time", "timestamp[ms, tz=UTC]"),
    ("_commit_ts", "timestamp[ms, tz=UTC]"),
    ("_extract_time", "timestamp[ms, tz=UTC]"),
    ("_topic", "string"),
    ("_partition", "int32"),
    ("_offset", "int64"),
];

/// A file's (column, type) list.
fn file_columns(file: &Value) -> Vec<(String, String)> {
    file["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c[0].as_str().unwrap().to_owned(),
                c[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn with_meta(data: &[(&str, &str)]) -> Vec<(String, String)> {
    data.iter()
        .chain(META.iter())
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

/// (first, last) offset of each landed file, in offset order.
fn file_ranges(lake: &Value) -> Vec<(i64, i64)> {
    let mut ranges: Vec<(i64, i64)> = lake["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let m = &f["metadata"];
            (
                m["qanat.first_offset"].as_str().unwrap().parse().unwrap(),
                m["qanat.last_offset"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    ranges.sort_unstable();
    ranges
}

/// Landed rows by offset, asserting each offset is there once.
fn rows_by_offset(lake: &Value) -> BTreeMap<i64, Value> {
    let mut out = BTreeMap::new();
    for row in lake["rows"].as_array().unwrap() {
        let offset = row["_offset"].as_i64().unwrap();
        assert!(
            out.insert(offset, row.clone()).is_none(),
            "offset {offset} landed twice"
        );
    }
    out
}

/// The metadata every landed row of `msg` carries, `_log_pos` aside.
fn assert_meta(row: &Value, msg: &Msg, topic: &str) {
    let ts = msg.timestamp.expect("a record timestamp");
    assert_eq!(row["_op"], "c", "{row}");
    assert_eq!(row["_log_time"], json!(ts), "{row}");
    assert_eq!(row["_commit_ts"], json!(ts), "{row}");
    assert_eq!(row["_extract_time"], json!(ts), "{row}");
    assert_eq!(row["_topic"], json!(topic), "{row}");
    assert_eq!(row["_partition"], json!(msg.partition), "{row}");
}

/// The collector's page-view beacon record, as landed (`BeaconRecord` of `qanat-collect`).
const BEACON_COLUMNS: [(&str, &str); 13] = [
    ("app", "string"),
    ("type", "string"),
    ("priority", "string"),
    ("source", "string"),
    ("visitor_id", "string"),
    ("user_id", "string"),
    ("received_ms", "int64"),
    ("client_ts", "string"),
    ("client", "string"),
    ("page", "string"),
    ("spm", "string"),
    ("screen", "string"),
    ("language", "string"),
];

/// The collector's app event record, as landed (`BatchRecord` of `qanat-collect`).
const BATCH_COLUMNS: [(&str, &str); 12] = [
    ("app", "string"),
    ("type", "string"),
    ("priority", "string"),
    ("source", "string"),
    ("visitor_id", "string"),
    ("user_id", "string"),
    ("received_ms", "int64"),
    ("client_ts", "int64"),
    ("client", "string"),
    ("spm", "string"),
    ("device", "string"),
    ("event", "string"),
];

#[test]
fn collector_events_land_with_their_fields_and_a_new_shape_starts_a_new_file() {
    // The app events' file keeps the beacons' columns the app events do not have (null).
    let batch_columns: Vec<(&str, &str)> = BATCH_COLUMNS
        .iter()
        .copied()
        .chain([
            ("page", "string"),
            ("screen", "string"),
            ("language", "string"),
        ])
        .collect();
    let broker = Broker::start();
    let b = broker.bootstrap();
    let topic = "web.events";
    let c = Collector::start(
        &b,
        &format!("[[routes]]\nname = \"all\"\ntopic = \"{topic}\"\n"),
    );
    // Three page views of one shape, then a batch of app events: another shape.
    for i in 0..3 {
        let r = c.get(&format!(
            "/t.gif?t=page_view&app=web&url=https%3A%2F%2Fshop.example%2Fp{i}&vid=v-{i}\
             &uid=u-{i}&sr=1920x1080&lang=en-US&title=Page%20{i}&spm=shop.home.banner.{i}"
        ));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    consume_all(&b, topic, 0, 3);
    let batch = json!({
        "app": "shop-android", "device": {"id": "dev-42", "model": "Pixel 8"},
        "user": {"id": "user-7"},
        "events": [
            {"type": "page_view", "page": {"name": "item", "params": {"sku": "A1"}}, "ts": 1_700_000_000_001i64},
            {"type": "click", "page": {"name": "item"}, "control": "buy", "ts": 1_700_000_000_002i64},
            {"type": "exposure", "page": {"name": "home"}, "items": [{"id": "A1", "count": 3}],
             "ts": 1_700_000_000_003i64}
        ]
    });
    let r = c.post(
        "/v1/events",
        &[("Content-Type", "application/json")],
        &serde_json::to_vec(&batch).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let msgs = consume_all(&b, topic, 0, 6);

    let dir = tempfile::tempdir().unwrap();
    land(&b, topic, "web.events", "json", dir.path());
    let lake = read_lake(dir.path());
    assert!(lake["tmp"].as_array().unwrap().is_empty());
    assert_eq!(file_ranges(&lake), [(0, 2), (3, 5)], "one file per shape");
    for f in lake["files"].as_array().unwrap() {
        let first: i64 = f["metadata"]["qanat.first_offset"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let want: &[(&str, &str)] = if first == 0 {
            &BEACON_COLUMNS
        } else {
            &batch_columns
        };
        assert_eq!(file_columns(f), with_meta(want), "{}", f["path"]);
        let day = f["path"].as_str().unwrap();
        assert!(day.starts_with("web/events_changes/ds="), "{day}");
    }
    let rows = rows_by_offset(&lake);
    assert_eq!(rows.len(), 6);
    for msg in &msgs {
        let row = &rows[&msg.offset];
        let record: Value = serde_json::from_slice(msg.value.as_deref().unwrap()).unwrap();
        let record = record.as_object().unwrap();
        for (column, value) in row.as_object().unwrap() {
            if !column.starts_with('_') && !record.contains_key(column) {
                assert_eq!(value, &Value::Null, "{column} is not in the record: {row}");
            }
        }
        for (field, want) in record {
            let got = &row[field];
            match want {
                // Objects and arrays land as their JSON text.
                Value::Object(_) | Value::Array(_) => {
                    let text = got.as_str().unwrap_or_else(|| panic!("{field}: {got}"));
                    assert_eq!(
                        &serde_json::from_str::<Value>(text).unwrap(),
                        want,
                        "{field}"
                    );
                }
                _ => assert_eq!(got, want, "{field} of offset {}", msg.offset),
            }
        }
        assert_meta(row, msg, topic);
        assert_eq!(row["_log_pos"], Value::Null);
    }
    assert_eq!(rows[&0]["visitor_id"], "v-0");
    assert_eq!(rows[&5]["client_ts"], json!(1_700_000_000_003i64));
}

#[test]
fn agent_log_records_land_with_their_trajectory_columns() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("logs")).unwrap();
    let mut text = String::new();
    for i in 0..20 {
        text += &format!("2026-11-29 12:00:{i:02} request {i} done\n");
        if i % 5 == 0 {
            text += &format!("  at frame {i}\n  at frame {}\n", i + 1);
        }
    }
    std::fs::write(d.join("logs/app.log"), &text).unwrap();
    let mut agent = Agent::new(
        d,
        &format!(
            r#"
host = "web7"
checkpoint_dir = "{dir}/state"
rescan_interval_ms = 200
poll_interval_ms = 50
manifest_topic = ""
[output]
bootstrap = "{b}"
batch_age_ms = 20
[[source]]
paths = ["{dir}/logs/*.log"]
topic = "logs.app"
attributes = {{ service = "checkout", env = "test" }}
multiline_start = '^\d{{4}}-'
multiline_timeout_ms = 100
"#,
            dir = d.display()
        ),
    );
    agent.start();
    // The topic is created by the agent's first record: until then there is no partition.
    let msgs = poll_until("20 log events on the bus", DEADLINE, || {
        match consumer(&b).fetch_watermarks("logs.app", 0, Duration::from_secs(5)) {
            Ok((_, high)) if high >= 20 => Ok(consume_all(&b, "logs.app", 0, 20)),
            Ok((_, high)) => Err(format!("{high} records")),
            Err(e) => Err(e.to_string()),
        }
    });
    agent.stop();
    assert_eq!(watermarks(&b, "logs.app", 0).1, 20, "one record per event");

    land(&b, "logs.app", "logs.app", "log", d.join("lake").as_path());
    let lake = read_lake(&d.join("lake"));
    assert_eq!(file_ranges(&lake), [(0, 19)]);
    assert_eq!(
        file_columns(&lake["files"][0]),
        with_meta(&[
            ("message", "string"),
            ("host", "string"),
            ("path", "string"),
            ("file_id", "string"),
            ("file_offset", "int64"),
            ("lines", "int64"),
            ("headers", "string"),
        ])
    );
    let rows = rows_by_offset(&lake);
    let header = |m: &Msg, name: &str| -> String {
        let v = m.headers.iter().find(|(k, _)| k == name);
        String::from_utf8(v.unwrap().1.clone().unwrap()).unwrap()
    };
    let path = d.join("logs/app.log").display().to_string();
    let mut events = Vec::new();
    for msg in &msgs {
        let row = &rows[&msg.offset];
        let message = String::from_utf8(msg.value.clone().unwrap()).unwrap();
        assert_eq!(row["message"], json!(message));
        assert_eq!(row["host"], "web7");
        assert_eq!(row["path"], json!(path));
        let file_id = header(msg, "qanat.file");
        assert_eq!(row["file_id"], json!(file_id));
        let offset: i64 = header(msg, "qanat.offset").parse().unwrap();
        assert_eq!(row["file_offset"], json!(offset));
        let lines: i64 = header(msg, "qanat.lines").parse().unwrap();
        assert_eq!(row["lines"], json!(lines));
        // Every other header, as one JSON object.
        let others: serde_json::Map<String, Value> = msg
            .headers
            .iter()
            .filter(|(k, _)| {
                ![
                    "qanat.host",
                    "qanat.file",
                    "qanat.path",
                    "qanat.offset",
                    "qanat.lines",
                ]
                .contains(&k.as_str())
            })
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!(String::from_utf8(v.clone().unwrap()).unwrap()),
                )
            })
            .collect();
        let landed: Value = serde_json::from_str(row["headers"].as_str().unwrap()).unwrap();
        assert_eq!(landed, Value::Object(others));
        assert_eq!(landed["service"], "checkout");
        assert_eq!(row["_log_pos"], json!(format!("{file_id}:{offset}")));
        assert_meta(row, msg, "logs.app");
        events.push((offset, lines, message));
    }
    // The file, event by event: each message is its bytes at its offset, less the newline.
    events.sort();
    let mut rebuilt = String::new();
    for (offset, lines, message) in &events {
        assert_eq!(*offset as usize, rebuilt.len());
        assert_eq!(*lines as usize, message.lines().count());
        rebuilt += message;
        rebuilt += "\n";
    }
    assert_eq!(rebuilt, text);
}
