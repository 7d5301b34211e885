//! Placement: fit, probing, the award, the ledger that never overbooks, and a whole mesh
//! placing a thousand replicas by itself.

use std::collections::{BTreeMap, HashMap, HashSet};

use macula_workloads::lease::NodeId;
use macula_workloads::placement::*;
use macula_workloads::{Placement, Resources};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

fn capacity(cpu: u64, mem_gib: u64) -> Capacity {
    Capacity {
        cpu_millis: cpu,
        memory_bytes: mem_gib * GIB,
        pids: 4096,
        labels: BTreeMap::new(),
        region: None,
        millicents_per_hour: 5_000,
    }
}

fn tender(slot: &str, workload: &str, cpu: u32, mem: u64) -> Tender {
    Tender {
        slot: slot.into(),
        workload: workload.into(),
        demand: Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            pids: 64,
        },
        placement: Placement {
            spread: true,
            ..Placement::default()
        },
    }
}

#[test]
fn a_node_that_cannot_take_it_says_why() {
    let mut c = capacity(1000, 2);
    c.labels.insert("disk".into(), "hdd".into());
    let mut t = tender("s", "w", 500, GIB);
    t.placement.labels.insert("disk".into(), "ssd".into());
    assert_eq!(
        fit(&c, &Resources64::default(), 0, &t),
        Err(Unfit::Label {
            key: "disk".into(),
            want: "ssd".into()
        })
    );
    t.placement.labels.clear();
    t.placement.region = Some("eu".into());
    assert_eq!(
        fit(&c, &Resources64::default(), 0, &t),
        Err(Unfit::Region { want: "eu".into() })
    );
    t.placement.region = None;
    let used = Resources64 {
        cpu_millis: 800,
        memory_bytes: 0,
        pids: 0,
    };
    assert_eq!(fit(&c, &used, 0, &t), Err(Unfit::Cpu { free_millis: 200 }));
    let t = tender("s", "w", 100, 3 * GIB);
    assert_eq!(
        fit(&c, &Resources64::default(), 0, &t),
        Err(Unfit::Memory {
            free_bytes: 2 * GIB
        })
    );
    assert_eq!(
        why_pending(
            &t.demand,
            &[
                ("n1".into(), Unfit::Memory { free_bytes: GIB }),
                (
                    "n3".into(),
                    Unfit::Memory {
                        free_bytes: 2 * GIB
                    }
                )
            ]
        ),
        "no node has 3.0 GiB memory free; the most free is 2.0 GiB on n3"
    );
}

#[test]
fn the_score_prefers_room_spread_and_price() {
    let t = tender("s", "w", 500, GIB);
    let big = capacity(4000, 8);
    let small = capacity(1000, 2);
    let empty = Resources64::default();
    assert!(fit(&big, &empty, 0, &t).unwrap() > fit(&small, &empty, 0, &t).unwrap());
    // A node running a replica of the workload already loses to one that does not.
    assert!(fit(&small, &empty, 0, &t).unwrap() > fit(&big, &empty, 1, &t).unwrap());
    // Without spread it does not.
    let mut packed = t.clone();
    packed.placement.spread = false;
    assert!(fit(&big, &empty, 1, &packed).unwrap() > fit(&small, &empty, 0, &packed).unwrap());
    // Equal room: the cheaper node.
    let mut cheap = big.clone();
    cheap.millicents_per_hour = 1_000;
    assert!(fit(&cheap, &empty, 0, &t).unwrap() > fit(&big, &empty, 0, &t).unwrap());
}

#[test]
fn probing_and_the_award_are_deterministic() {
    let nodes: Vec<NodeId> = (0..100).map(|i| format!("n{i}")).collect();
    let c = candidates("r/w/0", 0, &nodes, 3);
    assert_eq!(c.len(), 3);
    assert_eq!(c, candidates("r/w/0", 0, &nodes, 3));
    assert_ne!(
        c,
        candidates("r/w/0", 1, &nodes, 3),
        "another attempt probes other nodes"
    );
    let bids: Vec<(NodeId, Score)> = vec![("a".into(), 5), ("b".into(), 9), ("c".into(), 9)];
    let mut reversed = bids.clone();
    reversed.reverse();
    let w = award("slot", &bids).unwrap().clone();
    assert!(w == "b" || w == "c");
    assert_eq!(
        award("slot", &reversed).unwrap(),
        &w,
        "the order bids came in does not matter"
    );
    assert_eq!(award("slot", &[]), None);
}

