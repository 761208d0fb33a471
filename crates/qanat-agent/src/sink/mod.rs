//! Where records go: the [`Sink`] trait between the agent loop and a producer.
//!
//! The loop hands a sink one record at a time, tagged with the file's key and the record's
//! sequence number; the sink reports each record's delivery later, in any order, through
//! [`Sink::drain`]. A sink that cannot take a record now refuses it ([`SendError`]) and keeps
//! nothing of it: the loop holds the bytes and offers them again. [`native::NativeSink`]
//! encodes records straight into Kafka record batches (the default, `output.producer =
//! "native"`, plaintext or secured with TLS and SASL); [`kafka::KafkaSink`] is the librdkafka
//! producer (`"librdkafka"`, needed for snappy and extra librdkafka properties);
//! [`memory::MemorySink`] keeps records in memory for tests.
//!
//! Invariants a sink keeps:
//! * Every record it took is reported exactly once, unless [`Sink::restart_if_broken`]
//!   returned true since: then the records it had not reported are forgotten.
//! * A report's `seq` is right in its low 32 bits at least (see `FileTracker::settle`).
//! * Records of one file reach the topic in the order they were sent (the Kafka sink:
//!   idempotent producers, one partition per key).

use std::sync::Arc;
use std::time::Duration;

pub mod kafka;
pub mod memory;
pub mod native;

/// File keys live in 24 bits (of librdkafka's delivery opaque); the all-ones key is the
/// manifest's, so the largest file key is one less.
pub const FILE_KEY_MASK: u64 = (1 << 24) - 1;
pub const MAX_FILE_KEY: u64 = FILE_KEY_MASK - 1;

/// Called from any thread when delivery reports arrive while the loop is parked.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The trajectory of one record: the `qanat.*` headers of docs/trajectory.md.
#[derive(Debug, Clone, Copy)]
pub struct Trajectory<'a> {
    pub host: &'a str,
    /// The file id; also the record's key.
    pub file_id: &'a str,
    pub path: &'a str,
    pub offset: u64,
    pub size: u64,
    pub lines: u32,
    /// The source's extra headers, after the `qanat.*` ones.
    pub attributes: &'a [(String, String)],
}

impl Trajectory<'_> {
    /// How many headers `fold_headers` yields.
    pub fn header_count(&self) -> usize {
        6 + self.attributes.len()
    }

    /// Fold the record's headers, in the order they are written, into `init` (by value, as
    /// librdkafka's header lists are built).
    pub fn fold_headers<A>(&self, init: A, mut f: impl FnMut(A, &str, &[u8]) -> A) -> A {
        let (mut b1, mut b2, mut b3) = ([0u8; 20], [0u8; 20], [0u8; 20]);
        let mut acc = f(init, "qanat.host", self.host.as_bytes());
        acc = f(acc, "qanat.file", self.file_id.as_bytes());
        acc = f(acc, "qanat.path", self.path.as_bytes());
        acc = f(acc, "qanat.offset", dec(self.offset, &mut b1));
        acc = f(acc, "qanat.size", dec(self.size, &mut b2));
        acc = f(acc, "qanat.lines", dec(u64::from(self.lines), &mut b3));
        for (k, v) in self.attributes {
            acc = f(acc, k, v.as_bytes());
        }
        acc
    }
}

/// Decimal digits of `n` without allocating.
fn dec(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// One event of a file, as handed to a sink.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    /// The loop's key for the file (at most [`MAX_FILE_KEY`]); comes back in reports.
    pub file_key: u64,
    pub seq: u64,
    pub payload: &'a [u8],
    pub trajectory: Trajectory<'a>,
}

/// A delivery report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub file_key: u64,
    pub seq: u64,
    pub ok: bool,
}

/// A record the sink did not take; nothing of it was kept.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The sink's queue is full: expected under load, offer it again shortly.
    #[error("the producer's queue is full")]
    Full,
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Native(#[from] native::NativeError),
}

pub trait Sink {
    /// Take one record, or refuse it.
    fn send(&mut self, record: &Record<'_>) -> Result<(), SendError>;

    /// Send a record that belongs to no file (the manifest); it is never reported.
    fn send_manifest(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), SendError>;

    /// Append the reports that arrived since the last call to `out`.
    fn drain(&mut self, out: &mut Vec<Delivery>);

    /// Push out what is queued, waiting at most `timeout`.
    fn flush(&mut self, timeout: Duration);

    /// Whether the sink broke beyond retrying (librdkafka's fatal idempotence errors) and
    /// started over: the records it had not reported are forgotten and never will be.
    fn restart_if_broken(&mut self) -> bool;

    /// The loop is about to sleep: call the waker on the next report. Returns true if reports
    /// are already waiting (do not sleep).
    fn park(&self) -> bool;

    /// The loop is awake again.
    fn unpark(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trajectory_headers_in_order() {
        let attrs = vec![("env".to_string(), "prod".to_string())];
        let t = Trajectory {
            host: "web7",
            file_id: "web7:1:2:00000000-4",
            path: "/var/log/a.log",
            offset: 1_234_567_890_123,
            size: 0,
            lines: 42,
            attributes: &attrs,
        };
        let got = t.fold_headers(Vec::new(), |mut got, k, v| {
            got.push((k.to_string(), String::from_utf8_lossy(v).into_owned()));
            got
        });
        let want = [
            ("qanat.host", "web7"),
            ("qanat.file", "web7:1:2:00000000-4"),
            ("qanat.path", "/var/log/a.log"),
            ("qanat.offset", "1234567890123"),
            ("qanat.size", "0"),
            ("qanat.lines", "42"),
            ("env", "prod"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(t.header_count(), want.len());
        let mut b = [0u8; 20];
        assert_eq!(dec(u64::MAX, &mut b), u64::MAX.to_string().as_bytes());
    }
}
