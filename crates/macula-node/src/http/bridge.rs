//! The HTTP bridge: `POST /v1/realms/{realm}/publish` and `.../call/{procedure}` for
//! clients that do not speak WAMP. Each request is a short session of its own: authenticated by
//! its API key, admitted, metered and authorized like any session.

// Handlers return `Result<_, Response>` so that every early exit is a finished HTTP answer; the
// error path is cold, so the large `Err` is not worth boxing.
#![allow(clippy::result_large_err)]

#[allow(unused_imports)]
use super::*;

fn http_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// Maps a WAMP error URI to an HTTP status.
fn status_for(uri: &str) -> StatusCode {
    match uri {
        errors::NOT_AUTHORIZED => StatusCode::FORBIDDEN,
        errors::NO_SUCH_PROCEDURE | errors::NO_SUCH_REALM => StatusCode::NOT_FOUND,
        errors::INVALID_URI | errors::INVALID_ARGUMENT => StatusCode::BAD_REQUEST,
        errors::CANCELED | errors::TIMEOUT => StatusCode::GATEWAY_TIMEOUT,
        errors::NOT_READY => StatusCode::SERVICE_UNAVAILABLE,
        errors::AUTHENTICATION_FAILED | errors::NO_AUTH_METHOD => StatusCode::UNAUTHORIZED,
        errors::NO_SUCH_ROLE | errors::AUTHORIZATION_FAILED => StatusCode::FORBIDDEN,
        errors::QUOTA_EXCEEDED | errors::RATE_LIMITED | errors::LIMIT_EXCEEDED => {
            StatusCode::TOO_MANY_REQUESTS
        }
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

fn wamp_error_response(uri: &str, payload: &Payload) -> Response {
    let message = payload
        .args
        .first()
        .and_then(Value::as_str)
        .unwrap_or(uri)
        .to_owned();
    let mut error = payload.to_json();
    error["code"] = json!(uri);
    error["message"] = json!(message);
    (status_for(uri), Json(json!({ "error": error }))).into_response()
}

/// A bridge request's temporary session: authenticated like any other, joined for one operation.
struct BridgeSession {
    node: Arc<Node>,
    realm: Arc<crate::node::RealmHandle>,
    id: u64,
    outbox: Arc<Outbox>,
    /// The key's usage counter: bridge operations are billed like any others.
    meter: Option<crate::meter::Counter>,
    /// The key and its authority, checked again after a wait.
    kid: String,
    authority: [u8; 32],
}

impl BridgeSession {
    fn open(node: &Arc<Node>, realm: &str, headers: &HeaderMap) -> Result<BridgeSession, Response> {
        node.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = macula_wamp::uri::validate_realm(realm) {
            return Err(http_error(
                StatusCode::BAD_REQUEST,
                errors::INVALID_URI,
                e.to_string(),
            ));
        }
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                http_error(
                    StatusCode::UNAUTHORIZED,
                    errors::AUTHENTICATION_FAILED,
                    "send the API key as `Authorization: Bearer sk_live_...`",
                )
            })?;
        let mut hs = macula_router::auth::Handshake::Challenged {
            realm: realm.to_owned(),
            hello: Dict::new(),
            method: macula_router::auth::Pending::Ticket,
        };
        let auth = node.auth();
        let step = hs.on_message(
            Message::Authenticate {
                signature: key.to_owned(),
                extra: Dict::new(),
            },
            &auth.authenticator,
            now_secs(),
            [0; 32],
            node.mesh_peer_bytes(),
        );
        let identity = match step {
            macula_router::auth::Step::Authenticated { identity, .. } => identity,
            macula_router::auth::Step::Abort(Message::Abort { details, reason }) => {
                node.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                let msg = details
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("authentication failed")
                    .to_owned();
                return Err(http_error(StatusCode::UNAUTHORIZED, &reason, msg));
            }
            _ => {
                return Err(http_error(
                    StatusCode::UNAUTHORIZED,
                    errors::AUTHENTICATION_FAILED,
                    "authentication failed",
                ))
            }
        };
        let refused = |m: Message| match m {
            Message::Abort { details, reason } => {
                let msg = details
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("refused")
                    .to_owned();
                http_error(status_for(&reason), &reason, msg)
            }
            _ => http_error(
                StatusCode::FORBIDDEN,
                errors::AUTHORIZATION_FAILED,
                "refused",
            ),
        };
        let handle = node.admit(&identity).map_err(refused)?;
        let meter = match node.counter_for(&identity) {
            Ok(m) => m,
            Err(a) => {
                node.drop_realm_if_idle(&handle);
                return Err(refused(a));
            }
        };
        let outbox = Outbox::new(
            64,
            node.config.limits.outbox_max_bytes,
            crate::outbox::SlowConsumerPolicy::DropOldest,
            node.metrics.clone(),
        );
        let id = {
            let mut core = handle.lock();
            let id = core.new_session_id();
            let info = SessionInfo {
                id,
                authid: identity.kid.clone(),
                authrole: identity.role.clone(),
                authmethod: "ticket",
                transport: dict! {"type" => "http"},
                callee_cancel: false,
                link: false,
                proof: identity.proof.clone().map(std::sync::Arc::new),
            };
            // The WELCOME is not needed by an HTTP client.
            let _welcome = core.join(
                info,
                crate::mesh::NodePeer::Session(crate::outbox::SessionPeer(outbox.clone())),
            );
            id
        };
        Ok(BridgeSession {
            node: node.clone(),
            realm: handle,
            id,
            outbox,
            meter,
            kid: identity.kid,
            authority: identity.authority,
        })
    }

    /// Handles the one request of this session and waits up to `within` for its answer.
    /// `body_len` (the HTTP body) is metered as the operation's bytes in (the answer's body as
    /// egress, by [`BridgeSession::metered`]).
    async fn request(
        &self,
        msg: Message,
        body_len: usize,
        within: Duration,
    ) -> Result<Option<Message>, Response> {
        let started = Instant::now();
        let kind = crate::session::op_kind(&msg);
        let over_quota = {
            let mut core = self.realm.lock();
            let over = core.policy().doc.quota_exceeded.is_some();
            core.handle(self.id, msg, started).map(|_| over)
        }
        .map_err(|_| {
            http_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                errors::PROTOCOL_VIOLATION,
                "the bridge session was closed",
            )
        })?;
        let mut batch = vec![];
        let got = tokio::time::timeout(within, self.outbox.next_batch(&mut batch)).await;
        let answer = match got {
            Ok(true) => batch.into_iter().find_map(|o| match o {
                crate::outbox::Out::Msg(m) => Some((*m).clone()),
                _ => None,
            }),
            _ => None,
        };
        if let (Some(c), Some(kind), false) = (&self.meter, kind, over_quota) {
            c.op(kind, body_len);
            if answer.is_some() && matches!(kind, crate::meter::Op::Call | crate::meter::Op::Dht) {
                c.latency(started.elapsed());
            }
        }
        Ok(answer)
    }

    /// The HTTP answer, its body metered as the realm's egress.
    fn metered(&self, resp: Response) -> Response {
        use axum::body::HttpBody;
        if let (Some(c), Some(n)) = (&self.meter, resp.body().size_hint().exact()) {
            c.egress(n as usize);
        }
        resp
    }
}

