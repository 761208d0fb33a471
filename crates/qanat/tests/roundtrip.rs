//! End-to-end tests of the real `qanat` binary with librdkafka (the `rdkafka` crate) as the
//! client: codecs, acks, partitions, seek by time, restart and crash recovery, retention,
//! hostile bytes on the socket, and the `qanat topics` CLI.
//!
//! Each test starts its own broker on an ephemeral port with its own data dir, so tests run
//! in parallel. Nothing waits on a clock: every wait is a poll for an observable condition
//! with a generous deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod group_support;
mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use group_support::SseStream;
use support::*;

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Assert that deliveries are `(partition, first..first+n)`, in order.
fn assert_dense_deliveries(delivered: &[Delivered], partition: i32, first: i64) {
    for (i, (p, off)) in delivered.iter().enumerate() {
        assert_eq!(
            *p, partition,
            "record #{i} delivered to the wrong partition"
        );
        assert_eq!(
            *off,
            first + i as i64,
            "record #{i}: delivery offset not dense"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Codecs

/// Records exercising the corners of RecordBatch v2: null keys, empty and null values, null
/// header values, repeated header names, binary and incompressible values.
fn codec_records(codec: &str) -> Vec<Rec> {
    let mut rng = rand::rng();
    (0..300)
        .map(|i| {
            let mut rec = match i {
                7 => Rec::value(Vec::new()),
                13 => Rec::default(), // null value (tombstone)
                21 => Rec::value((0..=255u8).collect::<Vec<u8>>()),
                42 => {
                    let mut big = vec![0u8; 64 * 1024];
                    rng.fill(&mut big[..]);
                    Rec::value(big)
                }
                _ => Rec::value(format!(
                    "{codec} value {i:05} {}",
                    "the quick brown fox ".repeat(i % 20)
                )),
            };
            if i % 10 != 0 {
                rec = rec.key(format!("key-{i}"));
            }
            rec = rec
                .header("idx", Some(i.to_string().as_bytes()))
                .header("codec", Some(codec.as_bytes()));
            if i % 3 == 0 {
                rec = rec.header("null-header", None);
            }
            if i % 5 == 0 {
                rec = rec
                    .header("dup", Some(b"first"))
                    .header("dup", Some(b"second"));
            }
            rec
        })
        .collect()
}

fn codec_roundtrip(codec: &str) {
    let broker = Broker::start();
    let topic = format!("codec-{codec}");
    let recs = codec_records(codec);
    let delivered = produce(
        &broker.bootstrap(),
        &topic,
        &recs,
        &[
            ("compression.type", codec),
            ("linger.ms", "20"),
            ("acks", "all"),
        ],
    );
    assert_dense_deliveries(&delivered, 0, 0);
    let got = consume_all(&broker.bootstrap(), &topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);
    for m in &got {
        assert!(
            m.timestamp.is_some() && !m.timestamp_is_log_append,
            "offset {}: expected a create-time timestamp, got {:?} (log-append: {})",
            m.offset,
            m.timestamp,
            m.timestamp_is_log_append
        );
    }
}

#[test]
fn codec_none_roundtrip() {
    codec_roundtrip("none");
}

#[test]
fn codec_gzip_roundtrip() {
    codec_roundtrip("gzip");
}

#[test]
fn codec_snappy_roundtrip() {
    codec_roundtrip("snappy");
}

#[test]
fn codec_lz4_roundtrip() {
    codec_roundtrip("lz4");
}

#[test]
fn codec_zstd_roundtrip() {
    codec_roundtrip("zstd");
}

// ------------------------------------------------------------------------------------------
// Acks

fn acks_roundtrip(acks: &str) {
    let broker = Broker::start();
    let topic = format!("acks-{acks}");
    let recs = keyed_records(&topic, 500);
    let delivered = produce(&broker.bootstrap(), &topic, &recs, &[("acks", acks)]);
    if acks == "0" {
        // With acks=0 the producer never hears back, so it cannot know offsets.
        assert!(delivered.iter().all(|(p, _)| *p == 0));
    } else {
        assert_dense_deliveries(&delivered, 0, 0);
    }
    let got = consume_all(&broker.bootstrap(), &topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);
}

#[test]
fn acks_0_roundtrip() {
    acks_roundtrip("0");
}

#[test]
fn acks_1_roundtrip() {
    acks_roundtrip("1");
}

#[test]
fn acks_all_roundtrip() {
    acks_roundtrip("all");
}

// ------------------------------------------------------------------------------------------
// Partitions

#[test]
fn multi_partition_topic_created_with_cli() {
    let mut broker = Broker::start();
    let topic = "multi";
    let bootstrap = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        topic,
        "--partitions",
        "4",
        "--bootstrap",
        &bootstrap,
    ]);

    let md = consumer(&bootstrap)
        .fetch_metadata(Some(topic), DEADLINE)
        .expect("metadata");
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .expect("topic in metadata");
    assert!(
        t.error().is_none(),
        "metadata error for {topic}: {:?}",
        t.error()
    );
    assert_eq!(t.partitions().len(), 4, "partition count in metadata");
    let broker_port = broker.port();
    assert!(
        md.brokers()
            .iter()
            .any(|b| b.port() == i32::from(broker_port)),
        "metadata does not advertise the actual port {broker_port}: {:?}",
        md.brokers()
            .iter()
            .map(|b| format!("{}:{}", b.host(), b.port()))
            .collect::<Vec<_>>()
    );

    let per_partition = 60;
    let mut recs = Vec::new();
    for p in 0..4 {
        for r in keyed_records(&format!("p{p}"), per_partition) {
            recs.push(r.partition(p));
        }
    }
    let delivered = produce(&bootstrap, topic, &recs, &[("acks", "all")]);
    for p in 0..4 {
        let mine: Vec<Delivered> = delivered
            .iter()
            .zip(&recs)
            .filter(|(_, r)| r.partition == Some(p))
            .map(|(d, _)| *d)
            .collect();
        assert_dense_deliveries(&mine, p, 0);
    }
    for p in 0..4 {
        let want: Vec<Rec> = recs
            .iter()
            .filter(|r| r.partition == Some(p))
            .cloned()
            .collect();
        let got = consume_all(&bootstrap, topic, p, want.len());
        assert!(got.iter().all(|m| m.partition == p));
        assert_records_eq(&want, &got, 0);
        assert_eq!(watermarks(&bootstrap, topic, p), (0, per_partition as i64));
    }

    // The partition count and every partition's data survive a restart.
    broker.restart();
    let md = consumer(&bootstrap)
        .fetch_metadata(Some(topic), DEADLINE)
        .expect("metadata after restart");
    assert_eq!(
        md.topics()[0].partitions().len(),
        4,
        "partitions after restart"
    );
    for p in 0..4 {
        let want: Vec<Rec> = recs
            .iter()
            .filter(|r| r.partition == Some(p))
            .cloned()
            .collect();
        assert_records_eq(&want, &consume_all(&bootstrap, topic, p, want.len()), 0);
    }
}

// ------------------------------------------------------------------------------------------
// Seek by time

/// ListOffsets by timestamp through `offsets_for_times` for one partition.
fn offset_for_time(c: &BaseConsumer, topic: &str, ts: i64) -> Offset {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(ts))
        .unwrap();
    let res = c
        .offsets_for_times(tpl, DEADLINE)
        .unwrap_or_else(|e| panic!("offsets_for_times({topic}, {ts}): {e}"));
    let elem = res.find_partition(topic, 0).expect("partition in result");
    elem.error()
        .unwrap_or_else(|e| panic!("offsets_for_times({topic}, {ts}) partition error: {e}"));
    elem.offset()
}

