//! Security end to end, against the real `qanat` binary: listeners with their security
//! protocols, TLS with certificates generated here (`rcgen`), SASL (PLAIN, SCRAM-SHA-256,
//! SCRAM-SHA-512) with users made by `qanat users`, through kcat, confluent-kafka and
//! kafka-python; refusals of wrong credentials and of clients without TLS.
//!
//! These tests FAIL, never skip, when a client is missing: `scripts/test.sh` installs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod collect_support;
mod support;
mod tls_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};

use collect_support::Collector;
use rdkafka::consumer::Consumer;
use support::*;
use tls_support::{make_certs, Certs};

const PASSWORD: &str = "correct horse battery staple";

fn describe(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A CA and a server certificate for localhost/127.0.0.1 signed by it, as PEM files in `dir`:
/// `qanat users add NAME` against `data_dir`, password from the environment.
fn add_user(data_dir: &Path, name: &str, password: &str) {
    let out = qanat_command()
        .args(["users", "--data-dir"])
        .arg(data_dir)
        .args(["add", name])
        .env("QANAT_USER_PASSWORD", password)
        .output()
        .unwrap();
    assert!(out.status.success(), "qanat users add: {}", describe(&out));
}

/// A broker with a SASL_SSL listener named SECURE next to the default PLAINTEXT one, and the
/// user `alice` (both SCRAM mechanisms).
struct Secure {
    broker: Broker,
    certs: Certs,
    _dir: tempfile::TempDir,
}

fn secure_broker(extra: &str) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let certs = make_certs(dir.path(), "localhost");
    add_user(&data, "alice", PASSWORD);
    let config = format!(
        r#"
[sasl]
failure_delay_ms = 10
failure_delay_max_ms = 50

[tls]
cert_file = "{}"
key_file = "{}"

[[broker.listener]]
name = "SECURE"
address = "127.0.0.1:0"
security_protocol = "SASL_SSL"

[[broker.listener]]
name = "SASL"
address = "127.0.0.1:0"
security_protocol = "SASL_PLAINTEXT"
{extra}
"#,
        certs.cert.display(),
        certs.key.display()
    );
    let broker = Broker::builder()
        .config(&config)
        .data_dir(&data)
        .metrics()
        .start();
    Secure {
        broker,
        certs,
        _dir: dir,
    }
}

/// The SASL_SSL broker of the tests of Qanat's own clients, shared by those running at the
/// same time (each uses topics of its own); it stops when the last of them lets it go.
struct Shared {
    /// The SASL_SSL listener.
    secure: String,
    /// The PLAINTEXT listener, for setting up and checking.
    plain: String,
    ca: PathBuf,
    data: PathBuf,
    _broker: Mutex<Secure>,
}

impl Shared {
    fn partition_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.data.join(format!("{topic}-{partition}"))
    }

    /// `dir/name`, holding `password` as its first line.
    fn password_file(dir: &Path, name: &str, password: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("{password}\n")).unwrap();
        path
    }

    /// The flags of a client of the SASL_SSL listener as alice (SCRAM-SHA-512); the
    /// password comes from `QANAT_KAFKA_SASL_PASSWORD`.
    fn flags(&self) -> Vec<String> {
        [
            "--security-protocol",
            "SASL_SSL",
            "--sasl-mechanism",
            "SCRAM-SHA-512",
            "--sasl-username",
            "alice",
            "--ssl-ca-file",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([self.ca.display().to_string()])
        .collect()
    }

    /// A `security` table for alice (SCRAM-SHA-512) under `header`, password from `file`.
    fn table(&self, header: &str, file: &Path) -> String {
        format!(
            "[{header}]\nprotocol = \"SASL_SSL\"\nmechanism = \"SCRAM-SHA-512\"\n\
             username = \"alice\"\npassword_file = \"{}\"\nca_file = \"{}\"\n",
            file.display(),
            self.ca.display()
        )
    }
}

fn shared_secure() -> Arc<Shared> {
    static SHARED: Mutex<Weak<Shared>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.upgrade() {
        return s;
    }
    let secure = secure_broker("");
    let s = Arc::new(Shared {
        secure: secure.broker.listener_addr("SECURE"),
        plain: secure.broker.bootstrap(),
        ca: secure.certs.ca.clone(),
        data: secure.broker.data_dir(),
        _broker: Mutex::new(secure),
    });
    *slot = Arc::downgrade(&s);
    s
}

/// The command failed, and its log reports the refused SASL login.
fn assert_login_refused(out: &Output) {
    assert!(!out.status.success(), "{}", describe(out));
    assert!(
        reports_failed_login(&String::from_utf8_lossy(&out.stderr)),
        "{}",
        describe(out)
    );
}

/// Whether `text` (a client's log) reports the refused SASL login.
fn reports_failed_login(text: &str) -> bool {
    text.contains("SASL authentication error")
        || text.contains("Authentication failed")
        || text.contains("SASL authentication failed")
}

fn kcat(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new("kcat");
    // cargo test puts its own build directories on LD_LIBRARY_PATH, where a librdkafka built
    // without OpenSSL may be found before the system's.
    cmd.env_remove("LD_LIBRARY_PATH")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn kcat_security<'a>(
    s: &'a Secure,
    addr: &'a str,
    mechanism: &'a str,
    user: &'a str,
    password: &'a str,
) -> Vec<String> {
    vec![
        "-b".into(),
        addr.into(),
        "-X".into(),
        "security.protocol=SASL_SSL".into(),
        "-X".into(),
        format!("sasl.mechanisms={mechanism}"),
        "-X".into(),
        format!("sasl.username={user}"),
        "-X".into(),
        format!("sasl.password={password}"),
        "-X".into(),
        format!("ssl.ca.location={}", s.certs.ca.display()),
        "-X".into(),
        "broker.address.family=v4".into(),
    ]
}

fn kcat_roundtrip(s: &Secure, mechanism: &str, topic: &str) {
    let addr = s.broker.listener_addr("SECURE");
    let sec = kcat_security(s, &addr, mechanism, "alice", PASSWORD);
    let lines: Vec<String> = (0..100).map(|i| format!("{topic} line {i}")).collect();
    let mut args: Vec<&str> = sec.iter().map(String::as_str).collect();
    args.extend(["-P", "-t", topic]);
    let out = kcat(&args, Some((lines.join("\n") + "\n").as_bytes()));
    assert!(
        out.status.success(),
        "kcat -P {mechanism}: {}",
        describe(&out)
    );
    let mut args: Vec<&str> = sec.iter().map(String::as_str).collect();
    args.extend(["-C", "-t", topic, "-o", "beginning", "-e", "-q"]);
    let out = kcat(&args, None);
    assert!(
        out.status.success(),
        "kcat -C {mechanism}: {}",
        describe(&out)
    );
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        lines,
        "kcat read back over SASL_SSL/{mechanism}"
    );
}

struct PyRun<'a> {
    client: &'a str,
    bootstrap: &'a str,
    protocol: &'a str,
    mechanism: &'a str,
    user: &'a str,
    password: &'a str,
    topic: &'a str,
    expect: &'a str,
}

fn py_clients(s: &Secure, run: PyRun<'_>) {
    let out = Command::new("python3")
        .arg(py_script("secure_clients.py"))
        .args(["--client", run.client, "--bootstrap", run.bootstrap])
        .args(["--protocol", run.protocol, "--mechanism", run.mechanism])
        .args(["--user", run.user, "--password", run.password])
        .arg("--ca")
        .arg(&s.certs.ca)
        .args(["--topic", run.topic, "--expect", run.expect])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {} {} expecting {}: {}",
        run.client,
        run.protocol,
        run.mechanism,
        run.expect,
        describe(&out)
    );
}

#[test]
fn sasl_ssl_clients_round_trip_with_each_mechanism() {
    require_kcat();
    require_python_modules(&["confluent_kafka", "kafka"]);
    let s = secure_broker("");
    let addr = s.broker.listener_addr("SECURE");
    for (i, mechanism) in ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]
        .into_iter()
        .enumerate()
    {
        kcat_roundtrip(&s, mechanism, &format!("kcat-secure-{i}"));
        for client in ["confluent", "kafka-python"] {
            py_clients(
                &s,
                PyRun {
                    client,
                    bootstrap: &addr,
                    protocol: "SASL_SSL",
                    mechanism,
                    user: "alice",
                    password: PASSWORD,
                    topic: &format!("{client}-secure-{i}"),
                    expect: "ok",
                },
            );
        }
    }
    // Metadata names the listener the client came through, not the PLAINTEXT one.
    let sec = kcat_security(&s, &addr, "SCRAM-SHA-256", "alice", PASSWORD);
    let mut args: Vec<&str> = sec.iter().map(String::as_str).collect();
    args.push("-L");
    let out = kcat(&args, None);
    assert!(out.status.success(), "kcat -L: {}", describe(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains(&format!("at {addr}")),
        "kcat -L over SECURE does not advertise {addr}:\n{listing}"
    );
}

