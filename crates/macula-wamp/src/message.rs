//! WAMP v2 messages: the typed form of the arrays on the wire, and conversion both ways.
//!
//! One file past 600 lines: the message types and their two conversions are one table (the
//! spec's message codes), read and checked together; splitting it by message would scatter it.

use std::borrow::Cow;

use crate::passthrough::RawPayload;
use crate::value::{Dict, List, Value};
use crate::ProtocolError;

/// A WAMP id (session, request, subscription, registration, publication): 1..=2^53.
pub type Id = u64;

/// The largest valid WAMP id (2^53).
pub const MAX_ID: Id = 1 << 53;

/// Positional and keyword arguments of a publication, call, yield, result, error or event.
///
/// A payload is either decoded (`args`, `kwargs`) or, on the router's pub/sub fast path, kept as
/// the publisher's validated MessagePack bytes (`raw`, with `args`/`kwargs` empty). Code that
/// reads the arguments of a payload it did not build itself calls [`Payload::materialized`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Payload {
    pub args: List,
    pub kwargs: Dict,
    /// Shared: an event built from a publication shares its bytes with every recipient.
    pub raw: Option<std::sync::Arc<RawPayload>>,
}

impl Payload {
    /// Roughly the memory the payload holds (its shared bytes, or its decoded values).
    pub fn approx_size(&self) -> usize {
        match &self.raw {
            Some(r) => r.bytes.len(),
            None => {
                self.args.iter().map(Value::approx_size).sum::<usize>()
                    + crate::value::dict_size(&self.kwargs)
            }
        }
    }

    pub fn new(args: List, kwargs: Dict) -> Self {
        Payload {
            args,
            kwargs,
            raw: None,
        }
    }
    pub fn args(args: List) -> Self {
        Payload::new(args, Dict::new())
    }
    pub fn is_empty(&self) -> bool {
        self.raw.is_none() && self.args.is_empty() && self.kwargs.is_empty()
    }

    /// The decoded payload: itself, or its raw bytes decoded.
    pub fn materialized(&self) -> Cow<'_, Payload> {
        match &self.raw {
            None => Cow::Borrowed(self),
            Some(raw) => Cow::Owned(raw.decode()),
        }
    }

    /// The payload as JSON: `{"args": [...], "kwargs": {...}}` (the HTTP bridge and CLI shape).
    pub fn to_json(&self) -> serde_json::Value {
        let p = self.materialized();
        let p = p.as_ref();
        serde_json::json!({
            "args": p.args.iter().map(serde_json::Value::from).collect::<Vec<_>>(),
            "kwargs": p.kwargs.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v))).collect::<serde_json::Map<_, _>>(),
        })
    }

    /// Builds a payload from JSON arguments and keyword arguments.
    pub fn from_json(
        args: Vec<serde_json::Value>,
        kwargs: serde_json::Map<String, serde_json::Value>,
    ) -> Payload {
        Payload::new(
            args.into_iter().map(Value::from).collect(),
            kwargs
                .into_iter()
                .map(|(k, v)| (k, Value::from(v)))
                .collect(),
        )
    }
}

/// Message type codes as the specification numbers them.
pub mod code {
    pub const HELLO: u64 = 1;
    pub const WELCOME: u64 = 2;
    pub const ABORT: u64 = 3;
    pub const CHALLENGE: u64 = 4;
    pub const AUTHENTICATE: u64 = 5;
    pub const GOODBYE: u64 = 6;
    pub const ERROR: u64 = 8;
    pub const PUBLISH: u64 = 16;
    pub const PUBLISHED: u64 = 17;
    pub const SUBSCRIBE: u64 = 32;
    pub const SUBSCRIBED: u64 = 33;
    pub const UNSUBSCRIBE: u64 = 34;
    pub const UNSUBSCRIBED: u64 = 35;
    pub const EVENT: u64 = 36;
    pub const CALL: u64 = 48;
    pub const CANCEL: u64 = 49;
    pub const RESULT: u64 = 50;
    pub const REGISTER: u64 = 64;
    pub const REGISTERED: u64 = 65;
    pub const UNREGISTER: u64 = 66;
    pub const UNREGISTERED: u64 = 67;
    pub const INVOCATION: u64 = 68;
    pub const INTERRUPT: u64 = 69;
    pub const YIELD: u64 = 70;
}

