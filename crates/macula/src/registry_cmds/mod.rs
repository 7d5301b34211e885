//! Commands that talk to a registry over its REST API: signup, login, logout, realms, keys,
//! status. The login is kept in `$XDG_CONFIG_HOME/macula/credentials.json` (mode 0600).
//!
//! One file per capability: `account.rs`, `realms.rs`, `keys.rs`, `status.rs` (billing's are in
//! `billing_cmds.rs`); this file holds the HTTP client ([`Api`]), the stored credential and the
//! output helpers they share.

mod account;
mod keys;
mod realms;
mod status;

#[allow(unused_imports)]
pub use self::{account::*, keys::*, realms::*, status::*};

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use macula_registry::billing::types::*;
use macula_registry::identity::types::*;
use macula_registry::realms::types::*;
use macula_registry::service::List;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// `$XDG_CONFIG_HOME/macula`, else `~/.config/macula`.
pub fn config_dir() -> PathBuf {
    crate::local::xdg_dir("XDG_CONFIG_HOME", ".config", ".macula-config")
}

pub(crate) fn credentials_path() -> PathBuf {
    config_dir().join("credentials.json")
}

#[derive(Serialize, Deserialize, Clone)]
pub struct Credential {
    pub server: String,
    pub email: String,
    pub token: String,
    /// The CA file given at login (`--ca`), used again for this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

pub fn stored_credential() -> Option<Credential> {
    let text = std::fs::read_to_string(credentials_path()).ok()?;
    serde_json::from_str(&text).ok()
}

#[derive(Args, Clone)]
pub struct Server {
    /// Registry URL [default: the one you logged in to, else http://127.0.0.1:8080].
    /// Use https:// for any registry not on this machine.
    #[arg(long, env = "MACULA_SERVER")]
    pub server: Option<String>,
    /// For https://: trust only the CA certificates in this PEM file (a private CA, or the
    /// certificate `macula up` prints) instead of the public roots. Remembered at login.
    #[arg(long, env = "MACULA_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Allow plain http:// to a registry that is not on this machine (passwords, session
    /// tokens and keys then cross the network unencrypted).
    #[arg(long)]
    pub allow_http: bool,
}

#[derive(Args)]
pub struct AccountArgs {
    #[command(flatten)]
    pub server: Server,
    /// Your email address.
    #[arg(long)]
    pub email: String,
    /// Read the password from the first line of stdin (for scripts) instead of prompting.
    #[arg(long)]
    pub password_stdin: bool,
}

/// An HTTP client for one registry, with the stored session token if it is for that registry.
pub struct Api {
    pub base: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// The CA file in use, if any (kept with the credential at login).
    pub ca: Option<PathBuf>,
}

/// What to do about a certificate that was not verified, if `error` says so.
pub fn tls_hint(error: &str) -> &'static str {
    if error.contains("UnknownIssuer") || error.contains("invalid peer certificate") {
        "\n  (a private or self-signed certificate? pass its CA with --ca FILE.pem; `macula up` prints its own)"
    } else {
        ""
    }
}

/// Whether `base` (`http://host[:port]...`) names this machine.
pub(crate) fn is_local(base: &str) -> bool {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// An HTTP client that trusts the public roots, or only the CA certificates in `ca`; non-2xx
/// answers are returned, not errors. `timeout`: for a whole request (0: none, for streams).
pub fn http_agent(
    ca: Option<&std::path::Path>,
    timeout: std::time::Duration,
) -> Result<ureq::Agent> {
    let mut tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ));
    if let Some(path) = ca {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the CA file {}", path.display()))?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("{}: not a PEM certificate file ({e})", path.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", path.display());
        }
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global((!timeout.is_zero()).then_some(timeout))
        .tls_config(tls.build())
        .build()
        .into())
}

