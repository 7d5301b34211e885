//! The registry's REST API over real HTTP, the same suite against embedded SQLite and against a
//! throwaway PostgreSQL (skipped, with a message, where PostgreSQL is not installed).

mod common;

use macula_node::Load;
use std::time::Duration;

use common::{account, req, req_raw, serve, sqlite_url};
use macula_registry::RegistryConfig;
use serde_json::{json, Value};

on_both_backends!(suite);

on_both_backends!(race);

async fn race(url: &str, dir: &std::path::Path) {
    let srv = serve(url, dir, RegistryConfig::default()).await;
    let mut tokens = vec![];
    for i in 0..8 {
        tokens.push(account(&srv.base, &format!("racer{i}@example.com")).await);
    }
    let mut tasks = vec![];
    for t in tokens {
        let base = srv.base.clone();
        tasks.push(tokio::spawn(async move {
            req(
                &base,
                "POST",
                "/v1/realms",
                Some(&t),
                Some(json!({"name": "com.contested"})),
            )
            .await
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            201 => created += 1,
            409 => assert_eq!(v["error"]["code"], "realm_taken", "{v}"),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!(created, 1, "exactly one registration wins");
    let owners: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM realms WHERE name = 'com.contested'")
            .fetch_one(&srv.reg.db.pool)
            .await
            .unwrap();
    assert_eq!(owners, 1);
}

async fn suite(url: &str, dir: &std::path::Path) {
    let config = RegistryConfig {
        operators: vec!["ops@macula.example".into()],
        ..RegistryConfig::default()
    };
    let srv = serve(url, dir, config).await;
    let b = srv.base.as_str();

    // --- accounts and sessions
    let (s, v) = req(b, "GET", "/v1/realms", None, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let alice = account(b, "alice@example.com").await;
    let (s, v) = req(
        b,
        "POST",
        "/v1/accounts",
        None,
        Some(json!({"email": "Alice@Example.com", "password": "another long one"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("account_exists"))
    );
    let (s, v) = req(
        b,
        "POST",
        "/v1/accounts",
        None,
        Some(json!({"email": "x@example.com", "password": "short"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("weak_password"))
    );
    let (s, _) = req(
        b,
        "POST",
        "/v1/accounts",
        None,
        Some(json!({"email": "not an email", "password": "long enough pass"})),
    )
    .await;
    assert_eq!(s, 422);
    let (s, v) = req(b, "GET", "/v1/account", Some(&alice), None).await;
    assert_eq!((s, v["email"].as_str()), (200, Some("alice@example.com")));
    let bob = account(b, "bob@example.com").await;
    let ops = account(b, "ops@macula.example").await;

    // --- realm names
    for bad in [
        "nodots",
        "Com.Acme",
        "com..acme",
        "com.acme'; DROP TABLE accounts;--",
        "",
    ] {
        let (s, v) = req(
            b,
            "POST",
            "/v1/realms",
            Some(&alice),
            Some(json!({"name": bad})),
        )
        .await;
        assert_eq!(s, 422, "{bad:?}: {v}");
        assert_eq!(v["error"]["code"], "invalid_realm_name");
    }
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms",
        Some(&alice),
        Some(json!({"name": "com.acme"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["status"], "active");
    assert_eq!(v["owner"], "alice@example.com");
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms",
        Some(&bob),
        Some(json!({"name": "com.acme"})),
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("realm_taken")));
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms",
        Some(&alice),
        Some(json!({"name": "io.macula.mine"})),
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("reserved")));
    // The policy reached the node's directory.
    assert_eq!(srv.dir.read_policy("com.acme").unwrap().version, 1);

    // --- subrealms: only the parent's owner creates or delegates them
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms",
        Some(&bob),
        Some(json!({"name": "com.acme.shop"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("not_parent_owner"))
    );
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms",
        Some(&alice),
        Some(json!({"name": "com.acme.shop", "owner_email": "bob@example.com"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (v["owner"].as_str(), v["parent"].as_str()),
        (Some("bob@example.com"), Some("com.acme"))
    );
    let (s, v) = req(b, "DELETE", "/v1/realms/com.acme", Some(&alice), None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("has_subrealms"))
    );

    // --- 403 vs 404
    let (s, _) = req(b, "GET", "/v1/realms/com.acme", Some(&bob), None).await;
    assert_eq!(s, 403);
    let (s, _) = req(b, "GET", "/v1/realms/com.nothing", Some(&bob), None).await;
    assert_eq!(s, 404);
    let (s, v) = req(b, "GET", "/v1/realms/com.acme", Some(&ops), None).await;
    assert_eq!((s, v["access"].as_str()), (200, Some("operator")));

    // --- keys: shown once, stored as a hash, idempotent create
    let key_req = json!({"name": "bots", "role": "service_account", "expires_in_days": 30});
    let (s, k1) = req_raw(
        b,
        "POST",
        "/v1/realms/com.acme/keys",
        Some(&alice),
        Some(key_req.to_string()),
        &[("Idempotency-Key", "k-1")],
    )
    .await;
    assert_eq!(s, 201, "{k1}");
    let secret = k1["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk_live_"));
    let (s, k2) = req_raw(
        b,
        "POST",
        "/v1/realms/com.acme/keys",
        Some(&alice),
        Some(key_req.to_string()),
        &[("Idempotency-Key", "k-1")],
    )
    .await;
    assert_eq!(s, 201);
    assert_eq!(
        (k2["id"].clone(), k2["key"].clone()),
        (k1["id"].clone(), k1["key"].clone()),
        "a retry returns the same key"
    );
    let (s, v) = req_raw(
        b,
        "POST",
        "/v1/realms/com.acme/keys",
        Some(&alice),
        Some(json!({"name": "other"}).to_string()),
        &[("Idempotency-Key", "k-1")],
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );
    let stored: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_all(&srv.reg.db.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "the retry created nothing");
    assert!(!stored[0].contains(&secret[8..20]), "only a hash is stored");
    // The key verifies offline against the trust root, for the realm and role asked.
    let op = srv.dir.load().unwrap().operator;
    let verified =
        macula_router::auth::credential::verify_key(&secret, &op, macula_common::time::now_secs())
            .unwrap();
    assert_eq!(
        (
            verified.claims.realm.as_str(),
            verified.claims.role.as_str()
        ),
        ("com.acme", "service_account")
    );
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/keys",
        Some(&alice),
        Some(json!({"role": "root"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("unknown_role"))
    );
    // A cryptosign key bound to a weak public key (the identity point: a signature "by" it can
    // be forged) is refused at issuance.
    let mut weak = [0u8; 32];
    weak[0] = 1;
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/keys",
        Some(&alice),
        Some(json!({"pubkey": hex::encode(weak)})),
    )
    .await;
    assert_eq!(
        v["error"]["code"].as_str(),
        Some("invalid_pubkey"),
        "{s} {v}"
    );
    let (s, _) = req(
        b,
        "POST",
        "/v1/realms/com.acme/keys",
        Some(&bob),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 403, "a stranger cannot create keys");
    for i in 0..4 {
        let (s, _) = req(
            b,
            "POST",
            "/v1/realms/com.acme/keys",
            Some(&alice),
            Some(json!({"name": format!("k{i}")})),
        )
        .await;
        assert_eq!(s, 201);
    }
    // Pagination: 5 keys, pages of 2.
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/realms/com.acme/keys?limit=2&cursor={c}"),
            None => "/v1/realms/com.acme/keys?limit=2".into(),
        };
        let (s, v) = req(b, "GET", &path, Some(&alice), None).await;
        assert_eq!(s, 200);
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        assert!(
            items.iter().all(|k| k.get("key").is_none()),
            "lists never carry secrets"
        );
        seen.extend(items.iter().map(|k| k["id"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!((seen.len(), dedup.len()), (5, 5));
    let (s, v) = req(
        b,
        "GET",
        "/v1/realms/com.acme/keys?cursor=zz",
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_cursor"))
    );

    // --- revocation: a new policy version lists the key
    let kid = k1["id"].as_str().unwrap();
    let (s, v) = req(b, "DELETE", &format!("/v1/keys/{kid}"), Some(&alice), None).await;
    assert_eq!(s, 200, "{v}");
    let doc = srv.dir.read_policy("com.acme").unwrap();
    assert!(doc.revoked_keys.iter().any(|k| k == kid));
    let (s, _) = req(b, "DELETE", &format!("/v1/keys/{kid}"), Some(&alice), None).await;
    assert_eq!(s, 200, "revoking twice is harmless");

    // --- members and roles; nobody escalates their own role
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/members",
        Some(&alice),
        Some(json!({"email": "bob@example.com", "role": "developer"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = req(b, "GET", "/v1/realms/com.acme", Some(&bob), None).await;
    assert_eq!(s, 200, "a developer may read (realm:read)");
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/members",
        Some(&bob),
        Some(json!({"email": "bob@example.com", "role": "admin"})),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, _) = req(
        b,
        "POST",
        "/v1/realms/com.acme/keys",
        Some(&bob),
        Some(json!({"role": "admin"})),
    )
    .await;
    assert_eq!(s, 403, "a developer may not mint admin keys");
    let (s, _) = req(
        b,
        "POST",
        "/v1/realms/com.acme/members",
        Some(&alice),
        Some(json!({"email": "bob@example.com", "role": "admin"})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/members",
        Some(&bob),
        Some(json!({"email": "bob@example.com", "role": "developer"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("own_role")),
        "even an admin cannot change their own role"
    );
    // Custom roles through the policy; the member's own role cannot be rewritten by them.
    let (_, pol) = req(b, "GET", "/v1/realms/com.acme/policy", Some(&alice), None).await;
    let mut roles = pol["roles"].as_array().unwrap().clone();
    roles.push(json!({"name": "auditor", "permissions": ["realm:read"]}));
    let (s, v) = req(
        b,
        "PUT",
        "/v1/realms/com.acme/policy",
        Some(&alice),
        Some(json!({"roles": roles, "expected_version": 1})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("stale_policy"))
    );
    let version = pol["version"].as_i64().unwrap();
    let (s, v) = req(
        b,
        "PUT",
        "/v1/realms/com.acme/policy",
        Some(&alice),
        Some(json!({"roles": roles, "expected_version": version})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["version"].as_i64(), Some(version + 1));
    let mut escalated = roles.clone();
    for r in escalated.iter_mut() {
        if r["name"] == "admin" {
            r["permissions"] = json!(["realm:*", "pubsub:*:*"]);
        }
    }
    let (s, _) = req(
        b,
        "PUT",
        "/v1/realms/com.acme/policy",
        Some(&bob),
        Some(json!({"roles": escalated})),
    )
    .await;
    assert_eq!(s, 403, "bob acts through admin and may not rewrite it");
    let (s, v) = req(
        b,
        "GET",
        "/v1/realms/com.acme/policy/versions?limit=2",
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["items"][0]["version"].as_i64(), Some(version + 1));
    assert!(v["next_cursor"].is_string());

    // --- transfer with an authorization code
    let (s, _) = req(
        b,
        "POST",
        "/v1/realms/com.acme/transfer-code",
        Some(&bob),
        None,
    )
    .await;
    assert_eq!(s, 403, "only the owner issues transfer codes");
    let (s, tc) = req(
        b,
        "POST",
        "/v1/realms/com.acme/transfer-code",
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(s, 201);
    let carol = account(b, "carol@example.com").await;
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/transfer",
        Some(&carol),
        Some(json!({"code": "tc_wrong"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("invalid_transfer_code"))
    );
    // Disputes freeze ownership.
    let (s, _) = req(
        b,
        "POST",
        "/v1/admin/realms/com.acme/freeze",
        Some(&alice),
        Some(json!({"reason": "x"})),
    )
    .await;
    assert_eq!(s, 403, "only operators freeze");
    let (s, v) = req(
        b,
        "POST",
        "/v1/admin/realms/com.acme/claims",
        Some(&ops),
        Some(json!({"claimant": "carol@example.com", "note": "trademark"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = req(
        b,
        "POST",
        "/v1/admin/realms/com.acme/freeze",
        Some(&ops),
        Some(json!({"reason": "dispute claim"})),
    )
    .await;
    assert_eq!((s, v["frozen"].as_bool()), (200, Some(true)));
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/transfer",
        Some(&carol),
        Some(json!({"code": tc["code"]})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("realm_frozen"))
    );
    let (s, _) = req(
        b,
        "POST",
        "/v1/admin/realms/com.acme/unfreeze",
        Some(&ops),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/transfer",
        Some(&carol),
        Some(json!({"code": tc["code"]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["owner"].as_str(), v["fee_cents"].as_i64()),
        (Some("carol@example.com"), Some(2000))
    );
    let fee: i64 = sqlx::query_scalar(
        "SELECT amount_cents FROM fees WHERE kind = 'transfer' AND realm = 'com.acme'",
    )
    .fetch_one(&srv.reg.db.pool)
    .await
    .unwrap();
    assert_eq!(fee, 2000);
    let (s, _) = req(
        b,
        "POST",
        "/v1/realms/com.acme/transfer",
        Some(&carol),
        Some(json!({"code": tc["code"]})),
    )
    .await;
    assert_eq!(s, 409, "a code works once");
    let (s, _) = req(b, "DELETE", "/v1/realms/com.acme.shop", Some(&alice), None).await;
    assert_eq!(s, 403, "alice no longer owns anything here");
    // Operator transfer resolves the dispute.
    let (s, v) = req(
        b,
        "POST",
        "/v1/admin/realms/com.acme/transfer",
        Some(&ops),
        Some(json!({"to": "alice@example.com"})),
    )
    .await;
    assert_eq!((s, v["owner"].as_str()), (200, Some("alice@example.com")));

    // --- suspension disables the realm on the node
    let (s, v) = req(
        b,
        "POST",
        "/v1/admin/realms/com.acme/suspend",
        Some(&ops),
        Some(json!({"reason": "abuse report 42"})),
    )
    .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("suspended")));
    assert!(srv
        .dir
        .read_policy("com.acme")
        .unwrap()
        .disabled
        .unwrap()
        .contains("abuse report 42"));
    let (s, _) = req(
        b,
        "POST",
        "/v1/admin/realms/com.acme/unsuspend",
        Some(&ops),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(srv.dir.read_policy("com.acme").unwrap().disabled.is_none());

    // --- renew
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.acme/renew",
        Some(&alice),
        Some(json!({"years": 2})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = req(
        b,
        "POST",
        "/v1/realms/com.acme/renew",
        Some(&alice),
        Some(json!({"years": 99})),
    )
    .await;
    assert_eq!(s, 422);

    // --- bad input changes nothing
    let (s, v) = req_raw(
        b,
        "POST",
        "/v1/realms",
        Some(&alice),
        Some("{not json".into()),
        &[],
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(100_000));
    let (s, v) = req_raw(b, "POST", "/v1/realms", Some(&alice), Some(big), &[]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    let (s, _) = req(
        b,
        "POST",
        "/v1/sessions",
        None,
        Some(json!({"email": "alice@example.com' OR '1'='1", "password": "x' OR '1'='1"})),
    )
    .await;
    assert_eq!(s, 401);
    let accounts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
        .fetch_one(&srv.reg.db.pool)
        .await
        .unwrap();
    assert_eq!(accounts, 4);
    // A refused request leaves no trace but its refusal.
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&srv.reg.db.pool)
        .await
        .unwrap();
    let (s, _) = req(
        b,
        "POST",
        "/v1/realms/com.acme/keys",
        Some(&alice),
        Some(json!({"role": "nope"})),
    )
    .await;
    assert_eq!(s, 422);
    let after: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&srv.reg.db.pool)
        .await
        .unwrap();
    assert_eq!(before, after);

    // --- audit: who, what, when, from where; no secrets
    let (s, v) = req(
        b,
        "GET",
        "/v1/realms/com.acme/audit?limit=100",
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let actions: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "realm.register",
        "key.create",
        "key.revoke",
        "member.set",
        "policy.update",
        "realm.transfer",
        "dispute.freeze",
        "realm.suspend",
        "realm.renew",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    assert_eq!(v["items"][0]["remote"], "127.0.0.1");
    assert!(
        !v.to_string().contains(&secret),
        "a key never reaches the audit log"
    );
    assert!(!v.to_string().contains("correct horse"));

    // --- brute force: locked after 5 failures, even for the right password
    for _ in 0..4 {
        let (s, v) = req(
            b,
            "POST",
            "/v1/sessions",
            None,
            Some(json!({"email": "bob@example.com", "password": "wrong password!"})),
        )
        .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (401, Some("invalid_credentials"))
        );
    }
    let (s, v) = req(
        b,
        "POST",
        "/v1/sessions",
        None,
        Some(json!({"email": "bob@example.com", "password": "wrong password!"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("account_locked"))
    );
    let (s, v) = req(
        b,
        "POST",
        "/v1/sessions",
        None,
        Some(json!({"email": "bob@example.com", "password": "correct horse battery"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("account_locked"))
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("minute"));
    // The lock-out holds for the source that failed, not for the owner elsewhere: from another
    // address the right password logs in, and the wrong one counts separately.
    let (s, v) = login_from(
        b,
        "127.0.0.2",
        json!({"email": "bob@example.com", "password": "correct horse battery"}),
    )
    .await;
    assert_eq!(s, 201, "another source is not locked out: {v}");
    let (s, v) = login_from(
        b,
        "127.0.0.2",
        json!({"email": "bob@example.com", "password": "wrong password!"}),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_credentials"))
    );

    // --- logout ends the session
    let (s, _) = req(b, "DELETE", "/v1/sessions/current", Some(&carol), None).await;
    assert_eq!(s, 204);
    let (s, _) = req(b, "GET", "/v1/account", Some(&carol), None).await;
    assert_eq!(s, 401);

    // --- delete
    let (s, _) = req(b, "DELETE", "/v1/realms/com.acme.shop", Some(&bob), None).await;
    assert_eq!(s, 204);
    // What stays on the node is a tombstone (so no older state can come back), not the realm.
    let tomb = srv.dir.read_policy("com.acme.shop").unwrap();
    assert!(tomb.deleted && tomb.roles.is_empty() && tomb.users.is_empty());

    // --- a restart keeps everything and migrates nothing twice
    let url = url.to_owned();
    drop(srv);
    let srv = serve(&url, dir, RegistryConfig::default()).await;
    assert_eq!(
        srv.reg.db.schema_version().await.unwrap(),
        macula_registry::db::newest_schema()
    );
    let (s, v) = req(&srv.base, "GET", "/v1/realms/com.acme", Some(&alice), None).await;
    assert_eq!((s, v["owner"].as_str()), (200, Some("alice@example.com")));
}

/// Every route of the API, as the clients know it. The router and the OpenAPI document are
/// generated from one list; this test fails when that list loses or gains a route, or the
/// document drifts from it.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/accounts"),
    ("get", "/v1/account"),
    ("post", "/v1/account/verify"),
    ("post", "/v1/account/verification"),
    ("put", "/v1/account/email"),
    ("post", "/v1/sessions"),
    ("delete", "/v1/sessions/current"),
    ("get", "/v1/realms"),
    ("post", "/v1/realms"),
    ("get", "/v1/realms/{realm}"),
    ("delete", "/v1/realms/{realm}"),
    ("post", "/v1/realms/{realm}/renew"),
    ("post", "/v1/realms/{realm}/transfer-code"),
    ("post", "/v1/realms/{realm}/transfer"),
    ("get", "/v1/realms/{realm}/members"),
    ("post", "/v1/realms/{realm}/members"),
    ("delete", "/v1/realms/{realm}/members/{email}"),
    ("get", "/v1/realms/{realm}/policy"),
    ("put", "/v1/realms/{realm}/policy"),
    ("get", "/v1/realms/{realm}/policy/versions"),
    ("get", "/v1/realms/{realm}/keys"),
    ("post", "/v1/realms/{realm}/keys"),
    ("delete", "/v1/realms/{realm}/keys/{key_id}"),
    ("get", "/v1/keys"),
    ("delete", "/v1/keys/{key_id}"),
    ("get", "/v1/realms/{realm}/audit"),
    ("get", "/v1/audit"),
    ("get", "/v1/admin/realms/{realm}/claims"),
    ("post", "/v1/admin/realms/{realm}/claims"),
    ("post", "/v1/admin/realms/{realm}/freeze"),
    ("post", "/v1/admin/realms/{realm}/unfreeze"),
    ("post", "/v1/admin/realms/{realm}/suspend"),
    ("post", "/v1/admin/realms/{realm}/unsuspend"),
    ("post", "/v1/admin/realms/{realm}/transfer"),
    ("get", "/v1/plans"),
    ("get", "/v1/realms/{realm}/usage"),
    ("get", "/v1/realms/{realm}/usage/{month}"),
    ("post", "/v1/realms/{realm}/plan"),
    ("post", "/v1/realms/{realm}/addons"),
    ("get", "/v1/invoices"),
    ("get", "/v1/invoices/{invoice}"),
    ("post", "/v1/invoices/{invoice}/pay"),
    ("post", "/v1/admin/invoices/run"),
    ("post", "/v1/admin/invoices/{invoice}/void"),
    ("post", "/v1/hub/publishers"),
    ("get", "/v1/hub/publishers/{namespace}"),
    ("post", "/v1/hub/publishers/{namespace}/approve"),
    ("post", "/v1/hub/publishers/{namespace}/keys"),
    ("delete", "/v1/hub/publishers/{namespace}/keys/{key_id}"),
    ("get", "/v1/hub/publishers/{namespace}/role"),
    ("post", "/v1/hub/publishers/{namespace}/releases"),
    ("put", "/v1/hub/blobs/{digest}"),
    ("get", "/v1/hub/blobs/{digest}"),
    ("get", "/v1/hub/packages"),
    ("get", "/v1/hub/packages/{namespace}/{name}"),
    ("post", "/v1/hub/releases/{namespace}/{release}/{action}"),
    ("get", "/v1/hub/trust"),
    ("post", "/v1/hub/bundle-metadata"),
    ("get", "/v1/openapi.json"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = serve(
        &sqlite_url(tmp.path()),
        tmp.path(),
        RegistryConfig::default(),
    )
    .await;
    // The document the API serves is the one the crate generates.
    let (s, doc) = req(&srv.base, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(s, 200);
    let generated: serde_json::Value =
        serde_json::from_str(macula_registry::http::openapi()).unwrap();
    assert_eq!(doc, generated);
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = vec![];
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (m, op) in ops.as_object().unwrap() {
            documented.push((m.clone(), path.clone()));
            // Every operation says what it answers, and every route that needs a session
            // says so.
            assert!(op["summary"].is_string(), "{m} {path} has no summary");
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{m} {path}"
            );
        }
    }
    let mut routes: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    routes.sort();
    assert_eq!(documented, routes);
    // Every route of the list is served (a route in the document but not in the router would
    // answer 404 or 405 with axum's empty body, not the API's error shape).
    for (m, p) in ROUTES {
        let path = p
            .replace("{realm}", "com.nosuch")
            .replace("{email}", "x@example.com")
            .replace("{key_id}", "key_0")
            .replace("{invoice}", "inv_0")
            .replace("{month}", "2026-11")
            .replace("{namespace}", "nosuch")
            .replace("{name}", "pkg")
            .replace("{release}", "pkg@1.0.0")
            .replace("{action}", "yank")
            .replace("{digest}", &format!("sha256:{}", "0".repeat(64)));
        let (s, v) = req(
            &srv.base,
            &m.to_uppercase(),
            &path,
            None,
            Some(serde_json::json!({})),
        )
        .await;
        assert!(
            s != 405 && (s != 404 || v["error"]["code"].is_string()),
            "{m} {p}: {s} {v}"
        );
    }
    // The schemas of what the API exchanges are in the document, named.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "ErrorBody",
        "Realm",
        "NewRealm",
        "Key",
        "NewKey",
        "PolicyUpdate",
        "PolicyDoc",
        "Invoice",
        "UsageMonth",
        "Publisher",
        "Publish",
        "Release",
        "List_Realm",
        "List_Key",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_transfer_code_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        transfer_code_ttl: Duration::ZERO,
        ..RegistryConfig::default()
    };
    let srv = serve(&sqlite_url(tmp.path()), tmp.path(), config).await;
    let b = srv.base.as_str();
    let owner = account(b, "owner@example.com").await;
    let buyer = account(b, "buyer@example.com").await;
    let (s, _) = req(
        b,
        "POST",
        "/v1/realms",
        Some(&owner),
        Some(json!({"name": "com.expiring"})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, tc) = req(
        b,
        "POST",
        "/v1/realms/com.expiring/transfer-code",
        Some(&owner),
        None,
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.expiring/transfer",
        Some(&buyer),
        Some(json!({"code": tc["code"]})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("transfer_code_expired")),
        "{v}"
    );
    let (_, v) = req(b, "GET", "/v1/realms/com.expiring", Some(&owner), None).await;
    assert_eq!(v["owner"], "owner@example.com");
    let fees: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM fees")
        .fetch_one(&srv.reg.db.pool)
        .await
        .unwrap();
    assert_eq!(fees, 0);
}

/// POST /v1/sessions from the source address `src` (a loopback address other than 127.0.0.1),
/// over a raw HTTP/1.1 connection: (status, JSON body).
async fn login_from(base: &str, src: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let body = body.to_string();
    let req = format!(
        "POST /v1/sessions HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// Bounded cost (isolation finding 12): every registration is a budget on every node, so one
/// account holds a bounded number of realms (subrealms included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_holds_a_bounded_number_of_realms() {
    let tmp = tempfile::tempdir().unwrap();
    let config = macula_registry::RegistryConfig {
        max_realms_per_account: 2,
        ..Default::default()
    };
    let srv = common::serve(&common::sqlite_url(tmp.path()), tmp.path(), config).await;
    let b = srv.base.as_str();
    let me = common::account(b, "many@example.com").await;
    for name in ["com.many", "com.many.sub"] {
        common::register(b, &me, name).await;
    }
    let (s, v) = common::req(
        b,
        "POST",
        "/v1/realms",
        Some(&me),
        Some(json!({"name": "com.many2"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("realm_limit")),
        "{v}"
    );
    // Another account is not affected.
    let other = common::account(b, "other@example.com").await;
    common::register(b, &other, "com.other").await;
}

/// A subrealm whose policy was written before policies listed the owner's ancestor
/// authorities gets the list on the registry's next start (otherwise the owner's parent keys
/// would not reach it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_from_before_authorities_are_completed_on_start() {
    let tmp = tempfile::tempdir().unwrap();
    let url = common::sqlite_url(tmp.path());
    let srv = common::serve(&url, tmp.path(), Default::default()).await;
    let b = srv.base.as_str();
    let me = common::account(b, "old@example.com").await;
    for name in ["com.old", "com.old.child"] {
        common::register(b, &me, name).await;
    }
    let listed = srv.dir.read_policy("com.old.child").unwrap();
    assert_eq!(listed.authorities.len(), 1);
    // As an older version wrote it: no list.
    let latest: i64 =
        sqlx::query_scalar("SELECT policy_version FROM realms WHERE name = 'com.old.child'")
            .fetch_one(&srv.reg.db.pool)
            .await
            .unwrap();
    let mut doc = listed.clone();
    doc.authorities.clear();
    sqlx::query(
        "UPDATE policy_versions SET doc = $1 WHERE realm = 'com.old.child' AND version = $2",
    )
    .bind(serde_yaml_ng::to_string(&doc).unwrap())
    .bind(latest)
    .execute(&srv.reg.db.pool)
    .await
    .unwrap();
    drop(srv);
    let srv = common::serve(&url, tmp.path(), Default::default()).await;
    let now = srv.dir.read_policy("com.old.child").unwrap();
    assert_eq!(now.authorities, listed.authorities);
    assert_eq!(now.version, listed.version + 1);
}

/// Rows a name kept from a registration released before generations existed (migration 4) are
/// not the next registrant's: registering the name archives them as `name#0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_an_unarchived_registration_are_not_inherited() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = common::serve(
        &common::sqlite_url(tmp.path()),
        tmp.path(),
        Default::default(),
    )
    .await;
    let b = srv.base.as_str();
    // As an old version left them: audit rows and usage under the bare name, no generation.
    sqlx::query("INSERT INTO audit (realm, actor, action, detail, remote, at) VALUES ('com.left', 'gone@example.com', 'key.create', '{\"secret\": \"old owner trail\"}', '203.0.113.9', 1)")
        .execute(&srv.reg.db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO usage_rollups (realm, period, start, ops_publish, ops_subscribe, ops_call, ops_register, ops_dht, bytes_in, bytes_out) VALUES ('com.left', 'month', 0, 99, 0, 0, 0, 0, 0, 0)")
        .execute(&srv.reg.db.pool)
        .await
        .unwrap();
    let me = common::account(b, "new@example.com").await;
    common::register(b, &me, "com.left").await;
    let (s, v) = common::req(b, "GET", "/v1/realms/com.left/audit", Some(&me), None).await;
    assert_eq!(s, 200, "{v}");
    assert!(!v.to_string().contains("old owner trail"), "{v}");
    let left: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM usage_rollups WHERE realm = 'com.left'")
            .fetch_one(&srv.reg.db.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
    let archived: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit WHERE realm = 'com.left#0'")
        .fetch_one(&srv.reg.db.pool)
        .await
        .unwrap();
    assert_eq!(archived, 1);
}

/// Login lock-out (isolation finding 7, the rest): many sources guessing one account each get a
/// few tries, but past the account's hourly budget only sources that logged in to it before may
/// try — its owner keeps working, newcomers wait. Behind a trusted proxy, sources are the
/// forwarded client addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sources_cannot_guess_without_end_and_the_owner_keeps_access() {
    let tmp = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        max_failed_logins_per_hour: 6,
        ..Default::default()
    };
    let srv = serve(&sqlite_url(tmp.path()), tmp.path(), config).await;
    let b = srv.base.as_str();
    let login = |from: &'static str, password: &'static str| async move {
        let body = json!({"email": "target@example.com", "password": password}).to_string();
        req_raw(
            b,
            "POST",
            "/v1/sessions",
            None,
            Some(body),
            &[("X-Forwarded-For", from)],
        )
        .await
    };
    let (s, v) = req(
        b,
        "POST",
        "/v1/accounts",
        None,
        Some(json!({"email": "target@example.com", "password": "correct horse battery"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        login("203.0.113.5", "correct horse battery").await.0,
        201,
        "the owner's usual address"
    );
    for from in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        for _ in 0..2 {
            assert_eq!(login(from, "a wrong password").await.0, 401);
        }
    }
    let (s, v) = login("198.51.100.9", "correct horse battery").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("account_under_attack")),
        "{v}"
    );
    assert_eq!(
        login("203.0.113.5", "correct horse battery").await.0,
        201,
        "the owner still gets in"
    );
}

/// Dedicated Nodes through the registry: the list needs the add-on, takes peer ids only, and
/// reaches the node's copy of the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_nodes_need_the_addon_and_valid_peer_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = serve(
        &sqlite_url(tmp.path()),
        tmp.path(),
        RegistryConfig::default(),
    )
    .await;
    let b = srv.base.as_str();
    let me = account(b, "ded@example.com").await;
    common::register(b, &me, "com.ded").await;
    let peer = "12D3KooWGzCzcHjdCKC7fWG7c3NcDjBsSKyHz4BYqrKGxuY2qRBd";
    let roles = srv.dir.read_policy("com.ded").unwrap().roles;
    let me2 = me.clone();
    let set = move |nodes: Value| {
        let (roles, me) = (roles.clone(), me2.clone());
        async move {
            req(
                b,
                "PUT",
                "/v1/realms/com.ded/policy",
                Some(&me),
                Some(json!({"roles": roles, "nodes": nodes})),
            )
            .await
        }
    };
    let (s, v) = set(json!([peer])).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("addon_required")),
        "{v}"
    );
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms/com.ded/addons",
        Some(&me),
        Some(json!({"feature": "dedicated_nodes"})),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    let (s, v) = set(json!(["not-a-peer"])).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("invalid_node")),
        "{v}"
    );
    let (s, v) = set(json!([peer])).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        srv.dir.read_policy("com.ded").unwrap().nodes,
        vec![peer.to_owned()]
    );
    // Proven roles in forwarded traffic: the owner turns them on; the node list stays.
    let roles = srv.dir.read_policy("com.ded").unwrap().roles;
    let (s, v) = req(
        b,
        "PUT",
        "/v1/realms/com.ded/policy",
        Some(&me),
        Some(json!({"roles": roles, "verified_roles": true})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let doc = srv.dir.read_policy("com.ded").unwrap();
    assert!(doc.verified_roles);
    assert_eq!(doc.nodes, vec![peer.to_owned()]);
}

/// Tombstones (isolation finding 5): each deleted registration leaves one on every node, so one
/// account's register/delete loop is bounded per day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_delete_loop_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        max_registrations_per_day: 2,
        ..Default::default()
    };
    let srv = serve(&sqlite_url(tmp.path()), tmp.path(), config).await;
    let b = srv.base.as_str();
    let me = account(b, "loop@example.com").await;
    for name in ["com.loop1", "com.loop2"] {
        common::register(b, &me, name).await;
        let (s, v) = req(b, "DELETE", &format!("/v1/realms/{name}"), Some(&me), None).await;
        assert_eq!(s, 204, "{v}");
    }
    let (s, v) = req(
        b,
        "POST",
        "/v1/realms",
        Some(&me),
        Some(json!({"name": "com.loop3"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("too_many_registrations")),
        "{v}"
    );
}
