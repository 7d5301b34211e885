//! `macula-bench heal`: self-healing on real node processes. `nodes` bench nodes form a mesh;
//! a payload of `replicas` replicas (`sleep`) is deployed through the first. Then, `kills`
//! times: SIGKILL a node (not the first) that runs a replica, and time until every replica
//! runs on a live node again, polling each live node's own replicas every 20 ms; restart the
//! killed node and wait until it is linked again. The lease term is the nodes' default
//! (`workloads.lease_term_ms`): a dead node's lease lapses within it, then the slot's
//! authorities tender it again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use macula_router::auth::credential::{bearer_proof, public_form};
use macula_workloads::record::DeployRecord;

use crate::macula_side::Server;
use crate::Figure;

const REALM: &str = "com.bench";

/// One HTTP/1.1 request with a bearer key; the status and the JSON answer.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> Result<(u16, serde_json::Value)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes()).await?;
    let mut buf = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut buf).await?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let text = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(text).unwrap_or_default()))
}

/// Replica index → node, from each live node's own view.
async fn placed(nodes: &[Option<Server>], key: &str) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for n in nodes.iter().flatten() {
        let path = format!("/v1/realms/{REALM}/replicas?local=true");
        if let Ok((200, v)) = http(&n.http, "GET", &path, key, None).await {
            for r in v["items"].as_array().into_iter().flatten() {
                if r["state"] == "running" {
                    if let (Some(i), Some(node)) = (r["replica"].as_u64(), r["node"].as_str()) {
                        out.insert(i, node.to_owned());
                    }
                }
            }
        }
    }
    out
}

async fn peer_id(s: &Server) -> Result<String> {
    let v = s.mesh_status().await?;
    v["peer_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no peer id"))
}

pub async fn run(n: u32, kills: usize, replicas: u32) -> Result<Vec<Figure>> {
    if n < 3 || replicas >= n {
        bail!("heal needs at least 3 nodes and fewer replicas than nodes");
    }
    let servers = Server::start_mesh(n).await?;
    let key = servers[0].key.clone();
    let bootstrap = servers[0].mesh.clone();
    let dir = servers[0].dir();
    let mut ids = vec![];
    for s in &servers {
        ids.push(peer_id(s).await?);
    }
    let mut nodes: Vec<Option<Server>> = servers.into_iter().map(Some).collect();
    let api = nodes[0]
        .as_ref()
        .map(|s| s.http.clone())
        .unwrap_or_default();

    let manifest = format!(
        "kind: payload\nname: heal\nreplicas: {replicas}\ncommand: [sleep, \"1000000\"]\nrestart:\n  backoff:\n    initial: 100ms\n"
    );
    let record = DeployRecord::signed(
        REALM,
        "heal",
        1,
        Some(manifest),
        macula_node::confdir::now_secs(),
        &public_form(&key).ok_or_else(|| anyhow!("the bench key has no public form"))?,
        |d| bearer_proof(&key, d),
    )
    .ok_or_else(|| anyhow!("cannot sign"))?;
    let path = format!("/v1/realms/{REALM}/workloads");
    let (status, v) = http(
        &api,
        "POST",
        &path,
        &key,
        Some(&serde_json::to_string(&record)?),
    )
    .await?;
    if status != 201 {
        bail!("deploy refused: {status} {v}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while placed(&nodes, &key).await.len() < replicas as usize {
        if Instant::now() > deadline {
            bail!("the payload was not placed within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut times = vec![];
    for round in 0..kills {
        let now = placed(&nodes, &key).await;
        // A node other than the first that runs a replica.
        let Some(victim) = (1..nodes.len()).find(|i| now.values().any(|p| *p == ids[*i])) else {
            bail!("no replica on a node other than the first: {now:?}");
        };
        let gone = ids[victim].clone();
        let t0 = Instant::now();
        if let Some(s) = nodes[victim].as_mut() {
            s.kill();
        }
        nodes[victim] = None;
        loop {
            let p = placed(&nodes, &key).await;
            if p.len() == replicas as usize && p.values().all(|x| *x != gone) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("round {round}: not healed within 60 s: {p:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        // The node comes back (same identity), and links again before the next kill.
        let s = Server::restart(victim as u32 + 1, &bootstrap, dir.clone(), &key).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = s.mesh_status().await?;
            if v["peers"].as_array().map_or(0, Vec::len) >= (n - 1) as usize {
                break;
            }
            if Instant::now() > deadline {
                bail!("the restarted node did not link to every node within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nodes[victim] = Some(s);
    }
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() as f64 - 1.0) * p) as usize];
    let note = format!(
        "{n} node processes, {replicas} replicas, {kills} SIGKILLs: kill to the replica running on another node"
    );
    Ok(vec![
        Figure {
            scenario: format!("heal, {n} nodes: p50"),
            server: "macula",
            value: q(0.5),
            unit: "ms",
            note: note.clone(),
        },
        Figure {
            scenario: format!("heal, {n} nodes: p95"),
            server: "macula",
            value: q(0.95),
            unit: "ms",
            note: "goal p95 ≤ 5 s (lease term 3 s)".into(),
        },
    ])
}
