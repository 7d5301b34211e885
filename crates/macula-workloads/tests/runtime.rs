//! The native runtime against the real kernel: control groups, the Landlock sandbox, the
//! environment, output bounds. Needs permission to make control groups (root, or a delegated
//! cgroup v2 subtree) and Landlock; says SKIPPED otherwise.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use macula_workloads::runtime::cgroup::Cgroup;
use macula_workloads::runtime::process::{LogLimits, ProcessReplica, Start, Stream};
use macula_workloads::runtime::{default_read_only, on_path, ExecSpec};
use macula_workloads::Resources;

mod common;

const SHIM: &str = env!("CARGO_BIN_EXE_macula-workload-exec");

fn usable(name: &str) -> bool {
    match Cgroup::create(name, &Resources::default()) {
        Ok(cg) => cg.destroy(),
        Err(e) => {
            eprintln!("SKIPPED: cannot make control groups here ({e}); CI runs as root");
            return false;
        }
    }
    // Landlock: the shim refuses to run a replica unsandboxed.
    let probe = std::process::Command::new(SHIM)
        .env_clear()
        .env(
            "MACULA_EXEC_SPEC",
            serde_json::to_string(&spec(&std::env::temp_dir(), "true", &[])).unwrap(),
        )
        .output()
        .expect("the shim runs");
    if !probe.status.success() {
        eprintln!(
            "SKIPPED: the sandbox is not available here: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        return false;
    }
    true
}

fn spec(workdir: &Path, script: &str, env: &[(&str, &str)]) -> ExecSpec {
    let mut e: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    e.insert("PATH".into(), "/usr/bin:/bin".into());
    ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: e,
        workdir: workdir.to_path_buf(),
        cgroup_procs: vec![],
        read_only: default_read_only(),
        read_write: vec![],
        require_sandbox: true,
        network_none: false,
        hidden: vec![],
    }
}

async fn run(
    name: &str,
    limits: Resources,
    spec: ExecSpec,
    logs: LogLimits,
) -> (std::process::ExitStatus, ProcessReplica) {
    let mut r = ProcessReplica::start(Start {
        shim: PathBuf::from(SHIM),
        shim_args: vec![],
        name: name.to_owned(),
        limits,
        require_limits: true,
        spec,
        logs,
        buffer: None,
    })
    .await
    .expect("started");
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), r.wait())
        .await
        .expect("ended in time")
        .expect("waited");
    (status, r)
}

fn text(r: &ProcessReplica, stream: Stream) -> Vec<String> {
    r.logs()
        .since(0)
        .into_iter()
        .filter(|l| l.stream == stream)
        .map(|l| l.text)
        .collect()
}

