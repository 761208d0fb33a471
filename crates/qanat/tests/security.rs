//! Security end to end, against the real `qanat` binary: listeners with their security
//! protocols, TLS with certificates generated here (`rcgen`), SASL (PLAIN, SCRAM-SHA-256,
//! SCRAM-SHA-512) with users made by `qanat users`, through kcat, confluent-kafka and
//! kafka-python; refusals of wrong credentials and of clients without TLS.
//!
//! These tests FAIL, never skip, when a client is missing: `scripts/test.sh` installs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::*;

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
/// `ca.pem`, `server.pem`, `server.key`.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_certs(dir: &Path, server_name: &str) -> Certs {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "qanat test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, server_name);
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let certs = Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&certs.ca, ca.pem()).unwrap();
    std::fs::write(&certs.cert, cert.pem()).unwrap();
    std::fs::write(&certs.key, key.serialize_pem()).unwrap();
    certs
}

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
