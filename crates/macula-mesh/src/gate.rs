//! Admission to Kademlia: certificates on every connection (`/macula/cert/1`), and the routing
//! table and record store open only to certified peers.

use super::*;

/// Kademlia requests kept per peer while its certificate has not arrived yet, and for how long.
pub(crate) const DEFERRED_PER_PEER: usize = 32;
pub(crate) const DEFERRED_PEERS: usize = 4096;
pub(crate) const DEFERRED_FOR: Duration = Duration::from_secs(10);

/// A Kademlia write that arrived before its sender's certificate.
pub(crate) enum Inbound {
    Record(kad::Record),
    Provider(kad::ProviderRecord),
}

impl Inbound {
    pub(crate) fn size(&self) -> usize {
        match self {
            Inbound::Record(r) => r.key.as_ref().len() + r.value.len() + 64,
            Inbound::Provider(r) => r.key.as_ref().len() + 64 * (r.addresses.len() + 1),
        }
    }
}

/// Bytes of writes held for certificates not arrived yet, over all peers.
pub(crate) const DEFERRED_BYTES: usize = 16 << 20;

/// A held write larger than this is refused at once (application values are at most
/// `mesh.dht_max_value`, 64 KiB by default).
pub(crate) const DEFERRED_MAX_WRITE: usize = 256 << 10;

/// A connection that has not presented a valid certificate within this is closed.
pub(crate) const CERT_WITHIN: Duration = Duration::from_secs(10);

/// Admission to Kademlia: the routing table and the record store take only certified peers.
#[derive(Default)]
pub(crate) struct KadGate {
    /// Writes from connected peers whose certificate has not arrived yet (bounded in count and
    /// bytes; dropped after [`DEFERRED_FOR`]).
    pub(crate) deferred: HashMap<PeerId, (Instant, Vec<Inbound>)>,
    pub(crate) deferred_bytes: usize,
    /// Addresses of connected peers (what they listen on, by identify, and the address of the
    /// connection), added to the routing table once they are certified.
    pub(crate) addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Connected peers and since when (a peer without a certificate by [`CERT_WITHIN`] is
    /// disconnected).
    pub(crate) since: HashMap<PeerId, Instant>,
    /// The certificate of every peer put in the routing table: an entry whose certificate
    /// expires or is revoked while the peer is not connected is removed too.
    pub(crate) table: HashMap<PeerId, cert::NodeCert>,
    pub(crate) last_prune: Option<Instant>,
}

impl KadGate {
    /// The peer's certificate, if it presented a valid one on this connection.
    pub(crate) fn valid_cert(shared: &Shared, peer: &PeerId) -> Option<cert::NodeCert> {
        let c = shared.certified.read().get(peer).copied()?;
        shared
            .trust
            .check_valid(peer, &c, cert::now_secs())
            .ok()
            .map(|_| c)
    }

