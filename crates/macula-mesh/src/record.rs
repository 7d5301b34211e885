//! Application DHT records (`macula.dht.put` / `macula.dht.get`): scoped to a realm, signed by the
//! node that wrote them on behalf of the writing session, with an expiry. A reader verifies the
//! signature, the writer node's operator certificate, the realm and the expiry before trusting a
//! value, so a node cannot forge records of another realm or another node.

use bytes::Bytes;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A signed application record, as stored in the DHT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub realm: String,
    pub key: String,
    /// The value, as MessagePack.
    pub value: Bytes,
    /// The authid of the session that wrote it.
    pub writer: String,
    /// Unix seconds.
    pub written_at: u64,
    pub expires_at: u64,
    /// The writing node's public key (libp2p protobuf encoding) and operator certificate.
    pub node_key: Bytes,
    pub node_cert: Bytes,
    pub sig: Bytes,
}

/// Why a record was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("the record is not well-formed")]
    Malformed,
    #[error("the record belongs to another realm or key")]
    WrongScope,
    #[error("the record has expired")]
    Expired,
    #[error("the record's signature or node certificate is invalid")]
    BadSignature,
}

/// The DHT key under which `key` of `realm` is stored.
pub fn dht_key(realm: &str, key: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"macula-dht/v1\0");
    h.update(realm.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    h.finalize().to_vec()
}

impl AppRecord {
    fn signed_part(&self) -> Vec<u8> {
        let body = (
            &self.realm,
            &self.key,
            &self.value,
            &self.writer,
            self.written_at,
            self.expires_at,
            &self.node_key,
            &self.node_cert,
        );
        let mut out = b"macula-dht-record/v1:".to_vec();
        // Serializing plain data into a Vec cannot fail.
        let _ = rmp_serde::encode::write(&mut out, &body);
        out
    }

    /// Builds and signs a record with the node's key.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        keypair: &Keypair,
        node_cert: &[u8],
        realm: &str,
        key: &str,
        value: Bytes,
        writer: &str,
        written_at: u64,
        expires_at: u64,
    ) -> AppRecord {
        let mut r = AppRecord {
            realm: realm.into(),
            key: key.into(),
            value,
            writer: writer.into(),
            written_at,
            expires_at,
            node_key: Bytes::from(keypair.public().encode_protobuf()),
            node_cert: Bytes::copy_from_slice(node_cert),
            sig: Bytes::new(),
        };
        r.sig = Bytes::from(keypair.sign(&r.signed_part()).unwrap_or_default());
        r
    }

    /// The node that wrote the record.
    pub fn writer_node(&self) -> Option<PeerId> {
        PublicKey::try_decode_protobuf(&self.node_key)
            .ok()
            .map(|pk| PeerId::from_public_key(&pk))
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).unwrap_or_default()
    }

    /// Decodes and verifies a stored record for `realm`/`key` at time `now` (unix seconds): the
    /// writer's certificate covered `written_at` and the writer has not been revoked since.
    pub fn verify(
        bytes: &[u8],
        trust: &crate::cert::Trust,
        realm: &str,
        key: &str,
        now: u64,
    ) -> Result<AppRecord, RecordError> {
        let r: AppRecord = rmp_serde::from_slice(bytes).map_err(|_| RecordError::Malformed)?;
        if r.realm != realm || r.key != key {
            return Err(RecordError::WrongScope);
        }
        if r.expires_at <= now {
            return Err(RecordError::Expired);
        }
        let pk = PublicKey::try_decode_protobuf(&r.node_key).map_err(|_| RecordError::Malformed)?;
        let node = PeerId::from_public_key(&pk);
        // The writer's certificate was valid when it wrote, and the writer is not revoked since.
        let cert = crate::cert::verify_signature(trust.operator(), &node, &r.node_cert)
            .map_err(|_| RecordError::BadSignature)?;
        // Nor does it outlive that certificate, nor claim to be written in the future.
        if r.written_at < cert.issued_at.saturating_sub(crate::cert::CLOCK_SKEW_SECS)
            || r.written_at >= cert.not_after
            || r.expires_at > cert.not_after
            || r.written_at > now.saturating_add(crate::cert::CLOCK_SKEW_SECS)
            || trust.is_revoked(&node, &cert)
            || !pk.verify(&r.signed_part(), &r.sig)
        {
            return Err(RecordError::BadSignature);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn records_verify_and_tampering_is_detected() {
        let op = SigningKey::from_bytes(&[3; 32]);
        let kp = Keypair::generate_ed25519();
        let peer = kp.public().to_peer_id();
        let cert = crate::cert::issue(&op, &peer, 5, 1000);
        let r = AppRecord::sign(
            &kp,
            &cert,
            "com.acme",
            "k",
            Bytes::from_static(b"\x01"),
            "key1",
            10,
            100,
        );
        let bytes = r.encode();
        let vk = crate::cert::Trust::new(op.verifying_key());
        assert_eq!(
            AppRecord::verify(&bytes, &vk, "com.acme", "k", 50).unwrap(),
            r
        );
        assert_eq!(
            AppRecord::verify(&bytes, &vk, "com.other", "k", 50),
            Err(RecordError::WrongScope)
        );
        assert_eq!(
            AppRecord::verify(&bytes, &vk, "com.acme", "k", 100),
            Err(RecordError::Expired)
        );
        let mut t = r.clone();
        t.value = Bytes::from_static(b"\x02");
        assert_eq!(
            AppRecord::verify(&t.encode(), &vk, "com.acme", "k", 50),
            Err(RecordError::BadSignature)
        );
        let rogue = SigningKey::from_bytes(&[4; 32]);
        assert_eq!(
            AppRecord::verify(
                &bytes,
                &crate::cert::Trust::new(rogue.verifying_key()),
                "com.acme",
                "k",
                50
            ),
            Err(RecordError::BadSignature)
        );
        // Written outside the writer's certificate, or by a writer revoked since: refused.
        let late = AppRecord::sign(
            &kp,
            &cert,
            "com.acme",
            "k",
            Bytes::new(),
            "key1",
            1000,
            2000,
        );
        assert_eq!(
            AppRecord::verify(&late.encode(), &vk, "com.acme", "k", 1500),
            Err(RecordError::BadSignature)
        );
        vk.revoke(crate::cert::Revocation::issue(&op, &peer, 20));
        assert_eq!(
            AppRecord::verify(&bytes, &vk, "com.acme", "k", 50),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            AppRecord::verify(b"\xc1", &vk, "com.acme", "k", 50),
            Err(RecordError::Malformed)
        );
    }
}
