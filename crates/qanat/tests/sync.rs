//! `qanat sync` end to end against the machine's MariaDB and PostgreSQL, each test in its own
//! databases: type round trips (and Parquet read back by pyarrow), a million rows split on a
//! skewed and on a text key with `--verify`, a killed task and a killed job, dirty-record
//! limits, throttling, and precise errors for bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use std::time::Duration;

use serde_json::Value;
use support::poll_until;
use sync_support::{qanat_command, sync_fails, sync_json, MyDb, PgDb};

const MY_TYPES: &str = "id INT PRIMARY KEY, b TINYINT(1), i8 TINYINT, i16 SMALLINT, \
    i32 INT, i64 BIGINT, u64 BIGINT UNSIGNED, f32 FLOAT, f64 DOUBLE, num DECIMAL(20,6), \
    s VARCHAR(100), t TEXT, bin VARBINARY(50), bl BLOB, d DATE, tm TIME(6), \
    dt DATETIME(6), ts TIMESTAMP(6) NULL DEFAULT NULL";

const PG_TYPES: &str = "id integer PRIMARY KEY, b boolean, i8 smallint, i16 smallint, \
    i32 integer, i64 bigint, u64 numeric(20,0), f32 real, f64 double precision, \
    num numeric(20,6), s varchar(100), t text, bin bytea, bl bytea, d date, \
    tm time(6), dt timestamp(6), ts timestamptz(6)";

const MY_ROWS: &str = "INSERT INTO types_src VALUES \
 (1, 1, -128, -32768, -2147483648, -9223372036854775808, 18446744073709551615, 1.5, \
  -2.2250738585072014e-308, -99999999999999.999999, 'quote '' back\\\\slash tab\\t nl\\n', \
  'unicode: żółw 🐢', X'00FF0A09', X'DEADBEEF', '1000-01-01', '00:00:00.000001', \
  '1000-01-01 00:00:00.000000', '1970-01-01 00:00:01.000000'), \
 (2, 0, 127, 32767, 2147483647, 9223372036854775807, 0, -3.25, 1.7976931348623157e308, \
  99999999999999.999999, '', '', X'', X'', '9999-12-31', '23:59:59.999999', \
  '9999-12-31 23:59:59.999999', '2038-01-19 03:14:07.999999'), \
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
  NULL, NULL)";

fn table_report(summary: &Value) -> &Value {
    &summary["tables"][0]
}

