//! Kafka's ACL model and the authorizer.
//!
//! An ACL binds a principal (`User:NAME`, or `User:*`), a host (`*` or an address), an
//! operation and Allow/Deny to a resource pattern: a resource type (topic, group, cluster,
//! transactional id) and a name matched literally (`*` for every name) or as a prefix. Stored in
//! `DATA_DIR/acls.json`, rewritten atomically on every change.
//!
//! Decision, as Kafka's `StandardAuthorizer`: super users may do everything; with the
//! authorizer off everyone may; otherwise a matching Deny for the operation (or All) refuses,
//! whatever allows it; else a matching Allow for the operation, for All, or one that implies
//! it (Read, Write, Delete and Alter imply Describe; AlterConfigs implies DescribeConfigs)
//! permits; else it is refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::credentials::{read_json, write_json_atomically, StoreError};

pub const ACL_FILE: &str = "acls.json";

macro_rules! kafka_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $code:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL_VALUES: &'static [$name] = &[$($name::$variant),*];

            pub fn code(self) -> i8 {
                match self { $($name::$variant => $code),* }
            }

            pub fn from_code(code: i8) -> Option<Self> {
                match code { $($code => Some($name::$variant),)* _ => None }
            }

            /// Parse a name case-insensitively, with or without underscores.
            pub fn parse(text: &str) -> Option<Self> {
                let want: String = text.chars().filter(|c| *c != '_' && *c != '-').collect();
                Self::ALL_VALUES.iter().copied().find(|v| format!("{v:?}").eq_ignore_ascii_case(&want))
            }
        }
    };
}

kafka_enum!(
    /// Resource types (Kafka codes; Any is for filters only).
    ResourceType { Any = 1, Topic = 2, Group = 3, Cluster = 4, TransactionalId = 5 }
);
kafka_enum!(
    /// Operations (Kafka codes; Any is for filters only).
    AclOperation {
        Any = 1, All = 2, Read = 3, Write = 4, Create = 5, Delete = 6, Alter = 7, Describe = 8,
        ClusterAction = 9, DescribeConfigs = 10, AlterConfigs = 11, IdempotentWrite = 12,
    }
);
kafka_enum!(
    /// Pattern types (Kafka codes; Any and Match are for filters only).
    PatternType { Any = 1, Match = 2, Literal = 3, Prefixed = 4 }
);
kafka_enum!(
    /// Allow or Deny (Any for filters only).
    Permission { Any = 1, Deny = 2, Allow = 3 }
);

/// The name of the cluster resource, as Kafka spells it.
pub const CLUSTER: &str = "kafka-cluster";

/// One access control entry on a resource pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AclBinding {
    pub resource_type: ResourceType,
    pub resource_name: String,
    pub pattern_type: PatternType,
    pub principal: String,
    pub host: String,
    pub operation: AclOperation,
    pub permission: Permission,
}

/// Why a binding cannot be stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AclError {
    #[error("{0}")]
    Invalid(String),
}

impl AclBinding {
    /// A binding must name concrete values (no Any/Match) and a `User:` principal.
    pub fn validate(&self) -> Result<(), AclError> {
        let bad = |m: &str| Err(AclError::Invalid(m.to_string()));
        if self.resource_type == ResourceType::Any {
            return bad("resource type must not be Any");
        }
        if matches!(self.pattern_type, PatternType::Any | PatternType::Match) {
            return bad("pattern type must be Literal or Prefixed");
        }
        if self.operation == AclOperation::Any {
            return bad("operation must not be Any");
        }
        if self.permission == Permission::Any {
            return bad("permission must be Allow or Deny");
        }
        if !self.principal.starts_with("User:") || self.principal.len() <= 5 {
            return bad("principal must be User:NAME or User:*");
        }
        if self.resource_name.is_empty() || self.host.is_empty() {
            return bad("resource name and host must not be empty");
        }
        if self.resource_type == ResourceType::Cluster && self.resource_name != CLUSTER {
            return bad("the cluster resource is named kafka-cluster");
        }
        Ok(())
    }

