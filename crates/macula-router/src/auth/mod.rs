//! Authentication: turning a HELLO into an authenticated identity (realm, role, key id).
//!
//! Verification depends only on the trust root's public key and a revocation list — never on
//! storage — so a node keeps admitting clients when whatever issues keys is unreachable.

pub mod credential;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use ed25519_dalek::{Signature, VerifyingKey};
use macula_wamp::{errors, uri, Dict, Message, Value};
use sha2::{Digest, Sha256};

pub use credential::{AuthorityCert, KeyClaims, SignedCert, VerifiedKey};

/// Why a credential was refused. Messages name the problem and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("invalid signature on the {0}: the key was not issued by this mesh's trust root")]
    BadSignature(&'static str),
    #[error("the {0} has expired: create a new key")]
    Expired(&'static str),
    #[error("key {0} has been revoked: create a new key")]
    Revoked(String),
    #[error("the key is for realm {realm}, which is outside its authority's realm {authority}")]
    RealmOutsideAuthority { realm: String, authority: String },
    #[error("the key is for realm {key_realm}, not {realm}")]
    WrongRealm { realm: String, key_realm: String },
    #[error("this key is bound to a key pair: authenticate with WAMP-Cryptosign, not as a ticket")]
    KeyPairRequired,
    #[error("the signature over the challenge does not verify")]
    ChallengeFailed,
    #[error("this workload ticket is not (or no longer) valid here for this realm: a replica's ticket works on the node that runs it, in its own realm, while it runs")]
    UnknownTicket,
}

/// Identity of an authenticated session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub realm: String,
    /// The realm the credential was issued for (equal to `realm` or a parent realm).
    pub key_realm: String,
    pub role: String,
    /// The key id (`authid` in WAMP terms).
    pub kid: String,
    pub name: String,
    /// `ticket` or `cryptosign`.
    pub method: &'static str,
    pub expires_at: u64,
    /// The Ed25519 public key of the realm authority that signed the key. A node admits the
    /// session only if this is an authority of the realm's current registration (see
    /// `Policy::accepts_authority`), which binds every key to one registration of one realm.
    pub authority: [u8; 32],
    /// What proves the session's role to other nodes (see [`SessionProof`]); `None` for keys
    /// that cannot (version 1, or version 2 issued before holder keys) or without a mesh.
    pub proof: Option<SessionProof>,
}

/// What proves a session's role to other nodes: the key's public form
/// (`credential::public_form`: its realm, role and id) and the key holder's signature over
/// `credential::session_digest(node, realm, nonce)` — the node the session joined and its
/// realm — so that a node replaying the public form under its own peer id proves nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionProof {
    pub public: String,
    pub nonce: [u8; 32],
    pub sig: [u8; 64],
}

impl SessionProof {
    /// The proof for a session of bearer key `key` joining `realm` on node `node` (its peer id
    /// bytes), signed here with the key derived from the key's secret (see
    /// [`Authenticator::bearer_proof`] for the cached form).
    pub fn bearer(key: &str, node: &[u8], realm: &str) -> Option<SessionProof> {
        let nonce: [u8; 32] = rand::random();
        let sig = credential::bearer_proof(key, &credential::session_digest(node, realm, &nonce))?;
        Some(SessionProof {
            public: credential::public_form(key)?,
            nonce,
            sig,
        })
    }
}

/// Credentials a node issues itself and keeps in memory (a workload replica's ticket, given to
/// the replica only): looked up before API keys. `identity` answers for `ticket` joining
/// `realm`, or `None` if it is not one of them.
pub trait LocalTickets: Send + Sync {
    fn identity(&self, ticket: &str, realm: &str) -> Option<Identity>;
}

/// What starts a local ticket (API keys start `sk_live_`).
pub const LOCAL_TICKET_PREFIX: &str = "wt_";

