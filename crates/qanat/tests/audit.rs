//! `qanat audit` against the real broker, with records produced exactly as the agent does
//! (docs/trajectory.md): exit codes, JSON report content, `--since`, and `--follow` metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit_support;
mod support;

use audit_support::{manifest, SimFile, IN_ORDER};
use serde_json::Value;
use support::{metric, poll_until, produce, qanat, qanat_spawn, scrape, Broker, Rec, DEADLINE};

fn json_audit(args: &[&str]) -> (i32, Value) {
    let out = qanat(args);
    let code = out.status.code().expect("exit code");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "audit output is not JSON ({e}); status {code}\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, v)
}

fn file<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["files"]
        .as_array()
        .expect("files array")
        .iter()
        .find(|f| f["file"] == id)
        .unwrap_or_else(|| panic!("file {id} not in report: {report:#}"))
}

#[test]
fn loss_is_found_and_named() {
    let broker = Broker::start();
    let bs = broker.bootstrap();
    let out = qanat(&[
        "topics",
        "create",
        "logs",
        "--partitions",
        "3",
        "--bootstrap",
        &bs,
    ]);
    assert!(out.status.success(), "{out:?}");

    let complete = SimFile::new("web7", "complete", 20);
    let gap = SimFile::new("web7", "gap", 20);
    let dup = SimFile::new("web7", "dup", 20);
    let partial = SimFile::new("web7", "partial", 20);
    let never = SimFile::new("web7", "never", 5);
    let rotated = SimFile::new("web7", "rotated", 6);

    let mut recs = complete.records(0..20);
    recs.extend(gap.records(0..7));
    recs.extend(gap.records(8..20));
    recs.extend(dup.records(0..20));
    recs.extend(dup.records(5..9)); // a re-read after a restart
    recs.extend(partial.records(0..12));
    recs.extend(rotated.records(0..6));
    // Garbage: no trajectory headers at all, and a garbled offset.
    let mut garbled = complete.record(complete.lines()[3]);
    garbled.headers[3].1 = Some(b"12x".to_vec());
    recs.push(garbled);
    recs.push(Rec::value("no headers"));
    produce(&bs, "logs", &recs, IN_ORDER);

    let all = [&complete, &gap, &dup, &partial, &never];
    let mut older: Vec<String> = all
        .iter()
        .map(|f| f.manifest_entry(f.size() / 2, 1))
        .collect();
    older.push(rotated.manifest_entry(rotated.size(), 1));
    let newer: Vec<String> = all.iter().map(|f| f.manifest_entry(f.size(), 2)).collect();
    // The rotated file is gone from the latest manifest: still expected, and it arrived.
    produce(
        &bs,
        "manifests",
        &[
            manifest("web7", 1_000, &older),
            manifest("web7", 2_000, &newer),
        ],
        IN_ORDER,
    );

    let args = [
        "audit",
        "--bootstrap",
        &bs,
        "--topic",
        "logs",
        "--manifest-topic",
        "manifests",
        "--json",
    ];
    let (code, r) = json_audit(&args);
    assert_eq!(code, 1, "loss must exit 1: {r:#}");
    assert_eq!(r["schema"], "qanat.audit/1");
    assert_eq!(r["ok"], false);
    let s = &r["summary"];
    assert_eq!(s["records"], recs.len() as u64);
    assert_eq!(s["unattributable_records"], 2);
    assert_eq!(s["manifests"], 2);
    assert_eq!(s["partitions"], 3, "data partitions that carried records");

    // Never collected: exactly the file no record was produced for, by id and path.
    let nc = r["never_collected"].as_array().unwrap();
    assert_eq!(nc.len(), 1, "{r:#}");
    assert_eq!(nc[0]["file"], never.id.as_str());
    assert_eq!(nc[0]["path"], never.path.as_str());
    assert_eq!(nc[0]["size"], never.size());

    // The gap: exactly line 7 of the gap file.
    let (g_off, g_size) = gap.lines()[7];
    let gaps: Vec<&Value> = r["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["file"] == gap.id.as_str())
        .collect();
    assert_eq!(gaps.len(), 1, "{r:#}");
    assert_eq!(
        (gaps[0]["start"].as_u64(), gaps[0]["end"].as_u64()),
        (Some(g_off), Some(g_off + g_size))
    );
    // Listed in a manifest, so the contiguous run stopping at the gap also makes it partial.
    assert_eq!(file(&r, &gap.id)["status"], "partial");
    assert_eq!(file(&r, &gap.id)["contiguous_end"], g_off);
    assert_eq!(file(&r, &gap.id)["highest_end"], gap.size());

    // Duplicates: lines 5..9 of the dup file, delivered twice.
    let d = r["duplicates"].as_array().unwrap();
    assert_eq!(d.len(), 1, "{r:#}");
    let lines = dup.lines();
    assert_eq!(d[0]["file"], dup.id.as_str());
    assert_eq!(d[0]["start"], lines[5].0);
    assert_eq!(d[0]["end"], lines[8].0 + lines[8].1);
    assert_eq!(d[0]["deliveries"], 2);
    assert_eq!(file(&r, &dup.id)["status"], "complete");

    // Partial: 12 of 20 lines shipped; the tail is also a gap.
    let p: Vec<&Value> = r["partial"].as_array().unwrap().iter().collect();
    let ids: Vec<&str> = p.iter().filter_map(|p| p["file"].as_str()).collect();
    assert_eq!(ids.len(), 2, "{r:#}");
    assert!(
        ids.contains(&gap.id.as_str()) && ids.contains(&partial.id.as_str()),
        "{ids:?}"
    );
    let pp = p.iter().find(|p| p["file"] == partial.id.as_str()).unwrap();
    assert_eq!(pp["expected_size"], partial.size());
    assert_eq!(pp["delivered_end"], partial.lines()[12].0);
    assert_eq!(pp["missing_bytes"], partial.size() - partial.lines()[12].0);
    // Its undelivered tail is a gap too; missing bytes count each byte once.
    let tail: Vec<&Value> = r["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["file"] == partial.id.as_str())
        .collect();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0]["end"], partial.size());
    assert_eq!(
        s["missing_bytes"],
        g_size + (partial.size() - partial.lines()[12].0) + never.size()
    );

    for f in [&complete, &rotated] {
        assert_eq!(file(&r, &f.id)["status"], "complete", "{}", f.path);
    }
    assert_eq!(file(&r, &rotated.id)["in_latest_manifest"], false);
    assert_eq!(file(&r, &complete.id)["records"], 20);
    assert_eq!(file(&r, &complete.id)["path"], complete.path.as_str());

    // The text report says the same, naming the never-collected file.
    let out = qanat(&args[..args.len() - 1]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("qanat audit: LOSS"), "{text}");
    assert!(text.contains("never collected (1):"), "{text}");
    assert!(text.contains(&never.path), "{text}");
    assert!(text.contains("unattributable records (2):"), "{text}");
}

