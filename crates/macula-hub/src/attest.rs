//! Attestations: DSSE envelopes (signed payloads with their type) and the in-toto Statements
//! they carry (provenance, scan results: claims about artifacts named by digest).
//!
//! **DSSE** (Dead Simple Signing Envelope, v1): the signature covers the pre-authentication
//! encoding `PAE(type, body)` = `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, so a
//! signature made for one payload type never verifies as another (a provenance signature cannot
//! be passed off as a scan result). Verification asks for the payload type it expects, counts
//! distinct trusted keys with a valid signature against a threshold, and only then returns the
//! payload.
//!
//! **in-toto Statement** (v1, v0.1 read too): `subject` names artifacts by digest, and
//! [`check_subjects`] demands that they be exactly the package's artifacts, by digest.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// The payload type of an in-toto Statement.
pub const INTOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// Statement types read, and predicate types the Hub knows.
pub const STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
pub const STATEMENT_V01: &str = "https://in-toto.io/Statement/v0.1";
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";
/// The most an envelope may weigh, and the most signatures and subjects it may carry.
pub const MAX_ENVELOPE: usize = 4 << 20;
pub const MAX_SIGNATURES: usize = 16;
pub const MAX_SUBJECTS: usize = 1_024;

/// A DSSE envelope as JSON carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Base64 of the payload.
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSignature {
    #[serde(default)]
    pub keyid: String,
    /// Base64 of the Ed25519 signature over the PAE.
    pub sig: String,
}

/// Why an attestation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("not a DSSE envelope: {0}")]
    Malformed(String),
    #[error("the payload type is {found:?}, not {expected:?}")]
    WrongType { expected: String, found: String },
    #[error("{valid} valid signature(s) from trusted keys; {threshold} needed")]
    BelowThreshold { valid: usize, threshold: usize },
    #[error("not an in-toto Statement: {0}")]
    NotStatement(String),
    #[error("the predicate type is {found:?}, not {expected:?}")]
    WrongPredicate { expected: String, found: String },
    #[error("subject {name:?}: {why}")]
    Subject { name: String, why: String },
}

/// DSSE's pre-authentication encoding of `body` of type `payload_type`.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

/// A key's id: the hex SHA-256 of its public bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// `body` of type `payload_type`, signed by each of `keys`.
pub fn sign(payload_type: &str, body: &[u8], keys: &[&SigningKey]) -> Envelope {
    let message = pae(payload_type, body);
    Envelope {
        payload: b64().encode(body),
        payload_type: payload_type.to_owned(),
        signatures: keys
            .iter()
            .map(|k| EnvelopeSignature {
                keyid: key_id(&k.verifying_key()),
                sig: b64().encode(k.sign(&message).to_bytes()),
            })
            .collect(),
    }
}

/// The keys trusted for one kind of attestation, and how many must have signed.
#[derive(Debug, Clone)]
pub struct Trusted {
    pub keys: Vec<VerifyingKey>,
    pub threshold: usize,
}

/// The payload of envelope `json` (bytes as received), if it is of `expected_type` and signed by
/// at least `trusted.threshold` distinct trusted keys.
pub fn verify(json: &[u8], expected_type: &str, trusted: &Trusted) -> Result<Vec<u8>, AttestError> {
    if json.len() > MAX_ENVELOPE {
        return Err(AttestError::Malformed(format!(
            "{} bytes: at most {MAX_ENVELOPE}",
            json.len()
        )));
    }
    let env: Envelope =
        serde_json::from_slice(json).map_err(|e| AttestError::Malformed(e.to_string()))?;
    if env.payload_type != expected_type {
        return Err(AttestError::WrongType {
            expected: expected_type.to_owned(),
            found: env.payload_type,
        });
    }
    if env.signatures.len() > MAX_SIGNATURES {
        return Err(AttestError::Malformed(format!(
            "{} signatures: at most {MAX_SIGNATURES}",
            env.signatures.len()
        )));
    }
    let body = b64()
        .decode(&env.payload)
        .map_err(|e| AttestError::Malformed(format!("payload: {e}")))?;
    let message = pae(&env.payload_type, &body);
    // Each trusted key counts once, whatever key id a signature claims.
    let mut signed: BTreeSet<[u8; 32]> = BTreeSet::new();
    for s in &env.signatures {
        let Ok(raw) = b64().decode(&s.sig) else {
            continue;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&raw) else {
            continue;
        };
        for k in &trusted.keys {
            if k.verify_strict(&message, &sig).is_ok() {
                signed.insert(*k.as_bytes());
            }
        }
    }
    let threshold = trusted.threshold.max(1);
    if signed.len() < threshold {
        return Err(AttestError::BelowThreshold {
            valid: signed.len(),
            threshold,
        });
    }
    Ok(body)
}

