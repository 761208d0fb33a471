//! `qanat quotas set|list|delete`: client quotas (`producer_byte_rate`, `consumer_byte_rate`,
//! `request_percentage`) per user, client id, or both, with defaults — Kafka's
//! `kafka-configs --entity-type users/clients`. Against a stopped broker's data directory
//! (`client-quotas.json`, see `qanat_broker::quotas`), or, with `--bootstrap`, against a
//! running broker through AlterClientQuotas/DescribeClientQuotas, on any listener with the
//! security flags (altering needs AlterConfigs on the cluster when the authorizer is on,
//! describing DescribeConfigs).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kafka_protocol::messages::alter_client_quotas_request::{EntityData, EntryData, OpData};
use kafka_protocol::messages::describe_client_quotas_request::ComponentData;
use kafka_protocol::messages::{
    AlterClientQuotasRequest, AlterClientQuotasResponse, ApiKey, DescribeClientQuotasRequest,
    DescribeClientQuotasResponse,
};
use qanat_broker::quotas::{Entity, Quotas, KEYS};

use crate::admin::{error_text, s, AdminConn};

#[derive(Args)]
pub struct QuotasArgs {
    /// Data directory of the (stopped) broker.
    #[arg(
        long,
        env = "QANAT_DATA_DIR",
        default_value = "./qanat-data",
        conflicts_with = "bootstrap"
    )]
    data_dir: PathBuf,
    /// A running broker, HOST:PORT, instead of a data directory.
    #[arg(long, value_name = "HOST:PORT")]
    bootstrap: Option<String>,
    /// How to reach a secured listener with --bootstrap.
    #[command(flatten)]
    security: crate::kafka_security::SecurityArgs,
    #[command(subcommand)]
    action: Action,
}

/// The entity a quota is about: a user, a client id, or both; `--user-default` and
/// `--client-default` are the defaults of their type.
#[derive(Args, Clone)]
struct EntityArgs {
    #[arg(long, conflicts_with = "user_default")]
    user: Option<String>,
    #[arg(long)]
    user_default: bool,
    #[arg(long, conflicts_with = "client_default")]
    client_id: Option<String>,
    #[arg(long)]
    client_default: bool,
}

impl EntityArgs {
    fn entity(&self) -> Option<Entity> {
        let part = |name: &Option<String>, default: bool| match (name, default) {
            (Some(n), _) => Some(Some(n.clone())),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let entity = Entity {
            user: part(&self.user, self.user_default),
            client_id: part(&self.client_id, self.client_default),
        };
        (entity.user.is_some() || entity.client_id.is_some()).then_some(entity)
    }

    fn required(&self) -> anyhow::Result<Entity> {
        self.entity().context(
            "name the entity: --user NAME or --user-default, and/or --client-id ID or --client-default",
        )
    }
}

#[derive(Subcommand)]
enum Action {
    /// Set quotas of an entity (other keys of it are kept).
    Set {
        #[command(flatten)]
        entity: EntityArgs,
        /// KEY=VALUE[,KEY=VALUE…]: producer_byte_rate and consumer_byte_rate in bytes per
        /// second, request_percentage in percent of one thread's time.
        #[arg(long, required = true, value_delimiter = ',')]
        add_config: Vec<String>,
    },
    /// List quotas (of one entity's user and/or client id when given).
    List {
        #[command(flatten)]
        entity: EntityArgs,
    },
    /// Delete quotas of an entity: the keys given, or all of them.
    Delete {
        #[command(flatten)]
        entity: EntityArgs,
        /// KEY[,KEY…] to delete; all the entity's keys when absent.
        #[arg(long, value_delimiter = ',')]
        delete_config: Vec<String>,
    },
}

fn check_key(key: &str) -> anyhow::Result<()> {
    if !KEYS.contains(&key) {
        bail!("unknown quota key {key:?}: use one of {}", KEYS.join(", "));
    }
    Ok(())
}

fn parse_config(pairs: &[String]) -> anyhow::Result<Vec<(String, f64)>> {
    pairs
        .iter()
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--add-config {pair:?}: expected KEY=VALUE"))?;
            check_key(k)?;
            let value: f64 = v
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v > 0.0)
                .with_context(|| format!("--add-config {k}={v}: a positive number is needed"))?;
            Ok((k.to_string(), value))
        })
        .collect()
}

