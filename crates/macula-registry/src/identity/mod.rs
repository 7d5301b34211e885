//! Identity: accounts, sessions (login, logout, lock-outs) and email ownership.
//!
//! - `types.rs`: the requests and responses of its routes;
//! - `accounts.rs`: sign-up, login, sessions, authentication of a bearer;
//! - `email.rs`: proving an address (verification codes, resends, changing the address);
//! - `routes.rs`: the HTTP handlers (`/v1/accounts`, `/v1/account/*`, `/v1/sessions*`).

mod accounts;
mod email;
pub(crate) mod routes;
pub mod types;

#[allow(unused_imports)]
pub use self::{accounts::*, email::*, types::*};