/// Verifies API keys: trust root, revocations and a cache of verified keys so that a returning
/// key costs a hash lookup, not two signature checks.
pub struct Authenticator {
    operator: VerifyingKey,
    revoked: HashSet<String>,
    local: Option<std::sync::Arc<dyn LocalTickets>>,
    cache: Mutex<HashMap<[u8; 32], VerifiedKey>>,
    /// Bearer session proofs by (key, node, realm): a proof names no session, so one serves
    /// every session of a key in a realm, and a returning key costs no signature.
    proofs: Mutex<HashMap<[u8; 32], SessionProof>>,
}

/// Bound on the verified-key cache; it is cleared when full (simple, and verification is cheap enough).
const CACHE_LIMIT: usize = 100_000;

impl Authenticator {
    pub fn new(operator: VerifyingKey, revoked: HashSet<String>) -> Self {
        Authenticator {
            operator,
            revoked,
            local: None,
            cache: Mutex::new(HashMap::new()),
            proofs: Mutex::new(HashMap::new()),
        }
    }

    /// [`SessionProof::bearer`], made once per (key, node, realm).
    pub fn bearer_proof(&self, key: &str, node: &[u8], realm: &str) -> Option<SessionProof> {
        let mut h = Sha256::new();
        for part in [key.as_bytes(), node, realm.as_bytes()] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part);
        }
        let digest: [u8; 32] = h.finalize().into();
        if let Some(p) = self
            .proofs
            .lock()
            .ok()
            .and_then(|c| c.get(&digest).cloned())
        {
            return Some(p);
        }
        let p = SessionProof::bearer(key, node, realm)?;
        if let Ok(mut c) = self.proofs.lock() {
            if c.len() >= CACHE_LIMIT {
                c.clear();
            }
            c.insert(digest, p.clone());
        }
        Some(p)
    }

    pub fn operator(&self) -> &VerifyingKey {
        &self.operator
    }

    /// Also accepts the node's own tickets (see [`LocalTickets`]).
    pub fn with_local_tickets(mut self, local: std::sync::Arc<dyn LocalTickets>) -> Self {
        self.local = Some(local);
        self
    }

    /// The identity of local ticket `ticket` joining `realm`, if it is one.
    pub fn local_ticket(&self, ticket: &str, realm: &str) -> Option<Identity> {
        if !ticket.starts_with(LOCAL_TICKET_PREFIX) {
            return None;
        }
        self.local.as_ref()?.identity(ticket, realm)
    }

    pub fn is_revoked(&self, kid: &str) -> bool {
        self.revoked.contains(kid)
    }

    /// Verifies `key` at `now` (Unix seconds), honouring revocations.
    pub fn verify(&self, key: &str, now: u64) -> Result<VerifiedKey, AuthError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let cached = self.cache.lock().ok().and_then(|c| c.get(&digest).cloned());
        let v = match cached {
            Some(v) => v,
            None => {
                let v = credential::verify_key(key, &self.operator, now)?;
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() >= CACHE_LIMIT {
                        c.clear();
                    }
                    c.insert(digest, v.clone());
                }
                v
            }
        };
        let expired = |t: u64| t != 0 && t <= now;
        if expired(v.claims.expires_at) {
            return Err(AuthError::Expired("API key"));
        }
        if expired(v.authority.expires_at) {
            return Err(AuthError::Expired("realm authority certificate"));
        }
        if self.is_revoked(&v.claims.kid) {
            return Err(AuthError::Revoked(v.claims.kid));
        }
        Ok(v)
    }

    fn identity(
        &self,
        realm: &str,
        v: VerifiedKey,
        method: &'static str,
    ) -> Result<Identity, AuthError> {
        if !uri::is_same_or_subrealm(realm, &v.claims.realm) {
            return Err(AuthError::WrongRealm {
                realm: realm.into(),
                key_realm: v.claims.realm,
            });
        }
        Ok(Identity {
            realm: realm.into(),
            key_realm: v.claims.realm,
            role: v.claims.role,
            kid: v.claims.kid,
            name: v.claims.name,
            method,
            // The earlier of the key's and its authority certificate's expiry (0: never), as
            // other nodes judge the session's proof.
            expires_at: [v.claims.expires_at, v.authority.expires_at]
                .into_iter()
                .filter(|e| *e != 0)
                .min()
                .unwrap_or(0),
            authority: v.authority.authority,
            proof: None,
        })
    }
}