/// `user=alice client-id=<default>`.
fn describe(entity: &Entity) -> String {
    let part = |kind: &str, v: &Option<Option<String>>| {
        v.as_ref()
            .map(|name| format!("{kind}={}", name.as_deref().unwrap_or("<default>")))
    };
    [
        part("user", &entity.user),
        part("client-id", &entity.client_id),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ")
}

fn print(entries: &[(Entity, BTreeMap<String, f64>)]) {
    for (entity, values) in entries {
        let values: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}\t{}", describe(entity), values.join(","));
    }
}

/// Whether `entity` is listed under the filter `want` (every part `want` names matches).
fn matches(want: &Entity, entity: &Entity) -> bool {
    (want.user.is_none() || want.user == entity.user)
        && (want.client_id.is_none() || want.client_id == entity.client_id)
}

pub async fn run(args: QuotasArgs) -> anyhow::Result<()> {
    // Offline, the data directory's lock is held until the edit is done.
    let (_lock, store): (_, Box<dyn QuotaStore>) = match &args.bootstrap {
        Some(addr) => (
            None,
            Box::new(AdminConn::connect(addr, "qanat-quotas", &args.security)?),
        ),
        None => {
            let lock = crate::admin::lock_data_dir(&args.data_dir)?;
            let store = Quotas::open(&args.data_dir)
                .with_context(|| format!("opening quotas in {}", args.data_dir.display()))?;
            (lock, Box::new(store))
        }
    };
    match args.action {
        Action::Set { entity, add_config } => {
            let entity = entity.required()?;
            let values = parse_config(&add_config)?;
            store.alter(
                values
                    .into_iter()
                    .map(|(k, v)| (entity.clone(), k, Some(v)))
                    .collect(),
            )?;
            println!("quotas of {} set", describe(&entity));
        }
        Action::Delete {
            entity,
            delete_config,
        } => {
            let entity = entity.required()?;
            for k in &delete_config {
                check_key(k)?;
            }
            let present: Vec<String> = store
                .list()?
                .into_iter()
                .find(|(e, _)| *e == entity)
                .map(|(_, values)| values.into_keys().collect())
                .unwrap_or_default();
            let keys: Vec<String> = if delete_config.is_empty() {
                present
            } else {
                delete_config
                    .into_iter()
                    .filter(|k| present.contains(k))
                    .collect()
            };
            if keys.is_empty() {
                bail!("no such quota: {}", describe(&entity));
            }
            store.alter(
                keys.into_iter()
                    .map(|k| (entity.clone(), k, None))
                    .collect(),
            )?;
            println!("quotas of {} deleted", describe(&entity));
        }
        Action::List { entity } => {
            let mut entries = store.list()?;
            if let Some(want) = entity.entity() {
                entries.retain(|(e, _)| matches(&want, e));
            }
            print(&entries);
        }
    }
    Ok(())
}

type Change = (Entity, String, Option<f64>);

/// Where the quotas are: a data directory or a running broker.
trait QuotaStore {
    fn list(&self) -> anyhow::Result<Vec<(Entity, BTreeMap<String, f64>)>>;
    fn alter(&self, changes: Vec<Change>) -> anyhow::Result<()>;
}

impl QuotaStore for Quotas {
    fn list(&self) -> anyhow::Result<Vec<(Entity, BTreeMap<String, f64>)>> {
        Ok(self.entries())
    }

    fn alter(&self, changes: Vec<Change>) -> anyhow::Result<()> {
        Quotas::alter(self, changes).context("writing the quotas")
    }
}

fn parts(entity: &Entity) -> Vec<(&'static str, Option<String>)> {
    let mut out = Vec::new();
    if let Some(u) = &entity.user {
        out.push(("user", u.clone()));
    }
    if let Some(c) = &entity.client_id {
        out.push(("client-id", c.clone()));
    }
    out
}

