//! The node's shared state: realms, the authenticator, live sessions, metrics — and admission
//! (which realm and policy an authenticated identity joins).
//!
//! One file per concept: this one holds the node itself, its realms and its live sessions;
//! `realm.rs` a realm's handle (the lock around its router core, the realms to tick);
//! `admission.rs` the credentials in force and who may join what; `credentials.rs` applying a
//! new configuration (reload, realm states from the mesh) and closing what it no longer admits.

mod admission;
mod credentials;
mod realm;

pub use self::admission::AuthState;
pub use self::realm::{RealmGuard, RealmHandle, Ticking};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use macula_router::auth::{abort, goodbye, Authenticator, Identity};
use macula_router::policy::Policy;
use macula_router::{Realm, RealmConfig};
use macula_wamp::{errors, Id, Message};

use crate::confdir::{ConfDir, Loaded};
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::peer::NodePeer;

/// What the node asks of its mesh. The mesh (`crate::mesh`) sits above the node — it handles
/// frames with the node's realms and credentials — and implements this; the node never names
/// the mesh's types, so the node and the parts below it do not reach up into it.
pub trait MeshPort: Send + Sync + 'static {
    /// This node's peer id, as text and as bytes (what session proofs name).
    fn peer_id(&self) -> String;
    fn peer_bytes(&self) -> &[u8];
    /// This node starts serving `realm` (provider record, linking the realm's other nodes).
    fn start_discovery(&self, realm: &str);
    /// This node no longer serves `realm`.
    fn unprovide(&self, realm: &str);
    /// What every realm announces local interest and registrations through.
    fn announcer(&self) -> macula_router::Announcer;
    /// The node's own services as a member of `realm`, and the procedures they answer.
    fn services(
        &self,
        node: std::sync::Weak<Node>,
        realm: &str,
    ) -> (NodePeer, &'static [&'static str]);
    /// The config directory's realm states changed: sign and flood them.
    fn publish_local_states(&self, node: &Node);
    /// Realm states learned from the mesh, for [`Node::rebuild_auth`].
    fn learned_states(&self) -> Vec<LearnedState>;
    /// Credentials changed (revocations, authorities, roles): peers' holds are judged again.
    fn credentials_changed(&self, node: &Node);
    /// The mesh itself, for the parts above the node (`crate::mesh::of`).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A realm state learned from the mesh: its sequence, policy document and authority.
pub struct LearnedState {
    pub realm: String,
    pub seq: u64,
    pub policy: String,
    pub authority: Option<[u8; 32]>,
}

/// A live session, for revocation, expiry and policy changes.
struct LiveSession {
    kid: String,
    realm: String,
    /// The authority that signed the session's key.
    authority: [u8; 32],
    /// When the session's key expires (Unix seconds; 0: never).
    expires_at: u64,
    outbox: Arc<Outbox>,
}

