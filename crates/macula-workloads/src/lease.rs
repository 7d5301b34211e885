//! Leases with fencing tokens, as a state machine without I/O: the nodes carry its messages
//! over the mesh and persist what an authority promised; this module decides.
//!
//! **Who grants.** Each replica slot (payload `i`, job completion `i`) has a small set of
//! *authorities*: the top `k` (3) of the realm's nodes by rendezvous hash of (slot, node)
//! ([`authorities`]). Every node computes the same set from the same membership, and a node
//! joining or leaving moves only the slots it ranks high for.
//!
//! **How a lease is held.** A node that wants a slot proposes a token one above the highest it
//! knows and asks every authority ([`Acquisition`]). An authority grants if no other holder's
//! grant is still running and the token is above every token it has promised
//! ([`Authority::handle`]); granting, it promises the token (the node persists the promise
//! before the answer leaves). The slot is held when a majority granted the same token. The
//! holder counts its lease from when it *sent* the request, so its own view ends before any
//! authority's (which counts from when it received it), with `margin` to spare for clock rate
//! differences. It renews at a third of the term.
//!
//! **Why at most one holder at a time.** Two majorities of one authority set share an
//! authority; that authority grants a second holder only once the first holder's grant has
//! expired at the authority, which is after the first holder stopped counting on it. **Why
//! tokens only grow.** A later majority shares an authority with every earlier one, and that
//! authority refuses any token not above what it promised, so a later lease's token is above
//! every earlier lease's. Both rest on the authority keeping its promises: a node persists
//! them before it answers ([`Authority::handle`] returns what to persist). An authority that
//! lost them anyway (its disk was wiped) abstains for one lease term, so every grant it made
//! has expired; tokens it promised stay known to the other members of the majorities that got
//! them, as long as no more than a minority of the set lost its state at once.
//!
//! **Provisional leases.** A `duplicate_tolerant` payload cut off from a majority may run under
//! one authority's word ([`Request::Provisional`]): an authority gives at most one provisional
//! lease per slot at a time, none while another holder has its regular grant, and no regular
//! grant while another holder has its provisional lease. A node asks only when
//! it could reach no majority. In a split in two, at most one side holds a majority of the
//! three authorities (so at most one regular holder); the other side reaches at most one
//! authority, which backs at most one provisional holder: at most one extra replica per slot,
//! gone within a term after the split heals (its holder then reaches a majority, is told the
//! slot is held, and stops asking). Other payloads
//! never ask, so they never run twice.
//!
//! The replica is given its token (`MACULA_FENCING_TOKEN`); whatever the replica writes can be
//! refused when it carries a token below the newest one seen.
//!
//! **Job completions count once.** Which run of a job's completion slot counts is a value the
//! slot's authorities choose, as in single-decree Paxos with the lease's token as the ballot. A
//! holder whose run ended asks its authorities to *accept* that run ([`Request::Complete`]);
//! an authority accepts only under the holder's grant that runs there now (so under the
//! highest token it promised), and keeps the run with the token it accepted it under. The run
//! counts once a majority accepted it. Every grant tells what its authority accepted
//! ([`Reply::Granted`]); a holder whose majority of grants names an accepted run does not run
//! the slot again but has that run accepted (the one accepted under the highest token).
//! Why one run counts: once a majority accepted run `r` under token `t`, every later majority
//! of grants (a token above `t`) shares an authority with it, which names `r` (or, by the same
//! argument, a run accepted later, which is `r` again): every later holder proposes `r`. Why it
//! ends: a holder that learned of a run keeps it whatever happens to its own lease, and the
//! next holder learns it from the grants; no authority ever refuses a grant for it, so no mix
//! of partial acceptances can stall the slot.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

mod config;
pub use config::{Ballot, Cfg, Handover, MoveState, Moved, Moving};

/// A node, by its mesh peer id.
pub type NodeId = String;

/// How many authorities a slot has (a majority is 2).
pub const AUTHORITIES: usize = 3;

