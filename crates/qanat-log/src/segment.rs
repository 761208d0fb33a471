//! One segment: a `.log` file of batches plus its sparse `.index` and `.timeindex`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::batch::{self, BatchHeader, HEADER_LEN};
use crate::error::LogError;
use crate::producer::ProducerStates;
use crate::storage::{LogFile, Storage};

const INDEX_ENTRY: usize = 8;
const TIME_ENTRY: usize = 12;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn file_name(base: i64, ext: &str) -> String {
    format!("{base:020}.{ext}")
}

/// Sparse indexes of one segment, plus the state that decides where the next entries go.
/// Entries are a pure function of the batch sequence, so a rescan reproduces them exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexState {
    /// (base offset − segment base, file position of that batch), strictly increasing.
    pub offsets: Vec<(u32, u32)>,
    /// (largest maxTimestamp so far, relative base offset of the batch that first reached it),
    /// strictly increasing in timestamp.
    pub times: Vec<(i64, u32)>,
    bytes_since: u64,
    max_ts: i64,
    max_ts_rel: u32,
}

impl IndexState {
    pub fn new() -> Self {
        Self {
            offsets: Vec::new(),
            times: Vec::new(),
            bytes_since: 0,
            max_ts: i64::MIN,
            max_ts_rel: 0,
        }
    }

    /// Account for one batch written at `pos`.
    pub fn on_batch(&mut self, rel: u32, pos: u32, len: u64, max_ts: i64, interval: u32) {
        if max_ts > self.max_ts {
            self.max_ts = max_ts;
            self.max_ts_rel = rel;
        }
        if self.bytes_since >= u64::from(interval) {
            self.offsets.push((rel, pos));
            self.push_time();
            self.bytes_since = 0;
        }
        self.bytes_since += len;
    }

    fn push_time(&mut self) {
        if self.max_ts != i64::MIN && self.times.last().is_none_or(|t| self.max_ts > t.0) {
            self.times.push((self.max_ts, self.max_ts_rel));
        }
    }

    /// On roll: record the final maximum so the time index alone gives the segment's newest
    /// timestamp.
    pub fn finish(&mut self) {
        self.push_time();
    }

    /// Position to start scanning for relative offset `rel`.
    pub fn lookup_offset(&self, rel: u32) -> u32 {
        let i = self.offsets.partition_point(|e| e.0 <= rel);
        i.checked_sub(1).map_or(0, |i| self.offsets[i].1)
    }

    /// Position of the batch starting at relative offset `rel`, if the index knows it (the
    /// first batch, at 0, always starts the segment).
    pub fn exact_position(&self, rel: u32) -> Option<u32> {
        if rel == 0 {
            return Some(0);
        }
        self.offsets
            .binary_search_by_key(&rel, |e| e.0)
            .ok()
            .map(|i| self.offsets[i].1)
    }

    /// Largest indexed batch position `<= pos`, or 0.
    pub fn lookup_position(&self, pos: u32) -> u32 {
        let i = self.offsets.partition_point(|e| e.1 <= pos);
        i.checked_sub(1).map_or(0, |i| self.offsets[i].1)
    }

    /// A relative offset such that every batch before it has maxTimestamp < `ts`.
    pub fn lookup_time(&self, ts: i64) -> u32 {
        let i = self.times.partition_point(|e| e.0 < ts);
        i.checked_sub(1).map_or(0, |i| self.times[i].1)
    }
}

/// How far the index files on disk have been written.
#[derive(Debug, Default)]
struct IndexFiles {
    offsets_written: usize,
    times_written: usize,
}

/// A segment. Shared by readers through `Arc`; mutated only under the partition's append lock
/// (data) or its own small locks (indexes).
pub(crate) struct Segment {
    pub base: i64,
    pub log: Arc<dyn LogFile>,
    pub log_path: PathBuf,
    pub index_path: PathBuf,
    pub time_path: PathBuf,
    /// Producer-state snapshot as of `base` (written when the segment is rolled in).
    pub snapshot_path: PathBuf,
    /// `size << 32 | (next_offset - base)`: one atomic so readers see a consistent end.
    published: AtomicU64,
    /// Largest batch maxTimestamp (i64::MIN when empty).
    pub max_ts: AtomicI64,
    /// Time the segment's age is measured from (i64::MIN until the first append).
    pub roll_base_ms: AtomicI64,
    /// Written since the last fdatasync.
    pub dirty: AtomicBool,
    /// Bytes of the file reserved on disk ahead of the appends (see `Partition::append`).
    pub preallocated: AtomicU64,
    /// Bytes from the start whose write-back has been started (see `Partition::start_writeback`).
    pub written_back: AtomicU64,
    pub index: RwLock<IndexState>,
    files: Mutex<IndexFiles>,
}

