//! API keys: signed, self-contained credentials, verifiable with only the trust root's public key.
//!
//! One file past 600 lines (a third of it tests): the key format, its signing and its
//! verification are one wire format whose canonical encoding must be read as a whole.
//!
//! The chain follows the NATS operator → account → user model:
//! the **operator** (trust root) signs an [`AuthorityCert`] that binds a realm (and its subrealms)
//! to the realm authority's Ed25519 public key; the **realm authority** signs [`KeyClaims`]
//! (realm, role, key id, expiry). An API key carries both signed documents, so a node needs no
//! database and no network to verify it. Revocation is by key id ([`Authenticator`](super::Authenticator)).
//!
//! Wire form: `sk_live_` + base64url (no padding) of a MessagePack array
//! `[2, cert, cert_sig, claims, claims_sig, secret]`. The claims of a bearer key carry the
//! Ed25519 public key whose seed is `secret` (`holder`; keys issued before it carry the
//! SHA-256 of `secret` instead), so the signed part without the secret — the key's *public form*
//! ([`public_form`], `pk_live_` + base64url of `[2, cert, cert_sig, claims, claims_sig]`) —
//! proves the key's realm and role to a third party without letting it authenticate. Keys of
//! version 1 (`[1, cert, cert_sig, claims, claims_sig]`, no secret) are still accepted; they have
//! no public form (all of a version-1 bearer key is secret). A key bound to a public key
//! (cryptosign) is not a bearer token: its public form is its signed part.
//!
//! A public form alone proves that a key exists, not who presented it. A *session proof* does:
//! a signature by the key's holder (the secret's Ed25519 key for a bearer key, the client's key
//! for a cryptosign one) over [`session_digest`] — the node the session joined, its realm, a
//! nonce. A node forwards it with the public form; another node that replays them under its own
//! peer id is caught, because the digest names the node that made the proof.

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::AuthError;

/// Prefix of every API key.
pub const KEY_PREFIX: &str = "sk_live_";
/// Prefix of a key's public form.
pub const PUBLIC_PREFIX: &str = "pk_live_";
const VERSION: u8 = 2;
const SECRET_DOMAIN: &[u8] = b"macula/key-secret/v1\0";
const CERT_DOMAIN: &[u8] = b"macula/authority-cert/v1\0";
const CLAIMS_DOMAIN: &[u8] = b"macula/key-claims/v1\0";
const SESSION_DOMAIN: &[u8] = b"macula/session-proof/v1\0";
/// Keys longer than this are refused before any decoding.
pub const MAX_KEY_LEN: usize = 4096;

/// The operator's statement: "this public key is the authority of `realm` and its subrealms".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityCert {
    pub realm: String,
    #[serde(with = "serde_bytes32")]
    pub authority: [u8; 32],
    /// Unix seconds after which the certificate is invalid; 0 means no expiry.
    pub expires_at: u64,
}

/// The realm authority's statement about one API key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KeyClaims {
    /// The realm the key is for (the authority's realm or one of its subrealms).
    pub realm: String,
    pub role: String,
    /// Unique key id, used for revocation and shown in listings.
    pub kid: String,
    /// Human name given at creation ("Production home bots").
    pub name: String,
    pub issued_at: u64,
    /// Unix seconds after which the key is refused; 0 means no expiry.
    pub expires_at: u64,
    /// For key-pair clients (WAMP-Cryptosign): the Ed25519 public key that must prove possession.
    /// A key with a bound public key is not a bearer token and is refused as a WAMP ticket.
    #[serde(default, with = "serde_opt_bytes32")]
    pub pubkey: Option<[u8; 32]>,
    /// SHA-256 of the key's secret (bearer keys of version 2 issued before `holder`).
    #[serde(default, with = "serde_opt_bytes32")]
    pub secret_hash: Option<[u8; 32]>,
    /// The Ed25519 public key whose seed is the key's secret (bearer keys of version 2; set by
    /// [`issue_key`]): whoever presents the key can sign session proofs with it.
    #[serde(default, with = "serde_opt_bytes32")]
    pub holder: Option<[u8; 32]>,
}