/// Records at t0, t0+1s, ... t0+(n-1)s.
fn timed_records(t0: i64, n: i64) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            Rec::value(format!("at +{i}s"))
                .key(format!("k{i}"))
                .timestamp(t0 + i * 1000)
        })
        .collect()
}

#[test]
fn seek_by_time_with_offsets_for_times() {
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let topic = "by-time";
    // An hour ago: well inside the default 7-day retention, clearly distinct from "now".
    let t0 = now_ms() - 3_600_000;
    let n = 10;
    let recs = timed_records(t0, n);
    // One record per request: one batch per record.
    for (i, r) in recs.iter().enumerate() {
        let d = produce(
            &bootstrap,
            topic,
            std::slice::from_ref(r),
            &[("acks", "all")],
        );
        assert_eq!(d, vec![(0, i as i64)]);
    }
    let got = consume_all(&bootstrap, topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);
    assert!(got.iter().all(|m| !m.timestamp_is_log_append));

    let c = consumer(&bootstrap);
    for i in 0..n {
        let exact = t0 + i * 1000;
        assert_eq!(
            offset_for_time(&c, topic, exact),
            Offset::Offset(i),
            "query at exactly t0+{i}s"
        );
        assert_eq!(
            offset_for_time(&c, topic, exact - 500),
            Offset::Offset(i),
            "query at t0+{i}s-500ms must return the first record at or after it"
        );
    }
    assert_eq!(
        offset_for_time(&c, topic, t0 - 86_400_000),
        Offset::Offset(0),
        "query before everything"
    );
    // Past the last timestamp: Kafka answers offset -1, which rdkafka reports as End.
    let past = offset_for_time(&c, topic, t0 + n * 1000 + 5000);
    assert!(
        matches!(past, Offset::End),
        "query past the last timestamp: expected offset -1 (Offset::End), got {past:?}"
    );
}

#[test]
fn seek_by_time_inside_one_batch() {
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let topic = "by-time-one-batch";
    let t0 = now_ms() - 3_600_000;
    let n = 10;
    let recs = timed_records(t0, n);
    // All records in one produce call with a linger: librdkafka sends them as one batch. The
    // answer must still be the exact record (Kafka scans inside the batch), not the batch's
    // base offset: a consumer seeking to time T must not get records from before T.
    let delivered = produce(
        &bootstrap,
        topic,
        &recs,
        &[("acks", "all"), ("linger.ms", "50")],
    );
    assert_dense_deliveries(&delivered, 0, 0);
    let c = consumer(&bootstrap);
    for i in 0..n {
        assert_eq!(
            offset_for_time(&c, topic, t0 + i * 1000 - 500),
            Offset::Offset(i),
            "query at t0+{i}s-500ms (records are at t0, t0+1s, ... in one batch)"
        );
        assert_eq!(
            offset_for_time(&c, topic, t0 + i * 1000),
            Offset::Offset(i),
            "query at exactly t0+{i}s (records are at t0, t0+1s, ... in one batch)"
        );
    }
    assert_eq!(
        offset_for_time(&c, topic, t0 + n * 1000),
        Offset::End,
        "query past the last timestamp"
    );
}

