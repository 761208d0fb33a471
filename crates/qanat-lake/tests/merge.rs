//! F1 delta and F2 full merge: the SYSTEM example, a model-based property test, re-runs and
//! bad inputs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use proptest::prelude::*;
use qanat_lake::layout::{change_file_name, TableLayout};
use qanat_lake::manifest::Manifest;
use qanat_lake::merge::{merge, BaseChoice, DeleteMode, MergeOptions};
use qanat_lake::LakeError;
use support::*;

const DAY: &str = "20261129";
const NEXT: &str = "20261130";

fn layout(root: &Path) -> TableLayout {
    TableLayout::new(root, "shop.orders".parse().unwrap())
}

fn options(root: &Path, ds: &str, mode: DeleteMode, base: BaseChoice) -> MergeOptions {
    let mut opts = MergeOptions::new(root, "shop.orders".parse().unwrap(), ds.parse().unwrap());
    opts.delete_mode = mode;
    opts.base = base;
    opts
}

fn ch(offset: i64, id: i64, op: &'static str, value: &str, hh: u32, mm: u32) -> Ch {
    Ch {
        id,
        op,
        value: value.into(),
        log_time: at(DAY, hh, mm, 0),
        modified_time: Some(at(DAY, hh, mm, 0)),
        proc_time: None,
        partition: 0,
        offset,
    }
}

/// The F1 change log of SYSTEM.md.
fn f1_log() -> Vec<Ch> {
    vec![
        ch(1, 1, "c", "a", 8, 0),
        ch(2, 2, "c", "x", 8, 5),
        ch(3, 1, "u", "b", 9, 0),
        ch(4, 3, "c", "p", 9, 10),
        ch(5, 1, "d", "b", 10, 0),
        ch(6, 3, "d", "p", 10, 30),
        ch(7, 2, "u", "y", 11, 0),
        ch(8, 3, "c", "q", 12, 0),
    ]
}

fn row(
    id: i64,
    value: &str,
    op: &str,
    deleted: bool,
) -> (i64, Option<String>, Option<String>, bool) {
    (id, Some(value.into()), Some(op.into()), deleted)
}

#[test]
fn f1_example_in_each_delete_mode() {
    let cases = [
        (
            DeleteMode::Keep,
            vec![
                row(1, "b", "d", true),
                row(2, "y", "u", false),
                row(3, "q", "c", false),
            ],
        ),
        (
            DeleteMode::DropFinal,
            vec![
                row(1, "b", "u", false),
                row(2, "y", "u", false),
                row(3, "q", "c", false),
            ],
        ),
        (
            DeleteMode::DropAll,
            vec![row(2, "y", "u", false), row(3, "q", "c", false)],
        ),
    ];
    for (mode, expected) in cases {
        let root = tempfile::tempdir().unwrap();
        land(&layout(root.path()), &f1_log());
        let report = merge(&options(root.path(), DAY, mode, BaseChoice::Initial)).unwrap();
        assert_eq!(rows(&report.partition), expected, "mode {mode}");
        let manifest = Manifest::read(&report.partition).unwrap().unwrap();
        assert_eq!(manifest.rows, expected.len() as u64);
        assert_eq!(
            manifest.delete_mode.as_deref(),
            Some(mode.to_string().as_str())
        );
        assert_eq!(manifest.sources.len(), 1);
        assert_eq!(
            (
                manifest.sources[0].first_offset,
                manifest.sources[0].last_offset
            ),
            (1, 8)
        );
    }
}

