//! The NATS side: Debian's `nats-server` in a child process and a lean text-protocol client.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::{latency_figures, throughput_figure, Figure, Scenario};

pub struct Server {
    child: Child,
    addr: String,
}

impl Server {
    pub async fn start() -> Result<Server> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("nats-server not found (apt-get install nats-server)")?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Server { child, addr })
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

struct Nats {
    r: BufReader<OwnedReadHalf>,
    w: BufWriter<OwnedWriteHalf>,
    line: Vec<u8>,
    body: Vec<u8>,
}

impl Nats {
    async fn connect(addr: &str) -> Result<Nats> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Nats {
            r: BufReader::with_capacity(256 * 1024, r),
            w: BufWriter::with_capacity(256 * 1024, w),
            line: vec![],
            body: vec![],
        };
        c.read_line().await?; // INFO
        c.w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            .await?;
        c.ping().await?;
        Ok(c)
    }

    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = self.r.read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            bail!("nats closed the connection");
        }
        Ok(())
    }

    /// Round trip so that everything sent before is processed.
    async fn ping(&mut self) -> Result<()> {
        self.w.write_all(b"PING\r\n").await?;
        self.w.flush().await?;
        loop {
            self.read_line().await?;
            if self.line.starts_with(b"PONG") {
                return Ok(());
            }
        }
    }

    /// Reads until the next MSG; returns its reply subject, if any.
    async fn next_msg(&mut self) -> Result<Option<String>> {
        loop {
            self.read_line().await?;
            if self.line.starts_with(b"MSG ") {
                let text = std::str::from_utf8(&self.line)?.trim_end().to_owned();
                let parts: Vec<&str> = text.split(' ').collect();
                let len: usize = parts.last().ok_or_else(|| anyhow!("bad MSG"))?.parse()?;
                self.body.resize(len + 2, 0);
                self.r.read_exact(&mut self.body).await?;
                return Ok(if parts.len() == 5 {
                    Some(parts[3].to_owned())
                } else {
                    None
                });
            } else if self.line.starts_with(b"PING") {
                self.w.write_all(b"PONG\r\n").await?;
                self.w.flush().await?;
            } else if self.line.starts_with(b"-ERR") {
                bail!("nats: {}", String::from_utf8_lossy(&self.line));
            }
        }
    }
}

pub async fn run(s: &Server, sc: &Scenario) -> Result<Vec<Figure>> {
    match sc {
        Scenario::Pubsub {
            messages,
            size,
            subscribers,
        } => pubsub(s, *messages, *size, *subscribers).await,
        Scenario::RpcLatency { calls } => rpc_latency(s, *calls).await,
        Scenario::RpcThroughput { callers, seconds } => rpc_throughput(s, *callers, *seconds).await,
        _ => Ok(vec![]),
    }
}

async fn pubsub(s: &Server, messages: u64, size: usize, subscribers: usize) -> Result<Vec<Figure>> {
    let mut subs = vec![];
    for _ in 0..subscribers {
        let mut c = Nats::connect(&s.addr).await?;
        c.w.write_all(b"SUB bench.t 1\r\n").await?;
        c.ping().await?;
        subs.push(c);
    }
    let mut publ = Nats::connect(&s.addr).await?;
    let mut frame = format!("PUB bench.t {size}\r\n").into_bytes();
    frame.extend(std::iter::repeat_n(b'x', size));
    frame.extend_from_slice(b"\r\n");
    let start = Instant::now();
    let mut tasks = vec![];
    for mut c in subs {
        tasks.push(tokio::spawn(
            async move { count_msgs(&mut c, messages).await },
        ));
    }
    crate::measure_pubsub(
        "nats",
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

/// Counts MSG deliveries in large reads (one timeout and one clock read per read call), answering
/// server PINGs, until `target` arrived or nothing came for 3 s.
async fn count_msgs(c: &mut Nats, target: u64) -> (u64, Instant) {
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
        while let Some(eol) = buf[pos..filled].iter().position(|b| *b == b'\n') {
            let line = &buf[pos..pos + eol + 1];
            if line.starts_with(b"MSG ") {
                let len: usize = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.trim_end().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0);
                if filled - pos < eol + 1 + len + 2 {
                    break;
                }
                pos += eol + 1 + len + 2;
                n += 1;
            } else {
                if line.starts_with(b"PING") {
                    let _ = c.w.write_all(b"PONG\r\n").await;
                    let _ = c.w.flush().await;
                }
                pos += eol + 1;
            }
        }
        buf.copy_within(pos..filled, 0);
        filled -= pos;
    }
    (n, last)
}

async fn responder(s: &Server) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let mut c = Nats::connect(&s.addr).await?;
    c.w.write_all(b"SUB bench.rpc 1\r\n").await?;
    c.ping().await?;
    Ok(tokio::spawn(async move {
        loop {
            if let Some(reply) = c.next_msg().await? {
                let len = c.body.len() - 2;
                c.w.write_all(format!("PUB {reply} {len}\r\n").as_bytes())
                    .await?;
                let body = c.body.clone();
                c.w.write_all(&body).await?;
            }
            if c.r.buffer().is_empty() {
                c.w.flush().await?;
            }
        }
    }))
}

fn request_frame(inbox: &str) -> Vec<u8> {
    let mut f = format!("PUB bench.rpc {inbox} 64\r\n").into_bytes();
    f.extend(std::iter::repeat_n(b'x', 64));
    f.extend_from_slice(b"\r\n");
    f
}

async fn requester(s: &Server, inbox: &str) -> Result<Nats> {
    let mut c = Nats::connect(&s.addr).await?;
    c.w.write_all(format!("SUB {inbox} 1\r\n").as_bytes())
        .await?;
    c.ping().await?;
    Ok(c)
}

async fn rpc_latency(s: &Server, calls: u64) -> Result<Vec<Figure>> {
    let resp = responder(s).await?;
    let mut c = requester(s, "_INBOX.lat").await?;
    let frame = request_frame("_INBOX.lat");
    let mut lat = Vec::with_capacity(calls as usize);
    for i in 0..calls + 1000 {
        let t = Instant::now();
        c.w.write_all(&frame).await?;
        c.w.flush().await?;
        c.next_msg().await?;
        if i >= 1000 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    resp.abort();
    Ok(latency_figures(
        "nats",
        lat,
        format!("{calls} sequential requests"),
    ))
}

async fn rpc_throughput(s: &Server, callers: usize, seconds: u64) -> Result<Vec<Figure>> {
    let resp = responder(s).await?;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = vec![];
    for i in 0..callers {
        let inbox = format!("_INBOX.t{i}");
        let mut c = requester(s, &inbox).await?;
        let frame = request_frame(&inbox);
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                c.w.write_all(&frame).await?;
                c.w.flush().await?;
                c.next_msg().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let figure = throughput_figure("nats", callers, tasks, &done).await;
    resp.abort();
    Ok(vec![figure?])
}
