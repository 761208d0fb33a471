//! Recovery and concurrency on the real filesystem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use common::{make_batch, read_bytes, split_batches};
use qanat_log::{
    FaultyStorage, LogConfig, ManualClock, OsStorage, Partition, SyncFaults, SystemClock,
    TimestampType,
};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 1024,
        ..LogConfig::default()
    }
}

fn open(dir: &Path) -> (Partition, qanat_log::RecoveryReport) {
    Partition::open(
        Arc::new(OsStorage),
        Arc::new(ManualClock::new(1_000)),
        dir.to_path_buf(),
        config(),
    )
    .unwrap()
}

fn all_batches(p: &Partition) -> Vec<(i64, i64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut cur = p.log_start_offset();
    while cur < p.next_offset() {
        let got = split_batches(&read_bytes(&p.read(cur, 1 << 20).unwrap()));
        cur = got.last().unwrap().1 + 1;
        out.extend(got);
    }
    out
}

fn log_files(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t-0");
    let (p, r) = open(&dir);
    assert_eq!(r.next_offset, 0);
    for i in 0..40 {
        p.append(&make_batch(3, 500, 1_000 + i, i as u8)).unwrap();
    }
    assert_eq!(p.next_offset(), 120);
    let before = all_batches(&p);
    p.close().unwrap();
    assert!(matches!(p.read(0, 10), Err(qanat_log::LogError::Closed)));
    drop(p);

    let logs = log_files(&dir, "log");
    assert!(logs.len() > 1, "segments rolled");
    let last = logs.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    // Cut the last batch in half, then add garbage.
    let last_batch_len = before.last().unwrap().2.len() as u64;
    let cut_at = len - last_batch_len / 2;
    OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(cut_at)
        .unwrap();
    OpenOptions::new()
        .append(true)
        .open(last)
        .unwrap()
        .write_all(&[0xAB; 37])
        .unwrap();

    let (p, r) = open(&dir);
    assert_eq!(r.truncated_at, Some((last.clone(), len - last_batch_len)));
    assert_eq!(r.truncated_bytes, cut_at - (len - last_batch_len) + 37);
    assert_eq!(p.next_offset(), 117);
    assert_eq!(all_batches(&p), before[..before.len() - 1].to_vec());
    let o = p.append(&make_batch(1, 10, 5, 0)).unwrap();
    assert_eq!(o.base_offset, 117);
    p.close().unwrap();
}

#[test]
fn missing_or_bad_index_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t-1");
    let (p, _) = open(&dir);
    for i in 0..60 {
        p.append(&make_batch(2, 400, 1_000 + i * 10, 1)).unwrap();
    }
    let before = all_batches(&p);
    let ts_probe = p.offset_for_timestamp(1_300).unwrap();
    p.close().unwrap();
    drop(p);

    let idx = log_files(&dir, "index");
    assert!(idx.len() >= 2);
    std::fs::remove_file(&idx[0]).unwrap();
    // Point an entry of another index past the end of its log.
    let mut f = OpenOptions::new().append(true).open(&idx[1]).unwrap();
    f.write_all(&[0, 0, 0xff, 0xff, 0x7f, 0, 0, 0]).unwrap();
    drop(f);

    let (p, r) = open(&dir);
    assert!(r.truncated_at.is_none());
    assert!(r.rebuilt_indexes.contains(&idx[0]), "{r:?}");
    assert!(r.rebuilt_indexes.contains(&idx[1]), "{r:?}");
    assert!(idx[0].exists());
    assert_eq!(all_batches(&p), before);
    assert_eq!(p.offset_for_timestamp(1_300).unwrap(), ts_probe);
    p.close().unwrap();
    drop(p);
    let (_p, r) = open(&dir);
    assert!(r.rebuilt_indexes.is_empty(), "{r:?}");
}

