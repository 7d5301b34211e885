//! The registry's database: the storage layer every control-plane service shares
//! (`macula_common::store`: one `sqlx` Any pool over embedded SQLite or PostgreSQL, write
//! transactions, the migrations runner) opened with the registry's schema (`migrations.rs`).
//!
//! Every query in this crate is written once, in the SQL both engines accept: `$n` placeholders
//! (SQLite reads them as numbered parameters), `BIGINT` for every integer and time (Unix
//! seconds), `TEXT` for everything else, and no booleans. The only per-engine difference is how
//! an auto-incrementing key is declared (`{serial}` in the migrations).

mod migrations;

use std::path::Path;

pub use macula_common::store::{bind_all, redact, Arg, Backend, Db, WriteTx};
pub use migrations::SCHEMA;

/// Opens the registry's database at `url` (`sqlite://PATH`, `postgres://...`) and brings its
/// schema up to date.
pub async fn open(url: &str) -> anyhow::Result<Db> {
    Db::open(url, &SCHEMA).await
}

/// The registry's SQLite database in file `path` (created if missing).
pub async fn sqlite(path: &Path) -> anyhow::Result<Db> {
    Db::sqlite(path, &SCHEMA).await
}

/// The schema version this build migrates to.
pub fn newest_schema() -> i64 {
    SCHEMA.newest()
}
