//! The memory store's quota counters: one [`Counter`] per (subject, quota),
//! found in a concurrent map and decided without a lock.
//!
//! A counter is two words, its window (the window, its period and the day
//! of the last change: [`Count::window_word`]) and its count, beside its day
//! history. A decision in the current window on the day of the last change,
//! the hot path, is a read of the map (no lock: `papaya`; for a counter with
//! history, which is never let go, not even papaya's guard: [`Kept`]) and a
//! compare-and-swap of the count alone: the check `used + cost <= limit` and
//! the charge are one atomic step, so threads deciding at once never admit
//! more than the limit. Everything else takes the counter's own lock: the
//! first change of a day (it closes the day before into the history), a new
//! window, UpdateUsage, a denied decision's give-back, a settlement, a
//! reset, a report. Under that lock the count is still changed by
//! compare-and-swap, since decisions on it do not take the lock, and the
//! window is written after it.
//!
//! Why a decision needs no 128-bit compare-and-swap of both words (which
//! costs several nanoseconds more than a 64-bit one on some x86 machines,
//! and is a call through a function pointer without the `cmpxchg16b` target
//! feature). A decision reads the window, then the count, and charges the
//! count if it has not changed since. The window only changes under the
//! lock, after the count has been changed by compare-and-swap: so the count
//! a decision charges is always the count of the current window, even when
//! the window it read is the one just before (a decision racing the change
//! to a new day or window). Such a decision checks the count against the
//! older window's limit, which is never above a later window's (only the
//! window of a quota's creation has a lower one, [`QuotaSpec::limit_in`],
//! and windows only move forward), and it is counted once, in the window the
//! count belongs to: never more than a limit is admitted in any window, and
//! a charge dated a moment before midnight may count on the next day. A
//! counter let go ([`Counter::retire_if_idle`]) has the count [`LET_GO`],
//! which no decision ever expects: a decision that read the count before
//! cannot charge it after.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use super::kept::Kept;
use crate::hash::BuildDigestHasher;
use crate::quota::{
    Count, DayRecord, Logged, NO_DAY, QuotaSnapshot, QuotaSpec, add_changes, report,
};
use crate::store::QuotaRef;
use crate::sync::Mutex;

/// What a decision on a quota answers: the count after the charge, or the
/// retry delay and the count as it stands ([`Count::snapshot`] tells how
/// the quota stands with it).
pub(super) type Outcome = Result<Count, (u64, Count)>;

/// Every quota's counters, made on a subject's first charge of the quota
/// (a peek makes none).
///
/// Counters that keep usage history (a registered key's request quota, for
/// usage reports) are kept as long as the store lives: they number as the
/// ids ever registered do (a key removed keeps its counters, for when its
/// id is added again). Counters that keep only the current day (a per-key
/// policy's subjects, client IPs, keys a resolver answered whose id is not
/// registered, token budgets) are bounded: at most the store's `max_keys` of
/// them. A counter whose
/// window has ended holds nothing a fresh one would not, so it is *idle*,
/// and its place goes to the next new subject. When `max_keys` live counters
/// are kept, a new subject is refused until the first of them goes idle (the
/// layer answers 429 with that wait), and no live counter is ever forgotten:
/// forgetting one would hand its subject a fresh window, i.e. over-admit.
///
/// An idle counter is let go by setting its count to [`LET_GO`] under its
/// lock (so a decision that moved it to a new window first keeps it), then
/// removing it from the map. A decision that finds a counter let go looks
/// it up again, and makes a fresh one: nothing charged to a counter after
/// it was let go is lost.
pub(super) struct Quotas {
    map: papaya::HashMap<u128, Held, BuildDigestHasher>,
    /// The counters with history (never let go), found here without
    /// papaya's guard once published: a decision on a registered key's
    /// quota is one lookup here and a compare-and-swap. The map still
    /// decides which counter is a key's (the one it holds the number of),
    /// so a key never has two.
    kept: Kept<Counter>,
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
    /// Serialises making counters with history, so that threads making
    /// the same one do not each leave one in `kept` (the map keeps one).
    making: Mutex<()>,
    /// Each quota's numbers before each change while serving (see
    /// [`Quotas::log_change`]), by quota (a plan's or an account's, not a
    /// subject's): what a report reads a day without a record under.
    changes: Mutex<std::collections::HashMap<u128, Vec<Logged>>>,
}

/// A counter as the map holds it: in place, or, when it keeps history, its
/// number in [`Kept`], where it lives.
enum Held {
    Own(Counter),
    Kept(u32),
}

/// The count a counter let go holds ([`Counter::retire_if_idle`]): no
/// count ever is it, since every change keeps a count above it.
const LET_GO: i64 = i64::MIN;

/// The counters of one quota of one subject.
struct Counter {
    /// The window, its period and the day of the last change
    /// ([`Count::window_word`]): written under `slow` only, after `used`.
    window: AtomicU64,
    /// The count ([`Count::used`]), or [`LET_GO`]: changed by
    /// compare-and-swap only.
    used: AtomicI64,
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
    /// The closed days, one per day number modulo the history's length
    /// (the day of the last change is in the window word, and would take
    /// its place); with history, then one more: what remained after the
    /// latest day a later one took the place of (its use is forgotten
    /// with it). That is what remains on the days after it in its window,
    /// which may reach into the history kept (a month's first day leaves
    /// a history of 31 days while the rest of the month is in it); the
    /// Redis store keeps the same.
    days: Box<[DayRecord]>,
    /// When the count was last reset or set by UpdateUsage (wall
    /// nanoseconds; `i64::MIN` if never). A reset begins the count anew as
    /// a later window does, and a set fixes what remains: what
    /// was charged before it is not counted any more, so a refund or
    /// give-back of such a charge gets nothing (giving it would hand the
    /// new count units it never counted). A charge at the reset's very
    /// instant is taken as made after it, as one at a window's first
    /// instant is in that window. Kept here, under the lock, since only
    /// the changes that take the lock ask: a decision never does.
    reset_at: i64,
}

