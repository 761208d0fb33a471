//! `qanat collect`: the HTTP collection server for web and mobile logs, until SIGTERM/SIGINT;
//! SIGHUP reloads the `[apps]` throttle table from the config file and the HTTPS certificate.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use qanat_collect::{CollectConfig, Collector};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Args)]
pub struct CollectArgs {
    /// TOML configuration ([server], [kafka], [[routes]], [apps.*]).
    #[arg(long, env = "QANAT_COLLECT_CONFIG")]
    config: PathBuf,
    /// HTTP address (port 0 picks a free port); overrides [server] listen.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Kafka-protocol bootstrap servers; overrides [kafka] bootstrap.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (HTTPS when [server] has a certificate).
    #[arg(long, env = "QANAT_COLLECT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// PEM certificate: serve HTTPS; overrides [server] tls_cert_file.
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key; overrides [server] tls_key_file.
    #[arg(long)]
    tls_key_file: Option<PathBuf>,
    /// Override [kafka.security] key by key.
    #[command(flatten)]
    security: crate::kafka_security::SecurityArgs,
}

fn load_config(path: &Path) -> anyhow::Result<CollectConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration {}", path.display()))?;
    CollectConfig::from_toml_with_env(&text, std::env::vars()).with_context(|| {
        format!(
            "in configuration {} (or QANAT_COLLECT_* overrides)",
            path.display()
        )
    })
}

pub async fn run(args: CollectArgs) -> anyhow::Result<()> {
    let mut config = load_config(&args.config)?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(bootstrap) = args.bootstrap {
        config.kafka.bootstrap = bootstrap;
    }
    if let Some(cert) = args.tls_cert_file {
        config.server.tls_cert_file = Some(cert);
    }
    if let Some(key) = args.tls_key_file {
        config.server.tls_key_file = Some(key);
    }
    config.kafka.security.overlay(&args.security.overrides());
    let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => Some(crate::https::load(
            cert,
            key,
            "server.tls_cert_file/server.tls_key_file",
        )?),
        (None, None) => None,
        _ => anyhow::bail!("server.tls_cert_file and server.tls_key_file go together"),
    };
    // Check it all and read the password now, so a bad setting fails the start with its key.
    config
        .kafka
        .security
        .properties("kafka.security")
        .with_context(|| format!("in configuration {}", args.config.display()))?;
    // Each connection is a descriptor: let the connection cap, not the descriptor limit, be
    // what refuses clients (out of descriptors the producers could not reconnect either).
    if let Some(limit) = crate::broker_cmd::raise_open_file_limit() {
        let cap = u64::try_from(config.server.max_connections).unwrap_or(u64::MAX);
        if cap.saturating_add(64) >= limit {
            tracing::warn!(
                max_connections = cap,
                open_file_limit = limit,
                "server.max_connections is not below the open-file limit; lower it or raise `ulimit -n`"
            );
        }
    }
    let mut stdout = std::io::stdout();
    // Before the collector starts: its metric handles bind to the installed recorder.
    if let Some(addr) = args.metrics_listen {
        let bound = crate::telemetry::serve_metrics(addr, tls.clone()).await?;
        writeln!(stdout, "qanat metrics listening on {bound}")?;
    }
    let listen = config.server.listen;
    let routes = config.routes.len();
    let collector = Collector::start(config).context("starting the collector")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr()?;

    let throttle = collector.throttle();
    let path = args.config.clone();
    let mut hup = signal(SignalKind::hangup())?;
    let reload_tls = tls.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if let Some(tls) = &reload_tls {
                crate::https::reload(tls, "HTTPS");
            }
            match load_config(&path) {
                Ok(c) => {
                    let version = throttle.replace_all(c.apps);
                    tracing::info!(version, "SIGHUP: throttle table reloaded ([server], [kafka] and routes need a restart)");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: reload failed; keeping the current table")
                }
            }
        }
    });

    writeln!(stdout, "qanat collect listening on {bound}")?;
    stdout.flush()?;
    tracing::info!(%bound, routes, "collector ready");

    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let reports = collector
        .serve(listener, tls.map(|t| t.acceptor().clone()), shutdown)
        .await?;
    let mut lost = 0;
    for r in &reports {
        tracing::info!(route = %r.route, delivered = r.delivered, failed = r.failed, undelivered = r.undelivered, "route drained");
        lost += r.failed + r.undelivered;
    }
    anyhow::ensure!(
        lost == 0,
        "{lost} accepted events were not delivered to the broker"
    );
    tracing::info!("every accepted event delivered");
    Ok(())
}