#[test]
fn log_append_time_config_stamps_broker_time() {
    let broker = Broker::with_config("[storage]\ntimestamp_type = \"log-append-time\"\n");
    let bootstrap = broker.bootstrap();
    // Plain and compressed batches: the broker rewrites the batch header (attributes, max
    // timestamp, CRC) either way, and must keep the compressed records intact.
    for codec in ["none", "lz4"] {
        let topic = format!("append-time-{codec}");
        let old = now_ms() - 3_600_000;
        let recs: Vec<Rec> = (0..50)
            .map(|i| {
                Rec::value(format!("v{i} {}", "lz".repeat(i as usize)))
                    .key(format!("k{i}"))
                    .timestamp(old + i)
            })
            .collect();
        let before = now_ms();
        produce(
            &bootstrap,
            &topic,
            &recs,
            &[
                ("acks", "all"),
                ("compression.type", codec),
                ("linger.ms", "20"),
            ],
        );
        let after = now_ms();
        let got = consume_all(&bootstrap, &topic, 0, recs.len());
        for (r, m) in recs.iter().zip(&got) {
            assert_eq!(
                (&m.key, &m.value),
                (&r.key, &r.value),
                "[{codec}] offset {}",
                m.offset
            );
            assert!(
                m.timestamp_is_log_append,
                "[{codec}] offset {}: expected a log-append-time timestamp, got {:?}",
                m.offset, m.timestamp
            );
            let ts = m.timestamp.expect("timestamp");
            assert!(
                ts >= before - 1000 && ts <= after + 1000,
                "[{codec}] offset {}: log-append timestamp {ts} is not the broker's append time \
                 (produce ran between {before} and {after}; the producer's create time was {})",
                m.offset,
                old + m.offset
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Restart and crash

#[test]
fn graceful_restart_keeps_every_record() {
    let mut broker = Broker::start();
    let topic = "restart";
    let mut recs = Vec::new();
    for round in 0..3 {
        let batch = keyed_records(&format!("r{round}"), 400);
        let delivered = produce(&broker.bootstrap(), topic, &batch, &[("acks", "1")]);
        assert_dense_deliveries(&delivered, 0, recs.len() as i64);
        recs.extend(batch);
    }
    let port = broker.port();
    broker.restart();
    assert_eq!(broker.port(), port, "restart must reuse the port");
    let bootstrap = broker.bootstrap();
    assert_eq!(watermarks(&bootstrap, topic, 0), (0, recs.len() as i64));
    let got = consume_all(&bootstrap, topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);

    // Appends continue at the recovered end.
    let more = keyed_records("after-restart", 10);
    let delivered = produce(&bootstrap, topic, &more, &[("acks", "all")]);
    assert_dense_deliveries(&delivered, 0, recs.len() as i64);
    recs.extend(more);
    let got = consume_all(&bootstrap, topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);
}

struct AckCounter {
    acked: Mutex<Vec<u64>>,
    acked_count: AtomicU64,
    failed_count: AtomicU64,
}

impl ClientContext for AckCounter {}

impl ProducerContext for AckCounter {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        match result {
            Ok(_) => {
                self.acked.lock().unwrap().push(seq as u64);
                self.acked_count.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => {
                self.failed_count.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

fn seq_value(seq: u64) -> String {
    format!("seq-{seq:012}")
}

#[test]
fn kill9_during_acks_all_produce_loses_no_acknowledged_record() {
    let mut broker = Broker::with_config("[storage]\nfsync = \"always\"\n");
    let topic = "crash";
    let bootstrap = broker.bootstrap();

    let stop = Arc::new(AtomicBool::new(false));
    let producer: BaseProducer<AckCounter> = producer_config(
        &bootstrap,
        &[
            ("acks", "all"),
            ("linger.ms", "2"),
            ("retry.backoff.ms", "50"),
            ("retry.backoff.max.ms", "500"),
        ],
    )
    .create_with_context(AckCounter {
        acked: Mutex::new(Vec::new()),
        acked_count: AtomicU64::new(0),
        failed_count: AtomicU64::new(0),
    })
    .expect("producer");
    let ctx: Arc<AckCounter> = Arc::clone(producer.context());

    let producer_thread = {
        let stop = Arc::clone(&stop);
        let ctx = Arc::clone(&ctx);
        thread::spawn(move || {
            let mut sent: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                let done = ctx.acked_count.load(Ordering::SeqCst)
                    + ctx.failed_count.load(Ordering::SeqCst);
                if sent - done >= 2000 {
                    // Bound what is in flight; wait for delivery reports instead.
                    producer.poll(Duration::from_millis(10));
                    continue;
                }
                let value = seq_value(sent);
                let record: BaseRecord<'_, str, str, usize> =
                    BaseRecord::with_opaque_to(topic, sent as usize)
                        .partition(0)
                        .payload(value.as_str());
                match producer.send(record) {
                    Ok(()) => sent += 1,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => panic!("send seq {sent}: {e}"),
                }
                producer.poll(Duration::ZERO);
            }
            // Let everything still queued reach the restarted broker (or time out).
            let _ = producer.flush(Duration::from_secs(90));
            sent
        })
    };

    let wait_acks = |what: &str, target: u64| {
        poll_until(what, DEADLINE, || {
            let n = ctx.acked_count.load(Ordering::SeqCst);
            if n >= target {
                Ok(n)
            } else {
                Err(format!(
                    "{n} acked, {} failed",
                    ctx.failed_count.load(Ordering::SeqCst)
                ))
            }
        })
    };
    // Three crash/recover cycles, each after a few thousand more acknowledgements.
    let mut acked_at_kill = 0;
    for cycle in 0..3 {
        wait_acks(
            &format!("3000 more acks before kill #{cycle}"),
            acked_at_kill + 3000,
        );
        broker.kill9();
        acked_at_kill = ctx.acked_count.load(Ordering::SeqCst);
        eprintln!("kill #{cycle}: SIGKILLed the broker at {acked_at_kill} acks");
        broker.start_again();
    }
    // The producer must reach the restarted broker and keep going.
    wait_acks("1000 more acks after the restart", acked_at_kill + 1000);
    stop.store(true, Ordering::SeqCst);
    let sent = producer_thread.join().expect("producer thread");

    let acked: Vec<u64> = ctx.acked.lock().unwrap().clone();
    let failed = ctx.failed_count.load(Ordering::SeqCst);
    let got = consume_to_end(&broker.bootstrap(), topic, 0);
    let mut seen = HashSet::new();
    let mut duplicates = 0usize;
    for m in &got {
        let v = m.value_str();
        let seq: u64 = v
            .strip_prefix("seq-")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("offset {}: unexpected value {v:?}", m.offset));
        assert!(
            seq < sent,
            "offset {}: value {v:?} was never sent",
            m.offset
        );
        if !seen.insert(seq) {
            duplicates += 1;
        }
    }
    let mut missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|s| !seen.contains(s))
        .collect();
    missing.sort_unstable();
    eprintln!(
        "sent {sent}, acked {} ({acked_at_kill} before the last kill), failed {failed}, read back {} \
         ({} distinct, {duplicates} duplicates)",
        acked.len(),
        got.len(),
        seen.len()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged records are missing after kill -9 + restarts (fsync=always, acks=all); \
         first missing seqs: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
}

// ------------------------------------------------------------------------------------------
// Storage layout, env overrides, retention

fn small_batch_producer_opts() -> Vec<(&'static str, &'static str)> {
    vec![
        ("acks", "all"),
        ("batch.num.messages", "3"),
        ("batch.size", "2000"),
        ("compression.type", "none"),
    ]
}

fn filler_records(n: usize, size: usize) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            let mut v = format!("{i:08}:").into_bytes();
            v.resize(size, b'x');
            Rec::value(v)
        })
        .collect()
}

#[test]
fn env_override_rolls_segments_in_kafka_layout() {
    // Segment size and index interval come from the environment only, not a config file.
    let broker = Broker::builder()
        .env("QANAT_STORAGE_SEGMENT_BYTES", "4096")
        .env("QANAT_STORAGE_INDEX_INTERVAL_BYTES", "1000")
        .start();
    let topic = "layout";
    let recs = filler_records(200, 500);
    let opts = small_batch_producer_opts();
    produce(&broker.bootstrap(), topic, &recs, &opts);
    let dir = broker.partition_dir(topic, 0);
    let logs = segment_files(&dir);
    assert!(
        logs.len() >= 5,
        "QANAT_STORAGE_SEGMENT_BYTES=4096 with ~100 KB produced should roll many segments; \
         {} has {:?}",
        dir.display(),
        logs
    );
    let mut prev_base = -1i64;
    for (i, (name, len)) in logs.iter().enumerate() {
        let stem = name.strip_suffix(".log").unwrap();
        assert!(
            stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()),
            "segment file name {name:?} is not <20-digit base offset>.log"
        );
        let base: i64 = stem.parse().unwrap();
        assert!(base > prev_base, "segment base offsets not increasing");
        prev_base = base;
        // Sealed segments (all but the active last one) have their indexes on disk; with
        // ~3 KB of log and an index interval of 1000 bytes the offset index is not empty.
        if i + 1 < logs.len() {
            for ext in ["index", "timeindex"] {
                let p = dir.join(format!("{stem}.{ext}"));
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                assert!(
                    len > 0,
                    "sealed segment {name} has no (or an empty) .{ext} beside it in {}",
                    dir.display()
                );
            }
        }
        assert!(
            *len <= 4096 + 2100,
            "segment {name} is {len} bytes, far above segment_bytes"
        );
    }
    assert!(
        logs[0].0.starts_with("00000000000000000000"),
        "first segment is {}",
        logs[0].0
    );
    let got = consume_all(&broker.bootstrap(), topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);
    // Reads starting inside a segment, for every offset of a few segments' worth.
    for start in [1usize, 5, 31, 100, 101, 150, 199] {
        let got = consume(
            &broker.bootstrap(),
            topic,
            0,
            Offset::Offset(start as i64),
            recs.len() - start,
        );
        assert_records_eq(&recs[start..], &got, start as i64);
    }
}

#[test]
fn retention_by_size_deletes_old_segments() {
    let segment_bytes = 4096u64;
    let retention_bytes = 20_000u64;
    let broker = Broker::with_config(&format!(
        "[storage]\nsegment_bytes = {segment_bytes}\nretention_bytes = {retention_bytes}\n\
         retention_check_interval_ms = 200\n"
    ));
    let bootstrap = broker.bootstrap();
    let topic = "retention";
    let recs = filler_records(400, 500); // ~200 KB
    let opts = small_batch_producer_opts();
    let delivered = produce(&bootstrap, topic, &recs, &opts);
    assert_dense_deliveries(&delivered, 0, 0);

    let dir = broker.partition_dir(topic, 0);
    let c = consumer(&bootstrap);
    let (low, high) = poll_until("retention to delete the oldest segments", DEADLINE, || {
        let logs = segment_files(&dir);
        let total: u64 = logs.iter().map(|(_, len)| len).sum();
        let (low, high) = c
            .fetch_watermarks(topic, 0, DEADLINE)
            .map_err(|e| format!("fetch_watermarks: {e}"))?;
        let first_gone = logs
            .first()
            .is_some_and(|(name, _)| name != "00000000000000000000.log");
        let first_base: Option<i64> = logs
            .first()
            .and_then(|(name, _)| name.strip_suffix(".log")?.parse().ok());
        if first_gone
            && total <= retention_bytes + 2 * segment_bytes
            && low > 0
            && Some(low) == first_base
        {
            Ok((low, high))
        } else {
            Err(format!(
                "{} .log files totalling {total} bytes (first {:?}), watermarks ({low}, {high})",
                logs.len(),
                logs.first()
            ))
        }
    });
    assert_eq!(high, recs.len() as i64, "high watermark");
    // What is left is readable from the new start and is exactly the tail of what was written.
    let got = consume(
        &bootstrap,
        topic,
        0,
        Offset::Offset(low),
        (high - low) as usize,
    );
    assert_records_eq(&recs[low as usize..], &got, low);
}

// ------------------------------------------------------------------------------------------
// Hostile bytes on the socket

/// How long a hostile connection may take to be answered or closed before the test gives up.
const HOSTILE_DEADLINE: Duration = Duration::from_secs(30);

/// The broker closes `s`, answering at most once (an error) before it does.
fn expect_closed(s: &mut TcpStream, what: &str) {
    match read_kafka_response_within(s, HOSTILE_DEADLINE) {
        Ok(None) => {}
        Ok(Some(_)) => match read_kafka_response_within(s, HOSTILE_DEADLINE) {
            Ok(None) => {}
            _ => panic!("broker kept the connection open after {what}"),
        },
        Err(e) => panic!("broker neither answered nor closed the connection after {what}: {e}"),
    }
}

/// ApiVersions v0 on a fresh connection: the broker answers with our correlation id, error 0,
/// and lists Produce (0) and Fetch (1). Returns the advertised (api key, min, max) triples.
fn assert_api_versions_ok(addr: &str) -> Vec<(i16, i16, i16)> {
    let mut s = raw_connect(addr);
    let apis =
        api_versions_roundtrip(&mut s, 777).unwrap_or_else(|e| panic!("ApiVersions v0: {e}"));
    let keys: Vec<i16> = apis.iter().map(|a| a.0).collect();
    assert!(
        keys.contains(&0) && keys.contains(&1),
        "ApiVersions lists {keys:?}"
    );
    apis
}

#[test]
fn garbage_on_the_socket_does_not_hurt_the_broker() {
    let mut broker = Broker::start();
    let addr = broker.bootstrap();
    let mut rng = rand::rng();
    assert_api_versions_ok(&addr);

    // 1. Random bytes, then hang up.
    for _ in 0..30 {
        let mut s = raw_connect(&addr);
        let mut junk = vec![0u8; rng.random_range(1..4096)];
        rng.fill(&mut junk[..]);
        let _ = s.write_all(&junk);
    }

    // 2. A huge length prefix: must be refused (closed), not allocated and waited for.
    {
        let mut s = raw_connect(&addr);
        s.write_all(&0x7fff_ffffu32.to_be_bytes()).unwrap();
        let _ = s.write_all(&[0u8; 64]);
        expect_closed(&mut s, "a 0x7fffffff length prefix");
    }
    // 3. Negative and zero length prefixes.
    for len in [-1i32, i32::MIN, 0] {
        let mut s = raw_connect(&addr);
        s.write_all(&len.to_be_bytes()).unwrap();
        let _ = s.write_all(&[0u8; 16]);
        if len != 0 {
            expect_closed(&mut s, &format!("length prefix {len}"));
        }
    }

    // 4. A truncated frame: the length promises 100 bytes, 10 arrive, then EOF.
    {
        let mut s = raw_connect(&addr);
        s.write_all(&100i32.to_be_bytes()).unwrap();
        s.write_all(&[0u8, 18, 0, 0, 0, 0, 0, 1, 0, 0]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut s, "a truncated frame followed by EOF");
    }

    // 5. A well-formed header with an unknown api key: an error answer or a close, never a
    //    hang or a crash.
    {
        let mut s = raw_connect(&addr);
        s.write_all(&kafka_request(9999, 0, 4242, b"whatever"))
            .unwrap();
        match read_kafka_response_within(&mut s, HOSTILE_DEADLINE) {
            Ok(None) => {}
            Ok(Some(f)) => {
                assert!(f.len() >= 4, "short response to an unknown api key: {f:?}");
                assert_eq!(
                    i32::from_be_bytes(f[0..4].try_into().unwrap()),
                    4242,
                    "response to an unknown api key carries the wrong correlation id"
                );
            }
            Err(e) => panic!("broker neither answered nor closed after an unknown api key: {e}"),
        }
    }

    // 6. Known api keys with absurd array lengths (must not pre-allocate from them).
    {
        // Metadata v1 (non-flexible): topics array of 0x7fffffff entries, no data.
        let mut s = raw_connect(&addr);
        s.write_all(&kafka_request(3, 1, 1, &0x7fff_ffffi32.to_be_bytes()))
            .unwrap();
        let _ = read_kafka_response_within(&mut s, Duration::from_secs(5));
        // Produce v3: transactional id null, acks 1, timeout 1000, topics array huge.
        let mut body = Vec::new();
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1000i32.to_be_bytes());
        body.extend_from_slice(&0x7fff_fff0i32.to_be_bytes());
        let mut s = raw_connect(&addr);
        s.write_all(&kafka_request(0, 3, 2, &body)).unwrap();
        let _ = read_kafka_response_within(&mut s, Duration::from_secs(5));
        // Metadata v9 (flexible, header v2 = header v1 + empty tagged fields): compact array
        // length as a huge varint.
        let mut body = vec![0u8]; // header tagged fields
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x07]);
        let mut s = raw_connect(&addr);
        s.write_all(&kafka_request(3, 9, 3, &body)).unwrap();
        let _ = read_kafka_response_within(&mut s, Duration::from_secs(5));
    }

    // 7. Random bodies under valid headers of every advertised api key and version.
    let apis = assert_api_versions_ok(&addr);
    for i in 0..200 {
        let (api_key, min, max) = apis[i % apis.len()];
        let version = rng.random_range(min..=max);
        let mut body = vec![0u8; rng.random_range(0..300)];
        rng.fill(&mut body[..]);
        let mut s = raw_connect(&addr);
        let _ = s.write_all(&kafka_request(api_key, version, i as i32, &body));
        let _ = s.shutdown(Shutdown::Write);
    }

    // 8. A valid Produce request with a few random bytes flipped (lengths, varints, CRC,
    //    compression bits...).
    let valid = kafka_request(
        0,
        3,
        99,
        &produce_v3_body("fuzzed", 0, 1, &record_batch(b"fuzz", now_ms())),
    );
    for _ in 0..200 {
        let mut f = valid.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(4..f.len());
            f[at] ^= rng.random_range(1..=255u8);
        }
        let mut s = raw_connect(&addr);
        let _ = s.write_all(&f);
        let _ = s.shutdown(Shutdown::Write);
    }

    // The broker is alive and serves normal clients.
    assert!(
        broker.is_alive(),
        "broker died from garbage input: {:?}",
        broker.try_exit_status()
    );
    assert_api_versions_ok(&addr);
    let topic = "after-garbage";
    let recs = keyed_records(topic, 100);
    let delivered = produce(&addr, topic, &recs, &[("acks", "all")]);
    assert_dense_deliveries(&delivered, 0, 0);
    let got = consume_all(&addr, topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);
    assert!(
        broker.is_alive(),
        "broker died: {:?}",
        broker.try_exit_status()
    );
}

