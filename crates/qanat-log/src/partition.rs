//! [`Partition`]: the segment list, append/sync/read paths, recovery and retention.

use std::collections::{BTreeSet, HashMap};
use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::batch::{self, BatchInfo};
use crate::producer::{
    self, last_sequence, next_sequence, BatchMeta, ProducerStates, PRODUCER_EXPIRATION_MS,
};
use crate::segment::{self, file_name, io_err, Segment};
use crate::{
    AppendOutcome, Clock, FileSlice, LogConfig, LogError, LogFile, ReadOutcome, RecoveryReport,
    RetentionOutcome, Storage, TimestampType,
};

const CHECKPOINT: &str = "recovery-point";
const CLEAN_SHUTDOWN: &str = "clean-shutdown";
/// The next segment's file, made and reserved ahead off the append path and renamed in at
/// the roll ([`Partition::reserve_ahead`]). Always empty; open removes a leftover one.
const SPARE: &str = "next-segment.spare";
/// Suffix of the temp file a checksummed file is written to before its rename.
const TMP_SUFFIX: &str = ".tmp";
/// Segment positions and relative offsets are u32 in the indexes.
const MAX_SEGMENT: u64 = u32::MAX as u64;
/// Don't keep a huge copy buffer around after one big append.
const KEEP_BUF: usize = 16 << 20;
/// How far ahead of the appends disk blocks are reserved. Appends into reserved blocks need
/// no block allocation, which on ext4 (delayed allocation) otherwise waits for the inode's
/// block-map lock while writeback — a periodic fdatasync — allocates the blocks before them:
/// that wait was the produce-latency spike at every periodic fsync.
///
/// A `fallocate` on the append path still waits whenever a journal commit (a periodic
/// fdatasync's) is under way, for tens of milliseconds at high append rates, so a busy
/// partition is reserved ahead from the sync thread ([`Partition::reserve_ahead`]) just
/// before its fdatasync; the append path reserves only when it runs past that.
///
/// That `fallocate` still holds the active file's inode lock, which appends need, for as
/// long as the allocator takes: hundreds of milliseconds when it has to read cold block
/// bitmaps. So near the end of a segment the sync thread also makes the *next* segment's
/// file, reserved for a minute of appends at the rate seen (a whole segment for a partition
/// that fills one within a minute), and the roll renames it in: a busy partition's active
/// file is then never `fallocate`d at all.
const PREALLOCATE_AHEAD: u64 = 16 << 20;
/// How many milliseconds of appends, at the rate seen, a spare next segment is reserved for.
const SPARE_RESERVE_MS: u64 = 60_000;
/// Least appended bytes worth a write-back call of their own (see [`Partition::start_writeback`]).
const WRITEBACK_MIN: u64 = 1 << 20;

/// Reserve `active`'s blocks up to `target` when that passes what is reserved; whether it
/// tried. Best effort: a failure only costs the optimisation, and is not retried before
/// `target` (once per step, not on every append).
fn reserve_to(active: &Segment, target: u64) -> bool {
    let reserved = active.preallocated.load(Ordering::Relaxed);
    if target <= reserved {
        return false;
    }
    if let Err(e) = active.log.preallocate(reserved, target) {
        tracing::debug!(file = %active.log_path.display(), error = %e, "cannot reserve blocks ahead");
    }
    active.preallocated.fetch_max(target, Ordering::Relaxed);
    true
}

/// An empty file at [`SPARE`] with its first `reserved` bytes' blocks reserved.
struct Spare {
    log: Arc<dyn LogFile>,
    reserved: u64,
}

/// Where a read may look for batch positions.
#[derive(Clone, Copy)]
enum ReadSource {
    /// The in-memory index, then batch headers in the segment files.
    Files,
    /// The in-memory index only.
    Memory,
}

/// State owned by the (single) appender.
struct Writer {
    active: Arc<Segment>,
    next: i64,
    /// Reused for LogAppendTime appends, the only ones patched in a copy.
    buf: Vec<u8>,
    /// Idempotent-producer state, checked and updated with every append.
    producers: ProducerStates,
}

/// One partition: a directory of segments. Shareable across threads.
pub struct Partition {
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    dir: PathBuf,
    config: LogConfig,
    /// Oldest first; the last one is the active segment.
    segments: RwLock<Vec<Arc<Segment>>>,
    writer: Mutex<Writer>,
    /// Serializes fsyncs (group commit); holds the recovery point last written.
    sync_lock: Mutex<i64>,
    retention_lock: Mutex<()>,
    /// Producer-state snapshots written at rolls and not yet fsynced.
    /// Paths only: holding their descriptors would double a partition's open files.
    pending_snapshots: Mutex<Vec<PathBuf>>,
    next_offset: AtomicI64,
    log_start: AtomicI64,
    durable: AtomicI64,
    size: AtomicU64,
    /// A segment file was created since the last directory fsync.
    dir_dirty: AtomicBool,
    closed: AtomicBool,
    /// Grows each time a failed fdatasync cuts the log back to its durable end.
    generation: AtomicU64,
    /// Closed segments whose blocks reserved past their end are not given back yet: an
    /// ftruncate on the append path (at a roll) waits for a journal commit like a fallocate.
    /// Each with the generation it was queued in: a cut rewrites segment files, and nothing
    /// queued before it may be resized after it.
    unreleased: Mutex<Vec<(u64, Arc<Segment>)>>,
    /// Bytes appended since the last [`Partition::reserve_ahead`].
    appended_since_reserve: AtomicU64,
    /// Clock time of the last [`Partition::reserve_ahead`].
    last_reserve_ms: AtomicI64,
    /// The next segment's file, ready for the roll. Held while it is made and while a roll
    /// renames it; the roll only tries the lock, so it never waits for a reservation.
    spare: Mutex<Option<Spare>>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("dir", &self.dir)
            .field("log_start", &self.log_start_offset())
            .field("next_offset", &self.next_offset())
            .finish_non_exhaustive()
    }
}

fn parse_base(name: &str, ext: &str) -> Option<i64> {
    let stem = name.strip_suffix(ext)?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

/// The fields of a small checksummed file (fields, then their CRC-32C), if it exists whole.
fn read_checksummed<const N: usize>(storage: &dyn Storage, path: &Path) -> Option<[u8; N]> {
    if !storage.exists(path) {
        return None;
    }
    let f = storage.open(path).ok()?;
    let mut b = vec![0u8; N + 4];
    if f.len().ok()? != b.len() as u64 || f.read_exact_at(&mut b, 0).is_err() {
        return None;
    }
    let (fields, crc) = b.split_at(N);
    (crc32c::crc32c(fields).to_be_bytes() == crc).then(|| fields.try_into().ok())?
}

/// Replace `dir/name` with `fields` and their CRC-32C atomically: temp file, fdatasync,
/// rename, directory fsync.
fn write_checksummed(
    storage: &dyn Storage,
    dir: &Path,
    name: &str,
    fields: &[u8],
) -> Result<(), LogError> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let dst = dir.join(name);
    let mut b = fields.to_vec();
    b.extend_from_slice(&crc32c::crc32c(fields).to_be_bytes());
    let f = storage.open(&tmp).map_err(io_err(&tmp))?;
    f.set_len(0)
        .and_then(|()| f.append(&b))
        .and_then(|()| f.sync_data())
        .map_err(io_err(&tmp))?;
    storage.rename(&tmp, &dst).map_err(io_err(&dst))?;
    storage.sync_dir(dir).map_err(io_err(dir))
}