    /// Whether this binding's pattern covers the resource `name` of type `rtype`.
    fn covers(&self, rtype: ResourceType, name: &str) -> bool {
        self.resource_type == rtype
            && match self.pattern_type {
                PatternType::Literal => self.resource_name == name || self.resource_name == "*",
                PatternType::Prefixed => name.starts_with(&self.resource_name),
                PatternType::Any | PatternType::Match => false,
            }
    }

    fn applies_to(&self, principal: &str, host: &str) -> bool {
        (self.principal == principal || self.principal == "User:*")
            && (self.host == "*" || self.host == host)
    }
}

/// A filter of DescribeAcls/DeleteAcls: `None` or Any matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclFilter {
    pub resource_type: ResourceType,
    pub resource_name: Option<String>,
    pub pattern_type: PatternType,
    pub principal: Option<String>,
    pub host: Option<String>,
    pub operation: AclOperation,
    pub permission: Permission,
}

impl AclFilter {
    pub fn matches(&self, b: &AclBinding) -> bool {
        let name_ok = match (&self.resource_name, self.pattern_type) {
            (None, PatternType::Any | PatternType::Match) => true,
            (None, p) => b.pattern_type == p,
            (Some(n), PatternType::Any) => &b.resource_name == n,
            (Some(n), PatternType::Match) => match b.pattern_type {
                PatternType::Literal => &b.resource_name == n || b.resource_name == "*",
                PatternType::Prefixed => n.starts_with(&b.resource_name),
                _ => false,
            },
            (Some(n), p) => b.pattern_type == p && &b.resource_name == n,
        };
        (self.resource_type == ResourceType::Any || self.resource_type == b.resource_type)
            && name_ok
            && self.principal.as_ref().is_none_or(|p| p == &b.principal)
            && self.host.as_ref().is_none_or(|h| h == &b.host)
            && (self.operation == AclOperation::Any || self.operation == b.operation)
            && (self.permission == Permission::Any || self.permission == b.permission)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AclFile {
    acls: Vec<AclBinding>,
}

/// Whether an Allow of `granted` permits `wanted`.
fn implies(granted: AclOperation, wanted: AclOperation) -> bool {
    use AclOperation::*;
    granted == wanted
        || granted == All
        || (wanted == Describe && matches!(granted, Read | Write | Delete | Alter))
        || (wanted == DescribeConfigs && granted == AlterConfigs)
}

/// Decide with `acls` (the pure rule; see the module doc).
pub fn decide(
    acls: &[AclBinding],
    principal: &str,
    host: &str,
    operation: AclOperation,
    rtype: ResourceType,
    name: &str,
) -> bool {
    let relevant = acls
        .iter()
        .filter(|b| b.covers(rtype, name) && b.applies_to(principal, host));
    let mut allowed = false;
    for b in relevant {
        match b.permission {
            Permission::Deny if b.operation == operation || b.operation == AclOperation::All => {
                return false
            }
            Permission::Allow if implies(b.operation, operation) => allowed = true,
            _ => {}
        }
    }
    allowed
}

/// Whether some resource of `rtype` exists on which `principal` may do `operation`, as Kafka's
/// `Authorizer.authorizeByResourceType` (used for idempotent producers without the cluster's
/// IdempotentWrite): only ACLs naming the operation itself or All count; a Deny on `*` refuses
/// everything; a literal Allow counts unless a literal Deny names the same resource or a prefixed
/// Deny covers it; a prefixed Allow counts unless a prefixed Deny covers its prefix.
pub fn decide_any(
    acls: &[AclBinding],
    principal: &str,
    host: &str,
    operation: AclOperation,
    rtype: ResourceType,
) -> bool {
    let relevant: Vec<&AclBinding> = acls
        .iter()
        .filter(|b| {
            b.resource_type == rtype
                && b.applies_to(principal, host)
                && (b.operation == operation || b.operation == AclOperation::All)
        })
        .collect();
    let denies = |pattern: PatternType| {
        relevant
            .iter()
            .filter(move |b| b.permission == Permission::Deny && b.pattern_type == pattern)
            .map(|b| b.resource_name.as_str())
    };
    if denies(PatternType::Literal).any(|n| n == "*") {
        return false;
    }
    let denied_by_prefix = |name: &str| denies(PatternType::Prefixed).any(|p| name.starts_with(p));
    relevant
        .iter()
        .filter(|b| b.permission == Permission::Allow)
        .any(|b| match b.pattern_type {
            PatternType::Literal => {
                b.resource_name == "*"
                    || !(denies(PatternType::Literal).any(|n| n == b.resource_name)
                        || denied_by_prefix(&b.resource_name))
            }
            PatternType::Prefixed => !denied_by_prefix(&b.resource_name),
            PatternType::Any | PatternType::Match => false,
        })
}

/// The ACLs of the broker and the switch that enforces them.
#[derive(Debug)]
pub struct Authorizer {
    enabled: bool,
    super_users: HashSet<String>,
    path: PathBuf,
    acls: RwLock<Vec<AclBinding>>,
}

impl Authorizer {
    pub fn open(
        data_dir: &Path,
        enabled: bool,
        super_users: &[String],
    ) -> Result<Self, StoreError> {
        let path = data_dir.join(ACL_FILE);
        let file: AclFile = read_json(&path)?;
        Ok(Self {
            enabled,
            super_users: super_users.iter().cloned().collect(),
            path,
            acls: RwLock::new(file.acls),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether `principal` connected from `host` may do `operation` on the resource.
    pub fn allowed(
        &self,
        principal: &str,
        host: &str,
        operation: AclOperation,
        rtype: ResourceType,
        name: &str,
    ) -> bool {
        if !self.enabled || self.super_users.contains(principal) {
            return true;
        }
        decide(&self.acls.read(), principal, host, operation, rtype, name)
    }

    /// Whether `principal` may do `operation` on at least one resource of `rtype`
    /// (see [`decide_any`]); super users and a disabled authorizer always may.
    pub fn allowed_on_any(
        &self,
        principal: &str,
        host: &str,
        operation: AclOperation,
        rtype: ResourceType,
    ) -> bool {
        if !self.enabled || self.super_users.contains(principal) {
            return true;
        }
        decide_any(&self.acls.read(), principal, host, operation, rtype)
    }

    pub fn list(&self, filter: &AclFilter) -> Vec<AclBinding> {
        self.acls
            .read()
            .iter()
            .filter(|b| filter.matches(b))
            .cloned()
            .collect()
    }

    /// Add bindings (already present ones are kept once); durable when this returns.
    pub fn add(&self, bindings: Vec<AclBinding>) -> Result<(), StoreError> {
        let mut acls = self.acls.write();
        let mut next = acls.clone();
        for b in bindings {
            if !next.contains(&b) {
                next.push(b);
            }
        }
        write_json_atomically(&self.path, &AclFile { acls: next.clone() })?;
        *acls = next;
        Ok(())
    }

    /// Remove what each filter matches; the removed bindings per filter.
    pub fn delete(&self, filters: &[AclFilter]) -> Result<Vec<Vec<AclBinding>>, StoreError> {
        let mut acls = self.acls.write();
        let removed: Vec<Vec<AclBinding>> = filters
            .iter()
            .map(|f| acls.iter().filter(|b| f.matches(b)).cloned().collect())
            .collect();
        let next: Vec<AclBinding> = acls
            .iter()
            .filter(|b| !filters.iter().any(|f| f.matches(b)))
            .cloned()
            .collect();
        write_json_atomically(&self.path, &AclFile { acls: next.clone() })?;
        *acls = next;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn acl(
        rtype: ResourceType,
        name: &str,
        pattern: PatternType,
        principal: &str,
        op: AclOperation,
        perm: Permission,
    ) -> AclBinding {
        AclBinding {
            resource_type: rtype,
            resource_name: name.into(),
            pattern_type: pattern,
            principal: principal.into(),
            host: "*".into(),
            operation: op,
            permission: perm,
        }
    }

    #[test]
    fn literal_prefixed_wildcard_and_implied_describe() {
        use AclOperation::*;
        use PatternType::*;
        use ResourceType::*;
        let acls = vec![
            acl(
                Topic,
                "orders",
                Literal,
                "User:alice",
                Write,
                Permission::Allow,
            ),
            acl(
                Topic,
                "logs-",
                Prefixed,
                "User:bob",
                Read,
                Permission::Allow,
            ),
            acl(Group, "*", Literal, "User:*", Read, Permission::Allow),
        ];
        assert!(decide(&acls, "User:alice", "h", Write, Topic, "orders"));
        assert!(decide(&acls, "User:alice", "h", Describe, Topic, "orders"));
        assert!(!decide(&acls, "User:alice", "h", Read, Topic, "orders"));
        assert!(!decide(&acls, "User:alice", "h", Write, Topic, "orders2"));
        assert!(decide(&acls, "User:bob", "h", Read, Topic, "logs-app"));
        assert!(!decide(&acls, "User:bob", "h", Read, Topic, "log"));
        assert!(decide(&acls, "User:carol", "h", Read, Group, "anything"));
        assert!(!decide(&acls, "User:carol", "h", Delete, Group, "anything"));
    }

    #[test]
    fn allowed_on_some_resource_of_a_type() {
        use AclOperation::*;
        use PatternType::*;
        use ResourceType::*;
        let any = |acls: &[AclBinding]| decide_any(acls, "User:p", "h", Write, Topic);
        let allow_t = acl(Topic, "t", Literal, "User:p", Write, Permission::Allow);
        assert!(!any(&[]));
        assert!(any(std::slice::from_ref(&allow_t)));
        // Only the operation itself or All counts (Read does not imply Write).
        assert!(!any(&[acl(
            Topic,
            "t",
            Literal,
            "User:p",
            Read,
            Permission::Allow
        )]));
        assert!(any(&[acl(
            Topic,
            "t",
            Literal,
            "User:p",
            All,
            Permission::Allow
        )]));
        // Another type, another principal: nothing.
        assert!(!any(&[acl(
            Group,
            "t",
            Literal,
            "User:p",
            Write,
            Permission::Allow
        )]));
        assert!(!any(&[acl(
            Topic,
            "t",
            Literal,
            "User:q",
            Write,
            Permission::Allow
        )]));
        // A Deny on the same name, a covering prefix or `*` takes it away.
        for deny in [
            acl(Topic, "t", Literal, "User:p", Write, Permission::Deny),
            acl(Topic, "", Prefixed, "User:p", Write, Permission::Deny),
            acl(Topic, "*", Literal, "User:*", All, Permission::Deny),
        ] {
            assert!(!any(&[allow_t.clone(), deny]));
        }
        // A Deny on another name leaves it.
        assert!(any(&[
            allow_t.clone(),
            acl(Topic, "u", Literal, "User:p", Write, Permission::Deny)
        ]));
        // A prefixed Allow survives a literal Deny, not a covering prefixed one.
        let allow_prefix = acl(Topic, "logs-", Prefixed, "User:p", Write, Permission::Allow);
        assert!(any(&[
            allow_prefix.clone(),
            acl(Topic, "logs-", Literal, "User:p", Write, Permission::Deny)
        ]));
        assert!(!any(&[
            allow_prefix,
            acl(Topic, "log", Prefixed, "User:p", Write, Permission::Deny)
        ]));
    }

    fn arb_binding() -> impl Strategy<Value = AclBinding> {
        (
            prop::sample::select(vec![ResourceType::Topic, ResourceType::Group]),
            prop::sample::select(vec!["a", "ab", "abc", "*", "b"]),
            prop::sample::select(vec![PatternType::Literal, PatternType::Prefixed]),
            prop::sample::select(vec!["User:x", "User:y", "User:*"]),
            prop::sample::select(vec!["*", "10.0.0.1"]),
            prop::sample::select(AclOperation::ALL_VALUES[1..].to_vec()),
            prop::sample::select(vec![Permission::Allow, Permission::Deny]),
        )
            .prop_map(|(t, n, p, pr, h, o, pe)| AclBinding {
                resource_type: t,
                resource_name: n.into(),
                pattern_type: p,
                principal: pr.into(),
                host: h.into(),
                operation: o,
                permission: pe,
            })
    }

    proptest! {
        /// Adding a matching Deny to any set of ACLs refuses, whatever the Allows say.
        #[test]
        fn deny_always_wins(
            mut acls in proptest::collection::vec(arb_binding(), 0..20),
            op in prop::sample::select(AclOperation::ALL_VALUES[2..].to_vec()),
            deny_all in any::<bool>(),
            name in prop::sample::select(vec!["a", "ab", "abc"]),
        ) {
            let deny = AclBinding {
                resource_type: ResourceType::Topic,
                resource_name: "a".into(),
                pattern_type: PatternType::Prefixed,
                principal: "User:x".into(),
                host: "*".into(),
                operation: if deny_all { AclOperation::All } else { op },
                permission: Permission::Deny,
            };
            acls.push(acl(ResourceType::Topic, name, PatternType::Literal, "User:x", AclOperation::All, Permission::Allow));
            let pos = acls.len() / 2;
            acls.insert(pos, deny);
            prop_assert!(!decide(&acls, "User:x", "10.0.0.1", op, ResourceType::Topic, name));
        }

        /// Without any Deny, an exact Allow for the principal always permits.
        #[test]
        fn an_exact_allow_permits_without_denies(
            acls in proptest::collection::vec(arb_binding(), 0..20),
            op in prop::sample::select(AclOperation::ALL_VALUES[2..].to_vec()),
        ) {
            let mut acls: Vec<_> = acls.into_iter().filter(|b| b.permission == Permission::Allow).collect();
            acls.push(acl(ResourceType::Group, "g", PatternType::Literal, "User:y", op, Permission::Allow));
            prop_assert!(decide(&acls, "User:y", "10.0.0.9", op, ResourceType::Group, "g"));
        }
    }

    #[test]
    fn store_round_trip_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authorizer::open(dir.path(), true, &["User:admin".into()]).unwrap();
        let b = acl(
            ResourceType::Topic,
            "t",
            PatternType::Literal,
            "User:u",
            AclOperation::Read,
            Permission::Allow,
        );
        assert!(b.validate().is_ok());
        a.add(vec![b.clone(), b.clone()]).unwrap();
        assert!(a.allowed(
            "User:admin",
            "h",
            AclOperation::Delete,
            ResourceType::Cluster,
            CLUSTER
        ));
        let reopened = Authorizer::open(dir.path(), true, &[]).unwrap();
        let any = AclFilter {
            resource_type: ResourceType::Any,
            resource_name: None,
            pattern_type: PatternType::Any,
            principal: None,
            host: None,
            operation: AclOperation::Any,
            permission: Permission::Any,
        };
        assert_eq!(reopened.list(&any), vec![b.clone()]);
        let removed = reopened.delete(std::slice::from_ref(&any)).unwrap();
        assert_eq!(removed, vec![vec![b]]);
        assert!(Authorizer::open(dir.path(), true, &[])
            .unwrap()
            .list(&any)
            .is_empty());
        assert_eq!(
            AclOperation::parse("describe_configs"),
            Some(AclOperation::DescribeConfigs)
        );
        assert_eq!(ResourceType::parse("TOPIC"), Some(ResourceType::Topic));
    }
}