/// One WAMP message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello {
        realm: String,
        details: Dict,
    },
    Welcome {
        session: Id,
        details: Dict,
    },
    Abort {
        details: Dict,
        reason: String,
    },
    Challenge {
        method: String,
        extra: Dict,
    },
    Authenticate {
        signature: String,
        extra: Dict,
    },
    Goodbye {
        details: Dict,
        reason: String,
    },
    Error {
        request_type: u64,
        request: Id,
        details: Dict,
        error: String,
        payload: Payload,
    },
    Publish {
        request: Id,
        options: Dict,
        topic: String,
        payload: Payload,
    },
    Published {
        request: Id,
        publication: Id,
    },
    Subscribe {
        request: Id,
        options: Dict,
        topic: String,
    },
    Subscribed {
        request: Id,
        subscription: Id,
    },
    Unsubscribe {
        request: Id,
        subscription: Id,
    },
    Unsubscribed {
        request: Id,
    },
    Event {
        subscription: Id,
        publication: Id,
        details: Dict,
        payload: Payload,
    },
    Call {
        request: Id,
        options: Dict,
        procedure: String,
        payload: Payload,
    },
    Cancel {
        request: Id,
        options: Dict,
    },
    Result {
        request: Id,
        details: Dict,
        payload: Payload,
    },
    Register {
        request: Id,
        options: Dict,
        procedure: String,
    },
    Registered {
        request: Id,
        registration: Id,
    },
    Unregister {
        request: Id,
        registration: Id,
    },
    Unregistered {
        request: Id,
    },
    Invocation {
        request: Id,
        registration: Id,
        details: Dict,
        payload: Payload,
    },
    Interrupt {
        request: Id,
        options: Dict,
    },
    Yield {
        request: Id,
        options: Dict,
        payload: Payload,
    },
}

impl Message {
    /// The message type code.
    pub fn code(&self) -> u64 {
        use code::*;
        match self {
            Message::Hello { .. } => HELLO,
            Message::Welcome { .. } => WELCOME,
            Message::Abort { .. } => ABORT,
            Message::Challenge { .. } => CHALLENGE,
            Message::Authenticate { .. } => AUTHENTICATE,
            Message::Goodbye { .. } => GOODBYE,
            Message::Error { .. } => ERROR,
            Message::Publish { .. } => PUBLISH,
            Message::Published { .. } => PUBLISHED,
            Message::Subscribe { .. } => SUBSCRIBE,
            Message::Subscribed { .. } => SUBSCRIBED,
            Message::Unsubscribe { .. } => UNSUBSCRIBE,
            Message::Unsubscribed { .. } => UNSUBSCRIBED,
            Message::Event { .. } => EVENT,
            Message::Call { .. } => CALL,
            Message::Cancel { .. } => CANCEL,
            Message::Result { .. } => RESULT,
            Message::Register { .. } => REGISTER,
            Message::Registered { .. } => REGISTERED,
            Message::Unregister { .. } => UNREGISTER,
            Message::Unregistered { .. } => UNREGISTERED,
            Message::Invocation { .. } => INVOCATION,
            Message::Interrupt { .. } => INTERRUPT,
            Message::Yield { .. } => YIELD,
        }
    }

    /// Roughly the memory the message holds, in bytes: its payload, its options or details,
    /// its URI, and a fixed amount for the rest.
    pub fn approx_size(&self) -> usize {
        use crate::value::dict_size;
        64 + match self {
            Message::Event {
                details, payload, ..
            }
            | Message::Result {
                details, payload, ..
            }
            | Message::Invocation {
                details, payload, ..
            } => dict_size(details) + payload.approx_size(),
            Message::Error {
                details,
                error,
                payload,
                ..
            } => dict_size(details) + error.len() + payload.approx_size(),
            Message::Publish {
                options,
                topic: uri,
                payload,
                ..
            }
            | Message::Call {
                options,
                procedure: uri,
                payload,
                ..
            } => dict_size(options) + uri.len() + payload.approx_size(),
            Message::Yield {
                options, payload, ..
            } => dict_size(options) + payload.approx_size(),
            Message::Hello { details, realm } => dict_size(details) + realm.len(),
            Message::Welcome { details, .. } | Message::Challenge { extra: details, .. } => {
                dict_size(details)
            }
            Message::Abort { details, reason } | Message::Goodbye { details, reason } => {
                dict_size(details) + reason.len()
            }
            Message::Authenticate { signature, extra } => signature.len() + dict_size(extra),
            Message::Subscribe { options, topic, .. } => dict_size(options) + topic.len(),
            Message::Register {
                options, procedure, ..
            } => dict_size(options) + procedure.len(),
            Message::Cancel { options, .. } | Message::Interrupt { options, .. } => {
                dict_size(options)
            }
            Message::Published { .. }
            | Message::Subscribed { .. }
            | Message::Unsubscribe { .. }
            | Message::Unsubscribed { .. }
            | Message::Registered { .. }
            | Message::Unregister { .. }
            | Message::Unregistered { .. } => 0,
        }
    }