impl Segment {
    fn new(dir: &Path, base: i64, log: Arc<dyn LogFile>, index: IndexState) -> Self {
        Segment {
            base,
            log,
            log_path: dir.join(file_name(base, "log")),
            index_path: dir.join(file_name(base, "index")),
            time_path: dir.join(file_name(base, "timeindex")),
            snapshot_path: dir.join(file_name(base, "producers")),
            published: AtomicU64::new(0),
            max_ts: AtomicI64::new(i64::MIN),
            roll_base_ms: AtomicI64::new(i64::MIN),
            dirty: AtomicBool::new(false),
            preallocated: AtomicU64::new(0),
            written_back: AtomicU64::new(0),
            index: RwLock::new(index),
            files: Mutex::new(IndexFiles::default()),
        }
    }

    /// A new empty segment; truncates leftovers with the same name.
    pub fn create(storage: &dyn Storage, dir: &Path, base: i64) -> Result<Segment, LogError> {
        let path = dir.join(file_name(base, "log"));
        let log = storage.open(&path).map_err(io_err(&path))?;
        let seg = Segment::new(dir, base, log, IndexState::new());
        seg.log.set_len(0).map_err(io_err(&path))?;
        seg.start_empty(storage)?;
        Ok(seg)
    }

    /// A new empty segment in `spare`, an empty file at `spare_path` with its first `reserved`
    /// bytes' blocks reserved, renamed into place: nothing is created or reserved here.
    pub fn adopt(
        storage: &dyn Storage,
        dir: &Path,
        base: i64,
        spare_path: &Path,
        spare: Arc<dyn LogFile>,
        reserved: u64,
    ) -> Result<Segment, LogError> {
        let seg = Segment::new(dir, base, spare, IndexState::new());
        storage
            .rename(spare_path, &seg.log_path)
            .map_err(io_err(&seg.log_path))?;
        seg.preallocated.store(reserved, Ordering::Relaxed);
        seg.start_empty(storage)?;
        Ok(seg)
    }

    /// Remove leftovers of an earlier segment with this base and publish the empty log.
    fn start_empty(&self, storage: &dyn Storage) -> Result<(), LogError> {
        for p in [&self.index_path, &self.time_path, &self.snapshot_path] {
            if storage.exists(p) {
                storage.remove_file(p).map_err(io_err(p))?;
            }
        }
        self.publish(0, self.base);
        Ok(())
    }

    /// (published size, published next offset).
    pub fn published(&self) -> (u64, i64) {
        let v = self.published.load(Ordering::Acquire);
        (v >> 32, self.base + (v & 0xFFFF_FFFF) as i64)
    }

    /// Make `size` bytes / offsets below `next` visible to readers. Callers keep both within
    /// u32 of the segment start.
    pub fn publish(&self, size: u64, next: i64) {
        let rel = (next - self.base) as u64 & 0xFFFF_FFFF;
        self.published.store(
            (size.min(u64::from(u32::MAX)) << 32) | rel,
            Ordering::Release,
        );
    }

    pub fn size(&self) -> u64 {
        self.published().0
    }

    /// Append index entries not yet on disk (index files are opened only for this).
    pub fn flush_indexes(&self, storage: &dyn Storage) -> Result<(), LogError> {
        let mut f = self.files.lock();
        let (ob, tb, on, tn) = {
            let ix = self.index.read();
            let mut ob = Vec::new();
            for (rel, pos) in ix.offsets.iter().skip(f.offsets_written) {
                ob.extend_from_slice(&rel.to_be_bytes());
                ob.extend_from_slice(&pos.to_be_bytes());
            }
            let mut tb = Vec::new();
            for (ts, rel) in ix.times.iter().skip(f.times_written) {
                tb.extend_from_slice(&ts.to_be_bytes());
                tb.extend_from_slice(&rel.to_be_bytes());
            }
            (ob, tb, ix.offsets.len(), ix.times.len())
        };
        if !ob.is_empty() {
            let file = storage
                .open(&self.index_path)
                .map_err(io_err(&self.index_path))?;
            file.append(&ob).map_err(io_err(&self.index_path))?;
            f.offsets_written = on;
        }
        if !tb.is_empty() {
            let file = storage
                .open(&self.time_path)
                .map_err(io_err(&self.time_path))?;
            file.append(&tb).map_err(io_err(&self.time_path))?;
            f.times_written = tn;
        }
        Ok(())
    }