/// Written by hand for one rule: claims are MessagePack arrays (fields by position), so
/// `secret_hash` is written (as nil) whenever `holder` follows it, and each is left out only at
/// the end. Every version of the claims then reads back and re-encodes to the same bytes.
impl Serialize for KeyClaims {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct B32<'a>(&'a Option<[u8; 32]>);
        impl Serialize for B32<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                serde_opt_bytes32::serialize(self.0, s)
            }
        }
        let with_hash = self.secret_hash.is_some() || self.holder.is_some();
        let len = 7 + usize::from(with_hash) + usize::from(self.holder.is_some());
        let mut st = s.serialize_struct("KeyClaims", len)?;
        st.serialize_field("realm", &self.realm)?;
        st.serialize_field("role", &self.role)?;
        st.serialize_field("kid", &self.kid)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("issued_at", &self.issued_at)?;
        st.serialize_field("expires_at", &self.expires_at)?;
        st.serialize_field("pubkey", &B32(&self.pubkey))?;
        if with_hash {
            st.serialize_field("secret_hash", &B32(&self.secret_hash))?;
        } else {
            st.skip_field("secret_hash")?;
        }
        if self.holder.is_some() {
            st.serialize_field("holder", &B32(&self.holder))?;
        } else {
            st.skip_field("holder")?;
        }
        st.end()
    }
}

impl KeyClaims {
    /// The key that signs this key's session proofs: the holder's (bearer) or the client's
    /// (cryptosign). `None` for keys that cannot prove a session (version 1, or issued before
    /// `holder`).
    pub fn proof_key(&self) -> Option<[u8; 32]> {
        self.holder.or(self.pubkey)
    }
}

/// What a session proof signs: that the holder of a key joined a session in `realm` on the node
/// whose peer id is `node` (its bytes). `nonce` makes a cryptosign challenge fresh.
pub fn session_digest(node: &[u8], realm: &str, nonce: &[u8; 32]) -> [u8; 32] {
    sha256(&[
        SESSION_DOMAIN,
        &(node.len() as u32).to_be_bytes(),
        node,
        &(realm.len() as u32).to_be_bytes(),
        realm.as_bytes(),
        nonce,
    ])
}

/// A bearer key's session proof: `digest` signed with the key derived from its secret. `None`
/// if the key is not a bearer key of version 2 that names its holder. Any digest made with a
/// domain of its own is signed the same way (a workload's deploy record:
/// `macula_workloads::record::DeployRecord::digest`), and checked with
/// [`verify_session_proof`]; the domains keep one kind of signature from passing for another.
pub fn bearer_proof(key: &str, digest: &[u8; 32]) -> Option<[u8; 64]> {
    let body = key.strip_prefix(KEY_PREFIX)?;
    let Envelope2(_, _, _, claims_bytes, _, secret) = decode_strict(body, "API key").ok()?;
    let claims: KeyClaims = rmp_serde::from_slice(&claims_bytes).ok()?;
    let seed: [u8; 32] = secret.try_into().ok()?;
    let key = SigningKey::from_bytes(&seed);
    (claims.holder == Some(key.verifying_key().to_bytes())).then(|| key.sign(digest).to_bytes())
}

/// Whether `sig` is a session proof over `digest` by the holder of the key `claims` describe
/// (strictly verified: a weak public key proves nothing).
pub fn verify_session_proof(claims: &KeyClaims, digest: &[u8; 32], sig: &[u8]) -> bool {
    let (Some(k), Ok(sig)) = (claims.proof_key(), Signature::from_slice(sig)) else {
        return false;
    };
    VerifyingKey::from_bytes(&k).is_ok_and(|k| k.verify_strict(digest, &sig).is_ok())
}

/// Parses a client's Ed25519 public key (64 hex characters) for a cryptosign key, refusing one
/// that is not a valid point or is weak (of small order: a signature "by" it can be forged).
pub fn parse_public_key(s: &str) -> Option<[u8; 32]> {
    let b = parse_hex32(s)?;
    usable_public_key(&b).then_some(b)
}

fn usable_public_key(b: &[u8; 32]) -> bool {
    VerifyingKey::from_bytes(b).is_ok_and(|k| !k.is_weak())
}

/// The signed part of a key (version 1: all of it; also the public form's layout).
#[derive(Serialize, Deserialize)]
struct Envelope(
    u8,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
);

/// A version-2 key: the signed part and the secret.
#[derive(Serialize, Deserialize)]
struct Envelope2(
    u8,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
    #[serde(with = "serde_bytes_vec")] Vec<u8>,
);

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// A credential whose signatures and expiry have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKey {
    pub authority: AuthorityCert,
    pub claims: KeyClaims,
}

