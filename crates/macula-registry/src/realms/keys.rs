//! API keys: issued (signed by the realm's authority, re-signed from their claims rather than
//! stored), listed, revoked.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
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
    ) -> ApiResult<(StatusCode, Key)> {
        for _ in 0..5 {
            let mut c = self.db.pool.acquire().await?;
            if let Some(i) = &idem {
                if let Some((status, body)) = self.replay::<Key>(&mut c, actor, i).await? {
                    // The secret is never stored: the same key is signed again from its claims
                    // (Ed25519 signatures are deterministic).
                    let key = self.reissue(&mut c, &body.id).await?;
                    return Ok((
                        status,
                        Key {
                            key: Some(key),
                            ..body
                        },
                    ));
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
            actor.audit(
                &mut tx,
                Some(name),
                "key.create",
                json!({"key_id": claims.kid, "role": claims.role, "name": claims.name}),
            );
            let body = key_view(&claims, 0);
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
            return Ok((
                StatusCode::CREATED,
                Key {
                    key: Some(key),
                    ..body
                },
            ));
        }
        Err(ApiError::conflict(
            "realm_busy",
            "the realm changed during each of five attempts to create the key; retry",
        ))
    }

    /// Checks a key request against the realm as read, and signs the key.
    pub(crate) fn new_key(
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

    pub(crate) fn sign_key(&self, row: &RealmRow, claims: &KeyClaims) -> ApiResult<String> {
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

    pub(crate) async fn reissue(&self, c: &mut AnyConnection, kid: &str) -> ApiResult<String> {
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
    ) -> ApiResult<List<Key>> {
        let limit = page.limit();
        let after = page.after()?;
        let cols =
            "k.id, k.realm, k.role, k.name, k.created_by, k.created_at, k.expires_at, k.revoked_at";
        let text: String = match realm {
            Some(name) => {
                let (mut c, _) = self.read_in(actor, name).await?;
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
            .map(|r| Key {
                status: Some(
                    if r.revoked_at != 0 {
                        "revoked"
                    } else if r.expires_at != 0 && r.expires_at <= now {
                        "expired"
                    } else {
                        "active"
                    }
                    .into(),
                ),
                created_by: Some(r.created_by),
                created_at: rfc3339(r.created_at as u64),
                expires_at: (r.expires_at != 0).then(|| rfc3339(r.expires_at as u64)),
                revoked_at: (r.revoked_at != 0).then(|| rfc3339(r.revoked_at as u64)),
                id: r.id,
                key: None,
                realm: r.realm,
                role: r.role,
                name: r.name,
            })
            .collect();
        Ok(page_of(items, limit, |v| v.id.clone()))
    }

    /// Revokes a key: a new policy version lists it, which every node applies (and closes the
    /// key's live sessions) within seconds.
    pub async fn revoke_key(&self, actor: &Actor, name: &str, kid: &str) -> ApiResult<RevokedKey> {
        let (mut tx, InRealm { mut doc, .. }) =
            self.change_in(actor, name, Needs::Action(ADMIN)).await?;
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
            tx.put_policy(doc).await?;
            tx.audit("key.revoke", json!({"key_id": kid}));
            now
        };
        tx.commit().await?;
        Ok(RevokedKey {
            id: kid.to_owned(),
            realm: name.to_owned(),
            revoked_at: rfc3339(at as u64),
        })
    }

    /// The realm a key belongs to (404 if there is no such key).
    pub async fn realm_of_key(&self, kid: &str) -> ApiResult<String> {
        let realm: Option<String> = sqlx::query_scalar("SELECT realm FROM api_keys WHERE id = $1")
            .bind(kid)
            .fetch_optional(&self.db.pool)
            .await?;
        realm.ok_or_else(|| ApiError::not_found(format!("no key {kid} in the registry")))
    }
}

/// The columns of a key listing, as aggregated by [`Db::json_rows`].
pub(crate) const KEY_FIELDS: &[&str] = &[
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
pub(crate) struct KeyRow {
    pub(crate) id: String,
    pub(crate) realm: String,
    pub(crate) role: String,
    pub(crate) name: String,
    pub(crate) created_by: String,
    pub(crate) created_at: i64,
    pub(crate) expires_at: i64,
    pub(crate) revoked_at: i64,
}

pub(crate) fn key_view(c: &KeyClaims, revoked_at: i64) -> Key {
    Key {
        id: c.kid.clone(),
        key: None,
        realm: c.realm.clone(),
        role: c.role.clone(),
        name: c.name.clone(),
        created_by: None,
        created_at: rfc3339(c.issued_at),
        expires_at: (c.expires_at != 0).then(|| rfc3339(c.expires_at)),
        revoked_at: (revoked_at != 0).then(|| rfc3339(revoked_at as u64)),
        status: None,
    }
}

/// A realm's authority, parsed from its stored text (kept to tell when it changed).
pub(crate) struct Signer {
    pub(crate) key_text: String,
    pub(crate) cert_text: String,
    pub(crate) key: SigningKey,
    pub(crate) cert: SignedCert,
}
