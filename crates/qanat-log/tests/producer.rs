//! Idempotent-producer state: duplicates, sequence checks, epoch fencing, persistence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{make_batch, read_bytes, split_batches};
use qanat_log::batch::{self, encode_batch_with, SimpleRecord};
use qanat_log::{
    AppendOutcome, LogConfig, LogError, ManualClock, Partition, SimStorage, Storage, TimestampType,
    PRODUCER_EXPIRATION_MS,
};

const PID: i64 = 4242;
const T0: i64 = 1_000_000;

/// An idempotent batch of `n` records.
fn pbatch(pid: i64, epoch: i16, seq: i32, n: usize) -> Vec<u8> {
    let v = [seq as u8; 40];
    let recs: Vec<_> = (0..n)
        .map(|i| SimpleRecord {
            timestamp: T0 + i as i64,
            key: None,
            value: Some(&v),
        })
        .collect();
    encode_batch_with(Some((pid, epoch, seq)), &recs)
}

struct Env {
    storage: Arc<SimStorage>,
    clock: Arc<ManualClock>,
    dir: PathBuf,
    config: LogConfig,
}

impl Env {
    fn new(config: LogConfig) -> Self {
        Env {
            storage: Arc::new(SimStorage::new()),
            clock: Arc::new(ManualClock::new(T0)),
            dir: PathBuf::from("/data/p-0"),
            config,
        }
    }
    fn open(&self) -> (Partition, qanat_log::RecoveryReport) {
        Partition::open(
            self.storage.clone(),
            self.clock.clone(),
            self.dir.clone(),
            self.config.clone(),
        )
        .unwrap()
    }
}

