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
//! decide without waiting (no allocation, no boxing: the memory store's hot
//! path) or [`Acquired::Pending`] with a future. The request's limits are
//! described by [`ThrottleRef`] and [`QuotaRef`]: their numbers, and a stable
//! identity (plan, limit id, subject) to name their state by. A store that
//! adds behaviour around another, here one that counts decisions, delegates:
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use tollgate::store::{
//!     Acquire, Acquired, Permit, QuotaRef, Settlement, Store, StoreFuture, ThrottleRef,
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
//!     // dropped `release` would never give back a concurrency place.
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
//! and reports how each limit stands with [`Applied`], or why it denied with
//! [`Denied`]. It must never store an API key's value: the subject of a
//! registered key is its public id, and other subjects (client IPs, per-key
//! keys) should be hashed before they name anything.

mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
mod redis;

pub use self::memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::gcra::Nanos;
use crate::hash::Digest;
use crate::plan::{FailureMode, Limit, LimitKind};
use crate::quota::{QuotaCell, QuotaSpec};
use crate::window::Period;

/// The most limits one request can be decided against: stage, stage method,
/// plan throttle, plan method, tokens a minute, quota, tokens a day and a
/// month, concurrency.
pub(crate) const MAX_LIMITS: usize = 9;

/// The wait a request refused by a concurrency cap is told: in-flight
/// requests end at times no store knows.
pub(crate) const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// The most throttles (GCRA limits) of one request: stage, stage method,
/// plan throttle, plan method, tokens a minute.
pub(crate) const MAX_THROTTLES: usize = 5;

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

    /// A throttle's numbers changed from `old` to `new` while serving (a plan
    /// replaced). A store may convert the state it keeps so that the share of
    /// the bucket in use carries over; by default nothing is done. The memory
    /// store converts at once; the Redis store converts each key's state the
    /// next time it is used.
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
/// plan's [`FailureMode`] says what happens to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    message: String,
    timeout: bool,
}

impl StoreError {
    /// An error with a message (never containing a key's value).
    pub fn new(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            timeout: false,
        }
    }

    /// The store did not answer in time.
    pub fn timeout(after: Duration) -> Self {
        StoreError {
            message: format!("no answer within {after:?}"),
            timeout: true,
        }
    }

    /// Whether the store did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.timeout
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store unavailable: {}", self.message)
    }
}

impl std::error::Error for StoreError {}

/// How one limit stood after a decision, for the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// The policy item's name (`"throttle"`).
    pub(crate) name: &'static str,
    /// The limit's size (`q`): a throttle's burst, a quota's limit.
    pub(crate) quota: u64,
    /// The limit's window (`w`) in seconds.
    pub(crate) window_secs: u64,
    /// Units left (`r`).
    pub(crate) remaining: u64,
    /// Nanoseconds until the limit is back to full (`t`).
    pub(crate) reset: Nanos,
}

impl Applied {
    /// How a limit named `name` (`"throttle"`, `"quota"`…) of size `limit`
    /// over `window` stands: `remaining` units left, full again after `reset`.
    pub fn new(
        name: &'static str,
        limit: u64,
        window: Duration,
        remaining: u64,
        reset: Duration,
    ) -> Self {
        Applied {
            name,
            quota: limit,
            window_secs: window.as_secs(),
            remaining,
            reset: u64::try_from(reset.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// The limit's name in headers and rejections.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The limit's size: a throttle's burst, a quota's limit.
    pub fn limit(&self) -> u64 {
        self.quota
    }

    /// Units left.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Time until the limit is full again.
    pub fn reset(&self) -> Duration {
        Duration::from_nanos(self.reset)
    }
}

/// What every limit of a request looked like after the decision.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    items: [Applied; MAX_LIMITS],
    len: u8,
    permit: Option<Permit>,
    /// The store failed and the plan let the request through unchecked:
    /// nothing was charged, so nothing is settled.
    pub(crate) unchecked: bool,
    /// Where the request's estimated tokens were charged, for settling them.
    pub(crate) reserved: Reserved,
}

/// Where a request's estimated tokens were charged, so that settling an
/// over-estimate gives back only what the reservation still holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reserved {
    /// When the estimate's own share of the per-minute bucket refills: the
    /// decision's time plus `estimate * interval`, on the store's time line.
    /// Settling gives back no more than is still ahead of it: what has
    /// refilled since may have been granted to later requests. (The TAT the
    /// request stored cannot tell: other settlements move it.)
    pub(crate) until: Option<Nanos>,
    /// The wall time (nanoseconds since the Unix epoch, on the store's
    /// time line) the token quotas were charged at: a quota window that
    /// began after it gets nothing back.
    pub(crate) wall: Option<i64>,
}

impl Report {
    /// Records how a limit stands (beyond the most limits of one request, the
    /// rest are dropped).
    pub fn push(&mut self, item: Applied) {
        if let Some(slot) = self.items.get_mut(usize::from(self.len)) {
            *slot = item;
            self.len += 1;
        }
    }

