//! Proven roles: what another node's sessions may do here, as their keys prove it.
//!
//! A node forwards its sessions' publications, calls, interest and registrations under the
//! session's id and role. The receiving node does not take the role on the sender's word:
//! before the first frame that names a session, the sender sends the session's proof
//! ([`Frame::Session`]): the public form of its key and the key holder's signature over the
//! session digest, which names the sending node and the realm (see
//! `macula_router::auth::SessionProof`). The receiver verifies both — the key like a key at a
//! join (operator and authority signatures, expiry, revocation, the realm's current authorities,
//! the role and its reach into subrealms), the signature against the sending peer's id — and
//! from then on uses the role the key proves, whatever the frames claim. A node that replays
//! another node's proof proves nothing: the digest names the node that made it. Without a proof
//! (a key that cannot make one) the claimed role stands, unless the realm requires proofs
//! (`verified_roles`).
//!
//! Interest and registrations are *held* for a peer: each names the session that justifies it.
//! The hold is checked when it is announced (the role may subscribe or register there) and again
//! whenever this node's credentials change (a revocation, a deleted role or permission,
//! `verified_roles` switched on) and when the proving key expires; a hold no longer justified is
//! withdrawn, as the sender would have withdrawn it had it closed the session.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use macula_mesh::{Frame, MeshHandle, Peer as PeerId, Sent};
use macula_router::auth::SessionProof;
use macula_router::dealer::InvokePolicy;
use macula_router::policy::{Action, Policy};
use macula_router::Origin;
use macula_wamp::uri::MatchPolicy;
use macula_wamp::Id;
use parking_lot::Mutex;

use crate::mesh::{rejected, MeshState};
use crate::node::{Node, RealmHandle};

/// Sessions per peer whose proven role a node keeps (and announces) at once.
const MAX_SESSIONS_PER_PEER: usize = 65_536;

/// The newest [`MAX_SESSIONS_PER_PEER`] sessions of one peer, each with its realm, the oldest
/// evicted first. A node's record of what it sent a peer and the peer's record of the proofs see
/// the same `Session` frames in the same order (the peer keeps only those it verified, so never
/// more, and moves a proof sent again to the back, as the sender does): the peer never forgets a
/// proof the node still counts as sent. Keyed by session id alone (random 53-bit ids: two
/// realms' sessions sharing one are not expected; if they did, the second would simply go
/// unproven), so a lookup allocates nothing.
pub struct Recent<V> {
    map: HashMap<u64, (Arc<str>, V)>,
    order: VecDeque<u64>,
}

impl<V> Default for Recent<V> {
    fn default() -> Self {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V> Recent<V> {
    fn get(&self, realm: &str, session: u64) -> Option<&V> {
        self.map
            .get(&session)
            .filter(|(r, _)| &**r == realm)
            .map(|(_, v)| v)
    }

    fn contains(&self, session: u64) -> bool {
        self.map.contains_key(&session)
    }

    /// Inserts at the back (a session already there moves to the back), evicting the oldest
    /// beyond [`MAX_SESSIONS_PER_PEER`].
    fn put(&mut self, realm: Arc<str>, session: u64, v: V) {
        if self.map.insert(session, (realm, v)).is_some() {
            self.order.retain(|s| *s != session);
        }
        self.order.push_back(session);
        if self.order.len() > MAX_SESSIONS_PER_PEER {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    /// Keeps the entries for which `keep` holds (proofs are only ever dropped by the receiver,
    /// which keeps the sender's count an upper bound of its own).
    fn retain(&mut self, mut keep: impl FnMut(&str, &V) -> bool) {
        self.map.retain(|_, (r, v)| keep(r, v));
        let map = &self.map;
        self.order.retain(|s| map.contains_key(s));
    }
}

/// What a peer session's key proved.
#[derive(Debug, Clone)]
pub struct Proven {
    kid: String,
    role: String,
    /// The realm the key was issued for (the session's realm or a parent).
    key_realm: String,
    /// The authority that issued the key.
    authority: [u8; 32],
    /// When the key (or its authority's certificate) expires; 0: never.
    expires_at: u64,
}

impl Proven {
    /// Whether the key still stands for `realm` here: not revoked, its authority still the
    /// realm's, not expired, and its role admitted there (as at a join).
    fn stands(&self, node: &Node, realm: &str, now: u64) -> Result<Arc<Policy>, String> {
        let auth = node.auth();
        if auth.authenticator.is_revoked(&self.kid) {
            return Err(format!("key {} was revoked", self.kid));
        }
        if !auth.accepts(realm, &self.authority) {
            return Err(format!(
                "key {} is not of realm {realm}'s current registration",
                self.kid
            ));
        }
        if self.expires_at != 0 && self.expires_at <= now {
            return Err(format!("key {} expired", self.kid));
        }
        node.role_admitted(realm, &self.key_realm, &self.role)
            .map_err(|(_, why)| why)
    }
}

/// Interest or registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Interest,
    Registration,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Interest => "interest",
            Kind::Registration => "registration",
        }
    }

    fn action(self) -> Action {
        match self {
            Kind::Interest => Action::Subscribe,
            Kind::Registration => Action::Register,
        }
    }
}

/// One interest or registration a peer holds here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HoldKey {
    pub realm: Arc<str>,
    pub kind: Kind,
    pub uri: String,
    pub policy: MatchPolicy,
}

