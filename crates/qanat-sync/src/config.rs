//! Job files: TOML with job-wide settings in `[sync]` and one `[[table]]` per table; every
//! `[sync]` key can be overridden with `QANAT_SYNC_<KEY>` (through `qanat-config`) and, in
//! the command, with a flag. Unknown keys and bad values are errors naming the key.
//!
//! ```toml
//! [sync]
//! channels = 4                # tasks per table at once
//! concurrency = 2             # tables at once
//! max_records_per_sec = 50000 # job-wide; 0 = unlimited
//! max_dirty_records = 100
//! dirty_file = "dirty.jsonl"
//! max_tasks_per_server = 4    # job-wide cap per source host:port; 0 = none
//!
//! [sync.security]             # for kafka:// sources and targets (see qanat_config::KafkaSecurity)
//! protocol = "SASL_SSL"
//! mechanism = "SCRAM-SHA-512"
//! username = "sync"
//! password_file = "/etc/qanat/sync.password"
//! ca_file = "/etc/qanat/ca.pem"
//!
//! [[table]]
//! from = "mysql://root@127.0.0.1:3306/shop.orders"
//! to = "postgres://postgres@127.0.0.1:5432/dw/public.orders"
//! mode = "upsert"
//! split_pk = "id"
//! priority = 10               # higher starts first
//!
//! [[table]]                   # a sharded source: 8 physical tables in 2 databases
//! from = ["mysql://root@127.0.0.1:3306/shop_a.order_{0000..0003}",
//!         "mysql://root@127.0.0.1:3306/shop_b.order_{0004..0007}"]
//! to = "postgres://postgres@127.0.0.1:5432/dw/public.orders"
//! shard_column = "_shard"     # optional: each row's physical table
//! ```

use std::path::PathBuf;

use crate::plugin::WriteMode;
use crate::SyncError;

/// Job-wide settings (`[sync]`), each also a per-table default.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub channels: usize,
    pub concurrency: usize,
    pub max_splits: usize,
    pub batch_rows: usize,
    pub retries: u32,
    pub retry_backoff_ms: u64,
    /// 0 is unlimited.
    pub max_records_per_sec: u64,
    /// 0 is unlimited.
    pub max_bytes_per_sec: u64,
    pub max_dirty_records: Option<u64>,
    pub max_dirty_ratio: Option<f64>,
    pub dirty_file: Option<PathBuf>,
    pub mode: WriteMode,
    pub verify: bool,
    /// Tasks reading from one source server at once, job-wide; 0 = no cap.
    pub max_tasks_per_server: usize,
    /// How the job's `kafka://` sources and targets reach a secured bus (`[sync.security]`).
    #[serde(skip_serializing_if = "qanat_config::KafkaSecurity::is_empty")]
    pub security: qanat_config::KafkaSecurity,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            channels: 4,
            concurrency: 2,
            max_splits: 32,
            batch_rows: 4096,
            retries: 3,
            retry_backoff_ms: 500,
            max_records_per_sec: 0,
            max_bytes_per_sec: 0,
            max_dirty_records: None,
            max_dirty_ratio: None,
            dirty_file: None,
            mode: WriteMode::Insert,
            verify: false,
            max_tasks_per_server: 0,
            security: qanat_config::KafkaSecurity::default(),
        }
    }
}

/// A table's source: one address, or a list of them (the shards of one logical table).
/// Any address may hold `{FIRST..LAST}` ranges, each expanding to one shard per number.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum Sources {
    One(String),
    Many(Vec<String>),
}

impl Sources {
    pub fn dsns(&self) -> Vec<String> {
        match self {
            Sources::One(s) => vec![s.clone()],
            Sources::Many(v) => v.clone(),
        }
    }
}

impl From<String> for Sources {
    fn from(s: String) -> Self {
        Sources::One(s)
    }
}

/// One `[[table]]`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub from: Sources,
    /// For a sharded source: a text column added to every row, naming its physical table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_column: Option<String>,
    /// Copy only these source columns (default: all), by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Copy only the source rows matching this SQL condition (the source's dialect).
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub to: String,
    pub mode: Option<WriteMode>,
    pub split_pk: Option<String>,
    pub channels: Option<usize>,
    /// Tables with a higher priority start first (default 0); equal ones in file order.
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobFile {
    pub sync: Settings,
    pub table: Vec<TableSpec>,
}

fn env_value(key: &str, raw: &str) -> Result<Option<toml::Value>, String> {
    Ok(Some(match key {
        "max_dirty_ratio" => toml::Value::Float(
            raw.parse()
                .map_err(|_| format!("{raw:?} is not a number"))?,
        ),
        "dirty_file" | "mode" => toml::Value::String(raw.to_string()),
        _ => qanat_config::plain_value(raw),
    }))
}

