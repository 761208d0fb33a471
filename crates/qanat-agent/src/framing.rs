//! Cutting file bytes into events: lines, the maximum line length, multiline groups.
//!
//! Pure functions over a buffer that starts at an event boundary; events are returned as
//! ranges of that buffer so the hot path copies nothing. A record's `lines` is the number of
//! lines that *end* in it (a line cut by `max_line_bytes` ends only in its last piece; an
//! unterminated last line flushed at end of file counts as ending there), so summing `lines`
//! over a file counts its lines once.

use regex::bytes::Regex;

/// One event: `buf[start..end]` are its file bytes, `buf[start..value_end]` its value (the
/// bytes without the final newline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
    pub value_end: usize,
    pub lines: u32,
}

/// How to cut: maximum line length and an optional start-of-record pattern.
#[derive(Debug, Clone)]
pub struct Framer {
    max_line: usize,
    start: Option<Regex>,
}

impl Framer {
    pub fn new(max_line_bytes: usize, multiline_start: Option<Regex>) -> Self {
        Framer {
            max_line: max_line_bytes.max(1),
            start: multiline_start,
        }
    }

    pub fn is_multiline(&self) -> bool {
        self.start.is_some()
    }

    /// Append the events of `buf` to `out` and return how many bytes they cover; the rest
    /// (a partial line, or a multiline group that may still grow) waits for more bytes.
    ///
    /// * `flush_group`: the pending multiline group is complete (its timeout passed).
    /// * `final_flush`: no more bytes will come (the file is being dropped): also emit the
    ///   unterminated last line.
    pub fn frame(
        &self,
        buf: &[u8],
        flush_group: bool,
        final_flush: bool,
        out: &mut Vec<Frame>,
    ) -> usize {
        let mut pos = 0;
        while pos < buf.len() {
            // The event's first line.
            let first_end = match self.line_end(buf, pos) {
                LineEnd::Complete(e) => e,
                LineEnd::Cut(e) => {
                    out.push(Frame {
                        start: pos,
                        end: e,
                        value_end: e,
                        lines: 0,
                    });
                    pos = e;
                    continue;
                }
                LineEnd::Incomplete => {
                    if final_flush {
                        out.push(Frame {
                            start: pos,
                            end: buf.len(),
                            value_end: buf.len(),
                            lines: 1,
                        });
                        pos = buf.len();
                    }
                    break;
                }
            };
            let Some(start_re) = &self.start else {
                out.push(Frame {
                    start: pos,
                    end: first_end,
                    value_end: first_end - 1,
                    lines: 1,
                });
                pos = first_end;
                continue;
            };
            // Multiline: extend with continuation lines until a start line, the size cap, or
            // the end of what is known.
            let mut end = first_end;
            let mut lines = 1u32;
            let complete = loop {
                if end >= buf.len() {
                    break flush_group || final_flush;
                }
                match self.line_end(buf, end) {
                    LineEnd::Complete(next) => {
                        let line = &buf[end..next - 1];
                        if start_re.is_match(line) || next - pos > self.max_line + 1 {
                            break true;
                        }
                        end = next;
                        lines += 1;
                    }
                    // A continuation longer than the cap ends the group here.
                    LineEnd::Cut(_) => break true,
                    // Cannot tell yet whether the partial line starts a new record.
                    LineEnd::Incomplete => break flush_group || final_flush,
                }
            };
            if !complete {
                break;
            }
            out.push(Frame {
                start: pos,
                end,
                value_end: end - 1,
                lines,
            });
            pos = end;
        }
        pos
    }

    fn line_end(&self, buf: &[u8], pos: usize) -> LineEnd {
        let rest = &buf[pos..];
        let window = &rest[..rest.len().min(self.max_line + 1)];
        match memchr::memchr(b'\n', window) {
            Some(i) => LineEnd::Complete(pos + i + 1),
            None if rest.len() > self.max_line => LineEnd::Cut(pos + self.max_line),
            None => LineEnd::Incomplete,
        }
    }
}

enum LineEnd {
    /// End of a whole line, after its newline.
    Complete(usize),
    /// The line is longer than the maximum: a piece ends here.
    Cut(usize),
    /// No newline yet and not over the maximum.
    Incomplete,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn frames(
        f: &Framer,
        buf: &[u8],
        flush: bool,
        fin: bool,
    ) -> (Vec<(String, usize, u32)>, usize) {
        let mut out = Vec::new();
        let used = f.frame(buf, flush, fin, &mut out);
        let v = out
            .iter()
            .map(|fr| {
                (
                    String::from_utf8_lossy(&buf[fr.start..fr.value_end]).into_owned(),
                    fr.end - fr.start,
                    fr.lines,
                )
            })
            .collect();
        (v, used)
    }

    #[test]
    fn lines_and_a_partial_tail() {
        let f = Framer::new(100, None);
        let (v, used) = frames(&f, b"a\nbb\n\nccc", false, false);
        assert_eq!(
            v,
            vec![("a".into(), 2, 1), ("bb".into(), 3, 1), ("".into(), 1, 1)]
        );
        assert_eq!(used, 6);
        let (v, used) = frames(&f, b"ccc", false, true);
        assert_eq!(v, vec![("ccc".into(), 3, 1)]);
        assert_eq!(used, 3);
    }

