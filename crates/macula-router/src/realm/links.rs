//! The mesh's side of a realm: link members stand for other nodes.

use super::*;

/// Why a forwarded message was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

/// The session on another node that a forwarded publication or call came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub session: Id,
    pub authid: String,
    pub authrole: String,
}

/// The mesh's side of a realm: link members stand for other nodes. A link subscribes for the
/// interest of its node's sessions, registers for its node's callees, and carries publications,
/// calls and their replies. Everything arriving through a link is checked against this node's
/// policy for the originating session's role.
impl<P: Peer> Realm<P> {
    /// Adds the link member for another node.
    pub fn join_link(&mut self, node: &str, peer: P) -> Id {
        let id = self.new_session_id();
        let info = SessionInfo {
            id,
            authid: node.to_owned(),
            authrole: "macula.link".into(),
            authmethod: "mesh",
            transport: Dict::new(),
            callee_cancel: true,
            link: true,
            proof: None,
        };
        self.join(info, peer);
        id
    }

    /// Whether `link` is a link and a session of `role` may do `action` on (`uri`, `policy`).
    fn link_may(
        &self,
        link: Id,
        role: &str,
        action: Action,
        uri: &str,
        policy: MatchPolicy,
    ) -> Result<(), LinkError> {
        uri::validate_pattern(uri, policy).map_err(|e| LinkError::Invalid(e.to_string()))?;
        if !self.is_link(link) {
            return Err(LinkError::Invalid("not a link".into()));
        }
        if !self.policy.allows_pattern(role, action, uri, policy) {
            return Err(LinkError::NotAuthorized(self.denied(role, action, uri)));
        }
        Ok(())
    }

    /// The linked node's sessions subscribed to (`uri`, `policy`), the one it names with `role`.
    pub fn link_subscribe(
        &mut self,
        link: Id,
        uri: &str,
        policy: MatchPolicy,
        role: &str,
    ) -> Result<(), LinkError> {
        self.link_may(link, role, Action::Subscribe, uri, policy)?;
        let ids = &mut self.ids;
        let (id, _) = self.broker.subscribe(link, uri, policy, || ids.next());
        if let Some(m) = self.sessions.get_mut(&link) {
            if !m.subscriptions.contains(&id) {
                m.subscriptions.push(id);
            }
        }
        Ok(())
    }

    /// The linked node no longer has sessions subscribed to (`uri`, `policy`).
    pub fn link_unsubscribe(&mut self, link: Id, uri: &str, policy: MatchPolicy) {
        if let Some(id) = self.broker.find(policy, uri) {
            self.drop_subscription(link, id);
        }
    }

    /// The linked node has a callee for (`uri`, `policy`) registered by a session of `role`.
    pub fn link_register(
        &mut self,
        link: Id,
        uri: &str,
        policy: MatchPolicy,
        invoke: InvokePolicy,
        role: &str,
    ) -> Result<(), LinkError> {
        self.link_may(link, role, Action::Register, uri, policy)?;
        let ids = &mut self.ids;
        match self
            .dealer
            .register(link, uri, policy, invoke, || ids.next())
        {
            Ok(id) => {
                if let Some(m) = self.sessions.get_mut(&link) {
                    m.registrations.push(id);
                }
                Ok(())
            }
            Err(_)
                if self
                    .dealer
                    .find(policy, uri)
                    .and_then(|id| self.dealer.get(id))
                    .is_some_and(|r| r.callees.contains(&link)) =>
            {
                Ok(())
            }
            Err(_) => Err(LinkError::Invalid(format!(
                "procedure {uri:?} is registered here with another invocation policy"
            ))),
        }
    }

    /// Registers an in-process service of the node (a link member that answers calls itself),
    /// outside the realm's policy: callers still need `rpc:call` permission for `uri`.
    pub fn service_register(&mut self, link: Id, uri: &str) {
        let ids = &mut self.ids;
        if let Ok(id) =
            self.dealer
                .register(link, uri, MatchPolicy::Exact, InvokePolicy::Single, || {
                    ids.next()
                })
        {
            if let Some(m) = self.sessions.get_mut(&link) {
                m.registrations.push(id);
            }
        }
    }

