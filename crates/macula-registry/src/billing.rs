//! Billing: usage aggregation, plans and quotas, invoices, payments and the ledger.
//!
//! **Aggregation.** Nodes deliver [`UsageReport`]s: cumulative usage per (node, counters-file
//! epoch, realm, API key, hour). [`Registry::ingest`] keeps the largest value per such row in
//! `usage_reports` (so a report delivered twice counts once) and adds only the *growth* to
//! `usage_rollups` (per billing realm: hour, day and month). The billing realm of a realm is the
//! nearest registered one (a subrealm governed by its parent's policy bills to the parent).
//!
//! **Money** is integer cents. A line item is computed exactly (rates are rational: millicents
//! per thousand operations, cents per GiB) and rounded once, half up, to the cent; an invoice's
//! total is the sum of its rounded lines. 1 GiB = 2^30 bytes (the seed's `/ 1024 / 1024 / 1024`).
//!
//! **Plans** (the seed's tiers): an upgrade takes effect at once and the whole month is billed
//! at the new plan (its base fee and its allowance); a downgrade takes effect on the first day
//! of the next month. The Hobby plan's allowance is a hard quota: past 100 % the realm's policy
//! gets `quota_exceeded`, which every node enforces; paid plans bill overage instead. Owners get
//! notices at 80 % and 100 % of the allowance (`notices`, shown by `macula usage`).

use std::collections::{HashMap, HashSet};

use macula_common::time::{now_secs, rfc3339};
use macula_common::usage::{quantile_ms, UsageReport, UsageRow, BUCKETS, OPS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;

use crate::db::{Arg, Backend};
use crate::error::{is_unique_violation, ApiError, ApiResult};
use crate::registry::{audit, Actor, Registry, READ};

/// A plan: the price list is configuration (`registry.prices`, default the seed's tiers).
pub type Tier = macula_common::prices::TierPrice;
pub use macula_common::prices::Prices;

const GIB: u64 = 1 << 30;

/// The plan called `name`, or the API's error naming the plans there are.
pub(crate) fn tier_of<'a>(prices: &'a Prices, name: &str) -> ApiResult<&'a Tier> {
    prices.tier(name).ok_or_else(|| {
        let names: Vec<&str> = prices.tiers.iter().map(|t| t.name.as_str()).collect();
        ApiError::invalid(
            "invalid_tier",
            format!("tier {name:?}: choose one of {}", names.join(", ")),
        )
    })
}

/// How long after a month ends its invoices are finalized (late usage reports still count).
pub const FINALIZE_AFTER_SECS: i64 = 3600;

// ---- calendar (UTC) ----

use macula_common::time::days_from_civil;
pub use macula_common::time::{month_name, month_start, next_month};

/// Parses `YYYY-MM` (or `current`, `previous`) into a month start.
pub fn parse_month(s: &str) -> ApiResult<i64> {
    let now = month_start(now_secs() as i64);
    match s {
        "" | "current" => return Ok(now),
        "previous" | "last" => return Ok(month_start(now - 1)),
        _ => {}
    }
    let bad = || {
        ApiError::invalid(
            "invalid_month",
            format!("month {s:?}: write YYYY-MM (e.g. 2026-11), current or previous"),
        )
    };
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    let y: i64 = y.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) {
        return Err(bad());
    }
    Ok(days_from_civil(y, m, 1) * 86_400)
}

// ---- money ----

/// `num / den` rounded half up (both non-negative).
pub fn round_half_up(num: u128, den: u128) -> i64 {
    ((num * 2 + den) / (den * 2)) as i64
}

/// The overage charge for `ops` operations beyond the allowance, in cents.
pub fn ops_overage_cents(t: &Tier, ops: u64) -> i64 {
    round_half_up(ops as u128 * t.ops_millicents_per_1k as u128, 1_000_000)
}

/// The overage charge for `bytes` of egress beyond the allowance, in cents.
pub fn egress_overage_cents(t: &Tier, bytes: u64) -> i64 {
    round_half_up(bytes as u128 * t.egress_cents_per_gib as u128, GIB as u128)
}

/// The marketplace's revenue share (the seed's 70/30): the platform's 30 % is rounded half up
/// to the cent and the author gets the rest, so the two always add up to the sale.
pub fn revenue_share(sale_cents: i64) -> (i64, i64) {
    let platform = round_half_up(sale_cents.max(0) as u128 * 30, 100);
    (sale_cents - platform, platform)
}

// ---- invoices (pure) ----

