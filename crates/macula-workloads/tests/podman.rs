//! The Podman runtime's client against a real Podman service (runc, its own storage in a
//! temporary directory): an image imported from a root filesystem tar (no registry), a container
//! with limits that runs, writes to both streams, exits with its code; the limits, the dropped
//! capabilities and the read-only root are in force; its output is followed as it comes; a
//! running container is removed. A node's [`Host`]: an image loaded from an archive in its images
//! directory, replicas supervised as containers (restart with back-off, exec checks run inside,
//! output in the replica's buffer), and the reaper that kills its containers when the node is
//! gone; a node starting again removes what an earlier run left. Needs `podman`, `runc` and a static busybox (Debian's
//! `busybox-static`; `.ci/run` installs them); says SKIPPED otherwise.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::Arc;

mod common;
use common::until;

use macula_workloads::runtime::cgroup::Cgroup;
use macula_workloads::runtime::container::{ContainerStart, Host, HostConfig, NODE_LABEL};
use macula_workloads::runtime::health::{Health, Target};
use macula_workloads::runtime::on_path;
use macula_workloads::runtime::podman::{ContainerSpec, Line, Podman};
use macula_workloads::runtime::process::{LogBuffer, LogLimits, Stream};
use macula_workloads::runtime::supervisor::{supervise, ReplicaState};
use macula_workloads::{Check, Probe, Resources, Restart, RestartPolicy};

const SHIM: &str = env!("CARGO_BIN_EXE_macula-workload-exec");

