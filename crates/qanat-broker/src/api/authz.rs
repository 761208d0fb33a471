//! Where the authorizer is checked: before a request is executed, per API, with Kafka's
//! operations and error codes. Whole-request refusals (group membership, cluster operations)
//! are answered here without running the handler; per-topic refusals take the refused topics
//! out of the request and add them to the handler's answer with TOPIC_AUTHORIZATION_FAILED
//! (per-group ones likewise; [`take_refused`] for each), so the allowed part of a request
//! still runs. Metadata and Fetch check inside their handlers
//! (Metadata hides what may not be described). With the authorizer off every check passes.
//!
//! Per API (Kafka's `KafkaApis`): Produce Write on the topic; Fetch Read on the topic;
//! ListOffsets and Metadata Describe on the topic (Metadata's auto-creation Create on the
//! cluster or topic); CreateTopics Create; DeleteTopics Delete; CreatePartitions Alter;
//! FindCoordinator Describe on the group or transactional id; JoinGroup, SyncGroup, Heartbeat,
//! LeaveGroup Read on the group; OffsetCommit Read on the group and topics; OffsetFetch Describe
//! on the group and topics; ListGroups Describe on the cluster or else only the describable
//! groups; DescribeGroups Describe and DeleteGroups Delete on the group; InitProducerId Write on
//! the transactional id, else IdempotentWrite on the cluster or Write on some topic;
//! DescribeAcls and DescribeUserScramCredentials Describe on the cluster; CreateAcls,
//! DeleteAcls and AlterUserScramCredentials Alter on the cluster; DescribeClientQuotas
//! DescribeConfigs and AlterClientQuotas AlterConfigs on the cluster. ApiVersions,
//! SaslHandshake and SaslAuthenticate need no authorization.

use std::collections::HashSet;

use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::list_groups_response::ListGroupsResponse;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    FindCoordinatorRequest, GroupId, HeartbeatResponse, InitProducerIdRequest, JoinGroupResponse,
    LeaveGroupResponse, ListGroupsRequest, OffsetCommitRequest, OffsetCommitResponse,
    OffsetFetchRequest, ProducerId, SyncGroupResponse,
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
        // Checked on every Produce, Fetch and Metadata topic: no host string when ACLs are off.
        if !self.acls.enabled() {
            return true;
        }
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

/// Take the items `allowed` refuses out of `items` (a request's topics or groups), each as
/// `refusal(item)`: the entries to add to the answer of the handler that runs the rest.
pub(crate) fn take_refused<T, R>(
    items: &mut Vec<T>,
    mut allowed: impl FnMut(&T) -> bool,
    refusal: impl Fn(&T) -> R,
) -> Vec<R> {
    let mut refused = Vec::new();
    items.retain(|item| {
        let ok = allowed(item);
        if !ok {
            refused.push(refusal(item));
        }
        ok
    });
    refused
}

