//! Expiry: realms past their term and grace are released.

#[allow(unused_imports)]
use crate::prelude::*;

impl Registry {
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
}
