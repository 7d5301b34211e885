//! Workload commands: deploy, workloads (status), jobs, logs, scale, delete. They talk to any node
//! of the realm over HTTP (the node's `/v1/realms/{realm}/workloads` and `/replicas`) with the
//! realm key; a deploy is a record signed here, with the key's holder secret, so the node needs
//! nothing else to believe it.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use macula_router::auth::credential::{bearer_proof, public_form};
use macula_workloads::record::DeployRecord;
use macula_workloads::wire::{ReplicaStatus, Summary};
use macula_workloads::Manifest;
use serde_json::{json, Value};

use crate::registry_cmds::{http_agent, right_aligned, table, tls_hint};
use crate::Conn;

/// A node's workload API, with a realm key.
struct NodeApi {
    base: String,
    realm: String,
    key: String,
    agent: ureq::Agent,
    stream_agent: ureq::Agent,
}

impl NodeApi {
    fn new(conn: &Conn) -> Result<NodeApi> {
        let (realm, key) = conn.resolve()?;
        let base = http_base(&conn.url)?;
        Ok(NodeApi {
            base,
            realm,
            key,
            agent: http_agent(conn.ca.as_deref(), Duration::from_secs(30))?,
            stream_agent: http_agent(conn.ca.as_deref(), Duration::ZERO)?,
        })
    }

    fn path(&self, rest: &str) -> String {
        format!("{}/v1/realms/{}{rest}", self.base, self.realm)
    }

