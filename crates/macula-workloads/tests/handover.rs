//! A slot's authorities change hands while its lease is held and contested: nodes join and
//! leave, see the realm differently, move the slot's configuration at once from different
//! views, and are split by partitions. At no moment do two nodes count on holding the slot,
//! and every new holder's token is above every earlier one.

use std::collections::BTreeMap;

use macula_workloads::lease::*;
use rand::{Rng, SeedableRng};

const TERM: u64 = 1_000;
const MARGIN: u64 = 50;
const SLOT: &str = "com.example.app/api/0";
const NODES: usize = 6;

fn id(i: usize) -> NodeId {
    format!("n{i}")
}

fn target(view: &[bool]) -> Vec<NodeId> {
    let nodes: Vec<NodeId> = (0..NODES).filter(|i| view[*i]).map(id).collect();
    authorities(SLOT, &nodes, AUTHORITIES)
        .into_iter()
        .cloned()
        .collect()
}

/// One node: an authority, a would-be holder and a mover.
struct Node {
    auth: Authority,
    alive: bool,
    /// The nodes it counts as the realm's (where it computes the slot's target from).
    view: Vec<bool>,
    /// The slot's configuration as it knows it.
    cfg: Cfg,
    known: u64,
    trying: Option<Acquisition>,
    holds: Option<(u64, u64)>,
    moving: Option<Moving>,
    round: u64,
}

enum Body {
    Ask(Ask),
    Reply(Answer),
}

struct Msg {
    at: u64,
    from: usize,
    to: usize,
    body: Body,
}

/// What a run did: holders that followed one another, and moves chosen.
#[derive(Debug, Default)]
struct Run {
    handovers: usize,
    moves: usize,
    held_ms: u64,
    final_epoch: u64,
}

#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// Nodes join one by one, each seen by the others at different times.
    Joins,
    /// Authorities die one at a time; the others notice at different times.
    Leaves,
    /// The realm splits in two sides that see only themselves (no grace), then heals.
    Partitions,
    /// All of it, with messages lost and late.
    Storm,
}

