//! Metering with real processes: exact counts on `macula up` read back with `macula usage`;
//! the Hobby plan's quota enforced at the edge; `kill -9` mid-traffic loses no acknowledged
//! operation and counts none twice; three nodes roll up to one realm total.

mod macula_up;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use macula_up::{cli_as as cli, up};

use macula_client::{Client, ConnectOptions, Error};
use macula_wamp::{dict, Payload, Value};

/// `macula --json usage` (with `macula up`'s key unless logged in) until `done` holds (60 s).
fn usage_until(
    cfg: &Path,
    home: &Path,
    server: &str,
    realm: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: serde_json::Value = serde_json::from_str(&cli(
            cfg,
            server,
            &[
                "--json",
                "usage",
                "--realm",
                realm,
                "--home",
                &home.to_string_lossy(),
            ],
            None,
        ))
        .unwrap();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "usage never got there: {v}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The node's Prometheus text.
fn metrics_text(http: &str) -> String {
    ureq::get(&format!("{http}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn opts(ws: &str, realm: &str, key: &str) -> ConnectOptions {
    let mut o = ConnectOptions::new(ws, realm, key);
    o.reconnect = false;
    o
}

fn ack() -> macula_wamp::Dict {
    dict! {"acknowledge" => true}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_exact_and_the_hobby_quota_is_enforced_at_the_edge_on_sqlite() {
    exact_usage_and_quota(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_exact_and_the_hobby_quota_is_enforced_at_the_edge_on_postgres() {
    let Some(pg) = macula_registry::testpg::Postgres::start() else {
        return;
    };
    exact_usage_and_quota(Some(&pg.url)).await;
}

async fn exact_usage_and_quota(database: Option<&str>) {
    let home = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let db_args: Vec<&str> = database.map(|d| vec!["--database", d]).unwrap_or_default();
    let (_up, banner) = up(home.path(), &db_args);
    let (http, ws) = (
        banner["http"].as_str().unwrap(),
        banner["ws"].as_str().unwrap(),
    );
    let (realm, key) = (
        banner["realm"].as_str().unwrap(),
        banner["key"].as_str().unwrap(),
    );

    // A known workload on the demo realm: 37 publications, 2 subscriptions, 1 registration,
    // 11 calls.
    let c = Client::connect_with(opts(ws, realm, key)).await.unwrap();
    let _s1 = c.subscribe(&format!("{realm}.a")).await.unwrap();
    let _s2 = c.subscribe(&format!("{realm}.b")).await.unwrap();
    let _r = c
        .register(
            &format!("{realm}.echo"),
            |inv| async move { Ok(inv.payload) },
        )
        .await
        .unwrap();
    for i in 0..37 {
        c.publish_with(
            &format!("{realm}.a"),
            Payload::args(vec![Value::Int(i)]),
            ack(),
        )
        .await
        .unwrap();
    }
    for i in 0..11 {
        c.call(&format!("{realm}.echo"), Payload::args(vec![Value::Int(i)]))
            .await
            .unwrap();
    }
    // And one publication through the HTTP bridge (billed like any other).
    let res = ureq::post(&format!("{http}/v1/realms/{realm}/publish"))
        .header("Authorization", &format!("Bearer {key}"))
        .send_json(serde_json::json!({"topic": format!("{realm}.a"), "args": [1]}))
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let v = usage_until(cfg.path(), home.path(), http, realm, |v| {
        v["usage"]["ops_total"] == 52
    });
    let u = &v["usage"];
    assert_eq!(
        (
            &u["ops"]["publish"],
            &u["ops"]["subscribe"],
            &u["ops"]["register"],
            &u["ops"]["call"],
            &u["ops"]["dht"]
        ),
        (&38.into(), &2.into(), &1.into(), &11.into(), &0.into()),
        "{v}"
    );
    assert!(u["egress_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(u["latency_p50_ms"].as_f64().is_some(), "{v}");
    // The node's Prometheus series per realm.
    let metrics = metrics_text(http);
    assert!(
        metrics.contains(&format!(
            "macula_realm_ops_total{{realm=\"{realm}\",kind=\"publish\"}} 38"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "macula_realm_egress_bytes_total{{realm=\"{realm}\"}}"
    )));
    // Nothing more is counted while idle.
    std::thread::sleep(Duration::from_millis(2500));
    let again = usage_until(cfg.path(), home.path(), http, realm, |_| true);
    assert_eq!(again["usage"]["ops_total"], 52);
    let h = home.path().to_string_lossy().to_string();
    let human = cli(
        cfg.path(),
        http,
        &["usage", "--realm", realm, "--home", &h],
        None,
    );
    assert!(
        human.contains("Hobby plan") && human.contains("publish"),
        "{human}"
    );
    let csv = cli(
        cfg.path(),
        http,
        &[
            "usage", "--realm", realm, "--home", &h, "--csv", "--period", "hour",
        ],
        None,
    );
    assert!(
        csv.lines()
            .nth(1)
            .is_some_and(|l| l.contains(",38,2,11,1,0,52,")),
        "{csv}"
    );

    // A registered Hobby realm: its 100,000 operations a month, then refusal.
    let pw = "correct horse battery\n";
    let c_ = cfg.path();
    cli(
        c_,
        http,
        &["signup", "--email", "q@example.com", "--password-stdin"],
        Some(pw),
    );
    cli(
        c_,
        http,
        &["login", "--email", "q@example.com", "--password-stdin"],
        Some(pw),
    );
    cli(c_, http, &["realms", "create", "com.quota.app"], None);
    let k: serde_json::Value = serde_json::from_str(&cli(
        c_,
        http,
        &[
            "--json",
            "keys",
            "create",
            "--realm",
            "com.quota.app",
            "--role",
            "admin",
            "--name",
            "load",
        ],
        None,
    ))
    .unwrap();
    let qkey = k["key"].as_str().unwrap().to_owned();
    let q = Client::connect_with(opts(ws, "com.quota.app", &qkey))
        .await
        .unwrap();
    for i in 0..100_000i64 {
        q.publish("com.quota.app.load", Payload::args(vec![Value::Int(i)]))
            .await
            .unwrap();
    }
    // The aggregator sees the 100,000th operation and every node refuses the realm: an
    // acknowledged publication gets macula.error.quota_exceeded.
    let deadline = Instant::now() + Duration::from_secs(60);
    let refusal = loop {
        match q
            .publish_with("com.quota.app.load", Payload::default(), ack())
            .await
        {
            Err(Error::Wamp { uri, message, .. }) => break (uri, message),
            Ok(_) => {}
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(Instant::now() < deadline, "the quota was never enforced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refusal.0, "macula.error.quota_exceeded");
    assert!(refusal.1.contains("Hobby"), "{}", refusal.1);
    // A new session is refused with the same reason.
    match Client::connect_with(opts(ws, "com.quota.app", &qkey)).await {
        Err(e) => assert!(
            e.to_string().contains("quota_exceeded") || e.to_string().contains("quota"),
            "{e}"
        ),
        Ok(_) => panic!("a session of a realm over its quota was admitted"),
    }
    // The owner was told at 80 % and 100 %.
    let v = usage_until(c_, home.path(), http, "com.quota.app", |v| {
        v["notices"].as_array().is_some_and(|n| n.len() == 2)
    });
    assert!(v["quota_exceeded"].as_str().is_some(), "{v}");
    let metrics = metrics_text(http);
    assert!(
        metrics.contains("macula_realm_quota_used_ratio{realm=\"com.quota.app\"} 1."),
        "{metrics}"
    );
    // An upgrade lifts it for the live session within seconds.
    cli(
        c_,
        http,
        &["realms", "plan", "com.quota.app", "starter"],
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while q
        .publish_with("com.quota.app.load", Payload::default(), ack())
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the upgrade did not lift the quota"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the invoice shows the plan.
    let inv = cli(c_, http, &["invoices", "show", "current"], None);
    assert!(
        inv.contains("Starter plan") && inv.contains("$29.00"),
        "{inv}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_operation_and_counts_none_twice() {
    let home = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let (mut first, banner) = up(home.path(), &[]);
    let (ws, realm, key) = (
        banner["ws"].as_str().unwrap().to_owned(),
        banner["realm"].as_str().unwrap().to_owned(),
        banner["key"].as_str().unwrap().to_owned(),
    );
    let c = Client::connect_with(opts(&ws, &realm, &key)).await.unwrap();
    // Acknowledged publications, one at a time, until the node dies under them.
    let (acked_tx, acked_rx) = tokio::sync::watch::channel(0u64);
    let topic = format!("{realm}.crash");
    let traffic = tokio::spawn(async move {
        let mut sent = 0u64;
        loop {
            sent += 1;
            match c.publish_with(&topic, Payload::default(), ack()).await {
                Ok(_) => {
                    acked_tx.send_replace(sent);
                }
                Err(_) => return sent,
            }
        }
    });
    // Mid-traffic (well past a flush interval, so some usage was delivered and some not).
    let mut rx = acked_rx.clone();
    rx.wait_for(|n| *n >= 3000).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let _ = Command::new("kill")
        .args(["-9", &first.0.id().to_string()])
        .status();
    let _ = first.0.wait();
    let sent = traffic.await.unwrap();
    let acked = *acked_rx.borrow();
    assert!(acked >= 3000 && sent >= acked);
    // Same home, new process: the counters file is reopened and delivered.
    let (_second, banner) = up(home.path(), &[]);
    let http = banner["http"].as_str().unwrap().to_owned();
    let v = usage_until(cfg.path(), home.path(), &http, &realm, |v| {
        v["usage"]["ops"]["publish"].as_u64().unwrap_or(0) >= acked
    });
    let counted = v["usage"]["ops"]["publish"].as_u64().unwrap();
    assert!(
        counted <= sent,
        "counted {counted} of {sent} sent ({acked} acknowledged)"
    );
    // A few more deliveries: still not counted twice.
    std::thread::sleep(Duration::from_millis(3000));
    let v = usage_until(cfg.path(), home.path(), &http, &realm, |_| true);
    let later = v["usage"]["ops"]["publish"].as_u64().unwrap();
    assert!(
        (acked..=sent).contains(&later),
        "after restart: {later} counted; {acked} acknowledged, {sent} sent"
    );
    eprintln!("kill -9: {acked} acknowledged, {sent} sent, {later} counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_roll_up_to_one_realm_total() {
    let home = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let (_up, banner) = up(home.path(), &["--nodes", "3"]);
    let http = banner["http"].as_str().unwrap();
    let (realm, key) = (
        banner["realm"].as_str().unwrap(),
        banner["key"].as_str().unwrap(),
    );
    let nodes = banner["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let counts = [5u64, 7, 9];
    for (n, count) in nodes.iter().zip(counts) {
        let c = Client::connect_with(opts(n["ws"].as_str().unwrap(), realm, key))
            .await
            .unwrap();
        for _ in 0..count {
            c.publish_with(&format!("{realm}.multi"), Payload::default(), ack())
                .await
                .unwrap();
        }
        c.close().await;
    }
    let v = usage_until(cfg.path(), home.path(), http, realm, |v| {
        v["usage"]["ops"]["publish"].as_u64() >= Some(21)
    });
    std::thread::sleep(Duration::from_millis(2500));
    let v2 = usage_until(cfg.path(), home.path(), http, realm, |_| true);
    assert_eq!(v2["usage"]["ops"]["publish"], 21, "{v} {v2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_events_are_an_opt_in_sample_in_the_seeds_shape() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("node.yaml"),
        "metering:\n  events_sample: 2\n",
    )
    .unwrap();
    let (_up, banner) = up(home.path(), &[]);
    let (ws, realm, key) = (
        banner["ws"].as_str().unwrap(),
        banner["realm"].as_str().unwrap(),
        banner["key"].as_str().unwrap(),
    );
    let c = Client::connect_with(opts(ws, realm, key)).await.unwrap();
    for _ in 0..10 {
        c.publish_with(&format!("{realm}.raw"), Payload::default(), ack())
            .await
            .unwrap();
    }
    let path = home.path().join("meter/events.jsonl");
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 5 {
            break lines;
        }
        assert!(Instant::now() < deadline, "{} events written", lines.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(lines.len(), 5, "one publication in two");
    let e = &lines[0];
    assert_eq!(e["realm"], realm);
    assert_eq!(e["operation"], "publish");
    assert_eq!(e["topic"], format!("{realm}.raw"));
    assert!(e["bytes_in"].as_u64().unwrap() > 0);
    assert!(e["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(e["node_id"].as_str().unwrap().starts_with("12D3"));
    // The key's id, never the key.
    let kid = e["api_key"].as_str().unwrap();
    assert!(kid.starts_with("key_") && !key.is_empty() && !kid.contains(key));
}

/// Two nodes on one config directory (the README's "by hand" set-up): without their own
/// `--data-dir` the second would share the first's counters file, so it refuses to start and
/// says what to do; with one each, both start and each counts in its own file.
#[test]
fn nodes_sharing_a_config_directory_count_in_their_own_data_dir() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let run = |extra: &[&str]| {
        let mut c = Command::new(macula_up::BIN);
        c.args(["node", "--config"])
            .arg(h)
            .args([
                "--http",
                "127.0.0.1:0",
                "--rawsocket",
                "127.0.0.1:0",
                "--no-mesh",
            ])
            .args(extra)
            .env("MACULA_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let out = Command::new(macula_up::BIN)
        .args(["realms", "create", "com.shared.dir", "--config"])
        .arg(h)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut first = run(&[]).spawn().unwrap();
    // The first node holds <config>/meter/counters.bin once it has started.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !h.join("meter/counters.bin").exists() {
        assert!(
            Instant::now() < deadline,
            "the first node never opened its counters"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = run(&[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second node must not start: {stderr}"
    );
    assert!(
        stderr.contains("in use by another node") && stderr.contains("--data-dir"),
        "{stderr}"
    );
    let d2 = h.join("n2");
    let mut second = run(&["--data-dir", &d2.to_string_lossy()]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d2.join("meter/counters.bin").exists() {
        assert!(
            second.try_wait().unwrap().is_none(),
            "the node with its own --data-dir exited"
        );
        assert!(
            Instant::now() < deadline,
            "the second node never opened its counters"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(second.try_wait().unwrap().is_none());
    for c in [&mut first, &mut second] {
        let _ = c.kill();
        let _ = c.wait();
    }
}
