//! Transfer: the owner's authorization code, the new owner taking the realm over (a fee is
//! recorded), and what a transfer does to the realm: a new authority, every key revoked, every
//! member removed.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    /// The owner's authorization code for a transfer, shown once.
    pub async fn transfer_code(&self, actor: &Actor, name: &str) -> ApiResult<TransferCode> {
        let (mut tx, InRealm { row, .. }) = self
            .change_in(actor, name, Needs::Owner("transfer it"))
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
        tx.audit(
            "realm.transfer_code",
            json!({"expires_at": rfc3339(expires as u64)}),
        );
        tx.commit().await?;
        Ok(TransferCode {
            realm: name.to_owned(),
            code,
            expires_at: rfc3339(expires as u64),
            fee_cents: self.config.transfer_fee_cents,
        })
    }

    /// Accepts a transfer with the owner's code: the caller becomes the owner and is charged the
    /// transfer fee (recorded for billing).
    pub async fn transfer(&self, actor: &Actor, name: &str, code: &str) -> ApiResult<Realm> {
        let (mut tx, InRealm { row, .. }) = self.change_in(actor, name, Needs::Anyone).await?;
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
        tx.audit(
            "realm.transfer",
            json!({"from": row.owner_email, "to": actor.email, "fee_cents": fee}),
        );
        tx.publish();
        let row = tx.reread().await?;
        tx.commit().await?;
        Ok(Realm {
            fee_cents: Some(fee),
            ..self.realm_view(&row, Some(&Access::Owner))
        })
    }

    pub(crate) async fn change_owner(
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
}