fn simulate(seed: u64, scenario: Scenario) -> Run {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let first: Vec<bool> = (0..NODES)
        .map(|i| match scenario {
            Scenario::Joins => i < 3,
            _ => true,
        })
        .collect();
    let genesis = Cfg {
        epoch: 1,
        set: target(&first),
    };
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| {
            let mut auth = Authority::new(TERM, Some(BTreeMap::new()), 0);
            if genesis.has(&id(i)) {
                auth.adopt(SLOT, genesis.clone());
            }
            Node {
                auth,
                alive: true,
                view: first.clone(),
                cfg: genesis.clone(),
                known: 0,
                trying: None,
                holds: None,
                moving: None,
                round: 0,
            }
        })
        .collect();
    let (loss, max_delay) = match scenario {
        Scenario::Storm => (0.1, 150),
        _ => (0.0, 30),
    };
    // side[i]: which side of a partition node i is on; messages cross only within a side.
    let mut side = [0u8; NODES];
    let mut split_until = 0u64;
    // View changes still to come: (when, node, about, in).
    let mut changes: Vec<(u64, usize, usize, bool)> = vec![];
    let mut deaths: Vec<(u64, usize)> = vec![];
    match scenario {
        Scenario::Joins => {
            for (k, joiner) in (3..NODES).enumerate() {
                let t = 2_000 + k as u64 * 4_000;
                for (n, _) in nodes.iter().enumerate() {
                    changes.push((t + rng.gen_range(0..1_500), n, joiner, true));
                }
            }
        }
        Scenario::Leaves | Scenario::Storm => {
            for k in 0..2 {
                let t = 3_000 + k as u64 * 8_000;
                let dead = genesis.set[k].trim_start_matches('n').parse().unwrap();
                deaths.push((t, dead));
                for n in 0..NODES {
                    changes.push((t + rng.gen_range(200..2_500), n, dead, false));
                }
            }
        }
        Scenario::Partitions => {}
    }
    let mut net: Vec<Msg> = vec![];
    let mut tenures: Vec<(usize, u64)> = vec![];
    let mut run = Run::default();
    let send = |net: &mut Vec<Msg>, rng: &mut rand::rngs::StdRng, from, to, body, now| {
        if !rng.gen_bool(loss) {
            net.push(Msg {
                at: now + rng.gen_range(0..=max_delay),
                from,
                to,
                body,
            });
        }
    };
    for now in (0..40_000u64).step_by(10) {
        // The world changes.
        for &(t, n, about, is_in) in &changes {
            if t / 10 == now / 10 {
                nodes[n].view[about] = is_in;
            }
        }
        for &(t, dead) in &deaths {
            if t / 10 == now / 10 {
                nodes[dead].alive = false;
                nodes[dead].holds = None;
            }
        }
        let partitioned = matches!(scenario, Scenario::Partitions | Scenario::Storm);
        if partitioned && split_until == 0 && now < 28_000 && rng.gen_bool(0.002) {
            // A split: each side sees only itself at once (a grace of nothing).
            for s in side.iter_mut() {
                *s = rng.gen_range(0..2);
            }
            split_until = now + rng.gen_range(2_000..6_000);
            for n in 0..NODES {
                for m in 0..NODES {
                    nodes[n].view[m] = side[n] == side[m] && nodes[m].alive;
                }
            }
        } else if split_until != 0 && now >= split_until {
            side = [0; NODES];
            split_until = 0;
            for n in 0..NODES {
                for m in 0..NODES {
                    let gone = deaths.iter().any(|&(t, d)| d == m && t <= now);
                    nodes[n].view[m] = !gone || nodes[m].alive;
                }
            }
        }
        // Deliver what is due (never across a split, never to the dead).
        let (due, later): (Vec<Msg>, Vec<Msg>) = net.drain(..).partition(|m| m.at <= now);
        net = later;
        for m in due {
            if side[m.from] != side[m.to] || !nodes[m.to].alive {
                continue;
            }
            match m.body {
                Body::Ask(ask) => {
                    let (reply, _) = nodes[m.to].auth.ask(&ask, now);
                    let answer = Answer { id: ask.id, reply };
                    send(&mut net, &mut rng, m.to, m.from, Body::Reply(answer), now);
                }
                Body::Reply(Answer { id: attempt, reply }) => {
                    let me = &mut nodes[m.to];
                    let from = id(m.from);
                    if let Some(mv) = me.moving.as_mut().filter(|m| m.started_ms() == attempt) {
                        let (st, out) = mv.on_reply(&from, &reply);
                        for (to, req) in out {
                            let to: usize = to.trim_start_matches('n').parse().unwrap();
                            let ask = Ask {
                                cfg: None,
                                id: attempt,
                                req,
                            };
                            send(&mut net, &mut rng, m.to, to, Body::Ask(ask), now);
                        }
                        match st {
                            Moved::Done(next) => {
                                run.moves += 1;
                                if std::env::var("TRACE").is_ok() {
                                    eprintln!("{now}: n{} moved to {next:?}", m.to);
                                }
                                if next.epoch > me.cfg.epoch {
                                    me.cfg = next;
                                }
                                me.moving = None;
                            }
                            Moved::Failed { newer, outbid } => {
                                if let Some(c) = newer.filter(|c| c.epoch > me.cfg.epoch) {
                                    me.cfg = c;
                                }
                                if let Some(b) = outbid {
                                    me.round = me.round.max(b.0);
                                }
                                me.moving = None;
                            }
                            Moved::Pending => {}
                        }
                        continue;
                    }
                    let Some(acq) = me.trying.as_mut().filter(|a| a.started_ms() == attempt) else {
                        continue;
                    };
                    if !acq.authorities().contains(&from) {
                        continue;
                    }
                    match acq.on_reply(&reply) {
                        Outcome::Held {
                            token,
                            valid_until_ms,
                            ..
                        } => {
                            me.holds = Some((token, valid_until_ms));
                            me.known = me.known.max(token);
                            me.trying = None;
                        }
                        Outcome::Lost { retry_above, .. } => {
                            me.known = me.known.max(retry_above);
                            if let Some(c) = acq.newer().filter(|c| c.epoch > me.cfg.epoch) {
                                me.cfg = c.clone();
                            }
                            me.trying = None;
                        }
                        Outcome::Pending => {}
                    }
                }
            }
        }
        for (i, me) in nodes.iter_mut().enumerate() {
            if !me.alive {
                continue;
            }
            if me.holds.is_some_and(|(_, until)| until <= now) {
                me.holds = None;
            }
            if me.trying.as_ref().is_some_and(|a| a.expired(now)) {
                me.trying = None;
            }
            if me
                .moving
                .as_ref()
                .is_some_and(|m| now > m.started_ms() + 400)
            {
                if let Some(Moved::Failed { newer, outbid }) = me.moving.take().map(|m| m.failed())
                {
                    if let Some(c) = newer.filter(|c| c.epoch > me.cfg.epoch) {
                        me.cfg = c;
                    }
                    if let Some(b) = outbid {
                        me.round = me.round.max(b.0);
                    }
                }
            }
            // What its own authority serves is the newest it knows.
            if let Some(c) = me.auth.newest(SLOT).filter(|c| c.epoch > me.cfg.epoch) {
                me.cfg = c;
            }
            // A member moves the configuration to its target, now and then (so that moves from
            // different views race).
            let tgt = target(&me.view);
            if me.moving.is_none() && me.trying.is_none() && rng.gen_bool(0.05) {
                if let Some((c, frozen)) = me
                    .auth
                    .member_of(SLOT)
                    .map(|c| (c.clone(), me.auth.active(SLOT).is_none()))
                {
                    if frozen || !c.same_nodes(&tgt) {
                        me.round += 1;
                        if std::env::var("TRACE").is_ok() {
                            eprintln!("{now}: n{i} moves {c:?} to {tgt:?} round {}", me.round);
                        }
                        let state = me.auth.handover(SLOT, now);
                        let (mv, out) = Moving::start(SLOT, &id(i), &c, &tgt, me.round, state, now);
                        me.moving = Some(mv);
                        for (to, req) in out {
                            let to: usize = to.trim_start_matches('n').parse().unwrap();
                            let ask = Ask {
                                cfg: None,
                                id: now,
                                req,
                            };
                            send(&mut net, &mut rng, i, to, Body::Ask(ask), now);
                        }
                        continue;
                    }
                }
            }
            // Renew at a third of the term left; otherwise now and then try to take the slot.
            let renew = me.holds.is_some_and(|(_, until)| until - now < TERM / 3);
            let want = me.holds.is_none() && rng.gen_bool(0.02);
            if me.trying.is_none() && me.moving.is_none() && (renew || want) {
                let token = match me.holds {
                    Some((t, _)) if renew => t,
                    _ => me.known + 1,
                };
                let (acq, reqs) =
                    Acquisition::start(SLOT, &id(i), token, 1, &me.cfg.set, now, TERM, MARGIN);
                let cfg = Some(me.cfg.clone());
                me.trying = Some(acq);
                for (to, req) in reqs {
                    let to: usize = to.trim_start_matches('n').parse().unwrap();
                    let ask = Ask {
                        cfg: cfg.clone(),
                        id: now,
                        req,
                    };
                    send(&mut net, &mut rng, i, to, Body::Ask(ask), now);
                }
            }
        }
        // The property: at most one live node counts on the slot now, and tokens only grow.
        let holding: Vec<(usize, u64)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .filter_map(|(i, n)| n.holds.map(|(t, _)| (i, t)))
            .collect();
        assert!(
            holding.len() <= 1,
            "{scenario:?} seed {seed}: two holders at {now} ms: {holding:?}"
        );
        if let Some(&(i, t)) = holding.first() {
            run.held_ms += 10;
            match tenures.last() {
                Some(&(j, u)) if j == i && u == t => {}
                Some(&(_, u)) => {
                    assert!(
                        t > u,
                        "{scenario:?} seed {seed}: token went from {u} to {t} at {now} ms"
                    );
                    tenures.push((i, t));
                    run.handovers += 1;
                }
                None => tenures.push((i, t)),
            }
        }
    }
    run.final_epoch = nodes
        .iter()
        .filter(|n| n.alive)
        .filter_map(|n| n.auth.active(SLOT).map(|c| c.epoch))
        .max()
        .unwrap_or(0);
    // Once the world is calm, the slot's authorities are its target, as every live node sees it.
    if !matches!(scenario, Scenario::Storm) {
        let views: Vec<Vec<NodeId>> = nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| target(&n.view))
            .collect();
        let tgt = &views[0];
        assert!(views.iter().all(|v| v == tgt), "views settled");
        let serving: Vec<NodeId> = (0..NODES)
            .filter(|i| nodes[*i].alive && nodes[*i].auth.active(SLOT).is_some())
            .map(id)
            .collect();
        let newest = nodes
            .iter()
            .filter(|n| n.alive)
            .filter_map(|n| n.auth.active(SLOT).cloned())
            .max_by_key(|c| c.epoch)
            .unwrap_or_else(|| {
                panic!(
                    "{scenario:?} seed {seed}: no configuration served: {:?}",
                    nodes
                        .iter()
                        .map(|n| (n.alive, n.auth.promises().get(SLOT).cloned()))
                        .collect::<Vec<_>>()
                )
            });
        assert!(
            newest.same_nodes(tgt),
            "{scenario:?} seed {seed}: the configuration {newest:?} reached the target {tgt:?} (served by {serving:?})"
        );
    }
    run
}