#[test]
fn concurrent_appends_reads_and_group_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, _) = Partition::open(
        Arc::new(OsStorage),
        Arc::new(SystemClock),
        tmp.path().join("t-2"),
        LogConfig {
            segment_bytes: 64 * 1024,
            timestamp_type: TimestampType::LogAppendTime,
            ..LogConfig::default()
        },
    )
    .unwrap();
    let p = Arc::new(p);
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                for i in 0..150 {
                    let mut buf = make_batch(1 + i % 4, 200, 0, t as u8);
                    buf.extend(make_batch(2, 100, 0, t as u8));
                    let o = p.append(&buf).unwrap();
                    if i % 10 == 0 {
                        p.sync_through(o.last_offset + 1).unwrap();
                        assert!(p.durable_offset() > o.last_offset);
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut cur = 0;
                let mut seen = 0;
                while seen < 1200 {
                    let out = p.read(cur, 8192).unwrap();
                    for (base, last, _) in split_batches(&read_bytes(&out)) {
                        assert_eq!(base, cur, "dense offsets, whole batches");
                        cur = last + 1;
                        seen += 1;
                    }
                    assert!(out.high_watermark >= cur);
                }
            })
        })
        .collect();
    for t in writers.into_iter().chain(readers) {
        t.join().unwrap();
    }
    assert_eq!(
        p.next_offset(),
        4 * (150 * 2 + (0..150).map(|i| 1 + i % 4).sum::<usize>()) as i64
    );
    p.sync().unwrap();
    assert_eq!(p.durable_offset(), p.next_offset());
    p.close().unwrap();
}

#[test]
fn retention_and_time_lookup() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000));
    let (p, _) = Partition::open(
        Arc::new(OsStorage),
        clock.clone(),
        tmp.path().join("t-3"),
        LogConfig {
            segment_bytes: 8 * 1024,
            segment_ms: 1_000,
            retention_ms: Some(5_000),
            retention_bytes: None,
            index_interval_bytes: 512,
            timestamp_type: TimestampType::LogAppendTime,
            serve_durable_only: false,
        },
    )
    .unwrap();
    for _ in 0..10 {
        p.append(&make_batch(2, 100, 0, 0)).unwrap();
        clock.advance(600);
        p.roll_if_due().unwrap();
    }
    let segs = p.segment_count();
    assert!(segs >= 5);
    assert_eq!(p.offset_for_timestamp(10_000).unwrap(), Some((0, 10_000)));
    assert_eq!(p.offset_for_timestamp(11_200).unwrap(), Some((4, 11_200)));
    assert_eq!(p.offset_for_timestamp(11_201).unwrap(), Some((6, 11_800)));
    assert_eq!(p.offset_for_timestamp(99_999).unwrap(), None);
    clock.set(10_000 + 5_000 + 1_300);
    let out = p.enforce_retention().unwrap();
    assert!(out.deleted_segments > 0);
    assert!(p.log_start_offset() > 0);
    assert!(p.read(0, 100).is_err());
    assert_eq!(p.segment_count(), segs - out.deleted_segments);
    let start = p.log_start_offset();
    assert_eq!(
        split_batches(&read_bytes(&p.read(start, 1).unwrap()))[0].0,
        start
    );
    clock.advance(1_000_000);
    p.enforce_retention().unwrap();
    assert_eq!(p.segment_count(), 1, "active segment is never deleted");
    let dir = p.dir().to_path_buf();
    p.delete().unwrap();
    assert!(!dir.exists());
}

/// Rough append throughput (run with `--release -- --ignored --nocapture`).
#[test]
#[ignore]
fn append_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, _) = Partition::open(
        Arc::new(OsStorage),
        Arc::new(SystemClock),
        tmp.path().join("bench"),
        LogConfig {
            segment_bytes: 256 << 20,
            ..LogConfig::default()
        },
    )
    .unwrap();
    let mut buf = Vec::new();
    while buf.len() < 1 << 20 {
        buf.extend(make_batch(16, 1000, 0, 7));
    }
    let total: u64 = 1 << 30;
    let start = std::time::Instant::now();
    let mut written = 0;
    while written < total {
        written += p.append(&buf).unwrap().bytes;
    }
    let append = start.elapsed();
    p.sync().unwrap();
    let all = start.elapsed();
    eprintln!(
        "appended {} MiB: {:.0} MiB/s without fsync, {:.0} MiB/s including final fsync",
        written >> 20,
        (written >> 20) as f64 / append.as_secs_f64(),
        (written >> 20) as f64 / all.as_secs_f64()
    );
}

/// A partition over the real filesystem whose fdatasyncs fail on demand.
fn open_failing(dir: &Path, config: LogConfig) -> (Partition, Arc<SyncFaults>) {
    let storage = FaultyStorage::new(Arc::new(OsStorage));
    let faults = storage.faults();
    let p = Partition::open(
        Arc::new(storage),
        Arc::new(ManualClock::new(1_000)),
        dir.to_path_buf(),
        config,
    )
    .unwrap()
    .0;
    (p, faults)
}

