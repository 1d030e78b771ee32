//! Requests of one subject on one instance share the call in flight, and
//! the share of their limits it brings back.
//!
//! A request whose limits can be shared (no concurrency cap, no token
//! budget, decided in one call) is identified as the over-limit cache
//! identifies it: its limits, their numbers, its subject and its cost. The
//! first such request finds no call in flight and starts one (a *flight*,
//! a task of its own, so that a client going away does not cancel it for
//! the others); the ones that come while it flies wait for it. The call
//! asks Redis for one unit of the request, as many more as fit for the
//! requests that joined it, and (when the plan borrows) a share to decide
//! from locally: at most [`max_share`](crate::RedisStoreBuilder::max_share)
//! units and at most a quarter of what still fits, so none near a limit.
//! Every unit is charged in Redis when it is granted, so the instances
//! together never admit more than the limits.
//!
//! When the flight lands, a denial answers every request that waited for
//! it; granted units are taken one per request, first come first served,
//! and the requests left without one are denied when Redis would have
//! denied one more unit in that call (as their own calls would have been),
//! else start the next flight. A unit left
//! over stays in the share until it is taken or the share is
//! [`max_age`](crate::RedisStoreBuilder::max_age) old (or its quota window
//! ends), and then goes back to Redis: each throttle gets back what of the
//! share has not refilled since (as a settlement's refund, so that nothing
//! is granted twice), each quota the units in the window that counted them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use crate::sync::Mutex;

use super::call::{Call, Charged, Part};
use super::decide::{Context, Decided};
use super::guards::Ticket;
use super::keys::reset_mark;
use super::store::Inner;
use super::time::Now;
use crate::gcra::{NANOS_PER_SEC, Nanos};
use crate::hash::BuildDigestHasher;
use crate::plan::{FailureMode, Limit};
use crate::store::verdict::applied;
use crate::store::{Acquired, Applied, Denied, FailureKind, Report, StoreError, Verdict};

/// Shards of the table, so that subjects on several threads rarely contend.
const SHARDS: usize = 16;

/// How a flight ended, as every request that waited for it sees it.
#[derive(Debug, Clone)]
pub(super) enum End {
    /// Units were granted: take one from the share. With the denial Redis
    /// would have answered one more unit then, when it would not fit: a
    /// request that finds no unit left is answered with it, as its own call
    /// would have been, instead of waiting for another flight (which could
    /// outlast its timeout, and let a request the limits deny reach the
    /// failure mode).
    Granted(Option<Denied>),
    /// Redis denied the request: so it does every request that waited.
    Denied(Denied),
    /// Redis could not decide: the plan's failure mode decides.
    Failed(StoreError),
}

/// One call in flight, shared by the requests waiting for it.
#[derive(Debug, Default)]
pub(super) struct Flight {
    end: OnceLock<End>,
    done: tokio::sync::Notify,
    /// Requests that joined it (its leader included).
    joined: AtomicU32,
}

impl Flight {
    /// Waits for the flight to land.
    pub(super) async fn ended(&self) -> End {
        loop {
            let done = self.done.notified();
            let mut done = std::pin::pin!(done);
            // Registered before the end is read: a landing in between still
            // wakes this one.
            done.as_mut().enable();
            if let Some(end) = self.end.get() {
                return end.clone();
            }
            done.await;
        }
    }

    /// Requests waiting for it now, its leader included.
    pub(super) fn joined(&self) -> u32 {
        self.joined.load(Ordering::Acquire)
    }

    fn land(&self, end: End) {
        let _ = self.end.set(end);
        self.done.notify_waiters();
    }
}

/// What a request gets from the table.
// A unit is answered at once, without a round trip: boxing it would allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Take {
    /// A unit of a share: the request is allowed, and this is its report
    /// (and the call whose grant it is).
    Unit(Report, Arc<Part>),
    /// A call is in flight: wait for it.
    Join(Arc<Flight>),
    /// No call is in flight: this request starts one, asking to borrow at
    /// most this many units.
    Lead(Arc<Flight>, u32),
}

