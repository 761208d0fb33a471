//! Consumer groups with real clients against the real `qanat` binary (A6):
//!
//! * three confluent-kafka consumers (`tests/py/group_consumers.py`, synchronous commit per
//!   record) share a six-partition topic, two partitions each; one is SIGKILLed between two
//!   commits and its partitions move to the two others; every record is processed exactly
//!   once across the group;
//! * the group survives broker restarts: live members rejoin and resume, and a fresh member
//!   after a restart starts exactly at the committed offsets; `qanat groups describe` and the
//!   `qanat_group_lag` gauge show the committed offsets and lag;
//! * `kcat -G` balanced consumption reads everything and commits its offsets.
//!
//! These tests FAIL, never skip, when a client is missing: `scripts/test.sh` installs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod group_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use group_support::{PyConsumer, PyConsumerOpts};
use support::{
    http_get, keyed_records, metric_values, poll_until, produce, qanat_ok, require_kcat,
    require_python_modules, Broker, DEADLINE,
};

/// Small coordinator delays so rebalances are quick; consumers ask for 4 s sessions.
const GROUPS_CONFIG: &str =
    "[groups]\ninitial_rebalance_delay_ms = 200\nmin_session_timeout_ms = 1000\n";
const SESSION_TIMEOUT_MS: u32 = 4000;
const HEARTBEAT_MS: u32 = 400;

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One row of `qanat groups describe`: (committed, log end, lag, owner).
type DescribeRow = (Option<i64>, i64, Option<i64>, String);

/// `qanat groups describe GROUP`: (state, member count, rows by partition of `topic`).
fn describe(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> (String, usize, BTreeMap<i32, DescribeRow>) {
    let out = qanat_ok(&["groups", "describe", group, "--bootstrap", bootstrap]);
    let mut state = String::new();
    let mut members = 0;
    let mut rows = BTreeMap::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.trim().split('\t').collect();
        if line.starts_with("group ") {
            state = fields
                .iter()
                .find_map(|f| f.strip_prefix("state "))
                .unwrap_or_default()
                .to_string();
        } else if line.trim_start().starts_with("member ") {
            members += 1;
        } else if fields.len() == 6 && fields[0] == topic {
            let num = |s: &str| s.parse::<i64>().ok();
            rows.insert(
                fields[1].parse().unwrap(),
                (
                    num(fields[2]),
                    num(fields[3]).unwrap(),
                    num(fields[4]),
                    fields[5].to_string(),
                ),
            );
        }
    }
    (state, members, rows)
}

/// Records per partition in `delivered`.
fn per_partition(delivered: &[(i32, i64)]) -> BTreeMap<i32, i64> {
    let mut m = BTreeMap::new();
    for (p, _) in delivered {
        *m.entry(*p).or_insert(0) += 1;
    }
    m
}

/// Assert that the processed reports of `consumers` are exactly `want` ((p, o) -> value),
/// each once.
fn assert_exactly_once(consumers: &[&PyConsumer], want: &BTreeMap<(i32, i64), String>) {
    let mut seen: BTreeMap<(i32, i64), Vec<String>> = BTreeMap::new();
    for c in consumers {
        for (p, o, v) in c.processed() {
            seen.entry((p, o))
                .or_default()
                .push(format!("{}:{v}", c.id));
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).take(10).collect();
    assert!(
        dups.is_empty(),
        "records processed more than once: {dups:?}"
    );
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !seen.contains_key(k))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "records never processed (first 10): {missing:?}"
    );
    let extra: Vec<_> = seen
        .keys()
        .filter(|k| !want.contains_key(k))
        .take(10)
        .collect();
    assert!(extra.is_empty(), "unexpected records processed: {extra:?}");
    for (k, v) in &seen {
        let got = v[0].split_once(':').unwrap().1;
        assert_eq!(got, want[k], "value of record {k:?}");
    }
}

fn processed_keys(consumers: &[&PyConsumer]) -> (usize, BTreeSet<(i32, i64)>) {
    let mut total = 0;
    let mut set = BTreeSet::new();
    for c in consumers {
        for (p, o, _) in c.processed() {
            total += 1;
            set.insert((p, o));
        }
    }
    (total, set)
}

/// Wait until the running `consumers` and the `finished` ones (killed or stopped) together
/// processed every key of `want`.
fn wait_processed(
    what: &str,
    consumers: &mut [&mut PyConsumer],
    finished: &[&PyConsumer],
    want: &BTreeMap<(i32, i64), String>,
) {
    poll_until(what, Duration::from_secs(120), || {
        for c in consumers.iter_mut() {
            c.assert_running();
        }
        let mut refs: Vec<&PyConsumer> = consumers.iter().map(|c| &**c).collect();
        refs.extend_from_slice(finished);
        let (_, set) = processed_keys(&refs);
        let missing = want.keys().filter(|k| !set.contains(k)).count();
        if missing == 0 {
            Ok(())
        } else {
            Err(format!(
                "{missing} of {} records not processed yet",
                want.len()
            ))
        }
    });
}

