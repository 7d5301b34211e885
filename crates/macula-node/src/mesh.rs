//! The node's side of the mesh: what inter-node frames mean for realms.
//!
//! - Every realm this node hosts gets an announcer: when the first local session subscribes to a
//!   (URI, match) or registers a procedure, an `Interest`/`Registration` frame goes to every peer;
//!   the last one leaving withdraws it. A peer that connects receives the whole table.
//! - On the receiving node, a *link member* per (realm, peer) holds that interest in the broker
//!   and those registrations in the dealer ([`macula_router::Realm::join_link`]). A local
//!   publication is therefore forwarded once to each node with matching interest and nowhere
//!   else; a call goes to a node that has a callee, in one hop.
//! - Realm states (policy, roles, revoked keys) are signed by the realm's authority and flooded:
//!   a node accepts a state only if the authority's certificate chains to its operator key, and
//!   the highest sequence number wins. This is how a revocation made at one node reaches all.
//! - A peer that goes away takes its links with it: its interest and registrations vanish and
//!   calls in flight to it fail with `wamp.error.canceled` at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use macula_mesh::{encode_routed, Frame, MeshEvent, MeshHandle, Peer as PeerId, Routed};
use macula_router::auth::credential::SignedCert;
use macula_router::dealer::InvokePolicy;
use macula_router::policy::Policy;
use macula_router::{Announce, Forwarded, Holder, Peer};
use macula_wamp::uri::MatchPolicy;
use macula_wamp::{Id, Message, Serializer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::node::{Node, RealmHandle};
use crate::outbox::Gate;
use crate::outbox::{SessionPeer, Staging};
use crate::proven::{HoldKey, Kind};

/// Who a realm member is: a client session (its outbox) or another node (a mesh link).
#[derive(Clone)]
pub enum NodePeer {
    Session(SessionPeer),
    Link(LinkPeer),
    /// The node's own services (`macula.dht.*`), registered in every realm like a link so that
    /// calls reach them through the dealer with the usual ACL check.
    Service(ServicePeer),
}

impl Peer for NodePeer {
    fn send(&self, msg: Arc<Message>) {
        match self {
            NodePeer::Session(s) => s.send(msg),
            NodePeer::Link(l) => l.reply(&msg),
            NodePeer::Service(_) => {}
        }
    }

    fn forward(&self, f: Forwarded<'_>) {
        match self {
            NodePeer::Link(l) => l.forward(f),
            NodePeer::Service(s) => s.invoke(f),
            NodePeer::Session(_) => {}
        }
    }
}

/// A realm's end of the link to one peer node.
#[derive(Clone)]
pub struct LinkPeer {
    peer: PeerId,
    realm: Arc<str>,
    mesh: MeshHandle,
    /// Per peer, the (realm, session)s whose key's public form this node sent it
    /// ([`Frame::Session`]); shared by the node's links.
    announced: Arc<Mutex<HashMap<PeerId, crate::proven::Recent<()>>>>,
}

/// The originating session as the frame header carries it.
fn origin(i: &macula_router::SessionInfo) -> (u64, &str, &str) {
    (i.id, i.authid.as_str(), i.authrole.as_str())
}

impl LinkPeer {
    /// Writes the frame straight into one buffer: header, then the MessagePack WAMP message.
    fn send_routed(&self, kind: Routed, origin: (u64, &str, &str), msg: &Message) {
        let mut out = Vec::with_capacity(128);
        encode_routed(&mut out, kind, &self.realm, origin, |out| {
            Serializer::MsgPack.encode_into(msg, out)
        });
        self.mesh.send_encoded(&self.peer, Bytes::from(out));
    }

    fn reply(&self, msg: &Message) {
        self.send_routed(Routed::Reply, (0, "", ""), msg);
    }

    fn forward(&self, f: Forwarded<'_>) {
        let (Forwarded::Publication { origin: o, .. } | Forwarded::Call { origin: o, .. }) = &f;
        crate::proven::send_proof(
            &self.announced,
            &self.mesh,
            &self.peer,
            &self.realm,
            o.id,
            o.proof.as_ref(),
        );
        match f {
            Forwarded::Publication {
                publication,
                topic,
                options,
                payload,
                origin: o,
            } => self.send_routed(
                Routed::Publish,
                origin(o),
                &Message::Publish {
                    request: publication,
                    options: options.clone(),
                    topic: topic.to_owned(),
                    payload: payload.clone(),
                },
            ),
            Forwarded::Call {
                invocation,
                procedure,
                options,
                payload,
                origin: o,
            } => self.send_routed(
                Routed::Call,
                origin(o),
                &Message::Call {
                    request: invocation,
                    options,
                    procedure: procedure.to_owned(),
                    payload,
                },
            ),
        }
    }
}

/// A realm's policy as signed by its authority: what nodes flood to each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RealmState {
    pub realm: String,
    /// Higher wins: the policy's (generation, version) ([`Policy::seq`]), counters, not clocks.
    pub seq: u64,
    pub policy: String,
    /// The operator's certificate of the realm's own authority, which signs the state. A
    /// parent's authority cannot: whoever registers `com.acme` must not be able to rewrite the
    /// state of `com.acme.shop`, owned by someone else.
    pub cert: String,
    pub sig: Vec<u8>,
}

impl RealmState {
    fn signed_part(&self) -> Vec<u8> {
        let mut out = b"macula-realm-state/v1:".to_vec();
        let _ =
            rmp_serde::encode::write(&mut out, &(&self.realm, self.seq, &self.policy, &self.cert));
        out
    }

    pub fn sign(
        realm: &str,
        seq: u64,
        policy: String,
        cert: &SignedCert,
        key: &SigningKey,
    ) -> RealmState {
        let mut s = RealmState {
            realm: realm.into(),
            seq,
            policy,
            cert: cert.to_text(),
            sig: vec![],
        };
        s.sig = key.sign(&s.signed_part()).to_bytes().to_vec();
        s
    }

