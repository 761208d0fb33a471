//! The PostgreSQL CDC source against a real, private PostgreSQL server
//! (`postgres_support`: initdb + `wal_level=logical` on a free port).
//!
//! The source is driven directly through its contract (`Source::next` /
//! `Source::acknowledge`): each test plays the delivery loop, storing a position only after
//! it "published" everything before it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod postgres_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use qanat_cdc::event::{Op, Row, SnapshotMark, Value};
use qanat_cdc::postgres::{
    position_lsn, PostgresConfig, PostgresError, PostgresSource, SnapshotMode,
};
use qanat_cdc::source::{Change, Position, Source};
use rand::{Rng, SeedableRng};

use postgres_support::{connect, fresh_database, shared, PgServer, DEADLINE};

fn config(url: &str, name: &str) -> PostgresConfig {
    let mut config = PostgresConfig::new(url, name);
    config.include = Some(r"public\.t.*".into());
    config.status_interval = Duration::from_millis(100);
    config.heartbeat_interval = Duration::from_secs(2);
    config.snapshot_fetch_rows = 300;
    config.connect_attempts = 3;
    config
}

async fn next(source: &mut PostgresSource) -> Change {
    tokio::time::timeout(DEADLINE, source.next())
        .await
        .expect("a change before the deadline")
        .expect("the source fails")
}

/// Changes up to and including the first one `stop` accepts.
async fn collect_until(
    source: &mut PostgresSource,
    mut stop: impl FnMut(&Change) -> bool,
) -> Vec<Change> {
    let mut out = Vec::new();
    loop {
        let change = next(source).await;
        let done = stop(&change);
        out.push(change);
        if done {
            return out;
        }
    }
}

fn rows(changes: &[Change]) -> Vec<&qanat_cdc::event::ChangeEvent> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Row(e) => Some(&**e),
            _ => None,
        })
        .collect()
}

fn is_heartbeat(c: &Change) -> bool {
    matches!(c, Change::Heartbeat { .. })
}

fn resume_of(c: &Change) -> Option<&Position> {
    match c {
        Change::Commit {
            resume: Some(resume),
            ..
        }
        | Change::Heartbeat { resume, .. } => Some(resume),
        _ => None,
    }
}

async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("query pg_replication_slots")?;
    let text: Option<String> = row.get(0);
    text.and_then(|t| position_lsn(&Position(serde_json::json!({ "lsn": t }))).ok())
}

