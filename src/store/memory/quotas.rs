//! The memory store's quota counters: one [`Counter`] per (subject, quota),
//! found in a concurrent map and decided without a lock.
//!
//! A counter is one 128-bit word (the window, the day of the last change
//! and the count: [`Count`]) beside its day history. A decision in the
//! current window on the day of the last change, the hot path, is a read
//! of the map (no lock: `papaya`) and a compare-and-swap of the word: the
//! check `used + cost <= limit` and the charge are one atomic step, so
//! threads deciding at once never admit more than the limit. Everything
//! else takes the counter's own lock: the first change of a day (it closes
//! the day before into the history), a new window, UpdateUsage, a refund,
//! a settlement, a reset, a report. Under that lock the word is still
//! changed by compare-and-swap, since decisions on it do not take the lock.

use std::sync::atomic::{AtomicI64, AtomicUsize};

use portable_atomic::{AtomicU128, Ordering};

use crate::hash::BuildDigestHasher;
use crate::quota::{Count, DayRecord, NO_DAY, QuotaSnapshot, QuotaSpec, report};
use crate::store::QuotaRef;
use crate::sync::Mutex;

/// What a decision on a quota answers: the quota after the charge, or the
/// retry delay and the quota as it stands.
pub(super) type Outcome = Result<QuotaSnapshot, (u64, QuotaSnapshot)>;

/// Every quota's counters, made on a subject's first use of the quota.
///
/// Counters that keep usage history (a registered key's request quota, for
/// usage reports) are kept as long as the store lives: they number as the
/// registered keys do. Counters that keep only the current day (a per-key
/// policy's subjects, client IPs, keys a resolver answered, token budgets)
/// are bounded: at most the store's `max_keys` of them. A counter whose
/// window has ended holds nothing a fresh one would not, so it is *idle*,
/// and its place goes to the next new subject. When `max_keys` live counters
/// are kept, a new subject is refused until the first of them goes idle (the
/// layer answers 429 with that wait), and no live counter is ever forgotten:
/// forgetting one would hand its subject a fresh window, i.e. over-admit.
///
/// An idle counter is let go by marking its word retired (a compare-and-swap
/// from the idle word it was seen with, so a decision that charged it first
/// keeps it), then removing it from the map. A decision that finds a retired
/// word looks the counter up again, and makes a fresh one: nothing charged to
/// a counter after it was let go is lost.
pub(super) struct Quotas {
    map: papaya::HashMap<u128, Counter, BuildDigestHasher>,
    /// Counters in `map` without history (at most `cap`, but for those
    /// made past it by a settlement or an admin change).
    short: AtomicUsize,
    /// The most counters without history kept.
    cap: usize,
    /// No counter without history goes idle before this (wall nanoseconds):
    /// at the cap, a new subject is refused before then without looking.
    next_idle: AtomicI64,
    /// Serialises the search for idle counters.
    evicting: Mutex<()>,
}

/// The counters of one quota of one subject.
struct Counter {
    /// The count ([`Count::pack`]): changed by compare-and-swap only.
    word: AtomicU128,
    /// Whether the counter keeps usage history (it is then never let go).
    history: bool,
    /// Taken by every change but a decision on the day of the last change.
    slow: Mutex<Slow>,
}

/// What only changes under a counter's lock.
struct Slow {
    /// What the window had counted when the day of the last change began:
    /// that day used the count less this.
    base: i64,
    /// The closed days, one per day number modulo the length (the day of
    /// the last change is in the word, and would take its place).
    days: Box<[DayRecord]>,
}

impl Counter {
    fn new(history_days: u32) -> Self {
        let days = history_days.max(1) as usize;
        Counter {
            word: AtomicU128::new(Count::EMPTY.pack()),
            history: days > 1,
            slow: Mutex::new(Slow {
                base: 0,
                days: vec![NO_DAY; days].into_boxed_slice(),
            }),
        }
    }

    #[inline]
    fn load(&self) -> (u128, Count) {
        let w = self.word.load(Ordering::Acquire);
        (w, Count::unpack(w))
    }