    /// Checks the chain operator → authority → state and parses the policy.
    pub fn verify(&self, operator: &ed25519_dalek::VerifyingKey) -> Result<Policy, String> {
        let cert = SignedCert::from_text(&self.cert).map_err(|e| e.to_string())?;
        let auth = cert
            .verify(operator, crate::confdir::now_secs())
            .map_err(|e| e.to_string())?;
        if self.realm != auth.realm {
            return Err(format!(
                "the authority of {} cannot sign the state of {}: only the realm's own authority can",
                auth.realm, self.realm
            ));
        }
        let vk =
            ed25519_dalek::VerifyingKey::from_bytes(&auth.authority).map_err(|e| e.to_string())?;
        let sig = Signature::from_slice(&self.sig).map_err(|e| e.to_string())?;
        vk.verify(&self.signed_part(), &sig)
            .map_err(|_| "bad signature".to_string())?;
        let p = Policy::from_yaml(&self.policy).map_err(|e| e.to_string())?;
        if p.realm() != self.realm {
            return Err(format!("policy declares realm {}", p.realm()));
        }
        if p.seq() != self.seq {
            return Err(format!(
                "the state's sequence {} is not its policy's (generation {}, version {})",
                self.seq, p.doc.generation, p.doc.version
            ));
        }
        Ok(p)
    }