/// Day one: keys 1..=4. Day two: 1 deleted, 2 updated, 5 inserted, 3 deleted and re-inserted.
fn two_days(root: &Path) {
    let l = layout(root);
    let day1: Vec<Ch> = (1..=4)
        .map(|id| ch(id, id, "r", &format!("v{id}"), 1, 0))
        .collect();
    land(&l, &day1);
    let next = |offset, id, op, value: &str| Ch {
        log_time: at(NEXT, 6, offset as u32, 0),
        modified_time: Some(at(NEXT, 6, offset as u32, 0)),
        ..ch(offset, id, op, value, 0, 0)
    };
    land(
        &l,
        &[
            next(10, 1, "d", "v1"),
            next(11, 2, "u", "w2"),
            next(12, 5, "c", "n5"),
            next(13, 3, "d", "v3"),
            next(14, 3, "c", "n3"),
        ],
    );
}

#[test]
fn full_merge_carries_yesterday_forward_with_each_delete_mode() {
    let cases = [
        (
            DeleteMode::Keep,
            vec![
                row(1, "v1", "d", true),
                row(2, "w2", "u", false),
                row(3, "n3", "c", false),
                row(4, "v4", "r", false),
                row(5, "n5", "c", false),
            ],
        ),
        (
            DeleteMode::DropFinal,
            vec![
                row(1, "v1", "r", false),
                row(2, "w2", "u", false),
                row(3, "n3", "c", false),
                row(4, "v4", "r", false),
                row(5, "n5", "c", false),
            ],
        ),
        (
            DeleteMode::DropAll,
            vec![
                row(2, "w2", "u", false),
                row(3, "n3", "c", false),
                row(4, "v4", "r", false),
                row(5, "n5", "c", false),
            ],
        ),
    ];
    for (mode, expected) in cases {
        let root = tempfile::tempdir().unwrap();
        two_days(root.path());
        merge(&options(root.path(), DAY, mode, BaseChoice::Initial)).unwrap();
        let report = merge(&options(root.path(), NEXT, mode, BaseChoice::Previous)).unwrap();
        assert_eq!(report.base.as_deref(), Some(DAY));
        assert_eq!(rows(&report.partition), expected, "mode {mode}");
    }
}

#[test]
fn a_rerun_gives_byte_identical_files_and_keep_prunes_old_days() {
    let root = tempfile::tempdir().unwrap();
    two_days(root.path());
    merge(&options(
        root.path(),
        DAY,
        DeleteMode::Keep,
        BaseChoice::Initial,
    ))
    .unwrap();
    let first = merge(&options(
        root.path(),
        NEXT,
        DeleteMode::Keep,
        BaseChoice::Previous,
    ))
    .unwrap();
    let files = |dir: &Path| Manifest::read(dir).unwrap().unwrap().files;
    let before = files(&first.partition);
    let mut again = options(root.path(), NEXT, DeleteMode::Keep, BaseChoice::Previous);
    again.keep = Some(1);
    let second = merge(&again).unwrap();
    assert_eq!(files(&second.partition), before);
    assert_eq!(second.removed_partitions, vec![DAY.to_owned()]);
    assert!(!layout(root.path())
        .snapshot_partition(DAY.parse().unwrap())
        .exists());
    // Nothing of the staging is left beside the partitions.
    let names: Vec<String> = fs::read_dir(layout(root.path()).snapshot_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("ds={NEXT}")]);
}

#[test]
fn a_plain_extract_is_a_base_and_new_columns_are_null_on_old_rows() {
    let root = tempfile::tempdir().unwrap();
    let extract = root.path().join("extract/ds=20261128/part-0.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("value", DataType::Utf8, true),
        Field::new("legacy", DataType::Int64, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![1, 2])),
        Arc::new(StringArray::from(vec!["e1", "e2"])),
        Arc::new(Int64Array::from(vec![7, 8])),
    ];
    write_parquet(&extract, &RecordBatch::try_new(schema, columns).unwrap());
    land(&layout(root.path()), &[ch(1, 2, "u", "c2", 9, 0)]);
    let report = merge(&options(
        root.path(),
        DAY,
        DeleteMode::Keep,
        BaseChoice::Path(extract.parent().unwrap().to_owned()),
    ))
    .unwrap();
    assert_eq!(
        rows(&report.partition),
        vec![
            (1, Some("e1".into()), None, false),
            row(2, "c2", "u", false)
        ]
    );
    let batch = &qanat_lake::merge::read_partition(&report.partition).unwrap()[0];
    let names: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "id",
            "value",
            "legacy",
            "modified_time",
            "proc_time",
            "_op",
            "_deleted",
            "_log_time",
            "_log_pos",
            "_partition",
            "_offset"
        ]
    );
}