impl Api {
    pub fn new(server: &Server) -> Result<Api> {
        let cred = stored_credential();
        let base = server
            .server
            .clone()
            .or_else(|| cred.as_ref().map(|c| c.server.clone()))
            .unwrap_or_else(|| DEFAULT_SERVER.into())
            .trim_end_matches('/')
            .to_owned();
        let cred = cred.filter(|c| c.server == base);
        if let Some(scheme) = base.split_once("://").map(|(s, _)| s) {
            if scheme != "http" && scheme != "https" {
                bail!("registry URL {base}: use https://host:port (or http:// on this machine)");
            }
        }
        if base.starts_with("http://") && !is_local(&base) && !server.allow_http {
            bail!(
                "refusing plain http:// to {base}: passwords, session tokens and keys would cross the network unencrypted. \
                 Use https:// (with --ca for a private certificate), or --allow-http if you mean it"
            );
        }
        let ca = server
            .ca
            .clone()
            .or_else(|| cred.as_ref().and_then(|c| c.ca.clone()));
        let token = cred.map(|c| c.token);
        let agent = http_agent(ca.as_deref(), std::time::Duration::from_secs(30))?;
        Ok(Api {
            base,
            token,
            agent,
            ca,
        })
    }

    /// The registry's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The CA file given for it (for other clients of the same server).
    pub fn ca(&self) -> Option<&std::path::Path> {
        self.ca.as_deref()
    }

    /// Whether a session token (or a key set with [`Api::use_key`]) will be sent.
    pub fn has_credential(&self) -> bool {
        self.token.is_some()
    }

    /// Authenticates with a realm's admin API key instead of a session (usage only).
    pub fn use_key(&mut self, key: String) {
        self.token = Some(key);
    }

    fn need_login(&self) -> Result<&str> {
        self.token.as_deref().ok_or_else(|| {
            anyhow!(
                "not logged in to {}: run `macula login --email you@example.com`",
                self.base
            )
        })
    }

