//! Auditor tests: hand-made scenarios, then proptests against byte-level oracles.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

fn pos(partition: i32, offset: i64) -> Position {
    Position {
        topic: "logs".into(),
        partition,
        offset,
    }
}

fn headers(file: &str, offset: u64, size: u64) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    [
        ("qanat.host", "web7".to_string()),
        ("qanat.file", file.to_string()),
        ("qanat.path", format!("/var/log/{file}.log")),
        ("qanat.offset", offset.to_string()),
        ("qanat.size", size.to_string()),
        ("qanat.lines", "1".to_string()),
    ]
    .into_iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), Some(v.into_bytes())))
    .collect()
}

fn feed(a: &mut Auditor, partition: i32, koff: i64, file: &str, offset: u64, size: u64) {
    let h = headers(file, offset, size);
    let raw: Vec<RawHeader<'_>> = h
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_deref()))
        .collect();
    a.observe_record(&pos(partition, koff), &raw);
}

fn manifest(host: &str, ts: i64, files: &[(&str, u64)]) -> Manifest {
    Manifest {
        host: host.into(),
        ts_ms: ts,
        files: files
            .iter()
            .map(|(f, size)| ManifestFile {
                path: format!("/var/log/{f}.log"),
                file: (*f).into(),
                size: *size,
                mtime_ms: ts,
            })
            .collect(),
    }
}

#[test]
fn complete_file_is_ok() {
    let mut a = Auditor::default();
    for i in 0..10 {
        feed(&mut a, 0, i, "f", i as u64 * 10, 10);
    }
    a.add_manifest(manifest("web7", 1, &[("f", 100)]));
    let r = a.report();
    assert!(r.ok, "{}", r.render_text(10));
    assert_eq!(r.summary.complete_files, 1);
    assert_eq!(r.files[0].records, 10);
    assert_eq!(r.files[0].path, "/var/log/f.log");
}

#[test]
fn gap_tail_and_partial() {
    let mut a = Auditor::default();
    feed(&mut a, 0, 0, "f", 0, 10);
    feed(&mut a, 0, 1, "f", 20, 10);
    a.add_manifest(manifest("web7", 1, &[("f", 50)]));
    let r = a.report();
    assert!(!r.ok);
    let gaps: Vec<_> = r.gaps.iter().map(|g| (g.start, g.end)).collect();
    assert_eq!(gaps, vec![(10, 20), (30, 50)]);
    assert_eq!(r.summary.missing_bytes, 30);
    assert_eq!(r.partial.len(), 1);
    assert_eq!(r.partial[0].delivered_end, 10);
    assert_eq!(r.partial[0].missing_bytes, 40);
}

#[test]
fn never_collected_and_empty_files() {
    let mut a = Auditor::default();
    a.add_manifest(manifest("web7", 1, &[("lost", 123), ("empty", 0)]));
    let r = a.report();
    assert!(!r.ok);
    assert_eq!(r.never_collected.len(), 1);
    assert_eq!(r.never_collected[0].file, "lost");
    assert_eq!(r.never_collected[0].path, "/var/log/lost.log");
    assert_eq!(r.summary.missing_bytes, 123);
    assert!(r.render_text(10).contains("/var/log/lost.log"));
}

#[test]
fn rotated_file_stays_expected_at_its_largest_size() {
    let mut a = Auditor::default();
    a.add_manifest(manifest("web7", 1, &[("old", 50)]));
    a.add_manifest(manifest("web7", 2, &[("old", 80), ("new", 10)]));
    a.add_manifest(manifest("web7", 3, &[("new", 20)]));
    // A stale manifest arriving late must not become the latest.
    a.add_manifest(manifest("web7", 0, &[("ancient", 0)]));
    feed(&mut a, 0, 0, "old", 0, 50);
    feed(&mut a, 0, 1, "new", 0, 20);
    let r = a.report();
    assert_eq!(r.partial.len(), 1);
    assert_eq!(r.partial[0].file, "old");
    assert_eq!(r.partial[0].expected_size, 80);
    let old = r.files.iter().find(|f| f.file == "old").unwrap();
    assert_eq!(old.in_latest_manifest, Some(false));
    let new = r.files.iter().find(|f| f.file == "new").unwrap();
    assert_eq!(new.in_latest_manifest, Some(true));
    assert_eq!(r.summary.hosts, 1);
}

