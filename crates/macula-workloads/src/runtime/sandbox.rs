//! The exec shim's side: join the groups, restrict the filesystem, exec.

use std::io;
use std::os::unix::process::CommandExt;

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, ABI,
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

fn restrict(spec: &ExecSpec) -> Result<RulesetStatus, landlock::RulesetError> {
    let abi = ABI::V3;
    let mut rw = vec![spec.workdir.clone()];
    rw.extend(spec.read_write.iter().cloned());
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
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
