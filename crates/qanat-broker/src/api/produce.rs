//! Produce: every partition's batches validated and appended in request order; v0–v2
//! (magic 0/1 message sets) refused per partition without decoding the records.
//!
//! [`append`] runs while the connection's reader waits, so one connection's appends keep
//! their arrival order; the [`Acknowledgement`] it returns is awaited concurrently. With
//! `fsync = "always"` that wait is one fdatasync per partition (group commit: it covers every
//! append before it), after which long polls are woken, since readers are served only
//! durable data in this mode; a failed fdatasync answers every partition of the request with
//! KAFKA_STORAGE_ERROR, never with an offset. acks=0 gets no acknowledgement at all.

use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::{
    produce_response::{PartitionProduceResponse, ProduceResponse, TopicProduceResponse},
    ProduceRequest, TopicName,
};
use kafka_protocol::ResponseError;
use qanat_log::batch::Validated;
use qanat_log::{AppendOutcome, Partition};

use super::{
    code, log_error_code, malformed, name, partition_of, records_error_code, topic_error_code,
};
use crate::ratelog::{LogLimiter, LOG_INTERVAL};
use crate::wire::WireError;
use crate::{timed_sync, Broker};

/// Minimum 0 on purpose: librdkafka stops compressing when Produce's minimum is above 0.
/// Versions 0–2 are refused per partition with UNSUPPORTED_VERSION.
pub const VERSIONS: RangeInclusive<i16> = 0..=9;

/// A producer retrying a refused batch would otherwise log the refusal on every retry.
static REFUSED_LOG: LogLimiter = LogLimiter::new(LOG_INTERVAL);

/// Append every partition of `req` (with no async worker waiting, since appends write files:
/// see [`crate::off_worker`]) and return what to answer, or None for acks=0. An acks value
/// other than -1, 0 or 1 appends nothing and is answered with INVALID_REQUIRED_ACKS per
/// partition.
pub(crate) async fn append(
    broker: &Arc<Broker>,
    mut req: ProduceRequest,
    denied: std::collections::HashSet<String>,
) -> Result<Option<Acknowledgement>, WireError> {
    let acks = req.acks;
    // Topics the producer may not write are refused per partition and never appended.
    let refused = if denied.is_empty() {
        Vec::new()
    } else {
        super::authz::take_refused(
            &mut req.topic_data,
            |t| !denied.contains(t.name.as_str()),
            |t| {
                t.partition_data
                    .iter()
                    .map(|p| ProducePartitionResult {
                        topic: name(t.name.as_str()),
                        index: p.index,
                        outcome: Err(super::authz::TOPIC_DENIED),
                    })
                    .collect::<Vec<_>>()
            },
        )
    };
    if !matches!(acks, -1..=1) {
        let results = req
            .topic_data
            .iter()
            .flat_map(|t| {
                t.partition_data.iter().map(|p| ProducePartitionResult {
                    topic: name(t.name.as_str()),
                    index: p.index,
                    outcome: Err(code(ResponseError::InvalidRequiredAcks)),
                })
            })
            .collect();
        return Ok(Some(Acknowledgement {
            broker: broker.clone(),
            results,
            sync: false,
        }));
    }
    let appender = broker.clone();
    let mut results = crate::off_worker(move || appender.produce_append(&req))
        .await
        .map_err(|e| malformed(format!("produce task failed: {e}")))?;
    results.extend(refused.into_iter().flatten());
    let ack = Acknowledgement {
        broker: broker.clone(),
        sync: broker.sync_on_ack(),
        results,
    };
    if acks == 0 {
        // Nobody is answered, but with fsync = "always" readers see only synced data: the
        // records still need their fdatasync to become visible.
        if ack.sync {
            tokio::spawn(ack.wait());
        }
        return Ok(None);
    }
    Ok(Some(ack))
}

/// The answer to an appended produce request, once its durability policy is met.
pub(crate) struct Acknowledgement {
    broker: Arc<Broker>,
    results: Vec<ProducePartitionResult>,
    /// Whether the answer waits for an fdatasync covering the appends.
    sync: bool,
}

