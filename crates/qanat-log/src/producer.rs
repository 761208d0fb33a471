//! Idempotent-producer state (Kafka's `ProducerStateManager`, without transactions).
//!
//! Per producer id: the current epoch and the metadata of its last [`MAX_CACHED_BATCHES`]
//! batches, enough to recognize a retry of any request still in flight and to check that the
//! next batch continues the sequence. Owned by the appender (under the append lock); rebuilt on
//! open from a snapshot written at each segment roll (`<base>.producers`, the state after every
//! batch below `base`) plus the headers of the segments from there on.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use crate::batch::BatchHeader;
use crate::error::LogError;
use crate::segment::io_err;
use crate::storage::{LogFile, Storage};

/// How many batches per producer are remembered: the most requests an idempotent producer may
/// have in flight (`max.in.flight.requests.per.connection` ≤ 5).
pub const MAX_CACHED_BATCHES: usize = 5;

/// Producers with no batch newer than this (by batch maxTimestamp) are forgotten by retention,
/// like Kafka's `producer.id.expiration.ms` / `transactional.id.expiration.ms` (7 days).
pub const PRODUCER_EXPIRATION_MS: i64 = 7 * 24 * 3600 * 1000;

const SNAPSHOT_VERSION: u16 = 1;
const SNAPSHOT_BATCH_LEN: usize = 4 + 4 + 8 + 8 + 8;

/// Sequence number of the last record of a batch: `base + lastOffsetDelta`, wrapping past
/// `i32::MAX` to 0 as Kafka does.
pub fn last_sequence(base_sequence: i32, last_offset_delta: i32) -> i32 {
    let s = i64::from(base_sequence) + i64::from(last_offset_delta);
    (s.rem_euclid(1i64 << 31)) as i32
}

/// The sequence number that must follow `last`.
pub fn next_sequence(last: i32) -> i32 {
    if last == i32::MAX {
        0
    } else {
        last + 1
    }
}

/// Metadata of one appended batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchMeta {
    pub base_seq: i32,
    pub last_seq: i32,
    pub base_offset: i64,
    pub last_offset: i64,
    pub max_ts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProducerEntry {
    pub epoch: i16,
    /// Oldest first, at most [`MAX_CACHED_BATCHES`], all of `epoch`.
    pub batches: VecDeque<BatchMeta>,
}

impl ProducerEntry {
    pub fn last_seq(&self) -> Option<i32> {
        self.batches.back().map(|b| b.last_seq)
    }
    fn last_ts(&self) -> i64 {
        self.batches
            .iter()
            .map(|b| b.max_ts)
            .max()
            .unwrap_or(i64::MIN)
    }
    /// A cached batch of `epoch` with exactly this sequence range.
    pub fn find_duplicate(&self, epoch: i16, base_seq: i32, last_seq: i32) -> Option<&BatchMeta> {
        if epoch != self.epoch {
            return None;
        }
        self.batches
            .iter()
            .find(|b| b.base_seq == base_seq && b.last_seq == last_seq)
    }
}

/// All producers of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ProducerStates {
    map: HashMap<i64, ProducerEntry>,
}

impl ProducerStates {
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.map.get(&producer_id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Record an appended batch (already checked). A different epoch starts a fresh cache.
    pub fn record(&mut self, producer_id: i64, epoch: i16, meta: BatchMeta) {
        let e = self
            .map
            .entry(producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch,
                batches: VecDeque::with_capacity(MAX_CACHED_BATCHES),
            });
        if e.epoch != epoch {
            e.epoch = epoch;
            e.batches.clear();
        }
        if e.batches.len() == MAX_CACHED_BATCHES {
            e.batches.pop_front();
        }
        e.batches.push_back(meta);
    }

    /// Replay one batch header read back from the log (recovery). Non-idempotent and control
    /// batches are ignored.
    pub fn replay(&mut self, h: &BatchHeader) {
        if h.producer_id < 0 || h.is_control() {
            return;
        }
        self.record(
            h.producer_id,
            h.producer_epoch,
            BatchMeta {
                base_seq: h.base_sequence,
                last_seq: last_sequence(h.base_sequence, h.last_offset_delta),
                base_offset: h.base_offset,
                last_offset: h.last_offset(),
                max_ts: h.max_timestamp,
            },
        );
    }