/// Writes the record of a day closed into a counter's `days` (see
/// [`Slow::days`]), in the place of the day the history's length before it,
/// which is carried past the history if it is the latest so replaced. A day
/// already written keeps its record: the first is written under the
/// numbers in force at the day's end (a quota about to change closes the
/// day of the last change at once, [`Counter::close_day`], and the next
/// change, under the new numbers, closes it again).
fn put_day(days: &mut [DayRecord], day: DayRecord) {
    let ring = match days.len() {
        1 => 1,
        n => n - 1,
    };
    let at = day.day.rem_euclid(ring as i64) as usize;
    let old = days[at];
    if old.day == day.day {
        return;
    }
    if let Some(carried) = (days.get_mut(ring)).filter(|c| old.day != day.day && old.day > c.day) {
        *carried = DayRecord { used: 0, ..old };
    }
    days[at] = day;
}

impl Counter {
    fn new(history_days: u32) -> Self {
        let days = history_days.max(1) as usize;
        // With history, one more record (see `Slow::days`).
        let len = if days > 1 { days + 1 } else { days };
        Counter {
            window: AtomicU64::new(Count::EMPTY.window_word()),
            used: AtomicI64::new(Count::EMPTY.used),
            history: days > 1,
            slow: Mutex::new(Slow {
                base: 0,
                days: vec![NO_DAY; len].into_boxed_slice(),
                reset_at: i64::MIN,
            }),
        }
    }

    /// The count as it stands, read under the counter's lock (`_slow`), where
    /// the window does not change: a count and its own window.
    #[inline]
    fn load(&self, _slow: &Slow) -> Count {
        let window = self.window.load(Ordering::Acquire);
        Count::from_words(window, self.used.load(Ordering::Acquire))
    }

    /// The count as a decision reads it, without the lock: the window, then
    /// the count (its own window's or a later one's, see the module's
    /// docs). A counter let go reads as retired, which [`Count::roll`]
    /// takes for a fresh one.
    #[inline]
    fn read(&self) -> Count {
        let window = self.window.load(Ordering::Acquire);
        match self.used.load(Ordering::Acquire) {
            LET_GO => Count::RETIRED,
            used => Count::from_words(window, used),
        }
    }

