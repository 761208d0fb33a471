//! Listeners and the byte streams of their connections.
//!
//! A [`Listener`] is a bound socket with a name, a security protocol (PLAINTEXT, SSL,
//! SASL_PLAINTEXT, SASL_SSL) and the address Metadata advertises to its clients: a client is
//! always told the listener it connected to, as Kafka does. A connection's stream is plain TCP
//! or TLS over TCP ([`ReadSide`], [`WriteSide`]); only plain TCP can `sendfile`, TLS responses
//! are copied through the record layer.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::config::SecurityProtocol;
use crate::wire::ArrivedBytes;

/// Name of the listener bound with `--listen`.
pub const DEFAULT_LISTENER: &str = "PLAINTEXT";

/// Principal of a connection that has not authenticated (Kafka's `User:ANONYMOUS`).
pub const ANONYMOUS: &str = "User:ANONYMOUS";

/// A bound listener and what its clients are told.
pub struct Listener {
    pub name: String,
    pub protocol: SecurityProtocol,
    pub socket: TcpListener,
    /// (host, port) advertised in Metadata to clients of this listener.
    pub advertised: (String, i32),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("advertised", &self.advertised)
            .finish()
    }
}

/// What a connection knows about the listener that accepted it.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub name: String,
    pub protocol: SecurityProtocol,
    pub advertised: (String, i32),
}

impl Listener {
    /// The PLAINTEXT listener `--listen` binds.
    pub fn plaintext(socket: TcpListener, advertised: (String, i32)) -> Self {
        Self {
            name: DEFAULT_LISTENER.to_string(),
            protocol: SecurityProtocol::Plaintext,
            socket,
            advertised,
        }
    }

    pub fn info(&self) -> Arc<ListenerInfo> {
        Arc::new(ListenerInfo {
            name: self.name.clone(),
            protocol: self.protocol,
            advertised: self.advertised.clone(),
        })
    }
}

/// The reading half of a connection.
pub enum ReadSide {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// The writing half of a connection.
pub enum WriteSide {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

/// Split a plain connection.
pub fn split_plain(stream: TcpStream) -> (ReadSide, WriteSide) {
    let (rd, wr) = stream.into_split();
    (ReadSide::Plain(rd), WriteSide::Plain(wr))
}

/// Split a TLS connection.
pub fn split_tls(stream: TlsStream<TcpStream>) -> (ReadSide, WriteSide) {
    let (rd, wr) = tokio::io::split(stream);
    (ReadSide::Tls(rd), WriteSide::Tls(wr))
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadSide::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadSide::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl ArrivedBytes for ReadSide {
    fn arrived_bytes(&self) -> Option<usize> {
        match self {
            ReadSide::Plain(r) => r.arrived_bytes(),
            // Kernel bytes are ciphertext; their count says little about the plaintext.
            ReadSide::Tls(_) => None,
        }
    }
}

impl WriteSide {
    /// The socket, when bytes written to it go out as they are (sendfile is possible).
    pub fn plain_socket(&self) -> Option<&TcpStream> {
        match self {
            WriteSide::Plain(w) => Some(w.as_ref()),
            WriteSide::Tls(_) => None,
        }
    }

    pub fn raw_fd(&self) -> Option<i32> {
        self.plain_socket().map(|s| s.as_raw_fd())
    }
}

impl AsyncWrite for WriteSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteSide::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteSide::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteSide::Plain(w) => Pin::new(w).poll_shutdown(cx),
            WriteSide::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
