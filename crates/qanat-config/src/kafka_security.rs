//! How a Kafka client of Qanat (agent, collect, cdc, lake, the admin commands) reaches a
//! secured bus: the `security` table of their configs, validated here and turned into
//! librdkafka properties in one place. The password is never in the file: it comes from a file
//! (`password_file`, first line) or an environment variable (`password_env`, by default
//! `QANAT_KAFKA_SASL_PASSWORD`).
//!
//! ```toml
//! [output.security]          # agent; `[kafka.security]` for collect, `[security]` for cdc
//! protocol = "SASL_SSL"      # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
//! mechanism = "SCRAM-SHA-512" # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
//! username = "agent"
//! password_file = "/etc/qanat/agent.password"
//! ca_file = "/etc/qanat/ca.pem"
//! # cert_file = "/etc/qanat/agent.pem"   # a client certificate, when the broker asks for one
//! # key_file = "/etc/qanat/agent.key"
//! # server_name = "bus.example.com"      # the name the broker's certificate must carry
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The environment variable read for the password when no file is named.
pub const DEFAULT_PASSWORD_ENV: &str = "QANAT_KAFKA_SASL_PASSWORD";

pub const PROTOCOLS: &[&str] = &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];
pub const MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// A security setting that cannot be used; `key` is the full config key (e.g.
/// `output.security.mechanism`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SecurityError {
    pub key: String,
    pub reason: String,
}

/// The `security` table of a Kafka client's config. Empty: PLAINTEXT, no authentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSecurity {
    /// PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (`security.protocol`).
    pub protocol: Option<String>,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (`sasl.mechanism`); needed with SASL.
    pub mechanism: Option<String>,
    /// The SASL user; needed with SASL.
    pub username: Option<String>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// The environment variable holding the password when there is no `password_file`.
    pub password_env: Option<String>,
    /// PEM file of the CA that signed the broker's certificate (`ssl.ca.location`); without
    /// it, the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (then its chain) presented to a broker that asks
    /// for one (`ssl.certificate.location`); with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (`ssl.key.location`).
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate is checked against, instead of the host of the
    /// address connected to. Only the native producer takes it: librdkafka checks the host.
    pub server_name: Option<String>,
}

impl KafkaSecurity {
    /// The protocol, upper case (PLAINTEXT when unset).
    pub fn protocol(&self) -> String {
        self.protocol
            .as_deref()
            .unwrap_or("PLAINTEXT")
            .to_ascii_uppercase()
    }

    /// Whether the settings name anything at all.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Check the settings without reading any file; `prefix` is where the table sits in the
    /// config (`output.security`), for the error messages.
    pub fn validate(&self, prefix: &str) -> Result<(), SecurityError> {
        let err = |key: &str, reason: String| SecurityError {
            key: format!("{prefix}.{key}"),
            reason,
        };
        let protocol = self.protocol();
        if !PROTOCOLS.contains(&protocol.as_str()) {
            return Err(err(
                "protocol",
                format!("{protocol:?}: use one of {}", PROTOCOLS.join(", ")),
            ));
        }
        let sasl = protocol.starts_with("SASL_");
        let tls = protocol.ends_with("SSL");
        match (&self.mechanism, sasl) {
            (Some(m), true) if !MECHANISMS.contains(&m.to_ascii_uppercase().as_str()) => {
                return Err(err(
                    "mechanism",
                    format!("{m:?}: use one of {}", MECHANISMS.join(", ")),
                ))
            }
            (None, true) => return Err(err("mechanism", format!("required with {protocol}"))),
            (Some(_), false) => {
                return Err(err(
                    "mechanism",
                    format!("needs a SASL protocol, not {protocol}"),
                ))
            }
            _ => {}
        }
        match (&self.username, sasl) {
            (Some(u), true) if u.is_empty() => return Err(err("username", "empty".into())),
            (None, true) => return Err(err("username", format!("required with {protocol}"))),
            (Some(_), false) => {
                return Err(err(
                    "username",
                    format!("needs a SASL protocol, not {protocol}"),
                ))
            }
            _ => {}
        }
        if !sasl && (self.password_file.is_some() || self.password_env.is_some()) {
            let key = if self.password_file.is_some() {
                "password_file"
            } else {
                "password_env"
            };
            return Err(err(key, format!("needs a SASL protocol, not {protocol}")));
        }
        for (key, set) in [
            ("ca_file", self.ca_file.is_some()),
            ("cert_file", self.cert_file.is_some()),
            ("key_file", self.key_file.is_some()),
            ("server_name", self.server_name.is_some()),
        ] {
            if set && !tls {
                return Err(err(key, format!("needs SSL or SASL_SSL, not {protocol}")));
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return Err(err("key_file", "required with cert_file".into())),
            (None, Some(_)) => return Err(err("cert_file", "required with key_file".into())),
            _ => {}
        }
        if self.server_name.as_deref() == Some("") {
            return Err(err("server_name", "empty".into()));
        }
        Ok(())
    }

    /// The librdkafka properties these settings stand for, the password read from its file or
    /// variable (`env` looks variables up, `std::env::var` in production).
    pub fn properties_with(
        &self,
        prefix: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<(String, String)>, SecurityError> {
        self.validate(prefix)?;
        let err = |key: &str, reason: String| SecurityError {
            key: format!("{prefix}.{key}"),
            reason,
        };
        if self.server_name.is_some() {
            return Err(err(
                "server_name",
                "librdkafka checks the broker's host name; only the native producer takes a server name".into(),
            ));
        }
        let protocol = self.protocol();
        let mut out = vec![("security.protocol".to_string(), protocol.clone())];
        if let Some((m, user, password)) = self.sasl_login_with(prefix, &env)? {
            out.push(("sasl.mechanism".into(), m));
            out.push(("sasl.username".into(), user));
            out.push(("sasl.password".into(), password));
        }
        for (key, path, property) in [
            ("ca_file", &self.ca_file, "ssl.ca.location"),
            ("cert_file", &self.cert_file, "ssl.certificate.location"),
            ("key_file", &self.key_file, "ssl.key.location"),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(err(key, format!("{}: no such file", path.display())));
                }
                out.push((property.into(), path.display().to_string()));
            }
        }
        Ok(out)
    }

