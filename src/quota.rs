//! Quota counting: the count of a calendar window and a bounded daily usage
//! history, as pure functions of (state, now, cost).
//!
//! A [`Count`] is the count of the current window, small enough for one
//! 128-bit atomic word, with the day of its last change; [`DayRecord`]s are
//! what each UTC day used, kept by the store for the last `history_days`
//! days (for usage reports). Nothing here reads a clock or takes a lock: the
//! store that owns the state decides where it lives and how it is guarded.
//!
//! The day history is written only when a day is *closed*: the first change
//! on a later day (or in a later window) writes the record of the day of
//! the change before it, what that day used (the window's count then, less
//! what the window had counted when the day began: the *base*) and what
//! remained. A decision on the same day as the last change touches the count
//! alone, so a store can make it one compare-and-swap.

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

    /// How the quota stands at `now` (wall nanoseconds) with nothing used
    /// in its window: its limit and window as any count of it reports them
    /// then, without reading a count.
    pub(crate) fn unused_at(&self, now: i64) -> QuotaSnapshot {
        let w = window(self.period, now);
        snapshot(w, self.limit_in(w), 0, now)
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DayRecord {
    /// Day number (days since 1970-01-01); `i64::MIN` for none.
    pub(crate) day: i64,
    pub(crate) used: u64,
    /// What remained in the quota window at the day's last change.
    pub(crate) remaining: i64,
}

pub(crate) const NO_DAY: DayRecord = DayRecord {
    day: i64::MIN,
    used: 0,
    remaining: 0,
};

/// The count of one quota of one subject in its window: what two words of a
/// store hold, the window ([`Count::window_word`]) and the count, so that a
/// decision in the window and on the day of the last change is one
/// compare-and-swap of the count.
///
/// Windows start and end at UTC midnights, so the window is kept as days:
/// its first day, its length, and which period it was taken under (a plan
/// whose period changes rolls its count as the period says). The day of the
/// last change is kept too: a change on a later day *closes* the day before
/// (its usage goes into the day history), which is what lets a decision on
/// the same day leave the history alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Count {
    /// The window's first day (days since 1970-01-01).
    start: i32,
    /// Days in the window (1, 7, or 28 to 31).
    len: u8,
    /// The period the window was taken under ([`period_code`]); [`NONE`]
    /// before any change, [`RETIRED`] once the store let the count go.
    period: u8,
    /// The day of the last change, in days since `start`.
    last: u8,
    /// Units counted in the window (below 0 after a raise by UpdateUsage).
    pub(crate) used: i64,
}

/// A count never changed (or reset).
const NONE: u8 = 0;
/// A count its store let go (an idle counter evicted): whoever finds it
/// looks the counter up again.
const RETIRED: u8 = 0xff;

/// The code of a period in a packed [`Count`]: 1 for a day, 2 to 8 for a
/// week from Monday to Sunday, 9 for a month.
#[inline]
pub(crate) fn period_code(period: Period) -> u8 {
    match period {
        Period::Day => 1,
        Period::Week(first) => 2 + first.days_from_monday() as u8,
        Period::Month => 9,
    }
}

/// The day number of `now`.
#[inline]
pub(crate) fn day_of(now: i64) -> i64 {
    now.div_euclid(NANOS_PER_DAY)
}

/// What a change found on a count whose window or day had moved on: the
/// record of the day it closed, and the count the new day starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rolled {
    /// The count in the window of `now`, its last change on `now`'s day.
    pub(crate) count: Count,
    /// The usage of the day of the previous change, if this change is on a
    /// later day (or in a later window): it goes into the day history.
    pub(crate) closed: Option<DayRecord>,
    /// What the window had counted when this day began (see
    /// [`Count::day_used`]).
    pub(crate) base: i64,
}

impl Count {
    /// No change yet.
    pub(crate) const EMPTY: Count = Count {
        start: 0,
        len: 0,
        period: NONE,
        last: 0,
        used: 0,
    };

    /// The mark of a count its store let go.
    pub(crate) const RETIRED: Count = Count {
        start: 0,
        len: 0,
        period: RETIRED,
        last: 0,
        used: 0,
    };

    /// Everything but the count, as one word: the window, its period and
    /// the day of the last change (a store keeps it beside the count, which
    /// a decision changes alone).
    #[inline]
    pub(crate) fn window_word(self) -> u64 {
        u64::from(self.start as u32)
            | u64::from(self.len) << 32
            | u64::from(self.period) << 40
            | u64::from(self.last) << 48
    }

    /// The count of a [`window_word`](Self::window_word) and `used`.
    #[inline]
    pub(crate) fn from_words(window: u64, used: i64) -> Count {
        Count {
            start: window as u32 as i32,
            len: (window >> 32) as u8,
            period: (window >> 40) as u8,
            last: (window >> 48) as u8,
            used,
        }
    }