impl Acknowledgement {
    pub(crate) async fn wait(self) -> ProduceResponse {
        let Acknowledgement {
            broker,
            mut results,
            sync,
        } = self;
        if sync {
            // Every partition is synced and answered on its own: a failure on one must not
            // turn another's durable append into an error its producer would retry (and so
            // store twice).
            let targets: Vec<_> = results
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.outcome.as_ref().ok().map(|(p, o)| (i, p.clone(), *o)))
                .collect();
            let failed: Vec<usize> = tokio::task::spawn_blocking(move || {
                targets
                    .iter()
                    .filter(|(_, p, appended)| match timed_sync(p, Some(appended)) {
                        Ok(()) => false,
                        Err(e) => {
                            tracing::error!(dir = %p.dir().display(), error = %e,
                                "fdatasync failed; produce not acknowledged");
                            true
                        }
                    })
                    .map(|(i, _, _)| *i)
                    .collect()
            })
            .await
            .unwrap_or_else(|_| (0..results.len()).collect());
            for i in failed {
                if let Some(r) = results.get_mut(i) {
                    r.outcome = Err(code(ResponseError::KafkaStorageError));
                }
            }
            // Readers see data only once it is durable in this mode: wake long polls.
            broker.purgatory.appended(appended_bytes(&results));
        }
        broker.produce_response(results)
    }
}

/// The partitions a produce appended to and the bytes each received (duplicates add none).
fn appended_bytes(
    results: &[ProducePartitionResult],
) -> impl Iterator<Item = (&Arc<Partition>, u64)> {
    results
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok().map(|(p, o)| (p, o.bytes)))
}

impl Broker {
    /// Validate and append every partition's batches, in request order. Blocking.
    fn produce_append(&self, req: &ProduceRequest) -> Vec<ProducePartitionResult> {
        let mut results =
            Vec::with_capacity(req.topic_data.iter().map(|t| t.partition_data.len()).sum());
        for topic_data in &req.topic_data {
            let topic_name = topic_data.name.0.as_str();
            // One copy per topic, shared by its partitions' results. Not the request's own
            // bytes: those would keep the whole request frame allocated until the answer.
            let owned_name = name(topic_name);
            // Looked up once per topic, not per partition.
            let topic = self
                .lookup_topic(topic_name, true)
                .map_err(|e| topic_error_code(&e));
            for data in &topic_data.partition_data {
                let outcome = match topic
                    .as_ref()
                    .map_err(|c| *c)
                    .and_then(|t| partition_of(t, data.index).map(|p| (t, p)))
                {
                    Err(c) => Err(c),
                    Ok((topic, partition)) => {
                        let records = data.records.as_deref().unwrap_or_default();
                        let limit = self.config.broker.max_uncompressed_batch_bytes;
                        // Structure and CRCs once, for the record check and the append both.
                        let validated = match Validated::new(records) {
                            Ok(v) => v,
                            Err(e) => {
                                if let Some(suppressed) = REFUSED_LOG.check("append") {
                                    tracing::warn!(topic = topic_name, partition = data.index, error = %e, suppressed, "produce refused");
                                }
                                results.push(ProducePartitionResult {
                                    topic: owned_name.clone(),
                                    index: data.index,
                                    outcome: Err(log_error_code(&e)),
                                });
                                continue;
                            }
                        };
                        if let Err(refused) = crate::records::validate_records(&validated, limit) {
                            if let Some(suppressed) = REFUSED_LOG.check("records") {
                                tracing::warn!(
                                    topic = topic_name,
                                    partition = data.index,
                                    batch_bytes = refused.batch_bytes,
                                    uncompressed_bytes = refused.uncompressed_bytes,
                                    max_uncompressed_batch_bytes = limit,
                                    error = %refused,
                                    suppressed,
                                    "produce refused: batch records"
                                );
                            }
                            results.push(ProducePartitionResult {
                                topic: owned_name.clone(),
                                index: data.index,
                                outcome: Err(records_error_code(&refused.source)),
                            });
                            continue;
                        }
                        match partition.append_validated(&validated) {
                            Ok(outcome) => {
                                if outcome.duplicate {
                                    topic.counters.duplicates.increment(1);
                                }
                                topic.counters.bytes_in.increment(outcome.bytes);
                                topic.counters.records_in.increment(outcome.records);
                                Ok((partition, outcome))
                            }
                            Err(e) => {
                                if let Some(suppressed) = REFUSED_LOG.check("append") {
                                    tracing::warn!(topic = topic_name, partition = data.index, error = %e, suppressed, "produce refused");
                                }
                                Err(log_error_code(&e))
                            }
                        }
                    }
                };
                results.push(ProducePartitionResult {
                    topic: owned_name.clone(),
                    index: data.index,
                    outcome,
                });
            }
        }
        // With fsync = "always" readers see nothing new until the fdatasync: the
        // acknowledgement wakes them then.
        if !self.sync_on_ack() {
            self.purgatory.appended(appended_bytes(&results));
        }
        results
    }