    /// Charges `cost` at `now` if it fits (`force`: even if it does not).
    /// `None` when the counter was let go.
    #[inline]
    fn acquire(&self, spec: &QuotaSpec, now: i64, cost: u64, force: bool) -> Option<Outcome> {
        // The window first: the count read after it is its own window's or
        // a later one's (see the module's docs).
        let window = self.window.load(Ordering::Acquire);
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            if used == LET_GO {
                return None;
            }
            match Count::from_words(window, used).acquire_today(spec, now, cost, force) {
                Some(Ok(next)) => match self.used.compare_exchange_weak(
                    used,
                    next.used,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some(Ok(next)),
                    Err(current) => used = current,
                },
                Some(Err(denied)) => return Some(Err(denied)),
                None => {
                    return self.change(now, spec, true, |c| {
                        match c.acquire(spec, now, cost, force) {
                            Ok(next) => (Some(next), Ok(next)),
                            Err(denied) => (None, Err(denied)),
                        }
                    });
                }
            }
        }
    }

    /// [`acquire`](Self::acquire) on the day of the last change alone,
    /// without the counter's lock: `Some(None)` when the decision would
    /// move the count to a new day or window (or it was never charged), a
    /// change left to a caller that knows the request is allowed. `None`
    /// when the counter was let go.
    #[inline]
    fn acquire_on_its_day(&self, spec: &QuotaSpec, now: i64, cost: u64) -> Option<Option<Outcome>> {
        let window = self.window.load(Ordering::Acquire);
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            if used == LET_GO {
                return None;
            }
            match Count::from_words(window, used).acquire_today(spec, now, cost, false) {
                Some(Ok(next)) => match self.used.compare_exchange_weak(
                    used,
                    next.used,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some(Some(Ok(next))),
                    Err(current) => used = current,
                },
                Some(Err(denied)) => return Some(Some(Err(denied))),
                None => return Some(None),
            }
        }
    }

    /// Applies `op` to the count moved to `now` ([`Count::roll`]) under the
    /// counter's lock; when it returns a new count, stores it (retrying on
    /// a decision that changed the count meanwhile) and writes the day it
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
        op: impl FnMut(Count) -> (Option<Count>, R),
    ) -> Option<R> {
        self.change_held(&mut self.slow.lock(), now, spec, usage, op)
    }

    /// [`change`](Self::change), with the counter's lock held (`slow`).
    #[inline]
    fn change_held<R>(
        &self,
        slow: &mut Slow,
        now: i64,
        spec: &QuotaSpec,
        usage: bool,
        mut op: impl FnMut(Count) -> (Option<Count>, R),
    ) -> Option<R> {
        // The window is stable under the lock; only decisions change the
        // count meanwhile.
        let window = self.window.load(Ordering::Acquire);
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let count = Count::from_words(window, used);
            if used == LET_GO || count.is_retired() {
                return None;
            }
            let rolled = count.roll(spec, now, slow.base);
            let (next, r) = op(rolled.count);
            let Some(mut next) = next else { return Some(r) };
            next.used = next.used.max(LET_GO + 1);
            match self
                .used
                .compare_exchange(used, next.used, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // After the count: a decision that reads this window
                    // reads this count or a later one.
                    let next_window = next.window_word();
                    if next_window != window {
                        self.window.store(next_window, Ordering::Release);
                    }
                    if let Some(day) = rolled.closed {
                        put_day(&mut slow.days, day);
                    }
                    slow.base = if usage {
                        rolled.base.min(next.used)
                    } else {
                        let shift = next.used.saturating_sub(rolled.count.used);
                        rolled.base.saturating_add(shift)
                    };
                    return Some(r);
                }
                Err(current) => used = current,
            }
        }
    }

    /// Gives back `cost` that a decision charged at `at` (wall nanoseconds)
    /// before a later limit denied it ([`Count::give_back`]), as a change on
    /// that day's usage. A count reset or set by UpdateUsage since (after
    /// `at`, even if a later decision charged it again; or empty again: the
    /// charge made it not empty, and only a reset or a set empties it) or
    /// let go no longer holds the charge, and gets nothing: giving it back
    /// there would hand the window units it never counted, or raise what
    /// remains past what was set.
    #[cold]
    fn give_back(&self, spec: &QuotaSpec, at: i64, cost: u64) {
        let mut slow = self.slow.lock();
        if at < slow.reset_at || self.load(&slow).is_empty() {
            return;
        }
        let _ = self.change_held(&mut slow, at, spec, true, |count| {
            (count.give_back(cost, at), ())
        });
    }

    /// Adjusts the count by a settlement's `delta` ([`Count::adjust`]) at
    /// `now`, for tokens charged at `charged_at`. A charge made before the
    /// last reset or UpdateUsage is no longer counted apart, as one made
    /// before the window began is not: an over-estimate of it gets nothing
    /// back. An
    /// under-estimate is charged whenever it was reserved (the count goes
    /// into debt, erring toward admitting less). `None` when the counter
    /// was let go.
    #[cold]
    fn adjust(
        &self,
        spec: &QuotaSpec,
        now: i64,
        delta: i64,
        charged_at: Option<i64>,
    ) -> Option<()> {
        let mut slow = self.slow.lock();
        let charged_at = charged_at.filter(|&t| t >= slow.reset_at);
        self.change_held(&mut slow, now, spec, true, |count| {
            (count.adjust(delta, charged_at), ())
        })
    }

    /// `[used, remaining]` for each day from `first` to `last`: the days
    /// closed, the day of the last change as it stands (unless closed), and
    /// the days of the changes logged since ([`add_changes`]).
    fn report(&self, spec: &QuotaSpec, log: &[Logged], first: i64, last: i64) -> Vec<[i64; 2]> {
        let slow = self.slow.lock();
        let count = self.load(&slow);
        let mut days = slow.days.to_vec();
        if let Some(today) = count.today(spec, slow.base) {
            put_day(&mut days, today);
        }
        days.retain(|r| r.day != NO_DAY.day);
        add_changes(&mut days, log, spec, last);
        report(spec, &days, log, first, last)
    }

    /// Writes the record of the day of the last change into the history
    /// at `now`, if that day is over, under `spec`: the numbers (and
    /// period) in force at its end, about to change (see
    /// [`Quotas::close_day`]). The count is not moved: the next change
    /// finds it where the last one left it, and decides as if no quota had
    /// changed meanwhile (a count carried into a window of a new period
    /// holds as far as that window holds the day of its last change).
    fn close_day(&self, spec: &QuotaSpec, now: i64) {
        let mut slow = self.slow.lock();
        let count = self.load(&slow);
        if count.day_over(now) {
            if let Some(day) = count.today(spec, slow.base) {
                put_day(&mut slow.days, day);
            }
        }
    }

    /// How the count stands (for a check that charges nothing).
    fn count(&self) -> Count {
        self.load(&self.slow.lock())
    }

    /// Sets what remains in the window at `now` (wall nanoseconds; AWS
    /// UpdateUsage), marked as a reset is: what was charged until now is in
    /// what was set, so a refund or give-back of it later gets nothing
    /// (given back, it would raise what remains past what was set).
    fn set_remaining(&self, spec: &QuotaSpec, now: i64, remaining: i64) -> Option<QuotaSnapshot> {
        let mut slow = self.slow.lock();
        // Never earlier than a mark before it (see `reset`).
        slow.reset_at = slow.reset_at.max(now);
        self.change_held(&mut slow, now, spec, false, |count| {
            let (next, snap) = count.set_remaining(spec, now, remaining);
            (Some(next), snap)
        })
    }

    /// Forgets the window's count and the history at `now` (wall
    /// nanoseconds); a counter let go stays so. What was charged until now
    /// is no longer counted: a settlement or give-back of it later gets
    /// nothing back (see [`Slow::reset_at`]).
    fn reset(&self, now: i64) {
        let mut slow = self.slow.lock();
        // Never earlier than a reset before it: a clock gone back does not
        // make charges forgiven then count again.
        slow.reset_at = slow.reset_at.max(now);
        let mut used = self.used.load(Ordering::Acquire);
        while used != LET_GO {
            match self.used.compare_exchange(
                used,
                Count::EMPTY.used,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.window
                        .store(Count::EMPTY.window_word(), Ordering::Release);
                    break;
                }
                Err(current) => used = current,
            }
        }
        slow.base = 0;
        slow.days.fill(NO_DAY);
    }

    /// Lets the counter go if it is idle at `now`: its count becomes
    /// [`LET_GO`], which a decision that read it before cannot charge.
    fn retire_if_idle(&self, now: i64) -> bool {
        let slow = self.slow.lock();
        let mut count = self.load(&slow);
        while count.used != LET_GO && !count.is_retired() && count.idle_at() <= now {
            match self.used.compare_exchange(
                count.used,
                LET_GO,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.window
                        .store(Count::RETIRED.window_word(), Ordering::Release);
                    return true;
                }
                // A decision charged it in its window, which has ended.
                Err(current) => count.used = current,
            }
        }
        false
    }

    fn is_retired(&self) -> bool {
        self.used.load(Ordering::Acquire) == LET_GO
    }
}

