//! One client connection, independent of transport: frames in → handshake or router → outbox.
//! The transports (WebSocket, RawSocket) only move frames.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use macula_router::auth::{abort, goodbye, Handshake, Step};
use macula_router::SessionInfo;
use macula_wamp::{dict, errors, Dict, Id, Message, Serializer, Value};

use crate::confdir::now_secs;
use crate::meter::{Op, SessionMeter};
use crate::node::{Node, RealmHandle};
use crate::outbox::{Out, Outbox, SessionPeer, Staging};

/// Whether the connection goes on after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The outbox was closed with a final message; stop reading.
    Close,
}

enum State {
    Handshake(Handshake),
    Joined { id: Id, realm: Arc<RealmHandle> },
    Closed,
}

/// Per-session token bucket against floods.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if self.tokens < 1.0 {
            let dt = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
            self.last = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A client connection's protocol state.
pub struct Connection {
    node: Arc<Node>,
    serializer: Serializer,
    transport: Dict,
    outbox: Arc<Outbox>,
    state: State,
    bucket: Bucket,
    staging: Staging,
    /// The time of the current burst of input (read once per burst, reset on flush).
    now: Option<Instant>,
    /// Size of the frame being handled (metered as the operation's bytes in).
    frame_len: usize,
    meter: Option<Arc<SessionMeter>>,
    /// The key id the session joined with (for raw metering events).
    kid: String,
}

impl Connection {
    pub fn new(
        node: Arc<Node>,
        serializer: Serializer,
        transport_type: &str,
        peer: String,
    ) -> Connection {
        let limits = &node.config.limits;
        let outbox = Outbox::new(
            limits.outbox_capacity,
            limits.outbox_max_bytes,
            limits.slow_consumer,
            node.metrics.clone(),
        );
        let bucket = Bucket {
            rate: limits.rate_limit_per_second as f64,
            burst: limits.rate_limit_burst.max(1) as f64,
            tokens: limits.rate_limit_burst.max(1) as f64,
            last: Instant::now(),
        };
        let transport =
            dict! {"type" => transport_type, "peer" => peer, "serializer" => serializer.name()};
        Connection {
            node,
            serializer,
            transport,
            outbox,
            state: State::Handshake(Handshake::Start),
            bucket,
            staging: Staging::default(),
            now: None,
            frame_len: 0,
            meter: None,
            kid: String::new(),
        }
    }

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    pub fn serializer(&self) -> Serializer {
        self.serializer
    }

    pub fn is_joined(&self) -> bool {
        matches!(self.state, State::Joined { .. })
    }

    fn fail(&mut self, msg: Message) -> Flow {
        self.flush();
        self.outbox.close_with(msg);
        Flow::Close
    }

    /// Pushes deliveries staged while handling buffered input. Transports call this before they
    /// wait for more input.
    pub fn flush(&mut self) {
        self.staging.flush();
        self.now = None;
    }