fn small() -> LogConfig {
    LogConfig {
        segment_bytes: 600,
        index_interval_bytes: 128,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn assert_dup(o: &AppendOutcome, orig: &AppendOutcome) {
    assert!(o.duplicate, "{o:?}");
    assert_eq!(
        (o.base_offset, o.last_offset),
        (orig.base_offset, orig.last_offset)
    );
    assert_eq!((o.bytes, o.records), (0, 0));
}

fn out_of_order(r: Result<AppendOutcome, LogError>) -> (i64, i32, i32) {
    match r {
        Err(LogError::OutOfOrderSequence {
            producer_id,
            expected,
            got,
        }) => (producer_id, expected, got),
        other => panic!("expected OutOfOrderSequence, got {other:?}"),
    }
}

#[test]
fn duplicate_retry_is_acknowledged_with_original_offsets() {
    let env = Env::new(LogConfig::default());
    let (p, _) = env.open();
    p.append(&make_batch(2, 10, T0, 0)).unwrap(); // non-idempotent, offsets 0..=1
    let b1 = pbatch(PID, 0, 0, 3);
    let o1 = p.append(&b1).unwrap();
    assert!(!o1.duplicate);
    assert_eq!((o1.base_offset, o1.last_offset), (2, 4));
    let b2 = pbatch(PID, 0, 3, 2);
    let o2 = p.append(&b2).unwrap();
    assert_eq!((o2.base_offset, o2.last_offset), (5, 6));
    let (next, size) = (p.next_offset(), p.size_bytes());

    assert_dup(&p.append(&b2).unwrap(), &o2);
    assert_dup(&p.append(&b1).unwrap(), &o1);
    assert_eq!((p.next_offset(), p.size_bytes()), (next, size));
    assert_eq!(p.producer_state(PID), Some((0, 4)));
    // Stored once.
    let got = split_batches(&read_bytes(&p.read(0, 1 << 20).unwrap()));
    assert_eq!(got.len(), 3);

    // Only the last 5 batches are remembered: an older retry is just out of order.
    for seq in 5..10 {
        p.append(&pbatch(PID, 0, seq, 1)).unwrap();
    }
    assert_eq!(out_of_order(p.append(&b1)), (PID, 10, 0));
    assert_eq!(p.next_offset(), next + 5);
}

#[test]
fn duplicate_keeps_log_append_time() {
    let env = Env::new(LogConfig {
        timestamp_type: TimestampType::LogAppendTime,
        ..LogConfig::default()
    });
    let (p, _) = env.open();
    let b = pbatch(PID, 0, 0, 2);
    let o = p.append(&b).unwrap();
    env.clock.advance(5_000);
    let d = p.append(&b).unwrap();
    assert_dup(&d, &o);
    assert_eq!(d.log_append_time, Some(T0));
}

#[test]
fn gap_and_reorder_are_refused_without_appending() {
    let env = Env::new(LogConfig::default());
    let (p, _) = env.open();
    p.append(&pbatch(PID, 0, 0, 5)).unwrap();
    let next = p.next_offset();
    assert_eq!(out_of_order(p.append(&pbatch(PID, 0, 6, 1))), (PID, 5, 6));
    assert_eq!(out_of_order(p.append(&pbatch(PID, 0, 2, 1))), (PID, 5, 2));
    // Same base, different range: not a duplicate.
    assert_eq!(out_of_order(p.append(&pbatch(PID, 0, 0, 4))), (PID, 5, 0));
    assert_eq!(p.next_offset(), next);
    p.append(&pbatch(PID, 0, 5, 1)).unwrap();
    assert_eq!(p.producer_state(PID), Some((0, 5)));
}

#[test]
fn epoch_fencing_and_bump() {
    let env = Env::new(LogConfig::default());
    let (p, _) = env.open();
    p.append(&pbatch(PID, 3, 0, 2)).unwrap();
    let next = p.next_offset();
    match p.append(&pbatch(PID, 2, 2, 1)) {
        Err(LogError::InvalidProducerEpoch {
            producer_id,
            current,
            got,
        }) => assert_eq!((producer_id, current, got), (PID, 3, 2)),
        other => panic!("{other:?}"),
    }
    // A fenced producer's retry is refused too, not acknowledged.
    assert!(matches!(
        p.append(&pbatch(PID, 2, 0, 2)),
        Err(LogError::InvalidProducerEpoch { .. })
    ));
    // Epoch bump must restart at 0.
    assert_eq!(out_of_order(p.append(&pbatch(PID, 4, 2, 1))), (PID, 0, 2));
    assert_eq!(p.next_offset(), next);
    let o = p.append(&pbatch(PID, 4, 0, 3)).unwrap();
    assert_eq!(p.producer_state(PID), Some((4, 2)));
    // The old epoch's batches are no longer duplicates, and are fenced.
    assert!(matches!(
        p.append(&pbatch(PID, 3, 0, 2)),
        Err(LogError::InvalidProducerEpoch { .. })
    ));
    assert_dup(&p.append(&pbatch(PID, 4, 0, 3)).unwrap(), &o);
}

#[test]
fn unknown_producer_accepts_any_sequence_and_independent_producers() {
    let env = Env::new(LogConfig::default());
    let (p, _) = env.open();
    assert_eq!(p.producer_state(PID), None);
    p.append(&pbatch(PID, 1, 1000, 2)).unwrap();
    assert_eq!(p.producer_state(PID), Some((1, 1001)));
    p.append(&pbatch(PID + 1, 0, 7, 1)).unwrap();
    p.append(&pbatch(PID, 1, 1002, 1)).unwrap();
    assert_eq!(
        out_of_order(p.append(&pbatch(PID + 1, 0, 9, 1))),
        (PID + 1, 8, 9)
    );
    assert_eq!(p.producer_count(), 2);
}

#[test]
fn sequence_wraps_at_i32_max() {
    let env = Env::new(LogConfig::default());
    let (p, _) = env.open();
    p.append(&pbatch(PID, 0, i32::MAX - 1, 3)).unwrap(); // MAX-1, MAX, 0
    assert_eq!(p.producer_state(PID), Some((0, 0)));
    assert_eq!(
        out_of_order(p.append(&pbatch(PID, 0, i32::MAX, 1))),
        (PID, 1, i32::MAX)
    );
    p.append(&pbatch(PID, 0, 1, 1)).unwrap();
    // A batch ending exactly at MAX is followed by 0.
    p.append(&pbatch(PID + 1, 0, i32::MAX, 1)).unwrap();
    assert_eq!(p.producer_state(PID + 1), Some((0, i32::MAX)));
    p.append(&pbatch(PID + 1, 0, 0, 1)).unwrap();
    let o = p.append(&pbatch(PID, 0, 2, 2)).unwrap();
    assert_dup(&p.append(&pbatch(PID, 0, 2, 2)).unwrap(), &o);
}

#[test]
fn several_batches_in_one_buffer() {
    let env = Env::new(LogConfig::default());
    let (p, _) = env.open();
    let a = pbatch(PID, 0, 0, 3);
    let b = pbatch(PID, 0, 3, 2);
    let mut buf = a.clone();
    buf.extend(&b);
    buf.extend(make_batch(1, 5, T0, 1));
    let o = p.append(&buf).unwrap();
    assert_eq!((o.base_offset, o.last_offset, o.duplicate), (0, 5, false));
    assert_eq!(p.producer_state(PID), Some((0, 4)));
    let next = p.next_offset();

    // Retry of the whole idempotent part: duplicate with the span of the originals.
    let mut retry = a.clone();
    retry.extend(&b);
    let d = p.append(&retry).unwrap();
    assert!(d.duplicate);
    assert_eq!((d.base_offset, d.last_offset), (0, 4));
    // ... but not together with a non-idempotent batch, nor with a new batch.
    assert_eq!(out_of_order(p.append(&buf)), (PID, 5, 0));
    let mut mixed = b.clone();
    mixed.extend(pbatch(PID, 0, 5, 1));
    assert_eq!(out_of_order(p.append(&mixed)), (PID, 5, 3));
    // Chained within the buffer: the second must follow the first.
    let mut gap = pbatch(PID, 0, 5, 1);
    gap.extend(pbatch(PID, 0, 7, 1));
    assert_eq!(out_of_order(p.append(&gap)), (PID, 6, 7));
    let mut same = pbatch(PID, 0, 5, 1);
    same.extend(pbatch(PID, 0, 5, 1));
    assert_eq!(out_of_order(p.append(&same)), (PID, 6, 5));
    // A bump in the middle of a buffer, then fencing of the old epoch in the same buffer.
    let mut fenced = pbatch(PID, 1, 0, 1);
    fenced.extend(pbatch(PID, 0, 5, 1));
    assert!(matches!(
        p.append(&fenced),
        Err(LogError::InvalidProducerEpoch {
            current: 1,
            got: 0,
            ..
        })
    ));
    assert_eq!(p.next_offset(), next);
    assert_eq!(p.producer_state(PID), Some((0, 4)));
    let mut ok = pbatch(PID, 0, 5, 1);
    ok.extend(pbatch(PID, 1, 0, 2));
    ok.extend(pbatch(PID, 1, 2, 1));
    p.append(&ok).unwrap();
    assert_eq!(p.producer_state(PID), Some((1, 2)));
}

fn with_attributes(mut b: Vec<u8>, bits: i16) -> Vec<u8> {
    let a = i16::from_be_bytes([b[21], b[22]]) | bits;
    b[21..23].copy_from_slice(&a.to_be_bytes());
    let crc = batch::compute_crc(&b).unwrap();
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    b
}

#[test]
fn transactional_and_control_batches_are_refused() {
    let env = Env::new(LogConfig::default());
    let (p, _) = env.open();
    for bits in [
        batch::ATTR_TRANSACTIONAL,
        batch::ATTR_CONTROL | batch::ATTR_TRANSACTIONAL,
    ] {
        let t = with_attributes(pbatch(PID, 0, 0, 1), bits);
        assert!(matches!(p.append(&t), Err(LogError::Unsupported { .. })));
        let mut buf = pbatch(PID, 0, 0, 1);
        buf.extend(t);
        assert!(matches!(p.append(&buf), Err(LogError::Unsupported { .. })));
    }
    assert_eq!(p.next_offset(), 0);
    assert_eq!(p.producer_state(PID), None);
    // A producer id with a negative sequence is malformed.
    assert!(matches!(
        p.append(&pbatch(PID, 0, -1, 1)),
        Err(LogError::CorruptBatch { .. })
    ));
}

/// Appends `count` single-record batches continuing `seq`; returns each batch and its outcome.
fn produce(p: &Partition, seq: &mut i32, count: usize) -> Vec<(Vec<u8>, AppendOutcome)> {
    (0..count)
        .map(|_| {
            let b = pbatch(PID, 0, *seq, 2);
            *seq += 2;
            let o = p.append(&b).unwrap();
            (b, o)
        })
        .collect()
}

#[test]
fn state_survives_close_and_reopen() {
    let env = Env::new(small());
    let (p, _) = env.open();
    let mut seq = 0;
    let sent = produce(&p, &mut seq, 20);
    assert!(p.segment_count() > 3);
    p.close().unwrap();
    drop(p);

    let (p, r) = env.open();
    assert_eq!(r.producers, 1);
    assert_eq!(p.producer_state(PID), Some((0, seq - 1)));
    for (b, o) in &sent[15..] {
        assert_dup(&p.append(b).unwrap(), o);
    }
    assert_eq!(
        out_of_order(p.append(&sent[14].0)),
        (PID, seq, sent[14].1.base_offset as i32)
    );
    produce(&p, &mut seq, 1);
    p.close().unwrap();
    drop(p);

    // Without any snapshot the state is rebuilt from the segments' headers.
    for path in env.storage.paths() {
        if path.extension().is_some_and(|e| e == "producers") {
            env.storage.remove_file(&path).unwrap();
        }
    }
    let (p, _) = env.open();
    assert_eq!(p.producer_state(PID), Some((0, seq - 1)));
    let (b, o) = &sent[19];
    assert_dup(&p.append(b).unwrap(), o);
    assert!(p.append(&pbatch(PID, 0, seq - 2, 2)).unwrap().duplicate);
    assert!(matches!(
        p.append(&sent[15].0),
        Err(LogError::OutOfOrderSequence { .. })
    ));
}

#[test]
fn corrupt_snapshot_falls_back_to_older_one() {
    let env = Env::new(small());
    let (p, _) = env.open();
    let mut seq = 0;
    let sent = produce(&p, &mut seq, 20);
    p.close().unwrap();
    drop(p);
    let mut snaps: Vec<_> = env
        .storage
        .paths()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "producers"))
        .collect();
    snaps.sort();
    assert!(snaps.len() >= 3, "{snaps:?}");
    let newest = snaps.last().unwrap();
    let f = env.storage.open(newest).unwrap();
    f.set_len(f.len().unwrap() - 1).unwrap();
    let (p, _) = env.open();
    assert_eq!(p.producer_state(PID), Some((0, seq - 1)));
    let (b, o) = sent.last().unwrap();
    assert_dup(&p.append(b).unwrap(), o);
}

