//! Leases under a hostile network: messages lost, delayed and cut by partitions, holders
//! competing and renewing. At no moment do two nodes both count on holding a slot, and every
//! new holder's fencing token is above every earlier one.

use std::collections::{BTreeMap, HashMap};

use macula_workloads::lease::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const TERM: u64 = 1_000;
const MARGIN: u64 = 50;
const SLOT: &str = "com.example.app/api/0";

#[test]
fn authorities_are_the_same_everywhere_and_move_little() {
    let nodes: Vec<NodeId> = (0..20).map(|i| format!("n{i}")).collect();
    let a = authorities(SLOT, &nodes, AUTHORITIES);
    assert_eq!(a.len(), 3);
    let mut shuffled = nodes.clone();
    shuffled.reverse();
    assert_eq!(
        authorities(SLOT, &shuffled, AUTHORITIES),
        a,
        "order of the list matters not"
    );
    // A node that is not an authority leaving changes nothing.
    let leaving = nodes.iter().find(|n| !a.contains(n)).unwrap();
    let gone: Vec<NodeId> = nodes.iter().filter(|n| *n != leaving).cloned().collect();
    assert_eq!(authorities(SLOT, &gone, AUTHORITIES), a);
    // An authority leaving moves one place of the set, not the others.
    let without_first: Vec<NodeId> = nodes.iter().filter(|n| *n != a[0]).cloned().collect();
    let after = authorities(SLOT, &without_first, AUTHORITIES);
    assert_eq!(&after[..2], &a[1..], "the others stay, in order");
    // Slots spread over the nodes.
    let mut counts: HashMap<&NodeId, usize> = HashMap::new();
    for i in 0..3000 {
        for n in authorities(&format!("r/p/{i}"), &nodes, AUTHORITIES) {
            *counts.entry(n).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), 20);
    assert!(
        counts.values().all(|c| (300..600).contains(c)),
        "{counts:?}"
    );
}

#[test]
fn an_authority_grants_one_holder_and_only_growing_tokens() {
    let mut a = Authority::new(TERM, Some(BTreeMap::new()), 0);
    let acquire = |h: &str, t: u64| Request::Acquire {
        slot: SLOT.into(),
        holder: h.into(),
        token: t,
        seq: 1,
    };
    let (r, persist) = a.handle(&acquire("n1", 1), 0);
    assert_eq!(
        r,
        Reply::Granted {
            slot: SLOT.into(),
            token: 1,
            accepted: None,
        }
    );
    assert_eq!(
        persist.unwrap().promised,
        1,
        "the promise is handed over to persist"
    );
    // Another holder while the grant runs: refused, told who holds it.
    let (r, _) = a.handle(&acquire("n2", 2), 500);
    assert!(
        matches!(r, Reply::Refused { why: Refusal::Held { ref holder, token: 1, until_ms: 1000 }, .. } if holder == "n1"),
        "{r:?}"
    );
    // The holder renews under its token.
    let (r, _) = a.handle(&acquire("n1", 1), 900);
    assert_eq!(
        r,
        Reply::Granted {
            slot: SLOT.into(),
            token: 1,
            accepted: None,
        }
    );
    // Once it lapsed, another holder gets it, but only above what was promised.
    let (r, _) = a.handle(&acquire("n2", 1), 2000);
    assert!(
        matches!(
            r,
            Reply::Refused {
                why: Refusal::Stale { promised: 1 },
                ..
            }
        ),
        "{r:?}"
    );
    let (r, _) = a.handle(&acquire("n2", 2), 2000);
    assert_eq!(
        r,
        Reply::Granted {
            slot: SLOT.into(),
            token: 2,
            accepted: None,
        }
    );
    // The old holder cannot come back with its old token.
    let (r, _) = a.handle(&acquire("n1", 1), 3500);
    assert!(
        matches!(
            r,
            Reply::Refused {
                why: Refusal::Stale { promised: 2 },
                ..
            }
        ),
        "{r:?}"
    );
    // A release frees the slot at once.
    let (r, p) = a.handle(
        &Request::Release {
            slot: SLOT.into(),
            holder: "n2".into(),
            token: 2,
        },
        2100,
    );
    assert_eq!(r, Reply::Released { slot: SLOT.into() });
    assert!(p.unwrap().grant.is_none());
    // Restored from its promises, it goes on; with them lost, it abstains for a term.
    let restored = Authority::new(TERM, Some(a.promises()), 5000);
    let mut restored = restored;
    let (r, _) = restored.handle(&acquire("n3", 2), 5000);
    assert!(matches!(
        r,
        Reply::Refused {
            why: Refusal::Stale { promised: 2 },
            ..
        }
    ));
    let mut wiped = Authority::new(TERM, None, 5000);
    let (r, _) = wiped.handle(&acquire("n3", 9), 5500);
    assert!(matches!(
        r,
        Reply::Refused {
            why: Refusal::Abstaining { until_ms: 6000 },
            ..
        }
    ));
    let (r, _) = wiped.handle(&acquire("n3", 9), 6000);
    assert_eq!(
        r,
        Reply::Granted {
            slot: SLOT.into(),
            token: 9,
            accepted: None,
        }
    );
}

