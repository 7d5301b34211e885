//! Realm states: a realm's policy as signed by its own authority, flooded to every node; the
//! highest sequence wins, tombstones answer old states and are collected after the retention.

#[allow(unused_imports)]
use super::*;

impl MeshState {
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
    pub(crate) fn signed_part(&self) -> Vec<u8> {
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
