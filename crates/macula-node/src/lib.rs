//! # macula-node
//!
//! The daemon: loads the config directory ([`confdir`]), listens for WAMP over WebSocket and
//! RawSocket, serves the HTTP bridge and metrics ([`http`]), and wires connections
//! ([`session`]) to the router core through bounded per-session queues ([`outbox`]).
//!
//! Everything protocol-related lives in `macula-wamp` and `macula-router`; this crate owns I/O,
//! limits and configuration. It must never block a realm lock on I/O: the router only pushes into
//! outboxes, writers drain them.

pub mod confdir;
pub mod config;
pub mod exposition;
pub mod http;
pub mod http_server;
pub mod mesh;
pub mod meter;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod peer;
pub mod rawsocket;
pub mod session;
pub mod tls;
pub mod workloads;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::mesh::trust;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use confdir::{ConfDir, Load, Loaded};
pub use config::{NodeConfig, RegistrySection};
pub use node::Node;

/// A started node: its bound addresses and background tasks.
pub struct Running {
    pub node: Arc<Node>,
    pub http_addr: SocketAddr,
    pub rawsocket_addr: SocketAddr,
    /// Whether the listeners accept TLS (`wss://`, `https://`, `rss://`).
    pub tls: bool,
    /// Mesh addresses other nodes can bootstrap from (empty when the mesh is off).
    pub mesh_addrs: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// The WebSocket URL clients connect to.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http_addr)
    }

    /// The RawSocket URL (`rs://host:port`) the Rust SDK and CLI accept.
    pub fn rawsocket_url(&self) -> String {
        format!("rs://{}", self.rawsocket_addr)
    }

    /// The WebSocket-over-TLS URL (`wss://`), when the node has a certificate.
    pub fn wss_url(&self) -> Option<String> {
        self.tls.then(|| format!("wss://{}/ws", self.http_addr))
    }

    /// The RawSocket-over-TLS URL (`rss://host:port`), when the node has a certificate.
    pub fn rss_url(&self) -> Option<String> {
        self.tls.then(|| format!("rss://{}", self.rawsocket_addr))
    }

    /// Stops accepting connections and background work.
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds the listeners and starts serving. Port 0 in the config picks free ports.
pub async fn start(node: Arc<Node>) -> anyhow::Result<Running> {
    start_with(node, None).await
}

