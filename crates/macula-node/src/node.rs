//! The node's shared state: realms, the authenticator, live sessions, metrics — and admission
//! (which realm and policy an authenticated identity joins).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use macula_router::auth::{abort, goodbye, Authenticator, Identity};
use macula_router::policy::Policy;
use macula_router::{Realm, RealmConfig};
use macula_wamp::{errors, Id, Message};

use crate::confdir::{ConfDir, Loaded};
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, SessionPeer};

/// A realm and the lock around its router core.
pub struct RealmHandle {
    pub name: String,
    pub core: Mutex<Realm<SessionPeer>>,
}

impl RealmHandle {
    /// Locks the realm's core; a poisoned lock (a panic elsewhere) is recovered, not propagated.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Realm<SessionPeer>> {
        match self.core.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// A live session, for revocation and policy changes.
struct LiveSession {
    kid: String,
    outbox: Arc<Outbox>,
}

/// Authentication and policy state, replaced as a whole on reload.
pub struct AuthState {
    pub authenticator: Authenticator,
    pub policies: HashMap<String, Arc<Policy>>,
}

/// The node.
pub struct Node {
    pub config: NodeConfig,
    pub metrics: Arc<Metrics>,
    pub confdir: Option<ConfDir>,
    auth: RwLock<Arc<AuthState>>,
    realms: Mutex<HashMap<String, Arc<RealmHandle>>>,
    sessions: Mutex<HashMap<Id, LiveSession>>,
}

impl Node {
    pub fn new(loaded: Loaded, confdir: Option<ConfDir>) -> Arc<Node> {
        let auth = AuthState {
            authenticator: Authenticator::new(loaded.operator, loaded.revoked),
            policies: loaded.policies,
        };
        Arc::new(Node {
            config: loaded.config,
            metrics: Arc::new(Metrics::default()),
            confdir,
            auth: RwLock::new(Arc::new(auth)),
            realms: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
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

    /// Decides whether `identity` may join its realm; returns the realm to join or the ABORT.
    pub fn admit(&self, identity: &Identity) -> Result<Arc<RealmHandle>, Message> {
        let Some(policy) = self.policy_for(&identity.realm) else {
            return Err(abort(
                errors::NO_SUCH_REALM,
                format!("realm {} does not exist on this node (create it with `macula realms create {}`)", identity.realm, identity.realm),
            ));
        };
        if !policy.has_role(&identity.role) {
            return Err(abort(
                errors::NO_SUCH_ROLE,
                format!("realm {} has no role {:?}", policy.realm(), identity.role),
            ));
        }
        // A key issued for a parent realm enters a subrealm only through a role that the *key's*
        // realm marks `subrealms: true`; a role of the same name in the subrealm's own policy
        // is not enough.
        if identity.key_realm != identity.realm {
            let key_policy = self.policy_for(&identity.key_realm);
            if !key_policy.is_some_and(|p| p.role_covers_subrealms(&identity.role)) {
                return Err(abort(
                    errors::AUTHORIZATION_FAILED,
                    format!(
                        "the key's role {:?} of {} does not extend to subrealm {}",
                        identity.role, identity.key_realm, identity.realm
                    ),
                ));
            }
        }
        if policy.realm() != identity.realm && !policy.role_covers_subrealms(&identity.role) {
            return Err(abort(
                errors::AUTHORIZATION_FAILED,
                format!(
                    "role {:?} of {} does not extend to subrealm {}",
                    identity.role,
                    policy.realm(),
                    identity.realm
                ),
            ));
        }
        if self.metrics.sessions.load(Ordering::Relaxed) as usize >= self.config.limits.max_sessions
        {
            return Err(abort(
                errors::SYSTEM_SHUTDOWN,
                "this node is at its session limit (limits.max_sessions); try another node",
            ));
        }
        let mut realms = self.realms.lock().unwrap_or_else(|p| p.into_inner());
        let handle = realms
            .entry(identity.realm.clone())
            .or_insert_with(|| {
                let config = RealmConfig {
                    default_call_timeout: self.config.limits.call_timeout(),
                    max_subscriptions_per_session: self.config.limits.max_subscriptions_per_session,
                    max_registrations_per_session: self.config.limits.max_registrations_per_session,
                };
                Arc::new(RealmHandle {
                    name: identity.realm.clone(),
                    core: Mutex::new(Realm::new(
                        &identity.realm,
                        policy.clone(),
                        config,
                        rand::random(),
                    )),
                })
            })
            .clone();
        Ok(handle)
    }

    /// Records a joined session.
    pub fn session_joined(&self, id: Id, kid: &str, outbox: Arc<Outbox>) {
        self.metrics.sessions.fetch_add(1, Ordering::Relaxed);
        self.metrics.sessions_total.fetch_add(1, Ordering::Relaxed);
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.insert(
            id,
            LiveSession {
                kid: kid.to_owned(),
                outbox,
            },
        );
    }

    /// Removes a session from its realm and the live table.
    pub fn session_left(&self, id: Id, realm: &Arc<RealmHandle>) {
        realm.lock().leave(id);
        // Forget the realm's state once nobody is in it, so that joining many (sub)realms does
        // not grow the node without bound. Only when no one else holds the handle: a connection
        // being admitted to it right now keeps it alive (the map and `realm` are two references).
        {
            let mut realms = self.realms.lock().unwrap_or_else(|p| p.into_inner());
            if Arc::strong_count(realm) <= 2 && realm.lock().session_count() == 0 {
                realms.remove(&realm.name);
            }
        }
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
    pub fn tick(&self, now: Instant) {
        for r in self.realm_handles() {
            r.lock().tick(now);
        }
    }

    /// Applies a freshly loaded configuration: new policies and revocations take effect for new
    /// operations at once; sessions whose key was revoked or whose role disappeared are closed.
    pub fn apply(&self, loaded: Loaded) {
        let auth = Arc::new(AuthState {
            authenticator: Authenticator::new(loaded.operator, loaded.revoked),
            policies: loaded.policies,
        });
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = auth.clone();
        for r in self.realm_handles() {
            let policy = self.policy_for(&r.name);
            let mut core = r.lock();
            // Who may no longer be here: everyone if the realm lost its policy; otherwise sessions
            // whose role is gone, or (in a subrealm governed by its parent) no longer extends here.
            let (closing, why) = match &policy {
                None => (
                    core.sessions_where(|_| true),
                    "the realm no longer exists on this node",
                ),
                Some(p) => {
                    core.set_policy(p.clone());
                    let subrealm = p.realm() != r.name;
                    let out = core.sessions_where(|i| {
                        !p.has_role(&i.authrole)
                            || (subrealm && !p.role_covers_subrealms(&i.authrole))
                    });
                    (out, "the session's role was removed from the realm policy")
                }
            };
            drop(core);
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            for id in closing {
                if let Some(s) = sessions.get(&id) {
                    s.outbox
                        .close_with(goodbye(errors::AUTHORIZATION_FAILED, why));
                }
            }
        }
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for s in sessions.values() {
            if auth.authenticator.is_revoked(&s.kid) {
                s.outbox.close_with(goodbye(
                    errors::CREDENTIAL_REVOKED,
                    format!("key {} was revoked", s.kid),
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
        let loaded = dir.load()?;
        self.apply(loaded);
        Ok(())
    }
}