/// What justifies a hold: the role it was checked for and, if a key proved it, the proof.
struct Held {
    role: String,
    proof: Option<Proven>,
}

/// What one peer holds here, and in how many realms.
#[derive(Default)]
struct PeerHolds {
    holds: HashMap<HoldKey, Held>,
    /// Holds per realm.
    realms: HashMap<Arc<str>, usize>,
}

impl PeerHolds {
    fn insert(&mut self, key: HoldKey, h: Held) {
        let realm = key.realm.clone();
        if self.holds.insert(key, h).is_none() {
            *self.realms.entry(realm).or_default() += 1;
        }
    }

    fn remove(&mut self, key: &HoldKey) {
        if self.holds.remove(key).is_some() {
            if let Some(n) = self.realms.get_mut(&key.realm) {
                *n -= 1;
                if *n == 0 {
                    self.realms.remove(&key.realm);
                }
            }
        }
    }
}

/// Limits on what one peer may hold here.
#[derive(Debug, Clone, Copy)]
pub struct HoldLimits {
    /// `mesh.max_holds_per_peer`.
    pub holds: usize,
    /// `mesh.max_realms_per_peer`.
    pub realms: usize,
}

/// Proofs sent and received, and the holds they justify.
pub struct Proofs {
    /// Per peer, its sessions whose role it proved.
    verified: Mutex<HashMap<PeerId, Recent<Proven>>>,
    /// Per peer, the (realm, session)s whose proof this node sent it.
    pub(crate) announced: Arc<Mutex<HashMap<PeerId, Recent<()>>>>,
    /// Per peer, the interest and registrations it holds here.
    holds: Mutex<HashMap<PeerId, PeerHolds>>,
    /// The earliest expiry of a proof behind a hold (0: none known), for [`Proofs::expire`].
    next_expiry: AtomicU64,
    limits: HoldLimits,
}

/// Sends the proof of session `session` to `peer` before the first frame that names the
/// session (under the lock, so that frames leave in the order they are recorded). Recorded as
/// sent only if it was queued: a frame dropped on a full queue is sent again next time.
pub fn send_proof(
    announced: &Mutex<HashMap<PeerId, Recent<()>>>,
    mesh: &MeshHandle,
    peer: &PeerId,
    realm: &Arc<str>,
    session: u64,
    proof: Option<&Arc<SessionProof>>,
) {
    let Some(proof) = proof else { return };
    let mut a = announced.lock();
    let sent = a.entry(*peer).or_default();
    if sent.contains(session) {
        return;
    }
    let queued = mesh.send(
        peer,
        &Frame::Session {
            realm: realm.to_string(),
            session,
            public: proof.public.clone(),
            nonce: bytes::Bytes::copy_from_slice(&proof.nonce),
            sig: bytes::Bytes::copy_from_slice(&proof.sig),
        },
    );
    if matches!(queued, Sent::Queued | Sent::Congested) {
        sent.put(realm.clone(), session, ());
    }
}

impl Proofs {
    pub fn new(limits: HoldLimits) -> Proofs {
        Proofs {
            verified: Default::default(),
            announced: Default::default(),
            holds: Default::default(),
            next_expiry: AtomicU64::new(0),
            limits,
        }
    }

    /// `peer` is gone: its proofs and holds go with its links.
    pub fn forget(&self, peer: &PeerId) {
        self.verified.lock().remove(peer);
        self.announced.lock().remove(peer);
        self.holds.lock().remove(peer);
    }

    /// A link to `peer` came up: proofs are sent again on it (the peer moves those it still
    /// has to the back, so both records stay in step).
    pub fn link_up(&self, peer: &PeerId) {
        self.announced.lock().remove(peer);
    }

