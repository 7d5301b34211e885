//! What nodes say to each other about workloads (besides deploy records and lease requests):
//! tenders, bids and awards for placement, and the questions behind `macula status` and
//! `macula logs`. Carried as JSON in the mesh's `Frame::Work`.
//!
//! A tender names only the slot and the record's sequence: each bidder derives what the
//! replica needs from its own copy of the signed record, so a peer cannot make a node reserve
//! capacity for anything that was not deployed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lease::Completion;
use crate::manifest::Manifest;
use crate::placement::{Score, Tender, Unfit};

/// Most entries in one status answer, and most lines in one logs answer: what one question
/// can make a node send.
pub const MAX_STATUS_ENTRIES: usize = 10_000;
pub const MAX_LOG_LINES: usize = 2_000;

/// One message between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Work {
    /// Bid for `slot` (of the record with sequence `seq`): answer with [`Work::Bid`].
    Tender {
        id: u64,
        slot: String,
        seq: u64,
    },
    /// The answer to tender `id`: a score (capacity reserved for a short while) or why not.
    Bid {
        id: u64,
        slot: String,
        bid: Result<Score, Unfit>,
    },
    /// The receiver won tender `id` (which took `waited_ms` so far): it takes the slot's lease
    /// and runs the replica.
    Award {
        id: u64,
        slot: String,
        waited_ms: u64,
        /// The slot's tenders before this one (a first award may be declined for spread).
        attempt: u32,
        /// The slot's lease configuration as the tendering authority serves it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cfg: Option<crate::lease::Cfg>,
    },
    /// The receiver's bid for `slot` lost: its reservation is released.
    Lost {
        slot: String,
    },
    /// What replicas of `realm` does the receiver run (and which slots could it not place)?
    StatusAsk {
        id: u64,
        realm: String,
    },
    Status {
        id: u64,
        replicas: Vec<ReplicaStatus>,
    },
    /// Output of the receiver's replicas of `realm`/`name` (`replica`: one of them), each
    /// slot's lines after the sequence number in `after`.
    LogsAsk {
        id: u64,
        realm: String,
        name: String,
        replica: Option<u32>,
        after: BTreeMap<String, u64>,
    },
    Logs {
        id: u64,
        lines: Vec<LogEntry>,
    },
    /// The nodes the sender is linked with: the receiver links to those it is not, so that
    /// every node of a mesh running workloads sees the same nodes (and computes the same lease
    /// authorities). At most [`MAX_PEERS`] are read.
    Peers {
        peers: Vec<String>,
    },
    /// Completion slots of job `realm`/`name` that are done (index, and the run that counts),
    /// as the sender knows them; at most [`MAX_STATUS_ENTRIES`] are read. Sent when a run
    /// counts and every few seconds, so that every node skips what is done.
    Done {
        realm: String,
        name: String,
        done: Vec<(u32, Completion)>,
    },
    /// The Hub's repository changed (a revocation, a yank, a key revoked): its timestamp is at
    /// `version` now. The receiver refreshes its view of the Hub from the Hub itself — the
    /// notice carries no authority — and passes it on once it verified that version.
    HubChanged {
        version: u64,
    },
}

/// Most peers read from one [`Work::Peers`].
pub const MAX_PEERS: usize = 1_024;

/// One replica slot as the node that runs it (or failed to place it) sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub realm: String,
    pub name: String,
    pub replica: u32,
    /// The node that runs it (its peer id); empty for a slot no node could take.
    pub node: String,
    /// The record's sequence the replica runs.
    pub seq: u64,
    /// `starting`, `running`, `backoff`, `succeeded`, `failed`, `stopped` or `pending`.
    pub state: String,
    /// Why, for `backoff`, `failed` and `pending` (for example "no node has 8.0 GiB memory
    /// free; the most free is 2.0 GiB on n3").
    pub detail: Option<String>,
    pub restarts: u32,
    /// Running and passing its readiness check (a replica without one: running).
    #[serde(default)]
    pub ready: bool,
    /// The lease's fencing token (0: a provisional lease, or none).
    pub token: u64,
    /// Unix seconds since when it runs here (or is pending).
    pub since: u64,
}

/// A workload at a glance: what its record asks for and where its slots stand (from the
/// replicas the nodes report). For a job, `desired` is its completions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    /// `payload` or `job`.
    pub kind: String,
    pub seq: u64,
    pub desired: u32,
    /// Replicas running any version (`running`), and running the record's version and ready
    /// (`updated`).
    pub running: u32,
    pub updated: u32,
    pub pending: u32,
    /// A job's completions that count, and those that failed.
    pub succeeded: u32,
    pub failed: u32,
    /// `running`, `progressing` (not all desired replicas run the version), `pending`,
    /// `complete`, `failed`.
    pub state: String,
    pub detail: Option<String>,
    /// Unix seconds when the record was signed.
    pub issued_at: u64,
}