/// Authenticates a bridge request and parses its JSON body (an empty body reads as `{}`). In a
/// realm this node has just started serving, the request waits (boundedly) until the node has
/// linked the realm's other nodes, as a WAMP session's WELCOME does.
async fn begin<T: serde::de::DeserializeOwned>(
    node: &Arc<Node>,
    realm: &str,
    headers: &HeaderMap,
    body: &[u8],
    hint: &str,
) -> Result<(BridgeSession, T), Response> {
    let session = BridgeSession::open(node, realm, headers)?;
    if let Some(g) = crate::mesh::of(node).and_then(|m| m.discovery_gate(realm)) {
        g.wait().await;
        // A reload during the wait may have revoked the key or replaced the realm's authority.
        let auth = node.auth();
        if auth.authenticator.is_revoked(&session.kid) || !auth.accepts(realm, &session.authority) {
            return Err(http_error(
                StatusCode::UNAUTHORIZED,
                errors::AUTHENTICATION_FAILED,
                "the key was revoked or no longer belongs to the realm",
            ));
        }
    }
    let body = if body.is_empty() { &b"{}"[..] } else { body };
    Ok((session, parse_json(body, hint)?))
}

impl Drop for BridgeSession {
    fn drop(&mut self) {
        let idle = {
            let mut core = self.realm.lock();
            core.leave(self.id);
            core.session_count() == 0
        };
        if !idle {
            // Others use the realm: it stays, and their leaving frees it.
            return;
        }
        // A request to a realm (or subrealm) no one else uses leaves nothing behind — after a
        // while, so that a client making requests in a row does not make the node announce
        // and withdraw the realm (DHT provider records) for each one.
        let node = Arc::downgrade(&self.node);
        let realm = Arc::downgrade(&self.realm);
        let linger =
            std::time::Duration::from_millis(self.node.config.limits.bridge_realm_linger_ms);
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            if let (Some(node), Some(realm)) = (node.upgrade(), realm.upgrade()) {
                node.drop_realm_if_idle(&realm);
            }
        });
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishBody {
    topic: String,
    #[serde(default)]
    args: Vec<serde_json::Value>,
    #[serde(default)]
    kwargs: serde_json::Map<String, serde_json::Value>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], hint: &str) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        http_error(
            StatusCode::BAD_REQUEST,
            errors::INVALID_ARGUMENT,
            format!("invalid JSON body ({e}); expected {hint}"),
        )
    })
}