    /// How a peer's session is judged here: `Ok(Some(take(proof)))` when a key proved its role
    /// (under the lock, so that `take` copies only what its caller needs), `Ok(None)` when none
    /// did and the realm believes claimed roles, `Err` (why) otherwise.
    fn judge<T>(
        &self,
        node: &Node,
        peer: PeerId,
        realm: &str,
        session: u64,
        take: impl FnOnce(&Proven) -> T,
    ) -> Result<Option<T>, &'static str> {
        let taken = {
            let verified = self.verified.lock();
            match verified.get(&peer).and_then(|s| s.get(realm, session)) {
                Some(p) if p.expires_at != 0 && p.expires_at <= crate::confdir::now_secs() => {
                    return Err("the key of its session expired")
                }
                Some(p) => Some(take(p)),
                None => None,
            }
        };
        match taken {
            None if node.policy_for(realm).is_some_and(|p| p.doc.verified_roles) => {
                Err("no proven role for its session")
            }
            taken => Ok(taken),
        }
    }

    /// The role a peer's session acts with here: the proven one (with its proof), else the
    /// claimed one (see [`Proofs::judge`]).
    fn role_of(
        &self,
        node: &Node,
        peer: PeerId,
        realm: &str,
        session: u64,
        claimed: String,
    ) -> Result<(String, Option<Proven>), &'static str> {
        Ok(
            match self.judge(node, peer, realm, session, Proven::clone)? {
                Some(p) => (p.role.clone(), Some(p)),
                None => (claimed, None),
            },
        )
    }

    /// The origin of a forwarded publication or call, with the role its node proved for the
    /// session (see [`Proofs::judge`]; on the path of every forwarded message, so it copies only
    /// the key id and role).
    pub fn origin(
        &self,
        node: &Node,
        peer: PeerId,
        realm: &str,
        o: macula_mesh::Origin,
    ) -> Result<Origin, &'static str> {
        let proven = self.judge(node, peer, realm, o.session, |p| {
            (p.kid.clone(), p.role.clone())
        })?;
        let (authid, authrole) = proven.unwrap_or((o.authid, o.authrole));
        Ok(Origin {
            session: o.session,
            authid,
            authrole,
        })
    }

    /// A peer proves the role of one of its sessions (see the module's documentation); kept
    /// until the peer goes (at most [`MAX_SESSIONS_PER_PEER`] per peer) or the key no longer
    /// stands here.
    #[allow(clippy::too_many_arguments)]
    pub fn on_session(
        &self,
        node: &Node,
        mesh: &MeshState,
        peer: PeerId,
        realm: &str,
        session: u64,
        public: &str,
        nonce: &[u8],
        sig: &[u8],
    ) {
        let now = crate::confdir::now_secs();
        let proof = match public.strip_prefix("workload:") {
            Some(replica) => workload_proof(node, &peer, realm, replica),
            None => key_proof(node, &peer, realm, public, nonce, sig, now),
        };
        let proof = match proof {
            Ok(p) => p,
            Err(why) => return rejected(mesh, &peer, "session", why),
        };
        // Judged under the lock `recheck` takes, against the credentials in force then: a
        // revocation installed meanwhile either is seen here or drops the proof after.
        let mut verified = self.verified.lock();
        if let Err(why) = proof.stands(node, realm, now) {
            return rejected(mesh, &peer, "session", why);
        }
        verified
            .entry(peer)
            .or_default()
            .put(Arc::from(realm), session, proof);
    }

    /// An interest or registration `peer` announced: `by` (session, claimed role) holds it, or
    /// `None` if no session of the peer does any more. Held if the session's role may subscribe
    /// or register there and the peer is within its limits; otherwise (or when withdrawn)
    /// dropped. `link` gives the realm and the peer's link member there, made only for a hold.
    #[allow(clippy::too_many_arguments)]
    pub fn announce(
        &self,
        node: &Node,
        mesh: &MeshState,
        peer: PeerId,
        key: HoldKey,
        invoke: InvokePolicy,
        by: Option<(u64, String)>,
        link: impl FnOnce() -> Option<(Arc<RealmHandle>, Id)>,
    ) {
        // Holds, then the realm: the order `recheck` takes them in. Judged under the holds lock
        // against the credentials in force then (see `on_session`).
        let mut holds = self.holds.lock();
        let Some((session, claimed)) = by else {
            withdraw(node, mesh, peer, &key);
            if let Some(m) = holds.get_mut(&peer) {
                m.remove(&key);
            }
            return;
        };
        let held = holds.get(&peer);
        let refused = if held
            .is_some_and(|h| h.holds.len() >= self.limits.holds && !h.holds.contains_key(&key))
        {
            Some(format!(
                "the peer holds {} interests and registrations here already (mesh.max_holds_per_peer)",
                self.limits.holds
            ))
        } else if held.is_some_and(|h| {
            h.realms.len() >= self.limits.realms && !h.realms.contains_key(&key.realm)
        }) {
            Some(format!(
                "the peer holds interest or registrations in {} realms here already (mesh.max_realms_per_peer)",
                self.limits.realms
            ))
        } else {
            None
        };
        let justified = match refused {
            Some(why) => Err(why),
            None => self
                .role_of(node, peer, &key.realm, session, claimed)
                .map_err(str::to_string)
                .and_then(|(role, proof)| {
                    let now = crate::confdir::now_secs();
                    let policy = match &proof {
                        Some(p) => p.stands(node, &key.realm, now)?,
                        None => node
                            .role_admitted(&key.realm, &key.realm, &role)
                            .map_err(|(_, why)| why)?,
                    };
                    if !policy.allows_pattern(&role, key.kind.action(), &key.uri, key.policy) {
                        return Err(format!(
                            "role {role:?} lacks {}",
                            key.kind.action().permission_for(&key.uri)
                        ));
                    }
                    Ok((role, proof))
                }),
        };
        let placed = justified.and_then(|(role, proof)| {
            let (r, l) = link().ok_or_else(|| "the realm is unknown here".to_string())?;
            let res = {
                let mut core = r.lock();
                match key.kind {
                    Kind::Interest => core.link_subscribe(l, &key.uri, key.policy, &role),
                    Kind::Registration => {
                        core.link_register(l, &key.uri, key.policy, invoke, &role)
                    }
                }
            };
            res.map(|()| Held { role, proof })
                .map_err(|e| e.to_string())
        });
        match placed {
            Ok(h) => {
                if let Some(e) = h.proof.as_ref().map(|p| p.expires_at).filter(|e| *e != 0) {
                    let _ =
                        self.next_expiry
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                Some(if n == 0 { e } else { n.min(e) })
                            });
                }
                holds.entry(peer).or_default().insert(key, h);
            }
            Err(why) => {
                // Whatever the peer held for this (URI, match) is no longer justified.
                withdraw(node, mesh, peer, &key);
                if let Some(m) = holds.get_mut(&peer) {
                    m.remove(&key);
                }
                rejected(mesh, &peer, key.kind.as_str(), why);
            }
        }
    }

    /// Drops the proofs and withdraws the holds this node's credentials no longer justify (a
    /// key revoked or expired, an authority replaced, a role or permission removed,
    /// `verified_roles` switched on, a realm gone). Called after every change of credentials.
    pub fn recheck(&self, node: &Node, mesh: &MeshState) {
        let now = crate::confdir::now_secs();
        // Judged once per (realm, key or claimed role), not per proof or hold: what a proof
        // stands on is its key's (kid, realm, authority, expiry, role).
        let mut judged: HashMap<(Arc<str>, String, bool), Option<Arc<Policy>>> = HashMap::new();
        for proofs in self.verified.lock().values_mut() {
            proofs.retain(|realm, p| {
                judged
                    .entry((Arc::from(realm), p.kid.clone(), true))
                    .or_insert_with(|| p.stands(node, realm, now).ok())
                    .is_some()
            });
        }
        let mut next = 0u64;
        let mut holds = self.holds.lock();
        for (peer, held) in holds.iter_mut() {
            let gone: Vec<HoldKey> = held
                .holds
                .iter()
                .filter_map(|(key, h)| {
                    let who = match &h.proof {
                        Some(p) => (key.realm.clone(), p.kid.clone(), true),
                        None => (key.realm.clone(), h.role.clone(), false),
                    };
                    let policy = judged
                        .entry(who)
                        .or_insert_with(|| match &h.proof {
                            Some(p) => p.stands(node, &key.realm, now).ok(),
                            None => node
                                .role_admitted(&key.realm, &key.realm, &h.role)
                                .ok()
                                .filter(|p| !p.doc.verified_roles),
                        })
                        .clone();
                    let stands = policy.is_some_and(|p| {
                        p.allows_pattern(&h.role, key.kind.action(), &key.uri, key.policy)
                    });
                    if stands {
                        if let Some(e) = h.proof.as_ref().map(|p| p.expires_at).filter(|e| *e != 0)
                        {
                            next = if next == 0 { e } else { next.min(e) };
                        }
                        return None;
                    }
                    Some(key.clone())
                })
                .collect();
            for key in gone {
                tracing::info!(%peer, realm = %key.realm, uri = key.uri, "a peer's {} withdrawn: its session's key or role no longer stands", key.kind.as_str());
                withdraw(node, mesh, *peer, &key);
                held.remove(&key);
            }
        }
        self.next_expiry.store(next, Ordering::Relaxed);
    }

    /// Withdraws the holds whose proving key has expired (called once a second; does nothing
    /// before the earliest expiry).
    pub fn expire(&self, node: &Node, mesh: &MeshState, now: u64) {
        let next = self.next_expiry.load(Ordering::Relaxed);
        if next != 0 && next <= now {
            self.recheck(node, mesh);
        }
    }
}

