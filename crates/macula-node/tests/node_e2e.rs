//! A real node on loopback, driven by the Rust SDK and by raw sockets.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use macula_client::{
    dict, CallError, CallOptions, Client, ConnectOptions, Payload, Serializer, Value,
};
use macula_wamp::rawsocket::{FrameHeader, FrameKind, Handshake};
use macula_wamp::{errors, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn client_with(t: &TestNode, url: &str, serializer: Serializer) -> Client {
    let mut o = ConnectOptions::new(url, REALM, &t.admin_key);
    o.serializer = serializer;
    Client::connect_with(o).await.unwrap()
}

#[tokio::test]
async fn pubsub_and_rpc_work_over_every_transport_and_serializer() {
    let t = TestNode::start().await;
    let urls = [t.running.ws_url(), t.running.rawsocket_url()];
    for url in &urls {
        for ser in [Serializer::Json, Serializer::MsgPack, Serializer::Cbor] {
            let sub = client_with(&t, url, ser).await;
            let publ = client_with(&t, &urls[0], Serializer::MsgPack).await;
            let topic = "com.example.test.t";
            let mut events = sub.subscribe(topic).await.unwrap();
            publ.publish_with(
                topic,
                Payload::new(
                    vec![Value::Int(7), Value::Bin(vec![1, 2])],
                    dict! {"k" => "v"},
                ),
                dict! {"acknowledge" => true},
            )
            .await
            .unwrap();
            let e = within("event", events.next()).await.unwrap();
            assert_eq!(
                e.payload.args,
                vec![Value::Int(7), Value::Bin(vec![1, 2])],
                "{url} {ser:?}"
            );
            assert_eq!(e.payload.kwargs.get("k"), Some(&Value::from("v")));

            let _reg = sub
                .register("com.example.test.add", |inv| async move {
                    Ok(Payload::args(vec![Value::Int(
                        inv.payload.args.iter().filter_map(Value::as_i64).sum(),
                    )]))
                })
                .await
                .unwrap();
            let r = publ
                .call(
                    "com.example.test.add",
                    Payload::args(vec![Value::Int(2), Value::Int(3)]),
                )
                .await
                .unwrap();
            assert_eq!(r.args, vec![Value::Int(5)]);
            sub.close().await;
            publ.close().await;
        }
    }
}

#[tokio::test]
async fn bad_expired_and_revoked_keys_are_refused_and_revocation_closes_live_sessions() {
    let t = TestNode::start().await;
    let url = t.running.ws_url();
    let err = Client::connect(&url, REALM, "sk_live_garbage")
        .await
        .err()
        .unwrap();
    assert_eq!(err.uri(), Some(errors::AUTHENTICATION_FAILED), "{err}");
    // A key for another realm.
    t.dir.create_realm("com.example.other", None).unwrap();
    let (_, other) = t
        .dir
        .issue_key("com.example.other", "admin", "x", 3600, None)
        .unwrap();
    t.node().reload().unwrap();
    let err = Client::connect(&url, REALM, &other).await.err().unwrap();
    assert!(err.to_string().contains("not com.example.test"), "{err}");
    // Unknown realm.
    let err = Client::connect(&url, "com.nowhere", &t.admin_key)
        .await
        .err()
        .unwrap();
    assert_eq!(err.uri(), Some(errors::AUTHENTICATION_FAILED), "{err}");

    let (kid, key) = t.key("service_account");
    let mut o = ConnectOptions::new(&url, REALM, &key);
    o.reconnect = false;
    let live = Client::connect_with(o).await.unwrap();
    assert!(live.session_id().is_some());
    t.dir.revoke_key(&kid).unwrap();
    // The node's reloader picks the change up; the live session is closed.
    eventually("revoked session closed", || live.session_id().is_none()).await;
    let err = Client::connect(&url, REALM, &key).await.err().unwrap();
    assert!(err.to_string().contains("revoked"), "{err}");
}

#[tokio::test]
async fn cryptosign_clients_prove_possession_of_their_key() {
    let t = TestNode::start().await;
    let secret = [7u8; 32];
    let pk = ed25519_dalek::SigningKey::from_bytes(&secret)
        .verifying_key()
        .to_bytes();
    let (_, credential) = t
        .dir
        .issue_key(REALM, "admin", "device", 3600, Some(pk))
        .unwrap();
    let mut o = ConnectOptions::new(&t.running.ws_url(), REALM, "");
    o.auth = macula_client::Auth::Cryptosign {
        credential: credential.clone(),
        secret,
    };
    let c = Client::connect_with(o.clone()).await.unwrap();
    assert!(c.session_id().is_some());
    // The wrong secret fails; the bound key is useless as a bearer ticket.
    o.auth = macula_client::Auth::Cryptosign {
        credential: credential.clone(),
        secret: [8u8; 32],
    };
    assert!(Client::connect_with(o).await.is_err());
    let err = Client::connect(&t.running.ws_url(), REALM, &credential)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("Cryptosign"), "{err}");
}

