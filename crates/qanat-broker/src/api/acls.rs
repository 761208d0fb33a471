//! CreateAcls, DescribeAcls and DeleteAcls over the [`crate::acl::Authorizer`]'s store.
//! Changing ACLs needs Alter on the cluster, reading them Describe on the cluster
//! (CLUSTER_AUTHORIZATION_FAILED otherwise), as in Kafka.

use std::ops::RangeInclusive;

use kafka_protocol::messages::create_acls_response::AclCreationResult;
use kafka_protocol::messages::delete_acls_response::{
    DeleteAclsFilterResult, DeleteAclsMatchingAcl,
};
use kafka_protocol::messages::describe_acls_response::{AclDescription, DescribeAclsResource};
use kafka_protocol::messages::{
    CreateAclsRequest, CreateAclsResponse, DeleteAclsRequest, DeleteAclsResponse,
    DescribeAclsRequest, DescribeAclsResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use crate::acl::{AclBinding, AclFilter, AclOperation, PatternType, Permission, ResourceType};
use crate::server::Session;
use crate::Broker;

pub const CREATE_VERSIONS: RangeInclusive<i16> = 0..=3;
pub const DESCRIBE_VERSIONS: RangeInclusive<i16> = 0..=3;
pub const DELETE_VERSIONS: RangeInclusive<i16> = 0..=3;

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

#[allow(clippy::too_many_arguments)]
fn filter(
    rtype: i8,
    name: Option<&StrBytes>,
    pattern: i8,
    principal: Option<&StrBytes>,
    host: Option<&StrBytes>,
    op: i8,
    perm: i8,
) -> Result<AclFilter, String> {
    Ok(AclFilter {
        resource_type: ResourceType::from_code(rtype).ok_or("unknown resource type")?,
        resource_name: name.map(|n| n.to_string()),
        pattern_type: PatternType::from_code(pattern).ok_or("unknown pattern type")?,
        principal: principal.map(|p| p.to_string()),
        host: host.map(|h| h.to_string()),
        operation: AclOperation::from_code(op).ok_or("unknown operation")?,
        permission: Permission::from_code(perm).ok_or("unknown permission type")?,
    })
}

impl Broker {
    fn may(&self, session: &Session, op: AclOperation) -> bool {
        self.cluster_allowed(session, op)
    }

    pub(crate) fn create_acls(
        &self,
        req: CreateAclsRequest,
        session: &Session,
    ) -> CreateAclsResponse {
        let denied = !self.may(session, AclOperation::Alter);
        let mut results = Vec::new();
        let mut valid = Vec::new();
        for c in &req.creations {
            let binding = (|| {
                Some(AclBinding {
                    resource_type: ResourceType::from_code(c.resource_type)?,
                    resource_name: c.resource_name.to_string(),
                    pattern_type: PatternType::from_code(c.resource_pattern_type)?,
                    principal: c.principal.to_string(),
                    host: c.host.to_string(),
                    operation: AclOperation::from_code(c.operation)?,
                    permission: Permission::from_code(c.permission_type)?,
                })
            })();
            let outcome = match binding {
                _ if denied => Err((ResponseError::ClusterAuthorizationFailed, String::new())),
                None => Err((
                    ResponseError::InvalidRequest,
                    "unknown enum value".to_string(),
                )),
                Some(b) => match b.validate() {
                    Ok(()) => {
                        valid.push(b);
                        Ok(())
                    }
                    Err(e) => Err((ResponseError::InvalidRequest, e.to_string())),
                },
            };
            results.push(outcome);
        }
        let stored = if valid.is_empty() {
            Ok(())
        } else {
            self.acls.add(valid).map_err(|e| e.to_string())
        };
        CreateAclsResponse::default().with_results(
            results
                .into_iter()
                .map(|r| match (r, &stored) {
                    (Ok(()), Ok(())) => AclCreationResult::default(),
                    (Ok(()), Err(e)) => AclCreationResult::default()
                        .with_error_code(ResponseError::KafkaStorageError.code())
                        .with_error_message(Some(s(e))),
                    (Err((code, msg)), _) => AclCreationResult::default()
                        .with_error_code(code.code())
                        .with_error_message((!msg.is_empty()).then(|| s(&msg))),
                })
                .collect(),
        )
    }

    pub(crate) fn describe_acls(
        &self,
        req: DescribeAclsRequest,
        session: &Session,
    ) -> DescribeAclsResponse {
        if !self.may(session, AclOperation::Describe) {
            return DescribeAclsResponse::default()
                .with_error_code(ResponseError::ClusterAuthorizationFailed.code());
        }
        let f = match filter(
            req.resource_type_filter,
            req.resource_name_filter.as_ref(),
            req.pattern_type_filter,
            req.principal_filter.as_ref(),
            req.host_filter.as_ref(),
            req.operation,
            req.permission_type,
        ) {
            Ok(f) => f,
            Err(e) => {
                return DescribeAclsResponse::default()
                    .with_error_code(ResponseError::InvalidRequest.code())
                    .with_error_message(Some(s(&e)))
            }
        };
        let mut resources: Vec<DescribeAclsResource> = Vec::new();
        for b in self.acls.list(&f) {
            let description = AclDescription::default()
                .with_principal(s(&b.principal))
                .with_host(s(&b.host))
                .with_operation(b.operation.code())
                .with_permission_type(b.permission.code());
            match resources.iter_mut().find(|r| {
                r.resource_type == b.resource_type.code()
                    && r.resource_name.as_str() == b.resource_name
                    && r.pattern_type == b.pattern_type.code()
            }) {
                Some(r) => r.acls.push(description),
                None => resources.push(
                    DescribeAclsResource::default()
                        .with_resource_type(b.resource_type.code())
                        .with_resource_name(s(&b.resource_name))
                        .with_pattern_type(b.pattern_type.code())
                        .with_acls(vec![description]),
                ),
            }
        }
        DescribeAclsResponse::default().with_resources(resources)
    }

    pub(crate) fn delete_acls(
        &self,
        req: DeleteAclsRequest,
        session: &Session,
    ) -> DeleteAclsResponse {
        if !self.may(session, AclOperation::Alter) {
            return DeleteAclsResponse::default().with_filter_results(
                req.filters
                    .iter()
                    .map(|_| {
                        DeleteAclsFilterResult::default()
                            .with_error_code(ResponseError::ClusterAuthorizationFailed.code())
                    })
                    .collect(),
            );
        }
        let parsed: Vec<Result<AclFilter, String>> = req
            .filters
            .iter()
            .map(|f| {
                filter(
                    f.resource_type_filter,
                    f.resource_name_filter.as_ref(),
                    f.pattern_type_filter,
                    f.principal_filter.as_ref(),
                    f.host_filter.as_ref(),
                    f.operation,
                    f.permission_type,
                )
            })
            .collect();
        let valid: Vec<AclFilter> = parsed.iter().filter_map(|p| p.clone().ok()).collect();
        let removed = self.acls.delete(&valid);
        let mut removed_iter = match &removed {
            Ok(r) => r.clone().into_iter(),
            Err(_) => Vec::new().into_iter(),
        };
        let results = parsed
            .into_iter()
            .map(|p| match (p, &removed) {
                (Err(e), _) => DeleteAclsFilterResult::default()
                    .with_error_code(ResponseError::InvalidRequest.code())
                    .with_error_message(Some(s(&e))),
                (Ok(_), Err(e)) => DeleteAclsFilterResult::default()
                    .with_error_code(ResponseError::KafkaStorageError.code())
                    .with_error_message(Some(s(&e.to_string()))),
                (Ok(_), Ok(_)) => DeleteAclsFilterResult::default().with_matching_acls(
                    removed_iter
                        .next()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|b| {
                            DeleteAclsMatchingAcl::default()
                                .with_resource_type(b.resource_type.code())
                                .with_resource_name(s(&b.resource_name))
                                .with_pattern_type(b.pattern_type.code())
                                .with_principal(s(&b.principal))
                                .with_host(s(&b.host))
                                .with_operation(b.operation.code())
                                .with_permission_type(b.permission.code())
                        })
                        .collect(),
                ),
            })
            .collect();
        DeleteAclsResponse::default().with_filter_results(results)
    }
}
