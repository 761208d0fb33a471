//! PostgreSQL → bus, end to end: the PostgreSQL source inside the delivery loop
//! (`qanat_cdc::pipeline::run`) against a real `qanat broker` and a private PostgreSQL
//! server. A seeded random workload (inserts, updates including primary-key changes, deletes,
//! multi-row transactions, ADD/DROP COLUMN) runs while the connector is aborted mid-flight
//! and reopened from its stored position several times, and the broker is SIGKILLed and
//! restarted once. Then the topics, applied in order, must reproduce the tables row for row.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cdc_replay_support;
mod postgres_support;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use qanat_cdc::pipeline::{self, PipelineConfig};
use qanat_cdc::postgres::{PostgresConfig, PostgresSource};
use rand::{Rng, SeedableRng};
use rdkafka::message::Message;
use serde_json::Value as Json;

use cdc_replay_support::{read_until_marker, reader, replay, source_rows, Image};

/// Runs one random transaction on t_a / t_b.
async fn random_transaction(
    db: &tokio_postgres::Client,
    rng: &mut rand::rngs::StdRng,
    next_id: &mut i32,
    has_extra: bool,
) {
    let mut sql = String::from("BEGIN;");
    for _ in 0..rng.random_range(1..5) {
        let id = rng.random_range(1..*next_id);
        match rng.random_range(0..12) {
            0..=3 => sql.push_str(&format!(
                "UPDATE t_a SET v = v + 1, note = md5(random()::text) WHERE id = {id};"
            )),
            4..=5 => {
                sql.push_str(&format!(
                    "INSERT INTO t_a (id, v, note) VALUES ({n}, {n}, NULL); \
                     INSERT INTO t_b (k, s) VALUES ({n}, 'b{n}');",
                    n = *next_id
                ));
                *next_id += 1;
            }
            6 => {
                sql.push_str(&format!(
                    "UPDATE t_a SET id = {} WHERE id = {id};",
                    *next_id
                ));
                *next_id += 1;
            }
            7 => sql.push_str(&format!("DELETE FROM t_a WHERE id = {id};")),
            8 => sql.push_str(&format!("DELETE FROM t_b WHERE k = {id};")),
            9 if has_extra => {
                sql.push_str(&format!("UPDATE t_a SET extra = 'x{id}' WHERE id = {id};"))
            }
            _ => sql.push_str(&format!("UPDATE t_b SET s = s || '.' WHERE k = {id};")),
        }
    }
    sql.push_str("COMMIT;");
    db.batch_execute(&sql).await.expect("workload transaction");
}

