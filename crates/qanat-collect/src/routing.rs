//! Routing (D4): rules map (app, event type, priority) to a route; each route owns a bounded
//! buffer, a pump task and its own librdkafka producer, so a route whose topic or broker is
//! slow fills only its own buffer and librdkafka queue — requests for it get 503 while the
//! other routes keep flowing.
//!
//! A route's buffer is one [`Chunk`] that requests append their records to, under a short
//! lock, and that the pump swaps for its emptied one. The two buffers go back and forth and
//! keep their capacity: handing a record over allocates nothing, wakes nobody while the pump
//! is busy, and never frees on one thread memory allocated on another (which makes the
//! allocator's per-thread arenas contend).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::ffi::{c_void, CString};

use parking_lot::{Condvar, Mutex};
use rdkafka::bindings as rdsys;
use rdkafka::bindings::rd_kafka_vtype_t::{
    RD_KAFKA_VTYPE_END, RD_KAFKA_VTYPE_KEY, RD_KAFKA_VTYPE_MSGFLAGS, RD_KAFKA_VTYPE_RKT,
    RD_KAFKA_VTYPE_TIMESTAMP, RD_KAFKA_VTYPE_VALUE,
};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::{CollectConfig, Priority, RouteConfig};
use crate::error::{CollectError, ConfigError};

/// Where one record lies in its chunk's buffer: the value, then the key.
#[derive(Clone, Copy, Debug)]
struct Entry {
    start: usize,
    key_start: usize,
    end: usize,
    timestamp_ms: i64,
}

/// Records for one route from one request, in one buffer (one allocation per request, not
/// per event).
#[derive(Debug, Default)]
pub struct Chunk {
    buf: Vec<u8>,
    entries: Vec<Entry>,
}

impl Chunk {
    /// Room for `records` records of `bytes` bytes in all.
    pub fn with_capacity(bytes: usize, records: usize) -> Chunk {
        Chunk {
            buf: Vec::with_capacity(bytes),
            entries: Vec::with_capacity(records),
        }
    }

    /// Add one record: `write` appends the value (the enriched event as JSON) to the buffer
    /// it is given; `key` is the visitor id (one visitor's events land in one partition, in
    /// order). When `write` fails, the chunk is left as it was.
    pub fn push<E>(
        &mut self,
        key: &str,
        timestamp_ms: i64,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.buf.len();
        if let Err(e) = write(&mut self.buf) {
            self.buf.truncate(start);
            return Err(e);
        }
        let key_start = self.buf.len();
        self.buf.extend_from_slice(key.as_bytes());
        self.entries.push(Entry {
            start,
            key_start,
            end: self.buf.len(),
            timestamp_ms,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Empty, keeping the capacity.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.entries.clear();
    }

    /// Add copies of `other`'s records after these.
    fn append(&mut self, other: &Chunk) {
        let base = self.buf.len();
        self.buf.extend_from_slice(&other.buf);
        self.entries.extend(other.entries.iter().map(|e| Entry {
            start: e.start + base,
            key_start: e.key_start + base,
            end: e.end + base,
            timestamp_ms: e.timestamp_ms,
        }));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (key, value, timestamp) of each record, in order.
    pub fn records(&self) -> impl Iterator<Item = (&[u8], &[u8], i64)> {
        self.entries.iter().map(|e| {
            let key = self.buf.get(e.key_start..e.end).unwrap_or_default();
            let value = self.buf.get(e.start..e.key_start).unwrap_or_default();
            (key, value, e.timestamp_ms)
        })
    }
}

/// Why a route did not take a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The buffer has no room for that many events.
    Full,
    /// The route is shutting down.
    Closed,
}

pub struct Route {
    pub name: String,
    pub topic: String,
    apps: Vec<String>,
    events: Vec<String>,
    priorities: Vec<Priority>,
    pub capacity: usize,
    buffer: Arc<Buffer>,
    /// Events in `buffer` or reserved for it; at most `capacity`.
    queued: Arc<AtomicUsize>,
    pub accepted: metrics::Counter,
    pub full: metrics::Counter,
}

impl Route {
    fn matches(&self, app: &str, ty: &str, priority: Priority) -> bool {
        (self.apps.is_empty() || self.apps.iter().any(|a| a == app))
            && (self.events.is_empty() || self.events.iter().any(|e| e == ty))
            && (self.priorities.is_empty() || self.priorities.contains(&priority))
    }

    /// Events waiting in this route's buffer.
    pub fn buffered(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Take room for `n` events in the buffer, all or nothing.
    pub fn try_reserve(&self, n: usize) -> Result<(), Refused> {
        if self.buffer.is_closed() {
            return Err(Refused::Closed);
        }
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                q.checked_add(n).filter(|&t| t <= self.capacity)
            })
            .map(|_| ())
            .map_err(|_| Refused::Full)
    }

    /// Give back room taken with [`Route::try_reserve`] and not used.
    pub fn release(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }

    /// Hand over (a copy of) a chunk whose room was reserved with [`Route::try_reserve`].
    pub fn send_reserved(&self, chunk: &Chunk) -> Result<(), Refused> {
        self.buffer
            .append(chunk)
            .inspect_err(|_| self.release(chunk.len()))
    }

    /// Reserve room for the chunk and hand (a copy of) it over.
    pub fn try_send(&self, chunk: &Chunk) -> Result<(), Refused> {
        self.try_reserve(chunk.len())?;
        self.send_reserved(chunk)
    }
}

impl Drop for Route {
    /// The pump drains what is buffered and stops, also when the collector is dropped
    /// without a shutdown.
    fn drop(&mut self) {
        self.buffer.close();
    }
}

/// A route's buffer: records handed over and not yet taken by the pump.
#[derive(Default)]
struct Buffer {
    /// `pending.closed`, readable without the lock.
    closed: AtomicBool,
    pending: Mutex<Pending>,
    /// Signalled when records arrive while the pump waits, and on close.
    arrived: Condvar,
}

#[derive(Default)]
struct Pending {
    records: Chunk,
    /// Shutdown: take nothing new; the pump drains what is here.
    closed: bool,
    /// The pump is waiting on `arrived` (else it looks again by itself).
    pump_waiting: bool,
}

impl Buffer {
    fn append(&self, chunk: &Chunk) -> Result<(), Refused> {
        let mut p = self.pending.lock();
        if p.closed {
            return Err(Refused::Closed);
        }
        p.records.append(chunk);
        if p.pump_waiting {
            p.pump_waiting = false;
            self.arrived.notify_one();
        }
        Ok(())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        let mut p = self.pending.lock();
        p.closed = true;
        self.closed.store(true, Ordering::Release);
        self.arrived.notify_one();
    }