#[test]
fn a_majority_holds_and_a_minority_does_not() {
    let auths: Vec<NodeId> = vec!["a".into(), "b".into(), "c".into()];
    let (mut acq, reqs) = Acquisition::start(SLOT, "n1", 5, 1, &auths, 100, TERM, MARGIN);
    assert_eq!(reqs.len(), 3);
    let granted = Reply::Granted {
        slot: SLOT.into(),
        token: 5,
        accepted: None,
    };
    assert_eq!(acq.on_reply(&granted), Outcome::Pending);
    let stale = Reply::Refused {
        slot: SLOT.into(),
        why: Refusal::Stale { promised: 7 },
    };
    assert_eq!(acq.on_reply(&stale), Outcome::Pending);
    assert_eq!(
        acq.on_reply(&granted),
        Outcome::Held {
            token: 5,
            valid_until_ms: 100 + TERM - MARGIN,
            accepted: None,
        }
    );
    let (mut acq, _) = Acquisition::start(SLOT, "n1", 5, 1, &auths, 100, TERM, MARGIN);
    acq.on_reply(&stale);
    assert_eq!(
        acq.on_reply(&stale),
        Outcome::Lost {
            retry_above: 7,
            held_by: None
        }
    );
    assert!(acq.expired(100 + TERM - MARGIN));
}

/// A holder in the simulation.
#[derive(Default)]
struct Holder {
    known: u64,
    trying: Option<Acquisition>,
    holds: Option<(u64, u64)>,
}

struct Msg {
    at: u64,
    /// The attempt (its start) a request belongs to, and its answer: an answer to an earlier
    /// attempt is not counted for a later one (the node matches answers to asks by id).
    attempt: u64,
    from: usize,
    to: usize,
    /// To an authority (`Some`) or back to a holder.
    req: Option<Request>,
    reply: Option<Reply>,
}

