//! `cdc.toml`: the bus, and one `[[connector]]` per source server, with `QANAT_CDC_<KEY>`
//! environment overrides for the top-level keys (through `qanat-config`). Validated at start;
//! every error names its key (`connector[1].routes[0].match`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::pipeline::{anchored, Mask, MaskRule, PipelineConfig, Route};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error(transparent)]
    Env(#[from] qanat_config::EnvError),
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcConfig {
    /// Kafka-protocol bootstrap servers.
    #[serde(default = "default_bootstrap")]
    pub bootstrap: String,
    /// Where every connector's position is kept (key = connector name).
    #[serde(default = "default_offsets_topic")]
    pub offsets_topic: String,
    #[serde(default, rename = "connector")]
    pub connectors: Vec<ConnectorConfig>,
    /// How to reach a secured bus (`[security]`, see `qanat_config::KafkaSecurity`).
    #[serde(default)]
    pub security: qanat_config::KafkaSecurity,
}

fn default_bootstrap() -> String {
    "127.0.0.1:9092".into()
}
fn default_offsets_topic() -> String {
    "qanat-cdc-offsets".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    pub name: String,
    /// `mysql://user:pass@host:port`, `mariadb://…` or `postgres://user:pass@host:port/db`.
    pub source: String,
    /// Include regexes over `db.table` (anchored); none = every table.
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default = "default_snapshot")]
    pub snapshot: String,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Regexes over `db.table.column`: left out of the events.
    #[serde(default)]
    pub exclude_columns: Vec<String>,
    #[serde(default)]
    pub masks: Vec<MaskConfig>,
    #[serde(default)]
    pub tombstones: bool,
    pub transaction_topic: Option<String>,
    /// Default `qanat-cdc-schema.<name>`.
    pub schema_history_topic: Option<String>,
    /// MariaDB/MySQL: this replica's server id (default derived from the name).
    pub server_id: Option<u32>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_chunk")]
    pub snapshot_chunk: usize,
    /// MariaDB: resume by GTID state (`@slave_connect_state`) rather than file + position.
    #[serde(default)]
    pub gtid_resume: bool,
    /// `db.table` (PostgreSQL: `schema.table`) of the signal table through which
    /// `qanat cdc snapshot` asks the running connector for an incremental snapshot (created
    /// if missing; on PostgreSQL also added to the publication).
    pub signal_table: Option<String>,
    /// PostgreSQL: replication slot and publication (default: derived from the name).
    pub slot: Option<String>,
    pub publication: Option<String>,
    #[serde(default = "default_store_ms")]
    pub store_interval_ms: u64,
    /// Extra librdkafka producer properties.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

fn default_prefix() -> String {
    "cdc".into()
}
fn default_snapshot() -> String {
    "initial".into()
}
fn default_heartbeat_ms() -> u64 {
    1000
}
fn default_chunk() -> usize {
    8192
}
fn default_store_ms() -> u64 {
    200
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Regex over `db.table`, anchored.
    #[serde(rename = "match")]
    pub pattern: String,
    pub topic: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskConfig {
    /// Regex over `db.table.column`, anchored.
    pub column: String,
    /// `"hash"` (sha256 with `salt`) or `"fixed"` (`with`).
    pub kind: String,
    #[serde(default)]
    pub salt: String,
    #[serde(default, rename = "with")]
    pub fixed: String,
}

impl ConnectorConfig {
    /// A connector from the flags form, with the file's defaults.
    pub fn from_source(name: &str, source: &str) -> Self {
        ConnectorConfig {
            name: name.into(),
            source: source.into(),
            tables: Vec::new(),
            exclude_tables: Vec::new(),
            topic_prefix: default_prefix(),
            snapshot: default_snapshot(),
            routes: Vec::new(),
            exclude_columns: Vec::new(),
            masks: Vec::new(),
            tombstones: false,
            transaction_topic: None,
            schema_history_topic: None,
            server_id: None,
            heartbeat_ms: default_heartbeat_ms(),
            snapshot_chunk: default_chunk(),
            gtid_resume: false,
            signal_table: None,
            slot: None,
            publication: None,
            store_interval_ms: default_store_ms(),
            producer: BTreeMap::new(),
        }
    }

    /// This replica's server id: the configured one, else one derived from the name (stable
    /// across restarts, unlikely to collide with real replicas' small ids).
    pub fn server_id(&self) -> u32 {
        self.server_id.unwrap_or_else(|| {
            let h = self.name.bytes().fold(2_166_136_261u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(16_777_619)
            });
            100_000 + h % 1_000_000_000
        })
    }

    /// The delivery settings; `key` prefixes error keys (`connector[0]`).
    pub fn pipeline(
        &self,
        key: &str,
        bootstrap: &str,
        offsets_topic: &str,
    ) -> Result<PipelineConfig, ConfigError> {
        let mut p = PipelineConfig::new(&self.name, bootstrap);
        p.topic_prefix = self.topic_prefix.clone();
        p.offsets_topic = offsets_topic.to_string();
        if let Some(t) = &self.schema_history_topic {
            p.schema_history_topic = t.clone();
        }
        let compile = |field: &str, i: usize, pat: &str| {
            anchored(pat).map_err(|e| invalid(format!("{key}.{field}[{i}]"), e.to_string()))
        };
        for (i, t) in self.tables.iter().enumerate() {
            p.include.push(compile("tables", i, t)?);
        }
        for (i, t) in self.exclude_tables.iter().enumerate() {
            p.exclude.push(compile("exclude_tables", i, t)?);
        }
        for (i, t) in self.exclude_columns.iter().enumerate() {
            p.exclude_columns.push(compile("exclude_columns", i, t)?);
        }
        for (i, r) in self.routes.iter().enumerate() {
            let pattern = anchored(&r.pattern)
                .map_err(|e| invalid(format!("{key}.routes[{i}].match"), e.to_string()))?;
            if r.topic.is_empty() {
                return Err(invalid(format!("{key}.routes[{i}].topic"), "empty"));
            }
            p.routes.push(Route {
                pattern,
                topic: r.topic.clone(),
            });
        }
        for (i, m) in self.masks.iter().enumerate() {
            let column = anchored(&m.column)
                .map_err(|e| invalid(format!("{key}.masks[{i}].column"), e.to_string()))?;
            let mask = match m.kind.as_str() {
                "hash" => Mask::Hash {
                    salt: m.salt.clone(),
                },
                "fixed" => Mask::Fixed(m.fixed.clone()),
                other => {
                    return Err(invalid(
                        format!("{key}.masks[{i}].kind"),
                        format!("{other:?} is not \"hash\" or \"fixed\""),
                    ))
                }
            };
            p.masks.push(MaskRule { column, mask });
        }
        p.tombstones = self.tombstones;
        p.transaction_topic = self.transaction_topic.clone();
        p.store_interval = Duration::from_millis(self.store_interval_ms.max(1));
        p.producer_properties = self.producer.clone();
        Ok(p)
    }
}

