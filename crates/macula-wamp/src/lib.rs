//! # macula-wamp
//!
//! The WAMP v2 wire protocol as data: message types ([`Message`]), the dynamic [`Value`] they carry,
//! the serializers ([`Serializer`]: JSON, MessagePack, CBOR), URI and realm-name rules ([`uri`]), and
//! RawSocket framing ([`rawsocket`]).
//!
//! This crate owns the bytes ⇄ messages boundary and nothing else. It must never do I/O, allocate
//! without bound on hostile input, or panic on any input: every decoder returns a [`ProtocolError`]
//! instead (the property tests and fuzz targets check this).

pub mod errors;
mod message;
pub mod passthrough;
pub mod rawsocket;
mod serializer;
pub mod uri;
mod value;

pub use message::{code, kind_name, Id, Message, Payload, MAX_ID};
pub use serializer::Serializer;
pub use value::{Dict, List, Value, MAX_DEPTH};

/// Why bytes could not be turned into a [`Message`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("could not decode {serializer}: {detail}")]
    Decode {
        serializer: &'static str,
        detail: String,
    },
    #[error("a WAMP message must be a non-empty array")]
    NotAnArray,
    #[error("unknown message type {0}")]
    UnknownType(u64),
    #[error("{kind}: missing field {field}")]
    Missing {
        field: &'static str,
        kind: &'static str,
    },
    #[error("{kind}: field {field}: {problem}")]
    Field {
        kind: &'static str,
        field: &'static str,
        problem: String,
    },
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl ProtocolError {
    fn in_message(self, kind: &'static str) -> Self {
        match self {
            ProtocolError::Missing { field, .. } => ProtocolError::Missing { field, kind },
            ProtocolError::Field { field, problem, .. } => ProtocolError::Field {
                kind,
                field,
                problem,
            },
            other => other,
        }
    }
}
