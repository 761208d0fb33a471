//! F3 drift correction: the cases of the rule, and a property test against a plain
//! reference implementation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use proptest::prelude::*;
use qanat_lake::drift::DriftConfig;
use qanat_lake::layout::TableLayout;
use qanat_lake::merge::{merge, BaseChoice, MergeOptions};
use support::*;

const PREV: &str = "20261128";
const DAY: &str = "20261129";
const NEXT: &str = "20261130";
const MIN: i64 = 60_000;

fn layout(root: &Path) -> TableLayout {
    TableLayout::new(root, "shop.orders".parse().unwrap())
}

fn drift_options(root: &Path, proc_time: bool) -> MergeOptions {
    let mut opts = MergeOptions::new(root, "shop.orders".parse().unwrap(), DAY.parse().unwrap());
    opts.base = BaseChoice::Initial;
    opts.drift = Some(DriftConfig {
        proc_time: proc_time.then(|| "proc_time".to_owned()),
        ..DriftConfig::default()
    });
    opts
}

/// Changes numbered in log order within partition 0 (the bus order follows the log).
fn numbered(mut changes: Vec<Ch>) -> Vec<Ch> {
    changes.sort_by_key(|c| c.log_time);
    for (i, c) in changes.iter_mut().enumerate() {
        c.offset = i as i64;
        c.partition = 0;
    }
    changes
}

fn c(id: i64, op: &'static str, value: &str, log_time: i64, modified_time: i64) -> Ch {
    Ch {
        id,
        op,
        value: value.into(),
        log_time,
        modified_time: Some(modified_time),
        proc_time: None,
        partition: 0,
        offset: 0,
    }
}

fn f3_log() -> Vec<Ch> {
    let late = at(DAY, 23, 59, 59);
    vec![
        // 1: updated just before midnight, logged just after: drifts back into the day.
        c(1, "c", "a", at(DAY, 10, 0, 0), at(DAY, 10, 0, 0)),
        c(1, "u", "drifted", at(NEXT, 0, 0, 3), at(DAY, 23, 59, 58)),
        // 2: logged in the previous day's last minutes, modified in the day (clock skew).
        c(2, "c", "skew", at(PREV, 23, 50, 0), at(DAY, 0, 0, 1)),
        // 3: logged in the day but modified the day before: not the day's.
        c(3, "u", "stale", at(DAY, 10, 0, 0), at(PREV, 23, 0, 0)),
        // 4: the next day's own change.
        c(4, "c", "tomorrow", at(NEXT, 0, 5, 0), at(NEXT, 0, 4, 0)),
        // 5: two drifted changes: the earliest counts.
        c(5, "u", "first", at(NEXT, 0, 0, 2), late),
        c(5, "u", "second", at(NEXT, 0, 0, 5), late),
        // 6: beyond the overlap.
        c(6, "u", "too late", at(NEXT, 0, 20, 0), late),
        // 7: the previous day's change in its overlap: not the day's.
        c(
            7,
            "c",
            "yesterday",
            at(PREV, 23, 55, 0),
            at(PREV, 23, 55, 0),
        ),
        // 8: deleted in the day.
        c(8, "c", "v8", at(DAY, 11, 0, 0), at(DAY, 11, 0, 0)),
        c(8, "d", "v8", at(DAY, 12, 0, 0), at(DAY, 11, 0, 0)),
        // 9: deleted after midnight: not the day's delete.
        c(9, "c", "v9", at(DAY, 11, 0, 0), at(DAY, 11, 0, 0)),
        c(9, "d", "v9", at(NEXT, 0, 0, 2), at(DAY, 11, 0, 0)),
    ]
}

#[test]
fn f3_drifted_changes_return_to_their_day() {
    let root = tempfile::tempdir().unwrap();
    land(&layout(root.path()), &numbered(f3_log()));
    let report = merge(&drift_options(root.path(), false)).unwrap();
    let got: Vec<(i64, String, bool)> = rows(&report.partition)
        .into_iter()
        .map(|(id, v, _, deleted)| (id, v.unwrap(), deleted))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "drifted".into(), false),
            (2, "skew".into(), false),
            (5, "first".into(), false),
            (8, "v8".into(), true),
            (9, "v9".into(), false),
        ]
    );
    // Without the correction the day is cut on log time alone.
    let mut plain = drift_options(root.path(), false);
    plain.drift = None;
    let ids: Vec<i64> = rows(&merge(&plain).unwrap().partition)
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(ids, vec![1, 3, 8, 9]);
}

#[test]
fn f3_tail_changes_need_every_business_time_in_the_day() {
    let root = tempfile::tempdir().unwrap();
    let late = at(DAY, 23, 59, 59);
    let mut early = c(10, "u", "p1", at(NEXT, 0, 0, 2), late);
    early.proc_time = Some(at(NEXT, 0, 0, 1));
    let mut later = c(10, "u", "p2", at(NEXT, 0, 0, 4), late);
    later.proc_time = Some(late);
    land(&layout(root.path()), &numbered(vec![early, later]));
    let value = |proc| {
        rows(&merge(&drift_options(root.path(), proc)).unwrap().partition)[0]
            .1
            .clone()
    };
    assert_eq!(value(false).as_deref(), Some("p1"));
    assert_eq!(value(true).as_deref(), Some("p2"));
}