/// Takes back what `peer`'s link holds for `key` in the realm, if the realm and the link exist.
fn withdraw(node: &Node, mesh: &MeshState, peer: PeerId, key: &HoldKey) {
    let (Some(r), Some(link)) = (
        node.realm_handle(&key.realm),
        mesh.link_id(&key.realm, peer),
    ) else {
        return;
    };
    let mut core = r.lock();
    match key.kind {
        Kind::Interest => core.link_unsubscribe(link, &key.uri, key.policy),
        Kind::Registration => core.link_unregister(link, &key.uri, key.policy),
    }
}

/// The proof of a session of an API key: its public form, and its holder's signature over the
/// session digest naming `peer` and `realm`.
fn key_proof(
    node: &Node,
    peer: &PeerId,
    realm: &str,
    public: &str,
    nonce: &[u8],
    sig: &[u8],
    now: u64,
) -> Result<Proven, String> {
    use macula_router::auth::credential;
    let v = credential::verify_public(public, node.auth().authenticator.operator(), now)
        .map_err(|e| e.to_string())?;
    let nonce = <[u8; 32]>::try_from(nonce).map_err(|_| "a nonce of 32 bytes is expected")?;
    let digest = credential::session_digest(&peer.to_bytes(), realm, &nonce);
    if !credential::verify_session_proof(&v.claims, &digest, sig) {
        return Err("the proof was not made by the key's holder for this node and realm".into());
    }
    if !macula_wamp::uri::is_same_or_subrealm(realm, &v.claims.realm) {
        return Err("the key is for another realm".into());
    }
    Ok(Proven {
        kid: v.claims.kid,
        role: v.claims.role,
        key_realm: v.claims.realm,
        authority: v.authority.authority,
        expires_at: [v.claims.expires_at, v.authority.expires_at]
            .into_iter()
            .filter(|e| *e != 0)
            .min()
            .unwrap_or(0),
    })
}

