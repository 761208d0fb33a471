//! Topic creation and deletion against the real broker: all or nothing when file descriptors
//! run out, a clear error when the broker cannot open its partitions, no resurrection of a
//! deleted topic by producers still writing to it, and a new topic id for a re-created topic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, CreateTopicsRequest, CreateTopicsResponse, MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;

use support::{
    limit_open_files, poll_until, produce, producer_config, qanat_command, qanat_ok,
    wait_with_deadline, Broker, RawClient, Rec, DEADLINE,
};

/// What Metadata v12 says about one topic: error code, topic id, partition count.
fn describe(bootstrap: &str, topic: &str, allow_auto_create: bool) -> (i16, [u8; 16], usize) {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
            TopicName(StrBytes::from_string(topic.to_string())),
        ))]))
        .with_allow_auto_topic_creation(allow_auto_create);
    let resp: MetadataResponse = RawClient::connect(bootstrap).call(ApiKey::Metadata, 12, &req);
    let t = resp
        .topics
        .into_iter()
        .next()
        .expect("one topic in the answer");
    (t.error_code, *t.topic_id.as_bytes(), t.partitions.len())
}

/// CreateTopics v7 of one topic: error code and message.
fn create_raw(bootstrap: &str, topic: &str, partitions: i32) -> (i16, String) {
    let req = CreateTopicsRequest::default()
        .with_topics(vec![CreatableTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_num_partitions(partitions)
            .with_replication_factor(1)])
        .with_timeout_ms(60_000);
    let resp: CreateTopicsResponse =
        RawClient::connect(bootstrap).call(ApiKey::CreateTopics, 7, &req);
    let t = resp.topics.into_iter().next().expect("one topic result");
    (
        t.error_code,
        t.error_message.map(|m| m.to_string()).unwrap_or_default(),
    )
}

/// Names in the data directory that belong to `topic`: partition directories and intent files.
fn leftovers(data_dir: &Path, topic: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(data_dir)
        .expect("read data dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            n.strip_prefix(topic).is_some_and(|rest| {
                rest.starts_with('.')
                    || rest
                        .strip_prefix('-')
                        .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .collect();
    names.sort();
    names
}

#[test]
fn create_topics_out_of_descriptors_leaves_nothing_and_says_why() {
    let mut broker = Broker::builder().open_files_limit(256).start();
    let b = broker.bootstrap();
    assert!(
        broker.stderr().contains("open-file limit"),
        "the broker did not log its open-file limit:\n{}",
        broker.stderr_tail(20)
    );

    let (code, message) = create_raw(&b, "big", 2000);
    assert_eq!(
        code,
        ResponseError::KafkaStorageError.code(),
        "CreateTopics of 2000 partitions with 256 descriptors: {message}"
    );
    for needle in [
        "out of file descriptors",
        "2000 partitions",
        "256",
        "ulimit -n",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from: {message}"
        );
    }
    assert_eq!(leftovers(&broker.data_dir(), "big"), Vec::<String>::new());
    let (code, _, _) = describe(&b, "big", false);
    assert_eq!(code, ResponseError::UnknownTopicOrPartition.code());

    // The broker keeps serving, and the descriptors of the failed create were given back.
    qanat_ok(&[
        "topics",
        "create",
        "small",
        "--partitions",
        "8",
        "--bootstrap",
        &b,
    ]);
    produce(&b, "small", &[Rec::value("x")], &[("acks", "all")]);

    broker.restart();
    let b = broker.bootstrap();
    let (code, _, _) = describe(&b, "big", false);
    assert_eq!(
        code,
        ResponseError::UnknownTopicOrPartition.code(),
        "the half-created topic came back after a restart"
    );
    assert_eq!(leftovers(&broker.data_dir(), "big"), Vec::<String>::new());
    assert_eq!(describe(&b, "small", false).2, 8);
}

