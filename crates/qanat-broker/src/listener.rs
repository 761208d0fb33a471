//! Listeners and the byte streams of their connections.
//!
//! A [`Listener`] is a bound socket with a name, a security protocol (PLAINTEXT, SSL,
//! SASL_PLAINTEXT, SASL_SSL) and the address Metadata advertises to its clients: a client is
//! always told the listener it connected to, as Kafka does. A connection's stream is plain TCP
//! or TLS over TCP ([`ReadSide`], [`WriteSide`]); only plain TCP can `sendfile`, TLS responses
//! are copied through the record layer.
//!
//! rustls reads one record (at most ~16 KiB, often 4 KiB) per read of its transport, so a TLS
//! connection reads its socket through [`BufferedTcp`]: one `recv` of up to
//! [`TLS_READ_BUFFER_BYTES`] then serves many records.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::config::SecurityProtocol;
use crate::wire::{kernel_arrived_bytes, ArrivedBytes};

/// Size of a TLS connection's socket read buffer (one per TLS connection).
pub const TLS_READ_BUFFER_BYTES: usize = 64 * 1024;

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

/// A TCP stream whose reads are buffered ([`TLS_READ_BUFFER_BYTES`]); writes go straight
/// to the socket. The transport under rustls.
#[derive(Debug)]
pub struct BufferedTcp {
    stream: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// `filled - pos`, readable by the connection's read half without the stream's lock.
    buffered: Arc<AtomicUsize>,
}

impl BufferedTcp {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: vec![0; TLS_READ_BUFFER_BYTES].into_boxed_slice(),
            pos: 0,
            filled: 0,
            buffered: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    fn set_buffered(&self) {
        self.buffered
            .store(self.filled - self.pos, Ordering::Relaxed);
    }
}

impl AsyncRead for BufferedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            let mut fill = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.stream).poll_read(cx, &mut fill))?;
            this.filled = fill.filled().len();
            this.pos = 0;
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        this.set_buffered();
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for BufferedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The reading half of a TLS connection, with what it needs to estimate arrived bytes.
pub struct TlsReadHalf {
    half: ReadHalf<TlsStream<BufferedTcp>>,
    fd: RawFd,
    buffered: Arc<AtomicUsize>,
}

/// The reading half of a connection.
pub enum ReadSide {
    Plain(OwnedReadHalf),
    Tls(TlsReadHalf),
}

/// The writing half of a connection.
pub enum WriteSide {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<BufferedTcp>>),
}

/// Split a plain connection.
pub fn split_plain(stream: TcpStream) -> (ReadSide, WriteSide) {
    let (rd, wr) = stream.into_split();
    (ReadSide::Plain(rd), WriteSide::Plain(wr))
}

/// Split a TLS connection.
pub fn split_tls(stream: TlsStream<BufferedTcp>) -> (ReadSide, WriteSide) {
    let transport = stream.get_ref().0;
    let fd = transport.stream.as_raw_fd();
    let buffered = transport.buffered.clone();
    let (half, wr) = tokio::io::split(stream);
    (
        ReadSide::Tls(TlsReadHalf { half, fd, buffered }),
        WriteSide::Tls(wr),
    )
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadSide::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadSide::Tls(r) => r.poll_read_records(cx, buf),
        }
    }
}

impl TlsReadHalf {
    /// Fill `buf` with as many records' plaintext as are ready (the TLS stream hands out one
    /// record per read), so a large frame takes a few reads rather than one per 16 KiB.
    fn poll_read_records(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        while buf.remaining() > 0 {
            let before = buf.filled().len();
            match Pin::new(&mut self.half).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {}
                // End of stream: reported by the next read when bytes came first.
                Poll::Ready(Ok(())) => break,
                // The error comes back on the next read (rustls keeps it; the socket too).
                Poll::Ready(Err(_)) | Poll::Pending if buf.filled().len() > start => break,
                other => return other,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl ArrivedBytes for ReadSide {
    fn arrived_bytes(&self) -> Option<usize> {
        match self {
            ReadSide::Plain(r) => r.arrived_bytes(),
            // Ciphertext, in the kernel and in the read buffer: a record adds 22 bytes to at
            // most 16 KiB of plaintext, so this is the plaintext to within a fraction of a
            // percent (what rustls has decrypted but not handed out yet is not counted).
            ReadSide::Tls(r) => {
                // The fd stays open while `r.half` (which owns the stream) lives.
                let kernel = kernel_arrived_bytes(r.fd)?;
                Some(kernel + r.buffered.load(Ordering::Relaxed))
            }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::limits::RequestPool;
    use crate::tls::{ClientAuth, Tls, TlsSettings};
    use crate::wire::{FrameReader, Step};

    /// Bytes that differ from position to position, so a misplaced chunk shows.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A server TLS stream over [`BufferedTcp`] and the rustls client talking to it.
    async fn tls_pair(
        dir: &std::path::Path,
    ) -> (
        TlsStream<BufferedTcp>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let tls = Tls::new(TlsSettings {
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            client_auth: ClientAuth::None,
            client_ca_file: None,
        })
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            TlsConnector::from(Arc::new(client_config))
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let server = tls.acceptor().accept(BufferedTcp::new(tcp)).await.unwrap();
        (server, client.await.unwrap())
    }

    #[tokio::test]
    async fn tls_bytes_arrive_whole_and_in_order_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        let (server, mut client) = tls_pair(dir.path()).await;
        let upstream = pattern(3 << 20, 7);
        let downstream = pattern(1 << 20, 11);
        let (mut rd, mut wr) = split_tls(server);
        let sent = upstream.clone();
        let sender = tokio::spawn(async move {
            // Writes of uneven sizes, so records and reads do not line up.
            let mut at = 0;
            let mut size = 1;
            while at < sent.len() {
                let end = (at + size).min(sent.len());
                client.write_all(&sent[at..end]).await.unwrap();
                at = end;
                size = size * 7 % 100_003 + 1;
            }
            client.flush().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = vec![0; upstream.len()];
        rd.read_exact(&mut got).await.unwrap();
        assert!(got == upstream, "upstream bytes differ");
        wr.write_all(&downstream).await.unwrap();
        wr.shutdown().await.unwrap();
        drop(wr);
        let back = sender.await.unwrap();
        assert!(back == downstream, "downstream bytes differ");
    }

    #[tokio::test]
    async fn a_large_frame_over_tls_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (server, mut client) = tls_pair(dir.path()).await;
        let frame = pattern(5 << 20, 3);
        let (mut rd, _wr) = split_tls(server);
        let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&frame);
        let sender = tokio::spawn(async move {
            client.write_all(&wire).await.unwrap();
            client.flush().await.unwrap();
            client
        });
        let pool = RequestPool::new(64 << 20);
        let mut frames = FrameReader::new(64 << 20);
        let mut saw_arrived = false;
        let got = loop {
            saw_arrived |= rd.arrived_bytes().is_some();
            match frames.step(&mut rd, &pool).await.unwrap() {
                Step::Frame(got, _reservation) => break got,
                Step::Progress => {}
                Step::Eof => panic!("end of stream before the frame"),
            }
        };
        assert!(saw_arrived, "a TLS read side estimates its arrived bytes");
        assert_eq!(got.len(), frame.len());
        assert!(got[..] == frame[..], "frame bytes differ");
        drop(sender.await.unwrap());
    }
}
