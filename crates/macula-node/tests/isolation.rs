//! Tenant isolation at the node, over real sockets: what a key is bound to (one registration of
//! one realm), strict key decoding, and expiry of live sessions.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use macula_client::{Client, ConnectOptions};
use macula_wamp::errors;

fn opts(url: &str, realm: &str, key: &str) -> ConnectOptions {
    let mut o = ConnectOptions::new(url, realm, key);
    o.reconnect = false;
    o
}

/// A parent registered after (and apart from) a realm does not reach it: its admin key, whose
/// role extends to subrealms, is refused there over WAMP and over the HTTP bridge, and cannot
/// even subscribe by prefix to the realm's events.
#[tokio::test]
async fn a_parent_authority_does_not_reach_a_realm_registered_apart() {
    let t = TestNode::start().await;
    let url = t.running.ws_url();
    // `com.example` appears after `com.example.test` (which has its own authority): another
    // registration, as if another account had registered the free parent.
    t.dir.create_realm("com.example", None).unwrap();
    let (_, intruder) = t
        .dir
        .issue_key("com.example", "admin", "intruder", 3600, None)
        .unwrap();
    t.node().reload().unwrap();
    // The parent's key works in the parent and in its own unregistered subrealms...
    Client::connect_with(opts(&url, "com.example", &intruder))
        .await
        .expect("the parent's key works in the parent");
    Client::connect_with(opts(&url, "com.example.free", &intruder))
        .await
        .expect("and in the parent's unregistered subrealms");
    // ...but not in the realm registered apart.
    let err = Client::connect_with(opts(&url, REALM, &intruder))
        .await
        .err()
        .expect("the parent's key is refused in a realm registered apart");
    assert_eq!(err.uri(), Some(errors::AUTHENTICATION_FAILED), "{err}");
    assert!(err.to_string().contains("current registration"), "{err}");
    // Nor in that realm's subrealms.
    assert!(
        Client::connect_with(opts(&url, "com.example.test.sub", &intruder))
            .await
            .is_err()
    );
    // The HTTP bridge applies the same rule.
    let body = r#"{"topic": "com.example.test.orders", "args": ["forged"]}"#;
    let (status, text) = t
        .http(
            "POST",
            "/v1/realms/com.example.test/publish",
            Some(&intruder),
            body,
        )
        .await;
    assert_eq!(status, 401, "{text}");
    // The owner's own key still works, and a subrealm the owner creates later keeps taking it.
    Client::connect_with(opts(&url, REALM, &t.admin_key))
        .await
        .expect("the owner's key works");
    t.dir.create_realm("com.example.test.eu", None).unwrap();
    t.node().reload().unwrap();
    Client::connect_with(opts(&url, "com.example.test.eu", &t.admin_key))
        .await
        .expect("the same owner's subrealm lists the parent's authority");
}

/// Any change to a key's string is refused: a character appended, removed or changed.
#[tokio::test]
async fn a_key_with_a_character_appended_is_refused() {
    let t = TestNode::start().await;
    let url = t.running.ws_url();
    for changed in [
        format!("{}A", t.admin_key),
        format!("{}AAAA", t.admin_key),
        format!("{}Q", t.admin_key),
        t.admin_key[..t.admin_key.len() - 1].to_owned(),
    ] {
        let err = Client::connect_with(opts(&url, REALM, &changed))
            .await
            .err()
            .expect("a changed key is refused");
        assert_eq!(err.uri(), Some(errors::AUTHENTICATION_FAILED), "{err}");
        let (status, _) = t
            .http(
                "POST",
                &format!("/v1/realms/{REALM}/publish"),
                Some(&changed),
                r#"{"topic": "com.example.test.t"}"#,
            )
            .await;
        assert_eq!(status, 401);
    }
    // The key itself still works (the refusals above are about the change, not the key).
    Client::connect_with(opts(&url, REALM, &t.admin_key))
        .await
        .unwrap();
}

/// A live session ends when its key expires, with GOODBYE naming the reason, as revocation does.
#[tokio::test]
async fn a_session_is_closed_when_its_key_expires() {
    let t = TestNode::start().await;
    let url = t.running.ws_url();
    let (_, key) = t
        .dir
        .issue_key(REALM, "service_account", "short", 2, None)
        .unwrap();
    let issued = Instant::now();
    let c = Client::connect_with(opts(&url, REALM, &key)).await.unwrap();
    let mut events = c.subscribe("com.example.test.t").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(6), events.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "the session is closed when its key expires"
    );
    assert!(issued.elapsed() >= Duration::from_secs(1));
    assert!(c.session_id().is_none());
    let err = Client::connect_with(opts(&url, REALM, &key))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("expired"), "{err}");
}

/// A revocation (or re-registration) installed between a client's authentication and its
/// WELCOME: the client gets ABORT and no WELCOME, so it never sees a session open and close in one
/// breath (clients such as Autobahn take a GOODBYE that close to WELCOME as a protocol error).
#[tokio::test]
async fn credentials_changed_during_the_handshake_get_abort_not_welcome() {
    let t = TestNode::start().await;
    let (kid, _) = t.key("service_account");
    let authority = *t.node().auth().authorities.get(REALM).unwrap();
    let identity = |kid: &str, authority: [u8; 32]| macula_router::auth::Identity {
        realm: REALM.into(),
        key_realm: REALM.into(),
        role: "service_account".into(),
        kid: kid.into(),
        name: "test".into(),
        method: "ticket",
        expires_at: 0,
        authority,
        proof: None,
    };
    let outbox = || {
        macula_node::outbox::Outbox::new(16, 1 << 20, Default::default(), t.node().metrics.clone())
    };
    // Still valid: joined.
    let id = t
        .node()
        .join_session(&identity(&kid, authority), outbox(), || 7)
        .expect("a valid identity joins");
    assert_eq!(id, 7);
    // Revoked after admission: refused before anything is sent.
    t.dir.revoke_key(&kid).unwrap();
    t.node().reload().unwrap();
    for (who, authority) in [(kid.as_str(), authority), (t.admin_kid.as_str(), [9; 32])] {
        let err = t
            .node()
            .join_session(&identity(who, authority), outbox(), || {
                panic!("no WELCOME for {who}")
            })
            .expect_err("refused");
        match err {
            macula_wamp::Message::Abort { reason, .. } => {
                assert_eq!(reason, errors::AUTHENTICATION_FAILED)
            }
            other => panic!("expected ABORT, got {other:?}"),
        }
    }
}

