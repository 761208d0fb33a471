//! One blocking connection to one broker: length-prefixed Kafka requests and their answers,
//! encoded with kafka-protocol, and the API versions both sides speak (ApiVersions v0 once).
//!
//! Security ([`Security`], from the output's `qanat_config::KafkaSecurity`): TLS with
//! `rustls` (ring provider; the CA file or the system's trust store, an optional client
//! certificate, the server name), then SASL (SaslHandshake v1 and SaslAuthenticate) with PLAIN
//! or SCRAM-SHA-256/512 (`qanat_scram`'s client). A connection is usable only once both are
//! done; a refused login is [`ConnError::Authentication`] with the broker's message.
//!
//! Each request is encoded into one buffer and written with one `write_all`: over TLS, rustls
//! (no buffer limit) seals the whole request into full-size records, flushed with vectored
//! writes, rather than a record per small write.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use qanat_scram::{ScramClient, ScramMechanism};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// A failed exchange; the connection is dropped and made again.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: {what}: {reason}")]
    Protocol {
        addr: String,
        what: &'static str,
        reason: String,
    },
    #[error("{addr}: the broker speaks no version of {api:?} this producer knows")]
    Unsupported { addr: String, api: ApiKey },
    #[error("{addr}: TLS: {reason}")]
    Tls { addr: String, reason: String },
    #[error("{addr}: SASL authentication failed: {reason}")]
    Authentication { addr: String, reason: String },
}

/// Security settings that cannot be used (a file that does not load, a bad server name).
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Settings(#[from] qanat_config::SecurityError),
    #[error("{key}: {reason}")]
    Tls { key: String, reason: String },
}

/// The TLS half of [`Security`].
#[derive(Debug, Clone)]
struct TlsClient {
    config: Arc<ClientConfig>,
    /// Checked against the broker's certificate instead of the host connected to.
    server_name: Option<ServerName<'static>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SaslMechanism {
    Plain,
    Scram(ScramMechanism),
}

impl SaslMechanism {
    fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::Scram(m) => m.name(),
        }
    }
}

/// The SASL half of [`Security`]; the password is never printed.
#[derive(Clone)]
struct SaslLogin {
    mechanism: SaslMechanism,
    user: String,
    password: String,
}

impl std::fmt::Debug for SaslLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslLogin")
            .field("mechanism", &self.mechanism.name())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// How every connection of a producer is secured, prepared once from the settings (files and
/// password read then).
#[derive(Debug, Clone, Default)]
pub struct Security {
    tls: Option<TlsClient>,
    sasl: Option<SaslLogin>,
}

impl Security {
    /// From `settings` (the table at `prefix` in the config, for error messages), the password
    /// read from its file or the process environment.
    pub fn from_settings(
        settings: &qanat_config::KafkaSecurity,
        prefix: &str,
    ) -> Result<Security, SecurityError> {
        Self::from_settings_with(settings, prefix, |var| std::env::var(var).ok())
    }

