//! Push subscriptions (A6): `GET /v1/topics/{topic}/events` on the real `qanat`
//! binary, read by a plain HTTP/1.1 client as Server-Sent Events.
//!
//! Records with explicit timestamps and headers (some matching, some not) are produced before
//! and during the subscription; each subscription must deliver exactly the matching records
//! from its start (a time, or the end), each once, with its partition, offset, timestamp, key,
//! value and headers, and nothing else before a final matching sentinel per partition. Bad
//! filters get 400 with the error position; unknown topics 404.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod group_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use group_support::{SseEvent, SseStream};
use serde_json::Value;
use support::{http_get, percent_encode, produce, qanat_ok, Broker, Rec, DEADLINE};

const BASE_TS: i64 = 1_700_000_000_000;
/// Subscriptions start at this time: records before it are "old".
const T: i64 = BASE_TS + 100_000;
const TOPIC: &str = "clicks";

const F1: &str = "app = 'shop' AND event IN ('pv','click')";
const F2: &str = "(app = 'shop' OR app = 'mall') AND event NOT IN ('buy') AND event IS NOT NULL \
                  AND debug IS NULL AND app != 'x'";

fn header<'a>(r: &'a Rec, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
        .map(|v| std::str::from_utf8(v).unwrap())
}

/// Reference semantics of F1 and F2 (the documented grammar: a missing header equals nothing).
fn matches_f1(r: &Rec) -> bool {
    header(r, "app") == Some("shop") && matches!(header(r, "event"), Some("pv" | "click"))
}

fn matches_f2(r: &Rec) -> bool {
    let present = |n: &str| r.headers.iter().any(|(h, _)| h == n);
    matches!(header(r, "app"), Some("shop" | "mall"))
        && header(r, "event") != Some("buy")
        && present("event")
        && !present("debug")
        && header(r, "app") != Some("x")
}

/// Record `i` of a phase: one of eight header shapes, partition `i % 2`.
fn rec(phase: &str, i: usize, ts: i64) -> Rec {
    let r = Rec::value(format!("{phase}-{i}"))
        .key(format!("k{i}"))
        .timestamp(ts)
        .partition((i % 2) as i32);
    match i % 8 {
        0 => r.header("app", Some(b"shop")).header("event", Some(b"pv")),
        1 => r
            .header("app", Some(b"shop"))
            .header("event", Some(b"click")),
        2 => r.header("app", Some(b"shop")).header("event", Some(b"buy")),
        3 => r.header("app", Some(b"mall")).header("event", Some(b"pv")),
        4 => r.header("event", Some(b"pv")),
        5 => r
            .header("app", Some(b"shop"))
            .header("event", Some(b"pv"))
            .header("debug", Some(b"1")),
        6 => r.header("app", Some(b"shop")),
        _ => r
            .header("app", Some(b"SHOP"))
            .header("event", Some(b"click")),
    }
}

/// Records of one produce call and where they landed.
type Phase<'a> = (&'a [Rec], &'a [(i32, i64)]);

struct Sub {
    name: &'static str,
    stream: SseStream,
    filter: fn(&Rec) -> bool,
    /// Partitions subscribed to.
    partitions: Vec<i32>,
    /// Records (by (partition, offset)) that this subscription must deliver.
    want: BTreeMap<(i32, i64), Rec>,
}

fn open(b: &Broker, name: &'static str, query: &str) -> SseStream {
    let http = b.http_addr().expect("HTTP listener");
    let s = SseStream::open(&http, &format!("/v1/topics/{TOPIC}/events?{query}"));
    assert_eq!(s.status, 200, "{name}: subscribe status");
    assert!(
        s.headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{name}: content type {:?}",
        s.headers.get("content-type")
    );
    s
}

fn check_event(name: &str, ev: &SseEvent, want: &Rec) -> (i32, i64) {
    assert_eq!(ev.event, "record", "{name}: event type");
    let d: Value =
        serde_json::from_str(&ev.data).unwrap_or_else(|e| panic!("{name}: data {e}: {}", ev.data));
    let (p, o) = (
        d["partition"].as_i64().unwrap() as i32,
        d["offset"].as_i64().unwrap(),
    );
    assert_eq!(ev.id, format!("{p}:{o}"), "{name}: id");
    let s = |v: &Option<Vec<u8>>| v.as_deref().map(|b| String::from_utf8(b.to_vec()).unwrap());
    assert_eq!(
        d["value"].as_str().map(str::to_string),
        s(&want.value),
        "{name} {p}:{o} value"
    );
    assert_eq!(
        d["key"].as_str().map(str::to_string),
        s(&want.key),
        "{name} {p}:{o} key"
    );
    assert_eq!(
        d["timestamp"].as_i64(),
        want.timestamp,
        "{name} {p}:{o} timestamp"
    );
    let headers: BTreeMap<String, Option<String>> = want
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), s(v)))
        .collect();
    let got: BTreeMap<String, Option<String>> = d["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string)))
        .collect();
    assert_eq!(got, headers, "{name} {p}:{o} headers");
    (p, o)
}

