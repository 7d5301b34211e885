//! A slot's *configuration* — which authorities grant its lease — as state the authorities
//! keep, changed only by a majority of the configuration it replaces.
//!
//! **Where a configuration starts.** A slot's first configuration (epoch 1) is fixed by the
//! signed deploy record that asks for the slot ([`crate::record::Genesis`]), so every node that
//! has the record agrees on it, whatever it sees of the mesh. Its members take it on when the
//! record reaches them ([`Authority::adopt`]).
//!
//! **How it moves.** When the realm's nodes change, a slot's rendezvous top 3 (its *target*)
//! may differ from its configuration `C`. A member of `C` then moves it ([`Moving`]): the
//! successor of `C` is one value chosen by `C`'s members, as in single-decree Paxos with
//! ballots `(round, node)`:
//!
//! 1. *Prepare*: the mover asks every member of `C` to promise it. A member that promises
//!    stops granting under `C` for good (it is *frozen*) and answers with what it holds
//!    ([`Handover`]: the highest token it promised, the grant still running there, the run of
//!    a job it accepted) and the successor it accepted under an earlier ballot, if any. A
//!    member that had not yet taken `C` on takes it on first, from the mover's own state (the
//!    mover is a member that has).
//! 2. With a majority of promises, the mover proposes the successor accepted under the highest
//!    ballot it heard of, or its target if none; a majority accepting chooses it.
//! 3. *Install*: the mover gives the members of the successor `T` (epoch + 1) the handover, the
//!    merge of the majority's: `T` starts above every token `C` promised, keeps what `C`
//!    accepted, and blocks every holder but the one whose grant was running until that grant
//!    ends (the holder itself renews under `T` with the token it holds, so its replica goes
//!    on). Members of `C` are told where the slot went ([`Request::Moved`]).
//!
//! **Why it is safe.** Every lease under `C` had a majority of `C`; the mover's majority of
//! promises shares a member with it, which either reported the lease (so `T` respects it) or
//! froze before granting it (so it never reached a majority). Once a majority of `C` is frozen,
//! `C` grants nothing more. Two movers of `C` at once choose one successor (Paxos). A move
//! that stalls (its mover lost the majority) leaves its members frozen, never wrong: any
//! member of `C` that reaches a majority finishes it later, with the value already chosen if
//! there is one. A node that sees only part of the mesh computes a target of its own, but can
//! move nothing without a majority of the configuration that is.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Authority, NodeId, Refusal, Reply, Request, SlotPromise};

/// A slot's authorities and the configuration's epoch (1 for the first, one more per move).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cfg {
    pub epoch: u64,
    pub set: Vec<NodeId>,
}

impl Cfg {
    pub fn majority(&self) -> usize {
        self.set.len() / 2 + 1
    }

    pub fn has(&self, node: &str) -> bool {
        self.set.iter().any(|n| n == node)
    }

    /// Whether it holds the same nodes as `set` (in any order).
    pub fn same_nodes(&self, set: &[NodeId]) -> bool {
        let mut a = self.set.clone();
        let mut b = set.to_vec();
        a.sort();
        b.sort();
        a == b
    }
}

/// A ballot of a move: (round, mover), compared in that order.
pub type Ballot = (u64, NodeId);

/// What a member of a configuration holds for a slot, handed to the next configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The highest token promised.
    pub promised: u64,
    /// A grant still running: holder ("" when grants of several holders ran: nobody may renew),
    /// its token, and how long it still runs (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<(NodeId, u64, u64)>,
    /// A job's run accepted, and the token it was accepted under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<(super::Completion, u64)>,
}

