//! The agent loop: discovery, reading, framing, producing, acknowledgement watermarks,
//! checkpoints and manifests. One thread owns all state; librdkafka's delivery reports arrive
//! on the producer's polling thread and are handed over through a mutex-protected list.
//!
//! Per file the agent keeps three positions: `acked` (every record below it acknowledged:
//! what is checkpointed), the end of what was produced, and the end of what was read (the
//! unconsumed tail is a partial line or a multiline group that may still grow). Records of a
//! file carry increasing sequence numbers; `acked` moves over a prefix of acknowledged ones
//! only, so delivery reports in any order are safe. A failed record makes the file re-read
//! from `acked` once its other records are settled, after a backoff.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use metrics::{Counter, Gauge};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use regex::bytes::Regex;

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointFs, CheckpointStore, FileEntry};
use crate::clock::Clock;
use crate::config::{AgentConfig, ConfigError, CorruptPolicy, OutputConfig};
use crate::discovery::{DiscoveryError, FsEvent, Matcher, Watcher};
use crate::framing::{Frame, Framer};
use crate::identity::{file_id, initial_signature, signature_of, Signature};

/// librdkafka's own memory per queued record beyond its bytes (message struct, headers),
/// counted against `max_inflight_bytes` so the cap bounds memory, not just payload.
const RECORD_OVERHEAD: u64 = 512;
/// File keys live in 24 bits of a record's delivery opaque; this one (never given to a file)
/// marks the manifest.
const KEY_BITS: u32 = 24;
const KEY_MASK: u64 = (1 << KEY_BITS) - 1;
const MANIFEST_KEY: u64 = KEY_MASK;
const MAX_BACKOFF_MS: u64 = 30_000;
/// Pause before retrying a file whose records librdkafka refused.
const REFUSED_RETRY_MS: u64 = 20;
const FIRST_BACKOFF_MS: u64 = 500;
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(
        "checkpoint {path} is corrupt: {reason}. Refusing to start (on_corrupt_checkpoint = \
         \"stop\"): no position in it can be trusted. Inspect it, then remove it or set \
         on_corrupt_checkpoint = \"reread\" to read every file again from the start"
    )]
    CorruptCheckpoint { path: PathBuf, reason: String },
    #[error(transparent)]
    Checkpoint(CheckpointError),
    #[error("writing the final checkpoint: {0}")]
    FinalCheckpoint(CheckpointError),
    #[error("creating the producer: {0}")]
    Producer(#[from] KafkaError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

// ------------------------------------------------------------------------------------------
// Producer context: delivery reports to the loop.

// The delivery opaque is a plain `usize`, so producing a record allocates nothing for it:
// bits 56..64 the producer generation, 32..56 the file key, 0..32 the record's sequence
// number modulo 2^32. A file's in-flight records are far fewer than 2^32 (each counts
// `RECORD_OVERHEAD` against `max_inflight_bytes`), so the low bits of a sequence number pick
// one pending record unambiguously; keys are unique among tracked files (`Agent::alloc_key`);
// and reports of an old producer never reach the new one's context.
const _: () = assert!(
    usize::BITS >= 64,
    "the delivery opaque packs 64 bits into a usize"
);

fn tag(generation: u64, key: u64, seq: u64) -> usize {
    (((generation & 0xff) << 56) | ((key & KEY_MASK) << 32) | (seq & 0xffff_ffff)) as usize
}

struct Ack {
    tag: u64,
    ok: bool,
}

impl Ack {
    fn generation(&self) -> u8 {
        (self.tag >> 56) as u8
    }
    fn key(&self) -> u64 {
        (self.tag >> 32) & KEY_MASK
    }
    fn seq(&self) -> u32 {
        self.tag as u32
    }
}

enum Wake {
    Fs(FsEvent),
    Ack,
}

struct Ctx {
    acks: Mutex<Vec<Ack>>,
    /// Set while the loop sleeps: the next report wakes it.
    waiting: AtomicBool,
    wake: Sender<Wake>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            _ => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        let ok = result.is_ok();
        if let Err((e, _)) = result {
            tracing::debug!(error = %e, "record not delivered");
        }
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Ack {
                tag: tag as u64,
                ok,
            });
        // Ordered by the `acks` lock against the loop's `sleep`; the plain load spares a
        // read-modify-write per record while the loop is busy.
        if self.waiting.load(Ordering::Acquire) && self.waiting.swap(false, Ordering::AcqRel) {
            let _ = self.wake.send(Wake::Ack);
        }
    }
}

fn make_producer(
    out: &OutputConfig,
    host: &str,
    max_inflight: u64,
    wake: Sender<Wake>,
) -> Result<ThreadedProducer<Ctx>, KafkaError> {
    let mut c = ClientConfig::new();
    let kbytes = (max_inflight.saturating_mul(2) / 1024).clamp(16 << 10, 2 << 20);
    c.set("bootstrap.servers", &out.bootstrap)
        .set("client.id", format!("qanat-agent-{host}"))
        // Retries neither reorder nor duplicate: the broker checks producer sequences.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("batch.size", out.batch_bytes.to_string())
        .set("linger.ms", out.batch_age_ms.to_string())
        .set("compression.type", &out.compression)
        .set("compression.level", out.compression_level.to_string())
        .set("message.timeout.ms", out.delivery_timeout_ms.to_string())
        .set(
            "message.max.bytes",
            (out.batch_bytes + (1 << 20)).max(1_000_000).to_string(),
        )
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", kbytes.to_string())
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "5000");
    for (k, v) in &out.librdkafka {
        c.set(k, v);
    }
    c.create_with_context(Ctx {
        acks: Mutex::new(Vec::new()),
        waiting: AtomicBool::new(false),
        wake,
    })
}

