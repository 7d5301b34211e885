//! A replica's control groups: CPU, memory and pids limits, and the way to stop all of its
//! processes. cgroup v2 where the host is unified; v1 (one hierarchy per controller) where it
//! is hybrid or legacy, as on these machines. Groups are made below the node's own group, so a
//! replica can never escape the limits the node runs under.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::manifest::Resources;

const ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// The CFS period the CPU quota is a share of.
const CPU_PERIOD_US: u64 = 100_000;

/// The control groups of one replica.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// v2: one directory; v1: one per controller (cpu, memory, pids).
    dirs: Vec<PathBuf>,
    v2: bool,
}

/// The node's own group in a hierarchy (`/proc/self/cgroup`): `controller` for v1, `""` for v2.
fn own_path(controller: &str) -> io::Result<String> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
        let (Some(ctrls), Some(path)) = (ctrls, path) else {
            continue;
        };
        let matches = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        if matches {
            return Ok(path.trim_start_matches('/').to_owned());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("this process is in no {controller:?} cgroup"),
    ))
}

/// The `cpuacct` group beside a v1 `cpu` group (the same path in that hierarchy; the same
/// directory where the two are mounted together).
fn acct_dir(cpu: &Path) -> Option<PathBuf> {
    let rel = cpu.strip_prefix(Path::new(ROOT).join("cpu")).ok()?;
    Some(Path::new(ROOT).join("cpuacct").join(rel))
}

