//! The local copy: how a plan whose failure mode is
//! [`Local`](crate::FailureMode::Local) is decided while Redis cannot decide
//! (unreachable, too slow, or more calls in flight than the store takes for
//! a request Redis has not denied lately, see `denials`).
//!
//! It is this instance's own [`MemoryStore`], deciding the same limits of
//! the same subjects (named by the same per-process digests the memory
//! store uses) from its own state: an outage admits at most N times the
//! limits on N instances, never unlimited traffic. It counts what its
//! instance admitted through Redis (the places under concurrency caps
//! included, until their responses end). What it admits on its own to a
//! quota or a token budget is owed to Redis: once Redis answers again, it
//! is charged there (see [`Inner::repay`]), in the window that counted it;
//! what it admits on its own to a throttle is charged there too, as far as
//! it has not refilled in the copy's bucket by then.
//! The places it grants on its own under concurrency caps are not charged
//! to Redis, but count on this instance until their responses end: Redis's
//! decisions here count them beside its own (see [`Local::held_under`]).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::sync::Mutex;

use super::call::{Call, Part, Quota};
use super::decide::Unanswered;
use super::store::Inner;
use crate::clock::Clock;
use crate::gcra::NANOS_PER_SEC;
use crate::plan::{FailureMode, LimitKind};
use crate::store::{
    Acquire, Applied, ConcurrencyRef, Denied, MemoryStore, Permit, QuotaRef, Report, Reservation,
    Settlement, StoreError, ThrottleRef, Verdict,
};
use crate::window::NANOS_PER_DAY;

/// The local copy of every limit, and the places it granted.
#[derive(Debug)]
pub(super) struct Local {
    store: MemoryStore,
    /// Places under concurrency caps the copy granted and that are still
    /// held, so that [`Local::release`] tells them from Redis's.
    held: Mutex<HashMap<Permit, u32>>,
    /// Places Redis granted that the copy counts too, by Redis's permit:
    /// the copy's permit, given back with Redis's.
    mirrored: Mutex<HashMap<Permit, Permit>>,
    /// How many there are of both: the common case (none) reads no lock.
    count: AtomicUsize,
    /// How many of them are in `held`: places Redis never counted, which
    /// its decisions count beside its own while they last (none, the
    /// common case, reads no lock).
    own: AtomicUsize,
    /// What the copy admitted on its own to each quota, by its key in
    /// Redis and the UTC day it admitted it: owed to Redis.
    owed: Mutex<OwedQuotas>,
    /// What the copy admitted on its own to each throttle, by its key in
    /// Redis: owed to Redis as far as it has not refilled when Redis
    /// answers again.
    owed_throttles: Mutex<HashMap<String, OwedThrottle>>,
    /// Whether `owed` or `owed_throttles` may hold any: the common case
    /// (none) reads no lock.
    owes: AtomicBool,
    clock: Clock,
}

/// Units the local copy admitted on its own to one quota on one UTC day,
/// to be charged to Redis once it answers again.
#[derive(Debug, Clone)]
pub(super) struct Owed {
    /// The quota's history key.
    hist: String,
    /// The quota's parameters as a settlement (mode "t") takes them: its
    /// spec, then its history's days.
    args: Vec<String>,
    units: u64,
    /// When the copy admitted the latest of them (wall time, ns since the
    /// epoch): a reset after it drops them all (erring toward admitting
    /// less than a reset between them would).
    at: i64,
}

/// Units the local copy admitted on its own to one throttle, to be charged
/// to Redis once it answers again, as far as they have not refilled by
/// then (see [`Inner::repay`]).
#[derive(Debug, Clone)]
pub(super) struct OwedThrottle {
    /// The throttle's numbers as the copy charged them, and its digest:
    /// where the copy keeps its bucket.
    limit: crate::plan::Limit,
    digest: crate::hash::Digest,
    units: u64,
}

/// What the local copy admitted on its own to each quota, by the quota's
/// key in Redis and the UTC day it admitted it. Searched with a borrowed
/// [`QuotaDay`], so that finding a quota already owed copies nothing.
type OwedQuotas = hashbrown::HashMap<(String, i64), Owed, RandomState>;