#[test]
fn every_canonical_type_round_trips_mariadb_postgres_mariadb_and_into_parquet() {
    let my = MyDb::new();
    let pg = PgDb::new();
    my.sql(&format!("CREATE TABLE types_src ({MY_TYPES})"));
    my.sql(&format!("CREATE TABLE types_back ({MY_TYPES})"));
    pg.sql(&format!("CREATE TABLE types_mid ({PG_TYPES})"));
    my.sql(MY_ROWS);

    let there = sync_json(&[
        "copy",
        "--from",
        &my.dsn("types_src"),
        "--to",
        &pg.dsn("types_mid"),
        "--verify",
    ]);
    assert_eq!(table_report(&there)["rows_written"], 3, "{there}");
    assert_eq!(table_report(&there)["verify"]["ok"], true, "{there}");
    // PostgreSQL holds the values themselves, not approximations.
    let pg_row = pg
        .sql("SELECT i64, u64, num, s, encode(bin, 'hex'), tm, dt, ts FROM types_mid WHERE id = 1");
    assert_eq!(
        pg_row.trim_end(),
        "-9223372036854775808\t18446744073709551615\t-99999999999999.999999\tquote ' back\\slash tab\t nl\n\t00ff0a09\t00:00:00.000001\t1000-01-01 00:00:00\t1970-01-01 00:00:01+00"
    );

    let back = sync_json(&[
        "copy",
        "--from",
        &pg.dsn("types_mid"),
        "--to",
        &my.dsn("types_back"),
        "--verify",
    ]);
    assert_eq!(table_report(&back)["rows_written"], 3, "{back}");
    assert_eq!(table_report(&back)["verify"]["ok"], true, "{back}");
    let original = my.sql("SELECT * FROM types_src ORDER BY id");
    let returned = my.sql("SELECT * FROM types_back ORDER BY id");
    assert_eq!(original, returned);
    assert_eq!(original.lines().count(), 3);

    // Parquet, read back by an independent reader (pyarrow).
    let lake = tempfile::tempdir().expect("tempdir");
    let target = format!("parquet://{}/types?ds=20261129", lake.path().display());
    let pq = sync_json(&[
        "copy",
        "--from",
        &my.dsn("types_src"),
        "--to",
        &target,
        "--verify",
    ]);
    assert_eq!(table_report(&pq)["verify"]["ok"], true, "{pq}");
    let part_dir = lake.path().join("types/ds=20261129");
    let script = r#"
import sys, json, pyarrow.parquet as pq, pyarrow as pa
t = pq.read_table(sys.argv[1])
rows = sorted(t.to_pylist(), key=lambda r: r["id"])
def show(v):
    if v is None: return None
    if isinstance(v, bytes): return v.hex()
    return str(v)
print(json.dumps({"schema": {f.name: str(f.type) for f in t.schema},
                  "rows": [{k: show(v) for k, v in r.items()} for r in rows]}))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&part_dir)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(&out.stdout).expect("pyarrow output");
    let schema = &read["schema"];
    for (col, ty) in [
        ("b", "bool"),
        ("i64", "int64"),
        ("u64", "decimal128(20, 0)"),
        ("f64", "double"),
        ("num", "decimal128(20, 6)"),
        ("s", "string"),
        ("bin", "binary"),
        ("d", "date32[day]"),
        ("tm", "time64[us]"),
        ("dt", "timestamp[us]"),
        ("ts", "timestamp[us, tz=UTC]"),
    ] {
        assert_eq!(schema[col], ty, "column {col}: {schema}");
    }
    let rows = read["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    let r1 = &rows[0];
    assert_eq!(r1["i64"], "-9223372036854775808");
    assert_eq!(r1["u64"], "18446744073709551615");
    assert_eq!(r1["num"], "-99999999999999.999999");
    assert_eq!(r1["s"], "quote ' back\\slash tab\t nl\n");
    assert_eq!(r1["t"], "unicode: żółw 🐢");
    assert_eq!(r1["bin"], "00ff0a09");
    assert_eq!(r1["d"], "1000-01-01");
    assert_eq!(r1["tm"], "00:00:00.000001");
    assert_eq!(r1["ts"], "1970-01-01 00:00:01+00:00");
    assert_eq!(rows[1]["f64"], "1.7976931348623157e+308");
    assert_eq!(rows[1]["dt"], "9999-12-31 23:59:59.999999");
    assert!(rows[2]
        .as_object()
        .expect("row")
        .iter()
        .all(|(k, v)| k == "id" || v.is_null()));
}

