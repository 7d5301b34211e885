//! The broker's index of subscriptions: who is subscribed to what, and which subscriptions match a topic.

use std::collections::HashMap;

use crate::ids::{IdMap, UriMap};

use macula_wamp::uri::MatchPolicy;
use macula_wamp::Id;

/// One subscription: a (URI, match policy) pair shared by all sessions subscribed to it, as the
/// spec requires (same topic and policy ⇒ same subscription id).
#[derive(Debug)]
pub struct Subscription {
    pub id: Id,
    pub uri: String,
    pub policy: MatchPolicy,
    pub subscribers: Vec<Id>,
}

/// All subscriptions of one realm.
#[derive(Debug, Default)]
pub struct Broker {
    subs: IdMap<Subscription>,
    /// Exact subscriptions by topic (looked up by `&str` on every publish, no allocation).
    exact: UriMap<Id>,
    /// Prefix and wildcard subscriptions by (policy, pattern).
    by_pattern: HashMap<(MatchPolicy, String), Id>,
    /// Prefix and wildcard subscriptions, scanned on every publish.
    patterns: Vec<Id>,
}

impl Broker {
    /// Adds `session` to the subscription for (`uri`, `policy`), creating it with `new_id` if needed.
    /// Returns the subscription id and whether the subscription was created.
    pub fn subscribe(
        &mut self,
        session: Id,
        uri: &str,
        policy: MatchPolicy,
        new_id: impl FnOnce() -> Id,
    ) -> (Id, bool) {
        if let Some(id) = self.find(policy, uri) {
            if let Some(s) = self.subs.get_mut(&id) {
                if !s.subscribers.contains(&session) {
                    s.subscribers.push(session);
                }
                return (id, false);
            }
        }
        let mut id = new_id();
        while self.subs.contains_key(&id) {
            id = id.wrapping_add(1).max(1);
        }
        self.subs.insert(
            id,
            Subscription {
                id,
                uri: uri.to_owned(),
                policy,
                subscribers: vec![session],
            },
        );
        if policy == MatchPolicy::Exact {
            self.exact.insert(uri.to_owned(), id);
        } else {
            self.by_pattern.insert((policy, uri.to_owned()), id);
            self.patterns.push(id);
        }
        (id, true)
    }

    /// Removes `session` from subscription `id`. Returns `None` if the session was not subscribed,
    /// `Some(true)` if the subscription is now gone.
    pub fn unsubscribe(&mut self, session: Id, id: Id) -> Option<bool> {
        let s = self.subs.get_mut(&id)?;
        let pos = s.subscribers.iter().position(|x| *x == session)?;
        s.subscribers.swap_remove(pos);
        if !s.subscribers.is_empty() {
            return Some(false);
        }
        if let Some(s) = self.subs.remove(&id) {
            if s.policy == MatchPolicy::Exact {
                self.exact.remove(&s.uri);
            } else {
                self.by_pattern.remove(&(s.policy, s.uri));
                self.patterns.retain(|p| *p != id);
            }
        }
        Some(true)
    }

    /// Calls `f` for every subscription matching `topic`.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a Subscription)) {
        if let Some(id) = self.exact.get(topic) {
            if let Some(s) = self.subs.get(id) {
                f(s);
            }
        }
        for id in &self.patterns {
            if let Some(s) = self.subs.get(id) {
                if s.policy.matches(&s.uri, topic) {
                    f(s);
                }
            }
        }
    }

    pub fn get(&self, id: Id) -> Option<&Subscription> {
        self.subs.get(&id)
    }

    /// Every subscription (for interest snapshots).
    pub fn iter(&self) -> impl Iterator<Item = &Subscription> {
        self.subs.values()
    }

    pub fn find(&self, policy: MatchPolicy, uri: &str) -> Option<Id> {
        match policy {
            MatchPolicy::Exact => self.exact.get(uri).copied(),
            _ => self.by_pattern.get(&(policy, uri.to_owned())).copied(),
        }
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }
}
