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
pub mod http;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod rawsocket;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use confdir::{ConfDir, Loaded};
pub use config::NodeConfig;
pub use node::Node;

/// A started node: its bound addresses and background tasks.
pub struct Running {
    pub node: Arc<Node>,
    pub http_addr: SocketAddr,
    pub rawsocket_addr: SocketAddr,
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
    let listen = node.config.listen.clone();
    let http = TcpListener::bind(listen.http)
        .await
        .with_context(|| format!("cannot listen on {} (listen.http)", listen.http))?;
    let raw = TcpListener::bind(listen.rawsocket)
        .await
        .with_context(|| format!("cannot listen on {} (listen.rawsocket)", listen.rawsocket))?;
    let http_addr = http.local_addr()?;
    let rawsocket_addr = raw.local_addr()?;
    let mut tasks = vec![];
    let app = http::router(node.clone()).into_make_service_with_connect_info::<SocketAddr>();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(http, app).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    }));
    tasks.push(tokio::spawn(rawsocket::serve(raw, node.clone())));
    let ticker = node.clone();
    tasks.push(tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_millis(50));
        loop {
            iv.tick().await;
            ticker.tick(Instant::now());
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
    tracing::info!(http = %http_addr, rawsocket = %rawsocket_addr, "node listening");
    Ok(Running {
        node,
        http_addr,
        rawsocket_addr,
        tasks,
    })
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
