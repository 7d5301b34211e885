//! The requests and responses of realms' routes.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use macula_common::policy::{RoleDoc, TopicAclDoc};

// ---- realms ----

/// The request to register a realm.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRealm {
    /// Reverse-DNS, lowercase (`com.acme.shop`); a subrealm of a registered realm only by its
    /// owner.
    pub name: String,
    /// Delegate a subrealm to another account (only the parent's owner may).
    #[serde(default)]
    pub owner_email: Option<String>,
    /// The plan (`GET /v1/plans`); default the first.
    #[serde(default)]
    pub tier: Option<String>,
}

/// A realm's registration.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Realm {
    pub name: String,
    /// The owner's email address.
    pub owner: String,
    pub parent: Option<String>,
    pub tier: String,
    /// `active`, `expired` (in its grace period or past it) or `suspended`.
    pub status: String,
    /// Frozen by an operator while a dispute is open (no transfer, delete or owner change).
    pub frozen: bool,
    pub created_at: String,
    pub expires_at: String,
    /// After this the realm is disabled and its name free to register again.
    pub grace_ends_at: String,
    pub policy_version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_reason: Option<String>,
    /// The caller's access: `owner`, `member` (lists) or `member:<role>`, `operator` (one realm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
    /// One realm: its keys that are neither revoked nor expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_keys: Option<i64>,
    /// One realm: how many members it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<usize>,
    /// One realm: its roles' names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// One realm, on a node that hosts the registry: what that node sees now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Live>,
    /// After a transfer: the fee charged to the new owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fee_cents: Option<i64>,
}

/// What the node that answers sees of a realm now.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Live {
    pub sessions_on_this_node: usize,
}

/// `POST /v1/realms/{realm}/renew` (the body may be left out: one year).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Renew {
    /// 1 to 10.
    #[serde(default = "one")]
    pub years: u64,
}

fn one() -> u64 {
    1
}

/// An owner's authorization code for a transfer, shown once.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct TransferCode {
    pub realm: String,
    /// `tc_...`: give it to the new owner.
    pub code: String,
    pub expires_at: String,
    /// Charged to the new owner.
    pub fee_cents: i64,
}

/// Taking a realm over with its owner's code.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub code: String,
}

// ---- members and policy ----

/// A member of a realm (the owner is listed first, with role `owner`).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Member {
    pub email: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_at: Option<String>,
}

/// Adds a member (an invitation: it applies when that address has a verified account) or
/// changes a member's role.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberRequest {
    pub email: String,
    pub role: String,
}

/// A member set, and the policy version that carries it to the nodes.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct MemberSet {
    pub realm: String,
    pub email: String,
    pub role: String,
    pub policy_version: u64,
}

/// Roles and topic ACLs for `PUT /v1/realms/{realm}/policy` (users, keys, revocations and
/// status are the registry's to manage).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    pub roles: Vec<RoleDoc>,
    #[serde(default)]
    pub topic_acls: Vec<TopicAclDoc>,
    /// Dedicated Nodes: the mesh peer ids that alone may serve the realm (needs the
    /// `dedicated_nodes` add-on; an empty list lifts the restriction). Absent: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
    /// Forwarded publications and calls only with roles that keys' proofs show (see
    /// `PolicyDoc::verified_roles`). Absent: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_roles: Option<bool>,
    /// Which Hub packages the realm's workloads may run (`PolicyDoc::packages`). Absent:
    /// unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<macula_common::policy::PackagePolicy>,
    /// Change only if the policy is at this version (409 `stale_policy` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<i64>,
}

/// `GET /v1/realms/{realm}/policy?version=`
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VersionQuery {
    /// An earlier version (default the newest).
    pub version: Option<i64>,
}

/// One version of a realm's policy.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct PolicyVersion {
    pub version: i64,
    pub author: String,
    pub created_at: String,
}

// ---- keys ----

/// The request to create an API key.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_key_role")]
    pub role: String,
    /// Lifetime in days; 0 for a key that never expires.
    #[serde(default = "default_key_days")]
    pub expires_in_days: u64,
    /// Bind the key to an Ed25519 public key (64 hex) for WAMP-Cryptosign.
    #[serde(default)]
    pub pubkey: Option<String>,
}

pub(crate) fn default_key_role() -> String {
    "service_account".into()
}

pub(crate) fn default_key_days() -> u64 {
    365
}

/// An API key (never its secret, except in the answer that creates it).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Key {
    /// `key_...`
    pub id: String,
    /// The secret (`sk_live_...`), only in the answer that creates the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub realm: String,
    pub role: String,
    pub name: String,
    /// Lists: who created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// Lists: `active`, `expired` or `revoked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A revoked key: every node closes its sessions within seconds.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct RevokedKey {
    pub id: String,
    pub realm: String,
    pub revoked_at: String,
}

// ---- audit ----

/// One entry of the audit log.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    /// None for changes to an account.
    pub realm: Option<String>,
    /// The email address of who made the change.
    pub actor: String,
    /// `key.create`, `member.set`, `realm.transfer`...
    pub action: String,
    /// What changed, per action.
    pub detail: serde_json::Value,
    /// The client's address.
    pub remote: String,
    pub at: String,
}

// ---- operators ----

/// An ownership claim on a realm (a dispute), recorded by an operator.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The claimant's email address.
    pub claimant: String,
    #[serde(default)]
    pub note: String,
}

/// An ownership claim.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Claim {
    /// `claim_...`
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
    pub claimant: String,
    pub note: String,
    /// `open` or `resolved`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    pub created_at: String,
}

/// Why an operator freezes or suspends a realm (the body may be left out).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    #[serde(default)]
    pub reason: String,
}

/// Moves a realm to another account (resolving a dispute; no fee).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceTransfer {
    /// The new owner's (verified) email address.
    pub to: String,
}
