//! Durability seen from Kafka clients (A3, A5): with `fsync = "always"` consumers see only
//! what an fdatasync covers, and a failed fdatasync is cut back so that a producer's retry
//! is stored exactly once (the broker runs in-process over a storage whose fdatasyncs the
//! test can hold or fail); a full disk refuses writes while reads go on, and writing resumes
//! with nothing acknowledged lost (the real binary over a small tmpfs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Instant;

use qanat_broker::Config;
use qanat_log::{FaultyStorage, OsStorage, SyncFaults, SystemClock};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use support::{
    consume, consumer_config, produce, try_produce, watermarks, Broker, Rec, Tmpfs, DEADLINE,
};

/// A broker served by this process, stopped when dropped.
struct InProcess {
    bootstrap: String,
    faults: Arc<SyncFaults>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Serves the broker until dropped.
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl InProcess {
    fn start(toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let storage = FaultyStorage::new(Arc::new(OsStorage));
        let faults = storage.faults();
        let config = Config::from_toml_with_env(toml, std::iter::empty()).unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let broker = Arc::new(
            qanat_broker::Broker::open(
                config,
                dir.path(),
                Arc::new(storage),
                Arc::new(SystemClock),
                ("127.0.0.1".to_string(), i32::from(port)),
            )
            .unwrap(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let advertised = broker.advertised.clone();
        let listeners = vec![qanat_broker::listener::Listener::plaintext(
            listener, advertised,
        )];
        runtime.spawn(qanat_broker::serve(listeners, broker, async move {
            let _ = stopped.await;
        }));
        InProcess {
            bootstrap: format!("127.0.0.1:{port}"),
            faults,
            stop: Some(stop),
            _runtime: runtime,
            _dir: dir,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.faults.release();
        self.faults.fail_next(0);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

const ALWAYS: &str = "[storage]\nfsync = \"always\"\n";

/// Assign partition 0 from the beginning and poll until the end of the partition is
/// reported; returns the values read before it.
fn read_to_reported_end(bootstrap: &str, topic: &str) -> Vec<String> {
    let consumer: BaseConsumer = consumer_config(bootstrap)
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut values = Vec::new();
    while Instant::now() < deadline {
        match consumer.poll(support::POLL_PAUSE) {
            Some(Ok(m)) => values.push(String::from_utf8_lossy(m.payload().unwrap()).into_owned()),
            Some(Err(KafkaError::PartitionEOF(0))) => return values,
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    panic!("no end of partition reported; read {values:?}");
}

#[test]
fn consumers_see_no_record_before_its_fdatasync_completes() {
    let broker = InProcess::start(ALWAYS);
    let bootstrap = broker.bootstrap.clone();
    produce(
        &bootstrap,
        "visible",
        &[Rec::value("a")],
        &[("acks", "all")],
    );

    broker.faults.hold();
    let producing = {
        let bootstrap = bootstrap.clone();
        std::thread::spawn(move || {
            produce(
                &bootstrap,
                "visible",
                &[Rec::value("b")],
                &[("acks", "all")],
            )
        })
    };
    // "b" is appended and its fdatasync is in progress (held).
    broker.faults.wait_until_held();
    assert_eq!(
        watermarks(&bootstrap, "visible", 0),
        (0, 1),
        "the high watermark stops at the durable end"
    );
    assert_eq!(read_to_reported_end(&bootstrap, "visible"), ["a"]);

    broker.faults.release();
    let delivered = producing.join().unwrap();
    assert_eq!(delivered, [(0, 1)]);
    assert_eq!(watermarks(&bootstrap, "visible", 0), (0, 2));
    let got = consume(&bootstrap, "visible", 0, Offset::Beginning, 2);
    let values: Vec<_> = got.iter().map(|m| m.value_str()).collect();
    assert_eq!(values, ["a", "b"]);
}

#[test]
fn a_failed_fdatasync_is_not_served_and_the_retry_is_stored_once() {
    let broker = InProcess::start(ALWAYS);
    let bootstrap = broker.bootstrap.clone();
    produce(&bootstrap, "cut", &[Rec::value("a")], &[("acks", "all")]);

    // A producer that does not retry sees the failure.
    broker.faults.fail_next(1);
    let failed = try_produce(
        &bootstrap,
        "cut",
        &[Rec::value("lost")],
        &[("acks", "all"), ("retries", "0")],
    );
    assert!(failed[0].is_err(), "{failed:?}");
    // The record that failed is neither served nor kept.
    assert_eq!(watermarks(&bootstrap, "cut", 0), (0, 1));
    assert_eq!(read_to_reported_end(&bootstrap, "cut"), ["a"]);

    // The partition takes writes again; an idempotent producer's own retry after another
    // failed fdatasync lands exactly once.
    broker.faults.fail_next(1);
    let delivered = produce(
        &bootstrap,
        "cut",
        &[Rec::value("b"), Rec::value("c")],
        &[
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", "0"),
        ],
    );
    assert_eq!(delivered, [(0, 1), (0, 2)]);
    assert_eq!(read_to_reported_end(&bootstrap, "cut"), ["a", "b", "c"]);
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_loses_nothing_acknowledged() {
    let disk = Tmpfs::mount(16 << 20);
    let data = disk.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut broker = Broker::builder()
        .data_dir(&data)
        .config("[storage]\nsegment_bytes = 1048576\n")
        .start();
    let bootstrap = broker.bootstrap();
    let no_retry = [("acks", "all"), ("retries", "0"), ("linger.ms", "20")];
    let value = |i: usize| format!("{i:06}-{}", "x".repeat(1000));
    let batch = |from: usize, n: usize| -> Vec<Rec> {
        (from..from + n).map(|i| Rec::value(value(i))).collect()
    };

    let mut acked: Vec<(i64, String)> = Vec::new();
    /// Keep the acknowledged records; return the errors of the others.
    fn settle(
        outcomes: Vec<Result<(i32, i64), String>>,
        recs: &[Rec],
        acked: &mut Vec<(i64, String)>,
    ) -> Vec<String> {
        let mut failed = Vec::new();
        for (r, rec) in outcomes.into_iter().zip(recs) {
            match r {
                Ok((_, offset)) => acked.push((
                    offset,
                    String::from_utf8_lossy(rec.value.as_deref().unwrap_or_default()).into_owned(),
                )),
                Err(e) => failed.push(e),
            }
        }
        failed
    }
    let first = batch(0, 500);
    let failed = settle(
        try_produce(&bootstrap, "full", &first, &no_retry),
        &first,
        &mut acked,
    );
    assert!(failed.is_empty(), "{failed:?}");

    // The disk fills up (something else wrote to it): writes are refused with a storage error.
    // Appends first use up the blocks the segment reserved ahead; past them, and past the
    // segment size (the next segment finds no room), writes are refused.
    disk.fill("filler");
    let mut failed = Vec::new();
    let mut next = 500;
    while failed.is_empty() && next < 20_000 {
        let round = batch(next, 500);
        failed = settle(
            try_produce(&bootstrap, "full", &round, &no_retry),
            &round,
            &mut acked,
        );
        next += 500;
    }
    assert!(!failed.is_empty(), "every write succeeded on a full disk");
    assert!(
        failed.iter().all(|e| e.contains("KafkaStorageError")),
        "{failed:?}"
    );
    assert!(broker.is_alive(), "{}", broker.stderr_tail(30));

    // Reads go on: every acknowledged record is there, in order.
    acked.sort();
    let got = consume(&bootstrap, "full", 0, Offset::Beginning, acked.len());
    let got: Vec<(i64, String)> = got.iter().map(|m| (m.offset, m.value_str())).collect();
    assert_eq!(got, acked);

    // Space comes back: writing resumes where the log ended, nothing acknowledged is lost,
    // including across a restart.
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    let third = batch(next, 500);
    let failed = settle(
        try_produce(&bootstrap, "full", &third, &no_retry),
        &third,
        &mut acked,
    );
    assert!(failed.is_empty(), "{failed:?}");
    broker.restart();
    acked.sort();
    let got = consume(&bootstrap, "full", 0, Offset::Beginning, acked.len());
    let got: Vec<(i64, String)> = got.iter().map(|m| (m.offset, m.value_str())).collect();
    assert_eq!(got, acked);
    let (_, high) = watermarks(&bootstrap, "full", 0);
    assert_eq!(high, acked.len() as i64, "no record that failed was kept");
}
