//! Amounts as manifests write them: CPU in cores or millicores (`0.5`, `500m`, `2`), memory in
//! bytes with a binary or decimal suffix (`256Mi`, `1Gi`, `128M`, `1048576`), durations as
//! `humantime` reads them (`250ms`, `10s`, `5m`, `1h 30m`). The Kubernetes quantity forms
//! Macula accepts are the same.

use std::time::Duration;

/// CPU in millicores.
pub fn cpu_millis(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let bad =
        || format!("{s:?} is not a CPU amount: write cores (`0.5`, `2`) or millicores (`500m`)");
    if let Some(m) = s.strip_suffix('m') {
        let v: u64 = m.parse().map_err(|_| bad())?;
        return u32::try_from(v).map_err(|_| bad());
    }
    let v: f64 = s.parse().map_err(|_| bad())?;
    if !v.is_finite() || !(0.0..=1_000_000.0).contains(&v) {
        return Err(bad());
    }
    Ok((v * 1000.0).round() as u32)
}

/// Memory in bytes.
pub fn memory_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "{s:?} is not a memory amount: write bytes with a suffix (`256Mi`, `1Gi`, `512M`) or a plain number of bytes"
        )
    };
    const SUFFIXES: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, unit) in SUFFIXES {
        if let Some(n) = s.strip_suffix(suffix) {
            let v: u64 = n.trim().parse().map_err(|_| bad())?;
            return v.checked_mul(unit).ok_or_else(bad);
        }
    }
    s.parse().map_err(|_| bad())
}

/// A duration (`10s`, `5m`, `250ms`).
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}): write e.g. `10s`, `5m`, `250ms`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_read_as_kubernetes_writes_them() {
        assert_eq!(cpu_millis("500m"), Ok(500));
        assert_eq!(cpu_millis("0.25"), Ok(250));
        assert_eq!(cpu_millis("2"), Ok(2000));
        assert!(cpu_millis("two").is_err() && cpu_millis("-1").is_err());
        assert!(cpu_millis("99999999999m").is_err());
        assert_eq!(memory_bytes("256Mi"), Ok(256 << 20));
        assert_eq!(memory_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(memory_bytes("4096"), Ok(4096));
        assert!(memory_bytes("1Zi").is_err() && memory_bytes("99999999Pi").is_err());
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(duration("soon").is_err());
    }
}
