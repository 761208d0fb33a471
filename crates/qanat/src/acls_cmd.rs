//! `qanat acls add|list|delete`: Kafka ACLs in a stopped broker's data directory
//! (`acls.json`, see `qanat_broker::acl`), or, with `--bootstrap`, on a running broker through
//! CreateAcls/DescribeAcls/DeleteAcls (as Kafka's `kafka-acls --bootstrap-server` does; it
//! needs Alter, or Describe, on the cluster when the authorizer is on).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kafka_protocol::messages::create_acls_request::AclCreation;
use kafka_protocol::messages::delete_acls_request::DeleteAclsFilter;
use kafka_protocol::messages::{
    ApiKey, CreateAclsRequest, CreateAclsResponse, DeleteAclsRequest, DeleteAclsResponse,
    DescribeAclsRequest, DescribeAclsResponse,
};
use qanat_broker::acl::{
    AclBinding, AclFilter, AclOperation, Authorizer, PatternType, Permission, ResourceType, CLUSTER,
};

use crate::admin::{error_text, s, AdminConn};

#[derive(Args)]
pub struct AclsArgs {
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

/// The resource an ACL is about: exactly one of these.
#[derive(Args, Clone)]
struct Resource {
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    transactional_id: Option<String>,
    #[arg(long)]
    cluster: bool,
    /// The name is a prefix (else literal; `*` is every name).
    #[arg(long)]
    prefixed: bool,
}

impl Resource {
    fn resolve(&self) -> anyhow::Result<Option<(ResourceType, String)>> {
        let mut found = Vec::new();
        if let Some(t) = &self.topic {
            found.push((ResourceType::Topic, t.clone()));
        }
        if let Some(g) = &self.group {
            found.push((ResourceType::Group, g.clone()));
        }
        if let Some(t) = &self.transactional_id {
            found.push((ResourceType::TransactionalId, t.clone()));
        }
        if self.cluster {
            found.push((ResourceType::Cluster, CLUSTER.to_string()));
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => bail!("give one of --topic, --group, --transactional-id, --cluster"),
        }
    }

