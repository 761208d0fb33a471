//! `qanat acls add|list|delete`: Kafka ACLs in a stopped broker's data directory
//! (`acls.json`, see `qanat_broker::acl`). On a running broker use CreateAcls/DescribeAcls/
//! DeleteAcls (any Kafka admin client).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use qanat_broker::acl::{
    AclBinding, AclFilter, AclOperation, Authorizer, PatternType, Permission, ResourceType, CLUSTER,
};

#[derive(Args)]
pub struct AclsArgs {
    /// Data directory of the (stopped) broker.
    #[arg(long, env = "QANAT_DATA_DIR", default_value = "./qanat-data")]
    data_dir: PathBuf,
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
    let store = Authorizer::open(&args.data_dir, true, &[])
        .with_context(|| format!("opening ACLs in {}", args.data_dir.display()))?;
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
            for b in store.list(&filter(&resource, principal, None)?) {
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
