//! Quota counting: the count of a calendar window and a bounded daily usage
//! history, as pure functions of (state, now, cost).
//!
//! A [`QuotaState`] holds the count of the current window and one record per
//! UTC day for the last `history_days` days (for usage reports). It reads no
//! clock and takes no lock: the store that owns it decides where it lives
//! and how it is guarded.

use crate::window::{NANOS_PER_DAY, Period, Window, window};

/// A quota's parameters as the decision uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuotaSpec {
    pub(crate) limit: u64,
    pub(crate) period: Period,
    pub(crate) offset: u64,
    /// When the plan was created (wall nanoseconds): the window holding this
    /// instant has `offset` fewer requests, as AWS API Gateway's `offset`.
    pub(crate) created_at: i64,
    /// Which quota of its plan this is (the same in every process): with the
    /// subject, it names the state a store keeps.
    pub(crate) salt: u64,
}

impl QuotaSpec {
    /// The limit of window `w`.
    pub(crate) fn limit_in(&self, w: Window) -> i64 {
        let limit = i64::try_from(self.limit).unwrap_or(i64::MAX);
        if w.start <= self.created_at && self.created_at < w.end {
            limit.saturating_sub(i64::try_from(self.offset).unwrap_or(i64::MAX))
        } else {
            limit
        }
    }
}

/// How a quota stands after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuotaSnapshot {
    /// The window's limit.
    pub(crate) limit: i64,
    /// What is left in the window (never below 0).
    pub(crate) remaining: u64,
    /// Nanoseconds until the window ends.
    pub(crate) reset: u64,
    /// The window's length in seconds.
    pub(crate) window_secs: u64,
}

/// What one key used on one UTC day.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DayRecord {
    /// Day number (days since 1970-01-01); `i64::MIN` for none.
    pub(crate) day: i64,
    pub(crate) used: u64,
    /// What remained in the quota window at the day's last change.
    pub(crate) remaining: i64,
}

const NO_DAY: DayRecord = DayRecord {
    day: i64::MIN,
    used: 0,
    remaining: 0,
};

/// The counters of one quota of one subject: what the store keeps.
#[derive(Debug)]
pub(crate) struct QuotaState {
    /// Start of the window `used` counts in (`i64::MIN` before any request).
    window_start: i64,
    /// The end of that window and the period it was taken under, so that a
    /// decision inside it needs no calendar arithmetic.
    window_end: i64,
    period: Option<Period>,
    used: i64,
    days: Box<[DayRecord]>,
}

impl QuotaState {
    /// A quota never used, keeping `history_days` days of usage (at least 1).
    pub(crate) fn new(history_days: usize) -> Self {
        QuotaState {
            window_start: i64::MIN,
            window_end: i64::MIN,
            period: None,
            used: 0,
            days: vec![NO_DAY; history_days.max(1)].into_boxed_slice(),
        }
    }

    /// Whether the state keeps usage history beyond the current day (for
    /// usage reports).
    pub(crate) fn keeps_history(&self) -> bool {
        self.days.len() > 1
    }

    /// When the state holds nothing a fresh one would not: the end of the
    /// window it counts in (`i64::MIN` before any request).
    pub(crate) fn idle_at(&self) -> i64 {
        self.window_end
    }

    /// Whether the state holds nothing a fresh one would not at `now`.
    pub(crate) fn idle(&self, now: i64) -> bool {
        self.window_end <= now
    }

    /// Charges `cost` if it fits in the current window; `force` charges even
    /// when it does not (shadow plans count their overage). Returns the quota
    /// after the decision, or the retry delay and the unchanged quota.
    pub(crate) fn acquire(
        &mut self,
        spec: &QuotaSpec,
        now: i64,
        cost: u64,
        force: bool,
    ) -> Result<QuotaSnapshot, (u64, QuotaSnapshot)> {
        let w = self.roll(spec.period, now);
        let limit = spec.limit_in(w);
        let cost_i = i64::try_from(cost).unwrap_or(i64::MAX);
        if self.used.saturating_add(cost_i) > limit && !force {
            let snap = snapshot(w, limit, self.used, now);
            return Err((w.end.saturating_sub(now).max(1) as u64, snap));
        }
        self.used = self.used.saturating_add(cost_i);
        let remaining = limit.saturating_sub(self.used);
        self.record(now, |r| {
            r.used = r.used.saturating_add(cost);
            r.remaining = remaining;
        });
        Ok(snapshot(w, limit, self.used, now))
    }

    /// Whether `cost` would fit now, without charging: the quota as it stands,
    /// or the retry delay and the quota when it would not fit.
    pub(crate) fn check(
        &mut self,
        spec: &QuotaSpec,
        now: i64,
        cost: u64,
    ) -> Result<QuotaSnapshot, (u64, QuotaSnapshot)> {
        let w = self.roll(spec.period, now);
        let limit = spec.limit_in(w);
        let snap = snapshot(w, limit, self.used, now);
        if self
            .used
            .saturating_add(i64::try_from(cost).unwrap_or(i64::MAX))
            > limit
        {
            Err((w.end.saturating_sub(now).max(1) as u64, snap))
        } else {
            Ok(snap)
        }
    }

