//! Real `macula node` processes on loopback forming a mesh of three: pub/sub and RPC across
//! nodes, failover when a node is killed with SIGKILL, rejoin, and a revocation made at one node
//! enforced by the others. Nodes 2 and 3 start with only the trust root: they learn the realm's
//! policy from the mesh; node 3 is admitted with a certificate from `macula mesh certify`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use macula_client::{CallError, CallOptions, Client};
use macula_node::ConfDir;
use macula_wamp::{dict, Payload, Value};

mod common;
mod macula_up;

use common::*;

const REALM: &str = "com.example.mesh";

fn answer(name: &'static str) -> Result<Payload, CallError> {
    Ok(Payload::args(vec![Value::from(name)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_route_pubsub_and_rpc_fail_over_and_spread_revocations() {
    let (_tmp, [d1, d2, d3], _, admin) = three_homes();
    // Nodes 2 and 3: the trust root only. Node 2 may certify itself (it has the operator key);
    // node 3 gets its certificate from the operator's machine.
    for d in [&d2, &d3] {
        std::fs::create_dir_all(d.join("trust")).unwrap();
        std::fs::copy(d1.join("trust/operator.pub"), d.join("trust/operator.pub")).unwrap();
    }
    std::fs::copy(d1.join("trust/operator.key"), d2.join("trust/operator.key")).unwrap();
    let peer3 = identity(&d3, 7);
    let cert = cli(&["mesh", "certify", &peer3, "--home", d1.to_str().unwrap()]);
    std::fs::write(d3.join("node/node.cert"), cert.trim()).unwrap();

    let n1 = start_node(&d1, None);
    let mut n2 = start_node(&d2, Some(&n1.mesh));
    let n3 = start_node(&d3, Some(&n1.mesh));

    // A key issued once is accepted by every node (2 and 3 learned the realm over the mesh).
    let sub_client = Client::connect_with(opts(&n1.ws, &admin)).await.unwrap();
    let pub_client = eventually(
        "node 3 to learn the realm",
        Duration::from_secs(15),
        || async { Client::connect_with(opts(&n3.ws, &admin)).await.ok() },
    )
    .await;

    // Pub/sub across nodes: every event once, in order.
    let mut events = sub_client
        .subscribe_with(&format!("{REALM}.sensors"), dict! {"match" => "prefix"})
        .await
        .unwrap();
    wait_tables(&n3.http, 1, 0).await;
    for i in 0..200u64 {
        pub_client
            .publish(
                &format!("{REALM}.sensors.t{}", i % 3),
                Payload::args(vec![Value::from(i)]),
            )
            .await
            .unwrap();
    }
    for i in 0..200u64 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("event arrives")
            .expect("stream open");
        assert_eq!(ev.payload.args, vec![Value::from(i)], "per-publisher order");
    }
    pub_client
        .publish(&format!("{REALM}.sensors.end"), Payload::default())
        .await
        .unwrap();
    let last = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        last.payload.args.is_empty(),
        "no duplicate before the end marker"
    );

    // RPC across nodes: a shared registration on nodes 2 and 3, a slow procedure on node 2.
    // Node 2 learns the realm over the mesh as node 3 did (nothing above waited for it).
    let callee2 = eventually(
        "node 2 to learn the realm",
        Duration::from_secs(15),
        || async { Client::connect_with(opts(&n2.ws, &admin)).await.ok() },
    )
    .await;
    let callee3 = Client::connect_with(opts(&n3.ws, &admin)).await.unwrap();
    let shared = format!("{REALM}.whoami");
    let rr = dict! {"invoke" => "roundrobin"};
    let _r2 = callee2
        .register_with(&shared, rr.clone(), |_| async { answer("node2") })
        .await
        .unwrap();
    let _r3 = callee3
        .register_with(&shared, rr.clone(), |_| async { answer("node3") })
        .await
        .unwrap();
    let (reached_tx, mut reached) = tokio::sync::mpsc::unbounded_channel::<()>();
    let _slow = callee2
        .register(&format!("{REALM}.slow"), move |_| {
            let _ = reached_tx.send(());
            async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                answer("late")
            }
        })
        .await
        .unwrap();
    // Node 1 sees the shared procedure and the slow one (plus its two DHT services).
    wait_tables(&n1.http, 1, 4).await;
    let caller = sub_client;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let r = caller.call(&shared, Payload::default()).await.unwrap();
        seen.insert(r.args[0].as_str().unwrap().to_owned());
    }
    assert_eq!(
        seen.len(),
        2,
        "shared registration balances across nodes: {seen:?}"
    );

    // Kill node 2 mid-call: the caller gets a clear error within the peer timeout, not a hang.
    let slow = {
        let c = caller.clone();
        tokio::spawn(async move {
            let opts = CallOptions {
                timeout: Some(Duration::from_secs(30)),
                ..Default::default()
            };
            c.call_with(&format!("{REALM}.slow"), Payload::default(), opts)
                .await
        })
    };
    // Kill only once the invocation has reached the callee on node 2.
    tokio::time::timeout(Duration::from_secs(10), reached.recv())
        .await
        .expect("the slow call reaches node 2");
    let killed = Instant::now();
    n2.child.kill().unwrap(); // SIGKILL
    let _ = n2.child.wait();
    let err = tokio::time::timeout(Duration::from_secs(15), slow)
        .await
        .expect("the call ends well within its timeout")
        .unwrap()
        .expect_err("the callee's node died");
    let waited = killed.elapsed();
    assert!(err.to_string().contains("wamp.error.canceled"), "{err}");
    assert!(
        waited < Duration::from_secs(10),
        "detected after {waited:?}"
    );
    // The next calls go to the surviving callee.
    for _ in 0..3 {
        let r = caller.call(&shared, Payload::default()).await.unwrap();
        assert_eq!(r.args[0], Value::from("node3"));
    }

    // Node 2 rejoins with the same identity and serves again.
    let n2b = start_node(&d2, Some(&n1.mesh));
    let callee2b = eventually("node 2 to rejoin", Duration::from_secs(15), || async {
        Client::connect_with(opts(&n2b.ws, &admin)).await.ok()
    })
    .await;
    let _r2b = callee2b
        .register_with(&shared, rr, |_| async { answer("node2") })
        .await
        .unwrap();
    eventually(
        "calls to reach node 2 again",
        Duration::from_secs(15),
        || async {
            let r = caller.call(&shared, Payload::default()).await.ok()?;
            (r.args[0] == Value::from("node2")).then_some(())
        },
    )
    .await;

    // Revocation at node 1 is enforced by node 3 within 5 s: the live session is closed and a
    // new one refused.
    let home = d1.to_str().unwrap();
    let out = cli(&[
        "--json",
        "keys",
        "create",
        "--config",
        home,
        "--realm",
        REALM,
        "--role",
        "developer",
    ]);
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kid = created["id"].as_str().unwrap().to_owned();
    let key = created["key"].as_str().unwrap().to_owned();
    let victim = eventually(
        "node 3 to accept the new key",
        Duration::from_secs(15),
        || async { Client::connect_with(opts(&n3.ws, &key)).await.ok() },
    )
    .await;
    let mut victim_events = victim.subscribe(&format!("{REALM}.x")).await.unwrap();
    cli(&["keys", "revoke", &kid, "--config", home]);
    let revoked_at = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), victim_events.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "the revoked session is closed within 5 s"
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    let refused = Client::connect_with(opts(&n3.ws, &key)).await;
    assert!(
        refused.is_err(),
        "a revoked key is refused on a new session"
    );
}

