//! Where limit state lives, and the one call that decides a request.
//!
//! A [`Store`] takes every limit that applies to a request ([`Acquire`]) and
//! decides them together: either every limit has room and all are charged, or
//! the request is denied and none is charged. [`MemoryStore`] (the default)
//! keeps state in this process and answers at once, lock-free;
//! `RedisStore` (feature `redis`) shares state between instances and answers
//! after one round trip.
//!
//! # Writing a store
//!
//! A store answers [`Store::acquire`] with [`Acquired::Ready`] when it can
//! decide without waiting or [`Acquired::Pending`] with a future; one that
//! always can answers [`Store::decide_now`] too, writing the report in place
//! (no allocation, no boxing, no report moved: the memory store's hot path).
//! The store owns all limit state (throttle cells, quota counters and their
//! daily history, places under concurrency caps); plans and keys are
//! configuration it is handed with each call. The request's limits are
//! described by [`ThrottleRef`] and [`QuotaRef`]: their numbers, and a stable
//! identity (plan, limit id, subject) to name their state by. A store that
//! adds behaviour around another, here one that counts decisions, delegates:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use tollgate::store::{
//!     Acquire, Acquired, Denied, Permit, QuotaRef, Report, Settlement, Store, StoreFuture,
//!     ThrottleRef,
//! };
//! use tollgate::{Clock, Date, MemoryStore, Policy, RateLimitLayer, Throttle, UsagePlan};
//!
//! #[derive(Clone, Debug, Default)]
//! struct Counted {
//!     inner: MemoryStore,
//!     decisions: Arc<AtomicU64>,
//! }
//!
//! impl Store for Counted {
//!     type Future = <MemoryStore as Store>::Future;
//!
//!     fn clock(&self) -> &Clock {
//!         self.inner.clock()
//!     }
//!     fn acquire(&self, request: &Acquire<'_>) -> Acquired<Self::Future> {
//!         self.decisions.fetch_add(1, Ordering::Relaxed);
//!         self.inner.acquire(request)
//!     }
//!     fn usage(&self, q: &QuotaRef<'_>, first: Date, last: Date) -> StoreFuture<Vec<[i64; 2]>> {
//!         self.inner.usage(q, first, last)
//!     }
//!     fn set_remaining(&self, q: &QuotaRef<'_>, remaining: u64) -> StoreFuture<u64> {
//!         self.inner.set_remaining(q, remaining)
//!     }
//!     fn reset(&self, throttles: &[ThrottleRef<'_>], q: Option<&QuotaRef<'_>>) -> StoreFuture<()> {
//!         self.inner.reset(throttles, q)
//!     }
//!     // The methods with defaults must be passed on too: a wrapper that
//!     // dropped `release` would never give back a concurrency place, one
//!     // that dropped `decide_now` would answer through `acquire` (a report
//!     // moved instead of written in place).
//!     fn decide_now(&self, request: &Acquire<'_>, report: &mut Report) -> Option<Result<(), Denied>> {
//!         self.decisions.fetch_add(1, Ordering::Relaxed);
//!         self.inner.decide_now(request, report)
//!     }
//!     fn release(&self, permit: Permit) {
//!         self.inner.release(permit)
//!     }
//!     fn settle(&self, settlement: &Settlement<'_>) {
//!         self.inner.settle(settlement)
//!     }
//!     fn rescale(&self, old: &ThrottleRef<'_>, new: &ThrottleRef<'_>) {
//!         self.inner.rescale(old, new)
//!     }
//! }
//!
//! let store = Counted::default();
//! let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(1.0, 1)?))?;
//! let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
//! # let _ = layer;
//! # Ok::<(), tollgate::ConfigError>(())
//! ```
//!
//! A store of its own state decides each throttle by GCRA on its
//! [`interval`](ThrottleRef::interval) and [`burst`](ThrottleRef::burst),
//! counts each quota in the UTC window of its [`period`](QuotaRef::period),
//! charges each limit [`Acquire::cost_for`] its kind (requests, or the
//! request's estimated tokens for a token budget's limits), settles the
//! actual tokens of a request later in [`Store::settle`],
//! and reports how each limit stands with [`Applied`] (its [`LimitKind`]
//! says what it is), or why it denied with [`Denied`]. The rules across
//! limits are DESIGN's: a denial charges nothing, the denial that holds the
//! request longest is named, a cost above a limit's whole size is refused
//! with no retry, a peek (cost 0) charges nothing and is denied by a full
//! concurrency cap. It must never store an API key's value: the subject of a
//! registered key is its public id, and other subjects (client IPs, per-key
//! keys) should be hashed before they name anything.

mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub(crate) mod redis;

mod failures;
mod request;
mod verdict;

pub(crate) use self::failures::Failures;
pub use self::memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};
pub(crate) use self::request::Subject;
pub use self::request::{Acquire, ConcurrencyRef, Permit, QuotaRef, Settlement, ThrottleRef};
pub use self::verdict::{Applied, Denied, Report};
pub(crate) use self::verdict::{Denial, Overruns, Reservation, Sink};
pub use crate::plan::LimitKind;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// The most limits one request can be decided against: its throttles, its
/// quotas, its plan's and its model's concurrency caps.
pub(crate) const MAX_LIMITS: usize = MAX_THROTTLES + MAX_QUOTAS + 2;

/// The wait a request refused by a concurrency cap is told: in-flight
/// requests end at times no store knows.
pub(crate) const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// The most throttles (GCRA limits) of one request: stage, stage method,
/// account throttle, account tokens a minute, plan throttle, plan method,
/// tokens a minute, model throttle, model tokens a minute.
pub(crate) const MAX_THROTTLES: usize = 9;

/// The most quotas of an account: its request quota, tokens a day and a month.
pub(crate) const MAX_ACCOUNT_QUOTAS: usize = 3;

/// The most quotas of a model within a plan: its request quota, tokens a
/// day and a month.
pub(crate) const MAX_MODEL_QUOTAS: usize = 3;

/// The most calendar quotas of one request: the account's, the plan's and
/// the model's.
pub(crate) const MAX_QUOTAS: usize = 3 + MAX_ACCOUNT_QUOTAS + MAX_MODEL_QUOTAS;

/// A boxed future of an administrative store operation.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// A decision: how every limit stands after the request was charged, or why
/// it was denied.
pub type Verdict = Result<Report, Denied>;

