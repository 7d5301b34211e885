//! The Podman runtime's client: Podman's REST API (libpod, v4) on its unix socket, through
//! hyper. A node starts its own service (`podman system service`, runc as the OCI runtime,
//! cgroupfs: machines without systemd as PID 1), loads images from archives (`podman save`
//! files, or a plain root filesystem tar imported as an image: these machines reach no image
//! registry), and runs each replica as a container with the manifest's CPU, memory and pids
//! limits, no capabilities, no new privileges and bounded rlimits. What was checked against
//! Podman 4.3.1 is in `docs/design/podman-runtime-notes.md`.
//!
//! The replica side (a container as a [`super::Replica`], the node's service, its images) is
//! in [`super::container`].

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{json, Value};

use crate::manifest::Resources;
use crate::runtime::process::Stream;

/// The API version in every path (Podman 4's libpod API).
const API: &str = "/v4.0.0/libpod";

/// A Podman service reached on `socket`.
#[derive(Debug, Clone)]
pub struct Podman {
    socket: PathBuf,
}

/// What a container runs, and with what limits.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Unique on the machine (the node names it after the replica's slot).
    pub name: String,
    pub image: String,
    /// Replaces the image's command; empty: the image's own.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub work_dir: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub limits: Resources,
    /// (port in the container, port on the host; 0 = any free one), on 127.0.0.1.
    pub ports: Vec<(u16, u16)>,
    /// No network at all (only loopback in the container).
    pub network_none: bool,
    /// The host's network (as a native replica has): it reaches the node on 127.0.0.1 and
    /// binds its ports there itself; `ports` are then not mapped.
    pub host_network: bool,
    pub read_only: bool,
    /// The control group the container's (and its conmon's) groups are made under, from the
    /// hierarchy's root (e.g. `/macula-pods/<node>`); None: Podman's `libpod_parent`.
    pub cgroup_parent: Option<String>,
}

/// The most Podman keeps of a container's output on disk (its `ctr.log` is truncated when it
/// reaches this; the node's own copy is the replica's log).
pub const LOG_FILE_BYTES: i64 = 1 << 20;

impl ContainerSpec {
    /// The libpod SpecGenerator for it: limits as cgroup values (swap no bigger than memory),
    /// every capability dropped, no new privileges, and rlimits the node may set (Podman's
    /// defaults of 2^20 fail where the node lacks CAP_SYS_RESOURCE).
    pub fn to_json(&self) -> Value {
        let period = 100_000u64;
        let memory = i64::try_from(self.limits.memory_bytes).unwrap_or(i64::MAX);
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "env": self.env,
            "labels": self.labels,
            "cap_drop": ["ALL"],
            // Podman's own copy of the output (what its log stream reads), capped: the node
            // keeps its own bounded copy.
            "log_configuration": {"driver": "k8s-file", "size": LOG_FILE_BYTES},
            "no_new_privileges": true,
            "read_only_filesystem": self.read_only,
            "r_limits": [
                {"type": "nofile", "soft": 1024, "hard": 1024},
                {"type": "nproc", "soft": 4096, "hard": 4096},
            ],
            "resource_limits": {
                "cpu": {"quota": u64::from(self.limits.cpu_millis) * period / 1000, "period": period},
                "memory": {"limit": memory, "swap": memory},
                "pids": {"limit": i64::from(self.limits.pids)},
            },
        });
        if !self.command.is_empty() {
            v["command"] = json!(self.command);
        }
        if let Some(w) = &self.work_dir {
            v["work_dir"] = json!(w);
        }
        if let Some(p) = &self.cgroup_parent {
            v["cgroup_parent"] = json!(p);
        }
        if self.network_none {
            v["netns"] = json!({"nsmode": "none"});
        } else if self.host_network {
            v["netns"] = json!({"nsmode": "host"});
        } else if !self.ports.is_empty() {
            v["portmappings"] = self
                .ports
                .iter()
                .map(|(c, h)| json!({"container_port": c, "host_port": h, "host_ip": "127.0.0.1"}))
                .collect();
        }
        v
    }
}