fn runs(scenario: Scenario, seeds: std::ops::Range<u64>) -> Vec<Run> {
    seeds.map(|s| simulate(s, scenario)).collect()
}

#[test]
fn joins_move_the_authorities_with_the_lease_held_throughout() {
    let r = runs(Scenario::Joins, 0..30);
    assert!(r.iter().all(|r| r.moves > 0), "{r:?}");
    // The slot stayed held most of the time, and moves did not hand it around much.
    let held: u64 = r.iter().map(|r| r.held_ms).sum::<u64>() / r.len() as u64;
    assert!(held > 30_000, "held {held} ms of 40 s on average: {r:?}");
}

#[test]
fn authorities_that_die_leave_the_set_through_the_rest() {
    let r = runs(Scenario::Leaves, 0..30);
    assert!(r.iter().all(|r| r.moves >= 2), "{r:?}");
    assert!(r.iter().all(|r| r.final_epoch >= 3), "{r:?}");
}

#[test]
fn a_split_with_no_grace_never_runs_the_slot_twice() {
    let r = runs(Scenario::Partitions, 0..40);
    assert!(r.iter().map(|r| r.moves).sum::<usize>() > 0, "{r:?}");
    assert!(r.iter().all(|r| r.held_ms > 10_000), "{r:?}");
}