#[test]
fn duplicates_and_reordering_alone_exit_zero() {
    let broker = Broker::start();
    let bs = broker.bootstrap();
    let f = SimFile::new("app3", "orders", 10);
    let mut recs = f.records(0..3);
    recs.extend(f.records(4..5));
    recs.extend(f.records(3..4)); // line 3 arrives after line 4
    recs.extend(f.records(5..10));
    recs.extend(f.records(8..10)); // redelivered tail
    produce(&bs, "clean", &recs, IN_ORDER);
    produce(
        &bs,
        "clean-manifests",
        &[manifest("app3", 5, &[f.manifest_entry(f.size(), 5)])],
        IN_ORDER,
    );
    let (code, r) = json_audit(&[
        "audit",
        "--bootstrap",
        &bs,
        "--topic",
        "clean",
        "--manifest-topic",
        "clean-manifests",
        "--json",
    ]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["summary"]["reordered_records"], 1);
    assert_eq!(r["reordered"][0]["start"], f.lines()[3].0);
    assert_eq!(r["duplicates"].as_array().unwrap().len(), 1);
    assert_eq!(
        r["summary"]["duplicate_bytes"],
        f.lines()[8].1 + f.lines()[9].1
    );
    assert_eq!(
        file(&r, &f.id)["bytes_delivered"],
        f.size() + f.lines()[8].1 + f.lines()[9].1
    );
}

