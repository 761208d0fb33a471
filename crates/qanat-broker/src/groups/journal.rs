//! The coordinator's durable state: an internal partition of JSON entries (committed offsets,
//! group generations, producer-id blocks), replayed in order at start.
//!
//! It lives in `DATA_DIR/__consumer_offsets/`, a name the topic registry never parses as a
//! topic, and reuses the partition log for checksums and torn-tail recovery.
//!
//! Compaction keeps replay short: the coordinator's current state is written as a fresh
//! journal in `__consumer_offsets.compacting/`, fsynced, and swapped in by two renames
//! (live → `.old`, compacting → live). At every crash point one complete journal exists:
//! open discards an unfinished `.compacting` while the live one exists, promotes a finished
//! one when the live one was already moved away, and removes `.old`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use qanat_log::{Clock, LogConfig, LogError, Partition, Storage};
use serde::{Deserialize, Serialize};

use crate::records::{read_records, ReadError};

/// One change to coordinator state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    Offset {
        group: String,
        topic: String,
        partition: i32,
        offset: i64,
        metadata: Option<String>,
        timestamp: i64,
    },
    Generation {
        group: String,
        generation: i32,
    },
    DeleteGroup {
        group: String,
    },
    /// Producer ids below `next` are handed out and must never be reused.
    ProducerIds {
        next: i64,
    },
}

/// Errors of the coordinator's journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("journal entry at offset {offset} is unreadable: {reason}")]
    Corrupt { offset: i64, reason: String },
    #[error("cannot encode journal entry: {0}")]
    Encode(String),
}

pub struct Journal {
    partition: parking_lot::Mutex<Partition>,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    data_dir: PathBuf,
    /// Entries appended since the journal was last written whole (open or compaction).
    appended: AtomicU64,
    /// Entries the journal held right after that.
    base: AtomicU64,
}

const LIVE: &str = "__consumer_offsets";
const COMPACTING: &str = "__consumer_offsets.compacting";
const OLD: &str = "__consumer_offsets.old";
/// Compact once this many entries were appended and they outnumber the live state 4 to 1.
const COMPACT_MIN_APPENDED: u64 = 100_000;
/// Decoding cap for journal batches. The broker writes them uncompressed, so this only bounds
/// what a damaged (or foreign) compressed batch could inflate to during replay.
const MAX_UNCOMPRESSED_BATCH_BYTES: u64 = 64 << 20;

fn journal_config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 20,
        retention_ms: None,
        retention_bytes: None,
        ..LogConfig::default()
    }
}

fn io(path: PathBuf) -> impl FnOnce(std::io::Error) -> JournalError {
    move |source| JournalError::Log(LogError::Io { path, source })
}

impl Journal {
    /// Open the journal (finishing or discarding an interrupted compaction) and return every
    /// entry in order.
    pub fn open(
        data_dir: &Path,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, Vec<Entry>), JournalError> {
        let live = data_dir.join(LIVE);
        let compacting = data_dir.join(COMPACTING);
        let old = data_dir.join(OLD);
        if storage.exists(&compacting) {
            if storage.exists(&live) {
                tracing::warn!("coordinator journal: discarding an unfinished compaction");
                storage
                    .remove_dir_all(&compacting)
                    .map_err(io(compacting.clone()))?;
            } else {
                tracing::warn!("coordinator journal: finishing an interrupted compaction");
                storage
                    .rename(&compacting, &live)
                    .map_err(io(compacting.clone()))?;
            }
            storage
                .sync_dir(data_dir)
                .map_err(io(data_dir.to_path_buf()))?;
        }
        if storage.exists(&old) {
            storage.remove_dir_all(&old).map_err(io(old.clone()))?;
        }
        let (partition, report) =
            Partition::open(storage.clone(), clock.clone(), live, journal_config())?;
        if report.truncated_bytes > 0 {
            tracing::warn!(
                bytes = report.truncated_bytes,
                "coordinator journal: torn tail truncated"
            );
        }
        let mut entries = Vec::new();
        let mut offset = partition.log_start_offset();
        while offset < partition.next_offset() {
            let records = read_records(&partition, offset, 4 << 20, MAX_UNCOMPRESSED_BATCH_BYTES)
                .map_err(|e| match e {
                ReadError::Log(e) => JournalError::Log(e),
                ReadError::Batch {
                    base_offset,
                    source,
                } => JournalError::Corrupt {
                    offset: base_offset,
                    reason: source.to_string(),
                },
            })?;
            let Some(last) = records.last() else { break };
            offset = last.offset + 1;
            for record in records {
                let value = record.value.unwrap_or_default();
                let entry: Entry =
                    serde_json::from_slice(&value).map_err(|e| JournalError::Corrupt {
                        offset: record.offset,
                        reason: e.to_string(),
                    })?;
                entries.push(entry);
            }
        }
        let journal = Self {
            partition: parking_lot::Mutex::new(partition),
            storage,
            clock,
            data_dir: data_dir.to_path_buf(),
            appended: AtomicU64::new(0),
            base: AtomicU64::new(entries.len() as u64),
        };
        Ok((journal, entries))
    }

