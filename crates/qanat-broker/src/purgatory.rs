//! Long polls waiting for appends, keyed by partition (Kafka's delayed-fetch purgatory).
//!
//! A fetch that cannot answer yet (or a push subscription with nothing new) registers one
//! [`Watch`] on the partitions it reads. An append adds its bytes to the watches of its own
//! partition only, and wakes a watch once the bytes added since its last look could make up
//! what that look lacked (a fetch's `min_bytes` less what it found). So a produce to partition
//! A never wakes a long poll on B, and a fetch with a large `min_bytes` sleeps through appends
//! too small to complete it, as Kafka's `DelayedFetch` does.
//!
//! Invariants:
//! - No append is missed. A watch counts every byte appended to its partitions from its
//!   registration on; a look taken before the registration is checked against the
//!   partitions' high watermarks right after it ([`Watch::grown_since`]); later looks are
//!   preceded by a [`Watch::mark`], and the wait is for bytes counted after the mark. Bytes
//!   appended during a look may be counted both in the look and after the mark: that costs
//!   an early wake-up and another look, never a missed one.
//! - Bytes are counted when they become visible to readers: after the append, or after the
//!   fdatasync that covers it when readers are served durable data only.
//! - A watch leaves every list it joined when dropped (answered, timed out or cancelled), so
//!   the lists hold only waiting long polls.
//! - Deleting topics wakes every watch ([`Purgatory::wake_all`]): its fetch answers with the
//!   error at its next look.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use qanat_log::Partition;
use tokio::sync::Notify;

/// A partition, by the address of its shared state. A deleted partition's address may be
/// reused by a new one: its stale watches then get an early wake-up at most.
type Key = usize;

fn key(partition: &Arc<Partition>) -> Key {
    Arc::as_ptr(partition) as Key
}

/// The waiting watches of every partition.
#[derive(Default)]
pub struct Purgatory {
    watches: Mutex<HashMap<Key, Vec<Arc<Watcher>>>>,
}

struct Watcher {
    /// Bytes appended to the watched partitions since the registration.
    arrived: AtomicU64,
    /// Wake once `arrived` reaches this; `u64::MAX` while not waiting.
    wake_at: AtomicU64,
    /// Set by [`Purgatory::wake_all`]: the next wait ends whatever was counted.
    released: AtomicBool,
    woken: Notify,
}

impl Watcher {
    fn add(&self, bytes: u64) {
        let arrived = self
            .arrived
            .fetch_add(bytes, Ordering::SeqCst)
            .saturating_add(bytes);
        if arrived >= self.wake_at.load(Ordering::SeqCst) {
            // Stores a permit when the waiter is between its check and its await.
            self.woken.notify_one();
        }
    }
}

/// Bytes counted by a watch at some moment: taken before a look, the base of the next wait.
#[derive(Clone, Copy, Debug)]
pub struct Mark(u64);

impl Purgatory {
    /// Register a watch on `partitions` (each at most once).
    pub fn watch<'a>(&self, partitions: impl IntoIterator<Item = &'a Arc<Partition>>) -> Watch<'_> {
        let watcher = Arc::new(Watcher {
            arrived: AtomicU64::new(0),
            wake_at: AtomicU64::new(u64::MAX),
            released: AtomicBool::new(false),
            woken: Notify::new(),
        });
        let mut keys: Vec<(Key, Arc<Partition>)> = Vec::new();
        for p in partitions {
            let k = key(p);
            if !keys.iter().any(|(seen, _)| *seen == k) {
                keys.push((k, p.clone()));
            }
        }
        {
            let mut watches = self.watches.lock();
            for (k, _) in &keys {
                watches.entry(*k).or_default().push(watcher.clone());
            }
        }
        metrics::gauge!("qanat_fetch_purgatory_watches").increment(1.0);
        Watch {
            purgatory: self,
            watcher,
            partitions: keys,
        }
    }

    /// `bytes` became visible in each of the partitions: wake the watches they complete.
    pub fn appended<'a>(&self, appends: impl IntoIterator<Item = (&'a Arc<Partition>, u64)>) {
        let watches = self.watches.lock();
        if watches.is_empty() {
            return;
        }
        for (partition, bytes) in appends {
            if bytes == 0 {
                continue;
            }
            if let Some(list) = watches.get(&key(partition)) {
                for w in list {
                    w.add(bytes);
                }
            }
        }
    }

    /// Wake every watch (topics deleted: their fetches answer with an error).
    pub fn wake_all(&self) {
        for list in self.watches.lock().values() {
            for w in list {
                w.released.store(true, Ordering::SeqCst);
                w.woken.notify_one();
            }
        }
    }

    /// Partitions with at least one watch (tests, gauges).
    pub fn watched_partitions(&self) -> usize {
        self.watches.lock().len()
    }
}

/// One long poll's registration; leaves the purgatory when dropped.
pub struct Watch<'a> {
    purgatory: &'a Purgatory,
    watcher: Arc<Watcher>,
    /// The watched partitions, each once (kept alive so their keys stay theirs).
    partitions: Vec<(Key, Arc<Partition>)>,
}