#[test]
fn duplicates_are_exact_and_not_loss() {
    let mut a = Auditor::default();
    feed(&mut a, 0, 0, "f", 0, 10);
    feed(&mut a, 0, 1, "f", 10, 10);
    feed(&mut a, 0, 2, "f", 20, 10);
    // Agent restarted from a checkpoint at 10: re-sends [10, 30), then [10, 20) once more.
    feed(&mut a, 0, 3, "f", 10, 10);
    feed(&mut a, 0, 4, "f", 20, 10);
    feed(&mut a, 0, 5, "f", 10, 10);
    let r = a.report();
    assert!(r.ok);
    let d: Vec<_> = r
        .duplicates
        .iter()
        .map(|d| (d.start, d.end, d.deliveries))
        .collect();
    assert_eq!(d, vec![(10, 20, 3), (20, 30, 2)]);
    assert_eq!(r.summary.duplicate_bytes, 30);
    assert_eq!(
        r.summary.reordered_records, 0,
        "a redelivery is not a reorder"
    );
    assert_eq!(r.files[0].bytes_delivered, 60);
    assert_eq!(r.files[0].unique_bytes, 30);
}

#[test]
fn reordering_is_per_partition() {
    let mut a = Auditor::default();
    feed(&mut a, 0, 0, "f", 0, 10);
    feed(&mut a, 0, 1, "f", 20, 10);
    feed(&mut a, 0, 2, "f", 10, 10);
    // Another file split across partitions: no order between partitions.
    feed(&mut a, 1, 0, "g", 10, 10);
    feed(&mut a, 2, 0, "g", 0, 10);
    let r = a.report();
    assert!(r.ok);
    assert_eq!(r.summary.reordered_records, 1);
    let o = &r.reordered[0];
    assert_eq!(
        (o.start, o.end, o.after_end, o.kafka_offset),
        (10, 20, 30, 2)
    );
}

#[test]
fn garbage_records_are_unattributable() {
    let mut a = Auditor::default();
    a.observe_record(&pos(0, 0), &[]);
    a.observe_record(&pos(0, 1), &[(b"qanat.offset", Some(b"x"))]);
    a.observe_record(&pos(0, 2), &[(&[0xff, 0x00], None)]);
    a.observe_manifest(&pos(0, 3), Some(b"not json"));
    a.observe_manifest(&pos(0, 4), None);
    let r = a.report();
    assert!(r.ok, "garbage alone is not loss");
    assert_eq!(r.summary.unattributable_records, 3);
    assert_eq!(r.summary.bad_manifests, 2);
    assert_eq!(r.unattributable[1].kafka_offset, 1);
    assert!(r.unattributable[0].reason.contains("qanat.host"));
}

#[test]
fn since_window_checks_from_the_first_byte_seen() {
    let mut a = Auditor::new(Options {
        since_ms: Some(1000),
    });
    feed(&mut a, 0, 0, "f", 100, 10);
    feed(&mut a, 0, 1, "f", 110, 10);
    let mut m = manifest("web7", 2000, &[("f", 120), ("idle", 50), ("lost", 30)]);
    m.files[1].mtime_ms = 500; // unchanged since before the window: shipped earlier
    a.add_manifest(m);
    let r = a.report();
    assert!(!r.ok);
    assert!(r.gaps.is_empty());
    assert!(r.partial.is_empty());
    let never: Vec<_> = r.never_collected.iter().map(|n| n.file.as_str()).collect();
    assert_eq!(never, vec!["lost"]);
    assert_eq!(
        r.files.iter().find(|f| f.file == "f").unwrap().window_start,
        100
    );
}

#[test]
fn text_report_caps_sections() {
    let mut a = Auditor::default();
    for i in 0..30u64 {
        feed(&mut a, 0, i as i64, "f", i * 20, 10);
    }
    let text = a.report().render_text(5);
    assert!(text.starts_with("qanat audit: LOSS"), "{text}");
    assert!(text.contains("gaps (29):"), "{text}");
    assert!(text.contains("… and 24 more"), "{text}");
}

