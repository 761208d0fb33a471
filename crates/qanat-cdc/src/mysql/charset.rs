//! Character columns in the binlog carry their bytes in the column's own charset (the
//! TABLE_MAP's collation id says which). This module turns them into text: latin1 (MySQL's is
//! cp1252) and the UTF-8 family here, the multi-byte Asian and the single-byte European charsets
//! through `encoding_rs` (the WHATWG decoders), UTF-16/UCS-2/UTF-32 by hand.
//!
//! Invariant: a value is decoded exactly or refused. Bytes that are not valid in their charset
//! are an error naming it, never replacement characters, and a charset with no exact decoder
//! here (for example `latin5`, whose WHATWG decoder is windows-1254, or `dec8`, `swe7`,
//! `armscii8`) is refused by name rather than guessed.
//!
//! Where a WHATWG decoder is a superset of the MySQL charset (`gbk`/`gb2312` → GBK, `sjis` →
//! Shift_JIS = cp932, `euckr` → windows-949, `tis620` → windows-874), every valid value of the
//! MySQL charset decodes to the same text.

use encoding_rs::Encoding;

/// The charsets [`decode`] knows, for error messages and docs.
pub const SUPPORTED: &str = "utf8mb4, utf8mb3, ascii, latin1, binary, latin2, latin7, greek, \
     hebrew, cp1250, cp1251, cp1256, cp1257, cp866, koi8r, koi8u, macroman, big5, gbk, gb2312, \
     gb18030, sjis, cp932, ujis, eucjpms, euckr, tis620, ucs2, utf16, utf16le, utf32";

/// Why bytes could not become text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CharsetError {
    #[error("not valid {charset}")]
    Invalid { charset: String },
    #[error("charset {charset} is not supported ({SUPPORTED} are)")]
    Unsupported { charset: String },
}

/// `bytes` in the MySQL charset `charset` as text. `binary` is not text and not handled here.
pub fn decode(charset: &str, bytes: Vec<u8>) -> Result<String, CharsetError> {
    let invalid = || CharsetError::Invalid {
        charset: charset.to_string(),
    };
    match charset {
        "utf8mb4" | "utf8mb3" | "utf8" | "ascii" => String::from_utf8(bytes).map_err(|_| invalid()),
        "latin1" => Ok(latin1(bytes)),
        // UCS-2 is UTF-16 without surrogates; MySQL's utf16 and ucs2 are big-endian.
        "ucs2" | "utf16" => utf16(&bytes, u16::from_be_bytes).ok_or_else(invalid),
        "utf16le" => utf16(&bytes, u16::from_le_bytes).ok_or_else(invalid),
        "utf32" => utf32(&bytes).ok_or_else(invalid),
        other => {
            let encoding = whatwg(other).ok_or_else(|| CharsetError::Unsupported {
                charset: other.to_string(),
            })?;
            // ASCII is ASCII in every charset reached here: no table lookups for it.
            if bytes.is_ascii() {
                return String::from_utf8(bytes).map_err(|_| invalid());
            }
            encoding
                .decode_without_bom_handling_and_without_replacement(&bytes)
                .map(|text| text.into_owned())
                .ok_or_else(invalid)
        }
    }
}

/// The WHATWG decoder that reads a MySQL charset exactly (or a superset of it).
fn whatwg(charset: &str) -> Option<&'static Encoding> {
    Some(match charset {
        "latin2" => encoding_rs::ISO_8859_2,
        "latin7" => encoding_rs::ISO_8859_13,
        "greek" => encoding_rs::ISO_8859_7,
        "hebrew" => encoding_rs::ISO_8859_8,
        "cp1250" => encoding_rs::WINDOWS_1250,
        "cp1251" => encoding_rs::WINDOWS_1251,
        "cp1256" => encoding_rs::WINDOWS_1256,
        "cp1257" => encoding_rs::WINDOWS_1257,
        "cp866" => encoding_rs::IBM866,
        "koi8r" => encoding_rs::KOI8_R,
        "koi8u" => encoding_rs::KOI8_U,
        "macroman" => encoding_rs::MACINTOSH,
        "big5" => encoding_rs::BIG5,
        "gbk" | "gb2312" => encoding_rs::GBK,
        "gb18030" => encoding_rs::GB18030,
        "sjis" | "cp932" => encoding_rs::SHIFT_JIS,
        "ujis" | "eucjpms" => encoding_rs::EUC_JP,
        "euckr" => encoding_rs::EUC_KR,
        "tis620" => encoding_rs::WINDOWS_874,
        _ => return None,
    })
}