// ------------------------------------------------------------------------------------------
// Topics CLI

/// Whether `text` contains `word` delimited by characters that cannot be in a topic name.
fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        .any(|w| w == word)
}

#[test]
fn topics_cli_create_list_describe_delete() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        "cli-alpha",
        "--partitions",
        "3",
        "--bootstrap",
        &b,
    ]);
    qanat_ok(&["topics", "create", "cli-beta", "--bootstrap", &b]);

    let dup = qanat(&[
        "topics",
        "create",
        "cli-alpha",
        "--partitions",
        "3",
        "--bootstrap",
        &b,
    ]);
    assert!(
        !dup.status.success(),
        "creating an existing topic must fail; stdout:\n{}",
        String::from_utf8_lossy(&dup.stdout)
    );

    let list = qanat_ok(&["topics", "list", "--bootstrap", &b]);
    assert!(
        has_word(&list, "cli-alpha") && has_word(&list, "cli-beta"),
        "list:\n{list}"
    );

    let one = qanat_ok(&["topics", "describe", "cli-alpha", "--bootstrap", &b]);
    assert!(has_word(&one, "cli-alpha"), "describe cli-alpha:\n{one}");
    assert!(
        !has_word(&one, "cli-beta"),
        "describe cli-alpha mentions cli-beta:\n{one}"
    );
    assert!(
        one.to_lowercase().contains("partition") && (has_word(&one, "3") || has_word(&one, "2")),
        "describe cli-alpha should show its 3 partitions:\n{one}"
    );
    let all = qanat_ok(&["topics", "describe", "--bootstrap", &b]);
    assert!(
        has_word(&all, "cli-alpha") && has_word(&all, "cli-beta"),
        "describe:\n{all}"
    );

    // The broker agrees with what the CLI created.
    let md = consumer(&b)
        .fetch_metadata(None, DEADLINE)
        .expect("metadata");
    let count = |name: &str| {
        md.topics()
            .iter()
            .find(|t| t.name() == name)
            .map(|t| t.partitions().len())
    };
    assert_eq!(count("cli-alpha"), Some(3));
    assert_eq!(count("cli-beta"), Some(1));

    let old_recs: Vec<Rec> = (0..30)
        .map(|i| Rec::value(format!("old-{i}")).partition(i % 3))
        .collect();
    produce(&b, "cli-alpha", &old_recs, &[("acks", "all")]);

    qanat_ok(&["topics", "delete", "cli-alpha", "--bootstrap", &b]);
    poll_until(
        "cli-alpha to disappear from `topics list`",
        DEADLINE,
        || {
            let list = qanat_ok(&["topics", "list", "--bootstrap", &b]);
            if !has_word(&list, "cli-alpha") && has_word(&list, "cli-beta") {
                Ok(())
            } else {
                Err(list)
            }
        },
    );
    poll_until("cli-alpha's partition dirs to be removed", DEADLINE, || {
        let left: Vec<_> = (0..3)
            .map(|p| broker.partition_dir("cli-alpha", p))
            .filter(|d| d.exists())
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });

    // A topic re-created under the same name starts empty at offset 0: no stale data.
    // (Explicitly: auto-creation does not bring back a name just deleted.)
    qanat_ok(&["topics", "create", "cli-alpha", "--bootstrap", &b]);
    let new_recs = keyed_records("new-alpha", 5);
    let delivered = produce(&b, "cli-alpha", &new_recs, &[("acks", "all")]);
    assert_dense_deliveries(&delivered, 0, 0);
    assert_eq!(watermarks(&b, "cli-alpha", 0), (0, 5));
    assert_records_eq(&new_recs, &consume_all(&b, "cli-alpha", 0, 5), 0);
}

