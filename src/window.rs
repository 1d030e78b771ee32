//! Calendar windows of quotas: pure functions of UTC time.
//!
//! A quota counts requests in UTC calendar windows: a DAY from 00:00, a WEEK
//! from 00:00 of its start day (Monday by default), a MONTH from the 1st at
//! 00:00. Times are nanoseconds since the Unix epoch (`i64`: years 1678 to
//! 2262); dates use the proleptic Gregorian calendar. Nothing here reads a clock.

use std::fmt;

/// Nanoseconds in a day.
pub(crate) const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// A day of the week (`"MONDAY"` … `"SUNDAY"` in a config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(
    feature = "config",
    derive(serde::Deserialize),
    serde(rename_all = "UPPERCASE")
)]
pub enum Weekday {
    /// Monday (the default start of a week).
    #[default]
    Monday,
    /// Tuesday.
    Tuesday,
    /// Wednesday.
    Wednesday,
    /// Thursday.
    Thursday,
    /// Friday.
    Friday,
    /// Saturday.
    Saturday,
    /// Sunday.
    Sunday,
}

impl Weekday {
    /// Days since Monday (Monday = 0).
    pub fn days_from_monday(self) -> i64 {
        self as i64
    }

    pub(crate) fn from_days_from_monday(n: i64) -> Weekday {
        match n.rem_euclid(7) {
            0 => Weekday::Monday,
            1 => Weekday::Tuesday,
            2 => Weekday::Wednesday,
            3 => Weekday::Thursday,
            4 => Weekday::Friday,
            5 => Weekday::Saturday,
            _ => Weekday::Sunday,
        }
    }
}

/// The calendar period of a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// A UTC day, from 00:00.
    Day,
    /// A UTC week, from 00:00 of the given day.
    Week(Weekday),
    /// A UTC calendar month, from the 1st at 00:00.
    Month,
}

impl Period {
    /// A week starting on Monday, as AWS API Gateway counts weeks.
    pub const WEEK: Period = Period::Week(Weekday::Monday);
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Period::Day => f.write_str("DAY"),
            Period::Week(Weekday::Monday) => f.write_str("WEEK"),
            Period::Week(d) => write!(f, "WEEK (from {d:?})"),
            Period::Month => f.write_str("MONTH"),
        }
    }
}

/// One window: `start <= t < end`, in nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Window {
    pub(crate) start: i64,
    pub(crate) end: i64,
}

/// The window of `period` that contains `t`.
pub(crate) fn window(period: Period, t: i64) -> Window {
    let day = t.div_euclid(NANOS_PER_DAY);
    let (start_day, end_day) = match period {
        Period::Day => (day, day + 1),
        Period::Week(first) => {
            let back =
                (weekday_of(day).days_from_monday() - first.days_from_monday()).rem_euclid(7);
            (day - back, day - back + 7)
        }
        Period::Month => {
            let d = Date::from_days(day);
            let start = Date::new_unchecked(d.year, d.month, 1).days();
            let (ny, nm) = if d.month == 12 {
                (d.year + 1, 1)
            } else {
                (d.year, d.month + 1)
            };
            (start, Date::new_unchecked(ny, nm, 1).days())
        }
    };
    Window {
        start: start_day.saturating_mul(NANOS_PER_DAY),
        end: end_day.saturating_mul(NANOS_PER_DAY),
    }
}

/// The weekday of a day number (days since 1970-01-01, a Thursday).
pub(crate) fn weekday_of(day: i64) -> Weekday {
    Weekday::from_days_from_monday(day + 3)
}

/// A UTC calendar date.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    year: i32,
    month: u8,
    day: u8,
}

impl Date {
    /// The date, if it exists (e.g. not February 30th).
    pub fn new(year: i32, month: u8, day: u8) -> Option<Date> {
        ((1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month))
            .then_some(Date { year, month, day })
    }

    const fn new_unchecked(year: i32, month: u8, day: u8) -> Date {
        Date { year, month, day }
    }

    /// The year.
    pub fn year(&self) -> i32 {
        self.year
    }

    /// The month, 1 to 12.
    pub fn month(&self) -> u8 {
        self.month
    }

    /// The day of the month, from 1.
    pub fn day(&self) -> u8 {
        self.day
    }

