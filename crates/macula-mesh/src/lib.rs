//! # macula-mesh
//!
//! The node-to-node layer: a rust-libp2p swarm over QUIC (encrypted, authenticated by peer id)
//! with Kademlia (peer discovery, realm discovery through provider records, application records),
//! identify and ping. The hot path does not use gossip: each pair of nodes keeps one long-lived
//! stream per direction (`/macula/mesh/1`) carrying length-prefixed [`Frame`]s, written in
//! batches.
//!
//! Admission: the first frame on every stream is [`Frame::Hello`] with the operator's certificate
//! for the sender's peer id ([`cert`]). A peer without a valid certificate is disconnected; no
//! frame of it reaches the node. Certificates expire and can be revoked ([`cert::Trust`]): a
//! sweep every second disconnects peers whose certificate stopped being valid, and a renewed
//! certificate is sent as a new Hello on the open stream. Every connection, including the short
//! ones Kademlia opens for lookups, starts with the same certificate on a `/macula/cert/1`
//! stream: the routing table holds only certified peers, and records and provider records are
//! stored only when a certified peer sent them. Malformed frames are dropped and counted; an oversized length
//! prefix ends the connection (the stream cannot be resynchronised).
//!
//! This crate knows nothing about WAMP or realms beyond the frame types: the node
//! (`macula-node::mesh`) decides what frames mean.

pub mod cert;
pub mod frame;
pub mod record;

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use futures_util::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use futures_util::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore, GetRecordOk, QueryResult, Quorum};
use libp2p::swarm::{dial_opts::DialOpts, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, ping, Multiaddr, PeerId, StreamProtocol, Swarm};
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

pub use frame::{encode_routed, Frame, FrameError, Origin, Routed};
pub use libp2p::identity;
pub use libp2p::{Multiaddr as Addr, PeerId as Peer};

const MESH_PROTOCOL: StreamProtocol = StreamProtocol::new("/macula/mesh/1");
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/macula/kad/1");
const CERT_PROTOCOL: StreamProtocol = StreamProtocol::new("/macula/cert/1");
/// Kademlia requests kept per peer while its certificate has not arrived yet, and for how long.
const DEFERRED_PER_PEER: usize = 32;
const DEFERRED_PEERS: usize = 4096;
const DEFERRED_FOR: Duration = Duration::from_secs(10);
/// Peers this node keeps links to (or tries to), at most.
const MAX_WANTED: usize = 4 * MAX_REALM_NODES;
/// Nodes serving one realm that the DHT keeps provider records for (and so can find).
pub const MAX_REALM_NODES: usize = 1024;

/// Mesh settings (the node's `mesh:` section).
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// QUIC listen addresses, e.g. `/ip4/0.0.0.0/udp/7600/quic-v1` (port 0 picks one).
    pub listen: Vec<Multiaddr>,
    /// Addresses other nodes should dial (when the listen address is not reachable as is).
    pub announce: Vec<Multiaddr>,
    /// Nodes to join through. Empty: a mesh of one, until someone joins us.
    pub bootstrap: Vec<Multiaddr>,
    /// A peer silent this long is considered gone (QUIC idle timeout; keep-alives every third).
    pub peer_timeout: Duration,
    /// How often realm providers are looked up and lost peers redialled.
    pub discovery_interval: Duration,
    /// Largest accepted frame; a larger length prefix ends the connection.
    pub max_frame: usize,
    /// Bytes queued for one peer above which the peer is *congested*: senders that fed it are
    /// asked to pause (see [`MeshHandle::writable`]) until it drains below half of this.
    pub peer_queue_bytes: usize,
    /// Bytes queued for one peer above which new frames are dropped (and counted): the bound for
    /// a peer that stopped reading but is not yet timed out.
    pub peer_queue_max_bytes: usize,
    /// Bytes of received frames the node has not processed yet; above this the mesh stops reading
    /// from peers, so QUIC flow control pushes back on their senders.
    pub inbound_queue_bytes: usize,
    /// Kademlia lookup parallelism (alpha).
    pub dht_parallelism: usize,
    /// Kademlia query timeout.
    pub dht_timeout: Duration,
    /// How often the routing table is refreshed by a bootstrap lookup. Each refresh is a burst of
    /// lookups (new connections and handshakes) on every node; Kademlia also refreshes when its
    /// table changes, so this only has to catch slow drift.
    pub dht_refresh: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1"
                .parse()
                .expect("valid multiaddr")],
            announce: vec![],
            bootstrap: vec![],
            peer_timeout: Duration::from_secs(3),
            discovery_interval: Duration::from_secs(2),
            max_frame: 16 << 20,
            peer_queue_bytes: 4 << 20,
            peer_queue_max_bytes: 64 << 20,
            inbound_queue_bytes: 8 << 20,
            dht_parallelism: 3,
            dht_timeout: Duration::from_secs(10),
            dht_refresh: Duration::from_secs(300),
        }
    }
}

/// What the mesh tells the node.
#[derive(Debug)]
pub enum MeshEvent {
    /// A certified peer is connected; frames to it are delivered in order.
    PeerUp(PeerId),
    /// The peer is gone (connection closed or timed out).
    PeerDown(PeerId),
    /// A frame from a certified peer.
    Frame(PeerId, Frame),
}