    /// The linked node no longer has a callee for (`uri`, `policy`).
    pub fn link_unregister(&mut self, link: Id, uri: &str, policy: MatchPolicy) {
        if let Some(id) = self.dealer.find(policy, uri) {
            self.drop_registration(link, id);
        }
    }

    /// A publication from a session of the linked node: delivered to this node's subscribers.
    pub fn link_publish(
        &mut self,
        origin: &Origin,
        publication: Id,
        options: &Dict,
        topic: &str,
        payload: Payload,
    ) -> Result<(), LinkError> {
        uri::validate(topic).map_err(|e| LinkError::Invalid(e.to_string()))?;
        if topic.starts_with("wamp.") {
            return Err(LinkError::Invalid(format!("topic {topic:?} is reserved")));
        }
        if !self.policy.allows(&origin.authrole, Action::Publish, topic) {
            return Err(LinkError::NotAuthorized(self.denied(
                &origin.authrole,
                Action::Publish,
                topic,
            )));
        }
        let filter = Filter::from_options(options, origin.session);
        let mut base = Dict::new();
        if opt_bool(options, "disclose_me").unwrap_or(false) {
            base.insert("publisher".into(), Value::from(origin.session));
            base.insert("publisher_authid".into(), Value::Str(origin.authid.clone()));
            base.insert(
                "publisher_authrole".into(),
                Value::Str(origin.authrole.clone()),
            );
        }
        self.deliver(topic, publication, base, payload, &filter, None);
        Ok(())
    }

    /// A call from a session of the linked node for a callee on this node. Refusals are also
    /// answered to the link (the remote caller gets the error).
    #[allow(clippy::too_many_arguments)]
    pub fn link_call(
        &mut self,
        link: Id,
        origin: &Origin,
        invocation: Id,
        options: Dict,
        procedure: String,
        payload: Payload,
        now: Instant,
    ) -> Result<(), LinkError> {
        let refuse = |realm: &Self, uri: &str, msg: String| {
            realm.send(link, error(code::CALL, invocation, uri, msg.clone()));
            msg
        };
        if !self.is_link(link) {
            return Err(LinkError::Invalid("not a link".into()));
        }
        if let Err(e) = uri::validate(&procedure) {
            return Err(LinkError::Invalid(refuse(
                self,
                errors::INVALID_URI,
                e.to_string(),
            )));
        }
        if procedure.starts_with("wamp.")
            || !self
                .policy
                .allows(&origin.authrole, Action::Call, &procedure)
        {
            let msg = self.denied(&origin.authrole, Action::Call, &procedure);
            return Err(LinkError::NotAuthorized(refuse(
                self,
                errors::NOT_AUTHORIZED,
                msg,
            )));
        }
        let info = SessionInfo {
            id: origin.session,
            authid: origin.authid.clone(),
            authrole: origin.authrole.clone(),
            authmethod: "mesh",
            transport: Dict::new(),
            callee_cancel: false,
            link: false,
            proof: None,
        };
        self.dispatch_call(
            link, &info, invocation, options, procedure, payload, now, true,
        );
        Ok(())
    }

    /// A RESULT, ERROR or INTERRUPT from the linked node about a forwarded call.
    pub fn link_reply(&mut self, link: Id, msg: Message) -> Result<(), LinkError> {
        if !self.is_link(link) {
            return Err(LinkError::Invalid("not a link".into()));
        }
        let r = match msg {
            Message::Result {
                request,
                details,
                payload,
            } => {
                let mut options = Dict::new();
                if opt_bool(&details, "progress").unwrap_or(false) {
                    options.insert("progress".into(), Value::Bool(true));
                }
                self.on_yield(link, request, options, payload)
            }
            Message::Error {
                request_type: code::CALL,
                request,
                details,
                error: uri,
                payload,
            } => self.on_invocation_error(link, request, details, uri, payload),
            Message::Interrupt { request, options } => {
                self.on_cancel(link, request, options);
                Ok(())
            }
            other => {
                return Err(LinkError::Invalid(format!(
                    "unexpected {} from a link",
                    other.kind()
                )))
            }
        };
        r.map_err(|_| LinkError::Invalid("reply for an unknown call".into()))
    }
}
