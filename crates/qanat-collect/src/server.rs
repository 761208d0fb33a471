//! The HTTP side: handlers, limits, the admin endpoint, metrics per route, graceful shutdown.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{AppSettings, CollectConfig, ServerConfig};
use crate::enrich::{truncate, Agent, Enricher};
use crate::error::CollectError;
use crate::event::{self, BatchEncoder, BeaconRecord, Client, Envelope, EventFields, Page};
use crate::query::{BeaconQuery, Field};
use crate::routing::{Chunk, DrainReport, Refused, Routes};
use crate::throttle::{Shed, Snapshot, Throttle};
use crate::tracker;

/// A transparent 1×1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];
/// The headers of every pixel answer: never cached.
const UNCACHED: [(&str, &str); 3] = [
    (
        "cache-control",
        "no-cache, no-store, must-revalidate, max-age=0",
    ),
    ("pragma", "no-cache"),
    ("expires", "0"),
];
/// Longest URL, referrer or title kept from a beacon.
const TEXT_MAX: usize = 4096;

struct Counters {
    rejected: metrics::Counter,
    unrouted: metrics::Counter,
    shed_priority: metrics::Counter,
    shed_sample: metrics::Counter,
}

impl Counters {
    fn new() -> Counters {
        let c = |outcome: &'static str| metrics::counter!("qanat_collect_events_total", "outcome" => outcome);
        Counters {
            rejected: c("rejected"),
            unrouted: c("unrouted"),
            shed_priority: metrics::counter!("qanat_collect_shed_total", "reason" => "priority"),
            shed_sample: metrics::counter!("qanat_collect_shed_total", "reason" => "sample"),
        }
    }

    fn shed(&self, why: Shed) {
        match why {
            Shed::Priority => self.shed_priority.increment(1),
            Shed::Sample => self.shed_sample.increment(1),
        }
    }
}

const BEACON_PATH: &str = "/t.gif";

/// The routes `track` keeps metric handles for; any other path registers per request.
const TRACKED_PATHS: [&str; 7] = [
    BEACON_PATH,
    "/v1/events",
    "/v1/config",
    "/admin/v1/config",
    "/healthz",
    "/qanat.js",
    "/demo.html",
];
/// Statuses whose request counters are kept per path.
const TRACKED_STATUSES: [u16; 13] = [
    200, 204, 400, 401, 403, 404, 405, 413, 415, 422, 429, 500, 503,
];

/// Metric handles of one HTTP route, registered on first use (as `metrics::counter!` per
/// request did) and reused after, so a request allocates nothing for its metrics.
struct PathMetrics {
    path: &'static str,
    seconds: OnceLock<metrics::Histogram>,
    requests: [OnceLock<metrics::Counter>; TRACKED_STATUSES.len()],
}