    /// Whether enough was appended since the last whole write that compaction pays off.
    pub fn wants_compaction(&self) -> bool {
        let appended = self.appended.load(Ordering::Relaxed);
        appended >= COMPACT_MIN_APPENDED && appended >= 4 * self.base.load(Ordering::Relaxed)
    }

    /// Replace the journal by `state` (the coordinator's current state as entries). The caller
    /// holds its state lock, so nothing is appended meanwhile.
    pub fn compact(&self, state: &[Entry]) -> Result<(), JournalError> {
        let live = self.data_dir.join(LIVE);
        let compacting = self.data_dir.join(COMPACTING);
        let old = self.data_dir.join(OLD);
        if self.storage.exists(&compacting) {
            self.storage
                .remove_dir_all(&compacting)
                .map_err(io(compacting.clone()))?;
        }
        let (fresh, _) = Partition::open(
            self.storage.clone(),
            self.clock.clone(),
            compacting.clone(),
            journal_config(),
        )?;
        for chunk in state.chunks(1000) {
            fresh.append(&self.encode(chunk)?)?;
        }
        fresh.sync()?;
        fresh.close()?;
        let mut partition = self.partition.lock();
        partition.close()?;
        let swapped = self
            .storage
            .rename(&live, &old)
            .and_then(|()| self.storage.rename(&compacting, &live))
            .and_then(|()| self.storage.sync_dir(&self.data_dir));
        if let Err(e) = swapped {
            // Put the old journal back if it was moved away, and keep serving from it.
            if !self.storage.exists(&live) && self.storage.exists(&old) {
                self.storage.rename(&old, &live).map_err(io(old.clone()))?;
            }
            let (reopened, _) = Partition::open(
                self.storage.clone(),
                self.clock.clone(),
                live.clone(),
                journal_config(),
            )?;
            *partition = reopened;
            return Err(io(live)(e));
        }
        if let Err(e) = self.storage.remove_dir_all(&old) {
            // Harmless: open removes it.
            tracing::warn!(error = %e, "coordinator journal: old copy not removed");
        }
        let (reopened, _) = Partition::open(
            self.storage.clone(),
            self.clock.clone(),
            live,
            journal_config(),
        )?;
        *partition = reopened;
        self.appended.store(0, Ordering::Relaxed);
        self.base.store(state.len() as u64, Ordering::Relaxed);
        tracing::info!(entries = state.len(), "coordinator journal compacted");
        Ok(())
    }

