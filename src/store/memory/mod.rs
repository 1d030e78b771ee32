//! The in-memory store: a lock-free table of 16-byte slots that grows with
//! its keys, up to a size fixed by its cap.
//!
//! Each slot holds a key's 64-bit fingerprint and its throttle state (the
//! GCRA TAT), stored xored with the fingerprint. Deciding for a key already
//! tracked is three loads and a 64-bit compare-and-swap: no lock, no
//! allocation. Because a key's state is stored under its own fingerprint, a
//! slot can be handed from one key to another safely while other threads
//! decide (see the table's module for why).
//!
//! Memory is bounded by construction: the table has at most two slots for
//! each of `max_keys` keys (rounded up to a power of two; 32 bytes per key of
//! cap), allocated in 64 KiB pages as they are first touched. It starts at
//! 16,384 slots (or the cap, if smaller) and doubles when half of its
//! slots have been used (as full as the table at its cap) or a new key
//! finds no room near its hash position, so a store used far below its
//! cap stays on few pages (each decision on a key spread over a table of
//! 32 MiB would miss the TLB). Keys move to their places in the doubled
//! table without stopping decisions: the
//! inserts after a doubling sweep the slots used before it, and a decision
//! that finds its key not yet moved moves it. A key whose bucket is
//! full again (its TAT has passed) is *idle*: its state is the same as a key
//! never seen, so its slot is reused by the next new key that needs one. No
//! sweeper thread and nothing for the user to schedule.
//!
//! At the cap: a key lives within 32 slots of its hash position. When
//! every slot of a new key's window holds a key with live state, the new key is
//! refused (with `max_keys` live keys, the table half full, this happens to a
//! handful of keys in a million; past `max_keys` it grows more likely) (the layer answers 429 with a `Retry-After` of the time until the
//! first of those slots goes idle). Keys already tracked are never evicted while
//! they hold state: forgetting one would hand it a fresh burst, i.e. over-admit.
//! For the same reason, tokens settled for a key whose slot went idle and was
//! taken meanwhile, when no slot is free, are kept beside the table (one TAT
//! per such key, until the key gets a slot; all dropped once the latest has
//! passed, and until then only a key not in the table looks there, under a
//! lock). At most 256 are kept: past that the earliest TAT is dropped, which
//! errs toward admitting that key sooner.

mod builder;
mod changes;
mod kept;
mod quotas;
mod resets;
mod table;

pub use self::builder::MemoryStoreBuilder;

pub(crate) use super::verdict::applied;
use super::verdict::{Tally, cap_has_room, ever_fits, quota_applied};

use std::fmt;
use std::sync::Arc;

use self::changes::Changes;
use self::quotas::Quotas;
use self::resets::Resets;
use self::table::{SlotKey, Table};

use super::{
    Acquire, Acquired, Denial, Denied, MAX_QUOTAS, MAX_THROTTLES, Permit, QuotaRef, Report,
    Settlement, Sink, Store, StoreError, StoreFuture, ThrottleRef, Verdict,
};
use crate::clock::Clock;
use crate::gcra::{Gcra, MAX_SPAN, Nanos, Outcome};
use crate::hash::{self, Digest};
use crate::plan::{Limit, LimitKind};
use crate::quota::Count;
use crate::window::Date;

/// The default store: state in this process, lock-free per key, bounded memory.
///
/// Clones share one table.
///
/// ```
/// use tollgate::MemoryStore;
///
/// let store = MemoryStore::builder().max_keys(100_000).build().unwrap();
/// assert!(store.capacity() >= 100_000);
/// assert_eq!(store.tracked_keys(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Clock,
    /// Throttle states and counts of requests in flight: of anonymous
    /// subjects (client IPs, a per-key policy's keys) in the first table,
    /// of registered ones (key ids, accounts, the stage) in the second
    /// (see [`hash::registered`]). Each may grow to the store's cap, so that
    /// a flood of anonymous clients, which may fill its own, never takes a
    /// registered key's room.
    tables: [Table; 2],
    /// Quota counters and their daily history.
    quotas: Quotas,
    /// When each token bucket was last reset: written by `reset`, read by
    /// `settle` alone, never by a decision.
    resets: Resets,
    /// Each token bucket's changes of numbers while serving: written by
    /// `rescale`, read by `settle` alone, never by a decision.
    changes: Changes,
}

impl Inner {
    /// The table of a subject's state: one for registered subjects, one for
    /// anonymous ones.
    #[inline(always)]
    fn table(&self, d: Digest) -> &Table {
        &self.tables[usize::from(hash::registered(d))]
    }
}

impl MemoryStore {
    /// A store with the system clock and room for 1,000,000 keys.
    pub fn new() -> Self {
        Self::builder().build().expect("the defaults are valid")
    }

    /// Configures a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// How many slots the table may grow to (twice the keys it is sized
    /// for); [`allocated_bytes`](Self::allocated_bytes) tells what it holds.
    ///
    /// Anonymous subjects (client IPs, a per-key policy's keys) and
    /// registered ones (API keys, accounts, the stage) each have a table of
    /// this size, so that a flood of clients without a key cannot take the
    /// room of a key that has one.
    pub fn capacity(&self) -> usize {
        self.inner.tables[0].slots() as usize
    }

    /// Slots that hold live state now (buckets not yet full again, requests
    /// in flight): one per live limit of a key, so a key with a throttle and
    /// a token bucket counts twice. This walks the whole table: for tests
    /// and occasional metrics, not per request.
    pub fn tracked_keys(&self) -> usize {
        let now = self.inner.clock.nanos();
        self.inner.tables.iter().map(|t| t.live(now)).sum()
    }

    /// Quota counters kept: one for each quota a subject has used (a
    /// registered key's quota, daily and monthly token budgets), with its
    /// daily usage history.
    pub fn quota_counters(&self) -> usize {
        self.inner.quotas.len()
    }

    /// Lowers what remains of `quota` in its current window to `remaining`
    /// if more remains here (the Redis store's local copy learning how the
    /// shared count stands).
    #[cfg(feature = "redis")]
    pub(crate) fn quota_at_most(&self, quota: &QuotaRef<'_>, remaining: u64) {
        let wall = self.inner.clock.wall_nanos();
        let remaining = i64::try_from(remaining).unwrap_or(i64::MAX);
        self.inner.quotas.at_most(quota, wall, remaining);
    }

    /// How far ahead of now the TAT of throttle `t` stands here: the time
    /// until its bucket is full again (0 when it is; nothing charged).
    #[cfg(feature = "redis")]
    pub(crate) fn throttle_ahead(&self, t: &ThrottleRef<'_>) -> Nanos {
        let now = self.inner.clock.nanos();
        let slot = SlotKey::new(t.digest, t.limit.salt);
        self.inner
            .table(t.digest)
            .peek(slot, now)
            .saturating_sub(now)
    }

    /// The store's clock.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Bytes of table allocated so far (pages are allocated on first touch).
    pub fn allocated_bytes(&self) -> usize {
        self.inner.tables.iter().map(Table::allocated_bytes).sum()
    }

