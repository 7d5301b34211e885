//! # macula-registry
//!
//! The control plane as a service any node can host: accounts and sessions, the realm registry
//! (register, renew, expiry with grace, transfer with an authorization code, subrealm delegation,
//! disputes), members and roles, versioned realm policies, API keys and an append-only audit log.
//!
//! Storage is one repository layer ([`db`]) over embedded SQLite or PostgreSQL. Keys are the
//! offline-verifiable credentials of the data plane, signed by each realm's authority; the
//! registry writes every realm's newest policy into the hosting node's config directory, and the
//! node floods it to the mesh. No database is on the data plane's path.

pub mod billing;
pub mod db;
pub mod error;
pub mod http;
pub mod kek;
pub mod mail;
pub mod registry;
pub mod testpg;

pub use db::{Backend, Db};
pub use error::{ApiError, ApiResult};
pub use registry::{Actor, Registry, RegistryConfig};

use std::sync::Arc;
use std::time::Duration;

use macula_node::{ConfDir, Node, RegistrySection};

impl RegistryConfig {
    /// The settings of a node's `registry:` section.
    pub fn from_section(s: &RegistrySection) -> RegistryConfig {
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
            kek: match std::env::var(kek::KEK_ENV) {
                Ok(hex) if !hex.trim().is_empty() => kek::KekSource::Hex(hex),
                _ => kek::KekSource::File(s.kek_file.clone()),
            },
        }
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
    let db = Db::open(database).await?;
    let reg = Registry::new(
        db,
        RegistryConfig::from_section(section),
        dir.clone(),
        Some(node.clone()),
    )
    .await?;
    if reg.mail_kind() == "log" && !node.config.listen.http.ip().to_canonical().is_loopback() {
        tracing::warn!(
            "registry.mail.url is not set: verification codes are written to this log, not mailed. \
             Anyone who reads the log can prove any address. Set registry.mail.url (smtps://…) before \
             serving the registry to a network"
        );
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
        }
    });
    let router = http::router(reg.clone(), section.max_body);
    Ok((reg, router))
}