fn invalid(key: &str, reason: impl std::fmt::Display) -> SyncError {
    SyncError::Invalid(format!("{key}: {reason}"))
}

impl JobFile {
    /// Parse a job file's text (`origin` names it in errors) and apply `QANAT_SYNC_*`.
    pub fn parse<I>(text: &str, origin: &str, env: I) -> Result<JobFile, SyncError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| SyncError::Invalid(format!("{origin}: {e}")))?;
        qanat_config::overlay_env(&mut doc, "QANAT_", &["sync"], false, env, |_, key, raw| {
            env_value(key, raw)
        })
        .map_err(|e| SyncError::Invalid(e.to_string()))?;
        let job: JobFile = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| SyncError::Invalid(format!("{origin}: {e}")))?;
        Ok(job)
    }

    /// Check every value; errors name the key.
    pub fn validate(&self) -> Result<(), SyncError> {
        let s = &self.sync;
        if s.channels == 0 {
            return Err(invalid("sync.channels", "must be at least 1"));
        }
        if s.concurrency == 0 {
            return Err(invalid("sync.concurrency", "must be at least 1"));
        }
        if s.max_splits == 0 || s.max_splits > 4096 {
            return Err(invalid("sync.max_splits", "must be in 1..=4096"));
        }
        if s.batch_rows == 0 || s.batch_rows > 1_000_000 {
            return Err(invalid("sync.batch_rows", "must be in 1..=1000000"));
        }
        if let Some(r) = s.max_dirty_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(invalid(
                    "sync.max_dirty_ratio",
                    format!("{r} is outside 0.0–1.0"),
                ));
            }
        }
        s.security
            .validate("sync.security")
            .map_err(|e| SyncError::Invalid(e.to_string()))?;
        if self.table.is_empty() {
            return Err(SyncError::Invalid(
                "no [[table]]: a job needs at least one table (from, to)".into(),
            ));
        }
        for (i, t) in self.table.iter().enumerate() {
            let dsns = t.from.dsns();
            if dsns.is_empty() {
                return Err(invalid(&format!("table[{i}].from"), "an empty list"));
            }
            for (j, dsn) in dsns.iter().enumerate() {
                let key = match &t.from {
                    Sources::One(_) => format!("table[{i}].from"),
                    Sources::Many(_) => format!("table[{i}].from[{j}]"),
                };
                let expanded = crate::shard::expand_braces(dsn).map_err(|e| invalid(&key, e))?;
                for one in expanded {
                    crate::dsn::Endpoint::parse(&one).map_err(|e| invalid(&key, e))?;
                }
            }
            if t.columns.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(&format!("table[{i}].columns"), "an empty list"));
            }
            if let Some(c) = &t.shard_column {
                if c.is_empty() {
                    return Err(invalid(&format!("table[{i}].shard_column"), "empty"));
                }
            }
            crate::dsn::Endpoint::parse(&t.to)
                .map_err(|e| invalid(&format!("table[{i}].to"), e))?;
            if t.channels == Some(0) {
                return Err(invalid(
                    &format!("table[{i}].channels"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"
[sync]
channels = 2
[[table]]
from = "mysql://root@127.0.0.1:3306/shop.orders"
to = "parquet:///tmp/lake/orders?ds=1"
"#;

    #[test]
    fn env_overrides_the_file() {
        let env = vec![
            ("QANAT_SYNC_CHANNELS".to_string(), "7".to_string()),
            ("QANAT_SYNC_MAX_DIRTY_RATIO".to_string(), "0.5".to_string()),
        ];
        let job = JobFile::parse(JOB, "job.toml", env);
        assert!(
            matches!(&job, Ok(j) if j.sync.channels == 7 && j.sync.max_dirty_ratio == Some(0.5))
        );
    }

    #[test]
    fn errors_name_the_key() {
        let bad = JobFile::parse(&JOB.replace("channels", "chanels"), "job.toml", vec![]);
        assert!(
            matches!(&bad, Err(e) if e.to_string().contains("chanels")),
            "{bad:?}"
        );
        let zero = JobFile::parse(&JOB.replace("= 2", "= 0"), "job.toml", vec![])
            .and_then(|j| j.validate());
        assert!(matches!(&zero, Err(e) if e.to_string().contains("sync.channels")));
        let dsn = JobFile::parse(&JOB.replace("mysql://", "mysq://"), "job.toml", vec![])
            .and_then(|j| j.validate());
        assert!(matches!(&dsn, Err(e) if e.to_string().contains("table[0].from")));
    }
}