// ------------------------------------------------------------------------------------------
// Concurrency, sizes, offsets, configuration

#[test]
fn concurrent_producers_and_a_live_consumer_on_one_partition() {
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let topic = "concurrent";
    // Create the topic first so the consumer can be assigned before data arrives.
    produce(
        &bootstrap,
        topic,
        &[Rec::value("first")],
        &[("acks", "all")],
    );
    let producers = 4;
    let per_producer = 1000;
    let reader = {
        let bootstrap = bootstrap.clone();
        thread::spawn(move || {
            consume(
                &bootstrap,
                topic,
                0,
                Offset::Offset(1),
                producers * per_producer,
            )
        })
    };
    let writers: Vec<_> = (0..producers)
        .map(|w| {
            let bootstrap = bootstrap.clone();
            thread::spawn(move || {
                let recs: Vec<Rec> = (0..per_producer)
                    .map(|i| Rec::value(format!("w{w}-{i:06}")).partition(0))
                    .collect();
                // Small batches so the writers' requests interleave.
                produce(
                    &bootstrap,
                    topic,
                    &recs,
                    &[
                        ("acks", "1"),
                        ("batch.num.messages", "50"),
                        ("linger.ms", "1"),
                    ],
                )
            })
        })
        .collect();
    let mut all_offsets = Vec::new();
    for w in writers {
        all_offsets.extend(w.join().expect("writer").into_iter().map(|(_, o)| o));
    }
    all_offsets.sort_unstable();
    let expected: Vec<i64> = (1..=(producers * per_producer) as i64).collect();
    assert_eq!(
        all_offsets, expected,
        "acknowledged offsets are not exactly 1..=N"
    );

    let got = reader.join().expect("reader");
    let mut next = vec![0usize; producers];
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.offset, 1 + i as i64, "offsets read back are not dense");
        let v = m.value_str();
        let (w, n) = v[1..].split_once('-').expect("value format");
        let (w, n): (usize, usize) = (w.parse().unwrap(), n.parse().unwrap());
        assert_eq!(
            n, next[w],
            "writer {w}'s records out of order or missing at offset {}",
            m.offset
        );
        next[w] += 1;
    }
    assert_eq!(next, vec![per_producer; producers]);
}

#[test]
fn large_records_with_small_fetch_limits() {
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let topic = "large";
    let mut rng = rand::rng();
    let mut recs = Vec::new();
    for i in 0..4 {
        let mut big = vec![0u8; 900_000];
        rng.fill(&mut big[..]);
        recs.push(Rec::value(big).key(format!("big-{i}")));
        recs.push(Rec::value(format!("small after big-{i}")));
    }
    let delivered = produce(
        &bootstrap,
        topic,
        &recs,
        &[("acks", "all"), ("linger.ms", "0")],
    );
    assert_dense_deliveries(&delivered, 0, 0);
    // A partition fetch limit far below the record size: the broker must still return the
    // first batch whole (KIP-74) or the consumer could never make progress.
    let got = consume_with(
        &bootstrap,
        topic,
        0,
        Offset::Offset(0),
        recs.len(),
        &[("max.partition.fetch.bytes", "1024")],
    );
    assert_records_eq(&recs, &got, 0);
}

#[test]
fn fetch_past_the_end_reports_offset_out_of_range() {
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let topic = "out-of-range";
    produce(
        &bootstrap,
        topic,
        &keyed_records(topic, 10),
        &[("acks", "all")],
    );
    let c = consumer(&bootstrap);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(50))
        .unwrap();
    c.assign(&tpl).unwrap();
    let err = poll_until(
        "an offset-out-of-range error for offset 50 (high watermark 10)",
        DEADLINE,
        || match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => panic!("fetched a record at offset {} past the end", m.offset()),
            // With auto.offset.reset=error, librdkafka turns the broker's OFFSET_OUT_OF_RANGE
            // into a consumer error with code _AUTO_OFFSET_RESET (whose text, which names the
            // broker error, the rdkafka crate does not keep).
            Some(Err(e))
                if matches!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange)
                ) =>
            {
                Ok(e)
            }
            Some(Err(e)) => Err(e.to_string()),
            None => Err("nothing yet".to_string()),
        },
    );
    eprintln!("consumer reported: {err}");
}