#[tokio::test]
async fn a_replica_sees_only_its_environment_and_its_own_files() {
    let name = format!("test-env-{}", std::process::id());
    if !usable(&name) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // What the node keeps next to its replicas: trust keys, the registry database, counters.
    let node_data = tmp.path().join("node");
    std::fs::create_dir_all(&node_data).unwrap();
    std::fs::write(node_data.join("operator.key"), "the node's secret").unwrap();
    let other = tmp.path().join("replicas/other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("data"), "another replica's").unwrap();
    let workdir = tmp.path().join("replicas/mine");
    // The node's own environment must not leak (set here, in the test process).
    std::env::set_var("MACULA_REGISTRY_KEK", "node-only");
    let script = format!(
        "echo \"env:$(env | cut -d= -f1 | sort | tr '\\n' ' ')\"; \
         cat {0}/operator.key || echo denied-node; \
         cat {1}/data || echo denied-other; \
         echo mine > own.txt && cat own.txt; \
         echo x > {0}/planted || echo denied-write",
        node_data.display(),
        other.display()
    );
    let (status, r) = run(
        &name,
        Resources::default(),
        spec(&workdir, &script, &[("GREETING", "hi")]),
        LogLimits::default(),
    )
    .await;
    assert!(status.success(), "{status:?} {:?}", r.logs().since(0));
    let out = text(&r, Stream::Stdout);
    let env_line = out.iter().find(|l| l.starts_with("env:")).unwrap();
    assert_eq!(
        env_line.trim(),
        "env:GREETING PATH PWD",
        "only what the spec gives (and sh's PWD)"
    );
    assert!(out.contains(&"denied-node".to_string()), "{out:?}");
    assert!(out.contains(&"denied-other".to_string()), "{out:?}");
    assert!(out.contains(&"mine".to_string()), "{out:?}");
    assert!(out.contains(&"denied-write".to_string()), "{out:?}");
    assert!(!node_data.join("planted").exists());
    assert!(!out
        .iter()
        .any(|l| l.contains("the node's secret") || l.contains("another replica's")));
}

/// `network: none`: a replica in a network namespace of its own reaches nothing of the host's
/// (not even its loopback: a service the node runs there), while one without it does. (Its
/// output to /dev/null is allowed by the sandbox: the devices that reach nothing are open.)
#[tokio::test]
async fn a_replica_without_a_network_reaches_nothing_on_the_host() {
    let name = format!("test-net-{}", std::process::id());
    if !usable(&name) {
        return;
    }
    let Some(bash) = on_path("bash") else {
        eprintln!("SKIPPED: no bash for /dev/tcp");
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let script = format!(
        "{} -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo reached || echo unreachable",
        bash.display()
    );
    for (none, expect) in [(false, "reached"), (true, "unreachable")] {
        let mut s = spec(tmp.path(), &script, &[]);
        s.network_none = none;
        let (status, r) = run(
            &format!("{name}-{none}"),
            Resources::default(),
            s,
            LogLimits::default(),
        )
        .await;
        assert!(status.success(), "{status:?} {:?}", r.logs().since(0));
        assert_eq!(
            text(&r, Stream::Stdout),
            [expect],
            "network_none: {none}; {:?}",
            text(&r, Stream::Stderr)
        );
    }
    drop(listener);
}

/// The node's private paths (its Podman service's socket drives Podman as root, which Landlock
/// cannot keep a process from connecting to) are hidden from a replica; and a replica cannot
/// signal the node (Landlock's signal scope, Linux 6.12 and later).
#[tokio::test]
async fn a_replica_cannot_reach_the_nodes_podman_socket_or_signal_the_node() {
    let name = format!("test-hide-{}", std::process::id());
    if !usable(&name) {
        return;
    }
    // The system's (the sandbox lets a replica run only what is in the system's directories;
    // a python3 first on PATH may be a shim in someone's home).
    let Some(python) = ["/usr/bin/python3", "/bin/python3"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
    else {
        eprintln!("SKIPPED: no python3 to connect to a unix socket with");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let private = tmp.path().join("podman");
    std::fs::create_dir_all(&private).unwrap();
    let socket = private.join("podman.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let script = format!(
        "{} -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' {} \
         2>/dev/null && echo connected || echo refused; \
         kill -0 {} 2>/dev/null && echo signalled || echo no-signal",
        python.display(),
        socket.display(),
        std::process::id()
    );
    // Landlock's ABI on this kernel (6 and later scope signals).
    // SAFETY: landlock_create_ruleset(2) with LANDLOCK_CREATE_RULESET_VERSION only asks.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    let work = tmp.path().join("work");
    for (hidden, expect) in [(vec![], "connected"), (vec![private.clone()], "refused")] {
        let mut s = spec(&work, &script, &[]);
        s.hidden = hidden.clone();
        let (status, r) = run(
            &format!("{name}-{}", hidden.len()),
            Resources::default(),
            s,
            LogLimits::default(),
        )
        .await;
        assert!(status.success(), "{status:?} {:?}", r.logs().since(0));
        let out = text(&r, Stream::Stdout);
        assert_eq!(out[0], expect, "hidden: {hidden:?}: {out:?}");
        if abi >= 6 {
            assert_eq!(out[1], "no-signal", "{out:?}");
        } else {
            eprintln!("SKIPPED (signals): Landlock ABI {abi} does not scope them");
        }
    }
    assert!(socket.exists(), "hidden only from the replica");
}

#[tokio::test]
async fn a_replica_over_its_memory_is_killed() {
    let name = format!("test-mem-{}", std::process::id());
    if !usable(&name) || !Path::new("/usr/bin/python3").exists() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let limits = Resources {
        cpu_millis: 1000,
        memory_bytes: 64 << 20,
        pids: 64,
    };
    let mut s = spec(
        tmp.path(),
        "exec /usr/bin/python3 -c 'b = bytearray(400 << 20); print(\"allocated\")'",
        &[],
    );
    s.argv = vec!["/bin/sh".into(), "-c".into(), s.argv[2].clone()];
    let (status, r) = run(&name, limits, s, LogLimits::default()).await;
    assert_eq!(
        status.signal(),
        Some(9),
        "killed by the OOM killer: {status:?} {:?}",
        r.logs().since(0)
    );
    assert!(!text(&r, Stream::Stdout).contains(&"allocated".to_string()));
}

#[tokio::test]
async fn a_replica_cannot_fork_past_its_pids() {
    let name = format!("test-pids-{}", std::process::id());
    if !usable(&name) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let limits = Resources {
        cpu_millis: 1000,
        memory_bytes: 128 << 20,
        pids: 8,
    };
    let (_, r) = run(
        &name,
        limits,
        spec(tmp.path(), "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do sleep 1 & done; wait; echo finished", &[]),
        LogLimits::default(),
    )
    .await;
    let err = text(&r, Stream::Stderr).join("\n");
    assert!(
        err.to_lowercase().contains("fork"),
        "forks past pids.max fail: {err:?}"
    );
}

#[tokio::test]
async fn kill_stops_every_process_of_the_replica() {
    let name = format!("test-kill-{}", std::process::id());
    if !usable(&name) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut r = ProcessReplica::start(Start {
        shim: PathBuf::from(SHIM),
        shim_args: vec![],
        name: name.clone(),
        buffer: None,
        limits: Resources::default(),
        require_limits: true,
        spec: spec(
            tmp.path(),
            // A duration no other test here uses: the check below looks at every process.
            "sleep 307 & sleep 307 & echo started; wait",
            &[],
        ),
        logs: LogLimits::default(),
    })
    .await
    .unwrap();
    let logs = r.logs();
    while logs.written() == 0 {
        logs.wait().await;
    }
    r.kill();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), r.wait())
        .await
        .expect("the replica ended when killed")
        .unwrap();
    assert_eq!(status.signal(), Some(9));
    let procs = PathBuf::from("/proc");
    let sleepers = std::fs::read_dir(&procs)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c.starts_with("sleep\u{0}307"))
        .count();
    assert_eq!(sleepers, 0, "the background sleeps went with it");
}

#[tokio::test]
async fn flooding_output_costs_a_bounded_amount() {
    let name = format!("test-logs-{}", std::process::id());
    if !usable(&name) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("replica.log");
    let logs = LogLimits {
        lines: 100,
        line_bytes: 1024,
        file: Some(file.clone()),
        file_bytes: 64 << 10,
    };
    let (status, r) = run(
        &name,
        Resources::default(),
        spec(
            &tmp.path().join("w"),
            "yes 0123456789 | head -n 50000; head -c 100000 /dev/zero | tr '\\0' a; echo",
            &[],
        ),
        logs,
    )
    .await;
    assert!(status.success());
    let kept = r.logs().since(0);
    assert_eq!(kept.len(), 100, "the ring keeps its lines, no more");
    assert_eq!(r.logs().written(), 50_001);
    let long = &kept.last().unwrap().text;
    assert!(
        long.ends_with('…') && long.len() <= 1024 + 3,
        "a long line is cut: {}",
        long.len()
    );
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    assert!(size(&file) <= 64 << 10, "{}", size(&file));
    assert!(
        size(&file.with_extension("log.1")) > 0 && size(&file.with_extension("log.1")) <= 64 << 10
    );
}

mod supervised {
    use super::common::until;
    use super::*;
    use macula_workloads::runtime::health::{Health, Target};
    use macula_workloads::runtime::process::LogBuffer;
    use macula_workloads::runtime::supervisor::{supervise, ReplicaState};
    use macula_workloads::runtime::{BoxFut, Replica};
    use macula_workloads::{Check, PortRef, Probe, Restart, RestartPolicy};
    use std::sync::Arc;
    use std::time::Duration;

    fn restart(policy: RestartPolicy) -> Restart {
        Restart {
            policy,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
        }
    }

    fn starter(
        name: String,
        dir: PathBuf,
        script: &'static str,
    ) -> impl Fn(Arc<LogBuffer>) -> BoxFut<'static, std::io::Result<Box<dyn Replica>>> + Send + 'static
    {
        move |buffer| {
            Start {
                shim: PathBuf::from(SHIM),
                shim_args: vec![],
                name: name.clone(),
                limits: Resources::default(),
                require_limits: true,
                spec: spec(&dir, script, &[]),
                logs: LogLimits::default(),
                buffer: Some(buffer),
            }
            .launch()
        }
    }

    #[tokio::test]
    async fn a_crashing_replica_backs_off_longer_each_time() {
        let name = format!("test-crash-{}", std::process::id());
        if !usable(&name) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let logs = Arc::new(LogBuffer::new(100));
        let mut sup = supervise(
            restart(RestartPolicy::Always),
            None,
            logs.clone(),
            Health::default(),
            starter(name, tmp.path().into(), "echo run; exit 3"),
        );
        let mut delays = vec![];
        while delays.len() < 4 {
            if let ReplicaState::BackOff { delay, restarts, last_exit } =
                until(&mut sup.state, |s| matches!(s, ReplicaState::BackOff { restarts, .. } if *restarts as usize == delays.len() + 1)).await
            {
                assert!(last_exit.contains('3'), "{last_exit}");
                assert_eq!(restarts as usize, delays.len() + 1);
                delays.push(delay.as_millis());
            }
        }
        assert_eq!(delays, [50, 100, 200, 400], "doubling, capped");
        assert!(
            logs.since(0).iter().filter(|l| l.text == "run").count() >= 4,
            "output kept across restarts"
        );
        sup.stop().await;
    }

    #[tokio::test]
    async fn a_job_run_succeeds_or_fails_past_its_limit() {
        let name = format!("test-job-{}", std::process::id());
        if !usable(&name) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let logs = Arc::new(LogBuffer::new(100));
        let mut sup = supervise(
            restart(RestartPolicy::OnFailure),
            Some(2),
            logs.clone(),
            Health::default(),
            starter(name.clone(), tmp.path().into(), "echo try; exit 1"),
        );
        let end = until(&mut sup.state, ReplicaState::is_final).await;
        assert!(
            matches!(end, ReplicaState::Failed { restarts: 2, .. }),
            "{end:?}"
        );
        assert_eq!(
            logs.since(0).iter().filter(|l| l.text == "try").count(),
            3,
            "the first run and 2 retries"
        );
        let mut ok = supervise(
            restart(RestartPolicy::OnFailure),
            Some(2),
            Arc::new(LogBuffer::new(10)),
            Health::default(),
            starter(name, tmp.path().into(), "true"),
        );
        assert_eq!(
            until(&mut ok.state, ReplicaState::is_final).await,
            ReplicaState::Succeeded
        );
    }

    #[tokio::test]
    async fn stopping_ends_a_running_or_waiting_replica() {
        let name = format!("test-stop-{}", std::process::id());
        if !usable(&name) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut sup = supervise(
            restart(RestartPolicy::Always),
            None,
            Arc::new(LogBuffer::new(10)),
            Health::default(),
            starter(name, tmp.path().into(), "sleep 300"),
        );
        until(&mut sup.state, |s| {
            matches!(s, ReplicaState::Running { .. })
        })
        .await;
        let mut rx = sup.state.clone();
        tokio::time::timeout(Duration::from_secs(10), sup.stop())
            .await
            .expect("stopped in time");
        assert_eq!(*rx.borrow_and_update(), ReplicaState::Stopped);
    }

    fn probe(check: Check) -> Probe {
        Probe {
            check,
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            failure_threshold: 3,
        }
    }

    #[tokio::test]
    async fn a_replica_is_ready_once_its_readiness_check_passes() {
        let name = format!("test-ready-{}", std::process::id());
        if !usable(&name) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir: PathBuf = tmp.path().into();
        // Ready once it made a file in its working directory (an exec check run as it).
        let health = Health {
            readiness: Some(probe(Check::Exec {
                command: vec!["test".into(), "-f".into(), "ready".into()],
            })),
            target: Target {
                shim: PathBuf::from(SHIM),
                spec: Some(spec(&dir, "", &[])),
                ..Target::default()
            },
            ..Health::default()
        };
        let mut sup = supervise(
            restart(RestartPolicy::Always),
            None,
            Arc::new(LogBuffer::new(10)),
            health,
            starter(name, dir, "sleep 0.5; touch ready; sleep 300"),
        );
        let first = until(&mut sup.state, |s| {
            matches!(s, ReplicaState::Running { .. })
        })
        .await;
        assert_eq!(
            first,
            ReplicaState::Running {
                restarts: 0,
                ready: false
            }
        );
        until(&mut sup.state, |s| {
            *s == ReplicaState::Running {
                restarts: 0,
                ready: true,
            }
        })
        .await;
        sup.stop().await;
    }

    #[tokio::test]
    async fn a_replica_failing_its_liveness_check_is_restarted() {
        let name = format!("test-live-{}", std::process::id());
        if !usable(&name) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        // Nothing listens on the port the check names.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let health = Health {
            liveness: Some(probe(Check::Tcp {
                port: PortRef::Named("http".into()),
            })),
            target: Target {
                ports: [("http".to_owned(), port)].into(),
                ..Target::default()
            },
            ..Health::default()
        };
        let mut sup = supervise(
            restart(RestartPolicy::Always),
            None,
            Arc::new(LogBuffer::new(10)),
            health,
            starter(name, tmp.path().into(), "sleep 300"),
        );
        let s = until(&mut sup.state, |s| {
            matches!(s, ReplicaState::BackOff { .. })
        })
        .await;
        let ReplicaState::BackOff {
            last_exit,
            restarts,
            ..
        } = s
        else {
            unreachable!()
        };
        assert_eq!(restarts, 1);
        assert!(
            last_exit.contains("liveness check failed") && last_exit.contains(&port.to_string()),
            "{last_exit}"
        );
        assert!(last_exit.contains("3 times in a row"), "{last_exit}");
        sup.stop().await;
    }
}