#[tokio::test]
async fn denied_operations_get_not_authorized_naming_the_permission() {
    let t = TestNode::start().await;
    let (_, key) = t.key("service_account");
    let c = Client::connect(&t.running.ws_url(), REALM, &key)
        .await
        .unwrap();
    let err = c
        .publish_with(
            "org.elsewhere.t",
            Payload::default(),
            dict! {"acknowledge" => true},
        )
        .await
        .unwrap_err();
    assert_eq!(err.uri(), Some(errors::NOT_AUTHORIZED));
    assert!(
        err.to_string().contains("pubsub:publish:org.elsewhere.t"),
        "{err}"
    );
    let err = c
        .call("wamp.session.count", Payload::default())
        .await
        .unwrap_err();
    assert_eq!(err.uri(), Some(errors::NOT_AUTHORIZED));
    let ok = c
        .publish_with(
            "com.example.test.ok",
            Payload::default(),
            dict! {"acknowledge" => true},
        )
        .await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn progressive_results_cancel_and_timeout_over_the_wire() {
    let t = TestNode::start().await;
    let callee = t.client().await;
    let caller = t.client().await;
    callee
        .register("com.example.test.count", |inv| async move {
            for i in 1..=3 {
                inv.progress(Payload::args(vec![Value::Int(i)]));
            }
            Ok(Payload::args(vec!["done".into()]))
        })
        .await
        .unwrap();
    callee
        .register("com.example.test.forever", |_inv| async move {
            std::future::pending::<()>().await;
            Err(CallError::new("never", ""))
        })
        .await
        .unwrap();
    let mut s = caller
        .call_stream(
            "com.example.test.count",
            Payload::default(),
            CallOptions {
                receive_progress: true,
                ..Default::default()
            },
        )
        .unwrap();
    let mut got = vec![];
    while let Some(a) = within("answer", s.next()).await {
        let a = a.unwrap();
        got.push((a.progress, a.payload.args[0].clone()));
    }
    assert_eq!(
        got,
        vec![
            (true, Value::Int(1)),
            (true, Value::Int(2)),
            (true, Value::Int(3)),
            (false, Value::from("done"))
        ]
    );
    let err = caller
        .call_with(
            "com.example.test.forever",
            Payload::default(),
            CallOptions {
                timeout: Some(Duration::from_millis(100)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.uri(), Some(errors::CANCELED));
    let mut s = caller
        .call_stream(
            "com.example.test.forever",
            Payload::default(),
            CallOptions::default(),
        )
        .unwrap();
    s.cancel("killnowait").unwrap();
    let err = within("cancel", s.next()).await.unwrap().unwrap_err();
    assert_eq!(err.uri(), Some(errors::CANCELED));
}

#[tokio::test]
async fn client_reconnects_and_restores_subscriptions_and_registrations() {
    let t = TestNode::start().await;
    let c = t.client().await;
    let other = t.client().await;
    let mut events = c.subscribe("com.example.test.r").await.unwrap();
    c.register(
        "com.example.test.echo",
        |inv| async move { Ok(inv.payload) },
    )
    .await
    .unwrap();
    let first = c.session_id().unwrap();
    // Kick every session off the node; clients come back by themselves.
    t.node()
        .close_all_sessions(macula_router::auth::abort(errors::SYSTEM_SHUTDOWN, "test"));
    eventually("client reconnected", || {
        c.session_id().is_some_and(|s| s != first)
    })
    .await;
    other.wait_connected().await;
    // Registration is restored: the call works once the router has it.
    let mut answer = None;
    for _ in 0..200 {
        match other
            .call("com.example.test.echo", Payload::args(vec![Value::Int(1)]))
            .await
        {
            Ok(p) => {
                answer = Some(p);
                break;
            }
            Err(e)
                if e.uri() == Some(errors::NO_SUCH_PROCEDURE)
                    || e == macula_client::Error::ConnectionLost =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(answer.unwrap().args, vec![Value::Int(1)]);
    other
        .publish_with(
            "com.example.test.r",
            Payload::args(vec![Value::Int(9)]),
            dict! {"acknowledge" => true},
        )
        .await
        .unwrap();
    let e = within("event after reconnect", events.next())
        .await
        .unwrap();
    assert_eq!(e.payload.args, vec![Value::Int(9)]);
}

/// A RawSocket client speaking raw frames.
struct RawClient {
    s: tokio::net::TcpStream,
}

impl RawClient {
    async fn join(t: &TestNode) -> RawClient {
        Self::join_as(t, &t.admin_key).await
    }

    async fn join_as(t: &TestNode, key: &str) -> RawClient {
        let mut s = tokio::net::TcpStream::connect(t.running.rawsocket_addr)
            .await
            .unwrap();
        s.write_all(&Handshake::encode(1 << 24, macula_wamp::Serializer::Json))
            .await
            .unwrap();
        let mut r = [0u8; 4];
        s.read_exact(&mut r).await.unwrap();
        let mut c = RawClient { s };
        c.send(&format!(
            r#"[1,"{REALM}",{{"authmethods":["ticket"],"roles":{{"subscriber":{{}}}}}}]"#
        ))
        .await;
        assert!(c.recv().await.unwrap().starts_with("[4,"));
        c.send(&format!(r#"[5,"{key}",{{}}]"#)).await;
        assert!(c.recv().await.unwrap().starts_with("[2,"));
        c
    }
    async fn send(&mut self, text: &str) {
        self.send_bytes(text.as_bytes()).await
    }
    async fn send_bytes(&mut self, b: &[u8]) {
        self.s
            .write_all(&FrameHeader::encode(FrameKind::Message, b.len()))
            .await
            .unwrap();
        self.s.write_all(b).await.unwrap();
    }
    async fn recv(&mut self) -> Option<String> {
        let mut h = [0u8; 4];
        within("frame", self.s.read_exact(&mut h)).await.ok()?;
        let h = FrameHeader::parse(h).ok()?;
        let mut b = vec![0u8; h.len];
        self.s.read_exact(&mut b).await.ok()?;
        Some(String::from_utf8_lossy(&b).into_owned())
    }
}

/// The reason of an ABORT or of a router-initiated GOODBYE.
fn abort_reason(frame: &str) -> Option<String> {
    match macula_wamp::Serializer::Json
        .decode(frame.as_bytes())
        .ok()?
    {
        Message::Abort { reason, .. } | Message::Goodbye { reason, .. } => Some(reason),
        _ => None,
    }
}

#[tokio::test]
async fn malformed_and_oversized_input_aborts_only_the_offender() {
    let t = TestNode::start_with(|c| c.limits.max_message_size = 4096).await;
    let bystander = t.client().await;
    let mut events = bystander.subscribe("com.example.test.b").await.unwrap();
    for garbage in [
        &b"not json"[..],
        b"[16, \"x\"]",
        b"[999]",
        b"{}",
        b"[2, 1, {}]",
        b"\xff\xfe",
    ] {
        let mut c = RawClient::join(&t).await;
        c.send_bytes(garbage).await;
        let reply = c.recv().await.expect("an ABORT before close");
        assert_eq!(
            abort_reason(&reply).as_deref(),
            Some(errors::PROTOCOL_VIOLATION),
            "{garbage:?} → {reply}"
        );
        assert!(c.recv().await.is_none(), "connection closed after ABORT");
    }
    let mut c = RawClient::join(&t).await;
    let big = format!(
        r#"[16,1,{{}},"com.example.test.b",["{}"]]"#,
        "x".repeat(10_000)
    );
    c.send(&big).await;
    let reply = c.recv().await.unwrap();
    assert_eq!(
        abort_reason(&reply).as_deref(),
        Some(errors::PROTOCOL_VIOLATION)
    );
    assert!(reply.contains("limit"), "{reply}");
    // The bystander is unaffected.
    let p = t.client().await;
    p.publish_with(
        "com.example.test.b",
        Payload::args(vec![Value::Int(1)]),
        dict! {"acknowledge" => true},
    )
    .await
    .unwrap();
    assert_eq!(
        within("bystander event", events.next())
            .await
            .unwrap()
            .payload
            .args,
        vec![Value::Int(1)]
    );
    let metrics = t.http("GET", "/metrics", None, "").await.1;
    assert!(
        metrics.contains("macula_errors_total{kind=\"decode\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("macula_errors_total{kind=\"oversized\"} 0"),
        "oversized counted"
    );
}

#[tokio::test]
async fn flooding_session_is_closed_with_rate_limited() {
    let t = TestNode::start_with(|c| {
        c.limits.rate_limit_per_second = 50;
        c.limits.rate_limit_burst = 50;
    })
    .await;
    let mut c = RawClient::join(&t).await;
    let mut reason = None;
    for i in 0..200 {
        c.send(&format!(r#"[16,{},{{}},"com.example.test.f",[]]"#, i + 1))
            .await;
    }
    while let Some(f) = c.recv().await {
        if let Some(r) = abort_reason(&f) {
            reason = Some(r);
            break;
        }
    }
    assert_eq!(reason.as_deref(), Some(errors::RATE_LIMITED));
    let ok = t.client().await;
    assert!(ok
        .call("wamp.session.count", Payload::default())
        .await
        .is_ok());
}

#[tokio::test]
async fn slow_subscribers_do_not_stall_publishers_and_drops_are_counted() {
    let t = TestNode::start_with(|c| {
        c.limits.outbox_capacity = 16;
        c.limits.rate_limit_per_second = 0;
    })
    .await;
    // A subscriber that never reads its socket.
    let mut slow = RawClient::join(&t).await;
    slow.send(r#"[32,1,{},"com.example.test.s"]"#).await;
    assert!(slow.recv().await.unwrap().starts_with("[33,"));
    let publ = t.client().await;
    let big = "y".repeat(1000);
    for _ in 0..20_000 {
        publ.publish(
            "com.example.test.s",
            Payload::args(vec![Value::Str(big.clone())]),
        )
        .await
        .unwrap();
    }
    // The publisher is still served promptly.
    publ.publish_with(
        "com.example.test.s",
        Payload::default(),
        dict! {"acknowledge" => true},
    )
    .await
    .unwrap();
    let m = t.node().metrics.clone();
    eventually("drops counted", || {
        m.queue_dropped.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
}

#[tokio::test]
async fn http_bridge_publishes_calls_and_maps_errors_to_statuses() {
    let t = TestNode::start().await;
    let sub = t.client().await;
    let mut events = sub.subscribe("com.example.test.h").await.unwrap();
    sub.register("com.example.test.twice", |inv| async move {
        let n = inv
            .payload
            .args
            .first()
            .and_then(Value::as_i64)
            .unwrap_or(0);
        Ok(Payload::args(vec![Value::Int(n * 2)]))
    })
    .await
    .unwrap();
    let key = t.admin_key.clone();
    let (st, body) = t
        .http(
            "POST",
            "/v1/realms/com.example.test/publish",
            Some(&key),
            r#"{"topic":"com.example.test.h","args":[1,"a"]}"#,
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("publication"));
    assert_eq!(
        within("bridge event", events.next())
            .await
            .unwrap()
            .payload
            .args,
        vec![Value::Int(1), Value::from("a")]
    );
    let (st, body) = t
        .http(
            "POST",
            "/v1/realms/com.example.test/call/com.example.test.twice",
            Some(&key),
            r#"{"args":[21]}"#,
        )
        .await;
    assert_eq!((st, body.as_str()), (200, r#"{"args":[42],"kwargs":{}}"#));
    let (st, _) = t
        .http(
            "POST",
            "/v1/realms/com.example.test/call/com.example.test.none",
            Some(&key),
            "",
        )
        .await;
    assert_eq!(st, 404);
    let (st, body) = t
        .http(
            "POST",
            "/v1/realms/com.example.test/publish",
            None,
            r#"{"topic":"com.example.test.h"}"#,
        )
        .await;
    assert_eq!(st, 401, "{body}");
    let (_, sa) = t.key("service_account");
    let (st, body) = t
        .http(
            "POST",
            "/v1/realms/com.example.test/publish",
            Some(&sa),
            r#"{"topic":"org.x.y"}"#,
        )
        .await;
    assert_eq!(st, 403);
    assert!(
        body.contains("wamp.error.not_authorized") && body.contains("pubsub:publish:org.x.y"),
        "{body}"
    );
    let (st, body) = t
        .http(
            "POST",
            "/v1/realms/com.example.test/publish",
            Some(&key),
            "{not json",
        )
        .await;
    assert_eq!(st, 400, "{body}");
    let (st, _) = t
        .http("POST", "/v1/realms/Bad_Realm/publish", Some(&key), "{}")
        .await;
    assert_eq!(st, 400);
    assert_eq!(t.http("GET", "/healthz", None, "").await.0, 200);
    assert_eq!(t.http("GET", "/readyz", None, "").await.0, 200);
    let metrics = t.http("GET", "/metrics", None, "").await.1;
    assert!(metrics.contains("macula_messages_in_total{kind=\"publish\"}"));
    assert!(metrics.contains("macula_realm_sessions{realm=\"com.example.test\"}"));
}

#[tokio::test]
async fn websocket_without_a_wamp_subprotocol_is_refused() {
    let t = TestNode::start().await;
    let (st, body) = {
        let mut s = tokio::net::TcpStream::connect(t.running.http_addr)
            .await
            .unwrap();
        let req = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = vec![0u8; 4096];
        let n = within("reply", s.read(&mut out)).await.unwrap();
        let text = String::from_utf8_lossy(&out[..n]).into_owned();
        (
            text.split_whitespace().nth(1).unwrap_or("").to_owned(),
            text,
        )
    };
    assert_eq!(st, "400", "{body}");
    assert!(body.contains("wamp.2.json"));
}

#[tokio::test]
async fn roles_marked_subrealms_may_join_subrealms_and_others_may_not() {
    let t = TestNode::start().await;
    let url = t.running.ws_url();
    // The default policy's admin role extends to subrealms; service_account does not.
    let sub = Client::connect(&url, "com.example.test.shop", &t.admin_key)
        .await
        .unwrap();
    assert!(sub.session_id().is_some());
    let (_, sa) = t.key("service_account");
    let err = Client::connect(&url, "com.example.test.shop", &sa)
        .await
        .err()
        .unwrap();
    assert_eq!(err.uri(), Some(errors::AUTHORIZATION_FAILED), "{err}");
    // Subrealms are isolated from their parent: an event in the parent does not reach them.
    let mut in_sub = sub.subscribe("com.example.test.x").await.unwrap();
    let parent = t.client().await;
    parent
        .publish_with(
            "com.example.test.x",
            Payload::args(vec![Value::Int(1)]),
            dict! {"acknowledge" => true},
        )
        .await
        .unwrap();
    sub.publish_with(
        "com.example.test.x",
        Payload::args(vec![Value::Int(2)]),
        dict! {"acknowledge" => true, "exclude_me" => false},
    )
    .await
    .unwrap();
    assert_eq!(
        within("own realm event", in_sub.next())
            .await
            .unwrap()
            .payload
            .args,
        vec![Value::Int(2)]
    );
}

#[tokio::test]
async fn a_parent_key_does_not_enter_a_subrealm_with_its_own_policy_through_a_same_named_role() {
    let t = TestNode::start().await;
    // com.example.test.shop has its own policy, which also defines service_account.
    t.dir.create_realm("com.example.test.shop", None).unwrap();
    t.node().reload().unwrap();
    let (_, parent_sa) = t.key("service_account"); // subrealms: false in the parent policy
    let err = Client::connect(&t.running.ws_url(), "com.example.test.shop", &parent_sa)
        .await
        .err()
        .unwrap();
    assert_eq!(err.uri(), Some(errors::AUTHORIZATION_FAILED), "{err}");
}

#[tokio::test]
async fn a_revoked_session_that_stops_reading_is_still_removed_at_once() {
    let t = TestNode::start().await;
    let (kid, key) = t.key("admin");
    // A raw client that joins, registers and subscribes, then never reads nor writes again.
    let mut zombie = RawClient::join_as(&t, &key).await;
    zombie.send(r#"[64,1,{},"com.example.test.zombie"]"#).await;
    zombie.send(r#"[32,2,{},"com.example.test.flood"]"#).await;
    let caller = t.client().await;
    // The registration and the subscription exist once the realm counts them.
    let node = t.node().clone();
    eventually("zombie registered and subscribed", || {
        node.realm_handles().iter().any(|r| {
            let (subs, regs, _) = r.lock().stats();
            subs >= 1 && regs >= 1
        })
    })
    .await;
    let mut pending = caller
        .call_stream(
            "com.example.test.zombie",
            Payload::default(),
            CallOptions::default(),
        )
        .unwrap();
    // Flood its subscription (64 MB) so that the node's writer for it is stuck on a full socket.
    let big = "z".repeat(16 * 1024);
    for _ in 0..4_000 {
        caller
            .publish(
                "com.example.test.flood",
                Payload::args(vec![Value::Str(big.clone())]),
            )
            .await
            .unwrap();
    }
    caller
        .publish_with(
            "com.example.test.flood",
            Payload::default(),
            dict! {"acknowledge" => true},
        )
        .await
        .unwrap();
    t.dir.revoke_key(&kid).unwrap();
    // The revoked session leaves the realm without the client doing anything: its call fails.
    let err = within("call fails", pending.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.uri(), Some(errors::CANCELED), "{err}");
    let after = caller
        .call("com.example.test.zombie", Payload::default())
        .await
        .unwrap_err();
    assert_eq!(after.uri(), Some(errors::NO_SUCH_PROCEDURE));
    drop(zombie);
}

#[tokio::test]
async fn a_client_whose_key_is_revoked_gives_up_and_ends_its_streams() {
    let t = TestNode::start().await;
    let (kid, key) = t.key("admin");
    let c = Client::connect(&t.running.ws_url(), REALM, &key)
        .await
        .unwrap();
    let mut events = c.subscribe("com.example.test.g").await.unwrap();
    t.dir.revoke_key(&kid).unwrap();
    // The router says GOODBYE; the client tries to come back, is refused, and gives up: the
    // stream ends instead of waiting forever, and new requests fail at once.
    assert!(within("stream ends", events.next()).await.is_none());
    let err = c
        .call("com.example.test.x", Payload::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            macula_client::Error::Closed | macula_client::Error::ConnectionLost
        ),
        "{err}"
    );
}

#[tokio::test]
async fn realm_state_is_forgotten_when_its_last_session_leaves() {
    let t = TestNode::start().await;
    let c = Client::connect(&t.running.ws_url(), "com.example.test.tmp", &t.admin_key)
        .await
        .unwrap();
    assert!(t
        .node()
        .realm_handles()
        .iter()
        .any(|r| r.name == "com.example.test.tmp"));
    c.close().await;
    let node = t.node().clone();
    eventually("realm forgotten", || {
        !node
            .realm_handles()
            .iter()
            .any(|r| r.name == "com.example.test.tmp")
    })
    .await;
}
