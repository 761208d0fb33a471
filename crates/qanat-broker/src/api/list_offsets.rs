//! ListOffsets: earliest, latest (the high watermark) or the first offset at a timestamp.

use std::ops::RangeInclusive;

use kafka_protocol::messages::{
    list_offsets_response::{
        ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
    },
    ListOffsetsRequest,
};
use kafka_protocol::ResponseError;

use super::{code, log_error_code, name};
use crate::Broker;

pub const VERSIONS: RangeInclusive<i16> = 1..=6;

impl Broker {
    pub(crate) fn list_offsets(&self, req: ListOffsetsRequest) -> ListOffsetsResponse {
        let topics = req
            .topics
            .into_iter()
            .map(|t| {
                let topic_name = t.name.0.to_string();
                let partitions = t
                    .partitions
                    .into_iter()
                    .map(|p| {
                        let resp = ListOffsetsPartitionResponse::default()
                            .with_partition_index(p.partition_index)
                            .with_leader_epoch(-1);
                        let partition = match self.partition(&topic_name, p.partition_index, false)
                        {
                            Ok(partition) => partition,
                            Err(c) => {
                                return resp.with_error_code(c).with_offset(-1).with_timestamp(-1)
                            }
                        };
                        match p.timestamp {
                            LATEST => resp
                                .with_offset(partition.high_watermark())
                                .with_timestamp(-1),
                            EARLIEST => resp
                                .with_offset(partition.log_start_offset())
                                .with_timestamp(-1),
                            ts if ts >= 0 => {
                                let limit = self.config.broker.max_uncompressed_batch_bytes;
                                match crate::records::offset_for_timestamp(&partition, ts, limit) {
                                    Ok(Some((offset, found))) => {
                                        resp.with_offset(offset).with_timestamp(found)
                                    }
                                    Ok(None) => resp.with_offset(-1).with_timestamp(-1),
                                    Err(e) => resp
                                        .with_error_code(log_error_code(&e))
                                        .with_offset(-1)
                                        .with_timestamp(-1),
                                }
                            }
                            _ => resp
                                .with_error_code(code(ResponseError::InvalidRequest))
                                .with_offset(-1)
                                .with_timestamp(-1),
                        }
                    })
                    .collect();
                ListOffsetsTopicResponse::default()
                    .with_name(name(&topic_name))
                    .with_partitions(partitions)
            })
            .collect();
        ListOffsetsResponse::default().with_topics(topics)
    }
}

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    use qanat_log::batch::{encode_batch, SimpleRecord};

    use super::*;
    use crate::api::testing::{broker, topic_name};
    use crate::{Config, FsyncPolicy};

    /// (error code, offset, timestamp) for `timestamp` in partition `index` of `topic`.
    fn list(broker: &Broker, topic: &str, index: i32, timestamp: i64) -> (i16, i64, i64) {
        let req = ListOffsetsRequest::default().with_topics(vec![ListOffsetsTopic::default()
            .with_name(topic_name(topic))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(index)
                .with_timestamp(timestamp)])]);
        let response = broker.list_offsets(req);
        let p = &response.topics[0].partitions[0];
        assert_eq!(p.partition_index, index);
        (p.error_code, p.offset, p.timestamp)
    }

    fn record_at(timestamp: i64) -> Vec<u8> {
        encode_batch(&[SimpleRecord {
            timestamp,
            key: None,
            value: Some(b"v"),
        }])
    }

    #[test]
    fn earliest_latest_and_by_timestamp() {
        let (broker, _) = broker(Config::default());
        broker.topics.create("orders", 1, false).expect("create");
        let partition = broker.topics.get("orders").expect("created").partitions[0].clone();
        for ts in [1_000, 2_000, 3_000] {
            partition.append(&record_at(ts)).expect("append");
        }
        assert_eq!(list(&broker, "orders", 0, EARLIEST), (0, 0, -1));
        assert_eq!(list(&broker, "orders", 0, LATEST), (0, 3, -1));
        // The first record at or after the timestamp, with its own timestamp.
        assert_eq!(list(&broker, "orders", 0, 1_500), (0, 1, 2_000));
        assert_eq!(list(&broker, "orders", 0, 2_000), (0, 1, 2_000));
        assert_eq!(list(&broker, "orders", 0, 9_000), (0, -1, -1));
        // -3 (max timestamp) is not served.
        let invalid = ResponseError::InvalidRequest.code();
        assert_eq!(list(&broker, "orders", 0, -3), (invalid, -1, -1));
    }

    #[test]
    fn unknown_topic_or_partition_is_an_error_and_creates_nothing() {
        let (broker, _) = broker(Config::default());
        broker.topics.create("orders", 1, false).expect("create");
        let unknown = ResponseError::UnknownTopicOrPartition.code();
        assert_eq!(list(&broker, "orders", 1, LATEST), (unknown, -1, -1));
        assert_eq!(list(&broker, "missing", 0, LATEST), (unknown, -1, -1));
        assert!(broker.topics.get("missing").is_none());
    }

    #[test]
    fn with_fsync_always_latest_is_the_durable_end() {
        let mut config = Config::default();
        config.storage.fsync = FsyncPolicy::Always;
        let (broker, _) = broker(config);
        broker.topics.create("orders", 1, false).expect("create");
        let partition = broker.topics.get("orders").expect("created").partitions[0].clone();
        let appended = partition.append(&record_at(1_000)).expect("append");
        assert_eq!(list(&broker, "orders", 0, LATEST), (0, 0, -1));
        partition.sync_append(&appended).expect("sync");
        assert_eq!(list(&broker, "orders", 0, LATEST), (0, 1, -1));
    }
}
