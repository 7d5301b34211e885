//! Realm policies in the seed's YAML shape: roles with permissions, users, API key metadata and
//! topic ACLs. Default deny: an operation is allowed only when a permission of the session's role
//! covers it.
//!
//! Permission grammar (as in the seed): `realm:*` (everything in the realm), `realm:<action>`
//! (control-plane actions such as `deploy`, `read`), `pubsub:publish:<pattern>`,
//! `pubsub:subscribe:<pattern>`, `pubsub:*:<pattern>`, `rpc:call:<pattern>`,
//! `rpc:register:<pattern>`, `rpc:*:<pattern>`.
//!
//! Patterns are dot-separated; `*` as the **last** component matches one or more components
//! (`be.cortexiq.home.*` covers `be.cortexiq.home.x` and `be.cortexiq.home.x.y`), `*` elsewhere
//! matches exactly one component, and a lone `*` matches everything.

use std::collections::HashMap;

use macula_wamp::uri::{self, MatchPolicy};

/// A data-plane operation that needs a permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Publish,
    Subscribe,
    Call,
    Register,
}

impl Action {
    /// The permission string that would grant this action on `uri` (used in error messages).
    pub fn permission_for(self, uri: &str) -> String {
        match self {
            Action::Publish => format!("pubsub:publish:{uri}"),
            Action::Subscribe => format!("pubsub:subscribe:{uri}"),
            Action::Call => format!("rpc:call:{uri}"),
            Action::Register => format!("rpc:register:{uri}"),
        }
    }
    fn parse(s: &str) -> Option<Action> {
        match s {
            "publish" => Some(Action::Publish),
            "subscribe" => Some(Action::Subscribe),
            "call" => Some(Action::Call),
            "register" => Some(Action::Register),
            _ => None,
        }
    }
}

pub use macula_common::policy::{
    AllowDoc, ApiKeyDoc, PackagePolicy, PolicyDoc, RoleDoc, TopicAclDoc, UserDoc,
};

/// Why a policy could not be loaded; names the place in the document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy YAML: {0}")]
    Yaml(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Grant {
    /// `realm:*`
    All,
    /// `realm:<action>` — control-plane actions; no data-plane effect.
    RealmAction(String),
    Op(Action, Pattern),
}

/// A compiled permission pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    /// Components; `None` is `*`.
    parts: Vec<Option<String>>,
    /// The last component was `*`: matches one or more trailing components.
    tail: bool,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s == "*" {
            return Ok(Pattern {
                parts: vec![],
                tail: true,
            });
        }
        let comps: Vec<&str> = s.split('.').collect();
        let mut parts = Vec::with_capacity(comps.len());
        for (i, c) in comps.iter().enumerate() {
            if *c == "*" {
                if i + 1 == comps.len() {
                    return Ok(Pattern { parts, tail: true });
                }
                parts.push(None);
            } else if c.is_empty()
                || !c
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(format!(
                    "invalid pattern {s:?}: components are a-z, 0-9, '_', '-' or '*'"
                ));
            } else {
                parts.push(Some((*c).to_owned()));
            }
        }
        Ok(Pattern { parts, tail: false })
    }

    /// Whether the concrete URI matches.
    pub fn matches(&self, uri: &str) -> bool {
        let mut comps = uri.split('.');
        for p in &self.parts {
            match comps.next() {
                Some(c) if p.as_deref().is_none_or(|p| p == c) => {}
                _ => return false,
            }
        }
        let rest = comps.count();
        if self.tail {
            rest >= 1
        } else {
            rest == 0
        }
    }

    /// Whether every URI matched by a subscription/registration `pattern` under `policy` is matched
    /// by this permission pattern. Conservative: when in doubt, not covered.
    pub fn covers(&self, pattern: &str, policy: MatchPolicy) -> bool {
        match policy {
            MatchPolicy::Exact => self.matches(pattern),
            MatchPolicy::Prefix => {
                // Everything that starts with `pattern` as a string: needs a tail wildcard and
                // `pattern` to extend past the fixed components.
                if !self.tail {
                    return false;
                }
                let comps: Vec<&str> = pattern.split('.').collect();
                comps.len() > self.parts.len()
                    && self
                        .parts
                        .iter()
                        .zip(&comps)
                        .all(|(p, c)| p.as_deref().is_none_or(|p| p == *c))
            }
            MatchPolicy::Wildcard => {
                let comps: Vec<&str> = pattern.split('.').collect();
                if comps.len() < self.parts.len() || (!self.tail && comps.len() != self.parts.len())
                {
                    return false;
                }
                if self.tail && comps.len() == self.parts.len() {
                    return false;
                }
                self.parts.iter().zip(&comps).all(|(p, c)| match p {
                    None => true,
                    Some(p) => !c.is_empty() && p == c,
                })
            }
        }
    }
}