    /// Sets what remains in the current window (AWS UpdateUsage). `remaining`
    /// may exceed the limit (a one-off raise) or be 0.
    pub(crate) fn set_remaining(
        &mut self,
        spec: &QuotaSpec,
        now: i64,
        remaining: i64,
    ) -> QuotaSnapshot {
        let w = self.roll(spec.period, now);
        let limit = spec.limit_in(w);
        self.used = limit.saturating_sub(remaining);
        self.record(now, |r| r.remaining = remaining);
        snapshot(w, limit, self.used, now)
    }

    /// Lowers what remains in the current window to `remaining` if more
    /// remains (a copy of the quota learning how a shared count stands).
    #[cfg(feature = "redis")]
    pub(crate) fn at_most(&mut self, spec: &QuotaSpec, now: i64, remaining: i64) {
        let w = self.roll(spec.period, now);
        let limit = spec.limit_in(w);
        self.used = self.used.max(limit.saturating_sub(remaining));
    }

    /// Adjusts the count by a request's actual cost: `delta` units more (an
    /// under-estimate, charged even past the limit: the window is in debt)
    /// or fewer (an over-estimate, given back, never below zero). An
    /// over-estimate comes back only to the window it was charged in, at
    /// `charged_at`: a later window never counted it (`None`: it was not
    /// charged).
    pub(crate) fn adjust(
        &mut self,
        spec: &QuotaSpec,
        now: i64,
        delta: i64,
        charged_at: Option<i64>,
    ) {
        let w = self.roll(spec.period, now);
        if delta < 0 && charged_at.is_none_or(|t| t < w.start) {
            return;
        }
        let limit = spec.limit_in(w);
        self.used = self.used.saturating_add(delta).max(0);
        let remaining = limit.saturating_sub(self.used);
        self.record(now, |r| {
            r.used = r.used.saturating_add_signed(delta);
            r.remaining = remaining;
        });
    }

    /// Forgets the current window's count and the history.
    pub(crate) fn reset(&mut self) {
        self.window_start = i64::MIN;
        self.window_end = i64::MIN;
        self.period = None;
        self.used = 0;
        self.days.fill(NO_DAY);
    }

    /// `[used, remaining]` for each day from `first` to `last` (day numbers,
    /// inclusive), as AWS GetUsage reports them.
    pub(crate) fn report(&self, spec: &QuotaSpec, first: i64, last: i64) -> Vec<[i64; 2]> {
        report(spec, &self.days, first, last)
    }
}

/// `[used, remaining]` for each day from `first` to `last` (day numbers,
/// inclusive) from the day records `days`, as AWS GetUsage reports them. Days
/// without a record report nothing used and what remained after the latest
/// change earlier in the same window (the window's limit if none).
pub(crate) fn report(spec: &QuotaSpec, days: &[DayRecord], first: i64, last: i64) -> Vec<[i64; 2]> {
    (first..=last)
        .map(|day| {
            let w = window(spec.period, day.saturating_mul(NANOS_PER_DAY));
            let used = days
                .iter()
                .find(|r| r.day == day)
                .map_or(0, |r| i64::try_from(r.used).unwrap_or(i64::MAX));
            let remaining = days
                .iter()
                .filter(|r| r.day <= day && r.day >= w.start.div_euclid(NANOS_PER_DAY))
                .max_by_key(|r| r.day)
                .map_or_else(|| spec.limit_in(w), |r| r.remaining);
            [used, remaining.max(0)]
        })
        .collect()
}

impl QuotaState {
    /// Moves to the window of `now` when it is a later one. A clock that went
    /// back into an earlier window keeps the current count: going back in time
    /// never grants capacity.
    fn roll(&mut self, period: Period, now: i64) -> Window {
        // Still inside the window (or back before it): nothing to compute.
        if self.period == Some(period) && now < self.window_end {
            return Window {
                start: self.window_start,
                end: self.window_end,
            };
        }
        let w = window(period, now);
        let w = if w.start > self.window_start {
            self.window_start = w.start;
            self.used = 0;
            w
        } else {
            window(period, self.window_start)
        };
        self.window_end = w.end;
        self.period = Some(period);
        w
    }

    fn record(&mut self, now: i64, f: impl FnOnce(&mut DayRecord)) {
        let day = now.div_euclid(NANOS_PER_DAY);
        let len = self.days.len() as i64;
        let r = &mut self.days[day.rem_euclid(len) as usize];
        if r.day != day {
            if r.day > day {
                // The clock went back by a whole history: keep the newer record.
                return;
            }
            *r = DayRecord {
                day,
                used: 0,
                remaining: 0,
            };
        }
        f(r);
    }
}