fn read_checkpoint(storage: &dyn Storage, dir: &Path) -> Option<i64> {
    read_checksummed::<8>(storage, &dir.join(CHECKPOINT)).map(i64::from_be_bytes)
}

fn write_checkpoint(storage: &dyn Storage, dir: &Path, offset: i64) -> Result<(), LogError> {
    write_checksummed(storage, dir, CHECKPOINT, &offset.to_be_bytes())
}

/// What `close` recorded: (active segment base, its length, next offset).
type CleanShutdown = (i64, u64, i64);

fn read_clean_shutdown(storage: &dyn Storage, dir: &Path) -> Option<CleanShutdown> {
    let b = read_checksummed::<24>(storage, &dir.join(CLEAN_SHUTDOWN))?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        w
    };
    Some((
        i64::from_be_bytes(word(0)),
        u64::from_be_bytes(word(1)),
        i64::from_be_bytes(word(2)),
    ))
}

fn write_clean_shutdown(
    storage: &dyn Storage,
    dir: &Path,
    (base, len, next): CleanShutdown,
) -> Result<(), LogError> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&base.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&next.to_be_bytes());
    write_checksummed(storage, dir, CLEAN_SHUTDOWN, &b)
}

fn remove_segment_files(storage: &dyn Storage, dir: &Path, base: i64) -> Result<(), LogError> {
    for ext in ["log", "index", "timeindex", "producers"] {
        let p = dir.join(file_name(base, ext));
        match storage.remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    Ok(())
}

impl Partition {
    /// Open (or create) the partition in `dir`, recovering its tail. See the crate docs.
    pub fn open(
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        dir: PathBuf,
        config: LogConfig,
    ) -> Result<(Partition, RecoveryReport), LogError> {
        let st = &*storage;
        st.create_dir_all(&dir).map_err(io_err(&dir))?;
        let names = st.list_dir(&dir).map_err(io_err(&dir))?;
        let mut bases = BTreeSet::new();
        let mut indexes = Vec::new();
        let mut snapshots = BTreeSet::new();
        let mut dir_changed = false;
        for name in &names {
            if let Some(b) = parse_base(name, ".log") {
                bases.insert(b);
            } else if let Some(b) =
                parse_base(name, ".index").or_else(|| parse_base(name, ".timeindex"))
            {
                indexes.push((b, name));
            } else if let Some(b) = parse_base(name, ".producers") {
                snapshots.insert(b);
            } else if name == SPARE
                || name
                    .strip_suffix(TMP_SUFFIX)
                    .is_some_and(|n| n == CHECKPOINT || n == CLEAN_SHUTDOWN)
            {
                let p = dir.join(name);
                st.remove_file(&p).map_err(io_err(&p))?;
            }
        }
        for (b, name) in indexes {
            if !bases.contains(&b) {
                let p = dir.join(name);
                tracing::info!(file = %p.display(), "removing index without a log");
                st.remove_file(&p).map_err(io_err(&p))?;
                dir_changed = true;
            }
        }
        let bases: Vec<i64> = bases.into_iter().collect();
        let recovery_point = read_checkpoint(st, &dir);
        // The marker vouches for one run only: it must be gone (durably, via the directory
        // sync below) before anything is appended, or a later crash would be taken for clean.
        let clean = read_clean_shutdown(st, &dir);
        let marker = dir.join(CLEAN_SHUTDOWN);
        if st.exists(&marker) {
            st.remove_file(&marker).map_err(io_err(&marker))?;
            dir_changed = true;
        }
        let interval = config.index_interval_bytes;
        let mut report = RecoveryReport::default();
        let mut segs: Vec<Arc<Segment>> = Vec::new();
        let mut scanned: Vec<Arc<Segment>> = Vec::new();
        let mut last_first_ts = None;
        let mut drop_from = None;
        // Producer state: start from the newest readable snapshot taken at a segment start and
        // replay the headers of that segment and later ones during their load walk (normally
        // just the active segment, which recovery walks anyway).
        let (mut producers, replay_from) =
            latest_snapshot(st, &dir, &snapshots, |b| bases.binary_search(&b).is_ok())
                .map_or((ProducerStates::default(), i64::MIN), |(b, s)| (s, b));
        // The state before the last segment replayed: what the active segment's snapshot holds.
        let mut before_last: Option<(i64, ProducerStates)> = None;
        for (i, &base) in bases.iter().enumerate() {
            if let Some(prev) = segs.last() {
                let (size, next) = prev.published();
                if base != next {
                    tracing::warn!(
                        dir = %dir.display(),
                        segment = base,
                        expected = next,
                        "segment does not continue the log; dropping it and later segments"
                    );
                    report
                        .truncated_at
                        .get_or_insert((prev.log_path.clone(), size));
                    drop_from = Some(i);
                    break;
                }
            }
            let is_last = i + 1 == bases.len();
            let shut_down_cleanly = is_last
                && clean.is_some_and(|(b, len, _)| {
                    let path = dir.join(file_name(base, "log"));
                    b == base && st.open(&path).and_then(|f| f.len()).ok() == Some(len)
                });
            report.clean_shutdown |= shut_down_cleanly;
            let trusted = shut_down_cleanly
                || bases
                    .get(i + 1)
                    .is_some_and(|&nb| recovery_point.is_some_and(|rp| nb <= rp));
            let track = base >= replay_from;
            if track {
                before_last = Some((base, producers.clone()));
            }
            let l = segment::load(
                st,
                &dir,
                base,
                trusted,
                !is_last,
                interval,
                track.then_some(&mut producers),
            )?;
            report.rebuilt_indexes.extend(l.rebuilt);
            let seg = Arc::new(l.seg);
            if l.full_scan {
                report.crc_checked_bytes += seg.size();
                scanned.push(seg.clone());
            }
            last_first_ts = l.first_ts;
            segs.push(seg.clone());
            if let Some(cut) = l.truncated {
                report.truncated_bytes += cut;
                report
                    .truncated_at
                    .get_or_insert((seg.log_path.clone(), seg.size()));
                if !is_last {
                    drop_from = Some(i + 1);
                    break;
                }
            }
        }
        if let Some(from) = drop_from {
            for &b in &bases[from..] {
                let p = dir.join(file_name(b, "log"));
                let len = st.open(&p).and_then(|f| f.len()).unwrap_or(0);
                tracing::warn!(file = %p.display(), bytes = len, "removing segment after truncation point");
                report.truncated_bytes += len;
                remove_segment_files(st, &dir, b)?;
            }
            dir_changed = true;
        }
        if replay_from != i64::MIN && !segs.iter().any(|s| s.base == replay_from) {
            // Recovery cut the log below the snapshot: take an older one (or none) and replay
            // the segments from there with a header walk.
            let keep = |b: i64| b < replay_from && segs.iter().any(|s| s.base == b);
            let (state, from) = latest_snapshot(st, &dir, &snapshots, keep)
                .map_or((ProducerStates::default(), i64::MIN), |(b, s)| (s, b));
            tracing::warn!(dir = %dir.display(), snapshot = replay_from, from,
                "producer-state snapshot is past the recovered end; replaying from an older one");
            producers = state;
            for s in segs.iter().filter(|s| s.base >= from) {
                before_last = Some((s.base, producers.clone()));
                replay_headers(s, &mut producers)?;
            }
        }
        for &b in &snapshots {
            if !segs.iter().any(|s| s.base == b) {
                let p = dir.join(file_name(b, "producers"));
                match st.remove_file(&p) {
                    Ok(()) => {
                        tracing::info!(file = %p.display(), "removed producer snapshot without a segment");
                        dir_changed = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // went with its segment
                    Err(e) => return Err(io_err(&p)(e)),
                }
            }
        }
        if segs.is_empty() {
            let seg = Arc::new(Segment::create(st, &dir, 0)?);
            segs.push(seg);
            dir_changed = true;
        }
        // A durable snapshot at the active segment's start: every closed segment is then
        // covered by one, so retention may delete them without losing producer state even if
        // snapshots of earlier runs were never synced.
        if let Some(active) = segs.last() {
            if replay_from == active.base {
                let p = &active.snapshot_path;
                st.open(p).and_then(|f| f.sync_data()).map_err(io_err(p))?;
            } else {
                let state = match before_last {
                    Some((b, state)) if b == active.base => state,
                    _ => producers.clone(), // a new, empty active segment
                };
                let f = producer::write_snapshot(st, &active.snapshot_path, &state)?;
                f.sync_data().map_err(io_err(&active.snapshot_path))?;
                dir_changed = true;
            }
        }
        // Make what recovery accepted durable, so the recovery point and durable_offset hold.
        for s in &scanned {
            s.log.sync_data().map_err(io_err(&s.log_path))?;
        }
        if dir_changed {
            st.sync_dir(&dir).map_err(io_err(&dir))?;
        }
        let Some(active) = segs.last().cloned() else {
            return Err(LogError::Closed);
        };
        if recovery_point != Some(active.base) {
            write_checkpoint(st, &dir, active.base)?;
        }
        if active.size() > 0 {
            let t = last_first_ts.unwrap_or_else(|| clock.now_ms());
            active.roll_base_ms.store(t, Ordering::Relaxed);
        }
        let next = active.published().1;
        let active_base = active.base;
        let log_start = segs.first().map_or(next, |s| s.base);
        let size = segs.iter().map(|s| s.size()).sum();
        report.segments = segs.len();
        report.next_offset = next;
        report.producers = producers.len();
        if report.truncated_at.is_some() || !report.rebuilt_indexes.is_empty() {
            tracing::warn!(dir = %dir.display(), ?report, "partition recovered");
        } else {
            tracing::debug!(dir = %dir.display(), segments = segs.len(), next, "partition opened");
        }
        let now = clock.now_ms();
        let p = Partition {
            storage,
            clock,
            dir,
            config,
            writer: Mutex::new(Writer {
                active,
                next,
                buf: Vec::new(),
                producers,
            }),
            segments: RwLock::new(segs),
            sync_lock: Mutex::new(active_base),
            retention_lock: Mutex::new(()),
            pending_snapshots: Mutex::new(Vec::new()),
            next_offset: AtomicI64::new(next),
            log_start: AtomicI64::new(log_start),
            durable: AtomicI64::new(next),
            size: AtomicU64::new(size),
            dir_dirty: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            unreleased: Mutex::new(Vec::new()),
            appended_since_reserve: AtomicU64::new(0),
            last_reserve_ms: AtomicI64::new(now),
            spare: Mutex::new(None),
        };
        Ok((p, report))
    }

    fn check_open(&self) -> Result<(), LogError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        Ok(())
    }

    /// Append one produce buffer (one or more whole batches). All-or-nothing: every batch is
    /// validated before anything is written. Offsets are assigned densely from `next_offset`.
    ///
    /// Batches with a producer id are checked against the producer state under the append
    /// lock: a fenced epoch or a sequence gap is refused, and a buffer made only of retries of
    /// batches already appended returns their original offsets with `duplicate = true` and
    /// writes nothing.
    pub fn append(&self, batches: &[u8]) -> Result<AppendOutcome, LogError> {
        self.append_validated(&batch::Validated::new(batches)?)
    }

    /// [`append`](Self::append) of a buffer already validated.
    pub fn append_validated(
        &self,
        validated: &batch::Validated<'_>,
    ) -> Result<AppendOutcome, LogError> {
        let (batches, summary) = (validated.bytes(), validated.summary());
        for b in &summary.batches {
            precheck_producer_fields(b)?;
        }
        let bytes = batches.len() as u64;
        if summary.max_batch_len as u64 > self.config.segment_bytes
            || bytes > MAX_SEGMENT
            || summary.offset_count > MAX_SEGMENT as i64
        {
            return Err(LogError::BatchTooLarge {
                size: summary.max_batch_len.max(batches.len()),
            });
        }
        let log_append = self.config.timestamp_type == TimestampType::LogAppendTime;
        let mut w = self.writer.lock();
        self.check_open()?;
        if let Some(mut dup) = check_sequences(&w.producers, &summary.batches, log_append)? {
            dup.generation = self.generation.load(Ordering::Acquire);
            return Ok(dup);
        }
        let now = self.clock.now_ms();
        if self.should_roll(&w.active, bytes, summary.offset_count, now) {
            self.roll_locked(&mut w)?;
        }
        let base = w.next;
        let active = w.active.clone();
        let (pos0, _) = active.published();
        self.preallocate(&active, pos0 + bytes);
        self.appended_since_reserve
            .fetch_add(bytes, Ordering::Relaxed);

        let mut off = base;
        let mut max_ts = i64::MIN;
        let res = if log_append {
            // One copy, patched in place: base offsets, LogAppendTime and so the CRC.
            let mut buf = std::mem::take(&mut w.buf);
            buf.clear();
            buf.extend_from_slice(batches);
            for b in &summary.batches {
                let Some(slice) = buf.get_mut(b.position..b.position + b.len) else {
                    continue;
                };
                batch::set_base_offset(slice, off)?;
                batch::set_log_append_time(slice, now)?;
                max_ts = max_ts.max(now);
                off += i64::from(b.last_offset_delta) + 1;
            }
            let res = active.log.append(&buf);
            if buf.capacity() <= KEEP_BUF {
                w.buf = buf;
            }
            res
        } else {
            // No copy: the base offset (outside the CRC) is the only change, so each batch
            // goes out as its new base offset and the caller's bytes after it, in one
            // vectored write.
            let base_offsets: Vec<[u8; 8]> = summary
                .batches
                .iter()
                .map(|b| {
                    let at = off;
                    max_ts = max_ts.max(b.max_timestamp);
                    off += i64::from(b.last_offset_delta) + 1;
                    at.to_be_bytes()
                })
                .collect();
            let mut slices = Vec::with_capacity(2 * summary.batches.len());
            for (b, base_offset) in summary.batches.iter().zip(&base_offsets) {
                let rest = batches
                    .get(b.position + 8..b.position + b.len)
                    .ok_or_else(|| batch::corrupt(b.position, "batch shorter than its header"))?;
                slices.push(IoSlice::new(base_offset));
                slices.push(IoSlice::new(rest));
            }
            active.log.append_vectored(&mut slices)
        };
        if let Err(source) = res {
            // Cut a partial write so the file still ends at a batch boundary.
            if let Err(e) = active.log.set_len(pos0) {
                tracing::error!(file = %active.log_path.display(), error = %e,
                    "cannot undo partial append; closing partition");
                self.closed.store(true, Ordering::Release);
            }
            return Err(LogError::Io {
                path: active.log_path.clone(),
                source,
            });
        }
        {
            let mut ix = active.index.write();
            let mut o = base;
            for b in &summary.batches {
                let ts = if log_append { now } else { b.max_timestamp };
                ix.on_batch(
                    (o - active.base) as u32,
                    (pos0 + b.position as u64) as u32,
                    b.len as u64,
                    ts,
                    self.config.index_interval_bytes,
                );
                o += i64::from(b.last_offset_delta) + 1;
            }
        }
        active.max_ts.fetch_max(max_ts, Ordering::AcqRel);
        if active.roll_base_ms.load(Ordering::Relaxed) == i64::MIN {
            active.roll_base_ms.store(now, Ordering::Relaxed);
        }
        active.dirty.store(true, Ordering::Release);
        // The partition's end moves before the segment's: a reader that saw data through the
        // segment must never find its next offset out of range (the reverse only reads empty).
        self.next_offset.store(off, Ordering::Release);
        active.publish(pos0 + bytes, off);
        self.size.fetch_add(bytes, Ordering::Relaxed);
        let mut o = base;
        for b in &summary.batches {
            let last = o + i64::from(b.last_offset_delta);
            if b.producer_id >= 0 {
                w.producers.record(
                    b.producer_id,
                    b.producer_epoch,
                    BatchMeta {
                        base_seq: b.base_sequence,
                        last_seq: last_sequence(b.base_sequence, b.last_offset_delta),
                        base_offset: o,
                        last_offset: last,
                        max_ts: if log_append { now } else { b.max_timestamp },
                    },
                );
            }
            o = last + 1;
        }
        w.next = off;
        Ok(AppendOutcome {
            base_offset: base,
            last_offset: off - 1,
            log_append_time: log_append.then_some(now),
            bytes,
            records: summary.records,
            duplicate: false,
            generation: self.generation.load(Ordering::Acquire),
        })
    }

    /// Reserve blocks up to `end` plus [`PREALLOCATE_AHEAD`] (within the segment size) when
    /// `end` passes what is reserved. Best effort: a failure only costs the optimisation.
    fn preallocate(&self, active: &Segment, end: u64) {
        if end > active.preallocated.load(Ordering::Relaxed) {
            reserve_to(
                active,
                (end + PREALLOCATE_AHEAD).min(self.config.segment_bytes.max(end)),
            );
        }
    }

    /// Give back what closed segments left reserved, then reserve ahead of the active one's
    /// appends ([`Partition::release_reserved`], [`Partition::reserve_ahead`]): what the
    /// periodic sync, or a tick when there is none as often, does for every partition.
    pub fn renew_reservations(&self) {
        self.release_reserved();
        self.reserve_ahead();
    }

    /// Reserve the active segment's blocks for about two more sync periods of appends at the
    /// rate seen since the last call (at least [`PREALLOCATE_AHEAD`], at most the segment), so
    /// the append path need not. Meant for the periodic sync thread, just before its
    /// fdatasync: the appends meanwhile then need no reservation, which would wait for the
    /// journal commit that fdatasync starts. When that reaches the segment's end, the roll is
    /// near: the next segment's file is made and reserved too, for a minute of appends at
    /// that rate (at least [`PREALLOCATE_AHEAD`], at most a segment). Best effort.
    pub fn reserve_ahead(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        let appended = self.appended_since_reserve.swap(0, Ordering::Relaxed);
        let now = self.clock.now_ms();
        let elapsed = now.saturating_sub(self.last_reserve_ms.swap(now, Ordering::Relaxed));
        let Some(active) = self.segments.read().last().cloned() else {
            return;
        };
        let (end, _) = active.published();
        let target = end
            .saturating_add(appended.saturating_mul(2).max(PREALLOCATE_AHEAD))
            .min(self.config.segment_bytes);
        // A roll meanwhile closed this segment before the reservation: give it back with the
        // other closed segments'.
        if reserve_to(&active, target)
            && self
                .segments
                .read()
                .last()
                .is_none_or(|s| !Arc::ptr_eq(s, &active))
        {
            self.unreleased.lock().push((generation, active));
        }
        // An idle partition is not about to roll, however close its segment is to full.
        if appended > 0 && target >= self.config.segment_bytes {
            let elapsed = u64::try_from(elapsed).unwrap_or(0).max(1);
            self.prepare_spare(
                (appended.saturating_mul(SPARE_RESERVE_MS) / elapsed)
                    .max(PREALLOCATE_AHEAD)
                    .min(self.config.segment_bytes),
            );
        }
    }

    /// Start the device write of what the active segment appended since the last call (when
    /// that is at least [`WRITEBACK_MIN`]), without waiting for it. Called often between
    /// periodic fdatasyncs, it spreads their writing out: each then finds little left, instead
    /// of a whole period's appends that it writes in one burst, taking a CPU and the device's
    /// queue from the appends meanwhile. Durability is unchanged: only fdatasync makes data
    /// durable. Best effort.
    pub fn start_writeback(&self) {
        let Some(active) = self.segments.read().last().cloned() else {
            return;
        };
        let (end, _) = active.published();
        let from = active.written_back.load(Ordering::Relaxed);
        if end < from.saturating_add(WRITEBACK_MIN) {
            return;
        }
        if let Err(e) = active.log.start_writeback(from, end) {
            tracing::debug!(path = %active.log_path.display(), error = %e, "write-back not started");
        }
        active.written_back.fetch_max(end, Ordering::Relaxed);
    }

    /// Make the spare next-segment file with `reserve` bytes' blocks reserved, unless one is
    /// ready or being made. Best effort: without it the roll creates the file itself.
    fn prepare_spare(&self, reserve: u64) {
        let Some(mut slot) = self.spare.try_lock() else {
            return;
        };
        if slot.is_some() || self.closed.load(Ordering::Acquire) {
            return;
        }
        let path = self.dir.join(SPARE);
        let made = self
            .storage
            .open(&path)
            .and_then(|log| log.set_len(0).map(|()| log))
            .and_then(|log| log.preallocate(0, reserve).map(|()| log));
        match made {
            Ok(log) => {
                *slot = Some(Spare {
                    log,
                    reserved: reserve,
                })
            }
            Err(e) => {
                tracing::debug!(file = %path.display(), error = %e, "cannot make a spare segment")
            }
        }
    }

    /// Drop the spare next-segment file, if any; its blocks go back to the filesystem.
    fn drop_spare(&self) {
        if self.spare.lock().take().is_some() {
            let path = self.dir.join(SPARE);
            if let Err(e) = self.storage.remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove the spare segment");
            }
        }
    }

    /// Give back the blocks reserved past the end of segments closed since the last call.
    /// Off the append path: the sync thread calls it (or the broker's tick), and `close`.
    pub fn release_reserved(&self) {
        // Cuts run under the sync lock: none runs while a closed segment is set to its length,
        // and one that ran since it was queued makes the entry stale (the generation moved).
        let _no_cut = self.sync_lock.lock();
        let generation = self.generation.load(Ordering::Acquire);
        let closed = std::mem::take(&mut *self.unreleased.lock());
        for (queued_in, seg) in closed {
            if queued_in != generation {
                continue;
            }
            let (size, _) = seg.published();
            if let Err(e) = seg.log.set_len(size) {
                tracing::warn!(file = %seg.log_path.display(), error = %e, "cannot release reserved blocks");
            }
        }
    }

    fn should_roll(&self, active: &Segment, bytes: u64, offsets: i64, now: i64) -> bool {
        let (size, next) = active.published();
        if size == 0 {
            return false;
        }
        let roll_base = active.roll_base_ms.load(Ordering::Relaxed);
        let age_due = roll_base != i64::MIN
            && now.saturating_sub(roll_base)
                >= i64::try_from(self.config.segment_ms).unwrap_or(i64::MAX);
        size + bytes > self.config.segment_bytes
            || size + bytes > MAX_SEGMENT
            || next - active.base + offsets > MAX_SEGMENT as i64
            || age_due
    }

    /// Close the active segment and start a new one at `next`. No fsync: the next sync
    /// covers the old segment and the directory entry.
    fn roll_locked(&self, w: &mut Writer) -> Result<bool, LogError> {
        let old = w.active.clone();
        let (size, next) = old.published();
        if size == 0 {
            return Ok(false);
        }
        old.index.write().finish();
        old.flush_indexes(&*self.storage)?;
        // Its blocks reserved past the end are given back later, off the append path.
        self.unreleased
            .lock()
            .push((self.generation.load(Ordering::Acquire), old.clone()));
        let seg = {
            // Held through the rename, so no new spare is made at its path meanwhile.
            let mut slot = self.spare.try_lock();
            let adopted = slot.as_mut().and_then(|s| s.take()).and_then(|spare| {
                let from = self.dir.join(SPARE);
                Segment::adopt(
                    &*self.storage,
                    &self.dir,
                    next,
                    &from,
                    spare.log,
                    spare.reserved,
                )
                .inspect_err(|e| {
                    tracing::warn!(dir = %self.dir.display(), error = %e,
                        "cannot use the spare segment; creating the next one")
                })
                .ok()
            });
            match adopted {
                Some(seg) => seg,
                None => Segment::create(&*self.storage, &self.dir, next)?,
            }
        };
        let seg = Arc::new(seg);
        // Producer state as of `next`, so open need not replay older segments. Derived data:
        // a failure only makes the next open replay more.
        match producer::write_snapshot(&*self.storage, &seg.snapshot_path, &w.producers) {
            Ok(_) => self
                .pending_snapshots
                .lock()
                .push(seg.snapshot_path.clone()),
            Err(e) => {
                tracing::warn!(file = %seg.snapshot_path.display(), error = %e,
                    "cannot write producer-state snapshot");
                let _ = self.storage.remove_file(&seg.snapshot_path);
            }
        }
        self.segments.write().push(seg.clone());
        self.dir_dirty.store(true, Ordering::Release);
        w.active = seg;
        tracing::debug!(dir = %self.dir.display(), old = old.base, new = next, bytes = size, "rolled segment");
        Ok(true)
    }

    /// Make every batch with offset < `offset` durable. Concurrent callers share one fdatasync.
    /// Offsets say nothing of *which* data: after a failed fdatasync cut the log back, they are
    /// reused. To acknowledge an append, use [`Partition::sync_append`].
    pub fn sync_through(&self, offset: i64) -> Result<(), LogError> {
        self.check_open()?;
        self.sync_inner(Some(offset))
    }

    /// Make an append durable. Concurrent callers share one fdatasync. Fails, now and on
    /// every later call, if a failed fdatasync cut the log back since the append.
    pub fn sync_append(&self, appended: &AppendOutcome) -> Result<(), LogError> {
        self.check_open()?;
        let cut = || LogError::CutBySyncFailure {
            dir: self.dir.clone(),
            offset: appended.base_offset,
        };
        if appended.generation != self.generation.load(Ordering::Acquire) {
            return Err(cut());
        }
        self.sync_inner(Some(appended.last_offset + 1))?;
        // A cut that happened while waiting for the sync lock took this append with it.
        if appended.generation != self.generation.load(Ordering::Acquire) {
            return Err(cut());
        }
        Ok(())
    }

    /// Make everything appended so far durable.
    pub fn sync(&self) -> Result<(), LogError> {
        self.check_open()?;
        self.sync_inner(None)
    }

    fn sync_inner(&self, offset: Option<i64>) -> Result<(), LogError> {
        let covered = |d: i64| offset.is_some_and(|o| d >= o);
        if covered(self.durable.load(Ordering::Acquire)) {
            return Ok(());
        }
        let mut checkpoint = self.sync_lock.lock();
        if covered(self.durable.load(Ordering::Acquire)) {
            return Ok(());
        }
        let target = self.next_offset.load(Ordering::Acquire);
        let (dirty, active_base) = {
            let segs = self.segments.read();
            let last = segs.len().saturating_sub(1);
            let mut dirty = Vec::new();
            for (i, s) in segs.iter().enumerate().rev() {
                if s.dirty.load(Ordering::Acquire) {
                    dirty.push(s.clone());
                } else if i != last {
                    break; // older closed segments were synced before this one
                }
            }
            (dirty, segs.last().map_or(0, |s| s.base))
        };
        for s in dirty.iter().rev() {
            if s.dirty.swap(false, Ordering::AcqRel) {
                if let Err(e) = s.log.sync_data() {
                    // After a failed fdatasync the kernel may have dropped the dirty pages and
                    // report success next time: nothing past the durable offset can be called
                    // durable again, so it is cut off and the partition reopened from disk.
                    tracing::error!(path = %s.log_path.display(), error = %e,
                        "fdatasync failed; cutting the partition back to its durable end");
                    if let Err(reopen) = self.cut_to_durable(&mut checkpoint) {
                        self.closed.store(true, Ordering::Release);
                        tracing::error!(dir = %self.dir.display(), error = %reopen,
                            "cannot cut back after a failed fdatasync; partition closed until restart");
                    }
                    return Err(io_err(&s.log_path)(e));
                }
            }
        }
        if self.dir_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.storage.sync_dir(&self.dir) {
                self.dir_dirty.store(true, Ordering::Release);
                return Err(io_err(&self.dir)(e));
            }
        }
        if active_base > *checkpoint {
            write_checkpoint(&*self.storage, &self.dir, active_base)?;
            *checkpoint = active_base;
        }
        self.durable.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Truncate everything past the durable offset and reopen the partition from disk, so
    /// the in-memory state (segments, indexes, producer state) is what recovery derives from
    /// the durable prefix. Called with the sync lock held; takes the append lock.
    fn cut_to_durable(&self, checkpoint: &mut i64) -> Result<(), LogError> {
        let mut w = self.writer.lock();
        // The segments below are rewritten: none may be set to a length it had before.
        self.unreleased.lock().clear();
        // The reopen below removes the spare file: none may be in use or made meanwhile.
        let mut spare = self.spare.lock();
        *spare = None;
        // Retention may have deleted segments that were never synced: nothing below the log
        // start is left to cut.
        let durable = self
            .durable
            .load(Ordering::Acquire)
            .max(self.log_start.load(Ordering::Acquire));
        let next = self.next_offset.load(Ordering::Acquire);
        let segs: Vec<Arc<Segment>> = self.segments.read().clone();
        for (i, seg) in segs.iter().enumerate().rev() {
            let (size, seg_next) = seg.published();
            if seg_next <= durable {
                break;
            }
            if seg.base >= durable && i > 0 {
                remove_segment_files(&*self.storage, &self.dir, seg.base)?;
                continue;
            }
            let keep = if seg.base >= durable {
                0
            } else {
                seg.find_position(durable, size)?.0
            };
            seg.log.set_len(keep).map_err(io_err(&seg.log_path))?;
            seg.log.sync_data().map_err(io_err(&seg.log_path))?;
            // Index entries past the cut are rebuilt by the reopen below.
            for p in [&seg.index_path, &seg.time_path] {
                match self.storage.remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(p)(e)),
                }
            }
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_err(&self.dir))?;
        let (fresh, report) = Partition::open(
            self.storage.clone(),
            self.clock.clone(),
            self.dir.clone(),
            self.config.clone(),
        )?;
        // Readers may be between the old and the new state for a moment; they get an error or
        // a short read, never bytes past the cut (those are gone from the files).
        *w = fresh.writer.into_inner();
        *self.segments.write() = fresh.segments.into_inner();
        *checkpoint = fresh.sync_lock.into_inner();
        self.pending_snapshots.lock().clear();
        self.dir_dirty.store(false, Ordering::Release);
        self.log_start
            .store(fresh.log_start.into_inner(), Ordering::Release);
        self.size.store(fresh.size.into_inner(), Ordering::Relaxed);
        self.next_offset
            .store(fresh.next_offset.into_inner(), Ordering::Release);
        self.durable
            .store(fresh.durable.into_inner(), Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(dir = %self.dir.display(), durable, dropped_offsets = next - durable,
            next_offset = report.next_offset, "partition cut back to its durable end and reopened");
        Ok(())
    }

    fn segment_for(&self, offset: i64) -> Option<Arc<Segment>> {
        let segs = self.segments.read();
        let i = segs.partition_point(|s| s.base <= offset);
        i.checked_sub(1).map(|i| segs[i].clone())
    }

    /// Whole batches from the one containing `from_offset`, about `max_bytes` in total but at
    /// least one batch (KIP-74). `from_offset == next_offset()` gives no slices.
    /// With `serve_durable_only`, nothing at or past the durable offset is returned and the
    /// high watermark is the durable offset.
    pub fn read(&self, from_offset: i64, max_bytes: u64) -> Result<ReadOutcome, LogError> {
        match self.read_with(from_offset, max_bytes, ReadSource::Files)? {
            Some(out) => Ok(out),
            // Only memory-only reads give up.
            None => Err(LogError::Closed),
        }
    }

    /// [`read`](Self::read) answered from memory alone, or `Ok(None)` when it would need a
    /// file read (batch headers outside the in-memory index). Never touches a file, so it may
    /// run where blocking is not allowed: a consumer at the log end, or one resuming at a
    /// batch boundary with the rest of the log within `max_bytes`, is answered this way.
    pub fn read_from_memory(
        &self,
        from_offset: i64,
        max_bytes: u64,
    ) -> Result<Option<ReadOutcome>, LogError> {
        self.read_with(from_offset, max_bytes, ReadSource::Memory)
    }

    fn read_with(
        &self,
        from_offset: i64,
        max_bytes: u64,
        source: ReadSource,
    ) -> Result<Option<ReadOutcome>, LogError> {
        self.check_open()?;
        let visible_end = self.durable_limit();
        let next = self.next_offset.load(Ordering::Acquire);
        let start = self.log_start.load(Ordering::Acquire);
        let out_of_range = || LogError::OffsetOutOfRange {
            requested: from_offset,
            log_start: start,
            next,
        };
        if from_offset < start || from_offset > next {
            return Err(out_of_range());
        }
        let mut out = ReadOutcome {
            slices: Vec::new(),
            high_watermark: visible_end.map_or(next, |v| v.min(next)),
            log_start_offset: start,
            next_offset: from_offset,
        };
        let mut cur = from_offset;
        let mut budget = max_bytes;
        loop {
            let Some(seg) = self.segment_for(cur) else {
                if out.slices.is_empty() {
                    return Err(out_of_range()); // retention removed it meanwhile
                }
                break;
            };
            let (mut size, mut seg_next) = seg.published();
            if let Some(v) = visible_end {
                if cur >= v {
                    break;
                }
                if seg_next > v {
                    // `v` is a batch boundary past `cur`, so inside this segment.
                    size = match source {
                        ReadSource::Files => seg.find_position(v, size)?.0,
                        ReadSource::Memory => match seg.indexed_position(v) {
                            Some(pos) => pos,
                            None => return Ok(None),
                        },
                    };
                    seg_next = v;
                }
            }
            out.high_watermark = out.high_watermark.max(seg_next);
            if cur >= seg_next {
                break;
            }
            let (pos, end, end_offset) = match source {
                ReadSource::Files => {
                    let (pos, first) = seg.find_position(cur, size)?;
                    let (mut end, mut end_offset) = seg.find_end(pos, size, budget, seg_next)?;
                    if out.slices.is_empty() && end < pos + first.total_len() as u64 {
                        end = pos + first.total_len() as u64;
                        end_offset = first.last_offset() + 1;
                    }
                    (pos, end, end_offset)
                }
                // Only the case that needs no batch header: `cur` starts a batch the index
                // knows, and everything published after it fits (so the first batch is whole).
                ReadSource::Memory => match seg.indexed_position(cur) {
                    Some(pos) if size - pos <= budget => (pos, size, seg_next),
                    _ => return Ok(None),
                },
            };
            if end > pos {
                out.next_offset = end_offset;
                out.slices.push(FileSlice {
                    file: seg.log.clone(),
                    position: pos,
                    len: end - pos,
                });
                budget = budget.saturating_sub(end - pos);
            }
            if end < size || budget == 0 {
                break;
            }
            cur = seg_next;
        }
        Ok(Some(out))
    }

    /// Offset after the last appended batch.
    pub fn next_offset(&self) -> i64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// The end of what readers may see: the durable offset with `serve_durable_only`, else
    /// the append end. What Fetch, ListOffsets and lag report as the log end.
    pub fn high_watermark(&self) -> i64 {
        let next = self.next_offset();
        self.durable_limit().map_or(next, |d| d.min(next))
    }

    fn durable_limit(&self) -> Option<i64> {
        self.config
            .serve_durable_only
            .then(|| self.durable.load(Ordering::Acquire))
    }

    /// First offset still in the log.
    pub fn log_start_offset(&self) -> i64 {
        self.log_start.load(Ordering::Acquire)
    }

    /// Every offset below this has been fdatasynced.
    pub fn durable_offset(&self) -> i64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.read().len()
    }

    /// The partition directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The first batch whose maxTimestamp is `>= ts`, as (its base offset, its maxTimestamp).
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<(i64, i64)>, LogError> {
        self.check_open()?;
        let visible_end = self.high_watermark();
        let segs: Vec<Arc<Segment>> = self.segments.read().clone();
        for seg in segs {
            if seg.base >= visible_end {
                break;
            }
            if seg.max_ts.load(Ordering::Acquire) < ts {
                continue;
            }
            let (size, _) = seg.published();
            let mut pos = {
                let ix = seg.index.read();
                u64::from(ix.lookup_offset(ix.lookup_time(ts)))
            };
            while pos < size {
                let h = seg.read_header(pos)?;
                if h.base_offset >= visible_end {
                    return Ok(None);
                }
                if h.max_timestamp >= ts {
                    return Ok(Some((h.base_offset, h.max_timestamp)));
                }
                pos += h.total_len() as u64;
            }
        }
        Ok(None)
    }

    /// Roll the active segment if it is older than `segment_ms`. Returns whether it rolled.
    pub fn roll_if_due(&self) -> Result<bool, LogError> {
        let mut w = self.writer.lock();
        self.check_open()?;
        let now = self.clock.now_ms();
        let rb = w.active.roll_base_ms.load(Ordering::Relaxed);
        let due = rb != i64::MIN
            && now.saturating_sub(rb) >= i64::try_from(self.config.segment_ms).unwrap_or(i64::MAX);
        if !due {
            return Ok(false);
        }
        self.roll_locked(&mut w)
    }

    /// Delete closed segments, oldest first: those whose newest timestamp is older than
    /// `retention_ms`, then while the rest without the oldest is still `>= retention_bytes`
    /// (Kafka's rule, so the log never drops below the limit). Never the active segment.
    pub fn enforce_retention(&self) -> Result<RetentionOutcome, LogError> {
        self.check_open()?;
        let _g = self.retention_lock.lock();
        let now = self.clock.now_ms();
        let removed: Vec<Arc<Segment>> = {
            let mut segs = self.segments.write();
            let closed = segs.len().saturating_sub(1);
            let mut k = 0;
            if let Some(ms) = self.config.retention_ms {
                let cutoff = now.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX));
                while k < closed && segs[k].max_ts.load(Ordering::Acquire) < cutoff {
                    k += 1;
                }
            }
            if let Some(limit) = self.config.retention_bytes {
                let mut total: u64 = segs[k..].iter().map(|s| s.size()).sum();
                while k < closed && total - segs[k].size() >= limit {
                    total -= segs[k].size();
                    k += 1;
                }
            }
            let removed: Vec<_> = segs.drain(..k).collect();
            if let Some(first) = segs.first() {
                self.log_start.store(first.base, Ordering::Release);
            }
            removed
        };
        let expired = self
            .writer
            .lock()
            .producers
            .expire(now.saturating_sub(PRODUCER_EXPIRATION_MS));
        if expired > 0 {
            tracing::info!(dir = %self.dir.display(), producers = expired, "expired idle producers");
        }
        let mut out = RetentionOutcome::default();
        if removed.is_empty() {
            return Ok(out);
        }
        // The snapshot at the new log start (and any later one) must be durable before the
        // segments whose producer state only it now holds are deleted.
        self.sync_snapshots()?;
        for s in &removed {
            let size = s.size();
            self.size.fetch_sub(size, Ordering::Relaxed);
            remove_segment_files(&*self.storage, &self.dir, s.base)?;
            out.deleted_segments += 1;
            out.deleted_bytes += size;
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(io_err(&self.dir))?;
        tracing::info!(
            dir = %self.dir.display(),
            segments = out.deleted_segments,
            bytes = out.deleted_bytes,
            log_start = self.log_start_offset(),
            "retention deleted segments"
        );
        Ok(out)
    }

    /// Flush indexes, sync everything, leave the clean-shutdown marker and refuse further
    /// calls with [`LogError::Closed`].
    pub fn close(&self) -> Result<(), LogError> {
        let active = {
            let w = self.writer.lock();
            if self.closed.swap(true, Ordering::AcqRel) {
                return Err(LogError::Closed);
            }
            w.active.flush_indexes(&*self.storage)?;
            w.active.clone()
        };
        self.release_reserved();
        self.drop_spare();
        self.sync_inner(None)?;
        self.sync_snapshots()?;
        if self.durable.load(Ordering::Acquire) < self.next_offset() {
            return Ok(()); // a sync failure cut the log meanwhile: the next open checks it all
        }
        let (size, next) = active.published();
        write_clean_shutdown(&*self.storage, &self.dir, (active.base, size, next))
    }

    /// fsync producer-state snapshots written since the last call.
    fn sync_snapshots(&self) -> Result<(), LogError> {
        let mut pending = self.pending_snapshots.lock();
        while let Some(path) = pending.first() {
            // Gone with its segment (retention, or a cut after a failed fdatasync).
            if self.storage.exists(path) {
                let f = self.storage.open(path).map_err(io_err(path))?;
                f.sync_data().map_err(io_err(path))?;
            }
            pending.remove(0);
        }
        Ok(())
    }

    /// The current epoch and last sequence number of an idempotent producer, if the partition
    /// tracks it.
    pub fn producer_state(&self, producer_id: i64) -> Option<(i16, i32)> {
        let w = self.writer.lock();
        let e = w.producers.get(producer_id)?;
        Some((e.epoch, e.last_seq()?))
    }

    /// Number of idempotent producers tracked.
    pub fn producer_count(&self) -> usize {
        self.writer.lock().producers.len()
    }

    /// Remove the partition directory and everything in it.
    pub fn delete(self) -> Result<(), LogError> {
        let _w = self.writer.lock();
        self.closed.store(true, Ordering::Release);
        self.storage
            .remove_dir_all(&self.dir)
            .map_err(io_err(&self.dir))?;
        if let Some(parent) = self.dir.parent() {
            if let Err(e) = self.storage.sync_dir(parent) {
                tracing::warn!(dir = %parent.display(), error = %e, "sync after partition delete failed");
            }
        }
        Ok(())
    }
}