    /// Days since 1970-01-01 (negative before).
    pub fn days(&self) -> i64 {
        // Howard Hinnant's days_from_civil.
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let m = i64::from(self.month);
        let d = i64::from(self.day);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date of a day number (days since 1970-01-01).
    pub fn from_days(z: i64) -> Date {
        // Howard Hinnant's civil_from_days.
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Date {
            year: year.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
            month,
            day,
        }
    }

    /// The date of an instant (nanoseconds since the Unix epoch).
    pub(crate) fn of_nanos(t: i64) -> Date {
        Date::from_days(t.div_euclid(NANOS_PER_DAY))
    }

    /// The next day.
    pub fn succ(&self) -> Date {
        Date::from_days(self.days() + 1)
    }

    /// Parses `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Date> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            b[r].iter().try_fold(0u32, |acc, &c| {
                c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
            })
        };
        Date::new(num(0..4)? as i32, num(5..7)? as u8, num(8..10)? as u8)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl fmt::Debug for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const S: i64 = 1_000_000_000;

    fn at(y: i32, m: u8, d: u8, h: i64, min: i64, s: i64) -> i64 {
        Date::new(y, m, d).unwrap().days() * NANOS_PER_DAY + (h * 3600 + min * 60 + s) * S
    }

    fn date_of(t: i64) -> String {
        Date::of_nanos(t).to_string()
    }

    #[test]
    fn known_dates() {
        assert_eq!(Date::new(1970, 1, 1).unwrap().days(), 0);
        assert_eq!(Date::new(2000, 3, 1).unwrap().days(), 11_017);
        assert_eq!(Date::from_days(19_723).to_string(), "2024-01-01");
        assert_eq!(weekday_of(0), Weekday::Thursday);
        assert_eq!(
            weekday_of(Date::new(2024, 1, 1).unwrap().days()),
            Weekday::Monday
        );
        assert_eq!(Date::new(2023, 2, 29), None);
        assert!(Date::new(2024, 2, 29).is_some());
        assert!(Date::new(2000, 2, 29).is_some());
        assert_eq!(Date::new(1900, 2, 29), None);
        assert_eq!(Date::parse("2024-02-29"), Date::new(2024, 2, 29));
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-1-01",
            "2024/01/01",
            "abcd-ef-gh",
            "",
        ] {
            assert_eq!(Date::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn day_window_resets_at_midnight_not_a_nanosecond_before() {
        let midnight = at(2024, 3, 10, 0, 0, 0);
        let w = window(Period::Day, midnight - 1);
        assert_eq!(w.end, midnight);
        assert_eq!(window(Period::Day, midnight).start, midnight);
        assert_eq!(date_of(w.start), "2024-03-09");
    }

    #[test]
    fn week_windows_start_on_the_configured_day() {
        // 2024-01-03 is a Wednesday.
        let wed = at(2024, 1, 3, 12, 0, 0);
        let w = window(Period::WEEK, wed);
        assert_eq!(
            (date_of(w.start), date_of(w.end)),
            ("2024-01-01".into(), "2024-01-08".into())
        );
        let w = window(Period::Week(Weekday::Sunday), wed);
        assert_eq!(
            (date_of(w.start), date_of(w.end)),
            ("2023-12-31".into(), "2024-01-07".into())
        );
        let w = window(Period::Week(Weekday::Wednesday), wed);
        assert_eq!(w.start, at(2024, 1, 3, 0, 0, 0));
        // Across a year end.
        let w = window(Period::WEEK, at(2026, 1, 1, 0, 0, 0));
        assert_eq!(
            (date_of(w.start), date_of(w.end)),
            ("2025-12-29".into(), "2026-01-05".into())
        );
    }

    #[test]
    fn month_windows_at_month_and_year_ends_and_leap_years() {
        let w = window(Period::Month, at(2024, 2, 29, 23, 59, 59));
        assert_eq!(
            (date_of(w.start), date_of(w.end)),
            ("2024-02-01".into(), "2024-03-01".into())
        );
        assert_eq!(w.end - w.start, 29 * NANOS_PER_DAY);
        let w = window(Period::Month, at(2023, 2, 15, 0, 0, 0));
        assert_eq!(w.end - w.start, 28 * NANOS_PER_DAY);
        let w = window(Period::Month, at(2100, 2, 1, 0, 0, 0));
        assert_eq!(
            w.end - w.start,
            28 * NANOS_PER_DAY,
            "2100 is not a leap year"
        );
        let w = window(Period::Month, at(2024, 12, 31, 23, 59, 59));
        assert_eq!(
            (date_of(w.start), date_of(w.end)),
            ("2024-12-01".into(), "2025-01-01".into())
        );
        let end = at(2025, 1, 1, 0, 0, 0);
        assert_eq!(window(Period::Month, end - 1).end, end);
        assert_eq!(window(Period::Month, end).start, end);
    }

    fn period() -> impl Strategy<Value = Period> {
        prop_oneof![
            Just(Period::Day),
            Just(Period::Month),
            (0i64..7).prop_map(|d| Period::Week(Weekday::from_days_from_monday(d))),
        ]
    }

    // Instants between 1900 and 2200.
    const RANGE: std::ops::Range<i64> = -2_208_988_800 * S..7_258_118_400 * S;

    proptest! {
        #[test]
        fn every_instant_lies_in_exactly_one_window(p in period(), t in RANGE) {
            let w = window(p, t);
            prop_assert!(w.start <= t && t < w.end);
            // The windows next to it tile time without gaps or overlap.
            prop_assert_eq!(window(p, w.end).start, w.end);
            prop_assert_eq!(window(p, w.start - 1).end, w.start);
            prop_assert_eq!(window(p, w.start), w);
            prop_assert_eq!(window(p, w.end - 1), w);
            // Windows start at midnight, and weeks on their day.
            prop_assert_eq!(w.start.rem_euclid(NANOS_PER_DAY), 0);
            match p {
                Period::Day => prop_assert_eq!(w.end - w.start, NANOS_PER_DAY),
                Period::Week(first) => {
                    prop_assert_eq!(w.end - w.start, 7 * NANOS_PER_DAY);
                    prop_assert_eq!(weekday_of(w.start / NANOS_PER_DAY), first);
                }
                Period::Month => {
                    let d = Date::of_nanos(w.start);
                    prop_assert_eq!(d.day(), 1);
                    let days = (w.end - w.start) / NANOS_PER_DAY;
                    prop_assert_eq!(days, i64::from(days_in_month(d.year(), d.month())));
                }
            }
        }

        #[test]
        fn dates_round_trip(day in -200_000i64..200_000) {
            let d = Date::from_days(day);
            prop_assert_eq!(d.days(), day);
            prop_assert_eq!(Date::new(d.year(), d.month(), d.day()), Some(d));
            prop_assert_eq!(Date::parse(&d.to_string()).filter(|_| d.year() >= 0 && d.year() < 10_000), (d.year() >= 0 && d.year() < 10_000).then_some(d));
        }
    }
}