/// A node's fixed identity (its key file written before it starts) and the peer id it gives.
/// Three node homes; the first holds the trust root and the realm, with an admin key for it.
fn three_homes() -> (tempfile::TempDir, [std::path::PathBuf; 3], ConfDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let homes = ["n1", "n2", "n3"].map(|n| tmp.path().join(n));
    let c1 = ConfDir::new(&homes[0]);
    c1.init().unwrap();
    c1.create_realm(REALM, None).unwrap();
    let (_, admin) = c1.issue_key(REALM, "admin", "test", 3600, None).unwrap();
    (tmp, homes, c1, admin)
}

fn identity(dir: &std::path::Path, seed: u8) -> String {
    let secret = [seed; 32];
    std::fs::create_dir_all(dir.join("node")).unwrap();
    std::fs::write(dir.join("node/identity.key"), hex::encode(secret)).unwrap();
    macula_mesh::identity::Keypair::ed25519_from_bytes(secret)
        .unwrap()
        .public()
        .to_peer_id()
        .to_string()
}

/// Dedicated nodes (isolation finding 19): a realm whose policy lists the nodes that may serve
/// it is served by them only (and, with `verified_roles`, takes forwarded traffic only with roles
/// that keys prove). A certified node of the same trust root that is not
/// listed learns the realm but refuses its sessions, saying why; the listed nodes route as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realm_restricted_to_dedicated_nodes_is_served_only_by_them() {
    let (_tmp, [d1, d2, d3], c1, admin) = three_homes();
    for d in [&d2, &d3] {
        std::fs::create_dir_all(d.join("trust")).unwrap();
        for f in ["trust/operator.pub", "trust/operator.key"] {
            std::fs::copy(d1.join(f), d.join(f)).unwrap();
        }
    }
    let (p1, p2, _p3) = (identity(&d1, 11), identity(&d2, 12), identity(&d3, 13));
    // And roles in forwarded traffic must be proven by the keys' public forms: the dedicated
    // nodes send them, so traffic across them flows as before.
    let shown = cli(&[
        "realms",
        "policy",
        REALM,
        "--config",
        &d1.to_string_lossy(),
        "--verified-roles",
        "on",
        "--nodes",
        &format!("{p1},{p2}"),
    ]);
    assert!(
        shown.contains(&format!("served by:      {p1}, {p2}"))
            && shown.contains("verified roles: on"),
        "{shown}"
    );
    let doc = c1.read_policy(REALM).unwrap();
    assert!(doc.verified_roles && doc.nodes == [p1, p2]);

    let n1 = start_node(&d1, None);
    let n2 = start_node(&d2, Some(&n1.mesh));
    let n3 = start_node(&d3, Some(&n1.mesh));

    // Node 3 learns the realm from the mesh, and then refuses its sessions.
    let refused = eventually(
        "node 3 to learn the realm and refuse it",
        Duration::from_secs(15),
        || async {
            match Client::connect_with(opts(&n3.ws, &admin)).await {
                Err(e) if e.to_string().contains("dedicated nodes") => Some(e),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(
        refused.uri(),
        Some(macula_wamp::errors::AUTHORIZATION_FAILED),
        "{refused}"
    );
    // The dedicated nodes serve it, across the mesh.
    let sub = Client::connect_with(opts(&n1.ws, &admin)).await.unwrap();
    let mut events = sub.subscribe(&format!("{REALM}.d")).await.unwrap();
    let publisher = eventually(
        "node 2 to learn the realm",
        Duration::from_secs(15),
        || async { Client::connect_with(opts(&n2.ws, &admin)).await.ok() },
    )
    .await;
    wait_tables(&n2.http, 1, 0).await;
    publisher
        .publish(
            &format!("{REALM}.d"),
            Payload::args(vec![Value::from(1u64)]),
        )
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event from a dedicated node")
        .unwrap();
    assert_eq!(ev.payload.args, vec![Value::from(1u64)]);

    // The session that holds node 1's interest leaves while another still subscribes: node 1
    // names the other (with its key's proof) and node 2 keeps forwarding.
    let sub2 = Client::connect_with(opts(&n1.ws, &admin)).await.unwrap();
    let mut events2 = sub2.subscribe(&format!("{REALM}.d")).await.unwrap();
    sub.close().await;
    // SUBSCRIBED comes once node 2 applied everything node 1 sent before: the handover too.
    let _other = sub2.subscribe(&format!("{REALM}.other")).await.unwrap();
    publisher
        .publish(
            &format!("{REALM}.d"),
            Payload::args(vec![Value::from(2u64)]),
        )
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events2.next())
        .await
        .expect("the interest survives its first holder")
        .unwrap();
    assert_eq!(ev.payload.args, vec![Value::from(2u64)]);
    // Registrations cross with proven roles too.
    let _reg = sub2
        .register(&format!("{REALM}.echo"), |_| async { answer("node1") })
        .await
        .unwrap();
    let out = publisher
        .call(&format!("{REALM}.echo"), Payload::default())
        .await
        .unwrap();
    assert_eq!(out.args, vec![Value::from("node1")]);
}

/// Whether `http`'s node has `peer` as a certified (linked) peer.
async fn linked(http: &str, peer: &str) -> bool {
    mesh_status(http).await["peers"]
        .as_array()
        .is_some_and(|ps| {
            ps.iter()
                .any(|p| p["peer_id"] == peer && p["certified"] == true)
        })
}

/// Node certificates (isolation finding 19): they expire and are renewed by a node holding the
/// operator key before they do; a node revoked with `macula mesh revoke` on the operator's
/// machine is cut off by every node within 5 s, and a node that learned the revocation over the
/// mesh keeps it across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_and_a_revoked_node_is_cut_off_everywhere() {
    let (_tmp, [d1, d2, d3], _, admin) = three_homes();
    // Nodes 2 and 3 hold only the trust root's public key and a certificate from the operator:
    // node 2's for 90 days, node 3's for 9 seconds (it must be renewed to stay).
    let home1 = d1.to_str().unwrap();
    let mut peers = vec![];
    for (d, seed, valid) in [(&d2, 22u8, "90d"), (&d3, 23, "9s")] {
        std::fs::create_dir_all(d.join("trust")).unwrap();
        std::fs::copy(d1.join("trust/operator.pub"), d.join("trust/operator.pub")).unwrap();
        let peer = identity(d, seed);
        let cert = cli(&[
            "mesh",
            "certify",
            &peer,
            "--valid-for",
            valid,
            "--home",
            home1,
        ]);
        std::fs::write(d.join("node/node.cert"), cert.trim()).unwrap();
        peers.push(peer);
    }
    let (p2, p3) = (peers[0].clone(), peers[1].clone());
    let first_cert = std::fs::read_to_string(d3.join("node/node.cert")).unwrap();
    let started = Instant::now();
    let n1 = start_node(&d1, None);
    let n2 = start_node(&d2, Some(&n1.mesh));
    let n3 = start_node(&d3, Some(&n1.mesh));
    // Sessions on 2 and 3 make them link to each other (they serve the realm) as well as to 1.
    let mut clients = vec![];
    for n in [&n2, &n3] {
        clients.push(
            eventually(
                "the realm on every node",
                Duration::from_secs(15),
                || async { Client::connect_with(opts(&n.ws, &admin)).await.ok() },
            )
            .await,
        );
    }
    eventually("nodes 2 and 3 to link", Duration::from_secs(15), || async {
        (linked(&n2.http, &p3).await && linked(&n1.http, &p3).await).then_some(())
    })
    .await;

    // Renewal: node 3 outlives its first certificate, holding a new one it saved.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(started.elapsed())).await;
    assert!(
        linked(&n1.http, &p3).await,
        "node 3 renewed and stayed linked"
    );
    assert!(linked(&n2.http, &p3).await);
    let renewed = std::fs::read_to_string(d3.join("node/node.cert")).unwrap();
    assert_ne!(renewed, first_cert, "the renewed certificate was saved");

    // Revocation on the operator's machine (node 1's home): every node cuts node 3 off.
    let revoked = Instant::now();
    cli(&["mesh", "revoke", &p3, "--home", home1]);
    eventually(
        "every node to cut node 3 off",
        Duration::from_secs(5),
        || async { (!linked(&n1.http, &p3).await && !linked(&n2.http, &p3).await).then_some(()) },
    )
    .await;
    let took = revoked.elapsed();
    // It stays cut off (node 3 keeps redialling) while 1 and 2 stay linked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!linked(&n1.http, &p3).await && !linked(&n2.http, &p3).await);
    assert!(linked(&n1.http, &p2).await, "the other nodes are untouched");
    let status = mesh_status(&n2.http).await;
    assert_eq!(status["revoked_nodes"], serde_json::json!([p3]));
    assert!(status["peers_rejected"].as_u64().unwrap() >= 1, "{status}");
    eprintln!("revoked node cut off by every node in {took:?}");
    // Certifying it again right away would give a certificate void from the start: refused.
    let again = std::process::Command::new(BIN)
        .args(["mesh", "certify", &p3, "--home", home1])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("was revoked"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Node 2 stored what it learned over the mesh: restarted alone, it still refuses node 3.
    assert!(d2.join(format!("trust/revoked-nodes/{p3}.rev")).exists());
    drop(n2);
    let n2 = start_node(&d2, None);
    assert_eq!(
        mesh_status(&n2.http).await["revoked_nodes"],
        serde_json::json!([p3])
    );
    drop(clients);
}

/// Deletion is final on every node of a mesh (isolation finding 5): a realm registered at the
/// registry (`macula up`) and used on two other nodes is deleted; the live sessions on both are
/// closed within 5 s, new ones refused saying the realm was deleted, and a node restarted
/// afterwards learns the tombstone from its peers: it never admits the old key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_is_final_on_every_node_and_after_a_restart() {
    let home = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let (_up, v) = macula_up::up(home.path(), &[]);
    let http = v["http"].as_str().unwrap();
    let bootstrap = v["nodes"][0]["mesh"][0].as_str().unwrap().to_owned();
    let dirs = ["n2", "n3"].map(|n| home.path().join(n));
    for (i, d) in dirs.iter().enumerate() {
        std::fs::create_dir_all(d.join("trust")).unwrap();
        for f in ["trust/operator.pub", "trust/operator.key"] {
            std::fs::copy(home.path().join(f), d.join(f)).unwrap();
        }
        identity(d, 21 + i as u8);
    }
    let n2 = start_node(&dirs[0], Some(&bootstrap));
    let mut n3 = start_node(&dirs[1], Some(&bootstrap));

    let realm = "com.gone.app";
    let c = cfg.path();
    let pw = "correct horse battery\n";
    for verb in ["signup", "login"] {
        macula_up::cli_as(
            c,
            http,
            &[verb, "--email", "owner@gone.example", "--password-stdin"],
            Some(pw),
        );
    }
    macula_up::cli_as(c, http, &["realms", "create", realm], None);
    let key: serde_json::Value = serde_json::from_str(&macula_up::cli_as(
        c,
        http,
        &[
            "--json", "keys", "create", "--realm", realm, "--role", "admin",
        ],
        None,
    ))
    .unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    let connect = |ws: String| {
        let key = key.clone();
        async move {
            let mut o = macula_client::ConnectOptions::new(&ws, realm, &key);
            o.reconnect = false;
            Client::connect_with(o).await
        }
    };
    let mut live = vec![];
    for n in [&n2, &n3] {
        let client = eventually(
            "the node to learn the realm",
            Duration::from_secs(15),
            || {
                let attempt = connect(n.ws.clone());
                async move { attempt.await.ok() }
            },
        )
        .await;
        let events = client.subscribe(&format!("{realm}.t")).await.unwrap();
        live.push((client, events));
    }

    macula_up::cli_as(c, http, &["realms", "delete", realm, "--yes"], None);
    let deleted = Instant::now();
    for (_, events) in &mut live {
        let end = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        assert!(
            matches!(end, Ok(None)),
            "a live session on another node is closed"
        );
    }
    assert!(deleted.elapsed() < Duration::from_secs(5));
    for n in [&n2, &n3] {
        let err = connect(n.ws.clone()).await.err().expect("refused");
        assert!(err.to_string().contains("was deleted"), "{err}");
    }

    // Node 3 restarted: it learns the tombstone from its peers, and admits nothing meanwhile.
    drop(n3);
    n3 = start_node(&dirs[1], Some(&bootstrap));
    // Within 5 s: its peers take the new link at once, rather than waiting for the old
    // connection to time out.
    let err = eventually(
        "the restarted node to learn the tombstone",
        Duration::from_secs(5),
        || async {
            match connect(n3.ws.clone()).await {
                Ok(_) => panic!("the restarted node admitted a deleted realm's key"),
                Err(e) if e.to_string().contains("was deleted") => Some(e),
                Err(_) => None,
            }
        },
    )
    .await;
    assert_eq!(err.uri(), Some(macula_wamp::errors::NO_SUCH_REALM), "{err}");
}
