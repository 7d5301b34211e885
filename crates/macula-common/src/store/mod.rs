//! The storage layer of the control-plane services (feature `storage`): one `sqlx` Any pool
//! over embedded SQLite (the default) or PostgreSQL, write transactions (with SQLite's group
//! committer), and the runner of a service's versioned migrations ([`Schema`]) on start.
//! [`testpg`] starts a throwaway PostgreSQL for tests. One file of 600 lines with its tests:
//! the transaction types, the group committer and the pool they share are one mechanism.
//!
//! Every query of a service is written once, in the SQL both engines accept: `$n` placeholders
//! (SQLite reads them as numbered parameters), `BIGINT` for every integer and time (Unix
//! seconds), `TEXT` for everything else, and no booleans. The only per-engine difference is how
//! an auto-incrementing key is declared (`{serial}` in the migrations).

pub mod testpg;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::any::AnyPoolOptions;
use sqlx::pool::PoolConnection;
use sqlx::{AnyPool, Executor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One schema step. Versions only grow; a released step is never edited.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    /// SQL both engines accept; `{serial}` stands for an auto-incrementing key.
    pub sql: &'static str,
}

/// A service's schema: its name (for messages and logs) and its steps, in order.
pub struct Schema {
    pub name: &'static str,
    pub migrations: &'static [Migration],
}

impl Schema {
    /// The version this build migrates to.
    pub fn newest(&self) -> i64 {
        self.migrations.last().map_or(0, |m| m.version)
    }
}

/// The database behind a service.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    schema: &'static Schema,
    /// SQLite: the one connection that writes, its own pool of one, so that writers queue
    /// (fairly, in this process, never sleeping in SQLite's busy handler) and never wait
    /// behind readers for a connection. PostgreSQL: `pool`.
    writes: AnyPool,
    /// SQLite: the group committer's queue (see [`group_commit`]).
    batches: tokio::sync::mpsc::UnboundedSender<Batch>,
}

/// A write transaction (see [`Db::begin`]); derefs to its connection. Dropped without
/// [`WriteTx::commit`], it rolls back.
pub struct WriteTx {
    inner: Inner,
    /// Writes queued by [`WriteTx::defer`], sent with the COMMIT.
    deferred: Vec<(&'static str, Vec<Arg>)>,
}

/// A value bound to a deferred statement.
#[derive(Debug, Clone)]
pub enum Arg {
    Text(String),
    Int(i64),
    Null,
}

impl From<&str> for Arg {
    fn from(s: &str) -> Arg {
        Arg::Text(s.to_owned())
    }
}

impl From<String> for Arg {
    fn from(s: String) -> Arg {
        Arg::Text(s)
    }
}

impl From<&String> for Arg {
    fn from(s: &String) -> Arg {
        Arg::Text(s.clone())
    }
}

impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::Int(v)
    }
}

impl<T: Into<Arg>> From<Option<T>> for Arg {
    fn from(v: Option<T>) -> Arg {
        v.map_or(Arg::Null, Into::into)
    }
}

/// Binds `args` to `q` in order.
pub fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::Int(v) => q.bind(v),
            Arg::Null => q.bind(None::<String>),
        };
    }
    q
}

/// `sql` with each placeholder `$n` renumbered to `$(n + offset)`.
fn shift_placeholders(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '\'' {
            quoted = !quoted;
        }
        if c != '$' || quoted {
            continue;
        }
        let mut n = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            n.push(*d);
            chars.next();
        }
        match n.parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&n),
        }
    }
    out
}

