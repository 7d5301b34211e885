//! The HTTP side of a node: WebSocket upgrade (`/ws`, `/`), the HTTP bridge (`/v1/realms/...`,
//! in `bridge.rs`), deploy records (`/v1/realms/{realm}/workloads`, and as plain REST
//! `/payloads` and `/jobs`, in `workloads.rs`), health
//! (`/healthz`, `/readyz`), `/metrics` and `/v1/mesh`.

// Handlers return `Result<_, Response>` so that every early exit is a finished HTTP answer; the
// error path is cold, so the large `Err` is not worth boxing.
#![allow(clippy::result_large_err)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{FutureExt, SinkExt, StreamExt};
use macula_router::SessionInfo;
use macula_wamp::{dict, errors, Dict, Message, Payload, Serializer, Value};
use serde::Deserialize;
use serde_json::json;

use crate::confdir::now_secs;
use crate::node::Node;
use crate::outbox::Outbox;
use crate::session::{encode_out, Connection, Flow};

mod bridge;
mod kube;
mod workloads;
use bridge::{call, publish};
use workloads::{
    create_job, create_payload, delete_job, delete_payload, get_job, get_payload, history,
    list_jobs, list_payloads, list_records, logs, post_record, replace_job, replace_payload,
    replicas,
};

pub fn router(node: Arc<Node>, ctrl: Arc<crate::workloads::Controller>) -> Router {
    let body_limit = node.config.limits.max_http_body;
    Router::new()
        .route("/", get(ws_upgrade))
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/mesh", get(mesh_status))
        .route("/v1/realms/{realm}/publish", post(publish))
        .route("/v1/realms/{realm}/call/{procedure}", post(call))
        .route(
            "/v1/realms/{realm}/workloads",
            get(list_records).post(post_record),
        )
        .route("/v1/realms/{realm}/replicas", get(replicas))
        .route(
            "/v1/realms/{realm}/payloads",
            get(list_payloads).post(create_payload),
        )
        .route(
            "/v1/realms/{realm}/payloads/{name}",
            get(get_payload).put(replace_payload).delete(delete_payload),
        )
        .route("/v1/realms/{realm}/jobs", get(list_jobs).post(create_job))
        .route(
            "/v1/realms/{realm}/jobs/{name}",
            get(get_job).put(replace_job).delete(delete_job),
        )
        .route("/v1/realms/{realm}/workloads/{name}/logs", get(logs))
        .route("/v1/realms/{realm}/workloads/{name}/history", get(history))
        // The Kubernetes-style API (kube.rs).
        .route("/version", get(kube::version))
        .route("/openapi/v2", get(kube::openapi_v2))
        .route("/openapi/v3", get(kube::openapi_root))
        .route("/openapi/v3/api/v1", get(kube::openapi_core))
        .route("/openapi/v3/apis/{group}/v1", get(kube::openapi_group))
        .route("/api", get(kube::api))
        .route("/api/v1", get(kube::core_v1))
        .route("/apis", get(kube::apis))
        .route("/apis/{group}", get(kube::api_group))
        .route("/apis/{group}/v1", get(kube::group_v1))
        .route("/api/v1/namespaces/{ns}", get(kube::namespace))
        .route("/api/v1/namespaces/{ns}/pods", get(kube::list_pods))
        .route("/api/v1/namespaces/{ns}/pods/{pod}", get(kube::get_pod))
        .route("/api/v1/namespaces/{ns}/pods/{pod}/log", get(kube::pod_log))
        .route(
            "/apis/{group}/v1/namespaces/{ns}/{resource}",
            get(kube::list).post(kube::create),
        )
        .route(
            "/apis/{group}/v1/namespaces/{ns}/{resource}/{name}",
            get(kube::get_one)
                .put(kube::replace)
                .patch(kube::patch)
                .delete(kube::delete),
        )
        .route(
            "/apis/{group}/v1/namespaces/{ns}/{resource}/{name}/scale",
            get(kube::get_scale)
                .put(kube::set_scale)
                .patch(kube::set_scale),
        )
        .layer(axum::Extension(ctrl))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(node)
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let text = crate::exposition::render(&node);
    (
        [(header::CONTENT_TYPE, crate::exposition::CONTENT_TYPE)],
        text,
    )
}

