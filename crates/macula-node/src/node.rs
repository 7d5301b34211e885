//! The node's shared state: realms, the authenticator, live sessions, metrics — and admission
//! (which realm and policy an authenticated identity joins).

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

/// A realm and the lock around its router core.
pub struct RealmHandle {
    pub name: String,
    core: Mutex<Realm<NodePeer>>,
    /// This handle, for the list of realms to tick.
    me: std::sync::Weak<RealmHandle>,
    /// Whether the handle is in `ticking` (its dealer has call deadlines).
    in_ticking: std::sync::atomic::AtomicBool,
    ticking: Arc<Ticking>,
    /// The member answering the node's own procedures (`macula.dht.*`), when the mesh is on.
    pub service: Option<Id>,
    /// Whether this node announced itself as serving the realm (a DHT provider record, which
    /// makes the realm's other serving nodes connect to it). Only nodes with sessions of their
    /// own do: a node that merely holds a peer's interest does not pull the whole realm in.
    provided: std::sync::atomic::AtomicBool,
}

impl RealmHandle {
    /// Whether sessions of this node joined the realm (it is then a provider of it).
    pub fn serves_sessions(&self) -> bool {
        self.provided.load(Ordering::Acquire)
    }

    /// Locks the realm's core; a poisoned lock (a panic elsewhere) is recovered, not propagated.
    /// When the guard is dropped, a realm that now has call deadlines joins the node's list of
    /// realms to tick (one atomic load otherwise).
    pub fn lock(&self) -> RealmGuard<'_> {
        let guard = match self.core.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        RealmGuard {
            guard,
            handle: self,
        }
    }
}

/// The realms whose dealers have call deadlines: the only ones the node's timer visits, so
/// that idle realms cost no periodic work.
#[derive(Default)]
pub struct Ticking(Mutex<Vec<std::sync::Weak<RealmHandle>>>);

/// A locked realm (see [`RealmHandle::lock`]).
pub struct RealmGuard<'a> {
    guard: std::sync::MutexGuard<'a, Realm<NodePeer>>,
    handle: &'a RealmHandle,
}

impl std::ops::Deref for RealmGuard<'_> {
    type Target = Realm<NodePeer>;
    fn deref(&self) -> &Realm<NodePeer> {
        &self.guard
    }
}

impl std::ops::DerefMut for RealmGuard<'_> {
    fn deref_mut(&mut self) -> &mut Realm<NodePeer> {
        &mut self.guard
    }
}

impl Drop for RealmGuard<'_> {
    fn drop(&mut self) {
        // Under the realm's lock, so the timer's removal (also under it) cannot race this.
        if !self.handle.in_ticking.load(Ordering::Relaxed) && self.guard.has_deadlines() {
            self.handle.in_ticking.store(true, Ordering::Relaxed);
            self.handle
                .ticking
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(self.handle.me.clone());
        }
    }
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

/// Authentication and policy state, replaced as a whole on reload.
pub struct AuthState {
    pub authenticator: Authenticator,
    pub policies: HashMap<String, Arc<Policy>>,
    /// Each known realm's own authority (from its certificate).
    pub authorities: HashMap<String, [u8; 32]>,
}

impl AuthState {
    /// The registered realm that governs `realm`: itself if this node knows its policy, else
    /// its nearest known ancestor.
    pub fn registration_of<'a>(&self, realm: &'a str) -> Option<&'a str> {
        let mut r = realm;
        loop {
            if self.policies.contains_key(r) {
                return Some(r);
            }
            r = &r[..r.rfind('.')?];
        }
    }

    /// Whether a key signed by `authority` may enter `realm`: only if it is the authority of
    /// the registration governing the realm, or one that registration lists (a parent held by
    /// the same owner). This is what binds a key to one registration of one realm: a parent
    /// registered by another account, an earlier registration of the name, or the seller of a
    /// transferred realm all hold other authorities.
    /// The owner group of `realm` for per-owner limits: the authority at the top of the chain of
    /// registrations one owner holds above (and including) its governing registration, so that
    /// an owner's subrealm registrations share one budget.
    pub fn owner_group(&self, realm: &str) -> Option<String> {
        let gov = self.registration_of(realm)?;
        if let Some(top) = self.policies.get(gov).and_then(|p| p.top_authority()) {
            return Some(top.to_ascii_lowercase());
        }
        self.authorities.get(gov).map(hex::encode)
    }

    pub fn accepts(&self, realm: &str, authority: &[u8; 32]) -> bool {
        let Some(gov) = self.registration_of(realm) else {
            return false;
        };
        self.authorities.get(gov) == Some(authority)
            || self
                .policies
                .get(gov)
                .is_some_and(|p| p.lists_authority(authority))
    }
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
}