/// An idempotent batch of producer 9, epoch 0, starting at `seq`.
fn idempotent(seq: i32, fill: u8) -> Vec<u8> {
    let value = vec![fill; 100];
    let recs: Vec<_> = (0..2)
        .map(|i| qanat_log::batch::SimpleRecord {
            timestamp: 1_000 + i,
            key: None,
            value: Some(&value),
        })
        .collect();
    qanat_log::batch::encode_batch_with(Some((9, 0, seq)), &recs)
}

#[test]
fn a_failed_fdatasync_cuts_back_to_the_durable_end_and_a_retry_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        serve_durable_only: true,
        ..config()
    };
    let (p, faults) = open_failing(dir.path(), config.clone());
    let first = p.append(&idempotent(0, 1)).unwrap();
    p.sync_append(&first).unwrap();
    let second = p.append(&idempotent(2, 2)).unwrap();
    assert_eq!(
        p.high_watermark(),
        second.base_offset,
        "unsynced data is not served"
    );
    faults.fail_next(1);
    assert!(p.sync_append(&second).is_err());

    // The unsynced append is gone from the log, not merely hidden.
    assert_eq!(p.next_offset(), second.base_offset);
    assert_eq!(p.durable_offset(), second.base_offset);
    assert!(read_bytes(&p.read(second.base_offset, 1 << 20).unwrap()).is_empty());
    // The disk "recovers": the cut append must still never count as durable.
    assert!(matches!(
        p.sync_append(&second),
        Err(qanat_log::LogError::CutBySyncFailure { .. })
    ));

    // The producer retries the same sequence: stored once, at the same offsets.
    let retry = p.append(&idempotent(2, 2)).unwrap();
    assert!(
        !retry.duplicate,
        "the cut batch is not in the producer state any more"
    );
    assert_eq!(retry.base_offset, second.base_offset);
    p.sync_append(&retry).unwrap();
    assert_eq!(p.high_watermark(), retry.last_offset + 1);
    let again = p.append(&idempotent(2, 2)).unwrap();
    assert!(again.duplicate);
    let before = all_batches(&p);
    assert_eq!(before.len(), 2);
    p.close().unwrap();
    drop(p);

    let (p, _) = open_failing(dir.path(), config);
    assert_eq!(all_batches(&p), before);
    assert_eq!(p.producer_state(9), Some((0, 3)));
}

#[test]
fn a_failed_fdatasync_across_rolled_segments_cuts_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let (p, faults) = open_failing(dir.path(), config());
    for i in 0..10 {
        p.append(&make_batch(3, 500, 1_000 + i, i as u8)).unwrap();
    }
    p.sync().unwrap();
    let durable = p.next_offset();
    let kept = all_batches(&p);
    let segments = p.segment_count();
    for i in 0..60 {
        p.append(&make_batch(3, 500, 2_000 + i, i as u8)).unwrap();
    }
    assert!(p.segment_count() > segments + 1, "appends rolled segments");
    faults.fail_next(1);
    assert!(p.sync().is_err());
    assert_eq!(p.next_offset(), durable);
    assert_eq!(p.segment_count(), segments);
    assert_eq!(all_batches(&p), kept);
    // Appending goes on where the durable log ended.
    let o = p.append(&make_batch(1, 10, 3_000, 9)).unwrap();
    assert_eq!(o.base_offset, durable);
    p.sync_append(&o).unwrap();
}

#[test]
fn segments_rolled_before_a_cut_are_not_resized_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (p, faults) = open_failing(dir.path(), config());
    p.append(&make_batch(3, 500, 1_000, 1)).unwrap();
    p.sync().unwrap();
    // Rolls queue their closed segments for release; the failed sync cuts them away.
    let segments = p.segment_count();
    for i in 0..20 {
        p.append(&make_batch(3, 500, 2_000 + i, i as u8)).unwrap();
    }
    assert!(p.segment_count() > segments + 1, "appends rolled segments");
    faults.fail_next(1);
    assert!(p.sync().is_err());
    // The same files fill again, with batches of another size: they close at other lengths
    // than the ones they had when queued.
    for i in 0..30 {
        p.append(&make_batch(2, 300, 3_000 + i, 100 + i as u8))
            .unwrap();
    }
    p.sync().unwrap();
    let before = all_batches(&p);
    p.release_reserved();
    assert_eq!(all_batches(&p), before, "release cut nothing");
    p.close().unwrap();
    drop(p);
    let (p, r) = open(dir.path());
    assert_eq!(r.truncated_bytes, 0, "release extended nothing: {r:?}");
    assert_eq!(all_batches(&p), before);
}

