//! Reading usage: who may (an account, or a realm's admin key), by hour, day or month, as JSON or
//! CSV.

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// Who is reading usage: an account (session token), or the holder of a realm's admin API
    /// key (so that `macula usage` works with the key `macula up` printed, for realms that live
    /// only in a config directory too).
    pub async fn viewer(&self, bearer: &str, remote: String) -> ApiResult<Viewer> {
        if !bearer.starts_with("sk_") {
            return Ok(Viewer::Account(self.authenticate(bearer, remote).await?));
        }
        let node = self.node.as_ref().ok_or_else(|| {
            ApiError::unauthorized("API keys are accepted only by a registry hosted on a node")
        })?;
        let v = node
            .verify_key(bearer)
            .map_err(|e| ApiError::unauthorized(format!("API key refused: {e}")))?;
        if v.claims.role != "admin" {
            return Err(ApiError::forbidden(
                "admin_key_required",
                format!(
                    "usage is shown to the realm's admin keys; this key has role {:?}",
                    v.claims.role
                ),
            ));
        }
        Ok(Viewer::Key {
            realm: v.claims.realm,
        })
    }

    pub(crate) async fn usage_access(&self, viewer: &Viewer, realm: &str) -> ApiResult<()> {
        match viewer {
            Viewer::Account(actor) => {
                self.read_in(actor, realm).await?;
                Ok(())
            }
            Viewer::Key { realm: kr } if realm == kr => Ok(()),
            Viewer::Key { realm: kr } => Err(ApiError::forbidden(
                "not_your_realm",
                format!("this API key is for realm {kr}, not {realm}"),
            )),
        }
    }

    /// A realm's usage per `period` (hour, day, month) from `from` to `to` (Unix seconds).
    pub async fn usage(
        &self,
        actor: &Viewer,
        realm: &str,
        period: &str,
        from: i64,
        to: i64,
    ) -> ApiResult<Vec<UsagePeriod>> {
        self.usage_access(actor, realm).await?;
        if !["hour", "day", "month"].contains(&period) {
            return Err(ApiError::invalid(
                "invalid_period",
                format!("period {period:?}: choose hour, day or month"),
            ));
        }
        let rows = sqlx::query(
            "SELECT start, ops_publish, ops_subscribe, ops_call, ops_register, ops_dht, bytes_in, bytes_out, \
             instance_ms, package_bytes FROM usage_rollups WHERE realm = $1 AND period = $2 AND start >= $3 AND start < $4 ORDER BY start",
        )
        .bind(realm)
        .bind(period)
        .bind(from)
        .bind(to)
        .fetch_all(&self.db.pool)
        .await?;
        // Latency comes from the per-node rows (histograms are merged, not added up in SQL).
        let hist_rows = sqlx::query(
            "SELECT hour, latency FROM usage_reports WHERE (realm = $1 OR realm LIKE $2) AND hour >= $3 AND hour < $4",
        )
        .bind(realm)
        .bind(format!("{realm}.%"))
        .bind(from.div_euclid(3600))
        .bind((to + 3599).div_euclid(3600))
        .fetch_all(&self.db.pool)
        .await?;
        let period_of = |secs: i64| match period {
            "hour" => secs - secs.rem_euclid(3600),
            "day" => secs - secs.rem_euclid(86_400),
            _ => month_start(secs),
        };
        let mut hists: HashMap<i64, Vec<u64>> = HashMap::new();
        for r in hist_rows {
            let hour: i64 = r.try_get("hour")?;
            let h = parse_hist(&r.try_get::<String, _>("latency")?);
            let e = hists
                .entry(period_of(hour * 3600))
                .or_insert_with(|| vec![0; BUCKETS]);
            for (a, b) in e.iter_mut().zip(h) {
                *a += b;
            }
        }
        let mut out = vec![];
        for r in rows {
            let start: i64 = r.try_get("start")?;
            let mut p = UsagePeriod {
                start: rfc3339(start as u64),
                ..Default::default()
            };
            for (i, op) in macula_common::usage::Op::ALL.iter().enumerate() {
                let v = r.try_get::<i64, _>(COUNTER_COLS[i])?.max(0) as u64;
                p.ops.insert(op.name().to_owned(), v);
                p.ops_total += v;
            }
            p.bytes_in = r.try_get::<i64, _>("bytes_in")?.max(0) as u64;
            p.egress_bytes = r.try_get::<i64, _>("bytes_out")?.max(0) as u64;
            p.egress_gb = p.egress_bytes as f64 / GIB as f64;
            p.instance_ms = r.try_get::<i64, _>("instance_ms")?.max(0) as u64;
            p.instance_hours = p.instance_ms as f64 / 3_600_000.0;
            p.package_bytes = r.try_get::<i64, _>("package_bytes")?.max(0) as u64;
            p.package_gb = p.package_bytes as f64 / GIB as f64;
            if let Some(h) = hists.get(&start) {
                p.latency_p50_ms = quantile_ms(h, 0.50);
                p.latency_p95_ms = quantile_ms(h, 0.95);
            }
            out.push(p);
        }
        Ok(out)
    }

    /// A realm's month: usage, plan, allowance used, the charges so far, notices.
    pub async fn usage_month(
        &self,
        actor: &Viewer,
        realm: &str,
        month: i64,
    ) -> ApiResult<UsageMonth> {
        let periods = self
            .usage(actor, realm, "month", month, next_month(month))
            .await?;
        let usage = periods.into_iter().next().unwrap_or(UsagePeriod {
            start: rfc3339(month as u64),
            ..Default::default()
        });
        let mut c = self.db.pool.acquire().await?;
        // A realm that lives only in a config directory has no plan: it shows as Hobby and is
        // neither billed nor held to a quota.
        let row = self.realm(&mut c, realm).await.ok();
        let current = row
            .as_ref()
            .map_or(self.config.prices.tiers[0].name.as_str(), |r| {
                r.tier.as_str()
            });
        let tier_name = self
            .tier_at(&mut c, realm, next_month(month) - 1, current)
            .await?;
        let t = self.config.prices.tier_or_first(&tier_name);
        let quota_exceeded = match &row {
            Some(r) => self.policy_doc(r)?.quota_exceeded,
            None => None,
        };
        let notices: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT kind, message, created_at FROM notices WHERE realm = $1 AND period = $2 ORDER BY created_at, LENGTH(kind), kind",
        )
        .bind(realm)
        .bind(month)
        .fetch_all(&mut *c)
        .await?;
        let addons = self.addons_in(&mut c, realm, month).await?;
        let lines = invoice_lines(
            &self.config.prices,
            month,
            &[RealmMonth {
                realm: realm.to_owned(),
                tier: t.name.clone(),
                ops: usage.ops_total,
                egress_bytes: usage.egress_bytes,
                instance_ms: usage.instance_ms,
                package_bytes: usage.package_bytes,
                addons,
            }],
            &[],
        );
        let total: i64 = lines.iter().map(|l| l.amount_cents).sum();
        let daily = self
            .usage(actor, realm, "day", month, next_month(month))
            .await?;
        Ok(UsageMonth {
            realm: realm.to_owned(),
            month: month_name(month),
            plan: t.clone(),
            used: AllowanceUsed {
                ops_percent: usage.ops_total as f64 * 100.0 / t.included_ops as f64,
                egress_percent: usage.egress_bytes as f64 * 100.0 / t.included_bytes as f64,
            },
            usage,
            registered: row.is_some(),
            quota_exceeded,
            charges: Charges {
                lines,
                total_cents: total,
            },
            days: daily,
            notices: notices
                .into_iter()
                .map(|(kind, message, at)| Notice {
                    kind,
                    message,
                    at: rfc3339(at as u64),
                })
                .collect(),
        })
    }
}

/// Who reads usage (see [`Registry::viewer`]).
pub enum Viewer {
    Account(Actor),
    Key { realm: String },
}
