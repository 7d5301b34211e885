//! Helpers of the workload tests: the CLI against a node, what runs where, five nodes, a
//! container image from a static busybox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use macula_workloads::runtime::on_path;
use serde_json::Value;

use super::{linked_peer_id, start_node, NodeProc, BIN};

/// `macula --json ARGS` against `node` in `realm` with `key`; the parsed answer.
pub async fn macula(
    node: &NodeProc,
    realm: &str,
    key: &str,
    args: &[&str],
) -> Result<Value, String> {
    let url = format!("ws://{}/ws", node.http);
    let out = tokio::process::Command::new(BIN)
        .arg("--json")
        .args(args)
        .args(["--url", &url, "--realm", realm, "--key", key])
        .output()
        .await
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {:?}", out.stdout))
}

/// The running replicas of `name` by index: (index, node, token).
pub async fn running(
    node: &NodeProc,
    realm: &str,
    key: &str,
    name: &str,
) -> Vec<(u64, String, u64)> {
    let Ok(v) = macula(node, realm, key, &["workloads", name]).await else {
        return vec![];
    };
    let mut out = vec![];
    for w in v["workloads"].as_array().into_iter().flatten() {
        for r in w["items"].as_array().into_iter().flatten() {
            if r["state"] == "running" {
                out.push((
                    r["replica"].as_u64().unwrap(),
                    r["node"].as_str().unwrap().to_owned(),
                    r["token"].as_u64().unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Nodes on `homes`: the first, the others by index (1..; a killed one is taken out), and
/// their peer ids → index.
pub async fn nodes(homes: &[PathBuf]) -> (NodeProc, Vec<Option<NodeProc>>, HashMap<String, usize>) {
    let first = start_node(&homes[0], None);
    let mut nodes: Vec<Option<NodeProc>> = vec![None];
    let mut ids: HashMap<String, usize> = HashMap::new();
    for h in &homes[1..] {
        nodes.push(Some(start_node(h, Some(&first.mesh))));
    }
    for (i, n) in nodes.iter().enumerate() {
        let n = n.as_ref().unwrap_or(&first);
        ids.insert(linked_peer_id(&n.http).await, i);
    }
    (first, nodes, ids)
}

/// `macula logs NAME` against `node` (text, not JSON): what it printed.
pub async fn logs(node: &NodeProc, realm: &str, key: &str, name: &str) -> String {
    let out = tokio::process::Command::new(BIN)
        .args(["logs", name, "--url", &format!("ws://{}/ws", node.http)])
        .args(["--realm", realm, "--key", key])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills (`kill -9`) a node (not the first) that runs a replica of `name` (of `placed`, as
/// [`running`] reads it) and waits (up to `within`) until `placed.len()` run again on the
/// nodes alive, asserting all along that never more do; the replica moved (slot, its new node,
/// its new token), the dead node's peer id and its old token, and how long it took.
pub struct Healed {
    pub moved: (u64, String, u64),
    pub dead: String,
    pub old_token: u64,
    pub took: std::time::Duration,
    pub now: Vec<(u64, String, u64)>,
}

pub async fn kill_and_heal(
    api: &NodeProc,
    nodes: &mut [Option<NodeProc>],
    ids: &HashMap<String, usize>,
    (realm, key, name): (&str, &str, &str),
    placed: &[(u64, String, u64)],
    within: std::time::Duration,
) -> Healed {
    let (slot, dead, old_token) = placed
        .iter()
        .find(|r| ids[&r.1] != 0)
        .cloned()
        .expect("a replica on a node other than the first");
    let killed_at = std::time::Instant::now();
    drop(nodes[ids[&dead]].take());
    let n = placed.len();
    let now = loop {
        let now = running(api, realm, key, name).await;
        let live = now.iter().filter(|r| r.1 != dead).count();
        assert!(live <= n, "never more than {n} replicas: {now:?}");
        if live == n {
            break now;
        }
        assert!(
            killed_at.elapsed() < within,
            "replica {slot} not re-placed after {within:?}: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let moved = now.iter().find(|r| r.0 == slot).cloned().unwrap();
    assert_ne!(moved.1, dead);
    assert!(
        moved.2 > old_token,
        "a new lease has a higher token: {moved:?} after {old_token}"
    );
    Healed {
        moved,
        dead,
        old_token,
        took: killed_at.elapsed(),
        now,
    }
}

/// Why containers cannot run here (for a SKIPPED line), if they cannot.
pub fn containers_unavailable() -> Option<String> {
    if on_path("podman").is_none() || on_path("runc").is_none() {
        return Some("podman and runc are not installed (apt install podman runc)".into());
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("containers run rootful here: run the tests as root (CI does)".into());
    }
    None
}

/// Writes `dir/NAME.tar`, a `podman save` archive of the image `image` (a root file system of
/// a static busybox, `PATH=/bin`, and `/etc/macula-image` holding `yes`), made with the
/// podman CLI in a store of its own under `dir`; None (say why: SKIPPED) where it cannot be.
pub fn busybox_image(dir: &Path, image: &str) -> Result<PathBuf, String> {
    let work = dir.join("image-build");
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let rootfs = macula_workloads::runtime::container::busybox_rootfs_tar(&work)
        .map_err(|e| e.to_string())?;
    let tar = work.join("rootfs.tar");
    std::fs::write(&tar, rootfs).map_err(|e| e.to_string())?;
    let run = |cmd: &mut std::process::Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let podman = |args: &[&str]| {
        let mut c = std::process::Command::new("podman");
        c.arg("--root")
            .arg(work.join("storage"))
            .arg("--runroot")
            .arg(work.join("run"))
            .args([
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args);
        c
    };
    run(podman(&["import", "--change", "ENV=PATH=/bin"])
        .arg(&tar)
        .arg(image))?;
    let name = image
        .rsplit('/')
        .next()
        .unwrap_or(image)
        .replace([':', '@'], "-");
    let archive = dir.join(format!("{name}.tar"));
    run(podman(&["save", "-o"]).arg(&archive).arg(image))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(archive)
}
