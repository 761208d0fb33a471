//! Qanat's HTTP collection server for web and mobile logs (SYSTEM.md D1–D4, D6).
//!
//! It owns the path from an HTTP request to a record handed to the bus: validation,
//! enrichment, throttling, routing and one bounded buffer plus producer per route.
//!
//! Wire formats:
//! * `GET|POST /t.gif?t=TYPE&app=&url=&ref=&spm=a.b.c.d&vid=&uid=&sr=&lang=&title=&ts=&e=&p_*=`
//!   — a beacon; answers a 1×1 GIF (`resp=204`: an empty 204), never cached, and sets the
//!   visitor cookie when the request had none.
//! * `POST /v1/events` — `{"app", "device": {"id", …}, "user": {"id"}, "events": [{"type", …}]}`
//!   as JSON, optionally `Content-Encoding: gzip | zstd`; see [`event::check_event`] for the
//!   fields each type needs. Answers `{"accepted", "shed", "rejected": [{"index", "reason"}]}`.
//! * `GET /v1/config?app=` — the app's throttle settings, which SDKs poll; `PUT|DELETE
//!   /admin/v1/config?app=` changes them at run time.
//! * Each event becomes one JSON record keyed by visitor id, on the topic of the first
//!   `[[routes]]` rule matching its (app, type, priority).
//!
//! Invariants:
//! * A 2xx means the event is in its route's buffer; the answer never waits for the broker.
//!   A full buffer answers 503 + `Retry-After` and takes nothing of that request; a batch
//!   first waits up to `full_wait_ms` for the route's pump to make room.
//! * A record's JSON is byte for byte what `serde_json` makes of [`event::BeaconRecord`] /
//!   [`event::BatchRecord`], though written by hand ([`json`]).
//! * Routes share nothing on the way out (buffer, pump task, librdkafka producer), so one
//!   slow or flooded route cannot stall another.
//! * Shutdown stops accepting, finishes in-flight requests, then drains every buffer to the
//!   broker (bounded by `shutdown_timeout_ms`); a crash loses what was buffered.
//! * A client cannot hold the server's descriptors by being slow: request headers must arrive
//!   within `header_read_timeout_ms`, open connections are capped, and running out of
//!   descriptors pauses accepting instead of ending it ([`conn`]).
//! * Admin changes need `admin_token` whenever a proxy is involved; without a token only
//!   direct loopback requests may make them.
//! * Nothing from the network is trusted: bodies, decoded bodies, events and strings are
//!   bounded before use, and bad input gets a 4xx with the reason, never a panic.

pub mod config;
pub mod conn;
pub mod enrich;
pub mod error;
pub mod event;
use qanat_json as json;
pub mod query;
pub mod routing;
pub mod server;
pub mod throttle;
pub mod tracker;

pub use config::CollectConfig;
pub use error::{CollectError, ConfigError};
pub use routing::DrainReport;
pub use server::Collector;
