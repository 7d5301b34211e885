//! Mesh admission: the operator certifies each node's peer id for a limited time, and can revoke
//! a node. A node exchanges traffic (mesh frames, Kademlia records) only with peers that present
//! a valid, unexpired, unrevoked certificate signed by the trust root it was configured with.
//!
//! - A [`NodeCert`] binds a peer id to a validity window (`issued_at..not_after`, at most
//!   [`MAX_LIFETIME_SECS`]) and to the time the operator first admitted the node (`admitted_at`:
//!   a renewal keeps it). Wire form:
//!   `[3, issued_at u64, not_after u64, admitted_at u64, signature 64]`.
//! - A [`Revocation`] (signed by the operator) revokes every certificate of a peer admitted at
//!   or before its `revoked_at`, renewals included: a node cut off stays cut off whatever
//!   certificate it kept or got renewed by a node that had not heard of the revocation yet, and
//!   may be admitted again only by a new certificate from the operator. Revocations spread over the mesh like realm states and
//!   are kept until every certificate they cover has expired anyway ([`Trust::collect`]).
//! - [`Trust`] is what a node checks peers against: the operator's key and the revocations.

use std::collections::HashMap;

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use libp2p::PeerId;
use parking_lot::RwLock;

const CERT_DOMAIN: &[u8] = b"macula-node-cert/v3:";
const REVOKE_DOMAIN: &[u8] = b"macula-node-revocation/v1:";
const CERT_VERSION: u8 = 3;
const REVOKE_VERSION: u8 = 1;
/// Longest validity a certificate may have (a certificate claiming more is refused), so that a
/// revocation can be forgotten once this long has passed.
pub const MAX_LIFETIME_SECS: u64 = 400 * 86_400;
/// How far in the future `issued_at` may be (clocks of two machines differ).
pub const CLOCK_SKEW_SECS: u64 = 300;
/// Revocations kept at most (each is a hundred bytes; beyond this the oldest are dropped, and
/// they have long expired in any realistic deployment).
pub const MAX_REVOCATIONS: usize = 100_000;

/// Why a certificate (or revocation) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("the certificate is malformed (or of an older format: certify the node again)")]
    Malformed,
    #[error("the certificate is not the operator's signature over this peer id")]
    Signature,
    #[error("the certificate is not valid yet (issued in the future: check the clocks)")]
    NotYetValid,
    #[error("the certificate has expired")]
    Expired,
    #[error("the certificate's validity exceeds the 400-day maximum")]
    TooLong,
    #[error("the node was revoked by the operator")]
    Revoked,
}

/// A verified certificate's validity window (unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeCert {
    pub issued_at: u64,
    pub not_after: u64,
    /// When the operator admitted the node (the first certificate of its chain of renewals).
    pub admitted_at: u64,
}

impl NodeCert {
    /// Seconds of validity the certificate was issued with.
    pub fn lifetime(&self) -> u64 {
        self.not_after.saturating_sub(self.issued_at)
    }

    /// Whether less than a third of its lifetime is left at `now` (time to renew).
    pub fn due_for_renewal(&self, now: u64) -> bool {
        self.not_after.saturating_sub(now) < self.lifetime() / 3
    }
}

const CERT_LEN: usize = 1 + 24 + 64;

fn cert_message(peer: &PeerId, c: &NodeCert) -> Vec<u8> {
    let mut m = CERT_DOMAIN.to_vec();
    m.extend_from_slice(&c.issued_at.to_be_bytes());
    m.extend_from_slice(&c.not_after.to_be_bytes());
    m.extend_from_slice(&c.admitted_at.to_be_bytes());
    m.extend_from_slice(&peer.to_bytes());
    m
}

