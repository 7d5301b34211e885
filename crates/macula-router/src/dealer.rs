//! The dealer's state: registrations (with shared-registration invocation policies) and calls in flight.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::ids::{IdMap, IdPairMap, UriMap};
use std::time::Instant;

use macula_wamp::uri::MatchPolicy;
use macula_wamp::Id;

/// How a shared registration picks a callee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvokePolicy {
    Single,
    RoundRobin,
    Random,
    First,
    Last,
}

impl InvokePolicy {
    pub fn parse(s: Option<&str>) -> Option<InvokePolicy> {
        match s {
            None | Some("single") => Some(InvokePolicy::Single),
            Some("roundrobin") => Some(InvokePolicy::RoundRobin),
            Some("random") => Some(InvokePolicy::Random),
            Some("first") => Some(InvokePolicy::First),
            Some("last") => Some(InvokePolicy::Last),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            InvokePolicy::Single => "single",
            InvokePolicy::RoundRobin => "roundrobin",
            InvokePolicy::Random => "random",
            InvokePolicy::First => "first",
            InvokePolicy::Last => "last",
        }
    }
}

/// A procedure registration, possibly shared by several callees.
#[derive(Debug)]
pub struct Registration {
    pub id: Id,
    pub uri: String,
    pub policy: MatchPolicy,
    pub invoke: InvokePolicy,
    /// Callees in registration order.
    pub callees: Vec<Id>,
    next: usize,
}

/// How a call is being canceled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelMode {
    Skip,
    Kill,
    KillNoWait,
}

impl CancelMode {
    pub fn parse(s: Option<&str>) -> Option<CancelMode> {
        match s {
            None | Some("skip") => Some(CancelMode::Skip),
            Some("kill") => Some(CancelMode::Kill),
            Some("killnowait") => Some(CancelMode::KillNoWait),
            _ => None,
        }
    }
}

/// A call in flight: the INVOCATION was sent, the final YIELD or ERROR has not come back.
#[derive(Debug, Clone)]
pub struct PendingCall {
    pub caller: Id,
    pub caller_request: Id,
    pub callee: Id,
    pub receive_progress: bool,
    /// Set once the caller asked to cancel with mode `kill`: the callee's answer is turned into
    /// `wamp.error.canceled`.
    pub killing: bool,
}

/// Registrations and calls of one realm.
#[derive(Debug, Default)]
pub struct Dealer {
    regs: IdMap<Registration>,
    /// Exact registrations by procedure (looked up by `&str` on every call).
    exact: UriMap<Id>,
    by_pattern: HashMap<(MatchPolicy, String), Id>,
    patterns: Vec<Id>,
    /// Calls in flight by invocation id.
    calls: IdMap<(PendingCall, Option<Instant>)>,
    /// (caller session, CALL request id) → invocation id.
    by_caller: IdPairMap<Id>,
    /// Calls in flight per caller (for the per-session limit).
    per_caller: IdMap<usize>,
    /// Call deadlines; entries of finished calls are skipped lazily.
    deadlines: BinaryHeap<Reverse<(Instant, Id)>>,
    last_invocation: Id,
}

/// Why a REGISTER was refused.
pub enum RegisterError {
    AlreadyExists,
    PolicyMismatch(InvokePolicy),
}

impl Dealer {
    /// Registers `session` as a callee of (`uri`, `policy`).
    pub fn register(
        &mut self,
        session: Id,
        uri: &str,
        policy: MatchPolicy,
        invoke: InvokePolicy,
        new_id: impl FnOnce() -> Id,
    ) -> Result<Id, RegisterError> {
        let existing = match policy {
            MatchPolicy::Exact => self.exact.get(uri).copied(),
            _ => self.by_pattern.get(&(policy, uri.to_owned())).copied(),
        };
        if let Some(id) = existing {
            if let Some(r) = self.regs.get_mut(&id) {
                if r.invoke == InvokePolicy::Single || r.callees.contains(&session) {
                    return Err(RegisterError::AlreadyExists);
                }
                if r.invoke != invoke {
                    return Err(RegisterError::PolicyMismatch(r.invoke));
                }
                r.callees.push(session);
                return Ok(id);
            }
        }
        let mut id = new_id();
        while self.regs.contains_key(&id) {
            id = id.wrapping_add(1).max(1);
        }
        self.regs.insert(
            id,
            Registration {
                id,
                uri: uri.to_owned(),
                policy,
                invoke,
                callees: vec![session],
                next: 0,
            },
        );
        if policy == MatchPolicy::Exact {
            self.exact.insert(uri.to_owned(), id);
        } else {
            self.by_pattern.insert((policy, uri.to_owned()), id);
            self.patterns.push(id);
        }
        Ok(id)
    }

    /// Removes `session` from registration `id`; `None` if it was not a callee of it.
    pub fn unregister(&mut self, session: Id, id: Id) -> Option<()> {
        let r = self.regs.get_mut(&id)?;
        let pos = r.callees.iter().position(|x| *x == session)?;
        r.callees.remove(pos);
        if r.callees.is_empty() {
            if let Some(r) = self.regs.remove(&id) {
                if r.policy == MatchPolicy::Exact {
                    self.exact.remove(&r.uri);
                } else {
                    self.by_pattern.remove(&(r.policy, r.uri));
                    self.patterns.retain(|p| *p != id);
                }
            }
        }
        Some(())
    }

    /// Finds the registration for `procedure`: exact match first, then the longest prefix, then
    /// the wildcard pattern with the most literal components.
    pub fn lookup(&self, procedure: &str) -> Option<&Registration> {
        if let Some(r) = self.exact.get(procedure).and_then(|id| self.regs.get(id)) {
            return Some(r);
        }
        let mut best: Option<&Registration> = None;
        for id in &self.patterns {
            let Some(r) = self.regs.get(id) else { continue };
            if !r.policy.matches(&r.uri, procedure) {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => rank(r) > rank(b),
            };
            if better {
                best = Some(r);
            }
        }
        best
    }

