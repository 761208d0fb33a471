//! Delivery multiplicity over a file's byte space: which bytes arrived how many times.

use std::collections::BTreeMap;

/// Piecewise-constant count of deliveries per byte. Segments are disjoint, non-empty, have a
/// count ≥ 1, and two adjacent segments never have the same count (they are merged), so an
/// undamaged chain of any length is a single entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoverMap {
    /// start → (end, count)
    segs: BTreeMap<u64, (u64, u32)>,
}

/// What one [`CoverMap::add`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// Bytes of the range never delivered before.
    pub new_bytes: u64,
    /// Bytes of the range delivered before (now once more).
    pub dup_bytes: u64,
}

impl CoverMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record one delivery of `[start, end)`. Empty ranges change nothing.
    pub fn add(&mut self, start: u64, end: u64) -> Added {
        let mut out = Added::default();
        if start >= end {
            return out;
        }
        // Fast path: the chain continues exactly where it ended.
        if let Some((&s, &(e, 1))) = self.segs.last_key_value() {
            if e == start {
                self.segs.insert(s, (end, 1));
                out.new_bytes = end - start;
                return out;
            }
        }
        // Segments overlapping [start, end), in order.
        let mut overlapping: Vec<(u64, u64, u32)> = Vec::new();
        for (&s, &(e, c)) in self.segs.range(..end).rev() {
            if e <= start {
                break;
            }
            overlapping.push((s, e, c));
        }
        overlapping.reverse();
        for (s, _, _) in &overlapping {
            self.segs.remove(s);
        }
        let mut pieces: Vec<(u64, u64, u32)> = Vec::with_capacity(overlapping.len() * 2 + 2);
        let mut cursor = start;
        for &(s, e, c) in &overlapping {
            if s < start {
                pieces.push((s, start, c));
            }
            let (is, ie) = (s.max(start), e.min(end));
            if cursor < is {
                pieces.push((cursor, is, 1));
                out.new_bytes += is - cursor;
            }
            pieces.push((is, ie, c.saturating_add(1)));
            out.dup_bytes += ie - is;
            cursor = ie;
            if e > end {
                pieces.push((end, e, c));
            }
        }
        if cursor < end {
            pieces.push((cursor, end, 1));
            out.new_bytes += end - cursor;
        }
        for (s, e, c) in pieces {
            self.insert_merging(s, e, c);
        }
        out
    }

    /// Insert a segment into a free slot, merging with equal-count neighbours that touch it.
    fn insert_merging(&mut self, mut s: u64, mut e: u64, c: u32) {
        if let Some((&ps, &(pe, pc))) = self.segs.range(..s).next_back() {
            if pe == s && pc == c {
                self.segs.remove(&ps);
                s = ps;
            }
        }
        if let Some(&(ne, nc)) = self.segs.get(&e) {
            if nc == c {
                self.segs.remove(&e);
                e = ne;
            }
        }
        self.segs.insert(s, (e, c));
    }

    /// Segments in order: `(start, end, deliveries)`.
    pub fn segments(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.segs.iter().map(|(&s, &(e, c))| (s, e, c))
    }

    /// Lowest delivered byte, if any.
    pub fn first_start(&self) -> Option<u64> {
        self.segs.keys().next().copied()
    }

    /// End of the highest delivered range (0 when nothing was delivered).
    pub fn highest_end(&self) -> u64 {
        self.segs.last_key_value().map_or(0, |(_, &(e, _))| e)
    }

    /// Bytes delivered at least once.
    pub fn unique_bytes(&self) -> u64 {
        self.segments().map(|(s, e, _)| e - s).sum()
    }

    /// End of the delivered run that starts at `from` (`from` itself when `from` is missing).
    pub fn contiguous_end(&self, from: u64) -> u64 {
        let mut end = from;
        // A segment may start below `from` and still cover it.
        if let Some((_, &(e, _))) = self.segs.range(..=from).next_back() {
            end = end.max(e);
        }
        for (&s, &(e, _)) in self.segs.range(from..) {
            if s > end {
                break;
            }
            end = end.max(e);
        }
        end
    }

    /// Undelivered ranges within `[from, to)`.
    pub fn gaps(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cursor = from;
        for (s, e, _) in self.segments() {
            if s >= to {
                break;
            }
            if s > cursor {
                out.push((cursor, s));
            }
            cursor = cursor.max(e);
        }
        if cursor < to {
            out.push((cursor, to));
        }
        out
    }

    /// Ranges delivered more than once: `(start, end, deliveries)`.
    pub fn duplicates(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.segments().filter(|&(_, _, c)| c > 1)
    }

    /// Extra deliveries in bytes: Σ len × (count − 1).
    pub fn duplicate_bytes(&self) -> u64 {
        self.duplicates()
            .map(|(s, e, c)| (e - s).saturating_mul(u64::from(c - 1)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn in_order_chain_is_one_segment() {
        let mut m = CoverMap::new();
        for i in 0..100u64 {
            assert_eq!(m.add(i * 10, i * 10 + 10).new_bytes, 10);
        }
        assert_eq!(m.segments().collect::<Vec<_>>(), vec![(0, 1000, 1)]);
        assert!(m.gaps(0, 1000).is_empty());
        assert_eq!(m.contiguous_end(0), 1000);
    }

    #[test]
    fn overlaps_split_and_count() {
        let mut m = CoverMap::new();
        m.add(0, 10);
        m.add(20, 30);
        let a = m.add(5, 25);
        assert_eq!(
            a,
            Added {
                new_bytes: 10,
                dup_bytes: 10
            }
        );
        assert_eq!(
            m.segments().collect::<Vec<_>>(),
            vec![(0, 5, 1), (5, 10, 2), (10, 20, 1), (20, 25, 2), (25, 30, 1)]
        );
        m.add(10, 20);
        assert_eq!(
            m.segments().collect::<Vec<_>>(),
            vec![(0, 5, 1), (5, 25, 2), (25, 30, 1)]
        );
        assert_eq!(m.duplicate_bytes(), 20);
        m.add(0, 30);
        assert_eq!(
            m.segments().collect::<Vec<_>>(),
            vec![(0, 5, 2), (5, 25, 3), (25, 30, 2)]
        );
    }

    #[test]
    fn gaps_and_contiguous_end() {
        let mut m = CoverMap::new();
        m.add(10, 20);
        m.add(30, 40);
        assert_eq!(m.gaps(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(m.gaps(10, 40), vec![(20, 30)]);
        assert_eq!(m.contiguous_end(0), 0);
        assert_eq!(m.contiguous_end(10), 20);
        assert_eq!(m.contiguous_end(15), 20);
        assert_eq!(m.highest_end(), 40);
    }
}
