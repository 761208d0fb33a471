//! The Qanat broker: a single-node server that speaks the Kafka wire protocol over
//! [`qanat_log`] partitions (spec A1–A5, A8).
//!
//! Owns: the TCP listener and connections ([`server`]), request framing and zero-copy responses
//! ([`wire`], [`fetch_response`]), the low-priority threads that send fetched records
//! ([`serving`]), one module per Kafka API ([`api`]), long polls waiting for
//! appends on their partitions ([`purgatory`]), the topic registry
//! ([`topics`]), the open-file limit ([`fdlimit`]), configuration ([`config`]), records read
//! as bounded streams from batches ([`records`]), the data directory's lock
//! ([`data_dir_lock`]) and the background maintenance (periodic fsync and write-back between
//! fsyncs, segment rolling, retention).
//!
//! Wire format: Kafka request/response frames (`int32` length prefix, request header v1/v2,
//! response header v0/v1) decoded and encoded with `kafka-protocol`, except FetchResponse,
//! whose record batches are sent from the segment files with `sendfile`. Record batches
//! (RecordBatch v2) are never re-encoded: what a producer sent is what a consumer receives.
//!
//! Invariants:
//! - One process at a time owns a data directory: the `qanat broker` command holds its
//!   [`data_dir_lock`] while it runs, and offline edits of its files take the same lock.
//! - A produce is acknowledged only after every batch of it is appended, and with
//!   `fsync = "always"` only after an fdatasync covers it (group commit across producers).
//! - Responses on one connection leave in request order; requests on one connection are
//!   appended in the order they arrived.
//! - Fetched records are sent by the serving threads at a lowered priority (when on), so
//!   readers yield the CPU to the produce path rather than slow producers down.
//! - A malformed frame closes its own connection and nothing else; sizes read from the wire
//!   are capped before anything is allocated for them, and compressed records are never
//!   inflated past `max_uncompressed_batch_bytes`.
//! - Request frames being received or awaiting their answer never hold more than
//!   `queued_max_request_bytes` together; connections are capped in total and per source
//!   address, and closed after `connections_max_idle_ms` without request activity.

pub mod acl;
pub mod api;
pub mod config;
pub mod credentials;
pub mod data_dir_lock;
pub mod fdlimit;
pub mod fetch_response;
pub mod filter;
pub mod groups;
pub mod limits;
pub mod listener;
pub mod purgatory;
pub mod push;
pub mod quotas;
pub mod ratelog;
pub mod records;
pub mod sasl;
pub mod scram;
pub mod server;
pub mod serving;
pub mod tls;
pub mod topics;
pub mod wire;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qanat_log::{Clock, Partition, Storage};
use tokio::sync::Notify;

use groups::{GroupCoordinator, GroupSettings};

/// How often member sessions are checked for expiry.
const SESSION_CHECK_PERIOD: Duration = Duration::from_millis(250);
/// How often consumer lag gauges are refreshed.
const LAG_EXPORT_PERIOD: Duration = Duration::from_secs(5);
/// How often disk blocks are reserved ahead of busy partitions (and closed segments' leftovers
/// given back) when no periodic fsync does it at least this often: with `fsync = "always"` or
/// a long period, appends would otherwise reserve in small steps themselves, each one a
/// chance to wait for a journal commit.
const RESERVE_PERIOD: Duration = Duration::from_secs(1);
/// How often busy partitions' appends are handed to the device between periodic fsyncs.
const WRITEBACK_PERIOD: Duration = Duration::from_millis(50);

pub use config::{Config, ConfigError, FsyncPolicy};
pub use server::serve;
pub use topics::{TopicError, TopicRegistry};