    /// Swap what is buffered with `into` (emptied), waiting while there is nothing; false
    /// once closed and drained. `closed` tells whether the buffer is closed.
    fn take(&self, into: &mut Chunk, closed: &mut bool) -> bool {
        into.clear();
        let mut p = self.pending.lock();
        while p.records.is_empty() && !p.closed {
            p.pump_waiting = true;
            self.arrived.wait(&mut p);
        }
        p.pump_waiting = false;
        *closed = p.closed;
        std::mem::swap(&mut p.records, into);
        !into.is_empty()
    }

    fn is_empty(&self) -> bool {
        self.pending.lock().records.is_empty()
    }
}

pub struct Routes {
    routes: Vec<Route>,
    /// Notified whenever a pump has taken records out of its buffer (and on close).
    room: Arc<Notify>,
}

/// What one route's pump did after shutdown was requested.
#[derive(Debug)]
pub struct DrainReport {
    pub route: String,
    pub delivered: u64,
    pub failed: u64,
    /// Accepted but neither delivered nor failed when the shutdown timeout passed.
    pub undelivered: u64,
}

impl Routes {
    /// Create every route's producer and start its pump. Pumps drain and exit once
    /// `shutdown` turns true.
    pub fn start(
        cfg: &CollectConfig,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(Routes, Vec<JoinHandle<DrainReport>>), CollectError> {
        let mut routes = Vec::with_capacity(cfg.routes.len());
        let mut pumps = Vec::with_capacity(cfg.routes.len());
        let room = Arc::new(Notify::new());
        let timeout = Duration::from_millis(cfg.server.shutdown_timeout_ms);
        for rc in &cfg.routes {
            let producer = producer_for(cfg, rc)?;
            let buffer = Arc::new(Buffer::default());
            let queued = Arc::new(AtomicUsize::new(0));
            let label = rc.name.clone();
            routes.push(Route {
                name: rc.name.clone(),
                topic: rc.topic.clone(),
                apps: rc.apps.clone(),
                events: rc.events.clone(),
                priorities: rc.priorities.clone(),
                capacity: rc.buffer,
                buffer: buffer.clone(),
                queued: queued.clone(),
                accepted: metrics::counter!("qanat_collect_route_events_total", "route" => label.clone(), "outcome" => "accepted"),
                full: metrics::counter!("qanat_collect_route_events_total", "route" => label, "outcome" => "full"),
            });
            let pump = Pump {
                route: rc.name.clone(),
                topic: rc.topic.clone(),
                buffer: buffer.clone(),
                queued,
                room: room.clone(),
                producer,
                timeout,
                buffered: metrics::gauge!("qanat_collect_route_buffered", "route" => rc.name.clone()),
            };
            let mut stop = shutdown.clone();
            let closed = room.clone();
            tokio::spawn(async move {
                // Also when the collector is dropped without a shutdown.
                let _ = stop.wait_for(|s| *s).await;
                buffer.close();
                // Requests waiting for room find the route closed.
                closed.notify_waiters();
            });
            pumps.push(tokio::task::spawn_blocking(move || pump.run()));
        }
        Ok((Routes { routes, room }, pumps))
    }

    /// Resolves once some pump takes records out of its buffer (enable it before looking
    /// for room, so room freed meanwhile is not missed).
    pub fn room_freed(&self) -> Notified<'_> {
        self.room.notified()
    }

