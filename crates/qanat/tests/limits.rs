//! Connection-level limits of the real broker: the shared request memory pool against
//! half-sent frames, running out of descriptors, the idle timeout and the connection caps.
//!
//! Each test starts its own broker. Waits are polls on observable events (metrics, log lines,
//! closed sockets) with generous deadlines; nothing asserts on time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use support::*;

const MIB: u64 = 1024 * 1024;

fn scrape_metric(broker: &Broker, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let addr = broker.metrics_addr().expect("broker started with metrics");
    scrape(&addr)
        .ok()
        .and_then(|text| metric(&text, name, labels))
}

/// A normal client still gets its records in and out.
fn assert_produce_consume_works(broker: &Broker, topic: &str) {
    let addr = broker.bootstrap();
    let recs = keyed_records(topic, 20);
    produce(&addr, topic, &recs, &[("acks", "all")]);
    let got = consume_all(&addr, topic, 0, recs.len());
    assert_records_eq(&recs, &got, 0);
}

#[test]
fn half_sent_frames_cannot_exhaust_memory() {
    const FRAME: u64 = 32 * MIB;
    const POOL: u64 = 64 * MIB;
    const FLOOD: usize = 20;
    // Without a pool every connection keeps its 32 MiB: more than 600 MiB. With the pool at
    // most 64 MiB of frames exist, plus the broker's own few tens of MiB.
    const RSS_BOUND: u64 = 200 * MIB;
    let broker = Broker::builder()
        .config(&format!(
            "[broker]\nmax_frame_bytes = {FRAME}\nqueued_max_request_bytes = {POOL}\n"
        ))
        .metrics()
        .start();
    let addr = broker.bootstrap();

    // Each connection sends a max-size frame but for its last byte, then holds it open.
    let sent = Arc::new(AtomicUsize::new(0));
    let mut data = (FRAME as i32).to_be_bytes().to_vec();
    data.resize(4 + FRAME as usize - 1, 0x5a);
    let data = Arc::new(data);
    let mut sockets = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..FLOOD {
        let s = raw_connect(&addr);
        sockets.push(s.try_clone().unwrap());
        let sent = sent.clone();
        let data = data.clone();
        writers.push(thread::spawn(move || {
            let mut s = s;
            // Blocks while the broker does not read (backpressure); fails once shut down.
            if s.write_all(&data).is_ok() {
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // Either every frame went in (no pool), or two filled the pool and the others wait.
    poll_until(
        "the half-sent frames to be taken in or held back",
        DEADLINE,
        || {
            let done = sent.load(Ordering::SeqCst);
            let waiting = scrape_metric(&broker, "qanat_request_pool_waiting_connections", &[]);
            if done == FLOOD || (done >= 2 && waiting == Some((FLOOD - 2) as f64)) {
                Ok(())
            } else {
                Err(format!(
                    "{done} fully sent, {waiting:?} waiting for pool memory"
                ))
            }
        },
    );
    let peak = broker.proc_status_bytes("VmHWM");
    eprintln!(
        "peak RSS with {FLOOD} half-sent {} MiB frames: {} MiB",
        FRAME / MIB,
        peak / MIB
    );
    assert!(
        peak < RSS_BOUND,
        "broker peak RSS {} MiB exceeds {} MiB with {FLOOD} half-sent frames",
        peak / MIB,
        RSS_BOUND / MIB
    );
    let used = scrape_metric(&broker, "qanat_request_pool_used_bytes", &[]).unwrap();
    assert!(used <= POOL as f64, "pool use {used} above {POOL}");

    // Once the flood is gone, its memory comes back and normal clients are served.
    for s in &sockets {
        let _ = s.shutdown(Shutdown::Both);
    }
    for w in writers {
        w.join().unwrap();
    }
    drop(sockets);
    poll_until("the pool to be returned", DEADLINE, || match scrape_metric(
        &broker,
        "qanat_request_pool_used_bytes",
        &[],
    ) {
        Some(0.0) => Ok(()),
        other => Err(format!("used {other:?}")),
    });
    assert_produce_consume_works(&broker, "after-half-sent-frames");
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
            flood.push(raw_connect(&addr));
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

#[test]
fn idle_connections_are_closed_and_busy_ones_are_not() {
    let broker = Broker::builder()
        .config("[broker]\nconnections_max_idle_ms = 1000\n")
        .metrics()
        .start();
    let addr = broker.bootstrap();

    // A busy connection, opened first: requests back to back until the idle ones are gone.
    let stop = Arc::new(AtomicBool::new(false));
    let busy = thread::spawn({
        let addr = addr.clone();
        let stop = stop.clone();
        move || {
            let mut s = raw_connect(&addr);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                api_versions_roundtrip(&mut s, n)
                    .unwrap_or_else(|e| panic!("busy connection, request {n}: {e}"));
                n += 1;
            }
            (s, n)
        }
    });

    // Says nothing at all.
    let mut silent = raw_connect(&addr);
    // Answered once, then silent.
    let mut answered = raw_connect(&addr);
    api_versions_roundtrip(&mut answered, 1).unwrap();
    // Trickles a frame in, a byte at a time, never finishing it: bytes of an unfinished
    // frame are not activity, so this one is closed too (and cannot hold pool memory).
    let trickler = thread::spawn({
        let addr = addr.clone();
        move || {
            let mut s = raw_connect(&addr);
            let mut frame = 1000i32.to_be_bytes().to_vec();
            frame.resize(1004, 0);
            for byte in frame {
                if s.write_all(&[byte]).is_err() {
                    return true;
                }
                // Pacing of the trickle, not synchronization: the broker's close ends it.
                thread::sleep(Duration::from_millis(50));
            }
            false
        }
    });

    wait_closed_by_peer(&mut silent, "a silent connection");
    wait_closed_by_peer(&mut answered, "a connection idle after one request");
    assert!(
        trickler.join().unwrap(),
        "a frame trickling in for longer than the idle timeout kept its connection open"
    );

    // The busy connection has lived longer than the idle timeout and still works.
    stop.store(true, Ordering::SeqCst);
    let (mut s, n) = busy.join().unwrap();
    assert!(n > 0);
    api_versions_roundtrip(&mut s, -1).unwrap();
    let closed = scrape_metric(&broker, "qanat_connections_idle_closed_total", &[]).unwrap();
    assert!(
        closed >= 3.0,
        "qanat_connections_idle_closed_total = {closed}"
    );
}

/// A connection from `source` (a loopback address) to `addr`.
fn connect_from(source: &str, addr: &str) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let s = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr.parse().unwrap()).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

#[test]
fn connections_over_a_cap_are_closed_at_once() {
    let broker = Broker::builder()
        .config("[broker]\nmax_connections = 4\nmax_connections_per_ip = 3\n")
        .metrics()
        .start();
    let addr = broker.bootstrap();

    let mut admitted: Vec<TcpStream> = (0..3).map(|_| raw_connect(&addr)).collect();
    for (i, s) in admitted.iter_mut().enumerate() {
        api_versions_roundtrip(s, i as i32).unwrap();
    }
    // A fourth from the same address: closed without an answer.
    let mut over_ip = raw_connect(&addr);
    let _ = over_ip.write_all(&kafka_request(18, 0, 9, &[]));
    assert_eq!(
        read_kafka_response(&mut over_ip).ok().flatten(),
        None,
        "the connection over max_connections_per_ip was answered"
    );
    // Another address may still connect, up to the total.
    let mut other = connect_from("127.0.0.2", &addr);
    api_versions_roundtrip(&mut other, 10).unwrap();
    let mut over_total = connect_from("127.0.0.3", &addr);
    wait_closed_by_peer(&mut over_total, "the connection over max_connections");

    // The admitted ones keep working.
    for (i, s) in admitted.iter_mut().enumerate() {
        api_versions_roundtrip(s, 20 + i as i32).unwrap();
    }
    let text = scrape(&broker.metrics_addr().unwrap()).unwrap();
    for limit in ["max_connections_per_ip", "max_connections"] {
        assert_eq!(
            metric(
                &text,
                "qanat_connections_refused_total",
                &[("limit", limit)]
            ),
            Some(1.0),
            "refusals by {limit}"
        );
    }
    assert_eq!(
        broker
            .stderr()
            .lines()
            .filter(|l| l.contains("connection refused"))
            .count(),
        2,
        "one log line per refused connection here (first of each kind)"
    );

    // A closed connection frees its place.
    drop(admitted.pop());
    poll_until("a freed place to be taken", DEADLINE, || {
        let mut s = raw_connect(&addr);
        api_versions_roundtrip(&mut s, 30)
    });
}