    fn pattern(&self) -> PatternType {
        if self.prefixed {
            PatternType::Prefixed
        } else {
            PatternType::Literal
        }
    }
}

#[derive(Subcommand)]
enum Action {
    /// Add an ACL.
    Add {
        #[command(flatten)]
        resource: Resource,
        /// User:NAME or User:*.
        #[arg(long)]
        principal: String,
        /// Read, Write, Create, Delete, Alter, Describe, DescribeConfigs, AlterConfigs,
        /// IdempotentWrite, ClusterAction or All.
        #[arg(long)]
        operation: String,
        #[arg(long, default_value = "*")]
        host: String,
        /// A Deny entry (else Allow).
        #[arg(long)]
        deny: bool,
    },
    /// List ACLs (all, or those of a resource or principal).
    List {
        #[command(flatten)]
        resource: Resource,
        #[arg(long)]
        principal: Option<String>,
    },
    /// Delete the ACLs matching the resource, principal and operation given.
    Delete {
        #[command(flatten)]
        resource: Resource,
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        operation: Option<String>,
    },
}

fn operation(text: &str) -> anyhow::Result<AclOperation> {
    AclOperation::parse(text)
        .filter(|o| *o != AclOperation::Any)
        .with_context(|| format!("--operation {text:?} is not a Kafka ACL operation"))
}

fn filter(
    resource: &Resource,
    principal: Option<String>,
    op: Option<AclOperation>,
) -> anyhow::Result<AclFilter> {
    let named = resource.resolve()?;
    Ok(AclFilter {
        resource_type: named.as_ref().map_or(ResourceType::Any, |(t, _)| *t),
        resource_name: named.map(|(_, n)| n),
        pattern_type: if resource.prefixed {
            PatternType::Prefixed
        } else {
            PatternType::Any
        },
        principal,
        host: None,
        operation: op.unwrap_or(AclOperation::Any),
        permission: Permission::Any,
    })
}

fn show(b: &AclBinding) -> String {
    format!(
        "{:?}:{:?}:{}\t{}\thost={}\t{:?}\t{:?}",
        b.resource_type,
        b.pattern_type,
        b.resource_name,
        b.principal,
        b.host,
        b.operation,
        b.permission
    )
}

pub async fn run(args: AclsArgs) -> anyhow::Result<()> {
    // Offline, the data directory's lock is held until the edit is done.
    let (_lock, store): (_, Box<dyn AclStore>) = match &args.bootstrap {
        Some(addr) => (
            None,
            Box::new(AdminConn::connect(addr, "qanat-acls", &args.security)?),
        ),
        None => {
            let lock = crate::admin::lock_data_dir(&args.data_dir)?;
            let store = Authorizer::open(&args.data_dir, true, &[])
                .with_context(|| format!("opening ACLs in {}", args.data_dir.display()))?;
            (lock, Box::new(store))
        }
    };
    match args.action {
        Action::Add {
            resource,
            principal,
            operation: op,
            host,
            deny,
        } => {
            let Some((rtype, name)) = resource.resolve()? else {
                bail!("give one of --topic, --group, --transactional-id, --cluster");
            };
            let binding = AclBinding {
                resource_type: rtype,
                resource_name: name,
                pattern_type: resource.pattern(),
                principal,
                host,
                operation: operation(&op)?,
                permission: if deny {
                    Permission::Deny
                } else {
                    Permission::Allow
                },
            };
            binding.validate()?;
            store.add(vec![binding.clone()])?;
            println!("added {}", show(&binding));
        }
        Action::List {
            resource,
            principal,
        } => {
            for b in store.list(&filter(&resource, principal, None)?)? {
                println!("{}", show(&b));
            }
        }
        Action::Delete {
            resource,
            principal,
            operation: op,
        } => {
            let op = op.as_deref().map(operation).transpose()?;
            let removed = store.delete(&[filter(&resource, principal, op)?])?;
            let removed = removed.into_iter().flatten().collect::<Vec<_>>();
            if removed.is_empty() {
                bail!("no ACL matched");
            }
            for b in removed {
                println!("deleted {}", show(&b));
            }
        }
    }
    Ok(())
}

/// Where the ACLs are: a data directory or a running broker.
trait AclStore {
    fn add(&self, bindings: Vec<AclBinding>) -> anyhow::Result<()>;
    fn list(&self, filter: &AclFilter) -> anyhow::Result<Vec<AclBinding>>;
    /// The bindings each filter removed.
    fn delete(&self, filters: &[AclFilter]) -> anyhow::Result<Vec<Vec<AclBinding>>>;
}

impl AclStore for Authorizer {
    fn add(&self, bindings: Vec<AclBinding>) -> anyhow::Result<()> {
        Ok(Authorizer::add(self, bindings)?)
    }

    fn list(&self, filter: &AclFilter) -> anyhow::Result<Vec<AclBinding>> {
        Ok(Authorizer::list(self, filter))
    }