impl PathMetrics {
    fn new(path: &'static str) -> PathMetrics {
        PathMetrics {
            path,
            seconds: OnceLock::new(),
            requests: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn record(&self, seconds: f64, status: StatusCode) {
        self.seconds
            .get_or_init(
                || metrics::histogram!("qanat_collect_http_request_seconds", "path" => self.path),
            )
            .record(seconds);
        match TRACKED_STATUSES
            .iter()
            .position(|&s| s == status.as_u16())
            .and_then(|i| self.requests.get(i))
        {
            Some(slot) => slot
                .get_or_init(|| request_counter(self.path.to_string(), status))
                .increment(1),
            None => request_counter(self.path.to_string(), status).increment(1),
        }
    }
}

fn request_counter(path: String, status: StatusCode) -> metrics::Counter {
    metrics::counter!("qanat_collect_http_requests_total", "path" => path, "status" => status.as_str().to_string())
}

struct AppState {
    cfg: ServerConfig,
    http_metrics: Vec<PathMetrics>,
    throttle: Arc<Throttle>,
    routes: Routes,
    enricher: Enricher,
    counters: Counters,
    cookie_suffix: String,
}

/// A running collector: routes with their producers and pumps, ready to serve HTTP.
pub struct Collector {
    state: Arc<AppState>,
    pumps: Vec<JoinHandle<DrainReport>>,
    shutdown: watch::Sender<bool>,
}

impl Collector {
    /// Create the producers and start the pumps. Must run inside a tokio runtime.
    pub fn start(cfg: CollectConfig) -> Result<Collector, CollectError> {
        cfg.validate()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (routes, pumps) = Routes::start(&cfg, &shutdown_rx)?;
        let enricher = Enricher::new(&cfg.server)?;
        let cookie_suffix = format!(
            "; Max-Age={}; Path=/; SameSite=Lax",
            u64::from(cfg.server.cookie_max_age_days) * 86_400
        );
        let state = AppState {
            throttle: Arc::new(Throttle::new(cfg.apps)),
            cfg: cfg.server,
            routes,
            enricher,
            counters: Counters::new(),
            http_metrics: TRACKED_PATHS.into_iter().map(PathMetrics::new).collect(),
            cookie_suffix,
        };
        Ok(Collector {
            state: Arc::new(state),
            pumps,
            shutdown,
        })
    }

    /// The throttle table, for reloads from outside (SIGHUP).
    pub fn throttle(&self) -> Arc<Throttle> {
        self.state.throttle.clone()
    }

    pub fn router(&self) -> Router {
        let st = self.state.clone();
        Router::new()
            .route(BEACON_PATH, get(beacon).post(beacon))
            .route("/v1/events", axum::routing::post(events).options(preflight))
            .route("/v1/config", get(app_config))
            .route(
                "/admin/v1/config",
                get(admin_get).put(admin_put).delete(admin_delete),
            )
            .route("/healthz", get(healthz))
            .route("/qanat.js", get(tracker::script))
            .route("/demo.html", get(tracker::demo))
            .route_layer(middleware::from_fn_with_state(st.clone(), track))
            .layer(DefaultBodyLimit::max(st.cfg.max_body_bytes))
            .with_state(st)
    }

    /// Serve until `shutdown` resolves; then finish in-flight requests, drain every route's
    /// buffer to the broker (bounded by `shutdown_timeout_ms`) and report per route.
    /// Serve HTTP on `listener` (HTTPS with `tls`) until `shutdown`, then drain the routes.
    pub async fn serve<F>(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: F,
    ) -> Result<Vec<DrainReport>, CollectError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let limits = crate::conn::Limits {
            header_read_timeout: Duration::from_millis(self.state.cfg.header_read_timeout_ms),
            max_connections: self.state.cfg.max_connections,
            workers: match self.state.cfg.workers {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
        };
        let state = self.state.clone();
        let router = self.router();
        let connection_service = move |peer| Dispatch {
            state: state.clone(),
            router: router.clone(),
            peer,
            kept: RefCell::default(),
        };
        crate::conn::serve(listener, connection_service, limits, tls, shutdown).await;
        tracing::info!("HTTP stopped; draining routes");
        let _ = self.shutdown.send(true);
        let mut reports = Vec::with_capacity(self.pumps.len());
        for pump in self.pumps {
            match pump.await {
                Ok(r) => reports.push(r),
                Err(e) => tracing::error!(error = %e, "route pump failed"),
            }
        }
        Ok(reports)
    }
}

/// The service of one connection: beacons, the hot path, are answered here directly, with
/// their metrics; every other request goes through the router (extractors, `track`). A
/// beacon thus skips the routing table, the extensions map (`ConnectInfo`, `MatchedPath`)
/// and the boxed middleware future, none of which it needs.
struct Dispatch {
    state: Arc<AppState>,
    router: Router,
    peer: SocketAddr,
    kept: RefCell<Kept>,
}

/// What one connection's beacons reuse: a client sends the same user agent on every request
/// of a connection, and the throttle table rarely changes. Beacons of the connection then
/// touch neither the user agent cache's lock nor the table's.
#[derive(Default)]
struct Kept {
    agent: Option<Arc<Agent>>,
    throttle: Option<Snapshot>,
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for Dispatch {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = DispatchFuture;

    fn call(&self, mut req: Request<hyper::body::Incoming>) -> DispatchFuture {
        if req.uri().path() == BEACON_PATH && matches!(*req.method(), Method::GET | Method::POST) {
            let beacon =
                BeaconRequest::of_parts(req.uri(), req.headers(), &self.state.cfg.cookie_name);
            let resp = self.answer_beacon(&beacon, |answer| answer.into_response());
            return DispatchFuture::Answered(Some(resp));
        }
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let mut router = self.router.clone();
        DispatchFuture::Routed(tower::Service::call(&mut router, req))
    }
}

impl Dispatch {
    /// Answer a beacon with what the connection keeps, timed and counted under its path;
    /// `respond` turns the answer into the response the caller sends.
    fn answer_beacon<R>(
        &self,
        beacon: &BeaconRequest<'_>,
        respond: impl FnOnce(BeaconAnswer) -> R,
    ) -> R {
        let start = Instant::now();
        let answer = match self.kept.try_borrow_mut() {
            Ok(mut kept) => beacon_answer(&self.state, self.peer, beacon, &mut kept),
            // Not reentrant; should it ever be, the request keeps nothing.
            Err(_) => beacon_answer(&self.state, self.peer, beacon, &mut Kept::default()),
        };
        let status = answer.status();
        let resp = respond(answer);
        if let Some(m) = self
            .state
            .http_metrics
            .iter()
            .find(|m| m.path == BEACON_PATH)
        {
            m.record(start.elapsed().as_secs_f64(), status);
        }
        resp
    }
}

/// Beacons on plain connections, answered straight from the request head as `conn` parsed
/// it: no `Request`, header map, URI or response object is built for them.
impl crate::conn::FastPath for Dispatch {
    fn answer(&self, head: &crate::conn::Head<'_>, out: &mut crate::conn::Answers) -> bool {
        // A target hyper refuses is left to hyper, which answers 400 as before.
        let Some((BEACON_PATH, query)) = head.path_and_query() else {
            return false;
        };
        if !matches!(head.method, "GET" | "POST") {
            return false;
        }
        let beacon = BeaconRequest::of_head(query, head, &self.state.cfg.cookie_name);
        self.answer_beacon(&beacon, |answer| answer.write_to(out));
        true
    }
}

/// A response made at once (a beacon), or the router's.
enum DispatchFuture {
    Answered(Option<Response>),
    Routed(axum::routing::future::RouteFuture<std::convert::Infallible>),
}

impl Future for DispatchFuture {
    type Output = Result<Response, std::convert::Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            DispatchFuture::Answered(resp) => std::task::Poll::Ready(Ok(resp
                .take()
                .unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response()))),
            DispatchFuture::Routed(f) => std::pin::Pin::new(f).poll(cx),
        }
    }
}