impl QuotaStore for AdminConn {
    fn list(&self) -> anyhow::Result<Vec<(Entity, BTreeMap<String, f64>)>> {
        // Any user, and any client id: both kinds of entity, each with or without the other.
        let mut out: BTreeMap<Entity, BTreeMap<String, f64>> = BTreeMap::new();
        for kind in ["user", "client-id"] {
            let req = DescribeClientQuotasRequest::default()
                .with_components(vec![ComponentData::default()
                    .with_entity_type(s(kind))
                    .with_match_type(2)])
                .with_strict(false);
            let resp: DescribeClientQuotasResponse =
                self.call(ApiKey::DescribeClientQuotas, 0..=1, &req)?;
            if resp.error_code != 0 {
                bail!(
                    "describing quotas: {}",
                    error_text(resp.error_code, resp.error_message.as_ref())
                );
            }
            for entry in resp.entries.unwrap_or_default() {
                let mut entity = Entity {
                    user: None,
                    client_id: None,
                };
                for part in &entry.entity {
                    let name = part.entity_name.as_ref().map(|n| n.to_string());
                    match part.entity_type.as_str() {
                        "user" => entity.user = Some(name),
                        "client-id" => entity.client_id = Some(name),
                        other => bail!("the broker answered an unknown entity type {other:?}"),
                    }
                }
                let values = entry
                    .values
                    .iter()
                    .map(|v| (v.key.to_string(), v.value))
                    .collect();
                out.insert(entity, values);
            }
        }
        Ok(out.into_iter().collect())
    }

    fn alter(&self, changes: Vec<Change>) -> anyhow::Result<()> {
        let mut by_entity: BTreeMap<Entity, Vec<OpData>> = BTreeMap::new();
        for (entity, key, value) in changes {
            by_entity.entry(entity).or_default().push(
                OpData::default()
                    .with_key(s(&key))
                    .with_value(value.unwrap_or_default())
                    .with_remove(value.is_none()),
            );
        }
        let entries = by_entity
            .into_iter()
            .map(|(entity, ops)| {
                EntryData::default()
                    .with_entity(
                        parts(&entity)
                            .into_iter()
                            .map(|(t, n)| {
                                EntityData::default()
                                    .with_entity_type(s(t))
                                    .with_entity_name(n.as_deref().map(s))
                            })
                            .collect(),
                    )
                    .with_ops(ops)
            })
            .collect();
        let req = AlterClientQuotasRequest::default().with_entries(entries);
        let resp: AlterClientQuotasResponse = self.call(ApiKey::AlterClientQuotas, 0..=1, &req)?;
        let failed: Vec<String> = resp
            .entries
            .iter()
            .filter(|e| e.error_code != 0)
            .map(|e| error_text(e.error_code, e.error_message.as_ref()))
            .collect();
        if !failed.is_empty() {
            bail!("altering quotas: {}", failed.join("; "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn add_config_is_checked() {
        let ok = parse_config(&[
            "producer_byte_rate=1024".into(),
            "request_percentage=12.5".into(),
        ])
        .unwrap();
        assert_eq!(
            ok,
            vec![
                ("producer_byte_rate".to_string(), 1024.0),
                ("request_percentage".to_string(), 12.5)
            ]
        );
        for bad in [
            "producer_byte_rate",
            "bytes=1",
            "consumer_byte_rate=-1",
            "consumer_byte_rate=x",
        ] {
            assert!(parse_config(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn entities_are_described_like_kafka_configs() {
        let e = Entity {
            user: Some(Some("alice".into())),
            client_id: Some(None),
        };
        assert_eq!(describe(&e), "user=alice client-id=<default>");
        let filter = Entity {
            user: Some(Some("alice".into())),
            client_id: None,
        };
        assert!(matches(&filter, &e));
        assert!(!matches(
            &Entity {
                user: Some(None),
                client_id: None
            },
            &e
        ));
    }
}