/// A session cannot pile up calls without bound (each holds router memory until answered):
/// past `limits.max_calls_per_session` it gets `macula.error.limit_exceeded`, and once answers
/// come it may call again.
#[tokio::test]
async fn calls_in_flight_per_session_are_capped() {
    let t = TestNode::start_with(|c| c.limits.max_calls_per_session = 3).await;
    let url = t.running.ws_url();
    let callee = Client::connect_with(opts(&url, REALM, &t.admin_key))
        .await
        .unwrap();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let _reg = callee
        .register("com.example.test.slow", move |_| {
            let mut rx = release_rx.clone();
            async move {
                let _ = rx.wait_for(|go| *go).await;
                Ok(macula_client::Payload::default())
            }
        })
        .await
        .unwrap();
    let caller = std::sync::Arc::new(
        Client::connect_with(opts(&url, REALM, &t.admin_key))
            .await
            .unwrap(),
    );
    let mut pending = vec![];
    for _ in 0..3 {
        let c = caller.clone();
        pending.push(tokio::spawn(async move {
            c.call("com.example.test.slow", macula_client::Payload::default())
                .await
        }));
    }
    // The three reach the callee's node before the fourth is refused.
    eventually("three calls in flight", || {
        t.node()
            .realm_handle(REALM)
            .is_some_and(|r| r.lock().stats().2 == 3)
    })
    .await;
    let err = caller
        .call("com.example.test.slow", macula_client::Payload::default())
        .await
        .expect_err("the fourth call is refused");
    assert_eq!(err.uri(), Some(errors::LIMIT_EXCEEDED), "{err}");
    assert!(err.to_string().contains("max_calls_per_session"), "{err}");
    release_tx.send(true).unwrap();
    for p in pending {
        within("answer", p).await.unwrap().unwrap();
    }
    within(
        "a call after the answers",
        caller.call("com.example.test.slow", macula_client::Payload::default()),
    )
    .await
    .expect("calls again once answers came");
}

/// Slow HTTP clients hold nothing for long: one that never finishes its headers is disconnected
/// after `limits.http_header_timeout_ms`, and connections over `limits.max_http_connections` are
/// closed on arrival, while a well-behaved request is served once a slot is free.
#[tokio::test]
async fn slow_http_clients_are_cut_off_and_connections_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestNode::start_with(|c| {
        c.limits.http_header_timeout_ms = 1_000;
        c.limits.max_http_connections = 20;
    })
    .await;
    let addr = t.running.http_addr;
    let mut slow = vec![];
    for i in 0..20 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Half send one header line and stop; half send nothing at all.
        if i % 2 == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        slow.push(s);
    }
    // Over the cap: closed at once (read ends, without a response).
    let started = std::time::Instant::now();
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = vec![];
    let n = within(
        "the connection over the cap is closed",
        extra.read_to_end(&mut buf),
    )
    .await;
    assert!(
        n.map_or(true, |n| n == 0),
        "no answer over the cap: {buf:?}"
    );
    // The slow ones are cut off after the header timeout, one header line in.
    for s in &mut slow {
        let mut buf = vec![];
        let _ = within("a slow client is cut off", s.read_to_end(&mut buf)).await;
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "slow clients were cut off after {waited:?}"
    );
    // Slots are free again: a normal request is answered.
    let (status, _) = t.http("GET", "/healthz", None, "").await;
    assert_eq!(status, 200);
    let (_, metrics) = t.http("GET", "/metrics", None, "").await;
    assert!(
        metrics.contains("macula_http_refused_connections_total 1"),
        "{metrics}"
    );
}

