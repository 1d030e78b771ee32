//! The memory store's quota counters: one [`QuotaState`] per (subject,
//! quota), in maps split into shards, each behind its own short lock.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::hash::BuildDigestHasher;
use crate::quota::QuotaState;
use crate::store::QuotaRef;

/// Shards of the maps: counters of different keys rarely share a lock.
const SHARDS: usize = 64;

/// Every quota's counters, made on a subject's first use of the quota.
///
/// A lock is held for a few arithmetic operations, never across a wait.
/// Counters are kept per (subject, quota) as long as the store lives, for
/// usage reports: registered keys are what a quota is counted for, so they
/// number as the registered keys do (see `Policy::per_key`).
pub(super) struct Quotas {
    shards: Box<[Mutex<HashMap<u128, QuotaState, BuildDigestHasher>>]>,
}

impl Quotas {
    pub(super) fn new() -> Self {
        Quotas {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Where `q` lives: the subject's keyed digest with the quota's salt
    /// (which quota of which plan) xored in; the high half picks the shard,
    /// the low half is the map's hash.
    #[inline]
    fn key(q: &QuotaRef<'_>) -> u128 {
        q.digest.0 ^ u128::from(q.spec.salt)
    }

    /// Runs `f` on the counters of `q` under their shard's lock, making them
    /// on first use.
    #[inline]
    pub(super) fn with<R>(&self, q: &QuotaRef<'_>, f: impl FnOnce(&mut QuotaState) -> R) -> R {
        let key = Self::key(q);
        let mut shard = self.shards[(key >> 64) as usize % SHARDS].lock();
        let state = shard
            .entry(key)
            .or_insert_with(|| QuotaState::new(q.history_days() as usize));
        f(state)
    }

    /// Runs `f` on the counters of `q` if it was ever used.
    pub(super) fn existing<R>(
        &self,
        q: &QuotaRef<'_>,
        f: impl FnOnce(&mut QuotaState) -> R,
    ) -> Option<R> {
        let key = Self::key(q);
        let mut shard = self.shards[(key >> 64) as usize % SHARDS].lock();
        shard.get_mut(&key).map(f)
    }

    /// How many (subject, quota) counters are kept.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}
