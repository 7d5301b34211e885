//! `macula-bench mesh-sim`: an in-process mesh of many real nodes (full `macula-node` stacks,
//! QUIC on loopback) that measures what the DHT and the interest routing do at scale:
//! - DHT: signed records put from random nodes and looked up from other random nodes; success
//!   rate, requests per lookup (an upper bound on hops) and latency;
//! - events: subscribers on some nodes, publishers on others; every event must reach every
//!   subscriber exactly once.
//!
//! Exits non-zero when a lookup fails or an event is missing or duplicated (`.ci/run` runs it).

use macula_node::Load;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use macula_node::{ConfDir, Node, Running};

use crate::Figure;

const REALM: &str = "com.sim";

pub struct SimArgs {
    pub nodes: usize,
    pub lookups: usize,
    pub subscribers: usize,
    pub publishers: usize,
    pub events: u64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn run(a: &SimArgs) -> Result<Vec<Figure>> {
    let tmp = std::env::temp_dir().join(format!("macula-sim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let dir = ConfDir::new(&tmp);
    dir.init()?;
    dir.create_realm(REALM, None)?;
    let (_, key) = dir.issue_key(REALM, "admin", "sim", 86_400, None)?;
    let base = dir.load()?;
    let started = Instant::now();
    let mut nodes: Vec<Running> = Vec::with_capacity(a.nodes);
    let mut boot_of = vec![0usize; a.nodes];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n.max(1) as u64) as usize
    };
    for i in 0..a.nodes {
        let mut l = base.clone();
        l.config.listen.http = "127.0.0.1:0".parse()?;
        l.config.listen.rawsocket = "127.0.0.1:0".parse()?;
        l.config.reload_interval_ms = 60_000;
        l.config.mesh.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
        l.config.mesh.identity = format!("sim/{i}.key").into();
        l.config.metering.dir = format!("sim/meter-{i}").into();
        // A handful of (realm, key) pairs per node: small counters files.
        l.config.metering.slots = 64;
        // Each node joins through a random earlier one, as nodes of a real mesh would through
        // whichever peer they were given.
        l.config.mesh.bootstrap = if i == 0 {
            vec![]
        } else {
            boot_of[i] = next(i);
            nodes[boot_of[i]].mesh_addrs.clone()
        };
        l.config.mesh.peer_timeout_ms = 10_000;
        let r = macula_node::start(Node::new(l, Some(dir.clone())))
            .await
            .with_context(|| format!("starting node {i}"))?;
        nodes.push(r);
    }
    let boot = started.elapsed();
    eprintln!("mesh-sim: {} nodes up in {boot:.1?}", a.nodes);
    let mesh = |i: usize| macula_node::mesh::of(&nodes[i].node).map(|m| m.handle.clone());
    // Every node has joined (through its random bootstrap node) before lookups start.
    for (i, &boot) in boot_of.iter().enumerate() {
        let m = mesh(i).context("mesh off")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while m.peers().is_empty() {
            if Instant::now() > deadline {
                // What each side sees of the other, for the next person chasing this.
                let b = mesh(boot).context("mesh off")?;
                let me = m.peer_id().to_string();
                let seen = b.peer_status().into_iter().find(|s| s.peer_id == me);
                bail!(
                    "node {i} ({me}) did not join the mesh within 60 s; its connections: {:?}; \
                     its bootstrap node {} ({}) sees it as {seen:?}",
                    m.peer_status(),
                    boot,
                    b.peer_id()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let peers: usize = (0..a.nodes).filter_map(mesh).map(|m| m.peers().len()).sum();
    eprintln!(
        "mesh-sim: all joined after {:.1?}; {:.1} peers per node",
        started.elapsed(),
        peers as f64 / a.nodes as f64
    );
    let t_dht = Instant::now();
    // DHT lookups between random pairs of nodes.
    let (mut ok, mut lat, mut reqs) = (0usize, vec![], vec![]);
    let (mut put_lat, mut replicas, mut retried) = (vec![], vec![], 0usize);
    for k in 0..a.lookups {
        let (w, r) = (next(a.nodes), next(a.nodes));
        let (Some(wm), Some(rm)) = (mesh(w), mesh(r)) else {
            bail!("mesh off");
        };
        let now = macula_node::confdir::now_secs();
        let name = format!("k{k}");
        let rec = macula_mesh::record::AppRecord::sign(
            wm.keypair(),
            &wm.cert(),
            REALM,
            &name,
            bytes::Bytes::from_static(b"\x01"),
            "sim",
            now,
            now + 600,
        );
        let dkey = macula_mesh::record::dht_key(REALM, &name);
        // A put that reached no other node (its lookup found nobody to store at, e.g. while
        // routing tables are still filling) is an error to the writer, who tries again.
        let mut stored = 0;
        for attempt in 0..3 {
            let tp = Instant::now();
            stored = wm
                .put(dkey.clone(), rec.encode(), Duration::from_secs(600))
                .await
                .map_err(anyhow::Error::msg)?;
            put_lat.push(tp.elapsed().as_secs_f64() * 1e3);
            if stored > 0 {
                break;
            }
            if attempt < 2 {
                retried += 1;
            }
        }
        replicas.push(stored as f64);
        let found = rm.get(dkey).await.map_err(anyhow::Error::msg)?;
        let valid = found.value.as_deref().is_some_and(|v| {
            macula_mesh::record::AppRecord::verify(v, rm.trust(), REALM, &name, now).is_ok()
        });
        if valid {
            ok += 1;
        }
        lat.push(found.elapsed.as_secs_f64() * 1e3);
        reqs.push(found.requests as f64);
        if (k + 1) % 25 == 0 && k + 1 < a.lookups {
            let conns: usize = (0..a.nodes)
                .filter_map(mesh)
                .map(|m| m.peer_status().len())
                .sum();
            eprintln!(
                "mesh-sim: {} of {} puts and lookups after {:.1?} ({:.1} connections per node)",
                k + 1,
                a.lookups,
                t_dht.elapsed(),
                conns as f64 / a.nodes as f64
            );
        }
    }
    let success = ok as f64 / a.lookups.max(1) as f64 * 100.0;
    eprintln!("mesh-sim: {ok}/{} lookups found a valid record", a.lookups);
    eprintln!(
        "mesh-sim: {} puts ({retried} retried) and lookups in {:.1?}; put p50 {:.1} ms p99 {:.1} ms, replicas p50 {:.0} min {:.0}",
        a.lookups,
        t_dht.elapsed(),
        pct(&mut put_lat, 0.5),
        pct(&mut put_lat, 0.99),
        pct(&mut replicas, 0.5),
        pct(&mut replicas, 0.0)
    );

    // Events: subscribers on the first nodes after 0, publishers on the last ones.
    let topic = format!("{REALM}.events");
    let mut streams = vec![];
    let mut clients = vec![];
    for n in nodes.iter().skip(1).take(a.subscribers) {
        let mut o = macula_client::ConnectOptions::new(&n.ws_url(), REALM, &key);
        o.reconnect = false;
        let c = macula_client::Client::connect_with(o).await?;
        streams.push(c.subscribe(&topic).await?);
        clients.push(c);
    }
    // Publishers join first: a node starts serving the realm (and finds its other nodes) when
    // its first client joins, so the interest tables are complete only after that.
    let pub_nodes: Vec<usize> = (a.nodes - a.publishers..a.nodes).collect();
    let mut pubs = vec![];
    for &p in &pub_nodes {
        let mut o = macula_client::ConnectOptions::new(&nodes[p].ws_url(), REALM, &key);
        o.reconnect = false;
        pubs.push((p, macula_client::Client::connect_with(o).await?));
    }
    // Provider records that missed their nodes are republished every 15 s: allow a few rounds.
    let t_interest = Instant::now();
    let deadline = t_interest + Duration::from_secs(120);
    for &p in &pub_nodes {
        // Interest of every subscriber node has arrived (links plus the node's own service).
        loop {
            let links = nodes[p]
                .node
                .realm_for_mesh(REALM)
                .map_or(0, |r| r.lock().link_count());
            if links > a.subscribers {
                break;
            }
            if Instant::now() > deadline {
                // Which subscriber nodes are missing, and how far each got with node p.
                let pm = mesh(p).context("mesh off")?;
                let found_by_p = pm.providers(REALM).await;
                let mut missing = vec![];
                for j in (1..nodes.len()).take(a.subscribers) {
                    let Some(jm) = mesh(j) else { continue };
                    let (pid, jid) = (pm.peer_id(), jm.peer_id());
                    let conn = pm
                        .peer_status()
                        .iter()
                        .any(|s| s.peer_id == jid.to_string());
                    let up_here = pm.peers().contains(&jid);
                    let up_there = jm.peers().contains(&pid);
                    if up_here {
                        continue;
                    }
                    let found_by_j = jm.providers(REALM).await;
                    missing.push(format!(
                        "node {j}: connected {conn}, linked here {up_here}, there {up_there}; \
                         {p} finds it as provider {}, it finds {p} {} ({} and {} providers found)",
                        found_by_p.contains(&jid),
                        found_by_j.contains(&pid),
                        found_by_p.len(),
                        found_by_j.len()
                    ));
                }
                if missing.is_empty() {
                    missing.push(
                        "every subscriber node is linked, but one's interest never arrived".into(),
                    );
                }
                bail!(
                    "node {p} learned the interest of only {} of {} subscriber nodes ({})",
                    links.saturating_sub(1),
                    a.subscribers,
                    missing.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "mesh-sim: interest tables complete {:.1?} after the publishers joined ({:.1?} into the run)",
        t_interest.elapsed(),
        started.elapsed()
    );
    let t0 = Instant::now();
    for (p, c) in &pubs {
        for e in 0..a.events {
            let v = macula_wamp::Value::from(*p as u64 * 1_000_000 + e);
            c.publish(&topic, macula_wamp::Payload::args(vec![v]))
                .await?;
        }
    }
    let expected = a.events * a.publishers as u64;
    let mut delivered = 0u64;
    for s in streams.iter_mut() {
        let mut seen = std::collections::HashSet::new();
        while (seen.len() as u64) < expected {
            match tokio::time::timeout(Duration::from_secs(20), s.next()).await {
                Ok(Some(ev)) => {
                    let id = ev
                        .payload
                        .args
                        .first()
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0);
                    if !seen.insert(id) {
                        bail!("event {id} delivered twice to one subscriber");
                    }
                }
                _ => bail!("a subscriber received {} of {expected} events", seen.len()),
            }
        }
        delivered += seen.len() as u64;
    }
    let spread = t0.elapsed();
    let figs = vec![
        Figure {
            scenario: format!("mesh-sim {} nodes: DHT lookups ok", a.nodes),
            server: "macula",
            value: success,
            unit: "%",
            note: format!("{ok}/{} lookups between random node pairs", a.lookups),
        },
        Figure {
            scenario: "mesh-sim DHT requests/lookup p50".into(),
            server: "macula",
            value: pct(&mut reqs, 0.5),
            unit: "requests",
            note: format!("p99 {:.0} (requests sent until found; ≥ hops)", pct(&mut reqs, 0.99)),
        },
        Figure {
            scenario: "mesh-sim DHT lookup p50".into(),
            server: "macula",
            value: pct(&mut lat, 0.5),
            unit: "ms",
            note: format!("p99 {:.1} ms", pct(&mut lat, 0.99)),
        },
        Figure {
            scenario: "mesh-sim events delivered".into(),
            server: "macula",
            value: delivered as f64,
            unit: "events",
            note: format!(
                "{} publishers x {} events -> {} subscriber nodes, all exactly once in {spread:.1?}",
                a.publishers, a.events, a.subscribers
            ),
        },
    ];
    drop(pubs);
    drop(clients);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&tmp);
    if ok < a.lookups {
        bail!("{} of {} DHT lookups failed", a.lookups - ok, a.lookups);
    }
    Ok(figs)
}