fn sign_doc(key: &SigningKey, domain: &[u8], doc: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + doc.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(doc);
    key.sign(&m).to_bytes().to_vec()
}

fn verify_doc(key: &VerifyingKey, domain: &[u8], doc: &[u8], sig: &[u8]) -> bool {
    let Ok(sig) = Signature::from_slice(sig) else {
        return false;
    };
    let mut m = Vec::with_capacity(domain.len() + doc.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(doc);
    key.verify(&m, &sig).is_ok()
}

/// A signed authority certificate, as stored next to the realm authority's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCert {
    #[serde(with = "serde_bytes_vec")]
    pub cert: Vec<u8>,
    #[serde(with = "serde_bytes_vec")]
    pub sig: Vec<u8>,
}

impl SignedCert {
    /// The operator signs `cert`.
    pub fn issue(operator: &SigningKey, cert: &AuthorityCert) -> SignedCert {
        let bytes = rmp_serde::to_vec(cert).unwrap_or_default();
        let sig = sign_doc(operator, CERT_DOMAIN, &bytes);
        SignedCert { cert: bytes, sig }
    }

    /// Checks the operator's signature and returns the certificate.
    pub fn verify(&self, operator: &VerifyingKey, now: u64) -> Result<AuthorityCert, AuthError> {
        if !verify_doc(operator, CERT_DOMAIN, &self.cert, &self.sig) {
            return Err(AuthError::BadSignature("realm authority certificate"));
        }
        let cert: AuthorityCert = rmp_serde::from_slice(&self.cert)
            .map_err(|_| AuthError::Malformed("authority certificate"))?;
        if cert.expires_at != 0 && cert.expires_at <= now {
            return Err(AuthError::Expired("realm authority certificate"));
        }
        Ok(cert)
    }

    /// Text form for files: base64url of the MessagePack encoding.
    pub fn to_text(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(rmp_serde::to_vec(self).unwrap_or_default())
    }

    pub fn from_text(s: &str) -> Result<SignedCert, AuthError> {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|_| AuthError::Malformed("authority certificate"))?;
        rmp_serde::from_slice(&b).map_err(|_| AuthError::Malformed("authority certificate"))
    }
}

/// Issues an API key: the realm authority signs `claims`; the operator-signed certificate rides
/// along. A bearer key gets a secret derived from the authority's key and the key id (so the same
/// claims always give the same key: the registry re-signs keys rather than storing them) and its
/// hash in the claims.
pub fn issue_key(authority: &SigningKey, cert: &SignedCert, claims: &KeyClaims) -> String {
    let mut claims = claims.clone();
    let secret = claims
        .pubkey
        .is_none()
        .then(|| sha256(&[SECRET_DOMAIN, &authority.to_bytes(), claims.kid.as_bytes()]));
    claims.secret_hash = None;
    claims.holder = secret.map(|s| SigningKey::from_bytes(&s).verifying_key().to_bytes());
    let claims_bytes = rmp_serde::to_vec(&claims).unwrap_or_default();
    let claims_sig = sign_doc(authority, CLAIMS_DOMAIN, &claims_bytes);
    let bytes = match secret {
        Some(secret) => rmp_serde::to_vec(&Envelope2(
            VERSION,
            cert.cert.clone(),
            cert.sig.clone(),
            claims_bytes,
            claims_sig,
            secret.to_vec(),
        )),
        // A cryptosign key's possession is proven by its private key: the signed part is all.
        None => rmp_serde::to_vec(&Envelope(
            1,
            cert.cert.clone(),
            cert.sig.clone(),
            claims_bytes,
            claims_sig,
        )),
    }
    .unwrap_or_default();
    let mut s = String::from(KEY_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut s);
    s
}

/// Decodes `body` (base64url of a MessagePack value) strictly: the string must be exactly the
/// canonical encoding of what it carries, so any change to it (a character appended, trailing
/// bytes, a non-canonical encoding) is refused rather than read as the same credential.
fn decode_strict<T: Serialize + serde::de::DeserializeOwned>(
    body: &str,
    what: &'static str,
) -> Result<T, AuthError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| AuthError::Malformed(what))?;
    let v: T = rmp_serde::from_slice(&bytes).map_err(|_| AuthError::Malformed(what))?;
    let canonical = rmp_serde::to_vec(&v).map_err(|_| AuthError::Malformed(what))?;
    if canonical != bytes
        || base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&canonical) != body
    {
        return Err(AuthError::Malformed("API key (not in its canonical form)"));
    }
    Ok(v)
}