#[test]
fn a_million_rows_with_skewed_and_text_keys_arrive_once_and_verify_clean() {
    let my = MyDb::new();
    let pg = PgDb::new();
    // 90% of the ids are dense, the rest spread over twelve orders of magnitude; `code` is
    // a random text key.
    my.sql(
        "CREATE TABLE big (id BIGINT PRIMARY KEY, code CHAR(32) NOT NULL, qty INT, \
         price DECIMAL(12,2), note VARCHAR(40), UNIQUE KEY (code))",
    );
    my.sql(
        "INSERT INTO big SELECT IF(seq <= 900000, seq, seq * 1000000), MD5(seq), seq % 1000, \
         seq / 100, CONCAT('note ', seq) FROM seq_1_to_1000000",
    );
    pg.sql("CREATE TABLE big (id bigint PRIMARY KEY, code char(32) NOT NULL UNIQUE, qty integer, price numeric(12,2), note varchar(40))");

    let by_text = sync_json(&[
        "copy",
        "--from",
        &my.dsn("big"),
        "--to",
        &pg.dsn("big"),
        "--split-pk",
        "code",
        "--channels",
        "4",
        "--max-splits",
        "16",
        "--verify",
    ]);
    let t = table_report(&by_text);
    assert_eq!(t["rows_read"], 1_000_000, "{by_text}");
    assert_eq!(t["rows_written"], 1_000_000, "{by_text}");
    assert_eq!(t["verify"]["ok"], true, "{by_text}");
    assert!(t["splits"].as_u64().unwrap_or(0) >= 8, "{by_text}");
    assert_eq!(
        pg.sql("SELECT count(*), count(DISTINCT id), sum(id) FROM big")
            .trim(),
        my.sql("SELECT count(*), count(DISTINCT id), sum(id) FROM big")
            .trim()
    );

    // Back on the skewed numeric key, into a fresh table.
    my.sql("CREATE TABLE big2 LIKE big");
    let by_id = sync_json(&[
        "copy",
        "--from",
        &pg.dsn("big"),
        "--to",
        &my.dsn("big2"),
        "--channels",
        "4",
        "--max-splits",
        "16",
        "--verify",
    ]);
    let t = table_report(&by_id);
    assert_eq!(t["rows_written"], 1_000_000, "{by_id}");
    assert_eq!(t["verify"]["ok"], true, "{by_id}");
    assert_eq!(
        my.sql("SELECT count(*), sum(id), sum(qty), sum(price) FROM big2"),
        my.sql("SELECT count(*), sum(id), sum(qty), sum(price) FROM big")
    );
}

fn fill_pg(pg: &PgDb, table: &str, rows: u32) {
    pg.sql(&format!(
        "CREATE TABLE {table} (id integer PRIMARY KEY, name text, amount numeric(10,2))"
    ));
    pg.sql(&format!(
        "INSERT INTO {table} SELECT g, 'name ' || g, g / 10.0 FROM generate_series(1, {rows}) g"
    ));
}

#[test]
fn a_task_killed_mid_write_is_retried_from_its_split_and_a_killed_job_rerun_is_right() {
    let my = MyDb::new();
    let pg = PgDb::new();
    fill_pg(&pg, "src", 60_000);
    my.sql("CREATE TABLE dst (id INT PRIMARY KEY, name TEXT, amount DECIMAL(10,2))");

    // Kill the writer's connection while it writes: the split is retried from its start.
    let child = qanat_command()
        .args([
            "sync",
            "copy",
            "--from",
            &pg.dsn("src"),
            "--to",
            &my.dsn("dst"),
            "--json",
        ])
        .args([
            "--max-records-per-sec",
            "20000",
            "--channels",
            "2",
            "--verify",
        ])
        .args(["--max-splits", "2", "--batch-rows", "1000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn qanat");
    // Each writer holds its split's transaction open across batches: once uncommitted rows
    // show (and before a split of 30,000 rows can have committed), kill the writers'
    // connections; their splits are then half-written and are retried from their start.
    poll_until(
        "writers with uncommitted rows",
        Duration::from_secs(30),
        || {
            let dirty_count: u64 = my
                .try_sql(
                    "SET SESSION TRANSACTION ISOLATION LEVEL READ UNCOMMITTED; \
                 SELECT count(*) FROM dst",
                )?
                .trim()
                .parse()
                .map_err(|e| format!("{e}"))?;
            if dirty_count == 0 || dirty_count >= 30_000 {
                return Err(format!("{dirty_count} uncommitted rows"));
            }
            let ids = my.try_sql(&format!(
            "SELECT id FROM information_schema.processlist WHERE db = '{}' AND id <> CONNECTION_ID()",
            my.name
        ))?;
            for id in ids.split_whitespace() {
                let _ = my.try_sql(&format!("KILL {id}"));
            }
            Ok(())
        },
    );
    let out = child.wait_with_output().expect("wait qanat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let summary = sync_support::parse_summary(&out);
    let t = table_report(&summary);
    assert!(t["retries"].as_u64().unwrap_or(0) >= 1, "{summary}");
    assert_eq!(t["rows_written"], 60_000, "{summary}");
    assert_eq!(t["verify"]["ok"], true, "{summary}");
    assert_eq!(
        my.sql("SELECT count(*), sum(id) FROM dst").trim(),
        "60000\t1800030000"
    );

    // Kill the whole job mid-copy, then run it again in truncate mode.
    let mut child = qanat_command()
        .args([
            "sync",
            "copy",
            "--from",
            &pg.dsn("src"),
            "--to",
            &my.dsn("dst"),
        ])
        .args(["--mode", "truncate", "--max-records-per-sec", "20000"])
        .spawn()
        .expect("spawn qanat");
    poll_until(
        "rows written after the truncate",
        Duration::from_secs(30),
        || {
            let n: u64 = my
                .try_sql(
                    "SET SESSION TRANSACTION ISOLATION LEVEL READ UNCOMMITTED; \
                 SELECT count(*) FROM dst",
                )?
                .trim()
                .parse()
                .map_err(|e| format!("{e}"))?;
            if n > 0 && n < 60_000 {
                Ok(())
            } else {
                Err(format!("{n} rows"))
            }
        },
    );
    child.kill().expect("kill qanat");
    let _ = child.wait();
    let partial: u64 = my
        .sql("SELECT count(*) FROM dst")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        partial < 60_000,
        "the job was not cut short: {partial} rows"
    );
    let again = sync_json(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &my.dsn("dst"),
        "--mode",
        "truncate",
        "--verify",
    ]);
    assert_eq!(table_report(&again)["verify"]["ok"], true, "{again}");
    assert_eq!(
        my.sql("SELECT count(*), sum(id) FROM dst").trim(),
        "60000\t1800030000"
    );

    // Upsert over what is there gives the same rows again.
    let upsert = sync_json(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &my.dsn("dst"),
        "--mode",
        "upsert",
        "--verify",
    ]);
    assert_eq!(table_report(&upsert)["verify"]["ok"], true, "{upsert}");
    assert_eq!(my.sql("SELECT count(*) FROM dst").trim(), "60000");
}