    fn answer(&self, res: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value> {
        let mut res = res.map_err(|e| {
            anyhow!(
                "cannot reach the node at {}: {e}{}",
                self.base,
                tls_hint(&e.to_string())
            )
        })?;
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let msg = v["error"]["message"].as_str().unwrap_or(text.trim());
        let code = v["error"]["code"].as_str().unwrap_or("error");
        bail!("{msg} [{status} {code}]")
    }

    fn get(&self, rest: &str) -> Result<Value> {
        let res = self
            .agent
            .get(&self.path(rest))
            .header("Authorization", &format!("Bearer {}", self.key))
            .call();
        self.answer(res)
    }

    /// The realm's records: name → (seq, manifest text or None for a tombstone).
    fn records(&self) -> Result<Vec<(String, u64, Option<String>)>> {
        let v = self.get("/workloads")?;
        Ok(v["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        (
                            i["name"].as_str().unwrap_or_default().to_owned(),
                            i["seq"].as_u64().unwrap_or(0),
                            i["manifest"].as_str().map(str::to_owned),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Signs and hands in the next record of `name` (`manifest` None: delete it).
    fn put(&self, name: &str, manifest: Option<String>) -> Result<u64> {
        let have = self
            .records()?
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map_or(0, |r| r.1);
        let public = public_form(&self.key)
            .ok_or_else(|| anyhow!("this key cannot sign deploy records (a key of an older format): issue a new one with `macula keys create`"))?;
        let record = DeployRecord::signed(
            &self.realm,
            name,
            have + 1,
            manifest,
            macula_common::time::now_secs(),
            &public,
            |d| bearer_proof(&self.key, d),
        )
        .ok_or_else(|| anyhow!("this key cannot sign deploy records"))?;
        let res = self
            .agent
            .post(&self.path("/workloads"))
            .send_json(serde_json::to_value(&record)?);
        self.answer(res)?;
        Ok(record.seq)
    }

    fn replicas(&self) -> Result<Vec<ReplicaStatus>> {
        let v = self.get("/replicas")?;
        Ok(serde_json::from_value(v["items"].clone()).unwrap_or_default())
    }

    /// The newest record of `name` with a manifest: its sequence and manifest.
    fn current(&self, name: &str) -> Result<(u64, Manifest)> {
        let (_, seq, text) = self
            .records()?
            .into_iter()
            .find(|(n, _, m)| n == name && m.is_some())
            .ok_or_else(|| anyhow!("no workload {name} in {}", self.realm))?;
        let m = macula_workloads::parse(&text.unwrap_or_default()).map_err(|e| anyhow!("{e}"))?;
        Ok((seq, m))
    }

    /// The versions of `name` the node keeps, newest first (JSON items).
    fn history(&self, name: &str) -> Result<Vec<Value>> {
        let v = self.get(&format!("/workloads/{name}/history"))?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// The realm's jobs, summed up, as the node answers them (JSON items).
    fn jobs(&self) -> Result<Vec<Value>> {
        let v = self.get("/jobs")?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }
}

/// A summary out of the node's JSON (its `issued_at` is a date there).
fn summary_of(v: &Value) -> Option<Summary> {
    let mut v = v.clone();
    v["issued_at"] = json!(0);
    serde_json::from_value(v).ok()
}

/// `ws://host:port/ws` → `http://host:port` (and `wss` → `https`).
fn http_base(url: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("{url}: not a URL"))?;
    let scheme = match scheme {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        _ => bail!("{url}: workload commands talk to a node's HTTP port: give --url ws://host:port/ws (or wss://)"),
    };
    let host = rest.split('/').next().unwrap_or_default();
    Ok(format!("{scheme}://{host}"))
}

#[derive(Args)]
#[command(after_help = "Examples:
  macula deploy --payload 'sh -c \"exec python3 -m http.server $PORT\"' --port --name web --replicas 2
  macula deploy -f api.yaml                       (Macula's format, or a Kubernetes Deployment/Job)
  macula deploy --payload 'macula serve com.example.demo.whoami -- hostname' --name whoami --replicas 2
  macula deploy --payload api-server:latest --replicas 3        (an image: the podman runtime)
  macula deploy --image localhost/web:1 --payload 'httpd -f -p 8080' --name web

An image is run by Podman on nodes that have it (podman and runc installed); its archive
(`podman save`) goes in each node's image directory (workloads.images; its <realm>/
subdirectory for one realm only), as nodes reach no registry. The nodes place the replicas themselves; `macula workloads` shows where they run.")]
pub struct DeployArgs {
    /// A manifest: Macula's YAML (`kind: payload` or `job`) or a Kubernetes Deployment or Job.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "MANIFEST",
        conflicts_with_all = ["payload", "image", "package"]
    )]
    pub file: Option<PathBuf>,
    /// A Hub package to run: `org/name@version` (or `org/name`: its newest version neither
    /// yanked nor revoked). Its own workload manifest is deployed, pinned to the version's
    /// digest; every node verifies the package against the Hub before it runs it.
    #[arg(long, value_name = "ORG/NAME[@VERSION]", conflicts_with_all = ["payload", "image"])]
    pub package: Option<String>,
    /// The Hub to resolve --package at [default: the node's own address].
    #[arg(
        long,
        value_name = "URL",
        requires = "package",
        conflicts_with = "bundle"
    )]
    pub hub: Option<String>,
    /// Resolve --package from an offline bundle (.bmz) instead of the Hub (a site that cannot
    /// reach it; the nodes install from the bundle imported there).
    #[arg(long, value_name = "BUNDLE", requires = "package")]
    pub bundle: Option<PathBuf>,
    /// A command to run as a payload (split as a shell would; the node passes PORT and
    /// MACULA_* in the environment). One word that reads as an image reference
    /// (`name:tag`, `registry/name`) is run as that image; with --image, the command run in it.
    #[arg(long, value_name = "COMMAND", required_unless_present_any = ["file", "image", "package"])]
    pub payload: Option<String>,
    /// An OCI image to run as the payload (the podman runtime).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// The payload's name [default: the command's program name].
    #[arg(long)]
    pub name: Option<String>,
    /// How many replicas.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Environment of the replicas, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Ask the node for a port and pass it as PORT.
    #[arg(long)]
    pub port: bool,
    /// Return once the record is handed in, without waiting for the replicas.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the replicas to run.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub conn: Conn,
}