    /// Waits while what this session sent fed a congested mesh peer (see
    /// `macula_mesh::take_pressure`): the transport stops reading, so the client's own socket
    /// pushes back instead of the mesh dropping frames. Ends early if the session is closed.
    /// Called after every frame; staged deliveries are flushed before waiting.
    pub async fn mesh_backpressure(&mut self) {
        if !macula_mesh::take_pressure() {
            return;
        }
        let Some(mesh) = crate::mesh::of(&self.node).cloned() else {
            return;
        };
        self.flush();
        self.node
            .metrics
            .mesh_pauses
            .fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = mesh.handle.writable() => {}
            _ = self.outbox.closed() => {}
        }
    }

    /// Whether enough deliveries are staged that they should go out now.
    pub fn should_flush(&self) -> bool {
        self.staging.len() >= Staging::LIMIT
    }

    /// Closes the session because a message of `len` bytes is above the size limit.
    pub fn refuse_oversized(&mut self, len: usize) -> Flow {
        self.node.metrics.oversized.fetch_add(1, Ordering::Relaxed);
        let limit = self.node.config.limits.max_message_size;
        self.fail(abort(
            errors::PROTOCOL_VIOLATION,
            format!("message of {len} bytes exceeds this node's limit of {limit} bytes (limits.max_message_size)"),
        ))
    }

    /// Handles a RawSocket PING: answered with a PONG (at most one owed at a time), and counted
    /// against the session's rate limit like any message, before WELCOME too.
    pub fn on_ping(&mut self, payload: &[u8]) -> Flow {
        if self.outbox.is_closed() {
            return Flow::Close;
        }
        let now = *self.now.get_or_insert_with(Instant::now);
        if !self.bucket.take(now) {
            return self.rate_limited();
        }
        self.outbox.pong(payload.to_vec());
        Flow::Continue
    }

    fn rate_limited(&mut self) -> Flow {
        self.node
            .metrics
            .rate_limited
            .fetch_add(1, Ordering::Relaxed);
        let rate = self.node.config.limits.rate_limit_per_second;
        let reason = format!(
            "the session sent more than {rate} messages per second (limits.rate_limit_per_second)"
        );
        self.fail(if self.is_joined() {
            goodbye(errors::RATE_LIMITED, reason)
        } else {
            abort(errors::RATE_LIMITED, reason)
        })
    }

    /// Handles one received frame.
    pub fn on_frame(&mut self, bytes: &[u8]) -> Flow {
        // A closed session (revoked, over a limit, shut down) serves nothing more.
        if self.outbox.is_closed() {
            return Flow::Close;
        }
        let metrics = self.node.metrics.clone();
        if bytes.len() > self.node.config.limits.max_message_size {
            return self.refuse_oversized(bytes.len());
        }
        let msg = match self.serializer.decode_fast(bytes) {
            Ok(m) => m,
            Err(e) => {
                metrics.decode_errors.fetch_add(1, Ordering::Relaxed);
                return self.fail(abort(errors::PROTOCOL_VIOLATION, e.to_string()));
            }
        };
        metrics.count_in(msg.code());
        self.frame_len = bytes.len();
        self.on_message(msg)
    }

    fn on_message(&mut self, msg: Message) -> Flow {
        let now = *self.now.get_or_insert_with(Instant::now);
        match &mut self.state {
            State::Closed => Flow::Close,
            State::Joined { id, realm } => {
                if !self.bucket.take(now) {
                    return self.rate_limited();
                }
                let (id, realm) = (*id, realm.clone());
                // Counted once the router took it (a refusal for quota is not an operation).
                let kind = self.meter.as_ref().and_then(|_| op_kind(&msg));
                let sampled = match (&self.node.events, kind) {
                    (Some(tap), Some(k)) if tap.sample() => Some((k, op_target(&msg))),
                    _ => None,
                };
                let call = match (&self.meter, &msg) {
                    (Some(m), Message::Call { request, .. }) => {
                        m.call_started(*request, now);
                        Some(*request)
                    }
                    _ => None,
                };
                let mut over_quota = false;
                let announces = matches!(
                    msg,
                    Message::Subscribe { .. }
                        | Message::Unsubscribe { .. }
                        | Message::Register { .. }
                        | Message::Unregister { .. }
                );
                let handle = || {
                    self.staging.capture(|| {
                        let mut core = realm.lock();
                        over_quota = core.policy().doc.quota_exceeded.is_some();
                        core.handle(id, msg, now)
                    })
                };
                let result = if announces {
                    // The answer (staged, not sent yet) waits until the realm's other nodes
                    // have the interest or registration it confirms.
                    let (result, gates) = crate::mesh::collect_gates(handle);
                    for gate in gates {
                        self.outbox.hold(gate);
                    }
                    result
                } else {
                    handle()
                };
                if let (Some(m), Some(kind)) = (&self.meter, kind) {
                    if over_quota {
                        if let Some(r) = call {
                            m.call_forget(r);
                        }
                    } else {
                        m.counter.op(kind, self.frame_len);
                        if let (Some((k, target)), Some(tap)) = (sampled, &self.node.events) {
                            tap.offer(self.op_event(k, target, &realm.name));
                        }
                    }
                }
                match result {
                    Ok(()) => Flow::Continue,
                    Err(last) => {
                        if matches!(last, Message::Abort { .. }) {
                            self.node
                                .metrics
                                .protocol_errors
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        self.fail(last)
                    }
                }
            }
            State::Handshake(h) => {
                let auth = self.node.auth();
                let node_id = self.node.mesh_peer_bytes();
                match h.on_message(
                    msg,
                    &auth.authenticator,
                    now_secs(),
                    rand::random(),
                    node_id,
                ) {
                    Step::Challenge(c) => {
                        self.outbox_send(c);
                        Flow::Continue
                    }
                    Step::Abort(a) => {
                        self.node
                            .metrics
                            .auth_failures
                            .fetch_add(1, Ordering::Relaxed);
                        self.fail(a)
                    }
                    Step::Authenticated { identity, hello } => {
                        let realm = match self.node.admit(&identity) {
                            Ok(r) => r,
                            Err(a) => {
                                self.node
                                    .metrics
                                    .auth_failures
                                    .fetch_add(1, Ordering::Relaxed);
                                return self.fail(a);
                            }
                        };
                        let callee_cancel = hello
                            .get("roles")
                            .and_then(Value::as_dict)
                            .and_then(|r| r.get("callee"))
                            .and_then(Value::as_dict)
                            .and_then(|c| c.get("features"))
                            .and_then(Value::as_dict)
                            .and_then(|f| f.get("call_canceling"))
                            .and_then(Value::as_bool)
                            .unwrap_or(false);
                        let counter = match self.node.counter_for(&identity) {
                            Ok(c) => c,
                            Err(a) => {
                                self.node.drop_realm_if_idle(&realm);
                                return self.fail(a);
                            }
                        };
                        // In a realm this node has just started serving, WELCOME (and all
                        // after it) waits until the realm's other nodes are linked.
                        if let Some(g) =
                            crate::mesh::of(&self.node).and_then(|m| m.discovery_gate(&realm.name))
                        {
                            self.outbox.hold(g);
                        }
                        let joined = self.node.join_session(&identity, self.outbox.clone(), || {
                            let mut core = realm.lock();
                            let id = core.new_session_id();
                            let info = SessionInfo {
                                id,
                                authid: identity.kid.clone(),
                                authrole: identity.role.clone(),
                                authmethod: identity.method,
                                transport: self.transport.clone(),
                                callee_cancel,
                                link: false,
                                proof: identity.proof.clone().map(std::sync::Arc::new),
                            };
                            let welcome = core.join(
                                info,
                                crate::mesh::NodePeer::Session(SessionPeer(self.outbox.clone())),
                            );
                            self.outbox_send(welcome);
                            id
                        });
                        let id = match joined {
                            Ok(id) => id,
                            Err(a) => {
                                self.node
                                    .metrics
                                    .auth_failures
                                    .fetch_add(1, Ordering::Relaxed);
                                self.node.drop_realm_if_idle(&realm);
                                return self.fail(a);
                            }
                        };
                        self.kid = identity.kid.clone();
                        if let Some(counter) = counter {
                            let m = Arc::new(SessionMeter::new(counter));
                            self.outbox.set_meter(m.clone());
                            self.meter = Some(m);
                        }
                        self.state = State::Joined { id, realm };
                        Flow::Continue
                    }
                }
            }
        }
    }

    fn op_event(&self, kind: Op, target: String, realm: &str) -> crate::meter::OpEvent {
        crate::meter::OpEvent {
            timestamp: crate::confdir::rfc3339(now_secs()),
            realm: realm.to_owned(),
            node_id: self
                .node
                .mesh
                .get()
                .map(|m| m.peer_id())
                .unwrap_or_else(|| "standalone".into()),
            operation: kind.name(),
            topic: target,
            bytes_in: self.frame_len as u64,
            bytes_out: 0,
            latency_ms: None,
            api_key: self.kid.clone(),
        }
    }

    fn outbox_send(&self, m: Message) {
        use macula_router::Peer;
        self.outbox.send(Arc::new(m));
    }

    /// Called once the connection is gone: leaves the realm.
    pub fn finish(&mut self) {
        self.flush();
        if let State::Joined { id, realm } = std::mem::replace(&mut self.state, State::Closed) {
            self.node.session_left(id, &realm);
        }
        self.outbox.close();
    }
}