impl Quotas {
    /// Counters for a store of `max_keys` keys.
    pub(super) fn new(max_keys: usize) -> Self {
        Quotas {
            map: papaya::HashMap::builder()
                .hasher(BuildDigestHasher::default())
                .build(),
            kept: Kept::new(),
            short: AtomicUsize::new(0),
            cap: max_keys.max(1),
            next_idle: AtomicI64::new(i64::MIN),
            evicting: Mutex::new(()),
            making: Mutex::new(()),
            changes: Mutex::new(std::collections::HashMap::new()),
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
    #[inline(always)]
    fn with<R>(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        bounded: bool,
        mut f: impl FnMut(&Counter) -> Option<R>,
    ) -> Result<R, i64> {
        let key = Self::key(q);
        // A counter with history is never let go: found here, it is the
        // one the map holds, and `f` on it answers.
        let history = q.history_days() > 1;
        if history {
            if let Some(r) = self.kept.get(key).and_then(&mut f) {
                return Ok(r);
            }
        }
        let map = self.map.pin();
        loop {
            if let Some(held) = map.get(&key) {
                if let Some(r) = f(self.counter(held)) {
                    if let (true, Held::Kept(n)) = (history, held) {
                        self.kept.publish(*n);
                    }
                    return Ok(r);
                }
                // Let go: out of the map with it, whoever removed it first.
                if map
                    .remove_if(&key, |_, c| self.counter(c).is_retired())
                    .is_ok_and(|r| r.is_some())
                {
                    self.short.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            // `history` is what `Counter::new` keeps history by.
            let making = history.then(|| self.making.lock());
            if making.is_some() && map.contains_key(&key) {
                continue;
            }
            let counter = Counter::new(q.history_days());
            let held = if counter.history {
                // Made in `Kept`, published once the map holds it.
                match self.kept.push(key, counter) {
                    Ok(n) => Held::Kept(n),
                    Err(counter) => Held::Own(counter),
                }
            } else {
                self.reserve(now, bounded)?;
                Held::Own(counter)
            };
            match map.try_insert(key, held) {
                Ok(held) => {
                    if let Held::Kept(n) = held {
                        self.kept.publish(*n);
                    }
                    if let Some(r) = f(self.counter(held)) {
                        return Ok(r);
                    }
                }
                // Made by another thread meanwhile: give the place back (a
                // counter made in `Kept` stays there unpublished, which only
                // a thread making it without history at once can cause).
                Err(e) => {
                    if let Held::Own(c) = &e.not_inserted {
                        if !c.history {
                            self.short.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    /// The counter `held` is.
    #[inline]
    fn counter<'a>(&'a self, held: &'a Held) -> &'a Counter {
        match held {
            Held::Own(c) => c,
            Held::Kept(n) => self
                .kept
                .value(*n)
                .expect("a counter is made in `Kept` before the map holds its number"),
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
        for (key, held) in map.iter() {
            let counter = self.counter(held);
            if counter.history {
                continue;
            }
            if counter.retire_if_idle(now) {
                if map
                    .remove_if(key, |_, c| self.counter(c).is_retired())
                    .is_ok_and(|r| r.is_some())
                {
                    freed += 1;
                }
            } else if !counter.is_retired() {
                soonest = soonest.min(counter.count().idle_at());
            }
        }
        self.short.fetch_sub(freed, Ordering::Relaxed);
        if freed > 0 {
            // The places freed go to counters not made yet, whose windows
            // may end before any counter kept: the next search looks.
            self.next_idle.store(i64::MIN, Ordering::Relaxed);
            Ok(())
        } else {
            self.next_idle.store(soonest, Ordering::Relaxed);
            Err(soonest.saturating_sub(now).max(1))
        }
    }

    /// Decides `cost` for `q` at `now` (wall nanoseconds): charges it if it
    /// fits (`force`: even if not, a shadow plan counting its overage).
    /// `Err` is the wait for room for a new subject's counter.
    ///
    /// A cost of 0 (a peek, or a request that costs a token budget nothing)
    /// charges nothing, so it makes no counter and changes none: a subject
    /// never seen is answered as a fresh count, and takes no place under the
    /// cap (at the cap it is not refused for want of one, and peeks of many
    /// subjects leave the places to the requests that charge).
    #[inline]
    pub(super) fn acquire(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        cost: u64,
        force: bool,
    ) -> Result<Outcome, i64> {
        if cost == 0 {
            return Ok(self.peek(q, now, force));
        }
        self.with(q, now, true, |c| c.acquire(q.spec, now, cost, force))
    }

    /// [`acquire`](Self::acquire) (not forced) if it needs no change of
    /// day or window: `Ok(None)` when it would (or the count was never
    /// charged). A decision whose other limits may still deny it charges
    /// this way first: a charge given back leaves the count as it was, but
    /// one that moved it to a new day would leave that day as its last
    /// change (a denial changes nothing: the window a period put anew
    /// carries the count into is the one holding the day of its last real
    /// change).
    #[inline]
    pub(super) fn acquire_on_its_day(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        cost: u64,
    ) -> Result<Option<Outcome>, i64> {
        if cost == 0 {
            return Ok(Some(self.peek(q, now, false)));
        }
        self.with(q, now, true, |c| c.acquire_on_its_day(q.spec, now, cost))
    }

    /// [`acquire`](Self::acquire) of cost 0: the count as it stands, moved
    /// to `now` but not stored, read without the counter's lock as a
    /// decision reads it (a registered key's without papaya's guard).
    fn peek(&self, q: &QuotaRef<'_>, now: i64, force: bool) -> Outcome {
        let key = Self::key(q);
        let kept = (q.history_days() > 1).then(|| self.kept.get(key)).flatten();
        let count = match kept {
            Some(c) => c.read(),
            None => match self.map.pin().get(&key) {
                Some(held) => self.counter(held).read(),
                None => Count::EMPTY,
            },
        };
        count
            .roll(q.spec, now, 0)
            .count
            .acquire(q.spec, now, 0, force)
    }

    /// The count of `q` as it stands; empty when `q` has no counter (or one
    /// let go, which [`Count::roll`] takes for a fresh one).
    fn count(&self, q: &QuotaRef<'_>) -> Count {
        match self.map.pin().get(&Self::key(q)) {
            Some(c) => self.counter(c).count(),
            None => Count::EMPTY,
        }
    }

    /// Whether `cost` would fit in `q` at `now`, changing nothing.
    pub(super) fn check(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        cost: u64,
    ) -> Result<QuotaSnapshot, (u64, QuotaSnapshot)> {
        self.count(q).check(q.spec, now, cost)
    }

    /// Gives back to `q` the `cost` a decision at `at` (wall nanoseconds)
    /// charged before a later limit denied it (see [`Counter::give_back`]).
    /// A counter no longer in the map was let go, and the charge with it: no
    /// counter is made for it. A peek (cost 0) charged nothing and gets
    /// nothing: its count is left as it stands, not moved to `at`.
    pub(super) fn give_back(&self, q: &QuotaRef<'_>, at: i64, cost: u64) {
        if cost == 0 {
            return;
        }
        if let Some(held) = self.map.pin().get(&Self::key(q)) {
            self.counter(held).give_back(q.spec, at, cost);
        }
    }

    /// Adjusts the count of `q` by `delta` (see [`Count::adjust`]): a
    /// settlement of a request's actual cost.
    pub(super) fn adjust(&self, q: &QuotaRef<'_>, now: i64, delta: i64, charged_at: Option<i64>) {
        let _ = self.with(q, now, false, |c| c.adjust(q.spec, now, delta, charged_at));
    }

    /// Sets what remains of `q` in its window (AWS UpdateUsage).
    pub(super) fn set_remaining(
        &self,
        q: &QuotaRef<'_>,
        now: i64,
        remaining: i64,
    ) -> QuotaSnapshot {
        let set = self.with(q, now, false, |c| c.set_remaining(q.spec, now, remaining));
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
        let log = self
            .changes
            .lock()
            .get(&Self::log_key(q))
            .cloned()
            .unwrap_or_default();
        match self.map.pin().get(&Self::key(q)) {
            Some(c) => self.counter(c).report(q.spec, &log, first, last),
            None => report(q.spec, &[], &log, first, last),
        }
    }

    /// Where the numbers of `q`'s quota are logged: one place per quota of
    /// a plan or an account, whichever subject `q` names.
    fn log_key(q: &QuotaRef<'_>) -> u128 {
        let owner = match q.account {
            Some(a) => [b"a\0", a.as_bytes()].concat(),
            None => [b"p\0", q.plan.as_bytes()].concat(),
        };
        crate::hash::stable(&owner) ^ u128::from(q.spec.salt)
    }

    /// Logs `q`'s numbers before they change today (`now`, wall
    /// nanoseconds), unless a change earlier today did: the day's first
    /// change keeps the numbers in force at the end of the day before, as
    /// the Redis store's limit log does. Entries older than the history
    /// are dropped (no report reaches their days).
    pub(super) fn log_change(&self, q: &QuotaRef<'_>, now: i64) {
        let day = now.div_euclid(crate::window::NANOS_PER_DAY);
        let mut changes = self.changes.lock();
        let log = changes.entry(Self::log_key(q)).or_default();
        if log.last().is_some_and(|l| l.day >= day) {
            return;
        }
        let oldest = day - i64::from(q.history_days.max(1));
        log.retain(|l| l.day > oldest);
        log.push(Logged { day, spec: *q.spec });
    }

    /// Closes the day of the last change of `q` into its history at `now`
    /// (wall nanoseconds), if that day is over, under `q`'s numbers: those
    /// of a quota about to change, its period among them. A day is
    /// otherwise closed by the next change on a later day, under the
    /// numbers then, which would rewrite what remained at its end. The
    /// count stays where it is (see [`Counter::close_day`]). A subject with
    /// no counter has no day to close.
    pub(super) fn close_day(&self, q: &QuotaRef<'_>, now: i64) {
        if let Some(c) = self.map.pin().get(&Self::key(q)) {
            self.counter(c).close_day(q.spec, now);
        }
    }

    /// Forgets the window and history of `q` at `now` (wall nanoseconds):
    /// what was charged until then gets nothing back later. A subject with
    /// no counter has nothing charged to forget (a counter let go held
    /// only a window that has ended, which no refund reaches).
    pub(super) fn reset(&self, q: &QuotaRef<'_>, now: i64) {
        if let Some(c) = self.map.pin().get(&Self::key(q)) {
            self.counter(c).reset(now);
        }
    }

    /// How many (subject, quota) counters are kept.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::hash::{Digest, digest};
    use crate::plan::LimitKind;
    use crate::window::{Date, NANOS_PER_DAY, Period};

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
            salt: 7,
        }
    }

    fn quota<'a>(spec: &'a QuotaSpec, subject: Digest, history_days: u32) -> QuotaRef<'a> {
        QuotaRef {
            kind: LimitKind::Quota,
            spec,
            plan: "p",
            account: None,
            subject: b"",
            digest: subject,
            shadow: false,
            history_days,
        }
    }

    /// Charges one unit, as a decision does.
    fn take(qs: &Quotas, q: &QuotaRef<'_>, now: i64, cost: u64) -> bool {
        matches!(qs.acquire(q, now, cost, q.shadow), Ok(Ok(_)))
    }

    /// A DAY quota of `limit` created at `created_at`, its first window's
    /// limit `offset` lower.
    fn created(limit: u64, offset: u64, created_at: i64) -> QuotaSpec {
        QuotaSpec {
            offset,
            created_at,
            ..spec(limit, Period::Day)
        }
    }

    /// Four threads charge `q` one unit 3,000 times each from a second
    /// before midnight of 2024-05-01, every other charge moving a shared
    /// clock on by 1 ms: midnight passes while the others decide. Returns
    /// how many were admitted.
    fn across_midnight(qs: &Quotas, q: &QuotaRef<'_>) -> u64 {
        let clock = AtomicI64::new(t(2024, 5, 1, 86_399));
        let admitted = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for i in 0..3_000 {
                        let now = clock
                            .fetch_add(if i % 2 == 0 { 1_000_000 } else { 0 }, Ordering::Relaxed);
                        if take(qs, q, now, 1) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        admitted.into_inner()
    }

    #[test]
    fn day_quota_resets_at_midnight_and_not_a_nanosecond_before() {
        let qs = Quotas::new(16);
        let s = spec(3, Period::Day);
        let q = quota(&s, digest(b"k"), 31);
        let morning = t(2024, 5, 1, 8 * 3600);
        assert!((0..3).all(|_| take(&qs, &q, morning, 1)));
        let midnight = t(2024, 5, 2, 0);
        let (retry, count) = qs.acquire(&q, midnight - 1, 1, false).unwrap().unwrap_err();
        assert_eq!(retry, 1);
        assert_eq!(count.snapshot(&s, midnight - 1).remaining, 0);
        let count = qs.acquire(&q, midnight, 1, false).unwrap().unwrap();
        let snap = count.snapshot(&s, midnight);
        assert_eq!(snap.remaining, 2);
        assert_eq!(snap.reset, NANOS_PER_DAY as u64);
        // The day that closed is in the history, the new one beside it.
        let day = Date::new(2024, 5, 1).unwrap().days();
        assert_eq!(qs.report(&q, day, day + 1), vec![[3, 0], [1, 2]]);
    }

    #[test]
    fn month_quota_on_feb_29_of_a_leap_year() {
        let qs = Quotas::new(16);
        let s = spec(1, Period::Month);
        let q = quota(&s, digest(b"k"), 62);
        assert!(take(&qs, &q, t(2024, 2, 29, 0), 1));
        let (retry, _) = qs
            .acquire(&q, t(2024, 2, 29, 86_399), 1, false)
            .unwrap()
            .unwrap_err();
        assert_eq!(retry, S as u64);
        assert!(take(&qs, &q, t(2024, 3, 1, 0), 1));
    }

    #[test]
    fn offset_applies_to_the_creation_window_only() {
        let qs = Quotas::new(16);
        let s = created(5, 3, t(2024, 5, 1, 100));
        let q = quota(&s, digest(b"k"), 31);
        let ok = (0..10)
            .filter(|_| take(&qs, &q, t(2024, 5, 1, 200), 1))
            .count();
        assert_eq!(ok, 2);
        let ok = (0..10)
            .filter(|_| take(&qs, &q, t(2024, 5, 2, 0), 1))
            .count();
        assert_eq!(ok, 5);
    }

    /// The count a counter let go holds is never a live count's: a raise
    /// to the top of what UpdateUsage takes, in a creation window whose
    /// offset is above its limit, is kept, not taken for a counter let go
    /// (which would be dropped and made again, the raise lost).
    #[test]
    fn no_change_makes_a_count_look_let_go() {
        let qs = Quotas::new(16);
        let s = created(10, 20, t(2024, 5, 1, 100));
        let now = t(2024, 5, 1, 200);
        for history in [31u32, 1] {
            let q = quota(&s, digest(&history.to_le_bytes()), history);
            let raised = i64::MAX - 100;
            assert!(qs.set_remaining(&q, now, i64::MAX).remaining > raised as u64);
            assert!(take(&qs, &q, now, 5), "history {history}");
            let day = now / NANOS_PER_DAY;
            assert!(qs.report(&q, day, day)[0][1] > raised, "history {history}");
        }
        assert_eq!(qs.len(), 2);
    }

    /// Threads charging across the end of the creation window, whose limit
    /// is lower, into the next: each window admits at most its own limit,
    /// whether a thread read the window before or after it moved on.
    #[test]
    fn threads_racing_into_a_larger_window_admit_each_limit() {
        let qs = Quotas::new(16);
        let s = created(1_000, 400, t(2024, 5, 1, 0));
        let q = quota(&s, digest(b"race"), 31);
        let admitted = across_midnight(&qs, &q);
        let day = Date::new(2024, 5, 1).unwrap().days();
        let report = qs.report(&q, day, day + 1);
        assert_eq!(report[0], [600, 0], "the creation day");
        assert_eq!(report[1], [1_000, 0], "the next day");
        assert_eq!(admitted, 1_600);
    }

    #[test]
    fn clock_going_back_keeps_the_count() {
        let qs = Quotas::new(16);
        let s = spec(2, Period::Day);
        let q = quota(&s, digest(b"k"), 31);
        assert!(take(&qs, &q, t(2024, 5, 2, 10), 2));
        assert!(!take(&qs, &q, t(2024, 5, 1, 86_000), 1));
        assert!(!take(&qs, &q, t(2024, 5, 2, 20), 1));
    }

    /// A peek a later limit denies gives back its charge of nothing, which
    /// leaves the count where the last charge left it: not moved into the
    /// window of the peek, where a period put anew would look for it.
    #[test]
    fn a_peek_given_back_leaves_the_count_in_its_window() {
        let qs = Quotas::new(16);
        let s = spec(5, Period::Month);
        let q = quota(&s, digest(b"k"), 62);
        assert!(take(&qs, &q, t(2028, 2, 29, 100), 1));
        let before = qs.count(&q);
        let peek = t(2028, 3, 1, 3_600);
        let peeked = qs.acquire_on_its_day(&q, peek, 0).unwrap().unwrap();
        assert_eq!(peeked.unwrap().snapshot(&s, peek).remaining, 5);
        qs.give_back(&q, peek, 0);
        assert_eq!(qs.count(&q), before);
        // The week from Monday February 28 holds the day of the charge.
        let week = spec(1, Period::WEEK);
        let wq = quota(&week, digest(b"k"), 62);
        assert!(!take(&qs, &wq, peek, 1));
    }

    #[test]
    fn set_remaining_and_report() {
        let qs = Quotas::new(16);
        let s = spec(10, Period::WEEK);
        let q = quota(&s, digest(b"k"), 7);
        // 2024-05-06 is a Monday.
        let mon = t(2024, 5, 6, 3600);
        assert!(take(&qs, &q, mon, 3));
        let tue = t(2024, 5, 7, 3600);
        assert!(take(&qs, &q, tue, 2));
        let first = Date::new(2024, 5, 5).unwrap().days();
        let last = Date::new(2024, 5, 8).unwrap().days();
        // Sunday is in the previous week (full limit), then Monday, Tuesday, Wednesday.
        assert_eq!(
            qs.report(&q, first, last),
            vec![[0, 10], [3, 7], [2, 5], [0, 5]]
        );
        let snap = qs.set_remaining(&q, tue, 20);
        assert_eq!(snap.remaining, 20);
        // A raise is no usage: Tuesday still used 2.
        assert_eq!(qs.report(&q, last - 1, last - 1), vec![[2, 20]]);
        let ok = (0..30).filter(|_| take(&qs, &q, tue, 1)).count();
        assert_eq!(ok, 20);
        assert_eq!(qs.report(&q, last - 1, last - 1), vec![[22, 0]]);
        qs.set_remaining(&q, tue, 0);
        assert!(!take(&qs, &q, tue, 1));
        qs.reset(&q, tue);
        assert_eq!(qs.report(&q, first, last), vec![[0, 10]; 4]);
        assert!(take(&qs, &q, tue, 1));
    }

    #[test]
    fn force_counts_the_overage() {
        let qs = Quotas::new(16);
        let s = spec(1, Period::Day);
        let q = quota(&s, digest(b"k"), 1);
        let now = t(2024, 1, 1, 0);
        assert!(take(&qs, &q, now, 1));
        let count = qs.acquire(&q, now, 1, true).unwrap().unwrap();
        assert_eq!(count.snapshot(&s, now).remaining, 0);
        let day = now / NANOS_PER_DAY;
        assert_eq!(qs.report(&q, day, day), vec![[2, 0]]);
    }

    #[test]
    fn a_refund_gives_back_to_the_window_and_the_day_never_below_zero() {
        let qs = Quotas::new(16);
        let s = spec(10, Period::Month);
        let q = quota(&s, digest(b"k"), 31);
        let d1 = t(2024, 5, 1, 10);
        let d2 = t(2024, 5, 2, 10);
        assert!(take(&qs, &q, d1, 4));
        assert!(take(&qs, &q, d2, 1));
        // Three of yesterday's units come back today: the window gets them
        // all, today's usage stops at 0.
        qs.adjust(&q, d2, -3, Some(d1));
        let day = Date::new(2024, 5, 1).unwrap().days();
        assert_eq!(qs.report(&q, day, day + 1), vec![[4, 6], [0, 8]]);
        // Nothing charged in an earlier window comes back.
        qs.adjust(&q, t(2024, 6, 1, 0), -1, Some(d2));
        assert!(take(&qs, &q, t(2024, 6, 1, 0), 10));
        // A debt goes past the limit.
        qs.adjust(&q, t(2024, 6, 1, 1), 5, None);
        let (_, count) = qs
            .acquire(&q, t(2024, 6, 1, 2), 1, false)
            .unwrap()
            .unwrap_err();
        assert_eq!(count.used, 15);
    }

    /// What remains of `q` at `now`.
    fn remaining(qs: &Quotas, q: &QuotaRef<'_>, now: i64) -> u64 {
        qs.check(q, now, 0).unwrap().remaining
    }

    /// UpdateUsage marks the count as a reset does: a give-back or a
    /// settled over-estimate of a charge from before it gets nothing (it
    /// would raise what remains past what was set), one from after it
    /// comes back as always; as the Redis store's "s".
    #[test]
    fn a_charge_from_before_an_update_usage_comes_back_to_nothing() {
        let qs = Quotas::new(16);
        let s = spec(10, Period::Day);
        let (before, set, after) = (t(2024, 5, 1, 10), t(2024, 5, 1, 11), t(2024, 5, 1, 12));
        for history in [31u32, 1] {
            let q = quota(&s, digest(&history.to_le_bytes()), history);
            assert!(take(&qs, &q, before, 6));
            assert_eq!(qs.set_remaining(&q, set, 1).remaining, 1);
            qs.give_back(&q, before, 5);
            qs.adjust(&q, after, -5, Some(before));
            assert_eq!(remaining(&qs, &q, after), 1, "history {history}");
            assert!(take(&qs, &q, after, 1));
            qs.give_back(&q, after, 1);
            assert_eq!(remaining(&qs, &q, after), 1, "history {history}");
        }
    }

    /// A charge that a later limit denied comes back exactly: a count below
    /// zero after a raise by UpdateUsage goes back as far below (held at
    /// zero, the denials would eat the raise), and the day's usage is what
    /// it was.
    #[test]
    fn a_denied_charge_comes_back_exactly_below_zero() {
        let qs = Quotas::new(16);
        let s = spec(2, Period::Day);
        let now = t(2024, 5, 1, 10);
        let day = now / NANOS_PER_DAY;
        for history in [31u32, 1] {
            let q = quota(&s, digest(&history.to_le_bytes()), history);
            assert_eq!(qs.set_remaining(&q, now, 5).remaining, 5);
            assert!(take(&qs, &q, now, 1));
            for _ in 0..3 {
                assert!(take(&qs, &q, now, 1));
                qs.give_back(&q, now, 1);
            }
            assert_eq!(remaining(&qs, &q, now), 4, "history {history}");
            assert_eq!(qs.report(&q, day, day), vec![[1, 4]], "history {history}");
        }
    }

    /// A count reset between a decision's charge and its give-back no
    /// longer holds the charge: nothing comes back, raised or not.
    #[test]
    fn a_charge_given_back_after_a_reset_grants_nothing() {
        let qs = Quotas::new(16);
        let s = spec(2, Period::Day);
        let now = t(2024, 5, 1, 10);
        for raise in [None, Some(5)] {
            let q = quota(&s, digest(format!("{raise:?}").as_bytes()), 31);
            if let Some(r) = raise {
                qs.set_remaining(&q, now, r);
            }
            assert!(take(&qs, &q, now, 1));
            qs.reset(&q, now);
            qs.give_back(&q, now, 1);
            assert_eq!(remaining(&qs, &q, now), 2, "raise {raise:?}");
        }
    }

    /// A reset forgives what was charged before it, as a new window does:
    /// once later decisions charged the count again, a give-back or a
    /// settled over-estimate of a charge from before the reset still gets
    /// nothing (it would grant the new count units twice). A charge made
    /// after the reset comes back as always, and an under-estimate is
    /// charged whenever it was reserved.
    #[test]
    fn a_charge_from_before_a_reset_comes_back_to_no_later_count() {
        let qs = Quotas::new(16);
        let s = spec(10, Period::Day);
        let (before, reset, after) = (t(2024, 5, 1, 10), t(2024, 5, 1, 11), t(2024, 5, 1, 12));
        for history in [31u32, 1] {
            let q = quota(&s, digest(&history.to_le_bytes()), history);
            assert!(take(&qs, &q, before, 9));
            qs.reset(&q, reset);
            assert!(take(&qs, &q, after, 10));
            qs.give_back(&q, before, 1);
            qs.adjust(&q, after, -8, Some(before));
            assert_eq!(remaining(&qs, &q, after), 0, "history {history}");
            qs.adjust(&q, after, -4, Some(after));
            assert_eq!(remaining(&qs, &q, after), 4, "history {history}");
            // At the reset's very instant: taken as after it, as a charge
            // at a window's first instant is in that window.
            qs.adjust(&q, after, -1, Some(reset));
            assert_eq!(remaining(&qs, &q, after), 5, "history {history}");
            qs.adjust(&q, after, 4, Some(before));
            assert_eq!(remaining(&qs, &q, after), 1, "history {history}");
        }
    }

    /// Threads charging a raised count and giving each charge back at once
    /// leave it where it was: charges and give-backs sum in any order, also
    /// when a give-back takes the count below zero before an earlier one.
    #[test]
    fn threads_charging_and_giving_back_a_raised_count_leave_it_as_it_was() {
        let qs = Quotas::new(16);
        let s = spec(2, Period::Day);
        let q = quota(&s, digest(b"raised"), 31);
        let now = t(2024, 5, 1, 10);
        qs.set_remaining(&q, now, 6);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..2_000 {
                        assert!(take(&qs, &q, now, 1));
                        qs.give_back(&q, now, 1);
                    }
                });
            }
        });
        assert_eq!(remaining(&qs, &q, now), 6);
        let day = now / NANOS_PER_DAY;
        assert_eq!(qs.report(&q, day, day), vec![[0, 6]]);
    }

    #[test]
    fn a_day_history_holds_history_days_days() {
        let qs = Quotas::new(16);
        let s = spec(100, Period::Month);
        let q = quota(&s, digest(b"k"), 3);
        for d in 1..=5 {
            assert!(take(&qs, &q, t(2024, 5, d, 0), u64::from(d)));
        }
        let first = Date::new(2024, 5, 1).unwrap().days();
        // Days 1 and 2 are forgotten, but for what remained after day 2,
        // the latest day forgotten: the days after it in its window, in
        // the history, remain as much until they change it.
        assert_eq!(
            qs.report(&q, first, first + 4),
            vec![[0, 100], [0, 97], [3, 94], [4, 90], [5, 85]]
        );
    }

    /// A subject's counter is one whether a request asks for it with
    /// history (a registered key, found through `Kept`) or without (the
    /// same key answered by a resolver): what one charged, the other sees.
    #[test]
    fn a_counter_is_one_whichever_history_it_is_asked_with() {
        let qs = Quotas::new(16);
        let s = spec(5, Period::Day);
        let now = t(2024, 5, 1, 10);
        for (first, then) in [(1, 31), (31, 1)] {
            let subject = digest(format!("k{first}").as_bytes());
            let (a, b) = (quota(&s, subject, first), quota(&s, subject, then));
            assert!(take(&qs, &a, now, 3));
            let ok = (0..5).filter(|_| take(&qs, &b, now, 1)).count();
            assert_eq!(ok, 2, "made with {first} days, asked with {then}");
            assert!(!take(&qs, &a, now, 1));
        }
        assert_eq!(qs.len(), 2);
    }

    /// Threads making and charging one new counter at once, half of them
    /// asking with history and half without, admit exactly the limit: the
    /// counter is made once, in the map, and `Kept` only finds it.
    #[test]
    fn threads_asking_with_and_without_history_share_one_counter() {
        let s = spec(2_000, Period::Day);
        let now = t(2024, 5, 1, 10);
        for round in 0..20 {
            let qs = Quotas::new(16);
            let subject = digest(format!("new-{round}").as_bytes());
            let admitted = AtomicU64::new(0);
            std::thread::scope(|scope| {
                for thread in 0..4 {
                    let (qs, admitted) = (&qs, &admitted);
                    scope.spawn(move || {
                        let q = quota(&s, subject, if thread % 2 == 0 { 31 } else { 1 });
                        for _ in 0..1_500 {
                            if take(qs, &q, now, 1) {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert_eq!(admitted.load(Ordering::Relaxed), 2_000, "round {round}");
            assert_eq!(qs.len(), 1);
        }
    }

    /// Threads making thousands of counters with history at once (the
    /// index that finds them without a guard growing under them) admit
    /// exactly each one's limit: no counter is made twice, none is lost.
    #[test]
    fn threads_making_many_counters_with_history_admit_each_limit() {
        let qs = Quotas::new(16);
        let s = spec(3, Period::Day);
        let now = t(2024, 5, 1, 10);
        let subjects: Vec<Digest> = (0..3_000u32).map(|i| digest(&i.to_le_bytes())).collect();
        let admitted = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for thread in 0..4usize {
                let (qs, s, subjects, admitted) = (&qs, &s, &subjects, &admitted);
                scope.spawn(move || {
                    for round in 0..2 {
                        // Each thread in its own order, so that they race
                        // on making the same counters.
                        for i in 0..subjects.len() {
                            let at = (i * (2 * thread + 1) + round * 7) % subjects.len();
                            let q = quota(s, subjects[at], 31);
                            if take(qs, &q, now, 1) {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 3 * 3_000);
        assert_eq!(qs.len(), 3_000);
        // Each made once: none left unpublished by a race.
        assert_eq!(qs.kept.counts(), (3_000, 3_000));
        for &subject in &subjects {
            let q = quota(&s, subject, 31);
            assert!(!take(&qs, &q, now, 1));
            let day = now / NANOS_PER_DAY;
            assert_eq!(qs.report(&q, day, day), vec![[3, 0]]);
        }
    }

    /// Threads charging one quota at once, across midnight on a shared
    /// clock, admit exactly the limit of each day: the check and the charge
    /// are one step, on the hot path and on the locked one alike.
    #[test]
    fn threads_hammering_one_quota_never_over_admit() {
        let qs = Quotas::new(16);
        let s = spec(1_000, Period::Day);
        let q = quota(&s, digest(b"hot"), 31);
        let admitted = across_midnight(&qs, &q);
        // 6,000 ms of time: midnight comes 1 s in, each day then has room
        // for fewer than the 12,000 attempts. A request dated before
        // midnight but charged after another had opened the new day counts
        // in the new window, never the old one: so what each day admitted
        // is read from the windows, and every admitted request must be in
        // one of them.
        let day = Date::new(2024, 5, 1).unwrap().days();
        let report = qs.report(&q, day, day + 1);
        assert_eq!(report[0], [1_000, 0], "the first day");
        assert_eq!(report[1], [1_000, 0], "the second day");
        assert_eq!(admitted, 2_000);
    }

    /// At the cap, a new subject waits until a counter goes idle, and an
    /// idle counter let go while threads decide on it loses no charge.
    #[test]
    fn idle_counters_are_let_go_and_live_ones_never_are() {
        let qs = Quotas::new(4);
        let s = spec(2, Period::Day);
        let day1 = t(2024, 5, 1, 0);
        let subjects: Vec<Digest> = (0..8u32).map(|i| digest(&i.to_le_bytes())).collect();
        for d in &subjects[..4] {
            assert!(take(&qs, &quota(&s, *d, 1), day1, 1));
        }
        let wait = qs
            .acquire(&quota(&s, subjects[4], 1), day1, 1, false)
            .unwrap_err();
        assert_eq!(wait, NANOS_PER_DAY);
        assert_eq!(qs.len(), 4);
        // Live counters were kept: each has one unit left.
        assert!(take(&qs, &quota(&s, subjects[0], 1), day1, 1));
        assert!(!take(&qs, &quota(&s, subjects[0], 1), day1, 1));

        // The next day all are idle. Threads decide on the old subjects
        // while new ones evict: every subject gets exactly its 2 a day.
        let day2 = t(2024, 5, 2, 0);
        let admitted: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|scope| {
            for th in 0..4 {
                let (qs, s, subjects, admitted) = (&qs, &s, &subjects, &admitted);
                scope.spawn(move || {
                    for round in 0..50 {
                        let i = (th + round) % 8;
                        if take(qs, &quota(s, subjects[i], 1), day2, 1) {
                            admitted[i].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        for (i, a) in admitted.iter().enumerate() {
            assert!(a.load(Ordering::Relaxed) <= 2, "subject {i} over-admitted");
        }
        assert!(qs.len() <= 4 + 4, "{}", qs.len());
        assert!(qs.short.load(Ordering::Relaxed) <= 4);
    }
}
