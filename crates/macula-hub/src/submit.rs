//! The submission pipeline's first gate: what a package asks for, judged against what its
//! publisher may grant and what a plan allows, before anything else runs. A package that claims a
//! capability its publisher may not grant, asks for more than any plan allows, or carries a
//! secret in its manifest (a package is public) is refused, every problem with its field.

use crate::package::{FieldError, Package};

/// What a publisher's packages may ask for.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Capability patterns the publisher may grant: `rpc:call:com.acme.*` (a trailing `*` in the
    /// last part matches any suffix), `pubsub:*` (any action and target of a domain).
    pub capabilities: Vec<String>,
    /// The most one package's workload may ask for at once (the largest plan's limits).
    pub max_instances: u32,
    pub max_cpu_millis: u64,
    pub max_memory_bytes: u64,
}

/// Whether capability `cap` is within pattern `pattern`.
pub fn grants(pattern: &str, cap: &str) -> bool {
    let p: Vec<&str> = pattern.splitn(3, ':').collect();
    let c: Vec<&str> = cap.splitn(3, ':').collect();
    for (i, part) in p.iter().enumerate() {
        if *part == "*" && i + 1 == p.len() {
            return c.len() > i;
        }
        let Some(have) = c.get(i) else {
            return false;
        };
        let ok = match part.strip_suffix('*') {
            Some(prefix) if i + 1 == p.len() => have.starts_with(prefix),
            _ => part == have,
        };
        if !ok {
            return false;
        }
    }
    p.len() == c.len()
}

/// Environment names that hold secrets, by what they are called.
const SECRET_NAMES: &[&str] = &[
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "TOKEN",
    "PRIVATE_KEY",
    "API_KEY",
];

/// Whether an environment variable looks like a secret written into the manifest.
fn secret(name: &str, value: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    let named = SECRET_NAMES.iter().any(|s| upper.contains(s));
    let looks = value.starts_with("sk_live_")
        || value.starts_with("sk_test_")
        || (value.contains("-----BEGIN") && value.contains("PRIVATE KEY"));
    looks || (named && !value.trim().is_empty())
}

/// Every problem with what `pkg` asks for under `policy`.
pub fn check(pkg: &Package, policy: &Policy) -> Vec<FieldError> {
    let mut errors = vec![];
    let err = |path: String, message: String| FieldError { path, message };
    for (i, cap) in pkg.capabilities.iter().enumerate() {
        if !policy.capabilities.iter().any(|p| grants(p, cap)) {
            errors.push(err(
                format!("permissions.capabilities[{i}]"),
                format!(
                    "{cap:?} is not one publisher {} may grant (it may grant: {})",
                    pkg.publisher,
                    if policy.capabilities.is_empty() {
                        "none".to_owned()
                    } else {
                        policy.capabilities.join(", ")
                    }
                ),
            ));
        }
    }
    if let Some((_, m)) = &pkg.workload {
        let w = m.workload();
        let n = u64::from(m.instances());
        if m.instances() > policy.max_instances {
            errors.push(err(
                "workload".into(),
                format!(
                    "{} instances at once: no plan allows more than {}",
                    m.instances(),
                    policy.max_instances
                ),
            ));
        }
        let cpu = u64::from(w.resources.cpu_millis) * n;
        if cpu > policy.max_cpu_millis {
            errors.push(err(
                "workload.resources.cpu".into(),
                format!(
                    "{cpu} millicores in all: no plan allows more than {}",
                    policy.max_cpu_millis
                ),
            ));
        }
        let mem = w.resources.memory_bytes.saturating_mul(n);
        if mem > policy.max_memory_bytes {
            errors.push(err(
                "workload.resources.memory".into(),
                format!(
                    "{mem} bytes in all: no plan allows more than {}",
                    policy.max_memory_bytes
                ),
            ));
        }
        for (k, v) in &w.env {
            if secret(k, v) {
                errors.push(err(
                    format!("workload.env.{k}"),
                    "a secret written into the manifest (a package is public): have the replica get it from its realm at run time".into(),
                ));
            }
        }
    }
    errors
}
