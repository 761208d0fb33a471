//! Broker configuration: the `[broker]`, `[storage]`, `[fetch]` and other tables of the TOML
//! file; [`Config::from_toml_with_env`] checks every value and names the key of a bad one.

use std::time::Duration;

use qanat_log::{LogConfig, TimestampType};
use serde::{Deserialize, Deserializer};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub broker: BrokerSettings,
    pub storage: StorageSettings,
    pub fetch: FetchSettings,
    pub groups: GroupsSettings,
    pub tls: Option<crate::tls::TlsSettings>,
    pub sasl: SaslSettings,
    pub security: SecuritySettings,
    pub metrics: MetricsSettings,
}

/// `[fetch]`: how record data is sent to consumers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchSettings {
    /// Threads that send fetched records to consumers (`sendfile`, and the bytes of small
    /// ranges), at `serving_nice`, so that when the CPU is short readers fall behind rather
    /// than producers slowing down. 0: the async workers send them, at the broker's priority.
    pub serving_threads: u32,
    /// Nice value of the serving threads, 0 (the broker's own priority) to 19 (the lowest).
    pub serving_nice: i32,
}

/// Most serving threads: sending is kernel work a few threads keep up with.
pub const MAX_SERVING_THREADS: u32 = 64;

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            serving_threads: 2,
            serving_nice: 19,
        }
    }
}

impl FetchSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.serving_threads > MAX_SERVING_THREADS {
            return invalid(
                "fetch.serving_threads",
                format!(
                    "{} is above the maximum of {MAX_SERVING_THREADS} (0 turns them off)",
                    self.serving_threads
                ),
            );
        }
        if !(0..=19).contains(&self.serving_nice) {
            return invalid(
                "fetch.serving_nice",
                format!(
                    "{} is outside 0..=19 (a thread may lower its priority, not raise it)",
                    self.serving_nice
                ),
            );
        }
        Ok(())
    }
}

/// `[metrics]`: the Prometheus endpoint (`--metrics-listen`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Scrapes need the push API's credentials (a bearer token of `[security] http_tokens`
    /// or a SASL user's password as basic credentials); 401 without. Off by default, as
    /// scrapers usually sit on a private network.
    pub require_credentials: bool,
}

/// Security protocol of a listener, as Kafka names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }
}

/// One `[[broker.listener]]`: an address with its security protocol.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    pub name: String,
    pub address: std::net::SocketAddr,
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// Host put in Metadata for clients of this listener; defaults to the bound address.
    pub advertised_host: Option<String>,
    /// Port put in Metadata for clients of this listener; defaults to the bound port.
    pub advertised_port: Option<u16>,
}

/// `[sasl]`: authentication on SASL listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaslSettings {
    /// Mechanisms offered in SaslHandshake.
    pub mechanisms: Vec<String>,
    /// First delay before answering a failed login from an address; doubles with each
    /// further failure from it, up to `failure_delay_max_ms`.
    pub failure_delay_ms: u64,
    pub failure_delay_max_ms: u64,
    /// Iterations of new SCRAM credentials created without an explicit count.
    pub scram_iterations: u32,
}

impl Default for SaslSettings {
    fn default() -> Self {
        Self {
            mechanisms: crate::sasl::MECHANISMS
                .iter()
                .map(|m| m.to_string())
                .collect(),
            failure_delay_ms: 100,
            failure_delay_max_ms: 5_000,
            scram_iterations: 8192,
        }
    }
}

/// `[security]`: authorization and HTTP credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Deny whatever no ACL allows (Kafka's StandardAuthorizer without
    /// allow.everyone.if.no.acl.found). Off: every principal may do everything.
    pub authorizer: bool,
    /// Principals (`User:NAME`) allowed everything.
    pub super_users: Vec<String>,
    /// Bearer tokens of the HTTP API, each mapped to a principal. With the authorizer on,
    /// a request without a known token or basic credentials is refused.
    pub http_tokens: Vec<HttpToken>,
}

/// A bearer token of the HTTP API and the principal it stands for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToken {
    pub token: String,
    pub principal: String,
}

/// `[groups]`: the consumer-group coordinator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupsSettings {
    /// How long a new group's first rebalance waits for more members (Kafka's
    /// group.initial.rebalance.delay.ms).
    pub initial_rebalance_delay_ms: u64,
    pub min_session_timeout_ms: u64,
    pub max_session_timeout_ms: u64,
}

impl Default for GroupsSettings {
    fn default() -> Self {
        Self {
            initial_rebalance_delay_ms: 3000,
            min_session_timeout_ms: 6000,
            max_session_timeout_ms: 1_800_000,
        }
    }
}