fn assert_same(
    table: &str,
    replayed: &BTreeMap<i64, Image>,
    source: &BTreeMap<i64, Image>,
    seed: u64,
) {
    let replayed_keys: Vec<&i64> = replayed.keys().collect();
    let source_keys: Vec<&i64> = source.keys().collect();
    assert_eq!(
        replayed_keys, source_keys,
        "{table}: keys differ (seed {seed})"
    );
    for (id, row) in source {
        let image = &replayed[id];
        for (column, value) in row {
            // A row last written before ADD COLUMN has no such column: NULL in the source.
            let got = image.get(column).unwrap_or(&Json::Null);
            assert_eq!(got, value, "{table} {id}.{column} (seed {seed})");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_topics_reproduces_the_tables_across_crashes_and_a_broker_restart() {
    let seed: u64 = std::env::var("QANAT_CDC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (QANAT_CDC_SEED={seed} replays this case)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut broker = tokio::task::spawn_blocking(support::Broker::start)
        .await
        .expect("broker");
    let bootstrap = broker.bootstrap();
    let (url, db) = postgres_support::fresh_database("cdc_e2e").await;
    db.batch_execute(
        "CREATE TABLE t_a (id int PRIMARY KEY, v int NOT NULL, note text);
         CREATE TABLE t_b (k int PRIMARY KEY, s text, w int DEFAULT 7);
         INSERT INTO t_a SELECT g, g, 'n' || g FROM generate_series(1, 200) g;
         INSERT INTO t_b (k, s) SELECT g, 's' || g FROM generate_series(1, 200) g;",
    )
    .await
    .expect("schema");
    let mut next_id = 201;

    let mut source_cfg = PostgresConfig::new(url.as_str(), "e2e");
    source_cfg.include = Some(r"public\.t_[ab]".into());
    source_cfg.status_interval = Duration::from_millis(100);
    let pipeline_cfg = PipelineConfig::new("e2e", &bootstrap);

    let start = |source_cfg: PostgresConfig, pipeline_cfg: PipelineConfig| async move {
        let state = pipeline::load_state(&pipeline_cfg)
            .await
            .expect("load state");
        let position = state.position().cloned();
        let source = PostgresSource::open(&source_cfg, position.as_ref())
            .await
            .expect("open source");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            pipeline::run(source, &pipeline_cfg, &state, async {
                let _ = stop_rx.await;
            })
            .await
        });
        (position, task, stop_tx)
    };

    let mut has_extra = false;
    for round in 0..5 {
        let (position, mut task, mut _stop) = start(source_cfg.clone(), pipeline_cfg.clone()).await;
        println!("round {round}: started from {position:?}");
        match round {
            1 => {
                db.batch_execute("ALTER TABLE t_a ADD COLUMN extra text")
                    .await
                    .expect("add column");
                has_extra = true;
            }
            3 => db
                .batch_execute("ALTER TABLE t_b DROP COLUMN w")
                .await
                .expect("drop column"),
            _ => {}
        }
        for _ in 0..rng.random_range(10..30) {
            random_transaction(&db, &mut rng, &mut next_id, has_extra).await;
        }
        if round == 2 {
            let mut b = broker;
            broker = tokio::task::spawn_blocking(move || {
                b.kill9();
                b.start_again();
                b
            })
            .await
            .expect("broker restart");
            for _ in 0..5 {
                random_transaction(&db, &mut rng, &mut next_id, has_extra).await;
            }
        }
        // Crash somewhere after some progress was stored (never a graceful stop).
        let deadline = Instant::now() + support::DEADLINE;
        loop {
            let stored = pipeline::load_state(&pipeline_cfg)
                .await
                .ok()
                .and_then(|s| s.position().cloned());
            if stored.is_some() && stored != position {
                break;
            }
            if task.is_finished() {
                // The loop gives up when the bus is gone for too long; a supervisor (here:
                // the test) starts the connector again from its stored position.
                let outcome = (&mut task).await;
                assert_eq!(
                    round, 2,
                    "connector stopped outside the broker restart: {outcome:?}"
                );
                println!("round {round}: connector stopped ({outcome:?}); starting it again");
                (_, task, _stop) = start(source_cfg.clone(), pipeline_cfg.clone()).await;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no progress stored"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for _ in 0..rng.random_range(0..10) {
            random_transaction(&db, &mut rng, &mut next_id, has_extra).await;
        }
        task.abort();
        let _ = task.await;
    }

    // Last run: quiet after one final transaction with the end markers.
    let (_, task, stop) = start(source_cfg.clone(), pipeline_cfg.clone()).await;
    db.batch_execute(
        "BEGIN; INSERT INTO t_a (id, v) VALUES (-1, 0); INSERT INTO t_b (k, s) VALUES (-1, 'end'); COMMIT;",
    )
    .await
    .expect("markers");
    let b = bootstrap.clone();
    let (events_a, events_b) = tokio::task::spawn_blocking(move || {
        (
            read_until_marker(&b, "cdc.public.t_a", "id"),
            read_until_marker(&b, "cdc.public.t_b", "k"),
        )
    })
    .await
    .expect("consume");
    let _ = stop.send(());
    task.await.expect("join").expect("clean shutdown");

    println!(
        "{} events on cdc.public.t_a, {} on cdc.public.t_b",
        events_a.len(),
        events_b.len()
    );
    assert_same(
        "t_a",
        &replay(&events_a, "id"),
        &source_rows(&db, "t_a", "id").await,
        seed,
    );
    assert_same(
        "t_b",
        &replay(&events_b, "k"),
        &source_rows(&db, "t_b", "k").await,
        seed,
    );
    drop(broker);
}

/// `qanat cdc --source postgres://…`: streams into the broker, survives `kill -9` (resuming
/// from the stored position, nothing missing), and a wal_level=replica server makes it exit
/// non-zero with the setting named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qanat_cdc_streams_postgres_and_resumes_after_kill_9() {
    let broker = tokio::task::spawn_blocking(support::Broker::start)
        .await
        .expect("broker");
    let bootstrap = broker.bootstrap();
    let (url, db) = postgres_support::fresh_database("cdc_cmd").await;
    db.batch_execute(
        "CREATE TABLE t_cmd (id int PRIMARY KEY, v text);
         INSERT INTO t_cmd VALUES (1, 'snapshot');",
    )
    .await
    .expect("schema");
    let args = [
        "cdc",
        "--source",
        url.as_str(),
        "--bootstrap",
        bootstrap.as_str(),
        "--name",
        "pgcmd",
        "--tables",
        r"public\.t_cmd",
    ];
    let mut first = support::qanat_spawn(&args);
    first.wait_line("qanat cdc connector pgcmd streaming");
    db.batch_execute("INSERT INTO t_cmd VALUES (2, 'streamed')")
        .await
        .expect("insert");
    let b = bootstrap.clone();
    tokio::task::spawn_blocking(move || read_until_id(&b, "cdc.public.t_cmd", 2))
        .await
        .expect("consume");
    first.kill9();
    db.batch_execute(
        "INSERT INTO t_cmd VALUES (3, 'while down'); INSERT INTO t_cmd VALUES (-1, 'end')",
    )
    .await
    .expect("insert while down");
    let mut second = support::qanat_spawn(&args);
    second.wait_line("qanat cdc connector pgcmd streaming");
    let b = bootstrap.clone();
    let events =
        tokio::task::spawn_blocking(move || read_until_marker(&b, "cdc.public.t_cmd", "id"))
            .await
            .expect("consume");
    let replayed = replay(&events, "id");
    assert_eq!(
        replayed.keys().copied().collect::<Vec<_>>(),
        vec![-1, 1, 2, 3],
        "every row, once the topic is applied"
    );
    assert_eq!(events[0]["op"], "r");
    assert_eq!(events[0]["source"]["connector"], "postgresql");
    assert_eq!(events[0]["source"]["snapshot"], "last");
    drop(second);

    let replica =
        tokio::task::spawn_blocking(|| postgres_support::PgServer::start(&["wal_level=replica"]))
            .await
            .expect("replica server");
    let out = support::qanat(&[
        "cdc",
        "--source",
        &replica.url("postgres"),
        "--bootstrap",
        &bootstrap,
        "--name",
        "pgreplica",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    assert!(
        stderr.contains("wal_level") && stderr.contains("logical"),
        "{stderr}"
    );
}

fn read_until_id(bootstrap: &str, topic: &str, id: i64) {
    let consumer = reader(bootstrap, topic);
    let deadline = Instant::now() + support::DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "id {id} never reached {topic}");
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            if let Some(payload) = message.payload() {
                let value: Json = serde_json::from_slice(payload).expect("event JSON");
                if value["after"]["id"] == id {
                    return;
                }
            }
        }
    }
}
