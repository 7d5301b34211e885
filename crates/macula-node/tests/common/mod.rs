//! Shared set-up for integration tests: a real node on loopback with a fresh config directory.

#![allow(dead_code)]

use macula_node::Load;
use std::sync::Arc;
use std::time::Duration;

use macula_node::{ConfDir, Node, NodeConfig, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const REALM: &str = "com.example.test";

pub struct TestNode {
    pub running: Running,
    pub dir: ConfDir,
    pub admin_key: String,
    pub admin_kid: String,
    _tmp: tempfile::TempDir,
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfDir::new(tmp.path());
        dir.init().unwrap();
        dir.create_realm(REALM, None).unwrap();
        let (admin_kid, admin_key) = dir
            .issue_key(REALM, "admin", "test admin", 3600, None)
            .unwrap();
        let mut loaded = dir.load().unwrap();
        loaded.config.listen.http = "127.0.0.1:0".parse().unwrap();
        loaded.config.listen.rawsocket = "127.0.0.1:0".parse().unwrap();
        loaded.config.reload_interval_ms = 100;
        loaded.config.mesh.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
        tune(&mut loaded.config);
        let node = Node::new(loaded, Some(dir.clone()));
        let running = macula_node::start(node).await.unwrap();
        TestNode {
            running,
            dir,
            admin_key,
            admin_kid,
            _tmp: tmp,
        }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.running.node
    }

    pub fn key(&self, role: &str) -> (String, String) {
        self.dir.issue_key(REALM, role, "test", 3600, None).unwrap()
    }

    pub async fn client(&self) -> macula_client::Client {
        macula_client::Client::connect(&self.running.ws_url(), REALM, &self.admin_key)
            .await
            .unwrap()
    }

    /// A raw HTTP/1.1 request; returns (status, body).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(self.running.http_addr)
            .await
            .unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
        if let Some(a) = auth {
            req.push_str(&format!("Authorization: Bearer {a}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

/// Waits for `f` to become true, polling an observable condition (used only where no event exists).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A mesh participant certified by the node's operator, connected to the node: (its handle, its
/// events, the node's peer id). What a compromised or lying node of the trust root would be.
pub async fn certified_peer(
    t: &TestNode,
) -> (
    macula_mesh::MeshHandle,
    macula_mesh::MeshEvents,
    macula_mesh::Peer,
) {
    use macula_mesh::{MeshConfig, MeshEvent};
    let op = t.dir.operator_key().unwrap();
    let kp = macula_mesh::identity::Keypair::generate_ed25519();
    let cert = macula_mesh::cert::issue_for(&op, &kp.public().to_peer_id(), 3600);
    let cfg = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        bootstrap: vec![t.running.mesh_addrs[0].parse().unwrap()],
        ..MeshConfig::default()
    };
    let (handle, mut ev) = macula_mesh::start(
        cfg,
        kp,
        cert,
        std::sync::Arc::new(macula_mesh::cert::Trust::new(op.verifying_key())),
    )
    .await
    .unwrap();
    let node = loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.recv()).await {
            Ok(Some(MeshEvent::PeerUp(p))) => break p,
            Ok(Some(_)) => {}
            other => panic!("the certified peer never connected: {other:?}"),
        }
    };
    (handle, ev, node)
}
