//! `agent.toml`: sources, output (native producer or librdkafka), checkpoints, discovery. Every scalar key of
//! the top level and of `[output]` can be overridden from the environment as
//! `QANAT_AGENT_<KEY>` / `QANAT_AGENT_OUTPUT_<KEY>` (e.g. `QANAT_AGENT_INOTIFY=false`).
//! Precedence: flag, environment, file, default.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error(transparent)]
    Env(#[from] qanat_config::EnvError),
    #[error("{0}")]
    Invalid(String),
}

/// What to do when the checkpoint file fails its checks (B3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CorruptPolicy {
    /// Refuse to start (exit status 3) until an operator looks.
    #[default]
    Stop,
    /// Move the damaged file aside and read every file from 0 (the audit reports the repeats).
    Reread,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Host id in file ids and headers; default: the machine's hostname.
    pub host: Option<String>,
    /// Directory of the checkpoint file.
    pub checkpoint_dir: PathBuf,
    pub on_corrupt_checkpoint: CorruptPolicy,
    /// How often acknowledged positions are written (when they changed).
    pub checkpoint_interval_ms: u64,
    /// Bytes hashed for a file's signature.
    pub signature_bytes: u64,
    /// Use inotify (via `notify`) for quick discovery; the rescan runs regardless.
    pub inotify: bool,
    /// Full rescan of the globs.
    pub rescan_interval_ms: u64,
    /// Check open files for growth at least this often (inotify only makes it sooner).
    pub poll_interval_ms: u64,
    /// A file no longer at a matching path (deleted, renamed away) stays open this long after
    /// its last growth, so what is still written to it is read to the end.
    pub orphan_grace_ms: u64,
    /// Cap on bytes read but not yet acknowledged; reading pauses at the cap (B6).
    pub max_inflight_bytes: u64,
    /// Largest single read from one file before moving to the next file.
    pub read_chunk_bytes: usize,
    /// Topic of the manifest records (docs/trajectory.md); empty disables them.
    pub manifest_topic: String,
    pub manifest_interval_ms: u64,
    pub output: OutputConfig,
    #[serde(rename = "source")]
    pub sources: Vec<SourceConfig>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            host: None,
            checkpoint_dir: PathBuf::from("./qanat-agent-state"),
            on_corrupt_checkpoint: CorruptPolicy::Stop,
            checkpoint_interval_ms: 1000,
            signature_bytes: 1024,
            inotify: true,
            rescan_interval_ms: 2000,
            poll_interval_ms: 250,
            orphan_grace_ms: 5000,
            max_inflight_bytes: 16 << 20,
            read_chunk_bytes: 256 << 10,
            manifest_topic: "qanat.manifest".to_string(),
            manifest_interval_ms: 60_000,
            output: OutputConfig::default(),
            sources: Vec::new(),
        }
    }
}

/// Which producer ships records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProducerKind {
    /// The native producer, unless the output needs librdkafka (snappy or
    /// `[output.librdkafka]` properties).
    #[default]
    Auto,
    /// Records encoded straight into Kafka record batches, over PLAINTEXT, SSL, SASL_PLAINTEXT
    /// or SASL_SSL (PLAIN, SCRAM-SHA-256/512).
    Native,
    /// librdkafka: snappy and any `[output.librdkafka]` property.
    Librdkafka,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// `auto`, `native` or `librdkafka`.
    pub producer: ProducerKind,
    pub bootstrap: String,
    /// librdkafka `batch.size`: a batch is sent when it reaches this many bytes …
    pub batch_bytes: u64,
    /// … or this age (`linger.ms`). 200 ms keeps end-to-end latency well under a second while
    /// still filling batches under load (B4 suggests 30 s for throughput-only sites).
    pub batch_age_ms: u64,
    /// `compression.type`: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// `compression.level`; -1 is the codec's default.
    pub compression_level: i32,
    /// A record not acknowledged within this time fails; its file is re-read from its
    /// acknowledged position after a backoff.
    pub delivery_timeout_ms: u64,
    /// Extra librdkafka properties, passed as given (they win over the above).
    pub librdkafka: BTreeMap<String, String>,
    /// How to reach a secured bus (`[output.security]`, see `qanat_config::KafkaSecurity`).
    pub security: qanat_config::KafkaSecurity,
}

