//! Keeping one replica running on its node: restart by policy, with exponential back-off while
//! it keeps failing (shown as `BackOff`, as Kubernetes shows CrashLoopBackOff), and the end of a
//! job's run. Its health checks run beside it (`super::health`): a failing liveness check
//! restarts it as a failure; readiness is shown in its state. The slot's lease (held or lost) is the node's business; it stops the supervisor.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::cgroup::Cgroup;
use super::health::{self, Health};
use super::process::LogBuffer;
use super::{BoxFut, Replica};
use crate::manifest::{Restart, RestartPolicy};

/// Where a replica stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    Starting {
        restarts: u32,
    },
    Running {
        restarts: u32,
        /// Its readiness check passes (no check: as soon as it runs).
        ready: bool,
    },
    /// Failed; starts again after `delay` (`restarts` failures in a row so far).
    BackOff {
        restarts: u32,
        delay: Duration,
        last_exit: String,
    },
    /// A job's run (or a replica with `on_failure`/`never`) ended well.
    Succeeded,
    /// Ended badly and will not start again (`never`, or a job past its back-off limit).
    Failed {
        restarts: u32,
        last_exit: String,
    },
    /// Stopped by the node.
    Stopped,
}

impl ReplicaState {
    /// Whether the replica will not run again.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ReplicaState::Succeeded | ReplicaState::Failed { .. } | ReplicaState::Stopped
        )
    }
}

/// The delay before restart number `n` (1-based): `initial`, doubling, at most `max`.
pub fn backoff(restart: &Restart, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    restart
        .backoff_initial
        .checked_mul(factor)
        .unwrap_or(restart.backoff_max)
        .min(restart.backoff_max)
}

/// A running supervisor: its state, its output across restarts, and a way to stop it.
pub struct Supervised {
    pub state: watch::Receiver<ReplicaState>,
    pub logs: Arc<LogBuffer>,
    /// The control groups of the run now going (to read its CPU and memory).
    current: Arc<Mutex<Option<Cgroup>>>,
    stop: Arc<Notify>,
    /// Ends the current run (as a failure, with the reason kept), the supervisor going on.
    interrupt: Arc<(Notify, Mutex<Option<String>>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    /// The control groups of the replica's current run, if it runs in any.
    pub fn cgroup(&self) -> Option<Cgroup> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ends the replica's current run, as a failure saying `why`; the supervisor restarts it as
    /// after any failure (whose start may then refuse, for the same reason).
    pub fn interrupt(&self, why: String) {
        *self.interrupt.1.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        // Only a run under way (none waits otherwise): a later run is not cut short.
        self.interrupt.0.notify_waiters();
    }

    /// Stops the replica (every process of it) and the supervisor.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// Supervises the replica that `start` starts (called again for each restart, whatever
/// runtime it uses), checking its `health`. `backoff_limit`: for a job, the failed runs after which it fails (None for a
/// payload).
pub fn supervise<F>(
    restart: Restart,
    backoff_limit: Option<u32>,
    logs: Arc<LogBuffer>,
    health: Health,
    start: F,
) -> Supervised
where
    F: Fn(Arc<LogBuffer>) -> BoxFut<'static, std::io::Result<Box<dyn Replica>>> + Send + 'static,
{
    let (tx, rx) = watch::channel(ReplicaState::Starting { restarts: 0 });
    let stop = Arc::new(Notify::new());
    let interrupt = Arc::new((Notify::new(), Mutex::new(None::<String>)));
    let interrupt2 = interrupt.clone();
    let current = Arc::new(Mutex::new(None));
    let (stop2, logs2, current2) = (stop.clone(), logs.clone(), current.clone());
    let set_cgroup = move |cg: Option<Cgroup>| {
        *current2.lock().unwrap_or_else(|p| p.into_inner()) = cg;
    };
    let task = tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let _ = tx.send(ReplicaState::Starting { restarts: failures });
            let began = Instant::now();
            let exit = match start(logs2.clone()).await {
                Ok(mut r) => {
                    set_cgroup(r.cgroup());
                    let restarts = failures;
                    let ready = |ready| {
                        tx.send_if_modified(|s| {
                            let now = ReplicaState::Running { restarts, ready };
                            let changed = *s != now;
                            *s = now;
                            changed
                        });
                    };
                    ready(health.readiness.is_none());
                    let readiness = async {
                        let Some(p) = &health.readiness else {
                            return std::future::pending().await;
                        };
                        loop {
                            health::watch(p, &health.target, |r| {
                                if r.is_ok() {
                                    ready(true)
                                }
                            })
                            .await;
                            ready(false);
                        }
                    };
                    let liveness = async {
                        match &health.liveness {
                            Some(p) => health::watch(p, &health.target, |_| {}).await,
                            None => std::future::pending().await,
                        }
                    };
                    enum End {
                        Exited(Result<(), String>),
                        Unhealthy(String),
                        Interrupted,
                        Stop,
                    }
                    let end = tokio::select! {
                        status = r.wait() => End::Exited(status),
                        why = liveness => End::Unhealthy(why),
                        never = readiness => never,
                        _ = interrupt2.0.notified() => End::Interrupted,
                        _ = stop2.notified() => End::Stop,
                    };
                    let exit = match end {
                        End::Exited(status) => status,
                        End::Unhealthy(why) => {
                            r.kill().await;
                            Err(format!("liveness check failed: {why}"))
                        }
                        End::Interrupted => {
                            r.kill().await;
                            let why = interrupt2
                                .1
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .take()
                                .unwrap_or_default();
                            Err(format!("stopped: {why}"))
                        }
                        End::Stop => {
                            r.kill().await;
                            set_cgroup(None);
                            let _ = tx.send(ReplicaState::Stopped);
                            return;
                        }
                    };
                    set_cgroup(None);
                    exit
                }
                Err(e) => Err(e.to_string()),
            };
            let last_exit = match exit {
                Ok(()) if restart.policy != RestartPolicy::Always => {
                    let _ = tx.send(ReplicaState::Succeeded);
                    return;
                }
                Ok(()) => "exited 0".to_owned(),
                Err(e) => e,
            };
            // A replica that ran a whole back-off period well starts counting again.
            if began.elapsed() >= restart.backoff_max {
                failures = 0;
            }
            failures += 1;
            let give_up = restart.policy == RestartPolicy::Never
                || backoff_limit.is_some_and(|limit| failures > limit);
            if give_up {
                let _ = tx.send(ReplicaState::Failed {
                    restarts: failures - 1,
                    last_exit,
                });
                return;
            }
            let delay = backoff(&restart, failures);
            let _ = tx.send(ReplicaState::BackOff {
                restarts: failures,
                delay,
                last_exit,
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop2.notified() => {
                    let _ = tx.send(ReplicaState::Stopped);
                    return;
                }
            }
        }
    });
    Supervised {
        state: rx,
        logs,
        current,
        stop,
        interrupt,
        task,
    }
}