    /// Charges `cost` at `now` if it fits (`force`: even if it does not).
    /// `None` when the counter was let go.
    #[inline]
    fn acquire(&self, spec: &QuotaSpec, now: i64, cost: u64, force: bool) -> Option<Outcome> {
        let (mut w, mut count) = self.load();
        loop {
            match count.acquire_today(spec, now, cost, force) {
                Some(Ok((next, snap))) => match self.word.compare_exchange_weak(
                    w,
                    next.pack(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some(Ok(snap)),
                    Err(current) => (w, count) = (current, Count::unpack(current)),
                },
                Some(Err(denied)) => return Some(Err(denied)),
                None => {
                    return self.change(now, spec, true, |c| {
                        match c.acquire(spec, now, cost, force) {
                            Ok((next, snap)) => (Some(next), Ok(snap)),
                            Err(denied) => (None, Err(denied)),
                        }
                    });
                }
            }
        }
    }

    /// Applies `op` to the count moved to `now` ([`Count::roll`]) under the
    /// counter's lock; when it returns a new count, stores it (retrying on
    /// a decision that changed the word meanwhile) and writes the day it
    /// closed into the history. `None` when the counter was let go.
    ///
    /// `usage` says whether the change is the day's usage (a charge, a
    /// refund) or not (UpdateUsage, a copy learning the shared count): a
    /// change that is not moves what the day began with by as much, so that
    /// what the day used stays; a refund below what the day began with
    /// gives back no more than the day used.
    #[cold]
    fn change<R>(
        &self,
        now: i64,
        spec: &QuotaSpec,
        usage: bool,
        mut op: impl FnMut(Count) -> (Option<Count>, R),
    ) -> Option<R> {
        let mut slow = self.slow.lock();
        let (mut w, mut count) = self.load();
        loop {
            if count.is_retired() {
                return None;
            }
            let rolled = count.roll(spec, now, slow.base);
            let (next, r) = op(rolled.count);
            let Some(next) = next else { return Some(r) };
            match self
                .word
                .compare_exchange(w, next.pack(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if let Some(day) = rolled.closed {
                        let len = slow.days.len() as i64;
                        slow.days[day.day.rem_euclid(len) as usize] = day;
                    }
                    slow.base = if usage {
                        rolled.base.min(next.used)
                    } else {
                        let shift = next.used.saturating_sub(rolled.count.used);
                        rolled.base.saturating_add(shift)
                    };
                    return Some(r);
                }
                Err(current) => (w, count) = (current, Count::unpack(current)),
            }
        }
    }

    /// `[used, remaining]` for each day from `first` to `last`.
    fn report(&self, spec: &QuotaSpec, first: i64, last: i64) -> Vec<[i64; 2]> {
        let slow = self.slow.lock();
        let (_, count) = self.load();
        let mut days = slow.days.to_vec();
        if let Some(today) = count.today(spec, slow.base) {
            let len = days.len() as i64;
            days[today.day.rem_euclid(len) as usize] = today;
        }
        report(spec, &days, first, last)
    }

    /// Forgets the window's count and the history (a counter let go stays so).
    fn reset(&self) {
        let mut slow = self.slow.lock();
        let (mut w, mut count) = self.load();
        while !count.is_retired() {
            match self.word.compare_exchange(
                w,
                Count::EMPTY.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(current) => (w, count) = (current, Count::unpack(current)),
            }
        }
        slow.base = 0;
        slow.days.fill(NO_DAY);
    }

    /// Marks the counter let go if it is idle at `now`: a decision that
    /// charged it meanwhile keeps it.
    fn retire_if_idle(&self, now: i64) -> bool {
        let (mut w, mut count) = self.load();
        while !count.is_retired() && count.idle_at() <= now {
            match self.word.compare_exchange(
                w,
                Count::RETIRED.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(current) => (w, count) = (current, Count::unpack(current)),
            }
        }
        false
    }

    fn is_retired(&self) -> bool {
        self.load().1.is_retired()
    }
}

impl Quotas {
    /// Counters for a store of `max_keys` keys.
    pub(super) fn new(max_keys: usize) -> Self {
        Quotas {
            map: papaya::HashMap::builder()
                .hasher(BuildDigestHasher::default())
                .build(),
            short: AtomicUsize::new(0),
            cap: max_keys.max(1),
            next_idle: AtomicI64::new(i64::MIN),
            evicting: Mutex::new(()),
        }
    }

    /// Where `q` lives: the subject's keyed digest with the quota's salt
    /// (which quota of which plan) xored in.
    #[inline]
    fn key(q: &QuotaRef<'_>) -> u128 {
        q.digest.0 ^ u128::from(q.spec.salt)
    }

