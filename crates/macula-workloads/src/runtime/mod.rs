//! Runtimes: what runs a replica on a node. `process` runs a native command in its own control
//! groups, working directory and filesystem sandbox; Podman (through its REST socket) comes
//! next behind the same shape.
//!
//! A replica is started through a small *exec shim* (`macula-workload-exec`, or the `macula`
//! binary's hidden `__exec`): a fresh single-threaded process that joins the replica's control
//! groups, restricts itself with Landlock to the paths the spec allows, clears its environment
//! and `exec`s the command. Doing this in the shim rather than in a `pre_exec` hook keeps the
//! node's many threads (and their allocator locks) out of the forked child.

pub mod cgroup;
pub mod health;
pub mod podman;
pub mod process;
pub mod sandbox;
pub mod supervisor;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the shim needs to start one replica (passed to it as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The whole environment of the replica (nothing of the node's is inherited).
    pub env: BTreeMap<String, String>,
    /// Its working directory (read-write).
    pub workdir: PathBuf,
    /// The `cgroup.procs` files to join before anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// Paths it may read and execute (the system's programs and libraries).
    pub read_only: Vec<PathBuf>,
    /// Paths it may read and write besides its working directory.
    pub read_write: Vec<PathBuf>,
    /// Refuse to start where Landlock cannot be enforced (default); false runs unsandboxed
    /// with a warning on stderr.
    pub require_sandbox: bool,
}

/// The paths a native replica may read by default: programs, libraries, and the few files of
/// `/etc` and `/dev` that programs expect. Not the node's config or data directories, not
/// other replicas' working directories, not `/proc/<other pid>` beyond what the kernel shows.
pub fn default_read_only() -> Vec<PathBuf> {
    [
        "/bin",
        "/sbin",
        "/usr",
        "/lib",
        "/lib64",
        "/lib32",
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/localtime",
        "/etc/ssl",
        "/etc/ca-certificates",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/etc/nsswitch.conf",
        "/etc/passwd",
        "/etc/group",
        "/dev/null",
        "/dev/zero",
        "/dev/urandom",
        "/dev/random",
        "/proc/self",
        "/proc/cpuinfo",
        "/proc/meminfo",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect()
}