/// A request's body: whole, or streamed from a file.
type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A body of these bytes.
fn whole(b: Bytes) -> Body {
    Full::new(b).map_err(|e| match e {}).boxed_unsync()
}

/// The names of the images a load answer lists.
fn load_names(body: &[u8]) -> Vec<String> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["Names"].as_array().cloned())
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}

/// What Podman said when a request failed: its status and message.
fn failure(status: u16, body: &[u8]) -> io::Error {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    let kind = if status == 404 {
        io::ErrorKind::NotFound
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, format!("podman ({status}): {message}"))
}

/// One line of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub stream: Stream,
    pub text: String,
}

/// Splits libpod's multiplexed log stream (an 8-byte header per frame: stream 1 or 2, three
/// zero bytes, the length as a big-endian u32) into lines as its bytes arrive. A frame longer
/// than `max` bytes is cut to its first `max` and the rest skipped as it comes, so a container
/// that floods its output costs at most `max` + 8 bytes of buffer.
#[derive(Debug, Default)]
pub struct Demux {
    buf: Vec<u8>,
    /// Bytes still to drop of a frame that was cut.
    skip: usize,
}

impl Demux {
    pub fn push(&mut self, data: &[u8], max: usize, out: &mut Vec<Line>) {
        let n = self.skip.min(data.len());
        self.skip -= n;
        self.buf.extend_from_slice(&data[n..]);
        while self.buf.len() >= 8 {
            let b = &self.buf;
            let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
            let stream = if b[0] == 2 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            let have = b.len() - 8;
            if have < len.min(max) {
                return;
            }
            let text = String::from_utf8_lossy(&b[8..8 + len.min(max)])
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            out.push(Line { stream, text });
            if have >= len {
                self.buf.drain(..8 + len);
            } else {
                // A cut frame: its rest is dropped as it arrives.
                self.skip = len - have;
                self.buf.clear();
            }
        }
    }
}

/// The whole body of a response.
async fn read_body(res: hyper::Response<hyper::body::Incoming>) -> io::Result<Bytes> {
    Ok(res
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes())
}

impl Podman {
    pub fn new(socket: impl Into<PathBuf>) -> Podman {
        Podman {
            socket: socket.into(),
        }
    }

