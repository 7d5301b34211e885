//! The `podman` runtime: a replica as a container, through the node's own Podman service.
//!
//! A node that runs containers keeps one [`Host`]: the Podman service it starts on first use
//! (its storage, run root and socket under the node's workloads directory, so nodes sharing a
//! machine keep apart), the image archives it loads from (machines here reach no image
//! registry: an operator puts `podman save` files in the node's image directory, or the Hub
//! delivers them), and a *reaper*. Containers are run by conmon, not by the node, so they would
//! outlive a node killed outright and keep running without a lease; the reaper is a small
//! process in a session of its own that holds a pipe from the node and, when the pipe closes
//! (the node ended, however it ended), kills every process under the node's container control
//! group (`/macula-pods/<node>`) at once. A node starting again removes the containers an
//! earlier run of it left (labelled with the node).
//!
//! Each run of a replica is a container ([`ContainerStart::launch`]): created with the
//! manifest's limits, every capability dropped, no new privileges and bounded rlimits
//! ([`ContainerSpec::to_json`]); its output followed into the same bounded ring of lines and
//! rotated file as a native replica's; its exit code waited for; removed when the run ends.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::cgroup::{kill_until_empty, Cgroup};
use super::podman::{ContainerSpec, Podman};
use super::process::{LogBuffer, LogLimits, Sink};
use super::{BoxFut, Replica};

/// The label on every container a node runs: its name (to find them after a restart).
pub const NODE_LABEL: &str = "io.macula.node";

/// How a node runs containers.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The `podman` program.
    pub program: PathBuf,
    /// Where the service keeps its images, containers and socket.
    pub dir: PathBuf,
    /// Directories of image archives (`podman save` files: `.tar`, `.tar.gz`, `.tgz`).
    pub images: Vec<PathBuf>,
    /// This node's name as labels and control groups carry it (letters, digits, `-`, `_`).
    pub node: String,
    /// The program (and its first arguments) that runs as the reaper: the exec shim, which
    /// becomes the reaper when `MACULA_REAP` is set. None: no reaper.
    pub reaper: Option<(PathBuf, Vec<String>)>,
}

/// A node's Podman: the service, its images, the reaper.
pub struct Host {
    cfg: HostConfig,
    state: tokio::sync::Mutex<HostState>,
    /// Archives loaded already (a lock of its own: a long load never holds up a start's or a
    /// health check's use of the service).
    loaded: tokio::sync::Mutex<HashMap<PathBuf, Loaded>>,
}

#[derive(Default)]
struct HostState {
    podman: Option<Podman>,
    service: Option<tokio::process::Child>,
    /// The reaper and the node's end of its pipe (closing it sets the reaper off).
    reaper: Option<(std::process::Child, std::process::ChildStdin)>,
}

/// An archive loaded into the store.
struct Loaded {
    /// Its size and modification time when loaded (loaded again when they change).
    key: (u64, SystemTime),
    /// The images it holds: (full name, id as loaded).
    images: Vec<(String, String)>,
    /// The realm whose subdirectory it is in; None: every realm's.
    realm: Option<String>,
}

/// What the reaper is told (as JSON in `MACULA_REAP`).
#[derive(Debug, Serialize, Deserialize)]
struct ReapSpec {
    /// The control group every container of the node is under.
    cgroup: String,
    /// The Podman service's pid (stopped after the containers).
    service: Option<u32>,
    /// Its socket (to tell it from another process that got its pid since).
    #[serde(default)]
    socket: String,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("cfg", &self.cfg).finish()
    }
}

