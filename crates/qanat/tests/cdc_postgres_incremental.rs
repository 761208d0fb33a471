//! PostgreSQL incremental snapshot of a running connector (`qanat cdc snapshot --config …`):
//! a streaming-only `qanat cdc` connector is asked, through its signal table, to snapshot two
//! tables (and one without a primary key, which it skips) while a seeded random workload
//! writes to them. The connector is `kill -9`ed once a stored position shows the snapshot
//! half done, and started again. Afterwards the topics, applied in order, must reproduce the
//! tables row for row, and the slot must not be confirmed past the stored position.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cdc_replay_support;
mod postgres_support;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qanat_cdc::pipeline::{self, PipelineConfig};
use rand::{Rng, SeedableRng};
use serde_json::Value as Json;

use cdc_replay_support::{read_until_marker, replay, source_rows};

const READY: &str = "qanat cdc connector incr streaming";

/// One random transaction on t_a / t_b: updates (some of the primary key), inserts, deletes.
async fn random_transaction(
    db: &tokio_postgres::Client,
    rng: &mut rand::rngs::StdRng,
    next_id: &mut i32,
) {
    let mut sql = String::from("BEGIN;");
    for _ in 0..rng.random_range(1..5) {
        let id = rng.random_range(1..*next_id);
        match rng.random_range(0..10) {
            0..=3 => sql.push_str(&format!(
                "UPDATE t_a SET v = v + 1, note = md5(random()::text) WHERE id = {id};"
            )),
            4 => {
                sql.push_str(&format!(
                    "INSERT INTO t_a (id, v, note) VALUES ({n}, {n}, NULL); \
                     INSERT INTO t_b (k, s) VALUES ({n}, 'b{n}');",
                    n = *next_id
                ));
                *next_id += 1;
            }
            5 => {
                sql.push_str(&format!(
                    "UPDATE t_a SET id = {} WHERE id = {id};",
                    *next_id
                ));
                *next_id += 1;
            }
            6 => sql.push_str(&format!("DELETE FROM t_a WHERE id = {id};")),
            7 => sql.push_str(&format!("DELETE FROM t_b WHERE k = {id};")),
            _ => sql.push_str(&format!("UPDATE t_b SET s = s || '.' WHERE k = {id};")),
        }
    }
    sql.push_str("COMMIT;");
    db.batch_execute(&sql).await.expect("workload transaction");
}

