//! Kafka group APIs translated to and from the coordinator's plain types.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::{
    delete_groups_response::{DeletableGroupResult, DeleteGroupsResponse},
    describe_groups_response::{DescribeGroupsResponse, DescribedGroup, DescribedGroupMember},
    find_coordinator_response::{Coordinator, FindCoordinatorResponse},
    heartbeat_response::HeartbeatResponse,
    join_group_response::{JoinGroupResponse, JoinGroupResponseMember},
    leave_group_response::{LeaveGroupResponse, MemberResponse},
    list_groups_response::{ListGroupsResponse, ListedGroup},
    offset_commit_response::{
        OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
    },
    offset_fetch_response::{
        OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
        OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
    },
    BrokerId, DeleteGroupsRequest, DescribeGroupsRequest, FindCoordinatorRequest, GroupId,
    HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, ListGroupsRequest, OffsetCommitRequest,
    OffsetFetchRequest, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::{Committed, JoinRequest};
use crate::Broker;

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn opt(v: Option<String>) -> Option<StrBytes> {
    v.map(StrBytes::from_string)
}

/// (topic, [partition]) lists as (topic, partition) pairs; `None` (all) stays `None`.
fn flatten(wanted: Option<Vec<(String, Vec<i32>)>>) -> Option<Vec<(String, i32)>> {
    wanted.map(|ts| {
        ts.into_iter()
            .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t.clone(), p)))
            .collect()
    })
}

/// (partition, committed offset, metadata) as the responses carry them.
type PartitionOffset = (i32, i64, StrBytes);

/// Group committed-offset rows by topic (rows arrive topic by topic), with -1 and empty
/// metadata for partitions that have no commit, as Kafka answers.
fn by_topic<T>(
    rows: Vec<(String, i32, Option<Committed>)>,
    make: impl Fn(String, Vec<PartitionOffset>) -> T,
) -> Vec<T> {
    let mut grouped: Vec<(String, Vec<PartitionOffset>)> = Vec::new();
    for (topic, partition, c) in rows {
        let (offset, metadata) = match c {
            Some(c) => (c.offset, s(c.metadata.as_deref().unwrap_or(""))),
            None => (-1, s("")),
        };
        match grouped.last_mut() {
            Some((t, ps)) if *t == topic => ps.push((partition, offset, metadata)),
            _ => grouped.push((topic, vec![(partition, offset, metadata)])),
        }
    }
    grouped.into_iter().map(|(t, ps)| make(t, ps)).collect()
}

impl Broker {
    pub(crate) fn find_coordinator(
        &self,
        req: FindCoordinatorRequest,
        version: i16,
        advertised: &(String, i32),
    ) -> FindCoordinatorResponse {
        // The coordinator is this broker, at the listener the client came through.
        let node = BrokerId(self.config.broker.node_id);
        let host = s(&advertised.0);
        let port = advertised.1;
        if version >= 4 {
            let coordinators = req
                .coordinator_keys
                .into_iter()
                .map(|key| {
                    Coordinator::default()
                        .with_key(key)
                        .with_node_id(node)
                        .with_host(host.clone())
                        .with_port(port)
                })
                .collect();
            FindCoordinatorResponse::default().with_coordinators(coordinators)
        } else {
            FindCoordinatorResponse::default()
                .with_node_id(node)
                .with_host(host)
                .with_port(port)
        }
    }

