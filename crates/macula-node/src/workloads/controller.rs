//! The workload controller: what makes the deploy records run, with no scheduler.
//!
//! Every node runs one. Each tick (every 250 ms) it looks at the replica slots the records ask
//! for (`realm/name/i`), with the realm's nodes as it sees them (itself and the linked peers
//! that may serve the realm, sorted):
//!
//! - **Slots it holds**: renews each lease at a third of its term; stops the replica the moment
//!   the lease ends unrenewed (fencing) or the slot is no longer asked for (scaled down,
//!   deleted), and restarts it on a new record (a rollout).
//! - **Slots nobody holds**, as one of the slot's lease authorities (its own authority's view:
//!   no grant running): *tenders* them — the first authority at once, the others half a
//!   second later each, so a dead first authority does not stall the slot; only once the
//!   realm's nodes have looked the same for half a second (a node that just joined or left may
//!   not be seen alike everywhere yet). A tender asks 5 candidates
//!   (`placement::candidates`) to bid; each bids from its ledger (reserving the capacity for
//!   a few seconds) or says why it cannot; the best bid wins (`placement::award`), the others
//!   release. Nobody fits: the slot is *pending* with the reason, shown in status.
//! - **An award**: the winner acquires the slot's lease from a majority of its authorities
//!   (`lease::Acquisition`) and only then starts the replica, with the lease's fencing token.
//!   The lease, not the tender, decides: two tenders for one slot (two authorities at once)
//!   give one holder.
//!
//! A node that dies stops renewing; its grants lapse a term later at the authorities, which
//! then tender its slots again. Answers from peers arrive through the node's bounded
//! [`super::Inbox`]; every exchange has a deadline, so a lost message costs a retry, not a slot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use macula_mesh::{Frame, Peer as PeerId};
use macula_router::auth::credential;
use macula_workloads::lease::{
    self, Acquisition, Answer, Ask, Cfg, Completing, Completion, Counted, Moved, Moving, Outcome,
    ProvisionalAsk, Refusal, Reply, Request,
};
use macula_workloads::placement::{award, candidates, why_pending, Capacity, Ledger, Score, Unfit};
use macula_workloads::runtime::cgroup::Cgroup;
use macula_workloads::runtime::container::{ContainerStart, Host};
use macula_workloads::runtime::health::{Health, Target};
use macula_workloads::runtime::podman::ContainerSpec;
use macula_workloads::runtime::process::{LogBuffer, LogLimits, Start, Stream};
use macula_workloads::runtime::supervisor::{supervise, ReplicaState, Supervised};
use macula_workloads::runtime::{default_read_only, ExecSpec, Launch};
use macula_workloads::wire::{self, LogEntry, ReplicaStatus, Work};
use macula_workloads::{Artifact, Manifest, Network, Resources, Runtime};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::authority::now_ms;
use super::inbox::{InMsg, Inbound};
use crate::confdir::now_secs;
use crate::node::Node;

/// How often the controller looks at its slots.
const TICK: Duration = Duration::from_millis(250);
/// How long a tender waits for bids, and an acquisition for a majority.
const BID_WAIT: Duration = Duration::from_millis(1_000);
/// How long a provisional ask waits for the authorities it can reach (those across the
/// partition never answer): short, so that a renewal is decided well before the lease it renews
/// ends (a third of the term after it started; the lease ends at the term less a margin).
const PROVISIONAL_WAIT_MS: u64 = 300;
/// How long a bid's reservation holds (the award and the lease come within it).
const HOLD_MS: u64 = 5_000;
/// How much later each further authority of a slot tenders it than the one before.
const STAGGER: Duration = Duration::from_millis(500);
/// How long an authority waits before it first tenders a slot it sees unheld (the nodes of a
/// new workload link to each other meanwhile, see [`Controller::share_peers`]).
const FIRST_TENDER: Duration = Duration::from_millis(500);
/// How long a realm's nodes must have stayed the same, as this node sees them, before it
/// tenders (a node that just joined or left may not be seen alike everywhere yet).
const SETTLED: Duration = Duration::from_millis(500);
/// How long a node that peers are linked with, and this one is not, holds this node's tenders
/// back (it is linking to it meanwhile; one it cannot reach stops counting after this).
const LINK_GRACE: Duration = Duration::from_secs(3);
/// How many candidates a tender probes (all of a small mesh: spread is a score, so an unprobed
/// empty node cannot win; past it, the cost of a placement stays the same however big the mesh).
const PROBES: usize = 5;
/// Lines of a replica's output kept in memory.
const LOG_LINES: usize = 1_000;
/// How often an authority looks for slots whose configuration should move (the realm's nodes
/// changed), and how long a move waits for its answers.
const MOVE_EVERY: Duration = Duration::from_secs(1);
const MOVE_WAIT_MS: u64 = 2_000;
/// How long a member that is not the first of a frozen configuration waits before it finishes
/// the move itself (the first may be gone).
const MOVE_TAKEOVER: Duration = Duration::from_secs(3);

/// The controller (see the module's documentation).
pub struct Controller {
    node: Arc<Node>,
    /// This node's peer id (set when the controller starts, once the mesh is up).
    me: std::sync::OnceLock<String>,
    term_ms: u64,
    /// The WebSocket URL replicas connect to.
    url: String,
    /// Where replicas' working directories and logs go.
    dir: PathBuf,
    shim: (PathBuf, Vec<String>),
    /// The `podman` program, where this node runs containers (`workloads.podman`).
    podman_program: Option<PathBuf>,
    /// Its Podman (started on first use), once the node knows its name.
    podman: std::sync::OnceLock<Arc<Host>>,
    state: Mutex<State>,
    /// Answers awaited by [`Controller::gather_status`] and [`Controller::gather_logs`].
    waits: Mutex<HashMap<u64, mpsc::UnboundedSender<Work>>>,
    /// When each node was last seen linked (see [`Controller::members`]).
    seen: Mutex<HashMap<String, Instant>>,
    /// Fence checks waiting for authorities' answers, by the id of their asks.
    fences: Mutex<HashMap<u64, FenceAnswers>>,
    next_id: AtomicU64,
    /// Hub packages installed here (see `packages.rs`).
    packages: Arc<super::packages::Packages>,
}

/// Where a fence check gets its answers: (authority, its reply).
type FenceAnswers = mpsc::UnboundedSender<(String, Reply)>;

/// A record's manifest as parsed here: the record's sequence, the manifest, the signing key's id.
type Parsed = (u64, Arc<Manifest>, Arc<str>);

/// A record's slots as this node sees them.
struct Wanted {
    realm: String,
    name: String,
    index: u32,
    seq: u64,
    manifest: Arc<Manifest>,
    /// The key that signed the record: the realm's compute is metered under it.
    kid: Arc<str>,
}

/// A job's completion slots known to be done, for its record `seq`: the run that counts, and
/// since when this node knows (Unix seconds).
#[derive(Default)]
struct JobDone {
    seq: u64,
    slots: BTreeMap<u32, (Completion, u64)>,
    /// A run failed (it used up its `backoff_limit`): the job failed, nothing more runs.
    failed: bool,
}

#[derive(Default)]
struct State {
    ledger: Option<Ledger>,
    /// Parsed manifests by (realm, name), with the record's sequence and the id of the key
    /// that signed it (the realm's compute is metered under it).
    manifests: HashMap<(String, String), Parsed>,
    held: HashMap<String, Held>,
    acquiring: HashMap<String, Acq>,
    provisional: HashMap<String, Prov>,
    tenders: HashMap<u64, TenderRun>,
    /// Slot → the tender in flight for it.
    tendering: HashMap<String, u64>,
    /// Slot → tenders made, and when the next may be.
    attempts: HashMap<String, (u32, Instant)>,
    /// Slot → since when this node (an authority) sees it unheld.
    unheld_since: HashMap<String, Instant>,
    /// Slot → why no node took it, and since when (Unix seconds).
    pending: HashMap<String, (String, u64)>,
    /// Slot → the highest fencing token this node has heard of.
    known_token: HashMap<String, u64>,
    /// Realm → its nodes as last seen here, and since when (tenders wait for a settled view).
    membership: HashMap<String, (Vec<String>, Instant)>,
    /// Nodes peers say they are linked with that this node never was (yet): when each was last
    /// named, and since when it is missing here.
    unlinked: HashMap<String, (Instant, Instant)>,
    /// Nodes this node has been linked with (a node that left is not waited for).
    ever_linked: HashSet<String>,
    /// Jobs by (realm, name): their completions that are done.
    jobs: HashMap<(String, String), JobDone>,
    /// Rollout permits held here (see [`Controller::roll`]).
    permits: HashMap<String, Permit>,
    /// Permit → the slot it is being acquired for.
    permit_wait: HashMap<String, String>,
    /// Slot → its lease configuration as learned from authorities' answers (see `cfg_for`).
    cfgs: HashMap<String, Cfg>,
    /// Moves of slots' configurations this node runs (as one of their members).
    moves: HashMap<String, MoveRun>,
    /// Slot → the highest move ballot round seen, and when this node may try a move next.
    move_tries: HashMap<String, (u64, u64)>,
    /// Slot → since when this node sees its configuration frozen by a move not finished.
    frozen_since: HashMap<String, Instant>,
    /// When the slots' configurations were last compared with their targets.
    moves_checked: Option<Instant>,
}

/// A move of a slot's configuration (`lease::Moving`) and the id of its asks.
struct MoveRun {
    moving: Moving,
    id: u64,
}

/// A rollout permit: a lease like a slot's, `realm/name@rollout/k` (k below `max_surge +
/// max_unavailable`), held by a node while one of its replicas moves to a new version.
struct Permit {
    for_slot: String,
    index: u32,
    token: u64,
    valid_until: u64,
    renewed_at: u64,
}

struct Held {
    /// The manifest its replica runs (of record `seq`).
    manifest: Arc<Manifest>,
    /// Its compute is metered under this key, up to `metered_at`.
    kid: Arc<str>,
    metered_at: Instant,
    token: u64,
    /// When the lease ends on this node's clock, unless renewed.
    valid_until: u64,
    renewed_at: u64,
    seq: u64,
    since: u64,
    replica: Option<Supervised>,
    logs: Arc<LogBuffer>,
    /// The replica's identity (revoked when it stops).
    ticket: Option<String>,
    /// A job's run being put to the slot's authorities to accept: the ask's id, the
    /// authorities asked and those that answered.
    completing: Option<(Completing, u64, Vec<String>, HashSet<String>)>,
    /// The run of a job's completion the authorities named when granting the slot: put to
    /// them instead of running the job again.
    adopted: Option<Completion>,
    /// During a rollout with surge: the previous version's replica (and its identity), running
    /// until the new one is ready.
    old: Option<(Supervised, Option<String>, u64)>,
    /// The rollout permit this slot moves under, until its new replica is ready.
    permit: Option<String>,
    /// Permits asked for so far in this rollout, and when the next may be asked.
    permit_tries: u32,
    next_permit_at: u64,
    /// Held under one authority's provisional lease (a `duplicate_tolerant` payload on the
    /// side of a partition without a majority of the slot's authorities): no fencing token.
    provisional: bool,
}

/// A provisional lease asked for (see `lease::ProvisionalAsk`), new or a renewal.
struct Prov {
    ask: ProvisionalAsk,
    id: u64,
    auths: Vec<String>,
    answered: HashSet<String>,
    renewal: bool,
    seq: u64,
    waited_ms: u64,
}

struct Acq {
    acq: Acquisition,
    /// The id of its asks, and the configuration they were asked under.
    id: u64,
    cfg: Cfg,
    answered: HashSet<String>,
    renewal: bool,
    seq: u64,
    /// Acquisitions of this award so far (a stale token is retried above the one named).
    tries: u32,
    /// How long the tender took before this acquisition (for the schedule latency).
    waited_ms: u64,
}

struct TenderRun {
    slot: String,
    asked: HashSet<String>,
    bids: Vec<(String, Score)>,
    refusals: Vec<(String, Unfit)>,
    started: Instant,
    demand: Resources,
}

/// The node's packages: under `<workloads dir>/packages`, read from `hub.url` (or this node's
/// own HTTP address when it hosts the Hub) with the root of trust in `hub.root`.
fn packages_of(node: &Node, dir: &Path, url: &str) -> super::packages::Packages {
    let cfg = &node.config.hub;
    let hosts = node.config.registry.enabled && node.config.registry.hub.enabled;
    let own = || {
        // `url` is this node's WebSocket address (ws://host:port/...): the same listener.
        let rest = url
            .strip_prefix("ws://")
            .map(|r| ("http://", r))
            .or_else(|| url.strip_prefix("wss://").map(|r| ("https://", r)));
        rest.map(|(scheme, r)| format!("{scheme}{}", r.split('/').next().unwrap_or(r)))
    };
    let hub_url = match cfg.url.trim() {
        "" if hosts => own(),
        "" => None,
        u => Some(u.to_owned()),
    };
    let root = match &node.confdir {
        Some(d) if cfg.root.is_relative() => d.root.join(&cfg.root),
        _ => cfg.root.clone(),
    };
    let hub = Some(super::packages::HubClientConfig { url: hub_url, root });
    let packages =
        super::packages::Packages::new(dir.join("packages"), hub, node.weak(), cfg.peers);
    if cfg.peers {
        crate::mesh::blobs::serve_from(node, dir.join("packages/blobs/sha256"));
    }
    packages
}