    /// Whether the store let the count go.
    #[inline]
    pub(crate) fn is_retired(self) -> bool {
        self.period == RETIRED
    }

    /// Whether the count was ever changed since it was made or reset.
    #[inline]
    pub(crate) fn is_empty(self) -> bool {
        self.period == NONE
    }

    /// The window, in nanoseconds.
    #[inline]
    fn window(self) -> Window {
        let start = i64::from(self.start);
        Window {
            start: start.saturating_mul(NANOS_PER_DAY),
            end: (start + i64::from(self.len)).saturating_mul(NANOS_PER_DAY),
        }
    }

    /// Whether the day of the last change is over at `now`: the next
    /// change would close it into the history.
    pub(crate) fn day_over(self, now: i64) -> bool {
        !self.is_empty() && !self.is_retired() && day_of(now) > self.last_day()
    }

    /// The day of the last change.
    #[inline]
    pub(crate) fn last_day(self) -> i64 {
        i64::from(self.start) + i64::from(self.last)
    }

    /// When the count holds nothing a fresh one would not (wall
    /// nanoseconds): the end of its window (`i64::MIN` before any change).
    pub(crate) fn idle_at(self) -> i64 {
        if self.is_empty() || self.is_retired() {
            i64::MIN
        } else {
            self.window().end
        }
    }

    /// A count of nothing in window `w`, changed last on `today`.
    fn fresh(period: Period, w: Window, today: i64) -> Count {
        let start = day_of(w.start);
        Count {
            start: start as i32,
            len: (day_of(w.end) - start) as u8,
            period: period_code(period),
            last: (today - start).clamp(0, u8::MAX.into()) as u8,
            used: 0,
        }
    }

    /// Charges `cost` at `now` if the window and the day of the last change
    /// are `now`'s and it fits: the decision a store makes without a lock.
    /// `None` when the window or the day has moved on (or the count is
    /// empty or retired): [`roll`](Self::roll) first, under the store's lock.
    #[inline]
    pub(crate) fn acquire_today(
        self,
        spec: &QuotaSpec,
        now: i64,
        cost: u64,
        force: bool,
    ) -> Option<Result<Count, (u64, Count)>> {
        if self.period != period_code(spec.period) || day_of(now) != self.last_day() {
            return None;
        }
        Some(self.acquire(spec, now, cost, force))
    }

    /// Moves the count to `now`: into the window of `now` when it is a later
    /// one (counting from 0), and its last change to `now`'s day when that is
    /// later, closing the day of the previous change. `base` is what the
    /// window had counted when the day of the previous change began.
    ///
    /// A clock that went back keeps the count and its day: going back in
    /// time never grants capacity, and what is charged then is counted on
    /// the latest day seen.
    pub(crate) fn roll(self, spec: &QuotaSpec, now: i64, base: i64) -> Rolled {
        let today = day_of(now);
        let period = spec.period;
        let new_window = |w: Window| Rolled {
            count: Count::fresh(period, w, today),
            closed: self.today(spec, base),
            base: 0,
        };
        if self.is_empty() || self.is_retired() {
            return Rolled {
                count: Count::fresh(period, window(period, now), today),
                closed: None,
                base: 0,
            };
        }
        let mut count = self;
        if self.period != period_code(period) {
            // The plan's period changed (a week's first day among them): a
            // window of the new period that began after the day of the last
            // change starts from 0, as a later window does; one that holds
            // that day keeps the count, in the window holding it. What of
            // the count came before that window began is not known, so all
            // of it counts there: a window of the new period never admits
            // more than its limit. A week moved from Monday to Wednesday on
            // a Thursday: a key last charged on the Tuesday has a fresh
            // week, one that used its quota up on the Wednesday waits for
            // the next Wednesday.
            let w = window(period, now);
            let last = self.last_day().saturating_mul(NANOS_PER_DAY);
            if w.start > last {
                return new_window(w);
            }
            let kept = Count::fresh(period, window(period, last), today);
            count = Count {
                used: self.used,
                last: (self.last_day() - i64::from(kept.start)).clamp(0, u8::MAX.into()) as u8,
                ..kept
            };
        }
        let w = count.window();
        if now >= w.end {
            return new_window(window(period, now));
        }
        if today > count.last_day() && now >= w.start {
            return Rolled {
                count: Count {
                    last: (today - i64::from(count.start)) as u8,
                    ..count
                },
                closed: self.today(spec, base),
                base: self.used,
            };
        }
        Rolled {
            count,
            closed: None,
            base,
        }
    }

