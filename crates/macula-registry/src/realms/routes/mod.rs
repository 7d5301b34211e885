//! The HTTP handlers of realms: `realms.rs` (realms, members, policy), `keys.rs` (API keys,
//! the audit log), `operator.rs` (`/v1/admin/realms/*`).

mod keys;
mod operator;
mod realms;

pub(crate) use self::{keys::*, operator::*, realms::*};