#[test]
fn a_disk_that_keeps_failing_closes_the_partition_and_nothing_is_called_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (p, faults) = open_failing(dir.path(), config());
    let first = p.append(&make_batch(2, 100, 0, 1)).unwrap();
    p.sync_append(&first).unwrap();
    let second = p.append(&make_batch(2, 100, 0, 2)).unwrap();
    faults.fail_next(u32::MAX);
    assert!(p.sync_append(&second).is_err());
    // The cut itself could not be made durable: the partition stops until a restart.
    faults.fail_next(0);
    assert!(p.sync_append(&second).is_err());
    assert!(p.append(&make_batch(1, 100, 0, 3)).is_err());
    assert!(p.durable_offset() <= second.base_offset);
}

#[test]
fn serving_durable_only_hides_unsynced_batches_from_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        serve_durable_only: true,
        ..config()
    };
    let (p, _) = Partition::open(
        Arc::new(OsStorage),
        Arc::new(ManualClock::new(1_000)),
        dir.path().to_path_buf(),
        config,
    )
    .unwrap();
    let a = p.append(&make_batch(2, 100, 5_000, 1)).unwrap();
    assert_eq!(p.high_watermark(), 0);
    let out = p.read(0, 1 << 20).unwrap();
    assert!(out.slices.is_empty());
    assert_eq!(out.high_watermark, 0);
    assert_eq!(p.offset_for_timestamp(0).unwrap(), None);
    p.sync_append(&a).unwrap();
    let b = p.append(&make_batch(2, 100, 6_000, 2)).unwrap();
    assert_eq!(p.high_watermark(), b.base_offset);
    let got = split_batches(&read_bytes(&p.read(0, 1 << 20).unwrap()));
    assert_eq!(got.len(), 1, "only the synced batch");
    assert_eq!(p.offset_for_timestamp(5_500).unwrap(), None);
    p.sync().unwrap();
    assert_eq!(
        p.offset_for_timestamp(5_500).unwrap(),
        Some((b.base_offset, 6_001))
    );
}

#[test]
fn a_clean_shutdown_skips_the_crc_scan_and_a_crash_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t-0");
    let (p, _) = open(&dir);
    for i in 0..10 {
        p.append(&make_batch(3, 200, 1_000 + i, i as u8)).unwrap();
    }
    let before = all_batches(&p);
    p.close().unwrap();
    drop(p);
    assert!(dir.join("clean-shutdown").exists());

    let (p, r) = open(&dir);
    assert!(r.clean_shutdown, "{r:?}");
    assert_eq!(r.crc_checked_bytes, 0, "{r:?}");
    assert!(
        !dir.join("clean-shutdown").exists(),
        "the marker vouches for one run only"
    );
    assert_eq!(all_batches(&p), before);
    p.append(&make_batch(3, 200, 2_000, 7)).unwrap();
    drop(p); // a crash: no close

    let (p, r) = open(&dir);
    assert!(!r.clean_shutdown, "{r:?}");
    assert!(r.crc_checked_bytes > 0, "{r:?}");
    assert_eq!(all_batches(&p).len(), before.len() + 1);
    p.close().unwrap();
    drop(p);

    // A marker that does not match the active segment (it grew after the close) is ignored.
    let active = log_files(&dir, "log").pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&active).unwrap();
    f.write_all(&make_batch(1, 50, 3_000, 3)[..40]).unwrap();
    drop(f);
    let (_, r) = open(&dir);
    assert!(!r.clean_shutdown, "{r:?}");
    assert!(r.truncated_bytes > 0, "the torn tail was found: {r:?}");
}

