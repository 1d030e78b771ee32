//! The memory store's quota counters: one [`QuotaState`] per (subject,
//! quota), in maps split into shards, each behind its own short lock.

use std::collections::HashMap;

use crate::sync::Mutex;

use crate::hash::BuildDigestHasher;
use crate::quota::QuotaState;
use crate::store::QuotaRef;

/// Shards of the maps: counters of different keys rarely share a lock.
const SHARDS: usize = 64;

/// Every quota's counters, made on a subject's first use of the quota.
///
/// A lock is held for a few arithmetic operations, never across a wait.
/// Counters that keep usage history (a registered key's request quota, for
/// usage reports) are kept as long as the store lives: they number as the
/// registered keys do. Counters that keep only the current day (a per-key
/// policy's subjects, client IPs, keys a resolver answered, token budgets)
/// are bounded: at most the store's `max_keys` of them, spread over the
/// shards. A counter whose window has ended holds nothing a fresh one would
/// not, so it is *idle*, and its place goes to the next new subject. When a
/// shard holds its share of live counters, a new subject is refused until
/// the first of them goes idle (the layer answers 429 with that wait), and
/// no live counter is ever forgotten: forgetting one would hand its subject
/// a fresh window, i.e. over-admit.
pub(super) struct Quotas {
    shards: Box<[Mutex<Shard>]>,
    /// The most counters without history a shard keeps.
    cap: usize,
}

#[derive(Default)]
struct Shard {
    map: HashMap<u128, QuotaState, BuildDigestHasher>,
    /// Counters in `map` without history (bounded by `cap`).
    short: usize,
    /// No counter without history goes idle before this (wall nanoseconds):
    /// a full shard refuses a new subject before then without looking.
    next_idle: i64,
}

impl Shard {
    /// Makes room for a counter without history in a full shard: forgets
    /// every idle one; `Err` is the wait until one goes idle.
    #[cold]
    fn evict(&mut self, now: i64) -> Result<(), i64> {
        if now < self.next_idle {
            return Err(self.next_idle - now);
        }
        let before = self.map.len();
        self.map.retain(|_, st| st.keeps_history() || !st.idle(now));
        self.short -= before - self.map.len();
        self.next_idle = self
            .map
            .values()
            .filter(|st| !st.keeps_history())
            .map(QuotaState::idle_at)
            .min()
            .unwrap_or(i64::MIN);
        if self.map.len() < before {
            Ok(())
        } else {
            Err((self.next_idle - now).max(1))
        }
    }
}

impl Quotas {
    /// Counters for a store of `max_keys` keys.
    pub(super) fn new(max_keys: usize) -> Self {
        Quotas {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            cap: max_keys.div_ceil(SHARDS).max(1),
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
    /// on first use (past the bound on counters without history: a
    /// settlement or an admin change of a subject just decided).
    #[inline]
    pub(super) fn with<R>(&self, q: &QuotaRef<'_>, f: impl FnOnce(&mut QuotaState) -> R) -> R {
        let key = Self::key(q);
        let mut shard = self.shards[(key >> 64) as usize % SHARDS].lock();
        let shard = &mut *shard;
        let state = shard.map.entry(key).or_insert_with(|| {
            let st = QuotaState::new(q.history_days() as usize);
            shard.short += usize::from(!st.keeps_history());
            st
        });
        f(state)
    }

    /// [`with`](Self::with) for a decision: a subject without history whose
    /// shard holds its share of live counters is refused (`Err`: the wait
    /// in nanoseconds until one goes idle), unless an idle one makes room.
    #[inline]
    pub(super) fn decide<R>(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        f: impl FnOnce(&mut QuotaState) -> R,
    ) -> Result<R, i64> {
        let key = Self::key(q);
        let mut shard = self.shards[(key >> 64) as usize % SHARDS].lock();
        let shard = &mut *shard;
        if let Some(st) = shard.map.get_mut(&key) {
            return Ok(f(st));
        }
        let st = QuotaState::new(q.history_days() as usize);
        if !st.keeps_history() {
            if shard.short >= self.cap {
                shard.evict(now)?;
            }
            shard.short += 1;
        }
        Ok(f(shard.map.entry(key).or_insert(st)))
    }

    /// Runs `f` on the counters of `q` if it was ever used.
    pub(super) fn existing<R>(
        &self,
        q: &QuotaRef<'_>,
        f: impl FnOnce(&mut QuotaState) -> R,
    ) -> Option<R> {
        let key = Self::key(q);
        let mut shard = self.shards[(key >> 64) as usize % SHARDS].lock();
        shard.map.get_mut(&key).map(f)
    }

    /// How many (subject, quota) counters are kept.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }
}
