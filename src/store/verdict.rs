//! What a decision answers: how each limit stands ([`Applied`], [`Report`]),
//! why a request was denied ([`Denied`]), and the rules across limits that
//! every store answers by (the denial that holds the request longest is
//! named; a cost no limit can ever hold is refused with no retry).

use std::time::Duration;

use arrayvec::ArrayVec;

use super::{CONCURRENCY_RETRY, MAX_LIMITS, Permit};
use crate::gcra::Nanos;
use crate::plan::{Limit, LimitKind};
use crate::quota::QuotaSnapshot;

/// How one limit stood after a decision, for the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// What kind of limit it is (its name in headers: `"throttle"`).
    pub(crate) kind: LimitKind,
    /// The limit's size (`q`): a throttle's burst, a quota's limit.
    pub(crate) quota: u64,
    /// The limit's window (`w`) in seconds.
    pub(crate) window_secs: u64,
    /// Units left (`r`).
    pub(crate) remaining: u64,
    /// Nanoseconds until the limit is back to full (`t`).
    pub(crate) reset: Nanos,
}

impl Default for Applied {
    /// An unused report slot.
    fn default() -> Self {
        Applied {
            kind: LimitKind::Throttle,
            quota: 0,
            window_secs: 0,
            remaining: 0,
            reset: 0,
        }
    }
}

impl Applied {
    /// How a limit of `kind` (a throttle, a quota…) of size `limit`
    /// over `window` stands: `remaining` units left, full again after `reset`.
    pub fn new(
        kind: LimitKind,
        limit: u64,
        window: Duration,
        remaining: u64,
        reset: Duration,
    ) -> Self {
        Applied {
            kind,
            quota: limit,
            window_secs: window.as_secs(),
            remaining,
            reset: u64::try_from(reset.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// The limit's name in headers and rejections.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// What kind of limit it is.
    pub fn kind(&self) -> LimitKind {
        self.kind
    }

    /// The limit's size: a throttle's burst, a quota's limit.
    pub fn limit(&self) -> u64 {
        self.quota
    }

    /// The limit's window: how long a throttle takes to refill whole, a
    /// quota's period; zero for a cap on requests in flight.
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_secs)
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
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Made for every request: room for every limit a request can have,
    /// left unwritten until used (zeroing some 800 bytes per request cost
    /// as much as a decision).
    items: ArrayVec<Applied, MAX_LIMITS>,
    /// The places the request holds: under its plan's cap, its model's.
    permits: [Option<Permit>; 2],
    /// The store failed and the plan let the request through unchecked:
    /// nothing was charged, so nothing is settled.
    pub(crate) unchecked: bool,
    /// Where the request's estimated tokens were charged, for settling them.
    pub(crate) reserved: Reservation,
    /// What the request's shadow limits would have denied, weighed as the
    /// limits that deny are: a shadow plan lets the request through, and
    /// the observer is told it went over.
    pub(crate) shadow: Tally,
}

/// Where a request's estimated tokens were charged, so that settling an
/// over-estimate gives back only what the reservation still holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// When the estimate's own share of the per-minute bucket refills: the
    /// decision's time plus `estimate * interval`, on the store's time line.
    /// Settling gives back no more than is still ahead of it: what has
    /// refilled since may have been granted to later requests. (The TAT the
    /// request stored cannot tell: other settlements move it.)
    pub(crate) until: Option<Nanos>,
    /// The same for the account's per-minute token bucket, when the key
    /// belongs to an account with one.
    pub(crate) account_until: Option<Nanos>,
    /// The same for the model's per-minute token bucket, when the request's
    /// model has one within its plan.
    pub(crate) model_until: Option<Nanos>,
    /// The wall time (nanoseconds since the Unix epoch, on the store's
    /// time line) the token quotas were charged at: a quota window that
    /// began after it gets nothing back.
    pub(crate) wall: Option<i64>,
    /// Whether a remote store's local copy decided the request (the store
    /// could not, under a [`Local`](crate::FailureMode::Local) failure
    /// mode): the estimate was charged to the copy alone, so an
    /// over-estimate goes back to the copy alone.
    #[cfg(feature = "redis")]
    pub(crate) local: bool,
}

impl Report {
    /// Records how a limit stands (beyond the most limits of one request, the
    /// rest are dropped).
    #[inline]
    pub fn push(&mut self, item: Applied) {
        let _ = self.items.try_push(item);
    }

