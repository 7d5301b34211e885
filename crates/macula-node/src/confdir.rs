//! The node's view of its config directory: the realm files are [`macula_confdir`]'s (the same
//! layout the CLI and the registry write); `node.yaml` and loading everything a node runs on
//! ([`Load::load`]) are here.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::VerifyingKey;
use macula_router::auth::credential::{self, SignedCert};
use macula_router::policy::Policy;

pub use macula_confdir::*;

use crate::config::NodeConfig;

/// Everything a node loads from its config directory.
#[derive(Clone)]
pub struct Loaded {
    pub config: NodeConfig,
    pub operator: VerifyingKey,
    pub policies: HashMap<String, Arc<Policy>>,
    pub revoked: HashSet<String>,
    /// Sequence number of each realm's policy ([`Policy::seq`]: generation and version, both
    /// counters): the version this node signs and floods over the mesh.
    pub seqs: HashMap<String, u64>,
    /// Each realm's own authority (the public key its `authority.cert` certifies).
    pub authorities: HashMap<String, [u8; 32]>,
}

/// Loads everything a node runs on from a config directory: its `node.yaml`, the trust root,
/// every realm's policy and authority.
pub trait Load {
    fn load(&self) -> Result<Loaded>;
}

impl Load for ConfDir {
    /// Loads what a node needs.
    fn load(&self) -> Result<Loaded> {
        let pub_path = self.root.join("trust/operator.pub");
        let text = fs::read_to_string(&pub_path).with_context(|| {
            format!(
                "{} is not a Macula config directory (missing {})",
                self.root.display(),
                pub_path.display()
            )
        })?;
        let bytes = credential::parse_hex32(&text)
            .ok_or_else(|| anyhow!("{} is not a 64-hex-digit key", pub_path.display()))?;
        let operator =
            VerifyingKey::from_bytes(&bytes).map_err(|e| anyhow!("{}: {e}", pub_path.display()))?;
        let config_path = self.root.join("node.yaml");
        let config = if config_path.exists() {
            let t = fs::read_to_string(&config_path)?;
            serde_yaml_ng::from_str(&t).with_context(|| format!("{}", config_path.display()))?
        } else {
            NodeConfig::default()
        };
        let mut policies = HashMap::new();
        let mut revoked = HashSet::new();
        let mut seqs = HashMap::new();
        let mut authorities = HashMap::new();
        for r in self.realms()? {
            let path = self.realm_dir(&r).join("policy.yaml");
            let text = fs::read_to_string(&path)?;
            let p = Policy::from_yaml(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            if p.realm() != r {
                bail!(
                    "{} declares realm {} but lives in the directory of {r}",
                    path.display(),
                    p.realm()
                );
            }
            revoked.extend(p.doc.revoked_keys.iter().cloned());
            seqs.insert(r.clone(), p.seq());
            let cert_path = self.realm_dir(&r).join("authority.cert");
            if let Ok(text) = fs::read_to_string(&cert_path) {
                let cert = SignedCert::from_text(&text)
                    .and_then(|c| c.verify(&operator, now_secs()))
                    .map_err(|e| anyhow!("{}: {e}", cert_path.display()))?;
                if cert.realm != r {
                    bail!(
                        "{} certifies the authority of {}, not of {r}",
                        cert_path.display(),
                        cert.realm
                    );
                }
                authorities.insert(r.clone(), cert.authority);
            }
            policies.insert(r, Arc::new(p));
        }
        Ok(Loaded {
            config,
            operator,
            policies,
            revoked,
            seqs,
            authorities,
        })
    }
}
