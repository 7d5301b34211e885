//! The Hub's TUF repository, and the client every node verifies it with.
//!
//! Roles and rules are The Update Framework's, through `tough`: its schema types, its canonical
//! signing (`SignedRole`) and its client (`RepositoryLoader`), which does every check a TUF
//! client must (thresholds, versions against a datastore that outlives the process, expiry,
//! snapshot and timestamp consistency, hashes and lengths, root rotation one version at a time).
//!
//! What this module adds, and why (see `docs/design/hub.md`, "Trust"):
//! - **The writer** (`Repo`). tough's `RepositoryEditor` wants a root file on disk and signs
//!   every role itself; the Hub instead holds the online keys (targets, snapshot, timestamp),
//!   never the root keys (they sign rotations only, offline) and never a publisher's key (each
//!   publisher signs its own delegated role, `org/*`, and uploads it: `Repo::accept_role`).
//! - **One layout both clients read.** python-tuf's `ngclient` fetches a target of a consistent
//!   snapshot at `org/<sha256>.<file>`, tough at `<sha256>.org/<file>`. Files are written in
//!   ngclient's layout and our transport (`Bridge`) rewrites tough's URLs to it.
//! - **python-tuf's parser.** Expiry times are whole seconds (python parses `%Y-%m-%dT%H:%M:%SZ`);
//!   target names are `org/<file>` in ASCII with one level (python's `fnmatch` of `org/*` does not
//!   cross `/`, tough's glob does).
//! - **tough's whole-repository load.** tough loads every delegated role when it loads the
//!   repository, and one that fails (expired, or no longer signed by its keys) fails the load for
//!   everyone. So the Hub lists a delegation only while its role verifies: it checks a role's
//!   signatures, paths and expiry before accepting it, drops a role whose keys were revoked
//!   (`Repo::set_delegation`) and one about to expire (`Repo::refresh`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::Signer as _;
use serde::Serialize;
pub use tough::async_trait;
use tough::editor::signed::SignedRole;
use tough::key_source::KeySource;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::key::{Ed25519Key, Ed25519Scheme, Key as TufKey};
use tough::schema::{
    DelegatedRole, DelegatedTargets, Delegations, Hashes, KeyHolder, Metafile, PathPattern,
    PathSet, RoleKeys, RoleType, Root, Signed, Snapshot, Target, Targets, Timestamp,
};
use tough::sign::Sign;
use tough::TargetName;

use crate::digest::Digest;

/// The TUF specification version written into every role (python-tuf accepts `1.x`).
pub const SPEC_VERSION: &str = "1.0.31";
/// The namespace of the Hub's own targets (tiers, revocations): no publisher can hold it.
pub const HUB_NAMESPACE: &str = "hub";
/// Names no publisher may take: the Hub's namespace and TUF's top-level role names.
const RESERVED: [&str; 5] = [HUB_NAMESPACE, "root", "targets", "snapshot", "timestamp"];
/// The largest delegated role a publisher may upload.
pub const MAX_ROLE_BYTES: usize = 4 << 20;
/// The largest target file (a package's index) the repository holds.
pub const MAX_TARGET_BYTES: usize = 4 << 20;
/// The most targets one publisher's role may list.
pub const MAX_ROLE_TARGETS: usize = 10_000;

/// Why a repository operation or a client load was refused, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum TufError {
    /// Input refused: `what` is the file or role, `why` the field and the rule.
    #[error("{what}: {why}")]
    Refused { what: String, why: String },
    /// A role's version is not the next one (someone else published first).
    #[error(
        "{role}: version {got} is not the next version ({want}); fetch the role again and re-sign"
    )]
    Conflict { role: String, got: u64, want: u64 },
    /// The client could not load or verify the repository (tough's reason, in full).
    #[error("TUF verification failed: {0}")]
    Verify(String),
    /// The client gave up waiting for the repository (slow retrieval).
    #[error("TUF: no answer within {0:?} (slow retrieval)")]
    Deadline(Duration),
    #[error("TUF repository at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn refused(what: impl Into<String>, why: impl Into<String>) -> TufError {
    TufError::Refused {
        what: what.into(),
        why: why.into(),
    }
}

/// tough's errors chain their causes; a user needs all of them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

fn tough_err(e: tough::error::Error) -> TufError {
    TufError::Verify(chain(&e))
}

// ---------------------------------------------------------------------------------------------
// Keys

/// An Ed25519 signing key for a TUF role (root, an online role, or a publisher's).
#[derive(Clone)]
pub struct Key(ed25519_dalek::SigningKey);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.id())
    }
}

impl Key {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Key {
        Key(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }
    pub fn from_seed(seed: [u8; 32]) -> Key {
        Key(ed25519_dalek::SigningKey::from_bytes(&seed))
    }
    /// The 32-byte secret seed (to keep the key in a file of its own, 0600).
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
    /// The TUF key id (SHA-256 of the public key's canonical JSON), in hex.
    pub fn id(&self) -> String {
        self.public().id()
    }
    /// The Ed25519 key itself (to sign attestations with).
    pub fn signing(&self) -> &ed25519_dalek::SigningKey {
        &self.0
    }
    /// Reads a key file: the 32-byte seed in hex (as `write_file` writes it).
    pub fn read_file(path: &Path) -> Result<Key, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes = hex::decode(text.trim())
            .map_err(|_| format!("{}: not a key file (64 hex digits)", path.display()))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("{}: not a key file (64 hex digits)", path.display()))?;
        Ok(Key::from_seed(seed))
    }
}

/// The field of a bundle's timestamp naming its vulnerability data (TUF keeps unknown fields
/// in the signed body; clients that do not know it ignore it).
pub const BUNDLE_OSV: &str = "x-macula-osv";

