//! Proven roles: what another node's sessions may do here, as their keys prove it.
//!
//! A node forwards its sessions' publications, calls, interest and registrations under the
//! session's id and role. The receiving node does not take the role on the sender's word:
//! before the first frame that names a session, the sender sends the public form of the
//! session's key ([`Frame::Session`]); the receiver verifies it like a key at a join (operator
//! and authority signatures, expiry, revocation, the realm's current authorities) and from then
//! on uses the role the key proves, whatever the frames claim. Without a proof (a key of version
//! 1) the claimed role stands, unless the realm requires proofs (`verified_roles`).
//!
//! Interest and registrations are *held* for a peer: each names the session that justifies it.
//! The hold is checked when it is announced (the role may subscribe or register there) and again
//! whenever this node's credentials change (a revocation, a deleted role, `verified_roles`
//! switched on) and when the proving key expires; a hold no longer justified is withdrawn, as
//! the sender would have withdrawn it had it closed the session.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use macula_mesh::{Frame, MeshHandle, Peer as PeerId};
use macula_router::dealer::InvokePolicy;
use macula_router::Origin;
use macula_wamp::uri::MatchPolicy;
use macula_wamp::Id;
use parking_lot::Mutex;

use crate::mesh::NodePeer;
use crate::mesh::{rejected, MeshState};
use crate::node::{AuthState, Node, RealmHandle};

/// Sessions per peer whose proven role a node keeps (and announces) at once.
const MAX_SESSIONS_PER_PEER: usize = 65_536;

