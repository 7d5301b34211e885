//! The inter-node protocol: length-prefixed MessagePack [`Frame`]s on one long-lived stream per
//! direction between two nodes. WAMP content travels as MessagePack WAMP messages inside the
//! frames, so the receiving node decodes and validates it with the same codec as client input.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Version of the frame protocol, announced in [`Frame::Hello`].
pub const PROTOCOL_VERSION: u16 = 1;

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
    /// The sender's own sessions hold (`add`) or no longer hold a subscription to `uri`.
    Interest {
        realm: String,
        uri: String,
        policy: String,
        add: bool,
    },
    /// The sender's own sessions registered (`add`) or no longer register `uri`.
    Registration {
        realm: String,
        uri: String,
        policy: String,
        invoke: String,
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
        }
    }

    /// Appends the frame with its 4-byte big-endian length prefix.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        // Serializing plain data into a Vec cannot fail.
        if rmp_serde::encode::write(out, self).is_err() {
            out.truncate(start);
            return;
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(64);
        self.encode_into(&mut v);
        Bytes::from(v)
    }

    /// Decodes a frame body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<Frame, rmp_serde::decode::Error> {
        rmp_serde::from_slice(body)
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
        assert_eq!(Frame::decode(&b[4..]).unwrap(), f);
        assert!(Frame::decode(&b[4..b.len() - 2]).is_err());
        assert!(Frame::decode(&[0xc1, 0xff, 0x00]).is_err());
    }
}
