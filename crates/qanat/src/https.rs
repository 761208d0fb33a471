//! HTTPS for the HTTP endpoints (the broker's push API, the metrics endpoint): a TLS
//! listener for `axum::serve`, on the broker's reloadable certificate
//! ([`qanat_broker::tls::Tls`], the same code as the SSL Kafka listeners).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use qanat_broker::tls::{ClientAuth, Tls, TlsSettings};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A handshake that does not finish in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (descriptors exhausted), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Load a server certificate and key for an HTTP endpoint; `keys` names the settings in
/// errors (`"server.tls_cert_file/tls_key_file"`, `"--http-tls-cert-file"` …).
pub fn load(cert_file: &Path, key_file: &Path, keys: &str) -> anyhow::Result<Arc<Tls>> {
    let tls = Tls::new(TlsSettings {
        cert_file: PathBuf::from(cert_file),
        key_file: PathBuf::from(key_file),
        client_auth: ClientAuth::None,
        client_ca_file: None,
    })
    .with_context(|| format!("loading {keys}"))?;
    Ok(Arc::new(tls))
}

/// Reload `tls` from its files, logging the outcome (for SIGHUP handlers).
pub fn reload(tls: &Tls, what: &str) {
    match tls.reload() {
        Ok(()) => tracing::info!("SIGHUP: {what} TLS certificate reloaded"),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: {what} TLS certificate not reloaded; the previous one stays in use")
        }
    }
}

/// Accepted connections after their TLS handshake. Handshakes run in their own tasks, so a
/// slow client does not hold up the others.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            while !tx.is_closed() {
                let (stream, peer) = match tcp.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serve `app` on `listener`, over TLS when `tls` is given. Handlers see the peer address as
/// `ConnectInfo<SocketAddr>` (failed logins are logged and slowed per address).
pub async fn serve(listener: TcpListener, tls: Option<&Tls>, app: axum::Router) -> io::Result<()> {
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => axum::serve(listener, app).await,
        Some(tls) => {
            // `tap_io` gives the listener axum's connect-info support (by its `Addr`).
            let listener = TlsListener::new(listener, tls.acceptor().clone())?.tap_io(|_| {});
            axum::serve(listener, app).await
        }
    }
}
