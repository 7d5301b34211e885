//! The Hub on a mesh of real node processes (`macula up --nodes N`, the Hub on node 1, a
//! publisher set up through the CLI):
//! - `hub-revoke`: how long a revocation takes to be visible on every node (goal ≤ 10 s).
//!   `rounds` times: a version whose workload has N replicas (one per node) is published and
//!   deployed, the Hub revokes it, and the time until `macula status` shows every replica
//!   flagged is taken (polled every 50 ms; the CLI's own start, ~10 ms, is included).
//! - `hub-install`: installing a package of `mib` MiB on every node, from peers or from the Hub
//!   alone (`hub.peers`), in one run each: one replica installs it from the Hub first, then the
//!   workload is scaled to N and the time until all N run is taken (N−1 installs).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::Figure;

/// The `macula` program beside this one (`cargo build --release -p macula`).
fn macula() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .map(|d| d.join("macula"))
        .ok_or_else(|| anyhow!("no directory"))?;
    if !p.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p macula`",
            p.display()
        );
    }
    Ok(p)
}

struct Cli {
    bin: PathBuf,
    cfg: PathBuf,
    http: String,
}

impl Cli {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut child = Command::new(&self.bin)
            .args(args)
            .env("XDG_CONFIG_HOME", &self.cfg)
            .env("MACULA_SERVER", &self.http)
            .env_remove("MACULA_HOME")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(s), Some(mut w)) = (stdin, child.stdin.take()) {
            std::io::Write::write_all(&mut w, s.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "macula {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The newest verification code mailed to `to`.
fn mailed_code(dir: &Path, to: &str) -> Result<String> {
    let mut mails: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(&format!("-{to}.eml")))
        .collect();
    mails.sort();
    let text = std::fs::read_to_string(mails.last().ok_or_else(|| anyhow!("no mail"))?)?
        .replace("=\r\n", "");
    let at = text.find("ev_").ok_or_else(|| anyhow!("no code"))?;
    Ok(text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect())
}

/// A `macula up --nodes N` with a verified publisher `acme` and its key registered.
struct Site {
    _guard: Kill,
    _home: tempfile::TempDir,
    _cfg: tempfile::TempDir,
    cli: Cli,
    ws: String,
    realm: String,
    rkey: String,
    key: String,
}

impl Site {
    fn start(nodes: u32, yaml: &str) -> Result<Site> {
        let bin = macula()?;
        let home = tempfile::tempdir()?;
        let mail = home.path().join("mail");
        std::fs::write(
            home.path().join("node.yaml"),
            format!(
                "registry:\n  mail:\n    url: dir:{}\n{yaml}",
                mail.display()
            ),
        )?;
        let mut up = Command::new(&bin)
            .args(["--json", "up", "--home"])
            .arg(home.path())
            .args([
                "--http",
                "127.0.0.1:0",
                "--rawsocket",
                "127.0.0.1:0",
                "--mesh-port",
                "0",
            ])
            .args(["--nodes", &nodes.to_string()])
            .env("MACULA_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("macula up")?;
        let out = up.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let guard = Kill(up);
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let banner: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        let s = |k: &str| banner[k].as_str().unwrap_or_default().to_owned();
        let cfg = tempfile::tempdir()?;
        let cli = Cli {
            bin,
            cfg: cfg.path().to_path_buf(),
            http: s("http"),
        };
        let pw = Some("correct horse battery\n");
        cli.run(
            &["signup", "--email", "dev@acme.com", "--password-stdin"],
            pw,
        )?;
        cli.run(
            &["login", "--email", "dev@acme.com", "--password-stdin"],
            pw,
        )?;
        cli.run(
            &["account", "verify", &mailed_code(&mail, "dev@acme.com")?],
            None,
        )?;
        let key = cfg.path().join("acme.key").to_string_lossy().into_owned();
        cli.run(&["hub", "keygen", "--out", &key], None)?;
        cli.run(&["hub", "publisher", "create", "acme"], None)?;
        cli.run(&["hub", "keys", "add", "acme", "--key", &key], None)?;
        Ok(Site {
            _guard: guard,
            _home: home,
            _cfg: cfg,
            cli,
            ws: s("ws"),
            realm: s("realm"),
            rkey: s("key"),
            key,
        })
    }

    /// `macula --json ARGS` against the nodes, with the realm's key.
    fn node(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[
            "--url",
            &self.ws,
            "--realm",
            &self.realm,
            "--key",
            &self.rkey,
        ]);
        Ok(serde_json::from_str(&self.cli.run(&all, None)?)?)
    }

    /// Publishes package `acme/app@1.0.<r>` whose workload `app<r>` has `replicas` replicas
    /// running `bin/app` (its content `program`, plus `pad` bytes).
    fn publish(&self, r: usize, replicas: u32, program: &str, pad: u64) -> Result<String> {
        let pkg = tempfile::tempdir()?;
        let d = pkg.path();
        std::fs::create_dir_all(d.join("bin"))?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(d.join("bin/app"))?);
        std::io::Write::write_all(&mut f, program.as_bytes())?;
        // Padding after the script's `exec`: never read by the shell, but part of the file.
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = pad;
        let mut i = 0u64;
        while left > 0 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i.wrapping_mul(2654435761) as usize ^ j.wrapping_mul(40503)) as u8;
            }
            let n = left.min(chunk.len() as u64) as usize;
            std::io::Write::write_all(&mut f, &chunk[..n])?;
            left -= n as u64;
            i += 1;
        }
        std::io::Write::flush(&mut f)?;
        drop(f);
        std::fs::write(
            d.join("package.yaml"),
            format!(
                "name: acme/app\nversion: 1.0.{r}\nkind: hub-package\npermissions: {{planes: [workplane]}}\nartifacts:\n  - {{name: app, file: bin/app}}\n\
                 attestations: {{sbom: sbom.spdx.json, provenance: provenance.dsse.json}}\n\
                 workload: {{kind: payload, name: app{r}, replicas: {replicas}, command: [./bin/app]}}\n"
            ),
        )?;
        let dir = d.to_string_lossy().into_owned();
        self.cli.run(
            &["hub", "publish", &dir, "--key", &self.key, "--attest"],
            None,
        )?;
        Ok(format!("acme/app@1.0.{r}"))
    }

    /// Replicas of `name` in state `running` whose detail contains `flag` (all with "").
    fn count(&self, name: &str, flag: &str) -> Result<u32> {
        let v = self.node(&["status"])?;
        Ok(v["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["name"] == name)
            .flat_map(|w| w["items"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["state"] == "running")
            .filter(|i| flag.is_empty() || i["detail"].as_str().is_some_and(|d| d.contains(flag)))
            .count() as u32)
    }

    /// Waits until `count(name, flag)` reaches `want`; the time it took.
    fn wait(&self, name: &str, flag: &str, want: u32, t: Instant) -> Result<Duration> {
        loop {
            let n = self.count(name, flag)?;
            if n >= want {
                return Ok(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("{name}: {n} of {want} after 300 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn revoke(nodes: u32, rounds: usize) -> Result<Vec<Figure>> {
    let site = Site::start(nodes, "")?;
    let mut times = vec![];
    for r in 0..rounds {
        let target = site.publish(r, nodes, "#!/bin/sh\nexec sleep 600\n", 0)?;
        site.node(&["deploy", "--package", &target, "--timeout", "120s"])?;
        let name = format!("app{r}");
        let t = Instant::now();
        site.cli
            .run(&["hub", "revoke", &target, "--reason", "bench"], None)?;
        times.push(site.wait(&name, "revoked", nodes, t)?.as_secs_f64() * 1e3);
        let _ = site.node(&["delete", &name]);
    }
    times.sort_by(f64::total_cmp);
    let p50 = times[times.len() / 2];
    let max = times[times.len() - 1];
    Ok(vec![Figure {
        scenario: format!("revocation visible on all {nodes} nodes"),
        server: "macula",
        value: max,
        unit: "ms max",
        note: format!(
            "p50 {p50:.0} ms over {rounds} revocations: from `macula hub revoke` until `macula status` shows every replica flagged (goal ≤ 10 s)"
        ),
    }])
}

/// Kills `macula up` (and with it its nodes) when dropped.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Installs of a `mib` MiB package on `nodes` nodes, from peers and from the Hub alone.
pub fn install(nodes: u32, mib: u64) -> Result<Vec<Figure>> {
    let mut figs = vec![];
    let mut times = vec![];
    for peers in [true, false] {
        let site = Site::start(nodes, &format!("hub:\n  peers: {peers}\n"))?;
        let target = site.publish(0, 1, "#!/bin/sh\nexec sleep 600\n", mib << 20)?;
        site.node(&["deploy", "--package", &target, "--timeout", "300s"])?;
        let t = Instant::now();
        site.node(&["scale", "app0", "--replicas", &nodes.to_string()])?;
        let took = site.wait("app0", "", nodes, t)?;
        times.push(took.as_secs_f64());
        figs.push(Figure {
            scenario: format!("install {mib} MiB on {} more nodes", nodes - 1),
            server: if peers { "peers" } else { "hub only" },
            value: took.as_secs_f64() * 1e3,
            unit: "ms",
            note: format!(
                "from `macula scale` to {nodes} replicas running: each new node verifies the TUF metadata and fetches the file ({})",
                if peers { "from peers that have it, over the mesh" } else { "from the Hub over HTTP; hub.peers: false" }
            ),
        });
    }
    if let (Some(p), Some(h)) = (times.first(), times.get(1)) {
        if let Some(f) = figs.first_mut() {
            f.note.push_str(&format!("; peers/hub = {:.2}", p / h));
        }
    }
    Ok(figs)
}