    pub(crate) fn inbound(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        shared: &Shared,
        from: PeerId,
        mut w: Inbound,
    ) {
        // A provider record that names no address (a node announces only its external
        // addresses, and has none unless `mesh.announce` is set) is answered to lookups only if
        // the provider happens to be in the answering node's routing table: with more nodes than
        // a k-bucket holds, most lookups then missed most providers. Store the addresses the
        // provider is known by here.
        if let Inbound::Provider(r) = &mut w {
            if r.addresses.is_empty() {
                r.addresses = self.addrs.get(&from).cloned().unwrap_or_default();
            }
        }
        if Self::valid_cert(shared, &from).is_some() {
            store(swarm, w);
            return;
        }
        let size = w.size();
        let room = swarm.is_connected(&from)
            && size <= DEFERRED_MAX_WRITE
            && self.deferred_bytes + size <= DEFERRED_BYTES
            && (self.deferred.len() < DEFERRED_PEERS || self.deferred.contains_key(&from));
        let (_, q) = match room {
            true => self
                .deferred
                .entry(from)
                .or_insert_with(|| (Instant::now(), Vec::new())),
            false => {
                shared.stats.dht_refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if q.len() < DEFERRED_PER_PEER {
            q.push(w);
            self.deferred_bytes += size;
        } else {
            shared.stats.dht_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn addresses(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        shared: &Shared,
        peer: PeerId,
        a: Vec<Multiaddr>,
    ) {
        // Only for connected peers (an identify event can arrive after the connection closed).
        if !swarm.is_connected(&peer) {
            return;
        }
        let certified = Self::valid_cert(shared, &peer);
        let known = self.addrs.entry(peer).or_default();
        for a in a {
            if known.len() < 16 && !known.contains(&a) {
                known.push(a.clone());
                if let Some(c) = certified {
                    swarm.behaviour_mut().kad.add_address(&peer, a);
                    self.table.insert(peer, c);
                }
            }
        }
    }

    pub(crate) fn certified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        shared: &Shared,
        peer: PeerId,
    ) {
        // Checked again: a sweep may have cut the peer off since it was certified.
        let Some(c) = Self::valid_cert(shared, &peer) else {
            return;
        };
        for a in self.addrs.get(&peer).cloned().unwrap_or_default() {
            swarm.behaviour_mut().kad.add_address(&peer, a);
            self.table.insert(peer, c);
        }
        if let Some((_, q)) = self.deferred.remove(&peer) {
            for w in q {
                self.deferred_bytes -= w.size();
                store(swarm, w);
            }
        }
    }

    pub(crate) fn gone(&mut self, peer: &PeerId, shared: &Shared) {
        if let Some((_, q)) = self.deferred.remove(peer) {
            self.deferred_bytes -= q.iter().map(Inbound::size).sum::<usize>();
            shared.stats.dht_refused.fetch_add(1, Ordering::Relaxed);
        }
        self.addrs.remove(peer);
        self.since.remove(peer);
    }

    /// A revocation arrived: the peer leaves the routing table whether connected or not.
    pub(crate) fn revoked(&mut self, swarm: &mut Swarm<Behaviour>, shared: &Shared, peer: PeerId) {
        // Only if the revocation covers the certificate it was added with (a node the operator
        // admitted again after an old revocation stays).
        let covered = self
            .table
            .get(&peer)
            .is_none_or(|c| shared.trust.is_revoked(&peer, c));
        if covered {
            swarm.behaviour_mut().kad.remove_peer(&peer);
            self.table.remove(&peer);
        }
        self.sweep(swarm, shared, false);
    }

    /// Drops what waited too long, connections that never presented a certificate, and every
    /// peer (connected or only in the routing table) whose certificate stopped being valid.
    pub(crate) fn sweep(&mut self, swarm: &mut Swarm<Behaviour>, shared: &Shared, periodic: bool) {
        let now = Instant::now();
        let secs = cert::now_secs();
        if periodic {
            let mut dropped = 0;
            self.deferred.retain(|_, (since, q)| {
                let keep = now.duration_since(*since) < DEFERRED_FOR;
                if !keep {
                    dropped += q.iter().map(Inbound::size).sum::<usize>();
                    shared.stats.dht_refused.fetch_add(1, Ordering::Relaxed);
                }
                keep
            });
            self.deferred_bytes -= dropped;
            let silent: Vec<PeerId> = self
                .since
                .iter()
                .filter(|(p, t)| {
                    now.duration_since(**t) > CERT_WITHIN
                        && !shared.certified.read().contains_key(p)
                })
                .map(|(p, _)| *p)
                .collect();
            for p in silent {
                shared.stats.peers_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %p, "connection closed: no certificate presented");
                self.since.remove(&p);
                let _ = swarm.disconnect_peer_id(p);
            }
            // An entry whose certificate is no longer good leaves, unless the connected peer
            // has presented a good one since (a renewal).
            let stale: Vec<PeerId> = self
                .table
                .iter()
                .filter(|(p, c)| shared.trust.check_valid(p, c, secs).is_err())
                .map(|(p, _)| *p)
                .collect();
            for p in stale {
                match Self::valid_cert(shared, &p) {
                    Some(c) => {
                        self.table.insert(p, c);
                    }
                    None => {
                        self.table.remove(&p);
                        swarm.behaviour_mut().kad.remove_peer(&p);
                    }
                }
            }
            // Forget entries Kademlia itself evicted (bounded by the routing table's size).
            if self
                .last_prune
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(60))
            {
                self.last_prune = Some(now);
                let mut in_table = HashSet::new();
                for b in swarm.behaviour_mut().kad.kbuckets() {
                    for e in b.iter() {
                        in_table.insert(*e.node.key.preimage());
                    }
                }
                self.table.retain(|p, _| in_table.contains(p));
            }
        }
        let bad: Vec<PeerId> = shared
            .certified
            .read()
            .iter()
            .filter(|(p, c)| shared.trust.check_valid(p, c, secs).is_err())
            .map(|(p, _)| *p)
            .collect();
        for p in bad {
            tracing::warn!(peer = %p, "peer cut off: its mesh certificate expired or was revoked");
            shared.stats.peers_cut_off.fetch_add(1, Ordering::Relaxed);
            shared.certified.write().remove(&p);
            self.table.remove(&p);
            swarm.behaviour_mut().kad.remove_peer(&p);
            let _ = swarm.disconnect_peer_id(p);
        }
    }
}

pub(crate) fn store(swarm: &mut Swarm<Behaviour>, w: Inbound) {
    let store = swarm.behaviour_mut().kad.store_mut();
    let _ = match w {
        Inbound::Record(r) => kad::store::RecordStore::put(store, r),
        Inbound::Provider(r) => kad::store::RecordStore::add_provider(store, r),
    };
}

/// Presents this node's certificate on a new connection (`/macula/cert/1`).
pub(crate) async fn send_cert(mut control: libp2p_stream::Control, peer: PeerId, cert: Bytes) {
    let send = async {
        let mut s = control.open_stream(peer, CERT_PROTOCOL).await.ok()?;
        s.write_all(&(cert.len() as u32).to_be_bytes()).await.ok()?;
        s.write_all(&cert).await.ok()?;
        s.close().await.ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), send).await;
}

/// Reads the certificates peers present on new connections.
pub(crate) async fn accept_certs(
    mut incoming: libp2p_stream::IncomingStreams,
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let shared = shared.clone();
        let cmd = cmd.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let mut chunk = 0;
            let read = read_frame(&mut stream, &mut buf, &mut chunk, 256);
            // Nothing within the time: the 10 s sweep closes a connection without a certificate.
            if let Ok(Ok(c)) = tokio::time::timeout(CERT_WITHIN, read).await {
                presented(&shared, &cmd, peer, Some(&c));
            }
        });
    }
}