    /// How each limit stands.
    #[inline]
    pub fn items(&self) -> &[Applied] {
        &self.items
    }

    /// Records a shadow limit over which the request went (`cap`: a
    /// concurrency cap), which would have denied it were it not a shadow.
    #[cold]
    pub(crate) fn overran(&mut self, cap: bool, d: Denied) {
        match cap {
            true => self.shadow.deny_cap(d),
            false => self.shadow.deny(d),
        }
    }

    /// What the request's shadow limits would have denied, when it went over
    /// one: the denial that would stand, were the plan not a shadow.
    pub(crate) fn shadow_denied(&self) -> Option<Denied> {
        self.shadow.verdict()
    }

    /// The report of a request let through unchecked by a failed store.
    pub(crate) fn unchecked() -> Self {
        Report {
            unchecked: true,
            ..Report::default()
        }
    }

    /// The first place the request holds under a concurrency cap (see
    /// [`permits`](Self::permits)).
    pub fn permit(&self) -> Option<Permit> {
        self.permits[0]
    }

    /// The places the request holds under concurrency caps (its plan's, its
    /// model's), each given back with [`Store::release`](super::Store::release)
    /// when its response ends.
    pub fn permits(&self) -> impl Iterator<Item = Permit> + '_ {
        self.permits.iter().flatten().copied()
    }

    /// Records a place the request holds under a concurrency cap (at most
    /// two: the plan's and the model's; a third is dropped).
    pub fn set_permit(&mut self, permit: Permit) {
        if let Some(slot) = self.permits.iter_mut().find(|p| p.is_none()) {
            *slot = Some(permit);
        }
    }

    /// The limit closest to denying: fewest units left, then longest to
    /// reset. A concurrency cap is left out when there is a rate limit: the
    /// place this request holds comes back when its response ends, so its
    /// count says nothing about the pace a client should keep.
    pub(crate) fn tightest(&self) -> Option<&Applied> {
        // A single limit is the tightest, whatever its kind.
        if let [only] = self.items() {
            return Some(only);
        }
        let rates = || self.items().iter().filter(|a| !a.kind.is_concurrency());
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
    fn reserve(&mut self, f: impl FnOnce(&mut Reservation));

    /// Records a shadow limit over which the request went (`cap`: a
    /// concurrency cap), which would have denied it were it not a shadow.
    fn overrun(&mut self, cap: bool, d: impl FnOnce() -> Denied);

    /// What the sink holds now, to [`rewind`](Self::rewind) to.
    type Mark: Copy;

    /// What the sink holds now.
    fn mark(&self) -> Self::Mark;

    /// Forgets what was recorded since `mark` (a decision given up to be
    /// made again another way).
    fn rewind(&mut self, mark: Self::Mark);
}

impl Sink for Report {
    const HOLDS: bool = true;

    #[inline]
    fn push(&mut self, item: impl FnOnce() -> Applied) {
        Report::push(self, item());
    }

    #[inline]
    fn hold(&mut self, permit: Permit) {
        self.set_permit(permit);
    }

    #[inline]
    fn reserve(&mut self, f: impl FnOnce(&mut Reservation)) {
        f(&mut self.reserved);
    }

    #[inline]
    fn overrun(&mut self, cap: bool, d: impl FnOnce() -> Denied) {
        self.overran(cap, d());
    }

    type Mark = (u8, Reservation);

    #[inline]
    fn mark(&self) -> Self::Mark {
        (self.items.len() as u8, self.reserved)
    }

    #[inline]
    fn rewind(&mut self, (len, reserved): Self::Mark) {
        self.items.truncate(usize::from(len));
        self.reserved = reserved;
    }
}

/// The sink of a decision without a request whose observer is told of
/// shadow limits gone over ([`RateLimitLayer::check`](crate::RateLimitLayer::check)
/// under a shadow plan): it takes no place, as `()` does, and keeps only
/// what a shadow limit would have denied.
#[derive(Debug, Default)]
pub(crate) struct Overruns(pub(crate) Tally);

impl Sink for Overruns {
    const HOLDS: bool = false;

    #[inline]
    fn push(&mut self, _item: impl FnOnce() -> Applied) {}

