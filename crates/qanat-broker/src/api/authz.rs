//! Where the authorizer is checked: before a request is executed, per API, with Kafka's
//! operations and error codes. Whole-request refusals (group membership, cluster operations)
//! are answered here without running the handler; per-topic refusals take the refused topics
//! out of the request and add them to the handler's answer with TOPIC_AUTHORIZATION_FAILED,
//! so the allowed part of a request still runs. Metadata and Fetch check inside their handlers
//! (Metadata hides what may not be described). With the authorizer off every check passes.

use std::collections::HashSet;

use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::{
    CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    HeartbeatResponse, JoinGroupResponse, LeaveGroupResponse, OffsetCommitRequest,
    OffsetCommitResponse, SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;

use crate::acl::{AclOperation, ResourceType, CLUSTER};
use crate::server::Session;
use crate::Broker;

pub(crate) const TOPIC_DENIED: i16 = 29;
pub(crate) const GROUP_DENIED: i16 = 30;

impl Broker {
    pub(crate) fn allowed(
        &self,
        session: &Session,
        operation: AclOperation,
        rtype: ResourceType,
        name: &str,
    ) -> bool {
        self.acls.allowed(
            &session.principal,
            &session.peer.ip().to_string(),
            operation,
            rtype,
            name,
        )
    }

    pub(crate) fn cluster_allowed(&self, session: &Session, operation: AclOperation) -> bool {
        self.allowed(session, operation, ResourceType::Cluster, CLUSTER)
    }

    pub(crate) fn topic_allowed(
        &self,
        session: &Session,
        operation: AclOperation,
        topic: &str,
    ) -> bool {
        self.allowed(session, operation, ResourceType::Topic, topic)
    }

    pub(crate) fn group_allowed(
        &self,
        session: &Session,
        operation: AclOperation,
        group: &str,
    ) -> bool {
        self.allowed(session, operation, ResourceType::Group, group)
    }

    /// Topics of `names` that `session` may not `operation`.
    pub(crate) fn denied_topics<'a>(
        &self,
        session: &Session,
        operation: AclOperation,
        names: impl Iterator<Item = &'a str>,
    ) -> HashSet<String> {
        if !self.acls.enabled() {
            return HashSet::new();
        }
        names
            .filter(|n| !self.topic_allowed(session, operation, n))
            .map(str::to_string)
            .collect()
    }

    /// Creation: Create on the cluster, or on the topic.
    pub(crate) fn may_create_topic(&self, session: &Session, topic: &str) -> bool {
        self.cluster_allowed(session, AclOperation::Create)
            || self.topic_allowed(session, AclOperation::Create, topic)
    }
}

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

/// CreateTopics without the topics `session` may not create, and their refusals.
pub(crate) fn split_create_topics(
    broker: &Broker,
    session: &Session,
    mut req: CreateTopicsRequest,
) -> (CreateTopicsRequest, Vec<CreatableTopicResult>) {
    let mut denied = Vec::new();
    req.topics.retain(|t| {
        let ok = broker.may_create_topic(session, t.name.as_str());
        if !ok {
            denied.push(
                CreatableTopicResult::default()
                    .with_name(t.name.clone())
                    .with_error_code(TOPIC_DENIED)
                    .with_num_partitions(-1)
                    .with_replication_factor(-1),
            );
        }
        ok
    });
    (req, denied)
}

pub(crate) fn merge_create_topics(
    mut response: CreateTopicsResponse,
    denied: Vec<CreatableTopicResult>,
) -> CreateTopicsResponse {
    response.topics.extend(denied);
    response
}

/// DeleteTopics without the topics `session` may not delete, and their refusals.
pub(crate) fn split_delete_topics(
    broker: &Broker,
    session: &Session,
    mut req: DeleteTopicsRequest,
) -> (DeleteTopicsRequest, Vec<DeletableTopicResult>) {
    let mut denied = Vec::new();
    let mut refuse = |name: &str| {
        let ok = broker.topic_allowed(session, AclOperation::Delete, name);
        if !ok {
            denied.push(
                DeletableTopicResult::default()
                    .with_name(Some(s(name).into()))
                    .with_error_code(TOPIC_DENIED),
            );
        }
        ok
    };
    req.topic_names.retain(|n| refuse(n.as_str()));
    req.topics
        .retain(|t| t.name.as_ref().is_none_or(|n| refuse(n.as_str())));
    (req, denied)
}

pub(crate) fn merge_delete_topics(
    mut response: DeleteTopicsResponse,
    denied: Vec<DeletableTopicResult>,
) -> DeleteTopicsResponse {
    response.responses.extend(denied);
    response
}

/// OffsetCommit: Read on the group (else every partition gets GROUP_AUTHORIZATION_FAILED) and
/// Read on each topic (else its partitions get TOPIC_AUTHORIZATION_FAILED).
pub(crate) enum CommitCheck {
    Refused(OffsetCommitResponse),
    Run(OffsetCommitRequest, Vec<OffsetCommitResponseTopic>),
}

pub(crate) fn check_offset_commit(
    broker: &Broker,
    session: &Session,
    mut req: OffsetCommitRequest,
) -> CommitCheck {
    let refused_topic =
        |t: &kafka_protocol::messages::offset_commit_request::OffsetCommitRequestTopic,
         code: i16| {
            OffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(
                    t.partitions
                        .iter()
                        .map(|p| {
                            OffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(code)
                        })
                        .collect(),
                )
        };
    if !broker.group_allowed(session, AclOperation::Read, req.group_id.as_str()) {
        return CommitCheck::Refused(
            OffsetCommitResponse::default().with_topics(
                req.topics
                    .iter()
                    .map(|t| refused_topic(t, GROUP_DENIED))
                    .collect(),
            ),
        );
    }
    let mut denied = Vec::new();
    req.topics.retain(|t| {
        let ok = broker.topic_allowed(session, AclOperation::Read, t.name.as_str());
        if !ok {
            denied.push(refused_topic(t, TOPIC_DENIED));
        }
        ok
    });
    CommitCheck::Run(req, denied)
}

pub(crate) fn join_refused(member_id: StrBytes) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(GROUP_DENIED)
        .with_generation_id(-1)
        .with_member_id(member_id)
}

pub(crate) fn sync_refused() -> SyncGroupResponse {
    SyncGroupResponse::default().with_error_code(GROUP_DENIED)
}

pub(crate) fn heartbeat_refused() -> HeartbeatResponse {
    HeartbeatResponse::default().with_error_code(GROUP_DENIED)
}

pub(crate) fn leave_refused() -> LeaveGroupResponse {
    LeaveGroupResponse::default().with_error_code(GROUP_DENIED)
}
