//! `macula __exec`, the exec shim of native replicas: it starts the command of its spec with
//! exactly the spec's environment (nothing of its own) in the spec's directory.

use std::process::Command;

#[test]
fn the_shim_starts_the_command_with_only_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    // Where Landlock is enforced, the command's programs must be readable.
    let system: Vec<&str> = ["/bin", "/usr", "/lib", "/lib64"]
        .into_iter()
        .filter(|p| std::path::Path::new(p).exists())
        .collect();
    let spec = serde_json::json!({
        "argv": ["/bin/sh", "-c", "echo \"$GREETING from $(pwd)\"; env | cut -d= -f1 | sort | tr '\\n' ' '"],
        "env": {"GREETING": "hello", "PATH": "/usr/bin:/bin"},
        "workdir": dir.path(),
        "cgroup_procs": [],
        "read_only": system,
        "read_write": [],
        // The sandbox itself is tested in macula-workloads; here, the subcommand.
        "require_sandbox": false,
    });
    let out = Command::new(env!("CARGO_BIN_EXE_macula"))
        .arg("__exec")
        .env("MACULA_EXEC_SPEC", spec.to_string())
        .env("MACULA_SECRET_OF_THE_NODE", "x")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let canonical = dir.path().canonicalize().unwrap();
    assert!(
        stdout.contains(&format!("hello from {}", canonical.display())),
        "{stdout}"
    );
    assert!(stdout.contains("GREETING PATH PWD"), "{stdout}");
    assert!(!stdout.contains("MACULA_"), "{stdout}");
    // Without a spec it says what it is for.
    let bare = Command::new(env!("CARGO_BIN_EXE_macula"))
        .arg("__exec")
        .output()
        .unwrap();
    assert_eq!(bare.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&bare.stderr).contains("started by a Macula node"));
}