    /// Runs `f` on the counter of `q`, made on first use: `bounded`, a
    /// counter without history is made only within the cap (`Err`: the
    /// wait in nanoseconds until one goes idle, unless an idle one makes
    /// room); otherwise past it (a settlement or an admin change of a
    /// subject just decided). `f` answering `None` (the counter was let go
    /// meanwhile) looks again.
    #[inline]
    fn with<R>(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        bounded: bool,
        mut f: impl FnMut(&Counter) -> Option<R>,
    ) -> Result<R, i64> {
        let key = Self::key(q);
        let map = self.map.pin();
        loop {
            if let Some(counter) = map.get(&key) {
                if let Some(r) = f(counter) {
                    return Ok(r);
                }
                // Let go: out of the map with it, whoever removed it first.
                if map
                    .remove_if(&key, |_, c| c.is_retired())
                    .is_ok_and(|r| r.is_some())
                {
                    self.short.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            let counter = Counter::new(q.history_days());
            if !counter.history {
                self.reserve(now, bounded)?;
            }
            match map.try_insert(key, counter) {
                Ok(counter) => {
                    if let Some(r) = f(counter) {
                        return Ok(r);
                    }
                }
                // Made by another thread meanwhile: give the place back.
                Err(e) => {
                    if !e.not_inserted.history {
                        self.short.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Takes a place for a counter without history, making room among
    /// idle ones at the cap when `bounded`.
    #[cold]
    fn reserve(&self, now: i64, bounded: bool) -> Result<(), i64> {
        loop {
            let n = self.short.load(Ordering::Relaxed);
            if n >= self.cap && bounded {
                self.evict(now)?;
                continue;
            }
            if self
                .short
                .compare_exchange(n, n + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// Makes room for a counter without history at the cap: lets go every
    /// idle one; `Err` is the wait until one goes idle.
    #[cold]
    fn evict(&self, now: i64) -> Result<(), i64> {
        let _one = self.evicting.lock();
        if self.short.load(Ordering::Relaxed) < self.cap {
            return Ok(());
        }
        let next_idle = self.next_idle.load(Ordering::Relaxed);
        if now < next_idle {
            return Err(next_idle - now);
        }
        let map = self.map.pin();
        let mut freed = 0;
        let mut soonest = i64::MAX;
        for (key, counter) in map.iter() {
            if counter.history {
                continue;
            }
            if counter.retire_if_idle(now) {
                if map
                    .remove_if(key, |_, c| c.is_retired())
                    .is_ok_and(|r| r.is_some())
                {
                    freed += 1;
                }
            } else if !counter.is_retired() {
                soonest = soonest.min(counter.load().1.idle_at());
            }
        }
        self.short.fetch_sub(freed, Ordering::Relaxed);
        self.next_idle.store(soonest, Ordering::Relaxed);
        if freed > 0 {
            Ok(())
        } else {
            Err(soonest.saturating_sub(now).max(1))
        }
    }

    /// Decides `cost` for `q` at `now` (wall nanoseconds): charges it if it
    /// fits (`force`: even if not, a shadow plan counting its overage).
    /// `Err` is the wait for room for a new subject's counter.
    #[inline]
    pub(super) fn acquire(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        cost: u64,
        force: bool,
    ) -> Result<Outcome, i64> {
        self.with(q, now, true, |c| c.acquire(q.spec, now, cost, force))
    }

    /// Whether `cost` would fit in `q` at `now`, changing nothing.
    pub(super) fn check(&self, q: &QuotaRef<'_>, now: i64, cost: u64) -> Outcome {
        let key = Self::key(q);
        let count = match self.map.pin().get(&key) {
            Some(c) => c.load().1,
            None => Count::EMPTY,
        };
        count.check(q.spec, now, cost)
    }

    /// Adjusts the count of `q` by `delta` (see [`Count::adjust`]).
    pub(super) fn adjust(&self, q: &QuotaRef<'_>, now: i64, delta: i64, charged_at: Option<i64>) {
        let _ = self.with(q, now, false, |c| {
            c.change(now, q.spec, true, |count| {
                (count.adjust(delta, charged_at), ())
            })
        });
    }

    /// Sets what remains of `q` in its window (AWS UpdateUsage).
    pub(super) fn set_remaining(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        remaining: i64,
    ) -> QuotaSnapshot {
        let set = self.with(q, now, false, |c| {
            c.change(now, q.spec, false, |count| {
                let (next, snap) = count.set_remaining(q.spec, now, remaining);
                (Some(next), snap)
            })
        });
        set.expect("made past the cap")
    }

    /// Lowers what remains of `q` to `remaining` if more remains.
    #[cfg(feature = "redis")]
    pub(super) fn at_most(&self, q: &QuotaRef<'_>, now: i64, remaining: i64) {
        let _ = self.with(q, now, false, |c| {
            c.change(now, q.spec, false, |count| {
                (Some(count.at_most(q.spec, remaining)), ())
            })
        });
    }

    /// `[used, remaining]` of `q` for each day from `first` to `last`.
    pub(super) fn report(&self, q: &QuotaRef<'_>, first: i64, last: i64) -> Vec<[i64; 2]> {
        match self.map.pin().get(&Self::key(q)) {
            Some(c) => c.report(q.spec, first, last),
            None => report(q.spec, &[], first, last),
        }
    }

    /// Forgets the window and history of `q`.
    pub(super) fn reset(&self, q: &QuotaRef<'_>) {
        if let Some(c) = self.map.pin().get(&Self::key(q)) {
            c.reset();
        }
    }

    /// How many (subject, quota) counters are kept.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}
