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
//! * A plain connection starts on the fast path ([`FastPath`]): requests are parsed in place
//!   (`httparse`, as hyper does) and answered straight into the connection's write buffer,
//!   pipelined requests in one write. The first request the fast path does not take (another
//!   path, a body, `Transfer-Encoding`, `Expect`, an upgrade, HTTP/1.0, a head that does not
//!   parse or is larger than [`FAST_MAX_HEAD`]) hands the connection to hyper for the rest
//!   of its life, with every byte not yet answered replayed first; so every request the fast
//!   path leaves is answered, or refused, exactly as before. TLS connections are hyper's.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
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

/// The largest request head the fast path waits for; a longer one is hyper's (which allows
/// up to about 400 KiB and answers 431 beyond).
pub const FAST_MAX_HEAD: usize = 64 * 1024;
/// Headers the fast path parses; a request with more is hyper's.
const FAST_MAX_HEADERS: usize = 32;

/// Requests a connection's service answers itself, from the parsed head, without hyper.
pub trait FastPath {
    /// Write the response to `head` into `out` and return true, or return false (writing
    /// nothing) to leave this request, and the connection, to hyper.
    fn answer(&self, head: &Head<'_>, out: &mut Answers) -> bool;
}

/// A request head the fast path may answer: HTTP/1.1, GET or POST, no body, an origin-form
/// target of visible ASCII.
#[derive(Debug)]
pub struct Head<'b> {
    pub method: &'b str,
    /// Path and query, as sent.
    pub target: &'b str,
    headers: &'b [httparse::Header<'b>],
}

impl<'b> Head<'b> {
    /// The values of header `name` (lower case), in order, each as `HeaderValue::to_str`
    /// reads it: values that are not visible ASCII are skipped (as `cookie` reads
    /// `HeaderMap::get_all`).
    pub fn values<'n>(&self, name: &'n str) -> impl Iterator<Item = &'b str> + 'n
    where
        'b: 'n,
    {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| visible_ascii(h.value))
    }

    /// The first value of header `name` (lower case), as `HeaderMap::get` and
    /// `HeaderValue::to_str` read it: `None` when absent or not visible ASCII.
    pub fn first(&self, name: &str) -> Option<&'b str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| visible_ascii(h.value))
    }

    /// The target's path and query (empty without `?`) as `http::Uri` reads them: a
    /// `#fragment` dropped; `None` where it refuses the target (`<`, `>` or `` ` `` in the
    /// path; `"`, `<` or `>` in the query), which hyper answers with 400.
    pub fn path_and_query(&self) -> Option<(&'b str, &'b str)> {
        let target = self.target.split_once('#').map_or(self.target, |(t, _)| t);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let refused_in_path = |b: u8| matches!(b, b'<' | b'>' | b'`');
        let refused_in_query = |b: u8| matches!(b, b'"' | b'<' | b'>');
        if path.bytes().any(refused_in_path) || query.bytes().any(refused_in_query) {
            return None;
        }
        Some((path, query))
    }

    /// Whether the fast path may take `req` at all, and if so whether the connection closes
    /// after it (`Connection: close`).
    fn of<'buf: 'b>(req: &'b httparse::Request<'_, 'buf>) -> Option<(Head<'b>, bool)> {
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return None;
        };
        if !matches!(method, "GET" | "POST")
            || !target.starts_with('/')
            || !target.bytes().all(|b| b.is_ascii_graphic())
        {
            return None;
        }
        let mut close = false;
        for h in req.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                if h.value.trim_ascii() != b"0" {
                    return None;
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("expect")
                || name.eq_ignore_ascii_case("upgrade")
            {
                return None;
            } else if name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    match token.trim_ascii() {
                        t if t.eq_ignore_ascii_case(b"close") => close = true,
                        t if t.eq_ignore_ascii_case(b"keep-alive") => {}
                        _ => return None,
                    }
                }
            }
        }
        let head = Head {
            method,
            target,
            headers: req.headers,
        };
        Some((head, close))
    }
}