/// One realm's month, as the invoice sees it.
#[derive(Debug, Clone, Default)]
pub struct RealmMonth {
    pub realm: String,
    pub tier: String,
    pub ops: u64,
    pub egress_bytes: u64,
    pub addons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub realm: String,
    pub description: String,
    pub quantity: u64,
    pub unit: String,
    pub amount_cents: i64,
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
            description: format!("Realm {kind} fee"),
            quantity: 1,
            unit: "fee".into(),
            amount_cents: *cents,
        });
    }
    lines
}

// ---- payments ----

/// Takes payment for an invoice. Implementations talk to a payment provider; the one built in
/// records the payment without moving money.
pub trait PaymentProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Charges `amount_cents` for `invoice`; returns the provider's reference.
    fn charge(&self, invoice: &str, amount_cents: i64) -> Result<String, String>;
}

/// Records payments against invoices; no card is charged.
pub struct RecordingProvider;

impl PaymentProvider for RecordingProvider {
    fn name(&self) -> &'static str {
        "recorded"
    }
    fn charge(&self, _invoice: &str, _amount_cents: i64) -> Result<String, String> {
        Ok(format!("rec_{}", hex::encode(rand::random::<[u8; 8]>())))
    }
}

// ---- the ledger ----

/// A double-entry posting: amounts of one transaction add up to zero. Accounts are named
/// `receivable:<account>`, `revenue:platform`, `cash:<provider>`, and (for the marketplace)
/// `payable:author:<account>`.
pub fn ledger_entries(
    txn: &str,
    kind: &str,
    reference: &str,
    entries: &[(String, i64)],
) -> ApiResult<Vec<Vec<Arg>>> {
    if entries.iter().map(|e| e.1).sum::<i64>() != 0 {
        return Err(ApiError::internal(format!(
            "ledger transaction {txn} does not balance"
        )));
    }
    let now = now_secs() as i64;
    Ok(entries
        .iter()
        .map(|(account, cents)| {
            vec![
                txn.into(),
                account.into(),
                (*cents).into(),
                kind.into(),
                reference.into(),
                now.into(),
            ]
        })
        .collect())
}

const LEDGER_INSERT: &str =
    "INSERT INTO ledger (txn, account, amount_cents, kind, ref, created_at) VALUES ";

/// `INSERT ... VALUES (...), (...)` for `rows` rows of `cols` placeholders.
fn values_sql(head: &str, rows: usize, cols: usize) -> String {
    let mut s = String::from(head);
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            s.push_str(&format!("${}", r * cols + c + 1));
        }
        s.push(')');
    }
    s
}