/// An in-toto Statement, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub subjects: Vec<(String, Digest)>,
    pub predicate_type: String,
    pub predicate: serde_json::Value,
}

#[derive(Deserialize)]
struct StatementDoc {
    #[serde(rename = "_type")]
    kind: String,
    subject: Vec<SubjectDoc>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    #[serde(default)]
    predicate: serde_json::Value,
}

#[derive(Deserialize)]
struct SubjectDoc {
    name: String,
    digest: BTreeMap<String, String>,
}

/// Reads a Statement from a verified payload; `expected_predicate` is the predicate type wanted.
pub fn statement(payload: &[u8], expected_predicate: &str) -> Result<Statement, AttestError> {
    let d: StatementDoc =
        serde_json::from_slice(payload).map_err(|e| AttestError::NotStatement(e.to_string()))?;
    if d.kind != STATEMENT_V1 && d.kind != STATEMENT_V01 {
        return Err(AttestError::NotStatement(format!(
            "_type {:?} (known: {STATEMENT_V1}, {STATEMENT_V01})",
            d.kind
        )));
    }
    if d.predicate_type != expected_predicate {
        return Err(AttestError::WrongPredicate {
            expected: expected_predicate.to_owned(),
            found: d.predicate_type,
        });
    }
    if d.subject.is_empty() || d.subject.len() > MAX_SUBJECTS {
        return Err(AttestError::NotStatement(format!(
            "{} subjects (1 to {MAX_SUBJECTS})",
            d.subject.len()
        )));
    }
    let mut subjects = vec![];
    for s in d.subject {
        let Some(hex) = s.digest.get("sha256") else {
            return Err(AttestError::Subject {
                name: s.name,
                why: "no sha256 digest".into(),
            });
        };
        let digest: Digest =
            format!("sha256:{hex}")
                .parse()
                .map_err(|e: crate::digest::BadDigest| AttestError::Subject {
                    name: s.name.clone(),
                    why: e.to_string(),
                })?;
        subjects.push((s.name, digest));
    }
    Ok(Statement {
        subjects,
        predicate_type: d.predicate_type,
        predicate: d.predicate,
    })
}

/// The statement's subjects are exactly `artifacts` (name → digest): each named once, with the
/// artifact's digest, and none missing.
pub fn check_subjects(
    stmt: &Statement,
    artifacts: &BTreeMap<String, Digest>,
) -> Result<(), AttestError> {
    let mut seen = BTreeSet::new();
    for (name, digest) in &stmt.subjects {
        let subject = |why: String| AttestError::Subject {
            name: name.clone(),
            why,
        };
        match artifacts.get(name) {
            None => return Err(subject("not an artifact of the package".into())),
            Some(d) if d != digest => {
                return Err(subject(format!("digest {digest}, the artifact's is {d}")))
            }
            Some(_) if !seen.insert(name.clone()) => return Err(subject("named twice".into())),
            Some(_) => {}
        }
    }
    if let Some(missing) = artifacts.keys().find(|k| !seen.contains(*k)) {
        return Err(AttestError::Subject {
            name: missing.clone(),
            why: "an artifact the statement does not name".into(),
        });
    }
    Ok(())
}
