//! Which peers this node keeps mesh links to, and redialling them when lost.

use super::*;

/// Which peers this node exchanges frames with. A connection alone (Kademlia's, for a lookup)
/// carries no mesh stream and closes when idle; a *wanted* peer gets a mesh stream and is
/// redialled when lost. Wanted: bootstrap nodes, the other providers of realms this node serves,
/// and peers that opened a mesh stream to us. So a node is linked to its bootstrap nodes (over
/// which realm states flood) and to its realms' nodes, not to every node its lookups touched.
#[derive(Default)]
pub(crate) struct Links {
    pub(crate) wanted: HashSet<PeerId>,
    /// Dials whose connection should become a link (bootstrap addresses, without a peer id yet).
    pub(crate) dialing: HashSet<libp2p::swarm::ConnectionId>,
    /// Lost wanted peers: next attempt, backoff, lost since. Forgotten after ten minutes.
    pub(crate) lost: HashMap<PeerId, (Instant, Duration, Instant)>,
    /// Each connected peer's connections and when each was established.
    pub(crate) conns: HashMap<PeerId, Vec<(libp2p::swarm::ConnectionId, Instant)>>,
}

impl Links {
    pub(crate) fn dial(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        opts: DialOpts,
    ) -> Result<(), libp2p::swarm::DialError> {
        let id = opts.connection_id();
        swarm.dial(opts)?;
        self.dialing.insert(id);
        Ok(())
    }

    pub(crate) fn want(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        shared: &Arc<Shared>,
        cmd: &mpsc::UnboundedSender<Cmd>,
    ) {
        if !self.wanted.contains(&peer) && self.wanted.len() >= MAX_WANTED {
            return;
        }
        self.wanted.insert(peer);
        if swarm.is_connected(&peer) {
            start_writer(peer, shared, cmd);
            return;
        }
        // Until it connects it is retried like a lost peer, and forgotten after ten minutes if
        // it never does (a provider record of a node long gone, or a name a peer made up).
        let now = Instant::now();
        self.lost.entry(peer).or_insert((
            now + Duration::from_millis(250),
            Duration::from_millis(250),
            now,
        ));
        if let Err(libp2p::swarm::DialError::NoAddresses) =
            swarm.dial(DialOpts::peer_id(peer).build())
        {
            // A provider record names a peer, not its address; one outside our routing table
            // is found by looking it up, which connects to it (and then links, being wanted).
            swarm.behaviour_mut().kad.get_closest_peers(peer);
        }
    }

    pub(crate) fn established(
        &mut self,
        peer: PeerId,
        conn: libp2p::swarm::ConnectionId,
        shared: &Arc<Shared>,
        cmd: &mpsc::UnboundedSender<Cmd>,
    ) {
        self.lost.remove(&peer);
        self.conns
            .entry(peer)
            .or_default()
            .push((conn, Instant::now()));
        if self.dialing.remove(&conn) {
            self.wanted.insert(peer);
        }
        if self.wanted.contains(&peer) {
            start_writer(peer, shared, cmd);
        }
    }

    /// A connection to `peer` closed.
    pub(crate) fn closed(&mut self, peer: PeerId, conn: libp2p::swarm::ConnectionId) {
        if let Some(c) = self.conns.get_mut(&peer) {
            c.retain(|(id, _)| *id != conn);
            if c.is_empty() {
                self.conns.remove(&peer);
            }
        }
    }

    /// The connections to `peer` established before `since`.
    pub(crate) fn older(&self, peer: PeerId, since: Instant) -> Vec<libp2p::swarm::ConnectionId> {
        self.conns.get(&peer).map_or(vec![], |c| {
            c.iter()
                .filter(|(_, at)| *at < since)
                .map(|(id, _)| *id)
                .collect()
        })
    }

    pub(crate) fn lost(&mut self, peer: PeerId) {
        if self.wanted.contains(&peer) {
            let now = Instant::now();
            self.lost
                .insert(peer, (now, Duration::from_millis(250), now));
        }
    }

    /// Redials lost wanted peers whose backoff has passed (so that a partition heals by itself).
    pub(crate) fn redial(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        let mut redial = vec![];
        let mut forget = vec![];
        self.lost.retain(|p, (next, backoff, since)| {
            if now.duration_since(*since) > Duration::from_secs(600) {
                forget.push(*p);
                return false;
            }
            if *next <= now {
                redial.push(*p);
                *backoff = (*backoff * 2).min(Duration::from_secs(30));
                *next = now + *backoff;
            }
            true
        });
        for p in forget {
            self.wanted.remove(&p);
        }
        for p in redial {
            if !swarm.is_connected(&p) {
                let _ = swarm.dial(p);
            }
        }
    }
}
