//! The registry's rules, over the repository: accounts and sessions, realm registration,
//! renewal, expiry, transfer, delegation, disputes, members, policy versions, API keys, audit.
//!
//! Every change is one database transaction that also appends its audit entry, so a crash
//! leaves either all of it or none. After the commit the realm's newest policy version is
//! written to the node's config directory (`materialize`), from where the node applies it and
//! floods it, signed by the realm authority, to the mesh. A crash between the two is repaired on
//! start (`sync_all`): the database is the source of truth, the directory a copy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::StatusCode;
use ed25519_dalek::SigningKey;
use macula_common::time::{now_secs, rfc3339};
use macula_node::confdir::ConfDir;
use macula_router::auth::credential::{self, AuthorityCert, KeyClaims, SignedCert};
use macula_router::policy::{Policy, PolicyDoc, RoleDoc, TopicAclDoc, UserDoc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::db::{Db, WriteTx};
use crate::error::{is_unique_violation, ApiError, ApiResult};

/// Registry settings (the node's `registry:` section).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Accounts allowed to resolve disputes, freeze, suspend and force transfers.
    pub operators: Vec<String>,
    pub session_ttl: Duration,
    /// Failed logins in a row after which an account is locked for `lockout`.
    pub max_failed_logins: i64,
    pub lockout: Duration,
    /// Login attempts per minute from one address.
    pub login_attempts_per_minute: u32,
    /// A registration or renewal buys this many days.
    pub term_days: u64,
    /// After expiry the realm keeps working this many days; then it is disabled, and its name
    /// may be registered by someone else.
    pub grace_days: u64,
    pub transfer_fee_cents: i64,
    pub transfer_code_ttl: Duration,
    /// Plans and add-ons.
    pub prices: crate::billing::Prices,
    /// Where the key that seals authority secrets in the database comes from (see [`crate::kek`]).
    pub kek: crate::kek::KekSource,
    /// How mail (email verification) is sent (see [`crate::mail`]).
    pub mail: crate::mail::MailConfig,
    /// How long an email verification code is valid.
    pub verification_ttl: Duration,
    /// Realms (subrealms included) one account may hold; 0: no limit. Operators are exempt.
    pub max_realms_per_account: u64,
    /// Registrations one account may make in 24 hours; 0: no limit. Operators are exempt.
    pub max_registrations_per_day: u64,
    /// Reverse proxies whose `X-Forwarded-For` is believed (their own address otherwise stands
    /// for every client behind them, and lock-outs would hit them all).
    pub trusted_proxies: Vec<IpAddr>,
    /// Failed logins to one account, from all sources, in an hour, past which only sources that
    /// logged in to it before may try (an owner's usual addresses keep working while many
    /// addresses guess). 0: no such limit.
    pub max_failed_logins_per_hour: i64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            operators: vec![],
            session_ttl: Duration::from_secs(30 * 86_400),
            max_failed_logins: 5,
            lockout: Duration::from_secs(15 * 60),
            login_attempts_per_minute: 30,
            term_days: 365,
            grace_days: 30,
            transfer_fee_cents: 2000,
            transfer_code_ttl: Duration::from_secs(7 * 86_400),
            prices: crate::billing::Prices::default(),
            kek: crate::kek::KekSource::default(),
            mail: crate::mail::MailConfig::default(),
            verification_ttl: Duration::from_secs(86_400),
            max_realms_per_account: 100,
            max_registrations_per_day: 20,
            trusted_proxies: vec![],
            max_failed_logins_per_hour: 50,
        }
    }
}

/// Who is asking, and from where.
#[derive(Debug, Clone)]
pub struct Actor {
    pub account_id: String,
    pub email: String,
    /// Whether the account proved it receives mail at `email` (see `verify_email`). Only then
    /// do invitations to that address and operator status configured for it apply.
    pub verified: bool,
    pub operator: bool,
    pub remote: String,
}

/// What an actor may do in one realm.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Access {
    Owner,
    Member(String),
    Operator,
    Stranger,
}

/// Control-plane permissions, named like the seed's `realm:` actions (`realm:*` grants all).
pub(crate) const ADMIN: &str = "admin";
pub(crate) const READ: &str = "read";

/// What the registry needs from the node that hosts it — the narrow interface by which the
/// control plane reaches the data plane (the node implements it; the registry never imports
/// the node). Realm states reach the node through its config directory, which the registry
/// writes; [`Host::apply`] makes the node take them (and flood them to the mesh).
pub trait Host: Send + Sync + 'static {
    /// Re-reads the config directory: new policies, keys and revocations take effect.
    fn apply(&self) -> anyhow::Result<()>;
    /// Verifies an API key as the node does (trust root, revocations).
    fn verify_key(&self, key: &str) -> Result<credential::VerifiedKey, String>;
    /// Client sessions of `realm` on the node now.
    fn live_sessions(&self, realm: &str) -> usize;
    /// The share of its plan's allowance `realm` used this month (shown in `/metrics`).
    fn set_quota_used(&self, realm: &str, used: f64);
}

pub struct Registry {
    pub db: Db,
    pub config: RegistryConfig,
    confdir: ConfDir,
    operator_key: SigningKey,
    pub(crate) node: Option<Arc<dyn Host>>,
    logins: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Parsed newest policy per realm, with its version.
    policies: Mutex<HashMap<String, (i64, PolicyDoc)>>,
    /// Sessions seen (or logged out) in the last [`SESSION_CACHE_TTL`], by token hash.
    sessions: Mutex<HashMap<String, CachedSession>>,
    /// Parsed signing authority per realm, with the certificate text it was parsed from.
    signers: Mutex<HashMap<String, Arc<Signer>>>,
    /// A hash to verify against when the email is unknown, so that timing does not tell.
    dummy_hash: String,
    /// Takes payment for invoices.
    pub payments: Box<dyn crate::billing::PaymentProvider>,
    /// Seals the realm authorities' secrets in the database.
    kek: crate::kek::Kek,
    /// Sends verification mail.
    mailer: Box<dyn crate::mail::Mailer>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn random_token(prefix: &str, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::thread_rng(), b.as_mut_slice());
    format!("{prefix}{}", hex::encode(b))
}

fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
}

fn password_matches(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A loose but safe email check: one `@`, a dot in the domain, no spaces or control characters.
pub fn validate_email(email: &str) -> ApiResult<String> {
    let e = email.trim().to_ascii_lowercase();
    let ok = e.len() <= 254
        && e.split('@').count() == 2
        && e.split('@').all(|p| !p.is_empty())
        && e.rsplit('@')
            .next()
            .is_some_and(|d| d.contains('.') && !d.starts_with('.') && !d.ends_with('.'))
        && !e.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | '\'' | '\\')
        });
    if !ok {
        return Err(ApiError::invalid(
            "invalid_email",
            format!("{email:?} is not an email address"),
        ));
    }
    Ok(e)
}

fn validate_password(p: &str) -> ApiResult<()> {
    if p.chars().count() < 10 {
        return Err(ApiError::invalid(
            "weak_password",
            "a password needs at least 10 characters",
        ));
    }
    if p.len() > 1024 {
        return Err(ApiError::invalid(
            "invalid_password",
            "a password may be at most 1024 bytes",
        ));
    }
    Ok(())
}

pub fn validate_realm_name(name: &str) -> ApiResult<()> {
    macula_wamp::uri::validate_realm(name)
        .map_err(|e| ApiError::invalid("invalid_realm_name", format!("{name:?}: {e}")))?;
    if name.len() > 200 {
        return Err(ApiError::invalid(
            "invalid_realm_name",
            "a realm name may be at most 200 characters",
        ));
    }
    if !name.contains('.') {
        return Err(ApiError::invalid(
            "invalid_realm_name",
            format!("{name:?} is not reverse-DNS: a realm has at least two labels, like com.acme"),
        ));
    }
    Ok(())
}

/// One realm row.
#[derive(Debug, Clone)]
pub(crate) struct RealmRow {
    pub(crate) name: String,
    pub(crate) owner_id: String,
    pub(crate) owner_email: String,
    pub(crate) parent: Option<String>,
    pub(crate) tier: String,
    pub(crate) suspended: String,
    pub(crate) frozen: String,
    pub(crate) created_at: i64,
    pub(crate) expires_at: i64,
    pub(crate) authority_key: String,
    pub(crate) authority_cert: String,
    pub(crate) policy_version: i64,
    /// Which registration of the name this is (1 for the first; see `realm_generations`).
    pub(crate) generation: i64,
    /// The newest policy version's YAML.
    pub(crate) policy: String,
}

impl RealmRow {
    fn from_row(r: &AnyRow) -> Result<RealmRow, sqlx::Error> {
        Ok(RealmRow {
            name: r.try_get("name")?,
            owner_id: r.try_get("owner_id")?,
            owner_email: r.try_get("owner_email")?,
            parent: r.try_get("parent")?,
            tier: r.try_get("tier")?,
            suspended: r.try_get("suspended")?,
            frozen: r.try_get("frozen")?,
            created_at: r.try_get("created_at")?,
            expires_at: r.try_get("expires_at")?,
            authority_key: r.try_get("authority_key")?,
            authority_cert: r.try_get("authority_cert")?,
            policy_version: r.try_get("policy_version")?,
            generation: r.try_get("generation")?,
            policy: r.try_get("doc")?,
        })
    }
}

const REALM_COLUMNS: &str = "r.name, r.owner_id, a.email AS owner_email, r.parent, r.tier, \
    r.suspended, r.frozen, r.created_at, r.expires_at, r.authority_key, r.authority_cert, \
    r.policy_version, r.generation, p.doc";

/// Realms with their owner's email and newest policy, in one query.
const REALM_FROM: &str = "realms r JOIN accounts a ON a.id = r.owner_id \
    JOIN policy_versions p ON p.realm = r.name AND p.version = r.policy_version";

/// The request to register a realm.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewRealm {
    pub name: String,
    /// Delegate a subrealm to another account (only the parent's owner may).
    #[serde(default)]
    pub owner_email: Option<String>,
    #[serde(default)]
    pub tier: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_key_role")]
    pub role: String,
    /// Lifetime in days; 0 for a key that never expires.
    #[serde(default = "default_key_days")]
    pub expires_in_days: u64,
    /// Bind the key to an Ed25519 public key (64 hex) for WAMP-Cryptosign.
    #[serde(default)]
    pub pubkey: Option<String>,
}

fn default_key_role() -> String {
    "service_account".into()
}
fn default_key_days() -> u64 {
    365
}

/// A page of a list: `limit` items after `cursor`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Page {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

impl Page {
    fn limit(&self) -> i64 {
        self.limit.unwrap_or(50).clamp(1, 500)
    }
    /// The cursor is the hex of the last sort key of the previous page.
    fn after(&self) -> ApiResult<String> {
        match &self.cursor {
            None => Ok(String::new()),
            Some(c) => hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad_cursor),
        }
    }

    /// For lists newest first by a numeric id: the id to stay below (all when no cursor).
    fn below(&self) -> ApiResult<i64> {
        match self.after()?.as_str() {
            "" => Ok(i64::MAX),
            s => s.parse().map_err(|_| bad_cursor()),
        }
    }
}

fn bad_cursor() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
        "the cursor is not one this API returned; start again without it",
    )
}

fn page_of(mut items: Vec<Value>, limit: i64, key: impl Fn(&Value) -> String) -> Value {
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next = if more {
        items.last().map(|v| hex::encode(key(v)))
    } else {
        None
    };
    json!({"items": items, "next_cursor": next})
}

/// An idempotent request's identity: the client's key and a hash of what it asked.
pub struct Idempotency {
    pub key: String,
    pub request_hash: String,
}

impl Idempotency {
    pub fn new(key: &str, request: &impl Serialize) -> ApiResult<Idempotency> {
        if key.is_empty() || key.len() > 200 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 200 characters",
            ));
        }
        let body = serde_json::to_string(request).map_err(ApiError::internal)?;
        Ok(Idempotency {
            key: key.to_owned(),
            request_hash: sha256_hex(&body),
        })
    }
}