/// Units granted and not yet taken, with what giving them back needs.
#[derive(Debug)]
pub(super) struct Share {
    /// Units left.
    left: u32,
    /// Of them, the units kept for the requests that waited for the flight
    /// that brought them: a request arriving later takes only the others,
    /// so that the waiting ones are never starved by new ones.
    kept: u32,
    /// Units taken so far (the first one's report counts one).
    taken: u32,
    /// When it must go back (the store clock's monotonic nanoseconds).
    until: Nanos,
    /// When it was granted, on the same time line: a unit's report shows
    /// the time since (a quota's window closer, a throttle refilled).
    at: Nanos,
    /// Per throttle of the call, its TAT on the same time line after the
    /// units taken so far, each taken as the memory store takes it (from
    /// now once the bucket has refilled past it); `None` for a shadow
    /// throttle that would have denied.
    tats: Vec<Option<Nanos>>,
    /// How every limit stood after the first unit: each throttle's, then
    /// each quota's.
    report: Report,
    cost: u32,
    /// The call that granted it, what it charged and the units it granted
    /// beyond the first: what giving units back needs.
    part: Arc<Part>,
    charged: Charged,
    granted: u32,
}

/// What giving a share's units back to Redis needs.
#[derive(Debug, Default)]
pub(super) struct Giveback {
    /// Per throttle: key, the numbers the grant was charged under, the TAT
    /// it stored (seconds, nanoseconds of Redis time), units of the
    /// request charged.
    throttles: Vec<(String, Limit, i64, i64, u32)>,
    /// Per quota: its count and history keys, its parameters.
    quotas: Vec<([String; 2], Vec<String>, u32)>,
    /// When the units were charged (seconds, nanoseconds of Redis time):
    /// a quota window that began after it, or a count reset since, gets
    /// none of them back.
    charged: (i64, i64),
}

#[derive(Debug, Default)]
struct Slot {
    share: Option<Share>,
    flight: Option<Arc<Flight>>,
    /// Requests that came since the last flight was launched, and when it
    /// was: how many units the next share should lend.
    arrivals: u32,
    launched: Option<Nanos>,
    /// When a request last came.
    seen: Nanos,
}

/// Flights and shares by request identity.
#[derive(Debug)]
pub(super) struct Flights {
    shards: Box<[Mutex<HashMap<u64, Slot, BuildDigestHasher>>]>,
    /// Whether the task that gives back old shares runs.
    sweeping: AtomicBool,
}

impl Default for Flights {
    fn default() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            sweeping: AtomicBool::new(false),
        }
    }
}

impl Share {
    /// A share of the units a flight granted beyond the first, from the
    /// call's `part`, its `reply` (without the grant) and what it charged,
    /// granted `at` (when its call was answered).
    pub(super) fn new(
        part: Arc<Part>,
        charged: Charged,
        report: Report,
        granted: u32,
        at: Nanos,
        until: Nanos,
    ) -> Share {
        let tats = charged
            .tats
            .iter()
            .map(|tat| tat.map(|ahead| at.saturating_add(ahead)))
            .collect();
        Share {
            left: granted + 1,
            kept: 0,
            taken: 0,
            until,
            at,
            tats,
            report,
            cost: part.cost,
            part,
            charged,
            granted,
        }
    }

    /// What giving its units back needs, from the call that granted them.
    fn back(&self) -> Giveback {
        let (part, charged) = (&self.part, &self.charged);
        let mut back = Giveback {
            charged: (charged.now_s, charged.now_ns),
            ..Giveback::default()
        };
        let units = u64::from(self.granted) + 1;
        for ((t, tat), key) in part
            .throttles
            .iter()
            .zip(&charged.tats)
            .zip(&part.call.keys)
        {
            let Some(first) = tat else { continue };
            // The TAT stored: the first unit's, plus the granted units'.
            let step = u64::from(t.cost) * t.limit.gcra.interval();
            let ahead = first.saturating_add(step.saturating_mul(units - 1));
            let total = u64::try_from(charged.now_ns)
                .unwrap_or(0)
                .saturating_add(ahead);
            back.throttles.push((
                key.clone(),
                t.limit.clone(),
                charged.now_s + (total / NANOS_PER_SEC) as i64,
                (total % NANOS_PER_SEC) as i64,
                t.cost,
            ));
        }
        let n = part.throttles.len();
        for (i, q) in part.quotas.iter().enumerate() {
            let keys = [
                part.call.keys[n + 2 * i].clone(),
                part.call.keys[n + 2 * i + 1].clone(),
            ];
            back.quotas
                .push((keys, q.args[..5].to_vec(), q.history_days));
        }
        back
    }