impl Handover {
    /// Takes in another member's handover: the highest token, the run accepted under the highest
    /// token, and a grant that blocks every holder whose grant was running anywhere.
    pub fn merge(&mut self, other: &Handover) {
        self.promised = self.promised.max(other.promised);
        if let Some((run, t)) = &other.done {
            if self.done.as_ref().is_none_or(|(_, mine)| t > mine) {
                self.done = Some((run.clone(), *t));
            }
        }
        self.grant = match (self.grant.take(), &other.grant) {
            (None, g) => g.clone(),
            (g, None) => g,
            // One holder: its highest token (a later attempt of its own). Two: nobody.
            (Some((h1, t1, r1)), Some((h2, t2, r2))) => {
                let holder = if h1 == *h2 { h1 } else { String::new() };
                Some((holder, t1.max(*t2), r1.max(*r2)))
            }
        };
    }
}

/// A move of the configuration `epoch` under way at a member (it grants nothing under that
/// configuration any more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveState {
    /// The epoch of the configuration being replaced.
    pub epoch: u64,
    /// The highest ballot promised.
    pub ballot: Ballot,
    /// The successor accepted, and under which ballot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<(Ballot, Cfg)>,
    /// The successor chosen, once told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Cfg>,
}

/// Why a member does not serve a request under `asked` (None: it does).
pub(super) fn mismatch(st: Option<&SlotPromise>, asked: Option<&Cfg>) -> Option<Refusal> {
    let have = st.and_then(|s| s.cfg.as_ref());
    if have != asked {
        return Some(Refusal::Config(newest(st)));
    }
    // Frozen by a move of this configuration, or told of one of a later one (it is behind).
    let frozen = st
        .and_then(|s| s.moving.as_ref())
        .is_some_and(|m| have.is_some_and(|c| m.epoch >= c.epoch));
    frozen.then(|| Refusal::Config(newest(st)))
}

/// The newest configuration a member knows of for a slot: the successor chosen, or its own.
fn newest(st: Option<&SlotPromise>) -> Option<Cfg> {
    let st = st?;
    match st.moving.as_ref().and_then(|m| m.next.clone()) {
        Some(n) if st.cfg.as_ref().is_none_or(|c| n.epoch > c.epoch) => Some(n),
        _ => st.cfg.clone(),
    }
}

impl Authority {
    /// Takes on `cfg` as the first configuration of `slot` (from the deploy record), unless this
    /// authority already keeps the slot. Returns the state to persist when it did.
    pub fn adopt(&mut self, slot: &str, cfg: Cfg) -> Option<SlotPromise> {
        let st = self.slots.entry(slot.to_owned()).or_default();
        if st.cfg.is_some() || st.moving.is_some() {
            return None;
        }
        st.cfg = Some(cfg);
        Some(st.clone())
    }

    /// The configuration this authority serves `slot` under, if it is not being moved.
    pub fn active(&self, slot: &str) -> Option<&Cfg> {
        let st = self.slots.get(slot)?;
        mismatch(Some(st), st.cfg.as_ref())
            .is_none()
            .then_some(st.cfg.as_ref())
            .flatten()
    }

    /// The configuration of `slot` this authority is a member of, while its successor is not
    /// known here: served, or frozen by a move that has not finished (a member moves it then,
    /// to finish that move).
    pub fn member_of(&self, slot: &str) -> Option<&Cfg> {
        let st = self.slots.get(slot)?;
        let cfg = st.cfg.as_ref()?;
        let succeeded = st
            .moving
            .as_ref()
            .is_some_and(|m| m.epoch >= cfg.epoch && m.next.is_some());
        (!succeeded).then_some(cfg)
    }

    /// The newest configuration of `slot` this authority knows of (its own, or the successor it
    /// was told of).
    pub fn newest(&self, slot: &str) -> Option<Cfg> {
        newest(self.slots.get(slot))
    }

    /// Every slot this authority is a member of a configuration of ([`Authority::member_of`]),
    /// with the configuration and whether it is frozen by a move (for the moves to follow the
    /// realm's nodes, and to finish).
    pub fn configs(&self) -> Vec<(String, Cfg, bool)> {
        self.slots
            .keys()
            .filter_map(|s| {
                let c = self.member_of(s)?;
                Some((s.clone(), c.clone(), self.active(s).is_none()))
            })
            .collect()
    }

