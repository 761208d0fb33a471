//! Push subscriptions over HTTP (A6): `GET /v1/topics/{topic}/events` streams a topic's
//! records as Server-Sent Events, from the earliest record, the end, an offset or a time,
//! optionally filtered by record headers. The filter runs here, inside the broker, so records
//! that do not match never leave it.
//!
//! Query parameters:
//! - `from`: `earliest`, `end` (default), `offset:N` or `time:EPOCH_MS`;
//! - `filter`: a header predicate, see [`crate::filter`];
//! - `partitions`: comma-separated partition numbers (default: all).
//!
//! Each event is `event: record`, `id: PARTITION:OFFSET`, and a JSON `data` line:
//! `{"partition":0,"offset":7,"timestamp":1700000000000,"key":"k","value":"v","headers":{"app":"shop"}}`.
//! Keys, values and header values that are not UTF-8 appear as `{"base64":"..."}`.
//!
//! Stored batches are decoded as streams, one record at a time, straight into the
//! subscriber's bounded channel, so a subscription's memory does not depend on what a batch
//! inflates to. A stored batch that does not decode ends the stream with one `event: error`
//! (`data: {"error":…,"partition":P,"offset":O}`) and a warning in the log; other
//! subscriptions are unaffected.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Extensions, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use qanat_log::{LogError, Partition};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::filter::Filter;
use crate::records::{self, for_each_record, ReadError};
use crate::Broker;

/// Most stored bytes read from one partition per step.
const READ_CHUNK: u64 = 1 << 20;
/// Events buffered per subscriber before the reader waits for the client.
const SUBSCRIBER_BUFFER: usize = 1024;

/// The broker's HTTP API.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/v1/topics/{topic}/events", get(subscribe))
        .with_state(broker)
}

#[derive(Debug, Deserialize)]
struct SubscribeQuery {
    from: Option<String>,
    filter: Option<String>,
    partitions: Option<String>,
}

fn bad_request(message: String, position: Option<usize>) -> Response {
    let mut body = json!({ "error": message });
    if let Some(p) = position {
        body["position"] = json!(p);
    }
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Start {
    Earliest,
    End,
    Offset(i64),
    Time(i64),
}

fn parse_start(from: Option<&str>) -> Result<Start, String> {
    let bad = |v: &str| format!("from={v:?}: use earliest, end, offset:N or time:EPOCH_MS");
    match from {
        None | Some("end") | Some("latest") => Ok(Start::End),
        Some("earliest") | Some("beginning") => Ok(Start::Earliest),
        Some(v) => {
            if let Some(n) = v.strip_prefix("offset:") {
                n.parse().map(Start::Offset).map_err(|_| bad(v))
            } else if let Some(t) = v.strip_prefix("time:") {
                t.parse().map(Start::Time).map_err(|_| bad(v))
            } else {
                Err(bad(v))
            }
        }
    }
}

fn start_offset(partition: &Partition, start: Start, limit: u64) -> i64 {
    match start {
        Start::Earliest => partition.log_start_offset(),
        Start::End => partition.high_watermark(),
        Start::Offset(o) => o.clamp(partition.log_start_offset(), partition.high_watermark()),
        Start::Time(t) => match records::offset_for_timestamp(partition, t, limit) {
            Ok(Some((o, _))) => o,
            _ => partition.high_watermark(),
        },
    }
}

/// With the authorizer on, the principal of the request (see [`authenticate`]) must have
/// Read on the topic: 401 without valid credentials, 403 without the permission.
async fn authorize(
    broker: &Arc<Broker>,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    topic: &str,
) -> Result<(), Response> {
    if !broker.acls.enabled() {
        return Ok(());
    }
    let principal = authenticate(broker, headers, peer, "push").await?;
    // The HTTP API does not see the peer address here: only host `*` ACLs apply.
    if !broker.acls.allowed(
        &principal,
        "*",
        crate::acl::AclOperation::Read,
        crate::acl::ResourceType::Topic,
        topic,
    ) {
        return Err((
            StatusCode::FORBIDDEN,
            Json(json!({ "error": format!("{principal} may not read topic {topic}") })),
        )
            .into_response());
    }
    Ok(())
}

/// The principal of an HTTP request to `endpoint` (`push`, `metrics`): `Authorization:
/// Bearer TOKEN` from `[security] http_tokens`, or `Basic` with a SASL user's password; the
/// answer to give (401) when there is none.
///
/// Failed logins are treated as the Kafka listeners' are: logged with the peer address,
/// counted (`qanat_http_auth_failures_total`), and answered after a delay that grows with
/// the failures from the same address (the broker's [`crate::sasl::FailureDelay`], shared
/// with SASL, so guessing over HTTP and over Kafka adds up). A request without any
/// credentials is not a failed login: it is refused at once, as a browser's first try is.
pub async fn authenticate(
    broker: &Arc<Broker>,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    endpoint: &'static str,
) -> Result<String, Response> {
    let unauthorized = |why: &str| {
        let mut r = (StatusCode::UNAUTHORIZED, Json(json!({ "error": why }))).into_response();
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer, Basic realm=\"qanat\""),
        );
        r
    };
    let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(unauthorized("credentials required"));
    };
    let principal = if let Some(token) = value.strip_prefix("Bearer ") {
        broker
            .config
            .security
            .http_tokens
            .iter()
            .find(|t| crate::scram::constant_time_eq(t.token.as_bytes(), token.trim().as_bytes()))
            .map(|t| t.principal.clone())
    } else if let Some(encoded) = value.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        match decoded.as_deref().and_then(|d| d.split_once(':')) {
            Some((user, password)) => {
                let (store, user, password) = (
                    broker.credentials.clone(),
                    user.to_string(),
                    password.to_string(),
                );
                tokio::task::spawn_blocking(move || {
                    crate::sasl::check_user_password(&store, &user, &password)
                        .then(|| format!("User:{user}"))
                })
                .await
                .ok()
                .flatten()
            }
            None => None,
        }
    } else {
        None
    };
    let Some(principal) = principal else {
        let scheme = value
            .split_once(' ')
            .map_or("unknown", |(scheme, _)| match scheme {
                "Bearer" => "bearer",
                "Basic" => "basic",
                _ => "unknown",
            });
        metrics::counter!("qanat_http_auth_failures_total", "endpoint" => endpoint, "scheme" => scheme)
            .increment(1);
        let delay = match peer {
            Some(peer) => broker.auth_failures.failed(peer.ip()),
            None => broker.auth_failures.base(),
        };
        tracing::warn!(
            peer = %peer.map_or_else(|| "unknown".to_string(), |p| p.to_string()),
            endpoint,
            scheme,
            delay_ms = delay.as_millis() as u64,
            "HTTP authentication failed"
        );
        tokio::time::sleep(delay).await;
        return Err(unauthorized("invalid credentials"));
    };
    if let Some(peer) = peer {
        broker.auth_failures.succeeded(peer.ip());
    }
    Ok(principal)
}