/// The proof of a workload replica's session (`workload:<name>/<replica>`) that `peer` runs:
/// the role is the one the realm's deploy record names for the workload (this node's own copy,
/// accepted only from a key that may deploy), never the peer's word; the replica must be one the
/// record asks for, and the peer a node that may serve the realm. What a lying node can do with
/// it: claim a session of a workload of a realm it may serve, in the role its deployer gave it.
fn workload_proof(
    node: &Node,
    peer: &PeerId,
    realm: &str,
    replica: &str,
) -> Result<Proven, String> {
    let (name, index) = replica
        .rsplit_once('/')
        .and_then(|(n, i)| Some((n, i.parse::<u32>().ok()?)))
        .ok_or("not a workload replica")?;
    if node.peer_may_serve(realm, &peer.to_string()) != Some(true) {
        return Err("the peer may not serve the realm".into());
    }
    let text = node
        .workloads
        .records
        .lock()
        .get(realm, name)
        .and_then(|r| r.manifest.clone())
        .ok_or_else(|| format!("no workload {name} in {realm} here"))?;
    let m = macula_workloads::parse(&text).map_err(|e| e.to_string())?;
    if index >= macula_workloads::wire::slots_of(&m) {
        return Err(format!("{name} has no replica {index}"));
    }
    let auth = node.auth();
    let authority = auth
        .registration_of(realm)
        .and_then(|r| auth.authorities.get(r))
        .copied()
        .ok_or("the realm's registration is not known here")?;
    Ok(Proven {
        kid: crate::workloads::tickets::authid(name, index),
        role: m.workload().role.clone(),
        key_realm: realm.to_owned(),
        authority,
        expires_at: 0,
    })
}
