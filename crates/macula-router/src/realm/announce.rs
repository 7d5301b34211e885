//! What the node announces to other nodes: the interest and registrations its own sessions hold,
//! each named by the session that justifies it (see [`Announce`]).

use super::*;

/// A change in what this node's own sessions subscribe to or register, for the mesh to announce.
/// `by` names the session that holds it (the first of the node's sessions that do), so that the
/// receiving node can check that session's role; `None`: no session of this node holds it any
/// more. When the session named leaves and others still hold it, it is announced again, naming
/// one of them.
#[derive(Debug, Clone, PartialEq)]
pub enum Announce {
    Interest {
        uri: String,
        policy: MatchPolicy,
        by: Option<Holder>,
    },
    Registration {
        uri: String,
        policy: MatchPolicy,
        invoke: InvokePolicy,
        by: Option<Holder>,
    },
}

/// The session an [`Announce`] names.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub session: Id,
    pub role: String,
    /// The proof of the session's role (see [`SessionInfo::proof`]).
    pub proof: Option<Arc<crate::auth::SessionProof>>,
}

/// Receives [`Announce`]s with the realm name; called under the realm's lock, so it must only
/// enqueue.
pub type Announcer = Arc<dyn Fn(&str, Announce) + Send + Sync>;

impl<P: Peer> Realm<P> {
    /// Where changes of local interest and registrations are reported (the mesh).
    pub fn set_announcer(&mut self, a: Announcer) {
        self.announcer = Some(a);
    }

    pub(super) fn announce(&self, a: Announce) {
        if let Some(f) = &self.announcer {
            f(&self.name, a);
        }
    }

    /// The session of `members` that justifies the node's interest or registration to other
    /// nodes: the first of its own sessions that can prove its role, else the first of its own.
    pub(super) fn holder_of(&self, members: &[Id]) -> Option<Id> {
        let local = |x: &&Id| self.sessions.get(x).is_some_and(|m| !m.info.link);
        let proven = |x: &&Id| self.sessions.get(x).is_some_and(|m| m.info.proof.is_some());
        let mut own = members.iter().filter(local);
        own.clone().find(proven).or_else(|| own.next()).copied()
    }

    /// The session that justifies the node's interest in subscription `sub` (see
    /// [`Realm::holder_of`]).
    pub(super) fn first_local_subscriber(&self, sub: Id) -> Option<Id> {
        self.broker
            .get(sub)
            .and_then(|s| self.holder_of(&s.subscribers))
    }

    /// The session that justifies the node's registration `reg`.
    pub(super) fn first_local_callee(&self, reg: Id) -> Option<Id> {
        self.dealer
            .get(reg)
            .and_then(|r| self.holder_of(&r.callees))
    }

    pub(super) fn holder(&self, id: Id) -> Option<Holder> {
        self.sessions.get(&id).map(|m| Holder {
            session: id,
            role: m.info.authrole.clone(),
            proof: m.info.proof.clone(),
        })
    }

    /// What this node's own sessions subscribe to and register, as announcements (sent to a
    /// peer that just connected).
    pub fn local_interest(&self) -> Vec<Announce> {
        let mut out = vec![];
        for s in self.broker.iter() {
            if let Some(by) = self
                .first_local_subscriber(s.id)
                .and_then(|c| self.holder(c))
            {
                out.push(Announce::Interest {
                    uri: s.uri.clone(),
                    policy: s.policy,
                    by: Some(by),
                });
            }
        }
        for r in self.dealer.iter() {
            if let Some(by) = self.first_local_callee(r.id).and_then(|c| self.holder(c)) {
                out.push(Announce::Registration {
                    uri: r.uri.clone(),
                    policy: r.policy,
                    invoke: r.invoke,
                    by: Some(by),
                });
            }
        }
        out
    }

    /// Removes `session` from subscription `sub`, announcing when the session that justifies
    /// the node's interest in it changes (or none is left). `None` if the session was not
    /// subscribed.
    pub(super) fn drop_subscription(&mut self, session: Id, sub: Id) -> Option<()> {
        let (uri, policy) = self.broker.get(sub).map(|s| (s.uri.clone(), s.policy))?;
        let before = self.first_local_subscriber(sub);
        self.broker.unsubscribe(session, sub)?;
        if let Some(m) = self.sessions.get_mut(&session) {
            m.subscriptions.retain(|s| *s != sub);
        }
        let after = self.first_local_subscriber(sub);
        if before != after {
            self.announce(Announce::Interest {
                uri,
                policy,
                by: after.and_then(|a| self.holder(a)),
            });
        }
        Some(())
    }

    /// Removes `session` as a callee of `reg`, announcing when the session that justifies the
    /// node's registration changes (or none is left).
    pub(super) fn drop_registration(&mut self, session: Id, reg: Id) -> Option<()> {
        let (uri, policy, invoke) = self
            .dealer
            .get(reg)
            .map(|r| (r.uri.clone(), r.policy, r.invoke))?;
        let before = self.first_local_callee(reg);
        self.dealer.unregister(session, reg)?;
        if let Some(m) = self.sessions.get_mut(&session) {
            m.registrations.retain(|r| *r != reg);
        }
        let after = self.first_local_callee(reg);
        if before != after {
            self.announce(Announce::Registration {
                uri,
                policy,
                invoke,
                by: after.and_then(|a| self.holder(a)),
            });
        }
        Some(())
    }
}
