//! The agent loop: discovery, reading, framing, handing records to the sink, delivery reports,
//! checkpoints and manifests. One thread owns all state and sleeps on one channel, woken by
//! the watcher and by the sink's reports.
//!
//! Per file the loop keeps the open descriptor, its path and timers (`Tracked`); what was read,
//! handed out and acknowledged is the file's [`FileTracker`]. The records of a file carry
//! increasing sequence numbers and its checkpointed offset is the tracker's acknowledged
//! watermark. A refused record pauses the file briefly and is offered again; a failed one makes
//! the file re-read from the watermark once its other records are settled, after a backoff.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use metrics::{Counter, Gauge};
use regex::bytes::Regex;

use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointFs, CheckpointStore, FileEntry};
use crate::clock::Clock;
use crate::config::{AgentConfig, ConfigError, CorruptPolicy, ProducerKind};
use crate::discovery::{DiscoveryError, FsEvent, Matcher, Watcher};
use crate::framing::{Frame, Framer};
use crate::identity::{file_id, initial_signature, signature_of, Signature};
use crate::sink::kafka::KafkaSink;
use crate::sink::native::NativeSink;
use crate::sink::{
    Delivery, Record, SendError, Sink, SinkError, Trajectory, Waker, FILE_KEY_MASK, MAX_FILE_KEY,
};
use crate::tracker::{FileTracker, Ident};

