//! # macula-confdir
//!
//! A config directory's realm files: trust root, realm policies, realm authorities, the metadata
//! of issued keys and node revocations. The CLI writes them (`macula keys create`, ...), the
//! registry writes its realms' newest states here, and the node reads them (its `node.yaml` and
//! the loading of all of it are the node's: `macula_node::confdir`) and re-reads them when they
//! change. Neither plane imports the other to share this layout.
//!
//! ```text
//! <dir>/node.yaml                      optional node configuration
//! <dir>/trust/operator.pub             trust root public key (hex) — all a node needs to verify keys
//! <dir>/trust/operator.key             trust root secret (hex), only where realms are created
//! <dir>/realms/<realm>/policy.yaml     roles, users, api_keys (ids only), topic_acls, revoked_keys
//! <dir>/realms/<realm>/authority.key   the realm authority's secret (hex), to issue keys
//! <dir>/realms/<realm>/authority.cert  the operator's certificate for that authority
//! <dir>/trust/revoked-nodes/<peer>.rev  operator-signed node revocations (hex), from
//!                                      `macula mesh revoke` or learned over the mesh
//! ```
//! Secrets are written with mode 0600. Keys themselves are never stored: only their ids.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::SigningKey;
use macula_router::auth::credential::{self, AuthorityCert, KeyClaims, SignedCert};
use macula_router::policy::{ApiKeyDoc, Policy, PolicyDoc};
use macula_wamp::uri;

pub use macula_common::secret::write_secret;
pub use macula_common::time::{now_secs, rfc3339};

/// A config directory.
#[derive(Debug, Clone)]
pub struct ConfDir {
    pub root: PathBuf,
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let bytes = credential::parse_hex32(&text)
        .ok_or_else(|| anyhow!("{} is not a 64-hex-digit key", path.display()))?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Metadata of an issued key, for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub realm: String,
    pub id: String,
    pub role: String,
    pub name: String,
    pub created_at: Option<String>,
    pub expires_at: Option<String>,
    pub revoked: bool,
}

impl ConfDir {
    pub fn new(root: impl Into<PathBuf>) -> ConfDir {
        ConfDir { root: root.into() }
    }

    pub fn realm_dir(&self, realm: &str) -> PathBuf {
        self.root.join("realms").join(realm)
    }

    pub fn exists(&self) -> bool {
        self.root.join("trust/operator.pub").exists()
    }

    /// Creates the directory with a new trust root (operator key pair) unless it exists.
    pub fn init(&self) -> Result<()> {
        if self.exists() {
            return Ok(());
        }
        fs::create_dir_all(self.root.join("trust"))?;
        fs::create_dir_all(self.root.join("realms"))?;
        let op = SigningKey::generate(&mut rand::rngs::OsRng);
        write_secret(
            &self.root.join("trust/operator.key"),
            &hex::encode(op.to_bytes()),
        )?;
        fs::write(
            self.root.join("trust/operator.pub"),
            hex::encode(op.verifying_key().to_bytes()),
        )?;
        Ok(())
    }

    /// The directory of node revocations (`trust/revoked-nodes`).
    pub fn revocations_dir(&self) -> PathBuf {
        self.root.join("trust/revoked-nodes")
    }