    /// Decides `req` against every throttle and the quota: all are charged,
    /// or none. Limits marked shadow charge what fits, count quota overage,
    /// and never deny.
    ///
    /// When a limit denies, the rest are looked at without charging, so that
    /// the answer names the limit that will hold the request longest: a
    /// cost no limit can ever hold first, then a used-up quota, then the
    /// throttle with the longest wait.
    ///
    /// How every limit stands after an allowed decision goes to `report`
    /// (for headers); a `()` sink computes none of it.
    #[inline]
    pub(crate) fn decide<R: Sink>(&self, req: &Acquire<'_>, report: &mut R) -> Result<(), Denied> {
        if let Some(t) = req.lone_throttle() {
            return self.decide_throttle(t, req.cost_for(t.counts_tokens()), report);
        }
        let clock = &self.inner.clock;
        let mut read = None;
        if !req.has_caps() {
            // Admitted on the ticker's time; what it would deny is decided
            // below on the counter's (see `Clock::recent_nanos`).
            let now = clock.recent_nanos();
            let mark = report.mark();
            if self.decide_clear(req, now, report) {
                return Ok(());
            }
            report.rewind(mark);
            read = Some(now).filter(|_| !clock.lags());
        }
        let now = read.unwrap_or_else(|| clock.nanos());
        let cost = req.cost;
        // The TAT each throttle was charged to, for exact refunds.
        let mut charged = [None; MAX_THROTTLES];
        // A place under each concurrency cap (the plan's, the model's) is
        // taken first, and given back if another limit denies. A peek, or a
        // decision whose caller will not give a place back (`check`), only
        // looks: a full cap denies it, a free one is reported with its free
        // places. Its denial is weighed last, as every store weighs it.
        let mut permits = [None; 2];
        let mut tally = Tally::default();
        for (c, held) in req.caps().zip(&mut permits) {
            let slot = SlotKey::new(c.digest, c.salt);
            let table = self.inner.table(c.digest);
            if R::HOLDS && cost > 0 && !tally.is_denied() {
                let taken = table.update(slot, now, |v| {
                    let n = in_flight(v);
                    if cap_has_room(n, c.limit, c.shadow) {
                        (Some(with_in_flight(n + 1)), Ok(n + 1))
                    } else {
                        (None, Err(n))
                    }
                });
                match taken {
                    Ok(Ok(n)) => {
                        if n > u64::from(c.limit) {
                            // Past a shadow cap: taken, and told.
                            report.overrun(true, || Denied::concurrency(c.applied(n - 1)));
                        }
                        *held = Some((Some(Permit::new(c.digest.0, c.salt)), c.applied(n)));
                    }
                    Ok(Err(n)) => tally.deny_cap(Denied::concurrency(c.applied(n))),
                    // A shadow cap never denies: a place the table has no
                    // room to count is not taken, as a shadow throttle
                    // without room charges nothing.
                    Err(_) if c.shadow => *held = Some((None, c.applied(0))),
                    Err(retry_after) => {
                        tally.deny_cap(Denied {
                            denial: Denial::Capacity { retry_after },
                            limit: c.applied(u64::from(c.limit)),
                        });
                    }
                }
            } else {
                let n = in_flight(table.peek(slot, now));
                if !cap_has_room(n, c.limit, c.shadow) {
                    tally.deny_cap(Denied::concurrency(c.applied(n)));
                } else {
                    if n >= u64::from(c.limit) && !tally.is_denied() {
                        report.overrun(true, || Denied::concurrency(c.applied(n)));
                    }
                    *held = Some((None, c.applied(n + u64::from(cost > 0))));
                }
            }
        }
        // Once a limit has denied, the others are only looked at.
        for (i, t) in req.throttles().enumerate() {
            let limit = t.limit;
            let cost = req.cost_for(t.counts_tokens());
            let d = match self.throttle_step(t, cost, now, tally.is_denied()) {
                Ok(Outcome::Allow { tat, after }) => {
                    if !tally.is_denied() {
                        charged[i] = Some(tat);
                        throttle_allowed(report, t, cost, after, now);
                    }
                    continue;
                }
                other => throttle_denial(limit, other, now),
            };
            if t.shadow {
                // A shadow limit never denies, nor names another's denial.
                if !tally.is_denied() {
                    report.push(|| d.limit);
                    report.overrun(false, || d);
                }
                continue;
            }
            tally.deny(d);
        }
        // The quotas: each looked at first, and charged (each by its own
        // compare-and-swap) only once no limit denies. A charge given back
        // restores the count, but not the day of its last change when the
        // charge moved it to a new day: so a denial found by looking
        // charges nothing at all. Those charged before a later one denies
        // (a decision racing this one took the last units) are given back.
        let mut quotas_charged = [false; MAX_QUOTAS];
        if req.quotas().next().is_some() {
            let wall = self.inner.clock.wall_nanos_at(now);
            let quotas = &self.inner.quotas;
            for q in req.quotas() {
                let cost = u64::from(req.cost_for(q.counts_tokens()));
                match quotas.check(q, wall, cost) {
                    Ok(_) => {}
                    Err(_) if q.shadow => {}
                    // A cost above the whole limit fits no window's limit:
                    // it is refused with no retry, unless UpdateUsage raised
                    // what remains of this window above the limit and it
                    // fits there (then it is decided as any cost is).
                    Err((_, snap)) if !ever_fits(cost, q.spec.limit) => {
                        tally.deny(Denied::too_costly(quota_applied(q.kind, &snap)));
                    }
                    Err((retry_after, snap)) => tally.deny(Denied {
                        denial: Denial::Quota { retry_after },
                        limit: quota_applied(q.kind, &snap),
                    }),
                }
            }
            for (i, q) in req.quotas().enumerate() {
                if tally.is_denied() {
                    break;
                }
                let cost = u64::from(req.cost_for(q.counts_tokens()));
                if q.shadow {
                    // A shadow quota counts past its limit: told whether
                    // this request goes over it, as a quota would deny it.
                    if let Err((retry_after, snap)) = quotas.check(q, wall, cost) {
                        let limit = quota_applied(q.kind, &snap);
                        report.overrun(false, || match ever_fits(cost, q.spec.limit) {
                            true => Denied {
                                denial: Denial::Quota { retry_after },
                                limit,
                            },
                            false => Denied::too_costly(limit),
                        });
                    }
                }
                let outcome = match quotas.acquire(q, wall, cost, q.shadow) {
                    Ok(outcome) => outcome,
                    // No room for another subject's counter: refused until
                    // one goes idle, as a new key at the table's cap is.
                    Err(wait) => {
                        let fresh = Count::EMPTY.check(q.spec, wall, 0);
                        let fresh = fresh.unwrap_or_else(|(_, s)| s);
                        if q.shadow {
                            // A shadow quota never denies: uncounted, it
                            // reports a fresh window.
                            report.push(|| quota_applied(q.kind, &fresh));
                            continue;
                        }
                        tally.deny(Denied {
                            denial: Denial::Capacity {
                                retry_after: wait.max(1) as Nanos,
                            },
                            limit: quota_applied(q.kind, &fresh),
                        });
                        continue;
                    }
                };
                match outcome {
                    Ok(count) => {
                        quotas_charged[i] = true;
                        if q.counts_tokens() {
                            report.reserve(|r| r.wall = Some(wall));
                        }
                        report.push(|| quota_applied(q.kind, &count.snapshot(q.spec, wall)));
                    }
                    // A shadow quota is charged even past its limit.
                    Err(_) if q.shadow => {}
                    Err((retry_after, count)) => {
                        let snap = count.snapshot(q.spec, wall);
                        let cost = u64::from(req.cost_for(q.counts_tokens()));
                        tally.deny(if ever_fits(cost, q.spec.limit) {
                            Denied {
                                denial: Denial::Quota { retry_after },
                                limit: quota_applied(q.kind, &snap),
                            }
                        } else {
                            Denied::too_costly(quota_applied(q.kind, &snap))
                        });
                    }
                }
            }
            if tally.is_denied() {
                for (q, _) in req.quotas().zip(quotas_charged).filter(|(_, c)| *c) {
                    quotas.give_back(q, wall, u64::from(req.cost_for(q.counts_tokens())));
                }
            }
        }
        match tally.verdict() {
            None => {
                for (permit, item) in permits.into_iter().flatten() {
                    report.push(|| item);
                    if let Some(permit) = permit {
                        report.hold(permit);
                    }
                }
                Ok(())
            }
            Some(d) => {
                self.refund(req, &charged, now);
                for (permit, _) in permits.into_iter().flatten() {
                    if let Some(permit) = permit {
                        self.leave(permit, now);
                    }
                }
                Err(d)
            }
        }
    }

    /// Decides a request without concurrency caps whose every limit has
    /// room, as [`decide`](Self::decide) would, without its bookkeeping for
    /// denials: `true` when every limit was charged and reported. On the
    /// first limit that denies (or is a shadow, or has no room for a new
    /// subject), what was charged is given back exactly, as `decide` gives
    /// it back, and `false` leaves the request to `decide`'s general path,
    /// which names the denial. A plan's throttles and quota, the common
    /// full plan, then cost their own steps and little more: the general
    /// path's tallies, arrays of what was charged and looks at every kind of
    /// limit cost as much again as a quota's decision.
    #[inline]
    fn decide_clear<R: Sink>(&self, req: &Acquire<'_>, now: Nanos, report: &mut R) -> bool {
        // The TAT each throttle was charged to, for exact refunds.
        let mut charged: [Nanos; MAX_THROTTLES] = [0; MAX_THROTTLES];
        let mut throttles = 0;
        let mut cleared = true;
        for t in req.throttles() {
            let cost = req.cost_for(t.counts_tokens());
            if t.shadow {
                cleared = false;
                break;
            }
            match self.throttle_step(t, cost, now, false) {
                Ok(Outcome::Allow { tat, after }) => {
                    charged[throttles] = tat;
                    throttles += 1;
                    throttle_allowed(report, t, cost, after, now);
                }
                _ => {
                    cleared = false;
                    break;
                }
            }
        }
        let mut quotas_charged = 0;
        let mut wall = 0;
        if cleared && req.quotas().next().is_some() {
            wall = self.inner.clock.wall_nanos_at(now);
            for q in req.quotas() {
                let cost = u64::from(req.cost_for(q.counts_tokens()));
                if q.shadow || !ever_fits(cost, q.spec.limit) {
                    cleared = false;
                    break;
                }
                // Only on the count's day: a charge that moves it to a new
                // day is made once every limit is known to allow (below).
                match self.inner.quotas.acquire_on_its_day(q, wall, cost) {
                    Ok(Some(Ok(count))) => {
                        quotas_charged += 1;
                        if q.counts_tokens() {
                            report.reserve(|r| r.wall = Some(wall));
                        }
                        report.push(|| quota_applied(q.kind, &count.snapshot(q.spec, wall)));
                    }
                    _ => {
                        cleared = false;
                        break;
                    }
                }
            }
        }
        if cleared {
            return true;
        }
        for q in req.quotas().take(quotas_charged) {
            let cost = u64::from(req.cost_for(q.counts_tokens()));
            self.inner.quotas.give_back(q, wall, cost);
        }
        for (t, &mine) in req.throttles().zip(&charged[..throttles]) {
            self.refund_throttle(t, req.cost_for(t.counts_tokens()), now, mine);
        }
        false
    }