    /// `slot`'s first configuration `cfg` turned out not to be the slot's (its deploy record
    /// lost to another of the same sequence): this authority stops granting under it, as if a
    /// move had frozen it. Returns the state to persist when it changed.
    pub fn abandon(&mut self, slot: &str, cfg: &Cfg) -> Option<SlotPromise> {
        let st = self.slots.get_mut(slot)?;
        if st.cfg.as_ref() != Some(cfg) || cfg.epoch != 1 || st.moving.is_some() {
            return None;
        }
        st.moving = Some(MoveState {
            epoch: 1,
            ballot: (u64::MAX, String::new()),
            accepted: None,
            next: None,
        });
        Some(st.clone())
    }

    /// `slot`'s configuration `epoch` was succeeded: `newer` (a configuration past it, named by
    /// one of its members) exists, which takes a successor chosen by a majority of it. A member
    /// that missed the move (or its end) stops serving and moving it, and points at `newer`.
    /// Returns the state to persist when it changed.
    pub fn superseded(&mut self, slot: &str, epoch: u64, newer: &Cfg) -> Option<SlotPromise> {
        let st = self.slots.get_mut(slot)?;
        if st.cfg.as_ref().is_none_or(|c| c.epoch != epoch) || newer.epoch <= epoch {
            return None;
        }
        match &mut st.moving {
            Some(m) if m.epoch > epoch => return None,
            Some(m) if m.epoch == epoch => {
                if m.next.as_ref().is_some_and(|n| n.epoch >= newer.epoch) {
                    return None;
                }
                m.next = Some(newer.clone());
            }
            _ => {
                st.moving = Some(MoveState {
                    epoch,
                    ballot: (0, String::new()),
                    accepted: None,
                    next: Some(newer.clone()),
                })
            }
        }
        Some(st.clone())
    }

    /// What this authority holds for `slot` at `now_ms`, as handed to a next configuration.
    pub fn handover(&self, slot: &str, now_ms: u64) -> Handover {
        let st = self.slots.get(slot);
        let mut h = Handover {
            promised: st.map_or(0, |s| s.promised),
            grant: st
                .and_then(|s| s.grant.clone())
                .filter(|g| g.2 > now_ms)
                .map(|(h, t, until)| (h, t, until - now_ms)),
            done: st.and_then(|s| s.done.clone()),
        };
        if let Some((p, until)) = self.provisional.get(slot).filter(|p| p.1 > now_ms) {
            h.merge(&Handover {
                grant: Some((p.clone(), 0, until - now_ms)),
                ..Handover::default()
            });
        }
        h
    }

    /// Takes `h` in for `slot` at `now_ms` (an install, or a member taking on a configuration
    /// it had missed).
    fn take_over(&mut self, slot: &str, h: &Handover, now_ms: u64) {
        let st = self.slots.entry(slot.to_owned()).or_default();
        st.promised = st.promised.max(h.promised);
        if let Some((run, t)) = &h.done {
            if st.done.as_ref().is_none_or(|(_, mine)| t > mine) {
                st.done = Some((run.clone(), *t));
            }
        }
        if let Some((holder, token, left)) = &h.grant {
            let until = now_ms + left;
            let mine = st.grant.clone().filter(|g| g.2 > now_ms);
            st.grant = Some(match mine {
                None => (holder.clone(), *token, until),
                Some((mh, mt, mu)) if mh == *holder => (mh, mt.max(*token), mu.max(until)),
                // Two holders' grants: nobody may renew until both have ended.
                Some((_, mt, mu)) => (String::new(), (*token).max(mt), mu.max(until)),
            });
        }
    }

