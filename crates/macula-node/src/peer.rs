//! Who a realm member is on this node: a client session (its outbox), or something the mesh
//! stands for (another node's end of a link, the node's own services). Below both the node and
//! the mesh: the node's realms hold members, the mesh makes the remote ones.

use std::sync::Arc;

use macula_router::{Forwarded, Peer};
use macula_wamp::Message;

use crate::outbox::SessionPeer;

/// A realm member (see the module's documentation).
pub enum NodePeer {
    Session(SessionPeer),
    /// Another node (a mesh link), or the node's own services (`macula.dht.*`, registered in
    /// every realm like a link so that calls reach them through the dealer with the usual ACL
    /// check). Made by `crate::mesh`.
    Mesh(Arc<dyn Peer>),
}

impl Peer for NodePeer {
    fn send(&self, msg: Arc<Message>) {
        match self {
            NodePeer::Session(s) => s.send(msg),
            NodePeer::Mesh(m) => m.send(msg),
        }
    }

    fn forward(&self, f: Forwarded<'_>) {
        match self {
            NodePeer::Mesh(m) => m.forward(f),
            NodePeer::Session(_) => {}
        }
    }
}