#[test]
fn rejected_rows_go_to_the_dirty_file_and_the_limits_fail_the_table() {
    let my = MyDb::new();
    let pg = PgDb::new();
    pg.sql("CREATE TABLE src (id integer PRIMARY KEY, code text)");
    // Every tenth code is too long for the target's VARCHAR(5).
    pg.sql(
        "INSERT INTO src SELECT g, CASE WHEN g % 10 = 0 THEN 'too long ' || g ELSE 'c' || g END \
         FROM generate_series(1, 100) g",
    );
    pg.sql("CREATE TABLE dst_pg (id integer PRIMARY KEY, code varchar(5))");
    my.sql("CREATE TABLE dst (id INT PRIMARY KEY, code VARCHAR(5))");
    let dir = tempfile::tempdir().expect("tempdir");
    let dirty = dir.path().join("dirty.jsonl");
    let dirty_arg = dirty.display().to_string();

    let ok = sync_json(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &my.dsn("dst"),
        "--dirty-file",
        &dirty_arg,
        "--max-dirty-records",
        "10",
    ]);
    let t = table_report(&ok);
    assert_eq!(t["rows_read"], 100, "{ok}");
    assert_eq!(t["rows_written"], 90, "{ok}");
    assert_eq!(t["dirty"], 10, "{ok}");
    let lines: Vec<Value> = std::fs::read_to_string(&dirty)
        .expect("dirty file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("dirty line is JSON"))
        .collect();
    assert_eq!(lines.len(), 10);
    for l in &lines {
        assert!(
            l["reason"].as_str().unwrap_or("").contains("Data too long"),
            "{l}"
        );
        assert!(
            l["row"]["code"]
                .as_str()
                .unwrap_or("")
                .starts_with("too long"),
            "{l}"
        );
    }
    assert_eq!(my.sql("SELECT count(*) FROM dst").trim(), "90");

    // The same into PostgreSQL: rejected rows are found within the COPY batch.
    let ok_pg = sync_json(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &pg.dsn("dst_pg"),
        "--max-dirty-records",
        "10",
    ]);
    assert_eq!(table_report(&ok_pg)["rows_written"], 90, "{ok_pg}");
    assert_eq!(table_report(&ok_pg)["dirty"], 10, "{ok_pg}");

    let too_many = sync_fails(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &my.dsn("dst"),
        "--mode",
        "truncate",
        "--max-dirty-records",
        "5",
    ]);
    assert!(too_many.contains("max_dirty_records = 5"), "{too_many}");
    let ratio = sync_fails(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &my.dsn("dst"),
        "--mode",
        "truncate",
        "--max-dirty-ratio",
        "0.05",
    ]);
    assert!(ratio.contains("max_dirty_ratio = 0.05"), "{ratio}");
}

