//! Publish and subscribe: PUBLISH, delivery to subscribers (with publisher exclusion and
//! black/white listing), SUBSCRIBE.

use super::*;

impl<P: Peer> Realm<P> {
    pub(super) fn on_publish(
        &mut self,
        from: Id,
        request: Id,
        options: Dict,
        topic: String,
        payload: Payload,
    ) {
        let ack = opt_bool(&options, "acknowledge").unwrap_or(false);
        let reply_err = |realm: &Self, uri: &str, msg: String| {
            if ack {
                realm.send(from, error(code::PUBLISH, request, uri, msg));
            }
        };
        if let Err(e) = uri::validate(&topic) {
            return reply_err(self, errors::INVALID_URI, e.to_string());
        }
        if topic.starts_with("wamp.") {
            return reply_err(
                self,
                errors::INVALID_URI,
                format!("topic {topic:?} is reserved for the router"),
            );
        }
        let Some(me) = self.sessions.get(&from) else {
            return;
        };
        let info = me.info.clone();
        if !self.policy.allows(&info.authrole, Action::Publish, &topic) {
            return reply_err(
                self,
                errors::NOT_AUTHORIZED,
                self.denied(&info.authrole, Action::Publish, &topic),
            );
        }
        let publication = self.ids.next();
        let filter = Filter::from_options(&options, from);
        let disclose = opt_bool(&options, "disclose_me").unwrap_or(false);
        let mut base = Dict::new();
        if disclose {
            base.insert("publisher".into(), Value::from(from));
            base.insert("publisher_authid".into(), Value::Str(info.authid.clone()));
            base.insert(
                "publisher_authrole".into(),
                Value::Str(info.authrole.clone()),
            );
        }
        self.deliver(
            &topic,
            publication,
            base,
            payload,
            &filter,
            Some((&info, &options)),
        );
        if ack {
            self.send(
                from,
                Message::Published {
                    request,
                    publication,
                },
            );
        }
    }

    /// Sends an EVENT to every eligible subscriber of every subscription matching `topic`.
    /// The event is built once per subscription and shared by its subscribers. A publication of a
    /// local session (`origin`) is also forwarded once to every link member with matching
    /// interest; deliveries without an origin (meta events, publications from other nodes) stay
    /// on this node.
    pub(super) fn deliver(
        &self,
        topic: &str,
        publication: Id,
        base: Dict,
        payload: Payload,
        filter: &Filter,
        origin: Option<(&SessionInfo, &Dict)>,
    ) {
        let mut payload = Some(payload);
        let mut matches: Vec<(Id, bool, &[Id])> = Vec::new();
        self.broker.for_each_match(topic, |s| {
            matches.push((s.id, s.policy != MatchPolicy::Exact, &s.subscribers))
        });
        if let (Some((info, options)), true) = (origin, self.links > 0) {
            let mut links: Vec<Id> = vec![];
            for (_, _, subscribers) in &matches {
                for s in subscribers.iter() {
                    if self.is_link(*s) && !links.contains(s) {
                        links.push(*s);
                    }
                }
            }
            for l in links {
                if let (Some(m), Some(p)) = (self.sessions.get(&l), payload.as_ref()) {
                    m.peer.forward(Forwarded::Publication {
                        publication,
                        topic,
                        options,
                        payload: p,
                        origin: info,
                    });
                }
            }
        }
        let n = matches.len();
        for (i, (sub, pattern, subscribers)) in matches.into_iter().enumerate() {
            let mut details = base.clone();
            if pattern {
                details.insert("topic".into(), Value::Str(topic.to_owned()));
            }
            let p = if i + 1 == n {
                payload.take().unwrap_or_default()
            } else {
                payload.clone().unwrap_or_default()
            };
            let event = Arc::new(Message::Event {
                subscription: sub,
                publication,
                details,
                payload: p,
            });
            for s in subscribers {
                if let Some(m) = self.sessions.get(s) {
                    if !m.info.link && filter.admits(&m.info) {
                        m.peer.send(event.clone());
                    }
                }
            }
        }
    }

