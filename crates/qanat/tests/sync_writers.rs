//! `qanat sync` writers at bulk speed, against the machine's MariaDB and PostgreSQL: binary
//! `COPY … FROM STDIN` into PostgreSQL (with its text-form fallback for column types it has
//! no encoder for) and `LOAD DATA LOCAL INFILE` into MariaDB, each keeping the dirty-record
//! rules: a value that does not fit is one dirty record with its reason, the rest arrive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use serde_json::Value;
use sync_support::{qanat_command, MyDb, PgDb};

/// `qanat sync ARGS --json` with debug logs; the summary and the logs.
fn sync_logged(args: &[&str]) -> (Value, String) {
    let out = qanat_command()
        .arg("sync")
        .args(args)
        .arg("--json")
        .env("QANAT_LOG", "qanat_sync=debug")
        .output()
        .expect("run qanat");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "qanat sync {args:?}: {}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    (sync_support::parse_summary(&out), stderr)
}

fn dirty_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("dirty line is JSON"))
        .collect()
}

#[test]
fn postgres_gets_binary_copy_with_exact_values_and_per_row_rejects() {
    let my = MyDb::new();
    let pg = PgDb::new();
    my.sql(
        "CREATE TABLE src (id BIGINT PRIMARY KEY, small INT, big BIGINT, n DECIMAL(30,8), \
         f DOUBLE, r FLOAT, j JSON, c CHAR(3), s VARCHAR(20), b VARBINARY(8), d DATE, \
         t TIME(6), dt DATETIME(6), ts TIMESTAMP(6) NULL DEFAULT NULL, ok TINYINT(1))",
    );
    my.sql(
        "INSERT INTO src VALUES \
         (1, -32768, 2147483647, -1234567890123456789012.12345678, 1.5e300, 0.25, \
          '{\"a\": [1, 2]}', 'ab', 'tab\\there', X'00FF', '0001-01-01', '23:59:59.999999', \
          '1970-01-01 00:00:00.000001', '2038-01-19 03:14:07.5', 1), \
         (2, 32767, 2147483648, 0.00000001, -0.0, -3.5, 'null', '', '', X'', '9999-12-31', \
          '00:00:00', '9999-12-31 23:59:59.999999', '1970-01-01 00:00:01', 0), \
         (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL), \
         (4, 1, -2147483649, 10000, 2, 2, '[]', 'x', 'y', X'01', '2000-01-01', '12:00:00', \
          '2000-01-01 00:00:00', '2000-01-01 00:00:00', 1)",
    );
    pg.sql(
        "CREATE TABLE dst (id bigint PRIMARY KEY, small smallint, big integer, n numeric(30,8), \
         f double precision, r real, j jsonb, c char(3), s varchar(20), b bytea, d date, \
         t time(6), dt timestamp(6), ts timestamptz(6), ok boolean)",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let dirty = dir.path().join("dirty.jsonl");
    let (summary, logs) = sync_logged(&[
        "copy",
        "--from",
        &my.dsn("src"),
        "--to",
        &pg.dsn("dst"),
        "--dirty-file",
        &dirty.display().to_string(),
    ]);
    assert!(logs.contains("(FORMAT binary)"), "{logs}");
    let t = &summary["tables"][0];
    assert_eq!(t["rows_written"], 2, "{summary}");
    assert_eq!(t["dirty"], 2, "{summary}");
    // Rows 2 and 4 hold a `big` outside integer's range: each is one dirty record.
    let lines = dirty_lines(&dirty);
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|l| l["row"]["id"].as_str().unwrap_or(""))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["2", "4"], "{lines:?}");
    for l in &lines {
        let reason = l["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("column big") && reason.contains("out of range for type integer"),
            "{l}"
        );
    }
    let row = pg.sql(
        "SELECT small, big, n, f, r, j, '[' || c || ']', s, encode(b, 'hex'), d, t, dt, ts, ok \
         FROM dst WHERE id = 1",
    );
    assert_eq!(
        row.trim_end(),
        "-32768\t2147483647\t-1234567890123456789012.12345678\t1.5e+300\t0.25\t{\"a\": [1, 2]}\t[ab]\ttab\there\t00ff\t0001-01-01\t23:59:59.999999\t1970-01-01 00:00:00.000001\t2038-01-19 03:14:07.5+00\tt"
    );
    assert_eq!(
        pg.sql("SELECT small, big, n, f, r, j, d, ok FROM dst WHERE id = 3")
            .trim_end_matches('\n'),
        "\t\t\t\t\t\t\t"
    );

    // The same rows once more through --verify: a clean copy into a table that takes them all.
    pg.sql(
        "CREATE TABLE wide (id bigint PRIMARY KEY, small smallint, big bigint, n numeric(30,8), \
         f double precision, r double precision, j text, c varchar(3), s text, b bytea, d date, \
         t time(6), dt timestamp(6), ts timestamptz(6), ok boolean)",
    );
    let (verified, _) = sync_logged(&[
        "copy",
        "--from",
        &my.dsn("src"),
        "--to",
        &pg.dsn("wide"),
        "--verify",
    ]);
    assert_eq!(verified["tables"][0]["verify"]["ok"], true, "{verified}");

    // A column type without a binary encoder (inet) sends the table in COPY's text form.
    my.sql("CREATE TABLE hosts (id INT PRIMARY KEY, addr VARCHAR(40))");
    my.sql("INSERT INTO hosts VALUES (1, '10.0.0.1'), (2, '::1'), (3, 'not an address')");
    pg.sql("CREATE TABLE hosts (id integer PRIMARY KEY, addr inet)");
    let (text_form, logs) =
        sync_logged(&["copy", "--from", &my.dsn("hosts"), "--to", &pg.dsn("hosts")]);
    assert!(!logs.contains("(FORMAT binary)"), "{logs}");
    assert_eq!(text_form["tables"][0]["rows_written"], 2, "{text_form}");
    assert_eq!(text_form["tables"][0]["dirty"], 1, "{text_form}");
    assert_eq!(
        pg.sql("SELECT string_agg(host(addr), ',' ORDER BY id) FROM hosts")
            .trim(),
        "10.0.0.1,::1"
    );

    // Upsert goes through the staging table in binary form too.
    pg.sql("UPDATE wide SET s = 'changed'");
    let (upsert, logs) = sync_logged(&[
        "copy",
        "--from",
        &my.dsn("src"),
        "--to",
        &pg.dsn("wide"),
        "--mode",
        "upsert",
        "--verify",
    ]);
    assert!(logs.contains("COPY qanat_stage"), "{logs}");
    assert!(logs.contains("(FORMAT binary)"), "{logs}");
    assert_eq!(upsert["tables"][0]["verify"]["ok"], true, "{upsert}");
    assert_eq!(
        pg.sql("SELECT count(*) FROM wide WHERE s = 'changed'")
            .trim(),
        "0"
    );
}