    /// Decides a request whose only limit is the throttle `t` (not a
    /// shadow): what [`decide`](Self::decide) does for it, without the
    /// bookkeeping that several limits need (what to refund, which denial
    /// holds longest). The common plan, a throttle alone, pays only for the
    /// clock read, the slot update and the limit's description.
    #[inline(always)]
    pub(crate) fn decide_throttle<R: Sink>(
        &self,
        t: &ThrottleRef<'_>,
        cost: u32,
        report: &mut R,
    ) -> Result<(), Denied> {
        debug_assert!(
            !t.shadow,
            "a shadow throttle never denies: decide it with `decide`"
        );
        let now = self.inner.clock.recent_nanos();
        match self.throttle_step(t, cost, now, false) {
            Ok(Outcome::Allow { after, .. }) => {
                throttle_allowed(report, t, cost, after, now);
                Ok(())
            }
            other => self.throttle_denied(t, cost, report, other, now),
        }
    }

    /// A lone throttle's denial on `now`, a time that may lag: decided
    /// again on the counter, so that a denial and the wait it names are
    /// exact (a client retrying when told is admitted).
    #[cold]
    #[inline(never)]
    fn throttle_denied<R: Sink>(
        &self,
        t: &ThrottleRef<'_>,
        cost: u32,
        report: &mut R,
        first: Result<Outcome, Nanos>,
        now: Nanos,
    ) -> Result<(), Denied> {
        let clock = &self.inner.clock;
        if !clock.lags() {
            return Err(throttle_denial(t.limit, first, now));
        }
        let now = clock.nanos();
        match self.throttle_step(t, cost, now, false) {
            Ok(Outcome::Allow { after, .. }) => {
                throttle_allowed(report, t, cost, after, now);
                Ok(())
            }
            other => Err(throttle_denial(t.limit, other, now)),
        }
    }

    /// Decides a request whose limits are the throttle `first`, the
    /// throttle `second` (a method override), if any, and the request quota
    /// `q`, if any (none a shadow, none counting tokens), when they all
    /// allow it: what [`decide`](Self::decide) does for them, without
    /// describing the request as an [`Acquire`]. `false`: one of them would
    /// deny (or the cost never fits the quota), nothing is charged, and the
    /// request is to be decided in full, which names the denial.
    #[inline(always)]
    pub(crate) fn decide_clear_of<R: Sink>(
        &self,
        first: &ThrottleRef<'_>,
        second: Option<&ThrottleRef<'_>>,
        q: Option<&QuotaRef<'_>>,
        cost: u32,
        report: &mut R,
    ) -> bool {
        debug_assert!(!first.shadow && !first.counts_tokens());
        debug_assert!(second.is_none_or(|t| !t.shadow && !t.counts_tokens()));
        debug_assert!(q.is_none_or(|q| !q.shadow && !q.counts_tokens()));
        if q.is_some_and(|q| !ever_fits(u64::from(cost), q.spec.limit)) {
            return false;
        }
        // Admitted on the ticker's time: `false` leaves the request to the
        // general path, which decides it on the counter's.
        let now = self.inner.clock.recent_nanos();
        // `tat` and `mine`: what each throttle was charged to, for exact refunds.
        let Ok(Outcome::Allow { tat, after }) = self.throttle_step(first, cost, now, false) else {
            return false;
        };
        let mark = report.mark();
        throttle_allowed(report, first, cost, after, now);
        let mut also = None;
        if let Some(t) = second {
            let Ok(Outcome::Allow { tat: mine, after }) = self.throttle_step(t, cost, now, false)
            else {
                report.rewind(mark);
                self.refund_throttle(first, cost, now, tat);
                return false;
            };
            also = Some((t, mine));
            throttle_allowed(report, t, cost, after, now);
        }
        let Some(q) = q else { return true };
        let wall = self.inner.clock.wall_nanos_at(now);
        if let Ok(Ok(count)) = self.inner.quotas.acquire(q, wall, u64::from(cost), false) {
            report.push(|| quota_applied(q.kind, &count.snapshot(q.spec, wall)));
            return true;
        }
        report.rewind(mark);
        self.refund_throttle(first, cost, now, tat);
        if let Some((t, mine)) = also {
            self.refund_throttle(t, cost, now, mine);
        }
        false
    }

    /// Gives back what `t` was charged at `now` for `cost` (its TAT became
    /// `mine`), as exactly as the TAT allows since.
    #[cold]
    fn refund_throttle(&self, t: &ThrottleRef<'_>, cost: u32, now: Nanos, mine: Nanos) {
        let limit = t.limit;
        let slot = SlotKey::new(t.digest, limit.salt);
        let _ = self.inner.table(t.digest).update(slot, now, |tat| {
            (Some(limit.gcra.refund(tat, now, mine, cost)), ())
        });
    }

    /// One throttle's step at `now`: charges `cost` if it fits, or, when
    /// `peek`, only tells how it stands (after another limit has denied).
    /// `Err` is the wait for a slot when the table is full.
    #[inline(always)]
    fn throttle_step(
        &self,
        t: &ThrottleRef<'_>,
        cost: u32,
        now: Nanos,
        peek: bool,
    ) -> Result<Outcome, Nanos> {
        let gcra = &t.limit.gcra;
        let slot = SlotKey::new(t.digest, t.limit.salt);
        let table = self.inner.table(t.digest);
        if peek {
            return Ok(gcra.decide(table.peek(slot, now), now, cost));
        }
        table.update(slot, now, |tat| {
            let o = gcra.decide(tat, now, cost);
            match o {
                Outcome::Allow { tat, .. } => (Some(tat), o),
                _ => (None, o),
            }
        })
    }

    /// Gives back a place under a concurrency cap.
    fn leave(&self, permit: Permit, now: Nanos) {
        let place = Digest(permit.place);
        let slot = SlotKey::new(place, permit.id);
        let _ = self.inner.table(place).update(slot, now, |v| {
            (Some(with_in_flight(in_flight(v).saturating_sub(1))), ())
        });
    }

    /// Gives back what this request charged. A throttle gets back at most what
    /// is still ahead of `now` of the TAT this request stored, so a refund can
    /// never return capacity that later requests have already been granted.
    fn refund(&self, req: &Acquire<'_>, charged: &[Option<Nanos>], now: Nanos) {
        for (t, mine) in req.throttles().zip(charged) {
            let Some(mine) = *mine else { continue };
            let cost = req.cost_for(t.counts_tokens());
            let limit = t.limit;
            let slot = SlotKey::new(t.digest, limit.salt);
            let _ = self.inner.table(t.digest).update(slot, now, |tat| {
                (Some(limit.gcra.refund(tat, now, mine, cost)), ())
            });
        }
    }

    /// Sets the throttle's TAT to `f(tat, now)`. Errs with that TAT and
    /// `now` when the key is not in the table and no slot is free for it.
    fn update_throttle(
        &self,
        t: &ThrottleRef<'_>,
        f: impl Fn(Nanos, Nanos) -> Nanos,
    ) -> Result<(), (Nanos, Nanos)> {
        let now = self.inner.clock.nanos();
        let slot = SlotKey::new(t.digest, t.limit.salt);
        let mut new = 0;
        self.inner
            .table(t.digest)
            .update(slot, now, |tat| {
                new = f(tat, now);
                (Some(new), ())
            })
            .map_err(|_| (new, now))
    }
}

impl Store for MemoryStore {
    /// Never made: the memory store always answers at once
    /// ([`Acquired::Ready`]). A type of no size keeps the layer's response
    /// future small.
    type Future = std::future::Pending<Result<Verdict, StoreError>>;

    fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    #[inline]
    fn acquire(&self, request: &Acquire<'_>) -> Acquired<Self::Future> {
        let mut report = Report::default();
        Acquired::Ready(Ok(self.decide(request, &mut report).map(|()| report)))
    }

    /// The memory store always answers at once, in place.
    #[inline]
    fn decide_now(&self, request: &Acquire<'_>, report: &mut Report) -> Option<Result<(), Denied>> {
        Some(self.decide(request, report))
    }

    #[inline]
    fn decide_clear_now(
        &self,
        first: &ThrottleRef<'_>,
        second: Option<&ThrottleRef<'_>>,
        quota: Option<&QuotaRef<'_>>,
        cost: u32,
        report: &mut Report,
    ) -> Option<Result<(), Denied>> {
        self.decide_clear_of(first, second, quota, cost, report)
            .then_some(Ok(()))
    }

    #[inline]
    fn decide_clear_unreported(
        &self,
        first: &ThrottleRef<'_>,
        second: Option<&ThrottleRef<'_>>,
        quota: Option<&QuotaRef<'_>>,
        cost: u32,
    ) -> Option<Result<(), Denied>> {
        self.decide_clear_of(first, second, quota, cost, &mut ())
            .then_some(Ok(()))
    }

