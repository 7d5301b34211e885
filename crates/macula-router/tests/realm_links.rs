//! Two realms standing for two nodes, wired through link members by hand: the mesh semantics
//! without sockets (interest, forwarding once, ACL re-checks, calls across, node loss).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use macula_router::policy::Policy;
use macula_router::{
    Announce, Forwarded, LinkError, Origin, Peer, Realm, RealmConfig, SessionInfo,
};
use macula_wamp::uri::MatchPolicy;
use macula_wamp::{code, dict, errors, Dict, Id, Message, Payload, Value};

#[derive(Debug, Clone)]
enum Out {
    Msg(Message),
    Pub {
        publication: Id,
        topic: String,
        options: Dict,
        origin: Origin,
    },
    Call {
        invocation: Id,
        procedure: String,
        options: Dict,
        origin: Origin,
    },
}

#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<Out>>>);

impl Peer for Inbox {
    fn send(&self, msg: Arc<Message>) {
        self.0.lock().unwrap().push(Out::Msg((*msg).clone()));
    }
    fn forward(&self, f: Forwarded<'_>) {
        let o = |i: &SessionInfo| Origin {
            session: i.id,
            authid: i.authid.clone(),
            authrole: i.authrole.clone(),
        };
        self.0.lock().unwrap().push(match f {
            Forwarded::Publication {
                publication,
                topic,
                options,
                origin,
                ..
            } => Out::Pub {
                publication,
                topic: topic.into(),
                options: options.clone(),
                origin: o(origin),
            },
            Forwarded::Call {
                invocation,
                procedure,
                options,
                origin,
                ..
            } => Out::Call {
                invocation,
                procedure: procedure.into(),
                options,
                origin: o(origin),
            },
        });
    }
}