enum Inner {
    /// PostgreSQL: sqlx's transaction.
    Pool(sqlx::Transaction<'static, sqlx::Any>),
    /// SQLite: `BEGIN IMMEDIATE` and `COMMIT` sent as plain statements on a pooled connection,
    /// while this process's writer lock is held. sqlx's own transactions hand BEGIN and COMMIT
    /// to the SQLite thread as rendezvous messages (two thread wake-ups each); this way each is
    /// one, which is most of what a small write costs (see ARCHITECTURE.md, "registry").
    Sqlite {
        conn: Option<PoolConnection<sqlx::Any>>,
    },
    /// SQLite, from [`Db::begin_batch`]: queued statements only, handed to the group committer.
    Batch(tokio::sync::mpsc::UnboundedSender<Batch>),
}

/// A batch transaction's statements, and where its outcome goes.
struct Batch {
    stmts: Vec<(&'static str, Vec<Arg>)>,
    done: tokio::sync::oneshot::Sender<sqlx::Result<()>>,
}

/// (`BEGIN IMMEDIATE` if `begin`), the statements of `batches`, `COMMIT`: one SQL text and
/// its arguments.
fn batch_sql(begin: bool, batches: &[&[(&'static str, Vec<Arg>)]]) -> (String, Vec<Arg>) {
    let mut sql = String::from(if begin { "BEGIN IMMEDIATE;\n" } else { "" });
    let mut all = vec![];
    for stmts in batches {
        for (stmt, args) in stmts.iter() {
            sql.push_str(&shift_placeholders(stmt, all.len()));
            sql.push_str(";\n");
            all.extend(args.iter().cloned());
        }
    }
    sql.push_str("COMMIT");
    (sql, all)
}

/// SQLite's group committer: batch transactions that queue while one is being written are
/// written together, as one SQLite transaction, in one round trip to the database thread. If
/// that fails (a guard statement of one of them, say), each is written again on its own, so
/// every batch gets its own outcome.
async fn group_commit(writes: AnyPool, mut rx: tokio::sync::mpsc::UnboundedReceiver<Batch>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < 64 {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let mut conn = match writes.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let msg = e.to_string();
                for b in group {
                    let _ = b.done.send(Err(sqlx::Error::Protocol(msg.clone())));
                }
                continue;
            }
        };
        if group.len() > 1 {
            let all: Vec<&[(&'static str, Vec<Arg>)]> =
                group.iter().map(|b| b.stmts.as_slice()).collect();
            let (sql, args) = batch_sql(true, &all);
            match bind_all(sqlx::query(&sql), args).execute(&mut *conn).await {
                Ok(_) => {
                    for b in group {
                        let _ = b.done.send(Ok(()));
                    }
                    continue;
                }
                // Nothing of the group was written; each on its own, below.
                Err(_) => {
                    let _ = conn.execute("ROLLBACK").await;
                }
            }
        }
        for b in group {
            let (sql, args) = batch_sql(true, &[&b.stmts]);
            let r = bind_all(sqlx::query(&sql), args).execute(&mut *conn).await;
            if r.is_err() {
                // Fails harmlessly when the error was the BEGIN's own.
                let _ = conn.execute("ROLLBACK").await;
            }
            let _ = b.done.send(r.map(|_| ()));
        }
    }
}

impl WriteTx {
    /// Queues a write (`sql` with placeholders `$1`..) whose outcome the transaction does not
    /// need before it commits; an audit row, say. It is part of the transaction all the same:
    /// if it fails, [`WriteTx::commit`] returns its error and nothing is written. On SQLite the
    /// queued writes travel to the database thread in one batch with the COMMIT.
    pub fn defer(&mut self, sql: &'static str, args: Vec<Arg>) {
        self.deferred.push((sql, args));
    }

    pub async fn commit(mut self) -> sqlx::Result<()> {
        let deferred = std::mem::take(&mut self.deferred);
        match std::mem::replace(&mut self.inner, Inner::Sqlite { conn: None }) {
            Inner::Batch(committer) => {
                let (done, outcome) = tokio::sync::oneshot::channel();
                let gone = || sqlx::Error::Protocol("the registry's writer stopped".into());
                committer
                    .send(Batch {
                        stmts: deferred,
                        done,
                    })
                    .map_err(|_| gone())?;
                outcome.await.map_err(|_| gone())?
            }
            Inner::Sqlite { conn } => {
                // Put back for Drop to roll back should this fail.
                self.inner = Inner::Sqlite { conn };
                let Inner::Sqlite { conn: Some(c) } = &mut self.inner else {
                    return Ok(());
                };
                let (sql, args) = batch_sql(false, &[&deferred]);
                bind_all(sqlx::query(&sql), args).execute(&mut **c).await?;
                // Committed: nothing left for Drop to roll back.
                self.inner = Inner::Sqlite { conn: None };
                Ok(())
            }
            Inner::Pool(mut tx) => {
                for (stmt, args) in deferred {
                    bind_all(sqlx::query(stmt), args).execute(&mut *tx).await?;
                }
                tx.commit().await
            }
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        let Inner::Sqlite { conn } = &mut self.inner else {
            return;
        };
        let Some(mut c) = conn.take() else {
            return;
        };
        // Not committed (an error, or the request was cancelled): roll back before the
        // connection returns to the pool (so the next writer waits for it). Without a runtime
        // the connection is closed instead, which makes SQLite roll back.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    // It fails where the transaction never began (its BEGIN failed):
                    // then a fresh connection replaces this one, in doubt.
                    if let Err(e) = c.execute("ROLLBACK").await {
                        tracing::debug!(error = %e, "registry rollback failed; closing the connection");
                        drop(c.detach());
                    }
                });
            }
            Err(_) => drop(c.detach()),
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        match &self.inner {
            Inner::Batch(_) => panic!("a write batch only queues statements (WriteTx::defer)"),
            Inner::Pool(tx) => tx,
            Inner::Sqlite { conn, .. } => conn
                .as_ref()
                .expect("a live transaction has its connection"),
        }
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        match &mut self.inner {
            Inner::Batch(_) => panic!("a write batch only queues statements (WriteTx::defer)"),
            Inner::Pool(tx) => tx,
            Inner::Sqlite { conn, .. } => conn
                .as_mut()
                .expect("a live transaction has its connection"),
        }
    }
}

/// The file of a `sqlite:` URL, if it names one (not `:memory:`).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| path.into())
}

/// The database holds password hashes, sessions and (sealed) realm secrets: it and its WAL and
/// shared-memory files are readable by this user only. SQLite creates `-wal` and `-shm` with the
/// database file's mode, so the file is created 0600 before SQLite opens it, and files left
/// readable by an older version are made 0600.
fn make_private(url: &str) -> Result<()> {
    let Some(path) = sqlite_file(url) else {
        return Ok(());
    };
    if !path.exists() && !url.contains("mode=rwc") {
        // SQLite will say the file is missing.
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let f = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if f.exists() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("making {} private", f.display()))?;
            }
        }
    }
    Ok(())
}