/// The slot's authorities: the top `k` of `nodes` by rendezvous hash of (`slot`, node), best
/// first. Every node that knows the same `nodes` computes the same list.
pub fn authorities<'a>(slot: &str, nodes: &'a [NodeId], k: usize) -> Vec<&'a NodeId> {
    crate::placement::top_by_hash(&[slot.as_bytes()], nodes, k)
}

/// `macula.fence.check`'s verdict on `token` for a slot, from the highest tokens its
/// authorities promised (`answers`, one per authority that answered out of `asked`): `None`
/// until a majority answered; then whether `token` is current (it is the highest token that
/// majority promised) and the highest promised. Every lease granted after the one of
/// `token` was granted by a majority, which shares an authority with the answering one, so a
/// token superseded by a later lease is never judged current. (The reverse can err safely: a
/// failed attempt that one authority granted makes a current token look stale.)
pub fn fence_verdict(token: u64, answers: &[u64], asked: usize) -> Option<(bool, u64)> {
    if asked == 0 || answers.len() * 2 <= asked {
        return None;
    }
    let highest = answers.iter().copied().max().unwrap_or(0);
    // Above what they promised: never granted (a made-up token).
    Some((token > 0 && token == highest, highest))
}

/// What a node asks an authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Grant `slot` to `holder` under `token` (or extend the grant it already has under it).
    Acquire {
        slot: String,
        holder: NodeId,
        token: u64,
        /// The deploy record's sequence the holder runs (a newer record reopens a job's
        /// completed slot).
        #[serde(default)]
        seq: u64,
    },
    /// The holder gives the slot up (its replica stopped).
    Release {
        slot: String,
        holder: NodeId,
        token: u64,
    },
    /// For a `duplicate_tolerant` payload on the minority side of a partition: run without a
    /// majority, under this one authority's word (see [`Authority::handle`]).
    Provisional { slot: String, holder: NodeId },
    /// Accept `run` as the run of a job's completion slot that counts, under the grant the
    /// asking holder has with `token` (its own run that ended, or one a grant named).
    Complete {
        slot: String,
        holder: NodeId,
        token: u64,
        run: Completion,
    },
    /// The highest token this authority promised for `slot` (for `macula.fence.check`: a
    /// token below what a majority answers is stale). `holder` is the node that asks.
    Fence { slot: String, holder: NodeId },
    /// Moving `slot` off configuration `cfg` (see [`config`]): promise ballot `ballot` and stop
    /// granting under `cfg`. `state` is the mover's own, for a member that had not taken `cfg`
    /// on. `holder` is the mover.
    Prepare {
        slot: String,
        holder: NodeId,
        cfg: Cfg,
        ballot: Ballot,
        state: Handover,
    },
    /// Accept `next` as the successor of `cfg` under `ballot`.
    Propose {
        slot: String,
        holder: NodeId,
        cfg: Cfg,
        ballot: Ballot,
        next: Cfg,
    },
    /// Serve `slot` under `cfg` from now on, starting from `handover`.
    Install {
        slot: String,
        holder: NodeId,
        cfg: Cfg,
        handover: Handover,
    },
    /// `from`'s successor is `to` (for a member of `from` that is not in `to`, to say so).
    Moved {
        slot: String,
        holder: NodeId,
        from: Cfg,
        to: Cfg,
    },
}

/// The longest node id (a mesh peer id is about 52 bytes) a request may name.
pub const MAX_NODE_ID: usize = 128;

/// A request as sent: under the configuration the asking node believes the slot has. An
/// authority serves a lease request only under the configuration it serves the slot under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfg: Option<Cfg>,
    /// The asking node's id for the exchange, given back with the answer: an answer to an
    /// earlier attempt must not count for a later one (a grant counted from the later one's
    /// start would outlast the authority's).
    #[serde(default)]
    pub id: u64,
    pub req: Request,
}

