//! Commands that talk to a registry over its REST API: signup, login, logout, realms, keys,
//! status. The login is kept in `$XDG_CONFIG_HOME/macula/credentials.json` (mode 0600).

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// `$XDG_CONFIG_HOME/macula`, else `~/.config/macula`.
pub fn config_dir() -> PathBuf {
    crate::local::xdg_dir("XDG_CONFIG_HOME", ".config", ".macula-config")
}

fn credentials_path() -> PathBuf {
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
fn is_local(base: &str) -> bool {
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
        let mut tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ));
        if let Some(path) = &ca {
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
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Api {
            base,
            token,
            agent,
            ca,
        })
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

    /// Every item of a paged list.
    pub fn all(&self, path: &str) -> Result<Vec<Value>> {
        let mut out = vec![];
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}limit=500&cursor={c}"),
                None => format!("{path}{sep}limit=500"),
            };
            let v = self.send("GET", &p, None, true)?;
            if let Some(items) = v["items"].as_array() {
                out.extend(items.iter().cloned());
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
    }
}

fn read_password(stdin: bool, confirm: bool) -> Result<String> {
    if let Ok(p) = std::env::var("MACULA_PASSWORD") {
        return Ok(p);
    }
    if stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to ask for the password: pass --password-stdin or set MACULA_PASSWORD");
    }
    let p = rpassword::prompt_password("Password: ")?;
    if confirm && rpassword::prompt_password("Again: ")? != p {
        bail!("the passwords differ");
    }
    Ok(p)
}

/// `macula account ...`: the logged-in account and its email address.
#[derive(clap::Subcommand)]
pub enum AccountCmd {
    /// Show the account you are logged in as (email, whether it is verified, operator).
    Show(Server),
    /// Verify your email address with the code mailed to it: `macula account verify ev_…`.
    Verify {
        /// The code from the mail.
        code: String,
        #[command(flatten)]
        server: Server,
    },
    /// Mail a new verification code to your address (one a minute).
    Resend(Server),
    /// Change your address: a code goes to the new one; the change happens when you verify it.
    Email {
        /// The new address.
        new_email: String,
        /// Read the password from the first line of stdin instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        server: Server,
    },
}

pub fn account(cmd: AccountCmd, json: bool) -> Result<()> {
    let (v, human) = match cmd {
        AccountCmd::Show(server) => {
            let v = Api::new(&server)?.send("GET", "/v1/account", None, true)?;
            let h = format!(
                "{} ({}){}",
                v["email"].as_str().unwrap_or("?"),
                if v["email_verified"] == true {
                    "verified"
                } else {
                    "not verified: macula account verify CODE"
                },
                if v["operator"] == true {
                    ", operator"
                } else {
                    ""
                }
            );
            (v, h)
        }
        AccountCmd::Verify { code, server } => {
            let v = Api::new(&server)?.send(
                "POST",
                "/v1/account/verify",
                Some(&json!({"code": code})),
                false,
            )?;
            let h = format!("{} is verified.", v["email"].as_str().unwrap_or("?"));
            (v, h)
        }
        AccountCmd::Resend(server) => {
            let v = Api::new(&server)?.send("POST", "/v1/account/verification", None, true)?;
            let h = format!(
                "A new code was mailed to {}.",
                v["to"].as_str().unwrap_or("your address")
            );
            (v, h)
        }
        AccountCmd::Email {
            new_email,
            password_stdin,
            server,
        } => {
            let api = Api::new(&server)?;
            let password = read_password(password_stdin, false)?;
            let v = api.send(
                "PUT",
                "/v1/account/email",
                Some(&json!({"email": new_email, "password": password})),
                true,
            )?;
            let h = format!(
                "A code was mailed to {new_email}; your address changes when you run `macula account verify CODE`."
            );
            (v, h)
        }
    };
    if json {
        println!("{v}");
    } else {
        println!("{human}");
    }
    Ok(())
}

pub fn signup(a: AccountArgs, json: bool) -> Result<()> {
    let api = Api::new(&a.server)?;
    let password = read_password(a.password_stdin, true)?;
    let v = api.send(
        "POST",
        "/v1/accounts",
        Some(&json!({"email": a.email, "password": password})),
        false,
    )?;
    if json {
        println!("{v}");
    } else {
        println!(
            "Created account {} on {}. Log in with: macula login --email {}",
            v["email"].as_str().unwrap_or(""),
            api.base,
            a.email
        );
        if v["verification"]["sent"] == true {
            println!(
                "A verification code was mailed to {}: verify with `macula account verify CODE`\n\
                 (until then, invitations to that address and operator rights for it do not apply).",
                a.email
            );
        } else {
            println!(
                "The verification mail could not be sent; once logged in, ask again with `macula account resend`."
            );
        }
    }
    Ok(())
}

