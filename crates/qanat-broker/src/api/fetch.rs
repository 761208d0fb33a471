//! Fetch: long polls that wait on appends, answered with record data as file ranges
//! (see [`crate::fetch_response`]).
//!
//! No file is read on the async workers. Each look at the partitions is first tried from
//! memory ([`Partition::read_from_memory`]): a consumer at the log end, or one resuming at a
//! batch boundary the in-memory index knows with the rest of the log within its limits, is
//! answered on the spot, with file ranges that go out by `sendfile`. Anything else (batch
//! headers to walk, or ranges too small for `sendfile`, which are read into the response) is
//! looked at again on the blocking pool.
//!
//! A fetch that cannot answer yet waits in the [`crate::purgatory`], on its own partitions
//! only: an append elsewhere never wakes it, and it is woken once the bytes appended to its
//! partitions could make up what its `min_bytes` still lacks, or at `max_wait_ms`. A fetch
//! answered at its first look never registers.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kafka_protocol::messages::FetchRequest;
use kafka_protocol::ResponseError;
use qanat_log::{FileSlice, Partition};

use super::{code, log_error_code, partition_of, topic_error_code};
use crate::fetch_response::{self, PartitionOut, TopicOut};
use crate::purgatory::Watch;
use crate::topics::Topic;
use crate::wire::{Chunk, Response, SENDFILE_MIN_BYTES};
use crate::Broker;

/// The versions the hand encoder writes; 13+ identifies topics by id only.
pub const VERSIONS: RangeInclusive<i16> = fetch_response::VERSIONS;

/// Where one look at the partitions may get its bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Memory only: gives up (None) where a file would have to be read.
    Memory,
    /// Memory and the segment files (blocking).
    Files,
}

/// One look at the partitions of a fetch: the topics to answer, their bytes, and what to
/// count per topic once the look is kept.
struct Look {
    topics: Vec<TopicOut>,
    bytes: u64,
    served: Vec<(Arc<Topic>, u64, u64)>,
    /// The partitions looked at and the high watermark seen in each: what a long poll waits on.
    watched: Vec<(Arc<Partition>, i64)>,
}

impl Broker {
    /// Serve a fetch, waiting up to `max_wait_ms` for `min_bytes` to arrive: the response and
    /// the time spent reading and encoding it (the long poll's waits left out, as Kafka
    /// leaves purgatory time out of request quotas). None: the read could not finish (the
    /// runtime is shutting down), so no answer can be given.
    pub(crate) async fn fetch(
        self: &Arc<Self>,
        req: FetchRequest,
        version: i16,
        correlation_id: i32,
        denied: std::collections::HashSet<String>,
    ) -> Option<(Response, Duration)> {
        let req = Arc::new(req);
        let mut handling = Duration::ZERO;
        let denied = Arc::new(denied);
        let deadline =
            Instant::now() + Duration::from_millis(req.max_wait_ms.clamp(0, 300_000) as u64);
        let min_bytes = req.min_bytes.max(0) as u64;
        // Registered at the first wait only: a fetch answered at once never touches the
        // purgatory, which the appenders lock.
        let mut watch: Option<Watch<'_>> = None;
        loop {
            let mark = watch.as_ref().map(Watch::mark);
            let started = Instant::now();
            let look = match self.look(&req, &denied, Source::Memory) {
                Some(look) => {
                    handling += started.elapsed();
                    look
                }
                // Batch headers or small ranges to read: off the async workers, since a cold
                // page cache turns a read into a disk wait that would stall every connection
                // served by the same worker.
                None => {
                    let (broker, request, refused) = (self.clone(), req.clone(), denied.clone());
                    let read = tokio::task::spawn_blocking(move || {
                        let started = Instant::now();
                        let look = broker.look(&request, &refused, Source::Files);
                        (look, started.elapsed())
                    })
                    .await;
                    match read {
                        Ok((Some(look), took)) => {
                            handling += took;
                            look
                        }
                        Ok((None, _)) => return None, // a look at the files always answers
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        Err(e) => {
                            tracing::debug!(error = %e, "fetch read cancelled");
                            return None;
                        }
                    }
                }
            };
            let errors = look
                .topics
                .iter()
                .flat_map(|t| &t.partitions)
                .any(|p| p.error_code != 0);
            if look.bytes >= min_bytes || errors || Instant::now() >= deadline {
                let encoding = Instant::now();
                for (topic, bytes, records) in &look.served {
                    topic.counters.bytes_out.increment(*bytes);
                    topic.counters.records_out.increment(*records);
                }
                let response = fetch_response::encode(version, correlation_id, 0, look.topics);
                return Some((response, handling + encoding.elapsed()));
            }
            let (w, mark) = match (watch.as_ref(), mark) {
                (Some(w), Some(mark)) => (w, mark),
                _ => {
                    let w =
                        &*watch.insert(self.purgatory.watch(look.watched.iter().map(|(p, _)| p)));
                    let mark = w.mark();
                    // What was appended between the look and the registration was not
                    // counted: look again if there was any.
                    let grown = w.grown_since(|p| {
                        look.watched
                            .iter()
                            .find(|(q, _)| Arc::ptr_eq(p, q))
                            .map(|(_, seen)| *seen)
                    });
                    if grown {
                        continue;
                    }
                    (w, mark)
                }
            };
            let shutting_down = self.shutdown.clone();
            tokio::select! {
                _ = w.appended(mark, min_bytes - look.bytes) => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = shutting_down.notified() => {}
            }
        }
    }