    /// With a SASL protocol: the mechanism (upper case), user and password, the password read
    /// from its file or variable (`env` looks variables up).
    pub fn sasl_login_with(
        &self,
        prefix: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<(String, String, String)>, SecurityError> {
        let err = |key: &str, reason: String| SecurityError {
            key: format!("{prefix}.{key}"),
            reason,
        };
        let (Some(m), Some(user)) = (&self.mechanism, &self.username) else {
            return Ok(None);
        };
        let password = match &self.password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| err("password_file", format!("{}: {e}", path.display())))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            None => {
                let var = self.password_env.as_deref().unwrap_or(DEFAULT_PASSWORD_ENV);
                env(var).ok_or_else(|| {
                    err(
                        "password_file",
                        format!("not set, and the environment has no {var}"),
                    )
                })?
            }
        };
        Ok(Some((m.to_ascii_uppercase(), user.clone(), password)))
    }

    /// [`Self::properties_with`] the process environment.
    pub fn properties(&self, prefix: &str) -> Result<Vec<(String, String)>, SecurityError> {
        self.properties_with(prefix, |var| std::env::var(var).ok())
    }

    /// Set these settings on a librdkafka client config.
    #[cfg(feature = "rdkafka")]
    pub fn apply(
        &self,
        prefix: &str,
        config: &mut rdkafka::ClientConfig,
    ) -> Result<(), SecurityError> {
        for (k, v) in self.properties(prefix)? {
            config.set(k, v);
        }
        Ok(())
    }

    /// `overrides` wins key by key (flags and environment over the file).
    pub fn overlay(&mut self, overrides: &KafkaSecurity) {
        let KafkaSecurity {
            protocol,
            mechanism,
            username,
            password_file,
            password_env,
            ca_file,
            cert_file,
            key_file,
            server_name,
        } = overrides.clone();
        self.protocol = protocol.or(self.protocol.take());
        self.mechanism = mechanism.or(self.mechanism.take());
        self.username = username.or(self.username.take());
        self.password_file = password_file.or(self.password_file.take());
        self.password_env = password_env.or(self.password_env.take());
        self.ca_file = ca_file.or(self.ca_file.take());
        self.cert_file = cert_file.or(self.cert_file.take());
        self.key_file = key_file.or(self.key_file.take());
        self.server_name = server_name.or(self.server_name.take());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sasl_ssl() -> KafkaSecurity {
        KafkaSecurity {
            protocol: Some("sasl_ssl".into()),
            mechanism: Some("SCRAM-SHA-512".into()),
            username: Some("agent".into()),
            ..Default::default()
        }
    }

    #[test]
    fn empty_is_plaintext() {
        let s = KafkaSecurity::default();
        assert_eq!(
            s.properties_with("output.security", |_| None).unwrap(),
            vec![("security.protocol".to_string(), "PLAINTEXT".to_string())]
        );
    }

    #[test]
    fn sasl_ssl_with_password_from_env_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "pem").unwrap();
        let mut s = sasl_ssl();
        s.ca_file = Some(ca.clone());
        let props = s
            .properties_with("output.security", |v| {
                (v == DEFAULT_PASSWORD_ENV).then(|| "pw".to_string())
            })
            .unwrap();
        assert_eq!(
            props,
            vec![
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
                ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
                ("sasl.username".into(), "agent".into()),
                ("sasl.password".into(), "pw".into()),
                ("ssl.ca.location".into(), ca.display().to_string()),
            ]
        );
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\nignored\n").unwrap();
        s.password_file = Some(file);
        let props = s.properties_with("x", |_| None).unwrap();
        assert!(props.contains(&("sasl.password".into(), "from-file".into())));
        // A named variable.
        s.password_file = None;
        s.password_env = Some("MY_PW".into());
        let props = s
            .properties_with("x", |v| (v == "MY_PW").then(|| "mine".to_string()))
            .unwrap();
        assert!(props.contains(&("sasl.password".into(), "mine".into())));
    }

    #[test]
    fn errors_name_the_key() {
        let key = |s: KafkaSecurity| {
            s.properties_with("kafka.security", |_| None)
                .unwrap_err()
                .key
        };
        assert_eq!(
            key(KafkaSecurity {
                protocol: Some("TLS".into()),
                ..Default::default()
            }),
            "kafka.security.protocol"
        );
        let mut s = sasl_ssl();
        s.mechanism = Some("GSSAPI".into());
        assert_eq!(key(s), "kafka.security.mechanism");
        let mut s = sasl_ssl();
        s.mechanism = None;
        assert_eq!(key(s), "kafka.security.mechanism");
        let mut s = sasl_ssl();
        s.username = None;
        assert_eq!(key(s), "kafka.security.username");
        // No password anywhere.
        assert_eq!(key(sasl_ssl()), "kafka.security.password_file");
        let mut s = sasl_ssl();
        s.password_file = Some("/nonexistent/pw".into());
        assert_eq!(key(s), "kafka.security.password_file");
        assert_eq!(
            key(KafkaSecurity {
                protocol: Some("SSL".into()),
                ca_file: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            }),
            "kafka.security.ca_file"
        );
        assert_eq!(
            key(KafkaSecurity {
                ca_file: Some("/x".into()),
                ..Default::default()
            }),
            "kafka.security.ca_file"
        );
        assert_eq!(
            key(KafkaSecurity {
                username: Some("u".into()),
                ..Default::default()
            }),
            "kafka.security.username"
        );
    }

    #[test]
    fn client_certificate_and_server_name() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "pem").unwrap();
        std::fs::write(&key, "pem").unwrap();
        let ssl = KafkaSecurity {
            protocol: Some("SSL".into()),
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            ..Default::default()
        };
        let props = ssl.properties_with("s", |_| None).unwrap();
        assert!(props.contains(&(
            "ssl.certificate.location".into(),
            cert.display().to_string()
        )));
        assert!(props.contains(&("ssl.key.location".into(), key.display().to_string())));
        let err = |s: KafkaSecurity| s.validate("s").unwrap_err().key;
        let mut half = ssl.clone();
        half.key_file = None;
        assert_eq!(err(half), "s.key_file");
        let mut plain = ssl.clone();
        plain.protocol = None;
        assert_eq!(err(plain), "s.cert_file");
        // The native producer takes a server name; librdkafka cannot.
        let mut named = ssl;
        named.server_name = Some("bus.example.com".into());
        assert!(named.validate("s").is_ok());
        assert_eq!(
            named.properties_with("s", |_| None).unwrap_err().key,
            "s.server_name"
        );
    }

    #[test]
    fn overrides_win_key_by_key() {
        let mut file = sasl_ssl();
        file.ca_file = Some("/etc/ca.pem".into());
        file.overlay(&KafkaSecurity {
            username: Some("other".into()),
            ..Default::default()
        });
        assert_eq!(file.username.as_deref(), Some("other"));
        assert_eq!(file.mechanism.as_deref(), Some("SCRAM-SHA-512"));
        assert_eq!(file.ca_file, Some("/etc/ca.pem".into()));
    }

    #[test]
    fn parses_from_toml() {
        let s: KafkaSecurity = toml::from_str(
            "protocol = \"SASL_PLAINTEXT\"\nmechanism = \"PLAIN\"\nusername = \"u\"\npassword_env = \"P\"\n",
        )
        .unwrap();
        assert!(s.validate("security").is_ok());
        assert!(toml::from_str::<KafkaSecurity>("passwrd = \"x\"").is_err());
    }
}
