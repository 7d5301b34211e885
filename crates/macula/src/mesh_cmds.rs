//! `macula mesh ...` (operator view of the mesh) and `macula dht ...` (application records).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use macula_client::CallOptions;
use macula_wamp::{Dict, Payload, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::local::default_home;
use crate::Conn;

#[derive(Subcommand)]
pub enum MeshCmd {
    /// This node's peer id, addresses, peers and interest tables.
    Status(HttpArg),
    /// Connected peers with their address and latency.
    Peers(HttpArg),
    /// Issue the operator's certificate for a node's peer id (run where trust/operator.key is);
    /// save the output as the node's `node/node.cert` (mesh.cert). Certificates expire; a node
    /// asks its peers for a new one when a third of the validity is left, and a node holding the
    /// operator key issues it, so a connected node renews by itself.
    Certify {
        /// The node's peer id, as printed by `macula node` or `macula mesh status`.
        peer_id: String,
        /// How long the certificate is valid: a number with s, m, h or d (at most 400d).
        #[arg(long, default_value = "90d", value_parser = parse_validity)]
        valid_for: u64,
        #[arg(long, env = "MACULA_HOME", default_value_os_t = default_home())]
        home: PathBuf,
    },
    /// Revoke a node (run where trust/operator.key is): every certificate that admitted it until
    /// now (and five minutes ahead, for clock skew), renewals included, stops being valid; to admit
    /// it again later, certify it anew. A node running on this home picks the revocation up within a second and
    /// sends it across the mesh; every node then disconnects the revoked one and refuses it.
    /// The revocation is also printed (hex): drop it as `trust/revoked-nodes/<peer>.rev` on any
    /// node to spread it from there.
    Revoke {
        /// The node's peer id.
        peer_id: String,
        #[arg(long, env = "MACULA_HOME", default_value_os_t = default_home())]
        home: PathBuf,
    },
}

/// `90d`, `12h`, `30m`, `45s` (or plain seconds) → seconds, at most 400 days.
fn parse_validity(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m, h or d (like 90d)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d (like 90d)")),
    };
    if secs == 0 || secs > macula_mesh::cert::MAX_LIFETIME_SECS {
        return Err(format!("{s:?}: must be between 1s and 400d"));
    }
    Ok(secs)
}

#[derive(Args)]
pub struct HttpArg {
    /// The node's HTTP address.
    #[arg(long, env = "MACULA_HTTP", default_value = "127.0.0.1:8080")]
    pub http: String,
}

/// GET over plain HTTP/1.1 (the node's own endpoints; no TLS on loopback).
async fn http_get(addr: &str, path: &str) -> Result<serde_json::Value> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("cannot reach the node at {addr} (is it running? --http sets the address)")
        })?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .with_context(|| format!("unexpected answer from {addr}{path}: {head}"))?;
    if let Some(e) = v.get("error") {
        bail!("{}", e["message"].as_str().unwrap_or("error"));
    }
    Ok(v)
}

/// The operator key in `home` and the peer id, for `certify` and `revoke`.
fn operator_and_peer(
    home: &std::path::Path,
    peer_id: &str,
    what: &str,
) -> Result<(
    macula_node::ConfDir,
    ed25519_dalek::SigningKey,
    macula_mesh::Peer,
)> {
    let dir = macula_node::ConfDir::new(home);
    let op = dir.operator_key().with_context(|| {
        format!(
            "{} has no trust/operator.key; {what} on the operator's machine",
            home.display()
        )
    })?;
    let peer = peer_id
        .parse()
        .map_err(|e| anyhow!("{peer_id:?} is not a peer id: {e}"))?;
    Ok((dir, op, peer))
}

