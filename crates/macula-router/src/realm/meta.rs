//! The session meta API: `wamp.session.*` procedures and the meta events published on join and
//! leave.

use super::*;

impl<P: Peer> Realm<P> {
    pub(super) fn publish_meta(&mut self, topic: &str, args: List) {
        let publication = self.ids.next();
        self.deliver(
            topic,
            publication,
            Dict::new(),
            Payload::args(args),
            &Filter::default(),
            None,
        );
    }

    /// The session meta API procedures.
    pub(super) fn meta_call(&self, request: Id, procedure: &str, payload: &Payload) -> Message {
        let roles_filter: Option<Vec<String>> =
            payload.args.first().and_then(Value::as_list).map(|l| {
                l.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            });
        let selected = || {
            self.sessions.values().filter(|m| {
                !m.info.link
                    && roles_filter
                        .as_ref()
                        .is_none_or(|f| f.contains(&m.info.authrole))
            })
        };
        let result = |args: List| Message::Result {
            request,
            details: Dict::new(),
            payload: Payload::args(args),
        };
        match procedure {
            "wamp.session.count" => result(vec![Value::from(selected().count() as u64)]),
            "wamp.session.list" => {
                let mut ids: Vec<u64> = selected().map(|m| m.info.id).collect();
                ids.sort_unstable();
                result(vec![Value::List(
                    ids.into_iter().map(Value::from).collect(),
                )])
            }
            "wamp.session.get" => {
                let Some(id) = payload.args.first().and_then(Value::as_u64) else {
                    return error(
                        code::CALL,
                        request,
                        errors::INVALID_ARGUMENT,
                        "wamp.session.get takes a session id",
                    );
                };
                match self.sessions.get(&id).filter(|m| !m.info.link) {
                    Some(m) => result(vec![Value::Dict(session_details(&m.info))]),
                    None => error(
                        code::CALL,
                        request,
                        errors::NO_SUCH_SESSION,
                        format!("no session {id} in this realm"),
                    ),
                }
            }
            _ => error(
                code::CALL,
                request,
                errors::NO_SUCH_PROCEDURE,
                format!("no router procedure {procedure:?}"),
            ),
        }
    }
}

pub(super) fn session_details(info: &SessionInfo) -> Dict {
    dict! {
        "session" => info.id,
        "authid" => info.authid.as_str(),
        "authrole" => info.authrole.as_str(),
        "authmethod" => info.authmethod,
        "authprovider" => "macula",
        "transport" => info.transport.clone(),
    }
}