#[test]
fn blocks_are_reserved_ahead_of_appends_and_released_when_the_segment_rolls() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t-0");
    let (p, _) = open(&dir);
    p.append(&make_batch(1, 500, 1_000, 1)).unwrap();
    let first = log_files(&dir, "log").remove(0);
    let meta = std::fs::metadata(&first).unwrap();
    assert!(
        meta.len() < 1024,
        "the length is what was appended: {}",
        meta.len()
    );
    assert!(
        meta.blocks() * 512 >= config().segment_bytes,
        "blocks up to the segment size are reserved: {} bytes",
        meta.blocks() * 512
    );
    while log_files(&dir, "log").len() < 2 {
        p.append(&make_batch(3, 500, 1_000, 2)).unwrap();
    }
    // Not on the append path (a roll): the sync thread (or the broker's tick) gives them back.
    let meta = std::fs::metadata(&first).unwrap();
    assert!(
        meta.blocks() * 512 >= config().segment_bytes,
        "still reserved after the roll: {} bytes",
        meta.blocks() * 512
    );
    p.release_reserved();
    let meta = std::fs::metadata(&first).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len() + 4096 + 1,
        "a released segment keeps no reserved blocks past its end: {} blocks for {} bytes",
        meta.blocks(),
        meta.len()
    );
    // Reserved blocks are invisible to recovery.
    let before = all_batches(&p);
    drop(p);
    let (p, r) = open(&dir);
    assert_eq!(r.truncated_bytes, 0, "{r:?}");
    assert_eq!(all_batches(&p), before);
}

#[test]
fn reserve_ahead_covers_twice_the_appends_since_its_last_call_within_the_segment() {
    use std::os::unix::fs::MetadataExt;
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t-0");
    let config = LogConfig {
        segment_bytes: 128 * MIB,
        ..config()
    };
    let (p, _) = Partition::open(
        Arc::new(OsStorage),
        Arc::new(ManualClock::new(1_000)),
        dir.clone(),
        config,
    )
    .unwrap();
    let batch = make_batch(1, MIB as usize, 1_000, 1);
    let log = log_files(&dir, "log").remove(0);
    let reserved = || std::fs::metadata(&log).unwrap().blocks() * 512;
    let end = || std::fs::metadata(&log).unwrap().len();
    for _ in 0..20 {
        p.append(&batch).unwrap();
    }
    if reserved() == 0 {
        return; // a filesystem without fallocate: nothing is reserved anywhere
    }
    assert!(
        reserved() < end() + 2 * end(),
        "the append path reserves only its fixed step"
    );
    p.reserve_ahead();
    assert!(
        reserved() >= 3 * end(),
        "twice the 20 MiB appended since the open, past the end: {} for {}",
        reserved(),
        end()
    );
    let before = reserved();
    p.reserve_ahead();
    assert_eq!(reserved(), before, "nothing appended since: nothing more");
    for _ in 0..40 {
        p.append(&batch).unwrap();
    }
    p.reserve_ahead();
    assert!(
        (128 * MIB..128 * MIB + MIB).contains(&reserved()),
        "80 MiB ahead of 60 MiB passes the segment: reserved up to it, {}",
        reserved()
    );
    assert_eq!(log_files(&dir, "log").len(), 1, "no roll meanwhile");
}

#[test]
fn near_a_segment_end_the_next_one_is_reserved_ahead_and_renamed_in_at_the_roll() {
    use std::os::unix::fs::MetadataExt;
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t-0");
    let config = LogConfig {
        segment_bytes: 64 * MIB,
        ..config()
    };
    let clock = Arc::new(ManualClock::new(1_000));
    let open = || {
        Partition::open(
            Arc::new(OsStorage),
            clock.clone(),
            dir.clone(),
            config.clone(),
        )
        .unwrap()
        .0
    };
    let p = open();
    let spare = dir.join("next-segment.spare");
    let reserved = |f: &Path| std::fs::metadata(f).unwrap().blocks() * 512;
    let batch = make_batch(1, MIB as usize, 1_000, 1);
    let append = |p: &Partition, n: usize| {
        for _ in 0..n {
            p.append(&batch).unwrap();
        }
    };
    append(&p, 10);
    clock.advance(1_000);
    p.reserve_ahead();
    assert!(
        !spare.exists(),
        "10 of 64 MiB, 20 more expected: no roll near"
    );
    append(&p, 30);
    clock.advance(1_000);
    p.reserve_ahead();
    assert!(
        spare.exists(),
        "40 of 64 MiB, 60 more expected: the roll is near"
    );
    assert_eq!(std::fs::metadata(&spare).unwrap().len(), 0);
    let fallocate = reserved(&spare) > 0;
    if fallocate {
        assert!(
            reserved(&spare) >= 64 * MIB,
            "a segment fills in a minute at 30 MiB/s: all of it, {}",
            reserved(&spare)
        );
    }
    append(&p, 30);
    let logs = log_files(&dir, "log");
    assert_eq!(logs.len(), 2, "rolled once");
    assert!(!spare.exists(), "renamed in at the roll");
    if fallocate {
        assert!(
            reserved(&logs[1]) >= 64 * MIB,
            "the new segment keeps the reservation"
        );
    }

    // A crash leaves the spare behind; open removes it and the log is whole.
    append(&p, 20);
    clock.advance(1_000);
    p.reserve_ahead();
    assert!(spare.exists());
    let before = all_batches(&p);
    drop(p);
    assert!(spare.exists());
    let p = open();
    assert!(!spare.exists(), "open removes a leftover spare");
    assert_eq!(all_batches(&p), before);
    append(&p, 45);
    clock.advance(1_000);
    p.reserve_ahead();
    assert!(spare.exists());
    p.close().unwrap();
    assert!(!spare.exists(), "close gives the spare back");
}