#[test]
fn drift_needs_the_next_day_landed() {
    let root = tempfile::tempdir().unwrap();
    land(
        &layout(root.path()),
        &[c(1, "c", "a", at(DAY, 10, 0, 0), at(DAY, 10, 0, 0))],
    );
    let err = merge(&drift_options(root.path(), false)).unwrap_err();
    assert!(err.to_string().contains("ds=20261130"), "{err}");
    let mut missing = drift_options(root.path(), false);
    missing.drift.as_mut().unwrap().modified_time = "updated_at".into();
    fs::create_dir_all(
        layout(root.path())
            .changes_partition(NEXT.parse().unwrap(), None)
            .unwrap(),
    )
    .unwrap();
    let err = merge(&missing).unwrap_err();
    assert!(
        err.to_string()
            .contains("drift column `updated_at` is missing"),
        "{err}"
    );
}

// ---- against a reference ----

/// The rule of F3 over plain vectors (keep mode).
fn reference(changes: &[Ch], proc: bool) -> BTreeMap<i64, (String, bool)> {
    let start = at(DAY, 0, 0, 0);
    let end = at(NEXT, 0, 0, 0);
    let w = 15 * MIN;
    let in_day = |t: i64| start <= t && t < end;
    let mut day: BTreeMap<i64, Vec<&Ch>> = BTreeMap::new();
    let mut tail: BTreeMap<i64, Vec<&Ch>> = BTreeMap::new();
    for ch in changes {
        let delete = ch.op == "d";
        let modified = ch.modified_time.unwrap_or(ch.log_time);
        if ch.log_time >= start - w && ch.log_time < end {
            let kept = if delete {
                in_day(ch.log_time)
            } else {
                in_day(modified)
            };
            if kept {
                day.entry(ch.id).or_default().push(ch);
            }
        } else if ch.log_time >= end && ch.log_time < end + w && !delete && in_day(modified) {
            let proc_ok = !proc || ch.proc_time.is_some_and(in_day);
            if proc_ok {
                tail.entry(ch.id).or_default().push(ch);
            }
        }
    }
    let mut out = BTreeMap::new();
    for (id, list) in &day {
        let last = list.iter().max_by_key(|c| (c.partition, c.offset)).unwrap();
        out.insert(*id, (last.value.clone(), last.op == "d"));
    }
    for (id, list) in &tail {
        let first = list.iter().min_by_key(|c| (c.partition, c.offset)).unwrap();
        out.insert(*id, (first.value.clone(), false));
    }
    out
}

fn around_midnight() -> impl Strategy<Value = i64> {
    // Minutes relative to the day's start, bunched at the edges of the window.
    prop::sample::select(vec![
        -40, -16, -15, -14, -1, 0, 1, 600, 1_425, 1_439, 1_440, 1_441, 1_454, 1_455, 1_456, 1_500,
    ])
    .prop_flat_map(|m| (Just(m), 0i64..60))
    .prop_map(|(m, s)| at(DAY, 0, 0, 0) + m * MIN + s * 1000)
}

fn change() -> impl Strategy<Value = Ch> {
    (
        0i64..6,
        prop::sample::select(vec!["c", "u", "d"]),
        "[a-z]{1,2}",
        around_midnight(),
        prop::sample::select(vec![0i64, 1, 5, 20, 30]),
        prop::option::of(around_midnight()),
    )
        .prop_map(|(id, op, value, log_time, lag, proc_time)| Ch {
            id,
            op,
            value,
            log_time,
            modified_time: Some(log_time - lag * MIN),
            proc_time,
            partition: (id % 2) as i32,
            offset: 0,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn drift_matches_the_reference(mut changes in prop::collection::vec(change(), 1..40), proc in any::<bool>()) {
        changes.sort_by_key(|c| c.log_time);
        for (i, ch) in changes.iter_mut().enumerate() {
            ch.offset = i as i64;
        }
        let root = tempfile::tempdir().unwrap();
        let l = layout(root.path());
        land(&l, &changes);
        for ds in [DAY, NEXT] {
            fs::create_dir_all(l.changes_partition(ds.parse().unwrap(), None).unwrap()).unwrap();
        }
        let mut opts = drift_options(root.path(), proc);
        opts.primary_key = Some(vec!["id".into()]);
        let report = merge(&opts).unwrap();
        let got: BTreeMap<i64, (String, bool)> = rows(&report.partition)
            .into_iter()
            .map(|(id, v, _, deleted)| (id, (v.unwrap(), deleted)))
            .collect();
        prop_assert_eq!(got, reference(&changes, proc));
    }
}
