//! Email ownership: verification codes for sign-up, invitations and address changes.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    /// How verification mail goes out (`log`, `smtp`, `dir`).
    pub fn mail_kind(&self) -> &'static str {
        self.mailer.kind()
    }

    /// Mails a verification code for `email` to it; what to tell the user (`sent`, or why not).
    pub(crate) async fn send_verification(&self, account_id: &str, email: &str) -> Verification {
        let not_sent = |to: Option<&str>, error: &str| Verification {
            sent: false,
            to: to.map(str::to_owned),
            via: None,
            error: Some(error.to_owned()),
        };
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
                return not_sent(
                    Some(email),
                    "three codes went to this address in the last hour; use one of them or wait",
                );
            }
            Err(e) => {
                tracing::error!("storing a verification code: {e}");
                return not_sent(None, "the code could not be stored; ask again later");
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
            Ok(()) => Verification {
                sent: true,
                to: Some(email.to_owned()),
                via: Some(self.mailer.kind().to_owned()),
                error: None,
            },
            Err(e) => {
                tracing::error!("verification mail to {email}: {e}");
                not_sent(
                    Some(email),
                    "the mail could not be sent; ask for another code later (macula account resend)",
                )
            }
        }
    }

    /// Proves ownership of an address with the code mailed to it: the account's email becomes
    /// (or, after a change of address, is changed to) that address, verified.
    pub async fn verify_email(&self, code: &str, remote: &str) -> ApiResult<VerifiedEmail> {
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
        Ok(VerifiedEmail {
            id: account_id,
            email,
            email_verified: true,
        })
    }

    /// Mails a new verification code for the account's address.
    pub async fn resend_verification(&self, actor: &Actor) -> ApiResult<Verification> {
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
    ) -> ApiResult<PendingEmail> {
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
        let mut tx = self.change(actor).await?;
        tx.audit("account.email_change", json!({"to": email}));
        tx.commit().await?;
        let sent = self.send_verification(&actor.account_id, &email).await;
        Ok(PendingEmail {
            email: actor.email.clone(),
            pending_email: email,
            verification: sent,
        })
    }

    /// One code per account per minute, at most ten alive: mail cannot be used to flood an inbox.
    pub(crate) async fn verification_allowed(&self, account_id: &str) -> ApiResult<()> {
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
}

/// The account that owns (and verified) `email`: a realm is given only to an address's proven
/// owner, never to whoever signed up with it first.
pub(crate) async fn verified_account(c: &mut AnyConnection, email: &str) -> ApiResult<String> {
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
