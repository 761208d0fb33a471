//! The Kafka APIs, one module per API (the group APIs together), each owning its handler and
//! the versions it serves. [`SUPPORTED`] gathers those versions in one place: it is both what
//! ApiVersions advertises and what [`crate::server::decode_request`] accepts. [`dispatch`]
//! starts a decoded request and hands back the task that will produce its response.
//!
//! Per-partition problems become per-partition Kafka error codes; nothing here closes the
//! connection except a response that cannot be encoded.

pub mod acls;
pub mod api_versions;
pub mod authz;
pub mod client_quotas;
pub mod consumer_groups;
pub mod create_partitions;
pub mod create_topics;
pub mod delete_topics;
pub mod fetch;
pub mod init_producer_id;
pub mod list_offsets;
pub mod metadata;
pub mod produce;
pub mod sasl_auth;
pub mod scram_users;

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use kafka_protocol::messages::{ApiKey, RequestKind, ResponseHeader, TopicName};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::ResponseError;
use qanat_log::{LogError, Partition};
use tokio::task::JoinHandle;

use crate::acl::AclOperation;
use crate::records::RecordsError;
use crate::server::{Decoded, Request, Session};
use crate::topics::{Topic, TopicError};
use crate::wire::{Response, WireError};
use crate::Broker;

/// The versions this broker advertises and accepts, per API (in the order ApiVersions lists
/// them).
pub const SUPPORTED: &[(ApiKey, RangeInclusive<i16>)] = &[
    (ApiKey::Produce, produce::VERSIONS),
    (ApiKey::Fetch, fetch::VERSIONS),
    (ApiKey::ListOffsets, list_offsets::VERSIONS),
    (ApiKey::Metadata, metadata::VERSIONS),
    (ApiKey::ApiVersions, api_versions::VERSIONS),
    (ApiKey::CreateTopics, create_topics::VERSIONS),
    (ApiKey::DeleteTopics, delete_topics::VERSIONS),
    (ApiKey::CreatePartitions, create_partitions::VERSIONS),
    (ApiKey::FindCoordinator, consumer_groups::FIND_COORDINATOR),
    (ApiKey::JoinGroup, consumer_groups::JOIN_GROUP),
    (ApiKey::SyncGroup, consumer_groups::SYNC_GROUP),
    (ApiKey::Heartbeat, consumer_groups::HEARTBEAT),
    (ApiKey::LeaveGroup, consumer_groups::LEAVE_GROUP),
    (ApiKey::OffsetCommit, consumer_groups::OFFSET_COMMIT),
    (ApiKey::OffsetFetch, consumer_groups::OFFSET_FETCH),
    (ApiKey::ListGroups, consumer_groups::LIST_GROUPS),
    (ApiKey::DescribeGroups, consumer_groups::DESCRIBE_GROUPS),
    (ApiKey::DeleteGroups, consumer_groups::DELETE_GROUPS),
    (ApiKey::InitProducerId, init_producer_id::VERSIONS),
    (ApiKey::SaslHandshake, sasl_auth::HANDSHAKE_VERSIONS),
    (ApiKey::SaslAuthenticate, sasl_auth::AUTHENTICATE_VERSIONS),
    (ApiKey::DescribeAcls, acls::DESCRIBE_VERSIONS),
    (ApiKey::CreateAcls, acls::CREATE_VERSIONS),
    (ApiKey::DeleteAcls, acls::DELETE_VERSIONS),
    (
        ApiKey::DescribeClientQuotas,
        client_quotas::DESCRIBE_VERSIONS,
    ),
    (ApiKey::AlterClientQuotas, client_quotas::ALTER_VERSIONS),
    (
        ApiKey::DescribeUserScramCredentials,
        scram_users::DESCRIBE_VERSIONS,
    ),
    (
        ApiKey::AlterUserScramCredentials,
        scram_users::ALTER_VERSIONS,
    ),
];

/// The advertised range of `key`, if the broker serves it.
pub fn supported_range(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, versions)| (*versions.start(), *versions.end()))
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn code(e: ResponseError) -> i16 {
    e.code()
}

