//! Placement by the nodes themselves, as pure functions and a per-node ledger: no scheduler.
//!
//! A replica slot with no running holder is *tendered*. The tendering node probes a few
//! candidates ([`candidates`], `d` of the eligible nodes, chosen by rendezvous hash of the slot
//! and the attempt, as Sparrow probes `d` workers): the cost of one placement does not grow
//! with the mesh. Each candidate answers with a *bid*: its fit score ([`fit`]) after
//! *reserving* the capacity for a short while in its [`Ledger`], so that two tenders at once
//! cannot overbook it; or why it cannot take the replica ([`Unfit`]). The award is
//! deterministic ([`award`]): the best score, ties broken by rendezvous hash. Losing bidders
//! release their reservations (or let them expire); the winner takes the slot's lease
//! ([`crate::lease`]) and turns its reservation into a running replica.
//!
//! When no candidate fits, [`why_pending`] says so in terms a user can act on ("no node has
//! 8 GiB memory free; the most free is 2 GiB on n3").

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lease::NodeId;
use crate::manifest::{Placement, Resources};

/// The label a node that runs containers (Podman and runc are there) carries, `"true"`; a
/// tender for a `podman` workload asks for it.
pub const PODMAN_LABEL: &str = "macula.io/podman";

/// What a node offers to run replicas with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    pub labels: BTreeMap<String, String>,
    pub region: Option<String>,
    /// What an instance-hour costs on this node (cheaper wins a tie of fit).
    pub millicents_per_hour: u64,
}

/// A slot to place: what one replica needs and where it may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tender {
    pub slot: String,
    /// The workload (realm/name) whose replicas are spread.
    pub workload: String,
    pub demand: Resources,
    pub placement: Placement,
}

/// Why a node cannot take a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unfit {
    Label {
        key: String,
        want: String,
    },
    Region {
        want: String,
    },
    Cpu {
        free_millis: u64,
    },
    Memory {
        free_bytes: u64,
    },
    Pids {
        free: u64,
    },
    /// This node runs the slot already.
    Running,
}

/// A bid's score: higher is better.
pub type Score = i64;

/// How well `tender` fits a node with `capacity` of which `used` is taken (running and
/// reserved) and which runs `same` replicas of the workload already.
///
/// The score favours the node left with the most balanced free share after the reservation
/// (the smaller of its free CPU and memory shares, in millionths), then spread (each replica of
/// the same workload already there costs as much as the whole range of free shares when
/// `spread` is on), then price.
pub fn fit(
    capacity: &Capacity,
    used: &Resources64,
    same: u32,
    tender: &Tender,
) -> Result<Score, Unfit> {
    for (k, v) in &tender.placement.labels {
        if capacity.labels.get(k) != Some(v) {
            return Err(Unfit::Label {
                key: k.clone(),
                want: v.clone(),
            });
        }
    }
    if let Some(r) = &tender.placement.region {
        if capacity.region.as_ref() != Some(r) {
            return Err(Unfit::Region { want: r.clone() });
        }
    }
    let free_cpu = capacity.cpu_millis.saturating_sub(used.cpu_millis);
    let free_mem = capacity.memory_bytes.saturating_sub(used.memory_bytes);
    let free_pids = capacity.pids.saturating_sub(used.pids);
    let d = &tender.demand;
    if (d.cpu_millis as u64) > free_cpu {
        return Err(Unfit::Cpu {
            free_millis: free_cpu,
        });
    }
    if d.memory_bytes > free_mem {
        return Err(Unfit::Memory {
            free_bytes: free_mem,
        });
    }
    if (d.pids as u64) > free_pids {
        return Err(Unfit::Pids { free: free_pids });
    }
    let share = |free: u64, take: u64, total: u64| -> i64 {
        if total == 0 {
            return 0;
        }
        (((free - take) as u128 * 1_000_000) / total as u128) as i64
    };
    let balanced = share(free_cpu, d.cpu_millis as u64, capacity.cpu_millis).min(share(
        free_mem,
        d.memory_bytes,
        capacity.memory_bytes,
    ));
    let spread = if tender.placement.spread {
        same as i64 * 1_000_000
    } else {
        0
    };
    // Price breaks near-ties: a millicent an hour weighs a thousandth of a percent of share.
    let price = (capacity.millicents_per_hour.min(1_000_000)) as i64 / 100;
    Ok(balanced * 1_000 - spread * 1_000 - price)
}