impl Node {
    pub fn new(loaded: Loaded, confdir: Option<ConfDir>) -> Arc<Node> {
        let auth = AuthState {
            authenticator: Authenticator::new(loaded.operator, loaded.revoked.clone()),
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
            quota_used: parking_lot::Mutex::new(HashMap::new()),
            events,
            events_rx: parking_lot::Mutex::new(events_rx),
            me: me.clone(),
        })
    }

    pub fn auth(&self) -> Arc<AuthState> {
        match self.auth.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The policy governing `realm`: its own, or the nearest parent's if that parent has roles
    /// that extend to subrealms.
    pub fn policy_for(&self, realm: &str) -> Option<Arc<Policy>> {
        let auth = self.auth();
        if let Some(p) = auth.policies.get(realm) {
            return Some(p.clone());
        }
        let mut r = realm;
        while let Some(i) = r.rfind('.') {
            r = &r[..i];
            if let Some(p) = auth.policies.get(r) {
                return p.governs_subrealms().then(|| p.clone());
            }
        }
        None
    }

    /// This node's mesh peer id as bytes (what session proofs name), when the mesh is on.
    pub fn mesh_peer_bytes(&self) -> Option<&[u8]> {
        self.mesh.get().map(|m| m.peer_bytes())
    }

    /// Whether a key of `key_realm` with `role` may act in `realm` here now: the realm exists,
    /// is neither deleted nor disabled, has the role, and — from a parent realm's key, or
    /// under a parent's policy — the role extends to subrealms. The governing policy, or the
    /// WAMP error and message. What a session's join checks, and what a peer's proof of one of
    /// its sessions must pass too.
    pub fn role_admitted(
        &self,
        realm: &str,
        key_realm: &str,
        role: &str,
    ) -> Result<Arc<Policy>, (&'static str, String)> {
        let Some(policy) = self.policy_for(realm) else {
            return Err((
                errors::NO_SUCH_REALM,
                format!("realm {realm} does not exist on this node (create it with `macula realms create {realm}`)"),
            ));
        };
        if policy.doc.deleted {
            return Err((
                errors::NO_SUCH_REALM,
                format!("realm {} was deleted", policy.realm()),
            ));
        }
        if let Some(why) = &policy.doc.disabled {
            return Err((
                errors::REALM_DISABLED,
                format!("realm {} is disabled: {why}", policy.realm()),
            ));
        }
        if !policy.has_role(role) {
            return Err((
                errors::NO_SUCH_ROLE,
                format!("realm {} has no role {role:?}", policy.realm()),
            ));
        }
        // A key issued for a parent realm enters a subrealm only through a role that the *key's*
        // realm marks `subrealms: true`; a role of the same name in the subrealm's own policy
        // is not enough.
        if key_realm != realm {
            let key_policy = self.policy_for(key_realm);
            if !key_policy.is_some_and(|p| p.role_covers_subrealms(role)) {
                return Err((
                    errors::AUTHORIZATION_FAILED,
                    format!("the key's role {role:?} of {key_realm} does not extend to subrealm {realm}"),
                ));
            }
        }
        if policy.realm() != realm && !policy.role_covers_subrealms(role) {
            return Err((
                errors::AUTHORIZATION_FAILED,
                format!(
                    "role {role:?} of {} does not extend to subrealm {realm}",
                    policy.realm()
                ),
            ));
        }
        Ok(policy)
    }

    /// Decides whether `identity` may join its realm; returns the realm to join or the ABORT.
    pub fn admit(&self, identity: &Identity) -> Result<Arc<RealmHandle>, Message> {
        // The listeners open a moment before the mesh is up: a session admitted then would get
        // no proof of its role for other nodes, for its whole life.
        if self.config.mesh.enabled && self.mesh.get().is_none() {
            return Err(abort(
                errors::NOT_READY,
                "this node is still starting (joining the mesh); retry in a moment",
            ));
        }
        // Until the mesh's realm states are in, a realm known only through an ancestor may be a
        // registration of its own whose state has not arrived: refuse rather than let the
        // ancestor's keys govern it.
        if !self.states_synced() {
            let auth = self.auth();
            if auth.registration_of(&identity.realm) != Some(identity.realm.as_str()) {
                return Err(abort(
                    errors::NOT_READY,
                    format!(
                        "this node is still learning realm states from the mesh; retry {} in a moment",
                        identity.realm
                    ),
                ));
            }
        }
        if !self.auth().accepts(&identity.realm, &identity.authority) {
            return Err(abort(
                errors::AUTHENTICATION_FAILED,
                format!(
                    "this key was not issued by the authority of realm {}'s current registration \
                     (the realm, or the parent the key is for, belongs to another owner, was \
                     registered anew or transferred): create a new key for {}",
                    identity.realm, identity.realm
                ),
            ));
        }
        let policy = self
            .role_admitted(&identity.realm, &identity.key_realm, &identity.role)
            .map_err(|(uri, msg)| abort(uri, msg))?;
        if let Some(why) = &policy.doc.quota_exceeded {
            return Err(abort(errors::QUOTA_EXCEEDED, why.clone()));
        }
        let me = (!policy.doc.nodes.is_empty())
            .then(|| self.mesh.get().map(|m| m.peer_id()))
            .flatten();
        if let Some(me) = me {
            if !policy.may_serve(&me) {
                return Err(abort(
                    errors::AUTHORIZATION_FAILED,
                    format!(
                        "realm {} is served only by its dedicated nodes, and this node ({me}) is not one: connect to one of them",
                        policy.realm()
                    ),
                ));
            }
        }
        if self.metrics.sessions.load(Ordering::Relaxed) as usize >= self.config.limits.max_sessions
        {
            return Err(abort(
                errors::SYSTEM_SHUTDOWN,
                "this node is at its session limit (limits.max_sessions); try another node",
            ));
        }
        let realm = self.realm_handle_or_create(&identity.realm, policy);
        if let Some(m) = self.mesh.get() {
            if !realm.provided.swap(true, Ordering::AcqRel) {
                m.start_discovery(&realm.name);
            }
        }
        Ok(realm)
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

    /// The usage counter for a session (or bridge request) of `identity`, when metering is on.
    /// Refused with ABORT `macula.error.limit_exceeded` when the node cannot meter one more
    /// pair for it: usage is never counted where it would not be billed.
    pub fn counter_for(
        &self,
        identity: &Identity,
    ) -> Result<Option<crate::meter::Counter>, Message> {
        let Some(meter) = &self.meter else {
            return Ok(None);
        };
        let owner = self
            .auth()
            .owner_group(&identity.realm)
            .unwrap_or_else(|| hex::encode(identity.authority));
        meter
            .counter_for(&identity.realm, &identity.kid, &owner)
            .map(Some)
            .map_err(|why| {
                self.metrics.meter_refused.fetch_add(1, Ordering::Relaxed);
                abort(errors::LIMIT_EXCEEDED, why.to_string())
            })
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

    /// Closes the sessions whose key has expired (a key's expiry holds for live sessions, not
    /// only at join). Called once a second; returns how many were closed.
    pub fn close_expired_sessions(&self, now_secs: u64) -> usize {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for s in sessions.values() {
            if s.expires_at != 0 && s.expires_at <= now_secs && !s.outbox.is_closed() {
                s.outbox.close_with(goodbye(
                    errors::CREDENTIAL_EXPIRED,
                    format!(
                        "key {} expired at {}: create a new key",
                        s.kid,
                        crate::confdir::rfc3339(s.expires_at)
                    ),
                ));
                closed += 1;
            }
        }
        closed
    }

    /// Applies a freshly loaded configuration: new policies and revocations take effect for new
    /// operations at once; sessions whose key was revoked or whose role disappeared are closed.
    pub fn apply(&self, loaded: Loaded) {
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = loaded;
        if let Some(m) = self.mesh.get() {
            m.publish_local_states(self);
        }
        self.rebuild_auth();
    }

    /// Policy file sequence numbers of the config directory's realms.
    pub fn local_seqs(&self) -> Vec<(String, u64)> {
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.seqs.iter().map(|(r, s)| (r.clone(), *s)).collect()
    }

    /// Recomputes policies and revocations from the config directory and the realm states
    /// learned from the mesh (a newer signed state wins over an older local file), then applies
    /// them.
    pub fn rebuild_auth(&self) {
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut policies = local.policies;
        let mut authorities = local.authorities;
        if let Some(m) = self.mesh.get() {
            for st in m.learned_states() {
                let realm = &st.realm;
                let local_seq = local.seqs.get(realm).copied().unwrap_or(0);
                // A realm this node's operator made by hand (generation 0) is this node's own:
                // a registration of the same name elsewhere under the trust root (another
                // authority) does not take it over here, however high its sequence.
                let hand_made = policies.contains_key(realm) && local_seq >> 32 == 0;
                if hand_made && authorities.get(realm) != st.authority.as_ref() {
                    continue;
                }
                if st.seq > local_seq || !policies.contains_key(realm) {
                    if let (Ok(p), Some(a)) = (Policy::from_yaml(&st.policy), st.authority) {
                        policies.insert(realm.clone(), Arc::new(p));
                        authorities.insert(realm.clone(), a);
                    }
                }
            }
        }
        let revoked = policies
            .values()
            .flat_map(|p| p.doc.revoked_keys.iter().cloned())
            .collect();
        self.install(local.operator, policies, authorities, revoked);
    }

    fn install(
        &self,
        operator: ed25519_dalek::VerifyingKey,
        policies: HashMap<String, Arc<Policy>>,
        authorities: HashMap<String, [u8; 32]>,
        revoked: std::collections::HashSet<String>,
    ) {
        self.any_dedicated.store(
            policies.values().any(|p| !p.doc.nodes.is_empty()),
            Ordering::Relaxed,
        );
        let auth = Arc::new(AuthState {
            authenticator: Authenticator::new(operator, revoked),
            policies,
            authorities,
        });
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = auth.clone();
        for r in self.realm_handles() {
            let policy = self.policy_for(&r.name);
            let mut core = r.lock();
            // Who may no longer be here: everyone if the realm lost its policy; otherwise sessions
            // whose role is gone, or (in a subrealm governed by its parent) no longer extends here.
            let (closing, uri, why) = match &policy {
                None => (
                    core.sessions_where(|_| true),
                    errors::AUTHORIZATION_FAILED,
                    "the realm no longer exists on this node",
                ),
                Some(p) if p.doc.deleted => (
                    core.sessions_where(|_| true),
                    errors::NO_SUCH_REALM,
                    "the realm was deleted",
                ),
                Some(p) if p.doc.disabled.is_some() => {
                    core.set_policy(p.clone());
                    (
                        core.sessions_where(|_| true),
                        errors::REALM_DISABLED,
                        "the realm was disabled (suspended or expired)",
                    )
                }
                Some(p) => {
                    core.set_policy(p.clone());
                    let subrealm = p.realm() != r.name;
                    let out = core.sessions_where(|i| {
                        !p.has_role(&i.authrole)
                            || (subrealm && !p.role_covers_subrealms(&i.authrole))
                    });
                    (
                        out,
                        errors::AUTHORIZATION_FAILED,
                        "the session's role was removed from the realm policy",
                    )
                }
            };
            drop(core);
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            for id in closing {
                if let Some(s) = sessions.get(&id) {
                    s.outbox.close_with(goodbye(uri, why));
                }
            }
        }
        // Peers' interest and registrations held for sessions whose keys no longer stand.
        if let Some(m) = self.mesh.get() {
            m.credentials_changed(self);
        }
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for s in sessions.values() {
            if auth.authenticator.is_revoked(&s.kid) {
                s.outbox.close_with(goodbye(
                    errors::CREDENTIAL_REVOKED,
                    format!("key {} was revoked", s.kid),
                ));
            } else if !auth.accepts(&s.realm, &s.authority) {
                s.outbox.close_with(goodbye(
                    errors::CREDENTIAL_REVOKED,
                    format!(
                        "key {} no longer belongs to realm {} (the realm was deleted, registered \
                         anew or transferred)",
                        s.kid, s.realm
                    ),
                ));
            }
        }
    }

    /// Closes every session with `message` (e.g. `wamp.close.system_shutdown` on shutdown).
    pub fn close_all_sessions(&self, message: Message) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for s in sessions.values() {
            s.outbox.close_with(message.clone());
        }
    }

    /// Re-reads the config directory; errors leave the running configuration in place.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.confdir else {
            return Ok(());
        };
        let loaded = crate::confdir::Load::load(dir)?;
        self.apply(loaded);
        Ok(())
    }
}
