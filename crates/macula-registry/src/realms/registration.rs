//! The realm registry: who may see and change a realm, registration (names, subrealms,
//! delegation), renewal and deletion (transfer is in `transfer.rs`).

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    pub(crate) async fn access(
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

    /// The realm as the API shows it (`access`: the caller's, shown for one realm).
    pub(crate) fn realm_view(&self, r: &RealmRow, access: Option<&Access>) -> Realm {
        let now = now_secs() as i64;
        let status = if !r.suspended.is_empty() {
            "suspended"
        } else if now > r.expires_at {
            "expired"
        } else {
            "active"
        };
        let reason = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Realm {
            name: r.name.clone(),
            owner: r.owner_email.clone(),
            parent: r.parent.clone(),
            tier: r.tier.clone(),
            status: status.into(),
            frozen: !r.frozen.is_empty(),
            created_at: rfc3339(r.created_at as u64),
            expires_at: rfc3339(r.expires_at as u64),
            grace_ends_at: rfc3339(self.grace_end(r) as u64),
            policy_version: r.policy_version,
            suspended_reason: reason(&r.suspended),
            frozen_reason: reason(&r.frozen),
            access: access.map(|a| match a {
                Access::Owner => "owner".to_owned(),
                Access::Member(role) => format!("member:{role}"),
                Access::Operator => "operator".to_owned(),
                Access::Stranger => "none".to_owned(),
            }),
            active_keys: None,
            members: None,
            roles: None,
            live: None,
            fee_cents: None,
        }
    }

    pub(crate) fn grace_end(&self, r: &RealmRow) -> i64 {
        r.expires_at + (self.config.grace_days * 86_400) as i64
    }

    /// Registers a realm: first come, first served; a subrealm only by the owner of its nearest
    /// registered parent, who may delegate it to another account.
    pub async fn register(
        &self,
        actor: &Actor,
        req: NewRealm,
        idem: Option<Idempotency>,
    ) -> ApiResult<(StatusCode, Realm)> {
        validate_realm_name(&req.name)?;
        let prices = &self.config.prices;
        let tier = req
            .tier
            .clone()
            .unwrap_or_else(|| prices.tiers[0].name.clone());
        crate::billing::tier_of(prices, &tier)?;
        let mut tx = self.change(actor).await?.in_realm(&req.name);
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
                tx.tx(),
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
                 ops_register, ops_dht, bytes_in, bytes_out, instance_ms, package_bytes) \
                 SELECT $1, period, start, ops_publish, ops_subscribe, ops_call, ops_register, ops_dht, \
                 bytes_in, bytes_out, instance_ms, package_bytes FROM usage_rollups WHERE realm = $2"
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
        let mut doc = macula_common::policy::default_policy(name);
        doc.users.push(UserDoc {
            email: owner_email.clone(),
            role: "admin".into(),
        });
        tx.put_policy(doc).await?;
        tx.audit(
            "realm.register",
            json!({"owner": owner_email, "tier": tier, "parent": parent.as_ref().map(|p| &p.name)}),
        );
        let row = tx.reread().await?;
        let body = self.realm_view(&row, None);
        if let Some(i) = &idem {
            tx.remember(i, StatusCode::CREATED, &body);
        }
        tx.commit_unique(
            "realm_taken",
            &format!("{name} was registered by another account a moment ago"),
        )
        .await?;
        Ok((StatusCode::CREATED, body))
    }

    pub async fn list_realms(&self, actor: &Actor, page: &Page) -> ApiResult<List<Realm>> {
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
            let mut v = self.realm_view(&row, None);
            v.access = Some(if row.owner_id == actor.account_id {
                "owner".into()
            } else {
                "member".into()
            });
            items.push(v);
        }
        Ok(page_of(items, limit, |v| v.name.clone()))
    }

    pub async fn show_realm(&self, actor: &Actor, name: &str) -> ApiResult<Realm> {
        let (mut tx, InRealm { row, access, doc }) = self.read_in(actor, name).await?;
        let keys: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE realm = $1 AND revoked_at = 0 AND (expires_at = 0 OR expires_at > $2)",
        )
        .bind(name)
        .bind(now_secs() as i64)
        .fetch_one(&mut *tx)
        .await?;
        Ok(Realm {
            active_keys: Some(keys),
            members: Some(doc.users.len()),
            roles: Some(doc.roles.iter().map(|r| r.name.clone()).collect()),
            live: self.node.as_ref().map(|node| Live {
                sessions_on_this_node: node.live_sessions(name),
            }),
            ..self.realm_view(&row, Some(&access))
        })
    }

    pub async fn delete_realm(&self, actor: &Actor, name: &str) -> ApiResult<()> {
        let (mut tx, InRealm { row, .. }) = self
            .change_in(actor, name, Needs::Owner("delete it"))
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
            tx.tx(),
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
    pub(crate) fn new_authority(&self, name: &str) -> (SigningKey, SignedCert) {
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

    pub async fn renew(&self, actor: &Actor, name: &str, years: u64) -> ApiResult<Realm> {
        if !(1..=10).contains(&years) {
            return Err(ApiError::invalid(
                "invalid_years",
                "renew for 1 to 10 years",
            ));
        }
        let (mut tx, InRealm { row, doc, .. }) = self
            .change_in(actor, name, Needs::Owner("renew it"))
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
            tx.put_policy(d).await?;
        }
        tx.audit(
            "realm.renew",
            json!({"years": years, "expires_at": rfc3339(expires as u64)}),
        );
        tx.publish();
        let row = tx.reread().await?;
        tx.commit().await?;
        Ok(self.realm_view(&row, Some(&Access::Owner)))
    }
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
    pub(crate) fn from_row(r: &AnyRow) -> Result<RealmRow, sqlx::Error> {
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

pub(crate) const REALM_COLUMNS: &str =
    "r.name, r.owner_id, a.email AS owner_email, r.parent, r.tier, \
    r.suspended, r.frozen, r.created_at, r.expires_at, r.authority_key, r.authority_cert, \
    r.policy_version, r.generation, p.doc";

/// Realms with their owner's email and newest policy, in one query.
pub(crate) const REALM_FROM: &str = "realms r JOIN accounts a ON a.id = r.owner_id \
    JOIN policy_versions p ON p.realm = r.name AND p.version = r.policy_version";

pub(crate) fn frozen(row: &RealmRow) -> ApiError {
    ApiError::conflict(
        "realm_frozen",
        format!(
            "{} is frozen by the operator ({}); ownership changes wait for the dispute to close",
            row.name, row.frozen
        ),
    )
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
pub(crate) async fn release(
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
pub(crate) async fn owner_authorities(
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