pub async fn mesh(cmd: MeshCmd, json: bool) -> Result<()> {
    match cmd {
        MeshCmd::Revoke { peer_id, home } => {
            let (dir, op, peer) = operator_and_peer(&home, &peer_id, "revoke")?;
            // Covering the clock skew between machines: certificates admitted up to five
            // minutes from now (by this clock) are void too.
            let at = macula_mesh::cert::now_secs() + macula_mesh::cert::CLOCK_SKEW_SECS;
            let r = macula_mesh::cert::Revocation::issue(&op, &peer, at);
            let path = dir.save_node_revocation(&peer_id, &r.bytes)?;
            let text = hex::encode(&r.bytes);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"peer_id": peer_id, "revocation": text, "file": path})
                );
            } else {
                println!("{text}");
                eprintln!(
                    "revoked {peer_id} (saved as {}); a node running on this home spreads it across the mesh within seconds",
                    path.display()
                );
            }
            Ok(())
        }
        MeshCmd::Certify {
            peer_id,
            valid_for,
            home,
        } => {
            let (dir, op, peer) = operator_and_peer(&home, &peer_id, "certify")?;
            // A revocation voids what it admitted until its time (five minutes after `revoke`,
            // for clock skew): a certificate made before then would be void from the start.
            let rev = dir.revocations_dir().join(format!("{peer_id}.rev"));
            if let Ok(text) = std::fs::read_to_string(&rev) {
                let r = hex::decode(text.trim()).ok().and_then(|b| {
                    macula_mesh::cert::Revocation::verify(&op.verifying_key(), &b).ok()
                });
                if let Some(r) = r.filter(|r| r.revoked_at >= macula_mesh::cert::now_secs()) {
                    bail!(
                        "{peer_id} was revoked; certificates admitting it before {} are void. \
                         Certify it after that time.",
                        macula_node::confdir::rfc3339(r.revoked_at + 1)
                    );
                }
            }
            let cert = hex::encode(macula_mesh::cert::issue_for(&op, &peer, valid_for));
            if json {
                println!("{}", serde_json::json!({"peer_id": peer_id, "cert": cert}));
            } else {
                println!("{cert}");
            }
            Ok(())
        }
        MeshCmd::Status(h) => {
            let v = http_get(&h.http, "/v1/mesh").await?;
            if json {
                println!("{v}");
                return Ok(());
            }
            println!("peer id   {}", v["peer_id"].as_str().unwrap_or("?"));
            for a in v["listen"].as_array().into_iter().flatten() {
                println!("listen    {}", a.as_str().unwrap_or("?"));
            }
            let f = &v["frames"];
            println!(
                "frames    in {}  out {}  dropped {}  malformed {}  rejected {}",
                f["in"], f["out"], f["dropped"], f["malformed"], f["rejected"]
            );
            if let Some(c) = v["cert"].as_object() {
                println!(
                    "cert      issued {}, valid until {}",
                    c["issued_at"].as_str().unwrap_or("?"),
                    c["not_after"].as_str().unwrap_or("?")
                );
            }
            for r in v["revoked_nodes"].as_array().into_iter().flatten() {
                println!("revoked   {}", r.as_str().unwrap_or("?"));
            }
            println!("peers     {}", v["peers"].as_array().map_or(0, |p| p.len()));
            print_peers(&v);
            println!(
                "\n{:<32} {:>8} {:>6} {:>13} {:>13}",
                "REALM", "SESSIONS", "LINKS", "SUBSCRIPTIONS", "REGISTRATIONS"
            );
            for r in v["realms"].as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:>8} {:>6} {:>13} {:>13}",
                    r["realm"].as_str().unwrap_or("?"),
                    r["sessions"].to_string(),
                    r["links"].to_string(),
                    r["subscriptions"].to_string(),
                    r["registrations"].to_string()
                );
            }
            Ok(())
        }
        MeshCmd::Peers(h) => {
            let v = http_get(&h.http, "/v1/mesh").await?;
            if json {
                println!("{}", v["peers"]);
            } else {
                print_peers(&v);
            }
            Ok(())
        }
    }
}

fn print_peers(v: &serde_json::Value) {
    println!("{:<54} {:<34} {:>10} CERTIFIED", "PEER", "ADDRESS", "RTT");
    for p in v["peers"].as_array().into_iter().flatten() {
        let rtt = p["rtt_us"].as_u64().map_or("-".to_string(), |us| {
            format!("{:.2} ms", us as f64 / 1000.0)
        });
        println!(
            "{:<54} {:<34} {:>10} {}",
            p["peer_id"].as_str().unwrap_or("?"),
            p["address"].as_str().unwrap_or("?"),
            rtt,
            if p["certified"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
        );
    }
}

#[derive(Subcommand)]
pub enum DhtCmd {
    /// Store a value under a key of the realm: `macula dht put service.db '{"host": "10.0.0.5"}'`.
    Put {
        /// The record's key within the realm.
        #[arg(value_name = "KEY")]
        name: String,
        /// JSON value.
        value: String,
        /// Lifetime in seconds [default and maximum: the node's mesh.dht_max_ttl_s].
        #[arg(long)]
        ttl: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Look a key of the realm up: `macula dht get service.db`.
    Get {
        #[arg(value_name = "KEY")]
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

pub async fn dht(cmd: DhtCmd, json: bool) -> Result<()> {
    let (conn, procedure, payload) = match cmd {
        DhtCmd::Put {
            name: key,
            value,
            ttl,
            conn,
        } => {
            let v: serde_json::Value = serde_json::from_str(&value).with_context(|| {
                format!("the value must be JSON (quote strings: '\"{value}\"')")
            })?;
            let mut kwargs = Dict::new();
            if let Some(t) = ttl {
                kwargs.insert("ttl".into(), Value::from(t));
            }
            let p = Payload::new(vec![Value::Str(key), Value::from(v)], kwargs);
            (conn, "macula.dht.put", p)
        }
        DhtCmd::Get { name: key, conn } => {
            (conn, "macula.dht.get", Payload::args(vec![Value::Str(key)]))
        }
    };
    let client = conn.connect(false).await?;
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(30)),
        ..CallOptions::default()
    };
    let r = client
        .call_with(procedure, payload, opts)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if json {
        println!("{}", r.to_json());
    } else if procedure == "macula.dht.put" {
        println!(
            "stored (acknowledged by {} node(s) of the mesh; expires at unix {})",
            r.kwargs
                .get("replicas")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            r.kwargs
                .get("expires_at")
                .and_then(Value::as_u64)
                .unwrap_or(0)
        );
    } else {
        let v = r.args.first().cloned().unwrap_or(Value::Null);
        println!("{}", serde_json::Value::from(&v));
    }
    client.close().await;
    Ok(())
}
