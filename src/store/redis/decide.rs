//! [`RedisStore`] as a [`Store`]: deciding a request (from the over-limit
//! cache when it can, else in one call, or up to three on a cluster when
//! stage limits and an account's live in slots of their own), releasing
//! places under concurrency caps, and settling tokens. A request past the
//! bound on calls in flight is answered as `denials` says. The admin
//! operations it answers are in `admin`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::cache::OverLimitCache;
use super::call::{Call, Charged, Part, quota_args, spec_args};
use super::denials::{Asked, Ended, InFlight, PastBound};
use super::flights::Take;
use super::guards::{Lease, Ticket};
use super::keys::reset_mark;
use super::store::{Inner, RedisStore};
use super::time::Now;
use crate::clock::Clock;
use crate::gcra::NANOS_PER_SEC;
use crate::hash;
use crate::store::{
    Acquire, Acquired, Denied, FailureKind, Permit, QuotaRef, Report, Settlement, Store,
    StoreError, StoreFuture, ThrottleRef, Verdict,
};
use crate::window::Date;

/// Stable identities of a request: for the over-limit cache and the calls
/// it shares, its limits, their numbers, its subject, its cost, and its
/// estimated tokens when a limit counts them; and for the denials
/// remembered past the bound on calls in flight, its subject (all of that
/// but the cost and the tokens) with what it costs beside it.
fn identity(req: &Acquire<'_>, tokens: bool) -> (u64, Asked) {
    let mut bytes = Vec::with_capacity(128);
    for t in req.throttles() {
        bytes.extend_from_slice(&t.limit.salt.to_le_bytes());
        bytes.extend_from_slice(&t.limit.gcra.interval().to_le_bytes());
        bytes.extend_from_slice(&t.limit.gcra.burst().to_le_bytes());
        bytes.push(u8::from(t.shadow));
        bytes.extend_from_slice(t.plan.unwrap_or("").as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(t.account.unwrap_or("").as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&(t.subject.len() as u64).to_le_bytes());
        bytes.extend_from_slice(t.subject);
    }
    for q in req
        .account_quotas
        .iter()
        .flatten()
        .chain(&req.quota)
        .chain(req.model_quotas.iter().flatten())
    {
        bytes.extend_from_slice(b"q");
        // Which quota: a model's differ from the plan's by it alone.
        bytes.extend_from_slice(&q.spec.salt.to_le_bytes());
        bytes.extend_from_slice(q.plan.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(q.account.unwrap_or("").as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&(q.subject.len() as u64).to_le_bytes());
        bytes.extend_from_slice(q.subject);
        // Everything the quota is decided under: a plan put anew with the
        // same limit but another period, offset or creation, or in shadow,
        // is another quota, whose denial under the old numbers says nothing.
        bytes.extend_from_slice(&q.spec.limit.to_le_bytes());
        bytes.push(crate::quota::period_code(q.spec.period));
        bytes.push(u8::from(q.shadow));
        bytes.extend_from_slice(&q.spec.offset.to_le_bytes());
        bytes.extend_from_slice(&q.spec.created_at.to_le_bytes());
    }
    for c in req.caps() {
        bytes.extend_from_slice(b"c");
        bytes.extend_from_slice(&c.salt.to_le_bytes());
        bytes.extend_from_slice(&c.limit.to_le_bytes());
        bytes.push(u8::from(c.shadow));
        bytes.extend_from_slice(c.plan.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&(c.subject.len() as u64).to_le_bytes());
        bytes.extend_from_slice(c.subject);
    }
    // The process's keyed hash: clients choose subjects, and must not be able
    // to aim them at one shard of the cache.
    let asked = Asked {
        subject: hash::digest(&bytes).0 as u64,
        cost: req.cost,
        tokens: if tokens { req.tokens } else { 0 },
    };
    // The whole request: its subject's digest, then its cost and tokens.
    let mut whole = [0u8; 17];
    whole[..8].copy_from_slice(&asked.subject.to_le_bytes());
    whole[8..12].copy_from_slice(&req.cost.to_le_bytes());
    let len = if tokens {
        whole[12] = b't';
        whole[13..].copy_from_slice(&req.tokens.to_le_bytes());
        17
    } else {
        12
    };
    (hash::digest(&whole[..len]).0 as u64, asked)
}

pub(super) type Decided =
    Pin<Box<dyn Future<Output = Result<Verdict, StoreError>> + Send + 'static>>;

impl Store for RedisStore {
    type Future = Decided;

    fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    fn shared_registry(&self) -> Option<crate::SharedRegistry> {
        self.inner
            .shared_registry
            .then(|| crate::SharedRegistry::new(self.clone()))
    }

    fn acquire(&self, request: &Acquire<'_>) -> Acquired<Self::Future> {
        let inner = &self.inner;
        if request.throttles().next().is_none()
            && request.quotas().next().is_none()
            && !request.has_caps()
        {
            // Nothing to decide: no round trip.
            return Acquired::Ready(Ok(Ok(Report::default())));
        }
        // What the local copy admitted on its own during an outage is
        // charged to Redis first (one load when it owes nothing); this
        // request's call waits for it when it shares a quota with it.
        inner.repay();
        // A denial is cached as of the time the request was sent, so that it
        // never outlasts what Redis would answer.
        let sent = inner.local_now();
        // A request with token limits is never answered from the cache: a
        // settlement may give tokens back before a cached retry time.
        let tokens = request.throttles().any(|t| t.counts_tokens())
            || request.quotas().any(|q| q.counts_tokens());
        // Limits shared by every caller (or by an account's keys) move with
        // others' requests, but a shared throttle never asks a wait longer
        // than its span: a cached quota denial holds only while its window
        // ends later than that.
        let shared_span = request
            .throttles()
            .filter(|t| t.plan.is_none())
            .map(|t| t.limit.gcra.span())
            .max()
            .unwrap_or(0);
        let (id, asked) = identity(request, tokens);
        if let (false, Some(cache)) = (tokens, &inner.cache) {
            if let Some(denied) = cache.get(id, sent) {
                return Acquired::Ready(Ok(Err(denied)));
            }
        }
        let cost = request.cost;
        let failure = request.failure;
        // On a cluster the stage's shared buckets live in their own slot,
        // and so do an account's limits.
        let split =
            inner.cluster && (request.throttles().any(|t| t.is_stage()) || request.has_account());
        // Requests that share nothing but their limits' state wait for one
        // call together (see `flights`): not a peek, not a request holding
        // a place or reserving tokens, and not one decided in several calls.
        // A unit of a share answers at once, before the call is even built.
        let shares = !split
            && cost > 0
            && !tokens
            && !request.has_caps()
            && tokio::runtime::Handle::try_current().is_ok();
        let take = if shares {
            match inner.next(id, false) {
                Take::Unit(report, _) => return Acquired::Ready(Ok(Ok(report))),
                take => Some(take),
            }
        } else {
            None
        };
        let now = inner.now();
        let mut stage = Part::new(&now, cost);
        let mut account = Part::new(&now, cost);
        let mut own = Part::new(&now, cost);
        stage.tokens = request.tokens;
        account.tokens = request.tokens;
        own.tokens = request.tokens;
        for t in request.throttles() {
            let cost = request.cost_for(t.counts_tokens());
            if split && t.is_stage() {
                stage.push_throttle(inner, t, cost);
            } else if split && t.account.is_some() {
                account.push_throttle(inner, t, cost);
            } else {
                own.push_throttle(inner, t, cost);
            }
        }
        for q in request.quotas() {
            let cost = request.cost_for(q.counts_tokens());
            if split && q.account.is_some() {
                account.push_quota(inner, q, cost);
            } else {
                own.push_quota(inner, q, cost);
            }
        }
        for c in request.caps() {
            own.push_cap(inner, c);
        }
        // Places the local copy granted on its own during an outage, whose
        // responses still run, count as taken (see `Local::held_under`):
        // the call counts them beside Redis's, and a cap they fill denies
        // at once, with no call.
        if let Some(denied) = own.full_here() {
            return Acquired::Ready(Ok(Err(denied)));
        }
        stage.finish(inner.lease);
        account.finish(inner.lease);
        own.finish(inner.lease);
        let context = Context {
            sent,
            shared_span,
            cache_id: (!tokens && inner.cache.is_some()).then_some(id),
            cache_generation: inner.cache.as_ref().map_or(0, |c| c.generation()),
            asked,
        };
        if let Some(take) = take {
            // Nothing is lent ahead of demand from an account's limits: a
            // share held for one key would be capacity the account's other
            // keys could not use. Units granted to requests waiting now are
            // charged to the account in the same call, as to every limit.
            let lend = if request.borrow
                && !inner.max_age.is_zero()
                && !request.has_account()
                && request.throttles().all(|t| t.plan.is_some() && !t.shadow)
                && request.quotas().all(|q| !q.shadow)
            {
                inner.max_share
            } else {
                0
            };
            return inner.shared(id, take, own, lend, failure, context);
        }
        // A peek reads what remains of its limits: the units this instance
        // holds unused of a share of them go back to Redis first, as before
        // an admin operation, or the peek would count them as used where
        // the memory store (and the headers of the requests they admit)
        // count them free.
        let recall = (cost == 0 && request.borrow && !inner.max_age.is_zero()).then(|| {
            let keys = [&stage, &account, &own]
                .iter()
                .flat_map(|p| p.call.keys.iter().cloned())
                .collect();
            inner.recall(keys)
        });
        if let (Now::Redis, Some(deadline)) = (now, inner.deadline()) {
            stage.call.args[2] = deadline.to_string();
            account.call.args[2] = deadline.to_string();
            own.call.args[2] = deadline.to_string();
        }
        let behind = inner.unanswered(&[&stage, &account, &own]);
        let Some(ticket) = Ticket::take(inner) else {
            return inner.past_bound(&asked, failure, [stage, account, own]);
        };
        let in_flight = InFlight::new(inner, asked);
        let inner = Arc::clone(inner);
        Acquired::Pending(Box::pin(async move {
            // The decision answers within the timeout, what it waits for
            // first included.
            let started = tokio::time::Instant::now();
            if let Some(recall) = recall {
                recall.await;
            }
            // What this instance wrote to the request's limits as earlier
            // responses ended (a place given back, a settlement) is written
            // before the request is decided, as the memory store has it.
            if !behind.is_empty() {
                let _ = inner
                    .within_since(started, async {
                        inner.answered(&behind).await;
                        Ok(())
                    })
                    .await;
            }
            // A place Redis may have added is removed unless a response
            // holds it: the request's future dropped, the timeout, a lost
            // connection, a reply that makes no sense.
            let mut lease = Lease::new(&inner, own.caps.iter().map(|c| c.permit));
            let result = if split {
                // Bounded by the timeout call by call, not as a whole: a
                // denial known when it expires is the answer (see there).
                decide_split(&inner, &[&stage, &account, &own], cost, started).await
            } else {
                inner
                    .within_since(started, async {
                        let reply = Arc::clone(&inner).run(own.call.clone()).await?;
                        Ok(own.verdict(&reply, cost)?.0)
                    })
                    .await
            };
            drop(ticket);
            match result {
                Ok(verdict) => {
                    in_flight.end(Ended::Answered(verdict.as_ref().err().copied()));
                    lease.keep();
                    let parts = [&stage, &account, &own];
                    match &verdict {
                        Ok(report) => {
                            // Its response holds its places from now on.
                            inner.hold(report.permits());
                            inner.local.mirror(&parts, report);
                        }
                        Err(denied) => inner.local.learn_denial(&parts, denied),
                    }
                    inner.failures.answered();
                    inner.remember(&verdict, &context);
                    Ok(verdict)
                }
                Err(e) => {
                    in_flight.end(Ended::Failed);
                    if e.is_unrun() {
                        // Redis never ran the call that would have taken
                        // the places (or the one before it, on a cluster):
                        // there is none to remove. Removals sent anyway
                        // were retried until the lease ran out, one task
                        // per request through a whole outage.
                        lease.keep();
                    }
                    inner.fail(e, failure, &[&stage, &account, &own])
                }
            }
        }))
    }

    /// Converts nothing in Redis: each key is converted the next time it is
    /// used (see the script's mode "a"). The numbers are noted for the
    /// settlements of requests reserved under the old ones and the
    /// give-backs of what was charged under them (a borrowed share, a split
    /// decision's refund), which are converted to them. The local copy
    /// that decides `Local` failures is converted at once, as the memory
    /// store is: through an outage it decides under the new numbers with
    /// the share of each bucket in use carried over, not a bucket kept
    /// under the old ones.
    fn rescale(&self, old: &ThrottleRef<'_>, new: &ThrottleRef<'_>) {
        self.inner.local.rescale(old, new);
        self.inner.numbers.note(new.limit);
    }

    fn release(&self, permit: Permit) {
        if !self.inner.local.release(permit) {
            self.inner.remove_place(permit);
        }
    }

    /// An under-estimate is charged to every token limit. An over-estimate
    /// is given back to the token quotas in the window that counted it, and
    /// to the per-minute bucket only as far as the estimate's own share has
    /// not refilled yet (a refund, mode "r"): tokens that have refilled since
    /// may have been granted to later requests, and are not handed out twice.
    /// Neither gets anything when reset after the reservation.
    ///
    /// The local copy that decides `Local` failures is settled too (see
    /// `Local::settle`). A request the copy decided was charged nothing in
    /// Redis: an over-estimate goes back to the copy alone, never to Redis,
    /// where it would free tokens other requests used; an under-estimate is
    /// charged to both.
    fn settle(&self, settlement: &Settlement<'_>) {
        self.inner.local.settle(settlement);
        if settlement.reserved.local && settlement.delta < 0 {
            // What the copy still owes Redis for the reservation is owed
            // less by what was not used.
            let units = settlement.delta.unsigned_abs();
            if let (true, Some(wall)) = (self.inner.local.owes(), settlement.reserved.wall) {
                let day = wall.div_euclid(crate::window::NANOS_PER_DAY);
                for q in settlement.quotas.iter().flatten() {
                    let [key, _] = self.inner.quota_keys(q);
                    self.inner.local.forgive(&key, day, units);
                }
            }
            if let (true, Some(t)) = (self.inner.local.owes(), &settlement.throttle) {
                let key = self.inner.throttle_key(t);
                self.inner.local.forgive_throttle(&key, units);
            }
            return;
        }
        let inner = Arc::clone(&self.inner);
        let now = inner.now();
        // The script's integers are exact below 2^53; a larger settlement
        // would be refused whole, so it is charged as the largest it takes.
        const EXACT: i64 = (1 << 53) - 1;
        let delta = settlement.delta.clamp(-EXACT, EXACT);
        let mut calls = Vec::with_capacity(2);
        let reserved = settlement.reserved;
        let throttle = settlement.throttle.as_ref().filter(|_| delta > 0);
        // An over-estimate goes back only to the quota windows that counted
        // it, and not to a count reset since: the time it was charged is
        // passed for the script to check.
        let quotas = if delta > 0 || reserved.wall.is_some() {
            settlement.quotas
        } else {
            [None, None]
        };
        let mut call = Call::new("t", &now);
        call.arg(delta);
        call.arg(usize::from(throttle.is_some()));
        if let Some(t) = throttle {
            call.keys.push(inner.throttle_key(t));
            call.arg(t.limit.gcra.interval());
            call.arg(t.limit.gcra.burst());
            // Converted to the numbers in force first, when they changed
            // since the reservation.
            call.args.extend(inner.numbers.args(t.limit));
        }
        call.arg(quotas.iter().flatten().count());
        for q in quotas.iter().flatten() {
            call.keys.extend(inner.quota_keys(q));
            quota_args(&mut call, q);
            call.arg(q.history_days);
        }
        if let (Some(wall), true) = (reserved.wall, delta < 0) {
            call.arg(wall.div_euclid(NANOS_PER_SEC as i64));
            call.arg(wall.rem_euclid(NANOS_PER_SEC as i64));
        }
        if !call.keys.is_empty() {
            calls.push(call);
        }
        if let (Some(t), Some(mine), true) = (&settlement.throttle, reserved.until, delta < 0) {
            let mut call = Call::new("r", &now);
            let key = inner.throttle_key(t);
            let mark = reset_mark(&key);
            call.keys.extend([key, mark]);
            call.arg(delta.unsigned_abs());
            call.arg(1);
            call.arg(t.limit.gcra.interval());
            call.arg(t.limit.gcra.burst());
            call.arg(mine / NANOS_PER_SEC);
            call.arg(mine % NANOS_PER_SEC);
            call.arg(delta.unsigned_abs());
            // When the decision charged the bucket: a reset since refilled
            // the share, and the script gives it nothing back. (Without
            // one, which only an overflow leaves, any reset counts as
            // later: erring toward admitting less.)
            let at = settlement.reserved_at().unwrap_or(0);
            call.arg(at / NANOS_PER_SEC);
            call.arg(at % NANOS_PER_SEC);
            // Converted to the numbers in force first, when they changed
            // since the reservation.
            call.args.extend(inner.numbers.args(t.limit));
            calls.push(call);
        }
        if calls.is_empty() {
            return;
        }
        // Never waited for, each try bounded by the timeout; one Redis does
        // not answer is sent again once it does (see `retry`). This
        // instance's next decisions on the same limits wait for it.
        inner.settle_in_background(calls);
    }

    /// Logs the quota's numbers before the change, once for all its keys
    /// (see `Inner::requota`): a report reads each day's record under the
    /// numbers in force at the day's end. Sent in the background, never on
    /// a decision's way; a report this instance reads waits for it.
    fn requota(&self, old: &QuotaRef<'_>) {
        self.inner.requota(old);
    }

    // An admin operation first takes back this instance's shares of the
    // limits it reads or changes (see `Inner::recall`).

    fn usage(&self, quota: &QuotaRef<'_>, first: Date, last: Date) -> StoreFuture<Vec<[i64; 2]>> {
        let recall = self.inner.recall(self.inner.quota_keys(quota).into());
        let work = self.inner.usage(quota, first, last);
        Box::pin(async move {
            recall.await;
            work.await
        })
    }

    fn set_remaining(&self, quota: &QuotaRef<'_>, remaining: u64) -> StoreFuture<u64> {
        let recall = self.inner.recall(self.inner.quota_keys(quota).into());
        let work = self.inner.set_remaining(quota, remaining);
        Box::pin(async move {
            recall.await;
            work.await
        })
    }

    fn reset(
        &self,
        throttles: &[ThrottleRef<'_>],
        quota: Option<&QuotaRef<'_>>,
    ) -> StoreFuture<()> {
        let mut keys: Vec<String> = throttles
            .iter()
            .map(|t| self.inner.throttle_key(t))
            .collect();
        keys.extend(quota.into_iter().flat_map(|q| self.inner.quota_keys(q)));
        let recall = self.inner.recall(keys);
        let work = self.inner.reset(throttles, quota);
        Box::pin(async move {
            recall.await;
            work.await
        })
    }
}

/// Decides a request whose limits live in several cluster slots, one part
/// after the other in the order stage, account, key (a part with no limit is
/// skipped). When a part denies, the later parts are peeked at (nothing
/// charged), so that the answer names the limit that holds the request
/// longest, as one call would (a peek that fails names none: the denial
/// stands); when it denies or fails, or the decision is dropped before it
/// ends (its client went away), every earlier part gets back what this
/// request charged it (throttles and quotas), in the background: the answer
/// does not wait for it. A denial charges nothing anywhere, but for the time
/// the refunds take to land.
///
/// The timeout bounds the whole decision, each call by what remains of it,
/// so that the one it cuts is known: a part that charges fails the decision
/// (the plan's failure mode decides), a peek leaves the denial standing, as
/// a peek that fails does. Were the whole cut at once, a request the limits
/// denied would go to the failure mode whenever a later part's node is slow
/// (`open`, or a local copy with room, lets it in).
async fn decide_split(
    inner: &Arc<Inner>,
    parts: &[&Part],
    cost: u32,
    started: tokio::time::Instant,
) -> Result<Verdict, StoreError> {
    let run = |call: Call| inner.within_since(started, Arc::clone(inner).run(call));
    let parts: Vec<&Part> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut charged = Charges {
        inner,
        cost,
        parts: Vec::with_capacity(parts.len()),
    };
    let mut all = Report::default();
    for (i, part) in parts.iter().enumerate() {
        let result = match run(part.call.clone()).await {
            Ok(reply) => part.verdict(&reply, cost),
            Err(e) => Err(e),
        };
        match result {
            Ok((Ok(report), c)) => {
                for item in report.items() {
                    all.push(*item);
                }
                for permit in report.permits() {
                    all.set_permit(permit);
                }
                let r = report.reserved;
                all.reserved.until = all.reserved.until.or(r.until);
                all.reserved.account_until = all.reserved.account_until.or(r.account_until);
                all.reserved.model_until = all.reserved.model_until.or(r.model_until);
                // The latest part's time: the key's own counts, decided
                // last, may have been made by this very charge, a moment
                // after the account's was charged in its slot; a refund
                // checks its charge was no earlier than the count.
                all.reserved.wall = r.wall.or(all.reserved.wall);
                charged.parts.push((part, c));
            }
            Ok((Err(d), _)) => {
                charged.give_back();
                let mut denied = d;
                for later in &parts[i + 1..] {
                    let mut peek = (*later).clone();
                    peek.call.args[0] = "p".to_owned();
                    let verdict = match run(peek.call.clone()).await {
                        Ok(reply) => peek.verdict(&reply, cost).map(|(v, _)| v),
                        Err(e) => Err(e),
                    };
                    match verdict {
                        Ok(Err(mine)) => denied = Denied::longest(Some(denied), mine),
                        Ok(Ok(_)) => {}
                        // A peek only names the limit that holds the
                        // request longest; the request is denied already.
                        // One that fails, or that the timeout cuts, leaves
                        // the denial as far as it is known: passed up as an
                        // error, it put a request the limits deny in the
                        // plan's failure mode, which may admit it (`open`,
                        // or a local copy with room).
                        Err(e) => {
                            tracing::debug!(
                                error = %e,
                                "a later part not peeked at; the denial stands"
                            );
                            break;
                        }
                    }
                }
                return Ok(Err(denied));
            }
            Err(e) => {
                charged.give_back();
                return Err(e);
            }
        }
    }
    // Every part charged: the request holds it all.
    charged.parts.clear();
    Ok(Ok(all))
}

/// What the parts of a split decision charged so far, given back unless the
/// request was allowed: when a later part denies or fails, and when the
/// decision is dropped before it ends (the client went away while a later
/// part's call was on its way). Without the last, a client past its own
/// limits drained the stage's shared bucket (or its account's) by hanging
/// up early. A later part's call that Redis still runs after the drop
/// charges that part as a single call dropped after it was sent does.
struct Charges<'a> {
    inner: &'a Arc<Inner>,
    cost: u32,
    parts: Vec<(&'a Part, Charged)>,
}

impl Charges<'_> {
    /// Refunds every part charged so far, in the background.
    fn give_back(&mut self) {
        for (part, c) in self.parts.drain(..) {
            spawn_refund(self.inner, part.clone(), c, self.cost);
        }
    }
}

impl Drop for Charges<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// Refunds a part in the background, as a settlement is sent: applied
/// once, and sent again once Redis answers when it did not (see `retry`);
/// a refund Redis answers with an error leaves the part charged (it errs
/// toward admitting less).
fn spawn_refund(inner: &Arc<Inner>, part: Part, charged: Charged, cost: u32) {
    let calls = refund_calls(inner, &part, &charged, cost);
    if !calls.is_empty() {
        inner.give_back_in_background(calls);
    }
}

/// The calls that give a part back what one request charged it: its
/// throttles what of the charge has not refilled and no reset refilled
/// (mode "r"), its quotas
/// their cost in the window and on the day that counted it (mode "g": the
/// exact inverse of the charge, so that a count raised below zero by
/// UpdateUsage keeps its raise, as the memory store's give-back does).
fn refund_calls(inner: &Arc<Inner>, part: &Part, charged: &Charged, cost: u32) -> Vec<Call> {
    let now = inner.now();
    let mut calls = Vec::new();
    let mut call = Call::new("r", &now);
    call.arg(cost);
    let mut args: Vec<String> = Vec::new();
    let mut marks: Vec<String> = Vec::new();
    let mut numbers: Vec<String> = Vec::new();
    let n = part.throttles.len();
    for ((t, tat), key) in part
        .throttles
        .iter()
        .zip(&charged.tats)
        .zip(&part.call.keys)
    {
        let Some(ahead) = tat else { continue };
        // The TAT stored, in seconds and nanoseconds of the charging call's time.
        let total = charged.now_ns as u64 + ahead;
        call.keys.push(key.clone());
        marks.push(reset_mark(key));
        args.push(t.limit.gcra.interval().to_string());
        args.push(t.limit.gcra.burst().to_string());
        args.push((charged.now_s + (total / NANOS_PER_SEC) as i64).to_string());
        args.push((total % NANOS_PER_SEC).to_string());
        args.push(t.cost.to_string());
        numbers.extend(inner.numbers.args(&t.limit));
    }
    if !call.keys.is_empty() {
        call.arg(call.keys.len());
        call.args.extend(args);
        // When the part charged them: a throttle reset since (by
        // `Admin::reset_key`) was refilled already, and gets nothing back.
        call.keys.extend(marks);
        call.arg(charged.now_s);
        call.arg(charged.now_ns);
        // Converted to the numbers in force first, when the throttle was
        // put anew since the part charged it, as a settlement is.
        call.args.extend(numbers);
        calls.push(call);
    }
    for (i, q) in part.quotas.iter().enumerate() {
        if q.cost == 0 {
            continue;
        }
        let Some(keys) = part.call.keys.get(n + 2 * i..n + 2 * i + 2) else {
            continue;
        };
        let mut call = Call::new("g", &now);
        call.arg(-i64::from(q.cost));
        call.arg(0);
        call.arg(1);
        call.keys.extend(keys.iter().cloned());
        spec_args(&mut call, &q.spec);
        call.arg(q.history_days);
        // When the quotas were charged: a window that began after it, or a
        // count reset since, never counted this request.
        call.arg(charged.now_s);
        call.arg(charged.now_ns);
        calls.push(call);
    }
    calls
}

/// What answering a request needs beside its call: when it was sent, and
/// how its denial may be cached.
#[derive(Debug, Clone, Copy)]
pub(super) struct Context {
    pub(super) sent: crate::gcra::Nanos,
    pub(super) shared_span: crate::gcra::Nanos,
    /// Its identity in the over-limit cache, when there is one.
    pub(super) cache_id: Option<u64>,
    /// The cache's generation when it was sent (see `OverLimitCache::insert`).
    pub(super) cache_generation: u64,
    /// The request as the denials remembered past the bound know it.
    pub(super) asked: Asked,
}

impl Inner {
    /// Caches a denial that stays what Redis would answer.
    pub(super) fn remember(&self, verdict: &Verdict, context: &Context) {
        if let (Err(denied), Some(id), Some(cache)) = (verdict, context.cache_id, &self.cache) {
            if OverLimitCache::holds(denied) {
                cache.insert(
                    id,
                    context.sent,
                    *denied,
                    context.shared_span,
                    context.cache_generation,
                );
            }
        }
    }
}

impl Inner {
    /// Decides a request (`asked`, limits `parts`) that would be one call
    /// more than the bound: denied when Redis denied it (or a request of
    /// its subject, in a way that denies it too) lately or in a call in
    /// flight when it came, else by its failure mode (see `denials`). It
    /// sends no call, so it takes no place.
    fn past_bound(
        self: &Arc<Self>,
        asked: &Asked,
        failure: crate::FailureMode,
        parts: [Part; 3],
    ) -> Acquired<Decided> {
        let e = || {
            StoreError::new("redis: too many calls in flight").with_kind(FailureKind::Unreachable)
        };
        let wait = match self.denials.past_bound(asked, self.clock.nanos()) {
            PastBound::Denied(denied) => return Acquired::Ready(Ok(Err(denied))),
            PastBound::Fail => {
                let [stage, account, own] = &parts;
                return Acquired::Ready(self.fail(e(), failure, &[stage, account, own]));
            }
            PastBound::Wait(wait) => wait,
        };
        let inner = Arc::clone(self);
        Acquired::Pending(Box::pin(async move {
            let denied = inner.denials.after(wait, || inner.clock.nanos());
            match inner.within(async { Ok(denied.await) }).await {
                Ok(Some(denied)) => Ok(Err(denied)),
                Ok(None) | Err(_) => {
                    let [stage, account, own] = &parts;
                    inner.fail(e(), failure, &[stage, account, own])
                }
            }
        }))
    }
}

/// The pause before the second try of a lease's removal; each pause after
/// it is twice the last, up to [`LEASE_RETRY_MAX`].
const LEASE_RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between two tries of a lease's removal: once Redis is
/// back, a place is given back within about this long.
const LEASE_RETRY_MAX: Duration = Duration::from_secs(2);

impl Inner {
    /// Removes a place under a concurrency cap, in the background (never
    /// waited for: a lease that cannot be removed lapses by itself).
    pub(super) fn remove_place(self: &Arc<Self>, permit: Permit) {
        self.unhold(&permit);
        let key = self.cap_key(&permit);
        let member = format!("{:016x}", permit.id);
        self.remove_lease(key, member);
    }

    /// Removes lease `member` from the sorted set `key`, in the background.
    /// A `ZREM` is idempotent, so one that fails (a timeout on a loaded
    /// link, Redis restarting or cut off) is sent again after a pause, until
    /// the lease would have lapsed by itself: a place left behind would
    /// refuse the key's requests until then, however short the outage was
    /// past the first tries. Only Redis's own places are removed, so those
    /// waiting are at most the places Redis granted within a lease. While it
    /// pauses, the removal is no call in flight for
    /// [`RedisStore::drained`], which does not wait out an outage for it
    /// (the place then lapses with its lease, as after a crash).
    ///
    /// Until the first `ZREM` is answered, decisions of this instance under
    /// the same cap wait for it ([`answered`](Self::answered)): sent
    /// before it, the next request of a client that waited for its response
    /// to end would find its own place still taken.
    pub(super) fn remove_lease(self: &Arc<Self>, key: String, member: String) {
        let task = Arc::clone(self);
        let mut giving = Some(Unanswered::new(self, vec![key.clone()]));
        // A lease too long to add to now never lapses: tried until Redis answers.
        let lapsed = tokio::time::Instant::now().checked_add(self.lease);
        self.spawn(async move {
            let cmd = redis::cmd("ZREM").arg(key).arg(member).clone();
            let mut pause = LEASE_RETRY_FIRST;
            loop {
                let result = task.command::<i64>(cmd.clone()).await;
                // Answered (or timed out): the retries go on unwaited for.
                drop(giving.take());
                match &result {
                    Ok(_) => task.failures.answered(),
                    // A failure of the store as a decision's is: logged
                    // when it starts and when it ends.
                    Err(e) => task.failures.failed_aside(e),
                }
                match result {
                    Ok(_) => return,
                    Err(e)
                        if lapsed.is_some_and(|at| tokio::time::Instant::now() + pause >= at) =>
                    {
                        tracing::debug!(error = %e, "lease not removed; it lapses by itself");
                        return;
                    }
                    Err(_) => {
                        task.pause(pause).await;
                        pause = (pause * 2).min(LEASE_RETRY_MAX);
                    }
                }
            }
        });
    }

    /// Waits until Redis has answered every write this instance sent in
    /// the background to any of `keys`.
    pub(super) async fn answered(&self, keys: &[String]) {
        // A settlement waiting for Redis is sent again now.
        self.retry_now();
        loop {
            let mut notified = std::pin::pin!(self.answered.notified());
            notified.as_mut().enable();
            if !keys.iter().any(|k| self.unanswered.lock().contains_key(k)) {
                return;
            }
            notified.await;
        }
    }

    /// The keys of `parts` that a write this instance sent in the
    /// background has not been answered on yet (most often none, found
    /// without a key copied).
    pub(super) fn unanswered(&self, parts: &[&Part]) -> Vec<String> {
        let unanswered = self.unanswered.lock();
        if unanswered.is_empty() {
            return Vec::new();
        }
        parts
            .iter()
            .flat_map(|p| &p.call.keys)
            .filter(|k| unanswered.contains_key(*k))
            .cloned()
            .collect()
    }
}

/// A write sent in the background as a response ended (a place given
/// back, a settlement), counted under the keys it writes until dropped
/// (answered, or never sent).
pub(super) struct Unanswered {
    inner: Arc<Inner>,
    keys: Vec<String>,
}

impl Unanswered {
    pub(super) fn new(inner: &Arc<Inner>, keys: Vec<String>) -> Self {
        let mut unanswered = inner.unanswered.lock();
        for k in &keys {
            *unanswered.entry(k.clone()).or_default() += 1;
        }
        drop(unanswered);
        Unanswered {
            inner: Arc::clone(inner),
            keys,
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let mut unanswered = self.inner.unanswered.lock();
        for k in &self.keys {
            if let Some(n) = unanswered.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    unanswered.remove(k);
                }
            }
        }
        drop(unanswered);
        self.inner.answered.notify_waiters();
    }
}
