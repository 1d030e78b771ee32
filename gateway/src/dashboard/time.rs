//! UTC days and instants as the dashboard shows them.

use std::time::{SystemTime, UNIX_EPOCH};

use tollgate::{Date, Period};

const DAY: i64 = 86_400;

/// Seconds since the epoch (negative before it).
pub(crate) fn seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The UTC day of `secs`.
pub(crate) fn day_of(secs: i64) -> Date {
    Date::from_days(secs.div_euclid(DAY))
}

/// `secs` as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339(secs: i64) -> String {
    let d = day_of(secs);
    let s = secs.rem_euclid(DAY);
    format!("{d}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// When the quota window of `period` that holds `secs` ends (the next
/// reset), in seconds since the epoch.
pub(crate) fn next_reset(period: Period, secs: i64) -> i64 {
    let day = secs.div_euclid(DAY);
    let end = match period {
        Period::Day => day + 1,
        Period::Week(first) => {
            // 1970-01-01 was a Thursday, three days after a Monday.
            let from_monday = (day + 3).rem_euclid(7);
            let back = (from_monday - first.days_from_monday()).rem_euclid(7);
            day - back + 7
        }
        Period::Month => {
            let d = Date::from_days(day);
            let (y, m) = if d.month() == 12 {
                (d.year() + 1, 1)
            } else {
                (d.year(), d.month() + 1)
            };
            Date::new(y, m, 1).map_or(day + 1, |d| d.days())
        }
    };
    end * DAY
}

#[cfg(test)]
mod tests {
    use tollgate::Weekday;

    use super::*;

    fn at(y: i32, m: u8, d: u8, secs: i64) -> i64 {
        Date::new(y, m, d).unwrap().days() * DAY + secs
    }

    #[test]
    fn instants_print_as_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(2026, 12, 6, 3723)), "2026-12-06T01:02:03Z");
    }

    #[test]
    fn windows_reset_at_the_next_utc_day_week_and_month() {
        // 2026-12-06 is a Sunday.
        let now = at(2026, 12, 6, 50_000);
        assert_eq!(next_reset(Period::Day, now), at(2026, 12, 7, 0));
        assert_eq!(next_reset(Period::WEEK, now), at(2026, 12, 7, 0));
        assert_eq!(
            next_reset(Period::Week(Weekday::Sunday), now),
            at(2026, 12, 13, 0)
        );
        assert_eq!(next_reset(Period::Month, now), at(2027, 1, 1, 0));
        assert_eq!(
            next_reset(Period::Month, at(2026, 2, 1, 0)),
            at(2026, 3, 1, 0)
        );
    }
}