    /// Read every partition of the fetch once; None when `source` is memory and some
    /// partition needs a file read.
    fn look(
        &self,
        req: &FetchRequest,
        denied: &std::collections::HashSet<String>,
        source: Source,
    ) -> Option<Look> {
        let mut budget = if req.max_bytes > 0 {
            req.max_bytes as u64
        } else {
            u64::MAX
        };
        let mut total = 0u64;
        let mut topics = Vec::with_capacity(req.topics.len());
        let mut served = Vec::new();
        let mut watched = Vec::new();
        for t in &req.topics {
            let topic_name = t.topic.0.as_str();
            let topic = if denied.contains(topic_name) {
                Err(super::authz::TOPIC_DENIED)
            } else {
                self.lookup_topic(topic_name, false)
                    .map_err(|e| topic_error_code(&e))
            };
            let (mut topic_bytes, mut topic_records) = (0u64, 0u64);
            let mut partitions = Vec::with_capacity(t.partitions.len());
            for p in &t.partitions {
                let mut out = PartitionOut {
                    index: p.partition,
                    error_code: 0,
                    high_watermark: -1,
                    log_start_offset: -1,
                    records: Vec::new(),
                };
                let partition = match topic.as_ref().map_err(|c| *c) {
                    Ok(topic) => partition_of(topic, p.partition),
                    Err(c) => Err(c),
                };
                match partition {
                    Err(c) => out.error_code = c,
                    Ok(partition) => {
                        out.high_watermark = partition.high_watermark();
                        out.log_start_offset = partition.log_start_offset();
                        // KIP-74: the first batch is served whole even past the limits, so a
                        // consumer can always make progress; later partitions respect them.
                        let limit = (p.partition_max_bytes.max(0) as u64).min(budget);
                        if total > 0 && limit == 0 {
                            watched.push((partition, out.high_watermark));
                            partitions.push(out);
                            continue;
                        }
                        match read_partition(&partition, p.fetch_offset, limit.max(1), source) {
                            None => return None,
                            Some(Ok((read, records))) => {
                                out.high_watermark = read.high_watermark;
                                out.log_start_offset = read.log_start_offset;
                                out.records = records;
                                let n = out.records_len();
                                total += n;
                                budget = budget.saturating_sub(n);
                                if n > 0 {
                                    topic_bytes += n;
                                    // Records the consumer takes: from its offset to the end
                                    // served.
                                    topic_records +=
                                        (read.next_offset - p.fetch_offset).max(0) as u64;
                                }
                            }
                            Some(Err(c)) => out.error_code = c,
                        }
                        watched.push((partition, out.high_watermark));
                    }
                }
                partitions.push(out);
            }
            if let Ok(topic) = topic {
                if topic_bytes > 0 {
                    served.push((topic, topic_bytes, topic_records));
                }
            }
            topics.push(TopicOut {
                name: topic_name.to_string(),
                partitions,
            });
        }
        Some(Look {
            topics,
            bytes: total,
            served,
            watched,
        })
    }
}