#[test]
fn wrong_credentials_and_missing_tls_are_refused_and_touch_nothing() {
    require_kcat();
    require_python_modules(&["confluent_kafka", "kafka"]);
    let s = secure_broker("");
    let secure = s.broker.listener_addr("SECURE");
    let cases = [
        (
            "confluent",
            "SASL_SSL",
            "SCRAM-SHA-512",
            "alice",
            "wrong",
            "refused-wrong-512",
        ),
        (
            "kafka-python",
            "SASL_SSL",
            "SCRAM-SHA-256",
            "alice",
            "wrong",
            "refused-wrong-256",
        ),
        (
            "confluent",
            "SASL_SSL",
            "PLAIN",
            "alice",
            "wrong",
            "refused-wrong-plain",
        ),
        (
            "kafka-python",
            "SASL_SSL",
            "SCRAM-SHA-512",
            "mallory",
            PASSWORD,
            "refused-unknown",
        ),
        // No TLS on the TLS listener: the handshake never completes.
        (
            "confluent",
            "SASL_PLAINTEXT",
            "SCRAM-SHA-512",
            "alice",
            PASSWORD,
            "refused-no-tls",
        ),
    ];
    for (client, protocol, mechanism, user, password, topic) in cases {
        py_clients(
            &s,
            PyRun {
                client,
                bootstrap: &secure,
                protocol,
                mechanism,
                user,
                password,
                topic,
                expect: "refused",
            },
        );
    }
    // kcat with a wrong password cannot even list metadata.
    let sec = kcat_security(&s, &secure, "SCRAM-SHA-256", "alice", "nope");
    let mut args: Vec<&str> = sec.iter().map(String::as_str).collect();
    args.extend(["-L", "-m", "5"]);
    let out = kcat(&args, None);
    assert!(
        !out.status.success(),
        "kcat -L with a wrong password: {}",
        describe(&out)
    );

    // None of them wrote anything: no refused topic exists, not even auto-created.
    for (.., topic) in cases {
        assert!(
            !s.broker.partition_dir(topic, 0).exists(),
            "topic {topic} exists after refused clients"
        );
    }
    let metrics = scrape(&s.broker.metrics_addr().unwrap()).unwrap();
    let failures: f64 = metric_values(&metrics, "qanat_auth_failures_total", &[])
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert!(failures >= 4.0, "qanat_auth_failures_total = {failures}");
    let log = s.broker.stderr();
    assert!(
        log.contains("authentication failed") && log.contains("127.0.0.1"),
        "failed logins are not logged with the peer address:\n{}",
        s.broker.stderr_tail(40)
    );
}

#[test]
fn requests_before_authentication_close_the_connection() {
    let s = secure_broker("");
    let addr = s.broker.listener_addr("SASL");
    // ApiVersions is answered before authentication.
    let mut conn = raw_connect(&addr);
    let versions = api_versions_roundtrip(&mut conn, 1).unwrap();
    assert!(
        versions
            .iter()
            .any(|(k, lo, hi)| *k == 17 && *lo <= 1 && *hi >= 1),
        "SaslHandshake v1 not advertised: {versions:?}"
    );
    // Metadata v1 (topics null) before any SASL exchange: the broker hangs up, unanswered.
    let frame = kafka_request(3, 1, 42, &[0xff, 0xff, 0xff, 0xff]);
    conn.write_all(&frame).unwrap();
    wait_closed_by_peer(&mut conn, "Metadata before SASL authentication");
}

// ------------------------------------------------------------------------------------------
// Authorization, with hand-crafted requests (exact error codes) over SASL_PLAINTEXT/PLAIN.

mod acl_requests {
    use bytes::Bytes;
    use kafka_protocol::messages::create_acls_request::AclCreation;
    use kafka_protocol::messages::create_topics_request::CreatableTopic;
    use kafka_protocol::messages::delete_acls_request::DeleteAclsFilter;
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    use qanat_log::batch::{encode_batch, SimpleRecord};

    use super::support::RawClient;

    pub fn s(text: &str) -> StrBytes {
        StrBytes::from_string(text.to_string())
    }

    pub fn topic(text: &str) -> TopicName {
        TopicName(s(text))
    }

    /// A raw connection authenticated with SASL/PLAIN.
    pub fn login(addr: &str, user: &str, password: &str) -> RawClient {
        let mut raw = RawClient::connect(addr);
        let hs: SaslHandshakeResponse = raw.call(
            ApiKey::SaslHandshake,
            1,
            &SaslHandshakeRequest::default().with_mechanism(s("PLAIN")),
        );
        assert_eq!(hs.error_code, 0, "SaslHandshake PLAIN");
        let token = format!("\0{user}\0{password}");
        let auth: SaslAuthenticateResponse = raw.call(
            ApiKey::SaslAuthenticate,
            2,
            &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token.into_bytes())),
        );
        assert_eq!(
            auth.error_code, 0,
            "PLAIN login of {user}: {:?}",
            auth.error_message
        );
        raw
    }

    pub fn produce(raw: &mut RawClient, name: &str) -> i16 {
        let batch = encode_batch(&[SimpleRecord {
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(b"v"),
        }]);
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic(name))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(Bytes::from(batch)))])]);
        let resp: ProduceResponse = raw.call(ApiKey::Produce, 8, &req);
        resp.responses[0].partition_responses[0].error_code
    }

    pub fn fetch(raw: &mut RawClient, name: &str) -> i16 {
        fetch_response(raw, name).responses[0].partitions[0].error_code
    }

    pub fn fetch_response(raw: &mut RawClient, name: &str) -> FetchResponse {
        let req = FetchRequest::default()
            .with_max_wait_ms(0)
            .with_min_bytes(0)
            .with_max_bytes(1 << 20)
            .with_topics(vec![FetchTopic::default()
                .with_topic(topic(name))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20)])]);
        raw.call(ApiKey::Fetch, 11, &req)
    }

    pub fn create_topic(raw: &mut RawClient, name: &str) -> i16 {
        let req = CreateTopicsRequest::default()
            .with_timeout_ms(10_000)
            .with_topics(vec![CreatableTopic::default()
                .with_name(topic(name))
                .with_num_partitions(1)
                .with_replication_factor(1)]);
        let resp: CreateTopicsResponse = raw.call(ApiKey::CreateTopics, 5, &req);
        resp.topics[0].error_code
    }

    pub fn delete_topic(raw: &mut RawClient, name: &str) -> i16 {
        let req = DeleteTopicsRequest::default()
            .with_timeout_ms(10_000)
            .with_topic_names(vec![topic(name)]);
        let resp: DeleteTopicsResponse = raw.call(ApiKey::DeleteTopics, 4, &req);
        resp.responses[0].error_code
    }

    pub fn join(raw: &mut RawClient, group: &str) -> i16 {
        let req = JoinGroupRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(10_000)
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![
                kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol::default()
                    .with_name(s("range")),
            ]);
        let resp: JoinGroupResponse = raw.call(ApiKey::JoinGroup, 5, &req);
        resp.error_code
    }

    pub fn commit(raw: &mut RawClient, group: &str, name: &str) -> i16 {
        let req = OffsetCommitRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_generation_id_or_member_epoch(-1)
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(topic(name))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(1)])]);
        let resp: OffsetCommitResponse = raw.call(ApiKey::OffsetCommit, 7, &req);
        resp.topics[0].partitions[0].error_code
    }

    pub fn list_offsets(raw: &mut RawClient, name: &str) -> i16 {
        use kafka_protocol::messages::list_offsets_request::{
            ListOffsetsPartition, ListOffsetsTopic,
        };
        let req = ListOffsetsRequest::default().with_topics(vec![ListOffsetsTopic::default()
            .with_name(topic(name))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(0)
                .with_timestamp(-1)])]);
        let resp: ListOffsetsResponse = raw.call(ApiKey::ListOffsets, 5, &req);
        resp.topics[0].partitions[0].error_code
    }

    pub fn describe_group(raw: &mut RawClient, group: &str) -> i16 {
        let req = DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]);
        let resp: DescribeGroupsResponse = raw.call(ApiKey::DescribeGroups, 3, &req);
        resp.groups[0].error_code
    }

    /// OffsetFetch v7 of `topic` partition 0: (group error, partition error, offset).
    pub fn fetch_offset(raw: &mut RawClient, group: &str, topic_name: &str) -> (i16, i16, i64) {
        use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
        let req = OffsetFetchRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_topics(Some(vec![OffsetFetchRequestTopic::default()
                .with_name(topic(topic_name))
                .with_partition_indexes(vec![0])]));
        let resp: OffsetFetchResponse = raw.call(ApiKey::OffsetFetch, 7, &req);
        let partition = resp.topics.first().and_then(|t| t.partitions.first());
        (
            resp.error_code,
            partition.map_or(-100, |p| p.error_code),
            partition.map_or(-100, |p| p.committed_offset),
        )
    }

    /// FindCoordinator v3 of a group.
    pub fn find_group_coordinator(raw: &mut RawClient, group: &str) -> i16 {
        let req = FindCoordinatorRequest::default()
            .with_key(s(group))
            .with_key_type(0);
        let resp: FindCoordinatorResponse = raw.call(ApiKey::FindCoordinator, 3, &req);
        resp.error_code
    }

    pub fn list_groups(raw: &mut RawClient) -> Vec<String> {
        let resp: ListGroupsResponse =
            raw.call(ApiKey::ListGroups, 4, &ListGroupsRequest::default());
        let mut names: Vec<String> = resp.groups.iter().map(|g| g.group_id.to_string()).collect();
        names.sort();
        names
    }

    /// InitProducerId v4 for an idempotent producer (no transactional id).
    pub fn init_producer_id(raw: &mut RawClient) -> i16 {
        let req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let resp: InitProducerIdResponse = raw.call(ApiKey::InitProducerId, 4, &req);
        resp.error_code
    }

    pub fn delete_group(raw: &mut RawClient, group: &str) -> i16 {
        let req = DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s(group))]);
        let resp: DeleteGroupsResponse = raw.call(ApiKey::DeleteGroups, 1, &req);
        resp.results[0].error_code
    }

    pub fn grow_topic(raw: &mut RawClient, name: &str, count: i32) -> i16 {
        use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
        let req = CreatePartitionsRequest::default()
            .with_timeout_ms(10_000)
            .with_topics(vec![CreatePartitionsTopic::default()
                .with_name(topic(name))
                .with_count(count)
                .with_assignments(None)]);
        let resp: CreatePartitionsResponse = raw.call(ApiKey::CreatePartitions, 1, &req);
        resp.results[0].error_code
    }

    /// Metadata of every topic: the names listed.
    pub fn listed_topics(raw: &mut RawClient) -> Vec<String> {
        let resp: MetadataResponse = raw.call(
            ApiKey::Metadata,
            9,
            &MetadataRequest::default().with_topics(None),
        );
        resp.topics
            .iter()
            .filter_map(|t| t.name.as_ref().map(|n| n.to_string()))
            .collect()
    }

    pub fn metadata_of(raw: &mut RawClient, name: &str) -> i16 {
        let req = MetadataRequest::default()
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic(name)))
            ]))
            .with_allow_auto_topic_creation(false);
        let resp: MetadataResponse = raw.call(ApiKey::Metadata, 9, &req);
        resp.topics[0].error_code
    }

    /// CreateAcls of one Allow/Deny literal topic entry; the result's error code.
    pub fn create_acl(raw: &mut RawClient, name: &str, principal: &str, op: i8, perm: i8) -> i16 {
        let req = CreateAclsRequest::default().with_creations(vec![AclCreation::default()
            .with_resource_type(2)
            .with_resource_name(s(name))
            .with_resource_pattern_type(3)
            .with_principal(s(principal))
            .with_host(s("*"))
            .with_operation(op)
            .with_permission_type(perm)]);
        let resp: CreateAclsResponse = raw.call(ApiKey::CreateAcls, 2, &req);
        resp.results[0].error_code
    }

    /// DescribeAcls of every ACL: (error code, number of entries).
    pub fn describe_acls(raw: &mut RawClient) -> (i16, usize) {
        let req = DescribeAclsRequest::default()
            .with_resource_name_filter(None)
            .with_principal_filter(None)
            .with_host_filter(None)
            .with_resource_type_filter(1)
            .with_pattern_type_filter(1)
            .with_operation(1)
            .with_permission_type(1);
        let resp: DescribeAclsResponse = raw.call(ApiKey::DescribeAcls, 2, &req);
        (
            resp.error_code,
            resp.resources.iter().map(|r| r.acls.len()).sum(),
        )
    }

    /// DeleteAcls of every ACL on the literal topic `name`: the number removed.
    pub fn delete_acls(raw: &mut RawClient, name: &str) -> (i16, usize) {
        let req = DeleteAclsRequest::default().with_filters(vec![DeleteAclsFilter::default()
            .with_resource_type_filter(2)
            .with_resource_name_filter(Some(s(name)))
            .with_principal_filter(None)
            .with_host_filter(None)
            .with_pattern_type_filter(3)
            .with_operation(1)
            .with_permission_type(1)]);
        let resp: DeleteAclsResponse = raw.call(ApiKey::DeleteAcls, 2, &req);
        let r = &resp.filter_results[0];
        (r.error_code, r.matching_acls.len())
    }
}

