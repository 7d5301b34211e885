//! The router core driven without sockets: every rule of the broker, dealer and ACLs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use macula_router::policy::Policy;
use macula_router::{Peer, Realm, RealmConfig, SessionInfo};
use macula_wamp::{code, dict, errors, Dict, Id, Message, Payload, Value};

#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<Message>>>);

impl Peer for Inbox {
    fn send(&self, msg: Arc<Message>) {
        self.0.lock().unwrap().push((*msg).clone());
    }
}

impl Inbox {
    fn take(&self) -> Vec<Message> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

const POLICY: &str = r#"
realm: com.acme
roles:
  - name: admin
    permissions: [realm:*]
  - name: sensor
    permissions:
      - pubsub:publish:com.acme.home.*
      - rpc:call:com.acme.queries.*
"#;

struct World {
    realm: Realm<Inbox>,
    now: Instant,
}

impl World {
    fn new() -> World {
        let policy = Arc::new(Policy::from_yaml(POLICY).unwrap());
        World {
            realm: Realm::new("com.acme", policy, RealmConfig::default(), 42),
            now: Instant::now(),
        }
    }

    fn join(&mut self, role: &str) -> (Id, Inbox) {
        let inbox = Inbox::default();
        let id = self.realm.new_session_id();
        let info = SessionInfo {
            id,
            authid: format!("key_{id}"),
            authrole: role.into(),
            authmethod: "ticket",
            transport: Dict::new(),
            callee_cancel: true,
            link: false,
            proof: None,
        };
        let welcome = self.realm.join(info, inbox.clone());
        assert!(matches!(welcome, Message::Welcome { session, .. } if session == id));
        (id, inbox)
    }

