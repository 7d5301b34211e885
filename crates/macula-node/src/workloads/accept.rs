//! Judging a deploy record with this node's credentials: the key's chain to the trust root, its
//! revocation, its holder's signature over the record, and the realm's policy (the key's role
//! must reach the realm and grant `realm:deploy`).

use macula_router::auth::credential;
use macula_workloads::lease::{Ask, Cfg};
use macula_workloads::record::{DeployRecord, Refused, Signer};

use crate::confdir::now_secs;
use crate::node::Node;

/// Takes `record` if it holds (see `macula_workloads::record`) and keeps it on disk; returns it
/// as taken (to flood on). `entry`: it comes from its signer, not a peer (this node then gives
/// the workload's new slots their first lease configuration, from the realm's nodes it sees).
/// Writes a file: call it off the async runtime's threads.
pub fn accept(node: &Node, record: DeployRecord, entry: bool) -> Result<DeployRecord, Refused> {
    if record.key.len() > credential::MAX_KEY_LEN || record.sig.len() != 64 {
        return Err(Refused::Unverified(
            "not a key's public form and signature".into(),
        ));
    }
    let auth = node.auth();
    let verify = |public: &str, digest: &[u8; 32], sig: &[u8]| -> Result<Signer, String> {
        let v = credential::verify_public(public, auth.authenticator.operator(), now_secs())
            .map_err(|e| e.to_string())?;
        if auth.authenticator.is_revoked(&v.claims.kid) {
            return Err(format!("key {} was revoked", v.claims.kid));
        }
        if !credential::verify_session_proof(&v.claims, digest, sig) {
            return Err("the signature is not the key holder's".into());
        }
        Ok(Signer {
            key_realm: v.claims.realm.clone(),
            role: v.claims.role.clone(),
        })
    };
    // The signer's role must reach the realm and grant `realm:deploy`; the role its workload's
    // sessions get must exist and be the signer's own or one with no `realm:` permission (a
    // developer cannot start an admin).
    let may_deploy = |realm: &str, s: &Signer, workload_role: Option<&str>| {
        let policy = node
            .role_admitted(realm, &s.key_realm, &s.role)
            .map_err(|(_, why)| why)?;
        if !policy.allows_realm_action(&s.role, "deploy") {
            return Err(String::new());
        }
        let Some(role) = workload_role else {
            return Ok(());
        };
        let Some(doc) = policy.doc.roles.iter().find(|r| r.name == role) else {
            return Err(format!("realm {realm} has no role {role:?}"));
        };
        if role != s.role && doc.permissions.iter().any(|p| p.starts_with("realm:")) {
            return Err(format!(
                "{role} has realm permissions ({}); a {} key may start workloads as {} or as a role without them",
                doc.permissions.iter().filter(|p| p.starts_with("realm:")).cloned().collect::<Vec<_>>().join(", "),
                s.role,
                s.role
            ));
        }
        Ok(())
    };
    // The realm's plan limits the instances its workloads ask for at once.
    let max_instances = node
        .policy_for(&record.realm)
        .and_then(|p| p.doc.max_instances);
    let nodes = entry.then(|| realm_nodes(node, &record.realm));
    let mut records = node.workloads.records.lock();
    let before = records.get(&record.realm, &record.name).cloned();
    let (taken, _) = records.accept(record, verify, may_deploy, max_instances, nodes.as_deref())?;
    if let Err(e) = node.workloads.save(&records) {
        tracing::error!("keeping the deploy records: {e}");
    }
    drop(records);
    // A record of the same sequence took the place of the one this node had: the slots' first
    // configurations of the one replaced are not theirs (an authority that took one on stops
    // granting under it).
    if let Some(lost) = before.filter(|b| b.seq == taken.seq) {
        tracing::warn!(
            realm = taken.realm,
            name = taken.name,
            seq = taken.seq,
            "two records of one sequence: keeping the lower"
        );
        for i in 0..lost.genesis.covered() {
            for slot in [
                macula_workloads::wire::slot(&taken.realm, &taken.name, i),
                macula_workloads::wire::permit(&taken.realm, &taken.name, i),
            ] {
                if let Some(old) = lost.genesis.cfg(&slot, i) {
                    if taken.genesis.cfg(&slot, i).as_ref() != Some(&old) {
                        node.leases.abandon(&slot, &old);
                    }
                }
            }
        }
    }
    Ok(taken)
}

/// This node's id among a realm's nodes: its mesh peer id (`local` without a mesh).
pub fn node_id(node: &Node) -> String {
    crate::mesh::of(node).map_or_else(|| "local".to_owned(), |m| m.handle.peer_id().to_string())
}

/// The nodes of `realm` as this node sees them now: itself and the linked peers that may serve
/// it, sorted.
pub fn realm_nodes(node: &Node, realm: &str) -> Vec<String> {
    let me = node_id(node);
    let mut v = vec![];
    if node.peer_may_serve(realm, &me) != Some(false) {
        v.push(me);
    }
    if let Some(m) = crate::mesh::of(node) {
        for p in m.handle.peers() {
            let p = p.to_string();
            if node.peer_may_serve(realm, &p) != Some(false) {
                v.push(p);
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// `slot`'s first lease configuration, from the deploy record of its workload (a replica's
/// slot `realm/name/i`, or a rollout permit `realm/name@rollout/k`).
pub fn genesis(node: &Node, slot: &str) -> Option<Cfg> {
    let (realm, name, i) = macula_workloads::wire::parse_slot(slot)?;
    let name = name.strip_suffix("@rollout").unwrap_or(name);
    let records = node.workloads.records.lock();
    records.get(realm, name)?.genesis.cfg(slot, i)
}

/// Before this node's authority answers `ask`: a slot it keeps nothing of, asked under its
/// first configuration (which names this node), is taken on from the deploy record.
pub fn adopt_for(node: &Node, ask: &Ask) {
    let Some(cfg) = ask.cfg.as_ref().filter(|c| c.epoch == 1) else {
        return;
    };
    let slot = ask.req.slot_holder().0;
    if !cfg.has(&node_id(node)) || node.leases.newest(slot).is_some() {
        return;
    }
    if genesis(node, slot).as_ref() == Some(cfg) {
        node.leases.adopt(slot, cfg.clone());
    }
}
