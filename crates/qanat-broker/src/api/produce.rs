//! Produce: every partition's batches validated and appended in request order; v0–v2
//! (magic 0/1 message sets) refused per partition without decoding the records.

use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::{
    produce_response::{PartitionProduceResponse, ProduceResponse, TopicProduceResponse},
    ProduceRequest,
};
use kafka_protocol::ResponseError;
use qanat_log::{AppendOutcome, Partition};

use super::{code, log_error_code, name, records_error_code};
use crate::Broker;

/// Minimum 0 on purpose: librdkafka stops compressing when Produce's minimum is above 0.
/// Versions 0–2 are refused per partition with UNSUPPORTED_VERSION.
pub const VERSIONS: RangeInclusive<i16> = 0..=9;

impl Broker {
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
}

/// Outcome of appending one partition's batches of a produce request.
pub(crate) struct ProducePartitionResult {
    pub topic: String,
    pub index: i32,
    pub outcome: Result<(Arc<Partition>, AppendOutcome), i16>,
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
