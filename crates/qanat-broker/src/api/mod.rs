//! The Kafka APIs, one module per API (the group APIs together), each owning its handler and
//! the versions it serves. [`SUPPORTED`] gathers those versions in one place: it is both what
//! ApiVersions advertises and what [`crate::server::decode_request`] accepts. [`dispatch`]
//! starts a decoded request and hands back the task that will produce its response.
//!
//! Per-partition problems become per-partition Kafka error codes; nothing here closes the
//! connection except a response that cannot be encoded.

pub mod api_versions;
pub mod consumer_groups;
pub mod create_partitions;
pub mod create_topics;
pub mod delete_topics;
pub mod fetch;
pub mod init_producer_id;
pub mod list_offsets;
pub mod metadata;
pub mod produce;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use kafka_protocol::messages::{ApiKey, RequestKind, ResponseHeader, TopicName};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::ResponseError;
use qanat_log::{LogError, Partition};
use tokio::task::JoinHandle;

use crate::records::RecordsError;
use crate::server::{Decoded, Request};
use crate::topics::{Topic, TopicError};
use crate::wire::{Response, WireError};
use crate::{timed_sync, Broker};

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
        usize::try_from(index)
            .ok()
            .and_then(|i| t.partitions.get(i).cloned())
            .ok_or(code(ResponseError::UnknownTopicOrPartition))
    }
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
fn encode<R: Encodable>(
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

fn ready(response: Response) -> Pending {
    tokio::spawn(async move { Some(response) })
}

fn record_latency(api: ApiKey, started: Instant) {
    metrics::histogram!("qanat_request_seconds", "api" => format!("{api:?}"))
        .record(started.elapsed().as_secs_f64());
}

/// Run a blocking handler off the reactor and encode its response.
fn blocking<R, F>(api: ApiKey, version: i16, correlation_id: i32, started: Instant, f: F) -> Pending
where
    R: Encodable + Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let body = f();
        record_latency(api, started);
        match encode(api, version, correlation_id, &body) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(?api, version, error = %e, "cannot encode response");
                None
            }
        }
    })
}

/// Start a decoded request (received at `started`). `Ok(None)`: no response is due (acks=0).
pub(crate) async fn dispatch(
    broker: &Arc<Broker>,
    decoded: Decoded,
    started: Instant,
    peer: SocketAddr,
) -> Result<Option<Pending>, WireError> {
    let Decoded {
        api,
        version,
        correlation_id,
        client_id,
        request,
    } = decoded;
    let broker = broker.clone();
    let pending = match request {
        Request::UnsupportedApiVersions => {
            let body = api_versions::response(ResponseError::UnsupportedVersion.code());
            ready(encode(api, 0, correlation_id, &body)?)
        }
        Request::Kind(RequestKind::ApiVersions(_)) => ready(encode(
            api,
            version,
            correlation_id,
            &api_versions::response(0),
        )?),
        Request::OldProduce(None) => return Ok(None),
        Request::OldProduce(Some(body)) => {
            let mut buf = BytesMut::with_capacity(body.len() + 4);
            buf.extend_from_slice(&correlation_id.to_be_bytes());
            buf.extend_from_slice(&body);
            ready(Response::from_bytes(buf.freeze()))
        }
        Request::Kind(RequestKind::Metadata(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.metadata(req, version)
            })
        }
        Request::Kind(RequestKind::ListOffsets(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.list_offsets(req)
            })
        }
        Request::Kind(RequestKind::CreateTopics(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.create_topics(req)
            })
        }
        Request::Kind(RequestKind::DeleteTopics(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.delete_topics(req, version)
            })
        }
        Request::Kind(RequestKind::CreatePartitions(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.create_partitions(req)
            })
        }
        Request::Kind(RequestKind::FindCoordinator(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.find_coordinator(req, version)
            })
        }
        Request::Kind(RequestKind::JoinGroup(req)) => tokio::spawn(async move {
            // Kafka shows the host as "/ip".
            let host = format!("/{}", peer.ip());
            let body = broker.join_group(req, version, client_id, host).await;
            record_latency(api, started);
            encode(api, version, correlation_id, &body).ok()
        }),
        Request::Kind(RequestKind::SyncGroup(req)) => tokio::spawn(async move {
            let body = broker.sync_group(req).await;
            record_latency(api, started);
            encode(api, version, correlation_id, &body).ok()
        }),
        Request::Kind(RequestKind::Heartbeat(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.heartbeat(req)
            })
        }
        Request::Kind(RequestKind::LeaveGroup(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.leave_group(req, version)
            })
        }
        Request::Kind(RequestKind::OffsetCommit(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.offset_commit(req)
            })
        }
        Request::Kind(RequestKind::OffsetFetch(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.offset_fetch(req, version)
            })
        }
        Request::Kind(RequestKind::ListGroups(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.list_groups(req)
            })
        }
        Request::Kind(RequestKind::DescribeGroups(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.describe_groups(req)
            })
        }
        Request::Kind(RequestKind::DeleteGroups(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.delete_groups(req)
            })
        }
        Request::Kind(RequestKind::InitProducerId(req)) => {
            blocking(api, version, correlation_id, started, move || {
                broker.init_producer_id(req)
            })
        }
        Request::Kind(RequestKind::Fetch(req)) => tokio::spawn(async move {
            let response = broker.fetch(req, version, correlation_id).await;
            metrics::counter!("qanat_fetch_response_bytes_total").increment(response.len());
            record_latency(api, started);
            Some(response)
        }),
        Request::Kind(RequestKind::Produce(req)) => {
            let acks = req.acks;
            if !matches!(acks, -1..=1) {
                let results = req
                    .topic_data
                    .iter()
                    .flat_map(|t| {
                        t.partition_data
                            .iter()
                            .map(|p| produce::ProducePartitionResult {
                                topic: t.name.0.to_string(),
                                index: p.index,
                                outcome: Err(ResponseError::InvalidRequiredAcks.code()),
                            })
                    })
                    .collect();
                let body = broker.produce_response(results, false);
                return Ok(Some(ready(encode(api, version, correlation_id, &body)?)));
            }
            // Appends run here, before the next frame is read, so they keep arrival order.
            let appender = broker.clone();
            let results = tokio::task::spawn_blocking(move || appender.produce_append(&req))
                .await
                .map_err(|e| malformed(format!("produce task failed: {e}")))?;
            if acks == 0 {
                record_latency(api, started);
                return Ok(None);
            }
            tokio::spawn(async move {
                let mut sync_failed = false;
                if broker.sync_on_ack() {
                    let targets: Vec<_> = results
                        .iter()
                        .filter_map(|r| r.outcome.as_ref().ok())
                        .map(|(p, o)| (p.clone(), *o))
                        .collect();
                    sync_failed = tokio::task::spawn_blocking(move || {
                        targets
                            .iter()
                            .any(|(p, appended)| match timed_sync(p, Some(appended)) {
                                Ok(()) => false,
                                Err(e) => {
                                    tracing::error!(error = %e, "fdatasync failed; produce not acknowledged");
                                    true
                                }
                            })
                    })
                    .await
                    .unwrap_or(true);
                    // Readers see data only once it is durable in this mode: wake long polls.
                    broker.data_arrived.notify_waiters();
                }
                let body = broker.produce_response(results, sync_failed);
                record_latency(api, started);
                match encode(api, version, correlation_id, &body) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode produce response");
                        None
                    }
                }
            })
        }
        Request::Kind(_) => {
            // decode_request lets through only the APIs in the supported list.
            return Err(malformed(format!("{api:?} is not served by this broker")));
        }
    };
    Ok(Some(pending))
}