/// Errors that stop the broker from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("group coordinator: {0}")]
    Groups(#[from] groups::JournalError),
    #[error("cannot listen: {0}")]
    Listen(#[source] std::io::Error),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Store(#[from] credentials::StoreError),
    #[error("cannot start the serving threads: {0}")]
    ServingThreads(#[source] std::io::Error),
}

/// Shared state of a running broker.
pub struct Broker {
    pub config: Config,
    pub topics: TopicRegistry,
    pub groups: Arc<GroupCoordinator>,
    /// (host, port) of the `--listen` listener.
    pub advertised: (String, i32),
    /// Certificate and acceptor of the TLS listeners.
    pub tls: Option<tls::Tls>,
    /// SCRAM credentials of the users.
    pub credentials: Arc<credentials::CredentialStore>,
    /// Delays of failed logins per source address.
    pub auth_failures: sasl::FailureDelay,
    /// ACLs and whether they are enforced.
    pub acls: acl::Authorizer,
    /// Client quotas and their meters.
    pub quotas: quotas::Quotas,
    /// Long polls waiting for appends, by partition: appends wake only their partitions'.
    purgatory: purgatory::Purgatory,
    /// Low-priority threads that send fetched records (`[fetch] serving_threads`; None: 0).
    pub serving: Option<Arc<serving::ServingThreads>>,
    /// Request latency histograms, one per served API.
    request_latency: api::RequestLatency,
    /// Woken once on shutdown, so long polls answer at once.
    shutdown: Arc<Notify>,
}

impl Broker {
    /// Open (and recover) every partition under `data_dir`.
    pub fn open(
        config: Config,
        data_dir: &Path,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        advertised: (String, i32),
    ) -> Result<Self, BrokerError> {
        let started = Instant::now();
        let tls = config.tls.clone().map(tls::Tls::new).transpose()?;
        let credentials = Arc::new(credentials::CredentialStore::open(data_dir)?);
        let acls = acl::Authorizer::open(
            data_dir,
            config.security.authorizer,
            &config.security.super_users,
        )?;
        let quotas = quotas::Quotas::open(data_dir)?;
        let serving = match config.fetch.serving_threads {
            0 => None,
            n => Some(Arc::new(
                serving::ServingThreads::start(n, config.fetch.serving_nice)
                    .map_err(BrokerError::ServingThreads)?,
            )),
        };
        let auth_failures = sasl::FailureDelay::new(
            Duration::from_millis(config.sasl.failure_delay_ms),
            Duration::from_millis(config.sasl.failure_delay_max_ms),
        );
        let topics = TopicRegistry::open(
            data_dir,
            storage.clone(),
            clock.clone(),
            config.storage.log_config(),
        )?;
        let g = &config.groups;
        let groups = Arc::new(GroupCoordinator::open(
            data_dir,
            storage,
            clock,
            GroupSettings {
                initial_rebalance_delay: Duration::from_millis(g.initial_rebalance_delay_ms),
                min_session_timeout: Duration::from_millis(g.min_session_timeout_ms),
                max_session_timeout: Duration::from_millis(g.max_session_timeout_ms),
                sync_commits: config.storage.fsync == FsyncPolicy::Always,
            },
        )?);
        tracing::info!(
            topics = topics.all().len(),
            partitions = topics.partitions().len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "storage opened"
        );
        Ok(Self {
            config,
            topics,
            groups,
            advertised,
            tls,
            credentials,
            auth_failures,
            acls,
            quotas,
            purgatory: purgatory::Purgatory::default(),
            serving,
            request_latency: api::RequestLatency::new(),
            shutdown: Arc::new(Notify::new()),
        })
    }

    /// Whether acknowledgements wait for fdatasync.
    pub fn sync_on_ack(&self) -> bool {
        self.config.storage.fsync == FsyncPolicy::Always
    }

    /// Make every partition's appended data durable.
    pub fn sync_all(&self) {
        self.groups.flush();
        for (topic, index, partition) in self.topics.partitions() {
            // Block reservations wait for a journal commit under way, such as the one the
            // fdatasync below starts: made here, before it, enough for the appends to go on
            // meanwhile without reserving themselves.
            partition.renew_reservations();
            if let Err(e) = timed_sync(&partition, None) {
                tracing::error!(topic, partition = index, error = %e, "fdatasync failed");
            }
        }
    }

    /// Reserve disk blocks ahead of every busy partition's appends and give back what closed
    /// segments left (`Partition::renew_reservations`).
    pub fn reserve_all(&self) {
        for (_, _, partition) in self.topics.partitions() {
            partition.renew_reservations();
        }
    }

    /// Start the device write of what busy partitions appended lately
    /// (`Partition::start_writeback`).
    pub fn start_writeback_all(&self) {
        for (_, _, partition) in self.topics.partitions() {
            partition.start_writeback();
        }
    }

    /// One round of segment rolling by age and retention, plus size gauges.
    pub fn maintain(&self) {
        for (topic, index, partition) in self.topics.partitions() {
            if let Err(e) = partition.roll_if_due() {
                tracing::error!(topic, partition = index, error = %e, "segment roll failed");
            }
            match partition.enforce_retention() {
                Ok(r) if r.deleted_segments > 0 => tracing::info!(
                    topic,
                    partition = index,
                    segments = r.deleted_segments,
                    bytes = r.deleted_bytes,
                    log_start_offset = partition.log_start_offset(),
                    "retention deleted segments"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!(topic, partition = index, error = %e, "retention failed"),
            }
            metrics::gauge!("qanat_partition_size_bytes", "topic" => topic.clone(), "partition" => index.to_string())
                .set(partition.size_bytes() as f64);
            metrics::gauge!("qanat_partition_log_end_offset", "topic" => topic, "partition" => index.to_string())
                .set(partition.next_offset() as f64);
        }
    }

    /// Export committed offset and lag per group and partition.
    pub fn export_lag(&self) {
        for (group, topic, partition, committed) in self.groups.all_committed() {
            let end = self.topics.get(&topic).and_then(|t| {
                t.partitions
                    .get(partition as usize)
                    .map(|p| p.high_watermark())
            });
            let labels = [
                ("group", group),
                ("topic", topic),
                ("partition", partition.to_string()),
            ];
            metrics::gauge!("qanat_group_committed_offset", &labels).set(committed as f64);
            if let Some(end) = end {
                metrics::gauge!("qanat_group_lag", &labels).set((end - committed).max(0) as f64);
            }
        }
    }

    /// Run the periodic fsync (when configured) and the maintenance loop until shutdown.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let FsyncPolicy::Every(period) = self.config.storage.fsync {
            let broker = self.clone();
            tasks.push(tokio::spawn(async move {
                broker.every(period, |b| b.sync_all()).await;
            }));
        }
        if !matches!(self.config.storage.fsync, FsyncPolicy::Every(p) if p <= RESERVE_PERIOD) {
            let broker = self.clone();
            tasks.push(tokio::spawn(async move {
                broker.every(RESERVE_PERIOD, |b| b.reserve_all()).await;
            }));
        }
        if matches!(self.config.storage.fsync, FsyncPolicy::Every(p) if p > WRITEBACK_PERIOD) {
            let broker = self.clone();
            tasks.push(tokio::spawn(async move {
                broker
                    .every(WRITEBACK_PERIOD, |b| b.start_writeback_all())
                    .await;
            }));
        }
        let period = Duration::from_millis(self.config.storage.retention_check_interval_ms.max(10));
        let broker = self.clone();
        tasks.push(tokio::spawn(async move {
            broker.every(period, |b| b.maintain()).await;
        }));
        let broker = self.clone();
        tasks.push(tokio::spawn(async move {
            broker
                .every(SESSION_CHECK_PERIOD, |b| b.groups.expire_sessions())
                .await;
        }));
        let broker = self.clone();
        tasks.push(tokio::spawn(async move {
            broker.every(LAG_EXPORT_PERIOD, |b| b.export_lag()).await;
        }));
        tasks
    }

    async fn every(self: Arc<Self>, period: Duration, work: fn(&Broker)) {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.shutdown.clone();
        let stop = shutdown.notified();
        tokio::pin!(stop);
        stop.as_mut().enable();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let broker = self.clone();
                    if tokio::task::spawn_blocking(move || work(&broker)).await.is_err() {
                        tracing::error!("background task panicked");
                    }
                }
                _ = &mut stop => return,
            }
        }
    }

    /// Ask long polls and background loops to finish.
    pub fn begin_shutdown(&self) {
        self.shutdown.notify_waiters();
    }

    /// Flush and close every partition.
    pub fn close(&self) {
        self.groups.close();
        for (topic, index, partition) in self.topics.partitions() {
            if let Err(e) = partition.close() {
                tracing::error!(topic, partition = index, error = %e, "closing partition failed");
            }
        }
    }
}