/// Counters exported as `/metrics` series.
#[derive(Debug, Default)]
pub struct MeshStats {
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Frames dropped because a peer's queue was over `peer_queue_max_bytes`.
    pub frames_dropped: AtomicU64,
    /// Times a peer's queue went over `peer_queue_bytes` (senders were paused).
    pub congestion_events: AtomicU64,
    /// Frames that did not decode, or streams that broke the framing.
    pub frames_malformed: AtomicU64,
    /// Peers refused for lacking a valid operator certificate.
    pub peers_rejected: AtomicU64,
    /// Peers disconnected because their certificate expired or was revoked.
    pub peers_cut_off: AtomicU64,
    /// Kademlia records and provider records refused (the sender was never certified).
    pub dht_refused: AtomicU64,
    pub dht_lookups: AtomicU64,
}

/// One connected peer, for `macula mesh peers`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub peer_id: String,
    pub address: String,
    /// Round-trip time of the last ping, in microseconds.
    pub rtt_us: Option<u64>,
    /// Whether the peer presented a valid certificate (only those exchange traffic).
    pub certified: bool,
}

/// Outcome of a DHT lookup.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// Raw values found (the first one, when any).
    pub value: Option<Vec<u8>>,
    /// Requests sent until the value was found (or the query ended).
    pub requests: u32,
    pub elapsed: Duration,
}

enum Cmd {
    Provide(String),
    Unprovide(String),
    Dial(Multiaddr),
    /// Exchange frames with this peer (it opened a mesh stream to us).
    Want(PeerId),
    Disconnect(PeerId),
    Put(
        Vec<u8>,
        Vec<u8>,
        Duration,
        oneshot::Sender<Result<usize, String>>,
    ),
    Get(Vec<u8>, oneshot::Sender<Result<Lookup, String>>),
    Providers(String, oneshot::Sender<Vec<PeerId>>),
    /// Provide `realm`, and once the provider record is stored, look its providers up.
    Discover(String, oneshot::Sender<Vec<PeerId>>),
    Listen(oneshot::Sender<Vec<Multiaddr>>),
    /// `peer` presented a valid certificate (on a cert or mesh stream).
    Certified(PeerId),
    /// A revocation of this peer arrived: drop it, connected or only in the routing table.
    Revoked(PeerId),
    /// The peer opened a new link while an old one was up: its connections made before the old
    /// link came up (at the instant given) carry only that dead link; close them.
    Superseded(PeerId, Instant),
}

struct Shared {
    local: PeerId,
    /// Opens mesh streams (shared with the swarm's stream behaviour).
    control: libp2p_stream::Control,
    keypair: Keypair,
    /// This node's certificate and its validity (replaced on renewal).
    cert: RwLock<(Bytes, cert::NodeCert)>,
    trust: Arc<cert::Trust>,
    config: MeshConfig,
    stats: MeshStats,
    /// Outgoing frame queues of connected peers.
    writers: RwLock<HashMap<PeerId, Arc<PeerQueue>>>,
    /// How many peers are congested now, and the signal that one drained.
    congested: AtomicUsize,
    drained: Notify,
    /// Budget of received-but-unprocessed frame bytes (permits are returned by [`MeshEvents`]).
    inbound: Arc<Semaphore>,
    /// Certified peers: the generation of their current inbound stream, and when it came.
    up: RwLock<HashMap<PeerId, (u64, Instant)>>,
    /// Connected peers whose certificate was verified (on a cert or mesh stream), with its
    /// validity: only these are in the routing table and may store DHT records here.
    certified: RwLock<HashMap<PeerId, cert::NodeCert>>,
    /// Remote address and last ping of each connected peer.
    conns: RwLock<HashMap<PeerId, (Multiaddr, Option<Duration>)>>,
    generation: AtomicU64,
    events: mpsc::UnboundedSender<(MeshEvent, u32)>,
}

/// Outcome of queueing a frame for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// Queued, but the peer's queue is over `peer_queue_bytes`: the sender should pause.
    Congested,
    /// The queue is over `peer_queue_max_bytes`; the frame was dropped (and counted).
    Dropped,
    NotConnected,
}

thread_local! {
    /// Set when a frame queued on this thread found its peer congested; read and cleared by
    /// [`take_pressure`]. Client read loops are synchronous between two reads, so this tells a
    /// session that what it just did fed a congested peer.
    static PRESSURE: Cell<bool> = const { Cell::new(false) };
}

/// Whether a frame queued on this thread since the last call found its peer congested.
pub fn take_pressure() -> bool {
    PRESSURE.with(|p| p.replace(false))
}

/// One peer's outgoing frames, in order, with their size for backpressure.
struct PeerQueue {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: AtomicUsize,
    congested: AtomicBool,
}

impl PeerQueue {
    /// Marks the queue drained (if it was congested) and wakes paused senders.
    fn relieve(&self, shared: &Shared) {
        if self.congested.swap(false, Ordering::SeqCst) {
            shared.congested.fetch_sub(1, Ordering::SeqCst);
            shared.drained.notify_waiters();
        }
    }
}

/// The mesh's events, in order. Receiving a frame returns its share of the inbound budget.
pub struct MeshEvents {
    rx: mpsc::UnboundedReceiver<(MeshEvent, u32)>,
    inbound: Arc<Semaphore>,
}