/// The authentication exchange of one connection, from HELLO to WELCOME or ABORT.
#[derive(Debug)]
pub enum Handshake {
    /// Waiting for HELLO.
    Start,
    /// CHALLENGE sent, waiting for AUTHENTICATE.
    Challenged {
        realm: String,
        hello: Dict,
        method: Pending,
    },
}

/// The pending authentication method after a CHALLENGE.
#[derive(Debug)]
pub enum Pending {
    Ticket,
    Cryptosign {
        challenge: [u8; 32],
        nonce: [u8; 32],
        pubkey: [u8; 32],
        credential: String,
    },
}

/// What the connection must do next.
#[derive(Debug)]
pub enum Step {
    /// Send this CHALLENGE and wait for AUTHENTICATE.
    Challenge(Message),
    /// Authenticated: the caller joins the realm (which checks the role) and sends WELCOME.
    Authenticated { identity: Identity, hello: Dict },
    /// Send this ABORT and close.
    Abort(Message),
}

/// Builds a router-initiated GOODBYE with a human message: how an *established* session is
/// closed (revocation, limits, shutdown). ABORT is only for sessions not yet established and for
/// protocol violations.
pub fn goodbye(reason: &str, message: impl Into<String>) -> Message {
    let mut details = Dict::new();
    details.insert("message".into(), Value::Str(message.into()));
    Message::Goodbye {
        details,
        reason: reason.into(),
    }
}

/// Builds an ABORT with a human message.
pub fn abort(reason: &str, message: impl Into<String>) -> Message {
    let mut details = Dict::new();
    details.insert("message".into(), Value::Str(message.into()));
    Message::Abort {
        details,
        reason: reason.into(),
    }
}