    /// Starts `podman system service` on `socket` (runc, cgroupfs, events in a file; its
    /// storage, run root and temporary state under `dir`'s `storage`, `run` and `tmp` when
    /// given, so that services on one machine keep apart) and waits until it answers (up to
    /// 10 s). The child is killed when dropped.
    pub async fn start_service(
        program: &Path,
        socket: &Path,
        dir: Option<&Path>,
    ) -> io::Result<(tokio::process::Child, Podman)> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"]);
        if let Some(dir) = dir {
            cmd.arg("--root")
                .arg(dir.join("storage"))
                .arg("--runroot")
                .arg(dir.join("run"))
                .arg("--tmpdir")
                .arg(dir.join("tmp"));
        }
        // Nothing of the node's environment (proxy settings, credentials) reaches Podman or,
        // through it, a container: only where to find its helpers.
        cmd.env_clear().env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        );
        cmd.args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let podman = Podman::new(socket);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if podman.ping().await.is_ok() {
                return Ok((child, podman));
            }
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "podman system service exited at start ({status})"
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "podman system service did not answer within 10 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one request; the response's status and body (the whole body: not for streams).
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> io::Result<(u16, Bytes)> {
        let body = body.map(|(t, b)| (t, whole(b)));
        let res = self.send(method, path, body).await?;
        let status = res.status().as_u16();
        Ok((status, read_body(res).await?))
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Body)>,
    ) -> io::Result<hyper::Response<hyper::body::Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("podman's socket {}: {e}", self.socket.display()),
                )
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(io::Error::other)?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{API}{path}"))
            .header("host", "podman");
        let payload = match body {
            Some((content_type, b)) => {
                req = req.header("content-type", content_type);
                b
            }
            None => whole(Bytes::new()),
        };
        let req = req
            .body(payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        sender.send_request(req).await.map_err(io::Error::other)
    }

    /// Whether the service answers.
    pub async fn ping(&self) -> io::Result<()> {
        let (status, body) = self.request("GET", "/_ping", None).await?;
        if status == 200 {
            Ok(())
        } else {
            Err(failure(status, &body))
        }
    }

    /// Imports a root filesystem tar as image `reference` (with Dockerfile `changes` such as
    /// `CMD ["/bin/sh"]`); its id.
    pub async fn import(
        &self,
        tar: Bytes,
        reference: &str,
        changes: &[&str],
    ) -> io::Result<String> {
        let mut q = format!("?reference={}", enc(reference));
        for c in changes {
            q.push_str(&format!("&changes={}", enc(c)));
        }
        let (status, body) = self
            .request(
                "POST",
                &format!("/images/import{q}"),
                Some(("application/x-tar", tar)),
            )
            .await?;
        if status != 200 {
            return Err(failure(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
        Ok(v["Id"].as_str().unwrap_or_default().to_owned())
    }

    /// Loads the `podman save` archive at `path`, streamed from the file (never whole in
    /// memory); the names of the images in it.
    pub async fn load_file(&self, path: &Path) -> io::Result<Vec<String>> {
        use tokio::io::AsyncReadExt;
        let file = tokio::fs::File::open(path).await?;
        let chunks = futures_util::stream::unfold(Some(file), |file| async move {
            let mut f = file?;
            let mut buf = vec![0u8; 256 << 10];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(hyper::body::Frame::data(Bytes::from(buf))), Some(f)))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        let body = StreamBody::new(chunks).boxed_unsync();
        let res = self
            .send("POST", "/images/load", Some(("application/x-tar", body)))
            .await?;
        let status = res.status().as_u16();
        let body = read_body(res).await?;
        if status != 200 {
            return Err(failure(status, &body));
        }
        Ok(load_names(&body))
    }

    /// Whether image `name` is there.
    pub async fn has_image(&self, name: &str) -> io::Result<bool> {
        let (status, body) = self
            .request("GET", &format!("/images/{}/exists", enc(name)), None)
            .await?;
        match status {
            204 => Ok(true),
            404 => Ok(false),
            s => Err(failure(s, &body)),
        }
    }

    /// The id of image `name` (a name, or an id), if it is there.
    pub async fn image_id(&self, name: &str) -> io::Result<Option<String>> {
        let (status, body) = self
            .request("GET", &format!("/images/{}/json", enc(name)), None)
            .await?;
        match status {
            200 => {
                let v: Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
                Ok(v["Id"].as_str().map(str::to_owned))
            }
            404 => Ok(None),
            s => Err(failure(s, &body)),
        }
    }

    /// Creates a container; its id.
    pub async fn create(&self, spec: &ContainerSpec) -> io::Result<String> {
        let body = serde_json::to_vec(&spec.to_json()).map_err(io::Error::other)?;
        let (status, body) = self
            .request(
                "POST",
                "/containers/create",
                Some(("application/json", body.into())),
            )
            .await?;
        if status != 201 {
            return Err(failure(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
        Ok(v["Id"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn start(&self, id: &str) -> io::Result<()> {
        self.expect(
            "POST",
            &format!("/containers/{}/start", enc(id)),
            &[204, 304],
        )
        .await
    }

    /// Waits until the container has stopped; its exit code. (Call it after `start`: on a
    /// container that never started it answers at once.)
    pub async fn wait(&self, id: &str) -> io::Result<i64> {
        let (status, body) = self
            .request(
                "POST",
                &format!(
                    "/containers/{}/wait?condition=stopped&interval=50ms",
                    enc(id)
                ),
                None,
            )
            .await?;
        if status != 200 {
            return Err(failure(status, &body));
        }
        String::from_utf8_lossy(&body)
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("podman's exit code: {e}")))
    }

    /// The container's inspection (`State`, `HostConfig`, ...).
    pub async fn inspect(&self, id: &str) -> io::Result<Value> {
        let (status, body) = self
            .request("GET", &format!("/containers/{}/json", enc(id)), None)
            .await?;
        if status != 200 {
            return Err(failure(status, &body));
        }
        serde_json::from_slice(&body).map_err(io::Error::other)
    }

    /// Its output so far (each line cut at `max` bytes).
    pub async fn logs(&self, id: &str, max: usize) -> io::Result<Vec<Line>> {
        let (status, body) = self
            .request(
                "GET",
                &format!("/containers/{}/logs?stdout=true&stderr=true", enc(id)),
                None,
            )
            .await?;
        if status != 200 {
            return Err(failure(status, &body));
        }
        let mut out = vec![];
        Demux::default().push(&body, max, &mut out);
        Ok(out)
    }

    /// Follows its output (from the start) into `each` until the container stops. Open it after
    /// `start`. At most `max` bytes of a line are kept; frames are read as they come (the next
    /// once `each` is done with a line), so a flood costs a bounded buffer.
    pub async fn follow<F>(
        &self,
        id: &str,
        max: usize,
        mut each: impl FnMut(Line) -> F,
    ) -> io::Result<()>
    where
        F: std::future::Future<Output = ()>,
    {
        let res = self
            .send(
                "GET",
                &format!(
                    "/containers/{}/logs?follow=true&stdout=true&stderr=true",
                    enc(id)
                ),
                None,
            )
            .await?;
        let status = res.status().as_u16();
        if status != 200 {
            return Err(failure(status, &read_body(res).await?));
        }
        let mut body = res.into_body();
        let mut demux = Demux::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(io::Error::other)?;
            if let Some(data) = frame.data_ref() {
                let mut lines = vec![];
                demux.push(data, max, &mut lines);
                for l in lines {
                    each(l).await;
                }
            }
        }
        Ok(())
    }

    /// Runs `command` in the running container `id` (its output read and dropped as it comes);
    /// its exit code.
    pub async fn exec(&self, id: &str, command: &[String]) -> io::Result<i64> {
        let body = serde_json::to_vec(
            &json!({"Cmd": command, "AttachStdout": true, "AttachStderr": true}),
        )
        .map_err(io::Error::other)?;
        let (status, body) = self
            .request(
                "POST",
                &format!("/containers/{}/exec", enc(id)),
                Some(("application/json", body.into())),
            )
            .await?;
        if status != 201 {
            return Err(failure(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
        let exec = v["Id"].as_str().unwrap_or_default().to_owned();
        let res = self
            .send(
                "POST",
                &format!("/exec/{}/start", enc(&exec)),
                Some((
                    "application/json",
                    whole(Bytes::from_static(b"{\"Detach\":false}")),
                )),
            )
            .await?;
        let status = res.status().as_u16();
        if status != 200 {
            return Err(failure(status, &read_body(res).await?));
        }
        let mut out = res.into_body();
        while let Some(frame) = out.frame().await {
            frame.map_err(io::Error::other)?;
        }
        let (status, body) = self
            .request("GET", &format!("/exec/{}/json", enc(&exec)), None)
            .await?;
        if status != 200 {
            return Err(failure(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
        v["ExitCode"]
            .as_i64()
            .ok_or_else(|| io::Error::other("podman did not say how the command ended"))
    }

    /// The ids of the containers (running or not) labelled `key=value`.
    pub async fn labelled(&self, key: &str, value: &str) -> io::Result<Vec<String>> {
        let filters = json!({"label": [format!("{key}={value}")]}).to_string();
        let (status, body) = self
            .request(
                "GET",
                &format!("/containers/json?all=true&filters={}", enc(&filters)),
                None,
            )
            .await?;
        if status != 200 {
            return Err(failure(status, &body));
        }
        let v: Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["Id"].as_str().map(str::to_owned))
            .collect())
    }

    /// Writes image `name` as a `podman save` (docker-archive) file: what
    /// [`Podman::load_file`] reads.
    pub async fn save(&self, name: &str) -> io::Result<Bytes> {
        let (status, body) = self
            .request(
                "GET",
                &format!("/images/{}/get?format=docker-archive", enc(name)),
                None,
            )
            .await?;
        if status != 200 {
            return Err(failure(status, &body));
        }
        Ok(body)
    }

    /// Kills it (SIGKILL).
    pub async fn kill(&self, id: &str) -> io::Result<()> {
        self.expect(
            "POST",
            &format!("/containers/{}/kill?signal=SIGKILL", enc(id)),
            &[204],
        )
        .await
    }

    /// Removes it, killing it first if it runs; a container that is not there is fine.
    pub async fn remove(&self, id: &str) -> io::Result<()> {
        let path = format!(
            "/containers/{}?force=true&v=true&timeout=0&ignore=true",
            enc(id)
        );
        // A container whose processes were killed behind Podman's back (by the reaper of a
        // node that died) is still "running" to it until a first try finds it stopped ("state
        // improper"), and one being torn down may refuse for a moment: a few tries, a moment
        // apart.
        let mut tries = 0;
        loop {
            match self.expect("DELETE", &path, &[200, 204]).await {
                Err(e) if tries < 4 => {
                    tracing::debug!(container = id, "removing it: {e}; trying again");
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 * tries)).await;
                }
                r => return r,
            }
        }
    }

    async fn expect(&self, method: &str, path: &str, ok: &[u16]) -> io::Result<()> {
        let (status, body) = self.request(method, path, None).await?;
        if ok.contains(&status) {
            Ok(())
        } else {
            Err(failure(status, &body))
        }
    }
}

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_into_lines_and_partial_frames_wait() {
        let line = |stream, text: &str| Line {
            stream,
            text: text.into(),
        };
        let mut d = Demux::default();
        let mut out = vec![];
        d.push(
            &[
                1, 0, 0, 0, 0, 0, 0, 3, b'h', b'i', b'\n', 2, 0, 0, 0, 0, 0, 0, 4, b'e', b'r',
            ],
            1024,
            &mut out,
        );
        assert_eq!(out, [line(Stream::Stdout, "hi")]);
        d.push(b"r\n", 1024, &mut out);
        assert_eq!(out[1], line(Stream::Stderr, "err"), "the frame's rest came");
        // A frame longer than a line may be: cut, and its rest skipped as it arrives; the next
        // frame is read as usual.
        let mut long = vec![1, 0, 0, 0, 0, 0, 0, 10];
        long.extend_from_slice(b"abcd");
        d.push(&long, 3, &mut out);
        assert_eq!(out[2], line(Stream::Stdout, "abc"));
        d.push(b"efghij", 3, &mut out);
        d.push(&[2, 0, 0, 0, 0, 0, 0, 2, b'o', b'k'], 3, &mut out);
        assert_eq!(out.len(), 4, "{out:?}");
        assert_eq!(out[3], line(Stream::Stderr, "ok"));
        assert!(d.buf.is_empty() && d.skip == 0);
    }

    #[test]
    fn the_spec_limits_and_drops_privileges() {
        let spec = ContainerSpec {
            name: "c".into(),
            image: "i".into(),
            limits: Resources {
                cpu_millis: 500,
                memory_bytes: 64 << 20,
                pids: 32,
            },
            ports: vec![(8080, 0)],
            ..ContainerSpec::default()
        };
        let v = spec.to_json();
        assert_eq!(v["resource_limits"]["cpu"]["quota"], 50_000);
        assert_eq!(v["resource_limits"]["memory"]["swap"], 64 << 20);
        assert_eq!(v["resource_limits"]["pids"]["limit"], 32);
        assert_eq!(v["cap_drop"][0], "ALL");
        assert_eq!(v["portmappings"][0]["host_ip"], "127.0.0.1");
        assert!(v.get("command").is_none(), "the image's own command");
        assert_eq!(enc("localhost/a:b"), "localhost%2Fa%3Ab");
    }
}