/// A quota's key in Redis and a UTC day, borrowed: an entry of
/// [`OwedQuotas`] found without copying the name. It hashes as the map's
/// `(String, i64)` does (a `String` hashes as its `str`, a tuple and a
/// tuple struct field by field).
#[derive(Hash)]
struct QuotaDay<'a>(&'a str, i64);

impl hashbrown::Equivalent<(String, i64)> for QuotaDay<'_> {
    fn equivalent(&self, key: &(String, i64)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// One charge of what the local copy owes Redis, kept to be owed again
/// when Redis does not answer it.
enum Owing {
    Quota((String, i64), Owed),
    Throttle(String, OwedThrottle),
}

/// What the local copy owes Redis: units admitted to quotas, by quota key
/// and day, and to throttles, by key.
type AllOwed = (OwedQuotas, HashMap<String, OwedThrottle>);

/// The most quotas (by day) and the most throttles whose use by the local
/// copy is owed to Redis, each: an outage under a flood of distinct
/// subjects (client IPs) would otherwise grow them without bound, where
/// the copy itself is bounded. Past it, what the copy admits to a subject
/// not owed yet is not charged to Redis afterwards (that subject may be
/// admitted up to twice its limits across the outage).
const MAX_OWED: usize = 1 << 16;

/// Whether `key` may be owed in `owed`: it is already, or there is room.
fn room_for<K: std::hash::Hash + Eq, V>(owed: &HashMap<K, V>, key: &K) -> bool {
    room(owed.len()) || owed.contains_key(key)
}

/// Whether a map of `len` owed entries has room for one more.
fn room(len: usize) -> bool {
    len < MAX_OWED
}

/// Owes the quota `key` on `day` `units` more, admitted at `at` (wall time,
/// ns since the epoch): found by the borrowed key, so that its name is
/// copied once per day it is owed, not once per request the copy admits.
/// A quota not owed yet that day gets an entry of its own, its history key
/// and arguments from `new`, while [`MAX_OWED`] leaves room; `false` when
/// it does not.
fn owe_quota(
    owed: &mut OwedQuotas,
    key: &str,
    day: i64,
    units: u64,
    at: i64,
    new: impl FnOnce() -> (String, Vec<String>),
) -> bool {
    if let Some(o) = owed.get_mut(&QuotaDay(key, day)) {
        o.units = o.units.saturating_add(units);
        o.at = o.at.max(at);
    } else if room(owed.len()) {
        let (hist, args) = new();
        let o = Owed {
            hist,
            args,
            units,
            at,
        };
        owed.insert((key.to_owned(), day), o);
    } else {
        return false;
    }
    true
}

impl Local {
    pub(super) fn new(clock: Clock) -> Self {
        // A builder with nothing but a clock cannot fail.
        let store = MemoryStore::builder()
            .clock(clock.clone())
            .build()
            .unwrap_or_default();
        Local {
            store,
            held: Mutex::default(),
            mirrored: Mutex::default(),
            count: AtomicUsize::new(0),
            own: AtomicUsize::new(0),
            owed: Mutex::default(),
            owed_throttles: Mutex::default(),
            owes: AtomicBool::new(false),
            clock,
        }
    }

    /// Decides a request whose limits are `parts` (a cluster's stage part
    /// first) from the local copy, as the memory store decides.
    pub(super) fn decide(&self, parts: &[&Part], failure: FailureMode) -> Verdict {
        let mut report = Report::default();
        let mut verdict = with_acquire(parts, failure, true, |a| self.store.decide(a, &mut report))
            .map(|()| report);
        if let Ok(report) = &mut verdict {
            // Its tokens are settled here (see [`Local::settle`]).
            report.reserved.local = true;
            for permit in report.permits() {
                *self.held.lock().entry(permit).or_default() += 1;
                self.count.fetch_add(1, Ordering::AcqRel);
                self.own.fetch_add(1, Ordering::AcqRel);
            }
            self.owe(parts);
        }
        verdict
    }

    /// Records what the copy charged each throttle and quota of `parts` for
    /// a request it admitted on its own: Redis never counted it.
    fn owe(&self, parts: &[&Part]) {
        let mut at = None;
        for part in parts {
            // A part's throttles' keys come first in its call's.
            for (t, key) in part.throttles.iter().zip(&part.call.keys) {
                if t.cost == 0 {
                    continue;
                }
                let mut owed = self.owed_throttles.lock();
                // Found by the borrowed key: its name is copied once per
                // outage, not once per request the copy admits.
                if let Some(o) = owed.get_mut(key.as_str()) {
                    o.units = o.units.saturating_add(u64::from(t.cost));
                    // Charged under the numbers the copy decides by now.
                    o.limit = t.limit.clone();
                } else if room_for(&owed, key) {
                    let o = OwedThrottle {
                        limit: t.limit.clone(),
                        digest: t.digest,
                        units: u64::from(t.cost),
                    };
                    owed.insert(key.clone(), o);
                } else {
                    continue;
                }
                self.owes.store(true, Ordering::Release);
            }
            for q in part.quotas.iter().filter(|q| q.cost > 0) {
                let (Some(key), Some(hist)) = (
                    part.call.keys.get(q.key_at),
                    part.call.keys.get(q.key_at + 1),
                ) else {
                    continue;
                };
                // The spec's five, then (past the shadow flag) the history's
                // days: see `Part::push_quota`.
                let (Some(spec), Some(days)) = (q.args.get(..5), q.args.get(6)) else {
                    continue;
                };
                let at = *at.get_or_insert_with(|| self.clock.wall_nanos());
                let day = at.div_euclid(NANOS_PER_DAY);
                let mut owed = self.owed.lock();
                let new = || (hist.clone(), spec.iter().chain([days]).cloned().collect());
                if owe_quota(&mut owed, key, day, u64::from(q.cost), at, new) {
                    self.owes.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Whether the copy may owe Redis anything (one load, no lock).
    pub(super) fn owes(&self) -> bool {
        self.owes.load(Ordering::Acquire)
    }

    /// Takes what the copy owes Redis, if anything.
    fn take_owed(&self) -> Option<AllOwed> {
        if !self.owes() {
            return None;
        }
        let mut owed = self.owed.lock();
        let mut throttles = self.owed_throttles.lock();
        self.owes.store(false, Ordering::Release);
        (!owed.is_empty() || !throttles.is_empty())
            .then(|| (std::mem::take(&mut *owed), std::mem::take(&mut *throttles)))
    }

    /// Records again what could not be charged to a throttle in Redis.
    fn owe_throttle_again(&self, key: String, again: OwedThrottle) {
        let mut owed = self.owed_throttles.lock();
        match owed.get_mut(&key) {
            Some(o) => o.units = o.units.saturating_add(again.units),
            None => {
                owed.insert(key, again);
            }
        }
        self.owes.store(true, Ordering::Release);
    }

    /// What of `o`'s units has not refilled in the copy's bucket: the
    /// units the copy admitted on its own, at most as many as the bucket
    /// still holds (a bucket full again owes nothing, however much it
    /// admitted during a long outage).
    fn unrefilled(&self, o: &OwedThrottle) -> u64 {
        let t = ThrottleRef {
            limit: &o.limit,
            plan: Some(""),
            account: None,
            subject: b"",
            digest: o.digest,
            shadow: false,
        };
        let ahead = self.store.throttle_ahead(&t);
        let interval = o.limit.gcra.interval().max(1);
        o.units.min(ahead.div_ceil(interval))
    }

    /// Takes back `units` of what the copy owes the throttle `key` (tokens
    /// a request it admitted reserved and did not use), as far as they are
    /// still owed.
    pub(super) fn forgive_throttle(&self, key: &str, units: u64) {
        let mut owed = self.owed_throttles.lock();
        if let Some(o) = owed.get_mut(key) {
            o.units = o.units.saturating_sub(units);
            if o.units == 0 {
                owed.remove(key);
            }
        }
    }

    /// Records again what could not be charged to Redis.
    fn owe_again(&self, owing: Owing) {
        match owing {
            Owing::Quota(key, again) => self.owe_quota_again(key, again),
            Owing::Throttle(key, again) => self.owe_throttle_again(key, again),
        }
    }

    /// Records again what could not be charged to a quota in Redis.
    fn owe_quota_again(&self, key: (String, i64), again: Owed) {
        let mut owed = self.owed.lock();
        match owed.get_mut(&key) {
            Some(o) => {
                o.units = o.units.saturating_add(again.units);
                o.at = o.at.max(again.at);
            }
            None => {
                owed.insert(key, again);
            }
        }
        self.owes.store(true, Ordering::Release);
    }

    /// Takes back `units` of what the copy owes the quota `key` for `day`
    /// (tokens a request it admitted reserved and did not use), as far as
    /// they are still owed. Those already charged to Redis stay charged
    /// there (erring toward admitting less).
    pub(super) fn forgive(&self, key: &str, day: i64, units: u64) {
        let mut owed = self.owed.lock();
        let k = QuotaDay(key, day);
        if let Some(o) = owed.get_mut(&k) {
            o.units = o.units.saturating_sub(units);
            if o.units == 0 {
                owed.remove(&k);
            }
        }
    }

    /// Charges the local copy with a request Redis (or a share of it) let
    /// through, and lowers each quota of the copy to what Redis said
    /// remains of it (`report`): should Redis fail, the copy goes on from
    /// the shared count as last seen, rather than from nothing. What the
    /// copy would deny is not charged (it never denies Redis). Each place
    /// Redis granted under a concurrency cap takes one in the copy too,
    /// until [`Local::release`] gives back Redis's: a response still held
    /// when Redis fails counts against the cap the copy then decides.
    pub(super) fn mirror(&self, parts: &[&Part], report: &Report) {
        let _ = with_acquire(parts, FailureMode::Local, false, |a| {
            self.store.decide::<()>(a, &mut ())
        });
        for item in report.items() {
            self.learn(parts, item);
        }
        for permit in report.permits() {
            self.count_place(parts, permit);
        }
    }

    /// Takes a place in the copy for the place `redis` granted, under the
    /// cap of `parts` that holds it.
    fn count_place(&self, parts: &[&Part], redis: Permit) {
        let Some(cap) = parts
            .iter()
            .flat_map(|p| &p.caps)
            .find(|c| c.permit == redis)
        else {
            return;
        };
        let alone = Part {
            cost: 1,
            caps: vec![*cap],
            ..Part::default()
        };
        let mut report = Report::default();
        let taken = with_acquire(&[&alone], FailureMode::Local, true, |a| {
            self.store.decide(a, &mut report)
        });
        if let (Ok(()), Some(mine)) = (taken, report.permits().next()) {
            self.mirrored.lock().insert(redis, mine);
            self.count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// How many places under the cap `c` the copy granted on its own (while
    /// Redis could not decide) that are still held: responses admitted
    /// during an outage that outlast it. Redis never counted them, so its
    /// decisions on this instance count them beside its own: the cap is
    /// never passed on one instance by the copy's places and Redis's
    /// together. One load, and no lock, while the copy holds none.
    pub(super) fn held_under(&self, c: &ConcurrencyRef<'_>) -> u32 {
        if self.own.load(Ordering::Acquire) == 0 {
            return 0;
        }
        // The memory store's permit names the cap (see its `decide`).
        let mine = Permit::new(c.digest.0, c.salt);
        self.held.lock().get(&mine).copied().unwrap_or(0)
    }

    /// Lowers the copy of the quota Redis denied to what remains of it.
    pub(super) fn learn_denial(&self, parts: &[&Part], denied: &Denied) {
        self.learn(parts, &denied.limit);
    }

    fn learn(&self, parts: &[&Part], item: &Applied) {
        let Some(q) = parts
            .iter()
            .flat_map(|p| &p.quotas)
            .find(|q| q.kind == item.kind)
        else {
            return;
        };
        self.store.quota_at_most(&q.local_ref(), item.remaining);
    }

    /// Settles the actual tokens of a request in the copy. An
    /// under-estimate is charged whoever decided: the copy counts what its
    /// instance admitted, and a copy that saw only estimates (0 by default,
    /// the whole cost settled after the response) would admit tokens
    /// without bound through an outage. An over-estimate goes back only
    /// when the copy decided the request: one Redis decided charged the
    /// copy as it stood then, on Redis's time line, and is left counted in
    /// full (erring toward admitting less).
    pub(super) fn settle(&self, settlement: &Settlement<'_>) {
        use crate::store::Store as _;
        if settlement.reserved.local {
            self.store.settle(settlement);
        } else if settlement.delta > 0 {
            self.store.settle(&Settlement {
                reserved: Reservation::default(),
                ..*settlement
            });
        }
    }

    /// Converts the copy's bucket of a throttle whose numbers changed from
    /// `old` to `new` (a plan or account put anew), as the memory store
    /// converts its own (see [`Store::rescale`](crate::store::Store::rescale)):
    /// the copy keys a bucket by the same digest and place (salt).
    pub(super) fn rescale(&self, old: &ThrottleRef<'_>, new: &ThrottleRef<'_>) {
        use crate::store::Store as _;
        self.store.rescale(old, new);
    }

    /// Gives back `permit` if the local copy granted it; `false` if it is
    /// Redis's (whose place in the copy, if it took one, goes back here).
    pub(super) fn release(&self, permit: Permit) -> bool {
        use crate::store::Store as _;
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mirrored = self.mirrored.lock().remove(&permit);
        if let Some(mine) = mirrored {
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.store.release(mine);
            return false;
        }
        let mut held = self.held.lock();
        let Some(n) = held.get_mut(&permit) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            held.remove(&permit);
        }
        drop(held);
        self.own.fetch_sub(1, Ordering::AcqRel);
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.store.release(permit);
        true
    }
}

impl Inner {
    /// Charges Redis with what the local copy admitted on its own while
    /// Redis could not decide (nothing at all, and no call, when it owes
    /// nothing: the usual case). Each throttle is charged what of those
    /// units has not refilled in the copy's bucket (see
    /// [`Local::unrefilled`]). Each quota is charged its units in one
    /// settlement call (mode "t" with the time they were admitted) that may
    /// take its count past the limit and is never refused, in the window
    /// that admitted them only: a window that has ended, or a count reset
    /// or set since, gets nothing. Sent in the background; the decisions of
    /// this instance on the same quotas wait for it (within their timeout),
    /// so the first request Redis decides after an outage counts them. What
    /// is not answered (Redis still down) is owed again and sent with a
    /// later request; what was charged is owed no more.
    pub(super) fn repay(self: &Arc<Self>) {
        let Some((owed, throttles)) = self.local.take_owed() else {
            return;
        };
        // The script's integers are exact below 2^53.
        const EXACT: u64 = (1 << 53) - 1;
        let now = self.now();
        let mut keys = Vec::with_capacity(2 * owed.len() + throttles.len());
        let mut calls = Vec::with_capacity(owed.len() + throttles.len());
        // Each throttle is charged, as a settlement of an under-estimate
        // is (mode "t", which may put its bucket in debt), what of the
        // copy's own units has not refilled in the copy's bucket: Redis
        // then holds what the copy would have. Charged in full, a long
        // outage's units would have held the key back for as long again.
        for (key, o) in throttles {
            let units = self.local.unrefilled(&o).min(EXACT);
            if units == 0 {
                continue;
            }
            let mut call = Call::new("t", &now);
            call.arg(units);
            call.arg(1);
            call.keys.push(key.clone());
            call.arg(o.limit.gcra.interval());
            call.arg(o.limit.gcra.burst());
            call.args.extend(self.numbers.args(&o.limit));
            call.arg(0);
            keys.push(key.clone());
            calls.push((Owing::Throttle(key, o), call));
        }
        for (k, o) in owed {
            let mut call = Call::new("t", &now);
            call.arg(o.units.min(EXACT));
            call.arg(0);
            call.arg(1);
            call.keys.push(k.0.clone());
            call.keys.push(o.hist.clone());
            for a in &o.args {
                call.arg(a);
            }
            call.arg(o.at.div_euclid(NANOS_PER_SEC as i64));
            call.arg(o.at.rem_euclid(NANOS_PER_SEC as i64));
            // Owed: what the copy admitted (see the script's mode "t").
            call.arg("o");
            keys.extend(call.keys.iter().cloned());
            calls.push((Owing::Quota(k, o), call));
        }
        if calls.is_empty() {
            return;
        }
        let unanswered = Unanswered::new(self, keys);
        let task = Arc::clone(self);
        self.spawn(async move {
            let _unanswered = unanswered;
            let mut calls = calls.into_iter();
            for (owing, call) in calls.by_ref() {
                if let Err(e) = task.within(Arc::clone(&task).run(call)).await {
                    tracing::debug!(error = %e, "what the local copy admitted is owed again");
                    task.local.owe_again(owing);
                    break;
                }
            }
            // Redis did not answer: the rest waits for a later request.
            for (owing, _) in calls {
                task.local.owe_again(owing);
            }
        });
    }

    /// Redis could not decide a request whose limits are `parts`: under
    /// [`Local`](FailureMode::Local) the local copy decides it (and the
    /// failure is counted and logged here); under `Open` and `Closed` the
    /// error goes to the layer, which decides and logs. A Cluster's error
    /// says that the store may fail in part (a node down, the others
    /// answering), so that its failure is logged as one (see `Failures`).
    pub(super) fn fail(
        &self,
        e: StoreError,
        failure: FailureMode,
        parts: &[&Part],
    ) -> Result<Verdict, StoreError> {
        let e = if self.cluster { e.in_part() } else { e };
        match failure {
            FailureMode::Local => {
                self.failures.failed(&e);
                Ok(self.local.decide(parts, failure))
            }
            _ => Err(e),
        }
    }
}

/// The request whose limits are `parts`, as the memory store takes it
/// (with its concurrency caps when `cap`), handed to `run`.
fn with_acquire<T>(
    parts: &[&Part],
    failure: FailureMode,
    cap: bool,
    run: impl FnOnce(&Acquire<'_>) -> T,
) -> T {
    let (cost, tokens) = parts.first().map_or((0, 0), |p| (p.cost, p.tokens));
    let mut acquire = Acquire::new(cost, failure);
    acquire.tokens = tokens;
    for t in parts.iter().flat_map(|p| &p.throttles) {
        acquire.push(ThrottleRef {
            limit: &t.limit,
            plan: if t.stage || t.account { None } else { Some("") },
            account: if t.account { Some("") } else { None },
            subject: b"",
            digest: t.digest,
            shadow: t.shadow,
        });
    }
    for q in parts.iter().flat_map(|p| &p.quotas) {
        let r = q.local_ref();
        match q.kind {
            LimitKind::TokensDay => acquire.token_quotas[0] = Some(r),
            LimitKind::TokensMonth => acquire.token_quotas[1] = Some(r),
            LimitKind::AccountQuota => acquire.account_quotas[0] = Some(r),
            LimitKind::AccountTokensDay => acquire.account_quotas[1] = Some(r),
            LimitKind::AccountTokensMonth => acquire.account_quotas[2] = Some(r),
            LimitKind::ModelQuota => acquire.model_quotas[0] = Some(r),
            LimitKind::ModelTokensDay => acquire.model_quotas[1] = Some(r),
            LimitKind::ModelTokensMonth => acquire.model_quotas[2] = Some(r),
            _ => acquire.quota = Some(r),
        }
    }
    for c in parts.iter().flat_map(|p| &p.caps).filter(|_| cap) {
        let r = ConcurrencyRef {
            kind: c.kind,
            limit: c.limit,
            salt: c.salt,
            plan: "",
            subject: b"",
            digest: c.digest,
            shadow: c.shadow,
        };
        match c.kind {
            LimitKind::ModelConcurrency => acquire.model_concurrency = Some(r),
            _ => acquire.concurrency = Some(r),
        }
    }
    run(&acquire)
}

impl Quota {
    /// The quota as the local copy counts it: by the memory store's digest.
    fn local_ref(&self) -> QuotaRef<'_> {
        QuotaRef {
            kind: self.kind,
            spec: &self.spec,
            plan: "",
            account: self.kind.is_account().then_some(""),
            subject: b"",
            digest: self.digest,
            shadow: self.shadow,
            history_days: self.history_days,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_owed_is_bounded_and_an_owed_key_is_owed_more() {
        let mut owed: HashMap<String, u64> = HashMap::new();
        for i in 0..MAX_OWED {
            let key = format!("k{i}");
            assert!(room_for(&owed, &key));
            owed.insert(key, 1);
        }
        assert!(!room_for(&owed, &"new".to_owned()), "past the bound");
        assert!(room_for(&owed, &"k0".to_owned()), "already owed");
        owed.remove("k7");
        assert!(room_for(&owed, &"new".to_owned()), "room again");
    }

    /// An entry for a quota not owed yet that day: its history key and
    /// arguments.
    fn entry() -> (String, Vec<String>) {
        ("hist".to_owned(), vec!["spec".to_owned()])
    }

    /// Made for a quota already owed that day: it must not be.
    fn none() -> (String, Vec<String>) {
        panic!("a quota already owed was given a new entry")
    }

    #[test]
    fn an_owed_quota_is_found_by_its_borrowed_key_and_owed_more() {
        use std::hash::BuildHasher;
        let mut owed = OwedQuotas::default();
        // The borrowed key hashes as the map's own: it finds its entry.
        let hasher = owed.hasher();
        assert_eq!(
            hasher.hash_one(QuotaDay("q", 7)),
            hasher.hash_one(("q".to_owned(), 7_i64))
        );
        assert!(owe_quota(&mut owed, "q", 7, 2, 100, entry));
        assert!(owe_quota(&mut owed, "q", 7, 3, 50, none));
        assert!(owe_quota(&mut owed, "q", 7, 1, 120, none));
        assert_eq!(owed.len(), 1);
        let o = &owed[&QuotaDay("q", 7)];
        assert_eq!((o.units, o.at), (6, 120), "owed more, at its latest");
        assert_eq!(
            (o.hist.as_str(), o.args.as_slice()),
            ("hist", &["spec".to_owned()][..])
        );
        // Another day, or another quota, is owed apart.
        assert!(owe_quota(&mut owed, "q", 8, 4, 200, entry));
        assert!(owe_quota(&mut owed, "q2", 7, 5, 100, entry));
        assert_eq!(owed.len(), 3);
        assert_eq!(owed[&QuotaDay("q", 7)].units, 6);
        assert_eq!(owed[&QuotaDay("q", 8)].units, 4);
        assert_eq!(owed[&QuotaDay("q2", 7)].units, 5);
    }

    #[test]
    fn owed_quotas_are_bounded_and_an_owed_one_is_owed_more_at_the_bound() {
        let local = Local::new(Clock::default());
        {
            let mut owed = local.owed.lock();
            for i in 0..MAX_OWED {
                assert!(owe_quota(&mut owed, &format!("k{i}"), 1, 1, 0, entry));
            }
            assert!(
                !owe_quota(&mut owed, "new", 1, 1, 0, entry),
                "past the bound"
            );
            assert!(!owe_quota(&mut owed, "k0", 2, 1, 0, entry), "a new day too");
            assert_eq!(owed.len(), MAX_OWED);
            assert!(owe_quota(&mut owed, "k0", 1, 2, 0, none), "already owed");
            assert_eq!(owed[&QuotaDay("k0", 1)].units, 3);
        }
        // Forgiven whole, an entry leaves room for another.
        local.forgive("k0", 1, 2);
        assert_eq!(local.owed.lock()[&QuotaDay("k0", 1)].units, 1);
        local.forgive("k0", 1, 1);
        let mut owed = local.owed.lock();
        assert_eq!(owed.len(), MAX_OWED - 1);
        assert!(owe_quota(&mut owed, "new", 1, 1, 0, entry), "room again");
    }
}