pub fn login(a: AccountArgs, json: bool) -> Result<()> {
    let api = Api::new(&a.server)?;
    let password = read_password(a.password_stdin, false)?;
    let v = api.send(
        "POST",
        "/v1/sessions",
        Some(&json!({"email": a.email, "password": password, "client": "macula-cli"})),
        false,
    )?;
    let cred = Credential {
        server: api.base.clone(),
        email: v["email"].as_str().unwrap_or(&a.email).to_owned(),
        token: v["token"]
            .as_str()
            .ok_or_else(|| anyhow!("the registry answered without a token"))?
            .to_owned(),
        ca: api
            .ca
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
    };
    let path = credentials_path();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    macula_node::confdir::write_secret(&path, &serde_json::to_string_pretty(&cred)?)?;
    if json {
        println!(
            "{}",
            json!({"server": cred.server, "email": cred.email, "expires_at": v["expires_at"]})
        );
    } else {
        println!(
            "Logged in to {} as {} (until {}). Credential saved to {}.",
            cred.server,
            cred.email,
            v["expires_at"].as_str().unwrap_or("?"),
            path.display()
        );
    }
    Ok(())
}

pub fn logout(server: Server, json: bool) -> Result<()> {
    let api = Api::new(&server)?;
    let path = credentials_path();
    if api.token.is_none() {
        if json {
            println!("{}", json!({"logged_out": false}));
        } else {
            println!("Not logged in to {}.", api.base);
        }
        return Ok(());
    }
    // End the session on the server too; a registry that is gone must not keep us logged in.
    if let Err(e) = api.send("DELETE", "/v1/sessions/current", None, true) {
        eprintln!("warning: the registry did not confirm the logout ({e}); the local credential is removed anyway");
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    if json {
        println!("{}", json!({"logged_out": true}));
    } else {
        println!("Logged out of {}.", api.base);
    }
    Ok(())
}

/// Prints an API answer: as JSON with `--json`, else for people.
pub fn emit(json: bool, v: &Value, human: impl FnOnce(&Value)) {
    if json {
        println!("{v}");
    } else {
        human(v);
    }
}

pub fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

pub fn print_realms(realms: &[Value]) {
    if realms.is_empty() {
        println!("No realms. Register one with `macula realms create com.example.app`.");
        return;
    }
    println!(
        "{:<32} {:<10} {:<9} {:<13} {:<22} OWNER",
        "REALM", "STATUS", "ACCESS", "TIER", "EXPIRES"
    );
    for r in realms {
        println!(
            "{:<32} {:<10} {:<9} {:<13} {:<22} {}",
            s(&r["name"]),
            s(&r["status"]),
            s(&r["access"]),
            s(&r["tier"]),
            s(&r["expires_at"]),
            s(&r["owner"])
        );
    }
}

pub fn print_keys(keys: &[Value]) {
    if keys.is_empty() {
        println!("No keys. Create one with `macula keys create --realm <realm> --name <name>`.");
        return;
    }
    println!(
        "{:<22} {:<24} {:<16} {:<22} {:<22} {:<8} NAME",
        "ID", "REALM", "ROLE", "CREATED", "EXPIRES", "STATUS"
    );
    for k in keys {
        println!(
            "{:<22} {:<24} {:<16} {:<22} {:<22} {:<8} {}",
            s(&k["id"]),
            s(&k["realm"]),
            s(&k["role"]),
            s(&k["created_at"]),
            k["expires_at"].as_str().unwrap_or("never"),
            s(&k["status"]),
            s(&k["name"])
        );
    }
}

pub fn print_realm(r: &Value) {
    for (label, key) in [
        ("realm", "name"),
        ("status", "status"),
        ("owner", "owner"),
        ("your access", "access"),
        ("tier", "tier"),
        ("created", "created_at"),
        ("expires", "expires_at"),
        ("grace ends", "grace_ends_at"),
        ("policy version", "policy_version"),
        ("active keys", "active_keys"),
        ("members", "members"),
    ] {
        let v = &r[key];
        if !v.is_null() {
            println!(
                "  {label:<15} {}",
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            );
        }
    }
    if let Some(why) = r["suspended_reason"].as_str() {
        println!("  {:<15} {why}", "suspended for");
    }
    if r["frozen"].as_bool() == Some(true) {
        println!("  {:<15} {}", "frozen", s(&r["frozen_reason"]));
    }
    if let Some(n) = r["live"]["sessions_on_this_node"].as_u64() {
        println!("  {:<15} {n}", "live sessions");
    }
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
    let realms = api.all("/v1/realms")?;
    match realms.as_slice() {
        [one] => Ok(s(&one["name"]).to_owned()),
        [] => bail!("you have no realm yet: macula realms create com.example.app"),
        _ => bail!(
            "you have {} realms; say which with --realm ({})",
            realms.len(),
            realms
                .iter()
                .map(|r| s(&r["name"]))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn keys(api: &Api, cmd: crate::local::KeysCmd, json: bool) -> Result<()> {
    use crate::local::KeysCmd;
    match cmd {
        KeysCmd::Create {
            realm,
            role,
            name,
            expires,
            pubkey,
            ..
        } => {
            let realm = pick_realm(api, realm)?;
            let secs = crate::local::parse_duration_secs(&expires)?;
            let days = if secs == 0 { 0 } else { secs.div_ceil(86_400) };
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/keys", seg(&realm)),
                Some(
                    &json!({"name": name, "role": role, "expires_in_days": days, "pubkey": pubkey}),
                ),
                true,
            )?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "Created key {} (realm {}, role {}, expires {}). It is shown only once:\n\n{}\n",
                    s(&v["id"]),
                    s(&v["realm"]),
                    s(&v["role"]),
                    v["expires_at"].as_str().unwrap_or("never"),
                    s(&v["key"])
                );
            }
        }
        KeysCmd::List { realm, .. } => {
            let keys = match realm {
                Some(r) => api.all(&format!("/v1/realms/{}/keys", seg(&r)))?,
                None => api.all("/v1/keys")?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                print_keys(&keys);
            }
        }
        KeysCmd::Revoke { key_id, .. } => {
            let v = api.send("DELETE", &format!("/v1/keys/{}", seg(&key_id)), None, true)?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "Revoked {key_id} in realm {} at {}. Every node refuses it within seconds and closes its sessions.",
                    s(&v["realm"]),
                    s(&v["revoked_at"])
                );
            }
        }
    }
    Ok(())
}

