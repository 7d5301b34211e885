//! Mesh admission: the operator certifies each node's peer id. A node exchanges traffic only with
//! peers that present a certificate signed by the trust root it was configured with.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use libp2p::PeerId;

const DOMAIN: &[u8] = b"macula-node-cert/v1:";

fn message(peer: &PeerId) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(&peer.to_bytes());
    m
}

/// The operator's signature over `peer`.
pub fn issue(operator: &SigningKey, peer: &PeerId) -> Vec<u8> {
    operator.sign(&message(peer)).to_bytes().to_vec()
}

/// Whether `cert` is the operator's signature over `peer`.
pub fn verify(operator: &VerifyingKey, peer: &PeerId, cert: &[u8]) -> bool {
    let Ok(sig) = Signature::from_slice(cert) else {
        return false;
    };
    operator.verify(&message(peer), &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_bind_the_peer_id() {
        let op = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let a = PeerId::random();
        let b = PeerId::random();
        let c = issue(&op, &a);
        assert!(verify(&op.verifying_key(), &a, &c));
        assert!(!verify(&op.verifying_key(), &b, &c));
        assert!(!verify(&other.verifying_key(), &a, &c));
        assert!(!verify(&op.verifying_key(), &a, &c[..10]));
    }
}