/// SIGKILLs the processes `pids` names, again every 10 ms (up to `tries` times) until it names
/// none (a killed process leaves its group when the kernel has reaped it).
pub fn kill_until_empty(pids: impl Fn() -> Vec<i32>, tries: u32) {
    for _ in 0..tries {
        let now = pids();
        if now.is_empty() {
            return;
        }
        for p in now {
            // SAFETY: kill(2) with a pid read from a control group and a constant signal.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `top` and every directory below it, each before those below it.
fn dirs_below(top: PathBuf) -> Vec<PathBuf> {
    let mut all = vec![];
    let mut todo = vec![top];
    while let Some(d) = todo.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            todo.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        all.push(d);
    }
    all
}

/// Whether the host is cgroup v2 only (a unified hierarchy at the root).
pub fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

impl Cgroup {
    /// Makes the groups `macula/<name>` below the node's own and sets `limits`.
    pub fn create(name: &str, limits: &Resources) -> io::Result<Cgroup> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a cgroup name is one path segment",
            ));
        }
        let cg = if unified() {
            let own = Path::new(ROOT).join(own_path("")?);
            let parent = own.join("macula");
            fs::create_dir_all(&parent)?;
            // Controllers must be enabled down to the replica's group.
            let _ = write(&own.join("cgroup.subtree_control"), "+cpu +memory +pids");
            let _ = write(&parent.join("cgroup.subtree_control"), "+cpu +memory +pids");
            let dir = parent.join(name);
            fs::create_dir_all(&dir)?;
            Cgroup {
                dirs: vec![dir],
                v2: true,
            }
        } else {
            let mut dirs = vec![];
            for c in V1_CONTROLLERS {
                let dir = Path::new(ROOT)
                    .join(c)
                    .join(own_path(c)?)
                    .join("macula")
                    .join(name);
                fs::create_dir_all(&dir)?;
                dirs.push(dir);
            }
            // CPU time is counted by `cpuacct`, a hierarchy of its own on some hosts (as here):
            // the replica joins it too, where it is separate, to be measured.
            if let Some(acct) = acct_dir(&dirs[0]) {
                if acct != dirs[0] && fs::create_dir_all(&acct).is_ok() {
                    dirs.push(acct);
                }
            }
            Cgroup { dirs, v2: false }
        };
        cg.limit(limits)?;
        Ok(cg)
    }

    fn limit(&self, r: &Resources) -> io::Result<()> {
        let quota = r.cpu_millis as u64 * CPU_PERIOD_US / 1000;
        if self.v2 {
            let d = &self.dirs[0];
            write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            write(&d.join("memory.max"), &r.memory_bytes.to_string())?;
            let _ = write(&d.join("memory.swap.max"), "0");
            write(&d.join("pids.max"), &r.pids.to_string())?;
        } else {
            let (cpu, mem, pids) = (&self.dirs[0], &self.dirs[1], &self.dirs[2]);
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
            write(
                &mem.join("memory.limit_in_bytes"),
                &r.memory_bytes.to_string(),
            )?;
            // No swap beyond the limit, where the kernel accounts it.
            let memsw = mem.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                let _ = write(&memsw, &r.memory_bytes.to_string());
            }
            write(&pids.join("pids.max"), &r.pids.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid to, to join every group.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The processes in the group now.
    pub fn pids(&self) -> Vec<i32> {
        let file = self.dirs.last().map(|d| d.join("cgroup.procs"));
        file.and_then(|f| fs::read_to_string(f).ok())
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// The groups `create(name, ..)` made, if they exist (to read their usage).
    pub fn open(name: &str) -> Option<Cgroup> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        let cg = if unified() {
            Cgroup {
                dirs: vec![Path::new(ROOT)
                    .join(own_path("").ok()?)
                    .join("macula")
                    .join(name)],
                v2: true,
            }
        } else {
            let dirs = V1_CONTROLLERS
                .iter()
                .map(|c| {
                    own_path(c)
                        .ok()
                        .map(|own| Path::new(ROOT).join(c).join(own).join("macula").join(name))
                })
                .collect::<Option<Vec<_>>>()?;
            Cgroup { dirs, v2: false }
        };
        cg.dirs.iter().all(|d| d.exists()).then_some(cg)
    }

    /// The groups at `path` from each hierarchy's root (as Podman names a container's,
    /// `State.CgroupPath`), if they exist.
    pub fn at(path: &str) -> Option<Cgroup> {
        let rel = path.trim_start_matches('/');
        if rel.split('/').any(|p| p == "..") {
            return None;
        }
        let cg = if unified() {
            Cgroup {
                dirs: vec![Path::new(ROOT).join(rel)],
                v2: true,
            }
        } else {
            Cgroup {
                dirs: V1_CONTROLLERS
                    .iter()
                    .map(|c| Path::new(ROOT).join(c).join(rel))
                    .collect(),
                v2: false,
            }
        };
        cg.dirs.iter().all(|d| d.exists()).then_some(cg)
    }

    /// Every process in the groups at `path` and below (the pids hierarchy on v1).
    pub fn pids_below(path: &str) -> Vec<i32> {
        let rel = path.trim_start_matches('/');
        let top = if unified() {
            Path::new(ROOT).join(rel)
        } else {
            Path::new(ROOT).join("pids").join(rel)
        };
        dirs_below(top)
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Removes the groups at `path` and below that are empty, deepest first, in every
    /// hierarchy (Podman makes a container's in each v1 controller's).
    pub fn remove_below(path: &str) {
        let rel = path.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|p| p == "..") {
            return;
        }
        let tops: Vec<PathBuf> = if unified() {
            vec![Path::new(ROOT).join(rel)]
        } else {
            fs::read_dir(ROOT)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join(rel))
                .collect()
        };
        for top in tops {
            // Each directory comes before those below it: the reverse removes leaves first.
            for d in dirs_below(top).iter().rev() {
                let _ = fs::remove_dir(d);
            }
        }
    }

    /// CPU time the group used, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        if self.v2 {
            let text = fs::read_to_string(self.dirs[0].join("cpu.stat")).ok()?;
            let usec: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            Some(usec as f64 / 1e6)
        } else {
            let text = fs::read_to_string(self.dirs[0].join("cpuacct.usage"))
                .ok()
                .or_else(|| {
                    fs::read_to_string(acct_dir(&self.dirs[0])?.join("cpuacct.usage")).ok()
                })?;
            let ns: u64 = text.trim().parse().ok()?;
            Some(ns as f64 / 1e9)
        }
    }

    /// Memory the group uses now, in bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        let file = if self.v2 {
            self.dirs[0].join("memory.current")
        } else {
            self.dirs[1].join("memory.usage_in_bytes")
        };
        fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Kills every process of the group and removes the groups, off the async runtime's
    /// threads when called on one (the kernel reaps killed processes in its own time: the
    /// groups can only be removed once they are empty).
    pub fn destroy_soon(&self) {
        let cg = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || cg.destroy());
            }
            Err(_) => cg.destroy(),
        }
    }

    /// Kills every process of the group (SIGKILL) and removes the groups, waiting (up to a
    /// second) for the kernel to empty them. Blocks: see [`Cgroup::destroy_soon`].
    pub fn destroy(&self) {
        kill_until_empty(|| self.pids(), 100);
        for d in &self.dirs {
            let _ = fs::remove_dir(d);
        }
    }
}
