//! Request handlers: one function per Kafka API, each turning a decoded request into a
//! response body. Per-partition problems become per-partition Kafka error codes; nothing here
//! closes the connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::{
    api_versions_response::{ApiVersion, ApiVersionsResponse},
    create_partitions_response::{CreatePartitionsResponse, CreatePartitionsTopicResult},
    create_topics_response::{CreatableTopicResult, CreateTopicsResponse},
    delete_topics_response::{DeletableTopicResult, DeleteTopicsResponse},
    init_producer_id_response::InitProducerIdResponse,
    list_offsets_response::{
        ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
    },
    metadata_response::{
        MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
    },
    produce_response::{PartitionProduceResponse, ProduceResponse, TopicProduceResponse},
    ApiKey, BrokerId, CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest,
    FetchRequest, InitProducerIdRequest, ListOffsetsRequest, MetadataRequest, ProduceRequest,
    ProducerId, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use qanat_log::{AppendOutcome, LogError, Partition};

use crate::fetch_response::{self, PartitionOut, TopicOut};
use crate::records::RecordsError;
use crate::topics::{Topic, TopicError};
use crate::wire::Response;
use crate::Broker;

/// The versions this broker advertises and accepts, per API.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    // Minimum 0 on purpose: librdkafka stops compressing when Produce's minimum is above 0.
    // Versions 0–2 are refused per partition with UNSUPPORTED_VERSION.
    (ApiKey::Produce, 0, 9),
    // 13+ identifies topics by id only.
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    // OffsetCommit/OffsetFetch 9+ belong to the KIP-848 protocol, 10+ use topic ids.
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::InitProducerId, 0, 4),
];

/// The advertised range of `key`, if the broker serves it.
pub fn supported_range(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, lo, hi)| (*lo, *hi))
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