    /// The move requests ([`Request::Prepare`], [`Request::Propose`], [`Request::Install`],
    /// [`Request::Moved`]).
    pub(super) fn handle_move(&mut self, req: &Request, now_ms: u64) -> (Reply, bool) {
        let slot = req.slot_holder().0.to_owned();
        let refuse = |why| {
            (
                Reply::Refused {
                    slot: slot.clone(),
                    why,
                },
                false,
            )
        };
        if now_ms < self.abstain_until {
            return refuse(Refusal::Abstaining {
                until_ms: self.abstain_until,
            });
        }
        match req {
            Request::Prepare {
                cfg, ballot, state, ..
            } => {
                if let Some(why) = self.behind_or_ahead(&slot, cfg) {
                    return refuse(why);
                }
                // A member that had not taken the configuration on takes it on now, from the
                // mover's state (it never granted under it).
                let mut changed = false;
                if self.slots.get(&slot).and_then(|s| s.cfg.as_ref()) != Some(cfg) {
                    self.take_over(&slot, state, now_ms);
                    let st = self.slots.entry(slot.clone()).or_default();
                    st.cfg = Some(cfg.clone());
                    if st.moving.as_ref().is_some_and(|m| m.epoch < cfg.epoch) {
                        st.moving = None;
                    }
                    changed = true;
                }
                let st = self.slots.entry(slot.clone()).or_default();
                let m = st.moving.get_or_insert_with(|| MoveState {
                    epoch: cfg.epoch,
                    ballot: (0, String::new()),
                    accepted: None,
                    next: None,
                });
                if *ballot <= m.ballot {
                    let promised = m.ballot.clone();
                    return (
                        Reply::Refused {
                            slot: slot.clone(),
                            why: Refusal::Outbid { ballot: promised },
                        },
                        changed,
                    );
                }
                m.ballot = ballot.clone();
                let accepted = m.accepted.clone();
                (
                    Reply::Promised {
                        slot: slot.clone(),
                        ballot: ballot.clone(),
                        accepted,
                        handover: self.handover(&slot, now_ms),
                    },
                    true,
                )
            }
            Request::Propose {
                cfg, ballot, next, ..
            } => {
                if let Some(why) = self.behind_or_ahead(&slot, cfg) {
                    return refuse(why);
                }
                // Never promised under this configuration (a prepare always comes first).
                let Some(st) = self
                    .slots
                    .get_mut(&slot)
                    .filter(|st| st.cfg.as_ref() == Some(cfg))
                else {
                    return refuse(Refusal::Config(newest(self.slots.get(&slot))));
                };
                let Some(m) = st.moving.as_mut().filter(|m| m.epoch == cfg.epoch) else {
                    return refuse(Refusal::Config(st.cfg.clone()));
                };
                if *ballot < m.ballot || next.epoch != cfg.epoch + 1 {
                    return refuse(Refusal::Outbid {
                        ballot: m.ballot.clone(),
                    });
                }
                m.ballot = ballot.clone();
                m.accepted = Some((ballot.clone(), next.clone()));
                (
                    Reply::Accepted {
                        slot: slot.clone(),
                        ballot: ballot.clone(),
                    },
                    true,
                )
            }
            Request::Install { cfg, handover, .. } => {
                let st = self.slots.entry(slot.clone()).or_default();
                let have = st.cfg.clone();
                match &have {
                    Some(c) if c == cfg => {
                        // Again (another mover, or a retry): the handovers merge.
                        self.take_over(&slot, handover, now_ms);
                        return (
                            Reply::Installed {
                                slot: slot.clone(),
                                cfg: cfg.clone(),
                            },
                            true,
                        );
                    }
                    Some(c) if c.epoch >= cfg.epoch => {
                        return refuse(Refusal::Config(newest(Some(st))))
                    }
                    _ => {}
                }
                self.take_over(&slot, handover, now_ms);
                let st = self.slots.entry(slot.clone()).or_default();
                st.cfg = Some(cfg.clone());
                if st.moving.as_ref().is_some_and(|m| m.epoch < cfg.epoch) {
                    st.moving = None;
                }
                (
                    Reply::Installed {
                        slot: slot.clone(),
                        cfg: cfg.clone(),
                    },
                    true,
                )
            }
            Request::Moved { from, to, .. } => {
                // A member that missed the move's prepare (it was down) keeps where the slot
                // went all the same, and never takes on the slot's first configuration again.
                let st = self.slots.entry(slot.clone()).or_default();
                let older = st.moving.as_ref().is_none_or(|m| m.epoch < from.epoch);
                if st.cfg.as_ref().is_none_or(|c| c.epoch <= from.epoch) && older {
                    st.moving = Some(MoveState {
                        epoch: from.epoch,
                        ballot: (0, String::new()),
                        accepted: None,
                        next: None,
                    });
                }
                let Some(m) = st.moving.as_mut().filter(|m| m.epoch == from.epoch) else {
                    return refuse(Refusal::Config(newest(Some(st))));
                };
                if to.epoch != from.epoch + 1 || m.next.as_ref() == Some(to) {
                    return refuse(Refusal::Config(newest(Some(st))));
                }
                m.next = Some(to.clone());
                (
                    Reply::Installed {
                        slot: slot.clone(),
                        cfg: to.clone(),
                    },
                    true,
                )
            }
            _ => refuse(Refusal::NotHeld),
        }
    }