async fn subscribe(
    State(broker): State<Arc<Broker>>,
    Path(topic): Path<String>,
    Query(q): Query<SubscribeQuery>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Response {
    // Present when served with connect info, as `qanat broker` serves it.
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    if let Err(refusal) = authorize(&broker, &headers, peer, &topic).await {
        return refusal;
    }
    let start = match parse_start(q.from.as_deref()) {
        Ok(s) => s,
        Err(e) => return bad_request(e, None),
    };
    let filter = match q.filter.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => match Filter::parse(text) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => return bad_request(e.to_string(), Some(e.position)),
        },
    };
    let Some(t) = broker.topics.get(&topic) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("unknown topic {topic}") })),
        )
            .into_response();
    };
    let wanted: Vec<usize> = match q.partitions.as_deref() {
        None | Some("") => (0..t.partitions.len()).collect(),
        Some(list) => {
            let mut out = Vec::new();
            for p in list.split(',') {
                match p.trim().parse::<usize>() {
                    Ok(i) if i < t.partitions.len() => out.push(i),
                    _ => {
                        return bad_request(
                            format!("partitions: {p:?} is not a partition of {topic}"),
                            None,
                        )
                    }
                }
            }
            out
        }
    };
    let limit = broker.config.broker.max_uncompressed_batch_bytes;
    let cursors: Vec<Cursor> = wanted
        .into_iter()
        .map(|i| {
            let partition = t.partitions[i].clone();
            let position = start_offset(&partition, start, limit);
            Cursor {
                topic: topic.clone(),
                index: i as i32,
                partition,
                position,
            }
        })
        .collect();
    let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
    metrics::gauge!("qanat_push_subscribers").increment(1.0);
    tokio::spawn(async move {
        pump(broker, cursors, filter, tx).await;
        metrics::gauge!("qanat_push_subscribers").decrement(1.0);
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

struct Cursor {
    topic: String,
    index: i32,
    partition: Arc<Partition>,
    position: i64,
}

type Sender = mpsc::Sender<Result<Event, Infallible>>;

/// Feed one subscriber until it disconnects or the broker shuts down.
async fn pump(
    broker: Arc<Broker>,
    mut cursors: Vec<Cursor>,
    filter: Option<Arc<Filter>>,
    tx: Sender,
) {
    let limit = broker.config.broker.max_uncompressed_batch_bytes;
    // Registered before the first read, for the subscription's life: every append to its
    // partitions after a mark is counted, and appends to other partitions never wake it.
    let watch = broker.purgatory.watch(cursors.iter().map(|c| &c.partition));
    loop {
        let mark = watch.mark();
        let mut progressed = false;
        for cursor in cursors.iter_mut() {
            match step(cursor, filter.as_ref(), &tx, limit).await {
                Ok(moved) => progressed |= moved,
                Err(StepError::Closed) => return,
                Err(StepError::Read(e)) => {
                    tracing::warn!(
                        topic = cursor.topic,
                        partition = cursor.index,
                        offset = cursor.position,
                        error = %e,
                        "push subscription ended"
                    );
                    let event = Event::default().event("error").data(
                        json!({
                            "error": e.to_string(),
                            "partition": cursor.index,
                            "offset": cursor.position,
                        })
                        .to_string(),
                    );
                    let _ = tx.send(Ok(event)).await;
                    return;
                }
            }
        }
        if progressed {
            continue;
        }
        let shutdown = broker.shutdown.clone();
        tokio::select! {
            _ = watch.appended(mark, 1) => {}
            _ = tx.closed() => return,
            _ = shutdown.notified() => return,
        }
    }
}

enum StepError {
    Closed,
    Read(ReadError),
}

/// Read what is new in one partition and send the matching records. Decoding runs on a
/// blocking thread and hands each matching record to the channel as it is decoded; when the
/// channel is full (a slow subscriber) the walk stops and the record in hand is sent from the
/// async side, so a subscriber that stops reading never holds a blocking-pool thread.
async fn step(
    cursor: &mut Cursor,
    filter: Option<&Arc<Filter>>,
    tx: &Sender,
    limit: u64,
) -> Result<bool, StepError> {
    let partition = cursor.partition.clone();
    let from = cursor.position;
    let index = cursor.index;
    let filter = filter.cloned();
    let sender = tx.clone();
    let (next, closed, full, read) = tokio::task::spawn_blocking(move || {
        let mut next = from;
        let mut closed = false;
        let mut full = None;
        let read = for_each_record(&partition, from, READ_CHUNK, limit, |record| {
            next = record.offset + 1;
            let headers: Vec<(&str, Option<&[u8]>)> = record
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect();
            if filter.as_ref().is_some_and(|f| !f.matches(&headers)) {
                metrics::counter!("qanat_push_filtered_total").increment(1);
                return true;
            }
            let event = Event::default()
                .event("record")
                .id(format!("{index}:{}", record.offset))
                .data(record_json(index, &record).to_string());
            match sender.try_send(Ok(event)) {
                Ok(()) => {
                    metrics::counter!("qanat_push_records_total").increment(1);
                    true
                }
                Err(mpsc::error::TrySendError::Full(event)) => {
                    full = Some(event);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    closed = true;
                    false
                }
            }
        });
        (next, closed, full, read)
    })
    .await
    .map_err(|_| StepError::Closed)?;
    let closed = match full {
        Some(event) => {
            let sent = tx.send(event).await.is_ok();
            if sent {
                metrics::counter!("qanat_push_records_total").increment(1);
            }
            closed || !sent
        }
        None => closed,
    };
    let moved = next > cursor.position;
    cursor.position = next;
    if closed {
        return Err(StepError::Closed);
    }
    match read {
        Ok(()) => Ok(moved),
        Err(ReadError::Log(LogError::OffsetOutOfRange { log_start, .. })) if from < log_start => {
            // Retention removed what we were about to read: continue from the new start.
            cursor.position = log_start;
            Ok(true)
        }
        Err(e) => Err(StepError::Read(e)),
    }
}

fn text_or_base64(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) }),
    }
}

fn record_json(partition: i32, r: &kafka_protocol::records::Record) -> Value {
    let headers: BTreeMap<String, Value> = r
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.as_deref().map_or(Value::Null, text_or_base64),
            )
        })
        .collect();
    json!({
        "partition": partition,
        "offset": r.offset,
        "timestamp": r.timestamp,
        "key": r.key.as_deref().map_or(Value::Null, text_or_base64),
        "value": r.value.as_deref().map_or(Value::Null, text_or_base64),
        "headers": headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_parse() {
        assert_eq!(parse_start(None), Ok(Start::End));
        assert_eq!(parse_start(Some("earliest")), Ok(Start::Earliest));
        assert_eq!(parse_start(Some("offset:12")), Ok(Start::Offset(12)));
        assert_eq!(
            parse_start(Some("time:1700000000000")),
            Ok(Start::Time(1_700_000_000_000))
        );
        assert!(parse_start(Some("yesterday")).is_err());
        assert!(parse_start(Some("offset:x")).is_err());
    }

    #[test]
    fn non_utf8_is_base64() {
        assert_eq!(text_or_base64(b"hi"), json!("hi"));
        assert_eq!(text_or_base64(&[0xff, 0x00]), json!({"base64": "/wA="}));
    }
}