pub fn realms(api: &Api, cmd: crate::local::RealmsCmd, json: bool) -> Result<()> {
    use crate::local::RealmsCmd;
    let out = |v: &Value, human: &dyn Fn(&Value)| emit(json, v, human);
    match cmd {
        RealmsCmd::List { .. } => {
            let realms = api.all("/v1/realms")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&realms)?);
            } else {
                print_realms(&realms);
            }
        }
        RealmsCmd::Create {
            name, owner, tier, ..
        } => {
            let v = api.send(
                "POST",
                "/v1/realms",
                Some(&json!({"name": name, "owner_email": owner, "tier": tier})),
                true,
            )?;
            out(&v, &|v| {
                println!(
                    "Registered {} (owner {}, tier {}, expires {}).\nGet a key: macula keys create --realm {} --role admin --name first",
                    s(&v["name"]), s(&v["owner"]), s(&v["tier"]), s(&v["expires_at"]), s(&v["name"])
                )
            });
        }
        RealmsCmd::Show { name, .. } => {
            let v = api.send("GET", &format!("/v1/realms/{}", seg(&name)), None, true)?;
            out(&v, &print_realm);
        }
        RealmsCmd::Delete { name, yes, .. } => {
            if !yes {
                if !std::io::stdin().is_terminal() {
                    bail!("deleting {name} needs --yes when there is no terminal to confirm on");
                }
                eprint!("Delete realm {name}? Its keys stop working on every node. Type the name to confirm: ");
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if line.trim() != name {
                    bail!("not confirmed; nothing was deleted");
                }
            }
            api.send("DELETE", &format!("/v1/realms/{}", seg(&name)), None, true)?;
            out(&json!({"deleted": name}), &|_| println!("Deleted {name}."));
        }
        RealmsCmd::Renew { name, years, .. } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/renew", seg(&name)),
                Some(&json!({"years": years})),
                true,
            )?;
            out(&v, &|v| {
                println!("Renewed {} until {}.", s(&v["name"]), s(&v["expires_at"]))
            });
        }
        RealmsCmd::Transfer {
            name, code: None, ..
        } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/transfer-code", seg(&name)),
                None,
                true,
            )?;
            out(&v, &|v| {
                println!(
                    "Transfer code for {name} (valid until {}; shown once):\n\n  {}\n\nThe new owner runs: macula realms transfer {name} --code {}\n(a transfer fee of ${}.{:02} is recorded against their account)",
                    s(&v["expires_at"]),
                    s(&v["code"]),
                    s(&v["code"]),
                    v["fee_cents"].as_i64().unwrap_or(0) / 100,
                    v["fee_cents"].as_i64().unwrap_or(0) % 100
                )
            });
        }
        RealmsCmd::Transfer {
            name,
            code: Some(code),
            ..
        } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/transfer", seg(&name)),
                Some(&json!({"code": code})),
                true,
            )?;
            out(&v, &|v| {
                println!(
                    "You now own {} (fee {} cents recorded).",
                    s(&v["name"]),
                    v["fee_cents"]
                )
            });
        }
        RealmsCmd::Plan { name, tier, .. } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/plan", seg(&name)),
                Some(&json!({"tier": tier})),
                true,
            )?;
            out(&v, &|v| match v["scheduled"].as_object() {
                Some(sch) => println!(
                    "{name} stays on {} until {}, then moves to {}",
                    s(&v["tier"]),
                    sch["effective_at"].as_str().unwrap_or(""),
                    sch["tier"].as_str().unwrap_or("")
                ),
                None => println!("{name} is now on the {} plan", s(&v["tier"])),
            });
        }
        RealmsCmd::Addon {
            name, feature, off, ..
        } => {
            let v = api.send(
                "POST",
                &format!("/v1/realms/{}/addons", seg(&name)),
                Some(&json!({"feature": feature, "active": !off})),
                true,
            )?;
            out(&v, &|v| {
                println!(
                    "{} is {} for {name} (${:.2}/month)",
                    s(&v["title"]),
                    if off { "off" } else { "on" },
                    v["monthly_cents"].as_i64().unwrap_or(0) as f64 / 100.0
                )
            });
        }
        RealmsCmd::Policy {
            name,
            verified_roles,
            nodes,
            ..
        } => {
            let path = format!("/v1/realms/{}/policy", seg(&name));
            let v = api.send("GET", &path, None, true)?;
            let mut doc: macula_router::policy::PolicyDoc =
                serde_json::from_value(v).map_err(|e| {
                    anyhow::anyhow!("the registry sent a policy this CLI cannot read: {e}")
                })?;
            let v = if crate::local::change_policy(&mut doc, verified_roles, nodes.as_deref()) {
                api.send(
                    "PUT",
                    &path,
                    Some(&json!({
                        "roles": doc.roles,
                        "topic_acls": doc.topic_acls,
                        "nodes": nodes.is_some().then_some(&doc.nodes),
                        "verified_roles": verified_roles.map(|_| doc.verified_roles),
                        "expected_version": doc.version,
                    })),
                    true,
                )?
            } else {
                serde_json::to_value(&doc)?
            };
            out(&v, &|v| match serde_json::from_value(v.clone()) {
                Ok(doc) => crate::local::print_policy(&doc),
                Err(_) => println!("{v}"),
            });
        }
        RealmsCmd::Acl {
            name,
            add_user,
            role,
            remove_user,
            ..
        } => {
            if let (Some(email), Some(role)) = (&add_user, &role) {
                let v = api.send(
                    "POST",
                    &format!("/v1/realms/{}/members", seg(&name)),
                    Some(&json!({"email": email, "role": role})),
                    true,
                )?;
                out(&v, &|v| {
                    println!(
                        "{} is {} in {} (policy version {}).",
                        s(&v["email"]),
                        s(&v["role"]),
                        name,
                        v["policy_version"]
                    )
                });
            } else if let Some(email) = &remove_user {
                api.send(
                    "DELETE",
                    &format!("/v1/realms/{}/members/{}", seg(&name), seg(email)),
                    None,
                    true,
                )?;
                out(&json!({"removed": email}), &|_| {
                    println!("Removed {email} from {name}.")
                });
            } else {
                let v = api.send(
                    "GET",
                    &format!("/v1/realms/{}/members", seg(&name)),
                    None,
                    true,
                )?;
                out(&v, &|v| {
                    println!("{:<40} ROLE", "MEMBER");
                    for m in v["items"].as_array().into_iter().flatten() {
                        println!("{:<40} {}", s(&m["email"]), s(&m["role"]));
                    }
                });
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: Server,
    /// The realm [default: your only realm].
    #[arg(long)]
    pub realm: Option<String>,
}

/// `macula status --realm R`: the realm's registry record and its live sessions on the node.
pub fn status(a: StatusArgs, json: bool) -> Result<()> {
    let api = Api::new(&a.server)?;
    let realm = pick_realm(&api, a.realm)?;
    let v = api.send("GET", &format!("/v1/realms/{}", seg(&realm)), None, true)?;
    if json {
        println!("{v}");
    } else {
        print_realm(&v);
    }
    Ok(())
}