fn qanat_acls(data_dir: &Path, args: &[&str]) {
    let out = qanat_command()
        .args(["acls", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qanat acls {args:?}: {}",
        describe(&out)
    );
}

#[test]
fn acls_allow_and_deny_each_api_with_kafka_error_codes() {
    use acl_requests::*;
    const TOPIC_DENIED: i16 = 29;
    const GROUP_DENIED: i16 = 30;
    const CLUSTER_DENIED: i16 = 31;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for user in ["alice", "bob", "admin"] {
        add_user(&data, user, PASSWORD);
    }
    // alice writes "orders" and owns the "alice-" prefix; bob reads "ord*" except
    // "orders-secret" (a Deny beats the prefixed Allow) and uses the groups "bob-*".
    qanat_acls(
        &data,
        &[
            "add",
            "--topic",
            "orders",
            "--principal",
            "User:alice",
            "--operation",
            "Write",
        ],
    );
    qanat_acls(
        &data,
        &[
            "add",
            "--topic",
            "alice-",
            "--prefixed",
            "--principal",
            "User:alice",
            "--operation",
            "Create",
        ],
    );
    qanat_acls(
        &data,
        &[
            "add",
            "--topic",
            "alice-",
            "--prefixed",
            "--principal",
            "User:alice",
            "--operation",
            "Delete",
        ],
    );
    qanat_acls(
        &data,
        &[
            "add",
            "--topic",
            "ord",
            "--prefixed",
            "--principal",
            "User:bob",
            "--operation",
            "Read",
        ],
    );
    qanat_acls(
        &data,
        &[
            "add",
            "--topic",
            "orders-secret",
            "--principal",
            "User:bob",
            "--operation",
            "Read",
            "--deny",
        ],
    );
    qanat_acls(
        &data,
        &[
            "add",
            "--group",
            "bob-",
            "--prefixed",
            "--principal",
            "User:bob",
            "--operation",
            "Read",
        ],
    );
    let config = r#"
[security]
authorizer = true
super_users = ["User:admin"]

[[broker.listener]]
name = "SASL"
address = "127.0.0.1:0"
security_protocol = "SASL_PLAINTEXT"
"#;
    let broker = Broker::builder().config(config).data_dir(&data).start();
    let addr = broker.listener_addr("SASL");
    let mut admin = login(&addr, "admin", PASSWORD);
    let mut alice = login(&addr, "alice", PASSWORD);
    let mut bob = login(&addr, "bob", PASSWORD);

    // The coordinator is advertised at the listener the client came through.
    let coordinator: kafka_protocol::messages::FindCoordinatorResponse = bob.call(
        kafka_protocol::messages::ApiKey::FindCoordinator,
        3,
        &kafka_protocol::messages::FindCoordinatorRequest::default().with_key(s("bob-group")),
    );
    assert_eq!(
        format!("{}:{}", coordinator.host.as_str(), coordinator.port),
        addr,
        "FindCoordinator over the SASL listener"
    );
    // Super user: everything.
    for t in ["orders", "orders-secret", "hidden"] {
        assert_eq!(create_topic(&mut admin, t), 0, "admin creates {t}");
        assert_eq!(produce(&mut admin, t), 0, "admin produces to {t}");
    }
    // Produce: Write needed.
    assert_eq!(produce(&mut alice, "orders"), 0);
    assert_eq!(produce(&mut alice, "hidden"), TOPIC_DENIED);
    assert_eq!(produce(&mut bob, "orders"), TOPIC_DENIED);
    // Fetch: Read needed; the prefixed Allow covers "orders", the Deny wins on "orders-secret".
    assert_eq!(fetch(&mut bob, "orders"), 0);
    assert_eq!(fetch(&mut bob, "orders-secret"), TOPIC_DENIED);
    assert_eq!(fetch(&mut bob, "hidden"), TOPIC_DENIED);
    assert_eq!(fetch(&mut alice, "orders"), TOPIC_DENIED);
    // Group join and offset commit: Read on the group, and Read on the topic for commits.
    assert_ne!(join(&mut bob, "bob-group"), GROUP_DENIED);
    assert_eq!(join(&mut bob, "other-group"), GROUP_DENIED);
    assert_eq!(join(&mut alice, "bob-group"), GROUP_DENIED);
    assert_eq!(commit(&mut bob, "bob-offsets", "orders"), 0);
    assert_eq!(commit(&mut bob, "bob-offsets", "hidden"), TOPIC_DENIED);
    assert_eq!(commit(&mut bob, "other-group", "orders"), GROUP_DENIED);
    assert_eq!(commit(&mut alice, "bob-group", "orders"), GROUP_DENIED);
    // Topic create and delete: the prefixed Create/Delete of alice.
    assert_eq!(create_topic(&mut alice, "alice-new"), 0);
    assert_eq!(create_topic(&mut alice, "bob-new"), TOPIC_DENIED);
    assert_eq!(delete_topic(&mut alice, "orders"), TOPIC_DENIED);
    assert_eq!(delete_topic(&mut alice, "alice-new"), 0);
    assert!(!broker.partition_dir("bob-new", 0).exists());
    assert!(broker.partition_dir("orders", 0).exists());
    // Metadata hides what may not be described (Read and Write imply Describe).
    let seen = listed_topics(&mut bob);
    assert!(seen.contains(&"orders".to_string()), "{seen:?}");
    assert!(!seen.contains(&"hidden".to_string()), "bob sees {seen:?}");
    assert_eq!(listed_topics(&mut alice), vec!["orders".to_string()]);
    assert_eq!(metadata_of(&mut bob, "hidden"), TOPIC_DENIED);
    // ListOffsets needs Describe, CreatePartitions Alter, DescribeGroups Describe and
    // DeleteGroups Delete.
    assert_eq!(list_offsets(&mut bob, "orders"), 0);
    assert_eq!(list_offsets(&mut bob, "hidden"), TOPIC_DENIED);
    assert_eq!(grow_topic(&mut alice, "orders", 2), TOPIC_DENIED);
    assert_eq!(grow_topic(&mut admin, "orders", 2), 0);
    assert_ne!(describe_group(&mut bob, "bob-offsets"), GROUP_DENIED);
    assert_eq!(describe_group(&mut alice, "bob-offsets"), GROUP_DENIED);
    // OffsetFetch: Describe on the group and on the topic.
    let (_, _, committed) = fetch_offset(&mut bob, "bob-offsets", "orders");
    assert!(committed >= 0, "bob reads his committed offset");
    assert_eq!(
        fetch_offset(&mut bob, "bob-offsets", "hidden"),
        (0, TOPIC_DENIED, -1)
    );
    assert_eq!(
        fetch_offset(&mut alice, "bob-offsets", "orders").0,
        GROUP_DENIED
    );
    // FindCoordinator: Describe on the group.
    assert_eq!(find_group_coordinator(&mut bob, "bob-offsets"), 0);
    assert_eq!(
        find_group_coordinator(&mut alice, "bob-offsets"),
        GROUP_DENIED
    );
    // ListGroups: all of them for the super user, the describable ones for the others.
    let all = list_groups(&mut admin);
    assert!(all.contains(&"bob-offsets".to_string()), "{all:?}");
    assert!(list_groups(&mut alice).is_empty());
    assert!(list_groups(&mut bob).iter().all(|g| g.starts_with("bob-")));
    // InitProducerId: an idempotent producer needs Write on some topic.
    assert_eq!(init_producer_id(&mut alice), 0);
    assert_eq!(init_producer_id(&mut bob), CLUSTER_DENIED);
    // The same four refusals as librdkafka and kafka-python report them.
    for client in ["confluent", "kafka-python"] {
        let out = Command::new("python3")
            .arg(py_script("acl_errors.py"))
            .args([
                "--client",
                client,
                "--bootstrap",
                &addr,
                "--password",
                PASSWORD,
            ])
            .args([
                "--topic",
                "orders",
                "--hidden",
                "hidden",
                "--group",
                "bob-offsets",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{client}: ACL error codes: {}",
            describe(&out)
        );
    }
    assert_eq!(delete_group(&mut bob, "bob-offsets"), GROUP_DENIED);
    assert_eq!(delete_group(&mut admin, "bob-offsets"), 0);
    // ACL administration: cluster Alter/Describe, refused to alice.
    assert_eq!(
        create_acl(&mut alice, "hidden", "User:alice", 3, 3),
        CLUSTER_DENIED
    );
    assert_eq!(describe_acls(&mut alice).0, CLUSTER_DENIED);
    assert_eq!(describe_acls(&mut admin), (0, 6));
    assert_eq!(create_acl(&mut admin, "hidden", "User:alice", 3, 3), 0);
    assert_eq!(
        fetch(&mut alice, "hidden"),
        0,
        "the ACL created at run time applies"
    );
    assert_eq!(delete_acls(&mut admin, "hidden"), (0, 1));
    assert_eq!(
        fetch(&mut alice, "hidden"),
        TOPIC_DENIED,
        "and its deletion too"
    );
}

#[test]
fn push_endpoint_needs_credentials_and_read_on_the_topic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    add_user(&data, "carol", PASSWORD);
    qanat_acls(
        &data,
        &[
            "add",
            "--topic",
            "events",
            "--principal",
            "User:reader",
            "--operation",
            "Read",
        ],
    );
    qanat_acls(
        &data,
        &[
            "add",
            "--topic",
            "events",
            "--principal",
            "User:carol",
            "--operation",
            "Read",
        ],
    );
    let config = r#"
[security]
authorizer = true
super_users = ["User:ANONYMOUS"]
http_tokens = [{ token = "reader-token-0123456789", principal = "User:reader" }]
"#;
    let broker = Broker::builder()
        .config(config)
        .data_dir(&data)
        .http()
        .metrics()
        .start();
    // The PLAINTEXT listener is a super user here: it creates the topics.
    produce(&broker.bootstrap(), "events", &[Rec::value("e1")], &[]);
    produce(&broker.bootstrap(), "private", &[Rec::value("p1")], &[]);
    let http = broker.http_addr().unwrap();
    let events = "/v1/topics/events/events?from=earliest";
    let private = "/v1/topics/private/events?from=earliest";
    let bearer = ("Authorization", "Bearer reader-token-0123456789");
    // base64("carol:correct horse battery staple"), base64("carol:wrong")
    let basic_ok = (
        "Authorization",
        "Basic Y2Fyb2w6Y29ycmVjdCBob3JzZSBiYXR0ZXJ5IHN0YXBsZQ==",
    );
    let basic_bad = ("Authorization", "Basic Y2Fyb2w6d3Jvbmc=");
    assert_eq!(http_status_with(&http, events, &[]), 401, "no credentials");
    assert_eq!(
        http_status_with(&http, events, &[("Authorization", "Bearer nope")]),
        401
    );
    assert_eq!(
        http_status_with(&http, events, &[basic_bad]),
        401,
        "wrong password"
    );
    assert_eq!(http_status_with(&http, events, &[bearer]), 200);
    assert_eq!(http_status_with(&http, events, &[basic_ok]), 200);
    assert_eq!(
        http_status_with(&http, private, &[bearer]),
        403,
        "no Read on the topic"
    );
    assert_eq!(http_status_with(&http, private, &[basic_ok]), 403);

    // Failed logins: logged with the peer address, counted, and slowed down per address
    // (the delay doubles with each failure in a row, as for SASL).
    let failures = broker
        .stderr()
        .lines()
        .filter(|l| l.contains("HTTP authentication failed"))
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert_eq!(failures.len(), 2, "{failures:#?}");
    for line in &failures {
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
    }
    assert!(
        failures[0].contains("scheme=\"bearer\"") || failures[0].contains("scheme=bearer"),
        "{}",
        failures[0]
    );
    let delay = |line: &str| -> u64 {
        let at = line.find("delay_ms=").expect("a delay_ms field") + "delay_ms=".len();
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .expect("a number of milliseconds")
    };
    assert!(
        delay(&failures[1]) > delay(&failures[0]),
        "the second failure in a row waits longer: {failures:#?}"
    );
    let metrics = scrape(&broker.metrics_addr().unwrap()).unwrap();
    let counted: f64 = metric_values(
        &metrics,
        "qanat_http_auth_failures_total",
        &[("endpoint", "push")],
    )
    .iter()
    .map(|(_, v)| v)
    .sum();
    assert_eq!(counted, 2.0, "{metrics}");
}

// ------------------------------------------------------------------------------------------
// Client quotas.

mod quota_requests {
    use kafka_protocol::messages::alter_client_quotas_request::{EntityData, EntryData, OpData};
    use kafka_protocol::messages::describe_client_quotas_request::ComponentData;
    use kafka_protocol::messages::*;

    use super::acl_requests::s;
    use super::support::RawClient;

    pub fn set_client_rate(raw: &mut RawClient, client_id: &str, bytes_per_second: f64) -> i16 {
        set_client_quota(raw, client_id, "producer_byte_rate", bytes_per_second)
    }

    pub fn set_client_quota(raw: &mut RawClient, client_id: &str, key: &str, value: f64) -> i16 {
        let req = AlterClientQuotasRequest::default().with_entries(vec![EntryData::default()
            .with_entity(vec![EntityData::default()
                .with_entity_type(s("client-id"))
                .with_entity_name(Some(s(client_id)))])
            .with_ops(vec![OpData::default().with_key(s(key)).with_value(value)])]);
        let resp: AlterClientQuotasResponse = raw.call(ApiKey::AlterClientQuotas, 1, &req);
        resp.entries[0].error_code
    }

    /// (key, value) of the quotas of one client id.
    pub fn client_quotas(raw: &mut RawClient, client_id: &str) -> Vec<(String, f64)> {
        let req =
            DescribeClientQuotasRequest::default().with_components(vec![ComponentData::default()
                .with_entity_type(s("client-id"))
                .with_match_type(0)
                .with_match(Some(s(client_id)))]);
        let resp: DescribeClientQuotasResponse = raw.call(ApiKey::DescribeClientQuotas, 1, &req);
        assert_eq!(resp.error_code, 0);
        let mut out: Vec<(String, f64)> = resp
            .entries
            .unwrap_or_default()
            .iter()
            .flat_map(|e| e.values.iter().map(|v| (v.key.to_string(), v.value)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// (client id, producer_byte_rate) of every client-id quota.
    pub fn client_rates(raw: &mut RawClient) -> Vec<(String, f64)> {
        let req =
            DescribeClientQuotasRequest::default().with_components(vec![ComponentData::default()
                .with_entity_type(s("client-id"))
                .with_match_type(2)
                .with_match(None)]);
        let resp: DescribeClientQuotasResponse = raw.call(ApiKey::DescribeClientQuotas, 1, &req);
        assert_eq!(resp.error_code, 0);
        let mut out: Vec<(String, f64)> = resp
            .entries
            .unwrap_or_default()
            .iter()
            .map(|e| {
                (
                    e.entity[0]
                        .entity_name
                        .as_ref()
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                    e.values[0].value,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Delivered (time, bytes) of one producer.
struct Meter(std::sync::Mutex<Vec<(std::time::Instant, usize)>>);

impl rdkafka::ClientContext for Meter {}

impl rdkafka::producer::ProducerContext for Meter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        use rdkafka::message::Message;
        if let Ok(m) = result {
            let n = m.payload().map_or(0, <[u8]>::len);
            self.0.lock().unwrap().push((std::time::Instant::now(), n));
        }
    }
}

/// Produce 4 KiB records as fast as the broker takes them for `run`; bytes per second
/// delivered between `from` and `run` after the start.
fn flood(
    bootstrap: &str,
    client_id: &str,
    topic: &str,
    from: std::time::Duration,
    run: std::time::Duration,
) -> f64 {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer<Meter> = producer_config(
        bootstrap,
        &[
            ("client.id", client_id),
            ("batch.size", "65536"),
            ("linger.ms", "5"),
            ("queue.buffering.max.kbytes", "1024"),
        ],
    )
    .create_with_context(Meter(std::sync::Mutex::new(Vec::new())))
    .unwrap();
    let payload = vec![b'q'; 4096];
    let start = std::time::Instant::now();
    while start.elapsed() < run {
        match producer.send(BaseRecord::<(), [u8]>::to(topic).payload(&payload)) {
            Ok(()) => {}
            Err((_, _)) => {
                producer.poll(std::time::Duration::from_millis(5));
            }
        }
        producer.poll(std::time::Duration::ZERO);
    }
    let delivered = producer.context().0.lock().unwrap().clone();
    producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
    let bytes: usize = delivered
        .iter()
        .filter(|(t, _)| t.duration_since(start) >= from)
        .map(|(_, n)| n)
        .sum();
    bytes as f64 / (run - from).as_secs_f64()
}

#[test]
fn produce_quota_throttles_one_client_and_not_the_other() {
    use quota_requests::*;
    let broker = Broker::start();
    let mut raw = RawClient::connect(&broker.bootstrap());
    const RATE: f64 = 500_000.0;
    assert_eq!(set_client_rate(&mut raw, "slow", RATE), 0);
    assert_eq!(set_client_rate(&mut raw, "qanat-it-raw", 10_000.0), 0);
    assert_eq!(
        client_rates(&mut raw),
        vec![
            ("qanat-it-raw".to_string(), 10_000.0),
            ("slow".to_string(), RATE)
        ]
    );
    // 50 KB at 10 KB/s: far over the one-second burst, answered with throttle_time_ms.
    let big = "x".repeat(50_000);
    let req = {
        use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
        use kafka_protocol::messages::ProduceRequest;
        let batch = qanat_log::batch::encode_batch(&[qanat_log::batch::SimpleRecord {
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(big.as_bytes()),
        }]);
        ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(10_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(acl_requests::topic("quota-raw"))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(bytes::Bytes::from(batch)))])])
    };
    let resp: kafka_protocol::messages::ProduceResponse =
        raw.call(kafka_protocol::messages::ApiKey::Produce, 8, &req);
    assert_eq!(resp.responses[0].partition_responses[0].error_code, 0);
    assert!(
        resp.throttle_time_ms >= 3_000,
        "throttle_time_ms = {}",
        resp.throttle_time_ms
    );

    let run = std::time::Duration::from_secs(9);
    let from = std::time::Duration::from_secs(3);
    let b = broker.bootstrap();
    let fast = {
        let b = b.clone();
        std::thread::spawn(move || flood(&b, "fast", "quota-fast", from, run))
    };
    let slow = flood(&b, "slow", "quota-slow", from, run);
    let fast = fast.join().unwrap();
    eprintln!("slow {slow:.0} B/s, fast {fast:.0} B/s, quota {RATE} B/s");
    assert!(
        (slow - RATE).abs() <= RATE * 0.10,
        "the throttled client moved {slow:.0} B/s, quota {RATE} B/s"
    );
    assert!(
        fast >= 2.0 * RATE,
        "the client without quota moved only {fast:.0} B/s (quota of the other: {RATE} B/s)"
    );
}

/// `throttle_time_ms` of a Metadata request (all topics) on `raw`.
fn metadata_throttle(raw: &mut RawClient) -> i32 {
    use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};
    let resp: MetadataResponse = raw.call(ApiKey::Metadata, 9, &MetadataRequest::default());
    resp.throttle_time_ms
}

#[test]
fn request_quota_throttles_one_client_and_not_the_other() {
    use quota_requests::*;
    let broker = Broker::builder().metrics().start();
    let mut admin = RawClient::connect(&broker.bootstrap());
    // A thousandth of a percent of a thread: a microsecond of handling costs 100 ms, so the
    // one-second burst is gone after a few requests.
    assert_eq!(
        set_client_quota(&mut admin, "busy", "request_percentage", 0.001),
        0
    );
    assert_eq!(
        client_quotas(&mut admin, "busy"),
        vec![("request_percentage".to_string(), 0.001)]
    );
    assert_eq!(
        set_client_quota(&mut admin, "busy", "request_rate", 1.0),
        42,
        "an unknown key is INVALID_REQUEST"
    );
    let mut busy = RawClient::connect_as(&broker.bootstrap(), "busy");
    let mut other = RawClient::connect_as(&broker.bootstrap(), "other");
    let mut throttles = Vec::new();
    while throttles.last().is_none_or(|t| *t == 0) {
        assert_eq!(metadata_throttle(&mut other), 0, "a client without a quota");
        throttles.push(metadata_throttle(&mut busy));
        assert!(
            throttles.len() < 10_000,
            "{} requests at 0.001% of a thread and never throttled",
            throttles.len()
        );
    }
    eprintln!("busy's throttles: {throttles:?}");
    // The next request waits for the mute (counted), and is over the quota again: each
    // request costs far more than the burst left after the wait.
    assert!(metadata_throttle(&mut busy) > 0);
    let metrics = scrape(&broker.metrics_addr().unwrap()).unwrap();
    let sum = |name: &str, labels: &[(&str, &str)]| -> f64 {
        metric_values(&metrics, name, labels)
            .iter()
            .map(|(_, v)| v)
            .sum()
    };
    assert!(
        sum("qanat_quota_throttled_total", &[("quota", "request")]) >= 2.0,
        "{metrics}"
    );
    assert!(
        sum("qanat_quota_muted_waits_total", &[]) >= 1.0,
        "{metrics}"
    );
    assert_eq!(metadata_throttle(&mut other), 0);
}

/// KIP-219: a throttled fetch is answered at once with `throttle_time_ms`, and the
/// connection's very next request waits until that time is over (not the one after it).
#[test]
fn a_throttled_fetch_mutes_the_very_next_request() {
    use quota_requests::*;
    let broker = Broker::builder().metrics().start();
    let mut admin = RawClient::connect(&broker.bootstrap());
    assert_eq!(acl_requests::create_topic(&mut admin, "muted"), 0);
    assert_eq!(acl_requests::produce(&mut admin, "muted"), 0);
    // A fetch answer of some tens of bytes at 50 B/s: a throttle of a second or so.
    assert_eq!(
        set_client_quota(&mut admin, "slow-reader", "consumer_byte_rate", 50.0),
        0
    );
    let mut reader = RawClient::connect_as(&broker.bootstrap(), "slow-reader");
    let muted_waits = || {
        let metrics = scrape(&broker.metrics_addr().unwrap()).unwrap();
        metric_values(&metrics, "qanat_quota_muted_waits_total", &[])
            .iter()
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    // A throttle of a few milliseconds can be over before the next request is even sent,
    // so nothing would wait: fetch on (each waiting out the previous mute) until the debt
    // gives a throttle far longer than a request's round trip.
    let mut throttle_ms = 0;
    for _ in 0..100 {
        let resp = acl_requests::fetch_response(&mut reader, "muted");
        assert_eq!(resp.responses[0].partitions[0].error_code, 0);
        throttle_ms = resp.throttle_time_ms;
        if throttle_ms >= 200 {
            break;
        }
    }
    assert!(
        throttle_ms >= 200,
        "the reader was never throttled for 200 ms: {throttle_ms}"
    );
    let answered_at = std::time::Instant::now();
    let before = muted_waits();
    metadata_throttle(&mut reader);
    // The mute held the request right after the throttled fetch: counted, and answered no
    // sooner than the mute allowed (less the time the fetch's answer took to come back).
    assert!(
        muted_waits() > before,
        "the next request did not wait for the mute"
    );
    let waited = answered_at.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(u64::try_from(throttle_ms).unwrap() / 2),
        "answered after {waited:?}, throttle_time_ms {throttle_ms}"
    );
}

#[test]
fn qanat_topics_talks_sasl_ssl_with_the_password_from_the_environment() {
    let s = shared_secure();
    let addr = s.secure.clone();
    let topics = |args: &[&str], password: &str| {
        qanat_command()
            .args(["topics", "--bootstrap", &addr])
            .args([
                "--security-protocol",
                "SASL_SSL",
                "--sasl-mechanism",
                "SCRAM-SHA-512",
            ])
            .args(["--sasl-username", "alice", "--ssl-ca-file"])
            .arg(&s.ca)
            .args(args)
            .env("QANAT_KAFKA_SASL_PASSWORD", password)
            .output()
            .unwrap()
    };
    let out = topics(&["create", "made-over-tls", "--partitions", "2"], PASSWORD);
    assert!(
        out.status.success(),
        "qanat topics create: {}",
        describe(&out)
    );
    let out = topics(&["list"], PASSWORD);
    assert!(
        out.status.success(),
        "qanat topics list: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "made-over-tls"),
        "{}",
        describe(&out)
    );
    assert!(s.partition_dir("made-over-tls", 1).exists());
    let out = topics(&["create", "never-made"], "wrong password");
    assert!(
        !out.status.success(),
        "created with a wrong password: {}",
        describe(&out)
    );
    assert!(
        reports_failed_login(&String::from_utf8_lossy(&out.stderr)),
        "{}",
        describe(&out)
    );
    assert!(!s.partition_dir("never-made", 0).exists());
}

#[test]
fn scram_users_are_managed_on_a_running_broker() {
    use acl_requests::{login, s};
    use kafka_protocol::messages::alter_user_scram_credentials_request::{
        ScramCredentialDeletion, ScramCredentialUpsertion,
    };
    use kafka_protocol::messages::*;
    use qanat_broker::scram::ScramMechanism;
    let broker = Broker::with_config(
        r#"
[[broker.listener]]
name = "SASL"
address = "127.0.0.1:0"
security_protocol = "SASL_PLAINTEXT"
"#,
    );
    let sasl = broker.listener_addr("SASL");
    let mut admin = RawClient::connect(&broker.bootstrap());
    // The client salts and hashes; the broker stores only the derived keys.
    let salt = b"0123456789abcdef".to_vec();
    let salted = ScramMechanism::Sha256.salted_password(b"dave-password", &salt, 4096);
    let req = AlterUserScramCredentialsRequest::default().with_upsertions(vec![
        ScramCredentialUpsertion::default()
            .with_name(s("dave"))
            .with_mechanism(1)
            .with_iterations(4096)
            .with_salt(bytes::Bytes::from(salt))
            .with_salted_password(bytes::Bytes::from(salted)),
    ]);
    let resp: AlterUserScramCredentialsResponse =
        admin.call(ApiKey::AlterUserScramCredentials, 0, &req);
    assert_eq!(
        resp.results[0].error_code, 0,
        "{:?}",
        resp.results[0].error_message
    );
    let resp: DescribeUserScramCredentialsResponse = admin.call(
        ApiKey::DescribeUserScramCredentials,
        0,
        &DescribeUserScramCredentialsRequest::default().with_users(None),
    );
    let dave = &resp.results[0];
    assert_eq!(dave.user.as_str(), "dave");
    assert_eq!(
        (
            dave.credential_infos[0].mechanism,
            dave.credential_infos[0].iterations
        ),
        (1, 4096)
    );
    let stored = std::fs::read_to_string(broker.data_dir().join("scram-credentials.json")).unwrap();
    assert!(!stored.contains("dave-password"));
    // The new user logs in at once.
    drop(login(&sasl, "dave", "dave-password"));
    let req = AlterUserScramCredentialsRequest::default().with_deletions(vec![
        ScramCredentialDeletion::default()
            .with_name(s("dave"))
            .with_mechanism(1),
    ]);
    let resp: AlterUserScramCredentialsResponse =
        admin.call(ApiKey::AlterUserScramCredentials, 0, &req);
    assert_eq!(resp.results[0].error_code, 0);
    let mut raw = RawClient::connect(&sasl);
    let _: SaslHandshakeResponse = raw.call(
        ApiKey::SaslHandshake,
        1,
        &SaslHandshakeRequest::default().with_mechanism(s("PLAIN")),
    );
    let auth: SaslAuthenticateResponse = raw.call(
        ApiKey::SaslAuthenticate,
        2,
        &SaslAuthenticateRequest::default()
            .with_auth_bytes(bytes::Bytes::from_static(b"\0dave\0dave-password")),
    );
    assert_eq!(
        auth.error_code, 58,
        "a deleted user is refused (SASL_AUTHENTICATION_FAILED)"
    );
}

/// `qanat users` and `qanat acls` with `--bootstrap` change a running broker through the
/// Kafka admin APIs: a user added there logs in at once, ACLs round-trip, and deleting what
/// is not there is an error.
#[test]
fn users_and_acls_commands_manage_a_running_broker() {
    use acl_requests::login;
    let broker = Broker::with_config(
        r#"
[[broker.listener]]
name = "SASL"
address = "127.0.0.1:0"
security_protocol = "SASL_PLAINTEXT"
"#,
    );
    let b = broker.bootstrap();
    let sasl = broker.listener_addr("SASL");
    let out = qanat_command()
        .args(["users", "--bootstrap", &b, "add", "carol"])
        .env("QANAT_USER_PASSWORD", "carol-password")
        .output()
        .unwrap();
    assert!(out.status.success(), "users add: {}", describe(&out));
    let listed = qanat_ok(&["users", "--bootstrap", &b, "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l == "carol\tSCRAM-SHA-256(iterations=8192),SCRAM-SHA-512(iterations=8192)"),
        "{listed}"
    );
    drop(login(&sasl, "carol", "carol-password"));
    let stored = std::fs::read_to_string(broker.data_dir().join("scram-credentials.json")).unwrap();
    assert!(stored.contains("carol") && !stored.contains("carol-password"));

    qanat_ok(&[
        "users",
        "--bootstrap",
        &b,
        "delete",
        "carol",
        "--mechanism",
        "SCRAM-SHA-256",
    ]);
    let listed = qanat_ok(&["users", "--bootstrap", &b, "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l == "carol\tSCRAM-SHA-512(iterations=8192)"),
        "{listed}"
    );
    qanat_ok(&["users", "--bootstrap", &b, "delete", "carol"]);
    assert!(!qanat_ok(&["users", "--bootstrap", &b, "list"]).contains("carol"));
    let out = qanat(&["users", "--bootstrap", &b, "delete", "carol"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no such user"),
        "{}",
        describe(&out)
    );

    let acls = |args: &[&str]| qanat_ok(&[&["acls", "--bootstrap", &b], args].concat());
    acls(&[
        "add",
        "--topic",
        "orders",
        "--prefixed",
        "--principal",
        "User:carol",
        "--operation",
        "Read",
    ]);
    acls(&[
        "add",
        "--group",
        "etl",
        "--principal",
        "User:carol",
        "--operation",
        "Read",
        "--deny",
    ]);
    let listed = acls(&["list", "--principal", "User:carol"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(
        listed.contains("Topic:Prefixed:orders\tUser:carol\thost=*\tRead\tAllow")
            && listed.contains("Group:Literal:etl\tUser:carol\thost=*\tRead\tDeny"),
        "{listed}"
    );
    let deleted = acls(&["delete", "--group", "etl"]);
    assert!(deleted.contains("deleted Group:Literal:etl"), "{deleted}");
    let listed = acls(&["list"]);
    assert!(
        listed.contains("Topic:Prefixed:orders") && !listed.contains("etl"),
        "{listed}"
    );
    let out = qanat(&["acls", "--bootstrap", &b, "delete", "--group", "etl"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no ACL matched"),
        "{}",
        describe(&out)
    );
}

/// `qanat agent` with `[output.security]` ships a file over SASL_SSL (SCRAM-SHA-512, the
/// password from a file, the test CA), and names the key when the password is missing.
#[test]
fn agent_ships_over_sasl_ssl_with_its_security_table() {
    let s = shared_secure();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("logs")).unwrap();
    let password_file = d.join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let lines: String = (0..50).map(|i| format!("secure line {i}\n")).collect();
    std::fs::write(d.join("logs/app.log"), &lines).unwrap();
    let config = |password: &str, suffix: &str| {
        format!(
            r#"
host = "secure-it"
checkpoint_dir = "{dir}/state{suffix}"
rescan_interval_ms = 200
poll_interval_ms = 50
checkpoint_interval_ms = 100

[output]
producer = "librdkafka"
bootstrap = "{bootstrap}"
batch_age_ms = 20

[output.security]
protocol = "SASL_SSL"
mechanism = "SCRAM-SHA-512"
username = "alice"
{password}
ca_file = "{ca}"

[[source]]
paths = ["{dir}/logs/*.log"]
topic = "secure-logs{suffix}"
"#,
            dir = d.display(),
            bootstrap = s.secure,
            ca = s.ca.display(),
        )
    };

    // No password anywhere: refused at start, naming the key.
    let toml = d.join("nopassword.toml");
    std::fs::write(&toml, config("", "")).unwrap();
    let out = qanat_command()
        .args(["agent", "--config"])
        .arg(&toml)
        .env_remove("QANAT_KAFKA_SASL_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("output.security.password_file"),
        "{}",
        describe(&out)
    );

    let toml = d.join("agent.toml");
    std::fs::write(
        &toml,
        config(
            &format!("password_file = \"{}\"", password_file.display()),
            "",
        ),
    )
    .unwrap();
    let mut cmd = qanat_command();
    cmd.args(["agent", "--config"]).arg(&toml);
    let mut agent = Proc::spawn(cmd, "qanat agent").unwrap();
    agent
        .try_wait_line("qanat agent running", DEADLINE)
        .unwrap();
    // Read back through the PLAINTEXT listener.
    let plain = s.plain.clone();
    poll_until(
        "50 lines delivered over SASL_SSL",
        DEADLINE * 3,
        || match consumer(&plain).fetch_watermarks(
            "secure-logs",
            0,
            std::time::Duration::from_secs(5),
        ) {
            Ok((_, high)) if high >= 50 => Ok(()),
            other => Err(format!("watermarks {other:?}")),
        },
    );
    let got = consume(&plain, "secure-logs", 0, rdkafka::Offset::Beginning, 50);
    assert!(
        got[0]
            .value
            .as_deref()
            .is_some_and(|v| v.starts_with(b"secure line 0")),
        "{:?}",
        got[0].value
    );
    assert!(agent.terminate(DEADLINE).is_some_and(|s| s.success()));

    // `qanat audit` reads the trajectories back over SASL_SSL: every byte of the file once.
    let audit = |password: &str| {
        qanat_command()
            .args(["audit", "--bootstrap", &s.secure, "--topic", "secure-logs"])
            .args(["--json", "--timeout", "30"])
            .args(s.flags())
            .env("QANAT_KAFKA_SASL_PASSWORD", password)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = audit(PASSWORD);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qanat audit: {}",
        describe(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], serde_json::json!(true), "{report}");
    let out = audit("wrong password");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        reports_failed_login(&String::from_utf8_lossy(&out.stderr)),
        "{}",
        describe(&out)
    );

    // A wrong password: the agent logs the refused login and delivers nothing.
    let wrong = Shared::password_file(d, "wrong", "wrong password");
    let toml = d.join("wrong.toml");
    std::fs::write(
        &toml,
        config(
            &format!("password_file = \"{}\"", wrong.display()),
            "-refused",
        ),
    )
    .unwrap();
    let log = d.join("wrong.stderr");
    let mut cmd = qanat_command();
    cmd.args(["agent", "--config"])
        .arg(&toml)
        .stderr(std::fs::File::create(&log).unwrap());
    let _agent = Proc::spawn(cmd, "qanat agent").unwrap();
    poll_until("the agent reports the refused login", DEADLINE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        reports_failed_login(&text)
            .then_some(())
            .ok_or_else(|| tail(&text, 20))
    });
    assert!(!s.partition_dir("secure-logs-refused", 0).exists());
}

/// `qanat agent` with the native producer (`producer = "auto"` keeps it with security) ships
/// over SASL_SSL with SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN, and over SSL, every line read
/// back byte for byte; a wrong password is refused with the broker's message and nothing is
/// written.
#[test]
fn native_agent_ships_over_sasl_ssl_and_ssl() {
    let s = secure_broker(
        r#"
[[broker.listener]]
name = "TLS"
address = "127.0.0.1:0"
security_protocol = "SSL"
"#,
    );
    let secure = s.broker.listener_addr("SECURE");
    let tls = s.broker.listener_addr("TLS");
    let plain = s.broker.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let password_file = Shared::password_file(d, "password", PASSWORD);
    let wrong_file = Shared::password_file(d, "wrong", "wrong password");
    let lines: String = (0..200)
        .map(|i| format!("native secure line {i} {}\n", "x".repeat(i % 37)))
        .collect();
    let agent_toml = |name: &str, bootstrap: &str, security: &str| {
        std::fs::create_dir_all(d.join(name).join("logs")).unwrap();
        std::fs::write(d.join(name).join("logs/app.log"), &lines).unwrap();
        let toml = d.join(format!("{name}.toml"));
        std::fs::write(
            &toml,
            format!(
                r#"
host = "native-secure"
checkpoint_dir = "{dir}/{name}/state"
rescan_interval_ms = 200
poll_interval_ms = 50
checkpoint_interval_ms = 100
manifest_topic = ""

[output]
bootstrap = "{bootstrap}"
batch_age_ms = 20

[output.security]
{security}
ca_file = "{ca}"

[[source]]
paths = ["{dir}/{name}/logs/*.log"]
topic = "native-{name}"
"#,
                dir = d.display(),
                ca = s.certs.ca.display(),
            ),
        )
        .unwrap();
        toml
    };
    let sasl = |mechanism: &str, file: &Path| {
        format!(
            "protocol = \"SASL_SSL\"\nmechanism = \"{mechanism}\"\nusername = \"alice\"\n\
             password_file = \"{}\"",
            file.display()
        )
    };
    let cases = [
        (
            "scram512",
            secure.as_str(),
            sasl("SCRAM-SHA-512", &password_file),
        ),
        (
            "scram256",
            secure.as_str(),
            sasl("SCRAM-SHA-256", &password_file),
        ),
        ("plain", secure.as_str(), sasl("PLAIN", &password_file)),
        ("ssl", tls.as_str(), "protocol = \"SSL\"".to_string()),
    ];
    for (name, bootstrap, security) in &cases {
        let toml = agent_toml(name, bootstrap, security);
        let log = d.join(format!("{name}.stderr"));
        let mut cmd = qanat_command();
        cmd.args(["agent", "--config"])
            .arg(&toml)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap());
        let mut agent = Proc::spawn(cmd, "qanat agent").unwrap();
        let topic = format!("native-{name}");
        poll_until(
            &format!("200 lines over {name}"),
            DEADLINE * 3,
            || match consumer(&plain).fetch_watermarks(&topic, 0, std::time::Duration::from_secs(5))
            {
                Ok((_, high)) if high >= 200 => Ok(()),
                other => Err(format!(
                    "watermarks {other:?}; agent log:\n{}",
                    tail(&std::fs::read_to_string(&log).unwrap_or_default(), 20)
                )),
            },
        );
        let got = consume(&plain, &topic, 0, rdkafka::Offset::Beginning, 200);
        let mut shipped = Vec::new();
        for m in &got {
            shipped.extend_from_slice(m.value.as_deref().unwrap_or_default());
            shipped.push(b'\n');
        }
        assert_eq!(
            String::from_utf8_lossy(&shipped),
            lines,
            "{name}: the file, byte for byte"
        );
        assert!(agent.terminate(DEADLINE).is_some_and(|s| s.success()));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !text.contains("shipping through librdkafka"),
            "{name}: shipped by the native producer:\n{}",
            tail(&text, 20)
        );
    }

    // A wrong password: the login is refused with the broker's message, nothing is written.
    let toml = agent_toml("refused", &secure, &sasl("SCRAM-SHA-512", &wrong_file));
    let log = d.join("refused.stderr");
    let mut cmd = qanat_command();
    cmd.args(["agent", "--config"])
        .arg(&toml)
        .stderr(std::fs::File::create(&log).unwrap());
    let _agent = Proc::spawn(cmd, "qanat agent").unwrap();
    poll_until("the agent reports the refused login", DEADLINE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("SASL authentication failed")
            && text.contains("invalid credentials with SASL mechanism SCRAM-SHA-512"))
        .then_some(())
        .ok_or_else(|| tail(&text, 20))
    });
    assert!(!s.broker.data_dir().join("native-refused-0").exists());
}

/// `qanat cdc status` reads the offsets topic over SASL_SSL with the security flags: a client
/// without them could not even read metadata from the TLS port.
#[test]
fn cdc_status_talks_sasl_ssl_with_the_security_flags() {
    let s = shared_secure();
    let status = |password: &str| {
        qanat_command()
            .args(["cdc", "status", "--bootstrap", &s.secure])
            .args(["--sample-secs", "0"])
            .args([
                "--security-protocol",
                "SASL_SSL",
                "--sasl-mechanism",
                "SCRAM-SHA-256",
            ])
            .args(["--sasl-username", "alice", "--ssl-ca-file"])
            .arg(&s.ca)
            .env("QANAT_KAFKA_SASL_PASSWORD", password)
            .output()
            .unwrap()
    };
    let out = status(PASSWORD);
    assert!(out.status.success(), "qanat cdc status: {}", describe(&out));
    let out = status("wrong password");
    assert_login_refused(&out);
    let out = qanat_command()
        .args(["cdc", "status", "--bootstrap", &s.secure])
        .args([
            "--security-protocol",
            "SASL_SSL",
            "--sasl-mechanism",
            "SCRAM-SHA-256",
        ])
        .args(["--sasl-username", "alice"])
        .env_remove("QANAT_KAFKA_SASL_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--sasl-password-file"),
        "{}",
        describe(&out)
    );
}

