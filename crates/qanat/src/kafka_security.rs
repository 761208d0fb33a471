//! Security settings of the commands that are Kafka clients (`topics`, `groups`, `audit`):
//! flags and `QANAT_KAFKA_*` variables turned into librdkafka properties in one place. The
//! password comes from a file or an environment variable, never from the command line.
//! (`agent` and `collect` take the same librdkafka properties in their `librdkafka` /
//! `kafka.properties` tables.)

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{bail, Context};
use clap::Args;
use rdkafka::ClientConfig;

#[derive(Args, Clone, Debug, Default)]
pub struct SecurityArgs {
    /// PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    #[arg(long, global = true, env = "QANAT_KAFKA_SECURITY_PROTOCOL")]
    pub security_protocol: Option<String>,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, global = true, env = "QANAT_KAFKA_SASL_MECHANISM")]
    pub sasl_mechanism: Option<String>,
    #[arg(long, global = true, env = "QANAT_KAFKA_SASL_USERNAME")]
    pub sasl_username: Option<String>,
    /// File whose first line is the SASL password (else $QANAT_KAFKA_SASL_PASSWORD).
    #[arg(long, global = true, env = "QANAT_KAFKA_SASL_PASSWORD_FILE")]
    pub sasl_password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the broker's certificate.
    #[arg(long, global = true, env = "QANAT_KAFKA_SSL_CA_FILE")]
    pub ssl_ca_file: Option<PathBuf>,
}

static PROPERTIES: OnceLock<Vec<(String, String)>> = OnceLock::new();

impl SecurityArgs {
    /// The librdkafka properties these settings stand for.
    pub fn properties(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        if let Some(p) = &self.security_protocol {
            let p = p.to_ascii_uppercase();
            if !["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"].contains(&p.as_str()) {
                bail!("--security-protocol {p}: use PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL");
            }
            out.push(("security.protocol".into(), p));
        }
        if let Some(m) = &self.sasl_mechanism {
            out.push(("sasl.mechanism".into(), m.clone()));
        }
        if let Some(u) = &self.sasl_username {
            out.push(("sasl.username".into(), u.clone()));
            let password = match &self.sasl_password_file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading the SASL password from {}", path.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                None => std::env::var("QANAT_KAFKA_SASL_PASSWORD").context(
                    "--sasl-username needs --sasl-password-file or $QANAT_KAFKA_SASL_PASSWORD",
                )?,
            };
            out.push(("sasl.password".into(), password));
        }
        if let Some(ca) = &self.ssl_ca_file {
            out.push(("ssl.ca.location".into(), ca.display().to_string()));
        }
        Ok(out)
    }

    /// Make these settings the ones every client of this process uses.
    pub fn install(&self) -> anyhow::Result<()> {
        let _ = PROPERTIES.set(self.properties()?);
        Ok(())
    }
}

/// Set the installed security properties on `config`.
pub fn apply(config: &mut ClientConfig) -> &mut ClientConfig {
    for (k, v) in PROPERTIES.get().map(Vec::as_slice).unwrap_or_default() {
        config.set(k, v);
    }
    config
}