impl Ask {
    /// Whether what it names is of sane size: configurations of 1 to [`AUTHORITIES`] nodes,
    /// node ids of at most [`MAX_NODE_ID`] bytes (what an authority keeps of a peer's request
    /// is bounded).
    pub fn sane(&self) -> bool {
        let id = |n: &str| !n.is_empty() && n.len() <= MAX_NODE_ID;
        let cfg = |c: &Cfg| (1..=AUTHORITIES).contains(&c.set.len()) && c.set.iter().all(|n| id(n));
        let handover = |h: &Handover| {
            h.grant.as_ref().is_none_or(|g| g.0.len() <= MAX_NODE_ID)
                && h.done.as_ref().is_none_or(|d| id(&d.0.holder))
        };
        let req = match &self.req {
            Request::Complete { run, .. } => id(&run.holder),
            Request::Prepare { cfg: c, state, .. } => cfg(c) && handover(state),
            Request::Propose { cfg: c, next, .. } => cfg(c) && cfg(next),
            Request::Install {
                cfg: c,
                handover: h,
                ..
            } => cfg(c) && handover(h),
            Request::Moved { from, to, .. } => cfg(from) && cfg(to),
            _ => true,
        };
        req && id(self.req.slot_holder().1) && self.cfg.as_ref().is_none_or(cfg)
    }
}

/// An authority's answer as sent: the [`Ask`]'s id and the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    #[serde(default)]
    pub id: u64,
    pub reply: Reply,
}

impl Request {
    /// The slot asked about and the node that asks.
    pub fn slot_holder(&self) -> (&str, &str) {
        match self {
            Request::Acquire { slot, holder, .. }
            | Request::Release { slot, holder, .. }
            | Request::Provisional { slot, holder }
            | Request::Complete { slot, holder, .. }
            | Request::Fence { slot, holder }
            | Request::Prepare { slot, holder, .. }
            | Request::Propose { slot, holder, .. }
            | Request::Install { slot, holder, .. }
            | Request::Moved { slot, holder, .. } => (slot, holder),
        }
    }

    /// Whether it is a request of a configuration's move, which carries its configurations.
    pub fn is_move(&self) -> bool {
        matches!(
            self,
            Request::Prepare { .. }
                | Request::Propose { .. }
                | Request::Install { .. }
                | Request::Moved { .. }
        )
    }
}

/// An authority's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Granted {
        slot: String,
        token: u64,
        /// The run of a job's completion this authority accepted, and under which token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        accepted: Option<(Completion, u64)>,
    },
    Refused {
        slot: String,
        why: Refusal,
    },
    Released {
        slot: String,
    },
    /// A provisional lease from this authority, for one term.
    GrantedProvisional {
        slot: String,
    },
    /// The run is accepted (or was already).
    Completed {
        slot: String,
    },
    /// The run is not accepted (the asker's grant is not running here).
    NotCompleted {
        slot: String,
        why: Refusal,
    },
    /// The highest token promised for the slot here (0: none; None: this authority lost its
    /// promises and abstains for a term).
    Fence {
        slot: String,
        promised: Option<u64>,
    },
    /// A promise to a move's ballot, with what this member holds and the successor it
    /// accepted before, if any.
    Promised {
        slot: String,
        ballot: Ballot,
        accepted: Option<(Ballot, Cfg)>,
        handover: Handover,
    },
    /// A move's proposal accepted.
    Accepted {
        slot: String,
        ballot: Ballot,
    },
    /// `cfg` is taken on (or the successor noted).
    Installed {
        slot: String,
        cfg: Cfg,
    },
}

