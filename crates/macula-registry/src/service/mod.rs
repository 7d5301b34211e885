//! What every service of the registry shares: the settings ([`RegistryConfig`]), the [`Host`]
//! interface by which the node hosts the registry, the [`Registry`] itself (the pool, caches,
//! the operator key), who is asking ([`Actor`]) and what they may do in a realm (`authorize`,
//! `authorize_owner`, `operator_only`), the realm row and its policy document.
//!
//! Every change is one database transaction that also appends its audit entry, so a crash
//! leaves either all of it or none. After the commit the realm's newest policy version is
//! written to the node's config directory (`materialize`), from where the node applies it and
//! floods it, signed by the realm authority, to the mesh. A crash between the two is repaired on
//! start (`sync_all`): the database is the source of truth, the directory a copy.
//!
//! Every change on someone's behalf goes through one frame, `change.rs` ([`Registry::change_in`]
//! opens the transaction and authorizes; the service writes; `Change::audit`, `Change::commit`
//! and, for what nodes enforce, `Change::publish`/`Change::put_policy`); reads in a realm go
//! through [`Registry::read_in`]. `requests.rs`: pages and idempotent retries.

mod change;
mod requests;

pub(crate) use self::change::{InRealm, Needs};
pub use self::requests::*;

#[allow(unused_imports)]
use crate::prelude::*;

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
    /// The Hub (packages, publishers, the TUF repository); see [`crate::hub`].
    pub hub: crate::hub::HubConfig,
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
            hub: crate::hub::HubConfig::default(),
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
    /// The Hub's repository changed (its timestamp is at `version`): nodes refresh their view
    /// of it (revocations), the hosting node first, then the mesh.
    fn hub_changed(&self, _version: u64) {}
    /// Deploys `manifest` as workload `name` of `realm` (`kind`: `payloads` or `jobs`), or
    /// removes it (`None`), through this node's HTTP API with the realm key `key` — the path
    /// any tenant takes (the Hub's smoke tests use it).
    fn deploy(
        &self,
        _realm: &str,
        _key: &str,
        _kind: &str,
        _name: &str,
        _manifest: Option<String>,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        Box::pin(async { Err("no node hosts this registry".to_owned()) })
    }
    /// Workload `name` of `realm` as the nodes report it (the API's answer to
    /// `GET /v1/realms/{realm}/{kind}/{name}`), or None when it is not there.
    fn workload(
        &self,
        _realm: &str,
        _key: &str,
        _kind: &str,
        _name: &str,
    ) -> futures_util::future::BoxFuture<'static, Result<Option<serde_json::Value>, String>> {
        Box::pin(async { Err("no node hosts this registry".to_owned()) })
    }
}

pub struct Registry {
    pub db: Db,
    pub config: RegistryConfig,
    pub(crate) confdir: ConfDir,
    pub(crate) operator_key: SigningKey,
    pub(crate) node: Option<Arc<dyn Host>>,
    pub(crate) logins: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Parsed newest policy per realm, with its version.
    pub(crate) policies: Mutex<HashMap<String, (i64, PolicyDoc)>>,
    /// Sessions seen (or logged out) in the last [`SESSION_CACHE_TTL`], by token hash.
    pub(crate) sessions: Mutex<HashMap<String, CachedSession>>,
    /// Parsed signing authority per realm, with the certificate text it was parsed from.
    pub(crate) signers: Mutex<HashMap<String, Arc<Signer>>>,
    /// A hash to verify against when the email is unknown, so that timing does not tell.
    pub(crate) dummy_hash: String,
    /// Takes payment for invoices.
    pub payments: Box<dyn crate::billing::PaymentProvider>,
    /// Seals the realm authorities' secrets in the database.
    pub(crate) kek: crate::kek::Kek,
    /// Sends verification mail.
    pub(crate) mailer: Box<dyn crate::mail::Mailer>,
    /// The Hub, when `registry.hub.enabled`.
    pub(crate) hub: Option<crate::hub::Hub>,
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub(crate) use macula_common::ids::random_id as random_token;

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
        let hub = match config.hub.enabled {
            true => {
                let dir = config
                    .hub
                    .dir
                    .clone()
                    .unwrap_or_else(|| confdir.root.join("hub"));
                Some(crate::hub::Hub::open(&config.hub, &dir).await?)
            }
            false => None,
        };
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
            hub,
        });
        reg.seal_secrets().await?;
        reg.sync_all().await?;
        Ok(reg)
    }

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

    /// The instances a realm on plan `tier` may ask for at once, as its policy carries it.
    pub(crate) fn plan_max_instances(&self, tier: &str) -> Option<u32> {
        Some(self.config.prices.tier_or_first(tier).max_instances)
    }

    /// Writes the realm's next policy version if its plan's limits changed (after a change of
    /// tier); true if it did (then materialize it once committed).
    pub(crate) async fn refresh_plan_limits(
        &self,
        c: &mut AnyConnection,
        realm: &str,
        author: &str,
    ) -> ApiResult<bool> {
        let row = self.realm(&mut *c, realm).await?;
        let doc = self.policy_doc(&row)?;
        if doc.max_instances == self.plan_max_instances(&row.tier) {
            return Ok(false);
        }
        self.put_policy(c, realm, doc, author).await?;
        Ok(true)
    }

    /// Stores `doc` as the realm's next policy version (with the limits of the realm's plan).
    pub(crate) async fn put_policy(
        &self,
        c: &mut AnyConnection,
        realm: &str,
        mut doc: PolicyDoc,
        author: &str,
    ) -> ApiResult<PolicyDoc> {
        let current = sqlx::query(
            "SELECT policy_version, generation, owner_id, tier FROM realms WHERE name = $1",
        )
        .bind(realm)
        .fetch_one(&mut *c)
        .await?;
        let version: i64 = current.try_get("policy_version")?;
        let generation: i64 = current.try_get("generation")?;
        let owner: String = current.try_get("owner_id")?;
        let tier: String = current.try_get("tier")?;
        // The plan's limits travel with the policy: nodes enforce them.
        doc.max_instances = self.plan_max_instances(&tier);
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
}
