//! Test support: a registry served over real HTTP on loopback, on SQLite or on a throwaway
//! PostgreSQL started from the installed binaries (`initdb` in a temp dir).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use macula_node::ConfDir;
use macula_registry::{Db, Registry, RegistryConfig};
use serde_json::Value;

pub struct Server {
    pub base: String,
    pub reg: Arc<Registry>,
    pub dir: ConfDir,
    _task: tokio::task::JoinHandle<()>,
}

pub async fn serve(db_url: &str, confdir: &Path, config: RegistryConfig) -> Server {
    let dir = ConfDir::new(confdir);
    dir.init().unwrap();
    let db = Db::open(db_url).await.unwrap();
    let reg = Registry::new(db, config, dir.clone(), None).await.unwrap();
    let app = macula_registry::http::router(reg.clone(), 64 << 10)
        .into_make_service_with_connect_info::<SocketAddr>();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    Server {
        base,
        reg,
        dir,
        _task: task,
    }
}

/// One HTTP request: (status, JSON body or Null).
pub async fn req(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    req_raw(base, method, path, token, body.map(|b| b.to_string()), &[]).await
}

pub async fn req_raw(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let url = format!("{base}{path}");
    let method = method.to_owned();
    let token = token.map(str::to_owned);
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url);
        if let Some(t) = &token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in &headers {
            r = r.header(k, v);
        }
        let res = match body {
            Some(b) => agent.run(
                r.header("content-type", "application/json")
                    .body(b)
                    .unwrap(),
            ),
            None => agent.run(r.body(()).unwrap()),
        };
        let mut res = res.unwrap();
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    })
    .await
    .unwrap()
}

/// Signs up and logs in; returns the session token.
pub async fn account(base: &str, email: &str) -> String {
    let body = serde_json::json!({"email": email, "password": "correct horse battery"});
    let (s, v) = req(base, "POST", "/v1/accounts", None, Some(body.clone())).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = req(base, "POST", "/v1/sessions", None, Some(body)).await;
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

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

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .arg("-u")
                .arg("postgres")
                .arg("--")
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
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
        let exe = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .arg("-u")
                .arg("postgres")
                .arg("--")
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        };
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