#[test]
fn loss_delay_deaths_and_splits_together_never_run_the_slot_twice() {
    let r = runs(Scenario::Storm, 0..40);
    assert!(r.iter().map(|r| r.handovers).sum::<usize>() > 0, "{r:?}");
}

#[test]
fn two_movers_choose_one_successor() {
    // Three members; two of them move at once to different targets.
    let c = Cfg {
        epoch: 1,
        set: vec!["a".into(), "b".into(), "c".into()],
    };
    let mut auths: BTreeMap<String, Authority> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                Authority::new(TERM, Some(BTreeMap::new()), 0),
            )
        })
        .collect();
    for n in &c.set {
        auths.get_mut(n).unwrap().adopt(SLOT, c.clone());
    }
    // a's holder grant is running at a and b.
    for n in ["a", "b"] {
        let ask = Ask {
            cfg: Some(c.clone()),
            id: 0,
            req: Request::Acquire {
                slot: SLOT.into(),
                holder: "h".into(),
                token: 4,
                seq: 1,
            },
        };
        assert!(matches!(
            auths.get_mut(n).unwrap().ask(&ask, 0).0,
            Reply::Granted { token: 4, .. }
        ));
    }
    let to_d: Vec<NodeId> = vec!["a".into(), "b".into(), "d".into()];
    let to_e: Vec<NodeId> = vec!["a".into(), "c".into(), "e".into()];
    let (mut m1, p1) = Moving::start(SLOT, "a", &c, &to_d, 1, Handover::default(), 10);
    let (mut m2, p2) = Moving::start(SLOT, "c", &c, &to_e, 2, Handover::default(), 10);
    let deliver = |auths: &mut BTreeMap<String, Authority>, to: &str, req: Request| {
        auths
            .get_mut(to)
            .unwrap()
            .ask(
                &Ask {
                    cfg: None,
                    id: 0,
                    req,
                },
                20,
            )
            .0
    };
    // m1 prepares a and b; m2 (higher ballot) prepares b and c.
    let p1: BTreeMap<_, _> = p1.into_iter().collect();
    let p2: BTreeMap<_, _> = p2.into_iter().collect();
    let mut props1 = vec![];
    for n in ["a", "b"] {
        let r = deliver(&mut auths, n, p1[n].clone());
        let (st, out) = m1.on_reply(n, &r);
        assert_eq!(st, Moved::Pending);
        props1.extend(out);
    }
    assert_eq!(props1.len(), 3, "m1 proposes after a majority promised");
    let mut props2 = vec![];
    for n in ["b", "c"] {
        let r = deliver(&mut auths, n, p2[n].clone());
        props2.extend(m2.on_reply(n, &r).1);
    }
    // m1's proposal is refused at b (it promised m2's higher ballot): m1 cannot finish.
    let mut st1 = Moved::Pending;
    for (n, req) in props1 {
        let r = deliver(&mut auths, &n, req);
        let (s, _) = m1.on_reply(&n, &r);
        if s != Moved::Pending {
            st1 = s;
        }
    }
    assert!(
        matches!(st1, Moved::Failed { .. } | Moved::Pending),
        "{st1:?}"
    );
    // a accepted m1's target under ballot 1; m2 saw b and c only, so it proposes its own.
    let mut installs = vec![];
    for (n, req) in props2 {
        let r = deliver(&mut auths, &n, req);
        installs.extend(m2.on_reply(&n, &r).1);
    }
    assert_eq!(
        installs.len(),
        3,
        "chosen: its members are told to take it on"
    );
    let mut st2 = Moved::Pending;
    let mut told = vec![];
    for (n, req) in installs {
        let r = deliver(&mut auths, &n, req);
        let (s, out) = m2.on_reply(&n, &r);
        if s != Moved::Pending {
            st2 = s;
            told = out;
        }
    }
    let Moved::Done(next) = st2 else {
        panic!("{st2:?}")
    };
    assert_eq!(next.set, to_e);
    assert_eq!(next.epoch, 2);
    assert_eq!(told.len(), 1, "b, left behind, is told where the slot went");
    for (n, req) in told {
        deliver(&mut auths, &n, req);
    }
    assert_eq!(auths["b"].newest(SLOT), Some(next.clone()));
    // The old configuration grants nothing any more, anywhere.
    for n in ["a", "b", "c"] {
        let ask = Ask {
            cfg: Some(c.clone()),
            id: 0,
            req: Request::Acquire {
                slot: SLOT.into(),
                holder: "x".into(),
                token: 9,
                seq: 1,
            },
        };
        let r = auths.get_mut(n).unwrap().ask(&ask, 5_000).0;
        assert!(
            matches!(
                r,
                Reply::Refused {
                    why: Refusal::Config(_),
                    ..
                }
            ),
            "{n}: {r:?}"
        );
    }
    // The new one blocks other holders while h's grant runs and lets h renew with its token;
    // later holders start above it.
    let ask = |holder: &str, token| Ask {
        cfg: Some(next.clone()),
        id: 0,
        req: Request::Acquire {
            slot: SLOT.into(),
            holder: holder.into(),
            token,
            seq: 1,
        },
    };
    let e = auths.get_mut("e").unwrap();
    assert!(matches!(
        e.ask(&ask("x", 9), 100).0,
        Reply::Refused {
            why: Refusal::Held { .. },
            ..
        }
    ));
    assert!(matches!(e.ask(&ask("h", 4), 100).0, Reply::Granted { .. }));
    assert!(matches!(
        e.ask(&ask("x", 3), 5_000).0,
        Reply::Refused {
            why: Refusal::Stale { promised: 4 },
            ..
        }
    ));
}