fn sign_cert(operator: &SigningKey, peer: &PeerId, c: &NodeCert) -> Vec<u8> {
    let sig = operator.sign(&cert_message(peer, c));
    let mut out = Vec::with_capacity(CERT_LEN);
    out.push(CERT_VERSION);
    out.extend_from_slice(&c.issued_at.to_be_bytes());
    out.extend_from_slice(&c.not_after.to_be_bytes());
    out.extend_from_slice(&c.admitted_at.to_be_bytes());
    out.extend_from_slice(&sig.to_bytes());
    out
}

/// The operator's certificate admitting `peer`, valid from `issued_at` until `not_after`.
pub fn issue(operator: &SigningKey, peer: &PeerId, issued_at: u64, not_after: u64) -> Vec<u8> {
    sign_cert(
        operator,
        peer,
        &NodeCert {
            issued_at,
            not_after,
            admitted_at: issued_at,
        },
    )
}

/// A renewal of `current` (the peer's valid certificate): `secs` more from `now`, the same
/// admission time, so revocations of the node cover it too.
pub fn renew(
    operator: &SigningKey,
    peer: &PeerId,
    current: &NodeCert,
    now: u64,
    secs: u64,
) -> Vec<u8> {
    sign_cert(
        operator,
        peer,
        &NodeCert {
            issued_at: now,
            not_after: now.saturating_add(secs.clamp(1, MAX_LIFETIME_SECS)),
            admitted_at: current.admitted_at.min(now),
        },
    )
}

/// A certificate for `peer` valid for `secs` seconds from now.
pub fn issue_for(operator: &SigningKey, peer: &PeerId, secs: u64) -> Vec<u8> {
    let now = now_secs();
    issue(
        operator,
        peer,
        now,
        now.saturating_add(secs.clamp(1, MAX_LIFETIME_SECS)),
    )
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Checks the signature and shape of `cert` for `peer` (not the time or revocations).
pub fn verify_signature(
    operator: &VerifyingKey,
    peer: &PeerId,
    cert: &[u8],
) -> Result<NodeCert, CertError> {
    if cert.len() != CERT_LEN || cert[0] != CERT_VERSION {
        return Err(CertError::Malformed);
    }
    let c = NodeCert {
        issued_at: u64_at(cert, 1),
        not_after: u64_at(cert, 9),
        admitted_at: u64_at(cert, 17),
    };
    let sig = Signature::from_slice(&cert[25..]).map_err(|_| CertError::Malformed)?;
    operator
        .verify(&cert_message(peer, &c), &sig)
        .map_err(|_| CertError::Signature)?;
    if c.not_after <= c.issued_at
        || c.not_after - c.issued_at > MAX_LIFETIME_SECS
        || c.admitted_at > c.issued_at
    {
        return Err(CertError::TooLong);
    }
    Ok(c)
}

/// The operator's statement "every certificate that admitted `peer` at or before `revoked_at`
/// (renewals included) is void".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub peer: PeerId,
    pub revoked_at: u64,
    /// The encoded, signed form (what is flooded and stored).
    pub bytes: Bytes,
}

fn revoke_message(peer: &[u8], revoked_at: u64) -> Vec<u8> {
    let mut m = REVOKE_DOMAIN.to_vec();
    m.extend_from_slice(&revoked_at.to_be_bytes());
    m.extend_from_slice(peer);
    m
}

impl Revocation {
    /// The operator revokes `peer` as of `revoked_at`.
    pub fn issue(operator: &SigningKey, peer: &PeerId, revoked_at: u64) -> Revocation {
        let id = peer.to_bytes();
        let sig = operator.sign(&revoke_message(&id, revoked_at));
        let mut out = vec![REVOKE_VERSION];
        out.extend_from_slice(&revoked_at.to_be_bytes());
        out.extend_from_slice(&sig.to_bytes());
        out.extend_from_slice(&id);
        Revocation {
            peer: *peer,
            revoked_at,
            bytes: Bytes::from(out),
        }
    }