/// The connector's stored position, as JSON.
async fn stored(pipeline_cfg: &PipelineConfig) -> Option<Json> {
    pipeline::load_state(pipeline_cfg)
        .await
        .ok()
        .and_then(|s| s.position().map(|p| p.0.clone()))
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("X/Y");
    (u64::from_str_radix(hi, 16).expect("hex") << 32) | u64::from_str_radix(lo, 16).expect("hex")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_connector_snapshots_signalled_tables_under_writes_and_a_kill_9() {
    let seed: u64 = std::env::var("QANAT_CDC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (QANAT_CDC_SEED={seed} replays this case)");
    let broker = tokio::task::spawn_blocking(support::Broker::start)
        .await
        .expect("broker");
    let bootstrap = broker.bootstrap();
    let (url, db) = postgres_support::fresh_database("cdc_incr").await;
    db.batch_execute(
        "CREATE TABLE t_a (id int PRIMARY KEY, v int NOT NULL, note text);
         CREATE TABLE t_b (k int PRIMARY KEY, s text);
         CREATE TABLE t_nopk (x int, y text);
         INSERT INTO t_a SELECT g, g, 'n' || g FROM generate_series(1, 3000) g;
         INSERT INTO t_b SELECT g, 's' || g FROM generate_series(1, 3000) g;
         INSERT INTO t_nopk SELECT g, 'y' FROM generate_series(1, 10) g;",
    )
    .await
    .expect("schema");

    // Streaming only: the rows already there reach the topics through the signalled snapshot.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "bootstrap = \"{bootstrap}\"\n[[connector]]\nname = \"incr\"\nsource = \"{url}\"\n\
             snapshot = \"never\"\nsnapshot_chunk = 40\ntables = ['public\\.t_.*']\n\
             signal_table = \"public.qanat_signal\"\n"
        ),
    )
    .expect("write cdc.toml");
    let config = config.display().to_string();
    let start = {
        let config = config.clone();
        move || {
            let mut p = support::qanat_spawn(&["cdc", "--config", &config]);
            p.wait_line(READY);
            p
        }
    };
    let mut cdc = tokio::task::spawn_blocking(start.clone())
        .await
        .expect("start");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let db = postgres_support::connect(&url).await;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut next_id = 3001;
            let mut transactions = 0u32;
            while !stop.load(Ordering::Relaxed) {
                random_transaction(&db, &mut rng, &mut next_id).await;
                transactions += 1;
            }
            transactions
        })
    };

    let signal = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            support::qanat(&[
                "cdc",
                "snapshot",
                "--config",
                &config,
                "--connector",
                "incr",
                "--table",
                "public.t_a",
                "--table",
                "public.t_b",
                "--table",
                "public.t_nopk",
            ])
        })
        .await
        .expect("signal")
    };
    assert!(
        signal.status.success(),
        "{}",
        String::from_utf8_lossy(&signal.stderr)
    );

    // Crash once a stored position shows a table partly read; the restarted connector
    // reads the chunk after the stored key again.
    let pipeline_cfg = PipelineConfig::new("incr", &bootstrap);
    let deadline = Instant::now() + support::DEADLINE;
    let at_kill = loop {
        let position = stored(&pipeline_cfg).await;
        if let Some(p) = position.filter(|p| p["incremental"]["last_key"].is_array()) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no stored position inside the incremental snapshot (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("kill -9 at {at_kill}");
    cdc.kill9();
    cdc = tokio::task::spawn_blocking(start.clone())
        .await
        .expect("restart");

    let deadline = Instant::now() + support::DEADLINE * 3;
    loop {
        let position = stored(&pipeline_cfg).await;
        if position
            .as_ref()
            .is_some_and(|p| p.get("incremental").is_none())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the incremental snapshot did not finish: stored {position:?} (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.await.expect("writer");
    println!("{transactions} transactions written during the snapshot");
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

    for (table, key, events) in [("t_a", "id", &events_a), ("t_b", "k", &events_b)] {
        let reads = events
            .iter()
            .filter(|e| e["op"] == "r" && e["source"]["snapshot"] == "incremental")
            .count();
        assert!(reads > 0, "no incremental snapshot reads of {table}");
        let replayed = replay(events, key);
        let source = source_rows(&db, table, key).await;
        assert_eq!(
            replayed.keys().collect::<Vec<_>>(),
            source.keys().collect::<Vec<_>>(),
            "{table}: keys differ (seed {seed})"
        );
        for (id, row) in &source {
            assert_eq!(
                replayed.get(id),
                Some(row),
                "{table} row {id} (seed {seed})"
            );
        }
    }

    // The slot is confirmed no further than the stored position.
    let position = stored(&pipeline_cfg).await.expect("a stored position");
    let stored_lsn = lsn(position["lsn"].as_str().expect("lsn"));
    let confirmed: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'qanat_incr'",
            &[],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(
        lsn(&confirmed) <= stored_lsn,
        "slot confirmed {confirmed}, stored {position}"
    );
    // The signal table is in the publication but never captured.
    let signal_published: bool = db
        .query_one(
            "SELECT count(*) = 1 FROM pg_publication_tables \
             WHERE pubname = 'qanat_incr' AND tablename = 'qanat_signal'",
            &[],
        )
        .await
        .expect("publication")
        .get(0);
    assert!(signal_published, "the signal table is published");
    cdc.kill9();
    drop(broker);
}
