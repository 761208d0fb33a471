//! Configuration shared by every Qanat component: a TOML document overlaid with environment
//! variables, so each key of a file can also be set as `PREFIX<TABLE>_<KEY>` (or `PREFIX<KEY>`
//! for top-level keys), e.g. `QANAT_STORAGE_FSYNC=always`.
//!
//! Values from the environment are typed by what they look like (integer, boolean, else
//! string) unless the component supplies its own typing for a key (lists, for instance).
//! Precedence, applied by callers: flag, then environment, then file, then default.
//!
//! [`KafkaSecurity`] is the `security` table every Kafka client of Qanat shares (protocol,
//! SASL mechanism and user, password file or variable, CA file); with the `rdkafka` feature it
//! applies itself to an rdkafka `ClientConfig`.

mod kafka_security;

pub use kafka_security::{KafkaSecurity, SecurityError, DEFAULT_PASSWORD_ENV};

/// Tune a librdkafka consumer that reads a backlog as fast as it can (`lake land`, the audit
/// readers, `sync`'s bus reader). Once its prefetch queue is full librdkafka waits
/// `fetch.queue.backoff.ms` (1 s by default) before it fetches again; reading a backlog every
/// fetch fills the queue, so such a reader idled more than half the time.
#[cfg(feature = "rdkafka")]
pub fn backlog_reader(config: &mut rdkafka::ClientConfig) -> &mut rdkafka::ClientConfig {
    config.set("fetch.queue.backoff.ms", "10")
}

/// An environment override that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {var}: {reason}")]
pub struct EnvError {
    pub var: String,
    pub reason: String,
}

/// An environment string as the TOML value it most plausibly means.
pub fn plain_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = raw.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(raw.to_string())
    }
}

/// Overlay `PREFIX<TABLE>_<KEY>` variables from `env` onto `doc`, for the named `tables`
/// (lower case). With `top_level`, a `PREFIX<KEY>` that names no table sets a top-level key.
/// `value(table, key, raw)` types each value (`table` is "" for top-level keys); `Ok(None)`
/// skips a variable that names no key of this component.
pub fn overlay_env<I, V>(
    doc: &mut toml::Table,
    prefix: &str,
    tables: &[&str],
    top_level: bool,
    env: I,
    value: V,
) -> Result<(), EnvError>
where
    I: IntoIterator<Item = (String, String)>,
    V: Fn(&str, &str, &str) -> Result<Option<toml::Value>, String>,
{
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(prefix) else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let found = tables
            .iter()
            .find_map(|t| rest.strip_prefix(&format!("{t}_")).map(|k| (*t, k)));
        let (table, key) = match found {
            Some(found) => found,
            None if top_level && !rest.is_empty() => ("", rest.as_str()),
            None => continue,
        };
        let parsed = match value(table, key, &raw) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(reason) => return Err(EnvError { var, reason }),
        };
        let target = if table.is_empty() {
            &mut *doc
        } else {
            let entry = doc
                .entry(table)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(EnvError {
                        var,
                        reason: format!("[{table}] in the file is not a table"),
                    })
                }
            }
        };
        target.insert(key.to_string(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tables_top_level_and_typing() {
        let mut doc: toml::Table = toml::from_str("[storage]\nfsync = 5\n").unwrap();
        overlay_env(
            &mut doc,
            "QANAT_",
            &["storage", "broker"],
            true,
            env(&[
                ("QANAT_STORAGE_FSYNC", "always"),
                ("QANAT_BROKER_AUTO_CREATE_TOPICS", "false"),
                ("QANAT_HOST", "web7"),
                ("OTHER_X", "1"),
            ]),
            |_, _, raw| Ok(Some(plain_value(raw))),
        )
        .unwrap();
        assert_eq!(doc["storage"]["fsync"].as_str(), Some("always"));
        assert_eq!(doc["broker"]["auto_create_topics"].as_bool(), Some(false));
        assert_eq!(doc["host"].as_str(), Some("web7"));
        assert!(!doc.contains_key("x"));
    }

    #[test]
    fn unknown_keys_can_be_skipped() {
        let mut doc = toml::Table::new();
        overlay_env(
            &mut doc,
            "QANAT_AGENT_",
            &["output"],
            true,
            env(&[("QANAT_AGENT_HOST", "h"), ("QANAT_AGENT_NOPE", "1")]),
            |_, key, raw| Ok((key == "host").then(|| plain_value(raw))),
        )
        .unwrap();
        assert_eq!(doc.len(), 1);
    }

    #[test]
    fn errors_name_the_variable() {
        let mut doc: toml::Table = toml::from_str("storage = 1\n").unwrap();
        let e = overlay_env(
            &mut doc,
            "QANAT_",
            &["storage"],
            false,
            env(&[("QANAT_STORAGE_FSYNC", "always")]),
            |_, _, raw| Ok(Some(plain_value(raw))),
        )
        .unwrap_err();
        assert_eq!(e.var, "QANAT_STORAGE_FSYNC");
        let e = overlay_env(
            &mut toml::Table::new(),
            "QANAT_",
            &["kafka"],
            false,
            env(&[("QANAT_KAFKA_PROPERTIES", "x")]),
            |_, _, _| Err("set it in the file".into()),
        )
        .unwrap_err();
        assert_eq!(e.reason, "set it in the file");
    }
}
