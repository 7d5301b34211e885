//! The Podman runtime's client against a real Podman service (runc, its own storage in a
//! temporary directory): an image imported from a root filesystem tar (no registry), a container
//! with limits that runs, writes to both streams, exits with its code; the limits, the dropped
//! capabilities and the read-only root are in force; its output is followed as it comes; a
//! running container is removed. Needs `podman`, `runc` and a static busybox (Debian's
//! `busybox-static`; `.ci/run` installs them); says SKIPPED otherwise.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use macula_workloads::runtime::podman::{ContainerSpec, Line, Podman};
use macula_workloads::runtime::process::Stream;
use macula_workloads::Resources;

/// A root filesystem with a static busybox and its applets, as a tar.
fn busybox_rootfs(dir: &Path) -> Option<Vec<u8>> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    // Only a static one runs in an image with no libraries.
    let file = std::process::Command::new("sh")
        .args(["-c", &format!("ldd {busybox} 2>&1")])
        .output()
        .ok()?;
    if !String::from_utf8_lossy(&file.stdout).contains("not a dynamic") {
        return None;
    }
    let root = dir.join("rootfs");
    for d in ["bin", "tmp", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).ok()?;
    }
    std::fs::copy(busybox, root.join("bin/busybox")).ok()?;
    for applet in ["sh", "echo", "sleep", "cat", "id", "touch", "grep", "yes"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).ok()?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").ok()?;
    let tar = dir.join("rootfs.tar");
    let ok = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .ok()?
        .success();
    ok.then(|| std::fs::read(&tar).ok()).flatten()
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_limited_and_unprivileged_and_its_output_is_read() {
    let (Some(podman), Some(_)) = (which("podman"), which("runc")) else {
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
