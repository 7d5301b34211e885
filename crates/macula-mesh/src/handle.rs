//! The node's handle on the mesh: sending frames, links wanted, DHT records and lookups,
//! certificates and status.

use super::*;

impl MeshHandle {
    pub fn peer_id(&self) -> PeerId {
        self.shared.local
    }

    pub fn keypair(&self) -> &Keypair {
        &self.shared.keypair
    }

    /// This node's operator certificate.
    pub fn cert(&self) -> Bytes {
        self.shared.cert.read().0.clone()
    }

    /// This node's certificate's validity window.
    pub fn own_cert(&self) -> cert::NodeCert {
        self.shared.cert.read().1
    }

    /// Replaces this node's certificate (a renewal) and presents it to every linked peer.
    pub fn set_cert(&self, new: Vec<u8>) -> Result<cert::NodeCert, cert::CertError> {
        let c = self
            .shared
            .trust
            .check(&self.shared.local, &new, cert::now_secs())?;
        let bytes = Bytes::from(new);
        *self.shared.cert.write() = (bytes.clone(), c);
        self.broadcast(
            &Frame::Hello {
                version: frame::PROTOCOL_VERSION,
                cert: bytes,
            },
            None,
        );
        Ok(c)
    }

    pub fn operator(&self) -> &ed25519_dalek::VerifyingKey {
        self.shared.trust.operator()
    }

    pub fn trust(&self) -> &Arc<cert::Trust> {
        &self.shared.trust
    }

    /// Applies a verified revocation: peers it covers are disconnected at once. `true` if it
    /// was news (the caller then spreads it).
    pub fn revoke(&self, r: cert::Revocation) -> bool {
        let peer = r.peer;
        let news = self.shared.trust.revoke(r);
        if news {
            let _ = self.cmd.send(Cmd::Revoked(peer));
        }
        news
    }

    /// The certificate a connected peer presented, if it was valid.
    pub fn peer_cert(&self, peer: &PeerId) -> Option<cert::NodeCert> {
        self.shared.certified.read().get(peer).copied()
    }

    pub fn stats(&self) -> &MeshStats {
        &self.shared.stats
    }

    pub fn config(&self) -> &MeshConfig {
        &self.shared.config
    }

    /// Certified peers.
    pub fn peers(&self) -> Vec<PeerId> {
        self.shared.up.read().keys().copied().collect()
    }

    /// Every connected peer with its address and latency.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let up = self.shared.up.read();
        let mut out: Vec<PeerStatus> = self
            .shared
            .conns
            .read()
            .iter()
            .map(|(p, (addr, rtt))| PeerStatus {
                peer_id: p.to_string(),
                address: addr.to_string(),
                rtt_us: rtt.map(|d| d.as_micros() as u64),
                certified: up.contains_key(p),
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }

    /// Queues an encoded frame for `peer`. Never waits: a congested peer is reported (and noted
    /// for [`take_pressure`]) so that the sender can pause before producing more.
    pub fn send_encoded(&self, peer: &PeerId, frame: Bytes) -> Sent {
        let shared = &*self.shared;
        let writers = shared.writers.read();
        let Some(q) = writers.get(peer) else {
            return Sent::NotConnected;
        };
        let len = frame.len();
        if q.queued.load(Ordering::Acquire) + len > shared.config.peer_queue_max_bytes.max(len) {
            shared.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
            return Sent::Dropped;
        }
        let queued = q.queued.fetch_add(len, Ordering::SeqCst) + len;
        if q.tx.send(frame).is_err() {
            return Sent::NotConnected;
        }
        shared.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        if queued <= shared.config.peer_queue_bytes {
            return Sent::Queued;
        }
        if !q.congested.swap(true, Ordering::SeqCst) {
            shared.congested.fetch_add(1, Ordering::SeqCst);
            shared
                .stats
                .congestion_events
                .fetch_add(1, Ordering::Relaxed);
            // The writer may have drained the queue between our count and the flag: it then saw
            // no flag to clear, so whoever sets the flag checks once more (both sides SeqCst).
            if q.queued.load(Ordering::SeqCst) <= shared.config.peer_queue_bytes / 2 {
                q.relieve(shared);
                return Sent::Queued;
            }
        }
        PRESSURE.with(|p| p.set(true));
        Sent::Congested
    }

    pub fn send(&self, peer: &PeerId, frame: &Frame) -> Sent {
        self.send_encoded(peer, frame.encode())
    }

    /// Whether some peer's queue is over `peer_queue_bytes` now.
    pub fn is_congested(&self) -> bool {
        self.shared.congested.load(Ordering::Acquire) > 0
    }

    /// Resolves once no peer is congested (at once if none is). A peer stays congested until its
    /// queue drains to half of `peer_queue_bytes` or it disconnects (at most `peer_timeout`).
    pub async fn writable(&self) {
        loop {
            let drained = self.shared.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !self.is_congested() {
                return;
            }
            drained.await;
        }
    }

    /// Sends `frame` to every certified peer except `except`.
    pub fn broadcast(&self, frame: &Frame, except: Option<&PeerId>) {
        let bytes = frame.encode();
        for p in self.peers() {
            if Some(&p) != except {
                self.send_encoded(&p, bytes.clone());
            }
        }
    }

    /// Announces this node as serving `realm` (a DHT provider record), so that other nodes of the
    /// realm find and connect to it.
    pub fn provide(&self, realm: &str) {
        let _ = self.cmd.send(Cmd::Provide(realm.to_owned()));
    }

    pub fn unprovide(&self, realm: &str) {
        let _ = self.cmd.send(Cmd::Unprovide(realm.to_owned()));
    }

    pub fn dial(&self, addr: Multiaddr) {
        let _ = self.cmd.send(Cmd::Dial(addr));
    }

    /// Links to `peer` (a node serving a realm this node serves): connects, looking its address
    /// up in the DHT if need be, and keeps the link (redialled when lost).
    pub fn want(&self, peer: PeerId) {
        if peer != self.shared.local && !self.shared.up.read().contains_key(&peer) {
            let _ = self.cmd.send(Cmd::Want(peer));
        }
    }

    /// Stores a record in the DHT; returns on how many other nodes it was stored.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>, ttl: Duration) -> Result<usize, String> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Put(key, value, ttl, tx));
        rx.await.map_err(|_| "the mesh stopped".to_string())?
    }

    /// Looks a record up in the DHT.
    pub async fn get(&self, key: Vec<u8>) -> Result<Lookup, String> {
        self.shared
            .stats
            .dht_lookups
            .fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Get(key, tx));
        rx.await.map_err(|_| "the mesh stopped".to_string())?
    }

    /// Starts serving `realm` ([`MeshHandle::provide`]) and returns the nodes serving it, looked
    /// up once this node's own provider record is stored: of two nodes that start serving a realm
    /// at the same time, at least one finds the other (the one whose lookup comes last), and
    /// links to it.
    pub async fn discover(&self, realm: &str) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Discover(realm.to_owned(), tx));
        rx.await.unwrap_or_default()
    }

    /// The nodes the DHT names as serving `realm` (one provider lookup; this node included if it
    /// serves it).
    pub async fn providers(&self, realm: &str) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Providers(realm.to_owned(), tx));
        rx.await.unwrap_or_default()
    }

    /// The addresses this node listens on (with its peer id appended, ready to share).
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Listen(tx));
        let local = self.shared.local;
        rx.await
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.with_p2p(local).unwrap_or_else(|a| a))
            .collect()
    }
}

pub(crate) fn realm_key(realm: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("/macula/realm/{realm}"))
}