/// Sums up a workload from the replicas reported for it (`now`: Unix seconds, for a job's
/// `active_deadline`).
pub fn summarize(
    name: &str,
    seq: u64,
    issued_at: u64,
    m: &Manifest,
    replicas: &[ReplicaStatus],
    now: u64,
) -> Summary {
    let mine = || replicas.iter().filter(|r| r.name == name);
    let count = |f: &dyn Fn(&ReplicaStatus) -> bool| mine().filter(|r| f(r)).count() as u32;
    let running = count(&|r| r.state == "running");
    let updated = count(&|r| r.state == "running" && r.ready && r.seq == seq);
    let pending = count(&|r| r.state == "pending");
    let succeeded = count(&|r| r.state == "succeeded" && r.seq == seq);
    let failed = count(&|r| r.state == "failed" && r.seq == seq);
    let desired = slots_of(m);
    let first_pending = || {
        mine()
            .find(|r| r.state == "pending")
            .and_then(|r| r.detail.clone())
    };
    let (kind, state, detail) = match m {
        Manifest::Job(j) => {
            let late = j
                .active_deadline
                .is_some_and(|d| now >= issued_at.saturating_add(d.as_secs()));
            let (state, detail) = if succeeded >= desired {
                ("complete", None)
            } else if failed > 0 {
                let why = mine()
                    .find(|r| r.state == "failed" && r.seq == seq)
                    .and_then(|r| r.detail.clone())
                    .unwrap_or_else(|| "a run used up its backoff_limit".into());
                ("failed", Some(why))
            } else if late {
                ("failed", Some("its active_deadline passed".to_owned()))
            } else if running == 0 && pending > 0 {
                ("pending", first_pending())
            } else {
                ("running", None)
            };
            ("job", state, detail)
        }
        Manifest::Payload(_) => {
            let (state, detail) = if updated >= desired && running == desired {
                ("running", None)
            } else if running == 0 && pending > 0 {
                ("pending", first_pending())
            } else {
                ("progressing", first_pending())
            };
            ("payload", state, detail)
        }
    };
    Summary {
        name: name.to_owned(),
        kind: kind.into(),
        seq,
        desired,
        running,
        updated,
        pending,
        succeeded,
        failed,
        state: state.into(),
        detail,
        issued_at,
    }
}

/// One line of a replica's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub slot: String,
    pub seq: u64,
    pub stderr: bool,
    pub text: String,
}

/// The slot of replica `i` of `realm`/`name`.
pub fn slot(realm: &str, name: &str, i: u32) -> String {
    format!("{realm}/{name}/{i}")
}

/// Rollout permit `k` of `realm`/`name`: a lease slot like a replica's, whose name holds a `@`
/// (which no workload's name does).
pub fn permit(realm: &str, name: &str, k: u32) -> String {
    format!("{realm}/{name}@rollout/{k}")
}

/// Whether `slot` is a rollout permit.
pub fn is_permit(slot: &str) -> bool {
    slot.contains("@rollout/")
}

/// A slot's realm, workload name and replica index. Realm and workload names hold no `/`.
pub fn parse_slot(slot: &str) -> Option<(&str, &str, u32)> {
    let mut parts = slot.splitn(3, '/');
    let (realm, name, i) = (parts.next()?, parts.next()?, parts.next()?);
    if realm.is_empty() || name.is_empty() || i.contains('/') {
        return None;
    }
    Some((realm, name, i.parse().ok()?))
}

/// How many slots a manifest asks for: a payload's replicas, a job's completions (which run
/// at most `parallelism` at a time: see [`runnable`]).
pub fn slots_of(m: &Manifest) -> u32 {
    match m {
        Manifest::Payload(p) => p.replicas,
        Manifest::Job(j) => j.completions,
    }
}

/// The completion slots of a job that may run now: the first `parallelism` that are not done.
/// Every node that knows the same completions computes the same ones; a node that knows fewer
/// computes earlier ones (never more than `parallelism` run, as no node thinks a slot done that
/// is not).
pub fn runnable(completions: u32, parallelism: u32, done: impl Fn(u32) -> bool) -> Vec<u32> {
    (0..completions)
        .filter(|i| !done(*i))
        .take(parallelism as usize)
        .collect()
}

/// The tender for replica `i` of a workload: what it needs and where it may run.
pub fn tender(realm: &str, m: &Manifest, i: u32) -> Tender {
    let w = m.workload();
    let mut placement = w.placement.clone();
    if w.runtime == crate::Runtime::Podman {
        placement
            .labels
            .insert(crate::placement::PODMAN_LABEL.to_owned(), "true".to_owned());
    }
    Tender {
        slot: slot(realm, &w.name, i),
        workload: format!("{realm}/{}", w.name),
        demand: w.resources,
        placement,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_name_their_realm_workload_and_index() {
        let s = slot("com.example.demo", "api", 2);
        assert_eq!(parse_slot(&s), Some(("com.example.demo", "api", 2)));
        assert_eq!(parse_slot("com.example/api"), None);
        assert_eq!(parse_slot("com.example/api/x"), None);
        assert_eq!(parse_slot("com.example/api/1/2"), None);
        assert_eq!(parse_slot("/api/1"), None);
    }

    #[test]
    fn a_job_runs_its_first_undone_completions_up_to_its_parallelism() {
        assert_eq!(runnable(10, 3, |_| false), vec![0, 1, 2]);
        assert_eq!(runnable(10, 3, |i| i == 1 || i == 4), vec![0, 2, 3]);
        assert_eq!(runnable(4, 3, |i| i < 3), vec![3]);
        assert!(runnable(4, 2, |_| true).is_empty());
    }
}