    /// [`Self::from_settings`] with `env` looking environment variables up.
    pub fn from_settings_with(
        settings: &qanat_config::KafkaSecurity,
        prefix: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Security, SecurityError> {
        settings.validate(prefix)?;
        let protocol = settings.protocol();
        let tls = if protocol.ends_with("SSL") {
            Some(tls_client(settings, prefix)?)
        } else {
            None
        };
        let sasl = match settings.sasl_login_with(prefix, env)? {
            Some((mechanism, user, password)) => {
                let mechanism = match mechanism.as_str() {
                    "PLAIN" => SaslMechanism::Plain,
                    other => {
                        SaslMechanism::Scram(ScramMechanism::from_name(other).ok_or_else(|| {
                            qanat_config::SecurityError {
                                key: format!("{prefix}.mechanism"),
                                reason: format!("{other:?} is not supported"),
                            }
                        })?)
                    }
                };
                Some(SaslLogin {
                    mechanism,
                    user,
                    password,
                })
            }
            None => None,
        };
        Ok(Security { tls, sasl })
    }
}

fn tls_client(
    settings: &qanat_config::KafkaSecurity,
    prefix: &str,
) -> Result<TlsClient, SecurityError> {
    let err = |key: &str, reason: String| SecurityError::Tls {
        key: format!("{prefix}.{key}"),
        reason,
    };
    let load_certs =
        |key: &str, path: &Path| -> Result<Vec<CertificateDer<'static>>, SecurityError> {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| err(key, format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(err(
                    key,
                    format!("{}: no CERTIFICATE in the file", path.display()),
                ));
            }
            Ok(certs)
        };
    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            for ca in load_certs("ca_file", path)? {
                roots
                    .add(ca)
                    .map_err(|e| err("ca_file", format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(err(
                    "ca_file",
                    "not set, and the system's trust store has no certificate".into(),
                ));
            }
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| err("protocol", e.to_string()))?
            .with_root_certificates(roots);
    let mut config = match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => {
            let certs = load_certs("cert_file", cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| err("key_file", format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key_der)
                .map_err(|e| err("key_file", format!("{}: {e}", key.display())))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols.clear();
    let server_name = settings
        .server_name
        .as_ref()
        .map(|name| {
            ServerName::try_from(name.clone())
                .map_err(|e| err("server_name", format!("{name:?}: {e}")))
        })
        .transpose()?;
    Ok(TlsClient {
        config: Arc::new(config),
        server_name,
    })
}

/// The byte stream under the Kafka protocol.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Largest answer accepted (a Metadata answer of a big cluster stays far below).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

pub struct Conn {
    stream: Stream,
    pub addr: String,
    /// The read timeout of a whole answer, restored after [`Conn::answer_ready`] waits.
    timeout: Duration,
    client_id: StrBytes,
    correlation: i32,
    /// Versions of the broker for the APIs used here: (key, min, max).
    versions: Vec<(i16, i16, i16)>,
}

impl Conn {
    /// Connect to `addr` (`host:port`), secure the connection as `security` says, ask the
    /// broker's API versions and log in.
    pub fn connect(
        addr: &str,
        client_id: &str,
        timeout: Duration,
        security: &Security,
    ) -> Result<Conn, ConnError> {
        let io = |source| ConnError::Io {
            addr: addr.to_string(),
            source,
        };
        let mut last = None;
        let mut stream = None;
        for a in addr.to_socket_addrs().map_err(io)? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            io(last
                .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
        })?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let stream = match &security.tls {
            None => Stream::Plain(stream),
            Some(tls) => Stream::Tls(Box::new(tls_handshake(addr, tls, stream)?)),
        };
        let mut conn = Conn {
            stream,
            addr: addr.to_string(),
            timeout,
            client_id: StrBytes::from_string(client_id.to_string()),
            correlation: 0,
            versions: Vec::new(),
        };
        let answer: ApiVersionsResponse =
            conn.request(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
        if answer.error_code != 0 {
            return Err(conn.protocol("ApiVersions", format!("error {}", answer.error_code)));
        }
        conn.versions = answer
            .api_keys
            .iter()
            .map(|k| (k.api_key, k.min_version, k.max_version))
            .collect();
        if let Some(login) = &security.sasl {
            conn.login(login)?;
        }
        Ok(conn)
    }

    /// SaslHandshake v1, then SaslAuthenticate: one token for PLAIN, two for SCRAM (whose
    /// server-final is checked, so a broker that does not know the password is refused too).
    fn login(&mut self, login: &SaslLogin) -> Result<(), ConnError> {
        let mechanism = login.mechanism.name();
        let handshake: SaslHandshakeResponse = self.request(
            ApiKey::SaslHandshake,
            1,
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism)),
        )?;
        if handshake.error_code != 0 {
            let offered: Vec<&str> = handshake.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(self.refused(format!(
                "the broker does not take {mechanism} (error {}; it offers {})",
                handshake.error_code,
                offered.join(", ")
            )));
        }
        let version = self.version(ApiKey::SaslAuthenticate, 0..=2)?;
        match login.mechanism {
            SaslMechanism::Plain => {
                let mut token = Vec::with_capacity(login.user.len() + login.password.len() + 2);
                token.push(0);
                token.extend_from_slice(login.user.as_bytes());
                token.push(0);
                token.extend_from_slice(login.password.as_bytes());
                self.authenticate(version, token)?;
            }
            SaslMechanism::Scram(m) => {
                let client = ScramClient::new(m, &login.user, login.password.as_bytes());
                let server_first =
                    self.authenticate(version, client.client_first().into_bytes())?;
                let (client_final, check) = client
                    .client_final(&server_first)
                    .map_err(|e| self.refused(e.to_string()))?;
                let server_final = self.authenticate(version, client_final.into_bytes())?;
                check
                    .verify(&server_final)
                    .map_err(|e| self.refused(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// One SaslAuthenticate round: the broker's token, or its refusal.
    fn authenticate(&mut self, version: i16, token: Vec<u8>) -> Result<Bytes, ConnError> {
        let answer: SaslAuthenticateResponse = self.request(
            ApiKey::SaslAuthenticate,
            version,
            &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token)),
        )?;
        if answer.error_code != 0 {
            let message = answer
                .error_message
                .as_ref()
                .map_or_else(|| format!("error {}", answer.error_code), |m| m.to_string());
            return Err(self.refused(message));
        }
        Ok(answer.auth_bytes)
    }

    fn refused(&self, reason: String) -> ConnError {
        ConnError::Authentication {
            addr: self.addr.clone(),
            reason,
        }
    }

    fn protocol(&self, what: &'static str, reason: String) -> ConnError {
        ConnError::Protocol {
            addr: self.addr.clone(),
            what,
            reason,
        }
    }

    /// The highest version of `api` both the broker and `ours` (kafka-protocol's range, capped
    /// where this producer's use of the message stops) speak.
    pub fn version(
        &self,
        api: ApiKey,
        ours: std::ops::RangeInclusive<i16>,
    ) -> Result<i16, ConnError> {
        self.versions
            .iter()
            .find(|(k, _, _)| *k == api as i16)
            .and_then(|&(_, min, max)| {
                let v = max.min(*ours.end());
                (v >= min.max(*ours.start())).then_some(v)
            })
            .ok_or(ConnError::Unsupported {
                addr: self.addr.clone(),
                api,
            })
    }

    /// Send `req` as `api` v`version` and read its answer.
    pub fn request<Req, Resp>(
        &mut self,
        api: ApiKey,
        version: i16,
        req: &Req,
    ) -> Result<Resp, ConnError>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let correlation = self.send(api, version, req, 256)?;
        self.receive(version, correlation)
    }

    /// Write one request (`size_hint`: about its encoded size, so the buffer is allocated
    /// once); returns its correlation id. Several may be sent before their answers are read:
    /// the broker answers in request order.
    pub fn send<Req>(
        &mut self,
        api: ApiKey,
        version: i16,
        req: &Req,
        size_hint: usize,
    ) -> Result<i32, ConnError>
    where
        Req: Encodable + HeaderVersion,
    {
        self.correlation = self.correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(self.client_id.clone()));
        let mut buf = BytesMut::with_capacity(size_hint.saturating_add(256));
        buf.extend_from_slice(&[0; 4]);
        header
            .encode(&mut buf, Req::header_version(version))
            .and_then(|()| req.encode(&mut buf, version))
            .map_err(|e| self.protocol("encoding a request", e.to_string()))?;
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        // One write of the whole request, then a flush: over TLS the write only queues what
        // the socket does not take at once, and the flush reports a failed send.
        self.stream
            .write_all(&buf)
            .and_then(|()| self.stream.flush())
            .map_err(|source| ConnError::Io {
                addr: self.addr.clone(),
                source,
            })?;
        Ok(self.correlation)
    }

    /// Whether an answer has begun to arrive (or the connection ended: then `receive` says
    /// why), waiting up to `wait` for it; a zero `wait` only looks.
    pub fn answer_ready(&mut self, wait: Duration) -> Result<bool, ConnError> {
        let io = |addr: &str, source| ConnError::Io {
            addr: addr.to_string(),
            source,
        };
        let tcp = match &mut self.stream {
            Stream::Plain(s) => &*s,
            Stream::Tls(s) => {
                // Records already read may hold an answer that the socket no longer shows.
                let state = s
                    .conn
                    .process_new_packets()
                    .map_err(|e| io(&self.addr, std::io::Error::other(e)))?;
                if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
                    return Ok(true);
                }
                &s.sock
            }
        };
        let mut byte = [0u8; 1];
        let peeked = if wait.is_zero() {
            tcp.set_nonblocking(true).map_err(|e| io(&self.addr, e))?;
            let r = tcp.peek(&mut byte);
            tcp.set_nonblocking(false).map_err(|e| io(&self.addr, e))?;
            r
        } else {
            tcp.set_read_timeout(Some(wait))
                .map_err(|e| io(&self.addr, e))?;
            let r = tcp.peek(&mut byte);
            tcp.set_read_timeout(Some(self.timeout))
                .map_err(|e| io(&self.addr, e))?;
            r
        };
        match peeked {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(io(&self.addr, e)),
        }
    }

    /// Read the answer to the request `correlation` (sent as v`version`).
    pub fn receive<Resp>(&mut self, version: i16, correlation: i32) -> Result<Resp, ConnError>
    where
        Resp: Decodable + HeaderVersion,
    {
        let io = |source| ConnError::Io {
            addr: self.addr.clone(),
            source,
        };
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(io)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RESPONSE_BYTES {
            return Err(self.protocol("answer", format!("{len} bytes is too long")));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).map_err(io)?;
        let mut body = Bytes::from(body);
        let header = ResponseHeader::decode(&mut body, Resp::header_version(version))
            .map_err(|e| self.protocol("answer header", e.to_string()))?;
        if header.correlation_id != correlation {
            return Err(self.protocol(
                "answer",
                format!(
                    "correlation id {} where {correlation} was due",
                    header.correlation_id
                ),
            ));
        }
        Resp::decode(&mut body, version).map_err(|e| self.protocol("answer", e.to_string()))
    }
}