    /// A short lowercase name of the message type, used in metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        kind_name(self.code())
    }

    /// Parses the array form of a message, checking every field's type.
    pub fn from_value(v: Value) -> Result<Message, ProtocolError> {
        let Value::List(items) = v else {
            return Err(ProtocolError::NotAnArray);
        };
        let mut f = Fields {
            items: items.into_iter(),
            pos: 0,
        };
        let code = f.id("message type")?;
        let kind = kind_name(code);
        let parsed = (|| -> Result<Message, ProtocolError> {
            Ok(match code {
                code::HELLO => Message::Hello {
                    realm: f.string("Realm")?,
                    details: f.dict("Details")?,
                },
                code::WELCOME => Message::Welcome {
                    session: f.id("Session")?,
                    details: f.dict("Details")?,
                },
                code::ABORT => Message::Abort {
                    details: f.dict("Details")?,
                    reason: f.string("Reason")?,
                },
                code::CHALLENGE => Message::Challenge {
                    method: f.string("AuthMethod")?,
                    extra: f.dict("Extra")?,
                },
                code::AUTHENTICATE => Message::Authenticate {
                    signature: f.string("Signature")?,
                    extra: f.dict_or_empty("Extra")?,
                },
                code::GOODBYE => Message::Goodbye {
                    details: f.dict("Details")?,
                    reason: f.string("Reason")?,
                },
                code::ERROR => Message::Error {
                    request_type: f.id("REQUEST.Type")?,
                    request: f.id("Request")?,
                    details: f.dict("Details")?,
                    error: f.string("Error")?,
                    payload: f.payload()?,
                },
                code::PUBLISH => Message::Publish {
                    request: f.id("Request")?,
                    options: f.dict("Options")?,
                    topic: f.string("Topic")?,
                    payload: f.payload()?,
                },
                code::PUBLISHED => Message::Published {
                    request: f.id("Request")?,
                    publication: f.id("Publication")?,
                },
                code::SUBSCRIBE => Message::Subscribe {
                    request: f.id("Request")?,
                    options: f.dict("Options")?,
                    topic: f.string("Topic")?,
                },
                code::SUBSCRIBED => Message::Subscribed {
                    request: f.id("Request")?,
                    subscription: f.id("Subscription")?,
                },
                code::UNSUBSCRIBE => Message::Unsubscribe {
                    request: f.id("Request")?,
                    subscription: f.id("Subscription")?,
                },
                code::UNSUBSCRIBED => {
                    let request = f.id("Request")?;
                    // An optional Details dict may follow (subscription revocation).
                    let _ = f.dict_or_empty("Details")?;
                    Message::Unsubscribed { request }
                }
                code::EVENT => Message::Event {
                    subscription: f.id("Subscription")?,
                    publication: f.id("Publication")?,
                    details: f.dict("Details")?,
                    payload: f.payload()?,
                },
                code::CALL => Message::Call {
                    request: f.id("Request")?,
                    options: f.dict("Options")?,
                    procedure: f.string("Procedure")?,
                    payload: f.payload()?,
                },
                code::CANCEL => Message::Cancel {
                    request: f.id("Request")?,
                    options: f.dict_or_empty("Options")?,
                },
                code::RESULT => Message::Result {
                    request: f.id("Request")?,
                    details: f.dict("Details")?,
                    payload: f.payload()?,
                },
                code::REGISTER => Message::Register {
                    request: f.id("Request")?,
                    options: f.dict("Options")?,
                    procedure: f.string("Procedure")?,
                },
                code::REGISTERED => Message::Registered {
                    request: f.id("Request")?,
                    registration: f.id("Registration")?,
                },
                code::UNREGISTER => Message::Unregister {
                    request: f.id("Request")?,
                    registration: f.id("Registration")?,
                },
                code::UNREGISTERED => {
                    let request = f.id("Request")?;
                    let _ = f.dict_or_empty("Details")?;
                    Message::Unregistered { request }
                }
                code::INVOCATION => Message::Invocation {
                    request: f.id("Request")?,
                    registration: f.id("Registration")?,
                    details: f.dict("Details")?,
                    payload: f.payload()?,
                },
                code::INTERRUPT => Message::Interrupt {
                    request: f.id("Request")?,
                    options: f.dict_or_empty("Options")?,
                },
                code::YIELD => Message::Yield {
                    request: f.id("Request")?,
                    options: f.dict("Options")?,
                    payload: f.payload()?,
                },
                other => return Err(ProtocolError::UnknownType(other)),
            })
        })();
        let m = parsed.map_err(|e| e.in_message(kind))?;
        if f.items.len() > 0 {
            return Err(ProtocolError::Field {
                kind,
                field: "(end)",
                problem: "unexpected extra elements".into(),
            });
        }
        Ok(m)
    }
}

