//! `collect.toml`: the server, the producer, the routes and the per-app throttle table, with
//! `QANAT_COLLECT_<SECTION>_<KEY>` environment overrides for the `[server]` and `[kafka]` keys
//! (through `qanat-config`, as for the other components).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The whole configuration file. Every key has a default except `[[routes]]`, of which at
/// least one is needed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Throttle table by app name; `"*"` applies to apps without their own entry.
    #[serde(default)]
    pub apps: BTreeMap<String, AppSettings>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Request body as received (before Content-Encoding is undone); larger → 413.
    pub max_body_bytes: usize,
    /// Body after gzip/zstd decoding; larger → 413 (bounds decompression bombs).
    pub max_decoded_bytes: usize,
    /// One event of a batch, as JSON text; larger → that event is rejected.
    pub max_event_bytes: usize,
    /// Events in one batch; more → 413.
    pub max_batch_events: usize,
    /// Peers whose `X-Forwarded-For` is believed (`"10.0.0.0/8"`, `"127.0.0.1"`).
    pub trusted_proxies: Vec<String>,
    /// First-party visitor cookie set on beacons that arrive without one.
    pub cookie_name: String,
    pub cookie_max_age_days: u32,
    /// App of beacons that carry no `app` parameter.
    pub default_app: String,
    /// Seconds in `Retry-After` when a route's buffer is full.
    pub retry_after_secs: u32,
    /// How long a batch waits for room in a full route's buffer before it is answered 503
    /// (0: at once). Beacons never wait.
    pub full_wait_ms: u64,
    /// Bearer token for `/admin/*`; empty: admin only for direct requests from loopback peers
    /// (never through a proxy: see `server::admin_access`).
    pub admin_token: String,
    /// On shutdown, how long to wait for the broker to acknowledge what is buffered.
    pub shutdown_timeout_ms: u64,
    /// Case-insensitive user-agent substrings that mark a crawler, on top of the built-in list.
    pub bot_patterns: Vec<String>,
    /// A connection must send a request's complete headers within this long (also when idle
    /// between keep-alive requests), else it is closed: bounds slowloris clients.
    pub header_read_timeout_ms: u64,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Threads serving HTTP connections, each with its own single-threaded runtime; 0: one per
    /// CPU.
    pub workers: usize,
    /// PEM certificate (then its chain): serve HTTPS. Reloaded on SIGHUP, with the key.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1 << 20,
            max_decoded_bytes: 8 << 20,
            max_event_bytes: 64 << 10,
            max_batch_events: 1000,
            trusted_proxies: Vec::new(),
            cookie_name: "qvid".to_string(),
            cookie_max_age_days: 730,
            default_app: "web".to_string(),
            retry_after_secs: 1,
            full_wait_ms: 1000,
            admin_token: String::new(),
            shutdown_timeout_ms: 30_000,
            bot_patterns: Vec::new(),
            header_read_timeout_ms: 10_000,
            max_connections: 10_000,
            workers: 0,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap: String,
    /// librdkafka producer properties, applied over the collector's defaults.
    pub properties: BTreeMap<String, String>,
    /// How to reach a secured bus (`[kafka.security]`, see `qanat_config::KafkaSecurity`).
    pub security: qanat_config::KafkaSecurity,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap: "127.0.0.1:9092".to_string(),
            properties: BTreeMap::new(),
            security: qanat_config::KafkaSecurity::default(),
        }
    }
}

/// One routing rule: events matching every listed criterion go to `topic`. Rules are tried
/// in file order; the first match wins. An empty list matches anything.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub topic: String,
    #[serde(default)]
    pub apps: Vec<String>,
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default)]
    pub priorities: Vec<Priority>,
    /// Events buffered for this route before requests for it get 503.
    #[serde(default = "default_buffer")]
    pub buffer: usize,
    /// librdkafka properties for this route's own producer, over `[kafka]`.
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
}

fn default_buffer() -> usize {
    50_000
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// What SDKs of one app poll at `/v1/config`, and what the server enforces (D4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppSettings {
    /// Events of lower priority are shed (SDKs should not send them; the server drops them).
    pub min_priority: Priority,
    /// How often SDKs should upload their local batch.
    pub upload_interval_ms: u64,
    /// Per event type; `"*"` for types not listed.
    pub events: BTreeMap<String, EventSettings>,
}

impl Default for AppSettings {
    fn default() -> Self {
        AppSettings {
            min_priority: Priority::Low,
            upload_interval_ms: 30_000,
            events: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    pub priority: Priority,
    /// Fraction of visitors whose events of this type are kept, 0.0–1.0.
    pub sample: f64,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            priority: Priority::Normal,
            sample: 1.0,
        }
    }
}

impl AppSettings {
    pub fn validate(&self, app: &str) -> Result<(), ConfigError> {
        for (ty, ev) in &self.events {
            if !(0.0..=1.0).contains(&ev.sample) {
                return Err(ConfigError::Invalid(format!(
                    "apps.{app}.events.{ty}.sample = {} is outside 0.0–1.0",
                    ev.sample
                )));
            }
        }
        Ok(())
    }
}