impl OutputConfig {
    /// What in this output only librdkafka can do, if anything (security is not: the native
    /// producer speaks TLS and SASL).
    pub fn needs_librdkafka(&self) -> Option<String> {
        if !self.librdkafka.is_empty() {
            return Some("[output.librdkafka] properties".to_string());
        }
        if crate::sink::native::batch::Codec::parse(&self.compression).is_none() {
            return Some(format!("output.compression = {:?}", self.compression));
        }
        None
    }

    /// The producer that ships records: `auto` resolved against the settings.
    pub fn effective_producer(&self) -> ProducerKind {
        match self.producer {
            ProducerKind::Auto if self.needs_librdkafka().is_some() => ProducerKind::Librdkafka,
            ProducerKind::Auto => ProducerKind::Native,
            chosen => chosen,
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            producer: ProducerKind::Auto,
            bootstrap: "127.0.0.1:9092".to_string(),
            batch_bytes: 512 << 10,
            batch_age_ms: 200,
            compression: "lz4".to_string(),
            compression_level: -1,
            delivery_timeout_ms: 30_000,
            librdkafka: BTreeMap::new(),
            security: qanat_config::KafkaSecurity::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Label for metrics; default: the topic.
    #[serde(default)]
    pub name: Option<String>,
    /// Glob patterns; `**` matches any number of directories.
    pub paths: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    pub topic: String,
    /// Static headers added to every record of this source.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Start-of-record pattern: lines not matching it continue the previous event.
    #[serde(default)]
    pub multiline_start: Option<String>,
    /// A pending multiline group is sent after this long without new bytes.
    #[serde(default = "default_multiline_timeout")]
    pub multiline_timeout_ms: u64,
    /// Longer lines are cut here and continued in the next record.
    #[serde(default = "default_max_line")]
    pub max_line_bytes: usize,
}

fn default_multiline_timeout() -> u64 {
    1000
}
fn default_max_line() -> usize {
    256 << 10
}

impl SourceConfig {
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.topic)
    }
}

impl AgentConfig {
    /// Parse `text` and apply `QANAT_AGENT_*` overrides from `env`.
    pub fn from_toml_with_env<I>(text: &str, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut table: toml::Table = toml::from_str(text)?;
        let defaults = toml::Table::try_from(AgentConfig::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let top_keys: Vec<String> = known_keys(&defaults, &["output", "source"]);
        let output_keys: Vec<String> = match defaults.get("output") {
            Some(toml::Value::Table(t)) => known_keys(t, &["librdkafka", "security"]),
            _ => Vec::new(),
        };
        // Only keys the agent has are taken; other QANAT_AGENT_* variables are ignored.
        qanat_config::overlay_env(
            &mut table,
            "QANAT_AGENT_",
            &["output"],
            true,
            env,
            |section, key, raw| {
                let known = match section {
                    "output" => output_keys.iter().any(|k| k == key),
                    // `host` is optional (absent from the defaults' serialization).
                    _ => top_keys.iter().any(|k| k == key) || key == "host",
                };
                Ok(known.then(|| qanat_config::plain_value(raw)))
            },
        )?;
        let config: AgentConfig = toml::Value::Table(table).try_into()?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sources.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[source]] configured: nothing to collect".into(),
            ));
        }
        for s in &self.sources {
            if s.paths.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "source {:?} has no paths",
                    s.label()
                )));
            }
            if s.topic.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "source {:?} has an empty topic",
                    s.label()
                )));
            }
            if let Some(p) = &s.multiline_start {
                regex::bytes::Regex::new(p).map_err(|e| {
                    ConfigError::Invalid(format!("source {:?}: multiline_start: {e}", s.label()))
                })?;
            }
            if s.attributes.keys().any(|k| k.starts_with("qanat.")) {
                return Err(ConfigError::Invalid(format!(
                    "source {:?}: attribute names starting with \"qanat.\" are reserved",
                    s.label()
                )));
            }
        }
        self.output
            .security
            .validate("output.security")
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.output.producer == ProducerKind::Native {
            if let Some(what) = self.output.needs_librdkafka() {
                return Err(ConfigError::Invalid(format!(
                    "output.producer = \"native\" does not support {what}; set output.producer = \"librdkafka\" or \"auto\""
                )));
            }
        }
        if self.max_inflight_bytes == 0 || self.read_chunk_bytes == 0 {
            return Err(ConfigError::Invalid(
                "max_inflight_bytes and read_chunk_bytes must be positive".into(),
            ));
        }
        Ok(())
    }
}

