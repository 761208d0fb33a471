//! A sink that keeps records in memory and reports them only when told, for tests of the
//! loop and of anything built on [`Sink`]. Clones share one state, so a test keeps a handle
//! while the loop owns the sink.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{Delivery, Record, SendError, Sink};

/// A record as the sink took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRecord {
    pub topic: String,
    pub file_key: u64,
    pub seq: u64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl SentRecord {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, Default)]
struct State {
    /// Every record taken, in order.
    sent: Vec<SentRecord>,
    /// Taken and not reported yet.
    unreported: Vec<(u64, u64)>,
    reports: Vec<Delivery>,
    manifests: Vec<(String, Vec<u8>, Vec<u8>)>,
    /// Refuse records while this many are unreported.
    capacity: Option<usize>,
    broken: bool,
}

#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    state: Arc<Mutex<State>>,
}

impl MemorySink {
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuse records (as a full queue) while `capacity` are unreported; `None`: never.
    pub fn set_capacity(&self, capacity: Option<usize>) {
        self.state().capacity = capacity;
    }

    pub fn sent(&self) -> Vec<SentRecord> {
        self.state().sent.clone()
    }

    pub fn manifests(&self) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        self.state().manifests.clone()
    }

    /// Report the unreported record `seq` of `file_key`; false if there is none.
    pub fn report(&self, file_key: u64, seq: u64, ok: bool) -> bool {
        let mut s = self.state();
        let Some(i) = s.unreported.iter().position(|&r| r == (file_key, seq)) else {
            return false;
        };
        s.unreported.remove(i);
        s.reports.push(Delivery { file_key, seq, ok });
        true
    }

    /// Report every unreported record, newest first (the order least kind to the loop).
    pub fn report_all(&self, ok: bool) {
        let mut s = self.state();
        while let Some((file_key, seq)) = s.unreported.pop() {
            s.reports.push(Delivery { file_key, seq, ok });
        }
    }

    /// Break as librdkafka's fatal errors do: the next `restart_if_broken` forgets every
    /// unreported record.
    pub fn break_down(&self) {
        self.state().broken = true;
    }
}

impl Sink for MemorySink {
    fn send(&mut self, r: &Record<'_>) -> Result<(), SendError> {
        let mut s = self.state();
        if s.capacity.is_some_and(|c| s.unreported.len() >= c) {
            return Err(SendError::Full);
        }
        let t = &r.trajectory;
        let headers = t.fold_headers(Vec::new(), |mut h, k, v| {
            h.push((k.to_string(), v.to_vec()));
            h
        });
        s.sent.push(SentRecord {
            topic: r.topic.to_string(),
            file_key: r.file_key,
            seq: r.seq,
            key: t.file_id.as_bytes().to_vec(),
            payload: r.payload.to_vec(),
            headers,
        });
        s.unreported.push((r.file_key, r.seq));
        Ok(())
    }

    fn send_manifest(&mut self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), SendError> {
        self.state()
            .manifests
            .push((topic.to_string(), key.to_vec(), payload.to_vec()));
        Ok(())
    }

    fn drain(&mut self, out: &mut Vec<Delivery>) {
        out.append(&mut self.state().reports);
    }

    fn flush(&mut self, _timeout: Duration) {}

    fn restart_if_broken(&mut self) -> bool {
        let mut s = self.state();
        if !std::mem::take(&mut s.broken) {
            return false;
        }
        s.unreported.clear();
        s.reports.clear();
        true
    }

    fn park(&self) -> bool {
        !self.state().reports.is_empty()
    }

    fn unpark(&self) {}
}
