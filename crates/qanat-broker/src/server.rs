//! Accepting connections, decoding their requests and writing the responses in order.
//!
//! Per connection, a reader decodes frames in order and starts each request as its own task
//! ([`crate::api::dispatch`]);
//! produce appends happen in the reader (so they keep arrival order) and only the wait for
//! durability runs concurrently. A writer awaits the tasks in request order and writes their
//! responses, so pipelined requests overlap without reordering replies.
//!
//! Limits (see [`crate::limits`]): a connection over `max_connections` or
//! `max_connections_per_ip` is closed as soon as it is accepted; every frame's bytes come out
//! of the shared request pool until its response is written; a connection with no request
//! activity for `connections_max_idle_ms` is closed (an unfinished frame is not activity);
//! a failing `accept` (out of descriptors) is retried after a pause that doubles up to a
//! second, logged once per interval.
//!
//! Quotas (see [`crate::quotas`]): a request over one mutes its connection ([`Mute`]) from the
//! moment its response is computed; the reader then neither reads nor starts anything until
//! the mute ends, so the very next request waits, as with Kafka's channel muting (KIP-219).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, RequestHeader, RequestKind};
use kafka_protocol::protocol::Decodable;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::api::{self, malformed, produce, sasl_auth, supported_range, Pending};
use crate::limits::{
    AcceptBackoff, ConnectionLimits, ConnectionSlot, PoolReservation, RequestPool,
};
use crate::listener::{
    split_plain, split_tls, BufferedTcp, Listener, ListenerInfo, ReadSide, ANONYMOUS,
};
use crate::ratelog::{LogLimiter, LOG_INTERVAL};
use crate::sasl::SaslExchange;
use crate::wire::{FrameReader, ResponseWriter, Step, WireError};
use crate::Broker;

/// Requests of one connection that may be in progress at once.
const MAX_IN_FLIGHT: usize = 128;

static ACCEPT_LOG: LogLimiter = LogLimiter::new(LOG_INTERVAL);
static REFUSED_LOG: LogLimiter = LogLimiter::new(LOG_INTERVAL);

/// Accept connections on every listener until `shutdown` completes, then stop accepting and
/// return. The request pool and the connection limits are shared by all listeners.
pub async fn serve(
    listeners: Vec<Listener>,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let settings = &broker.config.broker;
    let pool = RequestPool::new(settings.queued_max_request_bytes);
    let limits = ConnectionLimits::new(settings.max_connections, settings.max_connections_per_ip);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let broker = broker.clone();
        let pool = pool.clone();
        let limits = limits.clone();
        let mut stop = stop_rx.clone();
        loops.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            accept_loop(listener, broker, pool, limits, stopped).await
        });
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    let mut result = Ok(());
    while let Some(joined) = loops.join_next().await {
        match joined {
            Ok(Err(e)) => result = Err(e),
            Ok(Ok(())) => {}
            Err(e) => tracing::error!(error = %e, "accept loop panicked"),
        }
    }
    result
}

async fn accept_loop(
    listener: Listener,
    broker: Arc<Broker>,
    pool: RequestPool,
    limits: Arc<ConnectionLimits>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let info = listener.info();
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.socket.accept() => accepted,
            _ = &mut shutdown => return Ok(()),
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.succeeded();
                match limits.admit(peer.ip()) {
                    Ok(slot) => {
                        let broker = broker.clone();
                        let pool = pool.clone();
                        let info = info.clone();
                        tokio::spawn(async move {
                            connection(stream, peer, broker, pool, slot, info).await
                        });
                    }
                    Err(refusal) => {
                        let limit = refusal.key();
                        metrics::counter!("qanat_connections_refused_total", "limit" => limit)
                            .increment(1);
                        if let Some(suppressed) = REFUSED_LOG.check(limit) {
                            tracing::warn!(%peer, limit, suppressed, "connection refused: {limit} reached");
                        }
                        // Closed at once, after it is counted and logged (what the peer sees
                        // last): dropping the stream sends the peer a FIN.
                        drop(stream);
                    }
                }
            }
            // Out of descriptors (or kernel memory) accept fails at once for as long as that
            // lasts: pause, doubling up to a second, so the loop does not spin and flood the
            // log; the pending clients are taken once descriptors are free again.
            Err(e) => {
                let pause = backoff.failed();
                metrics::counter!("qanat_accept_errors_total", "error" => accept_error_kind(&e))
                    .increment(1);
                if let Some(suppressed) = ACCEPT_LOG.check("accept") {
                    tracing::warn!(
                        error = %e,
                        suppressed,
                        retry_in_ms = pause.as_millis() as u64,
                        "accept failed"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = &mut shutdown => return Ok(()),
                }
            }
        }
    }
}