#[test]
fn json_has_the_documented_top_level_fields() {
    let mut a = Auditor::default();
    feed(&mut a, 0, 0, "f", 0, 10);
    let v = serde_json::to_value(a.report()).unwrap();
    for k in [
        "schema",
        "ok",
        "summary",
        "gaps",
        "duplicates",
        "reordered",
        "never_collected",
        "partial",
        "unattributable",
        "bad_manifests",
        "files",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["schema"], SCHEMA);
    assert_eq!(v["files"][0]["status"], "complete");
}

// ------------------------------------------------------------------------------------------
// Properties

#[derive(Clone, Debug)]
enum Fate {
    Normal,
    Dropped,
    Duplicated(Vec<u32>),
    Moved(u32),
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        6 => Just(Fate::Normal),
        1 => Just(Fate::Dropped),
        1 => prop::collection::vec(1u32..5000, 1..3).prop_map(Fate::Duplicated),
        1 => (1000u32..5000).prop_map(Fate::Moved),
    ]
}

/// Runs of equal value in a per-byte array: `(start, end, value)`.
fn runs(counts: &[u32]) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (i, &c) in counts.iter().enumerate() {
        match out.last_mut() {
            Some(last) if last.2 == c && last.1 == i as u64 => last.1 += 1,
            _ => out.push((i as u64, i as u64 + 1, c)),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Tile a file, drop / duplicate / move pieces, deliver; the audit finds exactly those.
    #[test]
    fn finds_exactly_the_drops_duplicates_and_reorders(
        pieces in prop::collection::vec((1u64..64, fate()), 1..40),
        with_manifest in any::<bool>(),
    ) {
        let mut bounds = Vec::new();
        let mut at = 0u64;
        for (size, _) in &pieces {
            bounds.push((at, at + size));
            at += size;
        }
        let total = at;
        // Delivery order: sort key = piece index × 10000 (+ delay for moves and extra copies).
        let mut deliveries: Vec<(u64, usize)> = Vec::new();
        for (i, (_, f)) in pieces.iter().enumerate() {
            let base = i as u64 * 10_000;
            match f {
                Fate::Normal => deliveries.push((base, i)),
                Fate::Dropped => {}
                Fate::Duplicated(delays) => {
                    deliveries.push((base, i));
                    for d in delays {
                        deliveries.push((base + u64::from(*d), i));
                    }
                }
                Fate::Moved(d) => deliveries.push((base + u64::from(*d) * 10, i)),
            }
        }
        deliveries.sort_by_key(|&(k, _)| k);

        let mut a = Auditor::default();
        let mut counts = vec![0u32; total as usize];
        let mut first_seen: Vec<Option<usize>> = vec![None; pieces.len()];
        for (n, &(_, i)) in deliveries.iter().enumerate() {
            let (s, e) = bounds[i];
            feed(&mut a, 0, n as i64, "f", s, e - s);
            for c in &mut counts[s as usize..e as usize] {
                *c += 1;
            }
            first_seen[i].get_or_insert(n);
        }
        if with_manifest {
            a.add_manifest(manifest("web7", 1, &[("f", total)]));
        }
        let r = a.report();

        // Gaps: exactly the dropped pieces (merged), up to the manifest size or the highest end.
        let highest = bounds.iter().zip(&first_seen).filter(|(_, f)| f.is_some()).map(|(b, _)| b.1).max().unwrap_or(0);
        let to = if with_manifest { total } else { highest };
        let want_gaps: Vec<(u64, u64)> = runs(&counts[..to as usize]).into_iter().filter(|r| r.2 == 0).map(|r| (r.0, r.1)).collect();
        let dropped: u64 = pieces.iter().zip(&bounds).filter(|(p, b)| matches!(p.1, Fate::Dropped) && b.0 < to).map(|(p, _)| p.0).sum();
        let got_gaps: Vec<(u64, u64)> = r.gaps.iter().map(|g| (g.start, g.end)).collect();
        if deliveries.is_empty() {
            // Nothing arrived: no chain to have gaps; listed, it is never collected.
            prop_assert!(got_gaps.is_empty());
            prop_assert_eq!(r.never_collected.len(), usize::from(with_manifest));
            prop_assert_eq!(r.summary.missing_bytes, if with_manifest { total } else { 0 });
        } else {
            prop_assert_eq!(&got_gaps, &want_gaps);
            prop_assert_eq!(r.summary.gap_bytes, dropped);
            prop_assert!(r.never_collected.is_empty());
        }

        // Duplicates: exact ranges with their delivery counts, and the extra bytes.
        let want_dups: Vec<(u64, u64, u32)> = runs(&counts).into_iter().filter(|r| r.2 > 1).collect();
        let got_dups: Vec<(u64, u64, u32)> = r.duplicates.iter().map(|d| (d.start, d.end, d.deliveries)).collect();
        prop_assert_eq!(got_dups, want_dups);
        let extra: u64 = pieces.iter().map(|(size, f)| match f {
            Fate::Duplicated(d) => size * d.len() as u64,
            _ => 0,
        }).sum();
        prop_assert_eq!(r.summary.duplicate_bytes, extra);

        // Reorders: pieces whose first delivery came after the first delivery of a later piece.
        let mut want_reorders: Vec<(u64, u64)> = (0..pieces.len())
            .filter(|&p| first_seen[p].is_some_and(|fp| (p + 1..pieces.len()).any(|q| first_seen[q].is_some_and(|fq| fq < fp))))
            .map(|p| bounds[p])
            .collect();
        want_reorders.sort_unstable();
        let mut got_reorders: Vec<(u64, u64)> = r.reordered.iter().map(|o| (o.start, o.end)).collect();
        got_reorders.sort_unstable();
        prop_assert_eq!(got_reorders, want_reorders);

        // Verdict and partial file.
        let any_drop = pieces.iter().zip(&bounds).any(|(p, b)| matches!(p.1, Fate::Dropped) && b.0 < to);
        prop_assert_eq!(r.ok, !any_drop);
        if with_manifest && !deliveries.is_empty() {
            prop_assert_eq!(r.partial.len(), usize::from(any_drop));
        }
        prop_assert_eq!(r.summary.records, deliveries.len() as u64);
    }

    /// Arbitrary (overlapping) ranges: the cover map agrees with per-byte counting.
    #[test]
    fn cover_map_matches_byte_counts(ranges in prop::collection::vec((0u64..200, 0u64..50), 0..60)) {
        let mut m = ranges::CoverMap::new();
        let mut counts = vec![0u32; 250];
        for (s, len) in ranges {
            let added = m.add(s, s + len);
            let before_zero = counts[s as usize..(s + len) as usize].iter().filter(|c| **c == 0).count() as u64;
            prop_assert_eq!(added.new_bytes, before_zero);
            prop_assert_eq!(added.dup_bytes, len - before_zero);
            for c in &mut counts[s as usize..(s + len) as usize] {
                *c += 1;
            }
        }
        let want: Vec<_> = runs(&counts).into_iter().filter(|r| r.2 > 0).collect();
        prop_assert_eq!(m.segments().collect::<Vec<_>>(), want);
    }

    /// Garbage headers and manifests never panic; every record is either attributed or not.
    #[test]
    fn garbage_never_panics(
        recs in prop::collection::vec(prop::collection::vec((
            prop_oneof![
                Just(b"qanat.host".to_vec()), Just(b"qanat.file".to_vec()), Just(b"qanat.path".to_vec()),
                Just(b"qanat.offset".to_vec()), Just(b"qanat.size".to_vec()), Just(b"qanat.lines".to_vec()),
                prop::collection::vec(any::<u8>(), 0..12),
            ],
            prop::option::of(prop_oneof![
                prop::collection::vec(any::<u8>(), 0..24),
                "[0-9]{1,25}".prop_map(String::into_bytes),
            ]),
        ), 0..10), 0..30),
        manifests in prop::collection::vec(prop::option::of(prop::collection::vec(any::<u8>(), 0..64)), 0..5),
    ) {
        let mut a = Auditor::default();
        for (i, h) in recs.iter().enumerate() {
            let raw: Vec<RawHeader<'_>> = h.iter().map(|(n, v)| (n.as_slice(), v.as_deref())).collect();
            a.observe_record(&pos(0, i as i64), &raw);
        }
        for (i, m) in manifests.iter().enumerate() {
            a.observe_manifest(&pos(0, i as i64), m.as_deref());
        }
        let r = a.report();
        prop_assert_eq!(r.summary.attributed_records + r.summary.unattributable_records, recs.len() as u64);
        let _ = r.render_text(3);
        prop_assert!(serde_json::to_string(&r).is_ok());
    }
}
