//! What every service file imports: the crate's services and shared items, and the external
//! items they all use. A file of a capability starts with `use crate::prelude::*;`.

pub(crate) use std::collections::HashMap;
pub(crate) use std::net::IpAddr;
pub(crate) use std::sync::Arc;
pub(crate) use std::time::{Duration, Instant};

pub(crate) use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
pub(crate) use argon2::Argon2;
pub(crate) use axum::http::StatusCode;
pub(crate) use ed25519_dalek::SigningKey;
pub(crate) use macula_common::time::{now_secs, rfc3339};
pub(crate) use macula_confdir::ConfDir;
pub(crate) use macula_router::auth::credential::{self, AuthorityCert, KeyClaims, SignedCert};
pub(crate) use macula_router::policy::{Policy, PolicyDoc, UserDoc};
pub(crate) use parking_lot::Mutex;
pub(crate) use serde::{Deserialize, Serialize};
pub(crate) use serde_json::{json, Value};
pub(crate) use sha2::{Digest, Sha256};
pub(crate) use sqlx::any::AnyRow;
pub(crate) use sqlx::{AnyConnection, Row};

pub(crate) use crate::db::{Db, WriteTx};
pub(crate) use crate::error::{is_unique_violation, ApiError, ApiResult};

pub(crate) use crate::identity::*;
pub(crate) use crate::realms::*;
pub(crate) use crate::service::*;
