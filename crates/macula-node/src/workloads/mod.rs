//! Workloads on this node. So far: the desired state — signed deploy records
//! (`macula_workloads::record`) that arrive over HTTP or from peers, are checked against this
//! node's credentials, kept on disk and flooded to every peer like realm states.
//!
//! `desired.rs` (below the node: the records and their file) is what the node holds;
//! `authority.rs` (below the node) this node as a lease authority, its promises on disk;
//! `accept.rs` (above it) judges a record with the node's trust root, revocations and realm
//! policies.

pub mod accept;
pub mod authority;
pub mod desired;

pub use accept::accept;
pub use authority::LeaseAuthority;
pub use desired::Desired;