#[test]
fn broker_without_enough_descriptors_for_its_partitions_fails_to_start_and_says_why() {
    let mut broker = Broker::start();
    let b = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        "many",
        "--partitions",
        "300",
        "--bootstrap",
        &b,
    ]);
    broker.stop();

    let stderr_path = broker.data_dir().with_file_name("low-limit.stderr.log");
    let mut cmd = qanat_command();
    cmd.arg("broker")
        .arg("--data-dir")
        .arg(broker.data_dir())
        .arg("--listen")
        .arg("127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).unwrap());
    limit_open_files(&mut cmd, 128);
    let mut child = cmd.spawn().expect("spawn qanat broker");
    let status = wait_with_deadline(&mut child, DEADLINE).expect("broker did not exit");
    let stderr = fs::read_to_string(&stderr_path).unwrap();
    assert!(
        !status.success(),
        "started with 300 partitions and 128 descriptors:\n{stderr}"
    );
    for needle in [
        "out of file descriptors",
        "300 partitions",
        "128",
        "ulimit -n",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }

    // Nothing was lost: with the ordinary limit every partition is back.
    broker.start_again();
    assert_eq!(describe(&broker.bootstrap(), "many", false).2, 300);
}

/// Delivery reports by sequence number.
struct Reports(Mutex<HashMap<usize, Result<i32, String>>>);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let outcome = match result {
            Ok(m) => Ok(m.partition()),
            Err((e, _)) => Err(e.to_string()),
        };
        self.0.lock().unwrap().insert(seq, outcome);
    }
}

#[test]
fn delete_while_producing_does_not_resurrect_the_topic() {
    let broker = Broker::start();
    let b = broker.bootstrap();
    qanat_ok(&[
        "topics",
        "create",
        "busy",
        "--partitions",
        "4",
        "--bootstrap",
        &b,
    ]);
    let (code, first_id, partitions) = describe(&b, "busy", true);
    assert_eq!((code, partitions), (0, 4));

    let producer: Arc<BaseProducer<Reports>> = Arc::new(
        producer_config(&b, &[("acks", "all"), ("message.timeout.ms", "5000")])
            .create_with_context(Reports(Mutex::new(HashMap::new())))
            .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (producer, stop, sent) = (producer.clone(), stop.clone(), sent.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let seq = sent.load(Ordering::SeqCst);
                let key = format!("k{seq}");
                let value = format!("v{seq}");
                let record = BaseRecord::with_opaque_to("busy", seq)
                    .key(key.as_bytes())
                    .payload(value.as_bytes());
                if producer.send(record).is_ok() {
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                // Paces the loop: returns at once when there are delivery reports.
                producer.poll(Duration::from_millis(2));
            }
            producer.flush(DEADLINE).expect("flush");
        })
    };
    let delivered = || {
        let reports = producer.context().0.lock().unwrap();
        reports.values().filter(|r| r.is_ok()).count()
    };
    poll_until("the producer to get 20 records delivered", DEADLINE, || {
        let n = delivered();
        if n >= 20 {
            Ok(())
        } else {
            Err(format!("{n} delivered"))
        }
    });

    qanat_ok(&["topics", "delete", "busy", "--bootstrap", &b]);
    let after_delete = sent.load(Ordering::SeqCst);
    poll_until(
        "the producer to send 50 records after the delete",
        DEADLINE,
        || {
            let n = sent.load(Ordering::SeqCst);
            if n >= after_delete + 50 {
                Ok(())
            } else {
                Err(format!("{} sent after the delete", n - after_delete))
            }
        },
    );
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("producer thread");

    let reports = producer.context().0.lock().unwrap();
    let accepted: Vec<_> = reports
        .iter()
        .filter(|(seq, r)| **seq >= after_delete && r.is_ok())
        .collect();
    assert!(
        accepted.is_empty(),
        "{} records sent after the delete were accepted, e.g. {:?}",
        accepted.len(),
        accepted.iter().take(5).collect::<Vec<_>>()
    );
    drop(reports);
    let (code, _, _) = describe(&b, "busy", true);
    assert_eq!(
        code,
        ResponseError::UnknownTopicOrPartition.code(),
        "the deleted topic was auto-created again"
    );
    assert_eq!(leftovers(&broker.data_dir(), "busy"), Vec::<String>::new());

    // An explicit create works at once and gives the topic a new id.
    qanat_ok(&[
        "topics",
        "create",
        "busy",
        "--partitions",
        "4",
        "--bootstrap",
        &b,
    ]);
    let (code, second_id, partitions) = describe(&b, "busy", false);
    assert_eq!((code, partitions), (0, 4));
    assert_ne!(second_id, [0; 16]);
    assert_ne!(first_id, second_id, "a re-created topic kept its old id");
    let delivered = produce(
        &b,
        "busy",
        &[Rec::value("new").partition(3)],
        &[("acks", "all")],
    );
    assert_eq!(delivered, vec![(3, 0)], "the re-created topic starts empty");
}
