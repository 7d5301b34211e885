//! A realm: its sessions, broker and dealer, and the handling of every message a joined session
//! sends. Sans-IO: messages come in through [`Realm::handle`], go out through each session's [`Peer`].

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

/// A change in what this node's own sessions subscribe to or register, for the mesh to announce.
/// `by` names the session that holds it (the first of the node's sessions that do), so that the
/// receiving node can check that session's role; `None`: no session of this node holds it any
/// more. When the session named leaves and others still hold it, it is announced again, naming
/// one of them.
#[derive(Debug, Clone, PartialEq)]
pub enum Announce {
    Interest {
        uri: String,
        policy: MatchPolicy,
        by: Option<Holder>,
    },
    Registration {
        uri: String,
        policy: MatchPolicy,
        invoke: InvokePolicy,
        by: Option<Holder>,
    },
}

/// The session an [`Announce`] names.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub session: Id,
    pub role: String,
    /// The proof of the session's role (see [`SessionInfo::proof`]).
    pub proof: Option<Arc<crate::auth::SessionProof>>,
}

/// Receives [`Announce`]s with the realm name; called under the realm's lock, so it must only
/// enqueue.
pub type Announcer = Arc<dyn Fn(&str, Announce) + Send + Sync>;

/// Why a forwarded message was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    #[error("invalid: {0}")]
    Invalid(String),
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

