//! CreatePartitions: all-or-nothing growth of a topic through the registry.

use std::ops::RangeInclusive;

use kafka_protocol::messages::{
    create_partitions_response::{CreatePartitionsResponse, CreatePartitionsTopicResult},
    CreatePartitionsRequest,
};
use kafka_protocol::protocol::StrBytes;

use super::{name, topic_error_code};
use crate::Broker;

pub const VERSIONS: RangeInclusive<i16> = 0..=3;

impl Broker {
    pub(crate) fn create_partitions(
        &self,
        req: CreatePartitionsRequest,
    ) -> CreatePartitionsResponse {
        let results = req
            .topics
            .into_iter()
            .map(|t| {
                let topic_name = t.name.0.to_string();
                let result = CreatePartitionsTopicResult::default().with_name(name(&topic_name));
                match self
                    .topics
                    .add_partitions(&topic_name, i64::from(t.count), req.validate_only)
                {
                    Ok(()) => result,
                    Err(e) => result
                        .with_error_code(topic_error_code(&e))
                        .with_error_message(Some(StrBytes::from_string(e.to_string()))),
                }
            })
            .collect();
        CreatePartitionsResponse::default().with_results(results)
    }
}
