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