/// Verifies an API key against the operator's public key at time `now` (Unix seconds).
/// Revocation is the caller's business (see [`Authenticator`](super::Authenticator)).
pub fn verify_key(key: &str, operator: &VerifyingKey, now: u64) -> Result<VerifiedKey, AuthError> {
    if key.len() > MAX_KEY_LEN {
        return Err(AuthError::Malformed("API key (too long)"));
    }
    let body = key
        .strip_prefix(KEY_PREFIX)
        .ok_or(AuthError::Malformed("API key (expected sk_live_...)"))?;
    match decode_strict::<Envelope2>(body, "API key") {
        Ok(Envelope2(version, cert, cert_sig, claims_bytes, claims_sig, secret)) => {
            if version != VERSION {
                return Err(AuthError::Malformed("API key (unsupported version)"));
            }
            let v = verify_signed(operator, now, cert, cert_sig, &claims_bytes, &claims_sig)?;
            let holds = match (v.claims.holder, v.claims.secret_hash) {
                (Some(h), None) => <[u8; 32]>::try_from(secret.as_slice())
                    .is_ok_and(|s| SigningKey::from_bytes(&s).verifying_key().to_bytes() == h),
                (None, Some(h)) => h == sha256(&[&secret]),
                _ => false,
            };
            if v.claims.pubkey.is_some() || !holds {
                return Err(AuthError::BadSignature("API key"));
            }
            Ok(v)
        }
        Err(_) => {
            let Envelope(version, cert, cert_sig, claims_bytes, claims_sig) =
                decode_strict(body, "API key")?;
            if version != 1 {
                return Err(AuthError::Malformed("API key (unsupported version)"));
            }
            let v = verify_signed(operator, now, cert, cert_sig, &claims_bytes, &claims_sig)?;
            // The signed part of a version-2 key without its secret (its public form) is not
            // a key.
            if v.claims.secret_hash.is_some() || v.claims.holder.is_some() {
                return Err(AuthError::BadSignature("API key"));
            }
            Ok(v)
        }
    }
}

/// The public form of a key (`pk_live_...`): proves its realm, role and id to a third party, and
/// cannot authenticate. `None` for a version-1 bearer key, all of which is secret.
pub fn public_form(key: &str) -> Option<String> {
    let body = key.strip_prefix(KEY_PREFIX)?;
    let (cert, cert_sig, claims_bytes, claims_sig) =
        match decode_strict::<Envelope2>(body, "API key") {
            Ok(Envelope2(_, c, cs, cl, cls, _)) => (c, cs, cl, cls),
            Err(_) => {
                let Envelope(_, c, cs, cl, cls) = decode_strict(body, "API key").ok()?;
                let claims: KeyClaims = rmp_serde::from_slice(&cl).ok()?;
                claims.pubkey?;
                (c, cs, cl, cls)
            }
        };
    let bytes =
        rmp_serde::to_vec(&Envelope(VERSION, cert, cert_sig, claims_bytes, claims_sig)).ok()?;
    let mut s = String::from(PUBLIC_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut s);
    Some(s)
}

/// Verifies a key's public form: the operator's and the authority's signatures, the realm and
/// the expiry (revocation is the caller's business). What it proves: a key with these claims
/// exists; not that the presenter holds it.
pub fn verify_public(
    public: &str,
    operator: &VerifyingKey,
    now: u64,
) -> Result<VerifiedKey, AuthError> {
    if public.len() > MAX_KEY_LEN {
        return Err(AuthError::Malformed("public key form (too long)"));
    }
    let body = public
        .strip_prefix(PUBLIC_PREFIX)
        .ok_or(AuthError::Malformed(
            "public key form (expected pk_live_...)",
        ))?;
    let Envelope(version, cert, cert_sig, claims_bytes, claims_sig) =
        decode_strict(body, "public key form")?;
    if version != VERSION {
        return Err(AuthError::Malformed(
            "public key form (unsupported version)",
        ));
    }
    let v = verify_signed(operator, now, cert, cert_sig, &claims_bytes, &claims_sig)?;
    if v.claims.secret_hash.is_none() && v.claims.holder.is_none() && v.claims.pubkey.is_none() {
        return Err(AuthError::Malformed("public key form (of a version-1 key)"));
    }
    Ok(v)
}