/// Request count and latency per HTTP route.
async fn track(
    State(st): State<Arc<AppState>>,
    path: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let resp = next.run(req).await;
    let seconds = start.elapsed().as_secs_f64();
    let cached = path
        .as_ref()
        .and_then(|p| st.http_metrics.iter().find(|m| m.path == p.as_str()));
    match cached {
        Some(m) => m.record(seconds, resp.status()),
        None => {
            let path = path.map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
            metrics::histogram!("qanat_collect_http_request_seconds", "path" => path.clone())
                .record(seconds);
            request_counter(path, resp.status()).increment(1);
        }
    }
    resp
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn cookie<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    cookie_in(
        h.get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
        name,
    )
}

/// The value of cookie `name` in `Cookie` header values.
fn cookie_in<'h>(values: impl Iterator<Item = &'h str>, name: &str) -> Option<&'h str> {
    values.flat_map(|v| v.split(';')).find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

fn bad_request(reason: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(ErrorBody {
            error: reason.into(),
        }),
    )
        .into_response()
}

/// `{"error": reason}`, the body of every error answer.
fn error_json(reason: String) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody { error: reason }).unwrap_or_default()
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn full_reason(route: &str) -> String {
    format!("route {route} is full; retry later")
}

/// 503 with the reason and when to retry.
fn route_full(st: &AppState, route: &str) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ErrorBody {
            error: full_reason(route),
        }),
    )
        .into_response();
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(st.cfg.retry_after_secs),
    );
    r
}

fn client_ip(st: &AppState, peer: SocketAddr, h: &HeaderMap) -> IpAddr {
    let xff = h.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    st.enricher.client_ip(peer.ip(), xff)
}

// ------------------------------------------------------------------------------------------
// GET/POST /t.gif

/// Query parameters: `t` event type (required), `app`, `url` (default: the Referer header),
/// `ref` referrer, `spm` a.b.c.d, `vid` visitor id (default: the cookie, else a new one),
/// `uid` user id, `sr` screen, `lang`, `title`, `ts` client time (ms), `e` custom event name,
/// `p_*` business parameters, `resp=204` for an empty answer.
///
/// The request is read in place (the `HeaderMap` and `Uri` extractors would copy them).
async fn beacon(State(st): State<Arc<AppState>>, req: Request) -> Response {
    let Some(&ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let beacon = BeaconRequest::of_parts(req.uri(), req.headers(), &st.cfg.cookie_name);
    beacon_answer(&st, peer, &beacon, &mut Kept::default()).into_response()
}

/// What a beacon is answered from: its query string and the few headers it reads (as
/// `HeaderValue::to_str` reads them: visible ASCII, else absent).
struct BeaconRequest<'r> {
    query: &'r str,
    /// The visitor cookie's value, when one was sent.
    cookie: Option<&'r str>,
    referer: Option<&'r str>,
    user_agent: Option<&'r str>,
    forwarded_for: Option<&'r str>,
}

impl<'r> BeaconRequest<'r> {
    fn of_parts(uri: &'r Uri, h: &'r HeaderMap, cookie_name: &str) -> BeaconRequest<'r> {
        BeaconRequest {
            query: uri.query().unwrap_or(""),
            cookie: cookie(h, cookie_name),
            referer: header_str(h, header::REFERER),
            user_agent: header_str(h, header::USER_AGENT),
            forwarded_for: header_str(h, HeaderName::from_static("x-forwarded-for")),
        }
    }

    fn of_head(
        query: &'r str,
        head: &crate::conn::Head<'r>,
        cookie_name: &str,
    ) -> BeaconRequest<'r> {
        BeaconRequest {
            query,
            cookie: cookie_in(head.values("cookie"), cookie_name),
            referer: head.first("referer"),
            user_agent: head.first("user-agent"),
            forwarded_for: head.first("x-forwarded-for"),
        }
    }
}

/// How a beacon is answered, before it is made into a response for hyper or written by the
/// plain-connection fast path.
enum BeaconAnswer {
    /// The pixel (an empty 204 with `resp=204`), with the visitor cookie to set, and why the
    /// event was shed, if it was.
    Pixel {
        empty: bool,
        set_cookie: Option<String>,
        shed: Option<Shed>,
    },
    /// 400 with the reason.
    BadRequest(String),
    /// 503: the route's buffer is full.
    RouteFull {
        reason: String,
        retry_after_secs: u32,
    },
}