impl Host {
    /// A node's Podman host; its private directories ([`Host::private_paths`]) are made now,
    /// so that they are there to hide before the service first starts.
    pub fn new(cfg: HostConfig) -> io::Result<Arc<Host>> {
        use std::os::unix::fs::DirBuilderExt;
        let host = Host {
            cfg,
            state: Default::default(),
            loaded: Default::default(),
        };
        for d in host.private_paths() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
        }
        Ok(Arc::new(host))
    }

    /// What native replicas must not see (`ExecSpec::hidden`): the service's directory (its
    /// socket drives Podman as root; its storage holds every container's files) and the
    /// socket's own directory where it lies outside.
    pub fn private_paths(&self) -> Vec<PathBuf> {
        let mut out = vec![self.cfg.dir.clone()];
        if let Some(d) = socket_path(&self.cfg.dir).parent() {
            if !d.starts_with(&self.cfg.dir) {
                out.push(d.to_owned());
            }
        }
        out
    }

    /// The control group all of this node's containers are made under.
    pub fn cgroup_parent(&self) -> String {
        format!("/macula-pods/{}", self.cfg.node)
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    /// The service, started on first use and again if it died; a node's earlier containers
    /// are removed when it starts.
    pub async fn podman(&self) -> io::Result<Podman> {
        let mut st = self.state.lock().await;
        let st = &mut *st;
        if let (Some(p), Some(child)) = (&st.podman, st.service.as_mut()) {
            if child.try_wait()?.is_none() {
                return Ok(p.clone());
            }
            tracing::warn!("the Podman service ended: starting it again");
        }
        let dir = &self.cfg.dir;
        for d in ["storage", "run", "tmp"] {
            std::fs::create_dir_all(dir.join(d))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(d).display())))?;
        }
        let socket = socket_path(dir);
        let _ = std::fs::remove_file(&socket);
        let (child, podman) = Podman::start_service(&self.cfg.program, &socket, Some(dir))
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "starting Podman ({} system service): {e}",
                        self.cfg.program.display()
                    ),
                )
            })?;
        for id in podman.labelled(NODE_LABEL, &self.cfg.node).await? {
            tracing::info!(container = %id, "removing a container an earlier run of this node left");
            if let Err(e) = podman.remove(&id).await {
                tracing::warn!(container = %id, "removing it: {e}");
            }
        }
        // The reaper outlives the node by design: it is replaced along with the service.
        if let Some((mut child, pipe)) = st.reaper.take() {
            drop(pipe);
            let _ = child.wait();
        }
        st.reaper = match &self.cfg.reaper {
            Some((program, args)) => {
                let spec = ReapSpec {
                    cgroup: self.cgroup_parent(),
                    service: child.id(),
                    socket: socket.display().to_string(),
                };
                Some(start_reaper(program, args, &spec)?)
            }
            None => None,
        };
        st.service = Some(child);
        st.podman = Some(podman.clone());
        Ok(podman)
    }

    /// The image `image` names for `realm`, made sure of in the service's store: the id of the
    /// image an archive it may use gave that name, as loaded. A realm may use the images of the
    /// archives directly in an images directory (shared by the node's realms) and of those in
    /// the directory's `<realm>/` subdirectory, and nothing else in the store: not another
    /// realm's image (also where another realm's archive took the same name since: the id is
    /// the one loaded), and not an image by its id. Archives not loaded yet (or changed since)
    /// are loaded first. A clear error where none holds it.
    ///
    /// `package`: the installed directory of the Hub package the replica runs (verified against
    /// the Hub by the node): its image archives are loaded for this realm too.
    pub async fn ensure_image(
        &self,
        p: &Podman,
        image: &str,
        realm: &str,
        package: Option<&Path>,
    ) -> io::Result<String> {
        let mut loaded = self.loaded.lock().await;
        if let Some(dir) = package {
            load_archives(p, &mut loaded, dir, Some(realm.to_owned())).await;
        }
        for dir in &self.cfg.images {
            for (scope, d) in [(None, dir.clone()), (Some(realm), dir.join(realm))] {
                load_archives(p, &mut loaded, &d, scope.map(str::to_owned)).await;
            }
        }
        let found = loaded
            .values()
            .filter(|l| l.realm.as_deref().is_none_or(|r| r == realm))
            .flat_map(|l| l.images.iter())
            .find(|(name, _)| same_image(name, image))
            .map(|(_, id)| id.clone());
        if let Some(id) = found {
            if p.has_image(&id).await? {
                return Ok(id);
            }
            // Removed from the store behind the node's back: load its archive again.
            loaded.retain(|_, l| l.images.iter().all(|(_, i)| *i != id));
        }
        let dirs: Vec<String> = self
            .cfg
            .images
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "image {image} is not on this node for {realm} (no registry is reached): put its \
                 archive (`podman save -o NAME.tar {image}`) in {} (every realm) or its {realm}/ \
                 subdirectory",
                dirs.join(" or ")
            ),
        ))
    }
}

/// Whether the name an archive gave (`localhost/app:1`, `docker.io/library/nginx:1.27`) is the
/// image a manifest names, in full or as Podman shortens it.
fn same_image(full: &str, named: &str) -> bool {
    full == named
        || ["localhost/", "docker.io/library/", "docker.io/"]
            .iter()
            .any(|prefix| full.strip_prefix(prefix) == Some(named))
}

