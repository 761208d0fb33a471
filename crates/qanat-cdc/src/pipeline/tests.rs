#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The loop over a scripted source against an in-process Qanat broker.

use std::sync::Arc;

use qanat_broker::{Broker, Config};
use qanat_log::{OsStorage, SystemClock};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;

use super::*;
use crate::event::{SourceInfo, Value};
use crate::source::Column;

#[derive(Debug, thiserror::Error)]
#[error("scripted")]
struct Never;

/// Emits its script, then a heartbeat at the last position now and then, as a quiet source
/// does; records what it was acknowledged.
struct Scripted {
    script: std::vec::IntoIter<Change>,
    acked: Arc<parking_lot::Mutex<Vec<Position>>>,
    idle: Position,
}

impl Source for Scripted {
    type Error = Never;
    async fn next(&mut self) -> Result<Change, Never> {
        match self.script.next() {
            Some(c) => Ok(c),
            None => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Change::Heartbeat {
                    resume: self.idle.clone(),
                    ts_ms: 3000,
                })
            }
        }
    }
    async fn acknowledge(&mut self, position: &Position) -> Result<(), Never> {
        self.acked.lock().push(position.clone());
        Ok(())
    }
}

async fn start_broker(dir: &std::path::Path) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = dir.to_path_buf();
    let broker = tokio::task::spawn_blocking(move || {
        Broker::open(
            Config::default(),
            &dir,
            Arc::new(OsStorage),
            Arc::new(SystemClock),
            ("127.0.0.1".to_string(), i32::from(port)),
        )
    })
    .await
    .unwrap()
    .unwrap();
    let broker = Arc::new(broker);
    let listeners = vec![qanat_broker::listener::Listener::plaintext(
        listener,
        ("127.0.0.1".to_string(), i32::from(port)),
    )];
    tokio::spawn(qanat_broker::serve(
        listeners,
        broker,
        std::future::pending(),
    ));
    format!("127.0.0.1:{port}")
}

fn row(cols: &[(&str, Value)]) -> Row {
    Row {
        columns: cols
            .iter()
            .map(|(n, v)| (Arc::from(*n), v.clone()))
            .collect(),
    }
}

fn event(op: Op, db: &str, table: &str, id: i64, email: &str) -> Change {
    let image = row(&[
        ("id", Value::Int(id)),
        ("email", Value::Text(email.into())),
        ("secret", Value::Text("s".into())),
    ]);
    let (before, after) = match op {
        Op::Delete => (Some(image), None),
        _ => (None, Some(image)),
    };
    Change::Row(Box::new(ChangeEvent {
        op,
        before,
        after,
        key: row(&[("id", Value::Int(id))]),
        source: SourceInfo {
            connector: "mysql",
            name: "t".into(),
            db: db.into(),
            table: table.into(),
            ts_ms: 1000,
            ..SourceInfo::default()
        },
        transaction: None,
    }))
}

fn snapshot_read(db: &str, table: &str, id: i64) -> Change {
    let mut change = event(Op::Read, db, table, id, "c@x");
    if let Change::Row(e) = &mut change {
        e.source.snapshot = SnapshotMark::Incremental;
    }
    change
}

fn read_all(bootstrap: &str, topic: &str, want: usize) -> Vec<(Option<Json>, Option<Json>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "pipeline-test")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let parse = |b: Option<&[u8]>| b.map(|b| serde_json::from_slice::<Json>(b).unwrap());
            out.push((parse(m.key()), parse(m.payload())));
        }
    }
    out
}