#[test]
fn throttling_holds_the_records_per_second_limit() {
    let my = MyDb::new();
    let pg = PgDb::new();
    fill_pg(&pg, "src", 40_000);
    my.sql("CREATE TABLE dst (id INT PRIMARY KEY, name TEXT, amount DECIMAL(10,2))");
    let summary = sync_json(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &my.dsn("dst"),
        "--max-records-per-sec",
        "10000",
        "--batch-rows",
        "500",
        "--channels",
        "4",
    ]);
    let t = table_report(&summary);
    let rows = t["rows_written"].as_f64().unwrap_or(0.0);
    let seconds = t["transfer_seconds"].as_f64().unwrap_or(f64::MAX);
    let rate = rows / seconds;
    assert_eq!(rows, 40_000.0);
    assert!(
        (9_000.0..=11_000.0).contains(&rate),
        "{rate:.0} rows/s: {summary}"
    );
}

#[test]
fn bad_input_is_a_precise_error_and_a_failing_exit() {
    let my = MyDb::new();
    let pg = PgDb::new();
    my.sql("CREATE TABLE shapes (id INT PRIMARY KEY, g POINT)");
    my.sql("CREATE TABLE plain (id INT PRIMARY KEY, v INT)");
    pg.sql("CREATE TABLE plain (id integer PRIMARY KEY)");

    let e = sync_fails(&[
        "copy",
        "--from",
        "mysql://root@127.0.0.1:99999/x.y",
        "--to",
        &pg.dsn("plain"),
    ]);
    assert!(e.contains("bad DSN") && e.contains("port"), "{e}");
    let e = sync_fails(&["copy", "--from", &my.dsn("nope"), "--to", &pg.dsn("plain")]);
    assert!(
        e.contains(&format!("unknown table {}.nope", my.name)),
        "{e}"
    );
    let e = sync_fails(&[
        "copy",
        "--from",
        &my.dsn("shapes"),
        "--to",
        &pg.dsn("plain"),
    ]);
    assert!(e.contains("unsupported type point of column g"), "{e}");
    let e = sync_fails(&["copy", "--from", &my.dsn("plain"), "--to", &pg.dsn("plain")]);
    assert!(e.contains("unknown column v"), "{e}");
    let e = sync_fails(&[
        "copy",
        "--from",
        &my.dsn("plain"),
        "--to",
        &my.dsn("plain"),
        "--split-pk",
        "zz",
    ]);
    assert!(e.contains("unknown column zz"), "{e}");
    let e = sync_fails(&[
        "copy",
        "--from",
        "mysql://root@127.0.0.1:1/x.y",
        "--to",
        &pg.dsn("plain"),
    ]);
    assert!(
        e.contains("connecting to MariaDB/MySQL at 127.0.0.1:1"),
        "{e}"
    );

    // A job file with a misspelt key names it.
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[sync]\nchanels = 2\n[[table]]\nfrom = \"{}\"\nto = \"{}\"\n",
            my.dsn("plain"),
            pg.dsn("plain")
        ),
    )
    .expect("write job");
    let e = sync_fails(&["run", &job.display().to_string()]);
    assert!(e.contains("chanels"), "{e}");
}

