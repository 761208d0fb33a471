//! The topic registry: which topics exist, their partitions, and where they live on disk.
//!
//! A partition is the directory `DATA_DIR/<topic>-<partition>/` (Kafka's layout), so the set of
//! topics is derived from the directory listing at start and needs no catalogue file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use qanat_log::{Clock, LogConfig, LogError, Partition, Storage};

/// One topic and its partitions, in partition order.
pub struct Topic {
    pub name: String,
    pub id: [u8; 16],
    pub partitions: Vec<Arc<Partition>>,
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
    #[error("storage error: {0}")]
    Storage(#[from] LogError),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Most partitions a topic may have; bounds what one request can make the broker open.
pub const MAX_PARTITIONS: u32 = 10_000;

/// All topics of this broker.
pub struct TopicRegistry {
    data_dir: PathBuf,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    log_config: LogConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes create/delete/grow so two creators of one topic cannot race.
    admin: parking_lot::Mutex<()>,
}

impl TopicRegistry {
    /// Open every partition found under `data_dir`, recovering each.
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
        let names = storage
            .list_dir(data_dir)
            .map_err(|source| TopicError::Io {
                path: data_dir.to_path_buf(),
                source,
            })?;
        let mut found: BTreeMap<String, u32> = BTreeMap::new();
        for entry in names {
            if let Some((topic, partition)) = parse_partition_dir(&entry) {
                let count = found.entry(topic.to_string()).or_default();
                *count = (*count).max(partition + 1);
            }
        }
        let registry = Self {
            data_dir: data_dir.to_path_buf(),
            storage,
            clock,
            log_config,
            topics: RwLock::new(BTreeMap::new()),
            admin: parking_lot::Mutex::new(()),
        };
        for (name, count) in found {
            // A missing directory in the middle of the range is re-created empty.
            let topic = registry.open_topic(&name, count)?;
            registry.topics.write().insert(name, Arc::new(topic));
        }
        Ok(registry)
    }

    fn partition_dir(&self, topic: &str, partition: u32) -> PathBuf {
        self.data_dir.join(format!("{topic}-{partition}"))
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

    fn open_topic(&self, name: &str, count: u32) -> Result<Topic, TopicError> {
        let partitions = (0..count)
            .map(|p| self.open_partition(name, p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Topic {
            name: name.to_string(),
            id: topic_id(name),
            partitions,
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

    /// Create a topic. `validate_only` checks without creating.
    pub fn create(
        &self,
        name: &str,
        partitions: i64,
        validate_only: bool,
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
        if validate_only {
            return Ok(Arc::new(Topic {
                name: name.to_string(),
                id: topic_id(name),
                partitions: Vec::new(),
            }));
        }
        let topic = Arc::new(self.open_topic(name, count)?);
        self.topics.write().insert(name.to_string(), topic.clone());
        tracing::info!(topic = name, partitions = count, "topic created");
        Ok(topic)
    }

    /// The topic, created with `partitions` if absent.
    pub fn get_or_create(&self, name: &str, partitions: u32) -> Result<Arc<Topic>, TopicError> {
        if let Some(t) = self.get(name) {
            return Ok(t);
        }
        match self.create(name, i64::from(partitions), false) {
            Err(TopicError::AlreadyExists(_)) => self
                .get(name)
                .ok_or_else(|| TopicError::Unknown(name.into())),
            other => other,
        }
    }

    /// Grow a topic to `total` partitions (A8: partitions can be added, never removed).
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
        let current = topic.partitions.len() as i64;
        if total <= current || total > i64::from(MAX_PARTITIONS) {
            return Err(TopicError::InvalidPartitions(total));
        }
        if validate_only {
            return Ok(());
        }
        let mut partitions = topic.partitions.clone();
        for p in current..total {
            partitions.push(self.open_partition(name, p as u32)?);
        }
        let grown = Arc::new(Topic {
            name: topic.name.clone(),
            id: topic.id,
            partitions,
        });
        self.topics.write().insert(name.to_string(), grown);
        tracing::info!(topic = name, partitions = total, "partitions added");
        Ok(())
    }

    /// Delete a topic and its data.
    pub fn delete(&self, name: &str) -> Result<(), TopicError> {
        let _admin = self.admin.lock();
        let topic = self
            .topics
            .write()
            .remove(name)
            .ok_or_else(|| TopicError::Unknown(name.into()))?;
        for (index, partition) in topic.partitions.iter().enumerate() {
            partition.close()?;
            let dir = self.partition_dir(name, index as u32);
            self.storage
                .remove_dir_all(&dir)
                .map_err(|source| TopicError::Io { path: dir, source })?;
        }
        self.storage
            .sync_dir(&self.data_dir)
            .map_err(|source| TopicError::Io {
                path: self.data_dir.clone(),
                source,
            })?;
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

/// A stable 128-bit id derived from the name (FNV-1a twice), so it needs no storage.
fn topic_id(name: &str) -> [u8; 16] {
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

#[cfg(test)]
mod tests {
    use super::*;

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