impl BeaconAnswer {
    fn status(&self) -> StatusCode {
        match self {
            BeaconAnswer::Pixel { empty: true, .. } => StatusCode::NO_CONTENT,
            BeaconAnswer::Pixel { empty: false, .. } => StatusCode::OK,
            BeaconAnswer::BadRequest(_) => StatusCode::BAD_REQUEST,
            BeaconAnswer::RouteFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// As hyper's response: made of the same parts as [`BeaconAnswer::write_to`]'s.
    fn into_response(self) -> Response {
        self.with_parts(|status, headers, body| {
            let mut resp = Response::new(axum::body::Body::from(Bytes::copy_from_slice(body)));
            *resp.status_mut() = status;
            let h = resp.headers_mut();
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    h.append(name, value);
                }
            }
            resp
        })
    }

    /// Written as HTTP/1.1 by the fast path.
    fn write_to(self, out: &mut crate::conn::Answers) {
        self.with_parts(|status, headers, body| out.respond(status, headers, body));
    }

    /// The answer's status, headers and body, handed to `emit`: the one description both
    /// forms are made from.
    fn with_parts<R>(self, emit: impl FnOnce(StatusCode, &[(&str, &str)], &[u8]) -> R) -> R {
        let status = self.status();
        match self {
            BeaconAnswer::Pixel {
                empty,
                set_cookie,
                shed,
            } => {
                let mut headers: [(&str, &str); 6] = [("", ""); 6];
                let mut n = 0;
                let mut add = |name, value| {
                    if let Some(slot) = headers.get_mut(n) {
                        *slot = (name, value);
                        n += 1;
                    }
                };
                if !empty {
                    add("content-type", "image/gif");
                }
                for (name, value) in UNCACHED {
                    add(name, value);
                }
                if let Some(c) = &set_cookie {
                    add("set-cookie", c);
                }
                if let Some(why) = shed {
                    add("x-qanat-shed", why.as_str());
                }
                let body = if empty { &[][..] } else { PIXEL };
                emit(status, headers.get(..n).unwrap_or_default(), body)
            }
            BeaconAnswer::BadRequest(reason) => {
                emit(status, &[("content-type", JSON)], &error_json(reason))
            }
            BeaconAnswer::RouteFull {
                reason,
                retry_after_secs,
            } => {
                let mut secs = itoa::Buffer::new();
                emit(
                    status,
                    &[
                        ("content-type", JSON),
                        ("retry-after", secs.format(retry_after_secs)),
                    ],
                    &error_json(reason),
                )
            }
        }
    }
}

const JSON: &str = "application/json";

