//! Logging to stderr and the Prometheus endpoint.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Logs go to stderr; `RUST_LOG` (or `QANAT_LOG`) picks the level, `info` by default.
pub fn init_logging() {
    let filter = std::env::var("QANAT_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Latency buckets in seconds, from 50 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Install the metrics recorder and serve `GET /metrics` on `addr` (HTTPS with `tls`);
/// returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    tls: Option<Arc<qanat_broker::tls::Tls>>,
) -> anyhow::Result<SocketAddr> {
    serve_metrics_guarded(addr, tls, None).await
}

/// How often histogram samples are folded into buckets when nobody scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The broker whose HTTP credentials a scrape must carry, set once it is open (the endpoint
/// is up before, so the broker's own metrics register with the recorder).
pub type CredentialsFrom = Arc<OnceLock<Arc<qanat_broker::Broker>>>;

/// [`serve_metrics`]; with `guard`, a scrape needs the broker's HTTP credentials (401
/// without; 503 until the broker is open).
pub async fn serve_metrics_guarded(
    addr: SocketAddr,
    tls: Option<Arc<qanat_broker::tls::Tls>>,
    guard: Option<CredentialsFrom>,
) -> anyhow::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    // Histograms keep raw samples until upkeep folds them into buckets; without a scraper
    // that would grow without bound, so upkeep runs on its own clock too.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(
            move |ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap| {
                let (handle, guard) = (handle.clone(), guard.clone());
                async move {
                    if let Some(guard) = guard {
                        let Some(broker) = guard.get() else {
                            return (StatusCode::SERVICE_UNAVAILABLE, "the broker is starting")
                                .into_response();
                        };
                        let checked = qanat_broker::push::authenticate(
                            broker,
                            &headers,
                            Some(peer),
                            "metrics",
                        )
                        .await;
                        if let Err(refusal) = checked {
                            return refusal;
                        }
                    }
                    render(handle).await.into_response()
                }
            },
        ),
    );
    tokio::spawn(async move {
        if let Err(e) = crate::https::serve(listener, tls.as_deref(), app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

async fn render(handle: PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}