    /// The report of the next unit, taken `now`, as the memory store
    /// reports a request of one instance: each throttle as its bucket
    /// stands after this unit, refilled since the grant, and each quota
    /// with what the first unit left, less the units taken since, its
    /// window's end the time since the grant closer. (Reports of the
    /// first unit alone showed every later unit a bucket that never
    /// refilled and a reset that never moved.)
    fn take(&mut self, now: Nanos) -> Report {
        let mut report = Report::default();
        let taken = u64::from(self.taken);
        let elapsed = now.saturating_sub(self.at);
        let n = self.part.throttles.len();
        for (i, item) in self.report.items().iter().enumerate() {
            let item = if let Some(t) = self.part.throttles.get(i) {
                match self.tats.get_mut(i) {
                    Some(Some(tat)) => {
                        if taken > 0 {
                            let step = u64::from(t.cost) * t.limit.gcra.interval();
                            *tat = (*tat).max(now).saturating_add(step);
                        }
                        applied(&t.limit, *tat, now)
                    }
                    _ => *item,
                }
            } else {
                let cost = self.part.quotas.get(i - n).map_or(self.cost, |q| q.cost);
                Applied {
                    remaining: item.remaining.saturating_sub(taken * u64::from(cost)),
                    reset: item.reset.saturating_sub(elapsed),
                    ..*item
                }
            };
            report.push(item);
        }
        // A shadow limit the first unit went over grants no unit beyond it:
        // what it would have denied is the first unit's alone.
        report.shadow = self.report.shadow;
        self.left -= 1;
        self.kept = self.kept.min(self.left);
        self.taken += 1;
        report
    }
}

impl Flights {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Slot, BuildDigestHasher>> {
        &self.shards[(id >> 60) as usize % SHARDS]
    }

    /// A unit of `id`'s share, or the flight to wait for, or a new one to
    /// lead; `waited` tells a request that waited for the flight that
    /// brought the share (it may take a kept unit). A share past its time
    /// is handed back through `expired`.
    pub(super) fn take(
        &self,
        id: u64,
        now: Nanos,
        waited: bool,
        max_age: Nanos,
        expired: &mut Vec<Share>,
    ) -> Take {
        let mut shard = self.shard(id).lock();
        let slot = shard.entry(id).or_default();
        if !waited {
            slot.arrivals = slot.arrivals.saturating_add(1);
            slot.seen = now;
        }
        if let Some((report, part)) = Self::unit_of(slot, now, waited) {
            return Take::Unit(report, part);
        }
        if let Some(share) = &slot.share {
            if share.until <= now {
                if let Some(old) = slot.share.take() {
                    if old.left > 0 {
                        expired.push(old);
                    }
                }
            }
        }
        match &slot.flight {
            Some(f) => {
                f.joined.fetch_add(1, Ordering::AcqRel);
                Take::Join(Arc::clone(f))
            }
            None => {
                // What the key is likely to use in half a share's life, at
                // the rate requests came since the last flight (none on a
                // first flight, and little for a key seldom used: units
                // lent and not used are two more calls to give back).
                let demand = match slot.launched {
                    None => 0,
                    Some(at) => {
                        let window = now.saturating_sub(at).max(max_age / 10).max(1);
                        let d = u128::from(slot.arrivals) * u128::from(max_age)
                            / (2 * u128::from(window));
                        u32::try_from(d).unwrap_or(u32::MAX)
                    }
                };
                slot.arrivals = 0;
                slot.launched = Some(now);
                let f = Arc::new(Flight::default());
                f.joined.store(1, Ordering::Release);
                slot.flight = Some(Arc::clone(&f));
                Take::Lead(f, demand)
            }
        }
    }

