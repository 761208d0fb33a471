//! Routing (D4): rules map (app, event type, priority) to a route; each route owns a bounded
//! buffer, a pump task and its own librdkafka producer, so a route whose topic or broker is
//! slow fills only its own buffer and librdkafka queue — requests for it get 503 while the
//! other routes keep flowing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{CollectConfig, Priority, RouteConfig};
use crate::error::CollectError;

/// One event ready for the bus.
#[derive(Debug)]
pub struct Record {
    /// Visitor id: one visitor's events land in one partition, in order.
    pub key: String,
    /// The enriched event as JSON.
    pub value: Vec<u8>,
    pub timestamp_ms: i64,
}

pub struct Route {
    pub name: String,
    pub topic: String,
    apps: Vec<String>,
    events: Vec<String>,
    priorities: Vec<Priority>,
    pub capacity: usize,
    pub tx: mpsc::Sender<Record>,
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
        self.capacity - self.tx.capacity()
    }
}

pub struct Routes {
    routes: Vec<Route>,
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
        let timeout = Duration::from_millis(cfg.server.shutdown_timeout_ms);
        for rc in &cfg.routes {
            let producer = producer_for(cfg, rc)?;
            let (tx, rx) = mpsc::channel(rc.buffer);
            let label = rc.name.clone();
            routes.push(Route {
                name: rc.name.clone(),
                topic: rc.topic.clone(),
                apps: rc.apps.clone(),
                events: rc.events.clone(),
                priorities: rc.priorities.clone(),
                capacity: rc.buffer,
                tx,
                accepted: metrics::counter!("qanat_collect_route_events_total", "route" => label.clone(), "outcome" => "accepted"),
                full: metrics::counter!("qanat_collect_route_events_total", "route" => label, "outcome" => "full"),
            });
            let pump = Pump {
                route: rc.name.clone(),
                topic: rc.topic.clone(),
                rx,
                producer,
                shutdown: shutdown.clone(),
                timeout,
                buffered: metrics::gauge!("qanat_collect_route_buffered", "route" => rc.name.clone()),
            };
            pumps.push(tokio::spawn(pump.run()));
        }
        Ok((Routes { routes }, pumps))
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

struct Pump {
    route: String,
    topic: String,
    rx: mpsc::Receiver<Record>,
    producer: ThreadedProducer<Delivery>,
    shutdown: watch::Receiver<bool>,
    timeout: Duration,
    buffered: metrics::Gauge,
}

impl Pump {
    async fn run(mut self) -> DrainReport {
        let mut batch = Vec::with_capacity(1024);
        let mut drain_deadline: Option<Instant> = None;
        let mut dropped = 0u64;
        loop {
            let n = if drain_deadline.is_some() {
                self.rx.recv_many(&mut batch, 1024).await
            } else {
                tokio::select! {
                    n = self.rx.recv_many(&mut batch, 1024) => n,
                    _ = self.shutdown.wait_for(|s| *s) => {
                        // No new events; what is buffered still goes out.
                        self.rx.close();
                        drain_deadline = Some(Instant::now() + self.timeout);
                        continue;
                    }
                }
            };
            if n == 0 {
                break;
            }
            for rec in batch.drain(..) {
                if !self.send(rec, drain_deadline).await {
                    dropped += 1;
                }
            }
            self.buffered.set(self.rx.len() as f64);
        }
        self.buffered.set(0.0);
        let producer = self.producer;
        let timeout = drain_deadline.map_or(self.timeout, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let route = self.route;
        let report = tokio::task::spawn_blocking(move || {
            if let Err(e) = producer.flush(timeout) {
                tracing::error!(%route, error = %e, "flush on shutdown did not finish");
            }
            let ctx = producer.context();
            DrainReport {
                route,
                delivered: ctx.delivered.load(Ordering::Relaxed),
                failed: ctx.failed.load(Ordering::Relaxed),
                undelivered: u64::try_from(producer.in_flight_count()).unwrap_or(0) + dropped,
            }
        })
        .await;
        match report {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "drain task failed");
                DrainReport {
                    route: String::new(),
                    delivered: 0,
                    failed: 0,
                    undelivered: dropped,
                }
            }
        }
    }

    /// Hand one record to librdkafka, waiting while its queue is full (that wait is what
    /// fills this route's buffer). False if the record was dropped.
    async fn send(&self, rec: Record, deadline: Option<Instant>) -> bool {
        loop {
            let record = BaseRecord::to(&self.topic)
                .key(rec.key.as_bytes())
                .payload(&rec.value)
                .timestamp(rec.timestamp_ms);
            match self.producer.send(record) {
                Ok(()) => return true,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
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