fn accept_error_kind(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => "emfile",
        Some(libc::ENFILE) => "enfile",
        Some(libc::ENOBUFS | libc::ENOMEM) => "nomem",
        _ => "other",
    }
}

/// A started request and the pool share of its frame, held until its response is written.
type Queued = (Pending, PoolReservation);

/// When a connection last did something, for the idle timeout. Activity is a complete
/// request received or a response written; bytes of an unfinished frame do not count, so a
/// frame that trickles in for longer than the idle timeout closes its connection and returns
/// its pool share. A connection with requests still being answered is never idle.
struct Activity {
    started: std::time::Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn request_answered(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// When the connection becomes idle if nothing happens; while busy, when to look again.
    fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        let at = if self.busy() {
            std::time::Instant::now() + idle
        } else {
            self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
        };
        tokio::time::Instant::from_std(at)
    }

    fn is_idle(&self, idle: Duration) -> bool {
        !self.busy()
            && self.started.elapsed()
                >= Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// What woke the reader of a connection.
enum ReaderEvent {
    Read(Result<Step, WireError>),
    WriterGone,
    IdleTimer,
}

/// Who is at the other end of a connection, and through which listener.
#[derive(Debug, Clone)]
pub struct Session {
    pub listener: Arc<ListenerInfo>,
    pub peer: SocketAddr,
    /// `User:NAME` once authenticated (SASL or client certificate), else `User:ANONYMOUS`.
    pub principal: Arc<str>,
    /// Until when the connection is muted (a quota throttle), shared by its requests' tasks
    /// and its reader.
    pub mute: Arc<Mute>,
}

/// A connection's channel mute (Kafka's, KIP-219): a throttled request's response goes out
/// at once with `throttle_time_ms`, and the connection's next requests are neither read nor
/// started before the mute ends.
///
/// Invariant: the deadline only moves forward; a response's `throttle_time_ms` is what is
/// left of the mute when the response is encoded ([`Mute::remaining`]).
#[derive(Debug)]
pub struct Mute {
    base: Instant,
    /// Milliseconds after `base` until which the connection is muted; 0: never muted.
    until_ms: AtomicU64,
}

impl Default for Mute {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }
}

impl Mute {
    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Mute for `d` from now (or longer, if already muted longer).
    pub fn extend(&self, d: Duration) {
        if !d.is_zero() {
            let until = self.now_ms().saturating_add(d.as_millis() as u64);
            self.until_ms.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// How long the connection stays muted from now (zero when it is not).
    pub fn remaining(&self) -> Duration {
        let until = self.until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(until.saturating_sub(self.now_ms()))
    }

    /// `remaining` as a response's `throttle_time_ms`.
    pub fn throttle_time_ms(&self) -> i32 {
        i32::try_from(self.remaining().as_millis()).unwrap_or(i32::MAX)
    }

    /// When the mute ends, if it has not yet.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        let left = self.remaining();
        (!left.is_zero()).then(|| tokio::time::Instant::now() + left)
    }
}

impl Session {
    pub fn new(listener: Arc<ListenerInfo>, peer: SocketAddr, principal: Arc<str>) -> Self {
        Self {
            listener,
            peer,
            principal,
            mute: Arc::new(Mute::default()),
        }
    }

    /// The principal's name, as quota entities name users.
    pub fn user(&self) -> &str {
        self.principal
            .strip_prefix("User:")
            .unwrap_or(&self.principal)
    }