/// Builds an ERROR reply whose first argument is a human message.
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

    /// Where changes of local interest and registrations are reported (the mesh).
    pub fn set_announcer(&mut self, a: Announcer) {
        self.announcer = Some(a);
    }

    fn announce(&self, a: Announce) {
        if let Some(f) = &self.announcer {
            f(&self.name, a);
        }
    }

    fn is_link(&self, id: Id) -> bool {
        self.sessions.get(&id).is_some_and(|m| m.info.link)
    }

    /// The session of `members` that justifies the node's interest or registration to other
    /// nodes: the first of its own sessions that can prove its role, else the first of its own.
    fn holder_of(&self, members: &[Id]) -> Option<Id> {
        let local = |x: &&Id| self.sessions.get(x).is_some_and(|m| !m.info.link);
        let proven = |x: &&Id| self.sessions.get(x).is_some_and(|m| m.info.proof.is_some());
        let mut own = members.iter().filter(local);
        own.clone().find(proven).or_else(|| own.next()).copied()
    }

    /// The session that justifies the node's interest in subscription `sub` (see
    /// [`Realm::holder_of`]).
    fn first_local_subscriber(&self, sub: Id) -> Option<Id> {
        self.broker
            .get(sub)
            .and_then(|s| self.holder_of(&s.subscribers))
    }

    /// The session that justifies the node's registration `reg`.
    fn first_local_callee(&self, reg: Id) -> Option<Id> {
        self.dealer
            .get(reg)
            .and_then(|r| self.holder_of(&r.callees))
    }

    fn holder(&self, id: Id) -> Option<Holder> {
        self.sessions.get(&id).map(|m| Holder {
            session: id,
            role: m.info.authrole.clone(),
            proof: m.info.proof.clone(),
        })
    }

    /// What this node's own sessions subscribe to and register, as announcements (sent to a
    /// peer that just connected).
    pub fn local_interest(&self) -> Vec<Announce> {
        let mut out = vec![];
        for s in self.broker.iter() {
            if let Some(by) = self
                .first_local_subscriber(s.id)
                .and_then(|c| self.holder(c))
            {
                out.push(Announce::Interest {
                    uri: s.uri.clone(),
                    policy: s.policy,
                    by: Some(by),
                });
            }
        }
        for r in self.dealer.iter() {
            if let Some(by) = self.first_local_callee(r.id).and_then(|c| self.holder(c)) {
                out.push(Announce::Registration {
                    uri: r.uri.clone(),
                    policy: r.policy,
                    invoke: r.invoke,
                    by: Some(by),
                });
            }
        }
        out
    }

    /// Removes `session` from subscription `sub`, announcing when the session that justifies
    /// the node's interest in it changes (or none is left). `None` if the session was not
    /// subscribed.
    fn drop_subscription(&mut self, session: Id, sub: Id) -> Option<()> {
        let (uri, policy) = self.broker.get(sub).map(|s| (s.uri.clone(), s.policy))?;
        let before = self.first_local_subscriber(sub);
        self.broker.unsubscribe(session, sub)?;
        if let Some(m) = self.sessions.get_mut(&session) {
            m.subscriptions.retain(|s| *s != sub);
        }
        let after = self.first_local_subscriber(sub);
        if before != after {
            self.announce(Announce::Interest {
                uri,
                policy,
                by: after.and_then(|a| self.holder(a)),
            });
        }
        Some(())
    }

    /// Removes `session` as a callee of `reg`, announcing when the session that justifies the
    /// node's registration changes (or none is left).
    fn drop_registration(&mut self, session: Id, reg: Id) -> Option<()> {
        let (uri, policy, invoke) = self
            .dealer
            .get(reg)
            .map(|r| (r.uri.clone(), r.policy, r.invoke))?;
        let before = self.first_local_callee(reg);
        self.dealer.unregister(session, reg)?;
        if let Some(m) = self.sessions.get_mut(&session) {
            m.registrations.retain(|r| *r != reg);
        }
        let after = self.first_local_callee(reg);
        if before != after {
            self.announce(Announce::Registration {
                uri,
                policy,
                invoke,
                by: after.and_then(|a| self.holder(a)),
            });
        }
        Some(())
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

    fn on_publish(
        &mut self,
        from: Id,
        request: Id,
        options: Dict,
        topic: String,
        payload: Payload,
    ) {
        let ack = opt_bool(&options, "acknowledge").unwrap_or(false);
        let reply_err = |realm: &Self, uri: &str, msg: String| {
            if ack {
                realm.send(from, error(code::PUBLISH, request, uri, msg));
            }
        };
        if let Err(e) = uri::validate(&topic) {
            return reply_err(self, errors::INVALID_URI, e.to_string());
        }
        if topic.starts_with("wamp.") {
            return reply_err(
                self,
                errors::INVALID_URI,
                format!("topic {topic:?} is reserved for the router"),
            );
        }
        let Some(me) = self.sessions.get(&from) else {
            return;
        };
        let info = me.info.clone();
        if !self.policy.allows(&info.authrole, Action::Publish, &topic) {
            return reply_err(
                self,
                errors::NOT_AUTHORIZED,
                self.denied(&info.authrole, Action::Publish, &topic),
            );
        }
        let publication = self.ids.next();
        let filter = Filter::from_options(&options, from);
        let disclose = opt_bool(&options, "disclose_me").unwrap_or(false);
        let mut base = Dict::new();
        if disclose {
            base.insert("publisher".into(), Value::from(from));
            base.insert("publisher_authid".into(), Value::Str(info.authid.clone()));
            base.insert(
                "publisher_authrole".into(),
                Value::Str(info.authrole.clone()),
            );
        }
        self.deliver(
            &topic,
            publication,
            base,
            payload,
            &filter,
            Some((&info, &options)),
        );
        if ack {
            self.send(
                from,
                Message::Published {
                    request,
                    publication,
                },
            );
        }
    }

    /// Sends an EVENT to every eligible subscriber of every subscription matching `topic`.
    /// The event is built once per subscription and shared by its subscribers. A publication of a
    /// local session (`origin`) is also forwarded once to every link member with matching
    /// interest; deliveries without an origin (meta events, publications from other nodes) stay
    /// on this node.
    fn deliver(
        &self,
        topic: &str,
        publication: Id,
        base: Dict,
        payload: Payload,
        filter: &Filter,
        origin: Option<(&SessionInfo, &Dict)>,
    ) {
        let mut payload = Some(payload);
        let mut matches: Vec<(Id, bool, &[Id])> = Vec::new();
        self.broker.for_each_match(topic, |s| {
            matches.push((s.id, s.policy != MatchPolicy::Exact, &s.subscribers))
        });
        if let (Some((info, options)), true) = (origin, self.links > 0) {
            let mut links: Vec<Id> = vec![];
            for (_, _, subscribers) in &matches {
                for s in subscribers.iter() {
                    if self.is_link(*s) && !links.contains(s) {
                        links.push(*s);
                    }
                }
            }
            for l in links {
                if let (Some(m), Some(p)) = (self.sessions.get(&l), payload.as_ref()) {
                    m.peer.forward(Forwarded::Publication {
                        publication,
                        topic,
                        options,
                        payload: p,
                        origin: info,
                    });
                }
            }
        }
        let n = matches.len();
        for (i, (sub, pattern, subscribers)) in matches.into_iter().enumerate() {
            let mut details = base.clone();
            if pattern {
                details.insert("topic".into(), Value::Str(topic.to_owned()));
            }
            let p = if i + 1 == n {
                payload.take().unwrap_or_default()
            } else {
                payload.clone().unwrap_or_default()
            };
            let event = Arc::new(Message::Event {
                subscription: sub,
                publication,
                details,
                payload: p,
            });
            for s in subscribers {
                if let Some(m) = self.sessions.get(s) {
                    if !m.info.link && filter.admits(&m.info) {
                        m.peer.send(event.clone());
                    }
                }
            }
        }
    }

    fn publish_meta(&mut self, topic: &str, args: List) {
        let publication = self.ids.next();
        self.deliver(
            topic,
            publication,
            Dict::new(),
            Payload::args(args),
            &Filter::default(),
            None,
        );
    }

    fn on_subscribe(&mut self, from: Id, request: Id, options: Dict, topic: String) {
        let Some(policy) = MatchPolicy::parse(options.get("match").and_then(Value::as_str)) else {
            return self.send(
                from,
                error(
                    code::SUBSCRIBE,
                    request,
                    errors::INVALID_ARGUMENT,
                    "match must be exact, prefix or wildcard",
                ),
            );
        };
        if let Err(e) = uri::validate_pattern(&topic, policy) {
            return self.send(
                from,
                error(code::SUBSCRIBE, request, errors::INVALID_URI, e.to_string()),
            );
        }
        let (role, held) = match self.sessions.get(&from) {
            Some(m) => (m.info.authrole.clone(), m.subscriptions.len()),
            None => return,
        };
        if held >= self.config.max_subscriptions_per_session {
            let msg = format!(
                "this session already holds {held} subscriptions (limits.max_subscriptions_per_session); unsubscribe or use a pattern"
            );
            return self.send(
                from,
                error(code::SUBSCRIBE, request, errors::LIMIT_EXCEEDED, msg),
            );
        }
        if !self
            .policy
            .allows_pattern(&role, Action::Subscribe, &topic, policy)
        {
            let msg = self.denied(&role, Action::Subscribe, &topic);
            return self.send(
                from,
                error(code::SUBSCRIBE, request, errors::NOT_AUTHORIZED, msg),
            );
        }
        let before = self
            .broker
            .find(policy, &topic)
            .and_then(|id| self.first_local_subscriber(id));
        let ids = &mut self.ids;
        let (id, _) = self.broker.subscribe(from, &topic, policy, || ids.next());
        if let Some(m) = self.sessions.get_mut(&from) {
            if !m.subscriptions.contains(&id) {
                m.subscriptions.push(id);
            }
        }
        // Announced when the node's first session subscribes, or when one that can prove its
        // role takes over from one that cannot.
        let after = self.first_local_subscriber(id);
        if after != before {
            self.announce(Announce::Interest {
                uri: topic,
                policy,
                by: after.and_then(|a| self.holder(a)),
            });
        }
        self.send(
            from,
            Message::Subscribed {
                request,
                subscription: id,
            },
        );
    }

    fn on_register(&mut self, from: Id, request: Id, options: Dict, procedure: String) {
        let err = |uri: &str, msg: String| error(code::REGISTER, request, uri, msg);
        let Some(policy) = MatchPolicy::parse(options.get("match").and_then(Value::as_str)) else {
            return self.send(
                from,
                err(
                    errors::INVALID_ARGUMENT,
                    "match must be exact, prefix or wildcard".into(),
                ),
            );
        };
        let Some(invoke) = InvokePolicy::parse(options.get("invoke").and_then(Value::as_str))
        else {
            return self.send(
                from,
                err(
                    errors::INVALID_ARGUMENT,
                    "invoke must be single, roundrobin, random, first or last".into(),
                ),
            );
        };
        if let Err(e) = uri::validate_pattern(&procedure, policy) {
            return self.send(from, err(errors::INVALID_URI, e.to_string()));
        }
        if procedure.starts_with("wamp.") {
            return self.send(
                from,
                err(
                    errors::INVALID_URI,
                    format!("procedure {procedure:?} is reserved for the router"),
                ),
            );
        }
        let (role, held) = match self.sessions.get(&from) {
            Some(m) => (m.info.authrole.clone(), m.registrations.len()),
            None => return,
        };
        if held >= self.config.max_registrations_per_session {
            let msg = format!(
                "this session already holds {held} registrations (limits.max_registrations_per_session)"
            );
            return self.send(from, err(errors::LIMIT_EXCEEDED, msg));
        }
        if !self
            .policy
            .allows_pattern(&role, Action::Register, &procedure, policy)
        {
            let msg = self.denied(&role, Action::Register, &procedure);
            return self.send(from, err(errors::NOT_AUTHORIZED, msg));
        }
        let before = self
            .dealer
            .find(policy, &procedure)
            .and_then(|id| self.first_local_callee(id));
        let ids = &mut self.ids;
        match self.dealer.register(from, &procedure, policy, invoke, || ids.next()) {
            Ok(id) => {
                if let Some(m) = self.sessions.get_mut(&from) {
                    m.registrations.push(id);
                }
                self.send(from, Message::Registered { request, registration: id });
                let after = self.first_local_callee(id);
                if after != before {
                    self.announce(Announce::Registration {
                        uri: procedure,
                        policy,
                        invoke,
                        by: after.and_then(|a| self.holder(a)),
                    });
                }
            }
            Err(RegisterError::AlreadyExists) => self.send(
                from,
                err(errors::PROCEDURE_ALREADY_EXISTS, format!("procedure {procedure:?} is already registered")),
            ),
            Err(RegisterError::PolicyMismatch(existing)) => self.send(
                from,
                err(
                    errors::PROCEDURE_ALREADY_EXISTS,
                    format!("procedure {procedure:?} is registered with invoke={}; register with the same policy to share it", existing.as_str()),
                ),
            ),
        }
    }

    fn on_call(
        &mut self,
        from: Id,
        request: Id,
        options: Dict,
        procedure: String,
        payload: Payload,
        now: Instant,
    ) {
        let err = |uri: &str, msg: String| error(code::CALL, request, uri, msg);
        if let Err(e) = uri::validate(&procedure) {
            return self.send(from, err(errors::INVALID_URI, e.to_string()));
        }
        let Some(info) = self.sessions.get(&from).map(|m| m.info.clone()) else {
            return;
        };
        if !self.policy.allows(&info.authrole, Action::Call, &procedure) {
            return self.send(
                from,
                err(
                    errors::NOT_AUTHORIZED,
                    self.denied(&info.authrole, Action::Call, &procedure),
                ),
            );
        }
        if procedure.starts_with("wamp.") {
            let reply = self.meta_call(request, &procedure, &payload);
            return self.send(from, reply);
        }
        let in_flight = self.dealer.calls_of(from);
        if in_flight >= self.config.max_calls_per_session {
            return self.send(
                from,
                err(
                    errors::LIMIT_EXCEEDED,
                    format!(
                        "this session has {in_flight} calls in flight, the most allowed \
                         (limits.max_calls_per_session); wait for answers before calling again"
                    ),
                ),
            );
        }
        self.dispatch_call(
            from, &info, request, options, procedure, payload, now, false,
        );
    }

    /// Routes an authorized call from `from` (a session, or a link for a call forwarded by another
    /// node, which may only reach local callees) to a callee: an INVOCATION to a local session,
    /// or a forwarded call through a link member.
    #[allow(clippy::too_many_arguments)]
    fn dispatch_call(
        &mut self,
        from: Id,
        info: &SessionInfo,
        request: Id,
        options: Dict,
        procedure: String,
        payload: Payload,
        now: Instant,
        local_only: bool,
    ) {
        let err = |uri: &str, msg: String| error(code::CALL, request, uri, msg);
        let Some((reg_id, reg_uri, reg_policy)) = self
            .dealer
            .lookup(&procedure)
            .map(|r| (r.id, r.uri.clone(), r.policy))
        else {
            return self.send(
                from,
                err(
                    errors::NO_SUCH_PROCEDURE,
                    format!("no callee registered procedure {procedure:?}"),
                ),
            );
        };
        let random = self.ids.next();
        let sessions = &self.sessions;
        let Some(callee) = self.dealer.pick_callee(reg_id, random, |c| {
            !local_only || sessions.get(&c).is_some_and(|m| !m.info.link)
        }) else {
            return self.send(
                from,
                err(
                    errors::NO_SUCH_PROCEDURE,
                    format!("no callee registered procedure {procedure:?}"),
                ),
            );
        };
        let receive_progress = opt_bool(&options, "receive_progress").unwrap_or(false);
        let timeout = match options.get("timeout").and_then(Value::as_u64) {
            Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
            _ => self.config.default_call_timeout,
        };
        let disclose = opt_bool(&options, "disclose_me").unwrap_or(false);
        if self.dealer.by_caller(from, request).is_some() {
            // A client reusing a request id of a call still in flight is a protocol violation in
            // spirit; answering with an error keeps both calls unambiguous.
            return self.send(
                from,
                err(
                    errors::INVALID_ARGUMENT,
                    format!("request id {request} is already in use by a call in flight"),
                ),
            );
        }
        let inv = self.dealer.start_call(
            PendingCall {
                caller: from,
                caller_request: request,
                callee,
                receive_progress,
                killing: false,
            },
            // A timeout too large to represent is no deadline at all (never a panic on input).
            timeout.and_then(|t| now.checked_add(t)),
        );
        let Some(m) = self.sessions.get(&callee) else {
            return;
        };
        if m.info.link {
            let mut fwd = Dict::new();
            if let Some(t) = timeout {
                fwd.insert("timeout".into(), Value::from(t.as_millis() as u64));
            }
            if receive_progress {
                fwd.insert("receive_progress".into(), Value::Bool(true));
            }
            if disclose {
                fwd.insert("disclose_me".into(), Value::Bool(true));
            }
            m.peer.forward(Forwarded::Call {
                invocation: inv,
                procedure: &procedure,
                options: fwd,
                payload,
                origin: info,
            });
            return;
        }
        let mut details = Dict::new();
        if reg_policy != MatchPolicy::Exact || reg_uri != procedure {
            details.insert("procedure".into(), Value::Str(procedure));
        }
        if receive_progress {
            details.insert("receive_progress".into(), Value::Bool(true));
        }
        if disclose {
            details.insert("caller".into(), Value::from(info.id));
            details.insert("caller_authid".into(), Value::Str(info.authid.clone()));
            details.insert("caller_authrole".into(), Value::Str(info.authrole.clone()));
        }
        m.peer.send(Arc::new(Message::Invocation {
            request: inv,
            registration: reg_id,
            details,
            payload,
        }));
    }

    fn on_cancel(&mut self, from: Id, request: Id, options: Dict) {
        let Some(mode) = CancelMode::parse(options.get("mode").and_then(Value::as_str)) else {
            return self.send(
                from,
                error(
                    code::CANCEL,
                    request,
                    errors::INVALID_ARGUMENT,
                    "mode must be skip, kill or killnowait",
                ),
            );
        };
        // Canceling a call that already finished is not an error: there is nothing left to do.
        let Some(inv) = self.dealer.by_caller(from, request) else {
            return;
        };
        let callee = match self.dealer.call(inv) {
            Some(c) => c.callee,
            None => return,
        };
        match mode {
            CancelMode::Skip => {
                self.dealer.finish(inv);
                self.send(
                    from,
                    error(
                        code::CALL,
                        request,
                        errors::CANCELED,
                        "the call was canceled",
                    ),
                );
            }
            CancelMode::KillNoWait => {
                self.dealer.finish(inv);
                self.interrupt(callee, inv);
                self.send(
                    from,
                    error(
                        code::CALL,
                        request,
                        errors::CANCELED,
                        "the call was canceled",
                    ),
                );
            }
            CancelMode::Kill => {
                let supports = self
                    .sessions
                    .get(&callee)
                    .is_some_and(|m| m.info.callee_cancel);
                if supports {
                    if let Some(c) = self.dealer.call_mut(inv) {
                        c.killing = true;
                    }
                    if let Some(m) = self.sessions.get(&callee) {
                        m.peer.send(Arc::new(Message::Interrupt {
                            request: inv,
                            options: dict! {"mode" => "kill"},
                        }));
                    }
                } else {
                    self.dealer.finish(inv);
                    self.send(
                        from,
                        error(
                            code::CALL,
                            request,
                            errors::CANCELED,
                            "the call was canceled",
                        ),
                    );
                }
            }
        }
    }

    fn on_yield(
        &mut self,
        from: Id,
        inv: Id,
        options: Dict,
        payload: Payload,
    ) -> Result<(), Message> {
        let progress = opt_bool(&options, "progress").unwrap_or(false);
        let Some(call) = self.dealer.call(inv).filter(|c| c.callee == from).cloned() else {
            // A late answer to a call that was canceled or timed out is expected; an answer to an
            // invocation that never existed is a protocol violation.
            if self.dealer.was_issued(inv) {
                return Ok(());
            }
            return Err(crate::auth::abort(
                errors::PROTOCOL_VIOLATION,
                format!("YIELD for unknown invocation {inv}"),
            ));
        };
        if progress {
            if call.receive_progress && !call.killing {
                let details = dict! {"progress" => true};
                self.send(
                    call.caller,
                    Message::Result {
                        request: call.caller_request,
                        details,
                        payload,
                    },
                );
            }
            return Ok(());
        }
        self.dealer.finish(inv);
        if call.killing {
            self.send(
                call.caller,
                error(
                    code::CALL,
                    call.caller_request,
                    errors::CANCELED,
                    "the call was canceled",
                ),
            );
        } else {
            self.send(
                call.caller,
                Message::Result {
                    request: call.caller_request,
                    details: Dict::new(),
                    payload,
                },
            );
        }
        Ok(())
    }

    fn on_invocation_error(
        &mut self,
        from: Id,
        inv: Id,
        details: Dict,
        uri: String,
        payload: Payload,
    ) -> Result<(), Message> {
        let Some(call) = self.dealer.call(inv).filter(|c| c.callee == from).cloned() else {
            if self.dealer.was_issued(inv) {
                return Ok(());
            }
            return Err(crate::auth::abort(
                errors::PROTOCOL_VIOLATION,
                format!("ERROR for unknown invocation {inv}"),
            ));
        };
        self.dealer.finish(inv);
        let uri = if call.killing {
            errors::CANCELED.to_owned()
        } else {
            uri
        };
        self.send(
            call.caller,
            Message::Error {
                request_type: code::CALL,
                request: call.caller_request,
                details,
                error: uri,
                payload,
            },
        );
        Ok(())
    }

    /// The session meta API procedures.
    fn meta_call(&self, request: Id, procedure: &str, payload: &Payload) -> Message {
        let roles_filter: Option<Vec<String>> =
            payload.args.first().and_then(Value::as_list).map(|l| {
                l.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            });
        let selected = || {
            self.sessions.values().filter(|m| {
                !m.info.link
                    && roles_filter
                        .as_ref()
                        .is_none_or(|f| f.contains(&m.info.authrole))
            })
        };
        let result = |args: List| Message::Result {
            request,
            details: Dict::new(),
            payload: Payload::args(args),
        };
        match procedure {
            "wamp.session.count" => result(vec![Value::from(selected().count() as u64)]),
            "wamp.session.list" => {
                let mut ids: Vec<u64> = selected().map(|m| m.info.id).collect();
                ids.sort_unstable();
                result(vec![Value::List(
                    ids.into_iter().map(Value::from).collect(),
                )])
            }
            "wamp.session.get" => {
                let Some(id) = payload.args.first().and_then(Value::as_u64) else {
                    return error(
                        code::CALL,
                        request,
                        errors::INVALID_ARGUMENT,
                        "wamp.session.get takes a session id",
                    );
                };
                match self.sessions.get(&id).filter(|m| !m.info.link) {
                    Some(m) => result(vec![Value::Dict(session_details(&m.info))]),
                    None => error(
                        code::CALL,
                        request,
                        errors::NO_SUCH_SESSION,
                        format!("no session {id} in this realm"),
                    ),
                }
            }
            _ => error(
                code::CALL,
                request,
                errors::NO_SUCH_PROCEDURE,
                format!("no router procedure {procedure:?}"),
            ),
        }
    }
}