    /// A unit of `id`'s share for a request that waited for the flight that
    /// brought it, if one is left; never a flight to wait for or lead.
    pub(super) fn unit(&self, id: u64, now: Nanos) -> Option<(Report, Arc<Part>)> {
        let mut shard = self.shard(id).lock();
        Self::unit_of(shard.get_mut(&id)?, now, true)
    }

    /// A unit of `slot`'s share, if it holds one for this request (`waited`:
    /// one that waited for the flight that brought it may take a kept unit).
    fn unit_of(slot: &mut Slot, now: Nanos, waited: bool) -> Option<(Report, Arc<Part>)> {
        let share = slot.share.as_mut()?;
        let free = if waited && share.kept > 0 {
            share.kept -= 1;
            true
        } else {
            share.left > share.kept
        };
        if !(share.until > now && share.left > 0 && free) {
            return None;
        }
        let report = share.take(now);
        let part = Arc::clone(&share.part);
        if share.left == 0 {
            slot.share = None;
        }
        Some((report, part))
    }

    /// A flight of `id` landed: its share (if units were granted) takes the
    /// place of any older one, which is handed back (returned); then every
    /// request waiting for it is woken.
    pub(super) fn land(
        &self,
        id: u64,
        flight: &Flight,
        end: End,
        share: Option<Share>,
    ) -> Option<Share> {
        let old = {
            let mut shard = self.shard(id).lock();
            let slot = shard.entry(id).or_default();
            if slot
                .flight
                .as_ref()
                .is_some_and(|f| std::ptr::eq(&**f, flight))
            {
                slot.flight = None;
            }
            match share {
                Some(mut s) => {
                    s.kept = flight.joined().min(s.left);
                    slot.share.replace(s)
                }
                None => None,
            }
        };
        flight.land(end);
        old.filter(|s| s.left > 0)
    }

    /// Takes out every share past its time (all of them with `all`), and
    /// forgets keys that saw no request for `idle`.
    pub(super) fn sweep(&self, now: Nanos, all: bool, idle: Nanos) -> Vec<Share> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.retain(|_, slot| {
                if let Some(s) = &slot.share {
                    if all || s.until <= now || s.left == 0 {
                        if let Some(s) = slot.share.take() {
                            if s.left > 0 {
                                out.push(s);
                            }
                        }
                    }
                }
                slot.share.is_some()
                    || slot.flight.is_some()
                    || slot.seen.saturating_add(idle) > now
            });
        }
        out
    }

    /// Takes out every share `matches` picks.
    fn take_matching(&self, matches: impl Fn(&Share) -> bool) -> Vec<Share> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.retain(|_, slot| {
                if slot.share.as_ref().is_some_and(&matches) {
                    if let Some(s) = slot.share.take() {
                        out.push(s);
                    }
                }
                true
            });
        }
        out
    }

    /// Whether the sweeper is yet to start (and now starts).
    pub(super) fn start_sweeping(&self) -> bool {
        !self.sweeping.load(Ordering::Acquire) && !self.sweeping.swap(true, Ordering::AcqRel)
    }
}

impl Inner {
    /// Gives a share's unused units back to Redis, in the background, as
    /// a settlement is sent: applied once, and sent again once Redis
    /// answers when it did not (see `retry`).
    pub(super) fn give_back(self: &Arc<Self>, share: Share) {
        let calls = self.giveback_calls(share);
        if calls.is_empty() {
            return;
        }
        self.give_back_in_background(calls);
    }

