//! The admin operations: a quota's usage by day, setting what remains of it,
//! and resetting a subject's limits.

use std::sync::Arc;

use super::call::{Call, quota_args};
use super::keys::reset_mark;
use super::store::Inner;
use crate::quota::{DayRecord, QuotaSpec};
use crate::store::{QuotaRef, StoreError, StoreFuture, ThrottleRef};
use crate::window::{Date, NANOS_PER_DAY, window};

impl Inner {
    /// [`Store::usage`](crate::store::Store::usage), read from the quota's
    /// history hash. Each day's record holds what remained after its last
    /// change, under the numbers of that moment; today's is worked out from
    /// the count and the quota's numbers now, as the memory store reports
    /// it: a limit put anew since the key's last request shows at once,
    /// with no write for each key when a plan is put.
    pub(super) fn usage(
        self: &Arc<Self>,
        quota: &QuotaRef<'_>,
        first: Date,
        last: Date,
    ) -> StoreFuture<Vec<[i64; 2]>> {
        let inner = Arc::clone(self);
        let [count, key] = inner.quota_keys(quota);
        let spec = *quota.spec;
        let now = inner.clock.wall_nanos();
        let today = now.div_euclid(NANOS_PER_DAY);
        Box::pin(async move {
            let fields: Vec<(String, i64)> = inner
                .command(redis::cmd("HGETALL").arg(key).clone())
                .await?;
            let mut records = day_records(&fields);
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
                first.days(),
                last.days(),
            ))
        })
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

/// Day records from a history hash's fields (`u:<day>`, `r:<day>`).
fn day_records(fields: &[(String, i64)]) -> Vec<DayRecord> {
    let mut days: Vec<DayRecord> = Vec::new();
    for (field, value) in fields {
        let (kind, day) = match field.split_once(':') {
            Some((k, d)) => match d.parse::<i64>() {
                Ok(d) => (k, d),
                Err(_) => continue,
            },
            None => continue,
        };
        let i = match days.iter().position(|r| r.day == day) {
            Some(i) => i,
            None => {
                days.push(DayRecord {
                    day,
                    used: 0,
                    remaining: 0,
                });
                days.len() - 1
            }
        };
        match kind {
            "u" => days[i].used = u64::try_from(*value).unwrap_or(0),
            "r" => days[i].remaining = *value,
            _ => {}
        }
    }
    days
}