    /// Decodes a revocation and checks the operator's signature.
    pub fn verify(operator: &VerifyingKey, bytes: &[u8]) -> Result<Revocation, CertError> {
        if bytes.len() < 1 + 8 + 64 + 1 || bytes.len() > 256 || bytes[0] != REVOKE_VERSION {
            return Err(CertError::Malformed);
        }
        let revoked_at = u64_at(bytes, 1);
        let sig = Signature::from_slice(&bytes[9..73]).map_err(|_| CertError::Malformed)?;
        let id = &bytes[73..];
        let peer = PeerId::from_bytes(id).map_err(|_| CertError::Malformed)?;
        operator
            .verify(&revoke_message(id, revoked_at), &sig)
            .map_err(|_| CertError::Signature)?;
        Ok(Revocation {
            peer,
            revoked_at,
            bytes: Bytes::copy_from_slice(bytes),
        })
    }
}

/// What a node checks peers against: the operator's key and the revocations it has seen.
pub struct Trust {
    operator: VerifyingKey,
    revoked: RwLock<HashMap<PeerId, Revocation>>,
}

impl Trust {
    pub fn new(operator: VerifyingKey) -> Trust {
        Trust {
            operator,
            revoked: RwLock::new(HashMap::new()),
        }
    }

    pub fn operator(&self) -> &VerifyingKey {
        &self.operator
    }

    /// Verifies `cert` for `peer` at `now`: signature, validity window, revocations.
    pub fn check(&self, peer: &PeerId, cert: &[u8], now: u64) -> Result<NodeCert, CertError> {
        let c = verify_signature(&self.operator, peer, cert)?;
        self.check_valid(peer, &c, now)?;
        Ok(c)
    }

