//! The topic registry: which topics exist, their partitions, and where they live on disk.
//!
//! A partition is the directory `DATA_DIR/<topic>-<partition>/` (Kafka's layout); the set of
//! topics is derived from the directory listing at start, with no catalogue file. Each
//! partition directory holds `partition.metadata` (Kafka's format: `version: 0`,
//! `topic_id: <base64url>`) with the topic id, drawn at random when the topic is created, so a
//! topic deleted and created again under the same name gets a new id. Directories written
//! before that file existed keep an id derived from the name.
//!
//! Creating and deleting a topic touch many directories; an intent file in the data directory,
//! made durable before the first of them, makes each all-or-nothing across errors and crashes:
//! - create: `<topic>.creating`, then the partition directories (each synced), then the intent
//!   is removed — the commit point. An error on the way (e.g. out of file descriptors) removes
//!   what was made; open removes every `<topic>-N` directory of a leftover intent.
//! - delete: `<topic>.deleting` is the commit point; then the directories go, then the intent.
//!   Open (or a later create of the name) finishes a leftover deletion.
//! - grow (CreatePartitions): `<topic>.growing` holds the old count; like create, a failure or
//!   an interrupted grow removes the partitions at or above it.
//!
//! Invariants: after `open`, every topic is complete (partitions 0..N, one id) or absent, and no
//! intent file is left; an `Ok` from `create`/`delete`/`add_partitions` holds across a crash.
//!
//! Auto-creation (Metadata/Produce for an unknown topic) refuses a name deleted less than the
//! given quiet period ago, so producers still writing to a deleted topic do not bring it back
//! with the default partition count; explicit creation works at once. The deletion times are
//! kept in memory only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use parking_lot::RwLock;
use qanat_log::{Clock, LogConfig, LogError, Partition, Storage};

use crate::fdlimit;

/// One topic and its partitions, in partition order.
pub struct Topic {
    pub name: String,
    pub id: [u8; 16],
    pub partitions: Vec<Arc<Partition>>,
    /// Its traffic counters, registered once rather than looked up by label on every request.
    pub counters: TopicCounters,
}

/// The per-topic counters of the produce and fetch paths.
pub struct TopicCounters {
    pub bytes_in: metrics::Counter,
    pub records_in: metrics::Counter,
    pub duplicates: metrics::Counter,
    pub bytes_out: metrics::Counter,
    pub records_out: metrics::Counter,
}

impl TopicCounters {
    /// The counters of topic `name` in the installed recorder (no-ops without one).
    pub fn new(name: &str) -> Self {
        let counter = |metric: &'static str| metrics::counter!(metric, "topic" => name.to_string());
        Self {
            bytes_in: counter("qanat_bytes_in_total"),
            records_in: counter("qanat_records_in_total"),
            duplicates: counter("qanat_produce_duplicates_total"),
            bytes_out: counter("qanat_bytes_out_total"),
            records_out: counter("qanat_records_out_total"),
        }
    }

    /// Counters that count nothing, for a topic that is only described (a validate-only
    /// create), so no series of a topic that does not exist appears.
    fn unregistered() -> Self {
        Self {
            bytes_in: metrics::Counter::noop(),
            records_in: metrics::Counter::noop(),
            duplicates: metrics::Counter::noop(),
            bytes_out: metrics::Counter::noop(),
            records_out: metrics::Counter::noop(),
        }
    }
}

/// Errors of topic management; each maps to one Kafka error code.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("invalid topic name {0:?}: use 1-249 characters of [a-zA-Z0-9._-], not '.' or '..'")]
    InvalidName(String),
    #[error("topic {0} already exists")]
    AlreadyExists(String),
    #[error("invalid partition count {0}")]
    InvalidPartitions(i64),
    #[error("unknown topic {0}")]
    Unknown(String),
    #[error(
        "topic {name} was deleted {ago_ms} ms ago and is not auto-created again for \
         {quiet_ms} ms ([broker] auto_create_after_delete_ms); create it explicitly to reuse \
         the name now"
    )]
    RecentlyDeleted {
        name: String,
        ago_ms: u64,
        quiet_ms: u64,
    },
    #[error(
        "out of file descriptors {action}: {partitions} partitions need at least {partitions} \
         open files (one per segment) plus one per client connection, and the limit \
         (RLIMIT_NOFILE) is {limit}; raise `ulimit -n` (LimitNOFILE= under systemd) for the \
         broker"
    )]
    OutOfFileDescriptors {
        action: String,
        partitions: usize,
        limit: String,
    },
    #[error("storage error: {0}")]
    Storage(#[from] LogError),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TopicError {
    fn is_out_of_fds(&self) -> bool {
        match self {
            TopicError::Io { source, .. } | TopicError::Storage(LogError::Io { source, .. }) => {
                fdlimit::is_out_of_fds(source)
            }
            TopicError::OutOfFileDescriptors { .. } => true,
            _ => false,
        }
    }

    /// Name the cause and the fix when the error is a lack of file descriptors.
    fn explain_fds(self, action: impl FnOnce() -> String, partitions: usize) -> Self {
        if self.is_out_of_fds() {
            TopicError::OutOfFileDescriptors {
                action: action(),
                partitions,
                limit: fdlimit::describe_limit(),
            }
        } else {
            self
        }
    }
}

/// Most partitions a topic may have; bounds what one request can make the broker open.
pub const MAX_PARTITIONS: u32 = 10_000;

/// Per partition directory: the topic id (Kafka's file name and format).
pub const PARTITION_METADATA: &str = "partition.metadata";
/// Intent files in the data directory: `<topic>.creating`, `<topic>.deleting`,
/// `<topic>.growing` (holding the partition count before the grow).
const CREATING: &str = ".creating";
const DELETING: &str = ".deleting";
const GROWING: &str = ".growing";