    #[inline]
    fn hold(&mut self, _permit: Permit) {}

    #[inline]
    fn reserve(&mut self, _f: impl FnOnce(&mut Reservation)) {}

    #[inline]
    fn overrun(&mut self, cap: bool, d: impl FnOnce() -> Denied) {
        match cap {
            true => self.0.deny_cap(d()),
            false => self.0.deny(d()),
        }
    }

    type Mark = Tally;

    #[inline]
    fn mark(&self) -> Tally {
        self.0
    }

    #[inline]
    fn rewind(&mut self, mark: Tally) {
        self.0 = mark;
    }
}

impl Sink for () {
    const HOLDS: bool = false;

    #[inline]
    fn push(&mut self, _item: impl FnOnce() -> Applied) {}

    #[inline]
    fn hold(&mut self, _permit: Permit) {}

    #[inline]
    fn reserve(&mut self, _f: impl FnOnce(&mut Reservation)) {}

    #[inline]
    fn overrun(&mut self, _cap: bool, _d: impl FnOnce() -> Denied) {}

    type Mark = ();

    #[inline]
    fn mark(&self) {}

    #[inline]
    fn rewind(&mut self, _mark: ()) {}
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

/// The rules across limits, applied as each limit of a request answers, in
/// the order every store weighs them (stage, plan, method, tokens a minute,
/// quota, token quotas; the concurrency cap last): a limit that is not a
/// shadow and denies makes the request denied, so that nothing is charged;
/// of several denials, the one that holds the request longest is named
/// ([`Denied::longest`]).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    denied: Option<Denied>,
    /// The cap's denial, weighed after every other limit's.
    cap: Option<Denied>,
}

impl Tally {
    /// A limit denies.
    #[inline]
    pub(crate) fn deny(&mut self, d: Denied) {
        self.denied = Some(Denied::longest(self.denied, d));
    }

    /// A concurrency cap denies (the first of a request's caps to deny is
    /// the one named).
    #[inline]
    pub(crate) fn deny_cap(&mut self, d: Denied) {
        if self.cap.is_none() {
            self.cap = Some(d);
        }
    }

    /// Whether a limit has denied: the rest are then only looked at.
    #[inline]
    pub(crate) fn is_denied(&self) -> bool {
        self.denied.is_some() || self.cap.is_some()
    }

    /// The denial that stands, if any.
    #[inline]
    pub(crate) fn verdict(self) -> Option<Denied> {
        match self.cap {
            Some(cap) => Some(Denied::longest(self.denied, cap)),
            None => self.denied,
        }
    }
}

/// Whether a cost can ever fit a limit whose whole size is `whole`. One that
/// cannot is refused with no retry ([`Denied::too_costly`]), whatever the
/// limit: a throttle's burst, a quota's limit in any window, a token budget.
/// A quota asks only of a cost that does not fit what remains now: what
/// UpdateUsage raised past the limit holds a larger one, in its window.
#[inline]
pub(crate) fn ever_fits(cost: u64, whole: u64) -> bool {
    cost <= whole
}

/// Whether a concurrency cap of `limit` with `in_flight` requests has room
/// for one more (a shadow cap always has). A peek on a cap without room is
/// denied too, and takes no place either way.
#[inline]
pub(crate) fn cap_has_room(in_flight: u64, limit: u32, shadow: bool) -> bool {
    in_flight < u64::from(limit) || shadow
}

/// How a quota of `kind` stands, as a report item.
pub(crate) fn quota_applied(kind: LimitKind, q: &QuotaSnapshot) -> Applied {
    Applied {
        kind,
        quota: u64::try_from(q.limit).unwrap_or(0),
        window_secs: q.window_secs,
        remaining: q.remaining,
        reset: q.reset,
    }
}

/// How `limit` stands with TAT `tat` at `now`.
#[inline]
pub(crate) fn applied(limit: &Limit, tat: Nanos, now: Nanos) -> Applied {
    let s = limit.gcra.status(tat, now);
    let (remaining, reset) = (s.remaining, s.reset);
    Applied {
        kind: limit.kind,
        quota: u64::from(limit.gcra.burst()),
        window_secs: limit.window_secs,
        remaining: u64::from(remaining),
        reset,
    }
}
