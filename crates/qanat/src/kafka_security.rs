//! Security flags of the commands that are Kafka clients (`topics`, `groups`, `audit`,
//! `agent`, `collect`, `cdc`, `sync`, `lake land`, `lake audit`), with their `QANAT_KAFKA_*`
//! variables. They fill a [`KafkaSecurity`] (the config's `security` table, see
//! `qanat-config`): for the commands without a config file on their own, for the others over
//! their file's table, key by key. The password
//! comes from a file or an environment variable, never from the command line.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Context;
use clap::Args;
use qanat_config::KafkaSecurity;
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

/// The flag behind a key of the `security` table, for error messages.
fn flag_of(key: &str) -> &'static str {
    match key.rsplit('.').next().unwrap_or_default() {
        "protocol" => "--security-protocol",
        "mechanism" => "--sasl-mechanism",
        "username" => "--sasl-username",
        "ca_file" => "--ssl-ca-file",
        _ => "--sasl-password-file",
    }
}

impl SecurityArgs {
    /// The settings the flags (or their variables) give; unset ones stay `None`.
    pub fn overrides(&self) -> KafkaSecurity {
        KafkaSecurity {
            protocol: self.security_protocol.clone(),
            mechanism: self.sasl_mechanism.clone(),
            username: self.sasl_username.clone(),
            password_file: self.sasl_password_file.clone(),
            password_env: None,
            ca_file: self.ssl_ca_file.clone(),
            ..KafkaSecurity::default()
        }
    }

    /// The flags alone as settings, checked (errors name the flag).
    pub fn resolve(&self) -> anyhow::Result<KafkaSecurity> {
        let settings = self.overrides();
        settings
            .properties("security")
            .map_err(|e| anyhow::anyhow!("{}: {}", flag_of(&e.key), e.reason))?;
        Ok(settings)
    }

    /// Make these settings the ones every client of this process uses.
    pub fn install(&self) -> anyhow::Result<()> {
        install_settings(&self.resolve()?, "security")
    }
}

/// Make `settings` (a config's `security` table at `prefix`, flags already laid over it) the
/// ones every client of this process uses; the password is read now.
pub fn install_settings(settings: &KafkaSecurity, prefix: &str) -> anyhow::Result<()> {
    let properties = settings
        .properties(prefix)
        .with_context(|| format!("{prefix} (or its flags)"))?;
    let _ = PROPERTIES.set(properties);
    Ok(())
}

/// Set the installed security properties on `config`.
pub fn apply(config: &mut ClientConfig) -> &mut ClientConfig {
    for (k, v) in PROPERTIES.get().map(Vec::as_slice).unwrap_or_default() {
        config.set(k, v);
    }
    config
}

/// Records the reason of a refused SASL login reported by librdkafka (and logs every error
/// as the default context does).
#[derive(Default)]
struct LoginWatch {
    refused: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for LoginWatch {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::error!(target: "librdkafka", "{error}: {reason}");
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::Authentication) {
            if let Ok(mut slot) = self.refused.lock() {
                slot.get_or_insert_with(|| reason.to_string());
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LoginWatch {}

/// How long [`check_login`] waits for a login; a broker that delays answers to failed logins
/// waits at most a few seconds (`failure_delay_max_ms`).
const LOGIN_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// With SASL installed, log in once before the real work: a refused login is then an error
/// with the broker's reason at once, rather than a timeout of the first request (admin
/// requests do not report the refusal at all). Without SASL, or when the broker does not
/// answer within [`LOGIN_CHECK`], it leaves the reporting to the real work.
pub async fn check_login(bootstrap: &str) -> anyhow::Result<()> {
    let installed = PROPERTIES.get().cloned().unwrap_or_default();
    check_login_with(bootstrap, installed).await
}

/// [`check_login`] with the given client properties instead of the installed ones.
pub async fn check_login_with(
    bootstrap: &str,
    properties: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || check_login_blocking_with(&bootstrap, &properties))
        .await
        .context("login check")?
}

/// [`check_login`] on a thread that may block.
pub fn check_login_blocking(bootstrap: &str) -> anyhow::Result<()> {
    let installed = PROPERTIES.get().map(Vec::as_slice).unwrap_or_default();
    check_login_blocking_with(bootstrap, installed)
}

fn check_login_blocking_with(
    bootstrap: &str,
    properties: &[(String, String)],
) -> anyhow::Result<()> {
    use rdkafka::consumer::Consumer;
    if !properties.iter().any(|(k, _)| k == "sasl.mechanism") {
        return Ok(());
    }
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in properties {
        config.set(k, v);
    }
    let consumer: rdkafka::consumer::BaseConsumer<LoginWatch> = config
        .create_with_context(LoginWatch::default())
        .context("creating a client")?;
    let deadline = std::time::Instant::now() + LOGIN_CHECK;
    loop {
        if consumer
            .fetch_metadata(None, std::time::Duration::from_millis(500))
            .is_ok()
        {
            return Ok(());
        }
        // Serves the error events, where a refused login shows.
        let _ = consumer.poll(std::time::Duration::ZERO);
        let refused = consumer
            .context()
            .refused
            .lock()
            .ok()
            .and_then(|r| r.clone());
        if let Some(reason) = refused {
            anyhow::bail!("{bootstrap} refused the login: {reason}");
        }
        if std::time::Instant::now() > deadline {
            return Ok(());
        }
    }
}

/// A consumer that only `assign()`s and reads, with the installed security properties.
/// assign() needs some group.id: a throwaway one named after `purpose`, and nothing is
/// ever committed.
pub fn reading_consumer(
    bootstrap: &str,
    purpose: &str,
) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("qanat-{purpose}-{}-{nonce}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("socket.timeout.ms", "30000")
        .set("fetch.wait.max.ms", "100");
    qanat_config::backlog_reader(&mut config);
    apply(&mut config).create().context("creating the consumer")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn errors_name_the_flag() {
        let args = SecurityArgs {
            security_protocol: Some("SASL_SSL".into()),
            sasl_mechanism: Some("GSSAPI".into()),
            sasl_username: Some("u".into()),
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.starts_with("--sasl-mechanism:"), "{e}");
        let args = SecurityArgs {
            ssl_ca_file: Some("/nonexistent.pem".into()),
            security_protocol: Some("SSL".into()),
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.starts_with("--ssl-ca-file:"), "{e}");
    }
}