    /// Reserve room for `counts[i]` events on route `i`, for every route or none: the first
    /// route that refused, and why.
    pub fn try_reserve_all(
        &self,
        counts: impl Iterator<Item = usize> + Clone,
    ) -> Result<(), (usize, Refused)> {
        for (idx, n) in counts.clone().enumerate() {
            let Some(route) = self.routes.get(idx) else {
                break;
            };
            if n == 0 {
                continue;
            }
            if let Err(why) = route.try_reserve(n) {
                for (prev, m) in counts.take(idx).enumerate() {
                    if let (Some(r), true) = (self.routes.get(prev), m > 0) {
                        r.release(m);
                    }
                }
                return Err((idx, why));
            }
        }
        Ok(())
    }

    /// The first route whose rule matches.
    pub fn find(&self, app: &str, ty: &str, priority: Priority) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.matches(app, ty, priority))
    }

    pub fn get(&self, idx: usize) -> Option<&Route> {
        self.routes.get(idx)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn producer_for(
    cfg: &CollectConfig,
    rc: &RouteConfig,
) -> Result<ThreadedProducer<Delivery>, CollectError> {
    let mut cc = ClientConfig::new();
    // Defaults tuned for many small records; every key can be overridden.
    cc.set("bootstrap.servers", &cfg.kafka.bootstrap)
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("batch.num.messages", "10000")
        .set("client.id", format!("qanat-collect-{}", rc.name));
    cfg.kafka
        .security
        .apply("kafka.security", &mut cc)
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    for (k, v) in cfg.kafka.properties.iter().chain(&rc.kafka) {
        cc.set(k, v);
    }
    let ctx = Delivery {
        route: rc.name.clone(),
        delivered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        ok: metrics::counter!("qanat_collect_produced_total", "route" => rc.name.clone(), "result" => "ok"),
        err: metrics::counter!("qanat_collect_produced_total", "route" => rc.name.clone(), "result" => "error"),
    };
    cc.create_with_context(ctx)
        .map_err(|source| CollectError::Producer {
            route: rc.name.clone(),
            source,
        })
}

/// Counts acknowledgements; librdkafka calls it from the producer's poll thread.
pub struct Delivery {
    route: String,
    delivered: AtomicU64,
    failed: AtomicU64,
    ok: metrics::Counter,
    err: metrics::Counter,
}

impl ClientContext for Delivery {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(route = %self.route, %error, reason, "producer error");
    }
}

impl ProducerContext for Delivery {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                self.ok.increment(1);
            }
            Err((e, _)) => {
                let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
                self.err.increment(1);
                // 1st, 2nd, 4th, 8th … failure: visible without flooding the log.
                if n.is_power_of_two() {
                    tracing::error!(route = %self.route, error = %e, failed = n, "event not delivered to the broker");
                }
            }
        }
    }
}

/// A librdkafka topic handle, made once per pump: `BaseProducer::send` allocates the topic's
/// name and looks the topic up for every record.
struct TopicHandle<'p> {
    rkt: *mut rdsys::rd_kafka_topic_t,
    producer: &'p ThreadedProducer<Delivery>,
}

