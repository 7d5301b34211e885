//! Invoices: the lines of a realm's month (pure, to the cent), the monthly run, listing,
//! showing (JSON and HTML) and voiding.

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// Builds the invoices of `month` for every account (or one): drafts while the month runs,
    /// `open` once it has ended ($0 invoices are closed as `paid`). Finalized invoices are never
    /// rebuilt; drafts are replaced. Returns a summary.
    pub async fn run_invoices(&self, month: i64, account: Option<&str>) -> ApiResult<InvoiceRun> {
        let started = std::time::Instant::now();
        let end = next_month(month);
        let final_ = now_secs() as i64 >= end;
        let mut c = self.db.pool.acquire().await?;
        let realms: Vec<(String, String, String)> = match account {
            Some(a) => sqlx::query_as(
                "SELECT name, owner_id, tier FROM realms WHERE owner_id = $1 AND created_at < $2",
            )
            .bind(a)
            .bind(end)
            .fetch_all(&mut *c)
            .await?,
            None => {
                sqlx::query_as("SELECT name, owner_id, tier FROM realms WHERE created_at < $1")
                    .bind(end)
                    .fetch_all(&mut *c)
                    .await?
            }
        };
        let mut tiers: HashMap<String, (i64, String)> = HashMap::new();
        for (realm, t, at) in sqlx::query_as::<_, (String, String, i64)>(
            "SELECT realm, tier, effective_at FROM plan_history WHERE effective_at < $1",
        )
        .bind(end)
        .fetch_all(&mut *c)
        .await?
        {
            let e = tiers.entry(realm).or_insert((i64::MIN, String::new()));
            if at > e.0 {
                *e = (at, t);
            }
        }
        let usage: HashMap<String, (i64, i64, i64, i64)> =
            sqlx::query_as::<_, (String, i64, i64, i64, i64)>(
                "SELECT realm, ops_publish + ops_subscribe + ops_call + ops_register + ops_dht, bytes_out, \
                 instance_ms, package_bytes FROM usage_rollups WHERE period = 'month' AND start = $1",
            )
            .bind(month)
            .fetch_all(&mut *c)
            .await?
            .into_iter()
            .map(|(r, o, b, i, p)| (r, (o, b, i, p)))
            .collect();
        let mut addons: HashMap<String, Vec<String>> = HashMap::new();
        for (realm, f) in sqlx::query_as::<_, (String, String)>(
            "SELECT DISTINCT realm, feature FROM addons WHERE started_at < $1 AND (ended_at = 0 OR ended_at > $2)",
        )
        .bind(end)
        .bind(month)
        .fetch_all(&mut *c)
        .await?
        {
            addons.entry(realm).or_default().push(f);
        }
        let mut fees: HashMap<String, Vec<(String, String, i64)>> = HashMap::new();
        for (acct, realm, kind, cents) in sqlx::query_as::<_, (String, String, String, i64)>(
            "SELECT account_id, realm, kind, amount_cents FROM fees WHERE created_at >= $1 AND created_at < $2 ORDER BY id",
        )
        .bind(month)
        .bind(end)
        .fetch_all(&mut *c)
        .await?
        {
            fees.entry(acct).or_default().push((realm, kind, cents));
        }
        let existing: HashMap<String, (String, String)> =
            sqlx::query_as::<_, (String, String, String)>(
                "SELECT account_id, id, status FROM invoices WHERE month = $1 AND status <> 'void'",
            )
            .bind(month)
            .fetch_all(&mut *c)
            .await?
            .into_iter()
            .map(|(a, id, s)| (a, (id, s)))
            .collect();
        drop(c);
        let mut per_account: HashMap<String, Vec<RealmMonth>> = HashMap::new();
        for (name, owner, current) in realms {
            let t = tiers.get(&name).map(|t| t.1.clone()).unwrap_or(current);
            let (ops, bytes, instance_ms, package_bytes) =
                usage.get(&name).copied().unwrap_or((0, 0, 0, 0));
            let mut a = addons.remove(&name).unwrap_or_default();
            a.sort();
            per_account.entry(owner).or_default().push(RealmMonth {
                realm: name,
                tier: t,
                ops: ops.max(0) as u64,
                egress_bytes: bytes.max(0) as u64,
                instance_ms: instance_ms.max(0) as u64,
                package_bytes: package_bytes.max(0) as u64,
                addons: a,
            });
        }
        for acct in fees.keys() {
            per_account.entry(acct.clone()).or_default();
        }
        let now = now_secs() as i64;
        let mut inserts = vec![];
        let mut replaced = vec![];
        let mut ledger = vec![];
        let mut total_cents = 0i64;
        let mut accounts: Vec<_> = per_account.into_iter().collect();
        accounts.sort_by(|a, b| a.0.cmp(&b.0));
        for (acct, mut realms) in accounts {
            let prior = existing.get(&acct);
            if prior.is_some_and(|(_, s)| s != "draft") {
                continue;
            }
            realms.sort_by(|a, b| a.realm.cmp(&b.realm));
            let lines = invoice_lines(
                &self.config.prices,
                month,
                &realms,
                fees.get(&acct).map_or(&[][..], |v| v),
            );
            let total: i64 = lines.iter().map(|l| l.amount_cents).sum();
            total_cents += total;
            let id = match prior {
                Some((id, _)) => {
                    replaced.push(id.clone());
                    id.clone()
                }
                None => macula_common::ids::random_id(
                    &format!("in_{}_", month_name(month).replace('-', "")),
                    6,
                ),
            };
            let status = match (final_, total) {
                (false, _) => "draft",
                (true, 0) => "paid",
                (true, _) => "open",
            };
            if final_ && total > 0 {
                ledger.extend(ledger_entries(
                    &format!("invoice:{id}"),
                    "invoice",
                    &id,
                    &[
                        (format!("receivable:{acct}"), total),
                        ("revenue:platform".into(), -total),
                    ],
                )?);
            }
            let lines = serde_json::to_string(&lines).map_err(ApiError::internal)?;
            inserts.push(vec![
                Arg::from(id),
                acct.into(),
                month.into(),
                status.into(),
                "USD".into(),
                total.into(),
                total.into(),
                lines.into(),
                now.into(),
                (if final_ { now } else { 0 }).into(),
                (if final_ && total == 0 { now } else { 0 }).into(),
            ]);
        }
        let n = inserts.len();
        let mut tx = self.db.begin().await?;
        for chunk in replaced.chunks(500) {
            let ph: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "DELETE FROM invoices WHERE status = 'draft' AND id IN ({})",
                ph.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
        let written = async {
            insert_rows(
                &mut tx,
                "INSERT INTO invoices (id, account_id, month, status, currency, subtotal_cents, total_cents, lines, \
                 created_at, finalized_at, paid_at) VALUES ",
                11,
                inserts,
            )
            .await?;
            insert_rows(&mut tx, LEDGER_INSERT, 6, ledger).await?;
            tx.commit().await
        }
        .await;
        match written {
            Err(e) if is_unique_violation(&e) => {
                return Err(ApiError::conflict(
                    "invoice_run_busy",
                    "another invoice run for this month is in progress; try again",
                ))
            }
            r => r?,
        }
        Ok(InvoiceRun {
            month: month_name(month),
            is_final: final_,
            invoices: n,
            total_cents,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }

    pub(crate) fn invoice_view(r: &sqlx::any::AnyRow, email: Option<&str>) -> ApiResult<Invoice> {
        let lines: Vec<Line> =
            serde_json::from_str(&r.try_get::<String, _>("lines")?).map_err(ApiError::internal)?;
        let at = |c: &str| -> ApiResult<Option<String>> {
            let v: i64 = r.try_get(c)?;
            Ok((v > 0).then(|| rfc3339(v as u64)))
        };
        Ok(Invoice {
            id: r.try_get("id")?,
            account: email.map(str::to_owned),
            month: month_name(r.try_get("month")?),
            status: r.try_get("status")?,
            currency: r.try_get("currency")?,
            lines,
            subtotal_cents: r.try_get("subtotal_cents")?,
            total_cents: r.try_get("total_cents")?,
            created_at: at("created_at")?,
            finalized_at: at("finalized_at")?,
            paid_at: at("paid_at")?,
            voided_at: at("voided_at")?,
        })
    }

    /// The caller's invoices (newest first). The current month's draft is brought up to date
    /// first.
    pub async fn list_invoices(&self, actor: &Actor) -> ApiResult<Invoices> {
        self.run_invoices(month_start(now_secs() as i64), Some(&actor.account_id))
            .await?;
        let rows = sqlx::query(
            "SELECT * FROM invoices WHERE account_id = $1 ORDER BY month DESC, created_at DESC LIMIT 120",
        )
        .bind(&actor.account_id)
        .fetch_all(&self.db.pool)
        .await?;
        let items = rows
            .iter()
            .map(|r| Self::invoice_view(r, Some(&actor.email)))
            .collect::<ApiResult<_>>()?;
        Ok(Invoices { items })
    }

    pub(crate) async fn invoice_row(
        &self,
        actor: &Actor,
        id: &str,
    ) -> ApiResult<sqlx::any::AnyRow> {
        let row = sqlx::query("SELECT * FROM invoices WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no invoice {id}")))?;
        let owner: String = row.try_get("account_id")?;
        if owner != actor.account_id && !actor.operator {
            return Err(ApiError::not_found(format!("no invoice {id}")));
        }
        Ok(row)
    }

    /// One invoice; a month (`YYYY-MM`, `current`) selects the caller's invoice of that month.
    pub async fn show_invoice(&self, actor: &Actor, id: &str) -> ApiResult<Invoice> {
        let id = if id.starts_with("in_") {
            id.to_owned()
        } else {
            let month = parse_month(id)?;
            if month == month_start(now_secs() as i64) {
                self.run_invoices(month, Some(&actor.account_id)).await?;
            }
            sqlx::query_scalar(
                "SELECT id FROM invoices WHERE account_id = $1 AND month = $2 AND status <> 'void'",
            )
            .bind(&actor.account_id)
            .bind(month)
            .fetch_optional(&self.db.pool)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no invoice for {}", month_name(month))))?
        };
        let row = self.invoice_row(actor, &id).await?;
        let email: Option<String> = sqlx::query_scalar("SELECT email FROM accounts WHERE id = $1")
            .bind(row.try_get::<String, _>("account_id")?)
            .fetch_optional(&self.db.pool)
            .await?;
        Self::invoice_view(&row, email.as_deref())
    }

    /// Voids an open invoice (operators), reversing its ledger entries.
    pub async fn void_invoice(&self, actor: &Actor, id: &str) -> ApiResult<Voided> {
        Self::operator_only(actor)?;
        let row = self.invoice_row(actor, id).await?;
        let status: String = row.try_get("status")?;
        if status != "open" && status != "draft" {
            return Err(ApiError::conflict(
                "invoice_not_open",
                format!("invoice {id} is {status}; only a draft or open invoice can be voided"),
            ));
        }
        let total: i64 = row.try_get("total_cents")?;
        let acct: String = row.try_get("account_id")?;
        let mut tx = self.change(actor).await?;
        let n = sqlx::query(
            "UPDATE invoices SET status = 'void', voided_at = $1 WHERE id = $2 AND status = $3",
        )
        .bind(now_secs() as i64)
        .bind(id)
        .bind(&status)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(ApiError::conflict(
                "invoice_not_open",
                format!("invoice {id} changed meanwhile (paid?); not voided"),
            ));
        }
        if status == "open" && total > 0 {
            let entries = ledger_entries(
                &format!("void:{id}"),
                "void",
                id,
                &[
                    (format!("receivable:{acct}"), -total),
                    ("revenue:platform".into(), total),
                ],
            )?;
            insert_rows(&mut tx, LEDGER_INSERT, 6, entries).await?;
        }
        tx.audit("invoice.void", json!({"invoice": id}));
        tx.commit().await?;
        Ok(Voided {
            invoice: id.to_owned(),
            status: "void".into(),
        })
    }
}

