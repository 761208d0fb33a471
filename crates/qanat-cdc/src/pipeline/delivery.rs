//! Which records the bus has acknowledged, without a future or a channel message per record.
//!
//! Every record gets a sequence number when it is handed to librdkafka (the number is its
//! delivery opaque, so nothing is allocated for it); librdkafka's delivery callback marks it.
//! Invariant: every record numbered below [`DeliveryState::acked`] is acknowledged by the bus.
//! Records of different partitions are acknowledged in any order; the out-of-order ones wait in
//! a window until the gap before them closes. A waiter names the number it needs acknowledged
//! and is woken once, when the callback moves `acked` past it (or a delivery fails).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::Notify;

#[derive(Default)]
pub(super) struct DeliveryState {
    /// Every record numbered below this is acknowledged.
    pub acked: u64,
    /// `window[i]`: record `acked + i` is acknowledged (out of order). `window[0]` is false.
    window: VecDeque<bool>,
    /// The first failed delivery: its topic and error.
    pub failed: Option<(String, KafkaError)>,
    /// Wake the waiters once `acked` reaches this.
    wake_at: u64,
}

impl DeliveryState {
    fn mark(&mut self, seq: u64) {
        if seq == self.acked && self.window.is_empty() {
            self.acked += 1;
            return;
        }
        let Some(offset) = seq.checked_sub(self.acked) else {
            return;
        };
        let offset = offset as usize;
        if self.window.len() <= offset {
            self.window.resize(offset + 1, false);
        }
        self.window[offset] = true;
        while self.window.front() == Some(&true) {
            self.window.pop_front();
            self.acked += 1;
        }
    }
}

/// Shared by the producer's delivery callback and the tasks that wait for acknowledgements.
pub(super) struct Deliveries {
    next_seq: AtomicU64,
    state: parking_lot::Mutex<DeliveryState>,
    notify: Notify,
}

impl Deliveries {
    pub fn new() -> Arc<Self> {
        Arc::new(Deliveries {
            next_seq: AtomicU64::new(0),
            state: parking_lot::Mutex::new(DeliveryState {
                wake_at: u64::MAX,
                ..DeliveryState::default()
            }),
            notify: Notify::new(),
        })
    }

    /// The number of the next record; every record produced before this call is below it.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire)
    }

    /// A number for a record about to be produced.
    pub fn take_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::AcqRel)
    }

    /// Look at the state under its lock.
    pub fn with<T>(&self, f: impl FnOnce(&mut DeliveryState) -> T) -> T {
        f(&mut self.state.lock())
    }

    /// Wait until every record numbered below `seq` is acknowledged, or one failed.
    pub async fn wait_acked(&self, seq: u64) -> Result<(), (String, KafkaError)> {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.state.lock();
                if let Some((topic, error)) = &st.failed {
                    return Err((topic.clone(), error.clone()));
                }
                if st.acked >= seq {
                    return Ok(());
                }
                st.wake_at = st.wake_at.min(seq);
            }
            notified.await;
        }
    }

    /// Wake whoever waits (a new condition to look at, e.g. shutdown).
    pub fn wake(&self) {
        self.notify.notify_waiters();
    }

    /// Register interest in `acked` reaching `seq`, and a future that resolves on the next
    /// wake-up; the caller checks its condition after `enable`.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    pub fn wake_at(&self, st: &mut DeliveryState, seq: u64) {
        st.wake_at = st.wake_at.min(seq);
    }

    /// A numbered record librdkafka refused to take: it counts as a failed delivery.
    pub fn not_sent(&self, seq: u64, topic: &str, error: KafkaError) {
        self.delivered(seq, Some((topic.to_string(), error)));
    }

    fn delivered(&self, seq: u64, failure: Option<(String, KafkaError)>) {
        let wake = {
            let mut st = self.state.lock();
            match failure {
                None => st.mark(seq),
                Some(f) => {
                    st.failed.get_or_insert(f);
                    st.wake_at = 0;
                }
            }
            let wake = st.acked >= st.wake_at;
            if wake {
                st.wake_at = u64::MAX;
            }
            wake
        };
        if wake {
            self.notify.notify_waiters();
        }
    }
}

/// The producer's context: delivery reports go to [`Deliveries`].
pub(super) struct AckContext(pub Arc<Deliveries>);

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let failure = match result {
            Ok(_) => None,
            Err((error, message)) => Some((message.topic().to_string(), error.clone())),
        };
        self.0.delivered(seq as u64, failure);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_moves_only_over_closed_gaps() {
        let mut st = DeliveryState::default();
        st.mark(1);
        st.mark(3);
        assert_eq!(st.acked, 0);
        st.mark(0);
        assert_eq!(st.acked, 2);
        st.mark(2);
        assert_eq!(st.acked, 4);
        st.mark(4);
        assert_eq!(st.acked, 5);
        assert!(st.window.is_empty());
        // A repeated report of an acknowledged record changes nothing.
        st.mark(1);
        assert_eq!(st.acked, 5);
    }

    #[tokio::test]
    async fn a_record_not_sent_fails_the_waiters_past_it() {
        let deliveries = Deliveries::new();
        let first = deliveries.take_seq();
        let refused = deliveries.take_seq();
        deliveries.delivered(first, None);
        deliveries.not_sent(refused, "t", KafkaError::Canceled);
        let after = deliveries.take_seq();
        let waited = deliveries.wait_acked(after + 1).await;
        assert!(matches!(waited, Err((topic, KafkaError::Canceled)) if topic == "t"));
        assert_eq!(deliveries.with(|st| st.acked), 1);
    }
}