/// Loads the archives of `dir` not loaded yet (or changed since), for `realm` (None: every
/// realm), into `st`.
async fn load_archives(
    p: &Podman,
    loaded: &mut HashMap<PathBuf, Loaded>,
    dir: &Path,
    realm: Option<String>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let archive = [".tar", ".tar.gz", ".tgz"]
            .iter()
            .any(|x| name.ends_with(x));
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !archive || !meta.is_file() {
            continue;
        }
        let key = (
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        // One entry per archive and realm it was loaded for (a package's archive may serve
        // several realms, each on its own authority).
        let entry = match &realm {
            Some(r) => PathBuf::from(format!("{}#{r}", path.display())),
            None => path.clone(),
        };
        if loaded.get(&entry).is_some_and(|l| l.key == key) {
            continue;
        }
        let mut images = vec![];
        match p.load_file(&path).await {
            Ok(names) => {
                tracing::info!(archive = %path.display(), ?names, "image archive loaded");
                // Each name's id now, before another archive may take the name.
                for name in names {
                    match p.image_id(&name).await {
                        Ok(Some(id)) => images.push((name, id)),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(image = %name, "its id: {e}"),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(archive = %path.display(), "image archive not loaded: {e}")
            }
        }
        loaded.insert(
            entry,
            Loaded {
                key,
                images,
                realm: realm.clone(),
            },
        );
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The node is done with its containers: the reaper stops them.
        if let Some((mut child, pipe)) = self.state.get_mut().reaper.take() {
            drop(pipe);
            let _ = child.wait();
        }
    }
}

/// The service's socket: in its run directory, or in a directory of its own in the system's
/// temporary directory where that path is too long for a unix socket.
fn socket_path(dir: &Path) -> PathBuf {
    let p = dir.join("run").join("podman.sock");
    if p.as_os_str().len() < 100 {
        return p;
    }
    use sha2::Digest;
    let h = hex::encode(&sha2::Sha256::digest(p.as_os_str().as_encoded_bytes())[..8]);
    std::env::temp_dir()
        .join(format!("macula-podman-{h}"))
        .join("podman.sock")
}

fn start_reaper(
    program: &Path,
    args: &[String],
    spec: &ReapSpec,
) -> io::Result<(std::process::Child, std::process::ChildStdin)> {
    use std::os::unix::process::CommandExt;
    let json = serde_json::to_string(spec).map_err(io::Error::other)?;
    let mut child = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("MACULA_REAP", json)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        // Not in the node's process group: a signal to the group leaves it to do its work.
        .process_group(0)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("starting the container reaper: {e}")))?;
    let pipe = child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("the reaper's pipe"))?;
    Ok((child, pipe))
}

/// The reaper's `main` (the exec shim with `MACULA_REAP` set): waits for the node's pipe to
/// close, then kills every process under the node's container group, and the service.
pub fn reaper_main(spec: &str) -> ! {
    let spec: ReapSpec = match serde_json::from_str(spec) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("macula: MACULA_REAP: {e}");
            std::process::exit(2)
        }
    };
    let mut buf = [0u8; 64];
    let mut stdin = io::stdin();
    while !matches!(stdin.read(&mut buf), Ok(0) | Err(_)) {}
    kill_until_empty(|| Cgroup::pids_below(&spec.cgroup), 500);
    Cgroup::remove_below(&spec.cgroup);
    if let Some(pid) = spec.service {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("podman") && cmdline.contains(&spec.socket) {
            // SAFETY: kill(2) of the service this node started (checked by its command line).
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    std::process::exit(0)
}

/// A root file system of a static busybox as a tar (its applets linked in `/bin`, a
/// `/etc/passwd`, and `/etc/macula-image` holding `yes` to tell the inside of the image from
/// the host): an image for tests and benchmarks on machines that reach no registry. Built in
/// `work`; says what is missing where there is no static busybox (`busybox-static`).
pub fn busybox_rootfs_tar(work: &Path) -> io::Result<Vec<u8>> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no busybox (apt install busybox-static)",
            )
        })?;
    let ldd = std::process::Command::new("ldd").arg(busybox).output()?;
    let said = [ldd.stdout, ldd.stderr].concat();
    if !String::from_utf8_lossy(&said).contains("not a dynamic") {
        return Err(io::Error::other(format!(
            "{busybox} is not static: an image has no libraries (apt install busybox-static)"
        )));
    }
    let root = work.join("rootfs");
    for d in ["bin", "tmp", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let applets = [
        "sh", "echo", "sleep", "cat", "id", "touch", "grep", "yes", "test", "hostname",
    ];
    for applet in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/macula-image"), "yes\n")?;
    let tar = work.join("rootfs.tar");
    let out = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let bytes = std::fs::read(&tar)?;
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&tar);
    Ok(bytes)
}

