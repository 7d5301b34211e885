//! Publishers: a namespace, its owner, how its identity was verified, what its packages may
//! claim, and its signing keys — which make its TUF delegation (`org/*`, a threshold of its
//! active keys).

use macula_hub::tuf::{check_namespace, Delegation, PublicKey};

use super::tuf_error;
use super::types::*;
#[allow(unused_imports)]
use crate::prelude::*;

/// Mail domains anyone can have an address at: they verify no one's identity.
const FREE_MAIL: &[&str] = &[
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "live.com",
    "yahoo.com",
    "icloud.com",
    "proton.me",
    "protonmail.com",
    "gmx.com",
    "gmx.de",
    "mail.com",
    "example.com",
];

/// The capability patterns a new publisher's packages may claim: RPC and pub/sub under
/// `com.<ns>.` and `<ns>.` (operators may grant more).
fn default_grants(ns: &str) -> Vec<String> {
    let mut g = vec![];
    for (domain, actions) in [
        ("rpc", ["call", "register"]),
        ("pubsub", ["publish", "subscribe"]),
    ] {
        for action in actions {
            for prefix in [format!("com.{ns}."), format!("{ns}.")] {
                g.push(format!("{domain}:{action}:{prefix}*"));
            }
        }
    }
    g
}

/// How an owner's address verifies a namespace: at a domain whose first label is the namespace,
/// not a free-mail one.
fn email_domain_verifies(email: &str, ns: &str) -> Option<String> {
    let domain = email.rsplit_once('@')?.1.to_ascii_lowercase();
    let first = domain.split('.').next()?;
    (first == ns && !FREE_MAIL.contains(&domain.as_str())).then(|| format!("email-domain:{domain}"))
}

/// A publisher's row.
pub(crate) struct PublisherRow {
    pub namespace: String,
    pub owner_id: String,
    pub owner: String,
    pub display_name: String,
    pub verified_by: String,
    pub grants: Vec<String>,
    pub threshold: i64,
    pub created_at: i64,
}

impl Registry {
    pub(crate) async fn publisher_row(
        &self,
        c: &mut AnyConnection,
        ns: &str,
    ) -> ApiResult<PublisherRow> {
        let r = sqlx::query(
            "SELECT p.namespace, p.owner_id, a.email, p.display_name, p.verified_by, p.grants, p.threshold, p.created_at \
             FROM hub_publishers p JOIN accounts a ON a.id = p.owner_id WHERE p.namespace = $1",
        )
        .bind(ns)
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no publisher {ns} on the Hub")))?;
        let grants: String = r.try_get("grants")?;
        Ok(PublisherRow {
            namespace: r.try_get("namespace")?,
            owner_id: r.try_get("owner_id")?,
            owner: r.try_get("email")?,
            display_name: r.try_get("display_name")?,
            verified_by: r.try_get("verified_by")?,
            grants: serde_json::from_str(&grants).unwrap_or_default(),
            threshold: r.try_get("threshold")?,
            created_at: r.try_get("created_at")?,
        })
    }

    /// The publisher, after checking that `actor` owns it (or, with `operator_too`, operates
    /// the platform).
    pub(crate) async fn owned_publisher(
        &self,
        c: &mut AnyConnection,
        actor: &Actor,
        ns: &str,
        operator_too: bool,
    ) -> ApiResult<PublisherRow> {
        let p = self.publisher_row(c, ns).await?;
        if p.owner_id != actor.account_id && !(operator_too && actor.operator) {
            return Err(ApiError::forbidden(
                "not_publisher",
                format!("only the owner of publisher {ns} may do this"),
            ));
        }
        Ok(p)
    }

    async fn publisher_keys(
        &self,
        c: &mut AnyConnection,
        ns: &str,
    ) -> ApiResult<Vec<PublisherKey>> {
        let rows = sqlx::query(
            "SELECT key_id, public_key, label, created_at, expires_at, revoked_at FROM hub_keys \
             WHERE namespace = $1 ORDER BY created_at, key_id",
        )
        .bind(ns)
        .fetch_all(&mut *c)
        .await?;
        let now = now_secs() as i64;
        let mut out = vec![];
        for r in rows {
            let expires: i64 = r.try_get("expires_at")?;
            let revoked: i64 = r.try_get("revoked_at")?;
            out.push(PublisherKey {
                key_id: r.try_get("key_id")?,
                public_key: r.try_get("public_key")?,
                label: r.try_get("label")?,
                created_at: rfc3339(r.try_get::<i64, _>("created_at")? as u64),
                expires_at: rfc3339(expires as u64),
                status: if revoked > 0 {
                    "revoked"
                } else if expires <= now {
                    "expired"
                } else {
                    "active"
                }
                .into(),
            });
        }
        Ok(out)
    }