/// A root filesystem with a static busybox and its applets, as a tar.
fn busybox_rootfs(dir: &Path) -> Option<Vec<u8>> {
    macula_workloads::runtime::container::busybox_rootfs_tar(dir).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_limited_and_unprivileged_and_its_output_is_read() {
    let (Some(podman), Some(_)) = (on_path("podman"), on_path("runc")) else {
        eprintln!("SKIPPED: podman and runc are not installed (apt install podman runc)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(tmp.path()) else {
        eprintln!("SKIPPED: no static busybox for a test image (apt install busybox-static)");
        return;
    };
    let socket = tmp.path().join("podman.sock");
    let (_service, p) = match Podman::start_service(&podman, &socket, Some(tmp.path())).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIPPED: podman system service does not start here: {e}");
            return;
        }
    };

    // No registry: the image comes from a tar.
    assert!(!p.has_image("localhost/macula-test:1").await.unwrap());
    let id = p
        .import(rootfs.into(), "localhost/macula-test:1", &["ENV PATH=/bin"])
        .await
        .unwrap();
    assert!(id.starts_with("sha256:"), "{id}");
    assert!(p.has_image("localhost/macula-test:1").await.unwrap());

    // A replica: limits, both streams, its exit code.
    let name = format!("macula-test-{}", std::process::id());
    let spec = ContainerSpec {
        name: name.clone(),
        image: "localhost/macula-test:1".into(),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo hello $WHO; echo oops >&2; id -u; grep CapEff /proc/self/status; \
             touch /not-here 2>/dev/null || echo read-only; exit 3"
                .into(),
        ],
        env: BTreeMap::from([("WHO".into(), "replica".into())]),
        limits: Resources {
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            pids: 32,
        },
        read_only: true,
        network_none: true,
        ..ContainerSpec::default()
    };
    let t = Instant::now();
    let c = p.create(&spec).await.unwrap();
    p.start(&c).await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(30), p.wait(&c))
        .await
        .expect("it ends")
        .unwrap();
    eprintln!("create, start and run to exit: {:?}", t.elapsed());
    assert_eq!(code, 3);
    let lines = p.logs(&c, 16 << 10).await.unwrap();
    let text = |s: Stream| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.stream == s)
            .map(|l| l.text.clone())
            .collect()
    };
    assert_eq!(
        text(Stream::Stdout),
        [
            "hello replica",
            "0",
            "CapEff:\t0000000000000000",
            "read-only"
        ],
        "{lines:?}"
    );
    assert_eq!(text(Stream::Stderr), ["oops"]);
    let v = p.inspect(&c).await.unwrap();
    let hc = &v["HostConfig"];
    assert_eq!(
        (
            hc["Memory"].as_i64(),
            hc["PidsLimit"].as_i64(),
            hc["CpuQuota"].as_i64()
        ),
        (Some(64 << 20), Some(32), Some(50_000)),
        "{hc}"
    );
    assert_eq!(hc["MemorySwap"].as_i64(), Some(64 << 20), "no swap beyond");
    // Podman's own copy of the output is capped (1 MiB, which it prints as "1.049MB").
    assert_eq!(
        (
            hc["LogConfig"]["Type"].as_str(),
            hc["LogConfig"]["Size"].as_str()
        ),
        (Some("k8s-file"), Some("1.049MB")),
        "{hc}"
    );
    assert_eq!(v["State"]["ExitCode"], 3);
    p.remove(&c).await.unwrap();
    let gone = p.inspect(&c).await.unwrap_err();
    assert_eq!(gone.kind(), std::io::ErrorKind::NotFound, "{gone}");

    // Output followed as it comes; a running container removed at once.
    let spec = ContainerSpec {
        name: format!("{name}-2"),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo first; sleep 600".into(),
        ],
        ..spec
    };
    let c = p.create(&spec).await.unwrap();
    p.start(&c).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Line>();
    let follower = {
        let (p, c) = (p.clone(), c.clone());
        tokio::spawn(async move {
            p.follow(&c, 1024, |l| {
                drop(tx.send(l));
                async {}
            })
            .await
        })
    };
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a line within 10 s")
        .expect("the stream is open");
    assert_eq!(first.text, "first");
    assert_eq!(p.inspect(&c).await.unwrap()["State"]["Status"], "running");
    let t = Instant::now();
    p.remove(&c).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "removed without waiting out a stop timeout: {:?}",
        t.elapsed()
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), follower).await;
    // Bad input: an image that is not there is a clear error.
    let err = p
        .create(&ContainerSpec {
            name: format!("{name}-3"),
            image: "localhost/not-there:1".into(),
            ..ContainerSpec::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not-there"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_replicas_as_containers_and_its_reaper_outlives_it() {
    let (Some(program), Some(_)) = (on_path("podman"), on_path("runc")) else {
        eprintln!("SKIPPED: podman and runc are not installed (apt install podman runc)");
        return;
    };
    if Cgroup::create(
        &format!("podman-probe-{}", std::process::id()),
        &Resources::default(),
    )
    .map(|c| c.destroy())
    .is_err()
    {
        eprintln!("SKIPPED: cannot make control groups here; CI runs as root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(tmp.path()) else {
        eprintln!("SKIPPED: no static busybox for a test image (apt install busybox-static)");
        return;
    };
    // An archive as an operator makes one (`podman save`), from a service of its own.
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let (beta_id, app_id);
    {
        let maker = tmp.path().join("maker");
        let (_svc, p) =
            match Podman::start_service(&program, &maker.join("p.sock"), Some(&maker)).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("SKIPPED: podman system service does not start here: {e}");
                    return;
                }
            };
        app_id = p
            .import(rootfs.into(), "localhost/macula-app:2", &["ENV PATH=/bin"])
            .await
            .unwrap()
            .trim_start_matches("sha256:")
            .to_owned();
        let archive = p.save("localhost/macula-app:2").await.unwrap();
        std::fs::write(images.join("app.tar"), &archive).unwrap();
        // Another realm's own image (in its subdirectory), under another name.
        let id = p
            .import(
                busybox_rootfs(&maker).unwrap().into(),
                "localhost/beta-only:1",
                &["ENV PATH=/bin"],
            )
            .await
            .unwrap();
        beta_id = id.trim_start_matches("sha256:").to_owned();
        std::fs::create_dir_all(images.join("com.beta")).unwrap();
        let archive = p.save("localhost/beta-only:1").await.unwrap();
        std::fs::write(images.join("com.beta/beta.tar"), archive).unwrap();
        // And one that takes the shared image's name (loading it retags the name in the store).
        p.import(
            busybox_rootfs(&maker).unwrap().into(),
            "localhost/macula-app:2",
            &["ENV PATH=/bin", "ENV SHADOW=1"],
        )
        .await
        .unwrap();
        let archive = p.save("localhost/macula-app:2").await.unwrap();
        std::fs::write(images.join("com.beta/shadow.tar"), archive).unwrap();
    }
    let node = format!("t{}", std::process::id());
    let cfg = HostConfig {
        program: program.clone(),
        dir: tmp.path().join("node"),
        images: vec![images.clone()],
        node: node.clone(),
        reaper: Some((SHIM.into(), vec![])),
    };
    let host = Host::new(cfg.clone()).unwrap();
    let spec = |name: &str, script: &str| ContainerSpec {
        name: format!("macula-{node}-{name}"),
        image: "localhost/macula-app:2".into(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::from([("WHO".into(), name.into())]),
        limits: Resources {
            cpu_millis: 200,
            memory_bytes: 32 << 20,
            pids: 16,
        },
        network_none: true,
        ..ContainerSpec::default()
    };
    let starter = |s: ContainerSpec| {
        let host = host.clone();
        move |buffer: Arc<LogBuffer>| {
            ContainerStart {
                host: host.clone(),
                realm: "com.alpha".into(),
                spec: s.clone(),
                logs: LogLimits::default(),
                buffer,
                package: None,
            }
            .launch()
        }
    };
    let restart = Restart {
        policy: RestartPolicy::Always,
        backoff_initial: Duration::from_millis(50),
        // Longer than a container's run: each failure counts toward the next delay.
        backoff_max: Duration::from_secs(30),
    };

    // An image no archive holds: the error says where to put one.
    let missing = ContainerStart {
        host: host.clone(),
        realm: "com.alpha".into(),
        spec: ContainerSpec {
            image: "localhost/nowhere:1".into(),
            ..spec("missing", "true")
        },
        logs: LogLimits::default(),
        buffer: Arc::new(LogBuffer::new(10)),
        package: None,
    }
    .launch()
    .await
    .err()
    .expect("no such image");
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
    let text = missing.to_string();
    assert!(
        text.contains("localhost/nowhere:1") && text.contains(&images.display().to_string()),
        "{text}"
    );

    // A realm uses the shared images and its own, nothing else in the store: com.beta's image
    // (in the store once com.beta ran it) is not com.alpha's, by name or by id.
    let as_realm = |realm: &str, image: &str, name: &str| ContainerStart {
        host: host.clone(),
        realm: realm.into(),
        spec: ContainerSpec {
            image: image.into(),
            ..spec(name, "true")
        },
        logs: LogLimits::default(),
        buffer: Arc::new(LogBuffer::new(10)),
        package: None,
    };
    let mut beta = as_realm("com.beta", "beta-only:1", "beta")
        .launch()
        .await
        .expect("com.beta runs its own image (by its short name)");
    assert_eq!(beta.wait().await, Ok(()));
    beta.kill().await;
    for image in [
        "localhost/beta-only:1",
        "beta-only:1",
        &beta_id,
        &beta_id[..12],
    ] {
        let err = as_realm("com.alpha", image, "alpha")
            .launch()
            .await
            .err()
            .unwrap_or_else(|| panic!("com.alpha ran com.beta's image as {image}"));
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("com.alpha/"), "{err}");
    }
    // The shared name, taken by com.beta's archive since: com.alpha still gets the shared image.
    let mut shadowed = as_realm("com.alpha", "localhost/macula-app:2", "shadowed")
        .launch()
        .await
        .unwrap();
    assert_eq!(shadowed.wait().await, Ok(()));
    let p = host.podman().await.unwrap();
    let ran = p.inspect(&format!("macula-{node}-shadowed")).await.unwrap();
    assert_eq!(ran["Image"].as_str(), Some(app_id.as_str()), "{ran}");
    shadowed.kill().await;

    // A crashing container restarts with back-off; its output is kept across runs.
    let logs = Arc::new(LogBuffer::new(100));
    let mut crash = supervise(
        restart.clone(),
        None,
        logs.clone(),
        Health::default(),
        starter(spec("crash", "echo run $WHO; exit 3")),
    );
    let s = until(&mut crash.state, |s| {
        matches!(s, ReplicaState::BackOff { restarts: 2, .. })
    })
    .await;
    let ReplicaState::BackOff { last_exit, .. } = s else {
        unreachable!()
    };
    assert!(last_exit.contains("exit status: 3"), "{last_exit}");
    let runs = logs
        .since(0)
        .iter()
        .filter(|l| l.text == "run crash")
        .count();
    assert!(runs >= 2, "{:?}", logs.since(0));
    crash.stop().await;

    // A long-running one: ready once a check run inside the container passes; in the node's
    // control group; removed when stopped.
    let health = Health {
        liveness: None,
        readiness: Some(Probe {
            check: Check::Exec {
                command: vec!["sh".into(), "-c".into(), "test -f /etc/macula-image".into()],
            },
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
            failure_threshold: 3,
        }),
        target: Target {
            container: Some((host.clone(), format!("macula-{node}-web"))),
            ..Target::default()
        },
    };
    let logs = Arc::new(LogBuffer::new(100));
    let mut web = supervise(
        restart.clone(),
        None,
        logs.clone(),
        health,
        starter(spec("web", "echo up $WHO; exec sleep 600")),
    );
    let s = until(&mut web.state, |s| {
        matches!(s, ReplicaState::Running { ready: true, .. })
    })
    .await;
    assert_eq!(
        s,
        ReplicaState::Running {
            restarts: 0,
            ready: true
        }
    );
    let p = host.podman().await.unwrap();
    assert_eq!(p.labelled(NODE_LABEL, &node).await.unwrap().len(), 1);
    let cg = web.cgroup().expect("the container's control group");
    assert!(!cg.pids().is_empty(), "its processes are in it");
    let parent = host.cgroup_parent();
    assert!(!Cgroup::pids_below(&parent).is_empty());
    // Its output (followed apart from the readiness check, so waited for).
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let more = logs.wait();
            if logs.since(0).iter().any(|l| l.text == "up web") {
                return;
            }
            more.await;
        }
    })
    .await
    .expect("its first line within 10 s");
    web.stop().await;
    assert!(p.labelled(NODE_LABEL, &node).await.unwrap().is_empty());

    // The node ends with a container running and nothing stopping it (the replica is
    // forgotten, as a node killed outright forgets it): the reaper, whose pipe closes with
    // the node's last hold on its Host, kills every process of it.
    let running = ContainerStart {
        host: host.clone(),
        realm: "com.alpha".into(),
        spec: spec("left", "exec sleep 600"),
        logs: LogLimits::default(),
        buffer: Arc::new(LogBuffer::new(10)),
        package: None,
    }
    .launch()
    .await
    .unwrap();
    let pids = running.cgroup().expect("its group").pids();
    assert!(!pids.is_empty());
    std::mem::forget(running);
    drop(p);
    drop(host);
    let alive: Vec<i32> = pids
        .iter()
        .copied()
        // Gone, or dead and not yet reaped by whichever process inherited it.
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
            })
        })
        .collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
    assert!(Cgroup::pids_below(&parent).is_empty());
    let v1_pids = Path::new("/sys/fs/cgroup/pids").join(parent.trim_start_matches('/'));
    let v2 = Path::new("/sys/fs/cgroup").join(parent.trim_start_matches('/'));
    assert!(!v1_pids.exists() && !v2.exists(), "its groups removed");

    // The node again: what its earlier run left is removed.
    let again = Host::new(cfg).unwrap();
    let p = again.podman().await.unwrap();
    assert!(p.labelled(NODE_LABEL, &node).await.unwrap().is_empty());
}