/// The session on another node that a forwarded publication or call came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub session: Id,
    pub authid: String,
    pub authrole: String,
}

/// The mesh's side of a realm: link members stand for other nodes. A link subscribes for the
/// interest of its node's sessions, registers for its node's callees, and carries publications,
/// calls and their replies. Everything arriving through a link is checked against this node's
/// policy for the originating session's role.
impl<P: Peer> Realm<P> {
    /// Adds the link member for another node.
    pub fn join_link(&mut self, node: &str, peer: P) -> Id {
        let id = self.new_session_id();
        let info = SessionInfo {
            id,
            authid: node.to_owned(),
            authrole: "macula.link".into(),
            authmethod: "mesh",
            transport: Dict::new(),
            callee_cancel: true,
            link: true,
            proof: None,
        };
        self.join(info, peer);
        id
    }

    /// The linked node's sessions subscribed to (`uri`, `policy`), the one it names with `role`.
    pub fn link_subscribe(
        &mut self,
        link: Id,
        uri: &str,
        policy: MatchPolicy,
        role: &str,
    ) -> Result<(), LinkError> {
        uri::validate_pattern(uri, policy).map_err(|e| LinkError::Invalid(e.to_string()))?;
        if !self.is_link(link) {
            return Err(LinkError::Invalid("not a link".into()));
        }
        if !self
            .policy
            .allows_pattern(role, Action::Subscribe, uri, policy)
        {
            return Err(LinkError::NotAuthorized(self.denied(
                role,
                Action::Subscribe,
                uri,
            )));
        }
        let ids = &mut self.ids;
        let (id, _) = self.broker.subscribe(link, uri, policy, || ids.next());
        if let Some(m) = self.sessions.get_mut(&link) {
            if !m.subscriptions.contains(&id) {
                m.subscriptions.push(id);
            }
        }
        Ok(())
    }

