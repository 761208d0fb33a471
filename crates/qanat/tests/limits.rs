//! Connection-level limits of the real broker: running out of descriptors.
//!
//! Each test starts its own broker. Waits are polls on observable events (log lines, closed
//! sockets) with generous deadlines; nothing asserts on time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::TcpStream;

use support::*;

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A normal client still gets its records in and out.
fn assert_produce_consume_works(broker: &Broker, topic: &str) {
    let addr = broker.bootstrap();
    let recs = keyed_records(topic, 20);
    produce(&addr, topic, &recs, &[("acks", "all")]);
    let got = consume_all(&addr, topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);
}

/// Lines of the broker's stderr reporting a failed accept.
fn accept_failure_lines(broker: &Broker) -> Vec<String> {
    broker
        .stderr()
        .lines()
        .filter(|l| l.contains("accept failed"))
        .map(str::to_string)
        .collect()
}

#[test]
fn out_of_descriptors_the_broker_backs_off_and_recovers() {
    // A few tens of descriptors are the broker's own (runtime, data directory, listener).
    let mut broker = Broker::builder().open_files_limit(64).start();
    let addr = broker.bootstrap();

    // More connections than the broker has descriptors for: the rest wait in the backlog.
    let mut flood = Vec::new();
    poll_until("the broker to run out of descriptors", DEADLINE, || {
        if flood.len() < 500 {
            flood.push(connect(&addr));
        }
        match accept_failure_lines(&broker).len() {
            0 => Err(format!(
                "{} connections, no accept failure yet",
                flood.len()
            )),
            _ => Ok(()),
        }
    });

    // While the flood lasts, failures are logged once per interval with a count of the
    // rest; one per try would be thousands of lines by the time the second line is due.
    const MAX_LINES: usize = 3;
    let lines = poll_until(
        "a second accept-failure line counting the suppressed ones",
        DEADLINE,
        || {
            let lines = accept_failure_lines(&broker);
            let counted = lines
                .iter()
                .any(|l| l.contains("suppressed=") && !l.contains("suppressed=0"));
            if lines.len() > MAX_LINES || counted {
                Ok(lines)
            } else {
                Err(format!("{} lines: {lines:?}", lines.len()))
            }
        },
    );
    assert!(
        lines.len() <= MAX_LINES,
        "{} accept-failure lines while out of descriptors (expected at most {MAX_LINES}); first: {:?}",
        lines.len(),
        lines.first()
    );
    assert!(broker.is_alive(), "broker died out of descriptors");

    drop(flood);
    assert_produce_consume_works(&broker, "after-descriptor-exhaustion");
    broker.stop();
}