    /// Takes back this instance's shares of limits stored under any of
    /// `keys` and gives them back to Redis before an admin operation reads
    /// or changes those limits, so that it sees (and its change is not
    /// undone by) no unit this instance holds unused: the operation waits
    /// (within the timeout) until Redis has answered every write of this
    /// instance to `keys`. A give-back Redis does not answer is sent again
    /// once it does, as a settlement is.
    pub(super) fn recall(self: &Arc<Self>, keys: Vec<String>) -> impl Future<Output = ()> + use<> {
        let shares = self
            .flights
            .take_matching(|share| share.part.call.keys.iter().any(|k| keys.contains(k)));
        let calls: Vec<Call> = shares
            .into_iter()
            .flat_map(|s| self.giveback_calls(s))
            .collect();
        if !calls.is_empty() {
            self.settle_in_background(calls);
        }
        let inner = Arc::clone(self);
        async move {
            let answered = async {
                inner.answered(&keys).await;
                Ok(())
            };
            if inner.within(answered).await.is_err() {
                tracing::debug!("shares not given back in time; they are sent again later");
            }
        }
    }

    /// Gives back the shares of a store whose last handle is dropped
    /// (called as it drops; its calls in flight and in the background held
    /// it, so none is left): sent on a clone of its connection, in a task
    /// of the runtime it was dropped on or built on, each within the
    /// timeout. Without it the unused units of every share stayed charged
    /// until their quota windows ended; a runtime shutting down drops the
    /// task, as it drops every background call.
    pub(super) fn give_back_on_drop(&mut self) {
        let calls: Vec<Call> = self
            .flights
            .sweep(0, true, u64::MAX)
            .into_iter()
            .flat_map(|s| self.giveback_calls(s))
            .collect();
        if calls.is_empty() {
            return;
        }
        let Some(rt) = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.background.home())
        else {
            return;
        };
        let (conn, sha, timeout) = (self.conn.clone(), self.sha.clone(), self.timeout);
        rt.spawn(async move {
            for call in calls {
                let send = call.send_alone(conn.clone(), sha.clone());
                if tokio::time::timeout(timeout, send).await.is_err() {
                    tracing::debug!("share not given back in time; it stays charged");
                }
            }
        });
    }

    /// The calls that give a share's unused units back: each throttle what
    /// of them has not refilled since, unless reset since (mode "r"), each
    /// quota the units, in
    /// the window that counted them, as the exact inverse of their charge
    /// (mode "g", as a split decision's give-back). Not mode "t", which
    /// holds a count at zero: after UpdateUsage raised what remains past
    /// the limit the count is below zero, and "t" lifted it to zero, taking
    /// the whole raise away with the units. A share is taken back before
    /// an admin operation changes its quota (see `Inner::recall`), and one
    /// whose count is gone (expired) gets nothing.
    fn giveback_calls(&self, share: Share) -> Vec<Call> {
        let units = share.left;
        let mut calls = Vec::with_capacity(2);
        if units == 0 {
            return calls;
        }
        let now = self.now();
        let back = share.back();
        if !back.throttles.is_empty() {
            let mut call = Call::new("r", &now);
            call.arg(units);
            call.arg(back.throttles.len());
            let mut marks = Vec::with_capacity(back.throttles.len());
            for (key, limit, s, ns, cost) in &back.throttles {
                marks.push(reset_mark(key));
                call.keys.push(key.clone());
                call.arg(limit.gcra.interval());
                call.arg(limit.gcra.burst());
                call.arg(s);
                call.arg(ns);
                call.arg(u64::from(*cost) * u64::from(units));
            }
            // When the share was charged: a throttle reset since (by
            // another instance's `Admin::reset_key`; this one's takes its
            // shares back first) was refilled already, and gets nothing.
            call.keys.extend(marks);
            call.arg(back.charged.0);
            call.arg(back.charged.1);
            // Converted to the numbers in force first, when the throttle
            // was put anew since the share was borrowed, as a settlement
            // is: given back as it was charged, it would weigh under the
            // old numbers on a bucket kept under the new ones.
            for (_, limit, ..) in &back.throttles {
                call.args.extend(self.numbers.args(limit));
            }
            calls.push(call);
        }
        if !back.quotas.is_empty() {
            let delta = i64::from(share.cost) * i64::from(units);
            let mut call = Call::new("g", &now);
            call.arg(-delta);
            call.arg(0);
            call.arg(back.quotas.len());
            for (keys, args, history_days) in back.quotas {
                call.keys.extend(keys);
                call.args.extend(args);
                call.arg(history_days);
            }
            call.arg(back.charged.0);
            call.arg(back.charged.1);
            calls.push(call);
        }
        calls
    }

    /// How long a share lasts: `max_age`, or without borrowing the timeout
    /// (the units granted to waiting requests must outlive their waking).
    pub(super) fn share_life(&self) -> Nanos {
        let life = if self.max_age.is_zero() {
            self.timeout
        } else {
            self.max_age
        };
        u64::try_from(life.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Starts the task that gives back shares past their time and forgets
    /// keys no longer seen, once.
    pub(super) fn sweep_shares(self: &Arc<Self>) {
        if !self.flights.start_sweeping() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let every = std::time::Duration::from_nanos(self.share_life() / 4)
            .max(std::time::Duration::from_millis(10));
        rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                let now = inner.clock.nanos();
                for share in inner.flights.sweep(now, false, inner.share_life()) {
                    inner.give_back(share);
                }
            }
        });
    }
}