    /// Read and decode the 61-byte header at `pos`.
    pub fn read_header(&self, pos: u64) -> Result<BatchHeader, LogError> {
        read_header(&*self.log, &self.log_path, pos)
    }

    /// Byte position of the batch containing `offset` (which must be in this segment and below
    /// the published end `size`).
    pub fn find_position(&self, offset: i64, size: u64) -> Result<(u64, BatchHeader), LogError> {
        let rel = u32::try_from(offset - self.base).unwrap_or(0);
        let mut pos = u64::from(self.index.read().lookup_offset(rel));
        while pos < size {
            let h = self.read_header(pos)?;
            if h.last_offset() >= offset {
                return Ok((pos, h));
            }
            pos += h.total_len() as u64;
        }
        Err(LogError::CorruptBatch {
            position: pos as usize,
            reason: format!(
                "offset {offset} not found in segment {}",
                self.log_path.display()
            ),
        })
    }

    /// Position of the batch starting at `offset`, from the in-memory index alone: None when
    /// `offset` does not start a batch the index records (only a header walk can tell).
    pub fn indexed_position(&self, offset: i64) -> Option<u64> {
        let rel = u32::try_from(offset - self.base).ok()?;
        self.index.read().exact_position(rel).map(u64::from)
    }

    /// End of the whole batches from `start` that fit in `budget`, and the offset after the
    /// last of them (`seg_next` when the read reaches the published end).
    pub fn find_end(
        &self,
        start: u64,
        size: u64,
        budget: u64,
        seg_next: i64,
    ) -> Result<(u64, i64), LogError> {
        if size - start <= budget {
            return Ok((size, seg_next));
        }
        let limit = start + budget;
        let hint = u64::from(
            self.index
                .read()
                .lookup_position(u32::try_from(limit).unwrap_or(u32::MAX)),
        );
        let mut pos = hint.max(start);
        while pos < size {
            let h = self.read_header(pos)?;
            let end = pos + h.total_len() as u64;
            if end > limit {
                return Ok((pos, h.base_offset));
            }
            pos = end;
        }
        Ok((pos, seg_next))
    }
}

pub(crate) fn read_header(
    file: &dyn LogFile,
    path: &Path,
    pos: u64,
) -> Result<BatchHeader, LogError> {
    let mut buf = [0u8; HEADER_LEN];
    file.read_exact_at(&mut buf, pos).map_err(io_err(path))?;
    BatchHeader::parse_checked(&buf, pos as usize)
}

/// Result of walking a segment's batches.
struct Walk {
    /// End of the last good batch.
    end: u64,
    next: i64,
    max_ts: i64,
    first_ts: Option<i64>,
    /// Why the walk stopped before the file end.
    stop: Option<String>,
}