    /// The linked node no longer has sessions subscribed to (`uri`, `policy`).
    pub fn link_unsubscribe(&mut self, link: Id, uri: &str, policy: MatchPolicy) {
        if let Some(id) = self.broker.find(policy, uri) {
            self.drop_subscription(link, id);
        }
    }

    /// The linked node has a callee for (`uri`, `policy`) registered by a session of `role`.
    pub fn link_register(
        &mut self,
        link: Id,
        uri: &str,
        policy: MatchPolicy,
        invoke: InvokePolicy,
        role: &str,
    ) -> Result<(), LinkError> {
        uri::validate_pattern(uri, policy).map_err(|e| LinkError::Invalid(e.to_string()))?;
        if !self.is_link(link) {
            return Err(LinkError::Invalid("not a link".into()));
        }
        if !self
            .policy
            .allows_pattern(role, Action::Register, uri, policy)
        {
            return Err(LinkError::NotAuthorized(self.denied(
                role,
                Action::Register,
                uri,
            )));
        }
        let ids = &mut self.ids;
        match self
            .dealer
            .register(link, uri, policy, invoke, || ids.next())
        {
            Ok(id) => {
                if let Some(m) = self.sessions.get_mut(&link) {
                    m.registrations.push(id);
                }
                Ok(())
            }
            Err(_)
                if self
                    .dealer
                    .find(policy, uri)
                    .and_then(|id| self.dealer.get(id))
                    .is_some_and(|r| r.callees.contains(&link)) =>
            {
                Ok(())
            }
            Err(_) => Err(LinkError::Invalid(format!(
                "procedure {uri:?} is registered here with another invocation policy"
            ))),
        }
    }