    fn produce_response(&self, results: Vec<ProducePartitionResult>) -> ProduceResponse {
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
                    .with_error_code(0)
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
                Some(t) if t.name == r.topic => t.partition_responses.push(partition),
                _ => topics.push(
                    TopicProduceResponse::default()
                        .with_name(r.topic)
                        .with_partition_responses(vec![partition]),
                ),
            }
        }
        ProduceResponse::default().with_responses(topics)
    }
}

/// Outcome of appending one partition's batches of a produce request.
struct ProducePartitionResult {
    /// Shared by the topic's partitions: one copy per topic, not per partition.
    pub topic: TopicName,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::api::testing::{batch, broker, decode_fetch, fetch_request, produce_request};
    use crate::{Config, FsyncPolicy};

    fn only_partition(response: &ProduceResponse) -> &PartitionProduceResponse {
        assert_eq!(response.responses.len(), 1);
        assert_eq!(response.responses[0].partition_responses.len(), 1);
        &response.responses[0].partition_responses[0]
    }

    async fn produce(broker: &Arc<Broker>, req: ProduceRequest) -> ProduceResponse {
        append(broker, req, Default::default())
            .await
            .expect("append")
            .expect("an acknowledgement is due")
            .wait()
            .await
    }

    #[tokio::test]
    async fn appends_in_order_and_answers_each_base_offset() {
        let (broker, _) = broker(Config::default());
        let records = batch(&[b"a", b"b"]);
        for expected in [0, 2] {
            let response = produce(&broker, produce_request("orders", 0, 1, &records)).await;
            let p = only_partition(&response);
            assert_eq!((p.error_code, p.base_offset), (0, expected));
        }
        let partition = broker
            .topics
            .get("orders")
            .expect("auto-created")
            .partitions[0]
            .clone();
        assert_eq!(partition.next_offset(), 4);
    }

    #[tokio::test]
    async fn acks_zero_is_appended_and_gets_no_acknowledgement() {
        let (broker, _) = broker(Config::default());
        let ack = append(
            &broker,
            produce_request("orders", 0, 0, &batch(&[b"x"])),
            Default::default(),
        )
        .await
        .expect("append");
        assert!(ack.is_none());
        let partition = broker
            .topics
            .get("orders")
            .expect("auto-created")
            .partitions[0]
            .clone();
        assert_eq!(partition.next_offset(), 1);
    }

    #[tokio::test]
    async fn unknown_topic_without_auto_creation_is_refused() {
        let mut config = Config::default();
        config.broker.auto_create_topics = false;
        let (broker, _) = broker(config);
        let response = produce(&broker, produce_request("orders", 0, -1, &batch(&[b"x"]))).await;
        let p = only_partition(&response);
        assert_eq!(p.error_code, code(ResponseError::UnknownTopicOrPartition));
        assert_eq!(p.base_offset, -1);
        assert!(broker.topics.get("orders").is_none());
    }

    #[tokio::test]
    async fn invalid_acks_appends_nothing() {
        let (broker, _) = broker(Config::default());
        broker.topics.create("orders", 1, false).expect("create");
        let response = produce(&broker, produce_request("orders", 0, 2, &batch(&[b"x"]))).await;
        assert_eq!(
            only_partition(&response).error_code,
            code(ResponseError::InvalidRequiredAcks)
        );
        assert_eq!(
            broker.topics.get("orders").expect("created").partitions[0].next_offset(),
            0
        );
    }