/// Walk batches from `pos` (a boundary whose batch should have base offset `expect`) to `len`,
/// checking structure, offset continuity and, if `verify_crc`, CRCs. Feeds `ix` and, if given,
/// the producer state with every accepted batch.
#[allow(clippy::too_many_arguments)]
fn walk(
    log: &dyn LogFile,
    path: &Path,
    base: i64,
    mut pos: u64,
    mut expect: i64,
    len: u64,
    verify_crc: bool,
    interval: u32,
    ix: &mut IndexState,
    mut producers: Option<&mut ProducerStates>,
) -> Result<Walk, LogError> {
    let mut w = Walk {
        end: pos,
        next: expect,
        max_ts: i64::MIN,
        first_ts: None,
        stop: None,
    };
    let mut buf = Vec::new();
    while pos < len {
        let avail = len - pos;
        if avail < HEADER_LEN as u64 {
            w.stop = Some(format!("partial header ({avail} bytes)"));
            break;
        }
        let mut hb = [0u8; HEADER_LEN];
        log.read_exact_at(&mut hb, pos).map_err(io_err(path))?;
        let h = match BatchHeader::parse_checked(&hb, pos as usize) {
            Ok(h) => h,
            Err(e) => {
                w.stop = Some(e.to_string());
                break;
            }
        };
        let total = h.total_len() as u64;
        if total > avail {
            w.stop = Some(format!("partial batch: {total} bytes, {avail} in file"));
            break;
        }
        if h.base_offset != expect {
            w.stop = Some(format!(
                "base offset {} where {expect} was expected",
                h.base_offset
            ));
            break;
        }
        let rel_end = h.last_offset() + 1 - base;
        if pos + total > u64::from(u32::MAX) || rel_end > i64::from(u32::MAX) {
            w.stop = Some("segment exceeds u32 positions/offsets".into());
            break;
        }
        if verify_crc {
            buf.resize(total as usize, 0);
            log.read_exact_at(&mut buf, pos).map_err(io_err(path))?;
            if let Err(e) = batch::check_batch(&buf, pos as usize) {
                w.stop = Some(e.to_string());
                break;
            }
        }
        ix.on_batch(
            (h.base_offset - base) as u32,
            pos as u32,
            total,
            h.max_timestamp,
            interval,
        );
        if let Some(p) = producers.as_deref_mut() {
            p.replay(&h);
        }
        w.max_ts = w.max_ts.max(h.max_timestamp);
        w.first_ts.get_or_insert(h.max_timestamp);
        pos += total;
        expect = h.last_offset() + 1;
        w.end = pos;
        w.next = expect;
    }
    Ok(w)
}

fn read_all(storage: &dyn Storage, path: &Path) -> Result<Option<Vec<u8>>, LogError> {
    if !storage.exists(path) {
        return Ok(None);
    }
    let f = storage.open(path).map_err(io_err(path))?;
    let len = f.len().map_err(io_err(path))?;
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    f.read_exact_at(&mut buf, 0).map_err(io_err(path))?;
    Ok(Some(buf))
}

