//! Where limit state lives, and the one call that decides a request.
//!
//! A store takes every limit that applies to a request and decides them
//! together: either every limit has room and all are charged, or the request is
//! denied and none is charged. [`MemoryStore`] (the default) keeps state in this
//! process, lock-free; a shared store for several instances arrives with the
//! Redis store.

mod memory;

pub use self::memory::{MemoryStore, MemoryStoreBuilder};

use crate::gcra::Nanos;

/// The most limits one request can be decided against: stage, stage method,
/// plan throttle, plan method, quota, and room for token budgets.
pub(crate) const MAX_LIMITS: usize = 6;

/// The most throttles (GCRA limits) of one request.
pub(crate) const MAX_THROTTLES: usize = 4;

/// How one limit stood after a decision, for the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Applied {
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

/// What every limit of a request looked like after the decision.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Report {
    items: [Applied; MAX_LIMITS],
    len: u8,
}

impl Report {
    pub(crate) fn push(&mut self, item: Applied) {
        if let Some(slot) = self.items.get_mut(usize::from(self.len)) {
            *slot = item;
            self.len += 1;
        }
    }

    pub(crate) fn items(&self) -> &[Applied] {
        &self.items[..usize::from(self.len)]
    }

    /// The limit closest to denying: fewest units left, then longest to reset.
    pub(crate) fn tightest(&self) -> Option<&Applied> {
        self.items()
            .iter()
            .min_by(|a, b| a.remaining.cmp(&b.remaining).then(b.reset.cmp(&a.reset)))
    }
}

/// Where a decision writes how each limit stands: a [`Report`] for response
/// headers, or `()` when nobody will read it (then nothing is computed).
pub(crate) trait Sink: Default {
    /// Records a limit; `item` runs only if the sink keeps it.
    fn push(&mut self, item: impl FnOnce() -> Applied);
}

impl Sink for Report {
    #[inline]
    fn push(&mut self, item: impl FnOnce() -> Applied) {
        Report::push(self, item());
    }
}

impl Sink for () {
    #[inline]
    fn push(&mut self, _item: impl FnOnce() -> Applied) {}
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
}

/// A denied decision: why, and how the limit that denied stands.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Denied {
    pub(crate) denial: Denial,
    pub(crate) limit: Applied,
}

/// One throttle of a request: the limit, the key its state is counted
/// under, and whether it only observes (a shadow plan's limit).
type ThrottleItem<'a> = (&'a crate::plan::Limit, crate::hash::Digest, bool);

/// The throttles of one request.
#[derive(Clone, Copy, Default)]
pub(crate) struct Throttles<'a> {
    items: [Option<ThrottleItem<'a>>; MAX_THROTTLES],
    len: usize,
}

impl<'a> Throttles<'a> {
    pub(crate) fn push(
        &mut self,
        limit: &'a crate::plan::Limit,
        key: crate::hash::Digest,
        shadow: bool,
    ) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = Some((limit, key, shadow));
            self.len += 1;
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = ThrottleItem<'a>> + '_ {
        self.items[..self.len].iter().flatten().copied()
    }
}

/// The quota of one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuotaAsk<'a> {
    pub(crate) cell: &'a crate::quota::QuotaCell,
    pub(crate) spec: &'a crate::quota::QuotaSpec,
    /// A shadow plan's quota counts past its limit and never denies.
    pub(crate) shadow: bool,
}

impl std::fmt::Debug for Throttles<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttles").field("len", &self.len).finish()
    }
}