impl Reply {
    pub fn slot(&self) -> &str {
        match self {
            Reply::Granted { slot, .. }
            | Reply::Refused { slot, .. }
            | Reply::Released { slot }
            | Reply::GrantedProvisional { slot }
            | Reply::Completed { slot }
            | Reply::NotCompleted { slot, .. }
            | Reply::Fence { slot, .. }
            | Reply::Promised { slot, .. }
            | Reply::Accepted { slot, .. }
            | Reply::Installed { slot, .. } => slot,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Another holder's grant runs until then (authority's clock, ms).
    Held {
        holder: NodeId,
        token: u64,
        until_ms: u64,
    },
    /// The token is not above what this authority promised; propose above `promised`.
    Stale { promised: u64 },
    /// This authority lost its promises and waits out one lease term.
    Abstaining { until_ms: u64 },
    /// This authority keeps as many slots as it may (its bound on memory).
    Full,
    /// The slot is a job's completion that is done for a newer record of the job.
    Done(Completion),
    /// The grant named is not running here (it ended, or was another holder's).
    NotHeld,
    /// This authority does not serve the slot under the configuration asked: it serves it
    /// under this one, or knows it moved there (None: it knows of none, or a move is under way).
    Config(Option<Cfg>),
    /// A move under a higher ballot is under way.
    Outbid { ballot: Ballot },
}

/// A job's completion slot that is done: the record's sequence, the run that counts (its
/// holder and token) and whether it succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub seq: u64,
    pub holder: NodeId,
    pub token: u64,
    pub ok: bool,
}

/// One slot as an authority keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotPromise {
    /// The highest token promised (persisted before any answer that depends on it).
    pub promised: u64,
    /// The running grant, if any: holder, token, and when it ends on this authority's clock.
    pub grant: Option<(NodeId, u64, u64)>,
    /// A job's run accepted as the one that counts, and the token it was accepted under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<(Completion, u64)>,
    /// The configuration this authority serves the slot under (see [`config`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfg: Option<Cfg>,
    /// A move of a configuration under way (this authority no longer grants under it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<MoveState>,
}

/// An authority for any number of slots.
#[derive(Debug, Clone)]
pub struct Authority {
    term_ms: u64,
    abstain_until: u64,
    slots: HashMap<String, SlotPromise>,
    /// Provisional leases: at most one holder per slot, and only while no other holder has
    /// this authority's regular grant (not persisted: one term of abstention covers a restart).
    provisional: HashMap<String, (NodeId, u64)>,
}

impl Authority {
    /// An authority whose promises were restored (`Some`, possibly empty for a node that never
    /// was one) or lost (`None`: it abstains for one lease term from `now_ms`).
    pub fn new(term_ms: u64, restored: Option<BTreeMap<String, SlotPromise>>, now_ms: u64) -> Self {
        Authority {
            term_ms,
            abstain_until: if restored.is_some() {
                0
            } else {
                now_ms + term_ms
            },
            slots: restored.unwrap_or_default().into_iter().collect(),
            provisional: HashMap::new(),
        }
    }

    /// Answers one request at `now_ms`, asked under the configuration `ask.cfg`; returns the
    /// answer and, when a promise changed, the slot's new state (to persist before the answer
    /// is sent).
    pub fn ask(&mut self, ask: &Ask, now_ms: u64) -> (Reply, Option<SlotPromise>) {
        let req = &ask.req;
        let slot = req.slot_holder().0;
        if req.is_move() {
            let (reply, changed) = self.handle_move(req, now_ms);
            let st = changed.then(|| self.slots.get(slot).cloned()).flatten();
            return (reply, st);
        }
        if !matches!(req, Request::Release { .. }) {
            if let Some(why) = config::mismatch(self.slots.get(slot), ask.cfg.as_ref()) {
                let reply = match req {
                    Request::Complete { .. } => Reply::NotCompleted {
                        slot: slot.to_owned(),
                        why,
                    },
                    _ => Reply::Refused {
                        slot: slot.to_owned(),
                        why,
                    },
                };
                return (reply, None);
            }
        }
        self.serve(req, now_ms)
    }

    /// [`Authority::ask`] under no configuration (for slots kept without one).
    pub fn handle(&mut self, req: &Request, now_ms: u64) -> (Reply, Option<SlotPromise>) {
        self.ask(
            &Ask {
                cfg: None,
                id: 0,
                req: req.clone(),
            },
            now_ms,
        )
    }

