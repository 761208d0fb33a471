//! Serving HTTP/1.1 connections, bounded against slow and abusive clients.
//!
//! Invariants:
//! * A connection that has not sent a request's complete headers within
//!   `header_read_timeout_ms` of starting to wait for them (a new connection, or an idle
//!   keep-alive one once its last response is made) is closed, however slowly it trickles
//!   bytes: slowloris clients cannot hold descriptors for long. The deadline is kept per
//!   connection by one timer that is only re-armed when it fires ([`HeaderClock`]): a request
//!   costs two stores, not a timer registered and cancelled (hyper's own header timeout).
//! * At most `max_connections` connections are open; further clients wait in the listen
//!   backlog until one closes.
//! * When accepting fails (descriptors exhausted: EMFILE/ENFILE, or memory), the loop pauses,
//!   doubling from 10 ms to 1 s, instead of spinning, and logs at most once per 10 s with the
//!   count of failures in between; it serves again as soon as descriptors are free.
//! * Shutdown stops accepting at once, lets requests in flight finish and closes idle
//!   connections.
//! * With TLS, the handshake runs in the connection's own task (a slow handshake holds only
//!   its own permit) and must finish within `header_read_timeout`.
//! * Connections are served by `workers` threads, each with a single-threaded runtime of its
//!   own, handed out in turn by the accept loop; a connection stays on its thread for its
//!   life, registered with that thread's own reactor. A request then never crosses threads
//!   (no work-stealing wakeups, one epoll set per thread), as in nginx's worker processes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

const FIRST_ACCEPT_PAUSE: Duration = Duration::from_millis(10);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Threads serving connections; at least one.
    pub workers: usize,
}

type Connection = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The threads that serve connections, each running the connections handed to it on a
/// single-threaded runtime until they close.
struct Workers {
    queues: Vec<mpsc::UnboundedSender<Connection>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: usize,
}

impl Workers {
    fn start(n: usize) -> io::Result<Workers> {
        let mut queues = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = mpsc::unbounded_channel::<Connection>();
            let thread = std::thread::Builder::new()
                .name(format!("qanat-http-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let mut open = JoinSet::new();
                        loop {
                            tokio::select! {
                                c = rx.recv() => match c {
                                    Some(c) => {
                                        open.spawn(c);
                                    }
                                    None => break,
                                },
                                Some(_) = open.join_next(), if !open.is_empty() => {}
                            }
                        }
                        // No new connections: finish the open ones.
                        while open.join_next().await.is_some() {}
                    });
                })?;
            queues.push(tx);
            threads.push(thread);
        }
        Ok(Workers {
            queues,
            threads,
            next: 0,
        })
    }

    /// Hand a connection to the next worker in turn (to the calling runtime should that
    /// worker be gone).
    fn spawn(&mut self, connection: Connection) {
        let queue = self.queues.get(self.next % self.queues.len().max(1));
        self.next = self.next.wrapping_add(1);
        let refused = match queue {
            Some(q) => q.send(connection).err().map(|e| e.0),
            None => Some(connection),
        };
        if let Some(c) = refused {
            tokio::spawn(c);
        }
    }

    /// Let the workers finish their connections and exit.
    async fn stop(self) {
        drop(self.queues);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a connection worker panicked");
                }
            }
        })
        .await;
    }
}

/// Since when a connection has been waiting for a request's headers, or that it is busy with
/// a request: written by its service around each request, read by its deadline timer.
#[derive(Debug)]
struct HeaderClock {
    base: Instant,
    /// Milliseconds after `base`, or [`HeaderClock::BUSY`].
    waiting_since_ms: AtomicU64,
}

impl HeaderClock {
    const BUSY: u64 = u64::MAX;

    fn new() -> HeaderClock {
        HeaderClock {
            base: Instant::now(),
            waiting_since_ms: AtomicU64::new(0),
        }
    }

    fn busy(&self) {
        self.waiting_since_ms.store(Self::BUSY, Ordering::Relaxed);
    }

    fn waiting(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(Self::BUSY - 1);
        self.waiting_since_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection is due to be closed, if it is waiting for headers.
    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        match self.waiting_since_ms.load(Ordering::Relaxed) {
            Self::BUSY => None,
            ms => Some(self.base + Duration::from_millis(ms) + timeout),
        }
    }

    /// Resolves once the connection has waited `timeout` for a request's headers. The one
    /// timer sleeps to the earliest possible deadline and, when that has moved on (requests
    /// came meanwhile), sleeps again to the new one.
    async fn expired(&self, timeout: Duration) {
        let sleep = tokio::time::sleep(timeout);
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().await;
            let now = Instant::now();
            match self.deadline(timeout) {
                Some(d) if d <= now => return,
                Some(d) => sleep.as_mut().reset(d.into()),
                None => sleep.as_mut().reset((now + timeout).into()),
            }
        }
    }
}

/// A connection's service, marking on its [`HeaderClock`] when each request is in hand and
/// when its response is made.
struct Clocked<S> {
    inner: S,
    clock: Arc<HeaderClock>,
}

impl<S, R> hyper::service::Service<R> for Clocked<S>
where
    S: hyper::service::Service<R>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ClockedFuture<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        self.clock.busy();
        ClockedFuture {
            inner: self.inner.call(req),
            clock: self.clock.clone(),
        }
    }
}