/// [`start`], serving `extra` routes (e.g. the registry's REST API) on the HTTP listener too.
pub async fn start_with(node: Arc<Node>, extra: Option<axum::Router>) -> anyhow::Result<Running> {
    if let Some(e) = &node.meter_error {
        anyhow::bail!("{e}");
    }
    let listen = node.config.listen.clone();
    let tls_section = &node.config.tls;
    tls_section.check_listener("listen.http", listen.http)?;
    tls_section.check_listener("listen.rawsocket", listen.rawsocket)?;
    let tls = tls::Tls::load(tls_section, node.confdir.as_ref().map(|d| d.root.as_path()))?;
    let http = TcpListener::bind(listen.http)
        .await
        .with_context(|| format!("cannot listen on {} (listen.http)", listen.http))?;
    let raw = TcpListener::bind(listen.rawsocket)
        .await
        .with_context(|| format!("cannot listen on {} (listen.rawsocket)", listen.rawsocket))?;
    let http_addr = http.local_addr()?;
    let _ = node.http_addr.set(http_addr);
    let rawsocket_addr = raw.local_addr()?;
    let mut tasks = vec![];
    // Replicas run on this machine: they connect over loopback, in the clear where the node
    // takes clear text from this machine (the default), else over TLS to its address.
    let local = http_addr.ip().is_loopback() || http_addr.ip().is_unspecified();
    let clear_ok = tls.is_none() || tls_section.plaintext != tls::Plaintext::None;
    let replica_url = if local && clear_ok {
        let lo: std::net::IpAddr = if http_addr.is_ipv6() && !http_addr.ip().is_unspecified() {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        };
        format!(
            "ws://{}/ws",
            std::net::SocketAddr::new(lo, http_addr.port())
        )
    } else {
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{http_addr}/ws")
    };
    let ctrl = workloads::Controller::new(node.clone(), replica_url);
    {
        let fencing: Arc<dyn node::Fencing> = ctrl.clone();
        let _ = node.fencing.set(Arc::downgrade(&fencing));
    }
    let mut app = http::router(node.clone(), ctrl.clone());
    if let Some(extra) = extra {
        app = app.merge(extra);
    }
    tasks.push(tokio::spawn(http_server::serve(
        http,
        app,
        node.clone(),
        tls.clone(),
    )));
    tasks.push(tokio::spawn(rawsocket::serve(
        raw,
        node.clone(),
        tls.clone(),
    )));
    if let Some(tls) = &tls {
        tasks.push(tokio::spawn(tls.clone().watch()));
    }
    let ticker = node.clone();
    tasks.push(tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_millis(50));
        loop {
            iv.tick().await;
            ticker.tick(Instant::now());
        }
    }));
    let expiry = node.clone();
    tasks.push(tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_secs(1));
        loop {
            iv.tick().await;
            let now = confdir::now_secs();
            expiry.close_expired_sessions(now);
            if let Some(m) = mesh::of(&expiry) {
                m.proofs.expire(&expiry, m, now);
            }
        }
    }));
    if node.confdir.is_some() {
        let reloader = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = None;
            let mut iv = tokio::time::interval(reloader.config.reload_interval());
            loop {
                iv.tick().await;
                let stamp = reloader.confdir.as_ref().map(dir_stamp);
                if last.is_some() && stamp != last {
                    match reloader.reload() {
                        Ok(()) => tracing::info!("configuration reloaded"),
                        Err(e) => tracing::error!(
                            "configuration not reloaded, keeping the running one: {e:#}"
                        ),
                    }
                }
                last = stamp;
            }
        }));
    }
    let mut mesh_addrs = vec![];
    if node.config.mesh.enabled {
        let (mesh, rx) = start_mesh(&node).await?;
        mesh_addrs = mesh
            .handle
            .listen_addrs()
            .await
            .iter()
            .map(|a| a.to_string())
            .collect();
        let _ = node.mesh.set(Arc::new(mesh::Port(mesh.clone())));
        // Usage goes to the node hosting the billing aggregator: this one (its sink is set by
        // the registry), or one found through the mesh.
        if node.config.registry.enabled {
            mesh.handle.provide(mesh::BILLING);
        } else {
            let _ = node
                .usage_sink
                .set(Arc::new(mesh::MeshSink(Arc::downgrade(&node))));
        }
        mesh::publish_local_states(&node, &mesh);
        node.rebuild_auth();
        tasks.push(tokio::spawn(trust::upkeep(node.clone(), mesh.clone())));
        tasks.push(tokio::spawn(collect_tombstones(node.clone(), mesh.clone())));
        tasks.push(tokio::spawn(mesh::run(node.clone(), mesh, rx)));
        tracing::info!(peer_id = %mesh::of(&node).map(|m| m.handle.peer_id().to_string()).unwrap_or_default(), addrs = ?mesh_addrs, "mesh listening");
    }
    if let Some(rx) = node.work_inbox.take() {
        tasks.push(tokio::spawn(ctrl.run(rx)));
    }
    if let Some(meter) = node.meter.clone() {
        tasks.push(tokio::spawn(ship_usage(node.clone(), meter)));
    }
    if let Some(rx) = node.events_rx.lock().take() {
        let file = &node.config.metering.events_file;
        let path = match &node.confdir {
            Some(d) if file.is_relative() => d.root.join(file),
            _ => file.clone(),
        };
        tasks.push(tokio::spawn(meter::write_events(path, rx)));
    }
    tracing::info!(http = %http_addr, rawsocket = %rawsocket_addr, "node listening");
    Ok(Running {
        node,
        http_addr,
        rawsocket_addr,
        tls: tls.is_some(),
        mesh_addrs,
        tasks,
    })
}

/// Forgets tombstones past `mesh.tombstone_retention_s` (checked every half of it, at most
/// every minute).
async fn collect_tombstones(node: Arc<Node>, mesh: Arc<mesh::MeshState>) {
    let every = (node.config.mesh.tombstone_retention_s / 2).clamp(1, 60);
    let mut iv = tokio::time::interval(Duration::from_secs(every));
    loop {
        iv.tick().await;
        if mesh.collect_tombstones(&node, confdir::now_secs()) {
            if node.confdir.is_some() {
                if let Err(e) = node.reload() {
                    tracing::warn!("reload after collecting tombstones: {e:#}");
                }
            } else {
                node.rebuild_auth();
            }
        }
    }
}

