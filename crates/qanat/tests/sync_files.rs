//! `qanat sync` with delimited files (CSV/TSV, plain, gzip or zstd) against the machine's
//! MariaDB and PostgreSQL: a table out to a file with its verification file (checked with
//! the system's `sha256sum`, `zstd` and `gzip`), back into a database with `--verify`, and a
//! tampered or unverified file refused with a precise error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use sync_support::{sync_fails, sync_json, MyDb, PgDb};

fn verification(path: &Path) -> Value {
    let mut v = path.as_os_str().to_owned();
    v.push(".verify");
    serde_json::from_str(&std::fs::read_to_string(&v).expect("verification file"))
        .expect("verification file is JSON")
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn decompress(tool: &str, path: &Path) -> String {
    let out = Command::new(tool)
        .args(["-dc"])
        .arg(path)
        .output()
        .expect("decompressor");
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 data file")
}

#[test]
fn tables_go_out_to_verified_files_and_back_in() {
    let my = MyDb::new();
    let pg = PgDb::new();
    my.sql(
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, note VARCHAR(40), amount DECIMAL(12,2), \
         raw VARBINARY(8), at DATETIME(6), paid TINYINT(1))",
    );
    my.sql(
        "INSERT INTO orders SELECT seq, CONCAT('note, \"', seq, '\"'), seq / 100, \
         UNHEX(LPAD(HEX(seq), 6, '0')), '2026-01-01' + INTERVAL seq SECOND, seq % 2 \
         FROM seq_1_to_50000",
    );
    my.sql(
        "INSERT INTO orders VALUES (50001, NULL, NULL, NULL, NULL, NULL), \
         (50002, '', 0, X'', '2026-01-01 00:00:00', 0), (50003, 'two\\nlines', 1, X'0A', NULL, 1)",
    );
    let dir = tempfile::tempdir().expect("tempdir");

    // Out to CSV, zstd, split over several tasks; the verification file describes it.
    let zst = dir.path().join("orders.csv.zst");
    let out = sync_json(&[
        "copy",
        "--from",
        &my.dsn("orders"),
        "--to",
        &format!("file://{}", zst.display()),
        "--max-splits",
        "4",
        "--verify",
    ]);
    let t = &out["tables"][0];
    assert_eq!(t["rows_written"], 50_003, "{out}");
    assert_eq!(t["verify"]["ok"], true, "{out}");
    let v = verification(&zst);
    assert_eq!(v["rows"], 50_003, "{v}");
    assert_eq!(
        v["bytes"],
        std::fs::metadata(&zst).expect("data file").len(),
        "{v}"
    );
    assert_eq!(v["sha256"], sha256sum(&zst), "{v}");
    assert_eq!(v["format"], "csv");
    assert_eq!(v["compression"], "zstd");
    assert!(v["splits"].as_array().map_or(0, Vec::len) >= 2, "{v}");
    // An independent decoder reads one CSV: header, quoting, NULL apart from "".
    let text = decompress("zstd", &zst);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "id,note,amount,raw,at,paid");
    assert!(
        text.contains("\n7,\"note, \"\"7\"\"\",0.07,000007,2026-01-01 00:00:07,true\n"),
        "{}",
        &text[..300]
    );
    assert!(text.contains("\n50001,,,,,\n"));
    assert!(text.contains("\n50002,\"\",0.00,\"\",2026-01-01 00:00:00,false\n"));
    assert!(text.contains("\n50003,\"two\nlines\",1.00,0a,,true\n"));
    assert_eq!(lines.len(), 50_003 + 1 + 1); // one line break inside a quoted field

    // Back into PostgreSQL, verified row by row against the file.
    pg.sql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, note varchar(40), amount numeric(12,2), \
         raw bytea, at timestamp(6), paid boolean)",
    );
    let back = sync_json(&[
        "copy",
        "--from",
        &format!("file://{}", zst.display()),
        "--to",
        &pg.dsn("orders"),
        "--verify",
    ]);
    assert_eq!(back["tables"][0]["rows_written"], 50_003, "{back}");
    assert_eq!(back["tables"][0]["verify"]["ok"], true, "{back}");
    assert_eq!(
        pg.sql("SELECT note IS NULL, note = '', encode(raw, 'hex') FROM orders WHERE id IN (50001, 50002, 50003) ORDER BY id"),
        "t\t\t\nf\tt\t\nf\tf\t0a\n"
    );

    // PostgreSQL to TSV with gzip, then into MariaDB.
    let gz = dir.path().join("out/orders.tsv.gz");
    let tsv = sync_json(&[
        "copy",
        "--from",
        &pg.dsn("orders"),
        "--to",
        &format!("file://{}", gz.display()),
        "--verify",
    ]);
    assert_eq!(tsv["tables"][0]["verify"]["ok"], true, "{tsv}");
    assert_eq!(verification(&gz)["sha256"], sha256sum(&gz));
    let text = decompress("gzip", &gz);
    assert!(text.starts_with("id\tnote\tamount\traw\tat\tpaid\n"));
    assert!(
        text.contains("\n50001\t\\N\t\\N\t\\N\t\\N\t\\N\n"),
        "TSV NULLs"
    );
    my.sql("CREATE TABLE orders_back LIKE orders");
    let into_my = sync_json(&[
        "copy",
        "--from",
        &format!("file://{}", gz.display()),
        "--to",
        &my.dsn("orders_back"),
        "--verify",
    ]);
    assert_eq!(into_my["tables"][0]["verify"]["ok"], true, "{into_my}");
    assert_eq!(
        my.sql("SELECT * FROM orders ORDER BY id"),
        my.sql("SELECT * FROM orders_back ORDER BY id")
    );

    // A re-run replaces the file whole; its verification file follows.
    let again = sync_json(&[
        "copy",
        "--from",
        &my.dsn("orders"),
        "--to",
        &format!("file://{}?compression=zstd", zst.display()),
        "--max-splits",
        "1",
    ]);
    assert_eq!(again["tables"][0]["rows_written"], 50_003, "{again}");
    assert_eq!(verification(&zst)["sha256"], sha256sum(&zst));
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}