/// Runs one schedule; panics (failing the property) if two holders overlap or a token goes
/// backwards.
fn simulate(seed: u64, holders: usize, loss: f64, max_delay: u64, partitions: bool) -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let auth_ids: Vec<NodeId> = vec!["a0".into(), "a1".into(), "a2".into()];
    let mut auths: Vec<Authority> = (0..3)
        .map(|_| Authority::new(TERM, Some(BTreeMap::new()), 0))
        .collect();
    let mut hs: Vec<Holder> = (0..holders).map(|_| Holder::default()).collect();
    let mut net: Vec<Msg> = vec![];
    // Holder i is cut off from authority j while `cut[i][j]` is in the future.
    let mut cut = vec![vec![0u64; 3]; holders];
    let mut tenures: Vec<(usize, u64)> = vec![];
    let mut handovers = 0;
    for now in (0..30_000).step_by(10) {
        if partitions && rng.gen_bool(0.01) {
            let (i, j) = (rng.gen_range(0..holders), rng.gen_range(0..3));
            cut[i][j] = now + rng.gen_range(100..3_000);
        }
        // Deliver what is due.
        let (due, later): (Vec<Msg>, Vec<Msg>) = net.drain(..).partition(|m| m.at <= now);
        net = later;
        for m in due {
            if let Some(req) = m.req {
                let (reply, _persist) = auths[m.to].handle(&req, now);
                if cut[m.from][m.to] <= now && !rng.gen_bool(loss) {
                    net.push(Msg {
                        at: now + rng.gen_range(0..=max_delay),
                        attempt: m.attempt,
                        from: m.to,
                        to: m.from,
                        req: None,
                        reply: Some(reply),
                    });
                }
            } else if let Some(reply) = m.reply {
                let h = &mut hs[m.to];
                if let Some(acq) = h.trying.as_mut().filter(|a| a.started_ms() == m.attempt) {
                    match acq.on_reply(&reply) {
                        Outcome::Held {
                            token,
                            valid_until_ms,
                            ..
                        } => {
                            h.holds = Some((token, valid_until_ms));
                            h.known = h.known.max(token);
                            h.trying = None;
                        }
                        Outcome::Lost { retry_above, .. } => {
                            h.known = h.known.max(retry_above);
                            h.trying = None;
                        }
                        Outcome::Pending => {}
                    }
                }
            }
        }
        for (i, h) in hs.iter_mut().enumerate() {
            if h.holds.is_some_and(|(_, until)| until <= now) {
                h.holds = None;
            }
            if h.trying.as_ref().is_some_and(|a| a.expired(now)) {
                h.trying = None;
            }
            // Renew at a third of the term left; otherwise now and then try to take the slot.
            let renew = h.holds.is_some_and(|(_, until)| until - now < TERM / 3);
            let want = h.holds.is_none() && rng.gen_bool(0.02);
            if h.trying.is_none() && (renew || want) {
                let token = match h.holds {
                    Some((t, _)) if renew => t,
                    _ => h.known + 1,
                };
                let (acq, reqs) = Acquisition::start(
                    SLOT,
                    &format!("h{i}"),
                    token,
                    1,
                    &auth_ids,
                    now,
                    TERM,
                    MARGIN,
                );
                for (j, (_, req)) in reqs.into_iter().enumerate() {
                    if cut[i][j] <= now && !rng.gen_bool(loss) {
                        net.push(Msg {
                            at: now + rng.gen_range(0..=max_delay),
                            attempt: now,
                            from: i,
                            to: j,
                            req: Some(req),
                            reply: None,
                        });
                    }
                }
                h.trying = Some(acq);
            }
        }
        // The property: at most one holder counts on the slot now.
        let holding: Vec<(usize, u64)> = hs
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.holds.map(|(t, _)| (i, t)))
            .collect();
        assert!(holding.len() <= 1, "two holders at {now} ms: {holding:?}");
        if let Some(&(i, t)) = holding.first() {
            match tenures.last() {
                Some(&(j, u)) if j == i && u == t => {}
                Some(&(_, u)) => {
                    assert!(t > u, "token went from {u} to {t} at {now} ms");
                    tenures.push((i, t));
                    handovers += 1;
                }
                None => tenures.push((i, t)),
            }
        }
        // macula.fence.check: any majority of the authorities judges every superseded
        // holder's token stale (a store that checks refuses its late writes).
        if let Some(&(_, newest)) = tenures.last() {
            for pair in [[0, 1], [0, 2], [1, 2]] {
                let answers: Vec<u64> = pair
                    .iter()
                    .map(|&j| match auths[j].handle(&fence(), now).0 {
                        Reply::Fence {
                            promised: Some(p), ..
                        } => p,
                        r => panic!("{r:?}"),
                    })
                    .collect();
                for &(_, old) in &tenures[..tenures.len() - 1] {
                    let verdict = fence_verdict(old, &answers, 3);
                    assert_eq!(
                        verdict.map(|v| v.0),
                        Some(false),
                        "token {old} judged current after {newest} at {now} ms"
                    );
                }
            }
        }
    }
    handovers
}

fn fence() -> Request {
    Request::Fence {
        slot: SLOT.into(),
        holder: "checker".into(),
    }
}

