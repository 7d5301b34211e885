//! URI rules.
//!
//! Macula validates URIs strictly: dot-separated components of lowercase ASCII letters, digits,
//! `_` and `-` (the WAMP strict rule, plus `-` because realm names are DNS names). Patterns used by
//! `wildcard` subscriptions and registrations may have empty components. Realm names are reverse-DNS
//! names: at least two components, each 1–63 characters of `[a-z0-9-]` not starting or ending with `-`.

/// Longest URI accepted, in bytes.
pub const MAX_URI_LEN: usize = 255;

fn component_ok(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Why a URI or realm name was refused; the message tells the user what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct UriError {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

fn err(what: &'static str, value: &str, why: &'static str) -> UriError {
    UriError {
        what,
        value: value.chars().take(80).collect(),
        why,
    }
}

/// A concrete URI (topic to publish to, procedure to call or register with `exact` match).
/// One pass over the bytes: this runs on every publish and call.
pub fn validate(uri: &str) -> Result<(), UriError> {
    if uri.is_empty() || uri.len() > MAX_URI_LEN {
        return Err(err("URI", uri, "must be 1 to 255 characters"));
    }
    let mut after_dot = true;
    for b in uri.bytes() {
        let ok = if b == b'.' {
            !std::mem::replace(&mut after_dot, true)
        } else {
            after_dot = false;
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
        };
        if !ok {
            return Err(err(
                "URI",
                uri,
                "use dot-separated components of a-z, 0-9, '_' and '-' (e.g. com.acme.orders.created)",
            ));
        }
    }
    if after_dot {
        return Err(err("URI", uri, "must not end with '.'"));
    }
    Ok(())
}

/// A URI under a match policy: `exact` (same as [`validate`]), `prefix` (a URI prefix, whole
/// components) or `wildcard` (empty components match any one component).
pub fn validate_pattern(uri: &str, policy: MatchPolicy) -> Result<(), UriError> {
    match policy {
        MatchPolicy::Exact | MatchPolicy::Prefix => validate(uri),
        MatchPolicy::Wildcard => {
            if uri.is_empty() || uri.len() > MAX_URI_LEN {
                return Err(err("URI pattern", uri, "must be 1 to 255 characters"));
            }
            let ok = uri.split('.').all(|c| c.is_empty() || component_ok(c));
            if ok && uri.contains('.') {
                Ok(())
            } else {
                Err(err(
                    "wildcard URI pattern",
                    uri,
                    "use dot-separated components, empty ones matching any component (e.g. com.acme..created)",
                ))
            }
        }
    }
}

/// A realm name: reverse-DNS, lowercase (`com.acme.shop`).
pub fn validate_realm(realm: &str) -> Result<(), UriError> {
    const HINT: &str =
        "a realm is a lowercase reverse-DNS name with at least two parts, like com.acme.shop";
    if realm.is_empty() || realm.len() > 253 {
        return Err(err("realm name", realm, HINT));
    }
    let parts: Vec<&str> = realm.split('.').collect();
    if parts.len() < 2 {
        return Err(err("realm name", realm, HINT));
    }
    for p in parts {
        let ok = !p.is_empty()
            && p.len() <= 63
            && !p.starts_with('-')
            && !p.ends_with('-')
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(err("realm name", realm, HINT));
        }
    }
    Ok(())
}

/// Whether `child` is `parent` itself or one of its subrealms (`com.acme.shop` under `com.acme`).
pub fn is_same_or_subrealm(child: &str, parent: &str) -> bool {
    child == parent
        || (child.len() > parent.len()
            && child.starts_with(parent)
            && child.as_bytes()[parent.len()] == b'.')
}

/// How a subscription or registration URI matches topics or procedures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatchPolicy {
    Exact,
    Prefix,
    Wildcard,
}

impl MatchPolicy {
    /// Parses the `match` option; absent means `exact`.
    pub fn parse(s: Option<&str>) -> Option<MatchPolicy> {
        match s {
            None | Some("exact") => Some(MatchPolicy::Exact),
            Some("prefix") => Some(MatchPolicy::Prefix),
            Some("wildcard") => Some(MatchPolicy::Wildcard),
            Some(_) => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            MatchPolicy::Exact => "exact",
            MatchPolicy::Prefix => "prefix",
            MatchPolicy::Wildcard => "wildcard",
        }
    }
    /// Whether `uri` matches `pattern` under this policy.
    pub fn matches(self, pattern: &str, uri: &str) -> bool {
        match self {
            MatchPolicy::Exact => pattern == uri,
            // WAMP prefix matching is on the string, e.g. `com.acme` matches `com.acme.x` and `com.acmex`.
            MatchPolicy::Prefix => uri.starts_with(pattern),
            MatchPolicy::Wildcard => {
                let mut p = pattern.split('.');
                let mut u = uri.split('.');
                loop {
                    match (p.next(), u.next()) {
                        (None, None) => return true,
                        (Some(pc), Some(uc)) => {
                            if !pc.is_empty() && pc != uc {
                                return false;
                            }
                        }
                        _ => return false,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_uris_accept_lowercase_components_only() {
        assert!(validate("com.acme.orders.created").is_ok());
        assert!(validate("com.my-app.x_1").is_ok());
        assert!(validate("com.Acme").is_err());
        assert!(validate("com..acme").is_err());
        assert!(validate("com.acme.").is_err());
        assert!(validate("com acme").is_err());
        assert!(validate("").is_err());
        assert!(validate(&"a".repeat(256)).is_err());
    }

    #[test]
    fn realm_names_are_reverse_dns() {
        assert!(validate_realm("com.acme.shop").is_ok());
        assert!(validate_realm("io.macula").is_ok());
        assert!(validate_realm("acme").is_err());
        assert!(validate_realm("Com.acme").is_err());
        assert!(validate_realm("com.-acme").is_err());
        assert!(validate_realm("com.ac_me").is_err());
        assert!(validate_realm("com..acme").is_err());
    }

    #[test]
    fn subrealm_relation_respects_component_boundaries() {
        assert!(is_same_or_subrealm("com.acme.shop", "com.acme"));
        assert!(is_same_or_subrealm("com.acme", "com.acme"));
        assert!(!is_same_or_subrealm("com.acmex", "com.acme"));
        assert!(!is_same_or_subrealm("com.acme", "com.acme.shop"));
    }

    #[test]
    fn wildcard_matches_any_single_component() {
        let w = MatchPolicy::Wildcard;
        assert!(w.matches("com..created", "com.orders.created"));
        assert!(!w.matches("com..created", "com.orders.x.created"));
        assert!(!w.matches("com..created", "com.orders.deleted"));
        assert!(MatchPolicy::Prefix.matches("com.acme", "com.acme.x"));
        assert!(validate_pattern("com..created", MatchPolicy::Wildcard).is_ok());
        assert!(validate_pattern("com..created", MatchPolicy::Exact).is_err());
    }
}
