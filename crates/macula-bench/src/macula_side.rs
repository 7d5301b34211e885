//! The Macula side: a node in a child process and lean RawSocket/WebSocket clients.
//!
//! Past 600 lines because every scenario's Macula half is here, next to the clients they share;
//! `nats_side.rs` mirrors it scenario by scenario.

use macula_node::Load;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use macula_node::{ConfDir, Node};
use macula_wamp::rawsocket::{FrameHeader, FrameKind, Handshake};
use macula_wamp::{dict, Dict, Message, Payload, Serializer, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::{latency_figures, throughput_figure, Figure, Scenario};

const REALM: &str = "com.bench";
const SER: Serializer = Serializer::MsgPack;

/// The hidden `node` subcommand: a node tuned for measurement (no rate limit, deep queues).
pub fn run_node(
    config: &Path,
    mesh: Option<u32>,
    bootstrap: Option<String>,
    metering: bool,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = ConfDir::new(config);
        let mut loaded = dir.load()?;
        loaded.config.listen.http = "127.0.0.1:0".parse()?;
        loaded.config.listen.rawsocket = "127.0.0.1:0".parse()?;
        loaded.config.limits.rate_limit_per_second = 0;
        loaded.config.limits.outbox_capacity = 1 << 22;
        loaded.config.limits.max_sessions = 1_000_000;
        loaded.config.mesh.enabled = mesh.is_some();
        loaded.config.mesh.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
        loaded.config.mesh.identity = format!("node/{}.key", mesh.unwrap_or(0)).into();
        loaded.config.mesh.bootstrap = bootstrap.into_iter().collect();
        loaded.config.metering.enabled = metering;
        loaded.config.metering.dir = format!("node/{}-meter", mesh.unwrap_or(0)).into();
        // Replicas through this program's own exec shim (`macula-bench __exec`); limits and
        // sandbox where the machine has them.
        loaded.config.workloads.dir = format!("node/{}-workloads", mesh.unwrap_or(0)).into();
        loaded.config.workloads.require_limits = false;
        loaded.config.workloads.require_sandbox = false;
        let node = Node::new(loaded, Some(dir));
        let running = macula_node::start(node).await?;
        println!(
            "{} {} {}",
            running.http_addr,
            running.rawsocket_addr,
            running.mesh_addrs.first().map_or("-", |s| s.as_str())
        );
        std::future::pending::<()>().await;
        Ok(())
    })
}

pub struct Server {
    child: Child,
    pub http: String,
    pub raw: String,
    pub key: String,
    pub mesh: String,
    _tmp: Option<TempDir>,
}