/// One realm's month, as the invoice sees it.
#[derive(Debug, Clone, Default)]
pub struct RealmMonth {
    pub realm: String,
    pub tier: String,
    pub ops: u64,
    pub egress_bytes: u64,
    /// Milliseconds of replicas run (compute).
    pub instance_ms: u64,
    /// Bytes of Hub packages delivered (billed per GiB).
    pub package_bytes: u64,
    pub addons: Vec<String>,
}

/// An account's invoice lines for a month: per realm its plan's base fee, operations and
/// egress beyond the allowance (paid plans only: the Hobby plan refuses instead), its add-ons;
/// then the account's fees (realm transfers).
pub fn invoice_lines(
    prices: &Prices,
    month: i64,
    realms: &[RealmMonth],
    fees: &[(String, String, i64)],
) -> Vec<Line> {
    let name = month_name(month);
    let mut lines = vec![];
    for r in realms {
        let t = prices.tier_or_first(&r.tier);
        lines.push(Line {
            kind: "base".into(),
            realm: r.realm.clone(),
            description: format!("{} plan, {name}", t.title),
            quantity: 1,
            unit: "month".into(),
            amount_cents: t.base_cents,
        });
        if !t.hard_quota {
            let over = r.ops.saturating_sub(t.included_ops);
            if over > 0 {
                lines.push(Line {
                    kind: "overage_ops".into(),
                    realm: r.realm.clone(),
                    description: format!(
                        "Operations beyond {} included, at ${}/1K",
                        t.included_ops,
                        t.ops_millicents_per_1k as f64 / 100_000.0
                    ),
                    quantity: over,
                    unit: "operations".into(),
                    amount_cents: ops_overage_cents(t, over),
                });
            }
            let over = r.egress_bytes.saturating_sub(t.included_bytes);
            if over > 0 {
                lines.push(Line {
                    kind: "overage_egress".into(),
                    realm: r.realm.clone(),
                    description: format!(
                        "Egress beyond {} GiB included, at ${:.2}/GiB",
                        t.included_bytes / GIB,
                        t.egress_cents_per_gib as f64 / 100.0
                    ),
                    quantity: over,
                    unit: "bytes".into(),
                    amount_cents: egress_overage_cents(t, over),
                });
            }
        }
        if r.instance_ms > 0 {
            lines.push(Line {
                kind: "compute".into(),
                realm: r.realm.clone(),
                description: format!(
                    "Compute: {:.2} instance-hours at ${:.2}/hour",
                    r.instance_ms as f64 / 3_600_000.0,
                    t.instance_millicents_per_hour as f64 / 100_000.0
                ),
                quantity: r.instance_ms.div_ceil(1_000),
                unit: "instance-seconds".into(),
                amount_cents: compute_cents(t, r.instance_ms),
            });
        }
        if r.package_bytes > 0 {
            lines.push(Line {
                kind: "package_delivery".into(),
                realm: r.realm.clone(),
                description: format!(
                    "Hub package delivery: {:.3} GiB at ${:.2}/GiB",
                    r.package_bytes as f64 / GIB as f64,
                    t.package_cents_per_gib as f64 / 100.0
                ),
                quantity: r.package_bytes,
                unit: "bytes".into(),
                amount_cents: package_cents(t, r.package_bytes),
            });
        }
        for a in &r.addons {
            if let Some(ad) = prices.addon(a) {
                lines.push(Line {
                    kind: "addon".into(),
                    realm: r.realm.clone(),
                    description: format!("{} ({}), {name}", ad.title, ad.id),
                    quantity: 1,
                    unit: "month".into(),
                    amount_cents: ad.monthly_cents,
                });
            }
        }
    }
    for (realm, kind, cents) in fees {
        lines.push(Line {
            kind: format!("{kind}_fee"),
            realm: realm.clone(),
            description: match kind.as_str() {
                "hub_certification" => format!("Hub certification of {realm}"),
                _ => format!("Realm {kind} fee"),
            },
            quantity: 1,
            unit: "fee".into(),
            amount_cents: *cents,
        });
    }
    lines
}

/// Renders an invoice as a standalone HTML document (`templates/invoice.html`).
pub fn invoice_html(inv: &Invoice) -> String {
    use askama::Template;
    let page = InvoicePage {
        inv,
        account: inv.account.as_deref().unwrap_or(""),
    };
    page.render()
        .unwrap_or_else(|e| format!("the invoice could not be rendered: {e}"))
}

/// `templates/invoice.html`: an invoice as a document (shared with the console).
#[derive(askama::Template)]
#[template(path = "invoice.html")]
struct InvoicePage<'a> {
    inv: &'a Invoice,
    account: &'a str,
}

impl InvoicePage<'_> {
    /// Cents as dollars: `$147.05`.
    fn money(&self, cents: &i64) -> String {
        format!("${}.{:02}", cents / 100, cents % 100)
    }
}