    #[inline]
    fn decide_throttle_now(
        &self,
        throttle: &ThrottleRef<'_>,
        cost: u32,
        report: &mut Report,
    ) -> Option<Result<(), Denied>> {
        Some(self.decide_throttle(throttle, cost, report))
    }

    #[inline]
    fn decide_throttle_unreported(
        &self,
        throttle: &ThrottleRef<'_>,
        cost: u32,
    ) -> Option<Result<(), Denied>> {
        Some(self.decide_throttle(throttle, cost, &mut ()))
    }

    fn usage(&self, quota: &QuotaRef<'_>, first: Date, last: Date) -> StoreFuture<Vec<[i64; 2]>> {
        let (first, last) = (first.days(), last.days());
        let days = self.inner.quotas.report(quota, first, last);
        Box::pin(std::future::ready(Ok(days)))
    }

    fn set_remaining(&self, quota: &QuotaRef<'_>, remaining: u64) -> StoreFuture<u64> {
        // Admin refuses these before asking; a caller of the trait gets the
        // Redis store's answer, not a count silently cut to i64::MAX.
        if let Err(e) = crate::usage::check_remaining(remaining) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let remaining = remaining as i64;
        let wall = self.inner.clock.wall_nanos();
        let snap = self.inner.quotas.set_remaining(quota, wall, remaining);
        Box::pin(std::future::ready(Ok(snap.remaining)))
    }