/// `[broker]`: protocol-level behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSettings {
    /// Create a topic when a client asks for metadata of, or produces to, an unknown one.
    pub auto_create_topics: bool,
    /// Partition count of automatically created topics and of CreateTopics with -1.
    pub default_partitions: u32,
    /// After a topic is deleted, auto-creation refuses its name for this long, so producers
    /// still writing to it do not bring it back; explicit creation works at once. 0: off.
    pub auto_create_after_delete_ms: u64,
    /// Largest request frame accepted; a larger length prefix closes the connection.
    pub max_frame_bytes: u32,
    /// Host name put in Metadata responses; defaults to the listen address.
    pub advertised_host: Option<String>,
    /// Port put in Metadata responses; defaults to the bound port.
    pub advertised_port: Option<u16>,
    /// Node id of this broker in Metadata.
    pub node_id: i32,
    /// Memory for request frames being received or awaiting their answer, all connections
    /// together (Kafka's queued.max.request.bytes); when it is used up, reading pauses.
    pub queued_max_request_bytes: u64,
    /// Open connections in total; more are closed as soon as they are accepted.
    pub max_connections: u32,
    /// Open connections from one source address.
    pub max_connections_per_ip: u32,
    /// A connection without a request received or answered for this long is closed.
    pub connections_max_idle_ms: u64,
    /// Security protocol of the listener given by `--listen`.
    pub listen_security_protocol: SecurityProtocol,
    /// Further listeners, each with its own address and security protocol.
    pub listener: Vec<ListenerSettings>,
    /// Most bytes the records of one compressed batch may inflate to. Produce refuses a batch
    /// past it (MESSAGE_TOO_LARGE), and readers of stored batches stop decoding there.
    pub max_uncompressed_batch_bytes: u64,
}

/// Smallest accepted `max_uncompressed_batch_bytes`: below this, ordinary batches would fail.
pub const MIN_UNCOMPRESSED_BATCH_BYTES: u64 = 1024;

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            auto_create_topics: true,
            default_partitions: 1,
            auto_create_after_delete_ms: 300_000,
            max_frame_bytes: 100 * 1024 * 1024,
            advertised_host: None,
            advertised_port: None,
            node_id: 1,
            queued_max_request_bytes: 500 * 1024 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: 10_000,
            connections_max_idle_ms: 600_000,
            listen_security_protocol: SecurityProtocol::Plaintext,
            listener: Vec::new(),
            max_uncompressed_batch_bytes: 64 << 20,
        }
    }
}

impl BrokerSettings {
    /// Check the values serde cannot: each error names its key.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.max_connections == 0 {
            return invalid("broker.max_connections", "must be at least 1".into());
        }
        if self.max_connections_per_ip == 0 {
            return invalid("broker.max_connections_per_ip", "must be at least 1".into());
        }
        if self.connections_max_idle_ms == 0 {
            return invalid(
                "broker.connections_max_idle_ms",
                "must be at least 1".into(),
            );
        }
        if self.queued_max_request_bytes < u64::from(self.max_frame_bytes) {
            return invalid(
                "broker.queued_max_request_bytes",
                format!(
                    "{} is below max_frame_bytes ({}): a frame of the largest size could never be read",
                    self.queued_max_request_bytes, self.max_frame_bytes
                ),
            );
        }
        if self.max_uncompressed_batch_bytes < MIN_UNCOMPRESSED_BATCH_BYTES {
            return invalid(
                "broker.max_uncompressed_batch_bytes",
                format!(
                    "{} is below the minimum of {MIN_UNCOMPRESSED_BATCH_BYTES}",
                    self.max_uncompressed_batch_bytes
                ),
            );
        }
        Ok(())
    }
}

/// When acknowledged data reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Acknowledge a produce only after fdatasync of the batch; concurrent producers share one
    /// fdatasync (group commit).
    Always,
    /// fdatasync every partition this often; an OS crash loses at most this window.
    Every(Duration),
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Millis(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "always" => Ok(FsyncPolicy::Always),
            Raw::Word(w) => match w.parse::<u64>() {
                Ok(ms) if ms > 0 => Ok(FsyncPolicy::Every(Duration::from_millis(ms))),
                _ => Err(serde::de::Error::custom(format!(
                    "fsync must be \"always\" or a positive number of milliseconds, got {w:?}"
                ))),
            },
            Raw::Millis(ms) if ms > 0 => Ok(FsyncPolicy::Every(Duration::from_millis(ms as u64))),
            Raw::Millis(ms) => Err(serde::de::Error::custom(format!(
                "fsync must be \"always\" or a positive number of milliseconds, got {ms}"
            ))),
        }
    }
}

