//! Idempotent producers against the real `qanat` binary (A6):
//!
//! * a librdkafka producer with `enable.idempotence=true` writes through a TCP proxy that the
//!   test makes drop every connection several times mid-stream, each time swallowing the
//!   broker's next response first (so a request that WAS appended loses its acknowledgement
//!   and is retried); reading back, every value is there exactly once, in order per partition;
//! * hand-crafted Produce requests (kafka-protocol + `qanat_log::batch::encode_batch_with`):
//!   an exact retry is acknowledged with the original offset and not stored again; a gapped
//!   or stale sequence gets OUT_OF_ORDER_SEQUENCE_NUMBER.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use qanat_log::batch::{encode_batch_with, SimpleRecord};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream as TokioStream};
use tokio::sync::watch;

use support::{
    consume_all, http_get, metric_values, qanat_ok, watermarks, Broker, RawClient, DEADLINE,
};

// ------------------------------------------------------------------------------------------
// A TCP proxy that can cut every connection

struct Proxy {
    port: u16,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
    swallowed: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl Proxy {
    /// Listen on 127.0.0.1:0; the upstream address is learned later (the broker's config needs
    /// the proxy's port first).
    fn start(upstream: Arc<Mutex<String>>) -> Proxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, cut_rx) = watch::channel(0u64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let swallowed = Arc::new(AtomicU64::new(0));
        let (acc, sw) = (accepted.clone(), swallowed.clone());
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::Relaxed);
                let target = upstream.lock().unwrap().clone();
                let rx = cut_rx.clone();
                let sw = sw.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TokioStream::connect(&target).await {
                        pipe(client, server, rx, sw).await;
                    }
                });
            }
        });
        Proxy {
            port,
            cut,
            accepted,
            swallowed,
            _rt: rt,
        }
    }

    /// Doom every open connection: each swallows the broker's next bytes (a response whose
    /// request was processed) and then closes both sides.
    fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

