//! Workload identity: each replica gets a ticket (`wt_...`, in `MACULA_KEY`) that this node
//! alone accepts, for the replica's own realm, while the replica runs. Its session has the role
//! the manifest names and the authid `workload:<name>/<replica>`; other nodes take that role
//! from the realm's deploy record (see `mesh::proven`), not from this node's word. No secret is
//! written into the manifest or the record, and a ticket dies with its replica. Imports nothing
//! of the node.

use std::collections::HashMap;

use macula_router::auth::{Identity, LocalTickets, SessionProof};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// What a ticket stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub realm: String,
    pub name: String,
    pub replica: u32,
    pub role: String,
    /// The realm registration's authority when the ticket was made.
    pub authority: [u8; 32],
}

/// The authid of replica `i` of workload `name`, and what a session proof carries for it.
pub fn authid(name: &str, replica: u32) -> String {
    format!("workload:{name}/{replica}")
}

/// This node's live tickets, by their SHA-256.
#[derive(Default)]
pub struct Tickets {
    live: Mutex<HashMap<[u8; 32], Ticket>>,
}

impl Tickets {
    /// A new ticket for `t`.
    pub fn issue(&self, t: Ticket) -> String {
        let ticket = macula_common::ids::random_id(macula_router::auth::LOCAL_TICKET_PREFIX, 32);
        self.live.lock().insert(Sha256::digest(&ticket).into(), t);
        ticket
    }

    /// The ticket is no longer valid (its replica stopped).
    pub fn revoke(&self, ticket: &str) {
        self.live
            .lock()
            .remove(&<[u8; 32]>::from(Sha256::digest(ticket)));
    }
}

impl LocalTickets for Tickets {
    fn identity(&self, ticket: &str, realm: &str) -> Option<Identity> {
        let t = self
            .live
            .lock()
            .get(&<[u8; 32]>::from(Sha256::digest(ticket)))
            .cloned()?;
        if t.realm != realm {
            return None;
        }
        let id = authid(&t.name, t.replica);
        Some(Identity {
            realm: t.realm.clone(),
            key_realm: t.realm,
            role: t.role,
            kid: id.clone(),
            name: id.clone(),
            method: "ticket",
            expires_at: 0,
            authority: t.authority,
            // Other nodes check the workload's record for its role: nothing to sign.
            proof: Some(SessionProof {
                public: id,
                nonce: [0; 32],
                sig: [0; 64],
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Ticket {
        Ticket {
            realm: "com.example.a".into(),
            name: "api".into(),
            replica: 1,
            role: "service_account".into(),
            authority: [7; 32],
        }
    }

    #[test]
    fn a_ticket_is_its_replica_in_its_realm_until_revoked() {
        let t = Tickets::default();
        let secret = t.issue(ticket());
        let id = t.identity(&secret, "com.example.a").expect("its own realm");
        assert_eq!(
            (id.kid.as_str(), id.role.as_str(), id.authority),
            ("workload:api/1", "service_account", [7; 32])
        );
        // Not another realm, not a subrealm, not a guessed or altered ticket.
        assert!(t.identity(&secret, "com.example.b").is_none());
        assert!(t.identity(&secret, "com.example.a.sub").is_none());
        let mut altered = secret.clone();
        let last = altered.pop();
        altered.push(if last == Some('x') { 'y' } else { 'x' });
        assert!(t.identity(&altered, "com.example.a").is_none());
        // Two replicas get two tickets; stopping one ends only its own.
        let other = t.issue(Ticket {
            replica: 2,
            ..ticket()
        });
        t.revoke(&secret);
        assert!(t.identity(&secret, "com.example.a").is_none());
        assert!(t.identity(&other, "com.example.a").is_some());
    }
}
