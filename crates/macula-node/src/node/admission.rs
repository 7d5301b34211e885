//! The credentials in force and admission: which realm, role and policy an authenticated
//! identity joins, and what a peer's proof of a session may hold.

#[allow(unused_imports)]
use super::*;

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

impl Node {
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
        // A key enters its own realm and its subrealms, never a sibling's or a parent's.
        if !macula_wamp::uri::is_same_or_subrealm(realm, key_realm) {
            return Err((
                errors::AUTHORIZATION_FAILED,
                format!("the key is for realm {key_realm}, not {realm}"),
            ));
        }
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
}
