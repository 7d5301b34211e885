//! Desired state without a control plane: a deploy is a *record*, signed by an API key whose
//! role has `realm:deploy`, that every node serving the realm keeps and floods. No database
//! and no single node is on the path.
//!
//! A record names (realm, workload name), carries the manifest as written (or nothing: a
//! tombstone, the workload deleted), a sequence number that only grows for that name, and the
//! key's public form (`pk_live_...`) with the key holder's signature over the record's digest.
//! A node takes a record only if the signature is the key's, the key is valid for the realm
//! and its role may deploy there, the manifest parses and names the same workload, and its
//! sequence is above the one it has: so a replayed, forged or re-ordered record changes
//! nothing, and a tombstone keeps older versions from coming back.
//!
//! Keys, roles and signatures are the node's (`macula-router`'s credentials): this module takes
//! them as closures and stays free of them.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::Manifest;

const DOMAIN: &[u8] = b"macula-deploy-record-v1";

/// How many workloads (tombstones included) one realm may have on a node, and how many bytes
/// of manifests: what one tenant's records can cost every node of the mesh.
pub const MAX_PER_REALM: usize = 1_000;
pub const MAX_BYTES_PER_REALM: usize = 8 << 20;
/// Earlier versions kept per workload (for `macula rollout undo`); they count in the realm's
/// bytes, and the oldest go first when the realm needs the room.
pub const HISTORY: usize = 5;

/// A signed deploy (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub realm: String,
    pub name: String,
    /// Above every earlier record of (realm, name).
    pub seq: u64,
    /// The manifest as written; None for a tombstone.
    pub manifest: Option<String>,
    /// Unix seconds when it was signed.
    pub issued_at: u64,
    /// The signing key's public form.
    pub key: String,
    /// The key holder's Ed25519 signature over [`DeployRecord::digest`].
    #[serde(with = "hex_bytes")]
    pub sig: Vec<u8>,
    /// The first lease configuration of each of the workload's slots: not signed (the node
    /// that took the record from its signer chose it) and carried from one record of the name
    /// to the next, so that every node agrees on it (see [`Genesis`]).
    #[serde(default, skip_serializing_if = "Genesis::is_empty")]
    pub genesis: Genesis,
}

/// The most ranges a workload's [`Genesis`] has, and the most nodes one names.
pub const MAX_GENESIS_RANGES: usize = 64;
pub const MAX_GENESIS_NODES: usize = 16;

/// Where each of a workload's lease slots starts: its first configuration (epoch 1) is the top
/// [`lease::AUTHORITIES`](crate::lease::AUTHORITIES) by rendezvous hash of the slot over the
/// nodes of the range that holds its index. The node that takes a record from its signer adds
/// a range, from the realm's nodes it sees, for indices no earlier record of the name covered;
/// ranges never change after (records and tombstones carry them on), so a slot's first
/// configuration is the same on every node that has any record of the workload, whatever each
/// sees of the mesh — the ground the configuration's moves stand on ([`crate::lease`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    pub ranges: Vec<GenesisRange>,
}

/// Slot indices `from..to` start on the top 3 of `nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisRange {
    pub from: u32,
    pub to: u32,
    pub nodes: Vec<String>,
}

impl Genesis {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The indices covered: `0..covered()`.
    pub fn covered(&self) -> u32 {
        self.ranges.last().map_or(0, |r| r.to)
    }

    /// Whether it is well formed: ranges in order, each after the last, with 1 to
    /// [`MAX_GENESIS_NODES`] nodes of sane ids.
    pub fn valid(&self) -> bool {
        let mut at = 0;
        self.ranges.len() <= MAX_GENESIS_RANGES
            && self.ranges.iter().all(|r| {
                let ok = r.from == at
                    && r.to > r.from
                    && !r.nodes.is_empty()
                    && r.nodes.len() <= MAX_GENESIS_NODES
                    && r.nodes.iter().all(|n| !n.is_empty() && n.len() <= 128);
                at = r.to;
                ok
            })
    }