/// Inserts many rows with multi-row INSERTs (a few hundred rows per statement).
pub async fn insert_rows(
    c: &mut sqlx::AnyConnection,
    head: &str,
    cols: usize,
    rows: Vec<Vec<Arg>>,
) -> sqlx::Result<()> {
    let per = (30_000 / cols).clamp(1, 500);
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<Arg>> = rows.by_ref().take(per).collect();
        let sql = values_sql(head, chunk.len(), cols);
        crate::db::bind_all(sqlx::query(&sql), chunk.into_iter().flatten().collect())
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

// ---- aggregation ----

const COUNTER_COLS: [&str; 7] = [
    "ops_publish",
    "ops_subscribe",
    "ops_call",
    "ops_register",
    "ops_dht",
    "bytes_in",
    "bytes_out",
];

/// (realm, key id, hour) of a node's report row.
type ReportKey = (String, String, i64);

fn parse_hist(s: &str) -> Vec<u64> {
    let mut h: Vec<u64> = s.split(',').map(|x| x.parse().unwrap_or(0)).collect();
    h.resize(BUCKETS, 0);
    h
}

fn hist_text(h: &[u64]) -> String {
    h.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Who reads usage (see [`Registry::viewer`]).
pub enum Viewer {
    Account(Actor),
    Key { realm: String },
}

/// One period of a realm's usage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsagePeriod {
    pub start: String,
    pub ops: HashMap<&'static str, u64>,
    pub ops_total: u64,
    pub bytes_in: u64,
    pub egress_bytes: u64,
    pub egress_gb: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
}

/// An INSERT into `usage_rollups` that adds its counters to a row already there (the one
/// statement that grows rollups: ingest, and moving a bare name's rollups to an archive).
macro_rules! add_to_rollup {
    ($insert:literal) => {
        concat!(
            $insert,
            " ON CONFLICT (realm, period, start) DO UPDATE SET \
             ops_publish = usage_rollups.ops_publish + excluded.ops_publish, \
             ops_subscribe = usage_rollups.ops_subscribe + excluded.ops_subscribe, \
             ops_call = usage_rollups.ops_call + excluded.ops_call, \
             ops_register = usage_rollups.ops_register + excluded.ops_register, \
             ops_dht = usage_rollups.ops_dht + excluded.ops_dht, \
             bytes_in = usage_rollups.bytes_in + excluded.bytes_in, \
             bytes_out = usage_rollups.bytes_out + excluded.bytes_out"
        )
    };
}
pub(crate) use add_to_rollup;

/// Rows of a usage report taken per transaction (see [`Registry::ingest`]).
pub const INGEST_CHUNK: usize = 256;

impl Registry {
    /// Takes a node's usage report (see the module doc). Idempotent: the same report, or an
    /// older one, changes nothing. Returns the billing realms whose totals grew.
    ///
    /// A report is taken [`INGEST_CHUNK`] rows per transaction: a node that re-sends a large
    /// backlog holds the database's writer for one short transaction at a time, and signups,
    /// logins and revocations queue between them. Rows are independent (each is merged by its
    /// own key), so a failure part-way leaves the earlier chunks taken and the re-sent report
    /// changes nothing of them.
    pub async fn ingest(&self, report: &UsageReport) -> ApiResult<Vec<String>> {
        // Rows are cumulative: two rows for one (realm, key, hour) in a report (a node that
        // lost track of a slot, or a hostile one) merge into their maximum, never add up.
        let mut merged: HashMap<ReportKey, UsageRow> = HashMap::new();
        for row in &report.rows {
            let k = (row.realm.clone(), row.key_id.clone(), row.hour as i64);
            match merged.get_mut(&k) {
                None => {
                    merged.insert(k, row.clone());
                }
                Some(m) => {
                    for (a, b) in m.ops.iter_mut().zip(&row.ops) {
                        *a = (*a).max(*b);
                    }
                    m.bytes_in = m.bytes_in.max(row.bytes_in);
                    m.bytes_out = m.bytes_out.max(row.bytes_out);
                    if m.latency.len() < row.latency.len() {
                        m.latency.resize(row.latency.len(), 0);
                    }
                    for (a, b) in m.latency.iter_mut().zip(&row.latency) {
                        *a = (*a).max(*b);
                    }
                }
            }
        }
        let rows: Vec<UsageRow> = merged.into_values().collect();
        let mut grew = HashSet::new();
        for chunk in rows.chunks(INGEST_CHUNK) {
            grew.extend(self.ingest_chunk(report, chunk).await?);
            // Let queued control-plane writes go first.
            tokio::task::yield_now().await;
        }
        Ok(grew.into_iter().collect())
    }

    async fn ingest_chunk(
        &self,
        report: &UsageReport,
        chunk: &[UsageRow],
    ) -> ApiResult<HashSet<String>> {
        if chunk.is_empty() {
            return Ok(HashSet::new());
        }
        let epoch = format!("{:016x}", report.epoch);
        let min_hour = chunk.iter().map(|r| r.hour).min().unwrap_or(0) as i64;
        let mut tx = self.db.begin().await?;
        // Deliveries from one node are taken one at a time: on PostgreSQL two overlapping ones
        // (a re-send after a timeout) would both read a row that does not exist yet and both
        // add its growth. SQLite serializes writers already (`BEGIN IMMEDIATE`).
        let lock = if self.db.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("usage:{}:{epoch}", report.node))
                .execute(&mut *tx)
                .await?;
            " FOR UPDATE"
        } else {
            ""
        };
        // The stored rows of this chunk's realms and keys only.
        let realms: Vec<&str> = chunk
            .iter()
            .map(|r| r.realm.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let keys: Vec<&str> = chunk
            .iter()
            .map(|r| r.key_id.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let list = |from: usize, n: usize| {
            (from..from + n)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sql = format!(
            "SELECT realm, key_id, hour, ops_publish, ops_subscribe, ops_call, ops_register, ops_dht, \
             bytes_in, bytes_out, latency FROM usage_reports WHERE node = $1 AND epoch = $2 AND hour >= $3 \
             AND realm IN ({}) AND key_id IN ({}){lock}",
            list(4, realms.len()),
            list(4 + realms.len(), keys.len())
        );
        let mut q = sqlx::query(&sql)
            .bind(&report.node)
            .bind(&epoch)
            .bind(min_hour);
        for v in realms.iter().chain(&keys) {
            q = q.bind(*v);
        }
        let rows = q.fetch_all(&mut *tx).await?;
        let mut old: HashMap<ReportKey, ([u64; 7], Vec<u64>)> = HashMap::new();
        for r in rows {
            let mut c = [0u64; 7];
            for (i, col) in COUNTER_COLS.iter().enumerate() {
                c[i] = r.try_get::<i64, _>(*col)?.max(0) as u64;
            }
            let latency: String = r.try_get("latency")?;
            old.insert(
                (
                    r.try_get("realm")?,
                    r.try_get("key_id")?,
                    r.try_get("hour")?,
                ),
                (c, parse_hist(&latency)),
            );
        }
        // Billing realm of each reported realm: the nearest registered one.
        let mut billing: HashMap<String, String> = HashMap::new();
        for row in chunk {
            if !billing.contains_key(&row.realm) {
                let b = self.billing_realm(&mut tx, &row.realm).await?;
                billing.insert(row.realm.clone(), b);
            }
        }
        // Usage by a key the registry no longer has, in a realm registered more than once: a
        // key of the previous registration, reported late. It is that registration's usage,
        // never the current registrant's (keys die with their registration).
        let known: HashSet<String> = {
            let sql = format!(
                "SELECT id FROM api_keys WHERE id IN ({})",
                list(1, keys.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for k in &keys {
                q = q.bind(*k);
            }
            q.fetch_all(&mut *tx).await?.into_iter().collect()
        };
        let mut generation: HashMap<String, i64> = HashMap::new();
        for b in billing.values() {
            if !generation.contains_key(b) {
                let g: Option<i64> =
                    sqlx::query_scalar("SELECT generation FROM realms WHERE name = $1")
                        .bind(b)
                        .fetch_optional(&mut *tx)
                        .await?;
                generation.insert(b.clone(), g.unwrap_or(0));
            }
        }
        let bill_to = |row: &UsageRow| -> String {
            let b = &billing[&row.realm];
            match generation.get(b) {
                Some(&g) if g > 1 && !known.contains(&row.key_id) => {
                    crate::registry::archived(b, g - 1)
                }
                _ => b.clone(),
            }
        };
        let now = now_secs() as i64;
        let mut grew: HashSet<String> = HashSet::new();
        for row in chunk {
            let mut new = [0u64; 7];
            new[..OPS].copy_from_slice(&row.ops);
            new[5] = row.bytes_in;
            new[6] = row.bytes_out;
            // Stored as BIGINT: a value beyond it (only a broken or hostile node sends one)
            // is held at the maximum rather than wrapping negative.
            for v in new.iter_mut() {
                *v = (*v).min(i64::MAX as u64 / 4);
            }
            let key = (row.realm.clone(), row.key_id.clone(), row.hour as i64);
            let (prev, prev_hist) = old.get(&key).cloned().unwrap_or(([0; 7], vec![0; BUCKETS]));
            let mut hist = parse_hist(&hist_text(&row.latency));
            for h in hist.iter_mut() {
                *h = (*h).min(i64::MAX as u64 / 4);
            }
            for (h, p) in hist.iter_mut().zip(&prev_hist) {
                *h = (*h).max(*p);
            }
            let delta: Vec<i64> = new
                .iter()
                .zip(&prev)
                .map(|(n, p)| n.saturating_sub(*p) as i64)
                .collect();
            if delta.iter().all(|d| *d == 0) && hist == prev_hist {
                continue;
            }
            let keep: Vec<i64> = new
                .iter()
                .zip(&prev)
                .map(|(n, p)| (*n).max(*p) as i64)
                .collect();
            let mut args: Vec<Arg> = vec![
                report.node.as_str().into(),
                epoch.as_str().into(),
                row.realm.as_str().into(),
                row.key_id.as_str().into(),
                (row.hour as i64).into(),
            ];
            args.extend(keep.iter().map(|v| Arg::Int(*v)));
            args.push(hist_text(&hist).into());
            args.push(now.into());
            tx.defer(
                "INSERT INTO usage_reports (node, epoch, realm, key_id, hour, ops_publish, ops_subscribe, \
                 ops_call, ops_register, ops_dht, bytes_in, bytes_out, latency, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                 ON CONFLICT (node, epoch, realm, key_id, hour) DO UPDATE SET \
                 ops_publish = excluded.ops_publish, ops_subscribe = excluded.ops_subscribe, \
                 ops_call = excluded.ops_call, ops_register = excluded.ops_register, \
                 ops_dht = excluded.ops_dht, bytes_in = excluded.bytes_in, \
                 bytes_out = excluded.bytes_out, latency = excluded.latency, updated_at = excluded.updated_at",
                args,
            );
            if delta.iter().all(|d| *d == 0) {
                continue;
            }
            let realm = &bill_to(row);
            grew.insert(realm.clone());
            let hour = row.hour as i64 * 3600;
            for (period, start) in [
                ("hour", hour),
                ("day", hour - hour.rem_euclid(86_400)),
                ("month", month_start(hour)),
            ] {
                let mut args: Vec<Arg> = vec![realm.as_str().into(), period.into(), start.into()];
                args.extend(delta.iter().map(|v| Arg::Int(*v)));
                tx.defer(
                    add_to_rollup!(
                        "INSERT INTO usage_rollups (realm, period, start, ops_publish, ops_subscribe, ops_call, \
                         ops_register, ops_dht, bytes_in, bytes_out) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                    ),
                    args,
                );
            }
        }
        tx.commit().await?;
        Ok(grew)
    }

    async fn billing_realm(&self, c: &mut sqlx::AnyConnection, realm: &str) -> ApiResult<String> {
        let mut candidates = vec![realm.to_owned()];
        let mut r = realm;
        while let Some(i) = r.rfind('.') {
            r = &r[..i];
            candidates.push(r.to_owned());
        }
        let placeholders: Vec<String> = (1..=candidates.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT name FROM realms WHERE name IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query_scalar::<_, String>(&sql);
        for c in &candidates {
            q = q.bind(c);
        }
        let found: HashSet<String> = q.fetch_all(&mut *c).await?.into_iter().collect();
        Ok(candidates
            .into_iter()
            .find(|c| found.contains(c))
            .unwrap_or_else(|| realm.to_owned()))
    }

    /// A realm's month so far: (operations, egress bytes).
    async fn month_totals(
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

    async fn notice(&self, realm: &str, month: i64, kind: &str, message: String) -> ApiResult<()> {
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
    async fn set_quota_block(&self, name: &str, month: i64, why: Option<String>) -> ApiResult<()> {
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
            audit(
                &mut tx,
                Some(&realm),
                "billing",
                "plan.applied",
                json!({"tier": t}),
                "",
            );
            tx.commit().await?;
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
                tracing::info!(month = %month_name(previous), invoices = s["invoices"].as_u64().unwrap_or(0), "invoices finalized");
            }
        }
        Ok(())
    }

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

    async fn usage_access(&self, viewer: &Viewer, realm: &str) -> ApiResult<()> {
        match viewer {
            Viewer::Account(actor) => {
                let mut c = self.db.pool.acquire().await?;
                self.authorize(&mut c, realm, actor, READ).await?;
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
            "SELECT start, ops_publish, ops_subscribe, ops_call, ops_register, ops_dht, bytes_in, bytes_out \
             FROM usage_rollups WHERE realm = $1 AND period = $2 AND start >= $3 AND start < $4 ORDER BY start",
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
                p.ops.insert(op.name(), v);
                p.ops_total += v;
            }
            p.bytes_in = r.try_get::<i64, _>("bytes_in")?.max(0) as u64;
            p.egress_bytes = r.try_get::<i64, _>("bytes_out")?.max(0) as u64;
            p.egress_gb = p.egress_bytes as f64 / GIB as f64;
            if let Some(h) = hists.get(&start) {
                p.latency_p50_ms = quantile_ms(h, 0.50);
                p.latency_p95_ms = quantile_ms(h, 0.95);
            }
            out.push(p);
        }
        Ok(out)
    }

    /// A realm's month: usage, plan, allowance used, the charges so far, notices.
    pub async fn usage_month(&self, actor: &Viewer, realm: &str, month: i64) -> ApiResult<Value> {
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
                addons,
            }],
            &[],
        );
        let total: i64 = lines.iter().map(|l| l.amount_cents).sum();
        let daily = self
            .usage(actor, realm, "day", month, next_month(month))
            .await?;
        Ok(json!({
            "realm": realm,
            "month": month_name(month),
            "plan": t,
            "usage": usage,
            "used": {
                "ops_percent": usage.ops_total as f64 * 100.0 / t.included_ops as f64,
                "egress_percent": usage.egress_bytes as f64 * 100.0 / t.included_bytes as f64,
            },
            "registered": row.is_some(),
            "quota_exceeded": quota_exceeded,
            "charges": {"lines": lines, "total_cents": total},
            "days": daily,
            "notices": notices.iter().map(|(k, m, at)| json!({"kind": k, "message": m, "at": rfc3339(*at as u64)})).collect::<Vec<_>>(),
        }))
    }

    async fn tier_at(
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

    async fn addons_in(
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
    pub async fn set_plan(&self, actor: &Actor, realm: &str, new: &str) -> ApiResult<Value> {
        let prices = &self.config.prices;
        let t = tier_of(prices, new)?;
        let now = now_secs() as i64;
        let mut tx = self.db.begin().await?;
        let (row, _) = self
            .authorize_owner(&mut tx, realm, actor, "change its plan")
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
        }
        actor.audit(
            &mut tx,
            realm,
            "plan.change",
            json!({"from": row.tier, "to": t.name, "effective_at": rfc3339(effective as u64)}),
        );
        tx.commit().await?;
        if effective == now && !t.hard_quota {
            self.set_quota_block(realm, month_start(now), None).await?;
        }
        Ok(json!({
            "realm": realm,
            "tier": if effective == now { t.name.as_str() } else { row.tier.as_str() },
            "scheduled": (effective != now).then(|| json!({"tier": t.name, "effective_at": rfc3339(effective as u64)})),
            "rule": "upgrades apply at once and the month is billed at the new plan; downgrades apply on the first of next month",
        }))
    }

    /// Turns a premium add-on on or off for a realm (owner only).
    pub async fn set_addon(
        &self,
        actor: &Actor,
        realm: &str,
        feature: &str,
        on: bool,
    ) -> ApiResult<Value> {
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
        let mut tx = self.db.begin().await?;
        self.authorize_owner(&mut tx, realm, actor, "change its add-ons")
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
        actor.audit(
            &mut tx,
            realm,
            if on { "addon.on" } else { "addon.off" },
            json!({"feature": id}),
        );
        tx.commit().await?;
        Ok(
            json!({"realm": realm, "feature": id, "title": title, "active": on, "monthly_cents": cents,
                  "rule": "an add-on is billed in full for every month in which it was active"}),
        )
    }

    /// Builds the invoices of `month` for every account (or one): drafts while the month runs,
    /// `open` once it has ended ($0 invoices are closed as `paid`). Finalized invoices are never
    /// rebuilt; drafts are replaced. Returns a summary.
    pub async fn run_invoices(&self, month: i64, account: Option<&str>) -> ApiResult<Value> {
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
        let usage: HashMap<String, (i64, i64)> = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT realm, ops_publish + ops_subscribe + ops_call + ops_register + ops_dht, bytes_out \
             FROM usage_rollups WHERE period = 'month' AND start = $1",
        )
        .bind(month)
        .fetch_all(&mut *c)
        .await?
        .into_iter()
        .map(|(r, o, b)| (r, (o, b)))
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
            let (ops, bytes) = usage.get(&name).copied().unwrap_or((0, 0));
            let mut a = addons.remove(&name).unwrap_or_default();
            a.sort();
            per_account.entry(owner).or_default().push(RealmMonth {
                realm: name,
                tier: t,
                ops: ops.max(0) as u64,
                egress_bytes: bytes.max(0) as u64,
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
                None => format!(
                    "in_{}_{}",
                    month_name(month).replace('-', ""),
                    hex::encode(rand::random::<[u8; 6]>())
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
        Ok(json!({
            "month": month_name(month),
            "final": final_,
            "invoices": n,
            "total_cents": total_cents,
            "elapsed_ms": started.elapsed().as_millis() as u64,
        }))
    }

    fn invoice_json(r: &sqlx::any::AnyRow, email: Option<&str>) -> ApiResult<Value> {
        let lines: Value =
            serde_json::from_str(&r.try_get::<String, _>("lines")?).map_err(ApiError::internal)?;
        let at = |c: &str| -> ApiResult<Option<String>> {
            let v: i64 = r.try_get(c)?;
            Ok((v > 0).then(|| rfc3339(v as u64)))
        };
        Ok(json!({
            "id": r.try_get::<String, _>("id")?,
            "account": email,
            "month": month_name(r.try_get("month")?),
            "status": r.try_get::<String, _>("status")?,
            "currency": r.try_get::<String, _>("currency")?,
            "lines": lines,
            "subtotal_cents": r.try_get::<i64, _>("subtotal_cents")?,
            "total_cents": r.try_get::<i64, _>("total_cents")?,
            "created_at": at("created_at")?,
            "finalized_at": at("finalized_at")?,
            "paid_at": at("paid_at")?,
            "voided_at": at("voided_at")?,
        }))
    }

    /// The caller's invoices (newest first). The current month's draft is brought up to date
    /// first.
    pub async fn list_invoices(&self, actor: &Actor) -> ApiResult<Value> {
        self.run_invoices(month_start(now_secs() as i64), Some(&actor.account_id))
            .await?;
        let rows = sqlx::query(
            "SELECT * FROM invoices WHERE account_id = $1 ORDER BY month DESC, created_at DESC LIMIT 120",
        )
        .bind(&actor.account_id)
        .fetch_all(&self.db.pool)
        .await?;
        let items: Vec<Value> = rows
            .iter()
            .map(|r| Self::invoice_json(r, Some(&actor.email)))
            .collect::<ApiResult<_>>()?;
        Ok(json!({"items": items}))
    }

    async fn invoice_row(&self, actor: &Actor, id: &str) -> ApiResult<sqlx::any::AnyRow> {
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
    pub async fn show_invoice(&self, actor: &Actor, id: &str) -> ApiResult<Value> {
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
        Self::invoice_json(&row, email.as_deref())
    }

    /// Pays an open invoice through the payment provider (the account's owner).
    pub async fn pay_invoice(&self, actor: &Actor, id: &str) -> ApiResult<Value> {
        let row = self.invoice_row(actor, id).await?;
        let status: String = row.try_get("status")?;
        let total: i64 = row.try_get("total_cents")?;
        let acct: String = row.try_get("account_id")?;
        if status != "open" {
            return Err(ApiError::conflict(
                "invoice_not_open",
                format!("invoice {id} is {status}; only an open invoice can be paid"),
            ));
        }
        // The invoice is claimed before the provider is asked, so that two payments racing
        // cannot both charge.
        let claimed =
            sqlx::query("UPDATE invoices SET status = 'paying' WHERE id = $1 AND status = 'open'")
                .bind(id)
                .execute(&self.db.pool)
                .await?
                .rows_affected();
        if claimed == 0 {
            return Err(ApiError::conflict(
                "invoice_not_open",
                format!("invoice {id} is being paid, was paid or was voided meanwhile"),
            ));
        }
        let reference = match self.payments.charge(id, total) {
            Ok(r) => r,
            Err(e) => {
                sqlx::query(
                    "UPDATE invoices SET status = 'open' WHERE id = $1 AND status = 'paying'",
                )
                .bind(id)
                .execute(&self.db.pool)
                .await?;
                return Err(ApiError::new(
                    axum::http::StatusCode::PAYMENT_REQUIRED,
                    "payment_failed",
                    e,
                ));
            }
        };
        let now = now_secs() as i64;
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "UPDATE invoices SET status = 'paid', paid_at = $1 WHERE id = $2 AND status = 'paying'",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let pid = format!("pay_{}", hex::encode(rand::random::<[u8; 8]>()));
        sqlx::query("INSERT INTO payments (id, invoice_id, provider, reference, amount_cents, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&pid)
            .bind(id)
            .bind(self.payments.name())
            .bind(&reference)
            .bind(total)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let entries = ledger_entries(
            &format!("payment:{pid}"),
            "payment",
            id,
            &[
                (format!("cash:{}", self.payments.name()), total),
                (format!("receivable:{acct}"), -total),
            ],
        )?;
        insert_rows(&mut tx, LEDGER_INSERT, 6, entries).await?;
        audit(
            &mut tx,
            None,
            &actor.email,
            "invoice.pay",
            json!({"invoice": id, "payment": pid, "amount_cents": total}),
            &actor.remote,
        );
        tx.commit().await?;
        Ok(
            json!({"invoice": id, "payment": pid, "provider": self.payments.name(), "reference": reference, "amount_cents": total, "status": "paid"}),
        )
    }

    /// Voids an open invoice (operators), reversing its ledger entries.
    pub async fn void_invoice(&self, actor: &Actor, id: &str) -> ApiResult<Value> {
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
        let mut tx = self.db.begin().await?;
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
        audit(
            &mut tx,
            None,
            &actor.email,
            "invoice.void",
            json!({"invoice": id}),
            &actor.remote,
        );
        tx.commit().await?;
        Ok(json!({"invoice": id, "status": "void"}))
    }

    /// Posts a marketplace sale: the buyer's receivable against the author's 70 % and the
    /// platform's 30 % ([`revenue_share`]). For the marketplace to call.
    pub async fn post_sale(
        &self,
        buyer: &str,
        author: &str,
        sale_cents: i64,
        reference: &str,
    ) -> ApiResult<(i64, i64)> {
        let (to_author, to_platform) = revenue_share(sale_cents);
        let entries = ledger_entries(
            &format!("sale:{reference}"),
            "sale",
            reference,
            &[
                (format!("receivable:{buyer}"), sale_cents),
                (format!("payable:author:{author}"), -to_author),
                ("revenue:platform".into(), -to_platform),
            ],
        )?;
        let mut tx = self.db.begin().await?;
        insert_rows(&mut tx, LEDGER_INSERT, 6, entries).await?;
        tx.commit().await?;
        Ok((to_author, to_platform))
    }

    /// The balance of a ledger account (sum of its entries).
    pub async fn ledger_balance(&self, account: &str) -> ApiResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger WHERE account = $1",
        )
        .bind(account)
        .fetch_one(&self.db.pool)
        .await?)
    }
}

/// Renders an invoice (its JSON) as a standalone HTML document.
pub fn invoice_html(inv: &Value) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let money = |c: i64| format!("${}.{:02}", c / 100, c % 100);
    let s = |k: &str| esc(inv[k].as_str().unwrap_or(""));
    let mut rows = String::new();
    for l in inv["lines"].as_array().into_iter().flatten() {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td class=n>{} {}</td><td class=n>{}</td></tr>\n",
            esc(l["realm"].as_str().unwrap_or("")),
            esc(l["description"].as_str().unwrap_or("")),
            l["quantity"].as_u64().unwrap_or(0),
            esc(l["unit"].as_str().unwrap_or("")),
            money(l["amount_cents"].as_i64().unwrap_or(0)),
        ));
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=utf-8><title>Invoice {id}</title>\n\
         <style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}table{{width:100%;border-collapse:collapse}}\
         td,th{{border-bottom:1px solid #ddd;padding:.4em;text-align:left}}.n{{text-align:right}}</style></head>\n\
         <body><h1>Invoice {id}</h1>\n<p>Account: {acct}<br>Period: {month}<br>Status: <b>{status}</b></p>\n\
         <table><tr><th>Realm</th><th>Item</th><th class=n>Quantity</th><th class=n>Amount</th></tr>\n{rows}\
         <tr><th colspan=3>Total ({cur})</th><th class=n>{total}</th></tr></table>\n\
         <p>Amounts are in cents, each line rounded half up; 1 GiB = 2<sup>30</sup> bytes.</p></body></html>\n",
        id = s("id"),
        acct = s("account"),
        month = s("month"),
        status = s("status"),
        cur = s("currency"),
        total = money(inv["total_cents"].as_i64().unwrap_or(0)),
    )
}

/// Delivers usage reports straight to the registry in this process.
pub struct LocalSink(pub std::sync::Weak<Registry>);

impl macula_common::usage::UsageSink for LocalSink {
    fn deliver(
        &self,
        report: UsageReport,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        let reg = self.0.upgrade();
        Box::pin(async move {
            let reg = reg.ok_or("the registry stopped")?;
            let grew = reg.ingest(&report).await.map_err(|e| e.message.clone())?;
            if !grew.is_empty() {
                if let Err(e) = reg.check_quotas(&grew).await {
                    tracing::warn!("quota check: {}", e.message);
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months() {
        let nov = parse_month("2026-11").unwrap();
        assert_eq!(rfc3339(nov as u64), "2026-11-01T00:00:00Z");
        assert_eq!(rfc3339(next_month(nov) as u64), "2026-12-01T00:00:00Z");
        assert_eq!(
            rfc3339(next_month(next_month(nov)) as u64),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(month_start(nov + 20 * 86_400 + 5), nov);
        assert_eq!(month_name(parse_month("2024-02").unwrap()), "2024-02");
        assert!(parse_month("2026-13").is_err());
        assert!(parse_month("nope").is_err());
    }

    #[test]
    fn rounding_is_half_up_per_line() {
        let prices = Prices::default();
        let starter = prices.tier("starter").unwrap();
        // 0.8 cents per 1K: 1 op is 0.0008 cents → 0; 625 ops = 0.5 cents → 1.
        assert_eq!(ops_overage_cents(starter, 1), 0);
        assert_eq!(ops_overage_cents(starter, 624), 0);
        assert_eq!(ops_overage_cents(starter, 625), 1);
        assert_eq!(ops_overage_cents(starter, 1_000_000), 800);
        // 8 cents per GiB: half a GiB is exactly 4 cents; 1/16 GiB is 0.5 cents → 1.
        assert_eq!(egress_overage_cents(starter, GIB / 2), 4);
        assert_eq!(egress_overage_cents(starter, GIB / 16), 1);
        assert_eq!(egress_overage_cents(starter, GIB / 16 - 1), 0);
    }

    #[test]
    fn revenue_share_adds_up() {
        for sale in [0, 1, 2, 3, 99, 100, 101, 999, 12_345] {
            let (a, p) = revenue_share(sale);
            assert_eq!(a + p, sale);
        }
        assert_eq!(revenue_share(1000), (700, 300));
        assert_eq!(revenue_share(5), (3, 2)); // 1.5 → 2 to the platform
    }
}
