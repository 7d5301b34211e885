//! A realm: its sessions, broker and dealer, and the handling of every message a joined session
//! sends. Sans-IO: messages come in through [`Realm::handle`], go out through each session's [`Peer`].
//!
//! One file per concept: this one holds the realm's state, sessions joining and leaving, and the
//! dispatch of each message; [`pubsub`], [`rpc`] and [`meta`] handle the messages of their part
//! of WAMP; [`links`] is the mesh's side (other nodes as link members); [`announce`] is what this
//! node tells other nodes its sessions hold.

mod announce;
mod links;
mod meta;
mod pubsub;
mod rpc;

pub use announce::{Announce, Announcer, Holder};
pub use links::{LinkError, Origin};
use meta::session_details;
use pubsub::Filter;

use std::sync::Arc;
use std::time::{Duration, Instant};

use macula_wamp::uri::{self, MatchPolicy};
use macula_wamp::{code, dict, errors, Dict, Id, List, Message, Payload, Value, MAX_ID};

use crate::broker::Broker;
use crate::dealer::{CancelMode, Dealer, InvokePolicy, PendingCall, RegisterError};
use crate::ids::IdMap;
use crate::policy::{Action, Policy};

/// Where a session's outgoing messages go (a bounded queue in the node, a `Vec` in tests).
pub trait Peer: Send + Sync {
    fn send(&self, msg: Arc<Message>);
    /// For link members (another node's end of the mesh): a publication or call to forward with
    /// its origin. Sessions never receive these.
    fn forward(&self, _f: Forwarded<'_>) {}
}

impl<T: Peer + ?Sized> Peer for Arc<T> {
    fn send(&self, msg: Arc<Message>) {
        (**self).send(msg)
    }
    fn forward(&self, f: Forwarded<'_>) {
        (**self).forward(f)
    }
}

/// What a link member forwards to its node.
#[derive(Debug)]
pub enum Forwarded<'a> {
    /// A publication of a local session; the remote node delivers it to its own subscribers.
    Publication {
        publication: Id,
        topic: &'a str,
        options: &'a Dict,
        payload: &'a Payload,
        origin: &'a SessionInfo,
    },
    /// A call routed to a callee on the remote node. `invocation` identifies it in replies.
    Call {
        invocation: Id,
        procedure: &'a str,
        options: Dict,
        payload: Payload,
        origin: &'a SessionInfo,
    },
}

/// What the realm knows about a joined session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: Id,
    /// The key id the session authenticated with (`authid`).
    pub authid: String,
    pub authrole: String,
    pub authmethod: &'static str,
    /// Transport description for `wamp.session.get` (type, peer address, serializer).
    pub transport: Dict,
    /// The callee announced `call_canceling`, so it may receive INTERRUPT.
    pub callee_cancel: bool,
    /// A link member: another node's end of the mesh, not a client session. Links are invisible
    /// to the session meta API and to policy checks on sessions.
    pub link: bool,
    /// The proof of the session's role, sent to the nodes its traffic is forwarded to so they
    /// can verify it (`None`: a key that cannot prove one, or a link).
    pub proof: Option<Arc<crate::auth::SessionProof>>,
}

/// Limits that apply inside a realm.
#[derive(Debug, Clone)]
pub struct RealmConfig {
    /// Applied to calls that set no `timeout` option; `None` lets calls wait forever.
    pub default_call_timeout: Option<Duration>,
    /// Subscriptions one session may hold (every publish scans pattern subscriptions).
    pub max_subscriptions_per_session: usize,
    /// Registrations one session may hold.
    pub max_registrations_per_session: usize,
    /// Calls one session may have in flight (waiting for their answer); more get
    /// `macula.error.limit_exceeded`. Each holds router memory until answered or timed out.
    pub max_calls_per_session: usize,
}

