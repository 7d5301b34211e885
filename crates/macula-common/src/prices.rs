//! The price list (`registry.prices`): plans and add-ons.

use serde::{Deserialize, Serialize};

const GIB: u64 = 1 << 30;

/// A plan (the seed's "Pricing Tiers"), as `registry.prices.tiers` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TierPrice {
    pub name: String,
    pub title: String,
    /// Monthly base fee, in cents.
    pub base_cents: i64,
    /// Operations included each month.
    pub included_ops: u64,
    /// Egress bytes included each month.
    pub included_bytes: u64,
    /// Overage per thousand operations, in thousandths of a cent.
    pub ops_millicents_per_1k: u64,
    /// Overage per GiB (2^30 bytes) of egress, in cents.
    pub egress_cents_per_gib: u64,
    /// Past the allowance, operations are refused instead of billed.
    #[serde(default)]
    pub hard_quota: bool,
    /// Compute: each hour a replica runs, in thousandths of a cent (the seed's managed
    /// hosting: $0.05 an hour per payload instance). Billed on every plan.
    #[serde(default = "default_instance_price")]
    pub instance_millicents_per_hour: u64,
    /// The most replicas a realm on the plan may ask for at once (payload replicas, and runs
    /// of jobs at once): a deploy past it is refused.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Hub package delivery: each GiB of packages' files delivered to the nodes that run the
    /// realm's replicas, in cents (the seed's $0.10/GB). Billed on every plan.
    #[serde(default = "default_package_price")]
    pub package_cents_per_gib: u64,
}

fn default_instance_price() -> u64 {
    5_000
}

fn default_package_price() -> u64 {
    10
}

fn default_max_instances() -> u32 {
    100
}

/// A premium add-on, billed per month in which it was on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddonPrice {
    pub id: String,
    pub title: String,
    pub monthly_cents: i64,
}

/// The price list (`registry.prices`). The default is the seed's: tiers from cheapest to
/// dearest (the order decides what is an upgrade; the first is what a new realm gets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    pub tiers: Vec<TierPrice>,
    pub addons: Vec<AddonPrice>,
}

impl Default for Prices {
    fn default() -> Self {
        let tier = |name: &str, title: &str, base, ops, bytes, mc, gib, hard| TierPrice {
            name: name.into(),
            title: title.into(),
            base_cents: base,
            included_ops: ops,
            included_bytes: bytes,
            ops_millicents_per_1k: mc,
            egress_cents_per_gib: gib,
            hard_quota: hard,
            instance_millicents_per_hour: default_instance_price(),
            max_instances: default_max_instances(),
            package_cents_per_gib: default_package_price(),
        };
        let addon = |id: &str, title: &str, cents| AddonPrice {
            id: id.into(),
            title: title.into(),
            monthly_cents: cents,
        };
        let mut prices = Prices {
            tiers: vec![
                tier("hobby", "Hobby", 0, 100_000, GIB, 1_000, 10, true),
                tier(
                    "starter",
                    "Starter",
                    2_900,
                    10_000_000,
                    100 * GIB,
                    800,
                    8,
                    false,
                ),
                tier(
                    "professional",
                    "Professional",
                    9_900,
                    100_000_000,
                    1024 * GIB,
                    500,
                    5,
                    false,
                ),
                // "Custom" in the seed: its floor ($499, 1B operations, 10 TB), Professional's rates.
                tier(
                    "enterprise",
                    "Enterprise",
                    49_900,
                    1_000_000_000,
                    10 * 1024 * GIB,
                    500,
                    5,
                    false,
                ),
            ],
            addons: vec![
                addon("analytics", "Advanced Analytics", 1_900),
                addon("multi_region", "Multi-Region", 2_900),
                addon("priority_support", "Priority Support", 9_900),
                addon("custom_domains", "Custom Domains", 500),
                addon("dedicated_nodes", "Dedicated Nodes", 29_900),
                addon("sso", "SSO Integration", 4_900),
            ],
        };
        // Instances a realm may run at once: a few on the free plan, more on each paid one.
        for (t, max) in prices.tiers.iter_mut().zip([3, 20, 100, 1_000]) {
            t.max_instances = max;
        }
        prices
    }
}

impl Prices {
    /// Refuses a price list that cannot bill: no tiers, duplicate names, an empty allowance.
    pub fn validate(&self) -> Result<(), String> {
        if self.tiers.is_empty() {
            return Err("registry.prices.tiers is empty".into());
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tiers {
            if t.name.is_empty() || !seen.insert(t.name.as_str()) {
                return Err(format!(
                    "registry.prices.tiers: empty or repeated name {:?}",
                    t.name
                ));
            }
            if t.included_ops == 0 || t.included_bytes == 0 || t.base_cents < 0 {
                return Err(format!(
                    "registry.prices.tiers: {} needs a non-zero allowance and a base fee ≥ 0",
                    t.name
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for a in &self.addons {
            if a.id.is_empty() || !seen.insert(a.id.as_str()) || a.monthly_cents < 0 {
                return Err(format!(
                    "registry.prices.addons: empty or repeated id, or a negative price: {:?}",
                    a.id
                ));
            }
        }
        Ok(())
    }

    pub fn tier(&self, name: &str) -> Option<&TierPrice> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// A tier by name, or the first (cheapest) for a name the list no longer has.
    pub fn tier_or_first(&self, name: &str) -> &TierPrice {
        self.tier(name).unwrap_or(&self.tiers[0])
    }

    /// Position in the list: a higher rank is an upgrade.
    pub fn rank(&self, name: &str) -> usize {
        self.tiers.iter().position(|t| t.name == name).unwrap_or(0)
    }

    pub fn addon(&self, id: &str) -> Option<&AddonPrice> {
        self.addons.iter().find(|a| a.id == id)
    }
}
