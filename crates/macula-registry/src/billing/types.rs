//! The requests and responses of billing's routes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use macula_common::prices::{AddonPrice, TierPrice};

/// The plans, the add-ons and the rules by which they are billed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Plans {
    pub tiers: Vec<TierPrice>,
    pub addons: Vec<AddonPrice>,
    pub rules: PlanRules,
}

/// How amounts are computed, in words.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlanRules {
    pub rounding: String,
    pub gib: String,
    pub plan_changes: String,
    pub hard_quota: String,
    pub addons: String,
}

/// `GET /v1/realms/{realm}/usage?period=&from=&to=&format=`
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// `hour`, `day` (default) or `month`.
    #[serde(default)]
    pub period: Option<String>,
    /// Unix seconds, `YYYY-MM` or `YYYY-MM-DD` (default: this month's start).
    #[serde(default)]
    pub from: Option<String>,
    /// Unix seconds, `YYYY-MM` or `YYYY-MM-DD`, exclusive (default: now).
    #[serde(default)]
    pub to: Option<String>,
    /// `json` (default) or `csv`.
    #[serde(default)]
    pub format: Option<String>,
}

/// One period of a realm's usage.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UsagePeriod {
    pub start: String,
    /// Operations by kind: `publish`, `subscribe`, `call`, `register`, `dht`.
    pub ops: BTreeMap<String, u64>,
    pub ops_total: u64,
    pub bytes_in: u64,
    /// Bytes written to the realm's clients.
    pub egress_bytes: u64,
    /// `egress_bytes` in GiB (2^30 bytes).
    pub egress_gb: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    /// Compute: milliseconds of replicas run, and the same in instance-hours.
    #[serde(default)]
    pub instance_ms: u64,
    #[serde(default)]
    pub instance_hours: f64,
    /// Hub package delivery: bytes of packages' files delivered to the nodes running the
    /// realm's replicas, and the same in GiB.
    #[serde(default)]
    pub package_bytes: u64,
    #[serde(default)]
    pub package_gb: f64,
}

/// A realm's usage per period.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub realm: String,
    pub period: String,
    pub items: Vec<UsagePeriod>,
}

/// A realm's month: usage, plan, allowance used, the charges so far, notices.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageMonth {
    pub realm: String,
    /// `YYYY-MM`.
    pub month: String,
    pub plan: TierPrice,
    pub usage: UsagePeriod,
    pub used: AllowanceUsed,
    /// Whether the realm is in the registry (a realm configured on a node alone is not billed).
    pub registered: bool,
    /// Set while the Hobby plan's quota refuses operations.
    pub quota_exceeded: Option<String>,
    pub charges: Charges,
    pub days: Vec<UsagePeriod>,
    pub notices: Vec<Notice>,
}

/// How much of the plan's allowance a month used.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AllowanceUsed {
    pub ops_percent: f64,
    pub egress_percent: f64,
}

/// What a month costs so far.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Charges {
    pub lines: Vec<Line>,
    pub total_cents: i64,
}

/// A notice to the owner (80 % and 100 % of the allowance).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Notice {
    pub kind: String,
    pub message: String,
    pub at: String,
}

/// One line of an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Line {
    /// `base`, `ops`, `egress`, `addon`, `fee`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub realm: String,
    pub description: String,
    pub quantity: u64,
    pub unit: String,
    pub amount_cents: i64,
}

/// Changing a realm's plan.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// A plan's `name` (`GET /v1/plans`).
    pub tier: String,
}

/// A plan changed (an upgrade) or scheduled (a downgrade).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PlanChange {
    pub realm: String,
    /// The plan in effect now.
    pub tier: String,
    /// A downgrade: the plan from the first of next month.
    pub scheduled: Option<ScheduledPlan>,
    pub rule: String,
}

/// A plan that takes effect later.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ScheduledPlan {
    pub tier: String,
    pub effective_at: String,
}

/// Turning an add-on on or off.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddonRequest {
    /// An add-on's `id` (`GET /v1/plans`).
    pub feature: String,
    /// Default true.
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// An add-on's state for a realm.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Addon {
    pub realm: String,
    pub feature: String,
    pub title: String,
    pub active: bool,
    pub monthly_cents: i64,
    pub rule: String,
}

/// An invoice.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Invoice {
    pub id: String,
    /// The account's email address.
    pub account: Option<String>,
    /// `YYYY-MM`.
    pub month: String,
    /// `draft` (the month runs), `open`, `paying`, `paid` or `void`.
    pub status: String,
    pub currency: String,
    pub lines: Vec<Line>,
    pub subtotal_cents: i64,
    pub total_cents: i64,
    pub created_at: Option<String>,
    pub finalized_at: Option<String>,
    pub paid_at: Option<String>,
    pub voided_at: Option<String>,
}

/// The caller's invoices, newest first (at most 120).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Invoices {
    pub items: Vec<Invoice>,
}

/// `GET /v1/invoices/{invoice}?format=html`
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InvoiceQuery {
    /// `json` or `html` (default: by the `Accept` header).
    #[serde(default)]
    pub format: Option<String>,
}

/// A payment taken.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Payment {
    pub invoice: String,
    /// `pay_...`
    pub payment: String,
    pub provider: String,
    /// The provider's reference.
    pub reference: String,
    pub amount_cents: i64,
    pub status: String,
}

/// Which month's invoices to build (the body may be left out: the previous month).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// `YYYY-MM`, `current` or `previous`.
    #[serde(default)]
    pub month: Option<String>,
}

/// What an invoice run did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InvoiceRun {
    pub month: String,
    /// The month has ended: invoices are open (final), not drafts.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Invoices written.
    pub invoices: usize,
    pub total_cents: i64,
    pub elapsed_ms: u64,
}

/// A voided invoice.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Voided {
    pub invoice: String,
    pub status: String,
}
