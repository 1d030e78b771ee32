//! What a request past the bound on calls in flight is answered from: the
//! denials Redis gave lately, and the calls of the same request still in
//! flight.
//!
//! Past [`max_in_flight`](crate::RedisStoreBuilder::max_in_flight) a request
//! is not queued behind calls that may answer after the timeout; but it is
//! handed to its plan's failure mode only when Redis has not just told what
//! its limits say. Requests a concurrency cap or a token budget denies each
//! take a call of their own (they share none, see `flights`), so without
//! this a burst of them larger than the bound would push the ones past it
//! into `open` (admitted unchecked) or `local` (decided by a copy that holds
//! none of Redis's places).
//!
//! A request is known by its subject (its limits, their numbers and its
//! subject: see `decide::identity`) and what it costs them (its cost and
//! estimated tokens). A denial Redis gave a request of the same subject
//! denies it too when the limit that denied is one this request cannot pass
//! either: a full concurrency cap (whatever the cost), a throttle or a
//! quota with less left than this request costs it, or any limit when it
//! costs the same. So requests that differ only in what they cost (prompts
//! of their own, each estimated apart) are denied together. Past the bound:
//!
//! - if Redis denied a request of the same subject within the last
//!   [timeout](crate::RedisStoreBuilder::timeout), in a way that denies
//!   this one, it is denied again (the wait shrunk by the time since). A
//!   flood keeps its calls in flight landing, each renewing the denial, so
//!   it stays denied while Redis answers; once Redis stops answering, the
//!   denial is a timeout old at most before the failure mode decides. It
//!   errs toward admitting less: a place freed since, or a throttle
//!   refilled, is seen only by the next request that finds the store below
//!   its bound;
//! - else, if calls of the same subject are in flight and no call has
//!   failed since the last answer, it waits for those calls (never past the
//!   timeout, and for no call sent after it came) and is denied if one of
//!   them is, in a way that denies this one;
//! - else its failure mode decides, at once.
//!
//! Nothing here ever admits a request, so exactness is Redis's as before,
//! and no place under a cap is taken (none to give back). A request below
//! the bound is decided by Redis as before; it only counts its call here
//! while it is in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use super::store::Inner;
use crate::gcra::Nanos;
use crate::hash::BuildDigestHasher;
use crate::store::{Denial, Denied};
use crate::sync::Mutex;

/// Shards of the table, so that subjects on several threads rarely contend.
const SHARDS: usize = 16;

/// Entries a shard holds before it is swept of those that no longer say
/// anything (the bound doubles with what a sweep keeps).
const SWEEP_AT: usize = 64;

/// A request as the table knows it: its subject, and what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Asked {
    /// Its limits, their numbers and its subject (`decide::identity`).
    pub(super) subject: u64,
    /// Its cost in requests, and its estimated tokens.
    pub(super) cost: u32,
    pub(super) tokens: u32,
}

impl Asked {
    /// Whether `denied`, Redis's denial of `other` (a request of the same
    /// subject), denies this request too: the same request, a full cap, or
    /// a throttle or quota with less left than this one costs it.
    fn denied_by(&self, other: &Asked, denied: &Denied) -> bool {
        if (self.cost, self.tokens) == (other.cost, other.tokens) {
            return true;
        }
        match denied.denial {
            Denial::Concurrency => true,
            Denial::Limited { .. } | Denial::Quota { .. } => {
                let need = if denied.limit.kind.counts_tokens() {
                    self.tokens
                } else {
                    self.cost
                };
                u64::from(need) > denied.limit.remaining
            }
            Denial::TooCostly | Denial::Capacity { .. } => false,
        }
    }
}

/// One subject's calls in flight and latest denial.
#[derive(Debug, Default)]
struct Entry {
    /// Calls in flight.
    pending: u32,
    /// Calls that ended so far (landed or dropped).
    ended: u64,
    /// Redis's latest denial: when the request was sent, until when it is
    /// taken for Redis's answer, the request and the denial.
    denied: Option<(Nanos, Nanos, Asked, Denied)>,
    /// Woken when a call ends, made by the first request that waits.
    ended_signal: Option<Arc<Notify>>,
}