impl Registry {
    pub async fn new(
        db: Db,
        config: RegistryConfig,
        confdir: ConfDir,
        node: Option<Arc<dyn Host>>,
    ) -> anyhow::Result<Arc<Registry>> {
        config.prices.validate().map_err(anyhow::Error::msg)?;
        let operator_key = confdir.operator_key()?;
        let kek = crate::kek::Kek::load(&config.kek, &confdir.root)?;
        let mailer = crate::mail::from_config(&config.mail)?;
        let reg = Arc::new(Registry {
            db,
            config: RegistryConfig {
                operators: config
                    .operators
                    .iter()
                    .map(|e| e.trim().to_ascii_lowercase())
                    .collect(),
                ..config
            },
            confdir,
            operator_key,
            node,
            logins: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
            signers: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            dummy_hash: hash_password("not a real password, only for timing")?,
            payments: Box::new(crate::billing::RecordingProvider),
            kek,
            mailer,
        });
        reg.seal_secrets().await?;
        reg.sync_all().await?;
        Ok(reg)
    }

    // ---------------------------------------------------------------- accounts and sessions

    pub async fn signup(
        &self,
        email: &str,
        password: &str,
        remote: &str,
        ip: Option<IpAddr>,
    ) -> ApiResult<Value> {
        // Signups share the per-address attempt budget with logins (each one mails a code).
        if let Some(ip) = ip {
            self.login_rate(ip)?;
        }
        let email = validate_email(email)?;
        validate_password(password)?;
        let hash = hash_password(password)?;
        let id = random_token("acct_", 8);
        let now = now_secs() as i64;
        let mut tx = self.db.begin().await?;
        // An address held by an account that never verified it, past the time a code lives, is
        // free again: a squatter cannot keep its owner out. The squatter's account keeps
        // everything else; only the address is taken back (it becomes an unreachable one).
        sqlx::query(
            "UPDATE accounts SET email = 'released+' || id || '@invalid' \
             WHERE email = $1 AND email_verified_at = 0 AND email_since < $2",
        )
        .bind(&email)
        .bind(now - self.config.verification_ttl.as_secs() as i64)
        .execute(&mut *tx)
        .await?;
        // Codes still out for the address were asked for by an account that no longer holds it.
        sqlx::query("DELETE FROM email_tokens WHERE email = $1")
            .bind(&email)
            .execute(&mut *tx)
            .await?;
        let res = sqlx::query(
            "INSERT INTO accounts (id, email, password_hash, created_at, email_since) VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(&id)
        .bind(&email)
        .bind(&hash)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(ApiError::conflict(
                    "account_exists",
                    format!("an account for {email} exists; log in instead"),
                ))
            }
            r => r?,
        };
        audit(&mut tx, None, &email, "account.create", json!({}), remote);
        tx.commit().await?;
        let sent = self.send_verification(&id, &email).await;
        Ok(
            json!({"id": id, "email": email, "created_at": rfc3339(now as u64),
                  "email_verified": false, "verification": sent}),
        )
    }

    // ---------------------------------------------------------------- email ownership

    /// How verification mail goes out (`log`, `smtp`, `dir`).
    pub fn mail_kind(&self) -> &'static str {
        self.mailer.kind()
    }

    /// Mails a verification code for `email` to it; what to tell the user (`sent`, or why not).
    async fn send_verification(&self, account_id: &str, email: &str) -> Value {
        let code = random_token("ev_", 16);
        let now = now_secs() as i64;
        // In one transaction: expired codes go, and an address gets at most three codes an
        // hour whoever asks (signups under many accounts cannot flood an inbox).
        let stored = async {
            let mut tx = self.db.begin().await?;
            sqlx::query("DELETE FROM email_tokens WHERE expires_at < $1")
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let recent: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM email_tokens WHERE email = $1 AND created_at > $2",
            )
            .bind(email)
            .bind(now - 3600)
            .fetch_one(&mut *tx)
            .await?;
            if recent >= 3 {
                return Ok::<bool, sqlx::Error>(false);
            }
            sqlx::query(
                "INSERT INTO email_tokens (token_hash, account_id, email, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(sha256_hex(&code))
            .bind(account_id)
            .bind(email)
            .bind(now)
            .bind(now + self.config.verification_ttl.as_secs() as i64)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        }
        .await;
        match stored {
            Ok(true) => {}
            Ok(false) => {
                return json!({"sent": false, "to": email, "error": "three codes went to this address in the last hour; use one of them or wait"})
            }
            Err(e) => {
                tracing::error!("storing a verification code: {e}");
                return json!({"sent": false, "error": "the code could not be stored; ask again later"});
            }
        }
        let hours = self.config.verification_ttl.as_secs().div_ceil(3600);
        let mail = crate::mail::Mail {
            to: email.to_owned(),
            subject: "Verify your email address for Macula".into(),
            body: format!(
                "Your verification code is:\n\n    {code}\n\n\
                 Verify with `macula account verify {code}`, or POST {{\"code\": \"{code}\"}} to /v1/account/verify.\n\
                 The code is valid for {hours} hours. If you did not ask for it, ignore this message.\n"
            ),
        };
        match self.mailer.send(mail).await {
            Ok(()) => json!({"sent": true, "to": email, "via": self.mailer.kind()}),
            Err(e) => {
                tracing::error!("verification mail to {email}: {e}");
                json!({"sent": false, "to": email, "error": "the mail could not be sent; ask for another code later (macula account resend)"})
            }
        }
    }

    /// Proves ownership of an address with the code mailed to it: the account's email becomes
    /// (or, after a change of address, is changed to) that address, verified.
    pub async fn verify_email(&self, code: &str, remote: &str) -> ApiResult<Value> {
        let now = now_secs() as i64;
        let row = sqlx::query(
            "SELECT account_id, email FROM email_tokens WHERE token_hash = $1 AND expires_at > $2",
        )
        .bind(sha256_hex(code.trim()))
        .bind(now)
        .fetch_optional(&self.db.pool)
        .await?
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid_code",
                "the code is unknown, used or expired; ask for another (macula account resend)",
            )
        })?;
        let (account_id, email): (String, String) =
            (row.try_get("account_id")?, row.try_get("email")?);
        let mut tx = self.db.begin().await?;
        let res =
            sqlx::query("UPDATE accounts SET email = $1, email_verified_at = $2, email_since = CASE WHEN email = $1 THEN email_since ELSE $2 END WHERE id = $3")
                .bind(&email)
                .bind(now)
                .bind(&account_id)
                .execute(&mut *tx)
                .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(ApiError::conflict(
                    "email_taken",
                    format!("another account has {email} now"),
                ))
            }
            r => r?,
        };
        sqlx::query("DELETE FROM email_tokens WHERE account_id = $1")
            .bind(&account_id)
            .execute(&mut *tx)
            .await?;
        audit(&mut tx, None, &email, "account.verify", json!({}), remote);
        tx.commit().await?;
        // Sessions looked up before now carry the old address or state.
        self.sessions.lock().clear();
        Ok(json!({"id": account_id, "email": email, "email_verified": true}))
    }

    /// Mails a new verification code for the account's address.
    pub async fn resend_verification(&self, actor: &Actor) -> ApiResult<Value> {
        if actor.verified {
            return Err(ApiError::conflict(
                "already_verified",
                format!("{} is verified already", actor.email),
            ));
        }
        self.verification_allowed(&actor.account_id).await?;
        Ok(self
            .send_verification(&actor.account_id, &actor.email)
            .await)
    }

    /// Starts a change of address: a code goes to the new one, and the change happens when it
    /// is verified (until then the account keeps its address). Needs the password.
    pub async fn change_email(
        &self,
        actor: &Actor,
        new_email: &str,
        password: &str,
    ) -> ApiResult<Value> {
        let email = validate_email(new_email)?;
        // The password check is throttled like a login (per account, for this purpose), so a
        // session token is not a way around the lock-out.
        let source = "email-change";
        let row = sqlx::query(
            "SELECT a.password_hash, COALESCE(f.locked_until, 0) AS locked_until FROM accounts a \
             LEFT JOIN login_failures f ON f.account_id = a.id AND f.source = $2 WHERE a.id = $1",
        )
        .bind(&actor.account_id)
        .bind(source)
        .fetch_one(&self.db.pool)
        .await?;
        let locked_until: i64 = row.try_get("locked_until")?;
        let now = now_secs() as i64;
        if locked_until > now {
            return Err(locked(locked_until - now));
        }
        if !password_matches(password, &row.try_get::<String, _>("password_hash")?) {
            return Err(self
                .password_failed(&actor.account_id, &actor.email, source, &actor.remote)
                .await?);
        }
        let taken: Option<String> = sqlx::query_scalar("SELECT id FROM accounts WHERE email = $1")
            .bind(&email)
            .fetch_optional(&self.db.pool)
            .await?;
        if taken.is_some_and(|id| id != actor.account_id) {
            return Err(ApiError::conflict(
                "email_taken",
                format!("another account has {email}"),
            ));
        }
        self.verification_allowed(&actor.account_id).await?;
        let mut tx = self.db.begin().await?;
        audit(
            &mut tx,
            None,
            &actor.email,
            "account.email_change",
            json!({"to": email}),
            &actor.remote,
        );
        tx.commit().await?;
        let sent = self.send_verification(&actor.account_id, &email).await;
        Ok(json!({"email": actor.email, "pending_email": email, "verification": sent}))
    }

    /// One code per account per minute, at most ten alive: mail cannot be used to flood an inbox.
    async fn verification_allowed(&self, account_id: &str) -> ApiResult<()> {
        let now = now_secs() as i64;
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(MAX(created_at), 0) AS newest FROM email_tokens WHERE account_id = $1 AND expires_at > $2",
        )
        .bind(account_id)
        .bind(now)
        .fetch_one(&self.db.pool)
        .await?;
        let (n, newest): (i64, i64) = (row.try_get("n")?, row.try_get("newest")?);
        if newest > now - 60 || n >= 10 {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_soon",
                "a code was sent less than a minute ago (or ten are waiting): check your mail, or try again later",
            ));
        }
        Ok(())
    }

    /// Counts a wrong password for (account, source) and locks that pair out after
    /// `max_failed_logins` in a row; the error to answer with.
    async fn password_failed(
        &self,
        id: &str,
        email: &str,
        source: &str,
        remote: &str,
    ) -> ApiResult<ApiError> {
        let now = now_secs() as i64;
        {
            let mut tx = self.db.begin().await?;
            // Forget old failures (bounds the table: rows live a day past their last failure).
            sqlx::query("DELETE FROM login_failures WHERE updated_at < $1 AND locked_until < $2")
                .bind(now - 86_400)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let failed: i64 = sqlx::query_scalar(
                "INSERT INTO login_failures (account_id, source, failed, locked_until, updated_at) \
                 VALUES ($1, $2, 1, 0, $3) ON CONFLICT (account_id, source) DO UPDATE SET \
                 failed = login_failures.failed + 1, updated_at = excluded.updated_at \
                 RETURNING failed",
            )
            .bind(id)
            .bind(source)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let lock = failed >= self.config.max_failed_logins;
            if lock {
                let until = now + self.config.lockout.as_secs() as i64;
                sqlx::query(
                    "UPDATE login_failures SET failed = 0, locked_until = $1 WHERE account_id = $2 AND source = $3",
                )
                .bind(until)
                .bind(id)
                .bind(source)
                .execute(&mut *tx)
                .await?;
            }
            audit(
                &mut tx,
                None,
                email,
                if lock {
                    "account.locked"
                } else {
                    "session.login_failed"
                },
                json!({"failed_logins": failed, "source": source}),
                remote,
            );
            tx.commit().await?;
            Ok(if lock {
                locked(self.config.lockout.as_secs() as i64)
            } else {
                invalid_credentials()
            })
        }
    }

    /// Logs in: a session token (shown once, stored hashed). Failed attempts are counted per
    /// (account, source address): after `max_failed_logins` in a row that source is locked out
    /// of the account for `lockout_minutes`, and other sources, the owner's among them, are not
    /// (a stranger can lock out only themselves). One address is also limited per minute.
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        client: &str,
        ip: Option<IpAddr>,
        remote: &str,
    ) -> ApiResult<Value> {
        if let Some(ip) = ip {
            self.login_rate(ip)?;
        }
        let source = ip.map(login_source).unwrap_or_default();
        let email = email.trim().to_ascii_lowercase();
        let now = now_secs() as i64;
        let row = sqlx::query(
            "SELECT a.id, a.password_hash, COALESCE(f.locked_until, 0) AS locked_until, \
             a.failed_window_start, a.failed_in_window, \
             (SELECT COUNT(*) FROM login_sources s WHERE s.account_id = a.id AND s.source = $2) AS known \
             FROM accounts a LEFT JOIN login_failures f ON f.account_id = a.id AND f.source = $2 \
             WHERE a.email = $1",
        )
        .bind(&email)
        .bind(&source)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(row) = row else {
            password_matches(password, &self.dummy_hash);
            return Err(invalid_credentials());
        };
        let id: String = row.try_get("id")?;
        let hash: String = row.try_get("password_hash")?;
        let locked_until: i64 = row.try_get("locked_until")?;
        if locked_until > now {
            return Err(locked(locked_until - now));
        }
        // Many sources guessing one account: past the hourly budget, only sources that logged
        // in to it before may try (its owner's usual addresses) until the hour is over.
        let window: i64 = row.try_get("failed_window_start")?;
        let failed: i64 = row.try_get("failed_in_window")?;
        let known = row.try_get::<i64, _>("known")? > 0;
        let budget = self.config.max_failed_logins_per_hour;
        if budget > 0 && now - window < 3600 && failed >= budget && !known {
            return Err(ApiError::too_many(
                "account_under_attack",
                format!(
                    "too many failed logins to this account from many addresses: for now only addresses \
                     that logged in to it before may try; this one may again in {} s",
                    3600 - (now - window)
                ),
                (3600 - (now - window)).max(1) as u64,
            ));
        }
        if !password_matches(password, &hash) {
            sqlx::query(
                "UPDATE accounts SET \
                 failed_in_window = CASE WHEN failed_window_start < $1 THEN 1 ELSE failed_in_window + 1 END, \
                 failed_window_start = CASE WHEN failed_window_start < $1 THEN $2 ELSE failed_window_start END \
                 WHERE id = $3",
            )
            .bind(now - 3600)
            .bind(now)
            .bind(&id)
            .execute(&self.db.pool)
            .await?;
            return Err(self.password_failed(&id, &email, &source, remote).await?);
        }
        let token = random_token("mcs_", 32);
        let expires = now + self.config.session_ttl.as_secs() as i64;
        let mut tx = self.db.begin().await?;
        sqlx::query("DELETE FROM login_failures WHERE account_id = $1 AND source = $2")
            .bind(&id)
            .bind(&source)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO login_sources (account_id, source, last_ok) VALUES ($1, $2, $3) \
             ON CONFLICT (account_id, source) DO UPDATE SET last_ok = excluded.last_ok",
        )
        .bind(&id)
        .bind(&source)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO sessions (token_hash, account_id, client, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(sha256_hex(&token))
        .bind(&id)
        .bind(client.chars().take(100).collect::<String>())
        .bind(now)
        .bind(expires)
        .execute(&mut *tx)
        .await?;
        audit(
            &mut tx,
            None,
            &email,
            "session.login",
            json!({"client": client}),
            remote,
        );
        tx.commit().await?;
        Ok(json!({"token": token, "email": email, "expires_at": rfc3339(expires as u64)}))
    }

    fn login_rate(&self, ip: IpAddr) -> ApiResult<()> {
        let mut m = self.logins.lock();
        let now = Instant::now();
        if m.len() > 10_000 {
            m.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(60));
        }
        let e = m.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(60) {
            *e = (now, 0);
        }
        e.1 += 1;
        if e.1 > self.config.login_attempts_per_minute {
            let wait = 60 - now.duration_since(e.0).as_secs().min(59);
            return Err(ApiError::too_many(
                "rate_limited",
                format!("too many login attempts from {ip}; try again in {wait} s"),
                wait,
            ));
        }
        Ok(())
    }

    /// The account behind a session token, if the session is live.
    pub async fn authenticate(&self, token: &str, remote: String) -> ApiResult<Actor> {
        let hash = sha256_hex(token);
        let now = Instant::now();
        let unknown = || {
            ApiError::unauthorized("the session is unknown or expired; log in again (macula login)")
        };
        let cached = self.sessions.lock().get(&hash).cloned();
        let (account_id, email, verified) = match cached {
            Some(c) if now.duration_since(c.at) < SESSION_CACHE_TTL => match c.session {
                Some((expires, id, email, verified)) if expires > now_secs() as i64 => {
                    (id, email, verified)
                }
                Some(_) | None => return Err(unknown()),
            },
            _ => {
                let row = sqlx::query(
                    "SELECT a.id, a.email, a.email_verified_at, s.expires_at FROM sessions s JOIN accounts a ON a.id = s.account_id \
                     WHERE s.token_hash = $1 AND s.expires_at > $2",
                )
                .bind(&hash)
                .bind(now_secs() as i64)
                .fetch_optional(&self.db.pool)
                .await?
                .ok_or_else(unknown)?;
                let (id, email): (String, String) = (row.try_get("id")?, row.try_get("email")?);
                let expires: i64 = row.try_get("expires_at")?;
                let verified = row.try_get::<i64, _>("email_verified_at")? > 0;
                let mut cache = self.sessions.lock();
                if cache.len() > 100_000 {
                    cache.retain(|_, c| now.duration_since(c.at) < SESSION_CACHE_TTL);
                }
                match cache.get(&hash) {
                    // Logged out while this lookup ran.
                    Some(c)
                        if c.session.is_none() && now.duration_since(c.at) < SESSION_CACHE_TTL =>
                    {
                        return Err(unknown())
                    }
                    _ => {
                        cache.insert(
                            hash,
                            CachedSession {
                                at: now,
                                session: Some((expires, id.clone(), email.clone(), verified)),
                            },
                        );
                    }
                }
                (id, email, verified)
            }
        };
        Ok(Actor {
            account_id,
            // Operator status configured for an address goes only to whoever proved they own it.
            operator: verified && self.config.operators.contains(&email),
            email,
            verified,
            remote,
        })
    }

    pub async fn logout(&self, token: &str, actor: &Actor) -> ApiResult<()> {
        let mut tx = self.db.begin().await?;
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(sha256_hex(token))
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            None,
            &actor.email,
            "session.logout",
            json!({}),
            &actor.remote,
        );
        tx.commit().await?;
        // Remembered as logged out, so that a lookup racing the logout cannot cache it again.
        self.sessions.lock().insert(
            sha256_hex(token),
            CachedSession {
                at: Instant::now(),
                session: None,
            },
        );
        Ok(())
    }

    pub fn whoami(&self, actor: &Actor) -> Value {
        json!({"id": actor.account_id, "email": actor.email, "email_verified": actor.verified, "operator": actor.operator})
    }

    // ---------------------------------------------------------------- realms

    pub(crate) async fn realm(&self, c: &mut AnyConnection, name: &str) -> ApiResult<RealmRow> {
        let row = sqlx::query(&format!(
            "SELECT {REALM_COLUMNS} FROM {REALM_FROM} WHERE r.name = $1"
        ))
        .bind(name)
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no realm {name} in the registry")))?;
        Ok(RealmRow::from_row(&row)?)
    }

    async fn access(
        &self,
        c: &mut AnyConnection,
        realm: &RealmRow,
        actor: &Actor,
    ) -> ApiResult<Access> {
        if realm.owner_id == actor.account_id {
            return Ok(Access::Owner);
        }
        // A membership (an invitation to an address) applies only to whoever proved they
        // receive mail there.
        if !actor.verified {
            return Ok(if actor.operator {
                Access::Operator
            } else {
                Access::Stranger
            });
        }
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM members WHERE realm = $1 AND email = $2")
                .bind(&realm.name)
                .bind(&actor.email)
                .fetch_optional(&mut *c)
                .await?;
        Ok(match role {
            Some(r) => Access::Member(r),
            None if actor.operator => Access::Operator,
            None => Access::Stranger,
        })
    }

    /// The realm, after checking that `actor` may do `action` in it.
    pub(crate) async fn authorize(
        &self,
        c: &mut AnyConnection,
        name: &str,
        actor: &Actor,
        action: &str,
    ) -> ApiResult<(RealmRow, Access, PolicyDoc)> {
        let realm = self.realm(c, name).await?;
        let access = self.access(c, &realm, actor).await?;
        let doc = self.policy_doc(&realm)?;
        let allowed = match &access {
            Access::Owner => true,
            // Operators see everything; they change realms only through the /v1/admin routes.
            Access::Operator => action == READ,
            Access::Member(role) => Policy::from_doc(doc.clone())
                .map(|p| {
                    p.allows_realm_action(role, action)
                        || (action == READ && p.allows_realm_action(role, ADMIN))
                })
                .unwrap_or(false),
            Access::Stranger => false,
        };
        if !allowed {
            return Err(ApiError::forbidden(
                "forbidden",
                match access {
                    Access::Member(role) => {
                        format!("your role {role:?} in {name} does not grant realm:{action}")
                    }
                    _ => format!("you are not a member of {name}"),
                },
            ));
        }
        Ok((realm, access, doc))
    }

    /// The realm's newest policy (parsed once per version).
    /// [`Registry::authorize`] for what only the realm's owner may do (`what`: "delete it",
    /// "change its plan"...).
    pub(crate) async fn authorize_owner(
        &self,
        c: &mut AnyConnection,
        name: &str,
        actor: &Actor,
        what: &str,
    ) -> ApiResult<(RealmRow, PolicyDoc)> {
        let (row, access, doc) = self.authorize(c, name, actor, ADMIN).await?;
        if access != Access::Owner {
            return Err(ApiError::forbidden(
                "owner_only",
                format!("only the owner of {name} may {what}"),
            ));
        }
        Ok((row, doc))
    }

    pub(crate) fn policy_doc(&self, realm: &RealmRow) -> ApiResult<PolicyDoc> {
        let mut cache = self.policies.lock();
        if let Some((v, doc)) = cache.get(&realm.name) {
            // A version number alone does not name a document: the next registration of the
            // name counts its versions from 1 again.
            if *v == realm.policy_version && doc.generation == realm.generation as u64 {
                return Ok(doc.clone());
            }
        }
        let mut doc = Policy::from_yaml(&realm.policy)
            .map_err(|e| ApiError::internal(format!("stored policy of {}: {e}", realm.name)))?
            .doc;
        // Documents stored before registrations had generations carry none.
        doc.generation = realm.generation as u64;
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(realm.name.clone(), (realm.policy_version, doc.clone()));
        Ok(doc)
    }

    /// Stores `doc` as the realm's next policy version.
    pub(crate) async fn put_policy(
        &self,
        c: &mut AnyConnection,
        realm: &str,
        mut doc: PolicyDoc,
        author: &str,
    ) -> ApiResult<PolicyDoc> {
        let current =
            sqlx::query("SELECT policy_version, generation, owner_id FROM realms WHERE name = $1")
                .bind(realm)
                .fetch_one(&mut *c)
                .await?;
        let version: i64 = current.try_get("policy_version")?;
        let generation: i64 = current.try_get("generation")?;
        let owner: String = current.try_get("owner_id")?;
        doc.realm = realm.to_owned();
        doc.version = version as u64 + 1;
        doc.generation = generation as u64;
        doc.deleted = false;
        doc.authorities =
            owner_authorities(c, &self.operator_key.verifying_key(), realm, &owner).await?;
        let policy = Policy::from_doc(doc)
            .map_err(|e| ApiError::invalid("invalid_policy", e.to_string()))?;
        sqlx::query(
            "INSERT INTO policy_versions (realm, version, doc, author, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(realm)
        .bind(policy.doc.version as i64)
        .bind(policy.to_yaml())
        .bind(author)
        .bind(now_secs() as i64)
        .execute(&mut *c)
        .await?;
        sqlx::query("UPDATE realms SET policy_version = $1 WHERE name = $2")
            .bind(policy.doc.version as i64)
            .bind(realm)
            .execute(&mut *c)
            .await?;
        Ok(policy.doc)
    }

    fn realm_json(&self, r: &RealmRow, access: Option<&Access>) -> Value {
        let now = now_secs() as i64;
        let status = if !r.suspended.is_empty() {
            "suspended"
        } else if now > r.expires_at {
            "expired"
        } else {
            "active"
        };
        let mut v = json!({
            "name": r.name,
            "owner": r.owner_email,
            "parent": r.parent,
            "tier": r.tier,
            "status": status,
            "frozen": !r.frozen.is_empty(),
            "created_at": rfc3339(r.created_at as u64),
            "expires_at": rfc3339(r.expires_at as u64),
            "grace_ends_at": rfc3339(self.grace_end(r) as u64),
            "policy_version": r.policy_version,
        });
        if !r.suspended.is_empty() {
            v["suspended_reason"] = json!(r.suspended);
        }
        if !r.frozen.is_empty() {
            v["frozen_reason"] = json!(r.frozen);
        }
        if let Some(a) = access {
            v["access"] = json!(match a {
                Access::Owner => "owner".to_owned(),
                Access::Member(role) => format!("member:{role}"),
                Access::Operator => "operator".to_owned(),
                Access::Stranger => "none".to_owned(),
            });
        }
        v
    }

    fn grace_end(&self, r: &RealmRow) -> i64 {
        r.expires_at + (self.config.grace_days * 86_400) as i64
    }

    /// Registers a realm: first come, first served; a subrealm only by the owner of its nearest
    /// registered parent, who may delegate it to another account.
    pub async fn register(
        &self,
        actor: &Actor,
        req: NewRealm,
        idem: Option<Idempotency>,
    ) -> ApiResult<(StatusCode, Value)> {
        validate_realm_name(&req.name)?;
        let prices = &self.config.prices;
        let tier = req
            .tier
            .clone()
            .unwrap_or_else(|| prices.tiers[0].name.clone());
        crate::billing::tier_of(prices, &tier)?;
        let mut tx = self.db.begin().await?;
        if let Some(i) = &idem {
            if let Some(replay) = self.replay(&mut tx, actor, i).await? {
                return Ok(replay);
            }
        }
        let name = req.name.as_str();
        if (name == "io.macula" || name.starts_with("io.macula.")) && !actor.operator {
            return Err(ApiError::forbidden(
                "reserved",
                format!("{name} is reserved for the platform"),
            ));
        }
        // Each registration is a budget on every node (metering, realm state): one account holds
        // a bounded number of them.
        if !actor.operator && self.config.max_realms_per_account > 0 {
            let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM realms WHERE owner_id = $1")
                .bind(&actor.account_id)
                .fetch_one(&mut *tx)
                .await?;
            // Every registration that is deleted leaves a tombstone on every node (so no older
            // state of it comes back): a register/delete loop must not grow them without end.
            if self.config.max_registrations_per_day > 0 {
                let recent: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM audit WHERE actor = $1 AND action = 'realm.register' AND at > $2",
                )
                .bind(&actor.email)
                .bind(now_secs() as i64 - 86_400)
                .fetch_one(&mut *tx)
                .await?;
                if recent >= self.config.max_registrations_per_day as i64 {
                    return Err(ApiError::too_many(
                        "too_many_registrations",
                        format!(
                            "this account registered {recent} realms in the last 24 hours, the most it may \
                             (registry.max_registrations_per_day); try again tomorrow"
                        ),
                        3600,
                    ));
                }
            }
            if held >= self.config.max_realms_per_account as i64 {
                return Err(ApiError::conflict(
                    "realm_limit",
                    format!(
                        "this account holds {held} realms, the most one account may (registry.max_realms_per_account); delete one or ask the operator"
                    ),
                ));
            }
        }
        let now = now_secs() as i64;
        // A name whose registration expired past its grace period is free again.
        if let Ok(old) = self.realm(&mut tx, name).await {
            if now <= self.grace_end(&old) {
                return Err(ApiError::conflict(
                    "realm_taken",
                    if old.owner_id == actor.account_id {
                        format!("you already own {name}")
                    } else {
                        format!("{name} is registered to another account")
                    },
                ));
            }
            release(
                &mut tx,
                &old,
                &actor.email,
                "realm.released",
                json!({"expired_at": rfc3339(old.expires_at as u64)}),
                &actor.remote,
            )
            .await?;
        }
        // A realm the operator configured by hand on this node (`macula realms create`); the
        // tombstone of a deleted registration does not count.
        let hand_made = match self.confdir.read_policy(name) {
            Ok(p) => p.generation == 0,
            Err(_) => self.confdir.policy_path(name).exists(),
        };
        if hand_made {
            return Err(ApiError::conflict(
                "realm_taken",
                format!("{name} is configured on this node outside the registry"),
            ));
        }
        // The nearest registered ancestor decides who may create a subrealm.
        let mut parent = None;
        let mut p = name;
        while let Some(i) = p.rfind('.') {
            p = &p[..i];
            if let Ok(row) = self.realm(&mut tx, p).await {
                parent = Some(row);
                break;
            }
        }
        let mut owner_id = actor.account_id.clone();
        let mut owner_email = actor.email.clone();
        if let Some(par) = &parent {
            if par.owner_id != actor.account_id && !actor.operator {
                return Err(ApiError::forbidden(
                    "not_parent_owner",
                    format!(
                        "only the owner of {} may create or delegate {name}",
                        par.name
                    ),
                ));
            }
        }
        if let Some(to) = &req.owner_email {
            let to = validate_email(to)?;
            if parent.is_none() && !actor.operator {
                return Err(ApiError::invalid(
                    "invalid_delegation",
                    "owner_email delegates a subrealm; register a top realm for yourself",
                ));
            }
            owner_id = verified_account(&mut tx, &to).await?;
            owner_email = to;
        }
        let (authority, cert) = self.new_authority(name);
        // Every registration of a name is a new generation, with a new authority: nothing of an
        // earlier registration (keys, states, usage, audit) carries over to it.
        let generation: i64 = sqlx::query_scalar(
            "INSERT INTO realm_generations (name, generation) VALUES ($1, 1) \
             ON CONFLICT (name) DO UPDATE SET generation = realm_generations.generation + 1 \
             RETURNING generation",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        {
            // Whatever is keyed by the bare name now is not this registration's: usage that a
            // node delivered after the last registration ended, or rows of a registration
            // released before generations were kept (migration 4; archived as `name#0`). It
            // goes to the previous registration's archive.
            let archive = archived(name, generation - 1);
            // Tables keyed by (realm, …) move whole only into a fresh archive (`name#0`): a
            // release already moved its own rows into `name#g`, and nothing makes them for a
            // name that is not registered.
            let tables: &[&str] = if generation == 1 {
                &[
                    "UPDATE audit SET realm = $1 WHERE realm = $2",
                    "UPDATE notices SET realm = $1 WHERE realm = $2",
                    "UPDATE plan_history SET realm = $1 WHERE realm = $2",
                    "UPDATE addons SET realm = $1 WHERE realm = $2",
                ]
            } else {
                &["UPDATE audit SET realm = $1 WHERE realm = $2"]
            };
            for sql in tables {
                sqlx::query(sql)
                    .bind(&archive)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(crate::billing::add_to_rollup!(
                "INSERT INTO usage_rollups (realm, period, start, ops_publish, ops_subscribe, ops_call, \
                 ops_register, ops_dht, bytes_in, bytes_out) \
                 SELECT $1, period, start, ops_publish, ops_subscribe, ops_call, ops_register, ops_dht, \
                 bytes_in, bytes_out FROM usage_rollups WHERE realm = $2"
            ))
            .bind(archived(name, generation - 1))
            .bind(name)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM usage_rollups WHERE realm = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        let expires = now + (self.config.term_days * 86_400) as i64;
        let res = sqlx::query(
            "INSERT INTO realms (name, owner_id, parent, tier, created_at, expires_at, authority_key, authority_cert, policy_version, generation) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9)",
        )
        .bind(name)
        .bind(&owner_id)
        .bind(parent.as_ref().map(|p| p.name.clone()))
        .bind(&tier)
        .bind(now)
        .bind(expires)
        .bind(self.kek.seal(name, &hex::encode(authority.to_bytes())))
        .bind(cert.to_text())
        .bind(generation)
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => {
                return Err(ApiError::conflict(
                    "realm_taken",
                    format!("{name} was registered by another account a moment ago"),
                ))
            }
            r => r?,
        };
        let mut doc = macula_node::confdir::default_policy(name);
        doc.users.push(UserDoc {
            email: owner_email.clone(),
            role: "admin".into(),
        });
        self.put_policy(&mut tx, name, doc, &actor.email).await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "realm.register",
            json!({"owner": owner_email, "tier": tier, "parent": parent.as_ref().map(|p| &p.name)}),
            &actor.remote,
        );
        let row = self.realm(&mut tx, name).await?;
        let body = self.realm_json(&row, None);
        if let Some(i) = &idem {
            self.remember(&mut tx, actor, i, StatusCode::CREATED, &body);
        }
        commit_unique(
            tx,
            "realm_taken",
            &format!("{name} was registered by another account a moment ago"),
        )
        .await?;
        self.materialize(name).await?;
        Ok((StatusCode::CREATED, body))
    }

    pub async fn list_realms(&self, actor: &Actor, page: &Page) -> ApiResult<Value> {
        let limit = page.limit();
        let rows = sqlx::query(&format!(
            "SELECT {REALM_COLUMNS} FROM {REALM_FROM} \
             WHERE (r.owner_id = $1 OR r.name IN (SELECT realm FROM members WHERE email = $2)) AND r.name > $3 \
             ORDER BY r.name LIMIT $4"
        ))
        .bind(&actor.account_id)
        .bind(member_email(actor))
        .bind(page.after()?)
        .bind(limit + 1)
        .fetch_all(&self.db.pool)
        .await?;
        let mut items = vec![];
        for r in &rows {
            let row = RealmRow::from_row(r)?;
            let mut v = self.realm_json(&row, None);
            v["access"] = json!(if row.owner_id == actor.account_id {
                "owner"
            } else {
                "member"
            });
            items.push(v);
        }
        Ok(page_of(items, limit, |v| {
            v["name"].as_str().unwrap_or("").to_owned()
        }))
    }

    pub async fn show_realm(&self, actor: &Actor, name: &str) -> ApiResult<Value> {
        let mut tx = self.db.pool.acquire().await?;
        let (row, access, doc) = self.authorize(&mut tx, name, actor, READ).await?;
        let keys: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE realm = $1 AND revoked_at = 0 AND (expires_at = 0 OR expires_at > $2)",
        )
        .bind(name)
        .bind(now_secs() as i64)
        .fetch_one(&mut *tx)
        .await?;
        let mut v = self.realm_json(&row, Some(&access));
        v["active_keys"] = json!(keys);
        v["members"] = json!(doc.users.len());
        v["roles"] = json!(doc.roles.iter().map(|r| &r.name).collect::<Vec<_>>());
        if let Some(node) = &self.node {
            v["live"] = json!({"sessions_on_this_node": node.live_sessions(name)});
        }
        Ok(v)
    }

    pub async fn delete_realm(&self, actor: &Actor, name: &str) -> ApiResult<()> {
        let mut tx = self.db.begin().await?;
        let (row, _) = self
            .authorize_owner(&mut tx, name, actor, "delete it")
            .await?;
        if !row.frozen.is_empty() {
            return Err(frozen(&row));
        }
        let children: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM realms WHERE parent = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        if children > 0 {
            return Err(ApiError::conflict(
                "has_subrealms",
                format!("{name} has {children} subrealm(s); delete them first"),
            ));
        }
        release(
            &mut tx,
            &row,
            &actor.email,
            "realm.delete",
            json!({}),
            &actor.remote,
        )
        .await?;
        tx.commit().await?;
        self.bury(&row);
        Ok(())
    }

    /// A new authority for `name`, certified by the operator.
    fn new_authority(&self, name: &str) -> (SigningKey, SignedCert) {
        let authority = SigningKey::generate(&mut rand::rngs::OsRng);
        let cert = SignedCert::issue(
            &self.operator_key,
            &AuthorityCert {
                realm: name.to_owned(),
                authority: authority.verifying_key().to_bytes(),
                expires_at: 0,
            },
        );
        (authority, cert)
    }

    pub async fn renew(&self, actor: &Actor, name: &str, years: u64) -> ApiResult<Value> {
        if !(1..=10).contains(&years) {
            return Err(ApiError::invalid(
                "invalid_years",
                "renew for 1 to 10 years",
            ));
        }
        let mut tx = self.db.begin().await?;
        let (row, doc) = self
            .authorize_owner(&mut tx, name, actor, "renew it")
            .await?;
        let now = now_secs() as i64;
        let expires = row.expires_at.max(now) + (years * self.config.term_days * 86_400) as i64;
        sqlx::query("UPDATE realms SET expires_at = $1 WHERE name = $2")
            .bind(expires)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        // Renewal restores a realm that expiry had disabled (a suspension stays).
        if doc.disabled.is_some() && row.suspended.is_empty() {
            let mut d = doc;
            d.disabled = None;
            self.put_policy(&mut tx, name, d, &actor.email).await?;
        }
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "realm.renew",
            json!({"years": years, "expires_at": rfc3339(expires as u64)}),
            &actor.remote,
        );
        let row = self.realm(&mut tx, name).await?;
        tx.commit().await?;
        self.materialize(name).await?;
        Ok(self.realm_json(&row, Some(&Access::Owner)))
    }

    /// The owner's authorization code for a transfer, shown once.
    pub async fn transfer_code(&self, actor: &Actor, name: &str) -> ApiResult<Value> {
        let mut tx = self.db.begin().await?;
        let (row, _) = self
            .authorize_owner(&mut tx, name, actor, "transfer it")
            .await?;
        if !row.frozen.is_empty() {
            return Err(frozen(&row));
        }
        let code = random_token("tc_", 16);
        let expires = now_secs() as i64 + self.config.transfer_code_ttl.as_secs() as i64;
        sqlx::query("DELETE FROM transfer_codes WHERE realm = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO transfer_codes (realm, code_hash, created_by, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(name)
            .bind(sha256_hex(&code))
            .bind(&actor.email)
            .bind(expires)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "realm.transfer_code",
            json!({"expires_at": rfc3339(expires as u64)}),
            &actor.remote,
        );
        tx.commit().await?;
        Ok(
            json!({"realm": name, "code": code, "expires_at": rfc3339(expires as u64), "fee_cents": self.config.transfer_fee_cents}),
        )
    }

    /// Accepts a transfer with the owner's code: the caller becomes the owner and is charged the
    /// transfer fee (recorded for billing).
    pub async fn transfer(&self, actor: &Actor, name: &str, code: &str) -> ApiResult<Value> {
        let mut tx = self.db.begin().await?;
        let row = self.realm(&mut tx, name).await?;
        if row.owner_id == actor.account_id {
            return Err(ApiError::conflict(
                "already_owner",
                format!("you already own {name}"),
            ));
        }
        if !row.frozen.is_empty() {
            return Err(frozen(&row));
        }
        let stored =
            sqlx::query("SELECT code_hash, expires_at FROM transfer_codes WHERE realm = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(stored) = stored else {
            return Err(ApiError::forbidden(
                "invalid_transfer_code",
                format!("the code does not authorize a transfer of {name}"),
            ));
        };
        let hash: String = stored.try_get("code_hash")?;
        let expires: i64 = stored.try_get("expires_at")?;
        if hash != sha256_hex(code) {
            return Err(ApiError::forbidden(
                "invalid_transfer_code",
                format!("the code does not authorize a transfer of {name}"),
            ));
        }
        if expires <= now_secs() as i64 {
            return Err(ApiError::forbidden(
                "transfer_code_expired",
                format!(
                    "the transfer code for {name} expired at {}; ask the owner for a new one",
                    rfc3339(expires as u64)
                ),
            ));
        }
        let fee = self.config.transfer_fee_cents;
        self.change_owner(&mut tx, &row, actor, &actor.account_id, &actor.email)
            .await?;
        sqlx::query("INSERT INTO fees (account_id, realm, kind, amount_cents, created_at) VALUES ($1, $2, 'transfer', $3, $4)")
            .bind(&actor.account_id)
            .bind(name)
            .bind(fee)
            .bind(now_secs() as i64)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "realm.transfer",
            json!({"from": row.owner_email, "to": actor.email, "fee_cents": fee}),
            &actor.remote,
        );
        let row = self.realm(&mut tx, name).await?;
        tx.commit().await?;
        self.materialize(name).await?;
        let mut v = self.realm_json(&row, Some(&Access::Owner));
        v["fee_cents"] = json!(fee);
        Ok(v)
    }

    async fn change_owner(
        &self,
        c: &mut AnyConnection,
        row: &RealmRow,
        actor: &Actor,
        to_id: &str,
        to_email: &str,
    ) -> ApiResult<()> {
        // The buyer gets the realm with a new authority: every key the seller's side issued
        // (which the buyer never saw) stops working on every node, live sessions included.
        let (authority, cert) = self.new_authority(&row.name);
        sqlx::query(
            "UPDATE realms SET owner_id = $1, authority_key = $2, authority_cert = $3 WHERE name = $4",
        )
        .bind(to_id)
        .bind(self.kek.seal(&row.name, &hex::encode(authority.to_bytes())))
        .bind(cert.to_text())
        .bind(&row.name)
        .execute(&mut *c)
        .await?;
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE realm = $2 AND revoked_at = 0")
            .bind(now_secs() as i64)
            .bind(&row.name)
            .execute(&mut *c)
            .await?;
        sqlx::query("DELETE FROM transfer_codes WHERE realm = $1")
            .bind(&row.name)
            .execute(&mut *c)
            .await?;
        // The buyer gets the realm with no one else in it: members the seller added (their own
        // other accounts among them) could otherwise make keys under the new authority.
        sqlx::query("DELETE FROM members WHERE realm = $1")
            .bind(&row.name)
            .execute(&mut *c)
            .await?;
        let mut doc = self.policy_doc(row)?;
        doc.users.clear();
        doc.users.push(UserDoc {
            email: to_email.to_owned(),
            role: "admin".into(),
        });
        self.put_policy(c, &row.name, doc, &actor.email).await?;
        Ok(())
    }

    // ---------------------------------------------------------------- members and policy

    pub async fn members(&self, actor: &Actor, name: &str) -> ApiResult<Value> {
        let mut tx = self.db.pool.acquire().await?;
        let (row, _, _) = self.authorize(&mut tx, name, actor, READ).await?;
        let rows = sqlx::query(
            "SELECT email, role, added_by, added_at FROM members WHERE realm = $1 ORDER BY email",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        let mut items = vec![json!({"email": row.owner_email, "role": "owner"})];
        for r in rows {
            items.push(json!({
                "email": r.try_get::<String, _>("email")?,
                "role": r.try_get::<String, _>("role")?,
                "added_by": r.try_get::<String, _>("added_by")?,
                "added_at": rfc3339(r.try_get::<i64, _>("added_at")? as u64),
            }));
        }
        Ok(json!({"items": items, "next_cursor": null}))
    }

    /// Adds a member (an invitation: it applies when that email has an account) or changes a
    /// member's role. Nobody changes their own role.
    pub async fn set_member(
        &self,
        actor: &Actor,
        name: &str,
        email: &str,
        role: &str,
    ) -> ApiResult<Value> {
        let email = validate_email(email)?;
        let mut tx = self.db.begin().await?;
        let (row, _, mut doc) = self.authorize(&mut tx, name, actor, ADMIN).await?;
        if email == actor.email {
            return Err(ApiError::forbidden(
                "own_role",
                "nobody may change their own role; ask another admin or the owner",
            ));
        }
        if email == row.owner_email {
            return Err(ApiError::conflict(
                "is_owner",
                format!("{email} owns {name}; transfer the realm to change that"),
            ));
        }
        require_role(&doc, name, role)?;
        let now = now_secs() as i64;
        sqlx::query("DELETE FROM members WHERE realm = $1 AND email = $2")
            .bind(name)
            .bind(&email)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO members (realm, email, role, added_by, added_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(name)
            .bind(&email)
            .bind(role)
            .bind(&actor.email)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        doc.users.retain(|u| u.email != email);
        doc.users.push(UserDoc {
            email: email.clone(),
            role: role.to_owned(),
        });
        let doc = self.put_policy(&mut tx, name, doc, &actor.email).await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "member.set",
            json!({"email": email, "role": role}),
            &actor.remote,
        );
        tx.commit().await?;
        self.materialize(name).await?;
        Ok(json!({"realm": name, "email": email, "role": role, "policy_version": doc.version}))
    }

    pub async fn remove_member(&self, actor: &Actor, name: &str, email: &str) -> ApiResult<()> {
        let email = email.trim().to_ascii_lowercase();
        let mut tx = self.db.begin().await?;
        let (_, _, mut doc) = self.authorize(&mut tx, name, actor, ADMIN).await?;
        let n = sqlx::query("DELETE FROM members WHERE realm = $1 AND email = $2")
            .bind(name)
            .bind(&email)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(ApiError::not_found(format!(
                "{email} is not a member of {name}"
            )));
        }
        doc.users.retain(|u| u.email != email);
        self.put_policy(&mut tx, name, doc, &actor.email).await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "member.remove",
            json!({"email": email}),
            &actor.remote,
        );
        tx.commit().await?;
        self.materialize(name).await
    }

    pub async fn policy(
        &self,
        actor: &Actor,
        name: &str,
        version: Option<i64>,
    ) -> ApiResult<Value> {
        let mut tx = self.db.pool.acquire().await?;
        let (row, _, doc) = self.authorize(&mut tx, name, actor, READ).await?;
        let doc = match version {
            Some(v) if v != row.policy_version => {
                let text: Option<String> = sqlx::query_scalar(
                    "SELECT doc FROM policy_versions WHERE realm = $1 AND version = $2",
                )
                .bind(name)
                .bind(v)
                .fetch_optional(&mut *tx)
                .await?;
                let text = text.ok_or_else(|| {
                    ApiError::not_found(format!("{name} has no policy version {v}"))
                })?;
                Policy::from_yaml(&text).map_err(ApiError::internal)?.doc
            }
            _ => doc,
        };
        serde_json::to_value(&doc).map_err(ApiError::internal)
    }

    pub async fn policy_versions(
        &self,
        actor: &Actor,
        name: &str,
        page: &Page,
    ) -> ApiResult<Value> {
        let mut tx = self.db.pool.acquire().await?;
        self.authorize(&mut tx, name, actor, READ).await?;
        let limit = page.limit();
        let after = page.below()?;
        let rows = sqlx::query("SELECT version, author, created_at FROM policy_versions WHERE realm = $1 AND version < $2 ORDER BY version DESC LIMIT $3")
            .bind(name)
            .bind(after)
            .bind(limit + 1)
            .fetch_all(&mut *tx)
            .await?;
        let mut items = vec![];
        for r in rows {
            items.push(json!({
                "version": r.try_get::<i64, _>("version")?,
                "author": r.try_get::<String, _>("author")?,
                "created_at": rfc3339(r.try_get::<i64, _>("created_at")? as u64),
            }));
        }
        Ok(page_of(items, limit, |v| v["version"].to_string()))
    }

    /// Replaces the realm's roles and topic ACLs (users, keys, revocations and status are the
    /// registry's to manage). `expected_version` makes the change conditional (409 if stale).
    pub async fn set_policy(
        &self,
        actor: &Actor,
        name: &str,
        req: PolicyUpdate,
    ) -> ApiResult<Value> {
        let mut tx = self.db.begin().await?;
        let (row, access, mut doc) = self.authorize(&mut tx, name, actor, ADMIN).await?;
        if let Some(v) = req.expected_version {
            if v != row.policy_version {
                return Err(ApiError::conflict(
                    "stale_policy",
                    format!(
                        "the policy of {name} is at version {}, not {v}; reload and retry",
                        row.policy_version
                    ),
                ));
            }
        }
        // A member may not remove or weaken the role they act through (self-escalation by
        // rewriting one's own role is the same: the role must stay as it is).
        if let Access::Member(role) = &access {
            let before = doc.roles.iter().find(|r| &r.name == role);
            let after = req.roles.iter().find(|r| &r.name == role);
            if before != after {
                return Err(ApiError::forbidden(
                    "own_role",
                    format!(
                        "you act through role {role:?}; another admin or the owner must change it"
                    ),
                ));
            }
        }
        let used: Vec<String> = doc.users.iter().map(|u| u.role.clone()).collect();
        for r in used {
            if !req.roles.iter().any(|x| x.name == r) {
                return Err(ApiError::conflict(
                    "role_in_use",
                    format!("role {r:?} is held by members; change their role first"),
                ));
            }
        }
        doc.roles = req.roles;
        doc.topic_acls = req.topic_acls;
        if let Some(nodes) = req.nodes {
            for n in &nodes {
                if n.parse::<macula_mesh::Peer>().is_err() {
                    return Err(ApiError::invalid(
                        "invalid_node",
                        format!("{n:?} is not a node's peer id (see `macula mesh status`)"),
                    ));
                }
            }
            if !nodes.is_empty() {
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM addons WHERE realm = $1 AND feature = 'dedicated_nodes' AND ended_at = 0",
                )
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
                if active == 0 {
                    return Err(ApiError::conflict(
                        "addon_required",
                        format!("restricting {name} to dedicated nodes needs the dedicated_nodes add-on (macula realms addon)"),
                    ));
                }
            }
            doc.nodes = nodes;
        }
        if let Some(v) = req.verified_roles {
            doc.verified_roles = v;
        }
        let doc = self.put_policy(&mut tx, name, doc, &actor.email).await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "policy.update",
            json!({"version": doc.version}),
            &actor.remote,
        );
        tx.commit().await?;
        self.materialize(name).await?;
        serde_json::to_value(&doc).map_err(ApiError::internal)
    }

    // ---------------------------------------------------------------- keys

    /// Creates an API key. The realm is read, the request authorized and the key signed
    /// before the write lock; the write (key, audit entry, idempotency record) then commits only
    /// if the realm and the actor's role are still as read, checked by a guard statement in the
    /// same batch, and is retried from the start otherwise. Under the lock that is one round
    /// trip to SQLite's thread (see ARCHITECTURE.md, "Registry").
    pub async fn create_key(
        &self,
        actor: &Actor,
        name: &str,
        req: NewKey,
        idem: Option<Idempotency>,
    ) -> ApiResult<(StatusCode, Value)> {
        for _ in 0..5 {
            let mut c = self.db.pool.acquire().await?;
            if let Some(i) = &idem {
                if let Some((status, body)) = self.replay(&mut c, actor, i).await? {
                    // The secret is never stored: the same key is signed again from its claims
                    // (Ed25519 signatures are deterministic).
                    let kid = body["id"].as_str().unwrap_or_default().to_owned();
                    let mut body = body;
                    body["key"] = json!(self.reissue(&mut c, &kid).await?);
                    return Ok((status, body));
                }
            }
            let (row, access, doc) = self.authorize(&mut c, name, actor, ADMIN).await?;
            drop(c);
            let (claims, key) = self.new_key(&row, &access, &doc, &req)?;
            let mut tx = self.db.begin_batch().await?;
            tx.defer(
                "INSERT INTO write_guard (ok) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM realms \
                 WHERE name = $1 AND owner_id = $2 AND policy_version = $3 AND frozen = $4 \
                 AND suspended = $5 AND authority_cert = $6 AND expires_at = $7 \
                 AND ($8 = '' OR EXISTS (SELECT 1 FROM members WHERE realm = $1 AND email = $8 AND role = $9)))",
                vec![
                    name.into(),
                    (&row.owner_id).into(),
                    row.policy_version.into(),
                    (&row.frozen).into(),
                    (&row.suspended).into(),
                    (&row.authority_cert).into(),
                    row.expires_at.into(),
                    match &access {
                        Access::Member(_) => (&actor.email).into(),
                        _ => "".into(),
                    },
                    match &access {
                        Access::Member(role) => role.into(),
                        _ => "".into(),
                    },
                ],
            );
            tx.defer(
                "INSERT INTO api_keys (id, realm, role, name, key_hash, pubkey, created_by, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                vec![
                    (&claims.kid).into(),
                    name.into(),
                    (&claims.role).into(),
                    (&claims.name).into(),
                    sha256_hex(&key).into(),
                    claims.pubkey.map(hex::encode).unwrap_or_default().into(),
                    (&actor.email).into(),
                    (claims.issued_at as i64).into(),
                    (claims.expires_at as i64).into(),
                ],
            );
            audit(
                &mut tx,
                Some(name),
                &actor.email,
                "key.create",
                json!({"key_id": claims.kid, "role": claims.role, "name": claims.name}),
                &actor.remote,
            );
            let body = key_json(&claims, 0);
            if let Some(i) = &idem {
                self.remember(&mut tx, actor, i, StatusCode::CREATED, &body);
            }
            match tx.commit().await {
                Err(sqlx::Error::Database(d)) if d.is_check_violation() => {
                    // The realm or the actor's role changed since it was read: again.
                    continue;
                }
                Err(e) if is_unique_violation(&e) => {
                    return Err(ApiError::conflict(
                        "idempotency_conflict",
                        "a request with this Idempotency-Key is in progress; retry",
                    ))
                }
                r => r?,
            }
            let mut body = body;
            body["key"] = json!(key);
            return Ok((StatusCode::CREATED, body));
        }
        Err(ApiError::conflict(
            "realm_busy",
            "the realm changed during each of five attempts to create the key; retry",
        ))
    }

    /// Checks a key request against the realm as read, and signs the key.
    fn new_key(
        &self,
        row: &RealmRow,
        access: &Access,
        doc: &PolicyDoc,
        req: &NewKey,
    ) -> ApiResult<(KeyClaims, String)> {
        if !row.frozen.is_empty() && *access != Access::Owner {
            return Err(frozen(row));
        }
        require_role(doc, &row.name, &req.role)?;
        if req.name.len() > 200 {
            return Err(ApiError::invalid(
                "invalid_name",
                "a key name may be at most 200 characters",
            ));
        }
        if req.expires_in_days > 3650 {
            return Err(ApiError::invalid(
                "invalid_expiry",
                "a key lives at most 3650 days (0: never expires)",
            ));
        }
        let pubkey = match &req.pubkey {
            None => None,
            Some(h) => Some(credential::parse_public_key(h).ok_or_else(|| {
                ApiError::invalid(
                    "invalid_pubkey",
                    "pubkey must be 64 hex digits: an Ed25519 public key that is a valid, \
                     not weak, point",
                )
            })?),
        };
        let now = now_secs();
        let claims = KeyClaims {
            realm: row.name.clone(),
            role: req.role.clone(),
            kid: random_token("key_", 8),
            name: req.name.clone(),
            issued_at: now,
            expires_at: if req.expires_in_days == 0 {
                0
            } else {
                now + req.expires_in_days * 86_400
            },
            pubkey,
            secret_hash: None,
            holder: None,
        };
        let key = self.sign_key(row, &claims)?;
        Ok((claims, key))
    }

    fn sign_key(&self, row: &RealmRow, claims: &KeyClaims) -> ApiResult<String> {
        let cached = self.signers.lock().get(&row.name).cloned();
        let signer = match cached {
            Some(s) if s.cert_text == row.authority_cert && s.key_text == row.authority_key => s,
            _ => {
                let secret =
                    credential::parse_hex32(&self.authority_secret(row)?).ok_or_else(|| {
                        ApiError::internal(format!("authority key of {} is damaged", row.name))
                    })?;
                let s = Arc::new(Signer {
                    key_text: row.authority_key.clone(),
                    cert_text: row.authority_cert.clone(),
                    cert: SignedCert::from_text(&row.authority_cert).map_err(ApiError::internal)?,
                    key: SigningKey::from_bytes(&secret),
                });
                let mut cache = self.signers.lock();
                if cache.len() > 10_000 {
                    cache.clear();
                }
                cache.insert(row.name.clone(), s.clone());
                s
            }
        };
        Ok(credential::issue_key(&signer.key, &signer.cert, claims))
    }

    async fn reissue(&self, c: &mut AnyConnection, kid: &str) -> ApiResult<String> {
        let k = sqlx::query(
            "SELECT realm, role, name, pubkey, created_at, expires_at, revoked_at FROM api_keys WHERE id = $1",
        )
        .bind(kid)
        .fetch_optional(&mut *c)
        .await?;
        // A replayed creation never brings back a key that was revoked (by its owner, or by a
        // transfer) or that went with its realm: it would be signed by today's authority.
        let gone = || {
            ApiError::conflict(
                "key_gone",
                format!("the key created with this Idempotency-Key ({kid}) was revoked or deleted; create a new one"),
            )
        };
        let Some(k) = k else { return Err(gone()) };
        if k.try_get::<i64, _>("revoked_at")? != 0 {
            return Err(gone());
        }
        let realm: String = k.try_get("realm")?;
        let row = self.realm(c, &realm).await?;
        let pubkey: String = k.try_get("pubkey")?;
        let claims = KeyClaims {
            realm,
            role: k.try_get("role")?,
            kid: kid.to_owned(),
            name: k.try_get("name")?,
            issued_at: k.try_get::<i64, _>("created_at")? as u64,
            expires_at: k.try_get::<i64, _>("expires_at")? as u64,
            pubkey: credential::parse_hex32(&pubkey),
            secret_hash: None,
            holder: None,
        };
        self.sign_key(&row, &claims)
    }

    pub async fn list_keys(
        &self,
        actor: &Actor,
        realm: Option<&str>,
        page: &Page,
    ) -> ApiResult<Value> {
        let limit = page.limit();
        let after = page.after()?;
        let cols =
            "k.id, k.realm, k.role, k.name, k.created_by, k.created_at, k.expires_at, k.revoked_at";
        let text: String = match realm {
            Some(name) => {
                let mut c = self.db.pool.acquire().await?;
                self.authorize(&mut c, name, actor, READ).await?;
                sqlx::query_scalar(&self.db.json_rows(&format!(
                    "SELECT {cols} FROM api_keys k WHERE k.realm = $1 AND k.id > $2 ORDER BY k.id LIMIT $3"
                ), KEY_FIELDS, "id"))
                .bind(name)
                .bind(&after)
                .bind(limit + 1)
                .fetch_one(&mut *c)
                .await?
            }
            // Every realm the caller owns or administers.
            None => sqlx::query_scalar(&self.db.json_rows(&format!(
                "SELECT {cols} FROM api_keys k JOIN realms r ON r.name = k.realm \
                 WHERE (r.owner_id = $1 OR k.realm IN (SELECT realm FROM members WHERE email = $2 AND role = 'admin')) \
                 AND k.id > $3 ORDER BY k.id LIMIT $4"
            ), KEY_FIELDS, "id"))
            .bind(&actor.account_id)
            .bind(member_email(actor))
            .bind(&after)
            .bind(limit + 1)
            .fetch_one(&self.db.pool)
            .await?,
        };
        let mut rows: Vec<KeyRow> = serde_json::from_str(&text).map_err(ApiError::internal)?;
        // SQLite keeps the subquery's order in practice, but does not promise it.
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        let now = now_secs() as i64;
        let items = rows
            .into_iter()
            .map(|r| {
                json!({
                    "id": r.id,
                    "realm": r.realm,
                    "role": r.role,
                    "name": r.name,
                    "created_by": r.created_by,
                    "created_at": rfc3339(r.created_at as u64),
                    "expires_at": (r.expires_at != 0).then(|| rfc3339(r.expires_at as u64)),
                    "revoked_at": (r.revoked_at != 0).then(|| rfc3339(r.revoked_at as u64)),
                    "status": if r.revoked_at != 0 { "revoked" } else if r.expires_at != 0 && r.expires_at <= now { "expired" } else { "active" },
                })
            })
            .collect();
        Ok(page_of(items, limit, |v| {
            v["id"].as_str().unwrap_or("").to_owned()
        }))
    }

    /// Revokes a key: a new policy version lists it, which every node applies (and closes the
    /// key's live sessions) within seconds.
    pub async fn revoke_key(&self, actor: &Actor, name: &str, kid: &str) -> ApiResult<Value> {
        let mut tx = self.db.begin().await?;
        let (_, _, mut doc) = self.authorize(&mut tx, name, actor, ADMIN).await?;
        let revoked: Option<i64> =
            sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1 AND realm = $2")
                .bind(kid)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(revoked) = revoked else {
            return Err(ApiError::not_found(format!("{name} has no key {kid}")));
        };
        let now = now_secs() as i64;
        let at = if revoked != 0 {
            revoked
        } else {
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2")
                .bind(now)
                .bind(kid)
                .execute(&mut *tx)
                .await?;
            if !doc.revoked_keys.iter().any(|k| k == kid) {
                doc.revoked_keys.push(kid.to_owned());
            }
            self.put_policy(&mut tx, name, doc, &actor.email).await?;
            audit(
                &mut tx,
                Some(name),
                &actor.email,
                "key.revoke",
                json!({"key_id": kid}),
                &actor.remote,
            );
            now
        };
        tx.commit().await?;
        if revoked == 0 {
            self.materialize(name).await?;
        }
        Ok(json!({"id": kid, "realm": name, "revoked_at": rfc3339(at as u64)}))
    }

    /// The realm a key belongs to (404 if there is no such key).
    pub async fn realm_of_key(&self, kid: &str) -> ApiResult<String> {
        let realm: Option<String> = sqlx::query_scalar("SELECT realm FROM api_keys WHERE id = $1")
            .bind(kid)
            .fetch_optional(&self.db.pool)
            .await?;
        realm.ok_or_else(|| ApiError::not_found(format!("no key {kid} in the registry")))
    }

    // ---------------------------------------------------------------- audit

    pub async fn audit_log(
        &self,
        actor: &Actor,
        realm: Option<&str>,
        page: &Page,
    ) -> ApiResult<Value> {
        let limit = page.limit();
        let before = page.below()?;
        let rows = match realm {
            Some(name) => {
                let mut tx = self.db.pool.acquire().await?;
                self.authorize(&mut tx, name, actor, READ).await?;
                let rows = sqlx::query("SELECT id, realm, actor, action, detail, remote, at FROM audit WHERE realm = $1 AND id < $2 ORDER BY id DESC LIMIT $3")
                    .bind(name)
                    .bind(before)
                    .bind(limit + 1)
                    .fetch_all(&mut *tx)
                    .await?;
                rows
            }
            None if actor.operator => sqlx::query("SELECT id, realm, actor, action, detail, remote, at FROM audit WHERE id < $1 ORDER BY id DESC LIMIT $2")
                .bind(before)
                .bind(limit + 1)
                .fetch_all(&self.db.pool)
                .await?,
            // The caller's own actions: rows under its address since it has held the address
            // (an address can pass to another account; its earlier rows are not theirs).
            None => sqlx::query("SELECT id, realm, actor, action, detail, remote, at FROM audit WHERE actor = $1 AND id < $2 \
                 AND at >= (SELECT email_since FROM accounts WHERE id = $4) ORDER BY id DESC LIMIT $3")
                .bind(&actor.email)
                .bind(before)
                .bind(limit + 1)
                .bind(&actor.account_id)
                .fetch_all(&self.db.pool)
                .await?,
        };
        let mut items = vec![];
        for r in rows {
            let detail: String = r.try_get("detail")?;
            items.push(json!({
                "id": r.try_get::<i64, _>("id")?,
                "realm": r.try_get::<Option<String>, _>("realm")?,
                "actor": r.try_get::<String, _>("actor")?,
                "action": r.try_get::<String, _>("action")?,
                "detail": serde_json::from_str::<Value>(&detail).unwrap_or(Value::Null),
                "remote": r.try_get::<String, _>("remote")?,
                "at": rfc3339(r.try_get::<i64, _>("at")? as u64),
            }));
        }
        Ok(page_of(items, limit, |v| v["id"].to_string()))
    }

    // ---------------------------------------------------------------- operator: disputes

    pub(crate) fn operator_only(actor: &Actor) -> ApiResult<()> {
        if actor.operator {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "operator_only",
                "only a platform operator (registry.operators) may do this",
            ))
        }
    }

    pub async fn add_claim(
        &self,
        actor: &Actor,
        name: &str,
        claimant: &str,
        note: &str,
    ) -> ApiResult<Value> {
        Self::operator_only(actor)?;
        let claimant = validate_email(claimant)?;
        let mut tx = self.db.begin().await?;
        self.realm(&mut tx, name).await?;
        let id = random_token("claim_", 6);
        let now = now_secs() as i64;
        sqlx::query("INSERT INTO claims (id, realm, claimant, note, status, created_by, created_at) VALUES ($1, $2, $3, $4, 'open', $5, $6)")
            .bind(&id)
            .bind(name)
            .bind(&claimant)
            .bind(note)
            .bind(&actor.email)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "dispute.claim",
            json!({"claim": id, "claimant": claimant, "note": note}),
            &actor.remote,
        );
        tx.commit().await?;
        Ok(
            json!({"id": id, "realm": name, "claimant": claimant, "note": note, "status": "open", "created_at": rfc3339(now as u64)}),
        )
    }

    pub async fn claims(&self, actor: &Actor, name: &str) -> ApiResult<Value> {
        Self::operator_only(actor)?;
        let rows = sqlx::query("SELECT id, claimant, note, status, created_by, created_at FROM claims WHERE realm = $1 ORDER BY created_at, id")
            .bind(name)
            .fetch_all(&self.db.pool)
            .await?;
        let mut items = vec![];
        for r in rows {
            items.push(json!({
                "id": r.try_get::<String, _>("id")?,
                "claimant": r.try_get::<String, _>("claimant")?,
                "note": r.try_get::<String, _>("note")?,
                "status": r.try_get::<String, _>("status")?,
                "created_by": r.try_get::<String, _>("created_by")?,
                "created_at": rfc3339(r.try_get::<i64, _>("created_at")? as u64),
            }));
        }
        Ok(json!({"items": items, "next_cursor": null}))
    }

    /// Freezes (no transfer, delete or owner change while a dispute is open) or unfreezes.
    pub async fn set_frozen(
        &self,
        actor: &Actor,
        name: &str,
        reason: Option<&str>,
    ) -> ApiResult<Value> {
        Self::operator_only(actor)?;
        let mut tx = self.db.begin().await?;
        self.realm(&mut tx, name).await?;
        let reason = reason
            .map(|r| {
                if r.is_empty() {
                    "frozen by the operator"
                } else {
                    r
                }
            })
            .unwrap_or("");
        sqlx::query("UPDATE realms SET frozen = $1 WHERE name = $2")
            .bind(reason)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            if reason.is_empty() {
                "dispute.unfreeze"
            } else {
                "dispute.freeze"
            },
            json!({"reason": reason}),
            &actor.remote,
        );
        let row = self.realm(&mut tx, name).await?;
        tx.commit().await?;
        Ok(self.realm_json(&row, None))
    }

    /// Suspends (abuse takedown: every node refuses the realm's sessions and closes live ones)
    /// or lifts a suspension.
    pub async fn set_suspended(
        &self,
        actor: &Actor,
        name: &str,
        reason: Option<&str>,
    ) -> ApiResult<Value> {
        Self::operator_only(actor)?;
        let mut tx = self.db.begin().await?;
        let row = self.realm(&mut tx, name).await?;
        let reason = reason
            .map(|r| {
                if r.is_empty() {
                    "suspended by the operator"
                } else {
                    r
                }
            })
            .unwrap_or("");
        sqlx::query("UPDATE realms SET suspended = $1 WHERE name = $2")
            .bind(reason)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let mut doc = self.policy_doc(&row)?;
        doc.disabled = if !reason.is_empty() {
            Some(format!("suspended: {reason}"))
        } else if now_secs() as i64 > self.grace_end(&row) {
            doc.disabled
        } else {
            None
        };
        self.put_policy(&mut tx, name, doc, &actor.email).await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            if reason.is_empty() {
                "realm.unsuspend"
            } else {
                "realm.suspend"
            },
            json!({"reason": reason}),
            &actor.remote,
        );
        let row = self.realm(&mut tx, name).await?;
        tx.commit().await?;
        self.materialize(name).await?;
        Ok(self.realm_json(&row, None))
    }

    /// Resolves a dispute by moving the realm to `to` (no fee).
    pub async fn force_transfer(&self, actor: &Actor, name: &str, to: &str) -> ApiResult<Value> {
        Self::operator_only(actor)?;
        let to = validate_email(to)?;
        let mut tx = self.db.begin().await?;
        let row = self.realm(&mut tx, name).await?;
        let id = verified_account(&mut tx, &to).await?;
        self.change_owner(&mut tx, &row, actor, &id, &to).await?;
        sqlx::query("UPDATE claims SET status = 'resolved' WHERE realm = $1 AND status = 'open'")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        audit(
            &mut tx,
            Some(name),
            &actor.email,
            "dispute.transfer",
            json!({"from": row.owner_email, "to": to}),
            &actor.remote,
        );
        let row = self.realm(&mut tx, name).await?;
        tx.commit().await?;
        self.materialize(name).await?;
        Ok(self.realm_json(&row, None))
    }

    // ---------------------------------------------------------------- expiry

    /// Disables realms past expiry and grace (nodes then refuse them). Run periodically.
    pub async fn expire(&self) -> ApiResult<usize> {
        let cutoff = now_secs() as i64 - (self.config.grace_days * 86_400) as i64;
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM realms WHERE expires_at < $1")
                .bind(cutoff)
                .fetch_all(&self.db.pool)
                .await?;
        let mut n = 0;
        for name in names {
            let mut tx = self.db.begin().await?;
            let row = self.realm(&mut tx, &name).await?;
            let mut doc = self.policy_doc(&row)?;
            if doc.disabled.is_some() {
                continue;
            }
            doc.disabled = Some(format!(
                "expired on {}; the owner can renew it",
                rfc3339(row.expires_at as u64)
            ));
            self.put_policy(&mut tx, &name, doc, "registry").await?;
            audit(
                &mut tx,
                Some(&name),
                "registry",
                "realm.expire",
                json!({}),
                "",
            );
            tx.commit().await?;
            self.materialize(&name).await?;
            n += 1;
        }
        Ok(n)
    }

    // ---------------------------------------------------------------- idempotency

    async fn replay(
        &self,
        c: &mut AnyConnection,
        actor: &Actor,
        i: &Idempotency,
    ) -> ApiResult<Option<(StatusCode, Value)>> {
        let row = sqlx::query(
            "SELECT request_hash, status, body FROM idempotency WHERE account_id = $1 AND key = $2",
        )
        .bind(&actor.account_id)
        .bind(&i.key)
        .fetch_optional(&mut *c)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let hash: String = row.try_get("request_hash")?;
        if hash != i.request_hash {
            return Err(ApiError::conflict(
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request",
            ));
        }
        let status: i64 = row.try_get("status")?;
        let body: String = row.try_get("body")?;
        Ok(Some((
            StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK),
            serde_json::from_str(&body).map_err(ApiError::internal)?,
        )))
    }

    /// Stores the response to an idempotent request, in the request's transaction (a racing
    /// twin fails at commit on the primary key).
    fn remember(
        &self,
        tx: &mut WriteTx,
        actor: &Actor,
        i: &Idempotency,
        status: StatusCode,
        body: &Value,
    ) {
        let now = now_secs() as i64;
        tx.defer(
            "DELETE FROM idempotency WHERE created_at < $1",
            vec![(now - 86_400).into()],
        );
        tx.defer(
            "INSERT INTO idempotency (account_id, key, request_hash, status, body, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            vec![
                (&actor.account_id).into(),
                (&i.key).into(),
                (&i.request_hash).into(),
                (status.as_u16() as i64).into(),
                body.to_string().into(),
                now.into(),
            ],
        );
    }

    // ---------------------------------------------------------------- the node's copy

    /// The realm's authority secret (hex), opened with the KEK.
    fn authority_secret(&self, row: &RealmRow) -> ApiResult<String> {
        self.kek
            .open(&row.name, &row.authority_key)
            .map_err(ApiError::internal)
    }

    /// Seals every authority secret still stored in the clear (written before sealing), and
    /// checks that the KEK opens the others: a registry started with the wrong KEK refuses to
    /// start, saying so, rather than failing on each key it issues.
    async fn seal_secrets(&self) -> anyhow::Result<()> {
        let rows = sqlx::query("SELECT name, authority_key FROM realms")
            .fetch_all(&self.db.pool)
            .await?;
        let mut plain = vec![];
        for r in &rows {
            let name: String = r.try_get("name")?;
            let stored: String = r.try_get("authority_key")?;
            if crate::kek::Kek::is_plain(&stored) {
                plain.push((name, stored));
            } else {
                self.kek.open(&name, &stored)?;
            }
        }
        if plain.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        for (name, secret) in &plain {
            sqlx::query(
                "UPDATE realms SET authority_key = $1 WHERE name = $2 AND authority_key = $3",
            )
            .bind(self.kek.seal(name, secret))
            .bind(name)
            .bind(secret)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        // The clear text must not linger in free pages or the WAL of the embedded database.
        if self.db.backend == crate::Backend::Sqlite {
            sqlx::raw_sql("PRAGMA secure_delete = ON; VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")
                .execute(&self.db.pool)
                .await?;
        }
        tracing::warn!(
            "sealed {} realm authority secrets under the registry's KEK; backups made before hold them \
             in the clear: rotate those realms' authorities (transfer or re-register) if they may leak",
            plain.len()
        );
        Ok(())
    }

    /// Writes the realm's authority and newest policy into the node's config directory and
    /// applies it at once (the node floods the signed state to the mesh).
    pub async fn materialize(&self, name: &str) -> ApiResult<()> {
        let mut tx = self.db.pool.acquire().await?;
        let row = self.realm(&mut tx, name).await?;
        let doc = self.policy_doc(&row)?;
        self.write_realm(&row, &doc).map_err(ApiError::from)?;
        if let Some(node) = &self.node {
            node.apply().map_err(ApiError::from)?;
        }
        Ok(())
    }

    fn write_realm(&self, row: &RealmRow, doc: &PolicyDoc) -> anyhow::Result<()> {
        let dir = self.confdir.root.join("realms").join(&row.name);
        std::fs::create_dir_all(&dir)?;
        let key_path = dir.join("authority.key");
        let secret = self.kek.open(&row.name, &row.authority_key)?;
        if std::fs::read_to_string(&key_path).ok().as_deref() != Some(secret.as_str()) {
            macula_common::secret::write_secret(&key_path, &secret)?;
            std::fs::write(dir.join("authority.cert"), &row.authority_cert)?;
        }
        let current = self.confdir.read_policy(&row.name).ok();
        if current.as_ref() != Some(doc) {
            self.confdir.write_policy(doc)?;
        }
        Ok(())
    }

    /// Replaces a deleted realm's policy in the node's config directory with a tombstone (the
    /// next version of the same registration, signed by its authority as every state is): the
    /// node floods it, every node closes the realm's sessions and refuses its keys, and no older
    /// state of it can win again, also after restarts.
    fn bury(&self, row: &RealmRow) {
        let name = &row.name;
        let tombstone = PolicyDoc {
            realm: name.clone(),
            version: row.policy_version as u64 + 1,
            generation: row.generation as u64,
            deleted: true,
            deleted_at: now_secs(),
            ..PolicyDoc::default()
        };
        if let Err(e) = self.write_realm(row, &tombstone) {
            tracing::error!("writing the tombstone of {name}: {e:#}");
        }
        if let Some(node) = &self.node {
            if let Err(e) = node.apply() {
                tracing::error!("reloading after deleting {name}: {e:#}");
            }
        }
    }

    /// Brings the config directory in line with the database (after a crash between a commit
    /// and its copy, or a restore).
    pub async fn sync_all(&self) -> anyhow::Result<()> {
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM realms ORDER BY name")
            .fetch_all(&self.db.pool)
            .await?;
        for name in &names {
            let mut tx = self.db.begin().await?;
            let row = self
                .realm(&mut tx, name)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            let mut doc = self
                .policy_doc(&row)
                .map_err(|e| anyhow::anyhow!(e.message))?;
            // A policy written before `authorities` existed (or before an ancestor changed
            // hands) gets the list it should have, as a new version.
            let authorities = owner_authorities(
                &mut tx,
                &self.operator_key.verifying_key(),
                name,
                &row.owner_id,
            )
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
            if authorities != doc.authorities {
                doc = self
                    .put_policy(&mut tx, name, doc, "registry")
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
            }
            let row = self
                .realm(&mut tx, name)
                .await
                .map_err(|e| anyhow::anyhow!(e.message))?;
            tx.commit().await?;
            self.write_realm(&row, &doc)?;
        }
        if let Some(node) = &self.node {
            node.apply()?;
        }
        Ok(())
    }
}

