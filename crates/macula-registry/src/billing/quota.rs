//! Quotas and notices: the Hobby plan's hard quota enforced at the edge (a policy version every
//! node applies), notices at 80 % and 100 %, the periodic billing tick.

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// A realm's month so far: (operations, egress bytes).
    pub(crate) async fn month_totals(
        &self,
        c: &mut sqlx::AnyConnection,
        realm: &str,
        month: i64,
    ) -> ApiResult<(u64, u64)> {
        let row = sqlx::query(
            "SELECT ops_publish + ops_subscribe + ops_call + ops_register + ops_dht AS ops, bytes_out \
             FROM usage_rollups WHERE realm = $1 AND period = 'month' AND start = $2",
        )
        .bind(realm)
        .bind(month)
        .fetch_optional(&mut *c)
        .await?;
        Ok(match row {
            Some(r) => (
                r.try_get::<i64, _>("ops")?.max(0) as u64,
                r.try_get::<i64, _>("bytes_out")?.max(0) as u64,
            ),
            None => (0, 0),
        })
    }

    /// Notices at 80 % and 100 % of the allowance, and the Hobby plan's hard quota, for realms
    /// whose usage just grew.
    pub async fn check_quotas(&self, realms: &[String]) -> ApiResult<()> {
        let month = month_start(now_secs() as i64);
        for name in realms {
            let mut c = self.db.pool.acquire().await?;
            let Some((tier_name, blocked)) = sqlx::query_as::<_, (String, i64)>(
                "SELECT tier, quota_blocked FROM realms WHERE name = $1",
            )
            .bind(name)
            .fetch_optional(&mut *c)
            .await?
            else {
                continue;
            };
            let t = self.config.prices.tier_or_first(&tier_name);
            let (ops, bytes) = self.month_totals(&mut c, name, month).await?;
            drop(c);
            let used =
                (ops as f64 / t.included_ops as f64).max(bytes as f64 / t.included_bytes as f64);
            if let Some(node) = &self.node {
                node.set_quota_used(name, used);
            }
            let what = format!(
                "{} of {} operations and {:.3} of {} GiB egress this month ({})",
                ops,
                t.included_ops,
                bytes as f64 / GIB as f64,
                t.included_bytes / GIB,
                month_name(month)
            );
            if used >= 0.8 {
                self.notice(
                    name,
                    month,
                    "quota_80",
                    format!("realm {name} has used 80% of its {} plan: {what}", t.title),
                )
                .await?;
            }
            if used >= 1.0 {
                let then = if t.hard_quota {
                    "operations are refused until the month ends or the realm is upgraded"
                } else {
                    "further usage is billed as overage"
                };
                self.notice(
                    name,
                    month,
                    "quota_100",
                    format!(
                        "realm {name} has used all of its {} plan: {what}; {then}",
                        t.title
                    ),
                )
                .await?;
                if t.hard_quota && blocked != month {
                    let prices = &self.config.prices;
                    let next = prices
                        .tiers
                        .get(prices.rank(&t.name) + 1)
                        .map_or("a paid plan", |n| n.name.as_str());
                    let why = format!(
                        "realm {name} used its {} plan's monthly quota ({what}); operations are refused until {} or an upgrade (`macula realms plan {name} {next}`)",
                        t.title,
                        rfc3339(next_month(month) as u64)
                    );
                    self.set_quota_block(name, month, Some(why)).await?;
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn notice(
        &self,
        realm: &str,
        month: i64,
        kind: &str,
        message: String,
    ) -> ApiResult<()> {
        let mut tx = self.db.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO notices (realm, period, kind, message, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (realm, period, kind) DO NOTHING",
        )
        .bind(realm)
        .bind(month)
        .bind(kind)
        .bind(&message)
        .bind(now_secs() as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted > 0 {
            tracing::info!(realm, kind, "{message}");
            audit(
                &mut tx,
                Some(realm),
                "billing",
                &format!("quota.{kind}"),
                json!({"message": message}),
                "",
            );
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sets (or lifts, with `None`) a realm's quota block: a new policy version that every
    /// node enforces.
    pub(crate) async fn set_quota_block(
        &self,
        name: &str,
        month: i64,
        why: Option<String>,
    ) -> ApiResult<()> {
        let mut tx = self.db.begin().await?;
        let row = self.realm(&mut tx, name).await?;
        // Read under the write lock: an upgrade that landed since the quota check wins.
        let why = why.filter(|_| self.config.prices.tier_or_first(&row.tier).hard_quota);
        let mut doc = self.policy_doc(&row)?;
        if doc.quota_exceeded == why {
            return Ok(());
        }
        doc.quota_exceeded = why.clone();
        sqlx::query("UPDATE realms SET quota_blocked = $1 WHERE name = $2")
            .bind(if why.is_some() { month } else { 0 })
            .bind(name)
            .execute(&mut *tx)
            .await?;
        self.put_policy(&mut tx, name, doc, "billing").await?;
        audit(
            &mut tx,
            Some(name),
            "billing",
            if why.is_some() {
                "quota.block"
            } else {
                "quota.unblock"
            },
            json!({"reason": why}),
            "",
        );
        tx.commit().await?;
        self.materialize(name).await
    }

    /// Periodic work: lifts quota blocks of past months, applies downgrades that came due, and
    /// finalizes the invoices of the month that ended.
    pub async fn billing_tick(&self) -> ApiResult<()> {
        let now = now_secs() as i64;
        let month = month_start(now);
        let blocked: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM realms WHERE quota_blocked <> 0 AND quota_blocked < $1",
        )
        .bind(month)
        .fetch_all(&self.db.pool)
        .await?;
        for name in blocked {
            self.set_quota_block(&name, month, None).await?;
        }
        let due: Vec<(String, String)> = sqlx::query_as(
            "SELECT p.realm, p.tier FROM plan_history p JOIN realms r ON r.name = p.realm \
             WHERE p.effective_at <= $1 AND p.tier <> r.tier AND p.effective_at = \
             (SELECT MAX(q.effective_at) FROM plan_history q WHERE q.realm = p.realm AND q.effective_at <= $1)",
        )
        .bind(now)
        .fetch_all(&self.db.pool)
        .await?;
        for (realm, t) in due {
            let mut tx = self.db.begin().await?;
            sqlx::query("UPDATE realms SET tier = $1 WHERE name = $2")
                .bind(&t)
                .bind(&realm)
                .execute(&mut *tx)
                .await?;
            let limits = self.refresh_plan_limits(&mut tx, &realm, "billing").await?;
            audit(
                &mut tx,
                Some(&realm),
                "billing",
                "plan.applied",
                json!({"tier": t}),
                "",
            );
            tx.commit().await?;
            if limits {
                self.materialize(&realm).await?;
            }
            // A downgrade to Hobby can put the realm over its quota at once.
            self.check_quotas(std::slice::from_ref(&realm)).await?;
        }
        // The month that ended is finalized an hour later: the last flushes of every node (and
        // nodes that were briefly cut off) have reported by then.
        let previous = month_start(month - 1);
        if now < month + FINALIZE_AFTER_SECS {
            return Ok(());
        }
        let done: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM invoices WHERE month = $1 AND status <> 'draft'",
        )
        .bind(previous)
        .fetch_one(&self.db.pool)
        .await?;
        if done == 0 {
            let any: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM realms WHERE created_at < $1")
                .bind(month)
                .fetch_one(&self.db.pool)
                .await?;
            if any > 0 {
                let s = self.run_invoices(previous, None).await?;
                tracing::info!(month = %month_name(previous), invoices = s.invoices, "invoices finalized");
            }
        }
        Ok(())
    }
}