fn snapshot(w: Window, limit: i64, used: i64, now: i64) -> QuotaSnapshot {
    QuotaSnapshot {
        limit,
        remaining: limit.saturating_sub(used).max(0) as u64,
        reset: w.end.saturating_sub(now).max(0) as u64,
        window_secs: (w.end.saturating_sub(w.start) / 1_000_000_000) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Date;

    const S: i64 = 1_000_000_000;

    fn t(y: i32, m: u8, d: u8, secs: i64) -> i64 {
        Date::new(y, m, d).unwrap().days() * NANOS_PER_DAY + secs * S
    }

    fn spec(limit: u64, period: Period) -> QuotaSpec {
        QuotaSpec {
            limit,
            period,
            offset: 0,
            created_at: 0,
            salt: 0,
        }
    }

    #[test]
    fn day_quota_resets_at_midnight_and_not_a_nanosecond_before() {
        let mut q = QuotaState::new(31);
        let s = spec(3, Period::Day);
        let morning = t(2024, 5, 1, 8 * 3600);
        for _ in 0..3 {
            assert!(q.acquire(&s, morning, 1, false).is_ok());
        }
        let midnight = t(2024, 5, 2, 0);
        let (retry, snap) = q.acquire(&s, midnight - 1, 1, false).unwrap_err();
        assert_eq!(retry, 1);
        assert_eq!(snap.remaining, 0);
        let snap = q.acquire(&s, midnight, 1, false).unwrap();
        assert_eq!(snap.remaining, 2);
        assert_eq!(snap.reset, NANOS_PER_DAY as u64);
    }

    #[test]
    fn month_quota_on_feb_29_of_a_leap_year() {
        let mut q = QuotaState::new(62);
        let s = spec(1, Period::Month);
        assert!(q.acquire(&s, t(2024, 2, 29, 0), 1, false).is_ok());
        let (retry, _) = q.acquire(&s, t(2024, 2, 29, 86_399), 1, false).unwrap_err();
        assert_eq!(retry, S as u64);
        assert!(q.acquire(&s, t(2024, 3, 1, 0), 1, false).is_ok());
    }

    #[test]
    fn offset_applies_to_the_creation_window_only() {
        let mut q = QuotaState::new(31);
        let s = QuotaSpec {
            limit: 5,
            period: Period::Day,
            offset: 3,
            created_at: t(2024, 5, 1, 100),
            salt: 0,
        };
        let ok = (0..10)
            .filter(|_| q.acquire(&s, t(2024, 5, 1, 200), 1, false).is_ok())
            .count();
        assert_eq!(ok, 2);
        let ok = (0..10)
            .filter(|_| q.acquire(&s, t(2024, 5, 2, 0), 1, false).is_ok())
            .count();
        assert_eq!(ok, 5);
    }

    #[test]
    fn clock_going_back_keeps_the_count() {
        let mut q = QuotaState::new(31);
        let s = spec(2, Period::Day);
        assert!(q.acquire(&s, t(2024, 5, 2, 10), 2, false).is_ok());
        assert!(q.acquire(&s, t(2024, 5, 1, 86_000), 1, false).is_err());
    }

    #[test]
    fn set_remaining_and_report() {
        let mut q = QuotaState::new(7);
        let s = spec(10, Period::WEEK);
        // 2024-05-06 is a Monday.
        let mon = t(2024, 5, 6, 3600);
        q.acquire(&s, mon, 3, false).unwrap();
        let tue = t(2024, 5, 7, 3600);
        q.acquire(&s, tue, 2, false).unwrap();
        let first = Date::new(2024, 5, 5).unwrap().days();
        let last = Date::new(2024, 5, 8).unwrap().days();
        // Sunday is in the previous week (full limit), then Monday, Tuesday, Wednesday.
        assert_eq!(
            q.report(&s, first, last),
            vec![[0, 10], [3, 7], [2, 5], [0, 5]]
        );
        let snap = q.set_remaining(&s, tue, 20);
        assert_eq!(snap.remaining, 20);
        assert_eq!(q.report(&s, last - 1, last - 1), vec![[2, 20]]);
        let ok = (0..30)
            .filter(|_| q.acquire(&s, tue, 1, false).is_ok())
            .count();
        assert_eq!(ok, 20);
        q.set_remaining(&s, tue, 0);
        assert!(q.acquire(&s, tue, 1, false).is_err());
        q.reset();
        assert!(q.acquire(&s, tue, 1, false).is_ok());
    }

    #[test]
    fn force_counts_the_overage() {
        let mut q = QuotaState::new(1);
        let s = spec(1, Period::Day);
        let now = t(2024, 1, 1, 0);
        q.acquire(&s, now, 1, false).unwrap();
        let snap = q.acquire(&s, now, 1, true).unwrap();
        assert_eq!(snap.remaining, 0);
        let day = now / NANOS_PER_DAY;
        assert_eq!(q.report(&s, day, day), vec![[2, 0]]);
    }
}