/// All topics of this broker.
pub struct TopicRegistry {
    data_dir: PathBuf,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    log_config: LogConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes create/delete/grow so two creators of one topic cannot race.
    admin: parking_lot::Mutex<()>,
    /// When each topic was last deleted (clock ms), for the auto-creation quiet period.
    deleted_at: parking_lot::Mutex<HashMap<String, i64>>,
}

impl TopicRegistry {
    /// Finish or undo interrupted creates and deletes, then open every partition found under
    /// `data_dir`, recovering each.
    pub fn open(
        data_dir: &Path,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        log_config: LogConfig,
    ) -> Result<Self, TopicError> {
        storage
            .create_dir_all(data_dir)
            .map_err(|source| TopicError::Io {
                path: data_dir.to_path_buf(),
                source,
            })?;
        let registry = Self {
            data_dir: data_dir.to_path_buf(),
            storage,
            clock,
            log_config,
            topics: RwLock::new(BTreeMap::new()),
            admin: parking_lot::Mutex::new(()),
            deleted_at: parking_lot::Mutex::new(HashMap::new()),
        };
        for entry in registry.list_data_dir()? {
            if let Some(topic) = intent_topic(&entry, CREATING) {
                let removed = registry.remove_partition_dirs(topic, 0)?;
                registry.clear_intent(topic, CREATING)?;
                tracing::warn!(
                    topic,
                    removed_partitions = removed,
                    "removed a topic whose creation did not finish"
                );
            } else if let Some(topic) = intent_topic(&entry, GROWING) {
                match registry.read_intent_count(topic) {
                    Some(previous) => {
                        let removed = registry.remove_partition_dirs(topic, previous)?;
                        tracing::warn!(
                            topic,
                            partitions = previous,
                            removed_partitions = removed,
                            "removed the partitions of a grow that did not finish"
                        );
                    }
                    None => tracing::warn!(
                        topic,
                        "unreadable grow intent: keeping every partition directory"
                    ),
                }
                registry.clear_intent(topic, GROWING)?;
            } else if let Some(topic) = intent_topic(&entry, DELETING) {
                let removed = registry.remove_partition_dirs(topic, 0)?;
                registry.clear_intent(topic, DELETING)?;
                tracing::warn!(
                    topic,
                    removed_partitions = removed,
                    "finished deleting a topic"
                );
            }
        }
        let mut found: BTreeMap<String, u32> = BTreeMap::new();
        for entry in registry.list_data_dir()? {
            if let Some((topic, partition)) = parse_partition_dir(&entry) {
                let count = found.entry(topic.to_string()).or_default();
                *count = (*count).max(partition + 1);
            }
        }
        let total: usize = found.values().map(|&c| c as usize).sum();
        for (name, count) in found {
            // A missing directory in the middle of the range is re-created empty.
            let topic = registry.load_topic(&name, count).map_err(|e| {
                e.explain_fds(
                    || format!("opening the {total} partitions of the data directory"),
                    total,
                )
            })?;
            registry.topics.write().insert(name, Arc::new(topic));
        }
        Ok(registry)
    }

    fn io_error(&self, path: &Path) -> impl FnOnce(std::io::Error) -> TopicError {
        let path = path.to_path_buf();
        move |source| TopicError::Io { path, source }
    }

    fn list_data_dir(&self) -> Result<Vec<String>, TopicError> {
        self.storage
            .list_dir(&self.data_dir)
            .map_err(self.io_error(&self.data_dir))
    }

    fn sync_data_dir(&self) -> Result<(), TopicError> {
        self.storage
            .sync_dir(&self.data_dir)
            .map_err(self.io_error(&self.data_dir))
    }

    fn partition_dir(&self, topic: &str, partition: u32) -> PathBuf {
        self.data_dir.join(format!("{topic}-{partition}"))
    }

    fn intent_path(&self, topic: &str, kind: &str) -> PathBuf {
        self.data_dir.join(format!("{topic}{kind}"))
    }

    /// Make the intent file durable with `content`: the data, then its directory entry.
    fn write_intent(&self, topic: &str, kind: &str, content: &[u8]) -> Result<(), TopicError> {
        let path = self.intent_path(topic, kind);
        let file = self.storage.open(&path).map_err(self.io_error(&path))?;
        file.set_len(0)
            .and_then(|()| file.append(content))
            .and_then(|()| file.sync_data())
            .map_err(self.io_error(&path))?;
        drop(file);
        self.sync_data_dir()
    }

