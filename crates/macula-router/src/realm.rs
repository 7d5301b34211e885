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
}

impl<T: Peer + ?Sized> Peer for Arc<T> {
    fn send(&self, msg: Arc<Message>) {
        (**self).send(msg)
    }
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
}

impl Default for RealmConfig {
    fn default() -> Self {
        RealmConfig {
            default_call_timeout: Some(Duration::from_secs(60)),
            max_subscriptions_per_session: 10_000,
            max_registrations_per_session: 10_000,
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

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Ids of the sessions for which `f` holds.
    pub fn sessions_where(&self, f: impl Fn(&SessionInfo) -> bool) -> Vec<Id> {
        self.sessions
            .values()
            .filter(|m| f(&m.info))
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
        self.publish_meta("wamp.session.on_join", vec![Value::Dict(meta)]);
        Message::Welcome {
            session: id,
            details,
        }
    }

    /// Removes a session: its subscriptions and registrations go, calls it made are interrupted,
    /// calls made to it fail with `wamp.error.canceled`.
    pub fn leave(&mut self, id: Id) {
        let Some(m) = self.sessions.remove(&id) else {
            return;
        };
        for s in &m.subscriptions {
            self.broker.unsubscribe(id, *s);
        }
        for r in &m.registrations {
            self.dealer.unregister(id, *r);
        }
        for inv in self.dealer.calls_involving(id) {
            let Some(c) = self.dealer.finish(inv) else {
                continue;
            };
            if c.callee == id {
                self.send(
                    c.caller,
                    error(
                        code::CALL,
                        c.caller_request,
                        errors::CANCELED,
                        "the callee left before answering; retry the call",
                    ),
                );
            } else {
                self.interrupt(c.callee, inv);
            }
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
                match self.broker.unsubscribe(from, subscription) {
                    Some(_) => {
                        if let Some(m) = self.sessions.get_mut(&from) {
                            m.subscriptions.retain(|s| *s != subscription);
                        }
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
                match self.dealer.unregister(from, registration) {
                    Some(()) => {
                        if let Some(m) = self.sessions.get_mut(&from) {
                            m.registrations.retain(|r| *r != registration);
                        }
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
        self.deliver(&topic, publication, base, payload, &filter);
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
    /// The event is built once per subscription and shared by its subscribers.
    fn deliver(&self, topic: &str, publication: Id, base: Dict, payload: Payload, filter: &Filter) {
        let mut payload = Some(payload);
        let mut matches: Vec<(Id, bool, &[Id])> = Vec::new();
        self.broker.for_each_match(topic, |s| {
            matches.push((s.id, s.policy != MatchPolicy::Exact, &s.subscribers))
        });
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
                    if filter.admits(&m.info) {
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
        let ids = &mut self.ids;
        let (id, _) = self.broker.subscribe(from, &topic, policy, || ids.next());
        if let Some(m) = self.sessions.get_mut(&from) {
            if !m.subscriptions.contains(&id) {
                m.subscriptions.push(id);
            }
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
        let ids = &mut self.ids;
        match self.dealer.register(from, &procedure, policy, invoke, || ids.next()) {
            Ok(id) => {
                if let Some(m) = self.sessions.get_mut(&from) {
                    m.registrations.push(id);
                }
                self.send(from, Message::Registered { request, registration: id });
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
        let Some(callee) = self.dealer.pick_callee(reg_id, random) else {
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
        let mut details = Dict::new();
        if reg_policy != MatchPolicy::Exact || reg_uri != procedure {
            details.insert("procedure".into(), Value::Str(procedure));
        }
        if receive_progress {
            details.insert("receive_progress".into(), Value::Bool(true));
        }
        if opt_bool(&options, "disclose_me").unwrap_or(false) {
            details.insert("caller".into(), Value::from(from));
            details.insert("caller_authid".into(), Value::Str(info.authid.clone()));
            details.insert("caller_authrole".into(), Value::Str(info.authrole.clone()));
        }
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
        self.send(
            callee,
            Message::Invocation {
                request: inv,
                registration: reg_id,
                details,
                payload,
            },
        );
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
                roles_filter
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
                match self.sessions.get(&id) {
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
