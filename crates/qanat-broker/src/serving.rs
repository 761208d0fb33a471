//! Serving threads: the kernel work of sending record data to consumers, at lowered
//! scheduling priority, so that readers do not slow down writers (A6).
//!
//! Sending a fetch's records costs the broker CPU in the kernel (`sendfile` and socket copies,
//! and on loopback the receiving side's TCP work too), proportional to the bytes read. On the
//! async workers that CPU competes as an equal with the produce path (receive, append,
//! acknowledge); many consumer groups tailing a topic then slow its producers down. Here a
//! few OS threads with a raised nice value do those writes instead: when the CPU is short
//! the produce path wins, and readers fall behind rather than writers slowing down.
//!
//! A connection's writer ([`crate::wire::ResponseWriter`]) hands one piece of work at a time
//! (bytes, or a file range for `sendfile`) and awaits its outcome.
//!
//! Invariants:
//! - A serving thread never blocks on a socket: every write is non-blocking, and on EAGAIN
//!   the work goes back to its connection with its progress; the connection waits for
//!   writability on the async reactor and hands in the rest. A reader that stops reading
//!   never holds a serving thread, nor delays other connections beyond the work queued.
//! - Work holds its own duplicate of the socket descriptor and an `Arc` of its file, so
//!   neither is closed (nor its number reused) while a thread writes, even when the
//!   connection is dropped meanwhile.
//! - A connection has at most one piece of work in flight and hands in the next only once it
//!   is done: the bytes of a connection leave in order.
//! - Serving threads only write what the page cache holds (non-resident ranges are read on
//!   the blocking pool first, see [`crate::wire`]): they never wait for the disk.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use qanat_log::FileSlice;
use tokio::sync::oneshot;

/// Most bytes one `sendfile` call is asked for (the kernel caps it near 2 GiB anyway).
const SENDFILE_STEP: usize = 1 << 30;

/// What a serving thread sends on one socket.
pub enum Work {
    /// `bytes[at..]`.
    Bytes { bytes: Bytes, at: usize },
    /// The file range `[at, end)` of `slice.file`.
    File { slice: FileSlice, at: u64, end: u64 },
}

impl Work {
    fn remaining(&self) -> u64 {
        match self {
            Work::Bytes { bytes, at } => (bytes.len() - at) as u64,
            Work::File { at, end, .. } => end - at,
        }
    }
}

/// How a piece of work ended on its serving thread.
#[derive(Debug)]
pub enum Outcome {
    /// Every byte was sent.
    Done,
    /// The socket's send buffer is full; the work holds what is left.
    Blocked,
    /// The file ended this many bytes before the range did.
    ShortFile {
        missing: u64,
    },
    Failed(io::Error),
}

struct Job {
    sock: Arc<OwnedFd>,
    work: Work,
    queued: Instant,
    done: oneshot::Sender<(Work, Outcome)>,
}

/// A pool of serving threads; they exit once this is dropped and their queue is empty.
pub struct ServingThreads {
    queue: mpsc::Sender<Job>,
    /// Bytes the threads have sent, all sockets together.
    sent: Arc<AtomicU64>,
}

impl std::fmt::Debug for ServingThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingThreads").finish_non_exhaustive()
    }
}

