//! Error types of the collector library.

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("{var}: {reason}")]
    Env { var: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Starting or running the collector.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("creating the producer of route {route:?}: {source}")]
    Producer {
        route: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}
