//! Billing: usage aggregation (exact, idempotent), invoices to the cent (tier boundaries,
//! overage, add-ons, fees, rounding), payments and the ledger, and the Hobby plan's hard quota.
//! Each suite runs on SQLite and on a throwaway PostgreSQL (skipped, with a message, where
//! PostgreSQL is not installed).

mod common;

use common::{account, req, serve, sqlite_url};
use macula_common::time::now_secs;
use macula_common::usage::{hour_of, UsageReport, UsageRow, UsageSink, BUCKETS};
use macula_registry::billing::{self, month_start, LocalSink};
use macula_registry::RegistryConfig;
use serde_json::{json, Value};

const GIB: u64 = 1 << 30;

fn row(
    realm: &str,
    key: &str,
    hour: u32,
    ops: [u64; 5],
    bytes_in: u64,
    bytes_out: u64,
) -> UsageRow {
    UsageRow {
        realm: realm.into(),
        key_id: key.into(),
        hour,
        ops,
        bytes_in,
        bytes_out,
        latency: vec![0; BUCKETS],
        instance_ms: 0,
        package_bytes: 0,
    }
}

fn report(node: &str, epoch: u64, rows: Vec<UsageRow>) -> UsageReport {
    UsageReport {
        node: node.into(),
        epoch,
        rows,
    }
}

fn config() -> RegistryConfig {
    RegistryConfig {
        operators: vec!["ops@example.com".into()],
        ..RegistryConfig::default()
    }
}

async fn create_realm(base: &str, token: &str, body: Value) {
    let (s, v) = req(base, "POST", "/v1/realms", Some(token), Some(body)).await;
    assert_eq!(s, 201, "{v}");
}

on_both_backends!(aggregation);

/// Reports from three nodes (one restarted with a new counters file), delivered twice, out of
/// order and stale, roll up to exactly the sum of what each node counted.
async fn aggregation(url: &str, dir: &std::path::Path) {
    let srv = serve(url, dir, config()).await;
    let base = &srv.base;
    let t = account(base, "owner@example.com").await;
    create_realm(base, &t, json!({"name": "com.bill"})).await;
    let h = hour_of(now_secs());
    let mut a1 = row("com.bill", "key_a", h, [10, 1, 5, 1, 2], 1000, 5000);
    a1.latency[macula_common::usage::bucket(std::time::Duration::from_micros(1500))] = 4;
    let a1 = report("node-a", 1, vec![a1]);
    assert_eq!(srv.reg.ingest(&a1).await.unwrap(), vec!["com.bill"]);
    assert!(
        srv.reg.ingest(&a1).await.unwrap().is_empty(),
        "a report delivered twice counts once"
    );
    // Node B: one row for the realm, one for an unregistered subrealm (billed to the parent).
    let b = report(
        "node-b",
        7,
        vec![
            row("com.bill", "key_b", h, [20, 0, 0, 0, 0], 2000, 100),
            row("com.bill.shop", "key_c", h, [3, 0, 0, 0, 0], 30, 300),
        ],
    );
    srv.reg.ingest(&b).await.unwrap();
    // Node A's counters grew; then its older report arrives late.
    let a2 = report(
        "node-a",
        1,
        vec![row("com.bill", "key_a", h, [15, 1, 5, 1, 2], 1500, 5000)],
    );
    srv.reg.ingest(&a2).await.unwrap();
    assert!(
        srv.reg.ingest(&a1).await.unwrap().is_empty(),
        "stale report"
    );
    // Node A lost its counters file: a new epoch counts from zero again.
    let a3 = report(
        "node-a",
        2,
        vec![row("com.bill", "key_a", h, [1, 0, 0, 0, 0], 10, 20)],
    );
    srv.reg.ingest(&a3).await.unwrap();

    let (s, v) = req(
        base,
        "GET",
        "/v1/realms/com.bill/usage/current",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let u = &v["usage"];
    assert_eq!(u["ops"]["publish"], 15 + 20 + 3 + 1);
    assert_eq!(u["ops"]["subscribe"], 1);
    assert_eq!(u["ops"]["call"], 5);
    assert_eq!(u["ops"]["register"], 1);
    assert_eq!(u["ops"]["dht"], 2);
    assert_eq!(u["ops_total"], 39 + 1 + 5 + 1 + 2);
    assert_eq!(u["bytes_in"], 1500 + 2000 + 30 + 10);
    assert_eq!(u["egress_bytes"], 5000 + 100 + 300 + 20);
    let p50 = u["latency_p50_ms"].as_f64().unwrap();
    assert!((1.0..2.0).contains(&p50), "p50 {p50}");
    assert_eq!(v["plan"]["name"], "hobby");
    // Hourly and daily rollups agree; CSV has the same numbers.
    for period in ["hour", "day"] {
        let (s, v) = req(
            base,
            "GET",
            &format!("/v1/realms/com.bill/usage?period={period}"),
            Some(&t),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["items"][0]["ops_total"], 48, "{period}: {v}");
    }
    let csv = common::req_text(base, "/v1/realms/com.bill/usage?period=hour&format=csv", &t).await;
    let mut lines = csv.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("realm,period,start,publish"));
    let data: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&data[..2], &["com.bill", "hour"]);
    assert_eq!(data[3..9], ["39", "1", "5", "1", "2", "48"]);
    assert_eq!(data[10], "5420");
    // Somebody else's realm: no.
    let other = account(base, "other@example.com").await;
    let (s, _) = req(
        base,
        "GET",
        "/v1/realms/com.bill/usage/current",
        Some(&other),
        None,
    )
    .await;
    assert_eq!(s, 403);
    let (s, v) = req(
        base,
        "GET",
        "/v1/realms/com.bill/usage?period=week",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("invalid_period"))
    );
}