#[test]
fn a_slow_partitions_spare_segment_is_reserved_for_a_minute_of_its_appends() {
    use std::os::unix::fs::MetadataExt;
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t-0");
    let clock = Arc::new(ManualClock::new(1_000));
    let config = LogConfig {
        segment_bytes: 64 * MIB,
        ..config()
    };
    let (p, _) = Partition::open(Arc::new(OsStorage), clock.clone(), dir.clone(), config).unwrap();
    let batch = make_batch(1, MIB as usize, 1_000, 1);
    for _ in 0..50 {
        p.append(&batch).unwrap();
    }
    clock.advance(600_000);
    p.reserve_ahead();
    let spare = dir.join("next-segment.spare");
    let reserved = std::fs::metadata(&spare).unwrap().blocks() * 512;
    if reserved > 0 {
        assert!(
            (16 * MIB..32 * MIB).contains(&reserved),
            "5 MiB a minute: the fixed 16 MiB step, not the segment; {reserved}"
        );
    }
}

/// Real files that remember where the bytes handed to them lived in memory.
struct AddressRecordingStorage {
    written_from: Arc<parking_lot::Mutex<Vec<std::ops::Range<usize>>>>,
}

struct AddressRecordingFile {
    inner: Arc<dyn qanat_log::LogFile>,
    written_from: Arc<parking_lot::Mutex<Vec<std::ops::Range<usize>>>>,
}

impl AddressRecordingFile {
    fn note(&self, buf: &[u8]) {
        let start = buf.as_ptr() as usize;
        self.written_from.lock().push(start..start + buf.len());
    }
}

impl qanat_log::LogFile for AddressRecordingFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, pos)
    }
    fn append(&self, buf: &[u8]) -> std::io::Result<()> {
        self.note(buf);
        self.inner.append(buf)
    }
    fn append_vectored(&self, bufs: &mut [std::io::IoSlice<'_>]) -> std::io::Result<()> {
        for b in bufs.iter() {
            self.note(b);
        }
        self.inner.append_vectored(bufs)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.raw_fd()
    }
}

impl qanat_log::Storage for AddressRecordingStorage {
    fn open(&self, path: &Path) -> std::io::Result<Arc<dyn qanat_log::LogFile>> {
        Ok(Arc::new(AddressRecordingFile {
            inner: OsStorage.open(path)?,
            written_from: self.written_from.clone(),
        }))
    }
    fn exists(&self, path: &Path) -> bool {
        OsStorage.exists(path)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        OsStorage.rename(from, to)
    }
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.create_dir_all(path)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.remove_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> std::io::Result<Vec<String>> {
        OsStorage.list_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.sync_dir(path)
    }
}

#[test]
fn create_time_batches_are_written_from_the_callers_bytes_without_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let written_from = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let storage = AddressRecordingStorage {
        written_from: written_from.clone(),
    };
    let (p, _) = Partition::open(
        Arc::new(storage),
        Arc::new(ManualClock::new(1_000)),
        tmp.path().join("t-0"),
        LogConfig::default(),
    )
    .unwrap();
    p.append(&make_batch(3, 100, 1, b'x')).unwrap();
    let request = make_batch(50, 1000, 1, b'y');
    written_from.lock().clear();
    assert_eq!(p.append(&request).unwrap().base_offset, 3);
    let caller = request.as_ptr() as usize..request.as_ptr() as usize + request.len();
    let from_caller: usize = written_from
        .lock()
        .iter()
        .filter(|r| caller.start <= r.start && r.end <= caller.end)
        .map(|r| r.len())
        .sum();
    assert_eq!(
        from_caller,
        request.len() - 8,
        "all but the base offset goes out from the caller's buffer"
    );
    let stored = all_batches(&p);
    let mut expected = request.clone();
    expected[..8].copy_from_slice(&3i64.to_be_bytes());
    assert_eq!(stored[1], (3, 52, expected));
}