    /// The partition count stored in a grow intent.
    fn read_intent_count(&self, topic: &str) -> Option<u32> {
        let path = self.intent_path(topic, GROWING);
        let file = self.storage.open(&path).ok()?;
        let len = usize::try_from(file.len().ok()?)
            .ok()
            .filter(|&l| l <= 16)?;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf).ok()?.parse().ok()
    }

    /// Remove the intent file durably (a missing one is fine).
    fn clear_intent(&self, topic: &str, kind: &str) -> Result<(), TopicError> {
        let path = self.intent_path(topic, kind);
        match self.storage.remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io_error(&path)(e)),
        }
        self.sync_data_dir()
    }

    /// Remove every `<topic>-N` directory with N ≥ `from`, durably. Returns how many there were.
    fn remove_partition_dirs(&self, topic: &str, from: u32) -> Result<usize, TopicError> {
        let mut removed = 0;
        for entry in self.list_data_dir()? {
            if parse_partition_dir(&entry).is_some_and(|(t, n)| t == topic && n >= from) {
                let dir = self.data_dir.join(&entry);
                self.storage
                    .remove_dir_all(&dir)
                    .map_err(self.io_error(&dir))?;
                removed += 1;
            }
        }
        if removed > 0 {
            self.sync_data_dir()?;
        }
        Ok(removed)
    }

    fn open_partition(&self, topic: &str, index: u32) -> Result<Arc<Partition>, TopicError> {
        let dir = self.partition_dir(topic, index);
        let (partition, report) = Partition::open(
            self.storage.clone(),
            self.clock.clone(),
            dir.clone(),
            self.log_config.clone(),
        )?;
        if report.truncated_bytes > 0 || !report.rebuilt_indexes.is_empty() {
            tracing::warn!(
                partition = %dir.display(),
                truncated_bytes = report.truncated_bytes,
                truncated_at = ?report.truncated_at,
                rebuilt_indexes = ?report.rebuilt_indexes,
                "partition recovered"
            );
        }
        Ok(Arc::new(partition))
    }

    /// Make and open partitions `from..to` of a topic, each with its `partition.metadata`,
    /// and sync the data directory so the new directories are durable. On an error the
    /// partitions opened so far are dropped (their descriptors closed); their directories
    /// are left for the caller to remove.
    fn make_partitions(
        &self,
        topic: &str,
        id: [u8; 16],
        from: u32,
        to: u32,
    ) -> Result<Vec<Arc<Partition>>, TopicError> {
        let mut made = Vec::with_capacity(to.saturating_sub(from) as usize);
        for index in from..to {
            let dir = self.partition_dir(topic, index);
            self.storage
                .create_dir_all(&dir)
                .map_err(self.io_error(&dir))?;
            self.write_topic_id(&dir, id)?;
            // Partition::open syncs the new directory, which makes the metadata entry durable.
            made.push(self.open_partition(topic, index)?);
        }
        self.sync_data_dir()?;
        Ok(made)
    }

    fn write_topic_id(&self, dir: &Path, id: [u8; 16]) -> Result<(), TopicError> {
        let path = dir.join(PARTITION_METADATA);
        let text = format!(
            "version: 0\ntopic_id: {}\n",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
        );
        let file = self.storage.open(&path).map_err(self.io_error(&path))?;
        file.set_len(0)
            .and_then(|()| file.append(text.as_bytes()))
            .and_then(|()| file.sync_data())
            .map_err(self.io_error(&path))
    }

    /// The id in a partition directory's `partition.metadata`; `None` when absent or unreadable.
    fn read_topic_id(&self, dir: &Path) -> Option<[u8; 16]> {
        let path = dir.join(PARTITION_METADATA);
        if !self.storage.exists(&path) {
            return None;
        }
        let parsed = self
            .storage
            .open(&path)
            .and_then(|f| {
                let len = usize::try_from(f.len()?).unwrap_or(usize::MAX).min(1024);
                let mut buf = vec![0; len];
                f.read_exact_at(&mut buf, 0)?;
                Ok(buf)
            })
            .map_err(|e| e.to_string())
            .and_then(|buf| parse_partition_metadata(&buf));
        match parsed {
            Ok(id) => Some(id),
            Err(reason) => {
                tracing::warn!(file = %path.display(), reason, "ignoring unreadable partition metadata");
                None
            }
        }
    }

    /// Open an existing topic's partitions; its id is the one stored in its directories.
    fn load_topic(&self, name: &str, count: u32) -> Result<Topic, TopicError> {
        let mut id = None;
        for index in 0..count {
            let stored = self.read_topic_id(&self.partition_dir(name, index));
            match (id, stored) {
                (None, Some(s)) => id = Some(s),
                (Some(first), Some(s)) if first != s => tracing::warn!(
                    topic = name,
                    partition = index,
                    "partition metadata names another topic id than partition 0; using the first"
                ),
                _ => {}
            }
        }
        let partitions = (0..count)
            .map(|p| self.open_partition(name, p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Topic {
            name: name.to_string(),
            // Directories from before partition.metadata: an id derived from the name.
            id: id.unwrap_or_else(|| legacy_topic_id(name)),
            partitions,
            counters: TopicCounters::new(name),
        })
    }

    /// The topic, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().get(name).cloned()
    }

    /// Every topic, by name.
    pub fn all(&self) -> Vec<Arc<Topic>> {
        self.topics.read().values().cloned().collect()
    }

    /// Create a topic, all or nothing. `validate_only` checks without creating.
    pub fn create(
        &self,
        name: &str,
        partitions: i64,
        validate_only: bool,
    ) -> Result<Arc<Topic>, TopicError> {
        self.create_checked(name, partitions, validate_only, None)
    }

    /// `create`, refused with [`TopicError::RecentlyDeleted`] when `quiet_after_delete_ms`
    /// is given and the name was deleted less than that long ago.
    fn create_checked(
        &self,
        name: &str,
        partitions: i64,
        validate_only: bool,
        quiet_after_delete_ms: Option<u64>,
    ) -> Result<Arc<Topic>, TopicError> {
        validate_name(name)?;
        let count = u32::try_from(partitions)
            .ok()
            .filter(|c| (1..=MAX_PARTITIONS).contains(c))
            .ok_or(TopicError::InvalidPartitions(partitions))?;
        let _admin = self.admin.lock();
        if self.topics.read().contains_key(name) {
            return Err(TopicError::AlreadyExists(name.to_string()));
        }
        if let Some(quiet_ms) = quiet_after_delete_ms {
            if let Some(ago_ms) = self.deleted_within(name, quiet_ms) {
                return Err(TopicError::RecentlyDeleted {
                    name: name.to_string(),
                    ago_ms,
                    quiet_ms,
                });
            }
        }
        if validate_only {
            return Ok(Arc::new(Topic {
                name: name.to_string(),
                id: [0; 16],
                partitions: Vec::new(),
                counters: TopicCounters::unregistered(),
            }));
        }
        let explain = |e: TopicError| {
            e.explain_fds(
                || format!("creating topic {name}"),
                self.partition_count() + count as usize,
            )
        };
        let id = new_topic_id();
        self.write_intent(name, CREATING, b"").map_err(explain)?;
        // The topic is absent, so any directory of its name is debris (an unfinished deletion,
        // or a failed create or grow whose undo failed too): never adopted into the new topic.
        let committed = self
            .remove_partition_dirs(name, 0)
            .and_then(|_| self.clear_intent(name, DELETING))
            .and_then(|()| self.make_partitions(name, id, 0, count))
            .and_then(|made| self.clear_intent(name, CREATING).map(|()| made));
        let made = match committed {
            Ok(made) => made,
            Err(e) => {
                self.undo_create(name);
                let e = explain(e);
                tracing::error!(topic = name, partitions = count, error = %e, "topic not created");
                return Err(e);
            }
        };
        let topic = Arc::new(Topic {
            name: name.to_string(),
            id,
            partitions: made,
            counters: TopicCounters::new(name),
        });
        self.topics.write().insert(name.to_string(), topic.clone());
        self.deleted_at.lock().remove(name);
        tracing::info!(topic = name, partitions = count, "topic created");
        Ok(topic)
    }

    /// Remove what a failed create made. Whatever cannot be removed now is removed at the next
    /// open, because the intent file stays until the directories are gone.
    fn undo_create(&self, name: &str) {
        let undone = self
            .write_intent(name, CREATING, b"")
            .and_then(|()| self.remove_partition_dirs(name, 0))
            .and_then(|_| self.clear_intent(name, CREATING));
        if let Err(e) = undone {
            tracing::error!(
                topic = name,
                error = %e,
                "could not remove a topic whose creation failed; it is removed at the next start"
            );
        }
    }

    /// How long ago (ms) `name` was deleted, if less than `window_ms`.
    fn deleted_within(&self, name: &str, window_ms: u64) -> Option<u64> {
        let at = *self.deleted_at.lock().get(name)?;
        let ago = u64::try_from(self.clock.now_ms().saturating_sub(at)).unwrap_or(0);
        (ago < window_ms).then_some(ago)
    }

    fn partition_count(&self) -> usize {
        self.topics
            .read()
            .values()
            .map(|t| t.partitions.len())
            .sum()
    }

    /// The topic, auto-created with `partitions` if absent — unless the name was deleted less
    /// than `quiet_after_delete_ms` ago ([`TopicError::RecentlyDeleted`]).
    pub fn get_or_create(
        &self,
        name: &str,
        partitions: u32,
        quiet_after_delete_ms: u64,
    ) -> Result<Arc<Topic>, TopicError> {
        if let Some(t) = self.get(name) {
            return Ok(t);
        }
        match self.create_checked(
            name,
            i64::from(partitions),
            false,
            Some(quiet_after_delete_ms),
        ) {
            Err(TopicError::AlreadyExists(_)) => self
                .get(name)
                .ok_or_else(|| TopicError::Unknown(name.into())),
            other => other,
        }
    }

    /// Grow a topic to `total` partitions (A8: partitions can be added, never removed), all or
    /// nothing like `create` (intent `<topic>.growing` holding the old count).
    pub fn add_partitions(
        &self,
        name: &str,
        total: i64,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        let _admin = self.admin.lock();
        let topic = self
            .get(name)
            .ok_or_else(|| TopicError::Unknown(name.into()))?;
        let current = topic.partitions.len() as u32;
        let total_u32 = u32::try_from(total)
            .ok()
            .filter(|&t| t > current && t <= MAX_PARTITIONS)
            .ok_or(TopicError::InvalidPartitions(total))?;
        if validate_only {
            return Ok(());
        }
        let explain = |e: TopicError| {
            e.explain_fds(
                || format!("adding partitions to topic {name}"),
                self.partition_count() + (total_u32 - current) as usize,
            )
        };
        self.write_intent(name, GROWING, current.to_string().as_bytes())
            .map_err(explain)?;
        // Directories past the current count are debris of a failed grow: never adopted.
        let committed = self
            .remove_partition_dirs(name, current)
            .and_then(|_| self.make_partitions(name, topic.id, current, total_u32))
            .and_then(|added| self.clear_intent(name, GROWING).map(|()| added));
        let added = match committed {
            Ok(added) => added,
            Err(e) => {
                self.undo_grow(name, current);
                let e = explain(e);
                tracing::error!(topic = name, partitions = total, error = %e, "partitions not added");
                return Err(e);
            }
        };
        let mut partitions = topic.partitions.clone();
        partitions.extend(added);
        let grown = Arc::new(Topic {
            name: topic.name.clone(),
            id: topic.id,
            partitions,
            counters: TopicCounters::new(name),
        });
        self.topics.write().insert(name.to_string(), grown);
        tracing::info!(topic = name, partitions = total, "partitions added");
        Ok(())
    }

    /// Remove the partitions a failed grow added; what cannot be removed now is removed at the
    /// next open.
    fn undo_grow(&self, name: &str, previous: u32) {
        let undone = self
            .write_intent(name, GROWING, previous.to_string().as_bytes())
            .and_then(|()| self.remove_partition_dirs(name, previous))
            .and_then(|_| self.clear_intent(name, GROWING));
        if let Err(e) = undone {
            tracing::error!(
                topic = name,
                error = %e,
                "could not remove the partitions of a failed grow; they are removed at the next start"
            );
        }
    }

    /// Delete a topic and its data. The topic is gone once the deletion intent is durable;
    /// directories that cannot be removed now are removed at the next open or create.
    pub fn delete(&self, name: &str) -> Result<(), TopicError> {
        let _admin = self.admin.lock();
        let topic = self
            .get(name)
            .ok_or_else(|| TopicError::Unknown(name.into()))?;
        self.write_intent(name, DELETING, b"")?;
        self.topics.write().remove(name);
        self.deleted_at
            .lock()
            .insert(name.to_string(), self.clock.now_ms());
        for (index, partition) in topic.partitions.iter().enumerate() {
            // Refuses appends still in flight; the data goes anyway.
            if let Err(e) = partition.close() {
                tracing::debug!(topic = name, partition = index, error = %e, "closing a deleted partition");
            }
        }
        drop(topic);
        let removed = self
            .remove_partition_dirs(name, 0)
            .and_then(|_| self.clear_intent(name, DELETING));
        if let Err(e) = removed {
            tracing::error!(
                topic = name,
                error = %e,
                "topic deleted, but its directories could not all be removed; they are removed at the next start"
            );
        }
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    /// Every partition, with its topic name and index.
    pub fn partitions(&self) -> Vec<(String, i32, Arc<Partition>)> {
        self.topics
            .read()
            .values()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (t.name.clone(), i as i32, p.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Kafka's rule for legal topic names.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    let legal = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if legal {
        Ok(())
    } else {
        Err(TopicError::InvalidName(name.to_string()))
    }
}

/// `orders-12` → (`orders`, 12); anything else is not a partition directory.
fn parse_partition_dir(entry: &str) -> Option<(&str, u32)> {
    let (topic, index) = entry.rsplit_once('-')?;
    let index: u32 = index.parse().ok()?;
    validate_name(topic).ok()?;
    (index < MAX_PARTITIONS).then_some((topic, index))
}

/// The id of a topic whose directories predate `partition.metadata`: derived from the name
/// (FNV-1a twice), so it stays the same across restarts.
fn legacy_topic_id(name: &str) -> [u8; 16] {
    let fnv = |seed: u64| {
        name.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_be_bytes());
    id[8..].copy_from_slice(&fnv(0x6c62_272e_07bb_0142).to_be_bytes());
    id
}

/// `orders.creating` → `orders` for `kind` = `.creating`.
fn intent_topic<'a>(entry: &'a str, kind: &str) -> Option<&'a str> {
    let topic = entry.strip_suffix(kind)?;
    validate_name(topic).ok()?;
    Some(topic)
}

