//! Operators' tools: ownership claims (disputes), freezing, suspension, forced transfer.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    pub async fn add_claim(
        &self,
        actor: &Actor,
        name: &str,
        claimant: &str,
        note: &str,
    ) -> ApiResult<Claim> {
        let (mut tx, _) = self.change_in(actor, name, Needs::Operator).await?;
        let claimant = validate_email(claimant)?;
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
        tx.audit(
            "dispute.claim",
            json!({"claim": id, "claimant": claimant, "note": note}),
        );
        tx.commit().await?;
        Ok(Claim {
            id,
            realm: Some(name.to_owned()),
            claimant,
            note: note.to_owned(),
            status: "open".into(),
            created_by: None,
            created_at: rfc3339(now as u64),
        })
    }

    pub async fn claims(&self, actor: &Actor, name: &str) -> ApiResult<List<Claim>> {
        Self::operator_only(actor)?;
        let rows = sqlx::query("SELECT id, claimant, note, status, created_by, created_at FROM claims WHERE realm = $1 ORDER BY created_at, id")
            .bind(name)
            .fetch_all(&self.db.pool)
            .await?;
        let mut items = vec![];
        for r in rows {
            items.push(Claim {
                id: r.try_get("id")?,
                realm: None,
                claimant: r.try_get("claimant")?,
                note: r.try_get("note")?,
                status: r.try_get("status")?,
                created_by: Some(r.try_get("created_by")?),
                created_at: rfc3339(r.try_get::<i64, _>("created_at")? as u64),
            });
        }
        Ok(all_of(items))
    }

    /// Freezes (no transfer, delete or owner change while a dispute is open) or unfreezes.
    pub async fn set_frozen(
        &self,
        actor: &Actor,
        name: &str,
        reason: Option<&str>,
    ) -> ApiResult<Realm> {
        let (mut tx, _) = self.change_in(actor, name, Needs::Operator).await?;
        let reason = operator_reason(reason, "frozen by the operator");
        sqlx::query("UPDATE realms SET frozen = $1 WHERE name = $2")
            .bind(reason)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.audit(
            if reason.is_empty() {
                "dispute.unfreeze"
            } else {
                "dispute.freeze"
            },
            json!({"reason": reason}),
        );
        let row = tx.reread().await?;
        tx.commit().await?;
        Ok(self.realm_view(&row, None))
    }

    /// Suspends (abuse takedown: every node refuses the realm's sessions and closes live ones)
    /// or lifts a suspension.
    pub async fn set_suspended(
        &self,
        actor: &Actor,
        name: &str,
        reason: Option<&str>,
    ) -> ApiResult<Realm> {
        let (mut tx, InRealm { row, mut doc, .. }) =
            self.change_in(actor, name, Needs::Operator).await?;
        let reason = operator_reason(reason, "suspended by the operator");
        sqlx::query("UPDATE realms SET suspended = $1 WHERE name = $2")
            .bind(reason)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        doc.disabled = if !reason.is_empty() {
            Some(format!("suspended: {reason}"))
        } else if now_secs() as i64 > self.grace_end(&row) {
            doc.disabled
        } else {
            None
        };
        self.put_policy(&mut tx, name, doc, &actor.email).await?;
        tx.audit(
            if reason.is_empty() {
                "realm.unsuspend"
            } else {
                "realm.suspend"
            },
            json!({"reason": reason}),
        );
        tx.publish();
        let row = tx.reread().await?;
        tx.commit().await?;
        Ok(self.realm_view(&row, None))
    }

    /// Resolves a dispute by moving the realm to `to` (no fee).
    pub async fn force_transfer(&self, actor: &Actor, name: &str, to: &str) -> ApiResult<Realm> {
        let (mut tx, InRealm { row, .. }) = self.change_in(actor, name, Needs::Operator).await?;
        let to = validate_email(to)?;
        let id = verified_account(&mut tx, &to).await?;
        self.change_owner(&mut tx, &row, actor, &id, &to).await?;
        sqlx::query("UPDATE claims SET status = 'resolved' WHERE realm = $1 AND status = 'open'")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.audit(
            "dispute.transfer",
            json!({"from": row.owner_email, "to": to}),
        );
        tx.publish();
        let row = tx.reread().await?;
        tx.commit().await?;
        Ok(self.realm_view(&row, None))
    }
}

/// An operator's reason for a freeze or a suspension: `default` when given empty, and empty
/// (lifted) when not given at all.
fn operator_reason<'a>(reason: Option<&'a str>, default: &'a str) -> &'a str {
    match reason {
        Some("") => default,
        Some(r) => r,
        None => "",
    }
}
