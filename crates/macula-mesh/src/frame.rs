//! The inter-node protocol: length-prefixed [`Frame`]s on one long-lived stream per direction
//! between two nodes. WAMP content travels as MessagePack WAMP messages inside the frames, so the
//! receiving node decodes and validates it with the same codec as client input.
//!
//! A frame body starts with a tag byte. The per-event frames (publish, call, reply) have a fixed
//! binary header (length-prefixed realm and origin, then the WAMP message as the rest of the body)
//! so that they are written without an intermediate buffer and read without copying the message;
//! the rare control frames are MessagePack (tag 0).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Version of the frame protocol, announced in [`Frame::Hello`]; a peer speaking another one
/// is refused. 3: interest and registrations name a session; session proofs. 4: workload
/// deploy records, leases and placement. 5: packages' files between nodes (blob parts).
pub const PROTOCOL_VERSION: u16 = 5;

/// The most bytes one [`Frame::BlobAsk`] may ask for (and one [`Frame::BlobPart`] carries).
pub const MAX_BLOB_PART: u32 = 1 << 20;

const TAG_CONTROL: u8 = 0;
const TAG_PUBLISH: u8 = 1;
const TAG_CALL: u8 = 2;
const TAG_REPLY: u8 = 3;

/// Why a frame body did not decode.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("unknown frame tag {0}")]
    Tag(u8),
    #[error("truncated frame header")]
    Truncated,
    #[error("frame header field is not UTF-8")]
    Utf8,
    #[error("control frame: {0}")]
    Control(#[from] rmp_serde::decode::Error),
}

/// The per-event frames, for [`encode_routed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    Publish,
    Call,
    Reply,
}