    /// Mute this connection for `d` (Kafka's channel muting); `quota` names the quota
    /// (`byte_rate` or `request`) in the throttle counter.
    pub fn throttle(&self, d: Duration, quota: &'static str) {
        if !d.is_zero() {
            metrics::counter!("qanat_quota_throttled_total", "quota" => quota).increment(1);
            self.mute.extend(d);
        }
    }

    /// Charge `handling` to the client's request quota, muting the connection when it is
    /// over. A no-op unless some request quota is set.
    pub fn charge_request(&self, broker: &Broker, client_id: &str, handling: Duration) {
        if broker.quotas.meters_requests() {
            let throttle = broker.quotas.record(
                self.user(),
                client_id,
                crate::quotas::Kind::Request,
                handling.as_nanos() as u64,
            );
            self.throttle(throttle, "request");
        }
    }
}

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshake (when the listener uses TLS): the split stream and the principal of a
/// verified client certificate.
async fn open_transport(
    stream: TcpStream,
    peer: SocketAddr,
    broker: &Broker,
    listener: &ListenerInfo,
) -> Option<(ReadSide, crate::listener::WriteSide, Option<String>)> {
    if !listener.protocol.uses_tls() {
        let (rd, wr) = split_plain(stream);
        return Some((rd, wr, None));
    }
    let tls = broker.tls.as_ref()?;
    match tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT,
        tls.acceptor().accept(BufferedTcp::new(stream)),
    )
    .await
    {
        Ok(Ok(stream)) => {
            let principal = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| crate::tls::principal_of_certificate(cert.as_ref()));
            let (rd, wr) = split_tls(stream);
            Some((rd, wr, principal))
        }
        Ok(Err(e)) => {
            metrics::counter!("qanat_tls_handshake_failures_total").increment(1);
            tracing::debug!(%peer, listener = %listener.name, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!("qanat_tls_handshake_failures_total").increment(1);
            tracing::debug!(%peer, listener = %listener.name, "TLS handshake timed out");
            None
        }
    }
}

/// What the reader does with a request on a SASL listener.
enum Gate {
    /// Pass to [`api::dispatch`].
    Dispatch(Decoded),
    /// Answered here; close the connection after the answer when the flag is set.
    Answered(Pending, bool),
    /// Close the connection without an answer.
    Close(String),
}

/// Handle the SASL requests of a connection and refuse everything else before
/// authentication (see [`crate::sasl`]).
async fn sasl_gate(
    broker: &Broker,
    session: &mut Session,
    exchange: &mut Option<SaslExchange>,
    decoded: Decoded,
) -> Result<Gate, WireError> {
    let enabled = &broker.config.sasl.mechanisms;
    let (api, version, correlation_id) = (decoded.api, decoded.version, decoded.correlation_id);
    let answer = |body: &dyn Fn() -> Result<crate::wire::Response, WireError>| -> Result<Pending, WireError> {
        Ok(api::ready(body()?))
    };
    let kind = match decoded.request {
        Request::Kind(kind) => kind,
        other => {
            return Ok(match exchange {
                Some(x) if !x.finished() && !matches!(other, Request::UnsupportedApiVersions) => {
                    Gate::Close(format!("{api:?} before SASL authentication"))
                }
                _ => Gate::Dispatch(Decoded {
                    request: other,
                    ..decoded
                }),
            })
        }
    };
    match (*kind, exchange.as_mut()) {
        (RequestKind::SaslHandshake(req), Some(x)) if !x.finished() => {
            let body = sasl_auth::handshake(x, &req, enabled);
            let failed = body.error_code != 0;
            let pending = answer(&|| api::encode(api, version, correlation_id, &body))?;
            Ok(Gate::Answered(pending, failed))
        }
        (RequestKind::SaslHandshake(_), _) => {
            let body = sasl_auth::illegal_handshake(enabled);
            Ok(Gate::Answered(
                answer(&|| api::encode(api, version, correlation_id, &body))?,
                false,
            ))
        }
        (RequestKind::SaslAuthenticate(req), Some(x)) if x.expects_token() => {
            let (body, failed) = authenticate_token(broker, session, x, req).await?;
            let pending = answer(&|| api::encode(api, version, correlation_id, &body))?;
            Ok(Gate::Answered(pending, failed))
        }
        (RequestKind::SaslAuthenticate(_), _) => {
            let body = sasl_auth::illegal_authenticate();
            Ok(Gate::Answered(
                answer(&|| api::encode(api, version, correlation_id, &body))?,
                true,
            ))
        }
        (kind @ RequestKind::ApiVersions(_), _) => Ok(Gate::Dispatch(Decoded {
            request: Request::Kind(Box::new(kind)),
            ..decoded
        })),
        (_, Some(x)) if !x.finished() => Ok(Gate::Close(format!(
            "unexpected {api:?} request during SASL authentication"
        ))),
        (kind, _) => Ok(Gate::Dispatch(Decoded {
            request: Request::Kind(Box::new(kind)),
            ..decoded
        })),
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    pool: RequestPool,
    _slot: ConnectionSlot,
    listener: Arc<ListenerInfo>,
) {
    metrics::gauge!("qanat_connections").increment(1.0);
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "set_nodelay failed");
    }
    let Some((mut rd, wr, cert_principal)) = open_transport(stream, peer, &broker, &listener).await
    else {
        metrics::gauge!("qanat_connections").decrement(1.0);
        return;
    };
    let mut exchange = listener.protocol.uses_sasl().then(SaslExchange::default);
    let mut session = Session::new(
        listener.clone(),
        peer,
        cert_principal.as_deref().unwrap_or(ANONYMOUS).into(),
    );
    let idle = Duration::from_millis(broker.config.broker.connections_max_idle_ms);
    let activity = Arc::new(Activity::new());
    let (tx, mut rx) = mpsc::channel::<Queued>(MAX_IN_FLIGHT);
    let writer = tokio::spawn({
        let activity = activity.clone();
        let out = ResponseWriter::new(wr).with_serving_threads(broker.serving.clone());
        async move {
            match write_responses(out, &mut rx, &activity, idle).await {
                Ok(()) => {}
                Err(WireError::Io(e)) => tracing::debug!(%peer, error = %e, "connection closed"),
                Err(e) => tracing::warn!(%peer, error = %e, "closing connection"),
            }
        }
    });
    let mut frames = FrameReader::new(broker.config.broker.max_frame_bytes);
    let mut unframed_tokens = false;
    let idle_timer = tokio::time::sleep_until(activity.idle_deadline(idle));
    tokio::pin!(idle_timer);
    loop {
        // Muted by a quota throttle: the connection is not read until the mute ends.
        if !wait_unmuted(&session.mute, &tx).await {
            break;
        }
        let deadline = activity.idle_deadline(idle);
        if idle_timer.deadline() != deadline {
            idle_timer.as_mut().reset(deadline);
        }
        let event = tokio::select! {
            _ = tx.closed() => ReaderEvent::WriterGone,
            step = frames.step(&mut rd, &pool) => ReaderEvent::Read(step),
            _ = &mut idle_timer => ReaderEvent::IdleTimer,
        };
        let (frame, reservation) = match event {
            ReaderEvent::Read(Ok(Step::Frame(frame, reservation))) => (frame, reservation),
            ReaderEvent::Read(Ok(Step::Progress)) => continue,
            ReaderEvent::Read(Ok(Step::Eof)) | ReaderEvent::WriterGone => break,
            ReaderEvent::Read(Err(WireError::Io(e))) => {
                tracing::debug!(%peer, error = %e, "connection closed");
                break;
            }
            ReaderEvent::Read(Err(e)) => {
                tracing::warn!(%peer, error = %e, "closing connection");
                break;
            }
            ReaderEvent::IdleTimer if activity.is_idle(idle) => {
                metrics::counter!("qanat_connections_idle_closed_total").increment(1);
                tracing::debug!(%peer, mid_frame = frames.mid_frame(), idle_ms = idle.as_millis() as u64, "closing idle connection");
                break;
            }
            ReaderEvent::IdleTimer => continue,
        };
        // A request that arrived while an earlier one was being throttled (its response
        // computed while this frame was read) waits for the mute too, so the mute holds the
        // very next request, as Kafka's does, and not only the one after it.
        if !wait_unmuted(&session.mute, &tx).await {
            break;
        }
        activity.touch();
        let started = Instant::now();
        let mut close_after = false;
        if unframed_tokens {
            // After SaslHandshake v0 the client sends bare SASL tokens, each behind a length.
            let Some(x) = exchange.as_mut() else { break };
            match unframed_token(&broker, &mut session, x, frame).await {
                Some(pending) => {
                    if x.finished() {
                        unframed_tokens = false;
                        frames.allow_short_frames(false);
                    }
                    activity.request_started();
                    if tx.send((pending, reservation)).await.is_err() {
                        break;
                    }
                    continue;
                }
                None => break,
            }
        }
        let decoded = decode_request(frame);
        // Only with a request quota set: the client id to charge the reader's work to.
        let quota_client = match &decoded {
            Ok(d) if broker.quotas.meters_requests() => Some(d.client_id.clone()),
            _ => None,
        };
        let started_request = match decoded {
            Ok(decoded) if exchange.is_some() || is_sasl(decoded.api) => {
                let legacy_handshake = decoded.api == ApiKey::SaslHandshake && decoded.version == 0;
                match sasl_gate(&broker, &mut session, &mut exchange, decoded).await {
                    Ok(Gate::Dispatch(decoded)) => {
                        api::dispatch(&broker, decoded, started, &session).await
                    }
                    Ok(Gate::Answered(pending, close)) => {
                        close_after = close;
                        if legacy_handshake && exchange.as_ref().is_some_and(|x| x.expects_token())
                        {
                            unframed_tokens = true;
                            frames.allow_short_frames(true);
                        }
                        Ok(Some(pending))
                    }
                    Ok(Gate::Close(why)) => Err(malformed(why)),
                    Err(e) => Err(e),
                }
            }
            Ok(decoded) => api::dispatch(&broker, decoded, started, &session).await,
            Err(e) => Err(e),
        };
        if let Some(client_id) = quota_client {
            // Decoding, checks and appends done here; handlers charge their own work.
            session.charge_request(&broker, &client_id, started.elapsed());
        }
        match started_request {
            Ok(Some(pending)) => {
                activity.request_started();
                if tx.send((pending, reservation)).await.is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing connection");
                break;
            }
        }
        if close_after {
            break;
        }
    }
    drop(tx);
    if writer.await.is_err() {
        tracing::error!(%peer, "connection writer panicked");
    }
    metrics::gauge!("qanat_connections").decrement(1.0);
}

