//! What `qanat users`, `acls` and `quotas` share: editing a stopped broker's data directory
//! under its lock, so an offline edit never races a running broker that would overwrite it,
//! and the connection that changes a running broker instead (`--bootstrap`), through the
//! Kafka admin APIs any Kafka tool would use.

use std::cell::RefCell;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use qanat_agent::sink::native::conn::{Conn, Security};
use qanat_broker::data_dir_lock::DataDirLock;

/// Take the data directory's lock for an offline edit (nothing when the directory does not
/// exist yet); refused while a broker runs there.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<Option<DataDirLock>> {
    DataDirLock::acquire_if_exists(data_dir).with_context(|| {
        format!(
            "editing {} offline needs the broker stopped; a running broker is changed with \
             --bootstrap HOST:PORT",
            data_dir.display()
        )
    })
}

/// How long a request to a running broker may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// One connection to a running broker for admin requests, one at a time, each at the highest
/// version both sides speak within the range the caller's message needs.
pub struct AdminConn {
    conn: RefCell<Conn>,
}

impl AdminConn {
    /// Connect to `addr` as the security flags say (TLS, SASL login), failing at once on a
    /// refused certificate or login.
    pub fn connect(
        addr: &str,
        client_id: &str,
        security: &crate::kafka_security::SecurityArgs,
    ) -> anyhow::Result<Self> {
        let settings = security.resolve()?;
        let security = Security::from_settings(&settings, "security")?;
        let conn = Conn::connect(addr, client_id, TIMEOUT, &security)
            .with_context(|| format!("connecting to {addr}"))?;
        Ok(Self {
            conn: RefCell::new(conn),
        })
    }

    /// Send `req` as `api` and return the answer with the version it was sent at.
    pub fn call<Req, Resp>(
        &self,
        api: ApiKey,
        ours: RangeInclusive<i16>,
        req: &Req,
    ) -> anyhow::Result<Resp>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let mut conn = self.conn.borrow_mut();
        let version = conn.version(api, ours)?;
        conn.request(api, version, req)
            .with_context(|| format!("{api:?} to {}", conn.addr))
    }
}

/// A Kafka error code, with the broker's message when it sent one, as text.
pub fn error_text(code: i16, message: Option<&StrBytes>) -> String {
    let name = kafka_protocol::ResponseError::try_from_code(code)
        .map_or_else(|| format!("error {code}"), |e| format!("{e:?}"));
    match message {
        Some(m) if !m.is_empty() => format!("{name}: {}", m.as_str()),
        _ => name,
    }
}

pub fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}
