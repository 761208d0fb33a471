//! Fetch: long polls that wait on appends, answered with record data as file ranges
//! (see [`crate::fetch_response`]).

use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use kafka_protocol::messages::FetchRequest;

use super::log_error_code;
use crate::fetch_response::{self, PartitionOut, TopicOut};
use crate::wire::Response;
use crate::Broker;

/// The versions the hand encoder writes; 13+ identifies topics by id only.
pub const VERSIONS: RangeInclusive<i16> = fetch_response::VERSIONS;

impl Broker {
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
}