fn topic_error_code(e: &TopicError) -> i16 {
    code(match e {
        TopicError::InvalidName(_) => ResponseError::InvalidTopicException,
        TopicError::AlreadyExists(_) => ResponseError::TopicAlreadyExists,
        TopicError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        TopicError::Unknown(_) | TopicError::RecentlyDeleted { .. } => {
            ResponseError::UnknownTopicOrPartition
        }
        TopicError::Storage(_)
        | TopicError::Io { .. }
        | TopicError::OutOfFileDescriptors { .. } => ResponseError::KafkaStorageError,
    })
}

impl Broker {
    fn lookup_topic(&self, topic: &str, create: bool) -> Result<Arc<Topic>, TopicError> {
        match self.topics.get(topic) {
            Some(t) => Ok(t),
            None if create && self.config.broker.auto_create_topics => self
                .topics
                .get_or_create(
                    topic,
                    self.config.broker.default_partitions,
                    self.config.broker.auto_create_after_delete_ms,
                )
                .inspect_err(|e| {
                    if let TopicError::RecentlyDeleted { .. } = e {
                        tracing::debug!(error = %e, "auto-creation refused");
                        metrics::counter!("qanat_auto_create_refused_total", "topic" => topic.to_string())
                            .increment(1);
                    }
                }),
            None => Err(TopicError::Unknown(topic.to_string())),
        }
    }

    fn partition(&self, topic: &str, index: i32, create: bool) -> Result<Arc<Partition>, i16> {
        let t = self
            .lookup_topic(topic, create)
            .map_err(|e| topic_error_code(&e))?;
        partition_of(&t, index)
    }
}

/// Partition `index` of `topic`, or the error code for a partition it does not have.
fn partition_of(topic: &Topic, index: i32) -> Result<Arc<Partition>, i16> {
    usize::try_from(index)
        .ok()
        .and_then(|i| topic.partitions.get(i).cloned())
        .ok_or(code(ResponseError::UnknownTopicOrPartition))
}

fn log_error_code(e: &LogError) -> i16 {
    code(match e {
        LogError::CorruptBatch { .. } => ResponseError::CorruptMessage,
        LogError::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        LogError::BatchTooLarge { .. } => ResponseError::MessageTooLarge,
        LogError::Closed => ResponseError::UnknownTopicOrPartition,
        LogError::OutOfOrderSequence { .. } => ResponseError::OutOfOrderSequenceNumber,
        LogError::InvalidProducerEpoch { .. } => ResponseError::InvalidProducerEpoch,
        LogError::Unsupported { .. } => ResponseError::UnsupportedForMessageFormat,
        _ => ResponseError::KafkaStorageError,
    })
}

/// Code for a compressed batch refused at produce.
fn records_error_code(e: &RecordsError) -> i16 {
    code(match e {
        // A size problem, not damage: Kafka answers a batch over max.message.bytes this way,
        // librdkafka fails it without retrying and the Java producer splits the batch and
        // retries the halves. CORRUPT_MESSAGE is retriable for clients, so they would resend
        // the same bytes until their delivery timeout.
        RecordsError::TooLarge { .. } => ResponseError::MessageTooLarge,
        RecordsError::Corrupt { .. } => ResponseError::CorruptMessage,
    })
}

/// A started request: the task that yields its response.
pub(crate) type Pending = JoinHandle<Option<Response>>;

pub(crate) fn malformed(what: impl std::fmt::Display) -> WireError {
    WireError::Malformed(what.to_string())
}

/// Encode header + body of a `kafka-protocol` response.
pub(crate) fn encode<R: Encodable>(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &R,
) -> Result<Response, WireError> {
    let mut buf = BytesMut::with_capacity(128);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, api.response_header_version(version))
        .map_err(malformed)?;
    body.encode(&mut buf, version).map_err(malformed)?;
    Ok(Response::from_bytes(buf.freeze()))
}

pub(crate) fn ready(response: Response) -> Pending {
    tokio::spawn(async move { Some(response) })
}