    /// Append entries; with `sync`, return only once they are on disk.
    pub fn append(&self, entries: &[Entry], sync: bool) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let buf = self.encode(entries)?;
        let partition = self.partition.lock();
        let outcome = partition.append(&buf)?;
        if sync {
            partition.sync_append(&outcome)?;
        }
        self.appended
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// One record batch holding `entries`.
    fn encode(&self, entries: &[Entry]) -> Result<BytesMut, JournalError> {
        let now = self.clock.now_ms();
        let records = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Ok(Record {
                    transactional: false,
                    control: false,
                    delete_horizon: false,
                    partition_leader_epoch: -1,
                    producer_id: -1,
                    producer_epoch: -1,
                    timestamp_type: TimestampType::Creation,
                    offset: i as i64,
                    sequence: -1,
                    timestamp: now,
                    key: None,
                    value: Some(Bytes::from(
                        serde_json::to_vec(e).map_err(|e| JournalError::Encode(e.to_string()))?,
                    )),
                    headers: IndexMap::new(),
                })
            })
            .collect::<Result<Vec<_>, JournalError>>()?;
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            records.iter(),
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .map_err(|e| JournalError::Encode(e.to_string()))?;
        Ok(buf)
    }

    pub fn sync(&self) -> Result<(), JournalError> {
        Ok(self.partition.lock().sync()?)
    }

    pub fn close(&self) -> Result<(), JournalError> {
        Ok(self.partition.lock().close()?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use qanat_log::{ManualClock, OsStorage};

    fn offset(group: &str, partition: i32, offset: i64) -> Entry {
        Entry::Offset {
            group: group.into(),
            topic: "t".into(),
            partition,
            offset,
            metadata: None,
            timestamp: 0,
        }
    }

    fn open(dir: &Path) -> (Journal, Vec<Entry>) {
        Journal::open(dir, Arc::new(OsStorage), Arc::new(ManualClock::new(1))).unwrap()
    }

    #[test]
    fn compaction_replaces_history_with_state() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = open(dir.path());
        let history: Vec<Entry> = (0..(COMPACT_MIN_APPENDED as i64))
            .map(|i| offset("g", (i % 3) as i32, i))
            .collect();
        for chunk in history.chunks(1000) {
            journal.append(chunk, false).unwrap();
        }
        assert!(journal.wants_compaction());
        let state = vec![
            offset("g", 0, 99),
            offset("g", 1, 100),
            Entry::ProducerIds { next: 7 },
        ];
        journal.compact(&state).unwrap();
        assert!(!journal.wants_compaction());
        journal.append(&[offset("g", 2, 101)], true).unwrap();
        journal.close().unwrap();
        drop(journal);
        let (_, replayed) = open(dir.path());
        let mut want = state;
        want.push(offset("g", 2, 101));
        assert_eq!(replayed, want);
        assert!(!dir.path().join(COMPACTING).exists());
        assert!(!dir.path().join(OLD).exists());
    }

    #[test]
    fn interrupted_compaction_leaves_one_complete_journal() {
        // Crash before the swap: the live journal wins, the unfinished copy is discarded.
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, _) = open(dir.path());
            journal.append(&[offset("g", 0, 1)], true).unwrap();
            journal.close().unwrap();
        }
        std::fs::create_dir_all(dir.path().join(COMPACTING)).unwrap();
        std::fs::write(
            dir.path().join(COMPACTING).join("00000000000000000000.log"),
            b"torn",
        )
        .unwrap();
        let (journal, replayed) = open(dir.path());
        assert_eq!(replayed, vec![offset("g", 0, 1)]);
        assert!(!dir.path().join(COMPACTING).exists());
        journal.close().unwrap();
        drop(journal);

        // Crash between the two renames: the finished copy is promoted, the old one removed.
        let copy = tempfile::tempdir().unwrap();
        {
            let (journal, _) = open(copy.path());
            journal.append(&[offset("g", 0, 2)], true).unwrap();
            journal.close().unwrap();
        }
        std::fs::rename(dir.path().join(LIVE), dir.path().join(OLD)).unwrap();
        std::fs::rename(copy.path().join(LIVE), dir.path().join(COMPACTING)).unwrap();
        let (_, replayed) = open(dir.path());
        assert_eq!(replayed, vec![offset("g", 0, 2)]);
        assert!(!dir.path().join(OLD).exists());
        assert!(!dir.path().join(COMPACTING).exists());
    }

    #[test]
    fn entries_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_000));
        let entries = vec![
            Entry::Generation {
                group: "g".into(),
                generation: 3,
            },
            Entry::Offset {
                group: "g".into(),
                topic: "t".into(),
                partition: 2,
                offset: 42,
                metadata: Some("m".into()),
                timestamp: 5,
            },
            Entry::ProducerIds { next: 1000 },
            Entry::DeleteGroup { group: "h".into() },
        ];
        {
            let (journal, replayed) =
                Journal::open(dir.path(), Arc::new(OsStorage), clock.clone()).unwrap();
            assert!(replayed.is_empty());
            journal.append(&entries[..2], true).unwrap();
            journal.append(&entries[2..], false).unwrap();
            journal.close().unwrap();
        }
        let (_journal, replayed) = Journal::open(dir.path(), Arc::new(OsStorage), clock).unwrap();
        assert_eq!(replayed, entries);
    }
}