    /// Registers an in-process service of the node (a link member that answers calls itself),
    /// outside the realm's policy: callers still need `rpc:call` permission for `uri`.
    pub fn service_register(&mut self, link: Id, uri: &str) {
        let ids = &mut self.ids;
        if let Ok(id) =
            self.dealer
                .register(link, uri, MatchPolicy::Exact, InvokePolicy::Single, || {
                    ids.next()
                })
        {
            if let Some(m) = self.sessions.get_mut(&link) {
                m.registrations.push(id);
            }
        }
    }

    /// The linked node no longer has a callee for (`uri`, `policy`).
    pub fn link_unregister(&mut self, link: Id, uri: &str, policy: MatchPolicy) {
        if let Some(id) = self.dealer.find(policy, uri) {
            self.drop_registration(link, id);
        }
    }

    /// A publication from a session of the linked node: delivered to this node's subscribers.
    pub fn link_publish(
        &mut self,
        origin: &Origin,
        publication: Id,
        options: &Dict,
        topic: &str,
        payload: Payload,
    ) -> Result<(), LinkError> {
        uri::validate(topic).map_err(|e| LinkError::Invalid(e.to_string()))?;
        if topic.starts_with("wamp.") {
            return Err(LinkError::Invalid(format!("topic {topic:?} is reserved")));
        }
        if !self.policy.allows(&origin.authrole, Action::Publish, topic) {
            return Err(LinkError::NotAuthorized(self.denied(
                &origin.authrole,
                Action::Publish,
                topic,
            )));
        }
        let filter = Filter::from_options(options, origin.session);
        let mut base = Dict::new();
        if opt_bool(options, "disclose_me").unwrap_or(false) {
            base.insert("publisher".into(), Value::from(origin.session));
            base.insert("publisher_authid".into(), Value::Str(origin.authid.clone()));
            base.insert(
                "publisher_authrole".into(),
                Value::Str(origin.authrole.clone()),
            );
        }
        self.deliver(topic, publication, base, payload, &filter, None);
        Ok(())
    }