/// The public half of a `Key`, as TUF names it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub ed25519_dalek::VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl PublicKey {
    pub fn tuf(&self) -> TufKey {
        TufKey::Ed25519 {
            keyval: Ed25519Key {
                public: self.0.as_bytes().to_vec().into(),
                _extra: HashMap::new(),
            },
            scheme: Ed25519Scheme::Ed25519,
            _extra: HashMap::new(),
        }
    }
    fn key_id(&self) -> Decoded<Hex> {
        // Serializing a key we built cannot fail; an empty id would then match nothing.
        self.tuf().key_id().unwrap_or_else(|_| Vec::new().into())
    }
    pub fn id(&self) -> String {
        hex::encode(self.key_id().as_ref())
    }
    /// Parses a public key written as 64 hex digits (as `macula hub keys` prints it).
    pub fn from_hex(s: &str) -> Result<PublicKey, String> {
        let bytes = hex::decode(s.trim()).map_err(|e| format!("not hex: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "an Ed25519 public key is 32 bytes (64 hex digits)".to_string())?;
        ed25519_dalek::VerifyingKey::from_bytes(&arr)
            .map(PublicKey)
            .map_err(|e| format!("not an Ed25519 public key: {e}"))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }
}

#[async_trait]
impl Sign for Key {
    fn tuf_key(&self) -> TufKey {
        self.public().tuf()
    }
    async fn sign(
        &self,
        msg: &[u8],
        _rng: &(dyn aws_lc_rs::rand::SecureRandom + Sync),
    ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.0.sign(msg).to_bytes().to_vec())
    }
}

#[async_trait]
impl KeySource for Key {
    async fn as_sign(
        &self,
    ) -> Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(Box::new(self.clone()))
    }
    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Err("an in-memory key is not written anywhere".into())
    }
}

fn sources(keys: &[Key]) -> Vec<Box<dyn KeySource>> {
    keys.iter()
        .map(|k| Box::new(k.clone()) as Box<dyn KeySource>)
        .collect()
}

async fn sign_role<T: tough::schema::Role + Serialize>(
    role: T,
    holder: &KeyHolder,
    keys: &[Key],
) -> Result<SignedRole<T>, TufError> {
    SignedRole::new(
        role,
        holder,
        &sources(keys),
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .await
    .map_err(|e| refused(format!("signing {}", T::TYPE), chain(&e)))
}

// ---------------------------------------------------------------------------------------------
// Time

/// Now plus `d`, in whole seconds (python-tuf cannot parse fractions of a second).
pub fn expiry_in(d: Duration) -> jiff::Timestamp {
    let now = jiff::Timestamp::now().as_second();
    let secs = now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2));
    jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::MAX)
}

fn remaining(t: jiff::Timestamp) -> Duration {
    let secs = t.as_second() - jiff::Timestamp::now().as_second();
    Duration::from_secs(secs.max(0) as u64)
}

/// How long each role's signature stays valid; the Hub re-signs at half-life (`Repo::refresh`).
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub root: Duration,
    pub targets: Duration,
    pub snapshot: Duration,
    pub timestamp: Duration,
    /// The least a publisher's role must have left when uploaded; roles closer to expiry than
    /// this are dropped by `refresh` (one expired role would fail every client's load).
    pub min_delegated: Duration,
}

const DAY: u64 = 86_400;

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            root: Duration::from_secs(365 * DAY),
            targets: Duration::from_secs(90 * DAY),
            snapshot: Duration::from_secs(7 * DAY),
            timestamp: Duration::from_secs(DAY),
            min_delegated: Duration::from_secs(2 * DAY),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer

/// The Hub's online keys: they sign top-level targets (the delegations), snapshot and timestamp.
#[derive(Clone, Debug)]
pub struct Online {
    pub targets: Key,
    pub snapshot: Key,
    pub timestamp: Key,
}

impl Online {
    pub fn generate() -> Online {
        Online {
            targets: Key::generate(),
            snapshot: Key::generate(),
            timestamp: Key::generate(),
        }
    }
}

/// The keys a publisher's role must be signed with, and how many of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delegation {
    pub keys: Vec<PublicKey>,
    pub threshold: u64,
}

impl Delegation {
    fn role(&self, ns: &str) -> Result<DelegatedRole, TufError> {
        let threshold = NonZeroU64::new(self.threshold)
            .ok_or_else(|| refused(format!("publisher {ns}"), "threshold must be at least 1"))?;
        if self.keys.len() < self.threshold as usize {
            return Err(refused(
                format!("publisher {ns}"),
                format!(
                    "threshold {} is more than its {} keys",
                    self.threshold,
                    self.keys.len()
                ),
            ));
        }
        let pattern = PathPattern::new(format!("{ns}/*"))
            .map_err(|e| refused(format!("publisher {ns}"), chain(&e)))?;
        Ok(DelegatedRole {
            name: ns.to_string(),
            keyids: self.keys.iter().map(PublicKey::key_id).collect(),
            threshold,
            paths: PathSet::Paths(vec![pattern]),
            terminating: true,
            targets: None,
        })
    }

    /// The delegations object holding just this publisher (to sign or verify its role).
    fn alone(&self, ns: &str) -> Result<Delegations, TufError> {
        Ok(Delegations {
            keys: self.keys.iter().map(|k| (k.key_id(), k.tuf())).collect(),
            roles: vec![self.role(ns)?],
        })
    }
}

/// Checks a publisher namespace: lowercase letters, digits and `-`, at most 63, not reserved.
pub fn check_namespace(ns: &str) -> Result<(), TufError> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-');
    if !ok {
        return Err(refused(
            format!("namespace {ns:?}"),
            "must be 1-63 lowercase letters, digits or '-', not starting with '-'",
        ));
    }
    if RESERVED.contains(&ns) {
        return Err(refused(format!("namespace {ns:?}"), "is reserved"));
    }
    Ok(())
}

/// Checks a target name: `org/<file>`, one level, ASCII letters, digits and `._@+-`.
pub fn check_target_name(name: &str, ns: &str) -> Result<(), TufError> {
    let what = || format!("target {name:?}");
    let file = name
        .strip_prefix(ns)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| refused(what(), format!("is outside the namespace {ns}/")))?;
    let ok = !file.is_empty()
        && file.len() <= 200
        && !file.starts_with('.')
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b));
    if !ok {
        return Err(refused(
            what(),
            "the file part must be 1-200 ASCII letters, digits or '._@+-', one level, not starting with '.'",
        ));
    }
    Ok(())
}

/// A publisher's role as the Hub keeps it: parsed, and the exact bytes it was uploaded as (the
/// snapshot names their hash).
#[derive(Clone, Debug)]
struct RoleFile {
    signed: Signed<Targets>,
    bytes: Vec<u8>,
}