#[test]
fn push_subscription_delivers_exactly_the_matching_records() {
    let b = Broker::builder().http().start();
    let bs = b.bootstrap();
    let http = b.http_addr().expect("HTTP listener");
    qanat_ok(&[
        "topics",
        "create",
        TOPIC,
        "--partitions",
        "2",
        "--bootstrap",
        &bs,
    ]);

    // Before T (never delivered from time:T), then from T on.
    let old: Vec<Rec> = (0..40).map(|i| rec("old", i, BASE_TS + i as i64)).collect();
    let new: Vec<Rec> = (0..200).map(|i| rec("new", i, T + i as i64)).collect();
    let d_old = produce(&bs, TOPIC, &old, &[]);
    let d_new = produce(&bs, TOPIC, &new, &[]);
    assert!(
        d_old.iter().all(|d| d.1 < 20),
        "old records first in each partition"
    );

    let mut subs = [
        Sub {
            name: "F1 from time:T",
            stream: open(
                &b,
                "F1",
                &format!("from=time:{T}&filter={}", percent_encode(F1)),
            ),
            filter: matches_f1,
            partitions: vec![0, 1],
            want: BTreeMap::new(),
        },
        Sub {
            name: "F2 from time:T",
            stream: open(
                &b,
                "F2",
                &format!("from=time:{T}&filter={}", percent_encode(F2)),
            ),
            filter: matches_f2,
            partitions: vec![0, 1],
            want: BTreeMap::new(),
        },
        Sub {
            name: "F1 from end, partition 0",
            stream: open(
                &b,
                "F1 end",
                &format!("from=end&partitions=0&filter={}", percent_encode(F1)),
            ),
            filter: matches_f1,
            partitions: vec![0],
            want: BTreeMap::new(),
        },
    ];

    // Records that arrive while the subscriptions are open, then a matching sentinel per
    // partition, produced last.
    let live: Vec<Rec> = (0..40)
        .map(|i| rec("live", i, T + 1000 + i as i64))
        .collect();
    let d_live = produce(&bs, TOPIC, &live, &[]);
    let sentinels: Vec<Rec> = (0..2)
        .map(|p| {
            Rec::value(format!("sentinel-{p}"))
                .key("s")
                .timestamp(T + 5000)
                .partition(p)
                .header("app", Some(b"shop"))
                .header("event", Some(b"pv"))
        })
        .collect();
    let d_sent = produce(&bs, TOPIC, &sentinels, &[]);
    let sentinel_at: BTreeSet<(i32, i64)> = d_sent.iter().copied().collect();

    for sub in subs.iter_mut() {
        let from_time = sub.name.contains("time:T");
        let phases: Vec<Phase<'_>> = if from_time {
            vec![(&new, &d_new), (&live, &d_live), (&sentinels, &d_sent)]
        } else {
            vec![(&live, &d_live), (&sentinels, &d_sent)]
        };
        for (recs, delivered) in phases {
            for (r, d) in recs.iter().zip(delivered) {
                if sub.partitions.contains(&d.0) && (sub.filter)(r) {
                    sub.want.insert(*d, r.clone());
                }
            }
        }
    }

    for sub in subs.iter_mut() {
        let deadline = Instant::now() + DEADLINE;
        let mut got: Vec<(i32, i64)> = Vec::new();
        let mut sentinels_left: BTreeSet<(i32, i64)> = sentinel_at
            .iter()
            .filter(|d| sub.partitions.contains(&d.0))
            .copied()
            .collect();
        while !sentinels_left.is_empty() {
            let Some(ev) = sub.stream.next_event(deadline) else {
                panic!(
                    "{}: stream ended or timed out after {} events, sentinels {sentinels_left:?} \
                     missing; got {got:?}",
                    sub.name,
                    got.len()
                );
            };
            let d: Value = serde_json::from_str(&ev.data).unwrap();
            let key = (
                d["partition"].as_i64().unwrap() as i32,
                d["offset"].as_i64().unwrap(),
            );
            let Some(want) = sub.want.get(&key) else {
                panic!("{}: unexpected record {key:?}: {}", sub.name, ev.data);
            };
            check_event(sub.name, &ev, want);
            got.push(key);
            sentinels_left.remove(&key);
        }
        let set: BTreeSet<(i32, i64)> = got.iter().copied().collect();
        assert_eq!(
            set.len(),
            got.len(),
            "{}: a record was delivered twice: {got:?}",
            sub.name
        );
        let want: BTreeSet<(i32, i64)> = sub.want.keys().copied().collect();
        assert_eq!(set, want, "{}: delivered set differs", sub.name);
        for p in &sub.partitions {
            let offsets: Vec<i64> = got.iter().filter(|k| k.0 == *p).map(|k| k.1).collect();
            assert!(
                offsets.windows(2).all(|w| w[0] < w[1]),
                "{}: partition {p} out of order",
                sub.name
            );
        }
        eprintln!(
            "{}: {} matching records, exactly as expected",
            sub.name,
            got.len()
        );
    }

    // Errors.
    for (filter, position) in [
        ("app = shop", 7),
        ("app = 'shop' AND", 17),
        ("app == 'x'", 6),
    ] {
        let (status, body) = http_get(
            &http,
            &format!(
                "/v1/topics/{TOPIC}/events?filter={}",
                percent_encode(filter)
            ),
        );
        assert_eq!(status, 400, "filter {filter:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["position"], position, "position for {filter:?}: {body}");
        assert!(
            v["error"].is_string(),
            "error message for {filter:?}: {body}"
        );
    }
    let (status, body) = http_get(&http, "/v1/topics/no-such-topic/events?from=earliest");
    assert_eq!(status, 404, "unknown topic: {body}");
    let (status, body) = http_get(&http, &format!("/v1/topics/{TOPIC}/events?from=yesterday"));
    assert_eq!(status, 400, "bad from: {body}");
}