impl<'p> TopicHandle<'p> {
    fn new(producer: &'p ThreadedProducer<Delivery>, topic: &str) -> Option<TopicHandle<'p>> {
        let name = CString::new(topic).ok()?;
        // SAFETY: a live producer and a NUL-terminated name; a null conf takes the defaults.
        let rkt = unsafe {
            rdsys::rd_kafka_topic_new(
                producer.client().native_ptr(),
                name.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        (!rkt.is_null()).then_some(TopicHandle { rkt, producer })
    }

    /// One record, copied by librdkafka (`RD_KAFKA_MSG_F_COPY`) before this returns.
    fn produce(&self, key: &[u8], value: &[u8], timestamp_ms: i64) -> Result<(), KafkaError> {
        // SAFETY: the vararg list follows `rd_kafka_producev`'s contract (a type tag, then that
        // tag's arguments, ending with END); the slices outlive the call, which copies them.
        // No opaque: the delivery callback's `()` opaque reads nothing.
        let err = unsafe {
            rdsys::rd_kafka_producev(
                self.producer.client().native_ptr(),
                RD_KAFKA_VTYPE_RKT,
                self.rkt,
                RD_KAFKA_VTYPE_MSGFLAGS,
                rdsys::RD_KAFKA_MSG_F_COPY,
                RD_KAFKA_VTYPE_VALUE,
                value.as_ptr() as *mut c_void,
                value.len(),
                RD_KAFKA_VTYPE_KEY,
                key.as_ptr() as *const c_void,
                key.len(),
                RD_KAFKA_VTYPE_TIMESTAMP,
                timestamp_ms,
                RD_KAFKA_VTYPE_END,
            )
        };
        if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            Ok(())
        } else {
            Err(KafkaError::MessageProduction(err.into()))
        }
    }
}

impl Drop for TopicHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: made by `rd_kafka_topic_new` and destroyed once, while the producer (which
        // it borrows) is alive; records in flight hold references of their own.
        unsafe { rdsys::rd_kafka_topic_destroy(self.rkt) }
    }
}

/// How long a busy pump lets requests accumulate before looking at its buffer again. While it
/// waits, handing over a chunk wakes no thread: under load the pump wakes about once per
/// pause instead of once per request. Each wake is a sleep and a context switch (at 500 µs
/// they were about a quarter of the pump's CPU under beacon load), so the pause is as long
/// as it can be while staying below the producer's own `linger.ms` (5 ms), which holds the
/// records anyway.
const PUMP_COALESCE: Duration = Duration::from_millis(2);

/// Hands a route's records to librdkafka, on a thread of its own: handing over is the
/// collector's busiest step, and on its own thread it never holds up HTTP tasks.
struct Pump {
    route: String,
    topic: String,
    buffer: Arc<Buffer>,
    queued: Arc<AtomicUsize>,
    room: Arc<Notify>,
    producer: ThreadedProducer<Delivery>,
    timeout: Duration,
    buffered: metrics::Gauge,
}

impl Pump {
    fn run(self) -> DrainReport {
        let handle = TopicHandle::new(&self.producer, &self.topic);
        let mut drain_deadline: Option<Instant> = None;
        let mut dropped = 0u64;
        let mut batch = Chunk::default();
        let mut closed = false;
        // Blocks only when the buffer is empty; false once closed and drained.
        while self.buffer.take(&mut batch, &mut closed) {
            if closed && drain_deadline.is_none() {
                // No new events; what is buffered still goes out.
                drain_deadline = Some(Instant::now() + self.timeout);
            }
            // Out of the buffer (as a record received from a channel would be).
            self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
            self.room.notify_waiters();
            for (key, value, timestamp_ms) in batch.records() {
                if !self.send(handle.as_ref(), key, value, timestamp_ms, drain_deadline) {
                    dropped += 1;
                }
            }
            self.buffered
                .set(self.queued.load(Ordering::Relaxed) as f64);
            if drain_deadline.is_none() && self.buffer.is_empty() {
                // Let the next requests gather (appending wakes nobody meanwhile), then take
                // them all; wait only if none came.
                std::thread::sleep(PUMP_COALESCE);
            }
        }
        self.buffered.set(0.0);
        drop(handle);
        let timeout = drain_deadline.map_or(self.timeout, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if let Err(e) = self.producer.flush(timeout) {
            tracing::error!(route = %self.route, error = %e, "flush on shutdown did not finish");
        }
        let ctx = self.producer.context();
        DrainReport {
            delivered: ctx.delivered.load(Ordering::Relaxed),
            failed: ctx.failed.load(Ordering::Relaxed),
            undelivered: u64::try_from(self.producer.in_flight_count()).unwrap_or(0) + dropped,
            route: self.route,
        }
    }

    /// Hand one record to librdkafka, waiting while its queue is full (that wait is what
    /// fills this route's buffer). False if the record was dropped.
    fn send(
        &self,
        handle: Option<&TopicHandle<'_>>,
        key: &[u8],
        value: &[u8],
        timestamp_ms: i64,
        deadline: Option<Instant>,
    ) -> bool {
        loop {
            let sent = match handle {
                Some(h) => h.produce(key, value, timestamp_ms),
                None => {
                    let record = BaseRecord::to(&self.topic)
                        .key(key)
                        .payload(value)
                        .timestamp(timestamp_ms);
                    self.producer.send(record).map_err(|(e, _)| e)
                }
            };
            match sent {
                Ok(()) => return true,
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    tracing::error!(route = %self.route, error = %e, "producer refused an event");
                    self.producer
                        .context()
                        .failed
                        .fetch_add(1, Ordering::Relaxed);
                    self.producer.context().err.increment(1);
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn chunk(records: &[(&str, &str, i64)]) -> Chunk {
        let mut c = Chunk::default();
        for (key, value, ts) in records {
            c.push(key, *ts, |out| {
                out.extend_from_slice(value.as_bytes());
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        c
    }

    fn records(c: &Chunk) -> Vec<(String, String, i64)> {
        c.records()
            .map(|(k, v, ts)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                    ts,
                )
            })
            .collect()
    }

    #[test]
    fn the_buffer_hands_over_records_in_order_and_drains_after_close() {
        let buffer = Buffer::default();
        buffer
            .append(&chunk(&[("v1", "a", 1), ("v2", "bb", 2)]))
            .unwrap();
        buffer.append(&chunk(&[("v3", "ccc", 3)])).unwrap();
        let mut taken = chunk(&[("stale", "x", 0)]);
        let mut closed = true;
        assert!(buffer.take(&mut taken, &mut closed));
        assert!(!closed);
        assert_eq!(
            records(&taken),
            [
                ("v1".into(), "a".into(), 1),
                ("v2".into(), "bb".into(), 2),
                ("v3".into(), "ccc".into(), 3)
            ]
        );
        assert!(buffer.is_empty());

        // What was handed over before the close still goes out; nothing after it is taken.
        buffer.append(&chunk(&[("v4", "d", 4)])).unwrap();
        buffer.close();
        assert!(buffer.is_closed());
        assert_eq!(
            buffer.append(&chunk(&[("v5", "e", 5)])),
            Err(Refused::Closed)
        );
        assert!(buffer.take(&mut taken, &mut closed));
        assert!(closed);
        assert_eq!(records(&taken), [("v4".into(), "d".into(), 4)]);
        assert!(!buffer.take(&mut taken, &mut closed));
        assert!(taken.is_empty());
    }

    #[test]
    fn a_waiting_pump_wakes_for_records_and_for_the_close() {
        let buffer = Arc::new(Buffer::default());
        let pump = {
            let buffer = buffer.clone();
            std::thread::spawn(move || {
                let mut taken = Chunk::default();
                let mut closed = false;
                let mut got = Vec::new();
                while buffer.take(&mut taken, &mut closed) {
                    got.extend(records(&taken));
                }
                got
            })
        };
        for i in 0..100 {
            buffer.append(&chunk(&[("k", &i.to_string(), i)])).unwrap();
        }
        buffer.close();
        let got = pump.join().unwrap();
        let want: Vec<_> = (0..100)
            .map(|i| ("k".to_string(), i.to_string(), i))
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_pump_taking_records_wakes_requests_waiting_for_room() {
        let cfg: CollectConfig = toml::from_str(
            r#"
            [server]
            max_batch_events = 2
            shutdown_timeout_ms = 100
            [kafka]
            bootstrap = "127.0.0.1:1"
            [[routes]]
            name = "r"
            topic = "t"
            buffer = 2
            "#,
        )
        .unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        let (routes, _pumps) = Routes::start(&cfg, &stop_rx).unwrap();
        let two = chunk(&[("v1", "a", 1), ("v2", "b", 2)]);
        // Full (unless the pump already took them, which frees the room and notifies too).
        let room = routes.room_freed();
        tokio::pin!(room);
        room.as_mut().enable();
        routes.get(0).unwrap().try_send(&two).unwrap();
        // A hang guard, not a timing assertion: without a notification this never resolves.
        tokio::time::timeout(Duration::from_secs(120), room)
            .await
            .expect("no notification that room was freed");
        assert_eq!(routes.try_reserve_all([2].into_iter()), Ok(()));
        assert_eq!(
            routes.try_reserve_all([1].into_iter()),
            Err((0, Refused::Full))
        );
    }
}