#[test]
fn a_job_file_runs_several_tables_with_environment_overrides() {
    let my = MyDb::new();
    let pg = PgDb::new();
    fill_pg(&pg, "a", 1000);
    fill_pg(&pg, "b", 2000);
    my.sql("CREATE TABLE a (id INT PRIMARY KEY, name TEXT, amount DECIMAL(10,2))");
    my.sql("CREATE TABLE b (id INT PRIMARY KEY, name TEXT, amount DECIMAL(10,2))");
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[sync]\nchannels = 2\nverify = true\n\n[[table]]\nfrom = \"{}\"\nto = \"{}\"\n\n\
             [[table]]\nfrom = \"{}\"\nto = \"{}\"\nmode = \"upsert\"\n",
            pg.dsn("a"),
            my.dsn("a"),
            pg.dsn("b"),
            my.dsn("b")
        ),
    )
    .expect("write job");
    let out = qanat_command()
        .args([
            "sync",
            "run",
            &job.display().to_string(),
            "--concurrency",
            "2",
            "--json",
        ])
        .env("QANAT_SYNC_MAX_SPLITS", "1")
        .output()
        .expect("run qanat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = sync_support::parse_summary(&out);
    let tables = summary["tables"].as_array().expect("tables");
    assert_eq!(tables.len(), 2);
    assert_eq!(tables[0]["rows_written"], 1000);
    assert_eq!(tables[1]["rows_written"], 2000);
    // QANAT_SYNC_MAX_SPLITS=1 overrode the default of 32.
    assert!(
        tables
            .iter()
            .all(|t| t["splits"] == 1 && t["verify"]["ok"] == true),
        "{summary}"
    );
    assert_eq!(my.sql("SELECT count(*) FROM b").trim(), "2000");
}

#[test]
fn a_parquet_partition_is_replaced_whole_and_a_failed_run_leaves_the_old_one() {
    let my = MyDb::new();
    my.sql("CREATE TABLE ev (id INT PRIMARY KEY, tm TIME)");
    my.sql("INSERT INTO ev SELECT seq, '01:02:03' FROM seq_1_to_5000");
    let lake = tempfile::tempdir().expect("tempdir");
    let target = format!("parquet://{}/ev?ds=20261129", lake.path().display());
    let table_dir = lake.path().join("ev");
    let part_dir = table_dir.join("ds=20261129");
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&table_dir)
            .expect("table dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let count_rows = || {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, pyarrow.parquet as pq; print(pq.read_table(sys.argv[1]).num_rows)",
            ])
            .arg(&part_dir)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };

    let first = sync_json(&[
        "copy",
        "--from",
        &my.dsn("ev"),
        "--to",
        &target,
        "--max-splits",
        "4",
    ]);
    assert_eq!(table_report(&first)["rows_written"], 5000, "{first}");
    assert_eq!(count_rows(), "5000");

    // A re-run with fewer rows and fewer splits replaces the partition whole.
    my.sql("DELETE FROM ev WHERE id > 3000");
    sync_json(&[
        "copy",
        "--from",
        &my.dsn("ev"),
        "--to",
        &target,
        "--max-splits",
        "1",
    ]);
    assert_eq!(count_rows(), "3000");
    assert_eq!(listing(), vec!["ds=20261129".to_string()]);
    let parts = std::fs::read_dir(&part_dir).expect("partition").count();
    assert_eq!(parts, 1);

    // A run that fails (a TIME past 24 h is dirty, and no dirty row is allowed) leaves the
    // committed partition as it was and no staging directory behind.
    my.sql("INSERT INTO ev VALUES (4000, '25:00:00')");
    let e = sync_fails(&[
        "copy",
        "--from",
        &my.dsn("ev"),
        "--to",
        &target,
        "--max-dirty-records",
        "0",
    ]);
    assert!(e.contains("max_dirty_records = 0"), "{e}");
    assert_eq!(count_rows(), "3000");
    assert_eq!(listing(), vec!["ds=20261129".to_string()]);
}