/// `qanat collect` with `[kafka.security]` delivers events over SASL_SSL; with a wrong
/// password it still answers the HTTP client (answers never wait for the bus) but logs the
/// refused login and delivers nothing.
#[test]
fn collect_ships_over_sasl_ssl_with_its_security_table() {
    let s = shared_secure();
    let dir = tempfile::tempdir().unwrap();
    let config = |password: &str, topic: &str| {
        let file = Shared::password_file(dir.path(), topic, password);
        format!(
            "{}\n[[routes]]\nname = \"all\"\ntopic = \"{topic}\"\n",
            s.table("kafka.security", &file)
        )
    };
    let event = |name: &str| {
        serde_json::to_vec(&serde_json::json!({
            "app": "web", "device": {"id": "d-1"},
            "events": [{"type": "custom", "name": name}]
        }))
        .unwrap()
    };
    let json = ("Content-Type", "application/json");
    let c = Collector::start(&s.secure, &config(PASSWORD, "collect-secure"));
    let r = c.post("/v1/events", &[json], &event("over-tls"));
    assert_eq!(r.status, 200, "{}", r.text());
    let got = consume(&s.plain, "collect-secure", 0, rdkafka::Offset::Beginning, 1);
    assert!(
        got[0].value_str().contains("over-tls"),
        "{}",
        got[0].value_str()
    );

    let c = Collector::start(&s.secure, &config("wrong password", "collect-refused"));
    let r = c.post("/v1/events", &[json], &event("never"));
    assert_eq!(r.status, 200, "{}", r.text());
    poll_until("the collector reports the refused login", DEADLINE, || {
        let log = c.stderr();
        reports_failed_login(&log)
            .then_some(())
            .ok_or_else(|| tail(&log, 20))
    });
    assert!(!s.partition_dir("collect-refused", 0).exists());
}