/// `GET /v1/mesh`: this node's peer id, addresses, peers (address, latency), and per-realm
/// interest tables (what `macula mesh status` prints).
async fn mesh_status(State(node): State<Arc<Node>>) -> Response {
    let Some(m) = crate::mesh::of(&node) else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"error": {"code": "mesh_off", "message": "the mesh is off on this node (mesh.enabled: false)"}})),
        )
            .into_response();
    };
    let realms: Vec<serde_json::Value> = node
        .realm_handles()
        .iter()
        .map(|r| {
            let core = r.lock();
            let (subs, regs, calls) = core.stats();
            serde_json::json!({
                "realm": r.name,
                "sessions": core.session_count(),
                "links": core.link_count() - usize::from(r.service.is_some()),
                "subscriptions": subs,
                "registrations": regs,
                "calls_in_flight": calls,
            })
        })
        .collect();
    let stats = m.handle.stats();
    let g = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
    let mut revoked: Vec<String> = m
        .handle
        .trust()
        .revocations()
        .iter()
        .map(|r| r.peer.to_string())
        .collect();
    revoked.sort();
    let own = m.handle.own_cert();
    let body = serde_json::json!({
        "peer_id": m.handle.peer_id().to_string(),
        "listen": m.handle.listen_addrs().await.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "peers": m.handle.peer_status(),
        "realms": realms,
        "realm_states": m.states.lock().len(),
        "frames": {
            "in": g(&stats.frames_in), "out": g(&stats.frames_out),
            "dropped": g(&stats.frames_dropped), "malformed": g(&stats.frames_malformed),
            "rejected": g(&m.counters.rejected), "unknown_realm": g(&m.counters.unknown_realm),
        },
        "peers_rejected": g(&stats.peers_rejected),
        "peers_cut_off": g(&stats.peers_cut_off),
        "dht_refused": g(&stats.dht_refused),
        "congestion_events": g(&stats.congestion_events),
        "cert": {
            "issued_at": crate::confdir::rfc3339(own.issued_at),
            "not_after": crate::confdir::rfc3339(own.not_after),
        },
        "revoked_nodes": revoked,
    });
    axum::Json(body).into_response()
}

async fn ws_upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let protocols = Serializer::ALL.map(|s| s.subprotocol());
    let ws = ws.protocols(protocols);
    let Some(serializer) = ws
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .and_then(Serializer::from_subprotocol)
    else {
        return (
            StatusCode::BAD_REQUEST,
            "WAMP over WebSocket needs a subprotocol: wamp.2.msgpack, wamp.2.cbor or wamp.2.json\n",
        )
            .into_response();
    };
    let limit = node.config.limits.max_message_size;
    // tungstenite reads in chunks of `read_buffer_size` (128 KiB by default, allocated per
    // connection): 8 KiB keeps idle sessions small; larger messages are still assembled.
    ws.max_message_size(limit + 64 * 1024)
        .max_frame_size(limit + 64 * 1024)
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| run_ws(socket, node, serializer, peer.to_string()))
}

async fn run_ws(socket: WebSocket, node: Arc<Node>, serializer: Serializer, peer: String) {
    let (mut sink, mut stream) = socket.split();
    let mut conn = Connection::new(node.clone(), serializer, "websocket", peer);
    let outbox = conn.outbox();
    let writer_node = node.clone();
    let mut writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        while outbox.next_batch(&mut batch).await {
            for item in batch.drain(..) {
                let mut buf = Vec::with_capacity(128);
                if encode_out(&item, serializer, &writer_node, outbox.meter(), &mut buf) {
                    let frame = if serializer.is_text() {
                        match String::from_utf8(buf) {
                            Ok(s) => WsMessage::Text(s.into()),
                            Err(_) => continue,
                        }
                    } else {
                        WsMessage::Binary(buf.into())
                    };
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let timeout = Duration::from_millis(node.config.limits.handshake_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let closed = conn.outbox();
    // A finished JoinHandle must not be polled again.
    let mut writer_done = false;
    loop {
        // Take what is already received without waiting; before waiting, flush staged deliveries.
        let next = match stream.next().now_or_never() {
            Some(m) => m,
            None => {
                conn.flush();
                tokio::select! {
                    m = stream.next() => m,
                    _ = &mut writer => {
                        writer_done = true;
                        break;
                    }
                    _ = closed.closed() => break,
                    _ = tokio::time::sleep_until(deadline), if !conn.is_joined() => {
                        conn.outbox().close_with(macula_router::auth::abort(errors::PROTOCOL_VIOLATION, "no WELCOME within the handshake timeout"));
                        break;
                    }
                }
            }
        };
        let flow = match next {
            Some(Ok(WsMessage::Binary(b))) => conn.on_frame(&b),
            Some(Ok(WsMessage::Text(t))) => conn.on_frame(t.as_bytes()),
            Some(Ok(WsMessage::Close(_))) | None => break,
            Some(Ok(_)) => Flow::Continue,
            Some(Err(e)) => {
                let msg = e.to_string();
                if msg.contains("too long") || msg.contains("size") {
                    conn.refuse_oversized(usize::MAX);
                }
                break;
            }
        };
        if flow == Flow::Close {
            break;
        }
        if conn.should_flush() {
            conn.flush();
        }
        conn.mesh_backpressure().await;
    }
    conn.finish();
    // Give the writer a moment to deliver the final GOODBYE/ABORT; a client that does not read
    // must not keep the task (and its memory) alive.
    if !writer_done
        && tokio::time::timeout(Duration::from_secs(5), &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
}
