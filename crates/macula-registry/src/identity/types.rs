//! The requests and responses of identity's routes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An email address and a password: signing up (`POST /v1/accounts`) or logging in
/// (`POST /v1/sessions`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub email: String,
    /// At least 10 characters.
    pub password: String,
    /// What the session is for, shown in the audit log (`cli`, `console`...; default `api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// A verification code mailed to an address.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyCode {
    pub code: String,
}

/// A new address for the account (the change happens when the code mailed to it is verified).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailChange {
    pub email: String,
    /// The account's password.
    pub password: String,
}

/// Whether a verification code was mailed, and if not, why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Verification {
    pub sent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// How it was sent (`log`, `smtp`, `directory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A new account (its address not yet verified).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NewAccount {
    pub id: String,
    pub email: String,
    pub created_at: String,
    pub email_verified: bool,
    pub verification: Verification,
}

/// A session: send `token` as `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Session {
    /// `mcs_...`
    pub token: String,
    pub email: String,
    pub expires_at: String,
}

/// The signed-in account.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Account {
    pub id: String,
    pub email: String,
    pub email_verified: bool,
    /// A platform operator (`registry.operators`, with a verified address).
    pub operator: bool,
}

/// An address proven by its code.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifiedEmail {
    pub id: String,
    pub email: String,
    pub email_verified: bool,
}

/// A change of address under way.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PendingEmail {
    /// The address the account keeps until the new one is verified.
    pub email: String,
    pub pending_email: String,
    pub verification: Verification,
}