/// Run `work`, which writes files, so that no async worker waits for it. On the multi-thread
/// runtime this thread first hands its worker core (its queue and the reactor) to another
/// thread and then runs `work` itself (`block_in_place`): the request goes on here afterwards,
/// without the two cross-thread wake-ups of a trip through the blocking pool, which on a
/// Produce cost more CPU than its CRC check. Elsewhere (current-thread runtimes in unit tests)
/// it runs on the blocking pool. A panic in `work` comes back as an error either way.
async fn off_worker<R, F>(work: F) -> Result<R, String>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)))
            .map_err(|panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".to_owned())
            })
    } else {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| e.to_string())
    }
}

/// fdatasync of one append (or of everything), recording its latency.
fn timed_sync(
    partition: &Partition,
    appended: Option<&qanat_log::AppendOutcome>,
) -> Result<(), qanat_log::LogError> {
    let started = Instant::now();
    let result = match appended {
        Some(outcome) => partition.sync_append(outcome),
        None => partition.sync(),
    };
    metrics::histogram!("qanat_fsync_seconds").record(started.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("qanat_fsync_failures_total").increment(1);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::mpsc;
    use std::time::Duration;

    use super::off_worker;

    /// With a single async worker, work that waits for another task of the same runtime
    /// finishes only if that worker was handed on before the work ran.
    #[test]
    fn off_worker_leaves_the_async_worker_free() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let (tx, rx) = mpsc::channel();
            let caller = tokio::spawn(off_worker(move || {
                let _ = started_tx.send(());
                rx.recv_timeout(Duration::from_secs(30))
            }));
            // A task of the runtime, not this block_on future, which has a thread of its own.
            let sender = tokio::spawn(async move {
                let _ = started_rx.await;
                tx.send(7)
            });
            assert_eq!(caller.await.unwrap(), Ok(Ok(7)));
            sender.await.unwrap().unwrap();
        });
    }

    #[test]
    fn a_panic_in_the_work_is_an_error_on_either_runtime() {
        let multi = tokio::runtime::Builder::new_multi_thread().build().unwrap();
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for runtime in [multi, current] {
            let result = runtime.block_on(async {
                tokio::spawn(off_worker(|| -> u8 { panic!("torn") }))
                    .await
                    .unwrap()
            });
            assert!(result.unwrap_err().contains("torn"));
            let fine = runtime.block_on(async { tokio::spawn(off_worker(|| 3)).await.unwrap() });
            assert_eq!(fine, Ok(3));
        }
    }
}
