//! The repository's connection: one `sqlx` Any pool over embedded SQLite (the default) or
//! PostgreSQL, and the versioned migrations run on start.
//!
//! Every query in this crate is written once, in the SQL both engines accept: `$n` placeholders
//! (SQLite reads them as numbered parameters), `BIGINT` for every integer and time (Unix
//! seconds), `TEXT` for everything else, and no booleans. The only per-engine difference is how
//! an auto-incrementing key is declared (`{serial}` in the migrations).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database behind the registry.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    /// SQLite's writers, one at a time.
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// A write transaction (see [`Db::begin`]); derefs to its connection.
pub struct WriteTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _writer: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub async fn commit(self) -> sqlx::Result<()> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }
}

/// One schema step. Versions only grow; a released step is never edited.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "accounts, realms, policy versions, members, keys, transfers, fees, claims, audit",
    sql: r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    failed_logins BIGINT NOT NULL DEFAULT 0,
    locked_until BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    client TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE realms (
    name TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES accounts(id),
    parent TEXT,
    tier TEXT NOT NULL,
    suspended TEXT NOT NULL DEFAULT '',
    frozen TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    authority_key TEXT NOT NULL,
    authority_cert TEXT NOT NULL,
    policy_version BIGINT NOT NULL
);
CREATE INDEX realms_owner ON realms(owner_id, name);
CREATE TABLE policy_versions (
    realm TEXT NOT NULL REFERENCES realms(name) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    doc TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (realm, version)
);
CREATE TABLE members (
    realm TEXT NOT NULL REFERENCES realms(name) ON DELETE CASCADE,
    email TEXT NOT NULL,
    role TEXT NOT NULL,
    added_by TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (realm, email)
);
CREATE INDEX members_email ON members(email, realm);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    realm TEXT NOT NULL REFERENCES realms(name) ON DELETE CASCADE,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    pubkey TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_realm ON api_keys(realm, id);
CREATE TABLE transfer_codes (
    realm TEXT PRIMARY KEY REFERENCES realms(name) ON DELETE CASCADE,
    code_hash TEXT NOT NULL,
    created_by TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE fees (
    id {serial},
    account_id TEXT NOT NULL,
    realm TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE claims (
    id TEXT PRIMARY KEY,
    realm TEXT NOT NULL,
    claimant TEXT NOT NULL,
    note TEXT NOT NULL,
    status TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE audit (
    id {serial},
    realm TEXT,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    remote TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX audit_realm ON audit(realm, id);
CREATE TABLE idempotency (
    account_id TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, key)
);
"#,
}];

impl Db {
    /// Opens `url` (`sqlite://PATH`, `postgres://...`) and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            bail!("unsupported database URL {url:?}: use sqlite://PATH or postgres://USER@HOST/DB")
        };
        let opts = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        let opts = match backend {
            // Readers run in parallel (WAL); writers take the write lock when they begin
            // (`Db::begin`), so no transaction deadlocks upgrading a read to a write.
            Backend::Sqlite => opts.max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                    )
                    .await?;
                    Ok(())
                })
            }),
            Backend::Postgres => opts.max_connections(8),
        };
        let pool = opts
            .connect(url)
            .await
            .with_context(|| format!("cannot open the registry database {}", redact(url)))?;
        let db = Db {
            pool,
            backend,
            writer: Default::default(),
        };
        db.migrate().await?;
        Ok(db)
    }

    /// Starts a write transaction. On SQLite, writers queue in this process (no sleeping in
    /// SQLite's busy handler) and take the write lock at once (`BEGIN IMMEDIATE`), so a read
    /// inside the transaction never has to be upgraded to a write.
    pub async fn begin(&self) -> sqlx::Result<WriteTx> {
        match self.backend {
            Backend::Sqlite => {
                let guard = self.writer.clone().lock_owned().await;
                let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
                Ok(WriteTx {
                    tx,
                    _writer: Some(guard),
                })
            }
            Backend::Postgres => Ok(WriteTx {
                tx: self.pool.begin().await?,
                _writer: None,
            }),
        }
    }

    /// Wraps `select` (whose columns are named `fields`) so that the database returns its rows
    /// as one JSON array, in `order` order. The one place where the engines' SQL differs in a
    /// query: sqlx's SQLite driver hands rows over one at a time between threads, which made a
    /// page of 50 cost 50 wake-ups (measured: 784 → see ARCHITECTURE.md requests/s).
    pub fn json_rows(&self, select: &str, fields: &[&str], order: &str) -> String {
        let pairs: Vec<String> = fields.iter().map(|f| format!("'{f}', t.{f}")).collect();
        let pairs = pairs.join(", ");
        match self.backend {
            Backend::Sqlite => format!(
                "SELECT COALESCE(json_group_array(json_object({pairs})), '[]') FROM ({select}) t"
            ),
            Backend::Postgres => format!(
                "SELECT COALESCE(json_agg(json_build_object({pairs}) ORDER BY t.{order}), '[]')::text FROM ({select}) t"
            ),
        }
    }

    /// The SQLite database in file `path` (created if missing).
    pub async fn sqlite(path: &Path) -> Result<Db> {
        Db::open(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, \
             name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .context("creating schema_migrations")?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
            .fetch_all(&self.pool)
            .await?;
        let newest = MIGRATIONS.last().map_or(0, |m| m.version);
        if let Some(v) = applied.iter().max().filter(|v| **v > newest) {
            bail!("the registry database has schema version {v}, newer than this macula knows ({newest}); upgrade macula");
        }
        let serial = match self.backend {
            Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Backend::Postgres => "BIGSERIAL PRIMARY KEY",
        };
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            let mut tx = self.pool.begin().await?;
            sqlx::raw_sql(&m.sql.replace("{serial}", serial))
                .execute(&mut *tx)
                .await
                .with_context(|| format!("migration {} ({})", m.version, m.name))?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(m.version)
            .bind(m.name)
            .bind(macula_node::confdir::now_secs() as i64)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(version = m.version, "registry schema migrated");
        }
        Ok(())
    }

    /// The schema version in use.
    pub async fn schema_version(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
