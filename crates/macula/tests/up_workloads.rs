//! The workloads story on `macula up --nodes 3` (its nodes 2 and 3 are processes of their
//! own): a payload of 2 replicas that registers a procedure with its workload identity runs on
//! two nodes (`macula status`), answers `macula call`, streams both replicas' output
//! (`macula logs --follow`); killing the process of a node that runs one re-places it and the
//! calls keep being answered; kubectl applies a Deployment against it.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
mod macula_up;

/// The realm the shared test helpers name (this test uses the one `macula up` makes).
#[allow(dead_code)]
const REALM: &str = "com.example.demo";

use common::{eventually, mesh_status};
use macula_up::BIN;

/// `macula --json ARGS` against the first node; the parsed answer or stderr.
async fn macula(url: &str, realm: &str, key: &str, args: &[&str]) -> Result<Value, String> {
    let out = tokio::process::Command::new(BIN)
        .arg("--json")
        .args(args)
        .args(["--url", url, "--key", key])
        .env("MACULA_REALM", realm)
        .env("MACULA_HOME", "/nonexistent")
        .output()
        .await
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {:?}", out.stdout))
}

/// Running replicas of `name` per `macula status`: (replica, node peer id).
async fn running(url: &str, realm: &str, key: &str, name: &str) -> Vec<(u64, String)> {
    let Ok(v) = macula(url, realm, key, &["status", "--realm", realm]).await else {
        return vec![];
    };
    let mut out: Vec<(u64, String)> = v["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["name"] == name)
        .flat_map(|w| w["items"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["state"] == "running")
        .map(|r| {
            (
                r["replica"].as_u64().unwrap(),
                r["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The fencing token of replica `i` of `name` where it runs, per `macula status`.
async fn token_of(url: &str, realm: &str, key: &str, name: &str, i: u64) -> u64 {
    let v = macula(url, realm, key, &["status", "--realm", realm])
        .await
        .unwrap();
    v["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["name"] == name)
        .flat_map(|w| w["items"].as_array().cloned().unwrap_or_default())
        .find(|r| r["replica"] == i && r["state"] == "running")
        .and_then(|r| r["token"].as_u64())
        .unwrap_or_else(|| panic!("replica {i} of {name} running in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_macula_up_a_payload_runs_answers_heals_and_kubectl_applies() {
    let home = tempfile::tempdir().unwrap();
    let (_up, v) = macula_up::up(home.path(), &["--nodes", "3"]);
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {v}"))
            .to_owned()
    };
    let (realm, key, url) = (s("realm"), s("key"), s("ws"));
    // Each node's process and peer id.
    let mut pid_of: HashMap<String, u32> = HashMap::new();
    for n in v["nodes"].as_array().unwrap() {
        let http = n["http"]
            .as_str()
            .unwrap()
            .trim_start_matches("http://")
            .to_owned();
        let id = eventually("a node's peer id", Duration::from_secs(20), || async {
            mesh_status(&http).await["peer_id"]
                .as_str()
                .map(str::to_owned)
        })
        .await;
        pid_of.insert(id, n["pid"].as_u64().unwrap() as u32);
    }
    assert_eq!(pid_of.len(), 3);

    // The payload: a procedure answered by each replica with its own identity.
    let payload = format!("{BIN} serve {realm}.whoami -- sh -c 'echo replica $MACULA_REPLICA'");
    let d = macula(
        &url,
        &realm,
        &key,
        &[
            "deploy",
            "--payload",
            &payload,
            "--name",
            "whoami",
            "--replicas",
            "2",
            "--timeout",
            "60s",
        ],
    )
    .await
    .unwrap();
    assert_eq!(d["seq"], 1, "{d}");
    let placed = running(&url, &realm, &key, "whoami").await;
    let nodes: BTreeSet<&String> = placed.iter().map(|r| &r.1).collect();
    assert_eq!(
        (placed.len(), nodes.len()),
        (2, 2),
        "two replicas on two nodes: {placed:?}"
    );

    // Calls are answered, by both replicas in time.
    let mut answers = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answers.len() < 2 && Instant::now() < deadline {
        if let Ok(v) = macula(&url, &realm, &key, &["call", &format!("{realm}.whoami")]).await {
            answers.insert(v.to_string());
        }
    }
    assert_eq!(answers.len(), 2, "both replicas answer: {answers:?}");

    // logs --follow streams both replicas' output.
    let mut follow = tokio::process::Command::new(BIN)
        .args(["logs", "whoami", "--follow", "--url", &url, "--key", &key])
        .env("MACULA_REALM", &realm)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    let mut from = BTreeSet::new();
    while from.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .expect("a line within 15 s")
            .unwrap()
            .expect("the stream goes on");
        for i in 0..2 {
            if line.starts_with(&format!("[whoami/{i}]")) {
                from.insert(i);
            }
        }
    }
    drop(follow);

    // Kill -9 the process of a node (not the first, which the CLI talks to) that runs one.
    let (slot, victim) = placed
        .iter()
        .find(|r| pid_of[&r.1] != v["nodes"][0]["pid"].as_u64().unwrap() as u32)
        .cloned()
        .expect("a replica on node 2 or 3");
    let old_token = token_of(&url, &realm, &key, "whoami", slot).await;
    let killed_at = Instant::now();
    // SAFETY: kill(2) on a pid this test's `macula up` started.
    unsafe {
        libc::kill(pid_of[&victim] as i32, libc::SIGKILL);
    }
    let (mut answered, mut asked) = (0, 0);
    let healed = loop {
        asked += 1;
        if macula(&url, &realm, &key, &["call", &format!("{realm}.whoami")])
            .await
            .is_ok()
        {
            answered += 1;
        }
        let now = running(&url, &realm, &key, "whoami").await;
        let live: Vec<_> = now.iter().filter(|r| r.1 != victim).cloned().collect();
        // At least three calls while it heals: one that goes to the dead node's registration
        // waits out its timeout, the others reach the live replica.
        if live.len() == 2 && asked >= 3 {
            break live;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "replica {slot} not re-placed in 30 s: {now:?}"
        );
    };
    eprintln!(
        "re-placed in {:?}; {answered} of {asked} calls answered meanwhile",
        killed_at.elapsed()
    );
    assert!(answered > 0, "calls kept being answered");
    let nodes: BTreeSet<&String> = healed.iter().map(|r| &r.1).collect();
    assert_eq!(nodes.len(), 2, "still on two nodes: {healed:?}");
    macula(&url, &realm, &key, &["call", &format!("{realm}.whoami")])
        .await
        .expect("answered after the heal");

    // macula.fence.check: the killed node's token is stale now, the new holder's current.
    let new_token = token_of(&url, &realm, &key, "whoami", slot).await;
    assert!(new_token > old_token, "{old_token} → {new_token}");
    let fence = |token: u64| {
        let (url, realm, key) = (url.clone(), realm.clone(), key.clone());
        async move {
            let kwargs = format!(r#"{{"workload": "whoami", "replica": {slot}}}"#);
            let token = format!("[{token}]");
            let args = [
                "call",
                "macula.fence.check",
                token.as_str(),
                "--kwargs",
                &kwargs,
            ];
            macula(&url, &realm, &key, &args).await.unwrap()
        }
    };
    let stale = fence(old_token).await;
    assert_eq!(stale["args"][0], false, "{stale}");
    assert!(
        stale["kwargs"]["highest"].as_u64() >= Some(new_token),
        "{stale}"
    );
    let current = fence(new_token).await;
    assert_eq!(current["args"][0], true, "{current}");
    // A replica checks its own lease (its slot from its identity, the token its node holds).
    let fencer = format!("{BIN} --json call macula.fence.check");
    macula(
        &url,
        &realm,
        &key,
        &[
            "deploy",
            "--payload",
            &fencer,
            "--name",
            "fencer",
            // It exits after its call (and is restarted): do not wait for it to keep running.
            "--no-wait",
        ],
    )
    .await
    .unwrap();
    let said = eventually(
        "the replica's own fence check",
        Duration::from_secs(20),
        || async {
            let out = tokio::process::Command::new(BIN)
                .args(["logs", "fencer", "--url", &url, "--key", &key])
                .env("MACULA_REALM", &realm)
                .env("MACULA_HOME", "/nonexistent")
                .output()
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.contains("current"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(
        said.contains(r#""args":[true]"#) && said.contains(r#""workload":"fencer""#),
        "{said}"
    );

    // The replicas' compute reaches the realm's usage (metered on the nodes that ran them).
    let server = s("http");
    let ms = eventually("compute in the usage", Duration::from_secs(30), || async {
        let out = tokio::process::Command::new(BIN)
            .args(["--json", "usage", "--server", &server, "--key", &key])
            .args(["--realm", &realm])
            .env("MACULA_HOME", "/nonexistent")
            .output()
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        // Two replicas have run for seconds by now.
        v["usage"]["instance_ms"].as_u64().filter(|ms| *ms >= 2000)
    })
    .await;
    eprintln!("compute metered: {ms} ms");

    // Containers: an image archive in `<home>/images`, which every node of `macula up` loads
    // from, runs as 2 replicas on 2 nodes.
    match common::work::containers_unavailable() {
        Some(why) => eprintln!("SKIPPED (the container part): {why}"),
        None => {
            match common::work::busybox_image(&home.path().join("images"), "localhost/up-box:1") {
                Err(why) => eprintln!("SKIPPED (the container part): {why}"),
                Ok(_) => {
                    macula(
                        &url,
                        &realm,
                        &key,
                        &[
                            "deploy",
                            "--image",
                            "localhost/up-box:1",
                            "--payload",
                            "sh -c 'cat /etc/macula-image; exec sleep 600'",
                            "--name",
                            "box",
                            "--replicas",
                            "2",
                            "--timeout",
                            "60s",
                        ],
                    )
                    .await
                    .unwrap();
                    let boxes = running(&url, &realm, &key, "box").await;
                    let on: BTreeSet<&String> = boxes.iter().map(|r| &r.1).collect();
                    assert_eq!((boxes.len(), on.len()), (2, 2), "{boxes:?}");
                    macula(&url, &realm, &key, &["delete", "box"])
                        .await
                        .unwrap();
                }
            }
        }
    }

    // kubectl applies a Deployment (over TLS, with the certificate `macula up` made).
    let have_kubectl = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_kubectl {
        eprintln!("SKIPPED (the kubectl part): kubectl is not installed");
        return;
    }
    let manifest = home.path().join("web.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  annotations: {macula.io/runtime: process}\n\
         spec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n\
         \x20   spec:\n      containers:\n        - {name: web, image: unused, command: [sleep, '300']}\n",
    )
    .unwrap();
    let https = s("https");
    let kubectl = |args: Vec<String>| {
        let (https, key, realm, ca) = (https.clone(), key.clone(), realm.clone(), s("ca"));
        let kube_home = home.path().join("kube");
        async move {
            tokio::process::Command::new("kubectl")
                .args(["--server", &https, "--token", &key, "--namespace", &realm])
                .args(["--certificate-authority", &ca])
                .args(&args)
                .env("HOME", &kube_home)
                .env("KUBECONFIG", kube_home.join("config"))
                .output()
                .await
                .unwrap()
        }
    };
    let out = kubectl(vec![
        "apply".into(),
        "-f".into(),
        manifest.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("deployment.apps/web created"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the Deployment ready", Duration::from_secs(30), || async {
        let out = kubectl(vec!["get".into(), "deployments".into()]).await;
        String::from_utf8_lossy(&out.stdout)
            .contains("1/1")
            .then_some(())
    })
    .await;
}