    /// Forget producers whose newest batch is older than `cutoff_ms`. Returns how many.
    pub fn expire(&mut self, cutoff_ms: i64) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| e.last_ts() >= cutoff_ms);
        before - self.map.len()
    }

    /// Serialize: version u16, count u32, per producer (id i64, epoch i16, n u8, n × (baseSeq
    /// i32, lastSeq i32, baseOffset i64, lastOffset i64, maxTs i64)), then CRC-32C u32 of all
    /// preceding bytes. Big-endian; producers sorted by id so the bytes are deterministic.
    pub fn encode(&self) -> Vec<u8> {
        let mut ids: Vec<i64> = self.map.keys().copied().collect();
        ids.sort_unstable();
        let mut out =
            Vec::with_capacity(10 + ids.len() * (11 + MAX_CACHED_BATCHES * SNAPSHOT_BATCH_LEN));
        out.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let Some(e) = self.map.get(&id) else { continue };
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&e.epoch.to_be_bytes());
            out.push(e.batches.len() as u8);
            for b in &e.batches {
                out.extend_from_slice(&b.base_seq.to_be_bytes());
                out.extend_from_slice(&b.last_seq.to_be_bytes());
                out.extend_from_slice(&b.base_offset.to_be_bytes());
                out.extend_from_slice(&b.last_offset.to_be_bytes());
                out.extend_from_slice(&b.max_ts.to_be_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Inverse of [`encode`](Self::encode); `None` if truncated, corrupt or of another version.
    pub fn decode(buf: &[u8]) -> Option<ProducerStates> {
        let (body, crc) = buf.split_at_checked(buf.len().checked_sub(4)?)?;
        if crc32c::crc32c(body).to_be_bytes() != crc {
            return None;
        }
        let mut r = Reader(body);
        if r.u16()? != SNAPSHOT_VERSION {
            return None;
        }
        let count = r.u32()?;
        let mut map = HashMap::new();
        for _ in 0..count {
            let id = r.i64()?;
            let epoch = r.u16()? as i16;
            let n = usize::from(r.u8()?);
            if n == 0 || n > MAX_CACHED_BATCHES {
                return None;
            }
            let mut batches = VecDeque::with_capacity(MAX_CACHED_BATCHES);
            for _ in 0..n {
                batches.push_back(BatchMeta {
                    base_seq: r.u32()? as i32,
                    last_seq: r.u32()? as i32,
                    base_offset: r.i64()?,
                    last_offset: r.i64()?,
                    max_ts: r.i64()?,
                });
            }
            map.insert(id, ProducerEntry { epoch, batches });
        }
        r.0.is_empty().then_some(ProducerStates { map })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_be_bytes)
    }
}

/// Write a snapshot file (no fsync); returns the open file so the caller can sync it later.
pub(crate) fn write_snapshot(
    storage: &dyn Storage,
    path: &Path,
    states: &ProducerStates,
) -> Result<std::sync::Arc<dyn LogFile>, LogError> {
    let bytes = states.encode();
    let f = storage.open(path).map_err(io_err(path))?;
    f.set_len(0)
        .and_then(|()| f.append(&bytes))
        .map_err(io_err(path))?;
    Ok(f)
}

/// Read a snapshot file; `None` if it is missing, unreadable or corrupt.
pub(crate) fn read_snapshot(storage: &dyn Storage, path: &Path) -> Option<ProducerStates> {
    if !storage.exists(path) {
        return None;
    }
    let f = storage.open(path).ok()?;
    let len = usize::try_from(f.len().ok()?).ok()?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).ok()?;
    let s = ProducerStates::decode(&buf);
    if s.is_none() {
        tracing::warn!(file = %path.display(), "ignoring corrupt producer-state snapshot");
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sequence_wraps() {
        assert_eq!(last_sequence(0, 4), 4);
        assert_eq!(last_sequence(i32::MAX, 0), i32::MAX);
        assert_eq!(last_sequence(i32::MAX, 1), 0);
        assert_eq!(last_sequence(i32::MAX - 1, 4), 2);
        assert_eq!(next_sequence(i32::MAX), 0);
        assert_eq!(next_sequence(7), 8);
    }

    #[test]
    fn record_keeps_last_five_of_current_epoch() {
        let mut s = ProducerStates::default();
        let meta = |i: i32| BatchMeta {
            base_seq: i * 2,
            last_seq: i * 2 + 1,
            base_offset: i64::from(i) * 2,
            last_offset: i64::from(i) * 2 + 1,
            max_ts: i64::from(i),
        };
        for i in 0..7 {
            s.record(9, 1, meta(i));
        }
        let e = s.get(9).unwrap();
        assert_eq!(e.batches.len(), MAX_CACHED_BATCHES);
        assert_eq!(e.batches.front().unwrap().base_seq, 4);
        assert_eq!(e.last_seq(), Some(13));
        assert!(e.find_duplicate(1, 12, 13).is_some());
        assert!(e.find_duplicate(0, 12, 13).is_none());
        assert!(e.find_duplicate(1, 0, 1).is_none());
        s.record(9, 2, meta(0));
        assert_eq!(s.get(9).unwrap().batches.len(), 1);
        assert_eq!(s.expire(1), 1);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn snapshot_roundtrip_and_corruption() {
        let mut s = ProducerStates::default();
        for id in 0..20 {
            for k in 0..(id % 7) {
                s.record(
                    id,
                    (id % 3) as i16,
                    BatchMeta {
                        base_seq: k as i32,
                        last_seq: k as i32,
                        base_offset: id * 100 + k,
                        last_offset: id * 100 + k,
                        max_ts: -5,
                    },
                );
            }
        }
        let b = s.encode();
        assert_eq!(ProducerStates::decode(&b).unwrap(), s);
        assert_eq!(
            ProducerStates::decode(&ProducerStates::default().encode()).unwrap(),
            ProducerStates::default()
        );
        for cut in 0..b.len() {
            assert!(ProducerStates::decode(&b[..cut]).is_none());
        }
        let mut bad = b.clone();
        bad[7] ^= 1;
        assert!(ProducerStates::decode(&bad).is_none());
    }
}