/// Encodes one outgoing item, counting it (and metering its bytes as the realm's egress).
/// `false` for items the transport handles itself.
pub fn encode_out(
    item: &Out,
    serializer: Serializer,
    node: &Node,
    meter: Option<&SessionMeter>,
    buf: &mut Vec<u8>,
) -> bool {
    match item {
        Out::Msg(m) => {
            node.metrics.count_out(m.code());
            let start = buf.len();
            serializer.encode_into(m, buf);
            if let Some(meter) = meter {
                meter.counter.egress(buf.len() - start);
                if let Some(request) = final_call_answer(m) {
                    meter.call_done(request);
                }
            }
            true
        }
        Out::Pong(_) => false,
    }
}

/// The CALL request a message finally answers (a RESULT that is not progressive, or an ERROR
/// for a CALL).
pub fn final_call_answer(m: &Message) -> Option<Id> {
    match m {
        Message::Result {
            request, details, ..
        } if !details
            .get("progress")
            .and_then(Value::as_bool)
            .unwrap_or(false) =>
        {
            Some(*request)
        }
        Message::Error {
            request_type: macula_wamp::code::CALL,
            request,
            ..
        } => Some(*request),
        _ => None,
    }
}

/// The topic or procedure an operation names.
fn op_target(m: &Message) -> String {
    match m {
        Message::Publish { topic, .. } | Message::Subscribe { topic, .. } => topic.clone(),
        Message::Call { procedure, .. } | Message::Register { procedure, .. } => procedure.clone(),
        _ => String::new(),
    }
}

/// The billed kind of a client's message (`None` for what is not an operation).
pub fn op_kind(m: &Message) -> Option<Op> {
    Some(match m {
        Message::Publish { .. } => Op::Publish,
        Message::Subscribe { .. } => Op::Subscribe,
        Message::Call { procedure, .. } if procedure.starts_with("macula.dht.") => Op::Dht,
        Message::Call { .. } => Op::Call,
        Message::Register { .. } => Op::Register,
        _ => return None,
    })
}
