//! Workloads on five real `macula node` processes: a payload of 3 replicas deployed with
//! `macula deploy` runs on 3 distinct nodes; `kill -9` of a node that runs one re-places it on
//! another (a higher fencing token) and never more than 3 run; logs come from every node that
//! runs one; scale up and down; delete stops them all. A job of 10 completions completes
//! exactly 10 though a node running one of its runs is killed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;

const REALM: &str = "com.example.work";

fn homes(n: usize) -> (tempfile::TempDir, Vec<std::path::PathBuf>, String) {
    let tmp = tempfile::tempdir().unwrap();
    // Limits and sandbox are the runtime tests' business; these run wherever the test does.
    let (homes, admin) = node_homes(
        tmp.path(),
        n,
        REALM,
        "workloads:\n  require_limits: false\n  require_sandbox: false\n  lease_term_ms: 2000\n",
    );
    (tmp, homes, admin)
}

/// `macula --json ARGS` against `node` with the admin key; the parsed answer.
async fn macula(node: &NodeProc, admin: &str, args: &[&str]) -> Result<Value, String> {
    work::macula(node, REALM, admin, args).await
}

/// The running replicas of `name` by index: (index, node, token).
async fn running(node: &NodeProc, admin: &str, name: &str) -> Vec<(u64, String, u64)> {
    work::running(node, REALM, admin, name).await
}