/// The TLS handshake on `tcp`, done now so a refused certificate is a clear error.
fn tls_handshake(
    addr: &str,
    tls: &TlsClient,
    mut tcp: TcpStream,
) -> Result<StreamOwned<ClientConnection, TcpStream>, ConnError> {
    let failed = |reason: String| ConnError::Tls {
        addr: addr.to_string(),
        reason,
    };
    let name = match &tls.server_name {
        Some(n) => n.clone(),
        None => ServerName::try_from(host_of(addr).to_string())
            .map_err(|e| failed(format!("{:?} as a server name: {e}", host_of(addr))))?,
    };
    let mut session =
        ClientConnection::new(tls.config.clone(), name).map_err(|e| failed(e.to_string()))?;
    // No limit on what rustls queues: a request is handed over whole and sealed into
    // full-size records (requests are bounded by the batch size and the partitions).
    session.set_buffer_limit(None);
    while session.is_handshaking() {
        session.complete_io(&mut tcp).map_err(|e| {
            // rustls reports its own errors (certificate refused, alert) as InvalidData.
            match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(r) => failed(r.to_string()),
                None => ConnError::Io {
                    addr: addr.to_string(),
                    source: e,
                },
            }
        })?;
    }
    Ok(StreamOwned::new(session, tcp))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("bus.example.com:9093"), "bus.example.com");
        assert_eq!(host_of("[::1]:9093"), "::1");
        assert_eq!(host_of("10.0.0.1:9092"), "10.0.0.1");
    }

    #[test]
    fn security_from_settings_reads_the_password_and_hides_it() {
        let settings = qanat_config::KafkaSecurity {
            protocol: Some("SASL_PLAINTEXT".into()),
            mechanism: Some("scram-sha-256".into()),
            username: Some("agent".into()),
            password_env: Some("PW".into()),
            ..Default::default()
        };
        let s = Security::from_settings_with(&settings, "output.security", |v| {
            (v == "PW").then(|| "hunter2".to_string())
        })
        .unwrap();
        assert!(s.tls.is_none());
        let login = s.sasl.as_ref().unwrap();
        assert!(login.mechanism == SaslMechanism::Scram(ScramMechanism::Sha256));
        assert_eq!(login.password, "hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        let missing = Security::from_settings_with(&settings, "output.security", |_| None);
        assert!(missing
            .unwrap_err()
            .to_string()
            .contains("output.security.password_file"));
        let bad_ca = qanat_config::KafkaSecurity {
            protocol: Some("SSL".into()),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = Security::from_settings_with(&bad_ca, "output.security", |_| None).unwrap_err();
        assert!(e.to_string().contains("output.security.ca_file"), "{e}");
    }
}