/// `qanat_request_seconds` of every served API, registered once when the broker opens: a
/// label formatted and looked up per request would cost an allocation and a hash on every
/// produce and fetch.
pub(crate) struct RequestLatency {
    /// In [`SUPPORTED`] order, so Produce and Fetch are found first.
    by_api: Vec<(ApiKey, metrics::Histogram)>,
}

impl RequestLatency {
    /// The histograms in the installed recorder (no-ops without one).
    pub(crate) fn new() -> Self {
        let by_api = SUPPORTED
            .iter()
            .map(|(api, _)| {
                let label = format!("{api:?}");
                (
                    *api,
                    metrics::histogram!("qanat_request_seconds", "api" => label),
                )
            })
            .collect();
        Self { by_api }
    }

    /// The histogram of `api` (a no-op one for an API not served).
    fn of(&self, api: ApiKey) -> metrics::Histogram {
        self.by_api
            .iter()
            .find(|(a, _)| *a == api)
            .map_or_else(metrics::Histogram::noop, |(_, h)| h.clone())
    }
}

fn record_latency(latency: &metrics::Histogram, started: Instant) {
    latency.record(started.elapsed().as_secs_f64());
}

/// A response with Kafka's `throttle_time_ms`.
pub(crate) trait ThrottleTime {
    fn set_throttle_time_ms(&mut self, ms: i32);
}

macro_rules! throttle_time {
    ($($response:ty),* $(,)?) => {
        $(impl ThrottleTime for $response {
            fn set_throttle_time_ms(&mut self, ms: i32) {
                self.throttle_time_ms = ms;
            }
        })*
    };
}

use kafka_protocol::messages as m;
throttle_time!(
    m::MetadataResponse,
    m::CreateAclsResponse,
    m::DescribeAclsResponse,
    m::DeleteAclsResponse,
    m::DescribeClientQuotasResponse,
    m::AlterClientQuotasResponse,
    m::DescribeUserScramCredentialsResponse,
    m::AlterUserScramCredentialsResponse,
    m::ListOffsetsResponse,
    m::CreateTopicsResponse,
    m::DeleteTopicsResponse,
    m::CreatePartitionsResponse,
    m::FindCoordinatorResponse,
    m::JoinGroupResponse,
    m::SyncGroupResponse,
    m::HeartbeatResponse,
    m::LeaveGroupResponse,
    m::OffsetCommitResponse,
    m::OffsetFetchResponse,
    m::ListGroupsResponse,
    m::DescribeGroupsResponse,
    m::DeleteGroupsResponse,
    m::InitProducerIdResponse,
    m::ProduceResponse,
);

/// Who to charge a request's handling time to, when request quotas are metered.
#[derive(Clone)]
struct RequestQuota {
    broker: Arc<Broker>,
    session: Session,
    client_id: String,
}

impl RequestQuota {
    /// Charge `handling`; the response's `throttle_time_ms` (what is left of the mute).
    fn charge(&self, handling: std::time::Duration) -> i32 {
        self.session
            .charge_request(&self.broker, &self.client_id, handling);
        self.session.mute.throttle_time_ms()
    }
}

/// One request being answered: what its response needs, and its request quota.
struct Call {
    api: ApiKey,
    /// Where the request's handling time is recorded.
    latency: metrics::Histogram,
    version: i16,
    correlation_id: i32,
    started: Instant,
    /// None unless some `request_percentage` is set: nothing is measured then.
    quota: Option<RequestQuota>,
}

impl Call {
    /// Run a blocking handler off the reactor, charge its time to the request quota and
    /// encode its response.
    fn blocking<R, F>(&self, f: F) -> Pending
    where
        R: Encodable + ThrottleTime + Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (api, version, correlation_id, started) =
            (self.api, self.version, self.correlation_id, self.started);
        let (quota, latency) = (self.quota.clone(), self.latency.clone());
        tokio::task::spawn_blocking(move || {
            let handling = Instant::now();
            let mut body = f();
            if let Some(quota) = quota {
                body.set_throttle_time_ms(quota.charge(handling.elapsed()));
            }
            record_latency(&latency, started);
            match encode(api, version, correlation_id, &body) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(?api, version, error = %e, "cannot encode response");
                    None
                }
            }
        })
    }
}

