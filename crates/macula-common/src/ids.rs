//! Random identifiers and secrets, as every part of Macula writes them: a prefix naming the
//! kind (`key_`, `acct_`, `mcs_`, `pay_`) and the hex of `bytes` random bytes from a
//! cryptographically secure generator (`rand`'s thread generator, seeded by the OS).

use rand::RngCore;

/// `prefix` followed by `2 × bytes` hex digits.
pub fn random_id(prefix: &str, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    let mut out = String::with_capacity(prefix.len() + 2 * bytes);
    out.push_str(prefix);
    out.push_str(&hex::encode(b));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_have_their_prefix_and_differ() {
        let a = super::random_id("key_", 8);
        let b = super::random_id("key_", 8);
        assert!(a.starts_with("key_") && a.len() == 4 + 16, "{a}");
        assert!(a[4..].bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