    /// The first configuration of lease slot `slot`, index `index` of the workload.
    pub fn cfg(&self, slot: &str, index: u32) -> Option<crate::lease::Cfg> {
        let r = self
            .ranges
            .iter()
            .find(|r| (r.from..r.to).contains(&index))?;
        let set = crate::lease::authorities(slot, &r.nodes, crate::lease::AUTHORITIES)
            .into_iter()
            .cloned()
            .collect();
        Some(crate::lease::Cfg { epoch: 1, set })
    }

    /// Takes on the ranges of `other` past those it has (its own never change).
    fn carry(&mut self, other: &Genesis) {
        if !other.valid() {
            return;
        }
        for r in &other.ranges {
            if r.from == self.covered() && self.ranges.len() < MAX_GENESIS_RANGES {
                self.ranges.push(r.clone());
            }
        }
    }

    /// Covers indices up to `upto` with a range over `nodes` (the realm's nodes as the node
    /// that took the record sees them; the first [`MAX_GENESIS_NODES`] by rendezvous hash of
    /// the workload and the range's start).
    fn extend(&mut self, key: &str, upto: u32, nodes: &[String]) {
        let from = self.covered();
        if upto <= from || nodes.is_empty() || self.ranges.len() >= MAX_GENESIS_RANGES {
            return;
        }
        let picked = crate::placement::top_by_hash(
            &[key.as_bytes(), &from.to_be_bytes()],
            nodes,
            MAX_GENESIS_NODES,
        )
        .into_iter()
        .cloned()
        .collect();
        self.ranges.push(GenesisRange {
            from,
            to: upto,
            nodes: picked,
        });
    }
}

/// How many lease slot indices a manifest uses: its replicas (or completions), and a payload's
/// rollout permits.
pub fn lease_indices(m: &Manifest) -> u32 {
    match m {
        Manifest::Payload(p) => p
            .replicas
            .max((p.update.max_surge + p.update.max_unavailable).max(1)),
        Manifest::Job(j) => j.completions,
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let t = String::deserialize(d)?;
        hex::decode(t).map_err(serde::de::Error::custom)
    }
}

impl DeployRecord {
    /// What the signature covers: every field but the signature, length-prefixed.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(self.realm.as_bytes());
        field(self.name.as_bytes());
        field(&self.seq.to_be_bytes());
        match &self.manifest {
            Some(m) => {
                field(b"manifest");
                field(m.as_bytes());
            }
            None => field(b"tombstone"),
        }
        field(&self.issued_at.to_be_bytes());
        field(self.key.as_bytes());
        h.finalize().into()
    }

    /// A record signed with `sign` (the key holder's signature over the digest).
    #[allow(clippy::too_many_arguments)]
    pub fn signed(
        realm: &str,
        name: &str,
        seq: u64,
        manifest: Option<String>,
        issued_at: u64,
        key_public: &str,
        sign: impl FnOnce(&[u8; 32]) -> Option<[u8; 64]>,
    ) -> Option<DeployRecord> {
        let mut r = DeployRecord {
            realm: realm.to_owned(),
            name: name.to_owned(),
            seq,
            manifest,
            issued_at,
            key: key_public.to_owned(),
            sig: vec![],
            genesis: Genesis::default(),
        };
        r.sig = sign(&r.digest())?.to_vec();
        Some(r)
    }
}

/// Why a record was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A record of that name with this sequence or a later one is known (a replay, or late).
    Stale { have: u64 },
    /// The signature or the key does not hold.
    Unverified(String),
    /// The key's role may not deploy in the realm.
    Forbidden(String),
    /// The manifest is not valid, or names another workload or realm.
    Invalid(String),
    /// The realm has as many workloads, or bytes of manifests, as a node keeps.
    Full,
    /// The realm's workloads would ask for more instances at once than its plan allows.
    OverLimit {
        /// What they would ask for with this record.
        asked: u64,
        /// The plan's `max_instances`.
        limit: u32,
    },
}

/// What the node knows of a key that signed a record: its realm and role (after checking the
/// key's chain and that `sig` is its holder's over `digest`).
pub struct Signer {
    pub key_realm: String,
    pub role: String,
}

