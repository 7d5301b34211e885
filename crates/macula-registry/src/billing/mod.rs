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
//!
//! One file per concept: `ingest.rs`, `usage.rs` (reading it), `quota.rs` (quotas, notices, the
//! billing tick), `plans.rs` (plans and add-ons), `invoices.rs`, `payments.rs`, `ledger.rs`;
//! this file holds the calendar, the money arithmetic and the in-process usage sink.

mod ingest;
mod invoices;
mod ledger;
mod payments;
mod plans;
mod quota;
pub(crate) mod routes;
pub mod types;
mod usage;

#[allow(unused_imports)]
pub use self::{
    ingest::*, invoices::*, ledger::*, payments::*, plans::*, quota::*, types::*, usage::*,
};

use std::collections::{HashMap, HashSet};

use macula_common::time::{now_secs, rfc3339};
use macula_common::usage::{quantile_ms, UsageReport, UsageRow, BUCKETS, OPS};
use serde_json::json;
use sqlx::Row;

use crate::db::{Arg, Backend};
use crate::error::{is_unique_violation, ApiError, ApiResult};
use crate::realms::audit;
use crate::service::{Actor, InRealm, Needs, Registry};

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

/// `num / den` rounded half up (both non-negative).
pub fn round_half_up(num: u128, den: u128) -> i64 {
    ((num * 2 + den) / (den * 2)) as i64
}

/// The overage charge for `ops` operations beyond the allowance, in cents.
pub fn ops_overage_cents(t: &Tier, ops: u64) -> i64 {
    round_half_up(ops as u128 * t.ops_millicents_per_1k as u128, 1_000_000)
}

/// The compute charge for `instance_ms` milliseconds of replicas run, in cents.
pub fn compute_cents(t: &Tier, instance_ms: u64) -> i64 {
    round_half_up(
        instance_ms as u128 * t.instance_millicents_per_hour as u128,
        3_600_000 * 1_000,
    )
}

/// The Hub delivery charge for `bytes` of packages delivered, in cents.
pub fn package_cents(t: &Tier, bytes: u64) -> i64 {
    round_half_up(bytes as u128 * t.package_cents_per_gib as u128, GIB as u128)
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
             bytes_out = usage_rollups.bytes_out + excluded.bytes_out, \
             instance_ms = usage_rollups.instance_ms + excluded.instance_ms, \
             package_bytes = usage_rollups.package_bytes + excluded.package_bytes"
        )
    };
}
pub(crate) use add_to_rollup;

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
