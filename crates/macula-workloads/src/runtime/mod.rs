//! Runtimes: what runs a replica on a node, behind one trait ([`Replica`], started by a
//! [`Launch`]). `process` runs a native command in its own control groups, working directory
//! and filesystem sandbox; `podman` runs an OCI image as a container through Podman's REST
//! socket ([`container`]). The supervisor (restarts, back-off, health checks) and the node's
//! controller see only the trait.
//!
//! A replica is started through a small *exec shim* (`macula-workload-exec`, or the `macula`
//! binary's hidden `__exec`): a fresh single-threaded process that joins the replica's control
//! groups, restricts itself with Landlock to the paths the spec allows, clears its environment
//! and `exec`s the command. Doing this in the shim rather than in a `pre_exec` hook keeps the
//! node's many threads (and their allocator locks) out of the forked child.

pub mod cgroup;
pub mod container;
pub mod health;
pub mod podman;
pub mod process;
pub mod sandbox;
pub mod supervisor;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A boxed future (the trait's methods are called through `dyn`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One run of a replica, whatever runs it.
pub trait Replica: Send {
    /// Waits for it to end: `Ok` when it exited 0, else how it ended ("exit status: 3",
    /// "signal: 9 (SIGKILL)"). Its output is read to the end first.
    fn wait(&mut self) -> BoxFut<'_, Result<(), String>>;
    /// Stops it and every process it started (`wait` then returns).
    fn kill(&mut self) -> BoxFut<'_, ()>;
    /// Its control groups, to read its CPU and memory (None where it has none).
    fn cgroup(&self) -> Option<cgroup::Cgroup>;
}

/// Starts one run of a replica, its output into the given buffer (the supervisor calls it again
/// for each restart).
pub type Launch = Box<
    dyn Fn(Arc<process::LogBuffer>) -> BoxFut<'static, io::Result<Box<dyn Replica>>> + Send + Sync,
>;

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
    /// A network namespace of its own with only a loopback (the manifest's `network: none`);
    /// it does not start where one cannot be made.
    #[serde(default)]
    pub network_none: bool,
    /// Paths hidden from it (an empty, unreadable file system mounted over each, in a mount
    /// namespace of its own): the node's Podman service and its socket, which Landlock cannot
    /// keep a process from connecting to. Where they cannot be hidden it does not start, unless
    /// `require_sandbox` is off (a warning then).
    #[serde(default)]
    pub hidden: Vec<PathBuf>,
}

/// The program `name` as found on `PATH`, if it is there.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|f| f.is_file())
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