/// The lowercase name of a message type code ("publish", "event", ...).
pub fn kind_name(code: u64) -> &'static str {
    match code {
        code::HELLO => "hello",
        code::WELCOME => "welcome",
        code::ABORT => "abort",
        code::CHALLENGE => "challenge",
        code::AUTHENTICATE => "authenticate",
        code::GOODBYE => "goodbye",
        code::ERROR => "error",
        code::PUBLISH => "publish",
        code::PUBLISHED => "published",
        code::SUBSCRIBE => "subscribe",
        code::SUBSCRIBED => "subscribed",
        code::UNSUBSCRIBE => "unsubscribe",
        code::UNSUBSCRIBED => "unsubscribed",
        code::EVENT => "event",
        code::CALL => "call",
        code::CANCEL => "cancel",
        code::RESULT => "result",
        code::REGISTER => "register",
        code::REGISTERED => "registered",
        code::UNREGISTER => "unregister",
        code::UNREGISTERED => "unregistered",
        code::INVOCATION => "invocation",
        code::INTERRUPT => "interrupt",
        code::YIELD => "yield",
        _ => "unknown",
    }
}

struct Fields {
    items: std::vec::IntoIter<Value>,
    pos: usize,
}

impl Fields {
    fn next(&mut self, field: &'static str) -> Result<Value, ProtocolError> {
        self.pos += 1;
        self.items
            .next()
            .ok_or(ProtocolError::Missing { field, kind: "" })
    }
    fn bad(field: &'static str, problem: &str) -> ProtocolError {
        ProtocolError::Field {
            kind: "",
            field,
            problem: problem.into(),
        }
    }
    fn id(&mut self, field: &'static str) -> Result<Id, ProtocolError> {
        match self.next(field)?.as_u64() {
            Some(i) if i <= MAX_ID => Ok(i),
            Some(_) => Err(Self::bad(field, "id above 2^53")),
            None => Err(Self::bad(field, "expected a non-negative integer")),
        }
    }
    fn string(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        match self.next(field)? {
            Value::Str(s) => Ok(s),
            _ => Err(Self::bad(field, "expected a string")),
        }
    }
    fn dict(&mut self, field: &'static str) -> Result<Dict, ProtocolError> {
        match self.next(field)? {
            Value::Dict(d) => Ok(d),
            _ => Err(Self::bad(field, "expected a dictionary")),
        }
    }
    fn dict_or_empty(&mut self, field: &'static str) -> Result<Dict, ProtocolError> {
        if self.items.len() == 0 {
            return Ok(Dict::new());
        }
        self.dict(field)
    }
    fn payload(&mut self) -> Result<Payload, ProtocolError> {
        let args = match self.items.next() {
            None => return Ok(Payload::default()),
            Some(Value::List(l)) => l,
            Some(_) => return Err(Self::bad("Arguments", "expected a list")),
        };
        let kwargs = match self.items.next() {
            None => Dict::new(),
            Some(Value::Dict(d)) => d,
            Some(_) => return Err(Self::bad("ArgumentsKw", "expected a dictionary")),
        };
        Ok(Payload::new(args, kwargs))
    }
}

/// One element of a message array, borrowed from the message, for serializing without copies.
pub(crate) enum El<'a> {
    Id(Id),
    Str(&'a str),
    Dict(&'a Dict),
    List(&'a List),
}

impl serde::Serialize for El<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            El::Id(i) => s.serialize_u64(*i),
            El::Str(x) => s.serialize_str(x),
            El::Dict(d) => d.serialize(s),
            El::List(l) => l.serialize(s),
        }
    }
}

