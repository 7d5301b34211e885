//! The append-only audit log: written in the transaction of every change, read by owners.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
    pub async fn audit_log(
        &self,
        actor: &Actor,
        realm: Option<&str>,
        page: &Page,
    ) -> ApiResult<List<AuditEntry>> {
        let limit = page.limit();
        let before = page.below()?;
        let rows = match realm {
            Some(name) => {
                let (mut tx, _) = self.read_in(actor, name).await?;
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
            items.push(AuditEntry {
                id: r.try_get("id")?,
                realm: r.try_get("realm")?,
                actor: r.try_get("actor")?,
                action: r.try_get("action")?,
                detail: serde_json::from_str::<Value>(&detail).unwrap_or(Value::Null),
                remote: r.try_get("remote")?,
                at: rfc3339(r.try_get::<i64, _>("at")? as u64),
            });
        }
        Ok(page_of(items, limit, |v| v.id.to_string()))
    }
}

/// Records a change in the audit log, in the change's own transaction.
impl Actor {
    /// Appends the audit entry of a change `self` makes (to `realm`, or to its account), in the
    /// change's transaction.
    pub(crate) fn audit(&self, tx: &mut WriteTx, realm: Option<&str>, action: &str, detail: Value) {
        audit(tx, realm, &self.email, action, detail, &self.remote);
    }
}

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
