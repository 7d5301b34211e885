//! `macula-bench schedule`: placement by the nodes themselves, in process. `nodes` node tasks,
//! each with its capacity ledger, its lease authority and an Ed25519 key, answer messages on
//! their own channels (as they would over the mesh, minus the network). Tenderers place
//! `placements` replica slots, `concurrency` at a time; one placement is:
//!
//! 1. probe 3 candidates (rendezvous hash of slot and attempt), each bidding from its ledger
//!    (reserving the capacity) and signing its bid; the tenderer verifies each signature;
//! 2. award the best bid; the losers release their reservations;
//! 3. the winner acquires the slot's lease from its 3 authorities (each grant signed and
//!    verified), then starts the replica in its ledger.
//!
//! Reported: placements per second, and the latency of one placement (p50, p95) from the
//! first probe to the lease held. No network: this is the CPU and queueing cost; over the mesh
//! each of the three round trips adds one mesh round trip.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use macula_workloads::lease::{self, Acquisition, Authority, Cfg, NodeId, Outcome};
use macula_workloads::placement::{award, candidates, Capacity, Ledger, Score, Tender};
use macula_workloads::{Placement, Resources};
use tokio::sync::{mpsc, oneshot};

use crate::Figure;

const TERM_MS: u64 = 10_000;

enum Ask {
    Bid(Tender, oneshot::Sender<Option<(Score, Signature)>>),
    Release(String),
    Start(String, oneshot::Sender<bool>),
    Lease(lease::Ask, oneshot::Sender<(lease::Reply, Signature)>),
}

struct Node {
    id: NodeId,
    key: VerifyingKey,
    tx: mpsc::UnboundedSender<Ask>,
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

fn bid_bytes(slot: &str, node: &str, score: Score) -> Vec<u8> {
    format!("bid\0{slot}\0{node}\0{score}").into_bytes()
}

fn grant_bytes(reply: &lease::Reply) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap_or_default()
}

fn spawn_node(i: usize, start: Instant) -> Node {
    let key = SigningKey::from_bytes(&{
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        b
    });
    let id = format!("node-{i:03}");
    let (tx, mut rx) = mpsc::unbounded_channel::<Ask>();
    let mut ledger = Ledger::new(Capacity {
        cpu_millis: 8_000 + (i as u64 % 4) * 4_000,
        memory_bytes: (16 + (i as u64 % 3) * 16) << 30,
        pids: 1 << 16,
        labels: BTreeMap::new(),
        region: None,
        millicents_per_hour: 5_000,
    });
    let mut authority = Authority::new(TERM_MS, Some(BTreeMap::new()), 0);
    let me = id.clone();
    let verifying = key.verifying_key();
    tokio::spawn(async move {
        while let Some(ask) = rx.recv().await {
            match ask {
                Ask::Bid(t, reply) => {
                    let bid = ledger
                        .bid(&t, now_ms(start), 2_000)
                        .ok()
                        .map(|s| (s, key.sign(&bid_bytes(&t.slot, &me, s))));
                    let _ = reply.send(bid);
                }
                Ask::Release(slot) => ledger.release(&slot),
                Ask::Start(slot, reply) => {
                    let _ = reply.send(ledger.start(&slot, now_ms(start)));
                }
                Ask::Lease(ask, reply) => {
                    // A member takes the slot's first configuration on when first asked under
                    // it (a node checks it against the deploy record), and persists the promise
                    // before it answers: here, in memory.
                    let slot = ask.req.slot_holder().0.to_owned();
                    if let Some(c) = ask.cfg.as_ref().filter(|c| c.epoch == 1) {
                        if authority.newest(&slot).is_none() {
                            authority.adopt(&slot, c.clone());
                        }
                    }
                    let (r, _persist) = authority.ask(&ask, now_ms(start));
                    let sig = key.sign(&grant_bytes(&r));
                    let _ = reply.send((r, sig));
                }
            }
        }
    });
    Node {
        id,
        key: verifying,
        tx,
    }
}