    /// The public key of the authority that signed the state (the realm's own).
    pub fn authority(&self) -> Option<[u8; 32]> {
        let cert = SignedCert::from_text(&self.cert).ok()?;
        let c: macula_router::auth::AuthorityCert = rmp_serde::from_slice(&cert.cert).ok()?;
        Some(c.authority)
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(rmp_serde::to_vec(self).unwrap_or_default())
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct MeshCounters {
    /// Forwarded messages refused by this node's ACL or validation.
    pub rejected: AtomicU64,
    /// Frames for realms this node has no policy for.
    pub unknown_realm: AtomicU64,
    /// Realm states refused (bad signature or chain).
    pub states_rejected: AtomicU64,
    pub states_applied: AtomicU64,
}

/// The mesh as the node sees it.
pub struct MeshState {
    pub handle: MeshHandle,
    /// This node's peer id as bytes: what its sessions' proofs name.
    pub peer_bytes: Vec<u8>,
    pub counters: MeshCounters,
    links: Mutex<HashMap<(String, PeerId), Id>>,
    /// Signed realm states known to this node (its own and learned), by realm.
    pub states: Mutex<HashMap<String, RealmState>>,
    /// Usage reports sent to the billing node, awaiting its acknowledgement.
    usage_acks: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Option<String>>>>,
    /// The node hosting the billing aggregator, once found.
    billing_peer: Mutex<Option<PeerId>>,
    /// When no billing node was found: when to look again, and the backoff (a mesh without a
    /// registry must not look it up every flush).
    billing_miss: Mutex<Option<(Instant, Duration)>>,
    /// Woken whenever a peer comes up (for waiting on a link).
    peer_up: tokio::sync::Notify,
    /// Barriers sent after an announcement: the realm peers that have not acknowledged yet, and
    /// the gate that opens when all have (or the wait ends).
    barriers: Mutex<HashMap<u64, Barrier>>,
    next_barrier: std::sync::atomic::AtomicU64,
    /// Longest wait for the acknowledgements.
    barrier_timeout: Duration,
    /// Certificate renewal and node revocations (see [`crate::trust`]).
    pub trust_upkeep: crate::trust::Upkeep,
    /// Realms this node just started serving, until it has found and linked the realm's other
    /// nodes (see [`MeshState::start_discovery`]).
    discovery: Mutex<HashMap<String, Arc<Gate>>>,
    /// Realms whose known state is a tombstone, and when it was made (see
    /// [`MeshState::collect_tombstones`]).
    tombstones: Mutex<HashMap<String, u64>>,
    /// `mesh.tombstone_retention_s`.
    tombstone_retention: u64,
    /// Roles proved by peers and sent to them, and the interest and registrations peers hold
    /// here (see [`crate::proven`]).
    pub proofs: crate::proven::Proofs,
    /// When this node last had a certified peer.
    last_linked: Mutex<Instant>,
}

/// The peers a barrier still waits for, and the gate it opens.
type Barrier = (std::collections::HashSet<PeerId>, Arc<Gate>);

thread_local! {
    /// While a session's SUBSCRIBE, REGISTER (or their undoing) is handled: the gates of the
    /// announcements it caused (the session's outbox holds its answer until they open). `None`
    /// otherwise: announcements made elsewhere (a session leaving) need no barrier at all.
    static GATES: std::cell::RefCell<Option<Vec<Arc<Gate>>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (which handles a client's message under its realm's lock) and returns the gates of
/// the announcements it made.
pub fn collect_gates<T>(f: impl FnOnce() -> T) -> (T, Vec<Arc<Gate>>) {
    GATES.with(|g| *g.borrow_mut() = Some(Vec::new()));
    let out = f();
    let gates = GATES.with(|g| g.borrow_mut().take()).unwrap_or_default();
    (out, gates)
}

impl MeshState {
    pub fn new(handle: MeshHandle, cfg: &crate::config::MeshSection) -> Arc<MeshState> {
        Arc::new(MeshState {
            peer_bytes: handle.peer_id().to_bytes(),
            handle,
            counters: MeshCounters::default(),
            links: Mutex::new(HashMap::new()),
            states: Mutex::new(HashMap::new()),
            usage_acks: Mutex::new(HashMap::new()),
            billing_peer: Mutex::new(None),
            billing_miss: Mutex::new(None),
            peer_up: tokio::sync::Notify::new(),
            barriers: Mutex::new(HashMap::new()),
            next_barrier: std::sync::atomic::AtomicU64::new(1),
            barrier_timeout: Duration::from_secs(2),
            trust_upkeep: Default::default(),
            discovery: Mutex::new(HashMap::new()),
            tombstones: Mutex::new(HashMap::new()),
            tombstone_retention: cfg.tombstone_retention_s,
            proofs: crate::proven::Proofs::new(crate::proven::HoldLimits {
                holds: cfg.max_holds_per_peer,
                realms: cfg.max_realms_per_peer,
            }),
            last_linked: Mutex::new(Instant::now()),
        })
    }

    /// Forgets tombstones learned from the mesh once `mesh.tombstone_retention_s` has passed.
    /// The tombstones of this node's own config directory (the registry's, where it runs) are
    /// kept: they are the record that answers an old state of a deleted registration if one
    /// ever comes back (a node sent an older state than it holds gets the newer one back).
    /// A node that had no certified peer for longer than the retention forgets every state it
    /// learned from the mesh. Returns whether anything was forgotten (the caller then rebuilds
    /// the node's credentials).
    pub fn collect_tombstones(&self, node: &Node, now: u64) -> bool {
        let retention = self.tombstone_retention;
        let local: std::collections::HashSet<String> = node
            .confdir
            .as_ref()
            .and_then(|d| d.realms().ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let old: Vec<String> = self
            .tombstones
            .lock()
            .iter()
            .filter(|(r, at)| at.saturating_add(retention) <= now && !local.contains(*r))
            .map(|(r, _)| r.clone())
            .collect();
        let mut changed = false;
        for realm in old {
            // Under both locks, and only if the state is still that tombstone (a registration
            // of the name may have arrived since).
            let mut states = self.states.lock();
            let mut tombstones = self.tombstones.lock();
            if tombstones
                .get(&realm)
                .is_some_and(|at| at.saturating_add(retention) <= now)
            {
                tombstones.remove(&realm);
                states.remove(&realm);
                changed = true;
                tracing::info!(realm, "tombstone collected");
            }
        }
        if !self.handle.peers().is_empty() {
            *self.last_linked.lock() = Instant::now();
        } else if self.last_linked.lock().elapsed() > Duration::from_secs(retention) {
            let mut states = self.states.lock();
            let before = states.len();
            states.retain(|r, _| local.contains(r));
            if states.len() < before {
                tracing::warn!(
                    forgotten = before - states.len(),
                    "no mesh peer for longer than mesh.tombstone_retention_s: realm states learned from the mesh are forgotten until peers send them again"
                );
                changed = true;
            }
            *self.last_linked.lock() = Instant::now();
        }
        changed
    }

    /// This node starts serving `realm`: it announces itself as a provider, looks the realm's
    /// other nodes up once that is stored, links to each and waits until each has answered a
    /// barrier (so it has sent what it held: interest, registrations). Until then, or for at
    /// most `barrier_timeout`, [`MeshState::discovery_gate`] holds the realm's first sessions'
    /// WELCOME and the answers to their subscriptions and registrations: what a client is
    /// told then holds for nodes this one had not linked yet (a fresh mesh).
    pub fn start_discovery(self: &Arc<Self>, realm: &str) {
        let gate = Arc::new(Gate::default());
        self.discovery.lock().insert(realm.to_owned(), gate.clone());
        let me = self.clone();
        let realm = realm.to_owned();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(me.barrier_timeout, me.discover(&realm)).await;
            gate.open();
            let mut d = me.discovery.lock();
            if d.get(&realm).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
                d.remove(&realm);
            }
        });
    }

    async fn discover(self: &Arc<Self>, realm: &str) {
        // A node that is still joining the mesh (bootstrap nodes configured, none linked yet)
        // would find no one: first wait until it is linked to one.
        if !self.handle.config().bootstrap.is_empty() {
            self.until_linked(|linked| !linked.is_empty()).await;
        }
        let local = self.handle.peer_id();
        let found: std::collections::HashSet<PeerId> = self
            .handle
            .discover(realm)
            .await
            .into_iter()
            .filter(|p| *p != local)
            .collect();
        for p in &found {
            self.handle.want(*p);
        }
        self.until_linked(|linked| found.is_subset(linked)).await;
        if let Some(g) = self.barrier_to(found) {
            g.wait().await;
        }
    }

    /// Resolves once the set of linked peers satisfies `done` (checked at each link-up).
    async fn until_linked(&self, done: impl Fn(&std::collections::HashSet<PeerId>) -> bool) {
        loop {
            let up = self.peer_up.notified();
            if done(&self.handle.peers().into_iter().collect()) {
                return;
            }
            up.await;
        }
    }

    /// The gate of a realm whose discovery is under way, if any.
    pub fn discovery_gate(&self, realm: &str) -> Option<Arc<Gate>> {
        self.discovery
            .lock()
            .get(realm)
            .filter(|g| !g.is_open())
            .cloned()
    }

    /// After an announcement (broadcast to every certified peer, any of which may hold the
    /// realm's publishers or callers): a barrier to each of them, and the gate that opens once
    /// all have applied the announcement — or after `barrier_timeout`: a peer that does not
    /// answer in time is treated as gone.
    fn barrier(self: &Arc<Self>) -> Option<Arc<Gate>> {
        self.barrier_to(self.handle.peers().into_iter().collect())
    }

    /// A barrier to `peers` (see [`MeshState::barrier`]).
    fn barrier_to(self: &Arc<Self>, peers: std::collections::HashSet<PeerId>) -> Option<Arc<Gate>> {
        if peers.is_empty() {
            return None;
        }
        let id = self.next_barrier.fetch_add(1, Ordering::Relaxed);
        let gate = Arc::new(Gate::default());
        // Recorded before anything is sent: an answer can come back at once.
        self.barriers
            .lock()
            .insert(id, (peers.clone(), gate.clone()));
        for p in &peers {
            self.handle.send(p, &Frame::Barrier { id });
        }
        let weak = Arc::downgrade(self);
        let timeout = self.barrier_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(m) = weak.upgrade() {
                if let Some((_, g)) = m.barriers.lock().remove(&id) {
                    g.open();
                }
            }
        });
        Some(gate)
    }

    /// `peer` acknowledged barrier `id` (or is gone: `id` None clears it from every barrier).
    fn barrier_done(&self, peer: PeerId, id: Option<u64>) {
        let mut b = self.barriers.lock();
        let ids: Vec<u64> = match id {
            Some(i) => vec![i],
            None => b.keys().copied().collect(),
        };
        for i in ids {
            let done = match b.get_mut(&i) {
                Some((waiting, _)) => {
                    waiting.remove(&peer);
                    waiting.is_empty()
                }
                None => false,
            };
            if done {
                if let Some((_, g)) = b.remove(&i) {
                    g.open();
                }
            }
        }
    }

    /// The announcer installed in every realm: local interest changes go to every peer.
    pub fn announcer(self: &Arc<Self>) -> macula_router::Announcer {
        let weak: Weak<MeshState> = Arc::downgrade(self);
        Arc::new(move |realm, a| {
            if let Some(m) = weak.upgrade() {
                m.send_announce(realm, a, &m.handle.peers());
                // The client is told (SUBSCRIBED, REGISTERED, ...) once the realm's other nodes
                // have applied this.
                let collecting = GATES.with(|g| g.borrow().is_some());
                if collecting {
                    // ...and, while this node is still finding the realm's other nodes, once
                    // it has linked them (they get the interest when the link comes up).
                    let gates = m.barrier().into_iter().chain(m.discovery_gate(realm));
                    GATES.with(|g| {
                        if let Some(v) = g.borrow_mut().as_mut() {
                            v.extend(gates)
                        }
                    });
                }
            }
        })
    }

    /// Number of link members (remote nodes with interest or registrations in a realm here).
    pub fn link_count(&self) -> usize {
        self.links.lock().len()
    }

    /// The nodes linked with this one in `realm`.
    fn realm_peers(&self, realm: &str) -> Vec<String> {
        self.links
            .lock()
            .keys()
            .filter(|(r, _)| r == realm)
            .map(|(_, p)| p.to_string())
            .take(macula_mesh::MAX_REALM_NODES)
            .collect()
    }

    /// Records `state` if it is newer than what this node has; returns whether it was. A
    /// tombstone older than the retention is taken only to replace an older state of the realm
    /// (an old state came back; the tombstone answers it), not to bring a collected one back.
    pub fn offer_state(&self, state: RealmState) -> bool {
        let mut states = self.states.lock();
        let held = states.get(&state.realm).map(|s| s.seq);
        if held.is_some_and(|seq| seq >= state.seq) {
            return false;
        }
        let deleted = Policy::from_yaml(&state.policy)
            .ok()
            .filter(|p| p.doc.deleted)
            .map(|p| p.doc.deleted_at);
        let mut tombstones = self.tombstones.lock();
        match deleted {
            Some(at) => {
                let now = crate::confdir::now_secs();
                // Tombstones from before `deleted_at` existed count from now.
                let mut at = if at == 0 { now } else { at.min(now) };
                if at.saturating_add(self.tombstone_retention) <= now {
                    if held.is_none() {
                        return false;
                    }
                    // It answers an old state that came back: kept for a retention from now.
                    at = now;
                }
                tombstones.insert(state.realm.clone(), at);
            }
            None => {
                tombstones.remove(&state.realm);
            }
        }
        states.insert(state.realm.clone(), state);
        true
    }
}

