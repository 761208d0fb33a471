//! `qanat lake merge` and `qanat lake ls` as a user runs them: a change log written by
//! pyarrow, two daily merges through the binary, the partitions read back by pyarrow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .args(["-c", script])
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes one change-log file of `shop.orders` for day `ds`: (id, value, op) at offsets
/// `first..`.
fn land(root: &Path, ds: &str, first: i64, changes: &str) {
    let script = r#"
import json, os, sys, datetime
import pyarrow as pa, pyarrow.parquet as pq
root, ds, first, changes = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
day = datetime.datetime.strptime(ds, "%Y%m%d").replace(tzinfo=datetime.timezone.utc)
n = len(changes)
t = [day + datetime.timedelta(minutes=i) for i in range(n)]
ts = pa.timestamp("ms", tz="UTC")
table = pa.table({
    "id": pa.array([c[0] for c in changes], pa.int64()),
    "value": [c[1] for c in changes],
    "_op": [c[2] for c in changes],
    "_log_pos": [f"bin.000001:{first + i}" for i in range(n)],
    "_log_time": pa.array(t, ts), "_commit_ts": pa.array(t, ts), "_extract_time": pa.array(t, ts),
    "_topic": ["cdc.shop.orders"] * n,
    "_partition": pa.array([0] * n, pa.int32()),
    "_offset": pa.array(range(first, first + n), pa.int64()),
}).replace_schema_metadata({"qanat.primary_key": "id"})
d = f"{root}/shop/orders_changes/ds={ds}"
os.makedirs(d, exist_ok=True)
pq.write_table(table, f"{d}/part-cdc.shop.orders-0-{first:020}-{first + n - 1:020}.parquet")
"#;
    python(
        script,
        &[root.to_str().unwrap(), ds, &first.to_string(), changes],
    );
}

fn qanat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qanat"))
        .args(args)
        .output()
        .expect("run qanat")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (id, value, _deleted) sorted by id, as pyarrow reads the partition.
fn read_back(dir: &Path) -> Value {
    let script = r#"
import json, sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1]).sort_by("id")
print(json.dumps([[r["id"], r["value"], r["_deleted"]] for r in t.to_pylist()]))
"#;
    serde_json::from_str(&python(script, &[dir.to_str().unwrap()])).unwrap()
}

#[test]
fn merge_two_days_and_list_them() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    land(
        root.path(),
        "20261128",
        0,
        r#"[[1,"a","r"],[2,"b","r"],[3,"c","r"]]"#,
    );
    land(
        root.path(),
        "20261129",
        3,
        r#"[[1,"a","d"],[2,"B","u"],[4,"d","c"]]"#,
    );

    let out = ok(qanat(&[
        "lake",
        "merge",
        "--root",
        r,
        "--table",
        "shop.orders",
        "--ds",
        "20261128",
        "--initial",
    ]));
    assert!(out.contains("3 rows"), "{out}");
    ok(qanat(&[
        "lake",
        "merge",
        "--root",
        r,
        "--table",
        "shop.orders",
        "--ds",
        "20261129",
        "--keep",
        "1",
    ]));
    let day = root.path().join("shop/orders/ds=20261129");
    assert_eq!(
        read_back(&day),
        serde_json::json!([
            [1, "a", true],
            [2, "B", false],
            [3, "c", false],
            [4, "d", false]
        ])
    );
    assert!(!root.path().join("shop/orders/ds=20261128").exists());

    // A missing base is refused, naming it, and the partition stays as it was.
    let nothing = root.path().join("nothing").display().to_string();
    let out = qanat(&[
        "lake",
        "merge",
        "--root",
        r,
        "--table",
        "shop.orders",
        "--ds",
        "20261129",
        "--base",
        &nothing,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing does not exist"), "{err}");
    assert_eq!(read_back(&day).as_array().unwrap().len(), 4);

    let listing: Value =
        serde_json::from_str(&ok(qanat(&["lake", "ls", "--root", r, "--json"]))).unwrap();
    let table = &listing[0];
    assert_eq!(table["table"], "shop.orders");
    let parts = table["partitions"].as_array().unwrap();
    let summary: Vec<(String, String, u64)> = parts
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_owned(),
                p["ds"].as_str().unwrap().to_owned(),
                p["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("snapshot".into(), "20261129".into(), 4),
            ("changes".into(), "20261128".into(), 3),
            ("changes".into(), "20261129".into(), 3),
        ]
    );
    assert_eq!(parts[0]["sources"][0]["last_offset"], 5);
    assert_eq!(parts[2]["sources"][0]["first_offset"], 3);
    let text = ok(qanat(&[
        "lake",
        "ls",
        "--root",
        r,
        "--table",
        "shop.orders",
    ]));
    assert!(text.contains("cdc.shop.orders:0@3..5"), "{text}");
}

#[test]
fn a_missing_partition_fails_with_its_path() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path().to_str().unwrap();
    land(root.path(), "20261129", 0, r#"[[1,"a","c"]]"#);
    let out = qanat(&[
        "lake",
        "merge",
        "--root",
        r,
        "--table",
        "shop.orders",
        "--ds",
        "20261129",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shop/orders/ds=20261128 does not exist"),
        "{err}"
    );
    assert!(err.contains("--initial"), "{err}");
}
