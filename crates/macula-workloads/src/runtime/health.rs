//! Health checks of a running replica: *liveness* (failing `failure_threshold` times in a row
//! restarts it, as a failure with back-off) and *readiness* (whether it takes work now: a
//! rolling update waits for it, and status shows it). Checks are an HTTP GET answered 2xx or
//! 3xx, a TCP connection that opens, or a command that exits 0 — run through the exec shim
//! with the replica's own environment, working directory and sandbox (a native replica), or
//! inside the container (a container replica).
//!
//! Every check has its timeout; an HTTP answer is read up to its status line and no further
//! (at most 1 KiB), so a replica cannot hold the node's prober.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ExecSpec;
use crate::manifest::{Check, PortRef, Probe};

/// What checks of one replica need: its ports by name (as assigned) and how to run a command
/// as it (the shim and the replica's spec).
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub ports: BTreeMap<String, u16>,
    pub shim: PathBuf,
    pub shim_args: Vec<String>,
    pub spec: Option<ExecSpec>,
    /// A container replica: commands run inside it (its host, the container's name).
    pub container: Option<(std::sync::Arc<super::container::Host>, String)>,
}

impl Target {
    fn port(&self, p: &PortRef) -> Result<u16, String> {
        match p {
            PortRef::Number(n) => Ok(*n),
            PortRef::Named(name) => self
                .ports
                .get(name)
                .copied()
                .ok_or_else(|| format!("no port named {name:?}")),
        }
    }
}

/// Runs `check` once against `target`, within `timeout`; why it failed.
pub async fn check(c: &Check, target: &Target, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, check_inner(c, target)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn check_inner(c: &Check, target: &Target) -> Result<(), String> {
    match c {
        Check::Tcp { port } => {
            let port = target.port(port)?;
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|e| format!("TCP port {port}: {e}"))
        }
        Check::Http { path, port } => {
            let port = target.port(port)?;
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("HTTP port {port}: {e}"))?;
            let req = format!(
                "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: macula-probe\r\n\r\n"
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("HTTP port {port}: {e}"))?;
            let mut buf = vec![0u8; 1024];
            let mut n = 0;
            while n < buf.len() && !buf[..n].contains(&b'\n') {
                match s.read(&mut buf[n..]).await {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(format!("HTTP port {port}: {e}")),
                }
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("GET {path} on port {port}: not an HTTP answer"))?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("GET {path} on port {port} answered {status}"))
            }
        }
        Check::Exec { command } if let Some((host, name)) = &target.container => {
            let p = host.podman().await.map_err(|e| e.to_string())?;
            match p.exec(name, command).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(format!("{} exit status: {code}", command.join(" "))),
                Err(e) => Err(format!(
                    "running {:?} in the container: {e}",
                    command.first()
                )),
            }
        }
        Check::Exec { command } => {
            let Some(mut spec) = target.spec.clone() else {
                return Err("no way to run a command here".into());
            };
            spec.argv = command.clone();
            spec.cgroup_procs = vec![];
            let json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
            let status = tokio::process::Command::new(&target.shim)
                .args(&target.shim_args)
                .env_clear()
                .env("MACULA_EXEC_SPEC", json)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("running {:?}: {e}", command.first()))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{} {status}", command.join(" ")))
            }
        }
    }
}

/// A replica's checks and what they need.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
    pub target: Target,
}

/// Runs `probe` every period after its initial delay, telling `on_result` each time whether it
/// passed (and why not); returns once it failed `failure_threshold` times in a row, with why.
pub async fn watch(
    probe: &Probe,
    target: &Target,
    mut on_result: impl FnMut(Result<(), &str>),
) -> String {
    tokio::time::sleep(probe.initial_delay).await;
    let mut fails = 0;
    loop {
        match check(&probe.check, target, probe.timeout).await {
            Ok(()) => {
                fails = 0;
                on_result(Ok(()));
            }
            Err(why) => {
                fails += 1;
                on_result(Err(&why));
                if fails >= probe.failure_threshold.max(1) {
                    return format!("{why} ({fails} times in a row)");
                }
            }
        }
        tokio::time::sleep(probe.period).await;
    }
}
