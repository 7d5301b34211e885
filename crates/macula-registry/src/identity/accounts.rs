//! Accounts and sessions: sign-up, log-in (throttled per account and source), session tokens,
//! log-out.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    pub async fn signup(
        &self,
        email: &str,
        password: &str,
        remote: &str,
        ip: Option<IpAddr>,
    ) -> ApiResult<NewAccount> {
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
        Ok(NewAccount {
            id,
            email,
            created_at: rfc3339(now as u64),
            email_verified: false,
            verification: sent,
        })
    }

    /// Counts a wrong password for (account, source) and locks that pair out after
    /// `max_failed_logins` in a row; the error to answer with.
    pub(crate) async fn password_failed(
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
    ) -> ApiResult<Session> {
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
        Ok(Session {
            token,
            email,
            expires_at: rfc3339(expires as u64),
        })
    }

    pub(crate) fn login_rate(&self, ip: IpAddr) -> ApiResult<()> {
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
        let mut tx = self.change(actor).await?;
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(sha256_hex(token))
            .execute(&mut *tx)
            .await?;
        tx.audit("session.logout", json!({}));
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

    pub fn whoami(&self, actor: &Actor) -> Account {
        Account {
            id: actor.account_id.clone(),
            email: actor.email.clone(),
            email_verified: actor.verified,
            operator: actor.operator,
        }
    }
}

pub(crate) fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
}

pub(crate) fn password_matches(password: &str, hash: &str) -> bool {
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

pub(crate) fn validate_password(p: &str) -> ApiResult<()> {
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

/// The source a login failure is counted against: the address, or its /64 for IPv6 (one host
/// commonly holds a whole /64, so its addresses are one source).
pub(crate) fn login_source(ip: IpAddr) -> String {
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

pub(crate) fn invalid_credentials() -> ApiError {
    ApiError::unauthorized("wrong email or password").with_code("invalid_credentials")
}

pub(crate) fn locked(secs: i64) -> ApiError {
    let mins = (secs.max(1) as u64).div_ceil(60);
    ApiError::too_many(
        "account_locked",
        format!("too many failed logins from this address: it is locked out of the account; try again in {mins} minute(s) (other addresses are not affected)"),
        secs.max(1) as u64,
    )
}

/// How long a looked-up session is trusted without asking the database again. A logout
/// through this process takes effect at once; one through another registry host sharing the
/// database (PostgreSQL), within this time. It saves a database round trip per request.
pub(crate) const SESSION_CACHE_TTL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub(crate) struct CachedSession {
    pub(crate) at: Instant,
    /// (session expiry, account id, email, email verified); `None`: logged out.
    pub(crate) session: Option<(i64, String, String, bool)>,
}