struct ClockedFuture<F> {
    inner: F,
    clock: Arc<HeaderClock>,
}

impl<F: Future + Unpin> Future for ClockedFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let out = Pin::new(&mut self.inner).poll(cx);
        if out.is_ready() {
            self.clock.waiting();
        }
        out
    }
}

/// Serve one connection (plain or TLS) until it closes, shutdown closes it, or it has waited
/// `header_read_timeout` for a request's headers.
async fn serve_io<I, S>(
    builder: http1::Builder,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    header_read_timeout: Duration,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<axum::http::Request<Incoming>, Response = axum::response::Response>
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let clock = Arc::new(HeaderClock::new());
    let service = Clocked {
        inner: service,
        clock: clock.clone(),
    };
    tokio::select! {
        served = watcher.watch(builder.serve_connection(io, service)) => served,
        () = clock.expired(header_read_timeout) => {
            tracing::debug!("request headers not received in time; connection closed");
            Ok(())
        }
    }
}

/// Serve on `listener` until `shutdown` resolves, then finish what is in flight. Each
/// connection is served by the service `connection_service` makes for its peer's address.
pub async fn serve<F, M, S>(
    listener: TcpListener,
    connection_service: M,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: F,
) where
    F: Future<Output = ()> + Send + 'static,
    M: Fn(SocketAddr) -> S,
    S: hyper::service::Service<axum::http::Request<Incoming>, Response = axum::response::Response>
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    // The header deadline is kept by `serve_io`, more cheaply than hyper's per-request timer.
    builder.header_read_timeout(None);
    let open = metrics::gauge!("qanat_collect_connections");
    let accept_errors = metrics::counter!("qanat_collect_accept_errors_total");
    let mut backoff = AcceptBackoff::default();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut workers = match Workers::start(limits.workers) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, "starting connection workers failed; serving on the main runtime");
            None
        }
    };
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff.reset();
                a
            }
            // The client gave up before we took it: nothing wrong here.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                accept_errors.increment(1);
                let (pause, log) = backoff.on_error(Instant::now());
                if let Some(suppressed) = log {
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, failures_since_last_log = suppressed, "accepting connections failed (descriptors exhausted?): backing off");
                }
                drop(permit);
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let service = connection_service(peer);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        let header_timeout = limits.header_read_timeout;
        let open = open.clone();
        // Out of this runtime's reactor, into the serving worker's (below): readiness then
        // reaches the connection's task on its own thread, instead of passing through this
        // runtime's event loop and a cross-thread wakeup for every request.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "detaching an accepted connection failed");
                continue;
            }
        };
        open.increment(1.0);
        let connection = Box::pin(async move {
            let served = match (tokio::net::TcpStream::from_std(stream), tls) {
                (Err(e), _) => {
                    tracing::debug!(%peer, error = %e, "registering a connection failed");
                    Ok(())
                }
                (Ok(stream), None) => {
                    serve_io(
                        builder,
                        TokioIo::new(stream),
                        service,
                        watcher,
                        header_timeout,
                    )
                    .await
                }
                (Ok(stream), Some(acceptor)) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            serve_io(builder, TokioIo::new(tls), service, watcher, header_timeout)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
            open.decrement(1.0);
            drop(permit);
        });
        match workers.as_mut() {
            Some(w) => w.spawn(connection),
            None => {
                tokio::spawn(connection);
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
    if let Some(w) = workers {
        w.stop().await;
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Pauses after failed accepts and when to say so.
#[derive(Debug)]
struct AcceptBackoff {
    pause: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            pause: FIRST_ACCEPT_PAUSE,
            last_log: None,
            unlogged: 0,
        }
    }
}

impl AcceptBackoff {
    /// A failed accept at `now`: how long to pause, and `Some(failures not logged before this
    /// one)` when this one should be logged.
    fn on_error(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(MAX_ACCEPT_PAUSE);
        let due = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= ACCEPT_LOG_INTERVAL);
        if due {
            self.last_log = Some(now);
            (pause, Some(std::mem::take(&mut self.unlogged)))
        } else {
            self.unlogged += 1;
            (pause, None)
        }
    }

    /// An accept succeeded: the next failure pauses briefly again (but is logged only when
    /// the interval has passed, so a flapping limit does not flood the log).
    fn reset(&mut self) {
        self.pause = FIRST_ACCEPT_PAUSE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_and_log_once_per_interval() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        let mut pauses = Vec::new();
        let mut logged = Vec::new();
        for i in 0..10u32 {
            let (pause, log) = b.on_error(t0 + Duration::from_millis(u64::from(i)));
            pauses.push(pause.as_millis());
            logged.push(log);
        }
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert_eq!(logged[0], Some(0));
        assert!(logged[1..].iter().all(Option::is_none), "{logged:?}");
        // The next log, an interval later, says how many failures went unlogged.
        let (_, log) = b.on_error(t0 + ACCEPT_LOG_INTERVAL);
        assert_eq!(log, Some(9));
        b.reset();
        let (pause, log) = b.on_error(t0 + ACCEPT_LOG_INTERVAL + Duration::from_millis(1));
        assert_eq!(pause, FIRST_ACCEPT_PAUSE);
        assert_eq!(log, None);
    }
}
