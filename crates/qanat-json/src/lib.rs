//! JSON written by hand on the hot paths — the collector's beacon records and the change
//! events of `qanat cdc` — byte for byte what `serde_json` writes for the same values, without
//! its per-byte escaping loop (the largest single cost of encoding either).
//!
//! Invariants:
//! * [`write_str`] escapes exactly the bytes `serde_json` escapes (`"`, `\`, and the control
//!   characters below U+0020, with the same short forms and lowercase `\u00xx`), and copies
//!   every other byte as it is; its output is always a valid JSON string of the same value.
//! * Runs of bytes that need no escape are found eight at a time and copied at once.

/// What follows the backslash for each byte below 0x20 (`u`: `\u00xx`).
const CONTROL: [u8; 32] = [
    b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'b', b't', b'n', b'u', b'f', b'r', b'u', b'u',
    b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u', b'u',
];
const HEX: &[u8; 16] = b"0123456789abcdef";

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes of `w` is below 0x20, `"` or `\`. Exact for "any" (the
/// classic zero-byte test can only misreport a byte after a real hit).
#[inline]
fn needs_escape(w: u64) -> bool {
    let below_space = w.wrapping_sub(ONES * 0x20) & !w;
    let quote = w ^ (ONES * u64::from(b'"'));
    let backslash = w ^ (ONES * u64::from(b'\\'));
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    (below_space | zero(quote) | zero(backslash)) & HIGHS != 0
}

#[inline]
fn escape_of(b: u8) -> Option<u8> {
    match b {
        b'"' => Some(b'"'),
        b'\\' => Some(b'\\'),
        0..=0x1f => CONTROL.get(usize::from(b)).copied(),
        _ => None,
    }
}

/// Append `s` as a JSON string (quotes included).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Bytes before `start` are written.
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if !needs_escape(u64::from_le_bytes(w)) {
                i += 8;
                continue;
            }
        }
        // Somewhere in these (at most) eight bytes: look at each.
        let end = (i + 8).min(bytes.len());
        while i < end {
            let b = bytes.get(i).copied().unwrap_or(0);
            if let Some(e) = escape_of(b) {
                out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
                if e == b'u' {
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                } else {
                    out.push(b'\\');
                    out.push(e);
                }
                start = i + 1;
            }
            i += 1;
        }
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

/// Append `s` as a JSON string, or `null`.
pub fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Append an integer.
pub fn write_i64(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Append an unsigned integer (binlog positions and LSNs use the whole u64 range).
pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Append an integer, or `null`.
pub fn write_opt_i64(out: &mut Vec<u8>, n: Option<i64>) {
    match n {
        Some(n) => write_i64(out, n),
        None => out.extend_from_slice(b"null"),
    }
}

/// Append an address as a JSON string (as `serde_json` writes an `IpAddr`: its display form).
pub fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            out.push(b'"');
            let mut buf = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(buf.format(octet).as_bytes());
            }
            out.push(b'"');
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            out.push(b'"');
            // Writing into a vector cannot fail.
            let _ = write!(out, "{v6}");
            out.push(b'"');
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn ours(s: &str) -> String {
        let mut out = Vec::new();
        write_str(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_byte_class_escapes_as_serde_json_does() {
        for c in (0u32..0x300).chain([0x2028, 0x2029, 0xfeff, 0x1f600]) {
            let Some(ch) = char::from_u32(c) else {
                continue;
            };
            // Alone, and at every position of a run longer than one word.
            for pos in 0..18 {
                let mut s: String = "abcdefghijklmnopq".chars().take(pos).collect();
                s.push(ch);
                s.push_str("xyz0123456789");
                assert_eq!(
                    ours(&s),
                    serde_json::to_string(&s).unwrap(),
                    "{c:#x} at {pos}"
                );
            }
        }
        assert_eq!(ours(""), "\"\"");
    }

    #[test]
    fn addresses_and_numbers_as_serde_json_writes_them() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.3.4",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:1.2.3.4",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(out, serde_json::to_vec(&ip).unwrap());
        }
        for n in [Some(0), Some(-1), Some(i64::MIN), Some(i64::MAX), None] {
            let mut out = Vec::new();
            write_opt_i64(&mut out, n);
            assert_eq!(out, serde_json::to_vec(&n).unwrap());
        }
    }

    proptest! {
        #[test]
        fn any_string_escapes_as_serde_json_does(s in any::<String>()) {
            prop_assert_eq!(ours(&s), serde_json::to_string(&s).unwrap());
        }

        #[test]
        fn mostly_ascii_with_specials_escapes_as_serde_json_does(
            s in proptest::collection::vec(
                prop_oneof![
                    8 => proptest::char::range(' ', '~'),
                    1 => proptest::char::range('\0', '\u{1f}'),
                    1 => Just('"'),
                    1 => Just('\\'),
                    1 => Just('\u{7f}'),
                    1 => any::<char>(),
                ],
                0..80,
            ).prop_map(|v| v.into_iter().collect::<String>())
        ) {
            prop_assert_eq!(ours(&s), serde_json::to_string(&s).unwrap());
            let back: String = serde_json::from_str(&ours(&s)).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
