//! # macula-common
//!
//! The pieces both planes use, so that neither imports the other: the node (data plane) and the
//! registry and billing services (control plane) depend on this crate, and it depends on nothing
//! of Macula's.
//!
//! - [`time`]: Unix seconds, RFC 3339, the UTC calendar (months for billing).
//! - [`ids`]: random identifiers and secrets (`key_…`, `mcs_…`).
//! - [`secret`]: files that hold secrets (mode 0600 from the first byte).
//! - [`usage`]: the usage report a node delivers and the aggregator ingests.
//! - [`policy`]: the realm policy document (roles, users, keys, topic ACLs) and the default one.
//! - [`prices`]: the price list (plans and add-ons) that both quota enforcement and invoicing read.
//! - `store` (feature `storage`, for the control-plane services): the database pool over SQLite
//!   or PostgreSQL, write transactions, the migrations runner, a throwaway PostgreSQL for tests.

pub mod ids;
pub mod policy;
pub mod prices;
pub mod secret;
#[cfg(feature = "storage")]
pub mod store;
pub mod time;
pub mod usage;