/// A temporary directory removed on drop (no extra dependency for one use).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Server {
    pub async fn start() -> Result<Server> {
        Self::start_in(None, None, true).await
    }

    /// One node with metering on or off.
    pub async fn start_metered(metering: bool) -> Result<Server> {
        Self::start_in(None, None, metering).await
    }

    /// `n` meshed nodes sharing one trust root and config directory (each its own identity),
    /// all joined through the first.
    pub async fn start_mesh(n: u32) -> Result<Vec<Server>> {
        let a = Self::start_in(Some(1), None, true).await?;
        let dir = a._tmp.as_ref().map(|t| t.0.clone());
        let (mesh, key) = (a.mesh.clone(), a.key.clone());
        let mut all = vec![a];
        for i in 2..=n {
            all.push(Self::restart(i, &mesh, dir.clone(), &key).await?);
        }
        Ok(all)
    }

    /// Node `i` of a mesh started with [`Server::start_mesh`] (again, after a kill).
    pub async fn restart(
        i: u32,
        bootstrap: &str,
        dir: Option<std::path::PathBuf>,
        key: &str,
    ) -> Result<Server> {
        let mut s = Self::start_in(
            Some(i),
            Some((bootstrap.to_owned(), dir, key.to_owned())),
            true,
        )
        .await?;
        // The directory is the first node's to remove.
        std::mem::forget(s._tmp.take());
        Ok(s)
    }

    /// The config directory (of the first node of a mesh).
    pub fn dir(&self) -> Option<std::path::PathBuf> {
        self._tmp.as_ref().map(|t| t.0.clone())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    /// Two meshed nodes sharing one trust root: (A, B), B joined through A.
    pub async fn start_pair() -> Result<(Server, Server)> {
        let a = Self::start_in(Some(1), None, true).await?;
        let dir = a._tmp.as_ref().map(|t| t.0.clone());
        let mut b =
            Self::start_in(Some(2), Some((a.mesh.clone(), dir, a.key.clone())), true).await?;
        // The directory is A's to remove (dropping B's handle would remove it under A).
        std::mem::forget(b._tmp.take());
        Ok((a, b))
    }

    async fn start_in(
        mesh: Option<u32>,
        join: Option<(String, Option<std::path::PathBuf>, String)>,
        metering: bool,
    ) -> Result<Server> {
        if let Some((bootstrap, Some(dir), key)) = join {
            return Self::spawn(TempDir(dir), key, mesh, Some(bootstrap), metering).await;
        }
        let tmp = TempDir(std::env::temp_dir().join(format!(
            "macula-bench-{}-{}",
            std::process::id(),
            rand_suffix()
        )));
        let dir = ConfDir::new(&tmp.0);
        dir.init()?;
        dir.create_realm(REALM, None)?;
        let (_, key) = dir.issue_key(REALM, "admin", "bench", 86_400, None)?;
        Self::spawn(tmp, key, mesh, None, metering).await
    }

    async fn spawn(
        tmp: TempDir,
        key: String,
        mesh: Option<u32>,
        bootstrap: Option<String>,
        metering: bool,
    ) -> Result<Server> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("node").arg(&tmp.0);
        if !metering {
            cmd.arg("--no-metering");
        }
        if let Some(m) = mesh {
            cmd.arg("--mesh").arg(m.to_string());
        }
        if let Some(b) = bootstrap {
            cmd.arg("--bootstrap").arg(b);
        }
        let mut child = cmd.stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(out).read_line(&mut line),
        )
        .await
        .context("node start")??;
        let mut parts = line.split_whitespace();
        let http = parts
            .next()
            .ok_or_else(|| anyhow!("node did not print its addresses"))?
            .to_owned();
        let raw = parts
            .next()
            .ok_or_else(|| anyhow!("node did not print its addresses"))?
            .to_owned();
        let mesh = parts.next().unwrap_or("-").to_owned();
        Ok(Server {
            child,
            http,
            raw,
            key,
            mesh,
            _tmp: Some(tmp),
        })
    }

    /// Waits until this node's table for the bench realm holds at least `subs` subscriptions and
    /// `regs` registrations (so that interest from the other node has arrived).
    pub async fn wait_tables(&self, subs: u64, regs: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.mesh_status().await?;
            let ok = v["realms"].as_array().into_iter().flatten().any(|r| {
                r["realm"] == REALM
                    && r["subscriptions"].as_u64().unwrap_or(0) >= subs
                    && r["registrations"].as_u64().unwrap_or(0) >= regs
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("interest did not propagate between the bench nodes within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's `GET /v1/mesh`.
    pub async fn mesh_status(&self) -> Result<serde_json::Value> {
        let mut s = tokio::net::TcpStream::connect(&self.http).await?;
        let req = "GET /v1/mesh HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes()).await?;
        let mut buf = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut buf).await?;
        let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok(serde_json::from_str(body).unwrap_or_default())
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    fn rss_kib(&self) -> u64 {
        let Some(pid) = self.child.id() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A lean RawSocket client: pre-encoded frames, batched writes.
struct Raw {
    r: BufReader<OwnedReadHalf>,
    w: BufWriter<OwnedWriteHalf>,
    buf: Vec<u8>,
}

impl Raw {
    async fn join(addr: &str, key: &str) -> Result<Raw> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Raw {
            r: BufReader::with_capacity(256 * 1024, r),
            w: BufWriter::with_capacity(256 * 1024, w),
            buf: vec![],
        };
        c.w.write_all(&Handshake::encode(1 << 24, SER)).await?;
        c.w.flush().await?;
        let mut h = [0u8; 4];
        c.r.read_exact(&mut h).await?;
        Handshake::parse_reply(h).map_err(|e| anyhow!(e))?;
        let roles = dict! {"publisher" => dict!{}, "subscriber" => dict!{}, "caller" => dict!{}, "callee" => dict!{}};
        c.send(&Message::Hello {
            realm: REALM.into(),
            details: dict! {"roles" => roles, "authmethods" => vec![Value::from("ticket")]},
        })
        .await?;
        c.w.flush().await?;
        c.expect(|m| matches!(m, Message::Challenge { .. })).await?;
        c.send(&Message::Authenticate {
            signature: key.into(),
            extra: Dict::new(),
        })
        .await?;
        c.w.flush().await?;
        c.expect(|m| matches!(m, Message::Welcome { .. })).await?;
        Ok(c)
    }

    async fn send(&mut self, m: &Message) -> Result<()> {
        let b = SER.encode(m);
        self.w
            .write_all(&FrameHeader::encode(FrameKind::Message, b.len()))
            .await?;
        self.w.write_all(&b).await?;
        Ok(())
    }

    /// Reads one frame into the internal buffer.
    async fn frame(&mut self) -> Result<()> {
        let mut h = [0u8; 4];
        self.r.read_exact(&mut h).await?;
        let h = FrameHeader::parse(h).map_err(|e| anyhow!(e))?;
        self.buf.resize(h.len, 0);
        self.r.read_exact(&mut self.buf).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Message> {
        self.frame().await?;
        Ok(SER.decode(&self.buf)?)
    }

    async fn expect(&mut self, f: impl Fn(&Message) -> bool) -> Result<Message> {
        let m = self.recv().await?;
        if f(&m) {
            Ok(m)
        } else {
            bail!("unexpected {m:?}")
        }
    }
}

/// Counts RawSocket frames in large reads (one timeout and one clock read per read call, not per
/// message) until `target` arrived or nothing came for 3 s.
async fn count_frames(c: &mut Raw, target: u64) -> (u64, Instant) {
    let mut buf = vec![0u8; 256 * 1024];
    let (mut filled, mut n, mut last) = (0usize, 0u64, Instant::now());
    while n < target {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let k = match tokio::time::timeout(Duration::from_secs(3), c.r.read(&mut buf[filled..]))
            .await
        {
            Ok(Ok(k)) if k > 0 => k,
            _ => break,
        };
        filled += k;
        last = Instant::now();
        let mut pos = 0;
        while filled - pos >= 4 {
            let len = ((buf[pos + 1] as usize) << 16)
                | ((buf[pos + 2] as usize) << 8)
                | buf[pos + 3] as usize;
            if filled - pos < 4 + len {
                break;
            }
            pos += 4 + len;
            n += 1;
        }
        buf.copy_within(pos..filled, 0);
        filled -= pos;
    }
    (n, last)
}

fn payload(size: usize) -> Payload {
    Payload::args(vec![Value::Bin(vec![b'x'; size])])
}

pub async fn run(s: &Server, sc: &Scenario) -> Result<Vec<Figure>> {
    match sc {
        Scenario::Pubsub {
            messages,
            size,
            subscribers,
        } => pubsub(s, s, "macula", *messages, *size, *subscribers).await,
        Scenario::RpcLatency { calls } => rpc_latency(s, s, "macula", *calls).await,
        Scenario::RpcThroughput { callers, seconds } => rpc_throughput(s, *callers, *seconds).await,
        Scenario::Idle { sessions } => idle(s, *sessions).await,
        _ => Ok(vec![]),
    }
}

/// The cross-node scenarios: each starts a pair of meshed nodes (A, B).
pub async fn run_cross(sc: &Scenario) -> Result<Vec<Figure>> {
    match sc {
        Scenario::CrossPubsub { messages, size } => {
            // The same workload on one node first, for the side-by-side ratio.
            let one = Server::start().await?;
            let mut figs = pubsub(&one, &one, "1 node", *messages, *size, 1).await?;
            one.stop().await;
            let (a, b) = Server::start_pair().await?;
            let r = pubsub(&a, &b, "mesh", *messages, *size, 1).await;
            // How often node A paused its publisher for the link, and whether it lost anything.
            let v = a.mesh_status().await.unwrap_or_default();
            a.stop().await;
            b.stop().await;
            let mut r = r?;
            for f in &mut r {
                f.note.push_str(&format!(
                    "; link congested {}×, {} frames dropped",
                    v["congestion_events"].as_u64().unwrap_or(0),
                    v["frames"]["dropped"].as_u64().unwrap_or(0)
                ));
            }
            figs.extend(r);
            Ok(figs)
        }
        Scenario::CrossRpc { calls } => {
            let one = Server::start().await?;
            let mut figs = rpc_latency(&one, &one, "1 node", *calls).await?;
            one.stop().await;
            let (a, b) = Server::start_pair().await?;
            let r = rpc_latency(&a, &b, "mesh", *calls).await;
            a.stop().await;
            b.stop().await;
            figs.extend(r?);
            Ok(figs)
        }
        _ => Ok(vec![]),
    }
}

/// Publisher on `s`, subscribers on `sub_node` (the same node, or another node of the mesh).
async fn pubsub(
    s: &Server,
    sub_node: &Server,
    label: &'static str,
    messages: u64,
    size: usize,
    subscribers: usize,
) -> Result<Vec<Figure>> {
    let topic = "com.bench.t";
    let mut subs = vec![];
    for _ in 0..subscribers {
        let mut c = Raw::join(&sub_node.raw, &sub_node.key).await?;
        c.send(&Message::Subscribe {
            request: 1,
            options: Dict::new(),
            topic: topic.into(),
        })
        .await?;
        c.w.flush().await?;
        c.expect(|m| matches!(m, Message::Subscribed { .. }))
            .await?;
        subs.push(c);
    }
    if !std::ptr::eq(s, sub_node) {
        s.wait_tables(1, 0).await?;
    }
    let mut publ = Raw::join(&s.raw, &s.key).await?;
    let frame = {
        let b = SER.encode(&Message::Publish {
            request: 1,
            options: Dict::new(),
            topic: topic.into(),
            payload: payload(size),
        });
        let mut f = FrameHeader::encode(FrameKind::Message, b.len()).to_vec();
        f.extend_from_slice(&b);
        f
    };
    let start = Instant::now();
    let mut tasks = vec![];
    for mut c in subs {
        tasks.push(tokio::spawn(
            async move { count_frames(&mut c, messages).await },
        ));
    }
    crate::measure_pubsub(
        label,
        &mut publ.w,
        &frame,
        messages,
        subscribers,
        size,
        start,
        tasks,
    )
    .await
}

async fn callee(s: &Server) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let mut c = Raw::join(&s.raw, &s.key).await?;
    c.send(&Message::Register {
        request: 1,
        options: Dict::new(),
        procedure: "com.bench.echo".into(),
    })
    .await?;
    c.w.flush().await?;
    c.expect(|m| matches!(m, Message::Registered { .. }))
        .await?;
    Ok(tokio::spawn(async move {
        loop {
            if let Message::Invocation {
                request, payload, ..
            } = c.recv().await?
            {
                c.send(&Message::Yield {
                    request,
                    options: Dict::new(),
                    payload,
                })
                .await?;
            }
            if c.r.buffer().is_empty() {
                c.w.flush().await?;
            }
        }
    }))
}

/// The CALL every RPC scenario makes: 64 bytes to the echo callee.
fn echo_call(request: u64) -> Message {
    Message::Call {
        request,
        options: Dict::new(),
        procedure: "com.bench.echo".into(),
        payload: payload(64),
    }
}

/// Caller on `s`, callee on `callee_node` (the same node, or another node of the mesh).
async fn rpc_latency(
    s: &Server,
    callee_node: &Server,
    label: &'static str,
    calls: u64,
) -> Result<Vec<Figure>> {
    let callee = callee(callee_node).await?;
    if !std::ptr::eq(s, callee_node) {
        s.wait_tables(0, 3).await?;
    }
    let mut c = Raw::join(&s.raw, &s.key).await?;
    let mut lat = Vec::with_capacity(calls as usize);
    for i in 1..=calls + 1000 {
        let t = Instant::now();
        c.send(&echo_call(i)).await?;
        c.w.flush().await?;
        c.expect(|m| matches!(m, Message::Result { .. })).await?;
        if i > 1000 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    callee.abort();
    Ok(latency_figures(
        label,
        lat,
        format!("{calls} sequential calls"),
    ))
}

async fn rpc_throughput(s: &Server, callers: usize, seconds: u64) -> Result<Vec<Figure>> {
    let callee = callee(s).await?;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = vec![];
    for _ in 0..callers {
        let mut c = Raw::join(&s.raw, &s.key).await?;
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                i += 1;
                c.send(&echo_call(i)).await?;
                c.w.flush().await?;
                c.expect(|m| matches!(m, Message::Result { .. })).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let figure = throughput_figure("macula", callers, tasks, &done).await;
    callee.abort();
    Ok(vec![figure?])
}

async fn idle(s: &Server, sessions: usize) -> Result<Vec<Figure>> {
    let before = s.rss_kib();
    let url = format!("ws://{}/ws", s.http);
    let mut conns = Vec::with_capacity(sessions);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = vec![];
    for _ in 0..sessions {
        let url = url.clone();
        let key = s.key.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await?;
            ws_join(&url, &key).await
        }));
    }
    for t in tasks {
        conns.push(t.await??);
    }
    // Let the node settle, then read its resident memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = s.rss_kib();
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / sessions as f64;
    drop(conns);
    Ok(vec![
        Figure {
            scenario: format!("idle ws sessions ({sessions}) RSS"),
            server: "macula",
            value: after as f64 / 1024.0,
            unit: "MiB",
            note: format!("{before} KiB before"),
        },
        Figure {
            scenario: "idle ws session memory".into(),
            server: "macula",
            value: per,
            unit: "bytes",
            note: "per session".into(),
        },
    ])
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_join(url: &str, key: &str) -> Result<WsStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as W;
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", SER.subprotocol().parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let hello = Message::Hello {
        realm: REALM.into(),
        details: dict! {"roles" => dict!{"subscriber" => dict!{}}, "authmethods" => vec![Value::from("ticket")]},
    };
    ws.send(W::Binary(SER.encode(&hello).into())).await?;
    let _challenge = ws.next().await.ok_or_else(|| anyhow!("closed"))??;
    ws.send(W::Binary(
        SER.encode(&Message::Authenticate {
            signature: key.into(),
            extra: Dict::new(),
        })
        .into(),
    ))
    .await?;
    match ws.next().await.ok_or_else(|| anyhow!("closed"))?? {
        W::Binary(b) if matches!(SER.decode(&b)?, Message::Welcome { .. }) => Ok(ws),
        other => bail!("no welcome: {other:?}"),
    }
}
