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

/// The most limits one request can be decided against.
pub(crate) const MAX_LIMITS: usize = 4;

/// How one limit stood after a decision, for the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The policy item's name (`"throttle"`).
    pub(crate) name: &'static str,
    /// The limit's size (`q`): a throttle's burst.
    pub(crate) quota: u32,
    /// The limit's window (`w`) in seconds.
    pub(crate) window_secs: u64,
    /// Units left (`r`).
    pub(crate) remaining: u32,
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

/// Why a store denied a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denial {
    /// A limit has no room now; retry after the given nanoseconds.
    Limited { retry_after: Nanos },
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
