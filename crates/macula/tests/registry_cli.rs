//! The seed's onboarding flow from the CLI against `macula up`: sign up, log in, create a realm,
//! get a key, publish with it; then revoke the key: a new session is refused and the live one is
//! closed within seconds. Once on the embedded SQLite, once on PostgreSQL (`--database`).

mod macula_up;

use std::path::Path;
use std::time::{Duration, Instant};

use macula_up::{cli_as as cli, mailed_code, Up};

use futures_util::StreamExt;
use macula_client::{Client, ConnectOptions};
use macula_wamp::Value;

/// `macula --json up` on free ports (`--database` when given); the process, its HTTP and
/// WebSocket URLs.
fn up(home: &Path, database: Option<&str>) -> (Up, String, String) {
    let extra: Vec<&str> = database.map(|d| vec!["--database", d]).unwrap_or_default();
    let (up, v) = macula_up::up(home, &extra);
    (
        up,
        v["http"].as_str().unwrap().to_owned(),
        v["ws"].as_str().unwrap().to_owned(),
    )
}

/// `macula --json keys create --realm com.onboard.app ARGS...`, its JSON answer.
fn create_key(cfg: &Path, server: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json", "keys", "create", "--realm", "com.onboard.app"];
    all.extend_from_slice(args);
    serde_json::from_str(&cli(cfg, server, &all, None)).unwrap()
}