fn com_load(my: &MyDb) -> u64 {
    my.sql("SHOW GLOBAL STATUS LIKE 'Com_load'")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn mariadb_gets_load_data_and_rejected_rows_still_become_dirty_records() {
    let my = MyDb::new();
    let pg = PgDb::new();
    pg.sql(
        "CREATE TABLE src (id integer PRIMARY KEY, code text, b bytea, note text, \
         at timestamptz, amount numeric(10,2))",
    );
    pg.sql(
        "INSERT INTO src SELECT g, CASE WHEN g % 1000 = 0 THEN 'too long ' || g ELSE 'c' || g END, \
         decode(lpad(to_hex(g), 8, '0'), 'hex'), E'tab\\there\\nnew line \\\\ back', \
         '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 second', g / 100.0 \
         FROM generate_series(1, 20000) g",
    );
    pg.sql("INSERT INTO src VALUES (20001, NULL, NULL, NULL, NULL, NULL), (20002, '', '', '', NULL, 0)");
    my.sql(
        "CREATE TABLE dst (id INT PRIMARY KEY, code VARCHAR(8), b VARBINARY(8), note TEXT, \
         at TIMESTAMP(6) NULL DEFAULT NULL, amount DECIMAL(10,2))",
    );
    // A row already there: in insert mode its key is a duplicate, so a dirty record.
    my.sql("INSERT INTO dst (id, code) VALUES (7, 'there')");
    let dir = tempfile::tempdir().expect("tempdir");
    let dirty = dir.path().join("dirty.jsonl");
    let loads_before = com_load(&my);
    let (summary, logs) = sync_logged(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &my.dsn("dst"),
        "--dirty-file",
        &dirty.display().to_string(),
        "--batch-rows",
        "2000",
    ]);
    assert!(logs.contains("LOAD DATA LOCAL INFILE"), "{logs}");
    assert!(
        com_load(&my) > loads_before,
        "no LOAD DATA reached the server"
    );
    let t = &summary["tables"][0];
    assert_eq!(t["rows_read"], 20_002, "{summary}");
    // 20 codes too long for VARCHAR(8), and the duplicate id 7.
    assert_eq!(t["dirty"], 21, "{summary}");
    assert_eq!(t["rows_written"], 19_981, "{summary}");
    let lines = dirty_lines(&dirty);
    assert_eq!(lines.len(), 21);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["reason"].as_str().unwrap_or("").contains("Data too long"))
            .count(),
        20,
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l["row"]["id"] == "7"
            && l["reason"]
                .as_str()
                .unwrap_or("")
                .contains("Duplicate entry")),
        "{lines:?}"
    );
    // Values arrive as they were: escapes, binary, instants in UTC, NULL and empty apart.
    assert_eq!(
        my.sql("SELECT code, HEX(b), note, UNIX_TIMESTAMP(at), amount FROM dst WHERE id = 4097"),
        "c4097\t00001001\ttab\\there\\nnew line \\\\ back\t1767229697.000000\t40.97\n"
    );
    assert_eq!(
        my.sql(
            "SELECT code IS NULL, b IS NULL, note IS NULL, code = '', b = '', note = '' \
             FROM dst WHERE id IN (20001, 20002) ORDER BY id"
        ),
        "1\t1\t1\tNULL\tNULL\tNULL\n0\t0\t0\t1\t1\t1\n"
    );
    assert_eq!(my.sql("SELECT code FROM dst WHERE id = 7").trim(), "there");

    // Truncate then insert: LOAD DATA again, every row once, verify clean.
    my.sql("ALTER TABLE dst MODIFY code TEXT");
    let (again, _) = sync_logged(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &my.dsn("dst"),
        "--mode",
        "truncate",
        "--verify",
    ]);
    assert_eq!(again["tables"][0]["rows_written"], 20_002, "{again}");
    assert_eq!(again["tables"][0]["verify"]["ok"], true, "{again}");
}
