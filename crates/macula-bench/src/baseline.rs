//! The floor every server is measured against: a plain TCP round trip to another process.

use std::process::Stdio;
use std::time::Instant;

use anyhow::{anyhow, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::{percentile, Figure};

/// The hidden `echo` subcommand: echoes every byte back.
pub fn run_echo() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", l.local_addr()?);
        loop {
            let (mut s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// p50/p99 of 64-byte round trips to an echo process.
pub async fn round_trips(calls: u64) -> Result<Vec<Figure>> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("echo")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?)
        .read_line(&mut line)
        .await?;
    let mut s = TcpStream::connect(line.trim()).await?;
    s.set_nodelay(true)?;
    let msg = [b'x'; 64];
    let mut back = [0u8; 64];
    let mut lat = Vec::with_capacity(calls as usize);
    for i in 0..calls + 1000 {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        if i >= 1000 {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let _ = child.kill().await;
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(vec![
        Figure {
            scenario: "tcp round trip p50 (floor)".into(),
            server: "tcp",
            value: percentile(&lat, 0.5),
            unit: "µs",
            note: "64 B to an echo process".into(),
        },
        Figure {
            scenario: "tcp round trip p99 (floor)".into(),
            server: "tcp",
            value: percentile(&lat, 0.99),
            unit: "µs",
            note: String::new(),
        },
    ])
}
