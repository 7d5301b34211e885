//! Remote procedure calls: REGISTER, CALL and its routing to a callee, CANCEL, YIELD and
//! invocation errors.

use super::*;

impl<P: Peer> Realm<P> {
    pub(super) fn on_register(&mut self, from: Id, request: Id, options: Dict, procedure: String) {
        let err = |uri: &str, msg: String| error(code::REGISTER, request, uri, msg);
        let Some(policy) = MatchPolicy::parse(options.get("match").and_then(Value::as_str)) else {
            return self.send(
                from,
                err(
                    errors::INVALID_ARGUMENT,
                    "match must be exact, prefix or wildcard".into(),
                ),
            );
        };
        let Some(invoke) = InvokePolicy::parse(options.get("invoke").and_then(Value::as_str))
        else {
            return self.send(
                from,
                err(
                    errors::INVALID_ARGUMENT,
                    "invoke must be single, roundrobin, random, first or last".into(),
                ),
            );
        };
        if let Err(e) = uri::validate_pattern(&procedure, policy) {
            return self.send(from, err(errors::INVALID_URI, e.to_string()));
        }
        if procedure.starts_with("wamp.") {
            return self.send(
                from,
                err(
                    errors::INVALID_URI,
                    format!("procedure {procedure:?} is reserved for the router"),
                ),
            );
        }
        let (role, held) = match self.sessions.get(&from) {
            Some(m) => (m.info.authrole.clone(), m.registrations.len()),
            None => return,
        };
        if held >= self.config.max_registrations_per_session {
            let msg = format!(
                "this session already holds {held} registrations (limits.max_registrations_per_session)"
            );
            return self.send(from, err(errors::LIMIT_EXCEEDED, msg));
        }
        if !self
            .policy
            .allows_pattern(&role, Action::Register, &procedure, policy)
        {
            let msg = self.denied(&role, Action::Register, &procedure);
            return self.send(from, err(errors::NOT_AUTHORIZED, msg));
        }
        let before = self
            .dealer
            .find(policy, &procedure)
            .and_then(|id| self.first_local_callee(id));
        let ids = &mut self.ids;
        match self.dealer.register(from, &procedure, policy, invoke, || ids.next()) {
            Ok(id) => {
                if let Some(m) = self.sessions.get_mut(&from) {
                    m.registrations.push(id);
                }
                self.send(from, Message::Registered { request, registration: id });
                let after = self.first_local_callee(id);
                if after != before {
                    self.announce(Announce::Registration {
                        uri: procedure,
                        policy,
                        invoke,
                        by: after.and_then(|a| self.holder(a)),
                    });
                }
            }
            Err(RegisterError::AlreadyExists) => self.send(
                from,
                err(errors::PROCEDURE_ALREADY_EXISTS, format!("procedure {procedure:?} is already registered")),
            ),
            Err(RegisterError::PolicyMismatch(existing)) => self.send(
                from,
                err(
                    errors::PROCEDURE_ALREADY_EXISTS,
                    format!("procedure {procedure:?} is registered with invoke={}; register with the same policy to share it", existing.as_str()),
                ),
            ),
        }
    }

    pub(super) fn on_call(
        &mut self,
        from: Id,
        request: Id,
        options: Dict,
        procedure: String,
        payload: Payload,
        now: Instant,
    ) {
        let err = |uri: &str, msg: String| error(code::CALL, request, uri, msg);
        if let Err(e) = uri::validate(&procedure) {
            return self.send(from, err(errors::INVALID_URI, e.to_string()));
        }
        let Some(info) = self.sessions.get(&from).map(|m| m.info.clone()) else {
            return;
        };
        if !self.policy.allows(&info.authrole, Action::Call, &procedure) {
            return self.send(
                from,
                err(
                    errors::NOT_AUTHORIZED,
                    self.denied(&info.authrole, Action::Call, &procedure),
                ),
            );
        }
        if procedure.starts_with("wamp.") {
            let reply = self.meta_call(request, &procedure, &payload);
            return self.send(from, reply);
        }
        let in_flight = self.dealer.calls_of(from);
        if in_flight >= self.config.max_calls_per_session {
            return self.send(
                from,
                err(
                    errors::LIMIT_EXCEEDED,
                    format!(
                        "this session has {in_flight} calls in flight, the most allowed \
                         (limits.max_calls_per_session); wait for answers before calling again"
                    ),
                ),
            );
        }
        self.dispatch_call(
            from, &info, request, options, procedure, payload, now, false,
        );
    }