#[test]
fn topic_auto_creation_settings() {
    // auto_create_topics = false: producing to an unknown topic fails and creates nothing.
    let off = Broker::with_config("[broker]\nauto_create_topics = false\n");
    let b = off.bootstrap();
    let outcome = try_produce(
        &b,
        "not-created",
        &[Rec::value("x")],
        &[("acks", "all"), ("message.timeout.ms", "3000")],
    );
    assert!(
        outcome.iter().all(Result::is_err),
        "produce to a missing topic with auto-creation off succeeded: {outcome:?}"
    );
    let md = consumer(&b)
        .fetch_metadata(None, DEADLINE)
        .expect("metadata");
    assert!(
        md.topics().iter().all(|t| t.name() != "not-created"),
        "topic was auto-created although auto_create_topics = false"
    );
    assert!(!off.partition_dir("not-created", 0).exists());
    // Explicit creation still works.
    qanat_ok(&["topics", "create", "made", "--bootstrap", &b]);
    produce(&b, "made", &[Rec::value("y")], &[("acks", "all")]);

    // default_partitions from the file, overridden by the environment.
    let on = Broker::builder()
        .config("[broker]\nauto_create_topics = true\ndefault_partitions = 3\n")
        .env("QANAT_BROKER_DEFAULT_PARTITIONS", "2")
        .start();
    let b = on.bootstrap();
    produce(&b, "auto", &[Rec::value("z")], &[("acks", "all")]);
    let md = consumer(&b)
        .fetch_metadata(Some("auto"), DEADLINE)
        .expect("metadata");
    assert_eq!(
        md.topics()[0].partitions().len(),
        2,
        "auto-created topic: QANAT_BROKER_DEFAULT_PARTITIONS=2 must override default_partitions = 3"
    );
}

#[test]
fn retention_by_time_deletes_expired_segments_and_keeps_offsets() {
    let broker = Broker::with_config(
        "[storage]\nsegment_bytes = 4096\nretention_ms = 3600000\n\
         retention_check_interval_ms = 200\n",
    );
    let bootstrap = broker.bootstrap();
    let topic = "retention-time";
    // Records stamped two days ago: every segment they fill is past a one-hour retention.
    let old = now_ms() - 2 * 86_400_000;
    let recs: Vec<Rec> = filler_records(100, 500)
        .into_iter()
        .map(|r| r.timestamp(old))
        .collect();
    produce(&bootstrap, topic, &recs, &small_batch_producer_opts());
    let dir = broker.partition_dir(topic, 0);
    let c = consumer(&bootstrap);
    let low = poll_until(
        "time retention to delete expired segments",
        DEADLINE,
        || {
            let logs = segment_files(&dir);
            let (low, high) = c
                .fetch_watermarks(topic, 0, DEADLINE)
                .map_err(|e| format!("fetch_watermarks: {e}"))?;
            let first_gone = logs
                .first()
                .is_none_or(|(name, _)| name != "00000000000000000000.log");
            if first_gone && low > 0 {
                Ok(low)
            } else {
                Err(format!("segments {logs:?}, watermarks ({low}, {high})"))
            }
        },
    );
    assert!(low <= 100);
    // Whatever expired data is left is readable from the new start.
    let rest = consume(
        &bootstrap,
        topic,
        0,
        Offset::Offset(low),
        (100 - low) as usize,
    );
    assert_records_eq(&recs[low as usize..], &rest, low);
    // New data continues the offset sequence (offsets are never reused) and is kept.
    let fresh = keyed_records("fresh", 10);
    let delivered = produce(&bootstrap, topic, &fresh, &[("acks", "all")]);
    assert_dense_deliveries(&delivered, 0, 100);
    let (low2, high2) = watermarks(&bootstrap, topic, 0);
    assert_eq!(high2, 110);
    let got = consume(&bootstrap, topic, 0, Offset::Offset(100), 10);
    assert_records_eq(&fresh, &got, 100);
    assert!(
        low2 <= 100,
        "fresh records were deleted by time retention (low {low2})"
    );
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let broker = Broker::builder().metrics().start();
    let metrics = broker.metrics_addr().expect(
        "broker did not print 'qanat metrics listening on HOST:PORT' before its listening line",
    );
    produce(
        &broker.bootstrap(),
        "metered",
        &keyed_records("m", 10),
        &[("acks", "all")],
    );
    let mut s = TcpStream::connect(&metrics).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.lines().next().unwrap_or_default();
    assert!(status.contains(" 200"), "GET /metrics: {status}\n{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(
        body.lines()
            .any(|l| !l.starts_with('#') && !l.trim().is_empty()),
        "no samples in /metrics after producing:\n{resp}"
    );
    let topic = [("topic", "metered")];
    assert_eq!(
        support::metric(body, "qanat_records_in_total", &topic),
        Some(10.0),
        "{body}"
    );
    // Reading the 10 records back counts them out, once each.
    consume_all(&broker.bootstrap(), "metered", 0, 10);
    let text = poll_until("records out counted", DEADLINE, || {
        let text = support::scrape(&metrics)?;
        match support::metric(&text, "qanat_records_out_total", &topic) {
            Some(n) if n >= 10.0 => Ok(text),
            other => Err(format!("qanat_records_out_total = {other:?}")),
        }
    });
    assert_eq!(
        support::metric(&text, "qanat_records_out_total", &topic),
        Some(10.0),
        "{text}"
    );
    assert!(
        support::metric(&text, "qanat_request_seconds_count", &[("api", "Produce")])
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

// ------------------------------------------------------------------------------------------
// Hand-made produce requests: acks=0 gets no response, a corrupt batch is refused

fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// A RecordBatch v2 with one uncompressed record (no key, no headers).
fn record_batch(value: &[u8], timestamp: i64) -> Vec<u8> {
    let mut rec = Vec::new();
    rec.push(0u8); // attributes
    put_varint(&mut rec, 0); // timestamp delta
    put_varint(&mut rec, 0); // offset delta
    put_varint(&mut rec, -1); // null key
    put_varint(&mut rec, value.len() as i64);
    rec.extend_from_slice(value);
    put_varint(&mut rec, 0); // headers
    let mut records = Vec::new();
    put_varint(&mut records, rec.len() as i64);
    records.extend_from_slice(&rec);
    batch_around(0, 1, timestamp, timestamp, &records)
}

/// A RecordBatch v2 (base offset 0, no producer id) around an encoded, possibly compressed,
/// records section.
fn batch_around(
    attributes: i16,
    record_count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    records: &[u8],
) -> Vec<u8> {
    // Everything the CRC covers: attributes .. records.
    let mut tail = Vec::new();
    tail.extend_from_slice(&attributes.to_be_bytes());
    tail.extend_from_slice(&(record_count - 1).to_be_bytes()); // last offset delta
    tail.extend_from_slice(&base_timestamp.to_be_bytes());
    tail.extend_from_slice(&max_timestamp.to_be_bytes());
    tail.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    tail.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    tail.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    tail.extend_from_slice(&record_count.to_be_bytes());
    tail.extend_from_slice(records);

    let mut batch = Vec::new();
    batch.extend_from_slice(&0i64.to_be_bytes()); // base offset
    let batch_length = 4 + 1 + 4 + tail.len(); // leader epoch + magic + crc + tail
    batch.extend_from_slice(&(batch_length as i32).to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c(&tail).to_be_bytes());
    batch.extend_from_slice(&tail);
    batch
}

/// Produce v3 body for one partition.
fn produce_v3_body(topic: &str, partition: i32, acks: i16, batch: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(-1i16).to_be_bytes()); // null transactional id
    b.extend_from_slice(&acks.to_be_bytes());
    b.extend_from_slice(&30_000i32.to_be_bytes()); // timeout
    b.extend_from_slice(&1i32.to_be_bytes()); // one topic
    b.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&1i32.to_be_bytes()); // one partition
    b.extend_from_slice(&partition.to_be_bytes());
    b.extend_from_slice(&(batch.len() as i32).to_be_bytes());
    b.extend_from_slice(batch);
    b
}

