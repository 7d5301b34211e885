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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use macula_workloads::runtime::cgroup::Cgroup;
use macula_workloads::runtime::process::{LogLimits, ProcessReplica, Start};
use macula_workloads::runtime::{default_read_only, ExecSpec};
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
        },
        logs: LogLimits {
            file: Some(workdir.join("replica.log")),
            ..LogLimits::default()
        },
        buffer: None,
    })
    .await
    .context("starting a replica")?;
    let logs = r.logs();
    let took = tokio::time::timeout(Duration::from_secs(10), async {
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
    .map_err(|_| anyhow!("the replica printed nothing within 10 s"))??;
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

fn figures(name: &str, server: &'static str, mut us: Vec<f64>, note: &str) -> Vec<Figure> {
    us.sort_by(f64::total_cmp);
    ["p50", "p95", "p99"]
        .into_iter()
        .zip([0.50, 0.95, 0.99])
        .map(|(label, p)| Figure {
            scenario: format!("{name} {label}"),
            server,
            value: percentile(&us, p) / 1000.0,
            unit: "ms",
            note: note.to_owned(),
        })
        .collect()
}

pub async fn run(starts: usize) -> Result<Vec<Figure>> {
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
    let mut figs = figures(
        "replica start",
        "macula",
        replica.clone(),
        &format!("{starts} starts of sh -c 'echo up', to its first line: {what}"),
    );
    figs.extend(figures(
        "plain spawn",
        "floor",
        plain.clone(),
        &format!("{starts} spawns of the same command with stdout piped"),
    ));
    replica.sort_by(f64::total_cmp);
    plain.sort_by(f64::total_cmp);
    figs.push(Figure {
        scenario: "replica start / plain spawn p50".into(),
        server: "ratio",
        value: percentile(&replica, 0.5) / percentile(&plain, 0.5).max(1.0),
        unit: "x",
        note: "goal: replica start p95 ≤ 50 ms".into(),
    });
    Ok(figs)
}