pub(super) async fn publish(
    State(node): State<Arc<Node>>,
    Path(realm): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let hint = r#"{"topic": "...", "args": [...], "kwargs": {...}}"#;
    let answer = async {
        let (s, b): (_, PublishBody) = begin(&node, &realm, &headers, &body, hint).await?;
        let msg = Message::Publish {
            request: 1,
            options: dict! {"acknowledge" => true},
            topic: b.topic,
            payload: Payload::from_json(b.args, b.kwargs),
        };
        Ok(s.metered(
            match s.request(msg, body.len(), Duration::from_secs(5)).await? {
                Some(Message::Published { publication, .. }) => {
                    (StatusCode::OK, Json(json!({"publication": publication}))).into_response()
                }
                Some(Message::Error { error, payload, .. }) => {
                    wamp_error_response(&error, &payload)
                }
                _ => http_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    errors::NETWORK_FAILURE,
                    "no acknowledgement from the router",
                ),
            },
        ))
    };
    answer.await.unwrap_or_else(|r: Response| r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CallBody {
    #[serde(default)]
    args: Vec<serde_json::Value>,
    #[serde(default)]
    kwargs: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
pub(super) struct CallQuery {
    timeout_ms: Option<u64>,
}

pub(super) async fn call(
    State(node): State<Arc<Node>>,
    Path((realm, procedure)): Path<(String, String)>,
    Query(q): Query<CallQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let answer = async {
        let (s, b): (_, CallBody) = begin(
            &node,
            &realm,
            &headers,
            &body,
            r#"{"args": [...], "kwargs": {...}}"#,
        )
        .await?;
        // An HTTP request always ends: `timeout_ms` (or the node's call timeout) clamped to 1 ms–1 h.
        const BRIDGE_MAX_MS: u64 = 3_600_000;
        let timeout_ms = match q.timeout_ms.unwrap_or(node.config.limits.call_timeout_ms) {
            0 => BRIDGE_MAX_MS,
            t => t.min(BRIDGE_MAX_MS),
        };
        let msg = Message::Call {
            request: 1,
            options: dict! {"timeout" => timeout_ms},
            procedure,
            payload: Payload::from_json(b.args, b.kwargs),
        };
        Ok(s.metered(
            match s
                .request(
                    msg,
                    body.len(),
                    Duration::from_millis(timeout_ms.saturating_add(1000)),
                )
                .await?
            {
                Some(Message::Result { payload, .. }) => {
                    (StatusCode::OK, Json(payload.to_json())).into_response()
                }
                Some(Message::Error { error, payload, .. }) => {
                    wamp_error_response(&error, &payload)
                }
                _ => http_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    errors::CANCELED,
                    "the call did not complete in time",
                ),
            },
        ))
    };
    answer.await.unwrap_or_else(|r: Response| r)
}
