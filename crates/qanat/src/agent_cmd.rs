//! `qanat agent`: the log agent (crate `qanat-agent`) as a command: configuration, flags,
//! signals and the metrics endpoint. Exit status 3 means a corrupt checkpoint under
//! `on_corrupt_checkpoint = "stop"`; 1 any other failure, including a final checkpoint that
//! could not be written at shutdown.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use qanat_agent::{AgentConfig, AgentError, OsCheckpointFs, SystemClock};
use tokio::signal::unix::{signal, SignalKind};

/// Exit status for a checkpoint that failed its checks with the `stop` policy.
const EXIT_CORRUPT_CHECKPOINT: i32 = 3;

#[derive(Args)]
pub struct AgentArgs {
    /// TOML configuration (sources, output, checkpoints).
    #[arg(long, env = "QANAT_AGENT_CONFIG")]
    config: PathBuf,
    /// Broker address(es), HOST:PORT[,...]; overrides [output] bootstrap.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Overrides checkpoint_dir.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Overrides host (the host id in file ids and headers).
    #[arg(long)]
    host: Option<String>,
    /// Discover files by periodic rescan only (same as QANAT_AGENT_INOTIFY=false).
    #[arg(long)]
    no_inotify: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "QANAT_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Override [output.security] key by key.
    #[command(flatten)]
    security: crate::kafka_security::SecurityArgs,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading configuration {}", args.config.display()))?;
    let mut cfg = AgentConfig::from_toml_with_env(&text, std::env::vars())
        .with_context(|| format!("in configuration {}", args.config.display()))?;
    if let Some(b) = args.bootstrap {
        cfg.output.bootstrap = b;
    }
    if let Some(d) = args.checkpoint_dir {
        cfg.checkpoint_dir = d;
    }
    if let Some(h) = args.host {
        cfg.host = Some(h);
    }
    if args.no_inotify {
        cfg.inotify = false;
    }
    cfg.output.security.overlay(&args.security.overrides());
    // Check it all and read the password now, so a bad setting fails the start with its key
    // (the native producer reads its files when it is made, at the start too).
    if cfg.output.effective_producer() == qanat_agent::config::ProducerKind::Librdkafka {
        cfg.output
            .security
            .properties("output.security")
            .with_context(|| format!("in configuration {}", args.config.display()))?;
    } else {
        cfg.output
            .security
            .validate("output.security")
            .with_context(|| format!("in configuration {}", args.config.display()))?;
    }
    if let Some(addr) = args.metrics_listen {
        let bound = crate::telemetry::serve_metrics(addr, None).await?;
        println!("qanat metrics listening on {bound}");
    }

    let shutdown = Arc::new(AtomicBool::new(false));
    let flag = shutdown.clone();
    let mut agent = tokio::task::spawn_blocking(move || {
        qanat_agent::run(
            cfg,
            Box::new(OsCheckpointFs),
            Arc::new(SystemClock),
            &flag,
            |a| {
                let mut out = std::io::stdout();
                let _ = writeln!(
                    out,
                    "qanat agent running: host {}, {} files",
                    a.host(),
                    a.files_tracked()
                );
                let _ = out.flush();
            },
        )
    });
    let mut term = signal(SignalKind::terminate())?;
    let result = tokio::select! {
        r = &mut agent => r,
        _ = term.recv() => {
            tracing::info!("SIGTERM: flushing and writing the final checkpoint");
            shutdown.store(true, Ordering::Release);
            agent.await
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: flushing and writing the final checkpoint");
            shutdown.store(true, Ordering::Release);
            agent.await
        }
    }
    .context("agent thread")?;
    match result {
        Ok(()) => Ok(()),
        Err(e @ AgentError::CorruptCheckpoint { .. }) => {
            eprintln!("error: {e}");
            std::process::exit(EXIT_CORRUPT_CHECKPOINT);
        }
        Err(e) => Err(e.into()),
    }
}