/// Places one slot; returns whether it was placed.
async fn place(
    nodes: &[Node],
    ids: &[NodeId],
    slot: String,
    workload: String,
    start: Instant,
) -> Result<bool> {
    let t = Tender {
        slot: slot.clone(),
        workload,
        demand: Resources {
            cpu_millis: 250,
            memory_bytes: 256 << 20,
            pids: 64,
        },
        placement: Placement {
            spread: true,
            ..Placement::default()
        },
    };
    let index = |id: &NodeId| ids.iter().position(|x| x == id).unwrap_or(0);
    for attempt in 0..8 {
        // 1. Probe: bids, signed and verified.
        let mut asks = vec![];
        for c in candidates(&slot, attempt, ids, 3) {
            let (tx, rx) = oneshot::channel();
            let n = &nodes[index(c)];
            n.tx.send(Ask::Bid(t.clone(), tx))
                .map_err(|_| anyhow!("node gone"))?;
            asks.push((n, rx));
        }
        let mut bids = vec![];
        for (n, rx) in asks {
            if let Some((score, sig)) = rx.await? {
                n.key
                    .verify(&bid_bytes(&slot, &n.id, score), &sig)
                    .map_err(|e| anyhow!("bid signature: {e}"))?;
                bids.push((n.id.clone(), score));
            }
        }
        // 2. Award; the losers release.
        let Some(winner) = award(&slot, &bids).cloned() else {
            continue;
        };
        for (n, _) in &bids {
            if *n != winner {
                let _ = nodes[index(n)].tx.send(Ask::Release(slot.clone()));
            }
        }
        // 3. The lease from the slot's authorities, grants signed and verified.
        let auths: Vec<NodeId> = lease::authorities(&slot, ids, lease::AUTHORITIES)
            .into_iter()
            .cloned()
            .collect();
        let cfg = Cfg {
            epoch: 1,
            set: auths.clone(),
        };
        let (mut acq, reqs) =
            Acquisition::start(&slot, &winner, 1, 1, &auths, now_ms(start), TERM_MS, 100);
        let mut replies = vec![];
        for (a, req) in reqs {
            let (tx, rx) = oneshot::channel();
            let n = &nodes[index(&a)];
            let ask = lease::Ask {
                cfg: Some(cfg.clone()),
                id: 1,
                req,
            };
            n.tx.send(Ask::Lease(ask, tx))
                .map_err(|_| anyhow!("node gone"))?;
            replies.push((n, rx));
        }
        let mut held = false;
        for (n, rx) in replies {
            let (r, sig) = rx.await?;
            n.key
                .verify(&grant_bytes(&r), &sig)
                .map_err(|e| anyhow!("grant signature: {e}"))?;
            if let Outcome::Held { .. } = acq.on_reply(&r) {
                held = true;
            }
        }
        if !held {
            return Ok(false);
        }
        let (tx, rx) = oneshot::channel();
        nodes[index(&winner)]
            .tx
            .send(Ask::Start(slot.clone(), tx))
            .map_err(|_| anyhow!("node gone"))?;
        return Ok(rx.await?);
    }
    Ok(false)
}

pub async fn run(nodes: usize, placements: usize, concurrency: usize) -> Result<Vec<Figure>> {
    let start = Instant::now();
    let all: Vec<Node> = (0..nodes).map(|i| spawn_node(i, start)).collect();
    let ids: Vec<NodeId> = all.iter().map(|n| n.id.clone()).collect();
    let all = Arc::new(all);
    let ids = Arc::new(ids);
    let (tx, mut rx) = mpsc::unbounded_channel::<(f64, bool)>();
    let work = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = vec![];
    for _ in 0..concurrency.max(1) {
        let (all, ids, tx, work) = (all.clone(), ids.clone(), tx.clone(), work.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = work.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= placements {
                    return Ok::<_, anyhow::Error>(());
                }
                // Payloads of 3 replicas.
                let workload = format!("com.bench/p{}", i / 3);
                let slot = format!("{workload}/{}", i % 3);
                let t = Instant::now();
                let ok = place(&all, &ids, slot, workload, start).await?;
                let _ = tx.send((t.elapsed().as_secs_f64() * 1e3, ok));
            }
        }));
    }
    drop(tx);
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut lat = vec![];
    let mut failed = 0;
    while let Ok((ms, ok)) = rx.try_recv() {
        lat.push(ms);
        if !ok {
            failed += 1;
        }
    }
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    anyhow::ensure!(failed == 0, "{failed} of {placements} placements failed");
    let note = format!(
        "{nodes} nodes in process, {placements} replicas ({concurrency} tenders at a time): probe 3, signed bids, award, lease from 3 authorities (signed grants)"
    );
    Ok(vec![
        Figure {
            scenario: format!("schedule, {nodes} nodes: placements/s"),
            server: "macula",
            value: placements as f64 / secs,
            unit: "placements/s",
            note: note.clone(),
        },
        Figure {
            scenario: format!("schedule, {nodes} nodes: latency p50"),
            server: "macula",
            value: q(0.50),
            unit: "ms",
            note: "first probe to lease held, in process (no network)".into(),
        },
        Figure {
            scenario: format!("schedule, {nodes} nodes: latency p95"),
            server: "macula",
            value: q(0.95),
            unit: "ms",
            note: "goal p95 ≤ 100 ms (the seed asks < 500 ms)".into(),
        },
    ])
}