pub fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED
                .iter()
                .map(|(k, lo, hi)| {
                    ApiVersion::default()
                        .with_api_key(*k as i16)
                        .with_min_version(*lo)
                        .with_max_version(*hi)
                })
                .collect(),
        )
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

    pub(crate) fn metadata(&self, req: MetadataRequest, version: i16) -> MetadataResponse {
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
        let topics = match requested {
            None => self.topics.all().into_iter().map(Ok).collect::<Vec<_>>(),
            Some(names) => names
                .into_iter()
                .map(|n| self.lookup_topic(&n, auto_create).map_err(|e| (n, e)))
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
                    .with_error_code(topic_error_code(&e))
                    .with_topic_authorized_operations(i32::MIN),
            })
            .collect();
        MetadataResponse::default()
            .with_brokers(vec![MetadataResponseBroker::default()
                .with_node_id(BrokerId(node))
                .with_host(StrBytes::from_string(self.advertised.0.clone()))
                .with_port(self.advertised.1)])
            .with_cluster_id(Some(StrBytes::from_static_str("qanat")))
            .with_controller_id(BrokerId(node))
            .with_cluster_authorized_operations(i32::MIN)
            .with_topics(topics)
    }

    /// Validate and append every partition's batches, in request order. Blocking.
    pub(crate) fn produce_append(&self, req: &ProduceRequest) -> Vec<ProducePartitionResult> {
        let mut results = Vec::new();
        for topic in &req.topic_data {
            let topic_name = topic.name.0.as_str();
            for data in &topic.partition_data {
                let outcome = match self.partition(topic_name, data.index, true) {
                    Err(c) => Err(c),
                    Ok(partition) => {
                        let records = data.records.as_deref().unwrap_or_default();
                        let limit = self.config.broker.max_uncompressed_batch_bytes;
                        if let Err(refused) = crate::records::validate_produce(records, limit) {
                            tracing::warn!(
                                topic = topic_name,
                                partition = data.index,
                                batch_bytes = refused.batch_bytes,
                                uncompressed_bytes = refused.uncompressed_bytes,
                                max_uncompressed_batch_bytes = limit,
                                error = %refused,
                                "produce refused: compressed batch"
                            );
                            results.push(ProducePartitionResult {
                                topic: topic_name.to_string(),
                                index: data.index,
                                outcome: Err(records_error_code(&refused.source)),
                            });
                            continue;
                        }
                        match partition.append(records) {
                            Ok(outcome) => {
                                if outcome.duplicate {
                                    metrics::counter!("qanat_produce_duplicates_total", "topic" => topic_name.to_string())
                                        .increment(1);
                                }
                                metrics::counter!("qanat_bytes_in_total", "topic" => topic_name.to_string())
                                    .increment(outcome.bytes);
                                metrics::counter!("qanat_records_in_total", "topic" => topic_name.to_string())
                                    .increment(outcome.records);
                                Ok((partition, outcome))
                            }
                            Err(e) => {
                                tracing::warn!(topic = topic_name, partition = data.index, error = %e, "produce refused");
                                Err(log_error_code(&e))
                            }
                        }
                    }
                };
                results.push(ProducePartitionResult {
                    topic: topic_name.to_string(),
                    index: data.index,
                    outcome,
                });
            }
        }
        if results.iter().any(|r| r.outcome.is_ok()) {
            self.data_arrived.notify_waiters();
        }
        results
    }

    pub(crate) fn produce_response(
        &self,
        results: Vec<ProducePartitionResult>,
        sync_failed: bool,
    ) -> ProduceResponse {
        let mut topics: Vec<TopicProduceResponse> = Vec::new();
        for r in results {
            let partition = match r.outcome {
                Ok((
                    p,
                    AppendOutcome {
                        base_offset,
                        log_append_time,
                        ..
                    },
                )) => PartitionProduceResponse::default()
                    .with_index(r.index)
                    .with_error_code(if sync_failed {
                        code(ResponseError::KafkaStorageError)
                    } else {
                        0
                    })
                    .with_base_offset(base_offset)
                    .with_log_append_time_ms(log_append_time.unwrap_or(-1))
                    .with_log_start_offset(p.log_start_offset()),
                Err(c) => PartitionProduceResponse::default()
                    .with_index(r.index)
                    .with_error_code(c)
                    .with_base_offset(-1)
                    .with_log_append_time_ms(-1)
                    .with_log_start_offset(-1),
            };
            match topics.last_mut() {
                Some(t) if t.name.0.as_str() == r.topic => t.partition_responses.push(partition),
                _ => topics.push(
                    TopicProduceResponse::default()
                        .with_name(name(&r.topic))
                        .with_partition_responses(vec![partition]),
                ),
            }
        }
        ProduceResponse::default().with_responses(topics)
    }

    /// Serve a fetch, waiting up to `max_wait_ms` for `min_bytes` to arrive.
    pub(crate) async fn fetch(
        &self,
        req: FetchRequest,
        version: i16,
        correlation_id: i32,
    ) -> Response {
        let deadline =
            Instant::now() + Duration::from_millis(req.max_wait_ms.clamp(0, 300_000) as u64);
        let min_bytes = req.min_bytes.max(0) as u64;
        loop {
            let notified = self.data_arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (topics, bytes) = self.fetch_once(&req);
            let errors = topics
                .iter()
                .flat_map(|t| &t.partitions)
                .any(|p| p.error_code != 0);
            if bytes >= min_bytes || errors || Instant::now() >= deadline {
                return fetch_response::encode(version, correlation_id, 0, topics);
            }
            let shutting_down = self.shutdown.clone();
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = shutting_down.notified() => {}
            }
        }
    }

    fn fetch_once(&self, req: &FetchRequest) -> (Vec<TopicOut>, u64) {
        let mut budget = if req.max_bytes > 0 {
            req.max_bytes as u64
        } else {
            u64::MAX
        };
        let mut total = 0u64;
        let mut topics = Vec::with_capacity(req.topics.len());
        for t in &req.topics {
            let topic_name = t.topic.0.as_str();
            let mut partitions = Vec::with_capacity(t.partitions.len());
            for p in &t.partitions {
                let mut out = PartitionOut {
                    index: p.partition,
                    error_code: 0,
                    high_watermark: -1,
                    log_start_offset: -1,
                    records: Vec::new(),
                };
                match self.partition(topic_name, p.partition, false) {
                    Err(c) => out.error_code = c,
                    Ok(partition) => {
                        out.high_watermark = partition.high_watermark();
                        out.log_start_offset = partition.log_start_offset();
                        // KIP-74: the first batch is served whole even past the limits, so a
                        // consumer can always make progress; later partitions respect them.
                        let limit = (p.partition_max_bytes.max(0) as u64).min(budget);
                        if total > 0 && limit == 0 {
                            partitions.push(out);
                            continue;
                        }
                        match partition.read(p.fetch_offset, limit.max(1)) {
                            Ok(read) => {
                                out.high_watermark = read.high_watermark;
                                out.log_start_offset = read.log_start_offset;
                                let served_end = read.next_offset;
                                out.records = read.slices;
                                let n = out.records_len();
                                total += n;
                                budget = budget.saturating_sub(n);
                                if n > 0 {
                                    metrics::counter!("qanat_bytes_out_total", "topic" => topic_name.to_string())
                                        .increment(n);
                                    // Records the consumer takes: from its offset to the end served.
                                    let records = (served_end - p.fetch_offset).max(0) as u64;
                                    metrics::counter!("qanat_records_out_total", "topic" => topic_name.to_string())
                                        .increment(records);
                                }
                            }
                            Err(e) => out.error_code = log_error_code(&e),
                        }
                    }
                }
                partitions.push(out);
            }
            topics.push(TopicOut {
                name: topic_name.to_string(),
                partitions,
            });
        }
        (topics, total)
    }

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
        self.data_arrived.notify_waiters();
        DeleteTopicsResponse::default().with_responses(responses)
    }

    pub(crate) fn init_producer_id(&self, req: InitProducerIdRequest) -> InitProducerIdResponse {
        let refuse = |e: ResponseError| {
            InitProducerIdResponse::default()
                .with_error_code(code(e))
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
        };
        if req.transactional_id.is_some() {
            tracing::warn!(
                "InitProducerId with a transactional id refused: transactions are not supported"
            );
            return refuse(ResponseError::InvalidRequest);
        }
        // KIP-360: a known producer may ask to bump its epoch instead of getting a new id.
        if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
            if !self.groups.producer_id_issued(req.producer_id.0) {
                return refuse(ResponseError::InvalidProducerIdMapping);
            }
            return InitProducerIdResponse::default()
                .with_producer_id(req.producer_id)
                .with_producer_epoch(req.producer_epoch + 1);
        }
        match self.groups.next_producer_id() {
            Ok(id) => InitProducerIdResponse::default()
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(0),
            Err(_) => refuse(ResponseError::KafkaStorageError),
        }
    }

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

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

