//! The requests and responses of the Hub's routes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The request to create a publisher.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPublisher {
    /// The namespace its packages are named under (`acme` for `acme/postgres-ha`): 1-63 lowercase
    /// letters, digits or `-`.
    pub namespace: String,
    /// Shown with its packages.
    #[serde(default)]
    pub display_name: Option<String>,
}

/// A publisher.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Publisher {
    pub namespace: String,
    pub display_name: String,
    /// The owner's email address.
    pub owner: String,
    /// How its identity was verified: `email-domain:acme.com` (the owner proved an address at
    /// the domain named like the namespace), `operator:<email>` (approved by a platform
    /// operator), or empty: not yet (it cannot publish).
    pub verified_by: String,
    /// Capability patterns its packages may claim (`rpc:call:com.acme.*`).
    pub grants: Vec<String>,
    /// How many of its keys must sign its role.
    pub threshold: i64,
    pub keys: Vec<PublisherKey>,
    pub created_at: String,
}

/// The request to register a signing key.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPublisherKey {
    /// The Ed25519 public key, 64 hex digits (`macula hub keys new` prints it).
    pub public_key: String,
    #[serde(default)]
    pub label: Option<String>,
    /// Days until the key expires (it then signs nothing); default 365, at most 1,095.
    #[serde(default)]
    pub days: Option<u64>,
}

/// A publisher's signing key.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct PublisherKey {
    /// The TUF key id (SHA-256 of the key's canonical JSON).
    pub key_id: String,
    pub public_key: String,
    pub label: String,
    pub created_at: String,
    pub expires_at: String,
    /// `active`, `expired` or `revoked`.
    pub status: String,
}

/// The request to publish: the publisher's next role, signed, with the index of every package
/// version it lists for the first time (the blobs they name uploaded before, with
/// `PUT /v1/hub/blobs/{digest}`).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The signed TUF targets role (`{"signed": ..., "signatures": [...]}`), version one above
    /// the current (`GET /v1/hub/publishers/{namespace}/role`).
    #[schema(value_type = Object)]
    pub role: serde_json::Value,
    /// Target name (`acme/hello@1.0.0`) → the package index's bytes, base64.
    pub indexes: BTreeMap<String, String>,
}

/// What publishing did.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Published {
    /// The role's version now.
    pub role_version: u64,
    pub added: Vec<Release>,
    /// Targets the previous role listed and this one does not.
    pub removed: Vec<String>,
}

/// One version of a package on the Hub.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Release {
    /// The TUF target name, `acme/hello@1.0.0`.
    pub target: String,
    /// `acme/hello`.
    pub package: String,
    pub version: String,
    /// The index's digest: the package's identity (`sha256:...`).
    pub digest: String,
    /// Bytes of all its files.
    pub size: i64,
    /// `community` (signature verified), `verified` (scan and smoke test passed), `certified`.
    pub tier: String,
    /// The vulnerability scan: findings and what could not be checked.
    #[schema(value_type = Object)]
    pub scan: serde_json::Value,
    /// The smoke test on the mesh: `{"pending": true}`, or `{"passed", "steps": [{"step":
    /// "install"|"upgrade"|"rollback", "ok", "ms", "detail"}]}`, or why it was skipped.
    #[schema(value_type = Object)]
    pub smoke: serde_json::Value,
    /// Why it was yanked (hidden from new installs, still installable by digest), or empty.
    pub yanked: String,
    /// Why it was revoked (installable nowhere), or empty.
    pub revoked: String,
    /// Certification: none (`{}`), requested (`{"declared", "requested_by", "requested_at",
    /// "fee_cents"}`: the vendor's support and SLO, and the fee it accepted), and once certified
    /// also `"review"`, `"certified_by"`, `"certified_at"`.
    #[schema(value_type = Object)]
    pub certification: serde_json::Value,
    pub published_by: String,
    pub published_at: String,
}

/// A package: its newest version and what it is.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct PackageSummary {
    pub package: String,
    pub publisher: String,
    pub verified_by: String,
    /// The newest version neither yanked nor revoked (empty if none).
    pub latest: String,
    pub tier: String,
    pub versions: i64,
}

/// A package with all its versions, newest first.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct PackageInfo {
    pub package: String,
    pub publisher: Publisher,
    pub releases: Vec<Release>,
}

/// The reason for a yank or a revocation.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    pub reason: String,
}

/// A blob stored.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// Search: `q` matches package names (substring); `publisher` narrows to one namespace.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::IntoParams)]
pub struct Search {
    #[serde(default)]
    pub q: Option<String>,
    #[serde(default)]
    pub publisher: Option<String>,
}

/// The request for an offline bundle's metadata.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBundleMetadata {
    /// How long the bundle should verify, in days (1 to 180; default 30). The publishers'
    /// roles and the targets role may end it sooner: `expires` says when.
    #[serde(default)]
    pub days: Option<u64>,
    /// The OSV ecosystems of the bundled packages' SBOMs (`npm`, `crates.io`, ...): the Hub's
    /// vulnerability records for them come back signed (at most 64).
    #[serde(default)]
    pub ecosystems: Vec<String>,
}

/// A snapshot and timestamp signed for an offline bundle (the exact bytes, base64).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct BundleMetadata {
    pub snapshot: String,
    pub snapshot_version: u64,
    pub timestamp: String,
    /// Until when the bundle's metadata verifies (the earliest expiry of its chain).
    pub expires: String,
    /// The vulnerability records of the ecosystems asked for (`osv/osv.json`, base64), when
    /// the Hub has a database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub osv: Option<String>,
    /// The Hub's DSSE envelope over the records' digest, signed with the targets key
    /// (`osv/envelope.json`, base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub osv_envelope: Option<String>,
}

/// The Hub's trust: its root of trust, for nodes to verify the repository with.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Trust {
    /// The newest `N.root.json`, as written.
    #[schema(value_type = Object)]
    pub root: serde_json::Value,
    pub root_version: u64,
    /// Where the repository is read (`metadata/`, `targets/`).
    pub repository: String,
}
