//! `qanat broker`: open the data directory, listen, serve until SIGTERM/SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use qanat_broker::{Broker, Config};
use qanat_log::{OsStorage, SystemClock};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Args)]
pub struct BrokerArgs {
    /// Directory holding one sub-directory per partition.
    #[arg(long, env = "QANAT_DATA_DIR", default_value = "./qanat-data")]
    data_dir: PathBuf,
    /// Address of the Kafka-protocol listener (port 0 picks a free port).
    #[arg(long, env = "QANAT_LISTEN", default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// TOML configuration file ([broker] and [storage] tables).
    #[arg(long, env = "QANAT_CONFIG")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "QANAT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Serve the HTTP API (push subscriptions) on this address.
    #[arg(long, env = "QANAT_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading configuration {}", p.display()))?,
        None => String::new(),
    };
    let config =
        Config::from_toml_with_env(&text, std::env::vars()).with_context(|| match path {
            Some(p) => format!("in configuration {}", p.display()),
            None => "in QANAT_* environment overrides".to_string(),
        })?;
    Ok(config)
}

pub async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_ref())?;
    let mut stdout = std::io::stdout();
    if let Some(addr) = args.metrics_listen {
        let bound = crate::telemetry::serve_metrics(addr).await?;
        writeln!(stdout, "qanat metrics listening on {bound}")?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    let host = match &config.broker.advertised_host {
        Some(h) => h.clone(),
        None if bound.ip().is_unspecified() => {
            tracing::warn!("listening on all interfaces without [broker] advertised_host; advertising localhost");
            "localhost".to_string()
        }
        None => bound.ip().to_string(),
    };
    let port = config.broker.advertised_port.unwrap_or(bound.port());
    // Every partition keeps a descriptor per segment open: use all the hard limit allows.
    raise_open_file_limit();
    tracing::info!(data_dir = %args.data_dir.display(), fsync = ?config.storage.fsync, "opening storage");
    let data_dir = args.data_dir.clone();
    let broker = tokio::task::spawn_blocking(move || {
        Broker::open(
            config,
            &data_dir,
            Arc::new(OsStorage),
            Arc::new(SystemClock),
            (host, i32::from(port)),
        )
    })
    .await?
    .with_context(|| format!("opening data directory {}", args.data_dir.display()))?;
    let broker = Arc::new(broker);
    let background = broker.spawn_background();
    if let Some(addr) = args.http_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP API on {addr}"))?;
        writeln!(stdout, "qanat http listening on {}", listener.local_addr()?)?;
        let app = qanat_broker::push::router(broker.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "HTTP API stopped");
            }
        });
    }

    writeln!(stdout, "qanat broker listening on {bound}")?;
    stdout.flush()?;
    tracing::info!(%bound, "broker ready");

    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
    };
    qanat_broker::serve(listener, broker.clone(), shutdown).await?;

    broker.begin_shutdown();
    for task in background {
        let _ = task.await;
    }
    let closing = broker.clone();
    tokio::task::spawn_blocking(move || closing.close()).await?;
    tracing::info!("all partitions flushed and closed");
    Ok(())
}

/// Raise the soft RLIMIT_NOFILE to the hard limit and log the outcome; returns the limit in
/// force (None if it could not be read).
pub(crate) fn raise_open_file_limit() -> Option<u64> {
    match qanat_broker::fdlimit::raise_nofile_to_hard() {
        Ok((before, after)) if after > before => {
            tracing::info!(
                from = before,
                to = after,
                "raised the open-file limit (RLIMIT_NOFILE)"
            );
            Some(after)
        }
        Ok((_, limit)) => {
            tracing::info!(limit, "open-file limit (RLIMIT_NOFILE)");
            Some(limit)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit (RLIMIT_NOFILE)");
            None
        }
    }
}