#[test]
fn since_window_starts_mid_file() {
    let broker = Broker::start();
    let bs = broker.bootstrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let old_ts = now - 3_600_000;
    let since = now - 1_800_000;
    let f = SimFile::new("db1", "window", 12);
    let idle = SimFile::new("db1", "idle", 3);
    // Old records in their own batches, before the new ones: a broker may answer a time
    // lookup with the start of the batch holding the first newer record.
    let mut old = idle.records(0..3);
    old.extend(f.records(0..5));
    for r in &mut old {
        r.timestamp = Some(old_ts);
    }
    produce(&bs, "win", &old, IN_ORDER);
    let mut new = f.records(5..12);
    for r in &mut new {
        r.timestamp = Some(now);
    }
    produce(&bs, "win", &new, IN_ORDER);
    produce(
        &bs,
        "win-manifests",
        &[manifest(
            "db1",
            now,
            &[
                f.manifest_entry(f.size(), now),
                idle.manifest_entry(idle.size(), old_ts),
            ],
        )],
        IN_ORDER,
    );
    let since_arg = since.to_string();
    let (code, r) = json_audit(&[
        "audit",
        "--bootstrap",
        &bs,
        "--topic",
        "win",
        "--manifest-topic",
        "win-manifests",
        "--since",
        &since_arg,
        "--json",
    ]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["summary"]["records"], 7);
    assert_eq!(file(&r, &f.id)["window_start"], f.lines()[5].0);
    assert_eq!(
        r["never_collected"].as_array().unwrap().len(),
        0,
        "idle file shipped before the window"
    );
    // The whole history is complete too.
    let (code, r) = json_audit(&[
        "audit",
        "--bootstrap",
        &bs,
        "--topic",
        "win",
        "--manifest-topic",
        "win-manifests",
        "--json",
    ]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["summary"]["records"], 15);
}

#[test]
fn usage_and_connection_errors_exit_two() {
    let out = qanat(&[
        "audit",
        "--bootstrap",
        "127.0.0.1:1",
        "--topic",
        "t",
        "--since",
        "yesterday",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = qanat(&["audit", "--bootstrap", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2), "missing --topic: {out:?}");
    // Nothing listens on port 1.
    let out = qanat(&[
        "audit",
        "--bootstrap",
        "127.0.0.1:1",
        "--topic",
        "t",
        "--timeout",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let broker = Broker::start();
    let bs = broker.bootstrap();
    let out = qanat(&[
        "audit",
        "--bootstrap",
        &bs,
        "--topic",
        "no-such-topic",
        "--timeout",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-topic"),
        "{out:?}"
    );
}

#[test]
fn follow_exports_metrics_and_sees_a_gap_close() {
    let broker = Broker::start();
    let bs = broker.bootstrap();
    let f = SimFile::new("web9", "live", 10);
    let mut recs = f.records(0..4);
    recs.extend(f.records(5..10));
    produce(&bs, "live", &recs, IN_ORDER);
    produce(
        &bs,
        "live-manifests",
        &[manifest("web9", 1, &[f.manifest_entry(f.size(), 1)])],
        IN_ORDER,
    );
    let mut audit = qanat_spawn(&[
        "audit",
        "--bootstrap",
        &bs,
        "--topic",
        "live",
        "--manifest-topic",
        "live-manifests",
        "--follow",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let metrics = audit.wait_line("qanat metrics listening on ");
    let missing = f.lines()[4].1 as f64;
    poll_until("the gap in the metrics", DEADLINE, || {
        let body = scrape(&metrics)?;
        match (
            metric(&body, "qanat_audit_missing_bytes", &[]),
            metric(&body, "qanat_audit_records", &[]),
        ) {
            (Some(m), Some(n)) if m == missing && n == 9.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // The late line arrives: the gap closes, and it counts as reordered, not missing.
    produce(&bs, "live", &f.records(4..5), IN_ORDER);
    poll_until("the gap to close", DEADLINE, || {
        let body = scrape(&metrics)?;
        match (
            metric(&body, "qanat_audit_missing_bytes", &[]),
            metric(&body, "qanat_audit_gaps", &[]),
            metric(&body, "qanat_audit_reordered_records", &[]),
            metric(&body, "qanat_audit_records", &[]),
        ) {
            (Some(m), Some(g), Some(o), Some(n))
                if m == 0.0 && g == 0.0 && o == 1.0 && n == 10.0 =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
}