/// (correlation id, error code, base offset) of a Produce v3 response for one partition.
fn parse_produce_v3_response(f: &[u8]) -> (i32, i16, i64) {
    let i32_at = |at: usize| i32::from_be_bytes(f[at..at + 4].try_into().unwrap());
    let corr = i32_at(0);
    let mut at = 4;
    assert_eq!(i32_at(at), 1, "topics in produce response");
    at += 4;
    let name_len = i16::from_be_bytes(f[at..at + 2].try_into().unwrap()) as usize;
    at += 2 + name_len;
    assert_eq!(i32_at(at), 1, "partitions in produce response");
    at += 4 + 4; // count + partition index
    let error = i16::from_be_bytes(f[at..at + 2].try_into().unwrap());
    let base_offset = i64::from_be_bytes(f[at + 2..at + 10].try_into().unwrap());
    (corr, error, base_offset)
}

#[test]
fn raw_produce_acks0_gets_no_response_and_corrupt_batches_are_refused() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    let topic = "raw";
    produce(&b, topic, &[Rec::value("first")], &[("acks", "all")]);
    let now = now_ms();
    let mut s = raw_connect(&b);

    // acks=0, then ApiVersions: the first (and only) response is the ApiVersions one.
    let acks0 = produce_v3_body(topic, 0, 0, &record_batch(b"raw-acks0", now));
    s.write_all(&kafka_request(0, 3, 10, &acks0)).unwrap();
    s.write_all(&kafka_request(18, 0, 11, &[])).unwrap();
    let f = expect_kafka_response(&mut s, "the ApiVersions response");
    let corr = i32::from_be_bytes(f[0..4].try_into().unwrap());
    assert_eq!(
        corr, 11,
        "got a response with correlation id {corr}: a produce with acks=0 must not be answered"
    );

    // acks=1 with a valid batch: appended after the acks=0 record.
    let acks1 = produce_v3_body(topic, 0, 1, &record_batch(b"raw-acks1", now));
    s.write_all(&kafka_request(0, 3, 12, &acks1)).unwrap();
    let (corr, error, base) =
        parse_produce_v3_response(&expect_kafka_response(&mut s, "a produce response"));
    assert_eq!(
        (corr, error, base),
        (12, 0, 2),
        "(correlation id, error, base offset)"
    );

    // A batch whose CRC does not match is refused (CORRUPT_MESSAGE = 2) and not stored.
    let mut bad = record_batch(b"corrupt", now);
    let last = bad.len() - 2;
    bad[last] ^= 0xff; // flip bits inside the record value, after the CRC was computed
    let corrupt = produce_v3_body(topic, 0, 1, &bad);
    s.write_all(&kafka_request(0, 3, 13, &corrupt)).unwrap();
    match read_kafka_response(&mut s) {
        Ok(Some(f)) => {
            let (corr, error, _) = parse_produce_v3_response(&f);
            assert_eq!(corr, 13);
            assert_eq!(
                error, 2,
                "a batch with a wrong CRC must get CORRUPT_MESSAGE"
            );
        }
        Ok(None) => panic!("the broker closed the connection on a corrupt batch"),
        Err(e) => panic!("no answer to a produce with a corrupt batch: {e}"),
    }
    assert_eq!(
        watermarks(&b, topic, 0),
        (0, 3),
        "watermarks after the corrupt batch"
    );
    let got = consume_all(&b, topic, 0, 3);
    let values: Vec<String> = got.iter().map(Msg::value_str).collect();
    assert_eq!(values, ["first", "raw-acks0", "raw-acks1"]);
}

/// Produce v3 body for one topic with several (partition, batch) entries.
fn produce_v3_body_multi(topic: &str, acks: i16, parts: &[(i32, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(-1i16).to_be_bytes()); // null transactional id
    b.extend_from_slice(&acks.to_be_bytes());
    b.extend_from_slice(&30_000i32.to_be_bytes()); // timeout
    b.extend_from_slice(&1i32.to_be_bytes()); // one topic
    b.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&(parts.len() as i32).to_be_bytes());
    for (partition, batch) in parts {
        b.extend_from_slice(&partition.to_be_bytes());
        b.extend_from_slice(&(batch.len() as i32).to_be_bytes());
        b.extend_from_slice(batch);
    }
    b
}

#[test]
fn corrupt_batch_fails_its_partition_only() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        "mixed",
        "--partitions",
        "2",
        "--bootstrap",
        &b,
    ]);
    let now = now_ms();
    let mut bad = record_batch(b"corrupt", now);
    let last = bad.len() - 2;
    bad[last] ^= 0xff;
    let body = produce_v3_body_multi("mixed", 1, &[(0, bad), (1, record_batch(b"good", now))]);
    let mut s = raw_connect(&b);
    s.write_all(&kafka_request(0, 3, 21, &body)).unwrap();
    let f = expect_kafka_response(&mut s, "a produce response");
    let i32_at = |at: usize| i32::from_be_bytes(f[at..at + 4].try_into().unwrap());
    assert_eq!(i32_at(0), 21, "correlation id");
    assert_eq!(i32_at(4), 1, "topics in the response");
    let name_len = i16::from_be_bytes(f[8..10].try_into().unwrap()) as usize;
    let mut at = 10 + name_len;
    assert_eq!(i32_at(at), 2, "partitions in the response");
    at += 4;
    let mut errors = Vec::new();
    for _ in 0..2 {
        let partition = i32_at(at);
        let error = i16::from_be_bytes(f[at + 4..at + 6].try_into().unwrap());
        errors.push((partition, error));
        at += 4 + 2 + 8 + 8; // index, error, base offset, log append time (v3)
    }
    errors.sort();
    assert_eq!(errors, [(0, 2), (1, 0)], "(partition, error) per partition");
    assert_eq!(
        watermarks(&b, "mixed", 0),
        (0, 0),
        "nothing stored for the corrupt batch"
    );
    let got = consume_all(&b, "mixed", 1, 1);
    assert_eq!(got[0].value_str(), "good");
}

#[test]
fn invalid_topic_names_are_refused_and_touch_no_files() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    let long = "x".repeat(250);
    for name in ["../escape", "a/b", "..", ".", "sp ace", long.as_str()] {
        let outcome = try_produce(
            &b,
            name,
            &[Rec::value("nope")],
            &[("acks", "all"), ("message.timeout.ms", "3000")],
        );
        assert!(
            outcome.iter().all(Result::is_err),
            "produce to the invalid topic {name:?} succeeded: {outcome:?}"
        );
        let out = qanat(&["topics", "create", name, "--bootstrap", &b]);
        assert!(
            !out.status.success(),
            "`qanat topics create {name:?}` succeeded; stdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Nothing was created next to or inside the data dir for those names.
    let root = broker.data_dir().parent().unwrap().to_path_buf();
    let mut outside: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    outside.sort();
    assert_eq!(
        outside,
        ["broker.stderr.log", "data"],
        "files beside the data dir"
    );
    let inside: Vec<String> = std::fs::read_dir(broker.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("escape") || n.contains("xxxxxxxx") || n.contains(' '))
        .collect();
    assert!(
        inside.is_empty(),
        "data dir entries for invalid topics: {inside:?}"
    );
}

// ------------------------------------------------------------------------------------------
// Decompression bombs: refused at produce; stored ones cost their readers one error, and the
// broker's memory stays bounded either way

/// Attributes value of a zstd batch.
const ZSTD_CODEC: i16 = 4;
/// Peak RSS allowed to a broker that met a bomb (the bombs inflate to 1–2 GiB).
const RSS_BOUND: u64 = 512 << 20;

/// A zstd batch of `records` well-formed records, each a value of `value_len` zero bytes (no
/// key, no headers) with timestamp `base_timestamp + i`, streamed through the encoder a chunk
/// at a time: the uncompressed records never exist in the test either.
fn zstd_bomb(records: i32, value_len: usize, base_timestamp: i64) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for i in 0..records {
        let mut head = vec![0u8]; // attributes
        put_varint(&mut head, i64::from(i)); // timestamp delta
        put_varint(&mut head, i64::from(i)); // offset delta
        put_varint(&mut head, -1); // null key
        put_varint(&mut head, value_len as i64);
        let mut rec = Vec::new();
        put_varint(&mut rec, (head.len() + value_len + 1) as i64);
        rec.extend_from_slice(&head);
        enc.write_all(&rec).unwrap();
        let mut left = value_len;
        while left > 0 {
            let n = left.min(zeros.len());
            enc.write_all(&zeros[..n]).unwrap();
            left -= n;
        }
        enc.write_all(&[0]).unwrap(); // no headers
    }
    let payload = enc.finish().unwrap();
    let max_ts = base_timestamp + i64::from(records) - 1;
    batch_around(ZSTD_CODEC, records, base_timestamp, max_ts, &payload)
}