/// The frame for an announcement, and the session it names.
fn announce_frame(realm: &str, a: Announce) -> (Frame, Option<Holder>) {
    match a {
        Announce::Interest { uri, policy, by } => (
            Frame::Interest {
                realm: realm.into(),
                uri,
                policy: policy.as_str().into(),
                session: by.as_ref().map_or(0, |b| b.session),
                role: by.as_ref().map(|b| b.role.clone()).unwrap_or_default(),
                add: by.is_some(),
            },
            by,
        ),
        Announce::Registration {
            uri,
            policy,
            invoke,
            by,
        } => (
            Frame::Registration {
                realm: realm.into(),
                uri,
                policy: policy.as_str().into(),
                invoke: invoke.as_str().into(),
                session: by.as_ref().map_or(0, |b| b.session),
                role: by.as_ref().map(|b| b.role.clone()).unwrap_or_default(),
                add: by.is_some(),
            },
            by,
        ),
    }
}

impl MeshState {
    /// Sends an announcement to `peers`, each time after the proof of the session it names.
    fn send_announce(&self, realm: &str, a: Announce, peers: &[PeerId]) {
        let (frame, by) = announce_frame(realm, a);
        let bytes = frame.encode();
        let realm: Arc<str> = Arc::from(realm);
        for p in peers {
            if let Some(h) = &by {
                crate::proven::send_proof(
                    &self.proofs.announced,
                    &self.handle,
                    p,
                    &realm,
                    h.session,
                    h.proof.as_ref(),
                );
            }
            self.handle.send_encoded(p, bytes.clone());
        }
    }

    /// The link member of `peer` in `realm`, if it has one.
    pub fn link_id(&self, realm: &str, peer: PeerId) -> Option<Id> {
        self.links.lock().get(&(realm.to_owned(), peer)).copied()
    }
}

/// Processes mesh events until the mesh stops. Deliveries of a burst of frames are staged and
/// flushed together, as for a client connection.
pub async fn run(node: Arc<Node>, mesh: Arc<MeshState>, mut rx: macula_mesh::MeshEvents) {
    let mut staging = Staging::default();
    while let Some(ev) = rx.recv().await {
        staging.capture(|| handle(&node, &mesh, ev));
        while staging.len() < Staging::LIMIT {
            match rx.try_recv() {
                Some(ev) => staging.capture(|| handle(&node, &mesh, ev)),
                None => break,
            }
        }
        staging.flush();
    }
}

fn link_for(mesh: &MeshState, realm: &Arc<RealmHandle>, peer: PeerId) -> Id {
    let key = (realm.name.clone(), peer);
    if let Some(id) = mesh.links.lock().get(&key) {
        return *id;
    }
    let link = NodePeer::Link(LinkPeer {
        peer,
        realm: Arc::from(realm.name.as_str()),
        mesh: mesh.handle.clone(),
        announced: mesh.proofs.announced.clone(),
    });
    let id = realm.lock().join_link(&peer.to_string(), link);
    mesh.links.lock().insert(key, id);
    // Tell the realm's other nodes: any of them that has not found `peer` links to it now.
    mesh.handle.broadcast(
        &Frame::Peers {
            realm: realm.name.clone(),
            peers: vec![peer.to_string()],
        },
        Some(&peer),
    );
    id
}