/// One partition's part of a look: what was read and its records as response chunks (ranges
/// large enough for `sendfile` stay file ranges, smaller ones are read into memory), or an
/// error code. None: `source` is memory and a file read is needed.
fn read_partition(
    partition: &Partition,
    offset: i64,
    max_bytes: u64,
    source: Source,
) -> Option<Result<(qanat_log::ReadOutcome, Vec<Chunk>), i16>> {
    let read = match source {
        Source::Memory => match partition.read_from_memory(offset, max_bytes) {
            Ok(Some(read)) => read,
            Ok(None) => return None,
            Err(e) => return Some(Err(log_error_code(&e))),
        },
        Source::Files => match partition.read(offset, max_bytes) {
            Ok(read) => read,
            Err(e) => return Some(Err(log_error_code(&e))),
        },
    };
    let small = read.slices.iter().any(|s| s.len < SENDFILE_MIN_BYTES);
    if small && source == Source::Memory {
        return None;
    }
    let mut chunks = Vec::with_capacity(read.slices.len());
    for slice in &read.slices {
        if slice.len < SENDFILE_MIN_BYTES {
            match load(slice) {
                Ok(chunk) => chunks.push(chunk),
                Err(e) => {
                    tracing::error!(error = %e, "reading records for a fetch failed");
                    return Some(Err(code(ResponseError::KafkaStorageError)));
                }
            }
        } else {
            chunks.push(Chunk::File(slice.clone()));
        }
    }
    Some(Ok((read, chunks)))
}