    /// How each limit stands.
    pub fn items(&self) -> &[Applied] {
        &self.items[..usize::from(self.len)]
    }

    /// The report of a request let through unchecked by a failed store.
    pub(crate) fn unchecked() -> Self {
        Report {
            unchecked: true,
            ..Report::default()
        }
    }

    /// The place the request holds under its plan's concurrency cap, to be
    /// given back with [`Store::release`] when its response ends.
    pub fn permit(&self) -> Option<Permit> {
        self.permit
    }

    /// Records the place the request holds under a concurrency cap.
    pub fn set_permit(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }

    /// The limit closest to denying: fewest units left, then longest to
    /// reset. A concurrency cap is left out when there is a rate limit: the
    /// place this request holds comes back when its response ends, so its
    /// count says nothing about the pace a client should keep.
    pub(crate) fn tightest(&self) -> Option<&Applied> {
        let rates = || self.items().iter().filter(|a| a.name != CONCURRENCY);
        let pool: &mut dyn Iterator<Item = &Applied> = if rates().next().is_some() {
            &mut rates()
        } else {
            &mut self.items().iter()
        };
        pool.min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset.cmp(&a.reset)))
    }
}

/// Where a decision writes how each limit stands: a [`Report`] for response
/// headers, or `()` when nobody will read it (then nothing is computed).
pub(crate) trait Sink: Default {
    /// Records a limit; `item` runs only if the sink keeps it.
    fn push(&mut self, item: impl FnOnce() -> Applied);

    /// Whether the decision takes a place under a concurrency cap: only
    /// when the caller will give it back (a request through the layer).
    const HOLDS: bool;

    /// Records the place the request took under a concurrency cap.
    fn hold(&mut self, permit: Permit);

    /// Records where the request's tokens were charged.
    fn reserve(&mut self, f: impl FnOnce(&mut Reserved));
}

impl Sink for Report {
    const HOLDS: bool = true;

    #[inline]
    fn push(&mut self, item: impl FnOnce() -> Applied) {
        Report::push(self, item());
    }

    #[inline]
    fn hold(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }

    #[inline]
    fn reserve(&mut self, f: impl FnOnce(&mut Reserved)) {
        f(&mut self.reserved);
    }
}

impl Sink for () {
    const HOLDS: bool = false;

    #[inline]
    fn push(&mut self, _item: impl FnOnce() -> Applied) {}

    #[inline]
    fn hold(&mut self, _permit: Permit) {}

    #[inline]
    fn reserve(&mut self, _f: impl FnOnce(&mut Reserved)) {}
}

/// Why a store denied a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denial {
    /// A throttle has no room now; retry after the given nanoseconds.
    Limited { retry_after: Nanos },
    /// The quota of the current window is used up; it renews after the given nanoseconds.
    Quota { retry_after: Nanos },
    /// The request costs more than a limit can ever hold.
    TooCostly,
    /// The store cannot track another key right now.
    Capacity { retry_after: Nanos },
    /// The key has as many requests in flight as its plan allows.
    Concurrency,
}

/// A denied decision: why, and how the limit that denied stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub(crate) denial: Denial,
    pub(crate) limit: Applied,
}

fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Denied {
    /// A throttle had no room; the request passes after `retry_after`.
    pub fn throttled(limit: Applied, retry_after: Duration) -> Self {
        Denied {
            denial: Denial::Limited {
                retry_after: nanos(retry_after),
            },
            limit,
        }
    }

    /// The quota's window is used up; it renews after `retry_after`.
    pub fn quota(limit: Applied, retry_after: Duration) -> Self {
        Denied {
            denial: Denial::Quota {
                retry_after: nanos(retry_after),
            },
            limit,
        }
    }

    /// The request costs more than the limit can ever hold.
    pub fn too_costly(limit: Applied) -> Self {
        Denied {
            denial: Denial::TooCostly,
            limit,
        }
    }

    /// The store cannot track another key now; retry after `retry_after`.
    pub fn capacity(limit: Applied, retry_after: Duration) -> Self {
        Denied {
            denial: Denial::Capacity {
                retry_after: nanos(retry_after),
            },
            limit,
        }
    }

    /// The key has as many requests in flight as its plan allows.
    pub fn concurrency(limit: Applied) -> Self {
        Denied {
            denial: Denial::Concurrency,
            limit,
        }
    }

    /// How the limit that denied stands.
    pub fn limit(&self) -> &Applied {
        &self.limit
    }

    /// When the request would pass, if it ever will.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.denial {
            Denial::Limited { retry_after }
            | Denial::Quota { retry_after }
            | Denial::Capacity { retry_after } => Some(Duration::from_nanos(retry_after)),
            Denial::Concurrency => Some(CONCURRENCY_RETRY),
            Denial::TooCostly => None,
        }
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// The same denial as seen `elapsed` later (an over-limit cache answering
    /// for the store): the wait and the limit's reset shrink by `elapsed`.
    pub(crate) fn later(mut self, elapsed: Nanos) -> Self {
        match &mut self.denial {
            Denial::Limited { retry_after }
            | Denial::Quota { retry_after }
            | Denial::Capacity { retry_after } => {
                *retry_after = retry_after.saturating_sub(elapsed).max(1);
            }
            Denial::TooCostly | Denial::Concurrency => {}
        }
        self.limit.reset = self.limit.reset.saturating_sub(elapsed);
        self
    }

    /// Of two denials, the one that holds the request longest: a cost no
    /// limit can ever hold first (it never passes), then the longest wait,
    /// whatever kind of limit asks for it (a throttle needing 10 s holds a
    /// request longer than a quota window ending in 1 s). On a tie the
    /// earlier denial stands: limits are looked at in a fixed order (stage,
    /// plan, method, tokens a minute, quota, token quotas, concurrency), so
    /// every store names the same one.
    pub(crate) fn longest(a: Option<Denied>, b: Denied) -> Denied {
        match a {
            Some(a) if a.holds() >= b.holds() => a,
            _ => b,
        }
    }

    /// How long the denial holds its request; a cost no limit can ever hold
    /// holds it forever.
    fn holds(&self) -> Nanos {
        self.retry_after().map_or(Nanos::MAX, nanos)
    }
}

/// Everything a store needs to decide one request: its throttles, its quota
/// and its cost.
#[derive(Clone, Copy)]
pub struct Acquire<'a> {
    throttles: [Option<ThrottleRef<'a>>; MAX_THROTTLES],
    len: usize,
    pub(crate) quota: Option<QuotaRef<'a>>,
    /// The daily and monthly token budgets.
    pub(crate) token_quotas: [Option<QuotaRef<'a>>; 2],
    pub(crate) concurrency: Option<ConcurrencyRef<'a>>,
    pub(crate) cost: u32,
    pub(crate) tokens: u32,
    pub(crate) failure: FailureMode,
}

impl<'a> Acquire<'a> {
    pub(crate) fn new(cost: u32, failure: FailureMode) -> Self {
        Acquire {
            throttles: [None; MAX_THROTTLES],
            len: 0,
            quota: None,
            token_quotas: [None; 2],
            concurrency: None,
            cost,
            tokens: 0,
            failure,
        }
    }

    pub(crate) fn push(&mut self, throttle: ThrottleRef<'a>) {
        if let Some(slot) = self.throttles.get_mut(self.len) {
            *slot = Some(throttle);
            self.len += 1;
        }
    }

    /// The throttles (GCRA token buckets), shared stage limits first.
    pub fn throttles(&self) -> impl Iterator<Item = &ThrottleRef<'a>> + '_ {
        self.throttles[..self.len].iter().flatten()
    }

    /// The request's throttle when it is its only limit (no quota, token
    /// budget, concurrency cap or shadow): the common plan, which the memory
    /// store decides without gathering several limits.
    #[inline]
    pub(crate) fn lone_throttle(&self) -> Option<&ThrottleRef<'a>> {
        match &self.throttles[..self.len] {
            [Some(t)]
                if !t.shadow
                    && self.quota.is_none()
                    && self.concurrency.is_none()
                    && self.token_quotas.iter().all(Option::is_none) =>
            {
                Some(t)
            }
            _ => None,
        }
    }

    /// The quota, when the plan has one.
    pub fn quota(&self) -> Option<&QuotaRef<'a>> {
        self.quota.as_ref()
    }

    /// Every calendar quota: the request quota, then the daily and monthly
    /// token budgets (which [count tokens](QuotaRef::counts_tokens)).
    pub fn quotas(&self) -> impl Iterator<Item = &QuotaRef<'a>> + '_ {
        self.quota.iter().chain(self.token_quotas.iter().flatten())
    }

    /// The request's estimated cost in tokens, charged to the limits that
    /// count tokens (0 when its plan has no token budget).
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// What a limit is charged: the request's [`tokens`](Self::tokens) for
    /// a limit that counts tokens, else its [`cost`](Self::cost).
    #[inline]
    pub fn cost_for(&self, counts_tokens: bool) -> u32 {
        if counts_tokens {
            self.tokens
        } else {
            self.cost
        }
    }

    /// The plan's cap on requests of this key in flight, when it has one:
    /// an allowed request takes a place ([`Report::set_permit`]).
    pub fn concurrency(&self) -> Option<&ConcurrencyRef<'a>> {
        self.concurrency.as_ref()
    }

    /// The request's cost in units (0 peeks: nothing is charged).
    pub fn cost(&self) -> u32 {
        self.cost
    }

    /// What the layer does with the request when the store fails.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure
    }
}