    /// A lease request, once its configuration is the one served.
    fn serve(&mut self, req: &Request, now_ms: u64) -> (Reply, Option<SlotPromise>) {
        match req {
            Request::Prepare { slot, .. }
            | Request::Propose { slot, .. }
            | Request::Install { slot, .. }
            | Request::Moved { slot, .. } => (
                Reply::Refused {
                    slot: slot.clone(),
                    why: Refusal::NotHeld,
                },
                None,
            ),
            Request::Acquire {
                slot,
                holder,
                token,
                seq,
            } => {
                if now_ms < self.abstain_until {
                    return (
                        Reply::Refused {
                            slot: slot.clone(),
                            why: Refusal::Abstaining {
                                until_ms: self.abstain_until,
                            },
                        },
                        None,
                    );
                }
                // Another holder's provisional lease here counts as a grant until it ends: its
                // holder counts on it and cannot be told otherwise.
                if let Some((h, until)) = self.provisional.get(slot) {
                    if *until > now_ms && h != holder {
                        return (
                            Reply::Refused {
                                slot: slot.clone(),
                                why: Refusal::Held {
                                    holder: h.clone(),
                                    token: 0,
                                    until_ms: *until,
                                },
                            },
                            None,
                        );
                    }
                }
                let st = self.slots.entry(slot.clone()).or_default();
                // A run accepted for an older record of the job is forgotten by a newer one.
                match &st.done {
                    Some((d, _)) if d.seq > *seq => {
                        return (
                            Reply::Refused {
                                slot: slot.clone(),
                                why: Refusal::Done(d.clone()),
                            },
                            None,
                        )
                    }
                    Some((d, _)) if d.seq < *seq => st.done = None,
                    _ => {}
                }
                if let Some((h, t, until)) = &st.grant {
                    if *until > now_ms && h != holder {
                        return (
                            Reply::Refused {
                                slot: slot.clone(),
                                why: Refusal::Held {
                                    holder: h.clone(),
                                    token: *t,
                                    until_ms: *until,
                                },
                            },
                            None,
                        );
                    }
                }
                // A renewal by the holder under the token it holds, or a new token above every
                // promise.
                let renewal = matches!(&st.grant, Some((h, t, _)) if h == holder && t == token);
                if !renewal && *token <= st.promised {
                    return (
                        Reply::Refused {
                            slot: slot.clone(),
                            why: Refusal::Stale {
                                promised: st.promised,
                            },
                        },
                        None,
                    );
                }
                st.promised = st.promised.max(*token);
                st.grant = Some((holder.clone(), *token, now_ms + self.term_ms));
                (
                    Reply::Granted {
                        slot: slot.clone(),
                        token: *token,
                        accepted: st.done.clone(),
                    },
                    Some(st.clone()),
                )
            }
            Request::Provisional { slot, holder } => {
                let refuse = |why| {
                    (
                        Reply::Refused {
                            slot: slot.clone(),
                            why,
                        },
                        None,
                    )
                };
                if now_ms < self.abstain_until {
                    return refuse(Refusal::Abstaining {
                        until_ms: self.abstain_until,
                    });
                }
                // Not while another holder has this authority's regular grant...
                if let Some((h, t, until)) = self.slots.get(slot).and_then(|st| st.grant.clone()) {
                    if until > now_ms && &h != holder {
                        return refuse(Refusal::Held {
                            holder: h,
                            token: t,
                            until_ms: until,
                        });
                    }
                }
                // ...nor another holder's provisional lease: one per authority.
                if let Some((h, until)) = self.provisional.get(slot) {
                    if *until > now_ms && h != holder {
                        return refuse(Refusal::Held {
                            holder: h.clone(),
                            token: 0,
                            until_ms: *until,
                        });
                    }
                }
                self.provisional
                    .insert(slot.clone(), (holder.clone(), now_ms + self.term_ms));
                (Reply::GrantedProvisional { slot: slot.clone() }, None)
            }
            Request::Complete {
                slot,
                holder,
                token,
                run,
            } => {
                let refuse = |why| {
                    (
                        Reply::NotCompleted {
                            slot: slot.clone(),
                            why,
                        },
                        None,
                    )
                };
                if now_ms < self.abstain_until {
                    return refuse(Refusal::Abstaining {
                        until_ms: self.abstain_until,
                    });
                }
                let Some(st) = self.slots.get_mut(slot) else {
                    return refuse(Refusal::NotHeld);
                };
                // Accepted only under the grant running here now: the highest token promised.
                let running = matches!(&st.grant, Some((h, t, until)) if h == holder && t == token && *until > now_ms);
                if !running {
                    return refuse(Refusal::NotHeld);
                }
                let accepted = Some((run.clone(), *token));
                if st.done == accepted {
                    return (Reply::Completed { slot: slot.clone() }, None);
                }
                st.done = accepted;
                (Reply::Completed { slot: slot.clone() }, Some(st.clone()))
            }
            Request::Release {
                slot,
                holder,
                token,
            } => {
                // Nothing is kept for a slot this authority does not know.
                let Some(st) = self.slots.get_mut(slot) else {
                    return (Reply::Released { slot: slot.clone() }, None);
                };
                let changed = matches!(&st.grant, Some((h, t, _)) if h == holder && t == token);
                if changed {
                    st.grant = None;
                }
                (
                    Reply::Released { slot: slot.clone() },
                    changed.then(|| st.clone()),
                )
            }
            Request::Fence { slot, .. } => {
                // An authority that lost its promises does not know what it promised.
                let promised = (now_ms >= self.abstain_until)
                    .then(|| self.slots.get(slot).map_or(0, |st| st.promised));
                (
                    Reply::Fence {
                        slot: slot.clone(),
                        promised,
                    },
                    None,
                )
            }
        }
    }