#[test]
fn a_fence_check_needs_a_majority_and_knows_the_current_token() {
    let mut auths: Vec<Authority> = (0..3)
        .map(|_| Authority::new(TERM, Some(BTreeMap::new()), 0))
        .collect();
    let acquire = |h: &str, t: u64| Request::Acquire {
        slot: SLOT.into(),
        holder: h.into(),
        token: t,
        seq: 1,
    };
    let promised = |a: &mut Authority, now| match a.handle(&fence(), now).0 {
        Reply::Fence {
            promised: Some(p), ..
        } => p,
        r => panic!("{r:?}"),
    };
    // Nothing held yet: no token is current.
    assert_eq!(fence_verdict(1, &[0, 0], 3), Some((false, 0)));
    for a in auths.iter_mut() {
        a.handle(&acquire("h1", 1), 0);
    }
    let answers: Vec<u64> = auths.iter_mut().map(|a| promised(a, 10)).collect();
    assert_eq!(fence_verdict(1, &answers[..2], 3), Some((true, 1)));
    assert_eq!(
        fence_verdict(1, &answers[..1], 3),
        None,
        "one of three is no majority"
    );
    assert_eq!(
        fence_verdict(7, &answers[..2], 3),
        Some((false, 1)),
        "never granted"
    );
    // h1's lease lapses; h2 takes it with token 2 at two authorities.
    for a in auths.iter_mut().take(2) {
        a.handle(&acquire("h2", 2), TERM + 10);
    }
    // Whichever majority answers, token 1 is stale and 2 is current.
    for pair in [[0, 1], [0, 2], [1, 2]] {
        let answers: Vec<u64> = pair
            .iter()
            .map(|&j| promised(&mut auths[j], TERM + 20))
            .collect();
        assert_eq!(fence_verdict(1, &answers, 3), Some((false, 2)), "{pair:?}");
        assert_eq!(fence_verdict(2, &answers, 3), Some((true, 2)), "{pair:?}");
    }
    // An authority that lost its promises abstains from answering for a term.
    let mut fresh = Authority::new(TERM, None, 5_000);
    assert!(matches!(
        fresh.handle(&fence(), 5_010).0,
        Reply::Fence { promised: None, .. }
    ));
    assert_eq!(fresh.slots(), 0, "a fence check keeps nothing");
}

#[test]
fn leases_change_hands_on_a_calm_network() {
    // Holders compete; the slot is held and changes hands only when a holder stops renewing.
    let handovers: usize = (0..20).map(|s| simulate(s, 3, 0.0, 20, false)).sum();
    assert_eq!(handovers, 0, "a holder on a calm network keeps renewing");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn no_two_holders_and_tokens_only_grow(
        seed: u64,
        holders in 2usize..5,
        loss in 0.0f64..0.4,
        max_delay in 0u64..400,
        partitions: bool,
    ) {
        simulate(seed, holders, loss, max_delay, partitions);
    }
}

#[test]
fn under_loss_the_slot_still_changes_hands_safely() {
    // With loss and partitions renewals fail, so holders lose the slot and others take it: the
    // properties are exercised, not vacuous.
    let handovers: usize = (0..30).map(|s| simulate(s, 4, 0.3, 300, true)).sum();
    assert!(
        handovers > 10,
        "only {handovers} handovers: the test would not catch much"
    );
}

/// A holder that may also run provisionally (a `duplicate_tolerant` payload).
#[derive(Default)]
struct Tolerant {
    known: u64,
    trying: Option<Acquisition>,
    holds: Option<(u64, u64)>,
    provisional: Option<u64>,
    asking: Option<ProvisionalAsk>,
}