    #[test]
    fn long_lines_are_cut_and_continued() {
        let f = Framer::new(4, None);
        let (v, used) = frames(&f, b"abcdefghij\nabcd\nxy", false, false);
        assert_eq!(
            v,
            vec![
                ("abcd".into(), 4, 0),
                ("efgh".into(), 4, 0),
                ("ij".into(), 3, 1),
                ("abcd".into(), 5, 1), // exactly the maximum: not cut
            ]
        );
        assert_eq!(used, 16);
        // Over the maximum without a newline yet: cut without waiting.
        let (v, _) = frames(&f, b"abcdefg", false, false);
        assert_eq!(v, vec![("abcd".into(), 4, 0)]);
    }

    #[test]
    fn an_unterminated_line_is_cut_only_past_the_maximum() {
        // The reader relies on this: exactly the maximum without a newline may still end as a
        // whole line, so the framer needs one byte more than the maximum to cut.
        let f = Framer::new(4, None);
        let (v, used) = frames(&f, b"abcd", false, false);
        assert!(v.is_empty());
        assert_eq!(used, 0);
        let (v, used) = frames(&f, b"abcdefghijk", false, false);
        assert_eq!(v, vec![("abcd".into(), 4, 0), ("efgh".into(), 4, 0)]);
        assert_eq!(used, 8);
    }

    #[test]
    fn multiline_groups_stack_traces() {
        let f = Framer::new(1000, Some(Regex::new(r"^\d{4}-").unwrap()));
        let text = b"2024-01 start\n  at a\n  at b\n2024-02 next\n  at c\n";
        // The last group may still grow: held back until a start line or the timeout.
        let (v, used) = frames(&f, text, false, false);
        assert_eq!(v, vec![("2024-01 start\n  at a\n  at b".into(), 28, 3)]);
        assert_eq!(used, 28);
        let (v, used) = frames(&f, &text[28..], true, false);
        assert_eq!(v, vec![("2024-02 next\n  at c".into(), 20, 2)]);
        assert_eq!(used, 20);
    }

    #[test]
    fn multiline_waits_on_a_partial_line_it_cannot_classify() {
        let f = Framer::new(1000, Some(Regex::new(r"^\d{4}-").unwrap()));
        let (v, used) = frames(&f, b"2024 x\n  at", false, false);
        assert!(v.is_empty());
        assert_eq!(used, 0);
        // On timeout the complete lines go, the partial one stays.
        let (v, used) = frames(&f, b"2024 x\n  at", true, false);
        assert_eq!(v, vec![("2024 x".into(), 7, 1)]);
        assert_eq!(used, 7);
    }

    #[test]
    fn multiline_group_is_capped() {
        let f = Framer::new(10, Some(Regex::new(r"^S").unwrap()));
        let (v, _) = frames(&f, b"S1\nc2\nc3\nc4\nS5\n", true, false);
        assert_eq!(
            v,
            vec![
                ("S1\nc2\nc3".into(), 9, 3),
                ("c4".into(), 3, 1),
                ("S5".into(), 3, 1)
            ]
        );
    }

    proptest! {
        // Frames tile the consumed prefix, values are the bytes less the final newline, and
        // framing in arbitrary chunks gives the same records as framing everything at once.
        #[test]
        fn frames_tile_and_chunking_does_not_matter(
            data in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'S'), Just(b'x')], 0..300),
            cuts in proptest::collection::vec(0usize..300, 0..6),
            max in 1usize..20,
            multi in any::<bool>(),
        ) {
            let re = multi.then(|| Regex::new("^S").unwrap());
            let f = Framer::new(max, re);
            let mut all = Vec::new();
            let used_all = f.frame(&data, false, false, &mut all);
            let mut pos = 0;
            for fr in &all {
                prop_assert_eq!(fr.start, pos);
                prop_assert!(fr.end > fr.start);
                prop_assert!(fr.end - fr.start <= max + 1);
                let ends_nl = data[fr.end - 1] == b'\n';
                prop_assert_eq!(fr.value_end, if ends_nl { fr.end - 1 } else { fr.end });
                pos = fr.end;
            }
            prop_assert_eq!(pos, used_all);
            if !multi {
                // Feed growing prefixes, carrying the unconsumed tail.
                let mut cuts = cuts;
                cuts.push(data.len());
                cuts.sort_unstable();
                let mut got = Vec::new();
                let mut base = 0;
                for c in cuts {
                    let c = c.min(data.len());
                    if c < base { continue; }
                    let mut out = Vec::new();
                    let used = f.frame(&data[base..c], false, false, &mut out);
                    got.extend(out.iter().map(|fr| (fr.start + base, fr.end + base)));
                    base += used;
                }
                let want: Vec<_> = all.iter().map(|fr| (fr.start, fr.end)).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