fn known_keys(t: &toml::Table, skip: &[&str]) -> Vec<String> {
    t.keys()
        .filter(|k| !skip.contains(&k.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MIN: &str = r#"
        [[source]]
        paths = ["/var/log/app/**/*.log"]
        topic = "logs"
        attributes = { service = "checkout" }
    "#;

    #[test]
    fn defaults_and_env_overrides() {
        let c = AgentConfig::from_toml_with_env(MIN, Vec::new()).unwrap();
        assert!(c.inotify);
        assert_eq!(c.output.batch_bytes, 512 << 10);
        assert_eq!(c.output.batch_age_ms, 200);
        assert_eq!(c.sources[0].attributes["service"], "checkout");
        let env = vec![
            ("QANAT_AGENT_INOTIFY".to_string(), "false".to_string()),
            (
                "QANAT_AGENT_OUTPUT_BOOTSTRAP".to_string(),
                "h:1".to_string(),
            ),
            (
                "QANAT_AGENT_ON_CORRUPT_CHECKPOINT".to_string(),
                "reread".to_string(),
            ),
            ("QANAT_AGENT_CONFIG".to_string(), "ignored".to_string()),
        ];
        let c = AgentConfig::from_toml_with_env(MIN, env).unwrap();
        assert!(!c.inotify);
        assert_eq!(c.output.bootstrap, "h:1");
        assert_eq!(c.on_corrupt_checkpoint, CorruptPolicy::Reread);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_patterns() {
        assert!(AgentConfig::from_toml_with_env("bogus = 1\n", Vec::new()).is_err());
        let bad = r#"
            [[source]]
            paths = ["/x/*.log"]
            topic = "t"
            multiline_start = "(unclosed"
        "#;
        assert!(AgentConfig::from_toml_with_env(bad, Vec::new()).is_err());
        assert!(AgentConfig::from_toml_with_env("", Vec::new()).is_err());
    }

    #[test]
    fn auto_producer_is_native_unless_the_output_needs_librdkafka() {
        let c = AgentConfig::from_toml_with_env(MIN, Vec::new()).unwrap();
        assert_eq!(c.output.producer, ProducerKind::Auto);
        assert_eq!(c.output.effective_producer(), ProducerKind::Native);
        let snappy = format!("[output]\ncompression = \"snappy\"\n{MIN}");
        let c = AgentConfig::from_toml_with_env(&snappy, Vec::new()).unwrap();
        assert_eq!(c.output.effective_producer(), ProducerKind::Librdkafka);
        let sasl_ssl = format!(
            "[output.security]\nprotocol = \"SASL_SSL\"\nmechanism = \"SCRAM-SHA-512\"\nusername = \"a\"\n{MIN}"
        );
        let c = AgentConfig::from_toml_with_env(&sasl_ssl, Vec::new()).unwrap();
        assert_eq!(c.output.effective_producer(), ProducerKind::Native);
        let native_snappy =
            format!("[output]\nproducer = \"native\"\ncompression = \"snappy\"\n{MIN}");
        let refused = AgentConfig::from_toml_with_env(&native_snappy, Vec::new()).unwrap_err();
        assert!(refused.to_string().contains("output.producer"), "{refused}");
    }
}