impl MeshEvents {
    pub async fn recv(&mut self) -> Option<MeshEvent> {
        let (ev, permits) = self.rx.recv().await?;
        self.inbound.add_permits(permits as usize);
        Some(ev)
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<MeshEvent> {
        let (ev, permits) = self.rx.try_recv().ok()?;
        self.inbound.add_permits(permits as usize);
        Some(ev)
    }
}

/// A running mesh. Cheap to clone.
#[derive(Clone)]
pub struct MeshHandle {
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// Starts the mesh: binds the listen addresses, dials the bootstrap nodes and returns the handle
/// and the event stream. `cert` is the operator's certificate for this node's peer id; `trust`
/// holds the operator's key and the revocations known so far.
pub async fn start(
    config: MeshConfig,
    keypair: Keypair,
    cert: Vec<u8>,
    trust: Arc<cert::Trust>,
) -> anyhow::Result<(MeshHandle, MeshEvents)> {
    let local = keypair.public().to_peer_id();
    let own = trust
        .check(&local, &cert, cert::now_secs())
        .map_err(|e| anyhow::anyhow!("this node's mesh certificate: {e}"))?;
    let timeout = config.peer_timeout.max(Duration::from_millis(300));
    let mut kcfg = kad::Config::new(KAD_PROTOCOL);
    kcfg.set_parallelism(
        NonZeroUsize::new(config.dht_parallelism.max(1)).unwrap_or(NonZeroUsize::MIN),
    )
    .set_query_timeout(config.dht_timeout)
    .set_provider_record_ttl(Some(Duration::from_secs(300)))
    .set_provider_publication_interval(Some(Duration::from_secs(15)))
    .set_record_ttl(Some(Duration::from_secs(86_400)))
    // A provider answer lists up to MAX_REALM_NODES peers with their addresses.
    .set_max_packet_size(256 << 10)
    // Only certified peers enter the routing table, and records are stored only when a certified
    // peer sent them (see `Inbound`).
    .set_kbucket_inserts(kad::BucketInserts::Manual)
    .set_record_filtering(kad::StoreInserts::FilterBoth)
    .set_periodic_bootstrap_interval(Some(config.dht_refresh.max(Duration::from_secs(1))));
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_quic_config(|mut q| {
            q.max_idle_timeout = timeout.as_millis() as u32;
            q.keep_alive_interval = timeout / 3;
            q
        })
        .with_behaviour(|key| Behaviour {
            // Kademlia's store keeps only the 20 providers closest to a key by default: the
            // 21st node serving a realm was never found (and two such nodes never linked).
            kad: kad::Behaviour::with_config(
                local,
                MemoryStore::with_config(
                    local,
                    kad::store::MemoryStoreConfig {
                        max_providers_per_key: MAX_REALM_NODES,
                        ..Default::default()
                    },
                ),
                kcfg,
            ),
            identify: identify::Behaviour::new(identify::Config::new(
                "/macula/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| anyhow::anyhow!("building the mesh: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
    for a in &config.listen {
        swarm
            .listen_on(a.clone())
            .with_context(|| format!("cannot listen on {a} (mesh.listen)"))?;
    }
    for a in &config.announce {
        swarm.add_external_address(a.clone());
    }
    // Wait until every listener has its address, so callers can print and share it.
    let mut bound = 0;
    while bound < config.listen.len() {
        match tokio::time::timeout(Duration::from_secs(5), swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { .. }) => bound += 1,
            Ok(SwarmEvent::ListenerError { error, .. }) => {
                anyhow::bail!("mesh listener failed: {error}")
            }
            Ok(SwarmEvent::ListenerClosed { reason, .. }) => {
                anyhow::bail!("mesh listener closed: {reason:?}")
            }
            Ok(_) => {}
            Err(_) => anyhow::bail!("mesh listeners did not come up within 5 s"),
        }
    }
    let (events, rx) = mpsc::unbounded_channel();
    let inbound = Arc::new(Semaphore::new(
        config
            .inbound_queue_bytes
            .clamp(64 << 10, Semaphore::MAX_PERMITS),
    ));
    let rx = MeshEvents {
        rx,
        inbound: inbound.clone(),
    };
    let (cmd, cmd_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        local,
        control: swarm.behaviour().stream.new_control(),
        keypair,
        cert: RwLock::new((Bytes::from(cert), own)),
        trust,
        config: config.clone(),
        stats: MeshStats::default(),
        writers: RwLock::new(HashMap::new()),
        congested: AtomicUsize::new(0),
        drained: Notify::new(),
        inbound: inbound.clone(),
        up: RwLock::new(HashMap::new()),
        certified: RwLock::new(HashMap::new()),
        conns: RwLock::new(HashMap::new()),
        generation: AtomicU64::new(1),
        events,
    });
    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control
        .accept(MESH_PROTOCOL)
        .map_err(|e| anyhow::anyhow!("mesh protocol: {e}"))?;
    let handle = MeshHandle {
        shared: shared.clone(),
        cmd: cmd.clone(),
    };
    tokio::spawn(accept_loop(incoming, shared.clone(), cmd.clone()));
    let certs = control
        .accept(CERT_PROTOCOL)
        .map_err(|e| anyhow::anyhow!("cert protocol: {e}"))?;
    tokio::spawn(accept_certs(certs, shared.clone(), cmd.clone()));
    let mut links = Links::default();
    for b in &config.bootstrap {
        if let Err(e) = links.dial(&mut swarm, DialOpts::from(b.clone())) {
            tracing::warn!("cannot dial bootstrap node {b}: {e}");
        }
    }
    tokio::spawn(run(swarm, shared, cmd_rx, cmd, links));
    Ok((handle, rx))
}

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

fn realm_key(realm: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("/macula/realm/{realm}"))
}

enum Pending {
    Put(oneshot::Sender<Result<usize, String>>),
    Get(oneshot::Sender<Result<Lookup, String>>, Instant),
    Providers(oneshot::Sender<Vec<PeerId>>, HashSet<PeerId>),
    /// A provider record being stored, then a lookup for [`Cmd::Discover`].
    Provided(String, oneshot::Sender<Vec<PeerId>>),
}

/// Which peers this node exchanges frames with. A connection alone (Kademlia's, for a lookup)
/// carries no mesh stream and closes when idle; a *wanted* peer gets a mesh stream and is
/// redialled when lost. Wanted: bootstrap nodes, the other providers of realms this node serves,
/// and peers that opened a mesh stream to us. So a node is linked to its bootstrap nodes (over
/// which realm states flood) and to its realms' nodes, not to every node its lookups touched.
#[derive(Default)]
struct Links {
    wanted: HashSet<PeerId>,
    /// Dials whose connection should become a link (bootstrap addresses, without a peer id yet).
    dialing: HashSet<libp2p::swarm::ConnectionId>,
    /// Lost wanted peers: next attempt, backoff, lost since. Forgotten after ten minutes.
    lost: HashMap<PeerId, (Instant, Duration, Instant)>,
    /// Each connected peer's connections and when each was established.
    conns: HashMap<PeerId, Vec<(libp2p::swarm::ConnectionId, Instant)>>,
}

impl Links {
    fn dial(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        opts: DialOpts,
    ) -> Result<(), libp2p::swarm::DialError> {
        let id = opts.connection_id();
        swarm.dial(opts)?;
        self.dialing.insert(id);
        Ok(())
    }

    fn want(
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

    fn established(
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
    fn closed(&mut self, peer: PeerId, conn: libp2p::swarm::ConnectionId) {
        if let Some(c) = self.conns.get_mut(&peer) {
            c.retain(|(id, _)| *id != conn);
            if c.is_empty() {
                self.conns.remove(&peer);
            }
        }
    }

    /// The connections to `peer` established before `since`.
    fn older(&self, peer: PeerId, since: Instant) -> Vec<libp2p::swarm::ConnectionId> {
        self.conns.get(&peer).map_or(vec![], |c| {
            c.iter()
                .filter(|(_, at)| *at < since)
                .map(|(id, _)| *id)
                .collect()
        })
    }

    fn lost(&mut self, peer: PeerId) {
        if self.wanted.contains(&peer) {
            let now = Instant::now();
            self.lost
                .insert(peer, (now, Duration::from_millis(250), now));
        }
    }

    /// Redials lost wanted peers whose backoff has passed (so that a partition heals by itself).
    fn redial(&mut self, swarm: &mut Swarm<Behaviour>) {
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

/// Starts the outgoing mesh stream to a connected peer, unless it has one.
fn start_writer(peer: PeerId, shared: &Arc<Shared>, cmd: &mpsc::UnboundedSender<Cmd>) {
    let mut writers = shared.writers.write();
    if writers.contains_key(&peer) {
        return;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let q = Arc::new(PeerQueue {
        tx,
        queued: AtomicUsize::new(0),
        congested: AtomicBool::new(false),
    });
    writers.insert(peer, q.clone());
    tokio::spawn(writer(
        shared.control.clone(),
        peer,
        rx,
        q,
        shared.clone(),
        cmd.clone(),
    ));
}

/// A Kademlia write that arrived before its sender's certificate.
enum Inbound {
    Record(kad::Record),
    Provider(kad::ProviderRecord),
}

impl Inbound {
    fn size(&self) -> usize {
        match self {
            Inbound::Record(r) => r.key.as_ref().len() + r.value.len() + 64,
            Inbound::Provider(r) => r.key.as_ref().len() + 64 * (r.addresses.len() + 1),
        }
    }
}

/// Bytes of writes held for certificates not arrived yet, over all peers.
const DEFERRED_BYTES: usize = 16 << 20;
/// A held write larger than this is refused at once (application values are at most
/// `mesh.dht_max_value`, 64 KiB by default).
const DEFERRED_MAX_WRITE: usize = 256 << 10;
/// A connection that has not presented a valid certificate within this is closed.
const CERT_WITHIN: Duration = Duration::from_secs(10);

/// Admission to Kademlia: the routing table and the record store take only certified peers.
#[derive(Default)]
struct KadGate {
    /// Writes from connected peers whose certificate has not arrived yet (bounded in count and
    /// bytes; dropped after [`DEFERRED_FOR`]).
    deferred: HashMap<PeerId, (Instant, Vec<Inbound>)>,
    deferred_bytes: usize,
    /// Addresses of connected peers (what they listen on, by identify, and the address of the
    /// connection), added to the routing table once they are certified.
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Connected peers and since when (a peer without a certificate by [`CERT_WITHIN`] is
    /// disconnected).
    since: HashMap<PeerId, Instant>,
    /// The certificate of every peer put in the routing table: an entry whose certificate
    /// expires or is revoked while the peer is not connected is removed too.
    table: HashMap<PeerId, cert::NodeCert>,
    last_prune: Option<Instant>,
}

impl KadGate {
    /// The peer's certificate, if it presented a valid one on this connection.
    fn valid_cert(shared: &Shared, peer: &PeerId) -> Option<cert::NodeCert> {
        let c = shared.certified.read().get(peer).copied()?;
        shared
            .trust
            .check_valid(peer, &c, cert::now_secs())
            .ok()
            .map(|_| c)
    }

    fn inbound(
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

    fn addresses(
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

    fn certified(&mut self, swarm: &mut Swarm<Behaviour>, shared: &Shared, peer: PeerId) {
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

    fn gone(&mut self, peer: &PeerId, shared: &Shared) {
        if let Some((_, q)) = self.deferred.remove(peer) {
            self.deferred_bytes -= q.iter().map(Inbound::size).sum::<usize>();
            shared.stats.dht_refused.fetch_add(1, Ordering::Relaxed);
        }
        self.addrs.remove(peer);
        self.since.remove(peer);
    }

    /// A revocation arrived: the peer leaves the routing table whether connected or not.
    fn revoked(&mut self, swarm: &mut Swarm<Behaviour>, shared: &Shared, peer: PeerId) {
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
    fn sweep(&mut self, swarm: &mut Swarm<Behaviour>, shared: &Shared, periodic: bool) {
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

fn store(swarm: &mut Swarm<Behaviour>, w: Inbound) {
    let store = swarm.behaviour_mut().kad.store_mut();
    let _ = match w {
        Inbound::Record(r) => kad::store::RecordStore::put(store, r),
        Inbound::Provider(r) => kad::store::RecordStore::add_provider(store, r),
    };
}

/// Presents this node's certificate on a new connection (`/macula/cert/1`).
async fn send_cert(mut control: libp2p_stream::Control, peer: PeerId, cert: Bytes) {
    let send = async {
        let mut s = control.open_stream(peer, CERT_PROTOCOL).await.ok()?;
        s.write_all(&(cert.len() as u32).to_be_bytes()).await.ok()?;
        s.write_all(&cert).await.ok()?;
        s.close().await.ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), send).await;
}

/// Reads the certificates peers present on new connections.
async fn accept_certs(
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

/// The swarm's event loop.
async fn run(
    mut swarm: Swarm<Behaviour>,
    shared: Arc<Shared>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    mut links: Links,
) {
    let mut provided: HashSet<String> = HashSet::new();
    let mut pending: HashMap<kad::QueryId, Pending> = HashMap::new();
    let bootstrap = shared.config.bootstrap.clone();
    let mut tick = tokio::time::interval(shared.config.discovery_interval);
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut gate = KadGate::default();
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return };
                let kad = &mut swarm.behaviour_mut().kad;
                match cmd {
                    Cmd::Provide(realm) => {
                        if provided.insert(realm.clone()) {
                            let _ = kad.start_providing(realm_key(&realm));
                            kad.get_providers(realm_key(&realm));
                        }
                    }
                    Cmd::Unprovide(realm) => {
                        if provided.remove(&realm) {
                            kad.stop_providing(&realm_key(&realm));
                        }
                    }
                    Cmd::Dial(a) => {
                        if let Err(e) = links.dial(&mut swarm, DialOpts::from(a.clone())) {
                            tracing::debug!("dial {a}: {e}");
                        }
                    }
                    Cmd::Want(p) => links.want(&mut swarm, p, &shared, &cmd_tx),
                    Cmd::Disconnect(p) => {
                        let _ = swarm.disconnect_peer_id(p);
                    }
                    Cmd::Put(key, value, ttl, reply) => {
                        let mut r = kad::Record::new(key, value);
                        r.publisher = Some(shared.local);
                        r.expires = Some(Instant::now() + ttl);
                        // Every one of the k closest nodes, as Kademlia intends: a lookup from
                        // anywhere then meets a replica on its way to the key.
                        match kad.put_record(r, Quorum::All) {
                            Ok(id) => {
                                pending.insert(id, Pending::Put(reply));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(format!("cannot store the record: {e:?}")));
                            }
                        }
                    }
                    Cmd::Get(key, reply) => {
                        let id = kad.get_record(kad::RecordKey::new(&key));
                        pending.insert(id, Pending::Get(reply, Instant::now()));
                    }
                    Cmd::Providers(realm, reply) => {
                        let id = kad.get_providers(realm_key(&realm));
                        pending.insert(id, Pending::Providers(reply, HashSet::new()));
                    }
                    Cmd::Discover(realm, reply) => {
                        let started = provided
                            .insert(realm.clone())
                            .then(|| kad.start_providing(realm_key(&realm)).ok())
                            .flatten();
                        match started {
                            Some(id) => {
                                pending.insert(id, Pending::Provided(realm, reply));
                            }
                            None => {
                                let id = kad.get_providers(realm_key(&realm));
                                pending.insert(id, Pending::Providers(reply, HashSet::new()));
                            }
                        }
                    }
                    Cmd::Listen(reply) => {
                        let _ = reply.send(swarm.listeners().cloned().collect());
                    }
                    Cmd::Certified(p) => gate.certified(&mut swarm, &shared, p),
                    Cmd::Revoked(p) => gate.revoked(&mut swarm, &shared, p),
                    Cmd::Superseded(p, since) => {
                        for c in links.older(p, since) {
                            tracing::debug!(local = %shared.local, peer = %p, "closing a connection of a superseded link");
                            swarm.close_connection(c);
                        }
                    }
                }
            }
            _ = sweep.tick() => gate.sweep(&mut swarm, &shared, true),
            _ = tick.tick() => {
                let kad = &mut swarm.behaviour_mut().kad;
                for realm in &provided {
                    kad.get_providers(realm_key(realm));
                }
                links.redial(&mut swarm);
                // Not joined (no certified peer, though connections may be up, e.g. ones that
                // others' lookups opened): dial the bootstrap nodes again.
                if shared.up.read().is_empty() {
                    for b in &bootstrap {
                        let _ = links.dial(&mut swarm, DialOpts::from(b.clone()));
                    }
                }
            }
            ev = swarm.select_next_some() => {
                handle_event(&mut swarm, ev, &shared, &mut pending, &mut links, &mut gate, &cmd_tx);
            }
        }
    }
}

fn handle_event(
    swarm: &mut Swarm<Behaviour>,
    ev: SwarmEvent<BehaviourEvent>,
    shared: &Arc<Shared>,
    pending: &mut HashMap<kad::QueryId, Pending>,
    links: &mut Links,
    gate: &mut KadGate,
    cmd: &mpsc::UnboundedSender<Cmd>,
) {
    match ev {
        SwarmEvent::ConnectionEstablished {
            peer_id,
            endpoint,
            connection_id,
            ..
        } => {
            let addr = endpoint.get_remote_address().clone();
            tracing::debug!(local = %shared.local, peer = %peer_id, dialer = endpoint.is_dialer(), "connection up");
            gate.since.entry(peer_id).or_insert_with(Instant::now);
            gate.addresses(swarm, shared, peer_id, vec![addr.clone()]);
            tokio::spawn(send_cert(
                shared.control.clone(),
                peer_id,
                shared.cert.read().0.clone(),
            ));
            shared.conns.write().insert(peer_id, (addr, None));
            links.established(peer_id, connection_id, shared, cmd);
        }
        SwarmEvent::OutgoingConnectionError {
            connection_id,
            peer_id,
            error,
        } => {
            tracing::debug!(local = %shared.local, peer = ?peer_id, "dial failed: {error}");
            links.dialing.remove(&connection_id);
        }
        SwarmEvent::ConnectionClosed {
            peer_id,
            connection_id,
            num_established,
            ..
        } if num_established > 0 => links.closed(peer_id, connection_id),
        SwarmEvent::ConnectionClosed {
            peer_id,
            connection_id,
            cause,
            ..
        } => {
            tracing::debug!(local = %shared.local, peer = %peer_id, "connection closed: {cause:?}");
            links.closed(peer_id, connection_id);
            if let Some(q) = shared.writers.write().remove(&peer_id) {
                q.relieve(shared);
            }
            shared.conns.write().remove(&peer_id);
            shared.certified.write().remove(&peer_id);
            gate.gone(&peer_id, shared);
            let mut up = shared.up.write();
            if up.remove(&peer_id).is_some() {
                let _ = shared.events.send((MeshEvent::PeerDown(peer_id), 0));
            }
            links.lost(peer_id);
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
            peer_id,
            info,
            ..
        })) => gate.addresses(swarm, shared, peer_id, info.listen_addrs),
        SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest { request })) => {
            match request {
                kad::InboundRequest::PutRecord {
                    source,
                    record: Some(r),
                    ..
                } => gate.inbound(swarm, shared, source, Inbound::Record(r)),
                kad::InboundRequest::AddProvider { record: Some(r) } => {
                    gate.inbound(swarm, shared, r.provider, Inbound::Provider(r))
                }
                _ => {}
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
            peer,
            result: Ok(rtt),
            ..
        })) => {
            if let Some(c) = shared.conns.write().get_mut(&peer) {
                c.1 = Some(rtt);
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
            id,
            result,
            stats,
            step,
        })) => match result {
            QueryResult::GetProviders(res) => {
                let found = match res {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => providers,
                    _ => HashSet::new(),
                };
                if let Some(Pending::Providers(_, all)) = pending.get_mut(&id) {
                    all.extend(found.iter().copied().take(MAX_REALM_NODES));
                }
                for p in found.into_iter().take(MAX_REALM_NODES) {
                    if p != shared.local {
                        links.want(swarm, p, shared, cmd);
                    }
                }
                if step.last {
                    if let Some(Pending::Providers(reply, all)) = pending.remove(&id) {
                        let _ = reply.send(all.into_iter().collect());
                    }
                }
            }
            QueryResult::StartProviding(_) => {
                if let Some(Pending::Provided(realm, reply)) = pending.remove(&id) {
                    let q = swarm.behaviour_mut().kad.get_providers(realm_key(&realm));
                    pending.insert(q, Pending::Providers(reply, HashSet::new()));
                }
            }
            QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(r))) => {
                if let Some(Pending::Get(reply, started)) = pending.remove(&id) {
                    let _ = reply.send(Ok(Lookup {
                        value: Some(r.record.value),
                        requests: stats.num_requests(),
                        elapsed: started.elapsed(),
                    }));
                    if let Some(mut q) = swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                }
            }
            QueryResult::GetRecord(_) if step.last => {
                if let Some(Pending::Get(reply, started)) = pending.remove(&id) {
                    let _ = reply.send(Ok(Lookup {
                        value: None,
                        requests: stats.num_requests(),
                        elapsed: started.elapsed(),
                    }));
                }
            }
            QueryResult::PutRecord(res) if step.last => {
                if let Some(Pending::Put(reply)) = pending.remove(&id) {
                    // The record is stored here first; a put that reached fewer nodes than asked
                    // (a mesh of one) or timed out reports how many others stored it.
                    let stored = match res {
                        // Quorum::All met: the replication factor.
                        Ok(_) => kad::K_VALUE.get(),
                        Err(
                            kad::PutRecordError::QuorumFailed { success, .. }
                            | kad::PutRecordError::Timeout { success, .. },
                        ) => success.len(),
                    };
                    let _ = reply.send(Ok(stored));
                }
            }
            _ => {}
        },
        _ => {}
    }
}

/// Opens the outbound stream to `peer`, introduces this node and writes queued frames in batches.
async fn writer(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queue: Arc<PeerQueue>,
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
) {
    write_frames(&mut control, peer, &mut rx, &queue, &shared, &cmd).await;
    // Whatever ends the stream, nobody waits on this queue any more, and a later link to the
    // peer starts a fresh one.
    queue.relieve(&shared);
    let mut writers = shared.writers.write();
    if writers.get(&peer).is_some_and(|q| Arc::ptr_eq(q, &queue)) {
        writers.remove(&peer);
    }
}

async fn write_frames(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    queue: &PeerQueue,
    shared: &Shared,
    cmd: &mpsc::UnboundedSender<Cmd>,
) {
    // A stream that cannot be opened must not leave the connection up without a link: the peer
    // would never hear our Hello, never link back, and nothing would retry (a node that never
    // joins; interest that never arrives over a "live" link). A transient failure is retried;
    // then the connection is dropped, and redialling starts over.
    let mut attempt = 0u32;
    let mut stream = loop {
        match control.open_stream(peer, MESH_PROTOCOL).await {
            Ok(s) => break s,
            Err(e) => {
                attempt += 1;
                let unsupported =
                    matches!(e, libp2p_stream::OpenStreamError::UnsupportedProtocol(_));
                if unsupported || attempt >= 3 {
                    tracing::debug!(local = %shared.local, %peer, attempt, "no mesh stream, disconnecting: {e}");
                    // Only the peer's current writer may drop the connection: a writer left
                    // over from a closed connection must not take the new one down with it.
                    if is_current(shared, peer, queue) {
                        let _ = cmd.send(Cmd::Disconnect(peer));
                    }
                    return;
                }
                tracing::debug!(local = %shared.local, %peer, attempt, "no mesh stream yet: {e}");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
        }
    };
    let hello = Frame::Hello {
        version: frame::PROTOCOL_VERSION,
        cert: shared.cert.read().0.clone(),
    }
    .encode();
    if stream.write_all(&hello).await.is_err() {
        if is_current(shared, peer, queue) {
            let _ = cmd.send(Cmd::Disconnect(peer));
        }
        return;
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        if buf.capacity() > 1 << 20 {
            buf.shrink_to(64 << 10);
        }
        buf.extend_from_slice(&first);
        while buf.len() < (256 << 10) {
            match rx.try_recv() {
                Ok(b) => buf.extend_from_slice(&b),
                Err(_) => break,
            }
        }
        if stream.write_all(&buf).await.is_err() || stream.flush().await.is_err() {
            if is_current(shared, peer, queue) {
                let _ = cmd.send(Cmd::Disconnect(peer));
            }
            return;
        }
        shared
            .stats
            .bytes_out
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let left = queue.queued.fetch_sub(buf.len(), Ordering::SeqCst) - buf.len();
        if left <= shared.config.peer_queue_bytes / 2 {
            queue.relieve(shared);
        }
    }
    let _ = stream.close().await;
}

/// Whether `queue` is (still) the writer queue of `peer`.
fn is_current(shared: &Shared, peer: PeerId, queue: &PeerQueue) -> bool {
    shared
        .writers
        .read()
        .get(&peer)
        .is_some_and(|q| std::ptr::eq(&**q, queue))
}

async fn accept_loop(
    mut incoming: libp2p_stream::IncomingStreams,
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
) {
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(reader(peer, stream, shared.clone(), cmd.clone()));
    }
}

enum ReadError {
    Closed,
    Oversized(usize),
}

/// Reads one length-prefixed frame body. Bodies are cut from a shared buffer, so a burst of
/// small frames costs one allocation, and the node keeps the WAMP messages without copying.
async fn read_frame<R: futures_util::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    chunk: &mut usize,
    max: usize,
) -> Result<Bytes, ReadError> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len)
        .await
        .map_err(|_| ReadError::Closed)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(ReadError::Oversized(n));
    }
    if buf.capacity() < n {
        // Chunks grow with traffic (4 KiB → 64 KiB), so an idle stream holds little memory.
        *chunk = (*chunk * 2).clamp(4 << 10, 64 << 10);
        buf.reserve(n.max(*chunk));
    }
    buf.resize(n, 0);
    rd.read_exact(&mut buf[..])
        .await
        .map_err(|_| ReadError::Closed)?;
    Ok(buf.split().freeze())
}