    /// Picks the callee for a call to registration `id` among the callees for which `eligible`
    /// holds, advancing round-robin state.
    pub fn pick_callee(
        &mut self,
        id: Id,
        random: u64,
        eligible: impl Fn(Id) -> bool,
    ) -> Option<Id> {
        let r = self.regs.get_mut(&id)?;
        let n = r.callees.len();
        match r.invoke {
            InvokePolicy::Single | InvokePolicy::First => {
                r.callees.iter().copied().find(|c| eligible(*c))
            }
            InvokePolicy::Last => r.callees.iter().rev().copied().find(|c| eligible(*c)),
            InvokePolicy::Random => {
                let ok = r.callees.iter().filter(|c| eligible(**c)).count();
                if ok == 0 {
                    return None;
                }
                r.callees
                    .iter()
                    .copied()
                    .filter(|c| eligible(*c))
                    .nth((random % ok as u64) as usize)
            }
            InvokePolicy::RoundRobin => {
                for k in 0..n {
                    let c = r.callees[(r.next + k) % n];
                    if eligible(c) {
                        r.next = (r.next + k + 1) % n;
                        return Some(c);
                    }
                }
                None
            }
        }
    }

    pub fn get(&self, id: Id) -> Option<&Registration> {
        self.regs.get(&id)
    }

    /// Every registration (for advertisement snapshots).
    pub fn iter(&self) -> impl Iterator<Item = &Registration> {
        self.regs.values()
    }

    /// The registration for exactly (`uri`, `policy`).
    pub fn find(&self, policy: MatchPolicy, uri: &str) -> Option<Id> {
        match policy {
            MatchPolicy::Exact => self.exact.get(uri).copied(),
            _ => self.by_pattern.get(&(policy, uri.to_owned())).copied(),
        }
    }

    /// Records a new call and returns its invocation id.
    pub fn start_call(&mut self, call: PendingCall, deadline: Option<Instant>) -> Id {
        self.last_invocation += 1;
        let inv = self.last_invocation;
        self.by_caller
            .insert((call.caller, call.caller_request), inv);
        *self.per_caller.entry(call.caller).or_default() += 1;
        self.calls.insert(inv, (call, deadline));
        if let Some(d) = deadline {
            self.deadlines.push(Reverse((d, inv)));
            // Finished calls leave their deadline behind until it passes; rebuild the heap from
            // the calls in flight when those leftovers dominate, so memory follows live calls.
            if self.deadlines.len() > 2 * self.calls.len() + 1024 {
                self.deadlines = self
                    .calls
                    .iter()
                    .filter_map(|(i, (_, d))| d.map(|d| Reverse((d, *i))))
                    .collect();
            }
        }
        inv
    }

    /// Whether `inv` is an invocation id this dealer has ever issued.
    pub fn was_issued(&self, inv: Id) -> bool {
        inv >= 1 && inv <= self.last_invocation
    }

    pub fn call(&self, inv: Id) -> Option<&PendingCall> {
        self.calls.get(&inv).map(|(c, _)| c)
    }

    pub fn call_mut(&mut self, inv: Id) -> Option<&mut PendingCall> {
        self.calls.get_mut(&inv).map(|(c, _)| c)
    }

    /// Invocation id of the caller's call, if still in flight.
    pub fn by_caller(&self, caller: Id, request: Id) -> Option<Id> {
        self.by_caller.get(&(caller, request)).copied()
    }

    /// Removes a finished call.
    pub fn finish(&mut self, inv: Id) -> Option<PendingCall> {
        let (c, _) = self.calls.remove(&inv)?;
        self.by_caller.remove(&(c.caller, c.caller_request));
        if let Some(n) = self.per_caller.get_mut(&c.caller) {
            *n -= 1;
            if *n == 0 {
                self.per_caller.remove(&c.caller);
            }
        }
        Some(c)
    }

    /// Calls `caller` has in flight.
    pub fn calls_of(&self, caller: Id) -> usize {
        self.per_caller.get(&caller).copied().unwrap_or(0)
    }

    /// Removes and returns calls whose deadline is at or before `now`.
    /// Whether any call has a deadline still to be checked (the caller must tick this dealer).
    /// With no call in flight, the deadlines of finished calls are dropped at once.
    pub fn has_deadlines(&mut self) -> bool {
        if self.calls.is_empty() {
            self.deadlines.clear();
        }
        !self.deadlines.is_empty()
    }

    pub fn expired(&mut self, now: Instant) -> Vec<(Id, PendingCall)> {
        let mut out = vec![];
        while let Some(Reverse((d, inv))) = self.deadlines.peek().copied() {
            if d > now {
                break;
            }
            self.deadlines.pop();
            if let Some(c) = self.finish(inv) {
                out.push((inv, c));
            }
        }
        out
    }

    /// Invocation ids of calls where `session` is the caller or the callee.
    pub fn calls_involving(&self, session: Id) -> Vec<Id> {
        self.calls
            .iter()
            .filter(|(_, (c, _))| c.caller == session || c.callee == session)
            .map(|(i, _)| *i)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.regs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }
}

fn rank(r: &Registration) -> (u8, usize) {
    match r.policy {
        MatchPolicy::Exact => (2, r.uri.len()),
        MatchPolicy::Prefix => (1, r.uri.len()),
        MatchPolicy::Wildcard => (0, r.uri.split('.').filter(|c| !c.is_empty()).count()),
    }
}
