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