    /// How many slots this authority keeps.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The holder whose grant (or provisional lease) for `slot` runs at `now_ms`, if any.
    pub fn holder(&self, slot: &str, now_ms: u64) -> Option<&NodeId> {
        let regular = self.slots.get(slot).and_then(|st| st.grant.as_ref());
        if let Some((h, _, _)) = regular.filter(|g| g.2 > now_ms) {
            return Some(h);
        }
        self.provisional
            .get(slot)
            .filter(|(_, until)| *until > now_ms)
            .map(|(h, _)| h)
    }

    /// The run of job completion `slot` this authority accepted (a majority may not have).
    pub fn accepted(&self, slot: &str) -> Option<&Completion> {
        self.slots
            .get(slot)
            .and_then(|st| st.done.as_ref())
            .map(|d| &d.0)
    }

    /// Whether it keeps `slot`.
    pub fn knows(&self, slot: &str) -> bool {
        self.slots.contains_key(slot) || self.provisional.contains_key(slot)
    }

    /// What this authority keeps for `slot`.
    pub fn promises_of(&self, slot: &str) -> Option<&SlotPromise> {
        self.slots.get(slot)
    }

    /// What this authority promised, for persisting in full.
    pub fn promises(&self) -> BTreeMap<String, SlotPromise> {
        self.slots
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// `req` addressed to each of `authorities`.
fn to_each(authorities: &[NodeId], req: Request) -> Vec<(NodeId, Request)> {
    authorities
        .iter()
        .map(|a| (a.clone(), req.clone()))
        .collect()
}

/// A node's request for a provisional lease (a `duplicate_tolerant` payload that could reach no
/// majority): asked of every authority it can reach; held if, when the answers are in, at
/// least one granted and still no majority answered (a majority that answers means the
/// partition is over: the node acquires or defers as usual). The replica gets no fencing token.
#[derive(Debug, Clone)]
pub struct ProvisionalAsk {
    sent_ms: u64,
    authorities: usize,
    answered: usize,
    granted: usize,
}

impl ProvisionalAsk {
    /// Asks at `now_ms`; returns the requests (one per authority).
    pub fn start(
        slot: &str,
        holder: &str,
        authorities: &[NodeId],
        now_ms: u64,
    ) -> (ProvisionalAsk, Vec<(NodeId, Request)>) {
        let reqs = to_each(
            authorities,
            Request::Provisional {
                slot: slot.to_owned(),
                holder: holder.to_owned(),
            },
        );
        (
            ProvisionalAsk {
                sent_ms: now_ms,
                authorities: authorities.len(),
                answered: 0,
                granted: 0,
            },
            reqs,
        )
    }

    pub fn on_reply(&mut self, reply: &Reply) {
        self.answered += 1;
        if matches!(reply, Reply::GrantedProvisional { .. }) {
            self.granted += 1;
        }
    }

    /// When the answers are in: the provisional lease's end on the holder's clock, if held.
    pub fn decide(&self, term_ms: u64, margin_ms: u64) -> Option<u64> {
        let majority = self.authorities / 2 + 1;
        (self.granted > 0 && self.answered < majority)
            .then(|| (self.sent_ms + term_ms).saturating_sub(margin_ms))
    }

    pub fn started_ms(&self) -> u64 {
        self.sent_ms
    }
}

/// Where an acquisition (or renewal) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Waiting for more answers.
    Pending,
    /// A majority granted: the slot is held under `token` until `valid_until_ms` (holder's
    /// clock); renew before then. `accepted`: the run of a job's completion that the
    /// authorities named (under the highest token): have it accepted instead of running.
    Held {
        token: u64,
        valid_until_ms: u64,
        accepted: Option<Completion>,
    },
    /// No majority can grant now. `retry_above` is the highest token an authority named (propose
    /// above it); `held_by` another holder whose grant was seen running.
    Lost {
        retry_above: u64,
        held_by: Option<NodeId>,
    },
}

/// A node's attempt to acquire or renew a slot.
#[derive(Debug, Clone)]
pub struct Acquisition {
    pub slot: String,
    pub holder: NodeId,
    pub token: u64,
    authorities: Vec<NodeId>,
    sent_ms: u64,
    term_ms: u64,
    margin_ms: u64,
    granted: usize,
    refused: usize,
    highest: u64,
    held_by: Option<NodeId>,
    accepted: Option<(Completion, u64)>,
    /// The newest configuration an authority named in refusing (the slot moved).
    newer: Option<Cfg>,
}

impl Acquisition {
    /// Starts at `now_ms`: `token` is the one proposed (`known + 1` for a new lease, the held
    /// one for a renewal), `seq` the record the holder runs. Returns the requests to send, one
    /// per authority.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        slot: &str,
        holder: &str,
        token: u64,
        seq: u64,
        authorities: &[NodeId],
        now_ms: u64,
        term_ms: u64,
        margin_ms: u64,
    ) -> (Acquisition, Vec<(NodeId, Request)>) {
        let requests = to_each(
            authorities,
            Request::Acquire {
                slot: slot.to_owned(),
                holder: holder.to_owned(),
                token,
                seq,
            },
        );
        (
            Acquisition {
                slot: slot.to_owned(),
                holder: holder.to_owned(),
                token,
                authorities: authorities.to_vec(),
                sent_ms: now_ms,
                term_ms,
                margin_ms,
                granted: 0,
                refused: 0,
                highest: token,
                held_by: None,
                accepted: None,
                newer: None,
            },
            requests,
        )
    }