/// Writes a publish, call or reply frame (with its length prefix) into `out`: the header, then
/// whatever `msg` appends (the MessagePack WAMP message). `origin` is ignored for replies.
pub fn encode_routed(
    out: &mut Vec<u8>,
    kind: Routed,
    realm: &str,
    origin: (u64, &str, &str),
    msg: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let tag = match kind {
        Routed::Publish => TAG_PUBLISH,
        Routed::Call => TAG_CALL,
        Routed::Reply => TAG_REPLY,
    };
    out.push(tag);
    put_str(out, realm);
    if kind != Routed::Reply {
        out.extend_from_slice(&origin.0.to_be_bytes());
        put_str(out, origin.1);
        put_str(out, origin.2);
    }
    msg(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A string with a u16 length; longer ones are cut at a character boundary (realm names, URIs
/// and auth ids are far shorter, and the receiver validates them anyway).
fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

struct Reader {
    body: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        let end = self.pos.checked_add(n).ok_or(FrameError::Truncated)?;
        let s = self.body.get(self.pos..end).ok_or(FrameError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<usize, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u16()?;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| FrameError::Utf8)
    }

    fn origin(&mut self) -> Result<Origin, FrameError> {
        Ok(Origin {
            session: self.u64()?,
            authid: self.string()?,
            authrole: self.string()?,
        })
    }

    /// The rest of the body, without copying.
    fn rest(self) -> Bytes {
        self.body.slice(self.pos..)
    }
}

/// Who originally sent a forwarded publication or call: the receiving node checks its own ACL for
/// this realm and role before acting, so no privilege is gained by going through another node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    pub session: u64,
    pub authid: String,
    pub authrole: String,
}

/// One inter-node message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame on every stream: the operator's certificate for the sender's peer id.
    Hello { version: u16, cert: Bytes },
    /// A signed realm state (policy, roles, revoked keys), flooded to every node.
    State { realm: String, state: Bytes },
    /// The sender's own sessions hold (`add`) or no longer hold a subscription to `uri`;
    /// `session` (of role `role`, proved by a [`Frame::Session`] sent before) is one that holds
    /// it. An `add` for an interest already held names the session that holds it now.
    Interest {
        realm: String,
        uri: String,
        policy: String,
        session: u64,
        role: String,
        add: bool,
    },
    /// The sender's own sessions registered (`add`) or no longer register `uri`; `session` and
    /// `role` as for [`Frame::Interest`].
    Registration {
        realm: String,
        uri: String,
        policy: String,
        invoke: String,
        session: u64,
        role: String,
        add: bool,
    },
    /// A publication (MessagePack PUBLISH whose request id is the publication id).
    Publish {
        realm: String,
        origin: Origin,
        msg: Bytes,
    },
    /// A call for a callee on the receiving node (MessagePack CALL whose request id is the
    /// sender's invocation id).
    Call {
        realm: String,
        origin: Origin,
        msg: Bytes,
    },
    /// RESULT, ERROR or INTERRUPT between the two nodes' ends of a forwarded call.
    Reply { realm: String, msg: Bytes },
    /// Nodes the sender is linked with in `realm` (peer ids), so that realm nodes find each
    /// other through any one of them, not through the DHT alone.
    Peers { realm: String, peers: Vec<String> },
    /// A usage report (MessagePack, the node's format) for the billing aggregator's node.
    Usage { id: u64, report: Bytes },
    /// The aggregator's answer to [`Frame::Usage`] `id`: stored, or why not.
    UsageAck { id: u64, error: Option<String> },
    /// Every realm state the sender had when the stream opened was sent before this.
    StatesDone,
    /// Answer [`Frame::BarrierAck`] once everything sent before this is applied (an interest
    /// or registration the sender's client is about to be told about).
    Barrier { id: u64 },
    /// Everything the peer sent before its [`Frame::Barrier`] `id` is applied here.
    BarrierAck { id: u64 },
    /// An operator-signed revocation of a node ([`crate::cert::Revocation`]), flooded to every
    /// node like a realm state.
    NodeRevoked { revocation: Bytes },
    /// The sender's certificate is due for renewal: a node holding the operator key answers
    /// with [`Frame::CertIssued`].
    CertRenew,
    /// A fresh certificate for the receiver.
    CertIssued { cert: Bytes },
    /// The proof of the role of the sender's session `session`, sent before the first frame
    /// that names it: the public form of its key (`credential::public_form`) and the key
    /// holder's signature `sig` over `credential::session_digest(sender, realm, nonce)`. The
    /// receiver takes the session's role from it, not from the frames.
    Session {
        realm: String,
        session: u64,
        public: String,
        nonce: Bytes,
        sig: Bytes,
    },
    /// A workload's deploy record (`macula_workloads::record::DeployRecord`, JSON), signed by
    /// the deploying key's holder and flooded to every node like a realm state.
    Workload { record: Bytes },
    /// A request to the receiver as a lease authority (`macula_workloads::lease::Request`,
    /// JSON), for a slot the sender wants to hold itself.
    LeaseRequest { req: Bytes },
    /// The authority's answer (`macula_workloads::lease::Reply`, JSON).
    LeaseReply { reply: Bytes },
    /// Placement (tenders, bids, awards) and the questions behind status and logs
    /// (`macula_workloads::wire::Work`, JSON).
    Work { msg: Bytes },
    /// A request for `len` bytes (at most [`MAX_BLOB_PART`]) of blob `digest` (`sha256:<hex>`:
    /// a file of a Hub package) from `offset`, answered with [`Frame::BlobPart`] `id`.
    BlobAsk {
        id: u64,
        digest: String,
        offset: u64,
        len: u32,
    },
    /// Bytes of the blob asked for in `id` from `offset`, and its whole size; `error` when the
    /// sender does not hold it (`data` is then empty). The asker verifies the whole blob
    /// against its digest: a peer that lies costs a retry elsewhere, nothing more.
    BlobPart {
        id: u64,
        offset: u64,
        total: u64,
        data: Bytes,
        error: Option<String>,
    },
}

