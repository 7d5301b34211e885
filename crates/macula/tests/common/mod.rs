//! Helpers shared by the multi-node tests: real `macula node` processes and waiting on them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use macula_client::ConnectOptions;

pub mod work;

pub const BIN: &str = env!("CARGO_BIN_EXE_macula");

pub struct NodeProc {
    pub child: Child,
    pub ws: String,
    pub http: String,
    pub mesh: String,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `macula node` on loopback and waits for the lines announcing its addresses.
pub fn start_node(config: &Path, bootstrap: Option<&str>) -> NodeProc {
    start_node_in(&[], "127.0.0.1", "127.0.0.1", config, bootstrap)
}

/// Starts `macula node` behind `prefix` (e.g. `ip netns exec NS`), serving clients on `client_ip`
/// and the mesh on `mesh_ip`.
pub fn start_node_in(
    prefix: &[&str],
    client_ip: &str,
    mesh_ip: &str,
    config: &Path,
    bootstrap: Option<&str>,
) -> NodeProc {
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(["node", "--config"])
        .arg(config)
        .args(["--http", &format!("{client_ip}:0")])
        .args(["--rawsocket", &format!("{client_ip}:0")])
        .args(["--mesh-listen", &format!("/ip4/{mesh_ip}/udp/0/quic-v1")])
        // MACULA_TEST_LOG=macula_node=debug shows the nodes' logs in the test's output.
        .env(
            "MACULA_LOG",
            std::env::var("MACULA_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let mut child = cmd.spawn().expect("macula node starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let echo = std::env::var_os("MACULA_TEST_LOG").is_some();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if echo {
                eprintln!("{line}");
            }
            let _ = tx.send(line);
        }
    });
    let (mut ws, mut http, mut mesh) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while mesh.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("node prints its addresses");
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "WebSocket") {
            ws = Some(words[i + 1].to_string());
            http = Some(
                words
                    .last()
                    .unwrap()
                    .trim_start_matches("http://")
                    .to_string(),
            );
        }
        if let Some(i) = words.iter().position(|w| *w == "mesh") {
            mesh = Some(words[i + 1].to_string());
        }
    }
    NodeProc {
        child,
        ws: ws.unwrap(),
        http: http.unwrap(),
        mesh: mesh.unwrap(),
    }
}

pub fn cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "macula {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub async fn mesh_status(http: &str) -> serde_json::Value {
    let out = tokio::process::Command::new(BIN)
        .args(["--json", "mesh", "status", "--http", http])
        .output()
        .await
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn opts(url: &str, key: &str) -> ConnectOptions {
    let mut o = ConnectOptions::new(url, super::REALM, key);
    o.reconnect = false;
    o
}

/// Waits until `http`'s node shows, for the realm, at least `subs` subscriptions and `regs`
/// registrations (its own, its services' and those of linked nodes).
pub async fn wait_tables(http: &str, subs: u64, regs: u64) {
    eventually("interest to propagate", Duration::from_secs(15), || async {
        let v = mesh_status(http).await;
        let r = v["realms"]
            .as_array()?
            .iter()
            .find(|r| r["realm"] == super::REALM)?
            .clone();
        (r["subscriptions"].as_u64()? >= subs && r["registrations"].as_u64()? >= regs).then_some(())
    })
    .await
}

/// Config directories `root/n1..n{n}` for nodes of one trust root: the first makes the operator
/// key and `realm` and issues an admin key (returned); the others get the trust files; each
/// gets `node_yaml` as its `node.yaml`.
pub fn node_homes(
    root: &Path,
    n: usize,
    realm: &str,
    node_yaml: &str,
) -> (Vec<std::path::PathBuf>, String) {
    let homes: Vec<_> = (1..=n).map(|i| root.join(format!("n{i}"))).collect();
    let c1 = macula_node::ConfDir::new(&homes[0]);
    c1.init().unwrap();
    c1.create_realm(realm, None).unwrap();
    let (_, admin) = c1.issue_key(realm, "admin", "test", 3600, None).unwrap();
    for d in &homes {
        std::fs::create_dir_all(d.join("trust")).unwrap();
        if d != &homes[0] {
            for f in ["trust/operator.pub", "trust/operator.key"] {
                std::fs::copy(homes[0].join(f), d.join(f)).unwrap();
            }
        }
        std::fs::write(d.join("node.yaml"), node_yaml).unwrap();
    }
    (homes, admin)
}

/// `ip ARGS` (iproute2); what it said on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The peer id of the node at `http`, once it is linked to a peer.
pub async fn linked_peer_id(http: &str) -> String {
    eventually("a node's peer id", Duration::from_secs(20), || async {
        let v = mesh_status(http).await;
        let peers = v["peers"].as_array().map_or(0, Vec::len);
        (peers >= 1)
            .then(|| v["peer_id"].as_str().map(str::to_owned))
            .flatten()
    })
    .await
}