/// The newest readable snapshot among `snapshots` whose base passes `usable`.
fn latest_snapshot(
    storage: &dyn Storage,
    dir: &Path,
    snapshots: &BTreeSet<i64>,
    usable: impl Fn(i64) -> bool,
) -> Option<(i64, ProducerStates)> {
    snapshots
        .iter()
        .rev()
        .filter(|&&b| usable(b))
        .find_map(|&b| {
            producer::read_snapshot(storage, &dir.join(file_name(b, "producers"))).map(|s| (b, s))
        })
}

/// Replay every batch header of a loaded segment into `producers`.
fn replay_headers(seg: &Segment, producers: &mut ProducerStates) -> Result<(), LogError> {
    let (size, _) = seg.published();
    let mut pos = 0;
    while pos < size {
        let h = seg.read_header(pos)?;
        producers.replay(&h);
        pos += h.total_len() as u64;
    }
    Ok(())
}

/// Checks of one batch's producer fields that need no state: transactions are not supported,
/// and an idempotent batch needs a non-negative epoch and sequence.
fn precheck_producer_fields(b: &BatchInfo) -> Result<(), LogError> {
    if b.attributes & (batch::ATTR_TRANSACTIONAL | batch::ATTR_CONTROL) != 0 {
        return Err(LogError::Unsupported {
            reason: format!(
                "transactional/control batch at byte {} (transactions are not supported)",
                b.position
            ),
        });
    }
    if b.producer_id >= 0 && (b.producer_epoch < 0 || b.base_sequence < 0) {
        return Err(LogError::CorruptBatch {
            position: b.position,
            reason: format!(
                "producer {} with epoch {} and base sequence {}",
                b.producer_id, b.producer_epoch, b.base_sequence
            ),
        });
    }
    Ok(())
}