impl Inner {
    /// Decides a request that shares its call (see the module
    /// documentation), given what the table had for it (`take`): a unit of
    /// a share at once, else after the flight in progress or one it starts.
    /// `part` is its call; `lend`, the most units Redis may lend it beyond
    /// what waiting requests need.
    pub(super) fn shared(
        self: &Arc<Self>,
        id: u64,
        take: Take,
        part: Part,
        lend: u32,
        failure: FailureMode,
        context: Context,
    ) -> Acquired<Decided> {
        let flight = match take {
            Take::Unit(report, _) => return Acquired::Ready(Ok(Ok(report))),
            Take::Join(f) => f,
            Take::Lead(f, demand) => {
                self.launch(id, &f, &part, lend.min(demand), context);
                f
            }
        };
        let inner = Arc::clone(self);
        Acquired::Pending(Box::pin(async move {
            let work = async {
                let mut flight = flight;
                loop {
                    match flight.ended().await {
                        End::Denied(d) => return Ok(Err(d)),
                        End::Failed(e) => return Err(e),
                        // The grant fell short of the requests waiting:
                        // those left without a unit are denied.
                        End::Granted(Some(d)) => {
                            return Ok(inner.waited_unit(id).ok_or(d));
                        }
                        End::Granted(None) => {}
                    }
                    flight = match inner.next(id, true) {
                        Take::Unit(report, _) => return Ok(Ok(report)),
                        Take::Join(f) => f,
                        Take::Lead(f, demand) => {
                            inner.launch(id, &f, &part, lend.min(demand), context);
                            f
                        }
                    };
                }
            };
            match inner.within(work).await {
                Ok(verdict) => Ok(verdict),
                Err(e) => inner.fail(e, failure, &[&part]),
            }
        }))
    }

    /// What the table has for `id` now (`waited`: for a request that waited
    /// for a flight); a share past its time goes back.
    pub(super) fn next(self: &Arc<Self>, id: u64, waited: bool) -> Take {
        let mut expired = Vec::new();
        let take = self.flights.take(
            id,
            self.clock.nanos(),
            waited,
            self.share_life(),
            &mut expired,
        );
        for share in expired {
            self.give_back(share);
        }
        if let Take::Unit(report, part) = &take {
            // A unit of Redis's grant: an admission the local copy counts,
            // but no answer from Redis (it may be down since it granted
            // the share), so no end of a failure for the log: the flights
            // that land tell that.
            self.local.mirror(&[part], report);
        }
        take
    }

    /// A unit left of the share the flight `id`'s request waited for
    /// brought, if any (counted by the local copy, as [`next`](Self::next)
    /// counts one).
    fn waited_unit(&self, id: u64) -> Option<Report> {
        let (report, part) = self.flights.unit(id, self.clock.nanos())?;
        self.local.mirror(&[&part], &report);
        Some(report)
    }

