//! Progress of `qanat sync`: log lines with rows, MB, rates, dirty records and ETA when stderr
//! is not a terminal, a live bar per table when it is (run under a pseudo-terminal).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use std::process::{Command, Stdio};

use sync_support::{qanat_command, MyDb, PgDb, QANAT_BIN};

/// A table that takes a few seconds under the throttle, so progress is shown at least once.
fn throttled_copy_args(my: &MyDb, pg: &PgDb) -> Vec<String> {
    my.sql("CREATE TABLE p (id INT PRIMARY KEY, v VARCHAR(20))");
    my.sql("INSERT INTO p SELECT seq, CONCAT('v', seq) FROM seq_1_to_6000");
    my.sql("ANALYZE TABLE p");
    pg.sql("CREATE TABLE p (id integer PRIMARY KEY, v varchar(20))");
    [
        "sync",
        "copy",
        "--from",
        &my.dsn("p"),
        "--to",
        &pg.dsn("p"),
        "--max-records-per-sec",
        "2000",
        "--batch-rows",
        "200",
        "--progress-secs",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn without_a_terminal_progress_is_log_lines_with_rates_dirty_and_eta() {
    let my = MyDb::new();
    let pg = PgDb::new();
    let args = throttled_copy_args(&my, &pg);
    let out = qanat_command().args(&args).output().expect("qanat");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("progress")).collect();
    assert!(!lines.is_empty(), "{stderr}");
    for needle in [
        "rows=",
        "mb=",
        "rows_per_sec=",
        "mb_per_sec=",
        "dirty=0",
        "splits=",
        "eta=",
    ] {
        assert!(lines[0].contains(needle), "{needle} missing: {}", lines[0]);
    }
    // No bar drawing codes in a log.
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
    assert_eq!(pg.sql("SELECT count(*) FROM p").trim(), "6000");
}

#[test]
fn on_a_terminal_each_table_has_a_live_bar() {
    let my = MyDb::new();
    let pg = PgDb::new();
    let args = throttled_copy_args(&my, &pg);
    // `script` gives the command a pseudo-terminal and copies what it draws.
    let mut line = String::from(QANAT_BIN);
    for a in &args {
        line.push_str(&format!(" '{a}'"));
    }
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .env_remove("QANAT_LOG")
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .expect("script");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    for needle in ["rows/s", "MB/s", "dirty 0", "ETA", "splits"] {
        assert!(screen.contains(needle), "{needle} missing:\n{screen}");
    }
    // The bar is drawn, then redrawn in place.
    assert!(screen.contains('\u{1b}'), "{screen}");
    assert!(
        !screen.contains(" progress "),
        "log lines on a terminal:\n{screen}"
    );
    assert_eq!(pg.sql("SELECT count(*) FROM p").trim(), "6000");
}