impl Default for RealmConfig {
    fn default() -> Self {
        RealmConfig {
            default_call_timeout: Some(Duration::from_secs(60)),
            max_subscriptions_per_session: 10_000,
            max_registrations_per_session: 10_000,
            max_calls_per_session: 1_000,
        }
    }
}

struct Member<P> {
    info: Arc<SessionInfo>,
    peer: P,
    subscriptions: Vec<Id>,
    registrations: Vec<Id>,
}

/// Random WAMP ids in 1..=2^53 (xorshift64*, seeded per realm).
struct IdGen(u64);

impl IdGen {
    fn next(&mut self) -> Id {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % MAX_ID) + 1
    }
}

/// What a realm past its quota answers to an operation: an ERROR, or (for a publication that
/// asked for no acknowledgement, which cannot be answered) the session's GOODBYE. `None` for
/// messages that are not billed operations (answers, unsubscriptions, GOODBYE).
fn quota_refusal(msg: &Message, why: &str) -> Option<Result<Message, Message>> {
    let (kind, request) = match msg {
        Message::Publish {
            request, options, ..
        } => {
            if !options
                .get("acknowledge")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                return Some(Err(crate::auth::goodbye(errors::QUOTA_EXCEEDED, why)));
            }
            (code::PUBLISH, *request)
        }
        Message::Subscribe { request, .. } => (code::SUBSCRIBE, *request),
        Message::Call { request, .. } => (code::CALL, *request),
        Message::Register { request, .. } => (code::REGISTER, *request),
        _ => return None,
    };
    Some(Ok(error(kind, request, errors::QUOTA_EXCEEDED, why)))
}

/// Builds an ERROR reply whose first argument is a human message.
pub fn error(request_type: u64, request: Id, uri: &str, message: impl Into<String>) -> Message {
    Message::Error {
        request_type,
        request,
        details: Dict::new(),
        error: uri.into(),
        payload: Payload::args(vec![Value::Str(message.into())]),
    }
}

/// One realm's routing state.
pub struct Realm<P: Peer> {
    name: String,
    policy: Arc<Policy>,
    config: RealmConfig,
    sessions: IdMap<Member<P>>,
    broker: Broker,
    dealer: Dealer,
    ids: IdGen,
    announcer: Option<Announcer>,
    links: usize,
}

/// Features announced in WELCOME.
fn router_roles() -> Dict {
    let broker = dict! {
        "publisher_identification" => true,
        "publisher_exclusion" => true,
        "subscriber_blackwhite_listing" => true,
        "pattern_based_subscription" => true,
        "session_meta_api" => true,
    };
    let dealer = dict! {
        "caller_identification" => true,
        "call_timeout" => true,
        "call_canceling" => true,
        "progressive_call_results" => true,
        "pattern_based_registration" => true,
        "shared_registration" => true,
        "session_meta_api" => true,
    };
    dict! {
        "broker" => dict!{"features" => broker},
        "dealer" => dict!{"features" => dealer},
    }
}

fn opt_bool(d: &Dict, k: &str) -> Option<bool> {
    d.get(k).and_then(Value::as_bool)
}

fn id_list(d: &Dict, k: &str) -> Option<Vec<Id>> {
    d.get(k)
        .and_then(Value::as_list)
        .map(|l| l.iter().filter_map(Value::as_u64).collect())
}

fn str_list(d: &Dict, k: &str) -> Option<Vec<String>> {
    d.get(k).and_then(Value::as_list).map(|l| {
        l.iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    })
}