/// Wait until `mute` ends (at once when it is not set); false when the writer is gone
/// meanwhile (the connection is closing).
async fn wait_unmuted(mute: &Mute, tx: &mpsc::Sender<Queued>) -> bool {
    while let Some(until) = mute.deadline() {
        metrics::counter!("qanat_quota_muted_waits_total").increment(1);
        tokio::select! {
            _ = tx.closed() => return false,
            _ = tokio::time::sleep_until(until) => {}
        }
    }
    true
}

/// One bare SASL token (after SaslHandshake v0): the bare answer, or None to close the
/// connection (a failure, which Kafka answers by closing).
async fn unframed_token(
    broker: &Broker,
    session: &mut Session,
    exchange: &mut SaslExchange,
    token: Bytes,
) -> Option<Pending> {
    let request =
        kafka_protocol::messages::SaslAuthenticateRequest::default().with_auth_bytes(token);
    match authenticate_token(broker, session, exchange, request).await {
        Ok((body, false)) => Some(api::ready(crate::wire::Response::from_bytes(
            body.auth_bytes,
        ))),
        Ok((_, true)) | Err(_) => None,
    }
}

/// One SASL token through `exchange`, framed (SaslAuthenticate) or bare (after SaslHandshake
/// v0) alike: run off the reactor (PBKDF2 for PLAIN takes milliseconds); an authenticated
/// principal becomes the session's; a failure is counted, logged with the peer and answered
/// after the per-address delay. The response, and whether the login failed.
async fn authenticate_token(
    broker: &Broker,
    session: &mut Session,
    exchange: &mut SaslExchange,
    request: kafka_protocol::messages::SaslAuthenticateRequest,
) -> Result<(kafka_protocol::messages::SaslAuthenticateResponse, bool), WireError> {
    let credentials = broker.credentials.clone();
    let mut owned = std::mem::take(exchange);
    let (body, outcome, owned) = tokio::task::spawn_blocking(move || {
        let (body, outcome) = sasl_auth::authenticate(&mut owned, &credentials, &request);
        (body, outcome, owned)
    })
    .await
    .map_err(|e| malformed(format!("authentication task failed: {e}")))?;
    *exchange = owned;
    match outcome {
        Ok(principal) => {
            if let Some(principal) = principal {
                broker.auth_failures.succeeded(session.peer.ip());
                tracing::debug!(peer = %session.peer, %principal, "authenticated");
                session.principal = principal.into();
            }
            Ok((body, false))
        }
        Err(reason) => {
            metrics::counter!("qanat_auth_failures_total").increment(1);
            let delay = broker.auth_failures.failed(session.peer.ip());
            tracing::warn!(
                peer = %session.peer,
                listener = %session.listener.name,
                reason,
                delay_ms = delay.as_millis() as u64,
                "authentication failed"
            );
            tokio::time::sleep(delay).await;
            Ok((body, true))
        }
    }
}