    /// The delegation the publisher's keys make now: its active keys and its threshold (capped
    /// at their number); None when it has no active key.
    pub(crate) async fn delegation(
        &self,
        c: &mut AnyConnection,
        p: &PublisherRow,
    ) -> ApiResult<Option<Delegation>> {
        let keys: Vec<PublicKey> = self
            .publisher_keys(c, &p.namespace)
            .await?
            .into_iter()
            .filter(|k| k.status == "active")
            .filter_map(|k| PublicKey::from_hex(&k.public_key).ok())
            .collect();
        if keys.is_empty() {
            return Ok(None);
        }
        let threshold = (p.threshold.max(1) as u64).min(keys.len() as u64);
        Ok(Some(Delegation { keys, threshold }))
    }

    /// Makes the repository's delegation for `ns` what its keys say now (after a key is added,
    /// revoked or expires). A role its keys no longer sign leaves the repository.
    pub(crate) async fn sync_delegation(&self, ns: &str) -> ApiResult<bool> {
        let hub = self.hub()?;
        let mut c = self.db.pool.acquire().await?;
        let p = self.publisher_row(&mut c, ns).await?;
        let d = self.delegation(&mut c, &p).await?;
        drop(c);
        hub.repo
            .lock()
            .await
            .set_delegation(ns, d.as_ref())
            .await
            .map_err(tuf_error)
    }

    pub(crate) async fn publisher_view(
        &self,
        c: &mut AnyConnection,
        p: PublisherRow,
    ) -> ApiResult<Publisher> {
        let keys = self.publisher_keys(c, &p.namespace).await?;
        Ok(Publisher {
            namespace: p.namespace,
            display_name: p.display_name,
            owner: p.owner,
            verified_by: p.verified_by,
            grants: p.grants,
            threshold: p.threshold,
            keys,
            created_at: rfc3339(p.created_at as u64),
        })
    }