/// `qanat groups` lists and describes a group over SASL_SSL; a wrong password fails.
#[test]
fn groups_talks_sasl_ssl_with_the_security_flags() {
    let s = shared_secure();
    produce(&s.plain, "groups-secure", &[Rec::value("v")], &[]);
    let mut config = consumer_config(&s.plain);
    config.set("group.id", "secure-readers");
    let reader: rdkafka::consumer::BaseConsumer = config.create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("groups-secure", 0, rdkafka::Offset::Offset(1))
        .unwrap();
    reader
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .unwrap();
    let groups = |args: &[&str], password: &str| {
        qanat_command()
            .args(["groups", "--bootstrap", &s.secure])
            .args(s.flags())
            .args(args)
            .env("QANAT_KAFKA_SASL_PASSWORD", password)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = groups(&["list"], PASSWORD);
    assert!(
        out.status.success(),
        "qanat groups list: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("secure-readers"),
        "{}",
        describe(&out)
    );
    let out = groups(&["describe", "secure-readers"], PASSWORD);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("groups-secure"),
        "{}",
        describe(&out)
    );
    let out = groups(&["list"], "wrong password");
    assert_login_refused(&out);
}

/// `qanat users`, `acls` and `quotas` with `--bootstrap` reach a SASL_SSL listener with the
/// security flags, and a wrong password is refused at once.
#[test]
fn admin_commands_talk_sasl_ssl_with_the_security_flags() {
    let s = shared_secure();
    let admin = |args: &[&str], password: &str| {
        qanat_command()
            .args([args[0], "--bootstrap", &s.secure])
            .args(s.flags())
            .args(&args[1..])
            .env("QANAT_KAFKA_SASL_PASSWORD", password)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = admin(&["users", "list"], PASSWORD);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("alice\t"),
        "{}",
        describe(&out)
    );
    let out = admin(
        &[
            "quotas",
            "set",
            "--client-id",
            "admin-over-tls",
            "--add-config",
            "consumer_byte_rate=4096",
        ],
        PASSWORD,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let out = admin(
        &["quotas", "list", "--client-id", "admin-over-tls"],
        PASSWORD,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "client-id=admin-over-tls\tconsumer_byte_rate=4096",
        "{}",
        describe(&out)
    );
    let out = admin(&["acls", "list"], PASSWORD);
    assert!(out.status.success(), "{}", describe(&out));
    for command in ["users", "acls", "quotas"] {
        let out = admin(&[command, "list"], "wrong password");
        assert_login_refused(&out);
    }
}

/// `qanat sync` reads a topic range and writes a topic over SASL_SSL with `[sync.security]`
/// of its job file; the flags override it key by key, and a wrong password fails the job.
#[test]
fn sync_moves_a_topic_over_sasl_ssl_with_its_security_table() {
    let s = shared_secure();
    let recs: Vec<Rec> = (0..10)
        .map(|i| Rec::value(format!("v{i}")).key(format!("k{i}")))
        .collect();
    produce(&s.plain, "sync-secure-in", &recs, &[]);
    qanat_ok(&[
        "topics",
        "create",
        "sync-secure-out",
        "--bootstrap",
        &s.plain,
    ]);
    let dir = tempfile::tempdir().unwrap();
    let file = Shared::password_file(dir.path(), "password", PASSWORD);
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "{}\n[[table]]\nfrom = \"kafka://{b}/sync-secure-in\"\nto = \"kafka://{b}/sync-secure-out\"\n",
            s.table("sync.security", &file),
            b = s.secure
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        qanat_command()
            .args(["sync", "run"])
            .arg(&job)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(out.status.success(), "qanat sync run: {}", describe(&out));
    let got = consume(
        &s.plain,
        "sync-secure-out",
        0,
        rdkafka::Offset::Beginning,
        10,
    );
    let mut values: Vec<String> = got.iter().map(Msg::value_str).collect();
    values.sort();
    assert!(values[0].contains("\"_value\":\"v0\""), "{values:?}");

    let wrong = Shared::password_file(dir.path(), "wrong", "wrong password");
    let out = run(&["--sasl-password-file", wrong.to_str().unwrap()]);
    assert_login_refused(&out);
}

/// `qanat lake land` lands a topic over SASL_SSL with the `[security]` table of its file,
/// and `qanat lake audit` reads the day's events over SASL_SSL with the security flags;
/// with a wrong password both fail.
#[test]
fn lake_land_and_audit_talk_sasl_ssl() {
    /// 2026-11-29T00:00:00Z.
    const DAY_MS: i64 = 1_795_910_400_000;
    let s = shared_secure();
    let topic = "cdc.shop.secure";
    let recs: Vec<Rec> = (1..=3)
        .map(|id| {
            let value = serde_json::json!({"op": "c", "after": {"id": id}, "ts_ms": DAY_MS + id,
                "source": {"ts_ms": DAY_MS + id, "file": "binlog.000001", "pos": id}});
            Rec::value(value.to_string())
                .key(serde_json::json!({"id": id}).to_string())
                .timestamp(DAY_MS + id)
        })
        .collect();
    produce(&s.plain, topic, &recs, &[]);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("lake");
    let land = |password: &str| {
        let file = Shared::password_file(dir.path(), "land-password", password);
        let config = dir.path().join("lake.toml");
        std::fs::write(
            &config,
            format!(
                "bootstrap = \"{}\"\nroot = \"{}\"\n{}\n[[table]]\ntable = \"shop.secure\"\ntopics = [\"{topic}\"]\n",
                s.secure,
                root.display(),
                s.table("security", &file)
            ),
        )
        .unwrap();
        qanat_command()
            .args(["lake", "land", "--once", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = land(PASSWORD);
    assert!(out.status.success(), "qanat lake land: {}", describe(&out));
    let audit = |password: &str| {
        qanat_command()
            .args(["lake", "audit", "--root"])
            .arg(&root)
            .args(["--table", "shop.secure", "--ds", "20261129", "--json"])
            .args(["--bootstrap", &s.secure, "--topic", topic])
            .args(s.flags())
            .env("QANAT_KAFKA_SASL_PASSWORD", password)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = audit(PASSWORD);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            report["bus_events"].as_u64(),
            report["change_log_rows"].as_u64()
        ),
        (Some(3), Some(3)),
        "{report}"
    );

    let out = audit("wrong password");
    assert_login_refused(&out);
    let out = land("wrong password");
    assert_login_refused(&out);
}

/// `qanat quotas` sets, lists and deletes client quotas on a running broker (through
/// AlterClientQuotas/DescribeClientQuotas) and in a stopped broker's data directory; what it
/// sets kafka-python reads back, and what kafka-python sets it lists.
#[test]
fn quotas_are_managed_on_a_running_and_a_stopped_broker() {
    require_python_modules(&["kafka"]);
    let mut broker = Broker::start();
    let b = broker.bootstrap();
    let python = |args: &[&str]| {
        let out = Command::new("python3")
            .arg(py_script("client_quotas.py"))
            .args(["--bootstrap", &b])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "client_quotas.py {args:?}: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let quotas = |args: &[&str]| qanat_ok(&[&["quotas", "--bootstrap", &b], args].concat());
    quotas(&[
        "set",
        "--user",
        "alice",
        "--add-config",
        "producer_byte_rate=1048576,request_percentage=25",
    ]);
    quotas(&[
        "set",
        "--client-default",
        "--add-config",
        "consumer_byte_rate=2048",
    ]);
    let described = python(&["describe"]);
    assert!(
        described.contains(
            r#"{"entity": {"user": "alice"}, "values": {"producer_byte_rate": 1048576.0, "request_percentage": 25.0}}"#
        ),
        "{described}"
    );
    assert!(
        described.contains(
            r#"{"entity": {"client-id": null}, "values": {"consumer_byte_rate": 2048.0}}"#
        ),
        "{described}"
    );

    python(&[
        "alter",
        "--user",
        "bob",
        "--client-id",
        "etl",
        "consumer_byte_rate=4096",
    ]);
    let listed = quotas(&["list"]);
    assert!(
        listed
            .lines()
            .any(|l| l == "user=bob client-id=etl\tconsumer_byte_rate=4096"),
        "{listed}"
    );
    assert_eq!(
        quotas(&["list", "--user", "alice"]).trim(),
        "user=alice\tproducer_byte_rate=1048576,request_percentage=25"
    );
    quotas(&[
        "delete",
        "--user",
        "alice",
        "--delete-config",
        "request_percentage",
    ]);
    quotas(&["delete", "--client-default"]);
    let described = python(&["describe"]);
    assert!(
        described.contains(
            r#"{"entity": {"user": "alice"}, "values": {"producer_byte_rate": 1048576.0}}"#
        ) && !described.contains("2048"),
        "{described}"
    );

    // While it runs, the broker's data directory is its own: offline edits and a second
    // broker on it are refused, naming the lock.
    let data = broker.data_dir();
    let dir = data.to_str().unwrap();
    for command in [
        vec!["quotas", "--data-dir", dir, "list"],
        vec!["users", "--data-dir", dir, "list"],
        vec!["acls", "--data-dir", dir, "list"],
    ] {
        let out = qanat(&command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(".lock") && stderr.contains("--bootstrap"),
            "{command:?}: {}",
            describe(&out)
        );
    }
    let mut second = qanat_command()
        .args(["broker", "--data-dir", dir, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut second, std::time::Duration::from_secs(30));
    if status.is_none() {
        let _ = second.kill();
    }
    let out = second.wait_with_output().unwrap();
    assert!(
        status.is_some_and(|s| !s.success())
            && String::from_utf8_lossy(&out.stderr).contains(".lock"),
        "a second broker on {dir}: {}",
        describe(&out)
    );
    assert!(broker.is_alive());

    // A stopped broker: the data directory, read back by the broker once it runs again.
    broker.stop();
    let offline = |args: &[&str]| {
        let mut all = vec!["quotas", "--data-dir", data.to_str().unwrap()];
        all.extend_from_slice(args);
        qanat_ok(&all)
    };
    offline(&[
        "set",
        "--user-default",
        "--add-config",
        "producer_byte_rate=512",
    ]);
    offline(&["delete", "--user", "bob", "--client-id", "etl"]);
    assert!(offline(&["list"]).contains("user=<default>\tproducer_byte_rate=512"));
    broker.start_again();
    let b = broker.bootstrap();
    let out = Command::new("python3")
        .arg(py_script("client_quotas.py"))
        .args(["--bootstrap", &b, "describe"])
        .output()
        .unwrap();
    let described = String::from_utf8_lossy(&out.stdout);
    assert!(
        described
            .contains(r#"{"entity": {"user": null}, "values": {"producer_byte_rate": 512.0}}"#)
            && !described.contains("etl"),
        "{}",
        describe(&out)
    );
    let out = qanat(&["quotas", "--bootstrap", &b, "delete", "--user", "nobody"]);
    assert!(!out.status.success(), "{}", describe(&out));
}

/// With `[metrics] require_credentials`, the broker's metrics endpoint wants the push API's
/// credentials: 401 without or with wrong ones, the page with a token or a user's password.
#[test]
fn metrics_endpoint_can_require_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    add_user(&data, "alice", PASSWORD);
    let broker = Broker::builder()
        .config(
            r#"
[metrics]
require_credentials = true

[security]
http_tokens = [{ token = "scraper-token-0123456789", principal = "User:scraper" }]
"#,
        )
        .data_dir(&data)
        .metrics()
        .start();
    let addr = broker.metrics_addr().unwrap();
    let get = |headers: &[(&str, &str)]| http(&addr, "GET", "/metrics", headers, b"");
    let r = get(&[]);
    assert_eq!(r.status, 401, "{}", r.text());
    let r = get(&[("Authorization", "Bearer not-the-token")]);
    assert_eq!(r.status, 401, "{}", r.text());
    let r = get(&[("Authorization", "Basic YWxpY2U6d3Jvbmc=")]);
    assert_eq!(r.status, 401, "{}", r.text());
    let r = get(&[("Authorization", "Bearer scraper-token-0123456789")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("qanat_http_auth_failures_total"),
        "{}",
        r.text()
    );
    let r = get(&[(
        "Authorization",
        "Basic YWxpY2U6Y29ycmVjdCBob3JzZSBiYXR0ZXJ5IHN0YXBsZQ==",
    )]);
    assert_eq!(r.status, 200, "{}", r.text());

    // Off by default.
    let open = Broker::builder().metrics().start();
    assert!(scrape(&open.metrics_addr().unwrap()).is_ok());
}
