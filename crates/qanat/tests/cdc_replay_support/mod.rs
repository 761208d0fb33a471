//! What the PostgreSQL CDC end-to-end tests share: reading a table's topic up to an end
//! marker, replaying Debezium events into rows, and the source table's rows to compare.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value as Json};

use crate::support;

/// A row as JSON: column name → value.
pub type Image = Map<String, Json>;

/// A consumer assigned to partition 0 of `topic` from its beginning.
pub fn reader(bootstrap: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = support::consumer_config(bootstrap)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("assignment");
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Every record of `topic` (one partition) until one whose `after.<key>` is -1.
pub fn read_until_marker(bootstrap: &str, topic: &str, key: &str) -> Vec<Json> {
    let consumer = reader(bootstrap, topic);
    let deadline = Instant::now() + support::DEADLINE * 2;
    let mut out = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no end marker in {topic} after {} records",
            out.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Ok(message) = message else { continue };
        let Some(payload) = message.payload() else {
            continue; // tombstone
        };
        let value: Json = serde_json::from_slice(payload).expect("event JSON");
        let done = value["after"][key] == -1;
        out.push(value);
        if done {
            return out;
        }
    }
}

/// Applies Debezium events in order: `after` replaces the row (removing the old key on a
/// key change), a delete removes `before`'s key, a truncate (`op: "t"`) empties the table.
pub fn replay(events: &[Json], key: &str) -> BTreeMap<i64, Image> {
    let mut table = BTreeMap::new();
    for event in events {
        if event["op"] == "t" {
            table.clear();
            continue;
        }
        let key_of = |image: &Json| image[key].as_i64().expect("integer key");
        if event["before"].is_object() {
            let old = key_of(&event["before"]);
            if event["op"] == "d" || !event["after"].is_object() || key_of(&event["after"]) != old {
                table.remove(&old);
            }
        }
        if let Some(after) = event["after"].as_object() {
            table.insert(key_of(&event["after"]), after.clone());
        }
    }
    table
}

pub async fn source_rows(
    db: &tokio_postgres::Client,
    table: &str,
    key: &str,
) -> BTreeMap<i64, Image> {
    db.query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
        .await
        .expect("select")
        .iter()
        .map(|r| {
            let text: String = r.get(0);
            let Json::Object(row) = serde_json::from_str(&text).expect("row json") else {
                panic!("row_to_json gave no object")
            };
            (row[key].as_i64().expect("key"), row)
        })
        .collect()
}