// ------------------------------------------------------------------------------------------
// Per-source runtime state.

struct SourceRt {
    topic: String,
    attributes: Vec<(String, String)>,
    framer: Framer,
    multiline_timeout_ms: u64,
    bytes_read: Counter,
    lines_read: Counter,
    bytes_acked: Counter,
    lines_acked: Counter,
    batches: Counter,
}

// ------------------------------------------------------------------------------------------
// Tracked files.

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Acked,
    Failed,
}

struct Pending {
    seq: u64,
    end: u64,
    size: u64,
    lines: u32,
    state: State,
}

struct Ident {
    id: String,
    sig: Signature,
}

struct Tracked {
    source: usize,
    path: PathBuf,
    path_str: String,
    /// `None` once the content is gone (truncated in place): only waiting for acks.
    file: Option<File>,
    dev: u64,
    ino: u64,
    ident: Option<Ident>,
    /// Unconsumed bytes starting at file offset `buf_off`.
    buf: Vec<u8>,
    buf_off: u64,
    acked: u64,
    pending: VecDeque<Pending>,
    next_seq: u64,
    failed: bool,
    retry_at: u64,
    backoff_ms: u64,
    eof: bool,
    /// `buf` holds records librdkafka refused: frame them again before reading more.
    refused: bool,
    last_growth_ms: u64,
    seen: bool,
    orphan_since: Option<u64>,
}

impl Tracked {
    fn new(source: usize, path: PathBuf, file: File, dev: u64, ino: u64, now: u64) -> Tracked {
        Tracked {
            source,
            path_str: path.to_string_lossy().into_owned(),
            path,
            file: Some(file),
            dev,
            ino,
            ident: None,
            buf: Vec::new(),
            buf_off: 0,
            acked: 0,
            pending: VecDeque::new(),
            next_seq: 0,
            failed: false,
            retry_at: 0,
            backoff_ms: 0,
            eof: false,
            refused: false,
            last_growth_ms: now,
            seen: true,
            orphan_since: None,
        }
    }

    fn read_pos(&self) -> u64 {
        self.buf_off + self.buf.len() as u64
    }

    fn settled(&self) -> bool {
        self.pending.iter().all(|p| p.state != State::InFlight)
    }

    /// Forget everything past `acked` and read again from there.
    fn rewind(&mut self) {
        self.pending.clear();
        self.buf = Vec::new();
        self.buf_off = self.acked;
        self.failed = false;
        self.eof = false;
        self.refused = false;
    }
}

// ------------------------------------------------------------------------------------------
// The agent.

pub struct Agent {
    cfg: AgentConfig,
    host: String,
    clock: Arc<dyn Clock>,
    matcher: Matcher,
    sources: Vec<SourceRt>,
    store: CheckpointStore<Box<dyn CheckpointFs>>,
    files: HashMap<u64, Tracked>,
    by_inode: HashMap<(u64, u64), u64>,
    by_path: HashMap<PathBuf, u64>,
    /// Checkpointed files not yet found again (cleared after the first scan).
    resume: HashMap<(u64, u64), FileEntry>,
    next_key: u64,
    producer: ThreadedProducer<Ctx>,
    generation: u64,
    inflight_bytes: u64,
    rx: Receiver<Wake>,
    tx: Sender<Wake>,
    watcher: Option<Watcher>,
    checkpoint_dirty: bool,
    rescan_soon: bool,
    scratch: Vec<u8>,
    frames: Vec<Frame>,
    acks: Vec<Ack>,
    files_gauge: Gauge,
    inflight_gauge: Gauge,
    retries: Counter,
}

impl CheckpointFs for Box<dyn CheckpointFs> {
    fn read(&self, path: &std::path::Path) -> io::Result<Option<Vec<u8>>> {
        (**self).read(path)
    }
    fn write_synced(&self, path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
        (**self).write_synced(path, bytes)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
        (**self).rename(from, to)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> io::Result<()> {
        (**self).sync_dir(dir)
    }
}

/// The machine's hostname, without `:` (the id separator).
fn default_host() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".to_string())
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

/// Where a record goes and what it says.
struct Emit<'a> {
    producer: &'a ThreadedProducer<Ctx>,
    host: &'a str,
    generation: u64,
    inflight: &'a mut u64,
    frames: &'a mut Vec<Frame>,
}