/// Splits the nodes in two now and then (holders and authorities each on side 0 or 1; links
/// across the sides cut), heals, and checks at every step: at most one regular holder, and at
/// most one extra (provisional) holder when `tolerant`, none otherwise. After the last heal
/// the extras go.
fn simulate_splits(seed: u64, tolerant: bool) -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let auth_ids: Vec<NodeId> = vec!["a0".into(), "a1".into(), "a2".into()];
    let mut auths: Vec<Authority> = (0..3)
        .map(|_| Authority::new(TERM, Some(BTreeMap::new()), 0))
        .collect();
    let holders = 4;
    let mut hs: Vec<Tolerant> = (0..holders).map(|_| Tolerant::default()).collect();
    // Side of each holder and authority while split; None when whole.
    let mut split: Option<(Vec<u8>, Vec<u8>, u64)> = None;
    // Splits are apart by two terms (the bound is per split: an extra replica of one split
    // lasts up to a term after it heals).
    let mut quiet_until = 0;
    // (deliver at, from, to, a request to an authority or an answer to a holder)
    type InFlight = (u64, usize, usize, Option<Request>, Option<Reply>, u64);
    let mut net: Vec<InFlight> = vec![];
    let mut max_extra = 0;
    let end = 40_000;
    let last_heal = 30_000;
    for now in (0..end).step_by(10) {
        if split.is_none() && now >= quiet_until && now < last_heal - 5_000 && rng.gen_bool(0.002) {
            let hs_side: Vec<u8> = (0..holders).map(|_| rng.gen_range(0..2)).collect();
            let as_side: Vec<u8> = (0..3).map(|_| rng.gen_range(0..2)).collect();
            split = Some((hs_side, as_side, now + rng.gen_range(2_000..5_000)));
        }
        if split.as_ref().is_some_and(|s| s.2 <= now) {
            split = None;
            quiet_until = now + 2 * TERM;
        }
        let linked = |h: usize, a: usize| split.as_ref().is_none_or(|(hs, as_, _)| hs[h] == as_[a]);
        let (due, later): (Vec<_>, Vec<_>) = net.drain(..).partition(|m| m.0 <= now);
        net = later;
        for (_, from, to, req, reply, attempt) in due {
            if let Some(req) = req {
                if !linked(from, to) {
                    continue;
                }
                let (r, _) = auths[to].handle(&req, now);
                if linked(from, to) {
                    net.push((now + rng.gen_range(0..50), to, from, None, Some(r), attempt));
                }
            } else if let Some(r) = reply {
                let h = &mut hs[to];
                if let Some(ask) = h.asking.as_mut().filter(|a| a.started_ms() == attempt) {
                    if matches!(r, Reply::GrantedProvisional { .. })
                        || matches!(&r, Reply::Refused { .. }) && h.trying.is_none()
                    {
                        ask.on_reply(&r);
                        continue;
                    }
                }
                if let Reply::GrantedProvisional { .. } = r {
                    continue;
                }
                if let Some(acq) = h.trying.as_mut().filter(|a| a.started_ms() == attempt) {
                    match acq.on_reply(&r) {
                        Outcome::Held {
                            token,
                            valid_until_ms,
                            ..
                        } => {
                            h.holds = Some((token, valid_until_ms));
                            h.provisional = None;
                            h.known = h.known.max(token);
                            h.trying = None;
                        }
                        Outcome::Lost { retry_above, .. } => {
                            h.known = h.known.max(retry_above);
                            h.trying = None;
                        }
                        Outcome::Pending => {}
                    }
                }
            }
        }
        for (i, h) in hs.iter_mut().enumerate() {
            if h.holds.is_some_and(|(_, u)| u <= now) {
                h.holds = None;
            }
            if h.provisional.is_some_and(|u| u <= now) {
                h.provisional = None;
            }
            // A provisional ask is decided when its answers had time to come.
            if h.asking
                .as_ref()
                .is_some_and(|a| now - a.started_ms() > 300)
            {
                let ask = h.asking.take().unwrap();
                if let Some(until) = ask.decide(TERM, MARGIN) {
                    h.provisional = Some(until);
                }
            }
            // An attempt that timed out without a majority and without being told the slot is
            // held: no majority was reachable. A tolerant payload then asks for a provisional
            // lease (and renews it the same way).
            if let Some(acq) = &h.trying {
                if acq.expired(now) || (now - acq_sent(acq, now)) > 300 {
                    let unreachable = !acq.majority_answered();
                    h.trying = None;
                    if tolerant && unreachable && h.holds.is_none() && h.asking.is_none() {
                        let (ask, reqs) =
                            ProvisionalAsk::start(SLOT, &format!("h{i}"), &auth_ids, now);
                        for (j, (_, req)) in reqs.into_iter().enumerate() {
                            if linked(i, j) {
                                net.push((now + rng.gen_range(0..50), i, j, Some(req), None, now));
                            }
                        }
                        h.asking = Some(ask);
                    }
                }
            }
            let renew = h.holds.is_some_and(|(_, u)| u - now < TERM / 3);
            let want = h.holds.is_none() && rng.gen_bool(0.05);
            if h.trying.is_none() && h.asking.is_none() && (renew || want) {
                let token = match h.holds {
                    Some((t, _)) if renew => t,
                    _ => h.known + 1,
                };
                let (acq, reqs) = Acquisition::start(
                    SLOT,
                    &format!("h{i}"),
                    token,
                    1,
                    &auth_ids,
                    now,
                    TERM,
                    MARGIN,
                );
                for (j, (_, req)) in reqs.into_iter().enumerate() {
                    if linked(i, j) {
                        net.push((now + rng.gen_range(0..50), i, j, Some(req), None, now));
                    }
                }
                h.trying = Some(acq);
            }
        }
        let regular = hs.iter().filter(|h| h.holds.is_some()).count();
        let extra = hs
            .iter()
            .filter(|h| h.holds.is_none() && h.provisional.is_some())
            .count();
        assert!(regular <= 1, "{regular} regular holders at {now} ms");
        if !tolerant {
            assert_eq!(
                extra, 0,
                "a payload that is not duplicate-tolerant never runs twice"
            );
        }
        assert!(
            regular + extra <= 2,
            "{regular} + {extra} holders at {now} ms: more than one extra (split: {split:?})"
        );
        max_extra = max_extra.max(extra);
        if now > last_heal + 3 * TERM {
            assert_eq!(
                extra, 0,
                "after the heal, the extra replica went ({now} ms)"
            );
        }
    }
    max_extra
}

