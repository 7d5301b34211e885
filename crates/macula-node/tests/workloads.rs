//! Deploy records on a node: handed in over HTTP or by a peer, judged with the node's own
//! credentials, kept on disk and flooded to the mesh; replays, forgeries and keys that may not
//! deploy change nothing and go nowhere.

mod common;

use std::time::Duration;

use common::*;
use macula_mesh::{Frame, MeshEvent};
use macula_router::auth::credential::{bearer_proof, public_form};
use macula_workloads::record::DeployRecord;

const MANIFEST: &str = "kind: payload\nname: api\nreplicas: 2\ncommand: [my-server]\n";

fn record(key: &str, name: &str, seq: u64, manifest: Option<&str>) -> DeployRecord {
    DeployRecord::signed(
        REALM,
        name,
        seq,
        manifest.map(str::to_owned),
        1,
        &public_form(key).unwrap(),
        |d| bearer_proof(key, d),
    )
    .unwrap()
}

fn body(r: &DeployRecord) -> String {
    serde_json::to_string(r).unwrap()
}

/// The next frame of the kind `pick` takes that the peer receives from the node.
async fn next<T>(
    ev: &mut macula_mesh::MeshEvents,
    what: &str,
    pick: impl Fn(Frame) -> Option<T>,
) -> T {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.recv()).await {
            Ok(Some(MeshEvent::Frame(_, f))) => {
                if let Some(t) = pick(f) {
                    return t;
                }
            }
            Ok(Some(_)) => {}
            other => panic!("no {what} came: {other:?}"),
        }
    }
}

/// A record without what the node added to it (its slots' first configurations).
fn signed_part(mut r: DeployRecord) -> DeployRecord {
    r.genesis = Default::default();
    r
}

