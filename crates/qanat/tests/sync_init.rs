//! `qanat sync init` against the machine's MariaDB and PostgreSQL: 20 MariaDB tables of
//! mixed types → target DDL created in PostgreSQL → the generated job file run with
//! `--verify`; and the precise errors for a pattern that matches nothing and an unsupported
//! column type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use sync_support::{mariadb_addr, postgres_addr, qanat, sync_fails, sync_json, MyDb, PgDb};

/// (column type, value from the row number `seq`).
const TYPES: &[(&str, &str)] = &[
    ("TINYINT(1)", "seq % 2"),
    ("SMALLINT UNSIGNED", "seq * 7 % 65535"),
    ("MEDIUMINT UNSIGNED", "seq * 1000"),
    ("INT", "CAST(seq AS SIGNED) - 500"),
    ("BIGINT", "seq * 1000000007"),
    ("BIGINT UNSIGNED", "18446744073709551615 - seq"),
    ("DECIMAL(12,3)", "seq / 8"),
    ("DOUBLE", "seq / 3"),
    ("FLOAT", "seq / 4"),
    ("VARCHAR(40)", "CONCAT('name-', seq, ' żółw')"),
    ("CHAR(8)", "LEFT(MD5(seq), 8)"),
    ("TEXT", "REPEAT('x\\t', seq % 50)"),
    ("ENUM('red','green')", "IF(seq % 2, 'red', 'green')"),
    ("JSON", "JSON_OBJECT('k', seq)"),
    ("VARBINARY(16)", "UNHEX(MD5(seq))"),
    ("BLOB", "UNHEX(SHA1(seq))"),
    ("DATE", "'2020-01-01' + INTERVAL seq DAY"),
    ("TIME(6)", "SEC_TO_TIME(seq) + INTERVAL 250 MICROSECOND"),
    (
        "DATETIME(6)",
        "'2020-01-01 00:00:00.5' + INTERVAL seq SECOND",
    ),
    ("TIMESTAMP(6) NULL", "FROM_UNIXTIME(1600000000 + seq)"),
    ("YEAR", "1990 + seq % 100"),
];

fn rows_of(i: usize) -> usize {
    100 + i * 37
}

#[test]
fn twenty_mariadb_tables_are_created_in_postgres_and_the_generated_job_verifies_clean() {
    let my = MyDb::new();
    let pg = PgDb::new();
    for i in 0..20 {
        let cols: Vec<(String, &str, &str)> = (0..3)
            .map(|k| {
                let (ty, expr) = TYPES[(i * 3 + k) % TYPES.len()];
                (format!("c{k}"), ty, expr)
            })
            .collect();
        let defs: Vec<String> = cols.iter().map(|(n, ty, _)| format!("{n} {ty}")).collect();
        my.sql(&format!(
            "CREATE TABLE t{i:02} (id BIGINT PRIMARY KEY, {})",
            defs.join(", ")
        ));
        let exprs: Vec<String> = cols
            .iter()
            .map(|(_, _, e)| format!("IF(seq % 10 = 0, NULL, {e})"))
            .collect();
        my.sql(&format!(
            "INSERT INTO t{i:02} SELECT seq, {} FROM seq_1_to_{}",
            exprs.join(", "),
            rows_of(i)
        ));
    }
    // Not matched by the pattern below: init must leave it out.
    my.sql("CREATE TABLE other (id INT PRIMARY KEY)");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = qanat(&[
        "sync",
        "init",
        "--source",
        &format!("mysql://root@{}", mariadb_addr()),
        "--target",
        &format!("postgres://postgres@{}/{}", postgres_addr(), pg.name),
        "--tables",
        &format!("{}.t*", my.name),
        "--out",
        &dir.path().display().to_string(),
        "--create-tables",
    ]);
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ddl = String::from_utf8_lossy(&out.stdout);
    assert_eq!(ddl.matches("CREATE TABLE").count(), 20, "{ddl}");
    assert!(
        ddl.contains("numeric(20,0)") && ddl.contains("timestamptz(6)"),
        "{ddl}"
    );
    let created =
        pg.sql("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'");
    assert_eq!(created.trim(), "20");
    let job = dir.path().join(format!("{}.toml", my.name));
    let text = std::fs::read_to_string(&job).expect("job file written");
    assert_eq!(text.matches("[[table]]").count(), 20, "{text}");
    assert!(!text.contains(".other\""), "{text}");
    assert!(text.contains("channels = "), "{text}");

    let summary = sync_json(&["run", &job.display().to_string(), "--verify"]);
    let tables = summary["tables"].as_array().expect("tables");
    assert_eq!(tables.len(), 20, "{summary}");
    assert!(
        tables.iter().all(|t| t["verify"]["ok"] == true),
        "{summary}"
    );
    for i in 0..20 {
        let n = pg.sql(&format!("SELECT count(*) FROM t{i:02}"));
        assert_eq!(n.trim(), rows_of(i).to_string(), "t{i:02}");
    }
}

#[test]
fn no_matching_table_and_an_unsupported_type_are_precise_errors() {
    let my = MyDb::new();
    let pg = PgDb::new();
    my.sql("CREATE TABLE bad_bits (id INT PRIMARY KEY, flags BIT(3))");
    let target = format!("postgres://postgres@{}/{}", postgres_addr(), pg.name);
    let e = sync_fails(&[
        "init",
        "--source",
        &format!("mysql://root@{}", mariadb_addr()),
        "--target",
        &target,
        "--tables",
        &format!("{}.nomatch_*", my.name),
    ]);
    assert!(e.contains("nomatch_*") && e.contains(&my.name), "{e}");
    let e = sync_fails(&[
        "init",
        "--source",
        &format!("mysql://root@{}", mariadb_addr()),
        "--target",
        &target,
        "--tables",
        &format!("{}.bad_*", my.name),
    ]);
    assert!(
        e.contains("bad_bits") && e.contains("flags") && e.contains("bit(3)"),
        "{e}"
    );
}