/// Bounded cost (finding 13): requests through the HTTP bridge to thousands of distinct
/// subrealms leave no realm state behind, and realms without call deadlines cost the node's
/// timer nothing.
#[tokio::test]
async fn requests_to_many_subrealms_leave_nothing_behind() {
    let t = TestNode::start_with(|c| {
        c.metering.max_pairs_per_registration = 0;
        c.limits.bridge_realm_linger_ms = 0;
    })
    .await;
    let before = t.node().realm_handles().len();
    for i in 0..2000 {
        let realm = format!("{REALM}.s{i}");
        let body = format!(r#"{{"topic": "{realm}.t", "args": [1]}}"#);
        let (status, text) = t
            .http(
                "POST",
                &format!("/v1/realms/{realm}/publish"),
                Some(&t.admin_key),
                &body,
            )
            .await;
        assert_eq!(status, 200, "{text}");
    }
    // Freed once the linger (0 here) has passed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.node().realm_handles().len() != before {
        assert!(Instant::now() < deadline, "realm handles were left behind");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.node().ticking_realms(), 0);

    // A call waiting for its answer puts its realm on the timer; the answer takes it off.
    let callee = t.client().await;
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let _reg = callee
        .register("com.example.test.slow", move |_inv| {
            let (arrived_tx, gate) = (arrived_tx.clone(), gate.clone());
            async move {
                let _ = arrived_tx.send(());
                gate.notified().await;
                Ok(macula_client::Payload::default())
            }
        })
        .await
        .unwrap();
    let caller = t.client().await;
    let call = tokio::spawn(async move {
        caller
            .call("com.example.test.slow", macula_client::Payload::default())
            .await
    });
    tokio::time::timeout(Duration::from_secs(5), arrived.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.node().ticking_realms(), 1);
    release.notify_one();
    call.await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.node().ticking_realms() != 0 {
        assert!(
            Instant::now() < deadline,
            "a realm with no calls stayed on the timer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bounded cost (finding 12): one registration that touches many subrealms runs into its own
/// metering limit (bridge: 429, WAMP: ABORT `macula.error.limit_exceeded`) while every other
/// registration keeps being metered and served; no usage is ever counted unbilled.
#[tokio::test]
async fn one_registration_cannot_exhaust_the_meter_for_others() {
    let t = TestNode::start_with(|c| {
        c.metering.max_pairs_per_registration = 20;
    })
    .await;
    t.dir.create_realm("com.other", None).unwrap();
    let (_, other_key) = t
        .dir
        .issue_key("com.other", "admin", "other", 3600, None)
        .unwrap();
    t.node().reload().unwrap();
    let publish = |realm: String, key: String| {
        let t = &t;
        async move {
            let body = format!(r#"{{"topic": "{realm}.t", "args": [1]}}"#);
            t.http(
                "POST",
                &format!("/v1/realms/{realm}/publish"),
                Some(&key),
                &body,
            )
            .await
        }
    };
    let mut refused = None;
    for i in 0..40 {
        let (status, text) = publish(format!("{REALM}.s{i}"), t.admin_key.clone()).await;
        if status != 200 {
            refused = Some((i, status, text));
            break;
        }
    }
    let (at, status, text) = refused.expect("the registration met its limit");
    assert_eq!((at, status), (20, 429), "{text}");
    assert!(
        text.contains(errors::LIMIT_EXCEEDED) && text.contains("max_pairs_per_registration"),
        "{text}"
    );
    // Over WAMP too, for a pair not yet metered.
    let err = Client::connect_with(opts(
        &t.running.ws_url(),
        &format!("{REALM}.s99"),
        &t.admin_key,
    ))
    .await
    .err()
    .expect("refused");
    assert_eq!(err.uri(), Some(errors::LIMIT_EXCEEDED), "{err}");
    // Pairs already metered keep working, and another registration is untouched.
    let (status, text) = publish(format!("{REALM}.s3"), t.admin_key.clone()).await;
    assert_eq!(status, 200, "{text}");
    for i in 0..20 {
        let (status, text) = publish(format!("com.other.s{i}"), other_key.clone()).await;
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!(
        t.node()
            .metrics
            .meter_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

/// Until a node has the mesh's realm states (a peer sent all it holds, or the sync timeout
/// passed), a realm it knows only through an ancestor may be a registration of its own whose
/// state is on the way: the ancestor's keys are not let in meanwhile (`macula.error.not_ready`),
/// while realms the node knows themselves are served at once.
#[tokio::test]
async fn subrealms_wait_for_the_mesh_states() {
    let t = TestNode::start_with(|c| {
        // A bootstrap peer that never answers: no states arrive, only the timeout ends the wait.
        c.mesh.bootstrap = vec!["/ip4/127.0.0.1/udp/9/quic-v1".into()];
        // Longer than the first session's bounded wait for the mesh (2 s: no peer to link).
        c.mesh.state_sync_timeout_ms = 5000;
    })
    .await;
    let url = t.running.ws_url();
    Client::connect_with(opts(&url, REALM, &t.admin_key))
        .await
        .expect("a realm the node knows itself is served at once");
    let sub = format!("{REALM}.sub");
    let err = Client::connect_with(opts(&url, &sub, &t.admin_key))
        .await
        .err()
        .expect("a realm known only through its parent waits for the states");
    assert_eq!(err.uri(), Some(errors::NOT_READY), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect_with(opts(&url, &sub, &t.admin_key)).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.uri(), Some(errors::NOT_READY), "{e}");
                assert!(
                    Instant::now() < deadline,
                    "the sync timeout never ended the wait"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A realm this node's operator made by hand is this node's own: a registration of the same
/// name elsewhere under the trust root (another authority, a higher generation) arriving over the
/// mesh does not take it over here — its keys are refused and the owner's keep working.
#[tokio::test]
async fn a_registration_elsewhere_does_not_take_over_a_hand_made_realm() {
    use ed25519_dalek::SigningKey;
    use macula_router::auth::{credential, AuthorityCert, SignedCert};
    let t = TestNode::start().await;
    let op = t.dir.operator_key().unwrap();
    let other = SigningKey::from_bytes(&[9; 32]);
    let cert = SignedCert::issue(
        &op,
        &AuthorityCert {
            realm: REALM.into(),
            authority: other.verifying_key().to_bytes(),
            expires_at: 0,
        },
    );
    let mut doc = t.dir.read_policy(REALM).unwrap();
    doc.generation = 1;
    doc.version = 5;
    let policy = macula_router::policy::Policy::from_doc(doc).unwrap();
    let state =
        macula_node::mesh::RealmState::sign(REALM, policy.seq(), policy.to_yaml(), &cert, &other);
    let mesh = macula_node::mesh::of(t.node()).expect("the mesh is on");
    assert!(mesh.offer_state(state), "a newer state by sequence");
    t.node().rebuild_auth();
    let now = macula_node::confdir::now_secs();
    let foreign = credential::issue_key(
        &other,
        &cert,
        &credential::KeyClaims {
            realm: REALM.into(),
            role: "admin".into(),
            kid: "key_foreign".into(),
            name: "foreign".into(),
            issued_at: now,
            expires_at: 0,
            pubkey: None,
            secret_hash: None,
            holder: None,
        },
    );
    let url = t.running.ws_url();
    let err = Client::connect_with(opts(&url, REALM, &foreign))
        .await
        .err()
        .expect("the other registration's key is refused here");
    assert_eq!(err.uri(), Some(errors::AUTHENTICATION_FAILED), "{err}");
    Client::connect_with(opts(&url, REALM, &t.admin_key))
        .await
        .expect("the node's own realm keeps working");
}

/// Dedicated nodes against a node that lies: a certified node of the same trust root that the
/// realm does not list sends it a publication over the mesh. The same frame is delivered while
/// the realm takes any node, and refused (counted, never delivered) once the realm lists only
/// its dedicated nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_node_cannot_inject_into_a_dedicated_realm() {
    use macula_wamp::Value;
    let t = TestNode::start().await;
    let sub = t.client().await;
    let topic = "com.example.test.injected";
    let mut events = sub.subscribe(topic).await.unwrap();

    // A rogue participant, certified by the same operator.
    let (rogue, _ev, target) = certified_peer(&t).await;
    let inject = |n: u64| forged_publish(topic, 1, n);
    // Open realm: the frame is delivered (the path works).
    rogue.send(&target, &inject(1));
    let ev1 = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("delivered while the realm takes any node")
        .unwrap();
    assert_eq!(ev1.payload.args, vec![Value::from(1u64)]);

    // Dedicated to this node only: the same frame is refused.
    dedicate_to_this_node(&t);
    let counters = &macula_node::mesh::of(t.node()).unwrap().counters;
    let before = counters.rejected.load(std::sync::atomic::Ordering::Relaxed);
    rogue.send(&target, &inject(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    while counters.rejected.load(std::sync::atomic::Ordering::Relaxed) == before {
        assert!(
            Instant::now() < deadline,
            "the frame was neither refused nor counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Refused before delivery: nothing is waiting for the subscriber (frames from one peer are
    // handled in order, and the refusal was counted).
    let next = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
    assert!(next.is_err(), "the rogue's event was delivered: {next:?}");
    // The subscriber's own node still serves it.
    Client::connect_with(opts(&t.running.ws_url(), REALM, &t.admin_key))
        .await
        .expect("the dedicated node serves the realm");
}

/// What a client is told holds across the mesh (finding 20, first part): SUBSCRIBED is sent only
/// once every connected node has applied the interest it confirms. A peer that has not answered
/// the barrier holds the SUBSCRIBED back; its answer releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_waits_until_connected_nodes_have_the_interest() {
    use macula_mesh::{Frame, MeshEvent};
    let t = TestNode::start().await;
    let (peer, mut ev, node) = certified_peer(&t).await;
    let client = t.client().await;
    let topic = "com.example.test.barrier";
    let subscribing = tokio::spawn(async move { client.subscribe(topic).await.map(|_| client) });
    // The peer gets the interest, then the barrier; until it answers, no SUBSCRIBED.
    let mut saw_interest = false;
    let id = loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.recv()).await {
            Ok(Some(MeshEvent::Frame(_, Frame::Interest { uri, .. }))) if uri == topic => {
                saw_interest = true
            }
            Ok(Some(MeshEvent::Frame(_, Frame::Barrier { id }))) => break id,
            Ok(Some(_)) => {}
            other => panic!("no barrier came: {other:?}"),
        }
    };
    assert!(saw_interest, "the interest comes before its barrier");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !subscribing.is_finished(),
        "SUBSCRIBED went out before the peer had the interest"
    );
    peer.send(&node, &Frame::BarrierAck { id });
    let client = tokio::time::timeout(Duration::from_secs(1), subscribing)
        .await
        .expect("the answer released SUBSCRIBED (well before the 2 s bound)")
        .unwrap()
        .unwrap();
    drop(client);
}

/// Collects what the billing aggregator would be handed.
struct Collect(Arc<std::sync::Mutex<Vec<macula_node::meter::UsageRow>>>);

impl macula_node::meter::UsageSink for Collect {
    fn deliver(
        &self,
        report: macula_node::meter::UsageReport,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        self.0.lock().unwrap().extend(report.rows);
        Box::pin(async { Ok(()) })
    }
}

/// Usage from a node outside a realm's dedicated nodes is not billed to the realm (finding 19),
/// under its name or a subrealm's: the billing node drops those rows, and rows of realms no
/// registration governs, and takes the rest of the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_node_cannot_report_usage_for_a_dedicated_realm() {
    use macula_mesh::{Frame, MeshEvent};
    use macula_node::meter::{UsageReport, UsageRow};
    let t = TestNode::start_with(|c| c.registry.enabled = true).await;
    let got = Arc::new(std::sync::Mutex::new(vec![]));
    let _ = t.node().usage_sink.set(Arc::new(Collect(got.clone())));
    t.dir.create_realm("com.example.open", None).unwrap();
    dedicate_to_this_node(&t);

    let (rogue, mut ev, target) = certified_peer(&t).await;
    let row = |realm: &str| UsageRow {
        realm: realm.into(),
        key_id: "key_x".into(),
        hour: 1,
        ops: Default::default(),
        bytes_in: 1_000_000,
        bytes_out: 0,
        latency: vec![],
        instance_ms: 0,
        package_bytes: 0,
    };
    let report = UsageReport {
        node: rogue.peer_id().to_string(),
        epoch: 1,
        // The dedicated realm under its own name and a subrealm's (billed to it), and a realm
        // no registration governs: only the open realm's row is taken.
        rows: vec![
            row(REALM),
            row("com.example.open"),
            row("com.example.test.anything"),
            row("org.nowhere"),
        ],
    };
    rogue.send(
        &target,
        &Frame::Usage {
            id: 9,
            report: rmp_serde::to_vec(&report).unwrap().into(),
        },
    );
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.recv()).await {
            Ok(Some(MeshEvent::Frame(_, Frame::UsageAck { id: 9, error }))) => {
                assert_eq!(error, None);
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no acknowledgement: {other:?}"),
        }
    }
    let realms: Vec<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.realm.clone())
        .collect();
    assert_eq!(realms, vec!["com.example.open".to_string()]);
}

/// Tombstones are collected (finding 5). A tombstone learned from the mesh is forgotten once
/// `mesh.tombstone_retention_s` has passed and is not taken back when a peer sends it again; the
/// node's own tombstones (its config directory: the registry's, where it runs) are kept, and
/// answer a peer that sends an older state of the deleted realm with the tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_collected_after_the_retention() {
    use macula_mesh::Frame;
    use macula_node::mesh::RealmState;
    let (gone, mine) = ("com.example.gone", "com.example.mine");
    let t = TestNode::start_with(|c| c.mesh.tombstone_retention_s = 3).await;
    // Another node's directory under the same trust root, where `gone` lives and is deleted.
    let other = tempfile::tempdir().unwrap();
    let od = macula_node::ConfDir::new(other.path());
    std::fs::create_dir_all(other.path().join("trust")).unwrap();
    for f in ["trust/operator.key", "trust/operator.pub"] {
        std::fs::copy(t.dir.root.join(f), other.path().join(f)).unwrap();
    }
    std::fs::create_dir_all(other.path().join("realms")).unwrap();
    od.create_realm(gone, None).unwrap();
    let sign = |doc: &macula_router::policy::PolicyDoc| {
        od.write_policy(doc).unwrap();
        let (_, key, cert) = od.authority_for(gone).unwrap();
        let text = std::fs::read_to_string(od.policy_path(gone)).unwrap();
        let seq = macula_router::policy::Policy::from_yaml(&text)
            .unwrap()
            .seq();
        RealmState::sign(gone, seq, text, &cert, &key).encode()
    };
    let mut doc = od.read_policy(gone).unwrap();
    doc.version += 1;
    let live = sign(&doc);
    doc.version += 1;
    doc.deleted = true;
    doc.deleted_at = macula_node::confdir::now_secs();
    let tombstone = sign(&doc);
    // This node's own realm, deleted here.
    t.dir.create_realm(mine, None).unwrap();
    let mut own = t.dir.read_policy(mine).unwrap();
    own.version += 1;
    own.deleted = true;
    own.deleted_at = macula_node::confdir::now_secs();
    t.dir.write_policy(&own).unwrap();
    t.node().reload().unwrap();

    let (peer, mut ev, node) = certified_peer(&t).await;
    let state = |state: &bytes::Bytes| Frame::State {
        realm: gone.into(),
        state: state.clone(),
    };
    peer.send(&node, &state(&tombstone));
    settle(&peer, &node, &mut ev).await;
    let mesh = macula_node::mesh::of(t.node()).unwrap();
    assert!(
        mesh.states.lock().contains_key(gone),
        "the tombstone is taken"
    );
    // An older state of the deleted realm is answered with the tombstone.
    peer.send(&node, &state(&live));
    let answers = settle(&peer, &node, &mut ev).await;
    assert!(
        answers
            .iter()
            .any(|f| matches!(f, Frame::State { realm, state }
            if realm == gone && *state == tombstone)),
        "the peer that sent an old state gets the tombstone back"
    );
    eventually("the learned tombstone to be collected", || {
        !mesh.states.lock().contains_key(gone)
    })
    .await;
    // Sent again by a peer: not taken back.
    peer.send(&node, &state(&tombstone));
    settle(&peer, &node, &mut ev).await;
    assert!(!mesh.states.lock().contains_key(gone), "taken back");
    // The node's own tombstone stays, in its states and its directory.
    assert!(mesh.states.lock().contains_key(mine));
    assert!(t.dir.read_policy(mine).unwrap().deleted);
}

/// DHT records of a realm restricted to dedicated nodes count only when one of them wrote them
/// (finding 19): a record a certified outsider stores is not returned by `macula.dht.get`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_node_cannot_write_a_dedicated_realms_records() {
    use macula_mesh::record::{dht_key, AppRecord};
    use macula_wamp::{Payload, Value};
    let t = TestNode::start().await;
    let (rogue, _ev, _target) = certified_peer(&t).await;
    let now = macula_node::confdir::now_secs();
    let forged = AppRecord::sign(
        rogue.keypair(),
        &rogue.cert(),
        REALM,
        "config",
        rmp_serde::to_vec(&Value::from("forged")).unwrap().into(),
        "key_rogue",
        now,
        now + 600,
    );
    let stored = rogue
        .put(
            dht_key(REALM, "config"),
            forged.encode(),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    assert!(stored >= 1, "the node stored the certified peer's record");
    let client = t.client().await;
    let get = || client.call("macula.dht.get", Payload::args(vec![Value::from("config")]));
    // While the realm takes any node of the trust root, the record is the realm's.
    let got = get().await.expect("an open realm's record");
    assert_eq!(got.args, vec![Value::from("forged")]);
    // Dedicated to this node: the outsider's record no longer counts.
    dedicate_to_this_node(&t);
    let err = get().await.expect_err("refused");
    assert!(err.to_string().contains("does not serve"), "{err}");
}

/// Restricts the test realm to the test node (its `nodes` list) and applies it.
fn dedicate_to_this_node(t: &TestNode) {
    let me = macula_node::mesh::of(t.node())
        .unwrap()
        .handle
        .peer_id()
        .to_string();
    let mut doc = t.dir.read_policy(REALM).unwrap();
    doc.version += 1;
    doc.nodes = vec![me];
    t.dir.write_policy(&doc).unwrap();
    t.node().reload().unwrap();
}

/// Sends a barrier from `peer` and returns the frames that came back before its answer: frames
/// from one peer are handled in order, so everything `peer` sent before was handled.
async fn settle(
    peer: &macula_mesh::MeshHandle,
    node: &macula_mesh::Peer,
    ev: &mut macula_mesh::MeshEvents,
) -> Vec<macula_mesh::Frame> {
    use macula_mesh::{Frame, MeshEvent};
    let id = rand::random::<u64>();
    peer.send(node, &Frame::Barrier { id });
    let mut got = vec![];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.recv()).await {
            Ok(Some(MeshEvent::Frame(_, Frame::BarrierAck { id: i }))) if i == id => return got,
            Ok(Some(MeshEvent::Frame(_, f))) => got.push(f),
            Ok(Some(_)) => {}
            other => panic!("no barrier answer: {other:?}"),
        }
    }
}

/// Roles in forwarded traffic (finding 19): a node of the trust root that forwards a publication
/// claiming `admin` is believed only as far as a key proves. With the realm's `verified_roles`
/// on, a publication whose session's role no key's public form proved is refused; a proof of a
/// `service_account` key limits the session to that role whatever the frames claim; a proof of
/// an `admin` key lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_acts_only_with_roles_its_keys_prove() {
    use macula_mesh::Frame;
    use macula_wamp::Value;
    let t = TestNode::start().await;
    let sub = t.client().await;
    // Outside the realm's prefix: only `admin` may publish there.
    let topic = "org.elsewhere.news";
    let mut events = sub.subscribe(topic).await.unwrap();
    let (rogue, mut ev, node) = certified_peer(&t).await;
    let publish = |session: u64, n: u64| forged_publish(topic, session, n);
    // Before: a claimed role is believed.
    rogue.send(&node, &publish(1, 1));
    settle(&rogue, &node, &mut ev).await;
    assert_eq!(next_args(&mut events).await, Some(vec![Value::from(1u64)]));

    let mut doc = t.dir.read_policy(REALM).unwrap();
    doc.version += 1;
    doc.verified_roles = true;
    t.dir.write_policy(&doc).unwrap();
    t.node().reload().unwrap();
    // No proof: refused.
    rogue.send(&node, &publish(1, 2));
    settle(&rogue, &node, &mut ev).await;
    assert_eq!(
        next_args(&mut events).await,
        None,
        "a claimed role is not believed"
    );
    // A service_account key's proof: the session is a service_account, whatever it claims.
    let (_, sa) = t.key("service_account");
    let me = rogue.peer_id();
    let session = |session: u64, key: &str| session_proof(&me, session, key);
    rogue.send(&node, &session(2, &sa));
    rogue.send(&node, &publish(2, 3));
    settle(&rogue, &node, &mut ev).await;
    assert_eq!(
        next_args(&mut events).await,
        None,
        "held to the proven role"
    );
    // A forged proof (the key itself is not a public form) proves nothing.
    let Frame::Session { nonce, sig, .. } = session(3, &sa) else {
        unreachable!()
    };
    rogue.send(
        &node,
        &Frame::Session {
            realm: REALM.into(),
            session: 3,
            public: sa.clone(),
            nonce,
            sig,
        },
    );
    rogue.send(&node, &publish(3, 4));
    settle(&rogue, &node, &mut ev).await;
    assert_eq!(next_args(&mut events).await, None);
    // An admin key of another realm proves nothing here.
    t.dir.create_realm("com.other", None).unwrap();
    let (_, other_admin) = t
        .dir
        .issue_key("com.other", "admin", "other", 3600, None)
        .unwrap();
    t.node().reload().unwrap();
    rogue.send(&node, &session(5, &other_admin));
    rogue.send(&node, &publish(5, 6));
    settle(&rogue, &node, &mut ev).await;
    assert_eq!(next_args(&mut events).await, None, "another realm's key");
    // An admin key's proof that another node made (an honest node's, seen on the mesh)
    // proves nothing when the rogue replays it: it names the node that made it.
    rogue.send(&node, &session_proof(&node, 6, &t.admin_key));
    rogue.send(&node, &publish(6, 7));
    settle(&rogue, &node, &mut ev).await;
    assert_eq!(next_args(&mut events).await, None, "a replayed proof");
    // An admin key's proof: through.
    rogue.send(&node, &session(4, &t.admin_key));
    rogue.send(&node, &publish(4, 5));
    settle(&rogue, &node, &mut ev).await;
    assert_eq!(next_args(&mut events).await, Some(vec![Value::from(5u64)]));
}

/// The next event's arguments, or `None` if none comes within 300 ms (after a barrier settled
/// everything that could cause one).
async fn next_args(events: &mut macula_client::Subscription) -> Option<Vec<macula_wamp::Value>> {
    tokio::time::timeout(Duration::from_millis(300), events.next())
        .await
        .ok()
        .flatten()
        .map(|e| e.payload.args)
}

/// A publication of `n` to `topic` as a lying node forwards it: from its session `session`,
/// claiming the `admin` role.
fn forged_publish(topic: &str, session: u64, n: u64) -> macula_mesh::Frame {
    use macula_wamp::{Message, Payload, Serializer, Value};
    let msg = Serializer::MsgPack.encode(&Message::Publish {
        request: n,
        options: Default::default(),
        topic: topic.into(),
        payload: Payload::args(vec![Value::from(n)]),
    });
    macula_mesh::Frame::Publish {
        realm: REALM.into(),
        origin: macula_mesh::Origin {
            session,
            authid: "key_claimed".into(),
            authrole: "admin".into(),
        },
        msg: msg.into(),
    }
}

/// Interest and registrations a node forwards are held only for roles its keys prove (finding
/// 19): with `verified_roles` on, an interest in an admin-only topic is refused when it names no
/// proven session or a `service_account` one, held when an `admin` key proves it, withdrawn when
/// the peer names a session whose role may not hold it, and withdrawn when the proving key is
/// revoked here. A registration is held to the proven role the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_interest_and_registrations_only_for_proven_roles() {
    use macula_mesh::Frame;
    use macula_wamp::Payload;
    let t = TestNode::start().await;
    let mut doc = t.dir.read_policy(REALM).unwrap();
    doc.version += 1;
    doc.verified_roles = true;
    t.dir.write_policy(&doc).unwrap();
    t.node().reload().unwrap();
    let local = t.client().await;
    let (rogue, mut ev, node) = certified_peer(&t).await;
    // Outside the realm's prefix: only `admin` may subscribe or register there.
    let topic = "org.elsewhere.news";
    let (_, sa) = t.key("service_account");
    let (admin_kid, admin) = t.key("admin");
    let me = rogue.peer_id();
    let prove = |session: u64, key: &str| session_proof(&me, session, key);
    let interest = |session: u64, add: bool| Frame::Interest {
        realm: REALM.into(),
        uri: topic.into(),
        policy: "exact".into(),
        session,
        role: "admin".into(),
        add,
    };
    macro_rules! forwarded {
        () => {
            reaches(&local, &rogue, &node, &mut ev, topic).await
        };
    }

    // Claimed admin, nothing proved: refused.
    rogue.send(&node, &interest(1, true));
    settle(&rogue, &node, &mut ev).await;
    assert!(!forwarded!(), "an unproven interest is refused");
    // A service_account key's proof: that role may not subscribe there.
    rogue.send(&node, &prove(2, &sa));
    rogue.send(&node, &interest(2, true));
    settle(&rogue, &node, &mut ev).await;
    assert!(!forwarded!(), "held to the proven role");
    // An admin key's proof: held.
    rogue.send(&node, &prove(3, &admin));
    rogue.send(&node, &interest(3, true));
    settle(&rogue, &node, &mut ev).await;
    assert!(forwarded!(), "an admin's interest is held");
    // The peer says the service_account session holds it now: no longer justified.
    rogue.send(&node, &interest(2, true));
    settle(&rogue, &node, &mut ev).await;
    assert!(!forwarded!(), "withdrawn when its holder may not hold it");
    rogue.send(&node, &interest(3, true));
    settle(&rogue, &node, &mut ev).await;
    assert!(forwarded!());
    // The admin key is revoked here: the peer never withdraws, the node does.
    t.dir.revoke_key(&admin_kid).unwrap();
    t.node().reload().unwrap();
    assert!(!forwarded!(), "withdrawn when the proving key is revoked");
    rogue.send(&node, &interest(3, true));
    settle(&rogue, &node, &mut ev).await;
    assert!(!forwarded!(), "the revoked key's proof is gone");

    // Registrations: a service_account session claiming admin registers nothing here.
    let registration = |session: u64| Frame::Registration {
        realm: REALM.into(),
        uri: "org.elsewhere.proc".into(),
        policy: "exact".into(),
        invoke: "single".into(),
        session,
        role: "admin".into(),
        add: true,
    };
    rogue.send(&node, &registration(2));
    settle(&rogue, &node, &mut ev).await;
    let err = local
        .call("org.elsewhere.proc", Payload::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_procedure"), "{err}");
    // An admin key's proof: registered (the call goes to the rogue).
    let (_, admin2) = t.key("admin");
    rogue.send(&node, &prove(4, &admin2));
    rogue.send(&node, &registration(4));
    settle(&rogue, &node, &mut ev).await;
    let calling = tokio::spawn({
        let local = local.clone();
        async move { local.call("org.elsewhere.proc", Payload::default()).await }
    });
    let got_call = loop {
        match tokio::time::timeout(Duration::from_secs(5), ev.recv()).await {
            Ok(Some(macula_mesh::MeshEvent::Frame(_, Frame::Call { .. }))) => break true,
            Ok(Some(_)) => {}
            _ => break false,
        }
    };
    assert!(got_call, "the admin-proven registration receives the call");
    calling.abort();

    // A subrealm: a developer key of the realm reaches no subrealm (its role does not extend
    // there), so its proof for one proves nothing; an admin key's (whose role does) holds.
    let sub = format!("{REALM}.eu");
    let sub_topic = format!("{sub}.news");
    let (_, dev) = t.key("developer");
    let sub_interest = |session: u64| Frame::Interest {
        realm: sub.clone(),
        uri: sub_topic.clone(),
        policy: "exact".into(),
        session,
        role: "developer".into(),
        add: true,
    };
    let in_sub = Client::connect_with(opts(&t.running.ws_url(), &sub, &t.admin_key))
        .await
        .unwrap();
    rogue.send(&node, &session_proof_in(&me, &sub, 7, &dev));
    rogue.send(&node, &sub_interest(7));
    settle(&rogue, &node, &mut ev).await;
    assert!(
        !reaches(&in_sub, &rogue, &node, &mut ev, &sub_topic).await,
        "a developer key's proof does not reach a subrealm"
    );
    rogue.send(&node, &session_proof_in(&me, &sub, 8, &admin2));
    rogue.send(&node, &sub_interest(8));
    settle(&rogue, &node, &mut ev).await;
    assert!(reaches(&in_sub, &rogue, &node, &mut ev, &sub_topic).await);
}

/// A node that lies cannot grow this one's memory through announcements: beyond
/// `mesh.max_holds_per_peer` distinct interests and registrations, its announcements are
/// refused; a withdrawal makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holds_at_most_its_share_of_interest() {
    use macula_mesh::Frame;
    let t = TestNode::start_with(|c| {
        c.mesh.max_holds_per_peer = 2;
        c.mesh.max_realms_per_peer = 1;
    })
    .await;
    let local = t.client().await;
    let (rogue, mut ev, node) = certified_peer(&t).await;
    let topic = |i: u32| format!("{REALM}.t{i}");
    let interest = |i: u32, add: bool| Frame::Interest {
        realm: REALM.into(),
        uri: topic(i),
        policy: "exact".into(),
        session: 1,
        role: "admin".into(),
        add,
    };
    for i in 0..3 {
        rogue.send(&node, &interest(i, true));
    }
    settle(&rogue, &node, &mut ev).await;
    macro_rules! reached {
        ($i:expr) => {
            reaches(&local, &rogue, &node, &mut ev, &topic($i)).await
        };
    }
    assert!(reached!(0) && reached!(1));
    assert!(!reached!(2), "the third interest is refused");
    rogue.send(&node, &interest(0, false));
    rogue.send(&node, &interest(2, true));
    settle(&rogue, &node, &mut ev).await;
    assert!(!reached!(0) && reached!(2), "room again after a withdrawal");

    // Realms: a second one is refused, and frames for names the node holds nothing for build
    // no realm state here (a withdrawal, a publication).
    let elsewhere = format!("{REALM}.x");
    rogue.send(
        &node,
        &Frame::Interest {
            realm: elsewhere.clone(),
            uri: format!("{elsewhere}.t"),
            policy: "exact".into(),
            session: 1,
            role: "admin".into(),
            add: true,
        },
    );
    rogue.send(
        &node,
        &Frame::Interest {
            realm: format!("{REALM}.y"),
            uri: format!("{REALM}.y.t"),
            policy: "exact".into(),
            session: 1,
            role: "admin".into(),
            add: false,
        },
    );
    let Frame::Publish { origin, msg, .. } = forged_publish(&format!("{REALM}.z.t"), 1, 1) else {
        unreachable!()
    };
    rogue.send(
        &node,
        &Frame::Publish {
            realm: format!("{REALM}.z"),
            origin,
            msg,
        },
    );
    settle(&rogue, &node, &mut ev).await;
    for r in ["x", "y", "z"] {
        assert!(
            t.node().realm_handle(&format!("{REALM}.{r}")).is_none(),
            "no state for {r}"
        );
    }
}