    /// Sends a request; a non-2xx answer becomes an error with the API's message.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        auth: bool,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let token = if auth {
            Some(self.need_login()?.to_owned())
        } else {
            None
        };
        let with_auth = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match &token {
            Some(t) => r.header("Authorization", &format!("Bearer {t}")),
            None => r,
        };
        let with_auth_body = |r: ureq::RequestBuilder<ureq::typestate::WithBody>| match &token {
            Some(t) => r.header("Authorization", &format!("Bearer {t}")),
            None => r,
        };
        let res =
            match method {
                "GET" => with_auth(self.agent.get(&url)).call(),
                "DELETE" => with_auth(self.agent.delete(&url)).call(),
                "POST" => with_auth_body(self.agent.post(&url))
                    .send_json(body.cloned().unwrap_or(json!({}))),
                "PUT" => with_auth_body(self.agent.put(&url))
                    .send_json(body.cloned().unwrap_or(json!({}))),
                _ => bail!("unsupported method {method}"),
            };
        self.answer(path, res)
    }

    /// Whether `path` answers a HEAD with 2xx (a Hub blob already uploaded, say); a 404 is
    /// `false`, anything else but 2xx an error.
    pub fn exists(&self, path: &str) -> Result<bool> {
        let url = format!("{}{path}", self.base);
        let res = self.agent.head(&url).call().map_err(|e| {
            anyhow!(
                "cannot reach the registry at {}: {e}{}",
                self.base,
                tls_hint(&e.to_string())
            )
        })?;
        match res.status().as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            s => bail!("HEAD {path}: the registry answered {s}"),
        }
    }

    /// PUTs a file's bytes (a Hub blob), streamed; the answer as JSON.
    pub fn put_file(&self, path: &str, file: &std::path::Path) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let token = self.need_login()?.to_owned();
        let mut f = std::fs::File::open(file).with_context(|| format!("{}", file.display()))?;
        let res = self
            .agent
            .put(&url)
            // A large file takes as long as the link needs: no overall deadline; the answer
            // (the Hub hashes what it received) must come within two minutes of the last byte.
            .config()
            .timeout_global(None)
            .timeout_recv_response(Some(std::time::Duration::from_secs(120)))
            .build()
            .header("Authorization", &format!("Bearer {token}"))
            .header("Content-Type", "application/octet-stream")
            .send(ureq::SendBody::from_reader(&mut f));
        self.answer(path, res)
    }

    /// The API's answer as JSON; a non-2xx answer becomes an error with the API's message.
    fn answer(
        &self,
        path: &str,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut res = res.map_err(|e| {
            anyhow!(
                "cannot reach the registry at {}: {e}{}",
                self.base,
                tls_hint(&e.to_string())
            )
        })?;
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().unwrap_or_default();
        let v: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text.clone()))
        };
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or(text.trim())
            .to_owned();
        let code = v["error"]["code"].as_str().unwrap_or("error").to_owned();
        let hint = match status {
            401 => "\n  (log in again: macula login)",
            404 if path == "/v1/openapi.json" || v["error"].is_null() => "\n  (is the registry enabled on that node? `macula up` enables it; `macula node` needs registry.enabled: true)",
            _ => "",
        };
        bail!("{msg} [{status} {code}]{hint}")
    }

    /// A request whose body and answer are the registry's own types (`macula_registry::*::types`):
    /// the CLI keeps no second copy of the API's field names.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T> {
        self.call_with(method, path, body, true)
    }

    /// [`Api::call`] without a session (signing up, logging in, verifying an address).
    pub fn call_anonymous<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T> {
        self.call_with(method, path, body, false)
    }

    fn call_with<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &impl Serialize,
        auth: bool,
    ) -> Result<T> {
        let body = serde_json::to_value(body)?;
        self.typed(method, path, self.send(method, path, Some(&body), auth)?)
    }

    /// A request without a body, its answer typed.
    pub fn get<T: DeserializeOwned>(&self, method: &str, path: &str) -> Result<T> {
        self.typed(method, path, self.send(method, path, None, true)?)
    }

    /// A GET without a session (public routes: the plans).
    pub fn get_anonymous<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.typed("GET", path, self.send("GET", path, None, false)?)
    }

    fn typed<T: DeserializeOwned>(&self, method: &str, path: &str, v: Value) -> Result<T> {
        serde_json::from_value(v).map_err(|e| {
            anyhow!(
                "the registry's answer to {method} {path} is not what this CLI reads ({e}); \
                 are `macula` and the registry at {} the same version?",
                self.base
            )
        })
    }

    /// Every item of a paged list.
    pub fn all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>> {
        let mut out = vec![];
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}limit=500&cursor={c}"),
                None => format!("{path}{sep}limit=500"),
            };
            let page: List<T> = self.get("GET", &p)?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }
}

/// Prints an API answer: as JSON with `--json`, else for people.
pub fn emit<T: Serialize>(json: bool, v: &T, human: impl FnOnce(&T)) {
    if json {
        println!("{}", serde_json::to_string(v).unwrap_or_default());
    } else {
        human(v);
    }
}

/// Prints a list: as a JSON array with `--json`, else for people.
pub fn emit_list<T: Serialize>(json: bool, items: &[T], human: impl FnOnce(&[T])) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(items)?);
    } else {
        human(items);
    }
    Ok(())
}

/// A table for people: a header row and columns padded to their widest cell, no borders.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.iter().map(comfy_table::Cell::new));
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t
}

/// Aligns the cells of `columns` (numbers) to the right.
pub fn right_aligned(t: &mut comfy_table::Table, columns: &[usize]) {
    for &i in columns {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
}

/// An optional value for a table cell or a line: the value, else `-`.
pub fn or_dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// Percent-encodes a path segment (emails carry `@` and `+`).
pub fn seg(x: &str) -> String {
    x.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The realm to act on: the one given, else the caller's only realm.
pub fn pick_realm(api: &Api, realm: Option<String>) -> Result<String> {
    if let Some(r) = realm {
        return Ok(r);
    }
    let realms: Vec<Realm> = api.all("/v1/realms")?;
    match realms.as_slice() {
        [one] => Ok(one.name.clone()),
        [] => bail!("you have no realm yet: macula realms create com.example.app"),
        _ => bail!(
            "you have {} realms; say which with --realm ({})",
            realms.len(),
            realms
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
