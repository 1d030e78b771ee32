//! The admin operations: a quota's usage by day, setting what remains of it,
//! and resetting a subject's limits.

use std::sync::Arc;

use super::call::{Call, period_arg, quota_args};
use super::decide::Unanswered;
use super::keys::reset_mark;
use super::store::Inner;
use crate::gcra::NANOS_PER_SEC;
use crate::quota::{DayRecord, Logged, QuotaSpec, add_changes, in_force, limit_on};
use crate::store::{QuotaRef, StoreError, StoreFuture, ThrottleRef};
use crate::window::{Date, NANOS_PER_DAY, Period, Weekday, window};

/// The most (log, day, numbers) an instance remembers having logged before
/// it forgets them all (see `Inner::requota`): a plan put anew logs each
/// of its quotas once, for however many keys.
const LOGGED_MEMO: usize = 1024;

impl Inner {
    /// [`Store::usage`](crate::store::Store::usage), read from the quota's
    /// history hash and its limit log. Each day's record holds what
    /// remained after its last change and the window's limit it was worked
    /// out under (`l:`); the log holds the quota's numbers before each day
    /// they were changed on. A day is reported under the numbers in force
    /// at its end, as the memory store closes it: what remained, less the
    /// limit it was written under, plus the limit in force then. A change
    /// on a day after a record stands for a record of its own (nothing
    /// used; the count carried, or none in a later window), as the memory
    /// store closes a key's last day and moves it to the day of the change.
    /// Today's is worked out from the count and the quota's numbers now: a
    /// limit put anew shows at once, with no write for each key when a plan
    /// is put.
    pub(super) fn usage(
        self: &Arc<Self>,
        quota: &QuotaRef<'_>,
        first: Date,
        last: Date,
    ) -> StoreFuture<Vec<[i64; 2]>> {
        let inner = Arc::clone(self);
        let [count, key] = inner.quota_keys(quota);
        let log = inner.limit_log_key(quota);
        let spec = *quota.spec;
        let now = inner.clock.wall_nanos();
        let today = now.div_euclid(NANOS_PER_DAY);
        Box::pin(async move {
            // A change this instance is logging is read with the rest.
            inner.answered(std::slice::from_ref(&log)).await;
            let fields: Vec<(String, i64)> = inner
                .command(redis::cmd("HGETALL").arg(key).clone())
                .await?;
            let logged: Vec<(String, String)> = inner
                .command(redis::cmd("HGETALL").arg(log).clone())
                .await?;
            let log = limit_log(&logged, &spec);
            let mut records = closed(day_records(&fields), &log, &spec, today);
            if (first.days()..=last.days()).contains(&today) {
                let state: Vec<Option<String>> = inner
                    .command(
                        redis::cmd("HMGET")
                            .arg(count)
                            .arg("w")
                            .arg("n")
                            .arg("d")
                            .clone(),
                    )
                    .await?;
                if let Some(remaining) = remaining_today(&spec, &state, now) {
                    match records.iter_mut().find(|r| r.day == today) {
                        Some(r) => r.remaining = remaining,
                        None => records.push(DayRecord {
                            day: today,
                            used: 0,
                            remaining,
                        }),
                    }
                }
            }
            Ok(crate::quota::report(
                &spec,
                &records,
                &log,
                first.days(),
                last.days(),
            ))
        })
    }

    /// [`Store::requota`](crate::store::Store::requota): logs the quota's
    /// numbers (its period among them) before the change under today, unless a change earlier today
    /// did (script mode "k"), in the quota's limit log, one for all its
    /// subjects: called for every key of a plan put anew, it is sent once.
    /// In the background; a report this instance reads waits for it. A log
    /// Redis did not take (unreachable) leaves the days before the change
    /// reported under the numbers of the next change logged, or now's.
    ///
    /// Clears the over-limit cache, each time (numbers put back as they
    /// were on the same day are logged once, but the count may have moved
    /// under the numbers between: see `cache`).
    pub(super) fn requota(self: &Arc<Self>, old: &QuotaRef<'_>) {
        self.forget_denials();
        let key = self.limit_log_key(old);
        let spec = *old.spec;
        let day = self.clock.wall_nanos().div_euclid(NANOS_PER_DAY);
        let created = spec.created_at.div_euclid(NANOS_PER_SEC as i64);
        let numbers = [
            i64::try_from(spec.limit).unwrap_or(i64::MAX),
            i64::try_from(spec.offset).unwrap_or(i64::MAX),
            created,
            i64::from(crate::quota::period_code(spec.period)),
        ];
        let memo = (key.clone(), day, numbers);
        {
            let mut logged = self.logged.lock();
            if logged.contains(&memo) {
                return;
            }
            if logged.len() >= LOGGED_MEMO {
                logged.clear();
            }
            logged.insert(memo.clone());
        }
        let (period, week_start) = period_arg(spec.period);
        let mut call = Call::new("k", &self.now());
        call.keys.push(key.clone());
        call.arg(spec.limit);
        call.arg(spec.offset);
        call.arg(created);
        call.arg(old.history_days);
        call.arg(period);
        call.arg(week_start);
        let unanswered = Unanswered::new(self, vec![key]);
        let task = Arc::clone(self);
        self.spawn(async move {
            let _unanswered = unanswered;
            if let Err(e) = task.within(Arc::clone(&task).run(call)).await {
                // Sent again by the next change.
                task.logged.lock().remove(&memo);
                tracing::warn!(error = %e, "a quota's numbers before a change were not logged; \
                    usage reports show the days before it under the later numbers");
            }
        });
    }