/// Start a decoded request (received at `started`). `Ok(None)`: no response is due (acks=0).
pub(crate) async fn dispatch(
    broker: &Arc<Broker>,
    decoded: Decoded,
    started: Instant,
    session: &Session,
) -> Result<Option<Pending>, WireError> {
    let peer = session.peer;
    let Decoded {
        api,
        version,
        correlation_id,
        client_id,
        request,
    } = decoded;
    let broker = broker.clone();
    let latency = broker.request_latency.of(api);
    let call = Call {
        api,
        latency: latency.clone(),
        version,
        correlation_id,
        started,
        quota: broker.quotas.meters_requests().then(|| RequestQuota {
            broker: broker.clone(),
            session: session.clone(),
            client_id: client_id.clone(),
        }),
    };
    let kind = match request {
        Request::UnsupportedApiVersions => {
            let body = api_versions::response(ResponseError::UnsupportedVersion.code());
            return Ok(Some(ready(encode(api, 0, correlation_id, &body)?)));
        }
        Request::OldProduce(None) => return Ok(None),
        Request::OldProduce(Some(body)) => {
            let mut buf = BytesMut::with_capacity(body.len() + 4);
            buf.extend_from_slice(&correlation_id.to_be_bytes());
            buf.extend_from_slice(&body);
            return Ok(Some(ready(Response::from_bytes(buf.freeze()))));
        }
        Request::Kind(kind) => *kind,
    };
    let pending = match kind {
        RequestKind::ApiVersions(_) => ready(encode(
            api,
            version,
            correlation_id,
            &api_versions::response(0),
        )?),
        RequestKind::Metadata(req) => {
            let session = session.clone();
            call.blocking(move || broker.metadata(req, version, &session))
        }
        RequestKind::CreateAcls(req) => {
            let session = session.clone();
            call.blocking(move || broker.create_acls(req, &session))
        }
        RequestKind::DescribeAcls(req) => {
            let session = session.clone();
            call.blocking(move || broker.describe_acls(req, &session))
        }
        RequestKind::DescribeClientQuotas(req) => {
            let session = session.clone();
            call.blocking(move || broker.describe_client_quotas(req, &session))
        }
        RequestKind::AlterClientQuotas(req) => {
            let session = session.clone();
            call.blocking(move || broker.alter_client_quotas(req, &session))
        }
        RequestKind::DescribeUserScramCredentials(req) => {
            let session = session.clone();
            call.blocking(move || broker.describe_user_scram_credentials(req, &session))
        }
        RequestKind::AlterUserScramCredentials(req) => {
            let session = session.clone();
            call.blocking(move || broker.alter_user_scram_credentials(req, &session))
        }
        RequestKind::DeleteAcls(req) => {
            let session = session.clone();
            call.blocking(move || broker.delete_acls(req, &session))
        }
        RequestKind::ListOffsets(mut req) => {
            // Describe on the topic, else TOPIC_AUTHORIZATION_FAILED per partition.
            use kafka_protocol::messages::list_offsets_response::{
                ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
            };
            let denied = authz::take_refused(
                &mut req.topics,
                |t| broker.topic_allowed(session, AclOperation::Describe, t.name.as_str()),
                |t| {
                    ListOffsetsTopicResponse::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    ListOffsetsPartitionResponse::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(authz::TOPIC_DENIED)
                                        .with_offset(-1)
                                        .with_timestamp(-1)
                                })
                                .collect(),
                        )
                },
            );
            call.blocking(move || {
                let mut body = broker.list_offsets(req);
                body.topics.extend(denied);
                body
            })
        }
        RequestKind::CreateTopics(req) => {
            let (req, denied) = authz::split_create_topics(&broker, session, req);
            call.blocking(move || authz::merge_create_topics(broker.create_topics(req), denied))
        }
        RequestKind::DeleteTopics(req) => {
            let (req, denied) = authz::split_delete_topics(&broker, session, req);
            call.blocking(move || {
                authz::merge_delete_topics(broker.delete_topics(req, version), denied)
            })
        }
        RequestKind::CreatePartitions(mut req) => {
            // Alter on the topic, else TOPIC_AUTHORIZATION_FAILED.
            use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
            let denied = authz::take_refused(
                &mut req.topics,
                |t| broker.topic_allowed(session, AclOperation::Alter, t.name.as_str()),
                |t| {
                    CreatePartitionsTopicResult::default()
                        .with_name(t.name.clone())
                        .with_error_code(authz::TOPIC_DENIED)
                },
            );
            call.blocking(move || {
                let mut body = broker.create_partitions(req);
                body.results.extend(denied);
                body
            })
        }
        RequestKind::FindCoordinator(req) => {
            let session = session.clone();
            call.blocking(move || broker.authorized_find_coordinator(req, version, &session))
        }
        RequestKind::JoinGroup(req)
            if !broker.group_allowed(session, AclOperation::Read, req.group_id.as_str()) =>
        {
            ready(encode(
                api,
                version,
                correlation_id,
                &authz::join_refused(req.member_id),
            )?)
        }
        RequestKind::SyncGroup(req)
            if !broker.group_allowed(session, AclOperation::Read, req.group_id.as_str()) =>
        {
            ready(encode(
                api,
                version,
                correlation_id,
                &authz::sync_refused(),
            )?)
        }
        RequestKind::Heartbeat(req)
            if !broker.group_allowed(session, AclOperation::Read, req.group_id.as_str()) =>
        {
            ready(encode(
                api,
                version,
                correlation_id,
                &authz::heartbeat_refused(),
            )?)
        }
        RequestKind::LeaveGroup(req)
            if !broker.group_allowed(session, AclOperation::Read, req.group_id.as_str()) =>
        {
            ready(encode(
                api,
                version,
                correlation_id,
                &authz::leave_refused(),
            )?)
        }
        RequestKind::JoinGroup(req) => tokio::spawn(async move {
            // Kafka shows the host as "/ip".
            let host = format!("/{}", peer.ip());
            let mut body = broker.join_group(req, version, client_id, host).await;
            if let Some(quota) = &call.quota {
                // The wait for the rebalance is not handling: nothing more to charge.
                body.throttle_time_ms = quota.session.mute.throttle_time_ms();
            }
            record_latency(&latency, started);
            encode(api, version, correlation_id, &body).ok()
        }),
        RequestKind::SyncGroup(req) => tokio::spawn(async move {
            let mut body = broker.sync_group(req).await;
            if let Some(quota) = &call.quota {
                body.throttle_time_ms = quota.session.mute.throttle_time_ms();
            }
            record_latency(&latency, started);
            encode(api, version, correlation_id, &body).ok()
        }),
        RequestKind::Heartbeat(req) => call.blocking(move || broker.heartbeat(req)),
        RequestKind::LeaveGroup(req) => call.blocking(move || broker.leave_group(req, version)),
        RequestKind::OffsetCommit(req) => match authz::check_offset_commit(&broker, session, req) {
            authz::CommitCheck::Refused(body) => {
                ready(encode(api, version, correlation_id, &body)?)
            }
            authz::CommitCheck::Run(req, denied) => call.blocking(move || {
                let mut body = broker.offset_commit(req);
                body.topics.extend(denied);
                body
            }),
        },
        RequestKind::OffsetFetch(req) => {
            let session = session.clone();
            call.blocking(move || broker.authorized_offset_fetch(req, version, &session))
        }
        RequestKind::ListGroups(req) => {
            let session = session.clone();
            call.blocking(move || broker.authorized_list_groups(req, &session))
        }
        RequestKind::DescribeGroups(mut req) => {
            // Describe on the group, else GROUP_AUTHORIZATION_FAILED for that group.
            use kafka_protocol::messages::describe_groups_response::DescribedGroup;
            let denied = authz::take_refused(
                &mut req.groups,
                |g| broker.group_allowed(session, AclOperation::Describe, g.as_str()),
                |g| {
                    DescribedGroup::default()
                        .with_group_id(g.clone())
                        .with_error_code(authz::GROUP_DENIED)
                        .with_authorized_operations(i32::MIN)
                },
            );
            call.blocking(move || {
                let mut body = broker.describe_groups(req);
                body.groups.extend(denied);
                body
            })
        }
        RequestKind::DeleteGroups(mut req) => {
            // Delete on the group, else GROUP_AUTHORIZATION_FAILED for that group.
            use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
            let denied = authz::take_refused(
                &mut req.groups_names,
                |g| broker.group_allowed(session, AclOperation::Delete, g.as_str()),
                |g| {
                    DeletableGroupResult::default()
                        .with_group_id(g.clone())
                        .with_error_code(authz::GROUP_DENIED)
                },
            );
            call.blocking(move || {
                let mut body = broker.delete_groups(req);
                body.results.extend(denied);
                body
            })
        }
        RequestKind::InitProducerId(req) => {
            let session = session.clone();
            call.blocking(move || broker.authorized_init_producer_id(req, &session))
        }
        RequestKind::Fetch(req) => tokio::spawn({
            let denied = broker.denied_topics(
                session,
                AclOperation::Read,
                req.topics.iter().map(|t| t.topic.as_str()),
            );
            let session = session.clone();
            async move {
                let (mut response, handling) =
                    broker.fetch(req, version, correlation_id, denied).await?;
                metrics::counter!("qanat_fetch_response_bytes_total").increment(response.len());
                // Over a consumer_byte_rate quota the connection is muted for a while, and the
                // response says for how long (Kafka's throttle_time_ms, KIP-219). The mute
                // starts now, before the response is written, so the connection's next
                // request already waits for it.
                let throttle = broker.quotas.record(
                    session.user(),
                    &client_id,
                    crate::quotas::Kind::Fetch,
                    response.len(),
                );
                session.throttle(throttle, "byte_rate");
                session.charge_request(&broker, &client_id, handling);
                crate::fetch_response::set_throttle_time(
                    &mut response,
                    version,
                    session.mute.remaining().max(throttle),
                );
                record_latency(&latency, started);
                Some(response)
            }
        }),
        RequestKind::Produce(req) => {
            // Appended here, before the next frame is read, so appends keep arrival order;
            // only the acknowledgement (which may wait for fdatasync) runs concurrently.
            let denied = broker.denied_topics(
                session,
                AclOperation::Write,
                req.topic_data.iter().map(|t| t.name.as_str()),
            );
            let bytes: u64 = req
                .topic_data
                .iter()
                .flat_map(|t| &t.partition_data)
                .filter_map(|p| p.records.as_ref().map(|r| r.len() as u64))
                .sum();
            let throttle = broker.quotas.record(
                session.user(),
                &client_id,
                crate::quotas::Kind::Produce,
                bytes,
            );
            session.throttle(throttle, "byte_rate");
            let Some(ack) = produce::append(&broker, req, denied).await? else {
                record_latency(&latency, started);
                return Ok(None);
            };
            // The append's time is charged by the reader, which ran it.
            let mute = session.mute.clone();
            tokio::spawn(async move {
                let mut body = ack.wait().await;
                let left = mute.remaining();
                body.throttle_time_ms =
                    i32::try_from(left.max(throttle).as_millis()).unwrap_or(i32::MAX);
                record_latency(&latency, started);
                match encode(api, version, correlation_id, &body) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode produce response");
                        None
                    }
                }
            })
        }
        _ => {
            // decode_request lets through only the APIs in the supported list.
            return Err(malformed(format!("{api:?} is not served by this broker")));
        }
    };
    Ok(Some(pending))
}