    /// When the requests went out (holder's clock).
    pub fn started_ms(&self) -> u64 {
        self.sent_ms
    }

    /// The authorities asked.
    pub fn authorities(&self) -> &[NodeId] {
        &self.authorities
    }

    /// The newest configuration an authority named in refusing: the slot moved there (ask its
    /// members instead).
    pub fn newer(&self) -> Option<&Cfg> {
        self.newer.as_ref()
    }

    /// Whether a majority of the authorities answered at all (granted or refused). An attempt
    /// that gives up without it could reach no majority: only then may a `duplicate_tolerant`
    /// payload ask for a provisional lease.
    pub fn majority_answered(&self) -> bool {
        self.granted + self.refused >= self.majority()
    }

    fn majority(&self) -> usize {
        self.authorities.len() / 2 + 1
    }

    /// Takes one authority's answer (each authority's first answer counts).
    pub fn on_reply(&mut self, reply: &Reply) -> Outcome {
        match reply {
            Reply::Granted {
                slot,
                token,
                accepted,
            } if *slot == self.slot && *token == self.token => {
                self.granted += 1;
                if let Some((run, at)) = accepted {
                    if self.accepted.as_ref().is_none_or(|(_, best)| at > best) {
                        self.accepted = Some((run.clone(), *at));
                    }
                }
            }
            Reply::Refused { slot, why } if *slot == self.slot => {
                self.refused += 1;
                match why {
                    Refusal::Stale { promised } => self.highest = self.highest.max(*promised),
                    Refusal::Held { holder, token, .. } => {
                        self.highest = self.highest.max(*token);
                        self.held_by = Some(holder.clone());
                    }
                    Refusal::Config(Some(c)) => {
                        if self.newer.as_ref().is_none_or(|n| c.epoch > n.epoch) {
                            self.newer = Some(c.clone());
                        }
                    }
                    Refusal::Abstaining { .. }
                    | Refusal::Full
                    | Refusal::Done(_)
                    | Refusal::NotHeld
                    | Refusal::Config(None)
                    | Refusal::Outbid { .. } => {}
                }
            }
            _ => {}
        }
        self.outcome()
    }

