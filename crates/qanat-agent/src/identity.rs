//! File identity (B2, docs/trajectory.md): `HOST:DEV:INODE:SIG`, `SIG` = hex CRC-32C of the
//! first `min(size, signature_bytes)` bytes and that count. Rename keeps dev+inode+content, so
//! the id survives rotation; truncation or a reused inode changes the first bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The signature part of an id: CRC-32C over the first `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    pub len: u64,
    pub crc: u32,
}

/// Hash the first `len` bytes of `file`; `None` when the file has fewer than `len` bytes now
/// (truncated or replaced: it cannot be the file the signature was taken from).
pub fn signature_of(file: &File, len: u64) -> io::Result<Option<Signature>> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    let mut got = 0usize;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => return Ok(None),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(Signature {
        len,
        crc: crc32c::crc32c(&buf),
    }))
}

/// The signature fixed when a file is first read: over `min(size, signature_bytes)` bytes.
/// `None` for an empty file (it is not identified until it has bytes).
pub fn initial_signature(
    file: &File,
    size: u64,
    signature_bytes: u64,
) -> io::Result<Option<Signature>> {
    let len = size.min(signature_bytes);
    if len == 0 {
        return Ok(None);
    }
    signature_of(file, len)
}

/// `HOST:DEV:INODE:CRC-LEN`.
pub fn file_id(host: &str, dev: u64, ino: u64, sig: Signature) -> String {
    format!("{host}:{dev}:{ino}:{:08x}-{}", sig.crc, sig.len)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn id_format_matches_the_contract() {
        let sig = Signature {
            len: 1024,
            crc: 0x9a1b_2c3d,
        };
        assert_eq!(
            file_id("web7", 2049, 131_075, sig),
            "web7:2049:131075:9a1b2c3d-1024"
        );
    }

    #[test]
    fn short_file_signs_what_it_has_and_keeps_that_count() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"hello\n").unwrap();
        let file = f.reopen().unwrap();
        let sig = initial_signature(&file, 6, 1024).unwrap().unwrap();
        assert_eq!(sig.len, 6);
        assert_eq!(sig.crc, crc32c::crc32c(b"hello\n"));
        // Appends do not change the signature over the first 6 bytes.
        f.write_all(b"more\n").unwrap();
        assert_eq!(signature_of(&file, 6).unwrap(), Some(sig));
    }

    #[test]
    fn empty_file_has_no_identity_yet() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(initial_signature(f.as_file(), 0, 1024).unwrap(), None);
    }

    #[test]
    fn truncation_and_rewrite_change_the_signature() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"first content\n").unwrap();
        let file = f.reopen().unwrap();
        let sig = initial_signature(&file, 14, 1024).unwrap().unwrap();
        f.as_file().set_len(0).unwrap();
        assert_eq!(
            signature_of(&file, sig.len).unwrap(),
            None,
            "shorter: not the same file"
        );
        file.write_at(b"other content\n", 0).unwrap();
        assert_ne!(signature_of(&file, sig.len).unwrap(), Some(sig));
    }

    #[test]
    fn long_file_signs_only_the_first_bytes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[b'a'; 4000]).unwrap();
        let file = f.reopen().unwrap();
        let sig = initial_signature(&file, 4000, 1024).unwrap().unwrap();
        assert_eq!(sig.len, 1024);
        assert_eq!(sig.crc, crc32c::crc32c(&[b'a'; 1024]));
    }
}
