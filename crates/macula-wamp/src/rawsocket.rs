//! RawSocket framing (WAMP over TCP), sans-IO.
//!
//! The client opens with 4 bytes: `0x7F`, then `LLLL SSSS` (max message length exponent and
//! serializer id), then two zero bytes. The router answers with the same shape (its own length
//! limit) or with an error code in the high nibble. Every message is then a 4-byte header —
//! frame type (0 message, 1 ping, 2 pong) and 24-bit big-endian length — followed by the payload.

use crate::Serializer;

pub const MAGIC: u8 = 0x7F;
/// Header size of every frame.
pub const HEADER_LEN: usize = 4;

/// Errors a router may answer a handshake with (high nibble of the second byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    SerializerUnsupported = 1,
    MaxLengthUnacceptable = 2,
    ReservedBitsUsed = 3,
    MaxConnectionCountReached = 4,
}

/// A client's opening handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// The largest message the sender accepts, in bytes (2^(9+exponent)).
    pub max_len: usize,
    pub serializer_id: u8,
}

impl Handshake {
    /// Parses the client's 4 handshake bytes. `Err(None)` means "not RawSocket at all" (wrong magic):
    /// close without answering. `Err(Some(e))` means answer with that error.
    pub fn parse(b: [u8; 4]) -> Result<Handshake, Option<HandshakeError>> {
        if b[0] != MAGIC {
            return Err(None);
        }
        if b[2] != 0 || b[3] != 0 {
            return Err(Some(HandshakeError::ReservedBitsUsed));
        }
        let exp = (b[1] >> 4) as u32;
        Ok(Handshake {
            max_len: 1usize << (9 + exp),
            serializer_id: b[1] & 0x0F,
        })
    }

    /// Encodes a handshake with the largest length exponent not above `max_len`.
    pub fn encode(max_len: usize, serializer: Serializer) -> [u8; 4] {
        [
            MAGIC,
            (length_exponent(max_len) << 4) | serializer.rawsocket_id(),
            0,
            0,
        ]
    }

    /// Encodes a handshake error reply.
    pub fn encode_error(e: HandshakeError) -> [u8; 4] {
        [MAGIC, (e as u8) << 4, 0, 0]
    }

    /// Parses a router's reply to our handshake: the router's max length, or its error.
    pub fn parse_reply(b: [u8; 4]) -> Result<Handshake, String> {
        if b[0] != MAGIC {
            return Err("the server did not answer with a RawSocket handshake".into());
        }
        if b[1] & 0x0F == 0 {
            let code = b[1] >> 4;
            let what = match code {
                1 => "serializer unsupported",
                2 => "maximum message length unacceptable",
                3 => "use of reserved bits",
                4 => "maximum connection count reached",
                _ => "unknown error",
            };
            return Err(format!(
                "the router refused the RawSocket handshake: {what}"
            ));
        }
        Handshake::parse(b).map_err(|_| "malformed RawSocket handshake reply".to_string())
    }
}

/// The exponent `e` (0..=15) such that 2^(9+e) is the largest power of two ≤ `max_len` (at least 512).
pub fn length_exponent(max_len: usize) -> u8 {
    let mut e = 0u8;
    while e < 15 && (1usize << (9 + e + 1)) <= max_len {
        e += 1;
    }
    e
}

/// The kind of a RawSocket frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Message,
    Ping,
    Pong,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub len: usize,
}

impl FrameHeader {
    /// Parses a header; an unknown frame type is an error (the connection must be dropped).
    pub fn parse(b: [u8; 4]) -> Result<FrameHeader, String> {
        let kind = match b[0] & 0x07 {
            0 => FrameKind::Message,
            1 => FrameKind::Ping,
            2 => FrameKind::Pong,
            t => return Err(format!("unknown RawSocket frame type {t}")),
        };
        if b[0] & 0xF8 != 0 {
            return Err("reserved bits set in RawSocket frame header".into());
        }
        let len = ((b[1] as usize) << 16) | ((b[2] as usize) << 8) | b[3] as usize;
        Ok(FrameHeader { kind, len })
    }

    /// Encodes a header. `len` must be below 2^24 (callers enforce their max length first).
    pub fn encode(kind: FrameKind, len: usize) -> [u8; 4] {
        let t = match kind {
            FrameKind::Message => 0,
            FrameKind::Ping => 1,
            FrameKind::Pong => 2,
        };
        [t, (len >> 16) as u8, (len >> 8) as u8, len as u8]
    }
}

/// Largest payload a RawSocket frame can carry (24-bit length).
pub const MAX_FRAME_LEN: usize = (1 << 24) - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_round_trips_and_rejects_reserved_bits() {
        let h = Handshake::encode(16 * 1024 * 1024, Serializer::MsgPack);
        assert_eq!(h, [0x7F, 0xF2, 0, 0]);
        let p = Handshake::parse(h).unwrap();
        assert_eq!(p.max_len, 1 << 24);
        assert_eq!(p.serializer_id, 2);
        assert_eq!(
            Handshake::parse([0x7F, 0x12, 1, 0]),
            Err(Some(HandshakeError::ReservedBitsUsed))
        );
        assert_eq!(Handshake::parse([0x47, 0x45, 0x54, 0x20]), Err(None));
        assert!(Handshake::parse_reply(Handshake::encode_error(
            HandshakeError::SerializerUnsupported
        ))
        .is_err());
    }

    #[test]
    fn frame_headers_carry_24_bit_lengths() {
        let h = FrameHeader::encode(FrameKind::Message, 0x01_02_03);
        assert_eq!(
            FrameHeader::parse(h).unwrap(),
            FrameHeader {
                kind: FrameKind::Message,
                len: 0x010203
            }
        );
        assert!(FrameHeader::parse([7, 0, 0, 0]).is_err());
        assert_eq!(length_exponent(1 << 20), 11);
        assert_eq!(length_exponent(100), 0);
    }
}
