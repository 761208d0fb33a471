//! DescribeUserScramCredentials and AlterUserScramCredentials: the SCRAM users of a running
//! broker, so Kafka's admin tools manage them (`kafka-configs.sh --alter --add-config
//! 'SCRAM-SHA-512=[password=...]' --entity-type users --entity-name alice`). The client sends
//! the salted password, salt and iterations; the broker stores only StoredKey and ServerKey.
//! Describe needs Describe on the cluster, Alter needs Alter (CLUSTER_AUTHORIZATION_FAILED).

use std::ops::RangeInclusive;

use kafka_protocol::messages::alter_user_scram_credentials_response::AlterUserScramCredentialsResult;
use kafka_protocol::messages::describe_user_scram_credentials_response::{
    CredentialInfo, DescribeUserScramCredentialsResult,
};
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, AlterUserScramCredentialsResponse,
    DescribeUserScramCredentialsRequest, DescribeUserScramCredentialsResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::acl::AclOperation;
use crate::scram::{ScramCredential, ScramMechanism, MAX_ITERATIONS, MIN_ITERATIONS};
use crate::server::Session;
use crate::Broker;

pub const DESCRIBE_VERSIONS: RangeInclusive<i16> = 0..=0;
pub const ALTER_VERSIONS: RangeInclusive<i16> = 0..=0;

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

impl Broker {
    pub(crate) fn describe_user_scram_credentials(
        &self,
        req: DescribeUserScramCredentialsRequest,
        session: &Session,
    ) -> DescribeUserScramCredentialsResponse {
        if !self.cluster_allowed(session, AclOperation::Describe) {
            return DescribeUserScramCredentialsResponse::default()
                .with_error_code(ResponseError::ClusterAuthorizationFailed.code());
        }
        let all = self.credentials.list();
        let wanted: Option<Vec<String>> = req
            .users
            .map(|u| u.into_iter().map(|n| n.name.to_string()).collect());
        let results = match wanted {
            None => all
                .into_iter()
                .map(|(user, creds)| (user, Some(creds)))
                .collect::<Vec<_>>(),
            Some(names) => names
                .into_iter()
                .map(|n| {
                    let found = all.iter().find(|(u, _)| *u == n).map(|(_, c)| c.clone());
                    (n, found)
                })
                .collect(),
        };
        DescribeUserScramCredentialsResponse::default().with_results(
            results
                .into_iter()
                .map(|(user, creds)| {
                    let r = DescribeUserScramCredentialsResult::default().with_user(s(&user));
                    match creds {
                        Some(creds) => r.with_credential_infos(
                            creds
                                .into_iter()
                                .map(|(m, i)| {
                                    CredentialInfo::default()
                                        .with_mechanism(m.kafka_code())
                                        .with_iterations(i as i32)
                                })
                                .collect(),
                        ),
                        None => r
                            .with_error_code(ResponseError::ResourceNotFound.code())
                            .with_error_message(Some(s(&format!(
                                "Attempt to describe a user credential that does not exist: {user}"
                            )))),
                    }
                })
                .collect(),
        )
    }

    pub(crate) fn alter_user_scram_credentials(
        &self,
        req: AlterUserScramCredentialsRequest,
        session: &Session,
    ) -> AlterUserScramCredentialsResponse {
        let allowed = self.cluster_allowed(session, AclOperation::Alter);
        let mut results = Vec::new();
        let result = |user: &StrBytes, code: i16, message: Option<String>| {
            AlterUserScramCredentialsResult::default()
                .with_user(user.clone())
                .with_error_code(code)
                .with_error_message(message.map(|m| s(&m)))
        };
        for d in &req.deletions {
            let outcome = match ScramMechanism::from_kafka_code(d.mechanism) {
                _ if !allowed => Err((ResponseError::ClusterAuthorizationFailed, None)),
                None => Err((ResponseError::UnsupportedSaslMechanism, None)),
                Some(m) => match self.credentials.delete(vec![(d.name.to_string(), Some(m))]) {
                    Ok(found) if found.first() == Some(&true) => Ok(()),
                    Ok(_) => Err((ResponseError::ResourceNotFound, None)),
                    Err(e) => Err((ResponseError::KafkaStorageError, Some(e.to_string()))),
                },
            };
            results.push(match outcome {
                Ok(()) => result(&d.name, 0, None),
                Err((e, m)) => result(&d.name, e.code(), m),
            });
        }
        for u in &req.upsertions {
            let outcome = match ScramMechanism::from_kafka_code(u.mechanism) {
                _ if !allowed => Err((ResponseError::ClusterAuthorizationFailed, None)),
                None => Err((ResponseError::UnsupportedSaslMechanism, None)),
                Some(_) if u.name.is_empty() => Err((
                    ResponseError::UnacceptableCredential,
                    Some("empty user name".into()),
                )),
                Some(_)
                    if !(MIN_ITERATIONS as i32..=MAX_ITERATIONS as i32).contains(&u.iterations) =>
                {
                    Err((
                        ResponseError::UnacceptableCredential,
                        Some(format!(
                            "iterations must be within {MIN_ITERATIONS}..={MAX_ITERATIONS}"
                        )),
                    ))
                }
                Some(m) => {
                    let credential = ScramCredential::from_salted_password(
                        m,
                        &u.salted_password,
                        u.salt.to_vec(),
                        u.iterations as u32,
                    );
                    self.credentials
                        .upsert(vec![(u.name.to_string(), m, credential)])
                        .map_err(|e| (ResponseError::KafkaStorageError, Some(e.to_string())))
                }
            };
            results.push(match outcome {
                Ok(()) => result(&u.name, 0, None),
                Err((e, m)) => result(&u.name, e.code(), m),
            });
        }
        AlterUserScramCredentialsResponse::default().with_results(results)
    }
}
