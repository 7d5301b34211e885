//! The realm policy document as written in YAML (and stored by the registry, flooded by nodes):
//! plain data that both planes exchange. Compiling and enforcing it is the router's
//! (`macula_router::policy::Policy`).

use serde::{Deserialize, Serialize};

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// The policy document as written in YAML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    pub realm: String,
    /// Incremented on every change; nodes apply the newest version they have seen.
    #[serde(default)]
    pub version: u64,
    /// Which registration of the name this document belongs to: a name registered anew (after
    /// deletion or expiry) gets the next generation, so its states outrank every state of the
    /// previous registration ([`Policy::seq`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// Public keys (64 hex digits) of authorities other than the realm's own whose keys may
    /// enter the realm: its parents' authorities, where the same owner holds them. A key signed
    /// by any other authority (a parent registered by someone else, an earlier registration of
    /// the name, the seller's before a transfer) is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorities: Vec<String>,
    #[serde(default)]
    pub roles: Vec<RoleDoc>,
    #[serde(default)]
    pub users: Vec<UserDoc>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyDoc>,
    #[serde(default)]
    pub topic_acls: Vec<TopicAclDoc>,
    /// Key ids that are refused even though their signature and expiry are valid.
    #[serde(default)]
    pub revoked_keys: Vec<String>,
    /// Set (to the reason) while the realm may not be used: suspended by the operator (abuse
    /// takedown) or expired past its grace period. Nodes refuse new sessions and close live ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<String>,
    /// A tombstone: the realm was deleted. Kept (and flooded, with the next version) so that no
    /// node brings back an older state of the deleted registration, before or after a restart.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    /// When the tombstone was made (unix seconds). Tombstones are collected once
    /// `mesh.tombstone_retention_s` has passed (a name registered again outranks the old
    /// registration's states by its generation anyway).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deleted_at: u64,
    /// Set (to the reason) while the realm is past its plan's hard quota (the free tier): nodes
    /// refuse new sessions and answer every operation with `macula.error.quota_exceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_exceeded: Option<String>,
    /// The nodes (mesh peer ids) that may serve the realm — the seed's "Dedicated Nodes": only
    /// they accept its sessions, and nodes take its forwarded traffic only from them. Empty: any
    /// node of the trust root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Forwarded publications and calls are accepted only from sessions whose role another node
    /// proved with the key's public form (keys of version 2 or cryptosign keys): a node of the
    /// trust root cannot act in the realm under a role no key of it holds.
    #[serde(default, skip_serializing_if = "is_false")]
    pub verified_roles: bool,
    /// The most workload instances the realm may ask for at once (payload replicas plus job
    /// runs at once, over all its workloads), from its plan: nodes refuse a deploy record past
    /// it. None: no limit (a realm of a node's own config directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// Which Hub packages the realm's workloads may run, and what a revocation does to running
    /// replicas (every node enforces it when a replica starts, and stops running replicas that
    /// it no longer allows). Default: any package the Hub lists; revoked ones flagged.
    #[serde(default, skip_serializing_if = "PackagePolicy::is_default")]
    pub packages: PackagePolicy,
}

/// A realm's rules for Hub packages (`PolicyDoc::packages`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PackagePolicy {
    /// The lowest tier allowed: `community` (any signed package; the default), `verified`
    /// (scan and smoke test passed) or `certified`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub min_tier: String,
    /// The publishers (namespaces, `acme` for `acme/*`) whose packages may run; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publishers: Vec<String>,
    /// What a revocation does to the realm's running replicas of the package: `flag` (shown
    /// in status; the default) or `stop`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub on_revoked: String,
}

/// The Hub's tiers, lowest first.
pub const TIERS: [&str; 3] = ["community", "verified", "certified"];

impl PackagePolicy {
    pub fn is_default(&self) -> bool {
        *self == PackagePolicy::default()
    }

    /// The problem with the rules as written, if any.
    pub fn check(&self) -> Result<(), String> {
        if !self.min_tier.is_empty() && !TIERS.contains(&self.min_tier.as_str()) {
            return Err(format!(
                "packages.min_tier {:?}: one of {}",
                self.min_tier,
                TIERS.join(", ")
            ));
        }
        if !["", "flag", "stop"].contains(&self.on_revoked.as_str()) {
            return Err(format!(
                "packages.on_revoked {:?}: flag or stop",
                self.on_revoked
            ));
        }
        if self.publishers.len() > 256 {
            return Err("packages.publishers: at most 256".into());
        }
        if let Some(p) = self.publishers.iter().find(|p| {
            p.is_empty()
                || p.len() > 64
                || !p
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        }) {
            return Err(format!(
                "packages.publishers: {p:?} is not a publisher's namespace (lowercase letters, digits, -)"
            ));
        }
        Ok(())
    }

