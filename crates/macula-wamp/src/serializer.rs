//! Serializers: JSON, MessagePack and CBOR, chosen per session by WebSocket subprotocol or RawSocket
//! handshake.

use crate::{Message, ProtocolError, Value};

/// A WAMP serializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Serializer {
    Json,
    MsgPack,
    Cbor,
}

impl Serializer {
    /// All serializers, in order of preference when a client offers several.
    pub const ALL: [Serializer; 3] = [Serializer::MsgPack, Serializer::Cbor, Serializer::Json];

    /// The WebSocket subprotocol name (`wamp.2.json`, ...).
    pub fn subprotocol(self) -> &'static str {
        match self {
            Serializer::Json => "wamp.2.json",
            Serializer::MsgPack => "wamp.2.msgpack",
            Serializer::Cbor => "wamp.2.cbor",
        }
    }

    pub fn from_subprotocol(s: &str) -> Option<Serializer> {
        Self::ALL.into_iter().find(|x| x.subprotocol() == s)
    }

    /// The RawSocket serializer id (1 JSON, 2 MessagePack, 3 CBOR).
    pub fn rawsocket_id(self) -> u8 {
        match self {
            Serializer::Json => 1,
            Serializer::MsgPack => 2,
            Serializer::Cbor => 3,
        }
    }

    pub fn from_rawsocket_id(id: u8) -> Option<Serializer> {
        Self::ALL.into_iter().find(|x| x.rawsocket_id() == id)
    }

    /// Whether messages travel as text (JSON) rather than binary WebSocket frames.
    pub fn is_text(self) -> bool {
        self == Serializer::Json
    }

    pub fn name(self) -> &'static str {
        match self {
            Serializer::Json => "json",
            Serializer::MsgPack => "msgpack",
            Serializer::Cbor => "cbor",
        }
    }

    /// Appends the encoding of `msg` to `out`.
    pub fn encode_into(self, msg: &Message, out: &mut Vec<u8>) {
        if self == Serializer::MsgPack && crate::passthrough::encode_spliced(msg, out) {
            return;
        }
        // Encoding our own message types into a Vec cannot fail except on non-string map keys,
        // which `Dict` rules out; a failure would be a bug, so it is logged by the caller's tests.
        let r = match self {
            Serializer::Json => serde_json::to_writer(&mut *out, msg).map_err(|e| e.to_string()),
            Serializer::MsgPack => rmp_serde::encode::write(out, msg).map_err(|e| e.to_string()),
            Serializer::Cbor => ciborium::into_writer(msg, out).map_err(|e| e.to_string()),
        };
        debug_assert!(r.is_ok(), "encoding failed: {r:?}");
    }

    /// Encodes `msg`.
    pub fn encode(self, msg: &Message) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.encode_into(msg, &mut out);
        out
    }

    /// Decodes one message, never panicking on any input.
    pub fn decode(self, bytes: &[u8]) -> Result<Message, ProtocolError> {
        let value = self.decode_value(bytes)?;
        Message::from_value(value)
    }

    /// Decodes one message like [`Serializer::decode`], except that a MessagePack PUBLISH keeps its
    /// arguments as raw bytes (see [`crate::passthrough`]). The router uses this on its input.
    pub fn decode_fast(self, bytes: &[u8]) -> Result<Message, ProtocolError> {
        if self == Serializer::MsgPack {
            if let Some(m) = crate::passthrough::decode_publish(bytes) {
                return Ok(m);
            }
        }
        self.decode(bytes)
    }

    /// Decodes a single value.
    pub fn decode_value(self, bytes: &[u8]) -> Result<Value, ProtocolError> {
        let err = |detail: String| ProtocolError::Decode {
            serializer: self.name(),
            detail,
        };
        match self {
            Serializer::Json => serde_json::from_slice(bytes).map_err(|e| err(e.to_string())),
            Serializer::MsgPack => {
                let mut rest = bytes;
                let mut de = rmp_serde::Deserializer::new(&mut rest);
                let v: Value =
                    serde::Deserialize::deserialize(&mut de).map_err(|e| err(e.to_string()))?;
                if rest.is_empty() {
                    Ok(v)
                } else {
                    Err(err("trailing bytes after the message".into()))
                }
            }
            Serializer::Cbor => ciborium::from_reader(bytes).map_err(|e| err(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dict, Payload};

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                realm: "com.acme".into(),
                details: dict! {"roles" => dict!{"subscriber" => dict!{}}},
            },
            Message::Publish {
                request: 7,
                options: dict! {"acknowledge" => true},
                topic: "com.acme.t".into(),
                payload: Payload::new(
                    vec![
                        Value::Int(1),
                        Value::Bin(vec![0, 1, 255]),
                        Value::Float(1.5),
                    ],
                    dict! {"k" => "v"},
                ),
            },
            Message::Event {
                subscription: 1,
                publication: 1 << 53,
                details: dict! {},
                payload: Payload::args(vec!["x".into()]),
            },
            Message::Yield {
                request: 3,
                options: dict! {},
                payload: Payload::default(),
            },
            Message::Error {
                request_type: 48,
                request: 9,
                details: dict! {},
                error: "wamp.error.no_such_procedure".into(),
                payload: Payload::default(),
            },
        ]
    }

    #[test]
    fn every_serializer_round_trips_messages() {
        for s in Serializer::ALL {
            for m in samples() {
                let bytes = s.encode(&m);
                assert_eq!(s.decode(&bytes).unwrap(), m, "{s:?}");
            }
        }
    }

    #[test]
    fn json_binary_uses_the_wamp_convention() {
        let m = Message::Published {
            request: 1,
            publication: 2,
        };
        assert_eq!(Serializer::Json.encode(&m), b"[17,1,2]");
        let v = Serializer::Json.decode_value(br#""\u0000AAH/""#).unwrap();
        assert_eq!(v, Value::Bin(vec![0, 1, 255]));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let j = Serializer::Json;
        assert_eq!(j.decode(b"{}"), Err(ProtocolError::NotAnArray));
        assert_eq!(j.decode(b"[999]"), Err(ProtocolError::UnknownType(999)));
        assert!(matches!(
            j.decode(b"[16, 1, {}]"),
            Err(ProtocolError::Missing {
                kind: "publish",
                ..
            })
        ));
        assert!(matches!(
            j.decode(b"[16, 1, [], \"t\"]"),
            Err(ProtocolError::Field {
                kind: "publish",
                ..
            })
        ));
        assert!(matches!(
            j.decode(b"[32, -1, {}, \"t\"]"),
            Err(ProtocolError::Field { .. })
        ));
        assert!(matches!(
            j.decode(b"[32, 9007199254740993, {}, \"t\"]"),
            Err(ProtocolError::Field { .. })
        ));
        assert!(matches!(
            j.decode(b"[1, \"r\", {}, 5]"),
            Err(ProtocolError::Field { .. })
        ));
        assert!(j.decode(b"[1,").is_err());
        let deep = "[".repeat(500) + &"]".repeat(500);
        assert!(j.decode(deep.as_bytes()).is_err());
        assert!(Serializer::MsgPack
            .decode(&[0xdd, 0xff, 0xff, 0xff, 0xff])
            .is_err());
    }
}