/// `[storage]`: how partitions are kept on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    pub segment_ms: u64,
    /// -1 keeps data forever.
    pub retention_ms: i64,
    /// -1 sets no size limit.
    pub retention_bytes: i64,
    pub index_interval_bytes: u32,
    pub timestamp_type: TimestampSetting,
    /// How often segments are rolled by age and retention is applied.
    pub retention_check_interval_ms: u64,
}

/// Which timestamp is stored with each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TimestampSetting {
    #[default]
    CreateTime,
    LogAppendTime,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Every(Duration::from_millis(1000)),
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            index_interval_bytes: 4096,
            timestamp_type: TimestampSetting::CreateTime,
            retention_check_interval_ms: 30_000,
        }
    }
}

impl StorageSettings {
    /// The per-partition settings of `qanat-log`.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes.max(1024),
            segment_ms: self.segment_ms.max(1),
            retention_ms: u64::try_from(self.retention_ms).ok(),
            retention_bytes: u64::try_from(self.retention_bytes).ok(),
            index_interval_bytes: self.index_interval_bytes.max(1),
            timestamp_type: match self.timestamp_type {
                TimestampSetting::CreateTime => TimestampType::CreateTime,
                TimestampSetting::LogAppendTime => TimestampType::LogAppendTime,
            },
            // Acknowledged means durable; served must not mean less.
            serve_durable_only: self.fsync == FsyncPolicy::Always,
        }
    }
}