    /// Why a package of publisher `namespace` at `tier` may not run in the realm, if it may
    /// not. A tier that is not known (`None`: the Hub's status was not read) passes only when
    /// no tier is required.
    pub fn refusal(&self, namespace: &str, tier: Option<&str>) -> Option<String> {
        if !self.publishers.is_empty() && !self.publishers.iter().any(|p| p == namespace) {
            return Some(format!(
                "the realm's policy allows packages of {} only, not of {namespace}",
                self.publishers.join(", ")
            ));
        }
        let rank = |t: &str| TIERS.iter().position(|x| *x == t);
        let need = rank(&self.min_tier).unwrap_or(0);
        if need == 0 {
            return None;
        }
        match tier {
            Some(t) if rank(t).is_some_and(|r| r >= need) => None,
            Some(t) => Some(format!(
                "the realm's policy allows {} packages or better; this one is {t}",
                self.min_tier
            )),
            None => Some(format!(
                "the realm's policy allows {} packages or better, and the Hub's status (the tier) could not be read",
                self.min_tier
            )),
        }
    }

    /// Whether a revocation stops the realm's running replicas.
    pub fn stops_revoked(&self) -> bool {
        self.on_revoked == "stop"
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoleDoc {
    pub name: String,
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Whether keys with this role may also join subrealms (`com.acme.shop` for a role of `com.acme`).
    #[serde(default)]
    pub subrealms: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UserDoc {
    pub email: String,
    pub role: String,
}

/// Metadata about an issued key; the secret itself is never stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKeyDoc {
    /// The key id (`key_...`). The seed's example shows the key itself here; Macula stores only the id.
    #[serde(alias = "key")]
    pub id: String,
    pub role: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TopicAclDoc {
    pub pattern: String,
    #[serde(default)]
    pub allow: Vec<AllowDoc>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AllowDoc {
    pub role: String,
    pub actions: Vec<String>,
}

/// The policy a new realm starts with.
pub fn default_policy(realm: &str) -> PolicyDoc {
    PolicyDoc {
        realm: realm.into(),
        version: 1,
        roles: vec![
            RoleDoc {
                name: "admin".into(),
                permissions: vec!["realm:*".into()],
                subrealms: true,
            },
            RoleDoc {
                name: "developer".into(),
                permissions: vec![
                    "realm:deploy".into(),
                    "realm:read".into(),
                    format!("pubsub:*:{realm}.*"),
                    format!("rpc:*:{realm}.*"),
                    "rpc:call:macula.dht.*".into(),
                    "rpc:call:macula.fence.check".into(),
                ],
                subrealms: false,
            },
            RoleDoc {
                name: "service_account".into(),
                permissions: vec![
                    format!("pubsub:*:{realm}.*"),
                    format!("rpc:*:{realm}.*"),
                    // A replica asks whether its fencing token (or a writer's) is current.
                    "rpc:call:macula.fence.check".into(),
                ],
                subrealms: false,
            },
        ],
        ..PolicyDoc::default()
    }
}

#[cfg(test)]
mod package_policy_tests {
    use super::*;

    #[test]
    fn tiers_publishers_and_revocation() {
        let any = PackagePolicy::default();
        assert!(any.is_default() && any.check().is_ok());
        assert_eq!(any.refusal("acme", None), None);
        let p = PackagePolicy {
            min_tier: "verified".into(),
            publishers: vec!["acme".into()],
            on_revoked: "stop".into(),
        };
        assert!(p.check().is_ok() && p.stops_revoked());
        assert_eq!(p.refusal("acme", Some("verified")), None);
        assert_eq!(p.refusal("acme", Some("certified")), None);
        assert!(p
            .refusal("acme", Some("community"))
            .is_some_and(|w| w.contains("this one is community")));
        // Unknown tier: refused when one is required (fail closed).
        assert!(p
            .refusal("acme", None)
            .is_some_and(|w| w.contains("could not be read")));
        assert!(p
            .refusal("initech", Some("certified"))
            .is_some_and(|w| w.contains("of acme only")));
        for bad in [
            PackagePolicy {
                min_tier: "gold".into(),
                ..Default::default()
            },
            PackagePolicy {
                on_revoked: "explode".into(),
                ..Default::default()
            },
            PackagePolicy {
                publishers: vec!["Acme/*".into()],
                ..Default::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