fn expected(recs: &[support::Rec], delivered: &[(i32, i64)]) -> BTreeMap<(i32, i64), String> {
    recs.iter()
        .zip(delivered)
        .map(|(r, d)| (*d, String::from_utf8(r.value.clone().unwrap()).unwrap()))
        .collect()
}

#[test]
fn three_consumers_share_partitions_survive_a_kill_and_broker_restarts() {
    require_python_modules(&["confluent_kafka"]);
    let mut broker = Broker::builder().config(GROUPS_CONFIG).metrics().start();
    let b = broker.bootstrap();
    let (topic, group) = ("grp-orders", "grp-shop");
    qanat_ok(&[
        "topics",
        "create",
        topic,
        "--partitions",
        "6",
        "--bootstrap",
        &b,
    ]);
    let dir = tempfile::tempdir().unwrap();
    let opts = |id: &'static str, park_after: usize| PyConsumerOpts {
        bootstrap: "",
        topic,
        group,
        id,
        dir: dir.path(),
        park_after,
        session_timeout_ms: SESSION_TIMEOUT_MS,
        heartbeat_ms: HEARTBEAT_MS,
    };

    // ---- Phase 1: three members, two partitions each.
    let spawn = |id: &'static str, park: usize| {
        PyConsumer::spawn(&PyConsumerOpts {
            bootstrap: &b,
            ..opts(id, park)
        })
    };
    let mut c1 = spawn("c1", 0);
    let mut c2 = spawn("c2", 0);
    // c3 parks (stops polling, keeps heartbeating) after 150 committed records.
    let mut c3 = spawn("c3", 150);
    poll_until("three members with two partitions each", DEADLINE, || {
        let a: Vec<Vec<i64>> = [&mut c1, &mut c2, &mut c3]
            .into_iter()
            .map(|c| {
                c.assert_running();
                c.assignment()
            })
            .collect();
        let union: BTreeSet<i64> = a.iter().flatten().copied().collect();
        if a.iter().all(|x| x.len() == 2) && union.len() == 6 {
            Ok(())
        } else {
            Err(format!("assignments {a:?}"))
        }
    });
    eprintln!(
        "assignments: c1 {:?} c2 {:?} c3 {:?}",
        c1.assignment(),
        c2.assignment(),
        c3.assignment()
    );

    let recs1 = keyed_records("p1", 6000);
    let delivered1 = produce(&b, topic, &recs1, &[]);
    let want1 = expected(&recs1, &delivered1);
    eprintln!(
        "phase 1: produced per partition {:?}",
        per_partition(&delivered1)
    );

    poll_until("c3 to park after 150 records", DEADLINE, || {
        c3.assert_running();
        if c3.has_event("parked") {
            Ok(())
        } else {
            Err(format!("{} processed", c3.processed().len()))
        }
    });
    let victim_parts = c3.assignment();
    let victim_done = c3.processed().len() as i64;
    let victim_total: i64 = victim_parts
        .iter()
        .map(|p| per_partition(&delivered1)[&(*p as i32)])
        .sum();
    assert!(
        victim_done < victim_total,
        "c3 processed all {victim_total} records of its partitions before parking: the kill \
         would prove nothing"
    );
    let assigned_before: Vec<usize> = [&c1, &c2]
        .iter()
        .map(|c| c.count_event("assigned"))
        .collect();

    // SIGKILL between two commits: no LeaveGroup, the session must expire.
    let killed_at = Instant::now();
    let killed_epoch = epoch_secs();
    c3.kill9();
    eprintln!(
        "killed c3 holding {victim_parts:?} after {victim_done} of {victim_total} of their records"
    );
    poll_until("survivors to take over c3's partitions", DEADLINE, || {
        let a = [c1.assignment(), c2.assignment()];
        let union: BTreeSet<i64> = a.iter().flatten().copied().collect();
        let reassigned = [&c1, &c2]
            .iter()
            .zip(&assigned_before)
            .all(|(c, before)| c.count_event("assigned") > *before);
        if reassigned && a.iter().all(|x| x.len() == 3) && union.len() == 6 {
            Ok(())
        } else {
            Err(format!("assignments {a:?}"))
        }
    });
    let observed = killed_at.elapsed();
    // When each survivor's client got its new assignment (its own clock, same machine).
    let reported = [&c1, &c2]
        .iter()
        .filter_map(|c| {
            c.events()
                .iter()
                .rev()
                .find(|e| e["ev"] == "assigned")
                .and_then(|e| e["t"].as_f64())
        })
        .fold(0.0f64, f64::max)
        - killed_epoch;
    eprintln!(
        "REBALANCE after SIGKILL: survivors assigned {:.2}s after the kill (observed by the test \
         {:.2}s); session timeout {:.1}s, target session timeout + 1 s = {:.1}s",
        reported,
        observed.as_secs_f64(),
        f64::from(SESSION_TIMEOUT_MS) / 1000.0,
        f64::from(SESSION_TIMEOUT_MS) / 1000.0 + 1.0
    );
    // Loose bound (a hang guard, not a benchmark): session timeout plus generous slack.
    assert!(
        reported < f64::from(SESSION_TIMEOUT_MS) / 1000.0 + 15.0,
        "rebalance took {reported:.2}s after the member died"
    );

    wait_processed(
        "every phase-1 record to be processed",
        &mut [&mut c1, &mut c2],
        &[&c3],
        &want1,
    );
    assert_exactly_once(&[&c1, &c2, &c3], &want1);
    let failed: usize = [&c1, &c2, &c3]
        .iter()
        .map(|c| c.count_event("commit_failed"))
        .sum();
    eprintln!(
        "phase 1: 6000 records processed exactly once (c1 {}, c2 {}, c3 {}); {failed} commits \
         failed and were retried",
        c1.processed().len(),
        c2.processed().len(),
        c3.processed().len()
    );

    // ---- Phase 2: broker restart under live members; they rejoin and resume.
    let assigned_before: Vec<usize> = [&c1, &c2]
        .iter()
        .map(|c| c.count_event("assigned"))
        .collect();
    broker.restart();
    let recs2 = keyed_records("p2", 1200);
    let delivered2 = produce(&b, topic, &recs2, &[]);
    let want2 = expected(&recs2, &delivered2);
    let mut want12 = want1.clone();
    want12.extend(want2.clone());
    wait_processed(
        "every phase-2 record to be processed after the restart",
        &mut [&mut c1, &mut c2],
        &[&c3],
        &want12,
    );
    assert_exactly_once(&[&c1, &c2, &c3], &want12);
    let rejoined: Vec<usize> = [&c1, &c2]
        .iter()
        .zip(&assigned_before)
        .map(|(c, before)| c.count_event("assigned") - before)
        .collect();
    eprintln!("phase 2: restart with live members: 1200 new records exactly once; assignments since restart {rejoined:?}");

    let ends: BTreeMap<i32, i64> = (0..6)
        .map(|p| (p, support::watermarks(&b, topic, p).1))
        .collect();
    let (state, members, rows) = poll_until("describe: 2 members, lag 0", DEADLINE, || {
        let d = describe(&b, group, topic);
        let caught_up = (0..6).all(|p| {
            d.2.get(&p)
                .is_some_and(|r| r.0 == Some(ends[&p]) && r.1 == ends[&p] && r.2 == Some(0))
        });
        if d.0 == "Stable" && d.1 == 2 && caught_up {
            Ok(d)
        } else {
            Err(format!("{d:?}"))
        }
    });
    let owners: BTreeSet<&str> = rows.values().map(|r| r.3.as_str()).collect();
    assert_eq!(
        owners,
        BTreeSet::from(["c1", "c2"]),
        "owners in describe: {rows:?}"
    );
    eprintln!("describe after phase 2: state {state}, {members} members, rows {rows:?}");
    c1.stop();
    c2.stop();

    // ---- Phase 3: restart with no members; a fresh member starts at the committed offsets.
    broker.restart();
    let recs3 = keyed_records("p3", 600);
    let delivered3 = produce(&b, topic, &recs3, &[]);
    let want3 = expected(&recs3, &delivered3);
    let lag3 = per_partition(&delivered3);
    let (state, members, rows) = describe(&b, group, topic);
    assert_eq!(members, 0, "no members after the restart: {rows:?}");
    assert_eq!(state, "Empty", "group state after the restart");
    for p in 0..6 {
        let (committed, end, lag, _) = &rows[&p];
        assert_eq!(
            *committed,
            Some(ends[&p]),
            "committed offset of partition {p} after restart"
        );
        assert_eq!(
            *end,
            ends[&p] + lag3.get(&p).copied().unwrap_or(0),
            "log end of {p}"
        );
        assert_eq!(
            *lag,
            Some(lag3.get(&p).copied().unwrap_or(0)),
            "lag of partition {p}"
        );
    }
    let listing = qanat_ok(&["groups", "list", "--bootstrap", &b]);
    assert!(
        listing.lines().any(|l| l.starts_with(group)),
        "groups list lacks {group}:\n{listing}"
    );

    // The Prometheus gauge is refreshed every few seconds: poll it.
    let metrics_addr = broker.metrics_addr().expect("metrics listener");
    let t0 = Instant::now();
    poll_until(
        "qanat_group_lag to show the phase-3 lag",
        Duration::from_secs(30),
        || {
            let (status, text) = http_get(&metrics_addr, "/metrics");
            if status != 200 {
                return Err(format!("HTTP {status}"));
            }
            let got: BTreeMap<i32, i64> = metric_values(
                &text,
                "qanat_group_lag",
                &[("group", group), ("topic", topic)],
            )
            .into_iter()
            .map(|(l, v)| (l["partition"].parse().unwrap(), v as i64))
            .collect();
            let want: BTreeMap<i32, i64> = (0..6)
                .map(|p| (p, lag3.get(&p).copied().unwrap_or(0)))
                .collect();
            if got == want {
                Ok(())
            } else {
                Err(format!("gauge {got:?}, want {want:?}"))
            }
        },
    );
    eprintln!(
        "qanat_group_lag matched after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let mut c4 = PyConsumer::spawn(&PyConsumerOpts {
        bootstrap: &b,
        ..opts("c4", 0)
    });
    wait_processed(
        "the fresh member to process phase 3",
        &mut [&mut c4],
        &[],
        &want3,
    );
    // Give it a last look for stragglers from earlier phases: everything it reported must be
    // phase 3, once.
    c4.stop();
    assert_exactly_once(&[&c4], &want3);
    let (_, _, rows) = describe(&b, group, topic);
    for p in 0..6 {
        assert_eq!(rows[&p].2, Some(0), "lag of {p} after c4: {rows:?}");
    }
    eprintln!("phase 3: fresh member after restart processed exactly the 600 new records");
}