/// The node.
pub struct Node {
    pub config: NodeConfig,
    pub metrics: Arc<Metrics>,
    pub confdir: Option<ConfDir>,
    auth: RwLock<Arc<AuthState>>,
    realms: Mutex<HashMap<String, Arc<RealmHandle>>>,
    ticking: Arc<Ticking>,
    /// Realm states from the mesh are in (see [`Node::states_synced`]).
    synced: std::sync::atomic::AtomicBool,
    /// Whether any known realm lists dedicated nodes (frames skip the check otherwise).
    any_dedicated: std::sync::atomic::AtomicBool,
    started: Instant,
    sessions: Mutex<HashMap<Id, LiveSession>>,
    /// What the config directory holds (merged with realm states learned from the mesh).
    local: Mutex<Loaded>,
    /// The mesh, once started (see [`MeshPort`]; `crate::mesh::of` for its state).
    pub mesh: OnceLock<Arc<dyn MeshPort>>,
    /// Usage counters (`metering.enabled`).
    pub meter: Option<Arc<crate::meter::Meter>>,
    /// Why the counters file could not be opened: the node refuses to start rather than count
    /// in memory and lose usage on a crash ([`crate::start`] reports it).
    pub meter_error: Option<String>,
    /// Where usage reports go: the billing aggregator (set by whoever hosts or reaches it).
    pub usage_sink: OnceLock<Arc<dyn crate::meter::UsageSink>>,
    /// Share of its plan's allowance each realm used this month (kept by the aggregator hosted
    /// here, for `/metrics`).
    pub quota_used: parking_lot::Mutex<HashMap<String, f64>>,
    /// The sampled raw-event stream (`metering.events_sample`), and its receiver until the
    /// writer task takes it.
    pub events: Option<crate::meter::EventTap>,
    pub events_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<crate::meter::OpEvent>>>,
    me: std::sync::Weak<Node>,
    /// Workloads' desired state: the deploy records this node keeps (see `crate::workloads`).
    pub workloads: crate::workloads::Desired,
    /// This node as a lease authority for replica slots (see `crate::workloads::authority`).
    pub leases: crate::workloads::LeaseAuthority,
    /// Workload messages from peers (and from this node to itself) for the controller.
    pub work_inbox: crate::workloads::Inbox,
    /// Workload replicas' tickets (their identity; see `crate::workloads::tickets`).
    pub tickets: Arc<crate::workloads::Tickets>,
    /// Who answers `macula.fence.check` (the workload controller, once started).
    pub fencing: OnceLock<std::sync::Weak<dyn Fencing>>,
    /// The address the HTTP listener is bound to (once it is).
    pub http_addr: OnceLock<std::net::SocketAddr>,
    /// Where the blobs of packages installed here are (`<packages>/blobs/sha256`): what this
    /// node serves its peers (see `crate::mesh::blobs`).
    pub blob_dir: OnceLock<std::path::PathBuf>,
}

/// The verdict on a fencing token: whether it is its slot's current one, and the highest token
/// a majority of the slot's authorities promised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub current: bool,
    pub highest: u64,
}

/// Judges fencing tokens by asking a slot's lease authorities (implemented by the workload
/// controller, above the node).
pub trait Fencing: Send + Sync {
    /// `slot` is `realm/name/index`; `Err` says why no majority answered.
    fn check(
        &self,
        slot: String,
        token: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fence, String>> + Send + '_>>;
    /// The token under which this node holds `slot`, if it does.
    fn held(&self, slot: &str) -> Option<u64>;
}

impl Node {
    /// A weak handle on this node (for what it owns that must not keep it alive).
    pub fn weak(&self) -> std::sync::Weak<Node> {
        self.me.clone()
    }

    pub fn new(loaded: Loaded, confdir: Option<ConfDir>) -> Arc<Node> {
        let tickets = Arc::new(crate::workloads::Tickets::default());
        let auth = AuthState {
            authenticator: Authenticator::new(loaded.operator, loaded.revoked.clone())
                .with_local_tickets(tickets.clone()),
            policies: loaded.policies.clone(),
            authorities: loaded.authorities.clone(),
        };
        let m = &loaded.config.metering;
        let mut meter_error = None;
        let meter = m
            .enabled
            .then(|| {
                let dir = confdir.as_ref().map(|c| c.root.join(&m.dir));
                crate::meter::Meter::open(dir.as_deref(), m.slots, m.max_slots)
                    .map_err(|e| meter_error = Some(format!("metering: {e:#}")))
                    .ok()
                    .inspect(|meter| meter.set_owner_limit(m.max_pairs_per_registration))
            })
            .flatten();
        let (events, events_rx) = match (m.events_sample, &meter) {
            (0, _) | (_, None) => (None, None),
            (n, Some(_)) => {
                let (tap, rx) = crate::meter::EventTap::new(n);
                (Some(tap), Some(rx))
            }
        };
        // The records and lease promises are this node's own (nodes sharing a config directory,
        // as `macula up --nodes N` runs them, each have their `workloads.dir`).
        let workloads_dir = confdir
            .as_ref()
            .map(|d| d.root.join(&loaded.config.workloads.dir));
        let records_file = workloads_dir.as_ref().map(|d| d.join("records.json"));
        let lease_term_ms = loaded.config.workloads.lease_term_ms.max(500);
        let promises_file = workloads_dir.as_ref().map(|d| d.join("promises.json"));
        Arc::new_cyclic(|me| Node {
            config: loaded.config.clone(),
            metrics: Arc::new(Metrics::default()),
            confdir,
            auth: RwLock::new(Arc::new(auth)),
            realms: Mutex::new(HashMap::new()),
            ticking: Arc::new(Ticking::default()),
            synced: std::sync::atomic::AtomicBool::new(
                !loaded.config.mesh.enabled || loaded.config.mesh.bootstrap.is_empty(),
            ),
            started: Instant::now(),
            any_dedicated: std::sync::atomic::AtomicBool::new(false),
            sessions: Mutex::new(HashMap::new()),
            local: Mutex::new(loaded),
            mesh: OnceLock::new(),
            meter,
            meter_error,
            usage_sink: OnceLock::new(),
            fencing: OnceLock::new(),
            http_addr: OnceLock::new(),
            blob_dir: OnceLock::new(),
            quota_used: parking_lot::Mutex::new(HashMap::new()),
            events,
            events_rx: parking_lot::Mutex::new(events_rx),
            me: me.clone(),
            workloads: crate::workloads::Desired::load(records_file),
            leases: crate::workloads::LeaseAuthority::load(promises_file, lease_term_ms),
            work_inbox: crate::workloads::Inbox::new(4_096),
            tickets,
        })
    }

