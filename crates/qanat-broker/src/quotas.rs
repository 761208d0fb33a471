//! Client quotas, as Kafka's: produce and fetch byte rates and the request-time share
//! (`request_percentage`, KIP-124) per user (the principal's name), per client id, or per user
//! and client id, with defaults (an entity named null). Stored in
//! `DATA_DIR/client-quotas.json`, rewritten atomically; served through
//! DescribeClientQuotas/AlterClientQuotas (`api::client_quotas`).
//!
//! The most specific quota applies (user+client, user, user default+client, client, client
//! default: Kafka's precedence, simplified to those with a value). Each (entity, kind) has a
//! GCRA meter: a "theoretical arrival time" advanced by bytes/rate per request; a request that
//! pushes it more than one second past now is answered with `throttle_time_ms` for the excess
//! and its connection is not read again until then (Kafka's muting), so over any long window
//! a client moves at most its rate plus one second's burst.
//!
//! `request_percentage` is metered the same way, in nanoseconds of request handling: 100 is
//! one second of handling per second (one thread's worth, as in Kafka), so a request that took
//! 2 ms under a 10% quota costs 20 ms of the client's time. What counts as handling is the
//! work the broker does for the request (decoding, checks, appends, reads, encoding), not the
//! time it waits (long polls, fsync, rebalances).
//!
//! When no quota is set, or none is a request quota, [`Quotas::meters_requests`] is one
//! relaxed load and nothing is measured.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::credentials::{read_json, write_json_atomically, StoreError};

pub const QUOTA_FILE: &str = "client-quotas.json";
pub const PRODUCER_BYTE_RATE: &str = "producer_byte_rate";
pub const CONSUMER_BYTE_RATE: &str = "consumer_byte_rate";
pub const REQUEST_PERCENTAGE: &str = "request_percentage";
/// Keys accepted by AlterClientQuotas.
pub const KEYS: &[&str] = &[PRODUCER_BYTE_RATE, CONSUMER_BYTE_RATE, REQUEST_PERCENTAGE];

/// Burst a client may take above its rate.
const BURST: Duration = Duration::from_secs(1);
/// Longest single throttle (Kafka caps at the quota window, 11 s by default).
const MAX_THROTTLE: Duration = Duration::from_secs(10);

/// Most one request may cost (a day): the meter stays far inside `Instant`'s range.
const MAX_COST_SECONDS: f64 = 86_400.0;

/// A quota entity: user and/or client id; `Some(None)` is the default entity of that type.
///
/// In `client-quotas.json` a part that is not there is left out (or `null`, as files have
/// it that were written before defaults were told apart), a name is a string and the
/// default is `{"default": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entity {
    #[serde(default, skip_serializing_if = "Option::is_none", with = "entity_part")]
    pub user: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "entity_part")]
    pub client_id: Option<Option<String>>,
}

