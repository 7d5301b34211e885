//! `macula-bench start`: how long a native replica takes to start (goal p95 ≤ 50 ms), side by
//! side with the floor of starting the same command as a plain child process.
//!
//! A replica starts as a node starts one: its control groups made with CPU, memory and pids
//! limits, the exec shim (this program's `__exec`) joining them, Landlock, a cleared
//! environment, then `exec` of the command, its output piped into the log buffer. The command
//! is `sh -c 'echo up'`; a start is timed from the call until its first line reaches the log
//! buffer (the command is running and its output flows). The floor is `sh -c 'echo up'`
//! spawned with its stdout piped and read to the first line. Each replica is killed and its
//! groups removed before the next.
//!
//! Containers (where podman and runc are installed): a replica started as a node starts one
//! through its Podman service (`Host`; the image made sure of, the container created with its
//! limits and started, its output followed), timed to its first line, beside `podman run` of
//! the same image and command from the CLI on the same store (what an operator types by hand).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use macula_workloads::runtime::cgroup::Cgroup;
use macula_workloads::runtime::container::{busybox_rootfs_tar, ContainerStart, Host, HostConfig};
use macula_workloads::runtime::podman::ContainerSpec;
use macula_workloads::runtime::process::{LogBuffer, LogLimits, ProcessReplica, Start};
use macula_workloads::runtime::{default_read_only, on_path, ExecSpec};
use macula_workloads::Resources;

use crate::{percentile, Figure};

const SCRIPT: &str = "echo up; exec sleep 30";

/// One replica start: from the call to its first line of output.
async fn replica_start(
    shim: &std::path::Path,
    dir: &std::path::Path,
    i: usize,
    limits: bool,
) -> Result<Duration> {
    let workdir = dir.join(format!("r{i}"));
    std::fs::create_dir_all(&workdir)?;
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), "/usr/bin:/bin".to_owned());
    let resources = Resources {
        cpu_millis: 500,
        memory_bytes: 64 << 20,
        pids: 64,
    };
    let t = Instant::now();
    let mut r = ProcessReplica::start(Start {
        shim: shim.to_path_buf(),
        shim_args: vec!["__exec".into()],
        name: format!("bench-start-{}-{i}", std::process::id()),
        limits: resources,
        require_limits: limits,
        spec: ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
            env,
            workdir: workdir.clone(),
            cgroup_procs: vec![],
            read_only: default_read_only(),
            read_write: vec![],
            require_sandbox: limits,
            network_none: false,
            hidden: vec![],
        },
        logs: LogLimits {
            file: Some(workdir.join("replica.log")),
            ..LogLimits::default()
        },
        buffer: None,
    })
    .await
    .context("starting a replica")?;
    let took = first_line(&r.logs(), t).await?;
    r.kill();
    let _ = r.wait().await;
    Ok(took)
}

/// The floor: the same command as a plain child with its stdout piped.
async fn plain_start() -> Result<Duration> {
    use tokio::io::AsyncBufReadExt;
    let t = Instant::now();
    let mut child = tokio::process::Command::new("/bin/sh")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let line = tokio::io::BufReader::new(out).lines().next_line().await?;
    let took = t.elapsed();
    if line.as_deref() != Some("up") {
        return Err(anyhow!("the command said {line:?}"));
    }
    child.kill().await?;
    Ok(took)
}

/// One series of start times (µs): its name, who ran it, the times, what they measured.
type Series = (&'static str, &'static str, Vec<f64>, String);

/// Two series run side by side: p50, p95 and p99 of each, and the ratio of their p50s.
fn side_by_side(a: Series, b: Series, ratio_note: &str) -> Vec<Figure> {
    let scenario = format!("{} / {} p50", a.0, b.0);
    let mut figs = vec![];
    let mut p50 = vec![];
    for (name, server, mut us, note) in [a, b] {
        us.sort_by(f64::total_cmp);
        p50.push(percentile(&us, 0.5));
        for (label, p) in [("p50", 0.50), ("p95", 0.95), ("p99", 0.99)] {
            figs.push(Figure {
                scenario: format!("{name} {label}"),
                server,
                value: percentile(&us, p) / 1000.0,
                unit: "ms",
                note: note.clone(),
            });
        }
    }
    figs.push(Figure {
        scenario,
        server: "ratio",
        value: p50[0] / p50[1].max(1.0),
        unit: "x",
        note: ratio_note.to_owned(),
    });
    figs
}

const IMAGE: &str = "localhost/macula-bench:1";

/// Waits (up to 30 s) for the first line in `logs` to be `up`; when it came.
async fn first_line(logs: &LogBuffer, t: Instant) -> Result<Duration> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let more = logs.wait();
            if let Some(line) = logs.since(0).first() {
                if line.text != "up" {
                    return Err(anyhow!("the replica said {:?}", line.text));
                }
                return Ok(t.elapsed());
            }
            more.await;
        }
    })
    .await
    .map_err(|_| anyhow!("the replica printed nothing within 30 s"))?
}