async fn onboarding(database: Option<&str>) {
    let home = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let mail = home.path().join("mail");
    std::fs::write(
        home.path().join("node.yaml"),
        format!(
            "registry:\n  operators: [ops@example.com]\n  mail:\n    url: dir:{}\n",
            mail.display()
        ),
    )
    .unwrap();
    let (_up, http, ws) = up(home.path(), database);
    let c = cfg.path();
    let pw = "correct horse battery\n";
    cli(
        c,
        &http,
        &["signup", "--email", "dev@example.com", "--password-stdin"],
        Some(pw),
    );
    cli(
        c,
        &http,
        &["login", "--email", "dev@example.com", "--password-stdin"],
        Some(pw),
    );
    assert!(c.join("macula/credentials.json").exists());
    cli(c, &http, &["realms", "create", "com.onboard.app"], None);
    let listed = cli(c, &http, &["realms", "list"], None);
    assert!(
        listed.contains("com.onboard.app") && listed.contains("owner"),
        "{listed}"
    );
    let key = create_key(c, &http, &["--role", "service_account", "--name", "bots"]);
    let (kid, secret) = (key["id"].as_str().unwrap(), key["key"].as_str().unwrap());

    // The key works on the node at once: a subscriber gets what the CLI publishes with it.
    let opts = |k: &str| {
        let mut o = ConnectOptions::new(&ws, "com.onboard.app", k);
        o.reconnect = false;
        o
    };
    let sub = Client::connect_with(opts(secret))
        .await
        .expect("the new key is accepted");
    let mut events = sub.subscribe("com.onboard.app.hello").await.unwrap();
    cli(
        c,
        &http,
        &[
            "pub",
            "--url",
            &ws,
            "--realm",
            "com.onboard.app",
            "--key",
            secret,
            "com.onboard.app.hello",
            "[\"hi\"]",
        ],
        None,
    );
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.payload.args, vec![Value::from("hi")]);

    // The realm's policy from the CLI: shown, and the mesh told to believe only proven roles.
    let shown = cli(c, &http, &["realms", "policy", "com.onboard.app"], None);
    assert!(
        shown.contains("verified roles: off") && shown.contains("service_account"),
        "{shown}"
    );
    let on = cli(
        c,
        &http,
        &[
            "realms",
            "policy",
            "com.onboard.app",
            "--verified-roles",
            "on",
        ],
        None,
    );
    assert!(on.contains("verified roles: on"), "{on}");
    // Which Hub packages the realm runs: kept by the registry in the signed policy.
    let pk = cli(
        c,
        &http,
        &[
            "realms",
            "policy",
            "com.onboard.app",
            "--package-tier",
            "certified",
            "--package-publishers",
            "acme,initech",
        ],
        None,
    );
    assert!(
        pk.contains("certified or better, from acme, initech") && pk.contains("verified roles: on"),
        "{pk}"
    );
    let peer = macula_mesh::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    let (ok, _, err) = macula_up::cli_run(
        c,
        &http,
        &["realms", "policy", "com.onboard.app", "--nodes", &peer],
        None,
    );
    assert!(!ok && err.contains("dedicated_nodes add-on"), "{err}");

    let status = cli(c, &http, &["status", "--realm", "com.onboard.app"], None);
    assert!(
        status.contains("active") && status.contains("live sessions"),
        "{status}"
    );

    // Revoke: the live session is closed within seconds, a new one refused.
    cli(c, &http, &["keys", "revoke", kid], None);
    let revoked = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "the live session is closed within 5 s"
    );
    assert!(revoked.elapsed() < Duration::from_secs(5));
    let refused = Client::connect_with(opts(secret)).await;
    assert!(
        refused.is_err(),
        "a revoked key is refused on a new session"
    );
    let keys = cli(c, &http, &["keys", "list"], None);
    assert!(keys.contains(kid) && keys.contains("revoked"), "{keys}");

    // An operator suspends the realm (abuse takedown): the node closes its live sessions and
    // refuses new ones until the suspension is lifted.
    let key = create_key(c, &http, &["--name", "second"]);
    let secret = key["key"].as_str().unwrap().to_owned();
    let live = Client::connect_with(opts(&secret)).await.unwrap();
    let mut events = live.subscribe("com.onboard.app.hello").await.unwrap();
    let ops_cfg = tempfile::tempdir().unwrap();
    let o = ops_cfg.path();
    cli(
        o,
        &http,
        &["signup", "--email", "ops@example.com", "--password-stdin"],
        Some(pw),
    );
    cli(
        o,
        &http,
        &["login", "--email", "ops@example.com", "--password-stdin"],
        Some(pw),
    );
    // Operator rights need the address proven: the code mailed to it, verified with the CLI.
    let shown = cli(o, &http, &["account", "show"], None);
    assert!(shown.contains("not verified"), "{shown}");
    let code = mailed_code(&mail, "ops@example.com");
    cli(o, &http, &["account", "verify", &code], None);
    let shown = cli(o, &http, &["account", "show"], None);
    assert!(shown.contains("(verified), operator"), "{shown}");
    let cred: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("macula/credentials.json")).unwrap())
            .unwrap();
    let token = cred["token"].as_str().unwrap().to_owned();
    let admin = |action: &str| {
        let url = format!("{http}/v1/admin/realms/com.onboard.app/{action}");
        let token = token.clone();
        std::thread::spawn(move || {
            ureq::post(&url)
                .header("Authorization", &format!("Bearer {token}"))
                .send_json(serde_json::json!({"reason": "abuse report 7"}))
                .map(|r| r.status().as_u16())
        })
        .join()
        .unwrap()
        .unwrap()
    };
    assert_eq!(admin("suspend"), 200);
    let end = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "a suspended realm's live session is closed within 5 s"
    );
    let refused = Client::connect_with(opts(&secret))
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("realm_disabled") && e.contains("abuse report 7")),
        "{refused:?}"
    );
    assert_eq!(admin("unsuspend"), 200);
    Client::connect_with(opts(&secret))
        .await
        .expect("the realm works again");

    cli(c, &http, &["logout"], None);
    assert!(!c.join("macula/credentials.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_on_sqlite() {
    onboarding(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_on_postgres() {
    let Some(pg) = macula_registry::testpg::Postgres::start() else {
        return;
    };
    onboarding(Some(&pg.url)).await;
}