/// The columns of a key listing, as aggregated by [`Db::json_rows`].
const KEY_FIELDS: &[&str] = &[
    "id",
    "realm",
    "role",
    "name",
    "created_by",
    "created_at",
    "expires_at",
    "revoked_at",
];

#[derive(Deserialize)]
struct KeyRow {
    id: String,
    realm: String,
    role: String,
    name: String,
    created_by: String,
    created_at: i64,
    expires_at: i64,
    revoked_at: i64,
}

/// Roles and topic ACLs for `PUT /v1/realms/{realm}/policy`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    pub roles: Vec<RoleDoc>,
    #[serde(default)]
    pub topic_acls: Vec<TopicAclDoc>,
    /// Dedicated Nodes: the mesh peer ids that alone may serve the realm (needs the
    /// `dedicated_nodes` add-on; an empty list lifts the restriction). Absent: unchanged.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// Forwarded publications and calls only with roles that keys' public forms prove (see
    /// `PolicyDoc::verified_roles`). Absent: unchanged.
    #[serde(default)]
    pub verified_roles: Option<bool>,
    #[serde(default)]
    pub expected_version: Option<i64>,
}

fn key_json(c: &KeyClaims, revoked_at: i64) -> Value {
    json!({
        "id": c.kid,
        "realm": c.realm,
        "role": c.role,
        "name": c.name,
        "created_at": rfc3339(c.issued_at),
        "expires_at": (c.expires_at != 0).then(|| rfc3339(c.expires_at)),
        "revoked_at": (revoked_at != 0).then(|| rfc3339(revoked_at as u64)),
    })
}