impl Emit<'_> {
    /// Frame `data` (the file's bytes from `t.buf_off`) and produce its events; returns how
    /// many bytes were consumed. Stops early when librdkafka's queue is full.
    fn frames(
        &mut self,
        key: u64,
        t: &mut Tracked,
        src: &SourceRt,
        data: &[u8],
        flush_group: bool,
        final_flush: bool,
    ) -> (usize, bool) {
        let Some(ident) = &t.ident else {
            return (0, false);
        };
        let frames = &mut *self.frames;
        frames.clear();
        let mut used = src.framer.frame(data, flush_group, final_flush, frames);
        let mut lines = 0u64;
        let mut sent = 0usize;
        let mut refused = false;
        for fr in frames.iter() {
            let offset = t.buf_off + fr.start as u64;
            let size = (fr.end - fr.start) as u64;
            let (mut b1, mut b2, mut b3) = ([0u8; 20], [0u8; 20], [0u8; 20]);
            let mut headers = OwnedHeaders::new_with_capacity(6 + src.attributes.len())
                .insert(Header {
                    key: "qanat.host",
                    value: Some(self.host.as_bytes()),
                })
                .insert(Header {
                    key: "qanat.file",
                    value: Some(ident.id.as_bytes()),
                })
                .insert(Header {
                    key: "qanat.path",
                    value: Some(t.path_str.as_bytes()),
                })
                .insert(Header {
                    key: "qanat.offset",
                    value: Some(dec(offset, &mut b1)),
                })
                .insert(Header {
                    key: "qanat.size",
                    value: Some(dec(size, &mut b2)),
                })
                .insert(Header {
                    key: "qanat.lines",
                    value: Some(dec(u64::from(fr.lines), &mut b3)),
                });
            for (k, v) in &src.attributes {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let seq = t.next_seq;
            let record = BaseRecord::with_opaque_to(&src.topic, tag(self.generation, key, seq))
                .key(ident.id.as_bytes())
                .payload(&data[fr.start..fr.value_end])
                .headers(headers);
            if let Err((e, _)) = self.producer.send(record) {
                if !matches!(
                    e,
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                ) {
                    tracing::warn!(path = %t.path_str, error = %e, "producing failed; will retry");
                }
                used = fr.start;
                refused = true;
                break;
            }
            t.next_seq += 1;
            t.pending.push_back(Pending {
                seq,
                end: offset + size,
                size,
                lines: fr.lines,
                state: State::InFlight,
            });
            *self.inflight += size + RECORD_OVERHEAD;
            lines += u64::from(fr.lines);
            sent += 1;
        }
        if sent > 0 {
            src.lines_read.increment(lines);
            src.batches.increment(1);
        }
        (used, refused)
    }
}

