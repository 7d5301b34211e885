//! Payload pass-through for MessagePack publications.
//!
//! A router does not need to understand a publication's arguments, only to forward them. For a
//! MessagePack PUBLISH, [`decode_publish`] decodes the header (request, options, topic) and keeps
//! the arguments as the publisher's bytes after checking that they are well-formed MessagePack of
//! the kinds the full decoder accepts (so a subscriber never receives what the router itself would
//! refuse). [`encode_spliced`] writes those bytes into MessagePack EVENTs unchanged; for other
//! serializers the payload is decoded on demand ([`RawPayload::decode`]).
//!
//! Any input the fast path does not accept falls back to the full decoder, which gives the same
//! result or error as before; the property tests check that both paths agree.

use std::sync::Arc;

use crate::message::{code, Message, Payload, MAX_ID};
use crate::{Dict, Value, MAX_DEPTH};

/// A payload kept as MessagePack: the `args` array and, when `elements` is 2, the `kwargs` map,
/// exactly as they appeared in the publisher's message.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPayload {
    pub bytes: Box<[u8]>,
    pub elements: usize,
}

impl RawPayload {
    /// Decodes the arguments. The bytes were validated on the way in, so this cannot fail in
    /// practice; if it did, the payload would be delivered empty rather than crash the router.
    pub fn decode(&self) -> Payload {
        let mut rest: &[u8] = &self.bytes;
        let mut next = || -> Option<Value> {
            let mut de = rmp_serde::Deserializer::new(&mut rest);
            serde::Deserialize::deserialize(&mut de).ok()
        };
        let args = match next() {
            Some(Value::List(l)) => l,
            _ => vec![],
        };
        let kwargs = if self.elements > 1 {
            match next() {
                Some(Value::Dict(d)) => d,
                _ => Dict::new(),
            }
        } else {
            Dict::new()
        };
        Payload::new(args, kwargs)
    }
}

/// Decodes a MessagePack PUBLISH keeping its arguments raw; `None` for anything else (the caller
/// then uses the full decoder).
pub fn decode_publish(bytes: &[u8]) -> Option<Message> {
    let mut rd = bytes;
    let n = match take(&mut rd, 1)?[0] {
        m @ 0x90..=0x9f => (m & 0x0f) as usize,
        _ => return None,
    };
    if !(4..=6).contains(&n) || read_uint(&mut rd)? != code::PUBLISH {
        return None;
    }
    let request = read_uint(&mut rd).filter(|r| *r <= MAX_ID)?;
    let options = {
        let mut de = rmp_serde::Deserializer::new(&mut rd);
        match serde::Deserialize::deserialize(&mut de).ok()? {
            Value::Dict(d) => d,
            _ => return None,
        }
    };
    let topic = read_str(&mut rd)?.to_owned();
    let elements = n - 4;
    let payload_start = bytes.len() - rd.len();
    // Arguments must be an array, keyword arguments a map; each well-formed; nothing after them.
    let mut check = rd;
    for i in 0..elements {
        let is_array = matches!(check.first(), Some(0x90..=0x9f | 0xdc | 0xdd));
        let is_map = matches!(check.first(), Some(0x80..=0x8f | 0xde | 0xdf));
        if (i == 0 && !is_array) || (i == 1 && !is_map) {
            return None;
        }
        skip(&mut check, 1)?;
    }
    if !check.is_empty() {
        return None;
    }
    let payload = if elements == 0 {
        Payload::default()
    } else {
        Payload {
            raw: Some(Arc::new(RawPayload {
                bytes: Box::from(&bytes[payload_start..]),
                elements,
            })),
            ..Payload::default()
        }
    };
    Some(Message::Publish {
        request,
        options,
        topic,
        payload,
    })
}

/// Encodes `msg` as MessagePack splicing its raw payload; `false` if it has none (use the normal
/// encoder).
pub fn encode_spliced(msg: &Message, out: &mut Vec<u8>) -> bool {
    let (head, Some(Payload { raw: Some(raw), .. })) = msg.parts() else {
        return false;
    };
    let n = head.iter().flatten().count() + raw.elements;
    // `n` is at most 8: a fixarray header.
    let start = out.len();
    out.push(0x90 | n as u8);
    for e in head.iter().flatten() {
        if rmp_serde::encode::write(out, e).is_err() {
            out.truncate(start);
            return false;
        }
    }
    out.extend_from_slice(&raw.bytes);
    true
}

fn take<'a>(rd: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rd.len() < n {
        return None;
    }
    let (a, b) = rd.split_at(n);
    *rd = b;
    Some(a)
}

fn be(rd: &mut &[u8], n: usize) -> Option<usize> {
    Some(
        take(rd, n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize),
    )
}

fn read_uint(rd: &mut &[u8]) -> Option<u64> {
    let m = take(rd, 1)?[0];
    Some(match m {
        0x00..=0x7f => m as u64,
        0xcc => be(rd, 1)? as u64,
        0xcd => be(rd, 2)? as u64,
        0xce => be(rd, 4)? as u64,
        0xcf => u64::from_be_bytes(take(rd, 8)?.try_into().ok()?),
        _ => return None,
    })
}