/// Checks the chain operator → authority → claims and the claims' realm and expiry.
fn verify_signed(
    operator: &VerifyingKey,
    now: u64,
    cert: Vec<u8>,
    cert_sig: Vec<u8>,
    claims_bytes: &[u8],
    claims_sig: &[u8],
) -> Result<VerifiedKey, AuthError> {
    let authority = SignedCert {
        cert,
        sig: cert_sig,
    }
    .verify(operator, now)?;
    let authority_key = VerifyingKey::from_bytes(&authority.authority)
        .map_err(|_| AuthError::Malformed("authority key"))?;
    if !verify_doc(&authority_key, CLAIMS_DOMAIN, claims_bytes, claims_sig) {
        return Err(AuthError::BadSignature("API key"));
    }
    let claims: KeyClaims =
        rmp_serde::from_slice(claims_bytes).map_err(|_| AuthError::Malformed("API key claims"))?;
    if rmp_serde::to_vec(&claims).ok().as_deref() != Some(claims_bytes) {
        return Err(AuthError::Malformed(
            "API key claims (not in their canonical form)",
        ));
    }
    if !macula_wamp::uri::is_same_or_subrealm(&claims.realm, &authority.realm) {
        return Err(AuthError::RealmOutsideAuthority {
            realm: claims.realm,
            authority: authority.realm,
        });
    }
    if claims.expires_at != 0 && claims.expires_at <= now {
        return Err(AuthError::Expired("API key"));
    }
    if [claims.pubkey, claims.holder]
        .iter()
        .flatten()
        .any(|k| !usable_public_key(k))
    {
        return Err(AuthError::Malformed(
            "API key (a weak or invalid public key)",
        ));
    }
    Ok(VerifiedKey { authority, claims })
}

/// Parses a public or secret Ed25519 key from 64 hex characters.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = hex::decode(s.trim()).ok()?;
    b.try_into().ok()
}

mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