    /// Routes an authorized call from `from` (a session, or a link for a call forwarded by another
    /// node, which may only reach local callees) to a callee: an INVOCATION to a local session,
    /// or a forwarded call through a link member.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dispatch_call(
        &mut self,
        from: Id,
        info: &SessionInfo,
        request: Id,
        options: Dict,
        procedure: String,
        payload: Payload,
        now: Instant,
        local_only: bool,
    ) {
        let err = |uri: &str, msg: String| error(code::CALL, request, uri, msg);
        let Some((reg_id, reg_uri, reg_policy)) = self
            .dealer
            .lookup(&procedure)
            .map(|r| (r.id, r.uri.clone(), r.policy))
        else {
            return self.send(
                from,
                err(
                    errors::NO_SUCH_PROCEDURE,
                    format!("no callee registered procedure {procedure:?}"),
                ),
            );
        };
        let random = self.ids.next();
        let sessions = &self.sessions;
        let Some(callee) = self.dealer.pick_callee(reg_id, random, |c| {
            !local_only || sessions.get(&c).is_some_and(|m| !m.info.link)
        }) else {
            return self.send(
                from,
                err(
                    errors::NO_SUCH_PROCEDURE,
                    format!("no callee registered procedure {procedure:?}"),
                ),
            );
        };
        let receive_progress = opt_bool(&options, "receive_progress").unwrap_or(false);
        let timeout = match options.get("timeout").and_then(Value::as_u64) {
            Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
            _ => self.config.default_call_timeout,
        };
        let disclose = opt_bool(&options, "disclose_me").unwrap_or(false);
        if self.dealer.by_caller(from, request).is_some() {
            // A client reusing a request id of a call still in flight is a protocol violation in
            // spirit; answering with an error keeps both calls unambiguous.
            return self.send(
                from,
                err(
                    errors::INVALID_ARGUMENT,
                    format!("request id {request} is already in use by a call in flight"),
                ),
            );
        }
        let inv = self.dealer.start_call(
            PendingCall {
                caller: from,
                caller_request: request,
                callee,
                receive_progress,
                killing: false,
            },
            // A timeout too large to represent is no deadline at all (never a panic on input).
            timeout.and_then(|t| now.checked_add(t)),
        );
        let Some(m) = self.sessions.get(&callee) else {
            return;
        };
        if m.info.link {
            let mut fwd = Dict::new();
            if let Some(t) = timeout {
                fwd.insert("timeout".into(), Value::from(t.as_millis() as u64));
            }
            if receive_progress {
                fwd.insert("receive_progress".into(), Value::Bool(true));
            }
            if disclose {
                fwd.insert("disclose_me".into(), Value::Bool(true));
            }
            m.peer.forward(Forwarded::Call {
                invocation: inv,
                procedure: &procedure,
                options: fwd,
                payload,
                origin: info,
            });
            return;
        }
        let mut details = Dict::new();
        if reg_policy != MatchPolicy::Exact || reg_uri != procedure {
            details.insert("procedure".into(), Value::Str(procedure));
        }
        if receive_progress {
            details.insert("receive_progress".into(), Value::Bool(true));
        }
        if disclose {
            details.insert("caller".into(), Value::from(info.id));
            details.insert("caller_authid".into(), Value::Str(info.authid.clone()));
            details.insert("caller_authrole".into(), Value::Str(info.authrole.clone()));
        }
        m.peer.send(Arc::new(Message::Invocation {
            request: inv,
            registration: reg_id,
            details,
            payload,
        }));
    }

    pub(super) fn on_cancel(&mut self, from: Id, request: Id, options: Dict) {
        let Some(mode) = CancelMode::parse(options.get("mode").and_then(Value::as_str)) else {
            return self.send(
                from,
                error(
                    code::CANCEL,
                    request,
                    errors::INVALID_ARGUMENT,
                    "mode must be skip, kill or killnowait",
                ),
            );
        };
        // Canceling a call that already finished is not an error: there is nothing left to do.
        let Some(inv) = self.dealer.by_caller(from, request) else {
            return;
        };
        let callee = match self.dealer.call(inv) {
            Some(c) => c.callee,
            None => return,
        };
        match mode {
            CancelMode::Skip => {
                self.dealer.finish(inv);
                self.send(from, canceled(request));
            }
            CancelMode::KillNoWait => {
                self.dealer.finish(inv);
                self.interrupt(callee, inv);
                self.send(from, canceled(request));
            }
            CancelMode::Kill => {
                let supports = self
                    .sessions
                    .get(&callee)
                    .is_some_and(|m| m.info.callee_cancel);
                if supports {
                    if let Some(c) = self.dealer.call_mut(inv) {
                        c.killing = true;
                    }
                    if let Some(m) = self.sessions.get(&callee) {
                        m.peer.send(Arc::new(Message::Interrupt {
                            request: inv,
                            options: dict! {"mode" => "kill"},
                        }));
                    }
                } else {
                    self.dealer.finish(inv);
                    self.send(from, canceled(request));
                }
            }
        }
    }

    /// The call a callee's answer (`what`: YIELD or ERROR) to invocation `inv` belongs to.
    /// `None` for a late answer to a call that was canceled or timed out (expected); an answer to
    /// an invocation that never existed is a protocol violation.
    fn answered(&self, from: Id, inv: Id, what: &str) -> Result<Option<PendingCall>, Message> {
        if let Some(call) = self.dealer.call(inv).filter(|c| c.callee == from) {
            return Ok(Some(call.clone()));
        }
        if self.dealer.was_issued(inv) {
            return Ok(None);
        }
        Err(crate::auth::abort(
            errors::PROTOCOL_VIOLATION,
            format!("{what} for unknown invocation {inv}"),
        ))
    }

    pub(super) fn on_yield(
        &mut self,
        from: Id,
        inv: Id,
        options: Dict,
        payload: Payload,
    ) -> Result<(), Message> {
        let progress = opt_bool(&options, "progress").unwrap_or(false);
        let Some(call) = self.answered(from, inv, "YIELD")? else {
            return Ok(());
        };
        if progress {
            if call.receive_progress && !call.killing {
                let details = dict! {"progress" => true};
                self.send(
                    call.caller,
                    Message::Result {
                        request: call.caller_request,
                        details,
                        payload,
                    },
                );
            }
            return Ok(());
        }
        self.dealer.finish(inv);
        if call.killing {
            self.send(
                call.caller,
                error(
                    code::CALL,
                    call.caller_request,
                    errors::CANCELED,
                    "the call was canceled",
                ),
            );
        } else {
            self.send(
                call.caller,
                Message::Result {
                    request: call.caller_request,
                    details: Dict::new(),
                    payload,
                },
            );
        }
        Ok(())
    }

    pub(super) fn on_invocation_error(
        &mut self,
        from: Id,
        inv: Id,
        details: Dict,
        uri: String,
        payload: Payload,
    ) -> Result<(), Message> {
        let Some(call) = self.answered(from, inv, "ERROR")? else {
            return Ok(());
        };
        self.dealer.finish(inv);
        let uri = if call.killing {
            errors::CANCELED.to_owned()
        } else {
            uri
        };
        self.send(
            call.caller,
            Message::Error {
                request_type: code::CALL,
                request: call.caller_request,
                details,
                error: uri,
                payload,
            },
        );
        Ok(())
    }
}

/// The ERROR a caller gets for its canceled call `request`.
fn canceled(request: Id) -> Message {
    error(
        code::CALL,
        request,
        errors::CANCELED,
        "the call was canceled",
    )
}