/// The role must exist in the realm's policy (422 naming the roles there are).
fn require_role(doc: &PolicyDoc, realm: &str, role: &str) -> ApiResult<()> {
    if doc.roles.iter().any(|r| r.name == role) {
        return Ok(());
    }
    let roles: Vec<&str> = doc.roles.iter().map(|r| r.name.as_str()).collect();
    Err(ApiError::invalid(
        "unknown_role",
        format!("{realm} has no role {role:?}; roles: {}", roles.join(", ")),
    ))
}

/// The source a login failure is counted against: the address, or its /64 for IPv6 (one host
/// commonly holds a whole /64, so its addresses are one source).
fn login_source(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

fn invalid_credentials() -> ApiError {
    ApiError::unauthorized("wrong email or password").with_code("invalid_credentials")
}

fn locked(secs: i64) -> ApiError {
    let mins = (secs.max(1) as u64).div_ceil(60);
    ApiError::too_many(
        "account_locked",
        format!("too many failed logins from this address: it is locked out of the account; try again in {mins} minute(s) (other addresses are not affected)"),
        secs.max(1) as u64,
    )
}

fn frozen(row: &RealmRow) -> ApiError {
    ApiError::conflict(
        "realm_frozen",
        format!(
            "{} is frozen by the operator ({}); ownership changes wait for the dispute to close",
            row.name, row.frozen
        ),
    )
}

/// The address whose memberships apply to `actor`: none ("", which no member row has) until the
/// address is verified.
fn member_email(actor: &Actor) -> &str {
    if actor.verified {
        &actor.email
    } else {
        ""
    }
}

/// The account that owns (and verified) `email`: a realm is given only to an address's proven
/// owner, never to whoever signed up with it first.
async fn verified_account(c: &mut AnyConnection, email: &str) -> ApiResult<String> {
    let row = sqlx::query("SELECT id, email_verified_at FROM accounts WHERE email = $1")
        .bind(email)
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| {
            ApiError::invalid(
                "unknown_account",
                format!("no account for {email}; they sign up first"),
            )
        })?;
    if row.try_get::<i64, _>("email_verified_at")? == 0 {
        return Err(ApiError::conflict(
            "email_unverified",
            format!("the account for {email} has not verified that address yet"),
        ));
    }
    Ok(row.try_get("id")?)
}

