//! `macula up` and `macula node`.

use macula_node::Load;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use macula_node::{ConfDir, Node};

use crate::local::{default_home, up_key_path};

#[derive(Args)]
pub struct UpArgs {
    /// Config and data directory (created on first run).
    #[arg(long, env = "MACULA_HOME", default_value_os_t = default_home())]
    pub home: PathBuf,
    /// The demo realm to create.
    #[arg(long, default_value = "com.example.demo")]
    pub realm: String,
    /// WebSocket, HTTP bridge and metrics address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// RawSocket address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub rawsocket: SocketAddr,
    /// Start a local mesh of this many nodes (node i listens on the HTTP and RawSocket ports
    /// plus 2i and on mesh port --mesh-port plus i; all join the first).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub nodes: u16,
    /// UDP port of the first node's mesh (QUIC) listener.
    #[arg(long, default_value_t = 7600)]
    pub mesh_port: u16,
    /// Registry database: sqlite://PATH or postgres://USER:PASSWORD@HOST/DB
    /// [default: registry.db in the config directory].
    #[arg(long, env = "MACULA_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
}

#[derive(Args)]
pub struct NodeArgs {
    /// Config directory: trust/operator.pub, realms/<realm>/policy.yaml, optional node.yaml.
    #[arg(long)]
    pub config: PathBuf,
    /// Override listen.http from node.yaml.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Override listen.rawsocket from node.yaml.
    #[arg(long)]
    pub rawsocket: Option<SocketAddr>,
    /// Join the mesh through this node (multiaddr, e.g. /ip4/10.0.0.1/udp/7600/quic-v1);
    /// repeatable. Without any, the node is a mesh of one until others join it.
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Override mesh.listen (QUIC multiaddr, e.g. /ip4/0.0.0.0/udp/7600/quic-v1); repeatable.
    #[arg(long, value_name = "MULTIADDR")]
    pub mesh_listen: Vec<String>,
    /// Override mesh.announce: the address other nodes should dial; repeatable.
    #[arg(long, value_name = "MULTIADDR")]
    pub announce: Vec<String>,
    /// Directory for this node's identity key, mesh certificate and usage counters (meter/)
    /// [default: <config>/node, counters in <config>/meter].
    /// Give each node its own when several share one config directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Serve only this node's clients: do not join a mesh.
    #[arg(long)]
    pub no_mesh: bool,
    /// Host the registry (accounts, realms, keys; REST under /v1) on this node. Needs
    /// trust/operator.key in the config directory. Same as registry.enabled: true.
    #[arg(long)]
    pub registry: bool,
    /// Registry database: sqlite://PATH or postgres://USER:PASSWORD@HOST/DB (registry.database).
    #[arg(long, env = "MACULA_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Set one setting of node.yaml for this run, by its path: `--set workloads.cpu_millis=500`,
    /// `--set tls.cert=/etc/macula/cert.pem` (the value is read as YAML); repeatable.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
}

/// Applies `--set path=value` overrides to a node's configuration; an unknown path or a value
/// of the wrong type is an error naming it.
pub fn apply_sets(config: &mut macula_node::NodeConfig, sets: &[String]) -> Result<()> {
    if sets.is_empty() {
        return Ok(());
    }
    let mut doc = serde_yaml_ng::to_value(&*config)?;
    for s in sets {
        let (path, value) = s
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {s}: write it as PATH=VALUE"))?;
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(value)
            .with_context(|| format!("--set {path}: the value is not YAML"))?;
        let mut at = &mut doc;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let map = at.as_mapping_mut().ok_or_else(|| {
                anyhow::anyhow!("--set {path}: {} is not a section", parts[..i].join("."))
            })?;
            if !map.contains_key(*part) {
                anyhow::bail!(
                    "--set {path}: node.yaml has no setting {}",
                    parts[..=i].join(".")
                );
            }
            at = map.get_mut(*part).expect("checked above");
        }
        *at = value;
    }
    *config = serde_yaml_ng::from_value(doc).map_err(|e| anyhow::anyhow!("--set: {e}"))?;
    Ok(())
}