async fn wait_confirmed(client: &tokio_postgres::Client, slot: &str, lsn: u64) {
    let started = Instant::now();
    loop {
        let confirmed = confirmed_flush(client, slot).await;
        if confirmed == Some(lsn) {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "slot {slot} confirmed {confirmed:?}, waiting for {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_slot_inactive(client: &tokio_postgres::Client, slot: &str) {
    let started = Instant::now();
    loop {
        let active: bool = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query slot")
            .is_some_and(|r| r.get(0));
        if !active {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "slot {slot} stays active");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const TYPES_TABLE: &str = "
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE t_types (
  id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, num numeric(30,10), num_any numeric,
  f4 float4, f8 float8, b bool, t text, vc varchar(10), ch char(4), by bytea, d date,
  tm time(6), ttz timetz, ts timestamp(6), tstz timestamptz, iv interval, u uuid, j json,
  jb jsonb, bits bit(4), vbits varbit, ai int[], at text[], m mood, am mood[]
)";

/// Three rows with ids `base+1..=base+3`: extremes, all NULL, special values and empties.
fn types_insert(base: i32) -> String {
    format!(
        "INSERT INTO t_types VALUES
         ({a}, -32768, 2147483647, -9223372036854775808, '12345678901234567890.0123456789',
          'NaN', 1.1, 1e308, true, '', 'héllo', 'ab', '\\x00ff', '2026-11-29',
          '12:34:56.123456', '01:02:03.5+02', '2026-11-29 12:34:56.000001',
          '2026-01-01 01:00:00+05:30', '1 year 2 months 3 days 04:05:06.5',
          'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"a\": [1, 2.50]}}', '{{\"b\": 1, \"a\": \"x\"}}',
          B'1010', B'101', '{{1,NULL,3}}', '{{\"a,b\",\"\",NULL,\"NULL\"}}', 'happy', '{{sad,happy}}'),
         ({b}, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
          NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
         ({c}, 0, -1, 9223372036854775807, '-0.0000000001', '1e-20', '-Infinity', 'NaN', false,
          'x', '', '', '\\x', 'infinity', '24:00:00', '23:59:59-01:30', '-infinity',
          '1999-12-31 23:59:59.999999-08', '-00:00:00.000001', '00000000-0000-0000-0000-000000000000',
          'null', '[]', B'0000', B'', '{{}}', '{{}}', 'sad', '{{}}')",
        a = base + 1,
        b = base + 2,
        c = base + 3
    )
}

fn expected_types_row(id: i32) -> Vec<(&'static str, Value)> {
    use Value::*;
    let s = |v: &str| v.to_owned();
    let names = [
        "id", "i2", "i4", "i8", "num", "num_any", "f4", "f8", "b", "t", "vc", "ch", "by", "d",
        "tm", "ttz", "ts", "tstz", "iv", "u", "j", "jb", "bits", "vbits", "ai", "at", "m", "am",
    ];
    let values: Vec<Value> = match id % 10 {
        1 => vec![
            Int(id.into()),
            Int(-32768),
            Int(2147483647),
            Int(i64::MIN),
            Decimal(s("12345678901234567890.0123456789")),
            Decimal(s("NaN")),
            Float(1.1),
            Float(1e308),
            Bool(true),
            Text(s("")),
            Text(s("héllo")),
            Text(s("ab  ")),
            Bytes(vec![0, 255]),
            Date(s("2026-11-29")),
            Time(s("12:34:56.123456")),
            Time(s("23:02:03.5Z")),
            DateTime(s("2026-11-29T12:34:56.000001")),
            Timestamp(s("2025-12-31T19:30:00Z")),
            Text(s("P1Y2M3DT4H5M6.5S")),
            Text(s("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
            Json(s(r#"{"a": [1, 2.50]}"#)),
            Json(s(r#"{"a": "x", "b": 1}"#)),
            Text(s("1010")),
            Text(s("101")),
            Array(vec![Int(1), Null, Int(3)]),
            Array(vec![Text(s("a,b")), Text(s("")), Null, Text(s("NULL"))]),
            Text(s("happy")),
            Array(vec![Text(s("sad")), Text(s("happy"))]),
        ],
        2 => std::iter::once(Int(id.into()))
            .chain(std::iter::repeat_n(Null, 27))
            .collect(),
        _ => vec![
            Int(id.into()),
            Int(0),
            Int(-1),
            Int(i64::MAX),
            Decimal(s("-0.0000000001")),
            Decimal(s("0.00000000000000000001")),
            Float(f64::NEG_INFINITY),
            Float(f64::NAN),
            Bool(false),
            Text(s("x")),
            Text(s("")),
            Text(s("    ")),
            Bytes(vec![]),
            Date(s("infinity")),
            Time(s("24:00:00")),
            Time(s("01:29:59Z")),
            DateTime(s("-infinity")),
            Timestamp(s("2000-01-01T07:59:59.999999Z")),
            Text(s("PT-0.000001S")),
            Text(s("00000000-0000-0000-0000-000000000000")),
            Json(s("null")),
            Json(s("[]")),
            Text(s("0000")),
            Text(s("")),
            Array(vec![]),
            Array(vec![]),
            Text(s("sad")),
            Array(vec![]),
        ],
    };
    names.into_iter().zip(values).collect()
}

/// Debug text compares NaN equal to NaN and keeps the variant (Decimal vs Text, …).
fn assert_row(row: &Row, expected: &[(&str, Value)]) {
    let got: Vec<String> = row
        .columns
        .iter()
        .map(|(n, v)| format!("{n}={v:?}"))
        .collect();
    let want: Vec<String> = expected.iter().map(|(n, v)| format!("{n}={v:?}")).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn every_type_decodes_exactly_in_snapshot_and_stream() {
    let (url, db) = fresh_database("cdc_types").await;
    db.batch_execute(TYPES_TABLE).await.expect("create");
    db.batch_execute(&types_insert(0)).await.expect("insert");

    let mut source = PostgresSource::open(&config(&url, "types"), None)
        .await
        .expect("open");
    let snapshot = collect_until(&mut source, is_heartbeat).await;
    let schema = snapshot
        .iter()
        .find_map(|c| match c {
            Change::Schema(s) => Some(s),
            _ => None,
        })
        .expect("a schema change before the snapshot rows");
    assert_eq!(schema.table, "t_types");
    assert_eq!(schema.primary_key, vec!["id".to_string()]);
    let columns = schema.columns.as_ref().expect("columns");
    assert_eq!(columns[4].type_name, "numeric(30,10)");
    assert_eq!(columns[27].type_name, "mood[]");
    assert!(!columns[0].nullable && columns[1].nullable);

    let read = rows(&snapshot);
    assert_eq!(read.len(), 3);
    for (i, event) in read.iter().enumerate() {
        assert_eq!(event.op, Op::Read);
        let mark = if i == 2 {
            SnapshotMark::Last
        } else {
            SnapshotMark::Yes
        };
        assert_eq!(event.source.snapshot, mark);
        let id = i as i32 + 1;
        assert_row(
            event.after.as_ref().expect("after"),
            &expected_types_row(id),
        );
        assert_eq!(
            event.key_json(),
            Some(serde_json::json!({ "id": id })),
            "key is the primary key"
        );
    }

    db.batch_execute(&format!("BEGIN; {}; COMMIT", types_insert(10)))
        .await
        .expect("insert streamed rows");
    let mut streamed = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
    streamed.retain(|c| !is_heartbeat(c));
    assert!(
        matches!(streamed.first(), Some(Change::Begin { .. })),
        "{streamed:?}"
    );
    let created = rows(&streamed);
    assert_eq!(created.len(), 3);
    for (i, event) in created.iter().enumerate() {
        assert_eq!(event.op, Op::Create);
        assert_eq!(event.source.snapshot, SnapshotMark::No);
        assert!(event.source.lsn.is_some() && event.source.tx_id.is_some());
        assert_row(
            event.after.as_ref().expect("after"),
            &expected_types_row(i as i32 + 11),
        );
    }
    let Some(Change::Commit { counts, .. }) = streamed.last() else {
        panic!("ends with a commit")
    };
    assert_eq!(counts.get("public.t_types"), Some(&3));
}

#[tokio::test]
async fn snapshot_hands_over_to_the_stream_under_concurrent_writes() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let (url, db) = fresh_database("cdc_handover").await;
    db.batch_execute(
        "CREATE TABLE t_acct (id int PRIMARY KEY, v int NOT NULL, note text);
         INSERT INTO t_acct SELECT g, 0, 'row ' || g FROM generate_series(1, 3000) g;",
    )
    .await
    .expect("create");

    let writer_url = url.clone();
    let writer = tokio::spawn(async move {
        let client = connect(&writer_url).await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut next_id = 3001;
        for _ in 0..400 {
            let mut sql = String::from("BEGIN;");
            for _ in 0..rng.random_range(1..4) {
                let id = rng.random_range(1..next_id);
                match rng.random_range(0..10) {
                    0..=4 => sql.push_str(&format!("UPDATE t_acct SET v = v + 1 WHERE id = {id};")),
                    5..=6 => {
                        sql.push_str(&format!("INSERT INTO t_acct VALUES ({next_id}, 0, NULL);"));
                        next_id += 1;
                    }
                    7 => sql.push_str(&format!(
                        "UPDATE t_acct SET id = {next_id} WHERE id = {id};"
                    )),
                    _ => sql.push_str(&format!("DELETE FROM t_acct WHERE id = {id};")),
                }
                if sql.contains(&format!("SET id = {next_id}")) {
                    next_id += 1;
                }
            }
            sql.push_str("COMMIT;");
            client
                .batch_execute(&sql)
                .await
                .expect("writer transaction");
        }
        client
            .batch_execute("INSERT INTO t_acct VALUES (-1, 0, 'end')")
            .await
            .expect("end marker");
    });
    // Let the writer get going before the slot and its snapshot are created.
    let started = Instant::now();
    loop {
        let n: i64 = db
            .query_one("SELECT count(*) FROM t_acct WHERE v > 0 OR id > 3000", &[])
            .await
            .expect("count")
            .get(0);
        if n >= 5 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "writer makes no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut source = PostgresSource::open(&config(&url, "handover"), None)
        .await
        .expect("open");
    let mut table: BTreeMap<i64, String> = BTreeMap::new();
    let id_of = |row: &Row| match row.get("id") {
        Some(Value::Int(i)) => *i,
        other => panic!("id {other:?}"),
    };
    let deadline = Instant::now() + DEADLINE * 2;
    'outer: loop {
        assert!(Instant::now() < deadline, "end marker never streamed");
        let change = next(&mut source).await;
        if let Change::Row(event) = change {
            if let Some(before) = &event.before {
                table.remove(&id_of(before));
            }
            match event.op {
                Op::Delete => {}
                _ => {
                    let after = event.after.as_ref().expect("after");
                    let id = id_of(after);
                    table.insert(id, format!("{:?}", after.to_json()));
                    if id == -1 {
                        break 'outer;
                    }
                }
            }
        }
    }
    writer.await.expect("writer");
    let expected: BTreeMap<i64, String> = db
        .query("SELECT id, v, note FROM t_acct", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| {
            let id: i32 = r.get(0);
            let v: i32 = r.get(1);
            let note: Option<String> = r.get(2);
            let json = serde_json::json!({ "id": id, "v": v, "note": note });
            (i64::from(id), format!("{json:?}"))
        })
        .collect();
    assert_eq!(table.len(), expected.len(), "row count (seed {seed})");
    assert_eq!(table, expected, "replayed table differs (seed {seed})");
}

#[tokio::test]
async fn acknowledge_alone_advances_the_slot_and_heartbeats_keep_it_moving() {
    let (url, db) = fresh_database("cdc_ack").await;
    db.batch_execute(
        "CREATE TABLE t_ack (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY);",
    )
    .await
    .expect("create");
    let mut cfg = config(&url, "ack");
    cfg.snapshot = SnapshotMode::Never;
    // Long enough that a heartbeat past the last commit can only come from the server's WAL
    // position, not from the idle timer.
    cfg.heartbeat_interval = Duration::from_secs(3600);
    let slot = cfg.slot_name();
    let mut source = PostgresSource::open(&cfg, None).await.expect("open");
    let first = next(&mut source).await;
    let created_at =
        position_lsn(resume_of(&first).expect("first change is a resume point")).expect("lsn");
    assert_eq!(confirmed_flush(&db, &slot).await, Some(created_at));

    db.batch_execute("INSERT INTO t_ack VALUES (1)")
        .await
        .expect("tx1");
    let c1 = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
    db.batch_execute("INSERT INTO t_ack VALUES (2)")
        .await
        .expect("tx2");
    let c2 = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
    let p1 = resume_of(c1.last().expect("commit"))
        .expect("resume")
        .clone();
    let p2 = resume_of(c2.last().expect("commit"))
        .expect("resume")
        .clone();
    let (l1, l2) = (
        position_lsn(&p1).expect("lsn"),
        position_lsn(&p2).expect("lsn"),
    );
    assert!(created_at < l1 && l1 < l2);
    // Both commits were read, neither acknowledged: the slot has not moved.
    assert_eq!(confirmed_flush(&db, &slot).await, Some(created_at));

    source.acknowledge(&p1).await.expect("ack 1");
    wait_confirmed(&db, &slot, l1).await;
    source.acknowledge(&p2).await.expect("ack 2");
    wait_confirmed(&db, &slot, l2).await;

    // Quiet for the publication: only a table outside it changes.
    db.batch_execute("INSERT INTO other SELECT generate_series(1, 100)")
        .await
        .expect("write outside the publication");
    let wal_now: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("wal lsn")
        .get(0);
    let wal_now = position_lsn(&Position(serde_json::json!({ "lsn": wal_now }))).expect("lsn");
    let beats = collect_until(&mut source, |c| {
        matches!(c, Change::Heartbeat { resume, .. } if position_lsn(resume).is_ok_and(|l| l >= wal_now))
    })
    .await;
    assert!(rows(&beats).is_empty(), "no row of the other table");
    let beat = resume_of(beats.last().expect("heartbeat"))
        .expect("resume")
        .clone();
    let beat_lsn = position_lsn(&beat).expect("lsn");
    assert!(beat_lsn > l2);
    source.acknowledge(&beat).await.expect("ack heartbeat");
    wait_confirmed(&db, &slot, beat_lsn).await;
}

#[tokio::test]
async fn restart_from_a_stored_position_replays_nothing_before_and_misses_nothing_after() {
    let (url, db) = fresh_database("cdc_restart").await;
    db.batch_execute("CREATE TABLE t_r (id int PRIMARY KEY, v text)")
        .await
        .expect("create");
    let cfg = config(&url, "restart");
    let slot = cfg.slot_name();
    let mut source = PostgresSource::open(&cfg, None).await.expect("open");
    let snapshot = collect_until(&mut source, is_heartbeat).await;
    assert!(rows(&snapshot).is_empty());

    db.batch_execute("INSERT INTO t_r VALUES (1, 'a')")
        .await
        .expect("tx1");
    let c1 = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
    let stored = resume_of(c1.last().expect("commit"))
        .expect("resume")
        .clone();
    source.acknowledge(&stored).await.expect("ack");
    wait_confirmed(&db, &slot, position_lsn(&stored).expect("lsn")).await;
    db.batch_execute(
        "BEGIN; INSERT INTO t_r VALUES (2, 'b'); UPDATE t_r SET v = 'A' WHERE id = 1; COMMIT",
    )
    .await
    .expect("tx2");
    let c2 = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
    assert_eq!(rows(&c2).len(), 2);
    drop(source);
    db.batch_execute("DELETE FROM t_r WHERE id = 2")
        .await
        .expect("tx3");
    wait_slot_inactive(&db, &slot).await;

    let mut source = PostgresSource::open(&cfg, Some(&stored))
        .await
        .expect("reopen");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match next(&mut source).await {
            Change::Row(event) => seen.push(format!(
                "{}:{}",
                event.op.code(),
                event.key_json().expect("key")
            )),
            Change::Heartbeat { .. } | Change::Begin { .. } | Change::Commit { .. } => {}
            Change::Schema(s) => assert_eq!(s.table, "t_r"),
        }
    }
    assert_eq!(
        seen,
        vec![r#"c:{"id":2}"#, r#"u:{"id":1}"#, r#"d:{"id":2}"#]
    );
}

#[tokio::test]
async fn a_dropped_slot_stops_with_the_slot_and_the_stored_position() {
    let (url, db) = fresh_database("cdc_dropped").await;
    db.batch_execute("CREATE TABLE t_d (id int PRIMARY KEY)")
        .await
        .expect("create");
    let mut cfg = config(&url, "dropped");
    cfg.snapshot = SnapshotMode::Never;
    let slot = cfg.slot_name();
    let mut source = PostgresSource::open(&cfg, None).await.expect("open");
    let first = next(&mut source).await;
    let stored = resume_of(&first).expect("resume").clone();
    drop(source);
    wait_slot_inactive(&db, &slot).await;
    db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");

    cfg.snapshot = SnapshotMode::Initial;
    let err = PostgresSource::open(&cfg, Some(&stored))
        .await
        .err()
        .expect("a dropped slot is an error");
    let message = err.to_string();
    assert!(matches!(err, PostgresError::SlotGone { .. }), "{message}");
    let lsn = stored.0["lsn"].as_str().expect("lsn text");
    assert!(
        message.contains(&slot) && message.contains(lsn),
        "{message}"
    );
    assert!(message.contains("when_needed"), "{message}");

    // when_needed recreates the slot and snapshots again.
    db.batch_execute("INSERT INTO t_d VALUES (7)")
        .await
        .expect("insert");
    cfg.snapshot = SnapshotMode::WhenNeeded;
    let mut source = PostgresSource::open(&cfg, Some(&stored))
        .await
        .expect("re-snapshot");
    let snapshot = collect_until(&mut source, is_heartbeat).await;
    let read = rows(&snapshot);
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].key_json(), Some(serde_json::json!({ "id": 7 })));
}

#[tokio::test]
async fn bad_credentials_are_refused_with_the_server_reason() {
    let (_, db) = fresh_database("cdc_login").await;
    db.batch_execute(
        "DROP ROLE IF EXISTS qanat_pw; CREATE ROLE qanat_pw LOGIN REPLICATION PASSWORD 'right'",
    )
    .await
    .expect("role");
    let url = format!(
        "postgres://qanat_pw:wrong@127.0.0.1:{}/cdc_login",
        shared().port
    );
    let err = PostgresSource::open(&config(&url, "login"), None)
        .await
        .err()
        .expect("a wrong password is refused");
    let message = err.to_string();
    assert!(matches!(err, PostgresError::Login { .. }), "{message}");
    assert!(
        message.contains("password authentication failed") && message.contains("qanat_pw"),
        "{message}"
    );
}

#[tokio::test]
async fn wal_level_replica_is_refused_naming_the_setting() {
    let server = tokio::task::spawn_blocking(|| PgServer::start(&["wal_level=replica"]))
        .await
        .expect("start server");
    let err = PostgresSource::open(&config(&server.url("postgres"), "replica"), None)
        .await
        .err()
        .expect("wal_level=replica is refused");
    let message = err.to_string();
    assert!(matches!(err, PostgresError::WalLevel { .. }), "{message}");
    assert!(
        message.contains("wal_level")
            && message.contains("'replica'")
            && message.contains("logical"),
        "{message}"
    );
}

#[tokio::test]
async fn column_changes_emit_a_schema_change_before_the_next_row() {
    let (url, db) = fresh_database("cdc_schema").await;
    db.batch_execute("CREATE TABLE t_s (id int PRIMARY KEY, a int)")
        .await
        .expect("create");
    let mut source = PostgresSource::open(&config(&url, "schema"), None)
        .await
        .expect("open");
    collect_until(&mut source, is_heartbeat).await;

    let steps = [
        ("ALTER TABLE t_s ADD COLUMN b text", "id int4,a int4,b text"),
        ("ALTER TABLE t_s DROP COLUMN a", "id int4,b text"),
        (
            "ALTER TABLE t_s ALTER COLUMN b TYPE varchar(20)",
            "id int4,b character varying(20)",
        ),
        (
            "ALTER TABLE t_s RENAME COLUMN b TO c",
            "id int4,c character varying(20)",
        ),
    ];
    for (i, (ddl, columns)) in steps.into_iter().enumerate() {
        db.batch_execute(ddl).await.expect("alter");
        db.execute("INSERT INTO t_s (id) VALUES ($1)", &[&(i as i32)])
            .await
            .expect("insert");
        let changes = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
        let schema_at = changes
            .iter()
            .position(|c| matches!(c, Change::Schema(_)))
            .unwrap_or_else(|| panic!("no schema change after {ddl}: {changes:?}"));
        let row_at = changes
            .iter()
            .position(|c| matches!(c, Change::Row(_)))
            .expect("the row");
        assert!(schema_at < row_at, "schema change comes first");
        let Change::Schema(schema) = &changes[schema_at] else {
            unreachable!()
        };
        let described: Vec<String> = schema
            .columns
            .as_ref()
            .expect("columns")
            .iter()
            .map(|c| {
                let ty = match c.type_name.as_str() {
                    "integer" => "int4",
                    other => other,
                };
                format!("{} {ty}", c.name)
            })
            .collect();
        assert_eq!(described.join(","), columns, "after {ddl}");
        let Change::Row(row) = &changes[row_at] else {
            unreachable!()
        };
        let names: Vec<&str> = row
            .after
            .as_ref()
            .expect("after")
            .columns
            .iter()
            .map(|(n, _)| &**n)
            .collect();
        let expected: Vec<&str> = columns
            .split(',')
            .map(|c| c.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(
            names, expected,
            "row decoded with the new columns after {ddl}"
        );
    }
}

#[tokio::test]
async fn truncate_is_one_truncate_event_per_captured_table() {
    let (url, db) = fresh_database("cdc_truncate").await;
    db.batch_execute(
        "CREATE TABLE t_ta (id int PRIMARY KEY, v int);
         CREATE TABLE t_tb (id int PRIMARY KEY);
         CREATE TABLE other_tc (id int PRIMARY KEY);
         INSERT INTO t_ta VALUES (1, 1), (2, 2); INSERT INTO t_tb VALUES (1);",
    )
    .await
    .expect("tables");
    let mut source = PostgresSource::open(&config(&url, "truncate"), None)
        .await
        .expect("open");
    collect_until(&mut source, is_heartbeat).await;

    db.batch_execute(
        "BEGIN; INSERT INTO t_ta VALUES (3, 3);
         TRUNCATE t_ta, t_tb, other_tc;
         INSERT INTO t_ta VALUES (4, 4); COMMIT;",
    )
    .await
    .expect("truncate");
    let changes = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
    let events = rows(&changes);
    let summary: Vec<(Op, String)> = events
        .iter()
        .map(|e| (e.op, e.source.table.to_string()))
        .collect();
    assert_eq!(
        summary,
        [
            (Op::Create, "t_ta".to_string()),
            (Op::Truncate, "t_ta".to_string()),
            (Op::Truncate, "t_tb".to_string()),
            (Op::Create, "t_ta".to_string()),
        ],
        "the excluded table gives no event"
    );
    let truncate = events[1];
    assert!(truncate.before.is_none() && truncate.after.is_none());
    assert!(truncate.key.columns.is_empty(), "no record key");
    assert_eq!(truncate.op.code(), "t");
    assert!(truncate.source.lsn.is_some_and(|l| l > 0));
    assert_eq!(
        truncate.source.tx_id, events[0].source.tx_id,
        "same transaction"
    );
    let Some(Change::Commit { counts, .. }) = changes.last() else {
        unreachable!()
    };
    assert_eq!(counts.get("public.t_ta"), Some(&3));
    assert_eq!(counts.get("public.t_tb"), Some(&1));
}

#[tokio::test]
async fn unchanged_toasted_values_never_become_null() {
    let (url, db) = fresh_database("cdc_toast").await;
    db.batch_execute(
        "CREATE TABLE t_toast (id int PRIMARY KEY, big text, n int);
         ALTER TABLE t_toast ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO t_toast VALUES (1, repeat('x', 10000), 0);",
    )
    .await
    .expect("create");
    let mut source = PostgresSource::open(&config(&url, "toast"), None)
        .await
        .expect("open");
    collect_until(&mut source, is_heartbeat).await;
    let big = "x".repeat(10000);

    db.batch_execute("UPDATE t_toast SET n = 1")
        .await
        .expect("update");
    let changes = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
    let update = rows(&changes)[0];
    assert_eq!(
        update.after.as_ref().and_then(|r| r.get("big")),
        Some(&Value::Text(qanat_cdc::postgres::UNAVAILABLE_VALUE.into())),
        "default replica identity: the placeholder, not NULL"
    );

    db.batch_execute("ALTER TABLE t_toast REPLICA IDENTITY FULL; UPDATE t_toast SET n = 2")
        .await
        .expect("update with full identity");
    let changes = collect_until(&mut source, |c| matches!(c, Change::Commit { .. })).await;
    let update = rows(&changes)[0];
    assert_eq!(
        update.after.as_ref().and_then(|r| r.get("big")),
        Some(&Value::Text(big.clone())),
        "REPLICA IDENTITY FULL: filled from the old row"
    );
    assert_eq!(
        update.before.as_ref().and_then(|r| r.get("n")),
        Some(&Value::Int(1))
    );
}

#[tokio::test]
async fn an_unreachable_server_is_retried_then_reported_with_its_address() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut cfg = config(&format!("postgres://postgres@127.0.0.1:{port}/x"), "gone");
    cfg.connect_attempts = 2;
    let err = PostgresSource::open(&cfg, None)
        .await
        .err()
        .expect("nothing listens there");
    let message = err.to_string();
    assert!(
        matches!(err, PostgresError::Unreachable { attempts: 2, .. }),
        "{message}"
    );
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
}