    /// Node revocations on disk: (file, contents). Unreadable files are skipped.
    pub fn node_revocations(&self) -> Vec<(PathBuf, String)> {
        let Ok(rd) = fs::read_dir(self.revocations_dir()) else {
            return vec![];
        };
        rd.filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "rev"))
            .filter_map(|p| fs::read_to_string(&p).ok().map(|t| (p, t)))
            .collect()
    }

    /// Stores a node revocation (hex) as `trust/revoked-nodes/<peer>.rev`.
    pub fn save_node_revocation(&self, peer: &str, bytes: &[u8]) -> Result<PathBuf> {
        let dir = self.revocations_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{peer}.rev"));
        fs::write(&path, hex::encode(bytes))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn operator_key(&self) -> Result<SigningKey> {
        read_signing_key(&self.root.join("trust/operator.key"))
            .context("this directory holds no trust root secret (trust/operator.key); realms are created where it is")
    }

    /// Creates a realm with an authority signed by the operator and the given policy (or a
    /// default one with `admin` and `service_account` roles).
    pub fn create_realm(&self, realm: &str, policy: Option<PolicyDoc>) -> Result<()> {
        uri::validate_realm(realm).map_err(|e| anyhow!("{e}"))?;
        let dir = self.realm_dir(realm);
        if dir.join("policy.yaml").exists() {
            bail!("realm {realm} already exists in {}", self.root.display());
        }
        let op = self.operator_key()?;
        fs::create_dir_all(&dir)?;
        let authority = SigningKey::generate(&mut rand::rngs::OsRng);
        let cert = SignedCert::issue(
            &op,
            &AuthorityCert {
                realm: realm.into(),
                authority: authority.verifying_key().to_bytes(),
                expires_at: 0,
            },
        );
        write_secret(
            &dir.join("authority.key"),
            &hex::encode(authority.to_bytes()),
        )?;
        fs::write(dir.join("authority.cert"), cert.to_text())?;
        let mut doc = policy.unwrap_or_else(|| default_policy(realm));
        // Realms of one config directory have one owner (its operator): the parent's keys keep
        // reaching a subrealm created here, as they did before it had a policy of its own.
        if let Some((parent, _, cert)) = realm
            .rfind('.')
            .and_then(|i| self.authority_for(&realm[..i]).ok())
        {
            // Only a parent made here too: one the registry materialized (generation ≥ 1)
            // belongs to a tenant, whose keys must not reach the operator's realm.
            let parent_doc = self.read_policy(&parent).ok();
            if let (Ok(c), Some(p)) = (
                cert.verify(&op.verifying_key(), now_secs()),
                parent_doc.filter(|p| p.generation == 0),
            ) {
                doc.authorities.push(hex::encode(c.authority));
                doc.authorities.extend(p.authorities);
            }
        }
        let policy = Policy::from_doc(doc).map_err(|e| anyhow!("{e}"))?;
        self.write_policy(&policy.doc)
    }

    pub fn write_policy(&self, doc: &PolicyDoc) -> Result<()> {
        let p = Policy::from_doc(doc.clone()).map_err(|e| anyhow!("{e}"))?;
        let path = self.realm_dir(&doc.realm).join("policy.yaml");
        let tmp = path.with_extension("yaml.tmp");
        fs::write(&tmp, p.to_yaml())?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn policy_path(&self, realm: &str) -> PathBuf {
        self.realm_dir(realm).join("policy.yaml")
    }

    pub fn read_policy(&self, realm: &str) -> Result<PolicyDoc> {
        let path = self.realm_dir(realm).join("policy.yaml");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("realm {realm} does not exist here ({})", path.display()))?;
        Ok(Policy::from_yaml(&text)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?
            .doc)
    }

    /// Realm names in this directory, sorted.
    pub fn realms(&self) -> Result<Vec<String>> {
        let mut out = vec![];
        let dir = self.root.join("realms");
        if !dir.exists() {
            return Ok(out);
        }
        for e in fs::read_dir(dir)? {
            let e = e?;
            if e.path().join("policy.yaml").exists() {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Issues a key for `realm` with `role`; records its id (never the key) in the policy.
    /// `ttl_secs` of 0 means no expiry. Returns (key id, key).
    pub fn issue_key(
        &self,
        realm: &str,
        role: &str,
        name: &str,
        ttl_secs: u64,
        pubkey: Option<[u8; 32]>,
    ) -> Result<(String, String)> {
        let (authority_realm, authority, cert) = self.authority_for(realm)?;
        let mut doc = self.read_policy(&authority_realm)?;
        let target = if authority_realm == realm {
            doc.clone()
        } else {
            self.read_policy(realm).unwrap_or_else(|_| doc.clone())
        };
        if !target.roles.iter().any(|r| r.name == role) {
            let roles: Vec<&str> = target.roles.iter().map(|r| r.name.as_str()).collect();
            bail!(
                "realm {realm} has no role {role:?}; roles: {}",
                roles.join(", ")
            );
        }
        let now = now_secs();
        let kid = macula_common::ids::random_id("key_", 8);
        let claims = KeyClaims {
            realm: realm.into(),
            role: role.into(),
            kid: kid.clone(),
            name: name.into(),
            issued_at: now,
            expires_at: if ttl_secs == 0 { 0 } else { now + ttl_secs },
            pubkey,
            secret_hash: None,
            holder: None,
        };
        let key = credential::issue_key(&authority, &cert, &claims);
        doc.api_keys.push(ApiKeyDoc {
            id: kid.clone(),
            role: role.into(),
            description: name.into(),
            created_at: Some(rfc3339(now)),
            expires_at: (claims.expires_at != 0).then(|| rfc3339(claims.expires_at)),
        });
        doc.version += 1;
        self.write_policy(&doc)?;
        Ok((kid, key))
    }

    /// The realm (itself or the nearest parent) whose authority can sign keys for `realm`.
    pub fn authority_for(&self, realm: &str) -> Result<(String, SigningKey, SignedCert)> {
        let mut r = realm.to_owned();
        loop {
            let dir = self.realm_dir(&r);
            if dir.join("authority.key").exists() {
                let key = read_signing_key(&dir.join("authority.key"))?;
                let cert = SignedCert::from_text(&fs::read_to_string(dir.join("authority.cert"))?)
                    .map_err(|e| anyhow!("{e}"))?;
                return Ok((r, key, cert));
            }
            match r.rfind('.') {
                Some(i) if r[..i].contains('.') => r.truncate(i),
                _ => bail!("realm {realm} does not exist in {} (create it with `macula realms create {realm}`)", self.root.display()),
            }
        }
    }

    /// Every issued key, optionally of one realm.
    pub fn list_keys(&self, realm: Option<&str>) -> Result<Vec<KeyInfo>> {
        let mut out = vec![];
        for r in self.realms()? {
            if realm.is_some_and(|x| x != r) {
                continue;
            }
            let doc = self.read_policy(&r)?;
            let revoked: HashSet<&String> = doc.revoked_keys.iter().collect();
            for k in &doc.api_keys {
                out.push(KeyInfo {
                    realm: r.clone(),
                    id: k.id.clone(),
                    role: k.role.clone(),
                    name: k.description.clone(),
                    created_at: k.created_at.clone(),
                    expires_at: k.expires_at.clone(),
                    revoked: revoked.contains(&k.id),
                });
            }
        }
        Ok(out)
    }

    /// Revokes key `kid` (in whichever realm issued it). Running nodes apply it on their next reload.
    pub fn revoke_key(&self, kid: &str) -> Result<String> {
        for r in self.realms()? {
            let mut doc = self.read_policy(&r)?;
            if doc.api_keys.iter().any(|k| k.id == kid) {
                if !doc.revoked_keys.iter().any(|k| k == kid) {
                    doc.revoked_keys.push(kid.to_owned());
                    doc.version += 1;
                    self.write_policy(&doc)?;
                }
                return Ok(r);
            }
        }
        bail!(
            "no key {kid} in {}; `macula keys list` shows the ids",
            self.root.display()
        )
    }
}

pub use macula_common::policy::default_policy;