/// When an acquisition started (the holder's record of it; the attempt gives up after 300 ms).
fn acq_sent(acq: &Acquisition, now: u64) -> u64 {
    acq.started_ms().min(now)
}

#[test]
fn a_split_in_two_runs_at_most_one_extra_replica_and_only_when_tolerated() {
    let extras: usize = (0..100).map(|s| simulate_splits(s, true)).sum();
    assert!(
        extras > 0,
        "some split ran an extra replica: the bound is exercised"
    );
    for s in 0..40 {
        simulate_splits(s, false);
    }
}

fn run(holder: &str, token: u64, seq: u64) -> Completion {
    Completion {
        seq,
        holder: holder.into(),
        token,
        ok: true,
    }
}

#[test]
fn a_run_is_accepted_only_under_the_running_grant_and_every_later_grant_names_it() {
    let mut a = Authority::new(TERM, Some(BTreeMap::new()), 0);
    let acquire = |h: &str, t: u64, seq: u64| Request::Acquire {
        slot: SLOT.into(),
        holder: h.into(),
        token: t,
        seq,
    };
    let complete = |h: &str, t: u64, r: Completion| Request::Complete {
        slot: SLOT.into(),
        holder: h.into(),
        token: t,
        run: r,
    };
    let not_held = Reply::NotCompleted {
        slot: SLOT.into(),
        why: Refusal::NotHeld,
    };
    // Nothing granted: nothing accepted.
    assert_eq!(a.handle(&complete("n1", 1, run("n1", 1, 1)), 0).0, not_held);
    assert!(matches!(
        a.handle(&acquire("n1", 1, 1), 0).0,
        Reply::Granted { accepted: None, .. }
    ));
    // Another holder, or another token, is not n1's grant.
    assert_eq!(
        a.handle(&complete("n2", 1, run("n2", 1, 1)), 10).0,
        not_held
    );
    assert_eq!(
        a.handle(&complete("n1", 2, run("n1", 2, 1)), 10).0,
        not_held
    );
    // Once the grant ended, the run is too late.
    assert_eq!(
        a.handle(&complete("n1", 1, run("n1", 1, 1)), TERM + 1).0,
        not_held
    );
    assert!(matches!(
        a.handle(&acquire("n2", 2, 1), TERM + 1).0,
        Reply::Granted { .. }
    ));
    let (r, persist) = a.handle(&complete("n2", 2, run("n2", 2, 1)), TERM + 10);
    assert_eq!(r, Reply::Completed { slot: SLOT.into() });
    assert_eq!(
        persist.and_then(|p| p.done),
        Some((run("n2", 2, 1), 2)),
        "persisted"
    );
    // Asked again (the answer was lost): still yes, and nothing new to persist.
    assert_eq!(
        a.handle(&complete("n2", 2, run("n2", 2, 1)), TERM + 20),
        (Reply::Completed { slot: SLOT.into() }, None)
    );
    assert_eq!(a.accepted(SLOT), Some(&run("n2", 2, 1)));
    // A later holder is granted the slot and told which run was accepted, under which token.
    let (r, _) = a.handle(&acquire("n3", 3, 1), 3 * TERM);
    assert_eq!(
        r,
        Reply::Granted {
            slot: SLOT.into(),
            token: 3,
            accepted: Some((run("n2", 2, 1), 2)),
        }
    );
    // It has that run accepted under its own token.
    let (_, persist) = a.handle(&complete("n3", 3, run("n2", 2, 1)), 3 * TERM + 10);
    assert_eq!(persist.and_then(|p| p.done), Some((run("n2", 2, 1), 3)));
    // A node with an older record of the job is told of the newer one; a newer record starts
    // afresh.
    assert!(matches!(
        a.handle(&acquire("n4", 9, 0), 5 * TERM).0,
        Reply::Refused {
            why: Refusal::Done(_),
            ..
        }
    ));
    assert!(matches!(
        a.handle(&acquire("n4", 9, 2), 5 * TERM).0,
        Reply::Granted { accepted: None, .. }
    ));
    assert_eq!(a.accepted(SLOT), None);
}