    pub(super) fn on_subscribe(&mut self, from: Id, request: Id, options: Dict, topic: String) {
        let Some(policy) = MatchPolicy::parse(options.get("match").and_then(Value::as_str)) else {
            return self.send(
                from,
                error(
                    code::SUBSCRIBE,
                    request,
                    errors::INVALID_ARGUMENT,
                    "match must be exact, prefix or wildcard",
                ),
            );
        };
        if let Err(e) = uri::validate_pattern(&topic, policy) {
            return self.send(
                from,
                error(code::SUBSCRIBE, request, errors::INVALID_URI, e.to_string()),
            );
        }
        let (role, held) = match self.sessions.get(&from) {
            Some(m) => (m.info.authrole.clone(), m.subscriptions.len()),
            None => return,
        };
        if held >= self.config.max_subscriptions_per_session {
            let msg = format!(
                "this session already holds {held} subscriptions (limits.max_subscriptions_per_session); unsubscribe or use a pattern"
            );
            return self.send(
                from,
                error(code::SUBSCRIBE, request, errors::LIMIT_EXCEEDED, msg),
            );
        }
        if !self
            .policy
            .allows_pattern(&role, Action::Subscribe, &topic, policy)
        {
            let msg = self.denied(&role, Action::Subscribe, &topic);
            return self.send(
                from,
                error(code::SUBSCRIBE, request, errors::NOT_AUTHORIZED, msg),
            );
        }
        let before = self
            .broker
            .find(policy, &topic)
            .and_then(|id| self.first_local_subscriber(id));
        let ids = &mut self.ids;
        let (id, _) = self.broker.subscribe(from, &topic, policy, || ids.next());
        if let Some(m) = self.sessions.get_mut(&from) {
            if !m.subscriptions.contains(&id) {
                m.subscriptions.push(id);
            }
        }
        // Announced when the node's first session subscribes, or when one that can prove its
        // role takes over from one that cannot.
        let after = self.first_local_subscriber(id);
        if after != before {
            self.announce(Announce::Interest {
                uri: topic,
                policy,
                by: after.and_then(|a| self.holder(a)),
            });
        }
        self.send(
            from,
            Message::Subscribed {
                request,
                subscription: id,
            },
        );
    }
}

/// Publisher exclusion and subscriber black/white listing of one publication.
#[derive(Default)]
pub(super) struct Filter {
    exclude_session: Option<Id>,
    exclude: Option<Vec<Id>>,
    eligible: Option<Vec<Id>>,
    exclude_authid: Option<Vec<String>>,
    eligible_authid: Option<Vec<String>>,
    exclude_authrole: Option<Vec<String>>,
    eligible_authrole: Option<Vec<String>>,
}

impl Filter {
    pub(super) fn from_options(o: &Dict, publisher: Id) -> Filter {
        Filter {
            exclude_session: if opt_bool(o, "exclude_me").unwrap_or(true) {
                Some(publisher)
            } else {
                None
            },
            exclude: id_list(o, "exclude"),
            eligible: id_list(o, "eligible"),
            exclude_authid: str_list(o, "exclude_authid"),
            eligible_authid: str_list(o, "eligible_authid"),
            exclude_authrole: str_list(o, "exclude_authrole"),
            eligible_authrole: str_list(o, "eligible_authrole"),
        }
    }

    pub(super) fn admits(&self, s: &SessionInfo) -> bool {
        if self.exclude_session == Some(s.id) {
            return false;
        }
        let has = |l: &Option<Vec<Id>>| l.as_ref().map(|l| l.contains(&s.id));
        let has_s = |l: &Option<Vec<String>>, v: &String| l.as_ref().map(|l| l.contains(v));
        has(&self.exclude) != Some(true)
            && has(&self.eligible) != Some(false)
            && has_s(&self.exclude_authid, &s.authid) != Some(true)
            && has_s(&self.eligible_authid, &s.authid) != Some(false)
            && has_s(&self.exclude_authrole, &s.authrole) != Some(true)
            && has_s(&self.eligible_authrole, &s.authrole) != Some(false)
    }
}