impl fmt::Debug for Acquire<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("throttles", &self.throttles().collect::<Vec<_>>())
            .field("quotas", &self.quotas().collect::<Vec<_>>())
            .field("cost", &self.cost)
            .field("tokens", &self.tokens)
            .finish()
    }
}

/// One throttle of a request, and whose state it is counted under.
#[derive(Clone, Copy)]
pub struct ThrottleRef<'a> {
    pub(crate) limit: &'a Limit,
    pub(crate) plan: Option<&'a str>,
    pub(crate) subject: &'a [u8],
    /// Where the memory store keeps the state (a per-process keyed hash).
    pub(crate) digest: Digest,
    pub(crate) shadow: bool,
}

impl<'a> ThrottleRef<'a> {
    /// The limit's name in headers: `"throttle"`, `"method"`, `"stage"`,
    /// `"stage-method"` or `"tokens-minute"`.
    pub fn name(&self) -> &'static str {
        self.limit.kind.name()
    }

    /// Whether the throttle counts tokens (a token budget's per-minute
    /// bucket): it is charged [`Acquire::tokens`], not [`Acquire::cost`].
    #[inline]
    pub fn counts_tokens(&self) -> bool {
        self.limit.kind.counts_tokens()
    }

    /// A stable id of the limit within its plan (the same in every process,
    /// and kept when the limit's numbers change).
    pub fn id(&self) -> u64 {
        self.limit.salt
    }

    /// The plan whose limit this is; `None` for stage limits, which every
    /// caller shares.
    pub fn plan(&self) -> Option<&'a str> {
        self.plan
    }

    /// Whose state it is: a registered key's public id, the key a per-key
    /// policy extracted, or the client IP of an anonymous request; empty for
    /// stage limits. Hash it before it names anything.
    pub fn subject(&self) -> &'a [u8] {
        self.subject
    }

    /// Requests (units) per second.
    pub fn rate(&self) -> f64 {
        1e9 / self.limit.gcra.interval() as f64
    }

    /// The bucket size in units.
    pub fn burst(&self) -> u32 {
        self.limit.gcra.burst()
    }

    /// Time one unit takes to refill (the GCRA emission interval).
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.limit.gcra.interval())
    }

    /// Whether the limit only observes (a shadow plan's): it is charged when
    /// it has room and never denies.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }
}

impl fmt::Debug for ThrottleRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleRef")
            .field("name", &self.name())
            .field("plan", &self.plan)
            .field("rate", &self.rate())
            .field("burst", &self.burst())
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

/// The quota of a request, and whose count it is.
#[derive(Clone, Copy)]
pub struct QuotaRef<'a> {
    pub(crate) kind: LimitKind,
    pub(crate) spec: &'a QuotaSpec,
    pub(crate) plan: &'a str,
    pub(crate) subject: &'a [u8],
    /// The memory store's counters (the policy keeps them per (plan, key)).
    pub(crate) cell: Option<&'a QuotaCell>,
    pub(crate) shadow: bool,
    pub(crate) history_days: u32,
}

impl<'a> QuotaRef<'a> {
    /// The quota's name in headers: `"quota"`, `"tokens-day"` or `"tokens-month"`.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Whether the quota counts tokens (a token budget's daily or monthly
    /// quota): it is charged [`Acquire::tokens`], not [`Acquire::cost`].
    #[inline]
    pub fn counts_tokens(&self) -> bool {
        self.kind.counts_tokens()
    }

