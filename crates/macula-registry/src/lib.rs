//! # macula-registry
//!
//! The control plane as a service any node can host: accounts and sessions, the realm registry
//! (register, renew, expiry with grace, transfer with an authorization code, subrealm delegation,
//! disputes), members and roles, versioned realm policies, API keys and an append-only audit log.
//!
//! Storage is one repository layer ([`db`]) over embedded SQLite or PostgreSQL. Keys are the
//! offline-verifiable credentials of the data plane, signed by each realm's authority; the
//! registry writes every realm's newest policy into the hosting node's config directory, and the
//! node floods it to the mesh. No database is on the data plane's path. The node hosts the
//! registry through [`Host`] (the wiring is in the `macula` crate); the registry does not import
//! the node.

pub mod billing;
pub mod db;
pub mod error;
pub mod http;
pub mod hub;
pub mod identity;
pub mod kek;
pub mod mail;
pub(crate) mod prelude;
pub mod realms;
pub mod service;
/// A throwaway PostgreSQL for tests (from the shared storage layer).
pub use macula_common::store::testpg;

pub use db::{Backend, Db};
pub use error::{ApiError, ApiResult};
pub use service::{Actor, Host, Registry, RegistryConfig};