#[test]
fn a_file_that_does_not_match_its_verification_file_is_refused() {
    let pg = PgDb::new();
    pg.sql("CREATE TABLE src (id integer PRIMARY KEY, name text)");
    pg.sql("INSERT INTO src SELECT g, 'name ' || g FROM generate_series(1, 1000) g");
    pg.sql("CREATE TABLE dst (id integer PRIMARY KEY, name text)");
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("src.csv");
    let file_dsn = format!("file://{}", csv.display());
    sync_json(&["copy", "--from", &pg.dsn("src"), "--to", &file_dsn]);
    let good = std::fs::read(&csv).expect("data file");
    let expected_size = good.len();

    // One byte more: the size differs.
    let mut longer = good.clone();
    longer.extend_from_slice(b"1001,x\n");
    std::fs::write(&csv, &longer).expect("write");
    let err = sync_fails(&["copy", "--from", &file_dsn, "--to", &pg.dsn("dst")]);
    assert!(
        err.contains(&format!("verification of {} failed", csv.display()))
            && err.contains(&format!(
                "size is {} bytes, the verification file says {expected_size}",
                longer.len()
            )),
        "{err}"
    );

    // Same size, one byte changed: the SHA-256 differs.
    let mut changed = good.clone();
    let at = changed.len() - 3;
    changed[at] = b'9';
    std::fs::write(&csv, &changed).expect("write");
    let err = sync_fails(&["copy", "--from", &file_dsn, "--to", &pg.dsn("dst")]);
    assert!(err.contains("SHA-256 is "), "{err}");
    assert!(err.contains(", the verification file says "), "{err}");
    assert_eq!(pg.sql("SELECT count(*) FROM dst").trim(), "0");

    // No verification file: refused, unless the source says check=false.
    std::fs::write(&csv, &good).expect("write");
    let mut vpath = csv.as_os_str().to_owned();
    vpath.push(".verify");
    std::fs::remove_file(&vpath).expect("remove verification file");
    let err = sync_fails(&["copy", "--from", &file_dsn, "--to", &pg.dsn("dst")]);
    assert!(err.contains("no verification file"), "{err}");
    assert!(err.contains("check=false"), "{err}");
    let unchecked = sync_json(&[
        "copy",
        "--from",
        &format!("{file_dsn}?check=false"),
        "--to",
        &pg.dsn("dst"),
    ]);
    assert_eq!(unchecked["tables"][0]["rows_written"], 1000, "{unchecked}");
    assert_eq!(pg.sql("SELECT sum(id) FROM dst").trim(), "500500");

    // A missing file is an unknown table; a bad DSN names the key.
    let err = sync_fails(&[
        "copy",
        "--from",
        &format!("file://{}/nope.csv", dir.path().display()),
        "--to",
        &pg.dsn("dst"),
    ]);
    assert!(
        err.contains("unknown table") && err.contains("nope.csv"),
        "{err}"
    );
    let err = sync_fails(&[
        "copy",
        "--from",
        &pg.dsn("src"),
        "--to",
        &format!("{file_dsn}?compression=lz5"),
    ]);
    assert!(err.contains("compression=\"lz5\""), "{err}");
}
