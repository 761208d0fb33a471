//! HTTPS end to end, against the real `qanat` binary with certificates generated here
//! (`rcgen`), spoken to by Python's `urllib`/`ssl` trusting only the generated CA:
//! `qanat collect` takes a beacon over HTTPS and the event reaches the bus; the broker's push
//! endpoint and metrics endpoints answer over HTTPS; plain HTTP to an HTTPS port gets no
//! answer; SIGHUP puts a new certificate in front of new connections, on the HTTP endpoints
//! and on a Kafka SSL listener, whose open connections keep working; a client certificate's
//! subject is the principal ACLs check (`User:CN=alice` may write, `User:CN=mallory` not).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod collect_support;
mod support;
mod tls_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use collect_support::Collector;
use support::*;
use tls_support::make_certs;

/// Python: GET `url` trusting `ca`; prints the status, then the body (or, with
/// `first_event`, only the first Server-Sent Events `data:` line, for endless streams).
const PY_GET: &str = r#"
import ssl, sys, urllib.request
url, ca, first_event = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
ctx = ssl.create_default_context(cafile=ca)
with urllib.request.urlopen(url, context=ctx, timeout=60) as r:
    print(r.status)
    if first_event:
        for line in r:
            if line.startswith(b"data:"):
                print(line.decode().strip())
                break
    else:
        print(r.read().decode(errors="replace"))
"#;

fn py_get(url: &str, ca: &Path, first_event: bool) -> Output {
    Command::new("python3")
        .args(["-c", PY_GET, url])
        .arg(ca)
        .arg(if first_event { "1" } else { "0" })
        .output()
        .unwrap()
}

fn ok_body(url: &str, ca: &Path, first_event: bool) -> String {
    let out = py_get(url, ca, first_event);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.starts_with("200\n"),
        "GET {url}: {}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The DER of the certificate the server at `addr` presents to a new connection.
fn served_certificate(addr: &str) -> Vec<u8> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import ssl,sys; print(ssl.get_server_certificate((sys.argv[1], int(sys.argv[2]))))",
            host,
            port,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = String::from_utf8(out.stdout).unwrap();
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let out = Command::new("python3")
        .args([
            "-c",
            "import base64,sys; sys.stdout.buffer.write(base64.b64decode(sys.argv[1]))",
            &b64,
        ])
        .output()
        .unwrap();
    out.stdout
}

/// Plain HTTP to an HTTPS port: the server closes without an HTTP answer.
fn assert_plain_http_refused(addr: &str, path: &str) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=60)",
            &format!("http://{addr}{path}"),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "plain HTTP to {addr} was answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn collect_takes_a_beacon_over_https_and_reloads_its_certificate_on_sighup() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), "collect one");
    let first_der = certs.der.clone();
    let c = Collector::start(
        &broker.bootstrap(),
        &format!(
            "[server]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\n[[routes]]\nname = \"all\"\ntopic = \"beacons\"\n",
            certs.cert.display(),
            certs.key.display()
        ),
    );
    let port = c.addr.rsplit_once(':').unwrap().1;
    let url = format!(
        "https://localhost:{port}/t.gif?t=page_view&url=https%3A%2F%2Fshop.example%2F&uid=u-1"
    );
    ok_body(&url, &certs.ca, false);
    let got = consume_all(&broker.bootstrap(), "beacons", 0, 1);
    let event: serde_json::Value =
        serde_json::from_slice(got[0].value.as_deref().unwrap()).unwrap();
    assert_eq!(event["page"]["url"], "https://shop.example/");
    assert_eq!(event["user_id"], "u-1");

    // The metrics endpoint is HTTPS too.
    let metrics_port = c.metrics_addr.rsplit_once(':').unwrap().1;
    let metrics = ok_body(
        &format!("https://localhost:{metrics_port}/metrics"),
        &certs.ca,
        false,
    );
    assert!(metrics.contains("qanat_collect"), "{metrics}");

    assert_plain_http_refused(&c.addr, "/t.gif?t=page_view");
    assert_plain_http_refused(&c.metrics_addr, "/metrics");

    // SIGHUP: new connections get the new certificate.
    assert_eq!(served_certificate(&c.addr), first_der);
    let second_der = make_certs(dir.path(), "collect two").der;
    c.signal("-HUP");
    poll_until("the certificate reload", DEADLINE, || {
        if c.stderr().contains("HTTPS TLS certificate reloaded") {
            Ok(())
        } else {
            Err(c.stderr())
        }
    });
    assert_eq!(served_certificate(&c.addr), second_der);
    assert_ne!(first_der, second_der);
}

#[test]
fn broker_push_and_metrics_endpoints_serve_https() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), "broker");
    let _ = certs.der.clone();
    let broker = Broker::builder()
        .http()
        .metrics()
        .env("QANAT_HTTP_TLS_CERT_FILE", certs.cert.to_str().unwrap())
        .env("QANAT_HTTP_TLS_KEY_FILE", certs.key.to_str().unwrap())
        .start();
    produce(
        &broker.bootstrap(),
        "events",
        &[Rec::value("hello over tls")],
        &[],
    );
    let http = broker.http_addr().unwrap();
    let port = http.rsplit_once(':').unwrap().1;
    let text = ok_body(
        &format!("https://localhost:{port}/v1/topics/events/events?from=earliest"),
        &certs.ca,
        true,
    );
    assert!(text.contains("hello over tls"), "{text}");
    let metrics = broker.metrics_addr().unwrap();
    let metrics_port = metrics.rsplit_once(':').unwrap().1;
    let body = ok_body(
        &format!("https://localhost:{metrics_port}/metrics"),
        &certs.ca,
        false,
    );
    assert!(body.contains("qanat_"), "{body}");
    assert_plain_http_refused(&http, "/v1/topics/events/events?from=earliest");
    assert_plain_http_refused(&metrics, "/metrics");
}