/// A beacon from `peer`, answered from its query and headers alone (a beacon's body, if any,
/// carries nothing).
fn beacon_answer(
    st: &AppState,
    peer: SocketAddr,
    beacon: &BeaconRequest<'_>,
    kept: &mut Kept,
) -> BeaconAnswer {
    let received_ms = now_ms();
    let q = BeaconQuery::parse(beacon.query);
    let get = |f: Field| q.get(f).filter(|v| !v.is_empty());
    let ty = match get(Field::Type) {
        Some(t) if event::valid_id(t) => t,
        _ => {
            return reject_beacon(
                st,
                "t (event type) is missing or not [A-Za-z0-9_.:-]{1,128}",
            )
        }
    };
    let app = get(Field::App).unwrap_or(&st.cfg.default_app);
    if !event::valid_id(app) {
        return reject_beacon(st, "app is not [A-Za-z0-9_.:-]{1,128}");
    }
    let cookie_vid = beacon.cookie.filter(|v| event::valid_id(v));
    let new_vid;
    let visitor_id = match get(Field::Vid) {
        Some(v) if event::valid_id(v) => v,
        Some(_) => return reject_beacon(st, "vid is not a valid id"),
        None => match cookie_vid {
            Some(v) => v,
            None => {
                new_vid = format!("{:032x}", rand::random::<u128>());
                &new_vid
            }
        },
    };
    let user_id = match get(Field::Uid) {
        Some(u) if event::valid_id(u) => Some(u),
        Some(_) => return reject_beacon(st, "uid is not a valid id"),
        None => None,
    };
    let spm = match get(Field::Spm).map(event::parse_spm) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return reject_beacon(st, e),
        None => None,
    };
    let client_ts = match get(Field::Ts).map(str::parse::<i64>) {
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => return reject_beacon(st, "ts is not an integer (ms since the epoch)"),
        None => None,
    };
    let referer_header = beacon.referer;
    let ua_raw = truncate(beacon.user_agent.unwrap_or(""), 512);
    let agent = match kept.agent.take() {
        Some(a) if a.user_agent == ua_raw => a,
        _ => st.enricher.user_agent(ua_raw),
    };
    let agent = &*kept.agent.insert(agent);
    let client = Client::of(
        st.enricher.client_ip(peer.ip(), beacon.forwarded_for),
        agent,
    );

    let (priority, shed) = st
        .throttle
        .refresh(&mut kept.throttle)
        .decide(app, ty, visitor_id);
    let empty = q.get(Field::Resp) == Some("204");
    let set_cookie = (cookie_vid != Some(visitor_id)).then(|| {
        // One exact allocation, cheaper than `format!`.
        let (name, suffix) = (&st.cfg.cookie_name, &st.cookie_suffix);
        let mut value = String::with_capacity(name.len() + 1 + visitor_id.len() + suffix.len());
        value.push_str(name);
        value.push('=');
        value.push_str(visitor_id);
        value.push_str(suffix);
        value
    });
    if let Some(why) = shed {
        st.counters.shed(why);
        return BeaconAnswer::Pixel {
            empty,
            set_cookie,
            shed: Some(why),
        };
    }
    let Some(route_idx) = st.routes.find(app, ty, priority) else {
        st.counters.unrouted.increment(1);
        return BeaconAnswer::BadRequest(format!("no route for app {app} event type {ty}"));
    };
    let record = BeaconRecord {
        app,
        ty,
        priority,
        source: "beacon",
        visitor_id,
        user_id,
        received_ms,
        client_ts,
        client: &client,
        page: Page {
            url: truncate(get(Field::Url).or(referer_header).unwrap_or(""), TEXT_MAX),
            referrer: truncate(get(Field::Ref).unwrap_or(""), TEXT_MAX),
            title: truncate(get(Field::Title).unwrap_or(""), TEXT_MAX),
        },
        spm,
        screen: get(Field::Screen).map(|s| truncate(s, 32)),
        language: get(Field::Lang).map(|s| truncate(s, 32)),
        name: get(Field::Event).map(|s| truncate(s, 128)),
        params: beacon_params(&q),
    };
    let Some(route) = st.routes.get(route_idx) else {
        return BeaconAnswer::BadRequest("route vanished".into());
    };
    let sent = BEACON_CHUNK.with_borrow_mut(|chunk| {
        chunk.clear();
        chunk
            .push(visitor_id, received_ms, |out| record.encode(out))
            .map(|()| route.try_send(chunk))
    });
    match sent {
        Err(e) => BeaconAnswer::BadRequest(format!("encoding the event: {e}")),
        Ok(Ok(())) => {
            route.accepted.increment(1);
            BeaconAnswer::Pixel {
                empty,
                set_cookie,
                shed: None,
            }
        }
        Ok(Err(_)) => {
            route.full.increment(1);
            BeaconAnswer::RouteFull {
                reason: full_reason(&route.name),
                retry_after_secs: st.cfg.retry_after_secs,
            }
        }
    }
}

thread_local! {
    /// A beacon's record on its way into its route's buffer (which copies it): one buffer
    /// per thread, reused, instead of an allocation per beacon.
    static BEACON_CHUNK: std::cell::RefCell<Chunk> =
        std::cell::RefCell::new(Chunk::with_capacity(1024, 1));
}

/// `p_*` query parameters, prefix removed (at most 64).
fn beacon_params<'q>(q: &'q BeaconQuery<'_>) -> BTreeMap<&'q str, &'q str> {
    let mut out = BTreeMap::new();
    for (k, v) in q.params() {
        let Some(name) = k.strip_prefix("p_").filter(|n| !n.is_empty()) else {
            continue;
        };
        let name = truncate(name, 64);
        // A name given twice keeps its last value.
        if out.len() < 64 || out.contains_key(name) {
            out.insert(name, truncate(v, TEXT_MAX));
        }
    }
    out
}

fn reject(st: &AppState, reason: impl Into<String>) -> Response {
    st.counters.rejected.increment(1);
    bad_request(reason)
}

fn reject_beacon(st: &AppState, reason: impl Into<String>) -> BeaconAnswer {
    st.counters.rejected.increment(1);
    BeaconAnswer::BadRequest(reason.into())
}

// ------------------------------------------------------------------------------------------
// POST /v1/events

#[derive(Debug, PartialEq, Eq)]
enum DecodeError {
    Unsupported(String),
    TooLarge,
    Corrupt(String),
}

/// Undo `Content-Encoding` (identity, gzip, zstd), never producing more than `limit` bytes.
fn decode<'b>(
    encoding: Option<&str>,
    body: &'b [u8],
    limit: usize,
) -> Result<Cow<'b, [u8]>, DecodeError> {
    let enc = encoding.map(|e| e.trim().to_ascii_lowercase());
    let mut out = Vec::new();
    // One byte over the limit tells "too large" from "exactly the limit".
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let read = match enc.as_deref() {
        None | Some("" | "identity") => {
            return if body.len() > limit {
                Err(DecodeError::TooLarge)
            } else {
                Ok(Cow::Borrowed(body))
            }
        }
        Some("gzip" | "x-gzip") => flate2::read::GzDecoder::new(body)
            .take(cap)
            .read_to_end(&mut out),
        Some("zstd") => match zstd::stream::read::Decoder::new(body) {
            Ok(d) => d.take(cap).read_to_end(&mut out),
            Err(e) => Err(e),
        },
        Some(other) => {
            return Err(DecodeError::Unsupported(format!(
                "Content-Encoding {other:?} is not supported (identity, gzip, zstd)"
            )))
        }
    };
    match read {
        Err(e) => Err(DecodeError::Corrupt(format!(
            "{} body: {e}",
            enc.unwrap_or_default()
        ))),
        Ok(_) if out.len() > limit => Err(DecodeError::TooLarge),
        Ok(_) => Ok(Cow::Owned(out)),
    }
}

