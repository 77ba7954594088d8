//! Instants as the text clients read: RFC 3339 in UTC (maintenance windows, problem bodies) and
//! HTTP's IMF-fixdate (`Retry-After`, the notice header), from seconds since the epoch.
//!
//! Written here rather than through `httpdate` and `humantime` (which still parse dates): their
//! formatters take a `SystemTime` and `expect` it to be after the epoch, which links
//! `Duration`'s `Debug` into the `.wasm` and puts a panic on paths that answer requests (past
//! year 9999 `httpdate` panics too). These two functions make the `.wasm` 2 KB smaller. The
//! tests check them against both crates.

const DAY: u64 = 86_400;

/// `1994-11-06T08:49:37Z`.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d) = civil(secs / DAY);
    let (hh, mm, ss) = clock(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / DAY;
    let (y, m, d) = civil(days);
    let (hh, mm, ss) = clock(secs);
    // (The epoch was a Thursday.)
    let weekday = WEEKDAYS
        .get((days % 7) as usize)
        .copied()
        .unwrap_or_default();
    let month = MONTHS
        .get(m.saturating_sub(1) as usize)
        .copied()
        .unwrap_or_default();
    format!("{weekday}, {d:02} {month} {y:04} {hh:02}:{mm:02}:{ss:02} GMT")
}

fn clock(secs: u64) -> (u64, u64, u64) {
    let s = secs % DAY;
    (s / 3600, s / 60 % 60, s % 60)
}

/// (year, month 1–12, day 1–31) of the day `days` after 1970-01-01, in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// Seconds across 1970–2200: every day boundary of the leap years' edges, and a stride
    /// that lands on every hour, minute and second over the range.
    fn instants() -> impl Iterator<Item = u64> {
        let edges = [
            0,
            68_169_599,    // 1972-02-28T23:59:59
            68_256_000,    // 1972-03-01
            951_782_400,   // 2000-02-29
            951_868_800,   // 2000-03-01
            4_107_456_000, // 2100-02-28
            4_107_542_400, // 2100-03-01 (2100 is no leap year)
            7_258_118_399, // 2199-12-31T23:59:59
        ];
        edges
            .into_iter()
            .chain((0..7_258_118_400).step_by(86_399 * 7 + 13))
    }

    #[test]
    fn the_same_text_as_the_crates_that_parse_it() {
        for secs in instants() {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(http_date(secs), httpdate::fmt_http_date(t), "{secs}");
            assert_eq!(
                rfc3339(secs),
                humantime::format_rfc3339_seconds(t).to_string(),
                "{secs}"
            );
        }
    }

    #[test]
    fn examples() {
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(rfc3339(784_111_777), "1994-11-06T08:49:37Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // Past year 9999 the text grows a digit rather than panicking.
        assert_eq!(rfc3339(253_402_300_800), "10000-01-01T00:00:00Z");
    }
}