/// MySQL's latin1 is cp1252; the bytes 0x80–0x9F map to the Windows-1252 characters, with the
/// five bytes cp1252 leaves undefined kept as the C1 controls (as MySQL converts them).
fn latin1(bytes: Vec<u8>) -> String {
    const CP1252: [char; 32] = [
        '\u{20AC}', '\u{81}', '\u{201A}', '\u{192}', '\u{201E}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2C6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8D}', '\u{17D}',
        '\u{8F}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2DC}', '\u{2122}', '\u{161}', '\u{203A}', '\u{153}', '\u{9D}', '\u{17E}',
        '\u{178}',
    ];
    // ASCII is the same in latin1 and UTF-8: the buffer becomes the string as it is.
    let bytes = if bytes.is_ascii() {
        match String::from_utf8(bytes) {
            Ok(text) => return text,
            Err(e) => e.into_bytes(),
        }
    } else {
        bytes
    };
    bytes
        .iter()
        .map(|&b| match b {
            0x80..=0x9F => CP1252[usize::from(b - 0x80)],
            _ => char::from(b),
        })
        .collect()
}

fn utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> Option<String> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let units = bytes.chunks_exact(2).map(|c| unit([c[0], c[1]]));
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .ok()
}

fn utf32(bytes: &[u8]) -> Option<String> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    bytes
        .chunks_exact(4)
        .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(text: &str) -> Result<String, CharsetError> {
        Ok(text.to_string())
    }

    #[test]
    fn latin1_is_cp1252() {
        assert_eq!(decode("latin1", vec![0x80, b'a', 0xE9]), ok("€aé"));
        assert_eq!(decode("latin1", b"plain ascii".to_vec()), ok("plain ascii"));
    }

    #[test]
    fn multi_byte_charsets_decode_their_own_bytes() {
        // "中文" in GBK, "日本" in Shift_JIS and EUC-JP, "한국" in EUC-KR, "中文" in Big5
        assert_eq!(decode("gbk", vec![0xD6, 0xD0, 0xCE, 0xC4]), ok("中文"));
        assert_eq!(decode("sjis", vec![0x93, 0xFA, 0x96, 0x7B]), ok("日本"));
        assert_eq!(decode("ujis", vec![0xC6, 0xFC, 0xCB, 0xDC]), ok("日本"));
        assert_eq!(decode("euckr", vec![0xC7, 0xD1, 0xB1, 0xB9]), ok("한국"));
        assert_eq!(decode("big5", vec![0xA4, 0xA4, 0xA4, 0xE5]), ok("中文"));
        assert_eq!(decode("cp1251", vec![0xCF, 0xF0, 0xE8]), ok("При"));
        assert_eq!(decode("koi8r", vec![0xF0, 0xD2, 0xC9]), ok("При"));
        assert_eq!(decode("latin2", vec![0xB1, 0xE6]), ok("ąć"));
        assert_eq!(decode("ucs2", vec![0x00, 0x41, 0x4E, 0x2D]), ok("A中"));
        assert_eq!(decode("utf16", vec![0xD8, 0x3D, 0xDE, 0x00]), ok("😀"));
        assert_eq!(decode("utf16le", vec![0x3D, 0xD8, 0x00, 0xDE]), ok("😀"));
        assert_eq!(decode("utf32", vec![0, 1, 0xF6, 0x00]), ok("😀"));
    }

    #[test]
    fn invalid_bytes_are_refused_not_replaced() {
        let invalid = |c: &str| CharsetError::Invalid { charset: c.into() };
        assert_eq!(decode("gbk", vec![0xD6]), Err(invalid("gbk")));
        assert_eq!(decode("sjis", vec![0x93]), Err(invalid("sjis")));
        assert_eq!(decode("utf8mb4", vec![0xFF]), Err(invalid("utf8mb4")));
        assert_eq!(decode("utf16", vec![0xD8, 0x3D]), Err(invalid("utf16")));
        assert_eq!(decode("utf16", vec![0x00]), Err(invalid("utf16")));
        assert_eq!(decode("utf32", vec![0, 0x11, 0, 0]), Err(invalid("utf32")));
    }

    #[test]
    fn unknown_charsets_are_refused_by_name() {
        let refused = decode("latin5", b"abc".to_vec())
            .err()
            .unwrap_or(CharsetError::Invalid {
                charset: "none".into(),
            });
        assert_eq!(
            refused,
            CharsetError::Unsupported {
                charset: "latin5".into()
            }
        );
        assert!(refused.to_string().contains("latin5"));
    }

    proptest! {
        /// Garbage in any charset is text or an error, never a panic; and text encoded by the
        /// WHATWG encoder decodes back to itself.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), which in 0usize..12) {
            let charsets = ["gbk", "sjis", "ujis", "euckr", "big5", "cp1251", "ucs2", "utf16",
                "utf16le", "utf32", "latin1", "utf8mb4"];
            let _ = decode(charsets[which], bytes);
        }

        #[test]
        fn gbk_round_trips(text in "[a-z中文字符数据库]{0,16}") {
            let (bytes, _, unmappable) = encoding_rs::GBK.encode(&text);
            prop_assert!(!unmappable);
            prop_assert_eq!(decode("gbk", bytes.into_owned()), Ok(text));
        }
    }
}