fn handle(node: &Arc<Node>, mesh: &Arc<MeshState>, ev: MeshEvent) {
    match ev {
        MeshEvent::PeerUp(peer) => {
            tracing::info!(%peer, "mesh peer up");
            mesh.peer_up.notify_waiters();
            // Revocations first: the peer cuts off revoked nodes before anything else.
            crate::trust::send_revocations(mesh, &peer);
            let states: Vec<RealmState> = mesh.states.lock().values().cloned().collect();
            for s in states {
                mesh.handle.send(
                    &peer,
                    &Frame::State {
                        realm: s.realm.clone(),
                        state: s.encode(),
                    },
                );
            }
            // Frames to a peer arrive in order: after this, the peer knows every state we knew.
            mesh.handle.send(&peer, &Frame::StatesDone);
            mesh.proofs.link_up(&peer);
            for r in node.realm_handles() {
                for a in r.lock().local_interest() {
                    mesh.send_announce(&r.name, a, &[peer]);
                }
                let peers = mesh.realm_peers(&r.name);
                if !peers.is_empty() {
                    mesh.handle.send(
                        &peer,
                        &Frame::Peers {
                            realm: r.name.clone(),
                            peers,
                        },
                    );
                }
            }
        }
        MeshEvent::PeerDown(peer) => {
            tracing::info!(%peer, "mesh peer down");
            mesh.barrier_done(peer, None);
            mesh.proofs.forget(&peer);
            let gone: Vec<(String, Id)> = {
                let mut links = mesh.links.lock();
                let keys: Vec<(String, PeerId)> =
                    links.keys().filter(|(_, p)| *p == peer).cloned().collect();
                keys.into_iter()
                    .filter_map(|k| links.remove(&k).map(|id| (k.0, id)))
                    .collect()
            };
            for (realm, id) in gone {
                if let Some(r) = node.realm_handle(&realm) {
                    r.lock().leave(id);
                    node.drop_realm_if_idle(&r);
                }
            }
        }
        MeshEvent::Frame(peer, frame) => on_frame(node, mesh, peer, frame),
    }
}