fn is_sasl(api: ApiKey) -> bool {
    matches!(api, ApiKey::SaslHandshake | ApiKey::SaslAuthenticate)
}

/// `op`, failing when the peer takes no bytes for `idle`: a client that stops reading its
/// responses must not hold their requests' pool memory forever.
async fn unless_stalled<T>(
    idle: Duration,
    op: impl Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    match tokio::time::timeout(idle, op).await {
        Ok(result) => result,
        Err(_) => Err(WireError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer took no response bytes for connections_max_idle_ms",
        ))),
    }
}

/// Write responses in request order. Ready responses are coalesced into one write; the buffer
/// is flushed before every wait (for a response still being computed, or for the next
/// request), so no finished response sits in the buffer behind an unfinished one.
async fn write_responses(
    mut out: ResponseWriter,
    rx: &mut mpsc::Receiver<Queued>,
    activity: &Activity,
    idle: Duration,
) -> Result<(), WireError> {
    loop {
        let (pending, reservation) = match rx.try_recv() {
            Ok(p) => p,
            Err(_) => {
                unless_stalled(idle, out.flush()).await?;
                match rx.recv().await {
                    Some(p) => p,
                    None => return Ok(()),
                }
            }
        };
        if !pending.is_finished() {
            unless_stalled(idle, out.flush()).await?;
        }
        match pending.await {
            Ok(Some(response)) => {
                unless_stalled(idle, out.write(response)).await?;
            }
            Ok(None) => return Err(malformed("response could not be encoded")),
            Err(e) => return Err(malformed(format!("request task failed: {e}"))),
        }
        drop(reservation);
        activity.request_answered();
    }
}