/// Parses one permission string into the grants it stands for (`*` actions expand to two).
fn parse_grants(s: &str) -> Result<Vec<Grant>, String> {
    let mut it = s.splitn(3, ':');
    let (a, b, c) = (it.next().unwrap_or(""), it.next(), it.next());
    let ops: &[Action] = match (a, b) {
        ("realm", Some("*")) if c.is_none() => return Ok(vec![Grant::All]),
        ("realm", Some(x)) if c.is_none() && !x.is_empty() => return Ok(vec![Grant::RealmAction(x.to_owned())]),
        ("pubsub", Some("publish")) => &[Action::Publish],
        ("pubsub", Some("subscribe")) => &[Action::Subscribe],
        ("pubsub", Some("*")) => &[Action::Publish, Action::Subscribe],
        ("rpc", Some("call")) => &[Action::Call],
        ("rpc", Some("register")) => &[Action::Register],
        ("rpc", Some("*")) => &[Action::Call, Action::Register],
        _ => {
            return Err(format!(
                "unknown permission {s:?}: use realm:*, realm:<action>, pubsub:publish|subscribe|*:<pattern> or rpc:call|register|*:<pattern>"
            ))
        }
    };
    let pattern =
        c.ok_or_else(|| format!("permission {s:?} needs a URI pattern, e.g. {s}:com.acme.*"))?;
    let p = Pattern::parse(pattern)?;
    Ok(ops.iter().map(|a| Grant::Op(*a, p.clone())).collect())
}

#[derive(Debug, Clone, Default)]
struct Role {
    grants: Vec<Grant>,
    subrealms: bool,
}

/// A compiled, validated realm policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub doc: PolicyDoc,
    roles: HashMap<String, Role>,
}