/// Whether one word reads as an image reference rather than a program: `name:tag`, or
/// `host/name...`, not a path (`/`, `./`) and no program of that name on PATH.
fn looks_like_image(word: &str) -> bool {
    let shaped = (word.contains(':') || word.contains('/'))
        && !word.starts_with(['/', '.', '~'])
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:/@".contains(c));
    shaped && macula_workloads::runtime::on_path(word).is_none()
}

/// The manifest `--payload` (and `--image`) stand for.
fn payload_manifest(a: &DeployArgs, command: Option<&str>) -> Result<(String, String)> {
    let mut argv = match command {
        Some(c) => shell_words::split(c).context("--payload")?,
        None => vec![],
    };
    let image = match &a.image {
        Some(i) => Some(i.clone()),
        None if argv.len() == 1 && looks_like_image(&argv[0]) => argv.pop(),
        None => None,
    };
    let Some(program) = image.as_ref().or(argv.first()) else {
        bail!("--payload is empty: give the command to run");
    };
    let name = match &a.name {
        Some(n) => n.clone(),
        None => {
            // An image's name without its registry and tag; a program's base name.
            let base = program.rsplit('/').next().unwrap_or(program);
            let base = match image {
                Some(_) => base.split([':', '@']).next().unwrap_or(base),
                None => base,
            };
            let n: String = base
                .to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            n.trim_matches('-').to_owned()
        }
    };
    let mut m = json!({
        "kind": "payload",
        "name": name,
        "replicas": a.replicas,
    });
    match image {
        Some(image) => {
            m["runtime"] = json!("podman");
            m["image"] = json!(image);
            if !argv.is_empty() {
                m["command"] = json!(argv);
            }
        }
        None => m["command"] = json!(argv),
    }
    if !a.env.is_empty() {
        let mut env = serde_json::Map::new();
        for kv in &a.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("--env {kv}: write KEY=VALUE"))?;
            env.insert(k.to_owned(), Value::String(v.to_owned()));
        }
        m["env"] = Value::Object(env);
    }
    if a.port {
        m["ports"] = json!([{"name": "http"}]);
    }
    // JSON is YAML: the record keeps exactly this text.
    Ok((name, serde_json::to_string_pretty(&m)?))
}

pub fn deploy(a: DeployArgs, json: bool) -> Result<()> {
    let api = NodeApi::new(&a.conn)?;
    let (name, text) = match (&a.file, &a.payload) {
        _ if a.package.is_some() && a.bundle.is_some() => crate::hub_cmds::bundle_manifest(
            a.bundle.as_deref().unwrap_or(std::path::Path::new("")),
            a.package.as_deref().unwrap_or(""),
            !json,
        )?,
        _ if a.package.is_some() => {
            let hub = a.hub.clone().unwrap_or_else(|| api.base.clone());
            let agent = http_agent(a.conn.ca.as_deref(), Duration::from_secs(60))?;
            crate::hub_cmds::package_manifest(
                &agent,
                &hub,
                a.package.as_deref().unwrap_or(""),
                !json,
            )?
        }
        (Some(f), _) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let m = macula_workloads::parse(&text).map_err(|e| anyhow!("{}: {e}", f.display()))?;
            (m.workload().name.clone(), text)
        }
        (None, cmd) if cmd.is_some() || a.image.is_some() => payload_manifest(&a, cmd.as_deref())?,
        (None, _) => bail!(
            "give a manifest (-f FILE), a command (--payload CMD) or an image (--image IMAGE)"
        ),
    };
    let manifest = macula_workloads::parse(&text).map_err(|e| anyhow!("{e}"))?;
    let seq = api.put(&name, Some(text))?;
    let want = macula_workloads::wire::slots_of(&manifest);
    if !json {
        eprintln!("deployed {name} (version {seq}) to {}", api.realm);
    }
    if a.no_wait || want == 0 {
        if json {
            println!("{}", json!({"name": name, "seq": seq}));
        }
        return Ok(());
    }
    if let Manifest::Job(_) = manifest {
        let s = converge_job(&api, &name, seq, want, a.timeout, !json)?;
        if json {
            println!("{}", json!({"name": name, "seq": seq, "job": s}));
        }
        return Ok(());
    }
    let running = converge(&api, &name, seq, want, a.timeout, !json)?;
    if json {
        println!("{}", json!({"name": name, "seq": seq, "replicas": running}));
    }
    Ok(())
}

