//! The node's side of a native replica: its control groups, the exec shim, and its output —
//! kept in a bounded ring of lines (for `macula logs`) and a log file rotated at a size cap,
//! so a replica that floods its output costs the node a fixed amount of memory and disk.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::cgroup::Cgroup;
use super::{BoxFut, ExecSpec, Replica};
use crate::manifest::Resources;

/// Which output a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One line of a replica's output (cut at [`LogLimits::line_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub seq: u64,
    pub stream: Stream,
    pub text: String,
}

/// How much of a replica's output is kept.
#[derive(Debug, Clone)]
pub struct LogLimits {
    /// Lines in memory.
    pub lines: usize,
    /// Bytes of one line (the rest is cut, marked `…`).
    pub line_bytes: usize,
    /// The log file, rotated (to `<file>.1`) when it reaches `file_bytes`.
    pub file: Option<PathBuf>,
    pub file_bytes: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            lines: 1_000,
            line_bytes: 16 << 10,
            file: None,
            file_bytes: 8 << 20,
        }
    }
}

/// The last lines of a replica's output, and a way to wait for more.
pub struct LogBuffer {
    lines: Mutex<VecDeque<LogLine>>,
    next: AtomicU64,
    max: usize,
    more: tokio::sync::Notify,
}

impl LogBuffer {
    /// A buffer of the last `max` lines.
    pub fn new(max: usize) -> LogBuffer {
        LogBuffer {
            lines: Mutex::new(VecDeque::with_capacity(max.min(1024))),
            next: AtomicU64::new(0),
            max,
            more: tokio::sync::Notify::new(),
        }
    }

    fn push(&self, stream: Stream, text: String) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == self.max {
            l.pop_front();
        }
        l.push_back(LogLine { seq, stream, text });
        drop(l);
        self.more.notify_waiters();
    }

    /// The lines kept with a sequence number of at least `from`.
    pub fn since(&self, from: u64) -> Vec<LogLine> {
        let l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().filter(|x| x.seq >= from).cloned().collect()
    }

    /// How many lines were written in all (kept or not).
    pub fn written(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Resolves when a line is added (for `--follow`).
    ///
    /// The future is made at the call (not at its first poll): lines written after the call
    /// wake it, so a caller may call this, look at what is there, then await.
    pub fn wait(&self) -> tokio::sync::futures::Notified<'_> {
        self.more.notified()
    }
}

/// A running (or finished) native replica.
pub struct ProcessReplica {
    child: Child,
    cgroup: Option<Cgroup>,
    logs: Arc<LogBuffer>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

/// How to start a native replica.
pub struct Start {
    /// The exec shim (`macula-workload-exec`, or `macula __exec`), and arguments before the spec.
    pub shim: PathBuf,
    pub shim_args: Vec<String>,
    /// The replica's cgroup name (unique on the node).
    pub name: String,
    pub limits: Resources,
    /// Without control groups (no permission to make them) the replica is refused, unless this
    /// says to run it without limits.
    pub require_limits: bool,
    pub spec: ExecSpec,
    pub logs: LogLimits,
    /// Where its lines go (a supervisor keeps one across restarts); a new one if None.
    pub buffer: Option<Arc<LogBuffer>>,
}

impl ProcessReplica {
    pub async fn start(s: Start) -> io::Result<ProcessReplica> {
        let mut spec = s.spec;
        let cgroup = match Cgroup::create(&s.name, &s.limits) {
            Ok(cg) => {
                spec.cgroup_procs = cg.procs_files();
                Some(cg)
            }
            Err(e) if s.require_limits => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot limit the replica's resources ({e}): run the node as root, or give it a delegated cgroup v2 subtree to manage"),
                ))
            }
            Err(_) => None,
        };
        let json = serde_json::to_string(&spec)?;
        let child = Command::new(&s.shim)
            .args(&s.shim_args)
            .env_clear()
            .env("MACULA_EXEC_SPEC", json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.destroy_soon();
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("starting {}: {e}", s.shim.display()),
                ));
            }
        };
        let logs = s
            .buffer
            .unwrap_or_else(|| Arc::new(LogBuffer::new(s.logs.lines.max(1))));
        let sink = Arc::new(Sink::new(logs.clone(), &s.logs));
        let mut readers = vec![];
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(pump(
                out,
                Stream::Stdout,
                sink.clone(),
                s.logs.line_bytes,
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(pump(
                err,
                Stream::Stderr,
                sink,
                s.logs.line_bytes,
            )));
        }
        Ok(ProcessReplica {
            child,
            cgroup,
            logs,
            readers,
        })
    }

    /// The replica's output.
    pub fn logs(&self) -> Arc<LogBuffer> {
        self.logs.clone()
    }

    /// Memory the replica uses now (its control groups).
    pub fn memory_bytes(&self) -> Option<u64> {
        self.cgroup.as_ref()?.memory_bytes()
    }

    /// Waits for the replica to end; its output is read to the end first.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        for r in self.readers.drain(..) {
            let _ = r.await;
        }
        Ok(status)
    }

    /// Stops the replica and every process it started (its control groups).
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
        if let Some(cg) = &self.cgroup {
            cg.destroy_soon();
        }
    }
}

