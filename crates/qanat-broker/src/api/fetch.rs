//! Fetch: long polls that wait on appends, answered with record data as file ranges
//! (see [`crate::fetch_response`]).
//!
//! The wait (for data, the deadline or shutdown) is async; each look at the partitions runs on
//! the blocking pool, because `Partition::read` reads batch headers from the segment files.
//! A long poll registers for the next append before it looks, so no append is missed.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::FetchRequest;

use super::log_error_code;
use crate::fetch_response::{self, PartitionOut, TopicOut};
use crate::wire::Response;
use crate::Broker;

/// The versions the hand encoder writes; 13+ identifies topics by id only.
pub const VERSIONS: RangeInclusive<i16> = fetch_response::VERSIONS;

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
        loop {
            let notified = self.data_arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Off the async workers: `Partition::read` walks batch headers with pread, and a
            // cold page cache turns that into disk waits that would stall every connection
            // served by the same worker.
            let (broker, request, refused) = (self.clone(), req.clone(), denied.clone());
            let read = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let read = broker.fetch_once(&request, &refused);
                (read, started.elapsed())
            })
            .await;
            let (topics, bytes) = match read {
                Ok((read, took)) => {
                    handling += took;
                    read
                }
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => {
                    tracing::debug!(error = %e, "fetch read cancelled");
                    return None;
                }
            };
            let errors = topics
                .iter()
                .flat_map(|t| &t.partitions)
                .any(|p| p.error_code != 0);
            if bytes >= min_bytes || errors || Instant::now() >= deadline {
                let encoding = Instant::now();
                let response = fetch_response::encode(version, correlation_id, 0, topics);
                return Some((response, handling + encoding.elapsed()));
            }
            let shutting_down = self.shutdown.clone();
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = shutting_down.notified() => {}
            }
        }
    }

    fn fetch_once(
        &self,
        req: &FetchRequest,
        denied: &std::collections::HashSet<String>,
    ) -> (Vec<TopicOut>, u64) {
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
                if denied.contains(topic_name) {
                    out.error_code = super::authz::TOPIC_DENIED;
                    partitions.push(out);
                    continue;
                }
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
    use crate::api::testing::{batch, broker, broker_on, decode_fetch, fetch_request};
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

    // A current-thread runtime: its one async worker is the test's own thread.
    #[tokio::test(flavor = "current_thread")]
    async fn segment_files_are_read_off_the_async_worker() {
        let readers = Arc::new(ReadThreads::default());
        let storage = HookedStorage::with_hooks(Arc::new(SimStorage::new()), readers.clone());
        let broker = broker_on(Config::default(), Arc::new(storage));
        broker.topics.create("orders", 1, false).expect("create");
        let partition = broker.topics.get("orders").expect("created").partitions[0].clone();
        for value in [&b"one"[..], b"two", b"three"] {
            partition.append(&batch(&[value])).expect("append");
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
}