    /// Why a prepare or a proposal for moving `cfg` is refused: this member is at a newer
    /// configuration (or one of the same epoch with other nodes), or a move of a newer one is
    /// under way here.
    fn behind_or_ahead(&self, slot: &str, cfg: &Cfg) -> Option<Refusal> {
        let st = self.slots.get(slot)?;
        let newer = st
            .cfg
            .as_ref()
            .is_some_and(|c| c.epoch > cfg.epoch || (c.epoch == cfg.epoch && c != cfg))
            || st.moving.as_ref().is_some_and(|m| m.epoch > cfg.epoch);
        newer.then(|| Refusal::Config(newest(Some(st))))
    }
}

/// Where a move stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Moved {
    /// Waiting for answers.
    Pending,
    /// The successor is chosen (and its members are being told): `next`.
    Done(Cfg),
    /// Not now: a newer configuration was named (learn it), or a higher ballot is under way, or
    /// no majority answered.
    Failed {
        newer: Option<Cfg>,
        outbid: Option<Ballot>,
    },
}

/// A member's move of a slot's configuration to its target (see the module's documentation):
/// prepare, propose, then install.
#[derive(Debug, Clone)]
pub struct Moving {
    pub slot: String,
    pub from: Cfg,
    target: Vec<NodeId>,
    ballot: Ballot,
    mover: NodeId,
    sent_ms: u64,
    phase: Phase,
    /// Members that answered in the current phase.
    answered: HashMap<NodeId, bool>,
    handover: Handover,
    /// The successor accepted under the highest ballot heard of.
    accepted: Option<(Ballot, Cfg)>,
    newer: Option<Cfg>,
    outbid: Option<Ballot>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prepare,
    Propose,
    Install,
}

impl Moving {
    /// Starts moving `slot` from `from` to `target`, by member `mover` (whose own state for
    /// the slot is `state`), with ballot round `round`. Returns the prepares to send.
    pub fn start(
        slot: &str,
        mover: &str,
        from: &Cfg,
        target: &[NodeId],
        round: u64,
        state: Handover,
        now_ms: u64,
    ) -> (Moving, Vec<(NodeId, Request)>) {
        let ballot = (round, mover.to_owned());
        let req = Request::Prepare {
            slot: slot.to_owned(),
            holder: mover.to_owned(),
            cfg: from.clone(),
            ballot: ballot.clone(),
            state,
        };
        let m = Moving {
            slot: slot.to_owned(),
            from: from.clone(),
            target: target.to_vec(),
            ballot,
            mover: mover.to_owned(),
            sent_ms: now_ms,
            phase: Phase::Prepare,
            answered: HashMap::new(),
            handover: Handover::default(),
            accepted: None,
            newer: None,
            outbid: None,
        };
        (m, super::to_each(&from.set, req))
    }

    pub fn started_ms(&self) -> u64 {
        self.sent_ms
    }