impl CdcConfig {
    /// Parse, overlay `QANAT_CDC_<KEY>` for the top-level keys, validate.
    pub fn from_toml_with_env<I>(text: &str, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut doc: toml::Table = toml::from_str(text)?;
        qanat_config::overlay_env(&mut doc, "QANAT_CDC_", &[], true, env, |_, key, raw| {
            Ok(match key {
                "bootstrap" | "offsets_topic" => Some(toml::Value::String(raw.to_string())),
                _ => None,
            })
        })?;
        let config: CdcConfig = toml::Value::Table(doc).try_into()?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap.trim().is_empty() {
            return Err(invalid("bootstrap", "empty"));
        }
        if self.offsets_topic.trim().is_empty() {
            return Err(invalid("offsets_topic", "empty"));
        }
        if self.connectors.is_empty() {
            return Err(invalid("connector", "at least one [[connector]] is needed"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.connectors.iter().enumerate() {
            let key = format!("connector[{i}]");
            if c.name.is_empty()
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
            {
                return Err(invalid(
                    format!("{key}.name"),
                    "must be non-empty ASCII letters, digits, '.', '_' or '-'",
                ));
            }
            if !names.insert(c.name.clone()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?} is used twice", c.name),
                ));
            }
            let scheme = c.source.split("://").next().unwrap_or("");
            if !["mysql", "mariadb", "postgres", "postgresql"].contains(&scheme)
                || !c.source.contains("://")
            {
                return Err(invalid(
                    format!("{key}.source"),
                    "must start with mysql://, mariadb:// or postgres://",
                ));
            }
            if !["initial", "never", "when_needed"].contains(&c.snapshot.as_str()) {
                return Err(invalid(
                    format!("{key}.snapshot"),
                    format!("{:?} is not one of initial, never, when_needed", c.snapshot),
                ));
            }
            if c.heartbeat_ms == 0 {
                return Err(invalid(format!("{key}.heartbeat_ms"), "must be > 0"));
            }
            if let Some(t) = &c.signal_table {
                let parts: Vec<&str> = t.split('.').collect();
                if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                    return Err(invalid(
                        format!("{key}.signal_table"),
                        format!("{t:?} is not db.table"),
                    ));
                }
            }
            c.pipeline(&key, &self.bootstrap, &self.offsets_topic)?;
        }
        self.security
            .validate("security")
            .map_err(|e| invalid(e.key, e.reason))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_validates_and_names_keys() {
        let text = r#"
            bootstrap = "b:1"
            [[connector]]
            name = "shop"
            source = "mysql://u:p@h:3306"
            tables = ['shop_\d+\..*']
            routes = [{match = 'shop_\d+\.order_\d{4}', topic = "cdc.shop.orders"}]
            masks = [{column = '.*\.email', kind = "hash", salt = "s"}]
        "#;
        let env = vec![("QANAT_CDC_BOOTSTRAP".to_string(), "x:9".to_string())];
        let c = CdcConfig::from_toml_with_env(text, env).unwrap();
        assert_eq!(c.bootstrap, "x:9");
        let p = c.connectors[0].pipeline("c", &c.bootstrap, "o").unwrap();
        assert_eq!(p.topic_for("shop_3.order_0042"), "cdc.shop.orders");
        assert_eq!(p.topic_for("shop_3.users"), "cdc.shop_3.users");
        assert!(p.captures("shop_3.users") && !p.captures("other.users"));

        let bad = text.replace(r"order_\d{4}", r"order_\d{4");
        let err = CdcConfig::from_toml_with_env(&bad, Vec::new()).unwrap_err();
        assert!(
            err.to_string().starts_with("connector[0].routes[0].match:"),
            "{err}"
        );
        let bad = text.replace("mysql://", "oracle://");
        let err = CdcConfig::from_toml_with_env(&bad, Vec::new()).unwrap_err();
        assert!(err.to_string().starts_with("connector[0].source:"), "{err}");
        let bad = text.replace("kind = \"hash\"", "kind = \"rot13\"");
        let err = CdcConfig::from_toml_with_env(&bad, Vec::new()).unwrap_err();
        assert!(
            err.to_string().starts_with("connector[0].masks[0].kind:"),
            "{err}"
        );
    }
}
