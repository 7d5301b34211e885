//! The exec shim's side: join the groups, restrict the filesystem, exec.

use std::io;
use std::os::unix::process::CommandExt;

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::ExecSpec;

/// Runs in the shim process: joins `spec`'s control groups, applies the Landlock rules, clears
/// the environment and replaces itself with the command. Returns only on failure, with why.
pub fn exec(spec: &ExecSpec) -> io::Error {
    // The replica dies with its node: a node killed outright (`kill -9`, a crash) must not
    // leave replicas running that its lease no longer covers. The signal comes when the
    // thread that started the shim ends: a node starts replicas from its runtime's worker
    // threads, which live as long as it does.
    // SAFETY: prctl with these arguments only sets this process's parent-death signal.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    if std::os::unix::process::parent_id() == 1 {
        return io::Error::other("the node that started this replica is gone");
    }
    let pid = std::process::id().to_string();
    for f in &spec.cgroup_procs {
        if let Err(e) = std::fs::write(f, &pid) {
            return io::Error::new(e.kind(), format!("joining {}: {e}", f.display()));
        }
    }
    if let Err(e) = std::fs::create_dir_all(&spec.workdir) {
        return io::Error::new(
            e.kind(),
            format!("creating {}: {e}", spec.workdir.display()),
        );
    }
    if spec.network_none {
        if let Err(e) = isolate_network() {
            return io::Error::new(
                e.kind(),
                format!("cannot give the replica a network of its own (network: none): {e}"),
            );
        }
    }
    if !spec.hidden.is_empty() {
        // Part of the sandbox: refused like Landlock where it is required, else a warning.
        match hide(&spec.hidden) {
            Ok(()) => {}
            Err(e) if !spec.require_sandbox => eprintln!(
                "macula: warning: the node's private paths are not hidden from this replica: {e}"
            ),
            Err(e) => {
                return io::Error::new(
                    e.kind(),
                    format!(
                        "cannot hide the node's private paths from the replica ({e}): run the \
                         node as root, or set workloads.podman: off"
                    ),
                )
            }
        }
    }
    match restrict(spec) {
        Ok(RulesetStatus::FullyEnforced) | Ok(RulesetStatus::PartiallyEnforced) => {}
        Ok(RulesetStatus::NotEnforced) | Err(_) if !spec.require_sandbox => {
            eprintln!("macula: warning: Landlock is not available; this replica runs without a filesystem sandbox");
        }
        Ok(RulesetStatus::NotEnforced) => {
            return io::Error::other(
                "Landlock is not available on this kernel, so the replica's files cannot be sandboxed: run the node on Linux 5.13 or later with `landlock` in the LSM list (`lsm=` boot parameter)",
            )
        }
        Err(e) => return io::Error::other(format!("sandboxing the replica: {e}")),
    }
    let Some((program, args)) = spec.argv.split_first() else {
        return io::Error::new(io::ErrorKind::InvalidInput, "no program to run");
    };
    std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.workdir)
        .exec()
}

/// Moves this process into a new network namespace and brings its loopback up: the replica
/// reaches nothing but itself. Needs CAP_SYS_ADMIN (a node run as root).
fn isolate_network() -> io::Result<()> {
    // SAFETY: unshare(2) with a constant flag, in this single-threaded shim.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a datagram socket, an ifreq naming "lo" (zeroed, then filled within its size)
    // and the two ioctls that read and set its flags; the socket is closed after.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if r == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        let e = io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(e);
        }
    }
    Ok(())
}

/// Hides `paths` from this process and its children: a mount namespace of its own (private, so
/// nothing propagates back), an empty read-only tmpfs with no permissions over each directory
/// and `/dev/null` over each other file. Landlock, applied next, keeps the replica from
/// undoing it (a sandboxed process cannot mount or unmount).
fn hide(paths: &[std::path::PathBuf]) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &std::path::Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
    };
    // SAFETY: unshare(2) with a constant flag, in this single-threaded shim.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let root = c(std::path::Path::new("/"))?;
    // SAFETY: mount(2) with valid C strings (or null where the call ignores them).
    if unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let tmpfs = c(std::path::Path::new("tmpfs"))?;
    let opts = c(std::path::Path::new("size=4k,mode=000"))?;
    let null = c(std::path::Path::new("/dev/null"))?;
    for p in paths {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            continue;
        };
        let target = c(p)?;
        // SAFETY: mount(2) with valid C strings (or null where the call ignores them).
        let r = unsafe {
            if meta.is_dir() {
                libc::mount(
                    tmpfs.as_ptr(),
                    target.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    opts.as_ptr().cast(),
                )
            } else {
                libc::mount(
                    null.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            }
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display())));
        }
    }
    Ok(())
}

/// Devices every program may write (and read): writing to them reaches nothing.
const OPEN_DEVICES: [&str; 3] = ["/dev/null", "/dev/zero", "/dev/full"];

fn restrict(spec: &ExecSpec) -> Result<RulesetStatus, landlock::RulesetError> {
    let abi = ABI::V3;
    let mut rw = vec![spec.workdir.clone()];
    rw.extend(spec.read_write.iter().cloned());
    rw.extend(
        OPEN_DEVICES
            .iter()
            .map(std::path::PathBuf::from)
            .filter(|p| p.exists()),
    );
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        // No signals to processes outside the sandbox (the node, other replicas) and no
        // abstract unix sockets made outside it (Linux 6.12 and later; ignored before).
        .scope(Scope::Signal | Scope::AbstractUnixSocket)?
        .create()?
        .add_rules(path_beneath_rules(
            &spec.read_only,
            AccessFs::from_read(abi),
        ))?
        .add_rules(path_beneath_rules(&rw, AccessFs::from_all(abi)))?
        .restrict_self()?;
    Ok(status.ruleset)
}

/// The shim's `main`: the spec comes as JSON in `MACULA_EXEC_SPEC`.
pub fn main() -> ! {
    // The same program is the container reaper (see `super::container`).
    if let Ok(reap) = std::env::var("MACULA_REAP") {
        super::container::reaper_main(&reap);
    }
    let spec = std::env::var("MACULA_EXEC_SPEC")
        .map_err(|_| {
            "MACULA_EXEC_SPEC is not set (this program is started by a Macula node)".to_owned()
        })
        .and_then(|t| {
            serde_json::from_str::<ExecSpec>(&t).map_err(|e| format!("MACULA_EXEC_SPEC: {e}"))
        });
    let e = match spec {
        Ok(spec) => exec(&spec).to_string(),
        Err(e) => e,
    };
    eprintln!("macula: cannot start the replica: {e}");
    std::process::exit(127)
}