/// A decoded request, ready to execute.
pub enum Request {
    /// ApiVersions above the supported range, answered with v0 and UNSUPPORTED_VERSION.
    UnsupportedApiVersions,
    /// Produce v0–v2: the refusal is already encoded (None for acks=0).
    OldProduce(Option<Bytes>),
    /// Any other request, within its API's supported range (boxed: some kinds are large).
    Kind(Box<RequestKind>),
}

/// A request with the header fields needed to answer it.
pub struct Decoded {
    pub api: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    /// The client id from the request header (empty when absent).
    pub client_id: String,
    pub request: Request,
}

/// Decode one request frame (without its length prefix). Never panics; any malformed or
/// unsupported input is an error that closes the connection.
pub fn decode_request(frame: Bytes) -> Result<Decoded, WireError> {
    if frame.len() < 8 {
        return Err(malformed("frame shorter than a request header"));
    }
    let key_raw = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api =
        ApiKey::try_from(key_raw).map_err(|_| malformed(format!("unknown API key {key_raw}")))?;
    let Some((lo, hi)) = supported_range(api) else {
        return Err(malformed(format!("{api:?} is not served by this broker")));
    };
    let decoded = |request, client_id| Decoded {
        api,
        version,
        correlation_id,
        client_id,
        request,
    };
    if api == ApiKey::ApiVersions && !(lo..=hi).contains(&version) {
        // KIP-511: answer a too-new ApiVersions with v0 and UNSUPPORTED_VERSION so the client
        // can retry with a version it finds in the list.
        return Ok(decoded(Request::UnsupportedApiVersions, String::new()));
    }
    if !(lo..=hi).contains(&version) {
        return Err(malformed(format!(
            "{api:?} v{version} is outside the supported range {lo}..={hi}"
        )));
    }
    let mut body = frame;
    if api == ApiKey::Produce && version < 3 {
        // Header v1: key, version, correlation id, int16-length client id.
        if body.len() < 10 {
            return Err(malformed("truncated request header"));
        }
        let client_id_len = i16::from_be_bytes([body[8], body[9]]).max(0) as usize;
        if body.len() < 10 + client_id_len {
            return Err(malformed("truncated request header"));
        }
        let mut rest = body.split_off(10 + client_id_len);
        return Ok(decoded(
            Request::OldProduce(produce::refuse_old_produce(&mut rest, version)),
            String::new(),
        ));
    }
    let header = RequestHeader::decode(&mut body, api.request_header_version(version))
        .map_err(|e| malformed(format!("request header: {e}")))?;
    let client_id = header.client_id.map(|c| c.to_string()).unwrap_or_default();
    let request = if api == ApiKey::ApiVersions {
        // The body only names the client software, which the answer does not depend on: a
        // body that does not decode is answered all the same.
        RequestKind::ApiVersions(ApiVersionsRequest::decode(&mut body, version).unwrap_or_default())
    } else {
        RequestKind::decode(api, &mut body, version)
            .map_err(|e| malformed(format!("{api:?} v{version}: {e:#}")))?
    };
    Ok(decoded(Request::Kind(Box::new(request)), client_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(Bytes::from(bytes));
        }

        #[test]
        fn garbage_after_a_valid_header_never_panics(
            key in prop::sample::select(vec![0i16, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 22, 37, 42]),
            version in 0i16..14,
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut frame = Vec::new();
            frame.extend_from_slice(&key.to_be_bytes());
            frame.extend_from_slice(&version.to_be_bytes());
            frame.extend_from_slice(&7i32.to_be_bytes());
            frame.extend_from_slice(&tail);
            let _ = decode_request(Bytes::from(frame));
        }
    }

    #[test]
    fn forged_array_length_is_an_error_not_an_allocation() {
        // Metadata v1: header (client id null) then a topics array claiming 2^31-1 entries.
        let mut frame = vec![0, 3, 0, 1, 0, 0, 0, 1, 0xff, 0xff];
        frame.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(decode_request(Bytes::from(frame)).is_err());
    }

    #[test]
    fn unknown_and_unsupported_are_errors() {
        assert!(decode_request(Bytes::from_static(&[0x7f, 0, 0, 0, 0, 0, 0, 1])).is_err());
        // Fetch v3 is below the supported range.
        assert!(decode_request(Bytes::from_static(&[0, 1, 0, 3, 0, 0, 0, 1, 0xff, 0xff])).is_err());
        // ApiVersions v9 is answered (with UNSUPPORTED_VERSION), not refused.
        let d = decode_request(Bytes::from_static(&[0, 18, 0, 9, 0, 0, 0, 1])).ok();
        assert!(matches!(
            d.map(|d| d.request),
            Some(Request::UnsupportedApiVersions)
        ));
    }

    #[test]
    fn requests_decode_into_their_kind() {
        // Metadata v1, client id null, topics null.
        let frame =
            Bytes::from_static(&[0, 3, 0, 1, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let d = decode_request(frame).ok();
        assert!(matches!(
            d.as_ref().map(|d| (&d.request, d.correlation_id)),
            Some((Request::Kind(kind), 5))
                if matches!(&**kind, RequestKind::Metadata(m) if m.topics.is_none())
        ));
        // ApiVersions v3 with a body that does not decode is still answered, as before.
        let frame = Bytes::from_static(&[0, 18, 0, 3, 0, 0, 0, 2, 0xff, 0xff, 0, 0x7f]);
        let d = decode_request(frame).ok();
        assert!(matches!(
            d.map(|d| d.request),
            Some(Request::Kind(kind)) if matches!(*kind, RequestKind::ApiVersions(_))
        ));
    }
}