impl Message {
    /// The elements before the payload, and the payload if this type carries one.
    pub(crate) fn parts(&self) -> ([Option<El<'_>>; 6], Option<&Payload>) {
        use El::*;
        let c = Id(self.code());
        match self {
            Message::Hello { realm, details } => (
                [
                    Some(c),
                    Some(Str(realm)),
                    Some(Dict(details)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Welcome { session, details } => (
                [
                    Some(c),
                    Some(Id(*session)),
                    Some(Dict(details)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Abort { details, reason } => (
                [
                    Some(c),
                    Some(Dict(details)),
                    Some(Str(reason)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Challenge { method, extra } => (
                [
                    Some(c),
                    Some(Str(method)),
                    Some(Dict(extra)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Authenticate { signature, extra } => (
                [
                    Some(c),
                    Some(Str(signature)),
                    Some(Dict(extra)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Goodbye { details, reason } => (
                [
                    Some(c),
                    Some(Dict(details)),
                    Some(Str(reason)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Error {
                request_type,
                request,
                details,
                error,
                payload,
            } => (
                [
                    Some(c),
                    Some(Id(*request_type)),
                    Some(Id(*request)),
                    Some(Dict(details)),
                    Some(Str(error)),
                    None,
                ],
                Some(payload),
            ),
            Message::Publish {
                request,
                options,
                topic,
                payload,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Dict(options)),
                    Some(Str(topic)),
                    None,
                    None,
                ],
                Some(payload),
            ),
            Message::Published {
                request,
                publication,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Id(*publication)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Subscribe {
                request,
                options,
                topic,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Dict(options)),
                    Some(Str(topic)),
                    None,
                    None,
                ],
                None,
            ),
            Message::Subscribed {
                request,
                subscription,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Id(*subscription)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Unsubscribe {
                request,
                subscription,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Id(*subscription)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Unsubscribed { request } => {
                ([Some(c), Some(Id(*request)), None, None, None, None], None)
            }
            Message::Event {
                subscription,
                publication,
                details,
                payload,
            } => (
                [
                    Some(c),
                    Some(Id(*subscription)),
                    Some(Id(*publication)),
                    Some(Dict(details)),
                    None,
                    None,
                ],
                Some(payload),
            ),
            Message::Call {
                request,
                options,
                procedure,
                payload,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Dict(options)),
                    Some(Str(procedure)),
                    None,
                    None,
                ],
                Some(payload),
            ),
            Message::Cancel { request, options } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Dict(options)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Result {
                request,
                details,
                payload,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Dict(details)),
                    None,
                    None,
                    None,
                ],
                Some(payload),
            ),
            Message::Register {
                request,
                options,
                procedure,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Dict(options)),
                    Some(Str(procedure)),
                    None,
                    None,
                ],
                None,
            ),
            Message::Registered {
                request,
                registration,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Id(*registration)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Unregister {
                request,
                registration,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Id(*registration)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Unregistered { request } => {
                ([Some(c), Some(Id(*request)), None, None, None, None], None)
            }
            Message::Invocation {
                request,
                registration,
                details,
                payload,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Id(*registration)),
                    Some(Dict(details)),
                    None,
                    None,
                ],
                Some(payload),
            ),
            Message::Interrupt { request, options } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Dict(options)),
                    None,
                    None,
                    None,
                ],
                None,
            ),
            Message::Yield {
                request,
                options,
                payload,
            } => (
                [
                    Some(c),
                    Some(Id(*request)),
                    Some(Dict(options)),
                    None,
                    None,
                    None,
                ],
                Some(payload),
            ),
        }
    }
}

impl serde::Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        use El::*;
        let (head, payload) = self.parts();
        // A raw payload is spliced by `Serializer::encode_into` when the serializer matches;
        // here (any other serializer) it is decoded first.
        let payload = payload.map(Payload::materialized);
        let payload = payload.as_deref();
        let n_head = head.iter().filter(|e| e.is_some()).count();
        let (with_args, with_kw) = match payload {
            Some(p) if !p.kwargs.is_empty() => (true, true),
            Some(p) if !p.args.is_empty() => (true, false),
            _ => (false, false),
        };
        let mut seq = s.serialize_seq(Some(n_head + with_args as usize + with_kw as usize))?;
        for e in head.iter().flatten() {
            seq.serialize_element(e)?;
        }
        if let Some(p) = payload {
            if with_args {
                seq.serialize_element(&List(&p.args))?;
            }
            if with_kw {
                seq.serialize_element(&Dict(&p.kwargs))?;
            }
        }
        seq.end()
    }
}
