//! Workloads on this node: the desired state — signed deploy records
//! (`macula_workloads::record`) that arrive over HTTP or from peers, are checked against this
//! node's credentials, kept on disk and flooded to every peer like realm states — and the
//! controller that places, runs and heals their replicas with the other nodes.
//!
//! Below the node (import nothing of it): `desired.rs`, the records and their file;
//! `authority.rs`, this node as a lease authority, its promises on disk; `inbox.rs`, the
//! controller's bounded inbox; `tickets.rs`, replicas' identities. Above it: `accept.rs` judges a record with the node's trust root,
//! revocations and realm policies; `controller.rs` (above the mesh) tenders, bids, takes leases
//! and runs replicas.

pub mod accept;
pub mod authority;
pub mod controller;
pub mod desired;
pub mod inbox;
pub mod packages;
pub mod tickets;

pub use accept::accept;
pub use authority::LeaseAuthority;
pub use controller::Controller;
pub use desired::Desired;
pub use inbox::{InMsg, Inbox};
pub use tickets::Tickets;