#[test]
fn a_holder_adopts_the_run_accepted_under_the_highest_token() {
    let auths: Vec<NodeId> = vec!["a".into(), "b".into(), "c".into()];
    let (mut acq, _) = Acquisition::start(SLOT, "n9", 9, 1, &auths, 0, TERM, MARGIN);
    let granted = |accepted| Reply::Granted {
        slot: SLOT.into(),
        token: 9,
        accepted,
    };
    assert_eq!(
        acq.on_reply(&granted(Some((run("n1", 1, 1), 4)))),
        Outcome::Pending
    );
    assert_eq!(
        acq.on_reply(&granted(Some((run("n2", 5, 1), 5)))),
        Outcome::Held {
            token: 9,
            valid_until_ms: TERM - MARGIN,
            accepted: Some(run("n2", 5, 1)),
        }
    );
}

/// A job's run in the simulation: holds the slot's lease, ends after a while, asks for it to
/// be accepted (or for the run a grant named).
#[derive(Default)]
struct Runner {
    known: u64,
    trying: Option<Acquisition>,
    holds: Option<(u64, u64)>,
    /// When its own run ends (holder's clock).
    ends_at: u64,
    /// A run a grant named (it does not run its own then).
    adopted: Option<Completion>,
    asking: Option<Completing>,
    counted: Option<Completion>,
}