    /// Whether a certificate already verified is still good at `now`.
    pub fn check_valid(&self, peer: &PeerId, c: &NodeCert, now: u64) -> Result<(), CertError> {
        if c.issued_at > now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(CertError::NotYetValid);
        }
        if c.not_after <= now {
            return Err(CertError::Expired);
        }
        if self.is_revoked(peer, c) {
            return Err(CertError::Revoked);
        }
        Ok(())
    }

    pub fn is_revoked(&self, peer: &PeerId, c: &NodeCert) -> bool {
        self.revoked
            .read()
            .get(peer)
            .is_some_and(|r| c.admitted_at <= r.revoked_at)
    }

    /// Adds a verified revocation; `true` if it is news (not known, or later than the one known).
    pub fn revoke(&self, r: Revocation) -> bool {
        let mut map = self.revoked.write();
        if map
            .get(&r.peer)
            .is_some_and(|k| k.revoked_at >= r.revoked_at)
        {
            return false;
        }
        if map.len() >= MAX_REVOCATIONS && !map.contains_key(&r.peer) {
            // Full: drop the oldest (its certificates are the likeliest to have expired).
            if let Some(oldest) = map.values().min_by_key(|r| r.revoked_at).map(|r| r.peer) {
                map.remove(&oldest);
            }
        }
        map.insert(r.peer, r);
        true
    }

    /// Every revocation held, to hand to a peer that connects.
    pub fn revocations(&self) -> Vec<Revocation> {
        self.revoked.read().values().cloned().collect()
    }

    /// Forgets revocations whose certificates have all expired; returns the peers forgotten.
    /// Certificates issued before `revoked_at` end by `revoked_at + MAX_LIFETIME_SECS`; a
    /// renewal by a node that had not heard of the revocation yet (it spreads in seconds, and
    /// no node renews a revoked peer) ends one lifetime later: kept for two lifetimes.
    pub fn collect(&self, now: u64) -> Vec<PeerId> {
        let mut gone = vec![];
        self.revoked.write().retain(|p, r| {
            let keep = r.revoked_at.saturating_add(2 * MAX_LIFETIME_SECS) > now;
            if !keep {
                gone.push(*p);
            }
            keep
        });
        gone
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_bind_the_peer_id_and_a_validity_window() {
        let op = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let trust = Trust::new(op.verifying_key());
        let a = PeerId::random();
        let b = PeerId::random();
        let c = issue(&op, &a, 1000, 2000);
        assert_eq!(
            trust.check(&a, &c, 1500),
            Ok(NodeCert {
                issued_at: 1000,
                not_after: 2000,
                admitted_at: 1000,
            })
        );
        assert_eq!(trust.check(&b, &c, 1500), Err(CertError::Signature));
        let rogue = Trust::new(other.verifying_key());
        assert_eq!(rogue.check(&a, &c, 1500), Err(CertError::Signature));
        assert_eq!(trust.check(&a, &c[..10], 1500), Err(CertError::Malformed));
        assert_eq!(trust.check(&a, &c, 2000), Err(CertError::Expired));
        assert_eq!(
            trust.check(&a, &c, 1000 - CLOCK_SKEW_SECS - 1),
            Err(CertError::NotYetValid)
        );
        // The window is signed: widening it breaks the signature.
        let mut longer = c.clone();
        longer[16] ^= 1;
        assert_eq!(trust.check(&a, &longer, 1500), Err(CertError::Signature));
        // The old format (a bare signature) is refused with a message saying what to do.
        assert_eq!(trust.check(&a, &c[25..], 1500), Err(CertError::Malformed));
        let forever = issue(&op, &a, 0, u64::MAX);
        assert_eq!(trust.check(&a, &forever, 1500), Err(CertError::TooLong));
        let c = NodeCert {
            issued_at: 0,
            not_after: 90,
            admitted_at: 0,
        };
        assert!(!c.due_for_renewal(59));
        assert!(c.due_for_renewal(61));
    }

    #[test]
    fn revocation_voids_certificates_issued_until_then() {
        let op = SigningKey::from_bytes(&[7; 32]);
        let trust = Trust::new(op.verifying_key());
        let a = PeerId::random();
        let old = issue(&op, &a, 1000, 9000);
        let r = Revocation::issue(&op, &a, 1500);
        let r = Revocation::verify(&op.verifying_key(), &r.bytes).unwrap();
        assert!(trust.revoke(r.clone()));
        assert!(!trust.revoke(r.clone()), "known already");
        assert_eq!(trust.check(&a, &old, 2000), Err(CertError::Revoked));
        // A renewal of the revoked certificate is void too, even one issued after the
        // revocation (by a node that had not heard of it yet)...
        let current = verify_signature(&op.verifying_key(), &a, &old).unwrap();
        let renewed = renew(&op, &a, &current, 1700, 5000);
        assert_eq!(trust.check(&a, &renewed, 2000), Err(CertError::Revoked));
        // ...while a new admission by the operator after it is good.
        let new = issue(&op, &a, 1600, 9000);
        assert!(trust.check(&a, &new, 2000).is_ok());
        // The admission time is signed: a renewal cannot claim a later one.
        let mut moved = renewed.clone();
        moved[24] ^= 1;
        assert_eq!(trust.check(&a, &moved, 2000), Err(CertError::Signature));
        // Forged or altered revocations are refused.
        let rogue = SigningKey::from_bytes(&[9; 32]);
        let forged = Revocation::issue(&rogue, &a, 1500);
        assert_eq!(
            Revocation::verify(&op.verifying_key(), &forged.bytes),
            Err(CertError::Signature)
        );
        let mut altered = r.bytes.to_vec();
        altered[8] ^= 1;
        assert_eq!(
            Revocation::verify(&op.verifying_key(), &altered),
            Err(CertError::Signature)
        );
        assert_eq!(
            Revocation::verify(&op.verifying_key(), &altered[..20]),
            Err(CertError::Malformed)
        );
        // Kept until every certificate it covers has expired.
        assert!(trust.collect(1500 + 2 * MAX_LIFETIME_SECS - 1).is_empty());
        assert_eq!(trust.collect(1500 + 2 * MAX_LIFETIME_SECS), vec![a]);
    }
}