/// Container starts through a node's Podman beside `podman run`; none (and why) where
/// containers cannot run here.
async fn containers(
    shim: &std::path::Path,
    dir: &std::path::Path,
    starts: usize,
) -> Result<Vec<Figure>> {
    let (Some(program), Some(_)) = (on_path("podman"), on_path("runc")) else {
        eprintln!("note: no podman and runc here: no container figures");
        return Ok(vec![]);
    };
    let rootfs = match busybox_rootfs_tar(dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("note: no image for container figures: {e}");
            return Ok(vec![]);
        }
    };
    let node = format!("bench{}", std::process::id());
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let host = Host::new(HostConfig {
        program: program.clone(),
        dir: dir.join("podman"),
        images: vec![images.clone()],
        node: node.clone(),
        reaper: Some((shim.to_path_buf(), vec!["__exec".into()])),
    })?;
    let p = host.podman().await.context("starting Podman")?;
    // As an operator would: an archive in the node's images directory.
    p.import(rootfs.into(), IMAGE, &["ENV PATH=/bin"]).await?;
    std::fs::write(images.join("bench.tar"), p.save(IMAGE).await?)?;
    let limits = Resources {
        cpu_millis: 500,
        memory_bytes: 64 << 20,
        pids: 64,
    };
    let ours = |i: usize| {
        let (host, node) = (host.clone(), node.clone());
        async move {
            let buffer = std::sync::Arc::new(LogBuffer::new(16));
            let t = Instant::now();
            let mut r = ContainerStart {
                host,
                realm: "com.example.bench".into(),
                spec: ContainerSpec {
                    name: format!("bench-{node}-{i}"),
                    image: IMAGE.into(),
                    command: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
                    limits,
                    host_network: true,
                    ..ContainerSpec::default()
                },
                logs: LogLimits::default(),
                buffer: buffer.clone(),
                package: None,
            }
            .launch()
            .await
            .context("starting a container replica")?;
            let took = first_line(&buffer, t).await;
            r.kill().await;
            took
        }
    };
    // The CLI on the same store (the service's storage and run root).
    let store = dir.join("podman");
    let cli = |i: usize| {
        let (program, store, p) = (program.clone(), store.clone(), p.clone());
        async move {
            use tokio::io::AsyncBufReadExt;
            let name = format!("bench-cli-{i}-{}", std::process::id());
            let t = Instant::now();
            let mut child = tokio::process::Command::new(&program)
                .arg("--root")
                .arg(store.join("storage"))
                .arg("--runroot")
                .arg(store.join("run"))
                .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
                .args(["--events-backend", "file", "run", "--name", &name])
                .args(["--network", "host", "--memory", "64m", "--cpus", "0.5"])
                .args([
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=4096:4096",
                ])
                .args([
                    "--cap-drop",
                    "all",
                    "--pids-limit",
                    "64",
                    IMAGE,
                    "/bin/sh",
                    "-c",
                    SCRIPT,
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let out = child.stdout.take().context("stdout")?;
            let line = tokio::time::timeout(
                Duration::from_secs(30),
                tokio::io::BufReader::new(out).lines().next_line(),
            )
            .await
            .map_err(|_| anyhow!("podman run printed nothing within 30 s"))??;
            let took = t.elapsed();
            p.remove(&name).await?;
            let out = child.wait_with_output().await?;
            if line.as_deref() != Some("up") {
                return Err(anyhow!(
                    "podman run said {line:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok::<_, anyhow::Error>(took)
        }
    };
    for i in 0..2 {
        ours(i).await?;
        cli(i).await?;
    }
    let (mut a, mut b) = (vec![], vec![]);
    for i in 0..starts {
        a.push(ours(100 + i).await?.as_secs_f64() * 1e6);
        b.push(cli(100 + i).await?.as_secs_f64() * 1e6);
    }
    Ok(side_by_side(
        ("container replica start", "macula", a, format!(
            "{starts} starts through the node's Podman (runc; limits, every capability dropped), to the first line"
        )),
        ("podman run", "podman", b, format!(
            "{starts} runs of the same image and command from the podman CLI"
        )),
        "below 1: faster than the CLI",
    ))
}

pub async fn run(starts: usize, container_starts: usize) -> Result<Vec<Figure>> {
    let shim = std::env::current_exe().context("finding this program (the exec shim)")?;
    let dir = tempfile::tempdir()?;
    // Control groups and Landlock where the machine allows them (as root here); otherwise the
    // figure is of a start without them, and says so.
    let limits = match Cgroup::create(
        &format!("bench-probe-{}", std::process::id()),
        &Resources::default(),
    ) {
        Ok(cg) => {
            cg.destroy();
            true
        }
        Err(e) => {
            eprintln!("note: no control groups here ({e}): replicas start without limits");
            false
        }
    };
    // Warm-up (page cache, the shim's first load).
    for i in 0..5 {
        replica_start(&shim, dir.path(), i, limits).await?;
        plain_start().await?;
    }
    let (mut replica, mut plain) = (vec![], vec![]);
    // Interleaved, so that both see the same machine.
    for i in 0..starts {
        replica.push(
            replica_start(&shim, dir.path(), 100 + i, limits)
                .await?
                .as_secs_f64()
                * 1e6,
        );
        plain.push(plain_start().await?.as_secs_f64() * 1e6);
    }
    let what = if limits {
        "control groups (CPU, memory, pids), Landlock, cleared environment, output captured"
    } else {
        "no control groups or Landlock on this machine; output captured"
    };
    let mut figs = side_by_side(
        (
            "replica start",
            "macula",
            replica,
            format!("{starts} starts of sh -c 'echo up', to its first line: {what}"),
        ),
        (
            "plain spawn",
            "floor",
            plain,
            format!("{starts} spawns of the same command with stdout piped"),
        ),
        "goal: replica start p95 ≤ 50 ms",
    );
    if container_starts > 0 {
        figs.extend(containers(&shim, dir.path(), container_starts).await?);
    }
    Ok(figs)
}