impl CollectConfig {
    /// Parse `text`, then apply `QANAT_COLLECT_SERVER_*` / `QANAT_COLLECT_KAFKA_*` from `env`.
    pub fn from_toml_with_env<I>(text: &str, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut table: toml::Table = toml::from_str(text)?;
        qanat_config::overlay_env(
            &mut table,
            "QANAT_COLLECT_",
            &["server", "kafka"],
            false,
            env,
            |section, key, raw| env_value(section, key, raw).map(Some),
        )
        .map_err(|e| ConfigError::Env {
            var: e.var,
            reason: e.reason,
        })?;
        let config: CollectConfig = toml::Value::Table(table).try_into()?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka
            .security
            .validate("kafka.security")
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.routes.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[routes]]: at least one route (name, topic) is needed".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for r in &self.routes {
            if !names.insert(r.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "route {:?} defined twice",
                    r.name
                )));
            }
            if r.topic.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "route {:?}: topic is empty",
                    r.name
                )));
            }
            // A batch reserves room for all its events of a route at once.
            if r.buffer < self.server.max_batch_events {
                return Err(ConfigError::Invalid(format!(
                    "route {:?}: buffer {} is smaller than server.max_batch_events {}",
                    r.name, r.buffer, self.server.max_batch_events
                )));
            }
        }
        if self.server.header_read_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "server.header_read_timeout_ms must be at least 1".into(),
            ));
        }
        if self.server.tls_cert_file.is_some() != self.server.tls_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "server.tls_cert_file and server.tls_key_file go together".into(),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "server.max_connections must be at least 1".into(),
            ));
        }
        for p in &self.server.trusted_proxies {
            Cidr::parse(p)?;
        }
        for (app, s) in &self.apps {
            s.validate(app)?;
        }
        Ok(())
    }
}

/// Lists (`trusted_proxies`, `bot_patterns`) are comma-separated in the environment.
fn env_value(section: &str, key: &str, raw: &str) -> Result<toml::Value, String> {
    if section == "server" && (key == "trusted_proxies" || key == "bot_patterns") {
        return Ok(toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ));
    }
    if section == "kafka" && key.starts_with("security") {
        return Err("use the QANAT_KAFKA_* variables for [kafka.security]".into());
    }
    if section == "kafka" && key == "properties" {
        return Err("set librdkafka properties in the file".into());
    }
    Ok(qanat_config::plain_value(raw))
}

/// An address block, `ip/prefix` or a bare address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, ConfigError> {
        let bad = || ConfigError::Invalid(format!("trusted proxy {s:?} is not IP or IP/PREFIX"));
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = ip.trim().parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MIN: &str = r#"
        [[routes]]
        name = "all"
        topic = "events"
    "#;

    #[test]
    fn defaults_and_env_overrides() {
        let env = vec![
            (
                "QANAT_COLLECT_SERVER_LISTEN".to_string(),
                "0.0.0.0:9000".to_string(),
            ),
            (
                "QANAT_COLLECT_SERVER_TRUSTED_PROXIES".to_string(),
                "10.0.0.0/8, 127.0.0.1".to_string(),
            ),
            (
                "QANAT_COLLECT_KAFKA_BOOTSTRAP".to_string(),
                "b:1".to_string(),
            ),
            ("QANAT_STORAGE_FSYNC".to_string(), "always".to_string()),
        ];
        let c = CollectConfig::from_toml_with_env(MIN, env).unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.server.trusted_proxies, vec!["10.0.0.0/8", "127.0.0.1"]);
        assert_eq!(c.kafka.bootstrap, "b:1");
        assert_eq!(c.routes[0].buffer, 50_000);
        assert_eq!(c.server.cookie_name, "qvid");

        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let err =
            CollectConfig::from_toml_with_env(MIN, env("QANAT_COLLECT_KAFKA_PROPERTIES", "x"))
                .unwrap_err();
        assert!(
            err.to_string().contains("QANAT_COLLECT_KAFKA_PROPERTIES"),
            "{err}"
        );
        let c = CollectConfig::from_toml_with_env(
            MIN,
            env("QANAT_COLLECT_SERVER_HEADER_READ_TIMEOUT_MS", "2500"),
        )
        .unwrap();
        assert_eq!(c.server.header_read_timeout_ms, 2500);
    }

    #[test]
    fn rejects_bad_config() {
        assert!(CollectConfig::from_toml_with_env("", Vec::new()).is_err());
        let bad_sample = format!("{MIN}\n[apps.web.events.click]\nsample = 1.5\n");
        assert!(CollectConfig::from_toml_with_env(&bad_sample, Vec::new()).is_err());
        let bad_proxy = format!("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n{MIN}");
        assert!(CollectConfig::from_toml_with_env(&bad_proxy, Vec::new()).is_err());
        for key in ["header_read_timeout_ms", "max_connections"] {
            let zero = format!("[server]\n{key} = 0\n{MIN}");
            let err = CollectConfig::from_toml_with_env(&zero, Vec::new()).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
        let unknown = format!("[server]\nlisten_on = \"x\"\n{MIN}");
        assert!(CollectConfig::from_toml_with_env(&unknown, Vec::new()).is_err());
    }

    #[test]
    fn cidr_matching() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        let any = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(any.contains("8.8.8.8".parse().unwrap()));
        let one = Cidr::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn tls_cert_and_key_go_together() {
        let env = vec![(
            "QANAT_COLLECT_SERVER_TLS_CERT_FILE".to_string(),
            "/etc/qanat/cert.pem".to_string(),
        )];
        let err = CollectConfig::from_toml_with_env(MIN, env).unwrap_err();
        assert!(err.to_string().contains("server.tls_key_file"), "{err}");
        let both = format!("[server]\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n{MIN}");
        let c = CollectConfig::from_toml_with_env(&both, Vec::new()).unwrap();
        assert_eq!(c.server.tls_key_file, Some(PathBuf::from("k.pem")));
    }
}