    /// Sends `flight`'s call in a task of its own, and lands it.
    fn launch(
        self: &Arc<Self>,
        id: u64,
        flight: &Arc<Flight>,
        part: &Part,
        lend: u32,
        context: Context,
    ) {
        let inner = Arc::clone(self);
        let flight = Arc::clone(flight);
        let mut part = part.clone();
        tokio::spawn(async move {
            // Requests woken with this one join it before it is sent.
            tokio::task::yield_now().await;
            let want = flight.joined().saturating_sub(1);
            part.call.args[0] = "b".to_owned();
            if let (Now::Redis, Some(deadline)) = (inner.now(), inner.deadline()) {
                part.call.args[2] = deadline.to_string();
            }
            part.call.arg(want);
            part.call.arg(lend);
            let part = Arc::new(part);
            let (end, share) = match Ticket::take(&inner) {
                // Past the bound: denied when Redis denied it lately (see
                // `denials`; a shared request has no other call in flight).
                None => match inner.denials.fresh(&context.asked, inner.clock.nanos()) {
                    Some(denied) => (End::Denied(denied), None),
                    None => (
                        End::Failed(
                            StoreError::new("redis: too many calls in flight")
                                .with_kind(FailureKind::Unreachable),
                        ),
                        None,
                    ),
                },
                Some(ticket) => {
                    // Before Redis reads its clock: a share dated from here
                    // ends no later than the quota window that counted it.
                    let sent = inner.clock.nanos();
                    // What this instance wrote in the background to the
                    // part's limits (what its local copy admitted during an
                    // outage, see `Inner::repay`) is counted first.
                    let behind = inner.unanswered(&[&part]);
                    let result = inner
                        .within(async {
                            if !behind.is_empty() {
                                inner.answered(&behind).await;
                            }
                            inner.fly(&part).await
                        })
                        .await;
                    drop(ticket);
                    match result {
                        Ok((Ok(report), charged, granted, beyond)) => {
                            inner.failures.answered();
                            inner.denials.answered();
                            // A share lasts its maximum age, and never past
                            // the end of a quota window that counted it:
                            // any quota of the call, a model's too.
                            let age = inner.share_life();
                            let window = report
                                .items()
                                .iter()
                                .filter(|a| part.quotas.iter().any(|q| q.kind == a.kind))
                                .map(|a| a.reset)
                                .min()
                                .unwrap_or(u64::MAX);
                            let until = sent.saturating_add(age.min(window));
                            // When Redis answered, at the latest: the
                            // buckets refill in the units' reports from then.
                            let at = inner.clock.nanos();
                            let share =
                                Share::new(Arc::clone(&part), charged, report, granted, at, until);
                            (End::Granted(beyond), Some(share))
                        }
                        Ok((Err(denied), _, _, _)) => {
                            inner.failures.answered();
                            let now = inner.clock.nanos();
                            inner.denials.denied(&context.asked, sent, now, denied);
                            inner.local.learn_denial(&[&part], &denied);
                            let verdict = Err(denied);
                            inner.remember(&verdict, &context);
                            (End::Denied(denied), None)
                        }
                        Err(e) => {
                            inner.denials.failed();
                            (End::Failed(e), None)
                        }
                    }
                }
            };
            if let Some(old) = inner.flights.land(id, &flight, end, share) {
                inner.give_back(old);
            }
            // Shares past their time and keys no longer seen are swept.
            inner.sweep_shares();
        });
    }