/// Keeps limit state and decides requests against it.
///
/// One call, [`acquire`](Store::acquire), decides every limit of a request
/// atomically. The other methods serve [`Admin`](crate::Admin): usage
/// reports, UpdateUsage and resets. Clones share one state.
///
/// See the [module documentation](self) for how to write one.
pub trait Store: Clone + Send + Sync + 'static {
    /// The future of a decision that waits (a round trip to a remote store).
    type Future: Future<Output = Result<Verdict, StoreError>> + Send + 'static;

    /// The clock the store dates quota windows by (usage reports ask it what
    /// day it is).
    fn clock(&self) -> &crate::Clock;

    /// Decides `request`: charges every limit, or none and says why.
    fn acquire(&self, request: &Acquire<'_>) -> Acquired<Self::Future>;

    /// `[used, remaining]` of a quota for each UTC day from `first` to `last`
    /// (inclusive), as AWS GetUsage reports them; a day without use reports
    /// nothing used and what remained in its window.
    fn usage(
        &self,
        quota: &QuotaRef<'_>,
        first: crate::Date,
        last: crate::Date,
    ) -> StoreFuture<Vec<[i64; 2]>>;

    /// Sets what remains of a quota in the current window (AWS UpdateUsage)
    /// and returns it.
    fn set_remaining(&self, quota: &QuotaRef<'_>, remaining: u64) -> StoreFuture<u64>;

    /// Forgets the state of these throttles (full buckets again) and the
    /// quota's window and history.
    fn reset(&self, throttles: &[ThrottleRef<'_>], quota: Option<&QuotaRef<'_>>)
    -> StoreFuture<()>;

    /// Decides `request` at once, when the store can answer without
    /// waiting, writing how every limit stands into `report`: the memory
    /// store always can, and this is its hot path (no future, no report
    /// moved). `None`, the default, sends the request through
    /// [`acquire`](Store::acquire). A store that answers here must answer
    /// exactly as `acquire` would.
    #[inline]
    fn decide_now(&self, request: &Acquire<'_>, report: &mut Report) -> Option<Result<(), Denied>> {
        let _ = (request, report);
        None
    }

    /// [`decide_now`](Store::decide_now) for a request whose one limit is
    /// `throttle` (not a shadow; no quota, token budget or concurrency
    /// cap): the most common plan, decided without describing the request
    /// as an [`Acquire`]. `None`, the default, describes it and asks
    /// `decide_now`, then `acquire`. A store that answers here must answer
    /// exactly as `acquire` would for that one throttle.
    #[inline]
    fn decide_throttle_now(
        &self,
        throttle: &ThrottleRef<'_>,
        cost: u32,
        report: &mut Report,
    ) -> Option<Result<(), Denied>> {
        let _ = (throttle, cost, report);
        None
    }

    /// [`decide_throttle_now`](Store::decide_throttle_now) for a caller that
    /// reads no report (a request through a layer that sends no rate-limit
    /// headers): the store need not describe how the throttle stands.
    /// `None`, the default, sends the request through
    /// `decide_throttle_now`. A store that answers here must answer exactly
    /// as `decide_throttle_now` would.
    #[inline]
    fn decide_throttle_unreported(
        &self,
        throttle: &ThrottleRef<'_>,
        cost: u32,
    ) -> Option<Result<(), Denied>> {
        let _ = (throttle, cost);
        None
    }

    /// [`decide_now`](Store::decide_now) for a request whose limits are the
    /// throttle `first` (a plan's), `second` (the method override the
    /// request's route matches), if any, and `quota`, if any, none a shadow,
    /// and no token budget or concurrency cap: the common full plan, decided
    /// without describing the request as an [`Acquire`]. `None`, the
    /// default, describes it and asks `decide_now`, then `acquire`. A store
    /// that answers here must answer exactly as `acquire` would for those
    /// limits; it may answer only the requests they all allow, and `None`
    /// for the others.
    #[inline]
    fn decide_clear_now(
        &self,
        first: &ThrottleRef<'_>,
        second: Option<&ThrottleRef<'_>>,
        quota: Option<&QuotaRef<'_>>,
        cost: u32,
        report: &mut Report,
    ) -> Option<Result<(), Denied>> {
        let _ = (first, second, quota, cost, report);
        None
    }

    /// [`decide_clear_now`](Store::decide_clear_now) for a caller that
    /// reads no report (a request through a layer that sends no rate-limit
    /// headers): the store need not describe how the limits stand. The
    /// default asks `decide_clear_now` with a report nobody reads. A store
    /// that answers here must answer exactly as `decide_clear_now` would.
    #[inline]
    fn decide_clear_unreported(
        &self,
        first: &ThrottleRef<'_>,
        second: Option<&ThrottleRef<'_>>,
        quota: Option<&QuotaRef<'_>>,
        cost: u32,
    ) -> Option<Result<(), Denied>> {
        self.decide_clear_now(first, second, quota, cost, &mut Report::default())
    }

    /// Where this store keeps a key registry its instances share, if it
    /// does: a layer built on it loads the keys, plans and accounts kept
    /// there and follows their changes, and its
    /// [`Admin`](crate::Admin) writes each change there first. The default
    /// shares nothing (keys live in each process).
    fn shared_registry(&self) -> Option<crate::SharedRegistry> {
        None
    }

    /// Gives back a place under a concurrency cap (the request's response
    /// ended, failed or was dropped). Called once per permit, never waited
    /// for: a remote store sends it in the background. The default does
    /// nothing (a store without concurrency caps grants no permits).
    fn release(&self, permit: Permit) {
        let _ = permit;
    }

    /// Settles the actual cost of a request that reserved tokens: its token
    /// limits are charged [`Settlement::delta`] more tokens (an
    /// under-estimate, charged even past the limit, so that the next
    /// requests wait until the debt is repaid) or given that many back (an
    /// over-estimate: the per-minute bucket gets back only what of the
    /// estimate has not refilled since it was decided, a quota only in the
    /// window that counted it, so that nothing is admitted twice). Called
    /// once per request whose actual cost differs
    /// from its estimate, never waited for: a remote store sends it in the
    /// background. The default does nothing (the estimate stands).
    fn settle(&self, settlement: &Settlement<'_>) {
        let _ = settlement;
    }

    /// A quota's numbers (its limit, offset, creation or period) are about
    /// to change from `old`'s while serving (a plan or account replaced);
    /// called once for each registered key, `old` naming the key. A usage
    /// report keeps for each past day what remained at its end, under the
    /// numbers (and period) in force at its end, and reports the days from
    /// the change under the new numbers, each day of a change as the next
    /// request found it then: a store that writes a day's record only when
    /// a later day's first change closes it (the memory store) writes the
    /// record of the day of `old`'s last change now, if it is over, under
    /// `old`'s numbers, and keeps it when the next change closes that day
    /// again; the key's count is not moved, so no decision changes. One
    /// that writes each day's record as it changes, under the numbers of
    /// that moment (the Redis store), must keep `old`'s numbers and period
    /// and the day they stopped
    /// holding, to read the records under the numbers in force at each
    /// day's end: the Redis store logs them once per quota, not per key.
    /// Every store reads a day without a record in its window under the
    /// numbers in force at its end (the memory store logs them too), so
    /// that a record of nothing used (a charge a later limit denied, given
    /// back) reads as no record. By default nothing is done.
    fn requota(&self, old: &QuotaRef<'_>) {
        let _ = old;
    }

    /// A throttle's numbers changed from `old` to `new` while serving (a plan
    /// replaced). A store may convert the state it keeps so that the share of
    /// the bucket in use carries over; by default nothing is done. The memory
    /// store converts at once; the Redis store converts each key's state the
    /// next time it is used, replaying each change the key missed (the last
    /// 16 of them) as the memory store made it, so that both end at the
    /// same nanosecond.
    fn rescale(&self, old: &ThrottleRef<'_>, new: &ThrottleRef<'_>) {
        let _ = (old, new);
    }
}

/// A store's answer to [`Store::acquire`]: now, or after waiting.
// `Ready` is the memory store's hot path: boxing it would allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Acquired<F> {
    /// Decided without waiting.
    Ready(Result<Verdict, StoreError>),
    /// Decided when the future completes.
    Pending(F),
}

/// A store that could not decide (unreachable, timed out, a bad reply). The
/// plan's [`FailureMode`](crate::FailureMode) says what happens to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    message: String,
    timeout: bool,
    kind: FailureKind,
    /// Whether the store may fail in part (a Redis Cluster with a node
    /// down answers the other nodes' requests).
    in_part: bool,
    /// Whether the call certainly changed nothing in the store: it never
    /// reached it (the connection refused), or the store refused to run it.
    unrun: bool,
}