/// The newest [`MAX_SESSIONS_PER_PEER`] sessions of one peer, each with its realm, the oldest
/// evicted first. A node's record of what it announced to a peer and the peer's record of the
/// proofs see the same `Session` frames in the same order (the peer keeps only those it
/// verified, so never more): the peer never forgets a proof the node still counts as sent.
/// Keyed by session id alone (random 53-bit ids: two realms' sessions sharing one are not
/// expected; if they did, the second would simply go unproven), so a lookup allocates nothing.
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

    /// Inserts (a known session keeps its place); `false` if it was there.
    fn insert(&mut self, realm: Arc<str>, session: u64, v: V) -> bool {
        if self.map.contains_key(&session) {
            return false;
        }
        self.map.insert(session, (realm, v));
        self.order.push_back(session);
        if self.order.len() > MAX_SESSIONS_PER_PEER {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        true
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
    /// The authority that issued the key (still one of the realm's?).
    authority: [u8; 32],
    /// When the key (or its authority's certificate) expires; 0: never.
    expires_at: u64,
}

impl Proven {
    /// Whether the key still stands here: not revoked, its authority still the realm's, not
    /// expired.
    fn holds(&self, auth: &AuthState, realm: &str, now: u64) -> bool {
        !auth.authenticator.is_revoked(&self.kid)
            && auth.accepts(realm, &self.authority)
            && (self.expires_at == 0 || self.expires_at > now)
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

/// Proofs sent and received, and the holds they justify.
pub struct Proofs {
    /// Per peer, its sessions whose role it proved.
    verified: Mutex<HashMap<PeerId, Recent<Proven>>>,
    /// Per peer, the (realm, session)s whose key's public form this node sent it.
    pub(crate) announced: Arc<Mutex<HashMap<PeerId, Recent<()>>>>,
    /// Per peer, the interest and registrations it holds here.
    holds: Mutex<HashMap<PeerId, HashMap<HoldKey, Held>>>,
    /// The earliest expiry of a proof behind a hold (0: none known), for
    /// [`Proofs::expire`].
    next_expiry: AtomicU64,
    /// `mesh.max_holds_per_peer`.
    max_holds: usize,
}

/// Sends the public form of session `session`'s key to `peer` before the first frame that names
/// the session (under the lock, so that frames leave in the order they are recorded).
pub fn send_proof(
    announced: &Mutex<HashMap<PeerId, Recent<()>>>,
    mesh: &MeshHandle,
    peer: &PeerId,
    realm: &Arc<str>,
    session: u64,
    public: Option<&Arc<str>>,
) {
    let Some(public) = public else { return };
    let mut a = announced.lock();
    if a.entry(*peer)
        .or_default()
        .insert(realm.clone(), session, ())
    {
        mesh.send(
            peer,
            &Frame::Session {
                realm: realm.to_string(),
                session,
                public: public.to_string(),
            },
        );
    }
}

impl Proofs {
    pub fn new(max_holds: usize) -> Proofs {
        Proofs {
            verified: Default::default(),
            announced: Default::default(),
            holds: Default::default(),
            next_expiry: AtomicU64::new(0),
            max_holds,
        }
    }

    /// `peer` is gone: its proofs and holds go with its links.
    pub fn forget(&self, peer: &PeerId) {
        self.verified.lock().remove(peer);
        self.announced.lock().remove(peer);
        self.holds.lock().remove(peer);
    }

    /// The role a peer's session acts with here: the proven one (with its proof), else the
    /// claimed one unless the realm requires proofs. `Err` says why not.
    fn role_of(
        &self,
        node: &Node,
        peer: PeerId,
        realm: &str,
        session: u64,
        claimed: String,
    ) -> Result<(String, Option<Proven>), &'static str> {
        let proof = self
            .verified
            .lock()
            .get(&peer)
            .and_then(|s| s.get(realm, session).cloned());
        match proof {
            Some(p) if p.expires_at != 0 && p.expires_at <= crate::confdir::now_secs() => {
                Err("the key of its session expired")
            }
            Some(p) => Ok((p.role.clone(), Some(p))),
            None if node.policy_for(realm).is_some_and(|p| p.doc.verified_roles) => {
                Err("no proven role for its session")
            }
            None => Ok((claimed, None)),
        }
    }

    /// The origin of a forwarded publication or call, with the role its node proved for the
    /// session (see [`Proofs::role_of`]).
    pub fn origin(
        &self,
        node: &Node,
        peer: PeerId,
        realm: &str,
        o: macula_mesh::Origin,
    ) -> Result<Origin, &'static str> {
        let (role, proof) = self.role_of(node, peer, realm, o.session, o.authrole)?;
        Ok(Origin {
            session: o.session,
            authid: proof.map_or(o.authid, |p| p.kid),
            authrole: role,
        })
    }

    /// A peer proves the role of one of its sessions with its key's public form: checked like
    /// a key at a session's join, then kept until the peer goes (at most
    /// [`MAX_SESSIONS_PER_PEER`] per peer) or the key no longer stands here.
    pub fn on_session(
        &self,
        node: &Node,
        mesh: &MeshState,
        peer: PeerId,
        realm: &str,
        session: u64,
        public: &str,
    ) {
        let auth = node.auth();
        let now = crate::confdir::now_secs();
        let v = match macula_router::auth::credential::verify_public(
            public,
            auth.authenticator.operator(),
            now,
        ) {
            Ok(v) => v,
            Err(e) => return rejected(mesh, &peer, "session", e),
        };
        let proof = Proven {
            kid: v.claims.kid,
            role: v.claims.role,
            authority: v.authority.authority,
            expires_at: [v.claims.expires_at, v.authority.expires_at]
                .into_iter()
                .filter(|e| *e != 0)
                .min()
                .unwrap_or(0),
        };
        if !proof.holds(&auth, realm, now)
            || !macula_wamp::uri::is_same_or_subrealm(realm, &v.claims.realm)
        {
            return rejected(
                mesh,
                &peer,
                "session",
                "the key does not belong to the realm",
            );
        }
        self.verified
            .lock()
            .entry(peer)
            .or_default()
            .insert(Arc::from(realm), session, proof);
    }

    /// An interest or registration `peer` announced for its link `link` in `r`: `by` (session,
    /// claimed role) holds it, or `None` if no session of the peer does any more. Held if the
    /// session's role may subscribe or register there; otherwise (or when withdrawn) dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn announce(
        &self,
        node: &Node,
        mesh: &MeshState,
        peer: PeerId,
        r: &RealmHandle,
        link: Id,
        key: HoldKey,
        invoke: InvokePolicy,
        by: Option<(u64, String)>,
    ) {
        let justified =
            by.map(|(session, claimed)| self.role_of(node, peer, &key.realm, session, claimed));
        // Holds, then the realm: the order `recheck` takes them in.
        let mut holds = self.holds.lock();
        let mut core = r.lock();
        let full = justified.is_some()
            && holds
                .get(&peer)
                .is_some_and(|h| h.len() >= self.max_holds && !h.contains_key(&key));
        let held = match justified {
            None => Err(None),
            Some(_) if full => Err(Some(format!(
                "the peer holds {} interests and registrations here already \
                 (mesh.max_holds_per_peer)",
                self.max_holds
            ))),
            Some(Err(why)) => Err(Some(why.to_string())),
            Some(Ok((role, proof))) => {
                let res = match key.kind {
                    Kind::Interest => core.link_subscribe(link, &key.uri, key.policy, &role),
                    Kind::Registration => {
                        core.link_register(link, &key.uri, key.policy, invoke, &role)
                    }
                };
                res.map(|()| Held { role, proof })
                    .map_err(|e| Some(e.to_string()))
            }
        };
        match held {
            Ok(h) => {
                if let Some(e) = h.proof.as_ref().map(|p| p.expires_at).filter(|e| *e != 0) {
                    self.next_expiry
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some(if n == 0 { e } else { n.min(e) })
                        })
                        .ok();
                }
                holds.entry(peer).or_default().insert(key, h);
            }
            Err(why) => {
                withdraw(&mut core, link, &key);
                if let Some(m) = holds.get_mut(&peer) {
                    m.remove(&key);
                }
                if let Some(why) = why {
                    rejected(mesh, &peer, key.kind.as_str(), why);
                }
            }
        }
    }

    /// Drops the proofs and withdraws the holds this node's credentials no longer justify (a
    /// key revoked or expired, an authority replaced, a role deleted, `verified_roles` switched
    /// on, a realm gone). Called after every change of credentials.
    pub fn recheck(&self, node: &Node, mesh: &MeshState) {
        let auth = node.auth();
        let now = crate::confdir::now_secs();
        for proofs in self.verified.lock().values_mut() {
            proofs.retain(|realm, p| p.holds(&auth, realm, now));
        }
        let mut next = 0u64;
        let mut holds = self.holds.lock();
        for (peer, held) in holds.iter_mut() {
            held.retain(|key, h| {
                let policy = node.policy_for(&key.realm);
                let stands = policy.is_some_and(|p| {
                    !p.doc.deleted
                        && p.has_role(&h.role)
                        && (p.realm() == &*key.realm || p.role_covers_subrealms(&h.role))
                        && match &h.proof {
                            Some(proof) => proof.holds(&auth, &key.realm, now),
                            None => !p.doc.verified_roles,
                        }
                });
                if stands {
                    if let Some(e) = h.proof.as_ref().map(|p| p.expires_at).filter(|e| *e != 0) {
                        next = if next == 0 { e } else { next.min(e) };
                    }
                    return true;
                }
                tracing::info!(%peer, realm = %key.realm, uri = key.uri, "a peer's hold withdrawn: its session's key or role no longer stands");
                if let (Some(r), Some(link)) = (
                    node.realm_handle(&key.realm),
                    mesh.link_id(&key.realm, *peer),
                ) {
                    withdraw(&mut r.lock(), link, key);
                }
                false
            });
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

fn withdraw(core: &mut macula_router::Realm<NodePeer>, link: Id, key: &HoldKey) {
    match key.kind {
        Kind::Interest => core.link_unsubscribe(link, &key.uri, key.policy),
        Kind::Registration => core.link_unregister(link, &key.uri, key.policy),
    }
}
