//! `qanat sync run` with many tables against the machine's MariaDB and PostgreSQL: tables
//! start in order of priority, then of their place in the job file, and the per-server task
//! cap is a job-file key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use sync_support::{qanat_command, MyDb, PgDb};

#[test]
fn tables_start_by_priority_then_file_order() {
    let my = MyDb::new();
    let pg = PgDb::new();
    let names = ["t_low", "t_high", "t_mid", "t_low2"];
    for (i, t) in names.iter().enumerate() {
        my.sql(&format!("CREATE TABLE {t} (id INT PRIMARY KEY, v TEXT)"));
        my.sql(&format!(
            "INSERT INTO {t} SELECT seq, CONCAT('v', seq) FROM seq_1_to_{}",
            100 * (i + 1)
        ));
        pg.sql(&format!(
            "CREATE TABLE {t} (id integer PRIMARY KEY, v text)"
        ));
    }
    let priorities = [None, Some(10), Some(5), None];
    let mut job = String::from("[sync]\nconcurrency = 1\nmax_tasks_per_server = 1\n");
    for (t, p) in names.iter().zip(priorities) {
        job.push_str(&format!(
            "\n[[table]]\nfrom = \"{}\"\nto = \"{}\"\n",
            my.dsn(t),
            pg.dsn(t)
        ));
        if let Some(p) = p {
            job.push_str(&format!("priority = {p}\n"));
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("job.toml");
    std::fs::write(&path, job).expect("write job");
    let out = qanat_command()
        .args(["sync", "run", &path.display().to_string(), "--json"])
        .output()
        .expect("run qanat");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // With one table at a time, the order of the "planned" lines is the start order.
    let started: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("planned"))
        .filter_map(|l| {
            names
                .iter()
                .find(|n| l.contains(&format!(".{n} ")))
                .copied()
        })
        .collect();
    assert_eq!(started, ["t_high", "t_mid", "t_low", "t_low2"], "{stderr}");
    // Reports stay in the job file's order.
    let summary = sync_support::parse_summary(&out);
    let written: Vec<u64> = summary["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| t["rows_written"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(written, [100, 200, 300, 400], "{summary}");
}