/// The checks themselves, against a real HTTP server and a closed port.
#[tokio::test]
async fn http_and_tcp_checks_tell_a_good_answer_from_a_bad_one() {
    use macula_workloads::runtime::health::{check, Target};
    use macula_workloads::{Check, PortRef};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let answer = if req.starts_with("GET /healthz ") {
                "HTTP/1.0 200 OK\r\n\r\nok"
            } else if req.starts_with("GET /slow ") {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                "HTTP/1.0 200 OK\r\n\r\n"
            } else {
                "HTTP/1.0 503 Service Unavailable\r\n\r\n"
            };
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let target = Target {
        ports: [("http".to_owned(), port)].into(),
        ..Target::default()
    };
    let t = std::time::Duration::from_millis(500);
    let http = |path: &str| Check::Http {
        path: path.into(),
        port: PortRef::Named("http".into()),
    };
    assert_eq!(check(&http("/healthz"), &target, t).await, Ok(()));
    let bad = check(&http("/down"), &target, t).await.unwrap_err();
    assert!(bad.contains("503"), "{bad}");
    let slow = check(&http("/slow"), &target, t).await.unwrap_err();
    assert!(slow.contains("no answer within"), "{slow}");
    let tcp = Check::Tcp {
        port: PortRef::Number(port),
    };
    assert_eq!(check(&tcp, &target, t).await, Ok(()));
    let unknown = check(
        &Check::Tcp {
            port: PortRef::Named("admin".into()),
        },
        &target,
        t,
    )
    .await
    .unwrap_err();
    assert!(unknown.contains("no port named"), "{unknown}");
}