    fn fsync_always() -> Config {
        let mut config = Config::default();
        config.storage.fsync = FsyncPolicy::Always;
        config
    }

    #[tokio::test]
    async fn with_fsync_always_the_synced_data_wakes_a_long_poll() {
        let (broker, _) = broker(fsync_always());
        broker.topics.create("orders", 1, false).expect("create");
        let poll = tokio::spawn({
            let broker = broker.clone();
            async move {
                broker
                    .fetch(
                        fetch_request("orders", 0, 0, 300_000),
                        12,
                        1,
                        Default::default(),
                    )
                    .await
            }
        });
        let records = batch(&[b"durable"]);
        let response = produce(&broker, produce_request("orders", 0, -1, &records)).await;
        assert_eq!(only_partition(&response).error_code, 0);
        // Without the wake-up the poll would sit out its 300 s; a generous bound far below.
        let answered = tokio::time::timeout(std::time::Duration::from_secs(60), poll)
            .await
            .expect("the long poll was woken by the durable append");
        let fetched = decode_fetch(answered.expect("fetch task").expect("answered").0, 12);
        let p = &fetched.responses[0].partitions[0];
        assert_eq!(p.high_watermark, 1);
        assert_eq!(p.records.as_deref(), Some(&records[..]));
    }

    #[tokio::test]
    async fn a_failed_fdatasync_answers_kafka_storage_error() {
        let (broker, sim) = broker(fsync_always());
        broker.topics.create("orders", 1, false).expect("create");
        sim.fail_next_syncs(1);
        let response = produce(&broker, produce_request("orders", 0, -1, &batch(&[b"x"]))).await;
        assert_eq!(
            only_partition(&response).error_code,
            code(ResponseError::KafkaStorageError)
        );
        // Nothing unsynced is served, and the partition takes writes again.
        let partition = broker.topics.get("orders").expect("created").partitions[0].clone();
        assert_eq!(partition.high_watermark(), 0);
        let response = produce(&broker, produce_request("orders", 0, -1, &batch(&[b"y"]))).await;
        let p = only_partition(&response);
        assert_eq!((p.error_code, p.base_offset), (0, 0));
    }

    #[tokio::test]
    async fn with_fsync_always_acks_zero_records_are_synced_and_served() {
        let (broker, _) = broker(fsync_always());
        broker.topics.create("orders", 1, false).expect("create");
        let ack = append(
            &broker,
            produce_request("orders", 0, 0, &batch(&[b"x"])),
            Default::default(),
        )
        .await
        .expect("append");
        assert!(ack.is_none());
        let partition = broker.topics.get("orders").expect("created").partitions[0].clone();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while partition.high_watermark() < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "an acks=0 record never became visible"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_fdatasync_fails_only_its_own_partition() {
        let (broker, sim) = broker(fsync_always());
        broker.topics.create("orders", 2, false).expect("create");
        let mut req = produce_request("orders", 0, -1, &batch(&[b"x"]));
        let other = produce_request("orders", 1, -1, &batch(&[b"y"]));
        req.topic_data[0]
            .partition_data
            .extend(other.topic_data[0].partition_data.iter().cloned());
        // The first fdatasync (partition 0's) fails; partition 1's succeeds.
        sim.fail_next_syncs(1);
        let response = produce(&broker, req).await;
        let answers: Vec<_> = response.responses[0]
            .partition_responses
            .iter()
            .map(|p| (p.index, p.error_code, p.base_offset))
            .collect();
        assert_eq!(
            answers,
            [(0, code(ResponseError::KafkaStorageError), -1), (1, 0, 0)]
        );
        let topic = broker.topics.get("orders").expect("created");
        assert_eq!(
            topic.partitions[0].high_watermark(),
            0,
            "cut back, not served"
        );
        assert_eq!(
            topic.partitions[1].high_watermark(),
            1,
            "durable and acknowledged"
        );
    }
}