impl Frame {
    /// Short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::State { .. } => "state",
            Frame::Interest { .. } => "interest",
            Frame::Registration { .. } => "registration",
            Frame::Publish { .. } => "publish",
            Frame::Call { .. } => "call",
            Frame::Reply { .. } => "reply",
            Frame::Peers { .. } => "peers",
            Frame::Usage { .. } => "usage",
            Frame::UsageAck { .. } => "usage_ack",
            Frame::StatesDone => "states_done",
            Frame::Barrier { .. } => "barrier",
            Frame::BarrierAck { .. } => "barrier_ack",
            Frame::NodeRevoked { .. } => "node_revoked",
            Frame::CertRenew => "cert_renew",
            Frame::CertIssued { .. } => "cert_issued",
            Frame::Session { .. } => "session",
            Frame::Workload { .. } => "workload",
            Frame::LeaseRequest { .. } => "lease_request",
            Frame::LeaseReply { .. } => "lease_reply",
            Frame::Work { .. } => "work",
            Frame::BlobAsk { .. } => "blob_ask",
            Frame::BlobPart { .. } => "blob_part",
        }
    }

    /// Appends the frame with its 4-byte big-endian length prefix.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        fn origin(o: &Origin) -> (u64, &str, &str) {
            (o.session, o.authid.as_str(), o.authrole.as_str())
        }
        let (kind, realm, o, msg) = match self {
            Frame::Publish {
                realm,
                origin: o,
                msg,
            } => (Routed::Publish, realm, origin(o), msg),
            Frame::Call {
                realm,
                origin: o,
                msg,
            } => (Routed::Call, realm, origin(o), msg),
            Frame::Reply { realm, msg } => (Routed::Reply, realm, (0, "", ""), msg),
            _ => {
                let start = out.len();
                out.extend_from_slice(&[0; 4]);
                out.push(TAG_CONTROL);
                // Serializing plain data into a Vec cannot fail.
                if rmp_serde::encode::write(out, self).is_err() {
                    out.truncate(start);
                    return;
                }
                let len = (out.len() - start - 4) as u32;
                out[start..start + 4].copy_from_slice(&len.to_be_bytes());
                return;
            }
        };
        encode_routed(out, kind, realm, o, |out| out.extend_from_slice(msg));
    }

    pub fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(64);
        self.encode_into(&mut v);
        Bytes::from(v)
    }

    /// Decodes a frame body (without its length prefix). The WAMP message of a routed frame
    /// shares `body`'s memory.
    pub fn decode(body: Bytes) -> Result<Frame, FrameError> {
        let tag = *body.first().ok_or(FrameError::Empty)?;
        let mut rd = Reader { body, pos: 1 };
        match tag {
            TAG_CONTROL => {
                let f: Frame = rmp_serde::from_slice(&rd.body[1..])?;
                // Routed frames only travel in their binary form.
                match f {
                    Frame::Publish { .. } | Frame::Call { .. } | Frame::Reply { .. } => {
                        Err(FrameError::Tag(TAG_CONTROL))
                    }
                    f => Ok(f),
                }
            }
            TAG_PUBLISH | TAG_CALL => {
                let realm = rd.string()?;
                let origin = rd.origin()?;
                let msg = rd.rest();
                Ok(if tag == TAG_PUBLISH {
                    Frame::Publish { realm, origin, msg }
                } else {
                    Frame::Call { realm, origin, msg }
                })
            }
            TAG_REPLY => {
                let realm = rd.string()?;
                Ok(Frame::Reply {
                    realm,
                    msg: rd.rest(),
                })
            }
            t => Err(FrameError::Tag(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let f = Frame::Publish {
            realm: "com.acme".into(),
            origin: Origin {
                session: 7,
                authid: "k1".into(),
                authrole: "developer".into(),
            },
            msg: Bytes::from_static(&[0x93, 0x10, 0x01, 0x80]),
        };
        let b = f.encode();
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        assert_eq!(len, b.len() - 4);
        assert_eq!(Frame::decode(b.slice(4..)).unwrap(), f);
        // A cut header is an error; a cut message is the node's to refuse (it decodes WAMP).
        assert!(Frame::decode(b.slice(4..12)).is_err());
        assert!(Frame::decode(Bytes::from_static(&[0xc1, 0xff, 0x00])).is_err());
        assert!(Frame::decode(Bytes::new()).is_err());
        let c = Frame::Interest {
            realm: "com.acme".into(),
            uri: "com.acme.t".into(),
            policy: "prefix".into(),
            session: 9,
            role: "developer".into(),
            add: true,
        };
        assert_eq!(Frame::decode(c.encode().slice(4..)).unwrap(), c);
        let r = Frame::Reply {
            realm: "com.acme".into(),
            msg: Bytes::from_static(&[0x93, 0x32, 0x01, 0x80]),
        };
        assert_eq!(Frame::decode(r.encode().slice(4..)).unwrap(), r);
        let p = Frame::Peers {
            realm: "com.acme".into(),
            peers: vec!["12D3KooWExample".into()],
        };
        assert_eq!(Frame::decode(p.encode().slice(4..)).unwrap(), p);
    }

    #[test]
    fn no_input_panics_the_decoder() {
        // Every prefix and single-byte corruption of valid frames, plus pseudo-random bodies.
        let f = Frame::Call {
            realm: "com.acme".into(),
            origin: Origin {
                session: u64::MAX,
                authid: "ké".into(),
                authrole: "r".into(),
            },
            msg: Bytes::from_static(&[0x96, 0x30, 0x01, 0x80, 0xa1, 0x70, 0x90]),
        };
        let good = f.encode().slice(4..).to_vec();
        for n in 0..good.len() {
            let _ = Frame::decode(Bytes::copy_from_slice(&good[..n]));
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[n] ^= flip;
                let _ = Frame::decode(Bytes::from(bad));
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let len = (x % 64) as usize;
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 5) as u8 // small bytes: valid tags and short lengths often
                })
                .collect();
            let _ = Frame::decode(Bytes::from(body));
        }
    }
}