    /// Where it stands now (answers that never came count as refusals once
    /// [`Acquisition::expired`]).
    pub fn outcome(&self) -> Outcome {
        if self.granted >= self.majority() {
            return Outcome::Held {
                token: self.token,
                valid_until_ms: (self.sent_ms + self.term_ms).saturating_sub(self.margin_ms),
                accepted: self.accepted.as_ref().map(|a| a.0.clone()),
            };
        }
        if self.authorities.len() - self.refused < self.majority() {
            return Outcome::Lost {
                retry_above: self.highest,
                held_by: self.held_by.clone(),
            };
        }
        Outcome::Pending
    }

    /// Whether answers are too late to be of use (a grant counted from `sent_ms` would already
    /// be over): the attempt is lost.
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms + self.margin_ms >= self.sent_ms + self.term_ms
    }
}

/// A holder's request that its authorities accept a run of a job's completion slot: the run
/// counts once a majority did (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Completing {
    pub slot: String,
    pub run: Completion,
    authorities: usize,
    answered: usize,
    accepted: usize,
    sent_ms: u64,
}

/// Where a request to accept a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Pending,
    /// A majority accepted it: the run counts.
    Yes,
    /// No majority can now (the holder's grant is not running at enough authorities).
    No,
}

impl Completing {
    /// Asks at `now_ms`, under the grant `holder` has with `token`; returns the requests (one
    /// per authority).
    pub fn start(
        slot: &str,
        holder: &str,
        token: u64,
        run: Completion,
        authorities: &[NodeId],
        now_ms: u64,
    ) -> (Completing, Vec<(NodeId, Request)>) {
        let reqs = to_each(
            authorities,
            Request::Complete {
                slot: slot.to_owned(),
                holder: holder.to_owned(),
                token,
                run: run.clone(),
            },
        );
        let c = Completing {
            slot: slot.to_owned(),
            run,
            authorities: authorities.len(),
            answered: 0,
            accepted: 0,
            sent_ms: now_ms,
        };
        (c, reqs)
    }

    /// Takes one authority's answer (the caller counts each authority once).
    pub fn on_reply(&mut self, reply: &Reply) -> Counted {
        match reply {
            Reply::Completed { slot } if *slot == self.slot => {
                self.answered += 1;
                self.accepted += 1;
            }
            Reply::NotCompleted { slot, .. } if *slot == self.slot => self.answered += 1,
            _ => {}
        }
        self.counted()
    }

    pub fn counted(&self) -> Counted {
        let majority = self.authorities / 2 + 1;
        if self.accepted >= majority {
            Counted::Yes
        } else if self.authorities - (self.answered - self.accepted) < majority {
            Counted::No
        } else {
            Counted::Pending
        }
    }

    pub fn started_ms(&self) -> u64 {
        self.sent_ms
    }
}
