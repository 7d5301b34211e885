//! Realms: the registry of names and everything an owner manages in one.
//!
//! - `types.rs`: the requests and responses of its routes;
//! - `registration.rs`: who may see a realm (access), registering (subrealm delegation
//!   included), showing, listing, renewing, deleting;
//! - `transfer.rs`: the owner's authorization code and the new owner taking over;
//! - `members.rs`: members and roles, and the realm's versioned policy;
//! - `keys.rs`: API keys (issue, list, revoke);
//! - `audit.rs`: the append-only log, written in every change's transaction;
//! - `disputes.rs`: the operators' tools (claims, freeze, suspend, forced transfer);
//! - `expiry.rs`: the end of a term and its grace period;
//! - `node_copy.rs`: the hosting node's copy of every realm (its config directory);
//! - `routes/`: the HTTP handlers (`realms.rs` realms, members, policy; `keys.rs` keys and the
//!   audit log; `operator.rs` `/v1/admin/realms/*`).

mod audit;
mod disputes;
mod expiry;
mod keys;
mod members;
mod node_copy;
mod registration;
pub(crate) mod routes;
mod transfer;
pub mod types;

#[allow(unused_imports)]
pub use self::{
    audit::*, disputes::*, expiry::*, keys::*, members::*, node_copy::*, registration::*,
    transfer::*, types::*,
};