/// librdkafka's own memory per queued record beyond its bytes (message struct, headers),
/// counted against `max_inflight_bytes` so the cap bounds memory, not just payload.
const RECORD_OVERHEAD: u64 = 512;
/// Pause before retrying a file whose records the sink refused.
const REFUSED_RETRY_MS: u64 = 20;
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
    Producer(#[from] SinkError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

enum Wake {
    Fs(FsEvent),
    Ack,
}

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

/// A tracked file: the descriptor and timers around its [`FileTracker`].
struct Tracked {
    source: usize,
    path: PathBuf,
    path_str: String,
    /// `None` once the content is gone (truncated in place): only waiting for reports.
    file: Option<File>,
    state: FileTracker,
    eof: bool,
    retry_at: u64,
    last_growth_ms: u64,
    seen: bool,
    orphan_since: Option<u64>,
}

impl Tracked {
    fn new(source: usize, path: PathBuf, file: File, state: FileTracker, now: u64) -> Tracked {
        Tracked {
            source,
            path_str: path.to_string_lossy().into_owned(),
            path,
            file: Some(file),
            state,
            eof: false,
            retry_at: 0,
            last_growth_ms: now,
            seen: true,
            orphan_since: None,
        }
    }

    /// Forget everything past the watermark and read again from there.
    fn rewind(&mut self) {
        self.state.rewind();
        self.eof = false;
    }
}

/// When the loop's periodic work is due next.
struct Schedule {
    rescan: u64,
    poll: u64,
    checkpoint: u64,
    manifest: u64,
    last_rescan: u64,
}

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
    sink: Box<dyn Sink>,
    inflight_bytes: u64,
    rx: Receiver<Wake>,
    /// Held so the channel never disconnects (a disconnected `recv_timeout` would not sleep).
    _tx: Sender<Wake>,
    watcher: Option<Watcher>,
    checkpoint_dirty: bool,
    rescan_soon: bool,
    scratch: Vec<u8>,
    frames: Vec<Frame>,
    deliveries: Vec<Delivery>,
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

/// Each source's topic, headers, framer and counters.
fn source_runtimes(cfg: &AgentConfig) -> Result<Vec<SourceRt>, AgentError> {
    let mut sources = Vec::new();
    for s in &cfg.sources {
        let re = match &s.multiline_start {
            Some(p) => Some(
                Regex::new(p).map_err(|e| ConfigError::Invalid(format!("multiline_start: {e}")))?,
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
    Ok(sources)
}

/// The checkpointed files by dev+inode, applying `on_corrupt_checkpoint` to a corrupt checkpoint.
fn load_checkpoint(
    store: &CheckpointStore<Box<dyn CheckpointFs>>,
    host: &str,
    cfg: &AgentConfig,
    clock: &dyn Clock,
) -> Result<HashMap<(u64, u64), FileEntry>, AgentError> {
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
                CorruptPolicy::Stop => return Err(AgentError::CorruptCheckpoint { path, reason }),
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
    Ok(resume)
}

/// The inotify watcher, its events forwarded into the loop's wake channel; `None` when
/// disabled or unavailable (the rescan finds everything anyway).
fn start_watcher(cfg: &AgentConfig, tx: &Sender<Wake>) -> Result<Option<Watcher>, AgentError> {
    if !cfg.inotify {
        tracing::info!("inotify disabled: discovery by periodic rescan only");
        return Ok(None);
    }
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
        Ok(w) => Ok(Some(w)),
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; discovery by rescan only");
            Ok(None)
        }
    }
}

/// Where a file's records go.
struct Emit<'a> {
    sink: &'a mut dyn Sink,
    host: &'a str,
    inflight: &'a mut u64,
    frames: &'a mut Vec<Frame>,
}

impl Emit<'_> {
    /// Frame `data` (the file's bytes from `t.state.consumed()`) and hand its events to the
    /// sink; returns how many bytes were consumed and whether the sink refused one.
    fn frames(
        &mut self,
        key: u64,
        t: &mut Tracked,
        src: &SourceRt,
        data: &[u8],
        flush_group: bool,
        final_flush: bool,
    ) -> (usize, bool) {
        if t.state.ident().is_none() {
            return (0, false);
        }
        let frames = &mut *self.frames;
        frames.clear();
        let mut used = src.framer.frame(data, flush_group, final_flush, frames);
        let base = t.state.consumed();
        let (mut lines, mut sent, mut refused) = (0u64, 0usize, false);
        for fr in frames.iter() {
            let Some(ident) = t.state.ident() else { break };
            let offset = base + fr.start as u64;
            let size = (fr.end - fr.start) as u64;
            let record = Record {
                topic: &src.topic,
                file_key: key,
                seq: t.state.next_seq(),
                payload: &data[fr.start..fr.value_end],
                trajectory: Trajectory {
                    host: self.host,
                    file_id: &ident.id,
                    path: &t.path_str,
                    offset,
                    size,
                    lines: fr.lines,
                    attributes: &src.attributes,
                },
            };
            if let Err(e) = self.sink.send(&record) {
                if !matches!(e, SendError::Full) {
                    tracing::warn!(path = %t.path_str, error = %e, "producing failed; will retry");
                }
                used = fr.start;
                refused = true;
                break;
            }
            t.state.handed_out(offset, size, fr.lines);
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
    /// librdkafka producer, start the watcher.
    pub fn new(
        cfg: AgentConfig,
        fs: Box<dyn CheckpointFs>,
        clock: Arc<dyn Clock>,
    ) -> Result<Agent, AgentError> {
        Agent::with_sink(cfg, fs, clock, |cfg, host, wake| {
            let producer = cfg.output.effective_producer();
            if let (ProducerKind::Auto, Some(why)) =
                (cfg.output.producer, cfg.output.needs_librdkafka())
            {
                tracing::info!("shipping through librdkafka: {why} needs it");
            }
            Ok(match producer {
                ProducerKind::Auto | ProducerKind::Native => Box::new(NativeSink::new(
                    &cfg.output,
                    host,
                    cfg.max_inflight_bytes,
                    wake,
                )?),
                ProducerKind::Librdkafka => Box::new(KafkaSink::new(
                    &cfg.output,
                    host,
                    cfg.max_inflight_bytes,
                    wake,
                )?),
            })
        })
    }

    /// As [`Agent::new`], with the sink `make_sink` builds from the configuration, the host id
    /// and the waker to call when reports arrive.
    pub fn with_sink(
        cfg: AgentConfig,
        fs: Box<dyn CheckpointFs>,
        clock: Arc<dyn Clock>,
        make_sink: impl FnOnce(&AgentConfig, &str, Waker) -> Result<Box<dyn Sink>, SinkError>,
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
        let sources = source_runtimes(&cfg)?;
        std::fs::create_dir_all(&cfg.checkpoint_dir).map_err(|source| AgentError::Io {
            what: format!("creating checkpoint dir {}", cfg.checkpoint_dir.display()),
            source,
        })?;
        let store = CheckpointStore::new(fs, cfg.checkpoint_dir.clone());
        let resume = load_checkpoint(&store, &host, &cfg, clock.as_ref())?;
        let (tx, rx) = mpsc::channel();
        let ack_tx = tx.clone();
        let sink = make_sink(
            &cfg,
            &host,
            Arc::new(move || {
                let _ = ack_tx.send(Wake::Ack);
            }),
        )?;
        let watcher = start_watcher(&cfg, &tx)?;
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
            sink,
            inflight_bytes: 0,
            rx,
            _tx: tx,
            watcher,
            checkpoint_dirty: true,
            rescan_soon: false,
            scratch: Vec::new(),
            frames: Vec::new(),
            deliveries: Vec::new(),
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
        let mut due = self.start();
        on_ready(&self);
        while !shutdown.load(Ordering::Acquire) {
            if let Some(idle) = self.turn(&mut due) {
                self.sleep(idle);
            }
        }
        self.shutdown()
    }

    /// The first scan, checkpoint and manifest.
    fn start(&mut self) -> Schedule {
        let now = self.clock.now_ms();
        self.rescan(now);
        self.save_checkpoint();
        self.send_manifest();
        Schedule {
            rescan: now + self.cfg.rescan_interval_ms,
            poll: now + self.cfg.poll_interval_ms,
            checkpoint: now + self.cfg.checkpoint_interval_ms,
            manifest: now + self.cfg.manifest_interval_ms,
            last_rescan: now,
        }
    }

    /// One pass of the loop; returns how long to sleep if nothing was read.
    fn turn(&mut self, due: &mut Schedule) -> Option<Duration> {
        self.drain_acks();
        self.restart_if_broken();
        while let Ok(w) = self.rx.try_recv() {
            self.on_wake(w);
        }
        let now = self.clock.now_ms();
        if now >= due.rescan || (self.rescan_soon && now >= due.last_rescan + 50) {
            self.rescan(now);
            due.last_rescan = now;
            due.rescan = now + self.cfg.rescan_interval_ms;
        }
        if now >= due.poll {
            self.poll_sizes(now);
            due.poll = now + self.cfg.poll_interval_ms;
        }
        let progressed = self.read_round(now);
        self.timers(now);
        if now >= due.checkpoint {
            if self.checkpoint_dirty {
                self.save_checkpoint();
            }
            due.checkpoint = now + self.cfg.checkpoint_interval_ms;
        }
        if now >= due.manifest {
            self.send_manifest();
            due.manifest = now + self.cfg.manifest_interval_ms;
        }
        if progressed {
            return None;
        }
        let next = [due.rescan, due.poll, due.checkpoint, due.manifest]
            .into_iter()
            .min()
            .unwrap_or(now + 100);
        Some(Duration::from_millis(
            next.saturating_sub(now).clamp(1, 100),
        ))
    }

    fn sleep(&mut self, d: Duration) {
        if !self.sink.park() {
            if let Ok(w) = self.rx.recv_timeout(d) {
                self.on_wake(w);
            }
        }
        self.sink.unpark();
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
        let mut state = FileTracker::new(dev, ino);
        if let Some(e) = self.resume.remove(&(dev, ino)) {
            let same = signature_of(&file, e.sig_len)
                .ok()
                .flatten()
                .is_some_and(|s| s.crc == e.sig_crc);
            if same && meta.len() >= e.offset {
                tracing::info!(path = %path.display(), id = %e.id, offset = e.offset, "resuming from checkpoint");
                let sig = Signature {
                    len: e.sig_len,
                    crc: e.sig_crc,
                };
                state = FileTracker::resumed(dev, ino, Ident { id: e.id, sig }, e.offset);
            } else {
                tracing::warn!(path = %path.display(), old_id = %e.id, old_offset = e.offset, size = meta.len(), "checkpointed file was truncated or replaced: reading it from 0 as a new file");
            }
        }
        let mut t = Tracked::new(source, path.clone(), file, state, now);
        if t.state.ident().is_none() {
            self.identify(&mut t, meta.len());
        }
        let key = self.alloc_key(None);
        tracing::debug!(path = %path.display(), id = ?t.state.ident().map(|i| &i.id), "tracking");
        self.by_inode.insert((dev, ino), key);
        self.by_path.insert(path, key);
        self.files.insert(key, t);
        self.checkpoint_dirty = true;
    }

    /// A key for a new tracked file: at most `MAX_FILE_KEY` (it travels with every record),
    /// never `avoid` or one still in use (after the counter wraps).
    fn alloc_key(&mut self, avoid: Option<u64>) -> u64 {
        loop {
            let wrapped = self.next_key > FILE_KEY_MASK;
            let k = self.next_key & FILE_KEY_MASK;
            self.next_key = self.next_key.wrapping_add(1);
            if k > MAX_FILE_KEY || Some(k) == avoid || self.files.contains_key(&k) {
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
            Ok(Some(sig)) => t.state.set_ident(Ident {
                id: file_id(&self.host, t.state.dev(), t.state.ino(), sig),
                sig,
            }),
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
            if meta.len() < t.state.read_pos() {
                replaced.push(*key);
            } else if meta.len() > t.state.read_pos() {
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
        tracing::warn!(path = %old.path.display(), old_id = ?old.state.ident().map(|i| &i.id), read_to = old.state.read_pos(), acked = old.state.acked(), "truncated or rewritten in place: new identity, reading from 0");
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (dev, ino) = (old.state.dev(), old.state.ino());
        let mut t = Tracked::new(
            old.source,
            old.path.clone(),
            file,
            FileTracker::new(dev, ino),
            now,
        );
        t.orphan_since = old.orphan_since;
        self.identify(&mut t, size);
        let new_key = self.alloc_key(Some(key));
        if old.state.has_pending() {
            self.files.insert(key, old);
        }
        if self.by_path.get(&t.path) == Some(&key) {
            self.by_path.insert(t.path.clone(), new_key);
        }
        self.by_inode.insert((dev, ino), new_key);
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
            .filter(|(_, t)| {
                t.file.is_some() && !t.eof && !t.state.is_failed() && now >= t.retry_at
            })
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
        if t.state.ident().is_none() {
            let size = t
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len());
            let sig_bytes = self.cfg.signature_bytes;
            if let Some(f) = t.file.as_ref() {
                if let Ok(Some(sig)) = initial_signature(f, size, sig_bytes) {
                    t.state.set_ident(Ident {
                        id: file_id(&self.host, t.state.dev(), t.state.ino(), sig),
                        sig,
                    });
                    self.checkpoint_dirty = true;
                }
            }
            if t.state.ident().is_none() {
                t.eof = true;
                return false;
            }
        }
        let (Some(file), Some(sig)) = (t.file.as_ref(), t.state.ident().map(|i| i.sig)) else {
            return false;
        };
        let pos = t.state.read_pos();
        let scratch = &mut self.scratch;
        scratch.clear();
        scratch.extend_from_slice(t.state.buffered());
        let old = scratch.len();
        let backlog = !t.state.should_read(chunk);
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
                // Records the sink refused are offered again even if the file does not grow.
                if !t.state.is_refused() {
                    return false;
                }
            } else if n < chunk {
                t.eof = true;
            }
        }
        // Still the same content? (copytruncate may have rewritten it past our position.)
        match signature_of(file, sig.len) {
            Ok(Some(s)) if s == sig => {}
            _ => {
                self.replaced(key, now);
                return true;
            }
        }
        // A retry of refused records read nothing: that is no growth (multiline timeout and
        // orphan grace count from the last real one).
        if n > 0 {
            t.last_growth_ms = now;
        }
        let src = &self.sources[t.source];
        src.bytes_read.increment(n as u64);
        let mut emit = Emit {
            sink: &mut *self.sink,
            host: &self.host,
            inflight: &mut self.inflight_bytes,
            frames: &mut self.frames,
        };
        let (used, refused) = emit.frames(key, t, src, scratch, false, false);
        t.state.keep_unconsumed(scratch, used);
        t.state.set_refused(refused);
        if refused {
            // The sink refused a record (librdkafka's queue full): come back to this file shortly rather
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
                if t.state.settled() {
                    if t.state.is_failed() {
                        tracing::error!(path = %t.path.display(), acked = t.state.acked(), "records of a truncated file failed and cannot be re-read: those bytes are lost");
                    }
                    drop_keys.push(key);
                }
                continue;
            }
            if t.state.is_failed() {
                if t.state.settled() {
                    let backoff_ms = t.state.rewind_after_failure();
                    t.eof = false;
                    t.retry_at = now + backoff_ms;
                    tracing::warn!(path = %t.path.display(), acked = t.state.acked(), backoff_ms, "delivery failed: re-reading from the acknowledged position after a backoff");
                    self.retries.increment(1);
                }
                continue;
            }
            if !t.eof || t.state.buffered().is_empty() && t.orphan_since.is_none() {
                continue;
            }
            let src = &self.sources[t.source];
            let quiet = now.saturating_sub(t.last_growth_ms);
            let orphan_done = t.orphan_since.is_some_and(|s| {
                now.saturating_sub(s.max(t.last_growth_ms)) >= self.cfg.orphan_grace_ms
            });
            let group_due = src.framer.is_multiline() && quiet >= src.multiline_timeout_ms;
            // After a refusal, wait as the read path does instead of re-framing every turn.
            let paused = now < t.retry_at;
            if !t.state.buffered().is_empty() && (orphan_done || group_due) && !paused {
                let data = t.state.take_buffered();
                let mut emit = Emit {
                    sink: &mut *self.sink,
                    host: &self.host,
                    inflight: &mut self.inflight_bytes,
                    frames: &mut self.frames,
                };
                let (used, refused) = emit.frames(key, t, src, &data, true, orphan_done);
                t.state.keep_unconsumed(&data, used);
                t.state.set_refused(refused);
                if refused {
                    t.retry_at = now + REFUSED_RETRY_MS;
                }
            }
            if orphan_done && t.state.buffered().is_empty() && !t.state.has_pending() {
                tracing::info!(path = %t.path.display(), id = ?t.state.ident().map(|i| &i.id), offset = t.state.acked(), "finished: read to its end and acknowledged; closing");
                drop_keys.push(key);
            }
        }
        for key in drop_keys {
            if let Some(t) = self.files.remove(&key) {
                let inode = (t.state.dev(), t.state.ino());
                if self.by_inode.get(&inode) == Some(&key) {
                    self.by_inode.remove(&inode);
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
        let mut deliveries = std::mem::take(&mut self.deliveries);
        self.sink.drain(&mut deliveries);
        // Reports come in runs of one file's records: look the file up and settle its
        // watermark and counters once per run, not once per record.
        for run in deliveries.chunk_by(|a, b| a.file_key == b.file_key) {
            let Some(t) = self.files.get_mut(&run[0].file_key) else {
                continue;
            };
            for d in run {
                if let Some(size) = t.state.settle(d.seq, d.ok) {
                    self.inflight_bytes =
                        self.inflight_bytes.saturating_sub(size + RECORD_OVERHEAD);
                }
            }
            let (bytes, lines) = t.state.advance();
            if bytes > 0 {
                self.checkpoint_dirty = true;
                let src = &self.sources[t.source];
                src.bytes_acked.increment(bytes);
                src.lines_acked.increment(lines);
            }
        }
        deliveries.clear();
        self.deliveries = deliveries;
    }

    /// A sink that broke beyond retrying started over and forgot its in-flight records:
    /// re-read every file from its acknowledged position.
    fn restart_if_broken(&mut self) {
        if !self.sink.restart_if_broken() {
            return;
        }
        self.inflight_bytes = 0;
        self.retries.increment(1);
        self.files.retain(|_, t| t.file.is_some());
        for t in self.files.values_mut() {
            t.rewind();
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
                let ident = t.state.ident()?;
                Some(FileEntry {
                    id: ident.id.clone(),
                    path: t.path.clone(),
                    dev: t.state.dev(),
                    ino: t.state.ino(),
                    sig_len: ident.sig.len,
                    sig_crc: ident.sig.crc,
                    offset: t.state.acked(),
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
            let (Some(f), Some(ident)) = (t.file.as_ref(), t.state.ident()) else {
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
        if let Err(e) = self.sink.send_manifest(
            &self.cfg.manifest_topic,
            self.host.as_bytes(),
            value.as_bytes(),
        ) {
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
            self.sink.flush(Duration::from_millis(200));
            self.drain_acks();
            let busy = self.files.values().any(|t| !t.state.settled());
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

    use crate::checkpoint::OsCheckpointFs;
    use crate::sink::memory::{MemorySink, SentRecord};
    use std::sync::atomic::AtomicU64;

    #[derive(Default)]
    struct ManualClock(AtomicU64);

    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    impl ManualClock {
        fn advance(&self, ms: u64) {
            self.0.fetch_add(ms, Ordering::Relaxed);
        }
    }

    /// An agent over `dir/*.log` with the memory sink `sink`, at clock time 1000.
    fn agent_over(dir: &std::path::Path, sink: &MemorySink) -> (Agent, Arc<ManualClock>) {
        let toml = format!(
            "host = \"h\"\ncheckpoint_dir = \"{d}/state\"\ninotify = false\n\
             manifest_topic = \"\"\n[output]\nbootstrap = \"127.0.0.1:1\"\n\
             [[source]]\npaths = [\"{d}/*.log\"]\ntopic = \"logs\"\n\
             attributes = {{ env = \"prod\" }}\n",
            d = dir.display()
        );
        let cfg = AgentConfig::from_toml_with_env(&toml, Vec::new()).unwrap();
        let clock = Arc::new(ManualClock(AtomicU64::new(1000)));
        let sink = sink.clone();
        let agent = Agent::with_sink(cfg, Box::new(OsCheckpointFs), clock.clone(), |_, _, _| {
            Ok(Box::new(sink))
        })
        .unwrap();
        (agent, clock)
    }

    /// Turn the loop until `sink` holds `n` records (bounded).
    fn turn_until_sent(agent: &mut Agent, due: &mut Schedule, sink: &MemorySink, n: usize) {
        for _ in 0..100 {
            if sink.sent().len() >= n {
                break;
            }
            agent.turn(due);
        }
        assert_eq!(sink.sent().len(), n, "{:?}", sink.sent());
    }

    fn header(r: &SentRecord, name: &str) -> String {
        String::from_utf8(r.header(name).unwrap().to_vec()).unwrap()
    }

    fn payloads(sink: &MemorySink) -> Vec<String> {
        sink.sent()
            .iter()
            .map(|r| String::from_utf8(r.payload.clone()).unwrap())
            .collect()
    }

    fn checkpointed(agent: &Agent) -> u64 {
        let cp = agent.checkpoint();
        assert_eq!(cp.files.len(), 1);
        cp.files[0].offset
    }

    #[test]
    fn records_carry_their_trajectory_and_the_checkpoint_follows_the_acknowledged_prefix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), "one\ntwo\nthree\n").unwrap();
        let sink = MemorySink::new();
        let (mut agent, _clock) = agent_over(dir.path(), &sink);
        let mut due = agent.start();
        turn_until_sent(&mut agent, &mut due, &sink, 3);
        let sent = sink.sent();
        assert_eq!(payloads(&sink), ["one", "two", "three"]);
        let id = header(&sent[0], "qanat.file");
        assert!(id.starts_with("h:"), "{id}");
        for (r, (offset, size)) in sent.iter().zip([(0, 4), (4, 4), (8, 6)]) {
            assert_eq!(r.topic, "logs");
            assert_eq!(r.key, id.as_bytes());
            let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                names,
                [
                    "qanat.host",
                    "qanat.file",
                    "qanat.path",
                    "qanat.offset",
                    "qanat.size",
                    "qanat.lines",
                    "env"
                ]
            );
            assert_eq!(header(r, "qanat.host"), "h");
            assert_eq!(
                header(r, "qanat.path"),
                format!("{}/a.log", dir.path().display())
            );
            assert_eq!(header(r, "qanat.offset"), offset.to_string());
            assert_eq!(header(r, "qanat.size"), size.to_string());
            assert_eq!(header(r, "qanat.lines"), "1");
            assert_eq!(header(r, "env"), "prod");
        }
        let key = sent[0].file_key;
        // Out of order: the later records first leave the watermark where it is.
        assert!(sink.report(key, sent[2].seq, true));
        assert!(sink.report(key, sent[1].seq, true));
        agent.turn(&mut due);
        assert_eq!(checkpointed(&agent), 0);
        assert_eq!(agent.inflight_bytes, 4 + RECORD_OVERHEAD);
        assert!(sink.report(key, sent[0].seq, true));
        agent.turn(&mut due);
        assert_eq!(checkpointed(&agent), 14);
        assert_eq!(agent.inflight_bytes, 0);
    }

    #[test]
    fn a_refusing_sink_pauses_the_file_and_gets_the_rest_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), "a\nb\nc\n").unwrap();
        let sink = MemorySink::new();
        sink.set_capacity(Some(1));
        let (mut agent, clock) = agent_over(dir.path(), &sink);
        let mut due = agent.start();
        turn_until_sent(&mut agent, &mut due, &sink, 1);
        let t = agent.files.values().next().unwrap();
        assert!(t.state.is_refused());
        assert_eq!(
            t.state.buffered(),
            b"b\nc\n",
            "the refused records are kept"
        );
        for n in 2..=3 {
            sink.report_all(true);
            // The file waits out its pause before offering the refused record again.
            agent.turn(&mut due);
            assert_eq!(sink.sent().len(), n - 1);
            clock.advance(REFUSED_RETRY_MS);
            turn_until_sent(&mut agent, &mut due, &sink, n);
        }
        sink.report_all(true);
        agent.turn(&mut due);
        let sent = sink.sent();
        assert_eq!(payloads(&sink), ["a", "b", "c"]);
        let seqs: Vec<u64> = sent.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        let offsets: Vec<String> = sent.iter().map(|r| header(r, "qanat.offset")).collect();
        assert_eq!(offsets, ["0", "2", "4"]);
        assert_eq!(checkpointed(&agent), 6);
    }

    #[test]
    fn a_failed_delivery_resends_whole_records_from_the_watermark_after_a_backoff() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), "a\nb\nc\n").unwrap();
        let sink = MemorySink::new();
        let (mut agent, clock) = agent_over(dir.path(), &sink);
        let mut due = agent.start();
        turn_until_sent(&mut agent, &mut due, &sink, 3);
        let sent = sink.sent();
        let key = sent[0].file_key;
        sink.report(key, sent[0].seq, true);
        sink.report(key, sent[1].seq, false);
        sink.report(key, sent[2].seq, true);
        agent.turn(&mut due);
        assert_eq!(checkpointed(&agent), 2);
        // Nothing is sent again before the backoff has passed.
        for _ in 0..3 {
            agent.turn(&mut due);
        }
        assert_eq!(sink.sent().len(), 3);
        clock.advance(500);
        turn_until_sent(&mut agent, &mut due, &sink, 5);
        assert_eq!(payloads(&sink), ["a", "b", "c", "b", "c"]);
        let resent = &sink.sent()[3..];
        assert_eq!(header(&resent[0], "qanat.offset"), "2");
        assert_eq!(header(&resent[1], "qanat.offset"), "4");
        sink.report_all(true);
        agent.turn(&mut due);
        assert_eq!(checkpointed(&agent), 6);
        assert_eq!(agent.inflight_bytes, 0);
    }

    #[test]
    fn a_sink_that_starts_over_makes_every_file_resend_from_its_watermark() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), "a\nb\nc\n").unwrap();
        let sink = MemorySink::new();
        let (mut agent, _clock) = agent_over(dir.path(), &sink);
        let mut due = agent.start();
        turn_until_sent(&mut agent, &mut due, &sink, 3);
        let first = sink.sent()[0].clone();
        assert!(sink.report(first.file_key, first.seq, true));
        agent.turn(&mut due);
        sink.break_down();
        turn_until_sent(&mut agent, &mut due, &sink, 5);
        assert_eq!(payloads(&sink), ["a", "b", "c", "b", "c"]);
        sink.report_all(true);
        agent.turn(&mut due);
        assert_eq!(checkpointed(&agent), 6);
    }
}
