//! Test support: a registry served over real HTTP on loopback, on SQLite or on a throwaway
//! PostgreSQL started from the installed binaries (`initdb` in a temp dir).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use macula_node::ConfDir;
use macula_registry::{Registry, RegistryConfig};
use serde_json::Value;

pub struct Server {
    pub base: String,
    pub reg: Arc<Registry>,
    pub dir: ConfDir,
    _task: tokio::task::JoinHandle<()>,
}

/// Where each test registry (by base URL) writes its mail, for [`account`] to verify addresses.
static MAIL_DIRS: std::sync::Mutex<Vec<(String, std::path::PathBuf)>> =
    std::sync::Mutex::new(Vec::new());

pub fn mail_dir(base: &str) -> Option<std::path::PathBuf> {
    MAIL_DIRS
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(b, _)| b == base)
        .map(|(_, d)| d.clone())
}

/// The newest verification code mailed to `email` by the registry at `base`.
pub fn mailed_code(base: &str, email: &str) -> Option<String> {
    let dir = mail_dir(base)?;
    let mut mails: Vec<_> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!("-{email}.eml")))
        })
        .collect();
    mails.sort();
    let text = std::fs::read_to_string(mails.last()?).ok()?;
    code_in(&text)
}

/// The `ev_…` code in a mail's text.
pub fn code_in(text: &str) -> Option<String> {
    let i = text.find("ev_")?;
    Some(
        text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect(),
    )
}

pub async fn serve(db_url: &str, confdir: &Path, mut config: RegistryConfig) -> Server {
    let dir = ConfDir::new(confdir);
    dir.init().unwrap();
    if config.mail.url.is_empty() {
        config.mail.url = format!("dir:{}", confdir.join("mail").display());
    }
    let mail = config
        .mail
        .url
        .strip_prefix("dir:")
        .map(std::path::PathBuf::from);
    let db = macula_registry::db::open(db_url).await.unwrap();
    let reg = Registry::new(db, config, dir.clone(), None).await.unwrap();
    let app = macula_registry::http::router(reg.clone(), 64 << 10)
        .into_make_service_with_connect_info::<SocketAddr>();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    if let Some(m) = mail {
        MAIL_DIRS.lock().unwrap().push((base.clone(), m));
    }
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

/// Signs up, verifies the address with the code mailed to it, and logs in; returns the session
/// token.
pub async fn account(base: &str, email: &str) -> String {
    let token = unverified_account(base, email).await;
    let code = mailed_code(base, email).expect("a verification code was mailed");
    let (s, v) = req(
        base,
        "POST",
        "/v1/account/verify",
        None,
        Some(serde_json::json!({"code": code})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    token
}

/// Signs up and logs in without verifying the address; returns the session token.
pub async fn unverified_account(base: &str, email: &str) -> String {
    let body = serde_json::json!({"email": email, "password": "correct horse battery"});
    let (s, v) = req(base, "POST", "/v1/accounts", None, Some(body.clone())).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = req(base, "POST", "/v1/sessions", None, Some(body)).await;
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

/// Registers realm `name` for the session `token`, which must succeed.
pub async fn register(base: &str, token: &str, name: &str) {
    let (s, v) = req(
        base,
        "POST",
        "/v1/realms",
        Some(token),
        Some(serde_json::json!({"name": name})),
    )
    .await;
    assert_eq!(s, 201, "registering {name}: {v}");
}

/// Logs in an account made by [`account`]; returns the session token.
pub async fn login(base: &str, email: &str) -> String {
    let body = serde_json::json!({"email": email, "password": "correct horse battery"});
    let (s, v) = req(base, "POST", "/v1/sessions", None, Some(body)).await;
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

#[allow(unused_imports)]
pub use macula_registry::testpg::Postgres;

/// A GET whose answer is text (CSV, HTML), with a bearer token.
pub async fn req_text(base: &str, path: &str, token: &str) -> String {
    let url = format!("{base}{path}");
    let token = token.to_owned();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut res = agent
            .get(&url)
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap();
        assert_eq!(res.status().as_u16(), 200);
        res.body_mut().read_to_string().unwrap()
    })
    .await
    .unwrap()
}

/// An embedded SQLite database in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("registry.db").display())
}

/// Two tests in a module named after the suite, `on_sqlite` and `on_postgres`, each running
/// `suite(database_url, temp_dir)`; the PostgreSQL one skips, saying so, without the binaries.
#[macro_export]
macro_rules! on_both_backends {
    ($suite:ident) => {
        mod $suite {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                let tmp = tempfile::tempdir().unwrap();
                super::$suite(&$crate::common::sqlite_url(tmp.path()), tmp.path()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                let Some(pg) = $crate::common::Postgres::start() else {
                    return;
                };
                let tmp = tempfile::tempdir().unwrap();
                super::$suite(&pg.url, tmp.path()).await;
            }
        }
    };
}