/// The records a node keeps: the newest per (realm, name), tombstones included, and a few
/// earlier versions of each.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Records {
    by_realm: BTreeMap<String, BTreeMap<String, DeployRecord>>,
    /// Earlier records with a manifest, newest first, at most [`HISTORY`] per workload.
    #[serde(default)]
    history: BTreeMap<String, BTreeMap<String, VecDeque<DeployRecord>>>,
    /// The instances each record asks for, by (realm, name), with the record's sequence (so
    /// that a newer record is never counted at an older one's figure): filled as records are
    /// taken, and on first need after a load.
    #[serde(skip)]
    instances: HashMap<(String, String), (u64, u32)>,
}

impl Records {
    /// Takes `r` if it holds (see the module's documentation). `verify` checks the key and the
    /// signature; `may_deploy(realm, signer, None)` the signer's role, and then
    /// `may_deploy(realm, signer, Some(role))` the role the manifest gives the replicas' own
    /// sessions (a signer must not hand its workload more than it may have itself); `Err` says
    /// why not. With `max_instances`, the realm's workloads together may ask for at most that
    /// many instances at once ([`Manifest::instances`]); a record that lowers the count is
    /// taken even above it (scaling down, deleting).
    ///
    /// `entry`: the realm's nodes as this node sees them, when it takes the record from its
    /// signer (not from a peer): the record's [`Genesis`] is then this node's, extended over
    /// them for indices no earlier record covered. From a peer, the record's own ranges past
    /// those this node has are taken on. Returns the record as taken.
    pub fn accept(
        &mut self,
        mut r: DeployRecord,
        verify: impl FnOnce(&str, &[u8; 32], &[u8]) -> Result<Signer, String>,
        may_deploy: impl Fn(&str, &Signer, Option<&str>) -> Result<(), String>,
        max_instances: Option<u32>,
        entry: Option<&[String]>,
    ) -> Result<(DeployRecord, Option<Manifest>), Refused> {
        let current = self.get(&r.realm, &r.name);
        let have = current.map(|x| x.seq);
        // Two signed records of one sequence (two deploys at once): every node keeps the same
        // one, the lower by digest, so that they agree in the end. The same signed record with
        // other first configurations is not a rival (they are not signed: a peer could rewrite
        // them at will); a node keeps the ones it took first.
        let rival = entry.is_none()
            && current.is_some_and(|c| c.seq == r.seq && r.digest() < c.digest())
            && r.genesis.valid();
        if let Some(have) = have.filter(|h| r.seq <= *h && !rival) {
            return Err(Refused::Stale { have });
        }
        let signer = verify(&r.key, &r.digest(), &r.sig).map_err(Refused::Unverified)?;
        if let Err(why) = may_deploy(&r.realm, &signer, None) {
            return Err(Refused::Forbidden(format!(
                "role {:?} of a key of {} may not deploy in {} (needs realm:deploy){}",
                signer.role,
                signer.key_realm,
                r.realm,
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                }
            )));
        }
        let manifest = match &r.manifest {
            None => None,
            Some(text) => {
                let m = crate::parse(text).map_err(|e| Refused::Invalid(e.to_string()))?;
                let w = m.workload();
                if w.name != r.name {
                    return Err(Refused::Invalid(format!(
                        "the record is for {:?}, its manifest for {:?}",
                        r.name, w.name
                    )));
                }
                if let Err(why) = may_deploy(&r.realm, &signer, Some(&w.role)) {
                    return Err(Refused::Forbidden(format!(
                        "the workload's sessions would have role {:?}: {why}",
                        w.role
                    )));
                }
                if w.realm.as_deref().is_some_and(|x| x != r.realm) {
                    return Err(Refused::Invalid(format!(
                        "the record is for realm {}, its manifest names {}",
                        r.realm,
                        w.realm.as_deref().unwrap_or_default()
                    )));
                }
                Some(m)
            }
        };
        if let (Some(limit), Some(m)) = (max_instances, &manifest) {
            let others = self.instances(&r.realm, Some(&r.name));
            let before = others + self.instances_of(&r.realm, &r.name);
            let asked = others + u64::from(m.instances());
            if asked > u64::from(limit) && asked > before {
                return Err(Refused::OverLimit { asked, limit });
            }
        }
        // The slots' first configurations: those of the record this node has, carried on (a
        // rival of the same sequence brings its own).
        let mut genesis = match rival {
            true => Genesis::default(),
            false => self
                .get(&r.realm, &r.name)
                .map(|p| p.genesis.clone())
                .unwrap_or_default(),
        };
        match entry {
            Some(nodes) => {
                let upto = manifest.as_ref().map_or(0, lease_indices);
                genesis.extend(&format!("{}/{}", r.realm, r.name), upto, nodes);
            }
            None => genesis.carry(&r.genesis),
        }
        r.genesis = genesis;
        let realm = self.by_realm.entry(r.realm.clone()).or_default();
        if have.is_none() && realm.len() >= MAX_PER_REALM {
            return Err(Refused::Full);
        }
        let size = |r: &DeployRecord| r.manifest.as_ref().map_or(0, String::len);
        let bytes: usize =
            realm.values().map(size).sum::<usize>() - realm.get(&r.name).map_or(0, size) + size(&r);
        if bytes > MAX_BYTES_PER_REALM {
            return Err(Refused::Full);
        }
        self.instances.insert(
            (r.realm.clone(), r.name.clone()),
            (r.seq, manifest.as_ref().map_or(0, Manifest::instances)),
        );
        let history = self.history.entry(r.realm.clone()).or_default();
        if let Some(prev) = realm
            .insert(r.name.clone(), r.clone())
            .filter(|p| p.manifest.is_some() && p.seq < r.seq)
        {
            let h = history.entry(prev.name.clone()).or_default();
            h.push_front(prev);
            h.truncate(HISTORY);
        }
        // Room for the history within the realm's bytes: the oldest versions go first.
        let mut total = bytes + history.values().flatten().map(size).sum::<usize>();
        while total > MAX_BYTES_PER_REALM {
            let Some(oldest) = history
                .values_mut()
                .filter(|h| !h.is_empty())
                .min_by_key(|h| h.back().map_or(u64::MAX, |r| r.issued_at))
            else {
                break;
            };
            total -= oldest.pop_back().as_ref().map_or(0, size);
        }
        history.retain(|_, h| !h.is_empty());
        Ok((r, manifest))
    }

    /// The earlier versions of (realm, name) kept here, newest first.
    pub fn history(&self, realm: &str, name: &str) -> impl Iterator<Item = &DeployRecord> {
        self.history
            .get(realm)
            .and_then(|m| m.get(name))
            .into_iter()
            .flatten()
    }

    /// The instances the newest record of (realm, name) asks for (0 for a tombstone or none).
    fn instances_of(&mut self, realm: &str, name: &str) -> u64 {
        let Some(r) = self.by_realm.get(realm).and_then(|m| m.get(name)) else {
            return 0;
        };
        let key = (realm.to_owned(), name.to_owned());
        if let Some((seq, n)) = self.instances.get(&key) {
            if *seq == r.seq {
                return u64::from(*n);
            }
        }
        let n = r
            .manifest
            .as_deref()
            .and_then(|t| crate::parse(t).ok())
            .map_or(0, |m| m.instances());
        let seq = r.seq;
        self.instances.insert(key, (seq, n));
        u64::from(n)
    }

    /// The instances the realm's workloads ask for at once, leaving out `except`.
    pub fn instances(&mut self, realm: &str, except: Option<&str>) -> u64 {
        let names: Vec<String> = self
            .by_realm
            .get(realm)
            .into_iter()
            .flat_map(|m| m.keys())
            .filter(|n| Some(n.as_str()) != except)
            .cloned()
            .collect();
        names.iter().map(|n| self.instances_of(realm, n)).sum()
    }

    /// The newest record of (realm, name).
    pub fn get(&self, realm: &str, name: &str) -> Option<&DeployRecord> {
        self.by_realm.get(realm)?.get(name)
    }

    /// The realm's live workloads (tombstones left out), by name.
    pub fn live(&self, realm: &str) -> impl Iterator<Item = &DeployRecord> {
        self.by_realm
            .get(realm)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|r| r.manifest.is_some())
    }

    /// Every record (for a peer that just linked, and for persisting).
    pub fn all(&self) -> impl Iterator<Item = &DeployRecord> {
        self.by_realm.values().flat_map(|m| m.values())
    }
}
