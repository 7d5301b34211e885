//! Secrets at rest (isolation finding 10): the database never holds a realm authority's secret in
//! the clear, a copy of it without the KEK mints nothing, the wrong KEK is refused at start, and
//! the embedded database's files are readable by their owner only.

mod common;

use common::{account, req, serve};
use macula_registry::kek::KekSource;
use macula_registry::RegistryConfig;
use macula_router::auth::credential;
use serde_json::json;
use sqlx::Row;

async fn stored_secret(reg: &macula_registry::Registry, realm: &str) -> String {
    sqlx::query("SELECT authority_key FROM realms WHERE name = $1")
        .bind(realm)
        .fetch_one(&reg.db.pool)
        .await
        .unwrap()
        .try_get("authority_key")
        .unwrap()
}

/// Issues a key for `realm` and checks it was signed by the authority in the node's directory.
async fn issue_and_check(srv: &common::Server, token: &str, realm: &str) {
    let (s, v) = req(
        &srv.base,
        "POST",
        &format!("/v1/realms/{realm}/keys"),
        Some(token),
        Some(json!({"name": "k", "role": "admin"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let operator = srv.dir.operator_key().unwrap().verifying_key();
    let key = credential::verify_key(v["key"].as_str().unwrap(), &operator, 1).unwrap();
    let file = std::fs::read_to_string(srv.dir.root.join(format!("realms/{realm}/authority.key")))
        .unwrap();
    let secret = credential::parse_hex32(&file).unwrap();
    let public = ed25519_dalek::SigningKey::from_bytes(&secret)
        .verifying_key()
        .to_bytes();
    assert_eq!(key.authority.authority, public);
}

async fn sealed_at_rest(url: &str, tmp: &std::path::Path) {
    let srv = serve(url, tmp, RegistryConfig::default()).await;
    let alice = account(&srv.base, "alice@example.com").await;
    common::register(&srv.base, &alice, "com.acme").await;
    issue_and_check(&srv, &alice, "com.acme").await;

    // The row holds a sealed secret: not the authority's secret, in any case.
    let file = std::fs::read_to_string(srv.dir.root.join("realms/com.acme/authority.key")).unwrap();
    let stored = stored_secret(&srv.reg, "com.acme").await;
    assert!(stored.starts_with("kek1:"), "{stored}");
    assert!(!stored.to_lowercase().contains(&file.trim().to_lowercase()));

    // A row written before sealing (the secret in the clear) is sealed on the next start, and
    // keys keep working.
    sqlx::query("UPDATE realms SET authority_key = $1 WHERE name = 'com.acme'")
        .bind(file.trim())
        .execute(&srv.reg.db.pool)
        .await
        .unwrap();
    srv.reg.db.pool.close().await;
    drop(srv);
    let srv = serve(url, tmp, RegistryConfig::default()).await;
    let stored = stored_secret(&srv.reg, "com.acme").await;
    assert!(stored.starts_with("kek1:"), "{stored}");
    let alice = common::login(&srv.base, "alice@example.com").await;
    issue_and_check(&srv, &alice, "com.acme").await;
    srv.reg.db.pool.close().await;
    drop(srv);

    // Another KEK (here from the environment's form of it) does not open the database: the
    // registry refuses to start and says which setting to fix.
    let dir = macula_node::ConfDir::new(tmp);
    let db = macula_registry::db::open(url).await.unwrap();
    let config = RegistryConfig {
        kek: KekSource::Hex("42".repeat(32)),
        ..RegistryConfig::default()
    };
    let err = macula_registry::Registry::new(db, config, dir.clone(), None)
        .await
        .err()
        .expect("the wrong KEK was accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("MACULA_REGISTRY_KEK"), "{msg}");

    // The KEK file itself, created on first start, is the owner's only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.join("registry.kek"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "registry.kek is readable by others");
    }
}

on_both_backends!(sealed_at_rest);

/// The embedded database and its WAL are created readable by their owner only, and files an
/// older version left readable by others are made private on start.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_database_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let url = common::sqlite_url(tmp.path());
    let mode = |f: &str| {
        std::fs::metadata(tmp.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let srv = serve(&url, tmp.path(), RegistryConfig::default()).await;
    account(&srv.base, "alice@example.com").await;
    for f in ["registry.db", "registry.db-wal", "registry.db-shm"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    srv.reg.db.pool.close().await;
    drop(srv);
    for f in ["registry.db", "registry.db-wal", "registry.db-shm"] {
        let p = tmp.path().join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let srv = serve(&url, tmp.path(), RegistryConfig::default()).await;
    common::login(&srv.base, "alice@example.com").await;
    for f in ["registry.db", "registry.db-wal", "registry.db-shm"] {
        assert_eq!(mode(f), 0o600, "{f} after a restart");
    }
}
