//! Framing: length-prefixed request frames in, responses (memory and file ranges) out.
//!
//! A response is a list of chunks. File chunks are segment ranges of whole record batches and
//! go out with `sendfile(2)` straight from the page cache (A5); small ones are read into the
//! write buffer instead, where one syscall beats several.

use std::io;
use std::os::fd::AsRawFd;

use bytes::{Bytes, BytesMut};
use qanat_log::FileSlice;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// File ranges below this size are copied into the write buffer rather than sent with sendfile.
const SENDFILE_MIN_BYTES: u64 = 32 * 1024;
/// The write buffer is flushed once it holds this much.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// Errors of one connection; each closes that connection only.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame size {size} is outside 8..={limit} bytes")]
    FrameSize { size: i64, limit: u32 },
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("segment file ended {missing} bytes before the expected end")]
    ShortFile { missing: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A piece of a response.
pub enum Chunk {
    Bytes(Bytes),
    File(FileSlice),
}

impl Chunk {
    fn len(&self) -> u64 {
        match self {
            Chunk::Bytes(b) => b.len() as u64,
            Chunk::File(f) => f.len,
        }
    }
}

/// A whole response frame (without its length prefix).
#[derive(Default)]
pub struct Response {
    pub chunks: Vec<Chunk>,
}

impl Response {
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            chunks: vec![Chunk::Bytes(bytes)],
        }
    }

    pub fn len(&self) -> u64 {
        self.chunks.iter().map(Chunk::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Read one frame. `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame(rd: &mut OwnedReadHalf, limit: u32) -> Result<Option<Bytes>, WireError> {
    let mut len = [0u8; 4];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let size = i32::from_be_bytes(len);
    // The cap is checked before anything is allocated for the frame.
    if size < 8 || size as u32 > limit {
        return Err(WireError::FrameSize {
            size: i64::from(size),
            limit,
        });
    }
    let mut buf = BytesMut::zeroed(size as usize);
    rd.read_exact(&mut buf).await?;
    Ok(Some(buf.freeze()))
}

/// Writes responses to one connection, batching small ones into few syscalls.
pub struct ResponseWriter {
    wr: OwnedWriteHalf,
    buf: BytesMut,
}

impl ResponseWriter {
    pub fn new(wr: OwnedWriteHalf) -> Self {
        Self {
            wr,
            buf: BytesMut::with_capacity(WRITE_BUFFER_BYTES),
        }
    }

    /// Queue one response; it may stay buffered until [`flush`](Self::flush).
    pub async fn write(&mut self, response: Response) -> Result<u64, WireError> {
        let total = response.len();
        let size = u32::try_from(total)
            .map_err(|_| WireError::Malformed(format!("response of {total} bytes")))?;
        self.buf.extend_from_slice(&size.to_be_bytes());
        for chunk in response.chunks {
            match chunk {
                Chunk::Bytes(b) => {
                    if b.len() >= WRITE_BUFFER_BYTES {
                        self.flush().await?;
                        self.wr.write_all(&b).await?;
                    } else {
                        self.buf.extend_from_slice(&b);
                    }
                }
                Chunk::File(slice) => self.write_file(slice).await?,
            }
            if self.buf.len() >= WRITE_BUFFER_BYTES {
                self.flush().await?;
            }
        }
        Ok(total + 4)
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.buf.is_empty() {
            self.wr.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    async fn write_file(&mut self, slice: FileSlice) -> Result<(), WireError> {
        match slice.file.raw_fd() {
            Some(fd) if slice.len >= SENDFILE_MIN_BYTES => {
                self.flush().await?;
                self.sendfile(fd, slice.position, slice.len).await
            }
            _ => {
                let start = self.buf.len();
                self.buf.resize(start + slice.len as usize, 0);
                slice
                    .file
                    .read_exact_at(&mut self.buf[start..], slice.position)?;
                Ok(())
            }
        }
    }

    async fn sendfile(&mut self, fd: i32, position: u64, len: u64) -> Result<(), WireError> {
        let stream = self.wr.as_ref();
        let sock = stream.as_raw_fd();
        let mut offset = position as libc::off_t;
        let end = position + len;
        while (offset as u64) < end {
            let remaining = (end - offset as u64) as usize;
            stream.writable().await?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                // SAFETY: both descriptors are open for the duration of the call (the socket
                // is borrowed from `self.wr`, the file is kept alive by the slice's Arc), and
                // `offset` is a valid pointer to a local.
                let n = unsafe { libc::sendfile(sock, fd, &mut offset, remaining) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match sent {
                Ok(0) => {
                    return Err(WireError::ShortFile {
                        missing: end - offset as u64,
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