    fn send(&mut self, from: Id, m: Message) -> Result<(), Message> {
        self.realm.handle(from, m, self.now)
    }
}

fn subscribe(w: &mut World, s: Id, inbox: &Inbox, topic: &str, options: Dict) -> Id {
    w.send(
        s,
        Message::Subscribe {
            request: 1,
            options,
            topic: topic.into(),
        },
    )
    .unwrap();
    match inbox.take().pop() {
        Some(Message::Subscribed { subscription, .. }) => subscription,
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    }
}

fn register(w: &mut World, s: Id, inbox: &Inbox, proc_: &str, options: Dict) -> Id {
    w.send(
        s,
        Message::Register {
            request: 1,
            options,
            procedure: proc_.into(),
        },
    )
    .unwrap();
    match inbox.take().pop() {
        Some(Message::Registered { registration, .. }) => registration,
        other => panic!("expected REGISTERED, got {other:?}"),
    }
}

fn publish(topic: &str, options: Dict, args: Vec<Value>) -> Message {
    Message::Publish {
        request: 7,
        options,
        topic: topic.into(),
        payload: Payload::args(args),
    }
}

fn call(request: Id, procedure: &str, options: Dict) -> Message {
    Message::Call {
        request,
        options,
        procedure: procedure.into(),
        payload: Payload::args(vec![Value::Int(1)]),
    }
}

fn events(inbox: &Inbox) -> Vec<Message> {
    inbox
        .take()
        .into_iter()
        .filter(|m| matches!(m, Message::Event { .. }))
        .collect()
}

#[test]
fn publish_reaches_exact_prefix_and_wildcard_subscribers_but_not_the_publisher() {
    let mut w = World::new();
    let (a, ia) = w.join("admin");
    let (b, ib) = w.join("admin");
    let (c, ic) = w.join("admin");
    subscribe(&mut w, a, &ia, "com.acme.t.x", dict! {});
    let sb = subscribe(&mut w, b, &ib, "com.acme.t", dict! {"match" => "prefix"});
    subscribe(&mut w, c, &ic, "com.acme..x", dict! {"match" => "wildcard"});
    w.send(
        a,
        publish(
            "com.acme.t.x",
            dict! {"acknowledge" => true},
            vec![Value::Int(5)],
        ),
    )
    .unwrap();
    assert!(
        matches!(
            ia.take().as_slice(),
            [Message::Published { request: 7, .. }]
        ),
        "publisher excluded by default, gets PUBLISHED"
    );
    match events(&ib).as_slice() {
        [Message::Event {
            subscription,
            details,
            payload,
            ..
        }] => {
            assert_eq!(*subscription, sb);
            assert_eq!(details.get("topic"), Some(&Value::from("com.acme.t.x")));
            assert_eq!(payload.args, vec![Value::Int(5)]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(events(&ic).len(), 1);
    w.send(
        a,
        publish("com.acme.t.x", dict! {"exclude_me" => false}, vec![]),
    )
    .unwrap();
    assert_eq!(
        events(&ia).len(),
        1,
        "exclude_me=false delivers to the publisher too"
    );
}

#[test]
fn black_and_white_listing_and_publisher_disclosure() {
    let mut w = World::new();
    let (p, _ip) = w.join("admin");
    let (a, ia) = w.join("admin");
    let (b, ib) = w.join("admin");
    subscribe(&mut w, a, &ia, "com.acme.t", dict! {});
    subscribe(&mut w, b, &ib, "com.acme.t", dict! {});
    w.send(
        p,
        publish(
            "com.acme.t",
            dict! {"exclude" => vec![Value::from(a)]},
            vec![],
        ),
    )
    .unwrap();
    assert_eq!((events(&ia).len(), events(&ib).len()), (0, 1));
    w.send(
        p,
        publish(
            "com.acme.t",
            dict! {"eligible" => vec![Value::from(a)], "disclose_me" => true},
            vec![],
        ),
    )
    .unwrap();
    assert_eq!(events(&ib).len(), 0);
    match events(&ia).as_slice() {
        [Message::Event { details, .. }] => {
            assert_eq!(details.get("publisher"), Some(&Value::from(p)))
        }
        other => panic!("{other:?}"),
    }
    w.send(
        p,
        publish(
            "com.acme.t",
            dict! {"exclude_authid" => vec![Value::from(format!("key_{b}"))]},
            vec![],
        ),
    )
    .unwrap();
    assert_eq!((events(&ia).len(), events(&ib).len()), (1, 0));
}

#[test]
fn same_topic_subscriptions_share_an_id_and_unsubscribe_is_checked() {
    let mut w = World::new();
    let (a, ia) = w.join("admin");
    let (b, ib) = w.join("admin");
    let s1 = subscribe(&mut w, a, &ia, "com.acme.t", dict! {});
    let s2 = subscribe(&mut w, b, &ib, "com.acme.t", dict! {});
    assert_eq!(s1, s2);
    w.send(
        a,
        Message::Unsubscribe {
            request: 2,
            subscription: s1,
        },
    )
    .unwrap();
    assert!(matches!(
        ia.take().as_slice(),
        [Message::Unsubscribed { request: 2 }]
    ));
    w.send(
        a,
        Message::Unsubscribe {
            request: 3,
            subscription: s1,
        },
    )
    .unwrap();
    assert!(
        matches!(ia.take().as_slice(), [Message::Error { error, .. }] if error == errors::NO_SUCH_SUBSCRIPTION)
    );
}

#[test]
fn denied_operations_return_not_authorized_naming_the_permission() {
    let mut w = World::new();
    let (s, is) = w.join("sensor");
    w.send(
        s,
        Message::Subscribe {
            request: 1,
            options: dict! {},
            topic: "com.acme.home.x".into(),
        },
    )
    .unwrap();
    match is.take().as_slice() {
        [Message::Error {
            error,
            payload,
            request_type,
            ..
        }] => {
            assert_eq!(error, errors::NOT_AUTHORIZED);
            assert_eq!(*request_type, code::SUBSCRIBE);
            let msg = payload.args[0].as_str().unwrap();
            assert!(msg.contains("pubsub:subscribe:com.acme.home.x"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    w.send(
        s,
        publish("com.acme.other", dict! {"acknowledge" => true}, vec![]),
    )
    .unwrap();
    assert!(
        matches!(is.take().as_slice(), [Message::Error { error, .. }] if error == errors::NOT_AUTHORIZED)
    );
    w.send(
        s,
        publish("com.acme.home.t", dict! {"acknowledge" => true}, vec![]),
    )
    .unwrap();
    assert!(matches!(is.take().as_slice(), [Message::Published { .. }]));
    w.send(
        s,
        Message::Register {
            request: 4,
            options: dict! {},
            procedure: "com.acme.queries.x".into(),
        },
    )
    .unwrap();
    assert!(
        matches!(is.take().as_slice(), [Message::Error { error, .. }] if error == errors::NOT_AUTHORIZED)
    );
    w.send(s, call(5, "wamp.session.count", dict! {})).unwrap();
    assert!(
        matches!(is.take().as_slice(), [Message::Error { error, .. }] if error == errors::NOT_AUTHORIZED)
    );
}

#[test]
fn rpc_round_trip_with_caller_disclosure_and_progressive_results() {
    let mut w = World::new();
    let (callee, ie) = w.join("admin");
    let (caller, ic) = w.join("admin");
    let reg = register(&mut w, callee, &ie, "com.acme.add", dict! {});
    w.send(
        caller,
        call(
            11,
            "com.acme.add",
            dict! {"disclose_me" => true, "receive_progress" => true},
        ),
    )
    .unwrap();
    let inv = match ie.take().as_slice() {
        [Message::Invocation {
            request,
            registration,
            details,
            ..
        }] => {
            assert_eq!(*registration, reg);
            assert_eq!(details.get("caller"), Some(&Value::from(caller)));
            assert_eq!(details.get("receive_progress"), Some(&Value::Bool(true)));
            *request
        }
        other => panic!("{other:?}"),
    };
    w.send(
        callee,
        Message::Yield {
            request: inv,
            options: dict! {"progress" => true},
            payload: Payload::args(vec![Value::Int(1)]),
        },
    )
    .unwrap();
    w.send(
        callee,
        Message::Yield {
            request: inv,
            options: dict! {},
            payload: Payload::args(vec![Value::Int(2)]),
        },
    )
    .unwrap();
    match ic.take().as_slice() {
        [Message::Result {
            request: 11,
            details: d1,
            payload: p1,
        }, Message::Result {
            request: 11,
            details: d2,
            payload: p2,
        }] => {
            assert_eq!(d1.get("progress"), Some(&Value::Bool(true)));
            assert_eq!(p1.args, vec![Value::Int(1)]);
            assert!(d2.get("progress").is_none());
            assert_eq!(p2.args, vec![Value::Int(2)]);
        }
        other => panic!("{other:?}"),
    }
    // A late YIELD for a finished invocation is ignored; one for an id never issued aborts.
    assert!(w
        .send(
            callee,
            Message::Yield {
                request: inv,
                options: dict! {},
                payload: Payload::default()
            }
        )
        .is_ok());
    let abort = w
        .send(
            callee,
            Message::Yield {
                request: 999_999,
                options: dict! {},
                payload: Payload::default(),
            },
        )
        .unwrap_err();
    assert!(matches!(abort, Message::Abort { reason, .. } if reason == errors::PROTOCOL_VIOLATION));
}

#[test]
fn calls_to_unknown_procedures_and_duplicate_registrations_fail_with_spec_errors() {
    let mut w = World::new();
    let (a, ia) = w.join("admin");
    let (b, ib) = w.join("admin");
    w.send(a, call(1, "com.acme.nothing", dict! {})).unwrap();
    assert!(
        matches!(ia.take().as_slice(), [Message::Error { error, .. }] if error == errors::NO_SUCH_PROCEDURE)
    );
    register(&mut w, a, &ia, "com.acme.p", dict! {});
    w.send(
        b,
        Message::Register {
            request: 2,
            options: dict! {},
            procedure: "com.acme.p".into(),
        },
    )
    .unwrap();
    assert!(
        matches!(ib.take().as_slice(), [Message::Error { error, .. }] if error == errors::PROCEDURE_ALREADY_EXISTS)
    );
    w.send(
        b,
        Message::Register {
            request: 3,
            options: dict! {},
            procedure: "wamp.session.count".into(),
        },
    )
    .unwrap();
    assert!(
        matches!(ib.take().as_slice(), [Message::Error { error, .. }] if error == errors::INVALID_URI)
    );
    w.send(
        b,
        Message::Register {
            request: 3,
            options: dict! {},
            procedure: "com.Acme.bad".into(),
        },
    )
    .unwrap();
    assert!(
        matches!(ib.take().as_slice(), [Message::Error { error, .. }] if error == errors::INVALID_URI)
    );
}

fn invoked(inbox: &Inbox) -> usize {
    inbox
        .take()
        .iter()
        .filter(|m| matches!(m, Message::Invocation { .. }))
        .count()
}

#[test]
fn shared_registrations_follow_their_invocation_policy() {
    for (policy, expect) in [
        ("roundrobin", [2, 2, 2]),
        ("first", [6, 0, 0]),
        ("last", [0, 0, 6]),
    ] {
        let mut w = World::new();
        let (caller, _ic) = w.join("admin");
        let callees: Vec<(Id, Inbox)> = (0..3).map(|_| w.join("admin")).collect();
        for (c, i) in &callees {
            register(&mut w, *c, i, "com.acme.svc", dict! {"invoke" => policy});
        }
        for r in 0..6 {
            w.send(caller, call(100 + r, "com.acme.svc", dict! {}))
                .unwrap();
        }
        let got: Vec<usize> = callees.iter().map(|(_, i)| invoked(i)).collect();
        assert_eq!(got, expect, "{policy}");
    }
    let mut w = World::new();
    let (caller, _ic) = w.join("admin");
    let callees: Vec<(Id, Inbox)> = (0..2).map(|_| w.join("admin")).collect();
    for (c, i) in &callees {
        register(&mut w, *c, i, "com.acme.svc", dict! {"invoke" => "random"});
    }
    for r in 0..200 {
        w.send(caller, call(r + 1, "com.acme.svc", dict! {}))
            .unwrap();
    }
    let got: Vec<usize> = callees.iter().map(|(_, i)| invoked(i)).collect();
    assert_eq!(got.iter().sum::<usize>(), 200);
    assert!(got.iter().all(|n| *n > 50), "random spreads calls: {got:?}");
    // A different policy on an existing shared registration is refused.
    let (x, ix) = w.join("admin");
    w.send(
        x,
        Message::Register {
            request: 1,
            options: dict! {"invoke" => "first"},
            procedure: "com.acme.svc".into(),
        },
    )
    .unwrap();
    assert!(
        matches!(ix.take().as_slice(), [Message::Error { error, .. }] if error == errors::PROCEDURE_ALREADY_EXISTS)
    );
}

#[test]
fn cancel_modes_and_timeouts_end_calls_with_canceled() {
    let mut w = World::new();
    let (callee, ie) = w.join("admin");
    let (caller, ic) = w.join("admin");
    register(&mut w, callee, &ie, "com.acme.slow", dict! {});
    // skip: error at once, no interrupt
    w.send(caller, call(1, "com.acme.slow", dict! {})).unwrap();
    ie.take();
    w.send(
        caller,
        Message::Cancel {
            request: 1,
            options: dict! {"mode" => "skip"},
        },
    )
    .unwrap();
    assert!(
        matches!(ic.take().as_slice(), [Message::Error { request: 1, error, .. }] if error == errors::CANCELED)
    );
    assert!(ie.take().is_empty());
    // kill: interrupt, then the callee's error becomes canceled
    w.send(caller, call(2, "com.acme.slow", dict! {})).unwrap();
    let inv = match ie.take().as_slice() {
        [Message::Invocation { request, .. }] => *request,
        other => panic!("{other:?}"),
    };
    w.send(
        caller,
        Message::Cancel {
            request: 2,
            options: dict! {"mode" => "kill"},
        },
    )
    .unwrap();
    assert!(
        matches!(ie.take().as_slice(), [Message::Interrupt { request, .. }] if *request == inv)
    );
    assert!(ic.take().is_empty(), "kill waits for the callee");
    w.send(
        callee,
        Message::Error {
            request_type: code::INVOCATION,
            request: inv,
            details: dict! {},
            error: "com.acme.oops".into(),
            payload: Payload::default(),
        },
    )
    .unwrap();
    assert!(
        matches!(ic.take().as_slice(), [Message::Error { request: 2, error, .. }] if error == errors::CANCELED)
    );
    // timeout
    w.send(
        caller,
        call(3, "com.acme.slow", dict! {"timeout" => 100u64}),
    )
    .unwrap();
    ie.take();
    w.realm.tick(w.now + Duration::from_millis(50));
    assert!(ic.take().is_empty());
    w.realm.tick(w.now + Duration::from_millis(150));
    assert!(
        matches!(ic.take().as_slice(), [Message::Error { request: 3, error, .. }] if error == errors::CANCELED)
    );
    assert!(matches!(ie.take().as_slice(), [Message::Interrupt { .. }]));
}

#[test]
fn callee_leaving_fails_its_calls_and_meta_events_announce_joins_and_leaves() {
    let mut w = World::new();
    let (watcher, iw) = w.join("admin");
    subscribe(&mut w, watcher, &iw, "wamp.session.on_leave", dict! {});
    subscribe(&mut w, watcher, &iw, "wamp.session.on_join", dict! {});
    let (callee, ie) = w.join("admin");
    let (caller, ic) = w.join("admin");
    assert_eq!(events(&iw).len(), 2);
    register(&mut w, callee, &ie, "com.acme.p", dict! {});
    w.send(caller, call(9, "com.acme.p", dict! {})).unwrap();
    w.realm.leave(callee);
    assert!(
        matches!(ic.take().as_slice(), [Message::Error { request: 9, error, .. }] if error == errors::CANCELED)
    );
    match events(&iw).as_slice() {
        [Message::Event {
            payload,
            publication,
            ..
        }] => {
            assert_eq!(payload.args[0], Value::from(callee));
            assert!(
                (1..=macula_wamp::MAX_ID).contains(publication),
                "meta events carry valid publication ids"
            );
        }
        other => panic!("{other:?}"),
    }
    w.send(caller, call(10, "com.acme.p", dict! {})).unwrap();
    assert!(
        matches!(ic.take().as_slice(), [Message::Error { error, .. }] if error == errors::NO_SUCH_PROCEDURE)
    );
}

#[test]
fn session_meta_api_counts_lists_and_gets() {
    let mut w = World::new();
    let (a, ia) = w.join("admin");
    let (b, _ib) = w.join("sensor");
    w.send(a, call(1, "wamp.session.count", dict! {})).unwrap();
    w.send(
        a,
        Message::Call {
            request: 2,
            options: dict! {},
            procedure: "wamp.session.list".into(),
            payload: Payload::args(vec![Value::List(vec!["sensor".into()])]),
        },
    )
    .unwrap();
    w.send(
        a,
        Message::Call {
            request: 3,
            options: dict! {},
            procedure: "wamp.session.get".into(),
            payload: Payload::args(vec![Value::from(b)]),
        },
    )
    .unwrap();
    w.send(
        a,
        Message::Call {
            request: 4,
            options: dict! {},
            procedure: "wamp.session.get".into(),
            payload: Payload::args(vec![Value::from(12345u64)]),
        },
    )
    .unwrap();
    match ia.take().as_slice() {
        [Message::Result { payload: p1, .. }, Message::Result { payload: p2, .. }, Message::Result { payload: p3, .. }, Message::Error { error, .. }] =>
        {
            assert_eq!(p1.args, vec![Value::Int(2)]);
            assert_eq!(p2.args, vec![Value::List(vec![Value::from(b)])]);
            assert_eq!(
                p3.args[0].as_dict().unwrap().get("authrole"),
                Some(&Value::from("sensor"))
            );
            assert_eq!(error, errors::NO_SUCH_SESSION);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn router_only_messages_from_a_client_abort_the_session() {
    let mut w = World::new();
    let (a, _ia) = w.join("admin");
    let r = w.send(
        a,
        Message::Event {
            subscription: 1,
            publication: 1,
            details: dict! {},
            payload: Payload::default(),
        },
    );
    assert!(
        matches!(r, Err(Message::Abort { reason, .. }) if reason == errors::PROTOCOL_VIOLATION)
    );
    let r = w.send(
        a,
        Message::Goodbye {
            details: dict! {},
            reason: errors::NORMAL.into(),
        },
    );
    assert!(matches!(r, Err(Message::Goodbye { reason, .. }) if reason == errors::GOODBYE_AND_OUT));
}

#[test]
fn huge_call_timeouts_do_not_panic_and_finished_calls_do_not_accumulate() {
    let mut w = World::new();
    let (callee, ie) = w.join("admin");
    let (caller, ic) = w.join("admin");
    register(&mut w, callee, &ie, "com.acme.p", dict! {});
    for r in 1..=3000u64 {
        w.send(
            caller,
            call(r, "com.acme.p", dict! {"timeout" => u64::MAX >> 1}),
        )
        .unwrap();
        let inv = match ie.take().pop() {
            Some(Message::Invocation { request, .. }) => request,
            other => panic!("{other:?}"),
        };
        w.send(
            callee,
            Message::Yield {
                request: inv,
                options: dict! {},
                payload: Payload::default(),
            },
        )
        .unwrap();
    }
    assert_eq!(ic.take().len(), 3000);
    assert_eq!(w.realm.stats().2, 0, "no call left in flight");
}

#[test]
fn per_session_subscription_and_registration_limits_answer_limit_exceeded() {
    let policy = Arc::new(Policy::from_yaml(POLICY).unwrap());
    let config = RealmConfig {
        max_subscriptions_per_session: 2,
        max_registrations_per_session: 1,
        ..RealmConfig::default()
    };
    let mut w = World {
        realm: Realm::new("com.acme", policy, config, 7),
        now: Instant::now(),
    };
    let (s, inbox) = w.join("admin");
    subscribe(&mut w, s, &inbox, "com.acme.a", dict! {});
    subscribe(&mut w, s, &inbox, "com.acme.b", dict! {});
    w.send(
        s,
        Message::Subscribe {
            request: 3,
            options: dict! {},
            topic: "com.acme.c".into(),
        },
    )
    .unwrap();
    assert!(
        matches!(inbox.take().as_slice(), [Message::Error { error, .. }] if error == errors::LIMIT_EXCEEDED)
    );
    register(&mut w, s, &inbox, "com.acme.p", dict! {});
    w.send(
        s,
        Message::Register {
            request: 4,
            options: dict! {},
            procedure: "com.acme.q".into(),
        },
    )
    .unwrap();
    assert!(
        matches!(inbox.take().as_slice(), [Message::Error { error, .. }] if error == errors::LIMIT_EXCEEDED)
    );
}