    /// Clears the over-limit cache: a limit's numbers or state changed in a
    /// way a cached denial does not tell.
    pub(crate) fn forget_denials(&self) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    /// [`Store::set_remaining`](crate::store::Store::set_remaining), by the
    /// script; clears the over-limit cache.
    pub(super) fn set_remaining(
        self: &Arc<Self>,
        quota: &QuotaRef<'_>,
        remaining: u64,
    ) -> StoreFuture<u64> {
        // Above 2^53 the script cannot hold the count: refused here, with
        // the memory store's error, rather than by the script.
        if let Err(e) = crate::usage::check_remaining(remaining) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let inner = Arc::clone(self);
        let mut call = Call::new("s", &inner.now());
        call.keys = inner.quota_keys(quota).to_vec();
        call.arg(remaining);
        quota_args(&mut call, quota);
        call.arg(quota.history_days);
        Box::pin(async move {
            let reply = inner.within(Arc::clone(&inner).run(call)).await?;
            if let Some(cache) = &inner.cache {
                cache.clear();
            }
            match reply.as_slice() {
                [_, _, _, _, limit, used] => Ok(limit.saturating_sub(*used).max(0) as u64),
                _ => Err(StoreError::new("redis: unexpected script reply")),
            }
        })
    }

    /// [`Store::reset`](crate::store::Store::reset): fills the throttles by
    /// the script (mode "f": each key deleted, the throttle marked with the
    /// time of the reset for its span, so that a refund of units charged
    /// before it gives nothing back to the refilled bucket), resets the
    /// quota by the script (mode "z": its keys deleted, the count marked
    /// with the time of the reset, so that a reservation made before it
    /// settles nothing back to the new count), and clears the over-limit
    /// cache.
    pub(super) fn reset(
        self: &Arc<Self>,
        throttles: &[ThrottleRef<'_>],
        quota: Option<&QuotaRef<'_>>,
    ) -> StoreFuture<()> {
        let inner = Arc::clone(self);
        // One call per throttle: a throttle and its mark share a slot, but
        // throttles of an account or the stage may live in others.
        let now = inner.now();
        let mut calls: Vec<Call> = Vec::with_capacity(throttles.len() + 1);
        for t in throttles {
            let mut call = Call::new("f", &now);
            let key = inner.throttle_key(t);
            let mark = reset_mark(&key);
            call.keys.extend([key, mark]);
            call.arg(t.limit.gcra.interval());
            call.arg(t.limit.gcra.burst());
            calls.push(call);
        }
        let quota = quota.map(|q| {
            let mut call = Call::new("z", &now);
            call.keys = inner.quota_keys(q).to_vec();
            quota_args(&mut call, q);
            call
        });
        calls.extend(quota);
        Box::pin(async move {
            for call in calls {
                inner.within(Arc::clone(&inner).run(call)).await?;
            }
            if let Some(cache) = &inner.cache {
                cache.clear();
            }
            Ok(())
        })
    }
}

/// What remains today (the day of `now`) of a quota whose count (fields
/// `w`, `n` and `d` in `state`) was last changed in today's window: the
/// limit of the window now less its count, as the next request finds it.
/// The count is in today's window when that window began on or before the
/// day of the last change, as the script's `roll` keeps it: whatever the
/// period it was counted under (a plan whose period changed keeps the count
/// in the window of the new period that holds that day). `None` when the
/// count is of an earlier window (or none), where the history tells.
fn remaining_today(spec: &QuotaSpec, state: &[Option<String>], now: i64) -> Option<i64> {
    let field = |i: usize| state.get(i)?.as_deref()?.parse::<i64>().ok();
    let (start, count) = (field(0)?, field(1)?);
    // A count written without the day of its last change was last changed
    // on its window's first day (as the script reads it).
    let last = field(2).unwrap_or(start);
    let w = window(spec.period, now);
    let today = now.div_euclid(NANOS_PER_DAY);
    (w.start.div_euclid(NANOS_PER_DAY) <= last && last <= today)
        .then(|| spec.limit_in(w).saturating_sub(count))
}

/// A day's record as the history hash holds it: what remained under
/// `limit`, the window's limit it was written under (`None`: a record
/// written before limits were kept beside it, taken as written under the
/// numbers in force at its day's end).
struct Written {
    record: DayRecord,
    limit: Option<i64>,
}

/// Day records from a history hash's fields (`u:<day>`, `r:<day>`,
/// `l:<day>`).
fn day_records(fields: &[(String, i64)]) -> Vec<Written> {
    let mut days: Vec<Written> = Vec::new();
    for (field, value) in fields {
        let (kind, day) = match field.split_once(':') {
            Some((k, d)) => match d.parse::<i64>() {
                Ok(d) => (k, d),
                Err(_) => continue,
            },
            None => continue,
        };
        let i = match days.iter().position(|w| w.record.day == day) {
            Some(i) => i,
            None => {
                days.push(Written {
                    record: DayRecord {
                        day,
                        used: 0,
                        remaining: 0,
                    },
                    limit: None,
                });
                days.len() - 1
            }
        };
        match kind {
            "u" => days[i].record.used = u64::try_from(*value).unwrap_or(0),
            "r" => days[i].record.remaining = *value,
            "l" => days[i].limit = Some(*value),
            _ => {}
        }
    }
    days
}

/// The entries of a limit log (fields `<day>`, values `"<limit> <offset>
/// <created_s> <period> <week_start>"`), by day; `spec` gives what the log
/// does not keep (the quota's id, which a change logged never differs in;
/// the period of an entry written without it: taken as now's).
fn limit_log(fields: &[(String, String)], spec: &QuotaSpec) -> Vec<Logged> {
    let mut log: Vec<Logged> = fields
        .iter()
        .filter_map(|(day, numbers)| {
            let mut n = numbers.split(' ');
            let mut int = || n.next().map(str::parse::<i64>);
            let (Some(Ok(limit)), Some(Ok(offset)), Some(Ok(created))) = (int(), int(), int())
            else {
                return None;
            };
            let period = match (n.next(), n.next().map(str::parse::<i64>), n.next()) {
                (None, None, None) => spec.period,
                (Some("D"), Some(Ok(0)), None) => Period::Day,
                (Some("W"), Some(Ok(first @ 0..=6)), None) => {
                    Period::Week(Weekday::from_days_from_monday(first))
                }
                (Some("M"), Some(Ok(0)), None) => Period::Month,
                _ => return None,
            };
            Some(Logged {
                day: day.parse().ok()?,
                spec: QuotaSpec {
                    limit: u64::try_from(limit).ok()?,
                    offset: u64::try_from(offset).ok()?,
                    created_at: created.saturating_mul(NANOS_PER_SEC as i64),
                    period,
                    ..*spec
                },
            })
        })
        .collect();
    log.sort_by_key(|l| l.day);
    log
}

/// The day records a report reads, as the memory store closes them: each
/// written day under the numbers (and period) in force at its end (as
/// written, when no change was logged on or after it), and a record for
/// each day a change was logged on after a record and before or on
/// `today`, without one of its own ([`add_changes`]).
fn closed(written: Vec<Written>, log: &[Logged], now: &QuotaSpec, today: i64) -> Vec<DayRecord> {
    let mut days: Vec<DayRecord> = written
        .into_iter()
        .map(|w| {
            let day = w.record.day;
            // A day no logged change came on or after was counted under
            // the numbers now, or under numbers changed without a log (a
            // restart with another configuration): as written. One a change
            // came after ended with its count in the window of the period
            // then that holds it (the count is what remained less the
            // limit it was written under).
            let logged = log.last().is_some_and(|l| l.day >= day);
            let remaining = match w.limit.filter(|_| logged) {
                Some(limit) => w
                    .record
                    .remaining
                    .saturating_sub(limit)
                    .saturating_add(limit_on(in_force(log, now, day), day)),
                None => w.record.remaining,
            };
            DayRecord {
                remaining,
                ..w.record
            }
        })
        .collect();
    add_changes(&mut days, log, now, today);
    days
}