on_both_backends!(invoices);

fn lines_of(inv: &Value) -> Vec<(String, String, i64)> {
    inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["realm"].as_str().unwrap_or("").to_owned(),
                l["kind"].as_str().unwrap().to_owned(),
                l["amount_cents"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn invoices(url: &str, dir: &std::path::Path) {
    let srv = serve(url, dir, config()).await;
    let base = &srv.base;
    let t = account(base, "owner@example.com").await;
    let ops = account(base, "ops@example.com").await;
    create_realm(base, &t, json!({"name": "com.free"})).await;
    create_realm(base, &t, json!({"name": "com.inv"})).await;
    create_realm(base, &t, json!({"name": "com.pro", "tier": "professional"})).await;
    let now = now_secs() as i64;
    let this_month = month_start(now);
    let last_month = month_start(this_month - 1);
    // The realms have existed since last month (the upgrade below records com.inv's plan so far).
    sqlx::query("UPDATE realms SET created_at = $1")
        .bind(last_month)
        .execute(&srv.reg.db.pool)
        .await
        .unwrap();
    let (s, v) = req(
        base,
        "POST",
        "/v1/realms/com.inv/plan",
        Some(&t),
        Some(json!({"tier": "starter"})),
    )
    .await;
    assert_eq!((s, v["tier"].as_str()), (200, Some("starter")), "{v}");
    let (s, v) = req(
        base,
        "POST",
        "/v1/realms/com.inv/addons",
        Some(&t),
        Some(json!({"feature": "analytics"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = req(
        base,
        "POST",
        "/v1/realms/com.inv/addons",
        Some(&t),
        Some(json!({"feature": "teleport"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("invalid_addon"))
    );

    // This month: com.inv is 1,250 operations and half a GiB over Starter's allowance; com.pro
    // is exactly at Professional's.
    let h = hour_of(now as u64);
    srv.reg
        .ingest(&report(
            "node-a",
            1,
            vec![
                row(
                    "com.inv",
                    "k1",
                    h,
                    [10_001_250, 0, 0, 0, 0],
                    0,
                    100 * GIB + GIB / 2,
                ),
                row(
                    "com.pro",
                    "k2",
                    h,
                    [60_000_000, 20_000_000, 10_000_000, 5_000_000, 5_000_000],
                    0,
                    1024 * GIB,
                ),
            ],
        ))
        .await
        .unwrap();
    let (s, inv) = req(base, "GET", "/v1/invoices/current", Some(&t), None).await;
    assert_eq!(s, 200, "{inv}");
    assert_eq!(inv["status"], "draft");
    assert_eq!(
        lines_of(&inv),
        vec![
            ("com.free".into(), "base".into(), 0),
            ("com.inv".into(), "base".into(), 2900),
            // 1,250 × $0.008/1K = 1.0 cent; half a GiB × $0.08 = 4 cents.
            ("com.inv".into(), "overage_ops".into(), 1),
            ("com.inv".into(), "overage_egress".into(), 4),
            ("com.inv".into(), "addon".into(), 1900),
            ("com.pro".into(), "base".into(), 9900),
        ]
    );
    assert_eq!(inv["total_cents"], 14_705);
    let html = billing::invoice_html(&serde_json::from_value(inv.clone()).unwrap());
    assert!(
        html.contains("$147.05") && html.contains("com.inv"),
        "{html}"
    );
    // The draft is brought up to date, not duplicated.
    srv.reg
        .ingest(&report(
            "node-a",
            1,
            vec![row(
                "com.inv",
                "k1",
                h,
                [10_001_875, 0, 0, 0, 0],
                0,
                100 * GIB + GIB / 2,
            )],
        ))
        .await
        .unwrap();
    let (_, inv2) = req(base, "GET", "/v1/invoices/current", Some(&t), None).await;
    assert_eq!(inv2["id"], inv["id"]);
    // 1,875 × 0.8 millicents = 1.5 cents, rounded half up to 2.
    assert_eq!(inv2["total_cents"], 14_706);

    // Compute: com.pro's replicas ran an hour and a half on node a and half an hour on node b
    // (each node's row cumulative: re-sent, it counts once): 2 instance-hours × $0.05.
    let compute = |node: &str, ms: u64| {
        let mut r = row("com.pro", "k2", h, [0; 5], 0, 0);
        r.instance_ms = ms;
        report(node, 1, vec![r])
    };
    for _ in 0..2 {
        srv.reg.ingest(&compute("node-c", 5_400_000)).await.unwrap();
        srv.reg.ingest(&compute("node-d", 1_800_000)).await.unwrap();
    }
    let (_, inv3) = req(base, "GET", "/v1/invoices/current", Some(&t), None).await;
    assert!(
        lines_of(&inv3).contains(&("com.pro".into(), "compute".into(), 10)),
        "{inv3}"
    );
    assert_eq!(inv3["total_cents"], 14_716);

    // Hub package delivery: 1.5 GiB of packages delivered to node c for com.pro's replicas,
    // 0.5 GiB to node d (cumulative rows, re-sent: counted once): 2 GiB × $0.10.
    let delivered = |node: &str, bytes: u64| {
        let mut r = row("com.pro", "k2", h, [0; 5], 0, 0);
        r.package_bytes = bytes;
        report(node, 1, vec![r])
    };
    for _ in 0..2 {
        srv.reg
            .ingest(&delivered("node-c", GIB + GIB / 2))
            .await
            .unwrap();
        srv.reg.ingest(&delivered("node-d", GIB / 2)).await.unwrap();
    }
    let (_, inv4) = req(base, "GET", "/v1/invoices/current", Some(&t), None).await;
    assert!(
        lines_of(&inv4).contains(&("com.pro".into(), "package_delivery".into(), 20)),
        "{inv4}"
    );
    assert_eq!(inv4["total_cents"], 14_736);
    let month = macula_common::time::month_name(this_month);
    let (s, u) = req(
        base,
        "GET",
        &format!("/v1/realms/com.pro/usage/{month}"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, 200, "{u}");
    assert_eq!(u["usage"]["instance_hours"], 2.0, "{u}");
    assert_eq!(u["plan"]["instance_millicents_per_hour"], 5_000, "{u}");
    assert_eq!(u["usage"]["package_bytes"], 2 * GIB, "{u}");
    assert_eq!(u["plan"]["package_cents_per_gib"], 10, "{u}");

    // Last month: com.inv was still on Hobby (the upgrade applies from now); a transfer fee.
    let lh = hour_of(last_month as u64 + 3600);
    srv.reg
        .ingest(&report(
            "node-a",
            1,
            vec![row("com.inv", "k1", lh, [500, 0, 0, 0, 0], 0, 0)],
        ))
        .await
        .unwrap();
    let owner_id: String =
        sqlx::query_scalar("SELECT id FROM accounts WHERE email = 'owner@example.com'")
            .fetch_one(&srv.reg.db.pool)
            .await
            .unwrap();
    sqlx::query("INSERT INTO fees (account_id, realm, kind, amount_cents, created_at) VALUES ($1, 'com.free', 'transfer', 2000, $2)")
        .bind(&owner_id)
        .bind(last_month + 10)
        .execute(&srv.reg.db.pool)
        .await
        .unwrap();
    let (s, _) = req(
        base,
        "POST",
        "/v1/admin/invoices/run",
        Some(&t),
        Some(json!({"month": "previous"})),
    )
    .await;
    assert_eq!(s, 403, "only operators run invoices");
    let (s, run) = req(
        base,
        "POST",
        "/v1/admin/invoices/run",
        Some(&ops),
        Some(json!({"month": "previous"})),
    )
    .await;
    assert_eq!(s, 200, "{run}");
    assert_eq!(
        (run["final"].as_bool(), run["invoices"].as_u64()),
        (Some(true), Some(1))
    );
    let (_, again) = req(
        base,
        "POST",
        "/v1/admin/invoices/run",
        Some(&ops),
        Some(json!({"month": "previous"})),
    )
    .await;
    assert_eq!(
        again["invoices"], 0,
        "a finalized month is not billed twice"
    );
    let (s, prev) = req(base, "GET", "/v1/invoices/previous", Some(&t), None).await;
    assert_eq!(s, 200, "{prev}");
    assert_eq!(prev["status"], "open");
    assert_eq!(
        lines_of(&prev),
        vec![
            ("com.free".into(), "base".into(), 0),
            ("com.inv".into(), "base".into(), 0),
            ("com.pro".into(), "base".into(), 9900),
            ("com.free".into(), "transfer_fee".into(), 2000),
        ]
    );
    assert_eq!(prev["total_cents"], 11_900);
    let id = prev["id"].as_str().unwrap().to_owned();
    let (s, _) = req(
        base,
        "GET",
        &format!("/v1/invoices/{id}"),
        Some(&other(base).await),
        None,
    )
    .await;
    assert_eq!(s, 404, "another account's invoice is not shown");
    assert_eq!(
        srv.reg
            .ledger_balance(&format!("receivable:{owner_id}"))
            .await
            .unwrap(),
        11_900
    );
    let (s, paid) = req(
        base,
        "POST",
        &format!("/v1/invoices/{id}/pay"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!((s, paid["status"].as_str()), (200, Some("paid")), "{paid}");
    let (s, v) = req(
        base,
        "POST",
        &format!("/v1/invoices/{id}/pay"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("invoice_not_open"))
    );
    let (s, _) = req(
        base,
        "POST",
        &format!("/v1/admin/invoices/{id}/void"),
        Some(&ops),
        None,
    )
    .await;
    assert_eq!(s, 409, "a paid invoice is not voided");
    assert_eq!(
        srv.reg
            .ledger_balance(&format!("receivable:{owner_id}"))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        srv.reg.ledger_balance("cash:recorded").await.unwrap(),
        11_900
    );
    assert_eq!(
        srv.reg.ledger_balance("revenue:platform").await.unwrap(),
        -11_900
    );
    // The whole ledger balances.
    let sum: i64 =
        sqlx::query_scalar("SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger")
            .fetch_one(&srv.reg.db.pool)
            .await
            .unwrap();
    assert_eq!(sum, 0);
    // A marketplace sale splits 70/30 to the cent.
    assert_eq!(
        srv.reg
            .post_sale(&owner_id, "author-1", 999, "sale-1")
            .await
            .unwrap(),
        (699, 300)
    );
    assert_eq!(
        srv.reg
            .ledger_balance("payable:author:author-1")
            .await
            .unwrap(),
        -699
    );
    let (s, list) = req(base, "GET", "/v1/invoices", Some(&t), None).await;
    assert_eq!(s, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
}

async fn other(base: &str) -> String {
    account(base, "stranger@example.com").await
}

on_both_backends!(hobby_quota);

/// The owner is told at 80 % and 100 %; at 100 % the realm's policy (which every node
/// enforces) refuses operations; an upgrade lifts it; a downgrade waits for next month.
async fn hobby_quota(url: &str, dir: &std::path::Path) {
    let srv = serve(url, dir, config()).await;
    let base = &srv.base;
    let t = account(base, "owner@example.com").await;
    create_realm(base, &t, json!({"name": "com.q"})).await;
    let sink = LocalSink(std::sync::Arc::downgrade(&srv.reg));
    let h = hour_of(now_secs());
    let deliver = |ops: u64| {
        sink.deliver(report(
            "n",
            1,
            vec![row("com.q", "k", h, [ops, 0, 0, 0, 0], 0, 0)],
        ))
    };
    deliver(79_999).await.unwrap();
    let month = |v: &Value| {
        v["notices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["kind"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let (_, v) = req(
        base,
        "GET",
        "/v1/realms/com.q/usage/current",
        Some(&t),
        None,
    )
    .await;
    assert!(month(&v).is_empty(), "{v}");
    deliver(80_000).await.unwrap();
    let (_, v) = req(
        base,
        "GET",
        "/v1/realms/com.q/usage/current",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(month(&v), ["quota_80"]);
    assert!(v["quota_exceeded"].is_null());
    assert!(srv
        .dir
        .read_policy("com.q")
        .unwrap()
        .quota_exceeded
        .is_none());
    deliver(100_000).await.unwrap();
    let (_, v) = req(
        base,
        "GET",
        "/v1/realms/com.q/usage/current",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(month(&v), ["quota_80", "quota_100"]);
    let why = v["quota_exceeded"].as_str().unwrap_or_default().to_owned();
    assert!(
        why.contains("Hobby") && why.contains("macula realms plan com.q starter"),
        "{why}"
    );
    // The node-facing policy carries it (nodes refuse with macula.error.quota_exceeded).
    assert_eq!(
        srv.dir
            .read_policy("com.q")
            .unwrap()
            .quota_exceeded
            .as_deref(),
        Some(why.as_str())
    );
    // No overage on Hobby: the invoice shows the $0 base only.
    let (_, inv) = req(base, "GET", "/v1/invoices/current", Some(&t), None).await;
    assert_eq!(inv["total_cents"], 0);
    // The plan's instance limit travels with the policy too (nodes refuse deploys past it).
    let max_instances = || srv.dir.read_policy("com.q").unwrap().max_instances;
    assert_eq!(max_instances(), Some(3), "Hobby runs a few instances");
    // Upgrading lifts the block at once.
    let (s, _) = req(
        base,
        "POST",
        "/v1/realms/com.q/plan",
        Some(&t),
        Some(json!({"tier": "starter"})),
    )
    .await;
    assert_eq!(s, 200);
    assert!(srv
        .dir
        .read_policy("com.q")
        .unwrap()
        .quota_exceeded
        .is_none());
    assert_eq!(max_instances(), Some(20), "Starter's limit at once");
    deliver(150_000).await.unwrap();
    assert!(
        srv.dir
            .read_policy("com.q")
            .unwrap()
            .quota_exceeded
            .is_none(),
        "paid plans are not blocked"
    );
    // A downgrade is scheduled for the first of next month.
    let (s, v) = req(
        base,
        "POST",
        "/v1/realms/com.q/plan",
        Some(&t),
        Some(json!({"tier": "hobby"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["tier"], "starter");
    assert_eq!(v["scheduled"]["tier"], "hobby");
    assert!(v["scheduled"]["effective_at"]
        .as_str()
        .unwrap()
        .ends_with("-01T00:00:00Z"));
    let (s, v) = req(
        base,
        "POST",
        "/v1/realms/com.q/plan",
        Some(&other(base).await),
        Some(json!({"tier": "starter"})),
    )
    .await;
    assert!(s == 403 || s == 404, "{s} {v}");

    // The downgrade comes due (moved into the past here): the periodic tick applies it, and
    // with 150,000 operations this month the realm is over Hobby's quota at once.
    let n = now_secs() as i64;
    sqlx::query("DELETE FROM plan_history WHERE realm = 'com.q'")
        .execute(&srv.reg.db.pool)
        .await
        .unwrap();
    for (tier, at) in [("hobby", n - 300), ("starter", n - 200), ("hobby", n - 10)] {
        sqlx::query("INSERT INTO plan_history (realm, tier, effective_at, created_by, created_at) VALUES ('com.q', $1, $2, 'test', $2)")
            .bind(tier)
            .bind(at)
            .execute(&srv.reg.db.pool)
            .await
            .unwrap();
    }
    srv.reg.billing_tick().await.unwrap();
    let tier: String = sqlx::query_scalar("SELECT tier FROM realms WHERE name = 'com.q'")
        .fetch_one(&srv.reg.db.pool)
        .await
        .unwrap();
    assert_eq!(tier, "hobby");
    assert_eq!(
        max_instances(),
        Some(3),
        "the downgrade brings Hobby's limit"
    );
    assert!(srv
        .dir
        .read_policy("com.q")
        .unwrap()
        .quota_exceeded
        .is_some());
    // A new month lifts the block (the block is moved into last month here).
    sqlx::query("UPDATE realms SET quota_blocked = $1 WHERE name = 'com.q'")
        .bind(month_start(month_start(now_secs() as i64) - 1))
        .execute(&srv.reg.db.pool)
        .await
        .unwrap();
    srv.reg.billing_tick().await.unwrap();
    assert!(
        srv.dir
            .read_policy("com.q")
            .unwrap()
            .quota_exceeded
            .is_none(),
        "a new month starts unblocked"
    );
}

/// An operator's own price list (`registry.prices`) drives plans, upgrades and invoices; one
/// that cannot bill is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_price_list_is_used() {
    use macula_common::prices::{Prices, TierPrice};
    let tmp = tempfile::tempdir().unwrap();
    let tier = |name: &str, base, ops, mc, hard| TierPrice {
        name: name.into(),
        title: name.to_uppercase(),
        base_cents: base,
        included_ops: ops,
        included_bytes: GIB,
        ops_millicents_per_1k: mc,
        egress_cents_per_gib: 20,
        hard_quota: hard,
        instance_millicents_per_hour: 5_000,
        max_instances: 10,
        package_cents_per_gib: 10,
    };
    let prices = Prices {
        tiers: vec![
            tier("free", 0, 1000, 0, true),
            tier("team", 1000, 1000, 2000, false),
        ],
        addons: vec![],
    };
    let bad = RegistryConfig {
        prices: Prices {
            tiers: vec![],
            addons: vec![],
        },
        ..config()
    };
    let db = macula_registry::db::open(&sqlite_url(tmp.path()))
        .await
        .unwrap();
    let dir = macula_node::ConfDir::new(tmp.path());
    dir.init().unwrap();
    let refused = macula_registry::Registry::new(db, bad, dir, None).await;
    assert!(refused
        .err()
        .unwrap()
        .to_string()
        .contains("registry.prices.tiers is empty"));
    let srv = serve(
        &sqlite_url(tmp.path()),
        tmp.path(),
        RegistryConfig { prices, ..config() },
    )
    .await;
    let base = &srv.base;
    let t = account(base, "owner@example.com").await;
    create_realm(base, &t, json!({"name": "com.custom"})).await;
    let (_, plans) = req(base, "GET", "/v1/plans", None, None).await;
    assert_eq!(plans["tiers"].as_array().unwrap().len(), 2);
    let (s, v) = req(
        base,
        "POST",
        "/v1/realms/com.custom/plan",
        Some(&t),
        Some(json!({"tier": "starter"})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (422, Some("invalid_tier")),
        "{v}"
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("free, team"));
    let (s, v) = req(
        base,
        "POST",
        "/v1/realms/com.custom/plan",
        Some(&t),
        Some(json!({"tier": "team"})),
    )
    .await;
    assert_eq!((s, v["tier"].as_str()), (200, Some("team")), "{v}");
    srv.reg
        .ingest(&report(
            "n",
            1,
            vec![row(
                "com.custom",
                "k",
                hour_of(now_secs()),
                [1500, 0, 0, 0, 0],
                0,
                0,
            )],
        ))
        .await
        .unwrap();
    let (_, inv) = req(base, "GET", "/v1/invoices/current", Some(&t), None).await;
    // $10 base; 500 operations over at 2 millicents each = 1 cent.
    assert_eq!(
        lines_of(&inv),
        vec![
            ("com.custom".into(), "base".into(), 1000),
            ("com.custom".into(), "overage_ops".into(), 1),
        ]
    );
}

/// Bounded cost (isolation finding 14): a node re-sending a large backlog of usage does not
/// hold the embedded database's writer for the whole of it. A signup and a login made while the
/// backlog is being taken complete before it is done, and every row of it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_backlog_does_not_starve_control_plane_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = serve(&common::sqlite_url(tmp.path()), tmp.path(), config()).await;
    let token = account(&srv.base, "own@example.com").await;
    create_realm(&srv.base, &token, json!({"name": "com.backlog"})).await;
    let hour = hour_of(now_secs());
    const ROWS: usize = 20_000;
    let rows: Vec<UsageRow> = (0..ROWS)
        .map(|i| {
            row(
                &format!("com.backlog.s{i}"),
                "key_1",
                hour,
                [1, 0, 0, 0, 0],
                10,
                0,
            )
        })
        .collect();
    let backlog = report("n1", 7, rows);
    let reg = srv.reg.clone();
    let ingest = tokio::spawn(async move { reg.ingest(&backlog).await });
    let stored = |reg: std::sync::Arc<macula_registry::Registry>| async move {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM usage_reports")
            .fetch_one(&reg.db.pool)
            .await
            .unwrap() as usize
    };
    // Once the backlog is being taken...
    while stored(srv.reg.clone()).await == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // ...control-plane writes go through between its chunks.
    account(&srv.base, "newcomer@example.com").await;
    let taken = stored(srv.reg.clone()).await;
    assert!(
        taken < ROWS && !ingest.is_finished(),
        "the signup waited for the whole backlog ({taken} of {ROWS} rows were in)"
    );
    assert_eq!(ingest.await.unwrap().unwrap(), vec!["com.backlog"]);
    assert_eq!(stored(srv.reg.clone()).await, ROWS);
    let (s, v) = req(
        &srv.base,
        "GET",
        "/v1/realms/com.backlog/usage",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["items"][0]["ops_total"].as_u64(),
        Some(ROWS as u64),
        "{v}"
    );
}

/// Data of a registration stays with it (isolation finding 4, late usage): usage a node reports
/// for a key of a realm's previous registration — before or after someone registers the name
/// again — is kept under that registration's archive, never counted against the new registrant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_of_a_released_registration_is_not_the_next_registrants() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = serve(&sqlite_url(tmp.path()), tmp.path(), config()).await;
    let b = srv.base.as_str();
    let first = account(b, "first@example.com").await;
    create_realm(b, &first, json!({"name": "com.late"})).await;
    let (s, k) = req(
        b,
        "POST",
        "/v1/realms/com.late/keys",
        Some(&first),
        Some(json!({"name": "k", "role": "admin"})),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let old_key = k["id"].as_str().unwrap().to_owned();
    let hour = hour_of(now_secs());
    let usage = |n: u64| {
        report(
            "n1",
            9,
            vec![row("com.late", &old_key, hour, [n, 0, 0, 0, 0], 1, 0)],
        )
    };
    srv.reg.ingest(&usage(5)).await.unwrap();
    let (s, _) = req(b, "DELETE", "/v1/realms/com.late", Some(&first), None).await;
    assert_eq!(s, 204);
    // Late, before anyone registers the name again...
    srv.reg.ingest(&usage(7)).await.unwrap();
    let second = account(b, "second@example.com").await;
    create_realm(b, &second, json!({"name": "com.late"})).await;
    // ...and after.
    srv.reg.ingest(&usage(9)).await.unwrap();
    let (s, v) = req(b, "GET", "/v1/realms/com.late/usage", Some(&second), None).await;
    assert_eq!(s, 200, "{v}");
    let total = v["items"].as_array().map_or(0, |items| {
        items
            .iter()
            .map(|i| i["ops_total"].as_u64().unwrap_or(0))
            .sum()
    });
    assert_eq!(total, 0, "the new registrant inherited usage: {v}");
    let archived: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(ops_publish), 0) FROM usage_rollups WHERE realm = 'com.late#1' AND period = 'month'",
    )
    .fetch_one(&srv.reg.db.pool)
    .await
    .unwrap();
    assert_eq!(
        archived, 9,
        "all of the first registration's usage is in its archive"
    );
}
