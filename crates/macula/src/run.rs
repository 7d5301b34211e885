//! `macula up` and `macula node`.

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
    std::fs::write(&key_path, format!("{key}\n"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::write(a.home.join("up-realm"), format!("{}\n", a.realm))?;
    let mut loaded = dir.load()?;
    loaded.config.listen.http = a.http;
    loaded.config.listen.rawsocket = a.rawsocket;
    let node = Node::new(loaded, Some(dir));
    let running = macula_node::start(node).await?;
    let realm = &a.realm;
    if json {
        println!(
            "{}",
            serde_json::json!({"realm": realm, "key_id": kid, "key": key, "ws": running.ws_url(), "rawsocket": running.rawsocket_url(), "http": format!("http://{}", running.http_addr), "home": a.home})
        );
    } else {
        let http = format!("http://{}", running.http_addr);
        println!(
            r#"Macula is running.

  realm       {realm}
  WebSocket   {ws}        (subprotocols wamp.2.json, wamp.2.msgpack, wamp.2.cbor)
  RawSocket   {rs}
  HTTP        {http}     (/v1/realms/{realm}/publish, /metrics, /healthz)
  config      {home}

Admin key {kid} for {realm} (valid 30 days, saved to {keyfile}):

  {key}

Try it in other terminals (the CLI picks up this realm and key by itself):

  macula sub {realm}.hello
  macula pub {realm}.hello '"hi there"'
  macula serve {realm}.date -- date -u
  macula call {realm}.date
  curl -X POST {http}/v1/realms/{realm}/publish -H "Authorization: Bearer $(cat {keyfile})" \
       -H 'content-type: application/json' -d '{{"topic": "{realm}.hello", "args": ["from curl"]}}'

Python (Autobahn): connect to {ws} realm {realm} with authmethods=["ticket"] and the key as ticket.
Press Ctrl-C to stop."#,
            ws = running.ws_url(),
            rs = running.rawsocket_url(),
            home = a.home.display(),
            keyfile = key_path.display(),
        );
    }
    wait_for_shutdown().await;
    Ok(())
}

pub async fn node(a: NodeArgs) -> Result<()> {
    let dir = ConfDir::new(&a.config);
    let mut loaded = dir.load()?;
    if let Some(h) = a.http {
        loaded.config.listen.http = h;
    }
    if let Some(r) = a.rawsocket {
        loaded.config.listen.rawsocket = r;
    }
    let realms = loaded.policies.len();
    let node = Node::new(loaded, Some(dir));
    let running = macula_node::start(node).await?;
    eprintln!(
        "macula node: {realms} realm(s); WebSocket {}  RawSocket {}  HTTP http://{}",
        running.ws_url(),
        running.rawsocket_url(),
        running.http_addr
    );
    wait_for_shutdown().await;
    Ok(())
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