/// Resources summed over many replicas (wider than one replica's [`Resources`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources64 {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Resources64 {
    fn add(&mut self, r: &Resources) {
        self.cpu_millis += r.cpu_millis as u64;
        self.memory_bytes += r.memory_bytes;
        self.pids += r.pids as u64;
    }

    fn sub(&mut self, r: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_sub(r.cpu_millis as u64);
        self.memory_bytes = self.memory_bytes.saturating_sub(r.memory_bytes);
        self.pids = self.pids.saturating_sub(r.pids as u64);
    }
}

fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0u8]);
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// The `k` of `nodes` that rank highest by rendezvous hash of (`key`, node), best first
/// (ties by id; a node listed twice counts once). Every node that knows the same `nodes`
/// computes the same list, whatever their order, and removing a node moves only the places it
/// held.
pub fn top_by_hash<'a>(key: &[&[u8]], nodes: &'a [NodeId], k: usize) -> Vec<&'a NodeId> {
    let mut scored: Vec<(u64, &NodeId)> = nodes
        .iter()
        .map(|n| {
            let mut parts = key.to_vec();
            parts.push(n.as_bytes());
            (hash64(&parts), n)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.truncate(k);
    scored.into_iter().map(|(_, n)| n).collect()
}

/// The `d` nodes to probe for `slot` on its `attempt`-th try, drawn from `nodes` by hash of
/// (slot, attempt, draw): O(`d`) whatever the size of the mesh. `nodes` must be in an order
/// every node agrees on (sorted by id) for every node to draw the same ones.
pub fn candidates<'a>(slot: &str, attempt: u32, nodes: &'a [NodeId], d: usize) -> Vec<&'a NodeId> {
    if nodes.len() <= d {
        return nodes.iter().collect();
    }
    let mut out: Vec<&NodeId> = Vec::with_capacity(d);
    let a = attempt.to_be_bytes();
    for draw in 0u32..(64 * d as u32) {
        let i = (hash64(&[slot.as_bytes(), &a, &draw.to_be_bytes()]) % nodes.len() as u64) as usize;
        if !out.contains(&&nodes[i]) {
            out.push(&nodes[i]);
            if out.len() == d {
                return out;
            }
        }
    }
    // Astronomically unlikely: fill in order.
    for n in nodes {
        if out.len() == d {
            break;
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// The winner among `bids` for `slot`: the highest score. Ties go, for a slot named
/// `realm/name/i`, to the `i`-th of the tied nodes in the order of rendezvous hash of
/// (`realm/name`, node), so that replicas tendered at once onto equal nodes land on distinct
/// ones; for any other slot, to the node ranked first by hash of (slot, node). Every node that
/// sees the same bids picks the same one.
pub fn award<'a>(slot: &str, bids: &'a [(NodeId, Score)]) -> Option<&'a NodeId> {
    let best = bids.iter().map(|b| b.1).max()?;
    let mut tied: Vec<&NodeId> = bids.iter().filter(|b| b.1 == best).map(|b| &b.0).collect();
    tied.sort();
    tied.dedup();
    match slot.rsplit_once('/') {
        Some((workload, i)) if i.parse::<usize>().is_ok() => {
            let i = i.parse::<usize>().unwrap_or(0);
            tied.sort_by_key(|n| std::cmp::Reverse(hash64(&[workload.as_bytes(), n.as_bytes()])));
            tied.get(i % tied.len()).copied()
        }
        _ => tied
            .into_iter()
            .max_by_key(|n| hash64(&[slot.as_bytes(), n.as_bytes()])),
    }
}

