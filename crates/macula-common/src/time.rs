//! Time: Unix seconds, RFC 3339 and the UTC calendar.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Formats Unix seconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// (year, month, day) of a day number since the epoch (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The day number since the epoch of (year, month, day): the inverse of [`civil_from_days`].
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of Unix seconds (UTC; before the epoch counts as the epoch).
pub fn ymd(secs: i64) -> (i64, u32, u32) {
    civil_from_days(secs.max(0).div_euclid(86_400))
}

/// Unix seconds of the first instant of the month containing `secs`.
pub fn month_start(secs: i64) -> i64 {
    let (y, m, _) = ymd(secs);
    days_from_civil(y, m, 1) * 86_400
}

/// The first instant of the month after the one starting at `start`.
pub fn next_month(start: i64) -> i64 {
    let (y, m, _) = ymd(start);
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * 86_400
}

/// `YYYY-MM` of a month start.
pub fn month_name(start: i64) -> String {
    let (y, m, _) = ymd(start);
    format!("{y:04}-{m:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_600), "2025-01-01T00:00:00Z");
    }

    #[test]
    fn the_calendar_round_trips_and_months_step() {
        for day in [-800_000i64, -1, 0, 59, 60, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day, "{y}-{m}-{d}");
        }
        // 2024-02-15 12:00 UTC: a leap February.
        let t = 1_708_000_000;
        assert_eq!(month_name(month_start(t)), "2024-02");
        assert_eq!(rfc3339(month_start(t) as u64), "2024-02-01T00:00:00Z");
        assert_eq!(
            rfc3339(next_month(month_start(t)) as u64),
            "2024-03-01T00:00:00Z"
        );
        let dec = days_from_civil(2025, 12, 31) * 86_400;
        assert_eq!(month_name(next_month(month_start(dec))), "2026-01");
    }
}