/// How long a looked-up session is trusted without asking the database again. A logout
/// through this process takes effect at once; one through another registry host sharing the
/// database (PostgreSQL), within this time. It saves a database round trip per request.
const SESSION_CACHE_TTL: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct CachedSession {
    at: Instant,
    /// (session expiry, account id, email, email verified); `None`: logged out.
    session: Option<(i64, String, String, bool)>,
}

/// A realm's authority, parsed from its stored text (kept to tell when it changed).
struct Signer {
    key_text: String,
    cert_text: String,
    key: SigningKey,
    cert: SignedCert,
}

/// The key under which a released registration's rows (audit, usage, notices, plan history,
/// add-ons) are kept: never a valid realm name, so nothing addressed by name reaches them and
/// the next registrant of the name starts with none of them.
pub(crate) fn archived(name: &str, generation: i64) -> String {
    format!("{name}#{generation}")
}

/// Ends a registration in `tx`: removes the realm row (its keys, members and policies go with
/// it) and moves what is keyed by the name to the registration's archive key; the closing audit
/// row goes there too, so the previous owner's trail stays theirs.
async fn release(
    tx: &mut WriteTx,
    row: &RealmRow,
    actor: &str,
    action: &str,
    detail: Value,
    remote: &str,
) -> ApiResult<()> {
    let name = row.name.as_str();
    sqlx::query("DELETE FROM realms WHERE name = $1")
        .bind(name)
        .execute(&mut **tx)
        .await?;
    let archive = archived(name, row.generation);
    for sql in [
        "UPDATE audit SET realm = $1 WHERE realm = $2",
        "UPDATE usage_rollups SET realm = $1 WHERE realm = $2",
        "UPDATE notices SET realm = $1 WHERE realm = $2",
        "UPDATE plan_history SET realm = $1 WHERE realm = $2",
        "UPDATE addons SET realm = $1 WHERE realm = $2",
    ] {
        tx.defer(sql, vec![archive.as_str().into(), name.into()]);
    }
    audit(tx, Some(&archive), actor, action, detail, remote);
    Ok(())
}