    /// Takes member `from`'s answer; returns where the move stands and what to send next.
    pub fn on_reply(&mut self, from: &str, reply: &Reply) -> (Moved, Vec<(NodeId, Request)>) {
        let asked = match self.phase {
            Phase::Install => self.next().set,
            _ => self.from.set.clone(),
        };
        if !asked.iter().any(|n| n == from)
            || self.answered.contains_key(from)
            || reply.slot() != self.slot
        {
            return (Moved::Pending, vec![]);
        }
        let ok = match (self.phase, reply) {
            (
                Phase::Prepare,
                Reply::Promised {
                    ballot,
                    accepted,
                    handover,
                    ..
                },
            ) if *ballot == self.ballot => {
                self.handover.merge(handover);
                if let Some((b, c)) = accepted {
                    if self.accepted.as_ref().is_none_or(|(mine, _)| b > mine) {
                        self.accepted = Some((b.clone(), c.clone()));
                    }
                }
                true
            }
            (Phase::Propose, Reply::Accepted { ballot, .. }) if *ballot == self.ballot => true,
            (Phase::Install, Reply::Installed { cfg, .. }) if *cfg == self.next() => true,
            (_, Reply::Refused { why, .. }) => {
                match why {
                    Refusal::Config(Some(c))
                        if c.epoch > self.from.epoch
                            && self.newer.as_ref().is_none_or(|n| c.epoch > n.epoch) =>
                    {
                        self.newer = Some(c.clone());
                    }
                    Refusal::Outbid { ballot }
                        if self.outbid.as_ref().is_none_or(|b| ballot > b) =>
                    {
                        self.outbid = Some(ballot.clone());
                    }
                    _ => {}
                }
                false
            }
            _ => return (Moved::Pending, vec![]),
        };
        self.answered.insert(from.to_owned(), ok);
        let yes = self.answered.values().filter(|v| **v).count();
        let no = self.answered.len() - yes;
        let majority = asked.len() / 2 + 1;
        if yes >= majority {
            self.answered.clear();
            return match self.phase {
                Phase::Prepare => {
                    self.phase = Phase::Propose;
                    let next = self.next();
                    let req = Request::Propose {
                        slot: self.slot.clone(),
                        holder: self.mover.clone(),
                        cfg: self.from.clone(),
                        ballot: self.ballot.clone(),
                        next,
                    };
                    (Moved::Pending, super::to_each(&self.from.set, req))
                }
                Phase::Propose => {
                    // Chosen: its members take it on.
                    self.phase = Phase::Install;
                    let next = self.next();
                    let out = super::to_each(
                        &next.set,
                        Request::Install {
                            slot: self.slot.clone(),
                            holder: self.mover.clone(),
                            cfg: next.clone(),
                            handover: self.handover.clone(),
                        },
                    );
                    (Moved::Pending, out)
                }
                Phase::Install => {
                    // A majority of the successor serves it: the members left behind are told.
                    let next = self.next();
                    let out: Vec<(NodeId, Request)> = self
                        .from
                        .set
                        .iter()
                        .filter(|n| !next.has(n))
                        .map(|n| {
                            (
                                n.clone(),
                                Request::Moved {
                                    slot: self.slot.clone(),
                                    holder: self.mover.clone(),
                                    from: self.from.clone(),
                                    to: next.clone(),
                                },
                            )
                        })
                        .collect();
                    (Moved::Done(next), out)
                }
            };
        }
        if asked.len() - no < majority {
            return (self.failed(), vec![]);
        }
        (Moved::Pending, vec![])
    }

    /// The successor proposed: the one accepted under the highest ballot, or the target.
    fn next(&self) -> Cfg {
        match &self.accepted {
            Some((_, c)) => c.clone(),
            None => Cfg {
                epoch: self.from.epoch + 1,
                set: self.target.clone(),
            },
        }
    }

    /// Where it stands once the answers are late: failed, with what was learned.
    pub fn failed(&self) -> Moved {
        Moved::Failed {
            newer: self.newer.clone(),
            outbid: self.outbid.clone(),
        }
    }
}
