//! The admin operations: a quota's usage by day, setting what remains of it,
//! and resetting a subject's limits.

use std::sync::Arc;

use super::call::{Call, quota_args};
use super::keys::reset_mark;
use super::store::Inner;
use crate::quota::DayRecord;
use crate::store::{QuotaRef, StoreError, StoreFuture, ThrottleRef};
use crate::window::Date;

impl Inner {
    /// [`Store::usage`](crate::store::Store::usage), read from the quota's
    /// history hash.
    pub(super) fn usage(
        self: &Arc<Self>,
        quota: &QuotaRef<'_>,
        first: Date,
        last: Date,
    ) -> StoreFuture<Vec<[i64; 2]>> {
        let inner = Arc::clone(self);
        let [_, key] = inner.quota_keys(quota);
        let spec = *quota.spec;
        Box::pin(async move {
            let fields: Vec<(String, i64)> = inner
                .command(redis::cmd("HGETALL").arg(key).clone())
                .await?;
            let records = day_records(&fields);
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
