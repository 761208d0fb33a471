//! Sharded sources (E5) end to end: one logical table over eight physical tables in two
//! MariaDB databases, copied into one PostgreSQL table, with and without a shard column.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use sync_support::{qanat_command, sync_fails, sync_json, MyDb, PgDb};

const SHARD_DDL: &str =
    "(id INT PRIMARY KEY, customer VARCHAR(40) NOT NULL, amount DECIMAL(10,2), note TEXT)";

/// Eight shards `order_0000` … `order_0007`, four in each database; shard k holds ids
/// 1..=100·(k+1), so ids repeat across shards.
fn make_shards(a: &MyDb, b: &MyDb) -> Vec<(String, u64)> {
    let mut expected = Vec::new();
    for k in 0..8u64 {
        let db = if k < 4 { a } else { b };
        let t = format!("order_{k:04}");
        db.sql(&format!("CREATE TABLE {t} {SHARD_DDL}"));
        db.sql(&format!(
            "INSERT INTO {t} SELECT seq, CONCAT('c', seq % 7, '-{k}'), seq * 1.25, \
             IF(seq % 10 = 0, NULL, CONCAT('n', seq)) FROM seq_1_to_{}",
            100 * (k + 1)
        ));
        expected.push((format!("{}.{t}", db.name), 100 * (k + 1)));
    }
    expected
}

#[test]
fn eight_shards_in_two_databases_arrive_as_one_table_with_their_shard_names() {
    let a = MyDb::new();
    let b = MyDb::new();
    let pg = PgDb::new();
    let expected = make_shards(&a, &b);
    pg.sql(
        "CREATE TABLE orders (id integer, customer varchar(40) NOT NULL, amount numeric(10,2), \
         note text, _shard text NOT NULL, PRIMARY KEY (_shard, id))",
    );
    let job = format!(
        "[sync]\nchannels = 3\nmax_splits = 32\n\n[[table]]\nfrom = [\"{}\", \"{}\"]\nto = \"{}\"\nshard_column = \"_shard\"\nmode = \"upsert\"\n",
        a.dsn("order_{0000..0003}"),
        b.dsn("order_{0004..0007}"),
        pg.dsn("orders")
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shards.toml");
    std::fs::write(&path, job).expect("write job");
    let summary = sync_json(&["run", &path.display().to_string(), "--verify"]);
    let t = &summary["tables"][0];
    let total: u64 = expected.iter().map(|(_, n)| n).sum();
    assert_eq!(t["rows_read"], total, "{summary}");
    assert_eq!(t["rows_written"], total, "{summary}");
    assert_eq!(t["verify"]["ok"], true, "{summary}");
    // max_splits 32 over 8 shards: key ranges within each shard.
    assert!(t["splits"].as_u64().unwrap_or(0) > 8, "{summary}");
    assert_eq!(t["verify"]["source_rows"], total, "{summary}");

    // The databases' names are random, so both sides are put in one order here rather than
    // by PostgreSQL's collation.
    let mut per_shard: Vec<String> = pg
        .sql("SELECT _shard, count(*), max(id) FROM orders GROUP BY _shard")
        .lines()
        .map(str::to_string)
        .collect();
    per_shard.sort();
    let mut want: Vec<String> = expected
        .iter()
        .map(|(name, n)| format!("{name}\t{n}\t{n}"))
        .collect();
    want.sort();
    assert_eq!(per_shard, want);
    // Values arrive whole, and each row in its shard.
    assert_eq!(
        pg.sql(&format!(
            "SELECT customer, amount, note IS NULL FROM orders WHERE _shard = '{}.order_0005' AND id = 70",
            b.name
        ))
        .trim(),
        "c0-5\t87.50\tt"
    );

    // Running it again in upsert mode changes nothing and still verifies.
    let again = sync_json(&["run", &path.display().to_string(), "--verify"]);
    assert_eq!(again["tables"][0]["verify"]["ok"], true, "{again}");
    assert_eq!(
        pg.sql("SELECT count(*) FROM orders").trim(),
        total.to_string()
    );
}

#[test]
fn shards_without_a_shard_column_verify_as_a_whole_and_a_changed_target_is_caught() {
    let a = MyDb::new();
    let b = MyDb::new();
    let pg = PgDb::new();
    // Disjoint ids this time, so the target can have `id` as its key.
    for k in 0..8u64 {
        let db = if k < 4 { &a } else { &b };
        db.sql(&format!(
            "CREATE TABLE t_{k} (id INT PRIMARY KEY, v VARCHAR(20))"
        ));
        db.sql(&format!(
            "INSERT INTO t_{k} SELECT seq + {}, CONCAT('v', seq) FROM seq_1_to_50",
            1000 * k
        ));
    }
    pg.sql("CREATE TABLE t (id integer PRIMARY KEY, v varchar(20))");
    let dir = tempfile::tempdir().expect("tempdir");
    let summary = sync_json(&[
        "run",
        &write_job(
            &dir,
            &format!(
                "[[table]]\nfrom = [\"{}\", \"{}\"]\nto = \"{}\"\n",
                a.dsn("t_{0..3}"),
                b.dsn("t_{4..7}"),
                pg.dsn("t")
            ),
        ),
        "--verify",
    ]);
    let t = &summary["tables"][0];
    assert_eq!(t["rows_written"], 400, "{summary}");
    // max_splits 32 over 8 shards: key ranges within each shard.
    assert_eq!(t["splits"], 32, "{summary}");
    assert_eq!(t["verify"]["ok"], true, "{summary}");
    assert_eq!(pg.sql("SELECT count(DISTINCT id) FROM t").trim(), "400");

    // A row changed in the target behind the sync's back: the whole-table check differs.
    pg.sql("TRUNCATE t");
    pg.sql("INSERT INTO t VALUES (999999, 'stray')");
    let out = qanat_command()
        .args([
            "sync",
            "copy",
            "--from",
            &a.dsn("t_{0..3}"),
            "--to",
            &pg.dsn("t"),
            "--verify",
            "--json",
        ])
        .output()
        .expect("qanat");
    assert!(!out.status.success());
    let summary = sync_support::parse_summary(&out);
    let v = &summary["tables"][0]["verify"];
    assert_eq!(v["ok"], false, "{summary}");
    assert_eq!(v["source_rows"], 200, "{summary}");
    assert_eq!(v["target_rows"], 201, "{summary}");
}

fn write_job(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("job.toml");
    std::fs::write(&path, text).expect("write job");
    path.display().to_string()
}

#[test]
fn a_shard_that_differs_or_is_missing_is_named() {
    let a = MyDb::new();
    let pg = PgDb::new();
    a.sql("CREATE TABLE s_0 (id INT PRIMARY KEY, v VARCHAR(20))");
    a.sql("CREATE TABLE s_1 (id INT PRIMARY KEY, v DATE)");
    pg.sql("CREATE TABLE s (id integer, v text, _shard text)");
    let err = sync_fails(&[
        "copy",
        "--from",
        &a.dsn("s_{0..1}"),
        "--to",
        &pg.dsn("s"),
        "--shard-column",
        "_shard",
    ]);
    assert!(
        err.contains(&format!("{}.s_1", a.name)) && err.contains("column v"),
        "{err}"
    );
    let err = sync_fails(&["copy", "--from", &a.dsn("s_{0..2}"), "--to", &pg.dsn("s")]);
    assert!(
        err.contains("unknown table") && err.contains("s_2"),
        "{err}"
    );
    let err = sync_fails(&["copy", "--from", &a.dsn("s_{3..1}"), "--to", &pg.dsn("s")]);
    assert!(err.contains("below"), "{err}");
}