/// What `accept_role` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Target names the role lists for the first time.
    pub added: Vec<String>,
    /// Target names the previous version listed and this one does not (revoked by the publisher).
    pub removed: Vec<String>,
}

/// The Hub's repository: metadata and target files under one directory, in the layout both
/// tough and python-tuf's ngclient read (`metadata/N.root.json`, `metadata/timestamp.json`,
/// `metadata/N.snapshot.json`, `metadata/N.targets.json`, `metadata/N.<org>.json`,
/// `targets/<org>/<sha256>.<file>`).
pub struct Repo {
    dir: PathBuf,
    root: Signed<Root>,
    targets: Signed<Targets>,
    roles: BTreeMap<String, RoleFile>,
    snapshot_version: u64,
    timestamp_version: u64,
    timestamp_expires: jiff::Timestamp,
    snapshot_expires: jiff::Timestamp,
    online: Online,
    life: Lifetimes,
}

impl fmt::Debug for Repo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repo")
            .field("dir", &self.dir)
            .field("root", &self.root.signed.version)
            .field("targets", &self.targets.signed.version)
            .field("roles", &self.roles.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn nz(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).unwrap_or(NonZeroU64::MIN)
}

fn role_keys(keys: &[PublicKey], threshold: u64) -> Result<RoleKeys, TufError> {
    Ok(RoleKeys {
        keyids: keys.iter().map(PublicKey::key_id).collect(),
        threshold: NonZeroU64::new(threshold)
            .ok_or_else(|| refused("root.json", "a threshold must be at least 1"))?,
        _extra: HashMap::new(),
    })
}

fn build_root(
    version: u64,
    root_keys: &[PublicKey],
    threshold: u64,
    online: &Online,
    life: &Lifetimes,
) -> Result<Root, TufError> {
    if root_keys.len() < threshold as usize {
        return Err(refused(
            "root.json",
            format!(
                "threshold {threshold} is more than its {} root keys",
                root_keys.len()
            ),
        ));
    }
    let mut keys = HashMap::new();
    for k in root_keys.iter().chain(
        [
            online.targets.public(),
            online.snapshot.public(),
            online.timestamp.public(),
        ]
        .iter(),
    ) {
        keys.insert(k.key_id(), k.tuf());
    }
    let mut roles = HashMap::new();
    roles.insert(RoleType::Root, role_keys(root_keys, threshold)?);
    roles.insert(RoleType::Targets, role_keys(&[online.targets.public()], 1)?);
    roles.insert(
        RoleType::Snapshot,
        role_keys(&[online.snapshot.public()], 1)?,
    );
    roles.insert(
        RoleType::Timestamp,
        role_keys(&[online.timestamp.public()], 1)?,
    );
    Ok(Root {
        spec_version: SPEC_VERSION.to_string(),
        consistent_snapshot: true,
        version: nz(version),
        expires: expiry_in(life.root),
        keys,
        roles,
        _extra: HashMap::new(),
    })
}

fn metafile(version: u64, bytes: &[u8]) -> Metafile {
    Metafile {
        length: Some(bytes.len() as u64),
        hashes: Some(Hashes {
            sha256: Digest::of(bytes).0.to_vec().into(),
            _extra: HashMap::new(),
        }),
        version: nz(version),
        _extra: HashMap::new(),
    }
}

fn pretty<T: Serialize>(v: &T) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).unwrap_or_default();
    b.push(b'\n');
    b
}

impl Repo {
    /// Creates a repository: version 1 of root (signed by `threshold` of `root_keys`), an empty
    /// top-level targets, snapshot and timestamp.
    pub async fn create(
        dir: &Path,
        root_keys: &[Key],
        threshold: u64,
        online: Online,
        life: Lifetimes,
    ) -> Result<Repo, TufError> {
        let publics: Vec<PublicKey> = root_keys.iter().map(Key::public).collect();
        let root = build_root(1, &publics, threshold, &online, &life)?;
        let signed = sign_role(root.clone(), &KeyHolder::Root(root), root_keys).await?;
        count_root(&signed.signed().signed, signed.signed(), "1.root.json")?;
        let mut repo = Repo {
            dir: dir.to_path_buf(),
            root: signed.signed().clone(),
            targets: Signed {
                signed: Targets::new(SPEC_VERSION.into(), nz(1), expiry_in(life.targets)),
                signatures: vec![],
            },
            roles: BTreeMap::new(),
            snapshot_version: 0,
            timestamp_version: 0,
            timestamp_expires: jiff::Timestamp::UNIX_EPOCH,
            snapshot_expires: jiff::Timestamp::UNIX_EPOCH,
            online,
            life,
        };
        repo.write("metadata/1.root.json", signed.buffer())?;
        repo.sign_targets().await?;
        repo.commit().await?;
        Ok(repo)
    }