impl Controller {
    /// The controller of `node`, whose clients connect at `url`.
    pub fn new(node: Arc<Node>, url: String) -> Arc<Controller> {
        let cfg = &node.config.workloads;
        let dir = match &node.confdir {
            Some(d) if cfg.dir.is_relative() => d.root.join(&cfg.dir),
            Some(_) => cfg.dir.clone(),
            None => std::env::temp_dir().join(format!("macula-workloads-{}", std::process::id())),
        };
        let shim = if cfg.shim.as_os_str().is_empty() {
            (
                std::env::current_exe().unwrap_or_else(|_| PathBuf::from("macula")),
                vec!["__exec".to_owned()],
            )
        } else {
            (cfg.shim.clone(), vec![])
        };
        let podman_program = podman_program(&cfg.podman);
        let mut capacity = offered(&node.config.workloads);
        if podman_program.is_some() && cfg.enabled {
            capacity.labels.insert(
                macula_workloads::placement::PODMAN_LABEL.to_owned(),
                "true".to_owned(),
            );
        }
        let state = State {
            ledger: Some(Ledger::new(capacity)),
            ..State::default()
        };
        let packages = Arc::new(packages_of(&node, &dir, &url));
        Arc::new(Controller {
            packages,
            term_ms: cfg.lease_term_ms.max(500),
            me: std::sync::OnceLock::new(),
            url,
            dir,
            shim,
            podman_program,
            podman: std::sync::OnceLock::new(),
            node,
            state: Mutex::new(state),
            waits: Mutex::new(HashMap::new()),
            fences: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// This node's id among the realm's nodes: its mesh peer id (`local` without a mesh).
    pub fn me(&self) -> &str {
        self.me.get().map_or("local", String::as_str)
    }

    /// Runs until the inbox closes. Start it once the mesh is up.
    pub async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Inbound>) {
        let id = crate::mesh::of(&self.node)
            .map(|m| m.handle.peer_id().to_string())
            .unwrap_or_else(|| "local".into());
        let _ = self.me.set(id);
        if let Some(program) = &self.podman_program {
            let me = self.me();
            let images = &self.node.config.workloads.images;
            let images = if images.is_empty() {
                vec![self.dir.join("images")]
            } else {
                images
                    .iter()
                    .map(|d| match &self.node.confdir {
                        Some(c) if d.is_relative() => c.root.join(d),
                        _ => d.clone(),
                    })
                    .collect()
            };
            match Host::new(macula_workloads::runtime::container::HostConfig {
                program: program.clone(),
                dir: self.dir.join("podman"),
                images,
                node: me[me.len().saturating_sub(12)..].to_owned(),
                reaper: Some(self.shim.clone()),
            }) {
                Ok(host) => {
                    let _ = self.podman.set(host);
                }
                // Its replicas then fail to start, saying the node runs no containers.
                Err(e) => tracing::error!("this node cannot run containers: {e}"),
            }
        }
        // The Hub's state checked every `hub.check_secs` (revocations also arrive at once as
        // change notices, `Work::HubChanged`).
        if self.packages.has_hub() {
            let packages = self.packages.clone();
            let every = Duration::from_secs(self.node.config.hub.check_secs.max(1));
            tokio::spawn(async move {
                let mut iv = tokio::time::interval(every);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    iv.tick().await;
                    if Arc::strong_count(&packages) == 1 {
                        return; // the controller is gone
                    }
                    if let Err(e) = packages.refresh().await {
                        tracing::debug!("hub: periodic check: {e}");
                    }
                }
            });
        }
        let mut tick = tokio::time::interval(TICK);
        let mut ticks = 0u64;
        let mut last_kept = 0;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some((from, msg)) => self.on_message(&from, msg),
                    None => return,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    let kept = self.state.lock().manifests.len();
                    // Every 2 s, and at once when a workload appears.
                    if ticks.is_multiple_of(8) || kept > last_kept {
                        self.share_peers();
                    }
                    last_kept = kept;
                    self.tick();
                    if ticks.is_multiple_of(4) {
                        self.sample();
                    }
                }
            }
        }
    }

    /// The replicas run here, for `/metrics` (state, restarts, memory and CPU from their
    /// control groups).
    fn sample(&self) {
        self.meter_compute();
        self.enforce_package_policy();
        let held: Vec<(String, ReplicaState, Option<Cgroup>)> = self
            .state
            .lock()
            .held
            .iter()
            .map(|(slot, h)| {
                let state = h
                    .replica
                    .as_ref()
                    .map(|s| s.state.borrow().clone())
                    .unwrap_or(ReplicaState::Stopped);
                // The groups of its current run, whatever runtime runs it.
                let cg = h.replica.as_ref().and_then(|s| s.cgroup());
                (slot.clone(), state, cg)
            })
            .collect();
        let samples = held
            .into_iter()
            .filter_map(|(slot, state, cg)| {
                let (realm, name, i) = wire::parse_slot(&slot)?;
                let (word, _, restarts) = describe(&state);
                Some(crate::metrics::ReplicaSample {
                    realm: realm.to_owned(),
                    workload: name.to_owned(),
                    replica: i,
                    state: word,
                    restarts,
                    memory_bytes: cg.as_ref().and_then(|c| c.memory_bytes()),
                    cpu_seconds: cg.as_ref().and_then(|c| c.cpu_seconds()),
                })
            })
            .collect();
        if let Ok(mut r) = self.node.metrics.workloads.replicas.lock() {
            *r = samples;
        }
    }

    /// Stops the running replicas whose package their realm's policy no longer allows (a
    /// revocation where it stops replicas, a publisher or tier it no longer takes): the run
    /// ends, and its restart is refused by the same policy, saying why in status.
    fn enforce_package_policy(&self) {
        let st = self.state.lock();
        for (slot, h) in &st.held {
            let Some(pkg) = h.manifest.workload().package.as_ref() else {
                continue;
            };
            let Some((realm, _, _)) = wire::parse_slot(slot) else {
                continue;
            };
            let running =
                |r: &Supervised| matches!(*r.state.borrow(), ReplicaState::Running { .. });
            let runs: Vec<&Supervised> = h
                .replica
                .iter()
                .chain(h.old.as_ref().map(|o| &o.0))
                .filter(|r| running(r))
                .collect();
            if runs.is_empty() {
                continue;
            }
            if let Some(why) = self.packages.policy_refusal_now(realm, pkg) {
                tracing::warn!(slot = %slot, "stopping a replica: {why}");
                for r in runs {
                    r.interrupt(why.clone());
                }
            }
        }
    }

    /// Meters the time each replica ran since the last time (its realm's compute, billed per
    /// instance-hour), under the key that deployed it. A replica counts while it runs (not
    /// while it backs off after a crash); the previous version beside a new one in a rolling
    /// update counts too.
    fn meter_compute(&self) {
        let Some(meter) = &self.node.meter else {
            return;
        };
        let now = Instant::now();
        let mut ran: Vec<(String, Arc<str>, u64)> = vec![];
        for (slot, h) in self.state.lock().held.iter_mut() {
            let ms = now.duration_since(h.metered_at).as_millis().min(60_000) as u64;
            h.metered_at = now;
            let running =
                |r: &Supervised| matches!(*r.state.borrow(), ReplicaState::Running { .. });
            let n = u64::from(h.replica.as_ref().is_some_and(running))
                + u64::from(h.old.as_ref().is_some_and(|o| running(&o.0)));
            if let (Some((realm, _, _)), true) = (wire::parse_slot(slot), n > 0) {
                ran.push((realm.to_owned(), h.kid.clone(), ms * n));
            }
        }
        let auth = self.node.auth();
        for (realm, kid, ms) in ran {
            let owner = auth.owner_group(&realm).unwrap_or_default();
            match meter.counter_for(&realm, &kid, &owner) {
                Ok(c) => c.instance_ms(ms),
                Err(e) => tracing::warn!(realm, "compute not metered: {e}"),
            }
        }
    }

    /// The counter a replica's package delivery is metered in: its realm's, under the key that
    /// deployed it.
    fn package_counter(&self, w: &Wanted) -> Option<crate::meter::Counter> {
        let m = self.node.meter.as_ref()?;
        let owner = self.node.auth().owner_group(&w.realm).unwrap_or_default();
        m.counter_for(&w.realm, &w.kid, &owner)
            .map_err(|e| tracing::warn!(realm = %w.realm, "package delivery not metered: {e}"))
            .ok()
    }

    /// The control groups' (and container's) name of this node's replica of `slot` (unique on
    /// the machine).
    fn cgroup_name(&self, slot: &str, seq: u64) -> String {
        unit_name(self.me(), slot, seq)
    }

    /// The working directory of this node's replica of `slot` at version `seq`: its own
    /// scratch space (two versions of a slot run side by side during a rollout), removed once
    /// it stopped for good.
    fn workdir(&self, slot: &str, seq: u64) -> PathBuf {
        let mut d = self.dir.join("run");
        for part in slot.split('/') {
            d.push(part);
        }
        d.join(format!("v{seq}"))
    }

    /// Stops a replica for good (version `seq` of `slot`), then removes its working directory.
    fn retire(&self, r: Supervised, slot: &str, seq: u64) {
        let dir = self.workdir(slot, seq);
        tokio::spawn(async move {
            r.stop().await;
            let _ = tokio::fs::remove_dir_all(&dir).await;
        });
    }

    /// Tells every peer which nodes this one is linked with (while this node keeps any
    /// workload): a mesh running workloads links fully, so its nodes agree on who they are.
    fn share_peers(&self) {
        let Some(m) = crate::mesh::of(&self.node) else {
            return;
        };
        if self.state.lock().manifests.is_empty() {
            return;
        }
        let peers = m.handle.peers();
        let list: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
        for p in &peers {
            self.send(
                &p.to_string(),
                Work::Peers {
                    peers: list.clone(),
                },
            );
        }
        let st = self.state.lock();
        for (realm, name) in st.jobs.keys() {
            self.share_done(&st, realm, name, None);
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The nodes of `realm` that slots' lease authorities are computed from: the live ones
    /// ([`Controller::live`]) and those seen alive within `workloads.member_grace_ms`, sorted.
    /// A node cut off by a partition keeps its place among the authorities, so the far side
    /// cannot compute authorities of its own and take a slot that runs on this side: of a
    /// slot's three authorities at most one side of a split holds a majority.
    fn members(&self, realm: &str) -> Vec<String> {
        let mut v = self.live(realm);
        let grace = Duration::from_millis(self.node.config.workloads.member_grace_ms);
        let now = Instant::now();
        {
            let mut seen = self.seen.lock();
            for n in &v {
                if seen.len() < wire::MAX_PEERS || seen.contains_key(n) {
                    seen.insert(n.clone(), now);
                }
            }
            seen.retain(|_, at| now.duration_since(*at) < grace);
            v.extend(
                seen.keys()
                    .filter(|n| self.node.peer_may_serve(realm, n) != Some(false))
                    .cloned(),
            );
        }
        v.sort();
        v.dedup();
        v
    }

    /// The nodes of `realm` as this node sees them now: itself and the linked peers that may
    /// serve it, sorted (where replicas can be placed, and whom status and logs are asked of).
    fn live(&self, realm: &str) -> Vec<String> {
        let mut v = vec![];
        if self.node.peer_may_serve(realm, self.me()) != Some(false) {
            v.push(self.me().to_owned());
        }
        if let Some(m) = crate::mesh::of(&self.node) {
            for p in m.handle.peers() {
                let p = p.to_string();
                if self.node.peer_may_serve(realm, &p) != Some(false) {
                    v.push(p);
                }
            }
        }
        v.sort();
        v.dedup();
        v
    }

    /// The Hub changed (a notice from a peer, or from the registry this node hosts): refresh
    /// the view of it from the Hub itself, and pass the notice on once that version is verified
    /// (a notice claiming a version the Hub does not have goes no further).
    /// One refresh task at a time, however many notices arrive: a peer flooding notices
    /// costs at most one refresh a second, never a growing pile of tasks.
    fn on_hub_changed(&self, from: &str, version: u64) {
        let packages = self.packages.clone();
        if !packages.has_hub() || version <= packages.view().version {
            return;
        }
        if !packages.notice(version) {
            return; // a refresh is under way; it looks at the highest version noticed
        }
        let node = self.node.clone();
        let from = from.parse::<PeerId>().ok();
        tokio::spawn(async move {
            // A notice that comes while this task ends (after its last look, before it lets
            // go) is not left to the periodic check: the task looks again.
            loop {
                let seen = packages.notice_count();
                Self::refresh_for_notices(&packages, &node, from.as_ref()).await;
                packages.notice_done();
                if packages.notice_count() == seen || !packages.notice_retake() {
                    break;
                }
            }
        });
    }

    /// Refreshes the view of the Hub until it is at the highest version noticed (or the Hub has
    /// no newer one), passing each newer verified version on to the peers.
    async fn refresh_for_notices(
        packages: &super::packages::Packages,
        node: &Arc<Node>,
        from: Option<&PeerId>,
    ) {
        let mut verified = packages.view().version;
        loop {
            match packages.refresh().await {
                Ok(v) if v > verified => {
                    verified = v;
                    if let (Some(m), Ok(bytes)) = (
                        crate::mesh::of(node),
                        serde_json::to_vec(&Work::HubChanged { version: v }),
                    ) {
                        m.handle.broadcast(&Frame::Work { msg: bytes.into() }, from);
                    }
                }
                // No newer version at the Hub than this node has: a notice claiming one
                // goes no further.
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!("hub: refreshing after a change notice: {e}");
                    break;
                }
            }
            if packages.noticed() <= verified {
                break;
            }
        }
    }

    fn send(&self, to: &str, w: Work) {
        if to == self.me() {
            self.node.work_inbox.push(to.to_owned(), InMsg::Work(w));
            return;
        }
        let (Some(m), Ok(peer)) = (crate::mesh::of(&self.node), to.parse::<PeerId>()) else {
            return;
        };
        if let Ok(bytes) = serde_json::to_vec(&w) {
            m.handle.send(&peer, &Frame::Work { msg: bytes.into() });
        }
    }

    /// Sends a lease request to authority `to`, under configuration `cfg`, as exchange `id`
    /// (this node's own answers off the runtime's threads: the promise is written to disk
    /// first).
    fn send_lease(&self, to: &str, cfg: Option<&Cfg>, id: u64, req: Request) {
        let ask = Ask {
            cfg: cfg.cloned(),
            id,
            req,
        };
        if to == self.me() {
            let node = self.node.clone();
            let me = to.to_owned();
            tokio::task::spawn_blocking(move || {
                super::accept::adopt_for(&node, &ask);
                let reply = node.leases.answer(&ask);
                node.work_inbox
                    .push(me, InMsg::Lease(Answer { id: ask.id, reply }));
            });
            return;
        }
        let (Some(m), Ok(peer)) = (crate::mesh::of(&self.node), to.parse::<PeerId>()) else {
            return;
        };
        if let Ok(bytes) = serde_json::to_vec(&ask) {
            m.handle
                .send(&peer, &Frame::LeaseRequest { req: bytes.into() });
        }
    }

    /// Every slot the records ask for in the realms this node may serve.
    fn wanted(&self, st: &mut State) -> HashMap<String, Wanted> {
        let records = self.node.workloads.records.lock();
        let mut out = HashMap::new();
        let mut seen = HashSet::new();
        for r in records.all() {
            let key = (r.realm.clone(), r.name.clone());
            seen.insert(key.clone());
            let Some(text) = &r.manifest else {
                st.manifests.remove(&key);
                continue;
            };
            if self.node.peer_may_serve(&r.realm, self.me()) != Some(true) {
                continue;
            }
            let (m, kid) = match st.manifests.get(&key) {
                Some((seq, m, kid)) if *seq == r.seq => (m.clone(), kid.clone()),
                _ => match macula_workloads::parse(text) {
                    Ok(m) => {
                        let m = Arc::new(m);
                        let kid: Arc<str> = credential::verify_public(
                            &r.key,
                            self.node.auth().authenticator.operator(),
                            now_secs(),
                        )
                        .map_or_else(|_| "workloads".into(), |v| v.claims.kid.into());
                        st.manifests
                            .insert(key.clone(), (r.seq, m.clone(), kid.clone()));
                        (m, kid)
                    }
                    Err(_) => continue,
                },
            };
            let slots = match &*m {
                Manifest::Payload(p) => (0..p.replicas).collect(),
                Manifest::Job(j) => {
                    let jd = st.jobs.entry(key.clone()).or_default();
                    if jd.seq != r.seq {
                        *jd = JobDone {
                            seq: r.seq,
                            ..JobDone::default()
                        };
                    }
                    let late = j
                        .active_deadline
                        .is_some_and(|d| now_secs() >= r.issued_at.saturating_add(d.as_secs()));
                    if jd.failed || late {
                        vec![]
                    } else {
                        wire::runnable(j.completions, j.parallelism, |i| jd.slots.contains_key(&i))
                    }
                }
            };
            for i in slots {
                out.insert(
                    wire::slot(&r.realm, &r.name, i),
                    Wanted {
                        realm: r.realm.clone(),
                        name: r.name.clone(),
                        index: i,
                        seq: r.seq,
                        manifest: m.clone(),
                        kid: kid.clone(),
                    },
                );
            }
        }
        st.manifests.retain(|k, _| seen.contains(k));
        let manifests = &st.manifests;
        st.jobs.retain(|k, _| manifests.contains_key(k));
        out
    }

    /// Takes `c` as the run of job completion `slot` that counts, if it is for the record this
    /// node has (and within its completions).
    fn learn_done(&self, st: &mut State, slot: &str, c: Completion) {
        let Some((realm, name, i)) = wire::parse_slot(slot) else {
            return;
        };
        let key = (realm.to_owned(), name.to_owned());
        let fits = matches!(st.manifests.get(&key), Some((seq, m, _))
            if *seq == c.seq && matches!(&**m, Manifest::Job(j) if i < j.completions));
        if !fits {
            return;
        }
        let jd = st.jobs.entry(key).or_default();
        if jd.seq != c.seq {
            *jd = JobDone {
                seq: c.seq,
                ..JobDone::default()
            };
        }
        jd.failed |= !c.ok;
        jd.slots.entry(i).or_insert((c, now_secs()));
    }

    /// Tells the realm's nodes which completions of `realm`/`name` are done (all this node
    /// knows, or `only` one).
    fn share_done(&self, st: &State, realm: &str, name: &str, only: Option<u32>) {
        let Some(jd) = st.jobs.get(&(realm.to_owned(), name.to_owned())) else {
            return;
        };
        let done: Vec<(u32, Completion)> = jd
            .slots
            .iter()
            .filter(|(i, _)| only.is_none_or(|o| o == **i))
            .take(wire::MAX_STATUS_ENTRIES)
            .map(|(i, (c, _))| (*i, c.clone()))
            .collect();
        if done.is_empty() {
            return;
        }
        for p in self.live(realm) {
            if p != self.me() {
                self.send(
                    &p,
                    Work::Done {
                        realm: realm.to_owned(),
                        name: name.to_owned(),
                        done: done.clone(),
                    },
                );
            }
        }
    }

    fn tick(&self) {
        let now = now_ms();
        let at = Instant::now();
        let mut st = self.state.lock();
        let wanted = self.wanted(&mut st);
        let mut members: HashMap<String, Vec<String>> = HashMap::new();
        let mut members_of = |realm: &str| -> Vec<String> {
            members
                .entry(realm.to_owned())
                .or_insert_with(|| self.members(realm))
                .clone()
        };

        // Slots held here: given up, lapsed, rolled out or renewed.
        let held: Vec<String> = st.held.keys().cloned().collect();
        for slot in held {
            let Some(w) = wanted.get(&slot) else {
                self.stop(&mut st, &slot, true, "no longer asked for");
                continue;
            };
            let Some(h) = st.held.get(&slot) else {
                continue;
            };
            if now >= h.valid_until {
                self.node
                    .metrics
                    .workloads
                    .leases_lost
                    .fetch_add(1, Ordering::Relaxed);
                self.stop(&mut st, &slot, false, "its lease lapsed unrenewed");
                continue;
            }
            // A new record that changes nothing of what runs (say, only `replicas`): nothing
            // to restart.
            if h.seq != w.seq && h.manifest.workload() == w.manifest.workload() {
                if let Some(h) = st.held.get_mut(&slot) {
                    h.seq = w.seq;
                    h.manifest = w.manifest.clone();
                }
                continue;
            }
            match &*w.manifest {
                Manifest::Payload(p) if h.seq != w.seq => {
                    self.roll(&mut st, &slot, w, p.update, now);
                }
                Manifest::Payload(_) if h.permit.is_some() => self.finish_roll(&mut st, &slot),
                // A job's run restarts on a new record at once.
                Manifest::Job(_) if h.seq != w.seq => {
                    self.replace(&mut st, &slot, w, false);
                }
                _ => {}
            }
            if matches!(&*w.manifest, Manifest::Job(_)) {
                self.report_if_ended(&mut st, &slot, now);
            }
            let renew_due = st
                .held
                .get(&slot)
                .is_some_and(|h| now >= h.renewed_at + self.term_ms / 3);
            if renew_due && !st.acquiring.contains_key(&slot) && !st.provisional.contains_key(&slot)
            {
                let token = st.held.get(&slot).map_or(0, |h| h.token);
                if st.held.get(&slot).is_some_and(|h| h.provisional) {
                    self.ask_provisional(&mut st, &slot, (true, w.seq, 0));
                } else {
                    self.acquire(&mut st, &slot, token, true, w.seq, 0);
                }
            }
        }

        // Rollout permits held here: lapsed, or renewed.
        let permits: Vec<(String, u64, u64, u64)> = st
            .permits
            .iter()
            .map(|(k, p)| (k.clone(), p.token, p.valid_until, p.renewed_at))
            .collect();
        for (permit, token, valid_until, renewed_at) in permits {
            if now >= valid_until {
                st.permits.remove(&permit);
            } else if now >= renewed_at + self.term_ms / 3 && !st.acquiring.contains_key(&permit) {
                self.acquire(&mut st, &permit, token, true, 0, 0);
            }
        }

        // Acquisitions that ran out of time.
        let late: Vec<String> = st
            .acquiring
            .iter()
            .filter(|(_, a)| {
                a.acq.expired(now)
                    || now.saturating_sub(a.acq.started_ms()) > 2 * BID_WAIT.as_millis() as u64
            })
            .map(|(s, _)| s.clone())
            .collect();
        for slot in late {
            if let Some(a) = st.acquiring.remove(&slot) {
                let outcome = match a.acq.outcome() {
                    Outcome::Pending => Outcome::Lost {
                        retry_above: a.acq.token,
                        held_by: None,
                    },
                    o => o,
                };
                self.settle(&mut st, &slot, a, outcome);
            }
        }

        self.decide_provisional(&mut st, now);

        // Tenders whose bids are in, or late.
        let due: Vec<u64> = st
            .tenders
            .iter()
            .filter(|(_, t)| at.duration_since(t.started) >= BID_WAIT)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.decide(&mut st, id);
        }

        // Moves of configurations that ran out of time; configurations to move.
        let late: Vec<String> = st
            .moves
            .iter()
            .filter(|(_, m)| now > m.moving.started_ms() + MOVE_WAIT_MS)
            .map(|(s, _)| s.clone())
            .collect();
        for slot in late {
            if let Some(m) = st.moves.remove(&slot) {
                self.move_failed(&mut st, &slot, m.moving.failed());
            }
        }
        self.check_moves(&mut st, &wanted, at);

        // Slots nobody holds, for the authorities to tender.
        for (slot, w) in &wanted {
            if st.held.contains_key(slot)
                || st.acquiring.contains_key(slot)
                || st.provisional.contains_key(slot)
                || st.tendering.contains_key(slot)
            {
                continue;
            }
            let nodes = members_of(&w.realm);
            for n in &nodes {
                if !st.ever_linked.contains(n) && st.ever_linked.len() < wire::MAX_PEERS {
                    st.ever_linked.insert(n.clone());
                }
            }
            if !settled(&mut st, &w.realm, &nodes, at) {
                continue;
            }
            // The slot's authorities tender it: the members of the configuration this node's
            // authority serves it under.
            let Some(rank) = self
                .serving(slot)
                .and_then(|c| c.set.iter().position(|a| a == self.me()))
            else {
                st.unheld_since.remove(slot);
                continue;
            };
            if self.node.leases.holder(slot).is_some() {
                st.unheld_since.remove(slot);
                st.pending.remove(slot);
                continue;
            }
            let since = *st.unheld_since.entry(slot.clone()).or_insert(at);
            // A slot this authority never granted waits for the new workload's nodes to link; one
            // whose grant lapsed (its holder died) is tendered at once.
            let first = if self.node.leases.granted_before(slot) {
                Duration::ZERO
            } else {
                FIRST_TENDER
            };
            if at.duration_since(since) < first + STAGGER * rank as u32 {
                continue;
            }
            let attempt = match st.attempts.get(slot) {
                Some((_, next)) if *next > at => continue,
                Some((n, _)) => *n,
                None => 0,
            };
            let id = self.next_id();
            // Bids from the nodes that are there now (the authorities count the absent too).
            let live = self.live(&w.realm);
            let asked: Vec<String> = candidates(slot, attempt, &live, PROBES)
                .into_iter()
                .cloned()
                .collect();
            for c in &asked {
                self.send(
                    c,
                    Work::Tender {
                        id,
                        slot: slot.clone(),
                        seq: w.seq,
                    },
                );
            }
            st.tendering.insert(slot.clone(), id);
            self.node
                .metrics
                .workloads
                .tenders
                .fetch_add(1, Ordering::Relaxed);
            st.tenders.insert(
                id,
                TenderRun {
                    slot: slot.clone(),
                    asked: asked.into_iter().collect(),
                    bids: vec![],
                    refusals: vec![],
                    started: at,
                    demand: w.manifest.workload().resources,
                },
            );
        }

        // Forget what is no longer asked for.
        st.unheld_since.retain(|s, _| wanted.contains_key(s));
        st.attempts.retain(|s, _| wanted.contains_key(s));
        st.pending.retain(|s, _| wanted.contains_key(s));
        // Tokens of slots still asked for, and of the rollout permits of their workloads.
        let workloads: HashSet<(&str, &str)> = wanted
            .values()
            .map(|w| (w.realm.as_str(), w.name.as_str()))
            .collect();
        let asked_for = |s: &String| {
            wanted.contains_key(s)
                || wire::parse_slot(s).is_some_and(|(r, n, _)| {
                    n.strip_suffix("@rollout")
                        .is_some_and(|n| workloads.contains(&(r, n)))
                })
        };
        st.known_token.retain(|s, _| asked_for(s));
        let State { cfgs, moves, .. } = &mut *st;
        cfgs.retain(|s, _| asked_for(s) || moves.contains_key(s));
        let realms: HashSet<&str> = wanted.values().map(|w| w.realm.as_str()).collect();
        st.membership.retain(|r, _| realms.contains(r.as_str()));
    }

    fn on_message(&self, from: &str, msg: InMsg) {
        match msg {
            InMsg::Lease(reply) => self.on_lease_reply(from, reply),
            InMsg::Work(w) => self.on_work(from, w),
        }
    }

    fn may_serve(&self, realm: &str, peer: &str) -> bool {
        peer == self.me() || self.node.peer_may_serve(realm, peer) == Some(true)
    }

    fn on_work(&self, from: &str, w: Work) {
        match w {
            Work::HubChanged { version } => self.on_hub_changed(from, version),
            Work::Tender { id, slot, seq: _ } => {
                let Some((realm, _, _)) = wire::parse_slot(&slot) else {
                    return;
                };
                if !self.may_serve(realm, from) {
                    return;
                }
                let mut st = self.state.lock();
                let wanted = self.wanted(&mut st);
                // Only a slot of a record this node holds too: what it reserves is what the
                // signed record asks for, not what the tenderer says.
                let Some(w) = wanted.get(&slot) else {
                    return;
                };
                let bid = if st.held.contains_key(&slot) || st.acquiring.contains_key(&slot) {
                    Err(Unfit::Running)
                } else {
                    let tender = wire::tender(&w.realm, &w.manifest, w.index);
                    match st.ledger.as_mut() {
                        Some(l) => l.bid(&tender, now_ms(), HOLD_MS),
                        None => Err(Unfit::Cpu { free_millis: 0 }),
                    }
                };
                drop(st);
                self.send(from, Work::Bid { id, slot, bid });
            }
            Work::Bid { id, slot, bid } => {
                let mut st = self.state.lock();
                let Some(run) = st.tenders.get_mut(&id) else {
                    return;
                };
                if run.slot != slot || !run.asked.remove(from) {
                    return;
                }
                match bid {
                    Ok(score) => run.bids.push((from.to_owned(), score)),
                    Err(u) => run.refusals.push((from.to_owned(), u)),
                }
                if run.asked.is_empty() {
                    self.decide(&mut st, id);
                }
            }
            Work::Award {
                id: _,
                slot,
                waited_ms,
                attempt,
                cfg,
            } => {
                let Some((realm, _, _)) = wire::parse_slot(&slot) else {
                    return;
                };
                if !self.may_serve(realm, from) {
                    return;
                }
                let mut st = self.state.lock();
                if st.held.contains_key(&slot) || st.acquiring.contains_key(&slot) {
                    return;
                }
                let wanted = self.wanted(&mut st);
                let Some(w) = wanted.get(&slot) else {
                    if let Some(l) = st.ledger.as_mut() {
                        l.release(&slot);
                    }
                    return;
                };
                // Tenders of one workload's slots at once all see every node's reservations
                // for the others: a node that already took a replica of it declines a first
                // award, and the next tender sees that replica (spread is a score: the second
                // tender may still pick this node, when it is the best there is).
                let prefix = format!("{}/{}/", w.realm, w.name);
                let has_sibling = st
                    .held
                    .keys()
                    .chain(st.acquiring.keys())
                    .any(|s| s.starts_with(&prefix));
                if attempt == 0 && has_sibling && w.manifest.workload().placement.spread {
                    tracing::debug!(
                        slot,
                        "declining a first award: a replica of the workload runs here"
                    );
                    if let Some(l) = st.ledger.as_mut() {
                        l.release(&slot);
                    }
                    return;
                }
                if let Some(c) = cfg {
                    self.learn(&mut st, &slot, c);
                }
                let token = st.known_token.get(&slot).copied().unwrap_or(0) + 1;
                if !self.acquire(&mut st, &slot, token, false, w.seq, 0) {
                    if let Some(l) = st.ledger.as_mut() {
                        l.release(&slot);
                    }
                    return;
                }
                if let Some(a) = st.acquiring.get_mut(&slot) {
                    a.waited_ms = waited_ms.min(60_000);
                }
            }
            Work::Lost { slot } => {
                let mut st = self.state.lock();
                if !st.acquiring.contains_key(&slot) && !st.held.contains_key(&slot) {
                    if let Some(l) = st.ledger.as_mut() {
                        l.release(&slot);
                    }
                }
            }
            Work::StatusAsk { id, realm } => {
                if !self.may_serve(&realm, from) {
                    return;
                }
                let mut replicas = self.local_status(&realm);
                replicas.truncate(wire::MAX_STATUS_ENTRIES);
                self.send(from, Work::Status { id, replicas });
            }
            Work::LogsAsk {
                id,
                realm,
                name,
                replica,
                after,
            } => {
                if !self.may_serve(&realm, from) {
                    return;
                }
                let lines = self.local_logs(&realm, &name, replica, &after);
                self.send(from, Work::Logs { id, lines });
            }
            Work::Peers { peers } => {
                let Some(m) = crate::mesh::of(&self.node) else {
                    return;
                };
                let linked: HashSet<String> =
                    m.handle.peers().iter().map(|p| p.to_string()).collect();
                let now = Instant::now();
                let mut st = self.state.lock();
                st.unlinked.retain(|n, (named, _)| {
                    !linked.contains(n) && now.duration_since(*named) < LINK_GRACE * 2
                });
                for p in peers.iter().take(wire::MAX_PEERS) {
                    if *p == self.me() || linked.contains(p) || st.ever_linked.contains(p) {
                        continue;
                    }
                    // Bounded: a peer naming made-up nodes holds tenders back for at most
                    // `LINK_GRACE`, and for at most `MAX_PEERS` of them.
                    if st.unlinked.len() >= wire::MAX_PEERS && !st.unlinked.contains_key(p) {
                        break;
                    }
                    if let Ok(id) = p.parse::<PeerId>() {
                        m.handle.want(id);
                        let e = st.unlinked.entry(p.clone()).or_insert((now, now));
                        e.0 = now;
                    }
                }
            }
            Work::Done { realm, name, done } => {
                if !self.may_serve(&realm, from) {
                    return;
                }
                let mut st = self.state.lock();
                for (i, c) in done.into_iter().take(wire::MAX_STATUS_ENTRIES) {
                    self.learn_done(&mut st, &wire::slot(&realm, &name, i), c);
                }
            }
            w @ (Work::Status { id, .. } | Work::Logs { id, .. }) => {
                if let Some(tx) = self.waits.lock().get(&id) {
                    let _ = tx.send(w);
                }
            }
        }
    }

    /// Closes tender `id`: the best bid wins and the others release; no bid, the slot is
    /// pending with the reason.
    fn decide(&self, st: &mut State, id: u64) {
        let Some(run) = st.tenders.remove(&id) else {
            return;
        };
        st.tendering.remove(&run.slot);
        let at = Instant::now();
        let n = st.attempts.get(&run.slot).map_or(0, |a| a.0) + 1;
        // The next tender of this slot waits longer each time (at most 5 s).
        let wait = Duration::from_millis((250u64 << n.min(5)).min(5_000));
        st.attempts.insert(run.slot.clone(), (n, at + wait));
        tracing::debug!(slot = run.slot, bids = ?run.bids, refusals = ?run.refusals, unanswered = run.asked.len(), "tender closed");
        match award(&run.slot, &run.bids) {
            Some(winner) => {
                let winner = winner.clone();
                st.pending.remove(&run.slot);
                for (node, _) in &run.bids {
                    if *node != winner {
                        self.send(
                            node,
                            Work::Lost {
                                slot: run.slot.clone(),
                            },
                        );
                    }
                }
                self.send(
                    &winner,
                    Work::Award {
                        id,
                        slot: run.slot.clone(),
                        waited_ms: at.duration_since(run.started).as_millis() as u64,
                        attempt: n - 1,
                        cfg: self.node.leases.active(&run.slot),
                    },
                );
            }
            None => {
                let why = why_pending(&run.demand, &run.refusals);
                let running_elsewhere = run
                    .refusals
                    .iter()
                    .any(|(_, u)| matches!(u, Unfit::Running));
                if !running_elsewhere {
                    let since = st.pending.get(&run.slot).map_or(now_secs(), |p| p.1);
                    st.pending.insert(run.slot.clone(), (why, since));
                }
            }
        }
    }

    /// Asks `slot`'s authorities (its configuration as this node knows it) for its lease under
    /// `token`. False when this node knows no configuration of the slot.
    fn acquire(
        &self,
        st: &mut State,
        slot: &str,
        token: u64,
        renewal: bool,
        seq: u64,
        tries: u32,
    ) -> bool {
        let Some(cfg) = self.cfg_for(st, slot) else {
            tracing::debug!(slot, "no lease configuration known for the slot");
            return false;
        };
        let (acq, reqs) = Acquisition::start(
            slot,
            self.me(),
            token,
            seq,
            &cfg.set,
            now_ms(),
            self.term_ms,
            self.term_ms / 10,
        );
        let id = self.next_id();
        for (a, req) in reqs {
            self.send_lease(&a, Some(&cfg), id, req);
        }
        st.acquiring.insert(
            slot.to_owned(),
            Acq {
                acq,
                id,
                cfg,
                answered: HashSet::new(),
                renewal,
                seq,
                tries,
                waited_ms: 0,
            },
        );
        true
    }

    /// The lease configuration of `slot` as this node knows it: the newest of what authorities
    /// told it, what its own authority knows, and the slot's first one (from its deploy record).
    fn cfg_for(&self, st: &State, slot: &str) -> Option<Cfg> {
        [
            st.cfgs.get(slot).cloned(),
            self.node.leases.newest(slot),
            self.genesis(slot),
        ]
        .into_iter()
        .flatten()
        .max_by_key(|c| c.epoch)
    }

    /// `slot`'s first configuration, from the deploy record of its workload.
    fn genesis(&self, slot: &str) -> Option<Cfg> {
        super::accept::genesis(&self.node, slot)
    }

    /// The configuration this node's authority serves `slot` under, if it does; a slot it
    /// keeps nothing of whose first configuration names this node is taken on first.
    fn serving(&self, slot: &str) -> Option<Cfg> {
        if let Some(c) = self.node.leases.active(slot) {
            return Some(c);
        }
        if self.node.leases.member_of(slot).is_some() || self.node.leases.newest(slot).is_some() {
            return None;
        }
        let g = self.genesis(slot).filter(|g| g.has(self.me()))?;
        self.node.leases.adopt(slot, g);
        self.node.leases.active(slot)
    }

    /// Moves the configurations of the slots this node is an authority of toward their targets
    /// (the rendezvous top 3 over the realm's nodes as seen here), once a second, and finishes
    /// moves that stalled (see `lease::Moving`). Only the first member of a configuration that
    /// this node sees moves it; another finishes a stalled move after `MOVE_TAKEOVER`.
    fn check_moves(&self, st: &mut State, wanted: &HashMap<String, Wanted>, at: Instant) {
        if st
            .moves_checked
            .is_some_and(|t| at.duration_since(t) < MOVE_EVERY)
        {
            return;
        }
        st.moves_checked = Some(at);
        // The slots asked for, and their workloads' rollout permits, whose first configuration
        // names this node: kept here from now on, so that they move with the realm's nodes
        // whether anyone holds them or not.
        let mut workloads = HashSet::new();
        for (slot, w) in wanted {
            self.serving(slot);
            if let (Manifest::Payload(p), true) =
                (&*w.manifest, workloads.insert((&w.realm, &w.name)))
            {
                for k in 0..(p.update.max_surge + p.update.max_unavailable).max(1) {
                    self.serving(&wire::permit(&w.realm, &w.name, k));
                }
            }
        }
        let now = now_ms();
        let mut nodes_of: HashMap<String, (Vec<String>, Vec<String>, bool)> = HashMap::new();
        let configs = self.node.leases.configs();
        for (slot, cfg, frozen) in &configs {
            if st.moves.contains_key(slot) {
                continue;
            }
            let Some((realm, _, _)) = wire::parse_slot(slot) else {
                continue;
            };
            if !nodes_of.contains_key(realm) {
                let members = self.members(realm);
                let ok = settled(st, realm, &members, at);
                nodes_of.insert(realm.to_owned(), (members, self.live(realm), ok));
            }
            let Some((members, live, true)) = nodes_of.get(realm) else {
                continue;
            };
            let target: Vec<String> = lease::authorities(slot, members, lease::AUTHORITIES)
                .into_iter()
                .cloned()
                .collect();
            if !frozen && cfg.same_nodes(&target) {
                st.frozen_since.remove(slot);
                continue;
            }
            let (round, next_at) = st.move_tries.get(slot).copied().unwrap_or((0, 0));
            if target.is_empty() || now < next_at {
                continue;
            }
            // A move needs a majority of the configuration: one that cannot reach it would only
            // freeze the members it reaches (on the minority side of a split, those that may
            // still back a duplicate-tolerant payload's provisional lease).
            let reachable = cfg.set.iter().filter(|n| live.contains(n)).count();
            if reachable < cfg.majority() {
                continue;
            }
            let first = cfg.set.iter().find(|n| live.contains(n));
            if first.map(String::as_str) != Some(self.me()) {
                let since = *st.frozen_since.entry(slot.clone()).or_insert(at);
                if !frozen || at.duration_since(since) < MOVE_TAKEOVER {
                    continue;
                }
            }
            let id = self.next_id();
            let state = self.node.leases.handover(slot);
            let (moving, reqs) =
                Moving::start(slot, self.me(), cfg, &target, round + 1, state, now);
            tracing::debug!(slot, from = ?cfg, to = ?target, "moving the slot's lease authorities");
            for (a, req) in reqs {
                self.send_lease(&a, None, id, req);
            }
            st.moves.insert(slot.clone(), MoveRun { moving, id });
            st.move_tries.insert(slot.clone(), (round + 1, 0));
        }
        let kept: HashSet<&String> = configs.iter().map(|c| &c.0).collect();
        st.move_tries.retain(|s, _| kept.contains(s));
        st.frozen_since.retain(|s, _| kept.contains(s));
    }

    /// An answer to a move this node runs.
    fn on_move_reply(&self, st: &mut State, from: &str, slot: &str, reply: &Reply) {
        let Some(run) = st.moves.get_mut(slot) else {
            return;
        };
        let id = run.id;
        let (outcome, out) = run.moving.on_reply(from, reply);
        for (a, req) in out {
            self.send_lease(&a, None, id, req);
        }
        match outcome {
            Moved::Pending => {}
            Moved::Done(next) => {
                st.moves.remove(slot);
                st.frozen_since.remove(slot);
                tracing::info!(slot, epoch = next.epoch, set = ?next.set, "the slot's lease authorities moved");
                self.node
                    .metrics
                    .workloads
                    .authority_moves
                    .fetch_add(1, Ordering::Relaxed);
                self.learn(st, slot, next);
            }
            failed @ Moved::Failed { .. } => {
                st.moves.remove(slot);
                self.move_failed(st, slot, failed);
            }
        }
    }

    /// A move that did not finish: learn what it was told, and try again in 1 to 3 s (later
    /// than a mover it was outbid by).
    fn move_failed(&self, st: &mut State, slot: &str, failed: Moved) {
        let Moved::Failed { newer, outbid } = failed else {
            return;
        };
        tracing::debug!(
            slot,
            ?newer,
            ?outbid,
            "a move of the slot's lease authorities did not finish"
        );
        if let Some(c) = newer {
            // A configuration past the one moved exists: its successor was chosen without this
            // member (it missed the move or its end); it stops serving and moving it.
            if let Some(mine) = self.node.leases.member_of(slot) {
                self.node.leases.superseded(slot, mine.epoch, &c);
            }
            self.learn(st, slot, c);
        }
        let jitter = rand::random::<u64>() % 2_000;
        let e = st.move_tries.entry(slot.to_owned()).or_insert((0, 0));
        if let Some(b) = outbid {
            e.0 = e.0.max(b.0);
        }
        e.1 = now_ms() + 1_000 + jitter;
    }

    /// Takes `cfg` as `slot`'s configuration if it is newer than the one known.
    fn learn(&self, st: &mut State, slot: &str, cfg: Cfg) {
        if st.cfgs.get(slot).is_none_or(|c| cfg.epoch > c.epoch) {
            st.cfgs.insert(slot.to_owned(), cfg);
        }
    }

    fn on_lease_reply(&self, from: &str, answer: Answer) {
        let Answer { id, reply } = answer;
        // Answers to fence checks go to their waiters.
        if let Some(tx) = self.fences.lock().get(&id) {
            let _ = tx.send((from.to_owned(), reply));
            return;
        }
        let slot = reply.slot().to_owned();
        let mut st = self.state.lock();
        // An authority asked that serves the slot under a newer configuration says which (an
        // answer to no ask of this node's, or from a node it did not ask, teaches nothing).
        if let Reply::Refused {
            why: Refusal::Config(Some(c)),
            ..
        }
        | Reply::NotCompleted {
            why: Refusal::Config(Some(c)),
            ..
        } = &reply
        {
            let asked = st
                .acquiring
                .get(&slot)
                .is_some_and(|a| a.id == id && a.cfg.has(from))
                || st
                    .provisional
                    .get(&slot)
                    .is_some_and(|p| p.id == id && p.auths.iter().any(|a| a == from))
                || st
                    .held
                    .get(&slot)
                    .and_then(|h| h.completing.as_ref())
                    .is_some_and(|c| c.1 == id && c.2.iter().any(|a| a == from))
                || st
                    .moves
                    .get(&slot)
                    .is_some_and(|m| m.id == id && m.moving.from.has(from));
            if asked {
                self.learn(&mut st, &slot, c.clone());
            }
        }
        if st.moves.get(&slot).is_some_and(|m| m.id == id) {
            return self.on_move_reply(&mut st, from, &slot, &reply);
        }
        if let Some(p) = st.provisional.get_mut(&slot).filter(|p| p.id == id) {
            if matches!(
                reply,
                Reply::GrantedProvisional { .. } | Reply::Refused { .. }
            ) && p.auths.iter().any(|a| a == from)
                && p.answered.insert(from.to_owned())
            {
                p.ask.on_reply(&reply);
            }
            return;
        }
        if matches!(reply, Reply::Completed { .. } | Reply::NotCompleted { .. }) {
            return self.on_completion_reply(&mut st, from, &slot, id, &reply);
        }
        let Some(a) = st.acquiring.get_mut(&slot).filter(|a| a.id == id) else {
            return;
        };
        // Each of the authorities asked counts once.
        let authority = a.acq.authorities().iter().any(|x| x == from);
        if !authority || !a.answered.insert(from.to_owned()) {
            return;
        }
        let outcome = a.acq.on_reply(&reply);
        if outcome == Outcome::Pending {
            return;
        }
        if let Some(a) = st.acquiring.remove(&slot) {
            self.settle(&mut st, &slot, a, outcome);
        }
    }

    /// When the run of job completion `slot` held here has ended (or the authorities named an
    /// earlier run), puts it to the slot's authorities to accept (again, when the last ask went
    /// unanswered for two seconds).
    fn report_if_ended(&self, st: &mut State, slot: &str, now: u64) {
        let me = self.me().to_owned();
        let cfg = self.cfg_for(st, slot);
        let id = self.next_id();
        let Some(h) = st.held.get_mut(slot) else {
            return;
        };
        let ended = |ok| Completion {
            seq: h.seq,
            holder: me.clone(),
            token: h.token,
            ok,
        };
        let run = match (
            &h.adopted,
            h.replica.as_ref().map(|r| r.state.borrow().clone()),
        ) {
            (Some(run), _) => run.clone(),
            (None, Some(ReplicaState::Succeeded)) => ended(true),
            (None, Some(ReplicaState::Failed { .. })) => ended(false),
            _ => return,
        };
        if h.completing
            .as_ref()
            .is_some_and(|(c, ..)| now < c.started_ms() + 2 * BID_WAIT.as_millis() as u64)
        {
            return;
        }
        let Some(cfg) = cfg else {
            return;
        };
        let (c, reqs) = Completing::start(slot, &me, h.token, run, &cfg.set, now);
        h.completing = Some((c, id, cfg.set.clone(), HashSet::new()));
        for (a, req) in reqs {
            self.send_lease(&a, Some(&cfg), id, req);
        }
    }

    /// An authority's answer to a report that a job's run ended: once a majority recorded it,
    /// the run counts and the slot is done; once a majority cannot, it does not count.
    fn on_completion_reply(&self, st: &mut State, from: &str, slot: &str, id: u64, reply: &Reply) {
        let Some((c, asked_id, asked, answered)) =
            st.held.get_mut(slot).and_then(|h| h.completing.as_mut())
        else {
            return;
        };
        let authority = *asked_id == id && asked.iter().any(|a| a == from);
        // The slot moved: not an answer (the run is put to the new configuration when this ask
        // is retried).
        let moved = matches!(
            reply,
            Reply::NotCompleted {
                why: Refusal::Config(_),
                ..
            }
        );
        if !authority || moved || !answered.insert(from.to_owned()) {
            return;
        }
        match c.on_reply(reply) {
            Counted::Pending => {}
            Counted::Yes => {
                let done = c.run.clone();
                tracing::info!(
                    slot,
                    holder = done.holder,
                    token = done.token,
                    ok = done.ok,
                    "job run counted"
                );
                self.learn_done(st, slot, done);
                self.stop(st, slot, true, "its run is counted");
                if let Some((realm, name, i)) = wire::parse_slot(slot) {
                    self.share_done(st, realm, name, Some(i));
                }
            }
            Counted::No => {
                self.stop(
                    st,
                    slot,
                    true,
                    "its run was not accepted (its lease is not current)",
                );
            }
        }
    }

    /// `macula.fence.check`: asks `slot`'s authorities for the highest token they promised and
    /// judges `token` once a majority answered (`lease::fence_verdict`), within a second.
    pub async fn fence(&self, slot: &str, token: u64) -> Result<crate::node::Fence, String> {
        let mut cfg = {
            let st = self.state.lock();
            self.cfg_for(&st, slot)
        }
        .ok_or_else(|| format!("{slot} is not a slot of a workload this node knows"))?;
        // The slot's configuration may have moved on: its members then name the next one.
        for _ in 0..3 {
            match self.fence_under(slot, token, &cfg).await {
                Ok(f) => return Ok(f),
                Err((why, Some(next))) if next.epoch > cfg.epoch => {
                    tracing::debug!(slot, why, "the slot's configuration moved: asking again");
                    self.learn(&mut self.state.lock(), slot, next.clone());
                    cfg = next;
                }
                Err((why, _)) => return Err(why),
            }
        }
        Err(format!(
            "the authorities of {slot} are being moved: try again"
        ))
    }

    /// A fence check under `cfg`: the verdict, or why not and a newer configuration named.
    async fn fence_under(
        &self,
        slot: &str,
        token: u64,
        cfg: &Cfg,
    ) -> Result<crate::node::Fence, (String, Option<Cfg>)> {
        let id = self.next_id();
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.fences.lock().insert(id, tx);
        for a in &cfg.set {
            self.send_lease(
                a,
                Some(cfg),
                id,
                Request::Fence {
                    slot: slot.to_owned(),
                    holder: self.me().to_owned(),
                },
            );
        }
        let mut answers: HashMap<String, u64> = HashMap::new();
        let mut newer: Option<Cfg> = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let asked = cfg.set.len();
        let verdict = loop {
            if let Some((current, highest)) =
                lease::fence_verdict(token, &answers.values().copied().collect::<Vec<_>>(), asked)
            {
                break Ok(crate::node::Fence { current, highest });
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                // An authority that abstains (it lost its promises) does not count.
                Ok(Some((from, Reply::Fence { promised: Some(p), .. }))) if cfg.has(&from) => {
                    answers.insert(from, p);
                }
                Ok(Some((
                    from,
                    Reply::Refused {
                        why: Refusal::Config(Some(c)),
                        ..
                    },
                ))) if cfg.has(&from) => {
                    if newer.as_ref().is_none_or(|n| c.epoch > n.epoch) {
                        newer = Some(c);
                    }
                    if newer.as_ref().is_some_and(|n| n.epoch > cfg.epoch) {
                        break Err(("moved".to_owned(), newer.clone()));
                    }
                }
                Ok(Some(_)) => {}
                _ => {
                    break Err((
                        format!(
                            "{} of the {} authorities of {slot} answered within a second (a majority is needed): try again",
                            answers.len(),
                            asked
                        ),
                        newer.clone(),
                    ))
                }
            }
        };
        self.fences.lock().remove(&id);
        verdict
    }

    /// An acquisition is over: start (or keep) the replica, or let the slot go.
    fn settle(&self, st: &mut State, slot: &str, a: Acq, outcome: Outcome) {
        match outcome {
            Outcome::Pending => {}
            Outcome::Held {
                token,
                valid_until_ms,
                accepted,
            } => {
                let k = st.known_token.entry(slot.to_owned()).or_default();
                *k = (*k).max(token);
                let w_metrics = &self.node.metrics.workloads;
                if wire::is_permit(slot) {
                    return self.settle_permit(st, slot, &a, Some((token, valid_until_ms)));
                }
                if a.renewal {
                    if let Some(h) = st.held.get_mut(slot) {
                        h.valid_until = valid_until_ms;
                        h.renewed_at = a.acq.started_ms();
                        w_metrics.renewals.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                let wanted = self.wanted(st);
                let Some(w) = wanted.get(slot) else {
                    self.release_lease(st, slot, token);
                    if let Some(l) = st.ledger.as_mut() {
                        l.release(slot);
                    }
                    return;
                };
                let took = a.waited_ms + now_ms().saturating_sub(a.acq.started_ms());
                if !self.hold(
                    st,
                    slot,
                    w,
                    token,
                    valid_until_ms,
                    a.acq.started_ms(),
                    a.seq,
                    took,
                    accepted,
                    false,
                ) {
                    self.release_lease(st, slot, token);
                }
            }
            Outcome::Lost {
                retry_above,
                held_by,
            } => {
                let k = st.known_token.entry(slot.to_owned()).or_default();
                *k = (*k).max(retry_above);
                if wire::is_permit(slot) {
                    tracing::debug!(
                        slot,
                        ?held_by,
                        retry_above,
                        renewal = a.renewal,
                        "rollout permit not taken"
                    );
                    return self.settle_permit(st, slot, &a, None);
                }
                if a.renewal {
                    // Another holder got it: stop now. Otherwise keep running while the lease
                    // lasts; the next tick renews again.
                    if held_by.is_some_and(|h| h != self.me()) {
                        self.node
                            .metrics
                            .workloads
                            .leases_lost
                            .fetch_add(1, Ordering::Relaxed);
                        self.stop(st, slot, false, "another node holds its lease");
                    }
                    return;
                }
                let stale = held_by.is_none() && retry_above >= a.acq.token;
                // The slot moved: ask the configuration named, at once.
                let moved = a.acq.newer().is_some_and(|c| c.epoch > a.cfg.epoch);
                if (moved || stale && a.acq.majority_answered()) && a.tries < 3 {
                    let token = if moved { a.acq.token } else { retry_above + 1 };
                    self.acquire(st, slot, token, false, a.seq, a.tries + 1);
                    if let Some(next) = st.acquiring.get_mut(slot) {
                        next.waited_ms = a.waited_ms + now_ms().saturating_sub(a.acq.started_ms());
                    }
                    return;
                }
                // No majority of the authorities answered (a partition): a payload that may run
                // twice asks for a provisional lease instead.
                let tolerant = self.wanted(st).get(slot).is_some_and(
                    |w| matches!(&*w.manifest, Manifest::Payload(p) if p.duplicate_tolerant),
                );
                if tolerant && !a.acq.majority_answered() {
                    let waited = a.waited_ms + now_ms().saturating_sub(a.acq.started_ms());
                    self.ask_provisional(st, slot, (false, a.seq, waited));
                    return;
                }
                if let Some(l) = st.ledger.as_mut() {
                    l.release(slot);
                }
            }
        }
    }

    /// Takes `slot` for `w` under `token` (0: provisionally): the reservation becomes the
    /// replica's (one that lapsed is made again, if the capacity is still there) and the
    /// replica starts. False when the capacity is gone.
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &self,
        st: &mut State,
        slot: &str,
        w: &Wanted,
        token: u64,
        valid_until_ms: u64,
        renewed_at: u64,
        seq: u64,
        took_ms: u64,
        accepted: Option<Completion>,
        provisional: bool,
    ) -> bool {
        let w_metrics = &self.node.metrics.workloads;
        let booked = st.ledger.as_mut().is_some_and(|l| {
            l.start(slot, now_ms()) || {
                let t = wire::tender(&w.realm, &w.manifest, w.index);
                l.bid(&t, now_ms(), HOLD_MS).is_ok() && l.start(slot, now_ms())
            }
        });
        if !booked {
            tracing::warn!(slot, "the lease came after the capacity was gone");
            return false;
        }
        tracing::info!(slot, token, provisional, "replica slot taken");
        w_metrics.placements.fetch_add(1, Ordering::Relaxed);
        w_metrics.schedule_seconds.observe(took_ms as f64 / 1e3);
        let logs = Arc::new(LogBuffer::new(LOG_LINES));
        // A job's completion whose run the authorities already accepted does not run
        // again: this node has that run accepted (see `lease`).
        let adopted = accepted.filter(|r| r.seq == w.seq);
        let (replica, ticket) = if adopted.is_some() {
            tracing::info!(slot, "a run of this completion was accepted: confirming it");
            (None, None)
        } else {
            let ticket = self.ticket_for(w);
            let replica = self.start_replica(w, token, logs.clone(), ticket.as_deref());
            (Some(replica), ticket)
        };
        st.pending.remove(slot);
        st.held.insert(
            slot.to_owned(),
            Held {
                manifest: w.manifest.clone(),
                kid: w.kid.clone(),
                metered_at: Instant::now(),
                token,
                valid_until: valid_until_ms,
                renewed_at,
                seq,
                since: now_secs(),
                replica,
                logs,
                ticket,
                completing: None,
                adopted,
                old: None,
                permit: None,
                permit_tries: 0,
                next_permit_at: 0,
                provisional,
            },
        );
        true
    }

    /// Asks `slot`'s authorities for a provisional lease (a `duplicate_tolerant` payload that
    /// could reach no majority of them), or to renew one.
    fn ask_provisional(&self, st: &mut State, slot: &str, p: (bool, u64, u64)) {
        let (renewal, seq, waited_ms) = p;
        let Some(cfg) = self.cfg_for(st, slot) else {
            return;
        };
        let (ask, reqs) = ProvisionalAsk::start(slot, self.me(), &cfg.set, now_ms());
        let id = self.next_id();
        for (a, req) in reqs {
            self.send_lease(&a, Some(&cfg), id, req);
        }
        st.provisional.insert(
            slot.to_owned(),
            Prov {
                ask,
                id,
                auths: cfg.set,
                answered: HashSet::new(),
                renewal,
                seq,
                waited_ms,
            },
        );
    }

    /// Provisional asks whose answers are in (or late): held, renewed, or not.
    fn decide_provisional(&self, st: &mut State, now: u64) {
        let due: Vec<String> = st
            .provisional
            .iter()
            .filter(|(_, p)| {
                p.answered.len() >= p.auths.len()
                    || now.saturating_sub(p.ask.started_ms()) >= PROVISIONAL_WAIT_MS
            })
            .map(|(s, _)| s.clone())
            .collect();
        for slot in due {
            let Some(p) = st.provisional.remove(&slot) else {
                continue;
            };
            let until = p.ask.decide(self.term_ms, self.term_ms / 10);
            match (until, p.renewal) {
                (Some(until), true) => {
                    if let Some(h) = st.held.get_mut(&slot) {
                        h.valid_until = until;
                        h.renewed_at = p.ask.started_ms();
                    }
                }
                // Not renewed (a majority answers: the partition is over; or refused): it
                // stops when its lease ends, and the slot is placed as usual.
                (None, true) => {}
                (Some(until), false) => {
                    let wanted = self.wanted(st);
                    let took = p.waited_ms + now.saturating_sub(p.ask.started_ms());
                    let started = p.ask.started_ms();
                    let held = wanted.get(&slot).is_some_and(|w| {
                        self.hold(st, &slot, w, 0, until, started, p.seq, took, None, true)
                    });
                    if !held {
                        if let Some(l) = st.ledger.as_mut() {
                            l.release(&slot);
                        }
                    }
                }
                (None, false) => {
                    if let Some(l) = st.ledger.as_mut() {
                        l.release(&slot);
                    }
                }
            }
        }
    }

    /// A permit's acquisition is over: held (`Some`: token and end) or not.
    fn settle_permit(&self, st: &mut State, permit: &str, a: &Acq, held: Option<(u64, u64)>) {
        match (held, a.renewal) {
            (Some((_, until)), true) => {
                if let Some(p) = st.permits.get_mut(permit) {
                    p.valid_until = until;
                    p.renewed_at = a.acq.started_ms();
                }
            }
            (Some((token, until)), false) => {
                let waiting = st.permit_wait.remove(permit);
                let index = wire::parse_slot(permit).map_or(0, |s| s.2);
                match waiting.filter(|s| st.held.contains_key(s)) {
                    Some(for_slot) => {
                        tracing::debug!(permit, for_slot, "rollout permit taken");
                        st.permits.insert(
                            permit.to_owned(),
                            Permit {
                                for_slot,
                                index,
                                token,
                                valid_until: until,
                                renewed_at: a.acq.started_ms(),
                            },
                        );
                    }
                    None => self.release_lease(st, permit, token),
                }
            }
            // Kept while it lasts, unless another node holds it now.
            (None, true) => {}
            (None, false) => {
                if let Some(s) = st.permit_wait.remove(permit) {
                    if let Some(h) = st.held.get_mut(&s) {
                        h.next_permit_at = now_ms() + 250;
                    }
                }
            }
        }
    }

    /// Moves replica `slot` (held here, running an older version of payload `w`) to `w`'s
    /// version, a few at a time across the whole workload with no one in charge: a replica
    /// moves only under one of `max_surge + max_unavailable` *rollout permits*, leases like a
    /// slot's, so no more than that many move at once anywhere. Under one of the first
    /// `max_surge` permits the new replica starts beside the old one, which stops when the new
    /// one is ready (the node reserves room for both meanwhile; a payload with a fixed port
    /// cannot run twice on a node and always stops first); under the others, the old one stops
    /// first. The permit is given back once the new replica is ready.
    fn roll(&self, st: &mut State, slot: &str, w: &Wanted, u: macula_workloads::Update, now: u64) {
        let count = (u.max_surge + u.max_unavailable).max(1);
        let held_permit = st
            .permits
            .iter()
            .find(|(_, p)| p.for_slot == slot)
            .map(|(k, p)| (k.clone(), p.index));
        let Some((permit, index)) = held_permit else {
            if st.permit_wait.values().any(|s| s == slot) {
                return;
            }
            let Some(h) = st.held.get_mut(slot) else {
                return;
            };
            if now < h.next_permit_at {
                return;
            }
            let first = macula_workloads::placement::top_by_hash(
                &[slot.as_bytes()],
                &(0..count).map(|k| k.to_string()).collect::<Vec<_>>(),
                1,
            )
            .first()
            .and_then(|k| k.parse::<u32>().ok())
            .unwrap_or(0);
            let k = (first + h.permit_tries) % count;
            h.permit_tries += 1;
            let permit = wire::permit(&w.realm, &w.name, k);
            if st.acquiring.contains_key(&permit) || st.permits.contains_key(&permit) {
                return;
            }
            let token = st.known_token.get(&permit).copied().unwrap_or(0) + 1;
            st.permit_wait.insert(permit.clone(), slot.to_owned());
            self.acquire(st, &permit, token, false, w.seq, 0);
            return;
        };
        let fixed_port = w.manifest.workload().ports.iter().any(|p| p.port.is_some());
        let mut surge = index < u.max_surge && !fixed_port;
        if surge && st.held.get(slot).is_some_and(|h| h.old.is_none()) {
            // Room for the second replica, for as long as both run.
            let shadow = format!("{slot}#surge");
            let mut t = wire::tender(&w.realm, &w.manifest, w.index);
            t.slot = shadow.clone();
            let booked = st.ledger.as_mut().is_some_and(|l| {
                l.bid(&t, now_ms(), HOLD_MS).is_ok() && l.start(&shadow, now_ms())
            });
            if !booked && u.max_unavailable > 0 {
                surge = false;
            } else if !booked {
                // No room to run both here: give the permit to another replica for now.
                if let Some(p) = st.permits.remove(&permit) {
                    self.release_lease(st, &permit, p.token);
                }
                if let Some(h) = st.held.get_mut(slot) {
                    h.next_permit_at = now + 2_000;
                }
                return;
            }
        }
        tracing::info!(
            slot,
            seq = w.seq,
            surge,
            "moving the replica to a new version"
        );
        self.replace(st, slot, w, surge);
        if let Some(h) = st.held.get_mut(slot) {
            h.permit = Some(permit);
        }
    }

    /// Starts `w`'s version of replica `slot` in place of the one running: beside it when
    /// `surge` (the old one stops once the new one is ready), after it otherwise.
    fn replace(&self, st: &mut State, slot: &str, w: &Wanted, surge: bool) {
        let Some(h) = st.held.get_mut(slot) else {
            return;
        };
        let (token, logs, seq) = (h.token, h.logs.clone(), h.seq);
        let (current, ticket) = (h.replica.take(), h.ticket.take());
        // A surge keeps the replica that ran before the rollout, not one started during it.
        if surge && h.old.is_none() {
            h.old = current.map(|r| (r, ticket, seq));
        } else {
            if let Some(r) = current {
                self.retire(r, slot, seq);
            }
            // The new manifest may name another role: a new identity.
            if let Some(t) = ticket {
                self.node.tickets.revoke(&t);
            }
        }
        let ticket = self.ticket_for(w);
        let replica = self.start_replica(w, token, logs, ticket.as_deref());
        if let Some(h) = st.held.get_mut(slot) {
            h.replica = Some(replica);
            h.ticket = ticket;
            h.seq = w.seq;
            h.manifest = w.manifest.clone();
            h.since = now_secs();
        }
    }

    /// Once the new replica of a slot that moved is ready: the old one stops, its room and the
    /// permit are given back.
    fn finish_roll(&self, st: &mut State, slot: &str) {
        let Some(h) = st.held.get_mut(slot) else {
            return;
        };
        let ready = h.replica.as_ref().is_some_and(|r| {
            matches!(*r.state.borrow(), ReplicaState::Running { ready: true, .. })
        });
        if !ready {
            return;
        }
        tracing::info!(slot, "the new version is ready");
        let old = h.old.take();
        let permit = h.permit.take();
        h.permit_tries = 0;
        if let Some((r, t, seq)) = old {
            self.retire(r, slot, seq);
            if let Some(t) = t {
                self.node.tickets.revoke(&t);
            }
            if let Some(l) = st.ledger.as_mut() {
                l.stop(&format!("{slot}#surge"));
            }
        }
        if let Some(p) = permit.and_then(|p| st.permits.remove_entry(&p)) {
            self.release_lease(st, &p.0, p.1.token);
        }
    }

    fn release_lease(&self, st: &State, slot: &str, token: u64) {
        let Some(cfg) = self.cfg_for(st, slot) else {
            return;
        };
        for a in &cfg.set {
            self.send_lease(
                a,
                Some(&cfg),
                0,
                Request::Release {
                    slot: slot.to_owned(),
                    holder: self.me().to_owned(),
                    token,
                },
            );
        }
    }

    /// Stops the replica of `slot` held here (and gives its lease back when `release`).
    fn stop(&self, st: &mut State, slot: &str, release: bool, why: &str) {
        let Some(mut h) = st.held.remove(slot) else {
            return;
        };
        tracing::info!(slot, "stopping the replica: {why}");
        if let Some(r) = h.replica.take() {
            self.retire(r, slot, h.seq);
        }
        if let Some(t) = h.ticket.take() {
            self.node.tickets.revoke(&t);
        }
        if let Some((r, t, seq)) = h.old.take() {
            self.retire(r, slot, seq);
            if let Some(t) = t {
                self.node.tickets.revoke(&t);
            }
            if let Some(l) = st.ledger.as_mut() {
                l.stop(&format!("{slot}#surge"));
            }
        }
        if let Some(p) = h.permit.take().and_then(|p| st.permits.remove_entry(&p)) {
            self.release_lease(st, &p.0, p.1.token);
        }
        if let Some(l) = st.ledger.as_mut() {
            l.stop(slot);
        }
        if release {
            self.release_lease(st, slot, h.token);
        }
    }

    /// A ticket for replica `w`'s own session (see `super::tickets`), while the realm's
    /// registration is known here.
    fn ticket_for(&self, w: &Wanted) -> Option<String> {
        let auth = self.node.auth();
        let reg = auth.registration_of(&w.realm)?;
        let authority = *auth.authorities.get(reg)?;
        Some(self.node.tickets.issue(super::tickets::Ticket {
            realm: w.realm.clone(),
            name: w.name.clone(),
            replica: w.index,
            role: w.manifest.workload().role.clone(),
            authority,
        }))
    }

    /// Starts replica `w` under `token` (its output into `logs`; `ticket`: its identity).
    fn start_replica(
        &self,
        w: &Wanted,
        token: u64,
        logs: Arc<LogBuffer>,
        ticket: Option<&str>,
    ) -> Supervised {
        let wl = w.manifest.workload();
        let slot = wire::slot(&w.realm, &w.name, w.index);
        let workdir = self.workdir(&slot, w.seq);
        let log_file = self
            .dir
            .join("logs")
            .join(&w.realm)
            .join(&w.name)
            .join(format!("{}.log", w.index));
        if let Some(d) = log_file.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let argv: Vec<String> = match &wl.artifact {
            Artifact::Command(cmd) => cmd.iter().chain(wl.args.iter()).cloned().collect(),
            Artifact::Image { command, .. } => command
                .iter()
                .flatten()
                .chain(wl.args.iter())
                .cloned()
                .collect(),
        };
        let mut env = wl.env.clone();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_owned(), v);
        };
        set("MACULA_URL", self.url.clone());
        set("MACULA_REALM", w.realm.clone());
        set("MACULA_PAYLOAD", w.name.clone());
        set("MACULA_REPLICA", w.index.to_string());
        set("MACULA_NODE", self.me().to_owned());
        set("MACULA_FENCING_TOKEN", token.to_string());
        if let Some(t) = ticket {
            set("MACULA_KEY", t.to_owned());
        }
        let mut ports = BTreeMap::new();
        for (i, p) in wl.ports.iter().enumerate() {
            let port = p.port.or_else(free_port).unwrap_or(0);
            ports.insert(p.name.clone(), port);
            set(
                &format!("PORT_{}", p.name.to_uppercase().replace('-', "_")),
                port.to_string(),
            );
            if i == 0 {
                set("PORT", port.to_string());
            }
        }
        let cgroup = self.cgroup_name(&slot, w.seq);
        let limits = wl.resources;
        let log_limits = LogLimits {
            file: Some(log_file),
            ..LogLimits::default()
        };
        let backoff_limit = match &*w.manifest {
            Manifest::Job(j) => Some(j.backoff_limit),
            Manifest::Payload(_) => None,
        };
        let mut target = Target {
            ports,
            shim: self.shim.0.clone(),
            shim_args: self.shim.1.clone(),
            spec: None,
            container: None,
        };
        let start: Launch = match (&wl.runtime, &wl.artifact) {
            (Runtime::Podman, Artifact::Image { image, .. }) => {
                // The image's own PATH and HOME stay; the replica's scratch space is the
                // container's own file system.
                let host = self.podman.get().cloned();
                let realm = w.realm.clone();
                let spec = ContainerSpec {
                    name: format!("macula-{cgroup}"),
                    image: image.clone(),
                    command: argv,
                    env,
                    labels: BTreeMap::from([("io.macula.slot".to_owned(), slot.clone())]),
                    limits,
                    host_network: wl.network == Network::Host,
                    network_none: wl.network == Network::None,
                    ..ContainerSpec::default()
                };
                target.container = host.clone().map(|h| (h, spec.name.clone()));
                // A Hub package's image: its archives, installed and verified like a native
                // package's files, are what the container may run.
                let package = wl.package.clone().map(|p| {
                    (
                        p,
                        self.packages.clone(),
                        self.package_counter(w),
                        Arc::new(std::sync::atomic::AtomicBool::new(false)),
                    )
                });
                Box::new(move |buffer: Arc<LogBuffer>| match &host {
                    Some(host) => {
                        let start = ContainerStart {
                            host: host.clone(),
                            realm: realm.clone(),
                            spec: spec.clone(),
                            logs: log_limits.clone(),
                            buffer,
                            package: None,
                        };
                        let Some((pkg, packages, counter, started)) = package.clone() else {
                            return start.launch();
                        };
                        Box::pin(async move {
                            let first = !started.load(std::sync::atomic::Ordering::Acquire);
                            let dir = prepare_package(
                                &packages,
                                &pkg,
                                &start.realm,
                                counter.as_ref(),
                                first,
                            )
                            .await?;
                            let launched = ContainerStart {
                                package: Some(dir),
                                ..start
                            }
                            .launch()
                            .await;
                            if launched.is_ok() {
                                started.store(true, std::sync::atomic::Ordering::Release);
                            }
                            launched
                        })
                    }
                    None => Box::pin(async {
                        Err(io::Error::new(
                                io::ErrorKind::Unsupported,
                                "this node does not run containers (the podman runtime): install podman and runc, or set workloads.podman",
                            ))
                    }),
                })
            }
            _ => {
                let mut env = env;
                env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
                env.insert("HOME".into(), workdir.display().to_string());
                let mut read_only = default_read_only();
                // The program itself, when it is named by path outside the system's
                // directories (a file, never a directory, and never inside this node's
                // own directory).
                if let Some(p) = argv.first().map(Path::new).filter(|p| p.is_absolute()) {
                    let inside_node = self
                        .node
                        .confdir
                        .as_ref()
                        .is_some_and(|d| p.starts_with(&d.root));
                    if p.is_file() && !inside_node {
                        read_only.push(p.to_owned());
                    }
                }
                let spec = ExecSpec {
                    argv,
                    env,
                    workdir,
                    cgroup_procs: vec![],
                    read_only,
                    read_write: vec![],
                    require_sandbox: self.node.config.workloads.require_sandbox,
                    network_none: wl.network == Network::None,
                    // The node's Podman (a root service) is out of a native replica's reach.
                    hidden: self
                        .podman
                        .get()
                        .map(|host| host.private_paths())
                        .unwrap_or_default(),
                };
                target.spec = Some(spec.clone());
                let (shim, shim_args) = self.shim.clone();
                let require_limits = self.node.config.workloads.require_limits;
                // The package's delivery is metered for the realm, under the deploying key.
                let package = wl.package.clone().map(|p| {
                    (
                        p,
                        self.packages.clone(),
                        self.package_counter(w),
                        w.realm.clone(),
                        Arc::new(std::sync::atomic::AtomicBool::new(false)),
                    )
                });
                Box::new(move |buffer: Arc<LogBuffer>| {
                    let mut start = Start {
                        shim: shim.clone(),
                        shim_args: shim_args.clone(),
                        name: cgroup.clone(),
                        limits,
                        require_limits,
                        spec: spec.clone(),
                        logs: log_limits.clone(),
                        buffer: Some(buffer),
                    };
                    let Some((pkg, packages, counter, realm, started)) = package.clone() else {
                        return start.launch();
                    };
                    // The package's files first (verified against the Hub, pinned by digest);
                    // its `./` program runs from them, read-only.
                    Box::pin(async move {
                        let first = !started.load(std::sync::atomic::Ordering::Acquire);
                        let dir = prepare_package(&packages, &pkg, &realm, counter.as_ref(), first)
                            .await?;
                        super::packages::in_package(&mut start.spec.argv, &dir);
                        start.spec.read_only.push(dir.clone());
                        start
                            .spec
                            .env
                            .insert("MACULA_PACKAGE_DIR".into(), dir.display().to_string());
                        let launched = start.launch().await;
                        if launched.is_ok() {
                            started.store(true, std::sync::atomic::Ordering::Release);
                        }
                        launched
                    })
                })
            }
        };
        let health = Health {
            liveness: wl.liveness.clone(),
            readiness: wl.readiness.clone(),
            target,
        };
        let mut restart = wl.restart.clone();
        if wl.runtime == Runtime::Podman {
            // A container's start costs the node's Podman about 0.1 s of its own CPU: a crash
            // loop waits at least a second between tries, whatever the manifest says.
            restart.backoff_initial = restart.backoff_initial.max(CONTAINER_MIN_BACKOFF);
            restart.backoff_max = restart.backoff_max.max(restart.backoff_initial);
        }
        supervise(restart, backoff_limit, logs, health, start)
    }

    /// The replicas of `realm` this node runs, and the slots it could not place.
    pub fn local_status(&self, realm: &str) -> Vec<ReplicaStatus> {
        let hub = self.packages.view();
        let st = self.state.lock();
        let mut out = vec![];
        for (slot, h) in &st.held {
            let Some((r, name, i)) = wire::parse_slot(slot) else {
                continue;
            };
            if r != realm {
                continue;
            }
            let state = h
                .replica
                .as_ref()
                .map(|s| s.state.borrow().clone())
                .unwrap_or(ReplicaState::Stopped);
            let (word, mut detail, restarts) = describe(&state);
            if h.provisional {
                detail = Some(
                    detail.map_or(String::new(), |d| format!("{d}; "))
                        + "provisional: a partition keeps this node from a majority of the slot's authorities (duplicate_tolerant)",
                );
            }
            // A replica of a package the Hub revoked (or no longer lists) is flagged.
            if let Some(flag) = h
                .manifest
                .workload()
                .package
                .as_ref()
                .and_then(|p| hub.flag(p))
            {
                detail = Some(detail.map_or(String::new(), |d| format!("{d}; ")) + &flag);
            }
            out.push(ReplicaStatus {
                realm: r.to_owned(),
                name: name.to_owned(),
                replica: i,
                node: self.me().to_owned(),
                seq: h.seq,
                state: word.into(),
                detail,
                restarts,
                ready: matches!(state, ReplicaState::Running { ready: true, .. }),
                token: h.token,
                since: h.since,
            });
            // The previous version's replica, while the new one beside it gets ready.
            if let Some((old, _, seq)) = &h.old {
                let state = old.state.borrow().clone();
                let (word, _, restarts) = describe(&state);
                out.push(ReplicaStatus {
                    realm: r.to_owned(),
                    name: name.to_owned(),
                    replica: i,
                    node: self.me().to_owned(),
                    seq: *seq,
                    state: word.into(),
                    detail: Some("the previous version, until the new one is ready".into()),
                    restarts,
                    ready: matches!(state, ReplicaState::Running { ready: true, .. }),
                    token: h.token,
                    since: h.since,
                });
            }
        }
        for ((r, name), jd) in &st.jobs {
            if r != realm {
                continue;
            }
            for (i, (c, since)) in &jd.slots {
                out.push(ReplicaStatus {
                    realm: r.clone(),
                    name: name.clone(),
                    replica: *i,
                    node: c.holder.clone(),
                    seq: c.seq,
                    state: if c.ok { "succeeded" } else { "failed" }.into(),
                    detail: None,
                    restarts: 0,
                    ready: false,
                    token: c.token,
                    since: *since,
                });
            }
        }
        for (slot, (why, since)) in &st.pending {
            let Some((r, name, i)) = wire::parse_slot(slot) else {
                continue;
            };
            if r != realm || st.held.contains_key(slot) {
                continue;
            }
            let seq = st
                .manifests
                .get(&(r.to_owned(), name.to_owned()))
                .map_or(0, |m| m.0);
            out.push(ReplicaStatus {
                realm: r.to_owned(),
                name: name.to_owned(),
                replica: i,
                node: String::new(),
                seq,
                state: "pending".into(),
                detail: Some(why.clone()),
                restarts: 0,
                ready: false,
                token: 0,
                since: *since,
            });
        }
        out
    }

    /// Output of this node's replicas of `realm`/`name` after the positions in `after`.
    pub fn local_logs(
        &self,
        realm: &str,
        name: &str,
        replica: Option<u32>,
        after: &BTreeMap<String, u64>,
    ) -> Vec<LogEntry> {
        let st = self.state.lock();
        let mut out = vec![];
        for (slot, h) in &st.held {
            let Some((r, n, i)) = wire::parse_slot(slot) else {
                continue;
            };
            if r != realm || n != name || replica.is_some_and(|x| x != i) {
                continue;
            }
            let from = after.get(slot).map_or(0, |s| s + 1);
            for l in h.logs.since(from) {
                if out.len() >= wire::MAX_LOG_LINES {
                    break;
                }
                out.push(LogEntry {
                    slot: slot.clone(),
                    seq: l.seq,
                    stderr: l.stream == Stream::Stderr,
                    text: l.text,
                });
            }
        }
        out
    }

    /// Asks every node of `realm` (this one too) and waits up to `wait` for their answers.
    async fn gather(&self, realm: &str, ask: impl Fn(u64) -> Work, wait: Duration) -> Vec<Work> {
        let peers: Vec<String> = self
            .live(realm)
            .into_iter()
            .filter(|p| *p != self.me())
            .collect();
        let id = self.next_id();
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waits.lock().insert(id, tx);
        for p in &peers {
            self.send(p, ask(id));
        }
        let mut out = vec![];
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < peers.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(w)) => out.push(w),
                _ => break,
            }
        }
        self.waits.lock().remove(&id);
        out
    }

    /// The replicas of `realm` on every node that answers within a second and a half: each
    /// running replica once, and the slots no node could take.
    pub async fn gather_status(&self, realm: &str) -> Vec<ReplicaStatus> {
        let mut all = self.local_status(realm);
        let answers = self
            .gather(
                realm,
                |id| Work::StatusAsk {
                    id,
                    realm: realm.to_owned(),
                },
                Duration::from_millis(1_500),
            )
            .await;
        for a in answers {
            if let Work::Status { replicas, .. } = a {
                all.extend(replicas.into_iter().filter(|r| r.realm == realm));
            }
        }
        // A slot that runs somewhere is not pending (a tenderer's view may be a moment old).
        let running: HashSet<(String, u32)> = all
            .iter()
            .filter(|r| r.state != "pending")
            .map(|r| (r.name.clone(), r.replica))
            .collect();
        all.retain(|r| r.state != "pending" || !running.contains(&(r.name.clone(), r.replica)));
        all.sort_by(|a, b| (&a.name, a.replica, &a.node).cmp(&(&b.name, b.replica, &b.node)));
        // The same slot as several nodes know it (pending, or a job's run that counts) once.
        let key = |r: &ReplicaStatus| {
            (
                r.name.clone(),
                r.replica,
                r.state.clone(),
                r.node.clone(),
                r.token,
                r.seq,
            )
        };
        all.sort_by_key(key);
        all.dedup_by(|a, b| key(a) == key(b));
        all
    }

    /// Output of `realm`/`name` from every node that runs a replica of it, after `after`.
    pub async fn gather_logs(
        &self,
        realm: &str,
        name: &str,
        replica: Option<u32>,
        after: &BTreeMap<String, u64>,
    ) -> Vec<LogEntry> {
        let mut all = self.local_logs(realm, name, replica, after);
        let answers = self
            .gather(
                realm,
                |id| Work::LogsAsk {
                    id,
                    realm: realm.to_owned(),
                    name: name.to_owned(),
                    replica,
                    after: after.clone(),
                },
                Duration::from_millis(1_000),
            )
            .await;
        for a in answers {
            if let Work::Logs { lines, .. } = a {
                all.extend(lines.into_iter().filter(|l| {
                    wire::parse_slot(&l.slot).is_some_and(|(r, n, _)| r == realm && n == name)
                }));
            }
        }
        all
    }
}