/// How to start one run of a replica as a container.
pub struct ContainerStart {
    pub host: Arc<Host>,
    /// The realm the replica is of (which images it may use).
    pub realm: String,
    pub spec: ContainerSpec,
    pub logs: LogLimits,
    pub buffer: Arc<LogBuffer>,
    /// The installed directory of the Hub package it runs, whose image archives it may use.
    pub package: Option<PathBuf>,
}

impl ContainerStart {
    /// Starts it as a [`Replica`]: the image made sure of, a container left by an earlier run
    /// removed, the container created and started, its output followed.
    pub fn launch(self) -> BoxFut<'static, io::Result<Box<dyn Replica>>> {
        Box::pin(async move {
            let ContainerStart {
                host,
                realm,
                mut spec,
                logs,
                buffer,
                package,
            } = self;
            let p = host.podman().await?;
            spec.image = host
                .ensure_image(&p, &spec.image, &realm, package.as_deref())
                .await?;
            spec.cgroup_parent = Some(host.cgroup_parent());
            spec.labels
                .insert(NODE_LABEL.to_owned(), host.node().to_owned());
            p.remove(&spec.name).await?;
            let id = p.create(&spec).await?;
            if let Err(e) = p.start(&id).await {
                let _ = p.remove(&id).await;
                return Err(e);
            }
            let cgroup = p
                .inspect(&id)
                .await
                .ok()
                .and_then(|v| v["State"]["CgroupPath"].as_str().and_then(Cgroup::at));
            let sink = Arc::new(Sink::new(buffer, &logs));
            let follower = {
                let (p, id, max) = (p.clone(), id.clone(), logs.line_bytes);
                tokio::spawn(async move {
                    let r = p
                        .follow(&id, max, |l| {
                            let sink = sink.clone();
                            async move { sink.line(l.stream, l.text).await }
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::debug!(container = %id, "its output is no longer followed: {e}");
                    }
                })
            };
            let r: Box<dyn Replica> = Box::new(ContainerReplica {
                podman: p,
                id,
                cgroup,
                follower: Some(follower),
            });
            Ok(r)
        })
    }
}

/// One run of a replica as a container.
pub struct ContainerReplica {
    podman: Podman,
    id: String,
    cgroup: Option<Cgroup>,
    follower: Option<tokio::task::JoinHandle<()>>,
}

impl ContainerReplica {
    /// Its output, read to the end (Podman ends the stream shortly after the container).
    async fn drain(&mut self) {
        if let Some(mut f) = self.follower.take() {
            if tokio::time::timeout(Duration::from_secs(2), &mut f)
                .await
                .is_err()
            {
                f.abort();
            }
        }
    }
}

/// How a container's exit code reads (as a process's exit status does).
pub fn describe_exit(code: i64) -> Result<(), String> {
    match code {
        0 => Ok(()),
        137 => {
            Err("exit status: 137 (SIGKILL: out of memory, if it reached its memory limit)".into())
        }
        c if c > 128 && c < 160 => Err(format!("exit status: {c} (signal {})", c - 128)),
        c => Err(format!("exit status: {c}")),
    }
}

impl Replica for ContainerReplica {
    fn wait(&mut self) -> BoxFut<'_, Result<(), String>> {
        Box::pin(async move {
            let code = self.podman.wait(&self.id).await;
            self.drain().await;
            match code {
                Ok(c) => describe_exit(c),
                Err(e) => Err(format!("lost the container: {e}")),
            }
        })
    }

    fn kill(&mut self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.podman.remove(&self.id).await {
                tracing::warn!(container = %self.id, "removing the container: {e}");
                // The service is gone or stuck: its processes go the hard way.
                if let Some(cg) = &self.cgroup {
                    cg.destroy_soon();
                }
            }
            self.drain().await;
        })
    }

    fn cgroup(&self) -> Option<Cgroup> {
        self.cgroup.clone()
    }
}

impl Drop for ContainerReplica {
    fn drop(&mut self) {
        if let Some(f) = self.follower.take() {
            f.abort();
        }
        let (p, id) = (self.podman.clone(), self.id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = p.remove(&id).await;
            });
        }
    }
}