/// `peer` presented `cert` (on a mesh or cert stream; `None`: something else came). A valid one
/// is recorded and the routing table follows it; otherwise the peer is refused, disconnected
/// and `false` returned.
fn presented(
    shared: &Shared,
    cmd: &mpsc::UnboundedSender<Cmd>,
    peer: PeerId,
    cert: Option<&[u8]>,
) -> bool {
    let checked = cert
        .ok_or(cert::CertError::Malformed)
        .and_then(|c| shared.trust.check(&peer, c, cert::now_secs()));
    match checked {
        Ok(c) => {
            shared.certified.write().insert(peer, c);
            let _ = cmd.send(Cmd::Certified(peer));
            true
        }
        Err(e) => {
            shared.stats.peers_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "peer refused: {e}");
            let _ = cmd.send(Cmd::Disconnect(peer));
            false
        }
    }
}

/// Reads one peer's inbound stream: the certificate first, then frames for the node.
async fn reader(
    peer: PeerId,
    stream: libp2p::Stream,
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
) {
    let stats = &shared.stats;
    let mut rd = BufReader::with_capacity(16 << 10, stream);
    let mut buf = BytesMut::new();
    let mut chunk = 0;
    let max = shared.config.max_frame;
    let budget = shared
        .config
        .inbound_queue_bytes
        .clamp(64 << 10, Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize) as u32;
    let first = tokio::time::timeout(CERT_WITHIN, read_frame(&mut rd, &mut buf, &mut chunk, 4096));
    let hello = match first.await.unwrap_or(Err(ReadError::Closed)) {
        Ok(body) => match Frame::decode(body) {
            Ok(Frame::Hello { version, cert }) if version == frame::PROTOCOL_VERSION => Some(cert),
            Ok(Frame::Hello { version, .. }) => {
                tracing::warn!(
                    %peer,
                    "peer speaks mesh protocol version {version} and this node {}: run the same \
                     Macula release on every node",
                    frame::PROTOCOL_VERSION
                );
                None
            }
            _ => None,
        },
        Err(_) => None,
    };
    if !presented(&shared, &cmd, peer, hello.as_deref()) {
        return;
    }
    // A new stream from a peer that is still linked: the peer lost its end of the old link (it
    // restarted, or its writer failed) while the old connection has not timed out here yet.
    // The new stream supersedes the old link both ways: the old writer is retired (it would
    // write into the dead stream and then, failing, take the new connection down), and the
    // node hears PeerDown then PeerUp, so that what the old link held goes with it.
    let old_link = shared.up.read().get(&peer).map(|(_, since)| *since);
    if let Some(since) = old_link {
        if let Some(q) = shared.writers.write().remove(&peer) {
            q.relieve(&shared);
        }
        // Its connection is dead too (or would be read by no one): closed now rather than
        // when it times out, so that the new writer does not open its stream on it.
        let _ = cmd.send(Cmd::Superseded(peer, since));
    }
    // Reciprocate: frames flow both ways between linked peers. The stream is started here, before
    // the node hears of the peer, so that what it sends on PeerUp has a queue to go to.
    start_writer(peer, &shared, &cmd);
    let _ = cmd.send(Cmd::Want(peer));
    let generation = shared.generation.fetch_add(1, Ordering::Relaxed);
    {
        let mut up = shared.up.write();
        if up.insert(peer, (generation, Instant::now())).is_some() {
            let _ = shared.events.send((MeshEvent::PeerDown(peer), 0));
        }
        let _ = shared.events.send((MeshEvent::PeerUp(peer), 0));
    }
    loop {
        match read_frame(&mut rd, &mut buf, &mut chunk, max).await {
            Ok(body) => {
                stats.frames_in.fetch_add(1, Ordering::Relaxed);
                let len = body.len();
                stats.bytes_in.fetch_add(len as u64 + 4, Ordering::Relaxed);
                match Frame::decode(body) {
                    // A renewed certificate, or one that is not good: then the peer is gone.
                    Ok(Frame::Hello { cert, .. }) => {
                        if !presented(&shared, &cmd, peer, Some(&cert)) {
                            return;
                        }
                    }
                    Ok(f) => {
                        // Wait for room in the node's inbound budget: while the node is behind,
                        // this stream is not read and QUIC flow control stops the sender.
                        let permits = (len as u32).clamp(1, budget);
                        let Ok(p) = shared.inbound.acquire_many(permits).await else {
                            return;
                        };
                        p.forget();
                        // Checked under the lock that PeerDown is sent under: no frame of a
                        // stream is delivered after the peer was reported gone.
                        let up = shared.up.read();
                        if up.get(&peer).map(|(g, _)| *g) != Some(generation) {
                            shared.inbound.add_permits(permits as usize);
                            return;
                        }
                        let _ = shared.events.send((MeshEvent::Frame(peer, f), permits));
                    }
                    Err(e) => {
                        stats.frames_malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "malformed mesh frame dropped: {e}");
                    }
                }
            }
            Err(ReadError::Oversized(n)) => {
                stats.frames_malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "mesh frame of {n} bytes exceeds mesh.max_frame; disconnecting");
                let _ = cmd.send(Cmd::Disconnect(peer));
                return;
            }
            Err(ReadError::Closed) => return,
        }
    }
}