    pub(crate) async fn join_group(
        self: &Arc<Self>,
        req: JoinGroupRequest,
        version: i16,
        client_id: String,
        client_host: String,
    ) -> JoinGroupResponse {
        let session = Duration::from_millis(req.session_timeout_ms.max(0) as u64);
        // v0 has no rebalance timeout: Kafka uses the session timeout.
        let rebalance = if version >= 1 {
            Duration::from_millis(req.rebalance_timeout_ms.max(0) as u64)
        } else {
            session
        };
        let result = self
            .groups
            .join(JoinRequest {
                group: req.group_id.0.to_string(),
                member_id: req.member_id.to_string(),
                instance_id: req.group_instance_id.map(|i| i.to_string()),
                client_id,
                client_host,
                session_timeout: session,
                rebalance_timeout: rebalance,
                protocol_type: req.protocol_type.to_string(),
                protocols: req
                    .protocols
                    .into_iter()
                    .map(|p| (p.name.to_string(), p.metadata))
                    .collect(),
            })
            .await;
        JoinGroupResponse::default()
            .with_error_code(result.error)
            .with_generation_id(result.generation)
            .with_protocol_type(opt(result.protocol_type))
            .with_protocol_name(Some(s(result.protocol_name.as_deref().unwrap_or(""))))
            .with_leader(s(&result.leader))
            .with_member_id(s(&result.member_id))
            .with_members(
                result
                    .members
                    .into_iter()
                    .map(|(id, instance, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(s(&id))
                            .with_group_instance_id(opt(instance))
                            .with_metadata(metadata)
                    })
                    .collect(),
            )
    }

    pub(crate) async fn sync_group(self: &Arc<Self>, req: SyncGroupRequest) -> SyncGroupResponse {
        let result = self
            .groups
            .sync(
                req.group_id.0.as_str(),
                req.generation_id,
                req.member_id.as_str(),
                req.assignments
                    .into_iter()
                    .map(|a| (a.member_id.to_string(), a.assignment))
                    .collect(),
            )
            .await;
        SyncGroupResponse::default()
            .with_error_code(result.error)
            .with_protocol_type(opt(result.protocol_type))
            .with_protocol_name(opt(result.protocol_name))
            .with_assignment(result.assignment)
    }

    pub(crate) fn heartbeat(&self, req: HeartbeatRequest) -> HeartbeatResponse {
        HeartbeatResponse::default().with_error_code(self.groups.heartbeat(
            req.group_id.0.as_str(),
            req.generation_id,
            req.member_id.as_str(),
        ))
    }

    pub(crate) fn leave_group(
        self: &Arc<Self>,
        req: LeaveGroupRequest,
        version: i16,
    ) -> LeaveGroupResponse {
        let group = req.group_id.0.to_string();
        if version <= 2 {
            let codes = self.groups.leave(&group, &[req.member_id.to_string()]);
            return LeaveGroupResponse::default()
                .with_error_code(codes.first().copied().unwrap_or(0));
        }
        let ids: Vec<String> = req
            .members
            .iter()
            .map(|m| m.member_id.to_string())
            .collect();
        let codes = self.groups.leave(&group, &ids);
        LeaveGroupResponse::default().with_members(
            req.members
                .into_iter()
                .zip(codes)
                .map(|(m, c)| {
                    MemberResponse::default()
                        .with_member_id(m.member_id)
                        .with_group_instance_id(m.group_instance_id)
                        .with_error_code(c)
                })
                .collect(),
        )
    }

