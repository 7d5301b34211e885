//! Tenant isolation against `macula up` (a real process: registry REST, WebSocket, HTTP bridge),
//! each test an attack from the isolation issue that must be refused:
//! - a parent realm registered by another account does not reach a realm below it;
//! - keys die with their registration: after deletion and re-registration by someone else, the
//!   old keys are refused, and the new owner inherits no keys, audit rows or usage;
//! - a transfer cuts the seller off: live sessions closed, keys refused, no key replayable.

mod macula_up;

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use macula_client::{Client, ConnectOptions, Payload, Value};
use serde_json::{json, Value as Json};

struct Api {
    http: String,
    ws: String,
}

impl Api {
    fn start(home: &Path) -> (macula_up::Up, Api, Json) {
        let (up, v) = macula_up::up(home, &[]);
        let api = Api {
            http: v["http"].as_str().unwrap().to_owned(),
            ws: v["ws"].as_str().unwrap().to_owned(),
        };
        (up, api, v)
    }

    /// One REST request: (status, JSON body or Null).
    async fn req(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<Json>,
        headers: &[(&str, &str)],
    ) -> (u16, Json) {
        let url = format!("{}{path}", self.http);
        let method = method.to_owned();
        let bearer = bearer.map(str::to_owned);
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut r = ureq::http::Request::builder()
                .method(method.as_str())
                .uri(&url);
            if let Some(t) = &bearer {
                r = r.header("Authorization", format!("Bearer {t}"));
            }
            for (k, v) in &headers {
                r = r.header(k, v);
            }
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let mut res = agent
                .run(
                    r.header("content-type", "application/json")
                        .body(body)
                        .unwrap(),
                )
                .unwrap();
            let status = res.status().as_u16();
            let text = res.body_mut().read_to_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Json::Null))
        })
        .await
        .unwrap()
    }

    /// A GET with a session token: (status, JSON body).
    async fn get(&self, path: &str, token: &str) -> (u16, Json) {
        self.req("GET", path, Some(token), None, &[]).await
    }

    /// Signs up and logs in; the session token.
    async fn account(&self, email: &str) -> String {
        let body = json!({"email": email, "password": "correct horse battery"});
        let (s, v) = self
            .req("POST", "/v1/accounts", None, Some(body.clone()), &[])
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = self
            .req("POST", "/v1/sessions", None, Some(body), &[])
            .await;
        assert_eq!(s, 201, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }

    async fn register(&self, token: &str, realm: &str) {
        let (s, v) = self
            .req(
                "POST",
                "/v1/realms",
                Some(token),
                Some(json!({"name": realm})),
                &[],
            )
            .await;
        assert_eq!(s, 201, "registering {realm}: {v}");
    }

    /// A new admin key for `realm` that never expires: (id, key).
    async fn admin_key(&self, token: &str, realm: &str) -> (String, String) {
        let (s, v) = self
            .req(
                "POST",
                &format!("/v1/realms/{realm}/keys"),
                Some(token),
                Some(json!({"role": "admin", "name": "admin", "expires_in_days": 0})),
                &[],
            )
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_owned(),
            v["key"].as_str().unwrap().to_owned(),
        )
    }

    async fn connect(&self, realm: &str, key: &str) -> Result<Client, macula_client::Error> {
        let mut o = ConnectOptions::new(&self.ws, realm, key);
        o.reconnect = false;
        Client::connect_with(o).await
    }

    /// Publishes through the HTTP bridge; the status.
    async fn bridge_publish(&self, realm: &str, key: &str, topic: &str) -> u16 {
        self.req(
            "POST",
            &format!("/v1/realms/{realm}/publish"),
            Some(key),
            Some(json!({"topic": topic, "args": ["forged"]})),
            &[],
        )
        .await
        .0
    }
}