/// CreateTopics without the topics `session` may not create, and their refusals.
pub(crate) fn split_create_topics(
    broker: &Broker,
    session: &Session,
    mut req: CreateTopicsRequest,
) -> (CreateTopicsRequest, Vec<CreatableTopicResult>) {
    let denied = take_refused(
        &mut req.topics,
        |t| broker.may_create_topic(session, t.name.as_str()),
        |t| {
            CreatableTopicResult::default()
                .with_name(t.name.clone())
                .with_error_code(TOPIC_DENIED)
                .with_num_partitions(-1)
                .with_replication_factor(-1)
        },
    );
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
    let may_delete = |name: &str| broker.topic_allowed(session, AclOperation::Delete, name);
    let refusal = |name: &str| {
        DeletableTopicResult::default()
            .with_name(Some(s(name).into()))
            .with_error_code(TOPIC_DENIED)
    };
    let mut denied = take_refused(
        &mut req.topic_names,
        |n| may_delete(n.as_str()),
        |n| refusal(n.as_str()),
    );
    // By id (v6): a topic named here is checked by its name.
    denied.extend(take_refused(
        &mut req.topics,
        |t| t.name.as_ref().is_none_or(|n| may_delete(n.as_str())),
        |t| refusal(t.name.as_ref().map_or("", |n| n.as_str())),
    ));
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
    let denied = take_refused(
        &mut req.topics,
        |t| broker.topic_allowed(session, AclOperation::Read, t.name.as_str()),
        |t| refused_topic(t, TOPIC_DENIED),
    );
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

pub(crate) const CLUSTER_DENIED: i16 = 31;
pub(crate) const TRANSACTIONAL_ID_DENIED: i16 = 53;

/// FindCoordinator key types.
const GROUP_KEY: i8 = 0;
const TRANSACTION_KEY: i8 = 1;

impl Broker {
    /// OffsetFetch as Kafka authorizes it: Describe on the group, else GROUP_AUTHORIZATION_FAILED
    /// (per requested partition before v2, at the top from v2, per group from v8); Describe on
    /// each requested topic, else TOPIC_AUTHORIZATION_FAILED for its partitions; a request for
    /// all topics silently leaves out the topics the principal may not describe.
    pub(crate) fn authorized_offset_fetch(
        &self,
        mut req: OffsetFetchRequest,
        version: i16,
        session: &Session,
    ) -> OffsetFetchResponse {
        if !self.acls.enabled() {
            return self.offset_fetch(req, version);
        }
        let may_describe = |t: &str| self.topic_allowed(session, AclOperation::Describe, t);
        if version >= 8 {
            let mut refused_groups = Vec::new();
            let mut refused_topics: Vec<(GroupId, Vec<OffsetFetchResponseTopics>)> = Vec::new();
            req.groups.retain_mut(|g| {
                if !self.group_allowed(session, AclOperation::Describe, g.group_id.as_str()) {
                    refused_groups.push(
                        OffsetFetchResponseGroup::default()
                            .with_group_id(g.group_id.clone())
                            .with_error_code(GROUP_DENIED),
                    );
                    return false;
                }
                if let Some(topics) = &mut g.topics {
                    let refused = take_refused(
                        topics,
                        |t| may_describe(t.name.as_str()),
                        |t| {
                            OffsetFetchResponseTopics::default()
                                .with_name(t.name.clone())
                                .with_partitions(
                                    t.partition_indexes
                                        .iter()
                                        .map(|&p| {
                                            OffsetFetchResponsePartitions::default()
                                                .with_partition_index(p)
                                                .with_committed_offset(-1)
                                                .with_committed_leader_epoch(-1)
                                                .with_metadata(Some(s("")))
                                                .with_error_code(TOPIC_DENIED)
                                        })
                                        .collect(),
                                )
                        },
                    );
                    refused_topics.push((g.group_id.clone(), refused));
                }
                true
            });
            let mut body = self.offset_fetch(req, version);
            for group in &mut body.groups {
                // Asked for all topics: only those it may describe.
                group.topics.retain(|t| may_describe(t.name.as_str()));
                if let Some((_, refused)) = refused_topics
                    .iter_mut()
                    .find(|(id, _)| *id == group.group_id)
                {
                    group.topics.append(refused);
                }
            }
            body.groups.extend(refused_groups);
            return body;
        }
        if !self.group_allowed(session, AclOperation::Describe, req.group_id.as_str()) {
            let mut body = OffsetFetchResponse::default().with_error_code(GROUP_DENIED);
            if version < 2 {
                body.topics = req
                    .topics
                    .iter()
                    .flatten()
                    .map(|t| refused_fetch_topic(t, GROUP_DENIED))
                    .collect();
            }
            return body;
        }
        let refused = match &mut req.topics {
            Some(topics) => take_refused(
                topics,
                |t| may_describe(t.name.as_str()),
                |t| refused_fetch_topic(t, TOPIC_DENIED),
            ),
            None => Vec::new(),
        };
        let mut body = self.offset_fetch(req, version);
        body.topics.retain(|t| may_describe(t.name.as_str()));
        body.topics.extend(refused);
        body
    }

    /// FindCoordinator: Describe on the group (else GROUP_AUTHORIZATION_FAILED) or on the
    /// transactional id (else TRANSACTIONAL_ID_AUTHORIZATION_FAILED), per key from v4.
    pub(crate) fn authorized_find_coordinator(
        &self,
        req: FindCoordinatorRequest,
        version: i16,
        session: &Session,
    ) -> FindCoordinatorResponse {
        let key_type = req.key_type;
        let refusal = |key: &str| -> Option<i16> {
            match key_type {
                GROUP_KEY if !self.group_allowed(session, AclOperation::Describe, key) => {
                    Some(GROUP_DENIED)
                }
                TRANSACTION_KEY
                    if !self.allowed(
                        session,
                        AclOperation::Describe,
                        ResourceType::TransactionalId,
                        key,
                    ) =>
                {
                    Some(TRANSACTIONAL_ID_DENIED)
                }
                _ => None,
            }
        };
        if version < 4 {
            if let Some(code) = refusal(req.key.as_str()) {
                return FindCoordinatorResponse::default()
                    .with_error_code(code)
                    .with_node_id(BrokerId(-1))
                    .with_host(s(""))
                    .with_port(-1);
            }
            return self.find_coordinator(req, version, &session.listener.advertised);
        }
        let mut body = self.find_coordinator(req, version, &session.listener.advertised);
        for c in &mut body.coordinators {
            if let Some(code) = refusal(c.key.as_str()) {
                *c = Coordinator::default()
                    .with_key(c.key.clone())
                    .with_error_code(code)
                    .with_node_id(BrokerId(-1))
                    .with_host(s(""))
                    .with_port(-1);
            }
        }
        body
    }

    /// ListGroups: every group with Describe on the cluster, else only the groups the
    /// principal may describe (no error, as Kafka).
    pub(crate) fn authorized_list_groups(
        &self,
        req: ListGroupsRequest,
        session: &Session,
    ) -> ListGroupsResponse {
        let mut body = self.list_groups(req);
        if !self.cluster_allowed(session, AclOperation::Describe) {
            body.groups.retain(|g| {
                self.group_allowed(session, AclOperation::Describe, g.group_id.as_str())
            });
        }
        body
    }

    /// InitProducerId: Write on the transactional id (else
    /// TRANSACTIONAL_ID_AUTHORIZATION_FAILED); without one, IdempotentWrite on the cluster or
    /// Write on some topic (KIP-679), else CLUSTER_AUTHORIZATION_FAILED.
    pub(crate) fn authorized_init_producer_id(
        &self,
        req: InitProducerIdRequest,
        session: &Session,
    ) -> InitProducerIdResponse {
        let refuse = |code: i16| {
            InitProducerIdResponse::default()
                .with_error_code(code)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
        };
        match &req.transactional_id {
            Some(id)
                if !self.allowed(
                    session,
                    AclOperation::Write,
                    ResourceType::TransactionalId,
                    id.as_str(),
                ) =>
            {
                return refuse(TRANSACTIONAL_ID_DENIED)
            }
            None if !self.cluster_allowed(session, AclOperation::IdempotentWrite)
                && !self.acls.allowed_on_any(
                    &session.principal,
                    &session.peer.ip().to_string(),
                    AclOperation::Write,
                    ResourceType::Topic,
                ) =>
            {
                return refuse(CLUSTER_DENIED)
            }
            _ => {}
        }
        self.init_producer_id(req)
    }
}

fn refused_fetch_topic(t: &OffsetFetchRequestTopic, code: i16) -> OffsetFetchResponseTopic {
    OffsetFetchResponseTopic::default()
        .with_name(t.name.clone())
        .with_partitions(
            t.partition_indexes
                .iter()
                .map(|&p| {
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(p)
                        .with_committed_offset(-1)
                        .with_committed_leader_epoch(-1)
                        .with_metadata(Some(s("")))
                        .with_error_code(code)
                })
                .collect(),
        )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use kafka_protocol::messages::offset_fetch_request::{
        OffsetFetchRequestGroup, OffsetFetchRequestTopics,
    };
    use kafka_protocol::messages::TransactionalId;
    use qanat_log::{ManualClock, OsStorage};

    use super::*;
    use crate::acl::{AclBinding, PatternType, Permission};
    use crate::config::SecurityProtocol;
    use crate::listener::ListenerInfo;
    use crate::Config;

    const ALICE: &str = "User:alice";

    /// (topic, error, committed offset) per partition.
    type Rows = Vec<(String, i16, i64)>;

    /// A broker with the authorizer on, `admin` its super user, offsets committed by group
    /// `g` (topics `a` and `b`) and `h` (topic `a`).
    fn broker(dir: &std::path::Path) -> Broker {
        let mut config = Config::default();
        config.security.authorizer = true;
        config.security.super_users = vec!["User:admin".into()];
        let broker = Broker::open(
            config,
            dir,
            Arc::new(OsStorage),
            Arc::new(ManualClock::new(1_000)),
            ("127.0.0.1".into(), 9092),
        )
        .unwrap();
        for (group, topic) in [("g", "a"), ("g", "b"), ("h", "a")] {
            broker
                .groups
                .commit(group, -1, "", vec![(topic.into(), 0, 7, None)])
                .unwrap();
        }
        broker
    }

    fn session(principal: &str) -> Session {
        Session::new(
            Arc::new(ListenerInfo {
                name: "SASL_SSL".into(),
                protocol: SecurityProtocol::SaslSsl,
                advertised: ("broker.example".into(), 9093),
            }),
            "10.0.0.7:5000".parse().unwrap(),
            principal.into(),
        )
    }

    fn allow(broker: &Broker, rtype: ResourceType, name: &str, op: AclOperation) {
        grant(
            broker,
            rtype,
            name,
            PatternType::Literal,
            op,
            Permission::Allow,
        );
    }

    fn grant(
        broker: &Broker,
        rtype: ResourceType,
        name: &str,
        pattern: PatternType,
        op: AclOperation,
        permission: Permission,
    ) {
        broker
            .acls
            .add(vec![AclBinding {
                resource_type: rtype,
                resource_name: name.into(),
                pattern_type: pattern,
                principal: ALICE.into(),
                host: "*".into(),
                operation: op,
                permission,
            }])
            .unwrap();
    }

    fn topic_name(n: &str) -> kafka_protocol::messages::TopicName {
        kafka_protocol::messages::TopicName(s(n))
    }

    fn fetch_v7(group: &str, topics: Option<&[&str]>) -> OffsetFetchRequest {
        OffsetFetchRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_topics(topics.map(|ts| {
                ts.iter()
                    .map(|t| {
                        OffsetFetchRequestTopic::default()
                            .with_name(topic_name(t))
                            .with_partition_indexes(vec![0])
                    })
                    .collect()
            }))
    }

    /// (topic, error, offset) of every partition, sorted.
    fn rows_v7(body: &OffsetFetchResponse) -> Rows {
        let mut rows: Vec<_> = body
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|p| (t.name.to_string(), p.error_code, p.committed_offset))
            })
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn offset_fetch_needs_describe_on_group_and_topics() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let alice = session(ALICE);

        // No ACL: the group is refused, at the top from v2, per partition before.
        let body = b.authorized_offset_fetch(fetch_v7("g", Some(&["a"])), 7, &alice);
        assert_eq!(body.error_code, GROUP_DENIED);
        assert!(body.topics.is_empty());
        let body = b.authorized_offset_fetch(fetch_v7("g", Some(&["a"])), 1, &alice);
        assert_eq!(rows_v7(&body), vec![("a".into(), GROUP_DENIED, -1)]);

        // Describe on the group, on topic `a` only (Read implies Describe).
        allow(&b, ResourceType::Group, "g", AclOperation::Describe);
        allow(&b, ResourceType::Topic, "a", AclOperation::Read);
        let body = b.authorized_offset_fetch(fetch_v7("g", Some(&["a", "b"])), 7, &alice);
        assert_eq!(body.error_code, 0);
        assert_eq!(
            rows_v7(&body),
            vec![("a".into(), 0, 7), ("b".into(), TOPIC_DENIED, -1)]
        );
        // All topics: `b` is left out without an error.
        let body = b.authorized_offset_fetch(fetch_v7("g", None), 7, &alice);
        assert_eq!(rows_v7(&body), vec![("a".into(), 0, 7)]);

        // A super user sees everything.
        let body = b.authorized_offset_fetch(fetch_v7("g", None), 7, &session("User:admin"));
        assert_eq!(rows_v7(&body), vec![("a".into(), 0, 7), ("b".into(), 0, 7)]);
    }

    #[test]
    fn offset_fetch_v8_checks_each_group() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        allow(&b, ResourceType::Group, "g", AclOperation::Read);
        allow(&b, ResourceType::Topic, "a", AclOperation::Describe);
        let group = |id: &str, topics: Option<Vec<&str>>| {
            OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(s(id)))
                .with_topics(topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| {
                            OffsetFetchRequestTopics::default()
                                .with_name(topic_name(t))
                                .with_partition_indexes(vec![0])
                        })
                        .collect()
                }))
        };
        let req = OffsetFetchRequest::default()
            .with_groups(vec![group("g", Some(vec!["a", "b"])), group("h", None)]);
        let body = b.authorized_offset_fetch(req, 8, &session(ALICE));
        let mut seen: Vec<(String, i16, Rows)> = body
            .groups
            .iter()
            .map(|g| {
                let mut rows: Vec<_> = g
                    .topics
                    .iter()
                    .flat_map(|t| {
                        t.partitions
                            .iter()
                            .map(|p| (t.name.to_string(), p.error_code, p.committed_offset))
                    })
                    .collect();
                rows.sort();
                (g.group_id.to_string(), g.error_code, rows)
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (
                    "g".into(),
                    0,
                    vec![("a".into(), 0, 7), ("b".into(), TOPIC_DENIED, -1)]
                ),
                ("h".into(), GROUP_DENIED, vec![]),
            ]
        );
    }

    #[test]
    fn find_coordinator_needs_describe_on_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let alice = session(ALICE);
        allow(&b, ResourceType::Group, "g", AclOperation::Describe);
        allow(&b, ResourceType::TransactionalId, "tx", AclOperation::Write);

        let old = |key: &str, key_type: i8| {
            b.authorized_find_coordinator(
                FindCoordinatorRequest::default()
                    .with_key(s(key))
                    .with_key_type(key_type),
                3,
                &alice,
            )
        };
        let ok = old("g", GROUP_KEY);
        assert_eq!((ok.error_code, ok.port), (0, 9093));
        assert_eq!(ok.host.as_str(), "broker.example");
        let refused = old("other", GROUP_KEY);
        assert_eq!((refused.error_code, refused.node_id.0), (GROUP_DENIED, -1));
        assert_eq!(old("tx", TRANSACTION_KEY).error_code, 0);
        assert_eq!(
            old("tx2", TRANSACTION_KEY).error_code,
            TRANSACTIONAL_ID_DENIED
        );

        let v4 = b.authorized_find_coordinator(
            FindCoordinatorRequest::default()
                .with_key_type(GROUP_KEY)
                .with_coordinator_keys(vec![s("g"), s("other")]),
            4,
            &alice,
        );
        let codes: Vec<_> = v4
            .coordinators
            .iter()
            .map(|c| (c.key.to_string(), c.error_code, c.port))
            .collect();
        assert_eq!(
            codes,
            vec![("g".into(), 0, 9093), ("other".into(), GROUP_DENIED, -1)]
        );
    }

    #[test]
    fn list_groups_filters_without_cluster_describe() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let alice = session(ALICE);
        let names = |body: ListGroupsResponse| -> Vec<String> {
            body.groups.iter().map(|g| g.group_id.to_string()).collect()
        };
        assert!(names(b.authorized_list_groups(ListGroupsRequest::default(), &alice)).is_empty());
        allow(&b, ResourceType::Group, "h", AclOperation::Describe);
        assert_eq!(
            names(b.authorized_list_groups(ListGroupsRequest::default(), &alice)),
            vec!["h".to_string()]
        );
        allow(&b, ResourceType::Cluster, CLUSTER, AclOperation::Describe);
        assert_eq!(
            names(b.authorized_list_groups(ListGroupsRequest::default(), &alice)),
            vec!["g".to_string(), "h".to_string()]
        );
    }

    #[test]
    fn init_producer_id_needs_idempotent_write_or_a_writable_topic() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let alice = session(ALICE);
        let idempotent = || {
            b.authorized_init_producer_id(
                InitProducerIdRequest::default().with_transactional_id(None),
                &alice,
            )
        };
        let refused = idempotent();
        assert_eq!(
            (refused.error_code, refused.producer_id.0),
            (CLUSTER_DENIED, -1)
        );
        // Write on some topic is enough (KIP-679) ...
        grant(
            &b,
            ResourceType::Topic,
            "logs-",
            PatternType::Prefixed,
            AclOperation::Write,
            Permission::Allow,
        );
        let granted = idempotent();
        assert_eq!(granted.error_code, 0);
        assert!(granted.producer_id.0 >= 0);
        // ... unless a Deny covers it.
        grant(
            &b,
            ResourceType::Topic,
            "log",
            PatternType::Prefixed,
            AclOperation::Write,
            Permission::Deny,
        );
        assert_eq!(idempotent().error_code, CLUSTER_DENIED);
        // IdempotentWrite on the cluster.
        allow(
            &b,
            ResourceType::Cluster,
            CLUSTER,
            AclOperation::IdempotentWrite,
        );
        assert_eq!(idempotent().error_code, 0);

        // A transactional id needs Write on it (and is then refused as unsupported).
        let transactional = |id: &str| {
            b.authorized_init_producer_id(
                InitProducerIdRequest::default()
                    .with_transactional_id(Some(TransactionalId(s(id)))),
                &alice,
            )
            .error_code
        };
        assert_eq!(transactional("tx"), TRANSACTIONAL_ID_DENIED);
        allow(&b, ResourceType::TransactionalId, "tx", AclOperation::Write);
        assert_eq!(
            transactional("tx"),
            kafka_protocol::ResponseError::InvalidRequest.code()
        );
    }
}