    /// A call from a session of the linked node for a callee on this node. Refusals are also
    /// answered to the link (the remote caller gets the error).
    #[allow(clippy::too_many_arguments)]
    pub fn link_call(
        &mut self,
        link: Id,
        origin: &Origin,
        invocation: Id,
        options: Dict,
        procedure: String,
        payload: Payload,
        now: Instant,
    ) -> Result<(), LinkError> {
        let refuse = |realm: &Self, uri: &str, msg: String| {
            realm.send(link, error(code::CALL, invocation, uri, msg.clone()));
            msg
        };
        if !self.is_link(link) {
            return Err(LinkError::Invalid("not a link".into()));
        }
        if let Err(e) = uri::validate(&procedure) {
            return Err(LinkError::Invalid(refuse(
                self,
                errors::INVALID_URI,
                e.to_string(),
            )));
        }
        if procedure.starts_with("wamp.")
            || !self
                .policy
                .allows(&origin.authrole, Action::Call, &procedure)
        {
            let msg = self.denied(&origin.authrole, Action::Call, &procedure);
            return Err(LinkError::NotAuthorized(refuse(
                self,
                errors::NOT_AUTHORIZED,
                msg,
            )));
        }
        let info = SessionInfo {
            id: origin.session,
            authid: origin.authid.clone(),
            authrole: origin.authrole.clone(),
            authmethod: "mesh",
            transport: Dict::new(),
            callee_cancel: false,
            link: false,
            proof: None,
        };
        self.dispatch_call(
            link, &info, invocation, options, procedure, payload, now, true,
        );
        Ok(())
    }