#[test]
fn kafka_ssl_listener_reloads_its_certificate_and_keeps_open_connections() {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), "kafka one");
    let first_der = certs.der.clone();
    let broker = Broker::builder()
        .config(&format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[[broker.listener]]\nname = \"TLS\"\naddress = \"127.0.0.1:0\"\nsecurity_protocol = \"SSL\"\n",
            certs.cert.display(),
            certs.key.display()
        ))
        .start();
    let tls = broker.listener_addr("TLS");
    let ca = certs.ca.to_str().unwrap().to_string();
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = producer_config(
        &tls,
        &[("security.protocol", "ssl"), ("ssl.ca.location", &ca)],
    )
    .create()
    .unwrap();
    producer
        .send(BaseRecord::<(), str>::to("reload").payload("before"))
        .unwrap();
    producer.flush(DEADLINE).unwrap();
    assert_eq!(served_certificate(&tls), first_der);

    // A new certificate from a new CA: the producer trusts only the first CA (librdkafka
    // reads it once), so its records after the reload can only travel on the connection it
    // opened before.
    let second_der = make_certs(dir.path(), "kafka two").der;
    std::process::Command::new("kill")
        .args(["-HUP", &broker.pid().unwrap().to_string()])
        .status()
        .unwrap();
    poll_until("the certificate reload", DEADLINE, || {
        if broker.stderr().contains("SIGHUP: TLS certificate reloaded") {
            Ok(())
        } else {
            Err(broker.stderr_tail(5))
        }
    });
    assert_eq!(served_certificate(&tls), second_der);
    producer
        .send(BaseRecord::<(), str>::to("reload").payload("after"))
        .unwrap();
    producer.flush(DEADLINE).unwrap();
    let got = consume_all(&broker.bootstrap(), "reload", 0, 2);
    let values: Vec<_> = got.iter().map(|m| m.value.clone().unwrap()).collect();
    assert_eq!(values, vec![b"before".to_vec(), b"after".to_vec()]);
}

/// A client CA in `dir` (`clients-ca.pem`) and, per common name, `NAME.pem`/`NAME.key`.
fn make_client_certs(dir: &Path, names: &[&str]) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "qanat clients CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    for name in names {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, *name);
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    let path = dir.join("clients-ca.pem");
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

#[test]
fn client_certificate_subject_is_the_principal_acls_check() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let certs = make_certs(dir.path(), "localhost");
    let _ = certs.der.clone();
    let clients_ca = make_client_certs(dir.path(), &["alice", "mallory"]);
    let out = qanat_command()
        .args(["acls", "--data-dir"])
        .arg(&data)
        .args([
            "add",
            "--topic",
            "orders",
            "--principal",
            "User:CN=alice",
            "--operation",
            "Write",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broker = Broker::builder()
        .data_dir(&data)
        .config(&format!(
            "[security]\nauthorizer = true\nsuper_users = [\"User:ANONYMOUS\"]\n\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_auth = \"required\"\nclient_ca_file = \"{}\"\n\n[[broker.listener]]\nname = \"TLS\"\naddress = \"127.0.0.1:0\"\nsecurity_protocol = \"SSL\"\n",
            certs.cert.display(),
            certs.key.display(),
            clients_ca.display()
        ))
        .start();
    // The PLAINTEXT listener is a super user here: it creates the topic.
    produce(&broker.bootstrap(), "orders", &[Rec::value("o0")], &[]);
    let tls = broker.listener_addr("TLS");
    let ca = certs.ca.to_str().unwrap().to_string();
    let as_client = |name: &str| {
        let cert = dir.path().join(format!("{name}.pem"));
        let key = dir.path().join(format!("{name}.key"));
        try_produce(
            &tls,
            "orders",
            &[Rec::value(format!("from {name}"))],
            &[
                ("security.protocol", "ssl"),
                ("ssl.ca.location", &ca),
                ("ssl.certificate.location", cert.to_str().unwrap()),
                ("ssl.key.location", key.to_str().unwrap()),
                ("message.timeout.ms", "20000"),
            ],
        )
    };
    let alice = as_client("alice");
    assert!(alice[0].is_ok(), "alice may write: {alice:?}");
    let mallory = as_client("mallory");
    let err = mallory[0].clone().unwrap_err();
    assert!(err.to_lowercase().contains("authoriz"), "mallory: {err}");
    let got = consume_all(&broker.bootstrap(), "orders", 0, 2);
    let values: Vec<_> = got.iter().map(|m| m.value.clone().unwrap()).collect();
    assert_eq!(values, vec![b"o0".to_vec(), b"from alice".to_vec()]);
}
