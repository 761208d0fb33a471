//! Real third-party Kafka clients against the real `qanat` binary, run as subprocesses:
//! kcat (librdkafka CLI), confluent-kafka (Python, librdkafka) and kafka-python (pure Python
//! protocol implementation).
//!
//! These tests FAIL, never skip, when a client is missing: `scripts/test.sh` installs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::*;

fn describe(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// kcat -P with `key:value` lines (optionally compressed), then kcat -C from the beginning
/// to the end of the partition; the output must be exactly the input lines, in order.
fn kcat_roundtrip(broker: &Broker, topic: &str, codec: Option<&str>) {
    let b = broker.bootstrap();
    let lines: Vec<String> = (0..200)
        .map(|i| format!("key-{i}:value {i} {}", "z".repeat(i % 30)))
        .collect();
    let input = lines.join("\n") + "\n";

    let mut produce = Command::new("kcat");
    produce.args([
        "-b",
        &b,
        "-P",
        "-t",
        topic,
        "-K:",
        "-X",
        "broker.address.family=v4",
    ]);
    if let Some(c) = codec {
        produce.args(["-z", c]);
    }
    let out = run_with_stdin(&mut produce, input.as_bytes());
    assert!(
        out.status.success(),
        "kcat -P ({codec:?}) failed: {}",
        describe(&out)
    );

    let out = Command::new("kcat")
        .args([
            "-b",
            &b,
            "-C",
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-f",
            "%k:%s\n",
            "-X",
            "broker.address.family=v4",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "kcat -C failed: {}", describe(&out));
    let got = String::from_utf8_lossy(&out.stdout);
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(
        got.len(),
        lines.len(),
        "kcat -C read {} lines, kcat -P wrote {} ({codec:?}); {}",
        got.len(),
        lines.len(),
        describe(&out)
    );
    for (i, (g, w)) in got.iter().zip(&lines).enumerate() {
        assert_eq!(g, w, "line {i} differs ({codec:?})");
    }
}

#[test]
fn kcat_produce_consume_and_metadata() {
    require_kcat();
    let broker = Broker::start();
    kcat_roundtrip(&broker, "kcat-plain", None);
    kcat_roundtrip(&broker, "kcat-snappy", Some("snappy"));

    let out = Command::new("kcat")
        .args([
            "-b",
            &broker.bootstrap(),
            "-L",
            "-X",
            "broker.address.family=v4",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "kcat -L failed: {}", describe(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    let advertised = format!("at {}", broker.bootstrap());
    assert!(
        listing.contains(&advertised),
        "kcat -L does not show the broker {advertised}:\n{listing}"
    );
    for topic in ["kcat-plain", "kcat-snappy"] {
        let line = format!("topic \"{topic}\" with 1 partitions");
        assert!(
            listing.contains(&line),
            "kcat -L lacks {line:?}:\n{listing}"
        );
    }
}

fn run_python(script: &str, broker: &Broker) {
    let out = Command::new("python3")
        .arg(py_script(script))
        .args(["--bootstrap", &broker.bootstrap()])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run python3 {script}: {e}: {INSTALL_HINT}"));
    if out.status.code() == Some(3) {
        panic!(
            "{script}: a Python dependency is missing: {INSTALL_HINT}\n{}",
            describe(&out)
        );
    }
    assert!(out.status.success(), "{script} failed: {}", describe(&out));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn python_confluent_kafka_roundtrip_all_codecs() {
    require_python_modules(&["confluent_kafka"]);
    let broker = Broker::start();
    run_python("confluent_roundtrip.py", &broker);
}

#[test]
fn python_kafka_python_roundtrip_all_codecs() {
    require_python_modules(&["kafka", "lz4", "zstandard", "snappy"]);
    let broker = Broker::start();
    run_python("kafka_python_roundtrip.py", &broker);
}
