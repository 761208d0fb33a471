//! The coordinator's durable state: an internal partition of JSON entries (committed offsets,
//! group generations, producer-id blocks), replayed in order at start.
//!
//! It lives in `DATA_DIR/__consumer_offsets/`, a name the topic registry never parses as a
//! topic, and reuses the partition log for checksums and torn-tail recovery.

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use qanat_log::{Clock, LogConfig, LogError, Partition, Storage};
use serde::{Deserialize, Serialize};

use crate::records::read_records;

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
    partition: Partition,
    clock: Arc<dyn Clock>,
}

impl Journal {
    /// Open the journal and return every entry in order.
    pub fn open(
        data_dir: &Path,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, Vec<Entry>), JournalError> {
        let config = LogConfig {
            segment_bytes: 64 << 20,
            retention_ms: None,
            retention_bytes: None,
            ..LogConfig::default()
        };
        let (partition, report) = Partition::open(
            storage,
            clock.clone(),
            data_dir.join("__consumer_offsets"),
            config,
        )?;
        if report.truncated_bytes > 0 {
            tracing::warn!(
                bytes = report.truncated_bytes,
                "coordinator journal: torn tail truncated"
            );
        }
        let mut entries = Vec::new();
        let mut offset = partition.log_start_offset();
        while offset < partition.next_offset() {
            let records = read_records(&partition, offset, 4 << 20)?;
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
        Ok((Self { partition, clock }, entries))
    }

    /// Append entries; with `sync`, return only once they are on disk.
    pub fn append(&self, entries: &[Entry], sync: bool) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
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
        let outcome = self.partition.append(&buf)?;
        if sync {
            self.partition.sync_through(outcome.last_offset + 1)?;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<(), JournalError> {
        Ok(self.partition.sync()?)
    }

    pub fn close(&self) -> Result<(), JournalError> {
        Ok(self.partition.close()?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use qanat_log::{ManualClock, OsStorage};

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