async fn pipe(
    client: TokioStream,
    server: TokioStream,
    mut cut: watch::Receiver<u64>,
    swallowed: Arc<AtomicU64>,
) {
    cut.borrow_and_update();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                r = sr.read(&mut buf) => {
                    let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                changed = cut.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Swallow what the broker answers next (bounded wait), then close.
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(300), sr.read(&mut buf)).await
                    {
                        swallowed.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
    // Dropping both halves of both sockets closes the connections.
}

// ------------------------------------------------------------------------------------------
// librdkafka producer with delivery and statistics callbacks

#[derive(Default)]
struct Ctx {
    delivered: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Offsets reported per record index.
    reports: Mutex<BTreeMap<usize, (i32, i64)>>,
    retries: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl ClientContext for Ctx {
    fn stats(&self, s: Statistics) {
        let total: u64 = s.brokers.values().map(|b| b.txretries).sum();
        self.retries.fetch_max(total, Ordering::Relaxed);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors
            .lock()
            .unwrap()
            .push(format!("{error}: {reason}"));
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &DeliveryResult<'_>, idx: usize) {
        match r {
            Ok(m) => {
                self.reports
                    .lock()
                    .unwrap()
                    .insert(idx, (m.partition(), m.offset()));
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => self.failures.lock().unwrap().push(format!("#{idx}: {e}")),
        }
    }
}

#[test]
fn idempotent_producer_writes_no_duplicate_across_dropped_connections() {
    let upstream = Arc::new(Mutex::new(String::new()));
    let proxy = Proxy::start(upstream.clone());
    // Metadata must send clients back through the proxy.
    let broker = Broker::builder()
        .config(&format!(
            "[broker]\nadvertised_host = \"127.0.0.1\"\nadvertised_port = {}\n",
            proxy.port
        ))
        .metrics()
        .start();
    *upstream.lock().unwrap() = broker.bootstrap();
    let topic = "idem";
    const PARTITIONS: i32 = 3;
    const N: usize = 30_000;
    const CUTS: u64 = 6;
    qanat_ok(&[
        "topics",
        "create",
        topic,
        "--partitions",
        &PARTITIONS.to_string(),
        "--bootstrap",
        &broker.bootstrap(),
    ]);

    let via_proxy = format!("127.0.0.1:{}", proxy.port);
    let producer: BaseProducer<Ctx> = ClientConfig::new()
        .set("bootstrap.servers", &via_proxy)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "2")
        .set("batch.num.messages", "200")
        .set("message.timeout.ms", "120000")
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "500")
        .set("statistics.interval.ms", "200")
        .create_with_context(Ctx::default())
        .expect("create idempotent producer");

    let values: Vec<String> = (0..N).map(|i| format!("idem-{i:06}")).collect();
    let started = Instant::now();
    let mut cuts_done = 0u64;
    let deadline = Instant::now() + DEADLINE * 2;
    for (i, v) in values.iter().enumerate() {
        let mut rec: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(topic, i)
            .payload(v.as_bytes())
            .partition(i as i32 % PARTITIONS);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    assert!(Instant::now() < deadline, "producer queue stayed full");
                    rec = r;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => panic!("send #{i}: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
        // Cut while acknowledgements are flowing: at 1/8, 2/8, ... of the records delivered.
        let delivered = producer.context().delivered.load(Ordering::Relaxed);
        if cuts_done < CUTS && delivered >= (cuts_done + 1) * N as u64 / (CUTS + 2) {
            proxy.cut();
            cuts_done += 1;
        }
    }
    // Cuts the send loop did not reach (the queue absorbed everything) happen while flushing.
    while cuts_done < CUTS {
        producer.poll(Duration::from_millis(10));
        let delivered = producer.context().delivered.load(Ordering::Relaxed);
        assert!(Instant::now() < deadline, "delivery stalled at {delivered}");
        if delivered >= (cuts_done + 1) * N as u64 / (CUTS + 2) {
            proxy.cut();
            cuts_done += 1;
        }
    }
    producer
        .flush(DEADLINE * 2)
        .expect("flush the idempotent producer");
    let ctx = producer.context();
    let failures = ctx.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} records failed, first: {:?}; client errors: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)],
        ctx.errors.lock().unwrap()
    );
    assert_eq!(ctx.delivered.load(Ordering::Relaxed), N as u64);
    // One more statistics round so the retry count is current.
    producer.poll(Duration::from_millis(400));
    let retries = ctx.retries.load(Ordering::Relaxed);
    let client_errors = ctx.errors.lock().unwrap().clone();
    let reports = ctx.reports.lock().unwrap().clone();
    drop(producer);

    // Read back through the broker directly: exactly N/P values per partition, in order.
    for p in 0..PARTITIONS {
        let want: Vec<&String> = values
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as i32 % PARTITIONS == p)
            .map(|(_, v)| v)
            .collect();
        let (low, high) = watermarks(&broker.bootstrap(), topic, p);
        assert_eq!(
            (low, high),
            (0, want.len() as i64),
            "partition {p} holds {} records, {} were produced: duplicates were stored",
            high - low,
            want.len()
        );
        let got = consume_all(&broker.bootstrap(), topic, p, want.len());
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.offset, j as i64);
            assert_eq!(&g.value_str(), *w, "partition {p} offset {j}");
        }
    }
    // Each delivery report names the offset where the value really is.
    for (i, (p, o)) in &reports {
        assert_eq!(*p, *i as i32 % PARTITIONS);
        assert_eq!(
            *o,
            (*i as i64) / i64::from(PARTITIONS),
            "offset reported for #{i}"
        );
    }

    let metrics = http_get(&broker.metrics_addr().unwrap(), "/metrics").1;
    let dups: f64 = metric_values(&metrics, "qanat_produce_duplicates_total", &[])
        .iter()
        .map(|(_, v)| v)
        .sum();
    eprintln!(
        "idempotent producer: {N} records in {:.1}s through the proxy; {cuts_done} cuts, {} \
         connections accepted, {} response bytes swallowed; librdkafka retries {retries}; broker \
         duplicates acknowledged without storing: {dups}; client errors: {}",
        started.elapsed().as_secs_f64(),
        proxy.accepted.load(Ordering::Relaxed),
        proxy.swallowed.load(Ordering::Relaxed),
        client_errors.len()
    );
    assert!(
        proxy.accepted.load(Ordering::Relaxed) > CUTS as usize,
        "the producer did not reconnect after the cuts"
    );
    assert!(
        dups > 0.0,
        "no duplicate reached the broker (retries {retries}, swallowed {} bytes): the test did \
         not exercise deduplication",
        proxy.swallowed.load(Ordering::Relaxed)
    );
}

