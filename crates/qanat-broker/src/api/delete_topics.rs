//! DeleteTopics: by name (v6 names topics in a struct); long polls are woken afterwards.

use std::ops::RangeInclusive;

use kafka_protocol::messages::{
    delete_topics_response::{DeletableTopicResult, DeleteTopicsResponse},
    DeleteTopicsRequest,
};
use kafka_protocol::protocol::StrBytes;

use super::{name, topic_error_code};
use crate::Broker;

pub const VERSIONS: RangeInclusive<i16> = 1..=6;

impl Broker {
    pub(crate) fn delete_topics(
        &self,
        req: DeleteTopicsRequest,
        version: i16,
    ) -> DeleteTopicsResponse {
        let names: Vec<String> = if version >= 6 {
            req.topics
                .into_iter()
                .filter_map(|t| t.name.map(|n| n.0.to_string()))
                .collect()
        } else {
            req.topic_names
                .into_iter()
                .map(|n| n.0.to_string())
                .collect()
        };
        let responses = names
            .into_iter()
            .map(|n| {
                let id = self.topics.get(&n).map(|t| t.id).unwrap_or_default();
                let result = DeletableTopicResult::default()
                    .with_name(Some(name(&n)))
                    .with_topic_id(uuid::Uuid::from_bytes(id));
                match self.topics.delete(&n) {
                    Ok(()) => result,
                    Err(e) => result
                        .with_error_code(topic_error_code(&e))
                        .with_error_message(Some(StrBytes::from_string(e.to_string()))),
                }
            })
            .collect();
        // Long polls on the deleted partitions answer with the error at once.
        self.purgatory.wake_all();
        DeleteTopicsResponse::default().with_responses(responses)
    }
}