/// Outcome of appending one partition's batches of a produce request.
pub(crate) struct ProducePartitionResult {
    pub topic: String,
    pub index: i32,
    pub outcome: Result<(Arc<Partition>, AppendOutcome), i16>,
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

/// Produce v0–v2 (magic 0/1 message sets) is refused per partition with UNSUPPORTED_VERSION.
/// `kafka-protocol` does not decode these versions, so the few fields needed are read here.
pub(crate) fn refuse_old_produce(body: &mut Bytes, version: i16) -> Option<Bytes> {
    use bytes::{Buf, BufMut, BytesMut};
    fn string(b: &mut Bytes) -> Option<Bytes> {
        let n = usize::try_from(b.try_get_i16().ok()?).ok()?;
        (b.remaining() >= n).then(|| b.split_to(n))
    }
    fn count(b: &mut Bytes) -> Option<usize> {
        let n = usize::try_from(b.try_get_i32().ok()?).ok()?;
        (n <= b.remaining()).then_some(n)
    }
    let acks = body.try_get_i16().ok()?;
    body.try_get_i32().ok()?; // timeout
    let mut out = BytesMut::new();
    let topics = count(body)?;
    out.put_i32(topics as i32);
    for _ in 0..topics {
        let topic = string(body)?;
        out.put_i16(topic.len() as i16);
        out.put_slice(&topic);
        let partitions = count(body)?;
        out.put_i32(partitions as i32);
        for _ in 0..partitions {
            let index = body.try_get_i32().ok()?;
            let len = body.try_get_i32().ok()?;
            body.advance(usize::try_from(len).ok()?.min(body.remaining()));
            out.put_i32(index);
            out.put_i16(code(ResponseError::UnsupportedVersion));
            out.put_i64(-1);
            if version >= 2 {
                out.put_i64(-1);
            }
        }
    }
    if version >= 1 {
        out.put_i32(0);
    }
    (acks != 0).then(|| out.freeze())
}
