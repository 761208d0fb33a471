//! Framing: length-prefixed request frames in, responses (memory and file ranges) out.
//!
//! A request frame is capped (`max_frame_bytes`) before anything is allocated, reserves its
//! size from the shared request pool before its body is read, and its buffer grows only as
//! bytes arrive.
//!
//! A response is a list of chunks. File chunks are segment ranges of whole record batches and
//! go out with `sendfile(2)` straight from the page cache (A5); small ones are read into
//! memory instead (by Fetch, on the blocking pool), where one syscall beats several.
//!
//! No async worker reads a file or waits for the disk. `sendfile` reads the file inside the
//! syscall and would wait for the disk on a cold page cache, so a range is sent with it only
//! when the page cache holds it (asked with `cachestat(2)`, which never blocks; on kernels
//! without it, the range's first and last bytes are read with `RWF_NOWAIT`). A range that is
//! not resident (a consumer far behind, reading what was evicted), and every file range over
//! TLS, is instead read on the blocking pool a buffer at a time and written from memory.
//!
//! With serving threads ([`crate::serving`]), every socket write of a response that carries
//! records is done by them, at low priority, one piece at a time in order; the rest (other
//! responses, TLS) is written by the connection's task.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use qanat_log::FileSlice;

use crate::limits::{PoolReservation, RequestPool};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest};

use crate::listener::WriteSide;
use crate::serving::{self, Outcome, ServingThreads, Work};