impl Agent {
    /// Load the checkpoint (applying `on_corrupt_checkpoint`), build the matchers and the
    /// producer, start the watcher.
    pub fn new(
        cfg: AgentConfig,
        fs: Box<dyn CheckpointFs>,
        clock: Arc<dyn Clock>,
    ) -> Result<Agent, AgentError> {
        cfg.validate()?;
        let host = cfg
            .host
            .clone()
            .unwrap_or_else(default_host)
            .replace(':', "_");
        let globs: Vec<(Vec<String>, Vec<String>)> = cfg
            .sources
            .iter()
            .map(|s| (s.paths.clone(), s.exclude.clone()))
            .collect();
        let matcher = Matcher::new(&globs)?;
        let mut sources = Vec::new();
        for s in &cfg.sources {
            let re = match &s.multiline_start {
                Some(p) => Some(
                    Regex::new(p)
                        .map_err(|e| ConfigError::Invalid(format!("multiline_start: {e}")))?,
                ),
                None => None,
            };
            let label = s.label().to_string();
            sources.push(SourceRt {
                topic: s.topic.clone(),
                attributes: s.attributes.clone().into_iter().collect(),
                framer: Framer::new(s.max_line_bytes, re),
                multiline_timeout_ms: s.multiline_timeout_ms,
                bytes_read: metrics::counter!("qanat_agent_bytes_read_total", "source" => label.clone()),
                lines_read: metrics::counter!("qanat_agent_lines_read_total", "source" => label.clone()),
                bytes_acked: metrics::counter!("qanat_agent_bytes_acked_total", "source" => label.clone()),
                lines_acked: metrics::counter!("qanat_agent_lines_acked_total", "source" => label.clone()),
                batches: metrics::counter!("qanat_agent_batches_total", "source" => label),
            });
        }

        std::fs::create_dir_all(&cfg.checkpoint_dir).map_err(|source| AgentError::Io {
            what: format!("creating checkpoint dir {}", cfg.checkpoint_dir.display()),
            source,
        })?;
        let store = CheckpointStore::new(fs, cfg.checkpoint_dir.clone());
        let mut resume = HashMap::new();
        match store.load() {
            Ok(Some(cp)) => {
                if cp.host != host {
                    tracing::warn!(checkpoint_host = %cp.host, %host, "checkpoint was written under another host id; ids of resumed files keep theirs");
                }
                tracing::info!(path = %store.path().display(), files = cp.files.len(), "checkpoint loaded");
                for e in cp.files {
                    resume.insert((e.dev, e.ino), e);
                }
            }
            Ok(None) => {
                tracing::info!(path = %store.path().display(), "no checkpoint yet: every matching file is read from its start")
            }
            Err(CheckpointError::Corrupt { path, reason }) => {
                metrics::counter!("qanat_agent_checkpoint_corrupt_total").increment(1);
                tracing::error!(path = %path.display(), %reason, policy = ?cfg.on_corrupt_checkpoint, "CHECKPOINT IS CORRUPT");
                match cfg.on_corrupt_checkpoint {
                    CorruptPolicy::Stop => {
                        return Err(AgentError::CorruptCheckpoint { path, reason })
                    }
                    CorruptPolicy::Reread => {
                        let aside = store
                            .set_aside(clock.now_ms())
                            .map_err(AgentError::Checkpoint)?;
                        tracing::error!(kept_as = %aside.display(), "on_corrupt_checkpoint = \"reread\": reading every file again from offset 0; the audit will report the repeated ranges");
                    }
                }
            }
            Err(e) => return Err(AgentError::Checkpoint(e)),
        }

        let (tx, rx) = mpsc::channel();
        let producer = make_producer(&cfg.output, &host, cfg.max_inflight_bytes, tx.clone())?;
        let watcher = if cfg.inotify {
            let etx = tx.clone();
            let (ftx, frx) = mpsc::channel::<FsEvent>();
            // Forward watcher events into the loop's wake channel.
            std::thread::Builder::new()
                .name("qanat-agent-notify".into())
                .spawn(move || {
                    while let Ok(ev) = frx.recv() {
                        if etx.send(Wake::Fs(ev)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|source| AgentError::Io {
                    what: "starting the watcher thread".into(),
                    source,
                })?;
            match Watcher::new(ftx) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "inotify unavailable; discovery by rescan only");
                    None
                }
            }
        } else {
            tracing::info!("inotify disabled: discovery by periodic rescan only");
            None
        };
        Ok(Agent {
            host,
            clock,
            matcher,
            sources,
            store,
            files: HashMap::new(),
            by_inode: HashMap::new(),
            by_path: HashMap::new(),
            resume,
            next_key: 0,
            producer,
            generation: 0,
            inflight_bytes: 0,
            rx,
            tx,
            watcher,
            checkpoint_dirty: true,
            rescan_soon: false,
            scratch: Vec::new(),
            frames: Vec::new(),
            acks: Vec::new(),
            files_gauge: metrics::gauge!("qanat_agent_files_tracked"),
            inflight_gauge: metrics::gauge!("qanat_agent_inflight_bytes"),
            retries: metrics::counter!("qanat_agent_retries_total"),
            cfg,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn files_tracked(&self) -> usize {
        self.files.len()
    }

    /// Run until `shutdown` is set, then flush and write a final checkpoint; a final checkpoint
    /// that cannot be written is an error. `on_ready` is called once after the first scan.
    pub fn run(
        mut self,
        shutdown: &AtomicBool,
        on_ready: impl FnOnce(&Agent),
    ) -> Result<(), AgentError> {
        let now = self.clock.now_ms();
        self.rescan(now);
        self.save_checkpoint();
        self.send_manifest();
        on_ready(&self);
        let mut next_rescan = now + self.cfg.rescan_interval_ms;
        let mut next_poll = now + self.cfg.poll_interval_ms;
        let mut next_checkpoint = now + self.cfg.checkpoint_interval_ms;
        let mut next_manifest = now + self.cfg.manifest_interval_ms;
        let mut last_rescan = now;
        while !shutdown.load(Ordering::Acquire) {
            self.drain_acks();
            self.check_fatal();
            while let Ok(w) = self.rx.try_recv() {
                self.on_wake(w);
            }
            let now = self.clock.now_ms();
            if now >= next_rescan || (self.rescan_soon && now >= last_rescan + 50) {
                self.rescan(now);
                last_rescan = now;
                next_rescan = now + self.cfg.rescan_interval_ms;
            }
            if now >= next_poll {
                self.poll_sizes(now);
                next_poll = now + self.cfg.poll_interval_ms;
            }
            let progressed = self.read_round(now);
            self.timers(now);
            if now >= next_checkpoint {
                if self.checkpoint_dirty {
                    self.save_checkpoint();
                }
                next_checkpoint = now + self.cfg.checkpoint_interval_ms;
            }
            if now >= next_manifest {
                self.send_manifest();
                next_manifest = now + self.cfg.manifest_interval_ms;
            }
            if !progressed {
                let next = [next_rescan, next_poll, next_checkpoint, next_manifest]
                    .into_iter()
                    .min()
                    .unwrap_or(now + 100);
                let wait = next.saturating_sub(now).clamp(1, 100);
                self.sleep(Duration::from_millis(wait));
            }
        }
        self.shutdown()
    }

    fn sleep(&mut self, d: Duration) {
        let ctx = self.producer.context();
        ctx.waiting.store(true, Ordering::Release);
        let have_acks = !ctx
            .acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if !have_acks {
            match self.rx.recv_timeout(d) {
                Ok(w) => self.on_wake(w),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
        }
        self.producer
            .context()
            .waiting
            .store(false, Ordering::Release);
    }

    fn on_wake(&mut self, w: Wake) {
        match w {
            Wake::Ack => {}
            Wake::Fs(FsEvent::Modified(paths)) => {
                for p in paths {
                    match self.by_path.get(&p).and_then(|k| self.files.get_mut(k)) {
                        Some(t) => t.eof = false,
                        None => self.rescan_soon = true,
                    }
                }
            }
            Wake::Fs(FsEvent::Structure) => self.rescan_soon = true,
        }
    }

    // --------------------------------------------------------------------------------------
    // Discovery

    fn rescan(&mut self, now: u64) {
        self.rescan_soon = false;
        if let Some(w) = self.watcher.as_mut() {
            w.refresh(self.matcher.roots());
        }
        for t in self.files.values_mut() {
            t.seen = false;
        }
        for (path, source) in self.matcher.scan() {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if let Some(&key) = self.by_inode.get(&(meta.dev(), meta.ino())) {
                if let Some(t) = self.files.get_mut(&key) {
                    t.seen = true;
                    t.orphan_since = None;
                    if t.path != path {
                        tracing::info!(from = %t.path.display(), to = %path.display(), "file renamed; same identity");
                        if self.by_path.get(&t.path) == Some(&key) {
                            self.by_path.remove(&t.path);
                        }
                        t.path_str = path.to_string_lossy().into_owned();
                        t.path = path.clone();
                        self.by_path.insert(path, key);
                        self.checkpoint_dirty = true;
                    }
                }
                continue;
            }
            self.open_new(path, source, now);
        }
        if !self.resume.is_empty() {
            for e in self.resume.values() {
                tracing::warn!(id = %e.id, path = %e.path.display(), offset = e.offset, "checkpointed file not found any more (deleted or moved out of the globs); bytes past its offset, if any, cannot be read");
            }
            self.resume.clear();
            self.checkpoint_dirty = true;
        }
        for (key, t) in self.files.iter_mut() {
            if !t.seen && t.file.is_some() && t.orphan_since.is_none() {
                tracing::info!(path = %t.path.display(), "no longer at a matching path: reading it to its end");
                t.orphan_since = Some(now);
                t.eof = false;
                if self.by_path.get(&t.path) == Some(key) {
                    self.by_path.remove(&t.path);
                }
            }
        }
        self.files_gauge.set(self.files.len() as f64);
    }

    fn open_new(&mut self, path: PathBuf, source: usize, now: u64) {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open");
                return;
            }
        };
        // The fd's identity, in case the path was replaced since the stat.
        let Ok(meta) = file.metadata() else { return };
        let (dev, ino) = (meta.dev(), meta.ino());
        if self.by_inode.contains_key(&(dev, ino)) {
            return;
        }
        let mut t = Tracked::new(source, path.clone(), file, dev, ino, now);
        if let Some(e) = self.resume.remove(&(dev, ino)) {
            let same = t
                .file
                .as_ref()
                .and_then(|f| signature_of(f, e.sig_len).ok().flatten())
                .is_some_and(|s| s.crc == e.sig_crc);
            if same && meta.len() >= e.offset {
                tracing::info!(path = %path.display(), id = %e.id, offset = e.offset, "resuming from checkpoint");
                t.ident = Some(Ident {
                    id: e.id,
                    sig: Signature {
                        len: e.sig_len,
                        crc: e.sig_crc,
                    },
                });
                t.acked = e.offset;
                t.buf_off = e.offset;
            } else {
                tracing::warn!(path = %path.display(), old_id = %e.id, old_offset = e.offset, size = meta.len(), "checkpointed file was truncated or replaced: reading it from 0 as a new file");
            }
        }
        if t.ident.is_none() {
            self.identify(&mut t, meta.len());
        }
        let key = self.alloc_key(MANIFEST_KEY);
        tracing::debug!(path = %path.display(), id = ?t.ident.as_ref().map(|i| &i.id), "tracking");
        self.by_inode.insert((dev, ino), key);
        self.by_path.insert(path, key);
        self.files.insert(key, t);
        self.checkpoint_dirty = true;
    }

    /// A key for a new tracked file: 24 bits (it travels in the delivery opaque), never the
    /// manifest's, `avoid`, or one still in use (after the counter wraps).
    fn alloc_key(&mut self, avoid: u64) -> u64 {
        loop {
            let wrapped = self.next_key > KEY_MASK;
            let k = self.next_key & KEY_MASK;
            self.next_key = self.next_key.wrapping_add(1);
            if k == MANIFEST_KEY || k == avoid || self.files.contains_key(&k) {
                continue;
            }
            if wrapped
                && (self.by_inode.values().any(|&v| v == k)
                    || self.by_path.values().any(|&v| v == k))
            {
                continue;
            }
            return k;
        }
    }

    /// Fix a file's id on its first bytes (docs/trajectory.md: the id is taken once).
    fn identify(&self, t: &mut Tracked, size: u64) {
        let Some(f) = t.file.as_ref() else { return };
        match initial_signature(f, size, self.cfg.signature_bytes) {
            Ok(Some(sig)) => {
                t.ident = Some(Ident {
                    id: file_id(&self.host, t.dev, t.ino, sig),
                    sig,
                })
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(path = %t.path.display(), error = %e, "reading signature"),
        }
    }

    /// fstat every open file: growth, truncation, deletion.
    fn poll_sizes(&mut self, now: u64) {
        let mut replaced = Vec::new();
        for (key, t) in self.files.iter_mut() {
            let Some(f) = t.file.as_ref() else { continue };
            let Ok(meta) = f.metadata() else { continue };
            if meta.len() < t.read_pos() {
                replaced.push(*key);
            } else if meta.len() > t.read_pos() {
                t.eof = false;
            }
            if meta.nlink() == 0 && t.orphan_since.is_none() {
                tracing::info!(path = %t.path.display(), "deleted: reading what is left through the open descriptor");
                t.orphan_since = Some(now);
            }
        }
        for key in replaced {
            self.replaced(key, now);
        }
        self.inflight_gauge.set(self.inflight_bytes as f64);
    }

    /// The content under an open descriptor was truncated or rewritten in place
    /// (copytruncate): it is a new file from 0; the old id only waits for its acks.
    fn replaced(&mut self, key: u64, now: u64) {
        let Some(mut old) = self.files.remove(&key) else {
            return;
        };
        let Some(file) = old.file.take() else {
            return;
        };
        tracing::warn!(path = %old.path.display(), old_id = ?old.ident.as_ref().map(|i| &i.id), read_to = old.read_pos(), acked = old.acked, "truncated or rewritten in place: new identity, reading from 0");
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut t = Tracked::new(old.source, old.path.clone(), file, old.dev, old.ino, now);
        t.orphan_since = old.orphan_since;
        self.identify(&mut t, size);
        let new_key = self.alloc_key(key);
        if !old.pending.is_empty() {
            self.files.insert(key, old);
        }
        if self.by_path.get(&t.path) == Some(&key) {
            self.by_path.insert(t.path.clone(), new_key);
        }
        self.by_inode.insert((t.dev, t.ino), new_key);
        self.files.insert(new_key, t);
        self.checkpoint_dirty = true;
    }

    // --------------------------------------------------------------------------------------
    // Reading

    /// One chunk from every file with unread bytes, while under the in-flight cap.
    fn read_round(&mut self, now: u64) -> bool {
        let keys: Vec<u64> = self
            .files
            .iter()
            .filter(|(_, t)| t.file.is_some() && !t.eof && !t.failed && now >= t.retry_at)
            .map(|(k, _)| *k)
            .collect();
        let mut progressed = false;
        for key in keys {
            if self.inflight_bytes >= self.cfg.max_inflight_bytes {
                break;
            }
            progressed |= self.read_file(key, now);
        }
        progressed
    }

    fn read_file(&mut self, key: u64, now: u64) -> bool {
        let chunk = self.cfg.read_chunk_bytes;
        let Some(t) = self.files.get_mut(&key) else {
            return false;
        };
        if t.ident.is_none() {
            let size = t
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len());
            let sig_bytes = self.cfg.signature_bytes;
            if let Some(f) = t.file.as_ref() {
                if let Ok(Some(sig)) = initial_signature(f, size, sig_bytes) {
                    t.ident = Some(Ident {
                        id: file_id(&self.host, t.dev, t.ino, sig),
                        sig,
                    });
                    self.checkpoint_dirty = true;
                }
            }
            if t.ident.is_none() {
                t.eof = true;
                return false;
            }
        }
        let (Some(file), Some(ident)) = (t.file.as_ref(), t.ident.as_ref()) else {
            return false;
        };
        let pos = t.read_pos();
        let scratch = &mut self.scratch;
        scratch.clear();
        scratch.extend_from_slice(&t.buf);
        let old = scratch.len();
        let backlog = !should_read(old, chunk, t.refused);
        let n = if backlog {
            0
        } else {
            scratch.resize(old + chunk, 0);
            loop {
                match file.read_at(&mut scratch[old..], pos) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(path = %t.path.display(), error = %e, "read failed");
                        t.eof = true;
                        return false;
                    }
                }
            }
        };
        scratch.truncate(old + n);
        if !backlog {
            if n == 0 {
                t.eof = true;
                return false;
            }
            if n < chunk {
                t.eof = true;
            }
        }
        // Still the same content? (copytruncate may have rewritten it past our position.)
        let sig = ident.sig;
        match signature_of(file, sig.len) {
            Ok(Some(s)) if s == sig => {}
            _ => {
                self.replaced(key, now);
                return true;
            }
        }
        t.last_growth_ms = now;
        let src = &self.sources[t.source];
        src.bytes_read.increment(n as u64);
        let mut emit = Emit {
            producer: &self.producer,
            host: &self.host,
            generation: self.generation,
            inflight: &mut self.inflight_bytes,
            frames: &mut self.frames,
        };
        let (used, refused) = emit.frames(key, t, src, scratch, false, false);
        t.buf.clear();
        t.buf.extend_from_slice(&scratch[used..]);
        if t.buf.capacity() > (64 << 10) && t.buf.len() < (16 << 10) {
            t.buf.shrink_to_fit();
        }
        t.buf_off += used as u64;
        t.refused = refused;
        if refused {
            // librdkafka refused a record (queue full): come back to this file shortly rather
            // than spinning on it.
            t.eof = false;
            t.retry_at = now + REFUSED_RETRY_MS;
        }
        true
    }