impl<P: Peer> Realm<P> {
    pub fn new(name: &str, policy: Arc<Policy>, config: RealmConfig, seed: u64) -> Self {
        Realm {
            name: name.to_owned(),
            policy,
            config,
            sessions: IdMap::default(),
            broker: Broker::default(),
            dealer: Dealer::default(),
            ids: IdGen(seed | 1),
            announcer: None,
            links: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Replaces the policy; later operations are checked against the new one.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    /// Client sessions (links not counted).
    pub fn session_count(&self) -> usize {
        self.sessions.len() - self.links
    }

    /// Link members (one per peer node with interest or registrations here).
    pub fn link_count(&self) -> usize {
        self.links
    }

    /// Ids of the client sessions for which `f` holds.
    pub fn sessions_where(&self, f: impl Fn(&SessionInfo) -> bool) -> Vec<Id> {
        self.sessions
            .values()
            .filter(|m| !m.info.link && f(&m.info))
            .map(|m| m.info.id)
            .collect()
    }

    /// A fresh random id (session ids are drawn here so they are unique within the realm).
    pub fn new_session_id(&mut self) -> Id {
        loop {
            let id = self.ids.next();
            if !self.sessions.contains_key(&id) {
                return id;
            }
        }
    }

    /// Counts of subscriptions, registrations and calls in flight (for metrics).
    pub fn stats(&self) -> (usize, usize, usize) {
        (
            self.broker.len(),
            self.dealer.len(),
            self.dealer.calls_in_flight(),
        )
    }

    /// Adds an authenticated session and returns the WELCOME to send it.
    pub fn join(&mut self, info: SessionInfo, peer: P) -> Message {
        let id = info.id;
        let details = dict! {
            "realm" => self.name.as_str(),
            "authid" => info.authid.as_str(),
            "authrole" => info.authrole.as_str(),
            "authmethod" => info.authmethod,
            "authprovider" => "macula",
            "roles" => router_roles(),
        };
        let link = info.link;
        let info = Arc::new(info);
        let meta = session_details(&info);
        self.sessions.insert(
            id,
            Member {
                info,
                peer,
                subscriptions: vec![],
                registrations: vec![],
            },
        );
        if link {
            self.links += 1;
        } else {
            self.publish_meta("wamp.session.on_join", vec![Value::Dict(meta)]);
        }
        Message::Welcome {
            session: id,
            details,
        }
    }

    /// Removes a session: its subscriptions and registrations go, calls it made are interrupted,
    /// calls made to it fail with `wamp.error.canceled`.
    pub fn leave(&mut self, id: Id) {
        let Some(m) = self.sessions.get(&id) else {
            return;
        };
        let (subs, regs, link) = (
            m.subscriptions.clone(),
            m.registrations.clone(),
            m.info.link,
        );
        for s in subs {
            self.drop_subscription(id, s);
        }
        for r in regs {
            self.drop_registration(id, r);
        }
        let Some(m) = self.sessions.remove(&id) else {
            return;
        };
        let why = if link {
            "the callee's node left the mesh before answering; retry the call"
        } else {
            "the callee left before answering; retry the call"
        };
        for inv in self.dealer.calls_involving(id) {
            let Some(c) = self.dealer.finish(inv) else {
                continue;
            };
            if c.callee == id {
                self.send(
                    c.caller,
                    error(code::CALL, c.caller_request, errors::CANCELED, why),
                );
            } else {
                self.interrupt(c.callee, inv);
            }
        }
        if link {
            self.links -= 1;
            return;
        }
        self.publish_meta(
            "wamp.session.on_leave",
            vec![
                Value::from(id),
                Value::Str(m.info.authid.clone()),
                Value::Str(m.info.authrole.clone()),
            ],
        );
    }

    /// Handles one message from joined session `from`. `Err` carries a GOODBYE or ABORT to send
    /// before closing the session (the caller then calls [`Realm::leave`]).
    pub fn handle(&mut self, from: Id, msg: Message, now: Instant) -> Result<(), Message> {
        if !self.sessions.contains_key(&from) {
            return Err(crate::auth::abort(
                errors::NO_SUCH_SESSION,
                "session is not joined",
            ));
        }
        if let Some(why) = &self.policy.doc.quota_exceeded {
            if let Some(refusal) = quota_refusal(&msg, why) {
                return match refusal {
                    Ok(err) => {
                        self.send(from, err);
                        Ok(())
                    }
                    Err(bye) => Err(bye),
                };
            }
        }
        match msg {
            Message::Publish {
                request,
                options,
                topic,
                payload,
            } => {
                self.on_publish(from, request, options, topic, payload);
                Ok(())
            }
            Message::Subscribe {
                request,
                options,
                topic,
            } => {
                self.on_subscribe(from, request, options, topic);
                Ok(())
            }
            Message::Unsubscribe {
                request,
                subscription,
            } => {
                match self.drop_subscription(from, subscription) {
                    Some(()) => {
                        self.send(from, Message::Unsubscribed { request });
                    }
                    None => self.send(
                        from,
                        error(
                            code::UNSUBSCRIBE,
                            request,
                            errors::NO_SUCH_SUBSCRIPTION,
                            format!("no subscription {subscription} for this session"),
                        ),
                    ),
                }
                Ok(())
            }
            Message::Register {
                request,
                options,
                procedure,
            } => {
                self.on_register(from, request, options, procedure);
                Ok(())
            }
            Message::Unregister {
                request,
                registration,
            } => {
                match self.drop_registration(from, registration) {
                    Some(()) => {
                        self.send(from, Message::Unregistered { request });
                    }
                    None => self.send(
                        from,
                        error(
                            code::UNREGISTER,
                            request,
                            errors::NO_SUCH_REGISTRATION,
                            format!("no registration {registration} for this session"),
                        ),
                    ),
                }
                Ok(())
            }
            Message::Call {
                request,
                options,
                procedure,
                payload,
            } => {
                self.on_call(from, request, options, procedure, payload, now);
                Ok(())
            }
            Message::Cancel { request, options } => {
                self.on_cancel(from, request, options);
                Ok(())
            }
            Message::Yield {
                request,
                options,
                payload,
            } => self.on_yield(from, request, options, payload),
            Message::Error {
                request_type: code::INVOCATION,
                request,
                details,
                error: uri,
                payload,
            } => self.on_invocation_error(from, request, details, uri, payload),
            Message::Goodbye { .. } => Err(Message::Goodbye {
                details: Dict::new(),
                reason: errors::GOODBYE_AND_OUT.into(),
            }),
            other => Err(crate::auth::abort(
                errors::PROTOCOL_VIOLATION,
                format!(
                    "a client may not send {} on an established session",
                    other.kind().to_uppercase()
                ),
            )),
        }
    }

    /// Expires calls whose timeout has passed: the caller gets `wamp.error.canceled`, the callee
    /// an INTERRUPT.
    /// Whether [`Realm::tick`] has anything to do now or later (calls with deadlines). A host
    /// ticks only the realms for which this is true.
    pub fn has_deadlines(&mut self) -> bool {
        self.dealer.has_deadlines()
    }

    pub fn tick(&mut self, now: Instant) {
        for (inv, c) in self.dealer.expired(now) {
            self.send(
                c.caller,
                error(
                    code::CALL,
                    c.caller_request,
                    errors::CANCELED,
                    "the call timed out",
                ),
            );
            self.interrupt(c.callee, inv);
        }
    }

    fn send(&self, to: Id, msg: Message) {
        if let Some(m) = self.sessions.get(&to) {
            m.peer.send(Arc::new(msg));
        }
    }

    fn interrupt(&self, callee: Id, inv: Id) {
        if let Some(m) = self.sessions.get(&callee) {
            if m.info.callee_cancel {
                m.peer.send(Arc::new(Message::Interrupt {
                    request: inv,
                    options: dict! {"mode" => "killnowait"},
                }));
            }
        }
    }

    fn denied(&self, role: &str, action: Action, uri: &str) -> String {
        format!(
            "not authorized: role {role:?} in realm {} lacks permission {}",
            self.name,
            action.permission_for(uri)
        )
    }

    fn is_link(&self, id: Id) -> bool {
        self.sessions.get(&id).is_some_and(|m| m.info.link)
    }
}