    /// One flight's call: its verdict, what it charged, the units granted
    /// beyond the first, and the denial of one more unit when it would not
    /// have fitted.
    async fn fly(
        self: &Arc<Self>,
        part: &Part,
    ) -> Result<(Verdict, Charged, u32, Option<Denied>), StoreError> {
        let reply = Arc::clone(self).run(part.call.clone()).await?;
        let (granted, reply) = reply
            .split_last()
            .ok_or_else(|| StoreError::new("redis: unexpected script reply"))?;
        let granted = u32::try_from(*granted)
            .map_err(|_| StoreError::new("redis: unexpected script reply"))?;
        let (verdict, charged) = part.verdict(reply, part.cost)?;
        let beyond = match verdict {
            Ok(_) => part.beyond(reply, granted.saturating_add(1)),
            Err(_) => None,
        };
        Ok((verdict, charged, granted, beyond))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share of `units` units (the first one's report empty), good until `until`.
    fn share(units: u32, until: Nanos) -> Share {
        let part = Arc::new(Part::new(&Now::At { s: 0, ns: 0 }, 1));
        Share::new(
            part,
            Charged::default(),
            Report::default(),
            units - 1,
            0,
            until,
        )
    }

    const AGE: Nanos = 1_000_000_000;

    fn take(f: &Flights, now: Nanos, waited: bool) -> Take {
        let mut expired = Vec::new();
        let t = f.take(7, now, waited, AGE, &mut expired);
        assert!(expired.is_empty());
        t
    }

    #[test]
    fn the_first_request_leads_the_next_ones_join() {
        let f = Flights::default();
        let Take::Lead(lead, demand) = take(&f, 10, false) else {
            panic!("the first request leads")
        };
        assert_eq!(demand, 0, "nothing is known of the key's rate yet");
        let Take::Join(joined) = take(&f, 11, false) else {
            panic!("the second joins")
        };
        assert!(Arc::ptr_eq(&lead, &joined));
        assert_eq!(lead.joined(), 2);
    }

    #[test]
    fn the_requests_that_waited_take_their_units_before_new_ones() {
        let f = Flights::default();
        let Take::Lead(flight, _) = take(&f, 10, false) else {
            panic!()
        };
        let _ = take(&f, 11, false); // joins: two wait
        let old = f.land(7, &flight, End::Granted(None), Some(share(3, 10 + AGE)));
        assert!(old.is_none());
        // Two units are kept for the two that waited; one is free.
        assert!(matches!(take(&f, 12, false), Take::Unit(..)));
        assert!(
            matches!(take(&f, 13, false), Take::Lead(..)),
            "the kept ones are not free"
        );
        assert!(matches!(take(&f, 14, true), Take::Unit(..)));
        assert!(matches!(take(&f, 15, true), Take::Unit(..)));
    }

    #[test]
    fn a_share_past_its_time_is_handed_back_and_a_new_flight_led() {
        let f = Flights::default();
        let Take::Lead(flight, _) = take(&f, 10, false) else {
            panic!()
        };
        f.land(7, &flight, End::Granted(None), Some(share(5, 100)));
        assert!(matches!(take(&f, 20, false), Take::Unit(..)));
        let mut expired = Vec::new();
        let t = f.take(7, 100, false, AGE, &mut expired);
        assert!(matches!(t, Take::Lead(..)));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].left, 4, "the unused units go back");
    }

    #[test]
    fn a_key_borrows_for_the_rate_its_requests_came_at() {
        let f = Flights::default();
        let Take::Lead(flight, _) = take(&f, 0, false) else {
            panic!()
        };
        // Nine more in the next 90 ms join the flight.
        for i in 1..10 {
            assert!(matches!(take(&f, i * 10_000_000, false), Take::Join(_)));
        }
        f.land(
            7,
            &flight,
            End::Denied(Denied::concurrency(Applied::default())),
            None,
        );
        // The tenth since the launch, 100 ms after it: 100 a second, so 50
        // in half of max_age.
        let Take::Lead(_, demand) = take(&f, 100_000_000, false) else {
            panic!("no flight is in the air")
        };
        assert_eq!(demand, 50);
    }

    #[test]
    fn idle_keys_are_forgotten_and_all_shares_can_be_recalled() {
        let f = Flights::default();
        let Take::Lead(flight, _) = take(&f, 10, false) else {
            panic!()
        };
        f.land(7, &flight, End::Granted(None), Some(share(3, 10 + AGE)));
        assert_eq!(
            f.sweep(20, true, AGE).len(),
            1,
            "drained: the share goes back"
        );
        assert!(f.sweep(10 + 2 * AGE, false, AGE).is_empty());
        assert!(
            f.shards.iter().all(|s| s.lock().is_empty()),
            "the idle key is forgotten"
        );
    }
}