    fn reset(
        &self,
        throttles: &[ThrottleRef<'_>],
        quota: Option<&QuotaRef<'_>>,
    ) -> StoreFuture<()> {
        // The TAT goes back to now at most, which makes the key idle.
        let now = self.inner.clock.nanos();
        for t in throttles {
            let slot = SlotKey::new(t.digest, t.limit.salt);
            let _ = self
                .inner
                .table(t.digest)
                .update(slot, now, |tat| (Some(tat.min(now)), ()));
            // A token bucket's share reserved until now is refilled: a
            // settlement of it later gives nothing back (see `Resets`).
            // Only a token bucket is ever given something back after its
            // decision here (a decision's own give-back, when a later limit
            // denies, is made before it returns), so only it is marked.
            if t.counts_tokens() {
                self.inner.resets.mark(slot, now, t.limit.gcra.span());
            }
        }
        if let Some(q) = quota {
            // What the count held until now is forgiven: a reservation made
            // before settles nothing back to it (see `Quotas::reset`).
            self.inner.quotas.reset(q, self.inner.clock.wall_nanos());
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn release(&self, permit: Permit) {
        self.leave(permit, self.inner.clock.nanos());
    }

    /// Moves the per-minute bucket's TAT by the difference and the token
    /// quotas' counts by it (an under-estimate may go past the limit). An
    /// over-estimate gets back from the bucket only what of the estimate's
    /// own share has not refilled yet (tokens that have refilled since may
    /// have been granted to later requests, and are not handed out twice),
    /// and nothing when the bucket was reset after the reservation (the
    /// reset refilled the share); from a quota only in the window that
    /// counted it, and not after the count was reset.
    fn settle(&self, settlement: &Settlement<'_>) {
        let delta = settlement.delta;
        if delta == 0 {
            return;
        }
        if let Some(t) = &settlement.throttle {
            let mut shift = delta
                .unsigned_abs()
                .saturating_mul(t.limit.gcra.interval())
                .min(MAX_SPAN);
            let mut until = settlement.reserved.until;
            // Reserved under numbers changed since: converted to the
            // current ones first, as the bucket was at each change.
            let converted = self
                .inner
                .changes
                .convert(t.limit.salt, t.limit, shift, until);
            if let Some(c) = converted {
                (shift, until) = (c.shift.min(MAX_SPAN), c.until);
            }
            if delta > 0 {
                let kept = self.update_throttle(t, |tat, now| {
                    tat.max(now)
                        .saturating_add(shift)
                        .min(now.saturating_add(MAX_SPAN))
                });
                // The key's slot went idle and was taken, and the table is
                // full: the charge waits beside it, never lost.
                if let Err((charged, now)) = kept {
                    let slot = SlotKey::new(t.digest, t.limit.salt);
                    self.inner.table(t.digest).keep_stray(slot, charged, now);
                }
            } else if let Some(until) = until {
                // A bucket reset since the reservation refilled its share
                // already: given back, it would be granted twice. (Without
                // a decision time, which only an overflow leaves, any reset
                // counts as later: erring toward admitting less.)
                let at = settlement.reserved_at().unwrap_or(0);
                let slot = SlotKey::new(t.digest, t.limit.salt);
                if !self.inner.resets.since(slot, at) {
                    let _ = self
                        .update_throttle(t, |tat, now| Gcra::refund_span(tat, now, until, shift));
                }
            }
        }
        if settlement.quotas().next().is_some() {
            let wall = self.inner.clock.wall_nanos();
            for q in settlement.quotas() {
                let charged_at = settlement.reserved.wall;
                self.inner.quotas.adjust(q, wall, delta, charged_at);
            }
        }
    }

    /// Closes the day of the last change into the history now, under the
    /// numbers it was counted under, and logs those numbers for the
    /// quota's days without a record (see [`Store::requota`]).
    fn requota(&self, old: &QuotaRef<'_>) {
        let wall = self.inner.clock.wall_nanos();
        self.inner.quotas.log_change(old, wall);
        self.inner.quotas.close_day(old, wall);
    }

    /// Converts the state at once: the share of the bucket in use is kept, so
    /// an emptied bucket stays empty and refills at the new rate.
    fn rescale(&self, old: &ThrottleRef<'_>, new: &ThrottleRef<'_>) {
        let _ = self.update_throttle(new, |tat, now| {
            old.limit.gcra.rescale(tat, now, &new.limit.gcra)
        });
        // A token bucket's settlements made after the change are converted
        // as its state was (see `Changes`).
        if new.counts_tokens() {
            let now = self.inner.clock.nanos();
            self.inner
                .changes
                .log(new.limit.salt, old.limit, new.limit, now);
        }
    }
}

/// The top bit marks a slot holding a count of requests in flight rather
/// than a TAT: a count is never idle (it is above any `now`), and a count
/// of 0 is stored as 0, idle, so that its slot can serve another key.
const IN_FLIGHT: u64 = 1 << 63;

fn in_flight(v: Nanos) -> u64 {
    if v & IN_FLIGHT != 0 {
        v & !IN_FLIGHT
    } else {
        0
    }
}

fn with_in_flight(n: u64) -> Nanos {
    if n == 0 { 0 } else { IN_FLIGHT | n }
}

/// Reports a throttle that allowed `cost`, its TAT now `after`; for the
/// per-minute token bucket, also when the estimate's own share refills, which
/// bounds what settling an over-estimate gives back.
#[inline(always)]
fn throttle_allowed<R: Sink>(
    report: &mut R,
    t: &ThrottleRef<'_>,
    cost: u32,
    after: Nanos,
    now: Nanos,
) {
    if t.counts_tokens() {
        let span = u64::from(cost) * t.limit.gcra.interval();
        match t.kind() {
            LimitKind::AccountTokensMinute => {
                report.reserve(|r| r.account_until = Some(now + span))
            }
            LimitKind::ModelTokensMinute => report.reserve(|r| r.model_until = Some(now + span)),
            _ => report.reserve(|r| r.until = Some(now + span)),
        }
    }
    report.push(|| applied(t.limit, after, now));
}

/// The denial of a throttle's step that did not allow: its outcome, or the
/// wait for a slot.
#[inline]
fn throttle_denial(limit: &Limit, step: Result<Outcome, Nanos>, now: Nanos) -> Denied {
    match step {
        Ok(o) => denial(limit, o, now),
        Err(retry_after) => Denied {
            denial: Denial::Capacity { retry_after },
            limit: applied(limit, 0, now),
        },
    }
}

/// The denial of a throttle that did not allow.
fn denial(limit: &Limit, o: Outcome, now: Nanos) -> Denied {
    match o {
        Outcome::Deny { at, retry_after } => Denied {
            denial: Denial::Limited { retry_after },
            limit: applied(limit, at, now),
        },
        Outcome::TooCostly { at } | Outcome::Allow { after: at, .. } => Denied {
            denial: Denial::TooCostly,
            limit: applied(limit, at, now),
        },
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity", &self.capacity())
            .field("allocated_bytes", &self.allocated_bytes())
            .field("clock", &self.inner.clock)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::error::ConfigError;
    // Anonymous subjects' digests: the tests below look into the first table.
    use crate::hash::state_digest as digest;
    use crate::plan::Throttle;
    use crate::quota::QuotaSpec;
    use crate::store::Report;

    /// One plan-wide throttle, decided alone.
    struct OneLimit(Limit);

    fn plan(rate: f64, burst: u32) -> OneLimit {
        let t = Throttle::new(rate, burst).unwrap();
        OneLimit(Limit::new(crate::plan::LimitKind::Throttle, &t, "p", ""))
    }

    impl MemoryStore {
        fn acquire_one(&self, l: &OneLimit, key: Digest, cost: u32) -> Result<Report, Denied> {
            let mut req = Acquire::new(cost, crate::FailureMode::Open);
            req.push(ThrottleRef {
                limit: &l.0,
                plan: Some("p"),
                account: None,
                subject: b"",
                digest: key,
                shadow: false,
            });
            let mut report = Report::default();
            self.decide(&req, &mut report).map(|()| report)
        }
    }

    fn store(max_keys: usize) -> (MemoryStore, ManualClock) {
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .max_keys(max_keys)
            .clock(clock.clone())
            .build()
            .unwrap();
        (s, clock)
    }

    #[test]
    fn burst_then_one_per_interval_through_the_table() {
        let (s, clock) = store(1024);
        let p = plan(2.0, 5);
        let k = digest(b"client");
        let admitted = (0..10).filter(|_| s.acquire_one(&p, k, 1).is_ok()).count();
        assert_eq!(admitted, 5);
        let denied = s.acquire_one(&p, k, 1).unwrap_err();
        assert_eq!(
            denied.denial,
            Denial::Limited {
                retry_after: 500_000_000
            }
        );
        clock.advance(Duration::from_millis(499));
        assert!(s.acquire_one(&p, k, 1).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(s.acquire_one(&p, k, 1).is_ok());
        assert!(s.acquire_one(&p, k, 1).is_err());
        // Another key has its own bucket.
        assert!(s.acquire_one(&p, digest(b"other"), 1).is_ok());
        assert_eq!(s.tracked_keys(), 2);
    }

    /// What the lagging time (the system clock's ticker) would deny is
    /// decided on the counter: a client retrying when told is admitted, and
    /// a request the counter denies is denied with the wait it names.
    #[test]
    fn a_lagging_time_never_denies_what_the_counter_admits() {
        let (s, clock) = store(1024);
        clock.lag_recent(Duration::from_millis(3));
        let p = plan(10.0, 1);
        let k = digest(b"client");
        assert!(s.acquire_one(&p, k, 1).is_ok());
        let Denial::Limited { retry_after } = s.acquire_one(&p, k, 1).unwrap_err().denial else {
            panic!("a throttle's denial");
        };
        // Admitted on a time 3 ms old, so the wait, on the counter, is 3 ms
        // short of the interval: what a lag may grant.
        assert_eq!(retry_after, 97_000_000);
        clock.advance(Duration::from_nanos(retry_after - 1));
        assert!(s.acquire_one(&p, k, 1).is_err());
        clock.advance(Duration::from_nanos(1));
        // The lagging time alone would deny this (its TAT is 3 ms ahead).
        assert!(s.acquire_one(&p, k, 1).is_ok());
        let Denial::Limited { retry_after } = s.acquire_one(&p, k, 1).unwrap_err().denial else {
            panic!("a throttle's denial");
        };
        assert_eq!(retry_after, 100_000_000, "charged on the counter's time");
        clock.advance(Duration::from_nanos(retry_after));
        assert!(s.acquire_one(&p, k, 1).is_ok());
    }

    /// A full plan's direct path declines on the lagging time, and the
    /// general path then decides on the counter's.
    #[test]
    fn a_full_plan_on_a_lagging_time_is_decided_on_the_counter_when_it_would_deny() {
        let (s, clock) = store(1024);
        clock.lag_recent(Duration::from_millis(3));
        let (p, spec, k) = (plan(10.0, 1), day_quota(20), digest(b"k"));
        let (t, q) = (throttle_ref(&p, k), quota_ref(&spec, LimitKind::Quota, k));
        assert!(s.decide_clear_of(&t, None, Some(&q), 1, &mut ()));
        clock.advance(Duration::from_millis(97));
        assert!(!s.decide_clear_of(&t, None, Some(&q), 1, &mut ()));
        assert!(decide_in_full(&s, t, q).is_ok());
        assert!(decide_in_full(&s, t, q).is_err());
    }

    /// A full plan decided for a caller that reads no report (a layer
    /// sending no headers) is decided as one decided with a report: the
    /// same verdicts, request by request, until the quota is spent.
    #[test]
    fn a_clear_plan_unreported_is_decided_as_reported() {
        let (reported, _) = store(1024);
        let (unreported, _) = store(1024);
        let (p, spec, k) = (plan(1_000.0, 1_000), day_quota(5), digest(b"k"));
        let (t, q) = (throttle_ref(&p, k), quota_ref(&spec, LimitKind::Quota, k));
        let mut verdicts = Vec::new();
        for _ in 0..8 {
            let mut report = Report::default();
            let with = reported.decide_clear_now(&t, None, Some(&q), 1, &mut report);
            let without = unreported.decide_clear_unreported(&t, None, Some(&q), 1);
            assert_eq!(with.is_some(), without.is_some());
            verdicts.push(without.is_some());
        }
        assert_eq!(
            verdicts,
            [true, true, true, true, true, false, false, false]
        );
    }

    /// A DAY quota of `limit`.
    fn day_quota(limit: u64) -> QuotaSpec {
        QuotaSpec {
            limit,
            period: crate::Period::Day,
            offset: 0,
            created_at: 0,
            salt: 9,
        }
    }

    /// One unit on the throttle `t` and the quota `q`, through `decide`.
    fn decide_in_full(s: &MemoryStore, t: ThrottleRef<'_>, q: QuotaRef<'_>) -> Result<(), Denied> {
        let mut req = Acquire::new(1, crate::FailureMode::Open);
        req.push(t);
        req.quota = Some(q);
        s.decide(&req, &mut ())
    }

    /// What a full plan's direct path charged on a lagging time before a
    /// later limit denied is given back exactly: the throttle keeps the
    /// room the refused request took.
    #[test]
    fn a_charge_on_a_lagging_time_is_given_back_when_a_later_limit_denies() {
        let (s, clock) = store(1024);
        clock.lag_recent(Duration::from_millis(3));
        let (p, spec, k) = (plan(10.0, 3), day_quota(1), digest(b"k"));
        let (t, q) = (throttle_ref(&p, k), quota_ref(&spec, LimitKind::Quota, k));
        assert!(decide_in_full(&s, t, q).is_ok());
        // The quota is spent: the throttle, charged first each time, is
        // given back each time.
        for _ in 0..5 {
            assert!(!s.decide_clear_of(&t, None, Some(&q), 1, &mut ()));
            assert!(decide_in_full(&s, t, q).is_err());
        }
        // Two of the throttle's three are left, exactly.
        assert!(s.acquire_one(&p, k, 1).is_ok());
        assert!(s.acquire_one(&p, k, 1).is_ok());
        assert!(s.acquire_one(&p, k, 1).is_err());
    }

    /// Admissions on a time `lag` old grant, over any span `w`, at most
    /// what the throttle grants over `w + lag`: `burst + (w + lag) / T`.
    #[test]
    fn a_lagging_time_grants_at_most_its_lag_of_the_rate_more() {
        let (s, clock) = store(1024);
        let lag = Duration::from_millis(7);
        clock.lag_recent(lag);
        let (rate, burst) = (200.0, 3);
        let interval = 5_000_000u64;
        let p = plan(rate, burst);
        let k = digest(b"k");
        let (mut at, mut admitted) = (0u64, Vec::new());
        let mut seed = 11u64;
        for _ in 0..20_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let gap = (seed >> 33) % (2 * interval / 3);
            clock.advance(Duration::from_nanos(gap));
            at += gap;
            if s.acquire_one(&p, k, 1).is_ok() {
                admitted.push(at);
            }
        }
        let lag = lag.as_nanos() as u64;
        let mut most_over = 0i64;
        for (i, &start) in admitted.iter().enumerate() {
            for (n, &end) in admitted[i..].iter().enumerate() {
                let bound = u64::from(burst) + (end - start + lag) / interval;
                let count = n as u64 + 1;
                assert!(count <= bound, "{count} admitted in {} ns", end - start);
                let exact = u64::from(burst) + (end - start) / interval;
                most_over = most_over.max(count as i64 - exact as i64);
                if end - start > 20 * interval {
                    break;
                }
            }
        }
        // The lag was used: some span got more than the counter alone grants.
        assert!(most_over >= 1, "{most_over}");
        assert!(admitted.len() > 5_000, "{}", admitted.len());
    }

    #[test]
    fn peek_of_unseen_key_takes_no_slot() {
        let (s, _clock) = store(1024);
        let p = plan(1.0, 3);
        let r = s.acquire_one(&p, digest(b"k"), 0).unwrap();
        assert_eq!(r.items()[0].remaining, 3);
        assert_eq!(s.tracked_keys(), 0);
        assert_eq!(s.allocated_bytes(), 0);
    }

    #[test]
    fn idle_keys_are_evicted_by_reuse() {
        // 256 slots; fill far more keys than that over time: the idle ones make room.
        let (s, clock) = store(128);
        let p = plan(10.0, 1); // a key's bucket is full 100 ms after its request
        for round in 0..20u32 {
            for i in 0..100u32 {
                let k = digest(&[round.to_le_bytes(), i.to_le_bytes()].concat());
                assert!(s.acquire_one(&p, k, 1).is_ok(), "round {round} key {i}");
            }
            clock.advance(Duration::from_millis(100));
        }
        assert!(s.allocated_bytes() <= 256 * 16);
        assert_eq!(s.tracked_keys(), 0);
    }

    #[test]
    fn anonymous_subjects_that_fill_their_table_leave_registered_ones_room() {
        let (s, _clock) = store(128);
        let p = plan(1.0, 10);
        let refused = (0..10_000u32)
            .filter(|i| s.acquire_one(&p, digest(&i.to_le_bytes()), 1).is_err())
            .count();
        assert!(refused >= 10_000 - 256, "{refused}");
        for i in 0..128u32 {
            let k = crate::hash::id_digest(format!("key-{i}").as_bytes());
            assert!(s.acquire_one(&p, k, 1).is_ok(), "registered key {i}");
        }
        assert!(s.acquire_one(&p, digest(b"one more"), 1).is_err());
        assert_eq!(s.allocated_bytes(), 2 * 256 * 16, "each table at its cap");
    }

    #[test]
    fn the_cap_holds_and_refuses_new_keys_without_evicting_live_ones() {
        // 256 slots.
        let (s, clock) = store(128);
        let p = plan(1.0, 10); // a key stays live for 1 s after one request
        let mut refused = 0;
        for i in 0..10_000u32 {
            match s.acquire_one(&p, digest(&i.to_le_bytes()), 1) {
                Ok(_) => {}
                Err(d) => {
                    assert!(
                        matches!(d.denial, Denial::Capacity { retry_after } if retry_after > 0 && retry_after <= 1_000_000_000)
                    );
                    refused += 1;
                }
            }
        }
        assert!(s.tracked_keys() <= s.capacity());
        assert!(refused >= 10_000 - 256);
        assert_eq!(s.allocated_bytes(), 256 * 16, "memory stays at the cap");
        // A tracked key keeps its state: it was charged once, 9 more pass.
        let first = digest(&0u32.to_le_bytes());
        assert_eq!(
            (0..20)
                .filter(|_| s.acquire_one(&p, first, 1).is_ok())
                .count(),
            9
        );
        // Once the keys go idle, new keys get in again.
        clock.advance(Duration::from_secs(11));
        assert!(s.acquire_one(&p, digest(b"late"), 1).is_ok());
    }

    #[test]
    fn max_keys_live_keys_fit() {
        let (s, _clock) = store(20_000);
        let p = plan(1.0, 10);
        let refused = (0..20_000u32)
            .filter(|i| s.acquire_one(&p, digest(&i.to_le_bytes()), 1).is_err())
            .count();
        // Half full, a 32-slot window is all live for almost no key.
        assert!(refused <= 2, "{refused} of 20000 refused");
    }

    #[test]
    fn threads_hammering_one_key_admit_exactly_burst() {
        let (s, _clock) = store(1024);
        let p = plan(1.0, 1000);
        let admitted = AtomicU32::new(0);
        let k = digest(b"hot");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..5_000 {
                        if s.acquire_one(&p, k, 1).is_ok() {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 1000);
    }

    #[test]
    fn threads_inserting_the_same_new_keys_never_duplicate_them() {
        let (s, _clock) = store(4096);
        let p = plan(1.0, 3);
        let admitted = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for i in 0..500u32 {
                        for _ in 0..2 {
                            if s.acquire_one(&p, digest(&i.to_le_bytes()), 1).is_ok() {
                                admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        // 500 keys, 8 attempts each, a bucket of 3: exactly 3 each.
        assert_eq!(admitted.into_inner(), 1500);
        assert_eq!(s.tracked_keys(), 500);
    }

    #[test]
    fn threads_deciding_while_slots_change_hands_never_mix_keys() {
        // 256 slots, 8,000 keys over time that go idle 2 ms after their last
        // request, and a clock moving forward while four threads decide: idle
        // slots keep changing hands under the deciders. Each key belongs to one
        // thread, so each thread can check that a key never admits more than
        // its bucket plus what refilled while it was being decided: a decision
        // landing in another key's slot, or a key stored twice, would let a
        // key exceed that.
        let (s, clock) = store(128);
        let p = plan(1_000.0, 2);
        let admitted_total = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for t in 0..4u32 {
                let (s, p, clock, total) = (&s, &p, &clock, &admitted_total);
                scope.spawn(move || {
                    let time = Clock::from(clock.clone());
                    for round in 0..20_000u32 {
                        // Every thread moves the shared clock as it works.
                        clock.advance(Duration::from_micros(20));
                        let k = digest(&[t.to_le_bytes(), (round % 2_000).to_le_bytes()].concat());
                        let before = time.nanos();
                        let admitted = (0..4).filter(|_| s.acquire_one(p, k, 1).is_ok()).count();
                        let elapsed = time.nanos() - before;
                        let allowed = 2 + (elapsed / 1_000_000) as usize + 1;
                        assert!(admitted <= allowed, "key admitted {admitted} > {allowed}");
                        total.fetch_add(admitted as u32, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        // The threads did decide (not only get refused for room): far more
        // admissions than slots means slots changed hands many times.
        let total = admitted_total.into_inner();
        assert!(total > 80_000, "only {total} admitted");
    }

    /// Live keys at positions below 15,000 of a table at its first 2^14
    /// slots, until it doubles to 2^15.
    fn double_from_first_size(t: &Table, now: Nanos) {
        assert_eq!(t.size(), 1 << 14);
        let mut n = 0u32;
        while t.size() == 1 << 14 {
            let k = SlotKey::at(crate::hash::mix(u64::from(n)) as u32 % 15_000, 1_000 + n);
            assert!(t.update(k, now, |_| (Some(now + 1), ())).is_ok());
            n += 1;
        }
        assert_eq!(t.size(), 1 << 15);
    }

    /// A window full of keys placed before a doubling, in the part of the
    /// table not yet swept, takes a new key once those that belong higher
    /// up have moved: the table does not double for it, and every key
    /// keeps its state.
    #[test]
    fn a_window_full_of_keys_not_yet_swept_takes_a_new_key_without_doubling() {
        let t = Table::new(1 << 16);
        let now = 1_000;
        let live = |n: u64| move |_: Nanos| (Some(now + n), n);
        // 32 keys filling positions 16,000..16,032 of the first 2^14 slots,
        // every other one belonging 2^14 higher once the table doubles.
        let window = 16_000u32;
        let aimed: Vec<SlotKey> = (0..32u32)
            .map(|i| SlotKey::at(window + i + (i % 2) * (1 << 14), i))
            .collect();
        for (i, k) in aimed.iter().enumerate() {
            assert!(t.update(*k, now, live(1_000_000 + i as u64)).is_ok());
        }
        // The sweep after the doubling starts at slot 0, far below the
        // window.
        double_from_first_size(&t, now);
        // A new key whose window under 15 bits is exactly those 32 slots.
        let new = SlotKey::at(window, 999);
        assert!(t.update(new, now, live(7)).is_ok());
        assert_eq!(
            t.size(),
            1 << 15,
            "the table doubled for a window not yet swept"
        );
        assert_eq!(t.update(new, now, |tat| (None, tat)), Ok(now + 7));
        for (i, k) in aimed.iter().enumerate() {
            let tat = t.update(*k, now, |tat| (None, tat));
            assert_eq!(
                tat,
                Ok(now + 1_000_000 + i as u64),
                "key {i} lost its state"
            );
        }
    }

    /// A key placed before a doubling and not yet moved is decided on its
    /// own state, even by an update that would store nothing for a key
    /// never seen (a refund): the update looks under fewer bits before it
    /// answers on a fresh state.
    #[test]
    fn a_key_not_yet_moved_is_decided_on_its_own_state() {
        let t = Table::new(1 << 16);
        let now = 1_000;
        // Belongs 2^14 higher once the table doubles; the sweep, from slot
        // 0, does not reach it below.
        let k = SlotKey::at(16_000 + (1 << 14), 7);
        assert!(t.update(k, now, |_| (Some(now + 1_000_000), ())).is_ok());
        double_from_first_size(&t, now);
        // Half back: nothing to give back to a key never seen.
        let refund = |tat: Nanos| match tat {
            0 => (None, 0),
            tat => (Some(tat - 500_000), tat),
        };
        assert_eq!(t.update(k, now, refund), Ok(now + 1_000_000));
        assert_eq!(t.update(k, now, |tat| (None, tat)), Ok(now + 500_000));
    }

    #[test]
    fn racing_inserts_of_neighbouring_keys_never_store_a_key_twice() {
        // Pairs of threads insert keys whose windows overlap (positions one
        // apart) and decide on each twice, racing for the same empty slots.
        // Afterwards no fingerprint may sit in two slots.
        let threads = 8u64;
        let t = Table::new(1 << 18);
        let now = 1_000;
        let barrier = std::sync::Barrier::new(threads as usize);
        std::thread::scope(|sc| {
            for th in 0..threads {
                let (t, barrier) = (&t, &barrier);
                sc.spawn(move || {
                    for r in 0..100u64 {
                        barrier.wait();
                        for j in 0..100u64 {
                            let round = r * 100 + j;
                            let k = SlotKey::at(
                                ((round * 32) % (1 << 18) + (th % 2)) as u32,
                                (round << 8 | th) as u32,
                            );
                            for _ in 0..2 {
                                let _ =
                                    t.update(k, now, |tat| (Some(tat.max(now) + 1_000_000), ()));
                            }
                        }
                    }
                });
            }
        });
        let mut seen = std::collections::HashMap::new();
        for fp in t.fingerprints() {
            *seen.entry(fp).or_insert(0usize) += 1;
        }
        assert_eq!(seen.len(), 80_000);
        let twice = seen.values().filter(|&&c| c > 1).count();
        assert_eq!(twice, 0, "{twice} keys stored twice");
    }

    /// A store with room for a million keys used by ten thousand stays on
    /// few pages: its table grows as keys come, and every key keeps its
    /// state through each doubling and the moves after it.
    #[test]
    fn the_table_grows_with_its_keys_and_keys_keep_their_state() {
        let (s, _clock) = store(1 << 20);
        let p = plan(1.0, 3);
        let keys: Vec<Digest> = (0..10_000u32).map(|i| digest(&i.to_le_bytes())).collect();
        // Each key takes two of its three: one left.
        for k in &keys {
            assert!(s.acquire_one(&p, *k, 2).is_ok());
        }
        assert_eq!(s.tracked_keys(), 10_000);
        // 10,000 keys (and the slots of keys moved) fit 32,768 slots at
        // most half used: 512 KiB of pages, where keys spread over all
        // 2^21 slots touched most of 32 MiB (and a table doubling at a
        // quarter used took 1 MiB).
        let bytes = s.allocated_bytes();
        assert!(bytes <= 1 << 19, "{bytes} bytes for 10,000 keys");
        // More keys: the table doubles again, and moves keys as it sweeps.
        for i in 10_000..40_000u32 {
            assert!(s.acquire_one(&p, digest(&i.to_le_bytes()), 1).is_ok());
        }
        for (i, k) in keys.iter().enumerate() {
            assert!(s.acquire_one(&p, *k, 1).is_ok(), "key {i} lost its state");
            assert!(
                s.acquire_one(&p, *k, 1).is_err(),
                "key {i} got a new bucket"
            );
        }
        assert_eq!(s.tracked_keys(), 40_000);
        let mut fps = s.inner.tables[0].fingerprints();
        fps.sort_unstable();
        fps.dedup();
        assert_eq!(fps.len(), 40_000, "a key is stored twice");
    }

    /// Threads deciding on their keys while others add keys that make the
    /// table double and move keys: no key is ever stored twice, loses its
    /// state or admits more than its bucket.
    #[test]
    fn threads_deciding_while_the_table_grows_admit_exactly_each_bucket() {
        let (s, _clock) = store(1 << 20);
        let p = plan(1.0, 5);
        let admitted = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for t in 0..4u32 {
                let (s, p, admitted) = (&s, &p, &admitted);
                scope.spawn(move || {
                    // Each thread its own keys, decided 8 times each over
                    // rounds: the table doubles under them.
                    for round in 0..8u32 {
                        for i in 0..12_000u32 {
                            let k = digest(&[t.to_le_bytes(), i.to_le_bytes()].concat());
                            if s.acquire_one(p, k, 1).is_ok() {
                                admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            let _ = round;
                        }
                    }
                });
            }
        });
        // 48,000 keys, 8 requests each, a bucket of 5: exactly 5 each.
        assert_eq!(admitted.into_inner(), 48_000 * 5);
        assert_eq!(s.tracked_keys(), 48_000);
        let mut fps = s.inner.tables[0].fingerprints();
        let n = fps.len();
        fps.sort_unstable();
        fps.dedup();
        assert_eq!((n, fps.len()), (48_000, 48_000));
    }

    /// The table against a map from key to TAT, deciding with the same GCRA:
    /// keys keep arriving (so the table doubles, and sweeps and moves its
    /// keys), known keys come back, some after going idle (their slots then
    /// go to other keys), costs are 0 to 3 and the clock moves forward. Every
    /// decision of the store is the map's.
    #[test]
    fn the_growing_table_decides_as_a_map_of_keys_does() {
        let (s, clock) = store(1 << 18);
        let p = plan(100.0, 4);
        let gcra = &p.0.gcra;
        let mut model: std::collections::HashMap<u32, Nanos> = std::collections::HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut keys = 0u32;
        let (mut allowed, mut denied) = (0, 0);
        for _ in 0..240_000 {
            let k = if keys == 0 || next() % 3 == 0 {
                keys += 1;
                keys - 1
            } else if next() % 8 == 0 {
                // Any key seen, most of them idle long since.
                (next() % u64::from(keys)) as u32
            } else {
                // One of the last 50: buckets run dry.
                keys - 1 - (next() % u64::from(keys.min(50))) as u32
            };
            let cost = (next() % 4) as u32;
            if next() % 64 == 0 {
                clock.advance(Duration::from_millis(next() % 40));
            }
            let now = s.inner.clock.nanos();
            let tat = model.get(&k).copied().unwrap_or(0);
            let got = s.acquire_one(&p, digest(&k.to_le_bytes()), cost);
            match gcra.decide(tat, now, cost) {
                Outcome::Allow { tat, .. } => {
                    assert!(got.is_ok(), "key {k} cost {cost}: {got:?}");
                    model.insert(k, tat);
                    allowed += 1;
                }
                other => {
                    assert!(got.is_err(), "key {k} cost {cost}: {other:?} but allowed");
                    denied += 1;
                }
            }
        }
        // It grew (80,000 keys from 16,384 slots), and both answers came.
        assert!(s.inner.tables[0].size() >= 1 << 17);
        assert!(allowed > 100_000 && denied > 10_000, "{allowed} / {denied}");
    }

    /// A key being moved as the table grows is for a moment in neither its
    /// old slot nor its new one: a look that changes nothing (a peek, as
    /// `check(key, 0)` and concurrency caps make) must still find its state,
    /// never a fresh bucket.
    #[test]
    fn peeks_while_keys_move_never_see_a_fresh_bucket() {
        let (s, _clock) = store(1 << 20);
        let p = plan(1.0, 5);
        let spent: Vec<Digest> = (0..2_000u32).map(|i| digest(&i.to_le_bytes())).collect();
        for k in &spent {
            assert!(s.acquire_one(&p, *k, 5).is_ok());
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        let fresh = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        for k in &spent {
                            let r = s.acquire_one(&p, *k, 0).unwrap();
                            if r.items()[0].remaining != 0 {
                                fresh.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
            for t in 0..2u32 {
                let (s, p, done) = (&s, &p, &done);
                scope.spawn(move || {
                    // Enough new keys to double the table four times over,
                    // each doubling moving the spent keys.
                    for i in 0..60_000u32 {
                        let k = digest(&[t.to_le_bytes(), i.to_le_bytes(), [9; 4]].concat());
                        assert!(s.acquire_one(p, k, 1).is_ok());
                    }
                    done.store(true, std::sync::atomic::Ordering::Relaxed);
                });
            }
        });
        assert_eq!(
            fresh.into_inner(),
            0,
            "a peek saw a moving key's bucket fresh"
        );
        for k in &spent {
            assert!(s.acquire_one(&p, *k, 1).is_err());
        }
    }

    /// A throttle alone takes the short path; beside a second throttle that
    /// never binds it takes the general one. Both must answer alike, to the
    /// nanosecond, whatever the costs and the time between requests.
    #[test]
    fn a_lone_throttle_is_decided_as_the_general_path_decides_it() {
        let (lone, lone_clock) = store(1024);
        let (general, general_clock) = store(1024);
        let p = plan(3.0, 4);
        // Its own name, so its own slot.
        let roomy = Limit::new(
            crate::plan::LimitKind::Throttle,
            &Throttle::new(1e6, 1_000_000).unwrap(),
            "q",
            "",
        );
        let k = digest(b"client");
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2_000 {
            let cost = (next() % 6) as u32;
            let step = Duration::from_millis(next() % 700);
            lone_clock.advance(step);
            general_clock.advance(step);
            let alone = lone.acquire_one(&p, k, cost);
            let mut req = Acquire::new(cost, crate::FailureMode::Open);
            for l in [&p.0, &roomy] {
                req.push(ThrottleRef {
                    limit: l,
                    plan: Some("p"),
                    account: None,
                    subject: b"",
                    digest: k,
                    shadow: false,
                });
            }
            assert!(req.lone_throttle().is_none());
            let mut report = Report::default();
            let both = general.decide(&req, &mut report).map(|()| report);
            match (alone, both) {
                (Ok(a), Ok(b)) => assert_eq!(a.items(), &b.items()[..1]),
                (Err(a), Err(b)) => assert_eq!(a, b),
                (a, b) => panic!("lone {a:?} but general {b:?} (cost {cost})"),
            }
        }
    }

    /// A request that passes its throttle and a first quota but not a
    /// second is given back everything: the throttle's bucket and the first
    /// quota's count are as if it never came, on the path that charges
    /// without bookkeeping and on the general one alike.
    #[test]
    fn a_later_quota_that_denies_gives_back_the_earlier_limits() {
        let (s, clock) = store(1024);
        clock.set_wall(std::time::UNIX_EPOCH + Duration::from_secs(19_844 * 86_400));
        let p = plan(1.0, 3);
        let spec = |limit, salt| QuotaSpec {
            limit,
            period: crate::Period::Day,
            offset: 0,
            created_at: 0,
            salt,
        };
        let (roomy, tight) = (spec(100, 1), spec(1, 2));
        let k = digest(b"k");
        let quota = |spec, kind| quota_ref(spec, kind, k);
        let decide = |s: &MemoryStore| {
            let mut req = Acquire::new(1, crate::FailureMode::Open);
            req.push(ThrottleRef {
                limit: &p.0,
                plan: Some("p"),
                account: None,
                subject: b"",
                digest: k,
                shadow: false,
            });
            req.account_quotas[0] = Some(quota(&roomy, LimitKind::AccountQuota));
            req.quota = Some(quota(&tight, LimitKind::Quota));
            let mut report = Report::default();
            s.decide(&req, &mut report).map(|()| report)
        };
        let report = decide(&s).unwrap();
        assert_eq!(report.items().len(), 3);
        // The plan's quota of 1 is used up: every later request is denied
        // by it, and charges neither the throttle nor the account's quota.
        for _ in 0..5 {
            let d = decide(&s).unwrap_err();
            assert!(matches!(d.denial, Denial::Quota { .. }), "{d:?}");
        }
        let throttle = s.acquire_one(&p, k, 0).unwrap();
        assert_eq!(throttle.items()[0].remaining, 2);
        let day = 19_844;
        let roomy_ref = quota(&roomy, LimitKind::AccountQuota);
        assert_eq!(s.inner.quotas.report(&roomy_ref, day, day), vec![[1, 99]]);
    }

    /// The full plan's path without bookkeeping (`decide_clear_of`, then
    /// the general path when it declines) answers every request as the
    /// general path alone does: the same verdicts and denials, the same
    /// reports, and the same state left in the throttles and the quota, over
    /// bursts, waits, day boundaries and costs that never fit; for a
    /// throttle and a quota, a throttle, an override and a quota, and a
    /// throttle and an override.
    #[test]
    fn a_full_plan_decided_directly_as_in_full() {
        let p = plan(2.0, 3);
        let method = OneLimit(Limit::new(
            LimitKind::Method,
            &Throttle::new(1.0, 2).unwrap(),
            "p",
            "/v1/x/POST",
        ));
        let spec = QuotaSpec {
            limit: 20,
            period: crate::Period::Day,
            offset: 0,
            created_at: 0,
            salt: 9,
        };
        let k = digest(b"k");
        let throttle = |l| throttle_ref(l, k);
        let quota = quota_ref(&spec, LimitKind::Quota, k);
        let shapes = [
            (vec![throttle(&p)], Some(quota)),
            (vec![throttle(&p), throttle(&method)], Some(quota)),
            (vec![throttle(&p), throttle(&method)], None),
        ];
        for (throttles, quota) in &shapes {
            decided_directly_as_in_full(throttles, quota.as_ref());
        }
    }

    fn quota_ref(spec: &QuotaSpec, kind: LimitKind, k: Digest) -> QuotaRef<'_> {
        QuotaRef {
            kind,
            spec,
            plan: "p",
            account: None,
            subject: b"",
            digest: k,
            shadow: false,
            history_days: 31,
        }
    }

    fn throttle_ref(l: &OneLimit, k: Digest) -> ThrottleRef<'_> {
        ThrottleRef {
            limit: &l.0,
            plan: Some("p"),
            account: None,
            subject: b"",
            digest: k,
            shadow: false,
        }
    }

    fn decided_directly_as_in_full(throttles: &[ThrottleRef<'_>], quota: Option<&QuotaRef<'_>>) {
        let day = 19_844;
        let twin = || {
            let (s, clock) = store(1024);
            clock.set_wall(std::time::UNIX_EPOCH + Duration::from_secs(day * 86_400));
            (s, clock)
        };
        let (direct, direct_clock) = twin();
        let (full, full_clock) = twin();
        let in_full = |s: &MemoryStore, cost: u32| {
            let mut req = Acquire::new(cost, crate::FailureMode::Open);
            for t in throttles {
                req.push(*t);
            }
            req.quota = quota.copied();
            let mut report = Report::default();
            let result = s.decide(&req, &mut report);
            format!("{result:?} {:?}", report.items())
        };
        let declined = std::cell::Cell::new(0);
        let directly = |s: &MemoryStore, cost: u32| {
            let mut report = Report::default();
            if s.decide_clear_of(&throttles[0], throttles.get(1), quota, cost, &mut report) {
                return format!("{:?} {:?}", Ok::<(), Denied>(()), report.items());
            }
            declined.set(declined.get() + 1);
            in_full(s, cost)
        };
        let (mut seed, mut allowed) = (7u64, 0);
        for i in 0..3_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let r = seed >> 33;
            let cost = match r % 50 {
                0 => 25,
                n => (n % 4) as u32,
            };
            let wait = Duration::from_millis(match (r >> 8) % 10 {
                0..=5 => 0,
                6..=8 => (r >> 12) % 700,
                _ => (r >> 12) % 40_000_000,
            });
            direct_clock.advance(wait);
            full_clock.advance(wait);
            let (a, b) = (directly(&direct, cost), in_full(&full, cost));
            assert_eq!(
                a,
                b,
                "request {i}, cost {cost}, {} throttles",
                throttles.len()
            );
            if a.starts_with("Ok") {
                allowed += 1;
            }
        }
        // Both paths were taken, and both outcomes seen.
        let declined = declined.get();
        assert!(allowed > 100 && declined > 100, "{allowed} {declined}");
        if let Some(quota) = quota {
            let last = (day + 400) as i64;
            assert_eq!(
                direct.inner.quotas.report(quota, day as i64, last),
                full.inner.quotas.report(quota, day as i64, last)
            );
        }
        // What each throttle holds, peeked on both stores.
        let standing = |s: &MemoryStore| {
            let mut req = Acquire::new(0, crate::FailureMode::Open);
            for t in throttles {
                req.push(*t);
            }
            let mut report = Report::default();
            s.decide(&req, &mut report).unwrap();
            format!("{:?}", report.items())
        };
        assert_eq!(standing(&direct), standing(&full));
    }

    /// Threads deciding one subject's full plan at once, on the direct path
    /// and the general one behind it, admit exactly the quota, and every
    /// request the quota refused gives its throttle charge back.
    #[test]
    fn threads_on_a_full_plan_admit_exactly_the_quota() {
        let (s, clock) = store(1024);
        clock.set_wall(std::time::UNIX_EPOCH + Duration::from_secs(19_844 * 86_400 + 3_600));
        let p = plan(1.0, 10_000);
        let spec = QuotaSpec {
            limit: 2_000,
            period: crate::Period::Day,
            offset: 0,
            created_at: 0,
            salt: 9,
        };
        let k = digest(b"hot");
        let (throttle, quota) = (throttle_ref(&p, k), quota_ref(&spec, LimitKind::Quota, k));
        let admitted = std::sync::atomic::AtomicU64::new(0);
        let start = std::sync::Barrier::new(4);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    start.wait();
                    for _ in 0..3_000 {
                        let allowed = s.decide_clear_of(&throttle, None, Some(&quota), 1, &mut ())
                            || {
                                let mut req = Acquire::new(1, crate::FailureMode::Open);
                                req.push(throttle);
                                req.quota = Some(quota);
                                s.decide(&req, &mut ()).is_ok()
                            };
                        if allowed {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 2_000);
        assert_eq!(
            s.inner.quotas.report(&quota, 19_844, 19_844),
            vec![[2_000, 0]]
        );
        // The clock stood still: only the 2,000 admitted took the throttle's room.
        let standing = s.acquire_one(&p, k, 0).unwrap();
        assert_eq!(standing.items()[0].remaining, 10_000 - 2_000);
    }

    #[test]
    fn clock_going_backwards_grants_nothing() {
        let (s, clock) = store(1024);
        let p = plan(1.0, 2);
        let k = digest(b"k");
        assert!(s.acquire_one(&p, k, 1).is_ok());
        assert!(s.acquire_one(&p, k, 1).is_ok());
        clock.rewind(Duration::from_secs(30));
        assert!(s.acquire_one(&p, k, 1).is_err());
        clock.advance(Duration::from_secs(30));
        assert!(s.acquire_one(&p, k, 1).is_err());
        clock.advance(Duration::from_secs(1));
        assert!(s.acquire_one(&p, k, 1).is_ok());
    }

    #[test]
    fn invalid_store_parameters() {
        assert!(matches!(
            MemoryStore::builder().max_keys(0).build(),
            Err(ConfigError::InvalidStore(_))
        ));
        assert!(matches!(
            MemoryStore::builder().max_keys(usize::MAX).build(),
            Err(ConfigError::InvalidStore(_))
        ));
    }
}
