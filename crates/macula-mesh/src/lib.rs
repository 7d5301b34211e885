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
//!
//! One file per concept: this one holds the configuration, the shared state and [`start`];
//! `handle.rs` the [`MeshHandle`] API; `swarm.rs` the swarm task; `stream.rs` mesh streams
//! (writers and readers); `links.rs` which peers are linked; `gate.rs` Kademlia admission;
//! [`cert`], [`frame`] and [`record`] the certificates, the wire format and signed records.
pub mod cert;

pub mod frame;

pub mod record;

mod gate;
mod handle;
mod links;
mod stream;
mod swarm;

use gate::*;
use handle::realm_key;
use links::*;
use stream::*;
use swarm::*;

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
