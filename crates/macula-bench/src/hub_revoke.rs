//! `macula-bench hub-revoke`: how long a revocation at the Hub takes to be visible on every
//! node (goal ≤ 10 s). `macula up --nodes N` runs the Hub on node 1; a publisher publishes a
//! package whose workload has N replicas, deployed with `macula deploy --package` (one replica
//! per node). Then, `rounds` times: a new version is published and deployed, the Hub revokes
//! it, and the time until `macula status` shows every replica flagged "revoked" is taken
//! (polled every 50 ms; the CLI's own start, ~10 ms, is included).

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

pub fn run(nodes: u32, rounds: usize) -> Result<Vec<Figure>> {
    let bin = macula()?;
    let home = tempfile::tempdir()?;
    let mail = home.path().join("mail");
    std::fs::write(
        home.path().join("node.yaml"),
        format!("registry:\n  mail:\n    url: dir:{}\n", mail.display()),
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
    let _guard = Kill(&mut up);
    let mut line = String::new();
    BufReader::new(_guard.0.stdout.take().ok_or_else(|| anyhow!("no stdout"))?)
        .read_line(&mut line)?;
    let banner: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
    let s = |k: &str| banner[k].as_str().unwrap_or_default().to_owned();
    let (http, ws, realm, rkey) = (s("http"), s("ws"), s("realm"), s("key"));
    let cfg = tempfile::tempdir()?;
    let cli = Cli {
        bin: bin.clone(),
        cfg: cfg.path().to_path_buf(),
        http,
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
    let key = cfg.path().join("acme.key");
    let key_s = key.to_string_lossy().into_owned();
    cli.run(&["hub", "keygen", "--out", &key_s], None)?;
    cli.run(&["hub", "publisher", "create", "acme"], None)?;
    cli.run(&["hub", "keys", "add", "acme", "--key", &key_s], None)?;
    let node = |args: &[&str]| -> Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--url", &ws, "--realm", &realm, "--key", &rkey]);
        Ok(serde_json::from_str(&cli.run(&all, None)?)?)
    };
    let mut times = vec![];
    for r in 0..rounds {
        let pkg = tempfile::tempdir()?;
        let d = pkg.path();
        std::fs::create_dir_all(d.join("bin"))?;
        std::fs::write(d.join("bin/app"), "#!/bin/sh\nexec sleep 600\n")?;
        std::fs::write(
            d.join("package.yaml"),
            format!(
                "name: acme/app\nversion: 1.0.{r}\nkind: hub-package\npermissions: {{planes: [workplane]}}\nartifacts:\n  - {{name: app, file: bin/app}}\n\
                 attestations: {{sbom: sbom.spdx.json, provenance: provenance.dsse.json}}\n\
                 workload: {{kind: payload, name: app{r}, replicas: {nodes}, command: [./bin/app]}}\n"
            ),
        )?;
        let dir = d.to_string_lossy().into_owned();
        cli.run(&["hub", "publish", &dir, "--key", &key_s, "--attest"], None)?;
        let target = format!("acme/app@1.0.{r}");
        node(&["deploy", "--package", &target, "--timeout", "120s"])?;
        let name = format!("app{r}");
        let t = Instant::now();
        cli.run(&["hub", "revoke", &target, "--reason", "bench"], None)?;
        loop {
            let v = node(&["status"])?;
            let flagged = v["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| w["name"] == name.as_str())
                .flat_map(|w| w["items"].as_array().cloned().unwrap_or_default())
                .filter(|i| i["detail"].as_str().is_some_and(|d| d.contains("revoked")))
                .count();
            if flagged as u32 >= nodes {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("round {r}: {flagged} of {nodes} replicas flagged after 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = node(&["delete", &name]);
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
struct Kill<'a>(&'a mut std::process::Child);

impl Drop for Kill<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
