//! `qanat sync run --datax job.json`: real DataX job files (the JSON a DataX user has)
//! against the machine's MariaDB and PostgreSQL, and the errors for what is not carried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod sync_support;

use sync_support::{mariadb_addr, postgres_addr, sync_fails, sync_json, MyDb, PgDb};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write job");
    path.display().to_string()
}

#[test]
fn a_datax_job_moves_sharded_mysql_tables_into_postgres_with_its_settings() {
    let (my_addr, pg_addr) = (mariadb_addr(), postgres_addr());
    let a = MyDb::new();
    let b = MyDb::new();
    let pg = PgDb::new();
    for k in 0..4u64 {
        let db = if k < 2 { &a } else { &b };
        db.sql(&format!(
            "CREATE TABLE user_{k:02} (id BIGINT PRIMARY KEY, name VARCHAR(30), score INT, secret TEXT)"
        ));
        db.sql(&format!(
            "INSERT INTO user_{k:02} SELECT seq + {}, CONCAT('u', seq), seq % 100, 'x' FROM seq_1_to_250",
            1000 * k
        ));
    }
    pg.sql("CREATE TABLE users (id bigint PRIMARY KEY, name varchar(30), score integer)");
    pg.sql("CREATE TABLE audit (what text)");
    // A stale row that preSql removes.
    pg.sql("INSERT INTO users VALUES (424242, 'stale', 0)");
    let job = format!(
        r#"{{
  "job": {{
    "setting": {{
      "speed": {{ "channel": 2, "byte": -1, "record": 100000 }},
      "errorLimit": {{ "record": 0, "percentage": 0.02 }}
    }},
    "content": [
      {{
        "reader": {{
          "name": "mysqlreader",
          "parameter": {{
            "username": "root",
            "password": "",
            "column": ["`id`", "`name`", "score"],
            "splitPk": "id",
            "where": "score < 50",
            "connection": [
              {{ "table": ["user_[00-01]"], "jdbcUrl": ["jdbc:mysql://{my_addr}/{a}?useUnicode=true&characterEncoding=utf8"] }},
              {{ "table": ["user_[02-03]"], "jdbcUrl": ["jdbc:mysql://{my_addr}/{b}"] }}
            ]
          }}
        }},
        "writer": {{
          "name": "postgresqlwriter",
          "parameter": {{
            "username": "postgres",
            "password": "",
            "column": ["id", "name", "score"],
            "preSql": ["delete from @table"],
            "postSql": ["insert into audit values ('loaded @table')"],
            "connection": [
              {{ "jdbcUrl": "jdbc:postgresql://{pg_addr}/{pg}", "table": ["public.users"] }}
            ]
          }}
        }}
      }}
    ]
  }}
}}"#,
        a = a.name,
        b = b.name,
        pg = pg.name
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, "mysql2pg.json", &job);
    let summary = sync_json(&["run", "--datax", &path, "--verify"]);
    let t = &summary["tables"][0];
    // score < 50: seq % 100 < 50 for seq in 1..=250 is 149 per shard (1..49, 100..149, 200..249).
    assert_eq!(t["rows_written"], 4 * 149, "{summary}");
    assert_eq!(t["verify"]["ok"], true, "{summary}");
    assert_eq!(
        pg.sql("SELECT count(*), max(score), count(*) FILTER (WHERE id = 424242) FROM users")
            .trim(),
        "596\t49\t0"
    );
    assert_eq!(
        pg.sql("SELECT what FROM audit").trim(),
        "loaded public.users"
    );
}

#[test]
fn a_datax_job_writes_and_reads_text_files() {
    let (my_addr, pg_addr) = (mariadb_addr(), postgres_addr());
    let my = MyDb::new();
    let pg = PgDb::new();
    pg.sql("CREATE TABLE src (id integer PRIMARY KEY, title text, price numeric(8,2), day date)");
    pg.sql(
        "INSERT INTO src SELECT g, 'title, \"quoted\" ' || g, g / 4.0, DATE '2026-01-01' + g \
         FROM generate_series(1, 300) g",
    );
    my.sql("CREATE TABLE dst (id INT PRIMARY KEY, title TEXT, price DECIMAL(8,2), day DATE)");
    let files = tempfile::tempdir().expect("tempdir");
    let out_job = format!(
        r#"{{"job": {{"setting": {{"speed": {{"channel": 1}}}}, "content": [{{
  "reader": {{"name": "postgresqlreader", "parameter": {{"username": "postgres",
     "column": ["*"], "connection": [{{"jdbcUrl": ["jdbc:postgresql://{pg_addr}/{pg}"], "table": ["src"]}}]}}}},
  "writer": {{"name": "txtfilewriter", "parameter": {{"path": "{dir}", "fileName": "src",
     "writeMode": "truncate", "fieldDelimiter": ",", "compress": "gzip", "encoding": "UTF-8"}}}}
}}]}}}}"#,
        pg = pg.name,
        dir = files.path().display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let s = sync_json(&["run", "--datax", &write(&dir, "out.json", &out_job)]);
    assert_eq!(s["tables"][0]["rows_written"], 300, "{s}");
    let data = files.path().join("src.csv.gz");
    assert!(data.exists(), "{}", data.display());

    let in_job = format!(
        r#"{{"job": {{"content": [{{
  "reader": {{"name": "txtfilereader", "parameter": {{"path": ["{file}"], "column": ["*"],
     "fieldDelimiter": ",", "compress": "gzip", "skipHeader": true}}}},
  "writer": {{"name": "mysqlwriter", "parameter": {{"username": "root", "writeMode": "replace",
     "connection": [{{"jdbcUrl": "jdbc:mysql://{my_addr}/{my}", "table": ["dst"]}}]}}}}
}}]}}}}"#,
        file = data.display(),
        my = my.name
    );
    let s = sync_json(&["run", "--datax", &write(&dir, "in.json", &in_job)]);
    assert_eq!(s["tables"][0]["rows_written"], 300, "{s}");
    let back = my.sql("SELECT id, title, price, day FROM dst ORDER BY id");
    let orig = pg.sql("SELECT id, title, price, day FROM src ORDER BY id");
    assert_eq!(back, orig);
    assert_eq!(back.lines().count(), 300);
}

#[test]
fn unsupported_datax_plugins_and_parameters_name_their_json_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = |reader: &str, param: &str| {
        format!(
            r#"{{"job": {{"content": [{{
  "reader": {{"name": "{reader}", "parameter": {{"username": "root", {param}
     "connection": [{{"jdbcUrl": ["jdbc:mysql://127.0.0.1:3306/x"], "table": ["t"]}}]}}}},
  "writer": {{"name": "postgresqlwriter", "parameter": {{"username": "postgres",
     "connection": [{{"jdbcUrl": "jdbc:postgresql://127.0.0.1:5432/y", "table": ["t"]}}]}}}}
}}]}}}}"#
        )
    };
    for (i, (reader, param, path)) in [
        ("hdfsreader", "", "job.content[0].reader.name"),
        (
            "mysqlreader",
            r#""session": ["set names gbk"],"#,
            "job.content[0].reader.parameter.session",
        ),
        (
            "mysqlreader",
            r#""column": ["id", "'const'"],"#,
            "job.content[0].reader.parameter.column[1]",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path_file = write(&dir, &format!("bad{i}.json"), &job(reader, param));
        let err = sync_fails(&["run", "--datax", &path_file]);
        assert!(err.contains(path), "{path}: {err}");
    }
    let err = sync_fails(&["run", "--datax", &write(&dir, "broken.json", "{\"job\": ")]);
    assert!(err.contains("broken.json"), "{err}");
}