    /// Multiline timeouts, final flush and drop of orphans, rewinds after failures.
    fn timers(&mut self, now: u64) {
        let mut drop_keys = Vec::new();
        let keys: Vec<u64> = self.files.keys().copied().collect();
        for key in keys {
            let Some(t) = self.files.get_mut(&key) else {
                continue;
            };
            if t.file.is_none() {
                // Retired content: forget it once nothing is in flight.
                if t.settled() {
                    if t.failed {
                        tracing::error!(path = %t.path.display(), acked = t.acked, "records of a truncated file failed and cannot be re-read: those bytes are lost");
                    }
                    drop_keys.push(key);
                }
                continue;
            }
            if t.failed {
                if t.settled() {
                    t.backoff_ms = if t.backoff_ms == 0 {
                        FIRST_BACKOFF_MS
                    } else {
                        (t.backoff_ms * 2).min(MAX_BACKOFF_MS)
                    };
                    t.retry_at = now + t.backoff_ms;
                    tracing::warn!(path = %t.path.display(), acked = t.acked, backoff_ms = t.backoff_ms, "delivery failed: re-reading from the acknowledged position after a backoff");
                    self.retries.increment(1);
                    t.rewind();
                }
                continue;
            }
            if !t.eof || t.buf.is_empty() && t.orphan_since.is_none() {
                continue;
            }
            let src = &self.sources[t.source];
            let quiet = now.saturating_sub(t.last_growth_ms);
            let orphan_done = t.orphan_since.is_some_and(|s| {
                now.saturating_sub(s.max(t.last_growth_ms)) >= self.cfg.orphan_grace_ms
            });
            let group_due = src.framer.is_multiline() && quiet >= src.multiline_timeout_ms;
            if !t.buf.is_empty() && (orphan_done || group_due) {
                let data = std::mem::take(&mut t.buf);
                let mut emit = Emit {
                    producer: &self.producer,
                    host: &self.host,
                    generation: self.generation,
                    inflight: &mut self.inflight_bytes,
                    frames: &mut self.frames,
                };
                let (used, refused) = emit.frames(key, t, src, &data, true, orphan_done);
                t.refused = refused;
                t.buf = data[used..].to_vec();
                t.buf_off += used as u64;
            }
            if orphan_done && t.buf.is_empty() && t.pending.is_empty() {
                tracing::info!(path = %t.path.display(), id = ?t.ident.as_ref().map(|i| &i.id), offset = t.acked, "finished: read to its end and acknowledged; closing");
                drop_keys.push(key);
            }
        }
        for key in drop_keys {
            if let Some(t) = self.files.remove(&key) {
                if self.by_inode.get(&(t.dev, t.ino)) == Some(&key) {
                    self.by_inode.remove(&(t.dev, t.ino));
                }
                if self.by_path.get(&t.path) == Some(&key) {
                    self.by_path.remove(&t.path);
                }
                self.checkpoint_dirty = true;
            }
        }
    }