    /// Creates a publisher for a namespace (an account with a verified email).
    pub async fn create_publisher(&self, actor: &Actor, req: NewPublisher) -> ApiResult<Publisher> {
        self.hub()?;
        let ns = req.namespace.trim().to_owned();
        check_namespace(&ns).map_err(|e| ApiError::invalid("invalid_namespace", e.to_string()))?;
        if !actor.verified {
            return Err(ApiError::forbidden(
                "email_unverified",
                "verify your email first (macula account verify): a publisher's identity starts with it",
            ));
        }
        let verified_by = email_domain_verifies(&actor.email, &ns).unwrap_or_default();
        let display = req
            .display_name
            .filter(|d| !d.trim().is_empty())
            .unwrap_or_else(|| ns.clone());
        if display.len() > 200 {
            return Err(ApiError::invalid(
                "invalid_display_name",
                "display_name: at most 200 bytes",
            ));
        }
        let mut ch = self.change(actor).await?;
        sqlx::query(
            "INSERT INTO hub_publishers (namespace, owner_id, display_name, verified_by, grants, threshold, created_at) \
             VALUES ($1, $2, $3, $4, $5, 1, $6)",
        )
        .bind(&ns)
        .bind(&actor.account_id)
        .bind(&display)
        .bind(&verified_by)
        .bind(serde_json::to_string(&default_grants(&ns)).unwrap_or_default())
        .bind(now_secs() as i64)
        .execute(&mut *ch)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                ApiError::conflict("namespace_taken", format!("the namespace {ns} has a publisher"))
            } else {
                e.into()
            }
        })?;
        ch.audit(
            "hub.publisher.create",
            json!({"namespace": ns, "verified_by": verified_by}),
        );
        ch.commit_unique(
            "namespace_taken",
            &format!("the namespace {ns} has a publisher"),
        )
        .await?;
        let mut c = self.db.pool.acquire().await?;
        let row = self.publisher_row(&mut c, &ns).await?;
        self.publisher_view(&mut c, row).await
    }

    pub async fn show_publisher(&self, ns: &str) -> ApiResult<Publisher> {
        self.hub()?;
        let mut c = self.db.pool.acquire().await?;
        let row = self.publisher_row(&mut c, ns).await?;
        self.publisher_view(&mut c, row).await
    }

    /// A platform operator verifies a publisher's identity (tier changes are audited).
    pub async fn approve_publisher(&self, actor: &Actor, ns: &str) -> ApiResult<Publisher> {
        self.hub()?;
        Self::operator_only(actor)?;
        let mut ch = self.change(actor).await?;
        self.publisher_row(&mut ch, ns).await?;
        let by = format!("operator:{}", actor.email);
        sqlx::query("UPDATE hub_publishers SET verified_by = $1 WHERE namespace = $2")
            .bind(&by)
            .bind(ns)
            .execute(&mut *ch)
            .await?;
        ch.audit(
            "hub.publisher.verify",
            json!({"namespace": ns, "verified_by": by}),
        );
        ch.commit().await?;
        self.show_publisher(ns).await
    }

    /// Registers a signing key for a publisher (its owner).
    pub async fn add_publisher_key(
        &self,
        actor: &Actor,
        ns: &str,
        req: NewPublisherKey,
    ) -> ApiResult<PublisherKey> {
        self.hub()?;
        let key = PublicKey::from_hex(&req.public_key)
            .map_err(|e| ApiError::invalid("invalid_key", format!("public_key: {e}")))?;
        let days = req.days.unwrap_or(365);
        if !(1..=1095).contains(&days) {
            return Err(ApiError::invalid("invalid_days", "days: 1 to 1095"));
        }
        let label = req.label.unwrap_or_default();
        if label.len() > 200 {
            return Err(ApiError::invalid(
                "invalid_label",
                "label: at most 200 bytes",
            ));
        }
        let mut ch = self.change(actor).await?;
        let p = self.owned_publisher(&mut ch, actor, ns, false).await?;
        if p.verified_by.is_empty() {
            return Err(unverified(ns));
        }
        let now = now_secs() as i64;
        let id = key.id();
        sqlx::query(
            "INSERT INTO hub_keys (key_id, namespace, public_key, label, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 0)",
        )
        .bind(&id)
        .bind(ns)
        .bind(key.to_hex())
        .bind(&label)
        .bind(now)
        .bind(now + days as i64 * 86_400)
        .execute(&mut *ch)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                ApiError::conflict("key_exists", "this key is registered already (keys are not reused)")
            } else {
                e.into()
            }
        })?;
        ch.audit(
            "hub.key.add",
            json!({"namespace": ns, "key_id": id, "days": days}),
        );
        ch.commit_unique("key_exists", "this key is registered already")
            .await?;
        self.sync_delegation(ns).await?;
        let mut c = self.db.pool.acquire().await?;
        self.publisher_keys(&mut c, ns)
            .await?
            .into_iter()
            .find(|k| k.key_id == id)
            .ok_or_else(|| ApiError::internal("the key just added is not there"))
    }

    /// Revokes a publisher's key (its owner, or an operator): from now on it signs nothing; a
    /// role its other keys do not sign leaves the repository.
    pub async fn revoke_publisher_key(
        &self,
        actor: &Actor,
        ns: &str,
        key_id: &str,
    ) -> ApiResult<PublisherKey> {
        self.hub()?;
        let mut ch = self.change(actor).await?;
        self.owned_publisher(&mut ch, actor, ns, true).await?;
        let done = sqlx::query(
            "UPDATE hub_keys SET revoked_at = $1 WHERE namespace = $2 AND key_id = $3 AND revoked_at = 0",
        )
        .bind(now_secs() as i64)
        .bind(ns)
        .bind(key_id)
        .execute(&mut *ch)
        .await?;
        if done.rows_affected() > 0 {
            ch.audit("hub.key.revoke", json!({"namespace": ns, "key_id": key_id}));
        }
        ch.commit().await?;
        let dropped = self.sync_delegation(ns).await?;
        if let (Some(node), Some(hub)) = (&self.node, &self.hub) {
            node.hub_changed(hub.repo.lock().await.timestamp_version());
        }
        if dropped {
            tracing::info!("hub: {ns}'s role is no longer signed by its keys; its packages left the repository until it re-signs");
        }
        let mut c = self.db.pool.acquire().await?;
        self.publisher_keys(&mut c, ns)
            .await?
            .into_iter()
            .find(|k| k.key_id == key_id)
            .ok_or_else(|| ApiError::not_found(format!("no key {key_id} of publisher {ns}")))
    }
}

pub(crate) fn unverified(ns: &str) -> ApiError {
    ApiError::forbidden(
        "publisher_unverified",
        format!(
            "publisher {ns} is not verified yet: its owner's email must be at a domain named {ns}, \
             or a platform operator approves it (POST /v1/hub/publishers/{ns}/approve)"
        ),
    )
}