impl ServingThreads {
    /// Start `threads` serving threads (at least one) at nice value `nice`.
    pub fn start(threads: u32, nice: i32) -> io::Result<Self> {
        let (queue, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let sent = Arc::new(AtomicU64::new(0));
        for i in 0..threads.max(1) {
            let (rx, sent) = (rx.clone(), sent.clone());
            std::thread::Builder::new()
                .name(format!("qanat-serve-{i}"))
                .spawn(move || serve(&rx, &sent, nice))?;
        }
        Ok(Self { queue, sent })
    }

    /// Bytes sent so far, all sockets together.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Send `work` on `sock` from a serving thread: the work back (with its progress) and
    /// how it ended. The socket must be non-blocking.
    pub async fn run(&self, sock: Arc<OwnedFd>, work: Work) -> io::Result<(Work, Outcome)> {
        let (done, outcome) = oneshot::channel();
        let job = Job {
            sock,
            work,
            queued: Instant::now(),
            done,
        };
        if self.queue.send(job).is_err() {
            return Err(io::Error::other("the serving threads have stopped"));
        }
        outcome
            .await
            .map_err(|_| io::Error::other("a serving thread dropped its work"))
    }
}

/// A serving thread: lower its priority, then run work until the pool is dropped.
fn serve(rx: &Mutex<mpsc::Receiver<Job>>, sent: &AtomicU64, nice: i32) {
    if let Err(e) = lower_priority(nice) {
        tracing::warn!(nice, error = %e, "cannot lower a serving thread's priority");
    }
    loop {
        // One thread waits on the queue at a time; the others wait for the lock.
        let job = match rx.lock().recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        metrics::histogram!("qanat_serving_wait_seconds").record(job.queued.elapsed());
        let mut work = job.work;
        let before = work.remaining();
        let outcome = send(job.sock.as_raw_fd(), &mut work);
        let bytes = before - work.remaining();
        sent.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!("qanat_serving_bytes_total").increment(bytes);
        if matches!(outcome, Outcome::Blocked) {
            metrics::counter!("qanat_serving_blocked_total").increment(1);
        }
        // The connection may be gone (its writer dropped); the work is then simply dropped.
        let _ = job.done.send((work, outcome));
    }
}

/// Set this thread's nice value (Linux schedules threads individually).
fn lower_priority(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority only reads its integer arguments.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Send what `work` holds on the non-blocking socket `sock` until done or the socket is full.
pub(crate) fn send(sock: RawFd, work: &mut Work) -> Outcome {
    loop {
        let sent = match work {
            Work::Bytes { bytes, at } => {
                if *at == bytes.len() {
                    return Outcome::Done;
                }
                let rest = &bytes[*at..];
                // SAFETY: `rest` is valid for reads of its length for the call; an invalid
                // or closed socket only makes send fail.
                let n = unsafe {
                    libc::send(
                        sock,
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    *at += n as usize;
                }
                n
            }
            Work::File { slice, at, end } => {
                if *at == *end {
                    return Outcome::Done;
                }
                let Some(fd) = slice.file.raw_fd() else {
                    return Outcome::Failed(io::Error::other("a file range without a descriptor"));
                };
                let mut offset = *at as libc::off_t;
                let count = ((*end - *at) as usize).min(SENDFILE_STEP);
                // SAFETY: the file is kept open by the slice's Arc and the socket by the job's
                // descriptor; `offset` is a valid pointer to a local.
                let n = unsafe { libc::sendfile(sock, fd, &mut offset, count) };
                if n == 0 {
                    return Outcome::ShortFile {
                        missing: *end - *at,
                    };
                }
                if n > 0 {
                    *at = offset as u64;
                }
                n
            }
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Outcome::Blocked,
                io::ErrorKind::Interrupted => {}
                _ => return Outcome::Failed(e),
            }
        }
    }
}

/// Whether `sock` can take bytes now (or has an error the next write will report), asked
/// without waiting.
pub(crate) fn writable_now(sock: RawFd) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: sock,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd, a live local; timeout 0 never waits.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if pfd.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 {
        Ok(())
    } else {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The nice value of the calling thread.
    fn own_nice() -> i32 {
        // SAFETY: gettid has no preconditions; getpriority only reads its arguments.
        unsafe {
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
        }
    }

    #[test]
    fn serving_threads_run_at_the_configured_nice_value() {
        let base = own_nice();
        let (tx, rx) = std::sync::mpsc::channel();
        let pool = Arc::new(Mutex::new({
            let (queue, jobs) = mpsc::channel::<Job>();
            drop(queue);
            jobs
        }));
        let target = (base + 7).min(19);
        std::thread::spawn(move || {
            serve(&pool, &AtomicU64::new(0), target);
            tx.send(own_nice()).unwrap();
        });
        assert_eq!(rx.recv().unwrap(), target);
        // Only the serving thread changed.
        assert_eq!(own_nice(), base);
    }
}
