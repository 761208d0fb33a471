//! What the agent knows of one file's delivery, without I/O: its identity, the bytes read but
//! not yet handed out, the records handed out to the sink (sequence number, byte range, line
//! count, state) and the acknowledged watermark.
//!
//! Invariants:
//! * `acked <= consumed <= read_pos`. The pending records tile `[acked, consumed)` in
//!   sequence order; the buffer holds `[consumed, read_pos)`.
//! * `acked` moves only over a prefix of acknowledged records, so delivery reports in any
//!   order are safe; it is what the checkpoint stores.
//! * A failed record stops reading; once no record is in flight the file rewinds to `acked`
//!   (after a backoff) and the records past it are handed out again, whole.

use std::collections::VecDeque;

use crate::identity::Signature;

/// Backoff before the first re-read after a failed delivery, doubling up to the maximum.
const FIRST_BACKOFF_MS: u64 = 500;
const MAX_BACKOFF_MS: u64 = 30_000;

/// A file's id (docs/trajectory.md), fixed on its first bytes, and those bytes' signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    pub id: String,
    pub sig: Signature,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Acked,
    Failed,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    end: u64,
    size: u64,
    lines: u32,
    state: State,
}

#[derive(Debug)]
pub struct FileTracker {
    dev: u64,
    ino: u64,
    ident: Option<Ident>,
    /// Read but not handed out, starting at file offset `consumed`.
    buf: Vec<u8>,
    consumed: u64,
    acked: u64,
    pending: VecDeque<Pending>,
    next_seq: u64,
    failed: bool,
    /// `buf` holds records the sink refused: frame them again before reading more.
    refused: bool,
    backoff_ms: u64,
}

impl FileTracker {
    /// A file not read yet: everything at offset 0, no id until its first bytes are seen.
    pub fn new(dev: u64, ino: u64) -> FileTracker {
        FileTracker {
            dev,
            ino,
            ident: None,
            buf: Vec::new(),
            consumed: 0,
            acked: 0,
            pending: VecDeque::new(),
            next_seq: 0,
            failed: false,
            refused: false,
            backoff_ms: 0,
        }
    }

    /// A file found again under its checkpointed id: everything below `offset` was delivered.
    pub fn resumed(dev: u64, ino: u64, ident: Ident, offset: u64) -> FileTracker {
        let mut t = FileTracker::new(dev, ino);
        t.ident = Some(ident);
        t.acked = offset;
        t.consumed = offset;
        t
    }

    pub fn dev(&self) -> u64 {
        self.dev
    }

    pub fn ino(&self) -> u64 {
        self.ino
    }

    pub fn ident(&self) -> Option<&Ident> {
        self.ident.as_ref()
    }

    pub fn set_ident(&mut self, ident: Ident) {
        self.ident = Some(ident);
    }

    /// Every record below this offset was acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The file offset of the first byte not yet handed out (the next record's offset).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The file offset of the next byte to read.
    pub fn read_pos(&self) -> u64 {
        self.consumed + self.buf.len() as u64
    }

    /// Bytes read but not handed out: a partial line, a growing multiline group, or records
    /// the sink refused.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Take the buffered bytes out, to frame them; give the rest back with `keep_unconsumed`.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// `data` (the file's bytes from `consumed`) was framed and its first `used` bytes handed
    /// out: keep the rest.
    pub fn keep_unconsumed(&mut self, data: &[u8], used: usize) {
        self.buf.clear();
        self.buf.extend_from_slice(&data[used..]);
        if self.buf.capacity() > (64 << 10) && self.buf.len() < (16 << 10) {
            self.buf.shrink_to_fit();
        }
        self.consumed += used as u64;
    }

    /// Whether to read more of the file. Records the sink refused are framed again first
    /// while a chunk's worth of them waits, so a refusal that lasts cannot pull the whole
    /// file into memory. Anything else left over is a partial line or a multiline group that
    /// needs more bytes: the framer cuts a line at `max_line_bytes` only once it sees more than
    /// that, so stopping there would stall on a long unterminated line.
    pub fn should_read(&self, chunk: usize) -> bool {
        should_read(self.buf.len(), chunk, self.refused)
    }