    /// The record of the day of the last change, as it stands under
    /// `spec`: what remains in the window of `spec`'s period holding that
    /// day, with the count in it (as the next request finds it on that day,
    /// whatever period the count was taken under).
    fn close(self, spec: &QuotaSpec) -> Option<DayRecord> {
        (!self.is_empty() && !self.is_retired()).then(|| DayRecord {
            day: self.last_day(),
            used: 0,
            remaining: limit_on(spec, self.last_day()).saturating_sub(self.used),
        })
    }

    /// What the day of the last change used, given what the window had
    /// counted when it began.
    pub(crate) fn day_used(self, base: i64) -> u64 {
        self.used.saturating_sub(base).max(0) as u64
    }

    /// The record of the day of the last change (for usage reports), given
    /// what the window had counted when it began.
    pub(crate) fn today(self, spec: &QuotaSpec, base: i64) -> Option<DayRecord> {
        self.close(spec).map(|r| DayRecord {
            used: self.day_used(base),
            ..r
        })
    }

    /// Charges `cost` if it fits in the window; `force` charges even when it
    /// does not (shadow plans count their overage). Returns the count after
    /// the decision, or the retry delay and the count as it stands (the
    /// quota they describe is their [`snapshot`](Self::snapshot), made only
    /// when someone reads it).
    #[inline]
    pub(crate) fn acquire(
        self,
        spec: &QuotaSpec,
        now: i64,
        cost: u64,
        force: bool,
    ) -> Result<Count, (u64, Count)> {
        let used = self
            .used
            .saturating_add(i64::try_from(cost).unwrap_or(i64::MAX));
        // Only the window of the quota's creation has another limit: without
        // an offset, a charge that fits needs no window.
        let limit = match spec.offset {
            0 => i64::try_from(spec.limit).unwrap_or(i64::MAX),
            _ => spec.limit_in(self.window()),
        };
        if used > limit && !force {
            let w = self.window();
            return Err((w.end.saturating_sub(now).max(1) as u64, self));
        }
        Ok(Count { used, ..self })
    }

    /// How the quota stands at `now` with this count.
    pub(crate) fn snapshot(self, spec: &QuotaSpec, now: i64) -> QuotaSnapshot {
        let w = self.window();
        snapshot(w, spec.limit_in(w), self.used, now)
    }

    /// Whether `cost` would fit now, without charging: the quota as it
    /// stands, or the retry delay and the quota when it would not fit.
    pub(crate) fn check(
        self,
        spec: &QuotaSpec,
        now: i64,
        cost: u64,
    ) -> Result<QuotaSnapshot, (u64, QuotaSnapshot)> {
        let count = self.roll(spec, now, 0).count;
        match count.acquire(spec, now, cost, false) {
            Ok(_) => Ok(count.snapshot(spec, now)),
            Err((retry, _)) => Err((retry, count.snapshot(spec, now))),
        }
    }

    /// Sets what remains in the window (AWS UpdateUsage). `remaining` may
    /// exceed the limit (a one-off raise) or be 0.
    pub(crate) fn set_remaining(
        self,
        spec: &QuotaSpec,
        now: i64,
        remaining: i64,
    ) -> (Count, QuotaSnapshot) {
        let w = self.window();
        let limit = spec.limit_in(w);
        let used = limit.saturating_sub(remaining);
        (Count { used, ..self }, snapshot(w, limit, used, now))
    }

    /// Lowers what remains in the window to `remaining` if more remains (a
    /// copy of the quota learning how a shared count stands).
    #[cfg(feature = "redis")]
    pub(crate) fn at_most(self, spec: &QuotaSpec, remaining: i64) -> Count {
        let limit = spec.limit_in(self.window());
        Count {
            used: self.used.max(limit.saturating_sub(remaining)),
            ..self
        }
    }

    /// Gives back `cost` units that a decision charged at `charged_at` and
    /// a later limit then denied: the exact inverse of the charge, so the
    /// count is what it would have been without the decision. Not held at
    /// zero, as [`adjust`](Self::adjust) is: a count below zero after a
    /// raise by UpdateUsage goes back below zero, or the denial would take
    /// the raise away. Charges and give-backs only add to the count, so
    /// decisions charging and giving back at once sum to the same count in
    /// any order. `None` when the window began after `charged_at`: it never
    /// counted the charge; and for a cost of 0 (a peek): nothing was
    /// charged, so nothing changes, not even the day of the last change a
    /// store would move the count to (a period put anew carries the count
    /// into the window holding the day of its last real change).
    #[inline]
    pub(crate) fn give_back(self, cost: u64, charged_at: i64) -> Option<Count> {
        if cost == 0 || charged_at < self.window().start {
            return None;
        }
        Some(Count {
            used: self
                .used
                .saturating_sub(i64::try_from(cost).unwrap_or(i64::MAX)),
            ..self
        })
    }