/// One part of an [`Entity`] in the quota file.
mod entity_part {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Name(String),
        Default { default: bool },
    }

    pub fn serialize<S: Serializer>(
        part: &Option<Option<String>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match part {
            Some(Some(name)) => Stored::Name(name.clone()).serialize(serializer),
            Some(None) => Stored::Default { default: true }.serialize(serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Ok(match Option::<Stored>::deserialize(deserializer)? {
            Some(Stored::Name(name)) => Some(Some(name)),
            Some(Stored::Default { default: true }) => Some(None),
            Some(Stored::Default { default: false }) | None => None,
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct QuotaFile {
    entries: Vec<(Entity, BTreeMap<String, f64>)>,
}

/// Which quota a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Bytes produced.
    Produce,
    /// Bytes fetched.
    Fetch,
    /// Nanoseconds of request handling.
    Request,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Produce => PRODUCER_BYTE_RATE,
            Kind::Fetch => CONSUMER_BYTE_RATE,
            Kind::Request => REQUEST_PERCENTAGE,
        }
    }

    /// The quota's value as units (bytes, nanoseconds) per second.
    fn units_per_second(self, value: f64) -> f64 {
        match self {
            Kind::Produce | Kind::Fetch => value,
            Kind::Request => value / 100.0 * 1e9,
        }
    }
}

/// The quotas and their meters.
#[derive(Debug)]
pub struct Quotas {
    path: PathBuf,
    entries: RwLock<BTreeMap<Entity, BTreeMap<String, f64>>>,
    meters: Mutex<HashMap<(Entity, Kind), Instant>>,
    /// Whether any entity has a `request_percentage`: every request asks, so it is an atomic.
    request_quotas: AtomicBool,
}

fn any_request_quota(entries: &BTreeMap<Entity, BTreeMap<String, f64>>) -> bool {
    entries.values().any(|v| v.contains_key(REQUEST_PERCENTAGE))
}

impl Quotas {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(QUOTA_FILE);
        let file: QuotaFile = read_json(&path)?;
        let entries: BTreeMap<_, _> = file.entries.into_iter().collect();
        Ok(Self {
            path,
            request_quotas: AtomicBool::new(any_request_quota(&entries)),
            entries: RwLock::new(entries),
            meters: Mutex::new(HashMap::new()),
        })
    }

    /// Whether request handling time must be measured (some `request_percentage` is set).
    pub fn meters_requests(&self) -> bool {
        self.request_quotas.load(Ordering::Relaxed)
    }

    pub fn entries(&self) -> Vec<(Entity, BTreeMap<String, f64>)> {
        self.entries
            .read()
            .iter()
            .map(|(e, v)| (e.clone(), v.clone()))
            .collect()
    }

    /// Set (`Some`) or remove (`None`) values; durable when this returns.
    pub fn alter(&self, changes: Vec<(Entity, String, Option<f64>)>) -> Result<(), StoreError> {
        let mut entries = self.entries.write();
        let mut next = entries.clone();
        for (entity, key, value) in changes {
            let values = next.entry(entity.clone()).or_default();
            match value {
                Some(v) => {
                    values.insert(key, v);
                }
                None => {
                    values.remove(&key);
                }
            }
            if values.is_empty() {
                next.remove(&entity);
            }
        }
        let file = QuotaFile {
            entries: next.iter().map(|(e, v)| (e.clone(), v.clone())).collect(),
        };
        write_json_atomically(&self.path, &file)?;
        self.request_quotas
            .store(any_request_quota(&next), Ordering::Relaxed);
        *entries = next;
        self.meters.lock().clear();
        Ok(())
    }

    /// The entity and rate that apply to `user`/`client_id` for `kind`, if any.
    fn applicable(&self, user: &str, client_id: &str, kind: Kind) -> Option<(Entity, f64)> {
        let entries = self.entries.read();
        // Every Produce and Fetch asks: no candidate entities to build when no quota is set.
        if entries.is_empty() {
            return None;
        }
        let u = |v: Option<&str>| Some(v.map(str::to_string));
        let candidates = [
            Entity {
                user: u(Some(user)),
                client_id: u(Some(client_id)),
            },
            Entity {
                user: u(Some(user)),
                client_id: None,
            },
            Entity {
                user: u(None),
                client_id: u(Some(client_id)),
            },
            Entity {
                user: u(None),
                client_id: None,
            },
            Entity {
                user: None,
                client_id: u(Some(client_id)),
            },
            Entity {
                user: None,
                client_id: u(None),
            },
        ];
        candidates.into_iter().find_map(|e| {
            let rate = *entries.get(&e)?.get(kind.key())?;
            // The meter of a default entity is per concrete client, as in Kafka.
            let metered = Entity {
                user: e.user.as_ref().map(|_| Some(user.to_string())),
                client_id: e.client_id.as_ref().map(|_| Some(client_id.to_string())),
            };
            (rate > 0.0).then_some((metered, rate))
        })
    }

    /// Count `amount` of `kind` (bytes, or nanoseconds of handling for [`Kind::Request`]) for
    /// the client; how long it must be throttled (zero if not).
    pub fn record(&self, user: &str, client_id: &str, kind: Kind, amount: u64) -> Duration {
        let Some((entity, value)) = self.applicable(user, client_id, kind) else {
            return Duration::ZERO;
        };
        let rate = kind.units_per_second(value);
        let now = Instant::now();
        let mut meters = self.meters.lock();
        let tat = meters.entry((entity, kind)).or_insert(now);
        let start = (*tat).max(now);
        // Bounded, so a tiny rate cannot overflow the meter (from_secs_f64 panics past range).
        let cost = Duration::from_secs_f64((amount as f64 / rate).min(MAX_COST_SECONDS));
        *tat = start + cost;
        let ahead = tat.saturating_duration_since(now);
        ahead.saturating_sub(BURST).min(MAX_THROTTLE)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn default_entities_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let entities = [
            Entity {
                user: Some(None),
                client_id: None,
            },
            Entity {
                user: None,
                client_id: Some(None),
            },
            Entity {
                user: Some(Some("alice".into())),
                client_id: Some(None),
            },
            Entity {
                user: None,
                client_id: Some(Some("etl".into())),
            },
        ];
        let q = Quotas::open(dir.path()).unwrap();
        q.alter(
            entities
                .iter()
                .map(|e| (e.clone(), PRODUCER_BYTE_RATE.to_string(), Some(512.0)))
                .collect(),
        )
        .unwrap();
        let reopened: Vec<Entity> = Quotas::open(dir.path())
            .unwrap()
            .entries()
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        let mut want = entities.to_vec();
        want.sort();
        assert_eq!(reopened, want);
        // A file written before defaults were told apart: null is an absent part.
        std::fs::write(
            dir.path().join(QUOTA_FILE),
            r#"{"entries": [[{"user": null, "client_id": "slow"}, {"producer_byte_rate": 1.0}]]}"#,
        )
        .unwrap();
        let old = Quotas::open(dir.path()).unwrap().entries();
        assert_eq!(
            old[0].0,
            Entity {
                user: None,
                client_id: Some(Some("slow".into()))
            }
        );
    }

    #[test]
    fn most_specific_quota_applies_and_throttle_follows_the_rate() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quotas::open(dir.path()).unwrap();
        let client = |c: &str| Entity {
            user: None,
            client_id: Some(Some(c.to_string())),
        };
        q.alter(vec![
            (client("slow"), PRODUCER_BYTE_RATE.into(), Some(1000.0)),
            (
                Entity {
                    user: Some(Some("alice".into())),
                    client_id: None,
                },
                PRODUCER_BYTE_RATE.into(),
                Some(1_000_000.0),
            ),
        ])
        .unwrap();
        assert_eq!(
            q.record("bob", "fast", Kind::Produce, 1 << 30),
            Duration::ZERO
        );
        assert_eq!(
            q.record("bob", "slow", Kind::Fetch, 1 << 30),
            Duration::ZERO
        );
        // One second of burst is free, then each 1000 bytes cost a second.
        assert_eq!(q.record("bob", "slow", Kind::Produce, 1000), Duration::ZERO);
        let t = q.record("bob", "slow", Kind::Produce, 2000);
        assert!(
            t > Duration::from_millis(1900) && t <= Duration::from_secs(2),
            "{t:?}"
        );
        // alice's own quota wins over the client id's.
        assert_eq!(
            q.record("alice", "slow", Kind::Produce, 1_000_000),
            Duration::ZERO
        );
        // request_percentage: 100 is one second of handling per second. Under 1%, 20 ms of
        // handling is 2 s of the client's time: one second over the burst.
        assert!(!q.meters_requests());
        q.alter(vec![(client("busy"), REQUEST_PERCENTAGE.into(), Some(1.0))])
            .unwrap();
        assert!(q.meters_requests());
        let ms = |n: u64| Duration::from_millis(n).as_nanos() as u64;
        assert_eq!(
            q.record("bob", "busy", Kind::Request, ms(10)),
            Duration::ZERO
        );
        let t = q.record("bob", "busy", Kind::Request, ms(10));
        assert!(
            t > Duration::from_millis(900) && t <= Duration::from_secs(1),
            "{t:?}"
        );
        assert_eq!(
            q.record("bob", "other", Kind::Request, ms(1_000)),
            Duration::ZERO
        );
        // The byte quotas of the same client are metered apart.
        assert_eq!(
            q.record("bob", "busy", Kind::Produce, 1 << 30),
            Duration::ZERO
        );
        q.alter(vec![(client("busy"), REQUEST_PERCENTAGE.into(), None)])
            .unwrap();
        assert!(!q.meters_requests());
        // A rate so small that one byte would cost more than Instant can hold.
        q.alter(vec![(
            client("tiny"),
            PRODUCER_BYTE_RATE.into(),
            Some(1e-300),
        )])
        .unwrap();
        assert!(q.record("bob", "tiny", Kind::Produce, 1 << 40) <= MAX_THROTTLE);
        q.alter(vec![(client("tiny"), PRODUCER_BYTE_RATE.into(), None)])
            .unwrap();
        let reopened = Quotas::open(dir.path()).unwrap();
        assert_eq!(reopened.entries().len(), 2);
        reopened
            .alter(vec![(client("slow"), PRODUCER_BYTE_RATE.into(), None)])
            .unwrap();
        assert_eq!(Quotas::open(dir.path()).unwrap().entries().len(), 1);
    }
}
