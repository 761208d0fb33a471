//! Bounded, streaming decompression of one batch's records section.
//!
//! Invariant: memory does not grow with the uncompressed size. gzip, lz4 and zstd decode
//! through fixed windows (zstd's is capped from the limit: at most the limit, or 8 MiB when the
//! limit is smaller, whatever size a frame declares); snappy has no streaming form, so each snappy block
//! is decoded whole, but only after its declared length was checked against the limit.

use std::io::Read;

use super::RecordsError;

/// Kafka's codec ids (attributes bits 0–2).
pub(crate) const NONE: u8 = 0;
const GZIP: u8 = 1;
const SNAPPY: u8 = 2;
const LZ4: u8 = 3;
const ZSTD: u8 = 4;

/// Name of a codec id, for messages.
pub(crate) fn codec_name(codec: u8) -> &'static str {
    match codec {
        NONE => "uncompressed",
        GZIP => "gzip",
        SNAPPY => "snappy",
        LZ4 => "lz4",
        ZSTD => "zstd",
        _ => "unknown-codec",
    }
}

/// The uncompressed records section of one batch, read in pieces.
pub(crate) enum Inflate<'a> {
    None(&'a [u8]),
    Gzip(Box<flate2::read::MultiGzDecoder<&'a [u8]>>),
    Snappy(Snappy<'a>),
    Lz4(Box<lz4::Decoder<&'a [u8]>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, &'a [u8]>>),
}

impl<'a> Inflate<'a> {
    /// A reader of `payload` compressed with `codec`; `limit` is the most uncompressed bytes
    /// the caller will accept (used to size what the decoders may allocate).
    pub(crate) fn open(codec: u8, payload: &'a [u8], limit: u64) -> Result<Self, RecordsError> {
        let corrupt = |reason: String| RecordsError::corrupt(codec, reason);
        Ok(match codec {
            NONE => Inflate::None(payload),
            GZIP => Inflate::Gzip(Box::new(flate2::read::MultiGzDecoder::new(payload))),
            SNAPPY => Inflate::Snappy(Snappy::new(payload)),
            LZ4 => Inflate::Lz4(Box::new(
                lz4::Decoder::new(payload).map_err(|e| corrupt(format!("lz4: {e}")))?,
            )),
            ZSTD => {
                let mut d = zstd::stream::read::Decoder::with_buffer(payload)
                    .map_err(|e| corrupt(format!("zstd: {e}")))?;
                d.window_log_max(zstd_window_log_max(limit))
                    .map_err(|e| corrupt(format!("zstd: {e}")))?;
                Inflate::Zstd(Box::new(d))
            }
            other => return Err(corrupt(format!("unknown compression codec {other}"))),
        })
    }

    /// Fill `buf` with the next uncompressed bytes; 0 at the end. `room` is how many more
    /// bytes the limit allows (snappy checks its block lengths against it before decoding).
    pub(crate) fn read(&mut self, buf: &mut [u8], room: u64) -> Result<usize, RecordsError> {
        let io = |codec: u8| move |e: std::io::Error| RecordsError::corrupt(codec, e.to_string());
        match self {
            Inflate::None(rest) => {
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                *rest = &rest[n..];
                Ok(n)
            }
            Inflate::Gzip(d) => d.read(buf).map_err(io(GZIP)),
            Inflate::Snappy(d) => d.read(buf, room),
            Inflate::Lz4(d) => d.read(buf).map_err(io(LZ4)),
            Inflate::Zstd(d) => d.read(buf).map_err(io(ZSTD)),
        }
    }
}

/// Largest zstd window (log2) accepted under `limit`. The decoder allocates up to the window,
/// and a window larger than the whole output is only needed when the encoder did not know the
/// size; 2^23 covers every level up to 19 in that case, 2^27 is zstd's default ceiling.
fn zstd_window_log_max(limit: u64) -> u32 {
    let bits = 64 - limit.saturating_sub(1).leading_zeros();
    bits.clamp(23, 27)
}

/// xerial framing (Kafka's Java clients): magic header, then blocks of
/// `[u32 big-endian length][raw snappy block]`. Without the header: one raw snappy block
/// (librdkafka and others).
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_LEN: usize = 16;

pub(crate) struct Snappy<'a> {
    rest: &'a [u8],
    xerial: bool,
    started: bool,
    block: Vec<u8>,
    at: usize,
}

impl<'a> Snappy<'a> {
    fn new(payload: &'a [u8]) -> Self {
        let xerial = payload.starts_with(XERIAL_MAGIC);
        Self {
            rest: payload,
            xerial,
            started: false,
            block: Vec::new(),
            at: 0,
        }
    }

    fn corrupt(reason: impl Into<String>) -> RecordsError {
        RecordsError::corrupt(SNAPPY, reason.into())
    }

    /// Decode the next block into `self.block`; false at the end.
    fn next_block(&mut self, room: u64) -> Result<bool, RecordsError> {
        let compressed: &[u8] = if self.xerial {
            if !self.started {
                self.started = true;
                if self.rest.len() < XERIAL_HEADER_LEN {
                    return Err(Self::corrupt("truncated xerial header"));
                }
                self.rest = &self.rest[XERIAL_HEADER_LEN..];
            }
            if self.rest.is_empty() {
                return Ok(false);
            }
            let Some((len, tail)) = self.rest.split_first_chunk::<4>() else {
                return Err(Self::corrupt("truncated block length"));
            };
            let len = u32::from_be_bytes(*len) as usize;
            let Some(block) = tail.get(..len) else {
                return Err(Self::corrupt(format!(
                    "block of {len} bytes exceeds the {} bytes left",
                    tail.len()
                )));
            };
            self.rest = &tail[len..];
            block
        } else {
            if self.started {
                return Ok(false);
            }
            self.started = true;
            self.rest
        };
        let len = snap::raw::decompress_len(compressed)
            .map_err(|e| Self::corrupt(format!("block header: {e}")))?;
        if len as u64 > room {
            return Err(RecordsError::TooLarge {
                codec: codec_name(SNAPPY),
                reason: format!("a snappy block declares {len} uncompressed bytes"),
            });
        }
        self.block.clear();
        self.block.resize(len, 0);
        snap::raw::Decoder::new()
            .decompress(compressed, &mut self.block)
            .map_err(|e| Self::corrupt(e.to_string()))?;
        self.at = 0;
        Ok(true)
    }

    fn read(&mut self, buf: &mut [u8], room: u64) -> Result<usize, RecordsError> {
        while self.at >= self.block.len() {
            if !self.next_block(room)? {
                return Ok(0);
            }
        }
        let n = (self.block.len() - self.at).min(buf.len());
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