#[test]
fn reservations_hold_then_lapse() {
    let mut l = Ledger::new(capacity(1000, 4));
    let t1 = tender("s1", "w", 600, GIB);
    let t2 = tender("s2", "w", 600, GIB);
    assert!(l.bid(&t1, 0, 500).is_ok());
    // The reservation holds: a second tender cannot overbook.
    assert_eq!(l.bid(&t2, 100, 500), Err(Unfit::Cpu { free_millis: 400 }));
    // Lapsed, it frees the room; a late start finds nothing to start.
    assert!(l.bid(&t2, 600, 500).is_ok());
    assert!(!l.start("s1", 600));
    assert!(l.start("s2", 700));
    assert_eq!(l.running(), 1);
    assert_eq!(l.bid(&t2, 800, 500), Err(Unfit::Running));
    l.stop("s2");
    assert_eq!(l.used(), Resources64::default());
}

proptest! {
    /// Whatever is bid, released, started and stopped, in whatever order, the ledger never
    /// takes more than its capacity.
    #[test]
    fn a_ledger_never_overbooks(ops in proptest::collection::vec((0u8..4, 0usize..12, 1u32..900, 1u64..3, 0u64..50), 1..200)) {
        let cap = capacity(2000, 4);
        let mut l = Ledger::new(cap.clone());
        let mut now = 0;
        for (op, slot, cpu, mem, dt) in ops {
            now += dt * 10;
            let slot = format!("s{slot}");
            match op {
                0 => { let _ = l.bid(&tender(&slot, "w", cpu, mem * GIB / 2), now, 200); }
                1 => l.release(&slot),
                2 => { l.start(&slot, now); }
                _ => l.stop(&slot),
            }
            let u = l.used();
            prop_assert!(u.cpu_millis <= cap.cpu_millis && u.memory_bytes <= cap.memory_bytes, "{u:?}");
        }
    }
}

/// A mesh of 100 nodes places 1,000 replicas (334 payloads of 3) by probing 3 nodes per try:
/// every replica is placed, no node exceeds its capacity, and a payload's replicas sit on
/// distinct nodes.
#[test]
fn a_hundred_nodes_place_a_thousand_replicas_by_themselves() {
    let nodes: Vec<NodeId> = (0..100).map(|i| format!("n{i}")).collect();
    let mut ledgers: HashMap<&NodeId, Ledger> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n,
                Ledger::new(capacity(
                    4000 + (i as u64 % 4) * 2000,
                    8 + (i as u64 % 3) * 8,
                )),
            )
        })
        .collect();
    let mut placed: HashMap<String, Vec<NodeId>> = HashMap::new();
    let mut probes = 0;
    let mut now = 0;
    for p in 0..334 {
        let workload = format!("com.example/p{p}");
        for r in 0..3 {
            let slot = format!("{workload}/{r}");
            let t = tender(&slot, &workload, 250, 512 << 20);
            let mut winner = None;
            for attempt in 0..8 {
                now += 1;
                let mut bids = vec![];
                for n in candidates(&slot, attempt, &nodes, 3) {
                    probes += 1;
                    if let Ok(score) = ledgers.get_mut(n).unwrap().bid(&t, now, 1_000) {
                        bids.push((n.clone(), score));
                    }
                }
                if let Some(w) = award(&slot, &bids).cloned() {
                    for (n, _) in &bids {
                        if *n != w {
                            ledgers.get_mut(n).unwrap().release(&slot);
                        }
                    }
                    assert!(ledgers.get_mut(&w).unwrap().start(&slot, now));
                    winner = Some(w);
                    break;
                }
            }
            placed
                .entry(workload.clone())
                .or_default()
                .push(winner.expect("placed"));
        }
    }
    let total: usize = placed.values().map(Vec::len).sum();
    assert_eq!(total, 1002);
    for (w, on) in &placed {
        let distinct: HashSet<&NodeId> = on.iter().collect();
        assert_eq!(distinct.len(), 3, "{w} on {on:?}");
    }
    for (n, l) in &ledgers {
        let u = l.used();
        assert!(
            u.cpu_millis <= l.capacity.cpu_millis && u.memory_bytes <= l.capacity.memory_bytes,
            "{n}"
        );
    }
    // Probing stays a few nodes per replica, not the mesh.
    assert!(probes < 1002 * 3 * 2, "{probes} probes");
}
