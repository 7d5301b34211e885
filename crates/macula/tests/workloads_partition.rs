//! Workloads across a network partition: five real `macula node` processes, each in a network
//! namespace of its own, their mesh links on a bridge. A payload of 3 replicas runs; the test
//! moves two nodes (one running a replica) to a second bridge — a 3/2 split — and watches every
//! node's own replicas every 300 ms: a slot never runs on two nodes (a payload not marked
//! `duplicate_tolerant` never runs twice), the total never exceeds 3, and each slot runs on the
//! side that holds a majority of its lease authorities. A second payload marked
//! `duplicate_tolerant` runs on both sides, at most one extra per slot (provisional leases).
//! Then the split heals and both converge to exactly 3, each slot once.
//!
//! Needs root and `ip netns` (iproute2); elsewhere it says SKIPPED and passes.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const REALM: &str = "com.example.split";
const NODES: usize = 5;

/// A hub namespace with two bridges, and one namespace per node with a veth to the hub (mesh,
/// 10.215.0.i) and one to the test (clients, 10.216.i.2). Removed on drop.
struct Net {
    id: u32,
    hub: String,
    nodes: Vec<String>,
}

impl Net {
    fn create() -> Result<Net, String> {
        let id = std::process::id() % 100_000;
        let mut net = Net {
            id,
            hub: format!("mwh{id}"),
            nodes: vec![],
        };
        ip(&["netns", "add", &net.hub])?;
        let hub = net.hub.clone();
        for b in [1, 2] {
            let br = format!("mb{b}x{id}");
            ip(&["-n", &hub, "link", "add", &br, "type", "bridge"])?;
            ip(&["-n", &hub, "link", "set", &br, "up"])?;
        }
        for i in 1..=NODES {
            let ns = format!("mwn{i}x{id}");
            ip(&["netns", "add", &ns])?;
            net.nodes.push(ns.clone());
            let (mv, mh) = (format!("mv{i}x{id}"), format!("mh{i}x{id}"));
            let (mr, mc) = (format!("mr{i}x{id}"), format!("mc{i}x{id}"));
            let mesh_ip = format!("10.215.0.{i}/24");
            let (here, there) = (format!("10.216.{i}.1/30"), format!("10.216.{i}.2/30"));
            let steps: Vec<Vec<&str>> = vec![
                vec![
                    "link", "add", &mv, "netns", &ns, "type", "veth", "peer", "name", &mh, "netns",
                    &hub,
                ],
                vec!["-n", &ns, "addr", "add", &mesh_ip, "dev", &mv],
                vec!["-n", &ns, "link", "set", &mv, "up"],
                vec!["-n", &hub, "link", "set", &mh, "up"],
                vec![
                    "link", "add", &mr, "type", "veth", "peer", "name", &mc, "netns", &ns,
                ],
                vec!["addr", "add", &here, "dev", &mr],
                vec!["link", "set", &mr, "up"],
                vec!["-n", &ns, "addr", "add", &there, "dev", &mc],
                vec!["-n", &ns, "link", "set", &mc, "up"],
                vec!["-n", &ns, "link", "set", "lo", "up"],
            ];
            for s in steps {
                ip(&s)?;
            }
        }
        net.split(&[]);
        Ok(net)
    }

