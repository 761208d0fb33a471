//! One blocking connection to one broker: length-prefixed Kafka requests and their answers,
//! encoded with kafka-protocol, and the API versions both sides speak (ApiVersions v0 once).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

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
}

/// Largest answer accepted (a Metadata answer of a big cluster stays far below).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

pub struct Conn {
    stream: TcpStream,
    pub addr: String,
    client_id: StrBytes,
    correlation: i32,
    /// Versions of the broker for the APIs used here: (key, min, max).
    versions: Vec<(i16, i16, i16)>,
}

impl Conn {
    /// Connect to `addr` (`host:port`) and ask its API versions.
    pub fn connect(addr: &str, client_id: &str, timeout: Duration) -> Result<Conn, ConnError> {
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
        let mut conn = Conn {
            stream,
            addr: addr.to_string(),
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
        Ok(conn)
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
        let correlation = self.send(api, version, req)?;
        self.receive(version, correlation)
    }

    /// Write one request; returns its correlation id.
    pub fn send<Req>(&mut self, api: ApiKey, version: i16, req: &Req) -> Result<i32, ConnError>
    where
        Req: Encodable + HeaderVersion,
    {
        self.correlation = self.correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(self.client_id.clone()));
        let mut buf = BytesMut::with_capacity(256);
        buf.extend_from_slice(&[0; 4]);
        header
            .encode(&mut buf, Req::header_version(version))
            .and_then(|()| req.encode(&mut buf, version))
            .map_err(|e| self.protocol("encoding a request", e.to_string()))?;
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        self.stream
            .write_all(&buf)
            .map_err(|source| ConnError::Io {
                addr: self.addr.clone(),
                source,
            })?;
        Ok(self.correlation)
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