fn pos(n: u64) -> Position {
    Position(json!({ "n": n }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_shapes_orders_and_stores_positions() {
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = start_broker(dir.path()).await;
    let mut cfg = PipelineConfig::new("t", &bootstrap);
    cfg.routes.push(Route {
        pattern: anchored(r"shop_\d+\.order_\d{4}").unwrap(),
        topic: "cdc.shop.orders".into(),
    });
    cfg.exclude.push(anchored(r"shop_0\.audit").unwrap());
    cfg.exclude_columns.push(anchored(r".*\.secret").unwrap());
    cfg.masks.push(MaskRule {
        column: anchored(r"shop_\d+\.order_\d{4}\.email").unwrap(),
        mask: Mask::Hash {
            salt: "pepper".into(),
        },
    });
    cfg.masks.push(MaskRule {
        column: anchored(r"shop_0\.users\.email").unwrap(),
        mask: Mask::Fixed("***".into()),
    });
    cfg.tombstones = true;
    cfg.transaction_topic = Some("cdc.transaction".into());
    cfg.store_every_commits = 1;

    let schema = SchemaChange {
        db: "shop_0".into(),
        schema: None,
        table: "users".into(),
        ddl: Some("ALTER TABLE users ADD email text".into()),
        columns: Some(vec![Column {
            name: "id".into(),
            type_name: "int".into(),
            nullable: false,
        }]),
        primary_key: vec!["id".into()],
        position: pos(1),
    };
    let script = vec![
        Change::Begin {
            tx_id: "tx1".into(),
            ts_ms: 1000,
        },
        event(Op::Create, "shop_0", "order_0001", 1, "a@x"),
        event(Op::Create, "shop_1", "order_0002", 2, "a@x"),
        event(Op::Create, "shop_0", "audit", 3, "a@x"),
        event(Op::Create, "shop_0", "users", 4, "b@x"),
        Change::Commit {
            tx_id: "tx1".into(),
            counts: BTreeMap::new(),
            resume: Some(pos(2)),
        },
        Change::Schema(schema.clone()),
        Change::Begin {
            tx_id: "tx2".into(),
            ts_ms: 2000,
        },
        event(Op::Delete, "shop_0", "users", 4, "b@x"),
        // An incremental snapshot's chunk row, emitted inside the transaction that carried
        // its watermark: not one of tx2's changes.
        snapshot_read("shop_1", "users", 9),
        Change::Commit {
            tx_id: "tx2".into(),
            counts: BTreeMap::new(),
            resume: Some(pos(3)),
        },
        Change::Heartbeat {
            resume: pos(4),
            ts_ms: 3000,
        },
    ];
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let source = Scripted {
        script: script.into_iter(),
        acked: acked.clone(),
        idle: pos(4),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run_cfg = cfg.clone();
    let runner = tokio::spawn(async move {
        run(source, &run_cfg, &StoredState::default(), async {
            let _ = stop_rx.await;
        })
        .await
    });
    // The last resume point gets stored and acknowledged without a shutdown.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().last() != Some(&pos(4)) {
        assert!(
            Instant::now() < deadline,
            "position 4 never acknowledged: {:?}",
            acked.lock()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(()).unwrap();
    runner.await.unwrap().unwrap();

    // Sharded tables land in one topic with the physical table in `source`.
    let bs = bootstrap.clone();
    let orders = tokio::task::spawn_blocking(move || read_all(&bs, "cdc.shop.orders", 2))
        .await
        .unwrap();
    assert_eq!(orders.len(), 2);
    let tables: Vec<_> = orders
        .iter()
        .map(|(_, v)| {
            v.as_ref().unwrap()["source"]["table"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(tables, ["order_0001", "order_0002"]);
    let first = orders[0].1.as_ref().unwrap();
    assert!(
        first["after"].get("secret").is_none(),
        "excluded column present"
    );
    let mut h = Sha256::new();
    h.update(b"pepper\"a@x\"");
    assert_eq!(first["after"]["email"], hex::encode(h.finalize()));
    assert_eq!(first["transaction"]["id"], "tx1");
    assert_eq!(first["transaction"]["total_order"], 1);
    assert_eq!(orders[0].0, Some(json!({"id": 1})));

    // Users: create, delete, tombstone, in order; fixed mask.
    let bs = bootstrap.clone();
    let users = tokio::task::spawn_blocking(move || read_all(&bs, "cdc.shop_0.users", 3))
        .await
        .unwrap();
    assert_eq!(users.len(), 3);
    assert_eq!(users[0].1.as_ref().unwrap()["after"]["email"], "***");
    assert_eq!(users[1].1.as_ref().unwrap()["op"], "d");
    assert_eq!(users[2], (Some(json!({"id": 4})), None));

    // Transaction markers with per-table counts of what was published (audit excluded).
    let bs = bootstrap.clone();
    let markers = tokio::task::spawn_blocking(move || read_all(&bs, "cdc.transaction", 4))
        .await
        .unwrap();
    let end = markers[1].1.as_ref().unwrap();
    assert_eq!(end["status"], "END");
    assert_eq!(end["event_count"], 3);
    assert_eq!(end["data_collections"].as_array().unwrap().len(), 3);
    let end = markers[3].1.as_ref().unwrap();
    assert_eq!(end["status"], "END");
    assert_eq!(end["id"], "tx2");
    assert_eq!(
        end["event_count"], 1,
        "the snapshot read is not tx2's: {end}"
    );
    let bs = bootstrap.clone();
    let read = tokio::task::spawn_blocking(move || read_all(&bs, "cdc.shop_1.users", 1))
        .await
        .unwrap();
    let read = read[0].1.as_ref().unwrap();
    assert_eq!(read["op"], "r");
    assert!(read["transaction"].is_null(), "{read}");

    // The excluded table got no topic at all.
    let bs = bootstrap.clone();
    let names = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bs)
            .create()
            .unwrap();
        let meta = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        meta.topics()
            .iter()
            .map(|t| t.name().to_string())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(names.iter().any(|n| n == "cdc.shop_0.users"), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("audit")), "{names:?}");

    // A restart reads back the last position and the schema history.
    let state = load_state(&cfg).await.unwrap();
    assert_eq!(state.position(), Some(&pos(4)));
    assert_eq!(state.schema_history, vec![schema]);
    let stats = &state.offsets.unwrap().tables;
    assert_eq!(stats["shop_0.users"].events, 2);
    assert!(!stats.contains_key("shop_0.audit"));
}