#[derive(Serialize)]
struct BatchReply {
    accepted: usize,
    /// Dropped on purpose by the throttle table (`/v1/config`).
    shed: usize,
    rejected: Vec<Rejected>,
}

#[derive(Serialize)]
struct Rejected {
    index: usize,
    reason: String,
}

/// A batch is all-or-nothing per route capacity (503: nothing of it was taken, retry it
/// whole) but not per event: valid events are kept and invalid ones are listed in
/// `rejected`. Only when no event is kept and some were invalid is the answer 4xx.
async fn events(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_ms = now_ms();
    let enc = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let decoded = match decode(enc, &body, st.cfg.max_decoded_bytes) {
        Ok(d) => d,
        Err(DecodeError::Unsupported(m)) => {
            st.counters.rejected.increment(1);
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Json(ErrorBody { error: m }),
            )
                .into_response();
        }
        Err(DecodeError::TooLarge) => {
            st.counters.rejected.increment(1);
            return too_large(format!(
                "decoded body is larger than {} bytes",
                st.cfg.max_decoded_bytes
            ));
        }
        Err(DecodeError::Corrupt(m)) => return reject(&st, m),
    };
    let env: Envelope<'_> = match serde_json::from_slice(&decoded) {
        Ok(e) => e,
        Err(e) => return reject(&st, format!("body is not a valid batch: {e}")),
    };
    if !event::valid_id(&env.app) {
        return reject(&st, "app is not [A-Za-z0-9_.:-]{1,128}");
    }
    if env.events.is_empty() {
        return reject(&st, "events is empty");
    }
    if env.events.len() > st.cfg.max_batch_events {
        st.counters.rejected.increment(1);
        return too_large(format!(
            "{} events in one batch; at most {}",
            env.events.len(),
            st.cfg.max_batch_events
        ));
    }
    fn id_of(m: &Option<serde_json::Map<String, Value>>) -> Option<&str> {
        m.as_ref().and_then(|m| m.get("id")).and_then(Value::as_str)
    }
    let (env_visitor, env_user) = (id_of(&env.device), id_of(&env.user));
    let ua_raw = truncate(header_str(&headers, header::USER_AGENT).unwrap_or(""), 512);
    let agent = st.enricher.user_agent(ua_raw);
    let client = Client::of(client_ip(&st, peer, &headers), &agent);
    let throttle = st.throttle.snapshot();
    let encoder = match BatchEncoder::new(&env.app, received_ms, &client, env.device.as_ref()) {
        Ok(e) => e,
        Err(e) => return bad_request(format!("encoding the batch: {e}")),
    };
    // The shared parts (device, client) are copied into every event's record: bounding them
    // by the event limit keeps a small body from expanding into huge records.
    if encoder.overhead() > st.cfg.max_event_bytes {
        return too_large(format!(
            "the batch's device and client parts take {} bytes encoded, more than max_event_bytes {}",
            encoder.overhead(),
            st.cfg.max_event_bytes
        ));
    }

    let mut rejected = Vec::new();
    let mut too_large_only = true;
    let mut shed = 0;
    // One chunk per route, sized for the events of this batch.
    let mut chunks: Vec<Chunk> = st.routes.iter().map(|_| Chunk::default()).collect();
    for (index, raw) in env.events.iter().enumerate() {
        let text = raw.get();
        if text.len() > st.cfg.max_event_bytes {
            rejected.push(Rejected {
                index,
                reason: format!(
                    "event is {} bytes; at most {}",
                    text.len(),
                    st.cfg.max_event_bytes
                ),
            });
            continue;
        }
        too_large_only = false;
        let ev = match EventFields::parse(text) {
            Ok(m) => m,
            Err(e) => {
                rejected.push(Rejected {
                    index,
                    reason: format!("event is not an object: {e}"),
                });
                continue;
            }
        };
        let checked = match event::check_event(&ev, env_visitor, env_user) {
            Ok(c) => c,
            Err(reason) => {
                rejected.push(Rejected { index, reason });
                continue;
            }
        };
        let (priority, why) = throttle.decide(&env.app, checked.ty, checked.visitor_id);
        if let Some(why) = why {
            st.counters.shed(why);
            shed += 1;
            continue;
        }
        let Some(route_idx) = st.routes.find(&env.app, checked.ty, priority) else {
            st.counters.unrouted.increment(1);
            rejected.push(Rejected {
                index,
                reason: format!("no route for app {} event type {}", env.app, checked.ty),
            });
            continue;
        };
        let Some(chunk) = chunks.get_mut(route_idx) else {
            rejected.push(Rejected {
                index,
                reason: "route vanished".into(),
            });
            continue;
        };
        if chunk.is_empty() {
            let left = env.events.len() - index;
            *chunk = Chunk::with_capacity(decoded.len() + left * encoder.overhead(), left);
        }
        match chunk.push(checked.visitor_id, received_ms, |out| {
            encoder.encode(out, &checked, priority, raw)
        }) {
            Ok(()) => {}
            Err(e) => rejected.push(Rejected {
                index,
                reason: format!("encoding: {e}"),
            }),
        }
    }
    st.counters.rejected.increment(rejected.len() as u64);

    // Reserve room on every route first, so a full route refuses the whole batch rather
    // than keeping part of it (the client retries all of it, with no duplicates). A full
    // route is waited for, up to `full_wait_ms`, as its pump hands records on: the client is
    // slowed down instead of sending the batch again.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(st.cfg.full_wait_ms);
    loop {
        // Registered before trying, so room freed meanwhile is not missed.
        let room = st.routes.room_freed();
        tokio::pin!(room);
        room.as_mut().enable();
        let Err((idx, why)) = st.routes.try_reserve_all(chunks.iter().map(Chunk::len)) else {
            break;
        };
        let Some(route) = st.routes.get(idx) else {
            return route_full(&st, "(vanished)");
        };
        if why == Refused::Closed || tokio::time::timeout_at(deadline, room).await.is_err() {
            let n = chunks.get(idx).map_or(0, Chunk::len);
            route.full.increment(n as u64);
            return route_full(&st, &route.name);
        }
    }
    let mut accepted = 0;
    for (idx, chunk) in chunks.iter().enumerate() {
        let Some(route) = st.routes.get(idx) else {
            break;
        };
        let n = chunk.len();
        if n == 0 {
            continue;
        }
        // Refused only once the route has closed, i.e. after the HTTP side has stopped.
        if route.send_reserved(chunk).is_ok() {
            accepted += n;
            route.accepted.increment(n as u64);
        } else {
            route.full.increment(n as u64);
        }
    }
    let status = if accepted == 0 && shed == 0 && !rejected.is_empty() {
        if too_large_only {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        }
    } else {
        StatusCode::OK
    };
    let mut r = (
        status,
        Json(BatchReply {
            accepted,
            shed,
            rejected,
        }),
    )
        .into_response();
    cors(&mut r);
    r
}