impl Inbox {
    fn take(&self) -> Vec<Out> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    fn msgs(&self) -> Vec<Message> {
        self.take()
            .into_iter()
            .filter_map(|o| if let Out::Msg(m) = o { Some(m) } else { None })
            .collect()
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
      - pubsub:subscribe:com.acme.*
      - rpc:call:com.acme.queries.*
"#;

type Announced = Arc<Mutex<Vec<Announce>>>;

fn node(seed: u64) -> (Realm<Inbox>, Announced) {
    let policy = Arc::new(Policy::from_yaml(POLICY).unwrap());
    let mut r = Realm::new("com.acme", policy, RealmConfig::default(), seed);
    let log: Announced = Default::default();
    let l = log.clone();
    r.set_announcer(Arc::new(move |realm, a| {
        assert_eq!(realm, "com.acme");
        l.lock().unwrap().push(a)
    }));
    (r, log)
}

fn join(r: &mut Realm<Inbox>, role: &str) -> (Id, Inbox) {
    let inbox = Inbox::default();
    let id = r.new_session_id();
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
    r.join(info, inbox.clone());
    inbox.take();
    (id, inbox)
}

fn sub(r: &mut Realm<Inbox>, s: Id, topic: &str, m: &str) {
    let msg = Message::Subscribe {
        request: 1,
        options: dict! {"match" => m},
        topic: topic.into(),
    };
    r.handle(s, msg, Instant::now()).unwrap();
}

#[test]
fn interest_is_announced_once_and_a_publication_crosses_once() {
    let (mut a, _) = node(1);
    let (mut b, b_log) = node(2);
    let (s1, s1_in) = join(&mut b, "sensor");
    let (s2, _) = join(&mut b, "sensor");
    sub(&mut b, s1, "com.acme.home.t", "exact");
    sub(&mut b, s2, "com.acme.home.t", "exact");
    sub(&mut b, s1, "com.acme.home", "prefix");
    s1_in.take();
    let announced = b_log.lock().unwrap().clone();
    assert_eq!(
        announced.len(),
        2,
        "one announcement per (uri, policy): {announced:?}"
    );
    // The link for node B on node A takes B's interest.
    let link_in = Inbox::default();
    let link = a.join_link("node-b", link_in.clone());
    for an in announced {
        if let Announce::Interest {
            uri,
            policy,
            by: Some(by),
        } = an
        {
            assert_eq!(by.session, s1, "the first subscriber holds it");
            a.link_subscribe(link, &uri, policy, &by.role).unwrap();
        }
    }
    assert_eq!(a.session_count(), 0, "links are not sessions");
    let (p, _) = join(&mut a, "sensor");
    let publish = Message::Publish {
        request: 5,
        options: dict! {"exclude" => vec![Value::from(s2)]},
        topic: "com.acme.home.t".into(),
        payload: Payload::args(vec![Value::from(42u64)]),
    };
    a.handle(p, publish, Instant::now()).unwrap();
    let out = link_in.take();
    assert_eq!(
        out.len(),
        1,
        "forwarded once although two subscriptions match: {out:?}"
    );
    let Out::Pub {
        publication,
        topic,
        options,
        origin,
    } = out[0].clone()
    else {
        panic!("{out:?}")
    };
    assert_eq!(origin.authrole, "sensor");
    // Node B delivers to its own subscribers, honouring the publisher's exclusions.
    b.link_publish(
        &origin,
        publication,
        &options,
        &topic,
        Payload::args(vec![Value::from(42u64)]),
    )
    .unwrap();
    let got = s1_in.msgs();
    assert_eq!(got.len(), 2, "one event per matching subscription: {got:?}");
    assert!(got
        .iter()
        .all(|m| matches!(m, Message::Event { publication: p, .. } if *p == publication)));
    // A forged role gains nothing: B checks its own policy.
    let forged = Origin {
        authrole: "sensor".into(),
        ..origin.clone()
    };
    assert!(b
        .link_publish(
            &forged,
            9,
            &Dict::new(),
            "com.acme.secret",
            Payload::default()
        )
        .is_err());
    let nobody = Origin {
        authrole: "intruder".into(),
        ..origin
    };
    assert!(b
        .link_publish(
            &nobody,
            9,
            &Dict::new(),
            "com.acme.home.t",
            Payload::default()
        )
        .is_err());
    assert!(s1_in.msgs().is_empty());
    // The session that held the interest leaves: it is announced again, held by the other.
    b_log.lock().unwrap().clear();
    b.leave(s1);
    let moved: Vec<Announce> = b_log.lock().unwrap().drain(..).collect();
    assert!(
        moved
            .iter()
            .any(|a| matches!(a, Announce::Interest { uri, by: Some(by), .. }
            if uri == "com.acme.home.t" && by.session == s2)),
        "{moved:?}"
    );
    assert!(
        moved.contains(&Announce::Interest {
            uri: "com.acme.home".into(),
            policy: MatchPolicy::Prefix,
            by: None
        }),
        "s1 alone held the prefix subscription: {moved:?}"
    );
    // The last local unsubscribe withdraws interest.
    b.leave(s2);
    let gone: Vec<Announce> = b_log.lock().unwrap().drain(..).collect();
    assert_eq!(
        gone,
        vec![Announce::Interest {
            uri: "com.acme.home.t".into(),
            policy: MatchPolicy::Exact,
            by: None
        }]
    );
    // A role that may not subscribe there is refused.
    assert!(matches!(
        a.link_subscribe(link, "org.other.secret", MatchPolicy::Exact, "sensor"),
        Err(LinkError::NotAuthorized(_))
    ));
}

#[test]
fn calls_cross_nodes_and_fail_cleanly_when_the_node_goes() {
    let (mut a, _) = node(3);
    let (mut b, b_log) = node(4);
    let (callee, callee_in) = join(&mut b, "admin");
    let reg = Message::Register {
        request: 1,
        options: dict! {"invoke" => "roundrobin"},
        procedure: "com.acme.queries.sum".into(),
    };
    b.handle(callee, reg, Instant::now()).unwrap();
    callee_in.take();
    let Some(Announce::Registration {
        uri,
        policy,
        invoke,
        by: Some(by),
    }) = b_log.lock().unwrap().pop()
    else {
        panic!()
    };
    assert_eq!((by.session, by.role.as_str()), (callee, "admin"));
    let a_link_in = Inbox::default();
    let a_link = a.join_link("node-b", a_link_in.clone());
    a.link_register(a_link, &uri, policy, invoke, &by.role)
        .unwrap();
    // A role that may not register there is refused.
    assert!(a
        .link_register(a_link, "com.acme.x", MatchPolicy::Exact, invoke, "sensor")
        .is_err());
    let (caller, caller_in) = join(&mut a, "sensor");
    let call = |req| Message::Call {
        request: req,
        options: dict! {"receive_progress" => true},
        procedure: "com.acme.queries.sum".into(),
        payload: Payload::args(vec![Value::from(1u64)]),
    };
    a.handle(caller, call(10), Instant::now()).unwrap();
    let Some(Out::Call {
        invocation,
        procedure,
        options,
        origin,
    }) = a_link_in.take().pop()
    else {
        panic!()
    };
    // On B the call comes in through B's link for A and reaches the local callee.
    let b_link_in = Inbox::default();
    let b_link = b.join_link("node-a", b_link_in.clone());
    b.link_call(
        b_link,
        &origin,
        invocation,
        options,
        procedure,
        Payload::args(vec![]),
        Instant::now(),
    )
    .unwrap();
    let Some(Message::Invocation { request: inv, .. }) = callee_in.msgs().pop() else {
        panic!()
    };
    b.handle(
        callee,
        Message::Yield {
            request: inv,
            options: dict! {"progress" => true},
            payload: Payload::args(vec![Value::from(1u64)]),
        },
        Instant::now(),
    )
    .unwrap();
    b.handle(
        callee,
        Message::Yield {
            request: inv,
            options: Dict::new(),
            payload: Payload::args(vec![Value::from(2u64)]),
        },
        Instant::now(),
    )
    .unwrap();
    for m in b_link_in.msgs() {
        a.link_reply(a_link, m).unwrap();
    }
    let got = caller_in.msgs();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        matches!(&got[0], Message::Result { request: 10, details, .. } if details.get("progress").is_some())
    );
    assert!(
        matches!(&got[1], Message::Result { request: 10, payload, .. } if payload.args == vec![Value::from(2u64)])
    );
    // A call forwarded to B never bounces to a third node: with no local callee it fails.
    let (mut c, _) = node(5);
    let c_link = c.join_link("node-d", Inbox::default());
    c.link_register(
        c_link,
        "com.acme.queries.sum",
        MatchPolicy::Exact,
        invoke,
        "admin",
    )
    .unwrap();
    let c_in = Inbox::default();
    let from_a = c.join_link("node-a", c_in.clone());
    c.link_call(
        from_a,
        &origin_of(caller),
        77,
        Dict::new(),
        "com.acme.queries.sum".into(),
        Payload::default(),
        Instant::now(),
    )
    .unwrap();
    assert!(
        matches!(c_in.msgs().pop(), Some(Message::Error { request: 77, error, .. }) if error == errors::NO_SUCH_PROCEDURE)
    );
    // A call not allowed for the origin's role on B is refused there, with the error sent back.
    c.link_call(
        from_a,
        &origin_of(caller),
        78,
        Dict::new(),
        "com.acme.admin.x".into(),
        Payload::default(),
        Instant::now(),
    )
    .unwrap_err();
    assert!(
        matches!(c_in.msgs().pop(), Some(Message::Error { request: 78, error, .. }) if error == errors::NOT_AUTHORIZED)
    );
    // Node B goes away mid-call: the caller gets a clear error at once and the next call has
    // no callee left.
    a.handle(caller, call(11), Instant::now()).unwrap();
    a.leave(a_link);
    let got = caller_in.msgs();
    assert!(
        matches!(&got[..], [Message::Error { request: 11, request_type: code::CALL, error, payload, .. }]
        if error == errors::CANCELED && format!("{:?}", payload.args).contains("node left the mesh")),
        "{got:?}"
    );
    a.handle(caller, call(12), Instant::now()).unwrap();
    assert!(
        matches!(caller_in.msgs().pop(), Some(Message::Error { request: 12, error, .. }) if error == errors::NO_SUCH_PROCEDURE)
    );
}

fn origin_of(id: Id) -> Origin {
    Origin {
        session: id,
        authid: "k".into(),
        authrole: "sensor".into(),
    }
}