/// File ranges below this size are copied into the response rather than sent with sendfile
/// (Fetch reads them on the blocking pool).
pub(crate) const SENDFILE_MIN_BYTES: u64 = 32 * 1024;
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
    pub fn len(&self) -> u64 {
        match self {
            Chunk::Bytes(b) => b.len() as u64,
            Chunk::File(f) => f.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A whole response frame (without its length prefix).
#[derive(Default)]
pub struct Response {
    pub chunks: Vec<Chunk>,
    /// Carries record data for a consumer: sent by the serving threads when they are on.
    pub records: bool,
}

impl Response {
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            chunks: vec![Chunk::Bytes(bytes)],
            records: false,
        }
    }

    pub fn len(&self) -> u64 {
        self.chunks.iter().map(Chunk::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Growth step of a frame buffer's first allocation; later steps double what arrived.
const FRAME_BUFFER_STEP: usize = 64 * 1024;

/// A request stream that can tell how many bytes have arrived but not been read yet.
pub trait ArrivedBytes {
    /// Bytes waiting in the kernel's receive buffer; `None` when unknown.
    fn arrived_bytes(&self) -> Option<usize>;
}

/// Bytes waiting in the receive buffer of the socket `fd` (FIONREAD); `None` on error.
pub fn kernel_arrived_bytes(fd: std::os::fd::RawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which is valid for the call; a closed
    // or foreign fd only makes the ioctl fail.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    (rc == 0).then(|| usize::try_from(n).ok()).flatten()
}

impl ArrivedBytes for tokio::net::tcp::OwnedReadHalf {
    fn arrived_bytes(&self) -> Option<usize> {
        kernel_arrived_bytes(AsRef::<tokio::net::TcpStream>::as_ref(self).as_raw_fd())
    }
}

impl ArrivedBytes for tokio::io::DuplexStream {
    fn arrived_bytes(&self) -> Option<usize> {
        None
    }
}

/// What one [`FrameReader::step`] achieved.
#[derive(Debug)]
pub enum Step {
    /// Some bytes arrived (or pool memory was reserved); the frame is not complete yet.
    Progress,
    /// A whole frame (without its length prefix) and its share of the request pool.
    Frame(Bytes, PoolReservation),
    /// The peer closed the connection between two frames.
    Eof,
}

/// Reads length-prefixed request frames from one connection.
///
/// The length is checked against the frame cap before anything is allocated; then the
/// frame's declared size is reserved from the [`RequestPool`] (waiting, and so not reading,
/// while the pool is short), and the buffer grows as bytes actually arrive rather than to
/// the declared size up front (bytes already waiting in the kernel count as arrived, so a frame
/// received whole is read into one allocation instead of a chain of copying reallocations).
/// Once the connection has sent a frame whole, its next ones start at up to that size: a
/// producer's requests are alike, and a request of many partitions arrives over many reads,
/// whose doublings would otherwise copy it about once more. So a frame that stops early
/// never costs more than twice what arrived or the largest frame the connection completed.
/// Every await inside [`step`](Self::step) is a single read or
/// the pool wait, so a step may be cancelled (by a timer) without losing bytes.
#[derive(Debug)]
pub struct FrameReader {
    limit: u32,
    /// Smallest frame accepted: 8 (a request header), or 1 while unframed SASL tokens are
    /// expected (after SaslHandshake v0).
    min: i32,
    header: [u8; 4],
    header_len: usize,
    body: Option<FrameBody>,
    /// The largest frame this connection has sent whole.
    largest_complete: usize,
    /// Counted in `qanat_request_pool_waiting_connections` right now.
    waiting: bool,
}

#[derive(Debug)]
struct FrameBody {
    size: usize,
    reservation: Option<PoolReservation>,
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            min: 8,
            header: [0; 4],
            header_len: 0,
            body: None,
            largest_complete: 0,
            waiting: false,
        }
    }

    /// Accept frames shorter than a request header (unframed SASL tokens), or stop accepting.
    pub fn allow_short_frames(&mut self, allow: bool) {
        self.min = if allow { 1 } else { 8 };
    }

    /// Whether part of a frame has been received.
    pub fn mid_frame(&self) -> bool {
        self.header_len > 0
    }

    /// Read some bytes of the current frame (or wait for its pool share).
    pub async fn step<R: AsyncRead + ArrivedBytes + Unpin>(
        &mut self,
        rd: &mut R,
        pool: &RequestPool,
    ) -> Result<Step, WireError> {
        let Some(body) = self.body.as_mut() else {
            let n = rd.read(&mut self.header[self.header_len..]).await?;
            if n == 0 {
                return match self.header_len {
                    0 => Ok(Step::Eof),
                    _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                };
            }
            self.header_len += n;
            if self.header_len == self.header.len() {
                let size = i32::from_be_bytes(self.header);
                // The cap is checked before anything is allocated or reserved for the frame.
                if size < self.min || size as u32 > self.limit {
                    return Err(WireError::FrameSize {
                        size: i64::from(size),
                        limit: self.limit,
                    });
                }
                self.body = Some(FrameBody {
                    size: size as usize,
                    reservation: None,
                    buf: Vec::new(),
                });
            }
            return Ok(Step::Progress);
        };
        if body.reservation.is_none() {
            let size = body.size as u32;
            let reservation = match pool.try_reserve(size) {
                Some(r) => r,
                None => {
                    if !self.waiting {
                        self.waiting = true;
                        metrics::gauge!("qanat_request_pool_waiting_connections").increment(1.0);
                    }
                    let r = pool.reserve(size).await;
                    self.waiting = false;
                    metrics::gauge!("qanat_request_pool_waiting_connections").decrement(1.0);
                    r
                }
            };
            body.reservation = Some(reservation);
            return Ok(Step::Progress);
        }
        let remaining = body.size - body.buf.len();
        if body.buf.capacity() == body.buf.len() {
            // Doubling what arrived keeps copies amortized and the buffer within twice the
            // received bytes; a frame that stops early never costs its declared size. Bytes
            // already waiting are taken in one step, which spares the copies altogether.
            let mut step = body.buf.len().max(FRAME_BUFFER_STEP);
            if body.buf.is_empty() {
                step = step.max(self.largest_complete);
            }
            // Asked only when it can matter: most frames fit in the first step.
            let waiting = if remaining > step {
                rd.arrived_bytes().unwrap_or(0)
            } else {
                0
            };
            let grow = remaining.min(step.max(waiting));
            body.buf.reserve_exact(grow);
        }
        let n = (&mut *rd)
            .take(remaining as u64)
            .read_buf(&mut body.buf)
            .await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        if body.buf.len() < body.size {
            return Ok(Step::Progress);
        }
        let Some(FrameBody {
            buf,
            reservation: Some(reservation),
            ..
        }) = self.body.take()
        else {
            return Err(WireError::Malformed(
                "frame read without a reservation".into(),
            ));
        };
        self.header_len = 0;
        self.largest_complete = self.largest_complete.max(buf.len());
        Ok(Step::Frame(Bytes::from(buf), reservation))
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        if self.waiting {
            metrics::gauge!("qanat_request_pool_waiting_connections").decrement(1.0);
        }
    }
}

/// Writes responses to one connection, batching small ones into few syscalls.
///
/// With serving threads (plain TCP only), every socket write of a response that carries
/// records (bytes and `sendfile` alike, and earlier responses still in the buffer, so the
/// order holds) is done by them at their lowered priority; the writer awaits each in turn.
pub struct ResponseWriter {
    wr: WriteSide,
    buf: BytesMut,
    serving: Option<Serving>,
    /// The response being written goes out through the serving threads.
    low_priority: bool,
}

/// The serving threads a connection uses, and its socket's descriptor as they hold it.
struct Serving {
    threads: Arc<ServingThreads>,
    /// A duplicate of the socket's descriptor, made at the first use: a job keeps it open
    /// even if the connection is dropped while the job runs.
    sock: Option<Arc<OwnedFd>>,
}

impl ResponseWriter {
    pub fn new(wr: WriteSide) -> Self {
        Self {
            wr,
            buf: BytesMut::with_capacity(WRITE_BUFFER_BYTES),
            serving: None,
            low_priority: false,
        }
    }

    /// Have `threads` (when given) send the responses that carry records. TLS connections
    /// ignore them: their bytes pass through the record layer on the async worker.
    pub fn with_serving_threads(mut self, threads: Option<Arc<ServingThreads>>) -> Self {
        self.serving = threads
            .filter(|_| self.wr.plain_socket().is_some())
            .map(|threads| Serving {
                threads,
                sock: None,
            });
        self
    }

    /// Queue one response; it may stay buffered until [`flush`](Self::flush).
    pub async fn write(&mut self, response: Response) -> Result<u64, WireError> {
        let total = response.len();
        let size = u32::try_from(total)
            .map_err(|_| WireError::Malformed(format!("response of {total} bytes")))?;
        self.low_priority = response.records && self.serving.is_some();
        self.buf.extend_from_slice(&size.to_be_bytes());
        for chunk in response.chunks {
            match chunk {
                Chunk::Bytes(b) => {
                    if b.len() >= WRITE_BUFFER_BYTES {
                        self.send_buffer().await?;
                        self.send_bytes(b).await?;
                    } else {
                        self.buf.extend_from_slice(&b);
                    }
                }
                Chunk::File(slice) => self.write_file(slice).await?,
            }
            if self.buf.len() >= WRITE_BUFFER_BYTES {
                self.send_buffer().await?;
            }
        }
        if self.low_priority {
            // The rest of the records goes out at low priority too, not at the next flush.
            self.send_buffer().await?;
            self.low_priority = false;
        }
        Ok(total + 4)
    }

    pub async fn flush(&mut self) -> Result<(), WireError> {
        self.send_buffer().await?;
        // TLS keeps records in its own buffer until flushed; plain TCP has nothing to flush.
        self.wr.flush().await?;
        Ok(())
    }

    /// Write out (and empty) the buffer.
    async fn send_buffer(&mut self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if !self.low_priority {
            self.wr.write_all(&self.buf).await?;
            self.buf.clear();
            return Ok(());
        }
        let bytes = self.buf.split().freeze();
        let work = self.serve(Work::Bytes { bytes, at: 0 }).await?;
        // Keep the buffer's allocation when the serving thread has let go of it.
        if let Work::Bytes { bytes, .. } = work {
            if let Ok(mut buf) = bytes.try_into_mut() {
                buf.clear();
                self.buf = buf;
            }
        }
        Ok(())
    }

    /// Write `bytes` straight out (the buffer is empty).
    async fn send_bytes(&mut self, bytes: Bytes) -> Result<(), WireError> {
        if self.low_priority {
            self.serve(Work::Bytes { bytes, at: 0 }).await?;
        } else {
            self.wr.write_all(&bytes).await?;
        }
        Ok(())
    }

    async fn write_file(&mut self, slice: FileSlice) -> Result<(), WireError> {
        if let Some(fd) = slice.file.raw_fd() {
            if slice.len >= SENDFILE_MIN_BYTES
                && self.wr.raw_fd().is_some()
                && page_cache::resident(fd, slice.position, slice.len)
            {
                self.send_buffer().await?;
                let (at, end) = (slice.position, slice.position + slice.len);
                let work = Work::File { slice, at, end };
                if self.low_priority {
                    self.serve(work).await?;
                    return Ok(());
                }
                return self.sendfile(work).await;
            }
        }
        // TLS (the bytes must pass through the record layer), a range too small to be worth a
        // sendfile, or one not (known to be) in the page cache, which sendfile would wait for
        // on this async worker: copied a buffer at a time, each read on the blocking pool so
        // no async worker waits for the disk.
        let mut position = slice.position;
        let end = slice.position + slice.len;
        while position < end {
            let n = (end - position).min(WRITE_BUFFER_BYTES as u64) as usize;
            let (file, at) = (slice.file.clone(), position);
            let mut buf = std::mem::take(&mut self.buf);
            let (buf, read) = tokio::task::spawn_blocking(move || {
                let start = buf.len();
                buf.resize(start + n, 0);
                let read = file.read_exact_at(&mut buf[start..], at);
                (buf, read)
            })
            .await
            .map_err(|e| WireError::Io(io::Error::other(e)))?;
            self.buf = buf;
            read?;
            position += n as u64;
            if self.buf.len() >= WRITE_BUFFER_BYTES {
                self.send_buffer().await?;
            }
        }
        Ok(())
    }

    /// Send `work` from the serving threads, waiting on the reactor whenever the socket is
    /// full; the work back once all of it is sent.
    async fn serve(&mut self, mut work: Work) -> Result<Work, WireError> {
        let (Some(serving), Some(stream)) = (self.serving.as_mut(), self.wr.plain_socket()) else {
            return Err(WireError::Malformed(
                "serving threads on a TLS connection".into(),
            ));
        };
        let sock = match &serving.sock {
            Some(sock) => sock.clone(),
            None => {
                let sock = Arc::new(stream.as_fd().try_clone_to_owned()?);
                serving.sock = Some(sock.clone());
                sock
            }
        };
        loop {
            let (back, outcome) = serving.threads.run(sock.clone(), work).await?;
            work = back;
            if finished(outcome)? {
                return Ok(work);
            }
            until_writable(stream).await?;
        }
    }

    /// Send a file range from this task, on the reactor's readiness: the same non-blocking
    /// `sendfile` loop the serving threads run ([`serving::send`]).
    async fn sendfile(&mut self, mut work: Work) -> Result<(), WireError> {
        let Some(stream) = self.wr.plain_socket() else {
            return Err(WireError::Malformed("sendfile on a TLS connection".into()));
        };
        let sock = stream.as_raw_fd();
        loop {
            stream.writable().await?;
            // A full socket is WouldBlock to `try_io`, which then clears the readiness.
            let sent = stream.try_io(Interest::WRITABLE, || {
                match serving::send(sock, &mut work) {
                    Outcome::Blocked => Err(io::ErrorKind::WouldBlock.into()),
                    outcome => Ok(outcome),
                }
            });
            match sent {
                Ok(outcome) => {
                    if finished(outcome)? {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Whether work that ended with `outcome` is all sent (`false`: the socket was full, go on
/// once it is writable), or the error that ended it.
fn finished(outcome: Outcome) -> Result<bool, WireError> {
    match outcome {
        Outcome::Done => Ok(true),
        Outcome::Blocked => Ok(false),
        Outcome::ShortFile { missing } => Err(WireError::ShortFile { missing }),
        Outcome::Failed(e) => Err(e.into()),
    }
}

/// Wait until `stream` can take bytes. A serving thread met EAGAIN outside the reactor, so
/// the reactor may still think the socket writable: that is checked without waiting, and
/// only a check that fails clears the readiness (and only if no event came meanwhile, which
/// `try_io` ensures), so no wake-up is lost and no loop spins.
async fn until_writable(stream: &tokio::net::TcpStream) -> io::Result<()> {
    let sock = stream.as_raw_fd();
    loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || serving::writable_now(sock)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Whether a file range is in the page cache, asked without blocking: `sendfile` reads the
/// file inside the syscall, so on a cold page cache it would wait for the disk on the async
/// worker that calls it.
mod page_cache {
    use std::os::fd::RawFd;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// cachestat(2), Linux 6.5+; the same number on x86-64 and aarch64 (not yet in `libc`).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const SYS_CACHESTAT: libc::c_long = 451;

    #[repr(C)]
    struct CachestatRange {
        off: u64,
        len: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }

    /// Cleared when the kernel has no cachestat (older, or filtered by seccomp).
    static CACHESTAT: AtomicBool = AtomicBool::new(true);

    /// True when every page of `len` bytes at `position` of `fd` is cached. With cachestat
    /// this is exact at the time of the call; without it, the first and last byte are read
    /// with `RWF_NOWAIT`, which fails instead of waiting for the disk (the pages between are
    /// assumed to share their fate, as the log is written and evicted front to back). Either
    /// way a page may still be evicted before the `sendfile` that follows: a narrow window.
    pub(super) fn resident(fd: RawFd, position: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if CACHESTAT.load(Ordering::Relaxed) {
            match cachestat(fd, position, len) {
                Some(all) => return all,
                None => CACHESTAT.store(false, Ordering::Relaxed),
            }
        }
        probe(fd, position) && probe(fd, position + len - 1)
    }

    /// Whether all pages of the range are cached; None when cachestat is unavailable.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn cachestat(fd: RawFd, position: u64, len: u64) -> Option<bool> {
        let page = 4096u64;
        let pages = (position + len - 1) / page - position / page + 1;
        let range = CachestatRange { off: position, len };
        let mut stat = Cachestat::default();
        // SAFETY: both pointers are to live locals of the layouts the syscall expects; an
        // invalid fd only makes it fail.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                fd as libc::c_uint,
                &range as *const CachestatRange,
                &mut stat as *mut Cachestat,
                0 as libc::c_uint,
            )
        };
        if rc == 0 {
            return Some(stat.nr_cache >= pages);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EPERM) => None,
            // Any other failure (a file cachestat does not cover): not known to be cached.
            _ => Some(false),
        }
    }

    /// Whether the byte at `position` can be read without waiting for the disk.
    fn probe(fd: RawFd, position: u64) -> bool {
        let mut byte = 0u8;
        let iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        // SAFETY: one iovec describing a live local byte; an invalid fd only makes it fail.
        let n = unsafe { libc::preadv2(fd, &iov, 1, position as libc::off_t, libc::RWF_NOWAIT) };
        n == 1
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]
        use std::io::Write;
        use std::os::fd::AsRawFd;

        use super::*;

        #[test]
        fn a_file_just_written_is_resident() {
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&vec![7u8; 3 * 4096 + 100]).unwrap();
            let fd = file.as_raw_fd();
            assert!(resident(fd, 0, 3 * 4096 + 100));
            assert!(resident(fd, 4000, 200));
            // Past the end of the file there is nothing cached.
            assert!(!resident(fd, 64 * 4096, 4096));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::future::{poll_fn, Future};
    use std::task::Poll;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Steps until `done` holds for the reader; fails on a frame or an error.
    async fn step_until<R: AsyncRead + ArrivedBytes + Unpin>(
        reader: &mut FrameReader,
        rd: &mut R,
        pool: &RequestPool,
        done: impl Fn(&FrameReader) -> bool,
    ) {
        while !done(reader) {
            assert!(matches!(
                reader.step(rd, pool).await.unwrap(),
                Step::Progress
            ));
        }
    }

    /// Step until a whole frame is in.
    async fn next_frame<R: AsyncRead + ArrivedBytes + Unpin>(
        reader: &mut FrameReader,
        rd: &mut R,
        pool: &RequestPool,
    ) -> Bytes {
        loop {
            match reader.step(rd, pool).await.unwrap() {
                Step::Progress => {}
                Step::Frame(frame, _reservation) => return frame,
                Step::Eof => panic!("end of stream inside a frame"),
            }
        }
    }

    fn received(reader: &FrameReader) -> usize {
        reader.body.as_ref().map_or(0, |b| b.buf.len())
    }

    #[tokio::test]
    async fn buffer_grows_with_the_bytes_that_arrived_not_the_declared_size() {
        let pool = RequestPool::new(64 << 20);
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(32 << 20);
        let declared = 32usize << 20;
        client
            .write_all(&(declared as i32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&vec![7u8; 100_000]).await.unwrap();
        step_until(&mut reader, &mut server, &pool, |r| received(r) == 100_000).await;
        let capacity = reader.body.as_ref().unwrap().buf.capacity();
        assert!(
            capacity <= 2 * 100_000 + FRAME_BUFFER_STEP,
            "capacity {capacity}"
        );
        // The whole declared size is reserved from the pool all the same.
        assert_eq!(pool.available(), (64 << 20) - declared);

        let writer = tokio::spawn(async move {
            client
                .write_all(&vec![9u8; declared - 100_000])
                .await
                .unwrap();
            client
        });
        let frame = loop {
            match reader.step(&mut server, &pool).await.unwrap() {
                Step::Progress => {}
                Step::Frame(frame, reservation) => {
                    drop(reservation);
                    break frame;
                }
                Step::Eof => panic!("end of stream inside a frame"),
            }
        };
        assert_eq!(frame.len(), declared);
        assert!(frame[..100_000].iter().all(|&b| b == 7));
        assert!(frame[100_000..].iter().all(|&b| b == 9));
        assert_eq!(pool.available(), 64 << 20);
        drop(writer.await.unwrap());
        assert!(matches!(
            reader.step(&mut server, &pool).await.unwrap(),
            Step::Eof
        ));
    }

    #[tokio::test]
    async fn after_a_whole_frame_the_next_start_at_its_size_and_no_larger() {
        let pool = RequestPool::new(64 << 20);
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(32 << 20);
        let first = 300_000usize;
        client
            .write_all(&(first as i32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&vec![1u8; first]).await.unwrap();
        let frame = next_frame(&mut reader, &mut server, &pool).await;
        assert_eq!(frame.len(), first);
        // A frame like it, arriving in parts: one buffer of its size from the first bytes.
        client
            .write_all(&(first as i32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&vec![2u8; 100_000]).await.unwrap();
        step_until(&mut reader, &mut server, &pool, |r| received(r) == 100_000).await;
        assert_eq!(reader.body.as_ref().unwrap().buf.capacity(), first);
        client.write_all(&vec![2u8; first - 100_000]).await.unwrap();
        let frame = next_frame(&mut reader, &mut server, &pool).await;
        assert!(frame.len() == first && frame.iter().all(|&b| b == 2));
        // A larger declared frame that stalls costs no more than the largest whole one.
        let declared = 32usize << 20;
        client
            .write_all(&(declared as i32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&vec![3u8; 100_000]).await.unwrap();
        step_until(&mut reader, &mut server, &pool, |r| received(r) == 100_000).await;
        assert_eq!(reader.body.as_ref().unwrap().buf.capacity(), first);
    }

    /// A connected pair of real sockets: the client's stream and the server's read half.
    async fn tcp_pair() -> (
        tokio::net::TcpStream,
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (rd, wr) = server.into_split();
        (client, rd, wr)
    }

    /// Wait (bounded) until the kernel holds `n` unread bytes for `rd`.
    async fn until_arrived(rd: &tokio::net::tcp::OwnedReadHalf, n: usize) {
        for _ in 0..10_000 {
            if rd.arrived_bytes() == Some(n) {
                return;
            }
            tokio::task::yield_now().await;
            rd.readable().await.unwrap();
        }
        panic!("{n} bytes never arrived: {:?}", rd.arrived_bytes());
    }

    #[tokio::test]
    async fn a_frame_received_whole_is_read_into_one_allocation() {
        let pool = RequestPool::new(64 << 20);
        let (mut client, mut rd, _wr) = tcp_pair().await;
        // Above the first growth step, within what a fresh socket buffers (128 KiB and up).
        let size = FRAME_BUFFER_STEP + 30_000;
        client
            .write_all(&(size as i32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&vec![5u8; size]).await.unwrap();
        until_arrived(&rd, 4 + size).await;
        let mut reader = FrameReader::new(32 << 20);
        let mut capacities = Vec::new();
        let frame = loop {
            match reader.step(&mut rd, &pool).await.unwrap() {
                Step::Progress => {
                    if let Some(b) = reader.body.as_ref().filter(|b| !b.buf.is_empty()) {
                        capacities.push(b.buf.capacity());
                    }
                }
                Step::Frame(frame, _reservation) => break frame,
                Step::Eof => panic!("end of stream inside a frame"),
            }
        };
        assert_eq!(frame.len(), size);
        assert!(frame.iter().all(|&b| b == 5));
        // Either the first read took it all, or every read so far went into the one buffer.
        assert!(
            capacities.iter().all(|&c| c == size),
            "buffer capacities while reading: {capacities:?}"
        );
    }

    #[tokio::test]
    async fn on_a_socket_the_buffer_still_grows_with_what_arrived_not_the_declared_size() {
        let pool = RequestPool::new(64 << 20);
        let (mut client, mut rd, _wr) = tcp_pair().await;
        let declared = 32usize << 20;
        client
            .write_all(&(declared as i32).to_be_bytes())
            .await
            .unwrap();
        client.write_all(&vec![7u8; 100_000]).await.unwrap();
        let mut reader = FrameReader::new(32 << 20);
        step_until(&mut reader, &mut rd, &pool, |r| r.body.is_some()).await;
        until_arrived(&rd, 100_000).await;
        step_until(&mut reader, &mut rd, &pool, |r| received(r) == 100_000).await;
        let capacity = reader.body.as_ref().unwrap().buf.capacity();
        assert!(
            capacity <= 2 * 100_000 + FRAME_BUFFER_STEP,
            "capacity {capacity}"
        );
    }

    #[tokio::test]
    async fn a_frame_the_pool_cannot_cover_waits_before_reading_its_body() {
        let pool = RequestPool::new(1000);
        let held = pool.try_reserve(600).unwrap();
        let (mut client, mut server) = tokio::io::duplex(4096);
        let mut reader = FrameReader::new(1000);
        client.write_all(&500i32.to_be_bytes()).await.unwrap();
        client.write_all(&[1u8; 500]).await.unwrap();
        step_until(&mut reader, &mut server, &pool, |r| r.body.is_some()).await;
        {
            let step = reader.step(&mut server, &pool);
            tokio::pin!(step);
            let polled = poll_fn(|cx| Poll::Ready(step.as_mut().poll(cx).is_pending())).await;
            assert!(polled, "the reservation must wait for pool memory");
        }
        assert_eq!(
            received(&reader),
            0,
            "no body byte read while the pool is short"
        );
        drop(held);
        let frame = loop {
            if let Step::Frame(frame, _reservation) = reader.step(&mut server, &pool).await.unwrap()
            {
                break frame;
            }
        };
        assert_eq!(frame.len(), 500);
    }

    /// A segment file of `len` bytes of a known pattern, and its content.
    fn segment(dir: &std::path::Path, len: u64) -> (Arc<dyn qanat_log::LogFile>, Vec<u8>) {
        use qanat_log::{OsStorage, Storage};
        let file = OsStorage.open(&dir.join("segment.log")).unwrap();
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        file.append(&content).unwrap();
        (file, content)
    }

    /// Everything the client reads until the writer's side closes.
    fn read_all(mut client: tokio::net::TcpStream) -> tokio::task::JoinHandle<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        tokio::spawn(async move {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        })
    }

    // A large range, then a small one, between bytes in memory: what the client reads is the
    // frames as encoded, byte for byte and in order; on the async worker and from serving
    // threads alike.
    #[tokio::test]
    async fn file_ranges_reach_the_client_whole_and_in_order() {
        for threads in [None, Some(Arc::new(ServingThreads::start(1, 19).unwrap()))] {
            let dir = tempfile::tempdir().unwrap();
            let (file, content) = segment(dir.path(), 3 << 20);
            let big = FileSlice {
                file: file.clone(),
                position: 100,
                len: (2 << 20) + 7,
            };
            let small = FileSlice {
                file: file.clone(),
                position: 3,
                len: SENDFILE_MIN_BYTES + 1,
            };
            let (client, _rd, wr) = tcp_pair().await;
            let reader = read_all(client);
            let mut writer =
                ResponseWriter::new(WriteSide::Plain(wr)).with_serving_threads(threads.clone());
            let first = Response {
                chunks: vec![
                    Chunk::Bytes(Bytes::from_static(b"head")),
                    Chunk::File(big.clone()),
                    Chunk::Bytes(Bytes::from_static(b"tail")),
                ],
                records: true,
            };
            let second = Response {
                chunks: vec![Chunk::File(small.clone()), Chunk::File(big.clone())],
                records: true,
            };
            // Not records: stays on the async worker, between two that do not.
            let third = Response::from_bytes(Bytes::from_static(b"plain"));
            writer.write(first).await.unwrap();
            writer.write(third).await.unwrap();
            writer.write(second).await.unwrap();
            writer.flush().await.unwrap();
            drop(writer);
            let received = reader.await.unwrap();

            let range =
                |s: &FileSlice| &content[s.position as usize..(s.position + s.len) as usize];
            let mut expected = Vec::new();
            expected.extend_from_slice(&((big.len + 8) as u32).to_be_bytes());
            expected.extend_from_slice(b"head");
            expected.extend_from_slice(range(&big));
            expected.extend_from_slice(b"tail");
            expected.extend_from_slice(&5u32.to_be_bytes());
            expected.extend_from_slice(b"plain");
            expected.extend_from_slice(&((small.len + big.len) as u32).to_be_bytes());
            expected.extend_from_slice(range(&small));
            expected.extend_from_slice(range(&big));
            assert_eq!(received.len(), expected.len());
            assert!(received == expected, "the bytes differ");
            if let Some(threads) = threads {
                // Both record responses whole, and the plain one before them on the buffer.
                let records = (big.len + 12) + (4 + small.len + big.len);
                assert_eq!(threads.bytes_sent(), records + 9);
            }
        }
    }

    // A FetchResponse with file ranges, sent by the serving threads, is what kafka-protocol's
    // own encoder makes of the same records, byte for byte.
    #[tokio::test]
    async fn fetch_response_from_serving_threads_matches_the_reference_encoder() {
        use crate::fetch_response::{encode, PartitionOut, TopicOut};
        use kafka_protocol::messages::fetch_response::{
            FetchResponse, FetchableTopicResponse, PartitionData,
        };
        use kafka_protocol::messages::{ResponseHeader, TopicName};
        use kafka_protocol::protocol::{Encodable, StrBytes};

        let dir = tempfile::tempdir().unwrap();
        let (file, content) = segment(dir.path(), 1 << 20);
        let threads = Arc::new(ServingThreads::start(2, 19).unwrap());
        for version in crate::fetch_response::VERSIONS {
            let ranges = [(10u64, 600_000u64), (700_000, 1000), (701_000, 40_000)];
            let records = ranges
                .iter()
                .map(|&(position, len)| {
                    Chunk::File(FileSlice {
                        file: file.clone(),
                        position,
                        len,
                    })
                })
                .collect();
            let ours = encode(
                version,
                31,
                0,
                vec![TopicOut {
                    name: "orders".into(),
                    partitions: vec![PartitionOut {
                        index: 2,
                        error_code: 0,
                        high_watermark: 99,
                        log_start_offset: 0,
                        records,
                    }],
                }],
            );
            assert!(ours.records);
            let (client, _rd, wr) = tcp_pair().await;
            let reader = read_all(client);
            let before = threads.bytes_sent();
            let mut writer = ResponseWriter::new(WriteSide::Plain(wr))
                .with_serving_threads(Some(threads.clone()));
            let written = writer.write(ours).await.unwrap();
            writer.flush().await.unwrap();
            drop(writer);
            let received = reader.await.unwrap();
            assert_eq!(threads.bytes_sent() - before, written, "version {version}");

            let mut bytes = Vec::new();
            for &(position, len) in &ranges {
                bytes.extend_from_slice(&content[position as usize..(position + len) as usize]);
            }
            let partition = PartitionData::default()
                .with_partition_index(2)
                .with_high_watermark(99)
                .with_last_stable_offset(99)
                .with_log_start_offset(0)
                .with_aborted_transactions(Some(vec![]))
                .with_preferred_read_replica((-1).into())
                .with_records(Some(Bytes::from(bytes)));
            let theirs =
                FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
                    .with_topic(TopicName(StrBytes::from_static_str("orders")))
                    .with_partitions(vec![partition])]);
            let mut body = BytesMut::new();
            ResponseHeader::default()
                .with_correlation_id(31)
                .encode(&mut body, if version >= 12 { 1 } else { 0 })
                .unwrap();
            theirs.encode(&mut body, version).unwrap();
            let mut expected = (body.len() as u32).to_be_bytes().to_vec();
            expected.extend_from_slice(&body);
            assert!(received == expected, "version {version}: the bytes differ");
        }
    }

    // One serving thread; a client that reads nothing has a response far larger than the
    // socket buffers pending. Another connection's responses still go out whole, and the
    // stalled one completes once its client reads.
    #[tokio::test]
    async fn a_reader_that_stops_reading_does_not_hold_up_other_connections() {
        let dir = tempfile::tempdir().unwrap();
        let (file, content) = segment(dir.path(), 48 << 20);
        let threads = Arc::new(ServingThreads::start(1, 19).unwrap());
        let whole = |len: u64| Response {
            chunks: vec![Chunk::File(FileSlice {
                file: file.clone(),
                position: 0,
                len,
            })],
            records: true,
        };

        let (slow_client, _slow_rd, slow_wr) = tcp_pair().await;
        let mut slow = ResponseWriter::new(WriteSide::Plain(slow_wr))
            .with_serving_threads(Some(threads.clone()));
        let big = whole(48 << 20);
        let stalled = tokio::spawn(async move {
            slow.write(big).await.unwrap();
            slow.flush().await.unwrap();
        });
        // Wait until the slow connection has blocked: its socket took what it could.
        while threads.bytes_sent() == 0 {
            tokio::task::yield_now().await;
        }

        for _ in 0..3 {
            let (client, _rd, wr) = tcp_pair().await;
            let reader = read_all(client);
            let mut writer = ResponseWriter::new(WriteSide::Plain(wr))
                .with_serving_threads(Some(threads.clone()));
            writer.write(whole(1 << 20)).await.unwrap();
            writer.flush().await.unwrap();
            drop(writer);
            let received = reader.await.unwrap();
            assert_eq!(&received[4..], &content[..1 << 20]);
        }
        assert!(!stalled.is_finished(), "48 MiB fit in the socket buffers");

        let slow_reader = read_all(slow_client);
        stalled.await.unwrap();
        let received = slow_reader.await.unwrap();
        assert_eq!(received.len(), 4 + (48 << 20));
        assert!(received[4..] == content[..], "the stalled response differs");
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let pool = RequestPool::new(1 << 20);
        let (mut client, mut server) = tokio::io::duplex(4096);
        let mut reader = FrameReader::new(1000);
        client.write_all(&1001i32.to_be_bytes()).await.unwrap();
        let err = loop {
            match reader.step(&mut server, &pool).await {
                Ok(Step::Progress) => {}
                Ok(_) => panic!("an oversized frame was accepted"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, WireError::FrameSize { size: 1001, .. }));
        assert_eq!(pool.available(), 1 << 20);

        let (mut client, mut server) = tokio::io::duplex(4096);
        let mut reader = FrameReader::new(1000);
        client.write_all(&100i32.to_be_bytes()).await.unwrap();
        client.write_all(&[0u8; 10]).await.unwrap();
        drop(client);
        let err = loop {
            match reader.step(&mut server, &pool).await {
                Ok(Step::Progress) => {}
                Ok(_) => panic!("a truncated frame was accepted"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, WireError::Io(ref e) if e.kind() == io::ErrorKind::UnexpectedEof));
        drop(reader);
        assert_eq!(pool.available(), 1 << 20);
    }
}