impl Watch<'_> {
    /// The bytes counted so far; take it before a look.
    pub fn mark(&self) -> Mark {
        Mark(self.watcher.arrived.load(Ordering::SeqCst))
    }

    /// Whether any watched partition's high watermark passed what a look saw before this
    /// watch was registered (`seen`: the watermark the look read, per partition).
    pub fn grown_since(&self, seen: impl Fn(&Arc<Partition>) -> Option<i64>) -> bool {
        self.partitions
            .iter()
            .any(|(_, p)| seen(p).is_some_and(|hw| p.high_watermark() > hw))
    }

    /// Wait until `need` bytes were counted after `mark` (at least one). Cancel safe.
    pub async fn appended(&self, mark: Mark, need: u64) {
        let target = mark.0.saturating_add(need.max(1));
        let w = &self.watcher;
        w.wake_at.store(target, Ordering::SeqCst);
        // Appends counted before `wake_at` was set did not notify; a permit left from an
        // earlier wait only makes the condition be checked again.
        while w.arrived.load(Ordering::SeqCst) < target && !w.released.swap(false, Ordering::SeqCst)
        {
            w.woken.notified().await;
        }
        w.wake_at.store(u64::MAX, Ordering::SeqCst);
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut watches = self.purgatory.watches.lock();
        for (k, _) in &self.partitions {
            if let Some(list) = watches.get_mut(k) {
                list.retain(|w| !Arc::ptr_eq(w, &self.watcher));
                if list.is_empty() {
                    watches.remove(k);
                }
            }
        }
        drop(watches);
        metrics::gauge!("qanat_fetch_purgatory_watches").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Waker};

    use super::*;
    use crate::api::testing::broker;
    use crate::Config;

    /// Two partitions of one topic.
    fn partitions() -> (Arc<Partition>, Arc<Partition>) {
        let (broker, _) = broker(Config::default());
        broker.topics.create("t", 2, false).expect("create");
        let t = broker.topics.get("t").expect("created");
        (t.partitions[0].clone(), t.partitions[1].clone())
    }

    fn ready(f: std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    #[test]
    fn appends_wake_only_the_watches_of_their_partition() {
        let (a, b) = partitions();
        let purgatory = Purgatory::default();
        let watch = purgatory.watch([&a]);
        let mark = watch.mark();
        let mut wait = pin!(watch.appended(mark, 1));
        assert!(!ready(wait.as_mut()), "nothing appended yet");
        purgatory.appended([(&b, 500)]);
        assert!(
            !ready(wait.as_mut()),
            "an append to another partition woke the watch"
        );
        purgatory.appended([(&a, 1)]);
        assert!(
            ready(wait.as_mut()),
            "the append to the watched partition did not wake it"
        );
    }

    #[test]
    fn a_watch_sleeps_until_the_bytes_it_lacks_arrived() {
        let (a, b) = partitions();
        let purgatory = Purgatory::default();
        let watch = purgatory.watch([&a, &b, &a]);
        assert_eq!(purgatory.watched_partitions(), 2);
        let mark = watch.mark();
        let mut wait = pin!(watch.appended(mark, 1000));
        purgatory.appended([(&a, 400), (&b, 0)]);
        assert!(!ready(wait.as_mut()), "woken with 400 of 1000 bytes");
        purgatory.appended([(&b, 599)]);
        assert!(!ready(wait.as_mut()), "woken with 999 of 1000 bytes");
        purgatory.appended([(&a, 1)]);
        assert!(ready(wait.as_mut()));
        // Bytes counted before a mark do not count towards the next wait.
        let mark = watch.mark();
        let mut wait = pin!(watch.appended(mark, 10));
        assert!(!ready(wait.as_mut()));
        purgatory.appended([(&b, 10)]);
        assert!(ready(wait.as_mut()));
    }

    #[test]
    fn bytes_counted_before_the_wait_began_still_end_it() {
        let (a, _) = partitions();
        let purgatory = Purgatory::default();
        let watch = purgatory.watch([&a]);
        let mark = watch.mark();
        // Between the look (after the mark) and the wait: no waiter to notify yet.
        purgatory.appended([(&a, 5)]);
        let mut wait = pin!(watch.appended(mark, 5));
        assert!(ready(wait.as_mut()));
    }

    #[test]
    fn wake_all_ends_every_wait_and_dropped_watches_leave_no_trace() {
        let (a, b) = partitions();
        let purgatory = Purgatory::default();
        let first = purgatory.watch([&a]);
        let second = purgatory.watch([&b]);
        {
            let (m1, m2) = (first.mark(), second.mark());
            let mut w1 = pin!(first.appended(m1, 1));
            let mut w2 = pin!(second.appended(m2, 1));
            assert!(!ready(w1.as_mut()) && !ready(w2.as_mut()));
            purgatory.wake_all();
            assert!(ready(w1.as_mut()) && ready(w2.as_mut()));
        }
        assert_eq!(purgatory.watched_partitions(), 2);
        drop((first, second));
        assert_eq!(purgatory.watched_partitions(), 0);
    }
}