    // --------------------------------------------------------------------------------------
    // Acknowledgements

    fn drain_acks(&mut self) {
        {
            let mut shared = self
                .producer
                .context()
                .acks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut *shared, &mut self.acks);
        }
        let acks = std::mem::take(&mut self.acks);
        // Reports come in runs of one file's records: look the file up and settle its
        // watermark and counters once per run, not once per record.
        for run in acks.chunk_by(|a, b| a.key() == b.key()) {
            let key = run[0].key();
            if key == MANIFEST_KEY {
                continue;
            }
            let Some(t) = self.files.get_mut(&key) else {
                continue;
            };
            for a in run {
                if a.generation() != self.generation as u8 {
                    continue;
                }
                let Some(front) = t.pending.front() else {
                    break;
                };
                // Sequence numbers modulo 2^32: the distance from the oldest pending record.
                let idx = a.seq().wrapping_sub(front.seq as u32);
                let Some(p) = t.pending.get_mut(idx as usize) else {
                    continue;
                };
                if p.state != State::InFlight || p.seq as u32 != a.seq() {
                    continue;
                }
                self.inflight_bytes = self.inflight_bytes.saturating_sub(p.size + RECORD_OVERHEAD);
                if a.ok {
                    p.state = State::Acked;
                } else {
                    p.state = State::Failed;
                    t.failed = true;
                }
            }
            let (mut bytes, mut lines) = (0u64, 0u64);
            while t.pending.front().is_some_and(|p| p.state == State::Acked) {
                if let Some(p) = t.pending.pop_front() {
                    t.acked = p.end;
                    bytes += p.size;
                    lines += u64::from(p.lines);
                }
            }
            if bytes > 0 {
                t.backoff_ms = 0;
                self.checkpoint_dirty = true;
                let src = &self.sources[t.source];
                src.bytes_acked.increment(bytes);
                src.lines_acked.increment(lines);
            }
        }
        self.acks = acks;
        self.acks.clear();
    }

    /// A fatal idempotence error makes the producer unusable: start a new one and re-read
    /// every file from its acknowledged position.
    fn check_fatal(&mut self) {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return;
        };
        tracing::error!(?code, %reason, "fatal producer error: recreating the producer and re-reading from acknowledged positions");
        match make_producer(
            &self.cfg.output,
            &self.host,
            self.cfg.max_inflight_bytes,
            self.tx.clone(),
        ) {
            Ok(p) => {
                self.producer = p;
                self.generation += 1;
                self.inflight_bytes = 0;
                self.retries.increment(1);
                self.files.retain(|_, t| t.file.is_some());
                for t in self.files.values_mut() {
                    t.rewind();
                }
            }
            Err(e) => tracing::error!(error = %e, "recreating the producer failed; will retry"),
        }
    }

    // --------------------------------------------------------------------------------------
    // Checkpoints and manifests

    fn checkpoint(&self) -> Checkpoint {
        let mut files: Vec<FileEntry> = self
            .files
            .values()
            .filter(|t| t.file.is_some())
            .filter_map(|t| {
                let ident = t.ident.as_ref()?;
                Some(FileEntry {
                    id: ident.id.clone(),
                    path: t.path.clone(),
                    dev: t.dev,
                    ino: t.ino,
                    sig_len: ident.sig.len,
                    sig_crc: ident.sig.crc,
                    offset: t.acked,
                })
            })
            .collect();
        // Checkpointed files not seen yet keep their entries.
        files.extend(self.resume.values().cloned());
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Checkpoint {
            host: self.host.clone(),
            files,
        }
    }

    fn save_checkpoint(&mut self) {
        match self.store.save(&self.checkpoint()) {
            Ok(()) => self.checkpoint_dirty = false,
            Err(e) => {
                metrics::counter!("qanat_agent_checkpoint_errors_total").increment(1);
                tracing::error!(error = %e, "writing the checkpoint failed; will retry");
            }
        }
    }

    fn send_manifest(&mut self) {
        if self.cfg.manifest_topic.is_empty() {
            return;
        }
        let mut files = Vec::new();
        for t in self.files.values() {
            if t.orphan_since.is_some() {
                continue;
            }
            let (Some(f), Some(ident)) = (t.file.as_ref(), t.ident.as_ref()) else {
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            let mtime_ms = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            files.push(serde_json::json!({
                "path": t.path_str,
                "file": ident.id,
                "size": meta.len(),
                "mtime_ms": mtime_ms,
            }));
        }
        let value = serde_json::json!({
            "host": self.host,
            "ts_ms": self.clock.now_ms(),
            "files": files,
        })
        .to_string();
        let record = BaseRecord::with_opaque_to(
            &self.cfg.manifest_topic,
            tag(self.generation, MANIFEST_KEY, 0),
        )
        .key(self.host.as_bytes())
        .payload(value.as_bytes());
        if let Err((e, _)) = self.producer.send(record) {
            tracing::warn!(error = %e, "manifest not sent");
        }
    }

    fn shutdown(&mut self) -> Result<(), AgentError> {
        tracing::info!(
            inflight_bytes = self.inflight_bytes,
            "shutting down: waiting for acknowledgements"
        );
        let start = std::time::Instant::now();
        loop {
            let _ = self.producer.flush(Duration::from_millis(200));
            self.drain_acks();
            let busy = self.files.values().any(|t| !t.settled());
            if !busy || start.elapsed() >= SHUTDOWN_FLUSH {
                break;
            }
        }
        // The last chance to record how far files were delivered: a failure must not pass
        // for success, or the next start re-reads (or, worse, an operator trusts) stale positions.
        if let Err(e) = self.store.save(&self.checkpoint()) {
            metrics::counter!("qanat_agent_checkpoint_errors_total").increment(1);
            tracing::error!(path = %self.store.path().display(), error = %e, "final checkpoint NOT written: the next start resumes from the last checkpoint that was");
            return Err(AgentError::FinalCheckpoint(e));
        }
        tracing::info!(path = %self.store.path().display(), files = self.files.len(), "final checkpoint written");
        Ok(())
    }
}