pub async fn up(a: UpArgs, json: bool) -> Result<()> {
    // First in the log, so that a start that hangs shows where.
    tracing::info!(nodes = a.nodes, home = %a.home.display(), "macula up: starting");
    let dir = ConfDir::new(&a.home);
    dir.init()
        .with_context(|| format!("creating {}", a.home.display()))?;
    if !dir.realms()?.contains(&a.realm) {
        dir.create_realm(&a.realm, None)?;
    }
    let (kid, key) = dir.issue_key(&a.realm, "admin", "macula up", 30 * 86_400, None)?;
    let key_path = up_key_path(&a.home);
    macula_node::confdir::write_secret(&key_path, &format!("{key}\n"))?;
    std::fs::write(a.home.join("up-realm"), format!("{}\n", a.realm))?;
    let tls = up_certificate(&a.home)?;
    let mut loaded = dir.load()?;
    loaded.config.registry.enabled = true;
    // What `macula up` sets on every node it starts (the others get it with --set).
    let mut sets = vec![
        format!("tls.cert={UP_CERT}"),
        format!("tls.key={UP_CERT_KEY}"),
        // A machine for trying things: replicas run with limits and sandbox where the machine
        // allows them, and run anyway where it does not (`macula node` refuses by default).
        "workloads.require_limits=false".to_owned(),
        "workloads.require_sandbox=false".to_owned(),
    ];
    // One images directory for all the nodes (`<home>/images`), unless node.yaml names some.
    if loaded.config.workloads.images.is_empty() {
        sets.push("workloads.images=[images]".to_owned());
    }
    apply_sets(&mut loaded.config, &sets)?;
    let mut nodes: Vec<UpNode> = vec![];
    let mut children = vec![];
    // Several nodes take a few seconds: show them starting (on a terminal only).
    let progress = if a.nodes > 1 && !json {
        indicatif::ProgressBar::new(a.nodes as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("starting nodes {bar:20} {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Node 1 runs in this process (it hosts the registry); the others are processes of their
    // own, so that one can be stopped or killed like a machine that fails.
    let mut first: Option<macula_node::Running> = None;
    for i in 0..a.nodes {
        // Port 0 (any free port) stays 0 for every node.
        let shift = |p: u16| if p == 0 { 0 } else { p + 2 * i };
        let http = SocketAddr::new(a.http.ip(), shift(a.http.port()));
        let rawsocket = SocketAddr::new(a.rawsocket.ip(), shift(a.rawsocket.port()));
        let mesh_port = if a.mesh_port == 0 { 0 } else { a.mesh_port + i };
        let mesh = format!("/ip4/127.0.0.1/udp/{mesh_port}/quic-v1");
        if i == 0 {
            let mut l = loaded.clone();
            l.config.listen.http = http;
            l.config.listen.rawsocket = rawsocket;
            l.config.mesh.listen = vec![mesh];
            l.config.mesh.identity = PathBuf::from("nodes/1/identity.key");
            l.config.workloads.dir = PathBuf::from("nodes/1/workloads");
            let running = start(l, &dir, a.database.as_deref()).await?;
            nodes.push(UpNode {
                ws: running.ws_url(),
                rawsocket: running.rawsocket_url(),
                http: running.http_addr.to_string(),
                mesh: running.mesh_addrs.clone(),
                pid: std::process::id(),
            });
            first = Some(running);
        } else {
            let data = a.home.join(format!("nodes/{}", i + 1));
            // Packages come from node 1's Hub, when it runs one (its root of trust is in the
            // shared config directory, `hub-root.json`); else from bundles imported.
            let mut child_sets = sets.clone();
            if loaded.config.registry.hub.enabled && loaded.config.hub.url.is_empty() {
                child_sets.push(format!("hub.url=http://{}", nodes[0].http));
            }
            let (child, node) = spawn_node(
                &a.home,
                &data,
                http,
                rawsocket,
                &mesh,
                &nodes[0].mesh,
                &child_sets,
            )
            .await?;
            children.push(child);
            nodes.push(node);
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    let Some(running) = first.as_ref() else {
        anyhow::bail!("no node started");
    };
    let realm = &a.realm;
    if json {
        println!(
            "{}",
            serde_json::json!({"realm": realm, "key_id": kid, "key": key, "ws": running.ws_url(), "rawsocket": running.rawsocket_url(), "http": format!("http://{}", running.http_addr), "home": a.home,
                "wss": running.wss_url(), "rss": running.rss_url(), "https": format!("https://{}", running.http_addr),
                "ca": tls.cert, "fingerprint": tls.fingerprint,
                "nodes": nodes.iter().map(|n| serde_json::json!({"ws": n.ws, "rawsocket": n.rawsocket, "http": format!("http://{}", n.http), "mesh": n.mesh, "pid": n.pid})).collect::<Vec<_>>()})
        );
    } else {
        let http = format!("http://{}", running.http_addr);
        let https_url = format!("https://{}", running.http_addr);
        println!(
            r#"Macula is running.

  realm       {realm}
  WebSocket   {ws}        (subprotocols wamp.2.json, wamp.2.msgpack, wamp.2.cbor)
  RawSocket   {rs}
  HTTP        {http}     (/v1/realms/{realm}/publish, /metrics, /healthz)
  registry    {http}/v1  (accounts, realms, keys; {db})
  config      {home}

TLS on the same ports: {wss}  {rss}  {https}
  certificate {cert} (self-signed, for this machine)
  SHA-256     {fingerprint}
  e.g.        macula pub --url {wss} --ca {cert} {realm}.hello '"over TLS"'
  Plain ws://, rs:// and http:// are served to this machine only.

Admin key {kid} for {realm} (valid 30 days, saved to {keyfile}):

  {key}

Try it in other terminals (the CLI picks up this realm and key by itself):

  macula sub {realm}.hello
  macula pub {realm}.hello '"hi there"'
  macula serve {realm}.date -- date -u
  macula call {realm}.date
  macula usage                       # what the realm used this month (every operation is metered)
  curl -X POST {http}/v1/realms/{realm}/publish -H "Authorization: Bearer $(cat {keyfile})" \
       -H 'content-type: application/json' -d '{{"topic": "{realm}.hello", "args": ["from curl"]}}'

Python (Autobahn): connect to {ws} realm {realm} with authmethods=["ticket"] and the key as ticket.

Your own realm, through the registry:

  macula signup --email you@example.com
  macula account verify ev_…         # the code is mailed; here, printed in this window's log
  macula login --email you@example.com
  macula realms create com.you.app
  macula keys create --realm com.you.app --role admin --name first
{mesh}
Press Ctrl-C to stop."#,
            mesh = mesh_table(&nodes),
            wss = running.wss_url().unwrap_or_default(),
            rss = running.rss_url().unwrap_or_default(),
            https = https_url,
            cert = tls.cert.display(),
            fingerprint = tls.fingerprint,
            ws = running.ws_url(),
            rs = running.rawsocket_url(),
            home = a.home.display(),
            keyfile = key_path.display(),
            db = macula_registry::db::redact(&crate::hosting::database_url(
                &dir,
                &running.node.config.registry,
                a.database.as_deref()
            )),
        );
    }
    wait_for_shutdown().await;
    drop(children);
    Ok(())
}

/// A node `macula up` started: its addresses, and its process.
struct UpNode {
    ws: String,
    rawsocket: String,
    http: String,
    mesh: Vec<String>,
    pid: u32,
}

/// Starts `macula node` as a process of its own (stopped with this one: it is killed when
/// dropped, and when this process dies), its log in `<data>/node.log`; returns it once it
/// printed its addresses.
async fn spawn_node(
    home: &std::path::Path,
    data: &std::path::Path,
    http: SocketAddr,
    rawsocket: SocketAddr,
    mesh: &str,
    bootstrap: &[String],
    sets: &[String],
) -> Result<(tokio::process::Child, UpNode)> {
    use tokio::io::AsyncBufReadExt;
    std::fs::create_dir_all(data)?;
    let exe = std::env::current_exe().context("finding this program to start nodes")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("node")
        .arg("--config")
        .arg(home)
        .arg("--data-dir")
        .arg(data)
        .args([
            "--http",
            &http.to_string(),
            "--rawsocket",
            &rawsocket.to_string(),
        ])
        .args(["--mesh-listen", mesh]);
    for b in bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; the child dies with this process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting a node")?;
    let pid = child.id().unwrap_or(0);
    let stderr = child.stderr.take().context("the node's output")?;
    let mut log = tokio::fs::File::create(data.join("node.log")).await?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let (mut ws, mut rs, mut addr, mut mesh_addrs) = (None, None, None, vec![]);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while mesh_addrs.is_empty() {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "node {} did not start within 30 s (see {})",
                    data.display(),
                    data.join("node.log").display()
                )
            })?
            .context("reading the node's output")?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "node {} stopped at start (see {})",
                    data.display(),
                    data.join("node.log").display()
                )
            })?;
        tokio::io::AsyncWriteExt::write_all(&mut log, format!("{line}\n").as_bytes()).await?;
        // Its own lines ("macula node: ..."), not its log's.
        let Some(said) = line.strip_prefix("macula node: ") else {
            continue;
        };
        let words: Vec<&str> = said.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "WebSocket") {
            ws = words.get(i + 1).map(|s| s.to_string());
            rs = words
                .iter()
                .position(|w| *w == "RawSocket")
                .and_then(|j| words.get(j + 1))
                .map(|s| s.to_string());
            addr = words
                .last()
                .map(|s| s.trim_start_matches("http://").to_string());
        }
        if words.first() == Some(&"mesh") {
            if let Some(m) = words.get(1) {
                mesh_addrs.push(m.to_string());
            }
        }
    }
    // The rest of its log, to its file.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ =
                tokio::io::AsyncWriteExt::write_all(&mut log, format!("{line}\n").as_bytes()).await;
        }
    });
    let node = UpNode {
        ws: ws.unwrap_or_default(),
        rawsocket: rs.unwrap_or_default(),
        http: addr.unwrap_or_default(),
        mesh: mesh_addrs,
        pid,
    };
    Ok((child, node))
}