impl Entry {
    /// Redis's latest denial, if it is recent and denies `asked` too.
    fn fresh(&self, now: Nanos, asked: &Asked) -> Option<Denied> {
        let (at, until, other, denied) = self.denied?;
        (now < until && asked.denied_by(&other, &denied))
            .then(|| denied.later(now.saturating_sub(at)))
    }

    /// Whether it says nothing any more.
    fn idle(&self, now: Nanos) -> bool {
        self.pending == 0 && self.denied.is_none_or(|(_, until, ..)| now >= until)
    }
}

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<u64, Entry, BuildDigestHasher>,
    sweep_at: usize,
}

impl Shard {
    /// `id`'s entry, made if need be; a shard grown past its bound is
    /// first swept of the entries that say nothing any more.
    fn entry(&mut self, id: u64, now: Nanos) -> &mut Entry {
        if self.entries.len() >= self.sweep_at.max(SWEEP_AT) && !self.entries.contains_key(&id) {
            self.entries.retain(|_, e| !e.idle(now));
            self.sweep_at = 2 * self.entries.len();
        }
        self.entries.entry(id).or_default()
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ended {
    /// Redis answered: denied, or not.
    Answered(Option<Denied>),
    /// Redis did not answer (a timeout, a lost connection).
    Failed,
    /// Its request went away before it landed: nothing learnt.
    Dropped,
}

/// What a request past the bound gets.
#[derive(Debug)]
pub(super) enum PastBound {
    /// Redis denied it (or a request of its subject, in a way that
    /// denies it too) lately.
    Denied(Denied),
    /// Calls of the same subject are in flight: wait for them.
    Wait(Wait),
    /// Nothing known: the failure mode decides.
    Fail,
}

/// Waiting for the calls of one subject in flight when a request came.
#[derive(Debug)]
pub(super) struct Wait {
    asked: Asked,
    /// The count of ended calls at which they have all ended.
    until_ended: u64,
    signal: Arc<Notify>,
}

/// The table of subjects with calls in flight or a recent denial.
#[derive(Debug)]
pub(super) struct RecentDenials {
    shards: Box<[Mutex<Shard>]>,
    /// How long a denial is taken for Redis's answer: the store's timeout.
    hold: Nanos,
    /// Whether the latest call to end failed: Redis is not answering, and a
    /// request past the bound does not wait for calls in flight.
    failing: AtomicBool,
}

impl RecentDenials {
    pub(super) fn new(hold: Nanos) -> Self {
        RecentDenials {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hold,
            failing: AtomicBool::new(false),
        }
    }

    fn shard(&self, id: u64) -> &Mutex<Shard> {
        &self.shards[(id >> 58) as usize % SHARDS]
    }

    /// A call of `asked` is sent.
    fn sent(&self, asked: &Asked, now: Nanos) {
        let id = asked.subject;
        self.shard(id).lock().entry(id, now).pending += 1;
    }

    /// A call of `asked`, sent at `sent`, ended at `now`.
    fn ended(&self, asked: &Asked, sent: Nanos, now: Nanos, how: Ended) {
        let id = asked.subject;
        match how {
            Ended::Answered(_) => self.failing.store(false, Ordering::Release),
            Ended::Failed => self.failing.store(true, Ordering::Release),
            Ended::Dropped => {}
        }
        let mut shard = self.shard(id).lock();
        let Some(e) = shard.entries.get_mut(&id) else {
            return;
        };
        e.pending = e.pending.saturating_sub(1);
        e.ended += 1;
        if let Ended::Answered(Some(denied)) = how {
            e.denied = Some((sent, now.saturating_add(self.hold), *asked, denied));
        }
        if let Some(signal) = &e.ended_signal {
            signal.notify_waiters();
        }
        if e.idle(now) {
            shard.entries.remove(&id);
        }
    }

    /// Remembers that Redis denied `asked`, sent at `sent`, at `now` (a
    /// call shared by several requests, counted in flight by `flights`).
    pub(super) fn denied(&self, asked: &Asked, sent: Nanos, now: Nanos, denied: Denied) {
        self.answered();
        let id = asked.subject;
        self.shard(id).lock().entry(id, now).denied =
            Some((sent, now.saturating_add(self.hold), *asked, denied));
    }

    /// Redis answered a call counted elsewhere (a shared one).
    pub(super) fn answered(&self) {
        self.failing.store(false, Ordering::Release);
    }

    /// A call counted elsewhere (a shared one) got no answer.
    pub(super) fn failed(&self) {
        self.failing.store(true, Ordering::Release);
    }

    /// Redis's recent denial of a request of `asked`'s subject, if it
    /// denies `asked` too (see the module documentation).
    pub(super) fn fresh(&self, asked: &Asked, now: Nanos) -> Option<Denied> {
        let id = asked.subject;
        self.shard(id).lock().entries.get(&id)?.fresh(now, asked)
    }

    /// What a request `asked` past the bound gets at `now`.
    pub(super) fn past_bound(&self, asked: &Asked, now: Nanos) -> PastBound {
        let id = asked.subject;
        let mut shard = self.shard(id).lock();
        let Some(e) = shard.entries.get_mut(&id) else {
            return PastBound::Fail;
        };
        if let Some(denied) = e.fresh(now, asked) {
            return PastBound::Denied(denied);
        }
        if e.pending == 0 || self.failing.load(Ordering::Acquire) {
            return PastBound::Fail;
        }
        let signal = Arc::clone(e.ended_signal.get_or_insert_default());
        PastBound::Wait(Wait {
            asked: *asked,
            until_ended: e.ended + u64::from(e.pending),
            signal,
        })
    }

    /// Waits until the calls `wait` is for have ended; a denial one of them
    /// (or any call of the same subject) brings back that denies its
    /// request too, if any. The caller bounds it by the timeout.
    pub(super) async fn after(&self, wait: Wait, now: impl Fn() -> Nanos) -> Option<Denied> {
        loop {
            let signal = wait.signal.notified();
            let mut signal = std::pin::pin!(signal);
            // Registered before the entry is read: a call ending in between
            // still wakes this one.
            signal.as_mut().enable();
            {
                let shard = self.shard(wait.asked.subject).lock();
                let e = shard.entries.get(&wait.asked.subject)?;
                if let Some(denied) = e.fresh(now(), &wait.asked) {
                    return Some(denied);
                }
                if e.ended >= wait.until_ended || self.failing.load(Ordering::Acquire) {
                    return None;
                }
            }
            signal.await;
        }
    }
}

/// A call of one request in flight, counted under its subject until it
/// ends; one dropped before it lands (its request went away) ends as
/// [`Ended::Dropped`].
pub(super) struct InFlight {
    inner: Arc<Inner>,
    asked: Asked,
    sent: Nanos,
    ended: bool,
}

impl InFlight {
    pub(super) fn new(inner: &Arc<Inner>, asked: Asked) -> Self {
        let sent = inner.clock.nanos();
        inner.denials.sent(&asked, sent);
        InFlight {
            inner: Arc::clone(inner),
            asked,
            sent,
            ended: false,
        }
    }

    /// The call ended as `how`.
    pub(super) fn end(mut self, how: Ended) {
        self.ended = true;
        let now = self.inner.clock.nanos();
        self.inner.denials.ended(&self.asked, self.sent, now, how);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.ended {
            let now = self.inner.clock.nanos();
            self.inner
                .denials
                .ended(&self.asked, self.sent, now, Ended::Dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Applied;

    fn full() -> Denied {
        Denied::concurrency(Applied::default())
    }

    /// A request of `subject` costing 1.
    fn ask(subject: u64) -> Asked {
        Asked {
            subject,
            cost: 1,
            tokens: 0,
        }
    }

    const HOLD: Nanos = 100;

    #[test]
    fn a_recent_denial_answers_until_it_is_a_timeout_old() {
        let d = RecentDenials::new(HOLD);
        assert!(matches!(d.past_bound(&ask(7), 0), PastBound::Fail));
        d.sent(&ask(7), 0);
        d.ended(&ask(7), 0, 10, Ended::Answered(Some(full())));
        assert!(matches!(d.past_bound(&ask(7), 109), PastBound::Denied(_)));
        assert!(matches!(d.past_bound(&ask(7), 110), PastBound::Fail));
        assert!(d.fresh(&ask(7), 50).is_some());
        assert!(d.fresh(&ask(8), 50).is_none());
    }

    #[test]
    fn an_allowed_call_leaves_nothing_behind() {
        let d = RecentDenials::new(HOLD);
        d.sent(&ask(7), 0);
        d.ended(&ask(7), 0, 10, Ended::Answered(None));
        assert!(d.shards.iter().all(|s| s.lock().entries.is_empty()));
        d.sent(&ask(8), 0);
        d.ended(&ask(8), 0, 10, Ended::Dropped);
        assert!(d.shards.iter().all(|s| s.lock().entries.is_empty()));
    }

    #[tokio::test]
    async fn a_request_past_the_bound_waits_for_the_calls_in_flight_when_it_came() {
        let d = Arc::new(RecentDenials::new(HOLD));
        d.sent(&ask(7), 0);
        d.sent(&ask(7), 0);
        let PastBound::Wait(wait) = d.past_bound(&ask(7), 1) else {
            panic!("two calls in flight")
        };
        // A call sent after it came is not waited for.
        d.sent(&ask(7), 2);
        let waiter = tokio::spawn({
            let d = Arc::clone(&d);
            async move { d.after(wait, || 20).await }
        });
        d.ended(&ask(7), 0, 10, Ended::Answered(None));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        d.ended(&ask(7), 2, 11, Ended::Answered(None));
        let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(waited.is_none(), "nothing denied: the failure mode decides");
    }

    #[tokio::test]
    async fn a_denial_landing_answers_the_requests_waiting() {
        let d = Arc::new(RecentDenials::new(HOLD));
        d.sent(&ask(7), 0);
        let PastBound::Wait(wait) = d.past_bound(&ask(7), 1) else {
            panic!("a call in flight")
        };
        let waiter = tokio::spawn({
            let d = Arc::clone(&d);
            async move { d.after(wait, || 20).await }
        });
        tokio::task::yield_now().await;
        d.ended(&ask(7), 0, 10, Ended::Answered(Some(full())));
        assert!(waiter.await.unwrap().is_some());
    }

    #[test]
    fn once_a_call_failed_nothing_waits() {
        let d = RecentDenials::new(HOLD);
        d.sent(&ask(7), 0);
        d.sent(&ask(8), 0);
        d.ended(&ask(8), 0, 10, Ended::Failed);
        assert!(matches!(d.past_bound(&ask(7), 11), PastBound::Fail));
        d.ended(&ask(7), 0, 12, Ended::Answered(None));
        d.sent(&ask(7), 13);
        assert!(matches!(d.past_bound(&ask(7), 14), PastBound::Wait(_)));
    }

    #[test]
    fn a_denial_answers_the_requests_of_its_subject_it_denies_too() {
        let d = RecentDenials::new(HOLD);
        let asked = |cost, tokens| Asked {
            subject: 7,
            cost,
            tokens,
        };
        // A token budget with 3 tokens left denied an estimate of 5.
        let budget = Denied::throttled(
            Applied {
                kind: crate::store::LimitKind::TokensMinute,
                remaining: 3,
                ..Applied::default()
            },
            Duration::from_secs(1),
        );
        d.sent(&asked(1, 5), 0);
        d.ended(&asked(1, 5), 0, 10, Ended::Answered(Some(budget)));
        assert!(d.fresh(&asked(1, 4), 20).is_some(), "4 tokens do not fit");
        assert!(d.fresh(&asked(1, 3), 20).is_none(), "3 tokens fit");
        assert!(d.fresh(&asked(2, 3), 20).is_none());
        assert!(
            d.fresh(
                &Asked {
                    subject: 8,
                    ..asked(1, 5)
                },
                20
            )
            .is_none(),
            "another subject"
        );
        // A full cap denies whatever a request costs, a peek too.
        d.sent(&asked(1, 5), 30);
        d.ended(&asked(1, 5), 30, 40, Ended::Answered(Some(full())));
        assert!(matches!(
            d.past_bound(&asked(0, 1), 50),
            PastBound::Denied(_)
        ));
        assert!(matches!(
            d.past_bound(&asked(9, 900), 50),
            PastBound::Denied(_)
        ));
    }
}