/// (partition, error code, base offset) of every partition in a Produce v3 response for one
/// topic, sorted by partition.
fn produce_v3_partitions(f: &[u8]) -> Vec<(i32, i16, i64)> {
    let i32_at = |at: usize| i32::from_be_bytes(f[at..at + 4].try_into().unwrap());
    assert_eq!(i32_at(4), 1, "topics in the response");
    let name_len = i16::from_be_bytes(f[8..10].try_into().unwrap()) as usize;
    let mut at = 10 + name_len;
    let n = i32_at(at);
    at += 4;
    let mut out = Vec::new();
    for _ in 0..n {
        let partition = i32_at(at);
        let error = i16::from_be_bytes(f[at + 4..at + 6].try_into().unwrap());
        let base = i64::from_be_bytes(f[at + 6..at + 14].try_into().unwrap());
        out.push((partition, error, base));
        at += 4 + 2 + 8 + 8; // index, error, base offset, log append time (v3)
    }
    out.sort();
    out
}

/// Send one hand-made Produce v3 (acks=1) and return its per-partition results.
fn raw_produce(bootstrap: &str, topic: &str, parts: &[(i32, Vec<u8>)]) -> Vec<(i32, i16, i64)> {
    let mut s = raw_connect(bootstrap);
    s.write_all(&kafka_request(
        0,
        3,
        31,
        &produce_v3_body_multi(topic, 1, parts),
    ))
    .unwrap();
    produce_v3_partitions(&expect_kafka_response(&mut s, "a produce response"))
}

fn assert_peak_rss_bounded(broker: &Broker, when: &str) {
    let peak = broker.proc_status_bytes("VmHWM");
    eprintln!("broker peak RSS {} MiB {when}", peak >> 20);
    assert!(
        peak < RSS_BOUND,
        "broker peak RSS {} MiB {when} (bound {} MiB)",
        peak >> 20,
        RSS_BOUND >> 20
    );
}

#[test]
fn compressed_bomb_is_refused_while_the_other_partition_lands() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        "bomb",
        "--partitions",
        "2",
        "--bootstrap",
        &b,
    ]);
    let now = now_ms();
    // 2 GiB of zeros in 1 MiB records, well-formed: only the size is wrong.
    let bomb = zstd_bomb(2048, 1 << 20, now);
    assert!(bomb.len() < 1 << 20, "bomb is {} bytes", bomb.len());
    let results = raw_produce(&b, "bomb", &[(0, bomb), (1, record_batch(b"good", now))]);
    // MESSAGE_TOO_LARGE = 10 for the bomb; the good batch lands.
    assert_eq!(
        results.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        [(0, 10), (1, 0)],
        "(partition, error) per partition"
    );
    assert_eq!(
        watermarks(&b, "bomb", 0),
        (0, 0),
        "nothing stored for the bomb"
    );
    let got = consume_all(&b, "bomb", 1, 1);
    assert_eq!(got[0].value_str(), "good");
    let log = broker.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("produce refused: batch records"))
        .unwrap_or_else(|| panic!("no refusal logged; stderr:\n{}", tail(&log, 20)));
    for part in [
        "bomb",
        "partition=0",
        "max_uncompressed_batch_bytes=67108864",
        "batch_bytes=",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    assert_peak_rss_bounded(&broker, "after refusing a 2 GiB bomb");
}

#[test]
fn stored_bomb_costs_push_and_seek_by_time_one_error_with_bounded_memory() {
    // A limit high enough to store a 1 GiB batch, as data stored before the limit existed.
    let mut broker = Broker::builder()
        .http()
        .config("[broker]\nmax_uncompressed_batch_bytes = 4294967296\n")
        .start();
    let b = broker.bootstrap();
    let topic = "stored";
    let t0 = now_ms() - 3_600_000;
    let shop = |v: &str, ts: i64| Rec::value(v).header("app", Some(b"shop")).timestamp(ts);
    produce(&b, topic, &[shop("before", t0)], &[("acks", "all")]);
    let results = raw_produce(&b, topic, &[(0, zstd_bomb(1024, 1 << 20, t0 + 1_000))]);
    assert_eq!(
        results,
        [(0, 0, 1)],
        "the bomb is stored under the high limit"
    );
    produce(&b, topic, &[shop("after", t0 + 5_000)], &[("acks", "all")]);
    assert_eq!(watermarks(&b, topic, 0), (0, 1026));

    let http = broker.http_addr().unwrap();
    let path = format!(
        "/v1/topics/{topic}/events?from=earliest&filter={}",
        percent_encode("app = 'shop'")
    );
    let pushed = |http: &str| {
        let mut sse = SseStream::open(http, &path);
        assert_eq!(sse.status, 200);
        let deadline = Instant::now() + DEADLINE;
        let mut events = Vec::new();
        while let Some(e) = sse.next_event(deadline) {
            let last = e.event == "error" || e.id == "0:1025";
            events.push((e.event, e.id));
            if last {
                break;
            }
        }
        events
    };
    let rec = |id: &str| ("record".to_string(), id.to_string());
    // Under the high limit the batch decodes, as a stream: the filter passes the two records.
    assert_eq!(pushed(&http), [rec("0:0"), rec("0:1025")]);
    let c = consumer(&b);
    assert_eq!(offset_for_time(&c, topic, t0 + 1_500), Offset::Offset(501));
    assert_peak_rss_bounded(&broker, "after decoding a stored 1 GiB batch");

    // Under the default limit the stored batch no longer decodes: one error per reader.
    broker.stop();
    let config = broker.data_dir().parent().unwrap().join("qanat.toml");
    std::fs::write(&config, "").unwrap();
    broker.start_again();
    let http = broker.http_addr().unwrap();
    let events = pushed(&http);
    assert_eq!(events[0], rec("0:0"));
    assert_eq!(events[1].0, "error", "{events:?}");
    assert_eq!(events.len(), 2, "{events:?}");
    let c = consumer(&b);
    // Seek by time answers the bad batch's base offset: nothing after it is skipped.
    assert_eq!(offset_for_time(&c, topic, t0 + 1_500), Offset::Offset(1));
    assert!(
        broker.stderr().contains("does not decode"),
        "{}",
        broker.stderr_tail(20)
    );
    // The broker still serves everything else.
    produce(&b, topic, &[shop("later", t0 + 6_000)], &[("acks", "all")]);
    let got = consume(&b, topic, 0, Offset::Offset(1025), 2);
    let values: Vec<String> = got.iter().map(Msg::value_str).collect();
    assert_eq!(values, ["after", "later"]);
    assert_peak_rss_bounded(&broker, "after meeting a stored batch over the limit");
}