    /// Requests (units) per window.
    pub fn limit(&self) -> u64 {
        self.spec.limit
    }

    /// The window.
    pub fn period(&self) -> Period {
        self.spec.period
    }

    /// Units deducted from the limit in the window holding
    /// [`created_at`](Self::created_at) (AWS `offset`).
    pub fn offset(&self) -> u64 {
        self.spec.offset
    }

    /// When the plan was created, in nanoseconds since the Unix epoch (UTC).
    pub fn created_at(&self) -> i64 {
        self.spec.created_at
    }

    /// The plan.
    pub fn plan(&self) -> &'a str {
        self.plan
    }

    /// The registered key's public id.
    pub fn subject(&self) -> &'a [u8] {
        self.subject
    }

    /// Whether the quota only observes (counts past its limit, never denies).
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// Days of daily usage to keep for reports.
    pub fn history_days(&self) -> u32 {
        self.history_days
    }
}

impl fmt::Debug for QuotaRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaRef")
            .field("name", &self.name())
            .field("plan", &self.plan)
            .field("limit", &self.limit())
            .field("period", &self.period())
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

/// A plan's cap on requests of one key in flight.
#[derive(Clone, Copy)]
pub struct ConcurrencyRef<'a> {
    pub(crate) limit: u32,
    pub(crate) salt: u64,
    pub(crate) plan: &'a str,
    pub(crate) subject: &'a [u8],
    pub(crate) digest: Digest,
    pub(crate) shadow: bool,
}

impl<'a> ConcurrencyRef<'a> {
    /// Requests in flight allowed at once.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The plan.
    pub fn plan(&self) -> &'a str {
        self.plan
    }

    /// Whose requests they are (see [`ThrottleRef::subject`]).
    pub fn subject(&self) -> &'a [u8] {
        self.subject
    }

    /// Whether the cap only observes (a shadow plan's).
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// How the cap stands with `in_flight` requests (this one included when
    /// it was let in).
    pub fn applied(&self, in_flight: u64) -> Applied {
        Applied {
            name: CONCURRENCY,
            quota: u64::from(self.limit),
            window_secs: 0,
            remaining: u64::from(self.limit).saturating_sub(in_flight),
            reset: 0,
        }
    }
}

impl fmt::Debug for ConcurrencyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyRef")
            .field("plan", &self.plan)
            .field("limit", &self.limit)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

/// The name of a concurrency cap in headers and rejections.
pub(crate) const CONCURRENCY: &str = "concurrency";

/// A place a request holds under a concurrency cap, until its response ends.
/// What it holds is the store's business: two numbers that name the place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    pub(crate) place: u128,
    pub(crate) id: u64,
}

impl Permit {
    /// A permit for `place` (the store's name for the cap's state) and `id`
    /// (which of the requests in flight this is).
    pub fn new(place: u128, id: u64) -> Self {
        Permit { place, id }
    }

    /// The place.
    pub fn place(&self) -> u128 {
        self.place
    }

    /// The request's id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The actual cost of a request that reserved tokens, to be settled against
/// its token limits (see [`Store::settle`]).
#[derive(Clone, Copy)]
pub struct Settlement<'a> {
    pub(crate) throttle: Option<ThrottleRef<'a>>,
    pub(crate) quotas: [Option<QuotaRef<'a>>; 2],
    pub(crate) delta: i64,
    /// Where the reservation was charged: an over-estimate gives back
    /// nothing to a limit it did not charge.
    pub(crate) reserved: Reserved,
}

impl<'a> Settlement<'a> {
    /// The per-minute token bucket, when the plan has one.
    pub fn throttle(&self) -> Option<&ThrottleRef<'a>> {
        self.throttle.as_ref()
    }

    /// The daily and monthly token quotas the plan has.
    pub fn quotas(&self) -> impl Iterator<Item = &QuotaRef<'a>> + '_ {
        self.quotas.iter().flatten()
    }

    /// Tokens to charge (the request used more than it reserved) or, when
    /// negative, to give back (it used fewer).
    pub fn delta(&self) -> i64 {
        self.delta
    }
}

impl fmt::Debug for Settlement<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settlement")
            .field("throttle", &self.throttle)
            .field("quotas", &self.quotas().collect::<Vec<_>>())
            .field("delta", &self.delta)
            .finish()
    }
}