/// The bytes of a small file range, in memory (blocking).
fn load(slice: &FileSlice) -> std::io::Result<Chunk> {
    let mut buf = BytesMut::zeroed(slice.len as usize);
    slice.file.read_exact_at(&mut buf, slice.position)?;
    Ok(Chunk::Bytes(buf.freeze()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io;
    use std::thread::{self, ThreadId};

    use kafka_protocol::messages::FetchResponse;
    use kafka_protocol::ResponseError;
    use parking_lot::Mutex;
    use qanat_log::{HookedStorage, SimStorage, StorageHooks, StorageOp};

    use super::*;
    use bytes::Bytes;

    use crate::api::testing::{
        batch, broker, broker_on, decode_fetch, fetch_request, produce_request,
    };
    use crate::Config;

    /// Bounds a fetch that should answer at once; a missed answer would wait out its long poll.
    async fn answered(broker: &Arc<Broker>, req: FetchRequest) -> FetchResponse {
        let response = tokio::time::timeout(
            Duration::from_secs(60),
            broker.fetch(req, VERSION, 7, Default::default()),
        )
        .await
        .expect("fetch answered")
        .expect("fetch response")
        .0;
        decode_fetch(response, VERSION)
    }

    const VERSION: i16 = 12;

    #[tokio::test]
    async fn fetch_returns_the_produced_bytes_from_the_offset_asked() {
        let (broker, _) = broker(Config::default());
        broker.topics.create("orders", 1, false).expect("create");
        let partition = broker.topics.get("orders").expect("created").partitions[0].clone();
        let first = batch(&[b"one"]);
        let second = batch(&[b"two"]);
        partition.append(&first).expect("append");
        partition.append(&second).expect("append");

        let all = answered(&broker, fetch_request("orders", 0, 0, 300_000)).await;
        let p = &all.responses[0].partitions[0];
        assert_eq!((p.error_code, p.high_watermark), (0, 2));
        let records = p.records.as_deref().expect("records");
        // The log stores the producer's bytes; only the second batch's base offset changed.
        assert_eq!(&records[..first.len()], &first[..]);
        assert_eq!(&records[first.len()..first.len() + 8], &1i64.to_be_bytes());
        assert_eq!(&records[first.len() + 8..], &second[8..]);

        let from_one = answered(&broker, fetch_request("orders", 0, 1, 300_000)).await;
        let records = from_one.responses[0].partitions[0].records.as_deref();
        assert_eq!(records.map(|r| &r[8..]), Some(&second[8..]));
    }

    #[tokio::test]
    async fn an_unknown_topic_is_answered_at_once_with_an_error_and_not_created() {
        let (broker, _) = broker(Config::default());
        let response = answered(&broker, fetch_request("missing", 0, 0, 300_000)).await;
        let p = &response.responses[0].partitions[0];
        assert_eq!(p.error_code, ResponseError::UnknownTopicOrPartition.code());
        assert_eq!(p.high_watermark, -1);
        assert!(broker.topics.get("missing").is_none());
    }

    /// Notes which threads read or measure files.
    #[derive(Default)]
    struct ReadThreads(Mutex<Vec<ThreadId>>);

    impl StorageHooks for ReadThreads {
        fn before(&self, op: StorageOp<'_>) -> io::Result<()> {
            if matches!(op, StorageOp::Read | StorageOp::Len) {
                self.0.lock().push(thread::current().id());
            }
            Ok(())
        }
    }

    /// A broker whose storage records which threads read files, `batches` appended to a
    /// one-partition topic "orders", fetched from offset 1: the reading threads (those of the
    /// fetch alone) and the response.
    async fn fetch_orders_from_offset_1(batches: &[Vec<u8>]) -> (Arc<ReadThreads>, Response) {
        let readers = Arc::new(ReadThreads::default());
        let storage = HookedStorage::with_hooks(Arc::new(SimStorage::new()), readers.clone());
        let broker = broker_on(Config::default(), Arc::new(storage));
        broker.topics.create("orders", 1, false).expect("create");
        let partition = broker.topics.get("orders").expect("created").partitions[0].clone();
        for b in batches {
            partition.append(b).expect("append");
        }
        readers.0.lock().clear();
        let response = broker
            .fetch(
                fetch_request("orders", 0, 1, 300_000),
                VERSION,
                7,
                Default::default(),
            )
            .await
            .expect("fetch response")
            .0;
        (readers, response)
    }

    // A current-thread runtime: its one async worker is the test's own thread.
    #[tokio::test(flavor = "current_thread")]
    async fn segment_files_are_read_off_the_async_worker() {
        let batches: Vec<Vec<u8>> = [&b"one"[..], b"two", b"three"]
            .iter()
            .map(|value| batch(&[*value]))
            .collect();
        let (readers, response) = fetch_orders_from_offset_1(&batches).await;
        // Taken before the response is decoded here: that reads the file ranges the
        // connection's writer would send.
        let readers = readers.0.lock().clone();
        let decoded = decode_fetch(response, VERSION);
        assert!(decoded.responses[0].partitions[0].records.is_some());
        assert!(!readers.is_empty(), "the fetch read no file");
        let worker = thread::current().id();
        assert!(
            readers.iter().all(|t| *t != worker),
            "{} of {} file reads ran on the async worker",
            readers.iter().filter(|t| **t == worker).count(),
            readers.len()
        );
    }

    // A consumer resuming at a batch boundary, batches large enough to be indexed and sent
    // by sendfile: the fetch is answered from memory with file ranges, and reads no file.
    #[tokio::test(flavor = "current_thread")]
    async fn a_consumer_at_a_batch_boundary_is_answered_without_reading_a_file() {
        let batches: Vec<Vec<u8>> = (0..3u8)
            .map(|i| batch(&[&vec![i; 3 * SENDFILE_MIN_BYTES as usize]]))
            .collect();
        let (readers, response) = fetch_orders_from_offset_1(&batches).await;
        assert!(
            response.chunks.iter().any(|c| matches!(c, Chunk::File(_))),
            "records go out as file ranges"
        );
        assert_eq!(readers.0.lock().len(), 0, "the fetch read a file");
        let decoded = decode_fetch(response, VERSION);
        let records = decoded.responses[0].partitions[0]
            .records
            .as_deref()
            .expect("records");
        // Batches 1 and 2, each as appended but for its base offset.
        assert_eq!(records.len(), batches[1].len() + batches[2].len());
        assert_eq!(&records[8..batches[1].len()], &batches[1][8..]);
        assert_eq!(&records[batches[1].len() + 8..], &batches[2][8..]);
    }

    /// A batch large enough to be answered from memory (file ranges, no read on the blocking
    /// pool), so a woken fetch finishes as soon as the runtime polls it.
    fn big_batch(fill: u8) -> Vec<u8> {
        batch(&[&vec![fill; 3 * SENDFILE_MIN_BYTES as usize]])
    }

    /// Produce `records` to partition `partition` of "orders" through the Produce API.
    async fn produce(broker: &Arc<Broker>, partition: i32, records: &[u8]) {
        let ack = crate::api::produce::append(
            broker,
            produce_request("orders", partition, 1, records),
            Default::default(),
        )
        .await
        .expect("append")
        .expect("acks=1 is answered");
        let response = ack.wait().await;
        assert_eq!(response.responses[0].partition_responses[0].error_code, 0);
    }

    /// Let every runnable task of the (current-thread) runtime run until it waits again.
    async fn settle() {
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
    }

    /// A long poll of partition 0 of "orders" from offset 0 with `min_bytes`, started and
    /// waiting in the purgatory.
    async fn long_poll(
        broker: &Arc<Broker>,
        min_bytes: i32,
    ) -> tokio::task::JoinHandle<Option<(Response, Duration)>> {
        let req = fetch_request("orders", 0, 0, 300_000).with_min_bytes(min_bytes);
        let fetch = tokio::spawn({
            let broker = broker.clone();
            async move { broker.fetch(req, VERSION, 7, Default::default()).await }
        });
        while broker.purgatory.watched_partitions() == 0 {
            tokio::task::yield_now().await;
        }
        fetch
    }

    async fn records_of(
        fetch: tokio::task::JoinHandle<Option<(Response, Duration)>>,
    ) -> (i64, Bytes) {
        let response = tokio::time::timeout(Duration::from_secs(60), fetch)
            .await
            .expect("fetch answered")
            .expect("fetch task")
            .expect("fetch response")
            .0;
        let decoded = decode_fetch(response, VERSION);
        let p = &decoded.responses[0].partitions[0];
        (p.high_watermark, p.records.clone().unwrap_or_default())
    }

    // Current-thread runtime: a woken fetch runs (and, served from memory, answers) while the
    // test yields, so "still waiting" is a fact about wake-ups, not about timing.
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_poll_is_woken_by_appends_to_its_own_partitions_only() {
        let (broker, _) = broker(Config::default());
        broker.topics.create("orders", 2, false).expect("create");
        let watched = broker.topics.get("orders").expect("created").partitions[0].clone();
        let fetch = long_poll(&broker, 1).await;
        // Appended behind the purgatory's back: the fetch sees it only when something wakes it.
        let silent = big_batch(1);
        watched.append(&silent).expect("append");
        produce(&broker, 1, &big_batch(2)).await;
        settle().await;
        assert!(
            !fetch.is_finished(),
            "a produce to partition 1 woke the long poll on partition 0"
        );
        let produced = big_batch(3);
        produce(&broker, 0, &produced).await;
        let (high_watermark, records) = records_of(fetch).await;
        // Both batches of partition 0, the produced one with its offset assigned.
        assert_eq!(high_watermark, 2);
        assert_eq!(records.len(), silent.len() + produced.len());
        assert_eq!(&records[..silent.len()], &silent[..]);
        assert_eq!(&records[silent.len() + 8..], &produced[8..]);
        assert_eq!(
            broker.purgatory.watched_partitions(),
            0,
            "the answered fetch left its watch"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_long_poll_sleeps_through_appends_smaller_than_its_min_bytes() {
        let (broker, _) = broker(Config::default());
        broker.topics.create("orders", 1, false).expect("create");
        let (first, second) = (big_batch(1), big_batch(2));
        let fetch = long_poll(&broker, first.len() as i32 + 1).await;
        produce(&broker, 0, &first).await;
        settle().await;
        assert!(!fetch.is_finished(), "answered below min_bytes");
        produce(&broker, 0, &second).await;
        let (high_watermark, records) = records_of(fetch).await;
        assert_eq!(high_watermark, 2);
        assert_eq!(records.len(), first.len() + second.len());
        assert_eq!(&records[..first.len()], &first[..]);
    }
}
