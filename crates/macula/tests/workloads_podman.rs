//! Containers on five real `macula node` processes (the Podman runtime): an image loaded from
//! an archive in the nodes' images directory, 3 replicas deployed with
//! `macula deploy --image` run as containers on 3 distinct nodes (what they print comes from
//! inside the image) and their logs are followed; `kill -9` of a node running one re-places it
//! (a higher fencing token, never more than 3 running) and the dead node's reaper kills its
//! container; delete removes them all. SKIPPED without podman, runc, a static busybox or root
//! (`.ci/run` installs them and runs as root).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use macula_workloads::runtime::cgroup::Cgroup;

mod common;

use common::work::{self, busybox_image, containers_unavailable};
use common::*;

const REALM: &str = "com.example.pods";
const IMAGE: &str = "localhost/macula-pod:1";

/// The control group a node's containers are under (the last 12 characters of its peer id).
fn pods_group(peer: &str) -> String {
    format!("/macula-pods/{}", &peer[peer.len().saturating_sub(12)..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_run_heal_and_remove_containers() {
    if let Some(why) = containers_unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    if let Err(why) = busybox_image(&images, IMAGE) {
        eprintln!("SKIPPED: no test image: {why}");
        return;
    }
    let (homes, admin) = node_homes(
        tmp.path(),
        5,
        REALM,
        &format!(
            "workloads:\n  require_limits: false\n  require_sandbox: false\n  lease_term_ms: 2000\n  \
             images: [{}]\n",
            images.display()
        ),
    );
    let (first, mut nodes, ids) = work::nodes(&homes).await;
    let api = || &first;
    let macula = |args: &'static [&'static str]| work::macula(&first, REALM, &admin, args);

    // 3 replicas of an image, each printing what only the image holds.
    let script = "cat /etc/macula-image; while true; do echo \"pod $MACULA_REPLICA token $MACULA_FENCING_TOKEN\"; sleep 0.3; done";
    let deployed = Instant::now();
    let v = work::macula(
        api(),
        REALM,
        &admin,
        &[
            "deploy",
            "--image",
            IMAGE,
            "--payload",
            &format!("sh -c '{script}'"),
            "--name",
            "pod",
            "--replicas",
            "3",
            "--timeout",
            "60s",
        ],
    )
    .await
    .unwrap();
    assert_eq!(v["seq"], 1, "{v}");
    eprintln!("3 containers running in {:?}", deployed.elapsed());
    let placed = work::running(api(), REALM, &admin, "pod").await;
    let distinct: BTreeSet<&String> = placed.iter().map(|r| &r.1).collect();
    assert_eq!(placed.len(), 3, "{placed:?}");
    assert_eq!(distinct.len(), 3, "on 3 nodes: {placed:?}");
    let described = macula(&["workloads", "pod"]).await.unwrap();
    assert_eq!(
        described["workloads"][0]["runtime"], "podman",
        "{described}"
    );
    for r in &placed {
        assert!(
            !Cgroup::pids_below(&pods_group(&r.1)).is_empty(),
            "a container under the node's group: {r:?}"
        );
    }

    // Their output, from the nodes that run them: from inside the image.
    let logs = eventually(
        "every container's output",
        Duration::from_secs(15),
        || async {
            let text = work::logs(api(), REALM, &admin, "pod").await;
            (0..3)
                .all(|i| {
                    text.contains(&format!("[pod/{i}] yes"))
                        && text.contains(&format!("[pod/{i}] pod {i} token"))
                })
                .then_some(text)
        },
    )
    .await;
    assert!(!logs.contains("[pod/3]"), "{logs}");

    // kill -9 a node running one: re-placed elsewhere under a higher token, never more than
    // 3, and the dead node's container is killed by its reaper.
    let healed = work::kill_and_heal(
        api(),
        &mut nodes,
        &ids,
        (REALM, &admin, "pod"),
        &placed,
        Duration::from_secs(40),
    )
    .await;
    eprintln!("a container re-placed in {:?}", healed.took);
    let victim_id = healed.dead;
    eventually(
        "the dead node's container killed by its reaper",
        Duration::from_secs(10),
        || async {
            Cgroup::pids_below(&pods_group(&victim_id))
                .is_empty()
                .then_some(())
        },
    )
    .await;

    // Delete: every container of it removed from every node.
    macula(&["delete", "pod"]).await.unwrap();
    eventually("no container left", Duration::from_secs(30), || async {
        let none_running = work::running(api(), REALM, &admin, "pod").await.is_empty();
        let no_process = ids
            .keys()
            .all(|peer| Cgroup::pids_below(&pods_group(peer)).is_empty());
        (none_running && no_process).then_some(())
    })
    .await;
    drop(nodes);
}
