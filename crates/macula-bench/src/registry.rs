//! The registry's figures: API-key verification on the data plane (what a session join pays),
//! and REST create/list throughput on embedded SQLite, over loopback HTTP/1.1 keep-alive with a
//! lean raw client (as the other scenarios, so the figure measures the server).

use macula_node::Load;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use macula_node::ConfDir;
use macula_registry::{Registry, RegistryConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::Figure;

/// One keep-alive HTTP/1.1 connection.
struct Http {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    host: String,
    token: String,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Result<Http> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Http {
            r: BufReader::new(r),
            w,
            host: addr.to_string(),
            token: String::new(),
        })
    }

    async fn call(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let auth = if self.token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {}\r\n", self.token)
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.w.write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.r.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse()?;
                }
            }
        }
        let mut buf = vec![0u8; len];
        self.r.read_exact(&mut buf).await?;
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }
}

pub async fn run(requests: u64, clients: usize) -> Result<Vec<Figure>> {
    let tmp = std::env::temp_dir().join(format!("macula-bench-registry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let dir = ConfDir::new(&tmp);
    dir.init()?;
    let db = macula_registry::db::sqlite(&tmp.join("registry.db")).await?;
    let reg = Registry::new(db, RegistryConfig::default(), dir.clone(), None).await?;
    let app = macula_registry::http::router(reg, 64 << 10)
        .into_make_service_with_connect_info::<SocketAddr>();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });

    let mut c = Http::connect(addr).await?;
    let creds = r#"{"email": "bench@example.com", "password": "a long bench password"}"#;
    c.call("POST", "/v1/accounts", creds).await?;
    let (s, body) = c.call("POST", "/v1/sessions", creds).await?;
    if s != 201 {
        bail!("login failed: {s} {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let token = v["token"].as_str().context("no token")?.to_owned();
    c.token = token.clone();
    let (s, body) = c
        .call("POST", "/v1/realms", r#"{"name": "com.bench.app"}"#)
        .await?;
    if s != 201 {
        bail!("register failed: {s} {body}");
    }

    let clients = clients.max(1);
    let per = (requests / clients as u64).max(1);
    let phase = |method: &'static str, path: &'static str, body: &'static str| {
        let token = token.clone();
        async move {
            let started = Instant::now();
            let mut tasks = vec![];
            for _ in 0..clients {
                let token = token.clone();
                tasks.push(tokio::spawn(async move {
                    let mut h = Http::connect(addr).await?;
                    h.token = token;
                    let mut keys = vec![];
                    for _ in 0..per {
                        let (s, b) = h.call(method, path, body).await?;
                        if !(200..300).contains(&s) {
                            bail!("{method} {path}: {s} {b}");
                        }
                        if method == "POST" && keys.len() < 200 {
                            let v: serde_json::Value = serde_json::from_str(&b)?;
                            keys.push(v["key"].as_str().unwrap_or_default().to_owned());
                        }
                    }
                    Ok::<_, anyhow::Error>(keys)
                }));
            }
            let mut keys = vec![];
            for t in tasks {
                keys.extend(t.await??);
            }
            Ok::<_, anyhow::Error>((per * clients as u64, started.elapsed(), keys))
        }
    };
    let (n, took, keys) = phase(
        "POST",
        "/v1/realms/com.bench.app/keys",
        r#"{"name": "bench", "role": "service_account"}"#,
    )
    .await?;
    let create_rate = n as f64 / took.as_secs_f64();
    let (n, took, _) = phase("GET", "/v1/realms/com.bench.app/keys?limit=50", "").await?;
    let list_rate = n as f64 / took.as_secs_f64();
    server.abort();

    // Data plane: what verifying a key costs a session join, cold (first sight: signatures) and
    // for a returning key (cached by its hash). No database is involved on either path.
    let loaded = dir.load()?;
    let now = macula_node::confdir::now_secs();
    let mut cold = vec![];
    for k in &keys {
        let auth = macula_router::auth::Authenticator::new(loaded.operator, HashSet::new());
        let t = Instant::now();
        auth.verify(k, now).map_err(|e| anyhow::anyhow!("{e}"))?;
        cold.push(t.elapsed().as_secs_f64() * 1e6);
    }
    cold.sort_by(f64::total_cmp);
    let auth = macula_router::auth::Authenticator::new(loaded.operator, HashSet::new());
    let key = keys.first().context("no key created")?;
    auth.verify(key, now).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rounds = 200_000u32;
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(auth.verify(std::hint::black_box(key), now).is_ok());
    }
    let warm = t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(vec![
        Figure {
            scenario: "registry REST create key (SQLite)".into(),
            server: "macula",
            value: create_rate,
            unit: "req/s",
            note: format!("{clients} keep-alive clients, {n} requests; each a transaction with its audit entry"),
        },
        Figure {
            scenario: "registry REST list keys (SQLite)".into(),
            server: "macula",
            value: list_rate,
            unit: "req/s",
            note: format!("{clients} clients, pages of 50 of {} keys", keys.len().max(n as usize)),
        },
        Figure {
            scenario: "key verification, returning key".into(),
            server: "macula",
            value: warm,
            unit: "µs",
            note: format!("per session join (hash lookup); cold first sight p50 {:.1} µs, p99 {:.1} µs (two Ed25519 verifications)", cold[cold.len() / 2], cold[cold.len() * 99 / 100]),
        },
    ])
}