/// The next deploy record the peer receives from the node.
async fn next_record(ev: &mut macula_mesh::MeshEvents) -> DeployRecord {
    next(ev, "deploy record", |f| match f {
        Frame::Workload { record } => serde_json::from_slice(&record).ok(),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn deploy_records_are_judged_kept_and_flooded() {
    let t = TestNode::start().await;
    let (peer, mut ev, node_id) = certified_peer(&t).await;
    let (_, developer) = t.key("developer");
    let (_, service) = t.key("service_account");
    let path = format!("/v1/realms/{REALM}/workloads");

    // A developer's record: taken, and flooded to the peer.
    let r1 = record(&developer, "api", 1, Some(MANIFEST));
    let (s, b) = t.http("POST", &path, None, &body(&r1)).await;
    assert_eq!(s, 201, "{b}");
    let flooded = next_record(&mut ev).await;
    assert!(
        flooded.genesis.ranges[0]
            .nodes
            .contains(&node_id.to_string()),
        "the node that took the record chose its slots' first authorities: {flooded:?}"
    );
    assert_eq!(signed_part(flooded), r1);
    // Kept on disk.
    let file = t.dir.root.join("workloads/records.json");
    assert!(std::fs::read_to_string(&file).unwrap().contains("\"api\""));

    // Replayed: refused, nothing flooded.
    let (s, b) = t.http("POST", &path, None, &body(&r1)).await;
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("stale_record"), "{b}");
    // Tampered: refused.
    let mut forged = record(&developer, "api", 2, Some(MANIFEST));
    forged.manifest = Some(MANIFEST.replace("replicas: 2", "replicas: 99"));
    let (s, b) = t.http("POST", &path, None, &body(&forged)).await;
    assert_eq!(s, 401, "{b}");
    // A key whose role may not deploy: refused.
    let (s, b) = t
        .http(
            "POST",
            &path,
            None,
            &body(&record(&service, "api", 3, Some(MANIFEST))),
        )
        .await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("realm:deploy"), "{b}");
    // A record for another realm, handed in under this one: refused.
    let mut elsewhere = record(&developer, "api", 4, Some(MANIFEST));
    elsewhere.realm = "com.other".into();
    let (s, _) = t.http("POST", &path, None, &body(&elsewhere)).await;
    assert_eq!(s, 422);

    // A peer's record (a newer version): taken from the mesh.
    let r2 = record(
        &developer,
        "api",
        5,
        Some(&MANIFEST.replace("replicas: 2", "replicas: 3")),
    );
    peer.send(
        &node_id,
        &Frame::Workload {
            record: body(&r2).into_bytes().into(),
        },
    );
    // A peer's forgery: refused, not kept.
    let mut bad = record(
        &developer,
        "web",
        1,
        Some(&MANIFEST.replace("name: api", "name: web")),
    );
    bad.sig[3] ^= 0xff;
    peer.send(
        &node_id,
        &Frame::Workload {
            record: body(&bad).into_bytes().into(),
        },
    );
    let list = || async {
        let (s, b) = t.http("GET", &path, Some(&t.admin_key), "").await;
        assert_eq!(s, 200, "{b}");
        serde_json::from_str::<serde_json::Value>(&b).unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = list().await;
        let items = v["items"].as_array().unwrap();
        if items.iter().any(|i| i["name"] == "api" && i["seq"] == 5) {
            assert!(
                !items.iter().any(|i| i["name"] == "web"),
                "the forgery was kept: {v}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer's record never arrived: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An older record from a peer is answered with the newer one (the peer is behind).
    peer.send(
        &node_id,
        &Frame::Workload {
            record: body(&r1).into_bytes().into(),
        },
    );
    assert_eq!(signed_part(next_record(&mut ev).await), r2);
    // Listing needs a key of the realm.
    let (s, _) = t.http("GET", &path, None, "").await;
    assert_eq!(s, 401);
}

async fn next_lease_reply(ev: &mut macula_mesh::MeshEvents) -> macula_workloads::lease::Reply {
    next(ev, "lease reply", |f| match f {
        Frame::LeaseReply { reply } => {
            serde_json::from_slice::<macula_workloads::lease::Answer>(&reply)
                .ok()
                .map(|a| a.reply)
        }
        _ => None,
    })
    .await
}

#[tokio::test]
async fn a_node_grants_leases_as_an_authority_and_keeps_its_promises() {
    use macula_workloads::lease::{Ask, Cfg, Handover, Refusal, Reply, Request};
    let t = TestNode::start().await;
    let (p1, mut ev1, node_id) = certified_peer(&t).await;
    let (p2, mut ev2, _) = certified_peer(&t).await;
    let (me1, me2) = (p1.peer_id().to_string(), p2.peer_id().to_string());
    let slot = format!("{REALM}/api/0");
    let cfg = Cfg {
        epoch: 2,
        set: vec![node_id.to_string(), me1.clone(), me2.clone()],
    };
    let frame = |cfg: Option<&Cfg>, req: Request| Frame::LeaseRequest {
        req: serde_json::to_vec(&Ask {
            cfg: cfg.cloned(),
            id: 9,
            req,
        })
        .unwrap()
        .into(),
    };
    let ask = |holder: &str, token: u64| {
        frame(
            Some(&cfg),
            Request::Acquire {
                slot: slot.clone(),
                holder: holder.into(),
                token,
                seq: 1,
            },
        )
    };
    // A slot this node serves under no configuration: nothing is granted.
    p1.send(&node_id, &ask(&me1, 1));
    assert_eq!(
        next_lease_reply(&mut ev1).await,
        Reply::Refused {
            slot: slot.clone(),
            why: Refusal::Config(None),
        }
    );
    // Once a move installed one here, it grants under it.
    p1.send(
        &node_id,
        &frame(
            None,
            Request::Install {
                slot: slot.clone(),
                holder: me1.clone(),
                cfg: cfg.clone(),
                handover: Handover::default(),
            },
        ),
    );
    assert_eq!(
        next_lease_reply(&mut ev1).await,
        Reply::Installed {
            slot: slot.clone(),
            cfg: cfg.clone(),
        }
    );
    p1.send(&node_id, &ask(&me1, 1));
    assert_eq!(
        next_lease_reply(&mut ev1).await,
        Reply::Granted {
            slot: slot.clone(),
            token: 1,
            accepted: None,
        }
    );
    // The promise is on disk before the answer.
    let promises = std::fs::read_to_string(t.dir.root.join("workloads/promises.json")).unwrap();
    assert!(
        promises.contains(&slot) && promises.contains("\"promised\":1"),
        "{promises}"
    );
    // Another node, while the grant runs: told who holds it.
    p2.send(&node_id, &ask(&me2, 2));
    match next_lease_reply(&mut ev2).await {
        Reply::Refused {
            why: Refusal::Held {
                holder, token: 1, ..
            },
            ..
        } => assert_eq!(holder, me1),
        other => panic!("{other:?}"),
    }
    // A node asking in another's name is not answered, and counted as a rejected frame.
    let rejected = || {
        macula_node::mesh::of(t.node())
            .unwrap()
            .counters
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = rejected();
    p2.send(&node_id, &ask(&me1, 1));
    eventually("the forged request is rejected", || rejected() > before).await;
    // A slot of a realm this node does not know, or an endless name, is not kept.
    for slot in [
        "com.unknown/api/0".to_owned(),
        format!("{REALM}/{}", "x".repeat(600)),
    ] {
        let before = rejected();
        p2.send(
            &node_id,
            &frame(
                Some(&cfg),
                Request::Acquire {
                    slot,
                    holder: me2.clone(),
                    token: 1,
                    seq: 1,
                },
            ),
        );
        eventually("the request is rejected", || rejected() > before).await;
    }
    // The holder renews under its token.
    p1.send(&node_id, &ask(&me1, 1));
    assert_eq!(
        next_lease_reply(&mut ev1).await,
        Reply::Granted {
            slot: slot.clone(),
            token: 1,
            accepted: None
        }
    );
    // macula.fence.check's question, from another node of the realm: the highest promise, and
    // nothing kept for a slot never granted; a realm this node does not know is not answered.
    let fence = |slot: &str, holder: &str| {
        frame(
            Some(&cfg),
            Request::Fence {
                slot: slot.into(),
                holder: holder.into(),
            },
        )
    };
    p2.send(&node_id, &fence(&slot, &me2));
    assert_eq!(
        next_lease_reply(&mut ev2).await,
        Reply::Fence {
            slot: slot.clone(),
            promised: Some(1)
        }
    );
    let never = format!("{REALM}/api/7");
    p2.send(&node_id, &fence(&never, &me2));
    assert_eq!(
        next_lease_reply(&mut ev2).await,
        Reply::Refused {
            slot: never.clone(),
            why: Refusal::Config(None),
        }
    );
    assert!(
        !t.node().leases.knows(&never),
        "a fence question keeps nothing"
    );
    let before = rejected();
    p2.send(&node_id, &fence("com.unknown/api/0", &me2));
    eventually("the question is rejected", || rejected() > before).await;
}

#[tokio::test]
async fn payloads_and_jobs_are_plain_rest_with_a_realm_key() {
    // This node runs nothing (no capacity): the routes are what is tested.
    let t = TestNode::start_with(|c| c.workloads.enabled = false).await;
    let (_, developer) = t.key("developer");
    let (_, service) = t.key("service_account");
    t.dir.create_realm("com.example.other", None).unwrap();
    let (_, stranger) = t
        .dir
        .issue_key("com.example.other", "admin", "test", 3600, None)
        .unwrap();
    // The node knows the other realm (its keys are good there).
    t.node().reload().unwrap();
    assert!(t.node().policy_for("com.example.other").is_some());
    let payloads = format!("/v1/realms/{REALM}/payloads");
    let jobs = format!("/v1/realms/{REALM}/jobs");
    let json = |b: &str| serde_json::from_str::<serde_json::Value>(b).unwrap();

    // Created with a developer's key: signed with it here, taken, listed.
    let (s, b) = t.http("POST", &payloads, Some(&developer), MANIFEST).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(json(&b)["seq"], 1);
    let (s, b) = t.http("POST", &payloads, Some(&developer), MANIFEST).await;
    assert_eq!(s, 409, "{b}");
    assert!(b.contains("already_exists"), "{b}");
    let (s, b) = t.http("GET", &payloads, Some(&developer), "").await;
    assert_eq!(s, 200, "{b}");
    let v = json(&b);
    assert_eq!(v["items"][0]["name"], "api", "{v}");
    assert_eq!(v["items"][0]["kind"], "payload", "{v}");
    assert_eq!(v["items"][0]["desired"], 2, "{v}");
    // The record is the key holder's: the node's own key signed nothing.
    let kept = {
        let records = t.node().workloads.records.lock();
        let r = records.all().find(|r| r.name == "api").unwrap().clone();
        r
    };
    assert_eq!(Some(kept.key), public_form(&developer));

    // Replaced; a body naming another workload than the path is refused.
    let three = MANIFEST.replace("replicas: 2", "replicas: 3");
    let (s, b) = t
        .http("PUT", &format!("{payloads}/api"), Some(&developer), &three)
        .await;
    assert_eq!((s, json(&b)["seq"].clone()), (200, 2.into()), "{b}");
    let (s, b) = t
        .http("PUT", &format!("{payloads}/web"), Some(&developer), &three)
        .await;
    assert_eq!(s, 422, "{b}");
    // A job is not a payload.
    let job = "kind: job\nname: crunch\ncompletions: 4\ncommand: [true]\n";
    let (s, b) = t.http("POST", &payloads, Some(&developer), job).await;
    assert_eq!(s, 422, "{b}");
    assert!(b.contains("/jobs"), "{b}");
    // Bad manifests name the field.
    let (s, b) = t
        .http(
            "POST",
            &payloads,
            Some(&developer),
            "kind: payload\nname: x\nreplicas: -1\n",
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert!(b.contains("replicas"), "{b}");

    // Who may not: a role without realm:deploy, another realm's key, no key.
    let (s, b) = t.http("POST", &jobs, Some(&service), job).await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("realm:deploy"), "{b}");
    let (s, b) = t.http("GET", &payloads, Some(&stranger), "").await;
    assert_eq!(s, 403, "{b}");
    let (s, b) = t
        .http("DELETE", &format!("{payloads}/api"), Some(&stranger), "")
        .await;
    assert_eq!(s, 403, "{b}");
    let (s, _) = t.http("POST", &jobs, None, job).await;
    assert_eq!(s, 401);
    // Nor a record signed by another realm's key, handed in directly.
    let foreign = record(&stranger, "crunch", 9, Some(job));
    let (s, b) = t
        .http(
            "POST",
            &format!("/v1/realms/{REALM}/workloads"),
            None,
            &body(&foreign),
        )
        .await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("com.example.other"), "{b}");

    // Jobs.
    let (s, b) = t.http("POST", &jobs, Some(&developer), job).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = t
        .http("GET", &format!("{jobs}/crunch"), Some(&developer), "")
        .await;
    assert_eq!(s, 200, "{b}");
    let v = json(&b);
    assert_eq!(
        (v["kind"].as_str(), v["desired"].as_u64()),
        (Some("job"), Some(4)),
        "{v}"
    );
    assert_eq!(v["succeeded"], 0, "{v}");
    // The payload route does not see the job, nor the job route the payload.
    let (s, _) = t
        .http("GET", &format!("{payloads}/crunch"), Some(&developer), "")
        .await;
    assert_eq!(s, 404);
    let (s, _) = t
        .http("DELETE", &format!("{jobs}/api"), Some(&developer), "")
        .await;
    assert_eq!(s, 404);

    // Deleted: a tombstone; gone from the list; deleting again is a 404.
    let (s, b) = t
        .http("DELETE", &format!("{payloads}/api"), Some(&developer), "")
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["deleted"], true, "{b}");
    let (s, _) = t
        .http("GET", &format!("{payloads}/api"), Some(&developer), "")
        .await;
    assert_eq!(s, 404);
    let (s, _) = t
        .http("DELETE", &format!("{payloads}/api"), Some(&developer), "")
        .await;
    assert_eq!(s, 404);

    // The realm's plan allows 3 instances at once: the job (1 at a time) and a payload of 2
    // fit; a third replica does not, and says why.
    let mut doc = t.dir.read_policy(REALM).unwrap();
    doc.max_instances = Some(3);
    doc.version += 1;
    t.dir.write_policy(&doc).unwrap();
    t.node().reload().unwrap();
    let (s, b) = t.http("POST", &payloads, Some(&developer), MANIFEST).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = t
        .http("PUT", &format!("{payloads}/api"), Some(&developer), &three)
        .await;
    assert_eq!(s, 403, "{b}");
    assert!(
        b.contains("plan_limit") && b.contains("allows 3 instances") && b.contains("ask for 4"),
        "{b}"
    );
    let (s, b) = t
        .http("GET", &format!("{payloads}/api"), Some(&developer), "")
        .await;
    assert_eq!(
        (s, json(&b)["desired"].clone()),
        (200, 2.into()),
        "unchanged: {b}"
    );
    // Scaling down is always taken.
    let one = MANIFEST.replace("replicas: 2", "replicas: 1");
    let (s, b) = t
        .http("PUT", &format!("{payloads}/api"), Some(&developer), &one)
        .await;
    assert_eq!(s, 200, "{b}");
}