mod serde_bytes32 {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let v = super::serde_bytes_vec::deserialize(d)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

mod serde_opt_bytes32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_bytes(b),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::serde_bytes32")] [u8; 32]);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (SigningKey, SigningKey, SignedCert) {
        let op = SigningKey::from_bytes(&[1; 32]);
        let auth = SigningKey::from_bytes(&[2; 32]);
        let cert = SignedCert::issue(
            &op,
            &AuthorityCert {
                realm: "com.acme".into(),
                authority: auth.verifying_key().to_bytes(),
                expires_at: 0,
            },
        );
        (op, auth, cert)
    }

    fn claims(realm: &str, expires_at: u64) -> KeyClaims {
        KeyClaims {
            realm: realm.into(),
            role: "admin".into(),
            kid: "key_1".into(),
            name: "test".into(),
            issued_at: 1,
            expires_at,
            pubkey: None,
            secret_hash: None,
            holder: None,
        }
    }

    #[test]
    fn issued_key_verifies_with_only_the_operator_public_key() {
        let (op, auth, cert) = setup();
        let key = issue_key(&auth, &cert, &claims("com.acme.shop", 0));
        assert!(key.starts_with("sk_live_"));
        let v = verify_key(&key, &op.verifying_key(), 100).unwrap();
        assert_eq!(v.claims.realm, "com.acme.shop");
        assert_eq!(v.authority.realm, "com.acme");
    }

    #[test]
    fn tampered_expired_and_foreign_keys_are_refused() {
        let (op, auth, cert) = setup();
        let key = issue_key(&auth, &cert, &claims("com.acme", 50));
        assert_eq!(
            verify_key(&key, &op.verifying_key(), 60),
            Err(AuthError::Expired("API key"))
        );
        // Flip one character in the middle of the key.
        let mut chars: Vec<char> = key.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        assert!(verify_key(&tampered, &op.verifying_key(), 10).is_err());
        // A different operator does not trust this chain.
        let other = SigningKey::from_bytes(&[9; 32]);
        assert_eq!(
            verify_key(&key, &other.verifying_key(), 10),
            Err(AuthError::BadSignature("realm authority certificate"))
        );
        // An authority cannot sign keys for realms outside its own.
        let outside = issue_key(&auth, &cert, &claims("org.evil", 0));
        assert!(matches!(
            verify_key(&outside, &op.verifying_key(), 10),
            Err(AuthError::RealmOutsideAuthority { .. })
        ));
        assert!(verify_key("sk_live_!!!", &op.verifying_key(), 10).is_err());
        assert!(verify_key("nope", &op.verifying_key(), 10).is_err());
    }

    #[test]
    fn any_change_to_a_key_string_is_refused() {
        let (op, auth, cert) = setup();
        let key = issue_key(&auth, &cert, &claims("com.acme", 0));
        assert!(verify_key(&key, &op.verifying_key(), 10).is_ok());
        for c in ['A', 'B', 'Q', 'g', '0', '_', '-'] {
            let appended = format!("{key}{c}");
            assert!(
                verify_key(&appended, &op.verifying_key(), 10).is_err(),
                "{c:?} appended is refused"
            );
        }
        for extra in ["AA", "AAA", "AAAA", "QUJD"] {
            let appended = format!("{key}{extra}");
            assert!(verify_key(&appended, &op.verifying_key(), 10).is_err());
        }
        // Every single-character change anywhere in the key is refused.
        let chars: Vec<char> = key.chars().collect();
        for i in KEY_PREFIX.len()..chars.len() {
            let mut c = chars.clone();
            c[i] = if c[i] == 'A' { 'B' } else { 'A' };
            let changed: String = c.into_iter().collect();
            assert!(
                verify_key(&changed, &op.verifying_key(), 10).is_err(),
                "position {i}"
            );
        }
        // Dropping the last character is refused too.
        assert!(verify_key(&key[..key.len() - 1], &op.verifying_key(), 10).is_err());
        assert!(verify_key("nope", &op.verifying_key(), 10).is_err());
    }

    /// A key's public form proves its claims to a third party and cannot authenticate; a
    /// version-1 key (no secret) is still accepted and has no public form.
    #[test]
    fn the_public_form_proves_the_role_and_is_not_a_key() {
        let (op, auth, cert) = setup();
        let vk = op.verifying_key();
        let key = issue_key(&auth, &cert, &claims("com.acme", 0));
        assert_eq!(
            key,
            issue_key(&auth, &cert, &claims("com.acme", 0)),
            "deterministic"
        );
        let public = public_form(&key).expect("a bearer key of version 2 has one");
        assert!(public.starts_with(PUBLIC_PREFIX));
        let v = verify_public(&public, &vk, 10).unwrap();
        assert_eq!(
            (v.claims.role.as_str(), v.claims.kid.as_str()),
            ("admin", "key_1")
        );
        // Neither the public form nor the signed part under the key prefix authenticates.
        assert!(verify_key(&public, &vk, 10).is_err());
        let as_key = format!("{KEY_PREFIX}{}", &public[PUBLIC_PREFIX.len()..]);
        assert!(verify_key(&as_key, &vk, 10).is_err());
        // A key whose secret is changed is refused (the claims carry its hash).
        let body = &key[KEY_PREFIX.len()..];
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        let Envelope2(v2, c, cs, cl, cls, mut secret) = rmp_serde::from_slice(&bytes).unwrap();
        secret[0] ^= 1;
        let forged = rmp_serde::to_vec(&Envelope2(v2, c, cs, cl, cls, secret)).unwrap();
        let forged = format!(
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged)
        );
        assert_eq!(
            verify_key(&forged, &vk, 10),
            Err(AuthError::BadSignature("API key"))
        );
        // A version-1 key (issued before secrets) still works and has no public form.
        let c1 = claims("com.acme", 0);
        let cl = rmp_serde::to_vec(&c1).unwrap();
        let sig = sign_doc(&auth, CLAIMS_DOMAIN, &cl);
        let v1 =
            rmp_serde::to_vec(&Envelope(1, cert.cert.clone(), cert.sig.clone(), cl, sig)).unwrap();
        let v1 = format!(
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v1)
        );
        assert!(verify_key(&v1, &vk, 10).is_ok());
        assert_eq!(public_form(&v1), None);
        // A cryptosign key's public form is its signed part.
        let client = SigningKey::from_bytes(&[5; 32]).verifying_key().to_bytes();
        let mut cs_claims = claims("com.acme", 0);
        cs_claims.pubkey = Some(client);
        let cs_key = issue_key(&auth, &cert, &cs_claims);
        let p = public_form(&cs_key).expect("a cryptosign key has one");
        assert_eq!(
            verify_public(&p, &vk, 10).unwrap().claims.pubkey,
            Some(client)
        );
        // A key bound to a weak public key (the identity point, for which a forged signature
        // verifies against any message) is refused, as a key and as a public form.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(parse_public_key(&hex::encode(identity)), None);
        assert_eq!(parse_public_key(&hex::encode(client)), Some(client));
        cs_claims.pubkey = Some(identity);
        let weak = issue_key(&auth, &cert, &cs_claims);
        assert!(verify_key(&weak, &vk, 10).is_err());
        assert!(verify_public(&public_form(&weak).unwrap(), &vk, 10).is_err());
    }

    /// A session proof names the node that made it: it verifies for that node and realm only,
    /// and only the key's presenter can make one; a public form alone cannot.
    #[test]
    fn a_session_proof_is_bound_to_its_node_and_realm() {
        let (op, auth, cert) = setup();
        let key = issue_key(&auth, &cert, &claims("com.acme", 0));
        let public = public_form(&key).unwrap();
        let v = verify_public(&public, &op.verifying_key(), 10).unwrap();
        assert!(v.claims.holder.is_some() && v.claims.secret_hash.is_none());
        let nonce = [7; 32];
        let digest = session_digest(b"node-a", "com.acme", &nonce);
        let sig = bearer_proof(&key, &digest).expect("a bearer key of version 2 proves");
        assert!(verify_session_proof(&v.claims, &digest, &sig));
        for other in [
            session_digest(b"node-b", "com.acme", &nonce),
            session_digest(b"node-a", "com.acme.shop", &nonce),
            session_digest(b"node-a", "com.acme", &[8; 32]),
        ] {
            assert!(!verify_session_proof(&v.claims, &other, &sig));
        }
        assert_eq!(bearer_proof(&public, &digest), None);
        // A cryptosign key's proof is its client's signature.
        let client = SigningKey::from_bytes(&[6; 32]);
        let mut cs = claims("com.acme", 0);
        cs.pubkey = Some(client.verifying_key().to_bytes());
        let cs_key = issue_key(&auth, &cert, &cs);
        let cs_v = verify_key(&cs_key, &op.verifying_key(), 10).unwrap();
        assert_eq!(bearer_proof(&cs_key, &digest), None);
        let sig = client.sign(&digest).to_bytes();
        assert!(verify_session_proof(&cs_v.claims, &digest, &sig));
        assert!(!verify_session_proof(&v.claims, &digest, &sig));
    }

    /// Claims of every version (no secret, a secret's hash, a holder key) read back and
    /// re-encode to the same bytes, and a key issued with a secret's hash still authenticates.
    #[test]
    fn claims_of_every_version_are_canonical_and_old_keys_still_work() {
        let (op, auth, cert) = setup();
        let vk = op.verifying_key();
        let mut with_hash = claims("com.acme", 0);
        with_hash.secret_hash = Some([3; 32]);
        let mut with_holder = claims("com.acme", 0);
        with_holder.holder = Some([4; 32]);
        for c in [claims("com.acme", 0), with_hash, with_holder] {
            let b = rmp_serde::to_vec(&c).unwrap();
            let back: KeyClaims = rmp_serde::from_slice(&b).unwrap();
            assert_eq!(back, c);
            assert_eq!(rmp_serde::to_vec(&back).unwrap(), b);
        }
        // A version-2 key issued before holder keys: its claims carry the secret's hash.
        let secret = [9u8; 32];
        let mut old = claims("com.acme", 0);
        old.secret_hash = Some(sha256(&[&secret]));
        let cl = rmp_serde::to_vec(&old).unwrap();
        let sig = sign_doc(&auth, CLAIMS_DOMAIN, &cl);
        let env = Envelope2(
            VERSION,
            cert.cert.clone(),
            cert.sig.clone(),
            cl,
            sig,
            secret.to_vec(),
        );
        let old_key = format!(
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(rmp_serde::to_vec(&env).unwrap())
        );
        let v = verify_key(&old_key, &vk, 10).expect("an older version-2 key still works");
        assert_eq!(v.claims.proof_key(), None, "but proves no session");
        assert_eq!(bearer_proof(&old_key, &[0; 32]), None);
    }
}
