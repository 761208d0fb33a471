//! CreateTopics: all-or-nothing creation through the registry; replication factor 1 only.

use std::ops::RangeInclusive;

use kafka_protocol::messages::{
    create_topics_response::{CreatableTopicResult, CreateTopicsResponse},
    CreateTopicsRequest,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::{code, name, topic_error_code};
use crate::Broker;

pub const VERSIONS: RangeInclusive<i16> = 2..=7;

impl Broker {
    pub(crate) fn create_topics(&self, req: CreateTopicsRequest) -> CreateTopicsResponse {
        let topics = req
            .topics
            .into_iter()
            .map(|t| {
                let topic_name = t.name.0.to_string();
                let partitions = if t.num_partitions == -1 {
                    i64::from(self.config.broker.default_partitions)
                } else {
                    i64::from(t.num_partitions)
                };
                let result = CreatableTopicResult::default().with_name(name(&topic_name));
                if !(t.replication_factor == -1 || t.replication_factor == 1)
                    || !t.assignments.is_empty()
                        && t.assignments.iter().any(|a| {
                            a.broker_ids
                                .iter()
                                .any(|b| b.0 != self.config.broker.node_id)
                        })
                {
                    return result
                        .with_error_code(code(ResponseError::InvalidReplicationFactor))
                        .with_error_message(Some(StrBytes::from_string(format!(
                            "replication factor {} is not possible on one broker",
                            t.replication_factor
                        ))))
                        .with_num_partitions(-1)
                        .with_replication_factor(-1);
                }
                match self
                    .topics
                    .create(&topic_name, partitions, req.validate_only)
                {
                    Ok(topic) => result
                        .with_topic_id(uuid::Uuid::from_bytes(topic.id))
                        .with_num_partitions(partitions as i32)
                        .with_replication_factor(1)
                        .with_configs(Some(Vec::new())),
                    Err(e) => result
                        .with_error_code(topic_error_code(&e))
                        .with_error_message(Some(StrBytes::from_string(e.to_string())))
                        .with_num_partitions(-1)
                        .with_replication_factor(-1),
                }
            })
            .collect();
        CreateTopicsResponse::default().with_topics(topics)
    }
}
