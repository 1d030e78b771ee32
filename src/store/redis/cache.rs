//! The over-limit cache: a request that Redis denied for a used-up quota is
//! answered here until the quota's window ends, without a round trip
//! (Envoy's over-limit cache).
//!
//! It answers only what Redis would answer, exactly, or not at all. That
//! holds for one kind of denial: a quota (not a token budget's) with nothing
//! left. Until its window ends, no request of that subject can pass the
//! quota, so nothing charges the request's own limits: the quota stays used
//! up, the wait is the same instant, and no throttle of its own can come to
//! hold it longer than the window. A stage limit, shared with every caller,
//! can be drained by others, but never asks a wait longer than its span: the
//! entry is kept only while the window ends later than that. An account's
//! quota is never cached: another key's request may give it units back (a
//! split decision's refund on a cluster, a share returned unused). Any other
//! denial can change before its retry time (a cheaper request passing, a
//! settlement giving tokens back) and is never cached. An entry answers
//! only a request under the same numbers (each limit's size, a quota's
//! period, offset, creation and shadow flag), so a plan put anew is decided
//! under its new numbers at once. Numbers put back as they were (a month, a
//! day, the month again) are the same identity, but not the same count:
//! the requests decided under the numbers between may have moved it (a day
//! that began after the month's requests starts from 0, and the month put
//! back holds that count). So a quota's numbers changed through this
//! instance, or applied here from the shared registry, clear the cache, as
//! any other admin change through this instance does; and a denial whose
//! call was sent before a clear is not cached when it lands after it. An
//! entry lives at most `max_ttl`, which bounds how long a change made
//! elsewhere and not seen here (another instance raising a quota) can go
//! unseen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::Mutex;

use crate::gcra::Nanos;
use crate::hash::BuildDigestHasher;
use crate::store::{Denial, Denied};

/// Shards of the cache, so that denied hot keys on several threads rarely
/// contend.
const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When the denial was given (the store clock's monotonic nanoseconds).
    at: Nanos,
    /// Until when the same answer holds.
    until: Nanos,
    denied: Denied,
}

/// Denials by request identity, bounded in entries.
#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<u64, Entry, BuildDigestHasher>,
    /// Inserts refused for want of room since the last sweep.
    refused: u32,
}

/// Refused inserts between two sweeps of a full shard, so that a shard full
/// of live entries is not swept on every denial.
const SWEEP_EVERY: u32 = 64;

#[derive(Debug)]
pub(super) struct OverLimitCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    max_ttl: Nanos,
    /// How many times the cache was cleared: a denial is cached only if no
    /// clear came between its call being sent and its landing.
    generation: AtomicU64,
}

impl OverLimitCache {
    /// Whether a denial stays exactly what Redis would answer until its
    /// retry time, and so may be cached (see the module documentation).
    pub(super) fn holds(denied: &Denied) -> bool {
        matches!(denied.denial, Denial::Quota { .. })
            && denied.limit.remaining == 0
            && !denied.limit.kind.is_account()
    }

    /// A cache of at most `capacity` entries, each kept at most `max_ttl`.
    pub(super) fn new(capacity: usize, max_ttl: Nanos) -> Self {
        OverLimitCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
            max_ttl,
            generation: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: u64) -> &Mutex<Shard> {
        &self.shards[(id >> 59) as usize % SHARDS]
    }

    /// The denial Redis would give now, if `id` is still denied.
    pub(super) fn get(&self, id: u64, now: Nanos) -> Option<Denied> {
        let mut shard = self.shard(id).lock();
        let e = *shard.entries.get(&id)?;
        if now < e.until && now >= e.at {
            Some(e.denied.later(now - e.at))
        } else {
            shard.entries.remove(&id);
            None
        }
    }

    /// The generation to send a call under: [`insert`](Self::insert)
    /// caches its denial only if the cache was not cleared since.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches `denied`, given at `now` by a call sent under `generation`,
    /// until its retry time less `margin` (the longest wait a limit shared
    /// with other callers could come to ask, which would then be named
    /// instead); nothing when that leaves no time, or when the cache was
    /// cleared since the call was sent (the denial may be of numbers, or a
    /// count, changed since).
    pub(super) fn insert(
        &self,
        id: u64,
        now: Nanos,
        denied: Denied,
        margin: Nanos,
        generation: u64,
    ) {
        let Some(wait) = denied.retry_after() else {
            return;
        };
        let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        if let Some(ttl) = wait.checked_sub(margin).filter(|&t| t > 0) {
            self.put(id, now, ttl.min(self.max_ttl), denied, generation);
        }
    }