/// A replica's state in a word, why, and its restarts.
fn describe(s: &ReplicaState) -> (&'static str, Option<String>, u32) {
    match s {
        ReplicaState::Starting { restarts } => ("starting", None, *restarts),
        ReplicaState::Running {
            restarts,
            ready: true,
        } => ("running", None, *restarts),
        ReplicaState::Running {
            restarts,
            ready: false,
        } => (
            "running",
            Some("not ready: its readiness check does not pass yet".into()),
            *restarts,
        ),
        ReplicaState::BackOff {
            restarts,
            delay,
            last_exit,
        } => (
            "backoff",
            Some(format!(
                "{last_exit}; restarting in {:.1}s",
                delay.as_secs_f64()
            )),
            *restarts,
        ),
        ReplicaState::Succeeded => ("succeeded", None, 0),
        ReplicaState::Failed {
            restarts,
            last_exit,
        } => ("failed", Some(last_exit.clone()), *restarts),
        ReplicaState::Stopped => ("stopped", None, 0),
    }
}

/// The `podman` program this node runs containers with: `workloads.podman` names it, or
/// `auto` (the default) finds it on `PATH` (with `runc` beside it); `off` runs none.
/// Whether `realm`'s nodes (`nodes`, as seen now) have looked the same here for `SETTLED`
/// (a node that just joined or left may not be seen alike everywhere yet), and no node the
/// peers see is missing here (it is being linked).
fn settled(st: &mut State, realm: &str, nodes: &[String], at: Instant) -> bool {
    let same = match st.membership.get_mut(realm) {
        Some((seen, since)) if *seen == nodes => at.duration_since(*since) >= SETTLED,
        Some(entry) => {
            *entry = (nodes.to_vec(), at);
            false
        }
        None => {
            st.membership.insert(realm.to_owned(), (nodes.to_vec(), at));
            false
        }
    };
    let linking = st.unlinked.iter().any(|(n, (named, first))| {
        !nodes.contains(n)
            && at.duration_since(*named) < LINK_GRACE
            && at.duration_since(*first) < LINK_GRACE
    });
    same && !linking
}