/// Check the idempotent batches of one append against the producer state (O(1) per batch).
/// `Ok(Some(_))`: every batch is a retry of a cached one — the outcome to return, nothing to
/// write. `Ok(None)`: all batches are new and in order (or not idempotent).
fn check_sequences(
    states: &ProducerStates,
    batches: &[BatchInfo],
    log_append: bool,
) -> Result<Option<AppendOutcome>, LogError> {
    // (epoch, last sequence) of producers after the earlier batches of this buffer.
    let mut pending: HashMap<i64, (i16, i32)> = HashMap::new();
    let mut dup: Option<(AppendOutcome, LogError)> = None;
    let mut new_batches = 0usize;
    for b in batches {
        let pid = b.producer_id;
        if pid < 0 {
            new_batches += 1;
            continue;
        }
        let epoch = b.producer_epoch;
        let last = last_sequence(b.base_sequence, b.last_offset_delta);
        let committed = states.get(pid);
        let current = pending
            .get(&pid)
            .copied()
            .or_else(|| committed.and_then(|e| e.last_seq().map(|l| (e.epoch, l))));
        if let Some((cur_epoch, _)) = current {
            if epoch < cur_epoch {
                return Err(LogError::InvalidProducerEpoch {
                    producer_id: pid,
                    current: cur_epoch,
                    got: epoch,
                });
            }
        }
        if let Some(m) = committed.and_then(|e| e.find_duplicate(epoch, b.base_sequence, last)) {
            match &mut dup {
                Some((o, _)) => {
                    o.base_offset = o.base_offset.min(m.base_offset);
                    o.last_offset = o.last_offset.max(m.last_offset);
                }
                None => {
                    let expected = committed
                        .and_then(|e| e.last_seq())
                        .map_or(0, next_sequence);
                    let outcome = AppendOutcome {
                        base_offset: m.base_offset,
                        last_offset: m.last_offset,
                        log_append_time: log_append.then_some(m.max_ts),
                        bytes: 0,
                        records: 0,
                        duplicate: true,
                        generation: 0,
                    };
                    let mixed = LogError::OutOfOrderSequence {
                        producer_id: pid,
                        expected,
                        got: b.base_sequence,
                    };
                    dup = Some((outcome, mixed));
                }
            }
            continue;
        }
        let expected = match current {
            None => None, // unknown producer (new, or its state aged out): any sequence
            Some((cur_epoch, _)) if epoch > cur_epoch => Some(0),
            Some((_, l)) => Some(next_sequence(l)),
        };
        if let Some(expected) = expected {
            if b.base_sequence != expected {
                return Err(LogError::OutOfOrderSequence {
                    producer_id: pid,
                    expected,
                    got: b.base_sequence,
                });
            }
        }
        pending.insert(pid, (epoch, last));
        new_batches += 1;
    }
    match dup {
        None => Ok(None),
        Some((_, mixed)) if new_batches > 0 => Err(mixed),
        Some((outcome, _)) => Ok(Some(outcome)),
    }
}