fn kcat_group(bootstrap: &str, group: &str, topic: &str) -> Vec<(i32, i64, String)> {
    let out = Command::new("kcat")
        .args([
            "-b",
            bootstrap,
            "-G",
            group,
            "-e",
            "-q",
            "-f",
            "%p:%o:%s\\n",
        ])
        .args([
            "-X",
            "broker.address.family=v4",
            "-X",
            "auto.offset.reset=earliest",
        ])
        .args([
            "-X",
            "session.timeout.ms=6000",
            "-X",
            "heartbeat.interval.ms=500",
        ])
        .arg(topic)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kcat -G failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut it = l.splitn(3, ':');
            (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn kcat_balanced_consumer_reads_all_and_commits() {
    require_kcat();
    let broker = Broker::with_config(GROUPS_CONFIG);
    let b = broker.bootstrap();
    let (topic, group) = ("kcat-grp", "kcat-group");
    qanat_ok(&[
        "topics",
        "create",
        topic,
        "--partitions",
        "3",
        "--bootstrap",
        &b,
    ]);
    let recs = keyed_records("k1", 500);
    let delivered = produce(&b, topic, &recs, &[]);
    let want = expected(&recs, &delivered);

    let got = kcat_group(&b, group, topic);
    let got_map: BTreeMap<(i32, i64), String> =
        got.iter().map(|(p, o, v)| ((*p, *o), v.clone())).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "kcat -G read {} records, produced {}",
        got.len(),
        want.len()
    );
    assert_eq!(
        got_map, want,
        "kcat -G records differ from the produced ones"
    );

    let ends: BTreeMap<i32, i64> = (0..3)
        .map(|p| (p, support::watermarks(&b, topic, p).1))
        .collect();
    let (state, members, rows) = describe(&b, group, topic);
    assert_eq!(members, 0, "kcat left the group: {state} {rows:?}");
    for p in 0..3 {
        assert_eq!(
            rows[&p].0,
            Some(ends[&p]),
            "committed offset of {p}: {rows:?}"
        );
        assert_eq!(rows[&p].2, Some(0), "lag of {p}: {rows:?}");
    }

    // A second run in the same group starts at the committed offsets: only the new records.
    let recs2 = keyed_records("k2", 120);
    let delivered2 = produce(&b, topic, &recs2, &[]);
    let want2 = expected(&recs2, &delivered2);
    let got2: BTreeMap<(i32, i64), String> = kcat_group(&b, group, topic)
        .into_iter()
        .map(|(p, o, v)| ((p, o), v))
        .collect();
    assert_eq!(
        got2, want2,
        "second kcat -G run must read exactly the new records"
    );
}