#[test]
fn one_append_of_more_batches_than_a_writev_takes_is_stored_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, _) = open(&tmp.path().join("t-0"));
    // 1,500 batches are 3,000 slices, above IOV_MAX (1,024): several writev calls.
    let batches: Vec<Vec<u8>> = (0..1500).map(|i| make_batch(1, 3, i, b'a')).collect();
    let request = batches.concat();
    let outcome = p.append(&request).unwrap();
    assert_eq!((outcome.base_offset, outcome.last_offset), (0, 1499));
    let stored = all_batches(&p);
    assert_eq!(stored.len(), 1500);
    for (i, (stored, original)) in stored.iter().zip(&batches).enumerate() {
        let mut expected = original.clone();
        expected[..8].copy_from_slice(&(i as i64).to_be_bytes());
        assert_eq!(stored, &(i as i64, i as i64, expected));
    }
}

#[test]
fn preallocation_reserves_each_new_range_and_keeps_the_length() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.log");
    let file = qanat_log::Storage::open(&OsStorage, &path).unwrap();
    file.preallocate(0, 1 << 20).unwrap();
    file.preallocate(1 << 20, 2 << 20).unwrap();
    // An empty range is nothing to do, not an error.
    file.preallocate(2 << 20, 2 << 20).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 0, "KEEP_SIZE: the length does not move");
    // Filesystems without fallocate accept the hint and reserve nothing.
    if meta.blocks() > 0 {
        assert!(meta.blocks() * 512 >= 2 << 20, "both ranges reserved");
    }
}

/// Records the ranges whose write-back was started.
#[derive(Default)]
struct WritebackCalls(parking_lot::Mutex<Vec<(u64, u64)>>);

impl qanat_log::StorageHooks for WritebackCalls {
    fn before(&self, op: qanat_log::StorageOp<'_>) -> std::io::Result<()> {
        if let qanat_log::StorageOp::StartWriteback(from, to) = op {
            self.0.lock().push((from, to));
        }
        Ok(())
    }
}

#[test]
fn write_back_is_started_once_per_megabyte_appended_and_never_twice_for_the_same_bytes() {
    const MIB: usize = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let calls = Arc::new(WritebackCalls::default());
    let storage = qanat_log::HookedStorage::with_hooks(Arc::new(OsStorage), calls.clone());
    let config = LogConfig {
        segment_bytes: 64 * MIB as u64,
        ..config()
    };
    let dir = tmp.path().join("t-0");
    let (p, _) = Partition::open(
        Arc::new(storage),
        Arc::new(ManualClock::new(1_000)),
        dir.clone(),
        config,
    )
    .unwrap();
    let end = || std::fs::metadata(&log_files(&dir, "log")[0]).unwrap().len();
    let taken = || std::mem::take(&mut *calls.0.lock());
    p.start_writeback();
    assert_eq!(taken(), [], "nothing appended");
    for i in 0..3 {
        p.append(&make_batch(1, MIB, 1_000, i)).unwrap();
    }
    p.start_writeback();
    let first = end();
    assert_eq!(taken(), [(0, first)], "all appended so far, in one call");
    p.start_writeback();
    assert_eq!(taken(), [], "nothing appended since");
    p.append(&make_batch(1, 1000, 1_000, 7)).unwrap();
    p.start_writeback();
    assert_eq!(taken(), [], "less than a megabyte appended since");
    p.append(&make_batch(1, MIB, 1_000, 8)).unwrap();
    p.start_writeback();
    assert_eq!(taken(), [(first, end())], "from where the last call ended");
    // The real call, on the real file: the data stays as it was.
    let before = all_batches(&p);
    let file = qanat_log::Storage::open(&OsStorage, &log_files(&dir, "log")[0]).unwrap();
    file.start_writeback(0, end()).unwrap();
    assert_eq!(all_batches(&p), before);
}