fn too_large(reason: String) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(ErrorBody { error: reason }),
    )
        .into_response()
}

fn cors(r: &mut Response) {
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

async fn preflight() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    cors(&mut r);
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("content-type, content-encoding"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

// ------------------------------------------------------------------------------------------
// Config, admin, health

#[derive(serde::Deserialize)]
struct AppQuery {
    app: Option<String>,
}

async fn app_config(State(st): State<Arc<AppState>>, Query(q): Query<AppQuery>) -> Response {
    let Some(app) = q.app.filter(|a| event::valid_id(a)) else {
        return bad_request("app is missing or not a valid id");
    };
    let mut r = Json(st.throttle.app_view(&app)).into_response();
    cors(&mut r);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Headers a reverse proxy adds: with any of them the TCP peer is not the client.
const FORWARDING_HEADERS: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Why an admin request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdminDenied {
    /// `admin_token` is set and the request does not carry it.
    BadToken,
    /// No `admin_token`, and the request came through a proxy: its peer address says nothing
    /// about the client (a local proxy makes every browser look local).
    Proxied,
    /// No `admin_token`, and the peer is not on this host.
    NotLoopback,
}

/// Admin access: with `admin_token` set, a matching bearer token, always; without, only a
/// direct request from a loopback peer (`proxied`: a forwarding header, or a peer in
/// `trusted_proxies`).
fn admin_access(
    token: &str,
    bearer: Option<&str>,
    peer: IpAddr,
    proxied: bool,
) -> Result<(), AdminDenied> {
    if !token.is_empty() {
        return match bearer {
            Some(t) if t == token => Ok(()),
            _ => Err(AdminDenied::BadToken),
        };
    }
    if proxied {
        Err(AdminDenied::Proxied)
    } else if peer.is_loopback() {
        Ok(())
    } else {
        Err(AdminDenied::NotLoopback)
    }
}

fn admin_denied(st: &AppState, peer: SocketAddr, h: &HeaderMap) -> Option<Response> {
    let proxied = FORWARDING_HEADERS.iter().any(|name| h.contains_key(*name))
        || st.enricher.is_trusted(peer.ip());
    let bearer = header_str(h, header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "));
    let denied = admin_access(&st.cfg.admin_token, bearer, peer.ip(), proxied).err()?;
    let (status, error) = match denied {
        AdminDenied::BadToken => (StatusCode::UNAUTHORIZED, "admin needs the bearer token"),
        AdminDenied::Proxied => (
            StatusCode::FORBIDDEN,
            "admin through a proxy needs admin_token set and sent as a bearer token",
        ),
        AdminDenied::NotLoopback => (
            StatusCode::FORBIDDEN,
            "admin without admin_token is only for loopback peers",
        ),
    };
    tracing::warn!(%peer, proxied, ?denied, "admin request refused");
    let mut r = (
        status,
        Json(ErrorBody {
            error: error.into(),
        }),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    Some(r)
}

async fn admin_get(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = admin_denied(&st, peer, &headers) {
        return r;
    }
    Json(st.throttle.table_view()).into_response()
}

/// `PUT /admin/v1/config?app=APP` with an app's settings (JSON, same keys as `[apps.APP]`).
async fn admin_put(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<AppQuery>,
    body: Bytes,
) -> Response {
    if let Some(r) = admin_denied(&st, peer, &headers) {
        return r;
    }
    let Some(app) = q.app.filter(|a| a == "*" || event::valid_id(a)) else {
        return bad_request("app is missing or not a valid id");
    };
    let settings: AppSettings = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return bad_request(format!("body is not app settings: {e}")),
    };
    if let Err(e) = settings.validate(&app) {
        return bad_request(e.to_string());
    }
    let version = st.throttle.set_app(&app, Some(settings));
    tracing::info!(%app, version, "throttle settings changed through the admin endpoint");
    Json(st.throttle.app_view(&app)).into_response()
}

async fn admin_delete(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<AppQuery>,
) -> Response {
    if let Some(r) = admin_denied(&st, peer, &headers) {
        return r;
    }
    let Some(app) = q.app else {
        return bad_request("app is missing");
    };
    let version = st.throttle.set_app(&app, None);
    tracing::info!(%app, version, "throttle settings removed through the admin endpoint");
    Json(st.throttle.app_view(&app)).into_response()
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    routes: Vec<RouteHealth<'a>>,
}

#[derive(Serialize)]
struct RouteHealth<'a> {
    name: &'a str,
    topic: &'a str,
    buffered: usize,
    capacity: usize,
}

async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    let routes = st
        .routes
        .iter()
        .map(|r| RouteHealth {
            name: &r.name,
            topic: &r.topic,
            buffered: r.buffered(),
            capacity: r.capacity,
        })
        .collect();
    Json(Health {
        status: "ok",
        routes,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::io::Write;

    use super::*;

    #[test]
    fn decoding_with_limits() {
        let json = br#"{"a":1}"#;
        assert_eq!(decode(None, json, 100).unwrap().as_ref(), json);
        assert_eq!(decode(None, json, 3), Err(DecodeError::TooLarge));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(json).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decode(Some("gzip"), &gz, 100).unwrap().as_ref(), json);
        assert_eq!(decode(Some("gzip"), &gz, 3), Err(DecodeError::TooLarge));
        let zs = zstd::encode_all(&json[..], 1).unwrap();
        assert_eq!(decode(Some("zstd"), &zs, 100).unwrap().as_ref(), json);
        // A bomb stops at the limit instead of inflating.
        let bomb = zstd::encode_all(&vec![b' '; 10 << 20][..], 3).unwrap();
        assert_eq!(
            decode(Some("zstd"), &bomb, 1 << 20),
            Err(DecodeError::TooLarge)
        );
        assert!(matches!(
            decode(Some("gzip"), json, 100),
            Err(DecodeError::Corrupt(_))
        ));
        assert!(matches!(
            decode(Some("br"), json, 100),
            Err(DecodeError::Unsupported(_))
        ));
    }

    #[test]
    fn beacon_params_keep_the_last_value_of_each_name() {
        let q = BeaconQuery::parse("p_x=1&p_=2&p_y=%41&p_x=3&p_z=");
        let params = beacon_params(&q);
        assert_eq!(
            params.into_iter().collect::<Vec<_>>(),
            [("x", "3"), ("y", "A"), ("z", "")]
        );
    }

    #[test]
    fn admin_needs_the_token_whenever_a_proxy_is_involved() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let remote: IpAddr = "203.0.113.9".parse().unwrap();
        // Without a token: direct loopback only.
        assert_eq!(admin_access("", None, local, false), Ok(()));
        assert_eq!(
            admin_access("", None, local, true),
            Err(AdminDenied::Proxied)
        );
        assert_eq!(
            admin_access("", None, remote, false),
            Err(AdminDenied::NotLoopback)
        );
        // With a token: the token, wherever the request comes from.
        for (peer, proxied) in [(local, false), (local, true), (remote, false)] {
            assert_eq!(
                admin_access("s3cret", Some("s3cret"), peer, proxied),
                Ok(())
            );
            assert_eq!(
                admin_access("s3cret", Some("guess"), peer, proxied),
                Err(AdminDenied::BadToken)
            );
            assert_eq!(
                admin_access("s3cret", None, peer, proxied),
                Err(AdminDenied::BadToken)
            );
        }
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; qvid=abc; b=2"),
        );
        assert_eq!(cookie(&h, "qvid"), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