/// The realm a peer's interest or registration is held in, made here if the node knows it.
fn realm_or_count(node: &Node, mesh: &MeshState, realm: &str) -> Option<Arc<RealmHandle>> {
    let r = node.realm_for_mesh(realm);
    if r.is_none() {
        mesh.counters.unknown_realm.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// The realm a publication, call or reply is for, if it is active here: a publication for a
/// realm with no state here has no subscriber here, and a call or reply belongs to a realm
/// with a callee or caller here; so a peer cannot make the node build states for names.
fn active_realm(node: &Node, mesh: &MeshState, realm: &str) -> Option<Arc<RealmHandle>> {
    let r = node.realm_handle(realm);
    if r.is_none() {
        mesh.counters.unknown_realm.fetch_add(1, Ordering::Relaxed);
    }
    r
}

pub(crate) fn rejected(mesh: &MeshState, peer: &PeerId, what: &str, why: impl std::fmt::Display) {
    mesh.counters.rejected.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, "forwarded {what} refused: {why}");
}

fn on_frame(node: &Arc<Node>, mesh: &Arc<MeshState>, peer: PeerId, frame: Frame) {
    // A realm served only by dedicated nodes takes forwarded traffic only from them.
    let realm = match &frame {
        Frame::Interest { realm, .. }
        | Frame::Registration { realm, .. }
        | Frame::Publish { realm, .. }
        | Frame::Call { realm, .. }
        | Frame::Reply { realm, .. }
        | Frame::Peers { realm, .. }
        | Frame::Session { realm, .. } => Some(realm.as_str()),
        _ => None,
    };
    if let Some(realm) = realm.filter(|_| node.any_dedicated()) {
        if node.peer_may_serve(realm, &peer.to_string()) == Some(false) {
            return rejected(
                mesh,
                &peer,
                frame.kind(),
                "not a dedicated node of the realm",
            );
        }
    }
    match frame {
        Frame::Hello { .. } => {}
        Frame::Barrier { id } => {
            // Frames from one peer are applied in order: everything before this is in.
            mesh.handle.send(&peer, &Frame::BarrierAck { id });
        }
        Frame::BarrierAck { id } => mesh.barrier_done(peer, Some(id)),
        Frame::NodeRevoked { revocation } => {
            crate::trust::on_revocation(node, mesh, peer, &revocation)
        }
        Frame::CertRenew => crate::trust::on_renew_request(node, mesh, peer),
        Frame::CertIssued { cert } => crate::trust::on_cert_issued(node, mesh, &cert),
        Frame::Session {
            realm,
            session,
            public,
            nonce,
            sig,
        } => mesh
            .proofs
            .on_session(node, mesh, peer, &realm, session, &public, &nonce, &sig),
        Frame::StatesDone => {
            if !node.states_synced() {
                tracing::info!(%peer, "realm states synced from a peer");
            }
            node.mark_states_synced();
        }
        Frame::Usage { id, report } => on_usage(node, mesh, peer, id, report),
        Frame::UsageAck { id, error } => {
            if let Some(tx) = mesh.usage_acks.lock().remove(&id) {
                let _ = tx.send(error);
            }
        }
        Frame::Peers { realm, peers } => {
            // Only for a realm this node serves with sessions of its own (as the DHT's provider
            // records): a node that merely holds a peer's interest does not pull the realm in.
            if !node
                .realm_handle(&realm)
                .is_some_and(|r| r.serves_sessions())
            {
                return;
            }
            if peers.len() > macula_mesh::MAX_REALM_NODES {
                return rejected(mesh, &peer, "peers", "too many peers");
            }
            for p in peers {
                match p.parse::<PeerId>() {
                    Ok(p) => mesh.handle.want(p),
                    Err(e) => return rejected(mesh, &peer, "peers", e),
                }
            }
        }
        Frame::State { realm, state } => {
            let Ok(s) = rmp_serde::from_slice::<RealmState>(&state) else {
                mesh.counters
                    .states_rejected
                    .fetch_add(1, Ordering::Relaxed);
                return;
            };
            if s.realm != realm {
                mesh.counters
                    .states_rejected
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Err(e) = s.verify(node.auth().authenticator.operator()) {
                mesh.counters
                    .states_rejected
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, realm, "realm state refused: {e}");
                return;
            }
            if mesh.offer_state(s.clone()) {
                mesh.counters.states_applied.fetch_add(1, Ordering::Relaxed);
                node.rebuild_auth();
                mesh.handle.broadcast(
                    &Frame::State {
                        realm,
                        state: s.encode(),
                    },
                    Some(&peer),
                );
            } else {
                // The peer is behind (an old state, perhaps of a deleted registration): send it
                // what this node holds, which it takes and spreads.
                let newer = mesh
                    .states
                    .lock()
                    .get(&realm)
                    .filter(|h| h.seq > s.seq)
                    .map(RealmState::encode);
                if let Some(state) = newer {
                    mesh.handle.send(&peer, &Frame::State { realm, state });
                }
            }
        }
        f @ (Frame::Interest { .. } | Frame::Registration { .. }) => {
            on_announce(node, mesh, peer, f)
        }
        Frame::Publish { realm, origin, msg } => {
            let Ok(Message::Publish {
                request,
                options,
                topic,
                payload,
            }) = Serializer::MsgPack.decode_fast(&msg)
            else {
                return rejected(mesh, &peer, "publication", "not a PUBLISH");
            };
            let Some(r) = active_realm(node, mesh, &realm) else {
                return;
            };
            let o = match mesh.proofs.origin(node, peer, &realm, origin) {
                Ok(o) => o,
                Err(why) => return rejected(mesh, &peer, "publication", why),
            };
            node.metrics.mesh_events_in.fetch_add(1, Ordering::Relaxed);
            let res = r
                .lock()
                .link_publish(&o, request, &options, &topic, payload);
            if let Err(e) = res {
                rejected(mesh, &peer, "publication", e);
            }
        }
        Frame::Call { realm, origin, msg } => {
            let Ok(Message::Call {
                request,
                options,
                procedure,
                payload,
            }) = Serializer::MsgPack.decode(&msg)
            else {
                return rejected(mesh, &peer, "call", "not a CALL");
            };
            let Some(r) = active_realm(node, mesh, &realm) else {
                return;
            };
            let o = match mesh.proofs.origin(node, peer, &realm, origin) {
                Ok(o) => o,
                Err(why) => return rejected(mesh, &peer, "call", why),
            };
            let link = link_for(mesh, &r, peer);
            let res = r.lock().link_call(
                link,
                &o,
                request,
                options,
                procedure,
                payload,
                Instant::now(),
            );
            if let Err(e) = res {
                rejected(mesh, &peer, "call", e);
            }
        }
        Frame::Reply { realm, msg } => {
            let Ok(m) = Serializer::MsgPack.decode(&msg) else {
                return rejected(mesh, &peer, "reply", "undecodable");
            };
            let Some(r) = active_realm(node, mesh, &realm) else {
                return;
            };
            let link = link_for(mesh, &r, peer);
            let res = r.lock().link_reply(link, m);
            if let Err(e) = res {
                rejected(mesh, &peer, "reply", e);
            }
        }
    }
}

/// A peer's interest or registration (added, naming the session that holds it; or
/// withdrawn), held for the peer's link if the session's role justifies it.
fn on_announce(node: &Node, mesh: &MeshState, peer: PeerId, frame: Frame) {
    let (kind, realm, uri, policy, invoke, by) = match frame {
        Frame::Interest {
            realm,
            uri,
            policy,
            session,
            role,
            add,
        } => (
            Kind::Interest,
            realm,
            uri,
            policy,
            None,
            add.then_some((session, role)),
        ),
        Frame::Registration {
            realm,
            uri,
            policy,
            invoke,
            session,
            role,
            add,
        } => (
            Kind::Registration,
            realm,
            uri,
            policy,
            Some(invoke),
            add.then_some((session, role)),
        ),
        _ => return,
    };
    let invoke = match invoke {
        None => Some(InvokePolicy::Single),
        Some(i) => InvokePolicy::parse(Some(&i)),
    };
    let (Some(policy), Some(invoke)) = (MatchPolicy::parse(Some(&policy)), invoke) else {
        return rejected(mesh, &peer, kind.as_str(), "bad match or invoke policy");
    };
    let key = HoldKey {
        realm: Arc::from(realm.as_str()),
        kind,
        uri,
        policy,
    };
    mesh.proofs.announce(node, mesh, peer, key, invoke, by, || {
        let r = realm_or_count(node, mesh, &realm)?;
        let link = link_for(mesh, &r, peer);
        Some((r, link))
    });
}

/// Signs the states of the realms whose authority key this node holds and floods those that
/// changed. Called at start and after every config reload.
pub fn publish_local_states(node: &Node, mesh: &MeshState) {
    let Some(dir) = &node.confdir else {
        return;
    };
    for (realm, seq) in node.local_seqs() {
        let Ok((authority_realm, key, cert)) = dir.authority_for(&realm) else {
            continue;
        };
        if authority_realm != realm {
            continue;
        }
        let Ok(policy) = std::fs::read_to_string(dir.policy_path(&realm)) else {
            continue;
        };
        let state = RealmState::sign(&realm, seq, policy, &cert, &key);
        if mesh.offer_state(state.clone()) {
            mesh.handle.broadcast(
                &Frame::State {
                    realm,
                    state: state.encode(),
                },
                None,
            );
        }
    }
}

/// Procedures the node answers itself in every realm.
pub const SERVICE_PROCEDURES: [&str; 2] = ["macula.dht.put", "macula.dht.get"];

/// The node's service member of one realm: runs `macula.dht.put` / `macula.dht.get` against the
/// DHT and answers through the dealer.
#[derive(Clone)]
pub struct ServicePeer {
    pub node: Weak<Node>,
    pub realm: Arc<str>,
}

impl ServicePeer {
    fn invoke(&self, f: Forwarded<'_>) {
        let Forwarded::Call {
            invocation,
            procedure,
            payload,
            origin,
            ..
        } = f
        else {
            return;
        };
        let (Some(node), Ok(rt)) = (self.node.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let realm = self.realm.clone();
        let procedure = procedure.to_owned();
        let writer = origin.authid.clone();
        let payload = payload.materialized().into_owned();
        rt.spawn(async move {
            let reply = match dht_call(&node, &realm, &procedure, &writer, payload).await {
                Ok(p) => Message::Result {
                    request: invocation,
                    details: macula_wamp::Dict::new(),
                    payload: p,
                },
                Err((uri, msg)) => {
                    macula_router::error(macula_wamp::code::CALL, invocation, uri, msg)
                }
            };
            if let Some(r) = node.realm_handle(&realm) {
                if let Some(id) = r.service {
                    let _ = r.lock().link_reply(id, reply);
                }
            }
        });
    }
}

type CallError = (&'static str, String);

async fn dht_call(
    node: &Node,
    realm: &str,
    procedure: &str,
    writer: &str,
    payload: macula_wamp::Payload,
) -> Result<macula_wamp::Payload, CallError> {
    use macula_wamp::{errors, Value};
    let mesh = node.mesh.get().ok_or((
        errors::NO_SUCH_PROCEDURE,
        "the mesh is off on this node (mesh.enabled: false): enable it, or connect to a node that runs one".to_string(),
    ))?;
    let key = payload
        .args
        .first()
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty() && k.len() <= 512)
        .ok_or((
            errors::INVALID_ARGUMENT,
            format!("{procedure} takes a key (a string of 1 to 512 bytes) as first argument"),
        ))?
        .to_owned();
    let cfg = &node.config.mesh;
    let dkey = macula_mesh::record::dht_key(realm, &key);
    let now = crate::confdir::now_secs();
    if procedure == "macula.dht.put" {
        let value = payload.args.get(1).cloned().ok_or((
            errors::INVALID_ARGUMENT,
            "macula.dht.put takes a key and a value: [key, value]".to_string(),
        ))?;
        let ttl = payload
            .kwargs
            .get("ttl")
            .and_then(Value::as_u64)
            .unwrap_or(cfg.dht_max_ttl_s);
        if ttl == 0 || ttl > cfg.dht_max_ttl_s {
            return Err((
                errors::INVALID_ARGUMENT,
                format!(
                    "ttl must be 1..={} seconds (mesh.dht_max_ttl_s)",
                    cfg.dht_max_ttl_s
                ),
            ));
        }
        let bytes = rmp_serde::to_vec(&value).unwrap_or_default();
        if bytes.len() > cfg.dht_max_value {
            return Err((
                errors::LIMIT_EXCEEDED,
                format!(
                    "the value is {} bytes; the limit is {} (mesh.dht_max_value)",
                    bytes.len(),
                    cfg.dht_max_value
                ),
            ));
        }
        let h = &mesh.handle;
        // A record is valid only while this node's certificate is (see `AppRecord::verify`).
        let expires_at = (now + ttl).min(h.own_cert().not_after);
        let rec = macula_mesh::record::AppRecord::sign(
            h.keypair(),
            &h.cert(),
            realm,
            &key,
            Bytes::from(bytes),
            writer,
            now,
            expires_at,
        );
        let replicas = h
            .put(
                dkey,
                rec.encode(),
                std::time::Duration::from_secs(expires_at.saturating_sub(now).max(1)),
            )
            .await
            .map_err(|e| (errors::CANCELED, e))?;
        return Ok(macula_wamp::Payload::new(
            vec![],
            macula_wamp::dict! {"replicas" => replicas as u64, "expires_at" => expires_at},
        ));
    }
    node.metrics.dht_lookups.fetch_add(1, Ordering::Relaxed);
    let found = mesh
        .handle
        .get(dkey)
        .await
        .map_err(|e| (errors::CANCELED, e))?;
    let Some(raw) = found.value else {
        return Err((
            errors::NOT_FOUND,
            format!("no record {key:?} in realm {realm}"),
        ));
    };
    let rec = macula_mesh::record::AppRecord::verify(&raw, mesh.handle.trust(), realm, &key, now)
        .map_err(|e| (errors::NOT_FOUND, format!("no valid record {key:?}: {e}")))?;
    // In a realm restricted to dedicated nodes, only their records count.
    let by = rec.writer_node().map(|p| p.to_string()).unwrap_or_default();
    if node.peer_may_serve(realm, &by) != Some(true) {
        return Err((
            errors::NOT_FOUND,
            format!("no valid record {key:?}: written by a node that does not serve {realm}"),
        ));
    }
    let value: Value = rmp_serde::from_slice(&rec.value).unwrap_or(Value::Null);
    Ok(macula_wamp::Payload::new(
        vec![value],
        macula_wamp::dict! {"writer" => rec.writer, "written_at" => rec.written_at, "expires_at" => rec.expires_at},
    ))
}

/// The name under which the node hosting the billing aggregator announces itself in the DHT
/// (a provider record, like a realm's; no realm name starts with `_`).
pub const BILLING: &str = "_billing";

/// A usage report from another node: stored by this node's aggregator, then acknowledged. A
/// node reports only its own usage (the report's node must be the sending peer).
fn on_usage(node: &Arc<Node>, mesh: &Arc<MeshState>, peer: PeerId, id: u64, report: Bytes) {
    let reply = |error: Option<String>| {
        mesh.handle.send(&peer, &Frame::UsageAck { id, error });
    };
    let mut report = match rmp_serde::from_slice::<crate::meter::UsageReport>(&report) {
        Ok(r) if r.node == peer.to_string() => r,
        Ok(_) => return reply(Some("a node reports only its own usage".into())),
        Err(e) => return reply(Some(format!("malformed usage report: {e}"))),
    };
    let sink = match node.usage_sink.get() {
        Some(s) if node.config.registry.enabled => s.clone(),
        _ => {
            return reply(Some(
                "this node does not host the billing aggregator".into(),
            ))
        }
    };
    // Usage of a realm restricted to dedicated nodes counts only from them (a node outside the
    // list cannot charge the realm's owner, under the realm's name or a subrealm's), and usage
    // of realms no known registration governs is not billable. The rest of the report is
    // taken; the node is not asked to resend rows that will never be accepted.
    let from = peer.to_string();
    let before = report.rows.len();
    report
        .rows
        .retain(|r| node.peer_may_serve(&r.realm, &from) == Some(true));
    if report.rows.len() < before {
        rejected(
            mesh,
            &peer,
            "usage",
            format_args!(
                "{} rows for realms it may not serve",
                before - report.rows.len()
            ),
        );
    }
    let mesh = mesh.clone();
    tokio::spawn(async move {
        let error = sink.deliver(report).await.err();
        mesh.handle.send(&peer, &Frame::UsageAck { id, error });
    });
}

/// Delivers a node's usage to the billing node across the mesh (found through its DHT provider
/// record), waiting for its acknowledgement.
pub struct MeshSink(pub Weak<Node>);

impl crate::meter::UsageSink for MeshSink {
    fn deliver(
        &self,
        report: crate::meter::UsageReport,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        let node = self.0.clone();
        Box::pin(async move {
            let mesh = node
                .upgrade()
                .and_then(|n| n.mesh.get().cloned())
                .ok_or("the mesh is off")?;
            let h = &mesh.handle;
            let known = *mesh.billing_peer.lock();
            let peer = match known.filter(|p| h.peers().contains(p)) {
                Some(p) => p,
                None => {
                    if let Some((next, _)) = *mesh.billing_miss.lock() {
                        if Instant::now() < next {
                            return Err("no node hosting the registry (billing aggregator) in the mesh yet; usage is kept".into());
                        }
                    }
                    let found = h.providers(BILLING).await;
                    let Some(p) = found.into_iter().find(|p| *p != h.peer_id()) else {
                        let mut miss = mesh.billing_miss.lock();
                        let backoff = miss.map_or(Duration::from_secs(5), |(_, b)| {
                            (b * 2).min(Duration::from_secs(300))
                        });
                        *miss = Some((Instant::now() + backoff, backoff));
                        return Err("no node hosting the registry (billing aggregator) was found in the mesh; usage is kept".into());
                    };
                    *mesh.billing_miss.lock() = None;
                    h.want(p);
                    *mesh.billing_peer.lock() = Some(p);
                    p
                }
            };
            // Linked (the DHT lookup connects; the link follows within a round trip or two).
            let linked = async {
                loop {
                    let up = mesh.peer_up.notified();
                    tokio::pin!(up);
                    up.as_mut().enable();
                    if h.peers().contains(&peer) {
                        return;
                    }
                    up.await;
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), linked)
                .await
                .is_err()
            {
                return Err(format!("the billing node {peer} is not reachable"));
            }
            let body = rmp_serde::to_vec_named(&report).map_err(|e| e.to_string())?;
            let id: u64 = rand::random();
            let (tx, rx) = tokio::sync::oneshot::channel();
            mesh.usage_acks.lock().insert(id, tx);
            h.send(
                &peer,
                &Frame::Usage {
                    id,
                    report: body.into(),
                },
            );
            let answer = tokio::time::timeout(Duration::from_secs(10), rx).await;
            mesh.usage_acks.lock().remove(&id);
            match answer {
                Ok(Ok(None)) => Ok(()),
                Ok(Ok(Some(e))) => Err(format!("the billing node refused the report: {e}")),
                _ => Err(format!("no acknowledgement from the billing node {peer}")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use macula_router::auth::AuthorityCert;

    fn authority(op: &SigningKey, realm: &str, seed: u8) -> (SigningKey, SignedCert) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let cert = SignedCert::issue(
            op,
            &AuthorityCert {
                realm: realm.into(),
                authority: key.verifying_key().to_bytes(),
                expires_at: 0,
            },
        );
        (key, cert)
    }

    fn policy(realm: &str, generation: u64, version: u64) -> (u64, String) {
        let mut doc = crate::confdir::default_policy(realm);
        doc.generation = generation;
        doc.version = version;
        let p = Policy::from_doc(doc).unwrap();
        (p.seq(), p.to_yaml())
    }

    #[test]
    fn only_the_realms_own_authority_signs_its_state() {
        let op = SigningKey::from_bytes(&[1; 32]);
        let (own, own_cert) = authority(&op, "com.acme.shop", 2);
        let (parent, parent_cert) = authority(&op, "com.acme", 3);
        let (seq, text) = policy("com.acme.shop", 1, 7);
        let good = RealmState::sign("com.acme.shop", seq, text.clone(), &own_cert, &own);
        assert!(good.verify(&op.verifying_key()).is_ok());
        assert_eq!(good.authority(), Some(own.verifying_key().to_bytes()));
        // Whoever holds the parent's authority cannot write the subrealm's state.
        let forged = RealmState::sign("com.acme.shop", seq + 1, text, &parent_cert, &parent);
        let err = forged.verify(&op.verifying_key()).unwrap_err();
        assert!(err.contains("only the realm's own authority"), "{err}");
    }

    #[test]
    fn state_order_is_the_policys_counters_and_a_new_registration_outranks_the_old() {
        let op = SigningKey::from_bytes(&[1; 32]);
        let (old, old_cert) = authority(&op, "com.acme.shop", 2);
        let (new, new_cert) = authority(&op, "com.acme.shop", 4);
        let (seq, text) = policy("com.acme.shop", 1, 50);
        // A sequence that is not the policy's own is refused (no claiming a higher one).
        let lying = RealmState::sign("com.acme.shop", seq + 10, text.clone(), &old_cert, &old);
        assert!(lying.verify(&op.verifying_key()).is_err());
        let old_state = RealmState::sign("com.acme.shop", seq, text, &old_cert, &old);
        let (seq2, text2) = policy("com.acme.shop", 2, 1);
        let new_state = RealmState::sign("com.acme.shop", seq2, text2, &new_cert, &new);
        assert!(new_state.verify(&op.verifying_key()).is_ok());
        assert!(
            new_state.seq > old_state.seq,
            "generation 2, version 1 outranks generation 1, version 50"
        );
    }
}
