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
//!
//! One file per concept: this one holds the mesh state (discovery, barriers, the announcer) and
//! the event loop; `frames.rs` what each frame means; `link.rs` a realm's end of a link;
//! `state.rs` signed realm states and tombstones; `service.rs` the DHT services; `usage.rs`
//! usage reports over the mesh; `proven.rs` the roles peers prove and the interest and
//! registrations they may hold here; `trust.rs` certificates and node revocations.

pub(crate) mod blobs;
mod frames;
mod link;
pub mod proven;
mod service;
mod state;
pub mod trust;
mod usage;

#[allow(unused_imports)]
pub use self::{frames::*, link::*, service::*, state::*, usage::*};

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

use crate::mesh::proven::{HoldKey, Kind};
use crate::node::{LearnedState, MeshPort, Node, RealmHandle};
use crate::outbox::Gate;
use crate::outbox::Staging;

pub use crate::peer::NodePeer;

/// The mesh as the node sees it ([`MeshPort`]): set on the node once the mesh is up.
pub struct Port(pub Arc<MeshState>);

impl MeshPort for Port {
    fn peer_id(&self) -> String {
        self.0.handle.peer_id().to_string()
    }

    fn peer_bytes(&self) -> &[u8] {
        &self.0.peer_bytes
    }

    fn start_discovery(&self, realm: &str) {
        self.0.start_discovery(realm)
    }

    fn unprovide(&self, realm: &str) {
        self.0.handle.unprovide(realm)
    }

    fn announcer(&self) -> macula_router::Announcer {
        self.0.announcer()
    }