    pub fn is_refused(&self) -> bool {
        self.refused
    }

    pub fn set_refused(&mut self, refused: bool) {
        self.refused = refused;
    }

    /// A delivery failed: read nothing more until the file rewinds.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// No record in flight (every handed-out record acknowledged or failed).
    pub fn settled(&self) -> bool {
        self.pending.iter().all(|p| p.state != State::InFlight)
    }

    /// Records handed out and not yet under the watermark.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The sequence number the next record handed out gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The sink took the record `[offset, offset + size)` under `next_seq()`.
    pub fn handed_out(&mut self, offset: u64, size: u64, lines: u32) {
        debug_assert_eq!(
            offset,
            self.pending.back().map_or(self.consumed, |p| p.end),
            "records tile the file"
        );
        self.pending.push_back(Pending {
            seq: self.next_seq,
            end: offset + size,
            size,
            lines,
            state: State::InFlight,
        });
        self.next_seq += 1;
    }

    /// A delivery report for record `seq`, of which only the low 32 bits need be right (a
    /// file's in-flight records are far fewer than 2^32, so they pick one unambiguously).
    /// Returns the record's size if it was in flight; a report for anything else (a record
    /// forgotten by a rewind, a repeat) changes nothing.
    pub fn settle(&mut self, seq: u64, ok: bool) -> Option<u64> {
        let seq = seq as u32;
        let front = self.pending.front()?;
        let idx = seq.wrapping_sub(front.seq as u32);
        let p = self.pending.get_mut(idx as usize)?;
        if p.state != State::InFlight || p.seq as u32 != seq {
            return None;
        }
        if ok {
            p.state = State::Acked;
        } else {
            p.state = State::Failed;
            self.failed = true;
        }
        Some(p.size)
    }

    /// Move the watermark over the acknowledged prefix; returns the bytes and lines it passed.
    pub fn advance(&mut self) -> (u64, u64) {
        let (mut bytes, mut lines) = (0u64, 0u64);
        while self
            .pending
            .front()
            .is_some_and(|p| p.state == State::Acked)
        {
            if let Some(p) = self.pending.pop_front() {
                self.acked = p.end;
                bytes += p.size;
                lines += u64::from(p.lines);
            }
        }
        if bytes > 0 {
            self.backoff_ms = 0;
        }
        (bytes, lines)
    }

    /// Forget everything past `acked` and read again from there.
    pub fn rewind(&mut self) {
        self.pending.clear();
        self.buf = Vec::new();
        self.consumed = self.acked;
        self.failed = false;
        self.refused = false;
    }

    /// Rewind after a failed delivery; returns how long to wait before reading again
    /// (doubling while deliveries keep failing without progress).
    pub fn rewind_after_failure(&mut self) -> u64 {
        self.backoff_ms = if self.backoff_ms == 0 {
            FIRST_BACKOFF_MS
        } else {
            (self.backoff_ms * 2).min(MAX_BACKOFF_MS)
        };
        self.rewind();
        self.backoff_ms
    }
}

