//! Model-based test: random operations on a partition over `SimStorage` + `ManualClock`,
//! checked against a simple in-memory model, with crashes (torn writes) and reopens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{make_batch, read_bytes, split_batches};
use proptest::prelude::*;
use qanat_log::batch::{self, BatchIter};
use qanat_log::{LogConfig, LogError, ManualClock, Partition, SimStorage, Storage, TimestampType};

#[derive(Debug, Clone)]
enum Op {
    /// One buffer of batches: (records, value length, timestamp jitter).
    Append(Vec<(u8, u16, i16)>),
    /// One idempotent batch of the model's producer, continuing its sequence:
    /// (records, value length).
    Produce(u8, u16),
    /// Resend the producer's last batch: must be acknowledged as a duplicate.
    Retry,
    /// A multi-batch buffer with one corrupted byte: must be rejected as a whole.
    AppendBad(u8, u16),
    SyncThrough(u16),
    Sync,
    /// A sync whose fdatasync fails: the partition must cut back to its durable end.
    FailSync,
    Read(u16, u16),
    OffsetForTs(i16),
    Advance(u16),
    RollIfDue,
    /// The sync thread's reservations: with segments this small, every call leaves a spare
    /// next-segment file that the next roll renames in.
    Renew,
    Retention,
    Crash(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop::collection::vec((1u8..6, 0u16..500, -500i16..500), 1..4).prop_map(Op::Append),
        1 => (0u8..3, any::<u16>()).prop_map(|(a, b)| Op::AppendBad(a, b)),
        4 => (1u8..6, 0u16..400).prop_map(|(a, b)| Op::Produce(a, b)),
        2 => Just(Op::Retry),
        3 => any::<u16>().prop_map(Op::SyncThrough),
        1 => Just(Op::Sync),
        1 => Just(Op::FailSync),
        4 => (any::<u16>(), 1u16..6000).prop_map(|(a, b)| Op::Read(a, b)),
        2 => (-2000i16..2000).prop_map(Op::OffsetForTs),
        2 => (0u16..8000).prop_map(Op::Advance),
        1 => Just(Op::RollIfDue),
        2 => Just(Op::Renew),
        2 => Just(Op::Retention),
        2 => any::<u64>().prop_map(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct Cfg {
    segment_bytes: u64,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    index_interval: u32,
    log_append_time: bool,
    durable_only: bool,
}

fn cfg() -> impl Strategy<Value = Cfg> {
    (
        4096u64..8192,
        prop::option::of(5_000u64..40_000),
        prop::option::of(2_000u64..12_000),
        prop_oneof![Just(0u32), 64u32..2048],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(s, rm, rb, ii, lat, durable_only)| Cfg {
            segment_bytes: s,
            retention_ms: rm,
            retention_bytes: rb,
            index_interval: ii,
            log_append_time: lat,
            durable_only,
        })
}

struct MBatch {
    base: i64,
    last: i64,
    max_ts: i64,
    bytes: Vec<u8>,
}

const PID: i64 = 77;

/// A batch of the idempotent producer, as sent.
struct PBatch {
    raw: Vec<u8>,
    last_seq: i32,
    base: i64,
    last: i64,
    max_ts: i64,
}

#[derive(Default)]
struct Model {
    batches: Vec<MBatch>,
    /// Every batch of the producer still covered by its state: retention does not remove them,
    /// crashes remove the lost ones.
    produced: Vec<PBatch>,
    next_seq: i32,
    log_start: i64,
    next: i64,
    durable: i64,
}

struct Harness {
    storage: Arc<SimStorage>,
    clock: Arc<ManualClock>,
    dir: PathBuf,
    config: LogConfig,
    p: Option<Partition>,
    m: Model,
    /// Something was appended since the partition's last `renew_reservations` (or its open).
    appended_since_renew: bool,
}

impl Harness {
    fn open(&mut self) -> qanat_log::RecoveryReport {
        let (p, r) = Partition::open(
            self.storage.clone(),
            self.clock.clone(),
            self.dir.clone(),
            self.config.clone(),
        )
        .unwrap();
        assert!(
            !self.storage.exists(&self.spare_path()),
            "open must remove a leftover spare segment"
        );
        self.p = Some(p);
        self.appended_since_renew = false;
        r
    }
    fn spare_path(&self) -> PathBuf {
        self.dir.join("next-segment.spare")
    }
    fn p(&self) -> &Partition {
        self.p.as_ref().unwrap()
    }

    /// Read the whole visible log and compare it with the model, byte for byte.
    fn verify_all(&self) {
        let p = self.p();
        assert_eq!(p.next_offset(), self.m.next);
        assert_eq!(p.log_start_offset(), self.m.log_start);
        let total: u64 = self.m.batches.iter().map(|b| b.bytes.len() as u64).sum();
        assert_eq!(p.size_bytes(), total);
        let end = self.visible_end();
        let mut cur = self.m.log_start;
        let mut seen = Vec::new();
        while cur < end {
            let out = p.read(cur, 3000).unwrap();
            let got = split_batches(&read_bytes(&out));
            assert!(!got.is_empty(), "read at {cur} returned nothing");
            assert_eq!(
                out.next_offset,
                got.last().map_or(cur, |(_, last, _)| last + 1)
            );
            for (base, last, bytes) in got {
                assert_eq!(base, cur, "offsets must be dense");
                seen.push(bytes);
                cur = last + 1;
            }
        }
        assert_eq!(cur, end);
        let visible: Vec<_> = self.m.batches.iter().filter(|b| b.base < end).collect();
        assert_eq!(seen.len(), visible.len());
        for (s, m) in seen.iter().zip(visible) {
            assert!(s == &m.bytes, "batch at {} differs", m.base);
        }
    }

    /// Push an appended buffer into the model (its bytes as the log must now hold them).
    fn push_appended(&mut self, buf: &[u8], now: i64) -> i64 {
        let mut off = self.m.next;
        let lat = self.config.timestamp_type == TimestampType::LogAppendTime;
        let positions: Vec<_> = BatchIter::new(buf).map(|r| r.unwrap()).collect();
        for (pos, h) in positions {
            let mut b = buf[pos..pos + h.total_len()].to_vec();
            batch::set_base_offset(&mut b, off).unwrap();
            let mut max_ts = h.max_timestamp;
            if lat {
                batch::set_log_append_time(&mut b, now).unwrap();
                max_ts = now;
            }
            let last = off + h.last_offset_delta as i64;
            self.m.batches.push(MBatch {
                base: off,
                last,
                max_ts,
                bytes: b,
            });
            off = last + 1;
        }
        self.m.next = off;
        self.appended_since_renew = true;
        off
    }

    /// What readers may see: the durable end when the log serves only durable data.
    fn visible_end(&self) -> i64 {
        if self.config.serve_durable_only {
            self.p().durable_offset()
        } else {
            self.m.next
        }
    }

    fn check_producer_state(&self) {
        let want = self.m.produced.last().map(|b| (0i16, b.last_seq));
        assert_eq!(self.p().producer_state(PID), want);
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Produce(n, vlen) => {
                let now = self.clock.now();
                let value = vec![*n; *vlen as usize];
                let recs: Vec<_> = (0..*n as i64)
                    .map(|i| batch::SimpleRecord {
                        timestamp: now + i,
                        key: None,
                        value: Some(&value),
                    })
                    .collect();
                let raw = batch::encode_batch_with(Some((PID, 0, self.m.next_seq)), &recs);
                let res = self.p().append(&raw).unwrap();
                assert!(!res.duplicate);
                assert_eq!(res.base_offset, self.m.next);
                let lat = self.config.timestamp_type == TimestampType::LogAppendTime;
                let end = self.push_appended(&raw, now);
                assert_eq!(res.last_offset, end - 1);
                let last_seq = qanat_log::last_sequence(self.m.next_seq, *n as i32 - 1);
                self.m.produced.push(PBatch {
                    raw,
                    last_seq,
                    base: res.base_offset,
                    last: res.last_offset,
                    max_ts: if lat { now } else { now + *n as i64 - 1 },
                });
                self.m.next_seq = qanat_log::next_sequence(last_seq);
                self.check_producer_state();
            }
            Op::Retry => {
                let Some(b) = self.m.produced.last() else {
                    return;
                };
                let res = self.p().append(&b.raw).unwrap();
                assert!(res.duplicate, "{res:?}");
                assert_eq!((res.base_offset, res.last_offset), (b.base, b.last));
                let lat = self.config.timestamp_type == TimestampType::LogAppendTime;
                assert_eq!(res.log_append_time, lat.then_some(b.max_ts));
                assert_eq!(res.bytes, 0);
            }
            Op::Append(specs) => {
                let now = self.clock.now();
                let mut buf = Vec::new();
                for (i, (n, vlen, jitter)) in specs.iter().enumerate() {
                    let fill = (self.m.next as u8).wrapping_add(i as u8);
                    buf.extend(make_batch(
                        *n as usize,
                        *vlen as usize,
                        now + *jitter as i64,
                        fill,
                    ));
                }
                let res = self.p().append(&buf).unwrap();
                assert_eq!(res.base_offset, self.m.next, "appends continue densely");
                let lat = self.config.timestamp_type == TimestampType::LogAppendTime;
                assert_eq!(res.log_append_time, lat.then_some(now));
                assert!(!res.duplicate);
                let off = self.push_appended(&buf, now);
                assert_eq!(res.last_offset, off - 1);
            }
            Op::AppendBad(which, at) => {
                let now = self.clock.now();
                let mut buf = Vec::new();
                let mut starts = Vec::new();
                for i in 0..3 {
                    starts.push(buf.len());
                    buf.extend(make_batch(2, 50 + i * 10, now, 1));
                }
                let s = starts[*which as usize];
                let e = starts
                    .get(*which as usize + 1)
                    .copied()
                    .unwrap_or(buf.len());
                // Corrupt a CRC-covered byte (from attributes on).
                let i = s + 21 + (*at as usize % (e - s - 21));
                buf[i] ^= 0x5a;
                let r = self.p().append(&buf);
                assert!(matches!(r, Err(LogError::CorruptBatch { .. })), "{r:?}");
            }
            Op::SyncThrough(sel) => {
                let span = self.m.next - self.m.durable;
                let o = self.m.durable + (*sel as i64 % (span + 1));
                self.p().sync_through(o).unwrap();
                self.m.durable = self.m.durable.max(o);
                assert!(self.p().durable_offset() >= o);
            }
            Op::Sync => {
                self.p().sync().unwrap();
                self.m.durable = self.m.next;
            }
            Op::FailSync => {
                // Retention may have removed segments that were never synced.
                let durable = self.p().durable_offset().max(self.m.log_start);
                assert!(durable >= self.m.durable);
                self.storage.fail_next_syncs(1);
                let result = self.p().sync();
                self.storage.fail_next_syncs(0);
                let n = self.p().next_offset();
                if result.is_ok() {
                    assert_eq!(n, self.m.next);
                    self.m.durable = self.m.next;
                    return;
                }
                // Either the data sync failed and the log was cut back to its durable end, or
                // only a metadata write failed and nothing moved.
                assert!(
                    n == durable || n == self.m.next,
                    "next {n} after a failed sync"
                );
                assert_eq!(self.p().durable_offset().max(self.m.log_start), durable);
                self.m.batches.retain(|b| b.base < n);
                self.m.produced.retain(|b| b.base < n);
                self.m.next_seq = self
                    .m
                    .produced
                    .last()
                    .map_or(0, |b| qanat_log::next_sequence(b.last_seq));
                self.m.next = n;
                self.m.durable = durable;
                self.verify_all();
                self.check_producer_state();
            }
            Op::Read(sel, max) => {
                let span = self.m.next - self.m.log_start;
                let o = self.m.log_start + (*sel as i64 % (span + 1));
                let out = self.p().read(o, *max as u64).unwrap();
                // Answered from the index alone or not at all, and then exactly as the files.
                if let Some(fast) = self.p().read_from_memory(o, *max as u64).unwrap() {
                    assert_eq!(
                        (fast.high_watermark, fast.log_start_offset, fast.next_offset),
                        (out.high_watermark, out.log_start_offset, out.next_offset),
                        "memory read at {o}"
                    );
                    assert_eq!(read_bytes(&fast), read_bytes(&out), "memory read at {o}");
                }
                let visible = self.visible_end();
                assert_eq!(out.high_watermark, visible);
                assert_eq!(self.p().high_watermark(), visible);
                assert_eq!(out.log_start_offset, self.m.log_start);
                let bytes = read_bytes(&out);
                let got = split_batches(&bytes);
                let served_end = got.last().map_or(o, |(_, last, _)| last + 1);
                assert_eq!(out.next_offset, served_end, "next_offset of a read at {o}");
                if o >= visible {
                    assert!(got.is_empty());
                } else {
                    assert!(served_end <= visible, "read past the visible end {visible}");
                    assert!(!got.is_empty(), "at least one batch");
                    assert!(got[0].0 <= o && o <= got[0].1, "first batch contains {o}");
                    assert!(got.len() == 1 || bytes.len() as u64 <= *max as u64);
                    let mi = self
                        .m
                        .batches
                        .iter()
                        .position(|b| b.base == got[0].0)
                        .unwrap();
                    for (k, (base, _, b)) in got.iter().enumerate() {
                        let mb = &self.m.batches[mi + k];
                        assert_eq!(*base, mb.base);
                        assert!(b == &mb.bytes);
                    }
                }
                if self.m.log_start > 0 {
                    assert!(self.p().read(self.m.log_start - 1, 100).is_err());
                }
                assert!(matches!(
                    self.p().read(self.m.next + 1, 100),
                    Err(LogError::OffsetOutOfRange { .. })
                ));
            }
            Op::OffsetForTs(d) => {
                let ts = self.clock.now() + *d as i64 * 10;
                let want = self
                    .m
                    .batches
                    .iter()
                    .find(|b| b.max_ts >= ts)
                    .filter(|b| b.base < self.visible_end())
                    .map(|b| (b.base, b.max_ts));
                assert_eq!(self.p().offset_for_timestamp(ts).unwrap(), want);
            }
            Op::Advance(ms) => self.clock.advance(*ms as i64),
            Op::RollIfDue => {
                self.p().roll_if_due().unwrap();
            }
            Op::Renew => {
                let had_spare = self.storage.exists(&self.spare_path());
                self.p().renew_reservations();
                if self.appended_since_renew {
                    assert!(self.storage.exists(&self.spare_path()));
                } else {
                    assert_eq!(
                        self.storage.exists(&self.spare_path()),
                        had_spare,
                        "an idle partition gets no spare"
                    );
                }
                self.appended_since_renew = false;
            }
            Op::Retention => {
                let before = self.p().segment_count();
                let out = self.p().enforce_retention().unwrap();
                assert_eq!(before - out.deleted_segments, self.p().segment_count());
                assert!(self.p().segment_count() >= 1);
                let ls = self.p().log_start_offset();
                assert!(ls >= self.m.log_start && ls <= self.m.next);
                let removed: u64 = self
                    .m
                    .batches
                    .iter()
                    .filter(|b| b.base < ls)
                    .map(|b| b.bytes.len() as u64)
                    .sum();
                assert_eq!(removed, out.deleted_bytes);
                self.m.batches.retain(|b| b.base >= ls);
                assert!(self.m.batches.first().is_none_or(|b| b.base == ls));
                self.m.log_start = ls;
                self.m.durable = self.m.durable.max(ls);
            }
            Op::Crash(seed) => {
                self.p = None;
                self.storage.crash(*seed);
                let report = self.open();
                let n = self.p().next_offset();
                assert_eq!(report.next_offset, n);
                assert!(
                    n >= self.m.durable,
                    "lost durable data: next {n} < durable {}",
                    self.m.durable
                );
                assert!(n <= self.m.next);
                assert!(
                    n == self.m.log_start || self.m.batches.iter().any(|b| b.last + 1 == n),
                    "recovered end {n} is not a batch boundary"
                );
                assert_eq!(self.p().log_start_offset(), self.m.log_start);
                self.m.batches.retain(|b| b.base < n);
                self.m.produced.retain(|b| b.base < n);
                if let Some(b) = self.m.produced.last() {
                    self.m.next_seq = qanat_log::next_sequence(b.last_seq);
                }
                self.m.next = n;
                self.m.durable = n;
                self.verify_all();
                self.check_producer_state();
            }
            Op::Reopen => {
                self.p().close().unwrap();
                assert!(matches!(
                    self.p().append(&make_batch(1, 1, 0, 0)),
                    Err(LogError::Closed)
                ));
                self.p = None;
                let r = self.open();
                assert_eq!(r.truncated_bytes, 0, "{r:?}");
                assert!(r.truncated_at.is_none(), "{r:?}");
                assert!(r.rebuilt_indexes.is_empty(), "{r:?}");
                self.m.durable = self.m.next;
                self.verify_all();
                self.check_producer_state();
            }
        }
    }
}

fn run(cfg: Cfg, ops: Vec<Op>) {
    let config = LogConfig {
        segment_bytes: cfg.segment_bytes,
        segment_ms: 10_000,
        retention_ms: cfg.retention_ms,
        retention_bytes: cfg.retention_bytes,
        index_interval_bytes: cfg.index_interval,
        timestamp_type: if cfg.log_append_time {
            TimestampType::LogAppendTime
        } else {
            TimestampType::CreateTime
        },
        serve_durable_only: cfg.durable_only,
    };
    let mut h = Harness {
        storage: Arc::new(SimStorage::new()),
        clock: Arc::new(ManualClock::new(1_000_000)),
        dir: PathBuf::from("/data/topic-0"),
        config,
        p: None,
        m: Model::default(),
        appended_since_renew: false,
    };
    h.open();
    for op in &ops {
        h.apply(op);
        assert_eq!(h.p().next_offset(), h.m.next);
    }
    h.p().sync().unwrap();
    h.verify_all();
}

trait Now {
    fn now(&self) -> i64;
}
impl Now for ManualClock {
    fn now(&self) -> i64 {
        qanat_log::Clock::now_ms(self)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn partition_matches_model(cfg in cfg(), ops in prop::collection::vec(op(), 1..120)) {
        run(cfg, ops);
    }

    /// Arbitrary bytes to `append` are rejected or accepted, never panic, never break the log.
    #[test]
    fn append_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let storage = Arc::new(SimStorage::new());
        let clock = Arc::new(ManualClock::new(0));
        let (p, _) = Partition::open(storage, clock, PathBuf::from("/x"), LogConfig::default()).unwrap();
        let _ = p.append(&bytes);
        p.append(&make_batch(1, 3, 0, 0)).unwrap();
        let out = p.read(p.next_offset() - 1, 1000).unwrap();
        prop_assert_eq!(split_batches(&read_bytes(&out)).len(), 1);
    }
}

/// Counts file reads.
#[derive(Default)]
struct Reads(std::sync::atomic::AtomicUsize);

impl qanat_log::StorageHooks for Reads {
    fn before(&self, op: qanat_log::StorageOp<'_>) -> std::io::Result<()> {
        if matches!(op, qanat_log::StorageOp::Read | qanat_log::StorageOp::Len) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A consumer resuming at a batch boundary the index knows, with the rest of the log within
/// its limit, is answered without a file read; anywhere else the memory read gives up.
#[test]
fn reads_at_indexed_boundaries_need_no_file() {
    let reads = Arc::new(Reads::default());
    let storage = Arc::new(qanat_log::HookedStorage::with_hooks(
        Arc::new(SimStorage::new()),
        reads.clone(),
    ));
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        index_interval_bytes: 1024,
        ..LogConfig::default()
    };
    let clock = Arc::new(ManualClock::new(0));
    let (p, _) = Partition::open(storage, clock, PathBuf::from("/x"), config).unwrap();
    // Batches of 4 records of 500 bytes: each is larger than the index interval, so every
    // batch start is indexed; 40 of them roll the 64 KiB segments a few times.
    for i in 0..40u8 {
        p.append(&make_batch(4, 500, 0, i)).unwrap();
    }
    let before = reads.0.load(std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for offset in (0..p.next_offset()).step_by(4) {
        let fast = p.read_from_memory(offset, u64::MAX).unwrap();
        let Some(fast) = fast else { continue };
        answered += 1;
        assert_eq!(
            fast.next_offset,
            p.next_offset(),
            "read to the end from {offset}"
        );
        assert!(!fast.slices.is_empty());
    }
    // At the log end: nothing to read, and no file touched either.
    let end = p
        .read_from_memory(p.next_offset(), 1 << 20)
        .unwrap()
        .unwrap();
    assert!(end.slices.is_empty());
    assert_eq!(reads.0.load(std::sync::atomic::Ordering::Relaxed), before);
    assert_eq!(answered, 40, "every batch start is answered from memory");
    // Inside a batch, or with a limit below what is left, only a header walk can tell.
    assert!(p.read_from_memory(1, u64::MAX).unwrap().is_none());
    assert!(p.read_from_memory(0, 100).unwrap().is_none());
    // Whatever memory answered equals the files' answer.
    for offset in (0..p.next_offset()).step_by(4) {
        let fast = p.read_from_memory(offset, u64::MAX).unwrap().unwrap();
        let slow = p.read(offset, u64::MAX).unwrap();
        assert_eq!(read_bytes(&fast), read_bytes(&slow));
        assert_eq!(fast.next_offset, slow.next_offset);
    }
}

/// Fails every rename out of the spare segment's path.
struct SpareRenameFails;

impl qanat_log::StorageHooks for SpareRenameFails {
    fn before(&self, op: qanat_log::StorageOp<'_>) -> std::io::Result<()> {
        match op {
            qanat_log::StorageOp::Rename(from, _) if from.ends_with("next-segment.spare") => {
                Err(std::io::Error::other("rename refused"))
            }
            _ => Ok(()),
        }
    }
}

/// A spare that cannot be renamed in costs only the reservation: the roll creates the next
/// segment itself, and the append that rolled is stored.
#[test]
fn a_roll_whose_spare_cannot_be_used_creates_the_next_segment() {
    let storage = Arc::new(qanat_log::HookedStorage::with_hooks(
        Arc::new(SimStorage::new()),
        Arc::new(SpareRenameFails),
    ));
    let config = LogConfig {
        segment_bytes: 4096,
        ..LogConfig::default()
    };
    let clock = Arc::new(ManualClock::new(0));
    let dir = PathBuf::from("/x");
    let (p, _) = Partition::open(storage.clone(), clock, dir.clone(), config).unwrap();
    p.append(&make_batch(1, 3000, 0, 1)).unwrap();
    p.renew_reservations();
    assert!(storage.exists(&dir.join("next-segment.spare")));
    let rolled = p.append(&make_batch(1, 3000, 0, 2)).unwrap();
    assert_eq!(p.segment_count(), 2);
    assert_eq!(rolled.base_offset, 1);
    let got = split_batches(&read_bytes(&p.read(0, 1 << 20).unwrap()));
    assert_eq!(got.len(), 2, "both batches read back");
}