impl Db {
    /// Opens `url` (`sqlite://PATH`, `postgres://...`) and brings it up to `schema`.
    pub async fn open(url: &str, schema: &'static Schema) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            bail!("unsupported database URL {url:?}: use sqlite://PATH or postgres://USER@HOST/DB")
        };
        let opts = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        let ctx = || format!("cannot open the {} database {}", schema.name, redact(url));
        let (pool, writes) = match backend {
            // Readers run in parallel (WAL); the writer is one connection of its own. The
            // embedded database has no network link to go stale: no ping per acquire.
            Backend::Sqlite => {
                make_private(url)?;
                let sqlite = |opts: AnyPoolOptions, n| {
                    opts.max_connections(n)
                        .test_before_acquire(false)
                        .after_connect(|conn, _| {
                            Box::pin(async move {
                                conn.execute(
                                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; \
                                     PRAGMA mmap_size = 268435456;",
                                )
                                .await?;
                                Ok(())
                            })
                        })
                };
                let pool = sqlite(opts.clone(), 4)
                    .connect(url)
                    .await
                    .with_context(ctx)?;
                (pool, sqlite(opts, 1).connect(url).await.with_context(ctx)?)
            }
            Backend::Postgres => {
                let pool = opts
                    .max_connections(8)
                    .connect(url)
                    .await
                    .with_context(ctx)?;
                (pool.clone(), pool)
            }
        };
        let (batches, queue) = tokio::sync::mpsc::unbounded_channel();
        if backend == Backend::Sqlite {
            tokio::spawn(group_commit(writes.clone(), queue));
        }
        let db = Db {
            pool,
            writes,
            batches,
            backend,
            schema,
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
                // The transaction exists before its BEGIN is sent, so that a request cancelled
                // meanwhile still rolls back (Drop) rather than pooling an open transaction.
                let mut tx = WriteTx {
                    inner: Inner::Sqlite {
                        conn: Some(self.writes.acquire().await?),
                    },
                    deferred: vec![],
                };
                tx.execute("BEGIN IMMEDIATE").await?;
                Ok(tx)
            }
            Backend::Postgres => Ok(WriteTx {
                inner: Inner::Pool(self.writes.begin().await?),
                deferred: vec![],
            }),
        }
    }

    /// A write transaction of queued statements only ([`WriteTx::defer`]): on SQLite the BEGIN
    /// travels with them and the COMMIT, so the whole transaction is one round trip to the
    /// database thread, shared with the batches queued meanwhile ([`group_commit`]). For
    /// writes whose reads were made before, and are checked by a guard statement in the batch
    /// (see `write_guard` in the migrations).
    pub async fn begin_batch(&self) -> sqlx::Result<WriteTx> {
        match self.backend {
            Backend::Sqlite => Ok(WriteTx {
                inner: Inner::Batch(self.batches.clone()),
                deferred: vec![],
            }),
            Backend::Postgres => self.begin().await,
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
    pub async fn sqlite(path: &Path, schema: &'static Schema) -> Result<Db> {
        Db::open(&format!("sqlite://{}?mode=rwc", path.display()), schema).await
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
        let newest = self.schema.newest();
        if let Some(v) = applied.iter().max().filter(|v| **v > newest) {
            bail!(
                "the {} database has schema version {v}, newer than this macula knows ({newest}); upgrade macula",
                self.schema.name
            );
        }
        let serial = match self.backend {
            Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Backend::Postgres => "BIGSERIAL PRIMARY KEY",
        };
        for m in self
            .schema
            .migrations
            .iter()
            .filter(|m| !applied.contains(&m.version))
        {
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
            .bind(crate::time::now_secs() as i64)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(
                schema = self.schema.name,
                version = m.version,
                "schema migrated"
            );
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
    fn placeholders_shift_for_batching() {
        assert_eq!(
            super::shift_placeholders("INSERT INTO t VALUES ($1, $2, '$', $10)", 3),
            "INSERT INTO t VALUES ($4, $5, '$', $13)"
        );
        assert_eq!(
            super::shift_placeholders("SELECT '$1 it''s', $2", 1),
            "SELECT '$1 it''s', $3"
        );
        assert_eq!(super::shift_placeholders("SELECT 1", 5), "SELECT 1");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