/// Brokers over in-memory storage and requests for the API modules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;
    use std::sync::Arc;

    use bytes::{Bytes, BytesMut};
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{
        ApiKey, FetchRequest, FetchResponse, ProduceRequest, ResponseHeader, TopicName,
    };
    use kafka_protocol::protocol::{Decodable, StrBytes};
    use qanat_log::batch::{encode_batch, SimpleRecord};
    use qanat_log::{ManualClock, SimStorage, Storage};

    use crate::wire::{Chunk, Response};
    use crate::{Broker, Config};

    /// A broker on a fresh [`SimStorage`] (returned too, to inject faults).
    pub fn broker(config: Config) -> (Arc<Broker>, Arc<SimStorage>) {
        let sim = Arc::new(SimStorage::new());
        (broker_on(config, sim.clone()), sim)
    }

    /// A broker over `storage`.
    pub fn broker_on(config: Config, storage: Arc<dyn Storage>) -> Arc<Broker> {
        let broker = Broker::open(
            config,
            Path::new("/data"),
            storage,
            Arc::new(ManualClock::new(1_000)),
            ("127.0.0.1".to_string(), 9092),
        )
        .expect("open broker");
        Arc::new(broker)
    }

    pub fn topic_name(name: &str) -> TopicName {
        TopicName(StrBytes::from_string(name.to_string()))
    }

    /// One uncompressed batch of one record per value.
    pub fn batch(values: &[&[u8]]) -> Vec<u8> {
        let records: Vec<_> = values
            .iter()
            .map(|v| SimpleRecord {
                timestamp: 1_000,
                key: None,
                value: Some(v),
            })
            .collect();
        encode_batch(&records)
    }

    pub fn produce_request(
        topic: &str,
        partition: i32,
        acks: i16,
        records: &[u8],
    ) -> ProduceRequest {
        ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic_name(topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(Bytes::copy_from_slice(records)))])])
    }

    /// A response's bytes, file ranges read from their files.
    pub fn response_bytes(response: Response) -> Bytes {
        let mut out = BytesMut::new();
        for chunk in response.chunks {
            match chunk {
                Chunk::Bytes(b) => out.extend_from_slice(&b),
                Chunk::File(f) => {
                    let mut buf = vec![0; f.len as usize];
                    f.file
                        .read_exact_at(&mut buf, f.position)
                        .expect("read file range");
                    out.extend_from_slice(&buf);
                }
            }
        }
        out.freeze()
    }

    /// A fetch of one partition from `offset`, waiting up to `max_wait_ms` for one byte.
    pub fn fetch_request(
        topic: &str,
        partition: i32,
        offset: i64,
        max_wait_ms: i32,
    ) -> FetchRequest {
        FetchRequest::default()
            .with_max_wait_ms(max_wait_ms)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(topic_name(topic))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(partition)
                    .with_fetch_offset(offset)
                    .with_partition_max_bytes(1 << 20)])])
    }

    /// Decode a whole FetchResponse frame (header included) with `kafka-protocol`.
    pub fn decode_fetch(response: Response, version: i16) -> FetchResponse {
        let mut bytes = response_bytes(response);
        ResponseHeader::decode(&mut bytes, ApiKey::Fetch.response_header_version(version))
            .expect("response header");
        let decoded = FetchResponse::decode(&mut bytes, version).expect("fetch response");
        assert!(bytes.is_empty(), "{} bytes after the response", bytes.len());
        decoded
    }
}