/// Waits until job `name` at version `seq` has its `want` completions (with a progress bar on
/// a terminal); an error when it failed, or past `timeout`.
fn converge_job(
    api: &NodeApi,
    name: &str,
    seq: u64,
    want: u32,
    timeout: Duration,
    show: bool,
) -> Result<Summary> {
    let bar = progress(show, want);
    let deadline = Instant::now() + timeout;
    loop {
        let s = api
            .jobs()?
            .iter()
            .filter_map(summary_of)
            .find(|s| s.name == name && s.seq == seq);
        if let (Some(s), Some(b)) = (&s, &bar) {
            b.set_position(s.succeeded as u64);
            b.set_message(format!("{name}: completions ({} running)", s.running));
        }
        match &s {
            Some(s) if s.state == "complete" => {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                if show {
                    eprintln!("{name}: {} of {want} completions", s.succeeded);
                }
                return Ok(s.clone());
            }
            Some(s) if s.state == "failed" => {
                if let Some(b) = bar {
                    b.abandon();
                }
                bail!(
                    "{name} failed: {} ({} of {want} completions)\n  (`macula logs {name}` shows its output)",
                    s.detail.as_deref().unwrap_or("a run failed"),
                    s.succeeded
                );
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            if let Some(b) = bar {
                b.abandon();
            }
            let done = s.as_ref().map_or(0, |s| s.succeeded);
            bail!(
                "{name}: {done} of {want} completions after {}s{}\n  (`macula jobs` shows where it stands; the nodes keep going)",
                timeout.as_secs(),
                s.and_then(|s| s.detail).map(|d| format!(": {d}")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A progress bar to `len` on a terminal (when `show`).
fn progress(show: bool, len: u32) -> Option<indicatif::ProgressBar> {
    (show && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(len as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:20}] {pos}/{len}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    })
}

/// Waits until payload `name` at version `seq` has `want` replicas running that version,
/// ready, and no other (a rolling update has ended), with a progress bar on a terminal;
/// returns its replicas. Past `timeout`: an error with what is pending and why.
fn converge(
    api: &NodeApi,
    name: &str,
    seq: u64,
    want: u32,
    timeout: Duration,
    show: bool,
) -> Result<Vec<ReplicaStatus>> {
    let bar = progress(show, want);
    let deadline = Instant::now() + timeout;
    loop {
        let v = api.get(&format!("/payloads/{name}"))?;
        let s = summary_of(&v).filter(|s| s.seq == seq);
        let replicas: Vec<ReplicaStatus> =
            serde_json::from_value(v["replicas"].clone()).unwrap_or_default();
        let updated = s.as_ref().map_or(0, |s| s.updated);
        let running = s.as_ref().map_or(0, |s| s.running);
        if let Some(b) = &bar {
            b.set_position(updated.min(want) as u64);
            b.set_message(format!("{name}: replicas updated and ready"));
        }
        if updated >= want && running == want {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if show {
                eprintln!("{name}: {want} of {want} replicas running version {seq}");
            }
            return Ok(replicas
                .into_iter()
                .filter(|r| r.state == "running" && r.seq == seq)
                .collect());
        }
        if Instant::now() >= deadline {
            if let Some(b) = bar {
                b.abandon();
            }
            let why: Vec<String> = replicas
                .iter()
                .filter(|r| r.state != "running" || !r.ready || r.seq != seq)
                .map(|r| {
                    format!(
                        "replica {} (version {}): {}{}",
                        r.replica,
                        r.seq,
                        r.state,
                        r.detail
                            .as_deref()
                            .map(|d| format!(" ({d})"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            bail!(
                "{name}: {updated} of {want} replicas running version {seq} after {}s{}{}\n  (`macula workloads` shows where it stands; the nodes keep trying)",
                timeout.as_secs(),
                if why.is_empty() { "" } else { ": " },
                why.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `macula rollout`: a workload's versions.
#[derive(clap::Subcommand)]
pub enum RolloutCmd {
    /// Wait until the payload's replicas all run its newest version and are ready (a rolling
    /// update has ended), showing progress.
    Status(RolloutStatusArgs),
    /// The versions the node keeps (the newest, and up to 5 before it).
    History(RolloutHistoryArgs),
    /// Deploy the version before the newest again (or --to-version N), as a new version.
    Undo(RolloutUndoArgs),
}

#[derive(Args)]
pub struct RolloutStatusArgs {
    /// The payload.
    pub name: String,
    /// How long to wait.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
pub struct RolloutHistoryArgs {
    /// The workload.
    pub name: String,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args)]
#[command(after_help = "Examples:
  macula rollout undo api                  (back to the version before the newest)
  macula rollout undo api --to-version 3   (any version `macula rollout history api` lists)")]
pub struct RolloutUndoArgs {
    /// The workload.
    pub name: String,
    /// The version to go back to [default: the one before the newest].
    #[arg(long, value_name = "N")]
    pub to_version: Option<u64>,
    /// Return once the record is handed in.
    #[arg(long)]
    pub no_wait: bool,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub conn: Conn,
}

pub fn rollout(cmd: RolloutCmd, json: bool) -> Result<()> {
    match cmd {
        RolloutCmd::Status(a) => {
            let api = NodeApi::new(&a.conn)?;
            let (seq, m) = api.current(&a.name)?;
            let want = macula_workloads::wire::slots_of(&m);
            let out = match m {
                Manifest::Job(_) => {
                    json!(converge_job(&api, &a.name, seq, want, a.timeout, !json)?)
                }
                Manifest::Payload(_) => {
                    json!(converge(&api, &a.name, seq, want, a.timeout, !json)?)
                }
            };
            if json {
                println!("{}", json!({"name": a.name, "seq": seq, "status": out}));
            }
            Ok(())
        }
        RolloutCmd::History(a) => {
            let api = NodeApi::new(&a.conn)?;
            let items = api.history(&a.name)?;
            if json {
                println!("{}", json!({"name": a.name, "versions": items}));
                return Ok(());
            }
            let mut t = table(&["VERSION", "SIGNED", "CHANGE"]);
            let mut newer: Option<&str> = None;
            for (i, v) in items.iter().enumerate() {
                let text = v["manifest"].as_str();
                let change = match (text, newer) {
                    (None, _) => "deleted".to_owned(),
                    _ if i == 0 => "current".to_owned(),
                    (Some(t), Some(n)) => diff_summary(t, n),
                    (Some(_), None) => String::new(),
                };
                t.add_row(vec![
                    v["seq"].to_string(),
                    v["issued_at"].as_str().unwrap_or_default().to_owned(),
                    change,
                ]);
                newer = text.or(newer);
            }
            right_aligned(&mut t, &[0]);
            println!("{t}");
            Ok(())
        }
        RolloutCmd::Undo(a) => {
            let api = NodeApi::new(&a.conn)?;
            let items = api.history(&a.name)?;
            let current = items.first().and_then(|v| v["seq"].as_u64()).unwrap_or(0);
            let target = match a.to_version {
                Some(n) => items.iter().find(|v| v["seq"].as_u64() == Some(n)),
                None => items.iter().skip(1).find(|v| v["manifest"].is_string()),
            };
            let Some(target) = target else {
                bail!(
                    "{}: no {} to go back to (`macula rollout history {}` lists the versions kept)",
                    a.name,
                    a.to_version
                        .map_or("earlier version".to_owned(), |n| format!("version {n}")),
                    a.name
                );
            };
            let Some(text) = target["manifest"].as_str() else {
                bail!("version {} of {} is a deletion", target["seq"], a.name);
            };
            let m = macula_workloads::parse(text).map_err(|e| anyhow!("{e}"))?;
            let seq = api.put(&a.name, Some(text.to_owned()))?;
            if !json {
                eprintln!(
                    "{}: version {} is version {seq} now (was {current})",
                    a.name, target["seq"]
                );
            }
            let want = macula_workloads::wire::slots_of(&m);
            if a.no_wait || !matches!(m, Manifest::Payload(_)) {
                if json {
                    println!(
                        "{}",
                        json!({"name": a.name, "seq": seq, "from": target["seq"]})
                    );
                }
                return Ok(());
            }
            let running = converge(&api, &a.name, seq, want, a.timeout, !json)?;
            if json {
                println!(
                    "{}",
                    json!({"name": a.name, "seq": seq, "from": target["seq"], "replicas": running})
                );
            }
            Ok(())
        }
    }
}

/// What changed from `older` to `newer`, in a few words (the top-level fields that differ).
fn diff_summary(older: &str, newer: &str) -> String {
    let (Ok(a), Ok(b)) = (
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(older),
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(newer),
    ) else {
        return String::new();
    };
    let (Some(a), Some(b)) = (a.as_mapping(), b.as_mapping()) else {
        return String::new();
    };
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        "same as the next".into()
    } else {
        format!("next changed {}", keys.join(", "))
    }
}

#[derive(Args)]
pub struct WorkloadsArgs {
    /// Only this workload.
    pub name: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

/// `macula workloads`: every workload of the realm and its replicas (node, state, restarts,
/// lease token, age).
pub fn workloads(a: WorkloadsArgs, json: bool) -> Result<()> {
    let (v, text) = render_workloads(&a.conn, a.name.as_deref())?;
    if json {
        println!("{v}");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// The realm's workloads (or one) and their replicas, as JSON and as text (what `macula
/// workloads` and `macula status` print).
pub fn render_workloads(conn: &Conn, only: Option<&str>) -> Result<(Value, String)> {
    use std::fmt::Write;
    let api = NodeApi::new(conn)?;
    let records = api.records()?;
    let mut replicas = api.replicas()?;
    if let Some(n) = only {
        replicas.retain(|r| r.name == n);
    }
    let live = || {
        records
            .iter()
            .filter(move |(n, _, m)| m.is_some() && only.is_none_or(|x| x == n))
    };
    // Each live workload's manifest read once: its replicas wanted, its runtime, and its image
    // or command.
    let shown: Vec<(&String, &u64, u32, String, String)> = live()
        .map(|(n, seq, m)| {
            let parsed = m.as_deref().and_then(|t| macula_workloads::parse(t).ok());
            let (desired, runtime, artifact) = match &parsed {
                None => (0, "-".to_owned(), "-".to_owned()),
                Some(m) => {
                    let w = m.workload();
                    let artifact = match &w.artifact {
                        macula_workloads::Artifact::Image { image, .. } => image.clone(),
                        macula_workloads::Artifact::Command(argv) => shell_words::join(argv),
                    };
                    let runtime = match w.runtime {
                        macula_workloads::Runtime::Process => "process",
                        macula_workloads::Runtime::Podman => "podman",
                    };
                    (
                        macula_workloads::wire::slots_of(m),
                        runtime.to_owned(),
                        artifact,
                    )
                }
            };
            (n, seq, desired, runtime, artifact)
        })
        .collect();
    let items: Vec<Value> = shown
        .iter()
        .map(|(n, seq, desired, runtime, artifact)| {
            let mine: Vec<&ReplicaStatus> = replicas.iter().filter(|r| &r.name == *n).collect();
            json!({"name": n, "seq": seq, "replicas": desired, "runtime": runtime,
                   "artifact": artifact, "items": mine})
        })
        .collect();
    let v = json!({"realm": api.realm, "workloads": items});
    let mut out = String::new();
    if shown.is_empty() {
        let _ = writeln!(
            out,
            "no workloads in {} (deploy one: macula deploy --payload CMD)",
            api.realm
        );
        return Ok((v, out));
    }
    let now = macula_common::time::now_secs();
    let mut t = table(&[
        "NAME", "REPLICA", "NODE", "STATE", "RESTARTS", "TOKEN", "AGE", "DETAIL",
    ]);
    for (n, seq, desired, runtime, artifact) in &shown {
        let mine: Vec<&ReplicaStatus> = replicas.iter().filter(|r| &r.name == *n).collect();
        let running = mine.iter().filter(|r| r.state == "running").count();
        let _ = writeln!(
            out,
            "{n}  version {seq}  {running}/{desired} running  {runtime}: {artifact}"
        );
        for r in mine {
            let node = &r.node[r.node.len().saturating_sub(8)..];
            t.add_row(vec![
                n.to_string(),
                r.replica.to_string(),
                if node.is_empty() {
                    "-".into()
                } else {
                    node.to_owned()
                },
                r.state.clone(),
                r.restarts.to_string(),
                if r.token == 0 {
                    "-".into()
                } else {
                    r.token.to_string()
                },
                age(now.saturating_sub(r.since)),
                r.detail.clone().unwrap_or_default(),
            ]);
        }
    }
    right_aligned(&mut t, &[1, 4, 5, 6]);
    let _ = writeln!(out, "{t}");
    Ok((v, out))
}

#[derive(Args)]
#[command(after_help = "Examples:
  macula deploy -f job.yaml          (kind: job; waits for its completions)
  macula jobs
  macula jobs reindex --json")]
pub struct JobsArgs {
    /// Only this job.
    pub name: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

/// `macula jobs`: the realm's jobs (completions that count of those asked, runs going,
/// failures, state, age).
pub fn jobs(a: JobsArgs, json: bool) -> Result<()> {
    let api = NodeApi::new(&a.conn)?;
    let mut items = api.jobs()?;
    if let Some(n) = &a.name {
        items.retain(|i| i["name"].as_str() == Some(n));
    }
    if json {
        println!("{}", json!({"realm": api.realm, "jobs": items}));
        return Ok(());
    }
    if items.is_empty() {
        match &a.name {
            Some(n) => bail!("{} has no job named {n}", api.realm),
            None => println!(
                "no jobs in {} (run one: macula deploy -f job.yaml)",
                api.realm
            ),
        }
        return Ok(());
    }
    let now = macula_common::time::now_secs();
    let mut t = table(&[
        "NAME",
        "VERSION",
        "COMPLETIONS",
        "RUNNING",
        "FAILED",
        "STATE",
        "AGE",
        "DETAIL",
    ]);
    for i in &items {
        let Some(s) = summary_of(i) else { continue };
        let issued = i["issued_at"]
            .as_str()
            .and_then(|d| humantime::parse_rfc3339(d).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        t.add_row(vec![
            s.name.clone(),
            s.seq.to_string(),
            format!("{}/{}", s.succeeded, s.desired),
            s.running.to_string(),
            s.failed.to_string(),
            s.state.clone(),
            age(now.saturating_sub(issued)),
            s.detail.clone().unwrap_or_default(),
        ]);
    }
    right_aligned(&mut t, &[1, 2, 3, 4, 6]);
    println!("{t}");
    Ok(())
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

#[derive(Args)]
pub struct LogsArgs {
    /// The workload.
    pub name: String,
    /// Only this replica.
    #[arg(long)]
    pub replica: Option<u32>,
    /// Keep streaming new lines (from whichever nodes run the replicas) until Ctrl-C.
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `macula logs NAME [--replica i] [--follow]`.
pub fn logs(a: LogsArgs, json: bool) -> Result<()> {
    let api = NodeApi::new(&a.conn)?;
    let mut url = api.path(&format!("/workloads/{}/logs", a.name));
    let mut q = vec![];
    if let Some(i) = a.replica {
        q.push(format!("replica={i}"));
    }
    if a.follow {
        q.push("follow=true".into());
    }
    if !q.is_empty() {
        url = format!("{url}?{}", q.join("&"));
    }
    let res = api
        .stream_agent
        .get(&url)
        .header("Authorization", &format!("Bearer {}", api.key))
        .call();
    let res = res.map_err(|e| anyhow!("cannot reach the node at {}: {e}", api.base))?;
    if !res.status().is_success() {
        let status = res.status().as_u16();
        let text = res.into_body().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        bail!(
            "{} [{status}]",
            v["error"]["message"].as_str().unwrap_or(text.trim())
        );
    }
    let reader = BufReader::new(res.into_body().into_reader());
    for line in reader.lines() {
        let line = line?;
        if json {
            println!("{line}");
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        println!(
            "[{}/{}] {}",
            a.name,
            v["replica"].as_u64().unwrap_or(0),
            v["text"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ScaleArgs {
    /// The payload.
    pub name: String,
    /// How many replicas it should have.
    #[arg(long)]
    pub replicas: u32,
    #[command(flatten)]
    pub conn: Conn,
}

/// `macula scale NAME --replicas N`: a new record with the manifest's replicas changed.
pub fn scale(a: ScaleArgs, json: bool) -> Result<()> {
    let api = NodeApi::new(&a.conn)?;
    let (_, _, text) = api
        .records()?
        .into_iter()
        .find(|(n, _, m)| *n == a.name && m.is_some())
        .ok_or_else(|| anyhow!("no workload {} in {}", a.name, api.realm))?;
    let text = text.unwrap_or_default();
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).context("the deployed manifest")?;
    let kubernetes = doc.get("apiVersion").is_some();
    let target = if kubernetes {
        doc.get_mut("spec")
            .ok_or_else(|| anyhow!("the deployed Deployment has no spec"))?
    } else {
        &mut doc
    };
    let Some(map) = target.as_mapping_mut() else {
        bail!("the deployed manifest is not a mapping");
    };
    map.insert("replicas".into(), a.replicas.into());
    let new = serde_yaml_ng::to_string(&doc)?;
    let m = macula_workloads::parse(&new).map_err(|e| anyhow!("{e}"))?;
    if !matches!(m, Manifest::Payload(_)) {
        bail!("{} is a job: it has completions, not replicas", a.name);
    }
    let seq = api.put(&a.name, Some(new))?;
    if json {
        println!(
            "{}",
            json!({"name": a.name, "seq": seq, "replicas": a.replicas})
        );
    } else {
        eprintln!("{}: {} replicas (version {seq})", a.name, a.replicas);
    }
    Ok(())
}

#[derive(Args)]
pub struct DeleteArgs {
    /// The workload.
    pub name: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// `macula delete NAME`: a tombstone; every node stops the workload's replicas.
pub fn delete(a: DeleteArgs, json: bool) -> Result<()> {
    let api = NodeApi::new(&a.conn)?;
    if !api
        .records()?
        .iter()
        .any(|(n, _, m)| *n == a.name && m.is_some())
    {
        bail!("no workload {} in {}", a.name, api.realm);
    }
    let seq = api.put(&a.name, None)?;
    if json {
        println!("{}", json!({"name": a.name, "seq": seq, "deleted": true}));
    } else {
        eprintln!("{} deleted (version {seq}); its replicas stop", a.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::looks_like_image;

    #[test]
    fn one_word_with_a_tag_or_a_registry_is_an_image_and_a_path_or_program_is_not() {
        assert!(looks_like_image("api-server:latest"));
        assert!(looks_like_image("docker.io/library/nginx:1.27"));
        assert!(looks_like_image("localhost/web@sha256:abc"));
        assert!(!looks_like_image("/usr/bin/env"));
        assert!(!looks_like_image("./server"));
        assert!(!looks_like_image("hostname"), "no tag, no registry");
        assert!(!looks_like_image("sh -c"), "not one word");
    }
}