/// Where `macula up` keeps its self-signed certificate (in its config directory).
const UP_CERT: &str = "tls/cert.pem";
const UP_CERT_KEY: &str = "tls/key.pem";

/// `macula up`'s certificate: its file and SHA-256 fingerprint.
struct UpCert {
    cert: PathBuf,
    fingerprint: String,
}

/// Reuses `macula up`'s self-signed certificate for localhost, 127.0.0.1 and ::1, or makes one
/// (again when it is near its end: it is valid for a year).
fn up_certificate(home: &std::path::Path) -> Result<UpCert> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let cert = home.join(UP_CERT);
    let key = home.join(UP_CERT_KEY);
    let fresh = std::fs::metadata(&cert)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(300 * 86_400));
    if !fresh || !key.exists() {
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .context("certificate names")?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "macula up (this machine)");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let year = 1970 + (now / 31_556_952) as i32;
        params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
        let pair = rcgen::KeyPair::generate().context("generating a TLS key")?;
        let made = params
            .self_signed(&pair)
            .context("making the self-signed certificate")?;
        std::fs::create_dir_all(home.join("tls"))?;
        macula_node::confdir::write_secret(&key, &pair.serialize_pem())?;
        std::fs::write(&cert, made.pem()).with_context(|| format!("writing {}", cert.display()))?;
    }
    let der = CertificateDer::from_pem_file(&cert)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(der.as_ref());
    let fingerprint = digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(UpCert { cert, fingerprint })
}

