//! Plans and add-ons: changing a realm's plan (upgrades at once, downgrades next month) and
//! turning add-ons on and off, with their history.

#[allow(unused_imports)]
use super::*;

impl Registry {
    pub(crate) async fn tier_at(
        &self,
        c: &mut sqlx::AnyConnection,
        realm: &str,
        at: i64,
        fallback: &str,
    ) -> ApiResult<String> {
        let t: Option<String> = sqlx::query_scalar(
            "SELECT tier FROM plan_history WHERE realm = $1 AND effective_at <= $2 ORDER BY effective_at DESC LIMIT 1",
        )
        .bind(realm)
        .bind(at)
        .fetch_optional(&mut *c)
        .await?;
        Ok(t.unwrap_or_else(|| fallback.to_owned()))
    }

    pub(crate) async fn addons_in(
        &self,
        c: &mut sqlx::AnyConnection,
        realm: &str,
        month: i64,
    ) -> ApiResult<Vec<String>> {
        let mut v: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT feature FROM addons WHERE realm = $1 AND started_at < $2 AND (ended_at = 0 OR ended_at > $3)",
        )
        .bind(realm)
        .bind(next_month(month))
        .bind(month)
        .fetch_all(&mut *c)
        .await?;
        v.sort();
        Ok(v)
    }

    /// Changes a realm's plan (owner only). Upgrades apply now (the month is billed at the new
    /// plan); downgrades apply on the first of next month.
    pub async fn set_plan(&self, actor: &Actor, realm: &str, new: &str) -> ApiResult<PlanChange> {
        let prices = &self.config.prices;
        let t = tier_of(prices, new)?;
        let now = now_secs() as i64;
        let (mut tx, InRealm { row, .. }) = self
            .change_in(actor, realm, Needs::Owner("change its plan"))
            .await?;
        let upgrade = prices.rank(&t.name) > prices.rank(&row.tier);
        // The plan so far, for the months before this change.
        sqlx::query(
            "INSERT INTO plan_history (realm, tier, effective_at, created_by, created_at) \
             SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM plan_history WHERE realm = $1)",
        )
        .bind(realm)
        .bind(&row.tier)
        .bind(row.created_at)
        .bind(&actor.email)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let effective = if upgrade || t.name == row.tier {
            now
        } else {
            next_month(month_start(now))
        };
        // A later change replaces a pending one.
        sqlx::query("DELETE FROM plan_history WHERE realm = $1 AND effective_at > $2")
            .bind(realm)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO plan_history (realm, tier, effective_at, created_by, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (realm, effective_at) DO UPDATE SET tier = excluded.tier",
        )
        .bind(realm)
        .bind(&t.name)
        .bind(effective)
        .bind(&actor.email)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if effective == now {
            sqlx::query("UPDATE realms SET tier = $1 WHERE name = $2")
                .bind(&t.name)
                .bind(realm)
                .execute(&mut *tx)
                .await?;
            // The new plan's limits reach the nodes with the next policy version.
            tx.refresh_plan_limits().await?;
        }
        tx.audit(
            "plan.change",
            json!({"from": row.tier, "to": t.name, "effective_at": rfc3339(effective as u64)}),
        );
        tx.commit().await?;
        if effective == now && !t.hard_quota {
            self.set_quota_block(realm, month_start(now), None).await?;
        }
        Ok(PlanChange {
            realm: realm.to_owned(),
            tier: if effective == now { &t.name } else { &row.tier }.clone(),
            scheduled: (effective != now).then(|| ScheduledPlan {
                tier: t.name.clone(),
                effective_at: rfc3339(effective as u64),
            }),
            rule: "upgrades apply at once and the month is billed at the new plan; downgrades apply on the first of next month".into(),
        })
    }

    /// Turns a premium add-on on or off for a realm (owner only).
    pub async fn set_addon(
        &self,
        actor: &Actor,
        realm: &str,
        feature: &str,
        on: bool,
    ) -> ApiResult<Addon> {
        let prices = &self.config.prices;
        let ad = prices.addon(feature).ok_or_else(|| {
            let ids: Vec<&str> = prices.addons.iter().map(|a| a.id.as_str()).collect();
            ApiError::invalid(
                "invalid_addon",
                format!("add-on {feature:?}: choose one of {}", ids.join(", ")),
            )
        })?;
        let (id, title, cents) = (ad.id.as_str(), ad.title.as_str(), ad.monthly_cents);
        let now = now_secs() as i64;
        let (mut tx, _) = self
            .change_in(actor, realm, Needs::Owner("change its add-ons"))
            .await?;
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM addons WHERE realm = $1 AND feature = $2 AND ended_at = 0",
        )
        .bind(realm)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if on && active == 0 {
            sqlx::query("INSERT INTO addons (realm, feature, started_at) VALUES ($1, $2, $3)")
                .bind(realm)
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        } else if !on && active > 0 {
            sqlx::query("UPDATE addons SET ended_at = $1 WHERE realm = $2 AND feature = $3 AND ended_at = 0")
                .bind(now)
                .bind(realm)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.audit(
            if on { "addon.on" } else { "addon.off" },
            json!({"feature": id}),
        );
        tx.commit().await?;
        Ok(Addon {
            realm: realm.to_owned(),
            feature: id.to_owned(),
            title: title.to_owned(),
            active: on,
            monthly_cents: cents,
            rule: "an add-on is billed in full for every month in which it was active".into(),
        })
    }
}