/// What kind of failure a [`StoreError`] is. Failures of different kinds
/// are different failures: each is logged when it starts and when it ends
/// (see `Failures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum FailureKind {
    /// The store, or a part of it, did not answer: unreachable, a lost
    /// connection, no answer in time, a cluster node down or not serving
    /// yet, more calls in flight than the store takes.
    Unreachable = 1,
    /// The store answered the call with an error of its own (out of memory,
    /// read-only, a script error).
    Refused = 2,
    /// Anything else: a reply that makes no sense, a wrong argument.
    Other = 3,
}

impl StoreError {
    /// An error with a message (never containing a key's value).
    pub fn new(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            timeout: false,
            kind: FailureKind::Other,
            in_part: false,
            unrun: false,
        }
    }

    /// The store did not answer in time.
    pub fn timeout(after: Duration) -> Self {
        StoreError {
            message: format!("no answer within {after:?}"),
            timeout: true,
            kind: FailureKind::Unreachable,
            in_part: false,
            unrun: false,
        }
    }

    /// Whether the store did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.timeout
    }

    /// The same error, of the kind `kind`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn with_kind(mut self, kind: FailureKind) -> Self {
        self.kind = kind;
        self
    }

    /// What kind of failure it is.
    pub(crate) fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The same error, from a store that may fail in part: a Redis Cluster,
    /// whose nodes that are up answer while one is down.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn in_part(mut self) -> Self {
        self.in_part = true;
        self
    }

    /// Whether the store that failed may fail in part.
    pub(crate) fn is_in_part(&self) -> bool {
        self.in_part
    }

    /// The same error, of a call the store did not answer in time (see
    /// [`StoreError::is_timeout`]).
    #[cfg(feature = "redis")]
    pub(crate) fn timed_out(mut self) -> Self {
        self.timeout = true;
        self
    }

    /// The same error, of a call that certainly changed nothing in the
    /// store (see [`StoreError::is_unrun`]).
    #[cfg(feature = "redis")]
    pub(crate) fn unrun(mut self) -> Self {
        self.unrun = true;
        self
    }

    /// Whether the call certainly changed nothing in the store: it never
    /// reached it, or the store refused it before running it. A call that
    /// timed out, or whose connection dropped after it was sent, may have
    /// run.
    #[cfg(feature = "redis")]
    pub(crate) fn is_unrun(&self) -> bool {
        self.unrun
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store unavailable: {}", self.message)
    }
}

impl std::error::Error for StoreError {}