    fn delete(&self, filters: &[AclFilter]) -> anyhow::Result<Vec<Vec<AclBinding>>> {
        Ok(Authorizer::delete(self, filters)?)
    }
}

/// A binding as the broker described it; unknown codes are an error naming the code.
#[allow(clippy::too_many_arguments)]
fn binding(
    rtype: i8,
    name: &str,
    pattern: i8,
    principal: &str,
    host: &str,
    op: i8,
    permission: i8,
) -> anyhow::Result<AclBinding> {
    let code = |what: &str, c: i8| anyhow::anyhow!("the broker answered an unknown {what} {c}");
    Ok(AclBinding {
        resource_type: ResourceType::from_code(rtype)
            .ok_or_else(|| code("resource type", rtype))?,
        resource_name: name.to_string(),
        pattern_type: PatternType::from_code(pattern)
            .ok_or_else(|| code("pattern type", pattern))?,
        principal: principal.to_string(),
        host: host.to_string(),
        operation: AclOperation::from_code(op).ok_or_else(|| code("operation", op))?,
        permission: Permission::from_code(permission)
            .ok_or_else(|| code("permission", permission))?,
    })
}

impl AclStore for AdminConn {
    fn add(&self, bindings: Vec<AclBinding>) -> anyhow::Result<()> {
        let req = CreateAclsRequest::default().with_creations(
            bindings
                .iter()
                .map(|b| {
                    AclCreation::default()
                        .with_resource_type(b.resource_type.code())
                        .with_resource_name(s(&b.resource_name))
                        .with_resource_pattern_type(b.pattern_type.code())
                        .with_principal(s(&b.principal))
                        .with_host(s(&b.host))
                        .with_operation(b.operation.code())
                        .with_permission_type(b.permission.code())
                })
                .collect(),
        );
        let resp: CreateAclsResponse = self.call(ApiKey::CreateAcls, 1..=3, &req)?;
        let failed: Vec<String> = resp
            .results
            .iter()
            .filter(|r| r.error_code != 0)
            .map(|r| error_text(r.error_code, r.error_message.as_ref()))
            .collect();
        if !failed.is_empty() {
            bail!("creating ACLs: {}", failed.join("; "));
        }
        Ok(())
    }

    fn list(&self, f: &AclFilter) -> anyhow::Result<Vec<AclBinding>> {
        let req = DescribeAclsRequest::default()
            .with_resource_type_filter(f.resource_type.code())
            .with_resource_name_filter(f.resource_name.as_deref().map(s))
            .with_pattern_type_filter(f.pattern_type.code())
            .with_principal_filter(f.principal.as_deref().map(s))
            .with_host_filter(f.host.as_deref().map(s))
            .with_operation(f.operation.code())
            .with_permission_type(f.permission.code());
        let resp: DescribeAclsResponse = self.call(ApiKey::DescribeAcls, 1..=3, &req)?;
        if resp.error_code != 0 {
            bail!(
                "describing ACLs: {}",
                error_text(resp.error_code, resp.error_message.as_ref())
            );
        }
        let mut out = Vec::new();
        for r in &resp.resources {
            for a in &r.acls {
                out.push(binding(
                    r.resource_type,
                    &r.resource_name,
                    r.pattern_type,
                    &a.principal,
                    &a.host,
                    a.operation,
                    a.permission_type,
                )?);
            }
        }
        Ok(out)
    }

    fn delete(&self, filters: &[AclFilter]) -> anyhow::Result<Vec<Vec<AclBinding>>> {
        let req = DeleteAclsRequest::default().with_filters(
            filters
                .iter()
                .map(|f| {
                    DeleteAclsFilter::default()
                        .with_resource_type_filter(f.resource_type.code())
                        .with_resource_name_filter(f.resource_name.as_deref().map(s))
                        .with_pattern_type_filter(f.pattern_type.code())
                        .with_principal_filter(f.principal.as_deref().map(s))
                        .with_host_filter(f.host.as_deref().map(s))
                        .with_operation(f.operation.code())
                        .with_permission_type(f.permission.code())
                })
                .collect(),
        );
        let resp: DeleteAclsResponse = self.call(ApiKey::DeleteAcls, 1..=3, &req)?;
        resp.filter_results
            .iter()
            .map(|r| {
                if r.error_code != 0 {
                    bail!(
                        "deleting ACLs: {}",
                        error_text(r.error_code, r.error_message.as_ref())
                    );
                }
                r.matching_acls
                    .iter()
                    .map(|m| {
                        binding(
                            m.resource_type,
                            &m.resource_name,
                            m.pattern_type,
                            &m.principal,
                            &m.host,
                            m.operation,
                            m.permission_type,
                        )
                    })
                    .collect()
            })
            .collect()
    }
}
