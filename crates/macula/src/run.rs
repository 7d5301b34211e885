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
}

pub async fn up(a: UpArgs, json: bool) -> Result<()> {
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
    loaded.config.tls.cert = PathBuf::from(UP_CERT);
    loaded.config.tls.key = PathBuf::from(UP_CERT_KEY);
    let mut nodes = vec![];
    let mut first_mesh: Vec<String> = vec![];
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
    for i in 0..a.nodes {
        let mut l = loaded.clone();
        // Port 0 (any free port) stays 0 for every node.
        let shift = |p: u16| if p == 0 { 0 } else { p + 2 * i };
        l.config.listen.http = SocketAddr::new(a.http.ip(), shift(a.http.port()));
        l.config.listen.rawsocket = SocketAddr::new(a.rawsocket.ip(), shift(a.rawsocket.port()));
        l.config.mesh.listen = vec![format!("/ip4/127.0.0.1/udp/{}/quic-v1", a.mesh_port + i)];
        l.config.mesh.identity = PathBuf::from(format!("nodes/{}/identity.key", i + 1));
        l.config.workloads.dir = PathBuf::from(format!("nodes/{}/workloads", i + 1));
        if i > 0 {
            // One counters file per node.
            l.config.metering.dir = PathBuf::from(format!("nodes/{}/meter", i + 1));
        }
        l.config.mesh.bootstrap = first_mesh.clone();
        // The first node hosts the registry.
        l.config.registry.enabled = i == 0;
        let running = start(l, &dir, a.database.as_deref()).await?;
        if i == 0 {
            first_mesh = running.mesh_addrs.clone();
        }
        nodes.push(running);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let running = &nodes[0];
    let realm = &a.realm;
    if json {
        println!(
            "{}",
            serde_json::json!({"realm": realm, "key_id": kid, "key": key, "ws": running.ws_url(), "rawsocket": running.rawsocket_url(), "http": format!("http://{}", running.http_addr), "home": a.home,
                "wss": running.wss_url(), "rss": running.rss_url(), "https": format!("https://{}", running.http_addr),
                "ca": tls.cert, "fingerprint": tls.fingerprint,
                "nodes": nodes.iter().map(|n| serde_json::json!({"ws": n.ws_url(), "rawsocket": n.rawsocket_url(), "http": format!("http://{}", n.http_addr), "mesh": n.mesh_addrs})).collect::<Vec<_>>()})
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
                &nodes[0].node.config.registry,
                a.database.as_deref()
            )),
        );
    }
    wait_for_shutdown().await;
    Ok(())
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
fn mesh_table(nodes: &[macula_node::Running]) -> String {
    if nodes.len() < 2 {
        return format!(
            "Mesh: this node listens on {} — start more with `macula node --bootstrap <that address>`, or use `macula up --nodes 3`.\n",
            nodes[0].mesh_addrs.first().map_or("(off)", |s| s.as_str())
        );
    }
    let mut s = format!(
        "A local mesh of {} nodes (clients may use any of them):\n\n",
        nodes.len()
    );
    for (i, n) in nodes.iter().enumerate() {
        s.push_str(&format!(
            "  node {}  {}  {}  http://{}\n",
            i + 1,
            n.ws_url(),
            n.rawsocket_url(),
            n.http_addr
        ));
    }
    s.push_str(&format!(
        "\nInspect it with `macula mesh status` (add --http {} for node 2).\n",
        nodes[1].http_addr
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
        // Usage counters are per node too (one node per counters file).
        loaded.config.metering.dir = d.join("meter");
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
