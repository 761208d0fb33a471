//! `qanat broker`: open the data directory, listen, serve until SIGTERM/SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use qanat_broker::listener::{Listener, DEFAULT_LISTENER};
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
    /// PEM certificate: serve the HTTP API and the metrics endpoint over HTTPS (reloaded on
    /// SIGHUP with the key).
    #[arg(long, env = "QANAT_HTTP_TLS_CERT_FILE", requires = "http_tls_key_file")]
    http_tls_cert_file: Option<PathBuf>,
    /// PEM private key of --http-tls-cert-file.
    #[arg(long, env = "QANAT_HTTP_TLS_KEY_FILE", requires = "http_tls_cert_file")]
    http_tls_key_file: Option<PathBuf>,
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

/// One glibc malloc arena per CPU for the broker, unless `MALLOC_ARENA_MAX` says otherwise.
/// Its async worker cores move between OS threads (a Produce append hands its core on), and
/// glibc gives each thread that allocates an arena of its own, up to 8 per CPU, which keeps
/// what was freed in it: with 16 consumer groups the broker's peak RSS was 42–54 MiB with
/// glibc's default and 30 MiB with this cap. Called before the runtime starts any thread.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn cap_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: mallopt sets one allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, i32::try_from(cpus).unwrap_or(i32::MAX));
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn cap_malloc_arenas() {}

pub async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_ref())?;
    // Held until the process exits: a second broker on this directory refuses to start.
    let _data_dir_lock = qanat_broker::data_dir_lock::DataDirLock::acquire(&args.data_dir)
        .context("a broker needs its data directory to itself")?;
    let mut stdout = std::io::stdout();
    let http_tls = match (&args.http_tls_cert_file, &args.http_tls_key_file) {
        (Some(cert), Some(key)) => Some(crate::https::load(
            cert,
            key,
            "--http-tls-cert-file/--http-tls-key-file",
        )?),
        _ => None,
    };
    let metrics_guard = config
        .metrics
        .require_credentials
        .then(crate::telemetry::CredentialsFrom::default);
    if let Some(addr) = args.metrics_listen {
        let bound =
            crate::telemetry::serve_metrics_guarded(addr, http_tls.clone(), metrics_guard.clone())
                .await?;
        writeln!(stdout, "qanat metrics listening on {bound}")?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    let host = advertised_host(config.broker.advertised_host.as_deref(), bound);
    let port = config.broker.advertised_port.unwrap_or(bound.port());
    let mut listeners = vec![Listener {
        name: DEFAULT_LISTENER.to_string(),
        protocol: config.broker.listen_security_protocol,
        socket: listener,
        advertised: (host.clone(), i32::from(port)),
    }];
    for l in &config.broker.listener {
        let socket = tokio::net::TcpListener::bind(l.address)
            .await
            .with_context(|| format!("binding listener {} on {}", l.name, l.address))?;
        let addr = socket.local_addr()?;
        let advertised = (
            advertised_host(l.advertised_host.as_deref(), addr),
            i32::from(l.advertised_port.unwrap_or(addr.port())),
        );
        listeners.push(Listener {
            name: l.name.clone(),
            protocol: l.security_protocol,
            socket,
            advertised,
        });
    }
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
    if let Some(guard) = &metrics_guard {
        let _ = guard.set(broker.clone());
    }
    let background = broker.spawn_background();
    if let Some(addr) = args.http_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP API on {addr}"))?;
        writeln!(stdout, "qanat http listening on {}", listener.local_addr()?)?;
        let app = qanat_broker::push::router(broker.clone());
        let tls = http_tls.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::https::serve(listener, tls.as_deref(), app).await {
                tracing::error!(error = %e, "HTTP API stopped");
            }
        });
    }

    for l in &listeners[1..] {
        writeln!(
            stdout,
            "qanat listener {} ({}) listening on {}",
            l.name,
            l.protocol.as_str(),
            l.socket.local_addr()?
        )?;
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
    let reloader = broker.clone();
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match reloader.tls.as_ref().map(|t| t.reload()) {
                Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; the previous one stays in use")
                }
                None => tracing::info!("SIGHUP: no [tls] configured, nothing to reload"),
            }
            if let Some(tls) = &http_tls {
                crate::https::reload(tls, "HTTP");
            }
        }
    });
    qanat_broker::serve(listeners, broker.clone(), shutdown).await?;

    broker.begin_shutdown();
    for task in background {
        let _ = task.await;
    }
    let closing = broker.clone();
    tokio::task::spawn_blocking(move || closing.close()).await?;
    tracing::info!("all partitions flushed and closed");
    Ok(())
}

/// The configured host, else the bound address (localhost for a wildcard address).
fn advertised_host(configured: Option<&str>, bound: SocketAddr) -> String {
    match configured {
        Some(h) => h.to_string(),
        None if bound.ip().is_unspecified() => {
            tracing::warn!(%bound, "listening on all interfaces without an advertised host; advertising localhost");
            "localhost".to_string()
        }
        None => bound.ip().to_string(),
    }
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