/// `v` as text, if it is what `HeaderValue::to_str` accepts (visible ASCII, space, tab).
fn visible_ascii(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// Responses of the fast path, in request order, sent together.
#[derive(Debug, Default)]
pub struct Answers {
    buf: Vec<u8>,
    /// The connection closes after the last response (written as `connection: close`).
    close: bool,
}

impl Answers {
    /// Append one HTTP/1.1 response: the status line, `headers`, `content-length` (none on a
    /// 204), `date` and, when the connection is closing, `connection: close`.
    pub fn respond(&mut self, status: StatusCode, headers: &[(&str, &str)], body: &[u8]) {
        let b = &mut self.buf;
        b.extend_from_slice(b"HTTP/1.1 ");
        b.extend_from_slice(status.as_str().as_bytes());
        b.push(b' ');
        b.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        b.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(b": ");
            b.extend_from_slice(value.as_bytes());
            b.extend_from_slice(b"\r\n");
        }
        if status != StatusCode::NO_CONTENT {
            b.extend_from_slice(b"content-length: ");
            b.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
            b.extend_from_slice(b"\r\n");
        }
        if self.close {
            b.extend_from_slice(b"connection: close\r\n");
        }
        b.extend_from_slice(b"date: ");
        HTTP_DATE.with_borrow_mut(|d| b.extend_from_slice(d.now()));
        b.extend_from_slice(b"\r\n\r\n");
        b.extend_from_slice(body);
    }
}

/// The `date` header's value, formatted once a second (as hyper keeps it).
struct HttpDate {
    second: u64,
    text: String,
}

impl HttpDate {
    fn now(&mut self) -> &[u8] {
        let now = std::time::SystemTime::now();
        let second = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        self.text.as_bytes()
    }
}

thread_local! {
    static HTTP_DATE: std::cell::RefCell<HttpDate> = const {
        std::cell::RefCell::new(HttpDate { second: 0, text: String::new() })
    };
}

/// How the fast path left a connection.
#[derive(Debug, PartialEq, Eq)]
enum FastEnd {
    /// Closed: by the client, after `Connection: close`, or at shutdown while idle.
    Closed,
    /// To hyper, which reads these bytes (the first request the fast path did not take, and
    /// whatever followed it) before the socket's.
    Handoff(Bytes),
}

/// Answer requests on `stream` while the service takes them.
async fn answer_fast<T, S>(
    stream: &mut T,
    service: &mut S,
    clock: &HeaderClock,
    stop: &mut watch::Receiver<bool>,
) -> io::Result<FastEnd>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FastPath,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out = Answers::default();
    loop {
        let mut handoff = false;
        let mut answered = false;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; FAST_MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let len = match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) if len <= FAST_MAX_HEAD => len,
                Ok(httparse::Status::Partial) => break,
                // Too large (hyper's 414/431), or not HTTP.
                Ok(httparse::Status::Complete(_)) | Err(_) => {
                    handoff = true;
                    break;
                }
            };
            clock.busy();
            let Some((head, close)) = Head::of(&req) else {
                handoff = true;
                break;
            };
            // Shutting down: answer this one, then close.
            out.close = close || *stop.borrow();
            if !service.answer(&head, &mut out) {
                handoff = true;
                break;
            }
            answered = true;
            buf.advance(len);
            if out.close {
                clock.waiting();
                stream.write_all(&out.buf).await?;
                return Ok(FastEnd::Closed);
            }
        }
        // The header deadline restarts once answers are made (bounding their write to a client
        // that does not read), never for bytes of a head still incomplete: a client sending
        // one byte at a time keeps the deadline it had.
        if answered || handoff {
            clock.waiting();
        }
        if !out.buf.is_empty() {
            stream.write_all(&out.buf).await?;
            out.buf.clear();
        }
        if handoff || buf.len() >= FAST_MAX_HEAD {
            return Ok(FastEnd::Handoff(buf.freeze()));
        }
        let read = if buf.is_empty() {
            // A request already sent is read (and answered, with `connection: close`)
            // before a shutdown closes the connection.
            tokio::select! {
                biased;
                r = stream.read_buf(&mut buf) => r?,
                _ = stop.wait_for(|stopping| *stopping) => return Ok(FastEnd::Closed),
            }
        } else {
            stream.read_buf(&mut buf).await?
        };
        if read == 0 {
            return Ok(FastEnd::Closed);
        }
    }
}

/// A stream whose first bytes are `prefix`: what the fast path read and hands on.
struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

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