    /// A RESULT, ERROR or INTERRUPT from the linked node about a forwarded call.
    pub fn link_reply(&mut self, link: Id, msg: Message) -> Result<(), LinkError> {
        if !self.is_link(link) {
            return Err(LinkError::Invalid("not a link".into()));
        }
        let r = match msg {
            Message::Result {
                request,
                details,
                payload,
            } => {
                let mut options = Dict::new();
                if opt_bool(&details, "progress").unwrap_or(false) {
                    options.insert("progress".into(), Value::Bool(true));
                }
                self.on_yield(link, request, options, payload)
            }
            Message::Error {
                request_type: code::CALL,
                request,
                details,
                error: uri,
                payload,
            } => self.on_invocation_error(link, request, details, uri, payload),
            Message::Interrupt { request, options } => {
                self.on_cancel(link, request, options);
                Ok(())
            }
            other => {
                return Err(LinkError::Invalid(format!(
                    "unexpected {} from a link",
                    other.kind()
                )))
            }
        };
        r.map_err(|_| LinkError::Invalid("reply for an unknown call".into()))
    }
}

fn session_details(info: &SessionInfo) -> Dict {
    dict! {
        "session" => info.id,
        "authid" => info.authid.as_str(),
        "authrole" => info.authrole.as_str(),
        "authmethod" => info.authmethod,
        "authprovider" => "macula",
        "transport" => info.transport.clone(),
    }
}

