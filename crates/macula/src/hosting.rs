//! The node hosting the registry (control plane) through its narrow interface,
//! [`macula_registry::Host`]: the registry never imports the node, the node never imports the
//! registry; this is where they meet.

use std::sync::Arc;
use std::time::Duration;

use macula_node::{ConfDir, Node, RegistrySection};
use macula_registry::{billing, http, kek, mail, Registry, RegistryConfig};

/// The registry's settings from a node's `registry:` section.
pub fn registry_config(s: &RegistrySection) -> RegistryConfig {
    RegistryConfig {
        operators: s.operators.clone(),
        session_ttl: Duration::from_secs(s.session_ttl_days.max(1) * 86_400),
        max_failed_logins: i64::from(s.max_failed_logins.max(1)),
        lockout: Duration::from_secs(s.lockout_minutes * 60),
        login_attempts_per_minute: s.login_attempts_per_minute.max(1),
        term_days: s.term_days.max(1),
        grace_days: s.grace_days,
        transfer_fee_cents: s.transfer_fee_cents as i64,
        transfer_code_ttl: Duration::from_secs(s.transfer_code_ttl_hours.max(1) * 3600),
        prices: s.prices.clone(),
        verification_ttl: Duration::from_secs(s.verification_ttl_hours.max(1) * 3600),
        max_realms_per_account: s.max_realms_per_account,
        max_registrations_per_day: s.max_registrations_per_day,
        trusted_proxies: s.trusted_proxies.clone(),
        max_failed_logins_per_hour: s.max_failed_logins_per_hour as i64,
        mail: mail::MailConfig {
            url: s.mail.url.clone(),
            from: s.mail.from.clone(),
        },
        hub: macula_registry::hub::HubConfig {
            enabled: s.hub.enabled,
            dir: (!s.hub.dir.as_os_str().is_empty()).then(|| s.hub.dir.clone()),
            osv: (!s.hub.osv.as_os_str().is_empty()).then(|| s.hub.osv.clone()),
            max_blob: s.hub.max_blob.max(1),
            s3: s.hub.s3.clone(),
            certification_fee_cents: s.hub.certification_fee_cents.min(i64::MAX as u64) as i64,
            max_unpublished_bytes: s.hub.max_unpublished_bytes,
            upload_ttl: Duration::from_secs(s.hub.upload_ttl_secs),
            ..Default::default()
        },
        kek: match std::env::var(kek::KEK_ENV) {
            Ok(hex) if !hex.trim().is_empty() => kek::KekSource::Hex(hex),
            _ => kek::KekSource::File(s.kek_file.clone()),
        },
    }
}

/// The database URL a node's registry uses: `database` if given, else its section's, else
/// `registry.db` in the config directory.
pub fn database_url(dir: &ConfDir, section: &RegistrySection, database: Option<&str>) -> String {
    match database.filter(|d| !d.is_empty()) {
        Some(d) => d.to_owned(),
        None if !section.database.is_empty() => section.database.clone(),
        None => format!(
            "sqlite://{}?mode=rwc",
            dir.root.join("registry.db").display()
        ),
    }
}

/// Opens the registry for `node` (migrating its database), starts its expiry sweep, and returns
/// it with the routes to serve.
pub async fn host(
    node: &Arc<Node>,
    dir: &ConfDir,
    database: &str,
) -> anyhow::Result<(Arc<Registry>, axum::Router)> {
    let section = &node.config.registry;
    let db = macula_registry::db::open(database).await?;
    let reg = Registry::new(
        db,
        registry_config(section),
        dir.clone(),
        Some(Arc::new(NodeHost(node.clone()))),
    )
    .await?;
    if reg.mail_kind() == "log" && !node.config.listen.http.ip().to_canonical().is_loopback() {
        tracing::warn!(
            "registry.mail.url is not set: verification codes are written to this log, not mailed. \
             Anyone who reads the log can prove any address. Set registry.mail.url (smtps://…) before \
             serving the registry to a network"
        );
    }
    // This node installs packages from its own Hub: its root of trust, where the node reads it.
    if let Ok(t) = reg.hub_trust().await {
        let path = match &node.config.hub.root {
            p if p.is_relative() => dir.root.join(p),
            p => p.clone(),
        };
        if !path.exists() {
            if let Ok(bytes) = serde_json::to_vec_pretty(&t.root) {
                if let Err(e) = std::fs::write(&path, bytes) {
                    tracing::warn!("hub: writing its root of trust to {}: {e}", path.display());
                }
            }
        }
    }
    // The hosting node's usage goes straight to the aggregator.
    let _ = node
        .usage_sink
        .set(Arc::new(billing::LocalSink(Arc::downgrade(&reg))));
    let sweeper = Arc::downgrade(&reg);
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_secs(60));
        loop {
            iv.tick().await;
            let Some(reg) = sweeper.upgrade() else { return };
            if let Err(e) = reg.expire().await {
                tracing::error!("registry expiry sweep: {}", e.message);
            }
            if let Err(e) = reg.billing_tick().await {
                tracing::error!("billing: {}", e.message);
            }
            if let Err(e) = reg.hub_tick().await {
                tracing::error!("hub: {}", e.message);
            }
        }
    });
    let router = http::router(reg.clone(), section.max_body);
    Ok((reg, router))
}