#[cfg(test)]
mod quota_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use kafka_protocol::messages::{MetadataRequest, MetadataResponse};
    use kafka_protocol::protocol::Decodable;
    use qanat_log::{ManualClock, OsStorage};

    use super::*;
    use crate::config::SecurityProtocol;
    use crate::listener::ListenerInfo;
    use crate::quotas::{Entity, CONSUMER_BYTE_RATE, REQUEST_PERCENTAGE};
    use crate::Config;

    fn broker_with_quota(
        client_id: &str,
        key: &str,
        value: f64,
    ) -> (tempfile::TempDir, Arc<Broker>) {
        let dir = tempfile::tempdir().unwrap();
        let broker = Arc::new(
            Broker::open(
                Config::default(),
                dir.path(),
                Arc::new(OsStorage),
                Arc::new(ManualClock::new(1_000)),
                ("127.0.0.1".into(), 9092),
            )
            .unwrap(),
        );
        broker
            .quotas
            .alter(vec![(
                Entity {
                    user: None,
                    client_id: Some(Some(client_id.into())),
                },
                key.into(),
                Some(value),
            )])
            .unwrap();
        (dir, broker)
    }

    fn session() -> Session {
        Session::new(
            Arc::new(ListenerInfo {
                name: "PLAINTEXT".into(),
                protocol: SecurityProtocol::Plaintext,
                advertised: ("127.0.0.1".into(), 9092),
            }),
            "127.0.0.1:5000".parse().unwrap(),
            "User:ANONYMOUS".into(),
        )
    }

    async fn answer(
        broker: &Arc<Broker>,
        session: &Session,
        client_id: &str,
        kind: RequestKind,
        api: ApiKey,
        version: i16,
    ) -> Response {
        let decoded = Decoded {
            api,
            version,
            correlation_id: 1,
            client_id: client_id.into(),
            request: Request::Kind(Box::new(kind)),
        };
        let pending = dispatch(broker, decoded, Instant::now(), session)
            .await
            .unwrap()
            .expect("answered");
        pending.await.unwrap().expect("a response")
    }

    /// A fetch over `consumer_byte_rate` says how long it is throttled in `throttle_time_ms`,
    /// and its connection is muted from the moment the response is ready (so the very next
    /// request waits, KIP-219); another client id is not throttled.
    #[tokio::test]
    async fn fetch_over_its_quota_reports_throttle_time_and_mutes_at_once() {
        let (_dir, broker) = broker_with_quota("slow", CONSUMER_BYTE_RATE, 1.0);
        let fetch = |client_id: &'static str| {
            let broker = broker.clone();
            async move {
                let session = session();
                let kind = RequestKind::Fetch(testing::fetch_request("t", 0, 0, 0));
                let response = answer(&broker, &session, client_id, kind, ApiKey::Fetch, 12).await;
                // Read as soon as the response exists, before anything is written.
                let muted = session.mute.remaining();
                let body = testing::decode_fetch(response, 12);
                (body.throttle_time_ms, muted)
            }
        };
        let (throttle_ms, muted) = fetch("slow").await;
        // A response of some tens of bytes at 1 byte/s: throttled for the longest allowed.
        assert!(throttle_ms > 0, "throttle_time_ms = {throttle_ms}");
        assert!(
            !muted.is_zero(),
            "the connection is muted once the response is ready"
        );
        assert!(muted <= Duration::from_millis(u64::try_from(throttle_ms).unwrap()));
        assert!(muted <= Duration::from_secs(10));
        assert_eq!(fetch("fast").await, (0, Duration::ZERO));
    }

    fn metadata_throttle(response: Response) -> i32 {
        let mut bytes = testing::response_bytes(response);
        kafka_protocol::messages::ResponseHeader::decode(
            &mut bytes,
            ApiKey::Metadata.response_header_version(9),
        )
        .unwrap();
        MetadataResponse::decode(&mut bytes, 9)
            .unwrap()
            .throttle_time_ms
    }

    /// Under a tiny `request_percentage` a client's requests soon come back with
    /// `throttle_time_ms` and mute its connection; another client id is never throttled.
    #[tokio::test]
    async fn requests_over_the_request_quota_are_throttled() {
        // A millionth of a percent of a thread: a nanosecond of handling costs a second.
        let (_dir, broker) = broker_with_quota("busy", REQUEST_PERCENTAGE, 0.000_001);
        let (busy, other) = (session(), session());
        let metadata = || RequestKind::Metadata(MetadataRequest::default().with_topics(None));
        let mut throttles = Vec::new();
        for _ in 0..3 {
            let r = answer(&broker, &busy, "busy", metadata(), ApiKey::Metadata, 9).await;
            throttles.push(metadata_throttle(r));
            let r = answer(&broker, &other, "other", metadata(), ApiKey::Metadata, 9).await;
            assert_eq!(metadata_throttle(r), 0, "a client without a quota");
        }
        assert!(
            throttles.iter().all(|t| *t > 0),
            "every request is over the quota: {throttles:?}"
        );
        assert!(!busy.mute.remaining().is_zero());
        assert!(other.mute.remaining().is_zero());
    }
}