/// Whether to read more of a file with `buffered` unconsumed bytes. Records librdkafka refused
/// are framed again first while a chunk's worth of them waits, so a refusal that lasts cannot
/// pull the whole file into memory. Anything else left over is a partial line or a multiline
/// group that needs more bytes: the framer cuts a line at `max_line_bytes` only once it sees
/// more than that, so stopping there would stall on a long unterminated line.
fn should_read(buffered: usize, chunk: usize, refused: bool) -> bool {
    !(refused && buffered >= chunk)
}

/// Build and run an agent until `shutdown` is set.
pub fn run(
    cfg: AgentConfig,
    fs: Box<dyn CheckpointFs>,
    clock: Arc<dyn Clock>,
    shutdown: &AtomicBool,
    on_ready: impl FnOnce(&Agent),
) -> Result<(), AgentError> {
    Agent::new(cfg, fs, clock)?.run(shutdown, on_ready)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The reading side of `read_file` over an in-memory file: read while `should_read` says
    /// so, frame, keep the unconsumed tail. Returns the consumed position once a round makes
    /// no progress (the file is exhausted or reading stalled) and the frames' sizes.
    fn read_like_the_agent(file: &[u8], framer: &Framer, chunk: usize) -> (usize, Vec<usize>) {
        let (mut buf, mut buf_off, mut sizes) = (Vec::new(), 0usize, Vec::new());
        let mut frames = Vec::new();
        loop {
            let pos = buf_off + buf.len();
            let n = if should_read(buf.len(), chunk, false) {
                let n = chunk.min(file.len() - pos);
                buf.extend_from_slice(&file[pos..pos + n]);
                n
            } else {
                0
            };
            frames.clear();
            let used = framer.frame(&buf, false, false, &mut frames);
            sizes.extend(frames.iter().map(|f| f.end - f.start));
            buf.drain(..used);
            buf_off += used;
            if n == 0 && used == 0 {
                return (buf_off, sizes);
            }
        }
    }

    #[test]
    fn a_long_unterminated_line_is_cut_instead_of_stalling_the_file() {
        // As with the defaults, the read chunk equals the maximum line length.
        let (max, chunk) = (256, 256);
        let framer = Framer::new(max, None);
        let mut file = vec![b'x'; 50 * max + 100];
        let (pos, sizes) = read_like_the_agent(&file, &framer, chunk);
        assert_eq!(
            pos,
            50 * max,
            "every whole piece of the unterminated line is taken"
        );
        assert_eq!(sizes, vec![max; 50]);
        // The newline arrives: the rest of the line goes, then the lines after it.
        file.extend_from_slice(b"\nnext\n");
        let (pos, sizes) = read_like_the_agent(&file, &framer, chunk);
        assert_eq!(pos, file.len());
        assert_eq!(sizes[50..], [101, 5]);
    }

    #[test]
    fn a_pending_multiline_group_longer_than_a_chunk_keeps_reading() {
        let framer = Framer::new(1000, Some(Regex::new("^S").unwrap()));
        let mut file = b"S start\n".to_vec();
        for _ in 0..40 {
            file.extend_from_slice(b"  continuation line\n");
        }
        file.extend_from_slice(b"S next\n");
        let (pos, sizes) = read_like_the_agent(&file, &framer, 64);
        assert!(sizes[0] > 64, "the group is read past one chunk: {sizes:?}");
        assert_eq!(pos, file.len() - b"S next\n".len());
    }

    /// A disk that is full: reads find nothing, every write fails with ENOSPC.
    struct FullDisk;

    impl CheckpointFs for FullDisk {
        fn read(&self, _path: &std::path::Path) -> io::Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn write_synced(&self, _path: &std::path::Path, _bytes: &[u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(28))
        }
        fn rename(&self, _from: &std::path::Path, _to: &std::path::Path) -> io::Result<()> {
            Ok(())
        }
        fn sync_dir(&self, _dir: &std::path::Path) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_final_checkpoint_that_cannot_be_written_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "checkpoint_dir = \"{d}/state\"\ninotify = false\nmanifest_topic = \"\"\n\
             [output]\nbootstrap = \"127.0.0.1:1\"\n\
             [[source]]\npaths = [\"{d}/*.log\"]\ntopic = \"logs\"\n",
            d = dir.path().display()
        );
        let cfg = AgentConfig::from_toml_with_env(&toml, Vec::new()).unwrap();
        // Stopped before it starts: it scans, then shuts down at once.
        let stop = AtomicBool::new(true);
        let err = run(
            cfg,
            Box::new(FullDisk),
            Arc::new(crate::clock::SystemClock),
            &stop,
            |_| {},
        )
        .unwrap_err();
        let AgentError::FinalCheckpoint(CheckpointError::Io { path, source }) = &err else {
            panic!("not a final checkpoint error: {err:?}");
        };
        assert_eq!(path, &dir.path().join("state/checkpoint.tmp"));
        assert_eq!(source.raw_os_error(), Some(28));
        assert!(err.to_string().contains("checkpoint.tmp"), "{err}");
    }

    #[test]
    fn refused_records_are_framed_again_before_reading_more() {
        assert!(!should_read(256, 256, true));
        assert!(should_read(255, 256, true));
        assert!(should_read(256, 256, false));
    }
}