    /// Nodes (1-based) in `apart` on the second bridge, the others on the first.
    fn split(&self, apart: &[usize]) {
        for i in 1..=NODES {
            let b = if apart.contains(&i) { 2 } else { 1 };
            let (mh, br) = (format!("mh{i}x{}", self.id), format!("mb{b}x{}", self.id));
            ip(&["-n", &self.hub, "link", "set", &mh, "master", &br]).expect("moving a link");
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// `GET path` on `addr` with the realm key; the JSON answer (Null when it cannot be had).
async fn get(addr: &str, path: &str, key: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: n\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        serde_json::from_str(buf.split_once("\r\n\r\n")?.1).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(Value::Null)
}

/// Replica index → the nodes (1-based) that say they run it, asking each node for its own.
async fn running_by_slot(
    nodes: &[NodeProc],
    key: &str,
    name: &str,
) -> BTreeMap<u64, BTreeSet<usize>> {
    let mut out: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        let v = get(
            &n.http,
            &format!("/v1/realms/{REALM}/replicas?local=true"),
            key,
        )
        .await;
        for r in v["items"].as_array().into_iter().flatten() {
            if r["name"] == name && r["state"] == "running" {
                if let Some(s) = r["replica"].as_u64() {
                    out.entry(s).or_default().insert(i + 1);
                }
            }
        }
    }
    out
}

/// Slots running on more than `most` nodes in this look and the one before (a hand-over
/// between two nodes' answers of one look is not a duplicate: the old holder stopped before the
/// new one started).
fn over(
    before: &BTreeMap<u64, BTreeSet<usize>>,
    now: &BTreeMap<u64, BTreeSet<usize>>,
    most: usize,
) -> Vec<(u64, BTreeSet<usize>)> {
    now.iter()
        .filter(|(s, n)| n.len() > most && before.get(s).is_some_and(|b| b.len() > most))
        .map(|(s, n)| (*s, n.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_in_two_never_runs_a_slot_twice_and_heals_to_exactly_n() {
    let net = match Net::create() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIPPED workloads partition test: needs root and `ip netns` ({e})");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    // Clients reach the nodes across the test's virtual network, in clear text on purpose;
    // limits and sandbox are the runtime tests' business.
    let (homes, key) = node_homes(
        tmp.path(),
        NODES,
        REALM,
        "tls:\n  plaintext: any\nworkloads:\n  require_limits: false\n  require_sandbox: false\n  lease_term_ms: 2000\n  member_grace_ms: 1\n",
    );
    let mut nodes: Vec<NodeProc> = vec![];
    for (i, h) in homes.iter().enumerate() {
        let prefix = ["ip", "netns", "exec", net.nodes[i].as_str()];
        let client_ip = format!("10.216.{}.2", i + 1);
        let mesh_ip = format!("10.215.0.{}", i + 1);
        let boot = nodes.first().map(|n| n.mesh.clone());
        nodes.push(start_node_in(
            &prefix,
            &client_ip,
            &mesh_ip,
            h,
            boot.as_deref(),
        ));
    }
    // Each node's peer id, once it is linked.
    let mut ids: Vec<String> = vec![];
    for n in &nodes {
        ids.push(linked_peer_id(&n.http).await);
    }

    // A payload of 3 replicas, on 3 nodes.
    let url = format!("ws://{}/ws", nodes[0].http);
    let deploy = |args: Vec<String>| {
        let (url, key) = (url.clone(), key.clone());
        async move {
            let out = tokio::process::Command::new(BIN)
                .args(["--json", "deploy"])
                .args(&args)
                .args([
                    "--timeout",
                    "60s",
                    "--url",
                    &url,
                    "--realm",
                    REALM,
                    "--key",
                    &key,
                ])
                .env("MACULA_HOME", "/nonexistent")
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "deploy {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    deploy(
        ["--payload", "sleep 600", "--name", "app", "--replicas", "3"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let placed = eventually("3 replicas on 3 nodes", Duration::from_secs(30), || async {
        let r = running_by_slot(&nodes, &key, "app").await;
        (r.len() == 3 && r.values().all(|n| n.len() == 1)).then_some(r)
    })
    .await;
    // And a payload that may run twice in a partition (availability over uniqueness).
    let manifest = tmp.path().join("cache.yaml");
    std::fs::write(
        &manifest,
        "kind: payload\nname: cache\nreplicas: 3\ncommand: [sleep, '600']\nduplicate_tolerant: true\n",
    )
    .unwrap();
    deploy(vec!["-f".into(), manifest.display().to_string()]).await;
    let on: BTreeMap<u64, usize> = placed
        .iter()
        .map(|(s, n)| (*s, *n.iter().next().unwrap()))
        .collect();
    // Which side holds a majority of a slot's authorities when `apart` is cut off (every node
    // counts all five: the far side keeps its place among them through the split).
    let far_majority = |slot: u64, apart: &[usize]| {
        let s = macula_workloads::wire::slot(REALM, "app", slot as u32);
        macula_workloads::lease::authorities(&s, &ids, 3)
            .iter()
            .filter(|a| apart.iter().any(|n| &ids[n - 1] == **a))
            .count()
            >= 2
    };
    // The far side: two nodes other than the first, one of them running a replica; preferably
    // such that some slot's authorities are mostly there (it must move there, or stay).
    let pairs: Vec<[usize; 2]> = (2..=NODES)
        .flat_map(|a| ((a + 1)..=NODES).map(move |b| [a, b]))
        .collect();
    let score = |p: &[usize; 2]| {
        let busy = on.values().any(|n| p.contains(n));
        let far = (0..3).any(|s| far_majority(s, p));
        (busy, far)
    };
    let apart = *pairs
        .iter()
        .max_by_key(|p| score(p))
        .expect("pairs of nodes");
    assert!(score(&apart).0, "a replica beyond node 1: {on:?}");
    eprintln!("placed: {on:?}; splitting off nodes {apart:?}");
    let side_of = |slot: u64| {
        if far_majority(slot, &apart) {
            "far"
        } else {
            "near"
        }
    };

    net.split(&apart);
    let split_at = Instant::now();
    let (mut before, mut cache_before) = (BTreeMap::new(), BTreeMap::new());
    let mut steady: Option<Duration> = None;
    let mut most_copies = 0;
    while split_at.elapsed() < Duration::from_secs(20) {
        let now = running_by_slot(&nodes, &key, "app").await;
        let d = over(&before, &now, 1);
        assert!(
            d.is_empty(),
            "a slot of app runs twice during the split: {d:?}"
        );
        let total: usize = now.values().map(BTreeSet::len).sum();
        if before.values().map(BTreeSet::len).sum::<usize>() > 3 && total > 3 {
            panic!("{total} replicas of app run during the split: {now:?}");
        }
        // Each slot on the side that holds its authorities' majority, once.
        let settled = now.len() == 3
            && now.iter().all(|(s, n)| {
                n.len() == 1 && (apart.contains(n.iter().next().unwrap()) == (side_of(*s) == "far"))
            });
        if settled && steady.is_none() {
            steady = Some(split_at.elapsed());
        }
        // The tolerant payload: at most one extra per slot (one provisional lease per slot).
        let cache = running_by_slot(&nodes, &key, "cache").await;
        let d = over(&cache_before, &cache, 2);
        assert!(d.is_empty(), "a slot of cache runs three times: {d:?}");
        most_copies = most_copies.max(cache.values().map(BTreeSet::len).max().unwrap_or(0));
        before = now;
        cache_before = cache;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sides: HashMap<u64, &str> = (0..3).map(|s| (s, side_of(s))).collect();
    eprintln!(
        "during the split: sides {sides:?}; every slot of app ran once on its side after {steady:?}; final {before:?}; cache {cache_before:?} (at most {most_copies} copies of a slot)"
    );
    assert!(
        steady.is_some(),
        "the slots did not settle on their sides within 20 s: {before:?} (sides {sides:?})"
    );
    // The tolerant payload runs on both sides (provisional leases, renewed, on the side without
    // a slot's authority majority).
    let cache_nodes: BTreeSet<usize> = cache_before.values().flatten().copied().collect();
    assert!(
        cache_nodes.iter().any(|n| apart.contains(n))
            && cache_nodes.iter().any(|n| !apart.contains(n)),
        "cache runs on both sides of the split: {cache_before:?}"
    );

    // Heal: back to exactly 3 of each, each slot once, and staying so.
    net.split(&[]);
    let healed_at = Instant::now();
    let (mut before, mut cache_before) = (BTreeMap::new(), BTreeMap::new());
    let mut converged: Option<Duration> = None;
    let mut stable = 0;
    while healed_at.elapsed() < Duration::from_secs(40) && stable < 10 {
        let now = running_by_slot(&nodes, &key, "app").await;
        let d = over(&before, &now, 1);
        assert!(
            d.is_empty(),
            "a slot of app runs twice after the heal: {d:?}"
        );
        let cache = running_by_slot(&nodes, &key, "cache").await;
        let d = over(&cache_before, &cache, 2);
        assert!(d.is_empty(), "a slot of cache runs three times: {d:?}");
        let exact =
            |r: &BTreeMap<u64, BTreeSet<usize>>| r.len() == 3 && r.values().all(|n| n.len() == 1);
        if exact(&now) && exact(&cache) {
            converged.get_or_insert(healed_at.elapsed());
            stable += 1;
        } else {
            stable = 0;
            converged = None;
        }
        before = now;
        cache_before = cache;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("after the heal: exactly 3 of each from {converged:?} on: app {before:?}, cache {cache_before:?}");
    assert!(
        stable >= 10 && converged.is_some_and(|c| c <= Duration::from_secs(30)),
        "not exactly 3 of each within 30 s of the heal: app {before:?}, cache {cache_before:?}"
    );
    drop(nodes);
}