    /// Opens a repository `create` made, with the online keys it was made with (or rotated to).
    pub fn open(dir: &Path, online: Online, life: Lifetimes) -> Result<Repo, TufError> {
        let md = dir.join("metadata");
        let read = |name: &str| -> Result<Vec<u8>, TufError> {
            let p = md.join(name);
            std::fs::read(&p).map_err(|source| TufError::Io { path: p, source })
        };
        fn parse<T: serde::de::DeserializeOwned>(name: &str, b: &[u8]) -> Result<T, TufError> {
            serde_json::from_slice(b).map_err(|e| refused(name, e.to_string()))
        }
        let mut root_version = 1;
        while md.join(format!("{}.root.json", root_version + 1)).exists() {
            root_version += 1;
        }
        let rname = format!("{root_version}.root.json");
        let root: Signed<Root> = parse(&rname, &read(&rname)?)?;
        let timestamp: Signed<Timestamp> = parse("timestamp.json", &read("timestamp.json")?)?;
        let snap_meta = timestamp
            .signed
            .meta
            .get("snapshot.json")
            .ok_or_else(|| refused("timestamp.json", "meta names no snapshot.json"))?;
        let sname = format!("{}.snapshot.json", snap_meta.version);
        let snapshot: Signed<Snapshot> = parse(&sname, &read(&sname)?)?;
        let tmeta = snapshot
            .signed
            .meta
            .get("targets.json")
            .ok_or_else(|| refused(&sname, "meta names no targets.json"))?;
        let tname = format!("{}.targets.json", tmeta.version);
        let targets: Signed<Targets> = parse(&tname, &read(&tname)?)?;
        let mut roles = BTreeMap::new();
        for (file, meta) in &snapshot.signed.meta {
            let Some(ns) = file.strip_suffix(".json") else {
                continue;
            };
            if ns == "targets" {
                continue;
            }
            let name = format!("{}.{ns}.json", meta.version);
            let bytes = read(&name)?;
            let signed = parse(&name, &bytes)?;
            roles.insert(ns.to_string(), RoleFile { signed, bytes });
        }
        Ok(Repo {
            dir: dir.to_path_buf(),
            root,
            targets,
            roles,
            snapshot_version: snapshot.signed.version.get(),
            timestamp_version: timestamp.signed.version.get(),
            timestamp_expires: timestamp.signed.expires,
            snapshot_expires: snapshot.signed.expires,
            online,
            life,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn root_version(&self) -> u64 {
        self.root.signed.version.get()
    }
    pub fn timestamp_version(&self) -> u64 {
        self.timestamp_version
    }
    /// A DSSE envelope over `body`, signed with the online targets key (what the Hub attests
    /// outside TUF's files, such as a bundle's vulnerability data); clients check it against
    /// the targets role's keys in the root they verified ([`Client::targets_trust`]).
    pub fn sign_with_targets_key(
        &self,
        payload_type: &str,
        body: &[u8],
    ) -> crate::attest::Envelope {
        crate::attest::sign(payload_type, body, &[self.online.targets.signing()])
    }

    /// The bytes of `N.root.json` (what a node is given as its first root of trust).
    pub fn root_file(&self, version: u64) -> Result<Vec<u8>, TufError> {
        let p = self.dir.join(format!("metadata/{version}.root.json"));
        std::fs::read(&p).map_err(|source| TufError::Io { path: p, source })
    }
    /// The publishers with a role in the repository, and their role's version.
    pub fn publishers(&self) -> BTreeMap<String, u64> {
        self.roles
            .iter()
            .map(|(ns, r)| (ns.clone(), r.signed.signed.version.get()))
            .collect()
    }
    /// A publisher's current role (to add a target to and re-sign), or `None` before its first.
    pub fn role(&self, ns: &str) -> Option<Signed<Targets>> {
        self.roles.get(ns).map(|r| r.signed.clone())
    }
    /// The exact bytes of a publisher's current role, as it uploaded them.
    pub fn role_bytes(&self, ns: &str) -> Option<&[u8]> {
        self.roles.get(ns).map(|r| r.bytes.as_slice())
    }

    /// Writes a file under the repository atomically (temporary file, then rename).
    fn write(&self, rel: &str, bytes: &[u8]) -> Result<(), TufError> {
        let path = self.dir.join(rel);
        let io = |source| TufError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// Re-signs top-level targets with the online key, one version up.
    async fn sign_targets(&mut self) -> Result<(), TufError> {
        let mut t = self.targets.signed.clone();
        if !self.targets.signatures.is_empty() {
            t.version = nz(t.version.get() + 1);
        }
        t.expires = expiry_in(self.life.targets);
        // The delegations are kept consistent by `put_delegation` and `drop_role`; an empty
        // list is written as none (python-tuf and tough both read either).
        if t.delegations.as_ref().is_some_and(|d| d.roles.is_empty()) {
            t.delegations = None;
        }
        let signed = sign_role(
            t,
            &KeyHolder::Root(self.root.signed.clone()),
            std::slice::from_ref(&self.online.targets),
        )
        .await?;
        let name = format!("metadata/{}.targets.json", signed.signed().signed.version);
        self.write(&name, signed.buffer())?;
        self.targets = signed.signed().clone();
        Ok(())
    }

    /// Writes a new snapshot naming the current targets and roles, then a new timestamp naming
    /// it. The timestamp is written last: until then clients see the previous, whole state.
    async fn commit(&mut self) -> Result<(), TufError> {
        let targets_bytes = self.read_meta(&format!(
            "{}.targets.json",
            self.targets.signed.version.get()
        ))?;
        self.snapshot_version += 1;
        let mut snap = Snapshot::new(
            SPEC_VERSION.into(),
            nz(self.snapshot_version),
            expiry_in(self.life.snapshot),
        );
        snap.meta.insert(
            "targets.json".into(),
            metafile(self.targets.signed.version.get(), &targets_bytes),
        );
        for (ns, role) in &self.roles {
            snap.meta.insert(
                format!("{ns}.json"),
                metafile(role.signed.signed.version.get(), &role.bytes),
            );
        }
        let holder = KeyHolder::Root(self.root.signed.clone());
        let snapshot_expires = snap.expires;
        let snap = sign_role(snap, &holder, std::slice::from_ref(&self.online.snapshot)).await?;
        self.write(
            &format!("metadata/{}.snapshot.json", self.snapshot_version),
            snap.buffer(),
        )?;
        self.snapshot_expires = snapshot_expires;
        self.stamp(snap.buffer().clone()).await
    }

    async fn stamp(&mut self, snapshot_bytes: Vec<u8>) -> Result<(), TufError> {
        self.timestamp_version += 1;
        let mut ts = Timestamp::new(
            SPEC_VERSION.into(),
            nz(self.timestamp_version),
            expiry_in(self.life.timestamp),
        );
        ts.meta.insert(
            "snapshot.json".into(),
            metafile(self.snapshot_version, &snapshot_bytes),
        );
        let expires = ts.expires;
        let holder = KeyHolder::Root(self.root.signed.clone());
        let ts = sign_role(ts, &holder, std::slice::from_ref(&self.online.timestamp)).await?;
        self.write("metadata/timestamp.json", ts.buffer())?;
        self.timestamp_expires = expires;
        Ok(())
    }

    fn read_meta(&self, name: &str) -> Result<Vec<u8>, TufError> {
        let p = self.dir.join("metadata").join(name);
        std::fs::read(&p).map_err(|source| TufError::Io { path: p, source })
    }

    /// Rotates root to version N+1: new root keys and threshold and (optionally new) online
    /// keys. The new root is signed by a threshold of the old root keys *and* a threshold of the
    /// new ones, as TUF requires, so a client that trusts N walks to N+1.
    pub async fn rotate_root(
        &mut self,
        root_keys: &[PublicKey],
        threshold: u64,
        online: Online,
        old_signers: &[Key],
        new_signers: &[Key],
    ) -> Result<u64, TufError> {
        let version = self.root_version() + 1;
        let name = format!("{version}.root.json");
        let new_root = build_root(version, root_keys, threshold, &online, &self.life)?;
        let by_new = sign_role(
            new_root.clone(),
            &KeyHolder::Root(new_root.clone()),
            new_signers,
        )
        .await?;
        let by_old = sign_role(
            new_root.clone(),
            &KeyHolder::Root(self.root.signed.clone()),
            old_signers,
        )
        .await?;
        let signed = by_new
            .add_old_signatures(by_old.signed().signatures.clone())
            .map_err(|e| refused(&name, chain(&e)))?;
        count_root(
            &self.root.signed,
            signed.signed(),
            &format!("{name} (old root's keys)"),
        )?;
        count_root(
            &new_root,
            signed.signed(),
            &format!("{name} (new root's keys)"),
        )?;
        self.write(&format!("metadata/{name}"), signed.buffer())?;
        self.root = signed.signed().clone();
        self.online = online;
        self.sign_targets().await?;
        self.commit().await?;
        Ok(version)
    }

    /// Accepts a publisher's signed role (the bytes it uploaded) with the target files it
    /// names for the first time. Checked before anything is written:
    /// - signed by `delegation`'s threshold of the publisher's registered keys;
    /// - exactly the next version, not expiring within `Lifetimes::min_delegated`;
    /// - every target inside `ns/` and named as both clients read it;
    /// - a target already published keeps its hashes and length (versions are immutable);
    /// - every new target's file given, matching its length and hash.
    pub async fn accept_role(
        &mut self,
        ns: &str,
        delegation: &Delegation,
        bytes: &[u8],
        files: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Accepted, TufError> {
        check_namespace(ns)?;
        let what = format!("role {ns}");
        if bytes.len() > MAX_ROLE_BYTES {
            return Err(refused(
                what,
                format!(
                    "{} bytes is more than the {MAX_ROLE_BYTES}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let role: Signed<Targets> = serde_path_to_error::deserialize(de)
            .map_err(|e| refused(&what, format!("{}: {}", e.path(), e.inner())))?;
        let t = &role.signed;
        if !t.spec_version.starts_with("1.") {
            return Err(refused(
                &what,
                format!("signed.spec_version {:?} is not 1.x", t.spec_version),
            ));
        }
        delegation
            .alone(ns)?
            .verify_role(&role, ns)
            .map_err(|e| refused(&what, format!("signatures: {}", chain(&e))))?;
        let current = self.roles.get(ns);
        let want = current.map_or(1, |c| c.signed.signed.version.get() + 1);
        if t.version.get() != want {
            return Err(TufError::Conflict {
                role: ns.to_string(),
                got: t.version.get(),
                want,
            });
        }
        if remaining(t.expires) < self.life.min_delegated {
            return Err(refused(
                &what,
                format!(
                    "signed.expires {} is too soon: a role must have at least {} s left",
                    t.expires,
                    self.life.min_delegated.as_secs()
                ),
            ));
        }
        if t.delegations.as_ref().is_some_and(|d| !d.roles.is_empty()) {
            return Err(refused(
                &what,
                "signed.delegations: a publisher's role cannot delegate further",
            ));
        }
        if t.targets.len() > MAX_ROLE_TARGETS {
            return Err(refused(
                &what,
                format!("signed.targets: more than {MAX_ROLE_TARGETS} targets"),
            ));
        }
        let mut accepted = Accepted::default();
        for (name, target) in &t.targets {
            check_target_name(name.raw(), ns)?;
            match current.and_then(|c| c.signed.signed.targets.get(name)) {
                Some(old) => {
                    if old.hashes.sha256 != target.hashes.sha256 || old.length != target.length {
                        return Err(refused(
                            format!("target {}", name.raw()),
                            "is already published with other content: versions are immutable",
                        ));
                    }
                }
                None => {
                    let file = files.get(name.raw()).ok_or_else(|| {
                        refused(
                            format!("target {}", name.raw()),
                            "is new and its file was not uploaded",
                        )
                    })?;
                    if file.len() > MAX_TARGET_BYTES
                        || file.len() as u64 != target.length
                        || Digest::of(file).0[..] != target.hashes.sha256[..]
                    {
                        return Err(refused(
                            format!("target {}", name.raw()),
                            "the uploaded file does not match the role's length and sha256",
                        ));
                    }
                    accepted.added.push(name.raw().to_string());
                }
            }
        }
        if let Some(c) = current {
            for name in c.signed.signed.targets.keys() {
                if !t.targets.contains_key(name) {
                    accepted.removed.push(name.raw().to_string());
                }
            }
        }
        // Checked; now written: target files, the role, then targets/snapshot/timestamp.
        for name in &accepted.added {
            let file = &files[name];
            let (org, base) = name.split_once('/').unwrap_or((ns, name));
            let path = format!("targets/{org}/{}.{base}", Digest::of(file).hex());
            self.write(&path, file)?;
        }
        self.write(&format!("metadata/{want}.{ns}.json"), bytes)?;
        self.roles.insert(
            ns.to_string(),
            RoleFile {
                signed: role,
                bytes: bytes.to_vec(),
            },
        );
        let delegated = self.delegation_entry(ns) == Some(delegation.role(ns)?);
        if !delegated {
            self.put_delegation(ns, delegation)?;
            self.sign_targets().await?;
        }
        self.commit().await?;
        Ok(accepted)
    }

    fn delegation_entry(&self, ns: &str) -> Option<DelegatedRole> {
        self.targets
            .signed
            .delegations
            .as_ref()?
            .roles
            .iter()
            .find(|r| r.name == ns)
            .cloned()
    }

    fn put_delegation(&mut self, ns: &str, d: &Delegation) -> Result<(), TufError> {
        let entry = d.role(ns)?;
        let dl = self
            .targets
            .signed
            .delegations
            .get_or_insert_with(Delegations::new);
        dl.roles.retain(|r| r.name != ns);
        dl.roles.push(entry);
        dl.roles.sort_by(|a, b| a.name.cmp(&b.name));
        for k in &d.keys {
            dl.keys.insert(k.key_id(), k.tuf());
        }
        // Keys no delegation names any more go (a revoked key is not left lying in targets).
        let used: std::collections::HashSet<_> =
            dl.roles.iter().flat_map(|r| r.keyids.clone()).collect();
        dl.keys.retain(|id, _| used.contains(id));
        Ok(())
    }

    /// Changes a publisher's keys (registration, rotation, revocation), or removes it (`None`).
    /// A role its new keys no longer sign is dropped with its delegation — its packages leave
    /// the repository until the publisher signs the role again with a valid key. Returns
    /// whether the role was dropped.
    pub async fn set_delegation(
        &mut self,
        ns: &str,
        delegation: Option<&Delegation>,
    ) -> Result<bool, TufError> {
        check_namespace(ns)?;
        let Some(role) = self.roles.get(ns) else {
            return Ok(false); // listed only once it has a role (see `accept_role`)
        };
        let keep = match delegation {
            Some(d) => d.alone(ns)?.verify_role(&role.signed, ns).is_ok(),
            None => false,
        };
        if keep {
            let d = delegation.ok_or_else(|| refused(ns, "no delegation"))?;
            if self.delegation_entry(ns) == Some(d.role(ns)?) {
                return Ok(false);
            }
            self.put_delegation(ns, d)?;
        } else {
            self.drop_role(ns);
        }
        self.sign_targets().await?;
        self.commit().await?;
        Ok(!keep)
    }

    fn drop_role(&mut self, ns: &str) {
        self.roles.remove(ns);
        if let Some(dl) = self.targets.signed.delegations.as_mut() {
            dl.roles.retain(|r| r.name != ns);
            let used: std::collections::HashSet<_> =
                dl.roles.iter().flat_map(|r| r.keyids.clone()).collect();
            dl.keys.retain(|id, _| used.contains(id));
        }
    }

    /// Sets (or with `None` removes) one of the Hub's own targets, `hub/<file>`, signed by the
    /// top-level targets key: tier attestations, revocations.
    pub async fn set_hub_target(
        &mut self,
        file: &str,
        content: Option<(&[u8], serde_json::Value)>,
    ) -> Result<(), TufError> {
        let name = format!("{HUB_NAMESPACE}/{file}");
        check_target_name(&name, HUB_NAMESPACE)?;
        let tname = TargetName::new(name.clone()).map_err(|e| refused(&name, chain(&e)))?;
        match content {
            Some((bytes, custom)) => {
                if bytes.len() > MAX_TARGET_BYTES {
                    return Err(refused(&name, "larger than the target limit"));
                }
                let path = format!("targets/{HUB_NAMESPACE}/{}.{file}", Digest::of(bytes).hex());
                self.write(&path, bytes)?;
                self.targets
                    .signed
                    .targets
                    .insert(tname, target_of(bytes, &custom));
            }
            None => {
                self.targets.signed.targets.remove(&tname);
            }
        }
        self.sign_targets().await?;
        self.commit().await
    }

    /// A snapshot and timestamp for an offline bundle: the current ones' versions and
    /// contents, valid for `life` instead of days, signed with the online keys. Not written
    /// here: the bundle carries them (`<version>.snapshot.json`, `timestamp.json`). Returns
    /// their bytes (the timestamp names the snapshot's hash) and the earliest expiry of the
    /// whole chain — targets and every publisher's role expire on their own schedule, which
    /// bounds how long the bundle verifies.
    pub async fn bundle_metadata(
        &self,
        life: Duration,
        osv: Option<serde_json::Value>,
    ) -> Result<(Vec<u8>, Vec<u8>, jiff::Timestamp), TufError> {
        let current = self.read_meta(&format!("{}.snapshot.json", self.snapshot_version))?;
        let current: Signed<Snapshot> = serde_json::from_slice(&current)
            .map_err(|e| refused("snapshot.json", e.to_string()))?;
        let expires = expiry_in(life);
        let mut snap = current.signed;
        snap.expires = expires;
        let holder = KeyHolder::Root(self.root.signed.clone());
        let snap = sign_role(snap, &holder, std::slice::from_ref(&self.online.snapshot)).await?;
        let mut ts = Timestamp::new(SPEC_VERSION.into(), nz(self.timestamp_version), expires);
        ts.meta.insert(
            "snapshot.json".into(),
            metafile(self.snapshot_version, snap.buffer()),
        );
        // The bundle's vulnerability data (its digest and size), signed with the timestamp: a
        // bundle stripped of it, or given other data, no longer matches what was signed.
        if let Some(v) = osv {
            ts._extra.insert(BUNDLE_OSV.into(), v);
        }
        let ts = sign_role(ts, &holder, std::slice::from_ref(&self.online.timestamp)).await?;
        let earliest = self
            .roles
            .values()
            .map(|r| r.signed.signed.expires)
            .chain([
                self.targets.signed.expires,
                self.root.signed.expires,
                expires,
            ])
            .min()
            .unwrap_or(expires);
        Ok((snap.buffer().clone(), ts.buffer().clone(), earliest))
    }

    pub fn snapshot_version(&self) -> u64 {
        self.snapshot_version
    }

    /// Keeps the repository valid as time passes: re-signs targets, snapshot and timestamp past
    /// half their life, and drops publishers' roles that would expire before the next timestamp
    /// does (one expired role fails every client's load). Returns the publishers dropped.
    pub async fn refresh(&mut self) -> Result<Vec<String>, TufError> {
        let soon = self.life.timestamp + self.life.timestamp / 2;
        let dropped: Vec<String> = self
            .roles
            .iter()
            .filter(|(_, r)| remaining(r.signed.signed.expires) < soon)
            .map(|(ns, _)| ns.clone())
            .collect();
        for ns in &dropped {
            self.drop_role(ns);
        }
        let resign_targets =
            !dropped.is_empty() || remaining(self.targets.signed.expires) < self.life.targets / 2;
        if resign_targets {
            self.sign_targets().await?;
        }
        if resign_targets || remaining(self.snapshot_expires) < self.life.snapshot / 2 {
            self.commit().await?;
        } else if remaining(self.timestamp_expires) < self.life.timestamp / 2 {
            let snap = self.read_meta(&format!("{}.snapshot.json", self.snapshot_version))?;
            self.stamp(snap).await?;
        }
        Ok(dropped)
    }
}

/// A target entry for `bytes`: their length and SHA-256, and `custom` if it is an object.
pub fn target_of(bytes: &[u8], custom: &serde_json::Value) -> Target {
    let custom = match custom {
        serde_json::Value::Object(m) => m.clone().into_iter().collect(),
        _ => HashMap::new(),
    };
    Target {
        length: bytes.len() as u64,
        hashes: Hashes {
            sha256: Digest::of(bytes).0.to_vec().into(),
            _extra: HashMap::new(),
        },
        custom,
        _extra: HashMap::new(),
    }
}

/// Checks that `root`'s root role counts a threshold of valid signatures on `signed`.
fn count_root(root: &Root, signed: &Signed<Root>, what: &str) -> Result<(), TufError> {
    root.verify_role(signed)
        .map_err(|e| refused(what, format!("signatures: {}", chain(&e))))
}

/// Builds and signs a publisher's next role: `current` (or nothing, for its first) with
/// `add` targets added (name → index bytes and custom fields) and `remove` names removed,
/// version one up, expiring after `life`. Returns the bytes to upload.
pub async fn sign_publisher_role(
    ns: &str,
    current: Option<&Signed<Targets>>,
    add: &[(String, Vec<u8>, serde_json::Value)],
    remove: &[String],
    keys: &[Key],
    life: Duration,
) -> Result<Vec<u8>, TufError> {
    check_namespace(ns)?;
    let mut t = match current {
        Some(c) => {
            let mut t = c.signed.clone();
            t.version = nz(t.version.get() + 1);
            t
        }
        None => Targets::new(SPEC_VERSION.into(), nz(1), expiry_in(life)),
    };
    t.expires = expiry_in(life);
    t.delegations = None;
    for name in remove {
        if let Ok(n) = TargetName::new(name.clone()) {
            t.targets.remove(&n);
        }
    }
    for (name, bytes, custom) in add {
        check_target_name(name, ns)?;
        let tname = TargetName::new(name.clone()).map_err(|e| refused(name, chain(&e)))?;
        t.targets.insert(tname, target_of(bytes, custom));
    }
    let delegation = Delegation {
        keys: keys.iter().map(Key::public).collect(),
        threshold: keys.len() as u64,
    };
    let role = DelegatedTargets {
        name: ns.to_string(),
        targets: t,
    };
    let signed = sign_role(role, &KeyHolder::Delegations(delegation.alone(ns)?), keys).await?;
    let (_, targets) = signed.signed().clone().targets();
    Ok(pretty(&targets))
}

/// [`sign_publisher_role`] from the current role as JSON bytes (as the Hub serves it; `None`
/// or JSON `null` before the first).
pub async fn sign_next_role(
    ns: &str,
    current: Option<&[u8]>,
    add: &[(String, Vec<u8>, serde_json::Value)],
    remove: &[String],
    keys: &[Key],
    life: Duration,
) -> Result<Vec<u8>, TufError> {
    let current: Option<Signed<Targets>> = match current {
        None => None,
        Some(b) if b.trim_ascii() == b"null" => None,
        Some(b) => Some(
            serde_json::from_slice(b)
                .map_err(|e| refused(format!("role {ns}"), format!("as the Hub sent it: {e}")))?,
        ),
    };
    sign_publisher_role(ns, current.as_ref(), add, remove, keys, life).await
}

// ---------------------------------------------------------------------------------------------
// The client

/// Where a client reads the repository from: the Hub over HTTP, peers over the mesh, a bundle,
/// a directory. Paths are relative to the repository (`metadata/timestamp.json`,
/// `targets/acme/<sha256>.pg@1.0.0`). A source must stop reading past `max` bytes and may
/// return `max + 1` of them (the client refuses it as endless data).
#[async_trait]
pub trait Source: Send + Sync + fmt::Debug {
    async fn get(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, String>;
}

/// A repository directory on this machine (the Hub's own, or an unpacked bundle).
#[derive(Debug, Clone)]
pub struct DirSource(pub PathBuf);

#[async_trait]
impl Source for DirSource {
    async fn get(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, String> {
        use tokio::io::AsyncReadExt;
        if path.split('/').any(|c| c == ".." || c.is_empty()) {
            return Ok(None);
        }
        let p = self.0.join(path);
        let f = match tokio::fs::File::open(&p).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", p.display())),
        };
        let mut buf = Vec::new();
        f.take(max.saturating_add(1))
            .read_to_end(&mut buf)
            .await
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Some(buf))
    }
}

/// tough's transport over a `Source`, mapping tough's target URLs to ngclient's layout.
#[derive(Debug, Clone)]
struct Bridge {
    source: Arc<dyn Source>,
    max: u64,
}

const BASE: &str = "macula-tuf://repo/";

#[async_trait]
impl tough::Transport for Bridge {
    async fn fetch(&self, url: url::Url) -> Result<tough::TransportStream, tough::TransportError> {
        use tough::{TransportError, TransportErrorKind};
        let raw = url.as_str();
        let rel = raw
            .strip_prefix(BASE)
            .ok_or_else(|| TransportError::new(TransportErrorKind::UnsupportedUrlScheme, raw))?;
        let rel = percent_encoding::percent_decode_str(rel)
            .decode_utf8_lossy()
            .into_owned();
        let path = match rel.strip_prefix("targets/") {
            // tough asks for `<sha256>.org/file`; the file is at `org/<sha256>.file`.
            Some(t) => match t.split_once('.') {
                Some((hash, rest)) => match rest.split_once('/') {
                    Some((org, file)) => format!("targets/{org}/{hash}.{file}"),
                    None => format!("targets/{hash}.{rest}"),
                },
                None => rel.clone(),
            },
            None => rel.clone(),
        };
        match self.source.get(&path, self.max).await {
            Ok(Some(bytes)) => {
                let item: Result<tough::Bytes, TransportError> = Ok(tough::Bytes::from(bytes));
                Ok(Box::pin(futures::stream::iter([item])))
            }
            Ok(None) => Err(TransportError::new(TransportErrorKind::FileNotFound, raw)),
            Err(e) => Err(TransportError::new_with_cause(
                TransportErrorKind::Other,
                raw,
                std::io::Error::other(e),
            )),
        }
    }
}

/// How a client loads: its limits (endless data) and its deadline (slow retrieval).
#[derive(Clone, Copy, Debug)]
pub struct ClientOptions {
    /// The most bytes any one metadata or target file may have.
    pub max_file: u64,
    /// The longest a whole refresh, or one target's download, may take.
    pub deadline: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_file: 16 << 20,
            deadline: Duration::from_secs(30),
        }
    }
}

/// One package version the repository lists, as a client sees it after verification.
#[derive(Clone, Debug, PartialEq)]
pub struct Release {
    /// The target name, `org/<file>`.
    pub name: String,
    /// The publisher's namespace (`org`).
    pub publisher: String,
    /// The target's SHA-256: the digest of the package's index.
    pub digest: Digest,
    pub length: u64,
    /// The target's `custom` fields (package, version, channel, yanked, ...).
    pub custom: serde_json::Map<String, serde_json::Value>,
}

/// A verified view of the Hub's repository.
pub struct Client {
    repo: tough::Repository,
    options: ClientOptions,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("root", &self.repo.root().signed.version)
            .field("timestamp", &self.repo.timestamp().signed.version)
            .finish()
    }
}

impl Client {
    /// Refreshes from `source`: walks root from `trusted_root` one version at a time, then
    /// timestamp, snapshot, targets and every publisher's role, each checked as TUF says.
    /// `datastore` keeps the newest versions seen, across runs (rollback protection): give every
    /// node its own directory and keep it.
    pub async fn load(
        trusted_root: &[u8],
        source: Arc<dyn Source>,
        datastore: &Path,
        options: ClientOptions,
    ) -> Result<Client, TufError> {
        std::fs::create_dir_all(datastore).map_err(|source| TufError::Io {
            path: datastore.to_path_buf(),
            source,
        })?;
        let (meta, targets) = bases();
        let limits = tough::Limits {
            max_root_size: options.max_file.min(1 << 20),
            max_targets_size: options.max_file,
            max_timestamp_size: options.max_file.min(1 << 20),
            max_snapshot_size: options.max_file,
            max_root_updates: 1024,
        };
        let loader = tough::RepositoryLoader::new(&trusted_root, meta, targets)
            .transport(Bridge {
                source,
                max: options.max_file,
            })
            .limits(limits)
            .datastore(datastore);
        let repo = tokio::time::timeout(options.deadline, loader.load())
            .await
            .map_err(|_| TufError::Deadline(options.deadline))?
            .map_err(tough_err)?;
        Ok(Client { repo, options })
    }

    /// The newest root this client verified (JSON), to keep as the next load's trusted root.
    pub fn root_json(&self) -> Vec<u8> {
        pretty(self.repo.root())
    }

    /// The keys of the top-level targets role and its threshold, from the verified root: who
    /// may sign what the Hub attests outside TUF's files ([`Repo::sign_with_targets_key`]).
    pub fn targets_trust(&self) -> crate::attest::Trusted {
        let root = &self.repo.root().signed;
        let Some(role) = root.roles.get(&RoleType::Targets) else {
            return crate::attest::Trusted {
                keys: vec![],
                threshold: 1,
            };
        };
        let keys = role
            .keyids
            .iter()
            .filter_map(|id| match root.keys.get(id)? {
                TufKey::Ed25519 { keyval, .. } => {
                    let bytes: [u8; 32] = keyval.public.as_ref().try_into().ok()?;
                    ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()
                }
                _ => None,
            })
            .collect();
        crate::attest::Trusted {
            keys,
            threshold: (role.threshold.get() as usize).max(1),
        }
    }
    pub fn root_version(&self) -> u64 {
        self.repo.root().signed.version.get()
    }
    pub fn snapshot_version(&self) -> u64 {
        self.repo.snapshot().signed.version.get()
    }
    /// What a bundle's timestamp says of the vulnerability data it carries (`{"digest",
    /// "size"}`), if it says anything.
    pub fn bundle_osv(&self) -> Option<serde_json::Value> {
        self.repo.timestamp().signed._extra.get(BUNDLE_OSV).cloned()
    }
    pub fn timestamp_version(&self) -> u64 {
        self.repo.timestamp().signed.version.get()
    }

    /// Every target the repository lists, publishers' and the Hub's.
    pub fn releases(&self) -> Vec<Release> {
        let mut out: Vec<Release> = self
            .repo
            .all_targets()
            .map(|(name, t)| release(name.raw(), t))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn release(&self, name: &str) -> Option<Release> {
        let tname = TargetName::new(name).ok()?;
        let t = self.repo.targets().signed.find_target(&tname, false).ok()?;
        Some(release(name, t))
    }

    /// Downloads a target and checks it against its length and hash; nothing unverified is
    /// returned.
    pub async fn fetch(&self, name: &str) -> Result<Vec<u8>, TufError> {
        use tough::IntoVec;
        let tname = TargetName::new(name).map_err(|e| refused(name, chain(&e)))?;
        let work = async {
            match self.repo.read_target(&tname).await.map_err(tough_err)? {
                Some(stream) => stream.into_vec().await.map_err(tough_err),
                None => Err(refused(
                    format!("target {name}"),
                    "is not in the repository",
                )),
            }
        };
        tokio::time::timeout(self.options.deadline, work)
            .await
            .map_err(|_| TufError::Deadline(self.options.deadline))?
    }
}

fn bases() -> (url::Url, url::Url) {
    // Both parse: constant, valid URLs.
    let m = url::Url::parse(&format!("{BASE}metadata/"));
    let t = url::Url::parse(&format!("{BASE}targets/"));
    match (m, t) {
        (Ok(m), Ok(t)) => (m, t),
        _ => unreachable!("constant URLs parse"),
    }
}

fn release(name: &str, t: &Target) -> Release {
    let mut digest = [0u8; 32];
    let h: &[u8] = &t.hashes.sha256;
    if h.len() == 32 {
        digest.copy_from_slice(h);
    }
    Release {
        name: name.to_string(),
        publisher: name.split('/').next().unwrap_or_default().to_string(),
        digest: Digest(digest),
        length: t.length,
        custom: t
            .custom
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}