/// The node as the registry's host.
struct NodeHost(Arc<Node>);

/// An HTTP client for this node's own API over loopback.
fn loopback_agent() -> Result<ureq::Agent, String> {
    crate::registry_cmds::http_agent(None, Duration::from_secs(30)).map_err(|e| e.to_string())
}

impl NodeHost {
    /// `path` on this node's own HTTP listener (over loopback).
    fn url(&self, path: &str) -> Result<String, String> {
        let addr = self
            .0
            .http_addr
            .get()
            .ok_or("the node's HTTP listener is not up yet")?;
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            addr.ip().to_string()
        };
        // Plain HTTP over loopback: what `tls.plaintext` allows by default.
        Ok(format!("http://{host}:{}{path}", addr.port()))
    }
}

impl macula_registry::Host for NodeHost {
    fn apply(&self) -> anyhow::Result<()> {
        self.0.reload()
    }

    fn verify_key(
        &self,
        key: &str,
    ) -> Result<macula_router::auth::credential::VerifiedKey, String> {
        self.0
            .auth()
            .authenticator
            .verify(key, macula_common::time::now_secs())
            .map_err(|e| e.to_string())
    }

    fn hub_changed(&self, version: u64) {
        self.0.work_inbox.push(
            "hub".to_owned(),
            macula_node::workloads::InMsg::Work(macula_workloads::wire::Work::HubChanged {
                version,
            }),
        );
    }

    fn deploy(
        &self,
        realm: &str,
        key: &str,
        kind: &str,
        name: &str,
        manifest: Option<String>,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        let url = self.url(&format!("/v1/realms/{realm}/{kind}/{name}"));
        let key = key.to_owned();
        Box::pin(async move {
            let url = url?;
            tokio::task::spawn_blocking(move || {
                let agent = loopback_agent()?;
                let auth = format!("Bearer {key}");
                let res = match manifest {
                    Some(m) => agent
                        .put(&url)
                        .header("Authorization", &auth)
                        .header("Content-Type", "application/yaml")
                        .send(m.as_bytes()),
                    None => agent.delete(&url).header("Authorization", &auth).call(),
                };
                let mut res = res.map_err(|e| format!("{url}: {e}"))?;
                let status = res.status().as_u16();
                let text = res.body_mut().read_to_string().unwrap_or_default();
                match status {
                    200..=299 => Ok(()),
                    _ => Err(format!("{url}: HTTP {status} {text}")),
                }
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn workload(
        &self,
        realm: &str,
        key: &str,
        kind: &str,
        name: &str,
    ) -> futures_util::future::BoxFuture<'static, Result<Option<serde_json::Value>, String>> {
        let url = self.url(&format!("/v1/realms/{realm}/{kind}/{name}"));
        let key = key.to_owned();
        Box::pin(async move {
            let url = url?;
            tokio::task::spawn_blocking(move || {
                let agent = loopback_agent()?;
                let mut res = agent
                    .get(&url)
                    .header("Authorization", &format!("Bearer {key}"))
                    .call()
                    .map_err(|e| format!("{url}: {e}"))?;
                let status = res.status().as_u16();
                let text = res.body_mut().read_to_string().unwrap_or_default();
                match status {
                    404 => Ok(None),
                    200 => serde_json::from_str(&text)
                        .map(Some)
                        .map_err(|e| e.to_string()),
                    _ => Err(format!("{url}: HTTP {status} {text}")),
                }
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn live_sessions(&self, realm: &str) -> usize {
        self.0
            .realm_handle(realm)
            .map_or(0, |h| h.lock().session_count())
    }

    fn set_quota_used(&self, realm: &str, used: f64) {
        self.0.quota_used.lock().insert(realm.to_owned(), used);
    }
}
