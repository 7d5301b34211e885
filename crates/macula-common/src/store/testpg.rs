//! A throwaway PostgreSQL server for tests (the services' and the CLI's): started from the
//! installed binaries with `initdb` in a temp dir, as the `postgres` user when run as root,
//! and stopped on drop. Absent binaries make [`Postgres::start`] return `None` after saying so.

use std::path::PathBuf;
use std::process::Command;

/// A PostgreSQL server of its own, stopped and removed on drop.
pub struct Postgres {
    pub url: String,
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
}

fn pg_bin() -> Option<PathBuf> {
    if let Some(b) = std::env::var_os("PG_BIN") {
        return Some(PathBuf::from(b));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

impl Postgres {
    /// Starts a throwaway server, or says why not and returns `None` (the caller skips).
    pub fn start() -> Option<Postgres> {
        let Some(bin) = pg_bin() else {
            eprintln!("SKIPPED: PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; set PG_BIN). `.ci/run` installs it.");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        // initdb refuses to run as root: run the server as the `postgres` user then.
        let as_postgres = is_root();
        if as_postgres {
            let out = Command::new("id").args(["-u", "postgres"]).output().ok()?;
            let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
            let out = Command::new("id").args(["-g", "postgres"]).output().ok()?;
            let gid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.path().join("data");
        let pg = Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str()?,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str()?,
                "-l",
                log.to_str()?,
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
        Some(pg)
    }

    /// `tool` of the PostgreSQL installation, run as `postgres` when we are root.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {tool} from {}: {e}", self.bin.display()));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