/// Delivers usage to the billing aggregator every `metering.flush_ms` (once one is known) and
/// syncs the counters file every `metering.sync_ms`.
async fn ship_usage(node: Arc<Node>, meter: Arc<meter::Meter>) {
    let m = &node.config.metering;
    let mut shipper: Option<meter::Shipper> = None;
    let mut iv = tokio::time::interval(Duration::from_millis(m.flush_ms.max(10)));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sync_every = Duration::from_millis(m.sync_ms.max(100));
    let mut synced = Instant::now();
    let mut failing = false;
    loop {
        iv.tick().await;
        if synced.elapsed() >= sync_every {
            let meter = meter.clone();
            let _ = tokio::task::spawn_blocking(move || meter.sync()).await;
            synced = Instant::now();
        }
        let Some(sink) = node.usage_sink.get() else {
            continue;
        };
        let s = shipper.get_or_insert_with(|| {
            let id = node
                .mesh
                .get()
                .map(|m| m.peer_id())
                .unwrap_or_else(|| "standalone".into());
            meter::Shipper::new(meter.clone(), id)
        });
        match s.ship(&**sink, confdir::now_secs()).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("metering: usage delivered again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("metering: usage not delivered (kept, will retry): {e}");
            }
            Err(_) => {}
        }
    }
}

/// Loads (or creates) the node identity, obtains its operator certificate and starts the mesh.
async fn start_mesh(
    node: &Arc<Node>,
) -> anyhow::Result<(Arc<mesh::MeshState>, macula_mesh::MeshEvents)> {
    use macula_mesh::identity::Keypair;
    let cfg = &node.config.mesh;
    let root = node.confdir.as_ref().map(|d| d.root.clone());
    let resolve = |p: &std::path::Path| match &root {
        Some(r) if p.is_relative() => r.join(p),
        _ => p.to_path_buf(),
    };
    let keypair = match &root {
        None => Keypair::generate_ed25519(),
        Some(_) => {
            let path = resolve(&cfg.identity);
            match std::fs::read_to_string(&path) {
                Ok(t) => {
                    let mut bytes = macula_router::auth::credential::parse_hex32(&t)
                        .with_context(|| format!("{} is not a 64-hex-digit key", path.display()))?;
                    Keypair::ed25519_from_bytes(&mut bytes)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                }
                Err(_) => {
                    let secret: [u8; 32] = rand::random();
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    confdir::write_secret(&path, &hex::encode(secret))?;
                    let mut s = secret;
                    Keypair::ed25519_from_bytes(&mut s)
                        .map_err(|e| anyhow::anyhow!("node identity: {e}"))?
                }
            }
        }
    };
    let peer = keypair.public().to_peer_id();
    let trust = trust::load(node);
    let cert = trust::own_cert(node, &peer, &trust)?;
    let parse = |v: &[String], what: &str| -> anyhow::Result<Vec<macula_mesh::Addr>> {
        v.iter()
            .map(|a| {
                a.parse().with_context(|| {
                    format!(
                        "{what}: {a:?} is not a multiaddr (like /ip4/10.0.0.1/udp/7600/quic-v1)"
                    )
                })
            })
            .collect()
    };
    let mcfg = macula_mesh::MeshConfig {
        listen: parse(&cfg.listen, "mesh.listen")?,
        announce: parse(&cfg.announce, "mesh.announce")?,
        bootstrap: parse(&cfg.bootstrap, "mesh.bootstrap")?,
        peer_timeout: Duration::from_millis(cfg.peer_timeout_ms.max(300)),
        discovery_interval: Duration::from_millis(cfg.discovery_interval_ms.max(100)),
        max_frame: cfg.max_frame,
        peer_queue_bytes: cfg.peer_queue_bytes,
        peer_queue_max_bytes: cfg.peer_queue_max_bytes,
        inbound_queue_bytes: cfg.inbound_queue_bytes,
        dht_parallelism: cfg.dht_parallelism,
        dht_timeout: Duration::from_secs(10),
        dht_refresh: Duration::from_secs(cfg.dht_refresh_s),
    };
    let (handle, rx) = macula_mesh::start(mcfg, keypair, cert, trust).await?;
    Ok((mesh::MeshState::new(handle, &node.config.mesh), rx))
}

/// A cheap fingerprint of the config directory: modification times and sizes of the policy files.
fn dir_stamp(dir: &ConfDir) -> Vec<(String, u128, u64)> {
    let mut out = vec![];
    if let Ok(realms) = dir.realms() {
        for r in realms {
            let p = dir.root.join("realms").join(&r).join("policy.yaml");
            if let Ok(m) = std::fs::metadata(&p) {
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                out.push((r, t, m.len()));
            }
        }
    }
    out
}