    /// Adjusts the count by a request's actual cost: `delta` units more (an
    /// under-estimate, charged even past the limit: the window is in debt)
    /// or fewer (an over-estimate, given back, never below zero). An
    /// over-estimate comes back only to the window it was charged in, at
    /// `charged_at`: a later window never counted it (`None`: it was not
    /// charged). `None` when nothing changes.
    pub(crate) fn adjust(self, delta: i64, charged_at: Option<i64>) -> Option<Count> {
        if delta < 0 && charged_at.is_none_or(|t| t < self.window().start) {
            return None;
        }
        Some(Count {
            used: self.used.saturating_add(delta).max(0),
            ..self
        })
    }
}

/// A quota's numbers (its period among them) before they were changed on
/// `day` (the day's first change while serving,
/// [`Store::requota`](crate::store::Store::requota)), as a store logs them
/// for usage reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Logged {
    pub(crate) day: i64,
    pub(crate) spec: QuotaSpec,
}

/// The numbers in force at the end of `day`: those logged before the first
/// change after it (`log` sorted by day), or now's.
pub(crate) fn in_force<'a>(log: &'a [Logged], now: &'a QuotaSpec, day: i64) -> &'a QuotaSpec {
    log.iter().find(|l| l.day > day).map_or(now, |l| &l.spec)
}

/// The limit of the window of `spec`'s period holding `day`.
pub(crate) fn limit_on(spec: &QuotaSpec, day: i64) -> i64 {
    spec.limit_in(window(spec.period, day.saturating_mul(NANOS_PER_DAY)))
}

/// Adds to `days` (each a day's record under the numbers in force at its
/// end) a record for each day up to `today` a change was logged on (`log`,
/// sorted by day) after a record and without one of its own: nothing used,
/// and what the next request found after the change. That is the limit of
/// the window then less the count of the latest day with a record, when
/// the window of the period then holds that day (a decision carries the
/// count as far as that, whatever the periods between), or less nothing.
/// So a report reads the day of a change as it read then, the days before
/// it under their own numbers and period, on every store alike.
pub(crate) fn add_changes(days: &mut Vec<DayRecord>, log: &[Logged], now: &QuotaSpec, today: i64) {
    let written = days.len();
    for change in log.iter().filter(|l| l.day <= today) {
        if days.iter().any(|r| r.day == change.day) {
            continue;
        }
        let Some(before) = days[..written]
            .iter()
            .filter(|r| r.day < change.day)
            .max_by_key(|r| r.day)
            .copied()
        else {
            continue;
        };
        let then = in_force(log, now, change.day);
        let w = window(then.period, change.day.saturating_mul(NANOS_PER_DAY));
        let count = if before.day >= day_of(w.start) {
            limit_on(in_force(log, now, before.day), before.day).saturating_sub(before.remaining)
        } else {
            0
        };
        days.push(DayRecord {
            day: change.day,
            used: 0,
            remaining: limit_on(then, change.day).saturating_sub(count),
        });
    }
}

/// `[used, remaining]` for each day from `first` to `last` (day numbers,
/// inclusive) from the day records `days`, as AWS GetUsage reports them. Days
/// without a record report nothing used and what remained after the latest
/// change earlier in the same window; with none, the window's limit, both
/// under the numbers (and period) in force at the day's end (`log`, sorted
/// by day: the quota's numbers before each change; `spec`, now's). So a
/// record of nothing used that opened a window (a charge a later limit
/// denied, given back) reads as no record does.
pub(crate) fn report(
    spec: &QuotaSpec,
    days: &[DayRecord],
    log: &[Logged],
    first: i64,
    last: i64,
) -> Vec<[i64; 2]> {
    (first..=last)
        .map(|day| {
            let then = in_force(log, spec, day);
            let w = window(then.period, day.saturating_mul(NANOS_PER_DAY));
            let used = days
                .iter()
                .find(|r| r.day == day)
                .map_or(0, |r| i64::try_from(r.used).unwrap_or(i64::MAX));
            let remaining = days
                .iter()
                .filter(|r| r.day <= day && r.day >= w.start.div_euclid(NANOS_PER_DAY))
                .max_by_key(|r| r.day)
                .map_or_else(|| then.limit_in(w), |r| r.remaining);
            [used, remaining.max(0)]
        })
        .collect()
}

fn snapshot(w: Window, limit: i64, used: i64, now: i64) -> QuotaSnapshot {
    QuotaSnapshot {
        limit,
        remaining: limit.saturating_sub(used).max(0) as u64,
        reset: w.end.saturating_sub(now).max(0) as u64,
        window_secs: (w.end.saturating_sub(w.start) / 1_000_000_000) as u64,
    }
}