fn podman_program(setting: &str) -> Option<PathBuf> {
    use macula_workloads::runtime::on_path;
    match setting {
        "off" | "" => None,
        "auto" => on_path("runc").and(on_path("podman")),
        path => Some(PathBuf::from(path)),
    }
}

/// What this node offers (`workloads.*`; zeros mean the machine's own).
fn offered(cfg: &crate::config::WorkloadsSection) -> Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let memory = if cfg.memory_bytes > 0 {
        cfg.memory_bytes
    } else {
        machine_memory().map_or(1 << 30, |m| m / 4 * 3)
    };
    Capacity {
        cpu_millis: if !cfg.enabled {
            0
        } else if cfg.cpu_millis > 0 {
            cfg.cpu_millis
        } else {
            cpus * 1_000
        },
        memory_bytes: if cfg.enabled { memory } else { 0 },
        pids: if cfg.enabled { cfg.pids } else { 0 },
        labels: cfg.labels.clone(),
        region: cfg.region.clone(),
        millicents_per_hour: cfg.millicents_per_hour,
    }
}

fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A port free on loopback now (the replica binds it soon after; a collision makes it fail and
/// restart with another).
fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()
}

impl crate::node::Fencing for Controller {
    fn check(
        &self,
        slot: String,
        token: u64,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<crate::node::Fence, String>> + Send + '_>,
    > {
        Box::pin(async move { self.fence(&slot, token).await })
    }

    fn held(&self, slot: &str) -> Option<u64> {
        self.state.lock().held.get(slot).map(|h| h.token)
    }
}

/// The least back-off before a container replica starts again.
const CONTAINER_MIN_BACKOFF: Duration = Duration::from_secs(1);

/// The name of a node's replica of `slot` at version `seq` on its machine (control groups,
/// container): the node's short id, the slot's parts and the version joined by `_`, which
/// neither realm nor workload names may hold, so that two realms' slots never share a name
/// (`com.acme` + `web-api` and `com.acme-web` + `api` would, joined by `-`).
fn unit_name(node: &str, slot: &str, seq: u64) -> String {
    let short = &node[node.len().saturating_sub(8)..];
    format!("{short}_{}_v{seq}", slot.replace('/', "_"))
}

/// A replica's Hub package made ready before each start: the pin (name and digest as the Hub
/// lists them) and the realm's policy on packages (publishers, tier, revocation) checked, then
/// the package installed (verified, once per digest) and its delivery metered for the realm.
/// `first`: no start of this replica has succeeded yet. Returns the installed directory.
async fn prepare_package(
    packages: &super::packages::Packages,
    pkg: &macula_workloads::PackageRef,
    realm: &str,
    counter: Option<&crate::meter::Counter>,
    first: bool,
) -> io::Result<PathBuf> {
    packages
        .check_pin(pkg, first)
        .await
        .map_err(|e| io::Error::other(format!("package {}: {e}", pkg.name)))?;
    if let Some(why) = packages.policy_refusal(realm, pkg, true).await {
        return Err(io::Error::other(why));
    }
    let dir = packages
        .install(pkg)
        .await
        .map_err(|e| io::Error::other(format!("package {}: {e}", pkg.name)))?;
    if let Some(c) = counter {
        c.package_bytes(packages.delivery_to_charge(realm, pkg, &dir));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::unit_name;

    #[test]
    fn two_realms_slots_never_share_a_name() {
        let a = unit_name("12D3KooWabcdefgh", "com.acme/web-api/0", 3);
        let b = unit_name("12D3KooWabcdefgh", "com.acme-web/api/0", 3);
        assert_ne!(a, b);
        assert_eq!(a, "abcdefgh_com.acme_web-api_0_v3");
    }
}