/// Serve one connection (plain or TLS) with hyper until it closes, shutdown closes it, or it
/// has waited `header_read_timeout` for a request's headers (by `clock`).
async fn serve_io<I, S>(
    builder: http1::Builder,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    header_read_timeout: Duration,
    clock: Arc<HeaderClock>,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<axum::http::Request<Incoming>, Response = axum::response::Response>
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

/// Serve a plain connection: on the fast path while it takes the requests, then with hyper.
/// `watcher` is held meanwhile, so a graceful shutdown waits for the connection.
async fn serve_plain<S>(
    builder: http1::Builder,
    mut stream: TcpStream,
    mut service: S,
    watcher: hyper_util::server::graceful::Watcher,
    mut stop: watch::Receiver<bool>,
    header_read_timeout: Duration,
) -> Result<(), hyper::Error>
where
    S: FastPath
        + hyper::service::Service<axum::http::Request<Incoming>, Response = axum::response::Response>
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let clock = Arc::new(HeaderClock::new());
    let fast = tokio::select! {
        end = answer_fast(&mut stream, &mut service, &clock, &mut stop) => end,
        () = clock.expired(header_read_timeout) => {
            tracing::debug!("request headers not received in time; connection closed");
            return Ok(());
        }
    };
    match fast {
        Ok(FastEnd::Closed) => Ok(()),
        Ok(FastEnd::Handoff(prefix)) => {
            let io = TokioIo::new(Prefixed {
                prefix,
                inner: stream,
            });
            serve_io(builder, io, service, watcher, header_read_timeout, clock).await
        }
        Err(e) => {
            tracing::debug!(error = %e, "connection failed");
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
    S: FastPath
        + hyper::service::Service<axum::http::Request<Incoming>, Response = axum::response::Response>
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    // Tells connections on the fast path, which hyper's graceful shutdown does not reach.
    let (stopping, stop) = watch::channel(false);
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
        let stop = stop.clone();
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
                    serve_plain(builder, stream, service, watcher, stop, header_timeout).await
                }
                (Ok(stream), Some(acceptor)) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let clock = Arc::new(HeaderClock::new());
                            let io = TokioIo::new(tls);
                            serve_io(builder, io, service, watcher, header_timeout, clock).await
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
    let _ = stopping.send(true);
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use proptest::strategy::Strategy;
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A client whose bytes arrive in the given pieces, one per read, then EOF (an empty
    /// piece would read as EOF: they are left out); what the server writes is kept.
    struct Script {
        pieces: std::collections::VecDeque<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Script {
        fn new<P: AsRef<[u8]>>(pieces: impl IntoIterator<Item = P>) -> Script {
            Script {
                pieces: pieces
                    .into_iter()
                    .map(|p| p.as_ref().to_vec())
                    .filter(|p| !p.is_empty())
                    .collect(),
                written: Vec::new(),
            }
        }

        /// The bytes not read yet.
        fn unread(&self) -> Vec<u8> {
            self.pieces.iter().flatten().copied().collect()
        }

        /// What was written, with each `date` value blanked.
        fn answers(&self) -> String {
            let text = String::from_utf8(self.written.clone()).unwrap();
            text.split("\r\n")
                .map(|l| {
                    if l.starts_with("date: ") {
                        "date: -"
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\r\n")
        }
    }

    impl AsyncRead for Script {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if let Some(mut p) = this.pieces.pop_front() {
                let n = p.len().min(buf.remaining());
                buf.put_slice(&p[..n]);
                if n < p.len() {
                    this.pieces.push_front(p.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Answers `GET /fast?…` with its query as the body; leaves everything else.
    struct Echo;

    impl FastPath for Echo {
        fn answer(&self, head: &Head<'_>, out: &mut Answers) -> bool {
            let Some(("/fast", query)) = head.path_and_query() else {
                return false;
            };
            let ua = head.first("user-agent").unwrap_or("-");
            out.respond(StatusCode::OK, &[("x-ua", ua)], query.as_bytes());
            true
        }
    }

    fn run(script: &mut Script, stopping: bool) -> FastEnd {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (_tx, mut stop) = watch::channel(stopping);
        let clock = HeaderClock::new();
        runtime
            .block_on(answer_fast(script, &mut Echo, &clock, &mut stop))
            .unwrap()
    }

    fn ok(query: &str, ua: &str, close: bool) -> String {
        let close = if close { "connection: close\r\n" } else { "" };
        format!(
            "HTTP/1.1 200 OK\r\nx-ua: {ua}\r\ncontent-length: {}\r\n{close}date: -\r\n\r\n{query}",
            query.len()
        )
    }

    #[test]
    fn a_request_split_anywhere_is_answered_once() {
        let req = b"GET /fast?a=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: t/1\r\n\r\n";
        for cut in 1..req.len() {
            let mut s = Script::new([&req[..cut], &req[cut..]]);
            assert_eq!(run(&mut s, false), FastEnd::Closed, "cut at {cut}");
            assert_eq!(s.answers(), ok("a=1", "t/1", false), "cut at {cut}");
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_in_one_write() {
        let mut s = Script::new([
            "GET /fast?a HTTP/1.1\r\n\r\nGET /fast?b HTTP/1.1\r\nConnection: keep-alive\r\n\r\nGET /fa",
            "st?c HTTP/1.1\r\nConnection: close\r\n\r\nGET /fast?never HTTP/1.1\r\n\r\n",
        ]);
        assert_eq!(run(&mut s, false), FastEnd::Closed);
        assert_eq!(
            s.answers(),
            ok("a", "-", false) + &ok("b", "-", false) + &ok("c", "-", true)
        );
    }

    #[test]
    fn the_first_request_not_taken_hands_over_everything_after_the_answered_ones() {
        let left = [
            "GET /other HTTP/1.1\r\n\r\n",
            "GET /fast?x HTTP/1.0\r\n\r\n",
            "POST /fast?x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "POST /fast?x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET /fast?x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /fast?x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /fast?x HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "GET http://h/fast?x HTTP/1.1\r\n\r\n",
            "DELETE /fast?x HTTP/1.1\r\n\r\n",
            "GET /fast?\u{e9} HTTP/1.1\r\n\r\n",
            "GET /fast?x HTTP/1.1\r\nBad Header\r\n\r\n",
            "GET /fast?x=<b> HTTP/1.1\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x03\x03",
        ];
        for other in left {
            let rest = format!("{other}GET /fast?after HTTP/1.1\r\n\r\n");
            let mut s = Script::new([format!("GET /fast?first HTTP/1.1\r\n\r\n{rest}")]);
            assert_eq!(
                run(&mut s, false),
                FastEnd::Handoff(Bytes::from(rest.clone())),
                "{other:?}"
            );
            assert_eq!(s.answers(), ok("first", "-", false), "{other:?}");
        }
        // A body-less POST is taken.
        let mut s = Script::new(["POST /fast?p HTTP/1.1\r\nContent-Length: 0\r\n\r\n"]);
        assert_eq!(run(&mut s, false), FastEnd::Closed);
        assert_eq!(s.answers(), ok("p", "-", false));
    }

    #[test]
    fn a_head_too_large_or_with_too_many_headers_goes_to_hyper() {
        let big = format!(
            "GET /fast?x HTTP/1.1\r\nX-Big: {}",
            "a".repeat(FAST_MAX_HEAD)
        );
        let mut s = Script::new([big.clone()]);
        let FastEnd::Handoff(read) = run(&mut s, false) else {
            panic!("not handed over");
        };
        assert!(read.len() >= FAST_MAX_HEAD);
        // What was read is handed over, the rest is still the socket's.
        assert_eq!([&read[..], &s.unread()].concat(), big.as_bytes());
        assert!(s.written.is_empty());
        let many = format!(
            "GET /fast?x HTTP/1.1\r\n{}\r\n",
            "X-H: 1\r\n".repeat(FAST_MAX_HEADERS + 1)
        );
        let mut s = Script::new([many.clone()]);
        assert_eq!(run(&mut s, false), FastEnd::Handoff(Bytes::from(many)));
    }

    #[test]
    fn header_values_read_as_hyper_reads_them() {
        let mut s = Script::new([
            &b"GET /fast?x HTTP/1.1\r\nuser-agent: \xff\r\nUSER-AGENT: b\r\n\r\n"[..],
        ]);
        run(&mut s, false);
        // The first value counts, as `HeaderMap::get` reads it; it is not visible ASCII, so
        // there is none (`to_str` fails).
        assert_eq!(s.answers(), ok("x", "-", false));
    }

    #[test]
    fn targets_read_as_http_uri_reads_them() {
        let head = |target: &'static str| Head {
            method: "GET",
            target,
            headers: &[],
        };
        assert_eq!(head("/t.gif").path_and_query(), Some(("/t.gif", "")));
        assert_eq!(
            head("/t.gif?a=1&b").path_and_query(),
            Some(("/t.gif", "a=1&b"))
        );
        assert_eq!(
            head("/t.gif?a=1#x?y").path_and_query(),
            Some(("/t.gif", "a=1"))
        );
        assert_eq!(head("/t.gif#x?y").path_and_query(), Some(("/t.gif", "")));
        assert_eq!(
            head("/{\"a\"}?b='{}'").path_and_query(),
            Some(("/{\"a\"}", "b='{}'"))
        );
        for refused in ["/t.gif?a=\"x\"", "/t.gif?a=<b>", "/t<.gif", "/t`.gif?a"] {
            assert_eq!(head(refused).path_and_query(), None, "{refused}");
            assert!(axum::http::Uri::try_from(refused).is_err(), "{refused}");
        }
        for taken in ["/t.gif?a=1#x", "/{\"a\"}?b='{}'", "/t.gif?x=`^|~"] {
            let uri = axum::http::Uri::try_from(taken).unwrap();
            let (path, query) = head(taken).path_and_query().unwrap();
            assert_eq!(
                (path, query),
                (uri.path(), uri.query().unwrap_or("")),
                "{taken}"
            );
        }
    }

    #[test]
    fn a_complete_head_over_the_limit_goes_to_hyper() {
        let big = format!("GET /fast?{} HTTP/1.1\r\n\r\n", "a".repeat(FAST_MAX_HEAD));
        let mut s = Script::new([big.clone()]);
        let FastEnd::Handoff(read) = run(&mut s, false) else {
            panic!("not handed over");
        };
        assert_eq!([&read[..], &s.unread()].concat(), big.as_bytes());
        assert!(s.written.is_empty());
    }

    #[test]
    fn shutdown_closes_idle_connections_and_answers_the_request_in_hand_with_close() {
        let mut s = Script::new(["GET /fast?last HTTP/1.1\r\n\r\nGET /fast?no HTTP/1.1\r\n\r\n"]);
        assert_eq!(run(&mut s, true), FastEnd::Closed);
        assert_eq!(s.answers(), ok("last", "-", true));
        let mut s = Script::new(Vec::<Vec<u8>>::new());
        assert_eq!(run(&mut s, true), FastEnd::Closed);
        assert!(s.written.is_empty());
    }

    #[test]
    fn prefixed_streams_yield_the_prefix_then_the_socket() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut p = Prefixed {
            prefix: Bytes::from_static(b"abc"),
            inner: Script::new(["def"]),
        };
        let mut got = Vec::new();
        runtime.block_on(p.read_to_end(&mut got)).unwrap();
        assert_eq!(got, b"abcdef");
        runtime.block_on(p.write_all(b"out")).unwrap();
        assert_eq!(p.inner.written, b"out");
    }

    proptest::proptest! {
        /// Whatever bytes arrive, in whatever pieces: no panic, and every byte is either in
        /// an answered request or handed on.
        #[test]
        fn any_bytes_are_answered_or_handed_on(
            pieces in proptest::collection::vec(
                proptest::collection::vec(proptest::prop_oneof![
                    proptest::strategy::Just(b"GET /fast?q HTTP/1.1\r\n\r\n".to_vec()),
                    proptest::strategy::Just(b"\r\n".to_vec()),
                    proptest::collection::vec(proptest::num::u8::ANY, 0..40),
                ], 0..4).prop_map(|v| v.concat()),
                0..6,
            )
        ) {
            let all: Vec<u8> = pieces.concat();
            let mut s = Script::new(pieces);
            let end = run(&mut s, false);
            let answered = s.written.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
            let read = &all[..all.len() - s.unread().len()];
            match end {
                FastEnd::Handoff(rest) => {
                    proptest::prop_assert!(read.ends_with(&rest));
                    let taken = read.len() - rest.len();
                    let requests = read[..taken].windows(5).filter(|w| w == b"GET /").count();
                    proptest::prop_assert_eq!(requests, answered);
                }
                FastEnd::Closed => {
                    // Closed at EOF: what was read but not answered is an incomplete head.
                    let mut headers = [httparse::EMPTY_HEADER; FAST_MAX_HEADERS];
                    let complete = httparse::Request::new(&mut headers)
                        .parse(&all)
                        .map(|s| s.is_complete());
                    proptest::prop_assert!(answered > 0 || complete != Ok(true));
                }
            }
        }
    }

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