fn decode_offsets(b: &[u8]) -> Option<Vec<(u32, u32)>> {
    if !b.chunks_exact(INDEX_ENTRY).remainder().is_empty() {
        return None;
    }
    let v: Vec<(u32, u32)> = b
        .chunks_exact(INDEX_ENTRY)
        .map(|c| {
            (
                u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    v.windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
        .then_some(v)
}

fn decode_times(b: &[u8]) -> Option<Vec<(i64, u32)>> {
    if !b.chunks_exact(TIME_ENTRY).remainder().is_empty() {
        return None;
    }
    let v: Vec<(i64, u32)> = b
        .chunks_exact(TIME_ENTRY)
        .map(|c| {
            let mut t = [0u8; 8];
            t.copy_from_slice(&c[..8]);
            (
                i64::from_be_bytes(t),
                u32::from_be_bytes([c[8], c[9], c[10], c[11]]),
            )
        })
        .collect();
    v.windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        .then_some(v)
}

/// What loading a segment found.
pub(crate) struct Loaded {
    pub seg: Segment,
    /// Bytes cut from the end of the log.
    pub truncated: Option<u64>,
    /// Whether the log was checked with CRCs (so it may hold not-yet-durable data).
    pub full_scan: bool,
    pub first_ts: Option<i64>,
    pub rebuilt: Vec<PathBuf>,
}

/// Open an existing segment. `trusted`: below the recovery point, so a header walk from the
/// last index entry suffices; otherwise every batch's CRC is checked and a bad tail truncated.
/// `closed`: not the active segment (its final time-index entry is expected).
/// `producers`: replay every batch header into it (a trusted segment then gets a full header
/// walk instead of the quick check from its last index entry).
pub(crate) fn load(
    storage: &dyn Storage,
    dir: &Path,
    base: i64,
    trusted: bool,
    closed: bool,
    interval: u32,
    producers: Option<&mut ProducerStates>,
) -> Result<Loaded, LogError> {
    let path = dir.join(file_name(base, "log"));
    let log = storage.open(&path).map_err(io_err(&path))?;
    let len = log.len().map_err(io_err(&path))?;
    let seg = Segment::new(dir, base, log, IndexState::new());
    let disk_offsets = read_all(storage, &seg.index_path)?;
    let disk_times = read_all(storage, &seg.time_path)?;
    let dec_offsets = disk_offsets.as_deref().and_then(decode_offsets);
    let dec_times = disk_times.as_deref().and_then(decode_times);

    if trusted && producers.is_none() {
        if let (Some(offs), Some(times)) = (dec_offsets.clone(), dec_times.clone()) {
            if let Some((next, max_ts)) = quick_check(&seg, len, &offs, &times, interval)? {
                {
                    let mut f = seg.files.lock();
                    f.offsets_written = offs.len();
                    f.times_written = times.len();
                }
                *seg.index.write() = IndexState {
                    offsets: offs,
                    times,
                    ..IndexState::new()
                };
                seg.max_ts.store(max_ts, Ordering::Relaxed);
                seg.publish(len, next);
                return Ok(Loaded {
                    seg,
                    truncated: None,
                    full_scan: false,
                    first_ts: None,
                    rebuilt: Vec::new(),
                });
            }
        }
    }

    let mut ix = IndexState::new();
    let w = walk(
        &*seg.log, &path, base, 0, base, len, !trusted, interval, &mut ix, producers,
    )?;
    let mut truncated = None;
    if w.end < len {
        let cut = len - w.end;
        tracing::warn!(
            file = %path.display(),
            position = w.end,
            bytes = cut,
            reason = w.stop.as_deref().unwrap_or(""),
            "truncating segment tail"
        );
        seg.log.set_len(w.end).map_err(io_err(&path))?;
        seg.log.sync_data().map_err(io_err(&path))?;
        truncated = Some(cut);
    }
    if closed && truncated.is_none() {
        ix.finish();
    }
    let mut rebuilt = Vec::new();
    {
        let mut files = seg.files.lock();
        let keep_offsets = match &dec_offsets {
            Some(d) if ix.offsets.starts_with(d) => Some(d.len()),
            _ => None,
        };
        let keep_times = match &dec_times {
            Some(d) if ix.times.starts_with(d) => Some(d.len()),
            _ => None,
        };
        files.offsets_written = reset_index(
            storage,
            &seg.index_path,
            keep_offsets,
            disk_offsets.is_some(),
            !ix.offsets.is_empty(),
            &mut rebuilt,
        )?;
        files.times_written = reset_index(
            storage,
            &seg.time_path,
            keep_times,
            disk_times.is_some(),
            !ix.times.is_empty(),
            &mut rebuilt,
        )?;
    }
    seg.max_ts.store(w.max_ts, Ordering::Relaxed);
    seg.publish(w.end, w.next);
    *seg.index.write() = ix;
    seg.flush_indexes(storage)?;
    Ok(Loaded {
        seg,
        truncated,
        full_scan: !trusted,
        first_ts: w.first_ts,
        rebuilt,
    })
}

/// Returns how many entries of an index file to keep; empties a file that does not match.
fn reset_index(
    storage: &dyn Storage,
    path: &Path,
    keep: Option<usize>,
    exists: bool,
    want_entries: bool,
    rebuilt: &mut Vec<PathBuf>,
) -> Result<usize, LogError> {
    if let Some(n) = keep {
        return Ok(n);
    }
    if exists {
        tracing::warn!(file = %path.display(), "index does not match its log; rebuilding");
        storage
            .open(path)
            .and_then(|f| f.set_len(0))
            .map_err(io_err(path))?;
    }
    if exists || want_entries {
        rebuilt.push(path.to_path_buf());
    }
    Ok(0)
}

/// Validate on-disk indexes of a trusted closed segment against its log with a header walk
/// from the last index entry. `None`: does not match, do a full walk.
fn quick_check(
    seg: &Segment,
    len: u64,
    offs: &[(u32, u32)],
    times: &[(i64, u32)],
    interval: u32,
) -> Result<Option<(i64, i64)>, LogError> {
    let (rel, pos) = offs.last().copied().unwrap_or((0, 0));
    if len > 0 && u64::from(pos) >= len {
        return Ok(None);
    }
    let mut scratch = IndexState::new();
    let w = walk(
        &*seg.log,
        &seg.log_path,
        seg.base,
        u64::from(pos),
        seg.base + i64::from(rel),
        len,
        false,
        interval,
        &mut scratch,
        None,
    )?;
    if w.end != len
        || times
            .last()
            .is_some_and(|t| seg.base + i64::from(t.1) >= w.next)
    {
        return Ok(None);
    }
    let max_ts = times.last().map_or(i64::MIN, |t| t.0).max(w.max_ts);
    Ok(Some((w.next, max_ts)))
}