    pub(crate) fn offset_commit(&self, req: OffsetCommitRequest) -> OffsetCommitResponse {
        let offsets = req
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions.iter().map(|p| {
                    (
                        t.name.0.to_string(),
                        p.partition_index,
                        p.committed_offset,
                        p.committed_metadata.as_ref().map(|m| m.to_string()),
                    )
                })
            })
            .collect();
        let outcome = self.groups.commit(
            req.group_id.0.as_str(),
            req.generation_id_or_member_epoch,
            req.member_id.as_str(),
            offsets,
        );
        let error = outcome.err().unwrap_or(0);
        OffsetCommitResponse::default().with_topics(
            req.topics
                .into_iter()
                .map(|t| {
                    OffsetCommitResponseTopic::default()
                        .with_name(t.name)
                        .with_partitions(
                            t.partitions
                                .into_iter()
                                .map(|p| {
                                    OffsetCommitResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(error)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    }

    pub(crate) fn offset_fetch(
        &self,
        req: OffsetFetchRequest,
        version: i16,
    ) -> OffsetFetchResponse {
        if version >= 8 {
            let groups = req
                .groups
                .into_iter()
                .map(|g| {
                    let wanted = g.topics.map(|ts| {
                        ts.into_iter()
                            .map(|t| (t.name.0.to_string(), t.partition_indexes))
                            .collect()
                    });
                    let rows = self
                        .groups
                        .committed(g.group_id.0.as_str(), flatten(wanted));
                    let topics = by_topic(rows, |topic, partitions| {
                        OffsetFetchResponseTopics::default()
                            .with_name(TopicName(s(&topic)))
                            .with_partitions(
                                partitions
                                    .into_iter()
                                    .map(|(p, offset, metadata)| {
                                        OffsetFetchResponsePartitions::default()
                                            .with_partition_index(p)
                                            .with_committed_offset(offset)
                                            .with_committed_leader_epoch(-1)
                                            .with_metadata(Some(metadata))
                                    })
                                    .collect(),
                            )
                    });
                    OffsetFetchResponseGroup::default()
                        .with_group_id(g.group_id)
                        .with_topics(topics)
                })
                .collect();
            return OffsetFetchResponse::default().with_groups(groups);
        }
        let wanted = req.topics.map(|ts| {
            ts.into_iter()
                .map(|t| (t.name.0.to_string(), t.partition_indexes))
                .collect()
        });
        let rows = self
            .groups
            .committed(req.group_id.0.as_str(), flatten(wanted));
        let topics = by_topic(rows, |topic, partitions| {
            OffsetFetchResponseTopic::default()
                .with_name(TopicName(s(&topic)))
                .with_partitions(
                    partitions
                        .into_iter()
                        .map(|(p, offset, metadata)| {
                            OffsetFetchResponsePartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(offset)
                                .with_committed_leader_epoch(-1)
                                .with_metadata(Some(metadata))
                        })
                        .collect(),
                )
        });
        OffsetFetchResponse::default().with_topics(topics)
    }

    pub(crate) fn list_groups(&self, req: ListGroupsRequest) -> ListGroupsResponse {
        let wanted_states: Vec<String> = req
            .states_filter
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        ListGroupsResponse::default().with_groups(
            self.groups
                .list()
                .into_iter()
                .filter(|(_, _, state)| {
                    wanted_states.is_empty()
                        || wanted_states.contains(&state.as_str().to_ascii_lowercase())
                })
                .map(|(name, protocol_type, state)| {
                    ListedGroup::default()
                        .with_group_id(GroupId(s(&name)))
                        .with_protocol_type(s(&protocol_type))
                        .with_group_state(s(state.as_str()))
                        .with_group_type(s("classic"))
                })
                .collect(),
        )
    }

    pub(crate) fn describe_groups(&self, req: DescribeGroupsRequest) -> DescribeGroupsResponse {
        DescribeGroupsResponse::default().with_groups(
            req.groups
                .into_iter()
                .map(|g| match self.groups.describe(g.0.as_str()) {
                    Some(d) => DescribedGroup::default()
                        .with_group_id(g)
                        .with_group_state(s(d.state.as_str()))
                        .with_protocol_type(s(&d.protocol_type))
                        .with_protocol_data(s(&d.protocol))
                        .with_authorized_operations(i32::MIN)
                        .with_members(
                            d.members
                                .into_iter()
                                .map(|m| {
                                    DescribedGroupMember::default()
                                        .with_member_id(s(&m.member_id))
                                        .with_group_instance_id(opt(m.instance_id))
                                        .with_client_id(s(&m.client_id))
                                        .with_client_host(s(&m.client_host))
                                        .with_member_metadata(m.metadata)
                                        .with_member_assignment(m.assignment)
                                })
                                .collect(),
                        ),
                    // Kafka describes an unknown group as Dead with no members.
                    None => DescribedGroup::default()
                        .with_group_id(g)
                        .with_group_state(s("Dead"))
                        .with_authorized_operations(i32::MIN),
                })
                .collect(),
        )
    }

    pub(crate) fn delete_groups(&self, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
        DeleteGroupsResponse::default().with_results(
            req.groups_names
                .into_iter()
                .map(|g| {
                    let c = self.groups.delete(g.0.as_str());
                    DeletableGroupResult::default()
                        .with_group_id(g)
                        .with_error_code(c)
                })
                .collect(),
        )
    }
}