/// Publishes `topic` on the node with `local` (acknowledged, so forwarded before PUBLISHED) and
/// reports whether `rogue` got the publication.
async fn reaches(
    local: &macula_client::Client,
    rogue: &macula_mesh::MeshHandle,
    node: &macula_mesh::Peer,
    ev: &mut macula_mesh::MeshEvents,
    topic: &str,
) -> bool {
    use macula_wamp::{dict, Payload};
    local
        .publish_with(topic, Payload::default(), dict! {"acknowledge" => true})
        .await
        .unwrap();
    settle(rogue, node, ev)
        .await
        .iter()
        .any(|f| matches!(f, macula_mesh::Frame::Publish { .. }))
}

/// The proof a node whose peer id is `node` sends for its session `session` of bearer key `key`
/// in the test realm.
fn session_proof(node: &macula_mesh::Peer, session: u64, key: &str) -> macula_mesh::Frame {
    session_proof_in(node, REALM, session, key)
}

/// [`session_proof`] for a session in `realm`.
fn session_proof_in(
    node: &macula_mesh::Peer,
    realm: &str,
    session: u64,
    key: &str,
) -> macula_mesh::Frame {
    use macula_router::auth::credential::{bearer_proof, public_form, session_digest};
    let nonce: [u8; 32] = rand::random();
    let sig = bearer_proof(key, &session_digest(&node.to_bytes(), realm, &nonce)).unwrap();
    macula_mesh::Frame::Session {
        realm: realm.into(),
        session,
        public: public_form(key).unwrap(),
        nonce: nonce.to_vec().into(),
        sig: sig.to_vec().into(),
    }
}