/// Why a tender found no node, from the refusals of the nodes probed (`(node, why)`), in
/// words: the resource most often short, and the most any node has free of it.
pub fn why_pending(demand: &Resources, refusals: &[(NodeId, Unfit)]) -> String {
    if refusals.is_empty() {
        return "no node of the realm was reachable to take it".into();
    }
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    let mut mem: Option<(u64, &NodeId)> = None;
    let mut cpu: Option<(u64, &NodeId)> = None;
    let mut pids: Option<(u64, &NodeId)> = None;
    let mut other: Option<String> = None;
    for (n, u) in refusals {
        match u {
            Unfit::Memory { free_bytes } if mem.is_none_or(|(m, _)| *free_bytes > m) => {
                mem = Some((*free_bytes, n))
            }
            Unfit::Cpu { free_millis } if cpu.is_none_or(|(m, _)| *free_millis > m) => {
                cpu = Some((*free_millis, n))
            }
            Unfit::Pids { free } if pids.is_none_or(|(m, _)| *free > m) => pids = Some((*free, n)),
            Unfit::Label { key, .. } if key == PODMAN_LABEL => {
                other = Some(
                    "no node probed runs containers (the podman runtime needs podman and runc on the node)"
                        .into(),
                )
            }
            Unfit::Label { key, want } => {
                other = Some(format!("no node probed has the label {key}={want}"))
            }
            Unfit::Region { want } => other = Some(format!("no node probed is in region {want}")),
            _ => {}
        }
    }
    if let Some((free, n)) = mem {
        return format!(
            "no node has {} memory free; the most free is {} on {n}",
            gib(demand.memory_bytes),
            gib(free)
        );
    }
    if let Some((free, n)) = cpu {
        return format!(
            "no node has {} millicores free; the most free is {free} on {n}",
            demand.cpu_millis
        );
    }
    if let Some((free, n)) = pids {
        return format!(
            "no node has {} pids free; the most free is {free} on {n}",
            demand.pids
        );
    }
    other.unwrap_or_else(|| "no node fits".into())
}

/// A node's book of what it runs and what it promised in bids: never more than its capacity.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub capacity: Capacity,
    used: Resources64,
    /// Reservations by slot: what, for which workload, until when (ms).
    reserved: HashMap<String, (Resources, String, u64)>,
    /// Running replicas by slot.
    running: HashMap<String, (Resources, String)>,
    per_workload: HashMap<String, u32>,
}

impl Ledger {
    pub fn new(capacity: Capacity) -> Ledger {
        Ledger {
            capacity,
            used: Resources64::default(),
            reserved: HashMap::new(),
            running: HashMap::new(),
            per_workload: HashMap::new(),
        }
    }

    /// What is taken now (running and reserved).
    pub fn used(&self) -> Resources64 {
        self.used
    }

    /// Bids for `tender` at `now_ms`: the score, with the capacity reserved until
    /// `now_ms + hold_ms`; or why not. A second bid for the same slot renews the reservation.
    pub fn bid(&mut self, tender: &Tender, now_ms: u64, hold_ms: u64) -> Result<Score, Unfit> {
        self.expire(now_ms);
        if let Some(r) = self.reserved.get_mut(&tender.slot) {
            r.2 = now_ms + hold_ms;
            let same = self
                .per_workload
                .get(&tender.workload)
                .copied()
                .unwrap_or(0);
            let mut without = self.used;
            without.sub(&tender.demand);
            return fit(&self.capacity, &without, same.saturating_sub(1), tender);
        }
        if self.running.contains_key(&tender.slot) {
            return Err(Unfit::Running);
        }
        let same = self
            .per_workload
            .get(&tender.workload)
            .copied()
            .unwrap_or(0);
        let score = fit(&self.capacity, &self.used, same, tender)?;
        self.used.add(&tender.demand);
        *self
            .per_workload
            .entry(tender.workload.clone())
            .or_default() += 1;
        self.reserved.insert(
            tender.slot.clone(),
            (tender.demand, tender.workload.clone(), now_ms + hold_ms),
        );
        Ok(score)
    }

    /// The bid for `slot` lost (or the tender was given up): its reservation is released.
    pub fn release(&mut self, slot: &str) {
        if let Some((r, w, _)) = self.reserved.remove(slot) {
            self.forget(&r, &w);
        }
    }

    /// The bid for `slot` won: its reservation becomes a running replica. False if the
    /// reservation had lapsed (the node then bids again).
    pub fn start(&mut self, slot: &str, now_ms: u64) -> bool {
        self.expire(now_ms);
        match self.reserved.remove(slot) {
            Some((r, w, _)) => {
                self.running.insert(slot.to_owned(), (r, w));
                true
            }
            None => false,
        }
    }

    /// The replica of `slot` stopped for good here.
    pub fn stop(&mut self, slot: &str) {
        if let Some((r, w)) = self.running.remove(slot) {
            self.forget(&r, &w);
        }
    }

    /// Replicas running here.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    fn forget(&mut self, r: &Resources, w: &str) {
        self.used.sub(r);
        if let Some(n) = self.per_workload.get_mut(w) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_workload.remove(w);
            }
        }
    }

    fn expire(&mut self, now_ms: u64) {
        let lapsed: Vec<String> = self
            .reserved
            .iter()
            .filter(|(_, (_, _, until))| *until <= now_ms)
            .map(|(s, _)| s.clone())
            .collect();
        for s in lapsed {
            self.release(&s);
        }
    }
}