/// Publisher exclusion and subscriber black/white listing of one publication.
#[derive(Default)]
struct Filter {
    exclude_session: Option<Id>,
    exclude: Option<Vec<Id>>,
    eligible: Option<Vec<Id>>,
    exclude_authid: Option<Vec<String>>,
    eligible_authid: Option<Vec<String>>,
    exclude_authrole: Option<Vec<String>>,
    eligible_authrole: Option<Vec<String>>,
}

impl Filter {
    fn from_options(o: &Dict, publisher: Id) -> Filter {
        Filter {
            exclude_session: if opt_bool(o, "exclude_me").unwrap_or(true) {
                Some(publisher)
            } else {
                None
            },
            exclude: id_list(o, "exclude"),
            eligible: id_list(o, "eligible"),
            exclude_authid: str_list(o, "exclude_authid"),
            eligible_authid: str_list(o, "eligible_authid"),
            exclude_authrole: str_list(o, "exclude_authrole"),
            eligible_authrole: str_list(o, "eligible_authrole"),
        }
    }

    fn admits(&self, s: &SessionInfo) -> bool {
        if self.exclude_session == Some(s.id) {
            return false;
        }
        let has = |l: &Option<Vec<Id>>| l.as_ref().map(|l| l.contains(&s.id));
        let has_s = |l: &Option<Vec<String>>, v: &String| l.as_ref().map(|l| l.contains(v));
        has(&self.exclude) != Some(true)
            && has(&self.eligible) != Some(false)
            && has_s(&self.exclude_authid, &s.authid) != Some(true)
            && has_s(&self.eligible_authid, &s.authid) != Some(false)
            && has_s(&self.exclude_authrole, &s.authrole) != Some(true)
            && has_s(&self.eligible_authrole, &s.authrole) != Some(false)
    }
}