#[test]
fn state_survives_crash_of_synced_data() {
    for seed in 0..40u64 {
        let env = Env::new(small());
        let (p, _) = env.open();
        let mut seq = 0;
        let sent = produce(&p, &mut seq, 12);
        p.sync().unwrap();
        let durable = p.next_offset();
        let unsynced = produce(&p, &mut seq, 3);
        drop(p);
        env.storage.crash(seed);
        let (p, _) = env.open();
        let n = p.next_offset();
        assert!(n >= durable);
        let all: Vec<_> = sent.iter().chain(&unsynced).collect();
        let kept: Vec<_> = all.iter().filter(|(_, o)| o.last_offset < n).collect();
        let (lb, lo) = kept.last().unwrap();
        assert_dup(&p.append(lb).unwrap(), lo);
        let (_, last_seq) = p.producer_state(PID).unwrap();
        assert_eq!(last_seq, (kept.len() * 2 - 1) as i32, "seed {seed}");
        // A retry of a batch lost in the crash is appended again (at the recovered end).
        if let Some((b, _)) = all.get(kept.len()) {
            let o = p.append(b).unwrap();
            assert!(!o.duplicate);
            assert_eq!(o.base_offset, n);
        }
    }
}

#[test]
fn state_outlives_retention_and_expires_when_idle() {
    let env = Env::new(LogConfig {
        retention_bytes: Some(1200),
        ..small()
    });
    let (p, _) = env.open();
    let mut seq = 0;
    let sent = produce(&p, &mut seq, 12);
    for _ in 0..4 {
        p.append(&make_batch(8, 40, T0, 3)).unwrap();
    }
    p.append(&make_batch(1, 1, T0, 3)).unwrap();
    let r = p.enforce_retention().unwrap();
    assert!(
        p.log_start_offset() > sent.last().unwrap().1.last_offset,
        "{r:?}"
    );
    assert_eq!(p.producer_state(PID), Some((0, seq - 1)));
    let (b, o) = sent.last().unwrap();
    assert_dup(&p.append(b).unwrap(), o);
    // Crash without any sync: the snapshot at the new log start was made durable by retention.
    drop(p);
    env.storage.crash(7);
    let (p, _) = env.open();
    assert_eq!(p.producer_state(PID), Some((0, seq - 1)));
    assert_dup(&p.append(b).unwrap(), o);

    env.clock.advance(PRODUCER_EXPIRATION_MS + 10);
    p.enforce_retention().unwrap();
    assert_eq!(p.producer_state(PID), None);
    p.append(&pbatch(PID, 0, 1_000, 1)).unwrap();
}

#[test]
fn concurrent_retries_store_the_batch_once() {
    let env = Env::new(LogConfig::default());
    let (p, _) = env.open();
    let p = Arc::new(p);
    for round in 0..50 {
        let b = Arc::new(pbatch(PID, 0, round * 3, 3));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (p, b) = (p.clone(), b.clone());
                std::thread::spawn(move || p.append(&b).unwrap())
            })
            .collect();
        let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(outs.iter().filter(|o| !o.duplicate).count(), 1);
        assert!(outs.iter().all(|o| o.base_offset == i64::from(round) * 3));
    }
    assert_eq!(p.next_offset(), 150);
}
