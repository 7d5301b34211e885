//! Error and reason URIs exactly as the WAMP specification names them, plus Macula's own.

pub const INVALID_URI: &str = "wamp.error.invalid_uri";
pub const NO_SUCH_PROCEDURE: &str = "wamp.error.no_such_procedure";
pub const PROCEDURE_ALREADY_EXISTS: &str = "wamp.error.procedure_already_exists";
pub const NO_SUCH_REGISTRATION: &str = "wamp.error.no_such_registration";
pub const NO_SUCH_SUBSCRIPTION: &str = "wamp.error.no_such_subscription";
pub const NO_SUCH_SESSION: &str = "wamp.error.no_such_session";
pub const INVALID_ARGUMENT: &str = "wamp.error.invalid_argument";
pub const SYSTEM_SHUTDOWN: &str = "wamp.close.system_shutdown";
pub const CLOSE_REALM: &str = "wamp.close.close_realm";
pub const GOODBYE_AND_OUT: &str = "wamp.close.goodbye_and_out";
pub const NORMAL: &str = "wamp.close.normal";
pub const PROTOCOL_VIOLATION: &str = "wamp.error.protocol_violation";
pub const NOT_AUTHORIZED: &str = "wamp.error.not_authorized";
pub const AUTHORIZATION_FAILED: &str = "wamp.error.authorization_failed";
pub const AUTHENTICATION_FAILED: &str = "wamp.error.authentication_failed";
pub const NO_AUTH_METHOD: &str = "wamp.error.no_auth_method";
pub const NO_SUCH_REALM: &str = "wamp.error.no_such_realm";
pub const NO_SUCH_ROLE: &str = "wamp.error.no_such_role";
pub const CANCELED: &str = "wamp.error.canceled";
pub const TIMEOUT: &str = "wamp.error.timeout";
pub const OPTION_NOT_ALLOWED: &str = "wamp.error.option_not_allowed";
pub const NO_ELIGIBLE_CALLEE: &str = "wamp.error.no_eligible_callee";
pub const OPTION_DISALLOWED_DISCLOSE_ME: &str = "wamp.error.option_disallowed.disclose_me";
pub const NETWORK_FAILURE: &str = "wamp.error.network_failure";
pub const PAYLOAD_SIZE_EXCEEDED: &str = "wamp.error.payload_size_exceeded";
pub const CALLEE_LOST: &str = "wamp.error.callee_lost";
/// Too many messages from one session in a short time (Macula's flood limit).
pub const RATE_LIMITED: &str = "macula.error.rate_limited";
/// The session's outgoing queue overflowed under the `disconnect` slow-consumer policy.
pub const SLOW_CONSUMER: &str = "macula.error.slow_consumer";
/// The session's credential was revoked while it was connected.
pub const CREDENTIAL_REVOKED: &str = "macula.error.credential_revoked";
/// The session's API key expired while the session was open.
pub const CREDENTIAL_EXPIRED: &str = "macula.error.credential_expired";
/// The node cannot serve this yet (it is still learning realm states from the mesh): retry.
pub const NOT_READY: &str = "macula.error.not_ready";
/// A configured per-session limit (subscriptions, registrations) was reached.
pub const LIMIT_EXCEEDED: &str = "macula.error.limit_exceeded";
pub const NOT_FOUND: &str = "macula.error.not_found";
/// The realm is suspended by the operator or expired past its grace period.
pub const REALM_DISABLED: &str = "macula.error.realm_disabled";
/// The realm used its plan's monthly quota (free tier): operations are refused until the next
/// month or an upgrade.
pub const QUOTA_EXCEEDED: &str = "macula.error.quota_exceeded";