    fn realm_handle_or_create(&self, name: &str, policy: Arc<Policy>) -> Arc<RealmHandle> {
        let mut realms = self.realms.lock().unwrap_or_else(|p| p.into_inner());
        realms
            .entry(name.to_owned())
            .or_insert_with(|| {
                let config = RealmConfig {
                    default_call_timeout: self.config.limits.call_timeout(),
                    max_subscriptions_per_session: self.config.limits.max_subscriptions_per_session,
                    max_registrations_per_session: self.config.limits.max_registrations_per_session,
                    max_calls_per_session: self.config.limits.max_calls_per_session,
                };
                let mut core = Realm::new(name, policy, config, rand::random());
                let mut service = None;
                if let Some(m) = self.mesh.get() {
                    core.set_announcer(m.announcer());
                    let (peer, procedures) = m.services(self.me.clone(), name);
                    let id = core.join_link("macula.service", peer);
                    for p in procedures {
                        core.service_register(id, p);
                    }
                    service = Some(id);
                }
                Arc::new_cyclic(|me| RealmHandle {
                    name: name.to_owned(),
                    core: Mutex::new(core),
                    me: me.clone(),
                    in_ticking: std::sync::atomic::AtomicBool::new(false),
                    ticking: self.ticking.clone(),
                    service,
                    provided: std::sync::atomic::AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// The live state of `realm`, if any.
    pub fn realm_handle(&self, realm: &str) -> Option<Arc<RealmHandle>> {
        self.realms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(realm)
            .cloned()
    }

    /// The realm a frame from another node refers to, created if this node knows its policy.
    pub fn realm_for_mesh(&self, realm: &str) -> Option<Arc<RealmHandle>> {
        if let Some(r) = self.realm_handle(realm) {
            return Some(r);
        }
        let policy = self.policy_for(realm)?;
        Some(self.realm_handle_or_create(realm, policy))
    }

    /// Forgets a realm's state once it has neither sessions nor links, so that joining many
    /// (sub)realms does not grow the node without bound. Only when no one else holds the handle:
    /// a connection being admitted to it right now keeps it alive.
    pub fn drop_realm_if_idle(&self, realm: &Arc<RealmHandle>) {
        let mut realms = self.realms.lock().unwrap_or_else(|p| p.into_inner());
        let idle = {
            let core = realm.lock();
            core.session_count() == 0 && core.link_count() == usize::from(realm.service.is_some())
        };
        if Arc::strong_count(realm) <= 2 && idle {
            realms.remove(&realm.name);
            if realm.provided.load(Ordering::Acquire) {
                if let Some(m) = self.mesh.get() {
                    m.unprovide(&realm.name);
                }
            }
        }
    }

    /// Whether realm states from the mesh are in (see `mesh.state_sync_timeout_ms`): always for
    /// a node without bootstrap peers or without a mesh.
    pub fn states_synced(&self) -> bool {
        if self.synced.load(Ordering::Relaxed) {
            return true;
        }
        let timeout = std::time::Duration::from_millis(self.config.mesh.state_sync_timeout_ms);
        if self.started.elapsed() >= timeout {
            self.synced.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether some realm this node knows lists dedicated nodes (one atomic load: the mesh path
    /// checks senders only then).
    pub fn any_dedicated(&self) -> bool {
        self.any_dedicated.load(Ordering::Relaxed)
    }

    /// Whether `peer` may serve `realm` (see `PolicyDoc::nodes`), by the registration that
    /// governs it: the realm's own policy, else its nearest known ancestor's (usage and records
    /// of `realm.anything` are that registration's). `None`: no known registration governs the
    /// realm (its frames find no realm here; its usage and records are no one's).
    pub fn peer_may_serve(&self, realm: &str, peer: &str) -> Option<bool> {
        let auth = self.auth();
        auth.registration_of(realm)
            .and_then(|r| auth.policies.get(r))
            .map(|p| p.may_serve(peer))
    }

    /// A peer sent every realm state it holds.
    pub fn mark_states_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// Joins a session: `welcome` joins it to its realm core and sends WELCOME; it runs under
    /// the lock the reload sweep takes, after a last check of the credentials. A reload may have
    /// installed new ones between admission and now (a transfer, a revocation): then the client
    /// gets ABORT, never a WELCOME followed at once by GOODBYE.
    pub fn join_session(
        &self,
        identity: &Identity,
        outbox: Arc<Outbox>,
        welcome: impl FnOnce() -> Id,
    ) -> Result<Id, Message> {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let auth = self.auth();
        if auth.authenticator.is_revoked(&identity.kid)
            || !auth.accepts(&identity.realm, &identity.authority)
        {
            return Err(abort(
                errors::AUTHENTICATION_FAILED,
                format!(
                    "key {} was revoked or no longer belongs to realm {}",
                    identity.kid, identity.realm
                ),
            ));
        }
        let id = welcome();
        self.metrics.sessions.fetch_add(1, Ordering::Relaxed);
        self.metrics.sessions_total.fetch_add(1, Ordering::Relaxed);
        s.insert(
            id,
            LiveSession {
                kid: identity.kid.clone(),
                realm: identity.realm.clone(),
                authority: identity.authority,
                expires_at: identity.expires_at,
                outbox,
            },
        );
        Ok(id)
    }

    /// Removes a session from its realm and the live table.
    pub fn session_left(&self, id: Id, realm: &Arc<RealmHandle>) {
        realm.lock().leave(id);
        self.drop_realm_if_idle(realm);
        let removed = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if removed.is_some() {
            self.metrics.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// All realms with live state.
    pub fn realm_handles(&self) -> Vec<Arc<RealmHandle>> {
        self.realms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Expires call timeouts in every realm.
    /// Expires the calls whose deadline passed, visiting only realms with deadlines.
    pub fn tick(&self, now: Instant) {
        let list = std::mem::take(&mut *self.ticking.0.lock().unwrap_or_else(|p| p.into_inner()));
        let mut keep = Vec::with_capacity(list.len());
        for weak in list {
            let Some(r) = weak.upgrade() else { continue };
            let mut core = r.core.lock().unwrap_or_else(|p| p.into_inner());
            core.tick(now);
            if core.has_deadlines() {
                keep.push(weak);
            } else {
                r.in_ticking.store(false, Ordering::Relaxed);
            }
        }
        if !keep.is_empty() {
            self.ticking
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(keep);
        }
    }

    /// Realms the timer visits (for tests and metrics).
    pub fn ticking_realms(&self) -> usize {
        self.ticking
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Closes every session with `message` (e.g. `wamp.close.system_shutdown` on shutdown).
    pub fn close_all_sessions(&self, message: Message) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for s in sessions.values() {
            s.outbox.close_with(message.clone());
        }
    }
}