impl Start {
    /// Starts it as a [`Replica`] (the supervisor's shape).
    pub fn launch(self) -> BoxFut<'static, io::Result<Box<dyn Replica>>> {
        Box::pin(async move {
            let r: Box<dyn Replica> = Box::new(ProcessReplica::start(self).await?);
            Ok(r)
        })
    }
}

impl Replica for ProcessReplica {
    fn wait(&mut self) -> BoxFut<'_, Result<(), String>> {
        Box::pin(async move {
            match ProcessReplica::wait(self).await {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(s.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn kill(&mut self) -> BoxFut<'_, ()> {
        ProcessReplica::kill(self);
        Box::pin(async move {
            let _ = ProcessReplica::wait(self).await;
        })
    }

    fn cgroup(&self) -> Option<Cgroup> {
        self.cgroup.clone()
    }
}

impl Drop for ProcessReplica {
    fn drop(&mut self) {
        if let Some(cg) = &self.cgroup {
            cg.destroy_soon();
        }
    }
}

/// The log file and its rotation.
struct LogFile {
    path: Option<PathBuf>,
    cap: u64,
    written: u64,
    file: Option<tokio::fs::File>,
}

impl LogFile {
    fn new(l: &LogLimits) -> LogFile {
        LogFile {
            path: l.file.clone(),
            cap: l.file_bytes.max(1024),
            written: 0,
            file: None,
        }
    }

    async fn write(&mut self, line: &str) {
        let Some(path) = self.path.clone() else {
            return;
        };
        if self.written + line.len() as u64 + 1 > self.cap {
            self.file = None;
            let _ = tokio::fs::rename(&path, path.with_extension("log.1")).await;
            self.written = 0;
        }
        if self.file.is_none() {
            self.file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await
                .ok();
            self.written = tokio::fs::metadata(&path)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(line.as_bytes()).await.is_ok() && f.write_all(b"\n").await.is_ok() {
                self.written += line.len() as u64 + 1;
            }
        }
    }
}

/// Where a replica's lines go, whatever runs it: the ring of lines and the rotated file.
pub(crate) struct Sink {
    logs: Arc<LogBuffer>,
    file: tokio::sync::Mutex<LogFile>,
}

impl Sink {
    pub(crate) fn new(logs: Arc<LogBuffer>, limits: &LogLimits) -> Sink {
        Sink {
            logs,
            file: tokio::sync::Mutex::new(LogFile::new(limits)),
        }
    }

    /// Keeps one line (already cut to the line limit).
    pub(crate) async fn line(&self, stream: Stream, text: String) {
        self.file.lock().await.write(&text).await;
        self.logs.push(stream, text);
    }
}

/// Reads one output stream into lines: a line longer than `line_bytes` is cut, the rest of
/// it skipped, so no output can grow the node's memory.
async fn pump(mut r: impl AsyncRead + Unpin, stream: Stream, sink: Arc<Sink>, line_bytes: usize) {
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let mut cut = false;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                emit(&mut line, &mut cut, stream, &sink).await;
            } else if line.len() < line_bytes {
                line.push(b);
            } else {
                cut = true;
            }
        }
    }
    if !line.is_empty() || cut {
        emit(&mut line, &mut cut, stream, &sink).await;
    }
}

async fn emit(line: &mut Vec<u8>, cut: &mut bool, stream: Stream, sink: &Sink) {
    let mut text = String::from_utf8_lossy(line).into_owned();
    if *cut {
        text.push('…');
    }
    sink.line(stream, text).await;
    line.clear();
    *cut = false;
}