fn should_read(buffered: usize, chunk: usize, refused: bool) -> bool {
    !(refused && buffered >= chunk)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::framing::Framer;
    use regex::bytes::Regex;

    fn ident() -> Ident {
        Ident {
            id: "h:1:2:00000000-4".into(),
            sig: Signature { len: 4, crc: 0 },
        }
    }

    /// Hand out records of the given sizes from the tracker's current position.
    fn hand_out(t: &mut FileTracker, sizes: &[u64]) -> Vec<u64> {
        let mut seqs = Vec::new();
        let mut off = t.consumed();
        let data = vec![b'x'; sizes.iter().sum::<u64>() as usize];
        for &s in sizes {
            seqs.push(t.next_seq());
            t.handed_out(off, s, 1);
            off += s;
        }
        t.keep_unconsumed(&data, data.len());
        seqs
    }

    #[test]
    fn the_watermark_moves_only_over_the_acknowledged_prefix() {
        let mut t = FileTracker::resumed(1, 2, ident(), 100);
        let s = hand_out(&mut t, &[10, 20, 30]);
        assert_eq!(t.settle(s[2], true), Some(30));
        assert_eq!(t.settle(s[1], true), Some(20));
        assert_eq!(t.advance(), (0, 0));
        assert_eq!(t.acked(), 100, "the first record is still in flight");
        assert!(!t.settled());
        assert_eq!(t.settle(s[0], true), Some(10));
        assert_eq!(t.advance(), (60, 3));
        assert_eq!(t.acked(), 160);
        assert!(!t.has_pending());
        assert!(t.settled());
    }

    #[test]
    fn repeated_and_unknown_reports_change_nothing() {
        let mut t = FileTracker::new(1, 2);
        let s = hand_out(&mut t, &[5, 5]);
        assert_eq!(t.settle(s[0], true), Some(5));
        assert_eq!(t.settle(s[0], true), None, "a repeat");
        assert_eq!(t.settle(s[1] + 1, true), None, "never handed out");
        assert_eq!(t.settle(s[1] + (1 << 32) + 7, false), None);
        assert!(!t.is_failed());
        assert_eq!(t.advance(), (5, 1));
    }

    #[test]
    fn reports_match_on_the_low_32_bits_of_the_sequence() {
        let mut t = FileTracker::new(1, 2);
        t.next_seq = u32::MAX as u64 - 1;
        let s = hand_out(&mut t, &[1, 1, 1, 1]);
        for &seq in s.iter().rev() {
            assert_eq!(t.settle(seq & 0xffff_ffff, true), Some(1));
        }
        assert_eq!(t.advance(), (4, 4));
    }

    #[test]
    fn a_failure_stops_the_file_and_rewinds_to_the_watermark_with_a_growing_backoff() {
        let mut t = FileTracker::new(1, 2);
        let s = hand_out(&mut t, &[10, 10, 10]);
        t.settle(s[0], true);
        t.settle(s[1], false);
        assert!(t.is_failed());
        assert!(!t.settled(), "the third record is still in flight");
        t.settle(s[2], true);
        assert_eq!(t.advance(), (10, 1));
        assert!(t.settled());
        assert_eq!(t.rewind_after_failure(), FIRST_BACKOFF_MS);
        assert!(!t.is_failed());
        assert_eq!((t.acked(), t.consumed(), t.read_pos()), (10, 10, 10));
        assert!(!t.has_pending());
        // The acknowledged third record is handed out again: at-least-once, whole records.
        let s = hand_out(&mut t, &[10, 10]);
        t.settle(s[0], false);
        t.settle(s[1], false);
        assert_eq!(t.rewind_after_failure(), 2 * FIRST_BACKOFF_MS);
        for _ in 0..20 {
            let s = hand_out(&mut t, &[1]);
            t.settle(s[0], false);
            assert!(t.rewind_after_failure() <= MAX_BACKOFF_MS);
        }
        assert_eq!(t.backoff_ms, MAX_BACKOFF_MS);
        let s = hand_out(&mut t, &[1]);
        t.settle(s[0], true);
        t.advance();
        assert_eq!(t.backoff_ms, 0, "progress resets the backoff");
    }

    #[test]
    fn reports_for_records_forgotten_by_a_rewind_are_ignored() {
        let mut t = FileTracker::new(1, 2);
        let old = hand_out(&mut t, &[4, 4]);
        t.rewind();
        let new = hand_out(&mut t, &[4]);
        assert_eq!(t.settle(old[0], true), None);
        assert_eq!(t.settle(old[1], true), None);
        assert_eq!(t.advance(), (0, 0));
        assert_eq!(t.settle(new[0], true), Some(4));
        assert_eq!(t.advance(), (4, 1));
    }

    #[test]
    fn a_replaced_file_starts_over_while_the_old_content_settles_alone() {
        // Truncation or rotation in place: the loop keeps the old tracker until its records
        // settle and tracks the same inode again from 0.
        let mut old = FileTracker::resumed(1, 2, ident(), 50);
        let s = hand_out(&mut old, &[10]);
        let fresh = FileTracker::new(old.dev(), old.ino());
        assert_eq!((fresh.acked(), fresh.read_pos()), (0, 0));
        assert!(
            fresh.ident().is_none(),
            "a new id is taken on the new first bytes"
        );
        assert_eq!(old.settle(s[0], true), Some(10));
        assert_eq!(old.advance(), (10, 1));
        assert_eq!(old.acked(), 60);
    }

    #[test]
    fn refused_records_are_framed_again_before_reading_more() {
        let mut t = FileTracker::new(1, 2);
        let data = vec![b'x'; 256];
        t.keep_unconsumed(&data, 0);
        assert!(t.should_read(256), "a partial line needs more bytes");
        t.set_refused(true);
        assert!(!t.should_read(256));
        assert!(t.should_read(257));
        t.rewind();
        assert!(!t.is_refused());
        assert!(t.should_read(256));
    }

    /// Reading as the agent does, over an in-memory file: read while `should_read` says so,
    /// frame, keep the unconsumed tail. Returns the consumed position once a round makes no
    /// progress (the file is exhausted or reading stalled) and the frames' sizes.
    fn read_like_the_agent(file: &[u8], framer: &Framer, chunk: usize) -> (u64, Vec<usize>) {
        let mut t = FileTracker::new(1, 2);
        let (mut sizes, mut frames) = (Vec::new(), Vec::new());
        loop {
            let pos = t.read_pos() as usize;
            let mut data = t.take_buffered();
            let n = if t.should_read(chunk) {
                let n = chunk.min(file.len() - pos);
                data.extend_from_slice(&file[pos..pos + n]);
                n
            } else {
                0
            };
            frames.clear();
            let used = framer.frame(&data, false, false, &mut frames);
            sizes.extend(frames.iter().map(|f| f.end - f.start));
            t.keep_unconsumed(&data, used);
            if n == 0 && used == 0 {
                return (t.consumed(), sizes);
            }
        }
    }

    #[test]
    fn a_long_unterminated_line_is_cut_instead_of_stalling_the_file() {
        // As with the defaults, the read chunk equals the maximum line length.
        let (max, chunk) = (256, 256);
        let framer = Framer::new(max, None);
        let mut file = vec![b'x'; 50 * max + 100];
        let (pos, sizes) = read_like_the_agent(&file, &framer, chunk);
        assert_eq!(
            pos,
            50 * max as u64,
            "every whole piece of the unterminated line is taken"
        );
        assert_eq!(sizes, vec![max; 50]);
        // The newline arrives: the rest of the line goes, then the lines after it.
        file.extend_from_slice(b"\nnext\n");
        let (pos, sizes) = read_like_the_agent(&file, &framer, chunk);
        assert_eq!(pos, file.len() as u64);
        assert_eq!(sizes[50..], [101, 5]);
    }

    #[test]
    fn a_pending_multiline_group_longer_than_a_chunk_keeps_reading() {
        let framer = Framer::new(1000, Some(Regex::new("^S").unwrap()));
        let mut file = b"S start\n".to_vec();
        for _ in 0..40 {
            file.extend_from_slice(b"  continuation line\n");
        }
        file.extend_from_slice(b"S next\n");
        let (pos, sizes) = read_like_the_agent(&file, &framer, 64);
        assert!(sizes[0] > 64, "the group is read past one chunk: {sizes:?}");
        assert_eq!(pos, (file.len() - b"S next\n".len()) as u64);
    }
}