    fn put(&self, id: u64, now: Nanos, ttl: Nanos, denied: Denied, generation: u64) {
        if ttl == 0 || self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(id).lock();
        // Under the shard's lock: a clear counts its generation before it
        // takes each shard's lock, so an entry put after the count is
        // refused here, and one put before it is cleared.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if shard.entries.len() >= self.per_shard && !shard.entries.contains_key(&id) {
            shard.refused += 1;
            if shard.refused < SWEEP_EVERY {
                return;
            }
            shard.refused = 0;
            shard.entries.retain(|_, e| now < e.until);
            if shard.entries.len() >= self.per_shard {
                return;
            }
        }
        let entry = Entry {
            at: now,
            until: now.saturating_add(ttl),
            denied,
        };
        shard.entries.insert(id, entry);
    }

    /// Forgets every denial (an admin change made through this instance, a
    /// quota's numbers changed), and every denial of a call sent before.
    pub(super) fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for shard in self.shards.iter() {
            shard.lock().entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{Applied, LimitKind};

    fn denied(retry_ms: u64) -> Denied {
        let limit = Applied::new(
            LimitKind::Throttle,
            5,
            Duration::from_secs(5),
            0,
            Duration::from_secs(5),
        );
        Denied::throttled(limit, Duration::from_millis(retry_ms))
    }

    #[test]
    fn only_a_used_up_quota_is_held() {
        let quota = |remaining| {
            let limit = Applied::new(
                LimitKind::Quota,
                5,
                Duration::from_secs(86_400),
                remaining,
                Duration::from_secs(60),
            );
            Denied::quota(limit, Duration::from_secs(60))
        };
        assert!(OverLimitCache::holds(&quota(0)));
        // A cheaper request can still pass, and change what remains.
        assert!(!OverLimitCache::holds(&quota(1)));
        // A throttle's wait grows when a request passes in between.
        assert!(!OverLimitCache::holds(&denied(10)));
        let whole = Applied::new(
            LimitKind::Quota,
            5,
            Duration::from_secs(86_400),
            0,
            Duration::ZERO,
        );
        assert!(!OverLimitCache::holds(&Denied::too_costly(whole)));
        assert!(!OverLimitCache::holds(&Denied::concurrency(whole)));
    }

    #[test]
    fn answers_until_the_retry_time_with_a_shrinking_wait() {
        let c = OverLimitCache::new(64, u64::MAX);
        c.insert(7, 1_000, denied(10), 0, 0);
        let d = c.get(7, 1_000 + 4_000_000).unwrap();
        assert_eq!(d.retry_after(), Some(Duration::from_millis(6)));
        assert!(c.get(7, 1_000 + 10_000_000).is_none());
        assert!(c.get(8, 2_000).is_none());
    }

    #[test]
    fn max_ttl_and_capacity_bound_it() {
        let c = OverLimitCache::new(SHARDS, 1_000);
        c.insert(1, 0, denied(10_000), 0, 0);
        assert!(c.get(1, 999).is_some());
        assert!(c.get(1, 1_000).is_none());
        // One entry per shard: a second id in the same shard is not kept
        // while the first is live.
        c.insert(1, 0, denied(10_000), 0, 0);
        c.insert(2, 0, denied(10_000), 0, 0);
        assert!(c.get(2, 10).is_none());
        // Once entry 1 has expired, a full shard is swept, but only every
        // SWEEP_EVERY refusals.
        for _ in 0..SWEEP_EVERY - 2 {
            c.insert(2, 2_000, denied(10_000), 0, 0);
        }
        assert!(c.get(2, 2_001).is_none());
        c.insert(2, 2_000, denied(10_000), 0, 0);
        assert!(c.get(2, 2_001).is_some());
        c.clear();
        assert!(c.get(2, 2_001).is_none());
    }

    #[test]
    fn a_denial_sent_before_a_clear_is_not_cached() {
        let c = OverLimitCache::new(64, u64::MAX);
        let sent = c.generation();
        c.clear();
        c.insert(7, 1_000, denied(10), 0, sent);
        assert!(c.get(7, 2_000).is_none());
        c.insert(7, 1_000, denied(10), 0, c.generation());
        assert!(c.get(7, 2_000).is_some());
    }
}