#[test]
fn what_a_member_keeps_is_bounded_and_it_never_goes_back_to_a_first_configuration() {
    let c = Cfg {
        epoch: 1,
        set: vec!["a".into(), "b".into(), "c".into()],
    };
    let next = Cfg {
        epoch: 2,
        set: vec!["a".into(), "b".into(), "d".into()],
    };
    let mut a = Authority::new(TERM, Some(BTreeMap::new()), 0);
    let ask = |req| Ask {
        cfg: None,
        id: 0,
        req,
    };
    // A release of a slot it keeps nothing of keeps nothing.
    a.ask(
        &ask(Request::Release {
            slot: SLOT.into(),
            holder: "h".into(),
            token: 1,
        }),
        0,
    );
    assert_eq!(a.slots(), 0);
    // So does a proposal without a prepare.
    let r = a
        .ask(
            &ask(Request::Propose {
                slot: SLOT.into(),
                holder: "m".into(),
                cfg: c.clone(),
                ballot: (1, "m".into()),
                next: next.clone(),
            }),
            0,
        )
        .0;
    assert!(
        matches!(
            r,
            Reply::Refused {
                why: Refusal::Config(None),
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!(a.slots(), 0);
    // A member that was down during a move and hears only where the slot went keeps that, and
    // does not take the slot's first configuration on afterwards.
    a.ask(
        &ask(Request::Moved {
            slot: SLOT.into(),
            holder: "m".into(),
            from: c.clone(),
            to: next.clone(),
        }),
        0,
    );
    assert_eq!(a.newest(SLOT), Some(next.clone()));
    assert!(a.adopt(SLOT, c.clone()).is_none());
    assert!(a.member_of(SLOT).is_none());
    // Configurations and node ids of absurd size are refused before anything is kept.
    let huge = Ask {
        cfg: Some(Cfg {
            epoch: 1,
            set: (0..1000).map(|i| format!("n{i}")).collect(),
        }),
        id: 0,
        req: Request::Fence {
            slot: SLOT.into(),
            holder: "h".into(),
        },
    };
    assert!(!huge.sane());
    let long = Ask {
        cfg: Some(c.clone()),
        id: 0,
        req: Request::Fence {
            slot: SLOT.into(),
            holder: "x".repeat(MAX_NODE_ID + 1),
        },
    };
    assert!(!long.sane());
    assert!(Ask {
        cfg: Some(c.clone()),
        id: 0,
        req: Request::Fence {
            slot: SLOT.into(),
            holder: "h".into(),
        },
    }
    .sane());
}

#[test]
fn a_member_that_missed_a_move_stops_serving_once_told_of_a_later_configuration() {
    let c = Cfg {
        epoch: 1,
        set: vec!["a".into(), "b".into(), "c".into()],
    };
    let later = Cfg {
        epoch: 3,
        set: vec!["d".into(), "e".into(), "f".into()],
    };
    let mut a = Authority::new(TERM, Some(BTreeMap::new()), 0);
    a.adopt(SLOT, c.clone());
    assert_eq!(a.active(SLOT), Some(&c));
    assert!(a.superseded(SLOT, 1, &later).is_some());
    assert!(
        a.active(SLOT).is_none(),
        "it grants nothing under the old one"
    );
    assert!(a.member_of(SLOT).is_none(), "it does not move it again");
    assert_eq!(a.newest(SLOT), Some(later));
    // A first configuration that turned out not to be the slot's (its record lost to another
    // of the same sequence) is abandoned: nothing more is granted under it.
    let mut b = Authority::new(TERM, Some(BTreeMap::new()), 0);
    b.adopt(SLOT, c.clone());
    assert!(b.abandon(SLOT, &c).is_some());
    let r = b
        .ask(
            &Ask {
                cfg: Some(c.clone()),
                id: 0,
                req: Request::Acquire {
                    slot: SLOT.into(),
                    holder: "h".into(),
                    token: 1,
                    seq: 1,
                },
            },
            0,
        )
        .0;
    assert!(
        matches!(
            r,
            Reply::Refused {
                why: Refusal::Config(_),
                ..
            }
        ),
        "{r:?}"
    );
}