impl Policy {
    /// Parses and validates a YAML policy.
    pub fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        let doc: PolicyDoc =
            serde_yaml_ng::from_str(text).map_err(|e| PolicyError::Yaml(e.to_string()))?;
        Policy::from_doc(doc)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.doc).unwrap_or_default()
    }

    pub fn from_doc(doc: PolicyDoc) -> Result<Policy, PolicyError> {
        uri::validate_realm(&doc.realm).map_err(|e| PolicyError::Invalid(e.to_string()))?;
        doc.packages.check().map_err(PolicyError::Invalid)?;
        if let Some(a) = doc
            .authorities
            .iter()
            .find(|a| crate::auth::credential::parse_hex32(a).is_none())
        {
            return Err(PolicyError::Invalid(format!(
                "authorities: {a:?} is not an Ed25519 public key (64 hex digits)"
            )));
        }
        let mut roles: HashMap<String, Role> = HashMap::new();
        for r in &doc.roles {
            if r.name.is_empty() {
                return Err(PolicyError::Invalid("a role has an empty name".into()));
            }
            if roles.contains_key(&r.name) {
                return Err(PolicyError::Invalid(format!(
                    "role {:?} is defined twice",
                    r.name
                )));
            }
            let mut role = Role {
                grants: vec![],
                subrealms: r.subrealms,
            };
            for p in &r.permissions {
                let grants = parse_grants(p)
                    .map_err(|e| PolicyError::Invalid(format!("role {:?}: {e}", r.name)))?;
                role.grants.extend(grants);
            }
            roles.insert(r.name.clone(), role);
        }
        for (i, acl) in doc.topic_acls.iter().enumerate() {
            let pat = Pattern::parse(&acl.pattern)
                .map_err(|e| PolicyError::Invalid(format!("topic_acls[{i}]: {e}")))?;
            for a in &acl.allow {
                let role = roles.get_mut(&a.role).ok_or_else(|| {
                    PolicyError::Invalid(format!(
                        "topic_acls[{i}]: role {:?} is not defined under roles",
                        a.role
                    ))
                })?;
                for act in &a.actions {
                    let action = Action::parse(act).ok_or_else(|| {
                        PolicyError::Invalid(format!(
                            "topic_acls[{i}]: unknown action {act:?} (use publish, subscribe, call, register)"
                        ))
                    })?;
                    role.grants.push(Grant::Op(action, pat.clone()));
                }
            }
        }
        for (kind, list) in [
            (
                "users",
                doc.users.iter().map(|u| &u.role).collect::<Vec<_>>(),
            ),
            ("api_keys", doc.api_keys.iter().map(|k| &k.role).collect()),
        ] {
            for r in list {
                if !roles.contains_key(r) {
                    return Err(PolicyError::Invalid(format!(
                        "{kind}: role {r:?} is not defined under roles"
                    )));
                }
            }
        }
        Ok(Policy { doc, roles })
    }

    /// The document's place in the order of the realm's states, across registrations:
    /// (generation, version). A counter, never a clock: a stepped clock or two changes in one
    /// millisecond cannot reorder them.
    pub fn seq(&self) -> u64 {
        (self.doc.generation << 32) | self.doc.version.min(u64::from(u32::MAX))
    }

    /// The farthest ancestor authority the realm lists (the top of the registrations one owner
    /// holds above it), if any: what groups one owner's realms for per-owner limits.
    pub fn top_authority(&self) -> Option<&str> {
        self.doc.authorities.last().map(String::as_str)
    }

    /// Whether the node with mesh peer id `node` may serve the realm (see `PolicyDoc::nodes`).
    pub fn may_serve(&self, node: &str) -> bool {
        self.doc.nodes.is_empty() || self.doc.nodes.iter().any(|n| n == node)
    }

    /// Whether keys signed by `authority` (besides the realm's own) may enter the realm.
    pub fn lists_authority(&self, authority: &[u8; 32]) -> bool {
        let hex = hex::encode(authority);
        self.doc
            .authorities
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&hex))
    }

    pub fn realm(&self) -> &str {
        &self.doc.realm
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// Whether `role` may be used by sessions in subrealms of this policy's realm.
    pub fn role_covers_subrealms(&self, role: &str) -> bool {
        self.roles.get(role).is_some_and(|r| r.subrealms)
    }

    /// Whether any role applies to subrealms (so the policy governs them).
    pub fn governs_subrealms(&self) -> bool {
        self.roles.values().any(|r| r.subrealms)
    }

    /// Whether `role` may perform `action` on the concrete URI `uri`.
    pub fn allows(&self, role: &str, action: Action, uri: &str) -> bool {
        self.allows_pattern(role, action, uri, MatchPolicy::Exact)
    }

    /// Whether `role` may perform `action` on everything `pattern` matches under `policy`.
    pub fn allows_pattern(
        &self,
        role: &str,
        action: Action,
        pattern: &str,
        policy: MatchPolicy,
    ) -> bool {
        let Some(r) = self.roles.get(role) else {
            return false;
        };
        r.grants.iter().any(|g| match g {
            Grant::All => true,
            Grant::RealmAction(_) => false,
            Grant::Op(a, p) => *a == action && p.covers(pattern, policy),
        })
    }

    /// Whether `role` holds the control-plane permission `realm:<action>` (or `realm:*`).
    pub fn allows_realm_action(&self, role: &str, action: &str) -> bool {
        self.roles.get(role).is_some_and(|r| {
            r.grants.iter().any(|g| {
                matches!(g, Grant::All) || matches!(g, Grant::RealmAction(a) if a == action)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
realm: be.cortexiq
roles:
  - name: admin
    permissions:
      - realm:*
  - name: developer
    permissions:
      - realm:deploy
      - realm:read
  - name: service_account
    permissions:
      - pubsub:publish:be.cortexiq.home.*
      - pubsub:subscribe:be.cortexiq.provider.*
      - rpc:call:be.cortexiq.queries.*
users:
  - email: admin@cortexiq.be
    role: admin
  - email: dev@cortexiq.be
    role: developer
api_keys:
  - key: sk_live_abc123
    role: service_account
    description: "Production home bots"
    created_at: 2025-01-15
    expires_at: 2026-01-15
topic_acls:
  - pattern: "be.cortexiq.home.*"
    allow:
      - role: service_account
        actions: [publish]
  - pattern: "be.cortexiq.provider.*"
    allow:
      - role: service_account
        actions: [subscribe]
"#;

    #[test]
    fn seed_policy_parses_and_denies_by_default() {
        let p = Policy::from_yaml(SEED).unwrap();
        assert!(p.allows("admin", Action::Register, "be.cortexiq.anything"));
        assert!(p.allows(
            "service_account",
            Action::Publish,
            "be.cortexiq.home.measured"
        ));
        assert!(p.allows("service_account", Action::Publish, "be.cortexiq.home.a.b"));
        assert!(!p.allows("service_account", Action::Publish, "be.cortexiq.home"));
        assert!(!p.allows(
            "service_account",
            Action::Subscribe,
            "be.cortexiq.home.measured"
        ));
        assert!(p.allows("service_account", Action::Call, "be.cortexiq.queries.price"));
        assert!(!p.allows(
            "service_account",
            Action::Register,
            "be.cortexiq.queries.price"
        ));
        assert!(!p.allows("developer", Action::Publish, "be.cortexiq.home.x"));
        assert!(p.allows_realm_action("developer", "deploy"));
        assert!(!p.allows_realm_action("service_account", "deploy"));
        assert!(!p.allows("nobody", Action::Publish, "be.cortexiq.home.x"));
    }

    #[test]
    fn pattern_subscriptions_need_covering_permissions() {
        let p = Policy::from_yaml(SEED).unwrap();
        let sa = "service_account";
        assert!(p.allows_pattern(
            sa,
            Action::Subscribe,
            "be.cortexiq.provider.x",
            MatchPolicy::Prefix
        ));
        assert!(!p.allows_pattern(
            sa,
            Action::Subscribe,
            "be.cortexiq.provider",
            MatchPolicy::Prefix
        ));
        assert!(!p.allows_pattern(sa, Action::Subscribe, "be.cortexiq", MatchPolicy::Prefix));
        assert!(p.allows_pattern(
            sa,
            Action::Subscribe,
            "be.cortexiq.provider..price",
            MatchPolicy::Wildcard
        ));
        assert!(!p.allows_pattern(
            sa,
            Action::Subscribe,
            "be..provider.x",
            MatchPolicy::Wildcard
        ));
    }

    #[test]
    fn invalid_policies_name_the_problem() {
        let bad_perm =
            "realm: com.acme\nroles:\n  - name: r\n    permissions: [pubsub:shout:com.acme.*]\n";
        assert!(Policy::from_yaml(bad_perm)
            .unwrap_err()
            .to_string()
            .contains("unknown permission"));
        let bad_role = "realm: com.acme\nroles: []\nusers:\n  - email: a@b\n    role: ghost\n";
        assert!(Policy::from_yaml(bad_role)
            .unwrap_err()
            .to_string()
            .contains("ghost"));
        assert!(Policy::from_yaml("realm: ACME\n").is_err());
        assert!(Policy::from_yaml("realm: com.acme\nbogus: 1\n").is_err());
        let star = "realm: com.acme\nroles:\n  - name: r\n    permissions: [rpc:*:com.acme.*]\n";
        let p = Policy::from_yaml(star).unwrap();
        assert!(
            p.allows("r", Action::Call, "com.acme.x")
                && p.allows("r", Action::Register, "com.acme.x")
        );
        assert!(!p.allows("r", Action::Publish, "com.acme.x"));
    }
}