/// A peer's session proof naming a workload replica (`workload:<name>/<i>`): the node takes the
/// role from its own copy of the realm's deploy record, so a replica the record has justifies an
/// interest in the role the manifest gives it, and a replica it does not have (another index, a
/// workload never deployed) justifies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_proof_holds_only_for_a_replica_the_record_has() {
    use macula_mesh::Frame;
    use macula_router::auth::credential::{bearer_proof, public_form};
    let t = TestNode::start().await;
    let mut doc = t.dir.read_policy(REALM).unwrap();
    doc.version += 1;
    doc.verified_roles = true;
    t.dir.write_policy(&doc).unwrap();
    t.node().reload().unwrap();
    let (_, developer) = t.key("developer");
    let record = macula_workloads::record::DeployRecord::signed(
        REALM,
        "api",
        1,
        Some("kind: payload\nname: api\nreplicas: 1\ncommand: [my-server]\n".into()),
        1,
        &public_form(&developer).unwrap(),
        |d| bearer_proof(&developer, d),
    )
    .unwrap();
    let path = format!("/v1/realms/{REALM}/workloads");
    let (s, b) = t
        .http(
            "POST",
            &path,
            None,
            &serde_json::to_string(&record).unwrap(),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let local = t.client().await;
    let (rogue, mut ev, node) = certified_peer(&t).await;
    let topic = format!("{REALM}.news");
    let claim = |session: u64, replica: &str| Frame::Session {
        realm: REALM.into(),
        session,
        public: format!("workload:{replica}"),
        nonce: vec![0u8; 32].into(),
        sig: vec![0u8; 64].into(),
    };
    let interest = |session: u64| Frame::Interest {
        realm: REALM.into(),
        uri: topic.clone(),
        policy: "exact".into(),
        session,
        role: "admin".into(),
        add: true,
    };
    // A replica the record does not have, and a workload never deployed: nothing held.
    for (session, replica) in [(1, "api/1"), (2, "ghost/0")] {
        rogue.send(&node, &claim(session, replica));
        rogue.send(&node, &interest(session));
        settle(&rogue, &node, &mut ev).await;
        assert!(
            !reaches(&local, &rogue, &node, &mut ev, &topic).await,
            "{replica} justified an interest"
        );
    }
    // Replica 0 of the deployed workload: held, as its service_account role may.
    rogue.send(&node, &claim(3, "api/0"));
    rogue.send(&node, &interest(3));
    settle(&rogue, &node, &mut ev).await;
    assert!(reaches(&local, &rogue, &node, &mut ev, &topic).await);
}
