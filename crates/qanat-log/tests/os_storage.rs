//! Recovery and concurrency on the real filesystem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use common::{make_batch, read_bytes, split_batches};
use qanat_log::{LogConfig, ManualClock, OsStorage, Partition, SystemClock, TimestampType};

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

/// The real filesystem, except that fdatasync fails once `fail` is set.
struct FailingSync {
    fail: Arc<std::sync::atomic::AtomicBool>,
}

struct FailingFile {
    inner: Arc<dyn qanat_log::LogFile>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl qanat_log::LogFile for FailingFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, pos)
    }
    fn append(&self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.append(buf)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected EIO"));
        }
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

impl qanat_log::Storage for FailingSync {
    fn open(&self, path: &Path) -> std::io::Result<Arc<dyn qanat_log::LogFile>> {
        Ok(Arc::new(FailingFile {
            inner: qanat_log::Storage::open(&OsStorage, path)?,
            fail: self.fail.clone(),
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
fn a_failed_fdatasync_is_never_reported_as_durable_later() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, _) = Partition::open(
        Arc::new(FailingSync { fail: fail.clone() }),
        Arc::new(ManualClock::new(1_000)),
        dir.path().to_path_buf(),
        config(),
    )
    .unwrap();
    let first = p.append(&make_batch(2, 100, 0, 1)).unwrap();
    p.sync_through(first.last_offset + 1).unwrap();
    let second = p.append(&make_batch(2, 100, 0, 2)).unwrap();
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(p.sync_through(second.last_offset + 1).is_err());
    // The disk "recovers": a later sync must still not call the lost range durable.
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(p.sync_through(second.last_offset + 1).is_err());
    assert!(p.append(&make_batch(1, 100, 0, 3)).is_err());
    assert!(p.durable_offset() <= second.base_offset);
}
