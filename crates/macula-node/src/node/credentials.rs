//! Applying a new configuration (a reload of the config directory, realm states learned from
//! the mesh) and closing the sessions it no longer admits.

#[allow(unused_imports)]
use super::*;

impl Node {
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
            authenticator: Authenticator::new(operator, revoked)
                .with_local_tickets(self.tickets.clone()),
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