/// Errors in a configuration file or override.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot parse configuration: {0}")]
    Parse(#[from] toml::de::Error),
    #[error(transparent)]
    Env(#[from] qanat_config::EnvError),
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// Listeners need what their protocol uses; names must be unique.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        let mut names = std::collections::HashSet::new();
        names.insert(crate::listener::DEFAULT_LISTENER);
        let protocols = std::iter::once(self.broker.listen_security_protocol)
            .chain(self.broker.listener.iter().map(|l| l.security_protocol));
        for l in &self.broker.listener {
            if l.name.is_empty() || !names.insert(l.name.as_str()) {
                return invalid(
                    "broker.listener.name",
                    format!(
                        "{:?} is empty or used twice (\"{}\" is the --listen listener)",
                        l.name,
                        crate::listener::DEFAULT_LISTENER
                    ),
                );
            }
        }
        for p in protocols {
            if p.uses_tls() && self.tls.is_none() {
                return invalid(
                    "tls",
                    format!(
                        "a {} listener needs a [tls] table with cert_file and key_file",
                        p.as_str()
                    ),
                );
            }
        }
        for m in &self.sasl.mechanisms {
            if !crate::sasl::MECHANISMS.contains(&m.as_str()) {
                return invalid(
                    "sasl.mechanisms",
                    format!("{m:?} is not one of {:?}", crate::sasl::MECHANISMS),
                );
            }
        }
        if self.sasl.scram_iterations < crate::scram::MIN_ITERATIONS {
            return invalid(
                "sasl.scram_iterations",
                format!("must be at least {}", crate::scram::MIN_ITERATIONS),
            );
        }
        for u in &self.security.super_users {
            if !u.starts_with("User:") {
                return invalid(
                    "security.super_users",
                    format!("{u:?} is not of the form User:NAME"),
                );
            }
        }
        for t in &self.security.http_tokens {
            if t.token.len() < 16 || !t.principal.starts_with("User:") {
                return invalid(
                    "security.http_tokens",
                    "each token must be at least 16 characters and its principal of the form User:NAME".into(),
                );
            }
        }
        Ok(())
    }

    /// Parse TOML text, then apply `QANAT_<TABLE>_<KEY>` overrides from `env`.
    pub fn from_toml_with_env<I>(text: &str, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut doc: toml::Table = toml::from_str(text)?;
        qanat_config::overlay_env(
            &mut doc,
            "QANAT_",
            &[
                "broker", "storage", "fetch", "groups", "tls", "sasl", "security", "metrics",
            ],
            false,
            env,
            |_, _, raw| Ok(Some(qanat_config::plain_value(raw))),
        )?;
        let config: Config = toml::Value::Table(doc).try_into()?;
        config.broker.validate()?;
        config.fetch.validate()?;
        config.validate_security()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_when_empty() {
        let c = Config::from_toml_with_env("", Vec::new()).unwrap();
        assert!(c.broker.auto_create_topics);
        assert_eq!(
            c.storage.fsync,
            FsyncPolicy::Every(Duration::from_millis(1000))
        );
    }

    #[test]
    fn fsync_forms_and_env_override() {
        let c = Config::from_toml_with_env("[storage]\nfsync = \"always\"\n", Vec::new()).unwrap();
        assert_eq!(c.storage.fsync, FsyncPolicy::Always);
        let c = Config::from_toml_with_env(
            "[storage]\nfsync = \"always\"\n",
            vec![
                ("QANAT_STORAGE_FSYNC".into(), "250".into()),
                ("QANAT_BROKER_DEFAULT_PARTITIONS".into(), "4".into()),
                ("QANAT_DATA_DIR".into(), "/x".into()),
            ],
        )
        .unwrap();
        assert_eq!(
            c.storage.fsync,
            FsyncPolicy::Every(Duration::from_millis(250))
        );
        assert_eq!(c.broker.default_partitions, 4);
    }

    #[test]
    fn bad_values_are_precise_errors() {
        let e = Config::from_toml_with_env("[storage]\nfsync = \"sometimes\"\n", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("fsync must be"), "{e}");
        let e = Config::from_toml_with_env("[storage]\nsegment_byte = 1\n", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("segment_byte"), "{e}");
    }

    #[test]
    fn auto_create_after_delete_ms_defaults_and_is_checked() {
        let c = Config::from_toml_with_env("", Vec::new()).unwrap();
        assert_eq!(c.broker.auto_create_after_delete_ms, 300_000);
        let c = Config::from_toml_with_env(
            "",
            vec![(
                "QANAT_BROKER_AUTO_CREATE_AFTER_DELETE_MS".into(),
                "0".into(),
            )],
        )
        .unwrap();
        assert_eq!(c.broker.auto_create_after_delete_ms, 0);
        let e =
            Config::from_toml_with_env("[broker]\nauto_create_after_delete_ms = -5\n", Vec::new())
                .unwrap_err()
                .to_string();
        assert!(e.contains("auto_create_after_delete_ms"), "{e}");
    }

    #[test]
    fn connection_limits_are_validated_by_key() {
        let c = Config::from_toml_with_env("", Vec::new()).unwrap();
        assert_eq!(c.broker.queued_max_request_bytes, 524_288_000);
        assert_eq!(c.broker.connections_max_idle_ms, 600_000);
        for (toml, key) in [
            ("max_connections = 0", "broker.max_connections"),
            (
                "max_connections_per_ip = 0",
                "broker.max_connections_per_ip",
            ),
            (
                "connections_max_idle_ms = 0",
                "broker.connections_max_idle_ms",
            ),
            (
                "max_frame_bytes = 2000\nqueued_max_request_bytes = 1999",
                "broker.queued_max_request_bytes",
            ),
        ] {
            let e = Config::from_toml_with_env(&format!("[broker]\n{toml}\n"), Vec::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        let e = Config::from_toml_with_env(
            "",
            vec![("QANAT_BROKER_MAX_CONNECTIONS".into(), "0".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("broker.max_connections"), "{e}");
        let e = Config::from_toml_with_env("[broker]\nmax_connections = -1\n", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn max_uncompressed_batch_bytes_default_override_and_bounds() {
        let c = Config::from_toml_with_env("", Vec::new()).unwrap();
        assert_eq!(c.broker.max_uncompressed_batch_bytes, 64 << 20);
        let c = Config::from_toml_with_env(
            "",
            vec![(
                "QANAT_BROKER_MAX_UNCOMPRESSED_BATCH_BYTES".into(),
                "1048576".into(),
            )],
        )
        .unwrap();
        assert_eq!(c.broker.max_uncompressed_batch_bytes, 1 << 20);
        let e =
            Config::from_toml_with_env("[broker]\nmax_uncompressed_batch_bytes = 10\n", Vec::new())
                .unwrap_err()
                .to_string();
        assert!(e.contains("broker.max_uncompressed_batch_bytes"), "{e}");
    }

    #[test]
    fn serving_threads_default_override_and_bounds() {
        let c = Config::from_toml_with_env("", Vec::new()).unwrap();
        assert_eq!(c.fetch.serving_threads, 2);
        assert_eq!(c.fetch.serving_nice, 19);
        let c = Config::from_toml_with_env(
            "[fetch]\nserving_threads = 0\n",
            vec![("QANAT_FETCH_SERVING_NICE".into(), "5".into())],
        )
        .unwrap();
        assert_eq!((c.fetch.serving_threads, c.fetch.serving_nice), (0, 5));
        for (toml, key) in [
            ("serving_threads = 65", "fetch.serving_threads"),
            ("serving_nice = 20", "fetch.serving_nice"),
            ("serving_nice = -1", "fetch.serving_nice"),
        ] {
            let e = Config::from_toml_with_env(&format!("[fetch]\n{toml}\n"), Vec::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        let e = Config::from_toml_with_env("[fetch]\nserving_threads = -1\n", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("serving_threads"), "{e}");
    }
}