/// `GET path` on `addr`; the body.
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The value of the series `name` (with its labels as written) in an OpenMetrics text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_place_heal_scale_and_delete_a_payload() {
    let (_tmp, homes, admin) = homes(5);
    let (first, mut nodes, ids) = work::nodes(&homes).await;
    let api = || &first;

    // Deploy: 3 replicas on 3 distinct nodes, each with its fencing token.
    let script = "while true; do echo \"hello from $MACULA_REPLICA token $MACULA_FENCING_TOKEN\"; sleep 0.3; done";
    let payload = format!("sh -c '{script}'");
    let v = macula(
        api(),
        &admin,
        &[
            "deploy",
            "--payload",
            &payload,
            "--name",
            "hello",
            "--replicas",
            "3",
            "--timeout",
            "30s",
        ],
    )
    .await
    .unwrap();
    assert_eq!(v["seq"], 1, "{v}");
    let placed = running(api(), &admin, "hello").await;
    let where_: BTreeSet<&String> = placed.iter().map(|r| &r.1).collect();
    assert_eq!(placed.len(), 3, "{placed:?}");
    assert_eq!(where_.len(), 3, "spread over 3 nodes: {placed:?}");
    assert!(placed.iter().all(|r| r.2 >= 1));

    // /metrics on each node: its replicas by state, placements, the schedule latency, and the
    // replicas' own series.
    let scrape = || async {
        let (mut running, mut placements, mut scheduled, mut series) = (0.0, 0.0, 0.0, true);
        for n in std::iter::once(&first).chain(nodes.iter().flatten()) {
            let text = http_get(&n.http, "/metrics").await;
            let here = metric(&text, "macula_workload_replicas{state=\"running\"}");
            running += here;
            placements += metric(&text, "macula_workload_placements_total");
            scheduled += metric(&text, "macula_workload_schedule_seconds_count");
            if here > 0.0 {
                series &= text.contains(
                    "macula_workload_restarts_total{realm=\"com.example.work\",workload=\"hello\"",
                );
            }
        }
        (running, placements, scheduled, series)
    };
    eventually(
        "/metrics to show the replicas",
        Duration::from_secs(10),
        || async { (scrape().await == (3.0, 3.0, 3.0, true)).then_some(()) },
    )
    .await;

    // Logs from the nodes that run them.
    let logs = eventually("logs of every replica", Duration::from_secs(10), || async {
        let text = work::logs(api(), REALM, &admin, "hello").await;
        (0..3)
            .all(|i| text.contains(&format!("[hello/{i}] hello from {i} token")))
            .then_some(text)
    })
    .await;
    assert!(!logs.contains("[hello/3]"), "{logs}");

    // Kill -9 a node that runs a replica (not the one the CLI talks to).
    let healed = work::kill_and_heal(
        api(),
        &mut nodes,
        &ids,
        (REALM, &admin, "hello"),
        &placed,
        Duration::from_secs(30),
    )
    .await;
    let distinct: BTreeSet<&String> = healed.now.iter().map(|r| &r.1).collect();
    assert_eq!(distinct.len(), 3, "still spread: {:?}", healed.now);
    eprintln!("re-placed in {:?}", healed.took);

    // Scale up to 4 (four live nodes), then down to 1.
    macula(api(), &admin, &["scale", "hello", "--replicas", "4"])
        .await
        .unwrap();
    let four = eventually("4 replicas", Duration::from_secs(20), || async {
        let r = running(api(), &admin, "hello").await;
        (r.len() == 4).then_some(r)
    })
    .await;
    let per_node: BTreeMap<&String, usize> = four.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(&r.1).or_default() += 1;
        m
    });
    assert_eq!(per_node.len(), 4, "one per live node: {four:?}");
    macula(api(), &admin, &["scale", "hello", "--replicas", "1"])
        .await
        .unwrap();
    eventually("1 replica", Duration::from_secs(20), || async {
        let r = running(api(), &admin, "hello").await;
        (r.len() == 1 && r[0].0 == 0).then_some(())
    })
    .await;

    // Workload identity: two replicas register a procedure with their own sessions (a ticket
    // in MACULA_KEY, role service_account) and a client on another node calls it.
    let serve = format!("{BIN} serve {REALM}.whoami -- sh -c 'echo replica $MACULA_REPLICA'");
    macula(
        api(),
        &admin,
        &[
            "deploy",
            "--payload",
            &serve,
            "--name",
            "whoami",
            "--replicas",
            "2",
            "--timeout",
            "30s",
        ],
    )
    .await
    .unwrap();
    let mut answers = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answers.len() < 2 && Instant::now() < deadline {
        if let Ok(v) = macula(api(), &admin, &["call", &format!("{REALM}.whoami")]).await {
            answers.insert(v.to_string());
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        answers.iter().any(|a| a.contains("replica 0"))
            && answers.iter().any(|a| a.contains("replica 1")),
        "both replicas answer: {answers:?}"
    );
    macula(api(), &admin, &["delete", "whoami"]).await.unwrap();

    // Delete: none left anywhere.
    macula(api(), &admin, &["delete", "hello"]).await.unwrap();
    eventually("no replica", Duration::from_secs(20), || async {
        running(api(), &admin, "hello")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let missing = macula(api(), &admin, &["scale", "hello", "--replicas", "2"]).await;
    assert!(
        missing
            .as_ref()
            .is_err_and(|e| e.contains("no workload hello")),
        "{missing:?}"
    );
}

/// The runs of job `name` as `macula jobs` / `workloads` report them: (index, state, node,
/// token), and the job's summary.
async fn job(node: &NodeProc, admin: &str, name: &str) -> (Vec<(u64, String, String, u64)>, Value) {
    let Ok(v) = macula(node, admin, &["jobs", name]).await else {
        return (vec![], Value::Null);
    };
    let j = v["jobs"][0].clone();
    let mut runs: Vec<_> = j["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["replica"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_owned(),
                r["node"].as_str().unwrap().to_owned(),
                r["token"].as_u64().unwrap(),
            )
        })
        .collect();
    runs.sort();
    (runs, j)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_completes_exactly_its_completions_though_a_node_dies_mid_run() {
    let (tmp, homes, admin) = homes(5);
    let (first, mut nodes, ids) = work::nodes(&homes).await;
    let api = || &first;
    let manifest = tmp.path().join("job.yaml");
    std::fs::write(
        &manifest,
        "kind: job\nname: crunch\ncompletions: 10\nparallelism: 3\n\
         command: [sh, -c, 'echo run $MACULA_REPLICA token $MACULA_FENCING_TOKEN; sleep 2']\n",
    )
    .unwrap();
    let path = manifest.display().to_string();
    let deploy = {
        let (url, admin) = (format!("ws://{}/ws", api().http), admin.clone());
        tokio::spawn(async move {
            tokio::process::Command::new(BIN)
                .args(["--json", "deploy", "-f", &path, "--timeout", "90s"])
                .args(["--url", &url, "--realm", REALM, "--key", &admin])
                .output()
                .await
                .unwrap()
        })
    };
    // Kill -9 a node (not the first) while it runs one of the job's runs.
    let (index, victim_id, old_token) = eventually(
        "a run on a node we may kill",
        Duration::from_secs(30),
        || async {
            let (runs, _) = job(api(), &admin, "crunch").await;
            runs.into_iter()
                .find(|r| r.1 == "running" && ids.get(&r.2).is_some_and(|i| *i != 0))
                .map(|r| (r.0, r.2, r.3))
        },
    )
    .await;
    drop(nodes[ids[&victim_id]].take());
    eprintln!("killed the node running completion {index} (token {old_token})");

    let out = deploy.await.unwrap();
    assert!(
        out.status.success(),
        "the deploy waits for the job: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (runs, summary) = job(api(), &admin, "crunch").await;
    assert_eq!(summary["state"], "complete", "{summary}");
    assert_eq!(summary["succeeded"], 10, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    // Exactly one counted run per completion, 0 to 9.
    let counted: Vec<u64> = runs
        .iter()
        .filter(|r| r.1 == "succeeded")
        .map(|r| r.0)
        .collect();
    assert_eq!(counted, (0..10).collect::<Vec<u64>>(), "{runs:?}");
    assert!(
        runs.iter().all(|r| r.1 == "succeeded"),
        "nothing else left: {runs:?}"
    );
    // The killed node's run did not count: the completion ran again elsewhere, under a later
    // lease.
    let redone = runs.iter().find(|r| r.0 == index).unwrap();
    assert_ne!(redone.2, victim_id, "{runs:?}");
    assert!(redone.3 > old_token, "{redone:?} after token {old_token}");
    // Every node that answers knows it is complete (it ran nothing more).
    for n in nodes.iter().flatten() {
        let (_, s) = job(n, &admin, "crunch").await;
        assert_eq!(s["succeeded"], 10, "{s}");
    }

    // A job whose run fails past its backoff_limit fails, and the deploy says so.
    std::fs::write(
        &manifest,
        "kind: job\nname: broken\ncompletions: 2\nbackoff_limit: 1\n\
         restart: {policy: on_failure, backoff: {initial: 100ms, max: 200ms}}\n\
         command: [sh, -c, 'echo no luck; exit 3']\n",
    )
    .unwrap();
    let failed = macula(
        api(),
        &admin,
        &["deploy", "-f", &manifest.display().to_string()],
    )
    .await;
    let err = failed.expect_err("a failing job fails the deploy");
    assert!(err.contains("broken failed"), "{err}");
    let (_, s) = job(api(), &admin, "broken").await;
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["succeeded"] == 0 && s["failed"] == 1,
        "the other completion never ran: {s}"
    );
}

/// Every replica of `name` as `macula workloads --json` reports it: (index, version, state,
/// ready, since).
async fn replicas(node: &NodeProc, admin: &str, name: &str) -> Vec<(u64, u64, String, bool, u64)> {
    let Ok(v) = macula(node, admin, &["workloads", name]).await else {
        return vec![];
    };
    let mut out: Vec<_> = v["workloads"][0]["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["replica"].as_u64().unwrap(),
                r["seq"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_owned(),
                r["ready"].as_bool().unwrap(),
                r["since"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_keeps_every_replica_ready_and_undo_goes_back() {
    let (tmp, homes, admin) = homes(5);
    let (first, _nodes, _ids) = work::nodes(&homes).await;
    let api = || &first;
    let manifest = tmp.path().join("web.yaml");
    let version = |v: u32| {
        format!(
            "kind: payload\nname: web\nreplicas: 3\nenv: {{VERSION: \"{v}\"}}\n\
             command: [sh, -c, 'sleep 1; touch ready; while true; do echo v$VERSION; sleep 0.3; done']\n\
             health: {{readiness: {{exec: {{command: [test, -f, ready]}}, period: 200ms, timeout: 200ms}}}}\n"
        )
    };
    let path = manifest.display().to_string();
    std::fs::write(&manifest, version(1)).unwrap();
    macula(api(), &admin, &["deploy", "-f", &path, "--timeout", "40s"])
        .await
        .unwrap();
    let before = replicas(api(), &admin, "web").await;
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(before.iter().all(|r| r.1 == 1 && r.3), "{before:?}");

    // Version 2, rolled out with max_surge 1 and max_unavailable 0 (the defaults): three
    // replicas ready all along, never more than four running.
    std::fs::write(&manifest, version(2)).unwrap();
    macula(api(), &admin, &["deploy", "-f", &path, "--no-wait"])
        .await
        .unwrap();
    let started = Instant::now();
    let mut most = 0;
    loop {
        let now = replicas(api(), &admin, "web").await;
        let running = now.iter().filter(|r| r.2 == "running").count();
        let ready = now.iter().filter(|r| r.2 == "running" && r.3).count();
        most = most.max(running);
        assert!(
            ready >= 3,
            "a replica was unavailable during the update: {now:?}"
        );
        assert!(running <= 4, "more than one surge replica: {now:?}");
        if running == 3 && now.iter().all(|r| r.1 == 2 && r.3) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rollout stalled: {now:?}"
        );
    }
    assert_eq!(most, 4, "a new replica ran beside the old one");
    let v = macula(api(), &admin, &["rollout", "status", "web"])
        .await
        .unwrap();
    assert_eq!(v["seq"], 2, "{v}");

    // History and undo: version 1's manifest comes back as version 3.
    let h = macula(api(), &admin, &["rollout", "history", "web"])
        .await
        .unwrap();
    let seqs: Vec<u64> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 1], "{h}");
    let v = macula(
        api(),
        &admin,
        &["rollout", "undo", "web", "--timeout", "60s"],
    )
    .await
    .unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["from"].as_u64()),
        (Some(3), Some(1)),
        "{v}"
    );
    let h = macula(api(), &admin, &["rollout", "history", "web"])
        .await
        .unwrap();
    assert_eq!(h["versions"][0]["manifest"], version(1), "{h}");
    let undone = replicas(api(), &admin, "web").await;
    assert!(
        undone.iter().all(|r| r.1 == 3 && r.3) && undone.len() == 3,
        "{undone:?}"
    );

    // Scaling changes nothing that runs: the replicas that run keep running.
    macula(api(), &admin, &["scale", "web", "--replicas", "4"])
        .await
        .unwrap();
    let scaled = eventually("a 4th replica", Duration::from_secs(20), || async {
        let r = replicas(api(), &admin, "web").await;
        (r.iter().filter(|r| r.2 == "running" && r.1 == 4).count() == 4).then_some(r)
    })
    .await;
    for (i, _, _, _, since) in &undone {
        let now = scaled.iter().find(|r| r.0 == *i).unwrap();
        assert_eq!(
            now.4, *since,
            "replica {i} was restarted by a scale: {scaled:?}"
        );
    }
}

/// Each slot's newest lease configuration among the nodes' kept promises (`homes`): slot →
/// (epoch, authorities).
fn configurations(homes: &[std::path::PathBuf]) -> BTreeMap<String, (u64, Vec<String>)> {
    let mut out: BTreeMap<String, (u64, Vec<String>)> = BTreeMap::new();
    for h in homes {
        let Ok(text) = std::fs::read_to_string(h.join("workloads/promises.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<BTreeMap<String, Value>>(&text) else {
            continue;
        };
        for (slot, st) in v {
            let Some(epoch) = st["cfg"]["epoch"].as_u64() else {
                continue;
            };
            let set: Vec<String> = st["cfg"]["set"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect();
            if out.get(&slot).is_none_or(|(e, _)| epoch > *e) {
                out.insert(slot, (epoch, set));
            }
        }
    }
    out
}

/// Waits until every slot of `name` (and its rollout permit) has, as its newest configuration,
/// the rendezvous top 3 over `ids`; the configurations then.
async fn authorities_follow(
    homes: &[std::path::PathBuf],
    ids: &[String],
    name: &str,
    slots: u32,
    within: Duration,
) -> BTreeMap<String, (u64, Vec<String>)> {
    let mut wanted: Vec<String> = (0..slots)
        .map(|i| macula_workloads::wire::slot(REALM, name, i))
        .collect();
    wanted.push(macula_workloads::wire::permit(REALM, name, 0));
    eventually(
        "every slot's authorities to be its top 3 over the nodes there are",
        within,
        || async {
            let cfgs = configurations(homes);
            wanted
                .iter()
                .all(|s| {
                    let mut target: Vec<&String> = macula_workloads::lease::authorities(s, ids, 3);
                    target.sort();
                    cfgs.get(s).is_some_and(|(_, set)| {
                        let mut set: Vec<&String> = set.iter().collect();
                        set.sort();
                        set == target
                    })
                })
                .then_some(cfgs)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorities_follow_nodes_that_join_and_leave_and_replicas_run_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (homes, admin) = node_homes(
        tmp.path(),
        5,
        REALM,
        "workloads:\n  require_limits: false\n  require_sandbox: false\n  lease_term_ms: 2000\n  member_grace_ms: 1500\n",
    );
    // Three nodes first.
    let first = start_node(&homes[0], None);
    let mut nodes: Vec<Option<NodeProc>> = vec![None];
    for h in &homes[1..3] {
        nodes.push(Some(start_node(h, Some(&first.mesh))));
    }
    let mut ids: Vec<String> = vec![];
    for n in std::iter::once(&first).chain(nodes.iter().flatten()) {
        ids.push(linked_peer_id(&n.http).await);
    }
    macula(
        &first,
        &admin,
        &[
            "deploy",
            "--payload",
            "sleep 600",
            "--name",
            "app",
            "--replicas",
            "6",
            "--timeout",
            "60s",
        ],
    )
    .await
    .unwrap();
    let before = replicas(&first, &admin, "app").await;
    let placed = running(&first, &admin, "app").await;
    assert_eq!(placed.len(), 6, "{placed:?}");
    let start = authorities_follow(&homes[..3], &ids, "app", 6, Duration::from_secs(20)).await;
    assert!(start.values().all(|(e, _)| *e >= 1));

    // Two nodes join: the slots they rank among the top 3 for move to them, each agreed by a
    // majority of the authorities it leaves; the replicas run on where they were.
    for h in &homes[3..5] {
        nodes.push(Some(start_node(h, Some(&first.mesh))));
    }
    for n in nodes.iter().flatten().skip(2) {
        ids.push(linked_peer_id(&n.http).await);
    }
    let joined = authorities_follow(&homes, &ids, "app", 6, Duration::from_secs(30)).await;
    let moved: Vec<&String> = joined
        .iter()
        .filter(|(s, (e, _))| start.get(*s).is_some_and(|(e0, _)| e > e0))
        .map(|(s, _)| s)
        .collect();
    assert!(
        !moved.is_empty(),
        "some slot's authorities moved: {joined:?}"
    );
    let after = running(&first, &admin, "app").await;
    for (slot, node, token) in &placed {
        let now = after.iter().find(|r| r.0 == *slot);
        assert!(
            now.is_some_and(|r| r.1 == *node && r.2 >= *token),
            "replica {slot} ran on where it was, its token not lower: {placed:?} then {after:?}"
        );
    }
    assert_eq!(
        replicas(&first, &admin, "app").await,
        before,
        "no replica restarted"
    );
    let scrape = || async {
        let mut moves = 0.0;
        for n in std::iter::once(&first).chain(nodes.iter().flatten()) {
            moves += metric(
                &http_get(&n.http, "/metrics").await,
                "macula_workload_authority_moves_total",
            );
        }
        moves
    };
    assert!(scrape().await >= moved.len() as f64);
    eprintln!("joins: {} of 7 slots moved: {moved:?}", moved.len());

    // A node that leaves for good (killed) leaves every set it was in, through the rest of it;
    // its replicas are placed elsewhere.
    let gone = 4;
    drop(nodes[gone].take());
    let dead = ids.remove(gone);
    let left = authorities_follow(&homes, &ids, "app", 6, Duration::from_secs(30)).await;
    assert!(left.values().all(|(_, set)| !set.contains(&dead)));
    eventually(
        "6 replicas on the nodes left",
        Duration::from_secs(30),
        || async {
            let now = running(&first, &admin, "app").await;
            (now.len() == 6 && now.iter().all(|r| r.1 != dead)).then_some(())
        },
    )
    .await;
}