impl Handshake {
    /// Feeds one message received before WELCOME. `nonce` is fresh randomness; `node`, this
    /// node's peer id (bytes) when it is part of a mesh: the cryptosign challenge is then the
    /// session digest for this node and realm, so the client's signature doubles as the
    /// session's proof ([`SessionProof`]), and a bearer key's presenter signs one here.
    pub fn on_message(
        &mut self,
        msg: Message,
        auth: &Authenticator,
        now: u64,
        nonce: [u8; 32],
        node: Option<&[u8]>,
    ) -> Step {
        match (std::mem::replace(self, Handshake::Start), msg) {
            (Handshake::Start, Message::Hello { realm, details }) => {
                if let Err(e) = uri::validate_realm(&realm) {
                    return Step::Abort(abort(errors::NO_SUCH_REALM, e.to_string()));
                }
                let methods: Vec<String> = details
                    .get("authmethods")
                    .and_then(Value::as_list)
                    .map(|l| {
                        l.iter()
                            .filter_map(|m| m.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                for m in &methods {
                    match m.as_str() {
                        "ticket" => {
                            *self = Handshake::Challenged {
                                realm,
                                hello: details,
                                method: Pending::Ticket,
                            };
                            return Step::Challenge(Message::Challenge {
                                method: "ticket".into(),
                                extra: Dict::new(),
                            });
                        }
                        "cryptosign" => {
                            let extra = details.get("authextra").and_then(Value::as_dict);
                            let pubkey = extra
                                .and_then(|e| e.get("pubkey"))
                                .and_then(Value::as_str)
                                .and_then(credential::parse_public_key);
                            let cred = extra
                                .and_then(|e| e.get("credential"))
                                .and_then(Value::as_str);
                            let (Some(pubkey), Some(cred)) = (pubkey, cred) else {
                                return Step::Abort(abort(
                                    errors::AUTHENTICATION_FAILED,
                                    "cryptosign needs authextra.pubkey (64 hex characters) and authextra.credential (the sk_live_ key bound to that public key)",
                                ));
                            };
                            let credential = cred.to_owned();
                            let challenge = match node {
                                Some(n) => credential::session_digest(n, &realm, &nonce),
                                None => nonce,
                            };
                            let mut extra = Dict::new();
                            extra.insert("challenge".into(), Value::Str(hex::encode(challenge)));
                            extra.insert("channel_binding".into(), Value::Null);
                            *self = Handshake::Challenged {
                                realm,
                                hello: details,
                                method: Pending::Cryptosign {
                                    challenge,
                                    nonce,
                                    pubkey,
                                    credential,
                                },
                            };
                            return Step::Challenge(Message::Challenge {
                                method: "cryptosign".into(),
                                extra,
                            });
                        }
                        _ => {}
                    }
                }
                Step::Abort(abort(
                    errors::NO_AUTH_METHOD,
                    "no supported authentication method offered: use ticket (the API key as the ticket) or cryptosign",
                ))
            }
            (
                Handshake::Challenged {
                    realm,
                    hello,
                    method,
                },
                Message::Authenticate { signature, .. },
            ) => {
                let result = match method {
                    Pending::Ticket if signature.starts_with(LOCAL_TICKET_PREFIX) => auth
                        .local_ticket(&signature, &realm)
                        .ok_or(AuthError::UnknownTicket),
                    Pending::Ticket => auth.verify(&signature, now).and_then(|v| {
                        if v.claims.pubkey.is_some() {
                            Err(AuthError::KeyPairRequired)
                        } else {
                            auth.identity(&realm, v, "ticket").map(|mut i| {
                                i.proof =
                                    node.and_then(|n| auth.bearer_proof(&signature, n, &realm));
                                i
                            })
                        }
                    }),
                    Pending::Cryptosign {
                        challenge,
                        nonce,
                        pubkey,
                        credential,
                    } => verify_challenge(&pubkey, &challenge, &signature)
                        .and_then(|sig| Ok((sig, auth.verify(&credential, now)?)))
                        .and_then(|(sig, v)| {
                            if v.claims.pubkey != Some(pubkey) {
                                Err(AuthError::ChallengeFailed)
                            } else {
                                auth.identity(&realm, v, "cryptosign").map(|mut i| {
                                    i.proof = node
                                        .and_then(|_| credential::public_form(&credential))
                                        .map(|public| SessionProof { public, nonce, sig });
                                    i
                                })
                            }
                        }),
                };
                match result {
                    Ok(identity) => Step::Authenticated { identity, hello },
                    Err(e) => Step::Abort(abort(errors::AUTHENTICATION_FAILED, e.to_string())),
                }
            }
            (_, Message::Goodbye { .. }) | (_, Message::Abort { .. }) => Step::Abort(abort(
                errors::NORMAL,
                "session closed before it was established",
            )),
            (_, other) => Step::Abort(abort(
                errors::PROTOCOL_VIOLATION,
                format!(
                    "unexpected {} before the session was established",
                    other.kind()
                ),
            )),
        }
    }
}

/// Checks a cryptosign signature over `challenge`; the signature's 64 bytes.
fn verify_challenge(
    pubkey: &[u8; 32],
    challenge: &[u8; 32],
    signature_hex: &str,
) -> Result<[u8; 64], AuthError> {
    let key = VerifyingKey::from_bytes(pubkey).map_err(|_| AuthError::ChallengeFailed)?;
    let bytes = hex::decode(signature_hex).map_err(|_| AuthError::ChallengeFailed)?;
    // Autobahn sends signature || challenge (96 bytes); a bare 64-byte signature is also accepted.
    if bytes.len() != 64 && bytes.len() != 96 {
        return Err(AuthError::ChallengeFailed);
    }
    if bytes.len() == 96 && bytes[64..] != challenge[..] {
        return Err(AuthError::ChallengeFailed);
    }
    let sig = Signature::from_slice(&bytes[..64]).map_err(|_| AuthError::ChallengeFailed)?;
    // Strict: a weak (small-order) public key would otherwise verify a forged signature.
    key.verify_strict(challenge, &sig)
        .map_err(|_| AuthError::ChallengeFailed)?;
    Ok(sig.to_bytes())
}