/// Job runs compete for one completion slot under loss, delay and partitions. Returns the run
/// that counted, if any; panics if two different runs counted.
fn simulate_job(seed: u64, runners: usize, loss: f64, max_delay: u64) -> Option<Completion> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let auth_ids: Vec<NodeId> = vec!["a0".into(), "a1".into(), "a2".into()];
    let mut auths: Vec<Authority> = (0..3)
        .map(|_| Authority::new(TERM, Some(BTreeMap::new()), 0))
        .collect();
    let mut rs: Vec<Runner> = (0..runners).map(|_| Runner::default()).collect();
    let mut net: Vec<Msg> = vec![];
    let mut cut = vec![vec![0u64; 3]; runners];
    let mut counted: Option<Completion> = None;
    for now in (0..30_000).step_by(10) {
        // Calm for the last third, so that a run can count.
        let calm = now > 20_000;
        if !calm && rng.gen_bool(0.01) {
            let (i, j) = (rng.gen_range(0..runners), rng.gen_range(0..3));
            cut[i][j] = now + rng.gen_range(100..3_000);
        }
        let lost = |rng: &mut rand::rngs::StdRng| !calm && rng.gen_bool(loss);
        let (due, later): (Vec<Msg>, Vec<Msg>) = net.drain(..).partition(|m| m.at <= now);
        net = later;
        for m in due {
            if let Some(req) = m.req {
                let (reply, _) = auths[m.to].handle(&req, now);
                if cut[m.from][m.to] <= now && !lost(&mut rng) {
                    let at = now + rng.gen_range(0..=max_delay);
                    net.push(Msg {
                        at,
                        attempt: m.attempt,
                        from: m.to,
                        to: m.from,
                        req: None,
                        reply: Some(reply),
                    });
                }
                continue;
            }
            let Some(reply) = m.reply else { continue };
            let r = &mut rs[m.to];
            if matches!(reply, Reply::Completed { .. } | Reply::NotCompleted { .. }) {
                let Some(c) = r.asking.as_mut().filter(|c| c.started_ms() == m.attempt) else {
                    continue;
                };
                match c.on_reply(&reply) {
                    Counted::Yes => {
                        let run = c.run.clone();
                        if let Some(earlier) = &counted {
                            assert_eq!(earlier, &run, "two runs counted (seed {seed})");
                        }
                        counted = Some(run.clone());
                        r.counted = Some(run);
                        r.asking = None;
                    }
                    Counted::No => r.asking = None,
                    Counted::Pending => {}
                }
            } else if let Some(acq) = r.trying.as_mut().filter(|a| a.started_ms() == m.attempt) {
                match acq.on_reply(&reply) {
                    Outcome::Held {
                        token,
                        valid_until_ms,
                        accepted,
                    } => {
                        if r.holds.is_none() {
                            r.ends_at = now + rng.gen_range(50..2_000);
                        }
                        r.holds = Some((token, valid_until_ms));
                        r.known = r.known.max(token);
                        r.trying = None;
                        if let Some(run) = accepted {
                            r.adopted = Some(run);
                        }
                    }
                    Outcome::Lost { retry_above, .. } => {
                        r.known = r.known.max(retry_above);
                        r.trying = None;
                    }
                    Outcome::Pending => {}
                }
            }
        }
        for (i, r) in rs.iter_mut().enumerate() {
            if r.counted.is_some() {
                continue;
            }
            if r.holds.is_some_and(|(_, until)| until <= now) {
                r.holds = None;
                r.asking = None;
            }
            if r.trying.as_ref().is_some_and(|a| a.expired(now)) {
                r.trying = None;
            }
            let mut send = |reqs: Vec<(NodeId, Request)>, rng: &mut rand::rngs::StdRng| {
                for (j, (_, req)) in reqs.into_iter().enumerate() {
                    if cut[i][j] <= now && !lost(rng) {
                        let at = now + rng.gen_range(0..=max_delay);
                        net.push(Msg {
                            at,
                            attempt: now,
                            from: i,
                            to: j,
                            req: Some(req),
                            reply: None,
                        });
                    }
                }
            };
            // A holder whose run ended (or that adopted one) asks for it to be accepted, again
            // when the last ask went unanswered.
            if let Some((token, _)) = r.holds {
                let me = format!("h{i}");
                let ready = r
                    .adopted
                    .clone()
                    .or_else(|| (now >= r.ends_at).then(|| run(&me, token, 1)));
                let stale = r.asking.as_ref().is_none_or(|c| now > c.started_ms() + 300);
                if let (Some(run), true) = (ready, stale) {
                    let (c, reqs) = Completing::start(SLOT, &me, token, run, &auth_ids, now);
                    send(reqs, &mut rng);
                    r.asking = Some(c);
                }
            }
            let renew = r.holds.is_some_and(|(_, until)| until - now < TERM / 3);
            let want = r.holds.is_none() && rng.gen_bool(0.02);
            if r.trying.is_none() && (renew || want) {
                let token = match r.holds {
                    Some((t, _)) if renew => t,
                    _ => r.known + 1,
                };
                let (acq, reqs) = Acquisition::start(
                    SLOT,
                    &format!("h{i}"),
                    token,
                    1,
                    &auth_ids,
                    now,
                    TERM,
                    MARGIN,
                );
                send(reqs, &mut rng);
                r.trying = Some(acq);
            }
        }
    }
    counted
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn of_the_runs_of_a_completion_one_counts(
        seed: u64,
        runners in 2usize..5,
        loss in 0.0f64..0.4,
        max_delay in 0u64..300,
    ) {
        simulate_job(seed, runners, loss, max_delay);
    }
}

#[test]
fn a_completion_counts_once_the_network_calms() {
    // Not vacuous, and never stuck: each schedule ends with its one counted run.
    for s in 0..30 {
        assert!(
            simulate_job(s, 3, 0.3, 200).is_some(),
            "seed {s}: no run counted"
        );
    }
}