/// The operations of a usage answer (`GET /v1/realms/{realm}/usage`), over its rows.
fn ops_total(usage: &Json) -> u64 {
    usage["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["ops_total"].as_u64())
        .sum()
}

/// Waits until `sub` ends (its session closed); panics after `within`.
async fn closed_within(sub: &mut macula_client::Subscription, within: Duration, what: &str) {
    let end = tokio::time::timeout(within, sub.next()).await;
    assert!(matches!(end, Ok(None)), "{what}: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_registered_by_another_account_does_not_reach_below() {
    let home = tempfile::tempdir().unwrap();
    let (_up, api, up) = Api::start(home.path());
    let alice = api.account("alice@shop.example").await;
    let mallory = api.account("mallory@evil.example").await;

    api.register(&alice, "com.acme.shop").await;
    let (_, alice_key) = api.admin_key(&alice, "com.acme.shop").await;
    let owner = api.connect("com.acme.shop", &alice_key).await.unwrap();
    let mut orders = owner.subscribe("com.acme.shop.orders").await.unwrap();

    // Mallory registers the free parent and makes an admin key for it (its role extends to
    // subrealms).
    api.register(&mallory, "com.acme").await;
    let (_, evil) = api.admin_key(&mallory, "com.acme").await;
    api.connect("com.acme", &evil)
        .await
        .expect("the key works in Mallory's own realm");
    let err = api
        .connect("com.acme.shop", &evil)
        .await
        .err()
        .expect("the parent's key is refused in Alice's realm");
    assert!(err.to_string().contains("current registration"), "{err}");
    assert!(api.connect("com.acme.shop.internal", &evil).await.is_err());
    // Not through the HTTP bridge either, and nothing reaches Alice's subscriber.
    assert_eq!(
        api.bridge_publish("com.acme.shop", &evil, "com.acme.shop.orders")
            .await,
        401
    );
    let publisher = api.connect("com.acme.shop", &alice_key).await.unwrap();
    publisher
        .publish(
            "com.acme.shop.orders",
            Payload::args(vec![Value::from("real")]),
        )
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), orders.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev.payload.args,
        vec![Value::from("real")],
        "the first event is the owner's"
    );

    // The same against `macula up`'s demo realm, configured on the node: registering
    // `com.example` grants nothing below it, and the demo name itself is reserved.
    api.register(&mallory, "com.example").await;
    let (_, evil2) = api.admin_key(&mallory, "com.example").await;
    let demo = up["realm"].as_str().unwrap();
    assert!(api.connect(demo, &evil2).await.is_err());
    assert_eq!(
        api.bridge_publish(demo, &evil2, "com.example.demo.hello")
            .await,
        401
    );
    let (s, v) = api
        .req(
            "POST",
            "/v1/realms",
            Some(&mallory),
            Some(json!({"name": demo})),
            &[],
        )
        .await;
    assert_eq!(s, 409, "{v}");
    api.connect(demo, up["key"].as_str().unwrap())
        .await
        .expect("the demo realm's own key still works");

    // Alice's own subrealm takes her parent key (same owner).
    api.register(&alice, "com.acme.shop.eu").await;
    api.connect("com.acme.shop.eu", &alice_key)
        .await
        .expect("the owner's parent key reaches the owner's own subrealm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_usage_and_audit_do_not_outlive_a_registration() {
    let home = tempfile::tempdir().unwrap();
    let (_up, api, _) = Api::start(home.path());
    let alice = api.account("alice@first.example").await;
    let bob = api.account("bob@second.example").await;
    let realm = "com.reuse.app";

    api.register(&alice, realm).await;
    let (old_kid, old_key) = api.admin_key(&alice, realm).await;
    let live = api.connect(realm, &old_key).await.unwrap();
    let mut sub = live.subscribe("com.reuse.app.t").await.unwrap();
    for _ in 0..5 {
        live.publish("com.reuse.app.t", Payload::default())
            .await
            .unwrap();
    }
    // Alice's usage reaches the registry (flushed within about a second).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, v) = api.get(&format!("/v1/realms/{realm}/usage"), &alice).await;
        assert_eq!(s, 200, "{v}");
        if ops_total(&v) >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's usage never arrived: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Deletion is final at once: the live session closes, the key is refused.
    let (s, v) = api
        .req(
            "DELETE",
            &format!("/v1/realms/{realm}"),
            Some(&alice),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 204, "{v}");
    closed_within(
        &mut sub,
        Duration::from_secs(5),
        "the deleted realm's session",
    )
    .await;
    assert!(api.connect(realm, &old_key).await.is_err());

    // Bob registers the freed name. Alice's key stays refused, everywhere.
    api.register(&bob, realm).await;
    let err = api
        .connect(realm, &old_key)
        .await
        .err()
        .expect("the previous registration's key is refused");
    assert!(err.to_string().contains("current registration"), "{err}");
    assert_eq!(
        api.bridge_publish(realm, &old_key, "com.reuse.app.t").await,
        401
    );
    // Bob sees none of Alice's keys, audit rows or usage.
    let (s, keys) = api.get(&format!("/v1/realms/{realm}/keys"), &bob).await;
    assert_eq!(s, 200, "{keys}");
    assert!(!keys.to_string().contains(&old_kid), "{keys}");
    let (s, audit) = api.get(&format!("/v1/realms/{realm}/audit"), &bob).await;
    assert_eq!(s, 200, "{audit}");
    let audit = audit.to_string();
    assert!(!audit.contains("alice@first.example"), "{audit}");
    assert!(audit.contains("realm.register"), "{audit}");
    let (s, usage) = api.get(&format!("/v1/realms/{realm}/usage"), &bob).await;
    assert_eq!(s, 200, "{usage}");
    assert_eq!(ops_total(&usage), 0, "{usage}");
    // Bob's own key works.
    let (_, bob_key) = api.admin_key(&bob, realm).await;
    api.connect(realm, &bob_key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cuts_the_seller_off() {
    let home = tempfile::tempdir().unwrap();
    let (_up, api, _) = Api::start(home.path());
    let seller = api.account("seller@a.example").await;
    let accomplice = api.account("seller2@a.example").await;
    let buyer = api.account("buyer@b.example").await;
    let realm = "com.sold.app";
    api.register(&seller, realm).await;
    // The seller's second account, an admin member before the sale.
    let (s, v) = api
        .req(
            "POST",
            &format!("/v1/realms/{realm}/members"),
            Some(&seller),
            Some(json!({"email": "seller2@a.example", "role": "admin"})),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let idem = [("Idempotency-Key", "seller-key-1")];
    let (s, v) = api
        .req(
            "POST",
            &format!("/v1/realms/{realm}/keys"),
            Some(&seller),
            Some(json!({"role": "admin", "name": "forever", "expires_in_days": 0})),
            &idem,
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let seller_key = v["key"].as_str().unwrap().to_owned();
    let live = api.connect(realm, &seller_key).await.unwrap();
    let mut sub = live.subscribe("com.sold.app.t").await.unwrap();

    let (s, code) = api
        .req(
            "POST",
            &format!("/v1/realms/{realm}/transfer-code"),
            Some(&seller),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 201, "{code}");
    let (s, v) = api
        .req(
            "POST",
            &format!("/v1/realms/{realm}/transfer"),
            Some(&buyer),
            Some(json!({"code": code["code"]})),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{v}");

    closed_within(
        &mut sub,
        Duration::from_secs(5),
        "the seller's live session",
    )
    .await;
    assert!(api.connect(realm, &seller_key).await.is_err());
    assert_eq!(
        api.bridge_publish(realm, &seller_key, "com.sold.app.t")
            .await,
        401
    );
    // Replaying the key's creation brings no key back.
    let (s, v) = api
        .req(
            "POST",
            &format!("/v1/realms/{realm}/keys"),
            Some(&seller),
            Some(json!({"role": "admin", "name": "forever", "expires_in_days": 0})),
            &idem,
        )
        .await;
    assert_ne!(s, 201, "{v}");
    assert!(v.get("key").is_none(), "{v}");
    // The buyer holds no key they did not make.
    let (s, keys) = api.get(&format!("/v1/realms/{realm}/keys"), &buyer).await;
    assert_eq!(s, 200, "{keys}");
    for k in keys["items"].as_array().into_iter().flatten() {
        assert_ne!(
            k["revoked_at"],
            Json::Null,
            "an active key came with the realm: {k}"
        );
    }
    // Members the seller added leave with the sale: no key can be made under the new authority.
    let (s, v) = api
        .req(
            "POST",
            &format!("/v1/realms/{realm}/keys"),
            Some(&accomplice),
            Some(json!({"role": "admin", "name": "backdoor"})),
            &[],
        )
        .await;
    assert!(s == 403 || s == 404, "{s} {v}");
    let (_, buyer_key) = api.admin_key(&buyer, realm).await;
    api.connect(realm, &buyer_key).await.unwrap();
}

/// A RawSocket connection (JSON, 16 MiB frames) past its handshake.
async fn raw_connect(addr: &str) -> tokio::net::TcpStream {
    use macula_wamp::rawsocket::Handshake;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&Handshake::encode(1 << 24, macula_wamp::Serializer::Json))
        .await
        .unwrap();
    let mut reply = [0u8; 4];
    s.read_exact(&mut reply).await.unwrap();
    Handshake::parse_reply(reply).unwrap();
    s
}

/// The resident memory of process `pid`, in bytes (Linux).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// RawSocket clients that send large PINGs and never read their PONGs do not grow the node: a
/// PONG not yet written is replaced by the next (one owed at a time), and PINGs count against
/// the rate limit. A client that reads gets its PONG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_never_read_do_not_grow_the_node() {
    use macula_wamp::rawsocket::{FrameHeader, FrameKind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let home = tempfile::tempdir().unwrap();
    let (up, _api, v) = Api::start(home.path());
    let pid = up.0.id();
    let addr = v["rawsocket"]
        .as_str()
        .unwrap()
        .trim_start_matches("rs://")
        .to_owned();
    let connect = || raw_connect(&addr);
    // A client that reads gets the PONG with its PING's payload.
    let mut reader = connect().await;
    reader
        .write_all(&FrameHeader::encode(FrameKind::Ping, 5))
        .await
        .unwrap();
    reader.write_all(b"hello").await.unwrap();
    let mut h = [0u8; 4];
    reader.read_exact(&mut h).await.unwrap();
    let h = FrameHeader::parse(h).unwrap();
    assert_eq!((h.kind, h.len), (FrameKind::Pong, 5));
    let mut p = [0u8; 5];
    reader.read_exact(&mut p).await.unwrap();
    assert_eq!(&p, b"hello");

    let before = rss(pid);
    let payload = vec![7u8; 1_000_000];
    let mut tasks = vec![];
    for _ in 0..3 {
        let mut s = connect().await;
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent_all = 0;
            for _ in 0..300 {
                let sent = tokio::time::timeout(Duration::from_secs(10), async {
                    s.write_all(&FrameHeader::encode(FrameKind::Ping, payload.len()))
                        .await?;
                    s.write_all(&payload).await
                })
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
                sent_all += 1;
            }
            (s, sent_all)
        }));
    }
    let mut held = vec![];
    for t in tasks {
        let (s, n) = t.await.unwrap();
        assert_eq!(n, 300, "the node kept reading PINGs");
        held.push(s);
    }
    let after = rss(pid);
    let grown = after.saturating_sub(before);
    assert!(
        grown < 150 << 20,
        "900 MB of PINGs never read grew the node by {} MiB",
        grown >> 20
    );
    drop(held);
}

/// A subscriber that never reads while large events arrive does not grow the node without
/// bound: its queue is bounded in bytes (`limits.outbox_max_bytes`), not only in messages (8192
/// messages of 1 MB would be 8 GB). Older events are dropped and counted instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_never_read_do_not_grow_the_node() {
    use macula_wamp::rawsocket::{FrameHeader, FrameKind};
    use macula_wamp::{Message, Serializer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let home = tempfile::tempdir().unwrap();
    let (up, api, v) = Api::start(home.path());
    let pid = up.0.id();
    let realm = v["realm"].as_str().unwrap().to_owned();
    let key = v["key"].as_str().unwrap().to_owned();
    let topic = format!("{realm}.big");
    let addr = v["rawsocket"]
        .as_str()
        .unwrap()
        .trim_start_matches("rs://")
        .to_owned();
    // A RawSocket subscriber (JSON) that joins, subscribes, and then never reads again.
    let mut s = raw_connect(&addr).await;
    async fn send(s: &mut tokio::net::TcpStream, m: Message) {
        let bytes = Serializer::Json.encode(&m);
        s.write_all(&FrameHeader::encode(FrameKind::Message, bytes.len()))
            .await
            .unwrap();
        s.write_all(&bytes).await.unwrap();
    }
    async fn recv(s: &mut tokio::net::TcpStream) -> Message {
        let mut h = [0u8; 4];
        s.read_exact(&mut h).await.unwrap();
        let h = FrameHeader::parse(h).unwrap();
        let mut b = vec![0u8; h.len];
        s.read_exact(&mut b).await.unwrap();
        Serializer::Json.decode(&b).unwrap()
    }
    let mut hello = macula_wamp::Dict::new();
    hello.insert(
        "authmethods".into(),
        Value::List(vec![Value::from("ticket")]),
    );
    send(
        &mut s,
        Message::Hello {
            realm: realm.clone(),
            details: hello,
        },
    )
    .await;
    assert!(matches!(recv(&mut s).await, Message::Challenge { .. }));
    send(
        &mut s,
        Message::Authenticate {
            signature: key.clone(),
            extra: Default::default(),
        },
    )
    .await;
    assert!(matches!(recv(&mut s).await, Message::Welcome { .. }));
    send(
        &mut s,
        Message::Subscribe {
            request: 1,
            options: Default::default(),
            topic: topic.clone(),
        },
    )
    .await;
    assert!(matches!(recv(&mut s).await, Message::Subscribed { .. }));

    // 800 events of 1 MB, each acknowledged by the router.
    let before = rss(pid);
    let publisher = api.connect(&realm, &key).await.unwrap();
    let big = Payload::args(vec![Value::Bin(vec![7u8; 1_000_000])]);
    let mut ack = macula_wamp::Dict::new();
    ack.insert("acknowledge".into(), Value::Bool(true));
    for _ in 0..800 {
        publisher
            .publish_with(&topic, big.clone(), ack.clone())
            .await
            .unwrap();
    }
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 300 << 20,
        "800 MB of events a subscriber never read grew the node by {} MiB",
        grown >> 20
    );
    // The node still serves: the metrics say events were dropped for the slow subscriber.
    let metrics = ureq::get(&format!("{}/metrics", api.http))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("macula_queue_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "{metrics}");
    drop(s);
}
