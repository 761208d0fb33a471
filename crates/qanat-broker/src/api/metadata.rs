//! Metadata: the broker itself as leader of every partition, and the topics asked for
//! (auto-creating unknown ones when allowed).

use std::ops::RangeInclusive;

use kafka_protocol::messages::{
    metadata_response::{
        MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
    },
    BrokerId, MetadataRequest,
};
use kafka_protocol::protocol::StrBytes;

use super::{name, topic_error_code};
use crate::Broker;

pub const VERSIONS: RangeInclusive<i16> = 0..=12;

impl Broker {
    pub(crate) fn metadata(
        &self,
        req: MetadataRequest,
        version: i16,
        session: &crate::server::Session,
    ) -> MetadataResponse {
        use crate::acl::AclOperation;
        let advertised = session.listener.advertised.clone();
        let auto_create = version < 4 || req.allow_auto_topic_creation;
        let requested: Option<Vec<String>> = match req.topics {
            // v0 says "all topics" with an empty list, later versions with null.
            Some(list) if !(version == 0 && list.is_empty()) => Some(
                list.into_iter()
                    .filter_map(|t| t.name.map(|n| n.0.to_string()))
                    .collect(),
            ),
            _ => None,
        };
        // Topics the principal may not describe are left out of "all topics" and refused
        // by name; auto-creation needs Create on the cluster or the topic.
        let topics = match requested {
            None => self
                .topics
                .all()
                .into_iter()
                .filter(|t| self.topic_allowed(session, AclOperation::Describe, &t.name))
                .map(Ok)
                .collect::<Vec<_>>(),
            Some(names) => names
                .into_iter()
                .map(|n| {
                    if !self.topic_allowed(session, AclOperation::Describe, &n) {
                        return Err((n, None));
                    }
                    let create = auto_create && self.may_create_topic(session, &n);
                    self.lookup_topic(&n, create).map_err(|e| (n, Some(e)))
                })
                .collect(),
        };
        let node = self.config.broker.node_id;
        let topics = topics
            .into_iter()
            .map(|t| match t {
                Ok(topic) => MetadataResponseTopic::default()
                    .with_name(Some(name(&topic.name)))
                    .with_topic_id(uuid::Uuid::from_bytes(topic.id))
                    .with_topic_authorized_operations(i32::MIN)
                    .with_partitions(
                        (0..topic.partitions.len() as i32)
                            .map(|p| {
                                MetadataResponsePartition::default()
                                    .with_partition_index(p)
                                    .with_leader_id(BrokerId(node))
                                    .with_leader_epoch(-1)
                                    .with_replica_nodes(vec![BrokerId(node)])
                                    .with_isr_nodes(vec![BrokerId(node)])
                            })
                            .collect(),
                    ),
                Err((n, e)) => MetadataResponseTopic::default()
                    .with_name(Some(name(&n)))
                    .with_error_code(e.map_or(super::authz::TOPIC_DENIED, |e| topic_error_code(&e)))
                    .with_topic_authorized_operations(i32::MIN),
            })
            .collect();
        MetadataResponse::default()
            .with_brokers(vec![MetadataResponseBroker::default()
                .with_node_id(BrokerId(node))
                .with_host(StrBytes::from_string(advertised.0))
                .with_port(advertised.1)])
            .with_cluster_id(Some(StrBytes::from_static_str("qanat")))
            .with_controller_id(BrokerId(node))
            .with_cluster_authorized_operations(i32::MIN)
            .with_topics(topics)
    }
}