    fn services(&self, node: Weak<Node>, realm: &str) -> (NodePeer, &'static [&'static str]) {
        let peer = ServicePeer {
            node,
            realm: Arc::from(realm),
        };
        (NodePeer::Mesh(Arc::new(peer)), &SERVICE_PROCEDURES)
    }

    fn publish_local_states(&self, node: &Node) {
        publish_local_states(node, &self.0)
    }

    fn learned_states(&self) -> Vec<LearnedState> {
        self.0
            .states
            .lock()
            .iter()
            .map(|(realm, st)| LearnedState {
                realm: realm.clone(),
                seq: st.seq,
                policy: st.policy.clone(),
                authority: st.authority(),
            })
            .collect()
    }

    fn credentials_changed(&self, node: &Node) {
        self.0.proofs.recheck(node, &self.0)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The mesh's state, for the parts above the node (None while the mesh is off or starting).
pub fn of(node: &Node) -> Option<&Arc<MeshState>> {
    node.mesh
        .get()?
        .as_any()
        .downcast_ref::<Port>()
        .map(|p| &p.0)
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
    pub(crate) links: Mutex<HashMap<(String, PeerId), Id>>,
    /// Signed realm states known to this node (its own and learned), by realm.
    pub states: Mutex<HashMap<String, RealmState>>,
    /// Usage reports sent to the billing node, awaiting its acknowledgement.
    pub(crate) usage_acks: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Option<String>>>>,
    /// Blob parts asked of peers, awaiting their answers (see [`blobs`]).
    pub(crate) blob_waits: blobs::Waits,
    /// The node hosting the billing aggregator, once found.
    pub(crate) billing_peer: Mutex<Option<PeerId>>,
    /// When no billing node was found: when to look again, and the backoff (a mesh without a
    /// registry must not look it up every flush).
    pub(crate) billing_miss: Mutex<Option<(Instant, Duration)>>,
    /// Woken whenever a peer comes up (for waiting on a link).
    pub(crate) peer_up: tokio::sync::Notify,
    /// Barriers sent after an announcement: the realm peers that have not acknowledged yet, and
    /// the gate that opens when all have (or the wait ends).
    pub(crate) barriers: Mutex<HashMap<u64, Barrier>>,
    pub(crate) next_barrier: std::sync::atomic::AtomicU64,
    /// Longest wait for the acknowledgements.
    pub(crate) barrier_timeout: Duration,
    /// Certificate renewal and node revocations (see [`crate::trust`]).
    pub trust_upkeep: crate::mesh::trust::Upkeep,
    /// Realms this node just started serving, until it has found and linked the realm's other
    /// nodes (see [`MeshState::start_discovery`]).
    pub(crate) discovery: Mutex<HashMap<String, Arc<Gate>>>,
    /// Realms whose known state is a tombstone, and when it was made (see
    /// [`MeshState::collect_tombstones`]).
    pub(crate) tombstones: Mutex<HashMap<String, u64>>,
    /// `mesh.tombstone_retention_s`.
    pub(crate) tombstone_retention: u64,
    /// Roles proved by peers and sent to them, and the interest and registrations peers hold
    /// here (see [`crate::proven`]).
    pub proofs: crate::mesh::proven::Proofs,
    /// When this node last had a certified peer.
    pub(crate) last_linked: Mutex<Instant>,
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
            blob_waits: Default::default(),
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
            proofs: crate::mesh::proven::Proofs::new(crate::mesh::proven::HoldLimits {
                holds: cfg.max_holds_per_peer,
                realms: cfg.max_realms_per_peer,
            }),
            last_linked: Mutex::new(Instant::now()),
        })
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

    pub(crate) async fn discover(self: &Arc<Self>, realm: &str) {
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
    pub(crate) async fn until_linked(
        &self,
        done: impl Fn(&std::collections::HashSet<PeerId>) -> bool,
    ) {
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
    pub(crate) fn barrier(self: &Arc<Self>) -> Option<Arc<Gate>> {
        self.barrier_to(self.handle.peers().into_iter().collect())
    }

    /// A barrier to `peers` (see [`MeshState::barrier`]).
    pub(crate) fn barrier_to(
        self: &Arc<Self>,
        peers: std::collections::HashSet<PeerId>,
    ) -> Option<Arc<Gate>> {
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
    pub(crate) fn barrier_done(&self, peer: PeerId, id: Option<u64>) {
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
    pub(crate) fn realm_peers(&self, realm: &str) -> Vec<String> {
        self.links
            .lock()
            .keys()
            .filter(|(r, _)| r == realm)
            .map(|(_, p)| p.to_string())
            .take(macula_mesh::MAX_REALM_NODES)
            .collect()
    }

    /// Sends an announcement to `peers`, each time after the proof of the session it names.
    pub(crate) fn send_announce(&self, realm: &str, a: Announce, peers: &[PeerId]) {
        let (frame, by) = announce_frame(realm, a);
        let bytes = frame.encode();
        let realm: Arc<str> = Arc::from(realm);
        for p in peers {
            if let Some(h) = &by {
                crate::mesh::proven::send_proof(
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

/// The frame for an announcement, and the session it names.
pub(crate) fn announce_frame(realm: &str, a: Announce) -> (Frame, Option<Holder>) {
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

pub(crate) fn link_for(mesh: &MeshState, realm: &Arc<RealmHandle>, peer: PeerId) -> Id {
    let key = (realm.name.clone(), peer);
    if let Some(id) = mesh.links.lock().get(&key) {
        return *id;
    }
    let link = NodePeer::Mesh(Arc::new(LinkPeer {
        peer,
        realm: Arc::from(realm.name.as_str()),
        mesh: mesh.handle.clone(),
        announced: mesh.proofs.announced.clone(),
    }));
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

pub(crate) fn handle(node: &Arc<Node>, mesh: &Arc<MeshState>, ev: MeshEvent) {
    match ev {
        MeshEvent::PeerUp(peer) => {
            tracing::info!(%peer, "mesh peer up");
            mesh.peer_up.notify_waiters();
            // Revocations first: the peer cuts off revoked nodes before anything else.
            crate::mesh::trust::send_revocations(mesh, &peer);
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
            // The workloads' desired state, as the realm states.
            let records: Vec<Vec<u8>> = node
                .workloads
                .records
                .lock()
                .all()
                .filter_map(|r| serde_json::to_vec(r).ok())
                .collect();
            for record in records {
                mesh.handle.send(
                    &peer,
                    &Frame::Workload {
                        record: record.into(),
                    },
                );
            }
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

/// The realm a peer's frame is for, or `None` (counted as an unknown realm). Only a hold
/// (interest or registration) makes its state here (`make`), if the node knows the realm: a
/// publication for a realm with no state here has no subscriber here, and a call or reply
/// belongs to a realm with a callee or caller here; so a peer cannot make the node build states
/// for names.
pub(crate) fn realm_for_frame(
    node: &Node,
    mesh: &MeshState,
    realm: &str,
    make: bool,
) -> Option<Arc<RealmHandle>> {
    let r = if make {
        node.realm_for_mesh(realm)
    } else {
        node.realm_handle(realm)
    };
    if r.is_none() {
        mesh.counters.unknown_realm.fetch_add(1, Ordering::Relaxed);
    }
    r
}

pub(crate) fn rejected(mesh: &MeshState, peer: &PeerId, what: &str, why: impl std::fmt::Display) {
    mesh.counters.rejected.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, "forwarded {what} refused: {why}");
}