/// A random id (UUID version 4) whose text form does not start with '-', as Kafka's.
fn new_topic_id() -> [u8; 16] {
    loop {
        let mut id: [u8; 16] = rand::random();
        id[6] = (id[6] & 0x0f) | 0x40;
        id[8] = (id[8] & 0x3f) | 0x80;
        // Base64url '-' is 62: the first six bits all ones but the last.
        if id[0] >> 2 != 62 {
            return id;
        }
    }
}

/// Parse Kafka's `partition.metadata`: `version: 0` and `topic_id: <base64url, no padding>`.
fn parse_partition_metadata(bytes: &[u8]) -> Result<[u8; 16], String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let mut version = None;
    let mut id = None;
    for line in text.lines() {
        match line.split_once(':') {
            Some(("version", v)) => version = Some(v.trim()),
            Some(("topic_id", v)) => id = Some(v.trim()),
            _ => {}
        }
    }
    if version != Some("0") {
        return Err(format!("unsupported version {version:?}"));
    }
    let id = id.ok_or("no topic_id")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(id)
        .map_err(|e| format!("topic_id {id:?}: {e}"))?;
    <[u8; 16]>::try_from(bytes.as_slice()).map_err(|_| format!("topic_id {id:?} is not 16 bytes"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use qanat_log::{HookedStorage, ManualClock, SimStorage, StorageHooks, StorageOp};
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Where [`Faults`] fails.
    #[derive(Clone, Copy)]
    enum Fault {
        /// The k-th `open` fails with EMFILE; everything else works.
        EmfileOnOpen(usize),
        /// Every mutating operation from the k-th on fails: the process died there.
        CrashAt(usize),
    }

    /// An injected failure for a [`SimStorage`]; counts operations from when it is armed.
    #[derive(Default)]
    struct Faults {
        fault: parking_lot::Mutex<Option<Fault>>,
        opens: AtomicUsize,
        steps: AtomicUsize,
        /// Set once the fault fired.
        fired: std::sync::atomic::AtomicBool,
    }

    impl Faults {
        /// `sim` with these faults, as the registry's storage.
        fn over(sim: &Arc<SimStorage>) -> (Arc<Faults>, Arc<dyn Storage>) {
            let faults = Arc::new(Faults::default());
            let inner: Arc<dyn Storage> = sim.clone();
            let storage = HookedStorage::with_hooks(inner, faults.clone());
            (faults, Arc::new(storage))
        }
        fn arm(&self, fault: Fault) {
            self.opens.store(0, Ordering::SeqCst);
            self.steps.store(0, Ordering::SeqCst);
            *self.fault.lock() = Some(fault);
        }
        fn fired(&self) -> bool {
            self.fired.load(Ordering::SeqCst)
        }
        /// A mutating step: fails from the crash point on.
        fn step(&self) -> io::Result<()> {
            let n = self.steps.fetch_add(1, Ordering::SeqCst);
            if let Some(Fault::CrashAt(k)) = *self.fault.lock() {
                if n >= k {
                    self.fired.store(true, Ordering::SeqCst);
                    return Err(io::Error::other("crashed"));
                }
            }
            Ok(())
        }
    }

    impl StorageHooks for Faults {
        fn before(&self, op: StorageOp<'_>) -> io::Result<()> {
            match op {
                StorageOp::Open(_) => {
                    let n = self.opens.fetch_add(1, Ordering::SeqCst);
                    if let Some(Fault::EmfileOnOpen(k)) = *self.fault.lock() {
                        if n == k {
                            self.fired.store(true, Ordering::SeqCst);
                            return Err(io::Error::from_raw_os_error(libc::EMFILE));
                        }
                    }
                    self.step()
                }
                // Reads do not count; block reservation and write-back are hints whose failure
                // is ignored.
                StorageOp::Read
                | StorageOp::Len
                | StorageOp::Preallocate(_)
                | StorageOp::StartWriteback(..) => Ok(()),
                _ => self.step(),
            }
        }
    }

    const DATA: &str = "/data";

    fn open_registry(storage: Arc<dyn Storage>, clock: Arc<ManualClock>) -> TopicRegistry {
        TopicRegistry::open(Path::new(DATA), storage, clock, LogConfig::default())
            .expect("open registry")
    }

    fn one_record_batch(value: &[u8]) -> Vec<u8> {
        qanat_log::batch::encode_batch(&[qanat_log::batch::SimpleRecord {
            timestamp: 0,
            key: None,
            value: Some(value),
        }])
    }

    /// Directories of `topic` and intent files left in the data directory.
    fn on_disk(sim: &SimStorage, topic: &str) -> (Vec<u32>, Vec<String>) {
        let mut dirs = Vec::new();
        let mut intents = Vec::new();
        for entry in sim.list_dir(Path::new(DATA)).unwrap() {
            match parse_partition_dir(&entry) {
                Some((t, p)) if t == topic => dirs.push(p),
                _ if entry.ends_with(CREATING) || entry.ends_with(DELETING) => intents.push(entry),
                _ => {}
            }
        }
        dirs.sort_unstable();
        (dirs, intents)
    }

    /// The topic is complete (`count` partitions, one stored id, `records` in each) or absent,
    /// both in the registry and on disk. Returns whether it is present.
    fn complete_or_absent(
        sim: &SimStorage,
        registry: &TopicRegistry,
        topic: &str,
        count: u32,
        records: i64,
    ) -> bool {
        let (dirs, intents) = on_disk(sim, topic);
        assert!(
            intents.is_empty(),
            "intent files left after open: {intents:?}"
        );
        match registry.get(topic) {
            None => {
                assert!(dirs.is_empty(), "absent topic left directories {dirs:?}");
                false
            }
            Some(t) => {
                assert_eq!(
                    dirs,
                    (0..count).collect::<Vec<_>>(),
                    "partial topic on disk"
                );
                assert_eq!(t.partitions.len(), count as usize);
                for (i, p) in t.partitions.iter().enumerate() {
                    assert_eq!(p.next_offset(), records, "partition {i} lost records");
                    let dir = Path::new(DATA).join(format!("{topic}-{i}"));
                    let f = sim.open(&dir.join(PARTITION_METADATA)).unwrap();
                    let mut buf = vec![0; f.len().unwrap() as usize];
                    f.read_exact_at(&mut buf, 0).unwrap();
                    assert_eq!(parse_partition_metadata(&buf), Ok(t.id), "partition {i} id");
                }
                true
            }
        }
    }

    #[test]
    fn create_is_all_or_nothing_when_descriptors_run_out() {
        for k in 0.. {
            let sim = Arc::new(SimStorage::new());
            let (faulty, storage) = Faults::over(&sim);
            let clock = Arc::new(ManualClock::new(1_000));
            let registry = open_registry(storage, clock.clone());
            faulty.arm(Fault::EmfileOnOpen(k));
            let result = registry.create("t", 4, false);
            if !faulty.fired() {
                assert!(result.is_ok(), "{:?}", result.err());
                assert!(complete_or_absent(&sim, &registry, "t", 4, 0));
                assert!(k > 8, "the create opened only {k} files");
                return;
            }
            match result {
                Err(e @ TopicError::OutOfFileDescriptors { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("creating topic t") && text.contains("ulimit -n"),
                        "{text}"
                    );
                }
                other => panic!(
                    "open #{k} failed with EMFILE, create gave {:?}",
                    other.err()
                ),
            }
            // Undone at once, not only after a restart.
            let (dirs, intents) = on_disk(&sim, "t");
            assert!(
                dirs.is_empty() && intents.is_empty(),
                "EMFILE on open #{k}: left {dirs:?} {intents:?}"
            );
            assert!(registry.get("t").is_none());
            drop(registry);
            sim.crash(k as u64);
            let registry = open_registry(sim.clone(), clock);
            assert!(!complete_or_absent(&sim, &registry, "t", 4, 0));
        }
    }

    #[test]
    fn create_survives_a_crash_at_every_step_complete_or_absent() {
        for k in 0.. {
            let mut finished = false;
            for seed in 0..3u64 {
                let sim = Arc::new(SimStorage::new());
                let (faulty, storage) = Faults::over(&sim);
                let clock = Arc::new(ManualClock::new(1_000));
                let registry = open_registry(storage, clock.clone());
                faulty.arm(Fault::CrashAt(k));
                let result = registry.create("t", 3, false);
                finished = !faulty.fired();
                drop(registry);
                sim.crash(seed * 1000 + k as u64);
                let registry = open_registry(sim.clone(), clock);
                let present = complete_or_absent(&sim, &registry, "t", 3, 0);
                if let Ok(created) = &result {
                    assert!(present, "crash at step {k}: acknowledged create lost");
                    assert_eq!(registry.get("t").unwrap().id, created.id);
                }
                // The name is usable afterwards either way.
                if !present {
                    registry.create("t", 3, false).unwrap();
                }
                let t = registry.get("t").unwrap();
                t.partitions[2].append(&one_record_batch(b"v")).unwrap();
            }
            if finished {
                assert!(k > 20, "the create took only {k} steps");
                return;
            }
        }
    }

    #[test]
    fn delete_survives_a_crash_at_every_step_complete_or_absent() {
        for k in 0.. {
            let mut finished = false;
            for seed in 0..3u64 {
                let sim = Arc::new(SimStorage::new());
                let (faulty, storage) = Faults::over(&sim);
                let clock = Arc::new(ManualClock::new(1_000));
                let registry = open_registry(storage, clock.clone());
                let t = registry.create("t", 3, false).unwrap();
                let other = registry.create("other", 1, false).unwrap();
                for p in t.partitions.iter().chain(&other.partitions) {
                    p.append(&one_record_batch(b"v")).unwrap();
                    p.sync().unwrap();
                }
                drop((t, other));
                faulty.arm(Fault::CrashAt(k));
                let result = registry.delete("t");
                finished = !faulty.fired();
                drop(registry);
                sim.crash(seed * 1000 + k as u64);
                let registry = open_registry(sim.clone(), clock);
                let present = complete_or_absent(&sim, &registry, "t", 3, 1);
                if result.is_ok() {
                    assert!(!present, "crash at step {k}: acknowledged delete undone");
                }
                assert!(
                    complete_or_absent(&sim, &registry, "other", 1, 1),
                    "crash at step {k}: another topic was touched"
                );
            }
            if finished {
                assert!(k > 5, "the delete took only {k} steps");
                return;
            }
        }
    }

    /// A grow of "t" from 2 partitions (1 record each) to 4 either happened or not.
    fn grown_or_not(sim: &SimStorage, registry: &TopicRegistry) -> u32 {
        let (dirs, intents) = on_disk(sim, "t");
        assert!(intents.is_empty(), "intent files left: {intents:?}");
        let t = registry.get("t").expect("topic t");
        let count = t.partitions.len() as u32;
        assert!(count == 2 || count == 4, "{count} partitions");
        assert_eq!(dirs, (0..count).collect::<Vec<_>>(), "partial grow on disk");
        for (i, p) in t.partitions.iter().enumerate() {
            assert_eq!(p.next_offset(), i64::from(i < 2), "partition {i}");
        }
        count
    }

    #[test]
    fn grow_is_all_or_nothing_across_emfile_and_crashes() {
        for crash in [false, true] {
            for k in 0.. {
                let sim = Arc::new(SimStorage::new());
                let (faulty, storage) = Faults::over(&sim);
                let clock = Arc::new(ManualClock::new(1_000));
                let registry = open_registry(storage, clock.clone());
                let t = registry.create("t", 2, false).unwrap();
                for p in &t.partitions {
                    p.append(&one_record_batch(b"v")).unwrap();
                    p.sync().unwrap();
                }
                drop(t);
                faulty.arm(if crash {
                    Fault::CrashAt(k)
                } else {
                    Fault::EmfileOnOpen(k)
                });
                let result = registry.add_partitions("t", 4, false);
                let finished = !faulty.fired();
                if !crash {
                    // Undone at once.
                    let expect = if result.is_ok() { 4 } else { 2 };
                    assert_eq!(grown_or_not(&sim, &registry), expect, "EMFILE on open #{k}");
                    if let Err(e) = &result {
                        assert!(e.to_string().contains("ulimit -n"), "{e}");
                    }
                }
                drop(registry);
                sim.crash(k as u64);
                let registry = open_registry(sim.clone(), clock);
                let count = grown_or_not(&sim, &registry);
                if result.is_ok() {
                    assert_eq!(count, 4, "step {k}: acknowledged grow lost");
                }
                if finished {
                    assert!(result.is_ok());
                    break;
                }
            }
        }
    }

    #[test]
    fn delete_refused_by_emfile_keeps_the_topic() {
        let sim = Arc::new(SimStorage::new());
        let (faulty, storage) = Faults::over(&sim);
        let clock = Arc::new(ManualClock::new(1_000));
        let registry = open_registry(storage, clock.clone());
        let t = registry.create("t", 2, false).unwrap();
        t.partitions[0].append(&one_record_batch(b"v")).unwrap();
        t.partitions[1].append(&one_record_batch(b"v")).unwrap();
        drop(t);
        faulty.arm(Fault::EmfileOnOpen(0));
        let e = registry.delete("t").unwrap_err();
        assert!(e.is_out_of_fds(), "{e}");
        assert!(complete_or_absent(&sim, &registry, "t", 2, 1));
        drop(registry);
        let registry = open_registry(sim.clone(), clock);
        assert!(complete_or_absent(&sim, &registry, "t", 2, 1));
    }

    #[test]
    fn recreated_topic_gets_a_new_id_that_survives_restarts() {
        let sim = Arc::new(SimStorage::new());
        let clock = Arc::new(ManualClock::new(1_000));
        let registry = open_registry(sim.clone(), clock.clone());
        let first = registry.create("t", 2, false).unwrap().id;
        assert_ne!(first, legacy_topic_id("t"));
        drop(registry);
        sim.crash(1);
        let registry = open_registry(sim.clone(), clock.clone());
        assert_eq!(registry.get("t").unwrap().id, first);
        registry.delete("t").unwrap();
        let second = registry.create("t", 2, false).unwrap().id;
        assert_ne!(first, second);
        registry.add_partitions("t", 3, false).unwrap();
        drop(registry);
        let registry = open_registry(sim.clone(), clock);
        assert!(complete_or_absent(&sim, &registry, "t", 3, 0));
        assert_eq!(registry.get("t").unwrap().id, second);
    }

    #[test]
    fn debris_of_a_failed_create_or_grow_is_never_adopted() {
        let sim = Arc::new(SimStorage::new());
        let clock = Arc::new(ManualClock::new(1_000));
        let registry = open_registry(sim.clone(), clock.clone());
        // Left behind, with the topic absent, by a create whose undo failed as well.
        for p in 0..8 {
            sim.create_dir_all(&Path::new(DATA).join(format!("t-{p}")))
                .unwrap();
        }
        registry.create("t", 2, false).unwrap();
        // Left behind by a failed grow.
        for p in 4..6 {
            sim.create_dir_all(&Path::new(DATA).join(format!("t-{p}")))
                .unwrap();
        }
        registry.add_partitions("t", 3, false).unwrap();
        drop(registry);
        let registry = open_registry(sim.clone(), clock);
        assert_eq!(registry.get("t").unwrap().partitions.len(), 3);
        assert!(complete_or_absent(&sim, &registry, "t", 3, 0));
    }

    #[test]
    fn directories_without_partition_metadata_keep_a_name_derived_id() {
        let sim = Arc::new(SimStorage::new());
        let clock = Arc::new(ManualClock::new(1_000));
        for p in 0..2 {
            let dir = Path::new(DATA).join(format!("legacy-{p}"));
            let (part, _) =
                Partition::open(sim.clone(), clock.clone(), dir, LogConfig::default()).unwrap();
            part.append(&one_record_batch(b"old")).unwrap();
            part.close().unwrap();
        }
        sim.sync_dir(Path::new(DATA)).unwrap();
        let registry = open_registry(sim.clone(), clock.clone());
        let t = registry.get("legacy").unwrap();
        assert_eq!(t.id, legacy_topic_id("legacy"));
        assert_eq!(t.partitions.len(), 2);
        assert_eq!(t.partitions[1].next_offset(), 1);
        drop(t);
        drop(registry);
        let registry = open_registry(sim.clone(), clock);
        assert_eq!(
            registry.get("legacy").unwrap().id,
            legacy_topic_id("legacy")
        );
    }

    #[test]
    fn auto_creation_waits_out_the_quiet_period_after_a_delete() {
        let sim = Arc::new(SimStorage::new());
        let clock = Arc::new(ManualClock::new(1_000));
        let registry = open_registry(sim.clone(), clock.clone());
        registry.create("t", 4, false).unwrap();
        registry.delete("t").unwrap();
        clock.advance(47);
        match registry.get_or_create("t", 1, 60_000) {
            Err(TopicError::RecentlyDeleted { ago_ms: 47, .. }) => {}
            other => panic!(
                "auto-created 47 ms after a delete: {:?}",
                other.map(|t| t.id)
            ),
        }
        assert!(registry.get("t").is_none());
        assert!(on_disk(&sim, "t").0.is_empty());
        // 0 turns the rule off (Kafka's behaviour).
        registry.create("u", 1, false).unwrap();
        registry.delete("u").unwrap();
        assert_eq!(
            registry.get_or_create("u", 1, 0).unwrap().partitions.len(),
            1
        );
        // After the period, auto-creation works again.
        clock.advance(60_000);
        assert_eq!(
            registry
                .get_or_create("t", 1, 60_000)
                .unwrap()
                .partitions
                .len(),
            1
        );
        // An explicit create works at once and ends the period.
        registry.delete("t").unwrap();
        assert_eq!(registry.create("t", 4, false).unwrap().partitions.len(), 4);
        registry.delete("t").unwrap();
        registry.create("t", 2, false).unwrap();
        assert!(registry.get_or_create("t", 1, 60_000).is_ok());
    }

    #[test]
    fn partition_metadata_round_trips_in_kafka_format() {
        let id = new_topic_id();
        let text = format!(
            "version: 0\ntopic_id: {}\n",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
        );
        assert_eq!(parse_partition_metadata(text.as_bytes()), Ok(id));
        assert!(
            parse_partition_metadata(b"version: 1\ntopic_id: AAAAAAAAAAAAAAAAAAAAAA\n").is_err()
        );
        assert!(parse_partition_metadata(b"version: 0\ntopic_id: short\n").is_err());
        assert!(parse_partition_metadata(&[0xff, 0xfe]).is_err());
        for _ in 0..1000 {
            let id = new_topic_id();
            assert_ne!(id, [0; 16]);
            assert!(!base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(id)
                .starts_with('-'));
        }
    }

    #[test]
    fn intent_files_are_not_partition_directories() {
        assert_eq!(intent_topic("a-3.creating", CREATING), Some("a-3"));
        assert_eq!(intent_topic("orders.deleting", DELETING), Some("orders"));
        assert_eq!(parse_partition_dir("a-3.creating"), None);
        assert_eq!(parse_partition_dir("orders.deleting"), None);
        assert_eq!(intent_topic("bad name.creating", CREATING), None);
    }

    #[test]
    fn partition_dirs_parse() {
        assert_eq!(parse_partition_dir("a-b-3"), Some(("a-b", 3)));
        assert_eq!(parse_partition_dir("orders-0"), Some(("orders", 0)));
        assert_eq!(parse_partition_dir("orders"), None);
        assert_eq!(parse_partition_dir("orders-x"), None);
        assert_eq!(parse_partition_dir("bad name-1"), None);
    }

    #[test]
    fn names_follow_kafka_rules() {
        assert!(validate_name("taobao_acookie.v2-x").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(250)).is_err());
    }
}