fn expect_error(opts: &MergeOptions, needle: &str) -> LakeError {
    let err = merge(opts).unwrap_err();
    assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
    err
}

#[test]
fn bad_inputs_fail_precisely_and_leave_the_partition_untouched() {
    let root = tempfile::tempdir().unwrap();
    let l = layout(root.path());
    two_days(root.path());
    merge(&options(
        root.path(),
        DAY,
        DeleteMode::Keep,
        BaseChoice::Initial,
    ))
    .unwrap();
    let good = options(root.path(), NEXT, DeleteMode::Keep, BaseChoice::Previous);
    let target = merge(&good).unwrap().partition;
    let untouched = snapshot_of(&target);

    // A missing base or change-log partition.
    expect_error(
        &options(
            root.path(),
            "20261201",
            DeleteMode::Keep,
            BaseChoice::Previous,
        ),
        "shop/orders_changes/ds=20261201",
    );
    expect_error(
        &options(
            root.path(),
            NEXT,
            DeleteMode::Keep,
            BaseChoice::Day("20261101".parse().unwrap()),
        ),
        "shop/orders/ds=20261101 does not exist",
    );

    // A column whose type changed between the snapshot and the day's changes.
    let next_dir = l.changes_partition(NEXT.parse().unwrap(), None).unwrap();
    let conflicting = next_dir.join(change_file_name(TOPIC, 1, 100, 100));
    let mut batch = change_batch(&[ch(100, 9, "c", "z", 7, 0)], true);
    let schema = Schema::new(
        batch
            .schema()
            .fields()
            .iter()
            .map(|f| {
                if f.name() == "value" {
                    Field::new("value", DataType::Int64, true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect::<Vec<_>>(),
    )
    .with_metadata(batch.schema().metadata().clone());
    let mut columns = batch.columns().to_vec();
    columns[1] = Arc::new(Int64Array::from(vec![1]));
    batch = RecordBatch::try_new(Arc::new(schema), columns).unwrap();
    write_parquet(&conflicting, &batch);
    let err = expect_error(&good, "column `value` has type");
    assert!(
        err.to_string().contains(&conflicting.display().to_string()),
        "{err}"
    );
    assert_eq!(snapshot_of(&target), untouched);
    fs::remove_file(&conflicting).unwrap();

    // A corrupt Parquet file.
    let corrupt = next_dir.join(change_file_name(TOPIC, 2, 0, 0));
    fs::write(&corrupt, b"PAR1 this is not parquet").unwrap();
    expect_error(&good, &corrupt.display().to_string());
    assert_eq!(snapshot_of(&target), untouched);
    fs::remove_file(&corrupt).unwrap();

    // No primary key anywhere.
    let unkeyed = tempfile::tempdir().unwrap();
    let path = layout(unkeyed.path())
        .changes_partition(DAY.parse().unwrap(), None)
        .unwrap()
        .join(change_file_name(TOPIC, 0, 1, 1));
    write_parquet(&path, &change_batch(&[ch(1, 1, "c", "a", 1, 0)], false));
    let err = expect_error(
        &options(unkeyed.path(), DAY, DeleteMode::Keep, BaseChoice::Initial),
        "no primary key",
    );
    assert!(matches!(err, LakeError::MissingPrimaryKey { .. }));
    let mut keyed = options(unkeyed.path(), DAY, DeleteMode::Keep, BaseChoice::Initial);
    keyed.primary_key = Some(vec!["nope".into()]);
    expect_error(&keyed, "primary-key column `nope` is missing");

    // Nothing left over from the failures; the good partition is still there.
    assert_eq!(snapshot_of(&target), untouched);
    assert_eq!(merge(&good).unwrap().rows, 5);
}

// ---- F2 against a model ----

#[derive(Debug, Clone)]
struct Case {
    base: BTreeMap<i64, String>,
    changes: Vec<(i64, &'static str, String)>,
    mode: DeleteMode,
    small_memory: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::btree_map(0i64..40, "[a-z]{1,3}", 1..30),
        prop::collection::vec(
            (
                0i64..40,
                prop::sample::select(vec!["c", "u", "d"]),
                "[a-z]{1,3}",
            ),
            0..60,
        ),
        prop::sample::select(vec![
            DeleteMode::Keep,
            DeleteMode::DropFinal,
            DeleteMode::DropAll,
        ]),
        any::<bool>(),
    )
        .prop_map(|(base, changes, mode, small_memory)| Case {
            base,
            changes,
            mode,
            small_memory,
        })
}

/// Plain replay of the delete modes over a map.
fn model(case: &Case) -> BTreeMap<i64, (String, bool)> {
    let mut out: BTreeMap<i64, (String, bool)> = case
        .base
        .iter()
        .map(|(k, v)| (*k, (v.clone(), false)))
        .collect();
    let mut per_key: BTreeMap<i64, Vec<(&str, &String)>> = BTreeMap::new();
    for (id, op, value) in &case.changes {
        per_key.entry(*id).or_default().push((op, value));
    }
    for (id, seq) in per_key {
        let (last_op, last_value) = seq[seq.len() - 1];
        match case.mode {
            DeleteMode::Keep => {
                out.insert(id, (last_value.clone(), last_op == "d"));
            }
            DeleteMode::DropFinal => {
                if let Some((_, value)) = seq.iter().rev().find(|(op, _)| *op != "d") {
                    out.insert(id, ((*value).clone(), false));
                }
            }
            DeleteMode::DropAll => {
                if last_op == "d" {
                    out.remove(&id);
                } else {
                    out.insert(id, (last_value.clone(), false));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn merge_matches_the_model(case in case()) {
        let root = tempfile::tempdir().unwrap();
        let l = layout(root.path());
        let base: Vec<Ch> = case
            .base
            .iter()
            .enumerate()
            .map(|(i, (id, v))| Ch { partition: (*id % 3) as i32, ..ch(i as i64, *id, "r", v, 1, 0) })
            .collect();
        land(&l, &base);
        let mut opts = options(root.path(), DAY, DeleteMode::Keep, BaseChoice::Initial);
        opts.primary_key = Some(vec!["id".into()]);
        merge(&opts).unwrap();
        let changes: Vec<Ch> = case
            .changes
            .iter()
            .enumerate()
            .map(|(i, (id, op, v))| Ch {
                partition: (*id % 3) as i32,
                log_time: at(NEXT, 2, 0, i as u32),
                modified_time: Some(at(NEXT, 2, 0, i as u32)),
                ..ch(1000 + i as i64, *id, op, v, 1, 0)
            })
            .collect();
        fs::create_dir_all(l.changes_partition(NEXT.parse().unwrap(), None).unwrap()).unwrap();
        land(&l, &changes);
        let mut opts = options(root.path(), NEXT, case.mode, BaseChoice::Previous);
        opts.primary_key = Some(vec!["id".into()]);
        if case.small_memory {
            opts.memory_budget = 256;
        }
        let report = merge(&opts).unwrap();
        if case.small_memory && !changes.is_empty() {
            prop_assert!(report.buckets > 1);
        }
        let got: BTreeMap<i64, (String, bool)> = rows(&report.partition)
            .into_iter()
            .map(|(id, value, _, deleted)| (id, (value.unwrap(), deleted)))
            .collect();
        prop_assert_eq!(rows(&report.partition).len(), got.len(), "duplicate keys");
        prop_assert_eq!(got, model(&case));
    }
}