fn read_str<'a>(rd: &mut &'a [u8]) -> Option<&'a str> {
    let m = take(rd, 1)?[0];
    let n = match m {
        0xa0..=0xbf => (m & 0x1f) as usize,
        0xd9 => be(rd, 1)?,
        0xda => be(rd, 2)?,
        0xdb => be(rd, 4)?,
        _ => return None,
    };
    std::str::from_utf8(take(rd, n)?).ok()
}

/// Skips one value, checking it is well-formed: nil, booleans, integers, floats, UTF-8 strings,
/// binaries, arrays and maps with string keys, nested at most `MAX_DEPTH` deep. Extension types
/// are not accepted here (the full decoder decides about them).
fn skip(rd: &mut &[u8], depth: usize) -> Option<()> {
    if depth + 2 > MAX_DEPTH {
        return None;
    }
    let m = *rd.first()?;
    let fixed = |rd: &mut &[u8], n: usize| take(rd, n).map(|_| ());
    match m {
        0xa0..=0xbf | 0xd9 | 0xda | 0xdb => read_str(rd).map(|_| ()),
        _ => {
            *rd = &rd[1..];
            match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Some(()),
                0x80..=0x8f => skip_map(rd, (m & 0x0f) as usize, depth),
                0x90..=0x9f => skip_array(rd, (m & 0x0f) as usize, depth),
                0xc4 => {
                    let n = be(rd, 1)?;
                    fixed(rd, n)
                }
                0xc5 => {
                    let n = be(rd, 2)?;
                    fixed(rd, n)
                }
                0xc6 => {
                    let n = be(rd, 4)?;
                    fixed(rd, n)
                }
                0xca | 0xce | 0xd2 => fixed(rd, 4),
                0xcb | 0xcf | 0xd3 => fixed(rd, 8),
                0xcc | 0xd0 => fixed(rd, 1),
                0xcd | 0xd1 => fixed(rd, 2),
                0xdc => {
                    let n = be(rd, 2)?;
                    skip_array(rd, n, depth)
                }
                0xdd => {
                    let n = be(rd, 4)?;
                    skip_array(rd, n, depth)
                }
                0xde => {
                    let n = be(rd, 2)?;
                    skip_map(rd, n, depth)
                }
                0xdf => {
                    let n = be(rd, 4)?;
                    skip_map(rd, n, depth)
                }
                _ => None,
            }
        }
    }
}

fn skip_array(rd: &mut &[u8], n: usize, depth: usize) -> Option<()> {
    if n > rd.len() {
        return None;
    }
    for _ in 0..n {
        skip(rd, depth + 1)?;
    }
    Some(())
}

fn skip_map(rd: &mut &[u8], n: usize, depth: usize) -> Option<()> {
    if n > rd.len() {
        return None;
    }
    for _ in 0..n {
        read_str(rd)?;
        skip(rd, depth + 1)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dict, Serializer};

    fn publish(payload: Payload) -> Vec<u8> {
        Serializer::MsgPack.encode(&Message::Publish {
            request: 5,
            options: dict! {"acknowledge" => true},
            topic: "com.a.t".into(),
            payload,
        })
    }

    #[test]
    fn msgpack_publications_keep_their_arguments_raw_and_splice_them_into_events() {
        let p = Payload::new(
            vec![Value::Bin(vec![1; 64]), Value::Int(-3)],
            dict! {"k" => "v"},
        );
        let Some(Message::Publish {
            payload,
            options,
            topic,
            request,
        }) = decode_publish(&publish(p.clone()))
        else {
            panic!("fast path not taken");
        };
        assert_eq!(
            (request, topic.as_str(), options.get("acknowledge")),
            (5, "com.a.t", Some(&Value::Bool(true)))
        );
        assert!(payload.raw.is_some() && payload.args.is_empty());
        assert_eq!(payload.materialized().as_ref(), &p);
        let event = Message::Event {
            subscription: 1,
            publication: 2,
            details: Dict::new(),
            payload,
        };
        let full = Message::Event {
            subscription: 1,
            publication: 2,
            details: Dict::new(),
            payload: p,
        };
        assert_eq!(
            Serializer::MsgPack.encode(&event),
            Serializer::MsgPack.encode(&full)
        );
        assert_eq!(
            Serializer::Json.encode(&event),
            Serializer::Json.encode(&full)
        );
    }

    #[test]
    fn malformed_or_unusual_arguments_fall_back_to_the_full_decoder() {
        let mut bytes = publish(Payload::args(vec![Value::Str("ok".into())]));
        let n = bytes.len();
        bytes[n - 2] = 0xff; // invalid UTF-8 inside the string
        assert!(decode_publish(&bytes).is_none());
        // …and the full decoder decides (it reads such a string as binary).
        assert_eq!(
            Serializer::MsgPack.decode_fast(&bytes),
            Serializer::MsgPack.decode(&bytes)
        );
        assert!(
            decode_publish(&Serializer::MsgPack.encode(&Message::Unregistered { request: 1 }))
                .is_none()
        );
        assert!(
            decode_publish(&[0x94, 0x10, 0x01, 0x80]).is_none(),
            "truncated"
        );
    }
}