// ------------------------------------------------------------------------------------------
// Hand-crafted requests

/// Produce one idempotent batch of `values` to `topic`/0 on `raw`; (error code, base offset).
fn produce_idempotent(
    raw: &mut RawClient,
    topic: &str,
    pid: i64,
    epoch: i16,
    seq: i32,
    values: &[&str],
) -> (i16, i64) {
    let recs: Vec<SimpleRecord<'_>> = values
        .iter()
        .map(|v| SimpleRecord {
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(v.as_bytes()),
        })
        .collect();
    let batch = encode_batch_with(Some((pid, epoch, seq)), &recs);
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(Bytes::from(batch)))])]);
    let resp: ProduceResponse = raw.call(ApiKey::Produce, 8, &req);
    let p = &resp.responses[0].partition_responses[0];
    (p.error_code, p.base_offset)
}

#[test]
fn hand_crafted_sequences_duplicate_gap_and_stale() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    let topic = "idem-raw";
    qanat_ok(&["topics", "create", topic, "--bootstrap", &b]);
    let mut raw = RawClient::connect(&b);
    let init: InitProducerIdResponse = raw.call(
        ApiKey::InitProducerId,
        1,
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(kafka_protocol::messages::ProducerId(-1))
            .with_producer_epoch(-1),
    );
    assert_eq!(init.error_code, 0, "InitProducerId: {init:?}");
    let (pid, epoch) = (init.producer_id.0, init.producer_epoch);
    assert!(pid >= 0 && epoch >= 0, "InitProducerId gave {pid}/{epoch}");
    let oos = ResponseError::OutOfOrderSequenceNumber.code();

    assert_eq!(
        produce_idempotent(&mut raw, topic, pid, epoch, 0, &["a", "b", "c"]),
        (0, 0),
        "first batch"
    );
    // An exact retry: acknowledged with the original offset, not stored again.
    assert_eq!(
        produce_idempotent(&mut raw, topic, pid, epoch, 0, &["a", "b", "c"]),
        (0, 0),
        "retry of seq 0..2"
    );
    assert_eq!(watermarks(&b, topic, 0), (0, 3), "the retry was stored");
    // A gap: expected 3, got 5.
    let (code, _) = produce_idempotent(&mut raw, topic, pid, epoch, 5, &["x"]);
    assert_eq!(code, oos, "gapped sequence 5 (expected 3)");
    // Stale and not a cached batch: 1..2 overlaps what was written.
    let (code, _) = produce_idempotent(&mut raw, topic, pid, epoch, 1, &["b", "c"]);
    assert_eq!(code, oos, "stale sequence 1..2");
    assert_eq!(
        watermarks(&b, topic, 0),
        (0, 3),
        "a refused batch was stored"
    );
    // The right next sequence still works.
    assert_eq!(
        produce_idempotent(&mut raw, topic, pid, epoch, 3, &["d", "e"]),
        (0, 3),
        "seq 3..4"
    );
    let got: Vec<String> = consume_all(&b, topic, 0, 5)
        .iter()
        .map(|m| m.value_str())
        .collect();
    assert_eq!(got, ["a", "b", "c", "d", "e"]);
}