/// The authorities, besides a realm's own, whose keys may enter it: those of its registered
/// ancestors held by the same owner, up to the first one that is not (see
/// `PolicyDoc::authorities`).
async fn owner_authorities(
    c: &mut AnyConnection,
    operator: &ed25519_dalek::VerifyingKey,
    realm: &str,
    owner: &str,
) -> ApiResult<Vec<String>> {
    let mut out = vec![];
    let mut r = realm;
    while let Some(i) = r.rfind('.') {
        r = &r[..i];
        let row = sqlx::query("SELECT owner_id, authority_cert FROM realms WHERE name = $1")
            .bind(r)
            .fetch_optional(&mut *c)
            .await?;
        let Some(row) = row else { continue };
        if row.try_get::<String, _>("owner_id")? != owner {
            break;
        }
        let cert = SignedCert::from_text(&row.try_get::<String, _>("authority_cert")?)
            .and_then(|c| c.verify(operator, now_secs()))
            .map_err(ApiError::internal)?;
        out.push(hex::encode(cert.authority));
    }
    Ok(out)
}

/// Records a change in the audit log, in the change's own transaction.
pub(crate) fn audit(
    tx: &mut WriteTx,
    realm: Option<&str>,
    actor: &str,
    action: &str,
    detail: Value,
    remote: &str,
) {
    tx.defer(
        "INSERT INTO audit (realm, actor, action, detail, remote, at) VALUES ($1, $2, $3, $4, $5, $6)",
        vec![
            realm.into(),
            actor.into(),
            action.into(),
            detail.to_string().into(),
            remote.into(),
            (now_secs() as i64).into(),
        ],
    );
}

/// Commits; a unique violation at commit (a racing writer won) is the conflict `code`.
async fn commit_unique(tx: WriteTx, code: &'static str, message: &str) -> ApiResult<()> {
    match tx.commit().await {
        Err(e) if is_unique_violation(&e) => Err(ApiError::conflict(code, message)),
        r => Ok(r?),
    }
}