/// The nodes of `macula up --nodes N`, for the banner.
fn mesh_table(nodes: &[UpNode]) -> String {
    if nodes.len() < 2 {
        return format!(
            "Mesh: this node listens on {} — start more with `macula node --bootstrap <that address>`, or use `macula up --nodes 3`.\n",
            nodes[0].mesh.first().map_or("(off)", |s| s.as_str())
        );
    }
    let mut s = format!(
        "A local mesh of {} nodes (clients may use any of them; nodes 2 and up are processes of\ntheir own, logs in <home>/nodes/N/node.log):\n\n",
        nodes.len()
    );
    for (i, n) in nodes.iter().enumerate() {
        s.push_str(&format!(
            "  node {}  {}  {}  http://{}  pid {}\n",
            i + 1,
            n.ws,
            n.rawsocket,
            n.http,
            n.pid
        ));
    }
    s.push_str(&format!(
        "\nInspect it with `macula mesh status` (add --http {} for node 2).\n",
        nodes[1].http
    ));
    s
}

pub async fn node(a: NodeArgs) -> Result<()> {
    let dir = ConfDir::new(&a.config);
    let mut loaded = dir.load()?;
    if a.no_mesh {
        loaded.config.mesh.enabled = false;
    }
    if !a.bootstrap.is_empty() {
        loaded.config.mesh.bootstrap = a.bootstrap.clone();
    }
    if !a.mesh_listen.is_empty() {
        loaded.config.mesh.listen = a.mesh_listen.clone();
    }
    if !a.announce.is_empty() {
        loaded.config.mesh.announce = a.announce.clone();
    }
    if let Some(d) = &a.data_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        let d = std::path::absolute(d)?;
        loaded.config.mesh.identity = d.join("identity.key");
        loaded.config.mesh.cert = d.join("node.cert");
        // Usage counters and workloads (records, lease promises, replicas) are per node too.
        loaded.config.metering.dir = d.join("meter");
        loaded.config.workloads.dir = d.join("workloads");
    }
    if let Some(h) = a.http {
        loaded.config.listen.http = h;
    }
    if let Some(r) = a.rawsocket {
        loaded.config.listen.rawsocket = r;
    }
    if a.registry || a.database.is_some() {
        loaded.config.registry.enabled = true;
    }
    apply_sets(&mut loaded.config, &a.set)?;
    let realms = loaded.policies.len();
    let registry = loaded.config.registry.enabled;
    let running = start(loaded, &dir, a.database.as_deref()).await?;
    if registry {
        eprintln!(
            "macula node: registry at http://{}/v1 (OpenAPI: /v1/openapi.json)",
            running.http_addr
        );
    }
    eprintln!(
        "macula node: {realms} realm(s); WebSocket {}  RawSocket {}  HTTP http://{}",
        running.ws_url(),
        running.rawsocket_url(),
        running.http_addr
    );
    for m in &running.mesh_addrs {
        eprintln!("macula node: mesh {m}  (other nodes join with --bootstrap {m})");
    }
    wait_for_shutdown().await;
    Ok(())
}

/// Starts a node, with the registry's routes when `registry.enabled`.
async fn start(
    loaded: macula_node::Loaded,
    dir: &ConfDir,
    database: Option<&str>,
) -> Result<macula_node::Running> {
    let enabled = loaded.config.registry.enabled;
    let url = crate::hosting::database_url(dir, &loaded.config.registry, database);
    let node = Node::new(loaded, Some(dir.clone()));
    let extra = if enabled {
        let (_, routes) = crate::hosting::host(&node, dir, &url)
            .await
            .with_context(|| {
                format!(
                    "starting the registry (database {})",
                    macula_registry::db::redact(&url)
                )
            })?;
        Some(routes)
    } else {
        None
    };
    macula_node::start_with(node, extra).await
}

async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
