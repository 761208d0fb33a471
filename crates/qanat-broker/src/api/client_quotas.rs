//! DescribeClientQuotas and AlterClientQuotas over [`crate::quotas::Quotas`]. Entity types
//! `user` and `client-id`; keys `producer_byte_rate`, `consumer_byte_rate` and
//! `request_percentage`. Describing needs
//! DescribeConfigs on the cluster, altering AlterConfigs (CLUSTER_AUTHORIZATION_FAILED
//! otherwise), as in Kafka.

use std::ops::RangeInclusive;

use kafka_protocol::messages::alter_client_quotas_response::{
    EntityData as AlterEntity, EntryData as AlterEntry,
};
use kafka_protocol::messages::describe_client_quotas_response::{EntityData, EntryData, ValueData};
use kafka_protocol::messages::{
    AlterClientQuotasRequest, AlterClientQuotasResponse, DescribeClientQuotasRequest,
    DescribeClientQuotasResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::acl::AclOperation;
use crate::quotas::{Entity, KEYS};
use crate::server::Session;
use crate::Broker;

pub const DESCRIBE_VERSIONS: RangeInclusive<i16> = 0..=1;
pub const ALTER_VERSIONS: RangeInclusive<i16> = 0..=1;

const USER: &str = "user";
const CLIENT_ID: &str = "client-id";

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

fn parts(e: &Entity) -> Vec<(&'static str, Option<String>)> {
    let mut out = Vec::new();
    if let Some(u) = &e.user {
        out.push((USER, u.clone()));
    }
    if let Some(c) = &e.client_id {
        out.push((CLIENT_ID, c.clone()));
    }
    out
}

impl Broker {
    pub(crate) fn describe_client_quotas(
        &self,
        req: DescribeClientQuotasRequest,
        session: &Session,
    ) -> DescribeClientQuotasResponse {
        if !self.cluster_allowed(session, AclOperation::DescribeConfigs) {
            return DescribeClientQuotasResponse::default()
                .with_error_code(ResponseError::ClusterAuthorizationFailed.code())
                .with_entries(None);
        }
        let matches = |e: &Entity| {
            let have = parts(e);
            let component_ok = req.components.iter().all(|c| {
                let value = have.iter().find(|(t, _)| *t == c.entity_type.as_str());
                match (c.match_type, value) {
                    (_, None) => false,
                    (0, Some((_, v))) => v.as_deref() == c._match.as_deref(),
                    (1, Some((_, v))) => v.is_none(),
                    (_, Some(_)) => true,
                }
            });
            component_ok && (!req.strict || have.len() == req.components.len())
        };
        let entries = self
            .quotas
            .entries()
            .into_iter()
            .filter(|(e, _)| matches(e))
            .map(|(e, values)| {
                EntryData::default()
                    .with_entity(
                        parts(&e)
                            .into_iter()
                            .map(|(t, v)| {
                                EntityData::default()
                                    .with_entity_type(s(t))
                                    .with_entity_name(v.map(|v| s(&v)))
                            })
                            .collect(),
                    )
                    .with_values(
                        values
                            .into_iter()
                            .map(|(k, v)| ValueData::default().with_key(s(&k)).with_value(v))
                            .collect(),
                    )
            })
            .collect();
        DescribeClientQuotasResponse::default().with_entries(Some(entries))
    }

    pub(crate) fn alter_client_quotas(
        &self,
        req: AlterClientQuotasRequest,
        session: &Session,
    ) -> AlterClientQuotasResponse {
        let allowed = self.cluster_allowed(session, AclOperation::AlterConfigs);
        let mut results = Vec::new();
        let mut changes = Vec::new();
        for entry in &req.entries {
            let mut entity = Entity {
                user: None,
                client_id: None,
            };
            let mut error = None;
            for part in &entry.entity {
                let name = part.entity_name.as_ref().map(|n| n.to_string());
                match part.entity_type.as_str() {
                    USER => entity.user = Some(name),
                    CLIENT_ID => entity.client_id = Some(name),
                    other => error = Some(format!("unknown entity type {other:?}")),
                }
            }
            if entry.entity.is_empty() {
                error = Some("no entity".into());
            }
            for op in &entry.ops {
                if !KEYS.contains(&op.key.as_str()) {
                    error = Some(format!(
                        "unsupported quota key {:?}; use one of {KEYS:?}",
                        op.key.as_str()
                    ));
                } else if !(op.remove || op.value.is_finite() && op.value > 0.0) {
                    error = Some(format!("{} must be a positive number", op.key.as_str()));
                }
            }
            let code = if !allowed {
                Some((ResponseError::ClusterAuthorizationFailed.code(), None))
            } else {
                error.map(|e| (ResponseError::InvalidRequest.code(), Some(e)))
            };
            if code.is_none() && !req.validate_only {
                for op in &entry.ops {
                    changes.push((
                        entity.clone(),
                        op.key.to_string(),
                        (!op.remove).then_some(op.value),
                    ));
                }
            }
            results.push((entry.entity.clone(), code));
        }
        let stored = if changes.is_empty() {
            Ok(())
        } else {
            self.quotas.alter(changes).map_err(|e| e.to_string())
        };
        AlterClientQuotasResponse::default().with_entries(
            results
                .into_iter()
                .map(|(entity, code)| {
                    let (code, message) = match (code, &stored) {
                        (Some((c, m)), _) => (c, m),
                        (None, Err(e)) => {
                            (ResponseError::KafkaStorageError.code(), Some(e.clone()))
                        }
                        (None, Ok(())) => (0, None),
                    };
                    AlterEntry::default()
                        .with_error_code(code)
                        .with_error_message(message.map(|m| s(&m)))
                        .with_entity(
                            entity
                                .into_iter()
                                .map(|p| {
                                    AlterEntity::default()
                                        .with_entity_type(p.entity_type)
                                        .with_entity_name(p.entity_name)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    }
}
