//! A realm's end of the link to one peer node: forwards publications and calls (after the
//! proof of the session they come from) and replies.

#[allow(unused_imports)]
use super::*;

/// A realm's end of the link to one peer node.
#[derive(Clone)]
pub struct LinkPeer {
    pub(crate) peer: PeerId,
    pub(crate) realm: Arc<str>,
    pub(crate) mesh: MeshHandle,
    /// Per peer, the (realm, session)s whose key's public form this node sent it
    /// ([`Frame::Session`]); shared by the node's links.
    pub(crate) announced: Arc<Mutex<HashMap<PeerId, crate::mesh::proven::Recent<()>>>>,
}

/// The originating session as the frame header carries it.
pub(crate) fn origin(i: &macula_router::SessionInfo) -> (u64, &str, &str) {
    (i.id, i.authid.as_str(), i.authrole.as_str())
}

impl Peer for LinkPeer {
    fn send(&self, msg: Arc<Message>) {
        self.reply(&msg)
    }

    fn forward(&self, f: Forwarded<'_>) {
        LinkPeer::forward(self, f)
    }
}

impl LinkPeer {
    /// Writes the frame straight into one buffer: header, then the MessagePack WAMP message.
    pub(crate) fn send_routed(&self, kind: Routed, origin: (u64, &str, &str), msg: &Message) {
        let mut out = Vec::with_capacity(128);
        encode_routed(&mut out, kind, &self.realm, origin, |out| {
            Serializer::MsgPack.encode_into(msg, out)
        });
        self.mesh.send_encoded(&self.peer, Bytes::from(out));
    }

    pub(crate) fn reply(&self, msg: &Message) {
        self.send_routed(Routed::Reply, (0, "", ""), msg);
    }

    pub(crate) fn forward(&self, f: Forwarded<'_>) {
        let (Forwarded::Publication { origin: o, .. } | Forwarded::Call { origin: o, .. }) = &f;
        crate::mesh::proven::send_proof(
            &self.announced,
            &self.mesh,
            &self.peer,
            &self.realm,
            o.id,
            o.proof.as_ref(),
        );
        match f {
            Forwarded::Publication {
                publication,
                topic,
                options,
                payload,
                origin: o,
            } => self.send_routed(
                Routed::Publish,
                origin(o),
                &Message::Publish {
                    request: publication,
                    options: options.clone(),
                    topic: topic.to_owned(),
                    payload: payload.clone(),
                },
            ),
            Forwarded::Call {
                invocation,
                procedure,
                options,
                payload,
                origin: o,
            } => self.send_routed(
                Routed::Call,
                origin(o),
                &Message::Call {
                    request: invocation,
                    options,
                    procedure: procedure.to_owned(),
                    payload,
                },
            ),
        }
    }
}
