//! # macula-router
//!
//! The WAMP router core, sans-IO: [`Realm`] holds sessions, the [`broker`] and the [`dealer`];
//! [`auth`] turns a HELLO into an authenticated identity using self-contained signed API keys;
//! [`policy`] evaluates the realm's roles and ACLs (default deny) on every operation.
//!
//! Messages come in as values and go out through each session's [`Peer`]; time is passed in.
//! This crate must never open a socket, spawn a task, read a clock or touch storage, so that
//! every rule here is tested deterministically and reused unchanged by the mesh.

pub mod auth;
pub mod broker;
pub mod dealer;
pub mod ids;
pub mod policy;
mod realm;

pub use realm::{
    error, Announce, Announcer, Forwarded, Holder, LinkError, Origin, Peer, Realm, RealmConfig,
    SessionInfo,
};
